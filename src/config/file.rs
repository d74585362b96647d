//! The shape of routes.toml (version 1) as serde structs: strict (`deny_unknown_fields`),
//! with every value an operator can get wrong kept `Spanned` so validation can point at it.
//! Nothing here checks meaning; that is `validate`'s job.

use serde::Deserialize;
use toml::Spanned;

/// `[server]`: process settings, read once at start.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerFile {
    pub listen: Option<Spanned<String>>,
    pub admin: Option<Spanned<String>>,
    pub admin_token: Option<Spanned<String>>,
    pub tls: Option<Spanned<TlsFile>>,
    pub drain_timeout: Option<Spanned<String>>,
    pub max_request_body: Option<Spanned<String>>,
    pub header_read_timeout: Option<Spanned<String>>,
    pub max_header_size: Option<Spanned<String>>,
    pub max_connections: Option<Spanned<i64>>,
    pub backlog: Option<Spanned<i64>>,
    pub trust_shadow_header: Option<bool>,
    pub via: Option<Spanned<String>>,
    pub workers: Option<Spanned<i64>>,
    pub watch: Option<Spanned<String>>,
    pub watch_interval: Option<Spanned<String>>,
    pub access_log: Option<bool>,
    pub h2c: Option<bool>,
    pub trusted_proxies: Option<Spanned<Vec<Spanned<String>>>>,
    pub stale_store_size: Option<Spanned<String>>,
}

/// `[ratelimit_store]`: where `scope = "global"` limits keep their counts.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitStoreFile {
    pub url_env: Option<Spanned<String>>,
    /// Never accepted: named so the error can say where the URL goes instead.
    pub url: Option<Spanned<toml::Value>>,
    pub timeout: Option<Spanned<String>>,
    pub on_error: Option<Spanned<String>>,
}

/// `[events]`: where migration events are published (RabbitMQ), read at start.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventsFile {
    pub url_env: Option<Spanned<String>>,
    /// Never accepted: named so the error can say where the URL goes instead.
    pub url: Option<Spanned<toml::Value>>,
    pub exchange: Option<Spanned<String>>,
    pub buffer: Option<Spanned<i64>>,
    pub buffer_bytes: Option<Spanned<String>>,
    pub publish_timeout: Option<Spanned<String>>,
    pub source: Option<Spanned<String>>,
}

/// A route's `events`: `["mismatch", "write", "request"]` or `{ kinds, sample, body, query }`.
#[derive(Debug)]
pub enum RouteEventsFile {
    Kinds(Vec<Spanned<String>>),
    Table(RouteEventsTable),
}

/// `events = { kinds, sample, body, query }`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteEventsTable {
    pub kinds: Spanned<Vec<Spanned<String>>>,
    pub sample: Option<Spanned<f64>>,
    pub body: Option<Spanned<String>>,
    pub query: Option<bool>,
}

impl<'de> Deserialize<'de> for RouteEventsFile {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = RouteEventsFile;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a list of event kinds or { kinds, sample, body, query }")
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                seq: A,
            ) -> Result<RouteEventsFile, A::Error> {
                Vec::<Spanned<String>>::deserialize(serde::de::value::SeqAccessDeserializer::new(
                    seq,
                ))
                .map(RouteEventsFile::Kinds)
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                map: A,
            ) -> Result<RouteEventsFile, A::Error> {
                RouteEventsTable::deserialize(serde::de::value::MapAccessDeserializer::new(map))
                    .map(RouteEventsFile::Table)
            }
        }
        d.deserialize_any(Visitor)
    }
}

/// `tls = { ... }` on the server or on a backend (validation says which keys go where).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFile {
    pub cert: Option<Spanned<String>>,
    pub key: Option<Spanned<String>>,
    pub ca: Option<Spanned<String>>,
    pub client_ca: Option<Spanned<String>>,
    pub client_auth: Option<Spanned<String>>,
    pub server_name: Option<Spanned<String>>,
    pub sni: Option<Spanned<Vec<Spanned<CertPairFile>>>>,
}

/// One more listener certificate: `{ cert, key }`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertPairFile {
    pub cert: Spanned<String>,
    pub key: Spanned<String>,
}

/// `[backends.NAME]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendFile {
    pub url: Spanned<String>,
    #[serde(default)]
    pub legacy: bool,
    pub connect_timeout: Option<Spanned<String>>,
    pub timeout: Option<Spanned<String>>,
    pub tls: Option<Spanned<TlsFile>>,
    pub protocol: Option<Spanned<String>>,
    pub endpoints: Option<Spanned<Vec<Spanned<String>>>>,
    pub retries: Option<Spanned<i64>>,
    pub retry_on: Option<Spanned<Vec<Spanned<String>>>>,
    pub health: Option<Spanned<HealthFile>>,
    pub max_connections: Option<Spanned<i64>>,
    pub max_connecting: Option<Spanned<i64>>,
    pub max_waiting: Option<Spanned<i64>>,
    pub wait_timeout: Option<Spanned<String>>,
}

/// `health = { path, interval }`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthFile {
    pub path: Spanned<String>,
    pub interval: Option<Spanned<String>>,
}

/// One `[[routes]]` entry.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteFile {
    pub prefix: Spanned<String>,
    pub methods: Option<Spanned<Vec<Spanned<String>>>>,
    pub host: Option<Spanned<String>>,
    pub backend: Spanned<String>,
    pub shadow: Option<Spanned<String>>,
    pub shadow_percent: Option<Spanned<f64>>,
    pub shadow_methods: Option<Spanned<Vec<Spanned<String>>>>,
    pub canary: Option<Spanned<CanaryFile>>,
    pub fallback: Option<Spanned<String>>,
    pub compare: Option<Spanned<CompareFile>>,
    pub guard: Option<Spanned<GuardFile>>,
    pub upgrades: Option<Spanned<Vec<Spanned<String>>>>,
    pub retry_non_idempotent: Option<Spanned<bool>>,
    pub auth: Option<Spanned<RouteAuthFile>>,
    pub rate_limit: Option<Spanned<RateLimitsFile>>,
    pub stale_if_error: Option<Spanned<StaleFile>>,
    pub events: Option<Spanned<RouteEventsFile>>,
}

/// `rate_limit = { ... }`, or several windows as `[[routes.rate_limit]]`.
#[derive(Debug)]
pub enum RateLimitsFile {
    One(Box<RateLimitFile>),
    Many(Vec<Spanned<RateLimitFile>>),
}

/// One rate-limit window.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitFile {
    pub name: Option<Spanned<String>>,
    pub limit: Spanned<i64>,
    pub per: Spanned<String>,
    pub burst: Option<Spanned<i64>>,
    pub key: Option<Spanned<String>>,
    pub mode: Option<Spanned<String>>,
    pub max_keys: Option<Spanned<i64>>,
    pub scope: Option<Spanned<String>>,
}

impl<'de> Deserialize<'de> for RateLimitsFile {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = RateLimitsFile;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("{ limit, per, ... } or [[routes.rate_limit]] tables")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                map: A,
            ) -> Result<RateLimitsFile, A::Error> {
                RateLimitFile::deserialize(serde::de::value::MapAccessDeserializer::new(map))
                    .map(|w| RateLimitsFile::One(Box::new(w)))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                seq: A,
            ) -> Result<RateLimitsFile, A::Error> {
                Vec::<Spanned<RateLimitFile>>::deserialize(
                    serde::de::value::SeqAccessDeserializer::new(seq),
                )
                .map(RateLimitsFile::Many)
            }
        }
        d.deserialize_any(Visitor)
    }
}

/// `stale_if_error = { ... }`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StaleFile {
    pub max_stale: Spanned<String>,
    pub max_entry: Option<Spanned<String>>,
    pub on: Option<Spanned<Vec<Spanned<String>>>>,
    pub vary: Option<Spanned<Vec<Spanned<String>>>>,
    pub per_user: Option<Spanned<String>>,
}

/// `[auth.NAME]`: a JWT provider.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthFile {
    pub issuer: Option<Spanned<String>>,
    pub audiences: Option<Spanned<Vec<Spanned<String>>>>,
    pub algorithms: Option<Spanned<Vec<Spanned<String>>>>,
    pub jwks_url: Option<Spanned<String>>,
    pub jwks_file: Option<Spanned<String>>,
    /// CA bundle for an `https://` `jwks_url` (default: the system roots).
    pub jwks_ca: Option<Spanned<String>>,
    pub jwks_refresh: Option<Spanned<String>>,
    pub jwks_timeout: Option<Spanned<String>>,
    pub jwks_cooldown: Option<Spanned<String>>,
    pub secret_env: Option<Spanned<String>>,
    pub secret_file: Option<Spanned<String>>,
    /// Never accepted: named so the error can say where secrets go instead.
    pub secret: Option<Spanned<toml::Value>>,
    pub clock_skew: Option<Spanned<String>>,
    pub token_from: Option<Spanned<Vec<Spanned<String>>>>,
    pub claims_to_headers: Option<Spanned<toml::Table>>,
    pub forward_token: Option<bool>,
    pub realm: Option<Spanned<String>>,
}

/// A route's `auth`: a provider's name, or `{ provider, mode, require }`.
#[derive(Debug)]
pub enum RouteAuthFile {
    Name(String),
    Table(RouteAuthTable),
}

/// `auth = { provider, mode, require }`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteAuthTable {
    pub provider: Spanned<String>,
    pub mode: Option<Spanned<String>>,
    pub require: Option<Spanned<toml::Table>>,
}

impl<'de> Deserialize<'de> for RouteAuthFile {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = RouteAuthFile;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a provider name or { provider, mode, require }")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<RouteAuthFile, E> {
                Ok(RouteAuthFile::Name(v.to_string()))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                map: A,
            ) -> Result<RouteAuthFile, A::Error> {
                RouteAuthTable::deserialize(serde::de::value::MapAccessDeserializer::new(map))
                    .map(RouteAuthFile::Table)
            }
        }
        d.deserialize_any(Visitor)
    }
}

/// `canary = { backend, percent, sticky }`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CanaryFile {
    pub backend: Spanned<String>,
    pub percent: Spanned<f64>,
    pub sticky: Option<Spanned<String>>,
}

/// `[routes.compare]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CompareFile {
    pub ignore: Option<Vec<Spanned<String>>>,
    pub headers: Option<Vec<Spanned<String>>>,
    pub noise: Option<bool>,
    pub max_body: Option<Spanned<String>>,
    pub tolerance: Option<Spanned<f64>>,
    pub gate: Option<Spanned<GateFile>>,
}

/// `gate = { min_comparisons, max_mismatch_rate }`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GateFile {
    pub min_comparisons: Spanned<i64>,
    pub max_mismatch_rate: Spanned<f64>,
}

/// `[routes.guard]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GuardFile {
    pub max_error_rate: Spanned<f64>,
    pub window: Option<Spanned<String>>,
    pub min_requests: Option<Spanned<i64>>,
    pub to: Option<Spanned<String>>,
}

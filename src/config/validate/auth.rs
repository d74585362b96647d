//! `[auth.NAME]` providers, a route's `auth`, and `[server] trusted_proxies`. Key files and
//! secret files are read here (through `Ctx::files`, so they are watched like certificates);
//! a secret is never accepted inline.

use std::sync::Arc;

use toml::Spanned;

use super::*;
use crate::config::file::{AuthFile, BackendFile, RouteAuthFile, TlsFile};
use crate::jwt::{self, KeySet, Rules};
use crate::routes::{KeySource, Mode, Provider, ProviderId, RouteAuth, TokenSource};

/// Default leeway on `exp` and `nbf` (Envoy's).
const DEFAULT_CLOCK_SKEW: Duration = Duration::from_secs(60);
/// Skews past this would make expiry meaningless.
const MAX_CLOCK_SKEW: Duration = Duration::from_secs(600);
/// How often a JWKS URL is fetched again in the background.
const DEFAULT_JWKS_REFRESH: Duration = Duration::from_secs(600);
const MIN_JWKS_REFRESH: Duration = Duration::from_secs(30);
/// A JWKS fetch's whole budget (connect, head and body).
const DEFAULT_JWKS_TIMEOUT: Duration = Duration::from_secs(5);
/// The least time between two fetches forced by unknown key ids.
const DEFAULT_JWKS_COOLDOWN: Duration = Duration::from_secs(30);
const MIN_JWKS_COOLDOWN: Duration = Duration::from_secs(1);
/// HS256 needs a key at least as long as its hash (RFC 7518 §3.2).
const MIN_SECRET_BYTES: usize = 32;
/// Request headers a claim may never be written to: the proxy or the client own them.
const RESERVED_HEADERS: [&str; 14] = [
    "host",
    "authorization",
    "cookie",
    "content-length",
    "content-type",
    "transfer-encoding",
    "connection",
    "te",
    "upgrade",
    "via",
    "x-request-id",
    "traceparent",
    "tracestate",
    "x-strangler-shadow",
];

impl Ctx {
    /// Every `[auth.NAME]` section, in file order.
    pub(super) fn providers(&mut self, value: Option<Spanned<DeValue<'_>>>) -> Vec<Provider> {
        let Some(value) = value else { return vec![] };
        let span = value.span();
        let DeValue::Table(entries) = value.into_inner() else {
            self.err(
                span,
                "`auth` must be a table of `[auth.NAME]` sections".into(),
            );
            return vec![];
        };
        let mut out = Vec::new();
        for (name, entry) in entries {
            let name_span = name.span();
            let name = name.into_inner().to_string();
            self.section_name(&name, name_span.clone(), "provider");
            let claim_spans = entry_spans(&entry, "claims_to_headers");
            let Some(f) = self.de::<AuthFile>(entry, &format!("[auth.{name}]")) else {
                // Keeps its place so routes naming it do not also say "unknown provider".
                out.push(placeholder(name));
                continue;
            };
            let p = self
                .provider(&name, name_span, f, &claim_spans)
                .unwrap_or_else(|| placeholder(name));
            out.push(p);
        }
        out
    }

    fn provider(
        &mut self,
        name: &str,
        at: Range<usize>,
        f: AuthFile,
        claim_spans: &[EntrySpan],
    ) -> Option<Provider> {
        let section = format!("[auth.{name}]");
        if let Some(s) = &f.secret {
            self.err(
                s.span(),
                format!("{section} `secret`: routes.toml is no place for a secret (it is often a ConfigMap in git); use `secret_env = \"VAR\"` or `secret_file = \"path\"`"),
            );
        }
        let issuer = match &f.issuer {
            Some(i) if !i.get_ref().is_empty() => i.get_ref().clone(),
            Some(i) => {
                self.err(i.span(), format!("{section} `issuer` is empty"));
                String::new()
            }
            None => {
                self.err(
                    at.clone(),
                    format!("{section} needs `issuer`: tokens are accepted only from it (exact match on `iss`)"),
                );
                String::new()
            }
        };
        let audiences = match &f.audiences {
            Some(a) if a.get_ref().is_empty() => {
                self.err(a.span(), format!("{section} `audiences` is empty"));
                vec![]
            }
            Some(a) => a
                .get_ref()
                .iter()
                .filter_map(|v| {
                    if v.get_ref().is_empty() {
                        self.err(
                            v.span(),
                            format!("{section} `audiences`: an empty audience"),
                        );
                        None
                    } else {
                        Some(v.get_ref().clone())
                    }
                })
                .collect(),
            None => {
                self.err(
                    at.clone(),
                    format!("{section} needs `audiences`: a token must be meant for this API (any of them in `aud`)"),
                );
                vec![]
            }
        };
        let algorithms = self.algorithms(&section, f.algorithms.as_ref(), &at);
        let clock_skew = self.auth_duration(
            &section,
            f.clock_skew.as_ref(),
            "clock_skew",
            DEFAULT_CLOCK_SKEW,
        );
        if clock_skew > MAX_CLOCK_SKEW {
            let span = f.clock_skew.as_ref().map_or(at.clone(), Spanned::span);
            self.err(
                span,
                format!(
                    "{section} `clock_skew` above {} would keep expired tokens alive",
                    humantime::format_duration(MAX_CLOCK_SKEW)
                ),
            );
        }
        let keys = self.key_source(name, &section, &f, &algorithms, &at);
        let token_from = match &f.token_from {
            None => vec![TokenSource::Bearer],
            Some(list) if list.get_ref().is_empty() => {
                self.err(list.span(), format!("{section} `token_from` is empty"));
                vec![]
            }
            Some(list) => list
                .get_ref()
                .iter()
                .filter_map(|t| self.token_source(&section, t))
                .collect(),
        };
        let claims_to_headers = f.claims_to_headers.as_ref().map_or_else(Vec::new, |t| {
            self.claims_to_headers(&section, t, claim_spans)
        });
        let realm = match &f.realm {
            None => name.to_string(),
            Some(r) => {
                let ok = !r.get_ref().is_empty()
                    && r.get_ref()
                        .bytes()
                        .all(|b| (0x20..0x7f).contains(&b) && b != b'"' && b != b'\\');
                if !ok {
                    self.err(
                        r.span(),
                        format!("{section} `realm` must be printable ASCII without quotes or backslashes"),
                    );
                }
                r.get_ref().clone()
            }
        };
        Some(Provider {
            name: name.to_string(),
            rules: Rules {
                issuer,
                audiences,
                algorithms,
                clock_skew,
            },
            keys: keys?,
            token_from,
            claims_to_headers,
            forward_token: f.forward_token.unwrap_or(true),
            realm,
        })
    }

    fn algorithms(
        &mut self,
        section: &str,
        list: Option<&Spanned<Vec<Spanned<String>>>>,
        at: &Range<usize>,
    ) -> Vec<jsonwebtoken::Algorithm> {
        let Some(list) = list else {
            self.err(
                at.clone(),
                format!("{section} needs `algorithms`, the allow-list (e.g. [\"RS256\"]): the algorithm is never taken from the token"),
            );
            return vec![];
        };
        if list.get_ref().is_empty() {
            self.err(list.span(), format!("{section} `algorithms` is empty"));
        }
        let mut out = Vec::new();
        for a in list.get_ref() {
            match jwt::algorithm(a.get_ref()) {
                Some(alg) => out.push(alg),
                None => self.err(
                    a.span(),
                    format!("{section} `algorithms`: {:?} is not a signing algorithm (RS256, RS384, RS512, PS256, PS384, PS512, ES256, ES384, EdDSA, HS256, HS384, HS512)", a.get_ref()),
                ),
            }
        }
        let hmac = out.iter().filter(|a| jwt::is_hmac(**a)).count();
        if hmac > 0 && hmac < out.len() {
            self.err(
                list.span(),
                format!("{section} `algorithms` mixes HMAC (HS*) with public-key algorithms: a token signed with a public key as an HMAC secret would pass; use two providers"),
            );
        }
        out
    }

    fn key_source(
        &mut self,
        name: &str,
        section: &str,
        f: &AuthFile,
        algorithms: &[jsonwebtoken::Algorithm],
        at: &Range<usize>,
    ) -> Option<KeySource> {
        let sources = [
            ("jwks_url", f.jwks_url.as_ref()),
            ("jwks_file", f.jwks_file.as_ref()),
            ("secret_env", f.secret_env.as_ref()),
            ("secret_file", f.secret_file.as_ref()),
        ];
        let given: Vec<(&str, &Spanned<String>)> = sources
            .iter()
            .filter_map(|(k, v)| v.map(|v| (*k, v)))
            .collect();
        let [(key, value)] = given.as_slice() else {
            // Two or more: at the last of them in the file, naming them all.
            let span = given
                .iter()
                .map(|(_, v)| v.span())
                .max_by_key(|s| s.start)
                .unwrap_or(at.clone());
            let set = if given.is_empty() {
                "none is set".to_string()
            } else {
                let names: Vec<String> = given.iter().map(|(k, _)| format!("`{k}`")).collect();
                format!("set: {}", names.join(", "))
            };
            self.err(
                span,
                format!("{section} needs exactly one key source: `jwks_url`, `jwks_file`, `secret_env` or `secret_file` ({set})"),
            );
            return None;
        };
        let secret = key.starts_with("secret");
        let hmac = algorithms.iter().any(|a| jwt::is_hmac(*a));
        if secret && algorithms.iter().any(|a| !jwt::is_hmac(*a)) {
            self.err(
                value.span(),
                format!("{section} `{key}` is an HMAC secret: `algorithms` must then be HS256, HS384 or HS512 only"),
            );
        }
        if !secret && hmac {
            self.err(
                value.span(),
                format!("{section} `{key}` holds public keys: HS* algorithms need `secret_env` or `secret_file`"),
            );
        }
        for (k, v) in [
            ("jwks_ca", f.jwks_ca.as_ref()),
            ("jwks_refresh", f.jwks_refresh.as_ref()),
            ("jwks_timeout", f.jwks_timeout.as_ref()),
            ("jwks_cooldown", f.jwks_cooldown.as_ref()),
        ] {
            if let (Some(v), false) = (v, *key == "jwks_url") {
                self.err(
                    v.span(),
                    format!("{section} `{k}` applies to `jwks_url` only"),
                );
            }
        }
        let text = value.get_ref();
        match *key {
            "jwks_url" => self.jwks_url(name, section, f, value),
            "jwks_file" => {
                let path = self.dir.join(text);
                let bytes = match self.files.read(&path) {
                    Ok(b) => b,
                    Err(e) => {
                        self.err(value.span(), format!("{section} `jwks_file`: {e}"));
                        return None;
                    }
                };
                match KeySet::from_jwks(&bytes) {
                    Ok(keys) => Some(KeySource::Loaded {
                        origin: format!("jwks_file {text}"),
                        keys: Arc::new(keys),
                    }),
                    Err(e) => {
                        self.err(value.span(), format!("{section} `jwks_file` {text:?}: {e}"));
                        None
                    }
                }
            }
            "secret_env" => {
                let secret = std::env::var(text).unwrap_or_default();
                self.secret(
                    section,
                    value,
                    format!("secret_env {text}"),
                    secret.into_bytes(),
                )
            }
            _ => {
                let path = self.dir.join(text);
                match self.files.read(&path) {
                    Ok(mut bytes) => {
                        while bytes.last().is_some_and(|b| b.is_ascii_whitespace()) {
                            bytes.pop();
                        }
                        self.secret(section, value, format!("secret_file {text}"), bytes)
                    }
                    Err(e) => {
                        self.err(value.span(), format!("{section} `secret_file`: {e}"));
                        None
                    }
                }
            }
        }
    }

    fn secret(
        &mut self,
        section: &str,
        at: &Spanned<String>,
        origin: String,
        bytes: Vec<u8>,
    ) -> Option<KeySource> {
        if bytes.len() < MIN_SECRET_BYTES {
            let what = if bytes.is_empty() {
                "is empty or unset".to_string()
            } else {
                format!(
                    "is {} bytes; HMAC secrets need at least {MIN_SECRET_BYTES}",
                    bytes.len()
                )
            };
            self.err(
                at.span(),
                format!("{section} `{origin}`: the secret {what}"),
            );
            return None;
        }
        Some(KeySource::Loaded {
            origin,
            keys: Arc::new(KeySet::from_secret(&bytes)),
        })
    }

    fn jwks_url(
        &mut self,
        name: &str,
        section: &str,
        f: &AuthFile,
        url: &Spanned<String>,
    ) -> Option<KeySource> {
        let text = url.get_ref();
        let uri = match text.parse::<Uri>() {
            Ok(u)
                if matches!(u.scheme_str(), Some("http" | "https")) && u.authority().is_some() =>
            {
                u
            }
            _ => {
                // A URL with user info is not echoed: it may hold a password.
                let shown = if text.contains('@') {
                    "the value".to_string()
                } else {
                    format!("{text:?}")
                };
                self.err(
                    url.span(),
                    format!(
                        "{section} `jwks_url`: {shown} must be an absolute http:// or https:// URL"
                    ),
                );
                return None;
            }
        };
        if uri.authority().is_some_and(|a| a.as_str().contains('@')) {
            // Not echoed: the URL holds a password.
            self.err(
                url.span(),
                format!("{section} `jwks_url` must not carry credentials (user:password@)"),
            );
            return None;
        }
        let origin = format!(
            "{}://{}",
            uri.scheme_str().unwrap_or("https"),
            uri.authority().map_or("", |a| a.as_str())
        );
        let path = uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/"));
        let tls = f.jwks_ca.as_ref().map(|ca| {
            Spanned::new(
                ca.span(),
                TlsFile {
                    cert: None,
                    key: None,
                    ca: Some(ca.clone()),
                    client_ca: None,
                    client_auth: None,
                    server_name: None,
                    sni: None,
                },
            )
        });
        let as_backend = BackendFile {
            url: Spanned::new(url.span(), origin),
            legacy: false,
            connect_timeout: None,
            // Parsed here, so its errors name `jwks_timeout`.
            timeout: None,
            tls,
            protocol: None,
            endpoints: None,
            retries: None,
            retry_on: None,
            health: None,
            max_connections: None,
            max_connecting: None,
            max_waiting: None,
            wait_timeout: None,
        };
        let before = self.errors.len();
        let backend = self.backend(format!("auth.{name}"), as_backend);
        // In the provider's words: its section and keys, not a backend's.
        let prefix = format!("[backends.auth.{name}]");
        for e in &mut self.errors[before..] {
            e.message = e
                .message
                .replace(&prefix, section)
                .replace(
                    "`tls` applies to https:// URLs; this backend's url is http://",
                    "`jwks_ca` applies to https:// URLs; this `jwks_url` is http://",
                )
                .replace("`tls`: ca ", "`jwks_ca`: ")
                .replace("`tls`: ", "`jwks_ca`: ")
                .replace(
                    "`tls.server_name`: not a DNS name",
                    "`jwks_url`: its host is not a DNS name",
                )
                .replace("`url`", "`jwks_url`");
        }
        let timeout = self.auth_duration(
            section,
            f.jwks_timeout.as_ref(),
            "jwks_timeout",
            DEFAULT_JWKS_TIMEOUT,
        );
        let mut backend = backend?;
        backend.timeout = timeout;
        backend.connect_timeout = backend.connect_timeout.min(backend.timeout);
        let refresh = self.auth_duration(
            section,
            f.jwks_refresh.as_ref(),
            "jwks_refresh",
            DEFAULT_JWKS_REFRESH,
        );
        if refresh < MIN_JWKS_REFRESH {
            let span = f.jwks_refresh.as_ref().map_or(url.span(), Spanned::span);
            self.err(
                span,
                format!(
                    "{section} `jwks_refresh` must be at least {}",
                    humantime::format_duration(MIN_JWKS_REFRESH)
                ),
            );
        }
        let cooldown = self.auth_duration(
            section,
            f.jwks_cooldown.as_ref(),
            "jwks_cooldown",
            DEFAULT_JWKS_COOLDOWN,
        );
        if cooldown < MIN_JWKS_COOLDOWN {
            let span = f.jwks_cooldown.as_ref().map_or(url.span(), Spanned::span);
            self.err(
                span,
                format!(
                    "{section} `jwks_cooldown` must be at least {}",
                    humantime::format_duration(MIN_JWKS_COOLDOWN)
                ),
            );
        }
        Some(KeySource::Url {
            url: text.clone(),
            path,
            backend: Box::new(backend),
            refresh: refresh.max(MIN_JWKS_REFRESH),
            cooldown: cooldown.max(MIN_JWKS_COOLDOWN),
        })
    }

    fn token_source(&mut self, section: &str, t: &Spanned<String>) -> Option<TokenSource> {
        let text = t.get_ref();
        let source = match text.split_once(':') {
            Some(("header", h)) if h.eq_ignore_ascii_case("authorization") => {
                Some(TokenSource::Bearer)
            }
            Some(("header", h)) => HeaderName::from_bytes(h.as_bytes())
                .ok()
                .filter(|h| h != http::header::COOKIE)
                .map(TokenSource::Header),
            Some(("cookie", c)) if crate::routes::is_cookie_name(c) => {
                Some(TokenSource::Cookie(c.to_string()))
            }
            _ => None,
        };
        if source.is_none() {
            let hint = if text.starts_with("query") {
                " (never a query parameter: it would leak into logs and diffs)"
            } else {
                ""
            };
            self.err(
                t.span(),
                format!("{section} `token_from` {text:?}: expected \"header:authorization\", \"header:NAME\" or \"cookie:NAME\"{hint}"),
            );
        }
        source
    }

    fn claims_to_headers(
        &mut self,
        section: &str,
        table: &Spanned<toml::Table>,
        spans: &[EntrySpan],
    ) -> Vec<(HeaderName, String)> {
        // Each mistake at its own entry: the header's name, or the claim it maps to.
        let at = |header: &str, value: bool| {
            spans
                .iter()
                .find(|e| e.key == header)
                .map_or(table.span(), |e| {
                    if value {
                        e.value.clone()
                    } else {
                        e.key_span.clone()
                    }
                })
        };
        let mut out = Vec::new();
        for (header, claim) in table.get_ref() {
            let name = match HeaderName::from_bytes(header.as_bytes()) {
                Ok(n) => n,
                Err(_) => {
                    self.err(
                        at(header, false),
                        format!("{section} `claims_to_headers`: {header:?} is not a header name"),
                    );
                    continue;
                }
            };
            if RESERVED_HEADERS.contains(&name.as_str())
                || name.as_str().starts_with("x-forwarded-")
            {
                self.err(
                    at(header, false),
                    format!("{section} `claims_to_headers`: {name} is set by the client or the proxy and cannot carry a claim"),
                );
                continue;
            }
            match claim.as_str() {
                Some(c) if !c.is_empty() => out.push((name, c.to_string())),
                _ => self.err(
                    at(header, true),
                    format!("{section} `claims_to_headers`: {header} must name a claim, as a string (e.g. \"sub\")"),
                ),
            }
        }
        out
    }

    /// A route's `auth`: the provider it names, its mode and required claims.
    pub(super) fn route_auth(
        &mut self,
        a: &Spanned<RouteAuthFile>,
        providers: &[Provider],
    ) -> Option<RouteAuth> {
        let (name, span, mode, require) = match a.get_ref() {
            RouteAuthFile::Name(n) => (n.clone(), a.span(), None, None),
            RouteAuthFile::Table(t) => (
                t.provider.get_ref().clone(),
                t.provider.span(),
                t.mode.as_ref(),
                t.require.as_ref(),
            ),
        };
        let provider: Option<ProviderId> = providers.iter().position(|p| p.name == name);
        if provider.is_none() {
            let mut known: Vec<&str> = providers.iter().map(|p| p.name.as_str()).collect();
            known.sort_unstable();
            let declared = if known.is_empty() {
                "none; declare one as [auth.NAME]".to_string()
            } else {
                known.join(", ")
            };
            self.err(
                span,
                format!("`auth`: unknown provider {name:?} (declared: {declared})"),
            );
        }
        let mode = match mode.map(|m| m.get_ref().as_str()) {
            None | Some("required") => Mode::Required,
            Some("optional") => Mode::Optional,
            Some("observe") => Mode::Observe,
            Some(other) => {
                let span = mode.map_or(a.span(), Spanned::span);
                self.err(
                    span,
                    format!(
                        "`auth.mode` {other:?}: expected \"required\", \"optional\" or \"observe\""
                    ),
                );
                Mode::Required
            }
        };
        let require_spans = require.map_or_else(Vec::new, |r| self.inline_spans(r.span()));
        let mut required = Vec::new();
        for (claim, value) in require.map(Spanned::get_ref).into_iter().flatten() {
            let values: Option<Vec<String>> = match value {
                toml::Value::String(s) => {
                    Some(s.split_ascii_whitespace().map(str::to_string).collect())
                }
                toml::Value::Array(items) => items
                    .iter()
                    .map(|i| i.as_str().map(str::to_string))
                    .collect(),
                _ => None,
            };
            match values.filter(|v| !v.is_empty() && !claim.is_empty()) {
                Some(v) => required.push((claim.clone(), v)),
                None => {
                    let span = require_spans
                        .iter()
                        .find(|e| e.key == *claim)
                        .map(|e| e.value.clone())
                        .or_else(|| require.map(Spanned::span))
                        .unwrap_or(a.span());
                    self.err(
                        span,
                        format!("`auth.require` {claim:?}: expected a non-empty string or array of strings (values the claim must grant)"),
                    );
                }
            }
        }
        Some(RouteAuth {
            provider: provider?,
            mode,
            require: required,
        })
    }

    /// `[server] trusted_proxies`: CIDRs (or single addresses) whose `X-Forwarded-For` is
    /// believed.
    pub(super) fn trusted_proxies(
        &mut self,
        list: Option<&Spanned<Vec<Spanned<String>>>>,
    ) -> Vec<ipnet::IpNet> {
        let mut out = Vec::new();
        for v in list.map(Spanned::get_ref).into_iter().flatten() {
            let text = v.get_ref().trim();
            let net = text.parse::<ipnet::IpNet>().ok().or_else(|| {
                text.parse::<std::net::IpAddr>()
                    .ok()
                    .map(ipnet::IpNet::from)
            });
            match net {
                Some(n) => out.push(n.trunc()),
                None => self.err(
                    v.span(),
                    format!("`trusted_proxies`: {text:?} is not an address or CIDR such as \"10.0.0.0/8\""),
                ),
            }
        }
        out
    }
}

/// A provider that failed validation, standing in so routes naming it do not also fail.
fn placeholder(name: String) -> Provider {
    Provider {
        realm: name.clone(),
        name,
        rules: Rules {
            issuer: String::new(),
            audiences: vec![],
            algorithms: vec![],
            clock_skew: DEFAULT_CLOCK_SKEW,
        },
        keys: KeySource::Loaded {
            origin: String::new(),
            keys: Arc::new(KeySet::empty()),
        },
        token_from: vec![],
        claims_to_headers: vec![],
        forward_token: true,
    }
}

/// Where one entry of a table is in routes.toml: its key and its value.
pub(super) struct EntrySpan {
    key: String,
    key_span: Range<usize>,
    value: Range<usize>,
}

/// The entries of the table `key` inside `section` (a table in the parsed document, inline
/// or not), with their places; empty when there is no such table.
fn entry_spans(section: &Spanned<DeValue<'_>>, key: &str) -> Vec<EntrySpan> {
    let DeValue::Table(entries) = section.get_ref() else {
        return vec![];
    };
    let Some((_, value)) = entries.iter().find(|(k, _)| k.get_ref() == key) else {
        return vec![];
    };
    table_spans(value)
}

fn table_spans(table: &Spanned<DeValue<'_>>) -> Vec<EntrySpan> {
    let DeValue::Table(entries) = table.get_ref() else {
        return vec![];
    };
    entries
        .iter()
        .map(|(k, v)| EntrySpan {
            key: k.get_ref().to_string(),
            key_span: k.span(),
            value: v.span(),
        })
        .collect()
}

impl Ctx {
    /// The entries of the inline table written at `span` (`{ scope = "users:read" }`), with
    /// their places in the file; empty for anything else.
    fn inline_spans(&self, span: Range<usize>) -> Vec<EntrySpan> {
        let Some(text) = self.src.get(span.clone()) else {
            return vec![];
        };
        if !text.starts_with('{') {
            return vec![];
        }
        let Ok(value) = DeValue::parse(text) else {
            return vec![];
        };
        let mut out = table_spans(&value);
        for e in &mut out {
            e.key_span = e.key_span.start + span.start..e.key_span.end + span.start;
            e.value = e.value.start + span.start..e.value.end + span.start;
        }
        out
    }

    /// A duration of a provider; its error names the section.
    fn auth_duration(
        &mut self,
        section: &str,
        v: Option<&Spanned<String>>,
        key: &str,
        default: Duration,
    ) -> Duration {
        let before = self.errors.len();
        let d = self.duration(v, key, default);
        for e in &mut self.errors[before..] {
            e.message = format!("{section} {}", e.message);
        }
        d
    }
}

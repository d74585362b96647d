//! Authentication in the table: `[auth.NAME]` providers and a route's `auth`. Pure data: the
//! keys a provider has at run time, its caches and its JWKS fetches live in `crate::auth`.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use http::header::HeaderName;

use super::Backend;
use crate::jwt::{KeySet, Rules};

/// Index of a provider in [`super::RouteTable::providers`].
pub type ProviderId = usize;

/// One `[auth.NAME]` provider, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct Provider {
    pub name: String,
    pub rules: Rules,
    pub keys: KeySource,
    /// Where the token is read from, tried in order.
    pub token_from: Vec<TokenSource>,
    /// Request header -> claim: verified claims as headers for the backend and the shadow.
    pub claims_to_headers: Vec<(HeaderName, String)>,
    /// Whether the backend still sees the credential (the monolith usually needs it).
    pub forward_token: bool,
    /// `realm` of `WWW-Authenticate` (default: the provider's name).
    pub realm: String,
}

/// Where a provider's keys come from.
#[derive(Debug, Clone, PartialEq)]
pub enum KeySource {
    /// Read when the table was loaded: a JWKS file or an HMAC secret. A change of the file
    /// reloads the table, like a certificate.
    Loaded {
        /// `jwks_file keys/jwks.json`, `secret_env NAME`, `secret_file PATH`, for operators.
        origin: String,
        keys: Arc<KeySet>,
    },
    /// Fetched at run time through the proxy's own upstream client.
    Url {
        url: String,
        /// The path and query fetched.
        path: http::uri::PathAndQuery,
        /// The JWKS host as a backend (endpoint, TLS roots, timeouts).
        backend: Box<Backend>,
        /// How often the set is fetched again in the background.
        refresh: Duration,
        /// The least time between two fetches forced by unknown key ids.
        cooldown: Duration,
    },
}

impl KeySource {
    /// One line for operators.
    pub fn describe(&self) -> String {
        match self {
            KeySource::Loaded { origin, keys } => match keys.len() {
                1 => format!("{origin} (1 key)"),
                n => format!("{origin} ({n} keys)"),
            },
            KeySource::Url { url, refresh, .. } => format!(
                "jwks_url {url} (refreshed every {})",
                humantime::format_duration(*refresh)
            ),
        }
    }
}

/// Where a token is read from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenSource {
    /// `Authorization: Bearer TOKEN`.
    Bearer,
    /// The whole value of another header.
    Header(HeaderName),
    Cookie(String),
}

/// As in routes.toml's `token_from`: `header:authorization`, `header:NAME`, `cookie:NAME`.
impl fmt::Display for TokenSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TokenSource::Bearer => f.write_str("header:authorization"),
            TokenSource::Header(h) => write!(f, "header:{h}"),
            TokenSource::Cookie(c) => write!(f, "cookie:{c}"),
        }
    }
}

/// What a route does with a request's token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// No valid token, no service: 401 / 403 / 400 / 503.
    Required,
    /// Without a token the request passes anonymously; a token must be valid.
    Optional,
    /// Verify and count what would be refused, forward everything.
    Observe,
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Mode::Required => "required",
            Mode::Optional => "optional",
            Mode::Observe => "observe",
        })
    }
}

/// A route's `auth`.
#[derive(Debug, Clone, PartialEq)]
pub struct RouteAuth {
    pub provider: ProviderId,
    pub mode: Mode,
    /// Claim -> values it must grant (each of them).
    pub require: Vec<(String, Vec<String>)>,
}

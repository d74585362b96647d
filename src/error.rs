//! Errors the proxy makes itself. Who is at fault decides the status: the client (400, 413,
//! 508), the routes (404), an upstream (502, 504). A leaf: `respond` turns them into the
//! contract's JSON responses.

use std::time::Duration;

use http::StatusCode;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// How an upstream failed, as counted in `strangler_upstream_errors_total{kind}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamErrorKind {
    /// The connection could not be made: the request was never sent.
    Connect,
    Timeout,
    /// The connection broke after the request was (maybe) sent.
    Reset,
    /// The upstream spoke malformed HTTP.
    Protocol,
}

impl UpstreamErrorKind {
    pub const ALL: [UpstreamErrorKind; 4] =
        [Self::Connect, Self::Timeout, Self::Reset, Self::Protocol];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Connect => "connect",
            Self::Timeout => "timeout",
            Self::Reset => "reset",
            Self::Protocol => "protocol",
        }
    }
}

/// Why a request was refused a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Busy {
    /// `max_waiting` requests were already waiting.
    LineFull,
    /// It waited `wait_timeout` without a connection.
    Waited,
}

impl Busy {
    pub const ALL: [Busy; 2] = [Busy::LineFull, Busy::Waited];

    /// The `reason` label of `strangler_upstream_refused_total`.
    pub fn as_str(self) -> &'static str {
        match self {
            Busy::LineFull => "line_full",
            Busy::Waited => "wait_timeout",
        }
    }
}

/// The error an exchange fails with when its endpoint refused it a connection, with the
/// bounds that refused it.
#[derive(Debug)]
pub struct Refused {
    pub why: Busy,
    pub max_connections: usize,
    pub max_waiting: usize,
    pub wait_timeout: Duration,
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let l = self;
        match self.why {
            Busy::LineFull if l.max_waiting == 0 => write!(
                f,
                "no connection is free and it keeps no line of waiting requests (max_waiting = 0; max_connections = {})",
                l.max_connections
            ),
            Busy::LineFull => write!(
                f,
                "{} requests are already waiting for one of its {} connections (max_waiting)",
                l.max_waiting, l.max_connections
            ),
            Busy::Waited => write!(
                f,
                "no connection came free within {} (wait_timeout; max_connections = {})",
                humantime::format_duration(l.wait_timeout),
                l.max_connections
            ),
        }
    }
}

impl std::error::Error for Refused {}

/// Why a route's `auth` refused a request, as the answer tells it (RFC 6750 §3.1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthError {
    /// No credentials: 401 without an error code.
    Missing,
    /// A token that is not valid (bad, expired, wrong issuer or audience, unknown key): 401
    /// `invalid_token`. The answer never says which, nor echoes the token or its claims.
    Invalid,
    /// Credentials that are not a well-formed bearer token: 400 `invalid_request`.
    Malformed,
    /// A valid token without a required value: 403 `insufficient_scope`.
    InsufficientScope { scope: String },
    /// The token's key is unknown and the key source cannot be reached: 503 (a server fault,
    /// so clients keep their tokens and retry).
    Unavailable { retry_after: Duration },
}

/// A request the proxy answers itself.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("no route for this request")]
    NoRoute,
    #[error("bad request: {reason}")]
    BadRequest { reason: &'static str },
    #[error("request body is larger than {limit} bytes")]
    PayloadTooLarge { limit: u64 },
    #[error("request already passed through this proxy ({name})")]
    LoopDetected { name: String },
    #[error("upstream {backend} is unavailable")]
    UpstreamUnavailable {
        backend: String,
        kind: UpstreamErrorKind,
        #[source]
        source: BoxError,
    },
    /// The endpoint's connection bounds were reached and the request could not wait (or
    /// waited too long) for a connection: never sent.
    #[error("upstream {backend} is busy: {source}")]
    UpstreamBusy { backend: String, source: Refused },
    #[error("upstream {backend} did not answer within {}", humantime::format_duration(*after))]
    UpstreamTimeout { backend: String, after: Duration },
    #[error("too many requests: try again in {} s", retry_after_secs(*retry_after))]
    RateLimited { retry_after: Duration },
    #[error("{}", auth_message(error))]
    Auth {
        realm: String,
        error: AuthError,
        /// The `strangler_auth_total` outcome, for the log.
        reason: &'static str,
    },
}

/// Whole seconds, rounded up, at least 1: `Retry-After` cannot say less.
fn retry_after_secs(d: Duration) -> u64 {
    (d.as_secs() + u64::from(d.subsec_nanos() > 0)).max(1)
}

fn auth_message(error: &AuthError) -> String {
    match error {
        AuthError::Missing => "authentication required".into(),
        AuthError::Invalid => "the access token is invalid".into(),
        AuthError::Malformed => "malformed credentials".into(),
        AuthError::InsufficientScope { scope } => {
            format!("the access token does not grant {scope}")
        }
        AuthError::Unavailable { .. } => {
            "the keys to verify the access token cannot be fetched now".into()
        }
    }
}

impl ProxyError {
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::NoRoute => StatusCode::NOT_FOUND,
            ProxyError::BadRequest { .. } => StatusCode::BAD_REQUEST,
            ProxyError::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ProxyError::LoopDetected { .. } => StatusCode::LOOP_DETECTED,
            ProxyError::UpstreamUnavailable { .. } => StatusCode::BAD_GATEWAY,
            ProxyError::UpstreamTimeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::UpstreamBusy { .. } => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            ProxyError::Auth { error, .. } => match error {
                AuthError::Missing | AuthError::Invalid => StatusCode::UNAUTHORIZED,
                AuthError::Malformed => StatusCode::BAD_REQUEST,
                AuthError::InsufficientScope { .. } => StatusCode::FORBIDDEN,
                AuthError::Unavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
            },
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            ProxyError::NoRoute => "no_route",
            ProxyError::BadRequest { .. } => "bad_request",
            ProxyError::PayloadTooLarge { .. } => "payload_too_large",
            ProxyError::LoopDetected { .. } => "loop_detected",
            ProxyError::UpstreamUnavailable { .. } => "upstream_unavailable",
            ProxyError::UpstreamTimeout { .. } => "upstream_timeout",
            ProxyError::UpstreamBusy { .. } => "upstream_busy",
            ProxyError::RateLimited { .. } => "rate_limited",
            ProxyError::Auth { error, .. } => match error {
                AuthError::Missing | AuthError::Invalid => "unauthorized",
                AuthError::Malformed => "bad_request",
                AuthError::InsufficientScope { .. } => "forbidden",
                AuthError::Unavailable { .. } => "auth_unavailable",
            },
        }
    }

    /// `WWW-Authenticate` of an auth refusal (RFC 6750 §3): the challenge, and the error code
    /// for anything but missing credentials.
    pub fn www_authenticate(&self) -> Option<String> {
        let ProxyError::Auth { realm, error, .. } = self else {
            return None;
        };
        let mut v = format!("Bearer realm=\"{realm}\"");
        match error {
            AuthError::Missing => {}
            AuthError::Invalid => v.push_str(
                ", error=\"invalid_token\", error_description=\"the access token is invalid\"",
            ),
            AuthError::Malformed => v.push_str(", error=\"invalid_request\""),
            AuthError::InsufficientScope { scope } => {
                v.push_str(", error=\"insufficient_scope\"");
                if !scope.contains(['"', '\\']) {
                    v.push_str(&format!(", scope=\"{scope}\""));
                }
            }
            AuthError::Unavailable { .. } => return None,
        }
        Some(v)
    }

    /// `Retry-After` in seconds, for answers that have one.
    pub fn retry_after(&self) -> Option<u64> {
        match self {
            ProxyError::Auth {
                error: AuthError::Unavailable { retry_after },
                ..
            } => Some(retry_after.as_secs().max(1)),
            ProxyError::RateLimited { retry_after } => Some(retry_after_secs(*retry_after)),
            // Connections come free within the time a request takes.
            ProxyError::UpstreamBusy { .. } => Some(1),
            _ => None,
        }
    }
}

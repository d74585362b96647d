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
    #[error("upstream {backend} did not answer within {}", humantime::format_duration(*after))]
    UpstreamTimeout { backend: String, after: Duration },
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
        }
    }
}

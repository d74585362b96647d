//! The access log: one `strangler::access` event per request, emitted when the response is
//! complete (or abandoned), with the bytes that went out. Only what an operator needs: no
//! headers, no query string (it may carry tokens), never a body. Control characters in
//! values are escaped by the log formatter. Nothing is built when the event is filtered out.

use std::time::Duration;

use tokio::time::Instant;

/// The target operators filter on: `RUST_LOG=strangler::access=off` silences it too.
pub const TARGET: &str = "strangler::access";

/// What is known of a request when its response starts.
pub struct AccessLog {
    pub method: http::Method,
    pub path: String,
    pub route: Option<String>,
    pub backend: Option<String>,
    pub status: u16,
    /// The client's address (after `trusted_proxies`).
    pub client: std::net::IpAddr,
    /// The auth outcome on a route with `auth` (`ok`, or why the token was, or in observe
    /// mode would have been, refused).
    pub auth: Option<&'static str>,
    /// The rate-limit outcome on a route with `rate_limit` (`allowed`, `limited`,
    /// `would_limit`).
    pub limit: Option<&'static str>,
    /// Answered from the stale-if-error store after the backends failed.
    pub stale: bool,
    pub request_id: String,
    pub shadowed: bool,
    pub start: Instant,
    pub bytes: u64,
}

impl AccessLog {
    /// Whether an access event would be recorded now.
    pub fn enabled() -> bool {
        tracing::enabled!(target: TARGET, tracing::Level::INFO)
    }

    /// Emits the event; `outcome` is `complete` or `aborted` (the client went away or the
    /// upstream body failed before its end).
    pub fn emit(&self, outcome: &'static str) {
        let duration: Duration = self.start.elapsed();
        tracing::info!(
            target: TARGET,
            method = %self.method,
            path = %self.path,
            route = self.route.as_deref().unwrap_or("none"),
            backend = self.backend.as_deref().unwrap_or("none"),
            status = self.status,
            client = %self.client,
            auth = self.auth.unwrap_or("none"),
            ratelimit = self.limit.unwrap_or("none"),
            stale = self.stale,
            duration_ms = (duration.as_secs_f64() * 1_000_000.0).round() / 1000.0,
            bytes = self.bytes,
            request_id = %self.request_id,
            shadowed = self.shadowed,
            outcome,
            "request"
        );
    }
}

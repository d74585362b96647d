//! Rate limits and stale-if-error in the table: a route's `rate_limit` windows and its
//! `stale_if_error` settings. Pure data: buckets and stored answers live in `crate::limit`
//! and `crate::stale`.

use std::time::Duration;

use http::header::HeaderName;

/// One rate-limit window of a route.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RateLimit {
    /// The policy's name in `RateLimit-Policy` and the `policy` metric label.
    pub name: String,
    /// Requests per `per`: the sustained rate.
    pub limit: u64,
    pub per: Duration,
    /// How many may pass at once (the bucket's size; default `limit`).
    pub burst: u64,
    pub key: super::RequestKey,
    /// Count and log what would be limited, and forward it.
    pub dry_run: bool,
    /// Keys tracked at most (per replica).
    pub max_keys: usize,
    /// Counts kept in `[ratelimit_store]` (Redis), shared by every replica.
    pub global: bool,
}

impl RateLimit {
    /// The time one request's worth of the bucket takes to refill.
    pub fn interval(&self) -> Duration {
        let nanos = self.per.as_nanos() / u128::from(self.limit.max(1));
        Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX))
    }
}

/// A route's `stale_if_error`: a last-known-good store, served only after the backend (and
/// the route's fallback) failed in one of the `on` ways.
#[derive(Debug, Clone, PartialEq)]
pub struct Stale {
    /// How long past storing a copy may be served (the origin's `stale-if-error` overrides).
    pub max_stale: Duration,
    /// Larger answers are not stored.
    pub max_entry: u64,
    pub on_connect: bool,
    pub on_timeout: bool,
    /// 5xx statuses that trigger it.
    pub on_status: Vec<u16>,
    /// Request headers an answer may vary on (lower case); `Vary` on any other is not stored.
    pub vary: Vec<HeaderName>,
    /// A verified claim that keys copies of requests with credentials (`claim:sub` -> `sub`).
    pub per_user: Option<String>,
}

/// Windows in one line, for `diff` and `explain`: `default 100/1m burst 20 by ip`.
pub fn describe_windows(windows: &[RateLimit]) -> String {
    if windows.is_empty() {
        return "none".into();
    }
    windows
        .iter()
        .map(|w| {
            format!(
                "{} {}/{} burst {} by {}{}{}",
                w.name,
                w.limit,
                humantime::format_duration(w.per),
                w.burst,
                w.key,
                if w.dry_run { " (dry run)" } else { "" },
                if w.global { " (global)" } else { "" },
            )
        })
        .collect::<Vec<_>>()
        .join("; ")
}

impl Stale {
    /// One line for `diff` and `explain`.
    pub fn describe(&self) -> String {
        let mut on: Vec<String> = Vec::new();
        if self.on_connect {
            on.push("connect".into());
        }
        if self.on_timeout {
            on.push("timeout".into());
        }
        on.extend(self.on_status.iter().map(u16::to_string));
        let vary: Vec<&str> = self.vary.iter().map(HeaderName::as_str).collect();
        format!(
            "max_stale {} on {}{}{}",
            humantime::format_duration(self.max_stale),
            on.join(","),
            if vary.is_empty() {
                String::new()
            } else {
                format!(", vary {}", vary.join(","))
            },
            self.per_user
                .as_ref()
                .map_or(String::new(), |c| format!(", per user claim:{c}")),
        )
    }
}

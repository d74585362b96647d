//! Every metric name, described once, and the handles the request path records into.
//! Each proxy instance owns its recorder (no global recorder), so tests can run several
//! proxies in one process. Handles are registered ahead of the request path where the label
//! set is known (per backend) and lazily, once, per (route, backend) otherwise; a raw request
//! path is never a label.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use metrics::{Counter, Gauge, Histogram, Key, Label, Metadata, Recorder, Unit};
use metrics_exporter_prometheus::{
    Matcher, PrometheusBuilder, PrometheusHandle, PrometheusRecorder,
};

use crate::error::UpstreamErrorKind;

pub const REQUESTS_TOTAL: &str = "strangler_requests_total";
pub const REQUEST_DURATION: &str = "strangler_request_duration_seconds";
pub const UPSTREAM_ERRORS_TOTAL: &str = "strangler_upstream_errors_total";
pub const UPSTREAM_RETRIES_TOTAL: &str = "strangler_upstream_retries_total";
/// Requests refused a connection by an endpoint's bounds, by backend and reason.
pub const UPSTREAM_REFUSED_TOTAL: &str = "strangler_upstream_refused_total";
/// Requests waiting for a connection to a backend (all its endpoints), at scrape time.
pub const UPSTREAM_WAITING: &str = "strangler_upstream_waiting";
/// HTTP/1.1 connections to a backend open or being opened, at scrape time.
pub const UPSTREAM_CONNECTIONS: &str = "strangler_upstream_connections";
/// Client connections the public listener accepted since start.
pub const CONNECTIONS_ACCEPTED_TOTAL: &str = "strangler_connections_accepted_total";
/// Client connections open on the public listener, at scrape time.
pub const CONNECTIONS_OPEN: &str = "strangler_connections_open";
pub const CONFIG_RELOADS_TOTAL: &str = "strangler_config_reloads_total";
pub const CONFIG_LAST_RELOAD_SUCCESSFUL: &str = "strangler_config_last_reload_successful";
pub const CONFIG_GENERATION: &str = "strangler_config_generation";
pub const SHADOW_TOTAL: &str = "strangler_shadow_total";
pub const SHADOW_SKIPPED_TOTAL: &str = "strangler_shadow_skipped_total";
pub const SHADOW_GATE: &str = "strangler_shadow_gate_max_mismatch_rate";
pub const FALLBACK_TOTAL: &str = "strangler_fallback_total";
pub const GUARD_TRIPPED: &str = "strangler_guard_tripped";
pub const SHADOW_DURATION: &str = "strangler_shadow_duration_seconds";
/// Client TLS handshakes that did not complete, by `reason` (`failed`, `timeout`).
pub const TLS_HANDSHAKE_ERRORS_TOTAL: &str = "strangler_tls_handshake_errors_total";
/// Tasks alive in the runtime (connections, shadow legs, tunnels, watchers), read at scrape
/// time: a count that keeps growing under steady load is a leak.
pub const RUNTIME_ALIVE_TASKS: &str = "strangler_runtime_alive_tasks";

/// Requests with `auth`, by route and outcome (`ok`, `anonymous`, `preflight`, or why the
/// credentials were, or in observe mode would have been, refused).
pub const AUTH_TOTAL: &str = "strangler_auth_total";
/// Fetches of a provider's `jwks_url`, by outcome (`ok`, `error`, `timeout`, `invalid`).
pub const JWKS_FETCH_TOTAL: &str = "strangler_jwks_fetch_total";

/// Rate-limit decisions, by route, policy and outcome (`allowed`, `limited`, `would_limit`).
pub const RATELIMIT_TOTAL: &str = "strangler_ratelimit_total";
/// Keys a route's windows track on this replica (set by the periodic sweep).
pub const RATELIMIT_KEYS: &str = "strangler_ratelimit_keys";
/// Global-window checks the store did not answer: failed or timed out round trips, and the
/// checks skipped during the second after one (global windows then follow `on_error`).
pub const RATELIMIT_STORE_ERRORS_TOTAL: &str = "strangler_ratelimit_store_errors_total";

/// Stale-if-error, by route and outcome (stored, served, expired, evicted, and every reason
/// an answer was not stored).
pub const STALE_TOTAL: &str = "strangler_stale_total";
/// Bytes held by the stale-if-error store (all routes).
pub const STALE_BYTES: &str = "strangler_stale_bytes";

/// Migration events (`[events]`), by kind (`mismatch`, `write`, `request`) and outcome
/// (`published`: confirmed by the broker; `dropped`: never sent, the buffer was full or
/// shutdown came first; `failed`: sent, but refused or never confirmed).
pub const EVENTS_TOTAL: &str = "strangler_events_total";
/// Events waiting in the buffer for the broker.
pub const EVENTS_BUFFERED: &str = "strangler_events_buffered";

/// The non-zero counts of `counts`, named by `names` (parallel arrays), for `/routes`.
pub fn nonzero_counts(
    names: &[&'static str],
    counts: &[std::sync::atomic::AtomicU64],
) -> Vec<(&'static str, u64)> {
    names
        .iter()
        .zip(counts)
        .map(|(o, c)| (*o, c.load(std::sync::atomic::Ordering::Relaxed)))
        .filter(|(_, n)| *n > 0)
        .collect()
}

/// `route` label of requests no route matched (a prefix always starts with `/`).
pub const NO_ROUTE: &str = "none";

/// Latency buckets (seconds): 1 ms to 30 s, the span between a cached answer and a timeout.
const DURATION_BUCKETS: [f64; 14] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// Status codes that get a pre-registered counter slot; others register on use.
const COMMON_STATUSES: [u16; 18] = [
    200, 201, 204, 301, 302, 304, 400, 401, 403, 404, 409, 413, 422, 429, 500, 502, 503, 504,
];

static METADATA: Metadata<'static> =
    Metadata::new(module_path!(), metrics::Level::INFO, Some(module_path!()));

/// The recorder of one proxy instance.
pub struct Metrics {
    recorder: PrometheusRecorder,
    handle: PrometheusHandle,
}

impl Metrics {
    pub fn new() -> Arc<Self> {
        let builder = PrometheusBuilder::new()
            .set_buckets_for_metric(
                Matcher::Suffix("_duration_seconds".into()),
                &DURATION_BUCKETS,
            )
            .unwrap_or_else(|_| PrometheusBuilder::new());
        let recorder = builder.build_recorder();
        let handle = recorder.handle();
        let describe = |name: &'static str, unit: Unit, text: &'static str| {
            recorder.describe_counter(name.into(), Some(unit), text.into());
        };
        describe(
            REQUESTS_TOTAL,
            Unit::Count,
            "Requests answered, by route, answering backend and status.",
        );
        describe(
            EVENTS_TOTAL,
            Unit::Count,
            "Migration events, by kind and outcome (published, dropped, failed).",
        );
        describe(
            UPSTREAM_ERRORS_TOTAL,
            Unit::Count,
            "Failed upstream exchanges, by backend and kind.",
        );
        describe(
            UPSTREAM_RETRIES_TOTAL,
            Unit::Count,
            "Requests sent again after a failed attempt, by backend and reason (connect-failure, refused-stream, reset).",
        );
        describe(
            UPSTREAM_REFUSED_TOTAL,
            Unit::Count,
            "Requests refused a connection by an endpoint's bounds (503 upstream_busy), by backend and reason (line_full, wait_timeout).",
        );
        describe(
            CONNECTIONS_ACCEPTED_TOTAL,
            Unit::Count,
            "Client connections the public listener accepted.",
        );
        recorder.describe_gauge(
            CONNECTIONS_OPEN.into(),
            None,
            "Client connections open on the public listener.".into(),
        );
        recorder.describe_gauge(
            UPSTREAM_WAITING.into(),
            None,
            "Requests waiting for a connection to the backend (its endpoints at max_connections or max_connecting).".into(),
        );
        recorder.describe_gauge(
            UPSTREAM_CONNECTIONS.into(),
            None,
            "HTTP/1.1 connections to the backend open or being opened.".into(),
        );
        describe(
            FALLBACK_TOTAL,
            Unit::Count,
            "Requests answered by a route's fallback backend, by route, from and to.",
        );
        recorder.describe_gauge(
            GUARD_TRIPPED.into(),
            None,
            "1 while a route's guard has rolled its traffic back.".into(),
        );
        describe(
            SHADOW_TOTAL,
            Unit::Count,
            "Shadowed requests, by route, shadow backend and outcome.",
        );
        describe(
            SHADOW_SKIPPED_TOTAL,
            Unit::Count,
            "Shadowed requests not compared, by route, shadow backend and reason (too_large, undecodable, incomplete, queue_full).",
        );
        recorder.describe_histogram(
            SHADOW_DURATION.into(),
            Some(Unit::Seconds),
            "Time from sending the shadow copy to its response head.".into(),
        );
        describe(
            TLS_HANDSHAKE_ERRORS_TOTAL,
            Unit::Count,
            "Client TLS handshakes that did not complete, by reason (failed, timeout).",
        );
        describe(
            AUTH_TOTAL,
            Unit::Count,
            "Requests on routes with auth, by route and outcome.",
        );
        describe(
            JWKS_FETCH_TOTAL,
            Unit::Count,
            "JWKS fetches of a provider's jwks_url, by provider and outcome.",
        );
        describe(
            RATELIMIT_TOTAL,
            Unit::Count,
            "Rate-limit decisions, by route, policy and outcome.",
        );
        describe(
            RATELIMIT_STORE_ERRORS_TOTAL,
            Unit::Count,
            "Global rate-limit checks the store did not answer (failed, timed out, or skipped during the back-off after a failure).",
        );
        recorder.describe_gauge(
            RATELIMIT_KEYS.into(),
            None,
            "Keys the route's rate-limit windows track on this replica.".into(),
        );
        describe(
            STALE_TOTAL,
            Unit::Count,
            "Stale-if-error copies by route and outcome.",
        );
        recorder.describe_gauge(
            STALE_BYTES.into(),
            Some(Unit::Bytes),
            "Bytes held by the stale-if-error store.".into(),
        );
        describe(
            CONFIG_RELOADS_TOTAL,
            Unit::Count,
            "Route table reloads, by outcome.",
        );
        recorder.describe_histogram(
            REQUEST_DURATION.into(),
            Some(Unit::Seconds),
            "Time from request to the end of the response body.".into(),
        );
        recorder.describe_gauge(
            CONFIG_LAST_RELOAD_SUCCESSFUL.into(),
            None,
            "1 when the last reload attempt succeeded.".into(),
        );
        recorder.describe_gauge(
            CONFIG_GENERATION.into(),
            None,
            "Generation of the route table being served.".into(),
        );
        Arc::new(Metrics { recorder, handle })
    }

    /// Prometheus text exposition.
    pub fn render(&self) -> String {
        self.handle.render()
    }

    /// Drains histogram samples into their buckets; called periodically.
    pub fn upkeep(&self) {
        self.handle.run_upkeep();
    }

    pub fn counter(&self, name: &'static str, labels: Vec<Label>) -> Counter {
        self.recorder
            .register_counter(&Key::from_parts(name, labels), &METADATA)
    }

    pub fn gauge(&self, name: &'static str, labels: Vec<Label>) -> Gauge {
        self.recorder
            .register_gauge(&Key::from_parts(name, labels), &METADATA)
    }

    pub fn histogram(&self, name: &'static str, labels: Vec<Label>) -> Histogram {
        self.recorder
            .register_histogram(&Key::from_parts(name, labels), &METADATA)
    }

    /// `strangler_upstream_retries_total{backend, reason}`, one per retry case.
    pub fn upstream_retries(&self, backend: &str) -> [Counter; 3] {
        crate::routes::RetryCase::ALL.map(|c| {
            self.counter(
                UPSTREAM_RETRIES_TOTAL,
                vec![
                    Label::new("backend", backend.to_string()),
                    Label::new("reason", c.as_str()),
                ],
            )
        })
    }

    /// `strangler_upstream_refused_total{backend, reason}`, in `gate::Busy::ALL` order.
    pub fn upstream_refused(&self, backend: &str) -> [Counter; 2] {
        crate::error::Busy::ALL.map(|b| {
            self.counter(
                UPSTREAM_REFUSED_TOTAL,
                vec![
                    Label::new("backend", backend.to_string()),
                    Label::new("reason", b.as_str()),
                ],
            )
        })
    }

    /// The per-backend upstream error counters, in `UpstreamErrorKind::ALL` order.
    pub fn upstream_errors(&self, backend: &str) -> [Counter; 4] {
        UpstreamErrorKind::ALL.map(|k| {
            self.counter(
                UPSTREAM_ERRORS_TOTAL,
                vec![
                    Label::new("backend", backend.to_string()),
                    Label::new("kind", k.as_str()),
                ],
            )
        })
    }
}

/// Handles for one (route, backend) pair, registered on first use.
pub struct Responses {
    route: String,
    backend: String,
    duration: Histogram,
    common: [OnceLock<Counter>; COMMON_STATUSES.len()],
}

impl Responses {
    pub fn new(metrics: &Metrics, route: &str, backend: &str) -> Self {
        let labels = vec![
            Label::new("route", route.to_string()),
            Label::new("backend", backend.to_string()),
        ];
        Responses {
            route: route.to_string(),
            backend: backend.to_string(),
            duration: metrics.histogram(REQUEST_DURATION, labels),
            common: Default::default(),
        }
    }

    /// Counts one answered request and its duration.
    pub fn record(&self, metrics: &Metrics, status: u16, elapsed: Duration) {
        self.duration.record(elapsed.as_secs_f64());
        let register = || {
            metrics.counter(
                REQUESTS_TOTAL,
                vec![
                    Label::new("route", self.route.clone()),
                    Label::new("backend", self.backend.clone()),
                    Label::new("status", status.to_string()),
                ],
            )
        };
        match COMMON_STATUSES.iter().position(|&s| s == status) {
            Some(i) => self.common[i].get_or_init(register).increment(1),
            None => register().increment(1),
        }
    }
}

/// Lazily registered [`Responses`] for each backend a route may send to.
pub struct RouteMetrics {
    slots: Vec<OnceLock<Responses>>,
}

impl RouteMetrics {
    /// Slots for each backend, and one more (index `backends`) for requests refused before
    /// a backend was chosen.
    pub fn new(backends: usize) -> Self {
        RouteMetrics {
            slots: (0..=backends).map(|_| OnceLock::new()).collect(),
        }
    }

    pub fn for_backend(
        &self,
        metrics: &Metrics,
        id: crate::routes::BackendId,
        route: &str,
        backend: &str,
    ) -> Option<&Responses> {
        Some(
            self.slots
                .get(id.index())?
                .get_or_init(|| Responses::new(metrics, route, backend)),
        )
    }
}

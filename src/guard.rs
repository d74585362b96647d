//! Automatic per-route rollback. A route with `[routes.guard]` has its new backend's answers
//! counted in a sliding window (ten buckets, lock-free); when at least `min_requests` were
//! answered in the window and the share of errors (5xx, upstream failures, timeouts) exceeds
//! `max_error_rate`, the guard trips: the route's traffic goes to `guard.to` in memory, the
//! stage shows `rolled back by guard`, `strangler_guard_tripped{route}` is 1, and a warning
//! is logged with the figures. It stays tripped until the route's entry in routes.toml changes
//! (a new entry gets a new guard) or `POST /guard/reset?route=PREFIX`. It never writes the file.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use metrics::{Gauge, Label};
use tokio::time::Instant;
use tracing::{info, warn};

use crate::carry::CarryOver;
use crate::metrics::{Metrics, GUARD_TRIPPED};
use crate::routes::{EntryKey, Guard, RouteTable};

/// Buckets per window: the window slides in steps of a tenth.
const BUCKETS: usize = 10;

#[derive(Default)]
struct Bucket {
    /// Which window step the counts belong to.
    step: AtomicU64,
    requests: AtomicU64,
    errors: AtomicU64,
}

/// The guard of one route entry.
pub struct GuardState {
    pub prefix: String,
    /// The thresholds. Where a trip sends traffic is read from the current table's route
    /// (`route.guard.to`): backend indices change when other backends come and go.
    pub config: Guard,
    to_name: String,
    step_ms: u64,
    base: Instant,
    buckets: [Bucket; BUCKETS],
    tripped: AtomicBool,
    gauge: Gauge,
}

impl GuardState {
    fn new(prefix: &str, config: Guard, to_name: String, base: Instant, metrics: &Metrics) -> Self {
        let gauge = metrics.gauge(GUARD_TRIPPED, vec![Label::new("route", prefix.to_string())]);
        gauge.set(0.0);
        let step_ms = (config.window.as_millis() as u64 / BUCKETS as u64).max(1);
        GuardState {
            prefix: prefix.to_string(),
            config,
            to_name,
            step_ms,
            base,
            buckets: Default::default(),
            tripped: AtomicBool::new(false),
            gauge,
        }
    }

    pub fn is_tripped(&self) -> bool {
        self.tripped.load(Ordering::Acquire)
    }

    /// Counts one answer of the watched backend; trips when the window says so.
    pub fn record(&self, now: Instant, error: bool) {
        if self.is_tripped() {
            return;
        }
        let step = now.saturating_duration_since(self.base).as_millis() as u64 / self.step_ms;
        let b = &self.buckets[(step % BUCKETS as u64) as usize];
        let seen = b.step.load(Ordering::Acquire);
        if seen != step
            && b.step
                .compare_exchange(seen, step, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            b.requests.store(0, Ordering::Release);
            b.errors.store(0, Ordering::Release);
        }
        b.requests.fetch_add(1, Ordering::AcqRel);
        if error {
            b.errors.fetch_add(1, Ordering::AcqRel);
        }
        let (requests, errors) = self.window(step);
        let rate = errors as f64 / requests.max(1) as f64;
        if requests >= self.config.min_requests
            && rate > self.config.max_error_rate
            && !self.tripped.swap(true, Ordering::AcqRel)
        {
            self.gauge.set(1.0);
            warn!(
                route = %self.prefix,
                errors,
                requests,
                error_rate = rate,
                max_error_rate = self.config.max_error_rate,
                window = %humantime::format_duration(self.config.window),
                to = %self.to_name,
                "guard tripped: the route's traffic is rolled back until its entry changes or POST /guard/reset"
            );
        }
    }

    /// Requests and errors in the window ending at `step`.
    fn window(&self, step: u64) -> (u64, u64) {
        self.buckets
            .iter()
            .filter(|b| step.saturating_sub(b.step.load(Ordering::Acquire)) < BUCKETS as u64)
            .fold((0, 0), |(r, e), b| {
                (
                    r + b.requests.load(Ordering::Acquire),
                    e + b.errors.load(Ordering::Acquire),
                )
            })
    }

    /// Clears the trip and the window.
    pub fn reset(&self) {
        for b in &self.buckets {
            b.requests.store(0, Ordering::Release);
            b.errors.store(0, Ordering::Release);
        }
        if self.tripped.swap(false, Ordering::AcqRel) {
            info!(route = %self.prefix, "guard reset: the route's own backend answers again");
        }
        self.gauge.set(0.0);
    }
}

/// Guards of the process, kept across reloads for route entries that did not change.
pub struct Guards {
    base: Instant,
    by_entry: CarryOver<EntryKey, GuardState>,
}

impl Default for Guards {
    fn default() -> Self {
        Guards {
            base: Instant::now(),
            by_entry: CarryOver::default(),
        }
    }
}

impl Guards {
    /// Guard slots for a new table, parallel to its routes. Other entries and backends may
    /// come and go: only an edit of a route's own entry (or `POST /guard/reset`) clears its
    /// guard.
    pub fn slots(&self, table: &RouteTable, metrics: &Metrics) -> Vec<Option<Arc<GuardState>>> {
        let routes = table.routes();
        let keys =
            (0..routes.len()).map(|id| routes[id].guard.is_some().then(|| table.entry_key(id)));
        self.by_entry.renew(
            keys,
            |key| {
                // Keys are made for guarded routes only.
                let route = key.route();
                let g = route.guard.clone().unwrap_or_default();
                let to = key.guard_to().unwrap_or_default().to_string();
                GuardState::new(&route.prefix, g, to, self.base, metrics)
            },
            // Guards of entries that changed or went away stop reporting as tripped.
            |old| old.gauge.set(0.0),
        )
    }
}

/// How long a guard's window steps are (for tests and docs).
pub fn step(window: Duration) -> Duration {
    window / BUCKETS as u32
}

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
        let keys = table
            .route_ids()
            .map(|id| table.route(id).guard.is_some().then(|| table.entry_key(id)));
        self.by_entry.renew(
            keys,
            |key| {
                // Keys are made for guarded routes only.
                let route = key.route();
                let g = route.guard.clone().unwrap_or(Guard {
                    max_error_rate: 1.0,
                    window: Duration::from_secs(60),
                    min_requests: u64::MAX,
                    to: crate::routes::BackendId::new(0),
                });
                let to = key.guard_to().unwrap_or_default().to_string();
                GuardState::new(&route.prefix, g, to, self.base, metrics)
            },
            // Guards of entries that changed or went away stop reporting as tripped.
            |old| old.gauge.set(0.0),
        )
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn guard(rate: f64, window_s: u64, min: u64) -> GuardState {
        let config = Guard {
            max_error_rate: rate,
            window: Duration::from_secs(window_s),
            min_requests: min,
            to: crate::routes::BackendId::new(0),
        };
        let metrics = Metrics::new();
        GuardState::new(
            "/api/users",
            config,
            "legacy".into(),
            Instant::now(),
            &metrics,
        )
    }

    #[tokio::test(start_paused = true)]
    async fn trips_only_past_the_rate_with_enough_requests() {
        let g = guard(0.2, 60, 10);
        // 9 answers, all errors: under min_requests.
        for _ in 0..9 {
            g.record(Instant::now(), true);
        }
        assert!(!g.is_tripped(), "below min_requests");
        // The 10th: 9 of 10 failed.
        g.record(Instant::now(), false);
        assert!(g.is_tripped());
    }

    #[tokio::test(start_paused = true)]
    async fn exactly_the_rate_does_not_trip() {
        let g = guard(0.5, 60, 10);
        for i in 0..10 {
            g.record(Instant::now(), i % 2 == 0);
        }
        assert!(!g.is_tripped(), "5 of 10 is not more than 50%");
        g.record(Instant::now(), true);
        assert!(g.is_tripped(), "6 of 11 is");
    }

    #[tokio::test(start_paused = true)]
    async fn old_errors_slide_out_of_the_window() {
        let g = guard(0.5, 10, 10);
        for _ in 0..5 {
            g.record(Instant::now(), true);
        }
        // A full window later the errors no longer count: 10 good answers do not trip it.
        tokio::time::advance(Duration::from_secs(11)).await;
        for _ in 0..10 {
            g.record(Instant::now(), false);
        }
        assert!(!g.is_tripped());
        // Within one window they do: 5 errors, then 4 good answers and one more error.
        let g = guard(0.5, 10, 10);
        for _ in 0..5 {
            g.record(Instant::now(), true);
        }
        tokio::time::advance(Duration::from_secs(5)).await;
        for _ in 0..4 {
            g.record(Instant::now(), false);
        }
        g.record(Instant::now(), true);
        assert!(g.is_tripped(), "6 of 10 within the window");
    }

    #[tokio::test(start_paused = true)]
    async fn a_bucket_reused_after_a_lap_starts_from_zero() {
        let g = guard(0.5, 10, 4);
        g.record(Instant::now(), true);
        g.record(Instant::now(), true);
        g.record(Instant::now(), true);
        // Exactly one lap later the same bucket is reused: its old counts are dropped.
        tokio::time::advance(Duration::from_secs(10)).await;
        for _ in 0..3 {
            g.record(Instant::now(), false);
        }
        g.record(Instant::now(), true);
        assert!(!g.is_tripped(), "1 error of 4 in the window");
    }

    #[tokio::test(start_paused = true)]
    async fn reset_clears_the_trip_and_the_window() {
        let g = guard(0.1, 60, 2);
        g.record(Instant::now(), true);
        g.record(Instant::now(), true);
        assert!(g.is_tripped());
        g.reset();
        assert!(!g.is_tripped());
        // The errors before the reset no longer count.
        g.record(Instant::now(), false);
        g.record(Instant::now(), false);
        assert!(!g.is_tripped(), "no error since the reset");
    }

    #[test]
    fn a_guard_is_kept_across_reloads_until_its_entry_changes() {
        let table = |rate: &str, extra: &str| {
            crate::config::parse(&format!(
                "{extra}[backends.legacy]\nurl = \"http://127.0.0.1:1\"\nlegacy = true\n[backends.users]\nurl = \"http://127.0.0.1:2\"\n[[routes]]\nprefix = \"/api/users\"\nbackend = \"users\"\n[routes.guard]\nmax_error_rate = {rate}\n"
            ))
            .unwrap()
            .table
        };
        let (guards, metrics) = (Guards::default(), Metrics::new());
        let first = guards.slots(&table("0.1", ""), &metrics);
        let same = guards.slots(
            &table("0.1", "[backends.archive]\nurl = \"http://127.0.0.1:3\"\n"),
            &metrics,
        );
        assert!(Arc::ptr_eq(
            first[0].as_ref().unwrap(),
            same[0].as_ref().unwrap()
        ));
        let edited = guards.slots(&table("0.2", ""), &metrics);
        assert!(!Arc::ptr_eq(
            first[0].as_ref().unwrap(),
            edited[0].as_ref().unwrap()
        ));
    }
}

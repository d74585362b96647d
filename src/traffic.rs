//! Per-route traffic counters for `/routes` and the board: requests, 5xx answers, answers by
//! a non-legacy backend, and a latency histogram. Plain atomics, kept across reloads by route
//! identity; the board turns deltas between two polls into rates and a recent p99.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::carry::CarryOver;
use crate::routes::{RouteKey, RouteTable};

/// Upper bounds (milliseconds) of the latency buckets; one more bucket holds the rest.
pub const LATENCY_BOUNDS_MS: [f64; 14] = [
    1.0, 2.5, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0,
];

#[derive(Default)]
pub struct RouteTraffic {
    requests: AtomicU64,
    errors: AtomicU64,
    by_new: AtomicU64,
    buckets: [AtomicU64; LATENCY_BOUNDS_MS.len() + 1],
}

impl RouteTraffic {
    pub fn record(&self, server_error: bool, by_new: bool, elapsed: Duration) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        if server_error {
            self.errors.fetch_add(1, Ordering::Relaxed);
        }
        if by_new {
            self.by_new.fetch_add(1, Ordering::Relaxed);
        }
        let ms = elapsed.as_secs_f64() * 1000.0;
        let i = LATENCY_BOUNDS_MS
            .iter()
            .position(|&b| ms <= b)
            .unwrap_or(LATENCY_BOUNDS_MS.len());
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
    }

    /// The counters now, for `/routes`.
    pub fn view(&self) -> TrafficView {
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        TrafficView {
            answered_by_new: load(&self.by_new),
            errors: load(&self.errors),
            latency_buckets: self.buckets.iter().map(load).collect(),
            requests: load(&self.requests),
        }
    }
}

/// A route's counters on `/routes` (fields in alphabetical order, as the JSON always had).
#[derive(serde::Serialize)]
pub struct TrafficView {
    answered_by_new: u64,
    errors: u64,
    latency_buckets: Vec<u64>,
    requests: u64,
}

/// Counters of the process, by what each route matches: they survive every edit of a route
/// that keeps its prefix and filters.
#[derive(Default)]
pub struct Traffic {
    by_route: CarryOver<RouteKey, RouteTraffic>,
}

impl Traffic {
    /// Counters for a new table, parallel to its routes.
    pub fn slots(&self, table: &RouteTable) -> Vec<Arc<RouteTraffic>> {
        self.by_route
            .renew(
                table.routes().iter().map(|r| Some(r.route_key())),
                |_| RouteTraffic::default(),
                |_| {},
            )
            .into_iter()
            .flatten()
            .collect()
    }
}

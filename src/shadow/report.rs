//! The ring of recent mismatches behind `GET /diffs`: bounded in entries and in the size of
//! each entry, with credentials redacted.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::SystemTime;

use serde_json::{json, Value};

use crate::compare::Difference;

/// Mismatches kept, newest first when read.
pub const MAX_DIFFS: usize = 200;
/// Differences kept per entry (the count is reported in full).
const MAX_DIFFERENCES_PER_ENTRY: usize = 20;
/// Headers whose values never appear in a report.
const REDACTED: [&str; 3] = ["header:authorization", "header:cookie", "header:set-cookie"];

/// One side of a compared exchange.
#[derive(Debug, Clone)]
pub struct Side {
    pub backend: String,
    pub status: u16,
    pub latency_ms: f64,
}

/// A recorded mismatch.
#[derive(Debug, Clone)]
pub struct DiffEntry {
    pub at: SystemTime,
    pub route: String,
    pub method: String,
    pub path: String,
    pub request_id: String,
    pub primary: Side,
    pub shadow: Side,
    pub total_differences: usize,
    pub differences: Vec<Difference>,
    pub learned_noise: Vec<String>,
}

impl DiffEntry {
    /// Keeps the first differences (`total_differences` still counts all of them) and redacts the values of fields
    /// that must never be shown (`REDACTED`); stamps the time.
    pub fn bounded(mut self) -> Self {
        self.differences.truncate(MAX_DIFFERENCES_PER_ENTRY);
        for d in &mut self.differences {
            if REDACTED.contains(&d.path.as_str()) {
                d.primary = json!("[redacted]");
                d.shadow = json!("[redacted]");
            }
        }
        self.at = SystemTime::now();
        self
    }

    pub fn to_json(&self) -> Value {
        let side = |s: &Side| json!({"backend": s.backend, "status": s.status, "latency_ms": (s.latency_ms * 10.0).round() / 10.0});
        json!({
            "at": humantime::format_rfc3339_millis(self.at).to_string(),
            "route": self.route,
            "method": self.method,
            "path": self.path,
            "request_id": self.request_id,
            "primary": side(&self.primary),
            "shadow": side(&self.shadow),
            "total_differences": self.total_differences,
            "differences": self.differences,
            "learned_noise": self.learned_noise,
        })
    }
}

/// The bounded ring.
#[derive(Default)]
pub struct Diffs {
    ring: Mutex<VecDeque<Arc<DiffEntry>>>,
}

impl Diffs {
    pub fn push(&self, entry: DiffEntry) {
        let mut ring = self.ring.lock().unwrap_or_else(PoisonError::into_inner);
        if ring.len() == MAX_DIFFS {
            ring.pop_front();
        }
        ring.push_back(Arc::new(entry));
    }

    /// Newest first, optionally only one route's, at most `limit`.
    pub fn recent(&self, route: Option<&str>, limit: usize) -> Vec<Arc<DiffEntry>> {
        let ring = self.ring.lock().unwrap_or_else(PoisonError::into_inner);
        ring.iter()
            .rev()
            .filter(|e| route.is_none_or(|r| e.route == r))
            .take(limit)
            .cloned()
            .collect()
    }
}

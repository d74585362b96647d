//! Warnings that would otherwise repeat once per request (a backend down: every request a
//! 502 with the same cause) are written once when they start, then at most once per
//! [`WINDOW`] for the same key, with how many were left out since; the metrics carry the
//! per-request counts. Only the failure path comes here: a request that succeeds never
//! touches it.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

/// The same warning is written at most once per this long.
pub const WINDOW: Duration = Duration::from_secs(10);
/// Keys remembered; past it the oldest are forgotten (and their next warning is written).
const MAX_KEYS: usize = 1024;

struct Slot {
    written: Instant,
    suppressed: u64,
}

/// The last time each kind of warning was written, and how many were left out since.
#[derive(Default)]
pub struct Quiet {
    slots: Mutex<HashMap<(String, &'static str), Slot>>,
}

impl Quiet {
    /// Whether to write the warning `(subject, kind)` now: `Some(n)` with the number left
    /// out since the last one written, or `None` to leave this one out (counted).
    pub fn admit(&self, subject: &str, kind: &'static str) -> Option<u64> {
        self.admit_at(subject, kind, Instant::now())
    }

    fn admit_at(&self, subject: &str, kind: &'static str, now: Instant) -> Option<u64> {
        let mut slots = self.slots.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(slot) = slots.get_mut(&(subject.to_string(), kind)) {
            if now.duration_since(slot.written) < WINDOW {
                slot.suppressed += 1;
                return None;
            }
            let left_out = std::mem::take(&mut slot.suppressed);
            slot.written = now;
            return Some(left_out);
        }
        if slots.len() >= MAX_KEYS {
            let oldest = slots
                .iter()
                .min_by_key(|(_, s)| s.written)
                .map(|(k, _)| k.clone());
            if let Some(k) = oldest {
                slots.remove(&k);
            }
        }
        slots.insert(
            (subject.to_string(), kind),
            Slot {
                written: now,
                suppressed: 0,
            },
        );
        Some(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn once_then_at_most_once_a_window_with_the_count_left_out() {
        let q = Quiet::default();
        let t0 = Instant::now();
        assert_eq!(q.admit_at("users", "reset", t0), Some(0));
        for i in 1..=500 {
            assert_eq!(
                q.admit_at("users", "reset", t0 + Duration::from_millis(i)),
                None
            );
        }
        // Another kind, another backend: their own first line.
        assert_eq!(q.admit_at("users", "timeout", t0), Some(0));
        assert_eq!(q.admit_at("legacy", "reset", t0), Some(0));
        assert_eq!(q.admit_at("users", "reset", t0 + WINDOW), Some(500));
        assert_eq!(q.admit_at("users", "reset", t0 + WINDOW), None);
    }

    #[test]
    fn the_keys_are_bounded() {
        let q = Quiet::default();
        let t0 = Instant::now();
        for i in 0..(MAX_KEYS * 3) {
            q.admit_at(
                &format!("b{i}"),
                "reset",
                t0 + Duration::from_micros(i as u64),
            );
        }
        assert_eq!(q.slots.lock().unwrap().len(), MAX_KEYS);
    }
}

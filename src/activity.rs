//! A client connection's activity, shared by its watchdog (`crate::server`) and the request
//! it serves (`crate::upstream`): whether a request is being served, when the connection last
//! went idle, and the served request's upstream deadline. The watchdog's one sleep per
//! connection keeps `header_read_timeout` and that deadline, so neither costs a timer per
//! request.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

/// What an HTTP/1.1 connection's [`Watchdog`] reads: requests being served, when the
/// connection last had none (its accept, or the end of its last answer), and the upstream
/// deadline of the request being served.
pub struct Activity {
    busy: AtomicUsize,
    /// Nanoseconds from `origin` to when the connection last became idle.
    idle_since: AtomicU64,
    /// Nanoseconds from `origin` to the served request's upstream deadline (0: none).
    deadline: AtomicU64,
    /// The watchdog found the deadline passed: the request's send gives up.
    expired: AtomicBool,
    origin: Instant,
}

impl Activity {
    pub fn new(origin: Instant) -> Arc<Self> {
        Arc::new(Activity {
            busy: AtomicUsize::new(0),
            idle_since: AtomicU64::new(0),
            deadline: AtomicU64::new(0),
            expired: AtomicBool::new(false),
            origin,
        })
    }

    fn nanos(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.origin)
            .as_nanos()
            .clamp(1, u128::from(u64::MAX)) as u64
    }

    /// The served request's upstream deadline has passed: its send gives up.
    pub fn expire(&self) {
        self.expired.store(true, Ordering::Release);
        self.deadline.store(0, Ordering::Release);
    }

    /// The served request's upstream deadline, if one is armed.
    pub fn upstream_due(&self) -> Option<Instant> {
        match self.deadline.load(Ordering::Acquire) {
            0 => None,
            n => Some(self.origin + Duration::from_nanos(n)),
        }
    }

    /// When the connection's next request head is due: `None` while a request is served.
    pub fn head_due(&self, timeout: Duration) -> Option<Instant> {
        if self.busy.load(Ordering::Acquire) > 0 {
            return None;
        }
        let idle = Duration::from_nanos(self.idle_since.load(Ordering::Acquire));
        Some(self.origin + idle + timeout)
    }
}

/// One request being served, from its head until hyper drops its answer's body (written,
/// or abandoned with the connection).
pub struct Busy(Arc<Activity>);

impl Busy {
    pub fn start(activity: Arc<Activity>) -> Self {
        activity.busy.fetch_add(1, Ordering::AcqRel);
        Busy(activity)
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        let a = &self.0;
        a.idle_since
            .store(a.nanos(Instant::now()), Ordering::Release);
        a.deadline.store(0, Ordering::Release);
        a.busy.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A request's hold on its HTTP/1.1 connection's watchdog: the request's upstream deadline
/// is kept by the connection's one sleep instead of a timer of its own (a tokio timer costs
/// an entry in the timer wheel, under its lock, and its removal, on every request). Requests
/// on HTTP/2 connections, shadow legs and probes have none and keep their own timers.
#[derive(Clone)]
pub struct Watch(pub(crate) Arc<Activity>);

impl Watch {
    /// Keeps `deadline` for the request until the returned guard is dropped.
    pub fn arm(&self, deadline: Instant) -> Armed<'_> {
        let a = &self.0;
        a.expired.store(false, Ordering::Release);
        a.deadline.store(a.nanos(deadline), Ordering::Release);
        Armed(a)
    }

    /// Whether the armed deadline has passed (the watchdog says so when it fires).
    #[inline]
    pub fn expired(&self) -> bool {
        self.0.expired.load(Ordering::Acquire)
    }
}

/// An armed upstream deadline; disarmed when dropped.
pub struct Armed<'a>(&'a Activity);

impl Drop for Armed<'_> {
    fn drop(&mut self) {
        self.0.deadline.store(0, Ordering::Release);
        self.0.expired.store(false, Ordering::Release);
    }
}

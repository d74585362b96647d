//! Shadow traffic: the decision to mirror a request, and the shadow leg that sends the copy,
//! waits for both answers and compares them. The leg runs in its own task, under a cap on
//! concurrent legs and its own deadline; its inputs are bounded copies handed over by tees
//! (`upstream::tee`). Nothing here can delay, change or fail the client's response: the request
//! path only does a non-blocking permit grab and a spawn.

pub mod judge;
mod leg;
pub mod report;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use http::uri::PathAndQuery;
use http::{HeaderMap, HeaderValue, Method};
use metrics::{Counter, Histogram, Label};
use tokio::sync::{oneshot, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use leg::{Head, Leg, RequestCopy};
pub use report::{DiffEntry, Diffs};

use crate::carry::CarryOver;
use crate::compare::{Pattern, Rules, Skip};
use crate::metrics::{Metrics, SHADOW_DURATION, SHADOW_GATE, SHADOW_SKIPPED_TOTAL, SHADOW_TOTAL};
use crate::routes::{BackendId, Route, RouteKey, RouteTable};
use crate::upstream::tee::{Budget, Held, Tee};
use crate::upstream::Upstream;

/// Shadow legs in flight at once; past it new copies are dropped (counted), never queued.
pub const MAX_SHADOW_TASKS: usize = 256;
/// Bytes all tees and legs may hold together (request copies, both answers); past it a
/// comparison is skipped (counted) instead of buffering more.
pub const MAX_BUFFERED_BYTES: usize = 128 << 20;
/// A noise route sends a second copy to the answering backend for its first requests...
const NOISE_WARMUP: u64 = 20;
/// ...then for this share of shadowed requests.
const NOISE_SAMPLE: f64 = 0.05;
/// Learned noise paths kept per route.
const MAX_NOISE_PATHS: usize = 64;
/// Paths confirmed as real differences (not noise) kept per route: a mismatch only at these
/// is counted without asking the primary backend again.
const MAX_REAL_PATHS: usize = 64;

/// The outcomes counted in `strangler_shadow_total{outcome}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Match,
    Mismatch,
    Error,
    Skipped,
    Dropped,
}

impl Outcome {
    const ALL: [Outcome; 5] = [
        Outcome::Match,
        Outcome::Mismatch,
        Outcome::Error,
        Outcome::Skipped,
        Outcome::Dropped,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Match => "match",
            Outcome::Mismatch => "mismatch",
            Outcome::Error => "error",
            Outcome::Skipped => "skipped",
            Outcome::Dropped => "dropped",
        }
    }
}

/// Comparison state of one shadowed route, kept across reloads while the route, its backend
/// and its shadow stay the same.
pub struct RouteShadow {
    pub prefix: String,
    pub shadow: String,
    pub compared: AtomicU64,
    pub mismatched: AtomicU64,
    noise: Mutex<Vec<String>>,
    /// Differing paths a confirmation showed are not noise (see `leg::Copy::confirm`).
    real: Mutex<Vec<String>>,
    noise_samples: AtomicU64,
    outcomes: [Counter; 5],
    /// `strangler_shadow_skipped_total` by [`Skip`], and the same counts for `/routes`.
    skips: [(Counter, AtomicU64); 4],
    pub duration: Histogram,
}

impl RouteShadow {
    fn new(metrics: &Metrics, prefix: &str, shadow: &str) -> Self {
        let labels = |extra: Option<&'static str>| {
            let mut l = vec![
                Label::new("route", prefix.to_string()),
                Label::new("shadow", shadow.to_string()),
            ];
            if let Some(o) = extra {
                l.push(Label::new("outcome", o));
            }
            l
        };
        RouteShadow {
            prefix: prefix.to_string(),
            shadow: shadow.to_string(),
            compared: AtomicU64::new(0),
            mismatched: AtomicU64::new(0),
            noise: Mutex::new(Vec::new()),
            real: Mutex::new(Vec::new()),
            noise_samples: AtomicU64::new(0),
            outcomes: Outcome::ALL.map(|o| metrics.counter(SHADOW_TOTAL, labels(Some(o.as_str())))),
            skips: Skip::ALL.map(|s| {
                let mut l = labels(None);
                l.push(Label::new("reason", s.as_str()));
                (metrics.counter(SHADOW_SKIPPED_TOTAL, l), AtomicU64::new(0))
            }),
            duration: metrics.histogram(SHADOW_DURATION, labels(None)),
        }
    }

    /// Counts an exchange that was not compared, and why.
    pub fn skipped(&self, why: Skip) {
        self.count(Outcome::Skipped);
        let (counter, count) = &self.skips[why as usize];
        counter.increment(1);
        count.fetch_add(1, Ordering::Relaxed);
    }

    /// Skipped exchanges by reason, every reason listed.
    pub fn skips(&self) -> Vec<(&'static str, u64)> {
        Skip::ALL
            .iter()
            .map(|&s| (s.as_str(), self.skips[s as usize].1.load(Ordering::Relaxed)))
            .collect()
    }

    pub fn count(&self, outcome: Outcome) {
        self.outcomes[outcome as usize].increment(1);
        match outcome {
            Outcome::Match => {
                self.compared.fetch_add(1, Ordering::Relaxed);
            }
            Outcome::Mismatch => {
                self.compared.fetch_add(1, Ordering::Relaxed);
                self.mismatched.fetch_add(1, Ordering::Relaxed);
            }
            Outcome::Error | Outcome::Skipped | Outcome::Dropped => {}
        }
    }

    /// Mismatches over comparisons, `None` before the first comparison.
    pub fn mismatch_rate(&self) -> Option<f64> {
        let compared = self.compared.load(Ordering::Relaxed);
        (compared > 0).then(|| self.mismatched.load(Ordering::Relaxed) as f64 / compared as f64)
    }

    pub fn learned_noise(&self) -> Vec<String> {
        self.noise
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn learn(&self, paths: Vec<String>) {
        add_bounded(&self.noise, paths, MAX_NOISE_PATHS);
    }

    /// Remembers paths a confirmation showed to be real differences.
    fn confirmed_real(&self, paths: impl IntoIterator<Item = String>) {
        add_bounded(&self.real, paths, MAX_REAL_PATHS);
    }

    /// Whether every one of `paths` was confirmed real before.
    fn all_known_real(&self, paths: &[String]) -> bool {
        let real = self.real.lock().unwrap_or_else(PoisonError::into_inner);
        paths.iter().all(|p| real.contains(p))
    }

    /// Whether this request also gets a noise copy.
    fn noise_sample(&self) -> bool {
        self.noise_samples.fetch_add(1, Ordering::Relaxed) < NOISE_WARMUP
            || fastrand::f64() < NOISE_SAMPLE
    }

    /// The route's rules plus what this route learned is noise. Called by the leg, off the
    /// client's path.
    fn rules(&self, base: &Rules) -> Rules {
        let mut rules = base.clone();
        rules.ignore.extend(
            self.noise
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .iter()
                .map(|p| Pattern::parse(p)),
        );
        rules
    }
}

fn add_bounded(set: &Mutex<Vec<String>>, paths: impl IntoIterator<Item = String>, max: usize) {
    let mut set = set.lock().unwrap_or_else(PoisonError::into_inner);
    for p in paths {
        if set.len() < max && !set.contains(&p) {
            set.push(p);
        }
    }
}

/// The shadow state of one generation's route: stats and comparison rules.
pub struct Slot {
    pub stats: Arc<RouteShadow>,
    pub rules: Arc<Rules>,
    pub backend: BackendId,
    pub percent: f64,
    pub methods: Vec<Method>,
    pub noise: bool,
}

/// Shadow state of the whole process: the leg cap, the byte budget, per-route stats and the
/// ring of recent mismatches. Lives outside the route table.
pub struct Shadows {
    tasks: Arc<Semaphore>,
    pub budget: Arc<Budget>,
    /// Where comparisons run, off the runtime's workers.
    pub judges: judge::Judges,
    /// By route, answering backend and shadow backend: a comparison's history means nothing
    /// once either side changes.
    stats: CarryOver<(RouteKey, String, String), RouteShadow>,
    pub diffs: Diffs,
}

impl Default for Shadows {
    fn default() -> Self {
        Shadows {
            tasks: Arc::new(Semaphore::new(MAX_SHADOW_TASKS)),
            budget: Budget::new(MAX_BUFFERED_BYTES),
            judges: judge::Judges::new(),
            stats: CarryOver::default(),
            diffs: Diffs::default(),
        }
    }
}

impl Shadows {
    /// Shadow slots for a new table, parallel to its routes; stats carry over for routes whose
    /// (prefix, filters, backend, shadow) did not change, others start fresh.
    pub fn slots(&self, table: &RouteTable, metrics: &Metrics) -> Vec<Option<Slot>> {
        let name = |b: BackendId| table.backend(b).name.clone();
        let key = |route: &Route| {
            let s = route.shadow.as_ref()?;
            Some((route.route_key(), name(route.backend), name(s.backend)))
        };
        let stats = self.stats.renew(
            table.routes().iter().map(key),
            |k| {
                // The route the new key was made from: its prefix as written labels the metrics.
                let prefix = table.routes().iter().find(|r| key(r).as_ref() == Some(k));
                RouteShadow::new(metrics, prefix.map_or("", |r| r.prefix.as_str()), &k.2)
            },
            |_| {},
        );
        table
            .routes()
            .iter()
            .zip(stats)
            .map(|(route, stats)| {
                let (s, stats) = (route.shadow.as_ref()?, stats?);
                // The readiness gate, exported so alerts can compare each route with its own.
                metrics
                    .gauge(SHADOW_GATE, vec![Label::new("route", route.prefix.clone())])
                    .set(route.compare.max_mismatch_rate);
                Some(Slot {
                    stats,
                    rules: Arc::new(rules(route)),
                    backend: s.backend,
                    percent: s.percent,
                    methods: s.methods.clone(),
                    noise: route.compare.noise,
                })
            })
            .collect()
    }

    /// Whether to mirror this request; `None` when not. Never waits: a full cap drops the
    /// copy and counts it.
    pub fn plan(
        &self,
        slot: &Slot,
        answering: BackendId,
        method: &Method,
        headers: &HeaderMap,
        upgrade: bool,
    ) -> Option<Plan> {
        let eligible = slot.backend != answering
            && !upgrade
            && slot.methods.contains(method)
            && !headers.contains_key(crate::headers::X_STRANGLER_SHADOW)
            && (slot.percent >= 100.0 || fastrand::f64() * 100.0 < slot.percent);
        if !eligible {
            return None;
        }
        let learns = slot.noise && matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS);
        match self.tasks.clone().try_acquire_owned() {
            Ok(permit) => Some(Plan {
                _permit: permit,
                shadow: slot.backend,
                stats: slot.stats.clone(),
                rules: slot.rules.clone(),
                max_body: slot.rules.max_body,
                noise: learns && slot.stats.noise_sample(),
                confirm: learns,
                events: None,
            }),
            Err(_) => {
                slot.stats.count(Outcome::Dropped);
                None
            }
        }
    }

    /// Shadow legs in flight.
    pub fn in_flight(&self) -> usize {
        MAX_SHADOW_TASKS - self.tasks.available_permits()
    }
}

/// The primary request a shadow copy is made from, as the proxy is about to send it.
pub struct Primary<'a> {
    /// The cleaned request head (method and headers are copied).
    pub parts: &'a http::request::Parts,
    /// The client's path and query, joined to the shadow backend's base path.
    pub pq: Option<PathAndQuery>,
    pub request_id: &'a HeaderValue,
    /// The backend that answers the client, and when its answer must be complete.
    pub upstream: Arc<Upstream>,
    pub deadline: Instant,
    /// Whether the request certainly has no body.
    pub empty: bool,
}

/// Where the primary exchange hands its copies to a shadow leg.
pub struct Feed {
    /// Fed by the client's request body as it streams to the primary.
    pub request_tee: Option<Tee>,
    head_tx: Option<oneshot::Sender<Head>>,
    response_tee: Option<Tee>,
}

impl Feed {
    /// Hands the primary's response head over; returns the tee for its body.
    pub fn primary_answered(
        self,
        parts: &http::response::Parts,
        latency: std::time::Duration,
    ) -> Option<Tee> {
        let head = Head {
            status: parts.status.as_u16(),
            headers: parts.headers.clone(),
            latency,
            answered: Instant::now(),
        };
        self.head_tx?.send(head).ok()?;
        self.response_tee
    }
}

/// Spawns the shadow leg of a request chosen for mirroring (`plan`) to `shadow`; returns the
/// hand-over points the primary exchange feeds: request body tee, response head, response
/// body tee. The leg waits on them in its own task, under the plan's permit.
pub fn start(
    shadows: &Arc<Shadows>,
    plan: Plan,
    shadow: Arc<Upstream>,
    primary: Primary<'_>,
) -> Feed {
    let budget = &shadows.budget;
    let (request_tee, request_body) = if primary.empty {
        (None, RequestCopy::Ready(Held::empty(budget)))
    } else {
        let (tee, rx) = Tee::new(plan.max_body, budget);
        (Some(tee), RequestCopy::Pending(rx))
    };
    let (head_tx, primary_head) = oneshot::channel();
    let (response_tee, primary_body) = Tee::new(plan.max_body, budget);
    let leg = Leg {
        copy: leg::Copy {
            shadows: shadows.clone(),
            method: primary.parts.method.clone(),
            pq: primary.pq,
            headers: primary.parts.headers.clone(),
            request_id: primary.request_id.to_str().unwrap_or_default().to_string(),
            primary: primary.upstream,
            shadow,
            plan,
        },
        inputs: leg::Inputs {
            request_body,
            primary_head,
            primary_body,
            primary_deadline: primary.deadline,
        },
    };
    // Boxed once here: the leg's future is kilobytes, and the spawn path would otherwise move
    // it several times (each move a copy of the whole future).
    tokio::spawn(Box::pin(leg.run()));
    Feed {
        request_tee,
        head_tx: Some(head_tx),
        response_tee: Some(response_tee),
    }
}

/// A request chosen for mirroring, holding its leg's permit.
pub struct Plan {
    /// Held until the leg ends: the cap counts legs, not requests.
    _permit: OwnedSemaphorePermit,
    /// The backend that gets the copy.
    pub shadow: BackendId,
    pub stats: Arc<RouteShadow>,
    /// The route's own rules; the leg adds learned noise.
    pub rules: Arc<Rules>,
    pub max_body: usize,
    /// Whether this request also samples the primary backend for noise now.
    pub noise: bool,
    /// Whether a mismatch at paths not known to be real is first confirmed against a later
    /// answer of the primary backend (noise routes, safe methods).
    pub confirm: bool,
    /// Where a mismatch is published (`events = ["mismatch"]`), with the route's key.
    pub events: Option<(Arc<crate::events::Events>, String)>,
}

fn rules(route: &Route) -> Rules {
    let c = &route.compare;
    Rules {
        headers: c.headers.clone(),
        ignore: c.ignore.clone(),
        tolerance: c.tolerance,
        max_body: usize::try_from(c.max_body).unwrap_or(usize::MAX),
    }
}

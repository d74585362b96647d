//! Rate limits on the request path: a route's `rate_limit` windows, checked after `auth` (a
//! key may be a verified claim) and before a backend is chosen. A limited request is refused
//! at once with 429 (no queueing: delaying holds connections open under attack), reaches no
//! backend and no shadow, and is no error for the guard.
//!
//! Each window is GCRA (the generic cell rate algorithm: one "theoretical arrival time" per
//! key, as governor and Redis's redis-cell keep it). Per replica, the times live in a bounded
//! concurrent map (`max_keys`, the least useful evicted first) of atomics updated by
//! compare-and-swap, so a key costs one lookup and no lock of ours; a periodic sweep drops
//! keys whose bucket is full again, which are indistinguishable from absent ones. Buckets
//! outlive reloads that keep the route's window as it was. With `scope = "global"` the time is
//! kept in Redis by one Lua script on Redis's clock (one round trip), through one pooled,
//! self-reconnecting connection; when Redis cannot answer within the store's `timeout`, the
//! window follows `on_error` and Redis is left alone for a second.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use http::{HeaderMap, HeaderValue};
use metrics::{Counter, Label};
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::carry::CarryOver;
use crate::config::{OnStoreError, RateLimitStore};
use crate::jwt::Claims;
use crate::metrics::{Metrics, RATELIMIT_KEYS, RATELIMIT_STORE_ERRORS_TOTAL, RATELIMIT_TOTAL};
use crate::routes::{RateLimit, RequestKey, Route, RouteKey, RouteTable};

/// How often idle keys are swept and `strangler_ratelimit_keys` is set.
const SWEEP: Duration = Duration::from_secs(10);
/// A refusal while the store is down asks the client back after this long.
const STORE_BACKOFF: Duration = Duration::from_secs(1);
/// After a failed round trip, requests skip the store while a probe asks it this often; the
/// first answer ends the skip at once.
const STORE_PROBE: Duration = Duration::from_millis(200);
/// The key the probe runs the script on (its own bucket: it never touches a route's).
const PROBE_KEY: &str = "strangler:rl:probe";
/// Key material longer than this is hashed before it names a Redis key.
const MAX_STORE_KEY: usize = 200;

/// GCRA on Redis's clock. KEYS[1]: the bucket; ARGV[1]: the emission interval and ARGV[2] the
/// burst tolerance, both in microseconds. Returns {allowed, retry_after_us, reset_us}.
const GCRA: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local tolerance = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local new_tat = tat + interval
if new_tat - now > tolerance then
  return {0, new_tat - now - tolerance, tat - now}
end
redis.call('SET', KEYS[1], new_tat, 'PX', math.ceil((new_tat - now) / 1000) + 1)
return {1, 0, new_tat - now}
";

/// One window's answer for one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Allowed {
        /// Requests that may still pass at once.
        remaining: u64,
        /// Until the bucket is full again.
        reset: Duration,
    },
    Limited {
        retry_after: Duration,
        reset: Duration,
    },
    /// A global window whose store failed, with `on_error = "allow"`: nothing is known.
    Unknown,
}

/// What the rate-limit phase decided for one request (the access log's `ratelimit`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Allowed,
    Limited,
    /// A dry-run window would have refused it.
    WouldLimit,
}

impl Decision {
    pub fn as_str(self) -> &'static str {
        OUTCOMES[self as usize]
    }
}

/// The outcome labels of `strangler_ratelimit_total`, in [`Decision`] order.
const ALLOWED: usize = 0;
const LIMITED: usize = 1;
const WOULD_LIMIT: usize = 2;
const OUTCOMES: [&str; 3] = ["allowed", "limited", "would_limit"];

/// One window's buckets (per replica) and counters.
pub struct Window {
    route: String,
    policy: String,
    buckets: quick_cache::sync::Cache<u64, Arc<AtomicU64>>,
    /// Bucket times are nanoseconds since this.
    base: Instant,
    hasher: std::hash::RandomState,
    counters: [OnceLock<Counter>; 3],
    /// The same counts, for `/routes` and the board.
    counts: [AtomicU64; 3],
}

impl Window {
    fn new(route: &str, w: &RateLimit) -> Self {
        Window {
            route: route.to_string(),
            policy: w.name.clone(),
            buckets: quick_cache::sync::Cache::new(w.max_keys.max(1)),
            base: Instant::now(),
            hasher: std::hash::RandomState::new(),
            counters: Default::default(),
            counts: Default::default(),
        }
    }

    /// Keys tracked now.
    pub fn keys(&self) -> usize {
        self.buckets.len()
    }

    /// Decisions since start by outcome (`allowed`, `limited`, `would_limit`), non-zero ones.
    pub fn counts(&self) -> Vec<(&'static str, u64)> {
        crate::metrics::nonzero_counts(&OUTCOMES, &self.counts)
    }

    fn count(&self, metrics: &Metrics, outcome: usize) {
        self.counts[outcome].fetch_add(1, Ordering::Relaxed);
        self.counters[outcome]
            .get_or_init(|| {
                metrics.counter(
                    RATELIMIT_TOTAL,
                    vec![
                        Label::new("route", self.route.clone()),
                        Label::new("policy", self.policy.clone()),
                        Label::new("outcome", OUTCOMES[outcome]),
                    ],
                )
            })
            .increment(1);
    }

    fn nanos(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.base).as_nanos() as u64
    }

    fn key(&self, material: &[u8]) -> u64 {
        let mut h = self.hasher.build_hasher();
        h.write(material);
        h.finish()
    }

    /// GCRA on this replica for the key `material`, at `now`.
    pub fn check(&self, w: &RateLimit, material: &[u8], now: Instant) -> Verdict {
        // One cell per key even when its first requests arrive together (a get, then an
        // insert, would let each of them start a full bucket of its own).
        let cell = self
            .buckets
            .get_or_insert_with(&self.key(material), || {
                Ok::<_, std::convert::Infallible>(Arc::new(AtomicU64::new(0)))
            })
            .unwrap_or_else(|never| match never {});
        let t = self.nanos(now);
        let interval = w.interval().as_nanos() as u64;
        let tolerance = interval.saturating_mul(w.burst);
        let mut tat = cell.load(Ordering::Acquire);
        loop {
            let start = tat.max(t);
            let next = start + interval;
            if next - t > tolerance {
                return Verdict::Limited {
                    retry_after: Duration::from_nanos(next - t - tolerance),
                    reset: Duration::from_nanos(start - t),
                };
            }
            match cell.compare_exchange_weak(tat, next, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => {
                    return Verdict::Allowed {
                        remaining: (tolerance - (next - t)) / interval.max(1),
                        reset: Duration::from_nanos(next - t),
                    }
                }
                Err(now_there) => tat = now_there,
            }
        }
    }

    /// Gives back what an allowed `check` took, when a later window refused the request.
    fn refund(&self, w: &RateLimit, material: &[u8]) {
        let Some(cell) = self.buckets.get(&self.key(material)) else {
            return;
        };
        let interval = w.interval().as_nanos() as u64;
        let _ = cell.fetch_update(Ordering::AcqRel, Ordering::Acquire, |tat| {
            Some(tat.saturating_sub(interval))
        });
    }

    /// Drops keys whose bucket is full again (no different from an absent key).
    fn sweep(&self, now: Instant) {
        let t = self.nanos(now);
        self.buckets
            .retain(|_, cell| cell.load(Ordering::Relaxed) > t);
    }
}

/// What a route with `rate_limit` has at run time: a window state per window, and the
/// `RateLimit-Policy` value of its enforced windows.
pub struct RouteLimits {
    pub windows: Vec<Arc<Window>>,
    policy: Option<HeaderValue>,
}

/// Windows across reloads, and the global store.
pub struct Limits {
    /// By the route's prefix as written (the metric label), what it matches, and the window.
    windows: CarryOver<(String, RouteKey, RateLimit), Window>,
    store: Option<Arc<Store>>,
    swept: std::sync::atomic::AtomicBool,
    metrics: Arc<Metrics>,
    errors: Counter,
}

impl Limits {
    pub fn new(store: Option<&RateLimitStore>, metrics: &Arc<Metrics>) -> Self {
        Limits {
            windows: CarryOver::default(),
            store: store.and_then(Store::new).map(Arc::new),
            swept: Default::default(),
            metrics: metrics.clone(),
            errors: metrics.counter(RATELIMIT_STORE_ERRORS_TOTAL, vec![]),
        }
    }

    /// Whether a global store is configured, and its state, for `/routes`.
    pub fn store(&self) -> Option<&Arc<Store>> {
        self.store.as_ref()
    }

    /// Each route's windows in a new table (`None` for routes without `rate_limit`). A window
    /// that is the same in the same route keeps its buckets.
    pub fn routes(self: &Arc<Self>, table: &RouteTable) -> Vec<Option<RouteLimits>> {
        let keys = table.routes().iter().flat_map(|r| {
            let key = r.route_key();
            r.rate_limits
                .iter()
                .map(move |w| Some((r.prefix.clone(), key.clone(), w.clone())))
        });
        let mut states = self
            .windows
            .renew(keys, |(prefix, _, w)| Window::new(prefix, w), |_| {})
            .into_iter()
            .flatten();
        let out = table
            .routes()
            .iter()
            .map(|r| {
                let windows: Vec<Arc<Window>> = states.by_ref().take(r.rate_limits.len()).collect();
                (!r.rate_limits.is_empty()).then(|| RouteLimits {
                    policy: policy_header(&r.rate_limits),
                    windows,
                })
            })
            .collect();
        self.start_sweep();
        if let Some(store) = &self.store {
            store.start();
        }
        out
    }

    fn start_sweep(self: &Arc<Self>) {
        if self.swept.swap(true, Ordering::Relaxed) {
            return;
        }
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(sweep(Arc::downgrade(self)));
        }
    }

    /// Checks every window of a route for this request: the windows on this replica first,
    /// then the global ones (a request one of them refuses costs no round trip to the
    /// store), each in its order; the first enforced window that limits refuses it. A
    /// refused request spends no window's quota: what the replica's windows took before the
    /// refusal is given back (a global window that passed before another global window refused
    /// keeps its count: giving it back would cost another round trip).
    pub async fn check(
        &self,
        metrics: &Metrics,
        route: &Route,
        limits: &RouteLimits,
        headers: &HeaderMap,
        client: std::net::IpAddr,
        claims: Option<&Claims>,
    ) -> Checked {
        let now = Instant::now();
        let mut tightest: Option<(&RateLimit, u64, Duration)> = None;
        let mut outcome = None;
        // Windows that let the request through, counted once it is known to pass.
        let mut passed: smallvec::SmallVec<[(&RateLimit, &Window, Vec<u8>); 4]> =
            smallvec::SmallVec::new();
        let windows = || route.rate_limits.iter().zip(&limits.windows);
        let ordered = windows()
            .filter(|(w, _)| !w.global)
            .chain(windows().filter(|(w, _)| w.global));
        for (w, state) in ordered {
            let material = key_material(&w.key, headers, client, claims);
            let verdict = if w.global {
                self.check_global(w, &route.prefix, &material, state, now)
                    .await
            } else {
                state.check(w, &material, now)
            };
            match verdict {
                Verdict::Allowed { remaining, reset } => {
                    if !w.dry_run && tightest.is_none_or(|(_, r, _)| remaining < r) {
                        tightest = Some((w, remaining, reset));
                    }
                    passed.push((w, state, material));
                }
                Verdict::Unknown => passed.push((w, state, Vec::new())),
                Verdict::Limited { retry_after, reset } if !w.dry_run => {
                    state.count(metrics, LIMITED);
                    for (w, state, material) in &passed {
                        if !w.global {
                            state.refund(w, material);
                        }
                    }
                    debug!(route = %route.prefix, policy = %w.name, "rate limited");
                    return Checked {
                        limited: Some(retry_after),
                        policy: limits.policy.clone(),
                        state: state_header(w, 0, reset),
                        outcome: Decision::Limited,
                    };
                }
                Verdict::Limited { .. } => {
                    state.count(metrics, WOULD_LIMIT);
                    debug!(route = %route.prefix, policy = %w.name, "rate limit (dry run): would limit");
                    outcome = Some(Decision::WouldLimit);
                }
            }
        }
        for (_, state, _) in &passed {
            state.count(metrics, ALLOWED);
        }
        Checked {
            limited: None,
            policy: limits.policy.clone(),
            state: tightest.and_then(|(w, r, reset)| state_header(w, r, reset)),
            outcome: outcome.unwrap_or(Decision::Allowed),
        }
    }

    async fn check_global(
        &self,
        w: &RateLimit,
        route: &str,
        material: &[u8],
        local: &Window,
        now: Instant,
    ) -> Verdict {
        let Some(store) = &self.store else {
            return local.check(w, material, now);
        };
        match store.check(w, route, material).await {
            Ok(v) => v,
            Err(error) => {
                self.errors.increment(1);
                debug!(%error, "rate limit store unavailable");
                match store.settings.on_error {
                    OnStoreError::Local => local.check(w, material, now),
                    OnStoreError::Allow => Verdict::Unknown,
                    OnStoreError::Deny => Verdict::Limited {
                        retry_after: STORE_BACKOFF,
                        reset: STORE_BACKOFF,
                    },
                }
            }
        }
    }
}

/// What the rate-limit phase decided, and the headers for the answer.
pub struct Checked {
    /// `Some(retry after)` when an enforced window refuses the request.
    pub limited: Option<Duration>,
    /// `RateLimit-Policy` of the route's enforced windows.
    pub policy: Option<HeaderValue>,
    /// `RateLimit` of the tightest enforced window.
    pub state: Option<HeaderValue>,
    /// For the access log.
    pub outcome: Decision,
}

/// `"default";q=100;w=60, "burst";q=20;w=1` (draft-ietf-httpapi-ratelimit-headers).
fn policy_header(windows: &[RateLimit]) -> Option<HeaderValue> {
    let parts: Vec<String> = windows
        .iter()
        .filter(|w| !w.dry_run)
        .map(|w| format!("\"{}\";q={};w={}", w.name, w.limit, w.per.as_secs().max(1)))
        .collect();
    if parts.is_empty() {
        return None;
    }
    HeaderValue::from_str(&parts.join(", ")).ok()
}

/// `"default";r=REMAINING;t=SECONDS` (seconds until the bucket is full again, rounded up).
fn state_header(w: &RateLimit, remaining: u64, reset: Duration) -> Option<HeaderValue> {
    if w.dry_run {
        return None;
    }
    let t = reset.as_secs() + u64::from(reset.subsec_nanos() > 0);
    // Written by hand: the formatting machinery cost about a thousand instructions a request.
    let mut v = Vec::with_capacity(w.name.len() + 48);
    v.push(b'"');
    v.extend_from_slice(w.name.as_bytes());
    v.extend_from_slice(b"\";r=");
    push_decimal(&mut v, remaining);
    v.extend_from_slice(b";t=");
    push_decimal(&mut v, t);
    HeaderValue::from_maybe_shared(bytes::Bytes::from(v)).ok()
}

/// Appends `n` in decimal.
fn push_decimal(out: &mut Vec<u8>, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
}

/// The bytes a window counts a request under: its key's value, tagged with the key's kind
/// so values of different kinds never share a bucket; a request without the key is counted
/// by its client's address (never one shared bucket for everyone without it).
fn key_material(
    key: &RequestKey,
    headers: &HeaderMap,
    client: std::net::IpAddr,
    claims: Option<&Claims>,
) -> Vec<u8> {
    let tag = match key {
        RequestKey::Route => return vec![b'r'],
        RequestKey::Header(_) => b'h',
        RequestKey::Cookie(_) => b'c',
        RequestKey::Claim(_) => b'j',
        RequestKey::Client => b'i',
    };
    let (tag, value) = match key.read(headers, client, claims) {
        Some(value) => (tag, value),
        None => (
            b'i',
            RequestKey::Client
                .read(headers, client, claims)
                .unwrap_or_default(),
        ),
    };
    let mut v = Vec::with_capacity(value.len() + 1);
    v.push(tag);
    v.extend_from_slice(&value);
    v
}

/// Sweeps idle keys and sets `strangler_ratelimit_keys{route}`, until the registry is gone.
async fn sweep(limits: Weak<Limits>) {
    let mut gauges: HashMap<String, metrics::Gauge> = HashMap::new();
    loop {
        tokio::time::sleep(SWEEP).await;
        let Some(limits) = limits.upgrade() else {
            return;
        };
        let now = Instant::now();
        let mut by_route: HashMap<String, usize> = HashMap::new();
        for w in limits.windows.values() {
            w.sweep(now);
            *by_route.entry(w.route.clone()).or_default() += w.keys();
        }
        // A route that went away reads 0, then is forgotten.
        for (route, gauge) in &gauges {
            if !by_route.contains_key(route) {
                gauge.set(0.0);
            }
        }
        gauges.retain(|route, _| by_route.contains_key(route));
        for (route, keys) in by_route {
            gauges
                .entry(route.clone())
                .or_insert_with(|| {
                    limits
                        .metrics
                        .gauge(RATELIMIT_KEYS, vec![Label::new("route", route)])
                })
                .set(keys as f64);
        }
    }
}

/// The Redis behind `scope = "global"` windows: one multiplexed, self-reconnecting
/// connection, made in the background (a Redis that is down at start delays nothing).
pub struct Store {
    settings: RateLimitStore,
    client: redis::Client,
    conn: ArcSwapOption<redis::aio::ConnectionManager>,
    script: redis::Script,
    started: std::sync::atomic::AtomicBool,
    /// Whether the last round trip worked (a connection, once made, is kept and remade by
    /// the connection manager: having one says nothing of Redis now).
    answering: std::sync::atomic::AtomicBool,
    born: Instant,
    /// Milliseconds since `born` before which the store is not asked (after a failure: until
    /// the probe sees it answer).
    skip_until: AtomicU64,
    /// Whether a probe task is running.
    probing: std::sync::atomic::AtomicBool,
}

impl Store {
    fn new(settings: &RateLimitStore) -> Option<Self> {
        let client = match redis::Client::open(settings.url.as_str()) {
            Ok(c) => c,
            Err(error) => {
                warn!(%error, url_env = %settings.url_env, "[ratelimit_store]: not a usable Redis URL; global rate limits follow on_error");
                return None;
            }
        };
        Some(Store {
            settings: settings.clone(),
            client,
            conn: ArcSwapOption::empty(),
            script: redis::Script::new(GCRA),
            started: Default::default(),
            answering: std::sync::atomic::AtomicBool::new(true),
            born: Instant::now(),
            skip_until: AtomicU64::new(0),
            probing: Default::default(),
        })
    }

    /// Whether the connection is made and the last round trip on it worked.
    pub fn connected(&self) -> bool {
        self.conn.load().is_some() && self.answering.load(Ordering::Relaxed)
    }

    fn start(self: &Arc<Self>) {
        if self.started.swap(true, Ordering::Relaxed) {
            return;
        }
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(connect(Arc::downgrade(self)));
        }
    }

    fn millis(&self) -> u64 {
        self.born.elapsed().as_millis() as u64
    }

    /// A round trip failed: requests skip the store from now on, without waiting on it, and
    /// one probe task asks it every [`STORE_PROBE`] until it answers. Only the request that
    /// met the failure waited (at most the store's timeout); when the store is back, the
    /// first probe that gets an answer restores every request's round trip at once.
    fn failed(self: &Arc<Self>) {
        self.answering.store(false, Ordering::Relaxed);
        self.skip_until.store(u64::MAX, Ordering::Relaxed);
        if !self.probing.swap(true, Ordering::AcqRel) {
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn(probe(Arc::downgrade(self)));
            }
        }
    }

    /// One GCRA step in Redis, within the store's timeout.
    async fn check(
        self: &Arc<Self>,
        w: &RateLimit,
        route: &str,
        material: &[u8],
    ) -> Result<Verdict, String> {
        if self.millis() < self.skip_until.load(Ordering::Relaxed) {
            return Err("skipped after a recent failure".into());
        }
        let Some(conn) = self.conn.load_full() else {
            return Err("not connected".into());
        };
        let mut conn = (*conn).clone();
        let interval = w.interval().as_micros() as u64;
        let key = store_key(route, &w.name, material);
        let call = async {
            self.script
                .key(key)
                .arg(interval.max(1))
                .arg(interval.max(1).saturating_mul(w.burst))
                .invoke_async::<(i64, i64, i64)>(&mut conn)
                .await
        };
        let result = match tokio::time::timeout(self.settings.timeout, call).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!(
                "no answer within {}",
                humantime::format_duration(self.settings.timeout)
            )),
        };
        let (allowed, retry_us, reset_us) = result.inspect_err(|_| self.failed())?;
        let us = |v: i64| Duration::from_micros(v.max(0) as u64);
        Ok(if allowed == 1 {
            let tolerance = interval.saturating_mul(w.burst) as i64;
            Verdict::Allowed {
                remaining: ((tolerance - reset_us).max(0) as u64) / interval.max(1),
                reset: us(reset_us),
            }
        } else {
            Verdict::Limited {
                retry_after: us(retry_us),
                reset: us(reset_us),
            }
        })
    }
}

/// The Redis key of a bucket: `strangler:rl:ROUTE:POLICY:` and the key's tagged value (its
/// SHA-256 when long). The same on every replica.
fn store_key(route: &str, policy: &str, material: &[u8]) -> Vec<u8> {
    let mut k = format!("strangler:rl:{route}:{policy}:").into_bytes();
    if material.len() > MAX_STORE_KEY {
        k.extend_from_slice(crate::tls::sha256_hex(material).as_bytes());
    } else {
        k.extend_from_slice(material);
    }
    k
}

/// Asks the store every [`STORE_PROBE`] until it answers (loading the script, which also
/// refills a restarted Redis's script cache), then lets requests use it again.
async fn probe(store: Weak<Store>) {
    loop {
        tokio::time::sleep(STORE_PROBE).await;
        let Some(s) = store.upgrade() else { return };
        let Some(conn) = s.conn.load_full() else {
            // Not connected yet: `connect` is still trying; nothing to probe.
            continue;
        };
        let mut conn = (*conn).clone();
        // A connection the manager knows is broken is remade by this call (one attempt). The
        // probe is what requests do, on a key of its own: a Redis that answers but cannot run
        // the script or write (a read-only replica after a failover, out of memory) stays
        // skipped, instead of flapping between the store and `on_error`. It also loads the
        // script into a Redis that restarted empty.
        let wait = s.settings.timeout.max(Duration::from_millis(500));
        let mut invocation = s.script.key(PROBE_KEY);
        invocation.arg(1).arg(1);
        let call = invocation.invoke_async::<(i64, i64, i64)>(&mut conn);
        if let Ok(Ok(_)) = tokio::time::timeout(wait, call).await {
            s.answering.store(true, Ordering::Relaxed);
            s.probing.store(false, Ordering::Release);
            s.skip_until.store(0, Ordering::Relaxed);
            info!(url_env = %s.settings.url_env, "rate limit store answers again");
            return;
        }
    }
}

/// Connects to the store, retrying every second, until it works or the store is gone.
async fn connect(store: Weak<Store>) {
    let mut logged = false;
    loop {
        let Some(s) = store.upgrade() else { return };
        // One attempt per reconnect: the manager's own backoff (six tries, doubling from
        // 100 ms) kept a Redis that came back unused for seconds; the probe paces retries.
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_number_of_retries(0)
            .set_connection_timeout(Some(s.settings.timeout.max(Duration::from_millis(500))))
            .set_response_timeout(Some(s.settings.timeout));
        match redis::aio::ConnectionManager::new_with_config(s.client.clone(), config).await {
            Ok(conn) => {
                s.conn.store(Some(Arc::new(conn)));
                info!(url_env = %s.settings.url_env, "rate limit store connected");
                return;
            }
            Err(error) => {
                if !logged {
                    warn!(%error, url_env = %s.settings.url_env, on_error = %s.settings.on_error, "rate limit store unreachable; global windows follow on_error until it answers");
                    logged = true;
                }
            }
        }
        drop(s);
        tokio::time::sleep(STORE_BACKOFF).await;
    }
}

#[cfg(test)]
mod tests;

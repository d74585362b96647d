//! Authentication on the request path: a route's `auth` phase. Each provider has a runtime
//! that outlives reloads which leave the provider alone: its keys (for a `jwks_url`, fetched
//! through the proxy's own upstream client), a bounded cache of verified tokens (keyed by the
//! token's own bytes, so a hit is one hash lookup; bounded by bytes; `exp` and `nbf`
//! rechecked on every hit), and a bounded cache of unknown key ids.
//!
//! Key fetching, done safely (pingap's shape, with Envoy's gap closed): the set is fetched at
//! start and again every `jwks_refresh` in the background; a token with an unknown `kid`
//! forces one fetch at most every `jwks_cooldown` per provider, single-flight (requests that
//! need the same fetch wait for the one in progress, never start their own); a failed fetch
//! keeps the keys that worked; a fetch is capped in bytes and time. Random `kid`s therefore
//! cannot turn the proxy into an amplifier against the identity provider.
//!
//! A verified token's claims travel with the request: to `sticky = "claim:NAME"` and to the
//! `claims_to_headers` of the backend's and the shadow's copy. A refused request reaches no
//! backend and no shadow.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError, Weak};
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Method};
use http_body_util::BodyExt;
use metrics::{Counter, Label};
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::carry::CarryOver;
use crate::headers::cookie;
use crate::jwt::{self, Claims, KeySet, Reason};
use crate::metrics::{Metrics, AUTH_TOTAL, JWKS_FETCH_TOTAL};
use crate::routes::{KeySource, Mode, Provider, RouteAuth, RouteKey, RouteTable, TokenSource};
use crate::upstream::Upstream;

/// Verified tokens kept per provider.
const TOKEN_CACHE: usize = 10_000;
/// Bytes the verified tokens may weigh in all (each: its length plus [`CLAIMS_WEIGHT`]).
const TOKEN_CACHE_BYTES: u64 = 16 << 20;
/// What a cached token's claims are counted as, beside the token itself.
const CLAIMS_WEIGHT: u64 = 512;

/// A cached token weighs its bytes and its claims', so long tokens cannot hold much memory.
#[derive(Clone)]
struct TokenWeight;

impl quick_cache::Weighter<Box<str>, Arc<Claims>> for TokenWeight {
    fn weight(&self, token: &Box<str>, _: &Arc<Claims>) -> u64 {
        token.len() as u64 + CLAIMS_WEIGHT
    }
}
/// Unknown key ids remembered per provider (each for one cooldown).
const UNKNOWN_KID_CACHE: usize = 1_024;
/// The largest JWKS document read.
pub const MAX_JWKS_BYTES: usize = 256 << 10;
/// After a failed background fetch, the next comes this soon (or at `jwks_refresh`, if
/// sooner).
const RETRY_AFTER_FAILURE: Duration = Duration::from_secs(30);
/// The soonest a background refresh follows a fetch, whatever the JWKS's `max-age` says.
const REFRESH_FLOOR: Duration = Duration::from_secs(30);
/// The longest token read from a request.
const MAX_TOKEN_BYTES: usize = 16 << 10;

/// The `outcome` label values of `strangler_auth_total` besides the refusal reasons.
pub const OK: &str = "ok";
pub const ANONYMOUS: &str = "anonymous";
pub const PREFLIGHT: &str = "preflight";

/// Every outcome, in the order of [`RouteAuthStats`]'s counters.
pub fn outcomes() -> impl Iterator<Item = &'static str> {
    [OK, ANONYMOUS, PREFLIGHT]
        .into_iter()
        .chain(Reason::ALL.iter().map(|r| r.as_str()))
}

const OUTCOMES: usize = 3 + Reason::ALL.len();

fn outcome_index(outcome: Outcome) -> usize {
    match outcome {
        Outcome::Ok => 0,
        Outcome::Anonymous => 1,
        Outcome::Preflight => 2,
        Outcome::Refused(r) => 3 + Reason::ALL.iter().position(|&x| x == r).unwrap_or(0),
    }
}

/// What happened to one request's credentials.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Ok,
    /// No credentials, and the route lets such requests through (`optional`).
    Anonymous,
    /// A CORS preflight without credentials.
    Preflight,
    /// Refused, or in `observe` mode would have been.
    Refused(Reason),
}

impl Outcome {
    /// Whether the request presented credentials (a token, good or bad): not `missing`,
    /// `anonymous` or a preflight.
    pub fn presented(self) -> bool {
        !matches!(
            self,
            Outcome::Anonymous | Outcome::Preflight | Outcome::Refused(Reason::Missing)
        )
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => OK,
            Outcome::Anonymous => ANONYMOUS,
            Outcome::Preflight => PREFLIGHT,
            Outcome::Refused(r) => r.as_str(),
        }
    }
}

/// A request the auth phase let through, with the claims of its verified token (if any).
pub struct Passed {
    pub claims: Option<Arc<Claims>>,
    /// The `strangler_auth_total` outcome (in observe mode, maybe a refusal reason).
    pub outcome: Outcome,
}

/// A request the auth phase refuses.
#[derive(Debug)]
pub struct Refusal {
    pub reason: Reason,
    pub realm: String,
    /// For `insufficient_scope`: the value that was missing.
    pub scope: Option<String>,
    /// For `keys_unavailable`: when a fetch may be tried again.
    pub retry_after: Duration,
}

impl Refusal {
    /// The proxy's answer to the refusal (RFC 6750 §3.1): 401, 400, 403 or 503.
    pub fn into_error(self) -> crate::error::ProxyError {
        use crate::error::AuthError;
        let error = match self.reason {
            Reason::Missing => AuthError::Missing,
            Reason::Malformed => AuthError::Malformed,
            Reason::InsufficientScope => AuthError::InsufficientScope {
                scope: self.scope.unwrap_or_default(),
            },
            Reason::KeysUnavailable => AuthError::Unavailable {
                retry_after: self.retry_after,
            },
            _ => AuthError::Invalid,
        };
        crate::error::ProxyError::Auth {
            realm: self.realm,
            error,
            reason: self.reason.as_str(),
        }
    }
}

/// Per-route counts by outcome, kept across reloads by route identity: `/routes` and the
/// board show them next to the route's mode, so an operator sees what enforcement would
/// break before switching it on.
pub struct RouteAuthStats {
    counts: [AtomicU64; OUTCOMES],
    counters: [OnceLock<Counter>; OUTCOMES],
}

impl Default for RouteAuthStats {
    fn default() -> Self {
        RouteAuthStats {
            counts: std::array::from_fn(|_| AtomicU64::new(0)),
            counters: std::array::from_fn(|_| OnceLock::new()),
        }
    }
}

impl RouteAuthStats {
    fn record(&self, metrics: &Metrics, route: &str, outcome: Outcome) {
        let i = outcome_index(outcome);
        self.counts[i].fetch_add(1, Ordering::Relaxed);
        self.counters[i]
            .get_or_init(|| {
                metrics.counter(
                    AUTH_TOTAL,
                    vec![
                        Label::new("route", route.to_string()),
                        Label::new("outcome", outcome.as_str()),
                    ],
                )
            })
            .increment(1);
    }

    /// Non-zero counts by outcome, in [`outcomes`] order.
    pub fn counts(&self) -> Vec<(&'static str, u64)> {
        outcomes()
            .zip(&self.counts)
            .map(|(o, c)| (o, c.load(Ordering::Relaxed)))
            .filter(|(_, n)| *n > 0)
            .collect()
    }
}

/// What a route with `auth` has at run time.
pub struct RouteAuthRuntime {
    pub provider: Arc<ProviderRuntime>,
    pub stats: Arc<RouteAuthStats>,
}

impl RouteAuthRuntime {
    /// Checks a request's credentials against the route's `auth`. In `observe` mode every
    /// request passes; the outcome is counted either way.
    pub async fn authenticate(
        &self,
        provider: &Provider,
        route_auth: &RouteAuth,
        metrics: &Metrics,
        route: &str,
        method: &Method,
        headers: &HeaderMap,
    ) -> Result<Passed, Refusal> {
        let rt = &self.provider;
        let (outcome, claims, scope) = rt.check(provider, route_auth, method, headers).await;
        self.stats.record(metrics, route, outcome);
        let reason = match outcome {
            Outcome::Refused(r) => r,
            _ => return Ok(Passed { claims, outcome }),
        };
        if route_auth.mode == Mode::Observe {
            debug!(provider = %rt.name, %route, %reason, "auth (observe): would refuse");
            // A token that verified but lacks a required value still says who the caller is.
            return Ok(Passed { claims, outcome });
        }
        Err(Refusal {
            reason,
            realm: provider.realm.clone(),
            scope,
            retry_after: rt.retry_after(),
        })
    }
}

/// Provider runtimes and per-route counts, across reloads.
#[derive(Default)]
pub struct Auth {
    providers: CarryOver<ProviderKey, ProviderRuntime>,
    routes: CarryOver<RouteKey, RouteAuthStats>,
    /// The last key set each `jwks_url` gave. A reload that changes any of a provider's
    /// settings makes a new runtime; it starts with these keys, so a reload while the
    /// identity provider is down does not turn every request into a 503.
    fetched: Fetched,
}

/// Key sets by JWKS URL, shared by the runtimes that fetch them.
type Fetched = Arc<Mutex<HashMap<String, Arc<KeySet>>>>;

/// A provider's identity across reloads: the whole of its settings (a changed issuer, key
/// source or algorithm list starts fresh: cached verdicts were made under the old rules).
struct ProviderKey(Provider);

impl PartialEq for ProviderKey {
    fn eq(&self, other: &Self) -> bool {
        self.0 == other.0
    }
}

// Validation allows no NaN or other non-reflexive value in a provider.
impl Eq for ProviderKey {}

impl std::hash::Hash for ProviderKey {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.0.name.hash(state);
    }
}

impl Auth {
    /// The runtimes of a new table's providers, parallel to `table.providers()`.
    pub fn providers(&self, table: &RouteTable, metrics: &Metrics) -> Vec<Arc<ProviderRuntime>> {
        let runtimes = self
            .providers
            .renew(
                table
                    .providers()
                    .iter()
                    .map(|p| Some(ProviderKey(p.clone()))),
                |key| ProviderRuntime::new(&key.0, metrics, &self.fetched),
                |_| {},
            )
            .into_iter()
            .flatten()
            .collect();
        let urls: Vec<&str> = table
            .providers()
            .iter()
            .filter_map(|p| match &p.keys {
                KeySource::Url { url, .. } => Some(url.as_str()),
                KeySource::Loaded { .. } => None,
            })
            .collect();
        self.fetched
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|url, _| urls.contains(&url.as_str()));
        runtimes
    }

    /// The auth runtime of each route of a new table (`None` without `auth`).
    pub fn routes(
        &self,
        table: &RouteTable,
        providers: &[Arc<ProviderRuntime>],
    ) -> Vec<Option<RouteAuthRuntime>> {
        let routes = table.routes();
        let stats = self.routes.renew(
            routes
                .iter()
                .map(|r| r.auth.as_ref().map(|_| r.route_key())),
            |_| RouteAuthStats::default(),
            |_| {},
        );
        routes
            .iter()
            .zip(stats)
            .map(|(r, stats)| {
                let a = r.auth.as_ref()?;
                Some(RouteAuthRuntime {
                    provider: providers.get(a.provider)?.clone(),
                    stats: stats?,
                })
            })
            .collect()
    }
}

/// Fetching a `jwks_url`.
struct Fetcher {
    upstream: Arc<Upstream>,
    authority: HeaderValue,
    path: http::uri::PathAndQuery,
    timeout: Duration,
    refresh: Duration,
    cooldown: Duration,
    /// Single flight: held for the length of one fetch.
    lock: tokio::sync::Mutex<()>,
    born: Instant,
    /// Milliseconds since `born` of the last fetch attempt (0: none yet).
    last_attempt: AtomicU64,
    last_failed: AtomicBool,
    /// `strangler_jwks_fetch_total` by outcome: ok, error, timeout, invalid.
    outcomes: [Counter; 4],
    /// The last answer's `Cache-Control: max-age`, in seconds ([`NO_MAX_AGE`]: none).
    max_age: AtomicU64,
    url: String,
    /// Where the keys fetched are left for the runtime a reload may replace this one with.
    fetched: Fetched,
}

/// A provider's state at run time.
pub struct ProviderRuntime {
    name: String,
    keys: ArcSwap<KeySet>,
    fetcher: Option<Fetcher>,
    tokens: quick_cache::sync::Cache<Box<str>, Arc<Claims>, TokenWeight>,
    unknown_kids: quick_cache::sync::Cache<String, Instant>,
    started: AtomicBool,
}

impl ProviderRuntime {
    fn new(p: &Provider, metrics: &Metrics, fetched: &Fetched) -> Self {
        let (keys, fetcher) = match &p.keys {
            KeySource::Loaded { keys, .. } => (keys.clone(), None),
            KeySource::Url {
                url,
                path,
                backend,
                refresh,
                cooldown,
                ..
            } => {
                let counter = |outcome: &'static str| {
                    metrics.counter(
                        JWKS_FETCH_TOTAL,
                        vec![
                            Label::new("provider", p.name.clone()),
                            Label::new("outcome", outcome),
                        ],
                    )
                };
                let fetcher = Fetcher {
                    upstream: Upstream::new(backend, metrics, &[]),
                    authority: HeaderValue::from_str(backend.authority.as_str())
                        .unwrap_or(HeaderValue::from_static("localhost")),
                    path: path.clone(),
                    timeout: backend.timeout,
                    refresh: *refresh,
                    cooldown: *cooldown,
                    lock: tokio::sync::Mutex::new(()),
                    born: Instant::now(),
                    last_attempt: AtomicU64::new(0),
                    last_failed: AtomicBool::new(false),
                    outcomes: ["ok", "error", "timeout", "invalid"].map(counter),
                    max_age: AtomicU64::new(NO_MAX_AGE),
                    url: url.clone(),
                    fetched: fetched.clone(),
                };
                let keys = fetched
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .get(url)
                    .cloned()
                    .unwrap_or_else(|| Arc::new(KeySet::empty()));
                (keys, Some(fetcher))
            }
        };
        ProviderRuntime {
            name: p.name.clone(),
            keys: ArcSwap::new(keys),
            fetcher,
            tokens: quick_cache::sync::Cache::with_weighter(
                TOKEN_CACHE,
                TOKEN_CACHE_BYTES,
                TokenWeight,
            ),
            unknown_kids: quick_cache::sync::Cache::new(UNKNOWN_KID_CACHE),
            started: AtomicBool::new(false),
        }
    }

    /// Starts the background refresh of a `jwks_url` provider (a no-op for others, and
    /// outside a runtime; once per runtime). The task ends when the runtime is dropped.
    pub fn start(self: &Arc<Self>) {
        if self.fetcher.is_none() || self.started.swap(true, Ordering::Relaxed) {
            return;
        }
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(refresh(Arc::downgrade(self)));
        }
    }

    /// The keys now (for `/routes`).
    pub fn keys(&self) -> Arc<KeySet> {
        self.keys.load_full()
    }

    /// How many verified tokens are cached.
    pub fn cached_tokens(&self) -> usize {
        self.tokens.len()
    }

    async fn check(
        &self,
        provider: &Provider,
        route_auth: &RouteAuth,
        method: &Method,
        headers: &HeaderMap,
    ) -> (Outcome, Option<Arc<Claims>>, Option<String>) {
        let token = match credentials(provider, headers) {
            Ok(Some(t)) => t,
            Ok(None) if is_preflight(method, headers) => return (Outcome::Preflight, None, None),
            Ok(None) if route_auth.mode == Mode::Optional => {
                return (Outcome::Anonymous, None, None)
            }
            Ok(None) => return (Outcome::Refused(Reason::Missing), None, None),
            Err(r) => return (Outcome::Refused(r), None, None),
        };
        let claims = match self.verify(provider, token).await {
            Ok(c) => c,
            Err(r) => return (Outcome::Refused(r), None, None),
        };
        match jwt::missing_requirement(&claims, &route_auth.require) {
            None => (Outcome::Ok, Some(claims), None),
            Some((_, value)) => (
                Outcome::Refused(Reason::InsufficientScope),
                Some(claims),
                Some(value.to_string()),
            ),
        }
    }

    /// A token's claims: from the cache (its time bounds checked again), or verified.
    async fn verify(&self, provider: &Provider, token: &str) -> Result<Arc<Claims>, Reason> {
        let rules = &provider.rules;
        if let Some(claims) = self.tokens.get(token) {
            jwt::still_valid(&claims, rules, jwt::now())?;
            return Ok(claims);
        }
        let head = jwt::head(token, rules)?;
        let keys = self.keys_for(head.kid.as_deref()).await?;
        let claims = Arc::new(jwt::verify(token, &head, rules, &keys)?);
        self.tokens.insert(token.into(), claims.clone());
        Ok(claims)
    }

    /// Keys that know `kid` (any keys, without one). An unknown `kid` may force one fetch
    /// per cooldown, shared by every request that waits for it.
    async fn keys_for(&self, kid: Option<&str>) -> Result<Arc<KeySet>, Reason> {
        let known = |ks: &KeySet| kid.map_or(!ks.is_empty(), |k| ks.has(k));
        let keys = self.keys.load_full();
        let Some(f) = &self.fetcher else {
            return Ok(keys);
        };
        if known(&keys) {
            return Ok(keys);
        }
        let unavailable = || {
            if f.last_failed.load(Ordering::Relaxed) {
                Reason::KeysUnavailable
            } else {
                Reason::UnknownKey
            }
        };
        // Remembered until a fetch may be forced again, not a whole cooldown from when it
        // was seen: a client told `Retry-After` must find the fetch allowed when it returns.
        let recently_unknown = |kid: &str| {
            self.unknown_kids
                .get(kid)
                .is_some_and(|at| at.elapsed() < f.cooldown && !f.may_force())
        };
        if kid.is_some_and(recently_unknown) {
            return Err(unavailable());
        }
        {
            let _flight = f.lock.lock().await;
            if !known(&self.keys.load()) && f.may_force() {
                self.fetch(f).await;
            }
        }
        let keys = self.keys.load_full();
        if known(&keys) {
            return Ok(keys);
        }
        if let Some(kid) = kid {
            // Logged escaped: a kid is attacker-controlled text.
            debug!(provider = %self.name, kid = ?kid, "unknown key id");
            self.unknown_kids.insert(kid.to_string(), Instant::now());
        }
        Err(unavailable())
    }

    /// One fetch of the key set; the caller holds the fetch lock. Returns whether it worked.
    async fn fetch(&self, f: &Fetcher) -> bool {
        f.last_attempt.store(
            f.born.elapsed().as_millis().max(1) as u64,
            Ordering::Relaxed,
        );
        let result = tokio::time::timeout(f.timeout, f.get()).await;
        let (index, outcome) = match result {
            Err(_) | Ok(Err(FetchError::TimedOut)) => (2, Err("timed out".to_string())),
            Ok(Err(FetchError::Failed(e))) => (1, Err(e)),
            Ok(Err(FetchError::Invalid(e))) => (3, Err(e)),
            Ok(Ok((bytes, max_age))) => {
                f.max_age.store(
                    max_age.map_or(NO_MAX_AGE, |d| d.as_secs().min(NO_MAX_AGE - 1)),
                    Ordering::Relaxed,
                );
                match KeySet::from_jwks(&bytes) {
                    Ok(keys) => (0, Ok(keys)),
                    Err(e) => (3, Err(e)),
                }
            }
        };
        f.outcomes[index].increment(1);
        match outcome {
            Ok(keys) => {
                f.last_failed.store(false, Ordering::Relaxed);
                if *self.keys.load_full() != keys {
                    info!(provider = %self.name, keys = keys.len(), "JWKS loaded");
                    let keys = Arc::new(keys);
                    f.fetched
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .insert(f.url.clone(), keys.clone());
                    self.keys.store(keys);
                    // A key that left the set must not keep accepting its tokens.
                    self.tokens.clear();
                }
                true
            }
            Err(error) => {
                f.last_failed.store(true, Ordering::Relaxed);
                warn!(provider = %self.name, %error, "JWKS fetch failed; the keys already loaded stay in use");
                false
            }
        }
    }

    /// How long a client should wait before retrying a 503: until a fetch may be forced,
    /// rounded up to whole seconds (`Retry-After` has no fractions; a client that waits the
    /// rounded-down figure would come back inside the cooldown and be refused again).
    fn retry_after(&self) -> Duration {
        self.fetcher.as_ref().map_or(Duration::from_secs(1), |f| {
            let left = f.cooldown.saturating_sub(f.since_last_attempt());
            let secs = left.as_secs() + u64::from(left.subsec_nanos() > 0);
            Duration::from_secs(secs.max(1))
        })
    }
}

impl Fetcher {
    fn since_last_attempt(&self) -> Duration {
        let at = self.last_attempt.load(Ordering::Relaxed);
        if at == 0 {
            return Duration::MAX;
        }
        self.born
            .elapsed()
            .saturating_sub(Duration::from_millis(at))
    }

    /// Whether an unknown `kid` may force a fetch now.
    fn may_force(&self) -> bool {
        self.since_last_attempt() >= self.cooldown
    }

    /// When the background refresh fetches next: see [`next_refresh`].
    fn next_refresh(&self) -> Duration {
        let max_age = match self.max_age.load(Ordering::Relaxed) {
            NO_MAX_AGE => None,
            secs => Some(Duration::from_secs(secs)),
        };
        next_refresh(self.refresh, max_age)
    }

    /// GET the JWKS document, at most [`MAX_JWKS_BYTES`], with its `max-age`.
    async fn get(&self) -> Result<(Bytes, Option<Duration>), FetchError> {
        let mut headers = HeaderMap::new();
        headers.insert(header::HOST, self.authority.clone());
        headers.insert(header::ACCEPT, HeaderValue::from_static("application/json"));
        let req = self
            .upstream
            .request(Method::GET, Some(&self.path), headers, Bytes::new())
            .ok_or_else(|| FetchError::Failed("the JWKS URL cannot be requested".into()))?;
        let deadline = Instant::now() + self.timeout;
        let (resp, lease) = self
            .upstream
            .send(req, deadline)
            .await
            .map_err(|f| match f.error {
                // The same budget as the caller's: whichever notices first, it is a timeout.
                crate::error::ProxyError::UpstreamTimeout { .. } => FetchError::TimedOut,
                e => FetchError::Failed(e.to_string()),
            })?;
        if !resp.status().is_success() {
            return Err(FetchError::Failed(format!(
                "the JWKS URL answered {}",
                resp.status()
            )));
        }
        let max_age = max_age(resp.headers());
        let body = http_body_util::Limited::new(resp.into_body(), MAX_JWKS_BYTES)
            .collect()
            .await
            .map_err(|e| {
                if e.downcast_ref::<http_body_util::LengthLimitError>()
                    .is_some()
                {
                    FetchError::Invalid(format!(
                        "the JWKS document is larger than {} KiB",
                        MAX_JWKS_BYTES >> 10
                    ))
                } else {
                    FetchError::Failed(format!("reading the JWKS document: {e}"))
                }
            })?;
        lease.release();
        Ok((body.to_bytes(), max_age))
    }
}

/// Why a JWKS fetch failed, as `strangler_jwks_fetch_total` counts it.
enum FetchError {
    /// Not reached, or not answered with 2xx (`error`).
    Failed(String),
    /// Out of `jwks_timeout` (`timeout`).
    TimedOut,
    /// Answered, but not a key set the proxy takes: over [`MAX_JWKS_BYTES`] (`invalid`, as a
    /// document that does not parse).
    Invalid(String),
}

/// `Fetcher::max_age` when the last answer had none.
const NO_MAX_AGE: u64 = u64::MAX;

/// When the background refresh fetches next after a fetch that worked: `jwks_refresh`, or
/// sooner when the answer's `max-age` runs out first: at three quarters of it, never sooner
/// than [`REFRESH_FLOOR`] after the fetch (so `max-age=0` means every 30 s) and never later
/// than `jwks_refresh`.
fn next_refresh(refresh: Duration, max_age: Option<Duration>) -> Duration {
    match max_age {
        None => refresh,
        // saturating: a `max-age` of centuries must not overflow (and end the task)
        Some(age) => (age.saturating_mul(3) / 4).max(REFRESH_FLOOR).min(refresh),
    }
}

/// `Cache-Control: max-age=N` of an answer (`None` with `no-cache` or `no-store`).
fn max_age(headers: &HeaderMap) -> Option<Duration> {
    let mut age = None;
    for value in headers.get_all(header::CACHE_CONTROL) {
        for directive in value.to_str().ok()?.split(',') {
            let d = directive.trim().to_ascii_lowercase();
            if d == "no-cache" || d == "no-store" {
                return None;
            }
            if let Some(n) = d.strip_prefix("max-age=") {
                age = n
                    .trim_matches('"')
                    .parse::<u64>()
                    .ok()
                    .map(Duration::from_secs);
            }
        }
    }
    age
}

/// The background refresh of one `jwks_url` provider, until its runtime is dropped.
async fn refresh(runtime: Weak<ProviderRuntime>) {
    loop {
        let wait = {
            let Some(rt) = runtime.upgrade() else { return };
            let Some(f) = &rt.fetcher else { return };
            let _flight = f.lock.lock().await;
            if rt.fetch(f).await {
                f.next_refresh()
            } else {
                f.refresh.min(RETRY_AFTER_FAILURE)
            }
        };
        tokio::time::sleep(wait).await;
    }
}

/// The token a request carries where the provider reads it: `Ok(None)` when there is none,
/// `Err(Malformed)` for credentials that are not a well-formed token (two Authorization
/// headers, `Bearer` with nothing or garbage after it, an oversized token).
pub fn credentials<'a>(
    provider: &Provider,
    headers: &'a HeaderMap,
) -> Result<Option<&'a str>, Reason> {
    for source in &provider.token_from {
        let found = match source {
            TokenSource::Bearer => bearer(headers)?,
            TokenSource::Header(name) => single(headers, name)?,
            TokenSource::Cookie(name) => cookie(headers, name).filter(|v| !v.is_empty()),
        };
        if let Some(token) = found {
            if token.len() > MAX_TOKEN_BYTES || !token.bytes().all(is_token68) {
                return Err(Reason::Malformed);
            }
            return Ok(Some(token));
        }
    }
    Ok(None)
}

/// `Authorization: Bearer TOKEN` (RFC 6750 §2.1): the scheme case-insensitive. Another scheme
/// (Basic) is not a bearer token: `None`.
fn bearer(headers: &HeaderMap) -> Result<Option<&str>, Reason> {
    let Some(value) = single(headers, &header::AUTHORIZATION)? else {
        return Ok(None);
    };
    let (scheme, rest) = value.split_once(' ').unwrap_or((value, ""));
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Ok(None);
    }
    let token = rest.trim_start_matches(' ');
    if token.is_empty() || token.contains(' ') {
        return Err(Reason::Malformed);
    }
    Ok(Some(token))
}

/// The one value of a header: two of them are malformed credentials.
fn single<'a>(headers: &'a HeaderMap, name: &http::HeaderName) -> Result<Option<&'a str>, Reason> {
    let mut all = headers.get_all(name).iter();
    let Some(first) = all.next() else {
        return Ok(None);
    };
    if all.next().is_some() {
        return Err(Reason::Malformed);
    }
    let text = first.to_str().map_err(|_| Reason::Malformed)?.trim();
    Ok((!text.is_empty()).then_some(text))
}

/// RFC 7235 token68 characters (a JWT uses a subset).
fn is_token68(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"-._~+/=".contains(&b)
}

/// A CORS preflight: OPTIONS with `Origin` and `Access-Control-Request-Method`.
pub fn is_preflight(method: &Method, headers: &HeaderMap) -> bool {
    method == Method::OPTIONS
        && headers.contains_key(header::ORIGIN)
        && headers.contains_key(header::ACCESS_CONTROL_REQUEST_METHOD)
}

/// Sets the claims a provider maps to headers (the client's copies were already stripped),
/// and removes the credential when the provider does not forward it.
pub fn apply(provider: &Provider, claims: Option<&Claims>, headers: &mut HeaderMap) {
    if let Some(claims) = claims {
        for (name, claim) in &provider.claims_to_headers {
            let value = jwt::claim_text(claims, claim).and_then(|t| HeaderValue::from_str(&t).ok());
            if let Some(v) = value {
                headers.insert(name.clone(), v);
            }
        }
    }
    if !provider.forward_token {
        for source in &provider.token_from {
            match source {
                TokenSource::Bearer => {
                    headers.remove(header::AUTHORIZATION);
                }
                TokenSource::Header(name) => {
                    headers.remove(name);
                }
                TokenSource::Cookie(name) => crate::headers::remove_cookie(headers, name),
            }
        }
    }
}

#[cfg(test)]
mod tests;

//! Stale-if-error: a last-known-good store, not a cache. Requests are always forwarded; a
//! stored copy is served only after the backend and the route's fallback failed in one of the
//! route's `on` ways (connect, timeout, a listed 5xx). Serving fresh copies would hide traffic
//! from the monolith and starve shadow comparisons.
//!
//! What is stored (RFC 9111 for a shared cache, RFC 5861 for `stale-if-error`): answers to GET
//! with status 200, fully received, at most `max_entry` bytes, without `Set-Cookie`, and whose
//! `Cache-Control` has none of `no-store`, `private`, `no-cache`, `must-revalidate`,
//! `proxy-revalidate`, `s-maxage` (under which a stale copy may never be served); whose `Vary`
//! names only headers the route's `vary` lists (`Vary: *` never). A request with credentials is
//! stored only with `per_user`, one copy per verified subject. Copies are keyed by route, host,
//! path and subject, then by query and the `vary` headers' values, and a copy with a
//! `Content-Encoding` is served only to a request whose `Accept-Encoding` takes it (whatever
//! `Vary` said); a 2xx write to the same path drops them. Every reason a copy was not stored
//! is counted, so an API that answers `no-cache` does not look like a broken feature.
//!
//! A stale answer carries `Age` and `Cache-Status: strangler; fwd=stale` (RFC 9211) and still
//! counts as the upstream failure it replaced, for the guard and the metrics: a degraded route
//! must look degraded. The store is bounded in bytes for all routes together
//! (`[server] stale_store_size`), the least useful copies evicted first; copies in flight are
//! bounded too. It outlives reloads that keep a route.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Method, Request, StatusCode};
use metrics::{Counter, Gauge, Label};

use crate::carry::CarryOver;
use crate::error::ProxyError;
use crate::jwt::Claims;
use crate::metrics::{Metrics, STALE_BYTES, STALE_TOTAL};
use crate::routes::{Route, RouteKey, RouteTable, Stale};
use crate::upstream::tee::{Budget, Captured, Tee};

/// Copies of one path kept at most (queries and `vary` values).
const MAX_VARIANTS: usize = 32;
/// Each shard of the store holds at least this many bytes (or the whole store, when
/// smaller): a copy must fit in one shard.
const MIN_SHARD_BYTES: u64 = 8 << 20;
/// quick_cache's share of a shard for entries it keeps ("hot"); an entry (here, a path's
/// copies) heavier than that share of its shard is never kept.
const HOT_ALLOCATION: f64 = 0.97;

/// `strangler_stale_total` outcomes, in counter order.
pub const OUTCOMES: [&str; 16] = [
    "stored",
    "served",
    "miss",
    "expired",
    "evicted",
    "invalidated",
    "not_200",
    "no_store",
    "private",
    "no_cache",
    "must_revalidate",
    "set_cookie",
    "authorization",
    "vary",
    "too_large",
    "incomplete",
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(usize)]
pub enum Outcome {
    Stored,
    Served,
    Miss,
    Expired,
    Evicted,
    Invalidated,
    Not200,
    NoStore,
    Private,
    NoCache,
    MustRevalidate,
    SetCookie,
    Authorization,
    Vary,
    TooLarge,
    Incomplete,
}

/// A route's counters, kept across reloads with the route.
pub struct RouteStale {
    route: String,
    counts: [AtomicU64; OUTCOMES.len()],
    counters: [OnceLock<Counter>; OUTCOMES.len()],
    metrics: Arc<Metrics>,
}

impl RouteStale {
    fn new(route: &str, metrics: &Arc<Metrics>) -> Self {
        RouteStale {
            route: route.to_string(),
            counts: std::array::from_fn(|_| AtomicU64::new(0)),
            counters: std::array::from_fn(|_| OnceLock::new()),
            metrics: metrics.clone(),
        }
    }

    pub fn count(&self, outcome: Outcome) {
        let i = outcome as usize;
        self.counts[i].fetch_add(1, Ordering::Relaxed);
        self.counters[i]
            .get_or_init(|| {
                self.metrics.counter(
                    STALE_TOTAL,
                    vec![
                        Label::new("route", self.route.clone()),
                        Label::new("outcome", OUTCOMES[i]),
                    ],
                )
            })
            .increment(1);
    }

    /// Non-zero counts by outcome, for `/routes`.
    pub fn counts(&self) -> Vec<(&'static str, u64)> {
        crate::metrics::nonzero_counts(&OUTCOMES, &self.counts)
    }
}

/// One stored answer.
struct Entry {
    /// Query and `vary` values: which variant of the path this is.
    variant: Vec<u8>,
    headers: HeaderMap,
    body: Bytes,
    stored: Instant,
    max_stale: Duration,
    weight: u64,
    route: Arc<RouteStale>,
}

/// The copies of one path (route, host, path, subject).
struct Group {
    variants: Vec<Arc<Entry>>,
    /// Replaced by a newer group of the same path: quick_cache reports the old value of an
    /// insert to `on_evict`, but its copies live on (or were replaced), nothing was evicted.
    replaced: AtomicBool,
}

#[derive(Clone)]
struct Weigher;

impl quick_cache::Weighter<Vec<u8>, Arc<Group>> for Weigher {
    fn weight(&self, key: &Vec<u8>, group: &Arc<Group>) -> u64 {
        key.len() as u64 + group.variants.iter().map(|e| e.weight).sum::<u64>()
    }
}

/// Counts evictions against the routes whose copies went.
#[derive(Clone, Default)]
struct Evictions;

impl quick_cache::Lifecycle<Vec<u8>, Arc<Group>> for Evictions {
    type RequestState = ();
    fn on_evict(&self, _state: &mut Self::RequestState, _key: Vec<u8>, group: Arc<Group>) {
        if group.replaced.load(Ordering::Relaxed) {
            return;
        }
        for e in &group.variants {
            e.route.count(Outcome::Evicted);
        }
    }
}

type Cache = quick_cache::sync::Cache<
    Vec<u8>,
    Arc<Group>,
    Weigher,
    quick_cache::DefaultHashBuilder,
    Evictions,
>;

/// The store of every route's copies.
pub struct StaleStore {
    cache: Cache,
    capacity: u64,
    /// The heaviest path (key and copies) a shard keeps.
    max_weight: u64,
    /// Bytes being captured, not yet stored.
    in_flight: Arc<Budget>,
    bytes: Gauge,
    routes: CarryOver<(String, RouteKey), RouteStale>,
    metrics: Arc<Metrics>,
}

impl StaleStore {
    pub fn new(capacity: u64, metrics: &Arc<Metrics>) -> Self {
        // quick_cache wants an estimate of the entries: assume 4 KiB answers.
        let items = (capacity / 4096).clamp(16, 1 << 20) as usize;
        // quick_cache splits the bytes into shards (4 per core by default) and never keeps an
        // entry heavier than its shard: on a many-core host, copies well under `max_entry`
        // would be dropped as they are stored. Fewer, larger shards; a power of two (rounded
        // down), as quick_cache rounds up.
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as u64;
        let wanted = (capacity / MIN_SHARD_BYTES).clamp(1, cores * 4);
        let shards = 1usize << (u64::BITS - 1 - wanted.leading_zeros());
        let options = quick_cache::OptionsBuilder::new()
            .estimated_items_capacity(items)
            .weight_capacity(capacity.max(1))
            .shards(shards)
            .hot_allocation(HOT_ALLOCATION)
            .build();
        let hasher = quick_cache::DefaultHashBuilder::default;
        let cache = match options {
            Ok(o) => Cache::with_options(o, Weigher, hasher(), Evictions),
            Err(_) => Cache::with(items, capacity.max(1), Weigher, hasher(), Evictions),
        };
        // What quick_cache computes as a shard's "hot" target: heavier entries are dropped.
        let max_weight = (cache.shard_capacity() as f64 * HOT_ALLOCATION) as u64;
        StaleStore {
            cache,
            capacity,
            max_weight,
            in_flight: Budget::new(capacity.clamp(1 << 20, 64 << 20) as usize),
            bytes: metrics.gauge(STALE_BYTES, vec![]),
            routes: CarryOver::default(),
            metrics: metrics.clone(),
        }
    }

    /// The counters of each route with `stale_if_error` in a new table; copies of routes that
    /// are gone (or no longer keep copies) are dropped.
    pub fn routes(&self, table: &RouteTable) -> Vec<Option<Arc<RouteStale>>> {
        let out = self.routes.renew(
            table
                .routes()
                .iter()
                .map(|r| r.stale.as_ref().map(|_| (r.prefix.clone(), r.route_key()))),
            |(prefix, _)| RouteStale::new(prefix, &self.metrics),
            |_| {},
        );
        let kept: Vec<String> = table
            .routes()
            .iter()
            .filter(|r| r.stale.is_some())
            .map(|r| r.prefix.clone())
            .collect();
        self.cache
            .retain(|k, _| kept.iter().any(|p| route_of(k) == p.as_bytes()));
        self.bytes.set(self.cache.weight() as f64);
        out
    }

    /// Bytes stored now.
    pub fn bytes(&self) -> u64 {
        self.cache.weight()
    }

    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    fn remove(&self, key: &[u8]) {
        if let Some((_, group)) = self.cache.remove(key) {
            for e in &group.variants {
                e.route.count(Outcome::Invalidated);
            }
        }
        self.bytes.set(self.cache.weight() as f64);
    }

    fn insert(&self, key: Vec<u8>, entry: Entry) {
        if key.len() as u64 + entry.weight > self.max_weight {
            entry.route.count(Outcome::TooLarge);
            return;
        }
        let entry = Arc::new(entry);
        let old = self.cache.get(&key);
        let mut variants: Vec<Arc<Entry>> = old
            .as_ref()
            .map(|g| {
                g.variants
                    .iter()
                    .filter(|e| e.variant != entry.variant)
                    .cloned()
                    .collect()
            })
            .unwrap_or_default();
        // The path's oldest copies go first when it has too many, or too many bytes for a
        // shard (quick_cache would drop them all).
        let mut weight = key.len() as u64 + variants.iter().map(|e| e.weight).sum::<u64>();
        while !variants.is_empty()
            && (variants.len() >= MAX_VARIANTS || weight + entry.weight > self.max_weight)
        {
            let old = variants.remove(0);
            weight -= old.weight;
            old.route.count(Outcome::Evicted);
        }
        variants.push(entry.clone());
        if let Some(old) = old {
            old.replaced.store(true, Ordering::Relaxed);
        }
        let group = Group {
            variants,
            replaced: AtomicBool::new(false),
        };
        self.cache.insert(key, Arc::new(group));
        entry.route.count(Outcome::Stored);
        self.bytes.set(self.cache.weight() as f64);
    }

    fn find(&self, key: &[u8], variant: &[u8]) -> Option<Arc<Entry>> {
        self.cache
            .get(key)?
            .variants
            .iter()
            .find(|e| e.variant == variant)
            .cloned()
    }
}

/// The route's part of a store key (everything before the first NUL).
fn route_of(key: &[u8]) -> &[u8] {
    key.split(|&b| b == 0).next().unwrap_or_default()
}

/// Where one request's copy lives: the path's key and the variant within it.
pub struct Slot {
    key: Vec<u8>,
    variant: Vec<u8>,
    /// Without a subject: the anonymous copy (a write drops it too).
    anonymous: Option<Vec<u8>>,
}

/// What the stale phase knows of one request on a route with `stale_if_error`.
pub struct Plan {
    settings: Stale,
    route: Arc<RouteStale>,
    method: Method,
    /// `None`: the request may neither store nor be answered by a copy.
    slot: Option<Slot>,
    /// The request's `Accept-Encoding` values: a copy coded otherwise is not served to it.
    accept: Vec<HeaderValue>,
}

impl Plan {
    /// The plan of a request on a route with `stale_if_error` (`None` otherwise, and for
    /// methods that neither store nor invalidate: HEAD, OPTIONS).
    pub fn new<B>(
        route: &Route,
        counters: &Arc<RouteStale>,
        req: &Request<B>,
        host: Option<&str>,
        claims: Option<&Claims>,
    ) -> Option<Plan> {
        let settings = route.stale.as_ref()?;
        let method = req.method().clone();
        let safe = method == Method::GET;
        let unsafe_write = matches!(
            method,
            Method::POST | Method::PUT | Method::PATCH | Method::DELETE
        );
        if !safe && !unsafe_write {
            return None;
        }
        // Credentials: an `Authorization` header, a `Cookie` (a legacy monolith's session: its
        // pages may be personal without saying `private`), or a verified token from wherever
        // the route's provider reads it.
        let authorized = req.headers().contains_key(header::AUTHORIZATION)
            || req.headers().contains_key(header::COOKIE)
            || claims.is_some();
        let subject = match (&settings.per_user, claims) {
            (Some(claim), Some(c)) => crate::jwt::claim_text(c, claim),
            _ => None,
        };
        let base = |subject: &str| {
            let mut k = Vec::with_capacity(route.prefix.len() + 64);
            k.extend_from_slice(route.prefix.as_bytes());
            k.push(0);
            k.extend_from_slice(host.unwrap_or("").as_bytes());
            k.push(0);
            k.extend_from_slice(req.uri().path().as_bytes());
            k.push(0);
            k.extend_from_slice(subject.as_bytes());
            k
        };
        let slot = match (&subject, authorized) {
            (Some(s), _) => Some(Slot {
                key: base(s),
                variant: variant(settings, req),
                anonymous: Some(base("")),
            }),
            (None, true) if safe => {
                counters.count(Outcome::Authorization);
                None
            }
            // A write with credentials still changes what everyone's copy shows.
            (None, true) => Some(Slot {
                key: base(""),
                variant: Vec::new(),
                anonymous: None,
            }),
            (None, false) => Some(Slot {
                key: base(""),
                variant: variant(settings, req),
                anonymous: None,
            }),
        };
        let accept = req
            .headers()
            .get_all(header::ACCEPT_ENCODING)
            .iter()
            .cloned()
            .collect();
        Some(Plan {
            settings: settings.clone(),
            route: counters.clone(),
            method,
            slot,
            accept,
        })
    }

    /// The request presented credentials the plan could not see (a token that did not verify,
    /// forwarded in `observe` mode): a GET may then neither store nor be served an anonymous
    /// copy.
    pub fn presented_credentials(mut self) -> Self {
        let anonymous = self.slot.as_ref().is_some_and(|s| s.anonymous.is_none());
        if self.method == Method::GET && anonymous {
            self.slot = None;
            self.route.count(Outcome::Authorization);
        }
        self
    }

    /// Whether a failed exchange that the proxy would answer with `status` is one the route
    /// answers from its store: `connect` (a connection that could not be made, or broke before
    /// the answer's head: the proxy's 502), `timeout` (504), or a listed status (the backend's
    /// own 5xx, or 502 for an answer that was not HTTP).
    pub fn triggered(&self, status: StatusCode, connect: bool, timeout: bool) -> bool {
        self.method == Method::GET
            && self.slot.is_some()
            && ((connect && self.settings.on_connect)
                || (timeout && self.settings.on_timeout)
                || (!connect && !timeout && self.settings.on_status.contains(&status.as_u16())))
    }

    /// Whether the route answers this backend answer (a 5xx head) from its store instead: a
    /// status listed in `on`.
    pub fn replaces_answer(&self, status: StatusCode) -> bool {
        status.is_server_error() && self.triggered(status, false, false)
    }

    /// Whether the route answers this failure (no answer from the backends) from its store:
    /// `connect` (no connection could be made, or it broke before an answer's head: refused,
    /// reset, closed unanswered), `timeout`, or the status the proxy would answer. A broken
    /// connection is also the proxy's 502, so `on = ["502"]` still takes it; a malformed
    /// answer is only the proxy's 502.
    pub fn replaces_failure(&self, error: &ProxyError) -> bool {
        use crate::error::UpstreamErrorKind::{Connect, Reset};
        let status = error.status();
        let (connect, timeout) = match error {
            ProxyError::UpstreamUnavailable { kind, .. } => {
                (matches!(kind, Connect | Reset), false)
            }
            ProxyError::UpstreamTimeout { .. } => (false, true),
            _ => (false, false),
        };
        let broke = matches!(error, ProxyError::UpstreamUnavailable { kind: Reset, .. });
        self.triggered(status, connect, timeout) || (broke && self.triggered(status, false, false))
    }

    /// The stored copy, as a response, if there is one young enough.
    pub fn serve(&self, store: &StaleStore) -> Option<http::Response<Bytes>> {
        let slot = self.slot.as_ref()?;
        // A copy in a coding this client did not ask for (stored without `Vary:
        // accept-encoding`, or with a route `vary` that leaves it out) is no copy for it.
        let Some(entry) = store
            .find(&slot.key, &slot.variant)
            .filter(|e| decodable(&e.headers, &self.accept))
        else {
            self.route.count(Outcome::Miss);
            return None;
        };
        let age = entry.stored.elapsed();
        if age > entry.max_stale {
            self.route.count(Outcome::Expired);
            return None;
        }
        self.route.count(Outcome::Served);
        let mut resp = http::Response::new(entry.body.clone());
        *resp.headers_mut() = entry.headers.clone();
        let h = resp.headers_mut();
        // The origin's own `Age` (time spent in caches before us) plus ours (RFC 9111 §4.2.3).
        let upstream_age = h
            .get(header::AGE)
            .and_then(|v| v.to_str().ok()?.trim().parse::<u64>().ok())
            .unwrap_or(0);
        h.insert(
            header::AGE,
            HeaderValue::from(upstream_age.saturating_add(age.as_secs())),
        );
        h.insert(
            CACHE_STATUS,
            HeaderValue::from_static("strangler; fwd=stale"),
        );
        Some(resp)
    }

    /// After the answer's head: a 2xx write drops the path's copies; a GET's answer that may
    /// be stored gets a tee that stores it once it is complete.
    pub fn answered(
        self,
        store: &Arc<StaleStore>,
        status: StatusCode,
        headers: &HeaderMap,
    ) -> Option<Tee> {
        let slot = self.slot?;
        if self.method != Method::GET {
            if status.is_success() {
                store.remove(&slot.key);
                if let Some(anonymous) = &slot.anonymous {
                    store.remove(anonymous);
                }
            }
            return None;
        }
        let (max_stale, refusal) = storable(&self.settings, status, headers);
        if let Some(why) = refusal {
            self.route.count(why);
            return None;
        }
        let declared = headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
        if declared.is_some_and(|n| n > self.settings.max_entry.min(store.max_weight)) {
            self.route.count(Outcome::TooLarge);
            return None;
        }
        let mut kept = headers.clone();
        crate::headers::strip_hop_by_hop(&mut kept, false);
        let head_weight: u64 = kept
            .iter()
            .map(|(k, v)| (k.as_str().len() + v.len() + 32) as u64)
            .sum();
        let store2 = store.clone();
        let route = self.route.clone();
        let max = self.settings.max_entry.min(store.max_weight) as usize;
        Some(Tee::calling(
            max,
            &store.in_flight,
            move |captured| match captured {
                Some(Captured::Body(held)) => {
                    let weight = held.bytes.len() as u64 + head_weight + slot.variant.len() as u64;
                    store2.insert(
                        slot.key,
                        Entry {
                            variant: slot.variant,
                            headers: kept,
                            body: held.bytes.clone(),
                            stored: Instant::now(),
                            max_stale,
                            weight,
                            route,
                        },
                    );
                }
                Some(Captured::TooLarge) => route.count(Outcome::TooLarge),
                None => route.count(Outcome::Incomplete),
            },
        ))
    }
}

/// `Cache-Status` (RFC 9211).
const CACHE_STATUS: http::HeaderName = http::HeaderName::from_static("cache-status");

/// Whether an answer may be stored, and for how long it may be served stale: the route's
/// `max_stale`, or the origin's own `stale-if-error`.
fn storable(
    settings: &Stale,
    status: StatusCode,
    headers: &HeaderMap,
) -> (Duration, Option<Outcome>) {
    let mut max_stale = settings.max_stale;
    if status != StatusCode::OK {
        return (max_stale, Some(Outcome::Not200));
    }
    if headers.contains_key(header::SET_COOKIE) {
        return (max_stale, Some(Outcome::SetCookie));
    }
    for value in headers.get_all(header::CACHE_CONTROL) {
        let Ok(text) = value.to_str() else { continue };
        for directive in text.split(',') {
            let d = directive.trim().to_ascii_lowercase();
            let (name, arg) = d.split_once('=').unwrap_or((&d, ""));
            let why = match name.trim() {
                "no-store" => Some(Outcome::NoStore),
                "private" => Some(Outcome::Private),
                "no-cache" => Some(Outcome::NoCache),
                "must-revalidate" | "proxy-revalidate" | "s-maxage" => {
                    Some(Outcome::MustRevalidate)
                }
                "stale-if-error" => {
                    if let Ok(secs) = arg.trim().trim_matches('"').parse::<u64>() {
                        max_stale = Duration::from_secs(secs);
                    }
                    None
                }
                _ => None,
            };
            if why.is_some() {
                return (max_stale, why);
            }
        }
    }
    for value in headers.get_all(header::VARY) {
        let Ok(text) = value.to_str() else {
            return (max_stale, Some(Outcome::Vary));
        };
        for name in text.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            let allowed = name != "*"
                && settings
                    .vary
                    .iter()
                    .any(|v| v.as_str().eq_ignore_ascii_case(name));
            if !allowed {
                return (max_stale, Some(Outcome::Vary));
            }
        }
    }
    (max_stale, None)
}

/// Whether a client whose `Accept-Encoding` values are `accept` takes an answer with
/// `headers`: every content coding the answer applied must be acceptable (RFC 9110 §12.5.3:
/// listed with q > 0, or covered by `*`; `x-gzip` is `gzip`). A request without
/// `Accept-Encoding` takes only identity: RFC 9110 lets a server assume any coding, but a client
/// that sends none (curl, many scripts) usually decodes none, and a stale answer is no time to
/// find out.
fn decodable(headers: &HeaderMap, accept: &[HeaderValue]) -> bool {
    headers
        .get_all(header::CONTENT_ENCODING)
        .iter()
        .all(|value| match value.to_str() {
            Ok(text) => text
                .split(',')
                .map(str::trim)
                .filter(|c| !c.is_empty() && !c.eq_ignore_ascii_case("identity"))
                .all(|coding| accepts(accept, coding)),
            Err(_) => false,
        })
}

/// Whether `accept` (the `Accept-Encoding` values) takes the content coding `coding`.
fn accepts(accept: &[HeaderValue], coding: &str) -> bool {
    let canonical = |c: &str| {
        let c = c.trim().to_ascii_lowercase();
        match c.as_str() {
            "x-gzip" => "gzip".to_string(),
            "x-compress" => "compress".to_string(),
            _ => c,
        }
    };
    let want = canonical(coding);
    let mut star = false;
    for value in accept {
        let Ok(text) = value.to_str() else { continue };
        for item in text.split(',') {
            let mut parts = item.split(';');
            let name = canonical(parts.next().unwrap_or_default());
            let q = parts
                .find_map(|p| {
                    let (k, v) = p.split_once('=')?;
                    k.trim()
                        .eq_ignore_ascii_case("q")
                        .then(|| v.trim().parse::<f32>().unwrap_or(0.0))
                })
                .unwrap_or(1.0);
            if name == want {
                return q > 0.0;
            }
            if name == "*" {
                star = q > 0.0;
            }
        }
    }
    star
}

/// The variant of a path a request asks for: its query and the values of the route's `vary`
/// headers.
fn variant<B>(settings: &Stale, req: &Request<B>) -> Vec<u8> {
    let mut v = req.uri().query().unwrap_or("").as_bytes().to_vec();
    for name in &settings.vary {
        v.push(0);
        for value in req.headers().get_all(name) {
            v.extend_from_slice(value.as_bytes());
            v.push(b',');
        }
    }
    v
}

#[cfg(test)]
mod tests;

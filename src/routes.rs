//! The route table: a validated, immutable snapshot of routes.toml, and the one question the
//! request path asks of it: `lookup(method, host, path)`. Pure data and pure functions: no IO,
//! no clocks, no locks. A reload builds a new table and swaps it in whole (see `proxy::State`).
//!
//! Lookup is segment-aware longest-prefix match over a hash index of normalized prefixes: a
//! request path with `d` segments costs at most `d + 1` hash probes, whatever the number of
//! routes. Among routes with the same prefix, those with more filters (`methods`, `host`) are
//! tried first, then file order; a request that fails a route's filters falls through to the
//! next candidate, then to shorter prefixes.

pub mod auth;
pub mod diff;
pub mod events;
mod key;
pub mod limits;

use std::borrow::Cow;
use std::collections::HashMap;
use std::fmt;
use std::net::IpAddr;
use std::time::Duration;

use http::header::{HeaderMap, HeaderName};
use http::uri::{Authority, Scheme};
use http::Method;

use crate::jwt::Claims;

pub use auth::{KeySource, Mode, Provider, ProviderId, RouteAuth, TokenSource};
pub use key::{is_cookie_name, RequestKey, EXPECTED as KEY_EXPECTED};
pub use limits::{RateLimit, Stale};

/// A backend of one table: its position in [`RouteTable::backends`], and of its upstream in
/// a snapshot. Only meaningful with the table it came from (a reload renumbers).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BackendId(usize);

/// A route of one table: its position in [`RouteTable::routes`], and of its runtime in a
/// snapshot. Only meaningful with the table it came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RouteId(usize);

impl BackendId {
    pub const fn new(index: usize) -> Self {
        BackendId(index)
    }

    pub const fn index(self) -> usize {
        self.0
    }
}

impl RouteId {
    pub const fn new(index: usize) -> Self {
        RouteId(index)
    }

    pub const fn index(self) -> usize {
        self.0
    }
}

/// Values by id, in id order: a backend's upstream, a route's runtime. Indexed by the id
/// type only, so a route's id can never pick a backend's value.
#[derive(Debug, Clone, PartialEq)]
pub struct ById<I, T> {
    items: Vec<T>,
    id: std::marker::PhantomData<fn(I)>,
}

impl<I, T> ById<I, T> {
    pub fn iter(&self) -> std::slice::Iter<'_, T> {
        self.items.iter()
    }

    pub fn len(&self) -> usize {
        self.items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    pub fn as_slice(&self) -> &[T] {
        &self.items
    }
}

impl<I, T> FromIterator<T> for ById<I, T> {
    fn from_iter<It: IntoIterator<Item = T>>(iter: It) -> Self {
        ById {
            items: iter.into_iter().collect(),
            id: std::marker::PhantomData,
        }
    }
}

impl<T> std::ops::Index<BackendId> for ById<BackendId, T> {
    type Output = T;
    fn index(&self, id: BackendId) -> &T {
        &self.items[id.0]
    }
}

impl<T> std::ops::Index<RouteId> for ById<RouteId, T> {
    type Output = T;
    fn index(&self, id: RouteId) -> &T {
        &self.items[id.0]
    }
}

/// An upstream as declared under `[backends.NAME]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Backend {
    pub name: String,
    /// The URL as written, for display.
    pub url: String,
    pub scheme: Scheme,
    pub authority: Authority,
    /// Path of the backend URL without its trailing `/` (`""` when the URL has none). The
    /// request path is appended to it: `http://users:3001/v2` + `/api/users/7` ->
    /// `/v2/api/users/7`.
    pub base_path: String,
    pub legacy: bool,
    pub connect_timeout: Duration,
    pub timeout: Duration,
    /// Where requests go: the URL's host:port unless `endpoints` lists several.
    pub endpoints: Vec<Authority>,
    /// Attempts after the first, on another endpoint where there is one, for the failures
    /// in `retry_on` (inside the backend's retry budget).
    pub retries: u32,
    /// The failures a request is sent again after (`retry_on`).
    pub retry_on: RetryOn,
    pub health: Option<HealthCheck>,
    /// HTTP/1.1, or HTTP/2 (ALPN `h2` over TLS, prior knowledge over cleartext).
    pub protocol: Protocol,
    /// How an `https://` backend is connected and verified.
    pub tls: Option<crate::tls::ClientTls>,
    /// Each endpoint's connection bounds and the line of requests waiting for one.
    pub connections: ConnLimits,
}

/// The bounds on one endpoint's HTTP/1.1 connections and on the requests waiting for one
/// (`max_connections`, `max_connecting`, `max_waiting`, `wait_timeout`; see
/// `crate::upstream::gate`). An HTTP/2 backend has one connection per endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnLimits {
    /// Connections open (busy, idle or being opened) at most.
    pub max_connections: usize,
    /// Connection attempts under way at most.
    pub max_connecting: usize,
    /// Requests waiting for a connection at most; past it they are refused (503).
    pub max_waiting: usize,
    /// How long a request waits for a connection before it is refused (503).
    pub wait_timeout: Duration,
}

/// Room for far more than a client needs: only a storm meets these (Envoy's circuit
/// breakers default to 1,024 connections; the line holds as many requests as the default
/// `max_connections` of the listener lets in).
impl Default for ConnLimits {
    fn default() -> Self {
        ConnLimits {
            max_connections: 1024,
            max_connecting: 64,
            max_waiting: 10_000,
            wait_timeout: Duration::from_secs(5),
        }
    }
}

/// A failure a request may be sent again after, named as Envoy's `retry_on` names them
/// (nginx's `proxy_next_upstream error` covers all three).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryCase {
    /// No connection could be made: the request never left, so any method may go again.
    ConnectFailure,
    /// An HTTP/2 backend refused the stream (`REFUSED_STREAM`): it did not process the
    /// request, so any method may go again.
    RefusedStream,
    /// The connection broke after the request was written and before the answer's head
    /// (reset, closed, an incomplete head): idempotent methods only, unless the route says
    /// `retry_non_idempotent = true`.
    Reset,
}

impl RetryCase {
    pub const ALL: [RetryCase; 3] = [
        RetryCase::ConnectFailure,
        RetryCase::RefusedStream,
        RetryCase::Reset,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RetryCase::ConnectFailure => "connect-failure",
            RetryCase::RefusedStream => "refused-stream",
            RetryCase::Reset => "reset",
        }
    }

    pub fn parse(text: &str) -> Option<RetryCase> {
        RetryCase::ALL.into_iter().find(|c| c.as_str() == text)
    }
}

/// The set of [`RetryCase`]s a backend retries on (default: all of them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryOn([bool; 3]);

impl RetryOn {
    pub const ALL: RetryOn = RetryOn([true; 3]);
    pub const NONE: RetryOn = RetryOn([false; 3]);

    pub fn with(mut self, case: RetryCase) -> Self {
        self.0[case as usize] = true;
        self
    }

    pub fn contains(self, case: RetryCase) -> bool {
        self.0[case as usize]
    }

    /// The cases, as written in routes.toml.
    pub fn names(self) -> Vec<&'static str> {
        RetryCase::ALL
            .into_iter()
            .filter(|&c| self.contains(c))
            .map(RetryCase::as_str)
            .collect()
    }
}

impl Default for RetryOn {
    fn default() -> Self {
        RetryOn::ALL
    }
}

/// The HTTP version spoken to a backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Http1,
    H2,
}

impl Protocol {
    /// As the HTTP version is usually written: `HTTP/1.1`, `HTTP/2`.
    pub fn version_text(self) -> &'static str {
        match self {
            Protocol::Http1 => "HTTP/1.1",
            Protocol::H2 => "HTTP/2",
        }
    }
}

/// As in routes.toml's `protocol`: `http1`, `h2`.
impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Http1 => "http1",
            Protocol::H2 => "h2",
        })
    }
}

/// Active health checks of a backend's endpoints.
#[derive(Debug, Clone, PartialEq)]
pub struct HealthCheck {
    pub path: String,
    pub interval: Duration,
}

/// Who gets a copy of the request.
#[derive(Debug, Clone, PartialEq)]
pub struct Shadow {
    pub backend: BackendId,
    /// Share of eligible requests mirrored, 0..=100.
    pub percent: f64,
    pub methods: Vec<Method>,
}

/// Who stays on which side of a canary: a key read from the request, or a random draw per
/// request.
#[derive(Debug, Clone, PartialEq)]
pub enum Sticky {
    /// Per-request random.
    Random,
    /// The same key, the same side (`claim:sub`: a user by identity; never `route`).
    Key(RequestKey),
}

/// As in routes.toml's `sticky`: `random`, `ip`, `header:NAME`, `cookie:NAME`, `claim:NAME`.
impl fmt::Display for Sticky {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Sticky::Random => f.write_str("random"),
            Sticky::Key(k) => k.fmt(f),
        }
    }
}

/// A sticky slice of traffic answered by another backend.
#[derive(Debug, Clone, PartialEq)]
pub struct Canary {
    pub backend: BackendId,
    pub percent: f64,
    pub sticky: Sticky,
}

impl Canary {
    /// The request's sticky key, `None` when it lacks one (it then stays on the route's
    /// backend, so users without the key never flap between the two) or the canary is random.
    /// `client` is the client's address (after `trusted_proxies`), `claims` the verified
    /// token's.
    pub fn sticky_key<'a>(
        &self,
        headers: &'a HeaderMap,
        client: IpAddr,
        claims: Option<&Claims>,
    ) -> Option<Cow<'a, [u8]>> {
        match &self.sticky {
            Sticky::Random => None,
            Sticky::Key(key) => key.read(headers, client, claims),
        }
    }
}

/// `[routes.compare]`, with defaults filled in.
#[derive(Debug, Clone, PartialEq)]
pub struct Compare {
    /// Compiled at load: the request path never parses a pattern.
    pub ignore: Vec<crate::compare::Pattern>,
    pub headers: Vec<HeaderName>,
    pub noise: bool,
    pub max_body: u64,
    pub tolerance: f64,
    pub min_comparisons: u64,
    pub max_mismatch_rate: f64,
}

/// `[routes.guard]`, with defaults filled in.
#[derive(Debug, Clone, PartialEq)]
pub struct Guard {
    pub max_error_rate: f64,
    pub window: Duration,
    pub min_requests: u64,
    pub to: BackendId,
}

/// One `[[routes]]` entry, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct Route {
    /// As written in routes.toml: the `route` metric label and what operators see.
    pub prefix: String,
    /// Normalized (no trailing `/` except for `/` itself): the index key.
    pub key: String,
    pub methods: Option<Vec<Method>>,
    /// Lower-case host name without port.
    pub host: Option<String>,
    pub backend: BackendId,
    pub shadow: Option<Shadow>,
    pub canary: Option<Canary>,
    pub fallback: Option<BackendId>,
    pub compare: Compare,
    pub guard: Option<Guard>,
    /// Upgrade protocols besides WebSocket (lower case) this route tunnels; never `h2c`.
    pub upgrades: Vec<String>,
    /// Whether a request of any method is sent again after a `reset` (default: idempotent
    /// methods only).
    pub retry_non_idempotent: bool,
    /// Who may call this route (`auth = ...`).
    pub auth: Option<RouteAuth>,
    /// `rate_limit` windows, each checked (empty: no limit).
    pub rate_limits: Vec<RateLimit>,
    /// `stale_if_error`: answers kept to serve when the backends fail.
    pub stale: Option<Stale>,
    /// `events`: what this route publishes to `[events]`.
    pub events: Option<events::RouteEvents>,
    /// Line of the entry in the file, for messages.
    pub line: usize,
}

impl Route {
    /// Number of filters: routes with more are tried first among equal prefixes.
    fn specificity(&self) -> u8 {
        u8::from(self.methods.is_some()) + u8::from(self.host.is_some())
    }

    /// The backend that answers: the canary's when the request's bucket is in the canary,
    /// otherwise the route's.
    pub fn pick_backend(
        &self,
        headers: &HeaderMap,
        client: IpAddr,
        claims: Option<&Claims>,
    ) -> BackendId {
        let Some(canary) = &self.canary else {
            return self.backend;
        };
        let bucket = match canary.sticky {
            Sticky::Random => Some(fastrand::u32(..10_000)),
            _ => canary
                .sticky_key(headers, client, claims)
                .map(|key| canary_bucket(&key)),
        };
        match bucket {
            Some(b) if in_canary(b, canary.percent) => canary.backend,
            _ => self.backend,
        }
    }

    /// Whether this route tunnels an upgrade to `protocols` (the `Upgrade` header's values):
    /// WebSocket always, others only when listed in `upgrades`, `h2c` never (an h2c upgrade
    /// would carry everything after it past routing, limits and logs). Every protocol offered
    /// must be allowed.
    pub fn allows_upgrade<'a>(&self, mut protocols: impl Iterator<Item = &'a [u8]>) -> bool {
        protocols.all(|value| {
            value
                .split(|&b| b == b',')
                .map(|p| p.trim_ascii())
                .filter(|p| !p.is_empty())
                .all(|p| {
                    let name = p.split(|&b| b == b'/').next().unwrap_or_default();
                    name.eq_ignore_ascii_case(b"websocket")
                        || self
                            .upgrades
                            .iter()
                            .any(|u| name.eq_ignore_ascii_case(u.as_bytes()))
                })
        })
    }

    /// Whether the method and host filters let this request in.
    pub fn accepts(&self, method: &Method, host: Option<&str>) -> bool {
        let method_ok = self.methods.as_ref().is_none_or(|m| m.contains(method));
        let host_ok = match (&self.host, host) {
            (None, _) => true,
            (Some(want), Some(got)) => want.eq_ignore_ascii_case(got),
            (Some(_), None) => false,
        };
        method_ok && host_ok
    }

    /// True when every request this route accepts is also accepted by `other`'s filters.
    fn filters_within(&self, other: &Route) -> bool {
        let methods = match (&other.methods, &self.methods) {
            (None, _) => true,
            (Some(_), None) => false,
            (Some(o), Some(s)) => s.iter().all(|m| o.contains(m)),
        };
        let host = match (&other.host, &self.host) {
            (None, _) => true,
            (Some(o), Some(s)) => o == s,
            (Some(_), None) => false,
        };
        methods && host
    }

    /// What the route matches: its normalized prefix and filters.
    pub fn route_key(&self) -> RouteKey {
        let methods = self.methods.as_ref().map(|m| {
            let mut names: Vec<String> = m.iter().map(|m| m.as_str().to_string()).collect();
            names.sort_unstable();
            names
        });
        RouteKey {
            prefix: self.key.clone(),
            methods,
            host: self.host.clone(),
        }
    }

    /// [`RouteKey`] as text, for duplicate messages and diffs.
    pub fn identity(&self) -> String {
        self.route_key().to_string()
    }
}

/// What a route matches: normalized prefix plus filters (methods sorted). Two entries with the
/// same key are duplicates; traffic counters follow a route by it across reloads, whatever
/// else of its entry changes.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RouteKey {
    prefix: String,
    methods: Option<Vec<String>>,
    host: Option<String>,
}

impl fmt::Display for RouteKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.prefix)?;
        if let Some(m) = &self.methods {
            write!(f, " methods={}", m.join(","))?;
        }
        if let Some(h) = &self.host {
            write!(f, " host={h}")?;
        }
        Ok(())
    }
}

/// A route entry as written, apart from where it stands in the file and from every other
/// entry: its backends by name, not by index. State that belongs to one entry and must
/// outlive reloads that leave it alone (a guard's trip) is keyed by this; adding, removing or
/// reordering other routes or backends does not change it, editing the entry itself does.
#[derive(Debug, Clone, PartialEq)]
pub struct EntryKey {
    /// The entry with its line and backend indices blanked.
    route: Route,
    /// Names of the backend, shadow, canary, fallback, guard target and auth provider, in
    /// that order.
    names: [Option<String>; 6],
}

impl EntryKey {
    /// The entry, with its line and backend indices blanked.
    pub fn route(&self) -> &Route {
        &self.route
    }

    /// The name of the backend a guard sends traffic to.
    pub fn guard_to(&self) -> Option<&str> {
        self.names[4].as_deref()
    }
}

// Validation rejects NaN in every float of a route, so equality is an equivalence.
impl Eq for EntryKey {}

impl std::hash::Hash for EntryKey {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        // A subset of what `eq` compares: equal keys hash alike.
        self.route.key.hash(state);
        self.route.host.hash(state);
        self.names.hash(state);
    }
}

/// The migration stage of a route, derived from its fields and never stored.
#[derive(Debug, Clone, PartialEq)]
pub enum Stage {
    Legacy,
    Shadowing,
    Canary(f64),
    CutOver,
    ReverseShadow,
    /// A new backend answers and another new backend shadows it (e.g. v2 behind v1).
    CutOverShadowed(String),
}

impl fmt::Display for Stage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Stage::Legacy => f.write_str("legacy"),
            Stage::Shadowing => f.write_str("shadowing"),
            Stage::Canary(p) => write!(f, "canary {}%", format_percent(*p)),
            Stage::CutOver => f.write_str("cut over"),
            Stage::ReverseShadow => f.write_str("cut over, reverse shadow"),
            Stage::CutOverShadowed(by) => write!(f, "cut over, shadowed by {by}"),
        }
    }
}

/// `10` for 10.0, `2.5` for 2.5.
pub fn format_percent(p: f64) -> String {
    if p.fract() == 0.0 {
        format!("{p:.0}")
    } else {
        format!("{p}")
    }
}

/// The validated, immutable route table.
#[derive(Debug, Clone)]
pub struct RouteTable {
    backends: Vec<Backend>,
    routes: Vec<Route>,
    /// Normalized prefix -> route ids in precedence order.
    index: HashMap<String, Vec<RouteId>>,
    legacy: Option<BackendId>,
    providers: Vec<Provider>,
    /// Every header some provider fills from claims: client-sent copies are stripped on
    /// every route, with or without auth.
    claim_headers: Vec<HeaderName>,
}

impl RouteTable {
    /// Builds the table and its index. Callers (`validate`) have already checked references.
    pub(crate) fn new(
        backends: Vec<Backend>,
        routes: Vec<Route>,
        legacy: Option<BackendId>,
        providers: Vec<Provider>,
    ) -> Self {
        let mut index: HashMap<String, Vec<RouteId>> = HashMap::new();
        for (id, route) in routes.iter().enumerate() {
            index
                .entry(route.key.clone())
                .or_default()
                .push(RouteId(id));
        }
        for ids in index.values_mut() {
            // Stable: equal specificity keeps file order.
            ids.sort_by_key(|&id| std::cmp::Reverse(routes[id.0].specificity()));
        }
        let mut claim_headers: Vec<HeaderName> = providers
            .iter()
            .flat_map(|p| p.claims_to_headers.iter().map(|(h, _)| h.clone()))
            .collect();
        claim_headers.sort_unstable_by(|a, b| a.as_str().cmp(b.as_str()));
        claim_headers.dedup();
        RouteTable {
            backends,
            routes,
            index,
            legacy,
            providers,
            claim_headers,
        }
    }

    /// The `[auth.NAME]` providers, in file order.
    pub fn providers(&self) -> &[Provider] {
        &self.providers
    }

    pub fn provider(&self, id: ProviderId) -> &Provider {
        &self.providers[id]
    }

    /// Headers made from claims by some provider, sorted.
    pub fn claim_headers(&self) -> &[HeaderName] {
        &self.claim_headers
    }

    pub fn backends(&self) -> &[Backend] {
        &self.backends
    }

    pub fn backend(&self, id: BackendId) -> &Backend {
        &self.backends[id.0]
    }

    /// Every backend's id, in file order.
    pub fn backend_ids(&self) -> impl Iterator<Item = BackendId> {
        (0..self.backends.len()).map(BackendId)
    }

    pub fn routes(&self) -> &[Route] {
        &self.routes
    }

    pub fn route(&self, id: RouteId) -> &Route {
        &self.routes[id.0]
    }

    /// Every route's id, in file order.
    pub fn route_ids(&self) -> impl Iterator<Item = RouteId> {
        (0..self.routes.len()).map(RouteId)
    }

    pub fn legacy(&self) -> Option<BackendId> {
        self.legacy
    }

    pub fn backend_id(&self, name: &str) -> Option<BackendId> {
        self.backends
            .iter()
            .position(|b| b.name == name)
            .map(BackendId)
    }

    /// The identity of route `id`'s entry across reloads (see [`EntryKey`]).
    pub fn entry_key(&self, id: RouteId) -> EntryKey {
        let mut route = self.routes[id.0].clone();
        let name = |b: BackendId| Some(self.backends[b.0].name.clone());
        let names = [
            name(route.backend),
            route.shadow.as_ref().and_then(|s| name(s.backend)),
            route.canary.as_ref().and_then(|c| name(c.backend)),
            route.fallback.and_then(name),
            route.guard.as_ref().and_then(|g| name(g.to)),
            route
                .auth
                .as_ref()
                .map(|a| self.providers[a.provider].name.clone()),
        ];
        route.line = 0;
        route.backend = BackendId(0);
        route.fallback = route.fallback.map(|_| BackendId(0));
        if let Some(s) = route.shadow.as_mut() {
            s.backend = BackendId(0);
        }
        if let Some(c) = route.canary.as_mut() {
            c.backend = BackendId(0);
        }
        if let Some(g) = route.guard.as_mut() {
            g.to = BackendId(0);
        }
        if let Some(a) = route.auth.as_mut() {
            a.provider = 0;
        }
        EntryKey { route, names }
    }

    /// The route that answers `method host path`, if any. `host` is the request's host
    /// without port; `path` is the URI path without query.
    pub fn lookup(&self, method: &Method, host: Option<&str>, path: &str) -> Option<RouteId> {
        let mut candidate = path;
        loop {
            if let Some(ids) = self.index.get(candidate) {
                if let Some(&id) = ids
                    .iter()
                    .find(|&&id| self.routes[id.0].accepts(method, host))
                {
                    return Some(id);
                }
            }
            candidate = match candidate.rfind('/') {
                Some(0) if candidate.len() > 1 => "/",
                Some(i) if i > 0 => &candidate[..i],
                _ => return None,
            };
        }
    }

    /// The stage of a route, derived from its backend, shadow and canary.
    pub fn stage(&self, id: RouteId) -> Stage {
        let route = &self.routes[id.0];
        if let Some(c) = route.canary.as_ref().filter(|c| c.percent > 0.0) {
            return Stage::Canary(c.percent);
        }
        let is_legacy = |b: BackendId| self.legacy == Some(b);
        match (is_legacy(route.backend), &route.shadow) {
            (true, None) => Stage::Legacy,
            (true, Some(_)) => Stage::Shadowing,
            (false, None) => Stage::CutOver,
            (false, Some(s)) if is_legacy(s.backend) => Stage::ReverseShadow,
            (false, Some(s)) => Stage::CutOverShadowed(self.backends[s.backend.0].name.clone()),
        }
    }

    /// Routes that can never match because an earlier route with the same prefix accepts
    /// everything they accept: `(hidden, by)`.
    pub fn hidden_routes(&self) -> Vec<(RouteId, RouteId)> {
        let mut hidden = Vec::new();
        for ids in self.index.values() {
            for (i, &id) in ids.iter().enumerate() {
                if let Some(&by) = ids[..i]
                    .iter()
                    .find(|&&a| self.routes[id.0].filters_within(&self.routes[a.0]))
                {
                    hidden.push((id, by));
                }
            }
        }
        hidden.sort_unstable();
        hidden
    }

    /// Whether some route without filters catches `/`.
    pub fn has_catch_all(&self) -> bool {
        self.index
            .get("/")
            .is_some_and(|ids| ids.iter().any(|&id| self.routes[id.0].specificity() == 0))
    }
}

/// Canary bucket of a sticky key: a stable hash (FNV-1a, 64 bit) mod 10,000, so the same key
/// lands in the same bucket on every replica and across restarts. A request is in the canary
/// when `bucket < percent * 100`: raising the percent only ever adds buckets.
pub fn canary_bucket(key: &[u8]) -> u32 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in key {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    // Fold the high bits in: FNV's low bits are weak for short keys.
    h ^= h >> 32;
    (h % 10_000) as u32
}

/// Whether `bucket` (0..10,000) falls in a canary of `percent` (0..=100).
pub fn in_canary(bucket: u32, percent: f64) -> bool {
    f64::from(bucket) < percent * 100.0
}

#[cfg(test)]
mod tests;

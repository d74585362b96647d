//! `GET /routes` as types. Fields are declared in alphabetical order, the order the JSON had
//! when it was built as a `serde_json::Value` (whose objects sort their keys), so the bytes
//! stay the same; fields that only some routes have are left out, not `null`.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::time::SystemTime;

use serde::Serialize;

use crate::reload::Reloader;
use crate::routes::format_percent;
use crate::state::Active;
use crate::traffic::TrafficView;

#[derive(Serialize)]
pub struct RoutesView {
    /// `[auth.NAME]` providers (left out when there are none).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    auth_providers: Vec<ProviderView>,
    backends: Vec<BackendView>,
    /// The public listener's client connections.
    clients: ClientsView,
    coverage: CoverageView,
    /// `[events]`, when configured: the broker link and what was published, dropped, failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    events: Option<serde_json::Value>,
    generation: u64,
    last_reload: ReloadView,
    latency_bounds_ms: &'static [f64],
    loaded_at: String,
    /// `[ratelimit_store]`, when configured.
    #[serde(skip_serializing_if = "Option::is_none")]
    ratelimit_store: Option<StoreView>,
    routes: Vec<RouteView>,
    source: String,
    source_sha256: String,
    /// The stale-if-error store, when some route keeps copies.
    #[serde(skip_serializing_if = "Option::is_none")]
    stale_store: Option<StaleStoreView>,
}

#[derive(Serialize)]
struct ClientsView {
    accepted: u64,
    backlog: u32,
    max_connections: usize,
    open: usize,
}

#[derive(Serialize)]
struct StoreView {
    connected: bool,
    on_error: String,
    timeout: String,
    url_env: String,
}

#[derive(Serialize)]
struct StaleStoreView {
    bytes: u64,
    capacity: u64,
}

/// One `rate_limit` window of a route.
#[derive(Serialize)]
struct WindowView {
    burst: u64,
    key: String,
    /// Keys tracked on this replica now.
    keys: usize,
    limit: u64,
    max_keys: usize,
    mode: &'static str,
    name: String,
    /// Decisions since start by outcome.
    outcomes: BTreeMap<&'static str, u64>,
    per: String,
    scope: &'static str,
}

/// A route's `stale_if_error`, with its outcome counts since start.
#[derive(Serialize)]
struct StaleView {
    max_entry: u64,
    max_stale: String,
    on: Vec<String>,
    outcomes: BTreeMap<&'static str, u64>,
    per_user: Option<String>,
    vary: Vec<String>,
}

#[derive(Serialize)]
struct CoverageView {
    /// Share of requests answered by a non-legacy backend; `null` before the first.
    requests: Option<f64>,
    requests_answered: u64,
    /// Share of routes answered by a non-legacy backend (a canary counts for its percent).
    routes: f64,
}

#[derive(Serialize)]
struct ReloadView {
    at: String,
    error: Option<String>,
    ok: bool,
}

#[derive(Serialize)]
struct BackendView {
    /// Each endpoint's connection bounds (HTTP/1.1).
    connection_limits: ConnLimitsView,
    endpoints: Vec<EndpointView>,
    health: Option<HealthView>,
    legacy: bool,
    name: String,
    protocol: String,
    retries: u32,
    retry_on: Vec<&'static str>,
    tls: Option<TlsView>,
    url: String,
}

#[derive(Serialize)]
struct ConnLimitsView {
    max_connections: usize,
    max_connecting: usize,
    max_waiting: usize,
    wait_timeout: String,
}

#[derive(Serialize)]
struct EndpointView {
    address: String,
    ejected: bool,
    /// While ejected: the kind of failure that ejected it (after 3 in a row) and until when.
    #[serde(skip_serializing_if = "Option::is_none")]
    ejected_after: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    ejected_until: Option<String>,
    /// Ejections in a row without an answer in between (each doubles the backoff).
    ejections: u32,
    healthy: bool,
    idle: usize,
    in_flight: usize,
    /// HTTP/1.1 connections open or being opened, attempts under way, requests waiting.
    connections: usize,
    connecting: usize,
    waiting: usize,
    /// Requests refused a connection (503 `upstream_busy`): the line was full, or they
    /// waited `wait_timeout`.
    refused_line_full: u64,
    refused_wait_timeout: u64,
}

#[derive(Serialize)]
struct HealthView {
    interval: String,
    path: String,
}

#[derive(Serialize)]
struct TlsView {
    ca: &'static str,
    client_certificate: bool,
    server_name: String,
}

/// An auth provider with the live state of its keys and caches.
#[derive(Serialize)]
struct ProviderView {
    algorithms: Vec<String>,
    audiences: Vec<String>,
    cached_tokens: usize,
    claims_to_headers: BTreeMap<String, String>,
    clock_skew: String,
    forward_token: bool,
    issuer: String,
    /// The `kid`s of the keys in use (a `jwks_url` provider: as last fetched).
    key_ids: Vec<String>,
    keys: String,
    keys_loaded: usize,
    name: String,
    realm: String,
    token_from: Vec<String>,
}

/// A route's `auth`, with its outcome counts since start (carried across reloads).
#[derive(Serialize)]
struct RouteAuthView {
    mode: String,
    outcomes: BTreeMap<&'static str, u64>,
    provider: String,
    require: BTreeMap<String, Vec<String>>,
}

/// A route. The comparison figures (`compared` … `ready_to_cut_over`) are there for
/// shadowed routes only.
#[derive(Serialize)]
struct RouteView {
    #[serde(skip_serializing_if = "Option::is_none")]
    auth: Option<RouteAuthView>,
    backend: String,
    canary: Option<CanaryView>,
    #[serde(skip_serializing_if = "Option::is_none")]
    compared: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    events: Option<RouteEventsView>,
    fallback: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    gate: Option<GateView>,
    guard: Option<GuardView>,
    guard_tripped: bool,
    host: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    learned_noise: Option<Vec<String>>,
    line: usize,
    methods: Option<Vec<String>>,
    /// `null` before the first comparison.
    #[serde(skip_serializing_if = "Option::is_none")]
    mismatch_rate: Option<Option<f64>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    mismatched: Option<u64>,
    prefix: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    rate_limits: Vec<WindowView>,
    #[serde(skip_serializing_if = "Option::is_none")]
    ready_to_cut_over: Option<bool>,
    shadow: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    shadow_methods: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    shadow_percent: Option<f64>,
    /// Shadowed exchanges not compared, by reason (every reason listed).
    #[serde(skip_serializing_if = "Option::is_none")]
    skipped: Option<BTreeMap<&'static str, u64>>,
    stage: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    stale: Option<StaleView>,
    traffic: TrafficView,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    upgrades: Vec<String>,
}

/// A route's `events`.
#[derive(Serialize)]
struct RouteEventsView {
    body: usize,
    kinds: Vec<&'static str>,
    query: bool,
    /// The routing keys its events are published with (`write.api.users`).
    routing_keys: Vec<String>,
    sample: f64,
}

/// A shadowed route's comparison figures.
struct Comparison {
    compared: u64,
    gate: GateView,
    learned_noise: Vec<String>,
    mismatch_rate: Option<f64>,
    mismatched: u64,
    ready_to_cut_over: bool,
    skipped: BTreeMap<&'static str, u64>,
}

#[derive(Serialize)]
struct GateView {
    max_mismatch_rate: f64,
    min_comparisons: u64,
}

#[derive(Serialize)]
struct CanaryView {
    backend: String,
    percent: f64,
    sticky: String,
}

#[derive(Serialize)]
struct GuardView {
    max_error_rate: f64,
    min_requests: u64,
    to: String,
    window: String,
}

fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

impl RoutesView {
    pub fn new(reloader: &Reloader) -> Self {
        let state = &reloader.state;
        let active = state.active();
        let last = reloader.last();
        let (answered, by_new) = state.coverage();
        RoutesView {
            auth_providers: active
                .table
                .providers()
                .iter()
                .zip(&active.providers)
                .map(|(p, rt)| ProviderView::new(p, rt))
                .collect(),
            backends: active
                .table
                .backend_ids()
                .map(|id| BackendView::new(&active, id))
                .collect(),
            clients: ClientsView {
                accepted: state.clients.accepted.load(Ordering::Relaxed),
                backlog: state.clients.backlog.load(Ordering::Relaxed),
                max_connections: state.settings.max_connections,
                open: state.clients.open.load(Ordering::Relaxed),
            },
            coverage: CoverageView {
                requests: (answered > 0).then(|| by_new as f64 / answered as f64),
                requests_answered: answered,
                routes: route_coverage(&active),
            },
            events: state
                .settings
                .events
                .as_ref()
                .map(|e| match state.events() {
                    Some(events) => events.to_json(),
                    None => serde_json::json!({
                        "enabled": false,
                        "reason": format!("{} is unset: no broker to publish to", e.url_env),
                        "url_env": e.url_env,
                    }),
                }),
            generation: active.generation,
            last_reload: ReloadView {
                at: rfc3339(last.at),
                error: last.error,
                ok: last.ok,
            },
            latency_bounds_ms: &crate::traffic::LATENCY_BOUNDS_MS,
            loaded_at: rfc3339(active.loaded_at),
            ratelimit_store: state.settings.ratelimit_store.as_ref().map(|s| StoreView {
                connected: state
                    .registries
                    .limits
                    .store()
                    .is_some_and(|st| st.connected()),
                on_error: s.on_error.to_string(),
                timeout: humantime::format_duration(s.timeout).to_string(),
                url_env: s.url_env.clone(),
            }),
            routes: active
                .table
                .route_ids()
                .map(|id| RouteView::new(&active, id))
                .collect(),
            source: state.path.display().to_string(),
            source_sha256: active.sha256.clone(),
            stale_store: active
                .table
                .routes()
                .iter()
                .any(|r| r.stale.is_some())
                .then(|| StaleStoreView {
                    bytes: state.registries.stale.bytes(),
                    capacity: state.registries.stale.capacity(),
                }),
        }
    }
}

impl BackendView {
    /// A backend with the live state of its endpoints.
    fn new(active: &Active, id: crate::routes::BackendId) -> Self {
        let b = active.table.backend(id);
        let l = b.connections;
        BackendView {
            connection_limits: ConnLimitsView {
                max_connections: l.max_connections,
                max_connecting: l.max_connecting,
                max_waiting: l.max_waiting,
                wait_timeout: humantime::format_duration(l.wait_timeout).to_string(),
            },
            endpoints: active.upstreams[id]
                .endpoints
                .iter()
                .map(|e| {
                    let ejection = e.ejection();
                    let (connections, connecting, waiting) = e.connections();
                    let [refused_line_full, refused_wait_timeout] = e.refused();
                    EndpointView {
                        refused_line_full,
                        refused_wait_timeout,
                        connections,
                        connecting,
                        waiting,
                        address: e.authority.to_string(),
                        ejected: ejection.is_some(),
                        ejected_after: ejection.map(|(_, kind)| kind.as_str()),
                        ejected_until: ejection
                            .map(|(until, _)| humantime::format_rfc3339_millis(until).to_string()),
                        ejections: e.ejections(),
                        healthy: e.healthy(),
                        idle: e.idle(),
                        in_flight: e.in_flight(),
                    }
                })
                .collect(),
            health: b.health.as_ref().map(|h| HealthView {
                interval: humantime::format_duration(h.interval).to_string(),
                path: h.path.clone(),
            }),
            legacy: b.legacy,
            name: b.name.clone(),
            protocol: b.protocol.to_string(),
            retries: b.retries,
            retry_on: b.retry_on.names(),
            tls: b.tls.as_ref().map(|t| TlsView {
                ca: if t.own_ca { "tls.ca" } else { "system" },
                client_certificate: t.client_cert,
                server_name: t.server_name.to_str().into_owned(),
            }),
            url: b.url.clone(),
        }
    }
}

impl RouteView {
    fn new(active: &Active, id: crate::routes::RouteId) -> Self {
        let t = &active.table;
        let r = t.route(id);
        let runtime = &active.routes[id];
        let name = |b: crate::routes::BackendId| t.backend(b).name.clone();
        let names = |m: &[http::Method]| m.iter().map(|m| m.as_str().to_string()).collect();
        let cmp = runtime
            .shadow
            .as_ref()
            .filter(|_| r.shadow.is_some())
            .map(|slot| Comparison::new(&slot.stats, &r.compare));
        let (compared, gate, learned_noise, mismatch_rate, mismatched, ready_to_cut_over, skipped) =
            match cmp {
                Some(c) => (
                    Some(c.compared),
                    Some(c.gate),
                    Some(c.learned_noise),
                    Some(c.mismatch_rate),
                    Some(c.mismatched),
                    Some(c.ready_to_cut_over),
                    Some(c.skipped),
                ),
                None => (None, None, None, None, None, None, None),
            };
        RouteView {
            auth: r.auth.as_ref().map(|a| RouteAuthView {
                mode: a.mode.to_string(),
                outcomes: runtime
                    .auth
                    .as_ref()
                    .map(|rt| rt.stats.counts().into_iter().collect())
                    .unwrap_or_default(),
                provider: t.provider(a.provider).name.clone(),
                require: a.require.iter().cloned().collect(),
            }),
            backend: name(r.backend),
            events: r.events.as_ref().map(|e| {
                let kinds = e.kinds();
                RouteEventsView {
                    body: e.body,
                    routing_keys: kinds.iter().map(|k| format!("{k}.{}", e.key)).collect(),
                    kinds,
                    query: e.query,
                    sample: e.sample,
                }
            }),
            canary: r.canary.as_ref().map(|c| CanaryView {
                backend: name(c.backend),
                percent: c.percent,
                sticky: c.sticky.to_string(),
            }),
            compared,
            fallback: r.fallback.map(name),
            gate,
            guard: r.guard.as_ref().map(|g| GuardView {
                max_error_rate: g.max_error_rate,
                min_requests: g.min_requests,
                to: name(g.to),
                window: humantime::format_duration(g.window).to_string(),
            }),
            guard_tripped: runtime.guard.as_ref().is_some_and(|g| g.is_tripped()),
            host: r.host.clone(),
            learned_noise,
            line: r.line,
            methods: r.methods.as_deref().map(names),
            mismatch_rate,
            mismatched,
            prefix: r.prefix.clone(),
            rate_limits: r
                .rate_limits
                .iter()
                .enumerate()
                .map(|(i, w)| WindowView {
                    burst: w.burst,
                    key: w.key.to_string(),
                    keys: runtime
                        .limits
                        .as_ref()
                        .and_then(|l| l.windows.get(i))
                        .map_or(0, |s| s.keys()),
                    limit: w.limit,
                    max_keys: w.max_keys,
                    mode: if w.dry_run { "dry_run" } else { "enforce" },
                    name: w.name.clone(),
                    outcomes: runtime
                        .limits
                        .as_ref()
                        .and_then(|l| l.windows.get(i))
                        .map(|s| s.counts().into_iter().collect())
                        .unwrap_or_default(),
                    per: humantime::format_duration(w.per).to_string(),
                    scope: if w.global { "global" } else { "replica" },
                })
                .collect(),
            ready_to_cut_over,
            shadow: r.shadow.as_ref().map(|s| name(s.backend)),
            shadow_methods: r.shadow.as_ref().map(|s| names(&s.methods)),
            shadow_percent: r.shadow.as_ref().map(|s| {
                format_percent(s.percent)
                    .parse::<f64>()
                    .unwrap_or(s.percent)
            }),
            skipped,
            stage: super::stage(active, id),
            stale: r.stale.as_ref().map(|st| {
                let mut on: Vec<String> = Vec::new();
                if st.on_connect {
                    on.push("connect".into());
                }
                if st.on_timeout {
                    on.push("timeout".into());
                }
                on.extend(st.on_status.iter().map(u16::to_string));
                StaleView {
                    max_entry: st.max_entry,
                    max_stale: humantime::format_duration(st.max_stale).to_string(),
                    on,
                    outcomes: runtime
                        .stale
                        .as_ref()
                        .map(|c| c.counts().into_iter().collect())
                        .unwrap_or_default(),
                    per_user: st.per_user.as_ref().map(|c| format!("claim:{c}")),
                    vary: st.vary.iter().map(ToString::to_string).collect(),
                }
            }),
            traffic: runtime.traffic.view(),
            upgrades: r.upgrades.clone(),
        }
    }
}

impl ProviderView {
    fn new(p: &crate::routes::Provider, rt: &crate::auth::ProviderRuntime) -> Self {
        let keys = rt.keys();
        ProviderView {
            algorithms: p
                .rules
                .algorithms
                .iter()
                .map(|a| format!("{a:?}"))
                .collect(),
            audiences: p.rules.audiences.clone(),
            cached_tokens: rt.cached_tokens(),
            claims_to_headers: p
                .claims_to_headers
                .iter()
                .map(|(h, c)| (h.to_string(), c.clone()))
                .collect(),
            clock_skew: humantime::format_duration(p.rules.clock_skew).to_string(),
            forward_token: p.forward_token,
            issuer: p.rules.issuer.clone(),
            key_ids: keys.kids(),
            keys: p.keys.describe(),
            keys_loaded: keys.len(),
            name: p.name.clone(),
            realm: p.realm.clone(),
            token_from: p.token_from.iter().map(ToString::to_string).collect(),
        }
    }
}

impl Comparison {
    fn new(stats: &crate::shadow::RouteShadow, c: &crate::routes::Compare) -> Self {
        let compared = stats.compared.load(Ordering::Relaxed);
        let rate = stats.mismatch_rate();
        Comparison {
            compared,
            gate: GateView {
                max_mismatch_rate: c.max_mismatch_rate,
                min_comparisons: c.min_comparisons,
            },
            learned_noise: stats.learned_noise(),
            mismatch_rate: rate,
            mismatched: stats.mismatched.load(Ordering::Relaxed),
            ready_to_cut_over: compared >= c.min_comparisons
                && rate.is_some_and(|r| r <= c.max_mismatch_rate),
            skipped: stats.skips().into_iter().collect(),
        }
    }
}

/// Share of routes answered by a non-legacy backend (a canary counts for its percent).
fn route_coverage(active: &Active) -> f64 {
    let t = &active.table;
    let n = t.routes().len();
    if n == 0 {
        return 0.0;
    }
    let legacy = t.legacy();
    let covered: f64 = t
        .routes()
        .iter()
        .map(|r| match &r.canary {
            _ if Some(r.backend) != legacy => 1.0,
            Some(c) if Some(c.backend) != legacy => c.percent / 100.0,
            _ => 0.0,
        })
        .sum();
    covered / n as f64
}

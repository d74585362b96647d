//! The application state and the snapshot. A snapshot ([`Active`]) is everything a request
//! needs from one generation of routes.toml (the route table, upstream clients, and each
//! route's runtime: metric handles, shadow slot, guard, traffic counters), swapped as one; a
//! request loads it once and keeps it to the end. [`State`] is what outlives generations: the
//! snapshot pointer, the `[server]` settings, metrics, and the registries that carry per-route
//! state across reloads.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::SystemTime;

use arc_swap::ArcSwap;
use http::{HeaderValue, StatusCode};
use tokio::time::Instant;

use crate::auth::{Auth, ProviderRuntime, RouteAuthRuntime};
use crate::config::{Loaded, ServerSettings};
use crate::guard::{GuardState, Guards};
use crate::headers::RequestIds;
use crate::limit::{Limits, RouteLimits};
use crate::metrics::{Metrics, Responses, RouteMetrics, NO_ROUTE};
use crate::routes::{BackendId, ById, RouteId, RouteTable};
use crate::shadow::{self, Shadows};
use crate::stale::{RouteStale, StaleStore};
use crate::traffic::{RouteTraffic, Traffic};
use crate::upstream::Upstream;

/// What one route of a snapshot has at run time, beside its entry in the table.
pub struct RouteRuntime {
    /// `strangler_requests_total` and the duration histogram, per answering backend.
    pub metrics: RouteMetrics,
    /// Shadow settings and statistics of a shadowed route.
    pub shadow: Option<shadow::Slot>,
    /// The guard of a guarded route.
    pub guard: Option<Arc<GuardState>>,
    /// Counters for `/routes` and the board.
    pub traffic: Arc<RouteTraffic>,
    /// The provider and outcome counts of a route with `auth`.
    pub auth: Option<RouteAuthRuntime>,
    /// The buckets of a route with `rate_limit`.
    pub limits: Option<RouteLimits>,
    /// The stale-if-error counters of a route with `stale_if_error`.
    pub stale: Option<Arc<RouteStale>>,
}

/// Everything a request needs from one generation of routes.toml, swapped as one.
pub struct Active {
    pub generation: u64,
    pub loaded_at: SystemTime,
    pub sha256: String,
    /// The certificate and key files the configuration read, with their digests.
    pub files: crate::tls::Files,
    /// Of the files behind the listener's TLS configuration (`""` without TLS).
    pub server_tls: String,
    pub table: RouteTable,
    /// Each backend's client, by the backend's id in `table`.
    pub upstreams: ById<BackendId, Arc<Upstream>>,
    /// Each route's runtime, by the route's id in `table`.
    pub routes: ById<RouteId, RouteRuntime>,
    /// Parallel to `table.providers()`.
    pub providers: Vec<Arc<ProviderRuntime>>,
    no_route: Responses,
}

impl Active {
    /// Builds a snapshot, reusing `previous`'s upstream pools where backends are unchanged
    /// and the registries' per-route state where routes are.
    pub fn build(
        loaded: &Loaded,
        generation: u64,
        previous: Option<&Active>,
        state: &Registries,
    ) -> Self {
        let table = loaded.parsed.table.clone();
        let metrics = &state.metrics;
        let old: &[Arc<Upstream>] = previous.map_or(&[], |p| p.upstreams.as_slice());
        let upstreams = table
            .backends()
            .iter()
            .map(|b| Upstream::new(b, metrics, old))
            .collect();
        let shadows = state.shadows.slots(&table, metrics);
        let guards = state.guards.slots(&table, metrics);
        let traffic = state.traffic.slots(&table);
        let providers = state.auth.providers(&table, metrics);
        for p in &providers {
            p.start();
        }
        // Each registry renews its per-route state once for the whole table (keeping what
        // outlives the reload), then each route takes its own.
        let mut shadow = shadows.into_iter();
        let mut guard = guards.into_iter();
        let mut traffic = traffic.into_iter();
        let mut auth = state.auth.routes(&table, &providers).into_iter();
        let mut limits = state.limits.routes(&table).into_iter();
        let mut stale = state.stale.routes(&table).into_iter();
        let routes = table
            .route_ids()
            .map(|_| RouteRuntime {
                metrics: RouteMetrics::new(table.backends().len()),
                shadow: shadow.next().flatten(),
                guard: guard.next().flatten(),
                traffic: traffic.next().unwrap_or_default(),
                auth: auth.next().flatten(),
                limits: limits.next().flatten(),
                stale: stale.next().flatten(),
            })
            .collect();
        Active {
            generation,
            loaded_at: SystemTime::now(),
            sha256: loaded.sha256.clone(),
            files: loaded.parsed.files.clone(),
            server_tls: loaded
                .parsed
                .tls
                .as_ref()
                .map_or_else(String::new, |t| t.fingerprint.clone()),
            table,
            upstreams,
            routes,
            providers,
            no_route: Responses::new(metrics, NO_ROUTE, NO_ROUTE),
        }
    }
}

/// What carries over from one snapshot to the next: metrics and per-route state.
pub struct Registries {
    pub metrics: Arc<Metrics>,
    /// Shadow legs, their budget, stats and recent mismatches: outside the route table.
    pub shadows: Arc<Shadows>,
    /// Guards, outside the route table so a trip outlives reloads of other routes.
    pub guards: Guards,
    /// Per-route traffic counters, outside the route table.
    pub traffic: Traffic,
    /// Auth providers (keys, caches) and per-route auth outcomes, outside the route table.
    pub auth: Auth,
    /// Rate-limit buckets and the global store, outside the route table.
    pub limits: Arc<Limits>,
    /// Stale-if-error copies of every route, outside the route table.
    pub stale: Arc<StaleStore>,
    /// The migration-event publisher (`[events]` with a broker URL set).
    pub events: Option<Arc<crate::events::Events>>,
}

/// Shared state of one proxy instance.
pub struct State {
    active: ArcSwap<Active>,
    pub settings: ServerSettings,
    /// The routes.toml this instance serves and reloads.
    pub path: std::path::PathBuf,
    pub registries: Registries,
    pub ids: RequestIds,
    /// `1.1 NAME`, appended to `via` both ways.
    pub via: HeaderValue,
    /// False until the listener is up, and again once draining starts.
    pub ready: AtomicBool,
    answered: AtomicU64,
    answered_by_new: AtomicU64,
    /// The listener's TLS configuration; a reload swaps it when certificate files change.
    pub tls: Option<crate::tls::TlsConfig>,
    /// Repeated warnings of the request path, written once per [`crate::quiet::WINDOW`].
    pub quiet: crate::quiet::Quiet,
    /// The public listener's connection counts.
    pub clients: Arc<crate::server::ListenerStats>,
}

impl State {
    pub fn new(loaded: &Loaded, metrics: Arc<Metrics>) -> Arc<Self> {
        let settings = loaded.parsed.server.clone();
        let via = HeaderValue::from_str(&format!("1.1 {}", settings.via))
            .unwrap_or(HeaderValue::from_static("1.1 strangler"));
        let limits = Arc::new(Limits::new(settings.ratelimit_store.as_ref(), &metrics));
        let stale = Arc::new(StaleStore::new(settings.stale_store_size, &metrics));
        let events = settings
            .events
            .as_ref()
            .and_then(|e| crate::events::Events::new(e, &metrics));
        let registries = Registries {
            events,
            metrics,
            shadows: Arc::new(Shadows::default()),
            guards: Guards::default(),
            traffic: Traffic::default(),
            auth: Auth::default(),
            limits,
            stale,
        };
        let active = Active::build(loaded, 1, None, &registries);
        Arc::new(State {
            active: ArcSwap::from_pointee(active),
            settings,
            path: loaded.path.clone(),
            registries,
            ids: RequestIds::new(),
            via,
            ready: AtomicBool::new(false),
            answered: AtomicU64::new(0),
            answered_by_new: AtomicU64::new(0),
            tls: loaded
                .parsed
                .tls
                .as_ref()
                .map(|t| Arc::new(arc_swap::ArcSwap::new(t.config.clone()))),
            quiet: crate::quiet::Quiet::default(),
            clients: Arc::default(),
        })
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.registries.metrics
    }

    /// The event publisher, when events are on.
    pub fn events(&self) -> Option<&Arc<crate::events::Events>> {
        self.registries.events.as_ref()
    }

    pub fn shadows(&self) -> &Arc<Shadows> {
        &self.registries.shadows
    }

    /// The snapshot being served.
    pub fn active(&self) -> Arc<Active> {
        self.active.load_full()
    }

    /// Replaces the snapshot; requests in flight keep the one they loaded.
    pub fn swap(&self, next: Active) {
        self.active.store(Arc::new(next));
    }

    /// Builds the next snapshot from a validated file.
    pub fn build(&self, loaded: &Loaded, generation: u64, previous: &Active) -> Active {
        Active::build(loaded, generation, Some(previous), &self.registries)
    }

    /// `(answered, answered by a non-legacy backend)` since start.
    pub fn coverage(&self) -> (u64, u64) {
        (
            self.answered.load(Ordering::Relaxed),
            self.answered_by_new.load(Ordering::Relaxed),
        )
    }

    /// Counts one answer: the route's metrics and traffic, and the process's coverage. A
    /// request that matched no route is counted under `route="none"`; one refused before a
    /// backend was chosen (auth) under its route and `backend="none"`.
    pub fn record(
        &self,
        active: &Active,
        answered: Option<(RouteId, Option<BackendId>)>,
        status: StatusCode,
        start: Instant,
    ) {
        let elapsed = start.elapsed();
        let metrics = self.metrics();
        let Some((route, backend)) = answered else {
            active.no_route.record(metrics, status.as_u16(), elapsed);
            return;
        };
        let r = active.table.route(route);
        let runtime = &active.routes[route];
        let Some(backend) = backend else {
            // The slot after the last backend: answered by none.
            let none = BackendId::new(active.table.backends().len());
            if let Some(m) = runtime
                .metrics
                .for_backend(metrics, none, &r.prefix, NO_ROUTE)
            {
                m.record(metrics, status.as_u16(), elapsed);
            }
            runtime
                .traffic
                .record(status.is_server_error(), false, elapsed);
            return;
        };
        let b = active.table.backend(backend);
        if let Some(m) = runtime
            .metrics
            .for_backend(metrics, backend, &r.prefix, &b.name)
        {
            m.record(metrics, status.as_u16(), elapsed);
        }
        self.answered.fetch_add(1, Ordering::Relaxed);
        let by_new = Some(backend) != active.table.legacy();
        if by_new {
            self.answered_by_new.fetch_add(1, Ordering::Relaxed);
        }
        runtime
            .traffic
            .record(status.is_server_error(), by_new, elapsed);
    }
}

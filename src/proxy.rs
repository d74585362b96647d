//! The request service. For each request: one load of the active snapshot (route table,
//! upstream clients, metric handles); validate; route; pick the answering backend; forward
//! with clean headers; stream the response back. Errors become responses in one place,
//! `respond::error_response`. Nothing here blocks, locks, or buffers a body.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use arc_swap::ArcSwap;
use http::{header, HeaderValue, Method, Request, Response, StatusCode, Version};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::time::Instant;
use tracing::{debug, warn, Instrument};

use tokio::sync::oneshot;

use crate::access::AccessLog;
use crate::config::{Loaded, ServerSettings};
use crate::error::ProxyError;
use crate::guard::{GuardState, Guards};
use crate::headers::*;
use crate::metrics::{Metrics, Responses, RouteMetrics, FALLBACK_TOTAL, NO_ROUTE};
use crate::routes::{canary_bucket, in_canary, BackendId, Route, RouteId, RouteTable, Sticky};
use crate::shadow::{self, Shadows};
use crate::upstream::body::{ResponseBody, UpstreamBody};
pub use crate::upstream::idempotent;
use crate::upstream::tee::{Budget, Captured, Held, Tee};
use crate::upstream::{Failed, Lease, Upstream};
use metrics::Label;

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
    /// Parallel to `table.backends()`.
    pub upstreams: Vec<Arc<Upstream>>,
    /// Parallel to `table.routes()`.
    route_metrics: Vec<RouteMetrics>,
    no_route: Responses,
    /// Parallel to `table.routes()`: shadow settings and stats of shadowed routes.
    pub shadow_slots: Vec<Option<shadow::Slot>>,
    /// Parallel to `table.routes()`: guards of guarded routes.
    pub guard_slots: Vec<Option<Arc<GuardState>>>,
    /// Parallel to `table.routes()`: traffic counters.
    pub traffic: Vec<Arc<crate::traffic::RouteTraffic>>,
}

impl Active {
    /// Builds a snapshot, reusing `previous`'s upstream pools where backends are unchanged.
    pub fn build(
        loaded: &Loaded,
        generation: u64,
        previous: Option<&Active>,
        metrics: &Metrics,
        shadows: &Shadows,
        guards: &Guards,
        traffic: &crate::traffic::Traffic,
    ) -> Self {
        let table = loaded.parsed.table.clone();
        let old: &[Arc<Upstream>] = previous.map_or(&[], |p| &p.upstreams);
        let upstreams = table
            .backends()
            .iter()
            .map(|b| Upstream::new(b, metrics, old))
            .collect();
        let route_metrics = table
            .routes()
            .iter()
            .map(|_| RouteMetrics::new(table.backends().len()))
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
            route_metrics,
            no_route: Responses::new(metrics, NO_ROUTE, NO_ROUTE),
            shadow_slots: shadows.slots(&loaded.parsed.table, metrics),
            guard_slots: guards.slots(&loaded.parsed.table, metrics),
            traffic: traffic.slots(&loaded.parsed.table),
        }
    }
}

/// The outcome of the last reload attempt, for `/routes`.
#[derive(Debug, Clone)]
pub struct ReloadStatus {
    pub ok: bool,
    pub error: Option<String>,
    pub at: SystemTime,
}

/// Shared state of one proxy instance.
pub struct State {
    active: ArcSwap<Active>,
    pub settings: ServerSettings,
    /// The routes.toml this instance serves and reloads.
    pub path: std::path::PathBuf,
    pub metrics: Arc<Metrics>,
    /// Serializes reloads (watcher, SIGHUP and `POST /reload` may race).
    pub reload_lock: Mutex<()>,
    ids: RequestIds,
    via: HeaderValue,
    /// False until the listener is up, and again once draining starts.
    pub ready: AtomicBool,
    /// Last reload attempt; written by reloads only, read by the admin listener.
    pub last_reload: Mutex<ReloadStatus>,
    answered: AtomicU64,
    answered_by_new: AtomicU64,
    /// Shadow legs, their budget, stats and recent mismatches: outside the route table.
    pub shadows: Arc<Shadows>,
    /// Guards, outside the route table so a trip outlives reloads of other routes.
    pub guards: Guards,
    /// Per-route traffic counters, outside the route table.
    pub traffic: crate::traffic::Traffic,
    /// The listener's TLS configuration; a reload swaps it when certificate files change.
    pub tls: Option<crate::server::TlsConfig>,
}

/// What the request path learned, for metrics: which route and backend, if any.
#[derive(Default)]
struct Trace {
    route: Option<RouteId>,
    backend: Option<BackendId>,
    /// Whether a shadow copy was sent.
    shadowed: bool,
}

impl State {
    pub fn new(loaded: &Loaded, metrics: Arc<Metrics>) -> Arc<Self> {
        let settings = loaded.parsed.server.clone();
        let via = HeaderValue::from_str(&format!("1.1 {}", settings.via))
            .unwrap_or(HeaderValue::from_static("1.1 strangler"));
        let shadows = Arc::new(Shadows::default());
        let guards = Guards::default();
        let traffic = crate::traffic::Traffic::default();
        let active = Active::build(loaded, 1, None, &metrics, &shadows, &guards, &traffic);
        Arc::new(State {
            active: ArcSwap::from_pointee(active),
            settings,
            path: loaded.path.clone(),
            metrics,
            reload_lock: Mutex::new(()),
            ids: RequestIds::new(),
            via,
            ready: AtomicBool::new(false),
            last_reload: Mutex::new(ReloadStatus {
                ok: true,
                error: None,
                at: SystemTime::now(),
            }),
            answered: AtomicU64::new(0),
            answered_by_new: AtomicU64::new(0),
            shadows,
            guards,
            traffic,
            tls: loaded
                .parsed
                .tls
                .as_ref()
                .map(|t| Arc::new(arc_swap::ArcSwap::new(t.config.clone()))),
        })
    }

    /// The snapshot being served.
    pub fn active(&self) -> Arc<Active> {
        self.active.load_full()
    }

    /// Replaces the snapshot; requests in flight keep the one they loaded.
    pub fn swap(&self, next: Active) {
        self.active.store(Arc::new(next));
    }

    /// `(answered, answered by a non-legacy backend)` since start.
    pub fn coverage(&self) -> (u64, u64) {
        (
            self.answered.load(Ordering::Relaxed),
            self.answered_by_new.load(Ordering::Relaxed),
        )
    }

    /// Serves one client request. Never fails: errors are answered as JSON.
    pub async fn handle(
        self: Arc<Self>,
        req: Request<Incoming>,
        peer: SocketAddr,
    ) -> Response<ResponseBody> {
        let start = Instant::now();
        let active = self.active.load_full();
        let request_id = valid_request_id(req.headers())
            .cloned()
            .unwrap_or_else(|| self.ids.next());
        let span = tracing::debug_span!("request", id = ?request_id, method = %req.method(), path = %req.uri().path());
        let mut trace = Trace::default();
        let log_head = (self.settings.access_log && AccessLog::enabled())
            .then(|| (req.method().clone(), req.uri().path().to_string()));
        let inner = self.handle_inner(&active, req, peer, &request_id, start, &mut trace);
        // Instrumenting costs even with the span disabled; only pay for it when it records.
        let result = if span.is_disabled() {
            inner.await
        } else {
            inner.instrument(span).await
        };
        let mut resp = match result {
            Ok(resp) => resp,
            Err(error) => {
                let route = trace.route.map(|id| active.table.route(id).prefix.as_str());
                match error.status() {
                    s if s.is_server_error() => {
                        warn!(%error, source = ?std::error::Error::source(&error), ?route, id = ?request_id, "proxy error")
                    }
                    _ => debug!(%error, ?route, id = ?request_id, "request refused"),
                }
                crate::respond::error_response(&error, &request_id)
            }
        };
        self.record(&active, &trace, resp.status(), start);
        if let Some((method, path)) = log_head {
            let entry = AccessLog {
                method,
                path,
                route: trace.route.map(|id| active.table.route(id).prefix.clone()),
                backend: trace
                    .backend
                    .map(|id| active.table.backend(id).name.clone()),
                status: resp.status().as_u16(),
                request_id: request_id.to_str().unwrap_or_default().to_string(),
                shadowed: trace.shadowed,
                start,
                bytes: 0,
            };
            resp.body_mut().log(entry);
        }
        resp.headers_mut().insert(X_REQUEST_ID, request_id);
        resp
    }

    fn record(&self, active: &Active, trace: &Trace, status: StatusCode, start: Instant) {
        let elapsed = start.elapsed();
        let (Some(route), Some(backend)) = (trace.route, trace.backend) else {
            active
                .no_route
                .record(&self.metrics, status.as_u16(), elapsed);
            return;
        };
        let r = active.table.route(route);
        let b = active.table.backend(backend);
        if let Some(m) =
            active.route_metrics[route].for_backend(&self.metrics, backend, &r.prefix, &b.name)
        {
            m.record(&self.metrics, status.as_u16(), elapsed);
        }
        self.answered.fetch_add(1, Ordering::Relaxed);
        let by_new = Some(backend) != active.table.legacy();
        if by_new {
            self.answered_by_new.fetch_add(1, Ordering::Relaxed);
        }
        active.traffic[route].record(status.is_server_error(), by_new, elapsed);
    }

    async fn handle_inner(
        &self,
        active: &Active,
        mut req: Request<Incoming>,
        peer: SocketAddr,
        request_id: &HeaderValue,
        start: Instant,
        trace: &mut Trace,
    ) -> Result<Response<ResponseBody>, ProxyError> {
        let route_id = self.route(active, &req)?;
        trace.route = Some(route_id);
        let route = active.table.route(route_id);
        let guard = active.guard_slots[route_id].as_deref();
        let backend = match guard {
            Some(g) if g.is_tripped() => g.to(),
            _ => pick_backend(route, req.headers(), peer),
        };
        trace.backend = Some(backend);
        let upstream = &active.upstreams[backend];

        let limit = self.settings.max_request_body;
        let declared = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
        if declared.is_some_and(|n| n > limit) {
            return Err(ProxyError::PayloadTooLarge { limit });
        }
        // An upgrade the route does not tunnel (h2c, or one it did not opt in to) is dropped
        // with the other hop-by-hop headers: the request goes on as plain HTTP/1.1, as from
        // a server that ignores `Upgrade` (RFC 9110 §7.8).
        let upgrade = is_upgrade(req.headers())
            && route.allows_upgrade(
                req.headers()
                    .get_all(header::UPGRADE)
                    .iter()
                    .map(HeaderValue::as_bytes),
            );
        let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
        // Decided before the headers are cleaned: a request marked as a shadow copy is never
        // shadowed again, whether or not the marker is trusted onward.
        let plan = active.shadow_slots[route_id].as_ref().and_then(|slot| {
            self.shadows
                .plan(slot, backend, req.method(), req.headers(), upgrade)
        });

        let (mut parts, body) = req.into_parts();
        self.clean_request(&mut parts, peer, request_id, upgrade);
        let pq = parts.uri.path_and_query().cloned();
        parts.uri = upstream
            .uri(pq.as_ref())
            .map_err(|_| ProxyError::BadRequest {
                reason: "the request target cannot be forwarded",
            })?;
        let empty = body_is_empty(&parts.method, &body);
        let deadline = start + upstream.timeout;

        trace.shadowed = plan.is_some();
        let mut shadow = plan.map(|plan| {
            self.start_shadow(
                active,
                plan,
                &parts,
                pq.clone(),
                request_id,
                backend,
                empty,
                deadline,
            )
        });
        let fallback = route.fallback.filter(|&f| f != backend && !upgrade);
        let (retry, replay_tee) = match fallback {
            Some(_) => Retry::prepare(&parts, pq, empty, &self.shadows.budget),
            None => (None, None),
        };
        let body = if empty {
            UpstreamBody::empty()
        } else {
            UpstreamBody::limited(
                body,
                limit,
                shadow.as_mut().and_then(|s| s.request_tee.take()),
                replay_tee,
            )
        };

        let first = upstream
            .send(Request::from_parts(parts, body), deadline)
            .await;
        guard_watch(guard, active, backend, &first, start);
        let (resp, lease, deadline) = match (fallback, retry) {
            (Some(to), Some(retry)) => {
                self.send_with_fallback(
                    active, route_id, backend, to, first, retry, deadline, trace,
                )
                .await?
            }
            _ => first
                .map(|(resp, lease)| (resp, lease, deadline))
                .map_err(|f| f.error)?,
        };
        let upstream = &active.upstreams[trace.backend.unwrap_or(backend)];

        let (mut parts, body) = resp.into_parts();
        let switching = parts.status == StatusCode::SWITCHING_PROTOCOLS;
        strip_hop_by_hop(&mut parts.headers, switching && upgrade);
        append_via(&mut parts.headers, &self.via);
        if switching {
            // The connection now belongs to the tunnel.
            drop(lease);
            let mut upstream_resp = Response::from_parts(parts.clone(), body);
            let upstream_upgrade = hyper::upgrade::on(&mut upstream_resp);
            if let Some(client_upgrade) = client_upgrade {
                tokio::spawn(tunnel(client_upgrade, upstream_upgrade).in_current_span());
            }
            return Ok(Response::from_parts(
                parts,
                ResponseBody::full(bytes::Bytes::new()),
            ));
        }
        let tee = shadow.and_then(|s| s.primary_answered(&parts, start.elapsed()));
        Ok(Response::from_parts(
            parts,
            ResponseBody::upstream(body, deadline, upstream.timeout_counter(), tee, lease),
        ))
    }

    /// Hop-by-hop removal, the shadow marker, `x-forwarded-*`, `via`, `x-request-id`.
    fn clean_request(
        &self,
        parts: &mut http::request::Parts,
        peer: SocketAddr,
        request_id: &HeaderValue,
        upgrade: bool,
    ) {
        // HTTP/2 carries the host as `:authority`, an absolute-form target as its authority;
        // either was what routed the request, so the backend's Host says the same.
        set_host_from_target(&mut parts.headers, &parts.uri);
        let host = parts.headers.get(header::HOST).cloned();
        let trailers = accepts_trailers(&parts.headers);
        strip_hop_by_hop(&mut parts.headers, upgrade);
        if trailers {
            parts
                .headers
                .insert(header::TE, HeaderValue::from_static("trailers"));
        }
        if !self.settings.trust_shadow_header {
            parts.headers.remove(X_STRANGLER_SHADOW);
        }
        let proto = if self.tls.is_some() { "https" } else { "http" };
        set_forwarded(&mut parts.headers, peer.ip(), proto, host.as_ref());
        append_via(&mut parts.headers, &self.via);
        parts.headers.insert(X_REQUEST_ID, request_id.clone());
        if !valid_traceparent(&parts.headers) {
            parts.headers.insert(TRACEPARENT, new_traceparent());
            parts.headers.remove(TRACESTATE);
        }
        parts.version = Version::HTTP_11;
    }

    /// Sends the request to the route's fallback when the first attempt failed and that is
    /// safe: for any method when the request never left (connect failure), for idempotent
    /// methods on a timeout or a 5xx head (nothing has reached the client yet). Otherwise the
    /// first attempt's outcome stands.
    #[allow(clippy::too_many_arguments)]
    async fn send_with_fallback(
        &self,
        active: &Active,
        route_id: RouteId,
        from: BackendId,
        to: BackendId,
        first: Result<(Response<Incoming>, Lease), Failed>,
        retry: Retry,
        deadline: Instant,
        trace: &mut Trace,
    ) -> Result<(Response<Incoming>, Lease, Instant), ProxyError> {
        let target = &active.upstreams[to];
        let req = match first {
            Ok((resp, lease)) if resp.status().is_server_error() && retry.idempotent => {
                match retry.rebuild(target) {
                    Some(req) => req,
                    None => return Ok((resp, lease, deadline)),
                }
            }
            Ok((resp, lease)) => return Ok((resp, lease, deadline)),
            Err(Failed {
                unsent: Some(req), ..
            }) => {
                let mut req = *req;
                *req.uri_mut() =
                    target
                        .uri(retry.pq.as_ref())
                        .map_err(|_| ProxyError::BadRequest {
                            reason: "the request target cannot be forwarded",
                        })?;
                req
            }
            Err(Failed {
                error: error @ ProxyError::UpstreamTimeout { .. },
                ..
            }) => match retry.idempotent.then(|| retry.rebuild(target)).flatten() {
                Some(req) => req,
                None => return Err(error),
            },
            Err(failed) => return Err(failed.error),
        };
        let route = &active.table.route(route_id).prefix;
        let (from_name, to_name) = (
            &active.table.backend(from).name,
            &active.table.backend(to).name,
        );
        self.metrics
            .counter(
                FALLBACK_TOTAL,
                vec![
                    Label::new("route", route.clone()),
                    Label::new("from", from_name.clone()),
                    Label::new("to", to_name.clone()),
                ],
            )
            .increment(1);
        debug!(route = %route, from = %from_name, to = %to_name, "answered by the fallback");
        trace.backend = Some(to);
        let deadline = Instant::now() + target.timeout;
        let (resp, lease) = target.send(req, deadline).await.map_err(|f| f.error)?;
        Ok((resp, lease, deadline))
    }

    /// Spawns the shadow leg of a request chosen for mirroring; returns the hand-over points
    /// the primary exchange feeds (request body tee, response head, response body tee).
    #[allow(clippy::too_many_arguments)]
    fn start_shadow(
        &self,
        active: &Active,
        plan: shadow::Plan,
        parts: &http::request::Parts,
        pq: Option<http::uri::PathAndQuery>,
        request_id: &HeaderValue,
        backend: BackendId,
        empty: bool,
        deadline: Instant,
    ) -> ShadowFeed {
        let budget = &self.shadows.budget;
        let (request_tee, request_body) = if empty {
            (None, shadow::RequestCopy::Ready(Held::empty(budget)))
        } else {
            let (tee, rx) = Tee::new(plan.max_body, budget);
            (Some(tee), shadow::RequestCopy::Pending(rx))
        };
        let (head_tx, primary_head) = oneshot::channel();
        let (response_tee, primary_body) = Tee::new(plan.max_body, budget);
        let leg = shadow::Leg {
            shadows: self.shadows.clone(),
            method: parts.method.clone(),
            pq,
            headers: parts.headers.clone(),
            request_id: request_id.to_str().unwrap_or_default().to_string(),
            primary: active.upstreams[backend].clone(),
            shadow: active.upstreams[plan.shadow].clone(),
            request_body,
            primary_head,
            primary_body,
            primary_deadline: deadline,
            plan,
        };
        tokio::spawn(leg.run());
        ShadowFeed {
            request_tee,
            head_tx: Some(head_tx),
            response_tee: Some(response_tee),
        }
    }

    /// Request checks that come before routing, then the route lookup.
    fn route(&self, active: &Active, req: &Request<Incoming>) -> Result<RouteId, ProxyError> {
        let bad = |reason| Err(ProxyError::BadRequest { reason });
        if req.method() == Method::CONNECT {
            return bad("CONNECT is not supported");
        }
        let path = req.uri().path();
        if !path.starts_with('/') {
            return bad("the request target must be a path starting with /");
        }
        if has_dot_segments(path) {
            return bad("the path must not contain . or .. segments");
        }
        let host = request_host(req.headers(), req.uri())
            .map_err(|reason| ProxyError::BadRequest { reason })?;
        if host.is_none() && req.version() == Version::HTTP_11 {
            return bad("HTTP/1.1 requests need a Host header");
        }
        if via_has(req.headers(), &self.settings.via) {
            return Err(ProxyError::LoopDetected {
                name: self.settings.via.clone(),
            });
        }
        active
            .table
            .lookup(req.method(), host, path)
            .ok_or(ProxyError::NoRoute)
    }
}

/// Request bodies up to this size are kept so an idempotent request can be sent again to a
/// fallback after a timeout or a 5xx; a larger body is not replayed (the first answer stands).
const FALLBACK_MAX_BODY: usize = 1 << 20;

/// What it takes to send a request again to a fallback backend.
struct Retry {
    method: Method,
    headers: http::HeaderMap,
    pq: Option<http::uri::PathAndQuery>,
    /// GET, HEAD, OPTIONS, PUT, DELETE (and TRACE): safe to send twice.
    idempotent: bool,
    body: Option<Replay>,
}

enum Replay {
    Empty,
    Captured(oneshot::Receiver<Captured>),
}

impl Retry {
    /// Keeps the request head, and a tee for the body of an idempotent request.
    fn prepare(
        parts: &http::request::Parts,
        pq: Option<http::uri::PathAndQuery>,
        empty: bool,
        budget: &Arc<Budget>,
    ) -> (Option<Retry>, Option<Tee>) {
        let idempotent = idempotent(&parts.method);
        let (body, tee) = match (idempotent, empty) {
            (false, _) => (None, None),
            (true, true) => (Some(Replay::Empty), None),
            (true, false) => {
                let (tee, rx) = Tee::new(FALLBACK_MAX_BODY, budget);
                (Some(Replay::Captured(rx)), Some(tee))
            }
        };
        (
            Some(Retry {
                method: parts.method.clone(),
                headers: parts.headers.clone(),
                pq,
                idempotent,
                body,
            }),
            tee,
        )
    }

    /// The request again, for `to`; `None` when its body was not kept whole.
    fn rebuild(self, to: &Upstream) -> Option<Request<UpstreamBody>> {
        let bytes = match self.body? {
            Replay::Empty => bytes::Bytes::new(),
            Replay::Captured(mut rx) => match rx.try_recv().ok()? {
                Captured::Body(held) => held.bytes.clone(),
                Captured::TooLarge => return None,
            },
        };
        let mut req = Request::builder()
            .method(self.method)
            .uri(to.uri(self.pq.as_ref()).ok()?)
            .body(UpstreamBody::full(bytes))
            .ok()?;
        *req.headers_mut() = self.headers;
        Some(req)
    }
}

/// Feeds the route's guard with the first attempt's outcome when the attempted backend is the
/// one it watches (not the legacy one, not where it rolls back to). Client faults are not
/// the backend's errors.
fn guard_watch(
    guard: Option<&GuardState>,
    active: &Active,
    backend: BackendId,
    first: &Result<(Response<Incoming>, Lease), Failed>,
    now: Instant,
) {
    let Some(g) = guard else { return };
    if Some(backend) == active.table.legacy() || backend == g.to() {
        return;
    }
    let error = match first {
        Ok((resp, _)) => resp.status().is_server_error(),
        Err(f) => matches!(
            f.error,
            ProxyError::UpstreamUnavailable { .. } | ProxyError::UpstreamTimeout { .. }
        ),
    };
    g.record(now, error);
}

/// Where the primary exchange hands its copies to a shadow leg.
struct ShadowFeed {
    request_tee: Option<Tee>,
    head_tx: Option<oneshot::Sender<shadow::Head>>,
    response_tee: Option<Tee>,
}

impl ShadowFeed {
    /// Hands the primary's response head over; returns the tee for its body.
    fn primary_answered(
        self,
        parts: &http::response::Parts,
        latency: std::time::Duration,
    ) -> Option<Tee> {
        let head = shadow::Head {
            status: parts.status.as_u16(),
            headers: parts.headers.clone(),
            latency,
        };
        self.head_tx?.send(head).ok()?;
        self.response_tee
    }
}

/// Whether the request certainly has no body (so the upstream request can say so).
fn body_is_empty(method: &Method, body: &Incoming) -> bool {
    use http_body::Body as _;
    body.is_end_stream()
        && matches!(
            *method,
            Method::GET | Method::HEAD | Method::OPTIONS | Method::DELETE
        )
}

/// The backend that answers: the canary's when the request's bucket is in the canary,
/// otherwise the route's. A sticky key that is absent keeps the request on the route's
/// backend, so users without the key never flap between the two.
pub fn pick_backend(route: &Route, headers: &http::HeaderMap, peer: SocketAddr) -> BackendId {
    let Some(canary) = &route.canary else {
        return route.backend;
    };
    let bucket = match &canary.sticky {
        Sticky::Random => Some(fastrand::u32(..10_000)),
        Sticky::Header(name) => headers.get(name).map(|v| canary_bucket(v.as_bytes())),
        Sticky::Cookie(name) => cookie(headers, name).map(|v| canary_bucket(v.as_bytes())),
        Sticky::Ip => Some(canary_bucket(peer.ip().to_string().as_bytes())),
    };
    match bucket {
        Some(b) if in_canary(b, canary.percent) => canary.backend,
        _ => route.backend,
    }
}

/// The value of cookie `name` in the request's `Cookie` headers.
pub fn cookie<'a>(headers: &'a http::HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

/// Joins an upgraded client connection with the upgraded upstream one, both ways, until
/// either side closes. Runs on its own task: reloads and the request path never wait on it.
async fn tunnel(client: hyper::upgrade::OnUpgrade, upstream: hyper::upgrade::OnUpgrade) {
    match tokio::try_join!(client, upstream) {
        Ok((c, u)) => {
            let (mut c, mut u) = (TokioIo::new(c), TokioIo::new(u));
            if let Err(error) = tokio::io::copy_bidirectional(&mut c, &mut u).await {
                debug!(%error, "upgraded connection closed with an error");
            }
        }
        Err(error) => debug!(%error, "upgrade did not complete"),
    }
}

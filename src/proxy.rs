//! The request service, as a list of phases over one per-request [`Context`]: route,
//! authenticate (a route's `auth`), choose the backend (guard, canary), admit (checks before anything is sent: the body limit; where
//! authentication and rate limits go), decide the shadow, prepare the request (clean headers,
//! the backend's target), start the shadow leg, send (the first attempt, then the route's
//! fallback where safe: [`fallback`]), respond. Each phase is a function that can be read alone. Errors become
//! responses in one place (`respond::error_response`). Nothing here blocks, locks, or
//! buffers a body.

mod emit;
mod fallback;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use http::uri::PathAndQuery;
use http::{header, HeaderValue, Method, Request, Response, StatusCode, Version};
use hyper::body::Incoming;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::time::Instant;
use tracing::{debug, warn, Instrument};

use self::fallback::Answered;
use crate::access::AccessLog;
use crate::error::{AuthError, ProxyError};
use crate::headers::*;
use crate::jwt::{Claims, Reason};
use crate::routes::{BackendId, Route, RouteId};
use crate::shadow;
use crate::stale;
use crate::state::{Active, RouteRuntime, State};
use crate::upstream::body::ResponseBody;
pub use crate::upstream::idempotent;

/// What the request path learned, for metrics and the access log.
#[derive(Default)]
struct Trace {
    route: Option<RouteId>,
    /// The backend that answered (the fallback's, when it did).
    backend: Option<BackendId>,
    /// Whether a shadow copy was sent.
    shadowed: bool,
    /// The auth outcome of a route with `auth`.
    auth: Option<&'static str>,
    /// The rate-limit outcome of a route with `rate_limit`, and its answer's headers
    /// (`RateLimit-Policy`, `RateLimit`).
    limit: Option<&'static str>,
    limit_headers: Option<(Option<HeaderValue>, Option<HeaderValue>)>,
    /// The failure a stored copy answered for (`stale_if_error`): counted as that status.
    degraded: Option<StatusCode>,
}

/// What every phase of one request may read.
struct Context<'a> {
    state: &'a State,
    active: &'a Active,
    peer: SocketAddr,
    /// The client's address: the peer, or from `X-Forwarded-For` behind trusted proxies.
    client: IpAddr,
    request_id: &'a HeaderValue,
    start: Instant,
}

/// The route a request matched, with its runtime and the backend chosen to answer.
struct Routed<'a> {
    route: &'a Route,
    runtime: &'a RouteRuntime,
    backend: BackendId,
}

/// A request ready for its backend.
struct Outbound {
    parts: http::request::Parts,
    body: Incoming,
    /// The client's path and query (the backend's base path is joined to it).
    pq: Option<PathAndQuery>,
    /// Whether the request certainly has no body.
    empty: bool,
    /// When the answering backend's whole answer is due.
    deadline: Instant,
    /// Whether it is an upgrade the route tunnels.
    upgrade: bool,
    /// Copies the request body for a write event.
    capture: Option<crate::upstream::tee::Tee>,
}

/// Serves one client request. Never fails: errors are answered as JSON.
pub async fn handle(
    state: Arc<State>,
    req: Request<Incoming>,
    peer: SocketAddr,
) -> Response<ResponseBody> {
    let start = Instant::now();
    let active = state.active();
    let request_id = valid_request_id(req.headers())
        .cloned()
        .unwrap_or_else(|| state.ids.next());
    let client = client_address(req.headers(), peer.ip(), &state.settings.trusted_proxies);
    let cx = Context {
        state: &state,
        active: &active,
        peer,
        client,
        request_id: &request_id,
        start,
    };
    let span = tracing::debug_span!("request", id = ?request_id, method = %req.method(), path = %req.uri().path());
    let log_head = (state.settings.access_log && AccessLog::enabled())
        .then(|| (req.method().clone(), req.uri().path().to_string()));
    let event_head = state
        .events()
        .map(|_| (req.method().clone(), req.uri().path_and_query().cloned()));
    let mut trace = Trace::default();
    let phases = exchange(&cx, req, &mut trace);
    // Instrumenting costs even with the span disabled; only pay for it when it records.
    let result = if span.is_disabled() {
        phases.await
    } else {
        phases.instrument(span).await
    };
    let mut resp = result.unwrap_or_else(|error| refused(&cx, &trace, &error));
    let answered = trace.route.map(|r| (r, trace.backend));
    // A stale answer counts as the failure it replaced: a degraded route must look degraded.
    state.record(
        &active,
        answered,
        trace.degraded.unwrap_or(resp.status()),
        start,
    );
    if let (Some(events), Some((method, pq)), Some(id)) = (state.events(), event_head, trace.route)
    {
        let table = &active.table;
        emit::request_event(
            events,
            table.route(id),
            trace.backend.map(|b| table.backend(b).name.as_str()),
            &method,
            pq.as_ref(),
            request_id.to_str().unwrap_or_default(),
            resp.status(),
            start.elapsed(),
        );
    }
    if let Some((method, path)) = log_head {
        let entry = access_entry(&cx, &trace, method, path, resp.status());
        resp.body_mut().log(entry);
    }
    if let Some((policy, state)) = trace.limit_headers.take() {
        let h = resp.headers_mut();
        if let Some(p) = policy {
            h.insert(RATELIMIT_POLICY, p);
        }
        if let Some(s) = state {
            h.insert(RATELIMIT, s);
        }
    }
    resp.headers_mut().insert(X_REQUEST_ID, request_id);
    resp
}

/// `RateLimit-Policy` and `RateLimit` (draft-ietf-httpapi-ratelimit-headers).
const RATELIMIT_POLICY: http::HeaderName = http::HeaderName::from_static("ratelimit-policy");
const RATELIMIT: http::HeaderName = http::HeaderName::from_static("ratelimit");

/// The phases, in order.
async fn exchange(
    cx: &Context<'_>,
    mut req: Request<Incoming>,
    trace: &mut Trace,
) -> Result<Response<ResponseBody>, ProxyError> {
    let id = route(cx, &req)?;
    trace.route = Some(id);
    let claims = authenticate(cx, id, &req, trace).await?;
    rate_limit(cx, id, &req, claims.as_deref(), trace).await?;
    let routed = choose(cx, id, &req, claims.as_deref());
    trace.backend = Some(routed.backend);
    admit(cx, &req)?;
    let upgrade = tunnels(&routed, &req);
    // Decided before the headers are cleaned: a request marked as a shadow copy is never
    // shadowed again, whether or not the marker is trusted onward.
    let plan = routed.runtime.shadow.as_ref().and_then(|slot| {
        cx.state
            .shadows()
            .plan(slot, routed.backend, req.method(), req.headers(), upgrade)
    });
    let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
    let stale = routed.runtime.stale.as_ref().and_then(|counters| {
        let host = request_host(req.headers(), req.uri()).ok().flatten();
        let plan = stale::Plan::new(routed.route, counters, &req, host, claims.as_deref())?;
        // A token was presented but gave no claims (observe mode forwarded a bad one).
        let presented = claims.is_none()
            && trace
                .auth
                .is_some_and(|o| !matches!(o, "missing" | "anonymous" | "preflight"));
        Some(if presented {
            plan.presented_credentials()
        } else {
            plan
        })
    });
    let plan = plan.map(|mut plan| {
        plan.events = mismatch_events(cx, routed.route);
        plan
    });
    let (write, capture) = match emit::plan_write(cx, &routed, &req) {
        Some((write, capture)) => (Some(write), capture),
        None => (None, None),
    };
    let mut out = prepare(cx, &routed, req, upgrade, claims.as_deref())?;
    out.capture = capture;
    trace.shadowed = plan.is_some();
    let mut feed = plan.map(|plan| start_shadow(cx, &routed, plan, &out));
    let deadline = out.deadline;
    let (req, fallback) = fallback::first_request(cx, &routed, out, feed.as_mut());
    let resend = if routed.route.retry_non_idempotent {
        crate::upstream::Resend::Any
    } else {
        crate::upstream::Resend::Idempotent
    };
    let first = cx.active.upstreams[routed.backend]
        .send_with(req, deadline, resend)
        .await;
    let outcome = match fallback::settle(cx, &routed, first, fallback, deadline) {
        Ok(outcome) => outcome,
        Err(second) => second.await,
    };
    match outcome {
        Ok(answered) => {
            trace.backend = Some(answered.backend);
            let status = answered.resp.status();
            if let Some(plan) = &stale {
                if status.is_server_error() && plan.triggered(status, false, false) {
                    if let Some(copy) = serve_stale(cx, plan, status, trace) {
                        return Ok(copy);
                    }
                }
            }
            let store = &cx.state.registries.stale;
            let mut keep = stale.and_then(|p| p.answered(store, status, answered.resp.headers()));
            if let Some(write) = write {
                let backend = &cx.active.table.backend(answered.backend).name;
                let tee = write.answered(backend, status, answered.resp.headers());
                // Writes are never stored for stale answers: the slot is free.
                keep = keep.or(tee);
            }
            respond(cx, answered, client_upgrade, feed, keep)
        }
        // Counted against the backend tried last.
        Err(unanswered) => {
            trace.backend = Some(unanswered.backend);
            if let Some(plan) = &stale {
                let status = unanswered.error.status();
                // `connect`: no connection could be made, or it broke before an answer's head
                // (refused, reset, closed unanswered). A broken connection is also the proxy's
                // 502, so `on = ["502"]` still takes it, as it did before `connect` covered it.
                // A malformed answer is only the proxy's 502.
                use crate::error::UpstreamErrorKind::{Connect, Reset};
                let (connect, timeout) = match &unanswered.error {
                    ProxyError::UpstreamUnavailable { kind, .. } => {
                        (matches!(kind, Connect | Reset), false)
                    }
                    ProxyError::UpstreamTimeout { .. } => (false, true),
                    _ => (false, false),
                };
                let broke = matches!(
                    &unanswered.error,
                    ProxyError::UpstreamUnavailable { kind: Reset, .. }
                );
                if plan.triggered(status, connect, timeout)
                    || (broke && plan.triggered(status, false, false))
                {
                    if let Some(copy) = serve_stale(cx, plan, status, trace) {
                        debug!(error = %unanswered.error, "answered from the stale store");
                        return Ok(copy);
                    }
                }
            }
            Err(unanswered.error)
        }
    }
}

/// The stored copy of a request whose backends failed with `status`, if the store has one
/// young enough.
fn serve_stale(
    cx: &Context<'_>,
    plan: &stale::Plan,
    status: StatusCode,
    trace: &mut Trace,
) -> Option<Response<ResponseBody>> {
    let copy = plan.serve(&cx.state.registries.stale)?;
    trace.degraded = Some(status);
    let (mut parts, body) = copy.into_parts();
    append_via(&mut parts.headers, &cx.state.via);
    Some(Response::from_parts(parts, ResponseBody::full(body)))
}

/// Phase 1: request checks that come before routing, then the route lookup.
fn route(cx: &Context<'_>, req: &Request<Incoming>) -> Result<RouteId, ProxyError> {
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
    let via = &cx.state.settings.via;
    if via_has(req.headers(), via) {
        return Err(ProxyError::LoopDetected { name: via.clone() });
    }
    cx.active
        .table
        .lookup(req.method(), host, path)
        .ok_or(ProxyError::NoRoute)
}

/// Phase 2: who is calling, on a route with `auth`: the verified token's claims, or a
/// refusal (which reaches no backend and no shadow, and is no backend error for the guard).
/// Boxed, so routes without `auth` carry none of its state.
async fn authenticate(
    cx: &Context<'_>,
    id: RouteId,
    req: &Request<Incoming>,
    trace: &mut Trace,
) -> Result<Option<Arc<Claims>>, ProxyError> {
    let route = cx.active.table.route(id);
    let (Some(auth), Some(rt)) = (&route.auth, &cx.active.routes[id].auth) else {
        return Ok(None);
    };
    let provider = cx.active.table.provider(auth.provider);
    let checked = Box::pin(rt.authenticate(
        provider,
        auth,
        cx.state.metrics(),
        &route.prefix,
        req.method(),
        req.headers(),
    ))
    .await;
    match checked {
        Ok(passed) => {
            trace.auth = Some(passed.outcome);
            Ok(passed.claims)
        }
        Err(refusal) => {
            trace.auth = Some(refusal.reason.as_str());
            let error = match refusal.reason {
                Reason::Missing => AuthError::Missing,
                Reason::Malformed => AuthError::Malformed,
                Reason::InsufficientScope => AuthError::InsufficientScope {
                    scope: refusal.scope.unwrap_or_default(),
                },
                Reason::KeysUnavailable => AuthError::Unavailable {
                    retry_after: refusal.retry_after,
                },
                _ => AuthError::Invalid,
            };
            Err(ProxyError::Auth {
                realm: refusal.realm,
                error,
                reason: refusal.reason.as_str(),
            })
        }
    }
}

/// Phase 3: a route's `rate_limit` windows (a key may be a verified claim). A limited
/// request is refused at once: it reaches no backend and no shadow, and is no error for the
/// guard. Boxed, so routes without limits carry none of its state.
async fn rate_limit(
    cx: &Context<'_>,
    id: RouteId,
    req: &Request<Incoming>,
    claims: Option<&Claims>,
    trace: &mut Trace,
) -> Result<(), ProxyError> {
    let Some(limits) = &cx.active.routes[id].limits else {
        return Ok(());
    };
    let route = cx.active.table.route(id);
    let checked = Box::pin(cx.state.registries.limits.check(
        cx.state.metrics(),
        route,
        limits,
        req.headers(),
        cx.client,
        claims,
    ))
    .await;
    trace.limit = checked.outcome;
    trace.limit_headers = Some((checked.policy, checked.state));
    match checked.limited {
        Some(retry_after) => Err(ProxyError::RateLimited { retry_after }),
        None => Ok(()),
    }
}

/// Phase 4: who answers. A tripped guard sends the route's traffic where it says (looked up
/// in this generation's table: backend indices move when backends come and go); otherwise
/// the canary decides.
#[inline]
fn choose<'a>(
    cx: &Context<'a>,
    id: RouteId,
    req: &Request<Incoming>,
    claims: Option<&Claims>,
) -> Routed<'a> {
    let route = cx.active.table.route(id);
    let runtime = &cx.active.routes[id];
    let backend = match (&runtime.guard, &route.guard) {
        (Some(g), Some(config)) if g.is_tripped() => config.to,
        _ => route.pick_backend(req.headers(), cx.client, claims),
    };
    Routed {
        route,
        runtime,
        backend,
    }
}

/// Phase 5: checks that may refuse a routed request before anything is sent upstream.
#[inline]
fn admit(cx: &Context<'_>, req: &Request<Incoming>) -> Result<(), ProxyError> {
    let limit = cx.state.settings.max_request_body;
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Err(ProxyError::PayloadTooLarge { limit });
    }
    Ok(())
}

/// Whether the request is an upgrade the route tunnels. Any other (h2c, or one the route
/// did not opt in to) is dropped with the other hop-by-hop headers: the request goes on as
/// plain HTTP/1.1, as from a server that ignores `Upgrade` (RFC 9110 §7.8).
#[inline]
fn tunnels(routed: &Routed<'_>, req: &Request<Incoming>) -> bool {
    is_upgrade(req.headers())
        && routed.route.allows_upgrade(
            req.headers()
                .get_all(header::UPGRADE)
                .iter()
                .map(HeaderValue::as_bytes),
        )
}

/// Phase 6: the request as the backend gets it: clean headers, its target, its deadline.
#[inline]
fn prepare(
    cx: &Context<'_>,
    routed: &Routed<'_>,
    req: Request<Incoming>,
    upgrade: bool,
    claims: Option<&Claims>,
) -> Result<Outbound, ProxyError> {
    let upstream = &cx.active.upstreams[routed.backend];
    let (mut parts, body) = req.into_parts();
    clean_request(cx, &mut parts, upgrade);
    if let Some(auth) = &routed.route.auth {
        let provider = cx.active.table.provider(auth.provider);
        crate::auth::apply(provider, claims, &mut parts.headers);
    }
    let pq = parts.uri.path_and_query().cloned();
    parts.uri = upstream
        .uri(pq.as_ref())
        .map_err(|_| ProxyError::BadRequest {
            reason: "the request target cannot be forwarded",
        })?;
    Ok(Outbound {
        empty: body_is_empty(&parts.method, &body),
        parts,
        body,
        pq,
        deadline: cx.start + upstream.timeout,
        upgrade,
        capture: None,
    })
}

/// Where a shadow leg of `route` publishes its mismatches, if it does.
fn mismatch_events(
    cx: &Context<'_>,
    route: &Route,
) -> Option<(Arc<crate::events::Events>, String)> {
    let settings = route.events.as_ref().filter(|e| e.mismatch)?;
    Some((cx.state.events()?.clone(), settings.key.clone()))
}

/// Hop-by-hop removal, the shadow marker, client-sent copies of claim headers, `Host`,
/// `x-forwarded-*`, `via`, `x-request-id`, trace context.
#[inline]
fn clean_request(cx: &Context<'_>, parts: &mut http::request::Parts, upgrade: bool) {
    let settings = &cx.state.settings;
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
    if !settings.trust_shadow_header {
        parts.headers.remove(X_STRANGLER_SHADOW);
    }
    for name in cx.active.table.claim_headers() {
        parts.headers.remove(name);
    }
    let proto = if cx.state.tls.is_some() {
        "https"
    } else {
        "http"
    };
    set_forwarded(&mut parts.headers, cx.peer.ip(), proto, host.as_ref());
    append_via(&mut parts.headers, &cx.state.via);
    parts.headers.insert(X_REQUEST_ID, cx.request_id.clone());
    if !valid_traceparent(&parts.headers) {
        parts.headers.insert(TRACEPARENT, new_traceparent());
        parts.headers.remove(TRACESTATE);
    }
    parts.version = Version::HTTP_11;
}

/// Phase 7: the shadow leg of a request chosen for mirroring.
fn start_shadow(
    cx: &Context<'_>,
    routed: &Routed<'_>,
    plan: shadow::Plan,
    out: &Outbound,
) -> shadow::Feed {
    let shadow = cx.active.upstreams[plan.shadow].clone();
    let primary = shadow::Primary {
        parts: &out.parts,
        pq: out.pq.clone(),
        request_id: cx.request_id,
        upstream: cx.active.upstreams[routed.backend].clone(),
        deadline: out.deadline,
        empty: out.empty,
    };
    shadow::start(cx.state.shadows(), plan, shadow, primary)
}

/// Phase 9: the backend's answer, streamed back to the client (its copy teed to the shadow
/// leg), or the tunnel when it switched protocols.
#[inline]
fn respond(
    cx: &Context<'_>,
    answered: Answered,
    client_upgrade: Option<OnUpgrade>,
    feed: Option<shadow::Feed>,
    keep: Option<crate::upstream::tee::Tee>,
) -> Result<Response<ResponseBody>, ProxyError> {
    let Answered {
        resp,
        lease,
        deadline,
        backend,
    } = answered;
    let upstream = &cx.active.upstreams[backend];
    let (mut parts, body) = resp.into_parts();
    let switching = parts.status == StatusCode::SWITCHING_PROTOCOLS;
    strip_hop_by_hop(&mut parts.headers, switching && client_upgrade.is_some());
    append_via(&mut parts.headers, &cx.state.via);
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
    let tee = feed.and_then(|f| f.primary_answered(&parts, cx.start.elapsed()));
    Ok(Response::from_parts(
        parts,
        ResponseBody::upstream_kept(body, deadline, upstream.timeout_counter(), tee, keep, lease),
    ))
}

/// A request the proxy answers itself: logged (server errors as warnings), then JSON.
fn refused(cx: &Context<'_>, trace: &Trace, error: &ProxyError) -> Response<ResponseBody> {
    let route = trace
        .route
        .map(|id| cx.active.table.route(id).prefix.as_str());
    let id = cx.request_id;
    if error.status().is_server_error() {
        // Once per backend (or route) and kind of failure, then at most once per 10 s with
        // how many were left out: a backend that is down must not write a line per request.
        let (subject, kind) = match error {
            ProxyError::UpstreamUnavailable { backend, kind, .. } => {
                (backend.as_str(), kind.as_str())
            }
            ProxyError::UpstreamTimeout { backend, .. } => (backend.as_str(), "timeout"),
            other => (route.unwrap_or(""), other.code()),
        };
        if let Some(left_out) = cx.state.quiet.admit(subject, kind) {
            warn!(%error, source = ?std::error::Error::source(error), ?route, ?id, similar_left_out = left_out, "proxy error");
        }
    } else {
        debug!(%error, ?route, ?id, "request refused");
    }
    crate::respond::error_response(error, cx.request_id)
}

/// The access log entry of a request (emitted when its body ends).
fn access_entry(
    cx: &Context<'_>,
    trace: &Trace,
    method: Method,
    path: String,
    status: StatusCode,
) -> AccessLog {
    let table = &cx.active.table;
    AccessLog {
        method,
        path,
        route: trace.route.map(|id| table.route(id).prefix.clone()),
        backend: trace.backend.map(|id| table.backend(id).name.clone()),
        status: status.as_u16(),
        client: cx.client,
        auth: trace.auth,
        limit: trace.limit,
        stale: trace.degraded.is_some(),
        request_id: cx.request_id.to_str().unwrap_or_default().to_string(),
        shadowed: trace.shadowed,
        start: cx.start,
        bytes: 0,
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

/// Joins an upgraded client connection with the upgraded upstream one, both ways, until
/// either side closes. Runs on its own task: reloads and the request path never wait on it.
async fn tunnel(client: OnUpgrade, upstream: OnUpgrade) {
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

//! The request service: one request's life as a fixed list of phases over one per-request
//! `Ctx`, in request order (`exchange` reads as the list):
//!
//! 1. **request** (`request.rs`): checks before routing and the route lookup; `auth`
//!    (`crate::auth`); `rate_limit` (`crate::limit`).
//! 2. **choose** (`choose.rs`): who answers (a tripped guard, else the canary); the checks
//!    before anything is sent (the body limit).
//! 3. **copies** (`choose.rs`): the shadow leg (`crate::shadow`), the stale-if-error plan
//!    (`crate::stale`), the write event (`emit.rs`, `crate::events`).
//! 4. **prepare** (`choose.rs`): clean headers, the backend's target, the deadline; the shadow
//!    leg starts.
//! 5. **send** (`fallback.rs`): the chosen backend, its retries inside (`crate::upstream`),
//!    then the route's fallback where safe; the route's guard counts the first attempt.
//! 6. **answer** (`answer.rs`): the backend's answer streamed back with its copies, the
//!    tunnel, or on failure the stored copy (`crate::stale`).
//! 7. **finish** (here): metrics, the `request` event, the access log (written when the body
//!    ends), the answer's headers.
//!
//! A phase is a function that can be read alone; what it learns goes into `Ctx` as typed
//! values (never strings matched again). A new feature adds its module, one phase function
//! and one line in `exchange`. Errors become responses in one place (`refused`). Nothing here
//! blocks, locks, or buffers a body; no phase is a boxed future unless the route uses its
//! feature (auth and rate limits box theirs, so plain routes carry none of their state).

mod answer;
mod choose;
mod emit;
mod fallback;
mod request;

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use http::{HeaderValue, Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use tokio::time::Instant;
use tracing::{debug, warn, Instrument};

use crate::access::AccessLog;
use crate::activity::Watch;
use crate::error::ProxyError;
use crate::headers::*;
use crate::jwt::Claims;
use crate::routes::{BackendId, Route, RouteId};
use crate::state::{Active, RouteRuntime, State};
use crate::upstream::body::ResponseBody;
pub use crate::upstream::idempotent;

/// One request's context: what every phase may read, and what the phases learn (for the
/// answer's headers, the metrics, the events and the access log).
struct Ctx<'a> {
    state: &'a State,
    active: &'a Active,
    peer: SocketAddr,
    /// The client's address: the peer, or from `X-Forwarded-For` behind trusted proxies.
    client: IpAddr,
    request_id: &'a HeaderValue,
    /// The connection's watchdog, which keeps the upstream deadline (HTTP/1.1 listeners).
    watch: Option<Watch>,
    /// Which of the headers the phases read or rewrite the request carries.
    present: Present,
    start: Instant,
    /// The route it matched.
    route: Option<RouteId>,
    /// The backend chosen; once answered, the one that answered (the fallback's, when it did).
    backend: Option<BackendId>,
    /// The verified token's claims (a route with `auth`).
    claims: Option<Arc<Claims>>,
    /// The auth outcome of a route with `auth`.
    auth: Option<crate::auth::Outcome>,
    /// The rate-limit decision of a route with `rate_limit`, and its answer's headers
    /// (`RateLimit-Policy`, `RateLimit`).
    limit: Option<crate::limit::Decision>,
    limit_headers: Option<(Option<HeaderValue>, Option<HeaderValue>)>,
    /// Whether a shadow copy was sent.
    shadowed: bool,
    /// The failure a stored copy answered for (`stale_if_error`): counted as that status.
    degraded: Option<StatusCode>,
}

/// The route a request matched, with its runtime and the backend chosen to answer.
struct Routed<'a> {
    route: &'a Route,
    runtime: &'a RouteRuntime,
    backend: BackendId,
}

/// Serves one client request. Never fails: errors are answered as JSON.
///
/// This and [`exchange`] return their futures rather than being `async fn`s: an `async fn`
/// keeps its arguments twice in its state (as given and as bound), and the request's future
/// is copied whole when it starts (it is boxed per request).
#[allow(clippy::manual_async_fn)]
pub fn handle(
    state: Arc<State>,
    req: Request<Incoming>,
    peer: SocketAddr,
    watch: Option<Watch>,
) -> impl Future<Output = Response<ResponseBody>> + Send {
    async move {
        let start = Instant::now();
        let active = state.active();
        let present = Present::of(req.headers());
        let request_id = present
            .has(Present::X_REQUEST_ID)
            .then(|| valid_request_id(req.headers()).cloned())
            .flatten()
            .unwrap_or_else(|| state.ids.next());
        let client = client_address(req.headers(), peer.ip(), &state.settings.trusted_proxies);
        let mut cx = Ctx {
            state: &state,
            active: &active,
            peer,
            client,
            request_id: &request_id,
            watch,
            present,
            start,
            route: None,
            backend: None,
            claims: None,
            auth: None,
            limit: None,
            limit_headers: None,
            shadowed: false,
            degraded: None,
        };
        let span = tracing::debug_span!("request", id = ?request_id, method = %req.method(), path = %req.uri().path());
        let log_head = (state.settings.access_log && AccessLog::enabled())
            .then(|| (req.method().clone(), req.uri().path().to_string()));
        let event_head = state
            .events()
            .map(|_| (req.method().clone(), req.uri().path_and_query().cloned()));
        // Instrumenting costs even with the span disabled; only pay for it when it records
        // (boxed then, so the request's future does not hold the phases twice).
        let result = if span.is_disabled() {
            exchange(&mut cx, req).await
        } else {
            Box::pin(exchange(&mut cx, req).instrument(span)).await
        };
        let resp = result.unwrap_or_else(|error| refused(&cx, &error));
        finish(&mut cx, resp, log_head, event_head)
    }
}

/// The phases, in request order.
#[allow(clippy::manual_async_fn)]
fn exchange<'c, 'a>(
    cx: &'c mut Ctx<'a>,
    mut req: Request<Incoming>,
) -> impl Future<Output = Result<Response<ResponseBody>, ProxyError>> + Send + use<'c, 'a> {
    async move {
        let id = request::route(cx, &req)?;
        request::authenticate(cx, id, &req).await?;
        request::rate_limit(cx, id, &req).await?;
        let routed = choose::backend(cx, id, &req);
        choose::admit(cx, &req)?;
        let mut copies = choose::copies(cx, &routed, &mut req);
        let out = choose::prepare(cx, &routed, req, &mut copies)?;
        let mut feed = copies
            .shadow
            .take()
            .map(|plan| Box::new(choose::start_shadow(cx, &routed, *plan, &out)));
        let (req, first) = fallback::First::new(cx, &routed, out, feed.as_deref_mut());
        let sent = first.send(cx, req).await;
        let outcome = fallback::settle(cx, &routed, sent, first).await;
        answer::answer(cx, outcome, copies, feed)
    }
}

/// After the answer: metrics (a stale answer counts as the failure it replaced: a degraded
/// route must look degraded), the `request` event, the access log (written when the body
/// ends), the rate-limit and request-id headers.
#[inline]
fn finish(
    cx: &mut Ctx<'_>,
    mut resp: Response<ResponseBody>,
    log_head: Option<(Method, String)>,
    event_head: Option<(Method, Option<http::uri::PathAndQuery>)>,
) -> Response<ResponseBody> {
    let answered = cx.route.map(|r| (r, cx.backend));
    let status = resp.status();
    cx.state
        .record(cx.active, answered, cx.degraded.unwrap_or(status), cx.start);
    if let (Some(events), Some((method, pq))) = (cx.state.events(), event_head) {
        emit::request_event(cx, events, &method, pq.as_ref(), status);
    }
    if let Some((method, path)) = log_head {
        let entry = access_entry(cx, method, path, status);
        resp.body_mut().log(entry);
    }
    if let Some((policy, state)) = cx.limit_headers.take() {
        let h = resp.headers_mut();
        if let Some(p) = policy {
            h.insert(RATELIMIT_POLICY, p);
        }
        if let Some(s) = state {
            h.insert(RATELIMIT, s);
        }
    }
    resp.headers_mut()
        .insert(X_REQUEST_ID, cx.request_id.clone());
    resp
}

/// `RateLimit-Policy` and `RateLimit` (draft-ietf-httpapi-ratelimit-headers).
const RATELIMIT_POLICY: http::HeaderName = http::HeaderName::from_static("ratelimit-policy");
const RATELIMIT: http::HeaderName = http::HeaderName::from_static("ratelimit");

/// A request the proxy answers itself: logged (server errors as warnings), then JSON.
fn refused(cx: &Ctx<'_>, error: &ProxyError) -> Response<ResponseBody> {
    let route = cx.route.map(|id| cx.active.table.route(id).prefix.as_str());
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
fn access_entry(cx: &Ctx<'_>, method: Method, path: String, status: StatusCode) -> AccessLog {
    let table = &cx.active.table;
    AccessLog {
        method,
        path,
        route: cx.route.map(|id| table.route(id).prefix.clone()),
        backend: cx.backend.map(|id| table.backend(id).name.clone()),
        status: status.as_u16(),
        client: cx.client,
        auth: cx.auth.map(crate::auth::Outcome::as_str),
        limit: cx.limit.map(crate::limit::Decision::as_str),
        stale: cx.degraded.is_some(),
        request_id: cx.request_id.to_str().unwrap_or_default().to_string(),
        shadowed: cx.shadowed,
        start: cx.start,
        bytes: 0,
    }
}

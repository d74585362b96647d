//! The phases between a request that may be asked and the request a backend gets: who
//! answers (a tripped guard, else the canary), the checks before anything is sent (the body
//! limit), the copies this request makes (a shadow leg, a stale-if-error plan, a write
//! event), and the request as the backend gets it (clean headers, its target, its deadline).

use std::sync::Arc;

use http::uri::PathAndQuery;
use http::{header, HeaderValue, Method, Request, Version};
use hyper::body::Incoming;
use hyper::upgrade::OnUpgrade;
use tokio::time::Instant;

use super::emit::{self, Write};
use super::{Ctx, Routed};
use crate::error::ProxyError;
use crate::headers::*;
use crate::routes::{Route, RouteId};
use crate::shadow;
use crate::stale;
use crate::upstream::tee::Tee;

/// Who answers. A tripped guard sends the route's traffic where it says (looked up in this
/// generation's table: backend indices move when backends come and go); otherwise the
/// canary decides.
#[inline]
pub(super) fn backend<'a>(cx: &mut Ctx<'a>, id: RouteId, req: &Request<Incoming>) -> Routed<'a> {
    let active = cx.active;
    let route = active.table.route(id);
    let runtime = &active.routes[id];
    let backend = match (&runtime.guard, &route.guard) {
        (Some(g), Some(config)) if g.is_tripped() => config.to,
        _ => route.pick_backend(req.headers(), cx.client, cx.claims.as_deref()),
    };
    cx.backend = Some(backend);
    Routed {
        route,
        runtime,
        backend,
    }
}

/// Checks that may refuse a routed request before anything is sent upstream.
#[inline]
pub(super) fn admit(cx: &Ctx<'_>, req: &Request<Incoming>) -> Result<(), ProxyError> {
    if !cx.present.has(Present::CONTENT_LENGTH) {
        return Ok(());
    }
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

/// The copies one request makes besides its answer, decided before its headers are cleaned.
/// Each boxed: a plain route makes none, and this is held across the send and moved into the
/// answer, so it stays a few words.
pub(super) struct Copies {
    /// The client's side of an upgrade the route tunnels.
    pub upgrade: Option<OnUpgrade>,
    /// A shadow leg to start (the request was chosen for mirroring).
    pub shadow: Option<Box<shadow::Plan>>,
    /// What stale-if-error does with this request.
    pub stale: Option<Box<stale::Plan>>,
    /// A write event waiting for its answer, and the tee of its request body.
    pub write: Option<Box<Write>>,
    pub capture: Option<Box<Tee>>,
}

/// The copies of this request: whether it is mirrored (a request marked as a shadow copy
/// never is, whether or not the marker is trusted onward), its stale plan, its write event.
pub(super) fn copies(cx: &Ctx<'_>, routed: &Routed<'_>, req: &mut Request<Incoming>) -> Copies {
    let upgrade = cx.present.has(Present::UPGRADE) && tunnels(routed, req);
    let shadow = routed.runtime.shadow.as_ref().and_then(|slot| {
        let mut plan =
            cx.state
                .shadows()
                .plan(slot, routed.backend, req.method(), req.headers(), upgrade)?;
        plan.events = mismatch_events(cx, routed.route);
        Some(Box::new(plan))
    });
    let stale = routed.runtime.stale.as_ref().and_then(|counters| {
        let host = request_host(req.headers(), req.uri()).ok().flatten();
        let claims = cx.claims.as_deref();
        let plan = stale::Plan::new(routed.route, counters, req, host, claims)?;
        // A token was presented but gave no claims (observe mode forwarded a bad one).
        let presented = claims.is_none() && cx.auth.is_some_and(|o| o.presented());
        Some(Box::new(if presented {
            plan.presented_credentials()
        } else {
            plan
        }))
    });
    let (write, capture) = match emit::plan_write(cx, routed, req) {
        Some((write, capture)) => (Some(Box::new(write)), capture.map(Box::new)),
        None => (None, None),
    };
    Copies {
        upgrade: upgrade.then(|| hyper::upgrade::on(req)),
        shadow,
        stale,
        write,
        capture,
    }
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

/// Where a shadow leg of `route` publishes its mismatches, if it does.
fn mismatch_events(cx: &Ctx<'_>, route: &Route) -> Option<(Arc<crate::events::Events>, String)> {
    let settings = route.events.as_ref().filter(|e| e.mismatch)?;
    Some((cx.state.events()?.clone(), settings.key.clone()))
}

/// A request ready for its backend.
pub(super) struct Outbound {
    pub parts: http::request::Parts,
    pub body: Incoming,
    /// The client's path and query (the backend's base path is joined to it).
    pub pq: Option<PathAndQuery>,
    /// Whether the request certainly has no body.
    pub empty: bool,
    /// When the answering backend's whole answer is due.
    pub deadline: Instant,
    /// Whether it is an upgrade the route tunnels.
    pub upgrade: bool,
    /// Copies the request body for a write event.
    pub capture: Option<Tee>,
}

/// The request as the backend gets it: clean headers, its target, its deadline.
#[inline]
pub(super) fn prepare(
    cx: &Ctx<'_>,
    routed: &Routed<'_>,
    req: Request<Incoming>,
    copies: &mut Copies,
) -> Result<Outbound, ProxyError> {
    let upgrade = copies.upgrade.is_some();
    let upstream = &cx.active.upstreams[routed.backend];
    let (mut parts, body) = req.into_parts();
    clean_request(cx, &mut parts, upgrade);
    if let Some(auth) = &routed.route.auth {
        let provider = cx.active.table.provider(auth.provider);
        crate::auth::apply(provider, cx.claims.as_deref(), &mut parts.headers);
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
        capture: copies.capture.take().map(|t| *t),
    })
}

/// Hop-by-hop removal, the shadow marker, client-sent copies of claim headers, `Host`,
/// `x-forwarded-*`, `via`, `x-request-id`, trace context.
#[inline]
fn clean_request(cx: &Ctx<'_>, parts: &mut http::request::Parts, upgrade: bool) {
    let settings = &cx.state.settings;
    // Room for the headers added below at once, not one growth of the map at a time.
    parts.headers.reserve(6);
    // HTTP/2 carries the host as `:authority`, an absolute-form target as its authority;
    // either was what routed the request, so the backend's Host says the same.
    let present = cx.present;
    let host = if parts.uri.authority().is_some() {
        set_host_from_target(&mut parts.headers, &parts.uri);
        parts.headers.get(header::HOST).cloned()
    } else if present.has(Present::HOST) {
        parts.headers.get(header::HOST).cloned()
    } else {
        None
    };
    let trailers = present.has(Present::TE) && accepts_trailers(&parts.headers);
    strip_present(&mut parts.headers, present, upgrade);
    if trailers {
        parts
            .headers
            .insert(header::TE, HeaderValue::from_static("trailers"));
    }
    if !settings.trust_shadow_header && present.has(Present::X_STRANGLER_SHADOW) {
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
    set_forwarded(
        &mut parts.headers,
        present,
        cx.peer.ip(),
        proto,
        host.as_ref(),
    );
    append_via(&mut parts.headers, &cx.state.via);
    parts.headers.insert(X_REQUEST_ID, cx.request_id.clone());
    if !(present.has(Present::TRACEPARENT) && valid_traceparent(&parts.headers)) {
        parts.headers.insert(TRACEPARENT, new_traceparent());
        if present.has(Present::TRACESTATE) {
            parts.headers.remove(TRACESTATE);
        }
    }
    parts.version = Version::HTTP_11;
}

/// The shadow leg of a request chosen for mirroring: started before the primary is sent,
/// fed by the primary exchange's tees.
pub(super) fn start_shadow(
    cx: &mut Ctx<'_>,
    routed: &Routed<'_>,
    plan: shadow::Plan,
    out: &Outbound,
) -> shadow::Feed {
    cx.shadowed = true;
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

/// Whether the request certainly has no body (so the upstream request can say so).
fn body_is_empty(method: &Method, body: &Incoming) -> bool {
    use http_body::Body as _;
    body.is_end_stream()
        && matches!(
            *method,
            Method::GET | Method::HEAD | Method::OPTIONS | Method::DELETE
        )
}

//! The request phases: what is asked (checks that come before routing, the route lookup),
//! who asks (a route's `auth`), and whether it may be asked now (a route's `rate_limit`).
//! A request refused here reaches no backend and no shadow, and is no backend error for the
//! guard. What they learn goes into the request's [`Ctx`].

use http::{Method, Request, Version};
use hyper::body::Incoming;

use super::Ctx;
use crate::error::ProxyError;
use crate::headers::*;
use crate::routes::RouteId;

/// Request checks that come before routing, then the route lookup.
#[inline]
pub(super) fn route(cx: &mut Ctx<'_>, req: &Request<Incoming>) -> Result<RouteId, ProxyError> {
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
    let host = if cx.present.has(Present::HOST) || req.uri().authority().is_some() {
        request_host(req.headers(), req.uri())
            .map_err(|reason| ProxyError::BadRequest { reason })?
    } else {
        None
    };
    if host.is_none() && req.version() == Version::HTTP_11 {
        return bad("HTTP/1.1 requests need a Host header");
    }
    let via = &cx.state.settings.via;
    if cx.present.has(Present::VIA) && via_has(req.headers(), via) {
        return Err(ProxyError::LoopDetected { name: via.clone() });
    }
    let id = cx
        .active
        .table
        .lookup(req.method(), host, path)
        .ok_or(ProxyError::NoRoute)?;
    cx.route = Some(id);
    Ok(id)
}

/// Who is calling, on a route with `auth`: the verified token's claims go into the context,
/// or the request is refused. Boxed, so routes without `auth` carry none of its state.
pub(super) async fn authenticate(
    cx: &mut Ctx<'_>,
    id: RouteId,
    req: &Request<Incoming>,
) -> Result<(), ProxyError> {
    let active = cx.active;
    let route = active.table.route(id);
    let (Some(auth), Some(rt)) = (&route.auth, &active.routes[id].auth) else {
        return Ok(());
    };
    let provider = active.table.provider(auth.provider);
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
            cx.auth = Some(passed.outcome);
            cx.claims = passed.claims;
            Ok(())
        }
        Err(refusal) => {
            cx.auth = Some(crate::auth::Outcome::Refused(refusal.reason));
            Err(refusal.into_error())
        }
    }
}

/// A route's `rate_limit` windows (a key may be a verified claim). A limited request is
/// refused at once. Boxed, so routes without limits carry none of its state.
pub(super) async fn rate_limit(
    cx: &mut Ctx<'_>,
    id: RouteId,
    req: &Request<Incoming>,
) -> Result<(), ProxyError> {
    let active = cx.active;
    let Some(limits) = &active.routes[id].limits else {
        return Ok(());
    };
    let route = active.table.route(id);
    let checked = Box::pin(cx.state.registries.limits.check(
        cx.state.metrics(),
        route,
        limits,
        req.headers(),
        cx.client,
        cx.claims.as_deref(),
    ))
    .await;
    cx.limit = Some(checked.outcome);
    cx.limit_headers = Some((checked.policy, checked.state));
    match checked.limited {
        Some(retry_after) => Err(ProxyError::RateLimited { retry_after }),
        None => Ok(()),
    }
}

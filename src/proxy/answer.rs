//! The answer phases: the backend's answer streamed back to the client (its copies teed to
//! the shadow leg, the stale store or a write event), the tunnel when it switched protocols,
//! or, when the route's `stale_if_error` takes the failure (`stale`), the stored copy.

use http::{Response, StatusCode};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tracing::{debug, Instrument};

use super::choose::Copies;
use super::fallback::{Answered, Unanswered};
use super::Ctx;
use crate::error::ProxyError;
use crate::headers::*;
use crate::shadow;
use crate::stale;
use crate::upstream::body::{Kept, ResponseBody};

/// The client's answer to an exchange that was sent.
#[inline]
pub(super) fn answer(
    cx: &mut Ctx<'_>,
    outcome: Result<Answered, Unanswered>,
    copies: Copies,
    feed: Option<Box<shadow::Feed>>,
) -> Result<Response<ResponseBody>, ProxyError> {
    let answered = match outcome {
        Ok(answered) => answered,
        Err(Unanswered { error, backend }) => {
            // Counted against the backend tried last.
            cx.backend = Some(backend);
            return match on_failure(cx, copies.stale.as_deref(), &error) {
                Some(copy) => Ok(copy),
                None => Err(error),
            };
        }
    };
    cx.backend = Some(answered.backend);
    let status = answered.resp.status();
    if let Some(plan) = copies.stale.as_ref().filter(|p| p.replaces_answer(status)) {
        if let Some(copy) = from_store(cx, plan, status) {
            return Ok(copy);
        }
    }
    let store = &cx.state.registries.stale;
    let stored = copies
        .stale
        .and_then(|p| (*p).answered(store, status, answered.resp.headers()))
        .map(Kept::Stale);
    let written = copies.write.and_then(|w| {
        let backend = &cx.active.table.backend(answered.backend).name;
        (*w).answered(backend, status, answered.resp.headers())
    });
    respond(
        cx,
        answered,
        copies.upgrade,
        feed,
        stored.or(written.map(Kept::Write)),
    )
}

/// Stale-if-error after the backends failed: the stored copy, when the route's `on` takes
/// this failure and the store has one young enough.
fn on_failure(
    cx: &mut Ctx<'_>,
    plan: Option<&stale::Plan>,
    error: &ProxyError,
) -> Option<Response<ResponseBody>> {
    let plan = plan.filter(|p| p.replaces_failure(error))?;
    let copy = from_store(cx, plan, error.status())?;
    debug!(%error, "answered from the stale store");
    Some(copy)
}

/// The stored copy of a request whose backends failed with `status`; the request counts as
/// that failure (a degraded route must look degraded).
fn from_store(
    cx: &mut Ctx<'_>,
    plan: &stale::Plan,
    status: StatusCode,
) -> Option<Response<ResponseBody>> {
    let copy = plan.serve(&cx.state.registries.stale)?;
    cx.degraded = Some(status);
    let (mut parts, body) = copy.into_parts();
    append_via(&mut parts.headers, &cx.state.via);
    Some(Response::from_parts(parts, ResponseBody::full(body)))
}

/// The backend's answer, streamed back to the client (its copy teed to the shadow leg), or
/// the tunnel when it switched protocols.
#[inline]
fn respond(
    cx: &Ctx<'_>,
    answered: Answered,
    client_upgrade: Option<OnUpgrade>,
    feed: Option<Box<shadow::Feed>>,
    keep: Option<Kept>,
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
    let tee = feed.and_then(|f| (*f).primary_answered(&parts, cx.start.elapsed()));
    Ok(Response::from_parts(
        parts,
        ResponseBody::upstream_kept(body, deadline, upstream.timeout_counter(), tee, keep, lease),
    ))
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

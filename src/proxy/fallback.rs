//! Phase 6, sending: to the chosen backend, and again to the route's `fallback` when the first
//! attempt failed in a way that is safe to repeat: for any method when the request never left
//! (no connection could be made), for idempotent methods on a timeout or a 5xx head (nothing
//! has reached the client yet). Otherwise the first attempt's outcome stands. The route's
//! guard counts the first attempt.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use http::{Method, Request, Response};
use hyper::body::Incoming;
use metrics::Label;
use tokio::sync::oneshot;
use tokio::time::Instant;
use tracing::debug;

use super::choose::Outbound;
use super::{idempotent, Ctx, Routed};
use crate::error::ProxyError;
use crate::metrics::FALLBACK_TOTAL;
use crate::routes::BackendId;
use crate::shadow;
use crate::upstream::body::UpstreamBody;
use crate::upstream::tee::{Budget, Captured, Tee};
use crate::upstream::{Failed, Lease, Resend, Upstream};

/// An answer head, with the connection it came on and the backend that gave it.
pub(super) struct Answered {
    pub resp: Response<Incoming>,
    pub lease: Lease,
    /// When the rest of the answer is due.
    pub deadline: Instant,
    pub backend: BackendId,
}

/// No answer: why, and the backend tried last.
pub(super) struct Unanswered {
    pub error: ProxyError,
    pub backend: BackendId,
}

/// The fallback's turn, run only when the first attempt's outcome calls for it.
pub(super) type Second<'a> =
    Pin<Box<dyn Future<Output = Result<Answered, Unanswered>> + Send + 'a>>;

/// The first attempt, to the chosen backend: what it takes to send the request (its body
/// teed to the shadow leg through `feed`) and to send it again to the fallback. The caller
/// awaits [`First::send`], then [`settle`]s; this is not one `async fn` because every level
/// of futures is copied into the request's future at its start (a few KiB per level).
pub(super) struct First {
    pub fallback: Option<(BackendId, Retry)>,
    pub deadline: Instant,
    resend: Resend,
    backend: BackendId,
}

impl First {
    /// The request to the chosen backend (its own retries inside).
    pub fn new(
        cx: &Ctx<'_>,
        routed: &Routed<'_>,
        out: Outbound,
        feed: Option<&mut shadow::Feed>,
    ) -> (Request<UpstreamBody>, First) {
        let deadline = out.deadline;
        let (req, fallback) = first_request(cx, routed, out, feed);
        let resend = if routed.route.retry_non_idempotent {
            Resend::Any
        } else {
            Resend::Idempotent
        };
        let first = First {
            fallback,
            deadline,
            resend,
            backend: routed.backend,
        };
        (req, first)
    }

    /// Sends `req` to the chosen backend: the upstream's own future, not wrapped in another.
    pub fn send<'a>(
        &self,
        cx: &Ctx<'a>,
        req: Request<UpstreamBody>,
    ) -> impl Future<Output = Result<(Response<Incoming>, Lease), Failed>> + Send + 'a {
        let active = cx.active;
        active.upstreams[self.backend].send_with(req, self.deadline, self.resend, cx.watch.clone())
    }
}

/// The first attempt's request for the chosen backend (its body teed to the shadow leg
/// through `feed`), and what it takes to send it again to the route's fallback.
fn first_request(
    cx: &Ctx<'_>,
    routed: &Routed<'_>,
    out: Outbound,
    feed: Option<&mut shadow::Feed>,
) -> (Request<UpstreamBody>, Option<(BackendId, Retry)>) {
    let fallback = routed
        .route
        .fallback
        .filter(|&f| f != routed.backend && !out.upgrade);
    let (retry, replay_tee) = match fallback {
        Some(_) => Retry::prepare(&out, &cx.state.shadows().budget),
        None => (None, None),
    };
    let body = if out.empty {
        UpstreamBody::empty()
    } else {
        let shadow_tee = feed.and_then(|f| f.request_tee.take());
        let limit = cx.state.settings.max_request_body;
        UpstreamBody::limited(out.body, limit, shadow_tee, replay_tee, out.capture)
    };
    (Request::from_parts(out.parts, body), fallback.zip(retry))
}

/// The first attempt's outcome, counted by the route's guard: it stands, or the fallback's
/// turn comes (a boxed future: the second attempt is rare, and inline it would enlarge every
/// request's future).
pub(super) fn settle<'a>(
    cx: &'a Ctx<'a>,
    routed: &'a Routed<'a>,
    sent: Result<(Response<Incoming>, Lease), Failed>,
    first: First,
) -> Settled<'a> {
    guard_watch(cx, routed, &sent);
    let (from, deadline) = (routed.backend, first.deadline);
    match (first.fallback, sent) {
        (Some((to, retry)), sent) => {
            Settled::Second(Box::pin(to_fallback(cx, routed, to, sent, retry, deadline)))
        }
        (None, Ok((resp, lease))) => Settled::Stands(Some(Ok(Answered {
            resp,
            lease,
            deadline,
            backend: from,
        }))),
        (None, Err(failed)) => Settled::Stands(Some(Err(Unanswered {
            error: failed.error,
            backend: from,
        }))),
    }
}

/// The exchange's outcome: the first attempt's, ready at once, or the fallback's to wait for.
/// A small future of its own, so the phase list awaits one value and holds no more state.
pub(super) enum Settled<'a> {
    Stands(Option<Result<Answered, Unanswered>>),
    Second(Second<'a>),
}

impl Future for Settled<'_> {
    type Output = Result<Answered, Unanswered>;

    fn poll(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        match self.get_mut() {
            // Taken once; a future polled again after it finished may stay pending.
            Settled::Stands(outcome) => outcome
                .take()
                .map_or(std::task::Poll::Pending, std::task::Poll::Ready),
            Settled::Second(second) => second.as_mut().poll(cx),
        }
    }
}

/// The fallback's turn, when the first attempt's outcome allows it.
async fn to_fallback(
    cx: &Ctx<'_>,
    routed: &Routed<'_>,
    to: BackendId,
    first: Result<(Response<Incoming>, Lease), Failed>,
    retry: Retry,
    deadline: Instant,
) -> Result<Answered, Unanswered> {
    let from = routed.backend;
    let target = &cx.active.upstreams[to];
    let req = match next(first, retry, target) {
        Next::Stands(resp, lease) => {
            return Ok(Answered {
                resp,
                lease,
                deadline,
                backend: from,
            })
        }
        Next::Fails(error) => {
            return Err(Unanswered {
                error,
                backend: from,
            })
        }
        Next::Send(req) => *req,
    };
    count(cx, routed, to);
    let deadline = Instant::now() + target.timeout;
    match target.send(req, deadline).await {
        Ok((resp, lease)) => Ok(Answered {
            resp,
            lease,
            deadline,
            backend: to,
        }),
        Err(failed) => Err(Unanswered {
            error: failed.error,
            backend: to,
        }),
    }
}

/// What follows the first attempt on a route with a fallback.
enum Next {
    /// The first answer stands.
    Stands(Response<Incoming>, Lease),
    /// The first failure stands.
    Fails(ProxyError),
    /// This request goes to the fallback (boxed: the rarest case, and the largest).
    Send(Box<Request<UpstreamBody>>),
}

fn next(
    first: Result<(Response<Incoming>, Lease), Failed>,
    retry: Retry,
    target: &Upstream,
) -> Next {
    match first {
        Ok((resp, lease)) if resp.status().is_server_error() && retry.idempotent => {
            match retry.rebuild(target) {
                Some(req) => Next::Send(Box::new(req)),
                None => Next::Stands(resp, lease),
            }
        }
        Ok((resp, lease)) => Next::Stands(resp, lease),
        // Never sent: any method may go elsewhere.
        Err(Failed {
            unsent: Some(req), ..
        }) => {
            let mut req = req;
            match target.uri(retry.pq.as_ref()) {
                Ok(uri) => {
                    *req.uri_mut() = uri;
                    Next::Send(req)
                }
                Err(_) => Next::Fails(ProxyError::BadRequest {
                    reason: "the request target cannot be forwarded",
                }),
            }
        }
        Err(Failed {
            error: error @ ProxyError::UpstreamTimeout { .. },
            ..
        }) => match retry.idempotent.then(|| retry.rebuild(target)).flatten() {
            Some(req) => Next::Send(Box::new(req)),
            None => Next::Fails(error),
        },
        Err(failed) => Next::Fails(failed.error),
    }
}

/// `strangler_fallback_total{route, from, to}`, and a debug line.
fn count(cx: &Ctx<'_>, routed: &Routed<'_>, to: BackendId) {
    let table = &cx.active.table;
    let route = &routed.route.prefix;
    let (from, to) = (&table.backend(routed.backend).name, &table.backend(to).name);
    cx.state
        .metrics()
        .counter(
            FALLBACK_TOTAL,
            vec![
                Label::new("route", route.clone()),
                Label::new("from", from.clone()),
                Label::new("to", to.clone()),
            ],
        )
        .increment(1);
    debug!(route = %route, from = %from, to = %to, "answered by the fallback");
}

/// Feeds the route's guard with the first attempt's outcome when the attempted backend is the
/// one it watches (not the legacy one, not where it rolls back to). Client faults are not
/// the backend's errors.
fn guard_watch(
    cx: &Ctx<'_>,
    routed: &Routed<'_>,
    first: &Result<(Response<Incoming>, Lease), Failed>,
) {
    let (Some(guard), Some(config)) = (&routed.runtime.guard, &routed.route.guard) else {
        return;
    };
    let backend = routed.backend;
    if Some(backend) == cx.active.table.legacy() || backend == config.to {
        return;
    }
    let error = match first {
        Ok((resp, _)) => resp.status().is_server_error(),
        Err(f) => matches!(
            f.error,
            ProxyError::UpstreamUnavailable { .. } | ProxyError::UpstreamTimeout { .. }
        ),
    };
    guard.record(cx.start, error);
}

/// Request bodies up to this size are kept so an idempotent request can be sent again to a
/// fallback after a timeout or a 5xx; a larger body is not replayed (the first answer stands).
const FALLBACK_MAX_BODY: usize = 1 << 20;

/// What it takes to send a request again to a fallback backend.
pub(super) struct Retry {
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
    fn prepare(out: &Outbound, budget: &Arc<Budget>) -> (Option<Retry>, Option<Tee>) {
        let parts = &out.parts;
        let idempotent = idempotent(&parts.method);
        let (body, tee) = match (idempotent, out.empty) {
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
                pq: out.pq.clone(),
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
        to.request(self.method, self.pq.as_ref(), self.headers, bytes)
    }
}

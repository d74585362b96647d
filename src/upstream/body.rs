//! Body types of the request path. Both stream frame by frame: nothing here buffers a whole
//! body. `UpstreamBody` enforces `max_request_body` while it streams (also for chunked bodies
//! whose length is not announced); `ResponseBody` carries either an upstream's streamed body,
//! bounded by the backend's `timeout` deadline, or a small body the proxy made itself. Either
//! may carry a [`Tee`] that keeps a bounded copy for the shadow comparison.

use std::future::Future as _;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::Full;
use hyper::body::Incoming;
use tokio::time::{Instant, Sleep};

use super::tee::Tee;
use super::Lease;
use crate::access::AccessLog;
use crate::error::BoxError;

/// The request body was larger than `max_request_body`.
#[derive(Debug, thiserror::Error)]
#[error("request body exceeds {limit} bytes")]
pub struct TooLarge {
    pub limit: u64,
}

/// The body sent to an upstream.
pub enum UpstreamBody {
    /// The client's body, streamed, counted against the limit.
    Streaming {
        inner: Incoming,
        remaining: u64,
        limit: u64,
        /// Its bounded copies (shadow, fallback, write event, resend), boxed: most requests
        /// have none.
        tees: Option<Box<Tees>>,
    },
    /// A body the proxy holds whole (a bounded copy, or none); taken when sent.
    Full(Option<Bytes>),
}

/// The copies a streamed body feeds: shadow, fallback replay, write event, and the resend
/// copy an upstream keeps to send the request again after a reset.
type Tees = [Option<Tee>; 4];

impl UpstreamBody {
    /// The client's body, limited to `limit` bytes, optionally copied into `tee` (shadow),
    /// `replay` (fallback) and `event` (a write event).
    pub fn limited(
        inner: Incoming,
        limit: u64,
        tee: Option<Tee>,
        replay: Option<Tee>,
        event: Option<Tee>,
    ) -> Self {
        let mut tees = (tee.is_some() || replay.is_some() || event.is_some())
            .then(|| Box::new([tee, replay, event, None]));
        if inner.is_end_stream() {
            finish(tees.as_deref_mut());
        }
        UpstreamBody::Streaming {
            inner,
            remaining: limit,
            limit,
            tees,
        }
    }

    pub fn full(bytes: Bytes) -> Self {
        UpstreamBody::Full(Some(bytes))
    }

    pub fn empty() -> Self {
        UpstreamBody::Full(None)
    }

    /// The whole body, when the proxy holds it (not yet sent).
    pub fn held(&self) -> Option<Bytes> {
        match self {
            UpstreamBody::Full(bytes) => Some(bytes.clone().unwrap_or_default()),
            UpstreamBody::Streaming { .. } => None,
        }
    }

    /// Adds the resend copy to a streamed body that has not been polled yet.
    pub fn resend_tee(&mut self, tee: Tee) {
        if let UpstreamBody::Streaming { inner, tees, .. } = self {
            let tees = tees.get_or_insert_with(|| Box::new([None, None, None, None]));
            let mut tee = tee;
            if inner.is_end_stream() {
                tee.finish();
            }
            tees[3] = Some(tee);
        }
    }
}

/// The body ended: every copy is handed over.
fn finish(tees: Option<&mut Tees>) {
    for t in tees.into_iter().flatten().flatten() {
        t.finish();
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            UpstreamBody::Streaming {
                inner,
                remaining,
                limit,
                tees,
            } => {
                let frame = ready!(Pin::new(&mut *inner).poll_frame(cx));
                Poll::Ready(match frame {
                    Some(Ok(frame)) => {
                        let len = frame.data_ref().map_or(0, |d| d.len() as u64);
                        match remaining.checked_sub(len) {
                            Some(left) => {
                                *remaining = left;
                                if let Some(tees) = tees {
                                    // hyper stops polling once a sized body is complete, and
                                    // once trailers (which end the body) are written.
                                    let ended = inner.is_end_stream() || frame.is_trailers();
                                    for t in tees.iter_mut().flatten() {
                                        t.frame(&frame);
                                        if ended {
                                            t.finish();
                                        }
                                    }
                                }
                                Some(Ok(frame))
                            }
                            None => Some(Err(Box::new(TooLarge { limit: *limit }))),
                        }
                    }
                    Some(Err(e)) => Some(Err(Box::new(e))),
                    None => {
                        finish(tees.as_deref_mut());
                        None
                    }
                })
            }
            UpstreamBody::Full(bytes) => Poll::Ready(
                bytes
                    .take()
                    .filter(|b| !b.is_empty())
                    .map(|b| Ok(Frame::data(b))),
            ),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            UpstreamBody::Streaming { inner, .. } => inner.is_end_stream(),
            UpstreamBody::Full(bytes) => bytes.as_ref().is_none_or(Bytes::is_empty),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            UpstreamBody::Streaming { inner, .. } => inner.size_hint(),
            UpstreamBody::Full(bytes) => {
                SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64))
            }
        }
    }
}

/// The upstream did not finish its body before the backend's `timeout`.
#[derive(Debug, thiserror::Error)]
#[error("upstream response body not finished within the backend timeout")]
pub struct BodyTimeout;

/// The second copy an answer may carry besides the shadow's: for the stale store (the
/// answer to a GET) or for a write event (the answer to a write). A request has one method,
/// so never both.
pub enum Kept {
    Stale(Tee),
    Write(Tee),
}

impl Kept {
    fn tee(&mut self) -> &mut Tee {
        match self {
            Kept::Stale(t) | Kept::Write(t) => t,
        }
    }
}

/// The body sent to the client.
pub enum ResponseBody {
    Upstream {
        inner: Incoming,
        deadline: Instant,
        timer: Option<Pin<Box<Sleep>>>,
        on_timeout: Option<metrics::Counter>,
        tee: Option<Tee>,
        /// A second copy, for the stale store (boxed: rare).
        /// The answer's second copy, if the request makes one (boxed: rare).
        keep: Option<Box<Kept>>,
        /// The connection, given back once the body is complete.
        lease: Option<Lease>,
        /// The access log entry, emitted when the body ends or is dropped.
        log: Option<Box<AccessLog>>,
    },
    Full(Full<Bytes>),
}

/// The upstream body is complete: hand the copies over and the connection back.
fn completed(tee: &mut Option<Tee>, keep: &mut Option<Box<Kept>>, lease: &mut Option<Lease>) {
    if let Some(t) = tee.as_mut() {
        t.finish();
    }
    if let Some(k) = keep.as_mut() {
        k.tee().finish();
    }
    if let Some(l) = lease.take() {
        l.release();
    }
}

impl ResponseBody {
    pub fn full(bytes: Bytes) -> Self {
        ResponseBody::Full(Full::new(bytes))
    }

    /// An upstream body that must end by `deadline` (the backend's whole-response timeout),
    /// optionally copied into `tee`; its connection goes back to the pool when it is complete.
    pub fn upstream(
        inner: Incoming,
        deadline: Instant,
        on_timeout: metrics::Counter,
        tee: Option<Tee>,
        lease: Lease,
    ) -> Self {
        ResponseBody::upstream_kept(inner, deadline, on_timeout, tee, None, lease)
    }

    /// [`ResponseBody::upstream`] with a second copy for the stale store.
    pub fn upstream_kept(
        inner: Incoming,
        deadline: Instant,
        on_timeout: metrics::Counter,
        tee: Option<Tee>,
        keep: Option<Kept>,
        lease: Lease,
    ) -> Self {
        let (mut tee, mut keep, mut lease) = (tee, keep.map(Box::new), Some(lease));
        if inner.is_end_stream() {
            completed(&mut tee, &mut keep, &mut lease);
        }
        ResponseBody::Upstream {
            inner,
            deadline,
            timer: None,
            on_timeout: Some(on_timeout),
            tee,
            keep,
            lease,
            log: None,
        }
    }
}

impl ResponseBody {
    /// Attaches the access log entry: emitted now for a body the proxy made, at the end (or
    /// abandonment) of an upstream body.
    pub fn log(&mut self, mut entry: AccessLog) {
        match self {
            ResponseBody::Upstream { inner, log, .. } => {
                if inner.is_end_stream() {
                    entry.emit("complete");
                } else {
                    *log = Some(Box::new(entry));
                }
            }
            ResponseBody::Full(full) => {
                entry.bytes = full.size_hint().exact().unwrap_or(0);
                entry.emit("complete");
            }
        }
    }
}

impl Drop for ResponseBody {
    fn drop(&mut self) {
        if let ResponseBody::Upstream { log: Some(l), .. } = self {
            l.emit("aborted");
        }
    }
}

/// An upstream frame on its way to the client: copied into the tees, counted in the access
/// log; at the body's end (`ended`, the last data of a sized body, or the trailers that end
/// it) the copies are handed over and the connection given back; an error drops them.
#[inline]
fn passed(
    frame: Option<&Result<Frame<Bytes>, hyper::Error>>,
    ended: bool,
    tee: &mut Option<Tee>,
    keep: &mut Option<Box<Kept>>,
    lease: &mut Option<Lease>,
    log: &mut Option<Box<AccessLog>>,
) {
    match frame {
        Some(Ok(f)) => {
            if let Some(t) = tee.as_mut() {
                t.frame(f);
            }
            if let Some(k) = keep.as_mut() {
                k.tee().frame(f);
            }
            if let (Some(data), Some(l)) = (f.data_ref(), log.as_mut()) {
                l.bytes += data.len() as u64;
            }
            // hyper stops polling once a sized body is complete, and drops the body once it
            // has written the trailers that end it.
            if ended || f.is_trailers() {
                completed(tee, keep, lease);
                if let Some(l) = log.take() {
                    l.emit("complete");
                }
            }
        }
        None => {
            completed(tee, keep, lease);
            if let Some(l) = log.take() {
                l.emit("complete");
            }
        }
        Some(Err(_)) => {
            *tee = None;
            *keep = None;
            *lease = None;
        }
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            ResponseBody::Upstream {
                inner,
                deadline,
                timer,
                on_timeout,
                tee,
                keep,
                lease,
                log,
            } => {
                if let Poll::Ready(frame) = Pin::new(&mut *inner).poll_frame(cx) {
                    let ended = inner.is_end_stream();
                    passed(frame.as_ref(), ended, tee, keep, lease, log);
                    return Poll::Ready(frame.map(|f| f.map_err(|e| Box::new(e) as BoxError)));
                }
                // The timer is only armed for bodies that actually wait.
                let timer =
                    timer.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(*deadline)));
                ready!(timer.as_mut().poll(cx));
                if let Some(counter) = on_timeout.take() {
                    counter.increment(1);
                }
                *tee = None;
                *keep = None;
                *lease = None;
                Poll::Ready(Some(Err(Box::new(BodyTimeout))))
            }
            ResponseBody::Full(full) => Pin::new(full)
                .poll_frame(cx)
                .map_err(|never| match never {}),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ResponseBody::Upstream { inner, .. } => inner.is_end_stream(),
            ResponseBody::Full(full) => full.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ResponseBody::Upstream { inner, .. } => inner.size_hint(),
            ResponseBody::Full(full) => full.size_hint(),
        }
    }
}

//! Sending a request again after its attempt failed before any of the answer arrived. Which
//! failures allow it ([`RetryCase`], named after Envoy's `retry_on`): a connection that could
//! not be made and a stream an HTTP/2 backend refused (never processed: any method), and a
//! connection that broke after the request was written (a reset, a close, an incomplete head:
//! idempotent methods, or any on a route with `retry_non_idempotent`). A request written and
//! lost needs a copy to go again: its head, and its body when the proxy holds it whole or
//! has copied all of it (at most [`MAX_RESEND_BODY`]) by the time the attempt failed. Nothing
//! is retried once an answer's head has arrived: the head is the client's from then on.

use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Uri, Version};
use tokio::sync::oneshot;

use super::body::UpstreamBody;
use super::tee::{Budget, Captured, Held, Tee};
use crate::error::{BoxError, UpstreamErrorKind};
use crate::routes::RetryCase;

/// Request bodies up to this size are copied as they stream, so the request can go again
/// after a reset; a larger one is not sent again (its first attempt's failure stands).
pub const MAX_RESEND_BODY: usize = 1 << 20;
/// Bytes all resend copies of one backend may hold together; past it a request is not
/// copied (and not resent after a reset).
pub const RESEND_BUDGET: usize = 64 << 20;

/// Which methods may go again after their request was written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resend {
    /// GET, HEAD, OPTIONS, PUT, DELETE, TRACE (RFC 9110 §9.2.2).
    Idempotent,
    /// Any method: the route says `retry_non_idempotent = true`.
    Any,
}

/// The case a failed attempt falls under, if any. `unsent`: the request never left.
pub(super) fn case(kind: UpstreamErrorKind, source: &BoxError, unsent: bool) -> Option<RetryCase> {
    if unsent {
        return Some(RetryCase::ConnectFailure);
    }
    if refused_stream(source.as_ref()) {
        return Some(RetryCase::RefusedStream);
    }
    // A malformed answer is the backend's answer, and a timeout has used the time up.
    (kind == UpstreamErrorKind::Reset).then_some(RetryCase::Reset)
}

/// Whether an HTTP/2 backend refused the stream: it promises it did not process it.
fn refused_stream(source: &(dyn std::error::Error + Send + Sync + 'static)) -> bool {
    super::find_source::<h2::Error>(source)
        .is_some_and(|e| e.reason() == Some(h2::Reason::REFUSED_STREAM))
}

/// A copy of a request to send it again: its head, and its body.
pub(super) struct Copy {
    method: Method,
    uri: Uri,
    version: Version,
    headers: HeaderMap,
    body: Body,
}

enum Body {
    Held(Bytes),
    /// Copied as it streams to the first attempt; usable once it has ended.
    Streaming(oneshot::Receiver<Captured>),
    /// The streamed copy, complete (holding its share of the budget).
    Copied(Held),
}

impl Copy {
    /// Keeps what it takes to send `req` again: its head, and its body (held whole, or a
    /// bounded copy made as it streams). `None` for an upgrade, which cannot go twice.
    pub(super) fn keep(req: &mut Request<UpstreamBody>, budget: &Arc<Budget>) -> Option<Copy> {
        if req.headers().contains_key(http::header::UPGRADE) {
            return None;
        }
        let body = match req.body().held() {
            Some(bytes) => Body::Held(bytes),
            None => {
                let (tee, rx) = Tee::new(MAX_RESEND_BODY, budget);
                req.body_mut().resend_tee(tee);
                Body::Streaming(rx)
            }
        };
        Some(Copy {
            method: req.method().clone(),
            uri: req.uri().clone(),
            version: req.version(),
            headers: req.headers().clone(),
            body,
        })
    }

    /// The request again; `None` when its body was not copied whole.
    pub(super) fn rebuild(&mut self) -> Option<Request<UpstreamBody>> {
        if let Body::Streaming(rx) = &mut self.body {
            match rx.try_recv().ok()? {
                Captured::Body(held) => self.body = Body::Copied(held),
                Captured::TooLarge => return None,
            }
        }
        let bytes = match &self.body {
            Body::Held(b) => b.clone(),
            Body::Copied(held) => held.bytes.clone(),
            Body::Streaming(_) => return None,
        };
        let mut req = Request::new(UpstreamBody::full(bytes));
        *req.method_mut() = self.method.clone();
        *req.uri_mut() = self.uri.clone();
        *req.version_mut() = self.version;
        *req.headers_mut() = self.headers.clone();
        Some(req)
    }
}

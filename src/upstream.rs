//! Upstream clients. A backend has one or more endpoints; each endpoint has a pool of idle
//! HTTP/1.1 keep-alive connections in a lock-free queue (or, for HTTP/2 backends, one shared
//! multiplexed connection), optionally over TLS, a count of requests in flight, and a
//! health state. A request goes to the better of two random healthy endpoints (fewer in
//! flight), takes a connection (or opens one), and its response body gives the connection
//! back through its [`Lease`] once complete; an abandoned body drops it. An endpoint that
//! fails repeatedly is ejected for a backoff period (never all of them); optional active
//! health checks do the same from a probe. Idempotent requests whose connection could not be
//! made are retried on another endpoint, with backoff, inside a retry budget.
//!
//! All of this lives outside the route table: a reload that keeps a backend's endpoint,
//! connect timeout, protocol and TLS settings keeps its pool, health and warm connections.

pub mod body;
mod endpoint;
pub mod gate;
pub mod retry;
pub mod tee;

use std::sync::Arc;
use std::time::Duration;

use http::uri::PathAndQuery;
use http::{Request, Response, Uri};
use hyper::body::Incoming;
use metrics::Counter;
use tokio::time::Instant;

use endpoint::RetryBudget;
pub use endpoint::{Endpoint, Lease};

use crate::activity::Watch;
use crate::error::{ProxyError, UpstreamErrorKind};
use crate::metrics::Metrics;
use crate::routes::{Backend, Protocol, RetryCase, RetryOn};
use body::{TooLarge, UpstreamBody};
pub use retry::Resend;

pin_project_lite::pin_project! {
    /// `fut` until the connection's watchdog says the armed deadline has passed (`Err`): a
    /// `Timeout` without its timer, no larger than the future it watches.
    struct Watched<'w, F> {
        watch: &'w Watch,
        #[pin]
        fut: F,
    }
}

impl<F: std::future::Future> std::future::Future for Watched<'_, F> {
    type Output = Result<F::Output, ()>;

    fn poll(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        let this = self.project();
        if this.watch.expired() {
            return std::task::Poll::Ready(Err(()));
        }
        this.fut.poll(cx).map(Ok)
    }
}

/// First retry waits about this long; each further one doubles it (with jitter).
const RETRY_BACKOFF: Duration = Duration::from_millis(25);

/// A failed exchange; `unsent` is the request when it never left the proxy (no connection
/// could be made), so it may be sent elsewhere whatever its method.
pub struct Failed {
    pub error: ProxyError,
    /// Boxed: it is only there on the failure path.
    pub unsent: Option<Box<Request<UpstreamBody>>>,
}

impl From<ProxyError> for Failed {
    fn from(error: ProxyError) -> Self {
        Failed {
            error,
            unsent: None,
        }
    }
}

/// One backend.
pub struct Upstream {
    pub name: String,
    base_path: String,
    connect_timeout: Duration,
    pub timeout: Duration,
    retries: u32,
    retry_on: RetryOn,
    protocol: Protocol,
    pub endpoints: Vec<Arc<Endpoint>>,
    budget: Arc<RetryBudget>,
    /// Bytes the request copies kept for retries may hold.
    resend_budget: Arc<tee::Budget>,
    errors: [Counter; 4],
    /// `strangler_upstream_retries_total` by [`RetryCase`].
    retried: [Counter; 3],
    /// `strangler_upstream_refused_total` by [`gate::Busy`].
    refused: [Counter; 2],
}

impl Upstream {
    /// A client for `backend`, reusing `previous`'s endpoints (pools, health) where unchanged.
    pub fn new(backend: &Backend, metrics: &Metrics, previous: &[Arc<Upstream>]) -> Arc<Self> {
        let same = previous.iter().find(|u| u.name == backend.name);
        let endpoints = backend
            .endpoints
            .iter()
            .map(|a| {
                same.and_then(|u| {
                    u.endpoints
                        .iter()
                        .find(|e| e.reusable_for(a, backend))
                        .cloned()
                })
                .unwrap_or_else(|| Endpoint::new(&backend.name, a.clone(), backend))
            })
            .collect();
        Arc::new(Upstream {
            name: backend.name.clone(),
            base_path: backend.base_path.clone(),
            connect_timeout: backend.connect_timeout,
            timeout: backend.timeout,
            retries: backend.retries,
            retry_on: backend.retry_on,
            protocol: backend.protocol,
            endpoints,
            budget: same.map_or_else(RetryBudget::new, |u| u.budget.clone()),
            resend_budget: same.map_or_else(
                || tee::Budget::new(retry::RESEND_BUDGET),
                |u| u.resend_budget.clone(),
            ),
            errors: metrics.upstream_errors(&backend.name),
            retried: metrics.upstream_retries(&backend.name),
            refused: metrics.upstream_refused(&backend.name),
        })
    }

    /// Whether two upstreams share their first endpoint's pool (a reload kept it warm).
    pub fn shares_pool_with(&self, other: &Upstream) -> bool {
        matches!((self.endpoints.first(), other.endpoints.first()), (Some(a), Some(b)) if Arc::ptr_eq(a, b))
    }

    /// The upstream URI: the backend's base path joined with the request's path and query,
    /// byte for byte.
    pub fn uri(&self, pq: Option<&PathAndQuery>) -> Result<Uri, http::Error> {
        let pq = match (self.base_path.is_empty(), pq) {
            (true, Some(pq)) => pq.clone(),
            (true, None) => PathAndQuery::from_static("/"),
            (false, pq) => {
                let joined = format!("{}{}", self.base_path, pq.map_or("/", PathAndQuery::as_str));
                PathAndQuery::try_from(joined)?
            }
        };
        // Origin-form: HTTP/1.1 backends see the client's Host, and HTTP/2 ones get it as
        // `:authority` (`Endpoint::exchange`).
        Ok(Uri::from(pq))
    }

    /// A request for this backend made from parts the proxy kept (a fallback's replay, a
    /// shadow copy); `None` when the target cannot be joined to the base path.
    pub fn request(
        &self,
        method: http::Method,
        pq: Option<&PathAndQuery>,
        headers: http::HeaderMap,
        body: bytes::Bytes,
    ) -> Option<Request<UpstreamBody>> {
        // Assembled in place: `Request::builder` carries a `Result` through every step.
        let mut req = Request::new(UpstreamBody::full(body));
        *req.method_mut() = method;
        *req.uri_mut() = self.uri(pq).ok()?;
        *req.headers_mut() = headers;
        Some(req)
    }

    /// Sends the request and waits for the response head until `deadline`; retried as
    /// [`send_with`](Self::send_with) says for idempotent methods.
    pub fn send(
        &self,
        req: Request<UpstreamBody>,
        deadline: Instant,
    ) -> impl std::future::Future<Output = Result<(Response<Incoming>, Lease), Failed>> + Send + '_
    {
        // `send_with`'s own future, not one wrapping it (every level is copied when it starts).
        self.send_with(req, deadline, Resend::Idempotent, None)
    }

    /// Sends the request and waits for the response head until `deadline`. An attempt that
    /// failed before any answer, in a case of the backend's `retry_on`, goes again, up to
    /// `retries` times, while the retry budget allows and the deadline is not near: on
    /// another endpoint where there is one (at once), else on the same one after a backoff.
    /// A request that was written goes again only for `resend`'s methods and when it could be
    /// copied whole.
    ///
    /// A plain function returning the future (not an `async fn`): an `async fn` keeps its
    /// arguments twice in its state (as given and as bound), and this future is moved into
    /// every request's.
    #[allow(clippy::manual_async_fn)]
    pub fn send_with(
        &self,
        mut req: Request<UpstreamBody>,
        deadline: Instant,
        resend: Resend,
        watch: Option<Watch>,
    ) -> impl std::future::Future<Output = Result<(Response<Incoming>, Lease), Failed>> + Send + '_
    {
        async move {
            let _armed = watch.as_ref().map(|w| w.arm(deadline));
            self.budget.deposit();
            let written = idempotent(req.method()) || resend == Resend::Any;
            // Boxed: a route without retries (most) then carries 8 bytes of it, not 360, in
            // every request's future.
            let mut copy = (self.retries > 0 && (written || self.protocol == Protocol::H2))
                .then(|| retry::Copy::keep(&mut req, &self.resend_budget).map(Box::new))
                .flatten();
            let mut tried: Option<usize> = None;
            for attempt in 0..=self.retries {
                let i = endpoint::pick(&self.endpoints, tried);
                let ep = &self.endpoints[i];
                // Each arm makes its own future: one made before the `match` would be held
                // beside the arm's (a few hundred bytes more in every request's future).
                let outcome = match &watch {
                    Some(watch) => {
                        Watched {
                            watch,
                            fut: ep.exchange(req, self.connect_timeout),
                        }
                        .await
                    }
                    None => {
                        tokio::time::timeout_at(deadline, ep.exchange(req, self.connect_timeout))
                            .await
                            .map_err(|_| ())
                    }
                };
                let error = match outcome {
                    Ok(Ok(done)) => return Ok(done),
                    Ok(Err(e)) => e,
                    Err(()) => {
                        ep.failed(UpstreamErrorKind::Timeout);
                        self.count(UpstreamErrorKind::Timeout);
                        return Err(self.timeout().into());
                    }
                };
                let (next, case) = self.again(error, attempt, written, &mut copy)?;
                req = next;
                tried = Some(i);
                if self.endpoints.len() > 1 {
                    continue;
                }
                let wait =
                    RETRY_BACKOFF * 2u32.pow(attempt) + Duration::from_millis(fastrand::u64(..10));
                if Instant::now() + wait >= deadline {
                    // A request that was never processed may still go to a fallback; a copy of one
                    // that was written and lost may not.
                    return Err(Failed {
                        error: self.timeout(),
                        unsent: (case != RetryCase::Reset).then(|| Box::new(req)),
                    });
                }
                tokio::time::sleep(wait).await;
            }
            unreachable_failed(&self.name)
        }
    }

    /// After a failed attempt: the request to send next (a retry, counted against the budget
    /// and in the metrics), or the failure that stands. `written`: whether a request that
    /// was written may go again (its method, or the route's `retry_non_idempotent`).
    fn again(
        &self,
        (kind, source, unsent): endpoint::ExchangeError,
        attempt: u32,
        written: bool,
        copy: &mut Option<Box<retry::Copy>>,
    ) -> Result<(Request<UpstreamBody>, RetryCase), Failed> {
        let case = retry::case(kind, &source, unsent.is_some());
        let Failed { error, unsent } = self.failed(kind, source, unsent);
        let case = case.filter(|&c| {
            self.retry_on.contains(c)
                && (c != RetryCase::Reset || written)
                && attempt < self.retries
                && matches!(error, ProxyError::UpstreamUnavailable { .. })
        });
        let Some(case) = case else {
            return Err(Failed { error, unsent });
        };
        let next = match unsent {
            Some(never_left) => *never_left,
            None => match copy.as_deref_mut().and_then(retry::Copy::rebuild) {
                Some(again) => again,
                None => {
                    return Err(Failed {
                        error,
                        unsent: None,
                    })
                }
            },
        };
        if !self.budget.withdraw() {
            // A request that was never processed may still go to a fallback; a written one
            // may not.
            let unsent = (case != RetryCase::Reset).then(|| Box::new(next));
            return Err(Failed { error, unsent });
        }
        self.retried[case as usize].increment(1);
        Ok((next, case))
    }

    /// A failed exchange as the proxy answers it: the client's fault (its body), or the
    /// upstream's (counted).
    fn failed(
        &self,
        kind: UpstreamErrorKind,
        source: crate::error::BoxError,
        unsent: Option<Request<UpstreamBody>>,
    ) -> Failed {
        let error = match find_source::<TooLarge>(source.as_ref()) {
            Some(t) => ProxyError::PayloadTooLarge { limit: t.limit },
            None => match source.downcast::<gate::Refused>() {
                Ok(refused) => {
                    self.refused[refused.why as usize].increment(1);
                    ProxyError::UpstreamBusy {
                        backend: self.name.clone(),
                        source: *refused,
                    }
                }
                Err(source) if kind_is_client(&*source) => ProxyError::BadRequest {
                    reason: "the request body could not be read",
                },
                Err(source) => {
                    self.count(kind);
                    ProxyError::UpstreamUnavailable {
                        backend: self.name.clone(),
                        kind,
                        source,
                    }
                }
            },
        };
        Failed {
            error,
            unsent: unsent.map(Box::new),
        }
    }

    fn timeout(&self) -> ProxyError {
        ProxyError::UpstreamTimeout {
            backend: self.name.clone(),
            after: self.timeout,
        }
    }

    pub fn count(&self, kind: UpstreamErrorKind) {
        self.errors[kind as usize].increment(1);
    }

    pub fn timeout_counter(&self) -> Counter {
        self.errors[UpstreamErrorKind::Timeout as usize].clone()
    }
}

/// The retry loop always returns from inside; this keeps the compiler and clippy content
/// without a panic on the request path.
fn unreachable_failed(name: &str) -> Result<(Response<Incoming>, Lease), Failed> {
    Err(ProxyError::UpstreamUnavailable {
        backend: name.to_string(),
        kind: UpstreamErrorKind::Connect,
        source: "no attempt was made".into(),
    }
    .into())
}

/// Whether a failed exchange was the client's doing (its body broke off).
fn kind_is_client(source: &(dyn std::error::Error + Send + Sync + 'static)) -> bool {
    source
        .downcast_ref::<hyper::Error>()
        .is_some_and(hyper::Error::is_user)
}

/// The first error of type `T` in `e`'s source chain.
pub fn find_source<'a, T: std::error::Error + 'static>(
    e: &'a (dyn std::error::Error + 'static),
) -> Option<&'a T> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(t) = err.downcast_ref::<T>() {
            return Some(t);
        }
        cur = err.source();
    }
    None
}

/// Methods that may be sent twice (RFC 9110 §9.2.2): fallbacks and retries only repeat these.
pub fn idempotent(method: &http::Method) -> bool {
    use http::Method;
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE | Method::TRACE
    )
}

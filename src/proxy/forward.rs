//! Upstream clients: a pooled keep-alive hyper client per backend. They live outside the
//! route table: a reload that keeps a backend's address and connect timeout keeps its client,
//! and with it the warm connections; a removed backend's pool closes once the last request
//! that uses it (and the table snapshot it holds) is gone.

use std::sync::Arc;
use std::time::Duration;

use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Request, Response, Uri};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use metrics::Counter;
use tokio::time::Instant;

use super::body::{TooLarge, UpstreamBody};
use crate::error::{ProxyError, UpstreamErrorKind};
use crate::metrics::Metrics;
use crate::routes::Backend;

/// Idle pooled connections are closed after this long; below common upstream keep-alive
/// timeouts (Node.js 5 s is the outlier, handled by hyper's retry of a request on a
/// connection that was closed before it was used).
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(90);
/// Idle connections kept per backend. Busy connections are bounded by the client-side
/// connection cap: HTTP/1.1 carries one request at a time.
const POOL_MAX_IDLE: usize = 256;
/// TCP keepalive probes on upstream connections, to notice dead peers on idle pools.
const TCP_KEEPALIVE: Duration = Duration::from_secs(60);

/// One backend's client and identity.
pub struct Upstream {
    pub name: String,
    scheme: Scheme,
    authority: Authority,
    base_path: String,
    connect_timeout: Duration,
    pub timeout: Duration,
    client: Client<HttpConnector, UpstreamBody>,
    errors: [Counter; 4],
}

impl Upstream {
    /// A client for `backend`, reusing `previous`'s pool when it points at the same place.
    pub fn new(backend: &Backend, metrics: &Metrics, previous: &[Arc<Upstream>]) -> Arc<Self> {
        let reused = previous.iter().find(|u| {
            u.name == backend.name
                && u.authority == backend.authority
                && u.connect_timeout == backend.connect_timeout
        });
        let client = match reused {
            Some(u) => u.client.clone(),
            None => {
                let mut connector = HttpConnector::new();
                connector.set_connect_timeout(Some(backend.connect_timeout));
                connector.set_nodelay(true);
                connector.set_keepalive(Some(TCP_KEEPALIVE));
                Client::builder(TokioExecutor::new())
                    .pool_idle_timeout(POOL_IDLE_TIMEOUT)
                    .pool_max_idle_per_host(POOL_MAX_IDLE)
                    .pool_timer(TokioTimer::new())
                    .timer(TokioTimer::new())
                    .build(connector)
            }
        };
        Arc::new(Upstream {
            name: backend.name.clone(),
            scheme: backend.scheme.clone(),
            authority: backend.authority.clone(),
            base_path: backend.base_path.clone(),
            connect_timeout: backend.connect_timeout,
            timeout: backend.timeout,
            client,
            errors: metrics.upstream_errors(&backend.name),
        })
    }

    /// Whether a reload kept this backend's pool (for logs and tests).
    pub fn shares_pool_with(&self, other: &Upstream) -> bool {
        self.authority == other.authority
            && self.connect_timeout == other.connect_timeout
            && self.name == other.name
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
        Uri::builder()
            .scheme(self.scheme.clone())
            .authority(self.authority.clone())
            .path_and_query(pq)
            .build()
    }

    /// Sends the request and waits for the response head until `deadline`.
    pub async fn send(
        &self,
        req: Request<UpstreamBody>,
        deadline: Instant,
    ) -> Result<Response<Incoming>, ProxyError> {
        match tokio::time::timeout_at(deadline, self.client.request(req)).await {
            Ok(Ok(resp)) => Ok(resp),
            Ok(Err(e)) => Err(self.classify(e)),
            Err(_) => {
                self.count(UpstreamErrorKind::Timeout);
                Err(ProxyError::UpstreamTimeout {
                    backend: self.name.clone(),
                    after: self.timeout,
                })
            }
        }
    }

    pub fn count(&self, kind: UpstreamErrorKind) {
        self.errors[kind as usize].increment(1);
    }

    pub fn timeout_counter(&self) -> Counter {
        self.errors[UpstreamErrorKind::Timeout as usize].clone()
    }

    /// Whose fault: a client body over the limit is the client's (413); a client that went
    /// away mid-body is the client's (400); the rest is the upstream's.
    fn classify(&self, e: hyper_util::client::legacy::Error) -> ProxyError {
        if let Some(too_large) = find_source::<TooLarge>(&e) {
            return ProxyError::PayloadTooLarge {
                limit: too_large.limit,
            };
        }
        let hyper_err = find_source::<hyper::Error>(&e);
        if hyper_err.is_some_and(|h| h.is_user()) {
            return ProxyError::BadRequest {
                reason: "the request body could not be read",
            };
        }
        let kind = if e.is_connect() {
            UpstreamErrorKind::Connect
        } else if hyper_err.is_some_and(|h| h.is_parse() || h.is_parse_status()) {
            UpstreamErrorKind::Protocol
        } else {
            UpstreamErrorKind::Reset
        };
        self.count(kind);
        ProxyError::UpstreamUnavailable {
            backend: self.name.clone(),
            kind,
            source: Box::new(e),
        }
    }
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

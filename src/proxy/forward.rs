//! Upstream clients: for each backend, a pool of idle HTTP/1.1 keep-alive connections in a
//! lock-free queue. A request takes a connection (or opens one), sends on it, and the
//! response body gives it back through its [`Lease`] once the body is complete; a body that
//! is abandoned drops its connection instead. Pools live outside the route table: a reload
//! that keeps a backend's address and connect timeout keeps its pool and warm connections;
//! a removed backend's pool closes once the last request that uses it is done.

use std::sync::Arc;
use std::time::Duration;

use crossbeam_queue::ArrayQueue;
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Request, Response, Uri};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use metrics::Counter;
use tokio::net::TcpStream;
use tokio::time::Instant;
use tracing::debug;

use super::body::{TooLarge, UpstreamBody};
use crate::error::{ProxyError, UpstreamErrorKind};
use crate::metrics::Metrics;
use crate::routes::Backend;

/// Idle connections older than this are closed instead of reused: below common upstream
/// keep-alive timeouts. (A connection the upstream closed earlier is noticed and skipped; a
/// request that meets one before it was written is retried on another connection.)
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(90);
/// Idle connections kept per backend. Busy ones are bounded by the client-side connection
/// cap: HTTP/1.1 carries one request at a time.
const POOL_MAX_IDLE: usize = 256;
/// TCP keepalive probes on upstream connections, to notice dead peers on idle pools.
const TCP_KEEPALIVE: Duration = Duration::from_secs(60);

type Sender = SendRequest<UpstreamBody>;

struct Idle {
    sender: Sender,
    since: std::time::Instant,
}

/// The idle connections of one backend address.
pub struct Pool {
    idle: ArrayQueue<Idle>,
}

impl Pool {
    fn new() -> Arc<Self> {
        Arc::new(Pool {
            idle: ArrayQueue::new(POOL_MAX_IDLE),
        })
    }

    fn take(&self) -> Option<Sender> {
        while let Some(i) = self.idle.pop() {
            if !i.sender.is_closed() && i.since.elapsed() < POOL_IDLE_TIMEOUT {
                return Some(i.sender);
            }
        }
        None
    }

    fn put(&self, sender: Sender) {
        if !sender.is_closed() {
            // A full pool drops the connection: it closes when its task sees no sender.
            let _ = self.idle.push(Idle {
                sender,
                since: std::time::Instant::now(),
            });
        }
    }

    /// Idle connections (for tests and /routes).
    pub fn idle(&self) -> usize {
        self.idle.len()
    }
}

/// A connection lent to one exchange. `release` gives it back for reuse; dropping it instead
/// (an abandoned body, an upgrade) lets the connection close.
pub struct Lease {
    sender: Sender,
    pool: Arc<Pool>,
}

impl Lease {
    pub fn release(self) {
        self.pool.put(self.sender);
    }
}

/// A failed exchange; `unsent` is the request when it never left the proxy (the connection
/// could not be made), so it may be sent elsewhere whatever its method.
pub struct Failed {
    pub error: ProxyError,
    pub unsent: Option<Request<UpstreamBody>>,
}

impl From<ProxyError> for Failed {
    fn from(error: ProxyError) -> Self {
        Failed {
            error,
            unsent: None,
        }
    }
}

/// One backend's connections and identity.
pub struct Upstream {
    pub name: String,
    scheme: Scheme,
    authority: Authority,
    /// `host:port` to connect to (the port defaults to 80).
    addr: String,
    base_path: String,
    connect_timeout: Duration,
    pub timeout: Duration,
    pool: Arc<Pool>,
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
        Arc::new(Upstream {
            name: backend.name.clone(),
            scheme: backend.scheme.clone(),
            authority: backend.authority.clone(),
            addr: format!(
                "{}:{}",
                backend.authority.host(),
                backend.authority.port_u16().unwrap_or(80)
            ),
            base_path: backend.base_path.clone(),
            connect_timeout: backend.connect_timeout,
            timeout: backend.timeout,
            pool: reused.map_or_else(Pool::new, |u| u.pool.clone()),
            errors: metrics.upstream_errors(&backend.name),
        })
    }

    /// Whether two upstreams share one pool (a reload kept the warm connections).
    pub fn shares_pool_with(&self, other: &Upstream) -> bool {
        Arc::ptr_eq(&self.pool, &other.pool)
    }

    pub fn pool(&self) -> &Pool {
        &self.pool
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
    ) -> Result<(Response<Incoming>, Lease), Failed> {
        match tokio::time::timeout_at(deadline, self.exchange(req)).await {
            Ok(result) => result,
            Err(_) => {
                self.count(UpstreamErrorKind::Timeout);
                Err(ProxyError::UpstreamTimeout {
                    backend: self.name.clone(),
                    after: self.timeout,
                }
                .into())
            }
        }
    }

    async fn exchange(
        &self,
        mut req: Request<UpstreamBody>,
    ) -> Result<(Response<Incoming>, Lease), Failed> {
        loop {
            let (mut sender, reused) = match self.pool.take() {
                Some(s) => (s, true),
                None => match self.connect().await {
                    Ok(s) => (s, false),
                    Err(error) => {
                        return Err(Failed {
                            error,
                            unsent: Some(req),
                        })
                    }
                },
            };
            if let Err(e) = sender.ready().await {
                if reused {
                    continue;
                }
                return Err(Failed {
                    error: self.classify(e),
                    unsent: Some(req),
                });
            }
            match sender.try_send_request(req).await {
                Ok(resp) => {
                    return Ok((
                        resp,
                        Lease {
                            sender,
                            pool: self.pool.clone(),
                        },
                    ))
                }
                Err(mut e) => match e.take_message() {
                    // Never written: safe to try another connection, whatever the method.
                    Some(r) if reused => req = r,
                    _ => return Err(self.classify(e.into_error()).into()),
                },
            }
        }
    }

    /// Opens a connection within `connect_timeout` and starts its task.
    async fn connect(&self) -> Result<Sender, ProxyError> {
        let open = async {
            let stream = TcpStream::connect(&self.addr).await?;
            stream.set_nodelay(true)?;
            let keepalive = socket2::TcpKeepalive::new().with_time(TCP_KEEPALIVE);
            socket2::SockRef::from(&stream).set_tcp_keepalive(&keepalive)?;
            Ok::<_, std::io::Error>(stream)
        };
        let stream = match tokio::time::timeout(self.connect_timeout, open).await {
            Ok(Ok(stream)) => stream,
            Ok(Err(e)) => return Err(self.fail(UpstreamErrorKind::Connect, Box::new(e))),
            Err(_) => {
                return Err(self.fail(
                    UpstreamErrorKind::Connect,
                    format!("connect timed out after {:?}", self.connect_timeout).into(),
                ))
            }
        };
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| self.fail(UpstreamErrorKind::Connect, Box::new(e)))?;
        let name = self.name.clone();
        tokio::spawn(async move {
            if let Err(error) = conn.with_upgrades().await {
                debug!(%error, backend = %name, "upstream connection ended with an error");
            }
        });
        Ok(sender)
    }

    fn fail(&self, kind: UpstreamErrorKind, source: crate::error::BoxError) -> ProxyError {
        self.count(kind);
        ProxyError::UpstreamUnavailable {
            backend: self.name.clone(),
            kind,
            source,
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
    fn classify(&self, e: hyper::Error) -> ProxyError {
        if let Some(too_large) = find_source::<TooLarge>(&e) {
            return ProxyError::PayloadTooLarge {
                limit: too_large.limit,
            };
        }
        if e.is_user() {
            return ProxyError::BadRequest {
                reason: "the request body could not be read",
            };
        }
        let kind = if e.is_parse() || e.is_parse_status() {
            UpstreamErrorKind::Protocol
        } else {
            UpstreamErrorKind::Reset
        };
        self.fail(kind, Box::new(e))
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

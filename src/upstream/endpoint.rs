//! One endpoint of a backend: its pool of idle connections, requests in flight, passive
//! health (consecutive failures eject it for a doubling backoff), active health (a probe task
//! when `health` is configured), and the power-of-two-choices pick among endpoints.

use std::sync::atomic::{
    AtomicBool, AtomicI64, AtomicU32, AtomicU64, AtomicU8, AtomicUsize, Ordering,
};
use std::sync::{Arc, Weak};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use crossbeam_queue::ArrayQueue;
use http::uri::{Authority, Scheme};
use http::{header, HeaderValue, Request, Response, Uri, Version};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2, TrySendError};
use hyper::rt::{Read, Write};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;
use tracing::{debug, info, warn};

use super::body::{TooLarge, UpstreamBody};
use super::gate::{Dial, Gate, Grant, Refused};
use crate::error::{BoxError, UpstreamErrorKind};
use crate::routes::{Backend, HealthCheck, Protocol};
use crate::tls::{ClientTls, ALPN_H2};

/// Idle connections older than this are closed instead of reused: below common upstream
/// keep-alive timeouts. (A connection the upstream closed earlier is noticed and skipped; a
/// request that meets one before it was written is sent on another connection.)
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(90);
/// Idle connections kept per endpoint. Busy ones are bounded by the client-side connection
/// cap: HTTP/1.1 carries one request at a time.
const POOL_MAX_IDLE: usize = 256;
/// TCP keepalive probes on upstream connections, to notice dead peers on idle pools.
const TCP_KEEPALIVE: Duration = Duration::from_secs(60);
/// Consecutive failures (connect, reset, malformed answer, timeout) that eject an endpoint.
const EJECT_AFTER: u32 = 3;
/// First ejection lasts this long; each further one in a row doubles it, up to the max.
const EJECT_BASE: Duration = Duration::from_secs(1);
const EJECT_MAX: Duration = Duration::from_secs(30);
/// A health probe gets at most this long (or its interval, if shorter).
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// HTTP/2 upstream connections: a ping after this much silence, closed if unanswered.
const H2_KEEPALIVE: Duration = Duration::from_secs(30);
const H2_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// A connection's request handle: one exchange at a time on HTTP/1.1, many on HTTP/2.
enum Sender {
    H1(http1::SendRequest<UpstreamBody>),
    H2(http2::SendRequest<UpstreamBody>),
}

impl Sender {
    fn is_closed(&self) -> bool {
        match self {
            Sender::H1(s) => s.is_closed(),
            Sender::H2(s) => s.is_closed(),
        }
    }

    async fn ready(&mut self) -> Result<(), hyper::Error> {
        match self {
            Sender::H1(s) => s.ready().await,
            Sender::H2(s) => s.ready().await,
        }
    }

    async fn send(
        &mut self,
        req: Request<UpstreamBody>,
    ) -> Result<Response<Incoming>, TrySendError<Request<UpstreamBody>>> {
        match self {
            Sender::H1(s) => s.try_send_request(req).await,
            Sender::H2(s) => s.try_send_request(req).await,
        }
    }
}

/// RFC 9112 §6.3: an HTTP/1.1 answer with both `Transfer-Encoding` and `Content-Length` is
/// framed by `Transfer-Encoding` (which hyper decodes); the `Content-Length` must go, or the
/// client would be told a length the body does not have, and the connection must not be used
/// again. Returns whether the answer was such a one.
fn reframed(resp: &mut Response<Incoming>) -> bool {
    let both = resp.version() <= Version::HTTP_11
        && resp.headers().contains_key(header::TRANSFER_ENCODING)
        && resp.headers().contains_key(header::CONTENT_LENGTH);
    if both {
        resp.headers_mut().remove(header::CONTENT_LENGTH);
    }
    both
}

/// A failed exchange: kind, cause, and the request if it was never written.
pub type ExchangeError = (UpstreamErrorKind, BoxError, Option<Request<UpstreamBody>>);

struct Idle {
    sender: Sender,
    since: std::time::Instant,
}

/// The idle connections of one endpoint (HTTP/1.1) under its bounds, or its shared one
/// (HTTP/2).
pub struct Pool {
    idle: ArrayQueue<Idle>,
    /// `max_connections`, `max_connecting` and the line of requests waiting (HTTP/1.1).
    gate: Arc<Gate<Sender>>,
    shared: ArcSwapOption<http2::SendRequest<UpstreamBody>>,
    /// Held while a shared connection is being made, so a burst makes one, not one each.
    connecting: tokio::sync::Mutex<()>,
}

impl Pool {
    /// A connection to use now: the shared one (HTTP/2) or an idle one (HTTP/1.1), unless
    /// requests are waiting for one (they come first).
    fn take(&self, protocol: Protocol) -> Option<Sender> {
        if protocol == Protocol::H2 {
            return self.shared().map(Sender::H2);
        }
        if !self.gate.no_line() {
            return None;
        }
        self.take_idle()
    }

    fn take_idle(&self) -> Option<Sender> {
        while let Some(i) = self.idle.pop() {
            if !i.sender.is_closed() && i.since.elapsed() < POOL_IDLE_TIMEOUT {
                return Some(i.sender);
            }
        }
        None
    }

    /// The shared HTTP/2 connection, if it is open.
    fn shared(&self) -> Option<http2::SendRequest<UpstreamBody>> {
        self.shared
            .load()
            .as_deref()
            .filter(|s| !s.is_closed())
            .cloned()
    }

    fn put(&self, sender: Sender) {
        // An HTTP/2 handle is a clone of the shared connection: nothing to give back.
        if !sender.is_closed() && matches!(sender, Sender::H1(_)) {
            // To the first request waiting for a connection, if one is.
            let Some(sender) = self.gate.give_back(sender) else {
                return;
            };
            // A full pool drops the connection: it closes when its task sees no sender.
            let _ = self.idle.push(Idle {
                sender,
                since: std::time::Instant::now(),
            });
        }
    }

    pub fn idle(&self) -> usize {
        self.idle.len() + usize::from(self.shared().is_some())
    }
}

/// A connection lent to one exchange, counted in flight until dropped. `release` gives the
/// connection back for reuse; dropping the lease instead (an abandoned body, an upgrade)
/// lets it close.
pub struct Lease {
    sender: Option<Sender>,
    ep: Arc<Endpoint>,
}

impl Lease {
    pub fn release(mut self) {
        if let Some(s) = self.sender.take() {
            self.ep.pool.put(s);
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.ep.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// One `host:port` of a backend.
pub struct Endpoint {
    backend: String,
    pub authority: Authority,
    addr: String,
    connect_timeout: Duration,
    health: Option<HealthCheck>,
    protocol: Protocol,
    tls: Option<ClientTls>,
    pool: Pool,
    in_flight: AtomicUsize,
    failures: AtomicU32,
    ejections: AtomicU32,
    /// Milliseconds since `born` until which the endpoint is ejected, and when the current
    /// (or last) ejection began.
    ejected_until: AtomicU64,
    /// Ejections since the endpoint was made: an exchange notes it when it begins, and an
    /// answer to an exchange begun before the latest ejection says nothing of the endpoint now.
    ejection_epoch: AtomicU32,
    /// The [`UpstreamErrorKind`] of the failure that ejected it.
    ejected_for: AtomicU8,
    /// Failures while ejected (not logged one by one; reported when it recovers).
    suppressed: AtomicU64,
    born: std::time::Instant,
    /// The last active probe's verdict (true without probes).
    probe_ok: AtomicBool,
}

impl Endpoint {
    pub fn new(name: &str, authority: Authority, backend: &Backend) -> Arc<Self> {
        let health = backend.health.clone();
        let default_port = if backend.tls.is_some() { 443 } else { 80 };
        let ep = Arc::new(Endpoint {
            backend: name.to_string(),
            addr: format!(
                "{}:{}",
                authority.host(),
                authority.port_u16().unwrap_or(default_port)
            ),
            authority,
            connect_timeout: backend.connect_timeout,
            health: health.clone(),
            protocol: backend.protocol,
            tls: backend.tls.clone(),
            pool: Pool {
                idle: ArrayQueue::new(POOL_MAX_IDLE),
                gate: Gate::new(backend.connections),
                shared: ArcSwapOption::empty(),
                connecting: tokio::sync::Mutex::new(()),
            },
            in_flight: AtomicUsize::new(0),
            failures: AtomicU32::new(0),
            ejections: AtomicU32::new(0),
            ejected_until: AtomicU64::new(0),
            ejection_epoch: AtomicU32::new(0),
            ejected_for: AtomicU8::new(0),
            suppressed: AtomicU64::new(0),
            born: std::time::Instant::now(),
            probe_ok: AtomicBool::new(true),
        });
        if let (Some(check), Ok(rt)) = (health, tokio::runtime::Handle::try_current()) {
            rt.spawn(probe(Arc::downgrade(&ep), check));
        }
        ep
    }

    /// Whether a reload may keep this endpoint (and its pool and health) for `backend`.
    pub fn reusable_for(&self, authority: &Authority, backend: &Backend) -> bool {
        &self.authority == authority
            && self.connect_timeout == backend.connect_timeout
            && self.health == backend.health
            && self.protocol == backend.protocol
            && self.tls == backend.tls
            && self.pool.gate.limits() == backend.connections
    }

    fn now_ms(&self) -> u64 {
        self.born.elapsed().as_millis() as u64
    }

    pub fn ejected(&self) -> bool {
        self.ejected_until.load(Ordering::Acquire) > self.now_ms()
    }

    pub fn healthy(&self) -> bool {
        self.probe_ok.load(Ordering::Acquire)
    }

    /// Idle connections (HTTP/1.1), or 1 for an open shared one (HTTP/2).
    pub fn idle(&self) -> usize {
        self.pool.idle()
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Acquire)
    }

    /// Requests refused a connection by the bounds: line full, waited too long.
    pub fn refused(&self) -> [u64; 2] {
        self.pool.gate.refused()
    }

    /// HTTP/1.1 connections open (or being opened), attempts under way, requests waiting.
    pub fn connections(&self) -> (usize, usize, usize) {
        self.pool.gate.counts()
    }

    fn usable(&self) -> bool {
        self.healthy() && !self.ejected()
    }

    /// Counts a failure; the `EJECT_AFTER`th in a row ejects the endpoint. Failures while it
    /// is ejected are the same event (requests that were in flight when it died): counted
    /// for the recovery line, never another ejection, so the backoff grows per episode (an
    /// ejection that ends without a success in between), not per failed request.
    pub fn failed(&self, kind: UpstreamErrorKind) {
        let now = self.now_ms();
        if self.ejected_until.load(Ordering::Acquire) > now {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            return;
        }
        if self.failures.fetch_add(1, Ordering::AcqRel) + 1 < EJECT_AFTER {
            return;
        }
        let n = self.ejections.load(Ordering::Acquire);
        let backoff = EJECT_BASE.saturating_mul(1 << n.min(5)).min(EJECT_MAX);
        let until = now + backoff.as_millis() as u64;
        // One of the failures arriving together ejects; the others see it ejected.
        let ejected = self
            .ejected_until
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |u| {
                (u <= now).then_some(until)
            })
            .is_ok();
        if !ejected {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            return;
        }
        self.ejection_epoch.fetch_add(1, Ordering::AcqRel);
        self.failures.store(0, Ordering::Release);
        self.ejections.fetch_add(1, Ordering::AcqRel);
        self.ejected_for.store(kind as u8, Ordering::Release);
        warn!(backend = %self.backend, endpoint = %self.authority, after = kind.as_str(), episode = n + 1, backoff = %humantime::format_duration(backoff), "endpoint ejected after {EJECT_AFTER} failures in a row");
    }

    /// An answer came to an exchange that began in ejection epoch `started`: the failures
    /// in a row end, and an ejected endpoint is back at once. An answer to an exchange that
    /// began before the current ejection says nothing of the endpoint now (it may have been
    /// written just before it died) and changes nothing.
    fn succeeded(&self, started: u32) {
        if started != self.ejection_epoch.load(Ordering::Acquire) {
            return;
        }
        self.failures.store(0, Ordering::Release);
        if self.ejections.load(Ordering::Acquire) == 0 {
            return;
        }
        if self.ejections.swap(0, Ordering::AcqRel) > 0 {
            self.ejected_until.store(0, Ordering::Release);
            let suppressed = self.suppressed.swap(0, Ordering::Relaxed);
            info!(backend = %self.backend, endpoint = %self.authority, failures_while_ejected = suppressed, "endpoint recovered");
        }
    }

    /// While ejected: until when (wall clock), and the kind of failure that ejected it.
    pub fn ejection(&self) -> Option<(std::time::SystemTime, UpstreamErrorKind)> {
        let (until, now) = (self.ejected_until.load(Ordering::Acquire), self.now_ms());
        if until <= now {
            return None;
        }
        let left = Duration::from_millis(until - now);
        let kind = UpstreamErrorKind::ALL
            .get(usize::from(self.ejected_for.load(Ordering::Acquire)))
            .copied()
            .unwrap_or(UpstreamErrorKind::Connect);
        Some((std::time::SystemTime::now() + left, kind))
    }

    /// Ejections in a row without an answer in between (0 once one came).
    pub fn ejections(&self) -> u32 {
        self.ejections.load(Ordering::Acquire)
    }

    /// Sends `req` on a pooled or new connection of this endpoint. (A function returning its
    /// future, not an `async fn`, so the request is held once in it, not twice.)
    #[allow(clippy::manual_async_fn)]
    pub fn exchange(
        self: &Arc<Self>,
        mut req: Request<UpstreamBody>,
        connect_timeout: Duration,
    ) -> impl std::future::Future<Output = Result<(Response<Incoming>, Lease), ExchangeError>> + Send + '_
    {
        async move {
            self.in_flight.fetch_add(1, Ordering::AcqRel);
            let started = self.ejection_epoch.load(Ordering::Acquire);
            // Owns the in-flight count from here: dropped on failure, handed over on success.
            let lease = Lease {
                sender: None,
                ep: self.clone(),
            };
            if self.protocol == Protocol::H2 {
                self.to_h2(&mut req);
            }
            let asked_upgrade = req.headers().contains_key(header::UPGRADE);
            loop {
                let (mut sender, reused) = match self.pool.take(self.protocol) {
                    Some(s) => (s, true),
                    // Boxed: waiting and connecting make this future larger than the request
                    // future (moved on every request) should be; both are rare.
                    None => match Box::pin(self.obtain(connect_timeout)).await {
                        Ok(s) => s,
                        Err(e) => {
                            // A refusal is this proxy's bound, not the endpoint failing.
                            if !e.is::<Refused>() {
                                self.failed(UpstreamErrorKind::Connect);
                            }
                            return Err((UpstreamErrorKind::Connect, e, Some(req)));
                        }
                    },
                };
                if let Err(e) = sender.ready().await {
                    if reused {
                        continue;
                    }
                    self.failed(UpstreamErrorKind::Connect);
                    return Err((UpstreamErrorKind::Connect, Box::new(e), Some(req)));
                }
                match sender.send(req).await {
                    Ok(resp) => {
                        return self
                            .answered(resp, sender, lease, (asked_upgrade, started))
                            .map_err(|why| (UpstreamErrorKind::Protocol, why.into(), None))
                    }
                    Err(mut e) => match e.take_message() {
                        // Never written: safe to try another connection, whatever the method.
                        Some(r) if reused => req = r,
                        unsent => return Err(self.send_failed(e.into_error(), unsent)),
                    },
                }
            }
        }
    }

    /// An answer head: refused (a protocol error) when it switched protocols unasked;
    /// otherwise the connection goes with it in the lease, unless its framing rules out reuse.
    #[inline]
    fn answered(
        &self,
        mut resp: Response<Incoming>,
        sender: Sender,
        mut lease: Lease,
        (asked_upgrade, started): (bool, u32),
    ) -> Result<(Response<Incoming>, Lease), &'static str> {
        if resp.status() == http::StatusCode::SWITCHING_PROTOCOLS && !asked_upgrade {
            // A tunnel nobody asked for: the connection is the upstream's now, and nothing
            // it sends may reach the client unrouted.
            self.failed(UpstreamErrorKind::Protocol);
            return Err("the upstream switched protocols without being asked to");
        }
        self.succeeded(started);
        if reframed(&mut resp) {
            debug!(backend = %self.backend, endpoint = %self.authority, "answer with both Content-Length and Transfer-Encoding: relayed by Transfer-Encoding, connection not reused");
        } else {
            lease.sender = Some(sender);
        }
        Ok((resp, lease))
    }

    /// A request that failed on its connection: malformed answer or reset, counted against
    /// the endpoint unless the client's body was at fault.
    fn send_failed(
        &self,
        error: hyper::Error,
        unsent: Option<Request<UpstreamBody>>,
    ) -> ExchangeError {
        let client_fault = error.is_user() || super::find_source::<TooLarge>(&error).is_some();
        let kind = if error.is_parse() || error.is_parse_status() {
            UpstreamErrorKind::Protocol
        } else {
            UpstreamErrorKind::Reset
        };
        if !client_fault {
            self.failed(kind);
        }
        (kind, Box::new(error), unsent)
    }

    /// HTTP/2 wants the absolute target: `:scheme`, and `:authority` from the client's
    /// Host (or the endpoint), instead of a Host header.
    fn to_h2(&self, req: &mut Request<UpstreamBody>) {
        let authority = req
            .headers_mut()
            .remove(header::HOST)
            .and_then(|h| Authority::try_from(h.as_bytes()).ok())
            .unwrap_or_else(|| self.authority.clone());
        let scheme = if self.tls.is_some() {
            Scheme::HTTPS
        } else {
            Scheme::HTTP
        };
        let pq = req.uri().path_and_query().cloned();
        let mut parts = http::uri::Parts::default();
        parts.scheme = Some(scheme);
        parts.authority = Some(authority);
        parts.path_and_query = pq.or_else(|| Some(http::uri::PathAndQuery::from_static("/")));
        if let Ok(uri) = Uri::from_parts(parts) {
            *req.uri_mut() = uri;
        }
        *req.version_mut() = Version::HTTP_2;
    }

    /// A connection when none was idle (and whether it was used before): HTTP/1.1 opens a
    /// new one within the endpoint's bounds, or waits in line for one given back or for
    /// room to open one; HTTP/2 makes the shared one, one at a time. The connecting futures
    /// (TCP, TLS and HTTP handshakes: several KiB) are boxed apart, so a request waiting in
    /// line holds only what waiting needs (a storm puts thousands of them in line).
    async fn obtain(&self, connect_timeout: Duration) -> Result<(Sender, bool), BoxError> {
        if self.protocol == Protocol::H2 {
            return Ok((Box::pin(self.connect_shared(connect_timeout)).await?, false));
        }
        let gate = &self.pool.gate;
        let grant = match gate.try_dial() {
            Some(dial) => Grant::Dial(dial),
            None => gate
                .wait(None, |g| match self.pool.take_idle() {
                    Some(s) => Some(Grant::Conn(s)),
                    None => g.try_dial().map(Grant::Dial),
                })
                .await
                .map_err(|why| {
                    let l = gate.limits();
                    Refused {
                        why,
                        max_connections: l.max_connections,
                        max_waiting: l.max_waiting,
                        wait_timeout: l.wait_timeout,
                    }
                })?,
        };
        match grant {
            Grant::Conn(s) => Ok((s, true)),
            Grant::Dial(dial) => {
                let connect = Box::pin(self.connect(connect_timeout, Some(dial)));
                Ok((connect.await?, false))
            }
        }
    }

    /// The shared HTTP/2 connection, made one at a time.
    async fn connect_shared(&self, connect_timeout: Duration) -> Result<Sender, BoxError> {
        let _one = self.pool.connecting.lock().await;
        if let Some(s) = self.pool.shared() {
            return Ok(Sender::H2(s));
        }
        let sender = self.connect(connect_timeout, None).await?;
        if let Sender::H2(s) = &sender {
            self.pool.shared.store(Some(Arc::new(s.clone())));
        }
        Ok(sender)
    }

    /// Opens a connection (TCP, then TLS for https) within `connect_timeout` and starts its
    /// task, which holds the connection's place under the bounds (`dial`) until it ends.
    async fn connect(
        &self,
        connect_timeout: Duration,
        dial: Option<Dial<Sender>>,
    ) -> Result<Sender, BoxError> {
        let mut dial = dial;
        let open = async {
            let stream = TcpStream::connect(&self.addr).await?;
            stream.set_nodelay(true)?;
            let keepalive = socket2::TcpKeepalive::new().with_time(TCP_KEEPALIVE);
            socket2::SockRef::from(&stream).set_tcp_keepalive(&keepalive)?;
            let Some(tls) = &self.tls else {
                return Ok::<_, BoxError>(self.handshake(TokioIo::new(stream), dial.take()).await?);
            };
            let connector = tokio_rustls::TlsConnector::from(tls.config.clone());
            let stream = connector
                .connect(tls.server_name.clone(), stream)
                .await
                .map_err(|e| {
                    format!(
                        "TLS handshake with {} (as {:?}) failed: {e}",
                        self.authority,
                        tls.server_name.to_str()
                    )
                })?;
            let alpn = stream.get_ref().1.alpn_protocol();
            if self.protocol == Protocol::H2 && alpn != Some(ALPN_H2) {
                return Err(format!(
                    "{} did not agree to HTTP/2 over TLS (ALPN h2); set `protocol = \"http1\"`",
                    self.authority
                )
                .into());
            }
            Ok(self.handshake(TokioIo::new(stream), dial.take()).await?)
        };
        match tokio::time::timeout(connect_timeout, open).await {
            Ok(r) => r,
            Err(_) => Err(format!(
                "connect to {} timed out after {connect_timeout:?}",
                self.authority
            )
            .into()),
        }
    }

    /// The HTTP handshake on an open stream, its connection task spawned with the
    /// connection's place under the bounds.
    async fn handshake<I>(&self, io: I, dial: Option<Dial<Sender>>) -> Result<Sender, hyper::Error>
    where
        I: Read + Write + Unpin + Send + 'static,
    {
        let (backend, endpoint) = (self.backend.clone(), self.authority.clone());
        let ended = move |error: hyper::Error| {
            debug!(%error, %backend, %endpoint, "upstream connection ended with an error");
        };
        match self.protocol {
            Protocol::Http1 => {
                // Flattened writes: a request head and a small body in one buffer, one write
                // (hyper's vectored writes cost more for the small messages proxies carry).
                let (sender, conn) = http1::Builder::new().writev(false).handshake(io).await?;
                let slot = dial.map(Dial::opened);
                tokio::spawn(async move {
                    // An upgraded connection leaves the task (and its place) as a tunnel.
                    let _slot = slot;
                    conn.with_upgrades().await.map_err(ended)
                });
                Ok(Sender::H1(sender))
            }
            Protocol::H2 => {
                let (sender, conn) = http2::Builder::new(TokioExecutor::new())
                    .timer(TokioTimer::new())
                    .keep_alive_interval(H2_KEEPALIVE)
                    .keep_alive_timeout(H2_KEEPALIVE_TIMEOUT)
                    .handshake(io)
                    .await?;
                tokio::spawn(async move { conn.await.map_err(ended) });
                Ok(Sender::H2(sender))
            }
        }
    }

    /// One active health probe: `GET path`, healthy on 2xx.
    async fn probe_once(self: &Arc<Self>, path: &str) -> bool {
        let Ok(mut req) = Request::get(path).body(UpstreamBody::empty()) else {
            return false;
        };
        if let Ok(host) = HeaderValue::from_str(self.authority.as_str()) {
            req.headers_mut().insert(header::HOST, host);
        }
        req.headers_mut().insert(
            header::USER_AGENT,
            HeaderValue::from_static("strangler-health-check"),
        );
        match self.exchange(req, self.connect_timeout).await {
            Ok((resp, _lease)) => resp.status().is_success(),
            Err(_) => false,
        }
    }
}

/// Probes `ep` every `check.interval` while it exists.
async fn probe(ep: Weak<Endpoint>, check: HealthCheck) {
    let mut tick = tokio::time::interval(check.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(ep) = ep.upgrade() else { return };
        let ok = tokio::time::timeout(
            PROBE_TIMEOUT.min(check.interval),
            ep.probe_once(&check.path),
        )
        .await
        .unwrap_or(false);
        if ep.probe_ok.swap(ok, Ordering::AcqRel) != ok {
            if ok {
                info!(backend = %ep.backend, endpoint = %ep.authority, path = %check.path, "health check passes again");
            } else {
                warn!(backend = %ep.backend, endpoint = %ep.authority, path = %check.path, "health check failed; endpoint out of rotation");
            }
        }
    }
}

/// Power of two choices: of two random usable endpoints, the one with fewer requests in
/// flight. `avoid` (the one that just failed) is skipped when there is another. When none is
/// usable, all are candidates: ejection never takes a whole backend out.
pub fn pick(endpoints: &[Arc<Endpoint>], avoid: Option<usize>) -> usize {
    if endpoints.len() <= 1 {
        return 0;
    }
    let mut candidates: Vec<usize> = (0..endpoints.len())
        .filter(|&i| Some(i) != avoid && endpoints[i].usable())
        .collect();
    if candidates.is_empty() {
        candidates = (0..endpoints.len()).filter(|&i| Some(i) != avoid).collect();
    }
    match candidates.len() {
        0 => 0,
        1 => candidates[0],
        n => {
            let a = fastrand::usize(..n);
            let b = (a + 1 + fastrand::usize(..n - 1)) % n;
            let (a, b) = (candidates[a], candidates[b]);
            if endpoints[b].in_flight() < endpoints[a].in_flight() {
                b
            } else {
                a
            }
        }
    }
}

/// Retries allowed per backend: each request earns a fifth of a retry, a retry spends one,
/// the balance is capped, and a little is there from the start. During an outage retries
/// add at most about 20% to the load instead of multiplying it.
pub struct RetryBudget {
    /// In tenths of a retry.
    tokens: AtomicI64,
}

/// Tenths of a retry a request earns, a retry costs, the balance may hold, and it starts at.
const EARN: i64 = 2;
const COST: i64 = 10;
const CAP: i64 = 1000;
const START: i64 = 100;

impl RetryBudget {
    pub fn new() -> Arc<Self> {
        Arc::new(RetryBudget {
            tokens: AtomicI64::new(START),
        })
    }

    pub fn deposit(&self) {
        let _ = self
            .tokens
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |t| {
                (t < CAP).then(|| (t + EARN).min(CAP))
            });
    }

    /// Takes one retry from the budget, if there is one.
    pub fn withdraw(&self) -> bool {
        self.tokens
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |t| {
                (t >= COST).then_some(t - COST)
            })
            .is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoints(n: usize) -> Vec<Arc<Endpoint>> {
        let parsed = crate::config::parse(
            "[backends.b]\nurl = \"http://127.0.0.1:1000\"\n[[routes]]\nprefix = \"/\"\nbackend = \"b\"\n",
        )
        .unwrap();
        let backend = parsed.table.backend(crate::routes::BackendId::new(0));
        (0..n)
            .map(|i| {
                Endpoint::new(
                    "b",
                    format!("127.0.0.1:{}", 1000 + i).parse().unwrap(),
                    backend,
                )
            })
            .collect()
    }

    #[test]
    fn p2c_prefers_fewer_in_flight_and_skips_ejected() {
        let eps = endpoints(2);
        eps[0].in_flight.store(5, Ordering::Release);
        for _ in 0..50 {
            assert_eq!(pick(&eps, None), 1);
        }
        for _ in 0..EJECT_AFTER {
            eps[1].failed(UpstreamErrorKind::Reset);
        }
        assert!(eps[1].ejected());
        for _ in 0..50 {
            assert_eq!(
                pick(&eps, None),
                0,
                "the ejected one is skipped despite fewer in flight"
            );
        }
        for _ in 0..EJECT_AFTER {
            eps[0].failed(UpstreamErrorKind::Reset);
        }
        let picks: Vec<usize> = (0..50).map(|_| pick(&eps, None)).collect();
        assert!(picks.contains(&1), "all ejected: still picked, never none");
        assert_eq!(
            pick(&eps, Some(1)),
            0,
            "the one that just failed is avoided"
        );
    }

    #[test]
    fn one_ejection_per_episode_doubling_and_an_answer_ends_it() {
        let ep = &endpoints(1)[0];
        for _ in 0..EJECT_AFTER {
            ep.failed(UpstreamErrorKind::Reset);
        }
        let first = ep.ejected_until.load(Ordering::Acquire);
        assert!(ep.ejected() && first <= 1_000 + 50, "{first}");
        // The requests in flight when it died fail too: the same event, not more ejections.
        for _ in 0..100 {
            ep.failed(UpstreamErrorKind::Reset);
        }
        assert_eq!(ep.ejections(), 1);
        assert_eq!(ep.ejected_until.load(Ordering::Acquire), first);
        assert_eq!(ep.suppressed.load(Ordering::Relaxed), 100);
        let (_, kind) = ep.ejection().unwrap();
        assert_eq!(kind, UpstreamErrorKind::Reset);
        // The backoff ends without an answer, and it fails again: a second episode, twice as
        // long.
        ep.ejected_until.store(0, Ordering::Release);
        for _ in 0..EJECT_AFTER {
            ep.failed(UpstreamErrorKind::Connect);
        }
        let second = ep.ejected_until.load(Ordering::Acquire) - ep.now_ms();
        assert!(second > 1_500 && second <= 2_000, "{second}");
        assert_eq!(ep.ejections(), 2);
        assert_eq!(ep.ejection().unwrap().1, UpstreamErrorKind::Connect);
        // An answer to an exchange begun before the ejection changes nothing; one begun after
        // it (a request, or a passing health probe) returns it at once.
        ep.succeeded(ep.ejection_epoch.load(Ordering::Acquire) - 1);
        assert!(ep.ejected() && ep.ejections() == 2);
        ep.succeeded(ep.ejection_epoch.load(Ordering::Acquire));
        assert!(!ep.ejected() && ep.ejection().is_none());
        assert_eq!(ep.ejections(), 0);
        assert_eq!(ep.suppressed.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn the_retry_budget_holds_retries_to_a_fifth_of_requests() {
        let b = RetryBudget::new();
        let mut retries = 0;
        for _ in 0..1000 {
            b.deposit();
            while b.withdraw() {
                retries += 1;
            }
        }
        assert!(
            (200..=215).contains(&retries),
            "{retries} retries for 1000 requests"
        );
    }

    /// A backend on 127.0.0.1:0 answering every request with `ok`, counting connections;
    /// `close` makes it close each connection after one answer.
    async fn counting_backend(close: bool) -> (Authority, Arc<AtomicUsize>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let counted = accepted.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                counted.fetch_add(1, Ordering::AcqRel);
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(|_req| async {
                        Ok::<_, std::convert::Infallible>(Response::new(http_body_util::Full::new(
                            bytes::Bytes::from_static(b"ok"),
                        )))
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .keep_alive(!close)
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        (addr.to_string().parse().unwrap(), accepted)
    }

    async fn endpoint_at(authority: Authority) -> Arc<Endpoint> {
        let parsed = crate::config::parse(&format!(
            "[backends.b]\nurl = \"http://{authority}\"\n[[routes]]\nprefix = \"/\"\nbackend = \"b\"\n"
        ))
        .unwrap();
        Endpoint::new(
            "b",
            authority,
            parsed.table.backend(crate::routes::BackendId::new(0)),
        )
    }

    async fn get(ep: &Arc<Endpoint>) -> (Response<Incoming>, Lease) {
        let req = Request::get("/").body(UpstreamBody::empty()).unwrap();
        match ep.exchange(req, Duration::from_secs(1)).await {
            Ok(done) => done,
            Err((kind, e, _)) => panic!("{kind:?}: {e}"),
        }
    }

    /// Reads the answer whole, as the proxy's response body does before releasing.
    async fn drain(resp: Response<Incoming>) {
        use http_body_util::BodyExt;
        resp.into_body().collect().await.unwrap();
    }

    #[tokio::test]
    async fn a_released_connection_is_reused() {
        let (authority, accepted) = counting_backend(false).await;
        let ep = endpoint_at(authority).await;
        for _ in 0..5 {
            let (resp, lease) = get(&ep).await;
            drain(resp).await;
            lease.release();
            assert_eq!(ep.idle(), 1);
        }
        assert_eq!(accepted.load(Ordering::Acquire), 1);
        assert_eq!(ep.in_flight(), 0);
    }

    #[tokio::test]
    async fn an_abandoned_exchange_gives_no_connection_back() {
        let (authority, accepted) = counting_backend(false).await;
        let ep = endpoint_at(authority).await;
        let (resp, lease) = get(&ep).await;
        assert_eq!(ep.in_flight(), 1);
        drop((resp, lease));
        assert_eq!(
            ep.in_flight(),
            0,
            "the lease counts the exchange until dropped"
        );
        assert_eq!(ep.idle(), 0);
        let (resp, lease) = get(&ep).await;
        drain(resp).await;
        lease.release();
        assert_eq!(accepted.load(Ordering::Acquire), 2);
    }

    #[tokio::test]
    async fn a_connection_the_upstream_closed_is_skipped() {
        let (authority, accepted) = counting_backend(true).await;
        let ep = endpoint_at(authority).await;
        for round in 1..=3 {
            let (resp, lease) = get(&ep).await;
            drain(resp).await;
            lease.release();
            // Whether or not the pool has seen the close yet, the next exchange must not
            // fail on the dead connection.
            let (resp, lease) = get(&ep).await;
            drain(resp).await;
            lease.release();
            assert_eq!(
                accepted.load(Ordering::Acquire),
                2 * round,
                "a fresh connection each time"
            );
        }
    }
}

//! Listeners and connections: the accept loop under the connection cap, TLS termination,
//! HTTP/1.1 with upgrades, HTTP/2 (ALPN `h2` over TLS, or cleartext prior knowledge with
//! `h2c`), and graceful shutdown. On shutdown the loop stops accepting, every connection is
//! asked to finish its in-flight requests and close, and `drain` waits for them, bounded.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::server::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};
use tokio::time::Instant;
use tracing::{debug, info, warn, Instrument};

use crate::activity::{Activity, Busy, Watch};
use crate::config::ServerSettings;
use crate::upstream::body::ResponseBody;

/// Pause after a failed accept (EMFILE and friends) so the loop does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);
/// Connections accepted in one go while the accept queue holds them (tokio's cooperative
/// budget would otherwise hand the thread on after 128, and each new connection's first
/// request would run before the next accept).
const ACCEPT_BATCH: usize = 1024;

/// HTTP/2 limits per client connection. Streams: as nginx's `http2_max_concurrent_streams`.
const H2_MAX_CONCURRENT_STREAMS: u32 = 128;
/// Flow-control windows: enough for a fast stream without letting one connection pin much
/// memory (64 KiB is the protocol default; hyper's own defaults are these).
const H2_STREAM_WINDOW: u32 = 1 << 20;
const H2_CONNECTION_WINDOW: u32 = 2 << 20;
/// A ping after this much silence; the connection is closed if it is not answered in time.
const H2_KEEPALIVE: Duration = Duration::from_secs(30);
const H2_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);
/// Rapid reset (CVE-2023-44487): streams the client opens and resets before they are
/// handled, at most this many at once; past it the connection is closed with GOAWAY.
const H2_MAX_PENDING_RESETS: usize = 20;
/// "MadeYouReset" (CVE-2025-8671): streams the server had to reset because the client broke
/// the rules, at most this many per connection before it is closed.
const H2_MAX_LOCAL_ERROR_RESETS: usize = 256;

pub use crate::tls::TlsConfig;

/// TLS on a listener: its configuration and the counters of handshakes that did not complete.
pub struct Tls {
    pub config: TlsConfig,
    pub failed: metrics::Counter,
    pub timed_out: metrics::Counter,
}

/// Fires once, for every connection, when shutdown starts.
#[derive(Clone)]
pub struct Shutdown(watch::Receiver<bool>);

impl Shutdown {
    pub fn new() -> (watch::Sender<bool>, Shutdown) {
        let (tx, rx) = watch::channel(false);
        (tx, Shutdown(rx))
    }

    /// Whether the signal may have changed since this receiver was made (cheap: an atomic
    /// load; [`Shutdown::started`] says whether it has fired).
    fn signalled(&self) -> bool {
        self.0.has_changed().unwrap_or(true)
    }

    /// Resolves when shutdown has started (also if it started before the call).
    pub async fn started(&mut self) {
        // An error means the sender is gone: that is a shutdown too.
        let _ = self.0.wait_for(|&down| down).await;
    }
}

/// What a listener enforces on its client connections.
#[derive(Debug, Clone, PartialEq)]
pub struct ListenerLimits {
    /// Open client connections at most; past it new ones wait to be accepted.
    pub max_connections: usize,
    /// For a request head (and a TLS handshake) to arrive.
    pub header_read_timeout: Duration,
    /// Request head (HTTP/1.1) or header list (HTTP/2) size.
    pub max_header_size: usize,
    /// How long shutdown waits for in-flight requests.
    pub drain_timeout: Duration,
    /// Cleartext HTTP/2 by prior knowledge next to HTTP/1.1 (without TLS).
    pub h2c: bool,
}

impl ListenerLimits {
    /// The admin listener's own: a handful of operators and scrapers.
    pub const ADMIN: ListenerLimits = ListenerLimits {
        max_connections: 64,
        header_read_timeout: Duration::from_secs(10),
        max_header_size: 16 << 10,
        drain_timeout: Duration::from_secs(1),
        h2c: false,
    };
}

impl From<&ServerSettings> for ListenerLimits {
    fn from(s: &ServerSettings) -> Self {
        ListenerLimits {
            max_connections: s.max_connections,
            header_read_timeout: s.header_read_timeout,
            max_header_size: s.max_header_size,
            drain_timeout: s.drain_timeout,
            h2c: s.h2c,
        }
    }
}

/// The HTTP/1.1 server settings shared by every client connection. No timer: hyper would
/// arm one (an allocation and two timer-wheel updates) for every request head it waits for;
/// `header_read_timeout` is kept by each connection's [`Watchdog`] instead. Vectored writes
/// stay on here (hyper's default on a socket): flattened, a 64 KiB answer costs more than
/// twice the instructions (bench/icount.sh: 47.9k -> 106.8k), for 0.1k saved on a 1 KiB one.
pub fn http1_builder(limits: &ListenerLimits) -> http1::Builder {
    let mut b = http1::Builder::new();
    b.max_header_size(limits.max_header_size).keep_alive(true);
    b
}

/// Applies the HTTP/2 limits to hyper's builder or hyper-util's (same methods, two types).
macro_rules! h2_limits {
    ($b:expr, $limits:expr) => {
        $b.timer(TokioTimer::new())
            .max_concurrent_streams(H2_MAX_CONCURRENT_STREAMS)
            .max_header_list_size($limits.max_header_size.min(u32::MAX as usize) as u32)
            .initial_stream_window_size(H2_STREAM_WINDOW)
            .initial_connection_window_size(H2_CONNECTION_WINDOW)
            .keep_alive_interval(H2_KEEPALIVE)
            .keep_alive_timeout(H2_KEEPALIVE_TIMEOUT)
            .max_pending_accept_reset_streams(H2_MAX_PENDING_RESETS)
            .max_local_error_reset_streams(H2_MAX_LOCAL_ERROR_RESETS)
    };
}

/// The HTTP/2 server settings shared by every client connection.
pub fn http2_builder(limits: &ListenerLimits) -> http2::Builder<TokioExecutor> {
    let mut b = http2::Builder::new(TokioExecutor::new());
    h2_limits!(b, limits);
    b
}

/// HTTP/1.1 or cleartext HTTP/2 by prior knowledge, told apart by the connection preface.
fn h2c_builder(limits: &ListenerLimits) -> auto::Builder<TokioExecutor> {
    let mut b = auto::Builder::new(TokioExecutor::new());
    b.http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(limits.max_header_size.max(8192))
        .keep_alive(true);
    h2_limits!(b.http2(), limits);
    b
}

/// How connections on a listener are served.
struct Protocols {
    http1: http1::Builder,
    http2: http2::Builder<TokioExecutor>,
    h2c: Option<auto::Builder<TokioExecutor>>,
    tls: Option<Tls>,
    /// `header_read_timeout`: for a TLS handshake, and on plain HTTP/1.1 for the first byte.
    handshake_timeout: Duration,
}

impl Protocols {
    /// Cleartext HTTP/1.1 only: no TLS, no h2c.
    fn plain_http1(&self) -> bool {
        self.tls.is_none() && self.h2c.is_none()
    }
}

/// Binds `addr` and listens with an accept queue of `backlog` connections (tokio's own
/// `bind` asks for 128, which a burst of clients overflows: their SYNs are dropped and they
/// wait out TCP's 1 s and 3 s retransmission timers).
pub fn listen(addr: SocketAddr, backlog: u32) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(backlog)
}

/// Where the kernel's ceiling on accept queues is read.
const SOMAXCONN: &str = "/proc/sys/net/core/somaxconn";

/// The backlog to listen with: the one asked for, at most the kernel's `somaxconn` (it
/// would cut it down silently; said here instead), or `somaxconn` itself when none was
/// asked for. Without `/proc` (not Linux), what was asked for, else 4096.
pub fn backlog(asked: Option<u32>) -> u32 {
    let ceiling = std::fs::read_to_string(SOMAXCONN)
        .ok()
        .and_then(|t| t.trim().parse::<u32>().ok())
        .filter(|&n| n > 0);
    match (asked, ceiling) {
        (Some(a), Some(c)) if a > c => {
            warn!(backlog = a, somaxconn = c, "`backlog` is above the kernel's net.core.somaxconn: the kernel keeps {c}; raise the sysctl (on Kubernetes, a pod securityContext sysctl) to get more");
            c
        }
        (Some(a), _) => a,
        (None, Some(c)) => c,
        (None, None) => 4096,
    }
}

/// A listener's connection counts, for `/metrics` and the board.
#[derive(Debug, Default)]
pub struct ListenerStats {
    /// Connections accepted since start.
    pub accepted: AtomicU64,
    /// Connections open now.
    pub open: AtomicUsize,
    /// The accept queue it listens with.
    pub backlog: std::sync::atomic::AtomicU32,
}

/// An accepted connection's place under `max_connections` and in the open count.
struct Admitted {
    _permit: tokio::sync::OwnedSemaphorePermit,
    stats: Arc<ListenerStats>,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        self.stats.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Accepts connections until shutdown, then drains them for at most `drain_timeout`.
pub async fn serve<S, F>(
    listener: TcpListener,
    (limits, stats): (&ListenerLimits, Arc<ListenerStats>),
    tls: Option<Tls>,
    service: S,
    mut shutdown: Shutdown,
    name: &'static str,
) where
    S: Fn(Request<Incoming>, SocketAddr, Option<Watch>) -> F + Clone + Send + 'static,
    F: Future<Output = Response<ResponseBody>> + Send + 'static,
{
    let max = limits
        .max_connections
        .min(Semaphore::MAX_PERMITS)
        .min(u32::MAX as usize);
    let permits = Arc::new(Semaphore::new(max));
    let protocols = Arc::new(Protocols {
        http1: http1_builder(limits),
        http2: http2_builder(limits),
        h2c: (limits.h2c && tls.is_none()).then(|| h2c_builder(limits)),
        tls,
        handshake_timeout: limits.header_read_timeout,
    });
    loop {
        let permit = tokio::select! {
            biased;
            _ = shutdown.started() => break,
            p = permits.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
        };
        let (stream, peer) = tokio::select! {
            biased;
            _ = shutdown.started() => break,
            r = listener.accept() => match r {
                Ok(conn) => conn,
                Err(error) => {
                    warn!(%error, listener = name, "accept failed");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            },
        };
        let admit = |stream: TcpStream, peer: SocketAddr, permit| {
            let _ = stream.set_nodelay(true);
            stats.accepted.fetch_add(1, Ordering::Relaxed);
            stats.open.fetch_add(1, Ordering::Relaxed);
            let permit = Admitted {
                _permit: permit,
                stats: stats.clone(),
            };
            let handler = Handler {
                service: service.clone(),
                peer,
                activity: None,
            };
            let span = tracing::debug_span!("conn", %peer, listener = name);
            let conn = (protocols.clone(), stream, handler, shutdown.clone());
            spawn_connection(conn, permit, span);
        };
        admit(stream, peer, permit);
        // Then whatever else the accept queue holds now, up to a batch, without waiting for
        // the scheduler's next turn: a storm is taken in large bites, and the connections
        // already served run between them.
        for _ in 1..ACCEPT_BATCH {
            let Ok(permit) = permits.clone().try_acquire_owned() else {
                break;
            };
            let next = std::future::poll_fn(|cx| Poll::Ready(listener.poll_accept(cx)));
            match tokio::task::unconstrained(next).await {
                Poll::Ready(Ok((stream, peer))) => admit(stream, peer, permit),
                // Empty (or an error the loop above will meet and report).
                _ => break,
            }
        }
    }
    drop(listener);
    drain(&permits, max, limits.drain_timeout, name).await;
}

/// Serves one accepted connection on its own task, holding its permit until it ends. Two
/// task types: the plain HTTP/1.1 one (the usual listener) carries none of the TLS and
/// HTTP/2 states, which would make every connection's task several KiB larger. The
/// connection's span is only attached when it records (with debug logging): entering a
/// disabled span still costs a few hundred instructions per request.
fn spawn_connection<S, F>(
    (protocols, stream, handler, shutdown): (Arc<Protocols>, TcpStream, Handler<S>, Shutdown),
    permit: Admitted,
    span: tracing::Span,
) where
    S: Fn(Request<Incoming>, SocketAddr, Option<Watch>) -> F + Clone + Send + 'static,
    F: Future<Output = Response<ResponseBody>> + Send + 'static,
{
    fn spawn(task: impl Future<Output = ()> + Send + 'static, span: tracing::Span) {
        if span.is_disabled() {
            tokio::spawn(task);
        } else {
            tokio::spawn(task.instrument(span));
        }
    }
    if protocols.plain_http1() {
        let task = async move {
            plain_http1(&protocols, stream, handler, shutdown).await;
            drop(permit);
        };
        spawn(task, span);
    } else {
        let task = async move {
            connection(&protocols, stream, handler, shutdown).await;
            drop(permit);
        };
        spawn(task, span);
    }
}

/// What hyper calls for each request of a connection: the listener's handler, given the
/// peer's address. With an [`Activity`], each request counts as busy until its answer's
/// body is done (the connection's [`Watchdog`] reads it).
struct Handler<S> {
    service: S,
    peer: SocketAddr,
    activity: Option<Arc<Activity>>,
}

impl<S: Clone> Clone for Handler<S> {
    fn clone(&self) -> Self {
        Handler {
            service: self.service.clone(),
            peer: self.peer,
            activity: self.activity.clone(),
        }
    }
}

impl<S, F> hyper::service::Service<Request<Incoming>> for Handler<S>
where
    S: Fn(Request<Incoming>, SocketAddr, Option<Watch>) -> F,
    F: Future<Output = Response<ResponseBody>>,
{
    type Response = Response<Tracked>;
    type Error = Infallible;
    type Future = Answer<F>;

    fn call(&self, req: Request<Incoming>) -> Answer<F> {
        let busy = self.activity.as_ref().map(|a| Busy::start(a.clone()));
        let watch = self.activity.as_ref().map(|a| Watch(a.clone()));
        Answer(Box::pin((self.service)(req, self.peer, watch)), busy)
    }
}

/// The handler's answer to one request, as the `Result` hyper wants, boxed. hyper keeps a
/// slot the size of this future for every connection from its first request on, idle or
/// not; the proxy's request future is over 6 KiB, so each idle keep-alive connection would
/// hold that much. Boxed, the request's state lives only while the request does (one
/// allocation per request, freed when it ends), and the slot is a pointer.
struct Answer<F>(Pin<Box<F>>, Option<Busy>);

impl<F: Future<Output = Response<ResponseBody>>> Future for Answer<F> {
    type Output = Result<Response<Tracked>, Infallible>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let resp = std::task::ready!(self.0.as_mut().poll(cx));
        let busy = self.1.take();
        Poll::Ready(Ok(resp.map(|body| Tracked { body, _busy: busy })))
    }
}

/// An answer's body, holding its request's [`Busy`] until hyper is done with it.
pub struct Tracked {
    body: ResponseBody,
    _busy: Option<Busy>,
}

impl http_body::Body for Tracked {
    type Data = bytes::Bytes;
    type Error = crate::error::BoxError;

    #[inline]
    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<bytes::Bytes>, Self::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    #[inline]
    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    #[inline]
    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// `header_read_timeout` on an HTTP/1.1 connection without a timer per request: one sleep
/// per connection, re-armed only when it fires. The next request head is due
/// `header_read_timeout` after the connection was accepted or its last answer ended; a
/// connection serving a request is never cut by it (slow bodies have their own limits).
/// When it fires, a connection that has become busy or idle again since is given the rest of
/// its time; one still waiting for a head past its due time is closed, as hyper's own timer
/// would have closed it: nothing written.
struct Watchdog<'a> {
    activity: &'a Activity,
    timeout: Duration,
}

/// What the watchdog does when its sleep fires.
enum Fired {
    /// Look again then.
    Rearm(Instant),
    /// The served request's upstream deadline has passed: it is told so (hyper must poll it
    /// again), and the watchdog looks again then.
    Expired(Instant),
    /// A request head is overdue: the connection closes.
    Close,
}

impl Watchdog<'_> {
    /// The watchdog's part of a wake of its connection's task: `Close`, `Expired` (the
    /// served request must be polled again) or nothing to do. The sleep is polled only when
    /// it was reset or has fired (it keeps the task's waker in between).
    fn poll(
        &self,
        mut sleep: Pin<&mut tokio::time::Sleep>,
        registered: &mut bool,
        cx: &mut Context<'_>,
    ) -> Option<Fired> {
        // A request whose upstream deadline comes before the sleep (a backend `timeout`
        // shorter than `header_read_timeout`) moves the sleep up.
        if let Some(due) = self.activity.upstream_due() {
            if due < sleep.deadline() {
                sleep.as_mut().reset(due);
                *registered = false;
            }
        }
        if *registered && !sleep.is_elapsed() {
            return None;
        }
        let mut said = None;
        while sleep.as_mut().poll(cx).is_ready() {
            match self.fired(Instant::now()) {
                Fired::Close => return Some(Fired::Close),
                Fired::Rearm(next) => sleep.as_mut().reset(next),
                Fired::Expired(next) => {
                    said = Some(Fired::Expired(next));
                    sleep.as_mut().reset(next);
                }
            }
        }
        *registered = true;
        said
    }

    fn fired(&self, now: Instant) -> Fired {
        let a = self.activity;
        let next = now + self.timeout;
        if let Some(due) = a.upstream_due() {
            if due <= now {
                a.expire();
                return Fired::Expired(next);
            }
            return Fired::Rearm(due.min(next));
        }
        match a.head_due(self.timeout) {
            None => Fired::Rearm(next),
            Some(due) if due > now => Fired::Rearm(due),
            Some(_) => Fired::Close,
        }
    }
}

/// Serves a connection on a cleartext HTTP/1.1 listener. Until the client's first byte
/// arrives it holds only the socket: hyper's connection, once started, keeps a read and a
/// write buffer (8 KiB each) and a slot for the request's future, so it is started when
/// there is something to read. `header_read_timeout` counts from the accept: the first byte
/// must come within it, and the first request head too. Closed without a byte, on shutdown
/// or at the deadline, the connection ends as hyper would have ended it: the socket closes,
/// nothing is written.
async fn plain_http1<S, F>(
    p: &Protocols,
    stream: TcpStream,
    handler: Handler<S>,
    mut shutdown: Shutdown,
) where
    S: Fn(Request<Incoming>, SocketAddr, Option<Watch>) -> F + Send,
    F: Future<Output = Response<ResponseBody>> + Send + 'static,
{
    let accepted = Instant::now();
    let deadline = accepted + p.handshake_timeout;
    let mut first = [0u8; 1];
    let peeked = tokio::select! {
        biased;
        _ = shutdown.started() => return,
        r = tokio::time::timeout_at(deadline, stream.peek(&mut first)) => r,
    };
    match peeked {
        Ok(Ok(0)) => return,
        Ok(Ok(_)) => {}
        Ok(Err(error)) => return debug!(%error, "connection ended with an error"),
        Err(_) => return debug!(error = HEADER_TIMEOUT, "connection ended with an error"),
    }
    serve_http1(p, TokioIo::new(stream), handler, shutdown, accepted).await
}

/// An HTTP/1.1 connection (cleartext or over TLS), under its [`Watchdog`] from `since` (the
/// accept, or the end of the TLS handshake).
async fn serve_http1<S, F, I>(
    p: &Protocols,
    io: I,
    handler: Handler<S>,
    shutdown: Shutdown,
    since: Instant,
) where
    S: Fn(Request<Incoming>, SocketAddr, Option<Watch>) -> F + Send,
    F: Future<Output = Response<ResponseBody>> + Send + 'static,
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let activity = Activity::new(since);
    let handler = Handler {
        activity: Some(activity.clone()),
        ..handler
    };
    let conn = p.http1.serve_connection(io, handler).with_upgrades();
    tokio::pin!(conn);
    let watchdog = Watchdog {
        activity: &activity,
        timeout: p.handshake_timeout,
    };
    drive(conn, shutdown, |c| c.graceful_shutdown(), Some(watchdog)).await
}

/// What hyper says when a request head does not arrive in time.
const HEADER_TIMEOUT: &str = "read header from client timeout";

/// Serves one client connection: TLS first if configured, then the protocol ALPN chose (or
/// the preface shows, with h2c), until it closes or shutdown asks it to.
async fn connection<S, F>(p: &Protocols, stream: TcpStream, svc: Handler<S>, mut shutdown: Shutdown)
where
    S: Fn(Request<Incoming>, SocketAddr, Option<Watch>) -> F + Clone + Send + 'static,
    F: Future<Output = Response<ResponseBody>> + Send + 'static,
{
    let Some(tls) = &p.tls else {
        let io = TokioIo::new(stream);
        return match &p.h2c {
            Some(auto) => {
                let conn = auto.serve_connection_with_upgrades(io, svc);
                tokio::pin!(conn);
                drive(conn, shutdown, |c| c.graceful_shutdown(), None).await
            }
            None => serve_http1(p, io, svc, shutdown, Instant::now()).await,
        };
    };
    let acceptor = tokio_rustls::TlsAcceptor::from(tls.config.load_full());
    let accepted = tokio::select! {
        _ = shutdown.started() => return,
        r = tokio::time::timeout(p.handshake_timeout, acceptor.accept(stream)) => r,
    };
    let stream = match accepted {
        Ok(Ok(s)) => s,
        Ok(Err(error)) => {
            tls.failed.increment(1);
            return debug!(%error, "TLS handshake failed");
        }
        Err(_) => {
            tls.timed_out.increment(1);
            return debug!("TLS handshake timed out");
        }
    };
    let h2 = stream.get_ref().1.alpn_protocol() == Some(crate::tls::ALPN_H2);
    let io = TokioIo::new(stream);
    if h2 {
        let conn = p.http2.serve_connection(io, svc);
        tokio::pin!(conn);
        drive(conn, shutdown, |c| c.graceful_shutdown(), None).await
    } else {
        serve_http1(p, io, svc, shutdown, Instant::now()).await
    }
}

/// Runs a connection to its end; once shutdown starts, asks it to finish gracefully. With a
/// [`Watchdog`], the connection is also closed when a request head is overdue. The caller
/// pins the connection: passed by value, it would be held twice in this future (the
/// argument and the pinned copy), some 700 bytes more in every connection's task.
///
/// Each wake of the connection's task polls hyper's connection; the shutdown signal and the
/// watchdog's sleep are polled once to register the task's waker and then only read (an
/// atomic load each) until they have something to say: polling them on every wake cost a
/// few hundred instructions per request.
async fn drive<C, E>(
    mut conn: Pin<&mut C>,
    shutdown: Shutdown,
    graceful: impl FnOnce(Pin<&mut C>),
    watchdog: Option<Watchdog<'_>>,
) where
    C: Future<Output = Result<(), E>>,
    E: std::fmt::Display,
{
    let mut graceful = Some(graceful);
    let probe = shutdown.clone();
    let mut shutdown = shutdown;
    let started = shutdown.started();
    tokio::pin!(started);
    let first_due = watchdog
        .as_ref()
        .and_then(|w| w.activity.head_due(w.timeout))
        .unwrap_or_else(Instant::now);
    let sleep = tokio::time::sleep_until(first_due);
    tokio::pin!(sleep);
    let (mut stop_registered, mut sleep_registered) = (false, false);
    let ended = std::future::poll_fn(|cx| {
        if let Poll::Ready(r) = conn.as_mut().poll(cx) {
            return Poll::Ready(Some(r));
        }
        if graceful.is_some() && (!stop_registered || probe.signalled()) {
            stop_registered = true;
            if started.as_mut().poll(cx).is_ready() {
                if let Some(g) = graceful.take() {
                    g(conn.as_mut());
                }
                return conn.as_mut().poll(cx).map(Some);
            }
        }
        let Some(w) = &watchdog else {
            return Poll::Pending;
        };
        match w.poll(sleep.as_mut(), &mut sleep_registered, cx) {
            Some(Fired::Close) => Poll::Ready(None),
            // hyper polls the request's future, which now gives up on its backend.
            Some(Fired::Expired(_)) => conn.as_mut().poll(cx).map(Some),
            _ => Poll::Pending,
        }
    })
    .await;
    match ended {
        None => debug!(error = HEADER_TIMEOUT, "connection ended with an error"),
        Some(Err(error)) => debug!(%error, "connection ended with an error"),
        Some(Ok(())) => {}
    }
}

/// Waits until every connection has returned its permit, or `timeout`.
async fn drain(permits: &Semaphore, max: usize, timeout: Duration, name: &str) {
    let open = max - permits.available_permits();
    if open > 0 {
        info!(open, listener = name, "draining connections");
    }
    match tokio::time::timeout(timeout, permits.acquire_many(max as u32)).await {
        Ok(_) => debug!(listener = name, "all connections closed"),
        Err(_) => warn!(
            open = max - permits.available_permits(),
            listener = name,
            "drain timeout reached; closing the remaining connections"
        ),
    }
}

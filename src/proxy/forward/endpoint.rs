//! One endpoint of a backend: its pool of idle connections, requests in flight, passive
//! health (consecutive failures eject it for a doubling backoff), active health (a probe task
//! when `health` is configured), and the power-of-two-choices pick among endpoints.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use crossbeam_queue::ArrayQueue;
use http::uri::Authority;
use http::{header, HeaderValue, Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tracing::{debug, info, warn};

use crate::error::{BoxError, UpstreamErrorKind};
use crate::proxy::body::{TooLarge, UpstreamBody};
use crate::routes::{Backend, HealthCheck};

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

type Sender = SendRequest<UpstreamBody>;

/// A failed exchange: kind, cause, and the request if it was never written.
pub type ExchangeError = (UpstreamErrorKind, BoxError, Option<Request<UpstreamBody>>);

struct Idle {
    sender: Sender,
    since: std::time::Instant,
}

/// The idle connections of one endpoint.
pub struct Pool {
    idle: ArrayQueue<Idle>,
}

impl Pool {
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

    pub fn idle(&self) -> usize {
        self.idle.len()
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
    pub pool: Pool,
    in_flight: AtomicUsize,
    failures: AtomicU32,
    ejections: AtomicU32,
    /// Milliseconds since `born` until which the endpoint is ejected.
    ejected_until: AtomicU64,
    born: std::time::Instant,
    /// The last active probe's verdict (true without probes).
    probe_ok: AtomicBool,
}

impl Endpoint {
    pub fn new(
        backend: &str,
        authority: Authority,
        connect_timeout: Duration,
        health: Option<HealthCheck>,
    ) -> Arc<Self> {
        let ep = Arc::new(Endpoint {
            backend: backend.to_string(),
            addr: format!(
                "{}:{}",
                authority.host(),
                authority.port_u16().unwrap_or(80)
            ),
            authority,
            connect_timeout,
            health: health.clone(),
            pool: Pool {
                idle: ArrayQueue::new(POOL_MAX_IDLE),
            },
            in_flight: AtomicUsize::new(0),
            failures: AtomicU32::new(0),
            ejections: AtomicU32::new(0),
            ejected_until: AtomicU64::new(0),
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

    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Acquire)
    }

    fn usable(&self) -> bool {
        self.healthy() && !self.ejected()
    }

    /// Counts a failure; the `EJECT_AFTER`th in a row ejects the endpoint.
    pub fn failed(&self) {
        if self.failures.fetch_add(1, Ordering::AcqRel) + 1 < EJECT_AFTER {
            return;
        }
        self.failures.store(0, Ordering::Release);
        let n = self.ejections.fetch_add(1, Ordering::AcqRel);
        let backoff = EJECT_BASE.saturating_mul(1 << n.min(5)).min(EJECT_MAX);
        self.ejected_until.store(
            self.now_ms() + backoff.as_millis() as u64,
            Ordering::Release,
        );
        warn!(backend = %self.backend, endpoint = %self.authority, backoff = %humantime::format_duration(backoff), "endpoint ejected after repeated failures");
    }

    fn succeeded(&self) {
        self.failures.store(0, Ordering::Release);
        if self.ejections.swap(0, Ordering::AcqRel) > 0 {
            info!(backend = %self.backend, endpoint = %self.authority, "endpoint recovered");
        }
    }

    /// Sends `req` on a pooled or new connection of this endpoint.
    pub async fn exchange(
        self: &Arc<Self>,
        mut req: Request<UpstreamBody>,
        connect_timeout: Duration,
    ) -> Result<(Response<Incoming>, Lease), ExchangeError> {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        // Owns the in-flight count from here: dropped on failure, handed over on success.
        let mut lease = Lease {
            sender: None,
            ep: self.clone(),
        };
        loop {
            let (mut sender, reused) = match self.pool.take() {
                Some(s) => (s, true),
                None => match self.connect(connect_timeout).await {
                    Ok(s) => (s, false),
                    Err(e) => {
                        self.failed();
                        return Err((UpstreamErrorKind::Connect, e, Some(req)));
                    }
                },
            };
            if let Err(e) = sender.ready().await {
                if reused {
                    continue;
                }
                self.failed();
                return Err((UpstreamErrorKind::Connect, Box::new(e), Some(req)));
            }
            match sender.try_send_request(req).await {
                Ok(resp) => {
                    self.succeeded();
                    lease.sender = Some(sender);
                    return Ok((resp, lease));
                }
                Err(mut e) => match e.take_message() {
                    // Never written: safe to try another connection, whatever the method.
                    Some(r) if reused => req = r,
                    unsent => {
                        let error = e.into_error();
                        let client_fault = error.is_user()
                            || crate::proxy::forward::find_source::<TooLarge>(&error).is_some();
                        let kind = if error.is_parse() || error.is_parse_status() {
                            UpstreamErrorKind::Protocol
                        } else {
                            UpstreamErrorKind::Reset
                        };
                        if !client_fault {
                            self.failed();
                        }
                        return Err((kind, Box::new(error), unsent));
                    }
                },
            }
        }
    }

    /// Opens a connection within `connect_timeout` and starts its task.
    async fn connect(&self, connect_timeout: Duration) -> Result<Sender, BoxError> {
        let open = async {
            let stream = TcpStream::connect(&self.addr).await?;
            stream.set_nodelay(true)?;
            let keepalive = socket2::TcpKeepalive::new().with_time(TCP_KEEPALIVE);
            socket2::SockRef::from(&stream).set_tcp_keepalive(&keepalive)?;
            Ok::<_, std::io::Error>(stream)
        };
        let stream = match tokio::time::timeout(connect_timeout, open).await {
            Ok(r) => r?,
            Err(_) => {
                return Err(format!(
                    "connect to {} timed out after {connect_timeout:?}",
                    self.authority
                )
                .into())
            }
        };
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        let (backend, endpoint) = (self.backend.clone(), self.authority.clone());
        tokio::spawn(async move {
            if let Err(error) = conn.with_upgrades().await {
                debug!(%error, %backend, %endpoint, "upstream connection ended with an error");
            }
        });
        Ok(sender)
    }

    /// One active health probe: `GET path`, healthy on 2xx.
    async fn probe_once(self: &Arc<Self>, path: &str) -> bool {
        let uri = format!("http://{}{path}", self.authority);
        let Ok(mut req) = Request::get(uri).body(UpstreamBody::empty()) else {
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
        (0..n)
            .map(|i| {
                Endpoint::new(
                    "b",
                    format!("127.0.0.1:{}", 1000 + i).parse().unwrap(),
                    Duration::from_secs(1),
                    None,
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
            eps[1].failed();
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
            eps[0].failed();
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
    fn ejection_backoff_doubles_and_success_resets_it() {
        let ep = &endpoints(1)[0];
        for _ in 0..EJECT_AFTER {
            ep.failed();
        }
        let first = ep.ejected_until.load(Ordering::Acquire);
        for _ in 0..EJECT_AFTER {
            ep.failed();
        }
        let second = ep.ejected_until.load(Ordering::Acquire) - ep.now_ms();
        assert!(
            first <= 1_000 + 50 && second > 1_500,
            "{first} then {second}"
        );
        ep.succeeded();
        assert_eq!(ep.ejections.load(Ordering::Acquire), 0);
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
}

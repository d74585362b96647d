//! Stale-if-error end to end: a real proxy in front of a backend the test switches between
//! healthy, failing with a status, hanging and stopped (its listener closed). What is checked:
//! requests are always forwarded and a stored copy answers only after the backend (and the
//! fallback) failed in one of the route's `on` ways, until `max_stale` (or the origin's own
//! `stale-if-error`); client errors and unlisted statuses pass through; `connect` covers a
//! connection refused, closed unanswered or reset; `Age` adds the origin's own; every answer
//! that may not be stored is counted and never served; `vary` headers, queries and users get
//! their own copies, and a coded copy goes only to clients that accept its coding; the store stays inside its byte bound; writes drop copies; reloads keep or drop
//! them; a stale answer counts as the failure it replaced (metrics, guard, access log); and the
//! config mistakes, each at its line and column.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a panic is a failure report

mod support;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use http::request::Parts;
use http::{HeaderName, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use support::jwt::{secret_dir, ISSUER, SECRET};
use support::log::Sink;
use support::*;
use tokio::net::TcpListener;
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;

// ------------------------------------------------------------------------------- backend

type Body = BoxBody<Bytes, std::io::Error>;

/// What the switchable backend sends.
enum Kind {
    /// `{"n", "method", "path", "ae", "lang"}`: `n` numbers the requests the backend has seen.
    Json,
    /// `len` bytes with `content-length`.
    Sized(usize),
    /// `len` bytes in 1 KiB chunks, without `content-length`.
    Chunked(usize),
    /// Declares `content-length: 1000`, sends 10 bytes, then breaks the connection.
    Cut,
    /// Never answers.
    Hang,
}

/// One answer of the switchable backend.
struct Out {
    status: u16,
    headers: Vec<(String, String)>,
    body: Kind,
}

impl Out {
    fn json() -> Out {
        Out::status(200)
    }
    fn status(status: u16) -> Out {
        Out {
            status,
            headers: vec![],
            body: Kind::Json,
        }
    }
    fn body(body: Kind) -> Out {
        Out {
            status: 200,
            headers: vec![],
            body,
        }
    }
    fn with(mut self, name: &str, value: &str) -> Out {
        self.headers.push((name.into(), value.into()));
        self
    }
}

type Rule = dyn Fn(&Parts) -> Out + Send + Sync;

/// How the backend treats the connections it accepts from now on ([`Backend::connections`]).
#[derive(Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum Conn {
    /// Serves HTTP by the rule.
    Serve,
    /// Reads the request and closes the connection without a word.
    Close,
    /// Reads the request and resets the connection (RST).
    Reset,
    /// Reads the request and answers bytes that are not HTTP.
    Garbage,
}

#[derive(Clone)]
struct Shared {
    hits: Arc<AtomicUsize>,
    rule: Arc<Mutex<Arc<Rule>>>,
    conn: Arc<AtomicU8>,
}

/// A backend whose answers the test sets with [`Backend::answer`], and which it can stop
/// (listener and every connection closed: connections are refused) and start again on the
/// same address.
struct Backend {
    addr: SocketAddr,
    shared: Shared,
    task: Mutex<Option<JoinHandle<()>>>,
}

impl Backend {
    async fn start() -> Backend {
        let (l, addr) = listener().await;
        let shared = Shared {
            hits: Arc::default(),
            rule: Arc::new(Mutex::new(Arc::new(|_: &Parts| Out::json()))),
            conn: Arc::new(AtomicU8::new(Conn::Serve as u8)),
        };
        let task = tokio::spawn(accept(l, shared.clone()));
        Backend {
            addr,
            shared,
            task: Mutex::new(Some(task)),
        }
    }

    fn answer(&self, rule: impl Fn(&Parts) -> Out + Send + Sync + 'static) {
        *self.shared.rule.lock().unwrap() = Arc::new(rule);
    }

    /// Answers `healthy()` while the returned switch is off, and 503 while it is on.
    fn failing_when(&self, healthy: impl Fn() -> Out + Send + Sync + 'static) -> Arc<AtomicBool> {
        let failing = Arc::new(AtomicBool::new(false));
        let f = failing.clone();
        self.answer(move |_| {
            if f.load(Ordering::SeqCst) {
                Out::status(503)
            } else {
                healthy()
            }
        });
        failing
    }

    fn hits(&self) -> usize {
        self.shared.hits.load(Ordering::SeqCst)
    }

    /// How connections accepted from now on are treated (open ones are not touched: stop and
    /// restart to close them).
    fn connections(&self, how: Conn) {
        self.shared.conn.store(how as u8, Ordering::SeqCst);
    }

    /// Closes the listener and every connection; the proxy's pool notices the closed ones.
    async fn stop(&self) {
        let task = self.task.lock().unwrap().take();
        if let Some(t) = task {
            t.abort();
            let _ = t.await;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(
            tokio::net::TcpStream::connect(self.addr).await.is_err(),
            "the stopped backend still accepts"
        );
    }

    async fn restart(&self) {
        let l = TcpListener::bind(self.addr)
            .await
            .expect("the backend's port was taken while it was stopped");
        let task = tokio::spawn(accept(l, self.shared.clone()));
        *self.task.lock().unwrap() = Some(task);
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        if let Some(t) = self.task.lock().unwrap().take() {
            t.abort();
        }
    }
}

/// Accepts until aborted; aborting drops the connections' set, which closes them all.
async fn accept(l: TcpListener, shared: Shared) {
    let mut conns = JoinSet::new();
    loop {
        let Ok((stream, _)) = l.accept().await else {
            continue;
        };
        while conns.try_join_next().is_some() {}
        let how = shared.conn.load(Ordering::SeqCst);
        if how != Conn::Serve as u8 {
            conns.spawn(misbehave(stream, how));
            continue;
        }
        let shared = shared.clone();
        conns.spawn(async move {
            let svc = service_fn(move |req| {
                let shared = shared.clone();
                async move { Ok::<_, Infallible>(answer(shared, req).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

/// Reads a request's head, then ends the connection as `how` says (a [`Conn`]).
async fn misbehave(mut stream: tokio::net::TcpStream, how: u8) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    if how == Conn::Reset as u8 {
        // A zero linger: the close sends RST (and does not block).
        let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
    } else if how == Conn::Garbage as u8 {
        let _ = stream.write_all(b"this is not http\r\n\r\n").await;
        let _ = stream.flush().await;
    }
    drop(stream);
}

fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never: Infallible| match never {})
        .boxed()
}

fn frames(frames: Vec<Result<Frame<Bytes>, std::io::Error>>) -> Body {
    BodyExt::boxed(StreamBody::new(futures_util::stream::iter(frames)))
}

/// `first`, then (once it is on the wire) an error: hyper breaks the connection.
fn broken_after(first: &'static [u8]) -> Body {
    let cut = futures_util::stream::once(async {
        tokio::time::sleep(Duration::from_millis(50)).await;
        Err(std::io::Error::other("cut"))
    });
    let stream =
        futures_util::stream::iter([Ok(Frame::data(Bytes::from_static(first)))]).chain(cut);
    BodyExt::boxed(StreamBody::new(stream))
}

async fn answer(shared: Shared, req: Request<Incoming>) -> Response<Body> {
    let n = shared.hits.fetch_add(1, Ordering::SeqCst) + 1;
    let (parts, body) = req.into_parts();
    let _ = body.collect().await;
    let rule = shared.rule.lock().unwrap().clone();
    let out = rule(&parts);
    let header = |name: &str| {
        parts
            .headers
            .get(name)
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
    };
    let mut headers = vec![];
    let body = match out.body {
        Kind::Json => {
            headers.push(("content-type".to_string(), "application/json".to_string()));
            full(
                json!({
                    "n": n,
                    "method": parts.method.as_str(),
                    "path": parts.uri.to_string(),
                    "ae": header("accept-encoding"),
                    "lang": header("accept-language"),
                })
                .to_string(),
            )
        }
        Kind::Sized(len) => full(vec![b'x'; len]),
        Kind::Chunked(len) => frames(
            (0..len.div_ceil(1024))
                .map(|_| Ok(Frame::data(Bytes::from(vec![b'y'; 1024]))))
                .collect(),
        ),
        Kind::Cut => {
            headers.push(("content-length".to_string(), "1000".to_string()));
            broken_after(b"0123456789")
        }
        Kind::Hang => {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            full("")
        }
    };
    let mut resp = Response::new(body);
    *resp.status_mut() = StatusCode::from_u16(out.status).unwrap();
    for (k, v) in headers.into_iter().chain(out.headers) {
        resp.headers_mut().append(
            HeaderName::from_bytes(k.as_bytes()).unwrap(),
            HeaderValue::from_str(&v).unwrap(),
        );
    }
    resp
}

// ------------------------------------------------------------------------------- helpers

/// `[backends.NAME]` at `addr` with a short `timeout`.
fn backend(name: &str, addr: SocketAddr) -> String {
    format!("{}timeout = \"300ms\"\n", support::backend(name, addr))
}

/// One backend, `legacy`, and one route `/api` with `stale_if_error = { STALE }`;
/// `server_extra` lines in `[server]`.
fn one_route(b: &Backend, stale: &str, server_extra: &str) -> String {
    format!(
        "{SERVER}{server_extra}\n{}\n[[routes]]\nprefix = \"/api\"\nbackend = \"legacy\"\nstale_if_error = {{ {stale} }}\n",
        backend("legacy", b.addr)
    )
}

static LOG: LazyLock<Sink> = LazyLock::new(|| Sink::install("strangler::access=info"));

fn init() {
    LazyLock::force(&LOG);
}

/// The access log events of requests to `path`, in the order written.
fn access_events(path: &str) -> Vec<Value> {
    LOG.access_events(path)
}

/// Request headers, in order.
type Headers<'a> = &'a [(&'a str, &'a str)];

async fn fetch(proxy: &Proxy, path: &str, headers: &[(&str, &str)]) -> Reply {
    send_with(Method::GET, &proxy.url(path), headers, Bytes::new()).await
}

async fn get_at(proxy: &Proxy, path: &str) -> Reply {
    fetch(proxy, path, &[]).await
}

/// Whether the answer came from the stale store.
fn is_stale(r: &Reply) -> bool {
    r.headers
        .get("cache-status")
        .is_some_and(|v| v == "strangler; fwd=stale")
}

/// A stale answer: 200 with the stored copy numbered `n`, `Age` and `Cache-Status`.
#[track_caller]
fn assert_stale(r: &Reply, n: u64, what: &str) {
    assert_eq!(r.status, 200, "{what}: {}", r.text());
    assert!(
        is_stale(r),
        "{what}: no Cache-Status: {:?} {}",
        r.headers,
        r.text()
    );
    let age: u64 = r.headers["age"].to_str().unwrap().parse().unwrap();
    assert!(age < 60, "{what}: Age {age}");
    assert_eq!(r.json()["n"], n, "{what}: {}", r.text());
}

/// A live answer of the backend, never the stored copy.
#[track_caller]
fn assert_live(r: &Reply, status: u16, what: &str) {
    assert_eq!(r.status, status, "{what}: {}", r.text());
    assert!(
        !is_stale(r),
        "{what}: served from the store: {:?}",
        r.headers
    );
    assert!(r.headers.get("age").is_none(), "{what}: {:?}", r.headers);
}

/// `strangler_stale_total{route, outcome}` (0 before the first).
async fn stale_count(proxy: &Proxy, route: &str, outcome: &str) -> f64 {
    let m = metrics_text(proxy).await;
    metric(
        &m,
        "strangler_stale_total",
        &[("route", route), ("outcome", outcome)],
    )
    .unwrap_or(0.0)
}

async fn stale_bytes(proxy: &Proxy) -> f64 {
    metric(&metrics_text(proxy).await, "strangler_stale_bytes", &[]).unwrap()
}

async fn requests(proxy: &Proxy, route: &str, status: &str) -> f64 {
    let m = metrics_text(proxy).await;
    metric(
        &m,
        "strangler_requests_total",
        &[("route", route), ("status", status)],
    )
    .unwrap_or(0.0)
}

/// `strangler_upstream_errors_total{backend="legacy", kind}` (0 before the first).
async fn upstream_errors(proxy: &Proxy, kind: &str) -> f64 {
    let m = metrics_text(proxy).await;
    metric(
        &m,
        "strangler_upstream_errors_total",
        &[("backend", "legacy"), ("kind", kind)],
    )
    .unwrap_or(0.0)
}

/// A stale answer's `Age`, in seconds.
#[track_caller]
fn age(r: &Reply) -> u64 {
    r.headers["age"].to_str().unwrap().parse().unwrap()
}

// ------------------------------------------------------------------------------ 1, 10

#[tokio::test]
async fn a_stored_copy_answers_for_a_failing_backend_until_max_stale_then_live_again() {
    init();
    let b = Backend::start().await;
    let proxy = Proxy::start(&one_route(&b, "max_stale = \"2s\"", "")).await;
    const PATH: &str = "/api/workouts?week=1";

    // Healthy: the live answer, stored on the way.
    let r = get_at(&proxy, PATH).await;
    assert_live(&r, 200, "healthy");
    assert_eq!(r.json()["n"], 1);
    let stored_at = Instant::now();
    assert_eq!(stale_count(&proxy, "/api", "stored").await, 1.0);
    assert!(stale_bytes(&proxy).await > 0.0);

    // The backend answers 503: still forwarded, the copy answers.
    b.answer(|_| Out::status(503));
    let r = get_at(&proxy, PATH).await;
    assert_stale(&r, 1, "backend 503");
    assert_eq!(
        b.hits(),
        2,
        "a request the store could answer was not forwarded"
    );
    assert_eq!(r.headers["content-type"], "application/json");
    assert!(r.headers.contains_key("via"), "{:?}", r.headers);
    // Another query of the path was never stored: the error.
    let r = get_at(&proxy, "/api/workouts?week=2").await;
    assert_live(&r, 503, "an unstored variant");
    assert_eq!(stale_count(&proxy, "/api", "miss").await, 1.0);

    // Stopped: connections refused.
    b.stop().await;
    let r = get_at(&proxy, PATH).await;
    assert_stale(&r, 1, "backend stopped");

    // Hanging past the backend's timeout.
    b.answer(|_| Out::body(Kind::Hang));
    b.restart().await;
    let r = get_at(&proxy, PATH).await;
    assert_stale(&r, 1, "backend timed out");
    assert!(
        stored_at.elapsed() < Duration::from_millis(1800),
        "too slow to test max_stale"
    );

    // The stale answers count as the failures they replaced, and as served.
    assert_eq!(stale_count(&proxy, "/api", "served").await, 3.0);
    assert_eq!(requests(&proxy, "/api", "200").await, 1.0);
    assert_eq!(requests(&proxy, "/api", "503").await, 2.0); // stale + miss
    assert_eq!(requests(&proxy, "/api", "502").await, 1.0);
    assert_eq!(requests(&proxy, "/api", "504").await, 1.0);
    // The access log tells the stale answers.
    let events = eventually(Duration::from_secs(2), || async {
        let e = access_events("/api/workouts");
        (e.len() == 5).then_some(e)
    })
    .await;
    let stale: Vec<bool> = events
        .iter()
        .map(|e| e["fields"]["stale"].as_bool().unwrap())
        .collect();
    assert_eq!(stale, [false, true, false, true, true], "{events:?}");

    // Past max_stale: the error.
    b.stop().await;
    tokio::time::sleep_until(stored_at + Duration::from_millis(2200)).await;
    let r = get_at(&proxy, PATH).await;
    assert_live(&r, 502, "past max_stale");
    assert_eq!(r.json()["code"], "upstream_unavailable");
    assert_eq!(stale_count(&proxy, "/api", "expired").await, 1.0);

    // Back: live answers only, each new.
    b.answer(|_| Out::json());
    b.restart().await;
    let mut last = 0;
    for i in 0..5 {
        let r = get_at(&proxy, PATH).await;
        assert_live(&r, 200, &format!("healthy again, request {i}"));
        let n = r.json()["n"].as_u64().unwrap();
        assert!(n > last, "an old answer: {n} after {last}");
        last = n;
    }
    assert_eq!(stale_count(&proxy, "/api", "served").await, 3.0);
    // Each live answer replaced the copy: stored again, nothing evicted.
    assert_eq!(stale_count(&proxy, "/api", "stored").await, 6.0);
    assert_eq!(stale_count(&proxy, "/api", "evicted").await, 0.0);
}

#[tokio::test]
async fn age_adds_the_time_since_storing_to_the_origins_own_age() {
    init();
    let b = Backend::start().await;
    b.answer(|p| match p.uri.path() {
        "/api/aged" => Out::json().with("age", "100"),
        _ => Out::json(),
    });
    let proxy = Proxy::start(&one_route(&b, "max_stale = \"1h\"", "")).await;
    let before = Instant::now();
    assert_live(&get_at(&proxy, "/api/fresh").await, 200, "fresh");
    let r = get_at(&proxy, "/api/aged").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(!is_stale(&r));
    assert_eq!(r.headers["age"], "100", "the origin's Age, passed through");
    assert_eq!(stale_count(&proxy, "/api", "stored").await, 2.0);
    // Age is in whole seconds: the copies are a second old after a second.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    b.answer(|_| Out::status(503));
    let r = get_at(&proxy, "/api/fresh").await;
    let most = before.elapsed().as_secs();
    assert_stale(&r, 1, "fresh");
    assert!(
        (1..=most).contains(&age(&r)),
        "Age {} after {most} s",
        age(&r)
    );
    let r = get_at(&proxy, "/api/aged").await;
    let most = before.elapsed().as_secs();
    assert!(is_stale(&r), "{:?} {}", r.headers, r.text());
    assert_eq!(r.json()["n"], 2);
    assert!(
        (101..=100 + most).contains(&age(&r)),
        "Age {}: the origin's 100 plus the second since storing (at most {most} s)",
        age(&r)
    );
}

#[tokio::test]
async fn the_origins_stale_if_error_overrides_max_stale() {
    init();
    let b = Backend::start().await;
    b.answer(|p| match p.uri.path() {
        "/api/long" => Out::json().with("cache-control", "max-age=0, stale-if-error=3600"),
        "/api/short" => Out::json().with("cache-control", "stale-if-error=1"),
        _ => Out::json(),
    });
    let proxy = Proxy::start(&one_route(&b, "max_stale = \"1s\"", "")).await;
    let short = Proxy::start(&one_route(&b, "max_stale = \"1h\"", "")).await;
    assert_live(&get_at(&proxy, "/api/long").await, 200, "long");
    assert_live(&get_at(&proxy, "/api/plain").await, 200, "plain");
    assert_live(&get_at(&short, "/api/short").await, 200, "short");
    let stored_at = Instant::now();
    b.answer(|_| Out::status(500));
    tokio::time::sleep_until(stored_at + Duration::from_millis(1200)).await;
    assert_stale(
        &get_at(&proxy, "/api/long").await,
        1,
        "stale-if-error=3600 past the route's 1s",
    );
    assert_live(
        &get_at(&proxy, "/api/plain").await,
        500,
        "past the route's 1s",
    );
    assert_live(
        &get_at(&short, "/api/short").await,
        500,
        "stale-if-error=1 within the route's 1h",
    );
}

#[tokio::test]
async fn a_stale_answer_counts_as_the_failure_for_the_guard() {
    init();
    let users = Backend::start().await;
    let legacy = start_echo("legacy").await;
    let text = format!(
        "{SERVER}{}{}\n[[routes]]\nprefix = \"/api\"\nbackend = \"users\"\nstale_if_error = {{ max_stale = \"1h\" }}\n[routes.guard]\nmax_error_rate = 0.5\nwindow = \"1m\"\nmin_requests = 5\n",
        backend("users", users.addr),
        legacy_at(legacy.addr),
    );
    let proxy = Proxy::start(&text).await;
    assert_live(&get_at(&proxy, "/api/x").await, 200, "healthy");
    users.answer(|_| Out::status(503));
    let mut stale = 0;
    loop {
        let r = get_at(&proxy, "/api/x").await;
        if !is_stale(&r) {
            // The guard tripped: the legacy backend answers live.
            assert_live(&r, 200, "after the guard tripped");
            assert_eq!(r.backend(), "legacy");
            break;
        }
        assert_stale(&r, 1, "users failing");
        stale += 1;
        assert!(stale < 20, "stale answers hid the failures from the guard");
    }
    assert!(stale >= 4, "tripped after {stale} answers");
    assert_eq!(route_json(&proxy, "/api").await["guard_tripped"], true);
    assert_eq!(
        requests(&proxy, "/api", "503").await,
        stale as f64,
        "{}",
        metrics_text(&proxy).await
    );
}

// ------------------------------------------------------------------------------------ 2

#[tokio::test]
async fn client_errors_and_unlisted_statuses_pass_through() {
    init();
    let b = Backend::start().await;
    let proxy = Proxy::start(&one_route(&b, "max_stale = \"1h\"", "")).await;
    assert_live(&get_at(&proxy, "/api/a").await, 200, "healthy");
    // Not an outage: the backend's own answer, whatever is stored.
    for status in [404, 400, 429, 409, 501, 505] {
        b.answer(move |_| Out::status(status));
        let r = get_at(&proxy, "/api/a").await;
        assert_live(&r, status, &format!("backend {status}"));
        assert_eq!(r.json()["path"], "/api/a", "the backend's own body");
    }
    // The control: a listed one.
    b.answer(|_| Out::status(502));
    assert_stale(&get_at(&proxy, "/api/a").await, 1, "backend 502");
    assert_eq!(stale_count(&proxy, "/api", "served").await, 1.0);

    // `on = ["503"]`: a 500, a connection refused and a timeout are not.
    let b = Backend::start().await;
    let proxy = Proxy::start(&one_route(&b, "max_stale = \"1h\", on = [\"503\"]", "")).await;
    assert_live(&get_at(&proxy, "/api/a").await, 200, "healthy");
    b.answer(|_| Out::status(500));
    assert_live(&get_at(&proxy, "/api/a").await, 500, "500 not in on");
    b.answer(|_| Out::body(Kind::Hang));
    let r = get_at(&proxy, "/api/a").await;
    assert_live(&r, 504, "timeout not in on");
    assert_eq!(r.json()["code"], "upstream_timeout");
    b.stop().await;
    assert_live(&get_at(&proxy, "/api/a").await, 502, "connect not in on");
    b.answer(|_| Out::status(503));
    b.restart().await;
    assert_stale(&get_at(&proxy, "/api/a").await, 1, "503 in on");

    // `on = ["connect"]`: the backend's own 5xx and timeouts are not.
    let b = Backend::start().await;
    let proxy = Proxy::start(&one_route(&b, "max_stale = \"1h\", on = [\"connect\"]", "")).await;
    assert_live(&get_at(&proxy, "/api/a").await, 200, "healthy");
    for status in [500, 502, 503, 504] {
        b.answer(move |_| Out::status(status));
        assert_live(&get_at(&proxy, "/api/a").await, status, "a 5xx, on connect");
    }
    b.answer(|_| Out::body(Kind::Hang));
    assert_live(&get_at(&proxy, "/api/a").await, 504, "timeout, on connect");
    b.stop().await;
    assert_stale(&get_at(&proxy, "/api/a").await, 1, "refused, on connect");
}

/// `on = ["connect"]` covers every connection that could not be made or broke before an
/// answer's head: refused, closed unanswered, reset. An answer that is not HTTP is the proxy's
/// 502 (listed as "502", not `connect`); a body that breaks after its head is relayed as it
/// breaks (the head is out: no copy can replace it) and not stored.
#[tokio::test]
async fn a_connection_refused_closed_or_reset_before_an_answer_is_connect() {
    init();
    let b = Backend::start().await;
    let proxy = Proxy::start(&one_route(&b, "max_stale = \"1h\", on = [\"connect\"]", "")).await;
    assert_live(&get_at(&proxy, "/api/a").await, 200, "healthy");
    b.stop().await;
    assert_stale(&get_at(&proxy, "/api/a").await, 1, "refused");
    assert!(upstream_errors(&proxy, "connect").await >= 1.0);
    for (how, what) in [(Conn::Close, "closed unanswered"), (Conn::Reset, "reset")] {
        b.connections(how);
        b.restart().await;
        let resets = upstream_errors(&proxy, "reset").await;
        assert_stale(&get_at(&proxy, "/api/a").await, 1, what);
        assert_eq!(
            upstream_errors(&proxy, "reset").await,
            resets + 1.0,
            "{what}: not the broken-connection path"
        );
        b.stop().await;
    }
    b.connections(Conn::Garbage);
    b.restart().await;
    let r = get_at(&proxy, "/api/a").await;
    assert_live(&r, 502, "not HTTP, on connect");
    assert_eq!(upstream_errors(&proxy, "protocol").await, 1.0);
    assert_eq!(stale_count(&proxy, "/api", "served").await, 3.0);

    // Head, then a broken body: the client sees it break; the copy stays as it was.
    b.stop().await;
    b.connections(Conn::Serve);
    b.answer(|_| Out::body(Kind::Cut));
    b.restart().await;
    let resp = client()
        .request(
            Request::get(proxy.url("/api/a"))
                .body(Full::new(Bytes::new()))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(
        resp.into_body().collect().await.is_err(),
        "a body cut short arrived whole"
    );
    eventually(Duration::from_secs(2), || async {
        (stale_count(&proxy, "/api", "incomplete").await == 1.0).then_some(())
    })
    .await;
    b.stop().await;
    assert_stale(
        &get_at(&proxy, "/api/a").await,
        1,
        "refused after a cut body",
    );
    assert_eq!(stale_count(&proxy, "/api", "stored").await, 1.0);

    // `on = ["502"]`: an answer that is not HTTP is that 502, and so is a connection that
    // broke before the head (it was before `connect` covered it too); a refused one is not.
    let b = Backend::start().await;
    let proxy = Proxy::start(&one_route(&b, "max_stale = \"1h\", on = [\"502\"]", "")).await;
    assert_live(&get_at(&proxy, "/api/a").await, 200, "healthy");
    for (how, what) in [
        (Conn::Garbage, "not HTTP, on 502"),
        (Conn::Close, "closed unanswered, on 502"),
        (Conn::Reset, "reset, on 502"),
    ] {
        b.stop().await;
        b.connections(how);
        b.restart().await;
        assert_stale(&get_at(&proxy, "/api/a").await, 1, what);
    }
    b.stop().await;
    let r = get_at(&proxy, "/api/a").await;
    assert_live(&r, 502, "refused, on 502 only");
    assert_eq!(r.json()["code"], "upstream_unavailable");
}

// ------------------------------------------------------------------------------------ 3

#[tokio::test]
async fn the_fallback_answers_before_the_store() {
    init();
    let users = Backend::start().await;
    let legacy = Backend::start().await;
    legacy.answer(|_| Out::json().with("x-from", "legacy"));
    let text = format!(
        "{SERVER}{}{}\n[[routes]]\nprefix = \"/api\"\nbackend = \"users\"\nfallback = \"legacy\"\nstale_if_error = {{ max_stale = \"1h\" }}\n",
        backend("users", users.addr),
        backend("legacy", legacy.addr),
    );
    let proxy = Proxy::start(&text).await;
    let r = get_at(&proxy, "/api/x").await;
    assert_live(&r, 200, "healthy");
    assert!(r.headers.get("x-from").is_none(), "users answers first");
    // users fails: the fallback's live answer, never the stored copy.
    users.answer(|_| Out::status(503));
    for i in 1..=3 {
        let r = get_at(&proxy, "/api/x").await;
        assert_live(&r, 200, "the fallback");
        assert_eq!(r.headers["x-from"], "legacy");
        assert_eq!(r.json()["n"], i, "the fallback's own answer");
    }
    users.stop().await;
    let r = get_at(&proxy, "/api/x").await;
    assert_live(&r, 200, "the fallback, users refused");
    assert_eq!(r.json()["n"], 4);
    assert_eq!(stale_count(&proxy, "/api", "served").await, 0.0);
    // Both fail: the last good answer (the fallback's).
    legacy.answer(|_| Out::status(500));
    let r = get_at(&proxy, "/api/x").await;
    assert_stale(&r, 4, "both failing");
    assert_eq!(r.headers["x-from"], "legacy");
    legacy.stop().await;
    assert_stale(&get_at(&proxy, "/api/x").await, 4, "both refused");
}

// ------------------------------------------------------------------------------------ 4

#[tokio::test]
async fn every_answer_that_may_not_be_stored_is_counted_and_never_served() {
    init();
    let b = Backend::start().await;
    let failing = Arc::new(AtomicBool::new(false));
    let f = failing.clone();
    b.answer(move |p| {
        if f.load(Ordering::SeqCst) {
            return Out::status(503);
        }
        let cc = |v: &str| Out::json().with("cache-control", v);
        match p.uri.path() {
            "/api/no-store" => cc("no-store"),
            "/api/private" => cc("private, max-age=60"),
            "/api/private-field" => cc("private=\"x-user\""),
            "/api/no-cache" => cc("max-age=60, no-cache"),
            "/api/must-revalidate" => cc("max-age=60, must-revalidate"),
            "/api/proxy-revalidate" => cc("Proxy-Revalidate"),
            "/api/s-maxage" => cc("public, s-maxage=60"),
            "/api/set-cookie" => Out::json().with("set-cookie", "session=abc; HttpOnly"),
            "/api/vary-star" => Out::json().with("vary", "*"),
            "/api/vary-other" => Out::json().with("vary", "accept-encoding, cookie"),
            "/api/created" => Out::status(201),
            "/api/non-authoritative" => Out::status(203),
            "/api/no-content" => Out::status(204),
            "/api/large" => Out::body(Kind::Sized(8 * 1024)),
            "/api/large-chunked" => Out::body(Kind::Chunked(8 * 1024)),
            "/api/cut" => Out::body(Kind::Cut),
            _ => Out::json(),
        }
    });
    let proxy = Proxy::start(&one_route(
        &b,
        "max_stale = \"1h\", max_entry = \"4KiB\", vary = [\"accept-encoding\"]",
        "",
    ))
    .await;
    // (path, request headers, the outcome counted)
    let cases: [(&str, Headers, &str); 17] = [
        ("/api/no-store", &[], "no_store"),
        ("/api/private", &[], "private"),
        ("/api/private-field", &[], "private"),
        ("/api/no-cache", &[], "no_cache"),
        ("/api/must-revalidate", &[], "must_revalidate"),
        ("/api/proxy-revalidate", &[], "must_revalidate"),
        ("/api/s-maxage", &[], "must_revalidate"),
        ("/api/set-cookie", &[], "set_cookie"),
        ("/api/vary-star", &[], "vary"),
        ("/api/vary-other", &[], "vary"),
        ("/api/created", &[], "not_200"),
        ("/api/non-authoritative", &[], "not_200"),
        ("/api/no-content", &[], "not_200"),
        ("/api/large", &[], "too_large"),
        ("/api/large-chunked", &[], "too_large"),
        ("/api/cut", &[], "incomplete"),
        (
            "/api/with-credentials",
            &[("authorization", "Bearer abc.def.ghi")],
            "authorization",
        ),
    ];
    let mut want: std::collections::BTreeMap<&str, f64> = Default::default();
    for (path, headers, outcome) in cases {
        let resp = client()
            .request({
                let mut req = request(Method::GET, &proxy.url(path));
                for (k, v) in headers {
                    req = req.header(*k, *v);
                }
                req.body(Full::new(Bytes::new())).unwrap()
            })
            .await
            .unwrap();
        let body = resp.into_body().collect().await;
        assert_eq!(body.is_err(), path == "/api/cut", "{path}");
        *want.entry(outcome).or_default() += 1.0;
        let n = want[outcome];
        eventually(Duration::from_secs(2), || async {
            (stale_count(&proxy, "/api", outcome).await == n).then_some(())
        })
        .await;
    }
    // Each case counted once, under its own reason only.
    let m = metrics_text(&proxy).await;
    for (outcome, n) in &want {
        assert_eq!(
            metric(
                &m,
                "strangler_stale_total",
                &[("route", "/api"), ("outcome", outcome)]
            ),
            Some(*n),
            "{outcome}"
        );
    }
    assert_eq!(stale_count(&proxy, "/api", "stored").await, 0.0);
    assert_eq!(stale_bytes(&proxy).await, 0.0);
    // The control: a plain answer is stored.
    assert_live(&get_at(&proxy, "/api/plain").await, 200, "plain");
    assert_eq!(stale_count(&proxy, "/api", "stored").await, 1.0);

    failing.store(true, Ordering::SeqCst);
    for (path, headers, outcome) in cases {
        let r = fetch(&proxy, path, headers).await;
        assert_live(&r, 503, &format!("{path} ({outcome}) while failing"));
    }
    assert_stale(
        &get_at(&proxy, "/api/plain").await,
        18,
        "plain while failing",
    );
    assert_eq!(stale_count(&proxy, "/api", "served").await, 1.0);
}

// ------------------------------------------------------------------------------------ 5

#[tokio::test]
async fn vary_headers_and_queries_get_their_own_copies() {
    init();
    let b = Backend::start().await;
    let failing = b.failing_when(|| Out::json().with("vary", "Accept-Encoding"));
    let proxy = Proxy::start(&one_route(
        &b,
        "max_stale = \"1h\", vary = [\"accept-encoding\"]",
        "",
    ))
    .await;
    let gzip: &[(&str, &str)] = &[("accept-encoding", "gzip")];
    let identity: &[(&str, &str)] = &[("accept-encoding", "identity")];
    let r = fetch(&proxy, "/api/list?page=1", gzip).await;
    assert_live(&r, 200, "gzip");
    assert_eq!(r.json()["ae"], "gzip");

    failing.store(true, Ordering::SeqCst);
    assert_live(
        &fetch(&proxy, "/api/list?page=1", identity).await,
        503,
        "identity, only a gzip copy stored",
    );
    assert_live(
        &get_at(&proxy, "/api/list?page=1").await,
        503,
        "no accept-encoding, only a gzip copy stored",
    );
    assert_live(
        &fetch(&proxy, "/api/list?page=2", gzip).await,
        503,
        "another query",
    );
    assert_live(&fetch(&proxy, "/api/list", gzip).await, 503, "no query");
    let r = fetch(&proxy, "/api/list?page=1", gzip).await;
    assert_stale(&r, 1, "gzip's own copy");
    assert_eq!(r.json()["ae"], "gzip");

    failing.store(false, Ordering::SeqCst);
    let r = fetch(&proxy, "/api/list?page=1", identity).await;
    assert_live(&r, 200, "identity");
    let n_identity = r.json()["n"].as_u64().unwrap();
    let r = fetch(&proxy, "/api/list?page=2", gzip).await;
    assert_live(&r, 200, "page 2");
    let n_page2 = r.json()["n"].as_u64().unwrap();

    failing.store(true, Ordering::SeqCst);
    let r = fetch(&proxy, "/api/list?page=1", identity).await;
    assert_stale(&r, n_identity, "identity's own copy");
    assert_eq!(r.json()["ae"], "identity");
    let r = fetch(&proxy, "/api/list?page=1", gzip).await;
    assert_stale(&r, 1, "gzip's copy, kept beside identity's");
    assert_eq!(r.json()["ae"], "gzip");
    let r = fetch(&proxy, "/api/list?page=2", gzip).await;
    assert_stale(&r, n_page2, "page 2's own copy");
    assert_eq!(r.json()["path"], "/api/list?page=2");
    assert_live(
        &fetch(&proxy, "/api/list?page=2", identity).await,
        503,
        "page 2 identity",
    );
}

const AUDIENCE: &str = "fittrack-api";

/// An origin that codes its answer for whoever asks and forgets `Vary: accept-encoding`: the
/// coded copy goes only to clients that accept its coding; an uncoded copy to everyone.
#[tokio::test]
async fn a_coded_copy_stored_without_vary_goes_only_to_clients_that_accept_its_coding() {
    init();
    let b = Backend::start().await;
    b.answer(|p| {
        let gzip = p
            .headers
            .get("accept-encoding")
            .is_some_and(|v| v.to_str().unwrap().contains("gzip"));
        if gzip {
            Out::json().with("content-encoding", "gzip")
        } else {
            Out::json()
        }
    });
    let proxy = Proxy::start(&one_route(&b, "max_stale = \"1h\"", "")).await;
    let r = fetch(&proxy, "/api/coded", &[("accept-encoding", "gzip")]).await;
    assert_live(&r, 200, "gzip");
    assert_eq!(r.headers["content-encoding"], "gzip");
    let r = get_at(&proxy, "/api/plain").await;
    assert_live(&r, 200, "identity");
    assert!(!r.headers.contains_key("content-encoding"));
    assert_eq!(stale_count(&proxy, "/api", "stored").await, 2.0);

    b.stop().await;
    let refused: [Headers; 4] = [
        &[("accept-encoding", "identity")],
        &[],
        &[("accept-encoding", "br, gzip;q=0")],
        &[("accept-encoding", "deflate")],
    ];
    for headers in refused {
        let r = fetch(&proxy, "/api/coded", headers).await;
        assert_live(&r, 502, &format!("{headers:?}, only a gzip copy stored"));
        assert_eq!(r.json()["code"], "upstream_unavailable");
    }
    assert_eq!(stale_count(&proxy, "/api", "miss").await, 4.0);
    for ae in ["gzip", "deflate, gzip;q=0.5", "x-gzip", "*"] {
        let r = fetch(&proxy, "/api/coded", &[("accept-encoding", ae)]).await;
        assert_stale(&r, 1, ae);
        assert_eq!(r.headers["content-encoding"], "gzip", "{ae}");
    }
    let anyone: [Headers; 2] = [&[], &[("accept-encoding", "gzip")]];
    for headers in anyone {
        assert_stale(
            &fetch(&proxy, "/api/plain", headers).await,
            2,
            &format!("the uncoded copy, {headers:?}"),
        );
    }
    assert_eq!(stale_count(&proxy, "/api", "served").await, 6.0);
}

// ------------------------------------------------------------------------------------ 6

fn token(sub: Option<&str>) -> String {
    support::jwt::hs256(SECRET, AUDIENCE, sub)
}

/// A proxy with providers `bearer` (Authorization) and `cookie` (`session` cookie), HS256
/// with a secret file, in front of `b`; `routes` as given.
async fn auth_proxy(b: &Backend, routes: &str) -> Proxy {
    let dir = secret_dir(SECRET);
    let provider = |name: &str, extra: &str| {
        format!("[auth.{name}]\nissuer = \"{ISSUER}\"\naudiences = [\"{AUDIENCE}\"]\nalgorithms = [\"HS256\"]\nsecret_file = \"secret\"\n{extra}\n")
    };
    let text = format!(
        "{SERVER}{}\n{}{}{routes}",
        backend("legacy", b.addr),
        provider("bearer", ""),
        provider("cookie", "token_from = [\"cookie:session\"]"),
    );
    Proxy::start_in(dir, &text).await
}

#[tokio::test]
async fn per_user_copies_are_never_served_to_another_user() {
    init();
    let b = Backend::start().await;
    let failing = b.failing_when(Out::json);
    let proxy = auth_proxy(
        &b,
        "[[routes]]\nprefix = \"/api\"\nbackend = \"legacy\"\nauth = \"bearer\"\nstale_if_error = { max_stale = \"1h\", per_user = \"claim:sub\" }\n",
    )
    .await;
    let alice = format!("Bearer {}", token(Some("alice")));
    let bob = format!("Bearer {}", token(Some("bob")));
    let nobody = format!("Bearer {}", token(None));
    let as_ = |who: &str| vec![("authorization", who.to_string())];
    let call = |who: Vec<(&'static str, String)>| {
        let proxy = &proxy;
        async move {
            let h: Vec<(&str, &str)> = who.iter().map(|(k, v)| (*k, v.as_str())).collect();
            fetch(proxy, "/api/me", &h).await
        }
    };
    assert_live(&call(as_(&alice)).await, 200, "alice");
    // A verified token without the claim: not stored.
    assert_live(&call(as_(&nobody)).await, 200, "no sub");
    assert_eq!(stale_count(&proxy, "/api", "authorization").await, 1.0);
    assert_eq!(stale_count(&proxy, "/api", "stored").await, 1.0);

    failing.store(true, Ordering::SeqCst);
    assert_live(&call(as_(&bob)).await, 503, "bob, only alice's copy stored");
    assert_live(&call(as_(&nobody)).await, 503, "no sub");
    assert_stale(&call(as_(&alice)).await, 1, "alice's own copy");

    failing.store(false, Ordering::SeqCst);
    let r = call(as_(&bob)).await;
    assert_live(&r, 200, "bob");
    let n_bob = r.json()["n"].as_u64().unwrap();
    failing.store(true, Ordering::SeqCst);
    assert_stale(&call(as_(&bob)).await, n_bob, "bob's own copy");
    assert_stale(&call(as_(&alice)).await, 1, "alice's own copy");
    // Never without a token (the route requires one).
    assert_eq!(call(vec![]).await.status, 401);
}

#[tokio::test]
async fn a_token_from_a_cookie_is_a_credential_too() {
    init();
    let b = Backend::start().await;
    let failing = b.failing_when(Out::json);
    let proxy = auth_proxy(
        &b,
        "[[routes]]\nprefix = \"/api\"\nbackend = \"legacy\"\nauth = \"cookie\"\nstale_if_error = { max_stale = \"1h\" }\n\
         [[routes]]\nprefix = \"/per-user\"\nbackend = \"legacy\"\nauth = \"cookie\"\nstale_if_error = { max_stale = \"1h\", per_user = \"claim:sub\" }\n",
    )
    .await;
    let alice = format!("session={}", token(Some("alice")));
    let bob = format!("session={}", token(Some("bob")));
    // Without per_user: a verified user's answer is not stored for everyone.
    assert_live(
        &fetch(&proxy, "/api/me", &[("cookie", &alice)]).await,
        200,
        "alice",
    );
    assert_eq!(stale_count(&proxy, "/api", "stored").await, 0.0);
    assert_eq!(stale_count(&proxy, "/api", "authorization").await, 1.0);
    // With per_user: keyed by the cookie token's subject.
    let r = fetch(&proxy, "/per-user/me", &[("cookie", &alice)]).await;
    assert_live(&r, 200, "alice per user");
    let n = r.json()["n"].as_u64().unwrap();
    failing.store(true, Ordering::SeqCst);
    assert_live(
        &fetch(&proxy, "/api/me", &[("cookie", &bob)]).await,
        503,
        "bob must not get alice's answer",
    );
    assert_live(
        &fetch(&proxy, "/per-user/me", &[("cookie", &bob)]).await,
        503,
        "bob per user",
    );
    assert_stale(
        &fetch(&proxy, "/per-user/me", &[("cookie", &alice)]).await,
        n,
        "alice per user",
    );
}

// ------------------------------------------------------------------------------------ 7

/// GETs `/api/item/{i}` for each `i` in `range`, 16 at a time, each answered 200.
async fn fill(proxy: &Proxy, range: std::ops::Range<usize>) {
    let c = client();
    let urls: Vec<String> = range
        .map(|i| proxy.url(&format!("/api/item/{i}")))
        .collect();
    futures_util::stream::iter(urls)
        .map(|url| {
            let c = c.clone();
            async move {
                let req = Request::get(url.as_str())
                    .body(Full::new(Bytes::new()))
                    .unwrap();
                let resp = c.request(req).await.unwrap();
                assert_eq!(resp.status(), 200, "{url}");
                resp.into_body().collect().await.unwrap();
            }
        })
        .buffer_unordered(16)
        .collect::<Vec<()>>()
        .await;
}

#[tokio::test]
async fn the_store_stays_inside_its_byte_bound() {
    init();
    let b = Backend::start().await;
    let failing = b.failing_when(|| Out::body(Kind::Sized(1000)));
    let proxy = Proxy::start(&one_route(
        &b,
        "max_stale = \"1h\"",
        "stale_store_size = \"64KiB\"",
    ))
    .await;
    // 2,000 URLs asked once, a popular one asked between each 100 of them.
    const URLS: usize = 2000;
    for batch in 0..URLS / 100 {
        fill(&proxy, batch * 100..(batch + 1) * 100).await;
        assert_eq!(get_at(&proxy, "/api/popular").await.status, 200);
        let bytes = stale_bytes(&proxy).await;
        assert!(bytes <= 65536.0, "{bytes} bytes stored");
    }
    let bytes = stale_bytes(&proxy).await;
    assert!(bytes > 32768.0, "only {bytes} bytes stored");
    let stored = (URLS + URLS / 100) as f64;
    assert_eq!(stale_count(&proxy, "/api", "stored").await, stored);
    let evicted = stale_count(&proxy, "/api", "evicted").await;
    assert!(
        evicted > 0.0 && evicted < stored - 40.0,
        "evicted {evicted} of {stored}"
    );
    // A scan of one-off URLs does not push out the copy clients keep asking for.
    failing.store(true, Ordering::SeqCst);
    let r = get_at(&proxy, "/api/popular").await;
    assert_eq!(r.status, 200);
    assert!(is_stale(&r), "the popular copy was evicted");
    assert_eq!(r.body.len(), 1000);
}

#[tokio::test]
async fn an_answer_under_max_entry_fits_a_small_store() {
    init();
    let b = Backend::start().await;
    let failing = b.failing_when(|| Out::body(Kind::Sized(200 * 1024)));
    let proxy = Proxy::start(&one_route(
        &b,
        "max_stale = \"1h\", max_entry = \"512KiB\"",
        "stale_store_size = \"1MiB\"",
    ))
    .await;
    assert_live(&get_at(&proxy, "/api/report").await, 200, "healthy");
    assert_eq!(stale_count(&proxy, "/api", "stored").await, 1.0);
    failing.store(true, Ordering::SeqCst);
    let r = get_at(&proxy, "/api/report").await;
    assert!(
        is_stale(&r),
        "a 200 KiB answer (max_entry 512 KiB, store 1 MiB) was not kept: {} evicted, {} bytes stored",
        stale_count(&proxy, "/api", "evicted").await,
        stale_bytes(&proxy).await,
    );
    assert_eq!(r.body.len(), 200 * 1024);
}

#[tokio::test]
#[ignore = "100,000 requests: run with --ignored"]
async fn the_store_stays_inside_its_byte_bound_over_100k_urls() {
    init();
    let b = Backend::start().await;
    b.answer(|_| Out::body(Kind::Sized(1000)));
    let proxy = Proxy::start(&one_route(
        &b,
        "max_stale = \"1h\"",
        "stale_store_size = \"4MiB\"",
    ))
    .await;
    for chunk in 0..10 {
        fill(&proxy, chunk * 10_000..(chunk + 1) * 10_000).await;
        let bytes = stale_bytes(&proxy).await;
        assert!(bytes <= 4.0 * 1024.0 * 1024.0, "{bytes} bytes stored");
    }
    assert_eq!(stale_count(&proxy, "/api", "stored").await, 100_000.0);
    assert!(stale_count(&proxy, "/api", "evicted").await > 90_000.0);
}

// ------------------------------------------------------------------------------------ 8

#[tokio::test]
async fn a_successful_write_drops_the_paths_copies() {
    init();
    let b = Backend::start().await;
    let failing = Arc::new(AtomicBool::new(false));
    let write_status = Arc::new(AtomicUsize::new(201));
    let (f, w) = (failing.clone(), write_status.clone());
    b.answer(move |p| {
        if p.method != Method::GET {
            Out::status(w.load(Ordering::SeqCst) as u16)
        } else if f.load(Ordering::SeqCst) {
            Out::status(503)
        } else {
            Out::json()
        }
    });
    let proxy = Proxy::start(&one_route(&b, "max_stale = \"1h\"", "")).await;
    let write =
        |method: Method, path: &'static str, headers: &'static [(&'static str, &'static str)]| {
            let url = proxy.url(path);
            async move { send_with(method, &url, headers, "{}").await }
        };
    let mut invalidated = 0.0;
    // (method, answer status, request headers, whether the copies go)
    let cases: [(Method, u16, Headers, bool); 8] = [
        (Method::POST, 201, &[], true),
        (Method::PUT, 200, &[], true),
        (Method::PATCH, 204, &[], true),
        (Method::DELETE, 204, &[], true),
        (
            Method::POST,
            200,
            &[("authorization", "Bearer abc.def.ghi")],
            true,
        ),
        (Method::POST, 500, &[], false),
        (Method::DELETE, 503, &[], false),
        (Method::POST, 409, &[], false),
    ];
    for (method, status, headers, drops) in cases {
        let what = format!("{method} answered {status} with {headers:?}");
        failing.store(false, Ordering::SeqCst);
        let r = get_at(&proxy, "/api/w/1?view=full").await;
        assert_live(&r, 200, &what);
        let n = r.json()["n"].as_u64().unwrap();
        assert_live(&get_at(&proxy, "/api/w/1").await, 200, &what);
        assert_live(&get_at(&proxy, "/api/w/2").await, 200, &what);
        let n2 = b.hits() as u64;
        write_status.store(usize::from(status), Ordering::SeqCst);
        assert_eq!(write(method, "/api/w/1", headers).await.status, status);
        failing.store(true, Ordering::SeqCst);
        let r = get_at(&proxy, "/api/w/1?view=full").await;
        if drops {
            invalidated += 2.0;
            assert_live(&r, 503, &format!("after {what}"));
            assert_live(&get_at(&proxy, "/api/w/1").await, 503, &what);
        } else {
            assert_stale(&r, n, &format!("after {what}"));
        }
        assert_eq!(
            stale_count(&proxy, "/api", "invalidated").await,
            invalidated,
            "{what}"
        );
        // Another path keeps its copy.
        assert_stale(&get_at(&proxy, "/api/w/2").await, n2, &what);
    }
}

// ------------------------------------------------------------------------------------ 9

#[tokio::test]
async fn copies_outlive_reloads_that_keep_the_route_and_go_with_its_stale_if_error() {
    init();
    let b = Backend::start().await;
    let failing = b.failing_when(Out::json);
    let text = |stale: &str, other: &str| {
        format!(
            "{SERVER}{}\n[[routes]]\nprefix = \"/api\"\nbackend = \"legacy\"\n{stale}\n[[routes]]\nprefix = \"{other}\"\nbackend = \"legacy\"\n",
            backend("legacy", b.addr)
        )
    };
    const STALE: &str = "stale_if_error = { max_stale = \"1h\" }";
    let proxy = Proxy::start(&text(STALE, "/other")).await;
    let reload = |t: String| {
        let proxy = &proxy;
        async move {
            std::fs::write(proxy.path(), t).unwrap();
            let r = send_with(Method::POST, &proxy.admin_url("/reload"), &[], "").await;
            assert_eq!(r.status, 200, "{}", r.text());
            assert_eq!(r.json()["changed"], true, "{}", r.text());
        }
    };
    assert_live(&get_at(&proxy, "/api/x").await, 200, "healthy");
    let bytes = stale_bytes(&proxy).await;
    assert!(bytes > 0.0);

    // Another route changes: the copy stays, and so do the counters.
    reload(text(STALE, "/elsewhere")).await;
    assert_eq!(stale_bytes(&proxy).await, bytes);
    failing.store(true, Ordering::SeqCst);
    assert_stale(
        &get_at(&proxy, "/api/x").await,
        1,
        "after a reload of another route",
    );
    assert_eq!(stale_count(&proxy, "/api", "stored").await, 1.0);
    assert_eq!(stale_count(&proxy, "/api", "served").await, 1.0);

    // The route's stale_if_error goes: so do its copies.
    reload(text("", "/elsewhere")).await;
    assert_eq!(stale_bytes(&proxy).await, 0.0);
    assert_live(
        &get_at(&proxy, "/api/x").await,
        503,
        "without stale_if_error",
    );
    // And they do not come back with it.
    reload(text(STALE, "/elsewhere")).await;
    assert_live(&get_at(&proxy, "/api/x").await, 503, "stale_if_error back");
    assert_eq!(stale_count(&proxy, "/api", "miss").await, 1.0);
}

// ----------------------------------------------------------------------------------- 11

#[test]
fn config_mistakes_are_reported_at_their_line_and_column() {
    let config = |server: &str, auth: &str, stale: &str| {
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n{server}\n\
             [backends.legacy]\nurl = \"http://127.0.0.1:9\"\nlegacy = true\n\n\
             [auth.internal]\nissuer = \"{ISSUER}\"\naudiences = [\"{AUDIENCE}\"]\nalgorithms = [\"RS256\"]\njwks_url = \"https://auth.test/jwks.json\"\n\n\
             [[routes]]\nprefix = \"/api\"\nbackend = \"legacy\"\n{auth}\nstale_if_error = {stale}\n"
        )
    };
    let auth = "auth = \"internal\"";
    // The harness itself: everything set, valid.
    let ok = config(
        "stale_store_size = \"16MiB\"",
        auth,
        "{ max_stale = \"1h\", max_entry = \"1MiB\", on = [\"connect\", \"timeout\", \"500\", \"599\"], vary = [\"accept-language\", \"Accept-Encoding\"], per_user = \"claim:sub\" }",
    );
    let parsed = strangler::config::parse(&ok).unwrap_or_else(|e| panic!("{e:?}\n{ok}"));
    let route = &parsed.table.routes()[0];
    let stale = route.stale.as_ref().unwrap();
    assert_eq!(stale.max_stale, Duration::from_secs(3600));
    assert_eq!(stale.max_entry, 1 << 20);
    assert!(stale.on_connect && stale.on_timeout);
    assert_eq!(stale.on_status, [500, 599]);
    assert_eq!(stale.vary, ["accept-language", "accept-encoding"]);
    assert_eq!(stale.per_user.as_deref(), Some("sub"));
    assert_eq!(parsed.server.stale_store_size, 16 << 20);
    // Defaults.
    let defaults = config("", "", "{ max_stale = \"30s\" }");
    let parsed = strangler::config::parse(&defaults).unwrap();
    let stale = parsed.table.routes()[0].stale.as_ref().unwrap();
    assert_eq!(stale.max_entry, 1 << 20);
    assert!(stale.on_connect && stale.on_timeout);
    assert_eq!(stale.on_status, [500, 502, 503, 504]);
    assert!(stale.vary.is_empty() && stale.per_user.is_none());
    assert_eq!(parsed.server.stale_store_size, 64 << 20);

    // (server, auth, stale_if_error, where the error points, what it says)
    let cases: [(&str, &str, &str, &str, &str); 11] = [
        ("", "", "{ max_stale = \"soon\" }", "\"soon\"", "max_stale"),
        (
            "",
            "",
            "{ max_stale = \"1h\", on = [\"404\"] }",
            "\"404\"",
            "4xx",
        ),
        (
            "",
            "",
            "{ max_stale = \"1h\", on = [\"later\"] }",
            "\"later\"",
            "`stale_if_error.on`",
        ),
        ("", "", "{ max_stale = \"1h\", on = [] }", "[]", "empty"),
        (
            "",
            "",
            "{ max_stale = \"1h\", vary = [\"Authorization\"] }",
            "\"Authorization\"",
            "per_user",
        ),
        (
            "",
            "",
            "{ max_stale = \"1h\", vary = [\"cookie\"] }",
            "\"cookie\"",
            "cannot key",
        ),
        (
            "",
            "",
            "{ max_stale = \"1h\", vary = [\"a b\"] }",
            "\"a b\"",
            "not a header name",
        ),
        (
            "",
            auth,
            "{ max_stale = \"1h\", per_user = \"sub\" }",
            "\"sub\"",
            "claim:NAME",
        ),
        (
            "",
            "",
            "{ max_stale = \"1h\", per_user = \"claim:sub\" }",
            "\"claim:sub\"",
            "needs `auth`",
        ),
        (
            "",
            "",
            "{ max_stale = \"1h\", max_entry = \"big\" }",
            "\"big\"",
            "max_entry",
        ),
        (
            "stale_store_size = \"lots\"",
            "",
            "{ max_stale = \"1h\" }",
            "\"lots\"",
            "stale_store_size",
        ),
    ];
    for (server, auth, stale, at, says) in cases {
        let text = config(server, auth, stale);
        let errors = strangler::config::parse(&text)
            .err()
            .unwrap_or_else(|| panic!("accepted:\n{text}"));
        let want = position(&text, at);
        assert!(
            errors
                .iter()
                .any(|d| (d.line, d.col) == want && d.message.contains(says)),
            "{stale}: wanted {says:?} at {want:?}, got {errors:?}"
        );
    }
    // A key it does not know, at the key; a missing max_stale, at the table.
    for (stale, at, says) in [
        (
            "{ max_stale = \"1h\", max_age = \"1h\" }",
            "max_age",
            "unknown field `max_age`",
        ),
        (
            "{ max_stale = \"1h\", vary_on = [] }",
            "vary_on",
            "unknown field `vary_on`",
        ),
        ("{ on = [\"503\"] }", "{ on", "missing field `max_stale`"),
    ] {
        let text = config("", "", stale);
        let errors = strangler::config::parse(&text)
            .err()
            .unwrap_or_else(|| panic!("accepted:\n{text}"));
        let want = position(&text, at);
        assert!(
            errors
                .iter()
                .any(|d| (d.line, d.col) == want && d.message.contains(says)),
            "{stale}: wanted {says:?} at {want:?}, got {errors:?}"
        );
    }
}

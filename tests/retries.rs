//! Faults under load: retries of what is safe to send again (a connection reset before the
//! answer's head), never of what is not (a POST that was written, an answer already
//! started); ejection that matches reality (one per burst, back at the first passing health
//! check); logs that stay readable while a backend or a shadow is down. Backends "die" the way
//! SIGKILL makes them: every socket closed at once, the listener gone, then back on the same
//! port.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a panic is a failure report

mod support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};

use http::Method;
use http_body_util::BodyExt;
use serde_json::{json, Value};
use support::log::Sink;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::task::JoinSet;

static LOG: LazyLock<Sink> = LazyLock::new(|| Sink::install("strangler=info"));

fn init() {
    LazyLock::force(&LOG);
}

const SERVER: &str =
    "[server]\nlisten = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\nwatch = \"off\"\n";

fn cfg(name: &str, endpoints: &[SocketAddr], backend_extra: &str, route_extra: &str) -> String {
    let list: Vec<String> = endpoints.iter().map(|a| format!("\"{a}\"")).collect();
    format!("{SERVER}[backends.{name}]\nurl = \"http://{}\"\nlegacy = true\nendpoints = [{}]\nconnect_timeout = \"500ms\"\n{backend_extra}\n[[routes]]\nprefix = \"/\"\nbackend = \"{name}\"\n{route_extra}\n", endpoints[0], list.join(", "))
}

fn counter(m: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    metric(m, name, labels).unwrap_or(0.0)
}

/// A backend that answers `{"backend": name, "hits": n}` (bodies read whole), counts its
/// requests, and can be killed (every connection and the listener closed at once, as the
/// kernel does for a SIGKILLed process) and started again on the same port.
struct Killable {
    name: &'static str,
    addr: SocketAddr,
    hits: Arc<AtomicUsize>,
    tasks: Option<JoinSet<()>>,
}

impl Killable {
    async fn start(name: &'static str) -> Killable {
        let (l, addr) = listener().await;
        let mut k = Killable {
            name,
            addr,
            hits: Arc::new(AtomicUsize::new(0)),
            tasks: None,
        };
        k.serve(l);
        k
    }

    fn serve(&mut self, l: tokio::net::TcpListener) {
        let mut tasks = JoinSet::new();
        let (name, hits) = (self.name, self.hits.clone());
        tasks.spawn(async move {
            // Aborting this task drops the listener and this set, which aborts (and so
            // closes) every connection.
            let mut conns = JoinSet::new();
            while let Ok((tcp, _)) = l.accept().await {
                let hits = hits.clone();
                conns.spawn(async move {
                    let svc = hyper::service::service_fn(
                        move |req: http::Request<hyper::body::Incoming>| {
                            let hits = hits.clone();
                            async move {
                                let _ = req.into_body().collect().await;
                                let n = hits.fetch_add(1, Ordering::SeqCst) + 1;
                                Ok::<_, std::convert::Infallible>(legacy_stub::http::json(
                                    http::StatusCode::OK,
                                    &json!({"backend": name, "hits": n}),
                                ))
                            }
                        },
                    );
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(tcp), svc)
                        .await;
                });
            }
        });
        self.tasks = Some(tasks);
    }

    /// Every socket closed at once; nothing listens on the port.
    fn kill(&mut self) {
        if let Some(mut t) = self.tasks.take() {
            t.abort_all();
        }
    }

    async fn restart(&mut self) {
        assert!(self.tasks.is_none());
        let l = tokio::net::TcpListener::bind(self.addr).await.unwrap();
        self.serve(l);
    }

    fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
}

/// A raw backend on 127.0.0.1:0 that runs `handle` on each connection and counts the
/// requests it took (`handle` returns whether it read one).
async fn raw_counting<F, Fut>(handle: F) -> (Running, Arc<AtomicUsize>)
where
    F: Fn(tokio::net::TcpStream) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = bool> + Send + 'static,
{
    let (l, addr) = listener().await;
    let seen = Arc::new(AtomicUsize::new(0));
    let counted = seen.clone();
    let (tx, mut stop) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        loop {
            let (s, _) = tokio::select! {
                _ = &mut stop => return,
                r = l.accept() => r.unwrap(),
            };
            let (counted, served) = (counted.clone(), handle(s));
            tokio::spawn(async move {
                if served.await {
                    counted.fetch_add(1, Ordering::SeqCst);
                }
            });
        }
    });
    (
        Running {
            addr,
            stop: Some(tx),
        },
        seen,
    )
}

/// A backend that reads each request, then closes the connection without an answer (the
/// request was written and lost: a reset before the head), counting them.
async fn resetting() -> (Running, Arc<AtomicUsize>) {
    raw_counting(|mut s| async move {
        // The whole request, head and Content-Length body: written, then lost.
        let mut buf = vec![0u8; 1 << 16];
        let mut seen = Vec::new();
        let mut want = None;
        while want.is_none_or(|w| seen.len() < w) {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return false,
                Ok(n) => seen.extend_from_slice(&buf[..n]),
            }
            if want.is_none() {
                if let Some(end) = seen.windows(4).position(|w| w == b"\r\n\r\n") {
                    let head = String::from_utf8_lossy(&seen[..end]).to_ascii_lowercase();
                    let len = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .and_then(|v| v.trim().parse::<usize>().ok())
                        .unwrap_or(0);
                    want = Some(end + 4 + len);
                }
            }
        }
        // RST, as a crashed process: a zero linger (it never blocks)
        let _ = socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO));
        true
    })
    .await
}

/// A port nothing listens on, kept bound (not listening) so no other test's listener can
/// take it while this one expects connections to it to be refused.
fn dead_port() -> (tokio::net::TcpSocket, SocketAddr) {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = socket.local_addr().unwrap();
    (socket, addr)
}

#[tokio::test]
async fn a_get_lost_to_a_reset_goes_to_another_endpoint() {
    init();
    let good = Killable::start("good").await;
    let (bad, reset) = resetting().await;
    let proxy = Proxy::start(&cfg("legacy", &[bad.addr, good.addr], "retries = 1", "")).await;
    for i in 0..60 {
        let r = get(&proxy.url(&format!("/x/{i}"))).await;
        assert_eq!(r.status, 200, "request {i}: {}", r.text());
        assert_eq!(r.json()["backend"], "good");
    }
    let m = metrics_text(&proxy).await;
    let retried = counter(
        &m,
        "strangler_upstream_retries_total",
        &[("backend", "legacy"), ("reason", "reset")],
    );
    assert!(retried >= 3.0, "{m}");
    assert_eq!(
        retried,
        reset.load(Ordering::SeqCst) as f64,
        "each lost request went again once"
    );
    assert_eq!(good.hits(), 60);
    // A PUT with a small body is sent again whole; one whose body went unread past 1 MiB is not.
    let put = send_with(Method::PUT, &proxy.url("/put"), &[], "x".repeat(10_000)).await;
    assert_eq!(put.status, 200);
    // With retry_on left without "reset", the loss stands.
    let strict = Proxy::start(&cfg(
        "legacy",
        &[bad.addr, good.addr],
        "retries = 1\nretry_on = [\"connect-failure\"]",
        "",
    ))
    .await;
    let mut failed = 0;
    for _ in 0..40 {
        failed += usize::from(get(&strict.url("/y")).await.status == 502);
    }
    assert!(failed > 0, "no request met the resetting endpoint");
    let m = metrics_text(&strict).await;
    assert_eq!(
        counter(
            &m,
            "strangler_upstream_retries_total",
            &[("reason", "reset")]
        ),
        0.0
    );
}

#[tokio::test]
async fn a_post_is_sent_again_only_when_it_never_left_or_the_route_opts_in() {
    init();
    let good = Killable::start("good").await;
    let (bad, reset) = resetting().await;
    // Written and lost: a POST may have been processed; its failure stands.
    let proxy = Proxy::start(&cfg("legacy", &[bad.addr], "retries = 2", "")).await;
    for _ in 0..5 {
        let r = send_with(Method::POST, &proxy.url("/orders"), &[], "{}").await;
        assert_eq!(r.status, 502);
        assert_eq!(r.json()["code"], "upstream_unavailable");
    }
    assert_eq!(reset.load(Ordering::SeqCst), 5, "one attempt per POST");
    // Never left (nothing listens): any method goes to the next endpoint.
    let (_hold, dead) = dead_port();
    let proxy = Proxy::start(&cfg("legacy", &[dead, good.addr], "retries = 2", "")).await;
    for _ in 0..20 {
        let r = send_with(Method::POST, &proxy.url("/orders"), &[], "{\"n\":1}").await;
        assert_eq!(r.status, 200);
    }
    // The route opts in: a written POST goes again too.
    let before = reset.load(Ordering::SeqCst);
    let proxy = Proxy::start(&cfg(
        "legacy",
        &[bad.addr, good.addr],
        "retries = 1",
        "retry_non_idempotent = true",
    ))
    .await;
    for _ in 0..20 {
        let r = send_with(Method::POST, &proxy.url("/orders"), &[], "{\"n\":2}").await;
        assert_eq!(r.status, 200);
    }
    assert!(reset.load(Ordering::SeqCst) > before);
}

/// A backend that answers a head and part of a body, then resets the connection.
async fn breaks_mid_body() -> (Running, Arc<AtomicUsize>) {
    raw_counting(|mut s| async move {
        let mut buf = [0u8; 4096];
        let _ = s.read(&mut buf).await;
        let _ = s
            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\npartial")
            .await;
        tokio::time::sleep(Duration::from_millis(20)).await;
        let _ = socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO));
        true
    })
    .await
}

#[tokio::test]
async fn an_answer_that_had_started_is_never_sent_again() {
    init();
    let good = Killable::start("good").await;
    let (bad, seen) = breaks_mid_body().await;
    let proxy = Proxy::start(&cfg("legacy", &[bad.addr], "retries = 2", "")).await;
    let _ = &good;
    let resp = client()
        .get(proxy.url("/started").parse().unwrap())
        .await
        .unwrap();
    assert_eq!(resp.status(), 200, "the head was the client's");
    assert!(
        resp.into_body().collect().await.is_err(),
        "the body breaks off"
    );
    assert_eq!(seen.load(Ordering::SeqCst), 1, "not sent again");
    let m = metrics_text(&proxy).await;
    let retries: f64 = ["connect-failure", "refused-stream", "reset"]
        .iter()
        .map(|r| counter(&m, "strangler_upstream_retries_total", &[("reason", r)]))
        .sum();
    assert_eq!(retries, 0.0, "{m}");
}

#[tokio::test]
async fn the_retry_budget_bounds_resets_in_a_full_outage() {
    init();
    let (a, seen_a) = resetting().await;
    let (b, seen_b) = resetting().await;
    let proxy = Proxy::start(&cfg("legacy", &[a.addr, b.addr], "retries = 3", "")).await;
    let n = 200;
    for _ in 0..n {
        assert_eq!(get(&proxy.url("/x")).await.status, 502);
    }
    let attempts = (seen_a.load(Ordering::SeqCst) + seen_b.load(Ordering::SeqCst)) as f64;
    let n = n as f64;
    eprintln!("retry budget: {attempts} attempts for {n} requests with retries = 3");
    // Without the budget: 4 attempts a request. With it: one each, plus the 10 retries the
    // budget starts with, plus a fifth of the requests.
    assert!(
        attempts >= n && attempts <= n + 10.0 + n * 0.2 + 2.0,
        "{attempts} attempts for {n} requests"
    );
}

async fn endpoint_state(proxy: &Proxy, i: usize) -> Value {
    routes_json(proxy).await["backends"][0]["endpoints"][i].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_failures_is_one_ejection_and_a_passing_check_returns_the_endpoint() {
    init();
    let mut a = Killable::start("a").await;
    let b = Killable::start("b").await;
    let proxy = Proxy::start(&cfg(
        "legacy",
        &[a.addr, b.addr],
        "retries = 2\nhealth = { path = \"/healthz\", interval = \"300ms\" }",
        "",
    ))
    .await;
    // Load from 16 clients, then `a` dies under it.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let failed = Arc::new(AtomicUsize::new(0));
    let mut load = JoinSet::new();
    for _ in 0..16 {
        let (url, stop, failed) = (proxy.url("/x"), stop.clone(), failed.clone());
        load.spawn(async move {
            let http = client();
            while !stop.load(Ordering::SeqCst) {
                let resp = http.get(url.parse().unwrap()).await.unwrap();
                let ok = resp.status() == 200 && resp.into_body().collect().await.is_ok();
                failed.fetch_add(usize::from(!ok), Ordering::SeqCst);
            }
        });
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    a.kill();
    let killed = Instant::now();
    tokio::time::sleep(Duration::from_millis(700)).await;
    let ep = endpoint_state(&proxy, 0).await;
    assert_eq!(ep["ejected"], true, "{ep}");
    assert_eq!(ep["ejections"], 1, "one event, one ejection: {ep}");
    assert!(ep["ejected_after"].is_string(), "{ep}");
    let until = humantime::parse_rfc3339(ep["ejected_until"].as_str().unwrap()).unwrap();
    let left = until
        .duration_since(std::time::SystemTime::now())
        .unwrap_or_default();
    assert!(
        left <= Duration::from_millis(1100),
        "the first ejection lasts 1 s: {left:?} left"
    );
    // Back: the first passing health check (every 300 ms) returns it, not a grown backoff.
    a.restart().await;
    let back = Instant::now();
    eventually(Duration::from_secs(2), || async {
        let ep = endpoint_state(&proxy, 0).await;
        (ep["ejected"] == false && ep["healthy"] == true && ep["ejections"] == 0).then_some(())
    })
    .await;
    let returned = back.elapsed();
    let hits = a.hits();
    eventually(Duration::from_secs(2), || async {
        (a.hits() > hits + 20).then_some(())
    })
    .await;
    stop.store(true, Ordering::SeqCst);
    while load.join_next().await.is_some() {}
    eprintln!(
        "killed at {:?}; returned {returned:?} after the restart; {} failed requests",
        killed.elapsed(),
        failed.load(Ordering::SeqCst)
    );
    assert_eq!(
        failed.load(Ordering::SeqCst),
        0,
        "GETs lost while an endpoint died and returned"
    );
    assert!(returned < Duration::from_millis(1500), "{returned:?}");
    let log = LOG.text();
    let about_a: Vec<&str> = log
        .lines()
        .filter(|l| l.contains(&a.addr.to_string()))
        .collect();
    let ejected = about_a
        .iter()
        .filter(|l| l.contains("endpoint ejected"))
        .count();
    assert_eq!(
        ejected,
        1,
        "one warning per ejection episode:\n{}",
        about_a.join("\n")
    );
    let _ = b;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_backend_or_shadow_writes_a_few_lines_not_one_per_request() {
    init();
    let legacy = Killable::start("legacy-quiet").await;
    let (_hold, dead) = dead_port();
    let (_hold_shadow, dead_shadow) = dead_port();
    let proxy = Proxy::start(&format!(
        "{SERVER}[backends.legacy]\nurl = \"http://{}\"\nlegacy = true\n[backends.down]\nurl = \"http://{dead}\"\n[backends.gone]\nurl = \"http://{dead_shadow}\"\n[[routes]]\nprefix = \"/down\"\nbackend = \"down\"\n[[routes]]\nprefix = \"/\"\nbackend = \"legacy\"\nshadow = \"gone\"\n",
        legacy.addr
    ))
    .await;
    let started = Instant::now();
    let mut tasks = JoinSet::new();
    for c in 0..8 {
        let url = proxy.url(if c % 2 == 0 { "/down/x" } else { "/x" });
        tasks.spawn(async move {
            let http = client();
            for _ in 0..250 {
                let resp = http.get(url.parse().unwrap()).await.unwrap();
                let _ = resp.into_body().collect().await;
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    let seconds = started.elapsed().as_secs_f64().ceil();
    let m = metrics_text(&proxy).await;
    let refused = counter(
        &m,
        "strangler_upstream_errors_total",
        &[("backend", "down"), ("kind", "connect")],
    );
    assert!(
        refused >= 1000.0,
        "the metrics count every failure: {refused}\n{m}"
    );
    let lines: Vec<String> = LOG
        .text()
        .lines()
        .filter(|l| {
            l.contains(&dead.to_string())
                || l.contains(&dead_shadow.to_string())
                || l.contains("upstream down is unavailable")
        })
        .map(String::from)
        .collect();
    eprintln!(
        "{} lines in {seconds} s for 2,000 requests ({refused} refused):\n{}",
        lines.len(),
        lines.join("\n")
    );
    // Per dead backend: one ejection per episode (1 s, 2 s, 4 s, ... apart); the first proxy
    // error and one per 10 s after it. One line per request would be over a thousand.
    let episodes = 2.0 + (seconds + 1.0).log2().ceil();
    let bound = 2.0 * episodes + 1.0 + (seconds / 10.0).ceil();
    assert!(
        lines.len() as f64 <= bound,
        "{} lines, bound {bound}",
        lines.len()
    );
}

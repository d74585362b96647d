//! Many clients at once: the listen backlog that holds a burst the accept loop has not
//! reached yet, and the bounds that keep a burst of requests from becoming a burst of
//! connection attempts on a backend (`max_connections`, `max_connecting`, `max_waiting`,
//! `wait_timeout`), with the 503 `upstream_busy` past them.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a panic is a failure report

mod support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::StatusCode;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Opens `n` connections at once; how many completed their handshake within `limit`.
async fn burst(addr: SocketAddr, n: usize, limit: Duration) -> Vec<Option<TcpStream>> {
    let tasks: Vec<_> = (0..n)
        .map(|_| {
            tokio::spawn(async move {
                tokio::time::timeout(limit, TcpStream::connect(addr))
                    .await
                    .ok()
                    .and_then(Result::ok)
            })
        })
        .collect();
    let mut out = Vec::with_capacity(n);
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

/// The proxy holds exactly `n` client connections open (they were accepted).
async fn open_clients(proxy: &Proxy, n: u64) {
    for _ in 0..200 {
        if routes_json(proxy).await["clients"]["open"] == n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the proxy never had {n} client connections open");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_past_the_old_backlog_waits_in_the_accept_queue_and_is_all_served() {
    let echo = start_echo("legacy").await;
    // Four connections at most: with these four held, the proxy accepts nothing, and the
    // whole burst waits in the kernel's accept queue (as it does behind a busy accept loop).
    let proxy = proxy_to_with(echo.addr, "", "max_connections = 4").await;
    let backlog = routes_json(&proxy).await["clients"]["backlog"]
        .as_u64()
        .unwrap();
    assert!(
        backlog >= 512,
        "the default backlog follows net.core.somaxconn; this machine's is {backlog}"
    );
    let held = burst(proxy.addr, 4, Duration::from_secs(1)).await;
    assert!(held.iter().all(Option::is_some));
    open_clients(&proxy, 4).await;
    // Three times tokio's default backlog (128): every handshake completes at once. With a
    // full queue the kernel drops the SYN, and the client waits out a 1 s retransmission.
    let waiting = burst(proxy.addr, 400, Duration::from_millis(900)).await;
    let connected = waiting.iter().filter(|c| c.is_some()).count();
    assert_eq!(connected, 400, "handshakes completed in the accept queue");
    drop(held);
    let served: Vec<_> = waiting
        .into_iter()
        .map(|c| {
            tokio::spawn(async move {
                let mut c = c.unwrap();
                c.write_all(b"GET /x HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
                    .await
                    .unwrap();
                let mut answer = Vec::new();
                tokio::time::timeout(Duration::from_secs(20), c.read_to_end(&mut answer))
                    .await
                    .expect("answered")
                    .unwrap();
                String::from_utf8_lossy(&answer).starts_with("HTTP/1.1 200")
            })
        })
        .collect();
    let mut ok = 0;
    for s in served {
        ok += usize::from(s.await.unwrap());
    }
    assert_eq!(ok, 400, "every connection of the burst was served");
    let m = metrics_text(&proxy).await;
    let accepted = metric(
        &m,
        "strangler_connections_accepted_total",
        &[("listener", "proxy")],
    );
    assert!(accepted >= Some(404.0), "{accepted:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_set_in_the_file_is_the_one_listened_with() {
    let echo = start_echo("legacy").await;
    let proxy = proxy_to_with(echo.addr, "", "max_connections = 1\nbacklog = 16").await;
    assert_eq!(routes_json(&proxy).await["clients"]["backlog"], 16);
    let held = burst(proxy.addr, 1, Duration::from_secs(1)).await;
    open_clients(&proxy, 1).await;
    // The queue holds backlog + 1 handshakes; the rest of the burst is dropped by the kernel.
    let waiting = burst(proxy.addr, 64, Duration::from_millis(500)).await;
    let connected = waiting.iter().filter(|c| c.is_some()).count();
    assert!((16..=20).contains(&connected), "{connected} connected");
    drop(held);
}

/// A backend that accepts one connection every `pause`, with an accept queue of `backlog`:
/// what a burst of connection attempts overflows. Counts the connections it accepted.
async fn slow_acceptor(backlog: u32, pause: Duration) -> (SocketAddr, Arc<AtomicUsize>) {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let listener = socket.listen(backlog).unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let svc = service_fn(|_req| async {
                    tokio::time::sleep(Duration::from_millis(2)).await;
                    Ok::<_, std::convert::Infallible>(hyper::Response::new(
                        http_body_util::Full::new(bytes::Bytes::from_static(b"{\"ok\":true}")),
                    ))
                });
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
            tokio::time::sleep(pause).await;
        }
    });
    (addr, accepted)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_with_a_small_accept_queue_is_reached_through_the_bounds_without_a_failure() {
    let (backend, accepted) = slow_acceptor(2, Duration::from_millis(5)).await;
    let proxy = proxy_to_with(
        backend,
        "connect_timeout = \"300ms\"\nmax_connections = 4\nmax_connecting = 2",
        "",
    )
    .await;
    // 200 clients at once: 200 connection attempts would overflow the backend's queue of 2
    // (a dropped SYN is retried after 1 s, past connect_timeout: a 502). Bounded, they wait
    // for the four connections instead.
    let clients: Vec<_> = (0..200)
        .map(|i| {
            let addr = proxy.addr;
            tokio::spawn(async move {
                let mut c = TcpStream::connect(addr).await.unwrap();
                let req = format!("GET /r/{i} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n");
                c.write_all(req.as_bytes()).await.unwrap();
                let mut answer = Vec::new();
                c.read_to_end(&mut answer).await.unwrap();
                String::from_utf8_lossy(&answer)
                    .lines()
                    .next()
                    .unwrap_or_default()
                    .to_string()
            })
        })
        .collect();
    let mut statuses = std::collections::BTreeMap::<String, usize>::new();
    for c in clients {
        *statuses.entry(c.await.unwrap()).or_default() += 1;
    }
    assert_eq!(statuses.get("HTTP/1.1 200 OK"), Some(&200), "{statuses:?}");
    let opened = accepted.load(Ordering::SeqCst);
    assert!(opened <= 4, "the backend accepted {opened} connections");
    let ep = &routes_json(&proxy).await["backends"][0]["endpoints"][0];
    assert_eq!(ep["waiting"], 0);
    assert!(ep["connections"].as_u64().unwrap() <= 4, "{ep}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_line_and_after_the_wait_a_request_is_refused_with_503_upstream_busy() {
    let echo = start_echo("legacy").await;
    let proxy = proxy_to_with(
        echo.addr,
        "max_connections = 1\nmax_waiting = 1\nwait_timeout = \"300ms\"",
        "",
    )
    .await;
    // One request holds the only connection for a second.
    let slow = tokio::spawn(get_owned(proxy.url("/slow/1000")));
    eventually(&proxy, |ep| ep["connections"] == 1 && ep["in_flight"] == 1).await;
    // The next one waits in line...
    let waits = tokio::spawn(get_owned(proxy.url("/x")));
    eventually(&proxy, |ep| ep["waiting"] == 1).await;
    // ...and the line is full: refused at once.
    let started = std::time::Instant::now();
    let full = get(&proxy.url("/y")).await;
    assert!(started.elapsed() < Duration::from_millis(250));
    assert_busy(&full, "max_waiting");
    let waited = waits.await.unwrap();
    assert_busy(&waited, "wait_timeout");
    assert_eq!(slow.await.unwrap().status, StatusCode::OK);
    // The connection is free again: served.
    assert_eq!(get(&proxy.url("/z")).await.status, StatusCode::OK);
    let m = metrics_text(&proxy).await;
    for reason in ["line_full", "wait_timeout"] {
        let labels = [("backend", "legacy"), ("reason", reason)];
        assert_eq!(
            metric(&m, "strangler_upstream_refused_total", &labels),
            Some(1.0),
            "{reason}"
        );
    }
    assert_eq!(
        metric(
            &m,
            "strangler_upstream_errors_total",
            &[("kind", "connect")]
        ),
        Some(0.0),
        "a refusal is the proxy's bound, not the backend failing"
    );
    let ep = &routes_json(&proxy).await["backends"][0]["endpoints"][0];
    assert_eq!(ep["refused_line_full"], 1);
    assert_eq!(ep["refused_wait_timeout"], 1);
    assert_eq!(ep["ejected"], false);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_requests_are_served_in_turn_on_one_connection() {
    let echo = start_echo("legacy").await;
    let proxy = proxy_to_with(echo.addr, "max_connections = 1", "").await;
    let clients: Vec<_> = (0..30)
        .map(|i| tokio::spawn(get_owned(proxy.url(&format!("/slow/{}", i % 3)))))
        .collect();
    for c in clients {
        assert_eq!(c.await.unwrap().status, StatusCode::OK);
    }
    let ep = &routes_json(&proxy).await["backends"][0]["endpoints"][0];
    assert_eq!(ep["connections"], 1, "{ep}");
    assert_eq!(ep["waiting"], 0);
    assert_eq!(
        routes_json(&proxy).await["backends"][0]["connection_limits"]["max_connections"],
        1
    );
}

async fn get_owned(url: String) -> Reply {
    get(&url).await
}

fn assert_busy(reply: &Reply, says: &str) {
    assert_eq!(
        reply.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{}",
        reply.text()
    );
    let body = reply.json();
    assert_eq!(body["code"], "upstream_busy", "{body}");
    assert!(body["error"].as_str().unwrap().contains(says), "{body}");
    assert!(body["request_id"].is_string());
    assert_eq!(reply.headers["retry-after"], "1");
}

/// Waits until the backend's first endpoint in `/routes` satisfies `ok`.
async fn eventually(proxy: &Proxy, ok: impl Fn(&serde_json::Value) -> bool) {
    for _ in 0..300 {
        let ep = routes_json(proxy).await["backends"][0]["endpoints"][0].clone();
        if ok(&ep) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the endpoint never reached the state");
}

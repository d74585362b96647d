//! Upstream trouble and limits: refused, reset, hanging and garbage backends; timeouts;
//! body and header limits; streaming without whole-body buffering.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a panic is a failure report

mod support;

use std::time::Duration;

use bytes::Bytes;
use http::Method;
use http_body_util::{BodyExt, Full, StreamBody};
use support::*;

#[tokio::test]
async fn refused_connection_is_502_and_counted() {
    let proxy = proxy_to_with(closed_port().await, "connect_timeout = \"500ms\"", "").await;
    let r = get(&proxy.url("/api/users")).await;
    assert_eq!(r.status, 502);
    let j = r.json();
    assert_eq!(j["code"], "upstream_unavailable");
    assert_eq!(j["request_id"], r.headers["x-request-id"].to_str().unwrap());
    let m = metrics_text(&proxy).await;
    assert_eq!(
        metric(
            &m,
            "strangler_upstream_errors_total",
            &[("backend", "legacy"), ("kind", "connect")]
        ),
        Some(1.0),
        "{m}"
    );
    assert_eq!(
        metric(
            &m,
            "strangler_requests_total",
            &[("route", "/"), ("backend", "legacy"), ("status", "502")]
        ),
        Some(1.0),
        "{m}"
    );
}

#[tokio::test]
async fn reset_and_garbage_are_502() {
    for (kind, label) in [
        (Misbehave::Reset, "reset"),
        (Misbehave::Garbage, "protocol"),
    ] {
        let backend = start_raw(kind).await;
        let proxy = proxy_to_with(backend.addr, "", "").await;
        let r = get(&proxy.url("/")).await;
        assert_eq!(r.status, 502, "{label}");
        assert_eq!(r.json()["code"], "upstream_unavailable");
        let m = metrics_text(&proxy).await;
        assert_eq!(
            metric(&m, "strangler_upstream_errors_total", &[("kind", label)]),
            Some(1.0),
            "{label}: {m}"
        );
    }
}

#[tokio::test]
async fn hanging_backend_is_504_after_the_timeout() {
    let backend = start_raw(Misbehave::Hang).await;
    let proxy = proxy_to_with(backend.addr, "timeout = \"300ms\"", "").await;
    let started = std::time::Instant::now();
    let r = get(&proxy.url("/")).await;
    let took = started.elapsed();
    assert_eq!(r.status, 504);
    assert_eq!(r.json()["code"], "upstream_timeout");
    assert!(
        took >= Duration::from_millis(300) && took < Duration::from_secs(5),
        "{took:?}"
    );
    let m = metrics_text(&proxy).await;
    assert_eq!(
        metric(
            &m,
            "strangler_upstream_errors_total",
            &[("kind", "timeout")]
        ),
        Some(1.0)
    );
}

#[tokio::test]
async fn a_body_that_stalls_is_cut_at_the_timeout() {
    let backend = start_raw(Misbehave::StallBody).await;
    let proxy = proxy_to_with(backend.addr, "timeout = \"300ms\"", "").await;
    let resp = client()
        .request(
            http::Request::get(proxy.url("/"))
                .body(Full::default())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), 200, "the head was already sent");
    let body = tokio::time::timeout(Duration::from_secs(5), resp.into_body().collect())
        .await
        .expect("the proxy must end the body");
    assert!(body.is_err(), "a truncated body must not look complete");
}

#[tokio::test]
async fn declared_body_over_the_limit_is_413() {
    let echo = start_echo("legacy").await;
    let proxy = proxy_to_with(echo.addr, "", "max_request_body = \"1KiB\"").await;
    let r = send_with(Method::POST, &proxy.url("/"), &[], vec![b'a'; 2048]).await;
    assert_eq!(r.status, 413);
    assert_eq!(r.json()["code"], "payload_too_large");
    let r = send_with(Method::POST, &proxy.url("/"), &[], vec![b'a'; 1024]).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["body_len"], 1024);
}

#[tokio::test]
async fn chunked_body_growing_past_the_limit_is_413() {
    let echo = start_echo("legacy").await;
    let proxy = proxy_to_with(echo.addr, "", "max_request_body = \"64KiB\"").await;
    let chunks = (0..40)
        .map(|_| Ok::<_, std::io::Error>(http_body::Frame::data(Bytes::from(vec![b'c'; 4096]))));
    let body = StreamBody::new(futures_util::stream::iter(chunks));
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http();
    let resp = client
        .request(http::Request::post(proxy.url("/")).body(body).unwrap())
        .await
        .unwrap();
    assert_eq!(resp.status(), 413);
    let j: serde_json::Value =
        serde_json::from_slice(&resp.into_body().collect().await.unwrap().to_bytes()).unwrap();
    assert_eq!(j["code"], "payload_too_large");
}

#[tokio::test]
async fn large_bodies_stream_both_ways() {
    let echo = start_echo("legacy").await;
    let proxy = proxy_to_with(echo.addr, "", "max_request_body = \"64MiB\"").await;
    // 32 MiB up, sent as a stream of chunks without a declared length.
    let chunks = (0..512).map(|_| {
        Ok::<_, std::io::Error>(http_body::Frame::data(Bytes::from(vec![b'u'; 64 * 1024])))
    });
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http();
    let resp = client
        .request(
            http::Request::post(proxy.url("/upload"))
                .body(StreamBody::new(futures_util::stream::iter(chunks)))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let j: serde_json::Value =
        serde_json::from_slice(&resp.into_body().collect().await.unwrap().to_bytes()).unwrap();
    assert_eq!(j["body_len"], 32 * 1024 * 1024);
    // 16 MiB down.
    let r = get(&proxy.url("/stream/16384")).await;
    assert_eq!(r.body.len(), 16 * 1024 * 1024);
}

#[tokio::test]
async fn oversized_headers_are_refused() {
    let echo = start_echo("legacy").await;
    let proxy = proxy_to_with(echo.addr, "", "max_header_size = \"8KiB\"").await;
    let big = format!(
        "GET / HTTP/1.1\r\nhost: x\r\nx-big: {}\r\n\r\n",
        "a".repeat(16 * 1024)
    );
    let out = raw(proxy.addr, big.as_bytes(), Duration::from_secs(2)).await;
    assert!(out.starts_with("HTTP/1.1 431"), "{out}");
    let ok = raw(
        proxy.addr,
        b"GET / HTTP/1.1\r\nhost: x\r\n\r\n",
        Duration::from_secs(2),
    )
    .await;
    assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
}

#[tokio::test]
async fn slowloris_connections_are_closed() {
    let echo = start_echo("legacy").await;
    let proxy = proxy_to_with(echo.addr, "", "header_read_timeout = \"300ms\"").await;
    let started = std::time::Instant::now();
    // Half a request line, then silence: the proxy must hang up.
    let out = raw(
        proxy.addr,
        b"GET / HTTP/1.1\r\nhost: x\r\n",
        Duration::from_secs(5),
    )
    .await;
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(3),
        "connection held for {took:?}"
    );
    assert!(!out.contains("200 OK"), "{out}");
}

/// When the proxy closes `s` (EOF or reset), as time since `started`; `None` within `limit`.
/// Whatever it sends first is returned too.
async fn closed_after(
    s: &mut (impl tokio::io::AsyncRead + Unpin),
    started: std::time::Instant,
    limit: Duration,
) -> (Option<Duration>, Vec<u8>) {
    use tokio::io::AsyncReadExt;
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    let closed = tokio::time::timeout(limit, async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return started.elapsed(),
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await
    .ok();
    (closed, got)
}

#[tokio::test]
async fn a_client_that_never_sends_is_closed_at_header_read_timeout() {
    let echo = start_echo("legacy").await;
    let proxy = proxy_to_with(echo.addr, "", "header_read_timeout = \"500ms\"").await;
    let started = std::time::Instant::now();
    let mut s = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    let (closed, got) = closed_after(&mut s, started, Duration::from_secs(5)).await;
    let closed = closed.expect("the proxy kept a silent connection open");
    assert!(
        closed >= Duration::from_millis(450) && closed < Duration::from_secs(3),
        "closed after {closed:?}"
    );
    assert!(got.is_empty(), "{:?}", String::from_utf8_lossy(&got));
}

#[tokio::test]
async fn a_late_first_byte_does_not_restart_header_read_timeout() {
    use tokio::io::AsyncWriteExt;
    let echo = start_echo("legacy").await;
    let proxy = proxy_to_with(echo.addr, "", "header_read_timeout = \"1s\"").await;
    let started = std::time::Instant::now();
    let s = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    let (mut reader, mut writer) = s.into_split();
    // Silent for most of the timeout, then a request head a byte at a time: the head is due
    // a second after the connection was accepted, not a second after its first byte.
    let trickle = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(800)).await;
        for b in b"GET / HTTP/1.1\r\nhost: x\r\nx-slow: yes\r\n" {
            if writer.write_all(&[*b]).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    let (closed, got) = closed_after(&mut reader, started, Duration::from_secs(5)).await;
    let closed = closed.expect("the proxy kept a slow head open");
    trickle.abort();
    // Restarted at the first byte, the timeout would close it at 1.8 s.
    assert!(
        closed >= Duration::from_millis(950) && closed < Duration::from_millis(1600),
        "closed after {closed:?}"
    );
    assert!(got.is_empty(), "{:?}", String::from_utf8_lossy(&got));
}

#[tokio::test]
async fn the_connection_cap_holds_extra_clients_until_one_leaves() {
    let echo = start_echo("legacy").await;
    let proxy = proxy_to_with(echo.addr, "", "max_connections = 1").await;
    // First client holds the only slot with a slow request.
    let slow = tokio::spawn({
        let url = proxy.url("/slow/600");
        async move { get(&url).await.status }
    });
    tokio::time::sleep(Duration::from_millis(150)).await;
    let started = std::time::Instant::now();
    let out = raw(
        proxy.addr,
        b"GET /fast HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
        Duration::from_secs(5),
    )
    .await;
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    assert_eq!(slow.await.unwrap(), 200);
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "second connection was served while the cap was full"
    );
}

#[tokio::test]
async fn a_malformed_chunked_body_is_400_and_the_pool_stays_healthy() {
    let echo = start_echo("legacy").await;
    let proxy = proxy_to_with(echo.addr, "", "").await;
    let bad = b"POST /upload HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\nZZZ\r\n";
    let out = raw(proxy.addr, bad, Duration::from_secs(3)).await;
    assert!(out.starts_with("HTTP/1.1 400"), "{out}");
    assert!(out.contains("\"code\":\"bad_request\""), "{out}");
    let m = metrics_text(&proxy).await;
    assert_eq!(
        metric(&m, "strangler_upstream_errors_total", &[("kind", "reset")]),
        Some(0.0),
        "a client's broken body is not the upstream's fault: {m}"
    );
    for _ in 0..3 {
        assert_eq!(get(&proxy.url("/after")).await.status, 200);
    }
}

/// Under steady keep-alive load every upstream connection goes back to the pool: the backend
/// accepts no more connections than there were exchanges at once, whatever the framing of its
/// answers (sized, chunked, empty, HEAD). (A backend that closes after N requests, as nginx
/// does after its default `keepalive_requests 1000`, renews connections by its own choice.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn steady_keep_alive_load_opens_no_new_upstream_connections() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    let (listener, addr) = listener().await;
    let accepted = Arc::new(AtomicUsize::new(0));
    let counted = accepted.clone();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            counted.fetch_add(1, Ordering::Relaxed);
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(
                    |req: http::Request<hyper::body::Incoming>| async move {
                        let n: usize = req
                            .uri()
                            .path()
                            .trim_start_matches('/')
                            .parse()
                            .unwrap_or(0);
                        let body = match n % 3 {
                            0 => http_body_util::Either::Left(Full::new(Bytes::from(vec![
                                b'x';
                                1024
                            ]))),
                            // No length: hyper sends it chunked.
                            1 => http_body_util::Either::Right(StreamBody::new(
                                futures_util::stream::iter([Ok::<_, std::convert::Infallible>(
                                    hyper::body::Frame::data(Bytes::from_static(b"chunk")),
                                )]),
                            )),
                            _ => http_body_util::Either::Left(Full::new(Bytes::new())),
                        };
                        Ok::<_, std::convert::Infallible>(http::Response::new(body))
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    let proxy = proxy_to_with(addr, "", "").await;
    let clients = 8;
    let tasks: Vec<_> = (0..clients)
        .map(|c| {
            let base = proxy.url("");
            tokio::spawn(async move {
                let client = client();
                for i in 0..300 {
                    let method = if i % 7 == 0 {
                        Method::HEAD
                    } else {
                        Method::GET
                    };
                    let req = request(method, &format!("{base}/{}", c * 1000 + i))
                        .body(Full::default())
                        .unwrap();
                    let resp = client.request(req).await.unwrap();
                    assert_eq!(resp.status(), 200);
                    resp.into_body().collect().await.unwrap();
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let opened = accepted.load(Ordering::Relaxed);
    eprintln!(
        "{} requests over {clients} client connections: {opened} upstream connections",
        clients * 300
    );
    assert!(
        opened <= clients,
        "{opened} upstream connections for {clients} concurrent clients"
    );
}

/// Reads one response (head and a `content-length` body) from `s`; `None` at EOF.
async fn read_response(s: &mut tokio::net::TcpStream) -> Option<String> {
    use tokio::io::AsyncReadExt;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        if let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&got[..end]).to_ascii_lowercase();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .map_or(0, |v| v.trim().parse().unwrap());
            if got.len() >= end + 4 + len {
                return Some(String::from_utf8_lossy(&got[..end + 4 + len]).into_owned());
            }
        }
        match s.read(&mut buf).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
}

#[tokio::test]
async fn a_deadline_longer_than_header_read_timeout_is_kept_and_rearmed_per_request() {
    use tokio::io::AsyncWriteExt;
    // The connection's watchdog keeps both: the head timeout must not cut a request that is
    // being served, and each request on the connection gets its whole backend timeout.
    let backend = start_raw(Misbehave::Hang).await;
    let proxy = proxy_to_with(
        backend.addr,
        "timeout = \"800ms\"",
        "header_read_timeout = \"300ms\"",
    )
    .await;
    let mut s = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    for round in 0..2 {
        let started = std::time::Instant::now();
        s.write_all(b"GET /slow HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        let got = tokio::time::timeout(Duration::from_secs(5), read_response(&mut s))
            .await
            .expect("no answer within 5 s")
            .unwrap_or_else(|| panic!("round {round}: closed after {:?}", started.elapsed()));
        let took = started.elapsed();
        assert!(got.starts_with("HTTP/1.1 504"), "round {round}: {got}");
        assert!(got.contains("upstream_timeout"), "round {round}: {got}");
        assert!(
            took >= Duration::from_millis(750) && took < Duration::from_secs(3),
            "round {round}: answered after {took:?}"
        );
    }
    // Idle again: the head timeout closes the connection, nothing written.
    let started = std::time::Instant::now();
    let rest = tokio::time::timeout(Duration::from_secs(5), read_response(&mut s)).await;
    assert!(matches!(rest, Ok(None)), "{rest:?}");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
}

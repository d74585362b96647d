//! Fuzz checks for strangler. Each function takes arbitrary bytes, runs one part of the proxy on
//! them and panics when an invariant breaks; AFL++ drives them through the binaries in
//! `src/bin/` (`fuzz/run.sh`), and `tests/replay.rs` runs every seed and every saved crash
//! through them on each `cargo test`, so a crash, once found, stays fixed.
//!
//! - [`config`]: routes.toml parse and validation never panic, and every error has a line and
//!   column inside the file.
//! - [`compare`]: the comparison never panics, is symmetric, counts at least what it keeps,
//!   and its output is bounded; a number outside the range of doubles never equals a
//!   finite one.
//! - [`headers`]: the request header rewriting leaves no hop-by-hop header (nor one the
//!   `Connection` header named) and never drops the headers the proxy protects.
//! - [`proxy`]: raw client bytes (one or more requests, pipelined) through the whole proxy,
//!   in-process with real backends: no panic, no hang, every answer well-formed HTTP, and the
//!   proxy still serves a plain request on a new connection afterwards.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a panic is the report

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderMap, HeaderName, HeaderValue};
use strangler::compare::{Answer, Rules, Verdict, MAX_DIFFERENCES};
use strangler::headers;

/// Hop-by-hop fields (RFC 9110 §7.6.1, the obsolete ones, and h2c's settings): written out
/// here again, from the RFC, not imported, so the check does not share the code's mistakes.
/// (`Trailer` is end-to-end, RFC 9110 §6.6.2.)
const HOP_BY_HOP: [&str; 9] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "transfer-encoding",
    "upgrade",
    "http2-settings",
];
/// What a client must not be able to remove by naming it in `Connection`.
const PROTECTED: [&str; 6] = [
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-forwarded-host",
    "x-request-id",
    "via",
    "host",
];

/// routes.toml text: parse and validate never panic; every error is located inside the file.
pub fn config(data: &[u8]) {
    let Err(error) = strangler::config::load_bytes(Path::new("/nonexistent/routes.toml"), data)
    else {
        return;
    };
    let strangler::config::LoadError::Invalid { errors, .. } = &error else {
        panic!("load_bytes reported a non-validation error: {error}");
    };
    assert!(!errors.is_empty(), "invalid without a reason");
    let lines = String::from_utf8_lossy(data).lines().count().max(1);
    for e in errors {
        assert!(
            e.line >= 1 && e.line <= lines + 1,
            "line {} outside the file ({lines} lines): {}",
            e.line,
            e.message
        );
        assert!(
            e.col >= 1,
            "column {} at line {}: {}",
            e.col,
            e.line,
            e.message
        );
        assert!(!e.message.trim().is_empty(), "an error without a message");
    }
}

/// Two answers: `[status byte, flags, len_lo, len_hi, primary body..., shadow body...]`.
/// Flags pick the content encoding, a tolerance and a few ignore patterns.
pub fn compare(data: &[u8]) {
    let Some((head, rest)) = data.split_first_chunk::<4>() else {
        return;
    };
    let [status, flags, lo, hi] = *head;
    let split = usize::from(u16::from_le_bytes([lo, hi])).min(rest.len());
    let (a, b) = rest.split_at(split);
    let answer = |body: &[u8], status: u16| {
        let mut headers = HeaderMap::new();
        if flags & 1 != 0 {
            headers.insert("content-type", HeaderValue::from_static("application/json"));
        }
        if flags & 2 != 0 {
            headers.insert("content-encoding", HeaderValue::from_static("gzip"));
        }
        if flags & 4 != 0 {
            headers.insert("content-type", HeaderValue::from_static("application/grpc"));
            headers.insert("grpc-status", HeaderValue::from_static("0"));
        }
        Answer {
            status,
            headers,
            body: Bytes::copy_from_slice(body),
            trailers: None,
        }
    };
    let (s1, s2) = (200 + u16::from(status & 1), 200 + u16::from(status >> 7));
    let ignore = match flags >> 4 {
        0 => vec![],
        1 => vec!["/id"],
        2 => vec!["/*/id", "header:content-type"],
        _ => vec![""],
    };
    let rules = Rules {
        headers: vec![HeaderName::from_static("content-type")],
        ignore: ignore
            .into_iter()
            .map(strangler::compare::Pattern::parse)
            .collect(),
        tolerance: if flags & 8 != 0 { 0.01 } else { 0.0 },
        max_body: 1 << 16,
    };
    let (p, s) = (answer(a, s1), answer(b, s2));
    let forward = strangler::compare::compare(&p, &s, &rules);
    let backward = strangler::compare::compare(&s, &p, &rules);
    match (&forward, &backward) {
        (Verdict::Match, Verdict::Match) | (Verdict::Skipped(_), Verdict::Skipped(_)) => {}
        (
            Verdict::Mismatch {
                differences: x,
                total: tx,
            },
            Verdict::Mismatch {
                differences: y,
                total: ty,
            },
        ) => {
            assert!(x.len() <= MAX_DIFFERENCES, "{} differences", x.len());
            assert_eq!(tx, ty, "totals not symmetric");
            assert!(*tx >= x.len(), "a total of {tx} below the {} kept", x.len());
            assert!(
                x.len() == MAX_DIFFERENCES || x.len() == *tx,
                "{} kept of {tx} found",
                x.len()
            );
            let paths = |d: &[strangler::compare::Difference]| {
                d.iter().map(|d| d.path.clone()).collect::<Vec<_>>()
            };
            assert_eq!(paths(x), paths(y), "not symmetric");
            for (d, e) in x.iter().zip(y) {
                assert_eq!(d.primary, e.shadow, "values not swapped at {}", d.path);
                let size = serde_json::to_string(d).unwrap().len();
                assert!(size <= 4096, "a {size}-byte difference at {:.80}", d.path);
            }
        }
        _ => panic!("not symmetric: {forward:?} against {backward:?}"),
    }
    numbers_rule(a, b, flags, &forward);
}

/// A number outside the range of doubles (overflowing to infinity, or underflowing to zero
/// while not zero) is never equal to a different finite number, whatever the tolerance.
fn numbers_rule(a: &[u8], b: &[u8], flags: u8, verdict: &Verdict) {
    // No gzip, no gRPC, and no ignore pattern that covers the whole body (flags >> 4 >= 3).
    let plain_json = flags & 0b110 == 0 && flags >> 4 < 3;
    let number = |body: &[u8]| match serde_json::from_slice::<serde_json::Value>(body) {
        Ok(serde_json::Value::Number(n)) => Some(n),
        _ => None,
    };
    let (Some(x), Some(y)) = (number(a), number(b)) else {
        return;
    };
    if !plain_json {
        return;
    }
    let outside = |n: &serde_json::Number| {
        let t = n.as_str();
        let v: f64 = t.parse().unwrap_or(f64::NAN);
        let zero_digits = t
            .split(['e', 'E'])
            .next()
            .unwrap_or("")
            .bytes()
            .all(|c| matches!(c, b'0' | b'-' | b'.'));
        !v.is_finite() || (v == 0.0 && !zero_digits)
    };
    let finite_and_in_range = |n: &serde_json::Number| !outside(n);
    if (outside(&x) && finite_and_in_range(&y)) || (outside(&y) && finite_and_in_range(&x)) {
        assert!(
            matches!(verdict, Verdict::Mismatch { .. }),
            "{x} against {y}: {verdict:?}"
        );
    }
}

/// Header lines (`name: value`, one per line) as a client might send them; the first byte's
/// low bit says whether the request is an upgrade the route tunnels.
pub fn headers(data: &[u8]) {
    let Some((&flags, text)) = data.split_first() else {
        return;
    };
    let mut map = HeaderMap::new();
    for line in text.split(|&b| b == b'\n') {
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            continue;
        };
        let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(&line[..colon]),
            HeaderValue::from_bytes(line[colon + 1..].trim_ascii()),
        ) else {
            continue;
        };
        map.append(name, value);
    }
    let upgrade = flags & 1 != 0 && headers::is_upgrade(&map);
    let named: Vec<HeaderName> = map
        .get_all("connection")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .collect();
    let protected_before: Vec<(&str, Vec<HeaderValue>)> = PROTECTED
        .iter()
        .map(|&n| (n, map.get_all(n).iter().cloned().collect()))
        .collect();
    let uri: http::Uri = "/".parse().unwrap();
    let _ = headers::request_host(&map, &uri);
    let _ = headers::valid_request_id(&map);
    let _ = headers::valid_traceparent(&map);
    let _ = headers::accepts_trailers(&map);
    let _ = headers::via_has(&map, "strangler");

    let mut out = map.clone();
    headers::strip_hop_by_hop(&mut out, upgrade);
    for name in HOP_BY_HOP {
        let kept_for_upgrade = upgrade && (name == "upgrade" || name == "connection");
        assert!(
            kept_for_upgrade || !out.contains_key(name),
            "hop-by-hop {name} survived: {out:?}"
        );
    }
    if upgrade {
        assert_eq!(out.get("connection").unwrap(), "upgrade");
        assert_eq!(out.get("upgrade"), map.get("upgrade"));
    }
    for name in &named {
        let is_protected = PROTECTED.contains(&name.as_str());
        let kept_for_upgrade = upgrade && (name == "upgrade" || name == "connection");
        assert!(
            is_protected || kept_for_upgrade || !out.contains_key(name),
            "{name} was named in Connection and survived"
        );
    }
    for (name, values) in &protected_before {
        let now: Vec<HeaderValue> = out.get_all(*name).iter().cloned().collect();
        assert_eq!(&now, values, "protected {name} changed");
    }
    let before = out.get_all("x-forwarded-for").iter().count();
    let present = headers::Present::of(&out);
    headers::set_forwarded(
        &mut out,
        present,
        [127, 0, 0, 1].into(),
        "http",
        map.get("host"),
    );
    let xff: Vec<&HeaderValue> = out.get_all("x-forwarded-for").iter().collect();
    assert!(
        xff.len() == 1 || before > 0,
        "x-forwarded-for not set: {xff:?}"
    );
    if let Some(v) = xff.first() {
        assert!(
            v.as_bytes().ends_with(b"127.0.0.1") || before > 0,
            "client address not last"
        );
    }
    headers::append_via(&mut out, &HeaderValue::from_static("1.1 strangler"));
    assert!(headers::via_has(&out, "strangler"));
}

/// An in-process proxy with real backends, kept for the life of the process (AFL's persistent
/// mode runs many inputs per process). Client connections are in-memory pipes served by the
/// proxy's own HTTP/1.1 settings and request handler; only the backends are on sockets.
struct Harness {
    runtime: tokio::runtime::Runtime,
    state: Arc<strangler::state::State>,
}

fn harness() -> &'static Harness {
    static HARNESS: OnceLock<Harness> = OnceLock::new();
    HARNESS.get_or_init(|| {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let state = runtime.block_on(start());
        Harness { runtime, state }
    })
}

/// A backend that answers every request with its method, path and the size of its body.
async fn backend(name: &'static str) -> SocketAddr {
    use http_body_util::BodyExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(
                    move |req: http::Request<hyper::body::Incoming>| async move {
                        let (parts, body) = req.into_parts();
                        let len = body
                            .collect()
                            .await
                            .map(|b| b.to_bytes().len())
                            .unwrap_or(0);
                        let text = format!(
                        "{{\"backend\":\"{name}\",\"method\":\"{}\",\"path\":{:?},\"body\":{len}}}",
                        parts.method,
                        parts.uri.path()
                    );
                        let mut resp =
                            http::Response::new(http_body_util::Full::new(Bytes::from(text)));
                        resp.headers_mut()
                            .insert("content-type", HeaderValue::from_static("application/json"));
                        Ok::<_, std::convert::Infallible>(resp)
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                    .with_upgrades()
                    .await;
            });
        }
    });
    addr
}

/// Starts the proxy: a legacy backend, a shadowed route, a canary, a fallback, a guard.
async fn start() -> Arc<strangler::state::State> {
    let (legacy, users, feed) = (
        backend("legacy").await,
        backend("users").await,
        backend("feed").await,
    );
    let text = format!(
        r#"[server]
listen = "127.0.0.1:0"
admin = "127.0.0.1:0"
watch = "off"
access_log = false
header_read_timeout = "1s"
max_request_body = "64KiB"
max_header_size = "16KiB"
drain_timeout = "1s"

[backends.legacy]
url = "http://{legacy}"
legacy = true
timeout = "2s"
[backends.users]
url = "http://{users}"
timeout = "2s"
[backends.feed]
url = "http://{feed}/v2"
timeout = "2s"

[[routes]]
prefix = "/api/users"
backend = "legacy"
shadow = "users"
shadow_methods = ["GET", "POST", "PUT"]
[routes.compare]
ignore = ["/path"]

[[routes]]
prefix = "/api/feed"
backend = "legacy"
canary = {{ backend = "feed", percent = 50, sticky = "header:x-user-id" }}

[[routes]]
prefix = "/api/workouts"
methods = ["GET", "POST"]
backend = "users"
fallback = "legacy"
upgrades = ["foo"]
[routes.guard]
max_error_rate = 0.5
min_requests = 10

[[routes]]
prefix = "/"
backend = "legacy"
"#
    );
    let loaded = strangler::config::load_bytes(Path::new("routes.toml"), text.as_bytes())
        .unwrap_or_else(|e| panic!("the fuzz configuration is invalid: {e}"));
    let server = strangler::Server::bind(loaded).await.unwrap();
    let state = server.state();
    state
        .ready
        .store(true, std::sync::atomic::Ordering::Release);
    state
}

/// Sends `bytes` on a new connection, closes the writing side, and reads what comes back
/// until the proxy closes (bounded in time: a proxy that hangs is a finding). The connection
/// supports half-closure, so every complete request sent is answered before it closes.
async fn exchange(state: &Arc<strangler::state::State>, bytes: &[u8]) -> Vec<u8> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (mut client, server) = tokio::io::duplex(1 << 16);
    let peer = SocketAddr::from(([127, 0, 0, 1], 40000));
    let state = state.clone();
    let svc = hyper::service::service_fn(move |req| {
        let state = state.clone();
        async move {
            Ok::<_, std::convert::Infallible>(
                strangler::proxy::handle(state, req, peer, None).await,
            )
        }
    });
    let limits = strangler::server::ListenerLimits::from(&harness().state.settings);
    let mut builder = strangler::server::http1_builder(&limits);
    builder.half_close(true);
    let conn = tokio::spawn(async move {
        let _ = builder
            .serve_connection(hyper_util::rt::TokioIo::new(server), svc)
            .with_upgrades()
            .await;
    });
    let mut out = Vec::new();
    let done = tokio::time::timeout(Duration::from_secs(5), async {
        // The proxy may stop reading early (a refused request): not a finding.
        let _ = client.write_all(bytes).await;
        let _ = client.shutdown().await;
        let mut buf = [0u8; 8192];
        loop {
            match client.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    conn.abort();
    assert!(
        done.is_ok(),
        "the proxy neither answered nor closed within 5 s; got {:?}",
        String::from_utf8_lossy(&out[..out.len().min(512)])
    );
    out
}

/// Raw client bytes through the whole proxy.
pub fn proxy(data: &[u8]) {
    let h = harness();
    h.runtime.block_on(async {
        let out = exchange(&h.state, data).await;
        // Whatever came back is a sequence of HTTP/1.x answers, each with a status line.
        if !out.is_empty() {
            assert!(
                out.starts_with(b"HTTP/1.1 ") || out.starts_with(b"HTTP/1.0 "),
                "not an HTTP answer: {:?}",
                String::from_utf8_lossy(&out[..out.len().min(256)])
            );
            let code = &out[9..out.len().min(12)];
            assert!(
                code.len() == 3 && code.iter().all(u8::is_ascii_digit) && code[0] != b'0',
                "bad status code {:?}",
                String::from_utf8_lossy(code)
            );
        }
        // And the proxy still serves.
        let after = exchange(
            &h.state,
            b"GET /api/users/7 HTTP/1.1\r\nhost: fittrack.example\r\nconnection: close\r\n\r\n",
        )
        .await;
        assert!(
            after.starts_with(b"HTTP/1.1 200 "),
            "a plain request after the input was not served: {:?}",
            String::from_utf8_lossy(&after[..after.len().min(256)])
        );
    });
}

//! Comparison on hard answers, end to end: two backends answering chosen bytes behind a
//! shadowed route, `/diffs`, `/routes` and the outcome counters read back. Trailer fields on
//! HTTP/1.1 and HTTP/2, numbers past the range of doubles, more differences than a report
//! keeps, and a millisecond timestamp from a backend that answers in microseconds. (Large
//! bodies that must not delay clients: `compare_latency.rs`, alone in its binary.)

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a panic is a failure report

mod support;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Response};
use http_body::{Body, Frame};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{json, Value};
use support::*;

fn shadowed(primary: SocketAddr, shadow: SocketAddr, backend_extra: &str, compare: &str) -> String {
    format!(
        "{}[backends.legacy]\nurl = \"http://{primary}\"\nlegacy = true\n{backend_extra}\n[backends.users]\nurl = \"http://{shadow}\"\n{backend_extra}\n[[routes]]\nprefix = \"/\"\nbackend = \"legacy\"\nshadow = \"users\"\n[routes.compare]\n{compare}\n",
        server("watch = \"off\"")
    )
}

/// A body of one data frame and, when given, trailer fields.
struct WithTrailers {
    data: Option<Bytes>,
    trailers: Option<HeaderMap>,
}

impl Body for WithTrailers {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if let Some(d) = self.data.take() {
            return Poll::Ready(Some(Ok(Frame::data(d))));
        }
        Poll::Ready(self.trailers.take().map(|t| Ok(Frame::trailers(t))))
    }
}

/// A cleartext HTTP/2 backend answering `body` as JSON, ending with `trailers` if any.
async fn h2_backend(body: &'static str, trailers: Option<(&'static str, &'static str)>) -> Running {
    let (l, addr) = listener().await;
    let (tx, mut stop) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        loop {
            let (tcp, _) = tokio::select! {
                _ = &mut stop => return,
                r = l.accept() => r.unwrap(),
            };
            tokio::spawn(async move {
                let svc = service_fn(move |_req: Request<Incoming>| async move {
                    let trailers = trailers.map(|(k, v)| {
                        let mut t = HeaderMap::new();
                        t.insert(k, HeaderValue::from_static(v));
                        t
                    });
                    let mut resp = Response::new(WithTrailers {
                        data: Some(Bytes::from_static(body.as_bytes())),
                        trailers,
                    });
                    resp.headers_mut()
                        .insert("content-type", HeaderValue::from_static("application/json"));
                    Ok::<_, Infallible>(resp)
                });
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
    Running {
        addr,
        stop: Some(tx),
    }
}

const ADA: &str = r#"{"user":{"email":"Ada@FitTrack.example","id":1}}"#;
const ADA_LOWER: &str = r#"{"user":{"email":"ada@fittrack.example","id":1}}"#;

fn chunked_with_trailer(body: &str, checksum: &str) -> &'static [u8] {
    let text = format!(
        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\ntrailer: x-checksum\r\n\r\n{:x}\r\n{body}\r\n0\r\nx-checksum: {checksum}\r\n\r\n",
        body.len()
    );
    Box::leak(text.into_boxed_str()).as_bytes()
}

#[tokio::test]
async fn http1_answers_with_trailer_fields_are_compared() {
    // (primary, shadow, compare section, expected outcome, expected first difference)
    type Case = (
        &'static [u8],
        &'static [u8],
        &'static str,
        &'static str,
        Option<&'static str>,
    );
    let cases: [Case; 5] = [
        // A real body difference behind a primary's trailers: found, not skipped.
        (
            chunked_with_trailer(ADA, "a1"),
            json_answer(ADA_LOWER),
            "",
            "mismatch",
            Some("/user/email"),
        ),
        (
            chunked_with_trailer(ADA, "a1"),
            json_answer(ADA),
            "",
            "match",
            None,
        ),
        (
            json_answer(ADA),
            chunked_with_trailer(ADA, "a1"),
            "",
            "match",
            None,
        ),
        // Trailer fields follow the route's header rules.
        (
            chunked_with_trailer(ADA, "a1"),
            chunked_with_trailer(ADA, "b2"),
            "headers = [\"x-checksum\"]",
            "mismatch",
            Some("trailer:x-checksum"),
        ),
        (
            chunked_with_trailer(ADA, "a1"),
            chunked_with_trailer(ADA, "b2"),
            "headers = [\"x-checksum\"]\nignore = [\"header:x-checksum\"]",
            "match",
            None,
        ),
    ];
    for (i, (p, s, compare, outcome, first)) in cases.into_iter().enumerate() {
        let (primary, shadow) = (fixed_h1(p).await, fixed_h1(s).await);
        let proxy = Proxy::start(&shadowed(primary.addr, shadow.addr, "", compare)).await;
        for _ in 0..3 {
            let r = get(&proxy.url("/api/users/1")).await;
            assert_eq!(r.status, 200, "case {i}");
            assert_eq!(
                r.json()["user"]["email"],
                "Ada@FitTrack.example",
                "case {i}"
            );
        }
        let m = shadow_legs_ended(&proxy, 3.0, Duration::from_secs(20)).await;
        assert_eq!(shadow_outcome(&m, outcome), 3.0, "case {i}: {m}");
        if let Some(first) = first {
            let diffs = get(&proxy.admin_url("/diffs")).await.json();
            assert_eq!(
                diffs[0]["differences"][0]["path"], first,
                "case {i}: {diffs}"
            );
            assert_eq!(diffs[0]["total_differences"], 1, "case {i}: {diffs}");
        }
    }
}

#[tokio::test]
async fn http2_answers_with_trailer_fields_are_compared() {
    let primary = h2_backend(ADA, Some(("x-checksum", "a1"))).await;
    let same = h2_backend(ADA, Some(("x-checksum", "a1"))).await;
    let lower = h2_backend(ADA_LOWER, None).await;
    let other_sum = h2_backend(ADA, Some(("x-checksum", "b2"))).await;
    for (shadow, compare, outcome, first) in [
        (&same, "headers = [\"x-checksum\"]", "match", None),
        (&lower, "", "mismatch", Some("/user/email")),
        (
            &other_sum,
            "headers = [\"x-checksum\"]",
            "mismatch",
            Some("trailer:x-checksum"),
        ),
    ] {
        let proxy = Proxy::start(&shadowed(
            primary.addr,
            shadow.addr,
            "protocol = \"h2c\"",
            compare,
        ))
        .await;
        for _ in 0..3 {
            let r = get(&proxy.url("/api/users/1")).await;
            assert_eq!(r.status, 200);
        }
        let m = shadow_legs_ended(&proxy, 3.0, Duration::from_secs(20)).await;
        assert_eq!(shadow_outcome(&m, outcome), 3.0, "{compare}: {m}");
        if let Some(first) = first {
            let diffs = get(&proxy.admin_url("/diffs")).await.json();
            assert_eq!(diffs[0]["differences"][0]["path"], first, "{diffs}");
        }
    }
}

#[tokio::test]
async fn total_differences_counts_every_difference_and_numbers_never_overflow_into_a_match() {
    let items = |shift: usize, n: usize| {
        let v: Vec<Value> = (0..n).map(|i| json!({"id": i + shift})).collect();
        Box::leak(json!({"items": v}).to_string().into_boxed_str()) as &str
    };
    // (primary body, shadow body, compare section, total, kept)
    let cases: [(&str, &str, &str, u64, usize); 5] = [
        (items(0, 60), items(1, 60), "", 60, 20),
        // An array shifted by one: every item differs.
        (items(0, 3000), items(1, 3000), "", 3000, 20),
        (r#"{"n":1e400}"#, r#"{"n":1}"#, "tolerance = 0.01", 1, 1),
        (
            r#"{"n":1e400}"#,
            r#"{"n":1.797e308}"#,
            "tolerance = 0.01",
            1,
            1,
        ),
        (
            r#"{"n":-1e400}"#,
            r#"{"n":-1e401}"#,
            "tolerance = 0.5",
            1,
            1,
        ),
    ];
    for (p, s, compare, total, kept) in cases {
        let (primary, shadow) = (
            fixed_h1(json_answer(p)).await,
            fixed_h1(json_answer(s)).await,
        );
        let proxy = Proxy::start(&shadowed(primary.addr, shadow.addr, "", compare)).await;
        get(&proxy.url("/x")).await;
        let m = shadow_legs_ended(&proxy, 1.0, Duration::from_secs(20)).await;
        assert_eq!(
            shadow_outcome(&m, "mismatch"),
            1.0,
            "{compare} {p:.40}: {m}"
        );
        let diffs = get(&proxy.admin_url("/diffs")).await.json();
        assert_eq!(diffs[0]["total_differences"], total, "{p:.40}");
        assert_eq!(
            diffs[0]["differences"].as_array().unwrap().len(),
            kept,
            "{p:.40}"
        );
    }
    // The same overflowing value on both sides is equal.
    let (primary, shadow) = (
        fixed_h1(json_answer(r#"{"n":1e400}"#)).await,
        fixed_h1(json_answer(r#"{"n":10E399}"#)).await,
    );
    let proxy = Proxy::start(&shadowed(primary.addr, shadow.addr, "", "")).await;
    get(&proxy.url("/x")).await;
    assert_eq!(
        shadow_outcome(
            &shadow_legs_ended(&proxy, 1.0, Duration::from_secs(20)).await,
            "match"
        ),
        1.0
    );
}

/// A backend answering in microseconds with a timestamp of centisecond resolution (two calls
/// in a row mostly carry the same value), after waiting `delay`.
async fn timestamped(delay: Duration) -> Running {
    let (l, addr) = listener().await;
    let (tx, stop) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(legacy_stub::http::serve(
        l,
        move |_req, _| async move {
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            let now = std::time::SystemTime::now();
            let stamp = humantime::format_rfc3339_millis(now).to_string();
            // Centiseconds: drop the last digit of the milliseconds.
            let generated_at = format!("{}Z", &stamp[..stamp.len() - 2]);
            legacy_stub::http::json(
                http::StatusCode::OK,
                &json!({"generated_at": generated_at, "user": {"id": 7, "email": "ada@x"}}),
            )
        },
        async {
            let _ = stop.await;
        },
    ));
    Running {
        addr,
        stop: Some(tx),
    }
}

#[tokio::test]
async fn a_timestamp_that_rarely_differs_between_two_calls_is_learned_before_it_counts() {
    // The shadow answers 15 ms later: its timestamp always differs from the primary's, while
    // the primary's noise samples (sent beside the shadow copy) almost never see it move.
    let primary = timestamped(Duration::ZERO).await;
    let shadow = timestamped(Duration::from_millis(15)).await;
    let proxy = Proxy::start(&shadowed(primary.addr, shadow.addr, "", "noise = true")).await;
    for _ in 0..40 {
        assert_eq!(get(&proxy.url("/api/users/7")).await.status, 200);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let m = shadow_legs_ended(&proxy, 40.0, Duration::from_secs(20)).await;
    let route = route_json(&proxy, "/").await;
    assert_eq!(
        shadow_outcome(&m, "mismatch"),
        0.0,
        "{}",
        get(&proxy.admin_url("/diffs")).await.text()
    );
    assert_eq!(shadow_outcome(&m, "match"), 40.0, "{m}");
    assert_eq!(route["learned_noise"], json!(["/generated_at"]));
    // A real difference is still one, confirmed once and then counted at once.
    let buggy = fixed_h1(json_answer(
        r#"{"generated_at":"x","user":{"id":7,"email":"ADA@X"}}"#,
    ))
    .await;
    let compare = "noise = true\nignore = [\"header:content-type\"]";
    let proxy = Proxy::start(&shadowed(primary.addr, buggy.addr, "", compare)).await;
    for _ in 0..5 {
        get(&proxy.url("/api/users/7")).await;
    }
    let m = shadow_legs_ended(&proxy, 5.0, Duration::from_secs(20)).await;
    assert_eq!(shadow_outcome(&m, "mismatch"), 5.0, "{m}");
    let diffs = get(&proxy.admin_url("/diffs")).await.json();
    assert_eq!(diffs[0]["differences"][0]["path"], "/user/email", "{diffs}");
    assert_eq!(diffs[0]["total_differences"], 1, "{diffs}");
}

//! W3C trace context: started when absent, passed on when valid, shared by both legs.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a panic is a failure report

mod support;

use std::time::Duration;

use bytes::Bytes;
use http::Method;
use support::*;

#[tokio::test]
async fn a_trace_is_started_and_shared_by_the_primary_and_shadow_legs() {
    let legacy = start_echo("legacy").await;
    let (l, shadow_addr) = listener().await;
    // A shadow backend that reports the traceparent it saw.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    let (_stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(legacy_stub::http::serve(
        l,
        move |req: http::Request<hyper::body::Incoming>, _| {
            let tx = tx.clone();
            async move {
                let tp = req
                    .headers()
                    .get("traceparent")
                    .map(|v| v.to_str().unwrap().to_string())
                    .unwrap_or_default();
                let _ = tx.send(tp);
                legacy_stub::http::json(http::StatusCode::OK, &serde_json::json!({}))
            }
        },
        async {
            let _ = stopped.await;
        },
    ));
    let proxy = Proxy::start(&format!("{}[backends.users]\nurl = \"http://{shadow_addr}\"\n[[routes]]\nprefix = \"/\"\nbackend = \"legacy\"\nshadow = \"users\"\n", legacy_at(legacy.addr))).await;
    // No trace: one is started.
    let r = get(&proxy.url("/x")).await;
    let primary = r.json()["headers"]["traceparent"][0]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        primary.starts_with("00-") && primary.ends_with("-01") && primary.len() == 55,
        "{primary}"
    );
    let shadow = tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(shadow, primary, "both legs are one trace");
    // A valid trace is passed on untouched, with its tracestate.
    let given = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let r = send_with(
        Method::GET,
        &proxy.url("/x"),
        &[("traceparent", given), ("tracestate", "vendor=abc")],
        Bytes::new(),
    )
    .await;
    assert_eq!(r.json()["headers"]["traceparent"][0], given);
    assert_eq!(r.json()["headers"]["tracestate"][0], "vendor=abc");
    assert_eq!(
        tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .unwrap()
            .unwrap(),
        given
    );
    // A malformed one is replaced (and its tracestate dropped with it).
    let r = send_with(
        Method::GET,
        &proxy.url("/x"),
        &[("traceparent", "garbage"), ("tracestate", "vendor=abc")],
        Bytes::new(),
    )
    .await;
    let replaced = r.json()["headers"]["traceparent"][0]
        .as_str()
        .unwrap()
        .to_string();
    assert_ne!(replaced, "garbage");
    assert_eq!(replaced.len(), 55);
    assert!(r.json()["headers"].get("tracestate").is_none());
}

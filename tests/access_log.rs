//! The access log. One test with a process-wide subscriber: tracing caches callsite interest
//! per process, so log-capturing tests must not share a binary with tests that log nowhere.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a panic is a failure report

mod support;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::Method;
use serde_json::Value;
use support::*;

/// A log sink for tracing's JSON formatter.
#[derive(Clone, Default)]
struct Sink(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Sink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Sink {
    fn text(&self) -> String {
        String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
    }
    fn access_events(&self) -> Vec<Value> {
        self.text()
            .lines()
            .map(|l| serde_json::from_str::<Value>(l).unwrap())
            .filter(|v| v["target"] == "strangler::access")
            .collect()
    }
}

#[tokio::test]
async fn one_access_event_per_request_without_secrets_and_none_when_off() {
    let sink = Sink::default();
    let writer = sink.clone();
    tracing_subscriber::fmt()
        .json()
        .with_env_filter("info")
        .with_writer(move || writer.clone())
        .init();
    let legacy = start_echo("legacy").await;
    let proxy = Proxy::start(&legacy_route(legacy.addr, "/api")).await;
    let r = send_with(
        Method::GET,
        &proxy.url("/api/users?token=s3cret"),
        &[
            ("authorization", "Bearer s3cret"),
            ("cookie", "session=s3cret"),
        ],
        Bytes::new(),
    )
    .await;
    assert_eq!(r.status, 200);
    let id = r.headers["x-request-id"].to_str().unwrap().to_string();
    assert_eq!(get(&proxy.url("/nowhere")).await.status, 404);
    let events = eventually(Duration::from_secs(5), || async {
        let e = sink.access_events();
        (e.len() >= 2).then_some(e)
    })
    .await;
    assert_eq!(events.len(), 2, "{events:#?}");
    let f = &events[0]["fields"];
    assert_eq!(f["method"], "GET");
    assert_eq!(f["path"], "/api/users", "no query string in the log");
    assert_eq!(f["route"], "/api");
    assert_eq!(f["backend"], "legacy");
    assert_eq!(f["status"], 200);
    assert_eq!(f["request_id"], id.as_str());
    assert_eq!(f["bytes"], r.body.len());
    assert_eq!(f["outcome"], "complete");
    assert_eq!(f["shadowed"], false);
    assert!(f["duration_ms"].as_f64().unwrap() >= 0.0);
    let g = &events[1]["fields"];
    assert_eq!(g["status"], 404);
    assert_eq!(g["route"], "none");
    assert!(
        !sink.text().contains("s3cret"),
        "a secret reached the log:\n{}",
        sink.text()
    );

    // `access_log = false`: no access events at all.
    let quiet = proxy_to_with(legacy.addr, "", "access_log = false").await;
    for _ in 0..5 {
        assert_eq!(get(&quiet.url("/x")).await.status, 200);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        sink.access_events().len(),
        2,
        "the quiet proxy logged requests"
    );
}

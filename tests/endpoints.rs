//! Resilient upstreams: several endpoints balanced by in-flight count, passive ejection and
//! recovery, retries inside a budget, active health checks.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a panic is a failure report

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use http::Method;
use serde_json::Value;
use support::*;

const SERVER: &str =
    "[server]\nlisten = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\nwatch = \"off\"\n";

fn cfg(endpoints: &[SocketAddr], extra: &str) -> String {
    let list: Vec<String> = endpoints.iter().map(|a| format!("\"{a}\"")).collect();
    format!("{SERVER}[backends.legacy]\nurl = \"http://{}\"\nlegacy = true\nendpoints = [{}]\nconnect_timeout = \"500ms\"\n{extra}\n[[routes]]\nprefix = \"/\"\nbackend = \"legacy\"\n", endpoints[0], list.join(", "))
}

async fn backend_state(proxy: &Proxy) -> Value {
    routes_json(proxy).await["backends"][0].clone()
}

async fn connect_errors(proxy: &Proxy) -> f64 {
    metric(
        &metrics_text(proxy).await,
        "strangler_upstream_errors_total",
        &[("backend", "legacy"), ("kind", "connect")],
    )
    .unwrap_or(0.0)
}

#[tokio::test]
async fn requests_are_spread_over_endpoints() {
    let a = start_echo("a").await;
    let b = start_echo("b").await;
    let proxy = Proxy::start(&cfg(&[a.addr, b.addr], "")).await;
    let mut seen_a = 0;
    for _ in 0..200 {
        seen_a += usize::from(get(&proxy.url("/x")).await.json()["backend"] == "a");
    }
    assert!((40..=160).contains(&seen_a), "a answered {seen_a} of 200");
    let state = backend_state(&proxy).await;
    assert_eq!(state["endpoints"].as_array().unwrap().len(), 2);
    assert_eq!(state["endpoints"][0]["healthy"], true);
}

#[tokio::test]
async fn a_failing_endpoint_is_ejected_retried_around_and_recovers() {
    let a = start_echo("a").await;
    let (dead_listener, dead) = listener().await;
    drop(dead_listener);
    let proxy = Proxy::start(&cfg(&[a.addr, dead], "retries = 2")).await;
    for _ in 0..40 {
        let r = get(&proxy.url("/x")).await;
        assert_eq!(r.status, 200, "a retry on the other endpoint answers");
        assert_eq!(r.json()["backend"], "a");
    }
    let state = backend_state(&proxy).await;
    assert_eq!(state["endpoints"][1]["ejected"], true, "{state}");
    let errors = connect_errors(&proxy).await;
    assert!(
        (3.0..10.0).contains(&errors),
        "ejected after 3 failures, then left alone: {errors} connect errors"
    );
    // The endpoint comes back: after its backoff it is tried again and serves.
    let back = tokio::net::TcpListener::bind(dead).await.unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(legacy_stub::http::serve(
        back,
        |_req, _| async {
            legacy_stub::http::json(http::StatusCode::OK, &serde_json::json!({"backend": "b"}))
        },
        async {
            let _ = rx.await;
        },
    ));
    eventually(Duration::from_secs(10), || async {
        (get(&proxy.url("/x")).await.json()["backend"] == "b").then_some(())
    })
    .await;
    assert_eq!(
        backend_state(&proxy).await["endpoints"][1]["ejected"],
        false
    );
    let _ = tx.send(());
}

#[tokio::test]
async fn the_retry_budget_holds_during_a_full_outage() {
    let (l1, d1) = listener().await;
    let (l2, d2) = listener().await;
    drop((l1, l2));
    let proxy = Proxy::start(&cfg(&[d1, d2], "retries = 3")).await;
    let n = 200.0;
    for _ in 0..200 {
        let r = get(&proxy.url("/x")).await;
        assert_eq!(r.status, 502);
        assert_eq!(r.json()["code"], "upstream_unavailable");
    }
    let attempts = connect_errors(&proxy).await;
    eprintln!("retry budget: {attempts} connect attempts for {n} requests with retries = 3");
    // Without the budget: 4 attempts a request (800). With it: one each, plus the 10 retries
    // the budget starts with, plus a fifth of the requests.
    assert!(
        attempts >= n && attempts <= n + 10.0 + n * 0.2 + 2.0,
        "{attempts} connect attempts for {n} requests"
    );
}

/// A connection that could not be made carried nothing: a POST goes to the next endpoint like
/// any request (as with nginx's `proxy_next_upstream error` and Envoy's `connect-failure`),
/// inside the same retry budget. (A POST that was written and lost is not sent again:
/// `tests/retries.rs`.)
#[tokio::test]
async fn a_post_that_never_left_is_retried_inside_the_budget() {
    let (l1, d1) = listener().await;
    let (l2, d2) = listener().await;
    drop((l1, l2));
    let proxy = Proxy::start(&cfg(&[d1, d2], "retries = 3")).await;
    for _ in 0..10 {
        let r = send_with(Method::POST, &proxy.url("/x"), &[], "{}").await;
        assert_eq!(r.status, 502);
    }
    let attempts = connect_errors(&proxy).await;
    // The budget starts with 10 retries and earns a fifth of one per request.
    assert!(
        (12.0..=10.0 + 10.0 + 2.0 + 1.0).contains(&attempts),
        "{attempts} attempts for 10 POSTs"
    );
}

#[tokio::test]
async fn active_health_checks_take_a_failing_endpoint_out_of_rotation() {
    let a = start_echo("a").await;
    let garbage = start_raw(Misbehave::Garbage).await;
    let proxy = Proxy::start(&cfg(
        &[a.addr, garbage.addr],
        "health = { path = \"/healthz\", interval = \"100ms\" }",
    ))
    .await;
    eventually(Duration::from_secs(5), || async {
        (backend_state(&proxy).await["endpoints"][1]["healthy"] == false).then_some(())
    })
    .await;
    assert_eq!(backend_state(&proxy).await["endpoints"][0]["healthy"], true);
    assert_eq!(backend_state(&proxy).await["health"]["path"], "/healthz");
    for _ in 0..50 {
        let r = get(&proxy.url("/x")).await;
        assert_eq!(r.status, 200);
        assert_eq!(r.json()["backend"], "a");
    }
}

//! Header hygiene end to end: hop-by-hop both ways, x-forwarded-*, via, request ids,
//! loop detection and the shadow marker.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a panic is a failure report

mod support;

use bytes::Bytes;
use http::Method;
use serde_json::Value;
use support::*;

async fn proxy_to_echo(extra_server: &str) -> (Proxy, Running) {
    let legacy = start_echo("legacy").await;
    let proxy = if extra_server.is_empty() {
        proxy_to(legacy.addr).await
    } else {
        proxy_to_with(legacy.addr, "", extra_server).await
    };
    (proxy, legacy)
}

fn seen(r: &Reply, name: &str) -> Vec<String> {
    let v = r.json();
    v["headers"][name]
        .as_array()
        .map(|a| a.iter().map(|x| x.as_str().unwrap().to_string()).collect())
        .unwrap_or_default()
}

#[tokio::test]
async fn request_headers_are_cleaned_and_forwarded_headers_set() {
    let (proxy, _legacy) = proxy_to_echo("").await;
    let r = send_with(
        Method::GET,
        &proxy.url("/api/users"),
        &[
            ("host", "api.fittrack.example"),
            (
                "connection",
                "keep-alive, x-client-secret, x-forwarded-for, x-request-id",
            ),
            ("x-client-secret", "must not pass"),
            ("keep-alive", "timeout=5"),
            ("te", "gzip, trailers"),
            ("proxy-authorization", "Basic eA=="),
            ("x-forwarded-for", "203.0.113.9"),
            ("x-forwarded-proto", "https"),
            ("x-strangler-shadow", "1"),
            ("x-request-id", "client-id-1"),
            ("authorization", "Bearer end-to-end"),
        ],
        Bytes::new(),
    )
    .await;
    assert_eq!(r.status, 200);
    let body = r.json();
    let headers = body["headers"].as_object().unwrap();
    for gone in [
        "connection",
        "x-client-secret",
        "keep-alive",
        "proxy-authorization",
        "x-strangler-shadow",
    ] {
        assert!(
            !headers.contains_key(gone),
            "{gone} reached the backend: {headers:?}"
        );
    }
    // TE is hop-by-hop: the proxy says only what it supports itself (it forwards trailers).
    assert_eq!(seen(&r, "te"), ["trailers"]);
    assert_eq!(seen(&r, "x-forwarded-for"), ["203.0.113.9, 127.0.0.1"]);
    assert_eq!(seen(&r, "x-forwarded-proto"), ["http"]);
    assert_eq!(seen(&r, "x-forwarded-host"), ["api.fittrack.example"]);
    assert_eq!(seen(&r, "host"), ["api.fittrack.example"]);
    assert_eq!(seen(&r, "x-request-id"), ["client-id-1"]);
    assert_eq!(seen(&r, "via"), ["1.1 strangler"]);
    assert_eq!(seen(&r, "authorization"), ["Bearer end-to-end"]);
    // Response side: the backend's hop-by-hop headers and what its Connection named are gone.
    assert!(r.headers.get("x-backend-secret").is_none());
    assert!(r.headers.get("keep-alive").is_none());
    assert_eq!(r.headers["x-backend"], "legacy");
    assert_eq!(r.headers["via"], "1.1 strangler");
    assert_eq!(r.headers["x-request-id"], "client-id-1");
}

#[tokio::test]
async fn request_ids_are_generated_when_absent_or_invalid() {
    let (proxy, _legacy) = proxy_to_echo("").await;
    for given in [None, Some("has spaces"), Some("x".repeat(129).as_str())] {
        let id = given.map(|g| ("x-request-id", g));
        let r = send_with(Method::GET, &proxy.url("/"), id.as_slice(), Bytes::new()).await;
        let returned = r.headers["x-request-id"].to_str().unwrap().to_string();
        assert_eq!(returned.len(), 32, "{given:?}");
        assert_eq!(
            seen(&r, "x-request-id"),
            [returned],
            "backend sees the same id"
        );
    }
}

#[tokio::test]
async fn a_request_that_already_passed_through_is_refused_508() {
    let (proxy, _legacy) = proxy_to_echo("").await;
    let r = send_with(
        Method::GET,
        &proxy.url("/"),
        &[("via", "1.1 edge, 1.1 strangler")],
        Bytes::new(),
    )
    .await;
    assert_eq!(r.status, 508);
    assert_eq!(r.json()["code"], "loop_detected");
    // Another proxy's name is fine and is kept.
    let r = send_with(
        Method::GET,
        &proxy.url("/"),
        &[("via", "1.1 edge")],
        Bytes::new(),
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(seen(&r, "via"), ["1.1 edge", "1.1 strangler"]);
}

#[tokio::test]
async fn via_name_and_trusted_shadow_header_are_configurable() {
    let (proxy, _legacy) =
        proxy_to_echo("via = \"strangler-edge\"\ntrust_shadow_header = true").await;
    let r = send_with(
        Method::GET,
        &proxy.url("/"),
        &[("x-strangler-shadow", "1"), ("via", "1.1 strangler")],
        Bytes::new(),
    )
    .await;
    assert_eq!(r.status, 200, "another strangler's name is not a loop");
    assert_eq!(seen(&r, "via"), ["1.1 strangler", "1.1 strangler-edge"]);
    assert_eq!(seen(&r, "x-strangler-shadow"), ["1"]);
}

#[tokio::test]
async fn garbage_header_values_do_not_break_the_proxy() {
    let (proxy, _legacy) = proxy_to_echo("").await;
    let bytes = b"GET / HTTP/1.1\r\nhost: x\r\nconnection: \xff\xfe, ,,\r\nx-forwarded-for: \xff\r\nvia: garbage-without-version\r\nx-request-id: \xc3\xa9\r\ncookie: ;;=;\r\n\r\n";
    let out = raw(proxy.addr, bytes, std::time::Duration::from_secs(2)).await;
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    let body: Value = serde_json::from_str(out.split("\r\n\r\n").nth(1).unwrap()).unwrap();
    assert_eq!(
        body["headers"]["x-request-id"][0].as_str().unwrap().len(),
        32
    );
    // Control characters are refused by the HTTP parser itself (400, connection closed).
    let out = raw(
        proxy.addr,
        b"GET / HTTP/1.1\r\nhost: x\r\nx-bad: a\x01b\r\n\r\n",
        std::time::Duration::from_secs(2),
    )
    .await;
    assert!(out.starts_with("HTTP/1.1 400"), "{out}");
}

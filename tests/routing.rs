//! Routing end to end: longest prefix, filters, 404 JSON, base paths, byte-exact targets.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a panic is a failure report

mod support;

use bytes::Bytes;
use http::Method;
use support::*;

#[tokio::test]
async fn routes_by_longest_prefix_and_filters() {
    let legacy = start_echo("legacy").await;
    let users = start_echo("users").await;
    let admin_api = start_echo("admin-api").await;
    let proxy = Proxy::start(&format!(
        "{}[backends.users]\nurl = \"http://{}\"\n[backends.adminapi]\nurl = \"http://{}\"\n\
         [[routes]]\nprefix = \"/api/users\"\nbackend = \"users\"\n\
         [[routes]]\nprefix = \"/api/users\"\nmethods = [\"DELETE\"]\nbackend = \"legacy\"\n\
         [[routes]]\nprefix = \"/api\"\nhost = \"admin.fittrack.example\"\nbackend = \"adminapi\"\n\
         [[routes]]\nprefix = \"/\"\nbackend = \"legacy\"\n",
        legacy_at(legacy.addr),
        users.addr,
        admin_api.addr
    ))
    .await;
    let cases = [
        (Method::GET, "/api/users", None, "users"),
        (Method::GET, "/api/users/7", None, "users"),
        (Method::GET, "/api/usersettings", None, "legacy"),
        (Method::DELETE, "/api/users/7", None, "legacy"),
        (
            Method::GET,
            "/api/workouts",
            Some("admin.fittrack.example"),
            "admin-api",
        ),
        (
            Method::GET,
            "/api/users/1",
            Some("admin.fittrack.example"),
            "users",
        ),
        (
            Method::GET,
            "/api/workouts",
            Some("www.fittrack.example"),
            "legacy",
        ),
    ];
    for (method, path, host, want) in cases {
        let host_header = host.map(|h| ("host", h));
        let r = send_with(
            method.clone(),
            &proxy.url(path),
            host_header.as_slice(),
            Bytes::new(),
        )
        .await;
        assert_eq!(r.backend(), want, "{method} {path} {host:?}");
    }
}

#[tokio::test]
async fn no_route_is_404_json() {
    let legacy = start_echo("legacy").await;
    let proxy = Proxy::start(&legacy_route(legacy.addr, "/api")).await;
    let r = send_with(
        Method::GET,
        &proxy.url("/other"),
        &[("x-request-id", "req-404")],
        Bytes::new(),
    )
    .await;
    assert_eq!(r.status, 404);
    assert_eq!(r.headers["content-type"], "application/json");
    assert_eq!(
        r.json(),
        serde_json::json!({"error": "no route for this request", "code": "no_route", "request_id": "req-404"})
    );
    assert_eq!(r.headers["x-request-id"], "req-404");
}

#[tokio::test]
async fn path_and_query_pass_byte_for_byte_and_join_the_base_path() {
    let legacy = start_echo("legacy").await;
    let users = start_echo("users").await;
    let proxy = Proxy::start(&format!(
        "{}[backends.users]\nurl = \"http://{}/v2/\"\n[[routes]]\nprefix = \"/api/users\"\nbackend = \"users\"\n[[routes]]\nprefix = \"/\"\nbackend = \"legacy\"\n",
        legacy_at(legacy.addr),
        users.addr
    ))
    .await;
    let odd = "/api/workouts/%7E%2Fa;b=c?q=%20x+y&z=1&z=2&empty=&%F0%9F%8F%83";
    let r = get(&proxy.url(odd)).await;
    assert_eq!(r.json()["path"], odd);
    let r = get(&proxy.url("/api/users/7?fields=name")).await;
    assert_eq!(r.json()["path"], "/v2/api/users/7?fields=name");
    assert_eq!(r.json()["backend"], "users");
}

#[tokio::test]
async fn malformed_targets_are_400_json() {
    let legacy = start_echo("legacy").await;
    let proxy = proxy_to(legacy.addr).await;
    let cases: [&[u8]; 6] = [
        b"GET /api/../admin HTTP/1.1\r\nhost: x\r\n\r\n",
        b"GET /api/%2e%2e/admin HTTP/1.1\r\nhost: x\r\n\r\n",
        b"OPTIONS * HTTP/1.1\r\nhost: x\r\n\r\n",
        b"CONNECT example.com:443 HTTP/1.1\r\nhost: example.com:443\r\n\r\n",
        b"GET / HTTP/1.1\r\nhost: a\r\nhost: b\r\n\r\n",
        b"GET / HTTP/1.1\r\n\r\n",
    ];
    for bytes in cases {
        let out = raw(proxy.addr, bytes, std::time::Duration::from_secs(2)).await;
        let shown = String::from_utf8_lossy(bytes);
        assert!(out.starts_with("HTTP/1.1 400"), "{shown:?} -> {out}");
        assert!(
            out.contains("\"code\":\"bad_request\""),
            "{shown:?} -> {out}"
        );
    }
    // HTTP/1.0 without Host is fine.
    let out = raw(
        proxy.addr,
        b"GET /x HTTP/1.0\r\n\r\n",
        std::time::Duration::from_secs(2),
    )
    .await;
    assert!(
        out.starts_with("HTTP/1.0 200") || out.starts_with("HTTP/1.1 200"),
        "{out}"
    );
}

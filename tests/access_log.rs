//! The access log: one `strangler::access` event per request, with the client's address (after
//! `trusted_proxies`), the route's auth and rate-limit outcomes and whether a stale copy
//! answered. Every test installs the one process-wide subscriber first (tracing caches callsite
//! interest per process, so log-capturing tests must not share a binary with tests that log
//! nowhere), and reads the events of its own paths only.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a panic is a failure report

mod support;

use std::sync::LazyLock;
use std::time::Duration;

use bytes::Bytes;
use http::Method;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use support::jwt::{secret_dir, ISSUER, SECRET};
use support::log::Sink;
use support::*;

/// Every log line at info and above, as JSON.
static LOG: LazyLock<Sink> = LazyLock::new(|| Sink::install("info"));

/// The fields of the one access event of `path` (waited for: it is emitted when the body
/// has gone out).
async fn logged(path: &str) -> Value {
    let events = eventually(Duration::from_secs(5), || async {
        let e: Vec<Value> = LOG
            .access_events_under(path)
            .into_iter()
            .filter(|e| e["fields"]["path"] == path)
            .collect();
        (!e.is_empty()).then_some(e)
    })
    .await;
    assert_eq!(events.len(), 1, "{path}: {events:#?}");
    events[0]["fields"].clone()
}

/// GET `path` on `proxy` with `headers`; its status.
async fn status_of(proxy: &Proxy, path: &str, headers: &[(&str, &str)]) -> u16 {
    send_with(Method::GET, &proxy.url(path), headers, Bytes::new())
        .await
        .status
        .as_u16()
}

#[tokio::test]
async fn one_access_event_per_request_without_secrets_and_none_when_off() {
    let sink = &*LOG;
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
    let f = logged("/api/users").await;
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
    // No trusted_proxies: the TCP peer; a route without auth, limits or stale copies.
    assert_eq!(f["client"], "127.0.0.1");
    assert_eq!(f["auth"], "none");
    assert_eq!(f["ratelimit"], "none");
    assert_eq!(f["stale"], false);
    let g = logged("/nowhere").await;
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
        assert_eq!(get(&quiet.url("/quiet")).await.status, 200);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        sink.access_events_under("/quiet").len(),
        0,
        "the quiet proxy logged requests"
    );
}

#[tokio::test]
async fn the_client_is_the_forwarded_address_only_behind_a_trusted_proxy() {
    LazyLock::force(&LOG);
    let legacy = start_echo("legacy").await;
    let proxy_with = |trusted: &str, prefix: &str| {
        format!(
            "{}{}",
            server(&format!("trusted_proxies = {trusted}")),
            legacy_route(legacy.addr, prefix)
        )
    };

    // The peer (127.0.0.1) is trusted: X-Forwarded-For walked from the right, trusted hops
    // skipped, the first untrusted address is the client.
    let trusted = Proxy::start(&proxy_with(r#"["127.0.0.1/32", "10.0.0.0/8"]"#, "/trusted")).await;
    for (path, xff, client) in [
        ("/trusted/none", None, "127.0.0.1"),
        ("/trusted/one", Some("203.0.113.7"), "203.0.113.7"),
        (
            "/trusted/hops",
            Some("198.51.100.1, 203.0.113.7, 10.0.0.5"),
            "203.0.113.7",
        ),
        ("/trusted/all", Some("10.0.0.9, 10.0.0.5"), "10.0.0.9"),
        (
            "/trusted/garbage",
            Some("203.0.113.7, garbage, 10.0.0.5"),
            "10.0.0.5",
        ),
        ("/trusted/port", Some("[2001:db8::1]:4711"), "2001:db8::1"),
    ] {
        let headers: Vec<(&str, &str)> = xff.map(|x| ("x-forwarded-for", x)).into_iter().collect();
        assert_eq!(status_of(&trusted, path, &headers).await, 200);
        assert_eq!(
            logged(path).await["client"],
            client,
            "X-Forwarded-For: {xff:?}"
        );
    }

    // The peer is not trusted: a spoofed X-Forwarded-For is ignored.
    let untrusted = Proxy::start(&proxy_with(r#"["10.0.0.0/8"]"#, "/untrusted")).await;
    for (path, xff) in [
        ("/untrusted/one", "203.0.113.7"),
        ("/untrusted/hops", "203.0.113.7, 10.0.0.5"),
    ] {
        assert_eq!(
            status_of(&untrusted, path, &[("x-forwarded-for", xff)]).await,
            200
        );
        assert_eq!(
            logged(path).await["client"],
            "127.0.0.1",
            "X-Forwarded-For: {xff}"
        );
    }
}

/// The audience of the test provider.
const AUDIENCE: &str = "log";

/// An HS256 token of the test issuer signed with `secret`, expiring `secs` from now (in the
/// past when negative).
fn token(secret: &str, secs: i64) -> String {
    let now = support::jwt::now() as i64;
    let claims =
        json!({"iss": ISSUER, "aud": AUDIENCE, "sub": "ada", "iat": now - 7200, "exp": now + secs});
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

#[tokio::test]
async fn auth_and_rate_limit_outcomes_are_logged_without_the_token() {
    LazyLock::force(&LOG);
    let legacy = start_echo("legacy").await;
    let text = format!(
        "{SERVER}{}[auth.fittrack]\nissuer = \"{ISSUER}\"\naudiences = [\"{AUDIENCE}\"]\nalgorithms = [\"HS256\"]\nsecret_file = \"secret\"\n{}{}{}{}{}{}",
        backend("legacy", legacy.addr),
        route("/auth/required", "legacy", "auth = \"fittrack\""),
        route(
            "/auth/scoped",
            "legacy",
            "auth = { provider = \"fittrack\", require = { scope = \"users:write\" } }"
        ),
        route(
            "/auth/observe",
            "legacy",
            "auth = { provider = \"fittrack\", mode = \"observe\" }"
        ),
        route(
            "/auth/optional",
            "legacy",
            "auth = { provider = \"fittrack\", mode = \"optional\" }"
        ),
        route("/auth/open", "legacy", ""),
        route("/auth/limited", "legacy", "rate_limit = { limit = 1, per = \"1m\" }"),
    );
    let proxy = Proxy::start_in(secret_dir(SECRET), &text).await;
    let valid = token(SECRET, 600);
    let expired = token(SECRET, -3600);
    let forged = token("another-secret-of-32-bytes-and-more!", 600);
    let bearer = |t: &str| format!("Bearer {t}");
    let (valid_b, expired_b, forged_b) = (bearer(&valid), bearer(&expired), bearer(&forged));

    // (path, authorization, status, backend, auth)
    let cases: [(&str, Option<&str>, u16, &str, &str); 11] = [
        ("/auth/required/ok", Some(&valid_b), 200, "legacy", "ok"),
        ("/auth/required/missing", None, 401, "none", "missing"),
        (
            "/auth/required/expired",
            Some(&expired_b),
            401,
            "none",
            "expired",
        ),
        (
            "/auth/required/forged",
            Some(&forged_b),
            401,
            "none",
            "bad_signature",
        ),
        (
            "/auth/required/malformed",
            Some("Bearer a b"),
            400,
            "none",
            "malformed",
        ),
        (
            "/auth/scoped/x",
            Some(&valid_b),
            403,
            "none",
            "insufficient_scope",
        ),
        // Observe: forwarded, logged with what enforcement would have said.
        ("/auth/observe/missing", None, 200, "legacy", "missing"),
        (
            "/auth/observe/expired",
            Some(&expired_b),
            200,
            "legacy",
            "expired",
        ),
        ("/auth/observe/ok", Some(&valid_b), 200, "legacy", "ok"),
        ("/auth/optional/x", None, 200, "legacy", "anonymous"),
        // A route without auth: no outcome, whatever the request carries.
        ("/auth/open/x", Some(&valid_b), 200, "legacy", "none"),
    ];
    for (path, authorization, status, backend, auth) in cases {
        let headers: Vec<(&str, &str)> = authorization
            .map(|a| ("authorization", a))
            .into_iter()
            .collect();
        assert_eq!(status_of(&proxy, path, &headers).await, status, "{path}");
        let f = logged(path).await;
        assert_eq!(f["auth"], auth, "{path}: {f}");
        assert_eq!(f["status"], status, "{path}: {f}");
        assert_eq!(f["backend"], backend, "{path}: {f}");
        assert_eq!(f["ratelimit"], "none", "{path}: {f}");
    }

    // An enforced window: the first request allowed, the second limited before any backend.
    assert_eq!(status_of(&proxy, "/auth/limited/first", &[]).await, 200);
    assert_eq!(status_of(&proxy, "/auth/limited/second", &[]).await, 429);
    let first = logged("/auth/limited/first").await;
    assert_eq!(
        (&first["ratelimit"], &first["backend"], &first["auth"]),
        (&json!("allowed"), &json!("legacy"), &json!("none")),
        "{first}"
    );
    let second = logged("/auth/limited/second").await;
    assert_eq!(
        (&second["ratelimit"], &second["backend"], &second["status"]),
        (&json!("limited"), &json!("none"), &json!(429)),
        "{second}"
    );

    // Neither the tokens nor their signatures reach the log.
    let log = LOG.text();
    for t in [&valid, &expired, &forged] {
        let signature = t.rsplit('.').next().unwrap();
        assert!(!log.contains(signature), "a token reached the log:\n{log}");
    }
}

#[tokio::test]
async fn a_stale_answer_is_logged_as_stale() {
    LazyLock::force(&LOG);
    let origin = start_echo("origin").await;
    let origin_addr = origin.addr;
    let proxy = Proxy::start(&format!(
        "{}{}",
        backend("origin", origin.addr),
        route(
            "/stale",
            "origin",
            "stale_if_error = { max_stale = \"1h\" }"
        )
    ))
    .await;
    assert_eq!(status_of(&proxy, "/stale/item", &[]).await, 200);
    let live = logged("/stale/item").await;
    assert_eq!(
        (&live["status"], &live["stale"]),
        (&json!(200), &json!(false)),
        "{live}"
    );

    drop(origin);
    eventually(Duration::from_secs(5), || async {
        tokio::net::TcpStream::connect(origin_addr)
            .await
            .is_err()
            .then_some(())
    })
    .await;
    let r = send_with(
        Method::GET,
        &proxy.url("/stale/item?again"),
        &[],
        Bytes::new(),
    )
    .await;
    assert_eq!(
        r.headers.get("cache-status").map(|v| v.to_str().unwrap()),
        None,
        "another query was never stored"
    );
    assert_eq!(r.status, 502);
    // Its line is written before the next request is sent: the order below is the requests'.
    eventually(Duration::from_secs(5), || async {
        (LOG.access_events_under("/stale/item").len() == 2).then_some(())
    })
    .await;
    let r = get(&proxy.url("/stale/item")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.headers["cache-status"], "strangler; fwd=stale");
    let events = eventually(Duration::from_secs(5), || async {
        let e = LOG.access_events_under("/stale/item");
        (e.len() == 3).then_some(e)
    })
    .await;
    let seen: Vec<(Value, Value, Value)> = events
        .iter()
        .map(|e| {
            let f = &e["fields"];
            (
                f["status"].clone(),
                f["backend"].clone(),
                f["stale"].clone(),
            )
        })
        .collect();
    assert_eq!(
        seen,
        [
            (json!(200), json!("origin"), json!(false)),
            (json!(502), json!("origin"), json!(false)),
            (json!(200), json!("origin"), json!(true)),
        ],
        "{events:#?}"
    );
}

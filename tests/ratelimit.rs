//! Per-route rate limits, end to end: a real proxy and real backends on 127.0.0.1:0, real
//! requests. What is checked: the burst shape and the answer of a limited request (429,
//! `Retry-After`, `RateLimit-Policy`, `RateLimit`); keys kept apart (header, cookie, claim,
//! address) and keyless requests limited by address; forwarding headers believed only from
//! trusted proxies; dry runs (and the access log's `ratelimit`); several named windows; the key
//! bound under a flood of distinct keys; buckets across reloads; refused requests reaching no
//! backend and no shadow, and neither tripping the guard nor diluting its error rate; the config
//! errors, each at its line and column, all of them in one file. The `#[ignore]`d tests run real Redis servers
//! (Debian's `redis-server`) for `scope = "global"`: shared counting across three proxies, an
//! outage (paused, then killed) under each `on_error`, and the reconnection after a restart.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a panic is a failure report

mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::StreamExt;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use serde_json::{json, Value};
use support::jwt::{secret_dir, SECRET};
use support::log::Sink;
use support::*;

// -------------------------------------------------------------------------------- backends

/// A backend that counts what reaches it (read whole) and answers `{"backend": NAME}`.
struct Counted {
    addr: SocketAddr,
    hits: Arc<AtomicUsize>,
    _running: Running,
}

impl Counted {
    fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
}

async fn counted(name: &'static str) -> Counted {
    counted_with(name, |_| StatusCode::OK).await
}

/// [`counted`], answering with the status `status(path)`.
async fn counted_with(name: &'static str, status: fn(&str) -> StatusCode) -> Counted {
    let (l, addr) = listener().await;
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let hits = Arc::new(AtomicUsize::new(0));
    let h = hits.clone();
    tokio::spawn(legacy_stub::http::serve(
        l,
        move |req: Request<hyper::body::Incoming>, _| {
            let hits = h.clone();
            async move {
                let status = status(req.uri().path());
                let _ = req.into_body().collect().await;
                hits.fetch_add(1, Ordering::SeqCst);
                legacy_stub::http::json(status, &json!({ "backend": name }))
            }
        },
        async move {
            let _ = rx.await;
        },
    ));
    Counted {
        addr,
        hits,
        _running: Running {
            addr,
            stop: Some(tx),
        },
    }
}

// ---------------------------------------------------------------------------------- config

/// `[server]` on port 0, no watching, with `extra` lines.
fn server_with(extra: &str) -> String {
    format!("{SERVER}{extra}\n")
}

/// `[server]`, the backend `legacy` at `addr`, and the route `/api` to it with `rest` lines.
fn one_route(addr: SocketAddr, rest: &str) -> String {
    format!(
        "{SERVER}{}{}",
        backend("legacy", addr),
        route("/api", "legacy", rest)
    )
}

// ---------------------------------------------------------------------------------- log

static LOG: LazyLock<Sink> = LazyLock::new(|| Sink::install("strangler::access=info"));

fn init() {
    LazyLock::force(&LOG);
}

/// The access log events of requests to `path`, in the order written.
fn access_events(path: &str) -> Vec<Value> {
    LOG.access_events(path)
}

// ---------------------------------------------------------------------------------- calls

/// GET `path` on the proxy with `headers`.
async fn call(proxy: &Proxy, path: &str, headers: &[(&str, &str)]) -> Reply {
    send_with(Method::GET, &proxy.url(path), headers, Bytes::new()).await
}

/// `n` GETs, one after another; their statuses.
async fn statuses(proxy: &Proxy, path: &str, headers: &[(&str, &str)], n: usize) -> Vec<u16> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        out.push(call(proxy, path, headers).await.status.as_u16());
    }
    out
}

fn header(r: &Reply, name: &str) -> Option<String> {
    r.headers.get(name).map(|v| v.to_str().unwrap().to_string())
}

/// A refusal in the contract's shape: 429, code `rate_limited`, a request id that matches
/// `X-Request-ID`, and a `Retry-After` of at least one whole second. Returns `Retry-After`.
fn assert_limited(what: &str, r: &Reply) -> u64 {
    assert_eq!(r.status, 429, "{what}: {}", r.text());
    let body = r.json();
    assert_eq!(body["code"], "rate_limited", "{what}: {body}");
    assert!(
        body["error"].as_str().is_some_and(|e| !e.is_empty()),
        "{what}: {body}"
    );
    assert!(
        body["request_id"].as_str().is_some_and(|s| !s.is_empty()),
        "{what}: {body}"
    );
    assert_eq!(
        header(r, "x-request-id").as_deref(),
        body["request_id"].as_str(),
        "{what}"
    );
    let retry = header(r, "retry-after").unwrap_or_else(|| panic!("{what}: no Retry-After"));
    let secs: u64 = retry
        .parse()
        .unwrap_or_else(|_| panic!("{what}: Retry-After {retry:?} is not whole seconds"));
    assert!(secs >= 1, "{what}: Retry-After {secs}");
    secs
}

/// `strangler_ratelimit_total{route, policy, outcome}` (0 when absent).
fn rl_count(m: &str, route: &str, policy: &str, outcome: &str) -> f64 {
    metric(
        m,
        "strangler_ratelimit_total",
        &[("route", route), ("policy", policy), ("outcome", outcome)],
    )
    .unwrap_or(0.0)
}

/// `strangler_requests_total{route, backend, status}` (0 when absent).
fn requests(m: &str, route: &str, backend: &str, status: &str) -> f64 {
    metric(
        m,
        "strangler_requests_total",
        &[("route", route), ("backend", backend), ("status", status)],
    )
    .unwrap_or(0.0)
}

// ---------------------------------------------------------------------------------- 1

#[tokio::test]
async fn a_burst_passes_at_once_then_429_says_the_policy_and_when_to_retry() {
    init();
    let legacy = counted("legacy").await;
    // 2 per second sustained (one every 500 ms), bursts of 3.
    let text = one_route(
        legacy.addr,
        "rate_limit = { limit = 2, per = \"1s\", burst = 3 }",
    );
    let proxy = Proxy::start(&text).await;
    let start = Instant::now();
    let mut replies = Vec::new();
    for _ in 0..4 {
        replies.push(call(&proxy, "/api/x", &[]).await);
    }
    let took = start.elapsed();
    // The exact values below hold while the four requests take less than one refill (500 ms).
    assert!(
        took < Duration::from_millis(450),
        "four requests took {took:?}"
    );
    let policy = "\"default\";q=2;w=1";
    // remaining after each; seconds until the bucket is full again (0.5, 1.0, 1.5 s, less
    // the time since the first request, rounded up).
    for (i, (r, t)) in [(2, 1), (1, 1), (0, 2)].into_iter().enumerate() {
        let reply = &replies[i];
        assert_eq!(reply.status, 200, "request {}: {}", i + 1, reply.text());
        assert_eq!(header(reply, "ratelimit-policy").as_deref(), Some(policy));
        assert_eq!(
            header(reply, "ratelimit"),
            Some(format!("\"default\";r={r};t={t}")),
            "request {}",
            i + 1
        );
        assert_eq!(header(reply, "retry-after"), None);
    }
    let limited = &replies[3];
    let retry = assert_limited("the fourth request", limited);
    // The next slot opens 500 ms after the first request's: rounded up, one second.
    assert_eq!(retry, 1);
    assert_eq!(header(limited, "ratelimit-policy").as_deref(), Some(policy));
    assert_eq!(
        header(limited, "ratelimit").as_deref(),
        Some("\"default\";r=0;t=2")
    );
    assert_eq!(legacy.hits(), 3, "the limited request reached the backend");

    let m = metrics_text(&proxy).await;
    assert_eq!(rl_count(&m, "/api", "default", "allowed"), 3.0, "{m}");
    assert_eq!(rl_count(&m, "/api", "default", "limited"), 1.0, "{m}");
    assert_eq!(rl_count(&m, "/api", "default", "would_limit"), 0.0, "{m}");
    assert_eq!(requests(&m, "/api", "legacy", "200"), 3.0, "{m}");
    assert_eq!(requests(&m, "/api", "none", "429"), 1.0, "{m}");

    // Retry-After is honest: once it has passed, a request passes.
    tokio::time::sleep(Duration::from_secs(retry)).await;
    let r = call(&proxy, "/api/x", &[]).await;
    assert_eq!(r.status, 200, "after Retry-After: {}", r.text());
    assert_eq!(legacy.hits(), 4);
}

/// Requests for one new key, all at once: one bucket, whoever comes first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_first_requests_of_a_new_key_share_one_bucket() {
    init();
    let legacy = counted("legacy").await;
    let text = one_route(
        legacy.addr,
        "rate_limit = { limit = 1, per = \"1h\", burst = 2, key = \"header:x-key\" }",
    );
    let proxy = Proxy::start(&text).await;
    let client = client();
    let mut passed = Vec::new();
    for round in 0..100 {
        let key = format!("new-{round}");
        let got: Vec<u16> = futures_util::future::join_all((0..16).map(|_| {
            let req = Request::get(proxy.url("/api"))
                .header("x-key", &key)
                .body(Full::new(Bytes::new()))
                .unwrap();
            let client = client.clone();
            async move { client.request(req).await.unwrap().status().as_u16() }
        }))
        .await;
        passed.push(got.iter().filter(|&&s| s == 200).count());
    }
    assert!(
        passed.iter().all(|&n| n == 2),
        "passed per new key (burst 2): {passed:?}"
    );
    assert_eq!(legacy.hits(), 200);
}

/// A refused upload is answered without reading its body; the client's pooled connection
/// must still serve (or be closed cleanly before) its next request.
#[tokio::test]
async fn a_refused_upload_leaves_the_client_connection_usable() {
    init();
    let legacy = counted("legacy").await;
    let text = one_route(
        legacy.addr,
        "rate_limit = { limit = 1, per = \"1h\", burst = 1, key = \"header:x-key\" }",
    );
    let proxy = Proxy::start(&text).await;
    let client = client();
    let post = |key: &str, size: usize| {
        Request::post(proxy.url("/api"))
            .header("x-key", key)
            .body(Full::new(Bytes::from(vec![b'x'; size])))
            .unwrap()
    };
    for (i, size) in [0, 10, 100_000, 1_000_000].into_iter().enumerate() {
        let key = format!("upload-{i}");
        let first = client.request(post(&key, size)).await.unwrap();
        let status = first.status();
        let body = first.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(status, 200, "{size} bytes: {body:?}");
        let refused = client.request(post(&key, size)).await.unwrap();
        assert_eq!(refused.status(), 429, "{size} bytes");
        refused.into_body().collect().await.unwrap();
        // The next request on the same client (its pooled connection, if still open).
        let next = client
            .request(post(&format!("next-{i}"), 10))
            .await
            .unwrap_or_else(|e| panic!("after a refused {size}-byte upload: {e:?}"));
        assert_eq!(next.status(), 200, "after a refused {size}-byte upload");
        next.into_body().collect().await.unwrap();
    }
    assert_eq!(legacy.hits(), 8);
}

// ---------------------------------------------------------------------------------- 2

/// A proxy whose `/api` allows 2 at once, then 1 a minute, per `key`; behind a trusted proxy
/// (the test client on 127.0.0.1), so X-Forwarded-For sets the client's address.
async fn keyed_proxy(key: &str) -> (Counted, Proxy) {
    let legacy = counted("legacy").await;
    let text = format!(
        "{}{}{}",
        server_with("trusted_proxies = [\"127.0.0.1/32\"]"),
        backend("legacy", legacy.addr),
        route(
            "/api",
            "legacy",
            &format!("rate_limit = {{ limit = 1, per = \"1m\", burst = 2, key = \"{key}\" }}")
        ),
    );
    (legacy, Proxy::start(&text).await)
}

#[tokio::test]
async fn each_key_has_its_own_bucket_and_keyless_requests_share_their_address() {
    init();
    let (legacy, proxy) = keyed_proxy("header:x-api-key").await;
    let from = |ip: &'static str| ("x-forwarded-for", ip);
    for key in ["alice", "bob"] {
        assert_eq!(
            statuses(
                &proxy,
                "/api",
                &[("x-api-key", key), from("198.51.100.1")],
                3
            )
            .await,
            [200, 200, 429],
            "{key}"
        );
    }
    // Another address with alice's key is still alice.
    let r = call(
        &proxy,
        "/api",
        &[("x-api-key", "alice"), from("198.51.100.2")],
    )
    .await;
    assert_limited("alice from another address", &r);
    // Without the key: by address. 198.51.100.1 sent only keyed requests so far.
    assert_eq!(
        statuses(&proxy, "/api", &[from("198.51.100.1")], 3).await,
        [200, 200, 429],
        "keyless from 198.51.100.1"
    );
    // An empty value is no key either.
    let r = call(&proxy, "/api", &[("x-api-key", ""), from("198.51.100.1")]).await;
    assert_limited("an empty key from 198.51.100.1", &r);
    assert_eq!(
        call(&proxy, "/api", &[from("198.51.100.3")]).await.status,
        200,
        "keyless from another address"
    );
    // A key whose value is an address is not that address's bucket.
    assert_eq!(
        statuses(&proxy, "/api", &[("x-api-key", "198.51.100.3")], 2).await,
        [200, 200]
    );
    assert_eq!(
        call(&proxy, "/api", &[from("198.51.100.3")]).await.status,
        200,
        "the address's own second request"
    );
    assert_eq!(legacy.hits(), 2 + 2 + 2 + 1 + 2 + 1);
    let m = metrics_text(&proxy).await;
    assert_eq!(rl_count(&m, "/api", "default", "allowed"), 10.0, "{m}");
    assert_eq!(rl_count(&m, "/api", "default", "limited"), 5.0, "{m}");
}

#[tokio::test]
async fn a_cookie_key_counts_each_value_and_requests_without_it_by_address() {
    init();
    let (legacy, proxy) = keyed_proxy("cookie:session").await;
    let from = |ip: &'static str| ("x-forwarded-for", ip);
    for session in ["session=a", "session=b"] {
        assert_eq!(
            statuses(
                &proxy,
                "/api",
                &[("cookie", session), from("198.51.100.1")],
                3
            )
            .await,
            [200, 200, 429],
            "{session}"
        );
    }
    // Session a from another address, among other cookies, or in a second Cookie line: a.
    for cookies in [
        &[
            ("cookie", "theme=dark; session=a; lang=en"),
            from("198.51.100.2"),
        ][..],
        &[
            ("cookie", "theme=dark"),
            ("cookie", "session=a"),
            from("198.51.100.2"),
        ][..],
    ] {
        assert_limited(
            &format!("{cookies:?}"),
            &call(&proxy, "/api", cookies).await,
        );
    }
    // Without the cookie: by address. 198.51.100.1 sent only keyed requests so far.
    assert_eq!(
        statuses(&proxy, "/api", &[from("198.51.100.1")], 3).await,
        [200, 200, 429],
        "no cookie from 198.51.100.1"
    );
    // Other cookies, an empty session, or cookies whose names merely contain it are no key:
    // the address's bucket, spent.
    for cookies in [
        "theme=dark",
        "session=",
        "xsession=a; session_id=a; Session=a",
    ] {
        let r = call(&proxy, "/api", &[("cookie", cookies), from("198.51.100.1")]).await;
        assert_limited(&format!("cookie {cookies:?} from 198.51.100.1"), &r);
    }
    // Another address without the cookie: its own bucket.
    assert_eq!(
        statuses(&proxy, "/api", &[from("198.51.100.3")], 1).await,
        [200]
    );
    // A session named like an address is not that address's bucket.
    assert_eq!(
        statuses(
            &proxy,
            "/api",
            &[("cookie", "session=198.51.100.3"), from("198.51.100.4")],
            2
        )
        .await,
        [200, 200]
    );
    assert_eq!(
        statuses(&proxy, "/api", &[from("198.51.100.3")], 1).await,
        [200],
        "the address's own second request"
    );
    assert_eq!(legacy.hits(), 2 + 2 + 2 + 1 + 2 + 1);
    let m = metrics_text(&proxy).await;
    assert_eq!(rl_count(&m, "/api", "default", "allowed"), 10.0, "{m}");
    assert_eq!(rl_count(&m, "/api", "default", "limited"), 8.0, "{m}");
}

/// HS256 with a secret file (`SECRET`): the simplest provider for a `claim:sub` key.
fn token(sub: &str) -> String {
    support::jwt::hs256(SECRET, "api", Some(sub))
}

const PROVIDER: &str = "[auth.internal]\nissuer = \"https://auth.test/\"\naudiences = [\"api\"]\nalgorithms = [\"HS256\"]\nsecret_file = \"secret\"\n";

#[tokio::test]
async fn a_claim_key_counts_each_subject_and_anonymous_callers_by_address() {
    init();
    let legacy = counted("legacy").await;
    let dir = secret_dir(SECRET);
    let text = format!(
        "{SERVER}{}{PROVIDER}{}",
        backend("legacy", legacy.addr),
        route(
            "/api",
            "legacy",
            "auth = { provider = \"internal\", mode = \"optional\" }\n\
             rate_limit = { limit = 1, per = \"1m\", burst = 2, key = \"claim:sub\" }"
        ),
    );
    let proxy = Proxy::start_in(dir, &text).await;
    for sub in ["user-1", "user-2"] {
        let bearer = format!("Bearer {}", token(sub));
        assert_eq!(
            statuses(&proxy, "/api", &[("authorization", &bearer)], 3).await,
            [200, 200, 429],
            "{sub}"
        );
    }
    // A fresh token of user-1 is still user-1.
    let bearer = format!("Bearer {}", token("user-1"));
    let r = call(&proxy, "/api", &[("authorization", &bearer)]).await;
    assert_limited("user-1 with another token", &r);
    // Anonymous (optional auth): by address, its own bucket.
    assert_eq!(
        statuses(&proxy, "/api", &[], 3).await,
        [200, 200, 429],
        "anonymous"
    );
    // A bad token is refused by auth before any limit counts it.
    let r = call(&proxy, "/api", &[("authorization", "Bearer not.a.token")]).await;
    assert_eq!(r.status, 401, "{}", r.text());
    assert_eq!(legacy.hits(), 6);
    let m = metrics_text(&proxy).await;
    assert_eq!(rl_count(&m, "/api", "default", "allowed"), 6.0, "{m}");
    assert_eq!(rl_count(&m, "/api", "default", "limited"), 4.0, "{m}");
}

// ---------------------------------------------------------------------------------- 3

#[tokio::test]
async fn forwarding_headers_choose_the_bucket_only_from_trusted_proxies() {
    init();
    let legacy = counted("legacy").await;
    let limited_route = route(
        "/api",
        "legacy",
        "rate_limit = { limit = 1, per = \"1m\", burst = 2, key = \"ip\" }",
    );
    // Without trusted_proxies, every request comes from the peer, 127.0.0.1, whatever it says.
    let open = Proxy::start(&format!(
        "{SERVER}{}{limited_route}",
        backend("legacy", legacy.addr)
    ))
    .await;
    let xff = |ip: &'static str| [("x-forwarded-for", ip)];
    assert_eq!(
        statuses(&open, "/api", &xff("203.0.113.1"), 2).await,
        [200, 200]
    );
    for (what, h) in [
        (
            "another X-Forwarded-For",
            ("x-forwarded-for", "203.0.113.2"),
        ),
        ("a list", ("x-forwarded-for", "203.0.113.3, 203.0.113.4")),
        ("Forwarded", ("forwarded", "for=203.0.113.5")),
        ("X-Real-IP", ("x-real-ip", "203.0.113.6")),
        ("nothing", ("x-nothing", "1")),
    ] {
        let r = call(&open, "/api", &[h]).await;
        assert_limited(&format!("untrusted peer, {what}"), &r);
    }
    assert_eq!(legacy.hits(), 2);

    // Behind a trusted proxy: the first untrusted hop from the right is the client.
    let behind = Proxy::start(&format!(
        "{}{}{limited_route}",
        server_with("trusted_proxies = [\"127.0.0.1/32\"]"),
        backend("legacy", legacy.addr)
    ))
    .await;
    assert_eq!(
        statuses(&behind, "/api", &xff("203.0.113.1"), 3).await,
        [200, 200, 429]
    );
    assert_eq!(
        statuses(&behind, "/api", &xff("203.0.113.2"), 1).await,
        [200],
        "another client"
    );
    // A client that prepends a made-up address is still itself (the trusted proxy appended
    // the real one), and trusted hops are skipped.
    for spoof in ["198.51.100.99, 203.0.113.1", "203.0.113.1, 127.0.0.1"] {
        let r = call(&behind, "/api", &[("x-forwarded-for", spoof)]).await;
        assert_limited(spoof, &r);
    }
    // Without the header the client is the trusted peer itself: its own bucket.
    assert_eq!(call(&behind, "/api", &[]).await.status, 200);
    assert_eq!(legacy.hits(), 2 + 2 + 1 + 1);
}

// ---------------------------------------------------------------------------------- 4

#[tokio::test]
async fn a_dry_run_forwards_everything_and_counts_what_it_would_limit() {
    init();
    let legacy = counted("legacy").await;
    let text = one_route(
        legacy.addr,
        "rate_limit = { limit = 1, per = \"1m\", burst = 2, mode = \"dry_run\" }",
    );
    let proxy = Proxy::start(&text).await;
    for i in 0..5 {
        let r = call(&proxy, "/api", &[]).await;
        assert_eq!(r.status, 200, "request {}: {}", i + 1, r.text());
        for h in ["ratelimit-policy", "ratelimit", "retry-after"] {
            assert_eq!(header(&r, h), None, "request {}: {h}", i + 1);
        }
    }
    assert_eq!(legacy.hits(), 5);
    let m = metrics_text(&proxy).await;
    assert_eq!(rl_count(&m, "/api", "default", "allowed"), 2.0, "{m}");
    assert_eq!(rl_count(&m, "/api", "default", "would_limit"), 3.0, "{m}");
    assert_eq!(rl_count(&m, "/api", "default", "limited"), 0.0, "{m}");
    assert_eq!(requests(&m, "/api", "legacy", "200"), 5.0, "{m}");
    assert_eq!(requests(&m, "/api", "none", "429"), 0.0, "{m}");
}

/// The access log's `ratelimit` field: `would_limit` for what a dry run let through,
/// `limited` for a refusal, `allowed` before, `none` on a route without limits.
#[tokio::test]
async fn the_access_log_says_would_limit_for_a_dry_run_and_limited_for_a_refusal() {
    init();
    let legacy = counted("legacy").await;
    let window = "rate_limit = { limit = 1, per = \"1h\", burst = 1";
    let text = format!(
        "{SERVER}{}{}{}{}",
        backend("legacy", legacy.addr),
        route(
            "/dry",
            "legacy",
            &format!("{window}, mode = \"dry_run\" }}")
        ),
        route("/enforced", "legacy", &format!("{window} }}")),
        route("/open", "legacy", ""),
    );
    let proxy = Proxy::start(&text).await;
    // (path, statuses, the log's ratelimit and backend for each)
    type Logged<'a> = [(&'a str, &'a str); 2];
    let cases: [(&str, [u16; 2], Logged); 3] = [
        (
            "/dry/logged",
            [200, 200],
            [("allowed", "legacy"), ("would_limit", "legacy")],
        ),
        (
            "/enforced/logged",
            [200, 429],
            [("allowed", "legacy"), ("limited", "none")],
        ),
        (
            "/open/logged",
            [200, 200],
            [("none", "legacy"), ("none", "legacy")],
        ),
    ];
    for (path, want, logged) in cases {
        let mut ids = Vec::new();
        for status in want {
            let r = call(&proxy, path, &[]).await;
            assert_eq!(r.status, status, "{path}: {}", r.text());
            ids.push(header(&r, "x-request-id").unwrap());
        }
        let events = eventually(Duration::from_secs(5), || async {
            let e = access_events(path);
            (e.len() >= 2).then_some(e)
        })
        .await;
        assert_eq!(events.len(), 2, "{path}: {events:#?}");
        for (id, (ratelimit, backend)) in ids.iter().zip(logged) {
            // matched by request id: two lines may be written in either order
            let f = &events
                .iter()
                .find(|e| e["fields"]["request_id"] == id.as_str())
                .unwrap_or_else(|| panic!("{path}: no line for {id}: {events:#?}"))["fields"];
            assert_eq!(f["request_id"], id.as_str(), "{path}: {f}");
            assert_eq!(f["ratelimit"], ratelimit, "{path}: {f}");
            assert_eq!(f["backend"], backend, "{path}: {f}");
        }
        assert_eq!(
            events[1]["fields"]["status"], want[1],
            "{path}: {}",
            events[1]
        );
    }
    assert_eq!(legacy.hits(), 2 + 1 + 2);
}

// ---------------------------------------------------------------------------------- 5

#[tokio::test]
async fn of_several_windows_the_tightest_limits_and_the_policy_lists_them_all() {
    init();
    let legacy = counted("legacy").await;
    // "minute": 4 a minute (no refill within the test). "burst": 2 at once, one every 500 ms.
    let text = format!(
        "{SERVER}{}{}\
         [[routes.rate_limit]]\nname = \"minute\"\nlimit = 4\nper = \"1m\"\n\
         [[routes.rate_limit]]\nname = \"burst\"\nlimit = 2\nper = \"1s\"\n",
        backend("legacy", legacy.addr),
        route("/api", "legacy", ""),
    );
    let proxy = Proxy::start(&text).await;
    let policy = "\"minute\";q=4;w=60, \"burst\";q=2;w=1";
    let start = Instant::now();
    let r1 = call(&proxy, "/api", &[]).await;
    let r2 = call(&proxy, "/api", &[]).await;
    let r3 = call(&proxy, "/api", &[]).await;
    assert!(start.elapsed() < Duration::from_millis(450));
    for r in [&r1, &r2, &r3] {
        assert_eq!(header(r, "ratelimit-policy").as_deref(), Some(policy));
    }
    assert_eq!(r1.status, 200);
    // The tightest state is reported: burst has 1 left, minute 3.
    assert_eq!(
        header(&r1, "ratelimit").as_deref(),
        Some("\"burst\";r=1;t=1")
    );
    assert_eq!(r2.status, 200);
    assert_eq!(
        header(&r2, "ratelimit").as_deref(),
        Some("\"burst\";r=0;t=1")
    );
    assert_limited("third at once", &r3);
    assert_eq!(
        header(&r3, "ratelimit").as_deref(),
        Some("\"burst\";r=0;t=1")
    );

    // Once the burst window is full again, the minute window has 2 left: a refused request
    // spends no window's quota.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let r4 = call(&proxy, "/api", &[]).await;
    assert_eq!(r4.status, 200, "{}", r4.text());
    let state = header(&r4, "ratelimit").unwrap();
    assert!(
        state.starts_with("\"minute\";r=1;"),
        "{state}: after the pause (the refused third request must not have used minute's quota)"
    );
    let r5 = call(&proxy, "/api", &[]).await;
    assert_eq!(
        r5.status,
        200,
        "the fourth request minute allows: {}",
        r5.text()
    );
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let r6 = call(&proxy, "/api", &[]).await;
    assert_limited("the fifth in a minute", &r6);
    let state = header(&r6, "ratelimit").unwrap();
    assert!(state.starts_with("\"minute\";r=0;t="), "{state}");
    let retry: u64 = header(&r6, "retry-after").unwrap().parse().unwrap();
    assert!((12..=15).contains(&retry), "Retry-After {retry}");
    assert_eq!(legacy.hits(), 4);
    let m = metrics_text(&proxy).await;
    assert_eq!(rl_count(&m, "/api", "burst", "limited"), 1.0, "{m}");
    assert_eq!(rl_count(&m, "/api", "minute", "limited"), 1.0, "{m}");
    assert_eq!(rl_count(&m, "/api", "minute", "allowed"), 4.0, "{m}");
}

// ---------------------------------------------------------------------------------- 6

/// GETs `path` with `x-key: flood-I` for each I in `keys`, 64 at a time on pooled connections;
/// the statuses (a connection error is a failure).
async fn flood(proxy: &Proxy, path: &str, keys: std::ops::Range<usize>) -> Vec<u16> {
    let client = client();
    let url = proxy.url(path);
    futures_util::stream::iter(keys)
        .map(|i| {
            let (client, url) = (client.clone(), url.clone());
            async move {
                let req = Request::get(&url)
                    .header("x-key", format!("flood-{i}"))
                    .body(Full::new(Bytes::new()))
                    .unwrap();
                let resp = client.request(req).await.expect("the proxy answers");
                let status = resp.status().as_u16();
                resp.into_body().collect().await.unwrap();
                status
            }
        })
        .buffer_unordered(64)
        .collect()
        .await
}

/// `max_keys = 1000`, one key that keeps coming back after it was limited, then `n` distinct
/// keys as fast as they come: the window tracks at most 1000, the busy key stays limited.
async fn flood_case(n: usize) -> Proxy {
    let legacy = counted("legacy").await;
    let text = one_route(legacy.addr, "rate_limit = { limit = 1, per = \"1h\", burst = 1, key = \"header:x-key\", max_keys = 1000 }");
    let proxy = Proxy::start(&text).await;
    assert_eq!(
        statuses(&proxy, "/api", &[("x-key", "busy")], 4).await,
        [200, 429, 429, 429]
    );
    let start = Instant::now();
    let got = flood(&proxy, "/api", 0..n).await;
    let took = start.elapsed();
    let ok = got.iter().filter(|&&s| s == 200).count();
    assert_eq!(ok, n, "each new key's first request passes");
    assert_eq!(legacy.hits(), 1 + n);
    // The live count, on /routes (`strangler_ratelimit_keys` waits for the 10 s sweep).
    let view = route_json(&proxy, "/api").await;
    let windows = &view["rate_limits"];
    assert_eq!(windows[0]["max_keys"], 1000, "{view}");
    let keys = windows[0]["keys"].as_u64().expect("rate_limits[0].keys");
    eprintln!("{n} distinct keys in {took:?}; keys tracked after: {keys}");
    assert!(keys <= 1000, "{keys} keys tracked with max_keys = 1000");
    assert!(
        keys >= 500,
        "only {keys} keys tracked: the bound evicts too eagerly"
    );
    // The process is fine, and the busy key was not evicted by the flood.
    let r = call(&proxy, "/api", &[("x-key", "busy")]).await;
    assert_limited("the busy key after the flood", &r);
    assert_eq!(
        call(&proxy, "/api", &[("x-key", "newcomer")]).await.status,
        200
    );
    proxy
}

/// 11 times `max_keys` (a debug build forwards about 2,000 requests a second on two cores).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_distinct_keys_stays_within_max_keys_and_a_busy_key_stays_limited() {
    init();
    flood_case(11_000).await;
}

/// 20 times `max_keys`, then the 10 s sweep's `strangler_ratelimit_keys`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "slow: 20,000 requests and a sweep (about 20 s)"]
async fn twenty_thousand_distinct_keys_and_the_key_gauge_stay_within_max_keys() {
    init();
    let proxy = flood_case(20_000).await;
    let gauge = eventually(Duration::from_secs(12), || async {
        metric(
            &metrics_text(&proxy).await,
            "strangler_ratelimit_keys",
            &[("route", "/api")],
        )
    })
    .await;
    eprintln!("strangler_ratelimit_keys after the sweep: {gauge}");
    assert!((1.0..=1000.0).contains(&gauge), "{gauge}");
}

// ---------------------------------------------------------------------------------- 7

#[tokio::test]
async fn buckets_survive_reloads_that_keep_the_window_and_start_fresh_when_it_changes() {
    init();
    let legacy = counted("legacy").await;
    let other = counted("other").await;
    let cfg = |a_limit: u32, a_backend: &str, b_limit: u32| {
        format!(
            "{SERVER}{}{}{}{}",
            backend("legacy", legacy.addr),
            backend("other", other.addr),
            route(
                "/a",
                a_backend,
                &format!("rate_limit = {{ limit = {a_limit}, per = \"1m\", key = \"route\" }}")
            ),
            route(
                "/b",
                "legacy",
                &format!("rate_limit = {{ limit = {b_limit}, per = \"1m\", key = \"route\" }}")
            ),
        )
    };
    let proxy = Proxy::start(&cfg(2, "legacy", 1)).await;
    assert_eq!(statuses(&proxy, "/a", &[], 3).await, [200, 200, 429]);
    assert_eq!(statuses(&proxy, "/b", &[], 2).await, [200, 429]);

    // Another route's window changes: /a keeps its bucket, /b starts fresh.
    reload_with(&proxy, &cfg(2, "legacy", 5)).await;
    assert_limited("/a after a reload of /b", &call(&proxy, "/a", &[]).await);
    assert_eq!(
        statuses(&proxy, "/b", &[], 1).await,
        [200],
        "/b's new window"
    );

    // /a's backend changes, its window does not (through the admin's POST /reload).
    std::fs::write(proxy.path(), cfg(2, "other", 5)).unwrap();
    let r = send_with(Method::POST, &proxy.admin_url("/reload"), &[], Bytes::new()).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["changed"], true, "{}", r.text());
    assert_limited(
        "/a after its backend changed",
        &call(&proxy, "/a", &[]).await,
    );

    // /a's window changes: a fresh bucket of the new size.
    reload_with(&proxy, &cfg(3, "other", 5)).await;
    assert_eq!(statuses(&proxy, "/a", &[], 4).await, [200, 200, 200, 429]);
    assert_eq!(legacy.hits(), 2 + 1 + 1);
    assert_eq!(other.hits(), 3);
}

// ---------------------------------------------------------------------------------- 8

#[tokio::test]
async fn refused_requests_reach_no_backend_no_shadow_and_trip_no_guard() {
    init();
    let legacy = counted("legacy").await;
    let users = counted("users").await;
    let mirror = counted("mirror").await;
    // The new backend answers, a shadow gets copies, a guard watches the new backend.
    let text = format!(
        "{SERVER}{}{}{}{}[routes.guard]\nmax_error_rate = 0.5\nmin_requests = 3\n",
        backend("legacy", legacy.addr),
        backend("users", users.addr),
        backend("mirror", mirror.addr),
        route(
            "/api",
            "users",
            "shadow = \"mirror\"\nrate_limit = { limit = 2, per = \"2s\", key = \"route\" }"
        ),
    );
    let proxy = Proxy::start(&text).await;
    let got = statuses(&proxy, "/api/x", &[], 12).await;
    assert_eq!(got[..2], [200, 200], "{got:?}");
    assert!(got[2..].iter().all(|&s| s == 429), "{got:?}");
    eventually(Duration::from_secs(5), || async {
        (mirror.hits() == 2).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(users.hits(), 2, "a refused request reached the backend");
    assert_eq!(mirror.hits(), 2, "a refused request reached the shadow");
    assert_eq!(legacy.hits(), 0);
    let view = route_json(&proxy, "/api").await;
    assert_eq!(view["guard_tripped"], false, "{view}");
    let m = metrics_text(&proxy).await;
    assert_eq!(
        metric(&m, "strangler_guard_tripped", &[("route", "/api")]),
        Some(0.0),
        "{m}"
    );
    assert_eq!(requests(&m, "/api", "none", "429"), 10.0, "{m}");
    assert_eq!(requests(&m, "/api", "users", "200"), 2.0, "{m}");
    // Once refilled, the route still goes to the new backend (the guard did not roll back).
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let r = call(&proxy, "/api/x", &[]).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.backend(), "users");
}

/// The guard's error rate with and without refused requests: 5xx among a flood of 429s trips
/// it at the same answer as without the flood (a refusal is neither an error nor a request for
/// it), and the 429s alone never do. Returns the failing request that tripped it.
async fn guard_trips_at(flood: usize) -> usize {
    let legacy = counted("legacy").await;
    let users = counted_with("users", |path| {
        if path.contains("/fail") {
            StatusCode::INTERNAL_SERVER_ERROR
        } else {
            StatusCode::OK
        }
    })
    .await;
    let text = format!(
        "{SERVER}{}{}{}[routes.guard]\nmax_error_rate = 0.5\nwindow = \"1m\"\nmin_requests = 4\n",
        backend("legacy", legacy.addr),
        backend("users", users.addr),
        route(
            "/api",
            "users",
            "rate_limit = { limit = 1, per = \"1h\", burst = 1, key = \"header:x-key\" }"
        ),
    );
    let proxy = Proxy::start(&text).await;
    let tripped = || async { route_json(&proxy, "/api").await["guard_tripped"] == true };
    // Two answers that are no error; the flood's key passes once, then is refused.
    assert_eq!(
        statuses(&proxy, "/api/ok", &[("x-key", "k0")], 1).await,
        [200]
    );
    let got = statuses(&proxy, "/api/ok", &[("x-key", "flood")], 1 + flood).await;
    assert_eq!(got[0], 200);
    assert!(got[1..].iter().all(|&s| s == 429), "{got:?}");
    assert!(
        !tripped().await,
        "{flood} refusals and no backend error tripped the guard"
    );
    // Then failures, each (with a flood) followed by refused requests of the failing path.
    // Without the refusals: 1 error in 3, 2 in 4 (0.5, not above it), 3 in 5: tripped.
    for i in 1..=6 {
        let key = format!("fail-{i}");
        let r = call(&proxy, "/api/fail", &[("x-key", &key)]).await;
        if tripped().await {
            assert_eq!(r.status, 500, "the failure that tripped it: {}", r.text());
            assert_eq!(r.backend(), "users");
            let m = metrics_text(&proxy).await;
            assert_eq!(
                metric(&m, "strangler_guard_tripped", &[("route", "/api")]),
                Some(1.0),
                "{m}"
            );
            assert_eq!(
                requests(&m, "/api", "none", "429"),
                (flood * i) as f64,
                "{m}"
            );
            // Rolled back: the next request goes to legacy.
            let r = call(&proxy, "/api/fail", &[("x-key", "after")]).await;
            assert_eq!((r.status.as_u16(), r.backend()), (200, "legacy".into()));
            assert_eq!(users.hits(), 2 + i, "a refused request reached users");
            return i;
        }
        assert_eq!(r.status, 500, "{}", r.text());
        let got = statuses(&proxy, "/api/fail", &[("x-key", &key)], flood).await;
        assert!(got.iter().all(|&s| s == 429), "{got:?}");
    }
    panic!("five backend errors in seven answers never tripped a 50% guard");
}

#[tokio::test]
async fn refusals_neither_trip_the_guard_nor_dilute_its_error_rate() {
    init();
    assert_eq!(guard_trips_at(0).await, 3, "without refusals");
    assert_eq!(
        guard_trips_at(40).await,
        3,
        "among 40 refusals after each answer"
    );
}

// ---------------------------------------------------------------------------------- 9

/// A routes.toml with `store` (a `[ratelimit_store]` or ""), a provider, and one route
/// `/api` with `route_extra` lines (auth on it when `auth`).
fn garbage_config(store: &str, auth: bool, route_extra: &str) -> String {
    let auth = if auth { "auth = \"internal\"\n" } else { "" };
    format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\n\n{store}\n\
         [backends.legacy]\nurl = \"http://127.0.0.1:9\"\nlegacy = true\n\n{PROVIDER}\n\
         [[routes]]\nprefix = \"/api\"\nbackend = \"legacy\"\n{auth}{route_extra}\n"
    )
}

/// The errors of `text` as `LINE:COL: message`; a panic in validation is an error too.
fn errors(dir: &Path, text: &str) -> Result<(), Vec<String>> {
    let text = text.to_string();
    let dir = dir.to_path_buf();
    match std::panic::catch_unwind(move || strangler::config::parse_at(&text, &dir)) {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(diags)) => Err(diags
            .iter()
            .map(|d| format!("{}:{}: {}", d.line, d.col, d.message))
            .collect()),
        Err(_) => Err(vec!["PANICKED".into()]),
    }
}

/// (`[ratelimit_store]` text, auth on the route, route extra, where the error points (needle,
/// which occurrence), what it says).
type Case<'a> = (String, bool, String, (&'a str, usize), &'a str);

#[test]
fn config_mistakes_are_reported_at_their_line_and_column() {
    let dir = secret_dir(SECRET);
    let unset = "STRANGLER_RATELIMIT_TEST_NEVER_SET_4B1D";
    assert!(std::env::var_os(unset).is_none());
    assert!(std::env::var_os("PATH").is_some());

    // The harness itself: every kind of window loads.
    let good = garbage_config(
        "",
        true,
        "[[routes.rate_limit]]\nname = \"per-user\"\nlimit = 10\nper = \"1s\"\nburst = 20\nkey = \"claim:sub\"\nmax_keys = 5000\n\
         [[routes.rate_limit]]\nname = \"by-key\"\nlimit = 100\nper = \"1m\"\nkey = \"header:x-api-key\"\nmode = \"dry_run\"\n\
         [[routes.rate_limit]]\nname = \"by-session\"\nlimit = 1000\nper = \"1h\"\nkey = \"cookie:session\"\nscope = \"replica\"\n\
         [[routes.rate_limit]]\nname = \"all\"\nlimit = 1000000\nper = \"1s\"\nkey = \"route\"\nmode = \"enforce\"\n",
    );
    assert_eq!(errors(dir.path(), &good), Ok(()), "{good}");
    let one = garbage_config("", false, "rate_limit = { limit = 10, per = \"1s\" }");
    assert_eq!(errors(dir.path(), &one), Ok(()), "{one}");

    let w = |body: &str| format!("rate_limit = {{ {body} }}");
    let store = |body: &str| format!("[ratelimit_store]\n{body}\n");
    let global = w("limit = 5, per = \"1s\", scope = \"global\"");
    let quoted_unset = format!("\"{unset}\"");
    let cases: Vec<Case> = vec![
        (
            "".into(),
            false,
            w("limit = 0, per = \"1s\""),
            ("0, per", 0),
            "`rate_limit.limit` must be at least 1, got 0",
        ),
        (
            "".into(),
            false,
            w("limit = 5, per = \"soon\""),
            ("\"soon\"", 0),
            "`rate_limit.per`: invalid duration \"soon\"",
        ),
        (
            "".into(),
            false,
            w("limit = 5, per = \"0s\""),
            ("\"0s\"", 0),
            "`rate_limit.per`",
        ),
        (
            "".into(),
            false,
            w("limit = 5, per = \"1s\", burst = -1"),
            ("-1", 0),
            "`rate_limit.burst` must be at least 1, got -1",
        ),
        (
            "".into(),
            false,
            w("limit = 5, per = \"1s\", key = \"query:x\""),
            ("\"query:x\"", 0),
            "`rate_limit.key` \"query:x\": expected",
        ),
        (
            "".into(),
            false,
            w("limit = 5, per = \"1s\", key = \"header:bad header\""),
            ("\"header:bad header\"", 0),
            "`rate_limit.key` \"header:bad header\"",
        ),
        (
            "".into(),
            false,
            w("limit = 5, per = \"1s\", key = \"claim:sub\""),
            ("\"claim:sub\"", 0),
            "`rate_limit.key` \"claim:sub\" needs `auth`",
        ),
        (
            "".into(),
            false,
            w("limit = 5, per = \"1s\", mode = \"block\""),
            ("\"block\"", 0),
            "`rate_limit.mode` \"block\"",
        ),
        (
            "".into(),
            false,
            w("limit = 5, per = \"1s\", scope = \"cluster\""),
            ("\"cluster\"", 0),
            "`rate_limit.scope` \"cluster\"",
        ),
        (
            "".into(),
            false,
            global.clone(),
            ("\"global\"", 0),
            "needs a `[ratelimit_store]`",
        ),
        (
            store(&format!(
                "url = \"redis://:hunter2@127.0.0.1:6379\"\nurl_env = \"{unset}\""
            )),
            false,
            "".into(),
            ("\"redis://", 0),
            "[ratelimit_store] `url`",
        ),
        (
            store(&format!("url_env = \"{unset}\"")),
            false,
            "".into(),
            (&quoted_unset[..], 0),
            "is unset or empty",
        ),
        (
            store("url_env = \"PATH\""),
            false,
            "".into(),
            ("\"PATH\"", 0),
            "PATH does not hold a redis:// or rediss:// URL",
        ),
        (
            store("timeout = \"50ms\""),
            false,
            "".into(),
            ("[ratelimit_store]", 0),
            "[ratelimit_store] needs `url_env`",
        ),
        (
            store(&format!("url_env = \"{unset}\"\non_error = \"retry\"")),
            false,
            "".into(),
            ("\"retry\"", 0),
            "[ratelimit_store] `on_error` \"retry\"",
        ),
        (
            store(&format!("url_env = \"{unset}\"\ntimeout = \"fast\"")),
            false,
            "".into(),
            ("\"fast\"", 0),
            "`ratelimit_store.timeout`",
        ),
        (
            "".into(),
            false,
            "[[routes.rate_limit]]\nname = \"w\"\nlimit = 1\nper = \"1s\"\n\
             [[routes.rate_limit]]\nname = \"w\"\nlimit = 60\nper = \"1m\""
                .into(),
            ("\"w\"", 1),
            "two windows named \"w\"",
        ),
        (
            "".into(),
            false,
            "[[routes.rate_limit]]\nlimit = 1\nper = \"1s\"\n\
             [[routes.rate_limit]]\nname = \"minute\"\nlimit = 60\nper = \"1m\""
                .into(),
            ("[[routes.rate_limit]]", 0),
            "each of several `[[routes.rate_limit]]` windows needs a `name`",
        ),
        (
            "".into(),
            false,
            w("name = \"my window\", limit = 5, per = \"1s\""),
            ("\"my window\"", 0),
            "`rate_limit.name` \"my window\"",
        ),
        (
            "".into(),
            false,
            w("limit = 5, per = \"1s\", max_keys = 0"),
            ("0 }", 0),
            "`rate_limit.max_keys` must be at least 1, got 0",
        ),
        (
            "".into(),
            false,
            w("limit = 2000000, per = \"1s\""),
            ("2000000", 0),
            "more than a million requests per second",
        ),
        (
            // 2^32: more than the window arithmetic holds.
            "".into(),
            false,
            w("limit = 4294967296, per = \"10000h\""),
            ("4294967296", 0),
            "`rate_limit.limit` must be at most 4294967295",
        ),
        (
            "".into(),
            false,
            w("limit = 1, per = \"600years\""),
            ("\"600years\"", 0),
            "`rate_limit.per` must be at most a year",
        ),
        (
            "".into(),
            false,
            "rate_limit = []".into(),
            ("[]", 0),
            "`rate_limit` is an empty list",
        ),
        // Mistakes serde finds, at the key or value they are about.
        (
            "".into(),
            false,
            w("limit = 5, per = \"1s\", brust = 3"),
            ("brust", 0),
            "unknown field `brust`",
        ),
        (
            "".into(),
            false,
            "[[routes.rate_limit]]\nname = \"w\"\nlimit = 1\nper = \"1s\"\nbrust = 2".into(),
            ("brust", 0),
            "unknown field `brust`",
        ),
        (
            "".into(),
            false,
            "[[routes.rate_limit]]\nname = \"a\"\nlimit = 1\nper = \"1s\"\n\
             [[routes.rate_limit]]\nname = \"b\"\nlimit = 1\nper = \"1s\"\nkeys = \"ip\""
                .into(),
            ("keys", 0),
            "unknown field `keys`",
        ),
        (
            store("url_env = \"PATH\"\nredis_url = \"redis://127.0.0.1\""),
            false,
            "".into(),
            ("redis_url", 0),
            "[ratelimit_store]: unknown field `redis_url`",
        ),
        (
            "".into(),
            false,
            w("per = \"1s\", burst = 2"),
            ("{ per", 0),
            "missing field `limit`",
        ),
        (
            "".into(),
            false,
            w("limit = 5"),
            ("{ limit", 0),
            "missing field `per`",
        ),
        (
            "".into(),
            false,
            "[[routes.rate_limit]]\nname = \"w\"\nlimit = 1\n".into(),
            ("[[routes.rate_limit]]", 0),
            "missing field `per`",
        ),
        (
            "".into(),
            false,
            w("limit = \"ten\", per = \"1s\""),
            ("\"ten\"", 0),
            "invalid type: string \"ten\"",
        ),
        (
            "".into(),
            false,
            w("limit = 5, per = 60"),
            ("60", 0),
            "invalid type: integer `60`",
        ),
        (
            "".into(),
            false,
            w("limit = 5, per = \"1s\", key = \"cookie:\""),
            ("\"cookie:\"", 0),
            "`rate_limit.key` \"cookie:\": expected",
        ),
        (
            "".into(),
            false,
            w("limit = 5, per = \"1s\", key = \"cookie:my session\""),
            ("\"cookie:my session\"", 0),
            "`rate_limit.key` \"cookie:my session\"",
        ),
        (
            // Not a token: no cookie could ever be named so.
            "".into(),
            false,
            w("limit = 5, per = \"1s\", key = \"cookie:sess(ion)\""),
            ("\"cookie:sess(ion)\"", 0),
            "`rate_limit.key` \"cookie:sess(ion)\"",
        ),
        (
            "".into(),
            true,
            w("limit = 5, per = \"1s\", key = \"claim:\""),
            ("\"claim:\"", 0),
            "`rate_limit.key` \"claim:\": expected",
        ),
        (
            "".into(),
            false,
            w("limit = 5, per = \"1s\", key = \"header:\""),
            ("\"header:\"", 0),
            "`rate_limit.key` \"header:\": expected",
        ),
        (
            "".into(),
            false,
            w("limit = 5, per = \"1s\", key = \"header:x(y)\""),
            ("\"header:x(y)\"", 0),
            "`rate_limit.key` \"header:x(y)\"",
        ),
    ];
    let mut failures = Vec::new();
    for (store, auth, extra, (needle, nth), names) in &cases {
        let text = garbage_config(store, *auth, extra);
        let (line, col) = position_nth(&text, needle, *nth);
        let want = format!("{line}:{col}: ");
        match errors(dir.path(), &text) {
            Ok(()) => failures.push(format!("{names}: loaded\n{text}")),
            Err(lines) => {
                if !lines
                    .iter()
                    .any(|l| l.starts_with(&want) && l.contains(names))
                {
                    failures.push(format!(
                        "{names}: want {want}... in\n  {}",
                        lines.join("\n  ")
                    ));
                }
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

/// One file with a mistake in `[ratelimit_store]` and in four routes (serde's and
/// validation's, several in one route's windows): every one is reported at its place, and
/// nothing else.
#[test]
fn several_mistakes_in_one_file_are_all_reported() {
    let dir = secret_dir(SECRET);
    let text = "[server]\nlisten = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\n\n\
        [ratelimit_store]\nurl_env = \"PATH\"\npool = 4\n\n\
        [backends.legacy]\nurl = \"http://127.0.0.1:9\"\nlegacy = true\n\n\
        [[routes]]\nprefix = \"/a\"\nbackend = \"legacy\"\n\
        rate_limit = { limit = 5, per = \"1s\", brust = 3 }\n\n\
        [[routes]]\nprefix = \"/b\"\nbackend = \"legacy\"\n\
        rate_limit = { limit = \"ten\", per = \"1s\" }\n\n\
        [[routes]]\nprefix = \"/c\"\nbackend = \"legacy\"\n\
        [[routes.rate_limit]]\nname = \"x\"\nlimit = 0\nper = \"1s\"\n\
        [[routes.rate_limit]]\nname = \"y\"\nlimit = 1\nper = \"1s\"\nkey = \"cookie:\"\nmode = \"block\"\n\n\
        [[routes]]\nprefix = \"/d\"\nbackend = \"legacy\"\n\
        rate_limit = { per = \"1s\" }\n";
    let want: &[(&str, &str)] = &[
        ("pool", "[ratelimit_store]: unknown field `pool`"),
        ("brust", "unknown field `brust`"),
        ("\"ten\"", "invalid type: string \"ten\""),
        ("0\nper", "`rate_limit.limit` must be at least 1, got 0"),
        ("\"cookie:\"", "`rate_limit.key` \"cookie:\""),
        ("\"block\"", "`rate_limit.mode` \"block\""),
        ("{ per", "missing field `limit`"),
    ];
    let lines = errors(dir.path(), text).expect_err("a file with seven mistakes loaded");
    let mut missing = Vec::new();
    for (needle, says) in want {
        let (line, col) = position(text, needle);
        let at = format!("{line}:{col}: ");
        if !lines.iter().any(|l| l.starts_with(&at) && l.contains(says)) {
            missing.push(format!("{at}... {says}"));
        }
    }
    assert!(
        missing.is_empty(),
        "not reported:\n  {}\nin:\n  {}",
        missing.join("\n  "),
        lines.join("\n  ")
    );
    assert_eq!(lines.len(), want.len(), "{}", lines.join("\n"));
}

// --------------------------------------------------------------------------------- 10: Redis

/// A `redis-server` of our own on a free port of 127.0.0.1, without persistence; killed
/// when dropped.
struct Redis {
    port: u16,
    child: Option<std::process::Child>,
    dir: tempfile::TempDir,
}

impl Redis {
    async fn start() -> Redis {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut r = Redis {
            port,
            child: None,
            dir: tempfile::tempdir().unwrap(),
        };
        r.restart().await;
        r
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Starts it (again) on its port and waits until it answers PING.
    async fn restart(&mut self) {
        assert!(self.child.is_none());
        let child = std::process::Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(self.dir.path())
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("redis-server (Debian: apt-get install redis-server)");
        self.child = Some(child);
        let port = self.port;
        eventually(Duration::from_secs(10), || async move {
            ping(port).await.then_some(())
        })
        .await;
    }

    /// Kills it and waits until it is gone.
    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn signal(&self, sig: &str) {
        let pid = self.child.as_ref().unwrap().id().to_string();
        let ok = std::process::Command::new("kill")
            .args([sig, &pid])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill {sig} {pid}");
    }

    /// `redis-cli`-free: the keys matching `pattern`.
    async fn keys(&self, pattern: &str) -> String {
        let cmd = format!("*2\r\n$4\r\nKEYS\r\n${}\r\n{pattern}\r\n", pattern.len());
        roundtrip(self.port, cmd.as_bytes()).await
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.stop();
    }
}

async fn roundtrip(port: u16, cmd: &[u8]) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(Ok(mut s)) = tokio::time::timeout(
        Duration::from_millis(500),
        tokio::net::TcpStream::connect(("127.0.0.1", port)),
    )
    .await
    else {
        return String::new();
    };
    if s.write_all(cmd).await.is_err() {
        return String::new();
    }
    let mut buf = vec![0u8; 65536];
    match tokio::time::timeout(Duration::from_millis(500), s.read(&mut buf)).await {
        Ok(Ok(n)) => String::from_utf8_lossy(&buf[..n]).into_owned(),
        _ => String::new(),
    }
}

async fn ping(port: u16) -> bool {
    roundtrip(port, b"PING\r\n").await.starts_with("+PONG")
}

/// `[ratelimit_store] timeout` of [`global_config`].
const STORE_TIMEOUT: Duration = Duration::from_millis(100);

/// The longest any request may take, Redis up, hanging or gone: one store timeout, plus 150 ms
/// for the debug-build proxy, a fresh client connection and a busy 2-core machine (measured:
/// the slowest answer takes about 107 ms while Redis hangs and under 10 ms otherwise). Waiting
/// twice for the store, or for a reconnection (at least 500 ms), does not fit.
const NO_STALL: Duration = Duration::from_millis(250);

/// Three routes on one backend, counted in `[ratelimit_store]` (the URL in `var`): `/shared`
/// one bucket for the route, `/tenant` a bucket per `x-tenant`; 10 a minute, all at once.
fn global_config(var: &str, on_error: &str, backend_addr: SocketAddr) -> String {
    let window = |key: &str| {
        format!("rate_limit = {{ limit = 10, per = \"1m\", burst = 10, key = \"{key}\", scope = \"global\" }}")
    };
    format!(
        "{SERVER}[ratelimit_store]\nurl_env = \"{var}\"\ntimeout = \"{}ms\"\non_error = \"{on_error}\"\n\n{}{}{}",
        STORE_TIMEOUT.as_millis(),
        backend("legacy", backend_addr),
        route("/shared", "legacy", &window("route")),
        route("/tenant", "legacy", &window("header:x-tenant")),
    )
}

/// `ratelimit_store.connected` on the proxy's `/routes`.
async fn store_connected(proxy: &Proxy) -> bool {
    let view = routes_json(proxy).await;
    view["ratelimit_store"]["connected"]
        .as_bool()
        .unwrap_or_else(|| panic!("no ratelimit_store.connected in /routes: {view}"))
}

/// A proxy on `text`, once its store is connected.
async fn start_global(text: &str) -> Proxy {
    let proxy = Proxy::start(text).await;
    eventually(Duration::from_secs(10), || async {
        store_connected(&proxy).await.then_some(())
    })
    .await;
    proxy
}

fn store_errors(m: &str) -> f64 {
    metric(m, "strangler_ratelimit_store_errors_total", &[]).unwrap_or(0.0)
}

/// One GET with `x-tenant`, timed; a connection error is `Err`.
async fn timed(proxy: &Proxy, path: &str, tenant: &str) -> (Result<u16, String>, Duration) {
    let start = Instant::now();
    let req = Request::get(proxy.url(path))
        .header("x-tenant", tenant)
        .body(Full::new(Bytes::new()))
        .unwrap();
    let got = match client().request(req).await {
        Ok(resp) => {
            let s = resp.status().as_u16();
            resp.into_body()
                .collect()
                .await
                .map(|_| s)
                .map_err(|e| e.to_string())
        }
        Err(e) => Err(e.to_string()),
    };
    (got, start.elapsed())
}

/// `n` requests per proxy for `tenant`, interleaved across `proxies`; every one must be
/// answered (2xx or 429) within [`NO_STALL`]. How many passed on each proxy.
async fn spread(proxies: &[&Proxy], path: &str, tenant: &str, n: usize) -> Vec<usize> {
    spread_timed(proxies, path, tenant, n).await.0
}

/// [`spread`], and how many answers on each proxy waited at least the store's timeout.
async fn spread_timed(
    proxies: &[&Proxy],
    path: &str,
    tenant: &str,
    n: usize,
) -> (Vec<usize>, Vec<usize>) {
    let mut passed = vec![0; proxies.len()];
    let mut waited = vec![0; proxies.len()];
    let mut slowest = Duration::ZERO;
    for _ in 0..n {
        for (i, p) in proxies.iter().enumerate() {
            let (got, took) = timed(p, path, tenant).await;
            slowest = slowest.max(took);
            waited[i] += usize::from(took >= STORE_TIMEOUT);
            match got {
                Ok(200) => passed[i] += 1,
                Ok(429) => {}
                other => panic!("{path} {tenant} on proxy {i}: {other:?} after {took:?}"),
            }
            assert!(
                took < NO_STALL,
                "{path} {tenant} on proxy {i}: {took:?} (store timeout {STORE_TIMEOUT:?})"
            );
        }
    }
    eprintln!(
        "{path} {tenant}: passed per proxy {passed:?}, slowest answer {slowest:?}, answers that waited the store's timeout {waited:?}"
    );
    (passed, waited)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs redis-server (Debian's package)"]
async fn global_limits_are_shared_through_redis_and_fall_back_locally_while_it_is_down() {
    init();
    let mut redis = Redis::start().await;
    let var = "STRANGLER_TEST_REDIS_SHARED";
    std::env::set_var(var, redis.url());
    let legacy = counted("legacy").await;
    let text = global_config(var, "local", legacy.addr);
    let (a, b, c) = (
        start_global(&text).await,
        start_global(&text).await,
        start_global(&text).await,
    );
    let all = [&a, &b, &c];

    // (a) 30 requests over three proxies, one bucket of 10 in Redis.
    let passed = spread(&all, "/shared", "-", 10).await;
    let total: usize = passed.iter().sum();
    eprintln!("(a) {total} of 30 passed across three proxies: {passed:?}");
    assert!((10..=12).contains(&total), "{total} passed: {passed:?}");
    assert!(
        redis
            .keys("strangler:rl:*")
            .await
            .contains("strangler:rl:/shared:default:r"),
        "{}",
        redis.keys("*").await
    );
    for p in all {
        assert_eq!(store_errors(&metrics_text(p).await), 0.0);
    }
    // The answer says Redis's count: one slot every 6 s, the bucket full again in a minute.
    let r = call(&a, "/shared", &[]).await;
    let retry = assert_limited("the 31st", &r);
    assert!((5..=6).contains(&retry), "Retry-After {retry}");
    let state = header(&r, "ratelimit").unwrap();
    let t: u64 = state
        .strip_prefix("\"default\";r=0;t=")
        .and_then(|t| t.parse().ok())
        .unwrap_or_else(|| panic!("RateLimit {state}"));
    assert!((50..=60).contains(&t), "RateLimit {state}");

    // (b1) Redis hangs (SIGSTOP): answers within the store's timeout, counted locally, and
    // after one timeout Redis is left alone for a second: at most one wait per proxy per
    // second (and at least one: the hang was met).
    redis.signal("-STOP");
    let hung = Instant::now();
    let (passed, waited) = spread_timed(&all, "/tenant", "paused", 12).await;
    assert_eq!(
        passed,
        [10, 10, 10],
        "each replica counts alone while Redis hangs"
    );
    let seconds = hung.elapsed().as_secs() as usize + 1;
    assert!(
        waited.iter().all(|&w| (1..=seconds).contains(&w)),
        "answers that waited the store's timeout, per proxy, in {seconds} s: {waited:?}"
    );
    for p in all {
        assert!(store_errors(&metrics_text(p).await) > 0.0);
    }
    redis.signal("-CONT");

    // (b2) Redis is gone (killed): the same, without waiting for timeouts.
    redis.stop();
    let before: Vec<f64> = {
        let mut v = Vec::new();
        for p in all {
            v.push(store_errors(&metrics_text(p).await));
        }
        v
    };
    let passed = spread(&all, "/tenant", "killed", 12).await;
    assert_eq!(
        passed,
        [10, 10, 10],
        "each replica counts alone while Redis is down"
    );
    for (p, was) in all.iter().zip(before) {
        assert!(store_errors(&metrics_text(p).await) > was);
        assert!(
            !store_connected(p).await,
            "/routes says connected while Redis is down"
        );
    }

    // (c) Redis is back on the same port (empty): global counting resumes. A fresh tenant
    // per attempt: 10 through a, then b and c must see the bucket empty.
    redis.restart().await;
    let resumed = Instant::now();
    let mut attempt = 0;
    eventually(Duration::from_secs(15), || {
        attempt += 1;
        let tenant = format!("resume-{attempt}");
        let all = &all;
        async move {
            let mut ok = 0;
            for _ in 0..10 {
                ok += usize::from(timed(all[0], "/tenant", &tenant).await.0 == Ok(200));
            }
            let b = timed(all[1], "/tenant", &tenant).await.0;
            let c = timed(all[2], "/tenant", &tenant).await.0;
            (ok == 10 && b == Ok(429) && c == Ok(429)).then_some(())
        }
    })
    .await;
    eprintln!(
        "(c) global counting resumed {:?} after the restart ({attempt} attempts)",
        resumed.elapsed()
    );
    let passed = spread(&all, "/tenant", "after-restart", 10).await;
    let total: usize = passed.iter().sum();
    assert_eq!(total, 10, "after the restart: {passed:?}");
    for p in all {
        assert!(store_connected(p).await);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs redis-server (Debian's package)"]
async fn on_error_deny_refuses_and_allow_forwards_while_redis_is_down() {
    init();
    let mut redis = Redis::start().await;
    let var = "STRANGLER_TEST_REDIS_ON_ERROR";
    std::env::set_var(var, redis.url());
    let legacy = counted("legacy").await;
    let deny = start_global(&global_config(var, "deny", legacy.addr)).await;
    let allow = start_global(&global_config(var, "allow", legacy.addr)).await;
    assert_eq!(spread(&[&deny, &allow], "/tenant", "up", 1).await, [1, 1]);

    redis.stop();
    for i in 0..3 {
        let start = Instant::now();
        let r = call(&deny, "/tenant", &[("x-tenant", "down")]).await;
        let took = start.elapsed();
        let retry = assert_limited(&format!("deny, request {i}"), &r);
        assert_eq!(retry, 1);
        assert!(took < NO_STALL, "deny, request {i}: {took:?}");
    }
    // Allow: beyond the limit too, nothing is known, everything passes.
    assert_eq!(spread(&[&allow], "/tenant", "down", 15).await, [15]);
    assert!(store_errors(&metrics_text(&deny).await) > 0.0);
    assert!(store_errors(&metrics_text(&allow).await) > 0.0);

    // A proxy started while Redis is down follows on_error from its first request.
    let text = global_config(var, "deny", legacy.addr);
    let late = Proxy::start(&text).await;
    assert_limited(
        "deny before ever connecting",
        &call(&late, "/shared", &[]).await,
    );
    // And connects once Redis is there.
    redis.restart().await;
    eventually(Duration::from_secs(10), || async {
        (call(&late, "/shared", &[]).await.status == 200).then_some(())
    })
    .await;
}

/// Requests per 250 ms bucket over `span`, from 8 concurrent clients on `path` (each its own
/// tenant, so no bucket ever refuses), and the answers that waited the store's timeout.
async fn throughput(proxy: &Proxy, path: &str, span: Duration) -> (Vec<usize>, usize) {
    let started = Instant::now();
    let buckets = (span.as_millis() / 250) as usize;
    let counts = Arc::new(std::sync::Mutex::new(vec![0usize; buckets]));
    let waited = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for client_no in 0..8 {
        let (url, counts, waited) = (proxy.url(path), counts.clone(), waited.clone());
        tasks.push(tokio::spawn(async move {
            let tenant = format!("tp-{client_no}-{}", fastrand::u64(..));
            let http = client();
            while started.elapsed() < span {
                let t = Instant::now();
                let req = Request::get(&url)
                    .header("x-tenant", &tenant)
                    .body(Full::new(Bytes::new()))
                    .unwrap();
                let resp = http.request(req).await.unwrap();
                assert_eq!(resp.status(), 200);
                let _ = resp.into_body().collect().await;
                if t.elapsed() >= STORE_TIMEOUT {
                    waited.fetch_add(1, Ordering::SeqCst);
                }
                let at = (started.elapsed().as_millis() / 250) as usize;
                if let Some(c) = counts.lock().unwrap().get_mut(at) {
                    *c += 1;
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let counts = counts.lock().unwrap().clone();
    (counts, waited.load(Ordering::SeqCst))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs redis-server (Debian's package)"]
async fn full_throughput_returns_at_once_when_redis_comes_back() {
    init();
    let mut redis = Redis::start().await;
    let var = "STRANGLER_TEST_REDIS_THROUGHPUT";
    std::env::set_var(var, redis.url());
    let legacy = counted("legacy").await;
    // A window no client reaches: every request is a store round trip, none is refused.
    let text = format!(
        "{SERVER}[ratelimit_store]\nurl_env = \"{var}\"\ntimeout = \"{}ms\"\non_error = \"local\"\n\n{}{}",
        STORE_TIMEOUT.as_millis(),
        backend("legacy", legacy.addr),
        route(
            "/tenant",
            "legacy",
            "rate_limit = { limit = 1000000, per = \"1s\", burst = 1000000, key = \"header:x-tenant\", scope = \"global\" }"
        ),
    );
    let proxy = start_global(&text).await;
    let (before, _) = throughput(&proxy, "/tenant", Duration::from_secs(2)).await;
    let baseline = before.iter().skip(1).sum::<usize>() as f64 / (before.len() - 1) as f64;

    // Down long enough for any reconnect backoff to grow, with a little traffic meeting it.
    redis.stop();
    let down = Instant::now();
    while down.elapsed() < Duration::from_secs(5) {
        let _ = timed(&proxy, "/tenant", "down").await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(!store_connected(&proxy).await);
    redis.restart().await;
    let back = Instant::now();
    eventually(Duration::from_secs(1), || async {
        store_connected(&proxy).await.then_some(())
    })
    .await;
    let connected_after = back.elapsed();
    let errors = store_errors(&metrics_text(&proxy).await);
    let (after, waited) = throughput(&proxy, "/tenant", Duration::from_secs(3)).await;
    eprintln!(
        "baseline {baseline:.0} requests per 250 ms; store answering {connected_after:?} after the restart; then {after:?}, {waited} answers waited the store's timeout"
    );
    assert_eq!(
        store_errors(&metrics_text(&proxy).await),
        errors,
        "store errors after it answered again"
    );
    assert_eq!(
        waited, 0,
        "answers waited the store's timeout after it came back"
    );
    for (i, &n) in after.iter().enumerate() {
        assert!(
            n as f64 >= 0.6 * baseline,
            "250 ms bucket {i} after the restart: {n} requests against {baseline:.0} before: {after:?}"
        );
    }
}

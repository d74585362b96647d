//! Shadow traffic and comparison over real sockets: the legacy-stub and users-service, with
//! and without the email-case bug; ignore and noise; gzip; slow, down and garbage shadows;
//! caps; write safety; redaction; sampling; reverse shadow; /diffs.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a panic is a failure report

mod support;

use std::time::Duration;

use bytes::Bytes;
use http::Method;
use http_body_util::Full;
use support::*;

const SERVER: &str =
    "[server]\nlisten = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\nwatch = \"off\"\n";

fn backends(legacy: std::net::SocketAddr, users: std::net::SocketAddr) -> String {
    format!("{SERVER}[backends.legacy]\nurl = \"http://{legacy}\"\nlegacy = true\n[backends.users]\nurl = \"http://{users}\"\n")
}

fn shadow_count(m: &str, outcome: &str) -> f64 {
    shadow_outcome(m, outcome)
}

fn all_outcomes(m: &str) -> f64 {
    ["match", "mismatch", "error", "skipped", "dropped"]
        .iter()
        .map(|o| shadow_count(m, o))
        .sum()
}

/// Waits until `n` shadow legs have finished (any outcome but dropped).
async fn settled(proxy: &Proxy, n: f64) -> String {
    shadow_legs_ended(proxy, n, Duration::from_secs(10)).await
}

#[tokio::test]
async fn the_email_case_bug_is_found_at_its_pointer() {
    let legacy = start_legacy(Default::default()).await;
    let users = start_users(Some(users_service::Bug::EmailCase)).await;
    let proxy = Proxy::start(&format!("{}[[routes]]\nprefix = \"/api/users\"\nbackend = \"legacy\"\nshadow = \"users\"\n[routes.compare]\nignore = [\"/generated_at\"]\n[[routes]]\nprefix = \"/\"\nbackend = \"legacy\"\n", backends(legacy.addr, users.addr))).await;
    let r = get(&proxy.url("/api/users/7")).await;
    assert_eq!(r.status, 200);
    assert_eq!(
        r.json()["user"]["email"],
        "Margaret.Hopper7@FitTrack.example",
        "the client gets the legacy answer"
    );
    get(&proxy.url("/api/users")).await;
    get(&proxy.url("/api/workouts")).await;
    let m = settled(&proxy, 2.0).await;
    assert_eq!(shadow_count(&m, "mismatch"), 2.0, "{m}");
    assert_eq!(
        metric(
            &m,
            "strangler_shadow_total",
            &[
                ("route", "/api/users"),
                ("shadow", "users"),
                ("outcome", "mismatch")
            ]
        ),
        Some(2.0)
    );
    let diffs = get(&proxy.admin_url("/diffs")).await.json();
    let list = &diffs[0];
    assert_eq!(list["path"], "/api/users");
    assert_eq!(list["differences"][0]["path"], "/users/0/email");
    assert_eq!(list["total_differences"], 20);
    let one = &diffs[1];
    assert_eq!(one["route"], "/api/users");
    assert_eq!(one["method"], "GET");
    assert_eq!(one["path"], "/api/users/7");
    assert_eq!(
        one["request_id"],
        r.headers["x-request-id"].to_str().unwrap()
    );
    assert_eq!(one["primary"]["backend"], "legacy");
    assert_eq!(one["primary"]["status"], 200);
    assert_eq!(one["shadow"]["backend"], "users");
    assert!(one["shadow"]["latency_ms"].as_f64().unwrap() >= 0.0);
    assert_eq!(
        one["differences"],
        serde_json::json!([{"path": "/user/email", "kind": "changed", "primary": "Margaret.Hopper7@FitTrack.example", "shadow": "margaret.hopper7@fittrack.example"}])
    );
    let rt = route_json(&proxy, "/api/users").await;
    assert_eq!(rt["compared"], 2);
    assert_eq!(rt["mismatch_rate"], 1.0);
    assert_eq!(rt["ready_to_cut_over"], false);
    // /diffs filters and limits; bad queries are 400.
    assert_eq!(
        get(&proxy.admin_url("/diffs?route=%2Fapi%2Fusers&limit=1"))
            .await
            .json()
            .as_array()
            .unwrap()
            .len(),
        1
    );
    assert_eq!(
        get(&proxy.admin_url("/diffs?route=/api/workouts"))
            .await
            .json()
            .as_array()
            .unwrap()
            .len(),
        0
    );
    for bad in [
        "limit=0",
        "limit=abc",
        "limit=100000",
        "colour=red",
        "route=%zz",
    ] {
        let r = get(&proxy.admin_url(&format!("/diffs?{bad}"))).await;
        assert_eq!(r.status, 400, "{bad}");
        assert_eq!(r.json()["code"], "bad_request");
    }
}

#[tokio::test]
async fn without_the_bug_only_matches_and_the_gate_opens() {
    let legacy = start_legacy(Default::default()).await;
    let users = start_users(None).await;
    let proxy = Proxy::start(&format!("{}[[routes]]\nprefix = \"/api/users\"\nbackend = \"legacy\"\nshadow = \"users\"\n[routes.compare]\nignore = [\"/generated_at\"]\ngate = {{ min_comparisons = 30, max_mismatch_rate = 0.0 }}\n", backends(legacy.addr, users.addr))).await;
    for i in 0..30 {
        assert_eq!(
            get(&proxy.url(&format!("/api/users/{}", i % 25 + 1)))
                .await
                .status,
            if i % 25 < 20 { 200 } else { 404 }
        );
    }
    let m = settled(&proxy, 30.0).await;
    assert_eq!(shadow_count(&m, "match"), 30.0, "{m}");
    assert_eq!(shadow_count(&m, "mismatch"), 0.0);
    let rt = route_json(&proxy, "/api/users").await;
    assert_eq!(rt["compared"], 30);
    assert_eq!(rt["mismatch_rate"], 0.0);
    assert_eq!(rt["ready_to_cut_over"], true);
    assert_eq!(
        get(&proxy.admin_url("/diffs")).await.json(),
        serde_json::json!([])
    );
}

#[tokio::test]
async fn noise_is_learned_so_an_a_a_comparison_settles_to_zero_mismatches() {
    let legacy = start_legacy(Default::default()).await;
    // A/A: the same monolith behind two backend names.
    let proxy = Proxy::start(&format!("{SERVER}[backends.legacy]\nurl = \"http://{0}\"\nlegacy = true\n[backends.legacy2]\nurl = \"http://{0}\"\n[[routes]]\nprefix = \"/api\"\nbackend = \"legacy\"\nshadow = \"legacy2\"\n[routes.compare]\nnoise = true\n", legacy.addr)).await;
    let learned = eventually(Duration::from_secs(20), || async {
        for _ in 0..10 {
            get(&proxy.url("/api/social/feed")).await;
        }
        let rt = route_json(&proxy, "/api").await;
        rt["learned_noise"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p == "/generated_at")
            .then_some(rt)
    })
    .await;
    assert!(
        learned["learned_noise"]
            .as_array()
            .unwrap()
            .iter()
            .all(|p| p.as_str().unwrap().contains("generated_at")),
        "only the timestamp is noise: {learned}"
    );
    let before = settled(&proxy, learned["compared"].as_f64().unwrap()).await;
    let mismatches = shadow_count(&before, "mismatch");
    let done: f64 = ["match", "mismatch"]
        .iter()
        .map(|o| shadow_count(&before, o))
        .sum();
    for i in 0..40 {
        get(&proxy.url(if i % 2 == 0 {
            "/api/social/feed"
        } else {
            "/api/workouts/3"
        }))
        .await;
    }
    let after = settled(&proxy, done + 40.0).await;
    assert_eq!(
        shadow_count(&after, "mismatch"),
        mismatches,
        "after warm-up an A/A comparison has no mismatches"
    );
}

#[tokio::test]
async fn ignore_takes_pointers_with_wildcards_and_headers() {
    let legacy = start_legacy(Default::default()).await;
    let users = start_users(Some(users_service::Bug::EmailCase)).await;
    let proxy = Proxy::start(&format!("{}[[routes]]\nprefix = \"/api/users\"\nbackend = \"legacy\"\nshadow = \"users\"\n[routes.compare]\nignore = [\"/generated_at\", \"/users/*/email\", \"/user/email\", \"header:content-type\"]\n", backends(legacy.addr, users.addr))).await;
    get(&proxy.url("/api/users")).await;
    get(&proxy.url("/api/users/3")).await;
    let m = settled(&proxy, 2.0).await;
    assert_eq!(shadow_count(&m, "match"), 2.0, "{m}");
}

/// A backend answering a fixed JSON body, gzip-encoded when `gzip`.
async fn json_backend(gzip: bool, extra_header: Option<(&'static str, &'static str)>) -> Running {
    use std::io::Write;
    let (l, addr) = listener().await;
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(legacy_stub::http::serve(
        l,
        move |_req, _| async move {
            let body = br#"{"users":[{"id":1,"name":"Ada"}],"total":1}"#;
            let mut resp = legacy_stub::http::json(
                http::StatusCode::OK,
                &serde_json::from_slice(body).unwrap(),
            );
            if gzip {
                let mut enc =
                    flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
                enc.write_all(body).unwrap();
                *resp.body_mut() = Full::new(Bytes::from(enc.finish().unwrap()));
                resp.headers_mut()
                    .insert("content-encoding", "gzip".parse().unwrap());
            }
            if let Some((k, v)) = extra_header {
                resp.headers_mut().insert(k, v.parse().unwrap());
            }
            resp
        },
        async {
            let _ = rx.await;
        },
    ));
    Running {
        addr,
        stop: Some(tx),
    }
}

#[tokio::test]
async fn a_gzipping_monolith_matches_a_plain_new_service() {
    let legacy = json_backend(true, None).await;
    let users = json_backend(false, None).await;
    let proxy = Proxy::start(&format!(
        "{}[[routes]]\nprefix = \"/\"\nbackend = \"legacy\"\nshadow = \"users\"\n",
        backends(legacy.addr, users.addr)
    ))
    .await;
    let r = get(&proxy.url("/api/users")).await;
    assert_eq!(
        r.headers["content-encoding"], "gzip",
        "the client gets the primary's bytes untouched"
    );
    let m = settled(&proxy, 1.0).await;
    assert_eq!(shadow_count(&m, "match"), 1.0, "{m}");
}

#[tokio::test]
async fn cookies_and_credentials_are_redacted_in_diffs() {
    let legacy = json_backend(false, Some(("set-cookie", "session=legacy-secret"))).await;
    let users = json_backend(false, Some(("set-cookie", "session=users-secret"))).await;
    let proxy = Proxy::start(&format!("{}[[routes]]\nprefix = \"/\"\nbackend = \"legacy\"\nshadow = \"users\"\n[routes.compare]\nheaders = [\"content-type\", \"set-cookie\"]\n", backends(legacy.addr, users.addr))).await;
    get(&proxy.url("/x")).await;
    settled(&proxy, 1.0).await;
    let diffs = get(&proxy.admin_url("/diffs")).await;
    assert!(!diffs.text().contains("secret"), "{}", diffs.text());
    assert_eq!(
        diffs.json()[0]["differences"][0],
        serde_json::json!({"path": "header:set-cookie", "kind": "changed", "primary": "[redacted]", "shadow": "[redacted]"})
    );
}

fn percentile(mut v: Vec<Duration>, p: f64) -> Duration {
    v.sort();
    v[((v.len() as f64 * p) as usize).min(v.len() - 1)]
}

async fn latencies(url: &str, n: usize) -> Vec<Duration> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let started = std::time::Instant::now();
        assert_eq!(get(url).await.status, 200);
        out.push(started.elapsed());
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_down_or_garbage_shadow_never_touches_the_client() {
    let legacy = start_echo("legacy").await;
    let slow = start_raw(Misbehave::Hang).await;
    let garbage = start_raw(Misbehave::Garbage).await;
    let down = closed_port().await;
    let base = Proxy::start(&format!("{SERVER}{}", legacy_route(legacy.addr, "/"))).await;
    let baseline = percentile(latencies(&base.url("/x"), 200).await, 0.99);
    for (name, addr) in [
        ("slow", slow.addr),
        ("down", down),
        ("garbage", garbage.addr),
    ] {
        let proxy = Proxy::start(&format!("{SERVER}[backends.legacy]\nurl = \"http://{}\"\nlegacy = true\n[backends.users]\nurl = \"http://{addr}\"\ntimeout = \"3s\"\n[[routes]]\nprefix = \"/\"\nbackend = \"legacy\"\nshadow = \"users\"\n", legacy.addr)).await;
        let lat = latencies(&proxy.url("/x"), 200).await;
        let slowest = lat.iter().max().copied().unwrap_or_default();
        let p99 = percentile(lat, 0.99);
        eprintln!("primary p99 with a {name} shadow: {p99:?}, slowest {slowest:?} (no shadow: p99 {baseline:?})");
        // Structural, not a timing race: a client that waited for its shadow would take the
        // shadow's whole 3 s timeout (slow) or its failure; every answer comes back far
        // sooner, and the slow shadow's legs are still hanging when the last one has.
        assert!(
            slowest < Duration::from_secs(1),
            "{name}: a client waited {slowest:?} (p99 {p99:?}, {baseline:?} without shadow)"
        );
        if name == "slow" {
            assert!(
                proxy.state.shadows().in_flight() > 0,
                "every client was answered while the shadow legs still hang"
            );
        }
        if name != "slow" {
            let m = settled(&proxy, 200.0).await;
            assert_eq!(shadow_count(&m, "error"), 200.0, "{name}: {m}");
        }
    }
}

#[tokio::test]
async fn legs_over_the_cap_are_dropped_not_queued() {
    let legacy = start_echo("legacy").await;
    let slow = start_raw(Misbehave::Hang).await;
    let proxy = Proxy::start(&format!("{SERVER}[backends.legacy]\nurl = \"http://{}\"\nlegacy = true\n[backends.users]\nurl = \"http://{}\"\ntimeout = \"5s\"\n[[routes]]\nprefix = \"/\"\nbackend = \"legacy\"\nshadow = \"users\"\n", legacy.addr, slow.addr)).await;
    let n = strangler::shadow::MAX_SHADOW_TASKS + 40;
    for _ in 0..n {
        assert_eq!(get(&proxy.url("/x")).await.status, 200);
    }
    let m = metrics_text(&proxy).await;
    assert_eq!(shadow_count(&m, "dropped"), 40.0, "{m}");
    assert_eq!(
        proxy.state.shadows().in_flight(),
        strangler::shadow::MAX_SHADOW_TASKS
    );
}

#[tokio::test]
async fn bodies_over_max_body_are_skipped_and_still_reach_the_client_whole() {
    let legacy = start_echo("legacy").await;
    let users = start_echo("users").await;
    let proxy = Proxy::start(&format!("{}[[routes]]\nprefix = \"/\"\nbackend = \"legacy\"\nshadow = \"users\"\nshadow_methods = [\"GET\", \"POST\"]\n[routes.compare]\nmax_body = \"8KiB\"\n", backends(legacy.addr, users.addr))).await;
    let r = get(&proxy.url("/stream/64")).await;
    assert_eq!(
        r.body.len(),
        64 * 1024,
        "the client's body is never truncated"
    );
    let big = send_with(
        Method::POST,
        &proxy.url("/upload"),
        &[],
        vec![b'x'; 32 * 1024],
    )
    .await;
    assert_eq!(big.json()["body_len"], 32 * 1024);
    let m = settled(&proxy, 2.0).await;
    assert_eq!(shadow_count(&m, "skipped"), 2.0, "{m}");
}

#[tokio::test]
async fn writes_are_mirrored_only_when_opted_in_and_carry_the_marker() {
    let legacy = start_legacy(Default::default()).await;
    let users = start_users(None).await;
    let post = |proxy: &Proxy| {
        let url = proxy.url("/api/users");
        async move {
            send_with(
                Method::POST,
                &url,
                &[("content-type", "application/json")],
                r#"{"name":"Rosalind","email":"r@fittrack.example"}"#,
            )
            .await
        }
    };
    let default = Proxy::start(&format!("{}[[routes]]\nprefix = \"/api/users\"\nbackend = \"legacy\"\nshadow = \"users\"\n[routes.compare]\nignore = [\"/generated_at\"]\n", backends(legacy.addr, users.addr))).await;
    assert_eq!(post(&default).await.status, 201);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let m = metrics_text(&default).await;
    assert_eq!(
        all_outcomes(&m),
        0.0,
        "POST is not mirrored by default: {m}"
    );
    let opted = Proxy::start(&format!("{}[[routes]]\nprefix = \"/api/users\"\nbackend = \"legacy\"\nshadow = \"users\"\nshadow_methods = [\"GET\", \"POST\"]\n[routes.compare]\nignore = [\"/generated_at\"]\n", backends(legacy.addr, users.addr))).await;
    let r = post(&opted).await;
    assert_eq!(r.status, 201);
    let m = settled(&opted, 1.0).await;
    // The monolith created user 22 (21 came from the first proxy); users-service answered 21
    // for its copy, marked as a shadow, and did not keep it.
    assert_eq!(shadow_count(&m, "mismatch"), 1.0, "{m}");
    assert_eq!(
        get(&format!("http://{}/api/users", users.addr))
            .await
            .json()["total"],
        20,
        "the shadow write was not kept"
    );
}

#[tokio::test]
async fn a_request_already_marked_as_shadow_is_never_shadowed_again() {
    let legacy = start_echo("legacy").await;
    let users = start_echo("users").await;
    let proxy = Proxy::start(&format!(
        "{}[[routes]]\nprefix = \"/\"\nbackend = \"legacy\"\nshadow = \"users\"\n",
        backends(legacy.addr, users.addr)
    ))
    .await;
    let r = send_with(
        Method::GET,
        &proxy.url("/x"),
        &[("x-strangler-shadow", "1")],
        Bytes::new(),
    )
    .await;
    assert!(
        r.json()["headers"].get("x-strangler-shadow").is_none(),
        "the marker is stripped before the primary"
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(all_outcomes(&metrics_text(&proxy).await), 0.0);
}

#[tokio::test]
async fn shadow_percent_samples_requests() {
    let legacy = start_echo("legacy").await;
    let users = start_echo("users").await;
    for (percent, lo, hi) in [(0, 0.0, 0.0), (50, 60.0, 140.0), (100, 200.0, 200.0)] {
        let proxy = Proxy::start(&format!("{}[[routes]]\nprefix = \"/\"\nbackend = \"legacy\"\nshadow = \"users\"\nshadow_percent = {percent}\n", backends(legacy.addr, users.addr))).await;
        for _ in 0..200 {
            get(&proxy.url("/x")).await;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        let m = metrics_text(&proxy).await;
        let n = all_outcomes(&m);
        assert!(
            (lo..=hi).contains(&n),
            "shadow_percent {percent}: {n} of 200"
        );
    }
}

#[tokio::test]
async fn reverse_shadow_compares_the_other_way_round() {
    let legacy = start_legacy(Default::default()).await;
    let users = start_users(Some(users_service::Bug::EmailCase)).await;
    let proxy = Proxy::start(&format!("{}[[routes]]\nprefix = \"/api/users\"\nbackend = \"users\"\nshadow = \"legacy\"\n[routes.compare]\nignore = [\"/generated_at\"]\n", backends(legacy.addr, users.addr))).await;
    assert_eq!(
        route_json(&proxy, "/api/users").await["stage"],
        "cut over, reverse shadow"
    );
    let r = get(&proxy.url("/api/users/1")).await;
    assert_eq!(
        r.json()["user"]["email"],
        "ada.dijkstra1@fittrack.example",
        "the new service answers"
    );
    settled(&proxy, 1.0).await;
    let d = &get(&proxy.admin_url("/diffs")).await.json()[0];
    assert_eq!(d["primary"]["backend"], "users");
    assert_eq!(d["shadow"]["backend"], "legacy");
    assert_eq!(
        d["differences"][0]["primary"],
        "ada.dijkstra1@fittrack.example"
    );
    assert_eq!(
        d["differences"][0]["shadow"],
        "Ada.Dijkstra1@FitTrack.example"
    );
}

#[tokio::test]
async fn stats_survive_reloads_that_keep_the_pairing_and_reset_when_it_changes() {
    let legacy = start_legacy(Default::default()).await;
    let users = start_users(None).await;
    let cfg = |extra: &str| {
        format!("{}[[routes]]\nprefix = \"/api/users\"\nbackend = \"legacy\"\nshadow = \"users\"\n[routes.compare]\nignore = [\"/generated_at\"]\n{extra}", backends(legacy.addr, users.addr))
    };
    let proxy = Proxy::start(&cfg("")).await;
    for _ in 0..3 {
        get(&proxy.url("/api/users/1")).await;
    }
    settled(&proxy, 3.0).await;
    reload_with(
        &proxy,
        &cfg("[[routes]]\nprefix = \"/\"\nbackend = \"legacy\"\n"),
    )
    .await;
    assert_eq!(route_json(&proxy, "/api/users").await["compared"], 3);
    // A new backend declared first (every backend index moves) and its route.
    let orders = start_echo("orders").await;
    let with_orders = cfg("[[routes]]\nprefix = \"/api/orders\"\nbackend = \"orders\"\n");
    let at = with_orders.find("[backends.").unwrap();
    let with_orders = format!(
        "{}[backends.orders]\nurl = \"http://{}\"\n{}",
        &with_orders[..at],
        orders.addr,
        &with_orders[at..]
    );
    let requests = route_json(&proxy, "/api/users").await["traffic"]["requests"].clone();
    reload_with(&proxy, &with_orders).await;
    let route = route_json(&proxy, "/api/users").await;
    assert_eq!(
        route["compared"], 3,
        "other backends and routes keep the statistics"
    );
    assert_eq!(
        route["traffic"]["requests"], requests,
        "and the traffic counters"
    );
    assert_eq!(requests, 3);
    reload_with(
        &proxy,
        &cfg("").replace(
            "backend = \"legacy\"\nshadow = \"users\"",
            "backend = \"users\"\nshadow = \"legacy\"",
        ),
    )
    .await;
    assert_eq!(
        route_json(&proxy, "/api/users").await["compared"],
        0,
        "a new pairing starts fresh"
    );
}

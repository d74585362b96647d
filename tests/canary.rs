//! Canary, fallback and guard end to end: split accuracy and stickiness, monotonic growth,
//! each fallback case (and the POST that must not be retried), the guard tripping and
//! resetting.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a panic is a failure report

mod support;

use std::collections::HashMap;

use bytes::Bytes;
use http::Method;
use support::*;

const SERVER: &str =
    "[server]\nlisten = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\nwatch = \"off\"\n";

fn two(legacy: std::net::SocketAddr, users: std::net::SocketAddr, users_extra: &str) -> String {
    format!("{SERVER}[backends.legacy]\nurl = \"http://{legacy}\"\nlegacy = true\n[backends.users]\nurl = \"http://{users}\"\n{users_extra}\n")
}

async fn who(proxy: &Proxy, path: &str, header: Option<(&str, &str)>) -> String {
    send_with(
        Method::GET,
        &proxy.url(path),
        header.as_slice(),
        Bytes::new(),
    )
    .await
    .backend()
}

#[tokio::test]
async fn sticky_header_canary_splits_accurately_and_sticks() {
    let legacy = start_echo("legacy").await;
    let users = start_echo("users").await;
    let cfg = |p: u32| {
        format!("{}[[routes]]\nprefix = \"/\"\nbackend = \"legacy\"\ncanary = {{ backend = \"users\", percent = {p}, sticky = \"header:x-user-id\" }}\n", two(legacy.addr, users.addr, ""))
    };
    let proxy = Proxy::start(&cfg(10)).await;
    let keys = 2000;
    let mut at10: HashMap<u32, String> = HashMap::new();
    for k in 0..keys {
        at10.insert(
            k,
            who(&proxy, "/x", Some(("x-user-id", &k.to_string()))).await,
        );
    }
    let share = at10.values().filter(|b| *b == "users").count() as f64 / keys as f64;
    assert!((share - 0.10).abs() < 0.03, "10% canary served {share}");
    for k in 0..200 {
        assert_eq!(
            who(&proxy, "/x", Some(("x-user-id", &k.to_string()))).await,
            at10[&k],
            "key {k} moved"
        );
    }
    // Requests without the key stay on the route's backend.
    for _ in 0..20 {
        assert_eq!(who(&proxy, "/x", None).await, "legacy");
    }
    // Raise to 50%: users only move from legacy to users, never back.
    reload_with(&proxy, &cfg(50)).await;
    let mut at50 = 0;
    for k in 0..keys {
        let now = who(&proxy, "/x", Some(("x-user-id", &k.to_string()))).await;
        if at10[&k] == "users" {
            assert_eq!(now, "users", "key {k} left the canary as it grew");
        }
        at50 += usize::from(now == "users");
    }
    let share = at50 as f64 / keys as f64;
    assert!((share - 0.50).abs() < 0.03, "50% canary served {share}");
}

#[tokio::test]
async fn cookie_ip_and_random_canaries() {
    let legacy = start_echo("legacy").await;
    let users = start_echo("users").await;
    let route = |sticky: &str| {
        format!("{}[[routes]]\nprefix = \"/\"\nbackend = \"legacy\"\ncanary = {{ backend = \"users\", percent = 50{sticky} }}\n", two(legacy.addr, users.addr, ""))
    };
    let proxy = Proxy::start(&route(", sticky = \"cookie:uid\"")).await;
    for k in 0..50 {
        let cookie = format!("theme=dark; uid={k}");
        let first = who(&proxy, "/x", Some(("cookie", &cookie))).await;
        let bucket = strangler::routes::canary_bucket(k.to_string().as_bytes());
        assert_eq!(
            first,
            if bucket < 5000 { "users" } else { "legacy" },
            "cookie uid={k}"
        );
        assert_eq!(who(&proxy, "/x", Some(("cookie", &cookie))).await, first);
    }
    // Sticky by ip: this client (127.0.0.1) always lands on the same side.
    let proxy = Proxy::start(&route(", sticky = \"ip\"")).await;
    let side = who(&proxy, "/x", None).await;
    let want = if strangler::routes::canary_bucket(b"127.0.0.1") < 5000 {
        "users"
    } else {
        "legacy"
    };
    assert_eq!(side, want);
    for _ in 0..20 {
        assert_eq!(who(&proxy, "/x", None).await, side);
    }
    // Random: both sides, roughly half.
    let proxy = Proxy::start(&route("")).await;
    let mut users_n = 0;
    for _ in 0..400 {
        users_n += usize::from(who(&proxy, "/x", None).await == "users");
    }
    assert!(
        (140..=260).contains(&users_n),
        "random 50% gave {users_n}/400"
    );
    let m = metrics_text(&proxy).await;
    assert_eq!(
        metric(
            &m,
            "strangler_requests_total",
            &[("route", "/"), ("backend", "users"), ("status", "200")]
        ),
        Some(users_n as f64)
    );
}

fn fallback_cfg(
    users: std::net::SocketAddr,
    legacy: std::net::SocketAddr,
    users_extra: &str,
) -> String {
    format!(
        "{}[[routes]]\nprefix = \"/\"\nbackend = \"users\"\nfallback = \"legacy\"\n",
        two(legacy, users, users_extra)
    )
}

async fn fallbacks(proxy: &Proxy) -> f64 {
    metric(
        &metrics_text(proxy).await,
        "strangler_fallback_total",
        &[("route", "/"), ("from", "users"), ("to", "legacy")],
    )
    .unwrap_or(0.0)
}

#[tokio::test]
async fn connect_failure_falls_back_for_any_method_body_included() {
    let legacy = start_echo("legacy").await;
    let proxy = Proxy::start(&fallback_cfg(closed_port().await, legacy.addr, "")).await;
    let r = send_with(
        Method::POST,
        &proxy.url("/api/users"),
        &[],
        vec![b'p'; 5000],
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["backend"], "legacy");
    assert_eq!(
        r.json()["body_len"],
        5000,
        "the never-sent body reaches the fallback whole"
    );
    assert_eq!(r.json()["method"], "POST");
    assert_eq!(fallbacks(&proxy).await, 1.0);
    let m = metrics_text(&proxy).await;
    assert_eq!(
        metric(
            &m,
            "strangler_requests_total",
            &[("route", "/"), ("backend", "legacy"), ("status", "200")]
        ),
        Some(1.0)
    );
}

#[tokio::test]
async fn a_5xx_falls_back_for_idempotent_methods_only() {
    let legacy = start_echo("legacy").await;
    let users = start_echo("users").await;
    let proxy = Proxy::start(&fallback_cfg(users.addr, legacy.addr, "")).await;
    // /status/503 makes the echo backend answer 503.
    for method in [Method::GET, Method::PUT, Method::DELETE] {
        let r = send_with(
            method.clone(),
            &proxy.url("/status/503"),
            &[],
            "{\"plan\":\"pro\"}",
        )
        .await;
        assert_eq!(
            r.status, 503,
            "the fallback (same echo) answers 503 too: {method}"
        );
        assert_eq!(
            r.json()["backend"],
            "legacy",
            "{method} went to the fallback"
        );
        if method == Method::PUT {
            assert_eq!(r.json()["body_len"], 14, "the replayed PUT body is whole");
        }
    }
    let r = send_with(Method::POST, &proxy.url("/status/503"), &[], "{}").await;
    assert_eq!(r.status, 503);
    assert_eq!(
        r.json()["backend"],
        "users",
        "a POST that reached the new service is never sent again"
    );
    assert_eq!(fallbacks(&proxy).await, 3.0);
}

#[tokio::test]
async fn a_timeout_falls_back_for_idempotent_methods_only() {
    let legacy = start_echo("legacy").await;
    let hang = start_raw(Misbehave::Hang).await;
    let proxy = Proxy::start(&fallback_cfg(hang.addr, legacy.addr, "timeout = \"300ms\"")).await;
    let r = get(&proxy.url("/api/users/1")).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["backend"], "legacy");
    let r = send_with(Method::POST, &proxy.url("/api/users"), &[], "{}").await;
    assert_eq!(
        r.status, 504,
        "a POST that may have reached the new service is not retried"
    );
    assert_eq!(r.json()["code"], "upstream_timeout");
    assert_eq!(fallbacks(&proxy).await, 1.0);
}

#[tokio::test]
async fn the_guard_trips_on_errors_of_the_new_backend_and_resets() {
    let legacy = start_legacy(Default::default()).await;
    // The "new" side fails half its requests, as `legacy-stub --error-rate 0.5` does.
    let flaky = start_legacy(legacy_stub::Options {
        error_rate: 0.5,
        ..Default::default()
    })
    .await;
    let cfg = |extra: &str| {
        format!("{}[[routes]]\nprefix = \"/api/users\"\nbackend = \"users\"\n[routes.guard]\nmax_error_rate = 0.2\nwindow = \"1m\"\nmin_requests = 20\n{extra}", two(legacy.addr, flaky.addr, ""))
    };
    let proxy = Proxy::start(&cfg("")).await;
    assert_eq!(route_json(&proxy, "/api/users").await["stage"], "cut over");
    let mut statuses = Vec::new();
    for _ in 0..20 {
        statuses.push(get(&proxy.url("/api/users/1")).await.status.as_u16());
    }
    assert!(
        statuses.contains(&500),
        "the flaky side failed some: {statuses:?}"
    );
    let r = route_json(&proxy, "/api/users").await;
    // Exact oracle: the guard trips at the 20th answer if more than 20% of them failed
    // (at a 50% error rate that is all but certain; if the dice said otherwise, send more).
    let errors = statuses.iter().filter(|&&s| s == 500).count();
    assert_eq!(
        r["guard_tripped"],
        errors * 5 > statuses.len(),
        "{errors} errors in {statuses:?}: {r}"
    );
    let mut sent = statuses.len();
    while route_json(&proxy, "/api/users").await["guard_tripped"] == false {
        assert!(sent < 200, "a 50% error rate never tripped a 20% guard");
        get(&proxy.url("/api/users/1")).await;
        sent += 1;
    }
    let r = route_json(&proxy, "/api/users").await;
    assert_eq!(r["stage"], "rolled back by guard");
    let m = metrics_text(&proxy).await;
    assert_eq!(
        metric(&m, "strangler_guard_tripped", &[("route", "/api/users")]),
        Some(1.0)
    );
    // Rolled back: every request is answered by legacy now.
    for _ in 0..30 {
        assert_eq!(get(&proxy.url("/api/users/1")).await.status, 200);
    }
    let m = metrics_text(&proxy).await;
    assert_eq!(
        metric(
            &m,
            "strangler_requests_total",
            &[
                ("route", "/api/users"),
                ("backend", "legacy"),
                ("status", "200")
            ]
        ),
        Some(30.0),
        "{m}"
    );
    // Reset by an operator.
    let reset = |q: &'static str| {
        let url = proxy.admin_url(&format!("/guard/reset{q}"));
        async move { send_with(Method::POST, &url, &[], Bytes::new()).await }
    };
    assert_eq!(reset("").await.status, 400);
    assert_eq!(reset("?route=/nope").await.status, 404);
    let r = reset("?route=/api/users").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["was_tripped"], true);
    let r = route_json(&proxy, "/api/users").await;
    assert_eq!(r["guard_tripped"], false);
    assert_eq!(r["stage"], "cut over");
    assert_eq!(
        metric(
            &metrics_text(&proxy).await,
            "strangler_guard_tripped",
            &[("route", "/api/users")]
        ),
        Some(0.0)
    );
}

#[tokio::test]
async fn a_tripped_guard_holds_across_reloads_of_other_routes_and_clears_when_its_entry_changes() {
    let legacy = start_legacy(Default::default()).await;
    let broken = start_legacy(legacy_stub::Options {
        fail_paths: vec!["/api".into()],
        ..Default::default()
    })
    .await;
    let cfg = |rate: &str, extra: &str| {
        format!("{}[[routes]]\nprefix = \"/api/users\"\nbackend = \"users\"\n[routes.guard]\nmax_error_rate = {rate}\nmin_requests = 5\n{extra}", two(legacy.addr, broken.addr, ""))
    };
    let proxy = Proxy::start(&cfg("0.5", "")).await;
    for _ in 0..5 {
        get(&proxy.url("/api/users/1")).await;
    }
    assert_eq!(
        route_json(&proxy, "/api/users").await["guard_tripped"],
        true
    );
    reload_with(
        &proxy,
        &cfg("0.5", "[[routes]]\nprefix = \"/\"\nbackend = \"legacy\"\n"),
    )
    .await;
    assert_eq!(
        route_json(&proxy, "/api/users").await["guard_tripped"],
        true,
        "another route's change keeps the trip"
    );
    // The routine next step of a migration: a new backend, declared first in the file (so the
    // index of every other backend moves), and its route.
    let orders = start_echo("orders").await;
    let next = cfg(
        "0.5",
        "[[routes]]\nprefix = \"/api/orders\"\nbackend = \"orders\"\n[[routes]]\nprefix = \"/\"\nbackend = \"legacy\"\n",
    )
    .replacen(
        SERVER,
        &format!("{SERVER}[backends.orders]\nurl = \"http://{}\"\n", orders.addr),
        1,
    );
    reload_with(&proxy, &next).await;
    assert_eq!(
        route_json(&proxy, "/api/users").await["guard_tripped"],
        true,
        "a new backend and route keep the trip"
    );
    assert_eq!(
        get(&proxy.url("/api/orders/1")).await.json()["backend"],
        "orders"
    );
    for _ in 0..5 {
        let r = get(&proxy.url("/api/users/1")).await;
        assert_eq!(
            r.status, 200,
            "still answered by legacy, not the failing service"
        );
        assert_ne!(
            r.json()["backend"],
            "orders",
            "the trip's target follows its name"
        );
    }
    reload_with(
        &proxy,
        &cfg("0.6", "[[routes]]\nprefix = \"/\"\nbackend = \"legacy\"\n"),
    )
    .await;
    assert_eq!(
        route_json(&proxy, "/api/users").await["guard_tripped"],
        false,
        "editing the route's entry clears it"
    );
}

#[tokio::test]
async fn the_guard_does_not_trip_below_min_requests_or_on_client_errors() {
    let legacy = start_legacy(Default::default()).await;
    let broken = start_legacy(legacy_stub::Options {
        fail_paths: vec!["/api/users/1".into()],
        ..Default::default()
    })
    .await;
    let proxy = Proxy::start(&format!("{}[[routes]]\nprefix = \"/api/users\"\nbackend = \"users\"\n[routes.guard]\nmax_error_rate = 0.1\nmin_requests = 50\n", two(legacy.addr, broken.addr, ""))).await;
    for _ in 0..5 {
        assert_eq!(get(&proxy.url("/api/users/1")).await.status, 500);
    }
    assert_eq!(
        route_json(&proxy, "/api/users").await["guard_tripped"],
        false,
        "5 errors in 5 requests: below min_requests"
    );
    // 404s are answers, not errors: 5 errors in 65 requests is under 10%.
    for _ in 0..60 {
        assert_eq!(get(&proxy.url("/api/users/999")).await.status, 404);
    }
    assert_eq!(
        route_json(&proxy, "/api/users").await["guard_tripped"],
        false
    );
    // Two more errors: 7 in 67 is over 10%.
    for _ in 0..2 {
        get(&proxy.url("/api/users/1")).await;
    }
    assert_eq!(
        route_json(&proxy, "/api/users").await["guard_tripped"],
        true
    );
}

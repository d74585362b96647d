//! The admin listener: probes, metrics, /routes, reload, and the token.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a panic is a failure report

mod support;

use bytes::Bytes;
use http::Method;
use support::*;

const ROUTES: &str = "[[routes]]\nprefix = \"/api/users\"\nbackend = \"legacy\"\nshadow = \"users\"\n\
[[routes]]\nprefix = \"/api/social\"\nbackend = \"legacy\"\ncanary = { backend = \"users\", percent = 10, sticky = \"header:x-user-id\" }\n\
[[routes]]\nprefix = \"/\"\nbackend = \"legacy\"\n";

async fn start() -> (Proxy, Running, Running) {
    start_with("").await
}

/// [`start`] with `server` (a `[server]` section, or nothing for the defaults) first.
async fn start_with(server: &str) -> (Proxy, Running, Running) {
    let legacy = start_legacy(Default::default()).await;
    let users = start_users(None).await;
    let proxy = Proxy::start(&format!(
        "{server}{}[backends.users]\nurl = \"http://{}\"\n{ROUTES}",
        legacy_at(legacy.addr),
        users.addr
    ))
    .await;
    (proxy, legacy, users)
}

#[tokio::test]
async fn probes_and_metrics() {
    let (proxy, _l, _u) = start().await;
    assert_eq!(get(&proxy.admin_url("/healthz")).await.status, 200);
    let ready = get(&proxy.admin_url("/readyz")).await;
    assert_eq!(ready.status, 200);
    assert_eq!(ready.json()["generation"], 1);
    for _ in 0..3 {
        assert_eq!(get(&proxy.url("/api/users/7")).await.status, 200);
    }
    assert_eq!(get(&proxy.url("/api/users/999")).await.status, 404);
    let m = get(&proxy.admin_url("/metrics")).await;
    assert!(m.headers["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/plain"));
    let text = m.text();
    assert_eq!(
        metric(
            &text,
            "strangler_requests_total",
            &[
                ("route", "/api/users"),
                ("backend", "legacy"),
                ("status", "200")
            ]
        ),
        Some(3.0),
        "{text}"
    );
    assert_eq!(
        metric(
            &text,
            "strangler_requests_total",
            &[("route", "/api/users"), ("status", "404")]
        ),
        Some(1.0)
    );
    assert_eq!(metric(&text, "strangler_config_generation", &[]), Some(1.0));
    assert_eq!(
        metric(&text, "strangler_config_last_reload_successful", &[]),
        Some(1.0)
    );
    proxy.state.metrics().upkeep();
    let text = metrics_text(&proxy).await;
    assert_eq!(
        metric(
            &text,
            "strangler_request_duration_seconds_count",
            &[("route", "/api/users"), ("backend", "legacy")]
        ),
        Some(4.0),
        "{text}"
    );
    for line in text
        .lines()
        .filter(|l| l.starts_with("strangler_requests_total"))
    {
        assert!(
            !line.contains("/api/users/7"),
            "a raw path became a label: {line}"
        );
    }
}

#[tokio::test]
async fn routes_json_reports_the_table() {
    let (proxy, _l, _u) = start().await;
    get(&proxy.url("/api/users")).await;
    let r = routes_json(&proxy).await;
    assert_eq!(r["generation"], 1);
    assert_eq!(r["source_sha256"].as_str().unwrap().len(), 64);
    assert_eq!(r["last_reload"]["ok"], true);
    assert!(r["loaded_at"].as_str().unwrap().ends_with('Z'));
    let routes = r["routes"].as_array().unwrap();
    assert_eq!(routes.len(), 3);
    assert_eq!(routes[0]["prefix"], "/api/users");
    assert_eq!(routes[0]["stage"], "shadowing");
    assert_eq!(routes[0]["shadow"], "users");
    assert_eq!(routes[0]["fallback"], serde_json::Value::Null);
    assert_eq!(routes[0]["canary"], serde_json::Value::Null);
    assert_eq!(routes[0]["guard_tripped"], false);
    assert!(
        routes[0]["compared"].is_u64(),
        "shadowed routes report comparisons"
    );
    assert_eq!(routes[0]["ready_to_cut_over"], false);
    assert_eq!(routes[1]["stage"], "canary 10%");
    assert_eq!(routes[1]["canary"]["sticky"], "header:x-user-id");
    assert_eq!(routes[2]["shadow"], serde_json::Value::Null);
    assert!(
        routes[2].get("compared").is_none(),
        "only shadowed routes report comparisons"
    );
    let cov = &r["coverage"];
    assert!(
        (cov["routes"].as_f64().unwrap() - 0.1 / 3.0).abs() < 1e-9,
        "{cov}"
    );
    assert_eq!(cov["requests"], 0.0);
}

#[tokio::test]
async fn admin_errors_are_json() {
    let (proxy, _l, _u) = start().await;
    let r = get(&proxy.admin_url("/nope")).await;
    assert_eq!(r.status, 404);
    assert_eq!(r.json()["code"], "not_found");
    let r = send_with(
        Method::DELETE,
        &proxy.admin_url("/routes"),
        &[],
        Bytes::new(),
    )
    .await;
    assert_eq!(r.status, 405);
    let r = get(&proxy.admin_url("/reload")).await;
    assert_eq!(r.status, 405, "reload is POST only");
}

#[tokio::test]
async fn token_protects_everything_but_the_probes() {
    let legacy = start_legacy(Default::default()).await;
    let proxy = proxy_to_with(legacy.addr, "", "admin_token = \"s3cret\"").await;
    assert_eq!(get(&proxy.admin_url("/healthz")).await.status, 200);
    assert_eq!(get(&proxy.admin_url("/readyz")).await.status, 200);
    for path in ["/metrics", "/routes"] {
        let r = get(&proxy.admin_url(path)).await;
        assert_eq!(r.status, 401, "{path}");
        assert_eq!(r.headers["www-authenticate"], "Bearer");
        for bad in [
            "Bearer wrong",
            "Bearer s3cre",
            "Bearer s3cret2",
            "s3cret",
            "Basic czNjcmV0",
        ] {
            let r = send_with(
                Method::GET,
                &proxy.admin_url(path),
                &[("authorization", bad)],
                Bytes::new(),
            )
            .await;
            assert_eq!(r.status, 401, "{path} {bad}");
        }
        let r = send_with(
            Method::GET,
            &proxy.admin_url(path),
            &[("authorization", "Bearer s3cret")],
            Bytes::new(),
        )
        .await;
        assert_eq!(r.status, 200, "{path}");
    }
}

#[tokio::test]
async fn post_reload_swaps_valid_tables_and_keeps_serving_on_invalid_ones() {
    // No file watcher: every reload here is the POST's own (a watcher could apply a file
    // first on a loaded machine, and the POST would then find nothing to change).
    const SERVER: &str = "[server]\nlisten = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\ndrain_timeout = \"5s\"\nwatch = \"off\"\n\n";
    let (proxy, legacy, users) = start_with(SERVER).await;
    let reload =
        || async { send_with(Method::POST, &proxy.admin_url("/reload"), &[], Bytes::new()).await };
    // Unchanged file: success, same generation.
    let r = reload().await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["changed"], false);
    assert_eq!(r.json()["generation"], 1);
    // Cut /api/users over.
    let cut = format!(
        "{}[backends.users]\nurl = \"http://{}\"\n{}",
        legacy_at(legacy.addr),
        users.addr,
        ROUTES.replace(
            "backend = \"legacy\"\nshadow = \"users\"",
            "backend = \"users\""
        )
    );
    std::fs::write(proxy.path(), format!("{SERVER}{cut}")).unwrap();
    let r = reload().await.json();
    assert_eq!(r["ok"], true);
    assert_eq!(r["generation"], 2);
    assert_eq!(r["changes"][0], "/api/users: shadowing -> cut over");
    // A broken file: every error, the old table keeps serving.
    std::fs::write(
        proxy.path(),
        "[[routes]]\nprefix = \"/\"\nbackend = \"nowhere\"\n",
    )
    .unwrap();
    let r = reload().await;
    assert_eq!(r.status, 422);
    let j = r.json();
    assert_eq!(j["ok"], false);
    assert!(
        j["errors"].as_array().unwrap().iter().any(|e| e
            .as_str()
            .unwrap()
            .contains("routes.toml:3:11: `backend`: unknown backend")),
        "{j}"
    );
    let routes = routes_json(&proxy).await;
    assert_eq!(routes["generation"], 2);
    assert_eq!(routes["last_reload"]["ok"], false);
    assert!(routes["last_reload"]["error"]
        .as_str()
        .unwrap()
        .contains("unknown backend"));
    assert_eq!(
        get(&proxy.url("/api/users/1")).await.status,
        200,
        "old table still serves"
    );
    let m = metrics_text(&proxy).await;
    assert_eq!(failed_reloads(&m), Some(1.0));
    assert_eq!(
        metric(
            &m,
            "strangler_config_reloads_total",
            &[("outcome", "success")]
        ),
        Some(2.0)
    );
    assert_eq!(
        metric(&m, "strangler_config_last_reload_successful", &[]),
        Some(0.0)
    );
    assert_eq!(metric(&m, "strangler_config_generation", &[]), Some(2.0));
}

//! The migration board at the admin listener's `/`, served and rendered in a real browser.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a panic is a failure report

mod support;

use std::time::Duration;

use bytes::Bytes;
use http::Method;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use support::jwt::{secret_dir, ISSUER, SECRET};
use support::*;

async fn migrating_proxy() -> (Proxy, Vec<Running>) {
    migrating_proxy_with("", "", "").await
}

/// The migrating proxy with `section` before the backends (an `[events]`), and `users_extra`
/// and `root_extra` as extra lines of the `/api/users` and `/` routes.
async fn migrating_proxy_with(
    section: &str,
    users_extra: &str,
    root_extra: &str,
) -> (Proxy, Vec<Running>) {
    let legacy = start_legacy(Default::default()).await;
    let users = start_users(Some(users_service::Bug::EmailCase)).await;
    let flaky = start_legacy(legacy_stub::Options {
        fail_paths: vec!["/api/social".into()],
        ..Default::default()
    })
    .await;
    let proxy = Proxy::start(&format!(
        "{section}{}[backends.users]\nurl = \"http://{}\"\n[backends.social]\nurl = \"http://{}\"\n\
         [[routes]]\nprefix = \"/api/users\"\nbackend = \"legacy\"\nshadow = \"users\"\n{users_extra}\n[routes.compare]\nignore = [\"/generated_at\"]\n\
         [[routes]]\nprefix = \"/api/social\"\nbackend = \"social\"\n[routes.guard]\nmax_error_rate = 0.5\nmin_requests = 3\n\
         [[routes]]\nprefix = \"/\"\nbackend = \"legacy\"\n{root_extra}\n",
        legacy_at(legacy.addr),
        users.addr,
        flaky.addr
    ))
    .await;
    for i in 1..=5 {
        get(&proxy.url(&format!("/api/users/{i}"))).await;
        get(&proxy.url("/api/social/feed")).await;
        get(&proxy.url("/api/workouts")).await;
    }
    eventually(Duration::from_secs(5), || async {
        (!get(&proxy.admin_url("/diffs"))
            .await
            .json()
            .as_array()
            .unwrap()
            .is_empty())
        .then_some(())
    })
    .await;
    (proxy, vec![legacy, users, flaky])
}

#[tokio::test]
async fn the_board_is_one_self_contained_page() {
    let (proxy, _backends) = migrating_proxy().await;
    let r = get(&proxy.admin_url("/")).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.headers["content-type"], "text/html; charset=utf-8");
    assert!(r.headers["content-security-policy"]
        .to_str()
        .unwrap()
        .contains("connect-src 'self'"));
    let html = r.text();
    assert!(html.contains("strangler migration board"));
    for external in ["https://", "http://", "src=\"//", "@import"] {
        assert!(
            !html.contains(external),
            "the board must work offline: found {external}"
        );
    }
}

fn chromium() -> String {
    ["chromium", "chromium-browser", "/usr/bin/chromium"]
        .into_iter()
        .find(|c| {
            std::process::Command::new(c)
                .arg("--version")
                .output()
                .is_ok_and(|o| o.status.success())
        })
        .expect("Chromium is needed for this test: apt-get install chromium (CI does)")
        .to_string()
}

async fn headless(url: &str, extra: &[&str], dir: &std::path::Path) -> std::process::Output {
    let mut cmd = tokio::process::Command::new(chromium());
    cmd.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--virtual-time-budget=6000",
        "--window-size=1366,900",
    ])
    .arg(format!("--user-data-dir={}", dir.display()))
    .args(extra)
    .arg(url);
    tokio::time::timeout(Duration::from_secs(60), cmd.output())
        .await
        .expect("chromium hung")
        .expect("chromium ran")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Chromium: CI installs it and runs this with --ignored"]
async fn the_board_renders_in_a_real_browser() {
    let (proxy, _backends) = migrating_proxy().await;
    let profile = tempfile::tempdir().unwrap();
    let out = headless(&proxy.admin_url("/"), &["--dump-dom"], profile.path()).await;
    let dom = String::from_utf8_lossy(&out.stdout);
    assert!(dom.contains("strangler migration board"), "{dom}");
    // Every route with its stage, the shadow readiness, the tripped guard, the mismatch.
    for want in [
        "/api/users",
        "/api/social",
        "shadowing",
        "rolled back by guard",
        "TRIPPED → legacy",
        "not yet",
        "GET /api/users/",
        "/user/email",
        "generation 1",
    ] {
        assert!(dom.contains(want), "rendered board lacks {want:?}:\n{dom}");
    }
    assert!(dom.contains("Migration coverage"));
    // Connections: the listener's clients and each endpoint under its bounds.
    for want in [
        "Connections",
        "accepted",
        "listen backlog",
        "/ 1,024",
        "/ 10,000",
    ] {
        assert!(
            rendered(&dom).contains(want),
            "rendered board lacks {want:?}:\n{dom}"
        );
    }
    // No [events]: no events panel, and no route note.
    assert!(
        opening_tag(&dom, "id=\"events-panel\"").contains("hidden"),
        "the events panel shows without [events]:\n{dom}"
    );
    assert!(!rendered(&dom).contains("events:"), "{dom}");
    let shot = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("board.png");
    let _ = std::fs::remove_file(&shot);
    let out = headless(
        &proxy.admin_url("/"),
        &[&format!("--screenshot={}", shot.display())],
        profile.path(),
    )
    .await;
    assert!(
        shot.exists(),
        "no screenshot: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        std::fs::metadata(&shot).unwrap().len() > 10_000,
        "the screenshot is blank"
    );
    eprintln!("board screenshot: {}", shot.display());
}

/// The page's body as rendered, without its script (whose source names every label).
fn rendered(dom: &str) -> &str {
    let body = dom.find("<body>").expect("a body");
    let script = dom.find("<script>").expect("a script");
    &dom[body..script]
}

/// The opening tag of the element whose attributes include `attr` (e.g. `id="x"`).
fn opening_tag<'a>(dom: &'a str, attr: &str) -> &'a str {
    let at = dom
        .find(attr)
        .unwrap_or_else(|| panic!("no element with {attr}:\n{dom}"));
    let start = dom[..at].rfind('<').unwrap();
    let end = at + dom[at..].find('>').unwrap();
    &dom[start..=end]
}

/// `text` as the DOM serializer writes it in an element's text.
fn escaped(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('\u{a0}', "&nbsp;")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Chromium: CI installs it and runs this with --ignored"]
async fn the_board_shows_migration_events() {
    // A broker that is not there (a closed port: no RabbitMQ needed): the link goes down and,
    // with a buffer of one event, every event after the first is dropped. The user name
    // carries markup, which the board must show as text; the password never reaches it.
    let dead = closed_port().await;
    let var = "STRANGLER_TEST_BOARD_AMQP_URL";
    std::env::set_var(
        var,
        format!("amqp://%3Ci%3Emallory%3C%2Fi%3E:board-secret@{dead}/%2f"),
    );
    let (proxy, _backends) = migrating_proxy_with(
        &format!("[events]\nurl_env = \"{var}\"\nexchange = \"fittrack.migration\"\nbuffer = 1\n"),
        "events = { kinds = [\"mismatch\", \"write\"], body = \"4KiB\" }",
        "events = { kinds = [\"request\"], sample = 0.5 }",
    )
    .await;
    let created = send_with(
        http::Method::POST,
        &proxy.url("/api/users"),
        &[("content-type", "application/json")],
        r#"{"name":"Ada","email":"Ada@Example.com"}"#,
    )
    .await;
    assert!(
        created.status.is_success(),
        "POST /api/users: {}",
        created.status
    );
    let events = eventually(Duration::from_secs(10), || async {
        let view = get(&proxy.admin_url("/routes")).await.json();
        let e = view["events"].clone();
        (e["link"] == "down" && e["dropped"].as_u64() > Some(0)).then_some(e)
    })
    .await;
    assert_eq!(events["enabled"], true, "{events}");
    let broker = events["broker"].as_str().unwrap().to_string();
    assert!(broker.contains("<i>mallory</i>"), "{broker}");

    let profile = tempfile::tempdir().unwrap();
    let out = headless(&proxy.admin_url("/"), &["--dump-dom"], profile.path()).await;
    let dom = String::from_utf8_lossy(&out.stdout);
    assert!(
        !opening_tag(&dom, "id=\"events-panel\"").contains("hidden"),
        "the events panel is hidden:\n{dom}"
    );
    for want in [
        "Migration events",
        "fittrack.migration",
        "published 0",
        "buffered 1 / 1",
        "events: mismatch, write",
        "events: request (requests sampled 50.0%)",
        "write.api.users",
    ] {
        assert!(dom.contains(want), "rendered board lacks {want:?}:\n{dom}");
    }
    assert!(
        !rendered(&dom).contains("dropped 0"),
        "the drops are not shown:\n{dom}"
    );
    // The link state, with the broker's last error as its title.
    let link = opening_tag(&dom, "id=\"events-link\"");
    assert!(link.contains("link down"), "{link}");
    assert!(
        link.contains("title=\""),
        "no last error on the link: {link}"
    );
    assert!(dom.contains(">down</span>"), "{dom}");
    // Markup from the broker URL is text, never elements; the password is never shown.
    assert!(dom.contains(&escaped(&broker)), "{dom}");
    assert!(!dom.contains("<i>mallory"), "{dom}");
    assert!(!dom.contains("board-secret"), "{dom}");

    // [events] without its variable: events are off, and the board says why.
    let unset = "STRANGLER_TEST_BOARD_AMQP_URL_UNSET";
    std::env::remove_var(unset);
    let (off, _more) = migrating_proxy_with(
        &format!("[events]\nurl_env = \"{unset}\"\n"),
        "events = [\"mismatch\"]",
        "",
    )
    .await;
    let out = headless(&off.admin_url("/"), &["--dump-dom"], profile.path()).await;
    let dom = String::from_utf8_lossy(&out.stdout);
    for want in [
        format!("events off: {unset} is unset"),
        "events: mismatch".to_string(),
    ] {
        assert!(dom.contains(&want), "rendered board lacks {want:?}:\n{dom}");
    }
    assert!(!rendered(&dom).contains("published"), "{dom}");
}

// ------------------------------------------------------------------ the gateway's own work

/// The audience of the gateway proxy's provider.
const AUDIENCE: &str = "board";
/// The variable holding the gateway proxy's `[ratelimit_store]` URL (a closed port).
const REDIS_VAR: &str = "STRANGLER_TEST_BOARD_REDIS_URL";

/// An HS256 token of the test issuer for [`AUDIENCE`], issued two hours ago and expiring
/// `secs` seconds from now (in the past when negative).
fn token_expiring_in(secs: i64) -> String {
    let now = support::jwt::now() as i64;
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &json!({"iss": ISSUER, "aud": AUDIENCE, "sub": "ada", "iat": now - 7200, "exp": now + secs}),
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

/// GET `path` with `headers`; its status.
async fn status_of(proxy: &Proxy, path: &str, headers: &[(&str, &str)]) -> u16 {
    send_with(Method::GET, &proxy.url(path), headers, Bytes::new())
        .await
        .status
        .as_u16()
}

/// A proxy that has done a gateway's work on four routes:
/// - `/observe` verifies tokens without refusing any: 2 requests without one, 1 with an
///   expired one, 1 with a valid one;
/// - `/limited` allows 2 at once per address: 5 requests, 3 limited;
/// - `/windows` has a dry-run window of 3 at once per `x-tenant` (4 requests of tenant a, 1
///   of tenant b: 1 would be limited) and a global window (its Redis, a closed port, never
///   answers: counted on this replica, `on_error = "local"`);
/// - `/cached` keeps last good copies: `/cached/item` answered once, then its backend stopped
///   and it was answered stale once; `/cached/other`, never stored, got the error.
async fn gateway_proxy() -> (Proxy, Running) {
    let legacy = start_echo("legacy").await;
    let origin = start_echo("origin").await;
    let origin_addr = origin.addr;
    std::env::set_var(REDIS_VAR, format!("redis://{}/", closed_port().await));
    let text = format!(
        "{}[ratelimit_store]\nurl_env = \"{REDIS_VAR}\"\ntimeout = \"50ms\"\n\
         [auth.fittrack]\nissuer = \"{ISSUER}\"\naudiences = [\"{AUDIENCE}\"]\nalgorithms = [\"HS256\"]\nsecret_file = \"secret\"\n\
         {}{}{}{}{}\
         [[routes.rate_limit]]\nname = \"burst\"\nlimit = 1\nper = \"1m\"\nburst = 3\nkey = \"header:x-tenant\"\nmode = \"dry_run\"\nmax_keys = 50\n\
         [[routes.rate_limit]]\nname = \"shared\"\nlimit = 100\nper = \"1h\"\nkey = \"route\"\nscope = \"global\"\n\
         {}",
        server("watch = \"off\"\nstale_store_size = \"1MiB\""),
        backend("legacy", legacy.addr),
        backend("origin", origin.addr),
        route(
            "/observe",
            "legacy",
            "auth = { provider = \"fittrack\", mode = \"observe\" }"
        ),
        route("/limited", "legacy", "rate_limit = { limit = 2, per = \"1m\" }"),
        route("/windows", "legacy", ""),
        route(
            "/cached",
            "origin",
            "stale_if_error = { max_stale = \"1h\", vary = [\"accept-language\"] }"
        ),
    );
    let proxy = Proxy::start_in(secret_dir(SECRET), &text).await;

    let expired = format!("Bearer {}", token_expiring_in(-3600));
    let valid = format!("Bearer {}", token_expiring_in(600));
    for bearer in [None, None, Some(&expired), Some(&valid)] {
        let headers: Vec<(&str, &str)> = bearer
            .map(|b| ("authorization", b.as_str()))
            .into_iter()
            .collect();
        assert_eq!(
            status_of(&proxy, "/observe/x", &headers).await,
            200,
            "observe forwards"
        );
    }
    let mut limited = vec![];
    for _ in 0..5 {
        limited.push(status_of(&proxy, "/limited/x", &[]).await);
    }
    assert_eq!(limited, [200, 200, 429, 429, 429]);
    for tenant in ["a", "a", "a", "a", "b"] {
        assert_eq!(
            status_of(&proxy, "/windows/x", &[("x-tenant", tenant)]).await,
            200,
            "a dry run and a global window on_error = local forward"
        );
    }

    assert_eq!(status_of(&proxy, "/cached/item", &[]).await, 200);
    drop(origin);
    eventually(Duration::from_secs(5), || async {
        tokio::net::TcpStream::connect(origin_addr)
            .await
            .is_err()
            .then_some(())
    })
    .await;
    let r = get(&proxy.url("/cached/item")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.headers["cache-status"], "strangler; fwd=stale");
    assert_eq!(r.json()["backend"], "origin");
    assert_eq!(status_of(&proxy, "/cached/other", &[]).await, 502);
    (proxy, legacy)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Chromium: CI installs it and runs this with --ignored"]
async fn the_board_shows_auth_rate_limits_and_stale_answers_next_to_the_stage() {
    let (proxy, _legacy) = gateway_proxy().await;
    let profile = tempfile::tempdir().unwrap();
    let out = headless(&proxy.admin_url("/"), &["--dump-dom"], profile.path()).await;
    let dom = String::from_utf8_lossy(&out.stdout);
    let shown = rendered(&dom);
    for want in [
        // Observe mode: what enforcement would refuse, the most frequent reason first.
        "auth observe (fittrack) · would refuse 3 of 4 (missing 2, expired 1)",
        // Each window: its decisions, how many were limited, the keys it tracks.
        "rate default: 2/1m burst 2 by ip · limited 3 of 5 · 1 key",
        "rate burst: 1/1m burst 3 by header:x-tenant (dry run) · would limit 1 of 5 · 2 keys",
        "rate shared: 100/1h burst 100 by route · limited 0 of 5 · global",
        // Stale answers served.
        "stale if error (1h) · served 1 stale",
    ] {
        assert!(
            shown.contains(want),
            "rendered board lacks {want:?}:\n{dom}"
        );
    }
    // Each note sits in its route's stage cell, and what refused (or would have) is marked.
    for (route, note) in [
        ("/observe", "auth observe"),
        ("/limited", "rate default"),
        ("/windows", "rate burst"),
        ("/windows", "rate shared"),
        ("/cached", "stale if error"),
    ] {
        let row = row_of(shown, route);
        assert!(
            row.contains(note),
            "{note:?} is not in the row of {route}:\n{row}"
        );
    }
    for marked in [
        "auth observe",
        "rate default",
        "rate burst",
        "stale if error",
    ] {
        assert!(
            shown.contains(&format!("<div class=\"muted warn\">{marked}")),
            "{marked:?} is not marked:\n{dom}"
        );
    }
    assert!(
        shown.contains("<div class=\"muted\">rate shared"),
        "a window that limited nothing is marked:\n{dom}"
    );
}

/// The table row of the route with `prefix` in the rendered board.
fn row_of<'a>(shown: &'a str, prefix: &str) -> &'a str {
    let at = shown
        .find(&format!("<code>{prefix}</code>"))
        .unwrap_or_else(|| panic!("no row for {prefix}:\n{shown}"));
    let start = shown[..at].rfind("<tr>").unwrap();
    let end = at + shown[at..].find("</tr>").unwrap();
    &shown[start..end]
}

/// The entry of `view["routes"]` with `prefix`.
fn route_in<'a>(view: &'a Value, prefix: &str) -> &'a Value {
    view["routes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["prefix"] == prefix)
        .unwrap_or_else(|| panic!("no route {prefix} in /routes: {view}"))
}

#[tokio::test]
async fn routes_lists_rate_limit_windows_and_stale_settings_with_their_counts() {
    let (proxy, _legacy) = gateway_proxy().await;
    let view = routes_json(&proxy).await;

    // Every window with its settings, live keys and decisions since start.
    assert_eq!(
        route_in(&view, "/limited")["rate_limits"],
        json!([{
            "burst": 2, "key": "ip", "keys": 1, "limit": 2, "max_keys": 100_000,
            "mode": "enforce", "name": "default",
            "outcomes": {"allowed": 2, "limited": 3},
            "per": "1m", "scope": "replica",
        }])
    );
    let windows = &route_in(&view, "/windows")["rate_limits"];
    assert_eq!(
        windows[0],
        json!({
            "burst": 3, "key": "header:x-tenant", "keys": 2, "limit": 1, "max_keys": 50,
            "mode": "dry_run", "name": "burst",
            "outcomes": {"allowed": 4, "would_limit": 1},
            "per": "1m", "scope": "replica",
        })
    );
    assert_eq!(windows[1]["name"], "shared");
    assert_eq!(windows[1]["scope"], "global");
    assert_eq!(windows[1]["key"], "route");
    assert_eq!(windows[1]["limit"], 100);
    assert_eq!(windows[1]["burst"], 100);
    assert_eq!(windows[1]["per"], "1h");
    assert_eq!(windows[1]["mode"], "enforce");
    assert_eq!(windows[1]["outcomes"], json!({"allowed": 5}), "{windows}");
    assert_eq!(windows.as_array().unwrap().len(), 2, "{windows}");
    // Routes without limits or stale copies carry neither field.
    for prefix in ["/observe", "/cached"] {
        assert!(
            route_in(&view, prefix).get("rate_limits").is_none(),
            "{view}"
        );
    }
    for prefix in ["/observe", "/limited", "/windows"] {
        assert!(route_in(&view, prefix).get("stale").is_none(), "{view}");
    }

    // The store Redis is configured in, never answering here.
    assert_eq!(
        view["ratelimit_store"],
        json!({"connected": false, "on_error": "local", "timeout": "50ms", "url_env": REDIS_VAR})
    );

    // The route's stale_if_error with what happened to its copies.
    assert_eq!(
        route_in(&view, "/cached")["stale"],
        json!({
            "max_entry": 1 << 20, "max_stale": "1h",
            "on": ["connect", "timeout", "500", "502", "503", "504"],
            "outcomes": {"miss": 1, "served": 1, "stored": 1},
            "per_user": null, "vary": ["accept-language"],
        })
    );
    // The store: its bytes (the one copy, the same as the gauge) and its bound.
    let store = &view["stale_store"];
    assert_eq!(store["capacity"], 1 << 20, "{store}");
    let bytes = store["bytes"].as_u64().unwrap();
    assert!(
        bytes > 100 && bytes < 64 << 10,
        "one small copy: {bytes} bytes"
    );
    let gauge = metric(&metrics_text(&proxy).await, "strangler_stale_bytes", &[]);
    assert_eq!(gauge, Some(bytes as f64));
}

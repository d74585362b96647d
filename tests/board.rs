//! The migration board at the admin listener's `/`, served and rendered in a real browser.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a panic is a failure report

mod support;

use std::time::Duration;

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

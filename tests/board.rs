//! The migration board at the admin listener's `/`, served and rendered in a real browser.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a panic is a failure report

mod support;

use std::time::Duration;

use support::*;

async fn migrating_proxy() -> (Proxy, Vec<Running>) {
    let legacy = start_legacy(Default::default()).await;
    let users = start_users(Some(users_service::Bug::EmailCase)).await;
    let flaky = start_legacy(legacy_stub::Options {
        fail_paths: vec!["/api/social".into()],
        ..Default::default()
    })
    .await;
    let proxy = Proxy::start(&format!(
        "{}[backends.users]\nurl = \"http://{}\"\n[backends.social]\nurl = \"http://{}\"\n\
         [[routes]]\nprefix = \"/api/users\"\nbackend = \"legacy\"\nshadow = \"users\"\n[routes.compare]\nignore = [\"/generated_at\"]\n\
         [[routes]]\nprefix = \"/api/social\"\nbackend = \"social\"\n[routes.guard]\nmax_error_rate = 0.5\nmin_requests = 3\n\
         [[routes]]\nprefix = \"/\"\nbackend = \"legacy\"\n",
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

//! The command line, run as the real binary: check, explain, diff, bad config at start.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a panic is a failure report

mod support;

use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_strangler");

fn run(args: &[&str], dir: &std::path::Path) -> Output {
    Command::new(BIN)
        .args(args)
        .current_dir(dir)
        .env_remove("STRANGLER_CONFIG")
        .env("RUST_LOG", "warn")
        .output()
        .unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

const GOOD: &str = r#"[backends.legacy]
url = "http://127.0.0.1:3000"
[backends.users]
url = "http://127.0.0.1:3001"

[[routes]]
prefix = "/api/users"
backend = "legacy"
shadow = "users"

[[routes]]
prefix = "/api/social"
backend = "legacy"
canary = { backend = "users", percent = 10, sticky = "header:x-user-id" }

[[routes]]
prefix = "/"
backend = "legacy"
"#;

#[test]
fn check_prints_routes_with_their_stage() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("routes.toml"), GOOD).unwrap();
    let out = run(&["check"], dir.path());
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(
        stdout.lines().next().unwrap().starts_with("ROUTE"),
        "{stdout}"
    );
    assert!(
        stdout.contains("/api/users   shadowing   legacy   users (100%)"),
        "{stdout}"
    );
    assert!(stdout.contains("canary 10%"), "{stdout}");
    assert!(
        stdout.contains("valid: 3 routes, 2 backends (legacy: legacy)"),
        "{stdout}"
    );
}

#[test]
fn check_reports_every_error_and_exits_1() {
    let dir = tempfile::tempdir().unwrap();
    let bad = "[server]\nlisten = \"nowhere\"\n[backends.legacy]\nurl = \"http://127.0.0.1:3000\"\ncolour = 1\n[[routes]]\nprefix = \"/\"\nbackend = \"userz\"\n";
    std::fs::write(dir.path().join("bad.toml"), bad).unwrap();
    let out = run(&["check", "--config", "bad.toml"], dir.path());
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 3, "{stderr}");
    assert!(lines[0].starts_with("bad.toml:2:10: `listen`"), "{stderr}");
    assert!(
        lines[1].starts_with("bad.toml:5:1: [backends.legacy]: unknown field `colour`"),
        "{stderr}"
    );
    assert!(
        lines[2].starts_with("bad.toml:8:11: `backend`: unknown backend \"userz\""),
        "{stderr}"
    );
    // A missing file is one clear line too.
    let out = run(&["check", "--config", "missing.toml"], dir.path());
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).starts_with("missing.toml: cannot read"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn check_warns_without_failing() {
    let dir = tempfile::tempdir().unwrap();
    let no_root = "[backends.legacy]\nurl = \"http://127.0.0.1:3000\"\n[[routes]]\nprefix = \"/a\"\nmethods = [\"GET\"]\nbackend = \"legacy\"\n[[routes]]\nprefix = \"/a\"\nmethods = [\"GET\"]\nhost = \"x.example\"\nbackend = \"legacy\"\n";
    std::fs::write(dir.path().join("routes.toml"), no_root).unwrap();
    let out = run(&["check"], dir.path());
    assert_eq!(out.status.code(), Some(0));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("routes.toml:1:1: warning: no route without filters catches `/`"),
        "{stderr}"
    );
}

#[test]
fn explain_shows_route_backend_shadow_and_canary_bucket() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("routes.toml"), GOOD).unwrap();
    let out = run(&["explain", "GET", "/api/users/7?x=1"], dir.path());
    assert!(out.status.success());
    let s = text(&out.stdout);
    assert!(s.contains("route:    /api/users (routes.toml:7)"), "{s}");
    assert!(s.contains("stage:    shadowing"), "{s}");
    assert!(
        s.contains("backend:  legacy -> http://127.0.0.1:3000/api/users/7?x=1"),
        "{s}"
    );
    assert!(
        s.contains("shadow:   users; GET is mirrored to 100% of requests"),
        "{s}"
    );
    let bucket = strangler::routes::canary_bucket(b"42");
    let out = run(
        &["explain", "GET", "/api/social/feed", "-H", "x-user-id: 42"],
        dir.path(),
    );
    let s = text(&out.stdout);
    assert!(
        s.contains(&format!(
            "canary:   users 10%; header x-user-id: bucket {bucket} of 10000"
        )),
        "{s}"
    );
    let want = if bucket < 1000 { "users" } else { "legacy" };
    assert!(s.contains(&format!("backend:  {want} ->")), "{s}");
    let out = run(&["explain", "POST", "/api/users"], dir.path());
    assert!(
        text(&out.stdout).contains("POST is not mirrored"),
        "{}",
        text(&out.stdout)
    );
    let out = run(&["explain", "GET", "/x", "-H", "no colon"], dir.path());
    assert_eq!(out.status.code(), Some(2));
    let out = run(&["explain", "G E T", "/x"], dir.path());
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn diff_describes_a_route_flip() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("old.toml"), GOOD).unwrap();
    let new = GOOD
        .replace(
            "backend = \"legacy\"\nshadow = \"users\"",
            "backend = \"users\"\nshadow = \"legacy\"",
        )
        .replace("percent = 10", "percent = 50");
    std::fs::write(dir.path().join("new.toml"), new).unwrap();
    let out = run(&["diff", "old.toml", "new.toml"], dir.path());
    assert!(out.status.success());
    let s = text(&out.stdout);
    assert!(
        s.contains("/api/users: shadowing -> cut over, reverse shadow\n"),
        "{s}"
    );
    assert!(s.contains("/api/social: canary 10% -> canary 50%\n"), "{s}");
    let out = run(&["diff", "old.toml", "old.toml"], dir.path());
    assert_eq!(text(&out.stdout), "no route changes\n");
}

#[test]
fn bad_config_at_start_exits_1_before_binding() {
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let bad = format!("[server]\nlisten = \"127.0.0.1:{port}\"\n[backends.legacy]\nurl = \"ftp://x\"\n[[routes]]\nprefix = \"/\"\nbackend = \"legacy\"\n");
    std::fs::write(dir.path().join("routes.toml"), bad).unwrap();
    let out = run(&["run"], dir.path());
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("routes.toml:4:7:"),
        "{}",
        text(&out.stderr)
    );
    // The port was never taken.
    std::net::TcpListener::bind(("127.0.0.1", port)).unwrap();
}

#[test]
fn unknown_flags_are_usage_errors() {
    let dir = tempfile::tempdir().unwrap();
    let out = run(&["check", "--no-such-flag"], dir.path());
    assert_eq!(out.status.code(), Some(2));
    let out = run(&["--log-format", "xml", "check"], dir.path());
    assert_eq!(out.status.code(), Some(2));
    let out = run(&["demo", "--users-bug", "nope"], dir.path());
    assert_eq!(out.status.code(), Some(2));
    let out = run(&["explain", "GET"], dir.path());
    assert_eq!(out.status.code(), Some(2), "explain needs a path");
}

#[cfg(target_os = "linux")]
#[test]
fn workers_sets_the_runtime_thread_count() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = "[server]\nlisten = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\nworkers = 3\nwatch = \"off\"\n[backends.legacy]\nurl = \"http://127.0.0.1:9\"\n[[routes]]\nprefix = \"/\"\nbackend = \"legacy\"\n";
    std::fs::write(dir.path().join("routes.toml"), cfg).unwrap();
    let mut child = Command::new(BIN)
        .args(["run", "--log-format", "json"])
        .current_dir(dir.path())
        .env("RUST_LOG", "info")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Wait until it serves: the "strangler is serving" line.
    let mut stderr = std::io::BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    while std::io::BufRead::read_line(&mut stderr, &mut line).unwrap() > 0
        && !line.contains("strangler is serving")
    {
        line.clear();
    }
    // Workers start lazily; with `watch = "off"` nothing uses the blocking pool (whose threads
    // share the name), so the count settles at the worker count.
    let count = || {
        std::fs::read_dir(format!("/proc/{}/task", child.id()))
            .unwrap()
            .filter(|t| {
                std::fs::read_to_string(t.as_ref().unwrap().path().join("comm"))
                    .is_ok_and(|c| c.trim() == "tokio-rt-worker")
            })
            .count()
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let mut workers = count();
    while workers < 3 && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(20));
        workers = count();
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert_eq!(workers, 3);
}

const GATEWAY: &str = r#"[backends.legacy]
url = "http://127.0.0.1:3000"
[auth.fittrack]
issuer = "https://auth.test/"
audiences = ["api"]
algorithms = ["HS256"]
secret_file = "secret.txt"

[[routes]]
prefix = "/api/users"
backend = "legacy"
auth = { provider = "fittrack", require = { scope = "users:read" } }
rate_limit = { limit = 100, per = "1m", burst = 20, key = "claim:sub" }
stale_if_error = { max_stale = "1h", vary = ["accept-encoding"] }

[[routes]]
prefix = "/"
backend = "legacy"
"#;

#[test]
fn check_explain_and_diff_speak_of_auth_limits_and_stale_answers() {
    let dir = tempfile::tempdir().unwrap();
    let secret = "0123456789abcdef0123456789abcdef";
    std::fs::write(dir.path().join("secret.txt"), secret).unwrap();
    std::fs::write(dir.path().join("routes.toml"), GATEWAY).unwrap();
    let out = run(&["check"], dir.path());
    let s = text(&out.stdout);
    assert!(out.status.success(), "{s}{}", text(&out.stderr));
    assert!(s.contains("AUTH"), "{s}");
    assert!(s.contains("fittrack (required)"), "{s}");
    assert!(
        s.contains("auth fittrack: secret_file secret.txt (1 key), issuer https://auth.test/"),
        "{s}"
    );
    // explain verifies a token against the provider's secret.
    let token = |scope: &str| {
        let claims = serde_json::json!({
            "iss": "https://auth.test/", "aud": "api", "sub": "u7", "scope": scope,
            "exp": strangler::jwt::now() + 600,
        });
        jsonwebtoken::encode(
            &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
            &claims,
            &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
        )
        .unwrap()
    };
    let explain = |extra: &[&str]| {
        let mut args = vec!["explain", "GET", "/api/users/7"];
        args.extend_from_slice(extra);
        text(&run(&args, dir.path()).stdout)
    };
    let s = explain(&[]);
    assert!(
        s.contains("auth:     fittrack (required, secret_file secret.txt (1 key)) requiring scope = users:read; no token: the request is refused: 401 unauthorized"),
        "{s}"
    );
    assert!(
        s.contains("limits:   default 100/1m burst 20 by claim:sub"),
        "{s}"
    );
    assert!(
        s.contains(
            "stale:    max_stale 1h on connect,timeout,500,502,503,504, vary accept-encoding"
        ),
        "{s}"
    );
    let good = format!("authorization: Bearer {}", token("users:read"));
    assert!(explain(&["-H", &good]).contains("the token is valid (sub u7)"));
    let weak = format!("authorization: Bearer {}", token("users:write"));
    assert!(explain(&["-H", &weak])
        .contains("the token is valid but its scope lacks users:read: refused: 403 forbidden"));
    assert!(explain(&["-H", "authorization: Bearer a.b.c"]).contains("refused: 401 unauthorized"));
    // diff names each change.
    let new = GATEWAY
        .replace("burst = 20", "burst = 40")
        .replace("max_stale = \"1h\"", "max_stale = \"2h\"")
        .replace(
            "auth = { provider = \"fittrack\", require = { scope = \"users:read\" } }",
            "auth = { provider = \"fittrack\", mode = \"observe\" }",
        );
    std::fs::write(dir.path().join("new.toml"), new).unwrap();
    let out = run(&["diff", "routes.toml", "new.toml"], dir.path());
    let s = text(&out.stdout);
    assert!(
        s.contains("/api/users: auth fittrack (required, require scope = users:read) -> fittrack (observe)"),
        "{s}"
    );
    assert!(s.contains("/api/users: rate_limit default 100/1m burst 20 by claim:sub -> default 100/1m burst 40 by claim:sub"), "{s}");
    assert!(s.contains("/api/users: stale_if_error max_stale 1h"), "{s}");
}

#[test]
fn diff_speaks_of_providers_added_removed_and_changed() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("a.secret"),
        "0123456789abcdef0123456789abcdef",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("b.secret"),
        "fedcba9876543210fedcba9876543210",
    )
    .unwrap();
    std::fs::copy(
        concat!(env!("CARGO_MANIFEST_DIR"), "/demo/jwks.json"),
        dir.path().join("jwks.json"),
    )
    .unwrap();
    let provider = |name: &str, rest: &str| {
        format!("[auth.{name}]\nissuer = \"https://auth.test/\"\naudiences = [\"api\"]\nalgorithms = [\"HS256\"]\n{rest}\n")
    };
    let file = |providers: &[String], auth: &str| {
        format!(
            "[backends.legacy]\nurl = \"http://127.0.0.1:3000\"\n{}\n[[routes]]\nprefix = \"/api\"\nbackend = \"legacy\"\nauth = \"{auth}\"\n\n[[routes]]\nprefix = \"/\"\nbackend = \"legacy\"\n",
            providers.concat()
        )
    };
    let old = file(
        &[
            provider("settings", "secret_file = \"a.secret\"\nrealm = \"one\""),
            provider("keys", "secret_file = \"a.secret\""),
            provider("gone", "secret_file = \"a.secret\""),
            provider("same", "secret_file = \"a.secret\""),
        ],
        "settings",
    );
    let new = file(
        &[
            provider("settings", "secret_file = \"a.secret\"\nrealm = \"two\""),
            provider("keys", "secret_file = \"b.secret\""),
            provider("same", "secret_file = \"a.secret\""),
            "[auth.added]\nissuer = \"https://auth.test/\"\naudiences = [\"api\"]\nalgorithms = [\"EdDSA\"]\njwks_file = \"jwks.json\"\n".to_string(),
        ],
        "added",
    );
    std::fs::write(dir.path().join("old.toml"), &old).unwrap();
    std::fs::write(dir.path().join("new.toml"), &new).unwrap();
    let out = run(&["diff", "old.toml", "new.toml"], dir.path());
    let s = text(&out.stdout);
    assert!(out.status.success(), "{s}{}", text(&out.stderr));
    let lines: Vec<&str> = s.lines().collect();
    assert_eq!(
        lines,
        [
            // The new file's providers (in name order), then those it dropped.
            "auth added: added (jwks_file jwks.json (1 key))",
            "auth keys: keys secret_file a.secret (1 key) -> secret_file b.secret (1 key)",
            "auth settings: settings changed",
            "auth gone: removed",
            "/api: auth settings (required) -> added (required)",
        ],
        "{s}"
    );
    // And the other way round.
    let out = run(&["diff", "new.toml", "old.toml"], dir.path());
    let s = text(&out.stdout);
    assert!(
        s.contains("auth gone: added (secret_file a.secret (1 key))\n"),
        "{s}"
    );
    assert!(s.contains("auth added: removed\n"), "{s}");
    assert!(!s.contains("auth same"), "{s}");
}

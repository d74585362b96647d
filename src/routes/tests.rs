//! Table-driven tests of routing, stages, config errors and diffs.

use super::*;
use crate::config::parse;
use http::Method;

const BACKENDS: &str = r#"
[backends.legacy]
url = "http://127.0.0.1:3000"
[backends.users]
url = "http://127.0.0.1:3001/v2/"
"#;

fn table(routes: &str) -> RouteTable {
    match parse(&format!("{BACKENDS}{routes}")) {
        Ok(p) => p.table,
        Err(e) => panic!("config should be valid: {e:?}"),
    }
}

fn errors(src: &str) -> Vec<String> {
    match parse(src) {
        Ok(_) => panic!("config should be invalid:\n{src}"),
        Err(e) => e.iter().map(|d| d.render("routes.toml")).collect(),
    }
}

#[test]
fn lookup_is_segment_aware_longest_prefix() {
    let t = table(
        r#"
[[routes]]
prefix = "/"
backend = "legacy"
[[routes]]
prefix = "/api/users"
backend = "users"
[[routes]]
prefix = "/api/users/admin/"
backend = "legacy"
[[routes]]
prefix = "/api"
backend = "legacy"
"#,
    );
    let cases = [
        ("/api/users", Some("/api/users")),
        ("/api/users/", Some("/api/users")),
        ("/api/users/7", Some("/api/users")),
        ("/api/users/7/workouts", Some("/api/users")),
        ("/api/usersettings", Some("/api")),
        ("/api/users/admin", Some("/api/users/admin/")),
        ("/api/users/admin/x", Some("/api/users/admin/")),
        ("/api/users/administrator", Some("/api/users")),
        ("/api", Some("/api")),
        ("/apix", Some("/")),
        ("/", Some("/")),
        ("", None),
        ("*", None),
    ];
    for (path, want) in cases {
        let got = t
            .lookup(&Method::GET, None, path)
            .map(|id| t.route(id).prefix.as_str());
        assert_eq!(got, want, "path {path:?}");
    }
}

#[test]
fn filters_take_precedence_and_fall_through() {
    let t = table(
        r#"
[[routes]]
prefix = "/api/users"
backend = "legacy"
[[routes]]
prefix = "/api/users"
methods = ["GET", "HEAD"]
backend = "users"
[[routes]]
prefix = "/api/users"
methods = ["GET"]
host = "beta.fittrack.example"
backend = "users"
[[routes]]
prefix = "/api"
host = "api.fittrack.example"
backend = "users"
"#,
    );
    let cases = [
        (Method::GET, None, "/api/users/1", Some(1)),
        (Method::HEAD, None, "/api/users/1", Some(1)),
        (Method::POST, None, "/api/users/1", Some(0)),
        (
            Method::GET,
            Some("BETA.fittrack.example"),
            "/api/users",
            Some(2),
        ),
        (
            Method::POST,
            Some("beta.fittrack.example"),
            "/api/users",
            Some(0),
        ),
        (
            Method::GET,
            Some("api.fittrack.example"),
            "/api/workouts",
            Some(3),
        ),
        (Method::GET, Some("other.example"), "/api/workouts", None),
        (Method::GET, None, "/healthz", None),
    ];
    for (method, host, path, want) in cases {
        assert_eq!(
            t.lookup(&method, host, path),
            want.map(RouteId::new),
            "{method} {host:?} {path}"
        );
    }
    assert!(!t.has_catch_all());
}

#[test]
fn lookup_cost_does_not_depend_on_route_count() {
    // Not a timing test: count the hash probes a lookup may make. They depend on the request
    // path's depth only, so 10,000 routes cost what 10 do. (bench/ measures time.)
    let mut src = String::new();
    for i in 0..10_000 {
        src.push_str(&format!(
            "[[routes]]\nprefix = \"/api/group{i}\"\nbackend = \"legacy\"\n"
        ));
    }
    src.push_str("[[routes]]\nprefix = \"/\"\nbackend = \"legacy\"\n");
    let t = table(&src);
    assert_eq!(t.routes().len(), 10_001);
    let id = t.lookup(&Method::GET, None, "/api/group9999/items/1");
    assert_eq!(
        id.map(|id| t.route(id).prefix.as_str()),
        Some("/api/group9999")
    );
    assert_eq!(t.index.len(), 10_001, "one index entry per distinct prefix");
}

#[test]
fn stages_are_derived() {
    let t = table(
        r#"
[[routes]]
prefix = "/a"
backend = "legacy"
[[routes]]
prefix = "/b"
backend = "legacy"
shadow = "users"
[[routes]]
prefix = "/c"
backend = "legacy"
canary = { backend = "users", percent = 10, sticky = "header:x-user-id" }
[[routes]]
prefix = "/d"
backend = "users"
[[routes]]
prefix = "/e"
backend = "users"
shadow = "legacy"
[[routes]]
prefix = "/f"
backend = "legacy"
canary = { backend = "users", percent = 2.5 }
"#,
    );
    let stages: Vec<String> = (0..6)
        .map(|id| t.stage(RouteId::new(id)).to_string())
        .collect();
    assert_eq!(
        stages,
        [
            "legacy",
            "shadowing",
            "canary 10%",
            "cut over",
            "cut over, reverse shadow",
            "canary 2.5%"
        ]
    );
    assert_eq!(t.backend(BackendId::new(1)).base_path, "/v2");
}

#[test]
fn retry_settings_errors_point_at_the_entry() {
    let src = r#"[backends.legacy]
url = "http://127.0.0.1:3000"
retries = 2
retry_on = ["connect-failure", "sometimes", "connect-failure"]

[[routes]]
prefix = "/"
backend = "legacy"
retry_non_idempotent = "please"
"#;
    let got = errors(src);
    let want = [
        "routes.toml:4:32: [backends.legacy] `retry_on`: \"sometimes\" is not a retry case",
        "routes.toml:4:45: [backends.legacy] `retry_on`: \"connect-failure\" is listed twice",
        "routes.toml:9:24: [[routes]]: invalid type",
    ];
    assert_eq!(got.len(), want.len(), "{got:#?}");
    for (g, w) in got.iter().zip(want) {
        assert!(g.starts_with(w), "got  {g}\nwant {w}...");
    }
    let ok = parse(
        "[backends.legacy]\nurl = \"http://127.0.0.1:3000\"\nretries = 1\nretry_on = [\"reset\"]\n[[routes]]\nprefix = \"/\"\nbackend = \"legacy\"\nretry_non_idempotent = true\n",
    )
    .unwrap()
    .table;
    let b = ok.backend(BackendId::new(0));
    assert!(b.retry_on.contains(RetryCase::Reset));
    assert!(!b.retry_on.contains(RetryCase::ConnectFailure));
    assert!(ok.routes()[0].retry_non_idempotent);
}

#[test]
fn every_error_is_reported_with_its_position() {
    let src = r#"[server]
listen = "nowhere"
drain_timeout = "soon"

[backends.legacy]
url = "ftp://127.0.0.1"

[backends.users]
url = "http://127.0.0.1:3001"
colour = "blue"

[[routes]]
prefix = "api/users"
backend = "userz"
shadow_percent = 150

[[routes]]
prefix = "/"
backend = "legacy"
canary = { backend = "users", percent = 101, sticky = "session" }

[[routes]]
prefix = "/"
backend = "legacy"
methods = ["get"]
"#;
    let got = errors(src);
    let want = [
        "routes.toml:2:10: `listen`: \"nowhere\" is not an IP:PORT address",
        "routes.toml:3:17: `drain_timeout`: invalid duration",
        "routes.toml:6:7: [backends.legacy] `url`: \"ftp://127.0.0.1\" must be an absolute http:// or https:// URL",
        "routes.toml:10:1: [backends.users]: unknown field `colour`",
        "routes.toml:13:10: `prefix` \"api/users\" must start with `/`",
        "routes.toml:14:11: `backend`: unknown backend \"userz\"",
        "routes.toml:15:18: `shadow_percent` without `shadow`",
        "routes.toml:20:41: `canary.percent` must be between 0 and 100, got 101",
        "routes.toml:20:55: `canary.sticky` \"session\"",
        "routes.toml:25:12: method names are case-sensitive: write \"GET\"",
    ];
    assert_eq!(got.len(), want.len(), "{got:#?}");
    for (g, w) in got.iter().zip(want) {
        assert!(g.starts_with(w), "got  {g}\nwant {w}...");
    }
}

#[test]
fn connection_bounds_errors_point_at_the_key() {
    let src = r#"[server]
backlog = 0
[backends.legacy]
url = "http://127.0.0.1:3000"
max_connections = 0
max_connecting = -1
max_waiting = -5
wait_timeout = "0s"

[[routes]]
prefix = "/"
backend = "legacy"
"#;
    let got = errors(src);
    let want = [
        "routes.toml:2:11: `backlog` must be between 1 and 65535, got 0",
        "routes.toml:5:19: `max_connections` must be at least 1, got 0",
        "routes.toml:6:18: `max_connecting` must be at least 1, got -1",
        "routes.toml:7:15: `max_waiting` must be at least 0, got -5",
        "routes.toml:8:16: `wait_timeout`: duration \"0s\" must be greater than zero",
    ];
    assert_eq!(got.len(), want.len(), "{got:#?}");
    for (g, w) in got.iter().zip(want) {
        assert!(g.starts_with(w), "got  {g}\nwant {w}...");
    }
    let ok = parse(
        "[server]\nbacklog = 2048\n[backends.legacy]\nurl = \"http://127.0.0.1:3000\"\nmax_connections = 8\nmax_connecting = 16\nmax_waiting = 0\nwait_timeout = \"250ms\"\n[[routes]]\nprefix = \"/\"\nbackend = \"legacy\"\n",
    )
    .expect("valid bounds");
    let limits = ok.table.backends()[0].connections;
    assert_eq!(limits.max_connections, 8);
    assert_eq!(
        limits.max_connecting, 8,
        "never more attempts than connections"
    );
    assert_eq!(limits.max_waiting, 0);
    assert_eq!(limits.wait_timeout, Duration::from_millis(250));
    assert_eq!(ok.server.backlog, Some(2048));
}

#[test]
fn garbage_in_each_key_is_an_error() {
    let route = "[[routes]]\nprefix = \"/\"\nbackend = \"legacy\"\n";
    let cases: &[(&str, &str)] = &[
        ("this is not toml", "expected"),
        ("[server]\nadmin = \"0.0.0.0:9901\"\n", "not a loopback address"),
        ("[server]\nmax_request_body = \"ten megs\"\n", "invalid size"),
        ("[server]\nmax_connections = 0\n", "`max_connections` must be at least 1"),
        ("[server]\nbacklog = 100000\n", "`backlog` must be between 1 and 65535"),
        ("[server]\nbacklog = \"big\"\n", "invalid type"),
        ("[backends.x]\nurl = \"http://127.0.0.1:1\"\nmax_connections = \"many\"\n", "invalid type"),
        ("[backends.x]\nurl = \"http://127.0.0.1:1\"\nmax_connecting = 0\n", "`max_connecting` must be at least 1"),
        ("[backends.x]\nurl = \"http://127.0.0.1:1\"\nmax_waiting = 1.5\n", "invalid type"),
        ("[backends.x]\nurl = \"http://127.0.0.1:1\"\nwait_timeout = \"a while\"\n", "`wait_timeout`: invalid duration"),
        ("[backends.x]\nurl = \"http://127.0.0.1:1\"\nwait_timeout = 5\n", "invalid type"),
        ("[server]\nvia = \"my proxy\"\n", "`via`"),
        ("[server]\nworkers = 0\n", "`workers` must be at least 1"),
        ("[server]\nheader_read_timeout = \"soon\"\n", "`header_read_timeout`: invalid duration"),
        ("[server]\nmax_header_size = \"big\"\n", "`max_header_size`: invalid size"),
        ("[server]\naccess_log = \"yes\"\n", "invalid type"),
        ("[server]\ntrust_shadow_header = 1\n", "invalid type"),
        ("[server]\nadmin_token = \"env:STRANGLER_TEST_VARIABLE_NOBODY_SETS\"\n", "names an unset environment variable"),
        ("[server]\nadmin_token = \"\"\n", "is empty"),
        ("[server]\nadmin = \"0.0.0.0:9901\"\nadmin_token = \"\"\n", "not a loopback address"),
        ("[server]\nwatch = \"inotify\"\n", "expected \"notify\", \"poll\" or \"off\""),
        ("[server]\nwatch = \"poll\"\nwatch_interval = \"often\"\n", "invalid duration"),
        ("[server]\nworkers = \"two\"\n", "invalid type"),
        ("[server]\ntls = { cert = \"no-such.pem\", key = \"no-such.key\" }\n", "`tls`: cannot read no-such.pem"),
        ("[server]\ntls = { cert = \"a.pem\" }\n", "needs both `cert`"),
        ("[server]\ntls = \"certs/proxy.pem\"\n", "invalid type"),
        ("[server]\ntls = { cert = \"a.pem\", key = \"a.key\", ca = \"ca.pem\" }\n", "`tls.ca` is not a listener setting"),
        ("[server]\ntls = { cert = \"a.pem\", key = \"a.key\", server_name = \"x\" }\n", "`tls.server_name` is not a listener setting"),
        ("[server]\ntls = { cert = \"a.pem\", key = \"a.key\", client_auth = \"optional\" }\n", "needs `tls.client_ca`"),
        ("[server]\ntls = { cert = \"a.pem\", key = \"a.key\", client_ca = \"ca.pem\", client_auth = \"maybe\" }\n", "expected \"required\" or \"optional\""),
        ("[server]\ntls = { cert = \"a.pem\", key = \"a.key\", sni = [{ cert = \"b.pem\" }] }\n", "missing field `key`"),
        ("[server]\ntls = { cert = \"a.pem\", key = \"a.key\", password = \"x\" }\n", "unknown field `password`"),
        ("[server]\nh2c = true\ntls = { cert = \"a.pem\", key = \"a.key\" }\n", "cannot be combined with `tls`"),
        ("[server]\nh2c = \"yes\"\n", "invalid type"),
        ("[server]\nlisten = 8080\n", "invalid type"),
        ("[backends.x]\nurl = \"http://127.0.0.1:1\"\ntimeout = \"0s\"\n", "greater than zero"),
        ("[backends.x]\nurl = \"https://127.0.0.1:1\"\ntls = { ca = \"no-such-ca.pem\" }\n", "cannot read no-such-ca.pem"),
        ("[backends.x]\nurl = \"http://127.0.0.1:1\"\ntls = { ca = \"ca.pem\" }\n", "applies to https:// URLs"),
        ("[backends.x]\nurl = \"https://127.0.0.1:1\"\ntls = { cert = \"client.pem\" }\n", "needs both `tls.cert` and `tls.key`"),
        ("[backends.x]\nurl = \"https://127.0.0.1:1\"\ntls = { client_ca = \"ca.pem\" }\n", "`tls.client_ca` is not a backend setting"),
        ("[backends.x]\nurl = \"https://127.0.0.1:1\"\ntls = { sni = [] }\n", "`tls.sni` is not a backend setting"),
        ("[backends.x]\nurl = \"https://127.0.0.1:1\"\ntls = { server_name = \"not a name!\" }\n", "not a DNS name or IP address"),
        ("[backends.x]\nurl = \"http://127.0.0.1:1\"\nprotocol = \"h3\"\n", "expected \"http1\", \"h2\" or \"h2c\""),
        ("[backends.x]\nurl = \"https://127.0.0.1:1\"\nprotocol = \"h2c\"\n", "cleartext HTTP/2 but the url is https://"),
        ("[backends.x]\nurl = \"http://127.0.0.1:1\"\nprotocol = 2\n", "invalid type"),
        ("[backends.x]\nurl = \"https://127.0.0.1:1\"\nendpoints = [\"http://10.0.0.1:80\"]\n", "must be \"host:port\""),
        ("[backends.x]\nurl = \"http://u:p@127.0.0.1:1\"\n", "credentials"),
        ("[backends.x]\nurl = \"http://127.0.0.1:1/?a=1\"\n", "query"),
        ("[backends.x]\nurl = \"not a url\"\n", "is not a URL"),
        ("[backends.x]\nurl = \"http://127.0.0.1:1\"\nendpoints = []\n", "`endpoints` is empty"),
        ("[backends.x]\nurl = \"http://127.0.0.1:1\"\nendpoints = [\"10.0.0.1:80/x\"]\n", "must be \"host:port\""),
        ("[backends.x]\nurl = \"http://127.0.0.1:1\"\nendpoints = [\"https://10.0.0.1:443\"]\n", "must be \"host:port\""),
        ("[backends.x]\nurl = \"http://127.0.0.1:1\"\nendpoints = [\"10.0.0.1:80\", \"http://10.0.0.1:80\"]\n", "listed twice"),
        ("[backends.x]\nurl = \"http://127.0.0.1:1\"\nretries = 9\n", "`retries` must be between 0 and 5"),
        ("[backends.x]\nurl = \"http://127.0.0.1:1\"\nretry_on = [\"reset\", \"sometimes\"]\n", "\"sometimes\" is not a retry case"),
        ("[backends.x]\nurl = \"http://127.0.0.1:1\"\nretry_on = [\"reset\", \"reset\"]\n", "\"reset\" is listed twice"),
        ("[backends.x]\nurl = \"http://127.0.0.1:1\"\nretry_on = [\"Reset\"]\n", "is not a retry case"),
        ("[backends.x]\nurl = \"http://127.0.0.1:1\"\nretry_on = \"reset\"\n", "invalid type"),
        ("[backends.x]\nurl = \"http://127.0.0.1:1\"\nretry_on = [5]\n", "invalid type"),
        ("[[routes]]\nprefix = \"/a\"\nbackend = \"legacy\"\nretry_non_idempotent = \"yes\"\n", "invalid type"),
        ("[[routes]]\nprefix = \"/a\"\nbackend = \"legacy\"\nretry_non_idempotent = 1\n", "invalid type"),
        ("[backends.x]\nurl = \"http://127.0.0.1:1\"\nhealth = { path = \"healthz\" }\n", "must start with /"),
        ("[backends.x]\nurl = \"http://127.0.0.1:1\"\nhealth = { path = \"/healthz\", interval = \"often\" }\n", "invalid duration"),
        ("[backends.x]\nurl = \"http://127.0.0.1:1\"\nhealth = { path = \"/healthz\", every = \"1s\" }\n", "unknown field `every`"),
        ("[backends.x]\nurl = \"http://127.0.0.1:1\"\nlegacy = true\n[backends.y]\nurl = \"http://127.0.0.1:2\"\nlegacy = true\n", "more than one backend"),
        ("[[routes]]\nprefix = \"/a/../b\"\nbackend = \"legacy\"\n", "`..`"),
        ("[[routes]]\nprefix = \"/a?b\"\nbackend = \"legacy\"\n", "no query"),
        ("[[routes]]\nprefix = \"/a\"\nbackend = \"legacy\"\nmethods = []\n", "is empty"),
        ("[[routes]]\nprefix = \"/a\"\nbackend = \"legacy\"\nhost = \"http://x\"\n", "host name without scheme"),
        ("[[routes]]\nprefix = \"/a\"\nbackend = \"legacy\"\nshadow = \"legacy\"\n", "compared with itself"),
        ("[[routes]]\nprefix = \"/a\"\nbackend = \"legacy\"\nfallback = \"nope\"\n", "unknown backend"),
        ("[[routes]]\nprefix = \"/a\"\nbackend = \"legacy\"\n[routes.compare]\nnoise = true\n", "without `shadow`"),
        ("[[routes]]\nprefix = \"/a\"\nbackend = \"legacy\"\nshadow = \"users\"\n[routes.compare]\nignore = [\"meta\"]\n", "JSON pointer"),
        ("[[routes]]\nprefix = \"/a\"\nbackend = \"legacy\"\nshadow = \"users\"\n[routes.compare]\ntolerance = -1.0\n", ">= 0"),
        ("[[routes]]\nprefix = \"/a\"\nbackend = \"legacy\"\nshadow = \"users\"\n[routes.compare]\ngate = { min_comparisons = 10, max_mismatch_rate = 2.0 }\n", "rate between 0 and 1"),
        ("[[routes]]\nprefix = \"/a\"\nbackend = \"users\"\n[routes.guard]\nmax_error_rate = 0.1\nwindow = \"forever\"\n", "invalid duration"),
        ("[[routes]]\nprefix = \"/a\"\nbackend = \"users\"\n[routes.guard]\nmax_error_rate = 0.1\nmin_requests = 0\n", "at least 1"),
        ("[[routes]]\nprefix = \"/a\"\nbackend = \"legacy\"\n[[routes]]\nprefix = \"/a/\"\nbackend = \"users\"\n", "duplicate route"),
        ("[[routes]]\nprefix = \"/a\"\nbackend = \"legacy\"\nupgrades = [\"h2c\"]\n", "h2c is never tunnelled"),
        ("[[routes]]\nprefix = \"/a\"\nbackend = \"legacy\"\nupgrades = [\"H2C\"]\n", "h2c is never tunnelled"),
        ("[[routes]]\nprefix = \"/a\"\nbackend = \"legacy\"\nupgrades = [\"\"]\n", "is not a protocol name"),
        ("[[routes]]\nprefix = \"/a\"\nbackend = \"legacy\"\nupgrades = [\"foo bar\"]\n", "is not a protocol name"),
        ("[[routes]]\nprefix = \"/a\"\nbackend = \"legacy\"\nupgrades = [\"foo/1\"]\n", "is not a protocol name"),
        ("[[routes]]\nprefix = \"/a\"\nbackend = \"legacy\"\nupgrades = \"foo\"\n", "invalid type"),
        ("[[routes]]\nprefix = \"/a\"\nbackend = \"legacy\"\nupgrades = [1]\n", "invalid type"),
        ("version = 2\n", "unsupported `version`"),
        ("colour = \"blue\"\n", "unknown key `colour`"),
    ];
    for (extra, want) in cases {
        // Top-level keys must come before the first table header.
        let src = if extra.starts_with('[') {
            format!("{BACKENDS}{route}{extra}")
        } else {
            format!("{extra}{BACKENDS}{route}")
        };
        let errs = errors(&src);
        assert!(
            errs.iter().any(|e| e.contains(want)),
            "{extra:?}: want {want:?} in {errs:#?}"
        );
        assert!(
            errs.iter().all(|e| e.starts_with("routes.toml:")),
            "{errs:#?}"
        );
    }
}

#[test]
fn sections_of_the_wrong_type() {
    let errs = errors("routes = 5\n[backends.legacy]\nurl = \"http://127.0.0.1:1\"\n");
    assert_eq!(
        errs,
        ["routes.toml:1:10: `routes` must be an array of `[[routes]]` tables"]
    );
    let errs = errors("backends = \"legacy\"\n[[routes]]\nprefix = \"/\"\nbackend = \"legacy\"\n");
    assert!(
        errs[0].starts_with("routes.toml:1:12: `backends` must be a table"),
        "{errs:?}"
    );
}

#[test]
fn same_prefix_with_different_filters_is_not_a_duplicate() {
    let t = table("[[routes]]\nprefix = \"/a\"\nbackend = \"legacy\"\n[[routes]]\nprefix = \"/a\"\nmethods = [\"GET\"]\nbackend = \"users\"\n");
    assert_eq!(t.routes().len(), 2);
}

#[test]
fn warnings_for_missing_catch_all_and_hidden_routes() {
    let src = format!(
        "{BACKENDS}[[routes]]\nprefix = \"/a\"\nmethods = [\"GET\", \"POST\"]\nbackend = \"legacy\"\n[[routes]]\nprefix = \"/a\"\nmethods = [\"GET\"]\nbackend = \"users\"\n"
    );
    let parsed = match parse(&src) {
        Ok(p) => p,
        Err(e) => panic!("{e:?}"),
    };
    let msgs: Vec<&str> = parsed.warnings.iter().map(|w| w.message.as_str()).collect();
    assert!(msgs.iter().any(|m| m.contains("catches `/`")), "{msgs:?}");
    assert!(
        msgs.iter()
            .any(|m| m.contains("route `/a` can never match: the route on line 7")),
        "{msgs:?}"
    );
}

#[test]
fn canary_buckets_are_stable_and_monotonic() {
    assert_eq!(canary_bucket(b"user-42"), canary_bucket(b"user-42"));
    let keys: Vec<String> = (0..20_000).map(|i| format!("user-{i}")).collect();
    let share = |p: f64| {
        keys.iter()
            .filter(|k| in_canary(canary_bucket(k.as_bytes()), p))
            .count() as f64
            / keys.len() as f64
    };
    for p in [1.0, 10.0, 50.0, 90.0] {
        assert!(
            (share(p) - p / 100.0).abs() < 0.02,
            "percent {p}: share {}",
            share(p)
        );
    }
    for k in &keys {
        let b = canary_bucket(k.as_bytes());
        assert!(
            !in_canary(b, 10.0) || in_canary(b, 50.0),
            "raising the percent moved {k} back"
        );
    }
}

#[test]
fn diff_speaks_in_stages() {
    let old = table("[[routes]]\nprefix = \"/api/users\"\nbackend = \"legacy\"\nshadow = \"users\"\n[[routes]]\nprefix = \"/api/social\"\nbackend = \"legacy\"\ncanary = { backend = \"users\", percent = 10 }\n[[routes]]\nprefix = \"/old\"\nbackend = \"legacy\"\n");
    let new = table("[[routes]]\nprefix = \"/api/users\"\nbackend = \"users\"\n[[routes]]\nprefix = \"/api/social\"\nbackend = \"legacy\"\ncanary = { backend = \"users\", percent = 50 }\n[[routes]]\nprefix = \"/\"\nbackend = \"legacy\"\n");
    let got = diff::diff(&old, &new);
    assert_eq!(
        got,
        [
            "/api/users: shadowing -> cut over",
            "/api/users: backend legacy -> users",
            "/api/users: shadow users -> none",
            "/api/social: canary 10% -> canary 50%",
            "/: added (legacy, answered by legacy)",
            "/old: removed (was legacy)",
        ]
    );
    assert!(diff::diff(&new, &new).is_empty());
}

#[test]
fn upgrades_a_route_tunnels() {
    let t = table(
        "[[routes]]\nprefix = \"/a\"\nbackend = \"legacy\"\nupgrades = [\"Foo\", \"irc\"]\n[[routes]]\nprefix = \"/b\"\nbackend = \"legacy\"\n",
    );
    let (opted, plain) = (&t.routes()[0], &t.routes()[1]);
    let allows = |r: &Route, values: &[&str]| r.allows_upgrade(values.iter().map(|v| v.as_bytes()));
    for r in [opted, plain] {
        assert!(allows(r, &["websocket"]));
        assert!(allows(r, &["WebSocket"]));
        assert!(!allows(r, &["h2c"]), "h2c never");
        assert!(
            !allows(r, &["websocket, h2c"]),
            "every offered protocol must be allowed"
        );
        assert!(!allows(r, &["websocket", "h2c"]));
    }
    assert!(
        allows(opted, &["foo/1"]),
        "versions are ignored, names case-insensitive"
    );
    assert!(allows(opted, &["irc, websocket"]));
    assert!(!allows(plain, &["foo"]));
    assert!(!allows(opted, &["foobar"]));
}

#[test]
fn backend_and_provider_names_outside_the_alphabet_are_errors_at_their_place() {
    let src = "[backends.\"le gacy\"]\nurl = \"http://127.0.0.1:1\"\n\
               [auth.\"a.b\"]\nissuer = \"i\"\naudiences = [\"a\"]\nalgorithms = [\"HS256\"]\nsecret_env = \"UNSET_STRANGLER_TEST_VAR\"\n\
               [[routes]]\nprefix = \"/\"\nbackend = \"le gacy\"\n";
    let errs = errors(src);
    assert!(
        errs.iter()
            .any(|e| e.starts_with("routes.toml:1:11: backend name \"le gacy\" must be made of")),
        "{errs:?}"
    );
    assert!(
        errs.iter()
            .any(|e| e.starts_with("routes.toml:3:7: provider name \"a.b\" must be made of")),
        "{errs:?}"
    );
}

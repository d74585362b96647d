//! `[auth.NAME]` providers and a route's `auth` in routes.toml: every mistake in every key is
//! reported at its line and column (through `strangler::config::load`, as `check`, a start
//! and a reload see it), and a file with several mistakes gets every one of them.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a panic is a failure report

mod support;

use std::path::Path;

use aws_lc_rs::signature::Ed25519KeyPair;
use jsonwebtoken::jwk::{Jwk, JwkSet};
use jsonwebtoken::{Algorithm, EncodingKey};
use support::jwt::{ISSUER, SECRET};
use support::*;

/// A routes.toml with `[server]` (plus `server_extra`), two backends, `[auth.fittrack]`
/// holding `provider_body`, and one route (plus `route_extra`).
fn garbage_config(server_extra: &str, provider_body: &str, route_extra: &str) -> String {
    format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\n{server_extra}\n\
         [backends.legacy]\nurl = \"http://127.0.0.1:9\"\nlegacy = true\n\
         [backends.users]\nurl = \"http://127.0.0.1:9\"\n\n\
         [auth.fittrack]\n{provider_body}\n\
         [[routes]]\nprefix = \"/\"\nbackend = \"legacy\"\n{route_extra}\n"
    )
}

/// Loads `text` as `dir/routes.toml`: every error line, `FILE:LINE:COL: message`.
fn load_errors(dir: &Path, text: &str) -> Result<(), Vec<String>> {
    let path = dir.join("routes.toml");
    std::fs::write(&path, text).unwrap();
    strangler::config::load(&path)
        .map(|_| ())
        .map_err(|e| e.lines())
}

/// `routes.toml:LINE:COL: ` for where an error must point: the first `needle` in `text`,
/// at its `|` when it has one (`"issuer = |\"\""` points at the empty string).
fn at(text: &str, needle: &str) -> String {
    let (bare, skip) = match needle.split_once('|') {
        Some((before, after)) => (format!("{before}{after}"), before.chars().count()),
        None => (needle.to_string(), 0),
    };
    let (line, col) = position(text, &bare);
    format!("routes.toml:{line}:{}: ", col + skip)
}

/// A temp dir holding `jwks.json` (one Ed25519 key, `ed-1`), `secret` (a 44-byte HMAC
/// secret), `short-secret` (5 bytes), `not-json.json` and `ca.pem` (not a certificate).
fn dir_with_files() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let pair = Ed25519KeyPair::generate().unwrap();
    let key = EncodingKey::from_ed_der(pair.to_pkcs8v1().unwrap().as_ref());
    let mut jwk = Jwk::from_encoding_key(&key, Algorithm::EdDSA).unwrap();
    jwk.common.key_id = Some("ed-1".into());
    let jwks = serde_json::to_string(&JwkSet { keys: vec![jwk] }).unwrap();
    std::fs::write(dir.path().join("jwks.json"), jwks).unwrap();
    std::fs::write(dir.path().join("secret"), format!("{SECRET}\n")).unwrap();
    std::fs::write(dir.path().join("short-secret"), "short\n").unwrap();
    std::fs::write(dir.path().join("not-json.json"), "keys: [rsa-1]").unwrap();
    dir
}

const ISS: &str = "issuer = \"https://auth.test/\"\n";
const AUD: &str = "audiences = [\"fittrack-api\"]\n";
const ALG: &str = "algorithms = [\"EdDSA\"]\n";
const KEYS_FILE: &str = "jwks_file = \"jwks.json\"\n";
const HS: &str = "algorithms = [\"HS256\"]\n";
/// An environment variable no test sets.
const UNSET: &str = "STRANGLER_AUTH_TEST_NEVER_SET_7F3A";

fn good() -> String {
    format!("{ISS}{AUD}{ALG}{KEYS_FILE}")
}

/// A JWKS URL provider: issuer, audiences, `ALG`, `jwks_url`, and `rest`.
fn url_provider(url: &str, rest: &str) -> String {
    format!("{ISS}{AUD}{ALG}jwks_url = \"{url}\"\n{rest}")
}

/// One mistake: the file's parts, where the error must point and what it must say.
struct Case {
    server: String,
    provider: String,
    route: String,
    /// A needle in the file, with `|` where the error points (its start without one).
    at: String,
    names: &'static str,
}

fn provider_case(provider: String, at: &str, names: &'static str) -> Case {
    Case {
        server: String::new(),
        provider,
        route: String::new(),
        at: at.to_string(),
        names,
    }
}

fn route_case(route: &str, at: &str, names: &'static str) -> Case {
    Case {
        server: String::new(),
        provider: good(),
        route: route.to_string(),
        at: at.to_string(),
        names,
    }
}

/// Every case must fail to load with an error at its place naming it; the failures are
/// collected so one run lists them all.
fn check_cases(dir: &Path, cases: &[Case]) {
    let mut failures = Vec::new();
    for c in cases {
        let text = garbage_config(&c.server, &c.provider, &c.route);
        let want = at(&text, &c.at);
        match load_errors(dir, &text) {
            Ok(()) => failures.push(format!("{}: loaded\n{text}", c.names)),
            Err(lines) => {
                if !lines
                    .iter()
                    .any(|l| l.contains(&want) && l.contains(c.names))
                {
                    failures.push(format!(
                        "{}: want {want}... in\n  {}\n{text}",
                        c.names,
                        lines.join("\n  ")
                    ));
                }
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n\n")
    );
}

#[test]
fn the_harness_loads_a_good_provider_of_each_key_source() {
    let dir = dir_with_files();
    let good_files = [
        good(),
        format!("{ISS}{AUD}{HS}secret_file = \"secret\"\n"),
        url_provider(
            "https://idp.test/jwks.json",
            "jwks_refresh = \"30s\"\njwks_cooldown = \"1s\"\njwks_timeout = \"2s\"\n",
        ),
        format!("{}clock_skew = \"10m\"\ntoken_from = [\"header:authorization\", \"cookie:session\", \"header:x-token\"]\nclaims_to_headers = {{ \"x-user-id\" = \"sub\" }}\nforward_token = false\nrealm = \"FitTrack API\"\n", good()),
    ];
    for body in &good_files {
        for route in [
            "auth = \"fittrack\"",
            "auth = { provider = \"fittrack\", mode = \"observe\", require = { scope = \"users:read users:write\", roles = [\"admin\"] } }",
        ] {
            let text = garbage_config("", body, route);
            assert_eq!(load_errors(dir.path(), &text), Ok(()), "{text}");
        }
    }
}

#[test]
fn every_provider_key_mistake_is_reported_at_its_line_and_column() {
    let dir = dir_with_files();
    let g = good();
    let cases = vec![
        // Secrets never inline.
        provider_case(
            format!("{g}secret = \"hunter2-hunter2-hunter2-hunter2-hunter2\"\n"),
            "\"hunter2",
            "`secret`: routes.toml is no place for a secret",
        ),
        // issuer
        provider_case(
            format!("{AUD}{ALG}{KEYS_FILE}"),
            "fittrack]",
            "[auth.fittrack] needs `issuer`",
        ),
        provider_case(
            format!("issuer = \"\"\n{AUD}{ALG}{KEYS_FILE}"),
            "issuer = |\"\"",
            "[auth.fittrack] `issuer` is empty",
        ),
        // audiences
        provider_case(
            format!("{ISS}{ALG}{KEYS_FILE}"),
            "fittrack]",
            "[auth.fittrack] needs `audiences`",
        ),
        provider_case(
            format!("{ISS}audiences = []\n{ALG}{KEYS_FILE}"),
            "audiences = |[]",
            "[auth.fittrack] `audiences` is empty",
        ),
        provider_case(
            format!("{ISS}audiences = [\"fittrack-api\", \"\"]\n{ALG}{KEYS_FILE}"),
            "\"fittrack-api\", |\"\"",
            "[auth.fittrack] `audiences`: an empty audience",
        ),
        // algorithms
        provider_case(
            format!("{ISS}{AUD}{KEYS_FILE}"),
            "fittrack]",
            "[auth.fittrack] needs `algorithms`",
        ),
        provider_case(
            format!("{ISS}{AUD}algorithms = []\n{KEYS_FILE}"),
            "algorithms = |[]",
            "[auth.fittrack] `algorithms` is empty",
        ),
        provider_case(
            format!("{ISS}{AUD}algorithms = [\"EdDSA\", \"none\"]\n{KEYS_FILE}"),
            "\"none\"",
            "`algorithms`: \"none\" is not a signing algorithm",
        ),
        provider_case(
            format!("{ISS}{AUD}algorithms = [\"EdDSA\", \"rs256\"]\n{KEYS_FILE}"),
            "\"rs256\"",
            "`algorithms`: \"rs256\" is not a signing algorithm",
        ),
        provider_case(
            format!("{ISS}{AUD}algorithms = [\"RS257\"]\n{KEYS_FILE}"),
            "\"RS257\"",
            "`algorithms`: \"RS257\" is not a signing algorithm",
        ),
        provider_case(
            format!("{ISS}{AUD}algorithms = [\"HS256\", \"EdDSA\"]\n{KEYS_FILE}"),
            "algorithms = |[",
            "`algorithms` mixes HMAC",
        ),
        // clock_skew
        provider_case(
            format!("{g}clock_skew = \"a minute\"\n"),
            "clock_skew = |\"a minute\"",
            "`clock_skew`",
        ),
        provider_case(
            format!("{g}clock_skew = \"11m\"\n"),
            "clock_skew = |\"11m\"",
            "[auth.fittrack] `clock_skew` above 10m would keep expired tokens alive",
        ),
        // One key source, and the right one for the algorithms.
        provider_case(
            format!("{ISS}{AUD}{ALG}"),
            "fittrack]",
            "exactly one key source: `jwks_url`, `jwks_file`, `secret_env` or `secret_file` (none is set)",
        ),
        provider_case(
            format!("{g}secret_file = \"secret\"\n"),
            "secret_file = |\"secret\"",
            "(set: `jwks_file`, `secret_file`)",
        ),
        provider_case(
            format!("{g}jwks_url = \"https://idp.test/jwks.json\"\n"),
            "\"https://idp.test/jwks.json\"",
            "(set: `jwks_url`, `jwks_file`)",
        ),
        provider_case(
            format!("{ISS}{AUD}algorithms = [\"RS256\"]\nsecret_file = \"secret\"\n"),
            "secret_file = |\"secret\"",
            "[auth.fittrack] `secret_file` is an HMAC secret: `algorithms` must then be HS256, HS384 or HS512 only",
        ),
        provider_case(
            format!("{ISS}{AUD}algorithms = [\"ES256\"]\nsecret_env = \"{UNSET}\"\n"),
            &format!("secret_env = |\"{UNSET}\""),
            "[auth.fittrack] `secret_env` is an HMAC secret: `algorithms` must then be HS256, HS384 or HS512 only",
        ),
        provider_case(
            format!("{ISS}{AUD}{HS}{KEYS_FILE}"),
            "jwks_file = |\"jwks.json\"",
            "[auth.fittrack] `jwks_file` holds public keys: HS* algorithms need `secret_env` or `secret_file`",
        ),
        provider_case(
            format!("{ISS}{AUD}algorithms = [\"HS512\"]\njwks_url = \"https://idp.test/jwks.json\"\n"),
            "jwks_url = |\"https",
            "[auth.fittrack] `jwks_url` holds public keys: HS* algorithms need `secret_env` or `secret_file`",
        ),
        // Settings of a jwks_url, elsewhere.
        provider_case(
            format!("{g}jwks_ca = \"ca.pem\"\n"),
            "jwks_ca = |\"ca.pem\"",
            "[auth.fittrack] `jwks_ca` applies to `jwks_url` only",
        ),
        provider_case(
            format!("{g}jwks_refresh = \"10m\"\n"),
            "jwks_refresh = |\"10m\"",
            "[auth.fittrack] `jwks_refresh` applies to `jwks_url` only",
        ),
        provider_case(
            format!("{g}jwks_timeout = \"2s\"\n"),
            "jwks_timeout = |\"2s\"",
            "[auth.fittrack] `jwks_timeout` applies to `jwks_url` only",
        ),
        provider_case(
            format!("{ISS}{AUD}{HS}secret_file = \"secret\"\njwks_cooldown = \"5s\"\n"),
            "jwks_cooldown = |\"5s\"",
            "[auth.fittrack] `jwks_cooldown` applies to `jwks_url` only",
        ),
        // jwks_url and its settings.
        provider_case(
            url_provider("ftp://idp.test/jwks.json", ""),
            "jwks_url = |\"ftp",
            "[auth.fittrack] `jwks_url`: \"ftp://idp.test/jwks.json\" must be an absolute http:// or https:// URL",
        ),
        provider_case(
            url_provider("/.well-known/jwks.json", ""),
            "jwks_url = |\"/.well",
            "[auth.fittrack] `jwks_url`: \"/.well-known/jwks.json\" must be an absolute http:// or https:// URL",
        ),
        provider_case(
            // a URL that does not parse is not echoed either when it may hold a password
            url_provider("htps://user:s3cret@idp.test/jwks.json", ""),
            "jwks_url = |\"htps",
            "[auth.fittrack] `jwks_url`: the value must be an absolute http:// or https:// URL",
        ),
        provider_case(
            url_provider("https://user:pw@idp.test/jwks.json", ""),
            "jwks_url = |\"https",
            "[auth.fittrack] `jwks_url` must not carry credentials",
        ),
        provider_case(
            url_provider("https://idp.test/jwks.json", "jwks_refresh = \"29s\"\n"),
            "jwks_refresh = |\"29s\"",
            "[auth.fittrack] `jwks_refresh` must be at least 30s",
        ),
        provider_case(
            url_provider("https://idp.test/jwks.json", "jwks_refresh = \"often\"\n"),
            "jwks_refresh = |\"often\"",
            "[auth.fittrack] `jwks_refresh`:",
        ),
        provider_case(
            url_provider("https://idp.test/jwks.json", "jwks_cooldown = \"500ms\"\n"),
            "jwks_cooldown = |\"500ms\"",
            "[auth.fittrack] `jwks_cooldown` must be at least 1s",
        ),
        provider_case(
            url_provider("https://idp.test/jwks.json", "jwks_cooldown = \"0s\"\n"),
            "jwks_cooldown = |\"0s\"",
            "[auth.fittrack] `jwks_cooldown`: duration \"0s\" must be greater than zero",
        ),
        provider_case(
            url_provider("https://idp.test/jwks.json", "jwks_timeout = \"soon\"\n"),
            "jwks_timeout = |\"soon\"",
            "[auth.fittrack] `jwks_timeout`:",
        ),
        provider_case(
            url_provider("https://idp.test/jwks.json", "jwks_timeout = \"0s\"\n"),
            "jwks_timeout = |\"0s\"",
            "[auth.fittrack] `jwks_timeout`: duration \"0s\" must be greater than zero",
        ),
        provider_case(
            url_provider("https://idp.test/jwks.json", "jwks_ca = \"missing-ca.pem\"\n"),
            "jwks_ca = |\"missing-ca.pem\"",
            "[auth.fittrack] `jwks_ca`: cannot read ",
        ),
        provider_case(
            url_provider("https://idp.test/jwks.json", "jwks_ca = \"not-json.json\"\n"),
            "jwks_ca = |\"not-json.json\"",
            "[auth.fittrack] `jwks_ca`: ",
        ),
        provider_case(
            url_provider("http://idp.test/jwks.json", "jwks_ca = \"secret\"\n"),
            "jwks_ca = |\"secret\"",
            "[auth.fittrack] `jwks_ca` applies to https:// URLs",
        ),
        // jwks_file
        provider_case(
            format!("{ISS}{AUD}{ALG}jwks_file = \"missing.json\"\n"),
            "\"missing.json\"",
            "[auth.fittrack] `jwks_file`: cannot read",
        ),
        provider_case(
            format!("{ISS}{AUD}{ALG}jwks_file = \"not-json.json\"\n"),
            "\"not-json.json\"",
            "[auth.fittrack] `jwks_file` \"not-json.json\"",
        ),
        // Secrets: present and long enough.
        provider_case(
            format!("{ISS}{AUD}{HS}secret_env = \"{UNSET}\"\n"),
            &format!("secret_env = |\"{UNSET}\""),
            "the secret is empty or unset",
        ),
        provider_case(
            format!("{ISS}{AUD}{HS}secret_file = \"short-secret\"\n"),
            "secret_file = |\"short-secret\"",
            "`secret_file short-secret`: the secret is 5 bytes; HMAC secrets need at least 32",
        ),
        provider_case(
            format!("{ISS}{AUD}{HS}secret_file = \"no-such-secret\"\n"),
            "secret_file = |\"no-such-secret\"",
            "[auth.fittrack] `secret_file`: cannot read",
        ),
        // token_from
        provider_case(
            format!("{g}token_from = []\n"),
            "token_from = |[]",
            "[auth.fittrack] `token_from` is empty",
        ),
        provider_case(
            format!("{g}token_from = [\"header:authorization\", \"query:access_token\"]\n"),
            "\"query:access_token\"",
            "`token_from` \"query:access_token\": expected \"header:authorization\", \"header:NAME\" or \"cookie:NAME\" (never a query parameter",
        ),
        provider_case(
            format!("{g}token_from = [\"cookie:\"]\n"),
            "\"cookie:\"",
            "`token_from` \"cookie:\"",
        ),
        provider_case(
            format!("{g}token_from = [\"header:cookie\"]\n"),
            "\"header:cookie\"",
            "`token_from` \"header:cookie\"",
        ),
        provider_case(
            format!("{g}token_from = [\"bearer\"]\n"),
            "\"bearer\"",
            "`token_from` \"bearer\"",
        ),
        // claims_to_headers: each mistake at its own entry.
        provider_case(
            format!("{g}claims_to_headers = {{ \"x-user-id\" = \"sub\", \"x user\" = \"sub\" }}\n"),
            "\"x user\"",
            "[auth.fittrack] `claims_to_headers`: \"x user\" is not a header name",
        ),
        provider_case(
            format!("{g}claims_to_headers = {{ \"x-user-id\" = \"sub\", \"x-level\" = 7 }}\n"),
            "\"x-level\" = |7",
            "[auth.fittrack] `claims_to_headers`: x-level must name a claim, as a string",
        ),
        provider_case(
            format!("{g}claims_to_headers = {{ \"x-user-id\" = \"\" }}\n"),
            "\"x-user-id\" = |\"\"",
            "[auth.fittrack] `claims_to_headers`: x-user-id must name a claim",
        ),
        provider_case(
            format!("{g}claims_to_headers = {{ \"x-user-id\" = \"sub\", \"authorization\" = \"sub\" }}\n"),
            "\"authorization\"",
            "`claims_to_headers`: authorization is set by the client or the proxy",
        ),
        provider_case(
            format!("{g}claims_to_headers = {{ \"X-Forwarded-User\" = \"sub\" }}\n"),
            "\"X-Forwarded-User\"",
            "`claims_to_headers`: x-forwarded-user is set by the client or the proxy",
        ),
        provider_case(
            format!("{g}[auth.fittrack.claims_to_headers]\n\"x-user-id\" = \"sub\"\n\"x-org\" = [\"org\"]\n"),
            "\"x-org\" = |[",
            "`claims_to_headers`: x-org must name a claim",
        ),
        provider_case(
            format!("{g}claims_to_headers = \"sub\"\n"),
            "claims_to_headers = |\"sub\"",
            "[auth.fittrack]: invalid type: string \"sub\", expected a map",
        ),
        // realm
        provider_case(
            format!("{g}realm = 'fit\"track'\n"),
            "realm = |'fit",
            "[auth.fittrack] `realm` must be printable ASCII without quotes or backslashes",
        ),
        provider_case(
            format!("{g}realm = \"\"\n"),
            "realm = |\"\"",
            "[auth.fittrack] `realm` must be printable ASCII",
        ),
        provider_case(
            format!("{g}realm = \"fittrack\\n\"\n"),
            "realm = |\"fittrack",
            "[auth.fittrack] `realm` must be printable ASCII",
        ),
        // forward_token and unknown keys: the section's shape.
        provider_case(
            format!("{g}forward_token = \"yes\"\n"),
            "forward_token = |\"yes\"",
            "[auth.fittrack]: invalid type: string \"yes\", expected a boolean",
        ),
        provider_case(
            format!("{g}colour = \"blue\"\n"),
            "colour",
            "[auth.fittrack]: unknown field `colour`",
        ),
        provider_case(
            format!("{g}jwks_uri = \"https://idp.test/jwks.json\"\n"),
            "jwks_uri",
            "[auth.fittrack]: unknown field `jwks_uri`",
        ),
        provider_case(
            format!("{ISS}audiences = \"fittrack-api\"\n{ALG}{KEYS_FILE}"),
            "audiences = |\"fittrack-api\"",
            "[auth.fittrack]: invalid type: string \"fittrack-api\", expected a sequence",
        ),
    ];
    check_cases(dir.path(), &cases);
}

#[test]
fn every_route_auth_mistake_is_reported_at_its_line_and_column() {
    let dir = dir_with_files();
    let mut cases = vec![
        route_case(
            "auth = \"fitrack\"",
            "\"fitrack\"",
            "`auth`: unknown provider \"fitrack\" (declared: fittrack)",
        ),
        route_case(
            "auth = { provider = \"fitrack\", mode = \"observe\" }",
            "\"fitrack\"",
            "`auth`: unknown provider \"fitrack\"",
        ),
        route_case(
            "auth = { provider = \"fittrack\", mode = \"enforce\" }",
            "\"enforce\"",
            "`auth.mode` \"enforce\": expected \"required\", \"optional\" or \"observe\"",
        ),
        route_case(
            "auth = { provider = \"fittrack\", mode = \"Observe\" }",
            "\"Observe\"",
            "`auth.mode` \"Observe\"",
        ),
        route_case(
            "auth = { provider = \"fittrack\", require = { scope = 7 } }",
            "scope = |7",
            "`auth.require` \"scope\": expected a non-empty string or array of strings",
        ),
        route_case(
            "auth = { provider = \"fittrack\", require = { scope = \"\" } }",
            "scope = |\"\"",
            "`auth.require` \"scope\"",
        ),
        route_case(
            "auth = { provider = \"fittrack\", require = { roles = [] } }",
            "roles = |[]",
            "`auth.require` \"roles\"",
        ),
        route_case(
            "auth = { provider = \"fittrack\", require = { roles = [\"admin\", 1] } }",
            "roles = |[",
            "`auth.require` \"roles\"",
        ),
        route_case(
            "auth = { provider = \"fittrack\", require = \"scope:users:read\" }",
            "require = |\"scope",
            "invalid type: string \"scope:users:read\", expected a map",
        ),
        route_case(
            "auth = { provider = \"fittrack\", mod = \"observe\" }",
            "mod = ",
            "unknown field `mod`",
        ),
        route_case(
            "auth = { mode = \"observe\" }",
            "auth = |{",
            "missing field `provider`",
        ),
        route_case(
            "auth = 7",
            "auth = |7",
            "expected a provider name or { provider, mode, require }",
        ),
        route_case(
            "auth = [\"fittrack\"]",
            "auth = |[",
            "expected a provider name or { provider, mode, require }",
        ),
        route_case(
            "auth = true",
            "auth = |true",
            "expected a provider name or { provider, mode, require }",
        ),
        route_case(
            "canary = { backend = \"users\", percent = 10, sticky = \"claim:sub\" }",
            "{ backend = \"users\"",
            "`canary.sticky` \"claim:sub\" needs `auth`",
        ),
    ];
    cases.push(Case {
        server: "trusted_proxies = [\"10.0.0.0/8\", \"10.0.0.0/33\"]".into(),
        provider: good(),
        route: String::new(),
        at: "\"10.0.0.0/33\"".into(),
        names: "`trusted_proxies`: \"10.0.0.0/33\"",
    });
    check_cases(dir.path(), &cases);

    let text = garbage_config("", &good(), "").replace("[auth.fittrack]", "[auth.\"fit track\"]");
    let errors = load_errors(dir.path(), &text).unwrap_err();
    let want = at(&text, "\"fit track\"");
    assert!(
        errors
            .iter()
            .any(|l| l.contains(&want) && l.contains("provider name \"fit track\" must be made of")),
        "{errors:?}\n{text}"
    );
    // `auth` at the top level that is not a table of `[auth.NAME]` sections.
    let text = "auth = \"fittrack\"\n[server]\nlisten = \"127.0.0.1:0\"\n[backends.legacy]\nurl = \"http://127.0.0.1:9\"\nlegacy = true\n[[routes]]\nprefix = \"/\"\nbackend = \"legacy\"\n";
    let errors = load_errors(dir.path(), text).unwrap_err();
    let want = at(text, "auth = |\"fittrack\"");
    assert!(
        errors
            .iter()
            .any(|l| l.contains(&want)
                && l.contains("`auth` must be a table of `[auth.NAME]` sections")),
        "{errors:?}\n{text}"
    );
}

#[test]
fn a_file_with_several_auth_mistakes_gets_every_one_of_them() {
    let dir = dir_with_files();
    let text = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\ntrusted_proxies = [\"10.0.0.0/40\"]\n\n\
         [backends.legacy]\nurl = \"http://127.0.0.1:9\"\nlegacy = true\n\n\
         [auth.fittrack]\nissuer = \"\"\naudiences = [\"fittrack-api\"]\nalgorithms = [\"EdDSA\", \"XS256\"]\njwks_url = \"https://idp.test/jwks.json\"\njwks_refresh = \"5s\"\nrealm = \"a\\\\b\"\n\n\
         [auth.internal]\nissuer = \"{ISSUER}\"\naudiences = []\nalgorithms = [\"HS256\"]\nsecret_file = \"short-secret\"\ntoken_from = [\"query:t\"]\n\n\
         [[routes]]\nprefix = \"/a\"\nbackend = \"legacy\"\nauth = {{ provider = \"fittrack\", mode = \"enforce\" }}\n\n\
         [[routes]]\nprefix = \"/b\"\nbackend = \"legacy\"\nauth = \"nobody\"\n\n\
         [[routes]]\nprefix = \"/\"\nbackend = \"legacy\"\n"
    );
    let want = [
        ("\"10.0.0.0/40\"", "`trusted_proxies`"),
        ("issuer = |\"\"", "[auth.fittrack] `issuer` is empty"),
        (
            "\"XS256\"",
            "`algorithms`: \"XS256\" is not a signing algorithm",
        ),
        (
            "jwks_refresh = |\"5s\"",
            "`jwks_refresh` must be at least 30s",
        ),
        ("realm = |\"a", "`realm` must be printable ASCII"),
        ("audiences = |[]", "[auth.internal] `audiences` is empty"),
        ("secret_file = |\"short-secret\"", "the secret is 5 bytes"),
        ("\"query:t\"", "[auth.internal] `token_from` \"query:t\""),
        ("\"enforce\"", "`auth.mode` \"enforce\""),
        ("\"nobody\"", "`auth`: unknown provider \"nobody\""),
    ];
    let errors = load_errors(dir.path(), &text).unwrap_err();
    assert_eq!(
        errors.len(),
        want.len(),
        "one error per mistake:\n  {}\n{text}",
        errors.join("\n  ")
    );
    // In file order, each at its place.
    for (line, (needle, names)) in errors.iter().zip(want) {
        let place = at(&text, needle);
        assert!(
            line.contains(&place) && line.contains(names),
            "want {place}...{names}, got {line}\n  {}",
            errors.join("\n  ")
        );
    }
}

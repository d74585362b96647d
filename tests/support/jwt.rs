//! JWT fixtures for the tests that put an `[auth.NAME]` provider in front of a route: the
//! clock in token time, HS256 tokens from the test issuer, and a temp dir holding the
//! provider's `secret_file`.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::time::{SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::json;

/// The `iss` of every test token (and the `issuer` of every test provider).
pub const ISSUER: &str = "https://auth.test/";

/// An HS256 secret (32 bytes and more) for a provider's `secret_file`.
pub const SECRET: &str = "0123456789abcdef0123456789abcdef-test-secret";

/// Seconds since the Unix epoch: the unit of `iat` and `exp`.
pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// An HS256 token signed with `secret`: `iss` [`ISSUER`], `aud` `audience`, issued now and
/// valid for ten minutes, with `sub` when given.
pub fn hs256(secret: &str, audience: &str, sub: Option<&str>) -> String {
    let now = now();
    let mut claims = json!({"iss": ISSUER, "aud": audience, "iat": now, "exp": now + 600});
    if let Some(s) = sub {
        claims["sub"] = json!(s);
    }
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

/// A temp dir holding `secret` in the file `secret` (a provider's `secret_file = "secret"`
/// in a routes.toml written there).
pub fn secret_dir(secret: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("secret"), secret).unwrap();
    dir
}

//! JSON Web Tokens, as pure functions: a key set read from a JWKS document or an HMAC secret,
//! the rules a provider checks (issuer, audiences, an algorithm allow-list, clock skew), and
//! [`verify`]: one token against those rules and keys, to its claims or the [`Reason`] it was
//! refused. No IO, no clocks beyond the system time the expiry check reads, no locks.
//!
//! The signature work is `jsonwebtoken` on aws-lc-rs. What is checked here besides it, from
//! the attacks seen in the wild: the algorithm comes from the provider's allow-list, never
//! from the token alone (`none` and anything unlisted are refused); HMAC and public-key
//! algorithms never share a provider (validation), and each JWKS key is used only with the
//! algorithms of its own key type (an HS256 token "signed" with an RSA public key finds no
//! key); `jku`, `x5u`, `x5c` and an embedded `jwk` are refused, never followed; `exp`, `nbf`
//! and `iat` must be numbers (a string `exp` is refused, not skipped).

use std::collections::HashMap;
use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, JwkSet, KeyAlgorithm};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

/// Verified claims of a token.
pub type Claims = Map<String, Value>;

/// What a provider checks besides the signature.
#[derive(Debug, Clone, PartialEq)]
pub struct Rules {
    /// Exact match on `iss`.
    pub issuer: String,
    /// Any of them in `aud`.
    pub audiences: Vec<String>,
    /// The allow-list; a token whose `alg` is not in it is refused.
    pub algorithms: Vec<Algorithm>,
    /// Leeway on `exp` and `nbf`.
    pub clock_skew: Duration,
}

/// Why a token (or a request's credentials) was not accepted. `as_str` is the `outcome`
/// label of `strangler_auth_total`: a fixed set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// No credentials where the provider reads them.
    Missing,
    /// Credentials that are not a well-formed bearer token (400).
    Malformed,
    /// Not a decodable JWT.
    BadToken,
    /// `alg` outside the allow-list, or `none`.
    Algorithm,
    /// `jku`, `x5u`, `x5c`, `jwk` or `crit` in the header.
    ForbiddenHeader,
    /// No key with this `kid` (or of this algorithm's type).
    UnknownKey,
    Signature,
    Expired,
    NotYetValid,
    Issuer,
    Audience,
    /// A registered claim missing or of the wrong type (a string `exp`).
    Claims,
    /// Valid, but a `require`d claim value is missing (403).
    InsufficientScope,
    /// The key is unknown and the key source cannot be reached (503).
    KeysUnavailable,
}

impl Reason {
    pub const ALL: [Reason; 14] = [
        Reason::Missing,
        Reason::Malformed,
        Reason::BadToken,
        Reason::Algorithm,
        Reason::ForbiddenHeader,
        Reason::UnknownKey,
        Reason::Signature,
        Reason::Expired,
        Reason::NotYetValid,
        Reason::Issuer,
        Reason::Audience,
        Reason::Claims,
        Reason::InsufficientScope,
        Reason::KeysUnavailable,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Missing => "missing",
            Reason::Malformed => "malformed",
            Reason::BadToken => "bad_token",
            Reason::Algorithm => "bad_algorithm",
            Reason::ForbiddenHeader => "forbidden_header",
            Reason::UnknownKey => "unknown_key",
            Reason::Signature => "bad_signature",
            Reason::Expired => "expired",
            Reason::NotYetValid => "not_yet_valid",
            Reason::Issuer => "bad_issuer",
            Reason::Audience => "bad_audience",
            Reason::Claims => "bad_claims",
            Reason::InsufficientScope => "insufficient_scope",
            Reason::KeysUnavailable => "keys_unavailable",
        }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The family of algorithms a key may be used with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Family {
    Rsa,
    P256,
    P384,
    Ed25519,
    Hmac,
    /// An algorithm this proxy does not verify with (none of its keys fit).
    Unsupported,
}

impl Family {
    fn of(alg: Algorithm) -> Family {
        match alg {
            Algorithm::RS256
            | Algorithm::RS384
            | Algorithm::RS512
            | Algorithm::PS256
            | Algorithm::PS384
            | Algorithm::PS512 => Family::Rsa,
            Algorithm::ES256 => Family::P256,
            Algorithm::ES384 => Family::P384,
            Algorithm::EdDSA => Family::Ed25519,
            Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512 => Family::Hmac,
            _ => Family::Unsupported,
        }
    }
}

/// Whether `alg` is an HMAC algorithm (a shared secret, not a key pair).
pub fn is_hmac(alg: Algorithm) -> bool {
    Family::of(alg) == Family::Hmac
}

/// The algorithm names routes.toml accepts (`none` is not one).
pub fn algorithm(name: &str) -> Option<Algorithm> {
    use std::str::FromStr;
    if name.eq_ignore_ascii_case("none") {
        return None;
    }
    Algorithm::from_str(name).ok()
}

/// One usable key.
#[derive(Clone)]
struct Key {
    family: Family,
    /// The JWK's own `alg`, when it names one: the key is used with that one only.
    alg: Option<Algorithm>,
    key: DecodingKey,
}

impl Key {
    fn fits(&self, alg: Algorithm) -> bool {
        self.family == Family::of(alg) && self.alg.is_none_or(|a| a == alg)
    }
}

/// Keys by `kid`, plus those without one. Compared by the digest of what they were read from.
#[derive(Clone)]
pub struct KeySet {
    by_kid: HashMap<String, Key>,
    anonymous: Vec<Key>,
    digest: [u8; 32],
    /// Keys skipped on reading (unsupported type or curve, encryption keys), for messages.
    pub skipped: usize,
}

impl PartialEq for KeySet {
    fn eq(&self, other: &Self) -> bool {
        self.digest == other.digest
    }
}

/// Never prints key material.
impl fmt::Debug for KeySet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeySet")
            .field("kids", &self.by_kid.len())
            .field("anonymous", &self.anonymous.len())
            .finish()
    }
}

impl KeySet {
    /// An empty set (a JWKS URL before its first fetch).
    pub fn empty() -> Self {
        KeySet {
            by_kid: HashMap::new(),
            anonymous: vec![],
            digest: [0; 32],
            skipped: 0,
        }
    }

    /// Reads a JWKS document (`{"keys": [...]}`). Keys of types this proxy cannot verify
    /// with, and `"use": "enc"` keys, are skipped and counted; a document with no usable key
    /// is an error.
    pub fn from_jwks(bytes: &[u8]) -> Result<Self, String> {
        let set: JwkSet =
            serde_json::from_slice(bytes).map_err(|e| format!("not a JWKS document: {e}"))?;
        let mut out = KeySet::empty();
        out.digest = Sha256::digest(bytes).into();
        for jwk in &set.keys {
            match key_of(jwk) {
                Some(key) => match &jwk.common.key_id {
                    Some(kid) => {
                        out.by_kid.insert(kid.clone(), key);
                    }
                    None => out.anonymous.push(key),
                },
                None => out.skipped += 1,
            }
        }
        if out.is_empty() {
            return Err(format!(
                "no usable key among {} (RSA, EC P-256/P-384 and Ed25519 signing keys are)",
                set.keys.len()
            ));
        }
        Ok(out)
    }

    /// An HMAC secret, for the HS* algorithms.
    pub fn from_secret(secret: &[u8]) -> Self {
        let mut out = KeySet::empty();
        out.digest = Sha256::digest(secret).into();
        out.anonymous.push(Key {
            family: Family::Hmac,
            alg: None,
            key: DecodingKey::from_secret(secret),
        });
        out
    }

    pub fn len(&self) -> usize {
        self.by_kid.len() + self.anonymous.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether the set has a key named `kid`.
    pub fn has(&self, kid: &str) -> bool {
        self.by_kid.contains_key(kid)
    }

    /// The `kid`s, sorted, for `/routes`.
    pub fn kids(&self) -> Vec<String> {
        let mut kids: Vec<String> = self.by_kid.keys().cloned().collect();
        kids.sort_unstable();
        kids
    }

    /// The keys a token with this header may be checked with.
    fn candidates(&self, kid: Option<&str>, alg: Algorithm) -> Vec<&Key> {
        match kid {
            // An HMAC secret has no key id: whatever `kid` the issuer writes names it.
            Some(kid) => match self.by_kid.get(kid) {
                Some(key) => [key].into_iter().filter(|k| k.fits(alg)).collect(),
                None => self
                    .anonymous
                    .iter()
                    .filter(|k| k.family == Family::Hmac && k.fits(alg))
                    .collect(),
            },
            None => self
                .anonymous
                .iter()
                .chain(self.by_kid.values())
                .filter(|k| k.fits(alg))
                .collect(),
        }
    }
}

fn key_of(jwk: &Jwk) -> Option<Key> {
    use jsonwebtoken::jwk::PublicKeyUse;
    if matches!(jwk.common.public_key_use, Some(PublicKeyUse::Encryption)) {
        return None;
    }
    let family = match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => Family::Rsa,
        AlgorithmParameters::EllipticCurve(p) => match p.curve {
            EllipticCurve::P256 => Family::P256,
            EllipticCurve::P384 => Family::P384,
            _ => return None,
        },
        AlgorithmParameters::OctetKeyPair(p) => match p.curve {
            EllipticCurve::Ed25519 => Family::Ed25519,
            _ => return None,
        },
        // Symmetric keys are never taken from a JWKS: a secret comes from secret_env/_file.
        _ => return None,
    };
    let alg = match jwk.common.key_algorithm {
        None => None,
        Some(ka) => Some(signing_algorithm(ka)?),
    };
    if alg.is_some_and(|a| Family::of(a) != family) {
        return None;
    }
    let key = DecodingKey::from_jwk(jwk).ok()?;
    Some(Key { family, alg, key })
}

fn signing_algorithm(ka: KeyAlgorithm) -> Option<Algorithm> {
    Some(match ka {
        KeyAlgorithm::RS256 => Algorithm::RS256,
        KeyAlgorithm::RS384 => Algorithm::RS384,
        KeyAlgorithm::RS512 => Algorithm::RS512,
        KeyAlgorithm::PS256 => Algorithm::PS256,
        KeyAlgorithm::PS384 => Algorithm::PS384,
        KeyAlgorithm::PS512 => Algorithm::PS512,
        KeyAlgorithm::ES256 => Algorithm::ES256,
        KeyAlgorithm::ES384 => Algorithm::ES384,
        KeyAlgorithm::EdDSA => Algorithm::EdDSA,
        _ => return None,
    })
}

/// What the header of a token says, before any key is looked at.
#[derive(Debug, Clone, PartialEq)]
pub struct Head {
    pub alg: Algorithm,
    pub kid: Option<String>,
}

/// Reads a token's header and checks it against the rules: a known, allowed algorithm and no
/// header that points elsewhere for keys.
pub fn head(token: &str, rules: &Rules) -> Result<Head, Reason> {
    // `alg: none` does not parse as an `Algorithm`: it is refused here as a bad algorithm.
    let header = jsonwebtoken::decode_header(token).map_err(|e| match e.kind() {
        ErrorKind::InvalidAlgorithmName => Reason::Algorithm,
        _ => {
            if declares_none(token) {
                Reason::Algorithm
            } else {
                Reason::BadToken
            }
        }
    })?;
    // `crit` names extensions the signer requires us to understand; we understand none.
    if header.jku.is_some()
        || header.x5u.is_some()
        || header.x5c.is_some()
        || header.jwk.is_some()
        || header.crit.is_some()
    {
        return Err(Reason::ForbiddenHeader);
    }
    if !rules.algorithms.contains(&header.alg) {
        return Err(Reason::Algorithm);
    }
    Ok(Head {
        alg: header.alg,
        kid: header.kid,
    })
}

/// Whether the header of a token that did not decode names the `none` algorithm.
fn declares_none(token: &str) -> bool {
    use base64::Engine as _;
    let Some(first) = token.split('.').next() else {
        return false;
    };
    let Ok(bytes) = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(first) else {
        return false;
    };
    serde_json::from_slice::<Value>(&bytes)
        .ok()
        .and_then(|v| {
            v.get("alg")?
                .as_str()
                .map(|a| a.eq_ignore_ascii_case("none"))
        })
        .unwrap_or(false)
}

/// Verifies `token` (whose header is `head`) with `keys` under `rules`: its claims, or why not.
pub fn verify(token: &str, head: &Head, rules: &Rules, keys: &KeySet) -> Result<Claims, Reason> {
    let candidates = keys.candidates(head.kid.as_deref(), head.alg);
    if candidates.is_empty() {
        return Err(Reason::UnknownKey);
    }
    let mut validation = Validation::new(head.alg);
    validation.algorithms = vec![head.alg];
    validation.leeway = rules.clock_skew.as_secs();
    validation.validate_nbf = true;
    validation.set_issuer(&[&rules.issuer]);
    validation.set_audience(&rules.audiences);
    validation.set_required_spec_claims(&["exp", "iss", "aud"]);
    let mut last = Reason::Signature;
    for key in candidates {
        match jsonwebtoken::decode::<Claims>(token, &key.key, &validation) {
            Ok(data) => {
                let claims = data.claims;
                registered_claims_are_numbers(&claims)?;
                // `iss` is one string (RFC 7519 §4.1.1); jsonwebtoken also passes an array
                // that merely holds the issuer.
                if claims.get("iss").and_then(Value::as_str) != Some(rules.issuer.as_str()) {
                    return Err(Reason::Issuer);
                }
                return Ok(claims);
            }
            Err(e) => {
                last = reason_of(e.kind());
                if last != Reason::Signature {
                    break;
                }
            }
        }
    }
    Err(last)
}

fn reason_of(kind: &ErrorKind) -> Reason {
    match kind {
        ErrorKind::InvalidSignature => Reason::Signature,
        ErrorKind::ExpiredSignature => Reason::Expired,
        ErrorKind::ImmatureSignature => Reason::NotYetValid,
        ErrorKind::InvalidIssuer => Reason::Issuer,
        ErrorKind::InvalidAudience => Reason::Audience,
        ErrorKind::InvalidAlgorithm
        | ErrorKind::InvalidAlgorithmName
        | ErrorKind::MissingAlgorithm => Reason::Algorithm,
        // A string `nbf` is InvalidClaimFormat (a string `exp` is MissingRequiredClaim).
        ErrorKind::MissingRequiredClaim(_) | ErrorKind::InvalidClaimFormat(_) => Reason::Claims,
        ErrorKind::InvalidToken
        | ErrorKind::Base64(_)
        | ErrorKind::Json(_)
        | ErrorKind::Utf8(_) => Reason::BadToken,
        _ => Reason::Signature,
    }
}

/// `exp`, `nbf` and `iat` must be numbers when present (a string would otherwise be skipped
/// by a lenient check, GHSA-h395-gr6q-cpjc).
fn registered_claims_are_numbers(claims: &Claims) -> Result<(), Reason> {
    for name in ["exp", "nbf", "iat"] {
        if let Some(v) = claims.get(name) {
            if v.as_u64().is_none() && v.as_f64().is_none_or(|f| f < 0.0) {
                return Err(Reason::Claims);
            }
        }
    }
    Ok(())
}

/// Seconds since the epoch now.
pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A registered time claim as whole seconds.
pub fn time_claim(claims: &Claims, name: &str) -> Option<u64> {
    let v = claims.get(name)?;
    v.as_u64().or_else(|| v.as_f64().map(|f| f as u64))
}

/// Whether claims verified earlier are still within their time bounds at `now`.
pub fn still_valid(claims: &Claims, rules: &Rules, now: u64) -> Result<(), Reason> {
    let skew = rules.clock_skew.as_secs();
    match time_claim(claims, "exp") {
        Some(exp) if now > exp.saturating_add(skew) => return Err(Reason::Expired),
        None => return Err(Reason::Claims),
        _ => {}
    }
    if time_claim(claims, "nbf").is_some_and(|nbf| nbf > now.saturating_add(skew)) {
        return Err(Reason::NotYetValid);
    }
    Ok(())
}

/// The values a claim grants: a space-separated string (OAuth `scope`), an array of strings,
/// or one scalar as its text.
fn granted(value: &Value) -> Vec<String> {
    match value {
        Value::String(s) => s.split_ascii_whitespace().map(str::to_string).collect(),
        Value::Array(items) => items.iter().filter_map(scalar_text).collect(),
        other => scalar_text(other).into_iter().collect(),
    }
}

fn scalar_text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

/// The first required value the claims do not grant: `require = { scope = "users:read" }`
/// passes when `scope` holds `users:read` among its space-separated values or array items.
pub fn missing_requirement<'a>(
    claims: &Claims,
    require: &'a [(String, Vec<String>)],
) -> Option<(&'a str, &'a str)> {
    for (claim, values) in require {
        let have = claims.get(claim).map(granted).unwrap_or_default();
        if let Some(v) = values.iter().find(|v| !have.contains(v)) {
            return Some((claim, v));
        }
    }
    None
}

/// A claim as a header value: strings as they are, numbers and booleans as their text, arrays
/// and objects as compact JSON. `None` for a missing claim or one that cannot be a header
/// value (control characters).
pub fn claim_text(claims: &Claims, name: &str) -> Option<String> {
    let v = claims.get(name)?;
    let text = match v {
        Value::Null => return None,
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    text.bytes()
        .all(|b| b == b'\t' || (0x20..0x7f).contains(&b) || b >= 0x80)
        .then_some(text)
}

#[cfg(test)]
mod tests;

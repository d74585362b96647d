use serde_json::json;

use super::*;

fn claims(v: serde_json::Value) -> Claims {
    v.as_object().cloned().unwrap_or_default()
}

fn rules(skew: u64) -> Rules {
    Rules {
        issuer: "https://issuer.test/".into(),
        audiences: vec!["api".into()],
        algorithms: vec![Algorithm::RS256],
        clock_skew: Duration::from_secs(skew),
    }
}

#[test]
fn algorithm_names_are_the_signing_ones_only() {
    assert_eq!(algorithm("RS256"), Some(Algorithm::RS256));
    assert_eq!(algorithm("EdDSA"), Some(Algorithm::EdDSA));
    for bad in ["none", "NONE", "rs256", "", "RSA-OAEP", "HS1"] {
        assert_eq!(algorithm(bad), None, "{bad}");
    }
    assert!(is_hmac(Algorithm::HS384));
    assert!(!is_hmac(Algorithm::ES256));
}

#[test]
fn required_values_must_all_be_granted() {
    let c = claims(json!({
        "scope": "users:read users:write",
        "roles": ["ops", "admin"],
        "tier": 3,
        "beta": true,
    }));
    let req = |claim: &str, values: &[&str]| {
        vec![(
            claim.to_string(),
            values.iter().map(|v| v.to_string()).collect(),
        )]
    };
    assert_eq!(
        missing_requirement(&c, &req("scope", &["users:read"])),
        None
    );
    assert_eq!(
        missing_requirement(&c, &req("scope", &["users:read", "users:write"])),
        None
    );
    assert_eq!(
        missing_requirement(&c, &req("scope", &["users:admin"])),
        Some(("scope", "users:admin"))
    );
    // A prefix of a granted value is not the value.
    assert_eq!(
        missing_requirement(&c, &req("scope", &["users"])),
        Some(("scope", "users"))
    );
    assert_eq!(missing_requirement(&c, &req("roles", &["admin"])), None);
    assert_eq!(missing_requirement(&c, &req("tier", &["3"])), None);
    assert_eq!(missing_requirement(&c, &req("beta", &["true"])), None);
    assert_eq!(
        missing_requirement(&c, &req("absent", &["x"])),
        Some(("absent", "x"))
    );
    assert_eq!(missing_requirement(&c, &[]), None);
}

#[test]
fn claims_become_header_text_or_nothing() {
    let c = claims(json!({
        "sub": "user-7",
        "n": 12345678901234567890u64,
        "ok": false,
        "list": ["a", "b"],
        "nul": null,
        "ctl": "a\nb",
    }));
    assert_eq!(claim_text(&c, "sub").as_deref(), Some("user-7"));
    assert_eq!(claim_text(&c, "n").as_deref(), Some("12345678901234567890"));
    assert_eq!(claim_text(&c, "ok").as_deref(), Some("false"));
    assert_eq!(claim_text(&c, "list").as_deref(), Some(r#"["a","b"]"#));
    assert_eq!(claim_text(&c, "nul"), None);
    assert_eq!(
        claim_text(&c, "ctl"),
        None,
        "a newline cannot be a header value"
    );
    assert_eq!(claim_text(&c, "missing"), None);
}

#[test]
fn a_cached_token_is_rechecked_against_the_clock() {
    let now = 1_800_000_000;
    let ok = claims(json!({"exp": now + 10}));
    assert_eq!(still_valid(&ok, &rules(0), now), Ok(()));
    let expired = claims(json!({"exp": now - 30}));
    assert_eq!(still_valid(&expired, &rules(0), now), Err(Reason::Expired));
    assert_eq!(
        still_valid(&expired, &rules(60), now),
        Ok(()),
        "within the skew"
    );
    let early = claims(json!({"exp": now + 100, "nbf": now + 90}));
    assert_eq!(
        still_valid(&early, &rules(60), now),
        Err(Reason::NotYetValid)
    );
    assert_eq!(
        still_valid(&claims(json!({})), &rules(60), now),
        Err(Reason::Claims)
    );
}

#[test]
fn a_jwks_without_usable_keys_is_refused_and_garbage_is_an_error() {
    assert!(KeySet::from_jwks(b"not json").is_err());
    assert!(KeySet::from_jwks(br#"{"keys": []}"#).is_err());
    // A symmetric key is never taken from a JWKS.
    let oct = br#"{"keys": [{"kty": "oct", "k": "c2VjcmV0", "kid": "s"}]}"#;
    assert!(KeySet::from_jwks(oct).is_err());
    let ed = br#"{"keys": [
        {"kty": "OKP", "crv": "Ed25519", "kid": "a", "x": "m-4NuCO6Kz2IWET2As2eYBwkqescIjZSVfs0aZIpZQw"},
        {"kty": "OKP", "crv": "X25519", "kid": "b", "x": "m-4NuCO6Kz2IWET2As2eYBwkqescIjZSVfs0aZIpZQw"}
    ]}"#;
    let set = KeySet::from_jwks(ed).unwrap();
    assert_eq!((set.len(), set.skipped), (1, 1));
    assert!(set.has("a") && !set.has("b"));
    assert_eq!(format!("{set:?}"), "KeySet { kids: 1, anonymous: 0 }");
}

#[test]
fn a_header_pointing_elsewhere_for_keys_is_refused_before_any_key() {
    use base64::Engine as _;
    let b64 = |v: serde_json::Value| {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
    };
    let token = |h: serde_json::Value| format!("{}.{}.sig", b64(h), b64(json!({"sub": "x"})));
    let r = rules(60);
    assert_eq!(
        head(&token(json!({"alg": "RS256", "kid": "k"})), &r),
        Ok(Head {
            alg: Algorithm::RS256,
            kid: Some("k".into())
        })
    );
    assert_eq!(
        head(&token(json!({"alg": "none"})), &r),
        Err(Reason::Algorithm)
    );
    assert_eq!(
        head(&token(json!({"alg": "ES256"})), &r),
        Err(Reason::Algorithm)
    );
    assert_eq!(
        head(
            &token(json!({"alg": "RS256", "jku": "https://evil.test/jwks"})),
            &r
        ),
        Err(Reason::ForbiddenHeader)
    );
    assert_eq!(head("garbage", &r), Err(Reason::BadToken));
    assert_eq!(head("", &r), Err(Reason::BadToken));
}

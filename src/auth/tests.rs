use super::*;

type Pairs<'a> = &'a [(&'a str, &'a str)];

fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
    let mut h = HeaderMap::new();
    for (k, v) in pairs {
        h.append(
            http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
            HeaderValue::from_str(v).unwrap(),
        );
    }
    h
}

#[test]
fn max_age_is_read_and_no_cache_means_none() {
    let cases: &[(Pairs, Option<u64>)] = &[
        (&[("cache-control", "public, max-age=300")], Some(300)),
        (&[("cache-control", "MAX-AGE=60")], Some(60)),
        (&[("cache-control", "max-age=\"120\"")], Some(120)),
        (&[("cache-control", "max-age=300, no-cache")], None),
        (&[("cache-control", "no-store")], None),
        (&[("cache-control", "max-age=abc")], None),
        (&[], None),
    ];
    for (pairs, want) in cases {
        assert_eq!(
            max_age(&headers(pairs)),
            want.map(Duration::from_secs),
            "{pairs:?}"
        );
    }
}

#[test]
fn bearer_credentials_are_parsed_strictly() {
    let provider = |token_from: Vec<TokenSource>| Provider {
        name: "p".into(),
        rules: jwt::Rules {
            issuer: "i".into(),
            audiences: vec!["a".into()],
            algorithms: vec![jsonwebtoken::Algorithm::HS256],
            clock_skew: Duration::from_secs(60),
        },
        keys: KeySource::Loaded {
            origin: "secret_env S".into(),
            keys: Arc::new(KeySet::from_secret(&[7; 32])),
        },
        token_from,
        claims_to_headers: vec![],
        forward_token: true,
        realm: "p".into(),
    };
    let bearer = provider(vec![TokenSource::Bearer]);
    let cases: &[(Pairs, Result<Option<&str>, Reason>)] = &[
        (
            &[("authorization", "Bearer abc.def.ghi")],
            Ok(Some("abc.def.ghi")),
        ),
        (
            &[("authorization", "bearer   abc.def.ghi")],
            Ok(Some("abc.def.ghi")),
        ),
        (&[("authorization", "Basic dXNlcjpwYXNz")], Ok(None)),
        (&[("authorization", "Bearer")], Err(Reason::Malformed)),
        (&[("authorization", "Bearer a b")], Err(Reason::Malformed)),
        (&[("authorization", "Bearer a\"b")], Err(Reason::Malformed)),
        (
            &[("authorization", "Bearer a"), ("authorization", "Bearer b")],
            Err(Reason::Malformed),
        ),
        (&[], Ok(None)),
    ];
    for (pairs, want) in cases {
        assert_eq!(credentials(&bearer, &headers(pairs)), *want, "{pairs:?}");
    }
    // In order: the header first, then the cookie.
    let both = provider(vec![
        TokenSource::Bearer,
        TokenSource::Cookie("session".into()),
    ]);
    let h = headers(&[("cookie", "a=1; session=tok.en.x")]);
    assert_eq!(credentials(&both, &h), Ok(Some("tok.en.x")));
    let h = headers(&[
        ("cookie", "session=c.c.c"),
        ("authorization", "Bearer h.h.h"),
    ]);
    assert_eq!(credentials(&both, &h), Ok(Some("h.h.h")));
}

#[test]
fn a_preflight_needs_origin_and_the_request_method_header() {
    let pre = headers(&[
        ("origin", "https://a.test"),
        ("access-control-request-method", "POST"),
    ]);
    assert!(is_preflight(&Method::OPTIONS, &pre));
    assert!(!is_preflight(&Method::GET, &pre));
    assert!(!is_preflight(
        &Method::OPTIONS,
        &headers(&[("origin", "https://a.test")])
    ));
}

#[test]
fn the_background_refresh_comes_ahead_of_max_age_within_its_bounds() {
    let s = Duration::from_secs;
    // (jwks_refresh, max-age, next refresh)
    let cases = [
        // No max-age (none sent, or no-cache / no-store): jwks_refresh.
        (s(600), None, s(600)),
        (s(30), None, s(30)),
        // Three quarters of max-age when that comes first.
        (s(600), Some(s(400)), s(300)),
        (s(60), Some(s(40)), s(30)),
        (s(600), Some(s(41)), Duration::from_millis(30_750)),
        // Never later than jwks_refresh.
        (s(600), Some(s(86_400)), s(600)),
        (s(60), Some(s(80)), s(60)),
        // A max-age of centuries neither overflows nor ends the refresh task.
        (s(600), Some(s(u64::MAX - 1)), s(600)),
        (s(600), Some(Duration::MAX), s(600)),
        // Never sooner than 30 s after the fetch, however short max-age is.
        (s(600), Some(s(39)), s(30)),
        (s(600), Some(s(1)), s(30)),
        (s(600), Some(s(0)), s(30)),
        // jwks_refresh at its least (30 s) leaves max-age nothing to bring forward.
        (s(30), Some(s(10)), s(30)),
    ];
    for (refresh, max_age, want) in cases {
        assert_eq!(
            next_refresh(refresh, max_age),
            want,
            "jwks_refresh {refresh:?}, max-age {max_age:?}"
        );
    }
}

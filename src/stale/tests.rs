use super::*;

use http::HeaderName;
use serde_json::json;

fn settings(vary: &[&str]) -> Stale {
    Stale {
        max_stale: Duration::from_secs(60),
        max_entry: 1 << 20,
        on_connect: true,
        on_timeout: true,
        on_status: vec![500, 502, 503, 504],
        vary: vary
            .iter()
            .map(|v| HeaderName::from_bytes(v.as_bytes()).unwrap())
            .collect(),
        per_user: None,
    }
}

fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
    let mut h = HeaderMap::new();
    for (k, v) in pairs {
        h.append(
            HeaderName::from_bytes(k.as_bytes()).unwrap(),
            HeaderValue::from_str(v).unwrap(),
        );
    }
    h
}

type Pairs<'a> = &'a [(&'a str, &'a str)];

#[test]
fn storable_refuses_each_case_under_its_own_reason() {
    let s = settings(&["accept-encoding"]);
    let cases: &[(u16, Pairs, Option<Outcome>)] = &[
        (200, &[], None),
        (200, &[("cache-control", "public, max-age=60")], None),
        (200, &[("cache-control", "max-age=0")], None),
        (200, &[("cache-control", "immutable")], None),
        (201, &[], Some(Outcome::Not200)),
        (203, &[], Some(Outcome::Not200)),
        (204, &[], Some(Outcome::Not200)),
        (206, &[], Some(Outcome::Not200)),
        (304, &[], Some(Outcome::Not200)),
        (404, &[], Some(Outcome::Not200)),
        (503, &[], Some(Outcome::Not200)),
        // The status is checked first.
        (201, &[("set-cookie", "a=1")], Some(Outcome::Not200)),
        (200, &[("set-cookie", "a=1")], Some(Outcome::SetCookie)),
        (
            200,
            &[("cache-control", "no-store")],
            Some(Outcome::NoStore),
        ),
        (
            200,
            &[("cache-control", "No-Store")],
            Some(Outcome::NoStore),
        ),
        (
            200,
            &[("cache-control", "max-age=60 ,  no-store")],
            Some(Outcome::NoStore),
        ),
        (200, &[("cache-control", "private")], Some(Outcome::Private)),
        (
            200,
            &[("cache-control", "private=\"x-user\"")],
            Some(Outcome::Private),
        ),
        (
            200,
            &[("cache-control", "no-cache")],
            Some(Outcome::NoCache),
        ),
        (
            200,
            &[("cache-control", "no-cache=\"set-cookie\"")],
            Some(Outcome::NoCache),
        ),
        (
            200,
            &[("cache-control", "must-revalidate")],
            Some(Outcome::MustRevalidate),
        ),
        (
            200,
            &[("cache-control", "proxy-revalidate")],
            Some(Outcome::MustRevalidate),
        ),
        (
            200,
            &[("cache-control", "public, s-maxage=60")],
            Some(Outcome::MustRevalidate),
        ),
        // Every Cache-Control line counts.
        (
            200,
            &[
                ("cache-control", "max-age=60"),
                ("cache-control", "no-store"),
            ],
            Some(Outcome::NoStore),
        ),
        // The first refusing directive names the reason.
        (
            200,
            &[("cache-control", "private, no-store")],
            Some(Outcome::Private),
        ),
        (200, &[("vary", "Accept-Encoding")], None),
        (200, &[("vary", "accept-encoding, ACCEPT-ENCODING")], None),
        (200, &[("vary", "")], None),
        (200, &[("vary", "*")], Some(Outcome::Vary)),
        (200, &[("vary", "accept-encoding, *")], Some(Outcome::Vary)),
        (200, &[("vary", "cookie")], Some(Outcome::Vary)),
        (
            200,
            &[("vary", "Accept-Encoding, Accept-Language")],
            Some(Outcome::Vary),
        ),
        (
            200,
            &[("vary", "accept-encoding"), ("vary", "origin")],
            Some(Outcome::Vary),
        ),
    ];
    for (status, pairs, want) in cases {
        let (_, got) = storable(&s, StatusCode::from_u16(*status).unwrap(), &headers(pairs));
        assert_eq!(got, *want, "{status} {pairs:?}");
    }
    // Without `vary`, any Vary but an empty one refuses.
    let none = settings(&[]);
    let (_, got) = storable(
        &none,
        StatusCode::OK,
        &headers(&[("vary", "accept-encoding")]),
    );
    assert_eq!(got, Some(Outcome::Vary));
    // A Vary that is not text.
    let mut h = HeaderMap::new();
    h.insert(
        header::VARY,
        HeaderValue::from_bytes(b"accept-\xffencoding").unwrap(),
    );
    assert_eq!(storable(&s, StatusCode::OK, &h).1, Some(Outcome::Vary));
}

#[test]
fn the_origins_stale_if_error_overrides_max_stale() {
    let s = settings(&[]);
    let cases: &[(&str, u64)] = &[
        ("max-age=60", 60),
        ("stale-if-error=5", 5),
        ("max-age=0, Stale-If-Error=86400", 86400),
        ("stale-if-error=\"7\"", 7),
        ("stale-if-error = 9", 9),
        ("stale-if-error=0", 0),
        ("stale-if-error=soon", 60),
        ("stale-if-error", 60),
        ("stale-while-revalidate=30", 60),
    ];
    for (cc, secs) in cases {
        let (max_stale, refusal) = storable(&s, StatusCode::OK, &headers(&[("cache-control", cc)]));
        assert_eq!(refusal, None, "{cc}");
        assert_eq!(max_stale, Duration::from_secs(*secs), "{cc}");
    }
    // It never makes a refused answer storable.
    let (_, refusal) = storable(
        &s,
        StatusCode::OK,
        &headers(&[("cache-control", "stale-if-error=60, no-store")]),
    );
    assert_eq!(refusal, Some(Outcome::NoStore));
}

fn req(uri: &str, pairs: &[(&str, &str)]) -> Request<()> {
    let mut b = Request::get(uri);
    for (k, v) in pairs {
        b = b.header(*k, *v);
    }
    b.body(()).unwrap()
}

#[test]
fn variant_keys_are_the_query_and_the_vary_values() {
    let s = settings(&["accept-encoding", "accept-language"]);
    let v = |uri: &str, pairs: &[(&str, &str)]| variant(&s, &req(uri, pairs));
    assert_eq!(
        v(
            "/a?x=1",
            &[("accept-encoding", "gzip"), ("accept-language", "de")]
        ),
        b"x=1\0gzip,\0de,".to_vec()
    );
    // The order of the headers does not matter; the order of values does.
    assert_eq!(
        v(
            "/a",
            &[("accept-language", "de"), ("accept-encoding", "gzip")]
        ),
        v(
            "/a",
            &[("accept-encoding", "gzip"), ("accept-language", "de")]
        ),
    );
    assert_ne!(
        v("/a", &[("accept-encoding", "gzip, br")]),
        v("/a", &[("accept-encoding", "br, gzip")]),
    );
    // Values apart, all different.
    let distinct = [
        v("/a", &[]),
        v("/a?", &[("accept-encoding", "")]),
        v("/a", &[("accept-encoding", "gzip")]),
        v("/a", &[("accept-encoding", "identity")]),
        v("/a", &[("accept-language", "gzip")]),
        v(
            "/a",
            &[("accept-encoding", "gzip"), ("accept-language", "de")],
        ),
        v("/a?gzip", &[]),
        v("/a?x=1", &[]),
        v("/a?x=2", &[]),
        v("/a?x=1&y=2", &[]),
    ];
    for (i, a) in distinct.iter().enumerate() {
        for b in &distinct[i + 1..] {
            assert_ne!(a, b);
        }
    }
    // Two lines of a header are its comma-joined value (RFC 9110 §5.3).
    assert_eq!(
        v(
            "/a",
            &[("accept-encoding", "gzip"), ("accept-encoding", "br")]
        ),
        v("/a", &[("accept-encoding", "gzip,br")]),
    );
    // Headers the route does not list are not part of it; the path is not either.
    assert_eq!(
        v("/a?x=1", &[("accept-encoding", "gzip"), ("cookie", "a=1")]),
        v("/b?x=1", &[("accept-encoding", "gzip"), ("x-other", "1")]),
    );
    let plain = settings(&[]);
    assert_eq!(
        variant(&plain, &req("/a?x=1", &[("accept-encoding", "gzip")])),
        b"x=1".to_vec()
    );
}

fn entry(route: &Arc<RouteStale>, variant: &[u8], body: usize) -> Entry {
    Entry {
        variant: variant.to_vec(),
        headers: HeaderMap::new(),
        body: Bytes::from(vec![b'x'; body]),
        stored: Instant::now(),
        max_stale: Duration::from_secs(60),
        weight: body as u64,
        route: route.clone(),
    }
}

fn count(route: &RouteStale, outcome: &str) -> u64 {
    route
        .counts()
        .iter()
        .find(|(o, _)| *o == outcome)
        .map_or(0, |(_, n)| *n)
}

#[test]
fn a_copy_under_max_entry_fits_whatever_the_cores() {
    // quick_cache's default of 4 shards per core would make a 1 MiB store's shards
    // 128 KiB (2 cores) or 16 KiB (16 cores): a 200 KiB copy would go as it is stored.
    for (capacity, fits) in [
        (1u64 << 20, 900 << 10),
        (64 << 20, 7 << 20),
        (64 << 10, 60 << 10),
    ] {
        let store = StaleStore::new(capacity, &Metrics::new());
        assert!(
            store.max_weight >= fits && store.max_weight <= capacity,
            "{capacity}: {}",
            store.max_weight
        );
    }
    let metrics = Metrics::new();
    let store = StaleStore::new(1 << 20, &metrics);
    let route = Arc::new(RouteStale::new("/api", &metrics));
    store.insert(b"/api\0h\0/a\0".to_vec(), entry(&route, b"", 500 << 10));
    assert!(store.find(b"/api\0h\0/a\0", b"").is_some());
    assert_eq!(count(&route, "stored"), 1);
    assert_eq!(count(&route, "evicted"), 0);
    // Heavier than a shard keeps: refused as too large, not stored then evicted.
    store.insert(b"/api\0h\0/b\0".to_vec(), entry(&route, b"", 2 << 20));
    assert!(store.find(b"/api\0h\0/b\0", b"").is_none());
    assert_eq!(count(&route, "too_large"), 1);
    assert_eq!(count(&route, "stored"), 1);
    assert!(store.find(b"/api\0h\0/a\0", b"").is_some());
}

#[test]
fn a_paths_copies_are_bounded_in_number_and_bytes() {
    let metrics = Metrics::new();
    let store = StaleStore::new(1 << 20, &metrics);
    let route = Arc::new(RouteStale::new("/api", &metrics));
    let key = b"/api\0h\0/list\0".to_vec();
    for i in 0..MAX_VARIANTS + 3 {
        store.insert(
            key.clone(),
            entry(&route, format!("page={i}").as_bytes(), 100),
        );
    }
    assert!(store.find(&key, b"page=0").is_none());
    assert!(store.find(&key, b"page=2").is_none());
    assert!(store.find(&key, b"page=3").is_some());
    assert!(store
        .find(&key, format!("page={}", MAX_VARIANTS + 2).as_bytes())
        .is_some());
    assert_eq!(count(&route, "evicted"), 3);
    // The same variant again replaces its copy.
    store.insert(key.clone(), entry(&route, b"page=3", 200));
    assert_eq!(store.find(&key, b"page=3").unwrap().body.len(), 200);
    assert_eq!(count(&route, "evicted"), 3);
    // Variants that together outweigh a shard: the oldest go, the path stays.
    let big = b"/api\0h\0/big\0".to_vec();
    for i in 0..4 {
        store.insert(big.clone(), entry(&route, &[b'0' + i], 300 << 10));
    }
    assert!(store.find(&big, b"0").is_none());
    assert!(store.find(&big, b"3").is_some());
    assert!(store.bytes() <= 1 << 20);
    // A write drops every variant of the path.
    let before = count(&route, "invalidated");
    store.remove(&key);
    assert!(store.find(&key, b"page=3").is_none());
    assert_eq!(count(&route, "invalidated") - before, MAX_VARIANTS as u64);
}

#[test]
fn the_route_is_the_keys_first_part() {
    assert_eq!(route_of(b"/api\0host\0/api/x\0sub"), b"/api");
    assert_eq!(route_of(b"/api"), b"/api");
    assert_eq!(route_of(b""), b"");
}

/// The first route of a routes.toml whose route has `stale` (and `auth` when `auth`).
fn route(stale: &str, auth: bool) -> Route {
    let auth_text = if auth {
        "[auth.a]\nissuer = \"https://i/\"\naudiences = [\"x\"]\nalgorithms = [\"RS256\"]\njwks_url = \"https://i/jwks.json\"\n"
    } else {
        ""
    };
    let route_auth = if auth { "auth = \"a\"\n" } else { "" };
    let text = format!(
        "[backends.legacy]\nurl = \"http://127.0.0.1:9\"\nlegacy = true\n{auth_text}\
         [[routes]]\nprefix = \"/api\"\nbackend = \"legacy\"\n{route_auth}stale_if_error = {stale}\n"
    );
    let parsed = crate::config::parse(&text).unwrap();
    parsed.table.routes()[0].clone()
}

fn claims(sub: Option<&str>) -> Claims {
    let mut c = Claims::new();
    if let Some(s) = sub {
        c.insert("sub".into(), json!(s));
    }
    c
}

#[test]
fn plans_key_copies_by_subject_and_writes_drop_the_anonymous_copy() {
    let metrics = Metrics::new();
    let counters = Arc::new(RouteStale::new("/api", &metrics));
    let per_user = route("{ max_stale = \"1h\", per_user = \"claim:sub\" }", true);
    let plain = route("{ max_stale = \"1h\" }", true);
    let (alice, bob, nobody) = (claims(Some("alice")), claims(Some("bob")), claims(None));
    let bearer = [("authorization", "Bearer t")];
    let plan = |r: &Route, method: Method, pairs: &[(&str, &str)], c: Option<&Claims>| {
        let mut b = Request::builder().method(method).uri("/api/me?x=1");
        for (k, v) in pairs {
            b = b.header(*k, *v);
        }
        Plan::new(r, &counters, &b.body(()).unwrap(), Some("h"), c)
    };
    let key = |p: Option<Plan>| p.unwrap().slot.map(|s| s.key);

    let anonymous = key(plan(&per_user, Method::GET, &[], None)).unwrap();
    assert_eq!(anonymous, b"/api\0h\0/api/me\0".to_vec());
    let a = key(plan(&per_user, Method::GET, &bearer, Some(&alice))).unwrap();
    let b = key(plan(&per_user, Method::GET, &bearer, Some(&bob))).unwrap();
    assert_eq!(a, b"/api\0h\0/api/me\0alice".to_vec());
    assert_ne!(a, b);
    // Verified from a cookie (no Authorization): still alice's.
    assert_eq!(
        key(plan(&per_user, Method::GET, &[], Some(&alice))).unwrap(),
        a
    );
    // Credentials without the claim: no copy.
    assert_eq!(
        key(plan(&per_user, Method::GET, &bearer, Some(&nobody))),
        None
    );
    assert_eq!(key(plan(&per_user, Method::GET, &bearer, None)), None);
    // Without per_user, credentials from any source: no copy, counted.
    assert_eq!(key(plan(&plain, Method::GET, &bearer, None)), None);
    assert_eq!(key(plan(&plain, Method::GET, &[], Some(&alice))), None);
    assert_eq!(count(&counters, "authorization"), 4);
    // HEAD and OPTIONS: no plan.
    assert!(plan(&plain, Method::HEAD, &[], None).is_none());
    assert!(plan(&plain, Method::OPTIONS, &[], None).is_none());

    // Writes: the writer's copy and the anonymous one, with or without per_user.
    let w = plan(&per_user, Method::POST, &bearer, Some(&alice)).unwrap();
    let slot = w.slot.as_ref().unwrap();
    assert_eq!((&slot.key, slot.anonymous.as_ref()), (&a, Some(&anonymous)));
    assert!(!w.triggered(StatusCode::SERVICE_UNAVAILABLE, false, false));
    for (c, pairs) in [
        (None, &bearer[..]),
        (Some(&alice), &[][..]),
        (None, &[][..]),
    ] {
        let w = plan(&plain, Method::DELETE, pairs, c).unwrap();
        assert_eq!(w.slot.as_ref().unwrap().key, anonymous, "{pairs:?} {c:?}");
        assert!(!w.triggered(StatusCode::SERVICE_UNAVAILABLE, true, false));
    }
    assert_eq!(
        count(&counters, "authorization"),
        4,
        "writes are not counted"
    );

    // A session cookie is a credential: a legacy page may be personal without `private`.
    let cookie = [("cookie", "session=abc")];
    assert_eq!(key(plan(&plain, Method::GET, &cookie, None)), None);
    // A token that did not verify (forwarded in observe mode): no anonymous copy either.
    let p = plan(&plain, Method::GET, &[], None)
        .unwrap()
        .presented_credentials();
    assert!(p.slot.is_none());
    // ...while a subject's own copy stays keyed by its subject.
    let p = plan(&per_user, Method::GET, &bearer, Some(&alice))
        .unwrap()
        .presented_credentials();
    assert_eq!(p.slot.map(|s| s.key), Some(a));
    assert_eq!(count(&counters, "authorization"), 6);
}

#[test]
fn triggered_follows_on() {
    let metrics = Metrics::new();
    let counters = Arc::new(RouteStale::new("/api", &metrics));
    let get = Request::get("/api/x").body(()).unwrap();
    let plan = |stale: &str| Plan::new(&route(stale, false), &counters, &get, None, None).unwrap();
    let (s500, s502, s503, s504) = (
        StatusCode::INTERNAL_SERVER_ERROR,
        StatusCode::BAD_GATEWAY,
        StatusCode::SERVICE_UNAVAILABLE,
        StatusCode::GATEWAY_TIMEOUT,
    );
    let default = plan("{ max_stale = \"1h\" }");
    for s in [s500, s502, s503, s504] {
        assert!(default.triggered(s, false, false), "{s}");
    }
    assert!(default.triggered(s502, true, false));
    assert!(default.triggered(s504, false, true));
    assert!(!default.triggered(StatusCode::NOT_IMPLEMENTED, false, false));
    let only_503 = plan("{ max_stale = \"1h\", on = [\"503\"] }");
    assert!(only_503.triggered(s503, false, false));
    assert!(!only_503.triggered(s500, false, false));
    assert!(!only_503.triggered(s502, true, false), "connect");
    assert!(!only_503.triggered(s504, false, true), "timeout");
    let connect = plan("{ max_stale = \"1h\", on = [\"connect\"] }");
    assert!(connect.triggered(s502, true, false));
    assert!(
        !connect.triggered(s502, false, false),
        "a backend's own 502"
    );
    assert!(!connect.triggered(s504, false, true));
}

#[test]
fn a_coded_copy_goes_only_to_a_client_that_accepts_its_coding() {
    let ae = |values: &[&str]| -> Vec<HeaderValue> {
        values
            .iter()
            .map(|v| HeaderValue::from_str(v).unwrap())
            .collect()
    };
    let gzip = headers(&[("content-encoding", "gzip")]);
    let cases: &[(&[&str], bool)] = &[
        (&[], false),
        (&["identity"], false),
        (&["gzip"], true),
        (&["GZIP"], true),
        (&["x-gzip"], true),
        (&["br, gzip;q=0.5"], true),
        (&["br", "gzip"], true),
        (&["gzip;q=0"], false),
        (&["gzip; q=0.0"], false),
        (&["br"], false),
        (&["*"], true),
        (&["*;q=0"], false),
        (&["*, gzip;q=0"], false),
        (&["gzip;q=0, *"], false),
        (&["deflate, *;q=0.1"], true),
    ];
    for (accept, want) in cases {
        assert_eq!(decodable(&gzip, &ae(accept)), *want, "{accept:?}");
    }
    // Unencoded copies go to everyone.
    for plain in [headers(&[]), headers(&[("content-encoding", "identity")])] {
        assert!(decodable(&plain, &ae(&[])));
        assert!(decodable(&plain, &ae(&["gzip;q=0, identity"])));
    }
    // Every coding applied must be accepted.
    let both = headers(&[("content-encoding", "gzip, br")]);
    assert!(!decodable(&both, &ae(&["gzip"])));
    assert!(decodable(&both, &ae(&["gzip, br"])));
    let two_lines = headers(&[("content-encoding", "gzip"), ("content-encoding", "br")]);
    assert!(!decodable(&two_lines, &ae(&["br"])));
    assert!(decodable(&two_lines, &ae(&["br", "gzip"])));
}

use super::*;

/// Header pairs as written in a table row.
type Pairs<'a> = &'a [(&'a str, &'a str)];

fn map(pairs: &[(&str, &str)]) -> HeaderMap {
    let mut h = HeaderMap::new();
    for (k, v) in pairs {
        h.append(
            HeaderName::from_bytes(k.as_bytes()).unwrap(),
            HeaderValue::from_str(v).unwrap(),
        );
    }
    h
}

fn names(h: &HeaderMap) -> Vec<String> {
    let mut n: Vec<String> = h.keys().map(|k| k.to_string()).collect();
    n.sort();
    n
}

#[test]
fn hop_by_hop_and_connection_named_headers_are_removed() {
    let cases: &[(Pairs, bool, &[&str])] = &[
        (
            &[
                ("connection", "keep-alive"),
                ("keep-alive", "timeout=5"),
                ("accept", "*/*"),
            ],
            false,
            &["accept"],
        ),
        (
            &[
                ("connection", "x-secret, close"),
                ("x-secret", "1"),
                ("te", "trailers"),
                ("accept", "*/*"),
            ],
            false,
            &["accept"],
        ),
        (
            &[
                ("transfer-encoding", "chunked"),
                ("trailer", "x"),
                ("proxy-authorization", "Basic x"),
                ("proxy-connection", "k"),
                ("http2-settings", "AAMAAABkAARAAAAAAAIAAAAA"),
            ],
            false,
            // `Trailer` is end-to-end: it declares the trailer fields that follow.
            &["trailer"],
        ),
        // A client cannot make the proxy drop the headers it sets for the backend.
        (
            &[
                ("connection", "x-forwarded-for, x-request-id, via, host"),
                ("x-forwarded-for", "1.2.3.4"),
                ("x-request-id", "a"),
                ("via", "1.1 a"),
                ("host", "h"),
            ],
            false,
            &["host", "via", "x-forwarded-for", "x-request-id"],
        ),
        (
            &[
                ("connection", "Upgrade"),
                ("upgrade", "websocket"),
                ("sec-websocket-key", "k"),
            ],
            true,
            &["connection", "sec-websocket-key", "upgrade"],
        ),
        (
            &[("connection", "Upgrade"), ("upgrade", "websocket")],
            false,
            &[],
        ),
        (
            &[
                ("connection", "bad header name!, ok"),
                ("ok", "1"),
                ("accept", "a"),
            ],
            false,
            &["accept"],
        ),
    ];
    for (input, upgrade, want) in cases {
        let mut h = map(input);
        strip_hop_by_hop(&mut h, *upgrade);
        assert_eq!(names(&h), *want, "{input:?}");
    }
}

#[test]
fn upgrade_detection() {
    assert!(is_upgrade(&map(&[
        ("connection", "keep-alive, Upgrade"),
        ("upgrade", "websocket")
    ])));
    assert!(!is_upgrade(&map(&[
        ("connection", "keep-alive"),
        ("upgrade", "websocket")
    ])));
    assert!(!is_upgrade(&map(&[("connection", "upgrade")])));
}

#[test]
fn forwarded_headers_append_and_set() {
    let ip: IpAddr = "10.0.0.7".parse().unwrap();
    let mut h = map(&[
        ("x-forwarded-for", "1.1.1.1"),
        ("x-forwarded-for", "2.2.2.2"),
        ("x-forwarded-proto", "https"),
        ("x-forwarded-host", "forged"),
    ]);
    let present = Present::of(&h);
    set_forwarded(
        &mut h,
        present,
        ip,
        "http",
        Some(&HeaderValue::from_static("api.fittrack.example")),
    );
    assert_eq!(h.get_all("x-forwarded-for").iter().count(), 1);
    assert_eq!(h["x-forwarded-for"], "1.1.1.1, 2.2.2.2, 10.0.0.7");
    assert_eq!(h["x-forwarded-proto"], "http");
    assert_eq!(h["x-forwarded-host"], "api.fittrack.example");
    let mut h = map(&[("x-forwarded-host", "forged")]);
    let present = Present::of(&h);
    set_forwarded(&mut h, present, ip, "http", None);
    assert_eq!(h["x-forwarded-for"], "10.0.0.7");
    assert!(h.get("x-forwarded-host").is_none());
}

#[test]
fn the_summary_names_every_header_the_phases_look_up() {
    let flags = [
        ("Host", Present::HOST),
        ("via", Present::VIA),
        ("X-Request-Id", Present::X_REQUEST_ID),
        ("traceparent", Present::TRACEPARENT),
        ("tracestate", Present::TRACESTATE),
        ("content-length", Present::CONTENT_LENGTH),
        ("x-strangler-shadow", Present::X_STRANGLER_SHADOW),
        ("x-forwarded-for", Present::X_FORWARDED_FOR),
        ("x-forwarded-host", Present::X_FORWARDED_HOST),
        ("connection", Present::CONNECTION),
        ("te", Present::TE),
        ("transfer-encoding", Present::TRANSFER_ENCODING),
        ("upgrade", Present::UPGRADE),
    ];
    for (name, flag) in flags {
        let p = Present::of(&map(&[(name, "v")]));
        assert!(p.has(flag), "{name}");
        assert_eq!(
            p.has(Present::HOP_BY_HOP),
            flag >= Present::CONNECTION,
            "{name}"
        );
        // No other flag is set by this one name.
        for (other, f) in flags {
            assert_eq!(p.has(f), f == flag, "{name} vs {other}");
        }
    }
    for name in [
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "http2-settings",
    ] {
        assert!(
            Present::of(&map(&[(name, "v")])).has(Present::HOP_BY_HOP),
            "{name}"
        );
    }
    let none = Present::of(&map(&[
        ("accept", "*/*"),
        ("user-agent", "x"),
        ("x-user-id", "7"),
    ]));
    assert_eq!(none, Present::default());
}

#[test]
fn stripping_with_a_summary_removes_what_a_full_strip_removes() {
    let cases: &[&[(&str, &str)]] = &[
        &[("accept", "*/*")],
        &[
            ("connection", "keep-alive, x-secret"),
            ("x-secret", "1"),
            ("keep-alive", "5"),
        ],
        &[
            ("te", "trailers"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "h2c"),
        ],
        &[
            ("proxy-authorization", "Basic x"),
            ("http2-settings", "AA"),
            ("via", "1.1 a"),
        ],
        &[
            ("connection", "upgrade"),
            ("upgrade", "websocket"),
            ("host", "x"),
        ],
    ];
    for case in cases {
        for upgrade in [false, true] {
            let mut full = map(case);
            strip_hop_by_hop(&mut full, upgrade);
            let mut fast = map(case);
            let present = Present::of(&fast);
            strip_present(&mut fast, present, upgrade);
            assert_eq!(full, fast, "{case:?} upgrade={upgrade}");
        }
    }
}

#[test]
fn a_plain_host_reads_as_the_parsed_authority_would() {
    for value in [
        "api.fittrack.example",
        "api.fittrack.example:8080",
        "localhost:1",
        "x",
        "127.0.0.1:65535",
        "a-b.c:99999",
    ] {
        let h = map(&[("host", value)]);
        let root = http::Uri::from_static("/");
        let fast = request_host(&h, &root).unwrap();
        let parsed: http::uri::Authority = value.parse().unwrap();
        assert_eq!(fast, Some(parsed.host()), "{value}");
    }
    // Not plain: the full parse decides, as before.
    for (value, ok) in [
        ("user@host", false),
        ("[::1]:8080", true),
        ("host:port", true),
        ("", false),
        ("a b", false),
        ("host:", true),
    ] {
        let h = map(&[("host", value)]);
        let root = http::Uri::from_static("/");
        let got = request_host(&h, &root);
        assert_eq!(got.is_ok(), ok, "{value:?}: {got:?}");
    }
}

#[test]
fn ip_text_is_the_display_form_of_every_address() {
    let cases = [
        "10.0.0.7",
        "255.255.255.255",
        "::1",
        "2001:db8::7",
        "::ffff:255.255.255.255",
        "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
        "1111:2222:3333:4444:5555:6666:7777:8888",
    ];
    for c in cases {
        let ip: IpAddr = c.parse().unwrap();
        let mut buf = [0u8; IP_TEXT_MAX];
        assert_eq!(ip_text(ip, &mut buf), ip.to_string().as_bytes(), "{c}");
    }
    // IPv4 is written digit by digit: every octet value in every position.
    for n in 0..=255u8 {
        for ip in [[n, 0, 9, 10], [99, n, 100, 1], [1, 2, n, 255], [0, 0, 0, n]] {
            let ip = IpAddr::from(ip);
            let mut buf = [0u8; IP_TEXT_MAX];
            assert_eq!(ip_text(ip, &mut buf), ip.to_string().as_bytes(), "{ip}");
        }
    }
}

#[test]
fn via_loop_detection() {
    let cases = [
        ("1.1 strangler", true),
        ("1.0 fred, 1.1 STRANGLER (rust)", true),
        ("HTTP/1.1 strangler", true),
        ("1.1 strangler-edge", false),
        ("1.1 nginx", false),
        ("strangler", false),
    ];
    for (via, want) in cases {
        assert_eq!(via_has(&map(&[("via", via)]), "strangler"), want, "{via}");
    }
}

#[test]
fn request_ids() {
    let ok = "abc-123_x.y";
    assert_eq!(
        valid_request_id(&map(&[("x-request-id", ok)])).map(|v| v.to_str().unwrap()),
        Some(ok)
    );
    let long = "a".repeat(129);
    for bad in ["", "has space", "semi;colon", "ünï", long.as_str()] {
        let mut h = HeaderMap::new();
        if let Ok(v) = HeaderValue::from_str(bad) {
            h.insert("x-request-id", v);
        }
        assert!(valid_request_id(&h).is_none(), "{bad:?}");
    }
    assert!(valid_request_id(&map(&[("x-request-id", "a"), ("x-request-id", "b")])).is_none());
    let ids = RequestIds::new();
    let (a, b) = (ids.next(), ids.next());
    assert_ne!(a, b);
    assert_eq!(a.len(), 32);
    assert!(valid_request_id(&map(&[("x-request-id", a.to_str().unwrap())])).is_some());
}

#[test]
fn hosts() {
    let uri: http::Uri = "/x".parse().unwrap();
    let abs: http::Uri = "http://abs.example:81/x".parse().unwrap();
    type Want<'a> = Result<Option<&'a str>, ()>;
    let cases: &[(Pairs, &http::Uri, Want)] = &[
        (
            &[("host", "api.fittrack.example:8080")],
            &uri,
            Ok(Some("api.fittrack.example")),
        ),
        (&[("host", "[::1]:8080")], &uri, Ok(Some("[::1]"))),
        (&[], &abs, Ok(Some("abs.example"))),
        (&[], &uri, Ok(None)),
        (&[("host", "a"), ("host", "b")], &uri, Err(())),
        (&[("host", "a b")], &uri, Err(())),
        (&[("host", "user@evil")], &uri, Err(())),
        // The target's authority wins over Host (RFC 9112 §3.2.2).
        (&[("host", "good.example")], &abs, Ok(Some("abs.example"))),
        (&[("host", "a"), ("host", "b")], &abs, Err(())),
        (&[("host", "a b")], &abs, Err(())),
        (&[], &"http://user@evil.example/x".parse().unwrap(), Err(())),
    ];
    for (h, u, want) in cases {
        assert_eq!(request_host(&map(h), u).map_err(|_| ()), *want, "{h:?}");
    }
}

#[test]
fn dot_segments() {
    let cases = [
        ("/api/users/7", false),
        ("/api/../admin", true),
        ("/api/./x", true),
        ("/api/%2e%2E/admin", true),
        ("/api/.%2e", true),
        ("/api/%2e", true),
        ("/api/..", true),
        ("/api/...", false),
        ("/api/.hidden", false),
        ("/api/v1.2", false),
    ];
    for (path, want) in cases {
        assert_eq!(has_dot_segments(path), want, "{path}");
    }
}

#[test]
fn traceparent_validation_and_generation() {
    let ok = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    assert!(valid_traceparent(&map(&[("traceparent", ok)])));
    let bad = [
        "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
        "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
        "garbage",
    ];
    for b in bad {
        assert!(!valid_traceparent(&map(&[("traceparent", b)])), "{b}");
    }
    assert!(
        !valid_traceparent(&map(&[("traceparent", ok), ("traceparent", ok)])),
        "two are ambiguous"
    );
    let fresh = new_traceparent();
    assert!(
        valid_traceparent(&map(&[("traceparent", fresh.to_str().unwrap())])),
        "{fresh:?}"
    );
    assert_ne!(new_traceparent(), fresh);
}

#[test]
fn te_trailers_is_recognized_and_garbage_is_not() {
    let cases: &[(Pairs, bool)] = &[
        (&[("te", "trailers")], true),
        (&[("te", "TRAILERS")], true),
        (&[("te", "gzip;q=0.5, trailers")], true),
        (&[("te", "trailers;q=1")], true),
        (&[("te", "gzip"), ("te", " trailers ")], true),
        (&[("te", "trailersx")], false),
        (&[("te", "gzip, deflate")], false),
        (&[("te", "")], false),
        (&[("te", ",,;;")], false),
        (&[("x-te", "trailers")], false),
        (&[], false),
    ];
    for (pairs, want) in cases {
        assert_eq!(accepts_trailers(&map(pairs)), *want, "{pairs:?}");
    }
    // Not text at all: not trailers, and no panic.
    let mut h = HeaderMap::new();
    h.insert(
        header::TE,
        HeaderValue::from_bytes(b"\xfftrailers").unwrap(),
    );
    assert!(!accepts_trailers(&h));
}

#[test]
fn the_client_address_walks_x_forwarded_for_only_from_trusted_peers() {
    let nets =
        |list: &[&str]| -> Vec<ipnet::IpNet> { list.iter().map(|n| n.parse().unwrap()).collect() };
    let ip = |s: &str| -> IpAddr { s.parse().unwrap() };
    let lb = ip("10.0.0.5");
    let trusted = nets(&["10.0.0.0/8", "192.168.1.0/24"]);
    let cases: &[(&str, Pairs, &str)] = &[
        // No trusted proxies: the peer, whatever the header says.
        ("none", &[("x-forwarded-for", "203.0.113.9")], "10.0.0.5"),
        // From a trusted peer: the rightmost untrusted address.
        (
            "one hop",
            &[("x-forwarded-for", "203.0.113.9")],
            "203.0.113.9",
        ),
        (
            "spoofed left",
            &[("x-forwarded-for", "1.2.3.4, 203.0.113.9")],
            "203.0.113.9",
        ),
        (
            "trusted hops skipped",
            &[("x-forwarded-for", "203.0.113.9, 192.168.1.7, 10.1.1.1")],
            "203.0.113.9",
        ),
        (
            "two headers",
            &[
                ("x-forwarded-for", "1.2.3.4"),
                ("x-forwarded-for", "203.0.113.9, 10.9.9.9"),
            ],
            "203.0.113.9",
        ),
        (
            "port and brackets",
            &[("x-forwarded-for", "[2001:db8::1]")],
            "2001:db8::1",
        ),
        (
            "with a port",
            &[("x-forwarded-for", "203.0.113.9:4711")],
            "203.0.113.9",
        ),
        // Garbage ends the walk at the last trusted hop.
        (
            "garbage",
            &[("x-forwarded-for", "203.0.113.9, nonsense, 10.2.2.2")],
            "10.2.2.2",
        ),
        (
            "empty entry",
            &[("x-forwarded-for", "203.0.113.9,,")],
            "10.0.0.5",
        ),
        (
            "only trusted",
            &[("x-forwarded-for", "10.3.3.3, 10.4.4.4")],
            "10.3.3.3",
        ),
        ("no header", &[], "10.0.0.5"),
    ];
    for (what, pairs, want) in cases {
        let list = if *what == "none" {
            vec![]
        } else {
            trusted.clone()
        };
        assert_eq!(client_address(&map(pairs), lb, &list), ip(want), "{what}");
    }
    // From an untrusted peer the header is ignored.
    let h = map(&[("x-forwarded-for", "203.0.113.9")]);
    assert_eq!(
        client_address(&h, ip("198.51.100.1"), &trusted),
        ip("198.51.100.1")
    );
    // A header that is not text ends the walk at once.
    let mut h = HeaderMap::new();
    h.insert(
        X_FORWARDED_FOR,
        HeaderValue::from_bytes(b"\xff1.2.3.4").unwrap(),
    );
    assert_eq!(client_address(&h, lb, &trusted), lb);
}

#[test]
fn removing_a_cookie_keeps_the_others() {
    let cases: &[(Pairs, Option<&str>)] = &[
        (&[("cookie", "a=1; session=tok; b=2")], Some("a=1; b=2")),
        (&[("cookie", "session=tok")], None),
        (&[("cookie", "a=1"), ("cookie", "session=tok")], Some("a=1")),
        (&[("cookie", "sessionx=1; a=2")], Some("sessionx=1; a=2")),
        (&[], None),
    ];
    for (pairs, want) in cases {
        let mut h = map(pairs);
        remove_cookie(&mut h, "session");
        let got: Vec<&str> = h
            .get_all(header::COOKIE)
            .iter()
            .map(|v| v.to_str().unwrap())
            .collect();
        match want {
            Some(w) => assert_eq!(got.join("; "), *w, "{pairs:?}"),
            None => assert!(got.is_empty(), "{pairs:?}: {got:?}"),
        }
    }
}

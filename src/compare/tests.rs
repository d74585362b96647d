use super::*;
use http::HeaderValue;
use serde_json::json;

fn answer(status: u16, ct: &str, body: &str) -> Answer {
    let mut headers = HeaderMap::new();
    headers.insert(CONTENT_TYPE, HeaderValue::from_str(ct).unwrap());
    Answer {
        status,
        headers,
        body: Bytes::from(body.to_string()),
        trailers: None,
    }
}

fn grpc(status: u16, grpc_status: &str, in_trailers: bool, body: &'static [u8]) -> Answer {
    let mut headers = HeaderMap::new();
    headers.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("application/grpc+proto"),
    );
    let mut trailers = HeaderMap::new();
    let value = HeaderValue::from_str(grpc_status).unwrap();
    if in_trailers {
        trailers.insert("grpc-status", value);
    } else {
        headers.insert("grpc-status", value);
    }
    Answer {
        status,
        headers,
        body: Bytes::from_static(body),
        trailers: in_trailers.then_some(trailers),
    }
}

#[test]
fn grpc_answers_compare_by_status_and_grpc_status_not_payload_bytes() {
    let r = rules(&[], 0.0);
    // Same outcome, different protobuf bytes (field order is not canonical): a match.
    assert_eq!(
        compare(
            &grpc(200, "0", true, b"\0\0\0\0\x02\x08\x01"),
            &grpc(200, "0", true, b"\0\0\0\0\x02\x10\x01"),
            &r
        ),
        Verdict::Match
    );
    // A trailers-only error answer carries grpc-status as a header.
    assert_eq!(
        compare(&grpc(200, "5", false, b""), &grpc(200, "5", true, b""), &r),
        Verdict::Match
    );
    let Verdict::Mismatch { differences: d, .. } =
        compare(&grpc(200, "0", true, b""), &grpc(200, "13", true, b""), &r)
    else {
        panic!("NOT_FOUND vs INTERNAL must differ");
    };
    assert_eq!(d[0].path, "grpc-status");
    assert_eq!(
        (d[0].primary.clone(), d[0].shadow.clone()),
        (json!("0"), json!("13"))
    );
    // A missing grpc-status (a broken stream) differs from OK.
    let mut broken = grpc(200, "0", true, b"");
    broken.trailers = None;
    assert!(matches!(
        compare(&grpc(200, "0", true, b""), &broken, &r),
        Verdict::Mismatch { .. }
    ));
    // HTTP status still counts.
    assert!(matches!(
        compare(&grpc(200, "0", true, b""), &grpc(503, "0", true, b""), &r),
        Verdict::Mismatch { .. }
    ));
}

fn rules(ignore: &[&str], tolerance: f64) -> Rules {
    Rules {
        headers: vec![CONTENT_TYPE],
        ignore: ignore.iter().map(|p| Pattern::parse(p)).collect(),
        tolerance,
        max_body: 1 << 20,
    }
}

fn paths(v: &Verdict) -> Vec<String> {
    match v {
        Verdict::Mismatch { differences: d, .. } => d.iter().map(|d| d.path.clone()).collect(),
        Verdict::Match => vec![],
        Verdict::Skipped(why) => vec![format!("skipped: {}", why.as_str())],
    }
}

#[test]
fn json_is_compared_structurally() {
    let j = "application/json";
    // (primary, shadow, ignore, tolerance, differing paths)
    type Case<'a> = (&'a str, &'a str, &'a [&'a str], f64, &'a [&'a str]);
    let cases: &[Case] = &[
        (r#"{"a":1,"b":2}"#, r#"{"b":2,"a":1}"#, &[], 0.0, &[]),
        (
            r#"{"user":{"email":"Ada@X"}}"#,
            r#"{"user":{"email":"ada@x"}}"#,
            &[],
            0.0,
            &["/user/email"],
        ),
        (r#"{"a":1}"#, r#"{"a":1,"b":2}"#, &[], 0.0, &["/b"]),
        (r#"{"a":[1,2,3]}"#, r#"{"a":[1,2]}"#, &[], 0.0, &["/a/2"]),
        (r#"{"n":1}"#, r#"{"n":1.0}"#, &[], 0.0, &[]),
        (r#"{"n":128}"#, r#"{"n":128.0}"#, &[], 0.0, &[]),
        // Integers compare exactly: doubles cannot tell these apart.
        (
            r#"{"external_id":1790412345678901234}"#,
            r#"{"external_id":1790412345678901235}"#,
            &[],
            0.0,
            &["/external_id"],
        ),
        (
            r#"{"n":9007199254740993}"#,
            r#"{"n":9007199254740992}"#,
            &[],
            0.0,
            &["/n"],
        ),
        (
            r#"{"n":-9007199254740993}"#,
            r#"{"n":-9007199254740992}"#,
            &[],
            0.0,
            &["/n"],
        ),
        // Past u64 and i64: compared as digits.
        (
            r#"{"n":123456789012345678901234567890}"#,
            r#"{"n":123456789012345678901234567891}"#,
            &[],
            0.0,
            &["/n"],
        ),
        (
            r#"{"n":-123456789012345678901234567890}"#,
            r#"{"n":-123456789012345678901234567890}"#,
            &[],
            0.0,
            &[],
        ),
        (r#"{"n":0}"#, r#"{"n":-0}"#, &[], 0.0, &[]),
        // Tolerance is for numbers with a fraction or an exponent, not for integers.
        (r#"{"n":100}"#, r#"{"n":101}"#, &[], 0.05, &["/n"]),
        (r#"{"n":100}"#, r#"{"n":101.0}"#, &[], 0.05, &[]),
        (r#"{"n":1e2}"#, r#"{"n":100}"#, &[], 0.0, &[]),
        (r#"{"n":100.0}"#, r#"{"n":100.05}"#, &[], 0.001, &[]),
        (r#"{"n":100.0}"#, r#"{"n":100.5}"#, &[], 0.001, &["/n"]),
        (r#"{"n":1}"#, r#"{"n":"1"}"#, &[], 0.0, &["/n"]),
        // Past the range of doubles: only the exact value, whatever the tolerance.
        (r#"{"n":1e400}"#, r#"{"n":1.797e308}"#, &[], 0.01, &["/n"]),
        (r#"{"n":1e400}"#, r#"{"n":1}"#, &[], 0.01, &["/n"]),
        (r#"{"n":1e400}"#, r#"{"n":1e401}"#, &[], 0.5, &["/n"]),
        (r#"{"n":-1e400}"#, r#"{"n":1e400}"#, &[], 0.5, &["/n"]),
        (r#"{"n":1e400}"#, r#"{"n":10e399}"#, &[], 0.0, &[]),
        (r#"{"n":1e400}"#, r#"{"n":1E+400}"#, &[], 0.0, &[]),
        (r#"{"n":1e-400}"#, r#"{"n":0}"#, &[], 0.5, &["/n"]),
        (r#"{"n":1e-400}"#, r#"{"n":0.1e-399}"#, &[], 0.0, &[]),
        (
            r#"{"n":1e99999999999999999999}"#,
            r#"{"n":1e400}"#,
            &[],
            0.5,
            &["/n"],
        ),
        (r#"{"n":0.0}"#, r#"{"n":-0e7}"#, &[], 0.0, &[]),
        (r#"{"n":0.001}"#, r#"{"n":1e-3}"#, &[], 0.0, &[]),
        (r#"{"n":120}"#, r#"{"n":1.2e2}"#, &[], 0.0, &[]),
        (
            r#"{"meta":{"generated_at":"x"},"v":1}"#,
            r#"{"meta":{"generated_at":"y"},"v":1}"#,
            &["/meta/generated_at"],
            0.0,
            &[],
        ),
        (
            r#"{"meta":{"generated_at":"x","id":1}}"#,
            r#"{"meta":{"generated_at":"y","id":2}}"#,
            &["/meta"],
            0.0,
            &[],
        ),
        (
            r#"{"items":[{"etag":"a","v":1},{"etag":"b","v":2}]}"#,
            r#"{"items":[{"etag":"c","v":1},{"etag":"d","v":3}]}"#,
            &["/items/*/etag"],
            0.0,
            &["/items/1/v"],
        ),
        (
            r#"{"a/b":1,"c~d":1}"#,
            r#"{"a/b":2,"c~d":2}"#,
            &["/c~0d"],
            0.0,
            &["/a~1b"],
        ),
        (r#"[1,2]"#, r#"[1,2]"#, &[], 0.0, &[]),
    ];
    for (a, b, ignore, tol, want) in cases {
        let got = compare(&answer(200, j, a), &answer(200, j, b), &rules(ignore, *tol));
        assert_eq!(paths(&got), *want, "{a} vs {b} ignoring {ignore:?}");
    }
}

#[test]
fn differences_carry_both_values_and_kind() {
    let v = compare(
        &answer(200, "application/json", r#"{"user":{"email":"Ada@X"}}"#),
        &answer(200, "application/json", r#"{"user":{}}"#),
        &rules(&[], 0.0),
    );
    let Verdict::Mismatch { differences: d, .. } = v else {
        panic!("{v:?}")
    };
    assert_eq!(
        d,
        vec![Difference {
            path: "/user/email".into(),
            kind: Kind::MissingInShadow,
            primary: json!("Ada@X"),
            shadow: Value::Null
        }]
    );
}

#[test]
fn status_and_headers() {
    let a = answer(200, "application/json", "{}");
    let mut b = answer(500, "text/html", "{}");
    assert_eq!(
        paths(&compare(&a, &b, &rules(&[], 0.0))),
        ["status", "header:content-type"]
    );
    assert_eq!(
        paths(&compare(&a, &b, &rules(&["header:content-type"], 0.0))),
        ["status"]
    );
    b.status = 200;
    b.headers.remove(CONTENT_TYPE);
    let Verdict::Mismatch { differences: d, .. } = compare(&a, &b, &rules(&[], 0.0)) else {
        panic!()
    };
    assert_eq!(d[0].shadow, Value::Null);
}

#[test]
fn text_shows_the_first_differing_line_and_binary_the_sizes() {
    let a = answer(200, "text/plain", "same\nleft\nrest");
    let b = answer(200, "text/plain", "same\nright\nrest");
    let Verdict::Mismatch { differences: d, .. } = compare(&a, &b, &rules(&[], 0.0)) else {
        panic!()
    };
    assert_eq!(
        d,
        vec![Difference {
            path: "body:line 2".into(),
            kind: Kind::Changed,
            primary: json!("left"),
            shadow: json!("right")
        }]
    );
    let bin = |b: &'static [u8]| Answer {
        status: 200,
        headers: HeaderMap::new(),
        body: Bytes::from_static(b),
        trailers: None,
    };
    // Same size, different bytes: the offset of the first difference, both bytes.
    assert_eq!(
        compare(
            &bin(b"\xff\x00\x01\x07"),
            &bin(b"\xff\x00\x02\x07"),
            &rules(&[], 0.0)
        ),
        Verdict::Mismatch {
            differences: vec![Difference {
                path: "body:byte 2".into(),
                kind: Kind::Changed,
                primary: json!("4 bytes, 0x01 at byte 2"),
                shadow: json!("4 bytes, 0x02 at byte 2"),
            }],
            total: 1
        }
    );
    // One a prefix of the other: where the shorter ends.
    assert_eq!(
        compare(&bin(b"\xff\x00"), &bin(b"\xff\x00\x09"), &rules(&[], 0.0)),
        Verdict::Mismatch {
            differences: vec![Difference {
                path: "body:byte 2".into(),
                kind: Kind::Changed,
                primary: json!("2 bytes, ends before byte 2"),
                shadow: json!("3 bytes, 0x09 at byte 2"),
            }],
            total: 1
        }
    );
    assert_eq!(
        compare(&bin(b"\xff"), &bin(b"\xff"), &rules(&[], 0.0)),
        Verdict::Match
    );
}

#[test]
fn gzip_and_deflate_are_decoded_before_comparing() {
    use std::io::Write;
    let body = r#"{"users":[{"id":1}]}"#;
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(body.as_bytes()).unwrap();
    let mut zlib = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
    zlib.write_all(body.as_bytes()).unwrap();
    let plain = answer(200, "application/json", body);
    for (encoding, bytes) in [
        ("gzip", gz.finish().unwrap()),
        ("deflate", zlib.finish().unwrap()),
    ] {
        let mut encoded = answer(200, "application/json", "");
        encoded
            .headers
            .insert(CONTENT_ENCODING, HeaderValue::from_static(encoding));
        encoded.body = Bytes::from(bytes);
        assert_eq!(
            compare(&encoded, &plain, &rules(&[], 0.0)),
            Verdict::Match,
            "{encoding}"
        );
    }
    let mut garbage = answer(200, "application/json", "not gzip");
    garbage
        .headers
        .insert(CONTENT_ENCODING, HeaderValue::from_static("gzip"));
    assert!(matches!(
        compare(&garbage, &plain, &rules(&[], 0.0)),
        Verdict::Skipped(_)
    ));
}

#[test]
fn a_decompression_bomb_is_skipped_not_expanded() {
    use std::io::Write;
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    gz.write_all(&vec![b'a'; 8 << 20]).unwrap();
    let mut bomb = answer(200, "text/plain", "");
    bomb.headers
        .insert(CONTENT_ENCODING, HeaderValue::from_static("gzip"));
    bomb.body = Bytes::from(gz.finish().unwrap());
    let mut r = rules(&[], 0.0);
    r.max_body = 1 << 20;
    assert_eq!(
        compare(&bomb, &bomb, &r),
        Verdict::Skipped(crate::compare::Skip::TooLarge)
    );
}

#[test]
fn differences_and_values_are_bounded() {
    let many_a: serde_json::Map<String, Value> =
        (0..200).map(|i| (format!("k{i}"), json!(i))).collect();
    let many_b: serde_json::Map<String, Value> =
        (0..200).map(|i| (format!("k{i}"), json!(i + 1))).collect();
    let v = compare(
        &answer(200, "application/json", &Value::Object(many_a).to_string()),
        &answer(200, "application/json", &Value::Object(many_b).to_string()),
        &rules(&[], 0.0),
    );
    assert_eq!(paths(&v).len(), MAX_DIFFERENCES);
    assert!(
        matches!(v, Verdict::Mismatch { total: 200, .. }),
        "every difference counted, not only the kept ones: {v:?}"
    );
    let long = "x".repeat(10_000);
    let Verdict::Mismatch { differences: d, .. } = compare(
        &answer(200, "application/json", &json!({"s": long}).to_string()),
        &answer(200, "application/json", r#"{"s":"y"}"#),
        &rules(&[], 0.0),
    ) else {
        panic!()
    };
    assert!(d[0].primary.as_str().unwrap().len() < 400);
}

#[test]
fn noise_is_learned_from_two_answers_of_the_same_backend() {
    let a = answer(
        200,
        "application/json",
        r#"{"generated_at":"t1","users":[{"id":1,"seen":"a"},{"id":2,"seen":"b"}],"v":1}"#,
    );
    let b = answer(
        200,
        "application/json",
        r#"{"generated_at":"t2","users":[{"id":1,"seen":"c"},{"id":2,"seen":"d"}],"v":1}"#,
    );
    assert_eq!(
        learn_noise(&a, &b, 1 << 20),
        ["/generated_at", "/users/*/seen"]
    );
    assert!(learn_noise(&a, &a, 1 << 20).is_empty());
}

//! A corpus of hard discrepancies for the comparison engine, table-driven: each case is two
//! answers (status, headers in order, body, trailers) and the exact differences expected,
//! pointer and kind, or the reason it is not compared. What the end-to-end tests
//! (`compare_hard.rs`, `shadow.rs`) prove through real sockets, this pins down case by case.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a panic is a failure report

use std::io::Write;

use bytes::Bytes;
use http::header::{HeaderMap, HeaderName, HeaderValue};
use serde_json::json;
use strangler::compare::{compare, Answer, Pattern, Rules, Skip, Verdict};

/// One side: status, header lines in order, body bytes, trailer lines.
struct Side<'a> {
    status: u16,
    headers: &'a [(&'a str, &'a str)],
    body: Vec<u8>,
    trailers: &'a [(&'a str, &'a str)],
}

fn json_side(body: &str) -> Side<'static> {
    Side {
        status: 200,
        headers: &[("content-type", "application/json")],
        body: body.as_bytes().to_vec(),
        trailers: &[],
    }
}

fn answer(s: &Side<'_>) -> Answer {
    let map = |lines: &[(&str, &str)]| {
        let mut m = HeaderMap::new();
        for (k, v) in lines {
            m.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        m
    };
    Answer {
        status: s.status,
        headers: map(s.headers),
        body: Bytes::from(s.body.clone()),
        trailers: (!s.trailers.is_empty()).then(|| map(s.trailers)),
    }
}

/// What a case must give.
#[derive(Debug, PartialEq)]
enum Want {
    Match,
    /// `(pointer, kind)` of every kept difference, in order, and the total found.
    Differ(Vec<(String, &'static str)>, usize),
    Skipped(Skip),
}

fn differ(list: &[(&str, &'static str)]) -> Want {
    Want::Differ(
        list.iter().map(|(p, k)| (p.to_string(), *k)).collect(),
        list.len(),
    )
}

fn verdict(v: Verdict) -> Want {
    match v {
        Verdict::Match => Want::Match,
        Verdict::Skipped(s) => Want::Skipped(s),
        Verdict::Mismatch { differences, total } => Want::Differ(
            differences
                .iter()
                .map(|d| {
                    let kind = match serde_json::to_value(&d.kind).unwrap() {
                        serde_json::Value::String(k) => Box::leak(k.into_boxed_str()) as &str,
                        other => panic!("{other}"),
                    };
                    (d.path.clone(), kind)
                })
                .collect(),
            total,
        ),
    }
}

fn rules(headers: &[&str], ignore: &[&str], tolerance: f64) -> Rules {
    Rules {
        headers: headers
            .iter()
            .map(|h| HeaderName::from_bytes(h.as_bytes()).unwrap())
            .collect(),
        ignore: ignore.iter().map(|p| Pattern::parse(p)).collect(),
        tolerance,
        max_body: 8 << 20,
    }
}

fn gzip(text: &str) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(text.as_bytes()).unwrap();
    e.finish().unwrap()
}

fn deep(depth: usize, leaf: &str) -> String {
    format!("{}{leaf}{}", "[".repeat(depth), "]".repeat(depth))
}

fn items(n: usize, changed_at: Option<usize>) -> String {
    let v: Vec<serde_json::Value> = (0..n)
        .map(|i| json!({"id": i, "qty": if Some(i) == changed_at { 999 } else { i % 5 }}))
        .collect();
    json!({"items": v}).to_string()
}

#[test]
fn the_corpus() {
    let cases: Vec<(&str, Side, Side, Rules, Want)> = vec![
        // --- headers ---
        (
            "repeated header, same values in the same order",
            Side {
                status: 200,
                headers: &[("vary", "a"), ("vary", "b")],
                body: vec![],
                trailers: &[],
            },
            Side {
                status: 200,
                headers: &[("vary", "a"), ("vary", "b")],
                body: vec![],
                trailers: &[],
            },
            rules(&["vary"], &[], 0.0),
            Want::Match,
        ),
        (
            "a repeated header equals its comma-joined single line (RFC 9110 §5.3)",
            Side {
                status: 200,
                headers: &[("vary", "a"), ("vary", "b")],
                body: vec![],
                trailers: &[],
            },
            Side {
                status: 200,
                headers: &[("vary", "a, b")],
                body: vec![],
                trailers: &[],
            },
            rules(&["vary"], &[], 0.0),
            Want::Match,
        ),
        (
            "the order of a field's values matters",
            Side {
                status: 200,
                headers: &[("vary", "a"), ("vary", "b")],
                body: vec![],
                trailers: &[],
            },
            Side {
                status: 200,
                headers: &[("vary", "b"), ("vary", "a")],
                body: vec![],
                trailers: &[],
            },
            rules(&["vary"], &[], 0.0),
            differ(&[("header:vary", "changed")]),
        ),
        (
            "the order of different fields does not",
            Side {
                status: 200,
                headers: &[("vary", "a"), ("content-type", "text/plain")],
                body: vec![],
                trailers: &[],
            },
            Side {
                status: 200,
                headers: &[("content-type", "text/plain"), ("vary", "a")],
                body: vec![],
                trailers: &[],
            },
            rules(&["vary", "content-type"], &[], 0.0),
            Want::Match,
        ),
        (
            "a compared header missing on one side",
            Side {
                status: 200,
                headers: &[("etag", "\"1\"")],
                body: vec![],
                trailers: &[],
            },
            Side {
                status: 200,
                headers: &[],
                body: vec![],
                trailers: &[],
            },
            rules(&["etag"], &[], 0.0),
            differ(&[("header:etag", "changed")]),
        ),
        (
            "headers not listed are not compared",
            Side {
                status: 200,
                headers: &[("date", "Mon")],
                body: vec![],
                trailers: &[],
            },
            Side {
                status: 200,
                headers: &[("date", "Tue")],
                body: vec![],
                trailers: &[],
            },
            rules(&[], &[], 0.0),
            Want::Match,
        ),
        (
            "200 against 203",
            Side {
                status: 200,
                headers: &[],
                body: vec![],
                trailers: &[],
            },
            Side {
                status: 203,
                headers: &[],
                body: vec![],
                trailers: &[],
            },
            rules(&[], &[], 0.0),
            differ(&[("status", "changed")]),
        ),
        // --- trailers ---
        (
            "a trailer on one side only, under a header rule",
            Side {
                status: 200,
                headers: &[],
                body: b"x".to_vec(),
                trailers: &[("x-checksum", "a1")],
            },
            Side {
                status: 200,
                headers: &[],
                body: b"x".to_vec(),
                trailers: &[],
            },
            rules(&["x-checksum"], &[], 0.0),
            differ(&[("trailer:x-checksum", "changed")]),
        ),
        (
            "a field sent as a header on one side and a trailer on the other",
            Side {
                status: 200,
                headers: &[("x-checksum", "a1")],
                body: b"x".to_vec(),
                trailers: &[],
            },
            Side {
                status: 200,
                headers: &[],
                body: b"x".to_vec(),
                trailers: &[("x-checksum", "a1")],
            },
            rules(&["x-checksum"], &[], 0.0),
            differ(&[
                ("header:x-checksum", "changed"),
                ("trailer:x-checksum", "changed"),
            ]),
        ),
        (
            "trailers not under a header rule are not compared, the body still is",
            Side {
                status: 200,
                headers: &[],
                body: b"left".to_vec(),
                trailers: &[("x-checksum", "a1")],
            },
            Side {
                status: 200,
                headers: &[],
                body: b"right".to_vec(),
                trailers: &[("x-checksum", "b2")],
            },
            rules(&[], &[], 0.0),
            differ(&[("body:line 1", "changed")]),
        ),
        (
            "gRPC: grpc-status in trailers against a trailers-only header",
            Side {
                status: 200,
                headers: &[("content-type", "application/grpc")],
                body: vec![],
                trailers: &[("grpc-status", "0")],
            },
            Side {
                status: 200,
                headers: &[("content-type", "application/grpc"), ("grpc-status", "14")],
                body: vec![],
                trailers: &[],
            },
            rules(&[], &[], 0.0),
            differ(&[("grpc-status", "changed")]),
        ),
        // --- charsets and Unicode ---
        (
            "NFC against NFD: different code points, a difference",
            json_side("{\"name\":\"Jos\u{e9}\"}"),
            json_side("{\"name\":\"Jose\u{301}\"}"),
            rules(&[], &[], 0.0),
            differ(&[("/name", "changed")]),
        ),
        (
            "an escaped code point equals the literal one",
            json_side(r#"{"name":"Jos\u00e9"}"#),
            json_side("{\"name\":\"Jos\u{e9}\"}"),
            rules(&[], &[], 0.0),
            Want::Match,
        ),
        (
            "a surrogate pair equals the literal character",
            json_side(r#"{"e":"\ud83c\udfc3"}"#),
            json_side("{\"e\":\"\u{1f3c3}\"}"),
            rules(&[], &[], 0.0),
            Want::Match,
        ),
        (
            "Latin-1 against UTF-8 text: the first differing byte",
            Side {
                status: 200,
                headers: &[("content-type", "text/plain; charset=iso-8859-1")],
                body: b"caf\xe9".to_vec(),
                trailers: &[],
            },
            Side {
                status: 200,
                headers: &[("content-type", "text/plain; charset=iso-8859-1")],
                body: "caf\u{e9}".as_bytes().to_vec(),
                trailers: &[],
            },
            rules(&[], &[], 0.0),
            differ(&[("body:byte 3", "changed")]),
        ),
        // --- JSON structure ---
        (
            "keys reordered deep down",
            json_side(r#"{"a":{"b":{"c":1,"d":[{"x":1,"y":2}]}}}"#),
            json_side(r#"{"a":{"b":{"d":[{"y":2,"x":1}],"c":1}}}"#),
            rules(&[], &[], 0.0),
            Want::Match,
        ),
        (
            "a duplicate key: the last one counts, as in JavaScript's JSON.parse",
            json_side(r#"{"a":1,"a":2}"#),
            json_side(r#"{"a":2}"#),
            rules(&[], &[], 0.0),
            Want::Match,
        ),
        (
            "a duplicate key whose last value differs",
            json_side(r#"{"a":2,"a":1}"#),
            json_side(r#"{"a":2}"#),
            rules(&[], &[], 0.0),
            differ(&[("/a", "changed")]),
        ),
        (
            "missing against null",
            json_side(r#"{"a":null,"b":1}"#),
            json_side(r#"{"b":1}"#),
            rules(&[], &[], 0.0),
            differ(&[("/a", "missing_in_shadow")]),
        ),
        (
            "null against missing, the other way",
            json_side(r#"{"b":1}"#),
            json_side(r#"{"a":null,"b":1}"#),
            rules(&[], &[], 0.0),
            differ(&[("/a", "missing_in_primary")]),
        ),
        (
            "null against an empty string",
            json_side(r#"{"a":null}"#),
            json_side(r#"{"a":""}"#),
            rules(&[], &[], 0.0),
            differ(&[("/a", "changed")]),
        ),
        (
            "an empty array against an empty object",
            json_side(r#"{"a":[]}"#),
            json_side(r#"{"a":{}}"#),
            rules(&[], &[], 0.0),
            differ(&[("/a", "changed")]),
        ),
        (
            "nesting 100 deep: the exact pointer",
            json_side(&deep(100, "1")),
            json_side(&deep(100, "2")),
            rules(&[], &[], 0.0),
            differ(&[(&"/0".repeat(100), "changed")]),
        ),
        (
            "nesting past the parser's 128 levels: compared as text",
            json_side(&deep(200, "1")),
            json_side(&deep(200, "2")),
            rules(&[], &[], 0.0),
            differ(&[("body:line 1", "changed")]),
        ),
        (
            "one changed item among 100,000",
            json_side(&items(100_000, Some(54_321))),
            json_side(&items(100_000, None)),
            rules(&[], &[], 0.0),
            differ(&[("/items/54321/qty", "changed")]),
        ),
        (
            "a pointer segment with / and ~ is escaped",
            json_side(r#"{"a/b":{"c~d":1}}"#),
            json_side(r#"{"a/b":{"c~d":2}}"#),
            rules(&[], &[], 0.0),
            differ(&[("/a~1b/c~0d", "changed")]),
        ),
        // --- numbers ---
        (
            "-0.0 against 0",
            json_side(r#"{"n":-0.0}"#),
            json_side(r#"{"n":0}"#),
            rules(&[], &[], 0.0),
            Want::Match,
        ),
        (
            "spellings of one number",
            json_side(r#"[1.5e2,150,0.15e3,1500e-1]"#),
            json_side(r#"[150,150.0,150,150]"#),
            rules(&[], &[], 0.0),
            Want::Match,
        ),
        (
            "an overflowing number is not within any tolerance of a finite one",
            json_side(r#"{"n":1e400}"#),
            json_side(r#"{"n":1.7976931348623157e308}"#),
            rules(&[], &[], 0.5),
            differ(&[("/n", "changed")]),
        ),
        (
            "two different overflowing numbers differ",
            json_side(r#"{"n":2e400}"#),
            json_side(r#"{"n":3e400}"#),
            rules(&[], &[], 0.9),
            differ(&[("/n", "changed")]),
        ),
        (
            "a number that underflows to zero is not zero",
            json_side(r#"{"n":1e-400}"#),
            json_side(r#"{"n":0.0}"#),
            rules(&[], &[], 0.5),
            differ(&[("/n", "changed")]),
        ),
        (
            "an id past 2^64 off by one",
            json_side(r#"{"id":18446744073709551617}"#),
            json_side(r#"{"id":18446744073709551618}"#),
            rules(&[], &[], 0.1),
            differ(&[("/id", "changed")]),
        ),
        (
            "within tolerance",
            json_side(r#"{"avg":3.14159}"#),
            json_side(r#"{"avg":3.1416}"#),
            rules(&[], &[], 0.001),
            Want::Match,
        ),
        // --- encodings ---
        (
            "gzip against identity",
            Side {
                status: 200,
                headers: &[
                    ("content-type", "application/json"),
                    ("content-encoding", "gzip"),
                ],
                body: gzip(r#"{"a":1}"#),
                trailers: &[],
            },
            json_side(r#"{"a":1}"#),
            rules(&[], &[], 0.0),
            Want::Match,
        ),
        (
            "gzip with a real difference inside",
            Side {
                status: 200,
                headers: &[
                    ("content-type", "application/json"),
                    ("content-encoding", "gzip"),
                ],
                body: gzip(r#"{"a":1}"#),
                trailers: &[],
            },
            json_side(r#"{"a":2}"#),
            rules(&[], &[], 0.0),
            differ(&[("/a", "changed")]),
        ),
        (
            "an encoding the comparison does not decode",
            Side {
                status: 200,
                headers: &[
                    ("content-type", "application/json"),
                    ("content-encoding", "br"),
                ],
                body: b"\x0b\x02\x80{}\x03".to_vec(),
                trailers: &[],
            },
            json_side("{}"),
            rules(&[], &[], 0.0),
            Want::Skipped(Skip::Undecodable),
        ),
        (
            "gzip that does not decode",
            Side {
                status: 200,
                headers: &[("content-encoding", "gzip")],
                body: b"\x1f\x8bnot gzip".to_vec(),
                trailers: &[],
            },
            json_side("{}"),
            rules(&[], &[], 0.0),
            Want::Skipped(Skip::Undecodable),
        ),
        // --- ignore rules ---
        (
            "an ignored pointer with a wildcard, the rest still compared",
            json_side(r#"{"items":[{"etag":"a","v":1},{"etag":"b","v":2}]}"#),
            json_side(r#"{"items":[{"etag":"c","v":1},{"etag":"d","v":3}]}"#),
            rules(&[], &["/items/*/etag"], 0.0),
            differ(&[("/items/1/v", "changed")]),
        ),
    ];
    let mut failures = Vec::new();
    for (name, a, b, r, want) in cases {
        let got = verdict(compare(&answer(&a), &answer(&b), &r));
        if got != want {
            failures.push(format!("{name}:\n  want {want:?}\n  got  {got:?}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn totals_count_past_the_kept_differences() {
    let shifted = |shift: usize| {
        let v: Vec<usize> = (shift..shift + 3000).collect();
        json!(v).to_string()
    };
    let got = compare(
        &answer(&json_side(&shifted(0))),
        &answer(&json_side(&shifted(1))),
        &rules(&[], &[], 0.0),
    );
    let Verdict::Mismatch { differences, total } = got else {
        panic!("{got:?}")
    };
    assert_eq!(total, 3000);
    assert_eq!(differences.len(), strangler::compare::MAX_DIFFERENCES);
    assert_eq!(differences[0].path, "/0");
}

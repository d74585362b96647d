//! Pure comparison of a primary and a shadow answer: `(primary, shadow, rules) -> Verdict`.
//! No IO, no async, no clocks. Status, the configured headers and the body are compared; JSON
//! bodies structurally (key order never matters, numbers within a relative tolerance), every
//! difference reported as a JSON pointer with both values; other bodies as bytes (text shows
//! the first differing line). Bodies are decoded first when a side is gzip or deflate encoded.
//! `learn_noise` compares two answers of the same backend to find fields that differ on their
//! own (timestamps, request ids), which later comparisons ignore.

mod json;

use std::io::Read;

use bytes::Bytes;
#[cfg(test)]
use http::header::CONTENT_TYPE;
use http::header::{HeaderMap, HeaderName, CONTENT_ENCODING};
use serde::Serialize;
use serde_json::Value;

pub use json::{generalize, pointer_matches, Found, Pattern};

/// At most this many differences are kept per comparison; every one is counted.
pub const MAX_DIFFERENCES: usize = 50;
/// Values longer than this (as JSON text) are shortened in reports.
const MAX_VALUE_CHARS: usize = 256;

/// One side of a comparison, as captured (body possibly still encoded).
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: Bytes,
    /// Trailer fields, when the body ended with some.
    pub trailers: Option<HeaderMap>,
}

impl Answer {
    /// A gRPC answer (`content-type: application/grpc...`).
    pub fn is_grpc(&self) -> bool {
        self.headers
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|ct| ct.starts_with("application/grpc"))
    }

    /// gRPC's status: a trailer, or a header in a trailers-only answer.
    pub fn grpc_status(&self) -> Option<&str> {
        self.trailers
            .as_ref()
            .and_then(|t| t.get("grpc-status"))
            .or_else(|| self.headers.get("grpc-status"))
            .and_then(|v| v.to_str().ok())
    }
}

/// What to compare and what to ignore.
#[derive(Debug, Clone, Default)]
pub struct Rules {
    pub headers: Vec<HeaderName>,
    /// JSON pointer patterns (`*` matches one segment) and `header:NAME` entries.
    pub ignore: Vec<Pattern>,
    pub tolerance: f64,
    /// Decoded bodies larger than this are not compared.
    pub max_body: usize,
}

/// How two values differ at a path.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    Changed,
    MissingInShadow,
    MissingInPrimary,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Difference {
    /// `status`, `header:NAME`, `trailer:NAME`, `grpc-status`, a JSON pointer into the body (`/user/email`), `body`, or
    /// `body:line N`.
    pub path: String,
    pub kind: Kind,
    pub primary: Value,
    pub shadow: Value,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    Match,
    /// The first [`MAX_DIFFERENCES`] differences, and how many were found in all.
    Mismatch {
        differences: Vec<Difference>,
        total: usize,
    },
    /// Not comparable (a body over `max_body` once decoded, or undecodable).
    Skipped(Skip),
}

/// Why an exchange was not compared, as counted in
/// `strangler_shadow_skipped_total{reason}` and on `/routes`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Skip {
    /// A body over `compare.max_body` (as sent, or once decoded), or over the process-wide
    /// shadow byte budget.
    TooLarge,
    /// A body in a Content-Encoding the comparison does not decode, or that does not decode.
    Undecodable,
    /// The primary's request or answer never completed (the client went away, a deadline).
    Incomplete,
    /// The comparison threads were busy and their queue full.
    QueueFull,
}

impl Skip {
    pub const ALL: [Skip; 4] = [
        Skip::TooLarge,
        Skip::Undecodable,
        Skip::Incomplete,
        Skip::QueueFull,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Skip::TooLarge => "too_large",
            Skip::Undecodable => "undecodable",
            Skip::Incomplete => "incomplete",
            Skip::QueueFull => "queue_full",
        }
    }
}

/// Compares `primary` and `shadow` under `rules`.
pub fn compare(primary: &Answer, shadow: &Answer, rules: &Rules) -> Verdict {
    let mut diffs = Found::default();
    if primary.status != shadow.status {
        diffs.add(|| {
            changed(
                "status".into(),
                Value::from(primary.status),
                Value::from(shadow.status),
            )
        });
    }
    for name in &rules.headers {
        if rules.ignore.iter().any(|p| p.is_header(name)) {
            continue;
        }
        // The same rule for trailer fields: an answer may send a field either way.
        let none = HeaderMap::new();
        let sides = [
            ("header", &primary.headers, &shadow.headers),
            (
                "trailer",
                primary.trailers.as_ref().unwrap_or(&none),
                shadow.trailers.as_ref().unwrap_or(&none),
            ),
        ];
        for (kind, pa, pb) in sides {
            if same_values(pa, pb, name) {
                continue;
            }
            let (a, b) = (header_value(pa, name), header_value(pb, name));
            if a != b {
                diffs.add(|| {
                    changed(
                        format!("{kind}:{name}"),
                        a.map_or(Value::Null, Value::from),
                        b.map_or(Value::Null, Value::from),
                    )
                });
            }
        }
    }
    // gRPC: the call's outcome is `grpc-status`; protobuf payloads have no canonical
    // encoding, so equal messages may differ byte for byte and are not compared.
    if primary.is_grpc() || shadow.is_grpc() {
        let (a, b) = (primary.grpc_status(), shadow.grpc_status());
        if a != b || primary.is_grpc() != shadow.is_grpc() {
            diffs.add(|| {
                changed(
                    "grpc-status".into(),
                    a.map_or(Value::Null, Value::from),
                    b.map_or(Value::Null, Value::from),
                )
            });
        }
        return diffs.verdict();
    }
    let (a, b) = match (
        decode(primary, rules.max_body),
        decode(shadow, rules.max_body),
    ) {
        (Ok(a), Ok(b)) => (a, b),
        (Err(why), _) | (_, Err(why)) => return Verdict::Skipped(why),
    };
    body_differences(&a, &b, rules, &mut diffs);
    diffs.verdict()
}

impl Found {
    fn verdict(self) -> Verdict {
        if self.total == 0 {
            Verdict::Match
        } else {
            Verdict::Mismatch {
                differences: self.kept,
                total: self.total,
            }
        }
    }
}

/// JSON pointers (array indices generalized to `*`) whose values differ between two answers of
/// the same backend to the same request: the noise later comparisons ignore.
pub fn learn_noise(first: &Answer, second: &Answer, max_body: usize) -> Vec<String> {
    let (Ok(a), Ok(b)) = (decode(first, max_body), decode(second, max_body)) else {
        return vec![];
    };
    let (Ok(a), Ok(b)) = (
        serde_json::from_slice::<Value>(&a),
        serde_json::from_slice::<Value>(&b),
    ) else {
        return vec![];
    };
    let mut diffs = Found {
        paths: Some(Default::default()),
        ..Found::default()
    };
    json::diff(&a, &b, &mut String::new(), &Rules::default(), &mut diffs);
    diffs.paths.unwrap_or_default().into_iter().collect()
}

fn changed(path: String, primary: Value, shadow: Value) -> Difference {
    Difference {
        path,
        kind: Kind::Changed,
        primary,
        shadow,
    }
}

/// Whether both maps hold the same values for `name`, byte for byte (no text made: the
/// usual case, checked before [`header_value`] builds the compared text).
fn same_values(a: &HeaderMap, b: &HeaderMap, name: &HeaderName) -> bool {
    let (mut a, mut b) = (a.get_all(name).iter(), b.get_all(name).iter());
    loop {
        match (a.next(), b.next()) {
            (None, None) => return true,
            (Some(x), Some(y)) if x.as_bytes() == y.as_bytes() => {}
            _ => return false,
        }
    }
}

fn header_value(headers: &HeaderMap, name: &HeaderName) -> Option<String> {
    let values: Vec<String> = headers
        .get_all(name)
        .iter()
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
        .collect();
    (!values.is_empty()).then(|| values.join(", "))
}

/// The body with its Content-Encoding undone, at most `max` bytes.
fn decode(answer: &Answer, max: usize) -> Result<Bytes, Skip> {
    let named = answer
        .headers
        .get(CONTENT_ENCODING)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("identity")
        .trim();
    // The usual answer: no coding, no lower-cased copy of the name made.
    let encoding = if named.is_empty() || named.eq_ignore_ascii_case("identity") {
        String::new()
    } else {
        named.to_ascii_lowercase()
    };
    let mut out = Vec::new();
    let limit = max as u64 + 1;
    let read = match encoding.as_str() {
        "" => {
            return if answer.body.len() > max {
                Err(Skip::TooLarge)
            } else {
                Ok(answer.body.clone())
            }
        }
        "gzip" | "x-gzip" => flate2::read::GzDecoder::new(&answer.body[..])
            .take(limit)
            .read_to_end(&mut out),
        "deflate" => {
            // RFC 9110 deflate is zlib-wrapped; some servers send raw deflate.
            let zlib = flate2::read::ZlibDecoder::new(&answer.body[..])
                .take(limit)
                .read_to_end(&mut out);
            if zlib.is_err() {
                out.clear();
                flate2::read::DeflateDecoder::new(&answer.body[..])
                    .take(limit)
                    .read_to_end(&mut out)
            } else {
                zlib
            }
        }
        _ => return Err(Skip::Undecodable),
    };
    match read {
        Ok(_) if out.len() > max => Err(Skip::TooLarge),
        Ok(_) => Ok(Bytes::from(out)),
        Err(_) => Err(Skip::Undecodable),
    }
}

fn body_differences(a: &Bytes, b: &Bytes, rules: &Rules, diffs: &mut Found) {
    if a == b {
        return;
    }
    let json_pair = (
        serde_json::from_slice::<Value>(a),
        serde_json::from_slice::<Value>(b),
    );
    if let (Ok(ja), Ok(jb)) = json_pair {
        json::diff(&ja, &jb, &mut String::new(), rules, diffs);
        return;
    }
    if rules.ignore.iter().any(|p| p.matches("")) {
        return;
    }
    match (std::str::from_utf8(a), std::str::from_utf8(b)) {
        (Ok(ta), Ok(tb)) => {
            let mut la = ta.lines();
            let mut lb = tb.lines();
            for n in 1.. {
                match (la.next(), lb.next()) {
                    (x, y) if x == y && x.is_some() => continue,
                    (None, None) => break,
                    (x, y) => {
                        let v =
                            |l: Option<&str>| l.map_or(Value::Null, |l| Value::from(shorten(l)));
                        diffs.add(|| changed(format!("body:line {n}"), v(x), v(y)));
                        break;
                    }
                }
            }
        }
        _ => {
            let at = first_difference(a, b);
            let side = |body: &Bytes| {
                Value::from(match body.get(at) {
                    Some(byte) => format!("{} bytes, 0x{byte:02x} at byte {at}", body.len()),
                    None => format!("{} bytes, ends before byte {at}", body.len()),
                })
            };
            diffs.add(|| changed(format!("body:byte {at}"), side(a), side(b)));
        }
    }
}

/// The offset of the first byte where `a` and `b` differ (the shorter length when one is a
/// prefix of the other).
fn first_difference(a: &[u8], b: &[u8]) -> usize {
    a.iter()
        .zip(b)
        .position(|(x, y)| x != y)
        .unwrap_or(a.len().min(b.len()))
}

/// Shortens long text for reports.
pub fn shorten(text: &str) -> String {
    if text.chars().count() <= MAX_VALUE_CHARS {
        return text.to_string();
    }
    let cut: String = text.chars().take(MAX_VALUE_CHARS).collect();
    format!(
        "{cut}… ({} more characters)",
        text.chars().count() - MAX_VALUE_CHARS
    )
}

/// A value bounded for reports: long strings and large structures are shortened.
pub fn bounded(v: &Value) -> Value {
    match v {
        Value::String(s) => Value::from(shorten(s)),
        Value::Array(_) | Value::Object(_) => {
            let text = v.to_string();
            if text.chars().count() <= MAX_VALUE_CHARS {
                v.clone()
            } else {
                Value::from(shorten(&text))
            }
        }
        // Numbers keep their text, which may be any length.
        Value::Number(n) if n.as_str().len() > MAX_VALUE_CHARS => Value::from(shorten(n.as_str())),
        other => other.clone(),
    }
}

#[cfg(test)]
mod tests;

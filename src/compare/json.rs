//! Structural JSON comparison and JSON pointer patterns.

use serde_json::Value;

use super::{bounded, Difference, Kind, Rules, MAX_DIFFERENCES};

/// An `ignore` entry: a JSON pointer whose `*` segments match any one segment, or
/// `header:NAME`.
#[derive(Debug, Clone, PartialEq)]
pub enum Pattern {
    Pointer(Vec<String>),
    Header(String),
}

impl Pattern {
    pub fn parse(text: &str) -> Pattern {
        match text.strip_prefix("header:") {
            Some(h) => Pattern::Header(h.to_ascii_lowercase()),
            None => Pattern::Pointer(split(text)),
        }
    }

    pub fn is_header(&self, name: &http::header::HeaderName) -> bool {
        matches!(self, Pattern::Header(h) if h == name.as_str())
    }

    /// Whether this pattern covers `pointer` (or a parent of it).
    pub fn matches(&self, pointer: &str) -> bool {
        match self {
            Pattern::Pointer(p) => pointer_matches(p, &split(pointer)),
            Pattern::Header(_) => false,
        }
    }
}

/// Pointer segments, unescaped (`~1` is `/`, `~0` is `~`). `""` is the root: no segments.
fn split(pointer: &str) -> Vec<String> {
    if pointer.is_empty() {
        return vec![];
    }
    pointer
        .trim_start_matches('/')
        .split('/')
        .map(|s| s.replace("~1", "/").replace("~0", "~"))
        .collect()
}

/// Whether `pattern` equals `path` or a prefix of it (ignoring `/meta` ignores `/meta/x`).
pub fn pointer_matches(pattern: &[String], path: &[String]) -> bool {
    pattern.len() <= path.len() && pattern.iter().zip(path).all(|(p, s)| p == "*" || p == s)
}

fn escape(segment: &str) -> String {
    segment.replace('~', "~0").replace('/', "~1")
}

/// Replaces array indices with `*`: `/users/3/last_seen` -> `/users/*/last_seen`.
pub fn generalize(pointer: &str) -> String {
    pointer
        .split('/')
        .map(|s| {
            if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
                "*"
            } else {
                s
            }
        })
        .collect::<Vec<_>>()
        .join("/")
}

fn ignored(path: &str, rules: &Rules) -> bool {
    rules.ignore.iter().any(|p| p.matches(path))
}

/// Integers (no fraction, no exponent) compare exactly, whatever their size: a 64-bit id that
/// is off by one is a real difference, even where doubles cannot tell. Numbers are kept as
/// their JSON text (serde_json's `arbitrary_precision`), so this is a comparison of digits.
/// `tolerance` applies only when a side has a fraction or an exponent, so `128` equals `128.0`.
pub(crate) fn numbers_equal(
    a: &serde_json::Number,
    b: &serde_json::Number,
    tolerance: f64,
) -> bool {
    let (ta, tb) = (a.as_str(), b.as_str());
    if ta == tb {
        return true;
    }
    let integer = |t: &str| !t.contains(['.', 'e', 'E']);
    if integer(ta) && integer(tb) {
        // JSON integers have no leading zeros or plus sign; only `-0` has two spellings.
        let zero = |t: &str| t.trim_start_matches('-') == "0";
        return zero(ta) && zero(tb);
    }
    match (ta.parse::<f64>(), tb.parse::<f64>()) {
        (Ok(x), Ok(y)) => x == y || (x - y).abs() <= tolerance * x.abs().max(y.abs()),
        _ => false,
    }
}

/// Appends the differences between `a` (primary) and `b` (shadow) under `path`.
pub fn diff(a: &Value, b: &Value, path: &mut String, rules: &Rules, out: &mut Vec<Difference>) {
    if out.len() >= MAX_DIFFERENCES || ignored(path, rules) {
        return;
    }
    match (a, b) {
        (Value::Object(ma), Value::Object(mb)) => {
            let mut keys: Vec<&String> = ma
                .keys()
                .chain(mb.keys().filter(|k| !ma.contains_key(*k)))
                .collect();
            keys.sort();
            for k in keys {
                child(&escape(k), ma.get(k), mb.get(k), path, rules, out);
            }
        }
        (Value::Array(xa), Value::Array(xb)) => {
            for i in 0..xa.len().max(xb.len()) {
                child(&i.to_string(), xa.get(i), xb.get(i), path, rules, out);
            }
        }
        (Value::Number(x), Value::Number(y)) if numbers_equal(x, y, rules.tolerance) => {}
        (x, y) if x == y => {}
        (x, y) => out.push(Difference {
            path: path.clone(),
            kind: Kind::Changed,
            primary: bounded(x),
            shadow: bounded(y),
        }),
    }
}

/// Compares one member (object key or array index) present on at least one side.
fn child(
    segment: &str,
    a: Option<&Value>,
    b: Option<&Value>,
    path: &mut String,
    rules: &Rules,
    out: &mut Vec<Difference>,
) {
    let len = path.len();
    path.push('/');
    path.push_str(segment);
    match (a, b) {
        (Some(x), Some(y)) => diff(x, y, path, rules, out),
        (x, y) if !ignored(path, rules) && out.len() < MAX_DIFFERENCES => {
            let kind = if y.is_none() {
                Kind::MissingInShadow
            } else {
                Kind::MissingInPrimary
            };
            out.push(Difference {
                path: path.clone(),
                kind,
                primary: x.map_or(Value::Null, bounded),
                shadow: y.map_or(Value::Null, bounded),
            });
        }
        _ => {}
    }
    path.truncate(len);
}

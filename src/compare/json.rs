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

/// A JSON number as an exact decimal: sign, significant digits (no leading or trailing
/// zeros) and the power of ten of the last digit. Zero has no digits and no sign, so `-0`,
/// `0.0` and `0e5` are one value. The exponent saturates: a number that needs more than
/// 2^63 powers of ten is not a number anyone sends.
#[derive(Debug, PartialEq, Eq)]
struct Decimal<'a> {
    negative: bool,
    digits: Vec<&'a [u8]>,
    exponent: i64,
}

fn decimal(text: &str) -> Option<Decimal<'_>> {
    let bytes = text.as_bytes();
    let (negative, rest) = match bytes.split_first() {
        Some((b'-', rest)) => (true, rest),
        _ => (false, bytes),
    };
    let mantissa_end = rest
        .iter()
        .position(|&b| b == b'e' || b == b'E')
        .unwrap_or(rest.len());
    let (mantissa, exp_text) = rest.split_at(mantissa_end);
    let mut exponent: i64 = match exp_text.get(1..) {
        None => 0,
        Some(e) => std::str::from_utf8(e)
            .ok()?
            .trim_start_matches('+')
            .parse::<i64>()
            .or_else(|_| {
                // Only overflow gets here: its sign says which way to saturate.
                let all_digits = e.iter().skip(1).all(u8::is_ascii_digit);
                match e.first() {
                    Some(b'-') if all_digits => Ok(i64::MIN / 2),
                    Some(_) if e.iter().all(|b| b.is_ascii_digit() || *b == b'+') => {
                        Ok(i64::MAX / 2)
                    }
                    _ => Err(()),
                }
            })
            .ok()?,
    };
    let (int, frac) = match mantissa.iter().position(|&b| b == b'.') {
        Some(dot) => (&mantissa[..dot], &mantissa[dot + 1..]),
        None => (mantissa, &[][..]),
    };
    if int.is_empty() || !int.iter().chain(frac).all(u8::is_ascii_digit) {
        return None;
    }
    exponent = exponent.saturating_sub(i64::try_from(frac.len()).unwrap_or(i64::MAX));
    // The digits as two slices (integer part, fraction) without the zeros at either end.
    let mut digits: Vec<&[u8]> = vec![int, frac];
    let lead = |d: &mut Vec<&[u8]>| {
        while let Some(first) = d.first_mut() {
            let zeros = first.iter().take_while(|&&b| b == b'0').count();
            *first = &first[zeros..];
            if first.is_empty() {
                d.remove(0);
            } else {
                break;
            }
        }
    };
    lead(&mut digits);
    while let Some(last) = digits.last_mut() {
        let zeros = last.iter().rev().take_while(|&&b| b == b'0').count();
        *last = &last[..last.len() - zeros];
        exponent = exponent.saturating_add(i64::try_from(zeros).unwrap_or(0));
        if last.is_empty() {
            digits.pop();
        } else {
            break;
        }
    }
    if digits.is_empty() {
        return Some(Decimal {
            negative: false,
            digits,
            exponent: 0,
        });
    }
    Some(Decimal {
        negative,
        digits,
        exponent,
    })
}

impl Decimal<'_> {
    fn same_value(&self, other: &Decimal<'_>) -> bool {
        self.negative == other.negative
            && self.exponent == other.exponent
            && self.digits.concat() == other.digits.concat()
    }
}

/// Integers (no fraction, no exponent) compare exactly, whatever their size: a 64-bit id that
/// is off by one is a real difference, even where doubles cannot tell. Numbers are kept as
/// their JSON text (serde_json's `arbitrary_precision`), so this is a comparison of digits.
/// `tolerance` applies only when a side has a fraction or an exponent, so `128` equals `128.0`,
/// and only inside the range of doubles: a number that overflows one (`1e400`) or underflows
/// to zero (`1e-400`) equals only the same exact value, never anything "within tolerance".
pub(crate) fn numbers_equal(
    a: &serde_json::Number,
    b: &serde_json::Number,
    tolerance: f64,
) -> bool {
    let (ta, tb) = (a.as_str(), b.as_str());
    if ta == tb {
        return true;
    }
    let (Some(da), Some(db)) = (decimal(ta), decimal(tb)) else {
        return false;
    };
    if da.same_value(&db) {
        return true;
    }
    let integer = |t: &str| !t.contains(['.', 'e', 'E']);
    if integer(ta) && integer(tb) {
        return false;
    }
    let representable = |t: &str, d: &Decimal<'_>| {
        t.parse::<f64>()
            .ok()
            .filter(|x| x.is_finite() && (*x != 0.0 || d.digits.is_empty()))
    };
    match (representable(ta, &da), representable(tb, &db)) {
        (Some(x), Some(y)) => x == y || (x - y).abs() <= tolerance * x.abs().max(y.abs()),
        _ => false,
    }
}

/// The differences found so far: the first [`MAX_DIFFERENCES`] kept whole, every one counted.
/// For learning noise, every difference's generalized path instead (`paths`).
#[derive(Debug, Default)]
pub struct Found {
    pub kept: Vec<Difference>,
    pub total: usize,
    /// When set, each difference adds its path with array indices as `*` here, not to `kept`.
    pub paths: Option<std::collections::BTreeSet<String>>,
}

impl Found {
    /// Counts a difference; builds and keeps it while there is room.
    pub fn add(&mut self, make: impl FnOnce() -> Difference) {
        self.total += 1;
        if let Some(paths) = &mut self.paths {
            paths.insert(generalize(&make().path));
        } else if self.kept.len() < MAX_DIFFERENCES {
            self.kept.push(make());
        }
    }
}

/// Appends the differences between `a` (primary) and `b` (shadow) under `path`. Walks both
/// trees whole (they are bounded by `max_body`), so every difference is counted.
pub fn diff(a: &Value, b: &Value, path: &mut String, rules: &Rules, out: &mut Found) {
    if ignored(path, rules) {
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
        (x, y) => out.add(|| Difference {
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
    out: &mut Found,
) {
    let len = path.len();
    path.push('/');
    path.push_str(segment);
    match (a, b) {
        (Some(x), Some(y)) => diff(x, y, path, rules, out),
        (x, y) if !ignored(path, rules) => {
            let kind = if y.is_none() {
                Kind::MissingInShadow
            } else {
                Kind::MissingInPrimary
            };
            out.add(|| Difference {
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

//! Human units in routes.toml: durations (`"250ms"`, `"2s"`, `"1m"`) and sizes
//! (`"512KiB"`, `"10MiB"`). Pure parsing; the error text is what operators read.

use std::time::Duration;

/// Parses a duration such as `"250ms"`, `"2s"`, `"1m30s"`. Zero is refused: every duration in
/// routes.toml is a timeout or a window, and a zero one would fail every request.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    match humantime::parse_duration(text.trim()) {
        Ok(d) if d.is_zero() => Err(format!("duration {text:?} must be greater than zero")),
        Ok(d) => Ok(d),
        Err(e) => Err(format!(
            "invalid duration {text:?} ({e}); write e.g. \"250ms\", \"2s\", \"1m\""
        )),
    }
}

/// Parses a size such as `"512KiB"`, `"10MiB"`, `"1GiB"`, `"100B"` or `"1000"` (bytes).
/// Decimal units (`KB`, `MB`, `GB`) are powers of 1000, binary ones (`KiB`, ...) of 1024.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, unit) = t.split_at(split);
    let invalid = || format!("invalid size {text:?}; write e.g. \"512KiB\", \"10MiB\", \"1GiB\"");
    let n: u64 = digits.parse().map_err(|_| invalid())?;
    let mult: u64 = match unit.trim() {
        "" | "B" => 1,
        "KB" | "kB" => 1_000,
        "KiB" => 1 << 10,
        "MB" => 1_000_000,
        "MiB" => 1 << 20,
        "GB" => 1_000_000_000,
        "GiB" => 1 << 30,
        _ => return Err(invalid()),
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("size {text:?} is too large"))
}

/// Formats a byte count the way operators write it (`10MiB`, `512KiB`, `1000B`).
#[cfg(test)]
pub fn format_size(n: u64) -> String {
    for (unit, mult) in [("GiB", 1u64 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)] {
        if n >= mult && n.is_multiple_of(mult) {
            return format!("{}{unit}", n / mult);
        }
    }
    format!("{n}B")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        let cases: &[(&str, Option<Duration>)] = &[
            ("250ms", Some(Duration::from_millis(250))),
            ("2s", Some(Duration::from_secs(2))),
            ("1m", Some(Duration::from_secs(60))),
            ("1m30s", Some(Duration::from_secs(90))),
            (" 5s ", Some(Duration::from_secs(5))),
            ("0s", None),
            ("", None),
            ("5", None),
            ("five seconds", None),
            ("-1s", None),
        ];
        for (text, want) in cases {
            assert_eq!(parse_duration(text).ok(), *want, "{text:?}");
        }
    }

    #[test]
    fn sizes() {
        let cases: &[(&str, Option<u64>)] = &[
            ("10MiB", Some(10 << 20)),
            ("512KiB", Some(512 << 10)),
            ("1GiB", Some(1 << 30)),
            ("1000", Some(1000)),
            ("100B", Some(100)),
            ("2KB", Some(2000)),
            ("10 MiB", Some(10 << 20)),
            ("10mib", None),
            ("MiB", None),
            ("-1MiB", None),
            ("1.5MiB", None),
            ("99999999999999GiB", None),
        ];
        for (text, want) in cases {
            assert_eq!(parse_size(text).ok(), *want, "{text:?}");
        }
    }

    #[test]
    fn size_round_trip() {
        for n in [10 << 20, 512 << 10, 1000, 1 << 30] {
            assert_eq!(parse_size(&format_size(n)).ok(), Some(n));
        }
    }
}

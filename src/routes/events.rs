//! A route's `events`: which migration events it publishes. Pure data: the publisher lives in
//! `crate::events`.

/// What one route publishes, with defaults filled in.
#[derive(Debug, Clone, PartialEq)]
pub struct RouteEvents {
    /// Shadow mismatches (needs `shadow`).
    pub mismatch: bool,
    /// 2xx answers to POST, PUT, PATCH and DELETE.
    pub write: bool,
    /// Answered requests, sampled.
    pub request: bool,
    /// The fraction of `request` events published (mismatches and writes are never sampled).
    pub sample: f64,
    /// Bytes of the request and of the response body a `write` event carries (0: none).
    pub body: usize,
    /// Whether `path` keeps the query string.
    pub query: bool,
    /// The route's part of the routing key: `/api/users` is `api.users`, `/` is `root`.
    pub key: String,
}

/// Longest routing-key part kept from a prefix (AMQP allows 255 bytes in all).
const MAX_KEY: usize = 200;

/// The routing-key part of a route prefix: segments joined by `.`, characters other than
/// ASCII letters, digits, `-` and `_` replaced by `_` (`.`, `*` and `#` mean something in a
/// topic binding).
pub fn routing_key(prefix: &str) -> String {
    let mut key = String::with_capacity(prefix.len());
    for seg in prefix.split('/').filter(|s| !s.is_empty()) {
        if !key.is_empty() {
            key.push('.');
        }
        key.extend(seg.chars().map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        }));
    }
    if key.is_empty() {
        key.push_str("root");
    }
    if key.len() > MAX_KEY {
        key.truncate(MAX_KEY);
    }
    key
}

impl RouteEvents {
    /// `["mismatch", "write"]` and the settings beside them, for `/routes` and `explain`.
    pub fn kinds(&self) -> Vec<&'static str> {
        [
            (self.mismatch, "mismatch"),
            (self.write, "write"),
            (self.request, "request"),
        ]
        .into_iter()
        .filter_map(|(on, k)| on.then_some(k))
        .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routing_keys_of_prefixes() {
        assert_eq!(routing_key("/api/users"), "api.users");
        assert_eq!(routing_key("/api/users/"), "api.users");
        assert_eq!(routing_key("/"), "root");
        assert_eq!(routing_key("/v1.2/a*b#c"), "v1_2.a_b_c");
        assert_eq!(routing_key(&format!("/{}", "x".repeat(500))).len(), MAX_KEY);
    }
}

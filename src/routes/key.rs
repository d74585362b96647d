//! A key read from a request: what a canary's `sticky` and a rate limit's `key` name (and a
//! recording's `sticky` to come). One type, one parser, one rule for each kind of name, so a
//! cookie name valid in one place is valid in every other.

use std::borrow::Cow;
use std::fmt;
use std::net::IpAddr;

use http::{HeaderMap, HeaderName};

use crate::headers::cookie;
use crate::jwt::Claims;

/// Where a request's key comes from.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum RequestKey {
    /// A header's value (`header:NAME`).
    Header(HeaderName),
    /// A cookie's value (`cookie:NAME`).
    Cookie(String),
    /// The client's address, after `trusted_proxies` (`ip`).
    Client,
    /// A verified JWT claim (`claim:NAME`; the route needs `auth`).
    Claim(String),
    /// The same for every request of the route (`route`).
    Route,
}

/// Why a key's text is not one.
pub const EXPECTED: &str =
    "expected \"ip\", \"header:NAME\", \"cookie:NAME\", \"claim:NAME\" or \"route\"";

impl RequestKey {
    /// `ip`, `route`, `header:NAME` (a header name), `cookie:NAME` (a token, RFC 6265
    /// §4.1.1: any other name never matches a cookie), `claim:NAME` (not empty).
    pub fn parse(text: &str) -> Option<RequestKey> {
        match text.split_once(':') {
            _ if text == "ip" => Some(RequestKey::Client),
            _ if text == "route" => Some(RequestKey::Route),
            Some(("header", name)) => HeaderName::from_bytes(name.as_bytes())
                .ok()
                .map(RequestKey::Header),
            Some(("cookie", name)) if is_cookie_name(name) => {
                Some(RequestKey::Cookie(name.to_string()))
            }
            Some(("claim", name)) if !name.is_empty() => Some(RequestKey::Claim(name.to_string())),
            _ => None,
        }
    }

    /// The key's value in a request; `None` when the request has none (an absent or empty
    /// header or cookie, a claim the token does not carry). `Route` is the empty value.
    pub fn read<'a>(
        &self,
        headers: &'a HeaderMap,
        client: IpAddr,
        claims: Option<&Claims>,
    ) -> Option<Cow<'a, [u8]>> {
        let value = match self {
            RequestKey::Header(name) => Cow::Borrowed(headers.get(name)?.as_bytes()),
            RequestKey::Cookie(name) => Cow::Borrowed(cookie(headers, name)?.as_bytes()),
            RequestKey::Client => Cow::Owned(client_text(client)),
            RequestKey::Claim(name) => {
                Cow::Owned(crate::jwt::claim_text(claims?, name)?.into_bytes())
            }
            RequestKey::Route => Cow::Borrowed(&b""[..]),
        };
        (!value.is_empty() || *self == RequestKey::Route).then_some(value)
    }
}

/// The client's address as text (its `Display` form), without the formatting machinery.
fn client_text(client: IpAddr) -> Vec<u8> {
    let mut buf = [0u8; crate::headers::IP_TEXT_MAX];
    crate::headers::ip_text(client, &mut buf).to_vec()
}

/// A cookie's name is a token (RFC 6265 §4.1.1, RFC 9110 §5.6.2).
pub fn is_cookie_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// As written in routes.toml.
impl fmt::Display for RequestKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RequestKey::Header(h) => write!(f, "header:{h}"),
            RequestKey::Cookie(c) => write!(f, "cookie:{c}"),
            RequestKey::Client => f.write_str("ip"),
            RequestKey::Claim(c) => write!(f, "claim:{c}"),
            RequestKey::Route => f.write_str("route"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_parser_one_cookie_rule() {
        for (text, want) in [
            ("ip", Some(RequestKey::Client)),
            ("route", Some(RequestKey::Route)),
            (
                "header:x-user-id",
                Some(RequestKey::Header(HeaderName::from_static("x-user-id"))),
            ),
            (
                "cookie:session_id",
                Some(RequestKey::Cookie("session_id".into())),
            ),
            ("claim:sub", Some(RequestKey::Claim("sub".into()))),
            ("cookie:", None),
            ("cookie:a b", None),
            ("cookie:a=b", None),
            ("cookie:a;b", None),
            ("cookie:a,b", None),
            ("cookie:a/b", None),
            ("header:bad header", None),
            ("claim:", None),
            ("session", None),
            ("IP", None),
        ] {
            assert_eq!(RequestKey::parse(text), want, "{text}");
            if let Some(k) = want {
                assert_eq!(k.to_string(), text, "written back as read");
            }
        }
    }

    #[test]
    fn read_finds_the_value_or_none() {
        let mut h = HeaderMap::new();
        h.insert("x-user-id", "42".parse().unwrap());
        h.insert("x-empty", "".parse().unwrap());
        h.insert("cookie", "a=1; session=abc".parse().unwrap());
        let ip: IpAddr = "10.0.0.7".parse().unwrap();
        let read = |k: &str| {
            RequestKey::parse(k)
                .unwrap()
                .read(&h, ip, None)
                .map(|v| String::from_utf8(v.into_owned()).unwrap())
        };
        assert_eq!(read("header:x-user-id").as_deref(), Some("42"));
        assert_eq!(read("header:x-empty"), None);
        assert_eq!(read("header:x-absent"), None);
        assert_eq!(read("cookie:session").as_deref(), Some("abc"));
        assert_eq!(read("cookie:other"), None);
        assert_eq!(read("ip").as_deref(), Some("10.0.0.7"));
        assert_eq!(read("claim:sub"), None, "no token, no claim");
        assert_eq!(read("route").as_deref(), Some(""));
    }
}

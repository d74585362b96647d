//! Pure header functions: hop-by-hop removal, `x-forwarded-*`, `via` and loop detection, and
//! request ids. No IO; every function is tested by table below.

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
pub const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
pub const X_STRANGLER_SHADOW: HeaderName = HeaderName::from_static("x-strangler-shadow");
const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");
/// The settings of an h2c upgrade (RFC 7540 §3.2.1): connection-specific, never forwarded.
const HTTP2_SETTINGS: HeaderName = HeaderName::from_static("http2-settings");

const HOP_BY_HOP_COUNT: usize = 9;

/// Hop-by-hop headers of RFC 9110 §7.6.1 plus the obsolete ones still seen in the wild.
/// `Trailer` is not one of them (it is end-to-end, RFC 9110 §6.6.2): it declares the trailer
/// fields that follow, and hyper's HTTP/1.1 encoder writes only the fields it declares.
const HOP_BY_HOP: [HeaderName; HOP_BY_HOP_COUNT] = [
    header::CONNECTION,
    KEEP_ALIVE,
    PROXY_CONNECTION,
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    HTTP2_SETTINGS,
];

/// Headers a client must not be able to strip by naming them in `Connection`: the proxy
/// sets them for the backend's benefit.
const PROTECTED: [HeaderName; 6] = [
    X_FORWARDED_FOR,
    X_FORWARDED_PROTO,
    X_FORWARDED_HOST,
    X_REQUEST_ID,
    header::VIA,
    header::HOST,
];

/// True when the message asks for a protocol upgrade (`Connection: upgrade` + `Upgrade`).
pub fn is_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(header::UPGRADE)
        && connection_tokens(headers).any(|t| t.eq_ignore_ascii_case("upgrade"))
}

fn connection_tokens(headers: &HeaderMap) -> impl Iterator<Item = &str> {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|t| !t.is_empty())
}

/// Which of the headers the proxy reads, rewrites or removes a message carries, from one
/// pass over its names (a length-and-bytes match each, no hashing), so the request phases
/// skip the hashed lookups of headers that are not there (most requests carry none of the
/// hop-by-hop, trace or forwarding headers). It describes the headers as they were scanned:
/// whoever changes them before a phase reads the summary must scan again.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Present(u32);

impl Present {
    pub const HOST: u32 = 1;
    pub const VIA: u32 = 1 << 1;
    pub const X_REQUEST_ID: u32 = 1 << 2;
    pub const TRACEPARENT: u32 = 1 << 3;
    pub const TRACESTATE: u32 = 1 << 4;
    pub const CONTENT_LENGTH: u32 = 1 << 5;
    pub const X_STRANGLER_SHADOW: u32 = 1 << 6;
    pub const X_FORWARDED_FOR: u32 = 1 << 7;
    pub const X_FORWARDED_HOST: u32 = 1 << 8;
    /// `Connection`, then the other hop-by-hop headers in [`HOP_BY_HOP`]'s order.
    const HOP_SHIFT: u32 = 9;
    pub const CONNECTION: u32 = 1 << Self::HOP_SHIFT;
    pub const TE: u32 = 1 << (Self::HOP_SHIFT + 5);
    pub const TRANSFER_ENCODING: u32 = 1 << (Self::HOP_SHIFT + 6);
    pub const UPGRADE: u32 = 1 << (Self::HOP_SHIFT + 7);
    /// Any of the hop-by-hop headers.
    pub const HOP_BY_HOP: u32 = ((1 << HOP_BY_HOP_COUNT) - 1) << Self::HOP_SHIFT;

    /// The summary of `headers`.
    pub fn of(headers: &HeaderMap) -> Present {
        Present(headers.keys().fold(0, |bits, name| bits | Self::bit(name)))
    }

    /// Every flag set: for callers without a summary (each lookup is done).
    pub const ALL: Present = Present(u32::MAX);

    #[inline]
    fn bit(name: &HeaderName) -> u32 {
        match name.as_str() {
            "host" => Self::HOST,
            "via" => Self::VIA,
            "x-request-id" => Self::X_REQUEST_ID,
            "traceparent" => Self::TRACEPARENT,
            "tracestate" => Self::TRACESTATE,
            "content-length" => Self::CONTENT_LENGTH,
            "x-strangler-shadow" => Self::X_STRANGLER_SHADOW,
            "x-forwarded-for" => Self::X_FORWARDED_FOR,
            "x-forwarded-host" => Self::X_FORWARDED_HOST,
            "connection" => Self::CONNECTION,
            "keep-alive" => 1 << (Self::HOP_SHIFT + 1),
            "proxy-connection" => 1 << (Self::HOP_SHIFT + 2),
            "proxy-authenticate" => 1 << (Self::HOP_SHIFT + 3),
            "proxy-authorization" => 1 << (Self::HOP_SHIFT + 4),
            "te" => Self::TE,
            "transfer-encoding" => Self::TRANSFER_ENCODING,
            "upgrade" => Self::UPGRADE,
            "http2-settings" => 1 << (Self::HOP_SHIFT + 8),
            _ => 0,
        }
    }

    /// Whether any of `flags` is present.
    #[inline]
    pub fn has(self, flags: u32) -> bool {
        self.0 & flags != 0
    }
}

/// Removes hop-by-hop headers and those named in `Connection`. With `upgrade`, keeps
/// `Connection: upgrade` and `Upgrade` so the upgrade reaches the other side.
pub fn strip_hop_by_hop(headers: &mut HeaderMap, upgrade: bool) {
    let present = Present::of(headers);
    strip_present(headers, present, upgrade);
}

/// [`strip_hop_by_hop`] with the message's [`Present`] summary already made.
pub fn strip_present(headers: &mut HeaderMap, present: Present, upgrade: bool) {
    if !present.has(Present::HOP_BY_HOP) {
        return;
    }
    // Read before removal: `Connection: Upgrade` names the very header an upgrade keeps.
    let upgrade_to = if upgrade {
        headers.get(header::UPGRADE).cloned()
    } else {
        None
    };
    if present.has(Present::CONNECTION) && !only_keep_alive(headers) {
        // Only the named headers that are there are collected (usually none: the usual
        // tokens name hop-by-hop headers, removed below).
        let named: Vec<HeaderName> = connection_tokens(headers)
            .filter(|t| !names_hop_by_hop(t) && headers.contains_key(*t))
            .filter_map(|t| HeaderName::from_bytes(t.as_bytes()).ok())
            .filter(|n| !PROTECTED.contains(n))
            .collect();
        for name in named {
            headers.remove(name);
        }
    }
    for (i, name) in HOP_BY_HOP.iter().enumerate() {
        if present.has(1 << (Present::HOP_SHIFT + i as u32)) {
            headers.remove(name);
        }
    }
    if let Some(proto) = upgrade_to {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(header::UPGRADE, proto);
    }
}

/// Whether `Connection` is the single value `keep-alive` (most upstream answers): it names
/// only a hop-by-hop header, removed anyway, so its tokens need no parsing.
fn only_keep_alive(headers: &HeaderMap) -> bool {
    let mut values = headers.get_all(header::CONNECTION).iter();
    matches!((values.next(), values.next()), (Some(v), None) if v.as_bytes().eq_ignore_ascii_case(b"keep-alive"))
}

/// Whether a `Connection` token names a hop-by-hop header (`keep-alive` and `upgrade`, the
/// usual ones, among them), which is removed anyway: no lookup for those.
fn names_hop_by_hop(token: &str) -> bool {
    HOP_BY_HOP
        .iter()
        .any(|h| token.eq_ignore_ascii_case(h.as_str()))
}

/// Whether `TE` lists `trailers`: the client (gRPC, typically) accepts trailer fields. TE
/// is hop-by-hop, so the proxy says it again itself on the next hop; it forwards trailers.
pub fn accepts_trailers(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::TE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| {
            t.split(';')
                .next()
                .is_some_and(|t| t.trim().eq_ignore_ascii_case("trailers"))
        })
}

/// Appends the client address to `x-forwarded-for` (keeping what earlier proxies wrote) and
/// sets `x-forwarded-proto` and `x-forwarded-host`.
pub fn set_forwarded(
    headers: &mut HeaderMap,
    present: Present,
    client: IpAddr,
    proto: &'static str,
    host: Option<&HeaderValue>,
) {
    let prior: Vec<&[u8]> = if present.has(Present::X_FORWARDED_FOR) {
        headers
            .get_all(&X_FORWARDED_FOR)
            .iter()
            .map(HeaderValue::as_bytes)
            .collect()
    } else {
        Vec::new()
    };
    // The address is written into a stack buffer, not a String: the header's own copy is
    // the only allocation (a String cost one more and a reallocation).
    let mut text = [0u8; IP_TEXT_MAX];
    let address = ip_text(client, &mut text);
    let value = if prior.is_empty() {
        HeaderValue::from_bytes(address)
    } else {
        let mut joined = prior.join(&b", "[..]);
        joined.extend_from_slice(b", ");
        joined.extend_from_slice(address);
        HeaderValue::from_bytes(&joined)
    };
    if let Ok(v) = value {
        headers.insert(X_FORWARDED_FOR, v);
    }
    headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static(proto));
    match host {
        Some(h) => {
            headers.insert(X_FORWARDED_HOST, h.clone());
        }
        None if present.has(Present::X_FORWARDED_HOST) => {
            headers.remove(X_FORWARDED_HOST);
        }
        None => {}
    }
}

/// Room for the text of any IP address (the longest form, `ffff:…:ffff:255.255.255.255`,
/// is 45 bytes; std writes at most 39).
pub(crate) const IP_TEXT_MAX: usize = 45;

/// `ip` as text (its `Display` form), written into `buf`. IPv4, the usual case, is written
/// digit by digit: the formatting machinery cost a few hundred instructions per request.
pub(crate) fn ip_text(ip: IpAddr, buf: &mut [u8; IP_TEXT_MAX]) -> &[u8] {
    use std::io::Write;
    if let IpAddr::V4(v4) = ip {
        let mut len = 0;
        for (i, octet) in v4.octets().into_iter().enumerate() {
            if i > 0 {
                buf[len] = b'.';
                len += 1;
            }
            if octet >= 100 {
                buf[len] = b'0' + octet / 100;
                len += 1;
            }
            if octet >= 10 {
                buf[len] = b'0' + octet / 10 % 10;
                len += 1;
            }
            buf[len] = b'0' + octet % 10;
            len += 1;
        }
        return &buf[..len];
    }
    let mut rest = &mut buf[..];
    // Cannot fail: every address fits.
    let _ = write!(rest, "{ip}");
    let len = IP_TEXT_MAX - rest.len();
    &buf[..len]
}

/// Whether `via` already names this proxy (`1.1 NAME`, `HTTP/1.1 NAME (comment)`).
pub fn via_has(headers: &HeaderMap, name: &str) -> bool {
    headers
        .get_all(header::VIA)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|entry| entry.split_whitespace().nth(1))
        .any(|by| by.eq_ignore_ascii_case(name))
}

/// Appends `1.1 NAME` to `via`.
pub fn append_via(headers: &mut HeaderMap, via: &HeaderValue) {
    headers.append(header::VIA, via.clone());
}

pub const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
pub const TRACESTATE: HeaderName = HeaderName::from_static("tracestate");

/// Whether the request carries one W3C `traceparent` the proxy can pass on:
/// `00-<32 hex trace id, not all zero>-<16 hex parent id, not all zero>-<2 hex flags>`.
pub fn valid_traceparent(headers: &HeaderMap) -> bool {
    let mut values = headers.get_all(&TRACEPARENT).iter();
    let (Some(v), None) = (values.next(), values.next()) else {
        return false;
    };
    let b = v.as_bytes();
    let hex = |s: &[u8]| {
        s.iter()
            .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(c))
    };
    let nonzero = |s: &[u8]| s.iter().any(|&c| c != b'0');
    b.len() == 55
        && &b[..3] == b"00-"
        && b[35] == b'-'
        && b[52] == b'-'
        && hex(&b[3..35])
        && nonzero(&b[3..35])
        && hex(&b[36..52])
        && nonzero(&b[36..52])
        && hex(&b[53..55])
}

/// A new sampled trace: `00-<random trace id>-<random parent id>-01`. The proxy starts the
/// trace so the primary and the shadow legs of a request share it.
pub fn new_traceparent() -> HeaderValue {
    let mut tp = *b"00-00000000000000000000000000000000-0000000000000000-01";
    hex(&mut tp[3..19], fastrand::u64(1..));
    hex(&mut tp[19..35], fastrand::u64(..));
    hex(&mut tp[36..52], fastrand::u64(1..));
    HeaderValue::from_bytes(&tp).unwrap_or(HeaderValue::from_static(
        "00-00000000000000000000000000000001-0000000000000001-01",
    ))
}

/// Writes `v` as 16 lower-case hex digits into `out` (no allocation): two digits per byte
/// from a table, most significant first.
fn hex(out: &mut [u8], v: u64) {
    const PAIRS: [[u8; 2]; 256] = {
        const DIGITS: &[u8; 16] = b"0123456789abcdef";
        let mut t = [[0u8; 2]; 256];
        let mut i = 0;
        while i < 256 {
            t[i] = [DIGITS[i >> 4], DIGITS[i & 0xf]];
            i += 1;
        }
        t
    };
    for (pair, byte) in out[..16].chunks_exact_mut(2).zip(v.to_be_bytes()) {
        pair.copy_from_slice(&PAIRS[usize::from(byte)]);
    }
}

/// The client's request id if it is 1-128 characters of `[A-Za-z0-9._-]`.
pub fn valid_request_id(headers: &HeaderMap) -> Option<&HeaderValue> {
    let mut values = headers.get_all(&X_REQUEST_ID).iter();
    let v = values.next()?;
    let ok = values.next().is_none()
        && (1..=128).contains(&v.len())
        && v.as_bytes()
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(b));
    ok.then_some(v)
}

/// Generates request ids: 32 hex characters, unique within the process (a counter through a
/// bijective mixer) and across processes (a random per-process half). No lock, no syscall.
pub struct RequestIds {
    seed: u64,
    counter: AtomicU64,
}

impl RequestIds {
    pub fn new() -> Self {
        RequestIds {
            seed: fastrand::u64(..),
            counter: AtomicU64::new(fastrand::u64(..)),
        }
    }

    pub fn next(&self) -> HeaderValue {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let mut id = [0u8; 32];
        hex(&mut id[..16], self.seed);
        hex(&mut id[16..], splitmix64(n));
        HeaderValue::from_bytes(&id).unwrap_or(HeaderValue::from_static("0"))
    }
}

impl Default for RequestIds {
    fn default() -> Self {
        Self::new()
    }
}

fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The request's host without port, lower-cased by the caller's comparison. The authority of
/// an absolute-form target (or HTTP/2's `:authority`) wins over `Host` (RFC 9112 §3.2.2), so
/// the proxy routes by what a front proxy routing by the target would; the request then goes
/// on with `Host` rewritten to match ([`set_host_from_target`]). `Err` when there are two
/// `Host` headers, one that is not a valid authority, or user info in either.
pub fn request_host<'a>(
    headers: &'a HeaderMap,
    uri: &'a http::Uri,
) -> Result<Option<&'a str>, &'static str> {
    let mut hosts = headers.get_all(header::HOST).iter();
    let host = hosts.next();
    if hosts.next().is_some() {
        return Err("more than one Host header");
    }
    let from_header = match host {
        // The usual Host, `name[:digits]`, is a valid authority as it stands: no parse.
        Some(value) if plain_host(value.as_bytes()).is_some() => {
            let len = plain_host(value.as_bytes()).unwrap_or(0);
            value.to_str().ok().map(|text| &text[..len])
        }
        Some(value) => {
            let text = value.to_str().map_err(|_| "Host header is not ASCII")?;
            let authority: http::uri::Authority = text
                .parse()
                .map_err(|_| "Host header is not a valid host[:port]")?;
            if authority.as_str().contains('@') {
                return Err("Host header must not carry user info");
            }
            // `authority.host()` borrows the parsed value; return the same span of the text.
            let host_len = authority.host().len();
            Some(&text[..host_len])
        }
        None => None,
    };
    match uri.authority() {
        Some(a) if a.as_str().contains('@') => Err("the request target must not carry user info"),
        Some(_) => Ok(uri.host()),
        None => Ok(from_header),
    }
}

/// The length of the host part when `value` is `name[:port]` made of letters, digits, `-` and
/// `.` only (a port of 1-5 digits): such a value is a valid authority with no user info.
#[inline]
fn plain_host(value: &[u8]) -> Option<usize> {
    // One pass: name bytes up to the first `:`, then digits only.
    let mut host_len = None;
    for (i, &b) in value.iter().enumerate() {
        match host_len {
            None if b.is_ascii_alphanumeric() || b == b'-' || b == b'.' => {}
            None if b == b':' && i > 0 => host_len = Some(i),
            Some(_) if b.is_ascii_digit() => {}
            _ => return None,
        }
    }
    match host_len {
        None => (!value.is_empty()).then_some(value.len()),
        Some(len) => (2..=6).contains(&(value.len() - len)).then_some(len),
    }
}

/// Makes `Host` name the target's authority when the request carried one (absolute-form, or
/// HTTP/2's `:authority`): a proxy that forwards such a request must not pass on a `Host`
/// that disagrees with where it routed (RFC 9112 §3.2.2).
pub fn set_host_from_target(headers: &mut HeaderMap, uri: &http::Uri) {
    if let Some(a) = uri.authority() {
        if let Ok(v) = HeaderValue::from_str(a.as_str()) {
            headers.insert(header::HOST, v);
        }
    }
}

/// Whether a path contains `.` or `..` segments, literally or percent-encoded: the proxy
/// would route one path while the backend resolves another, so such requests get 400.
pub fn has_dot_segments(path: &str) -> bool {
    // Without a `.` or a `%` there is no dot segment: one scan, no splitting.
    if !path.bytes().any(|b| b == b'.' || b == b'%') {
        return false;
    }
    path.split('/').any(|seg| {
        let s = seg.as_bytes();
        let is_dot = |i: usize| -> Option<usize> {
            match s.get(i)? {
                b'.' => Some(i + 1),
                b'%' if s.get(i + 1) == Some(&b'2')
                    && matches!(s.get(i + 2), Some(b'e' | b'E')) =>
                {
                    Some(i + 3)
                }
                _ => None,
            }
        };
        match is_dot(0) {
            Some(end) if end == s.len() => true,
            Some(end) => is_dot(end) == Some(s.len()),
            None => false,
        }
    })
}

/// The value of cookie `name` in the request's `Cookie` headers.
pub fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

/// Removes cookie `name` from the `Cookie` header(s), keeping the others; a header left
/// empty is dropped.
pub fn remove_cookie(headers: &mut HeaderMap, name: &str) {
    if cookie(headers, name).is_none() {
        return;
    }
    let kept: Vec<String> = headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .map(str::trim)
        .filter(|pair| !pair.is_empty() && pair.split_once('=').is_none_or(|(k, _)| k != name))
        .map(str::to_string)
        .collect();
    headers.remove(header::COOKIE);
    if let Ok(v) = HeaderValue::from_str(&kept.join("; ")) {
        if !kept.is_empty() {
            headers.insert(header::COOKIE, v);
        }
    }
}

/// The client's address: the TCP peer, unless the peer is a trusted proxy; then
/// `X-Forwarded-For` is walked from the right, skipping trusted hops, and the first address
/// not trusted is the client (as nginx's realip and Traefik's ipStrategy do). An entry that is
/// not an address ends the walk at the last trusted hop; a chain of trusted hops only gives
/// its leftmost.
pub fn client_address(headers: &HeaderMap, peer: IpAddr, trusted: &[ipnet::IpNet]) -> IpAddr {
    let is_trusted = |ip: &IpAddr| trusted.iter().any(|n| n.contains(ip));
    if trusted.is_empty() || !is_trusted(&peer) {
        return peer;
    }
    let mut client = peer;
    // A value that is not text reads as "", which is no address and ends the walk.
    let values: Vec<&str> = headers
        .get_all(X_FORWARDED_FOR)
        .iter()
        .map(|v| v.to_str().unwrap_or(""))
        .collect();
    let hops = values
        .iter()
        .rev()
        .flat_map(|v| v.rsplit(',').map(str::trim));
    for hop in hops {
        let Some(ip) = parse_hop(hop) else {
            return client;
        };
        client = ip;
        if !is_trusted(&ip) {
            return ip;
        }
    }
    client
}

/// One `X-Forwarded-For` entry: an address, possibly bracketed or with a port.
fn parse_hop(hop: &str) -> Option<IpAddr> {
    if let Ok(ip) = hop.parse::<IpAddr>() {
        return Some(ip);
    }
    if let Ok(sock) = hop.parse::<std::net::SocketAddr>() {
        return Some(sock.ip());
    }
    hop.strip_prefix('[')?.strip_suffix(']')?.parse().ok()
}

#[cfg(test)]
mod tests;

//! Hostile bytes, as a regression suite fast enough for every CI run: request smuggling
//! vectors (Content-Length against Transfer-Encoding, obfuscated Transfer-Encoding, obs-fold,
//! control characters, broken chunks, framing headers in trailers), Host confusion
//! (duplicate Host, absolute-form targets), upgrades (h2c, an unasked 101, opt-in protocols,
//! WebSocket), hostile upstream answers and a trickled request body.
//!
//! Each vector checks what the client got (status line, the JSON error contract where the
//! proxy itself refuses), what the upstream got, parsed strictly by a raw recording backend
//! (no second, smuggled request; forwarded framing consistent with the body forwarded), and
//! that a fresh request on a new connection is still served.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a panic is a failure report

mod support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// How long a client waits for the proxy to answer and close. Every vector either closes the
/// connection itself or sends `connection: close`; idle keep-alive connections are closed
/// after the `header_read_timeout` of [`SERVER`].
const LIMIT: Duration = Duration::from_secs(5);

const SERVER: &str = "[server]\nlisten = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\ndrain_timeout = \"2s\"\nheader_read_timeout = \"1s\"\n\n";

const OK: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";

/// A request the client hopes to sneak past the proxy inside another one's body.
const SMUGGLED: &str = "GET /smuggled HTTP/1.1\r\nhost: x\r\n\r\n";

// ---------------------------------------------------------------------------------------
// A strict HTTP/1.1 message parser, for what the upstream received and what the client got.
// ---------------------------------------------------------------------------------------

/// One message: header names lower-cased but otherwise as sent (a ` transfer-encoding` with a
/// leading space stays visibly odd), values trimmed, the body decoded.
#[derive(Clone, Default)]
struct Msg {
    start: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    trailers: Vec<(String, String)>,
    raw: Vec<u8>,
}

impl Msg {
    fn all(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
            .collect()
    }

    fn one(&self, name: &str) -> Option<&str> {
        let all = self.all(name);
        assert!(all.len() <= 1, "two {name} headers: {self:?}");
        all.first().copied()
    }

    fn status(&self) -> u16 {
        self.start
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0)
    }

    /// The request target of a request line.
    fn target(&self) -> &str {
        self.start.split(' ').nth(1).unwrap_or_default()
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", String::from_utf8_lossy(&self.body)))
    }

    fn raw_text(&self) -> String {
        String::from_utf8_lossy(&self.raw).into_owned()
    }
}

impl std::fmt::Debug for Msg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", self.raw_text())
    }
}

enum Parsed {
    Done(Msg),
    Partial,
    Invalid(String),
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Parses the message at the start of `buf`. Framing as a careful recipient does it:
/// Transfer-Encoding (chunked last) wins over Content-Length; differing Content-Lengths,
/// a request Transfer-Encoding that does not end in chunked and a broken chunk are invalid.
/// A response without either runs to the end of the connection (`eof`).
fn parse(buf: &[u8], response: bool, eof: bool) -> Parsed {
    let Some(head_end) = find(buf, b"\r\n\r\n") else {
        return Parsed::Partial;
    };
    let head = String::from_utf8_lossy(&buf[..head_end]);
    let mut lines = head.split("\r\n");
    let mut msg = Msg {
        start: lines.next().unwrap_or_default().to_string(),
        ..Msg::default()
    };
    for line in lines {
        let Some((n, v)) = line.split_once(':') else {
            return Parsed::Invalid(format!("header line without a colon: {line:?}"));
        };
        msg.headers.push((
            n.to_ascii_lowercase(),
            v.trim_matches([' ', '\t']).to_string(),
        ));
    }
    let rest = &buf[head_end + 4..];
    let status = if response { msg.status() } else { 0 };
    let te = msg.all("transfer-encoding");
    let cl = msg.all("content-length");
    let mut chunked = false;
    let body_end = if response && (status / 100 == 1 || status == 204 || status == 304) {
        0
    } else if let Some(last) = te.last() {
        let last = last.rsplit(',').next().unwrap_or_default().trim();
        if last.eq_ignore_ascii_case("chunked") {
            match dechunk(rest) {
                Ok(Some((end, body, trailers))) => {
                    chunked = true;
                    msg.body = body;
                    msg.trailers = trailers;
                    end
                }
                Ok(None) => return Parsed::Partial,
                Err(e) => return Parsed::Invalid(e),
            }
        } else if response {
            if !eof {
                return Parsed::Partial;
            }
            rest.len()
        } else {
            return Parsed::Invalid(format!("request transfer-encoding {te:?}"));
        }
    } else if let Some(first) = cl.first() {
        if cl.iter().any(|v| v != first) {
            return Parsed::Invalid(format!("content-lengths {cl:?}"));
        }
        let Ok(n) = first.parse::<usize>() else {
            return Parsed::Invalid(format!("content-length {first:?}"));
        };
        if rest.len() < n {
            return Parsed::Partial;
        }
        n
    } else if response {
        if !eof {
            return Parsed::Partial;
        }
        rest.len()
    } else {
        0
    };
    if !chunked {
        msg.body = rest[..body_end].to_vec();
    }
    msg.raw = buf[..head_end + 4 + body_end].to_vec();
    Parsed::Done(msg)
}

type Dechunked = (usize, Vec<u8>, Vec<(String, String)>);

/// Decodes a chunked body: where it ends in `rest`, the data, the trailers.
fn dechunk(rest: &[u8]) -> Result<Option<Dechunked>, String> {
    let mut pos = 0;
    let mut body = Vec::new();
    loop {
        let Some(eol) = find(&rest[pos..], b"\r\n") else {
            return Ok(None);
        };
        let line = &rest[pos..pos + eol];
        let size_text =
            String::from_utf8_lossy(line.split(|&b| b == b';').next().unwrap_or_default())
                .trim()
                .to_string();
        let size = usize::from_str_radix(&size_text, 16)
            .map_err(|e| format!("chunk size {size_text:?}: {e}"))?;
        pos += eol + 2;
        if size == 0 {
            let mut trailers = Vec::new();
            loop {
                let Some(eol) = find(&rest[pos..], b"\r\n") else {
                    return Ok(None);
                };
                let line = String::from_utf8_lossy(&rest[pos..pos + eol]).into_owned();
                pos += eol + 2;
                if line.is_empty() {
                    return Ok(Some((pos, body, trailers)));
                }
                let (n, v) = line
                    .split_once(':')
                    .ok_or_else(|| format!("trailer line {line:?}"))?;
                trailers.push((n.to_ascii_lowercase(), v.trim().to_string()));
            }
        }
        if rest.len() < pos + size + 2 {
            return Ok(None);
        }
        body.extend_from_slice(&rest[pos..pos + size]);
        if &rest[pos + size..pos + size + 2] != b"\r\n" {
            return Err("chunk data not followed by CRLF".into());
        }
        pos += size + 2;
    }
}

/// Every framing header a forwarded request carries agrees with the body forwarded: never
/// both Content-Length and Transfer-Encoding, at most one of each, `chunked` only.
fn assert_consistent_framing(m: &Msg) {
    let te = m.all("transfer-encoding");
    let cl = m.all("content-length");
    assert!(
        te.is_empty() || cl.is_empty(),
        "upstream got both framings: {}",
        m.raw_text()
    );
    assert!(te.len() <= 1 && cl.len() <= 1, "{}", m.raw_text());
    if let Some(te) = te.first() {
        assert_eq!(*te, "chunked", "{}", m.raw_text());
    }
    if let Some(cl) = cl.first() {
        assert_eq!(
            cl.parse::<usize>().ok(),
            Some(m.body.len()),
            "{}",
            m.raw_text()
        );
    }
    for (name, value) in &m.trailers {
        assert!(
            !matches!(
                name.as_str(),
                "content-length" | "transfer-encoding" | "host" | "trailer"
            ),
            "framing field {name}: {value} reached the upstream as a trailer: {}",
            m.raw_text()
        );
    }
}

// ---------------------------------------------------------------------------------------
// The recording backend.
// ---------------------------------------------------------------------------------------

/// What the backend does after answering a request.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Then {
    /// Reads the next request on the connection.
    KeepAlive,
    /// The connection is a tunnel now: echoes every byte.
    Echo,
}

#[derive(Clone)]
struct Answer {
    bytes: Vec<u8>,
    then: Then,
}

impl Answer {
    fn ok() -> Answer {
        Answer::raw(OK)
    }
    fn raw(bytes: &[u8]) -> Answer {
        Answer {
            bytes: bytes.to_vec(),
            then: Then::KeepAlive,
        }
    }
}

/// One request as it arrived on upstream connection `conn` (numbered in accept order), byte
/// for byte, parsed (`msg`); or, when the connection ended mid-message or the bytes could not
/// be parsed, just the raw bytes and why.
#[derive(Clone)]
struct Recorded {
    conn: usize,
    raw: Vec<u8>,
    msg: Option<Msg>,
    /// Why the bytes are not a message, when they are not.
    invalid: Option<String>,
}

impl Recorded {
    fn start(&self) -> String {
        match &self.msg {
            Some(m) => m.start.clone(),
            None => format!(
                "({}) {}",
                self.invalid.as_deref().unwrap_or("incomplete"),
                String::from_utf8_lossy(&self.raw)
            ),
        }
    }
}

impl std::fmt::Debug for Recorded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let text = String::from_utf8_lossy(&self.raw);
        match &self.invalid {
            None => write!(f, "conn {}: {text:?}", self.conn),
            Some(why) => write!(f, "conn {} ({why}): {text:?}", self.conn),
        }
    }
}

type Answerer = Arc<dyn Fn(&Msg) -> Answer + Send + Sync>;

/// A raw TCP backend that records every request byte for byte and answers each with what
/// its answerer says (by default `200 ok` with `content-length: 2`).
struct Backend {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<Recorded>>>,
    accepted: Arc<AtomicUsize>,
    /// Open connections holding part of a message, or that have not delivered one yet.
    unsettled: Arc<AtomicUsize>,
    accept: tokio::task::JoinHandle<()>,
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

impl Backend {
    async fn ok() -> Backend {
        Backend::answering(|_| Answer::ok()).await
    }

    async fn answering(f: impl Fn(&Msg) -> Answer + Send + Sync + 'static) -> Backend {
        let (l, addr) = listener().await;
        let seen = Arc::new(Mutex::new(Vec::new()));
        let accepted = Arc::new(AtomicUsize::new(0));
        let unsettled = Arc::new(AtomicUsize::new(0));
        let answer: Answerer = Arc::new(f);
        let accept = tokio::spawn({
            let (seen, accepted, unsettled) = (seen.clone(), accepted.clone(), unsettled.clone());
            async move {
                while let Ok((s, _)) = l.accept().await {
                    let conn = accepted.fetch_add(1, Ordering::SeqCst);
                    unsettled.fetch_add(1, Ordering::SeqCst);
                    tokio::spawn(serve_conn(
                        s,
                        conn,
                        seen.clone(),
                        unsettled.clone(),
                        answer.clone(),
                    ));
                }
            }
        });
        Backend {
            addr,
            seen,
            accepted,
            unsettled,
            accept,
        }
    }

    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    /// Forgets what was recorded so far.
    fn clear(&self) {
        self.seen.lock().unwrap().clear();
    }

    /// What was recorded once every open connection is between messages: an aborted
    /// upstream request has been seen to its end (the proxy closed the connection), and no
    /// connection the proxy opened still waits for its first request.
    async fn settled(&self) -> Vec<Recorded> {
        let unsettled = self.unsettled.clone();
        eventually(LIMIT, move || {
            let settled = unsettled.load(Ordering::SeqCst) == 0;
            async move { settled.then_some(()) }
        })
        .await;
        self.seen.lock().unwrap().clone()
    }
}

async fn serve_conn(
    mut s: TcpStream,
    conn: usize,
    seen: Arc<Mutex<Vec<Recorded>>>,
    unsettled: Arc<AtomicUsize>,
    answer: Answerer,
) {
    let mut buf = Vec::new();
    let mut settled = false;
    let set = |settled: &mut bool, now: bool| {
        if *settled != now {
            if now {
                unsettled.fetch_sub(1, Ordering::SeqCst);
            } else {
                unsettled.fetch_add(1, Ordering::SeqCst);
            }
            *settled = now;
        }
    };
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        loop {
            match parse(&buf, false, false) {
                Parsed::Done(msg) => {
                    buf.drain(..msg.raw.len());
                    let a = answer(&msg);
                    seen.lock().unwrap().push(Recorded {
                        conn,
                        raw: msg.raw.clone(),
                        msg: Some(msg),
                        invalid: None,
                    });
                    if s.write_all(&a.bytes).await.is_err() {
                        set(&mut settled, true);
                        return;
                    }
                    if a.then == Then::Echo {
                        set(&mut settled, true);
                        let _ = s.write_all(&buf).await;
                        loop {
                            match s.read(&mut chunk).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => {
                                    if s.write_all(&chunk[..n]).await.is_err() {
                                        return;
                                    }
                                }
                            }
                        }
                    }
                    set(&mut settled, buf.is_empty());
                }
                Parsed::Partial => break,
                Parsed::Invalid(why) => {
                    seen.lock().unwrap().push(Recorded {
                        conn,
                        raw: std::mem::take(&mut buf),
                        msg: None,
                        invalid: Some(why),
                    });
                    set(&mut settled, true);
                    return;
                }
            }
        }
        if !buf.is_empty() {
            set(&mut settled, false);
        }
        match s.read(&mut chunk).await {
            Ok(0) | Err(_) => {
                if !buf.is_empty() {
                    seen.lock().unwrap().push(Recorded {
                        conn,
                        raw: buf,
                        msg: None,
                        invalid: Some("the connection ended mid-message".into()),
                    });
                }
                set(&mut settled, true);
                return;
            }
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

// ---------------------------------------------------------------------------------------
// The client side.
// ---------------------------------------------------------------------------------------

/// What a client got on one connection until the proxy closed it (or `LIMIT` passed).
struct Got {
    raw: Vec<u8>,
    responses: Vec<Msg>,
    closed: bool,
}

impl Got {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.raw).into_owned()
    }

    fn statuses(&self) -> Vec<u16> {
        self.responses.iter().map(Msg::status).collect()
    }

    /// The only response.
    fn only(&self) -> &Msg {
        assert_eq!(
            self.responses.len(),
            1,
            "expected exactly one response, got: {:?}",
            self.text()
        );
        &self.responses[0]
    }
}

/// Writes `bytes` on a new connection (reading concurrently, so an early answer is not lost
/// to a reset) and reads until the proxy closes the connection.
async fn exchange(addr: SocketAddr, bytes: &[u8]) -> Got {
    let s = TcpStream::connect(addr).await.unwrap();
    let (mut r, mut w) = s.into_split();
    let bytes = bytes.to_vec();
    let writer = tokio::spawn(async move {
        let _ = w.write_all(&bytes).await;
        w
    });
    let mut raw = Vec::new();
    let closed = tokio::time::timeout(LIMIT, async {
        let mut buf = [0u8; 16384];
        loop {
            match r.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => raw.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await
    .is_ok();
    drop(writer);
    let mut responses = Vec::new();
    let mut pos = 0;
    while pos < raw.len() {
        match parse(&raw[pos..], true, true) {
            Parsed::Done(m) => {
                pos += m.raw.len();
                responses.push(m);
            }
            _ => break,
        }
    }
    Got {
        raw,
        responses,
        closed,
    }
}

/// A 400: the proxy's JSON contract when it has a body, or (`json` false) the HTTP parser's
/// bare 400 for framing it cannot read.
/// `bytes` get a JSON 400, nothing reaches the backend, and a fresh request is served.
async fn refused_untouched(proxy: &Proxy, backend: &Backend, name: &str, bytes: &[u8]) {
    backend.clear();
    let got = exchange(proxy.addr, bytes).await;
    assert_bad_request(&got, true, name);
    let seen = backend.settled().await;
    assert!(seen.is_empty(), "{name}: {seen:?}");
    assert_fresh_request_served(proxy, backend, name).await;
}

fn assert_bad_request(got: &Got, json: bool, ctx: &str) {
    let r = got.only();
    assert!(
        r.start.starts_with("HTTP/1.1 400 "),
        "{ctx}: expected 400, got {:?}",
        got.text()
    );
    if json || !r.body.is_empty() {
        assert_error_contract(r, "bad_request", ctx);
    }
}

/// The JSON error contract: `{"error", "code", "request_id"}`, the id also in the headers.
fn assert_error_contract(r: &Msg, code: &str, ctx: &str) {
    let v = r.json();
    assert_eq!(v["code"], code, "{ctx}: {v}");
    assert!(
        v["error"].as_str().is_some_and(|e| !e.is_empty()),
        "{ctx}: {v}"
    );
    let id = v["request_id"].as_str().unwrap_or_default();
    assert!(!id.is_empty(), "{ctx}: {v}");
    assert_eq!(r.one("x-request-id"), Some(id), "{ctx}");
    assert_eq!(r.one("content-type"), Some("application/json"), "{ctx}");
}

/// A normal request on a new connection is served 200 by `backend`, which records it.
async fn assert_fresh_request_served(proxy: &Proxy, backend: &Backend, ctx: &str) {
    let got = exchange(
        proxy.addr,
        b"GET /after HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(
        got.statuses(),
        [200],
        "{ctx}: follow-up got {:?}",
        got.text()
    );
    assert_eq!(got.only().body, b"ok", "{ctx}");
    let seen = backend.settled().await;
    assert!(
        seen.iter().any(|r| r.start() == "GET /after HTTP/1.1"),
        "{ctx}: the follow-up did not reach the backend: {seen:?}"
    );
}

/// support's `proxy_to` with [`SERVER`]'s short `header_read_timeout`.
async fn proxy_to(backend: &Backend) -> Proxy {
    Proxy::start(&format!("{SERVER}{}", legacy_route(backend.addr, "/"))).await
}

/// What a smuggling vector must come to.
#[derive(Debug, Clone, Copy)]
enum Expect {
    /// 400 (the parser's bare one, or the JSON contract) and no complete request upstream.
    Refused,
    /// The same, and the 400 is the proxy's own, with the JSON contract.
    RefusedWithJson,
    /// Served: exactly one request upstream, framed consistently, carrying this body.
    Forwarded(&'static [u8]),
}

/// Runs one request-side vector (with `backend` cleared first) and checks the three
/// things: the client's answer, the upstream's bytes, and a fresh request afterwards.
async fn vector(proxy: &Proxy, backend: &Backend, name: &str, bytes: &[u8], expect: Expect) {
    backend.clear();
    let got = exchange(proxy.addr, bytes).await;
    let seen = backend.settled().await;
    let ctx = format!("{name} ({:?})", String::from_utf8_lossy(bytes));
    for r in &seen {
        if let Some(m) = &r.msg {
            assert_ne!(
                m.target(),
                "/smuggled",
                "{ctx}: a smuggled request reached the upstream: {seen:?}"
            );
        }
    }
    assert!(!got.text().contains("/smuggled"), "{ctx}: {:?}", got.text());
    match expect {
        Expect::Refused | Expect::RefusedWithJson => {
            assert_bad_request(&got, matches!(expect, Expect::RefusedWithJson), &ctx);
            assert!(
                seen.iter().all(|r| r.msg.is_none()),
                "{ctx}: a refused request reached the upstream whole: {seen:?}"
            );
        }
        Expect::Forwarded(body) => {
            let r = got.only();
            assert_eq!(r.status(), 200, "{ctx}: {:?}", got.text());
            assert_eq!(r.body, b"ok", "{ctx}");
            assert_eq!(seen.len(), 1, "{ctx}: {seen:?}");
            let m = seen[0].msg.as_ref().expect("a whole request");
            assert!(m.start.starts_with("POST /a HTTP/1.1"), "{ctx}: {m:?}");
            assert_consistent_framing(m);
            assert_eq!(
                String::from_utf8_lossy(&m.body),
                String::from_utf8_lossy(body),
                "{ctx}: body forwarded"
            );
        }
    }
    assert!(got.closed, "{ctx}: the proxy kept the connection open");
    assert_fresh_request_served(proxy, backend, &ctx).await;
}

/// `POST /a` with `headers` (each ending in CRLF) and `body` as sent.
fn post(headers: &str, body: &str) -> Vec<u8> {
    format!("POST /a HTTP/1.1\r\nhost: x\r\n{headers}\r\n{body}").into_bytes()
}

/// Front proxy by Transfer-Encoding, back by Content-Length ("TE.CL"): the chunk holds a
/// whole request that a Content-Length reader would take for the next one.
fn te_cl_body() -> String {
    format!("{:x}\r\n{SMUGGLED}\r\n0\r\n\r\n", SMUGGLED.len())
}

/// The Content-Length that covers only the chunk-size line of [`te_cl_body`].
fn te_cl_length() -> usize {
    format!("{:x}\r\n", SMUGGLED.len()).len()
}

/// Front proxy by Content-Length, back by Transfer-Encoding ("CL.TE"): the empty chunked
/// body ends early and the rest is a request of its own.
fn cl_te_body() -> String {
    format!("0\r\n\r\n{SMUGGLED}")
}

// ---------------------------------------------------------------------------------------
// Request framing.
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn content_length_with_transfer_encoding_in_either_order_cannot_smuggle() {
    let backend = Backend::ok().await;
    let proxy = proxy_to(&backend).await;
    let te_cl = te_cl_body();
    let cl_te = cl_te_body();
    let cases = [
        (
            "TE.CL, content-length first",
            post(
                &format!(
                    "content-length: {}\r\ntransfer-encoding: chunked\r\n",
                    te_cl_length()
                ),
                &te_cl,
            ),
            SMUGGLED.as_bytes(),
        ),
        (
            "TE.CL, transfer-encoding first",
            post(
                &format!(
                    "transfer-encoding: chunked\r\ncontent-length: {}\r\n",
                    te_cl_length()
                ),
                &te_cl,
            ),
            SMUGGLED.as_bytes(),
        ),
        (
            "CL.TE, content-length first",
            post(
                &format!(
                    "content-length: {}\r\ntransfer-encoding: chunked\r\n",
                    cl_te.len()
                ),
                &cl_te,
            ),
            b"".as_slice(),
        ),
        (
            "CL.TE, transfer-encoding first",
            post(
                &format!(
                    "transfer-encoding: chunked\r\ncontent-length: {}\r\n",
                    cl_te.len()
                ),
                &cl_te,
            ),
            b"".as_slice(),
        ),
    ];
    // Transfer-Encoding wins (RFC 9112 §6.3): the body is the chunked one, the
    // Content-Length is dropped, and the connection closes after the answer, so whatever
    // followed the chunked body is never read as a request.
    for (name, bytes, body) in cases {
        vector(&proxy, &backend, name, &bytes, Expect::Forwarded(body)).await;
    }
}

#[tokio::test]
async fn two_different_content_lengths_are_refused() {
    let backend = Backend::ok().await;
    let proxy = proxy_to(&backend).await;
    let body = format!("hello{SMUGGLED}");
    let n = body.len();
    for (name, headers) in [
        (
            "two lines, short first",
            format!("content-length: 5\r\ncontent-length: {n}\r\n"),
        ),
        (
            "two lines, long first",
            format!("content-length: {n}\r\ncontent-length: 5\r\n"),
        ),
        ("one line, a list", format!("content-length: 5, {n}\r\n")),
        ("sign", "content-length: +5\r\n".to_string()),
    ] {
        vector(
            &proxy,
            &backend,
            name,
            &post(&headers, &body),
            Expect::Refused,
        )
        .await;
    }
}

#[tokio::test]
async fn obfuscated_transfer_encodings_are_refused_or_read_as_chunked() {
    let backend = Backend::ok().await;
    let proxy = proxy_to(&backend).await;
    let te_cl = te_cl_body();
    let cl_te = cl_te_body();
    let smuggled = SMUGGLED.as_bytes();
    // (name, Transfer-Encoding line(s), what must happen with a TE.CL body).
    let cases: [(&str, &str, Expect); 9] = [
        (
            "chunked twice",
            "transfer-encoding: chunked, chunked\r\n",
            Expect::Forwarded(smuggled),
        ),
        (
            "xchunked",
            "transfer-encoding: xchunked\r\n",
            Expect::Refused,
        ),
        (
            "leading space",
            "transfer-encoding:  chunked\r\n",
            Expect::Forwarded(smuggled),
        ),
        (
            "leading tab and space",
            "transfer-encoding:\t chunked\r\n",
            Expect::Forwarded(smuggled),
        ),
        (
            "tab instead of space",
            "transfer-encoding:\tchunked\r\n",
            Expect::Forwarded(smuggled),
        ),
        (
            "space before the colon",
            "transfer-encoding : chunked\r\n",
            Expect::Refused,
        ),
        (
            "chunked then identity",
            "transfer-encoding: chunked\r\ntransfer-encoding: identity\r\n",
            Expect::Refused,
        ),
        (
            "chunked not last",
            "transfer-encoding: chunked, identity\r\n",
            Expect::Refused,
        ),
        (
            "trailing garbage",
            "transfer-encoding: chunked\x0b\r\n",
            Expect::Refused,
        ),
    ];
    for (name, te, expect) in cases {
        let headers = format!("content-length: {}\r\n{te}", te_cl_length());
        vector(
            &proxy,
            &backend,
            &format!("TE.CL, {name}"),
            &post(&headers, &te_cl),
            expect,
        )
        .await;
        let headers = format!("content-length: {}\r\n{te}", cl_te.len());
        let expect = match expect {
            Expect::Forwarded(_) => Expect::Forwarded(b""),
            refused => refused,
        };
        vector(
            &proxy,
            &backend,
            &format!("CL.TE, {name}"),
            &post(&headers, &cl_te),
            expect,
        )
        .await;
    }
}

#[tokio::test]
async fn obs_fold_and_whitespace_before_headers_are_refused() {
    let backend = Backend::ok().await;
    let proxy = proxy_to(&backend).await;
    let te_cl = te_cl_body();
    let n = te_cl_length();
    for (name, bytes) in [
        (
            "space fold",
            b"GET /a HTTP/1.1\r\nhost: x\r\nx-a: a\r\n b\r\n\r\n".to_vec(),
        ),
        (
            "tab fold",
            b"GET /a HTTP/1.1\r\nhost: x\r\nx-a: a\r\n\tb\r\n\r\n".to_vec(),
        ),
        (
            "fold hiding transfer-encoding",
            post(
                &format!("content-length: {n}\r\nx-a: a\r\n transfer-encoding: chunked\r\n"),
                &te_cl,
            ),
        ),
        (
            "fold continuing transfer-encoding",
            post(
                &format!("content-length: {n}\r\ntransfer-encoding:\r\n chunked\r\n"),
                &te_cl,
            ),
        ),
        (
            "whitespace before the first header",
            format!(
                "POST /a HTTP/1.1\r\n transfer-encoding: chunked\r\nhost: x\r\ncontent-length: {n}\r\n\r\n{te_cl}"
            )
            .into_bytes(),
        ),
    ] {
        vector(&proxy, &backend, name, &bytes, Expect::Refused).await;
    }
}

#[tokio::test]
async fn control_characters_in_header_values_are_refused() {
    let backend = Backend::ok().await;
    let proxy = proxy_to(&backend).await;
    let te_cl = te_cl_body();
    let n = te_cl_length();
    for (name, bytes) in [
        (
            "bare CR",
            b"GET /a HTTP/1.1\r\nhost: x\r\nx-a: a\rb\r\n\r\n".to_vec(),
        ),
        (
            "bare CR hiding transfer-encoding",
            post(
                &format!("content-length: {n}\r\nx-a: a\rtransfer-encoding: chunked\r\n"),
                &te_cl,
            ),
        ),
        (
            "NUL",
            b"GET /a HTTP/1.1\r\nhost: x\r\nx-a: a\0b\r\n\r\n".to_vec(),
        ),
        (
            "NUL in transfer-encoding",
            post(
                &format!("content-length: {n}\r\ntransfer-encoding: chunked\0\r\n"),
                &te_cl,
            ),
        ),
    ] {
        vector(&proxy, &backend, name, &bytes, Expect::Refused).await;
    }
}

#[tokio::test]
async fn broken_chunks_are_refused_and_never_forwarded_whole() {
    let backend = Backend::ok().await;
    let proxy = proxy_to(&backend).await;
    let huge_extension = format!("5{}", ";a=b".repeat(16 * 1024));
    for size in [
        "zz",
        "-5",
        "ffffffffffffffffff",
        "0x5",
        "5 5",
        huge_extension.as_str(),
    ] {
        let bytes = post(
            "transfer-encoding: chunked\r\n",
            &format!("{size}\r\nhello\r\n0\r\n\r\n{SMUGGLED}"),
        );
        let name = format!("chunk size {:?}", &size[..size.len().min(16)]);
        // The head was fine, so the proxy answers, when reading the body fails.
        vector(&proxy, &backend, &name, &bytes, Expect::RefusedWithJson).await;
    }
}

#[tokio::test]
async fn http_1_0_with_transfer_encoding_is_refused() {
    let backend = Backend::ok().await;
    let proxy = proxy_to(&backend).await;
    let te_cl = te_cl_body();
    for (name, headers) in [
        ("alone", "transfer-encoding: chunked\r\n".to_string()),
        (
            "with content-length",
            format!(
                "content-length: {}\r\ntransfer-encoding: chunked\r\n",
                te_cl_length()
            ),
        ),
    ] {
        let bytes = format!("POST /a HTTP/1.0\r\nhost: x\r\n{headers}\r\n{te_cl}");
        vector(&proxy, &backend, name, bytes.as_bytes(), Expect::Refused).await;
    }
}

#[tokio::test]
async fn framing_fields_in_trailers_never_reach_the_upstream() {
    let backend = Backend::ok().await;
    let proxy = proxy_to(&backend).await;
    let bytes = b"POST /a HTTP/1.1\r\nhost: x\r\nte: trailers\r\ntransfer-encoding: chunked\r\ntrailer: content-length, transfer-encoding, host, x-trailer\r\nconnection: close\r\n\r\n5\r\nhello\r\n0\r\ncontent-length: 1000\r\ntransfer-encoding: identity\r\nhost: evil.example\r\nx-trailer: yes\r\n\r\n";
    let got = exchange(proxy.addr, bytes).await;
    assert_eq!(got.statuses(), [200], "{:?}", got.text());
    let seen = backend.settled().await;
    assert_eq!(seen.len(), 1, "{seen:?}");
    let m = seen[0].msg.as_ref().expect("a whole request");
    assert_consistent_framing(m);
    assert_eq!(m.body, b"hello");
    let raw = m.raw_text().to_ascii_lowercase();
    for leak in ["content-length: 1000", "identity", "evil.example"] {
        assert!(!raw.contains(leak), "{leak} reached the upstream: {raw:?}");
    }
    assert_eq!(m.one("host"), Some("x"));
    assert_fresh_request_served(&proxy, &backend, "trailers").await;
}

#[tokio::test]
// Once failed: `Trailer` was stripped as hop-by-hop (it is end-to-end, RFC 9110 §6.6.2), and
// hyper's HTTP/1.1 encoder only writes the trailer fields a message's `Trailer` declares.
async fn declared_trailers_pass_an_http1_hop_both_ways() {
    let backend = answering_hostile(
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ntrailer: x-t\r\n\r\n2\r\nok\r\n0\r\nx-t: 1\r\n\r\n",
    )
    .await;
    let proxy = proxy_to(&backend).await;
    let got = exchange(
        proxy.addr,
        b"POST /hostile HTTP/1.1\r\nhost: x\r\nte: trailers\r\ntransfer-encoding: chunked\r\ntrailer: x-trailer\r\nconnection: close\r\n\r\n5\r\nhello\r\n0\r\nx-trailer: yes\r\n\r\n",
    )
    .await;
    let seen = backend.settled().await;
    let m = seen[0].msg.as_ref().expect("a whole request");
    assert_eq!(m.body, b"hello");
    assert_eq!(
        m.trailers,
        [("x-trailer".to_string(), "yes".to_string())],
        "request trailers: {:?}",
        m.raw_text()
    );
    let r = got.only();
    assert_eq!(r.body, b"ok");
    assert_eq!(
        r.trailers,
        [("x-t".to_string(), "1".to_string())],
        "response trailers: {:?}",
        got.text()
    );
}

// ---------------------------------------------------------------------------------------
// Host confusion.
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn duplicate_host_headers_are_refused() {
    let backend = Backend::ok().await;
    let proxy = proxy_to(&backend).await;
    for (name, bytes) in [
        (
            "same value",
            b"GET /a HTTP/1.1\r\nhost: x\r\nhost: x\r\nconnection: close\r\n\r\n".as_slice(),
        ),
        (
            "different values",
            b"GET /a HTTP/1.1\r\nhost: good.example\r\nhost: evil.example\r\nconnection: close\r\n\r\n".as_slice(),
        ),
    ] {
        refused_untouched(&proxy, &backend, name, bytes).await;
    }
}

#[tokio::test]
async fn an_absolute_form_target_routes_by_its_authority_and_becomes_the_host() {
    let legacy = Backend::ok().await;
    let good = Backend::ok().await;
    let proxy = Proxy::start(&format!(
        "{SERVER}{}[backends.good]\nurl = \"http://{}\"\n\n[[routes]]\nprefix = \"/\"\nbackend = \"legacy\"\n\n[[routes]]\nprefix = \"/\"\nhost = \"good.example\"\nbackend = \"good\"\n",
        legacy_at(legacy.addr),
        good.addr
    ))
    .await;

    // Host says good.example, the target says evil.example: the target wins, both for
    // routing (the catch-all, not good's route) and for the Host the upstream sees.
    let got = exchange(
        proxy.addr,
        b"GET http://evil.example/x?q=1 HTTP/1.1\r\nhost: good.example\r\nconnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(got.statuses(), [200], "{:?}", got.text());
    let seen = legacy.settled().await;
    assert_eq!(seen.len(), 1, "{seen:?}");
    let m = seen[0].msg.as_ref().unwrap();
    assert_eq!(m.start, "GET /x?q=1 HTTP/1.1", "origin-form upstream");
    assert_eq!(m.one("host"), Some("evil.example"));
    assert_eq!(m.one("x-forwarded-host"), Some("evil.example"));
    assert!(!m.raw_text().contains("good.example"), "{:?}", m.raw_text());
    assert!(good.settled().await.is_empty());

    // Control: with Host alone, good.example does route to good.
    let got = exchange(
        proxy.addr,
        b"GET /x HTTP/1.1\r\nhost: good.example\r\nconnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(got.statuses(), [200], "{:?}", got.text());
    let seen = good.settled().await;
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(
        seen[0].msg.as_ref().unwrap().one("host"),
        Some("good.example")
    );

    // And the other way round: the target names good.example, Host lies.
    good.clear();
    legacy.clear();
    let got = exchange(
        proxy.addr,
        b"GET http://good.example/y HTTP/1.1\r\nhost: evil.example\r\nconnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(got.statuses(), [200], "{:?}", got.text());
    let seen = good.settled().await;
    assert_eq!(seen.len(), 1, "{seen:?}");
    let m = seen[0].msg.as_ref().unwrap();
    assert_eq!(m.start, "GET /y HTTP/1.1");
    assert_eq!(m.one("host"), Some("good.example"));
    assert!(!m.raw_text().contains("evil.example"), "{:?}", m.raw_text());
    assert!(legacy.settled().await.is_empty());
    assert_fresh_request_served(&proxy, &legacy, "absolute-form").await;
}

#[tokio::test]
async fn an_absolute_form_target_with_user_info_is_refused() {
    let backend = Backend::ok().await;
    let proxy = proxy_to(&backend).await;
    for (name, bytes) in [
        (
            "user",
            b"GET http://user@evil.example/x HTTP/1.1\r\nhost: evil.example\r\nconnection: close\r\n\r\n".as_slice(),
        ),
        (
            "user and password",
            b"GET http://user:pw@evil.example/x HTTP/1.1\r\nhost: evil.example\r\nconnection: close\r\n\r\n".as_slice(),
        ),
        (
            "in Host",
            b"GET /x HTTP/1.1\r\nhost: user@evil.example\r\nconnection: close\r\n\r\n".as_slice(),
        ),
    ] {
        refused_untouched(&proxy, &backend, name, bytes).await;
    }
}

// ---------------------------------------------------------------------------------------
// Upgrades.
// ---------------------------------------------------------------------------------------

fn assert_no_upgrade(m: &Msg, ctx: &str) {
    assert!(m.all("upgrade").is_empty(), "{ctx}: {}", m.raw_text());
    assert!(
        m.all("http2-settings").is_empty(),
        "{ctx}: {}",
        m.raw_text()
    );
    assert!(
        m.all("connection")
            .iter()
            .all(|v| !v.to_ascii_lowercase().contains("upgrade")),
        "{ctx}: {}",
        m.raw_text()
    );
}

#[tokio::test]
async fn an_h2c_upgrade_is_never_forwarded() {
    let backend = Backend::ok().await;
    let proxy = proxy_to(&backend).await;
    // No `connection: close`: the connection goes on as HTTP/1.1 and the proxy closes it
    // once idle for `header_read_timeout`.
    let got = exchange(
        proxy.addr,
        b"GET /x HTTP/1.1\r\nhost: x\r\nupgrade: h2c\r\nhttp2-settings: AAMAAABkAARAAAAAAAIAAAAA\r\nconnection: Upgrade, HTTP2-Settings\r\n\r\n",
    )
    .await;
    let r = got.only();
    assert_eq!(r.status(), 200, "not 101: {:?}", got.text());
    assert_eq!(r.body, b"ok");
    assert_no_upgrade(r, "the answer to an h2c offer");
    let seen = backend.settled().await;
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_no_upgrade(seen[0].msg.as_ref().unwrap(), "h2c");
    assert_fresh_request_served(&proxy, &backend, "h2c").await;
}

#[tokio::test]
async fn a_101_nobody_asked_for_is_a_502_and_the_connection_is_not_reused() {
    // Answers 101 (and then a response the client never asked for) to a plain request.
    let backend = Backend::answering(|m| {
        if m.target() == "/switch" {
            Answer::raw(b"HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: foo\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 6\r\n\r\nsneaky")
        } else {
            Answer::ok()
        }
    })
    .await;
    let proxy = proxy_to(&backend).await;
    let got = exchange(
        proxy.addr,
        b"GET /switch HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
    )
    .await;
    let r = got.only();
    assert!(r.start.starts_with("HTTP/1.1 502 "), "{:?}", got.text());
    assert_error_contract(r, "upstream_unavailable", "unasked 101");
    assert!(!got.text().contains("sneaky"), "{:?}", got.text());
    assert_fresh_request_served(&proxy, &backend, "unasked 101").await;
    let seen = backend.settled().await;
    let conns: Vec<(usize, String)> = seen.iter().map(|r| (r.conn, r.start())).collect();
    assert_eq!(
        conns,
        [
            (0, "GET /switch HTTP/1.1".to_string()),
            (1, "GET /after HTTP/1.1".to_string())
        ],
        "the switched connection was used again"
    );
}

#[tokio::test]
async fn other_upgrades_pass_only_where_the_route_opts_in_and_websockets_always() {
    // Answers 101 and becomes an echo tunnel when asked to upgrade, else 200.
    let backend = Backend::answering(|m| {
        if m.all("upgrade").is_empty() {
            Answer::ok()
        } else {
            Answer {
                bytes: b"HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: foo/1\r\n\r\n"
                    .to_vec(),
                then: Then::Echo,
            }
        }
    })
    .await;
    let ws = start_ws_echo().await;
    let proxy = Proxy::start(&format!(
        "{SERVER}{}[backends.ws]\nurl = \"http://{ws}\"\n\n[[routes]]\nprefix = \"/\"\nbackend = \"legacy\"\n\n[[routes]]\nprefix = \"/foo\"\nbackend = \"legacy\"\nupgrades = [\"foo\"]\n\n[[routes]]\nprefix = \"/ws\"\nbackend = \"ws\"\n",
        legacy_at(backend.addr)
    ))
    .await;

    // /routes says which route tunnels what.
    assert_eq!(
        route_json(&proxy, "/foo").await["upgrades"],
        serde_json::json!(["foo"])
    );
    assert!(route_json(&proxy, "/").await.get("upgrades").is_none());

    // Not opted in (and h2c never, even where foo is): stripped, served as plain HTTP.
    for (path, offer) in [
        ("/plain", "foo/1"),
        ("/foo", "foo/1, h2c"),
        ("/foo", "h2c"),
        ("/foo", "bar"),
    ] {
        backend.clear();
        let req = format!(
            "GET {path} HTTP/1.1\r\nhost: x\r\nconnection: upgrade, close\r\nupgrade: {offer}\r\n\r\n"
        );
        let got = exchange(proxy.addr, req.as_bytes()).await;
        let ctx = format!("{path} offering {offer}");
        assert_eq!(got.statuses(), [200], "{ctx}: {:?}", got.text());
        let seen = backend.settled().await;
        assert_eq!(seen.len(), 1, "{ctx}: {seen:?}");
        assert_no_upgrade(seen[0].msg.as_ref().unwrap(), &ctx);
    }

    // Opted in: forwarded, and the 101 becomes a tunnel both ways.
    backend.clear();
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    s.write_all(b"GET /foo HTTP/1.1\r\nhost: x\r\nconnection: Upgrade\r\nupgrade: foo/1\r\n\r\n")
        .await
        .unwrap();
    let mut head = Vec::new();
    tokio::time::timeout(LIMIT, async {
        let mut b = [0u8; 1];
        while find(&head, b"\r\n\r\n").is_none() {
            assert_eq!(s.read(&mut b).await.unwrap(), 1, "closed: {head:?}");
            head.push(b[0]);
        }
    })
    .await
    .expect("an answer to the upgrade");
    let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 101 "), "{head}");
    assert!(head.contains("upgrade: foo/1"), "{head}");
    let seen = backend.settled().await;
    assert_eq!(seen.len(), 1, "{seen:?}");
    let m = seen[0].msg.as_ref().unwrap();
    assert_eq!(m.one("upgrade"), Some("foo/1"));
    assert_eq!(
        m.one("connection").map(str::to_ascii_lowercase).as_deref(),
        Some("upgrade")
    );
    s.write_all(b"ping through the tunnel").await.unwrap();
    let mut back = vec![0u8; b"ping through the tunnel".len()];
    tokio::time::timeout(LIMIT, s.read_exact(&mut back))
        .await
        .expect("echo through the tunnel")
        .unwrap();
    assert_eq!(back, b"ping through the tunnel");
    drop(s);

    // WebSocket needs no opt-in.
    let (mut socket, resp) = tokio_tungstenite::connect_async(format!("ws://{}/ws", proxy.addr))
        .await
        .unwrap();
    assert_eq!(resp.status(), 101);
    socket
        .send(tokio_tungstenite::tungstenite::Message::text("hostile"))
        .await
        .unwrap();
    let echoed = socket.next().await.unwrap().unwrap();
    assert_eq!(echoed.into_text().unwrap().as_str(), "hostile");
    socket.close(None).await.unwrap();

    assert_fresh_request_served(&proxy, &backend, "upgrades").await;
}

// ---------------------------------------------------------------------------------------
// Hostile upstream answers.
// ---------------------------------------------------------------------------------------

/// A backend answering `bytes` to `GET /hostile` and `200 ok` to everything else.
async fn answering_hostile(bytes: &'static [u8]) -> Backend {
    Backend::answering(move |m| {
        if m.target() == "/hostile" {
            Answer::raw(bytes)
        } else {
            Answer::ok()
        }
    })
    .await
}

const GET_HOSTILE: &[u8] = b"GET /hostile HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n";

#[tokio::test]
async fn an_upstream_answer_with_both_framings_is_relayed_by_transfer_encoding_on_a_connection_not_reused(
) {
    let backend = answering_hostile(
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\na\r\n0123456789\r\n0\r\n\r\n",
    )
    .await;
    let proxy = proxy_to(&backend).await;
    let got = exchange(proxy.addr, GET_HOSTILE).await;
    let r = got.only();
    assert_eq!(r.status(), 200, "{:?}", got.text());
    assert_eq!(r.body, b"0123456789", "{:?}", got.text());
    assert!(
        r.all("content-length").iter().all(|v| *v == "10"),
        "the client was told a length the body does not have: {:?}",
        got.text()
    );
    assert_fresh_request_served(&proxy, &backend, "CL+TE answer").await;
    let seen = backend.settled().await;
    let conns: Vec<(usize, String)> = seen.iter().map(|r| (r.conn, r.start())).collect();
    assert_eq!(
        conns,
        [
            (0, "GET /hostile HTTP/1.1".to_string()),
            (1, "GET /after HTTP/1.1".to_string())
        ],
        "the connection of an answer with both framings was used again"
    );
    assert_eq!(backend.accepted(), 2);
}

#[tokio::test]
async fn well_framed_upstream_answers_do_reuse_the_connection() {
    // The control for the test above: the counting does see reuse.
    let backend = Backend::ok().await;
    let proxy = proxy_to(&backend).await;
    for _ in 0..3 {
        assert_fresh_request_served(&proxy, &backend, "reuse").await;
    }
    let seen = backend.settled().await;
    assert_eq!(seen.len(), 3, "{seen:?}");
    assert!(seen.iter().all(|r| r.conn == 0), "{seen:?}");
    assert_eq!(backend.accepted(), 1);
}

/// A backend answering `bytes` makes the client's answer a JSON 502, and the proxy still
/// serves a fresh request afterwards.
async fn answered_with_502(bytes: &'static [u8]) {
    let backend = answering_hostile(bytes).await;
    let proxy = proxy_to(&backend).await;
    let ctx = String::from_utf8_lossy(bytes);
    let got = exchange(proxy.addr, GET_HOSTILE).await;
    let r = got.only();
    assert!(
        r.start.starts_with("HTTP/1.1 502 "),
        "{ctx}: {:?}",
        got.text()
    );
    assert_error_contract(r, "upstream_unavailable", &ctx);
    assert_fresh_request_served(&proxy, &backend, &ctx).await;
}

#[tokio::test]
async fn an_upstream_answer_with_two_content_lengths_is_a_502() {
    for bytes in [
        b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-length: 12\r\n\r\nokHTTP/1.1 2"
            .as_slice(),
        b"HTTP/1.1 200 OK\r\ncontent-length: 2, 12\r\n\r\nokHTTP/1.1 2".as_slice(),
    ] {
        answered_with_502(bytes).await;
    }
}

#[tokio::test]
async fn an_upstream_answer_with_a_bad_status_line_is_a_502() {
    for bytes in [
        b"HTTP/1.1 2000 OK\r\ncontent-length: 2\r\n\r\nok".as_slice(),
        b"HTTP/1.1 OK\r\ncontent-length: 2\r\n\r\nok".as_slice(),
        b"HTTP/1.1 20 OK\r\ncontent-length: 2\r\n\r\nok".as_slice(),
        b"HTTP/7.1 200 OK\r\ncontent-length: 2\r\n\r\nok".as_slice(),
        b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nbad header\r\n\r\nok".as_slice(),
    ] {
        answered_with_502(bytes).await;
    }
}

#[tokio::test]
async fn an_extra_upstream_answer_never_reaches_the_next_client() {
    // Two answers to one request: the second must not be served to whoever comes next.
    let backend = answering_hostile(
        b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nokHTTP/1.1 200 OK\r\ncontent-length: 8\r\n\r\npoisoned",
    )
    .await;
    let proxy = proxy_to(&backend).await;
    let got = exchange(proxy.addr, GET_HOSTILE).await;
    let r = got.only();
    assert_eq!(r.status(), 200, "{:?}", got.text());
    assert_eq!(r.body, b"ok");
    for _ in 0..3 {
        assert_fresh_request_served(&proxy, &backend, "extra answer").await;
    }
    let seen = backend.settled().await;
    assert!(
        seen.iter().skip(1).all(|r| r.conn != 0),
        "the connection with a pending extra answer was used again: {seen:?}"
    );
}

// ---------------------------------------------------------------------------------------
// Slow bodies.
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn a_trickled_body_does_not_hold_up_other_connections() {
    let backend = Backend::ok().await;
    let proxy = proxy_to(&backend).await;
    let body = b"0123456789abcdef";
    let mut slow = TcpStream::connect(proxy.addr).await.unwrap();
    slow.write_all(
        format!(
            "POST /slow HTTP/1.1\r\nhost: x\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
            body.len()
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    // Byte by byte, 80 ms apart: the whole body takes longer than `header_read_timeout`.
    let (first, second) = body.split_at(body.len() / 2);
    for b in first {
        slow.write_all(std::slice::from_ref(b)).await.unwrap();
        tokio::time::sleep(Duration::from_millis(80)).await;
    }
    // Half the body is in: another client is served now, not after the slow one.
    let started = std::time::Instant::now();
    let got = exchange(
        proxy.addr,
        b"GET /fast HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(got.statuses(), [200], "{:?}", got.text());
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "took {:?}",
        started.elapsed()
    );
    assert!(
        backend
            .seen
            .lock()
            .unwrap()
            .iter()
            .all(|r| r.msg.as_ref().is_none_or(|m| m.target() != "/slow")),
        "the slow body was complete before the fast request"
    );
    for b in second {
        slow.write_all(std::slice::from_ref(b)).await.unwrap();
        tokio::time::sleep(Duration::from_millis(80)).await;
    }
    let mut out = Vec::new();
    tokio::time::timeout(LIMIT, slow.read_to_end(&mut out))
        .await
        .expect("the slow request is answered")
        .unwrap();
    let out = String::from_utf8_lossy(&out);
    assert!(out.starts_with("HTTP/1.1 200 "), "{out}");
    let seen = backend.settled().await;
    let m = seen
        .iter()
        .filter_map(|r| r.msg.as_ref())
        .find(|m| m.target() == "/slow")
        .expect("the slow request reached the backend");
    assert_consistent_framing(m);
    assert_eq!(m.body, body);
}

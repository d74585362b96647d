//! Test harness: everything on 127.0.0.1:0, real sockets, no fixed ports, no bare sleeps
//! where `eventually` works.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;

pub mod jwt;
pub mod log;
pub mod rabbitmq;
pub mod tls;

/// Stops a server when dropped.
pub struct Running {
    pub addr: SocketAddr,
    pub stop: Option<oneshot::Sender<()>>,
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

fn stopper() -> (oneshot::Sender<()>, impl Future<Output = ()>) {
    let (tx, rx) = oneshot::channel::<()>();
    (tx, async move {
        let _ = rx.await;
    })
}

pub async fn listener() -> (TcpListener, SocketAddr) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let a = l.local_addr().unwrap();
    (l, a)
}

pub async fn start_legacy(opts: legacy_stub::Options) -> Running {
    let (l, addr) = listener().await;
    let (tx, stop) = stopper();
    tokio::spawn(legacy_stub::serve(l, opts, stop));
    Running {
        addr,
        stop: Some(tx),
    }
}

pub async fn start_users(bug: Option<users_service::Bug>) -> Running {
    let (l, addr) = listener().await;
    let (tx, stop) = stopper();
    tokio::spawn(users_service::serve(l, bug, stop));
    Running {
        addr,
        stop: Some(tx),
    }
}

/// A backend that answers every request with a JSON echo of what it received:
/// `{"backend", "method", "path", "headers": {name: [values]}, "body_len"}`.
/// Special paths: `/slow/MS` waits before answering, `/status/N` answers N,
/// `/stream/N` streams N KiB, `/ws` accepts a WebSocket upgrade and echoes messages.
pub async fn start_echo(name: &'static str) -> Running {
    let (l, addr) = listener().await;
    let (tx, stop) = stopper();
    tokio::spawn(legacy_stub::http::serve(
        l,
        move |req, _| echo(name, req),
        stop,
    ));
    Running {
        addr,
        stop: Some(tx),
    }
}

async fn echo(name: &'static str, req: Request<Incoming>) -> legacy_stub::http::Resp {
    let path = req.uri().path().to_string();
    if let Some(ms) = path
        .strip_prefix("/slow/")
        .and_then(|m| m.parse::<u64>().ok())
    {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    let mut headers = serde_json::Map::new();
    for (k, v) in req.headers() {
        let entry = headers.entry(k.as_str()).or_insert_with(|| json!([]));
        entry
            .as_array_mut()
            .unwrap()
            .push(json!(String::from_utf8_lossy(v.as_bytes())));
    }
    let method = req.method().to_string();
    let pq = req
        .uri()
        .path_and_query()
        .map(|p| p.to_string())
        .unwrap_or_default();
    let body_len = req
        .into_body()
        .collect()
        .await
        .map(|c| c.to_bytes().len())
        .unwrap_or(usize::MAX);
    let status = path
        .strip_prefix("/status/")
        .and_then(|s| s.parse::<u16>().ok())
        .and_then(|s| StatusCode::from_u16(s).ok())
        .unwrap_or(StatusCode::OK);
    let mut resp = legacy_stub::http::json(
        status,
        &json!({"backend": name, "method": method, "path": pq, "headers": headers, "body_len": body_len}),
    );
    resp.headers_mut()
        .insert("connection", "x-backend-secret".parse().unwrap());
    resp.headers_mut()
        .insert("x-backend-secret", "leak".parse().unwrap());
    resp.headers_mut()
        .insert("keep-alive", "timeout=5".parse().unwrap());
    resp.headers_mut()
        .insert("x-backend", name.parse().unwrap());
    if let Some(kib) = path
        .strip_prefix("/stream/")
        .and_then(|m| m.parse::<usize>().ok())
    {
        *resp.body_mut() = Full::new(Bytes::from(vec![b'x'; kib * 1024]));
    }
    resp
}

/// How a raw TCP backend misbehaves.
#[derive(Clone, Copy)]
pub enum Misbehave {
    /// Accepts, reads the request, closes without answering.
    Reset,
    /// Accepts and never answers.
    Hang,
    /// Answers bytes that are not HTTP.
    Garbage,
    /// Sends the head of a response, then part of the body, then hangs.
    StallBody,
}

pub async fn start_raw(kind: Misbehave) -> Running {
    let (l, addr) = listener().await;
    let (tx, stop) = stopper();
    tokio::spawn(async move {
        tokio::pin!(stop);
        loop {
            let (mut s, _) =
                tokio::select! { _ = &mut stop => return, r = l.accept() => r.unwrap() };
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf).await;
                match kind {
                    Misbehave::Reset => drop(s),
                    Misbehave::Hang => tokio::time::sleep(Duration::from_secs(3600)).await,
                    Misbehave::Garbage => {
                        let _ = s.write_all(b"this is not http\r\n\r\n").await;
                    }
                    Misbehave::StallBody => {
                        let _ = s
                            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\npartial")
                            .await;
                        tokio::time::sleep(Duration::from_secs(3600)).await;
                    }
                }
            });
        }
    });
    Running {
        addr,
        stop: Some(tx),
    }
}

/// An HTTP/1.1 backend that answers every request on a connection with `answer`, byte for
/// byte (keep-alive; requests without a body): chosen bytes, trailers and framing included.
pub async fn fixed_h1(answer: &'static [u8]) -> Running {
    let (l, addr) = listener().await;
    let (tx, stop) = stopper();
    tokio::spawn(async move {
        tokio::pin!(stop);
        loop {
            let (mut s, _) = tokio::select! {
                _ = &mut stop => return,
                r = l.accept() => r.unwrap(),
            };
            tokio::spawn(async move {
                let mut seen = Vec::new();
                let mut buf = [0u8; 4096];
                loop {
                    let Ok(n) = s.read(&mut buf).await else {
                        return;
                    };
                    if n == 0 {
                        return;
                    }
                    seen.extend_from_slice(&buf[..n]);
                    while let Some(end) = seen.windows(4).position(|w| w == b"\r\n\r\n") {
                        seen.drain(..end + 4);
                        if s.write_all(answer).await.is_err() {
                            return;
                        }
                    }
                }
            });
        }
    });
    Running {
        addr,
        stop: Some(tx),
    }
}

/// A 200 answer with a JSON `body` and its Content-Length, for [`fixed_h1`].
pub fn json_answer(body: &str) -> &'static [u8] {
    let text = format!(
        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    Box::leak(text.into_boxed_str()).as_bytes()
}

/// `strangler_shadow_total{outcome}` (summed over routes), 0 when absent.
pub fn shadow_outcome(m: &str, outcome: &str) -> f64 {
    metric(m, "strangler_shadow_total", &[("outcome", outcome)]).unwrap_or(0.0)
}

/// Waits until `n` shadow legs have ended (any outcome but dropped); the metrics text.
pub async fn shadow_legs_ended(proxy: &Proxy, n: f64, deadline: Duration) -> String {
    eventually(deadline, || async {
        let m = metrics_text(proxy).await;
        let done: f64 = ["match", "mismatch", "error", "skipped"]
            .iter()
            .map(|o| shadow_outcome(&m, o))
            .sum();
        (done >= n).then_some(m)
    })
    .await
}

/// An address nothing listens on (bound, then released).
pub async fn closed_port() -> SocketAddr {
    let (l, a) = listener().await;
    drop(l);
    a
}

/// A proxy running in-process on port 0, with its routes.toml in a temp dir.
pub struct Proxy {
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    pub state: Arc<strangler::state::State>,
    pub reloader: Arc<strangler::reload::Reloader>,
    pub dir: tempfile::TempDir,
    stop: Option<oneshot::Sender<()>>,
    pub task: Option<tokio::task::JoinHandle<Result<(), strangler::RunError>>>,
}

impl Proxy {
    /// Starts a proxy on `routes` (the `[server]` listen/admin addresses are forced to port 0
    /// unless the text sets them).
    pub async fn start(routes: &str) -> Proxy {
        Self::start_in(tempfile::tempdir().unwrap(), routes).await
    }

    /// Like `start`, in `dir` (which may already hold files routes.toml names).
    pub async fn start_in(dir: tempfile::TempDir, routes: &str) -> Proxy {
        let path = dir.path().join("routes.toml");
        let text = with_server_defaults(routes);
        std::fs::write(&path, &text).unwrap();
        let loaded = match strangler::config::load(&path) {
            Ok(l) => l,
            Err(e) => panic!("test config invalid:\n{e}\n{text}"),
        };
        let server = strangler::Server::bind(loaded).await.unwrap();
        let (addr, admin, state) = (server.proxy_addr(), server.admin_addr(), server.state());
        let reloader = server.reloader();
        let (tx, stop) = stopper();
        let task = tokio::spawn(server.run(stop));
        Proxy {
            addr,
            admin,
            state,
            reloader,
            dir,
            stop: Some(tx),
            task: Some(task),
        }
    }

    pub fn path(&self) -> PathBuf {
        self.dir.path().join("routes.toml")
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.admin)
    }

    /// Starts the graceful shutdown; returns the run task to await.
    pub fn shutdown(&mut self) -> tokio::task::JoinHandle<Result<(), strangler::RunError>> {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        self.task.take().unwrap()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

/// Prepends a `[server]` on port 0 when the text has none.
pub fn with_server_defaults(routes: &str) -> String {
    if routes.contains("[server]") {
        routes.to_string()
    } else {
        format!("[server]\nlisten = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\ndrain_timeout = \"5s\"\n\n{routes}")
    }
}

/// Backends section with one `legacy` backend at `addr`.
pub fn legacy_at(addr: SocketAddr) -> String {
    format!("[backends.legacy]\nurl = \"http://{addr}\"\nlegacy = true\n")
}

/// A `[server]` section on port 0 without file watching (the test reloads when it wants to).
pub const SERVER: &str =
    "[server]\nlisten = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\nwatch = \"off\"\n";

/// A `[backends.NAME]` section at `addr`; `legacy = true` when the name is `legacy`.
pub fn backend(name: &str, addr: SocketAddr) -> String {
    let legacy = if name == "legacy" {
        "legacy = true\n"
    } else {
        ""
    };
    format!("[backends.{name}]\nurl = \"http://{addr}\"\n{legacy}")
}

/// A `[[routes]]` entry, `prefix` to `backend`, with the `rest` lines.
pub fn route(prefix: &str, backend: &str, rest: &str) -> String {
    format!("[[routes]]\nprefix = \"{prefix}\"\nbackend = \"{backend}\"\n{rest}\n")
}

/// A `[server]` section on port 0 with the `extra` lines.
pub fn server(extra: &str) -> String {
    format!("[server]\nlisten = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\n{extra}\n")
}

/// One `legacy` backend at `addr` and one route, `prefix` to it.
pub fn legacy_route(addr: SocketAddr, prefix: &str) -> String {
    format!(
        "{}[[routes]]\nprefix = \"{prefix}\"\nbackend = \"legacy\"\n",
        legacy_at(addr)
    )
}

/// A proxy with one `legacy` backend at `addr` and one route, `/` to it.
pub async fn proxy_to(addr: SocketAddr) -> Proxy {
    Proxy::start(&legacy_route(addr, "/")).await
}

/// Like [`proxy_to`], with `backend_extra` lines in the backend and `server_extra` in
/// `[server]`.
pub async fn proxy_to_with(addr: SocketAddr, backend_extra: &str, server_extra: &str) -> Proxy {
    Proxy::start(&format!(
        "{}{}{backend_extra}\n[[routes]]\nprefix = \"/\"\nbackend = \"legacy\"\n",
        server(server_extra),
        legacy_at(addr)
    ))
    .await
}

/// Writes `text` as the proxy's routes.toml and reloads; the reload must change the table.
pub async fn reload_with(proxy: &Proxy, text: &str) {
    std::fs::write(proxy.path(), text).unwrap();
    assert!(
        strangler::reload::reload_async(proxy.reloader.clone())
            .await
            .changed
    );
}

/// The admin listener's `/metrics` text.
pub async fn metrics_text(proxy: &Proxy) -> String {
    get(&proxy.admin_url("/metrics")).await.text()
}

/// The admin listener's `/routes`.
pub async fn routes_json(proxy: &Proxy) -> Value {
    get(&proxy.admin_url("/routes")).await.json()
}

/// The entry of `/routes` for the route with `prefix`.
pub async fn route_json(proxy: &Proxy, prefix: &str) -> Value {
    routes_json(proxy).await["routes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["prefix"] == prefix)
        .unwrap_or_else(|| panic!("no route {prefix} in /routes"))
        .clone()
}

/// How many reloads failed, from a `/metrics` text (`None` before the first failure).
pub fn failed_reloads(metrics: &str) -> Option<f64> {
    metric(
        metrics,
        "strangler_config_reloads_total",
        &[("outcome", "failure")],
    )
}

pub type HttpClient = Client<HttpConnector, Full<Bytes>>;

pub fn client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http()
}

/// A response read whole.
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", String::from_utf8_lossy(&self.body)))
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    /// The `backend` an echo-style JSON answer names.
    pub fn backend(&self) -> String {
        self.json()["backend"].as_str().unwrap().to_string()
    }
}

pub async fn send(req: Request<Full<Bytes>>) -> Reply {
    let resp = client().request(req).await.unwrap();
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    Reply {
        status: parts.status,
        headers: parts.headers,
        body,
    }
}

pub async fn get(url: &str) -> Reply {
    send(Request::get(url).body(Full::new(Bytes::new())).unwrap()).await
}

pub fn request(method: Method, url: &str) -> http::request::Builder {
    Request::builder().method(method).uri(url)
}

/// Sends `method` to `url` with `headers` (in order) and `body`, and reads the answer whole.
pub async fn send_with(
    method: Method,
    url: &str,
    headers: &[(&str, &str)],
    body: impl Into<Bytes>,
) -> Reply {
    let mut b = request(method, url);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    send(b.body(Full::new(body.into())).unwrap()).await
}

/// Writes raw bytes on a fresh connection and reads one response (head plus
/// `content-length` bytes), or until the peer closes or `limit` passes.
pub async fn raw(addr: SocketAddr, bytes: &[u8], limit: Duration) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(limit, async {
        let mut buf = [0u8; 8192];
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
            if complete(&out) {
                return;
            }
        }
    })
    .await;
    String::from_utf8_lossy(&out).into_owned()
}

fn complete(out: &[u8]) -> bool {
    let text = String::from_utf8_lossy(out);
    let Some((head, body)) = text.split_once("\r\n\r\n") else {
        return false;
    };
    let len = head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.eq_ignore_ascii_case("content-length")
            .then(|| v.trim().parse::<usize>().ok())?
    });
    len.is_some_and(|n| body.len() >= n)
}

/// Line and column (1-based, in characters) where `needle` first starts in `text`: where a
/// config error about it must point.
pub fn position(text: &str, needle: &str) -> (usize, usize) {
    let at = text
        .find(needle)
        .unwrap_or_else(|| panic!("{needle:?} not in\n{text}"));
    line_col(text, at)
}

/// Like [`position`], for the `nth` (0-based) `needle` in `text`.
pub fn position_nth(text: &str, needle: &str, nth: usize) -> (usize, usize) {
    let at = text
        .match_indices(needle)
        .nth(nth)
        .unwrap_or_else(|| panic!("{needle:?} #{nth} not in\n{text}"))
        .0;
    line_col(text, at)
}

fn line_col(text: &str, at: usize) -> (usize, usize) {
    let before = &text[..at];
    let line = before.matches('\n').count() + 1;
    let col = before.rsplit('\n').next().unwrap().chars().count() + 1;
    (line, col)
}

/// Retries `check` until it returns `Some` or `deadline` passes.
pub async fn eventually<T, F, Fut>(deadline: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let until = tokio::time::Instant::now() + deadline;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < until,
            "condition not met within {deadline:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The value of a Prometheus sample line `name{labels} value` whose labels include all `want`.
pub fn metric(text: &str, name: &str, want: &[(&str, &str)]) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (n, labels) = series.split_once('{').unwrap_or((series, ""));
            (n == name
                && want
                    .iter()
                    .all(|(k, v)| labels.contains(&format!("{k}=\"{v}\""))))
            .then(|| value.parse().ok())?
        })
}

/// A WebSocket echo server on port 0.
pub async fn start_ws_echo() -> std::net::SocketAddr {
    let (l, addr) = listener().await;
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            tokio::spawn(async move {
                let Ok(mut ws) = tokio_tungstenite::accept_async(s).await else {
                    return;
                };
                while let Some(Ok(m)) = futures_util::StreamExt::next(&mut ws).await {
                    if m.is_text() && futures_util::SinkExt::send(&mut ws, m).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

//! The floor of the project's stack: the leanest reverse proxy we could write on hyper 1.x,
//! doing per request what bench/lib.sh's nginx does (Host kept, X-Forwarded-For and
//! X-Request-Id added, keep-alive both sides, bodies streamed). `bench/icount.sh` counts its
//! instructions per request beside strangler's and nginx's: whatever strangler does on top of
//! this is strangler's cost; what this costs over nginx is hyper's and tokio's.
//!
//!   cargo run --release --example minimal_proxy -- LISTEN_ADDR BACKEND_ADDR
//!
//! Built the way strangler is (the same release profile and allocator, one tokio worker as
//! strangler's `workers = 1`), with every lever we found for a lean hyper proxy:
//! - `hyper::client::conn::http1` with a pool of its own (a lock-free queue of idle senders;
//!   a connection goes back when its answer's body ends), not hyper-util's pooled `Client`
//!   (hyper #1970, agentgateway #1155);
//! - no per-request `String`: the upstream `Uri` is built from parts, the `X-Forwarded-For`
//!   value once per client connection, the request id in a stack buffer;
//! - no hyper timer (hyper #3395: `header_read_timeout` arms a timer per request head);
//! - `writev(false)` on both sides (hyper #2910: flattening wins for small bodies).
//!
//! Not a product: no timeouts, no limits, no error bodies.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use crossbeam_queue::ArrayQueue;
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{HeaderName, HeaderValue, Request, Response, Uri};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let usage = || anyhow::anyhow!("usage: minimal_proxy LISTEN_ADDR BACKEND_ADDR");
    let listen: SocketAddr = args.next().ok_or_else(usage)?.parse()?;
    let backend: SocketAddr = args.next().ok_or_else(usage)?.parse()?;
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?
        .block_on(serve(listen, backend))
}

/// The backend's idle connections.
struct Pool {
    backend: SocketAddr,
    authority: Authority,
    idle: ArrayQueue<SendRequest<Incoming>>,
}

impl Pool {
    async fn sender(&self) -> anyhow::Result<SendRequest<Incoming>> {
        while let Some(mut s) = self.idle.pop() {
            if s.ready().await.is_ok() {
                return Ok(s);
            }
        }
        let stream = TcpStream::connect(self.backend).await?;
        stream.set_nodelay(true)?;
        let (sender, conn) = hyper::client::conn::http1::Builder::new()
            .writev(false)
            .handshake(TokioIo::new(stream))
            .await?;
        tokio::spawn(conn);
        Ok(sender)
    }
}

async fn serve(listen: SocketAddr, backend: SocketAddr) -> anyhow::Result<()> {
    let listener = TcpListener::bind(listen).await?;
    let pool = Arc::new(Pool {
        backend,
        authority: Authority::try_from(backend.to_string())?,
        idle: ArrayQueue::new(256),
    });
    loop {
        let (stream, peer) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        let pool = pool.clone();
        // Once per connection, not per request.
        let forwarded = HeaderValue::try_from(peer.ip().to_string())?;
        tokio::spawn(async move {
            let service = service_fn(|req| forward(&pool, &forwarded, req));
            let _ = hyper::server::conn::http1::Builder::new()
                .writev(false)
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn forward(
    pool: &Arc<Pool>,
    forwarded: &HeaderValue,
    req: Request<Incoming>,
) -> anyhow::Result<Response<Pooled>> {
    let (mut parts, body) = req.into_parts();
    let mut uri = http::uri::Parts::default();
    uri.scheme = Some(Scheme::HTTP);
    uri.authority = Some(pool.authority.clone());
    uri.path_and_query = parts
        .uri
        .path_and_query()
        .cloned()
        .or(Some(PathAndQuery::from_static("/")));
    parts.uri = Uri::from_parts(uri)?;
    parts.headers.insert(X_FORWARDED_FOR, forwarded.clone());
    parts.headers.insert(X_REQUEST_ID, request_id());
    let mut sender = pool.sender().await?;
    let resp = sender
        .send_request(Request::from_parts(parts, body))
        .await?;
    let (parts, body) = resp.into_parts();
    let body = Pooled {
        body,
        back: Some((sender, pool.clone())),
    };
    Ok(Response::from_parts(parts, body))
}

/// 32 hex digits from a random u128, formatted on the stack.
fn request_id() -> HeaderValue {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut n = fastrand::u128(..);
    let mut buf = [0u8; 32];
    for b in buf.iter_mut().rev() {
        *b = HEX[(n & 15) as usize];
        n >>= 4;
    }
    // Hex digits are always a valid header value.
    HeaderValue::from_bytes(&buf).unwrap_or(HeaderValue::from_static("0"))
}

/// The answer's body; its connection goes back to the pool when the body has ended.
struct Pooled {
    body: Incoming,
    back: Option<(SendRequest<Incoming>, Arc<Pool>)>,
}

impl Body for Pooled {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = &mut *self;
        let frame = Pin::new(&mut this.body).poll_frame(cx);
        if this.body.is_end_stream() || matches!(frame, Poll::Ready(None)) {
            if let Some((sender, pool)) = this.back.take() {
                let _ = pool.idle.push(sender);
            }
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

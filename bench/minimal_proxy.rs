//! The floor of the project's stack: the smallest reverse proxy on hyper 1.x and hyper-util's
//! pooled client, doing per request what bench/lib.sh's nginx does (Host kept, X-Forwarded-For
//! and X-Request-Id added, keep-alive both sides, bodies streamed). `bench/icount.sh` counts
//! its instructions per request beside strangler's and nginx's: whatever strangler does on top
//! of this is strangler's cost; what this costs over nginx is hyper's and tokio's.
//!
//!   cargo run --release --example minimal_proxy -- LISTEN_ADDR BACKEND_ADDR
//!
//! One tokio worker thread, as strangler's `workers = 1` and nginx's one worker. Not a
//! product: no timeouts, no limits, no error bodies.

use std::net::SocketAddr;

use http::{HeaderValue, Request, Uri};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

type Proxied = Result<http::Response<Incoming>, hyper_util::client::legacy::Error>;

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let listen: SocketAddr = args
        .next()
        .ok_or_else(|| anyhow::anyhow!("usage: minimal_proxy LISTEN_ADDR BACKEND_ADDR"))?
        .parse()?;
    let backend: SocketAddr = args
        .next()
        .ok_or_else(|| anyhow::anyhow!("usage: minimal_proxy LISTEN_ADDR BACKEND_ADDR"))?
        .parse()?;
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?
        .block_on(serve(listen, backend))
}

async fn serve(listen: SocketAddr, backend: SocketAddr) -> anyhow::Result<()> {
    let listener = TcpListener::bind(listen).await?;
    let client: Client<HttpConnector, Incoming> =
        Client::builder(TokioExecutor::new()).build(HttpConnector::new());
    let authority = backend.to_string();
    loop {
        let (stream, peer) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        let client = client.clone();
        let authority = authority.clone();
        tokio::spawn(async move {
            let service =
                service_fn(move |req| forward(client.clone(), authority.clone(), peer, req));
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn forward(
    client: Client<HttpConnector, Incoming>,
    authority: String,
    peer: SocketAddr,
    mut req: Request<Incoming>,
) -> Proxied {
    let pq = req
        .uri()
        .path_and_query()
        .map_or("/", |pq| pq.as_str())
        .to_string();
    if let Ok(uri) = Uri::builder()
        .scheme("http")
        .authority(authority.as_str())
        .path_and_query(pq)
        .build()
    {
        *req.uri_mut() = uri;
    }
    let headers = req.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&peer.ip().to_string()) {
        headers.insert("x-forwarded-for", v);
    }
    if let Ok(v) = HeaderValue::from_str(&format!("{:032x}", fastrand::u128(..))) {
        headers.insert("x-request-id", v);
    }
    client.request(req).await
}

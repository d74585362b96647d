//! Listeners and connections: the accept loop under the connection cap, HTTP/1.1 with
//! upgrades, and graceful shutdown. On shutdown the loop stops accepting, every connection is
//! asked to finish its in-flight request and close, and `drain` waits for them, bounded.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tracing::{debug, info, warn, Instrument};

use crate::config::ServerSettings;
use crate::proxy::body::ResponseBody;

/// Pause after a failed accept (EMFILE and friends) so the loop does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// Fires once, for every connection, when shutdown starts.
#[derive(Clone)]
pub struct Shutdown(watch::Receiver<bool>);

impl Shutdown {
    pub fn new() -> (watch::Sender<bool>, Shutdown) {
        let (tx, rx) = watch::channel(false);
        (tx, Shutdown(rx))
    }

    /// Resolves when shutdown has started (also if it started before the call).
    pub async fn started(&mut self) {
        // An error means the sender is gone: that is a shutdown too.
        let _ = self.0.wait_for(|&down| down).await;
    }
}

/// The HTTP/1.1 server settings shared by every client connection.
pub fn http1_builder(settings: &ServerSettings) -> http1::Builder {
    let mut b = http1::Builder::new();
    b.timer(TokioTimer::new())
        // Covers slowloris and idle keep-alive alike: hyper arms it whenever the connection
        // waits for a request head.
        .header_read_timeout(settings.header_read_timeout)
        .max_header_size(settings.max_header_size)
        .keep_alive(true);
    b
}

/// Accepts connections until shutdown, then drains them for at most `drain_timeout`.
pub async fn serve<S, F>(
    listener: TcpListener,
    settings: &ServerSettings,
    service: S,
    mut shutdown: Shutdown,
    name: &'static str,
) where
    S: Fn(Request<Incoming>, SocketAddr) -> F + Clone + Send + 'static,
    F: Future<Output = Response<ResponseBody>> + Send + 'static,
{
    let max = settings
        .max_connections
        .min(Semaphore::MAX_PERMITS)
        .min(u32::MAX as usize);
    let permits = Arc::new(Semaphore::new(max));
    let builder = Arc::new(http1_builder(settings));
    loop {
        let permit = tokio::select! {
            biased;
            _ = shutdown.started() => break,
            p = permits.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
        };
        let (stream, peer) = tokio::select! {
            biased;
            _ = shutdown.started() => break,
            r = listener.accept() => match r {
                Ok(conn) => conn,
                Err(error) => {
                    warn!(%error, listener = name, "accept failed");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let service = service.clone();
        let builder = builder.clone();
        let mut conn_shutdown = shutdown.clone();
        let span = tracing::debug_span!("conn", %peer, listener = name);
        tokio::spawn(
            async move {
                let svc = service_fn(move |req| {
                    let fut = service(req, peer);
                    async move { Ok::<_, Infallible>(fut.await) }
                });
                let conn = builder
                    .serve_connection(TokioIo::new(stream), svc)
                    .with_upgrades();
                tokio::pin!(conn);
                let result = tokio::select! {
                    r = conn.as_mut() => r,
                    _ = conn_shutdown.started() => {
                        conn.as_mut().graceful_shutdown();
                        conn.await
                    }
                };
                if let Err(error) = result {
                    debug!(%error, "connection ended with an error");
                }
                drop(permit);
            }
            .instrument(span),
        );
    }
    drop(listener);
    drain(&permits, max, settings.drain_timeout, name).await;
}

/// Waits until every connection has returned its permit, or `timeout`.
async fn drain(permits: &Semaphore, max: usize, timeout: Duration, name: &str) {
    let open = max - permits.available_permits();
    if open > 0 {
        info!(open, listener = name, "draining connections");
    }
    match tokio::time::timeout(timeout, permits.acquire_many(max as u32)).await {
        Ok(_) => debug!(listener = name, "all connections closed"),
        Err(_) => warn!(
            open = max - permits.available_permits(),
            listener = name,
            "drain timeout reached; closing the remaining connections"
        ),
    }
}

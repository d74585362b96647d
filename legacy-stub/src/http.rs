//! Minimal HTTP plumbing shared by the demo services: a serve loop with graceful shutdown,
//! JSON responses and a bounded body reader. Real hyper servers, so the proxy's tests and
//! benchmark talk to them over real sockets.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::{header, HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::net::TcpListener;

/// Request bodies the demo services accept (JSON documents of a few fields).
pub const MAX_BODY: usize = 64 * 1024;

pub type Resp = Response<Full<Bytes>>;

/// A JSON response.
pub fn json(status: StatusCode, body: &Value) -> Resp {
    let mut bytes = serde_json::to_vec(body).unwrap_or_default();
    bytes.push(b'\n');
    let mut resp = Response::new(Full::new(Bytes::from(bytes)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json; charset=utf-8"),
    );
    resp
}

/// `{"error": message}` with `status`.
pub fn error(status: StatusCode, message: &str) -> Resp {
    json(status, &serde_json::json!({ "error": message }))
}

/// Reads a JSON body of at most [`MAX_BODY`] bytes; the `Err` is the response to send.
pub async fn read_json(req: Request<Incoming>) -> Result<(http::request::Parts, Value), Resp> {
    let (parts, body) = req.into_parts();
    let bytes = match Limited::new(body, MAX_BODY).collect().await {
        Ok(c) => c.to_bytes(),
        Err(_) => {
            return Err(error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "request body too large or unreadable",
            ))
        }
    };
    match serde_json::from_slice(&bytes) {
        Ok(v @ Value::Object(_)) => Ok((parts, v)),
        _ => Err(error(StatusCode::BAD_REQUEST, "body must be a JSON object")),
    }
}

/// Now, as RFC 3339 with milliseconds: the nondeterministic field real monoliths add.
pub fn now() -> String {
    humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string()
}

/// Serves `handler` on `listener` until `shutdown` resolves; in-flight requests finish.
pub async fn serve<H, F>(listener: TcpListener, handler: H, shutdown: impl Future<Output = ()>)
where
    H: Fn(Request<Incoming>, SocketAddr) -> F + Send + Sync + 'static,
    F: Future<Output = Resp> + Send + 'static,
{
    let handler = Arc::new(handler);
    let (tx, rx) = tokio::sync::watch::channel(false);
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            _ = &mut shutdown => break,
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(_) => {
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let handler = handler.clone();
        let mut rx = rx.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let fut = handler(req, peer);
                async move { Ok::<_, Infallible>(fut.await) }
            });
            let conn = http1::Builder::new().serve_connection(TokioIo::new(stream), svc);
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                _ = async { rx.wait_for(|&d| d).await.map(|_| ()) } => {
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                }
            }
        });
    }
    let _ = tx.send(true);
}

#[cfg(test)]
mod tests {
    #[test]
    fn now_is_rfc3339_with_milliseconds() {
        let now = super::now();
        assert_eq!(now.len(), "2026-11-22T10:00:00.000Z".len(), "{now}");
        assert!(humantime::parse_rfc3339(&now).is_ok(), "{now}");
        assert!(now.ends_with('Z') && now.as_bytes()[19] == b'.', "{now}");
    }
}

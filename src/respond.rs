//! The one place responses the proxy makes itself are built: JSON bodies, and a
//! [`ProxyError`] as the contract's error JSON.

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};

use crate::error::ProxyError;
use crate::upstream::body::ResponseBody;

/// The contract's JSON for an error: `{"error", "code", "request_id"}`. The message names no
/// internal address and no OS error: those go to the log.
pub fn error_response(error: &ProxyError, request_id: &HeaderValue) -> Response<ResponseBody> {
    let body = serde_json::json!({
        "error": error.to_string(),
        "code": error.code(),
        "request_id": request_id.to_str().unwrap_or_default(),
    });
    let mut resp = json_response(error.status(), &body);
    if let Some(challenge) = error.www_authenticate() {
        if let Ok(v) = HeaderValue::from_str(&challenge) {
            resp.headers_mut().insert(header::WWW_AUTHENTICATE, v);
        }
    }
    if let Some(secs) = error.retry_after() {
        resp.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(secs));
    }
    resp
}

/// A JSON response with `content-type: application/json`.
pub fn json_response<T: serde::Serialize + ?Sized>(
    status: StatusCode,
    body: &T,
) -> Response<ResponseBody> {
    let mut bytes = serde_json::to_vec(body).unwrap_or_default();
    bytes.push(b'\n');
    let mut resp = Response::new(ResponseBody::full(Bytes::from(bytes)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

//! The admin listener: health, readiness, Prometheus metrics, the route table as JSON, and
//! reload on demand. Loopback by default; with `admin_token`, everything but the probes
//! (`/healthz`, `/readyz`) needs `Authorization: Bearer <token>`, compared in constant time.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::reload::Reloader;
use crate::respond::json_response;
use crate::state::{Active, State};
use crate::upstream::body::ResponseBody;

mod view;

/// Answers one admin request.
pub async fn handle<B>(reloader: Arc<Reloader>, req: Request<B>) -> Response<ResponseBody> {
    let state = &reloader.state;
    let path = req.uri().path();
    let probe = matches!(path, "/healthz" | "/readyz");
    if !probe && !authorized(state, req.headers()) {
        let mut resp = error(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "this admin endpoint needs Authorization: Bearer <admin_token>",
        );
        resp.headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        return resp;
    }
    match (req.method(), path) {
        (&Method::GET | &Method::HEAD, "/") => board(),
        (&Method::GET | &Method::HEAD, "/healthz") => {
            json_response(StatusCode::OK, &json!({"status": "ok"}))
        }
        (&Method::GET | &Method::HEAD, "/readyz") => readyz(state),
        (&Method::GET | &Method::HEAD, "/metrics") => metrics(state),
        (&Method::GET | &Method::HEAD, "/routes") => {
            json_response(StatusCode::OK, &view::RoutesView::new(&reloader))
        }
        (&Method::GET | &Method::HEAD, "/diffs") => diffs(state, req.uri().query()),
        (&Method::POST, "/guard/reset") => guard_reset(state, req.uri().query()),
        (&Method::POST, "/reload") => {
            let outcome = crate::reload::reload_async(reloader.clone()).await;
            let status = if outcome.ok {
                StatusCode::OK
            } else {
                StatusCode::UNPROCESSABLE_ENTITY
            };
            json_response(
                status,
                &serde_json::to_value(&outcome).unwrap_or(Value::Null),
            )
        }
        (
            _,
            "/healthz" | "/readyz" | "/metrics" | "/routes" | "/reload" | "/diffs" | "/guard/reset",
        ) => error(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "method not allowed on this admin endpoint",
        ),
        _ => error(
            StatusCode::NOT_FOUND,
            "not_found",
            "no such admin endpoint; try /routes, /metrics, /healthz, /readyz",
        ),
    }
}

/// The migration board: one self-contained page (no CDN) that polls `/routes` and `/diffs`.
const BOARD: &str = include_str!("admin/board.html");

fn board() -> Response<ResponseBody> {
    let mut resp = Response::new(ResponseBody::full(Bytes::from_static(BOARD.as_bytes())));
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'"),
    );
    resp
}

fn error(status: StatusCode, code: &str, message: &str) -> Response<ResponseBody> {
    json_response(status, &json!({"error": message, "code": code}))
}

/// Constant-time comparison of the bearer token (hashing first hides the length too).
fn authorized(state: &State, headers: &http::HeaderMap) -> bool {
    let Some(token) = &state.settings.admin_token else {
        return true;
    };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or_default();
    let (a, b) = (
        Sha256::digest(given.as_bytes()),
        Sha256::digest(token.as_bytes()),
    );
    a.iter()
        .zip(b.iter())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y))
        == 0
}

fn readyz(state: &State) -> Response<ResponseBody> {
    if state.ready.load(Ordering::Acquire) {
        json_response(
            StatusCode::OK,
            &json!({"status": "ready", "generation": state.active().generation}),
        )
    } else {
        json_response(
            StatusCode::SERVICE_UNAVAILABLE,
            &json!({"status": "not ready"}),
        )
    }
}

fn metrics(state: &State) -> Response<ResponseBody> {
    use crate::metrics::*;
    let m = state.metrics();
    if let Ok(rt) = tokio::runtime::Handle::try_current() {
        m.gauge(RUNTIME_ALIVE_TASKS, vec![])
            .set(rt.metrics().num_alive_tasks() as f64);
    }
    let listener = || vec![::metrics::Label::new("listener", "proxy")];
    let clients = &state.clients;
    m.counter(CONNECTIONS_ACCEPTED_TOTAL, listener())
        .absolute(clients.accepted.load(Ordering::Relaxed));
    m.gauge(CONNECTIONS_OPEN, listener())
        .set(clients.open.load(Ordering::Relaxed) as f64);
    let active = state.active();
    for upstream in active.upstreams.iter() {
        let (open, waiting) = upstream.endpoints.iter().fold((0, 0), |(o, w), e| {
            let (open, _, waiting) = e.connections();
            (o + open, w + waiting)
        });
        let backend = || vec![::metrics::Label::new("backend", upstream.name.clone())];
        m.gauge(UPSTREAM_CONNECTIONS, backend()).set(open as f64);
        m.gauge(UPSTREAM_WAITING, backend()).set(waiting as f64);
    }
    let mut resp = Response::new(ResponseBody::full(Bytes::from(state.metrics().render())));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    resp
}

/// `POST /guard/reset?route=PREFIX`: clears the tripped guard(s) of the route(s) with that
/// prefix (routes with the same prefix and different filters are reset together).
fn guard_reset(state: &State, query: Option<&str>) -> Response<ResponseBody> {
    let route = query
        .unwrap_or_default()
        .split('&')
        .find_map(|p| p.strip_prefix("route="))
        .and_then(percent_decode);
    let Some(route) = route.filter(|r| !r.is_empty()) else {
        return error(
            StatusCode::BAD_REQUEST,
            "bad_request",
            "POST /guard/reset needs ?route=PREFIX",
        );
    };
    let active = state.active();
    let guards: Vec<_> = active
        .routes
        .iter()
        .filter_map(|r| r.guard.as_ref())
        .filter(|g| g.prefix == route)
        .collect();
    if guards.is_empty() {
        return error(
            StatusCode::NOT_FOUND,
            "not_found",
            &format!("no route with prefix {route:?} has a guard"),
        );
    }
    let was_tripped = guards.iter().any(|g| g.is_tripped());
    guards.iter().for_each(|g| g.reset());
    json_response(
        StatusCode::OK,
        &json!({"route": route, "was_tripped": was_tripped, "guard_tripped": false}),
    )
}

/// Entries `GET /diffs` returns when `limit` is absent.
const DEFAULT_DIFFS_LIMIT: usize = 50;

/// `GET /diffs?route=PREFIX&limit=N`: recent mismatches, newest first.
fn diffs(state: &State, query: Option<&str>) -> Response<ResponseBody> {
    let mut route = None;
    let mut limit = DEFAULT_DIFFS_LIMIT;
    for pair in query
        .unwrap_or_default()
        .split('&')
        .filter(|p| !p.is_empty())
    {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let value = percent_decode(value);
        match (key, value) {
            ("route", Some(v)) => route = Some(v),
            ("limit", Some(v)) => match v.parse::<usize>() {
                Ok(n) if (1..=crate::shadow::report::MAX_DIFFS).contains(&n) => limit = n,
                _ => {
                    return error(
                        StatusCode::BAD_REQUEST,
                        "bad_request",
                        &format!(
                            "limit must be a number from 1 to {}",
                            crate::shadow::report::MAX_DIFFS
                        ),
                    )
                }
            },
            _ => {
                return error(
                    StatusCode::BAD_REQUEST,
                    "bad_request",
                    &format!(
                        "unknown or malformed query parameter {key:?}; expected route and limit"
                    ),
                )
            }
        }
    }
    let entries = state.shadows().diffs.recent(route.as_deref(), limit);
    json_response(
        StatusCode::OK,
        &Value::Array(entries.iter().map(|e| e.to_json()).collect()),
    )
}

/// Decodes `%XX` escapes and `+`; `None` when the result is not UTF-8 or an escape is bad.
fn percent_decode(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

/// The route's stage, or `rolled back by guard` while its guard is tripped.
pub fn stage(active: &Active, id: crate::routes::RouteId) -> String {
    match &active.routes[id].guard {
        Some(g) if g.is_tripped() => "rolled back by guard".to_string(),
        _ => active.table.stage(id).to_string(),
    }
}

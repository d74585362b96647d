//! The request path's side of `[events]`: `write` events for successful writes (with bounded
//! copies of both bodies when the route asks), and sampled `request` events. Nothing here
//! waits: events go to [`Events::emit`], which drops and counts when its buffer is full.

use std::sync::Arc;

use http::uri::PathAndQuery;
use http::{header, HeaderMap, Method, Request, StatusCode};
use hyper::body::Incoming;
use tokio::sync::oneshot;

use super::{Ctx, Routed};
use crate::events::{Body, Event, Events, RequestFacts};
use crate::routes::events::RouteEvents;

use crate::upstream::tee::{Captured, Tee};

/// Whether a method changes state (a `write` event is published for its 2xx answers).
fn is_write(method: &Method) -> bool {
    matches!(
        *method,
        Method::POST | Method::PUT | Method::PATCH | Method::DELETE
    )
}

/// The path an event shows: with the query string only when the route asks for it (query
/// strings carry tokens more often than anyone expects).
fn shown_path(settings: &RouteEvents, pq: Option<&PathAndQuery>) -> String {
    match pq {
        Some(pq) if settings.query => pq.as_str().to_string(),
        Some(pq) => pq.path().to_string(),
        None => "/".to_string(),
    }
}

fn content_type(headers: &HeaderMap) -> Option<String> {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

/// The request body's copy for a write event.
enum RequestBody {
    /// Known to be empty.
    Empty,
    Pending(oneshot::Receiver<Captured>),
}

/// A write event waiting for its answer: published only for a 2xx.
pub(super) struct Write {
    events: Arc<Events>,
    key: String,
    request_id: String,
    route: String,
    method: String,
    path: String,
    /// Body cap (0: no bodies).
    cap: usize,
    request_type: Option<String>,
    request_body: RequestBody,
}

/// A write event for this request, if its route publishes them and events are on; with the
/// tee that copies its request body (when the route captures bodies).
pub(super) fn plan_write(
    cx: &Ctx<'_>,
    routed: &Routed<'_>,
    req: &Request<Incoming>,
) -> Option<(Write, Option<Tee>)> {
    let settings = routed.route.events.as_ref().filter(|e| e.write)?;
    if !is_write(req.method()) {
        return None;
    }
    let events = cx.state.events()?.clone();
    let (request_body, tee) = if settings.body == 0 || http_body::Body::is_end_stream(req.body()) {
        (RequestBody::Empty, None)
    } else {
        let (tee, rx) = events.capture_request(settings.body);
        (RequestBody::Pending(rx), Some(tee))
    };
    let write = Write {
        key: settings.key.clone(),
        request_id: cx.request_id.to_str().unwrap_or_default().to_string(),
        route: routed.route.prefix.clone(),
        method: req.method().to_string(),
        path: shown_path(settings, req.uri().path_and_query()),
        cap: settings.body,
        request_type: content_type(req.headers()),
        request_body,
        events,
    };
    Some((write, tee))
}

impl Write {
    /// The backend answered: a 2xx publishes the event, at once without bodies, or when the
    /// response body ends (the returned tee copies it). Anything else publishes nothing.
    pub(super) fn answered(
        self,
        backend: &str,
        status: StatusCode,
        headers: &HeaderMap,
    ) -> Option<Tee> {
        if !status.is_success() {
            return None;
        }
        let status = status.as_u16();
        let backend = backend.to_string();
        if self.cap == 0 {
            let event = Event::write(&self.key, &self.facts(&backend, status), None);
            self.events.emit(event);
            return None;
        }
        let response_type = content_type(headers);
        let events = self.events.clone();
        Some(events.capture(self.cap, move |response| {
            let request = match self.request_body {
                RequestBody::Empty => Body::render(
                    self.request_type.as_deref(),
                    Some(Captured::Body(crate::upstream::tee::Held::empty(
                        &self.events.capture,
                    ))),
                ),
                RequestBody::Pending(mut rx) => {
                    Body::render(self.request_type.as_deref(), rx.try_recv().ok())
                }
            };
            let response = Body::render(response_type.as_deref(), response);
            let facts = RequestFacts {
                request_id: &self.request_id,
                route: &self.route,
                method: &self.method,
                path: &self.path,
                backend: &backend,
                status,
            };
            let event = Event::write(&self.key, &facts, Some((request, response)));
            self.events.emit(event);
        }))
    }

    fn facts<'a>(&'a self, backend: &'a str, status: u16) -> RequestFacts<'a> {
        RequestFacts {
            request_id: &self.request_id,
            route: &self.route,
            method: &self.method,
            path: &self.path,
            backend,
            status,
        }
    }
}

/// A sampled `request` event of an answered request (refused ones too, with backend
/// `none`).
pub(super) fn request_event(
    cx: &Ctx<'_>,
    events: &Events,
    method: &Method,
    pq: Option<&PathAndQuery>,
    status: StatusCode,
) {
    let Some(route) = cx.route.map(|id| cx.active.table.route(id)) else {
        return;
    };
    let Some(settings) = route.events.as_ref().filter(|e| e.request) else {
        return;
    };
    if settings.sample < 1.0 && fastrand::f64() >= settings.sample {
        return;
    }
    let path = shown_path(settings, pq);
    let backend = cx.backend.map(|b| cx.active.table.backend(b).name.as_str());
    let facts = RequestFacts {
        request_id: cx.request_id.to_str().unwrap_or_default(),
        route: &route.prefix,
        method: method.as_str(),
        path: &path,
        backend: backend.unwrap_or(crate::metrics::NO_ROUTE),
        status: status.as_u16(),
    };
    events.emit(Event::request(&settings.key, &facts, cx.start.elapsed()));
}

//! users-service: the users endpoints of FitTrack, extracted from the monolith. Same seed
//! data, same JSON shape. Shadow copies (`x-strangler-shadow: 1`) are answered but never
//! kept, so mirroring writes has no side effects. `Bug::EmailCase` answers one field
//! differently, to give a shadow comparison something real to find.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};

use http::{Method, Request, StatusCode};
use hyper::body::Incoming;
use legacy_stub::http::{error, read_json, Resp};
use legacy_stub::users::UserStore;
use serde_json::Value;
use tokio::net::TcpListener;

/// A deliberate divergence from the monolith.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Bug {
    /// Lower-cases `email`, which the monolith stores as given.
    EmailCase,
}

pub struct UsersService {
    store: Mutex<UserStore>,
    bug: Option<Bug>,
}

impl UsersService {
    pub fn new(bug: Option<Bug>) -> Arc<Self> {
        Arc::new(UsersService {
            store: Mutex::new(UserStore::default()),
            bug,
        })
    }

    pub async fn handle(self: Arc<Self>, req: Request<Incoming>) -> Resp {
        let path = req.uri().path().to_string();
        let segs: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
        let id = match segs.as_slice() {
            ["healthz"] => {
                return legacy_stub::respond(
                    StatusCode::OK,
                    Some(serde_json::json!({ "status": "ok" })),
                )
            }
            ["api", "users"] => None,
            ["api", "users", id] => Some(id.to_string()),
            _ => return error(StatusCode::NOT_FOUND, &format!("no such endpoint: {path}")),
        };
        let shadow = req
            .headers()
            .get("x-strangler-shadow")
            .is_some_and(|v| v == "1");
        let method = req.method().clone();
        let body = if matches!(method, Method::POST | Method::PUT) {
            match read_json(req).await {
                Ok((_, v)) => Some(v),
                Err(resp) => return resp,
            }
        } else {
            None
        };
        let (status, mut value) = self
            .store
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .handle(&method, id.as_deref(), body.as_ref(), !shadow);
        if self.bug == Some(Bug::EmailCase) {
            if let Some(v) = value.as_mut() {
                lowercase_emails(v);
            }
        }
        legacy_stub::respond(status, value)
    }
}

fn lowercase_emails(v: &mut Value) {
    match v {
        Value::Object(map) => {
            for (k, child) in map.iter_mut() {
                match child {
                    Value::String(s) if k == "email" => *s = s.to_lowercase(),
                    _ => lowercase_emails(child),
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(lowercase_emails),
        _ => {}
    }
}

/// Serves the users service on `listener` until `shutdown` resolves.
pub async fn serve(listener: TcpListener, bug: Option<Bug>, shutdown: impl Future<Output = ()>) {
    let app = UsersService::new(bug);
    legacy_stub::http::serve(
        listener,
        move |req, _peer: SocketAddr| app.clone().handle(req),
        shutdown,
    )
    .await;
}

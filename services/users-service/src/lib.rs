//! users-service: the users endpoints of FitTrack, extracted from the monolith. Same seed
//! data, same JSON shape. Shadow copies (`x-strangler-shadow: 1`) are answered but never
//! kept, so mirroring writes has no side effects. `Bug::EmailCase` answers one field
//! differently, to give a shadow comparison something real to find.
//!
//! With an [`EventsSource`] ([`serve_with_events`]), it also applies the writes the monolith
//! answered, as the proxy publishes them on RabbitMQ, to the same store (see [`events`]).

pub mod events;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};

use http::{Method, Request, StatusCode};
use hyper::body::Incoming;
use legacy_stub::http::{error, read_json, Resp};
use legacy_stub::seed::User;
use legacy_stub::users::UserStore;
use serde_json::Value;
use tokio::net::TcpListener;

pub use events::{consume_writes, BadUrl, EventsSource};

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

    /// The stored user with `id`, as kept (without the `bug`).
    pub fn user(&self, id: u64) -> Option<User> {
        self.users().get(id).cloned()
    }

    /// Stores `user` under its id (created or replaced); returns the user it replaced.
    pub fn upsert_user(&self, user: User) -> Option<User> {
        self.users().upsert(user)
    }

    /// Removes the user with `id`; returns it, or `None` when there was none.
    pub fn remove_user(&self, id: u64) -> Option<User> {
        self.users().remove(id)
    }

    fn users(&self) -> std::sync::MutexGuard<'_, UserStore> {
        self.store.lock().unwrap_or_else(PoisonError::into_inner)
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
        let (status, mut value) =
            self.users()
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
    serve_with_events(listener, bug, None, shutdown).await;
}

/// Serves the users endpoints on `listener` (as [`serve`]) and, when `events` is `Some`,
/// applies the proxy's write events for `/api/users` from that broker to the same store
/// ([`consume_writes`]: a `POST`/`PUT`/`PATCH` event creates or replaces the answered user, a
/// `DELETE` event removes it), until `shutdown` resolves; then both stop and this returns.
///
/// The consumer never makes this fail: while the broker is unreachable the HTTP server
/// answers as usual and the consumer retries (100 ms, doubling up to 5 s) in the background.
/// Events reach the store only if the route publishes them with a body cap
/// (`events = { kinds = ["write"], body = "16KiB" }`): without the captured response body a
/// `POST` or `PUT` event is skipped (logged at warn). With `events = None` this is [`serve`].
pub async fn serve_with_events(
    listener: TcpListener,
    bug: Option<Bug>,
    events: Option<EventsSource>,
    shutdown: impl Future<Output = ()>,
) {
    serve_service(listener, UsersService::new(bug), events, shutdown).await;
}

/// [`serve_with_events`] on a given `service` (whose store a caller can also read or change).
pub async fn serve_service(
    listener: TcpListener,
    service: Arc<UsersService>,
    events: Option<EventsSource>,
    shutdown: impl Future<Output = ()>,
) {
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let consumer = events.map(|source| {
        let mut stop = stop_rx.clone();
        tokio::spawn(consume_writes(service.clone(), source, async move {
            let _ = stop.wait_for(|&s| s).await;
        }))
    });
    let app = service;
    legacy_stub::http::serve(
        listener,
        move |req, _peer: SocketAddr| app.clone().handle(req),
        async {
            shutdown.await;
            let _ = stop_tx.send(true);
        },
    )
    .await;
    let _ = stop_tx.send(true);
    if let Some(task) = consumer {
        let _ = task.await;
    }
}

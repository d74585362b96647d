//! legacy-stub: a stand-in for the FitTrack monolith (a Node.js app in the story): users,
//! workouts and a social feed over deterministic in-memory data, every JSON answer stamped
//! with a nondeterministic `generated_at`. Flags make it misbehave on purpose: added latency,
//! a random error rate, and paths that always fail.

pub mod http;
pub mod seed;
pub mod users;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use ::http::{Method, Request, StatusCode};
use hyper::body::Incoming;
use serde_json::{json, Value};
use tokio::net::TcpListener;

use crate::http::{error, json, now, read_json, Resp};
use crate::seed::{Post, Workout};
use crate::users::UserStore;

/// How the monolith misbehaves.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Added to every answer.
    pub latency: Option<Duration>,
    /// Share of requests answered 500, 0..=1.
    pub error_rate: f64,
    /// Path prefixes always answered 500.
    pub fail_paths: Vec<String>,
}

#[derive(Debug)]
struct Db {
    users: UserStore,
    workouts: Vec<Workout>,
    posts: Vec<Post>,
}

/// The monolith.
pub struct Legacy {
    db: Mutex<Db>,
    opts: Options,
}

impl Legacy {
    pub fn new(opts: Options) -> Arc<Self> {
        let db = Db {
            users: UserStore::default(),
            workouts: seed::workouts(),
            posts: seed::posts(),
        };
        Arc::new(Legacy {
            db: Mutex::new(db),
            opts,
        })
    }

    fn fails(&self, path: &str) -> bool {
        let by_path = self
            .opts
            .fail_paths
            .iter()
            .any(|p| path == p || path.starts_with(&format!("{}/", p.trim_end_matches('/'))));
        by_path || (self.opts.error_rate > 0.0 && fastrand::f64() < self.opts.error_rate)
    }

    pub async fn handle(self: Arc<Self>, req: Request<Incoming>) -> Resp {
        if let Some(latency) = self.opts.latency {
            tokio::time::sleep(latency).await;
        }
        let path = req.uri().path().to_string();
        if path != "/healthz" && self.fails(&path) {
            return json(
                StatusCode::INTERNAL_SERVER_ERROR,
                &json!({ "error": "internal server error", "generated_at": now() }),
            );
        }
        let segments: Vec<String> = path
            .split('/')
            .filter(|s| !s.is_empty())
            .map(String::from)
            .collect();
        let segs: Vec<&str> = segments.iter().map(String::as_str).collect();
        let method = req.method().clone();
        let query = req.uri().query().unwrap_or_default().to_string();
        let needs_body = matches!(method, Method::POST | Method::PUT);
        let body = if needs_body {
            match read_json(req).await {
                Ok((_, v)) => Some(v),
                Err(resp) => return resp,
            }
        } else {
            None
        };
        let mut db = self.db.lock().unwrap_or_else(PoisonError::into_inner);
        let (status, value) = match (&method, segs.as_slice()) {
            (_, ["healthz"]) => (StatusCode::OK, Some(json!({ "status": "ok" }))),
            (_, ["api", "users"]) => db.users.handle(&method, None, body.as_ref(), true),
            (_, ["api", "users", id]) => db.users.handle(&method, Some(id), body.as_ref(), true),
            (&Method::GET, ["api", "workouts"]) => {
                let user = query
                    .split('&')
                    .find_map(|kv| kv.strip_prefix("user_id="))
                    .and_then(|v| v.parse::<u64>().ok());
                let list: Vec<&Workout> = db
                    .workouts
                    .iter()
                    .filter(|w| user.is_none_or(|u| w.user_id == u))
                    .collect();
                (
                    StatusCode::OK,
                    Some(json!({ "workouts": list, "total": list.len() })),
                )
            }
            (&Method::POST, ["api", "workouts"]) => create_workout(&mut db, body.as_ref()),
            (&Method::GET, ["api", "workouts", id]) => match id
                .parse::<u64>()
                .ok()
                .and_then(|id| db.workouts.iter().find(|w| w.id == id))
            {
                Some(w) => (StatusCode::OK, Some(json!({ "workout": w }))),
                None => (
                    StatusCode::NOT_FOUND,
                    Some(json!({ "error": format!("workout {id} not found") })),
                ),
            },
            (&Method::GET, ["api", "social", "feed"]) => {
                let mut posts: Vec<&Post> = db.posts.iter().collect();
                posts.sort_by(|a, b| b.created_at.cmp(&a.created_at).then(b.id.cmp(&a.id)));
                (
                    StatusCode::OK,
                    Some(json!({ "posts": posts, "total": posts.len() })),
                )
            }
            (&Method::POST, ["api", "social", "posts"]) => create_post(&mut db, body.as_ref()),
            (_, ["api", "workouts", ..] | ["api", "social", "feed" | "posts"]) => (
                StatusCode::METHOD_NOT_ALLOWED,
                Some(json!({ "error": format!("{method} is not allowed here") })),
            ),
            _ => return error(StatusCode::NOT_FOUND, &format!("no such endpoint: {path}")),
        };
        drop(db);
        respond(status, value)
    }
}

/// Adds `generated_at` to a JSON object answer; `None` is 204-style no content.
pub fn respond(status: StatusCode, value: Option<Value>) -> Resp {
    match value {
        Some(mut v) => {
            v["generated_at"] = Value::String(now());
            json(status, &v)
        }
        None => {
            let mut resp = Resp::new(Default::default());
            *resp.status_mut() = status;
            resp
        }
    }
}

fn create_workout(db: &mut Db, body: Option<&Value>) -> (StatusCode, Option<Value>) {
    let b = body.cloned().unwrap_or_default();
    let (Some(user_id), Some(kind), Some(duration)) = (
        b["user_id"].as_u64(),
        b["kind"].as_str(),
        b["duration_min"].as_u64(),
    ) else {
        return (
            StatusCode::BAD_REQUEST,
            Some(json!({ "error": "`user_id`, `kind` and `duration_min` are required" })),
        );
    };
    let id = db.workouts.iter().map(|w| w.id).max().unwrap_or(0) + 1;
    let w = Workout {
        id,
        user_id,
        kind: kind.to_string(),
        duration_min: duration,
        distance_km: b["distance_km"].as_f64().unwrap_or(0.0),
        date: "2026-11-22".into(),
    };
    db.workouts.push(w.clone());
    (StatusCode::CREATED, Some(json!({ "workout": w })))
}

fn create_post(db: &mut Db, body: Option<&Value>) -> (StatusCode, Option<Value>) {
    let b = body.cloned().unwrap_or_default();
    let (Some(user_id), Some(text)) = (
        b["user_id"].as_u64(),
        b["text"]
            .as_str()
            .filter(|t| !t.is_empty() && t.len() <= 500),
    ) else {
        return (
            StatusCode::BAD_REQUEST,
            Some(json!({ "error": "`user_id` and `text` (1-500 characters) are required" })),
        );
    };
    let id = db.posts.iter().map(|p| p.id).max().unwrap_or(0) + 1;
    let p = Post {
        id,
        user_id,
        text: text.to_string(),
        likes: 0,
        created_at: now(),
    };
    db.posts.push(p.clone());
    (StatusCode::CREATED, Some(json!({ "post": p })))
}

/// Serves the monolith on `listener` until `shutdown` resolves.
pub async fn serve(listener: TcpListener, opts: Options, shutdown: impl Future<Output = ()>) {
    let app = Legacy::new(opts);
    crate::http::serve(
        listener,
        move |req, _peer: SocketAddr| app.clone().handle(req),
        shutdown,
    )
    .await;
}

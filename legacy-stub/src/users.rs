//! The users domain of FitTrack: the part being extracted. The monolith and the extracted
//! `users-service` both serve it; `commit = false` computes a write's answer without keeping
//! it (what a service does with a shadow copy marked `x-strangler-shadow: 1`).

use std::collections::BTreeMap;

use http::{Method, StatusCode};
use serde_json::{json, Value};

use crate::seed::{self, User};

/// The users table.
#[derive(Debug, Clone)]
pub struct UserStore {
    users: BTreeMap<u64, User>,
    next_id: u64,
}

impl Default for UserStore {
    fn default() -> Self {
        let users: BTreeMap<u64, User> = seed::users().into_iter().map(|u| (u.id, u)).collect();
        let next_id = users.keys().max().map_or(1, |m| m + 1);
        UserStore { users, next_id }
    }
}

/// A text field of a JSON body: required on create, optional on update.
fn field<'a>(body: &'a Value, name: &str) -> Result<Option<&'a str>, String> {
    match body.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if !s.trim().is_empty() && s.len() <= 200 => Ok(Some(s)),
        Some(_) => Err(format!(
            "`{name}` must be a non-empty string of at most 200 characters"
        )),
    }
}

impl UserStore {
    /// The user with `id`, if any.
    pub fn get(&self, id: u64) -> Option<&User> {
        self.users.get(&id)
    }

    /// Stores `user` under its own id, replacing any user with that id, and keeps the next
    /// id handed out by `POST` past every stored id. Returns the replaced user.
    pub fn upsert(&mut self, user: User) -> Option<User> {
        self.next_id = self.next_id.max(user.id.saturating_add(1));
        self.users.insert(user.id, user)
    }

    /// Removes the user with `id`; returns it, or `None` when there was none.
    pub fn remove(&mut self, id: u64) -> Option<User> {
        self.users.remove(&id)
    }

    fn apply(&mut self, user: &mut User, body: &Value) -> Result<(), String> {
        if let Some(name) = field(body, "name")? {
            user.name = name.to_string();
        }
        if let Some(email) = field(body, "email")? {
            if !email.contains('@') {
                return Err("`email` must contain @".into());
            }
            user.email = email.to_string();
        }
        if let Some(plan) = field(body, "plan")? {
            if !matches!(plan, "free" | "pro") {
                return Err("`plan` must be \"free\" or \"pro\"".into());
            }
            user.plan = plan.to_string();
        }
        Ok(())
    }

    /// Answers `METHOD /api/users[/ID]` as `(status, body)`; `None` body means no content.
    pub fn handle(
        &mut self,
        method: &Method,
        id: Option<&str>,
        body: Option<&Value>,
        commit: bool,
    ) -> (StatusCode, Option<Value>) {
        if !commit {
            return self.clone().handle(method, id, body, true);
        }
        let empty = json!({});
        let body = body.unwrap_or(&empty);
        let err = |status, msg: String| (status, Some(json!({ "error": msg })));
        let id = match id.map(str::parse::<u64>) {
            None => None,
            Some(Ok(id)) => Some(id),
            Some(Err(_)) => return err(StatusCode::BAD_REQUEST, "user id must be a number".into()),
        };
        match (method, id) {
            (&Method::GET, None) => {
                let users: Vec<&User> = self.users.values().collect();
                (
                    StatusCode::OK,
                    Some(json!({ "users": users, "total": users.len() })),
                )
            }
            (&Method::POST, None) => {
                let (Ok(Some(_)), Ok(Some(_))) = (field(body, "name"), field(body, "email")) else {
                    return err(
                        StatusCode::BAD_REQUEST,
                        "`name` and `email` are required strings".into(),
                    );
                };
                let mut user = User {
                    id: self.next_id,
                    name: String::new(),
                    email: String::new(),
                    plan: "free".into(),
                    joined: "2026-11-22".into(),
                };
                if let Err(e) = self.apply(&mut user, body) {
                    return err(StatusCode::BAD_REQUEST, e);
                }
                self.next_id += 1;
                self.users.insert(user.id, user.clone());
                (StatusCode::CREATED, Some(json!({ "user": user })))
            }
            (&Method::GET, Some(id)) => match self.users.get(&id) {
                Some(u) => (StatusCode::OK, Some(json!({ "user": u }))),
                None => err(StatusCode::NOT_FOUND, format!("user {id} not found")),
            },
            (&Method::PUT, Some(id)) => {
                let Some(mut user) = self.users.get(&id).cloned() else {
                    return err(StatusCode::NOT_FOUND, format!("user {id} not found"));
                };
                if let Err(e) = self.apply(&mut user, body) {
                    return err(StatusCode::BAD_REQUEST, e);
                }
                self.users.insert(id, user.clone());
                (StatusCode::OK, Some(json!({ "user": user })))
            }
            (&Method::DELETE, Some(id)) => match self.users.remove(&id) {
                Some(_) => (StatusCode::NO_CONTENT, None),
                None => err(StatusCode::NOT_FOUND, format!("user {id} not found")),
            },
            _ => err(
                StatusCode::METHOD_NOT_ALLOWED,
                format!("{method} is not allowed here"),
            ),
        }
    }
}

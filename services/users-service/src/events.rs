//! Keeping users-service's store in step with the writes the monolith still answers: the
//! proxy publishes a CloudEvent for every successful write of a route with
//! `events = ["write"]` on a durable topic exchange (default `strangler`), routing key
//! `write.<route key>`; for `/api/users` that is `write.api.users`. [`consume_writes`] reads
//! them from a durable queue of its own (default `users-service.writes`) and applies each to
//! the store the HTTP server answers from:
//!
//! * `POST`, `PUT` or `PATCH` answered 2xx with a JSON response body `{"user": {...}}`: that
//!   user is stored under its own id (created or replaced);
//! * `DELETE /api/users/{id}` answered 2xx: the user is removed.
//!
//! Applying is idempotent, so a redelivered event, or the event of a write users-service
//! answered itself (after cut-over), changes nothing. An event it cannot apply (not JSON, not
//! a `dev.strangler.write` event, no response body captured because the route sets no
//! `body` cap, a body over the cap or not JSON, an unexpected shape) is logged at warn with
//! its id and acknowledged: it is never requeued. Messages are acknowledged one by one after
//! they are applied, so a message in flight when the connection drops is delivered again.
//!
//! The consumer connects with amqprs and reconnects on its own: 100 ms after a failure, the
//! wait doubling up to 5 s, one warn line per outage and one info line when it is back.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use amqp_url::AmqpUrl;
use amqprs::channel::{
    BasicAckArguments, BasicConsumeArguments, BasicQosArguments, Channel, ConsumerMessage,
    ExchangeDeclareArguments, ExchangeType, QueueBindArguments, QueueDeclareArguments,
};
use amqprs::connection::Connection;
use legacy_stub::seed::User;
use serde_json::Value;
use tokio::sync::mpsc::UnboundedReceiver;
use tracing::{debug, info, warn};

use crate::UsersService;

/// The exchange the proxy publishes on unless `[events]` names another.
pub const DEFAULT_EXCHANGE: &str = "strangler";
/// The queue users-service consumes from unless told otherwise.
pub const DEFAULT_QUEUE: &str = "users-service.writes";
/// The routing key of the proxy's write events for the route `/api/users`.
pub const ROUTING_KEY: &str = "write.api.users";
/// The CloudEvents `type` of a write event.
pub const WRITE_EVENT_TYPE: &str = "dev.strangler.write";

/// The wait after the first failed attempt; it doubles on each failure after that.
const MIN_BACKOFF: Duration = Duration::from_millis(100);
/// The longest wait between two attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// How long connecting and subscribing may take before the attempt counts as failed.
const SUBSCRIBE_TIMEOUT: Duration = Duration::from_secs(10);
/// Unacknowledged deliveries the broker may have in flight to us.
const PREFETCH: u16 = 64;
/// The route whose writes this consumer applies.
const ROUTE: &str = "/api/users";

/// Where the write events come from: a broker URL, an exchange and a queue name.
///
/// The URL's password is never shown: `Debug` and [`EventsSource::endpoint`] print
/// `amqp://USER@HOST:PORT/VHOST`.
#[derive(Clone)]
pub struct EventsSource {
    broker: AmqpUrl,
    exchange: String,
    queue: String,
}

impl EventsSource {
    /// A source on the broker at `url` (`amqp://USER:PASSWORD@HOST:PORT/VHOST`, parts
    /// percent-encoded, vhost `%2f` for `/`; `?heartbeat=SECONDS` optional), with the
    /// default exchange [`DEFAULT_EXCHANGE`] and queue [`DEFAULT_QUEUE`].
    ///
    /// # Errors
    ///
    /// When `url` is not such a URL; the message never repeats the password.
    pub fn new(url: &str) -> Result<Self, BadUrl> {
        Ok(EventsSource {
            broker: AmqpUrl::parse(url).map_err(BadUrl)?,
            exchange: DEFAULT_EXCHANGE.to_string(),
            queue: DEFAULT_QUEUE.to_string(),
        })
    }

    /// The same source reading events from `exchange`.
    pub fn with_exchange(mut self, exchange: &str) -> Self {
        self.exchange = exchange.to_string();
        self
    }

    /// The same source consuming from `queue`.
    pub fn with_queue(mut self, queue: &str) -> Self {
        self.queue = queue.to_string();
        self
    }

    pub fn exchange(&self) -> &str {
        &self.exchange
    }

    pub fn queue(&self) -> &str {
        &self.queue
    }

    /// `amqp://USER@HOST:PORT/VHOST`, for logs.
    pub fn endpoint(&self) -> String {
        self.broker.to_string()
    }
}

impl std::fmt::Debug for EventsSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventsSource")
            .field("broker", &self.broker.to_string())
            .field("exchange", &self.exchange)
            .field("queue", &self.queue)
            .finish()
    }
}

/// Why a broker URL was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadUrl(String);

impl std::fmt::Display for BadUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "bad AMQP URL: {}", self.0)
    }
}

impl std::error::Error for BadUrl {}

/// What one event did to the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The user with this id was created or replaced.
    Upserted { id: u64 },
    /// The user with this id was removed (`existed: false`: there was none already).
    Removed { id: u64, existed: bool },
    /// Nothing changed; why.
    Skipped { reason: String },
}

/// Applies one message body (a CloudEvents 1.0 structured-mode write event) to `service`'s
/// store. Returns the event's `id` (`"-"` when it has none) and what it did.
pub fn apply_event(service: &UsersService, body: &[u8]) -> (String, Outcome) {
    let event: Value = match serde_json::from_slice(body) {
        Ok(v) => v,
        Err(e) => return ("-".to_string(), skipped(format!("not JSON: {e}"))),
    };
    let id = event
        .get("id")
        .and_then(Value::as_str)
        .unwrap_or("-")
        .to_string();
    let outcome = match write_of(&event) {
        Ok(Write::Upsert(user)) => {
            let id = user.id;
            service.upsert_user(user);
            Outcome::Upserted { id }
        }
        Ok(Write::Remove(id)) => Outcome::Removed {
            id,
            existed: service.remove_user(id).is_some(),
        },
        Err(reason) => skipped(reason),
    };
    (id, outcome)
}

fn skipped(reason: String) -> Outcome {
    Outcome::Skipped { reason }
}

/// The change an event asks for.
enum Write {
    Upsert(User),
    Remove(u64),
}

/// Reads the change out of a write event, or says why there is none to apply.
fn write_of(event: &Value) -> Result<Write, String> {
    if !event.is_object() {
        return Err("not a JSON object".into());
    }
    let text = |v: &Value, name: &str| v.get(name).and_then(Value::as_str).map(str::to_string);
    match text(event, "specversion").as_deref() {
        Some("1.0") => {}
        other => return Err(format!("specversion {other:?} is not \"1.0\"")),
    }
    match text(event, "type").as_deref() {
        Some(WRITE_EVENT_TYPE) => {}
        other => return Err(format!("type {other:?} is not {WRITE_EVENT_TYPE:?}")),
    }
    let Some(data) = event.get("data").filter(|d| d.is_object()) else {
        return Err("no `data` object".into());
    };
    let Some(method) = text(data, "method") else {
        return Err("no `data.method`".into());
    };
    let Some(status) = data.get("status").and_then(Value::as_u64) else {
        return Err("no `data.status`".into());
    };
    if !(200..300).contains(&status) {
        return Err(format!("status {status} is not a success"));
    }
    let Some(path) = text(data, "path") else {
        return Err("no `data.path`".into());
    };
    let route = text(data, "route").unwrap_or_else(|| ROUTE.to_string());
    let path_id = user_id_in(&path, &route)?;
    match method.as_str() {
        "POST" | "PUT" | "PATCH" => {
            let user = answered_user(data)?;
            match path_id {
                Some(id) if id != user.id => {
                    Err(format!("{method} {path} answered user {} instead", user.id))
                }
                _ => Ok(Write::Upsert(user)),
            }
        }
        "DELETE" => match path_id {
            Some(id) => Ok(Write::Remove(id)),
            None => Err(format!("DELETE {path} names no user")),
        },
        other => Err(format!(
            "method {other} is not a write users-service applies"
        )),
    }
}

/// The user id in `path` (`ROUTE/ID`, query string ignored): `None` for the collection
/// itself.
fn user_id_in(path: &str, route: &str) -> Result<Option<u64>, String> {
    let path = path.split('?').next().unwrap_or(path);
    let Some(rest) = path.strip_prefix(route) else {
        return Err(format!("path {path} is not under {route}"));
    };
    let rest = rest.trim_end_matches('/');
    if rest.is_empty() {
        return Ok(None);
    }
    match rest.strip_prefix('/').map(str::parse::<u64>) {
        Some(Ok(id)) => Ok(Some(id)),
        _ => Err(format!("path {path} is not {route} or {route}/ID")),
    }
}

/// The `user` of the captured JSON response body.
fn answered_user(data: &Value) -> Result<User, String> {
    let Some(response) = data.get("response") else {
        return Err("no response body captured (the route's events set no `body` cap)".to_string());
    };
    let Some(body) = response.get("body") else {
        let why = if let Some(o) = response.get("omitted").and_then(Value::as_str) {
            format!("response body omitted: {o}")
        } else if response.get("text").is_some() || response.get("base64").is_some() {
            "the response body is not JSON".to_string()
        } else {
            "the response has no `body`".to_string()
        };
        return Err(why);
    };
    let Some(user) = body.get("user") else {
        return Err("the response body has no `user`".into());
    };
    serde_json::from_value(user.clone())
        .map_err(|e| format!("the answered user is not a user: {e}"))
}

/// Consumes the write events of `/api/users` from `source` and applies them to `service`'s
/// store until `shutdown` resolves. Declares the exchange (durable topic, as the proxy does)
/// and a durable queue bound to [`ROUTING_KEY`]; acknowledges each message after applying or
/// skipping it. Never returns an error: when the broker is unreachable or the connection
/// drops it tries again (100 ms, doubling up to 5 s), logging one warn line per outage.
pub async fn consume_writes(
    service: Arc<UsersService>,
    source: EventsSource,
    shutdown: impl Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    let endpoint = source.endpoint();
    let mut backoff = MIN_BACKOFF;
    // Since when the broker has been away (set at the first failure of an outage).
    let mut outage: Option<Instant> = None;
    loop {
        let subscribed = tokio::select! {
            _ = &mut shutdown => return,
            s = tokio::time::timeout(SUBSCRIBE_TIMEOUT, subscribe(&source)) => s,
        };
        let failure = match subscribed {
            Err(_) => format!("no answer within {SUBSCRIBE_TIMEOUT:?}"),
            Ok(Err(e)) => e,
            Ok(Ok(mut session)) => {
                match outage.take() {
                    Some(since) => info!(
                        broker = %endpoint, queue = %source.queue,
                        "events: consuming again after {:.1?} without the broker",
                        since.elapsed()
                    ),
                    None => info!(
                        broker = %endpoint, exchange = %source.exchange, queue = %source.queue,
                        "events: consuming {ROUTING_KEY} events"
                    ),
                }
                backoff = MIN_BACKOFF;
                match session.run(&service, &mut shutdown).await {
                    None => {
                        session.close().await;
                        return;
                    }
                    Some(lost) => lost,
                }
            }
        };
        if outage.is_none() {
            warn!(
                broker = %endpoint, error = %failure,
                "events: broker unavailable; retrying (after {MIN_BACKOFF:?}, doubling up to {MAX_BACKOFF:?}) until it is back"
            );
            outage = Some(Instant::now());
        } else {
            debug!(broker = %endpoint, error = %failure, "events: still no broker");
        }
        tokio::select! {
            _ = &mut shutdown => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// A connection consuming the queue.
struct Session {
    connection: Connection,
    channel: Channel,
    deliveries: UnboundedReceiver<ConsumerMessage>,
}

/// Connects, declares the exchange, the queue and its binding, and starts consuming.
async fn subscribe(source: &EventsSource) -> Result<Session, String> {
    let connection = Connection::open(&source.broker.open_args("users-service events", 60))
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let channel = connection
        .open_channel(None)
        .await
        .map_err(|e| format!("open channel: {e}"))?;
    channel
        .exchange_declare(
            ExchangeDeclareArguments::of_type(&source.exchange, ExchangeType::Topic)
                .durable(true)
                .auto_delete(false)
                .finish(),
        )
        .await
        .map_err(|e| format!("declare exchange {}: {e}", source.exchange))?;
    channel
        .queue_declare(QueueDeclareArguments::durable_client_named(&source.queue))
        .await
        .map_err(|e| format!("declare queue {}: {e}", source.queue))?;
    channel
        .queue_bind(QueueBindArguments::new(
            &source.queue,
            &source.exchange,
            ROUTING_KEY,
        ))
        .await
        .map_err(|e| format!("bind queue {} to {}: {e}", source.queue, source.exchange))?;
    channel
        .basic_qos(BasicQosArguments::new(0, PREFETCH, false))
        .await
        .map_err(|e| format!("qos: {e}"))?;
    let (_, deliveries) = channel
        .basic_consume_rx(
            BasicConsumeArguments::new(&source.queue, "users-service")
                .manual_ack(true)
                .finish(),
        )
        .await
        .map_err(|e| format!("consume {}: {e}", source.queue))?;
    Ok(Session {
        connection,
        channel,
        deliveries,
    })
}

impl Session {
    /// Applies deliveries until `shutdown` (`None`) or the connection is lost (why).
    async fn run(
        &mut self,
        service: &UsersService,
        shutdown: &mut std::pin::Pin<&mut impl Future<Output = ()>>,
    ) -> Option<String> {
        loop {
            let message = tokio::select! {
                _ = shutdown.as_mut() => return None,
                m = self.deliveries.recv() => m,
            };
            let Some(message) = message else {
                return Some("the connection to the broker closed".into());
            };
            let (Some(deliver), Some(body)) = (message.deliver, message.content) else {
                continue;
            };
            let (event, outcome) = apply_event(service, &body);
            match outcome {
                Outcome::Skipped { reason } => {
                    warn!(event = %event, %reason, "events: write event skipped")
                }
                applied => debug!(event = %event, ?applied, "events: write event applied"),
            }
            if let Err(e) = self
                .channel
                .basic_ack(BasicAckArguments::new(deliver.delivery_tag(), false))
                .await
            {
                return Some(format!("ack: {e}"));
            }
        }
    }

    /// Closes the channel and the connection, waiting at most a second for the broker.
    async fn close(self) {
        let Session {
            connection,
            channel,
            ..
        } = self;
        let _ = tokio::time::timeout(Duration::from_secs(1), async {
            let _ = channel.close().await;
            let _ = connection.close().await;
        })
        .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn event(method: &str, path: &str, status: u16, response: Option<Value>) -> Vec<u8> {
        let mut data = json!({
            "request_id": "r1", "route": "/api/users", "method": method, "path": path,
            "backend": "legacy", "status": status,
        });
        if let Some(r) = response {
            data["response"] = r;
        }
        serde_json::to_vec(&json!({
            "specversion": "1.0", "type": "dev.strangler.write", "source": "strangler",
            "id": "0123456789abcdef0123456789abcdef", "time": "2026-11-27T15:00:00.123Z",
            "subject": path, "datacontenttype": "application/json", "data": data,
        }))
        .unwrap_or_default()
    }

    fn user(id: u64, name: &str) -> Value {
        json!({"content_type": "application/json",
               "body": {"user": {"id": id, "name": name, "email": "a@x", "plan": "free", "joined": "2026-11-22"}}})
    }

    #[test]
    fn writes_are_applied_and_the_rest_skipped() {
        let svc = UsersService::new(None);
        let (id, out) = apply_event(
            &svc,
            &event("POST", "/api/users", 201, Some(user(42, "Ada"))),
        );
        assert_eq!(id, "0123456789abcdef0123456789abcdef");
        assert_eq!(out, Outcome::Upserted { id: 42 });
        assert_eq!(svc.user(42).map(|u| u.name), Some("Ada".into()));
        let again = apply_event(
            &svc,
            &event("PUT", "/api/users/42", 200, Some(user(42, "Grace"))),
        );
        assert_eq!(again.1, Outcome::Upserted { id: 42 });
        assert_eq!(svc.user(42).map(|u| u.name), Some("Grace".into()));
        let patch = apply_event(
            &svc,
            &event("PATCH", "/api/users/42?x=1", 200, Some(user(42, "G"))),
        );
        assert_eq!(patch.1, Outcome::Upserted { id: 42 });
        assert_eq!(
            apply_event(&svc, &event("DELETE", "/api/users/42", 204, None)).1,
            Outcome::Removed {
                id: 42,
                existed: true
            }
        );
        assert_eq!(svc.user(42), None);
        assert_eq!(
            apply_event(&svc, &event("DELETE", "/api/users/42", 204, None)).1,
            Outcome::Removed {
                id: 42,
                existed: false
            }
        );

        let skip = |body: &[u8], want: &str| {
            let (_, out) = apply_event(&svc, body);
            match out {
                Outcome::Skipped { reason } => {
                    assert!(reason.contains(want), "{reason:?} lacks {want:?}")
                }
                other => panic!("{other:?} for {}", String::from_utf8_lossy(body)),
            }
        };
        skip(b"not json", "not JSON");
        skip(b"[1]", "not a JSON object");
        skip(
            &event("POST", "/api/users", 201, None),
            "no response body captured",
        );
        skip(
            &event(
                "POST",
                "/api/users",
                201,
                Some(json!({"omitted": "over the events body cap"})),
            ),
            "omitted: over the events body cap",
        );
        skip(
            &event(
                "POST",
                "/api/users",
                201,
                Some(json!({"content_type": "text/plain", "text": "ok"})),
            ),
            "not JSON",
        );
        skip(
            &event(
                "POST",
                "/api/users",
                201,
                Some(json!({"body": {"ok": true}})),
            ),
            "no `user`",
        );
        skip(
            &event(
                "POST",
                "/api/users",
                201,
                Some(json!({"body": {"user": {"id": 1}}})),
            ),
            "not a user",
        );
        skip(
            &event("POST", "/api/users", 400, Some(user(43, "x"))),
            "status 400",
        );
        skip(
            &event("PUT", "/api/users/70", 200, Some(user(80, "x"))),
            "answered user 80",
        );
        skip(&event("DELETE", "/api/users", 204, None), "names no user");
        skip(
            &event("DELETE", "/api/users/abc", 204, None),
            "is not /api/users or",
        );
        skip(
            &event("DELETE", "/api/feed/1", 204, None),
            "not under /api/users",
        );
        skip(
            &event("GET", "/api/users/1", 200, Some(user(1, "x"))),
            "method GET",
        );
        let mut other =
            serde_json::from_slice::<Value>(&event("DELETE", "/api/users/1", 204, None))
                .unwrap_or_default();
        other["type"] = json!("dev.strangler.read");
        skip(&serde_json::to_vec(&other).unwrap_or_default(), "type");
        assert!(
            svc.user(43).is_none()
                && svc.user(70).is_none()
                && svc.user(80).is_none()
                && svc.user(1).is_some()
        );
    }

    #[test]
    fn an_upsert_keeps_new_ids_past_it() {
        let svc = UsersService::new(None);
        apply_event(
            &svc,
            &event("POST", "/api/users", 201, Some(user(500, "Ada"))),
        );
        let (status, body) = svc
            .store
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .handle(
                &http::Method::POST,
                None,
                Some(&json!({"name": "Next", "email": "n@x"})),
                true,
            );
        assert_eq!(status, http::StatusCode::CREATED);
        assert_eq!(body.map(|b| b["user"]["id"].clone()), Some(json!(501)));
    }

    #[test]
    fn urls() {
        // Parsing itself is tested in the amqp-url crate; here, what a source shows.
        let e = EventsSource::new("amqp://guest:guest@127.0.0.1:5673/%2f")
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(e.endpoint(), "amqp://guest@127.0.0.1:5673/%2f");
        assert!(EventsSource::new("amqps://x").is_err());
        let e = EventsSource::new("amqp://u:hunter2@h:1/%2f").unwrap_or_else(|e| panic!("{e}"));
        assert!(!format!("{e:?}").contains("hunter2"));
        assert_eq!(e.endpoint(), "amqp://u@h:1/%2f");
        assert!(!EventsSource::new("amqp://u:hunter2@h:x/")
            .map(|_| ())
            .unwrap_err()
            .to_string()
            .contains("hunter2"));
    }
}

//! Migration events over RabbitMQ (`[events]`): shadow mismatches, successful writes and
//! sampled requests, published as CloudEvents 1.0 (structured mode) on a durable topic
//! exchange.
//!
//! The broker never touches a client request. The request path only calls [`Events::emit`],
//! which never waits: it reserves the event's bytes and `try_send`s it into a bounded buffer;
//! a full buffer drops the event and counts it. One publisher task ([`publisher`]) owns the
//! connection: it reconnects with backoff, publishes with publisher confirms, and gives up on
//! a confirm after `publish_timeout` (a broker under a memory alarm stops reading; the
//! in-flight window then shrinks to one event until confirms flow again). On shutdown,
//! [`Events::flush`] publishes what is buffered, bounded by the drain timeout. Delivery is
//! at most once: an event whose confirm never came is counted `failed`, not sent again.

mod publisher;

use std::sync::atomic::{AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use ::metrics::{Counter, Gauge, Label};
use base64::Engine as _;
use serde_json::{json, Map, Value};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tracing::info;

pub use crate::config::AmqpUrl;
use crate::config::EventsSettings;
use crate::metrics::{Metrics, EVENTS_BUFFERED, EVENTS_TOTAL};
use crate::upstream::tee::{Budget, Captured, Tee};

/// What an event reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Mismatch,
    Write,
    Request,
}

impl Kind {
    const ALL: [Kind; 3] = [Kind::Mismatch, Kind::Write, Kind::Request];

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Mismatch => "mismatch",
            Kind::Write => "write",
            Kind::Request => "request",
        }
    }

    /// The CloudEvents `type`.
    fn ce_type(self) -> &'static str {
        match self {
            Kind::Mismatch => "dev.strangler.mismatch",
            Kind::Write => "dev.strangler.write",
            Kind::Request => "dev.strangler.request",
        }
    }
}

/// What became of an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    /// Confirmed by the broker.
    Published,
    /// Never sent: the buffer was full (events or bytes), or shutdown came first.
    Dropped,
    /// Sent, but the broker refused it (nack) or its confirm never came.
    Failed,
}

impl Outcome {
    const ALL: [Outcome; 3] = [Outcome::Published, Outcome::Dropped, Outcome::Failed];

    fn as_str(self) -> &'static str {
        match self {
            Outcome::Published => "published",
            Outcome::Dropped => "dropped",
            Outcome::Failed => "failed",
        }
    }
}

/// One event, waiting in the buffer. Serialized by the publisher, not on the request path.
pub struct Event {
    kind: Kind,
    /// The route's part of the routing key (`api.users`).
    key: String,
    subject: String,
    at: SystemTime,
    data: Value,
    /// Bytes it holds, reserved from `buffer_bytes` until it leaves the buffer.
    size: usize,
}

/// Fixed bytes of an event besides its bodies (envelope, ids, route, path).
const EVENT_OVERHEAD: usize = 512;

/// What a request's events carry about it.
pub struct RequestFacts<'a> {
    pub request_id: &'a str,
    pub route: &'a str,
    pub method: &'a str,
    /// The path, with the query string only when the route asks for it.
    pub path: &'a str,
    pub backend: &'a str,
    pub status: u16,
}

impl RequestFacts<'_> {
    fn data(&self) -> Map<String, Value> {
        let mut m = Map::new();
        m.insert("request_id".into(), self.request_id.into());
        m.insert("route".into(), self.route.into());
        m.insert("method".into(), self.method.into());
        m.insert("path".into(), self.path.into());
        m.insert("backend".into(), self.backend.into());
        m.insert("status".into(), self.status.into());
        m
    }
}

impl Event {
    /// A sampled request (`request`): who answered, with what, how fast.
    pub fn request(key: &str, facts: &RequestFacts<'_>, latency: Duration) -> Event {
        let mut data = facts.data();
        data.insert(
            "latency_ms".into(),
            json!((latency.as_secs_f64() * 10_000.0).round() / 10.0),
        );
        Event::new(Kind::Request, key, facts.path, Value::Object(data), 0)
    }

    /// A successful write (`write`), with its bodies when the route captures them: `None`
    /// when it does not.
    pub fn write(key: &str, facts: &RequestFacts<'_>, bodies: Option<(Body, Body)>) -> Event {
        let mut data = facts.data();
        let mut size = 0;
        if let Some((request, response)) = bodies {
            size = request.size + response.size;
            data.insert("request".into(), request.value);
            data.insert("response".into(), response.value);
        }
        Event::new(Kind::Write, key, facts.path, Value::Object(data), size)
    }

    /// A shadow mismatch (`mismatch`): the `/diffs` entry.
    pub fn mismatch(key: &str, path: &str, mut entry: Value) -> Event {
        // Who answered the client, beside the other events' fields.
        let primary = entry.get("primary").cloned().unwrap_or_default();
        if let Some(m) = entry.as_object_mut() {
            m.insert("backend".into(), primary["backend"].clone());
            m.insert("status".into(), primary["status"].clone());
        }
        // A mismatch entry is bounded (20 differences, each value capped) by `/diffs`.
        let size = entry.to_string().len();
        Event::new(Kind::Mismatch, key, path, entry, size)
    }

    fn new(kind: Kind, key: &str, subject: &str, data: Value, size: usize) -> Event {
        Event {
            kind,
            key: key.to_string(),
            subject: subject.to_string(),
            at: SystemTime::now(),
            data,
            size: size + EVENT_OVERHEAD,
        }
    }

    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// `KIND.ROUTE-KEY`, e.g. `write.api.users`.
    fn routing_key(&self) -> String {
        format!("{}.{}", self.kind.as_str(), self.key)
    }

    /// The CloudEvents 1.0 JSON of this event (structured mode).
    fn to_cloudevent(&self, source: &str, id: &str) -> Vec<u8> {
        let event = json!({
            "specversion": "1.0",
            "type": self.kind.ce_type(),
            "source": source,
            "id": id,
            "time": humantime::format_rfc3339_millis(self.at).to_string(),
            "subject": self.subject,
            "datacontenttype": "application/json",
            "data": self.data,
        });
        serde_json::to_vec(&event).unwrap_or_default()
    }
}

/// A captured request or response body, rendered for a `write` event.
pub struct Body {
    value: Value,
    size: usize,
}

impl Body {
    /// JSON bodies embedded as JSON, other text as `text`, anything else as `base64`; a body
    /// over the route's cap (or cut short) is named as omitted. Headers are never carried.
    pub fn render(content_type: Option<&str>, captured: Option<Captured>) -> Body {
        let mut m = Map::new();
        if let Some(ct) = content_type {
            m.insert("content_type".into(), ct.into());
        }
        let mut size = 0;
        match captured {
            None => {
                m.insert("omitted".into(), "the body did not arrive whole".into());
            }
            Some(Captured::TooLarge) => {
                m.insert("omitted".into(), "over the events body cap".into());
            }
            Some(Captured::Body(held)) => {
                let bytes = &held.bytes;
                size = bytes.len();
                let json_type = content_type.is_some_and(|ct| {
                    let ct = ct.split(';').next().unwrap_or("").trim();
                    ct.eq_ignore_ascii_case("application/json") || ct.ends_with("+json")
                });
                if bytes.is_empty() {
                    m.insert("size".into(), 0.into());
                } else if let Some(v) = json_type
                    .then(|| serde_json::from_slice::<Value>(bytes).ok())
                    .flatten()
                {
                    m.insert("body".into(), v);
                } else if let Ok(text) = std::str::from_utf8(bytes) {
                    m.insert("text".into(), text.into());
                } else {
                    m.insert(
                        "base64".into(),
                        base64::engine::general_purpose::STANDARD
                            .encode(bytes)
                            .into(),
                    );
                    size = size * 4 / 3 + 4;
                }
            }
        }
        Body {
            value: Value::Object(m),
            size,
        }
    }
}

/// The publisher's link to the broker, for `/routes` and the board.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum Link {
    Connecting = 0,
    Up = 1,
    /// Connected, but confirms are overdue (a memory or disk alarm, or a broker too slow).
    Stalled = 2,
    Down = 3,
    Closed = 4,
}

impl Link {
    fn as_str(self) -> &'static str {
        match self {
            Link::Connecting => "connecting",
            Link::Up => "up",
            Link::Stalled => "stalled",
            Link::Down => "down",
            Link::Closed => "closed",
        }
    }

    fn from_u8(v: u8) -> Link {
        match v {
            1 => Link::Up,
            2 => Link::Stalled,
            3 => Link::Down,
            4 => Link::Closed,
            _ => Link::Connecting,
        }
    }
}

/// The events of one proxy: the buffer, the counters, and the publisher task.
pub struct Events {
    settings: EventsSettings,
    url: AmqpUrl,
    tx: mpsc::Sender<Event>,
    /// Held by the publisher task while it runs; a flush that had to stop the task drains
    /// what is left through it.
    rx: Arc<tokio::sync::Mutex<mpsc::Receiver<Event>>>,
    /// The confirms the current connection waits for, for a flush that had to stop the task.
    current: Mutex<Option<Arc<publisher::Confirms>>>,
    /// Bytes held by buffered events, against `settings.buffer_bytes`.
    bytes: AtomicUsize,
    /// Bytes held by write-event bodies being captured (request and response tees).
    pub capture: Arc<Budget>,
    counts: [[AtomicU64; 3]; 3],
    /// Published, awaiting the broker's confirm.
    in_flight: AtomicUsize,
    counters: [[Counter; 3]; 3],
    buffered: Gauge,
    link: AtomicU8,
    last_error: Mutex<Option<String>>,
    /// Set to the flush deadline when shutdown starts.
    closing: watch::Sender<Option<tokio::time::Instant>>,
    task: Mutex<Option<JoinHandle<()>>>,
}

impl Events {
    /// The events of a proxy with `[events]`; `None` (and one log line) when the broker URL's
    /// variable is unset: events are off.
    pub fn new(settings: &EventsSettings, metrics: &Metrics) -> Option<Arc<Events>> {
        let Some(url) = settings.url.clone() else {
            info!(
                url_env = %settings.url_env,
                "events are off: {} is unset, so no broker to publish to",
                settings.url_env
            );
            return None;
        };
        let (tx, rx) = mpsc::channel(settings.buffer);
        let counter = |k: Kind, o: Outcome| {
            metrics.counter(
                EVENTS_TOTAL,
                vec![
                    Label::new("kind", k.as_str()),
                    Label::new("outcome", o.as_str()),
                ],
            )
        };
        let counters = Kind::ALL.map(|k| Outcome::ALL.map(|o| counter(k, o)));
        Some(Arc::new(Events {
            settings: settings.clone(),
            url,
            tx,
            rx: Arc::new(tokio::sync::Mutex::new(rx)),
            current: Mutex::new(None),
            bytes: AtomicUsize::new(0),
            capture: Budget::new(settings.buffer_bytes),
            counts: Default::default(),
            in_flight: AtomicUsize::new(0),
            counters,
            buffered: metrics.gauge(EVENTS_BUFFERED, vec![]),
            link: AtomicU8::new(Link::Connecting as u8),
            last_error: Mutex::new(None),
            closing: watch::channel(None).0,
            task: Mutex::new(None),
        }))
    }

    /// Starts the publisher task (once).
    pub fn start(self: &Arc<Self>) {
        let mut task = self.task.lock().unwrap_or_else(PoisonError::into_inner);
        if task.is_none() {
            *task = Some(tokio::spawn(publisher::run(self.clone())));
        }
    }

    /// Queues an event for the broker. Never waits: a full buffer (events or bytes) drops it
    /// and counts it.
    pub fn emit(&self, event: Event) {
        let (kind, size) = (event.kind, event.size);
        let max = self.settings.buffer_bytes;
        let reserved = self
            .bytes
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |b| {
                b.checked_add(size).filter(|&t| t <= max)
            })
            .is_ok();
        if !reserved {
            self.count(kind, Outcome::Dropped);
            return;
        }
        if self.tx.try_send(event).is_err() {
            self.bytes.fetch_sub(size, Ordering::AcqRel);
            self.count(kind, Outcome::Dropped);
            return;
        }
        self.buffered.increment(1.0);
    }

    /// A tee for one body of a write event, capped at `max` bytes.
    pub fn capture(&self, max: usize, f: impl FnOnce(Option<Captured>) + Send + 'static) -> Tee {
        Tee::calling(max, &self.capture, f)
    }

    /// A tee whose copy is awaited by a `oneshot` (the request body of a write event).
    pub fn capture_request(&self, max: usize) -> (Tee, tokio::sync::oneshot::Receiver<Captured>) {
        Tee::new(max, &self.capture)
    }

    /// Publishes what is buffered, waiting at most `timeout`; what is left is dropped and
    /// counted. Called once the listeners have drained.
    pub async fn flush(&self, timeout: Duration) {
        let deadline = tokio::time::Instant::now() + timeout;
        self.closing.send_replace(Some(deadline));
        let task = self
            .task
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(mut task) = task {
            // The publisher stops itself at the deadline; the margin covers closing the
            // connection politely.
            let limit = deadline + Duration::from_secs(1);
            if tokio::time::timeout_at(limit, &mut task).await.is_err() {
                task.abort();
                let _ = task.await;
            }
        }
        // What a stopped task left: unconfirmed events failed, buffered ones dropped (a task
        // that finished on its own left nothing).
        let current = self
            .current
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(confirms) = current {
            publisher::fail_all(&confirms, self);
        }
        let mut rx = self.rx.lock().await;
        self.drop_buffered(&mut rx);
        let (published, dropped, failed) = self.totals();
        info!(published, dropped, failed, "events flushed");
    }

    /// Shutdown: whatever is still buffered will not be sent, and is counted dropped.
    fn drop_buffered(&self, rx: &mut mpsc::Receiver<Event>) {
        rx.close();
        while let Ok(event) = rx.try_recv() {
            self.taken(&event);
            self.count(event.kind, Outcome::Dropped);
        }
        self.set_link(Link::Closed);
    }

    /// An event left the buffer.
    fn taken(&self, event: &Event) {
        self.bytes.fetch_sub(event.size, Ordering::AcqRel);
        self.buffered.decrement(1.0);
    }

    fn count(&self, kind: Kind, outcome: Outcome) {
        let (k, o) = (kind as usize, outcome as usize);
        self.counts[k][o].fetch_add(1, Ordering::Relaxed);
        self.counters[k][o].increment(1);
    }

    fn set_link(&self, link: Link) {
        self.link.store(link as u8, Ordering::Release);
    }

    fn link(&self) -> Link {
        Link::from_u8(self.link.load(Ordering::Acquire))
    }

    fn set_error(&self, error: Option<String>) {
        *self
            .last_error
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = error;
    }

    /// `(published, dropped, failed)` of every kind together.
    pub fn totals(&self) -> (u64, u64, u64) {
        let sum = |o: Outcome| -> u64 {
            self.counts
                .iter()
                .map(|k| k[o as usize].load(Ordering::Relaxed))
                .sum()
        };
        (
            sum(Outcome::Published),
            sum(Outcome::Dropped),
            sum(Outcome::Failed),
        )
    }

    /// Events waiting in the buffer.
    pub fn buffered(&self) -> usize {
        self.settings.buffer - self.tx.capacity()
    }

    /// The `events` object of `/routes`.
    pub fn to_json(&self) -> Value {
        let (published, dropped, failed) = self.totals();
        let by_kind: Map<String, Value> = Kind::ALL
            .iter()
            .map(|&k| {
                let c = &self.counts[k as usize];
                let outcomes: Map<String, Value> = Outcome::ALL
                    .iter()
                    .map(|&o| {
                        (
                            o.as_str().to_string(),
                            c[o as usize].load(Ordering::Relaxed).into(),
                        )
                    })
                    .collect();
                (k.as_str().to_string(), Value::Object(outcomes))
            })
            .collect();
        json!({
            "enabled": true,
            "broker": self.url.to_string(),
            "exchange": self.settings.exchange,
            "link": self.link().as_str(),
            "last_error": *self.last_error.lock().unwrap_or_else(PoisonError::into_inner),
            "buffered": self.buffered(),
            "in_flight": self.in_flight.load(Ordering::Relaxed),
            "buffer": self.settings.buffer,
            "buffered_bytes": self.bytes.load(Ordering::Relaxed),
            "buffer_bytes": self.settings.buffer_bytes,
            "published": published,
            "dropped": dropped,
            "failed": failed,
            "by_kind": by_kind,
        })
    }
}

#[cfg(test)]
mod tests;

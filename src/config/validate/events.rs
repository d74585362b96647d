//! `[events]` (the broker, read at start) and a route's `events`.

use std::ops::Range;
use std::time::Duration;

use toml::Spanned;

use super::Ctx;
use crate::config::file::{EventsFile, RouteEventsFile};
use crate::config::EventsSettings;
use crate::events::AmqpUrl;
use crate::routes::events::{routing_key, RouteEvents};

/// Events held while the broker is slow or away, by default.
const DEFAULT_BUFFER: i64 = 10_000;
const MAX_BUFFER: i64 = 1_000_000;
/// Bytes those events may hold together, by default.
const DEFAULT_BUFFER_BYTES: u64 = 64 << 20;
const DEFAULT_PUBLISH_TIMEOUT: Duration = Duration::from_secs(5);
/// The largest body cap of a route's write events.
const MAX_BODY: u64 = 1 << 20;

impl Ctx {
    /// `[events]`: the broker URL from the environment, never inline. An unset variable is
    /// no error: events are off (the demo runs without a broker).
    pub(super) fn events_settings(
        &mut self,
        f: EventsFile,
        at: Range<usize>,
    ) -> Option<EventsSettings> {
        if let Some(u) = &f.url {
            self.err(
                u.span(),
                "[events] `url`: the URL may carry a password and routes.toml is often a ConfigMap in git; use `url_env = \"VAR\"`".into(),
            );
        }
        let exchange = f
            .exchange
            .as_ref()
            .map_or_else(|| "strangler".to_string(), |e| e.get_ref().clone());
        if let Some(e) = &f.exchange {
            let ok = !exchange.is_empty()
                && exchange.len() <= 255
                && exchange
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b))
                && !exchange.starts_with("amq.");
            if !ok {
                self.err(
                    e.span(),
                    format!("[events] `exchange` {exchange:?}: 1 to 255 letters, digits, `-`, `_`, `.` or `:`, not starting with `amq.` (reserved by the broker)"),
                );
            }
        }
        let buffer = match &f.buffer {
            None => DEFAULT_BUFFER,
            Some(b) if (1..=MAX_BUFFER).contains(b.get_ref()) => *b.get_ref(),
            Some(b) => {
                self.err(
                    b.span(),
                    format!(
                        "[events] `buffer` must be between 1 and {MAX_BUFFER} events, got {}",
                        b.get_ref()
                    ),
                );
                DEFAULT_BUFFER
            }
        } as usize;
        let buffer_bytes = self.size(
            f.buffer_bytes.as_ref(),
            "events.buffer_bytes",
            DEFAULT_BUFFER_BYTES,
        );
        if let Some(b) = f.buffer_bytes.as_ref().filter(|_| buffer_bytes < 1024) {
            self.err(
                b.span(),
                "[events] `buffer_bytes` must be at least 1KiB".into(),
            );
        }
        let publish_timeout = self.duration(
            f.publish_timeout.as_ref(),
            "events.publish_timeout",
            DEFAULT_PUBLISH_TIMEOUT,
        );
        if let Some(t) = f.publish_timeout.as_ref() {
            if publish_timeout < Duration::from_millis(10)
                || publish_timeout > Duration::from_secs(600)
            {
                self.err(
                    t.span(),
                    "[events] `publish_timeout` must be between 10ms and 10m".into(),
                );
            }
        }
        let source = f
            .source
            .as_ref()
            .map_or_else(|| "strangler".to_string(), |s| s.get_ref().clone());
        if let Some(s) = &f.source {
            if source.is_empty() || source.len() > 255 || source.chars().any(char::is_control) {
                self.err(
                    s.span(),
                    "[events] `source`: the CloudEvents source, a URI reference of 1 to 255 characters".into(),
                );
            }
        }
        let Some(var) = &f.url_env else {
            self.err(
                at,
                "[events] needs `url_env`: the variable holding the amqp:// URL".into(),
            );
            return None;
        };
        let raw = std::env::var(var.get_ref()).unwrap_or_default();
        let url = if raw.is_empty() {
            None
        } else {
            match AmqpUrl::parse(&raw) {
                Ok(u) => Some(u),
                Err(why) => {
                    self.err(
                        var.span(),
                        format!("[events] `url_env`: {} {why}", var.get_ref()),
                    );
                    return None;
                }
            }
        };
        Some(EventsSettings {
            url,
            url_env: var.get_ref().clone(),
            exchange,
            buffer,
            buffer_bytes: usize::try_from(buffer_bytes).unwrap_or(usize::MAX),
            publish_timeout,
            source,
        })
    }

    /// A route's `events`.
    pub(super) fn route_events(
        &mut self,
        f: &Spanned<RouteEventsFile>,
        prefix: &str,
        has_shadow: bool,
        has_section: bool,
    ) -> Option<RouteEvents> {
        let span = f.span();
        let (kinds, table) = match f.get_ref() {
            RouteEventsFile::Kinds(k) => (k.as_slice(), None),
            RouteEventsFile::Table(t) => (t.kinds.get_ref().as_slice(), Some(t)),
        };
        let mut events = RouteEvents {
            mismatch: false,
            write: false,
            request: false,
            sample: 1.0,
            body: 0,
            query: false,
            key: routing_key(prefix),
        };
        if !has_section {
            self.err(
                span.clone(),
                "`events` needs an `[events]` section: the broker they are published to".into(),
            );
        }
        if kinds.is_empty() {
            self.err(
                span.clone(),
                "`events` names no kind: expected \"mismatch\", \"write\" or \"request\"".into(),
            );
        }
        for k in kinds {
            let slot = match k.get_ref().as_str() {
                "mismatch" => &mut events.mismatch,
                "write" => &mut events.write,
                "request" => &mut events.request,
                other => {
                    self.err(
                        k.span(),
                        format!("`events` kind {other:?}: expected \"mismatch\", \"write\" or \"request\""),
                    );
                    continue;
                }
            };
            if std::mem::replace(slot, true) {
                self.err(k.span(), format!("`events` names {:?} twice", k.get_ref()));
            }
        }
        if events.mismatch && !has_shadow {
            self.err(
                span.clone(),
                "`events` \"mismatch\" without `shadow`: nothing would be compared".into(),
            );
        }
        if let Some(t) = table {
            if let Some(s) = &t.sample {
                let v = *s.get_ref();
                if !(v > 0.0 && v <= 1.0) {
                    self.err(
                        s.span(),
                        format!("`events.sample` is the fraction of request events published, above 0 and at most 1, got {v}"),
                    );
                } else if !events.request {
                    self.err(
                        s.span(),
                        "`events.sample` samples \"request\" events, which this route does not publish (mismatches and writes are never sampled)".into(),
                    );
                }
                events.sample = v.clamp(0.0, 1.0);
            }
            if let Some(b) = &t.body {
                let n = self.size(Some(b), "events.body", 0);
                if n > MAX_BODY {
                    self.err(
                        b.span(),
                        format!("`events.body` is at most 1MiB (events travel through a bounded buffer), got {n} bytes"),
                    );
                } else if !events.write {
                    self.err(
                        b.span(),
                        "`events.body` caps the bodies of \"write\" events, which this route does not publish".into(),
                    );
                }
                events.body = usize::try_from(n.min(MAX_BODY)).unwrap_or(0);
            }
            events.query = t.query.unwrap_or(false);
        }
        Some(events)
    }
}

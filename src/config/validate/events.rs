//! `[events]` (the broker, read at start) and a route's `events`.

use std::ops::Range;
use std::time::Duration;

use toml::Spanned;

use super::Ctx;
use crate::config::file::{EventsFile, RouteEventsFile};
use crate::config::AmqpUrl;
use crate::config::EventsSettings;
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
                        format!("[events] `url_env`: {}: {why}", var.get_ref()),
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

#[cfg(test)]
mod tests {
    use crate::config::parse;

    /// Line and column (1-based) where the `nth` (0-based) `needle` starts.
    fn position(text: &str, needle: &str, nth: usize) -> (usize, usize) {
        let at = text
            .match_indices(needle)
            .nth(nth)
            .unwrap_or_else(|| panic!("{needle:?} #{nth} not in\n{text}"))
            .0;
        let before = &text[..at];
        let line = before.matches('\n').count() + 1;
        let col = before.rsplit('\n').next().unwrap_or("").chars().count() + 1;
        (line, col)
    }

    /// A routes.toml with `section` (an `[events]` or "") and a shadowed route `/api/users`
    /// with `events = ROUTE`.
    fn config(section: &str, route: &str) -> String {
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\n\n{section}\n\
             [backends.legacy]\nurl = \"http://127.0.0.1:9\"\nlegacy = true\n\n\
             [backends.users]\nurl = \"http://127.0.0.1:10\"\n\n\
             [[routes]]\nprefix = \"/api/users\"\nbackend = \"legacy\"\nshadow = \"users\"\n{route}\n\n\
             [[routes]]\nprefix = \"/\"\nbackend = \"legacy\"\n"
        )
    }

    fn errors(text: &str) -> Vec<String> {
        match parse(text) {
            Ok(_) => vec![],
            Err(d) => d
                .iter()
                .map(|d| format!("{}:{}: {}", d.line, d.col, d.message))
                .collect(),
        }
    }

    const UNSET: &str = "STRANGLER_EVENTS_TEST_NEVER_SET_7C2E";

    #[test]
    fn good_forms_load_and_an_unset_url_turns_events_off() {
        assert!(std::env::var_os(UNSET).is_none());
        let section = format!("[events]\nurl_env = \"{UNSET}\"\n");
        for route in [
            "events = [\"mismatch\", \"write\", \"request\"]",
            "events = { kinds = [\"write\"], body = \"16KiB\", query = true }",
            "events = { kinds = [\"request\"], sample = 0.25 }",
        ] {
            let text = config(&section, route);
            let parsed = parse(&text).unwrap_or_else(|e| panic!("{e:?}\n{text}"));
            let events = parsed.server.events.as_ref().map(|e| e.url.is_some());
            assert_eq!(events, Some(false), "off while {UNSET} is unset");
            let r = &parsed.table.routes()[0];
            assert_eq!(r.events.as_ref().map(|e| e.key.as_str()), Some("api.users"));
        }
    }

    #[test]
    fn every_mistake_is_reported_at_its_line_and_column() {
        let path = "PATH"; // set in every environment: not an amqp:// URL
        assert!(std::env::var_os(path).is_some());
        let ok = format!("[events]\nurl_env = \"{UNSET}\"\n");
        let ev = |body: &str| format!("[events]\nurl_env = \"{UNSET}\"\n{body}\n");
        // (section, route line, where the error points (needle, occurrence), what it says)
        let cases: Vec<(String, String, (&str, usize), &str)> = vec![
            (
                "[events]\nexchange = \"x\"\n".into(),
                String::new(),
                ("[events]", 0),
                "[events] needs `url_env`",
            ),
            (
                format!("[events]\nurl_env = \"{path}\"\n"),
                String::new(),
                ("\"PATH\"", 0),
                "[events] `url_env`: PATH: not an amqp:// URL",
            ),
            (
                ev("url = \"amqp://guest:guest@h/\""),
                String::new(),
                ("\"amqp://", 0),
                "use `url_env = \"VAR\"`",
            ),
            (
                ev("exchange = \"\""),
                String::new(),
                ("\"\"", 0),
                "[events] `exchange`",
            ),
            (
                ev("exchange = \"amq.topic\""),
                String::new(),
                ("\"amq.topic\"", 0),
                "not starting with `amq.`",
            ),
            (
                ev("exchange = \"a b\""),
                String::new(),
                ("\"a b\"", 0),
                "[events] `exchange`",
            ),
            (
                ev("buffer = 0"),
                String::new(),
                ("0\n\n[backends", 0),
                "`buffer` must be between 1 and",
            ),
            (
                ev("buffer = 2000000"),
                String::new(),
                ("2000000", 0),
                "`buffer` must be between 1 and",
            ),
            (
                ev("buffer = \"lots\""),
                String::new(),
                ("\"lots\"", 0),
                "[events]",
            ),
            (
                ev("buffer_bytes = \"12\""),
                String::new(),
                ("\"12\"", 0),
                "`buffer_bytes` must be at least 1KiB",
            ),
            (
                ev("buffer_bytes = \"huge\""),
                String::new(),
                ("\"huge\"", 0),
                "`events.buffer_bytes`",
            ),
            (
                ev("publish_timeout = \"forever\""),
                String::new(),
                ("\"forever\"", 0),
                "`events.publish_timeout`",
            ),
            (
                ev("publish_timeout = \"1ms\""),
                String::new(),
                ("\"1ms\"", 0),
                "between 10ms and 10m",
            ),
            (ev("source = \"\""), String::new(), ("\"\"", 0), "`source`"),
            (
                ev("colour = \"red\""),
                String::new(),
                ("colour", 0),
                "unknown field `colour`",
            ),
            (
                String::new(),
                "events = [\"write\"]".into(),
                ("[\"write\"]", 0),
                "`events` needs an `[events]` section",
            ),
            (
                ok.clone(),
                "events = []".into(),
                ("[]", 0),
                "`events` names no kind",
            ),
            (
                ok.clone(),
                "events = [\"writes\"]".into(),
                ("\"writes\"", 0),
                "`events` kind \"writes\"",
            ),
            (
                ok.clone(),
                "events = [\"write\", \"write\"]".into(),
                ("\"write\"", 1),
                "names \"write\" twice",
            ),
            (
                ok.clone(),
                "events = \"write\"".into(),
                ("\"write\"", 0),
                "a list of event kinds",
            ),
            (ok.clone(), "events = [1]".into(), ("1]", 0), "[[routes]]"),
            (
                ok.clone(),
                "events = { kinds = [\"request\"], sample = 0.0 }".into(),
                ("0.0 }", 0),
                "`events.sample`",
            ),
            (
                ok.clone(),
                "events = { kinds = [\"request\"], sample = 1.5 }".into(),
                ("1.5", 0),
                "`events.sample`",
            ),
            (
                ok.clone(),
                "events = { kinds = [\"write\"], sample = 0.5 }".into(),
                ("0.5", 0),
                "mismatches and writes are never sampled",
            ),
            (
                ok.clone(),
                "events = { kinds = [\"write\"], body = \"2MiB\" }".into(),
                ("\"2MiB\"", 0),
                "`events.body` is at most 1MiB",
            ),
            (
                ok.clone(),
                "events = { kinds = [\"write\"], body = \"big\" }".into(),
                ("\"big\"", 0),
                "`events.body`",
            ),
            (
                ok.clone(),
                "events = { kinds = [\"request\"], body = \"1KiB\" }".into(),
                ("\"1KiB\"", 0),
                "caps the bodies of \"write\" events",
            ),
            (
                ok.clone(),
                "events = { kinds = [\"write\"], query = \"yes\" }".into(),
                ("\"yes\"", 0),
                "[[routes]]",
            ),
            (
                ok.clone(),
                "events = { kind = [\"write\"] }".into(),
                ("kind", 0),
                "unknown field `kind`",
            ),
        ];
        for (section, route, (needle, nth), message) in cases {
            let text = config(&section, &route);
            let errs = errors(&text);
            let (line, col) = position(&text, needle, nth);
            let at = format!("{line}:{col}: ");
            assert!(
                errs.iter()
                    .any(|e| e.starts_with(&at) && e.contains(message)),
                "expected an error at {at}containing {message:?}, got {errs:?}\n{text}"
            );
        }
    }

    #[test]
    fn a_mismatch_kind_needs_a_shadow() {
        let text = format!(
            "[events]\nurl_env = \"{UNSET}\"\n\n[backends.legacy]\nurl = \"http://127.0.0.1:9\"\nlegacy = true\n\n\
             [[routes]]\nprefix = \"/\"\nbackend = \"legacy\"\nevents = [\"mismatch\"]\n"
        );
        let errs = errors(&text);
        let (line, col) = position(&text, "[\"mismatch\"]", 0);
        assert!(
            errs.iter().any(
                |e| e.starts_with(&format!("{line}:{col}: ")) && e.contains("without `shadow`")
            ),
            "{errs:?}"
        );
    }
}

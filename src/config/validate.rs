//! routes.toml text -> [`Parsed`] (server settings + [`RouteTable`]), collecting every error
//! at once, each with its line and column. Syntax errors are all reported (the parser
//! recovers); then each `[server]`, `[backends.NAME]` and `[[routes]]` entry is deserialized
//! on its own, so an unknown key in one entry does not hide a bad URL in another; then
//! meaning (references, ranges, units, duplicates) is checked with the spans serde kept.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use http::header::HeaderName;
use http::{Method, Uri};
use serde::de::{DeserializeOwned, IntoDeserializer};
use toml::de::{DeTable, DeValue};
use toml::Spanned;

use super::file::{BackendFile, CanaryFile, CompareFile, GuardFile, RouteFile, ServerFile};
use crate::config::{ServerSettings, Watch};
use crate::routes::{
    Backend, BackendId, Canary, Compare, Guard, RequestKey, Route, RouteTable, Shadow, Sticky,
};
use crate::units::{parse_duration, parse_size};

/// One error or warning, located in the file.
#[derive(Debug, Clone, PartialEq)]
pub struct Diagnostic {
    pub line: usize,
    pub col: usize,
    pub message: String,
}

impl Diagnostic {
    /// `FILE:LINE:COL: message`, the format editors and CI annotate.
    pub fn render(&self, file: &str) -> String {
        format!("{file}:{}:{}: {}", self.line, self.col, self.message)
    }
}

/// A valid routes.toml.
#[derive(Debug, Clone)]
pub struct Parsed {
    pub server: ServerSettings,
    /// The listener's TLS configuration, loaded from the files `server.tls` names.
    pub tls: Option<crate::tls::ServerTls>,
    pub table: RouteTable,
    pub warnings: Vec<Diagnostic>,
    /// Every file besides routes.toml that was read (certificates, keys, CAs).
    pub files: crate::tls::Files,
}

/// Default `connect_timeout` of a backend (contract: 2s).
const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Default whole-response `timeout` of a backend (contract: 30s).
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
/// Bodies above this are not compared unless `compare.max_body` says otherwise.
const DEFAULT_COMPARE_MAX_BODY: u64 = 1 << 20;
/// Shadow methods when `shadow_methods` is absent: only the safe ones (writes opt in).
const DEFAULT_SHADOW_METHODS: [Method; 3] = [Method::GET, Method::HEAD, Method::OPTIONS];

/// Parses and validates routes.toml text; files it names are relative to the working
/// directory.
pub fn parse(src: &str) -> Result<Parsed, Vec<Diagnostic>> {
    parse_at(src, Path::new(""))
}

/// Parses and validates routes.toml text read from a file in `dir`: relative paths in it
/// (certificates, keys) are relative to `dir`.
pub fn parse_at(src: &str, dir: &Path) -> Result<Parsed, Vec<Diagnostic>> {
    let mut cx = Ctx::new(src);
    cx.dir = dir.to_path_buf();
    let (root, syntax) = DeTable::parse_recoverable(src);
    if !syntax.is_empty() {
        for e in syntax {
            cx.err(e.span().unwrap_or(0..0), e.message().to_string());
        }
        return Err(cx.finish_errors());
    }
    let (mut server, mut backends, mut routes, mut auth) = (None, None, None, None);
    let (mut store, mut events) = (None, None);
    for (key, value) in root.into_inner() {
        match key.get_ref().as_ref() {
            "server" => server = cx.de::<ServerFile>(value, "[server]"),
            "backends" => backends = Some(value),
            "routes" => routes = Some(value),
            "auth" => auth = Some(value),
            "ratelimit_store" => {
                let span = value.span();
                store = cx
                    .de::<super::file::RateLimitStoreFile>(value, "[ratelimit_store]")
                    .map(|f| (f, span));
            }
            "events" => {
                let span = value.span();
                events = cx
                    .de::<super::file::EventsFile>(value, "[events]")
                    .map(|f| (f, span));
            }
            "version" => cx.version(value),
            other => cx.err(
                key.span(),
                format!("unknown key `{other}`; expected `server`, `backends`, `auth`, `ratelimit_store`, `events` or `routes`"),
            ),
        }
    }
    let (mut server, tls) = cx.server(server.unwrap_or_default());
    server.ratelimit_store = store.and_then(|(f, span)| cx.ratelimit_store(f, span));
    let (backends, legacy) = cx.backends(backends);
    let providers = cx.providers(auth);
    let has_events = events.is_some();
    server.events = events.and_then(|(f, span)| cx.events_settings(f, span));
    let has_store = server.ratelimit_store.is_some();
    let routes = cx.routes(routes, &backends, legacy, &providers, has_store, has_events);
    if !cx.errors.is_empty() {
        return Err(cx.finish_errors());
    }
    let table = RouteTable::new(backends, routes, legacy, providers);
    cx.table_warnings(&table);
    let mut warnings = cx.warnings;
    warnings.sort_by_key(|d| (d.line, d.col));
    Ok(Parsed {
        server,
        tls,
        table,
        warnings,
        files: cx.files,
    })
}

struct Ctx {
    line_starts: Vec<usize>,
    src_len: usize,
    src: String,
    errors: Vec<Diagnostic>,
    warnings: Vec<Diagnostic>,
    /// The directory of routes.toml: relative file paths start there.
    dir: PathBuf,
    files: crate::tls::Files,
}

impl Ctx {
    fn new(src: &str) -> Self {
        let mut line_starts = vec![0];
        line_starts.extend(src.match_indices('\n').map(|(i, _)| i + 1));
        Ctx {
            line_starts,
            src_len: src.len(),
            src: src.to_string(),
            errors: vec![],
            warnings: vec![],
            dir: PathBuf::new(),
            files: crate::tls::Files::default(),
        }
    }

    fn locate(&self, span: Range<usize>, message: String) -> Diagnostic {
        let at = span.start.min(self.src_len);
        let line = self.line_starts.partition_point(|&s| s <= at);
        let start = self.line_starts[line.saturating_sub(1)];
        let col = self
            .src
            .get(start..at)
            .map_or(at - start, |s| s.chars().count())
            + 1;
        Diagnostic { line, col, message }
    }

    fn err(&mut self, span: Range<usize>, message: String) {
        let d = self.locate(span, message);
        self.errors.push(d);
    }

    fn finish_errors(mut self) -> Vec<Diagnostic> {
        self.errors.sort_by_key(|d| (d.line, d.col));
        self.errors
    }

    /// Deserializes one entry; a failure is recorded and `None` returned.
    fn de<T: DeserializeOwned>(&mut self, value: Spanned<DeValue<'_>>, what: &str) -> Option<T> {
        let span = value.span();
        match T::deserialize(value.into_deserializer()) {
            Ok(v) => Some(v),
            Err(e) => {
                self.err(
                    e.span().unwrap_or(span),
                    format!("{what}: {}", e.message().trim_end()),
                );
                None
            }
        }
    }

    fn version(&mut self, value: Spanned<DeValue<'_>>) {
        let span = value.span();
        if self.de::<i64>(value, "version").is_some_and(|v| v != 1) {
            self.err(
                span,
                "unsupported `version`; this strangler reads version 1".into(),
            );
        }
    }

    fn duration(&mut self, v: Option<&Spanned<String>>, key: &str, default: Duration) -> Duration {
        let Some(v) = v else { return default };
        parse_duration(v.get_ref()).unwrap_or_else(|e| {
            self.err(v.span(), format!("`{key}`: {e}"));
            default
        })
    }

    fn size(&mut self, v: Option<&Spanned<String>>, key: &str, default: u64) -> u64 {
        let Some(v) = v else { return default };
        parse_size(v.get_ref()).unwrap_or_else(|e| {
            self.err(v.span(), format!("`{key}`: {e}"));
            default
        })
    }

    fn percent(&mut self, v: &Spanned<f64>, key: &str) -> f64 {
        let p = *v.get_ref();
        if !(0.0..=100.0).contains(&p) {
            self.err(
                v.span(),
                format!("`{key}` must be between 0 and 100, got {p}"),
            );
        }
        p.clamp(0.0, 100.0)
    }

    fn rate(&mut self, v: &Spanned<f64>, key: &str) -> f64 {
        let r = *v.get_ref();
        if !(0.0..=1.0).contains(&r) {
            self.err(
                v.span(),
                format!("`{key}` is a rate between 0 and 1, got {r}"),
            );
        }
        r.clamp(0.0, 1.0)
    }

    fn count(&mut self, v: &Spanned<i64>, key: &str, min: i64) -> u64 {
        let n = *v.get_ref();
        if n < min {
            self.err(v.span(), format!("`{key}` must be at least {min}, got {n}"));
        }
        n.max(min) as u64
    }

    fn method(&mut self, v: &Spanned<String>) -> Option<Method> {
        let name = v.get_ref();
        if name.bytes().any(|b| b.is_ascii_lowercase()) {
            self.err(
                v.span(),
                format!(
                    "method names are case-sensitive: write {:?}",
                    name.to_uppercase()
                ),
            );
            return None;
        }
        match Method::from_bytes(name.as_bytes()) {
            Ok(m) if !name.is_empty() => Some(m),
            _ => {
                self.err(v.span(), format!("invalid method {name:?}"));
                None
            }
        }
    }

    fn methods(&mut self, v: &Spanned<Vec<Spanned<String>>>, key: &str) -> Vec<Method> {
        if v.get_ref().is_empty() {
            self.err(v.span(), format!("`{key}` is empty: no request could match; remove the key to allow every method"));
        }
        v.get_ref().iter().filter_map(|m| self.method(m)).collect()
    }

    fn backend_ref(
        &mut self,
        v: &Spanned<String>,
        names: &HashMap<String, BackendId>,
        key: &str,
    ) -> Option<BackendId> {
        let found = names.get(v.get_ref()).copied();
        if found.is_none() {
            let mut known: Vec<&str> = names.keys().map(String::as_str).collect();
            known.sort_unstable();
            self.err(
                v.span(),
                format!(
                    "`{key}`: unknown backend {:?} (declared: {})",
                    v.get_ref(),
                    known.join(", ")
                ),
            );
        }
        found
    }
}

mod auth;
mod entries;
mod events;
mod features;
mod limits;
mod tls;

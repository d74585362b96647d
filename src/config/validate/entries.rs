//! Validation of each section: `[server]`, `[backends.NAME]`, `[[routes]]`, and the warnings
//! that look at the whole table.

use super::*;
use crate::routes::{ConnLimits, Protocol, RetryCase, RetryOn};
use crate::tls::ServerTls;

/// Defaults of `[server]` (see the README's routes.toml reference).
const DEFAULT_LISTEN: &str = "127.0.0.1:8080";
const DEFAULT_ADMIN: &str = "127.0.0.1:9901";
const DEFAULT_DRAIN: Duration = Duration::from_secs(30);
const DEFAULT_MAX_REQUEST_BODY: u64 = 10 << 20;
/// Slowloris guard and idle keep-alive bound: hyper starts this timer whenever a connection
/// waits for a request head.
const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// Request line + headers; larger gets 431.
const DEFAULT_MAX_HEADER_SIZE: u64 = 64 << 10;
/// Concurrent client connections; past it the listener stops accepting until one closes.
const DEFAULT_MAX_CONNECTIONS: i64 = 10_000;
/// The largest listen backlog asked for (the kernel's `somaxconn` ceiling, 2^16 - 1 before
/// Linux 5.4 widened it, is what it grants at most anyway).
const MAX_BACKLOG: i64 = 65_535;
/// `watch = "poll"`: how often the file's content is checked. A read and a hash of a small
/// file; one second keeps a flip's delay well under the ConfigMap sync delay.
const DEFAULT_POLL_INTERVAL: Duration = Duration::from_secs(1);
/// `watch = "notify"`: the content check that backs up filesystem events.
const DEFAULT_SAFETY_INTERVAL: Duration = Duration::from_secs(10);

impl Ctx {
    pub(super) fn server(&mut self, f: ServerFile) -> (ServerSettings, Option<ServerTls>) {
        let listen = self.addr(f.listen.as_ref(), "listen", DEFAULT_LISTEN);
        let admin = self.addr(f.admin.as_ref(), "admin", DEFAULT_ADMIN);
        let admin_token = f.admin_token.as_ref().and_then(|t| self.token(t));
        if !admin.ip().is_loopback() && admin_token.is_none() {
            let span = f.admin.as_ref().map_or(0..0, Spanned::span);
            self.err(span, format!("`admin` = {admin} is not a loopback address: set `admin_token` to expose the admin listener"));
        }
        let (tls, loaded) = match &f.tls {
            Some(t) => self.server_tls(t),
            None => (None, None),
        };
        let h2c = f.h2c.unwrap_or(false);
        if h2c && f.tls.is_some() {
            let span = f.tls.as_ref().map_or(0..0, Spanned::span);
            self.err(span, "`h2c` is cleartext HTTP/2 and cannot be combined with `tls`: over TLS, HTTP/2 is negotiated by ALPN".into());
        }
        let max_connections = f
            .max_connections
            .as_ref()
            .map_or(DEFAULT_MAX_CONNECTIONS as u64, |v| {
                self.count(v, "max_connections", 1)
            });
        let backlog = f.backlog.as_ref().map(|v| {
            let n = *v.get_ref();
            if !(1..=MAX_BACKLOG).contains(&n) {
                self.err(
                    v.span(),
                    format!("`backlog` must be between 1 and {MAX_BACKLOG}, got {n}"),
                );
            }
            n.clamp(1, MAX_BACKLOG) as u32
        });
        let via = f.via.as_ref().map_or_else(
            || "strangler".to_string(),
            |v| {
                let ok = !v.get_ref().is_empty()
                    && v.get_ref()
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
                if !ok {
                    self.err(
                        v.span(),
                        format!("`via`: {:?} must be a token of [A-Za-z0-9._-]", v.get_ref()),
                    );
                }
                v.get_ref().clone()
            },
        );
        let settings = ServerSettings {
            listen,
            admin,
            admin_token,
            drain_timeout: self.duration(f.drain_timeout.as_ref(), "drain_timeout", DEFAULT_DRAIN),
            max_request_body: self.size(
                f.max_request_body.as_ref(),
                "max_request_body",
                DEFAULT_MAX_REQUEST_BODY,
            ),
            header_read_timeout: self.duration(
                f.header_read_timeout.as_ref(),
                "header_read_timeout",
                DEFAULT_HEADER_READ_TIMEOUT,
            ),
            max_header_size: self.size(
                f.max_header_size.as_ref(),
                "max_header_size",
                DEFAULT_MAX_HEADER_SIZE,
            ) as usize,
            max_connections: max_connections as usize,
            backlog,
            trust_shadow_header: f.trust_shadow_header.unwrap_or(false),
            via,
            workers: f
                .workers
                .as_ref()
                .map_or_else(default_workers, |w| self.count(w, "workers", 1) as usize),
            watch: self.watch(f.watch.as_ref(), f.watch_interval.as_ref()),
            access_log: f.access_log.unwrap_or(true),
            tls,
            h2c,
            trusted_proxies: self.trusted_proxies(f.trusted_proxies.as_ref()),
            stale_store_size: self.size(
                f.stale_store_size.as_ref(),
                "stale_store_size",
                super::limits::DEFAULT_STALE_STORE_SIZE,
            ),
            ratelimit_store: None,
            events: None,
        };
        (settings, loaded)
    }

    fn watch(
        &mut self,
        mode: Option<&Spanned<String>>,
        interval: Option<&Spanned<String>>,
    ) -> Watch {
        let poll = self.duration(interval, "watch_interval", DEFAULT_POLL_INTERVAL);
        match mode.map(|m| m.get_ref().as_str()) {
            None | Some("notify") => Watch::Notify {
                interval: interval.map_or(DEFAULT_SAFETY_INTERVAL, |_| poll),
            },
            Some("poll") => Watch::Poll { interval: poll },
            Some("off") => Watch::Off,
            Some(other) => {
                let span = mode.map_or(0..0, Spanned::span);
                self.err(
                    span,
                    format!("`watch` {other:?}: expected \"notify\", \"poll\" or \"off\""),
                );
                Watch::Off
            }
        }
    }

    /// A `[backends.NAME]` or `[auth.NAME]` name: `[A-Za-z0-9_-]`, not empty.
    pub(super) fn section_name(&mut self, name: &str, span: Range<usize>, what: &str) {
        let ok = !name.is_empty()
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"_-".contains(&b));
        if !ok {
            self.err(
                span,
                format!("{what} name {name:?} must be made of [A-Za-z0-9_-]"),
            );
        }
    }

    fn addr(&mut self, v: Option<&Spanned<String>>, key: &str, default: &str) -> SocketAddr {
        let fallback = SocketAddr::from(([127, 0, 0, 1], 0));
        let Some(v) = v else {
            return default.parse().unwrap_or(fallback);
        };
        v.get_ref().parse().unwrap_or_else(|_| {
            self.err(
                v.span(),
                format!("`{key}`: {:?} is not an IP:PORT address", v.get_ref()),
            );
            fallback
        })
    }

    fn token(&mut self, t: &Spanned<String>) -> Option<String> {
        let value = match t.get_ref().strip_prefix("env:") {
            Some(var) => std::env::var(var).ok(),
            None => Some(t.get_ref().clone()),
        };
        match value.filter(|v| !v.is_empty()) {
            Some(v) => Some(v),
            None => {
                self.err(
                    t.span(),
                    format!(
                        "`admin_token`: {:?} is empty or names an unset environment variable",
                        t.get_ref()
                    ),
                );
                None
            }
        }
    }

    pub(super) fn backends(
        &mut self,
        value: Option<Spanned<DeValue<'_>>>,
    ) -> (Vec<Backend>, Option<BackendId>) {
        let Some(value) = value else {
            self.err(0..0, "no `[backends]`: declare at least the legacy backend, e.g. [backends.legacy] url = \"http://127.0.0.1:3000\"".into());
            return (vec![], None);
        };
        let span = value.span();
        let DeValue::Table(entries) = value.into_inner() else {
            self.err(
                span,
                "`backends` must be a table of `[backends.NAME]` sections".into(),
            );
            return (vec![], None);
        };
        let mut backends = Vec::new();
        let mut marked = Vec::new();
        for (name, entry) in entries {
            let name_span = name.span();
            let name = name.into_inner().to_string();
            self.section_name(&name, name_span.clone(), "backend");
            // An entry with errors still takes its place, so routes naming it do not also
            // report "unknown backend"; the errors keep the table from being built.
            let Some(f) = self.de::<BackendFile>(entry, &format!("[backends.{name}]")) else {
                backends.push(placeholder(name));
                continue;
            };
            if f.legacy {
                marked.push((backends.len(), name_span));
            }
            let b = self
                .backend(name.clone(), f)
                .unwrap_or_else(|| placeholder(name));
            backends.push(b);
        }
        let legacy = match marked.as_slice() {
            [] => backends
                .iter()
                .position(|b| b.name == "legacy")
                .map(BackendId::new),
            [(id, _)] => Some(BackendId::new(*id)),
            [_, rest @ ..] => {
                for (_, span) in rest {
                    self.err(
                        span.clone(),
                        "more than one backend has `legacy = true`; mark only the monolith".into(),
                    );
                }
                None
            }
        };
        if let Some(id) = legacy {
            backends[id.index()].legacy = true;
        }
        (backends, legacy)
    }

    pub(super) fn backend(&mut self, name: String, f: BackendFile) -> Option<Backend> {
        let connect_timeout = self.duration(
            f.connect_timeout.as_ref(),
            "connect_timeout",
            DEFAULT_CONNECT_TIMEOUT,
        );
        let timeout = self.duration(f.timeout.as_ref(), "timeout", DEFAULT_TIMEOUT);
        let text = f.url.get_ref();
        let bad = |why: &str| format!("[backends.{name}] `url`: {text:?} {why}");
        let uri = match text.parse::<Uri>() {
            Ok(u) => u,
            Err(e) => {
                self.err(f.url.span(), bad(&format!("is not a URL ({e})")));
                return None;
            }
        };
        let problem = match (uri.scheme_str(), uri.authority()) {
            (Some("http" | "https"), Some(a)) if a.as_str().contains('@') => {
                Some("must not carry credentials")
            }
            (Some("http" | "https"), Some(a)) if a.host().is_empty() => Some("has no host"),
            (Some("http" | "https"), Some(_)) if uri.query().is_some() => {
                Some("must not have a query")
            }
            (Some("http" | "https"), Some(_)) => None,
            _ => Some(
                "must be an absolute http:// or https:// URL such as \"http://127.0.0.1:3000\"",
            ),
        };
        if let Some(why) = problem {
            self.err(f.url.span(), bad(why));
            return None;
        }
        let https = uri.scheme_str() == Some("https");
        let protocol = self.protocol(&name, f.protocol.as_ref(), https);
        let tls = self.backend_tls(&name, f.tls.as_ref(), &uri, f.url.span(), protocol);
        let authority = uri.authority()?.clone();
        let endpoints = match &f.endpoints {
            None => vec![authority.clone()],
            Some(list) => self.endpoints(&name, list, https),
        };
        let retries = f.retries.as_ref().map_or(0, |r| {
            let n = *r.get_ref();
            if !(0..=MAX_RETRIES).contains(&n) {
                self.err(
                    r.span(),
                    format!(
                        "[backends.{name}] `retries` must be between 0 and {MAX_RETRIES}, got {n}"
                    ),
                );
            }
            n.clamp(0, MAX_RETRIES) as u32
        });
        let retry_on = f
            .retry_on
            .as_ref()
            .map_or_else(RetryOn::default, |r| self.retry_on(&name, r));
        let health = f.health.as_ref().map(|h| self.health(&name, h.get_ref()));
        let connections = self.conn_limits(&f);
        Some(Backend {
            connections,
            endpoints,
            retries,
            retry_on,
            health,
            name,
            url: text.clone(),
            scheme: if https {
                http::uri::Scheme::HTTPS
            } else {
                http::uri::Scheme::HTTP
            },
            protocol,
            tls,
            authority,
            base_path: uri.path().trim_end_matches('/').to_string(),
            legacy: false,
            connect_timeout,
            timeout,
        })
    }

    /// `max_connections`, `max_connecting`, `max_waiting`, `wait_timeout` of a backend.
    fn conn_limits(&mut self, f: &BackendFile) -> ConnLimits {
        let d = ConnLimits::default();
        let mut count = |v: &Option<Spanned<i64>>, key: &str, min: i64, default: usize| {
            v.as_ref()
                .map_or(default, |v| self.count(v, key, min) as usize)
        };
        let max_connections = count(&f.max_connections, "max_connections", 1, d.max_connections);
        let max_connecting = count(&f.max_connecting, "max_connecting", 1, d.max_connecting);
        let max_waiting = count(&f.max_waiting, "max_waiting", 0, d.max_waiting);
        let wait_timeout = self.duration(f.wait_timeout.as_ref(), "wait_timeout", d.wait_timeout);
        ConnLimits {
            max_connections,
            // An attempt is a connection being opened: never more of them than connections.
            max_connecting: max_connecting.min(max_connections),
            max_waiting,
            wait_timeout,
        }
    }

    pub(super) fn routes(
        &mut self,
        value: Option<Spanned<DeValue<'_>>>,
        backends: &[Backend],
        legacy: Option<BackendId>,
        providers: &[crate::routes::Provider],
        store: bool,
        has_events: bool,
    ) -> Vec<Route> {
        let Some(value) = value else {
            self.err(
                0..0,
                "no `[[routes]]`: add at least `[[routes]] prefix = \"/\" backend = \"legacy\"`"
                    .into(),
            );
            return vec![];
        };
        let span = value.span();
        let DeValue::Array(entries) = value.into_inner() else {
            self.err(
                span,
                "`routes` must be an array of `[[routes]]` tables".into(),
            );
            return vec![];
        };
        let names: HashMap<String, BackendId> = backends
            .iter()
            .enumerate()
            .map(|(i, b)| (b.name.clone(), BackendId::new(i)))
            .collect();
        let mut routes: Vec<Route> = Vec::new();
        let mut seen: HashMap<crate::routes::RouteKey, usize> = HashMap::new();
        for entry in entries {
            let Some(f) = self.de::<RouteFile>(entry, "[[routes]]") else {
                continue;
            };
            let prefix_span = f.prefix.span();
            let Some(route) = self.route(f, &names, legacy, providers, (store, has_events)) else {
                continue;
            };
            if let Some(line) = seen.insert(route.route_key(), route.line) {
                self.err(
                    prefix_span,
                    format!("duplicate route: same prefix and filters as the route on line {line}"),
                );
            }
            routes.push(route);
        }
        routes
    }

    fn route(
        &mut self,
        f: RouteFile,
        names: &HashMap<String, BackendId>,
        legacy: Option<BackendId>,
        providers: &[crate::routes::Provider],
        (store, has_events): (bool, bool),
    ) -> Option<Route> {
        let line = self.locate(f.prefix.span(), String::new()).line;
        let key = self.prefix(&f.prefix);
        let methods = f.methods.as_ref().map(|m| self.methods(m, "methods"));
        let host = f.host.as_ref().map(|h| self.host(h));
        let backend = self.backend_ref(&f.backend, names, "backend");
        let shadow = self.shadow(&f, names, backend);
        let canary = f
            .canary
            .as_ref()
            .and_then(|c| self.canary(c, names, backend));
        let fallback = f.fallback.as_ref().and_then(|fb| {
            let id = self.backend_ref(fb, names, "fallback")?;
            if Some(id) == backend {
                self.err(fb.span(), "`fallback` is the route's own backend".into());
            }
            Some(id)
        });
        if let (Some(c), None) = (&f.compare, &f.shadow) {
            self.err(
                c.span(),
                "`[routes.compare]` without `shadow`: nothing would be compared".into(),
            );
        }
        let compare = self.compare(f.compare.as_ref().map(Spanned::get_ref));
        let guard = f.guard.as_ref().and_then(|g| self.guard(g, names, legacy));
        let upgrades = f
            .upgrades
            .as_ref()
            .map_or_else(Vec::new, |u| self.upgrades(u));
        let auth = f.auth.as_ref().and_then(|a| self.route_auth(a, providers));
        let rate_limits = f
            .rate_limit
            .as_ref()
            .map_or_else(Vec::new, |r| self.rate_limits(r, f.auth.is_some(), store));
        let stale = f
            .stale_if_error
            .as_ref()
            .and_then(|s| self.stale(s, f.auth.is_some()));
        let events = f
            .events
            .as_ref()
            .and_then(|e| self.route_events(e, f.prefix.get_ref(), f.shadow.is_some(), has_events));
        if let (Some(c), None) = (&canary, &f.auth) {
            if let Sticky::Key(RequestKey::Claim(claim)) = &c.sticky {
                let span = f.canary.as_ref().map_or(0..0, Spanned::span);
                self.err(
                    span,
                    format!("`canary.sticky` \"claim:{claim}\" needs `auth` on the route: claims come from a verified token"),
                );
            }
        }
        Some(Route {
            prefix: f.prefix.get_ref().clone(),
            key: key?,
            methods,
            host,
            backend: backend?,
            shadow,
            canary,
            fallback,
            compare,
            guard,
            upgrades,
            retry_non_idempotent: f
                .retry_non_idempotent
                .as_ref()
                .is_some_and(|r| *r.get_ref()),
            auth,
            rate_limits,
            stale,
            events,
            line,
        })
    }

    /// `retry_on = ["connect-failure", "refused-stream", "reset"]`: each case once.
    fn retry_on(&mut self, name: &str, list: &Spanned<Vec<Spanned<String>>>) -> RetryOn {
        let mut on = RetryOn::NONE;
        for item in list.get_ref() {
            match RetryCase::parse(item.get_ref()) {
                Some(case) if on.contains(case) => self.err(
                    item.span(),
                    format!("[backends.{name}] `retry_on`: {:?} is listed twice", item.get_ref()),
                ),
                Some(case) => on = on.with(case),
                None => self.err(
                    item.span(),
                    format!(
                        "[backends.{name}] `retry_on`: {:?} is not a retry case (one of \"connect-failure\", \"refused-stream\", \"reset\")",
                        item.get_ref()
                    ),
                ),
            }
        }
        on
    }

    /// `upgrades = ["name", ...]`: protocol names (RFC 9110 tokens), never `h2c`.
    fn upgrades(&mut self, list: &Spanned<Vec<Spanned<String>>>) -> Vec<String> {
        let mut out = Vec::new();
        for u in list.get_ref() {
            let name = u.get_ref();
            let token = !name.is_empty()
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b));
            if !token {
                self.err(
                    u.span(),
                    format!("`upgrades`: {name:?} is not a protocol name (letters, digits and !#$%&'*+-.^_`|~)"),
                );
            } else if name.eq_ignore_ascii_case("h2c") {
                self.err(
                    u.span(),
                    "`upgrades`: h2c is never tunnelled: everything after the switch would bypass routing, limits and logs (serve HTTP/2 with `[server] h2c = true` instead)".into(),
                );
            } else {
                out.push(name.to_ascii_lowercase());
            }
        }
        out
    }

    fn prefix(&mut self, p: &Spanned<String>) -> Option<String> {
        let text = p.get_ref();
        let why = if !text.starts_with('/') {
            Some("must start with `/`")
        } else if text.contains(['?', '#'])
            || text.chars().any(|c| c.is_whitespace() || c.is_control())
        {
            Some("must be a plain path: no query, fragment, spaces or control characters")
        } else if text.split('/').any(|s| s == "." || s == "..") {
            Some("must not contain `.` or `..` segments")
        } else if text.contains("//") {
            Some("must not contain empty segments (`//`)")
        } else {
            None
        };
        if let Some(why) = why {
            self.err(p.span(), format!("`prefix` {text:?} {why}"));
            return None;
        }
        let key = text.trim_end_matches('/');
        Some(if key.is_empty() {
            "/".to_string()
        } else {
            key.to_string()
        })
    }

    fn host(&mut self, h: &Spanned<String>) -> String {
        let text = h.get_ref();
        let ok = !text.is_empty()
            && text
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b".-".contains(&b));
        if !ok {
            self.err(h.span(), format!("`host` {text:?} must be a host name without scheme, port or path, e.g. \"api.fittrack.example\""));
        }
        text.to_ascii_lowercase()
    }
}

/// Retries per request at most: more would multiply load on a struggling backend even
/// inside the retry budget.
const MAX_RETRIES: i64 = 5;
/// Active health check period when `health.interval` is absent.
const DEFAULT_HEALTH_INTERVAL: Duration = Duration::from_secs(5);

impl Ctx {
    fn endpoints(
        &mut self,
        name: &str,
        list: &Spanned<Vec<Spanned<String>>>,
        https: bool,
    ) -> Vec<http::uri::Authority> {
        let scheme = if https { "https://" } else { "http://" };
        if list.get_ref().is_empty() {
            self.err(
                list.span(),
                format!("[backends.{name}] `endpoints` is empty; remove it to use the url's host"),
            );
        }
        let mut out: Vec<http::uri::Authority> = Vec::new();
        for e in list.get_ref() {
            let text = e.get_ref();
            let bare = text
                .strip_prefix(scheme)
                .unwrap_or(text)
                .trim_end_matches('/');
            match bare.parse::<http::uri::Authority>() {
                Ok(a) if !a.host().is_empty() && !bare.contains(['/', '?', '@']) => {
                    if out.contains(&a) {
                        self.err(e.span(), format!("[backends.{name}] endpoint {text:?} is listed twice"));
                    }
                    out.push(a);
                }
                _ => self.err(e.span(), format!("[backends.{name}] endpoint {text:?} must be \"host:port\" or \"{scheme}host:port\" (the url's scheme)")),
            }
        }
        out
    }

    fn health(
        &mut self,
        name: &str,
        h: &super::super::file::HealthFile,
    ) -> crate::routes::HealthCheck {
        if !h.path.get_ref().starts_with('/') {
            self.err(
                h.path.span(),
                format!(
                    "[backends.{name}] `health.path` {:?} must start with /",
                    h.path.get_ref()
                ),
            );
        }
        let interval = self.duration(
            h.interval.as_ref(),
            "health.interval",
            DEFAULT_HEALTH_INTERVAL,
        );
        crate::routes::HealthCheck {
            path: h.path.get_ref().clone(),
            interval,
        }
    }
}

/// Stands in for a backend entry that has errors (never served: errors stop the build).
fn placeholder(name: String) -> Backend {
    Backend {
        name,
        url: String::new(),
        scheme: http::uri::Scheme::HTTP,
        authority: http::uri::Authority::from_static("invalid.invalid"),
        base_path: String::new(),
        legacy: false,
        connect_timeout: DEFAULT_CONNECT_TIMEOUT,
        timeout: DEFAULT_TIMEOUT,
        endpoints: vec![],
        retries: 0,
        retry_on: RetryOn::default(),
        health: None,
        protocol: Protocol::Http1,
        tls: None,
        connections: ConnLimits::default(),
    }
}

/// One runtime worker per CPU unless `workers` says otherwise.
fn default_workers() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

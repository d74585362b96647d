//! Process settings (`[server]`) and loading routes.toml from disk. `[server]` is read once
//! at start: a reload that changes it logs that a restart is needed and keeps the running
//! values. Everything else in the file is the route table, swapped on reload.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub mod file;
pub mod validate;

pub use amqp_url::AmqpUrl;
pub use validate::{parse, parse_at, Diagnostic, Parsed};

/// The validated `[server]` section.
#[derive(Debug, Clone, PartialEq)]
pub struct ServerSettings {
    pub listen: SocketAddr,
    pub admin: SocketAddr,
    pub admin_token: Option<String>,
    pub drain_timeout: Duration,
    pub max_request_body: u64,
    pub header_read_timeout: Duration,
    pub max_header_size: usize,
    pub max_connections: usize,
    /// The public listener's accept queue; `None`: the kernel's `somaxconn` (as HAProxy
    /// and Envoy do).
    pub backlog: Option<u32>,
    pub trust_shadow_header: bool,
    /// This proxy's name in `via` (`1.1 NAME`) and in loop detection.
    pub via: String,
    /// Runtime worker threads (default: the number of CPUs).
    pub workers: usize,
    /// How changes to routes.toml are noticed.
    pub watch: Watch,
    /// One `strangler::access` event per request.
    pub access_log: bool,
    /// TLS on the public listener: where its certificates come from.
    pub tls: Option<crate::tls::ServerTlsFiles>,
    /// Cleartext HTTP/2 (prior knowledge) on a listener without TLS.
    pub h2c: bool,
    /// Peers whose `X-Forwarded-For` is believed when finding the client's address.
    pub trusted_proxies: Vec<ipnet::IpNet>,
    /// Bytes of stored answers for `stale_if_error`, all routes together.
    pub stale_store_size: u64,
    /// `[ratelimit_store]`: where `scope = "global"` rate limits count.
    pub ratelimit_store: Option<RateLimitStore>,
    /// `[events]`: where migration events go.
    pub events: Option<EventsSettings>,
}

/// `[events]`, read at start like `[server]`.
#[derive(Clone, PartialEq)]
pub struct EventsSettings {
    /// The broker, from the environment variable `url_env` names; `None` when it is unset or
    /// empty (events are off, said once in the log).
    pub url: Option<AmqpUrl>,
    /// The variable it came from, for messages (the URL may hold a password).
    pub url_env: String,
    /// The durable topic exchange events are published to (declared if missing).
    pub exchange: String,
    /// Events held while the broker is slow or away; past it they are dropped and counted.
    pub buffer: usize,
    /// Bytes those events may hold together (write events carry bodies).
    pub buffer_bytes: usize,
    /// How long a publish may wait for the broker's confirm.
    pub publish_timeout: Duration,
    /// The CloudEvents `source` of every event.
    pub source: String,
}

/// Never prints the URL: it may hold a password.
impl std::fmt::Debug for EventsSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventsSettings")
            .field("url_env", &self.url_env)
            .field("url_set", &self.url.is_some())
            .field("exchange", &self.exchange)
            .field("buffer", &self.buffer)
            .field("buffer_bytes", &self.buffer_bytes)
            .field("publish_timeout", &self.publish_timeout)
            .field("source", &self.source)
            .finish()
    }
}

/// `[ratelimit_store]`, read at start like `[server]`.
#[derive(Clone, PartialEq)]
pub struct RateLimitStore {
    /// `redis://` or `rediss://`, from the environment variable `url_env` names.
    pub url: String,
    /// The variable it came from, for messages (the URL may hold a password).
    pub url_env: String,
    /// A request's budget for its round trip to the store.
    pub timeout: Duration,
    pub on_error: OnStoreError,
}

/// Never prints the URL: it may hold a password.
impl std::fmt::Debug for RateLimitStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLimitStore")
            .field("url_env", &self.url_env)
            .field("timeout", &self.timeout)
            .field("on_error", &self.on_error)
            .finish()
    }
}

/// What a global limit does when the store cannot answer in time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnStoreError {
    /// Count on this replica instead (the default).
    Local,
    /// Let the request through.
    Allow,
    /// Refuse it (429).
    Deny,
}

impl std::fmt::Display for OnStoreError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            OnStoreError::Local => "local",
            OnStoreError::Allow => "allow",
            OnStoreError::Deny => "deny",
        })
    }
}

/// How the proxy notices that routes.toml changed (SIGHUP and `POST /reload` always work).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Watch {
    /// Filesystem events on the file's directory (inotify), plus a content check every
    /// `interval` as a safety net for mounts whose events go missing.
    Notify { interval: std::time::Duration },
    /// Only a content check every `interval` (NFS and other mounts without events).
    Poll { interval: std::time::Duration },
    /// No watching.
    Off,
}

/// A routes.toml that was read and validated.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub path: PathBuf,
    pub parsed: Parsed,
    /// Hex SHA-256 of the file's bytes: shown on `/routes` so operators can tell which
    /// version of the file each replica serves.
    pub sha256: String,
}

/// Why a routes.toml could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("{path}: cannot read: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{}", render(path, errors))]
    Invalid {
        path: String,
        errors: Vec<Diagnostic>,
    },
}

impl LoadError {
    /// Every error as `FILE:LINE:COL: message` (a read error as one line).
    pub fn lines(&self) -> Vec<String> {
        match self {
            LoadError::Read { .. } => vec![self.to_string()],
            LoadError::Invalid { path, errors } => errors.iter().map(|d| d.render(path)).collect(),
        }
    }
}

fn render(path: &str, errors: &[Diagnostic]) -> String {
    errors
        .iter()
        .map(|d| d.render(path))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Reads and validates a routes.toml.
pub fn load(path: &Path) -> Result<Loaded, LoadError> {
    let shown = path.display().to_string();
    let bytes = std::fs::read(path).map_err(|source| LoadError::Read {
        path: shown.clone(),
        source,
    })?;
    load_bytes(path, &bytes)
}

/// Validates routes.toml content that was read from `path`.
pub fn load_bytes(path: &Path, bytes: &[u8]) -> Result<Loaded, LoadError> {
    let shown = path.display().to_string();
    let text = std::str::from_utf8(bytes).map_err(|e| LoadError::Invalid {
        path: shown.clone(),
        errors: vec![Diagnostic {
            line: 1,
            col: 1,
            message: format!("not UTF-8 text ({e})"),
        }],
    })?;
    let dir = path.parent().unwrap_or(Path::new(""));
    let parsed = parse_at(text, dir).map_err(|errors| LoadError::Invalid {
        path: shown,
        errors,
    })?;
    let sha256 = crate::tls::sha256_hex(bytes);
    Ok(Loaded {
        path: path.to_path_buf(),
        parsed,
        sha256,
    })
}

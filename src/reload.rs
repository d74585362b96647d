//! Reloading routes.toml: load -> validate -> swap, keeping the last good table. A file that
//! does not validate never replaces the one being served; an identical file counts as a
//! successful reload without a new generation. Every trigger (SIGHUP, `POST /reload`, the
//! file watcher in `watch`) ends here.

pub mod watch;

use std::sync::{Arc, Mutex, PoisonError};
use std::time::SystemTime;

use metrics::Label;
use serde::Serialize;
use tracing::{info, warn};

use crate::config;
use crate::metrics::{CONFIG_GENERATION, CONFIG_LAST_RELOAD_SUCCESSFUL, CONFIG_RELOADS_TOTAL};
use crate::routes::diff::diff;
use crate::state::{Active, State};

/// What a reload did, as `POST /reload` answers it.
#[derive(Debug, Clone, Serialize)]
pub struct Outcome {
    pub ok: bool,
    pub generation: u64,
    /// True when a new table was swapped in.
    pub changed: bool,
    /// The route changes, in `strangler diff` words.
    pub changes: Vec<String>,
    /// Every error as `FILE:LINE:COL: message`.
    pub errors: Vec<String>,
}

/// The outcome of the last reload attempt, for `/routes`.
#[derive(Debug, Clone)]
pub struct Status {
    pub ok: bool,
    pub error: Option<String>,
    pub at: SystemTime,
}

/// The reloads of one proxy: serialized (the watcher, SIGHUP and `POST /reload` may race),
/// with the last attempt's outcome.
pub struct Reloader {
    pub state: Arc<State>,
    lock: Mutex<()>,
    last: Mutex<Status>,
}

impl Reloader {
    /// Sets the config gauges for the table loaded at start.
    pub fn new(state: Arc<State>) -> Arc<Self> {
        let metrics = state.metrics();
        metrics
            .gauge(CONFIG_LAST_RELOAD_SUCCESSFUL, vec![])
            .set(1.0);
        metrics
            .gauge(CONFIG_GENERATION, vec![])
            .set(state.active().generation as f64);
        Arc::new(Reloader {
            state,
            lock: Mutex::new(()),
            last: Mutex::new(Status {
                ok: true,
                error: None,
                at: SystemTime::now(),
            }),
        })
    }

    /// The last reload attempt (the start, before any).
    pub fn last(&self) -> Status {
        self.last
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Reloads the file now (SIGHUP, `POST /reload`), read as the watcher reads it: until two
    /// reads agree, an empty file being a write in progress. A SIGHUP sent while an editor or
    /// a deploy tool is halfway through writing the file waits for the write to finish
    /// instead of failing on half a file. Blocking (reads the file, sleeps between reads):
    /// call from a blocking context.
    pub fn reload(&self) -> Outcome {
        let path = &self.state.path;
        let loaded = match watch::read_settled(path) {
            Ok(Some(bytes)) => config::load_bytes(path, &bytes),
            Ok(None) => Err(config::LoadError::Read {
                path: path.display().to_string(),
                source: std::io::Error::other(
                    "the file kept changing for 2 s while being read; not reloaded (the \
                     watcher reloads it once it settles, or reload again)",
                ),
            }),
            Err(source) => Err(config::LoadError::Read {
                path: path.display().to_string(),
                source,
            }),
        };
        self.apply(loaded)
    }

    /// Reloads from content already read (the watcher reads until two reads agree).
    pub fn reload_bytes(&self, bytes: &[u8]) -> Outcome {
        self.apply(config::load_bytes(&self.state.path, bytes))
    }

    fn apply(&self, loaded: Result<config::Loaded, config::LoadError>) -> Outcome {
        let _serial = self.lock.lock().unwrap_or_else(PoisonError::into_inner);
        let outcome = apply(&self.state, loaded);
        self.record(&outcome);
        outcome
    }

    fn record(&self, outcome: &Outcome) {
        let m = self.state.metrics();
        let label = if outcome.ok { "success" } else { "failure" };
        m.counter(CONFIG_RELOADS_TOTAL, vec![Label::new("outcome", label)])
            .increment(1);
        m.gauge(CONFIG_LAST_RELOAD_SUCCESSFUL, vec![])
            .set(if outcome.ok { 1.0 } else { 0.0 });
        m.gauge(CONFIG_GENERATION, vec![])
            .set(outcome.generation as f64);
        *self.last.lock().unwrap_or_else(PoisonError::into_inner) = Status {
            ok: outcome.ok,
            error: (!outcome.ok).then(|| outcome.errors.join("\n")),
            at: SystemTime::now(),
        };
    }
}

/// Validates and swaps in; the caller holds the reload lock.
fn apply(state: &State, loaded: Result<config::Loaded, config::LoadError>) -> Outcome {
    let current = state.active();
    let outcome = match loaded {
        Err(e) => {
            let errors = e.lines();
            for line in &errors {
                warn!(error = %line, "routes.toml rejected; the previous table keeps serving");
            }
            Outcome {
                ok: false,
                generation: current.generation,
                changed: false,
                changes: vec![],
                errors,
            }
        }
        Ok(loaded) if loaded.sha256 == current.sha256 && loaded.parsed.files == current.files => {
            Outcome {
                ok: true,
                generation: current.generation,
                changed: false,
                changes: vec![],
                errors: vec![],
            }
        }
        Ok(loaded) => {
            if loaded.parsed.server != state.settings {
                warn!("[server], [ratelimit_store] or [events] changed in routes.toml; those settings apply at the next restart");
            }
            for w in &loaded.parsed.warnings {
                warn!(warning = %w.render(&state.path.display().to_string()), "routes.toml");
            }
            let mut changes = diff(&current.table, &loaded.parsed.table);
            // (the same files read in another order, sections moved, is no change of files)
            changes.extend(files_changed(
                &state.path,
                &current.files,
                &loaded.parsed.files,
            ));
            let generation = current.generation + 1;
            swap_listener_tls(state, &current, &loaded);
            state.swap(state.build(&loaded, generation, &current));
            for change in &changes {
                info!(generation, change = %change, "route table changed");
            }
            info!(generation, sha256 = %loaded.sha256, changes = changes.len(), "routes.toml reloaded");
            Outcome {
                ok: true,
                generation,
                changed: true,
                changes,
                errors: vec![],
            }
        }
    };
    outcome
}

/// The change line for the files routes.toml reads (certificates, JWKS files, secret files):
/// `watched files changed: jwks.json, proxy.pem`, each file whose content changed or that only
/// one of the two tables read, named as routes.toml names them; `None` when none did.
fn files_changed(
    config: &std::path::Path,
    old: &crate::tls::Files,
    new: &crate::tls::Files,
) -> Option<String> {
    let dir = config.parent().unwrap_or(std::path::Path::new(""));
    let names: Vec<String> = new
        .changed(old)
        .into_iter()
        .map(|p| p.strip_prefix(dir).unwrap_or(p).display().to_string())
        .collect();
    (!names.is_empty()).then(|| format!("watched files changed: {}", names.join(", ")))
}

/// New listener certificates take effect for the next handshake, when the files changed at
/// the paths the listener was started with (other `[server]` changes wait for a restart).
fn swap_listener_tls(state: &State, current: &Active, loaded: &config::Loaded) {
    let (Some(live), Some(next)) = (&state.tls, &loaded.parsed.tls) else {
        return;
    };
    if loaded.parsed.server.tls == state.settings.tls && next.fingerprint != current.server_tls {
        live.store(next.config.clone());
        info!("listener TLS certificates reloaded; new connections use them");
    }
}

/// Reloads on a blocking thread.
pub async fn reload_async(reloader: Arc<Reloader>) -> Outcome {
    let fallback = reloader.state.clone();
    tokio::task::spawn_blocking(move || reloader.reload())
        .await
        .unwrap_or_else(|e| Outcome {
            ok: false,
            generation: fallback.active().generation,
            changed: false,
            changes: vec![],
            errors: vec![format!("reload task failed: {e}")],
        })
}

//! Noticing that routes.toml changed, whichever way it was written. The directory that holds
//! the file is watched, not the file: editors replace files by renaming a temp file over them,
//! `sed -i` and `rm` + re-create swap inodes, and Kubernetes ConfigMap volumes swap a `..data`
//! symlink without any event naming routes.toml. Any event in the directory starts a debounce;
//! when it settles (or at the latest [`DEBOUNCE_MAX`] after the first event, so a steady
//! stream of writes cannot postpone a reload forever), the file is read until two reads agree (a write seen half done), and only
//! content whose hash was not seen before is validated and swapped in. A periodic content
//! check backs the events up (and is all there is with `watch = "poll"`), and re-arms a watch
//! that broke. Nothing here touches the request path.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use notify::{EventKind, RecommendedWatcher, RecursiveMode, Watcher};
use tokio::sync::Notify;
use tracing::{debug, info, warn};

use super::Reloader;
use crate::config::Watch;
use crate::server::Shutdown;
use crate::state::State;

/// Quiet time after the last event before the file is read: editors and kubelet write in
/// bursts of several events within a few milliseconds.
const DEBOUNCE: Duration = Duration::from_millis(200);
/// The longest a debounce waits after its first event, however the events keep coming: a
/// deploy tool, a sync loop or two operators writing every 100 ms must not starve reloads.
/// With the settle reads and validation, a change applies well within 1 s of its first event.
pub(crate) const DEBOUNCE_MAX: Duration = Duration::from_millis(500);
/// Pause between the two reads that must agree.
const SETTLE: Duration = Duration::from_millis(50);
/// Reads before giving up on a file that keeps changing (checked again on the next event).
const MAX_READS: usize = 40;

/// Watches the routes.toml of `reloader`'s proxy until shutdown.
pub async fn run(reloader: Arc<Reloader>, mode: Watch, mut shutdown: Shutdown) {
    let state = reloader.state.clone();
    let interval = match mode {
        Watch::Off => return,
        Watch::Notify { interval } | Watch::Poll { interval } => interval,
    };
    let events = Arc::new(Notify::new());
    let broken = Arc::new(AtomicBool::new(false));
    let mut dirs = watched_dirs(&state);
    let mut watcher = match mode {
        Watch::Notify { .. } => arm(&dirs, &events, &broken),
        Watch::Poll { .. } | Watch::Off => None,
    };
    let mut seen = state.active().sha256.clone();
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    info!(dirs = ?dirs, ?mode, "watching routes.toml and the files it names");
    loop {
        tokio::select! {
            _ = shutdown.started() => return,
            _ = events.notified() => {
                debounce(&events).await;
                check(&reloader, &mut seen).await;
            }
            _ = tick.tick() => {
                if matches!(mode, Watch::Notify { .. }) && (watcher.is_none() || broken.swap(false, Ordering::AcqRel)) {
                    watcher = arm(&dirs, &events, &broken);
                }
                check(&reloader, &mut seen).await;
            }
        }
        // A reload may name certificate files in other directories.
        let now = watched_dirs(&state);
        if now != dirs {
            dirs = now;
            if matches!(mode, Watch::Notify { .. }) {
                watcher = arm(&dirs, &events, &broken);
            }
        }
    }
}

/// The directory holding the file (`.` for a bare file name).
fn watched_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// The directories of routes.toml and of every certificate file it names (Kubernetes
/// replaces a mounted Secret by swapping a symlink in its directory, as for ConfigMaps).
fn watched_dirs(state: &State) -> Vec<PathBuf> {
    let active = state.active();
    let mut dirs = vec![watched_dir(&state.path)];
    for p in active.files.paths() {
        let d = watched_dir(p);
        if !dirs.contains(&d) {
            dirs.push(d);
        }
    }
    dirs
}

/// Starts a watch on `dirs`; `None` (logged) when the OS refuses, retried on the next tick.
fn arm(
    dirs: &[PathBuf],
    events: &Arc<Notify>,
    broken: &Arc<AtomicBool>,
) -> Option<RecommendedWatcher> {
    let (events, broken_flag) = (events.clone(), broken.clone());
    let handler = move |res: notify::Result<notify::Event>| match res {
        // Reads (including ours) are not changes.
        Ok(e) if matches!(e.kind, EventKind::Access(_)) => {}
        Ok(e) => {
            if matches!(e.kind, EventKind::Remove(_)) && e.need_rescan() {
                broken_flag.store(true, Ordering::Release);
            }
            events.notify_one();
        }
        Err(error) => {
            warn!(%error, "file watch failed; re-arming");
            broken_flag.store(true, Ordering::Release);
            events.notify_one();
        }
    };
    let result = notify::recommended_watcher(handler).and_then(|mut w| {
        for dir in dirs {
            w.watch(dir, RecursiveMode::NonRecursive)?;
        }
        Ok(w)
    });
    match result {
        Ok(w) => {
            debug!(?dirs, "watch armed");
            Some(w)
        }
        Err(error) => {
            warn!(%error, ?dirs, "cannot watch the configuration's directories; checking their content periodically instead");
            None
        }
    }
}

/// Waits until no event has arrived for [`DEBOUNCE`], or [`DEBOUNCE_MAX`] has passed since
/// the first one, whichever comes first.
async fn debounce(events: &Notify) {
    let give_up = tokio::time::Instant::now() + DEBOUNCE_MAX;
    loop {
        let quiet = (tokio::time::Instant::now() + DEBOUNCE).min(give_up);
        match tokio::time::timeout_at(quiet, events.notified()).await {
            Ok(()) if tokio::time::Instant::now() < give_up => continue,
            _ => return,
        }
    }
}

/// Reloads when the file's settled content, or a certificate file it names, is new; a
/// missing routes.toml keeps the current table.
async fn check(reloader: &Arc<Reloader>, seen: &mut String) {
    let state = &reloader.state;
    let path = state.path.clone();
    let active = state.active();
    let read = tokio::task::spawn_blocking(move || {
        read_settled(&path).map(|r| r.map(|bytes| (bytes, active.files.reread())))
    })
    .await;
    let (bytes, files) = match read {
        Ok(Ok(Some(read))) => read,
        Ok(Ok(None)) => {
            debug!("routes.toml kept changing while being read; waiting for the next change");
            return;
        }
        Ok(Err(error)) if error.kind() == std::io::ErrorKind::NotFound => {
            if !seen.is_empty() {
                info!(path = %state.path.display(), "routes.toml is missing; the current table keeps serving until it is back");
                seen.clear();
            }
            return;
        }
        Ok(Err(error)) => {
            warn!(%error, path = %state.path.display(), "cannot read routes.toml; the current table keeps serving");
            return;
        }
        Err(error) => {
            warn!(%error, "routes.toml read task failed");
            return;
        }
    };
    let sha = crate::tls::sha256_hex(&bytes);
    let key = format!("{sha} {}", files.fingerprint());
    let active = state.active();
    // Content equal to the running table needs no reload, unless the last attempt failed
    // (a SIGHUP that read a half-written file): then the finished file, though equal to the
    // running table, is a successful reload, and the failure must not stay reported.
    let running = sha == active.sha256 && files == active.files;
    if (running && reloader.last().ok) || (!running && key == *seen) {
        *seen = key;
        return;
    }
    *seen = key;
    let reloader = reloader.clone();
    let outcome = tokio::task::spawn_blocking(move || reloader.reload_bytes(&bytes)).await;
    if let Ok(o) = outcome {
        info!(
            ok = o.ok,
            generation = o.generation,
            changed = o.changed,
            "routes.toml change seen"
        );
    }
}

/// Reads the file until two consecutive reads agree; `Ok(None)` if they never do. An empty
/// file is a write in progress (a writer in place truncates first, then writes, and may be
/// descheduled in between), so two empty reads do not agree: only a file that stays empty for
/// every read (about 2 s) is taken as empty, and then reported like any other bad file.
pub(crate) fn read_settled(path: &Path) -> std::io::Result<Option<Vec<u8>>> {
    let mut previous = std::fs::read(path)?;
    let mut always_empty = previous.is_empty();
    for _ in 0..MAX_READS {
        std::thread::sleep(SETTLE);
        let current = std::fs::read(path)?;
        if current == previous && !current.is_empty() {
            return Ok(Some(current));
        }
        always_empty &= current.is_empty();
        previous = current;
    }
    Ok(always_empty.then_some(previous))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_file_truncated_and_written_late_is_read_whole_not_empty() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("routes.toml");
        // A writer in place, descheduled for 150 ms between its truncate and its write: the
        // first reads see an empty file, and agree with each other.
        std::fs::write(&path, "").unwrap();
        let writer = {
            let path = path.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(150));
                std::fs::write(&path, "[server]\n").unwrap();
            })
        };
        assert_eq!(
            read_settled(&path).unwrap().as_deref(),
            Some(&b"[server]\n"[..])
        );
        writer.join().unwrap();
    }

    #[test]
    fn a_file_that_stays_empty_is_read_as_empty_at_last() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("routes.toml");
        std::fs::write(&path, "").unwrap();
        let started = std::time::Instant::now();
        assert_eq!(read_settled(&path).unwrap().as_deref(), Some(&b""[..]));
        assert!(started.elapsed() >= SETTLE * MAX_READS as u32);
    }
}

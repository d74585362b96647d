//! Hot reload: every way a file gets written, the Kubernetes ConfigMap symlink swap, bad
//! files, in-flight requests, warm pools, WebSockets, SIGHUP, and a reload storm under load.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a panic is a failure report

mod support;

use std::io::Write;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use support::*;

/// Routes `/` to backend `to`, with both `a` and `b` declared.
fn table(extra: &str, a: SocketAddr, b: SocketAddr, to: &str) -> String {
    format!(
        "{}{}[backends.users]\nurl = \"http://{b}\"\n[[routes]]\nprefix = \"/\"\nbackend = \"{to}\"\n",
        server(extra),
        legacy_at(a)
    )
}

async fn answered_by(proxy: &Proxy) -> String {
    get(&proxy.url("/whoami")).await.backend()
}

/// Waits until requests are answered by `want`.
async fn flips_to(proxy: &Proxy, want: &str) {
    eventually(Duration::from_secs(5), || async {
        (answered_by(proxy).await == want).then_some(())
    })
    .await;
}

async fn start_pair(server: &str) -> (Proxy, Running, Running) {
    let a = start_echo("legacy").await;
    let b = start_echo("users").await;
    let proxy = Proxy::start(&table(server, a.addr, b.addr, "legacy")).await;
    assert_eq!(answered_by(&proxy).await, "legacy");
    (proxy, a, b)
}

#[tokio::test]
async fn in_place_write_is_picked_up() {
    let (proxy, a, b) = start_pair("").await;
    std::fs::write(proxy.path(), table("", a.addr, b.addr, "users")).unwrap();
    flips_to(&proxy, "users").await;
    let r = routes_json(&proxy).await;
    assert_eq!(r["generation"], 2);
    assert_eq!(r["last_reload"]["ok"], true);
}

#[tokio::test]
async fn a_write_seen_half_done_never_counts_as_a_bad_file() {
    let (proxy, a, b) = start_pair("").await;
    let text = table("", a.addr, b.addr, "users");
    let (first, second) = text.split_at(text.len() / 2);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(proxy.path())
        .unwrap();
    f.write_all(first.as_bytes()).unwrap();
    f.flush().unwrap();
    tokio::time::sleep(Duration::from_millis(30)).await;
    f.write_all(second.as_bytes()).unwrap();
    drop(f);
    flips_to(&proxy, "users").await;
    let m = metrics_text(&proxy).await;
    assert_eq!(failed_reloads(&m), None, "{m}");
}

/// What SIGHUP and `POST /reload` run, met halfway through an in-place write: the file is
/// truncated, and its new content arrives 300 ms later (a writer descheduled in between).
#[tokio::test]
async fn a_reload_during_a_slow_in_place_write_waits_for_the_write() {
    let (proxy, a, b) = start_pair("watch = \"off\"").await;
    let text = table("watch = \"off\"", a.addr, b.addr, "users");
    let path = proxy.path();
    let file = std::fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(&path)
        .unwrap();
    let writer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        let mut file = file;
        file.write_all(text.as_bytes()).unwrap();
    });
    let outcome = strangler::reload::reload_async(proxy.reloader.clone()).await;
    writer.join().unwrap();
    assert!(outcome.ok && outcome.changed, "{outcome:?}");
    let r = routes_json(&proxy).await;
    assert_eq!(r["last_reload"]["ok"], true, "{r}");
    assert_eq!(failed_reloads(&metrics_text(&proxy).await), None);
    assert_eq!(answered_by(&proxy).await, "users");
}

/// A reload that read a bad file (the operator saved half an edit and sent SIGHUP), then the
/// file put back as it was: equal to the running table, so nothing is swapped, but the last
/// reload must read successful again (the alert on it must not fire for a healthy proxy).
#[tokio::test]
async fn the_running_content_put_back_after_a_failed_reload_clears_the_failure() {
    let (proxy, a, b) = start_pair("").await;
    let good = table("", a.addr, b.addr, "legacy");
    std::fs::write(proxy.path(), "[backends.legacy]\nurl = ").unwrap();
    let outcome = strangler::reload::reload_async(proxy.reloader.clone()).await;
    assert!(!outcome.ok, "{outcome:?}");
    assert_eq!(routes_json(&proxy).await["last_reload"]["ok"], false);
    std::fs::write(proxy.path(), &good).unwrap();
    eventually(Duration::from_secs(5), || async {
        let r = routes_json(&proxy).await;
        (r["last_reload"]["ok"] == true).then_some(())
    })
    .await;
    let m = metrics_text(&proxy).await;
    assert_eq!(
        metric(&m, "strangler_config_last_reload_successful", &[]),
        Some(1.0),
        "{m}"
    );
    assert_eq!(
        routes_json(&proxy).await["generation"],
        1,
        "nothing was swapped"
    );
    let _ = b;
}

#[tokio::test]
async fn temp_file_renamed_over_it_is_picked_up() {
    let (proxy, a, b) = start_pair("").await;
    let tmp = proxy.dir.path().join(".routes.toml.swp");
    std::fs::write(&tmp, table("", a.addr, b.addr, "users")).unwrap();
    std::fs::rename(&tmp, proxy.path()).unwrap();
    flips_to(&proxy, "users").await;
    // And again: the watch survives the inode change.
    std::fs::write(&tmp, table("", a.addr, b.addr, "legacy")).unwrap();
    std::fs::rename(&tmp, proxy.path()).unwrap();
    flips_to(&proxy, "legacy").await;
}

#[tokio::test]
async fn delete_then_recreate_keeps_serving_and_picks_up_the_new_file() {
    let (proxy, a, b) = start_pair("").await;
    std::fs::remove_file(proxy.path()).unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(
        answered_by(&proxy).await,
        "legacy",
        "a missing file keeps the table"
    );
    std::fs::write(proxy.path(), table("", a.addr, b.addr, "users")).unwrap();
    flips_to(&proxy, "users").await;
    assert_eq!(
        failed_reloads(&metrics_text(&proxy).await),
        None,
        "a file being replaced is not a failure"
    );
}

/// Lays out a directory like a Kubernetes ConfigMap volume:
/// `routes.toml -> ..data/routes.toml`, `..data -> ..<version>`.
fn configmap_version(dir: &Path, version: &str, content: &str) {
    let versioned = dir.join(version);
    std::fs::create_dir(&versioned).unwrap();
    std::fs::write(versioned.join("routes.toml"), content).unwrap();
    let tmp = dir.join("..data_tmp");
    std::os::unix::fs::symlink(version, &tmp).unwrap();
    std::fs::rename(&tmp, dir.join("..data")).unwrap();
}

#[tokio::test]
async fn kubernetes_configmap_symlink_swap_is_picked_up() {
    let a = start_echo("legacy").await;
    let b = start_echo("users").await;
    let dir = tempfile::tempdir().unwrap();
    configmap_version(
        dir.path(),
        "..2026_11_22_05_00_00.000000001",
        &table("", a.addr, b.addr, "legacy"),
    );
    std::os::unix::fs::symlink("..data/routes.toml", dir.path().join("routes.toml")).unwrap();
    let loaded = strangler::config::load(&dir.path().join("routes.toml")).unwrap();
    let server = strangler::Server::bind(loaded).await.unwrap();
    let (addr, admin) = (server.proxy_addr(), server.admin_addr());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(server.run(async {
        let _ = stopped.await;
    }));
    let who = || async move { get(&format!("http://{addr}/")).await.backend() };
    assert_eq!(who().await, "legacy");
    // kubelet: new versioned dir, swap ..data, remove the old dir. No event names routes.toml.
    configmap_version(
        dir.path(),
        "..2026_11_22_05_01_00.000000002",
        &table("", a.addr, b.addr, "users"),
    );
    std::fs::remove_dir_all(dir.path().join("..2026_11_22_05_00_00.000000001")).unwrap();
    eventually(Duration::from_secs(5), || async {
        (who().await == "users").then_some(())
    })
    .await;
    let r = get(&format!("http://{admin}/routes")).await.json();
    assert_eq!(r["generation"], 2);
    let _ = stop.send(());
}

#[tokio::test]
async fn invalid_file_keeps_the_old_table_until_fixed() {
    let (proxy, a, b) = start_pair("").await;
    std::fs::write(proxy.path(), table("", a.addr, b.addr, "nowhere")).unwrap();
    let r = eventually(Duration::from_secs(5), || async {
        let r = routes_json(&proxy).await;
        (r["last_reload"]["ok"] == false).then_some(r)
    })
    .await;
    assert!(
        r["last_reload"]["error"]
            .as_str()
            .unwrap()
            .contains("routes.toml:12:11: `backend`: unknown backend \"nowhere\""),
        "{r}"
    );
    assert_eq!(r["generation"], 1);
    assert_eq!(
        answered_by(&proxy).await,
        "legacy",
        "the old table keeps serving"
    );
    let m = metrics_text(&proxy).await;
    assert_eq!(failed_reloads(&m), Some(1.0));
    assert_eq!(
        metric(&m, "strangler_config_last_reload_successful", &[]),
        Some(0.0)
    );
    // Fixing the file recovers without a restart.
    std::fs::write(proxy.path(), table("", a.addr, b.addr, "users")).unwrap();
    flips_to(&proxy, "users").await;
    let r = routes_json(&proxy).await;
    assert_eq!(r["last_reload"]["ok"], true);
    assert_eq!(r["generation"], 2);
}

#[tokio::test]
async fn polling_mode_sees_changes_without_events() {
    let (proxy, a, b) = start_pair("watch = \"poll\"\nwatch_interval = \"100ms\"").await;
    std::fs::write(
        proxy.path(),
        table(
            "watch = \"poll\"\nwatch_interval = \"100ms\"",
            a.addr,
            b.addr,
            "users",
        ),
    )
    .unwrap();
    flips_to(&proxy, "users").await;
}

#[tokio::test]
async fn in_flight_requests_finish_on_the_table_they_started_with() {
    let (proxy, a, b) = start_pair("watch = \"off\"").await;
    let slow = tokio::spawn({
        let url = proxy.url("/slow/800");
        async move { get(&url).await.backend() }
    });
    tokio::time::sleep(Duration::from_millis(150)).await;
    reload_with(&proxy, &table("watch = \"off\"", a.addr, b.addr, "users")).await;
    assert_eq!(
        answered_by(&proxy).await,
        "users",
        "new requests see the new table"
    );
    assert_eq!(
        slow.await.unwrap(),
        "legacy",
        "the request in flight finished where it started"
    );
}

/// A backend that counts the connections it accepted and the ones still open.
async fn counting_backend() -> (SocketAddr, Arc<AtomicUsize>, Arc<AtomicUsize>) {
    let (l, addr) = listener().await;
    let (accepted, open) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let (acc, op) = (accepted.clone(), open.clone());
    tokio::spawn(async move {
        while let Ok((stream, _)) = l.accept().await {
            acc.fetch_add(1, Ordering::SeqCst);
            op.fetch_add(1, Ordering::SeqCst);
            let op = op.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(|_req| async {
                    Ok::<_, std::convert::Infallible>(legacy_stub::http::json(
                        http::StatusCode::OK,
                        &serde_json::json!({"backend": "counting"}),
                    ))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                    .await;
                op.fetch_sub(1, Ordering::SeqCst);
            });
        }
    });
    (addr, accepted, open)
}

#[tokio::test]
async fn warm_pools_survive_reloads_and_removed_backends_close_theirs() {
    let (addr, accepted, open) = counting_backend().await;
    let other = start_echo("users").await;
    let cfg = |extra: &str| table("watch = \"off\"", addr, other.addr, "legacy") + extra;
    let proxy = Proxy::start(&cfg("")).await;
    for _ in 0..5 {
        assert_eq!(get(&proxy.url("/")).await.status, 200);
    }
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        1,
        "one keep-alive connection"
    );
    // An unrelated change: the pool (and its connection) is kept.
    reload_with(
        &proxy,
        &cfg("[[routes]]\nprefix = \"/api/users\"\nbackend = \"users\"\n"),
    )
    .await;
    for _ in 0..5 {
        assert_eq!(get(&proxy.url("/")).await.status, 200);
    }
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        1,
        "the reload kept the warm connection"
    );
    // Remove the backend: its pool closes once nothing uses it.
    let without = format!(
        "{}[backends.users]\nurl = \"http://{}\"\n[[routes]]\nprefix = \"/\"\nbackend = \"users\"\n",
        server("watch = \"off\""),
        other.addr
    );
    reload_with(&proxy, &without).await;
    eventually(Duration::from_secs(5), || async {
        (open.load(Ordering::SeqCst) == 0).then_some(())
    })
    .await;
}

#[tokio::test]
async fn websockets_stay_open_across_reloads() {
    let ws_backend = start_ws_echo().await;
    let other = start_echo("users").await;
    let proxy = Proxy::start(&table("watch = \"off\"", ws_backend, other.addr, "legacy")).await;
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{}/ws", proxy.addr))
        .await
        .unwrap();
    for to in ["users", "legacy", "users"] {
        reload_with(
            &proxy,
            &table("watch = \"off\"", ws_backend, other.addr, to),
        )
        .await;
        ws.send(tokio_tungstenite::tungstenite::Message::text(to))
            .await
            .unwrap();
        assert_eq!(
            ws.next()
                .await
                .unwrap()
                .unwrap()
                .into_text()
                .unwrap()
                .as_str(),
            to
        );
    }
}

/// Eight keep-alive clients sending `/whoami` until told to stop, counting who answered.
struct Load {
    /// Answers by legacy and by users.
    served: Arc<[AtomicUsize; 2]>,
    failures: Arc<AtomicUsize>,
    done: Arc<std::sync::atomic::AtomicBool>,
    clients: Vec<tokio::task::JoinHandle<usize>>,
}

impl Load {
    /// Starts the clients; each sends at least `min` requests.
    fn start(proxy: &Proxy, min: usize) -> Load {
        let url = proxy.url("/whoami");
        let served = Arc::new([AtomicUsize::new(0), AtomicUsize::new(0)]);
        let failures = Arc::new(AtomicUsize::new(0));
        let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let clients = (0..8)
            .map(|_| {
                let (url, served, failures, done) =
                    (url.clone(), served.clone(), failures.clone(), done.clone());
                tokio::spawn(async move {
                    let client = client();
                    let mut sent = 0;
                    while sent < min || !done.load(Ordering::Acquire) {
                        sent += 1;
                        let req = http::Request::get(&url)
                            .body(http_body_util::Full::default())
                            .unwrap();
                        match client.request(req).await {
                            Ok(resp) if resp.status() == 200 => {
                                let body = http_body_util::BodyExt::collect(resp.into_body())
                                    .await
                                    .unwrap()
                                    .to_bytes();
                                let who: serde_json::Value = serde_json::from_slice(&body).unwrap();
                                served[usize::from(who["backend"] == "users")]
                                    .fetch_add(1, Ordering::Relaxed);
                            }
                            _ => {
                                failures.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }
                    sent
                })
            })
            .collect();
        Load {
            served,
            failures,
            done,
            clients,
        }
    }

    /// `(legacy, users)` answers so far.
    fn served(&self) -> (usize, usize) {
        (
            self.served[0].load(Ordering::Relaxed),
            self.served[1].load(Ordering::Relaxed),
        )
    }

    /// Stops the clients; returns `(sent, legacy, users, failed)`.
    async fn finish(mut self) -> (usize, usize, usize, usize) {
        self.done.store(true, Ordering::Release);
        let mut sent = 0;
        for c in std::mem::take(&mut self.clients) {
            sent += c.await.unwrap();
        }
        let (legacy, users) = self.served();
        (sent, legacy, users, self.failures.load(Ordering::Relaxed))
    }
}

/// Writes `text` over routes.toml: renamed over it from a temp file, or in place.
fn write_routes(proxy: &Proxy, text: &str, rename: bool) {
    if rename {
        let tmp = proxy.dir.path().join("routes.toml.tmp");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, proxy.path()).unwrap();
    } else {
        std::fs::write(proxy.path(), text).unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_storm_under_load_fails_no_request() {
    let (proxy, a, b) = start_pair("").await;
    let load = Load::start(&proxy, 500);
    // 60 flips while the clients run: written in place or renamed over the file (the watcher
    // sees them) and reloaded at once (as SIGHUP or POST /reload would).
    for i in 0..60 {
        let to = if i % 2 == 0 { "users" } else { "legacy" };
        write_routes(
            &proxy,
            &table(&format!("# flip {i}"), a.addr, b.addr, to),
            i % 2 == 0,
        );
        let outcome = strangler::reload::reload_async(proxy.reloader.clone()).await;
        assert!(outcome.ok, "{:?}", outcome.errors);
        tokio::time::sleep(Duration::from_millis(15)).await;
    }
    let (sent, to_legacy, to_users, failed) = load.finish().await;
    eprintln!("reload storm: 60 flips, {sent} requests, {to_legacy} answered by legacy, {to_users} by users, {failed} failed");
    assert_eq!(failed, 0, "failed requests");
    assert_eq!(to_legacy + to_users, sent);
    assert!(sent >= 4000, "{sent}");
    assert!(
        to_legacy > 0 && to_users > 0,
        "both backends answered: {to_legacy} / {to_users}"
    );
    let r = routes_json(&proxy).await;
    assert!(r["generation"].as_u64().unwrap() >= 60, "{r}");
    let m = metrics_text(&proxy).await;
    assert_eq!(failed_reloads(&m), None, "{m}");
}

/// The way it once failed: a writer that never pauses for the debounce's quiet time (a flip
/// every 100-200 ms for 10 s, renamed and in place by turns) under load. Only the watcher
/// reloads here; every change must apply while the writes go on, not after they stop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn steady_writes_never_starve_the_watcher() {
    let (proxy, a, b) = start_pair("").await;
    let load = Load::start(&proxy, 100);
    let begin = std::time::Instant::now();
    let mut flips = 0;
    let mut generations = vec![];
    while begin.elapsed() < Duration::from_secs(10) {
        let to = if flips % 2 == 0 { "users" } else { "legacy" };
        write_routes(
            &proxy,
            &table(&format!("# flip {flips}"), a.addr, b.addr, to),
            flips % 2 == 0,
        );
        flips += 1;
        tokio::time::sleep(Duration::from_millis(fastrand::u64(100..=200))).await;
        if flips % 10 == 0 {
            generations.push(routes_json(&proxy).await["generation"].as_u64().unwrap());
        }
    }
    // Counted before the writes stop: the watcher must not wait for them to.
    let (legacy_during, users_during) = load.served();
    let generation = routes_json(&proxy).await["generation"].as_u64().unwrap();
    let (sent, _, _, failed) = load.finish().await;
    eprintln!("steady writes: {flips} flips in 10 s, generations {generations:?} -> {generation}, {sent} requests, {legacy_during} legacy / {users_during} users during the writes, {failed} failed");
    assert_eq!(failed, 0, "failed requests");
    assert!(
        legacy_during > 0 && users_during > 0,
        "both backends answered while the writes went on: {legacy_during} / {users_during}"
    );
    // Reloads went on while the writes did: in each half of the run, and many of them (a
    // change applies within a second of its first event; before the bounded debounce this
    // run ended at generation 3). The bounds leave room for a loaded machine.
    let (first, middle) = (generations[0], generations[generations.len() / 2]);
    assert!(
        middle > first && generation > middle,
        "the generation grew in both halves of the run: {generations:?} -> {generation}"
    );
    assert!(
        generation >= 6,
        "generation {generation} after {flips} flips"
    );
}

#[cfg(unix)]
#[test]
fn sighup_reloads_the_real_binary() {
    use std::io::BufRead;
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (a, b) = rt.block_on(async { (start_echo("legacy").await, start_echo("users").await) });
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("routes.toml");
    std::fs::write(&path, table("watch = \"off\"", a.addr, b.addr, "legacy")).unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_strangler"))
        .args(["run", "--log-format", "json", "--config"])
        .arg(&path)
        .env("RUST_LOG", "info")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(child.stderr.take().unwrap()).lines();
    let serving: serde_json::Value = loop {
        let line = lines.next().unwrap().unwrap();
        if line.contains("strangler is serving") {
            break serde_json::from_str(&line).unwrap();
        }
    };
    let admin = serving["fields"]["admin"].as_str().unwrap().to_string();
    let listen = serving["fields"]["listen"].as_str().unwrap().to_string();
    std::fs::write(&path, table("watch = \"off\"", a.addr, b.addr, "users")).unwrap();
    let kill = std::process::Command::new("kill")
        .args(["-HUP", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    // The reload logs what it changed, in `strangler diff` words.
    let changed = lines
        .by_ref()
        .map(|l| l.unwrap())
        .find(|l| l.contains("route table changed"))
        .unwrap();
    assert!(changed.contains("/: legacy -> cut over"), "{changed}");
    let (r, who) = rt.block_on(async {
        (
            get(&format!("http://{admin}/routes")).await.json(),
            get(&format!("http://{listen}/")).await.json(),
        )
    });
    assert_eq!(r["generation"], 2);
    assert_eq!(who["backend"], "users");
    // SIGTERM: drain and exit 0.
    std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(child.wait().unwrap().success());
}

//! strangler: a strangler-fig migration proxy.
//!
//! The life of a request, step by step (the README's map of the code lists every module):
//! 1. `server` accepts a connection under the connection cap, terminates TLS when configured
//!    (`tls`: certificates by SNI, client certificates), and serves HTTP/1.1 or HTTP/2 on it
//!    (ALPN, or the h2c preface).
//! 2. `proxy::handle` takes a request id and loads the active snapshot once
//!    (`state::Active`: route table, upstream clients by `BackendId`, each route's runtime
//!    by `RouteId`). A reload swapping in a new snapshot does not affect requests that
//!    already loaded one.
//! 3. Its phases, in order, over one per-request context (`proxy` lists them):
//!    - request: checks and the route lookup (`routes::RouteTable::lookup`), `auth`
//!      (`auth`, `jwt`), `rate_limit` (`limit`);
//!    - choose: who answers (`guard`, the canary in `routes`), the body limit;
//!    - copies: the shadow leg (`shadow`, compared on its own threads by `compare`), the
//!      stale-if-error plan (`stale`), the write event (`events`);
//!    - prepare: clean headers (`headers`), the backend's target and deadline;
//!    - send: the chosen backend with its retries (`upstream`), then the route's fallback;
//!    - answer: the body streams back (`upstream::body`) bounded by the backend's timeout,
//!      teed to the copies; an upgrade becomes a tunnel; a failure may be answered by the
//!      stored copy (`stale`);
//!    - finish: metrics (`metrics`, `traffic`), the request event, the access log
//!      (`access`).
//! 4. Anything that goes wrong is an `error::ProxyError`, answered as JSON by `respond`;
//!    repeated warnings are kept quiet (`quiet`).
//!
//! Around it: `config` (loading and validating routes.toml and the certificate files it
//! names), `reload` (load -> validate -> swap, keep last good; certificates too), `carry`
//! (per-route state across reloads), `admin` (probes, metrics, `/routes`, the board).
//!
//! **The public surface** is what `main`, the fuzz crate, the benchmarks and the tests use:
//! [`run`] and [`Server`] (start and stop a proxy), `config` (load and validate a table),
//! `routes` (the validated table), `reload`, `state` and `proxy` (a running proxy's state,
//! for tests), `compare` (the comparison engine, fuzzed), `headers` (header hygiene,
//! fuzzed), `cli` (`check`, `explain`, `diff`), `shadow`, `server` and `activity` (a
//! connection's watchdog and its request's hold on it), `auth`, `jwt` and
//! `metrics` (what the tests read back), and `demo` (with the `demo` feature). Everything
//! else is `pub(crate)`.

pub(crate) mod access;
pub mod activity;
pub(crate) mod admin;
pub mod auth;
pub(crate) mod carry;
pub mod cli;
pub mod compare;
pub mod config;
#[cfg(feature = "demo")]
pub mod demo;
pub(crate) mod error;
pub(crate) mod events;
pub(crate) mod guard;
pub mod headers;
pub mod jwt;
pub(crate) mod limit;
pub mod metrics;
pub mod proxy;
pub(crate) mod quiet;
pub mod reload;
pub(crate) mod respond;
pub mod routes;
pub mod server;
pub mod shadow;
pub(crate) mod stale;
pub mod state;
pub(crate) mod tls;
pub(crate) mod traffic;
pub(crate) mod units;
pub(crate) mod upstream;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tracing::info;

use crate::config::Loaded;
use crate::metrics::Metrics;
use crate::reload::Reloader;
use crate::server::{ListenerLimits, Shutdown};
use crate::state::State;

/// How often histogram samples are folded into their buckets.
const METRICS_UPKEEP: Duration = Duration::from_secs(5);

/// Why the proxy could not run.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// A proxy whose listeners are bound but not yet serving.
pub struct Server {
    state: Arc<State>,
    reloader: Arc<Reloader>,
    proxy: TcpListener,
    admin: TcpListener,
    /// The public listener's accept queue.
    backlog: u32,
}

impl Server {
    /// Binds the public and admin listeners of a validated configuration.
    pub async fn bind(loaded: Loaded) -> Result<Server, RunError> {
        let s = &loaded.parsed.server;
        let bind = |addr: SocketAddr| async move {
            TcpListener::bind(addr)
                .await
                .map_err(|source| RunError::Bind { addr, source })
        };
        let backlog = server::backlog(s.backlog);
        let proxy = server::listen(s.listen, backlog).map_err(|source| RunError::Bind {
            addr: s.listen,
            source,
        })?;
        let admin = bind(s.admin).await?;
        let state = State::new(&loaded, Metrics::new());
        state.clients.backlog.store(backlog, Ordering::Relaxed);
        let reloader = Reloader::new(state.clone());
        Ok(Server {
            state,
            reloader,
            proxy,
            admin,
            backlog,
        })
    }

    pub fn proxy_addr(&self) -> SocketAddr {
        self.proxy
            .local_addr()
            .unwrap_or(self.state.settings.listen)
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.admin.local_addr().unwrap_or(self.state.settings.admin)
    }

    pub fn state(&self) -> Arc<State> {
        self.state.clone()
    }

    /// Reloads of this proxy (what SIGHUP, `POST /reload` and the watcher call).
    pub fn reloader(&self) -> Arc<Reloader> {
        self.reloader.clone()
    }

    /// Serves until `shutdown` resolves, then drains and returns.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<(), RunError> {
        let (proxy_addr, admin_addr) = (self.proxy_addr(), self.admin_addr());
        let Server {
            state,
            reloader,
            proxy,
            admin,
            backlog,
        } = self;
        let (stop, stopped) = Shutdown::new();
        let (admin_stop, admin_stopped) = Shutdown::new();
        let admin_reloader = reloader.clone();
        let admin_task = tokio::spawn(server::serve(
            admin,
            (&ListenerLimits::ADMIN, Arc::default()),
            None,
            move |req, _peer, _watch| admin::handle(admin_reloader.clone(), req),
            admin_stopped,
            "admin",
        ));
        // The SIGHUP handler is in place before the proxy says it serves: a SIGHUP that came
        // earlier would otherwise take the default action and end the process.
        let background = tokio::spawn(background(reloader.clone(), stopped.clone(), sighup()));
        let watcher = tokio::spawn(reload::watch::run(
            reloader,
            state.settings.watch,
            stopped.clone(),
        ));
        if let Some(events) = state.events() {
            events.start();
        }
        let proxy_state = state.clone();
        let limits = ListenerLimits::from(&state.settings);
        let proxy_task = server::serve(
            proxy,
            (&limits, state.clients.clone()),
            state.tls.clone().map(|config| {
                let reason = |r: &'static str| {
                    state.metrics().counter(
                        metrics::TLS_HANDSHAKE_ERRORS_TOTAL,
                        vec![::metrics::Label::new("reason", r)],
                    )
                };
                server::Tls {
                    config,
                    failed: reason("failed"),
                    timed_out: reason("timeout"),
                }
            }),
            move |req, peer, watch| proxy::handle(proxy_state.clone(), req, peer, watch),
            stopped,
            "proxy",
        );
        state.ready.store(true, Ordering::Release);
        info!(listen = %proxy_addr, backlog, admin = %admin_addr, generation = state.active().generation, "strangler is serving");
        let shutdown_then_unready = async {
            shutdown.await;
            state.ready.store(false, Ordering::Release);
            info!("shutting down: not ready, no new connections, draining");
            let _ = stop.send(true);
        };
        tokio::join!(proxy_task, shutdown_then_unready);
        // Connections are drained; what they produced goes to the broker, bounded.
        if let Some(events) = state.events() {
            events.flush(state.settings.drain_timeout).await;
        }
        let _ = admin_stop.send(true);
        let _ = admin_task.await;
        background.abort();
        watcher.abort();
        info!("stopped");
        Ok(())
    }
}

/// Periodic and signal-driven work: metrics upkeep and SIGHUP reloads.
#[cfg(unix)]
type Hangup = Option<tokio::signal::unix::Signal>;
#[cfg(not(unix))]
type Hangup = ();

/// Registers the SIGHUP handler (Unix); failure to register is logged and reload stays
/// available through `POST /reload` and the watcher.
fn sighup() -> Hangup {
    #[cfg(unix)]
    {
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
            .inspect_err(|error| tracing::warn!(%error, "cannot handle SIGHUP"))
            .ok()
    }
}

async fn background(reloader: Arc<Reloader>, mut shutdown: Shutdown, hangup: Hangup) {
    let mut upkeep = tokio::time::interval(METRICS_UPKEEP);
    #[cfg(unix)]
    let mut hup = hangup;
    #[cfg(not(unix))]
    let () = hangup;
    loop {
        #[cfg(unix)]
        let sighup = async {
            match hup.as_mut() {
                Some(s) => s.recv().await,
                None => std::future::pending().await,
            }
        };
        #[cfg(not(unix))]
        let sighup = std::future::pending::<Option<()>>();
        tokio::select! {
            _ = shutdown.started() => return,
            _ = upkeep.tick() => reloader.state.metrics().upkeep(),
            Some(()) = sighup => {
                let outcome = reload::reload_async(reloader.clone()).await;
                info!(ok = outcome.ok, generation = outcome.generation, "SIGHUP reload");
            }
        }
    }
}

/// Binds and serves `loaded` until `shutdown` resolves.
pub async fn run(loaded: Loaded, shutdown: impl Future<Output = ()>) -> Result<(), RunError> {
    Server::bind(loaded).await?.run(shutdown).await
}

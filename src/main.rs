//! The `strangler` command: parse the command line, set up logging, build the runtime and
//! hand over to the library (`strangler::run`, `cli`, `demo`).

use std::io::IsTerminal;
use std::net::IpAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use http::{HeaderMap, HeaderName, HeaderValue, Method};
use strangler::config::{self, Loaded};

/// mimalloc: the request path allocates many small short-lived buffers; measured faster
/// than the system allocator in bench/ (see bench/RESULTS.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// A strangler-fig migration proxy: move endpoints from a legacy monolith to new services
/// one route at a time, by editing routes.toml.
#[derive(Parser)]
#[command(version, propagate_version = true)]
struct Cli {
    /// Log format; default: text on a terminal, json otherwise. Filter with RUST_LOG.
    #[arg(long, global = true, value_enum)]
    log_format: Option<LogFormat>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(clap::Args)]
struct ConfigArg {
    /// The route table.
    #[arg(long, env = "STRANGLER_CONFIG", default_value = "routes.toml")]
    config: PathBuf,
}

#[derive(Subcommand)]
enum Command {
    /// Serve (the default).
    Run(ConfigArg),
    /// Validate routes.toml and print its routes and their stages.
    Check(ConfigArg),
    /// Show what the proxy would do with a request.
    Explain {
        #[command(flatten)]
        config: ConfigArg,
        /// Request method, e.g. GET.
        method: String,
        /// Request path with optional query, e.g. /api/users/7.
        path: String,
        /// A request header, 'Name: value' (repeatable).
        #[arg(short = 'H', long = "header")]
        headers: Vec<String>,
        /// Client address, for canaries sticky by ip.
        #[arg(long, default_value = "127.0.0.1")]
        client_ip: IpAddr,
    },
    /// Print what changing OLD into NEW does to each route.
    Diff { old: PathBuf, new: PathBuf },
    /// Run the FitTrack demo: legacy-stub, users-service and the proxy on routes.toml.
    #[cfg(feature = "demo")]
    Demo {
        #[command(flatten)]
        config: ConfigArg,
        /// Start users-service with a deliberate bug, so the shadow comparison finds it.
        #[arg(long, value_enum)]
        users_bug: Option<users_service::Bug>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    let command = cli.command.unwrap_or(Command::Run(ConfigArg {
        config: std::env::var_os("STRANGLER_CONFIG").map_or("routes.toml".into(), PathBuf::from),
    }));
    match command {
        Command::Run(c) => serve(&c.config, None),
        #[cfg(feature = "demo")]
        Command::Demo { config, users_bug } => serve(&config.config, Some(users_bug)),
        Command::Check(c) => check(&c.config),
        Command::Explain {
            config,
            method,
            path,
            headers,
            client_ip,
        } => explain(&config.config, &method, &path, &headers, client_ip),
        Command::Diff { old, new } => diff(&old, &new),
    }
}

fn init_logging(format: Option<LogFormat>) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let json = match format {
        Some(LogFormat::Json) => true,
        Some(LogFormat::Text) => false,
        None => !std::io::stderr().is_terminal(),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

/// Loads a config or prints every error; `None` means exit 1.
fn load(path: &std::path::Path) -> Option<Loaded> {
    match config::load(path) {
        Ok(loaded) => Some(loaded),
        Err(e) => {
            for line in e.lines() {
                eprintln!("{line}");
            }
            None
        }
    }
}

/// The demo's setting: users-service's deliberate bug, if any. A build without the `demo`
/// feature has no demo: no value of this type exists there.
#[cfg(feature = "demo")]
type Demo = Option<users_service::Bug>;
#[cfg(not(feature = "demo"))]
type Demo = std::convert::Infallible;

/// Serves `path`; `demo` is `Some(users-service bug)` for the demo.
fn serve(path: &std::path::Path, demo: Option<Demo>) -> ExitCode {
    no_huge_pages();
    let Some(loaded) = load(path) else {
        return ExitCode::FAILURE;
    };
    for w in strangler::cli::warnings(&loaded) {
        eprintln!("{w}");
    }
    // One worker: a current-thread runtime, as nginx's one worker process (no hand-offs
    // between a scheduler thread and the thread running the listeners).
    let workers = loaded.parsed.server.workers;
    let mut builder = if workers == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(workers);
        b
    };
    let runtime = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        if let Some(bug) = demo {
            demo_run(loaded, bug).await
        } else {
            strangler::run(loaded, shutdown_signal())
                .await
                .map_err(|e| e.to_string())
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("strangler: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(feature = "demo")]
async fn demo_run(loaded: strangler::config::Loaded, bug: Demo) -> Result<(), String> {
    strangler::demo::run(loaded, bug, shutdown_signal())
        .await
        .map_err(|e| e.to_string())
}

#[cfg(not(feature = "demo"))]
async fn demo_run(_: strangler::config::Loaded, bug: Demo) -> Result<(), String> {
    match bug {}
}

/// Transparent huge pages off for this process (Linux), unless `MIMALLOC_ALLOW_THP` is set.
/// mimalloc asks the kernel for huge pages on its heap; with them every 2 MiB of heap touched
/// is resident whole, so the never-written part of each idle connection's buffers is counted
/// too (bench/idle.sh: with huge pages, an idle keep-alive connection costs about 6 KiB more).
/// `MIMALLOC_ALLOW_THP=1` keeps them; `=0` has mimalloc do this itself.
fn no_huge_pages() {
    #[cfg(target_os = "linux")]
    if std::env::var_os("MIMALLOC_ALLOW_THP").is_none() {
        // Only memory at stake: a kernel without the knob keeps its default.
        let _ = rustix::thread::disable_transparent_huge_pages(true);
    }
}

/// Resolves on SIGTERM or SIGINT (Ctrl-C).
async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

fn check(path: &std::path::Path) -> ExitCode {
    let Some(loaded) = load(path) else {
        return ExitCode::FAILURE;
    };
    print!("{}", strangler::cli::check_report(&loaded));
    for w in strangler::cli::warnings(&loaded) {
        eprintln!("{w}");
    }
    ExitCode::SUCCESS
}

fn explain(
    path: &std::path::Path,
    method: &str,
    target: &str,
    raw_headers: &[String],
    client: IpAddr,
) -> ExitCode {
    let Some(loaded) = load(path) else {
        return ExitCode::FAILURE;
    };
    let Ok(method) = Method::from_bytes(method.as_bytes()) else {
        eprintln!("strangler explain: {method:?} is not an HTTP method");
        return ExitCode::from(2);
    };
    let mut headers = HeaderMap::new();
    for h in raw_headers {
        let parsed = h.split_once(':').and_then(|(n, v)| {
            Some((
                HeaderName::from_bytes(n.trim().as_bytes()).ok()?,
                HeaderValue::from_str(v.trim()).ok()?,
            ))
        });
        match parsed {
            Some((n, v)) => {
                headers.append(n, v);
            }
            None => {
                eprintln!("strangler explain: -H {h:?} is not 'Name: value'");
                return ExitCode::from(2);
            }
        }
    }
    match strangler::cli::explain(&loaded, &method, target, &headers, client) {
        Ok(text) => {
            print!("{text}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("strangler explain: {e}");
            ExitCode::from(2)
        }
    }
}

fn diff(old: &std::path::Path, new: &std::path::Path) -> ExitCode {
    let (Some(old), Some(new)) = (load(old), load(new)) else {
        return ExitCode::FAILURE;
    };
    print!("{}", strangler::cli::diff_report(&old, &new));
    ExitCode::SUCCESS
}

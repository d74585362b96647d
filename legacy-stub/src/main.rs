//! `legacy-stub --listen ADDR [--latency 50ms] [--error-rate 0.1] [--fail-path /api/workouts]`

use std::net::SocketAddr;

use clap::Parser;
use legacy_stub::Options;

/// The FitTrack monolith stand-in: users, workouts, social feed.
#[derive(Parser)]
#[command(version)]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:3000")]
    listen: SocketAddr,
    /// Latency added to every answer, e.g. 50ms.
    #[arg(long, value_parser = humantime::parse_duration)]
    latency: Option<std::time::Duration>,
    /// Share of requests answered 500, between 0 and 1.
    #[arg(long, default_value_t = 0.0, value_parser = rate)]
    error_rate: f64,
    /// Path prefix always answered 500 (repeatable).
    #[arg(long = "fail-path")]
    fail_paths: Vec<String>,
}

fn rate(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(r) if (0.0..=1.0).contains(&r) => Ok(r),
        _ => Err(format!("{s:?} is not a rate between 0 and 1")),
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .init();
    let args = Args::parse();
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", args.listen))?;
    eprintln!(
        "legacy-stub (FitTrack monolith) listening on http://{}",
        listener.local_addr()?
    );
    let opts = Options {
        latency: args.latency,
        error_rate: args.error_rate,
        fail_paths: args.fail_paths,
    };
    legacy_stub::serve(listener, opts, async {
        let _ = tokio::signal::ctrl_c().await;
    })
    .await;
    Ok(())
}

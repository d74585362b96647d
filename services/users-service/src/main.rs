//! `users-service --listen ADDR [--bug email-case]`

use std::net::SocketAddr;

use clap::Parser;
use users_service::Bug;

/// The users endpoints of FitTrack, extracted from the monolith.
#[derive(Parser)]
#[command(version)]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:3001")]
    listen: SocketAddr,
    /// Answer one field differently from the monolith, for shadow comparison demos.
    #[arg(long, value_enum)]
    bug: Option<Bug>,
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
        "users-service listening on http://{}",
        listener.local_addr()?
    );
    users_service::serve(listener, args.bug, async {
        let _ = tokio::signal::ctrl_c().await;
    })
    .await;
    Ok(())
}

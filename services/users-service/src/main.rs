//! `users-service --listen ADDR [--bug email-case] [--events-url-env VAR [--events-exchange
//! NAME] [--events-queue NAME]]`

use std::net::SocketAddr;

use clap::Parser;
use users_service::events::{DEFAULT_EXCHANGE, DEFAULT_QUEUE};
use users_service::{Bug, EventsSource};

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
    /// Apply the proxy's write events for /api/users from RabbitMQ: the name of the
    /// environment variable holding the broker's amqp:// URL (never the URL itself, which
    /// carries a password). Unset or empty variable: no consumer.
    #[arg(long, value_name = "VAR")]
    events_url_env: Option<String>,
    /// The exchange the proxy publishes its events on.
    #[arg(long, value_name = "NAME", default_value = DEFAULT_EXCHANGE)]
    events_exchange: String,
    /// The durable queue users-service consumes write events from.
    #[arg(long, value_name = "NAME", default_value = DEFAULT_QUEUE)]
    events_queue: String,
}

/// The events source the flags name, `None` when the consumer is off (said in one info line).
fn events_source(args: &Args) -> anyhow::Result<Option<EventsSource>> {
    let Some(var) = &args.events_url_env else {
        tracing::info!("events consumer off: no --events-url-env");
        return Ok(None);
    };
    let url = match std::env::var(var) {
        Ok(url) if !url.trim().is_empty() => url,
        Ok(_) | Err(std::env::VarError::NotPresent) => {
            tracing::info!("events consumer off: ${var} is not set");
            return Ok(None);
        }
        Err(std::env::VarError::NotUnicode(_)) => {
            anyhow::bail!("${var} (--events-url-env) is not valid UTF-8")
        }
    };
    let source = EventsSource::new(url.trim())
        .map_err(|e| anyhow::anyhow!("${var} (--events-url-env): {e}"))?
        .with_exchange(&args.events_exchange)
        .with_queue(&args.events_queue);
    Ok(Some(source))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt().with_env_filter(filter).init();
    let args = Args::parse();
    let events = events_source(&args)?;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", args.listen))?;
    eprintln!(
        "users-service listening on http://{}",
        listener.local_addr()?
    );
    users_service::serve_with_events(listener, args.bug, events, async {
        let _ = tokio::signal::ctrl_c().await;
    })
    .await;
    Ok(())
}

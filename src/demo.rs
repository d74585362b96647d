//! `strangler demo`: the FitTrack migration on one machine. Starts legacy-stub and
//! users-service on the addresses routes.toml gives the `legacy` and `users` backends, then
//! the proxy on the same file, and stops all three on Ctrl-C.

use std::future::Future;
use std::net::SocketAddr;

use tokio::net::TcpListener;

use crate::config::Loaded;
use crate::routes::{KeySource, Provider};
use crate::RunError;

/// The demo identity provider's signing key (Ed25519, PKCS#8), matching demo/jwks.json. It
/// signs demo tokens only: anything it signs is trusted by no one but a route table that
/// names demo/jwks.json.
const DEMO_SIGNING_KEY: &str = "MC4CAQAwBQYDK2VwBCIEIJZfOjsbWGI2N6iSTusgEylAtRW68jzgPeppITEs5/Vv";
/// The `kid` of the demo key in demo/jwks.json.
pub const DEMO_KEY_ID: &str = "fittrack-demo-2026";

/// A token for `sub` from the demo identity provider, valid for `ttl`, for `provider`'s
/// issuer and first audience; `None` when the provider does not trust the demo key.
pub fn demo_token(provider: &Provider, sub: &str, ttl: std::time::Duration) -> Option<String> {
    use base64::Engine as _;
    use jsonwebtoken::{Algorithm, EncodingKey, Header};
    let KeySource::Loaded { keys, .. } = &provider.keys else {
        return None;
    };
    if !keys.has(DEMO_KEY_ID) {
        return None;
    }
    let der = base64::engine::general_purpose::STANDARD
        .decode(DEMO_SIGNING_KEY)
        .ok()?;
    let mut header = Header::new(Algorithm::EdDSA);
    header.kid = Some(DEMO_KEY_ID.to_string());
    let now = crate::jwt::now();
    let claims = serde_json::json!({
        "iss": provider.rules.issuer,
        "aud": provider.rules.audiences.first()?,
        "sub": sub,
        "scope": "social:read social:write",
        "iat": now,
        "exp": now + ttl.as_secs(),
    });
    jsonwebtoken::encode(&header, &claims, &EncodingKey::from_ed_der(&der)).ok()
}

/// Why the demo could not start.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("routes.toml has no backend named {0:?}; the demo starts `legacy` and `users`")]
    MissingBackend(&'static str),
    #[error(
        "backend {name:?} must have an IP:PORT address for the demo to listen on, not {authority}"
    )]
    NotAnAddress {
        name: &'static str,
        authority: String,
    },
    #[error("cannot listen on {addr} for {name}: {source} (is another demo still running?)")]
    Bind {
        name: &'static str,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Proxy(#[from] RunError),
}

async fn listen_for(loaded: &Loaded, name: &'static str) -> Result<TcpListener, DemoError> {
    let t = &loaded.parsed.table;
    let b = t
        .backend_id(name)
        .map(|id| t.backend(id))
        .ok_or(DemoError::MissingBackend(name))?;
    let addr: SocketAddr = b
        .authority
        .as_str()
        .parse()
        .map_err(|_| DemoError::NotAnAddress {
            name,
            authority: b.authority.to_string(),
        })?;
    TcpListener::bind(addr)
        .await
        .map_err(|source| DemoError::Bind { name, addr, source })
}

/// The broker users-service consumes write events from: the one `[events]` publishes to,
/// when its URL is set.
fn loaded_events(
    events: &Option<crate::config::EventsSettings>,
) -> Option<users_service::EventsSource> {
    let e = events.as_ref()?;
    e.url.as_ref()?;
    let raw = std::env::var(&e.url_env).ok()?;
    match users_service::EventsSource::new(&raw) {
        Ok(source) => Some(source.with_exchange(&e.exchange)),
        Err(error) => {
            tracing::warn!(%error, "users-service cannot read the events broker URL; its consumer is off");
            None
        }
    }
}

/// Runs the three demo processes' servers in this process until `shutdown` resolves.
pub async fn run(
    loaded: Loaded,
    users_bug: Option<users_service::Bug>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), DemoError> {
    let legacy = listen_for(&loaded, "legacy").await?;
    let users = listen_for(&loaded, "users").await?;
    let (legacy_addr, users_addr) = (legacy.local_addr().ok(), users.local_addr().ok());
    let loaded_table = loaded.parsed.table.clone();
    let loaded_server_events = loaded.parsed.server.events.clone();
    let server = crate::Server::bind(loaded).await?;
    let (proxy, admin) = (server.proxy_addr(), server.admin_addr());
    let (tx, rx) = tokio::sync::watch::channel(false);
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|&s| s).await;
    };
    let legacy_task = tokio::spawn(legacy_stub::serve(
        legacy,
        Default::default(),
        stopped(rx.clone()),
    ));
    // With a broker, users-service applies the monolith's writes from `write.api.users`
    // events, so shadowed reads of users created through the proxy match.
    let events = loaded_events(&loaded_server_events);
    let events_line = match (&loaded_server_events, &events) {
        (Some(_), Some(source)) => format!(
            "  events         {} exchange {}: users-service applies write.api.users from queue {}",
            source.endpoint(),
            source.exchange(),
            source.queue()
        ),
        (Some(e), None) => format!(
            "  events         off: set {}=amqp://guest:guest@127.0.0.1:5672/%2f with RabbitMQ running (README: events)",
            e.url_env
        ),
        (None, _) => String::new(),
    };
    let users_task = tokio::spawn(users_service::serve_with_events(
        users,
        users_bug,
        events,
        stopped(rx.clone()),
    ));
    println!("FitTrack demo: strangler in front of the legacy monolith and the extracted users service\n");
    println!("  proxy          http://{proxy}");
    println!(
        "  legacy-stub    http://{}",
        legacy_addr.map_or("?".into(), |a| a.to_string())
    );
    println!(
        "  users-service  http://{}",
        users_addr.map_or("?".into(), |a| a.to_string())
    );
    println!("  dashboard      http://{admin}/   (the migration board)");
    if !events_line.is_empty() {
        println!("{events_line}");
    }
    println!(
        "  admin          http://{admin}/routes   http://{admin}/diffs   http://{admin}/metrics\n"
    );
    println!("Try:");
    println!("  curl -s http://{proxy}/api/users/7");
    println!("  curl -s http://{proxy}/api/workouts?user_id=7");
    let t = &loaded_table;
    let token = t
        .providers()
        .iter()
        .find_map(|p| demo_token(p, "7", std::time::Duration::from_secs(24 * 3600)));
    match (token, t.routes().iter().find(|r| r.auth.is_some())) {
        (Some(token), Some(r)) => {
            let path = if r.prefix == "/api/social" {
                "/api/social/feed".to_string()
            } else {
                r.prefix.clone()
            };
            println!("  curl -si http://{proxy}{path}   # 401: this route requires a token");
            println!("  curl -s http://{proxy}{path} -H 'Authorization: Bearer {token}'");
            println!(
                "           # a demo token for user 7, valid 24 h; the backend sees x-user-id: 7"
            );
        }
        _ => println!("  curl -s http://{proxy}/api/social/feed"),
    }
    println!("  curl -s -X POST http://{proxy}/api/users -H 'content-type: application/json' -d '{{\"name\":\"Rosalind Franklin\",\"email\":\"rosalind@fittrack.example\"}}'");
    println!("  curl -s http://{admin}/routes   # stages, shadow comparisons, readiness");
    println!("  curl -s http://{admin}/diffs    # recent shadow mismatches (start the demo with --users-bug email-case to see one)");
    println!("Edit routes.toml and `curl -X POST http://{admin}/reload` to move a route. Ctrl-C stops all three.\n");
    let result = server
        .run(async {
            shutdown.await;
            let _ = tx.send(true);
        })
        .await;
    let _ = tokio::join!(legacy_task, users_task);
    result.map_err(DemoError::from)
}

//! Start and stop: graceful drain, readiness, bad config at start, WebSocket pass-through.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a panic is a failure report

mod support;

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use support::*;

#[tokio::test]
async fn shutdown_drains_in_flight_requests_and_turns_unready() {
    let echo = start_echo("legacy").await;
    let mut proxy = proxy_to(echo.addr).await;
    let in_flight = tokio::spawn({
        let url = proxy.url("/slow/500");
        async move { get(&url).await }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let done = proxy.shutdown();
    let admin = proxy.admin_url("/readyz");
    eventually(Duration::from_secs(2), || async {
        (get(&admin).await.status == 503).then_some(())
    })
    .await;
    // No new connections once draining.
    eventually(Duration::from_secs(2), || async {
        tokio::net::TcpStream::connect(proxy.addr)
            .await
            .is_err()
            .then_some(())
    })
    .await;
    let r = in_flight.await.unwrap();
    assert_eq!(r.status, 200, "the in-flight request finished");
    assert_eq!(r.json()["path"], "/slow/500");
    tokio::time::timeout(Duration::from_secs(5), done)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn drain_is_bounded_by_drain_timeout() {
    let hang = start_raw(Misbehave::Hang).await;
    let mut proxy = proxy_to_with(hang.addr, "", "drain_timeout = \"300ms\"").await;
    let url = proxy.url("/");
    let _stuck = tokio::spawn(async move {
        client()
            .request(http::Request::get(url).body(Default::default()).unwrap())
            .await
            .map(|r| r.status())
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let started = std::time::Instant::now();
    tokio::time::timeout(Duration::from_secs(5), proxy.shutdown())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "drain waited {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn websocket_upgrades_pass_through() {
    let ws_backend = start_ws_echo().await;
    let proxy = proxy_to(ws_backend).await;
    let (mut ws, resp) = tokio_tungstenite::connect_async(format!("ws://{}/ws", proxy.addr))
        .await
        .unwrap();
    assert_eq!(resp.status(), 101);
    assert_eq!(resp.headers()["via"], "1.1 strangler");
    for msg in ["hello", "from", "fittrack"] {
        ws.send(tokio_tungstenite::tungstenite::Message::text(msg))
            .await
            .unwrap();
        let back = ws.next().await.unwrap().unwrap();
        assert_eq!(back.into_text().unwrap().as_str(), msg);
    }
    ws.close(None).await.unwrap();
}

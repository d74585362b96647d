//! users-service applying the proxy's write events from RabbitMQ, end to end: a private
//! `rabbitmq-server` node per test (tests/support/rabbitmq.rs), users-service with its
//! consumer on 127.0.0.1:0, events published by hand with amqprs exactly as the proxy
//! publishes them (CloudEvents 1.0 structured mode on the durable topic exchange `strangler`,
//! routing key `write.api.users`). What is checked: a POST event creates the user and a
//! DELETE event removes it; garbage and events the consumer cannot apply are acknowledged
//! and skipped without stopping it; the consumer comes back after the broker restarts; and
//! the broker helper itself (bindings, delivery properties, stop/start, the memory alarm).
//!
//! Every test needs Debian's `rabbitmq-server`, so they are `#[ignore]`d:
//! `cargo test --test events_consumer -- --ignored`.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a panic is a failure report

mod support;

use std::time::Duration;

use support::rabbitmq::{available, Broker};

const CLOUDEVENTS: &str = "application/cloudevents+json";

fn need_broker() {
    assert!(
        available(),
        "these tests need Debian's rabbitmq-server in {} (apt-get install rabbitmq-server)",
        support::rabbitmq::BIN
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs rabbitmq-server (Debian's package)"]
async fn broker_helper_binds_delivers_restarts_and_blocks() {
    need_broker();
    let mut broker = Broker::start().await;
    let mut all = broker.bind("strangler", "write.#").await;
    let mut users = broker.bind("strangler", "write.api.users").await;
    broker
        .publish("strangler", "write.api.users", CLOUDEVENTS, b"{\"a\":1}")
        .await;
    broker
        .publish("strangler", "write.api.feed", CLOUDEVENTS, b"{\"b\":2}")
        .await;
    broker
        .publish("strangler", "read.api.users", CLOUDEVENTS, b"{}")
        .await;
    let got = all.drain(Duration::from_millis(500)).await;
    let keys: Vec<&str> = got.iter().map(|d| d.0.as_str()).collect();
    assert_eq!(keys, ["write.api.users", "write.api.feed"], "{got:?}");
    assert_eq!(got[0].1, b"{\"a\":1}");
    assert_eq!(got[0].2.as_deref(), Some(CLOUDEVENTS));
    assert_eq!(got[0].3, Some(2), "persistent");
    let only = users.drain(Duration::from_millis(300)).await;
    assert_eq!(only.len(), 1, "{only:?}");
    assert_eq!(only[0].0, "write.api.users");

    // A durable queue and a persistent message survive stop + start_again on the same port.
    let conn = broker.connect().await;
    let ch = conn.open_channel(None).await.unwrap();
    ch.queue_declare(amqprs::channel::QueueDeclareArguments::durable_client_named("kept"))
        .await
        .unwrap();
    ch.queue_bind(amqprs::channel::QueueBindArguments::new(
        "kept",
        "strangler",
        "write.#",
    ))
    .await
    .unwrap();
    drop(conn);
    broker
        .publish("strangler", "write.api.users", CLOUDEVENTS, b"kept")
        .await;
    let port = broker.port();
    broker.stop().await;
    assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_err());
    broker.start_again().await;
    assert_eq!(broker.port(), port);
    assert_eq!(broker.queue_counts("kept").await, Some((1, 0)));
    assert_eq!(broker.queue_counts("no-such-queue").await, None);

    // The memory alarm: a publish in a transaction does not complete until it is cleared.
    broker.block().await;
    let conn = broker.connect().await;
    let ch = conn.open_channel(None).await.unwrap();
    ch.tx_select().await.unwrap();
    ch.basic_publish(
        amqprs::BasicProperties::default(),
        b"while blocked".to_vec(),
        amqprs::channel::BasicPublishArguments::new("strangler", "write.api.users"),
    )
    .await
    .unwrap();
    let commit = tokio::spawn(async move {
        let r = ch.tx_commit().await;
        (r.is_ok(), ch, conn)
    });
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        !commit.is_finished(),
        "a publish went through while blocked"
    );
    broker.unblock().await;
    let (ok, _ch, _conn) = tokio::time::timeout(Duration::from_secs(10), commit)
        .await
        .expect("the publish stayed blocked after unblock")
        .unwrap();
    assert!(ok);
    assert_eq!(broker.queue_counts("kept").await, Some((2, 0)));

    // Dropping the broker leaves no process of it behind.
    let mark = format!("{}:{}", std::process::id(), broker.node());
    drop(broker);
    let left = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "grep -l -a 'STRANGLER_TEST_BROKER={mark}' /proc/[0-9]*/environ 2>/dev/null || true"
        ))
        .output()
        .unwrap();
    let left = String::from_utf8_lossy(&left.stdout);
    assert!(
        left.trim().is_empty(),
        "processes of the broker left: {left}"
    );
}

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

use http::StatusCode;
use serde_json::{json, Value};
use support::rabbitmq::{need_broker, start_users_with_events, Broker};
use support::*;

const CLOUDEVENTS: &str = "application/cloudevents+json";
const EXCHANGE: &str = "strangler";
const QUEUE: &str = "users-service.writes";
const KEY: &str = "write.api.users";

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

/// A write event as the proxy publishes it for `METHOD PATH` answered `status`, with the
/// captured response body when `response` is `Some`.
fn write_event(method: &str, path: &str, status: u16, response: Option<Value>) -> Vec<u8> {
    let mut data = json!({
        "request_id": format!("{:016x}", fastrand::u64(..)),
        "route": "/api/users",
        "method": method,
        "path": path,
        "backend": "legacy",
        "status": status,
    });
    if let Some(body) = response {
        data["response"] = json!({"content_type": "application/json", "body": body});
    }
    serde_json::to_vec(&json!({
        "specversion": "1.0",
        "type": "dev.strangler.write",
        "source": "strangler",
        "id": format!("{:032x}", fastrand::u128(..)),
        "time": "2026-11-27T15:00:00.123Z",
        "subject": path,
        "datacontenttype": "application/json",
        "data": data,
    }))
    .unwrap()
}

fn user(id: u64, name: &str, email: &str) -> Value {
    json!({"id": id, "name": name, "email": email, "plan": "free", "joined": "2026-11-22"})
}

/// Waits until the consumer is subscribed to its queue (so a publish now reaches it).
async fn subscribed(broker: &Broker) {
    eventually(Duration::from_secs(15), || async {
        matches!(broker.queue_counts(QUEUE).await, Some((_, 1))).then_some(())
    })
    .await;
}

/// A broker of the test's own and users-service consuming from it, subscribed.
async fn broker_and_users() -> (Broker, Running) {
    need_broker();
    let broker = Broker::start().await;
    let users = start_users_with_events(&broker).await;
    subscribed(&broker).await;
    (broker, users)
}

/// `GET /api/users/ID` on users-service until it answers `want`; the last answer.
async fn user_until(users: &Running, id: u64, want: StatusCode, within: Duration) -> Reply {
    let url = format!("http://{}/api/users/{id}", users.addr);
    let until = tokio::time::Instant::now() + within;
    loop {
        let reply = get(&url).await;
        if reply.status == want {
            return reply;
        }
        assert!(
            tokio::time::Instant::now() < until,
            "GET /api/users/{id} still answers {} ({}) after {within:?}, not {want}",
            reply.status,
            reply.text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `(ready, unacknowledged)` messages of the consumer's queue, from `rabbitmqctl`.
async fn queue_depth(broker: &Broker) -> (u64, u64) {
    let out = broker
        .ctl_ok(&[
            "list_queues",
            "-q",
            "--no-table-headers",
            "name",
            "messages_ready",
            "messages_unacknowledged",
        ])
        .await;
    let line = out
        .lines()
        .find(|l| l.split_whitespace().next() == Some(QUEUE))
        .unwrap_or_else(|| panic!("no queue {QUEUE} in:\n{out}"));
    let n: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|v| v.parse().unwrap())
        .collect();
    (n[0], n[1])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs rabbitmq-server (Debian's package)"]
async fn a_post_event_creates_the_user_and_a_delete_event_removes_it() {
    let (broker, users) = broker_and_users().await;
    user_until(&users, 4242, StatusCode::NOT_FOUND, Duration::ZERO).await;

    let ada = user(4242, "Ada", "Ada@X.example");
    broker
        .publish(
            EXCHANGE,
            KEY,
            CLOUDEVENTS,
            &write_event("POST", "/api/users", 201, Some(json!({ "user": ada }))),
        )
        .await;
    let got = user_until(&users, 4242, StatusCode::OK, Duration::from_secs(5)).await;
    assert_eq!(
        got.json()["user"],
        ada,
        "the user as the monolith answered it"
    );

    // A new user created on users-service itself gets an id past the applied one.
    let created = send_with(
        http::Method::POST,
        &format!("http://{}/api/users", users.addr),
        &[("content-type", "application/json")],
        r#"{"name":"Grace","email":"grace@x.example"}"#,
    )
    .await;
    assert_eq!(created.status, StatusCode::CREATED, "{}", created.text());
    assert_eq!(created.json()["user"]["id"], 4243);

    broker
        .publish(
            EXCHANGE,
            KEY,
            CLOUDEVENTS,
            &write_event("DELETE", "/api/users/4242", 204, None),
        )
        .await;
    user_until(&users, 4242, StatusCode::NOT_FOUND, Duration::from_secs(5)).await;
    user_until(&users, 4243, StatusCode::OK, Duration::ZERO).await;
    eventually(Duration::from_secs(5), || async {
        (queue_depth(&broker).await == (0, 0)).then_some(())
    })
    .await;

    // Shutdown stops the consumer too: the queue loses its consumer, keeps its binding.
    drop(users);
    eventually(Duration::from_secs(5), || async {
        (broker.queue_counts(QUEUE).await == Some((0, 0))).then_some(())
    })
    .await;
    broker
        .publish(
            EXCHANGE,
            KEY,
            CLOUDEVENTS,
            &write_event("DELETE", "/api/users/1", 204, None),
        )
        .await;
    assert_eq!(broker.queue_counts(QUEUE).await, Some((1, 0)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs rabbitmq-server (Debian's package)"]
async fn events_it_cannot_apply_are_acked_and_skipped() {
    let (broker, users) = broker_and_users().await;

    broker
        .publish(EXCHANGE, KEY, "text/plain", b"this is not JSON")
        .await;
    // A POST event of a route without a body cap: nothing to build the user from.
    broker
        .publish(
            EXCHANGE,
            KEY,
            CLOUDEVENTS,
            &write_event("POST", "/api/users", 201, None),
        )
        .await;
    // A body that was not JSON, one over the cap, and a failed write.
    let mut text =
        serde_json::from_slice::<Value>(&write_event("POST", "/api/users", 201, None)).unwrap();
    text["data"]["response"] = json!({"content_type": "text/plain", "text": "created"});
    broker
        .publish(
            EXCHANGE,
            KEY,
            CLOUDEVENTS,
            &serde_json::to_vec(&text).unwrap(),
        )
        .await;
    text["data"]["response"] = json!({"omitted": "over the events body cap"});
    broker
        .publish(
            EXCHANGE,
            KEY,
            CLOUDEVENTS,
            &serde_json::to_vec(&text).unwrap(),
        )
        .await;
    broker
        .publish(
            EXCHANGE,
            KEY,
            CLOUDEVENTS,
            &write_event(
                "PUT",
                "/api/users/4343",
                500,
                Some(json!({ "user": user(4343, "Broken", "b@x") })),
            ),
        )
        .await;
    // Then a good one: applied, so the consumer went past all of the above.
    let linus = user(4344, "Linus", "linus@x.example");
    broker
        .publish(
            EXCHANGE,
            KEY,
            CLOUDEVENTS,
            &write_event(
                "PUT",
                "/api/users/4344",
                200,
                Some(json!({ "user": linus })),
            ),
        )
        .await;
    let got = user_until(&users, 4344, StatusCode::OK, Duration::from_secs(5)).await;
    assert_eq!(got.json()["user"], linus);
    user_until(&users, 4343, StatusCode::NOT_FOUND, Duration::ZERO).await;
    let listed = get(&format!("http://{}/api/users", users.addr))
        .await
        .json();
    assert_eq!(
        listed["total"], 21,
        "the 20 seeded users and 4344: {listed}"
    );

    // Every message was acknowledged, none requeued, and the consumer is still the first one.
    eventually(Duration::from_secs(5), || async {
        (queue_depth(&broker).await == (0, 0)).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(queue_depth(&broker).await, (0, 0));
    assert_eq!(broker.queue_counts(QUEUE).await, Some((0, 1)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs rabbitmq-server (Debian's package)"]
async fn the_consumer_reconnects_after_the_broker_restarts() {
    let (mut broker, users) = broker_and_users().await;
    let before = user(4545, "Before", "before@x.example");
    broker
        .publish(
            EXCHANGE,
            KEY,
            CLOUDEVENTS,
            &write_event("POST", "/api/users", 201, Some(json!({ "user": before }))),
        )
        .await;
    user_until(&users, 4545, StatusCode::OK, Duration::from_secs(5)).await;

    broker.stop().await;
    // The HTTP side keeps answering while the broker is away.
    user_until(&users, 4545, StatusCode::OK, Duration::ZERO).await;
    tokio::time::sleep(Duration::from_secs(2)).await; // a few failed attempts
    broker.start_again().await;

    let after = user(4546, "After", "after@x.example");
    broker
        .publish(
            EXCHANGE,
            KEY,
            CLOUDEVENTS,
            &write_event("POST", "/api/users", 201, Some(json!({ "user": after }))),
        )
        .await;
    // The backoff is at most 5 s: connected again and applied well within 15 s.
    let got = user_until(&users, 4546, StatusCode::OK, Duration::from_secs(15)).await;
    assert_eq!(got.json()["user"], after);
    assert_eq!(broker.queue_counts(QUEUE).await, Some((0, 1)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs rabbitmq-server (Debian's package)"]
async fn writes_through_the_proxy_reach_users_service() {
    let (broker, users) = broker_and_users().await;
    let legacy = start_legacy(legacy_stub::Options::default()).await;
    let var = "STRANGLER_TEST_EVENTS_CONSUMER_URL";
    std::env::set_var(var, broker.url());
    let proxy = Proxy::start(&format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\n\n\
         [events]\nurl_env = \"{var}\"\nexchange = \"{EXCHANGE}\"\n\n{}\n\
         [[routes]]\nprefix = \"/api/users\"\nbackend = \"legacy\"\n\
         events = {{ kinds = [\"write\"], body = \"16KiB\" }}\n",
        legacy_at(legacy.addr)
    ))
    .await;

    // The monolith creates the user (id 21, after the 20 seeded); users-service learns it.
    let created = send_with(
        http::Method::POST,
        &proxy.url("/api/users"),
        &[("content-type", "application/json")],
        r#"{"name":"Ada","email":"Ada@X.example"}"#,
    )
    .await;
    assert_eq!(created.status, StatusCode::CREATED, "{}", created.text());
    let id = created.json()["user"]["id"].as_u64().unwrap();
    let got = user_until(&users, id, StatusCode::OK, Duration::from_secs(10)).await;
    assert_eq!(got.json()["user"], created.json()["user"]);

    // A failed write publishes nothing; a DELETE through the proxy removes the user.
    let refused = send_with(
        http::Method::POST,
        &proxy.url("/api/users"),
        &[("content-type", "application/json")],
        r#"{"name":"no email"}"#,
    )
    .await;
    assert_eq!(refused.status, StatusCode::BAD_REQUEST);
    let deleted = send_with(
        http::Method::DELETE,
        &proxy.url(&format!("/api/users/{id}")),
        &[],
        "",
    )
    .await;
    assert_eq!(deleted.status, StatusCode::NO_CONTENT, "{}", deleted.text());
    user_until(&users, id, StatusCode::NOT_FOUND, Duration::from_secs(10)).await;
    eventually(Duration::from_secs(5), || async {
        (queue_depth(&broker).await == (0, 0)).then_some(())
    })
    .await;
}

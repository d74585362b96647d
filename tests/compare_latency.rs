//! Comparing large answers never delays clients: a shadowed and an unshadowed route of the
//! same backend, side by side, whose answers are large JSON arrays that each comparison must
//! parse and walk. Alone in its test binary, so no other test's load skews the ratio.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a panic is a failure report

mod support;

use std::time::Duration;

use support::*;

/// A backend answering a JSON array of 30,000 items (about 1 MB), the same every time;
/// `reordered` writes each item's keys in another order (equal as JSON, not as bytes, so the
/// comparison must parse and walk both).
async fn big_json(reordered: bool) -> Running {
    let text: Vec<String> = (0..30_000)
        .map(|i| {
            let (id, qty, sku) = (
                format!("\"id\":{i}"),
                format!("\"qty\":{}", i % 7),
                format!("\"sku\":\"SKU-{i:06}\""),
            );
            if reordered {
                format!("{{{sku},{qty},{id}}}")
            } else {
                format!("{{{id},{qty},{sku}}}")
            }
        })
        .collect();
    fixed_h1(json_answer(&format!("[{}]", text.join(",")))).await
}

fn mean(v: &[Duration]) -> Duration {
    v.iter().sum::<Duration>() / v.len() as u32
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn comparing_large_answers_does_not_delay_clients() {
    let (primary, shadow) = (big_json(false).await, big_json(true).await);
    // Two routes to the same backend, side by side: one shadowed (and compared), one not.
    let proxy = Proxy::start(&format!(
        "{}[backends.legacy]\nurl = \"http://{}\"\nlegacy = true\n[backends.users]\nurl = \"http://{}\"\n[[routes]]\nprefix = \"/shadowed\"\nbackend = \"legacy\"\nshadow = \"users\"\n[routes.compare]\nmax_body = \"16MiB\"\n[[routes]]\nprefix = \"/plain\"\nbackend = \"legacy\"\n",
        server("watch = \"off\""),
        primary.addr,
        shadow.addr
    ))
    .await;
    let client = client();
    let timed = |url: String| {
        let client = client.clone();
        async move {
            let started = std::time::Instant::now();
            let resp = client.get(url.parse().unwrap()).await.unwrap();
            assert_eq!(resp.status(), 200);
            use http_body_util::BodyExt;
            let body = resp.into_body().collect().await.unwrap().to_bytes();
            assert!(body.len() > 900_000);
            started.elapsed()
        }
    };
    // Warm both routes' connections.
    timed(proxy.url("/plain")).await;
    timed(proxy.url("/shadowed")).await;
    let (mut plain, mut shadowed) = (Vec::new(), Vec::new());
    for _ in 0..20 {
        plain.push(timed(proxy.url("/plain")).await);
        shadowed.push(timed(proxy.url("/shadowed")).await);
    }
    let started = std::time::Instant::now();
    let m = shadow_legs_ended(&proxy, 21.0, Duration::from_secs(60)).await;
    eprintln!("settled {:?} after the last request", started.elapsed());
    let compared = shadow_outcome(&m, "match");
    let (p, s) = (mean(&plain), mean(&shadowed));
    eprintln!(
        "mean latency: plain {p:?}, shadowed {s:?} ({:.2}x); compared {compared}, skipped {}",
        s.as_secs_f64() / p.as_secs_f64(),
        shadow_outcome(&m, "skipped")
    );
    assert!(compared >= 1.0, "no comparison ran: {m}");
    assert!(
        s.as_secs_f64() <= 2.5 * p.as_secs_f64(),
        "a shadowed route's clients waited {s:?} on average against {p:?} unshadowed"
    );
}

//! Comparing large answers never delays clients: a shadowed and an unshadowed route of the
//! same backend, side by side, whose answers are large JSON arrays that each comparison must
//! parse and walk. Alone in its test binary, so no other test's load skews the ratio.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a panic is a failure report

mod support;

use std::time::Duration;

use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn count(m: &str, outcome: &str) -> f64 {
    metric(m, "strangler_shadow_total", &[("outcome", outcome)]).unwrap_or(0.0)
}

fn plain(body: &str) -> &'static [u8] {
    let text = format!(
        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    Box::leak(text.into_boxed_str()).as_bytes()
}

/// An HTTP/1.1 backend that answers every request on a connection with `answer`.
async fn raw_h1(answer: &'static [u8]) -> Running {
    let (l, addr) = listener().await;
    let (tx, mut stop) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = tokio::select! {
                _ = &mut stop => return,
                r = l.accept() => r.unwrap(),
            };
            tokio::spawn(async move {
                let mut seen = Vec::new();
                let mut buf = [0u8; 4096];
                loop {
                    let Ok(n) = s.read(&mut buf).await else {
                        return;
                    };
                    if n == 0 {
                        return;
                    }
                    seen.extend_from_slice(&buf[..n]);
                    while let Some(end) = seen.windows(4).position(|w| w == b"\r\n\r\n") {
                        seen.drain(..end + 4);
                        if s.write_all(answer).await.is_err() {
                            return;
                        }
                    }
                }
            });
        }
    });
    Running {
        addr,
        stop: Some(tx),
    }
}

/// Waits until `n` legs have ended (any outcome but dropped); returns the metrics text.
async fn settled_within(proxy: &Proxy, n: f64, deadline: Duration) -> String {
    eventually(deadline, || async {
        let m = metrics_text(proxy).await;
        let done: f64 = ["match", "mismatch", "error", "skipped"]
            .iter()
            .map(|o| count(&m, o))
            .sum();
        (done >= n).then_some(m)
    })
    .await
}

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
    raw_h1(plain(&format!("[{}]", text.join(",")))).await
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
    let m = settled_within(&proxy, 21.0, Duration::from_secs(60)).await;
    eprintln!("settled {:?} after the last request", started.elapsed());
    let compared = count(&m, "match");
    let (p, s) = (mean(&plain), mean(&shadowed));
    eprintln!(
        "mean latency: plain {p:?}, shadowed {s:?} ({:.2}x); compared {compared}, skipped {}",
        s.as_secs_f64() / p.as_secs_f64(),
        count(&m, "skipped")
    );
    assert!(compared >= 1.0, "no comparison ran: {m}");
    assert!(
        s.as_secs_f64() <= 2.5 * p.as_secs_f64(),
        "a shadowed route's clients waited {s:?} on average against {p:?} unshadowed"
    );
}

//! Heap allocations per proxied request on the plain path, counted by a counting global
//! allocator around a batch of keep-alive requests. The client and the backend here are raw
//! sockets writing and reading fixed buffers, so after warm-up every allocation counted is
//! the proxy's. A change that adds allocations to the plain path fails this test; one that
//! removes some should lower `MAX_PER_REQUEST` (and the figure in the README).
//!
//! This file holds one test on purpose: the counter is process-wide, and another test running
//! beside it would be counted too.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a panic is a failure report

mod support;

use std::alloc::System;

use stats_alloc::{Region, StatsAlloc, INSTRUMENTED_SYSTEM};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

/// Allocations per request measured when this bound was set (13.00 in the quietest batch),
/// plus half of one: any allocation added to every request fails.
const MAX_PER_REQUEST: f64 = 13.5;
const WARMUP: usize = 300;
const BATCHES: usize = 20;
const BATCH: usize = 100;

/// 1 KiB of JSON-ish body, the benchmark's answer size.
const BODY: &[u8; 1024] = &[b'x'; 1024];

/// A backend answering every request on a connection with a fixed 1 KiB answer.
async fn fixed_backend() -> std::net::SocketAddr {
    let (listener, addr) = listener().await;
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut head = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 1024\r\n\r\n".to_vec();
                head.extend_from_slice(BODY);
                let mut buf = [0u8; 8192];
                let mut have = 0;
                loop {
                    match stream.read(&mut buf[have..]).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => have += n,
                    }
                    // GETs without bodies: each head ends the request.
                    while let Some(end) = find(&buf[..have], b"\r\n\r\n") {
                        if stream.write_all(&head).await.is_err() {
                            return;
                        }
                        buf.copy_within(end + 4..have, 0);
                        have -= end + 4;
                    }
                }
            });
        }
    });
    addr
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Sends one GET and reads its answer whole (head, then `content-length` bytes).
async fn one(stream: &mut TcpStream, buf: &mut [u8]) {
    stream
        .write_all(b"GET /api/users/7 HTTP/1.1\r\nhost: fittrack.example\r\n\r\n")
        .await
        .unwrap();
    let mut have = 0;
    loop {
        let n = stream.read(&mut buf[have..]).await.unwrap();
        assert!(n > 0, "the proxy closed the connection");
        have += n;
        if let Some(end) = find(&buf[..have], b"\r\n\r\n") {
            assert!(
                buf.starts_with(b"HTTP/1.1 200 "),
                "{:?}",
                String::from_utf8_lossy(&buf[..end])
            );
            if have >= end + 4 + BODY.len() {
                assert_eq!(have, end + 4 + BODY.len(), "one answer at a time");
                return;
            }
        }
    }
}

#[tokio::test]
async fn the_plain_path_allocates_at_most_its_budget_per_request() {
    let backend = fixed_backend().await;
    let proxy = Proxy::start(&format!(
        "{}{}",
        server("access_log = false\nwatch = \"off\""),
        legacy_route(backend, "/")
    ))
    .await;
    let mut client = TcpStream::connect(proxy.addr).await.unwrap();
    client.set_nodelay(true).unwrap();
    let mut buf = vec![0u8; 16 << 10];
    for _ in 0..WARMUP {
        one(&mut client, &mut buf).await;
    }
    // Batches: periodic work (timers, the runtime's own upkeep) allocates now and then, more
    // on a slow machine; it only ever adds, so the quietest batch is the per-request figure.
    let mut quietest = f64::MAX;
    let (mut allocations, mut bytes) = (0, 0);
    for _ in 0..BATCHES {
        let region = Region::new(GLOBAL);
        for _ in 0..BATCH {
            one(&mut client, &mut buf).await;
        }
        let change = region.change();
        quietest = quietest.min(change.allocations as f64 / BATCH as f64);
        allocations += change.allocations;
        bytes += change.bytes_allocated;
    }
    let n = BATCHES * BATCH;
    eprintln!(
        "{n} requests: {allocations} allocations ({:.2} per request on average, {quietest:.2} in the quietest batch of {BATCH}), {} bytes allocated per request",
        allocations as f64 / n as f64,
        bytes / n
    );
    assert!(
        quietest <= MAX_PER_REQUEST,
        "{quietest:.2} allocations per request, budget {MAX_PER_REQUEST}"
    );
}

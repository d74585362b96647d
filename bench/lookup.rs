//! Route lookup cost as the table grows: 10, 100, 1,000 and 10,000 routes, the same request
//! paths each time. Run: `cargo run --release --example lookup`.
//!
//! The table is realistic: endpoint groups `/api/groupN` (some with a method filter), a
//! catch-all `/`, and requests that hit deep paths, shallow paths, and the catch-all.

use std::hint::black_box;
use std::time::Instant;

use http::Method;

fn table(n: usize) -> strangler::routes::RouteTable {
    let mut src = String::from("[backends.legacy]\nurl = \"http://127.0.0.1:3000\"\n[backends.users]\nurl = \"http://127.0.0.1:3001\"\n");
    for i in 0..n - 1 {
        let filter = if i % 5 == 0 {
            "methods = [\"GET\", \"HEAD\"]\n"
        } else {
            ""
        };
        src.push_str(&format!(
            "[[routes]]\nprefix = \"/api/group{i}\"\n{filter}backend = \"{}\"\n",
            if i % 2 == 0 { "users" } else { "legacy" }
        ));
    }
    src.push_str("[[routes]]\nprefix = \"/\"\nbackend = \"legacy\"\n");
    match strangler::config::parse(&src) {
        Ok(p) => p.table,
        Err(e) => panic!("{e:?}"),
    }
}

fn main() {
    let paths = [
        "/api/group0/items/42",
        "/api/group7",
        "/api/group9/a/b/c/d",
        "/static/app.js",
        "/api/unknown/x",
    ];
    let iterations = 2_000_000;
    println!("{:>8}  {:>12}", "routes", "ns/lookup");
    let mut results = Vec::new();
    for n in [10, 100, 1_000, 10_000] {
        let t = table(n);
        // Warm up, then measure.
        for p in paths {
            black_box(t.lookup(&Method::GET, None, p));
        }
        let start = Instant::now();
        for i in 0..iterations {
            let p = paths[i % paths.len()];
            black_box(t.lookup(black_box(&Method::GET), None, black_box(p)));
        }
        let ns = start.elapsed().as_nanos() as f64 / iterations as f64;
        println!("{n:>8}  {ns:>12.1}");
        results.push(ns);
    }
    println!(
        "ratio 10,000 routes / 10 routes: {:.2}",
        results[3] / results[0]
    );
}

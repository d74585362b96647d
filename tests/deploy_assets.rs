//! The Grafana dashboard and the Prometheus rules in deploy/ only use metric names that the
//! binary really exports: a proxy is driven through every feature that creates metrics, its
//! /metrics is scraped, and every `strangler_*` name in the assets must appear there.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a panic is a failure report

mod support;

use std::collections::BTreeSet;

use support::*;

/// `strangler_*` names in `text`.
fn names(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find("strangler_") {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        out.insert(tail[..end].to_string());
        rest = &tail[end..];
    }
    out
}

#[tokio::test]
async fn dashboards_and_alerts_use_only_exported_metrics() {
    let root = env!("CARGO_MANIFEST_DIR");
    let dashboard =
        std::fs::read_to_string(format!("{root}/deploy/grafana/strangler.json")).unwrap();
    let rules = std::fs::read_to_string(format!("{root}/deploy/prometheus/alerts.yml")).unwrap();
    let parsed: serde_json::Value =
        serde_json::from_str(&dashboard).expect("the dashboard is valid JSON");
    let panels = parsed["panels"].as_array().unwrap();
    assert!(panels.len() >= 10);
    // Panel ids are unique and panels never overlap on Grafana's 24-column grid.
    let mut ids = BTreeSet::new();
    let mut cells = BTreeSet::new();
    for p in panels {
        assert!(ids.insert(p["id"].as_u64().unwrap()), "id twice: {p}");
        let g = |k: &str| p["gridPos"][k].as_u64().unwrap();
        assert!(g("x") + g("w") <= 24, "wider than the grid: {p}");
        for x in g("x")..g("x") + g("w") {
            for y in g("y")..g("y") + g("h") {
                assert!(cells.insert((x, y)), "panel {} overlaps another", p["id"]);
            }
        }
    }
    let mut used = names(&dashboard);
    // Migration events are on the dashboard and alerted on.
    for events in ["strangler_events_total", "strangler_events_buffered"] {
        assert!(used.contains(events), "the dashboard lacks {events}");
    }
    assert!(names(&rules).contains("strangler_events_total"));
    used.extend(names(&rules));
    assert!(used.len() >= 10, "{used:?}");

    // Drive every metric into existence: traffic, a shadow comparison, a guard, a fallback,
    // upstream errors, a reload, migration events (to a broker that is not there: they wait
    // in the buffer, or are dropped, either way counted).
    let legacy = start_legacy(Default::default()).await;
    let users = start_users(None).await;
    let dead = closed_port().await;
    let var = "STRANGLER_TEST_DEPLOY_ASSETS_AMQP_URL";
    std::env::set_var(var, format!("amqp://{}/%2f", closed_port().await));
    let proxy = Proxy::start(&format!(
        "[events]\nurl_env = \"{var}\"\nbuffer = 1\n{}[backends.users]\nurl = \"http://{}\"\n[backends.gone]\nurl = \"http://{dead}\"\n\
         [[routes]]\nprefix = \"/api/users\"\nbackend = \"legacy\"\nshadow = \"users\"\nevents = [\"mismatch\", \"request\"]\n\
         [[routes]]\nprefix = \"/api/workouts\"\nbackend = \"gone\"\nfallback = \"legacy\"\n[routes.guard]\nmax_error_rate = 0.5\n\
         [[routes]]\nprefix = \"/\"\nbackend = \"legacy\"\n",
        legacy_at(legacy.addr),
        users.addr
    ))
    .await;
    get(&proxy.url("/api/users/1")).await;
    get(&proxy.url("/api/users/2")).await;
    get(&proxy.url("/api/workouts/1")).await;
    strangler::reload::reload_async(proxy.reloader.clone()).await;
    let exported = eventually(std::time::Duration::from_secs(5), || async {
        proxy.state.metrics().upkeep();
        let text = get(&proxy.admin_url("/metrics")).await.text();
        (text.contains("strangler_shadow_duration_seconds_bucket")
            && text.contains("strangler_events_total{"))
        .then_some(text)
    })
    .await;
    let exported: BTreeSet<String> = exported
        .lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| l.split(['{', ' ']).next().unwrap().to_string())
        .collect();
    let missing: Vec<&String> = used.iter().filter(|n| !exported.contains(*n)).collect();
    assert!(
        missing.is_empty(),
        "used in deploy/ but not exported: {missing:?}\nexported: {exported:?}"
    );
}

//! What the `check`, `explain` and `diff` commands print. Pure functions of loaded configs,
//! so tests assert on the exact text operators read.

use std::fmt::Write as _;
use std::net::IpAddr;

use http::{HeaderMap, Method};

use crate::config::Loaded;
use crate::routes::diff::{diff, label};
use crate::routes::{canary_bucket, format_percent, in_canary, Route, RouteTable, Sticky};

/// Renders rows as left-aligned columns.
fn columns(rows: &[Vec<String>]) -> String {
    let widths: Vec<usize> = (0..rows[0].len())
        .map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for row in rows {
        let line: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        let _ = writeln!(out, "{}", line.join("  ").trim_end());
    }
    out
}

/// `strangler check`: the routes with their stage, one per line.
pub fn check_report(loaded: &Loaded) -> String {
    let t = &loaded.parsed.table;
    let dash = || "-".to_string();
    let mut rows = vec![
        ["ROUTE", "STAGE", "BACKEND", "SHADOW", "CANARY", "FALLBACK"]
            .map(String::from)
            .to_vec(),
    ];
    for (id, r) in t.routes().iter().enumerate() {
        rows.push(vec![
            label(r),
            t.stage(id).to_string(),
            t.backend(r.backend).name.clone(),
            r.shadow.as_ref().map_or_else(dash, |s| {
                format!(
                    "{} ({}%)",
                    t.backend(s.backend).name,
                    format_percent(s.percent)
                )
            }),
            r.canary.as_ref().map_or_else(dash, |c| {
                format!(
                    "{} {}%",
                    t.backend(c.backend).name,
                    format_percent(c.percent)
                )
            }),
            r.fallback.map_or_else(dash, |f| t.backend(f).name.clone()),
        ]);
    }
    let mut out = columns(&rows);
    let legacy = t
        .legacy()
        .map_or("none".to_string(), |l| t.backend(l).name.clone());
    let _ = writeln!(
        out,
        "\n{}: valid: {} routes, {} backends (legacy: {legacy})",
        loaded.path.display(),
        t.routes().len(),
        t.backends().len()
    );
    let s = &loaded.parsed.server;
    let listener = match (&s.tls, s.h2c) {
        (Some(tls), _) => tls.describe(),
        (None, true) => "cleartext; HTTP/1.1 and HTTP/2 (h2c prior knowledge)".to_string(),
        (None, false) => "cleartext HTTP/1.1".to_string(),
    };
    let _ = writeln!(out, "listener {}: {listener}", s.listen);
    out
}

/// Warnings as `FILE:LINE:COL: warning: message`.
pub fn warnings(loaded: &Loaded) -> Vec<String> {
    let file = loaded.path.display().to_string();
    loaded
        .parsed
        .warnings
        .iter()
        .map(|w| format!("{file}:{}:{}: warning: {}", w.line, w.col, w.message))
        .collect()
}

/// `strangler explain METHOD PATH [-H ...]`: what the proxy would do with this request.
pub fn explain(
    loaded: &Loaded,
    method: &Method,
    target: &str,
    headers: &HeaderMap,
    client: IpAddr,
) -> Result<String, String> {
    let uri: http::Uri = target
        .parse()
        .map_err(|e| format!("{target:?} is not a request path: {e}"))?;
    let path = uri.path();
    let host = crate::headers::request_host(headers, &uri)?;
    let t: &RouteTable = &loaded.parsed.table;
    let mut out = format!(
        "request:  {method} {target}{}\n",
        host.map_or(String::new(), |h| format!(" (host {h})"))
    );
    let Some(id) = t.lookup(method, host, path) else {
        out.push_str("route:    none: the proxy answers 404 {\"code\": \"no_route\"}\n");
        return Ok(out);
    };
    let r = t.route(id);
    let _ = writeln!(
        out,
        "route:    {} ({}:{})",
        label(r),
        loaded.path.display(),
        r.line
    );
    let _ = writeln!(out, "stage:    {}", t.stage(id));
    let answering = r.pick_backend(headers, client, None);
    let b = t.backend(answering);
    let _ = writeln!(
        out,
        "backend:  {} -> {}://{}{}{}",
        b.name,
        b.scheme,
        b.authority,
        b.base_path,
        uri.path_and_query().map_or("/", |pq| pq.as_str())
    );
    let protocol = b.protocol.version_text();
    let _ = writeln!(
        out,
        "upstream: {protocol}{}",
        b.tls.as_ref().map_or_else(
            || ", cleartext".to_string(),
            |t| format!(", {}", t.describe())
        )
    );
    canary_line(&mut out, t, r, headers, client);
    safety_lines(&mut out, t, r, method, answering);
    Ok(out)
}

/// The `shadow:`, `fallback:` and `guard:` lines of `explain`.
fn safety_lines(out: &mut String, t: &RouteTable, r: &Route, method: &Method, answering: usize) {
    let name = |b: usize| t.backend(b).name.clone();
    match &r.shadow {
        None => out.push_str("shadow:   none\n"),
        Some(s) => {
            let mirrored = if s.methods.contains(method) {
                format!(
                    "{method} is mirrored to {}% of requests",
                    format_percent(s.percent)
                )
            } else {
                format!("{method} is not mirrored (shadow_methods)")
            };
            let _ = writeln!(out, "shadow:   {}; {mirrored}", name(s.backend));
        }
    }
    let _ = writeln!(
        out,
        "fallback: {}",
        r.fallback.map_or("none".to_string(), name)
    );
    match &r.guard {
        None => out.push_str("guard:    none\n"),
        Some(g) => {
            let _ = writeln!(
                out,
                "guard:    rolls back to {} when more than {}% of {}'s answers fail in {} (at least {} requests)",
                name(g.to),
                format_percent(g.max_error_rate * 100.0),
                t.backend(answering).name,
                humantime::format_duration(g.window),
                g.min_requests
            );
        }
    }
}

/// The `canary:` line of `explain`: the sticky key, its bucket and which side it falls on.
fn canary_line(out: &mut String, t: &RouteTable, r: &Route, headers: &HeaderMap, client: IpAddr) {
    let name = |b: usize| t.backend(b).name.clone();
    match &r.canary {
        None => out.push_str("canary:   none\n"),
        Some(c) => {
            let what = match &c.sticky {
                Sticky::Header(h) => format!("header {h}"),
                Sticky::Cookie(n) => format!("cookie {n}"),
                Sticky::Ip => format!("client ip {client}"),
                Sticky::Claim(c) => format!("claim {c} (of a verified token; explain has none)"),
                Sticky::Random => String::new(),
            };
            let key = c.sticky_key(headers, client, None).map(|k| (what, k));
            let pct = format_percent(c.percent);
            let detail = match (&c.sticky, key) {
                (Sticky::Random, _) => "random per request".to_string(),
                (_, None) => format!("the sticky key is absent: {} answers", name(r.backend)),
                (_, Some((what, bytes))) => {
                    let bucket = canary_bucket(&bytes);
                    let side = if in_canary(bucket, c.percent) {
                        "in the canary"
                    } else {
                        "not in the canary"
                    };
                    format!(
                        "{what}: bucket {bucket} of 10000 (canary is buckets below {}) -> {side}",
                        (c.percent * 100.0) as u32
                    )
                }
            };
            let _ = writeln!(out, "canary:   {} {pct}%; {detail}", name(c.backend));
        }
    }
}

/// `strangler diff OLD NEW`.
pub fn diff_report(old: &Loaded, new: &Loaded) -> String {
    let lines = diff(&old.parsed.table, &new.parsed.table);
    if lines.is_empty() {
        return "no route changes\n".into();
    }
    lines.into_iter().map(|l| l + "\n").collect()
}

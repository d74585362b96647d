//! What the `check`, `explain` and `diff` commands print. Pure functions of loaded configs,
//! so tests assert on the exact text operators read.

use std::fmt::Write as _;
use std::net::IpAddr;

use http::{HeaderMap, Method};

use crate::config::Loaded;
use crate::routes::diff::{diff, label};
use crate::routes::{
    canary_bucket, format_percent, in_canary, RequestKey, Route, RouteTable, Sticky,
};

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
    for id in t.route_ids() {
        let r = t.route(id);
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
    // The AUTH column only appears in files that use auth, so other output stays the same.
    if t.routes().iter().any(|r| r.auth.is_some()) {
        rows[0].push("AUTH".into());
        for (row, r) in rows[1..].iter_mut().zip(t.routes()) {
            row.push(r.auth.as_ref().map_or_else(dash, |a| {
                format!("{} ({})", t.provider(a.provider).name, a.mode)
            }));
        }
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
    for p in t.providers() {
        let algs: Vec<String> = p
            .rules
            .algorithms
            .iter()
            .map(|a| format!("{a:?}"))
            .collect();
        let _ = writeln!(
            out,
            "auth {}: {}, issuer {}, audiences {}, algorithms {}",
            p.name,
            p.keys.describe(),
            p.rules.issuer,
            p.rules.audiences.join(","),
            algs.join(",")
        );
    }
    if let Some(e) = &s.events {
        let publishing: Vec<String> = t
            .routes()
            .iter()
            .filter_map(|r| {
                let ev = r.events.as_ref()?;
                Some(format!("{} ({})", r.prefix, ev.kinds().join(",")))
            })
            .collect();
        let routes = if publishing.is_empty() {
            "no route publishes".to_string()
        } else {
            publishing.join(", ")
        };
        let _ = match &e.url {
            Some(url) => writeln!(
                out,
                "events: {url} (from {}), exchange {}, buffer {} events; {routes}",
                e.url_env, e.exchange, e.buffer
            ),
            None => writeln!(out, "events: off, {} is unset; {routes}", e.url_env),
        };
    }
    if !s.trusted_proxies.is_empty() {
        let nets: Vec<String> = s.trusted_proxies.iter().map(ToString::to_string).collect();
        let _ = writeln!(
            out,
            "client address: X-Forwarded-For believed from {}",
            nets.join(", ")
        );
    }
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
    let claims = auth_line(&mut out, t, r, method, headers);
    let answering = r.pick_backend(headers, client, claims.as_ref());
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
    canary_line(&mut out, t, r, headers, client, claims.as_ref());
    let _ = writeln!(
        out,
        "limits:   {}",
        crate::routes::limits::describe_windows(&r.rate_limits)
    );
    let _ = writeln!(
        out,
        "stale:    {}",
        r.stale.as_ref().map_or_else(
            || "none".to_string(),
            |s| format!(
                "{} (served only after the backend and fallback failed)",
                s.describe()
            )
        )
    );
    safety_lines(&mut out, t, r, method, answering);
    Ok(out)
}

/// The `auth:` line of `explain`: the provider and mode, and what the proxy would do with
/// the request's token. Keys read at load (a JWKS file, a secret) verify it here; keys from a
/// `jwks_url` are fetched at run time only. Returns the claims of a token that verified.
fn auth_line(
    out: &mut String,
    t: &RouteTable,
    r: &Route,
    method: &Method,
    headers: &HeaderMap,
) -> Option<crate::jwt::Claims> {
    let Some(a) = &r.auth else {
        out.push_str("auth:     none\n");
        return None;
    };
    let p = t.provider(a.provider);
    let require = a
        .require
        .iter()
        .map(|(c, v)| format!(" requiring {c} = {}", v.join(" ")))
        .collect::<String>();
    let (verdict, claims) = explain_token(p, a, method, headers);
    let _ = writeln!(
        out,
        "auth:     {} ({}, {}){require}; {verdict}",
        p.name,
        a.mode,
        p.keys.describe()
    );
    claims
}

fn explain_token(
    p: &crate::routes::Provider,
    a: &crate::routes::RouteAuth,
    method: &Method,
    headers: &HeaderMap,
) -> (String, Option<crate::jwt::Claims>) {
    use crate::jwt::{self, Reason};
    let token = match crate::auth::credentials(p, headers) {
        Ok(Some(t)) => t,
        Ok(None) if crate::auth::is_preflight(method, headers) => {
            return ("a CORS preflight without credentials passes".into(), None)
        }
        Ok(None) => {
            let what = match a.mode {
                crate::routes::Mode::Optional => "passes anonymously",
                crate::routes::Mode::Observe => "is forwarded (observe; would be refused: missing)",
                crate::routes::Mode::Required => "is refused: 401 unauthorized",
            };
            return (format!("no token: the request {what}"), None);
        }
        Err(_) => {
            return (
                format!("malformed credentials: {}", refusal(a, Reason::Malformed)),
                None,
            )
        }
    };
    let crate::routes::KeySource::Loaded { keys, .. } = &p.keys else {
        return (
            "the token's keys come from jwks_url at run time; explain does not fetch them".into(),
            None,
        );
    };
    let checked = jwt::head(token, &p.rules).and_then(|h| jwt::verify(token, &h, &p.rules, keys));
    match checked {
        Err(reason) => (
            format!("the token is not valid ({reason}): {}", refusal(a, reason)),
            None,
        ),
        Ok(claims) => match jwt::missing_requirement(&claims, &a.require) {
            Some((claim, value)) => (
                format!(
                    "the token is valid but its {claim} lacks {value}: {}",
                    refusal(a, Reason::InsufficientScope)
                ),
                Some(claims),
            ),
            None => {
                let sub = jwt::claim_text(&claims, "sub").unwrap_or_else(|| "-".into());
                (format!("the token is valid (sub {sub})"), Some(claims))
            }
        },
    }
}

/// What the route does with a request refused for `reason`.
fn refusal(a: &crate::routes::RouteAuth, reason: crate::jwt::Reason) -> String {
    use crate::jwt::Reason;
    if a.mode == crate::routes::Mode::Observe {
        return format!("forwarded anyway (observe; counted as {reason})");
    }
    match reason {
        Reason::Malformed => "refused: 400 bad_request".into(),
        Reason::InsufficientScope => "refused: 403 forbidden".into(),
        Reason::KeysUnavailable => "refused: 503 auth_unavailable".into(),
        _ => "refused: 401 unauthorized".into(),
    }
}

/// The `shadow:`, `fallback:` and `guard:` lines of `explain`.
fn safety_lines(
    out: &mut String,
    t: &RouteTable,
    r: &Route,
    method: &Method,
    answering: crate::routes::BackendId,
) {
    let name = |b: crate::routes::BackendId| t.backend(b).name.clone();
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
fn canary_line(
    out: &mut String,
    t: &RouteTable,
    r: &Route,
    headers: &HeaderMap,
    client: IpAddr,
    claims: Option<&crate::jwt::Claims>,
) {
    let name = |b: crate::routes::BackendId| t.backend(b).name.clone();
    match &r.canary {
        None => out.push_str("canary:   none\n"),
        Some(c) => {
            let what = match &c.sticky {
                Sticky::Key(RequestKey::Header(h)) => format!("header {h}"),
                Sticky::Key(RequestKey::Cookie(n)) => format!("cookie {n}"),
                Sticky::Key(RequestKey::Client) => format!("client ip {client}"),
                Sticky::Key(RequestKey::Claim(c)) => format!("claim {c}"),
                Sticky::Key(RequestKey::Route) | Sticky::Random => String::new(),
            };
            let key = c.sticky_key(headers, client, claims).map(|k| (what, k));
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

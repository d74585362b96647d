//! What a change to routes.toml does, route by route, in the words operators use:
//! `/api/users: shadowing -> cut over`. Used by `strangler diff` and logged on every reload.

use std::collections::HashMap;

use super::{format_percent, BackendId, Route, RouteId, RouteTable};

/// A route's name in a diff: its prefix as written, plus its filters when it has any.
pub fn label(route: &Route) -> String {
    let mut s = route.prefix.clone();
    if let Some(m) = &route.methods {
        let names: Vec<&str> = m.iter().map(|m| m.as_str()).collect();
        s.push_str(&format!(" [{}]", names.join(",")));
    }
    if let Some(h) = &route.host {
        s.push_str(&format!(" @{h}"));
    }
    s
}

/// One line per change; empty when the two tables route identically.
pub fn diff(old: &RouteTable, new: &RouteTable) -> Vec<String> {
    let mut out = Vec::new();
    for b in new.backends() {
        match old.backends().iter().find(|o| o.name == b.name) {
            None => out.push(format!("backend {}: added ({})", b.name, b.url)),
            Some(o) if o.url != b.url => {
                out.push(format!("backend {}: url {} -> {}", b.name, o.url, b.url))
            }
            Some(o) if o != b => out.push(format!("backend {}: settings changed", b.name)),
            Some(_) => {}
        }
    }
    for o in old.backends() {
        if new.backend_id(&o.name).is_none() {
            out.push(format!("backend {}: removed", o.name));
        }
    }
    for p in new.providers() {
        match old.providers().iter().find(|o| o.name == p.name) {
            None => out.push(format!("auth {}: added ({})", p.name, p.keys.describe())),
            Some(o) if o.keys != p.keys => {
                let (was, now) = (o.keys.describe(), p.keys.describe());
                out.push(if was != now {
                    format!("auth {}: keys {was} -> {now}", p.name)
                } else if matches!(p.keys, super::auth::KeySource::Url { .. }) {
                    // the same URL and refresh: its cooldown, CA or timeout changed
                    format!("auth {}: jwks_url settings changed ({now})", p.name)
                } else {
                    // the same file or variable, and as many keys: their content changed
                    format!("auth {}: keys changed in {now}", p.name)
                })
            }
            Some(o) if o != p => out.push(format!("auth {}: settings changed", p.name)),
            Some(_) => {}
        }
    }
    for o in old.providers() {
        if !new.providers().iter().any(|p| p.name == o.name) {
            out.push(format!("auth {}: removed", o.name));
        }
    }
    let old_ids: HashMap<String, RouteId> = old
        .route_ids()
        .map(|i| (old.route(i).identity(), i))
        .collect();
    let mut kept = vec![false; old.routes().len()];
    for id in new.route_ids() {
        let route = new.route(id);
        let stage = new.stage(id);
        let Some(&oid) = old_ids.get(&route.identity()) else {
            let backend = &new.backend(route.backend).name;
            out.push(format!(
                "{}: added ({stage}, answered by {backend})",
                label(route)
            ));
            continue;
        };
        kept[oid.index()] = true;
        let old_stage = old.stage(oid);
        if old_stage != stage {
            out.push(format!("{}: {old_stage} -> {stage}", label(route)));
        }
        for change in field_changes(old, old.route(oid), new, route) {
            out.push(format!("{}: {change}", label(route)));
        }
    }
    for oid in old.route_ids() {
        let route = old.route(oid);
        if !kept[oid.index()] {
            out.push(format!(
                "{}: removed (was {})",
                label(route),
                old.stage(oid)
            ));
        }
    }
    out
}

/// Changes that the stage does not already say.
fn field_changes(ot: &RouteTable, o: &Route, nt: &RouteTable, n: &Route) -> Vec<String> {
    let name = |t: &RouteTable, id: Option<BackendId>| {
        id.map_or("none".to_string(), |id| t.backend(id).name.clone())
    };
    let mut out = Vec::new();
    let mut field = |what: &str, a: String, b: String| {
        if a != b {
            out.push(format!("{what} {a} -> {b}"));
        }
    };
    field(
        "backend",
        name(ot, Some(o.backend)),
        name(nt, Some(n.backend)),
    );
    field(
        "shadow",
        name(ot, o.shadow.as_ref().map(|s| s.backend)),
        name(nt, n.shadow.as_ref().map(|s| s.backend)),
    );
    let shadow_pct = |r: &Route| {
        r.shadow
            .as_ref()
            .map_or("-".into(), |s| format!("{}%", format_percent(s.percent)))
    };
    if o.shadow.is_some() && n.shadow.is_some() {
        field("shadow_percent", shadow_pct(o), shadow_pct(n));
        let methods = |r: &Route| {
            r.shadow.as_ref().map_or(String::new(), |s| {
                s.methods
                    .iter()
                    .map(|m| m.as_str())
                    .collect::<Vec<_>>()
                    .join(",")
            })
        };
        field("shadow_methods", methods(o), methods(n));
    }
    field(
        "canary backend",
        name(ot, o.canary.as_ref().map(|c| c.backend)),
        name(nt, n.canary.as_ref().map(|c| c.backend)),
    );
    let sticky = |r: &Route| {
        r.canary
            .as_ref()
            .map_or_else(|| "none".to_string(), |c| c.sticky.to_string())
    };
    field("canary sticky", sticky(o), sticky(n));
    field("fallback", name(ot, o.fallback), name(nt, n.fallback));
    let guard = |t: &RouteTable, r: &Route| {
        r.guard.as_ref().map_or("none".into(), |g| {
            format!(
                "max_error_rate {} over {:?} (min {}) to {}",
                g.max_error_rate,
                g.window,
                g.min_requests,
                t.backend(g.to).name
            )
        })
    };
    field("guard", guard(ot, o), guard(nt, n));
    let auth = |t: &RouteTable, r: &Route| {
        r.auth.as_ref().map_or("none".into(), |a| {
            let require: String = a
                .require
                .iter()
                .map(|(c, v)| format!(", require {c} = {}", v.join(" ")))
                .collect();
            format!("{} ({}{require})", t.provider(a.provider).name, a.mode)
        })
    };
    field("auth", auth(ot, o), auth(nt, n));
    field(
        "rate_limit",
        super::limits::describe_windows(&o.rate_limits),
        super::limits::describe_windows(&n.rate_limits),
    );
    let stale = |r: &Route| {
        r.stale
            .as_ref()
            .map_or_else(|| "none".to_string(), super::limits::Stale::describe)
    };
    field("stale_if_error", stale(o), stale(n));
    if o.compare != n.compare {
        out.push("compare settings changed".into());
    }
    out
}

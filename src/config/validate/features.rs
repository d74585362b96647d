//! Validation of the migration features of a route: shadow, canary, compare, guard; and the
//! warnings that need the whole table.

use super::*;

/// Default guard window, minimum requests (contract example values).
const DEFAULT_GUARD_WINDOW: Duration = Duration::from_secs(60);
const DEFAULT_GUARD_MIN_REQUESTS: i64 = 50;
/// Default readiness gate for `ready_to_cut_over`.
const DEFAULT_GATE_MIN_COMPARISONS: u64 = 1000;
const DEFAULT_GATE_MAX_MISMATCH_RATE: f64 = 0.001;

impl Ctx {
    pub(super) fn shadow(
        &mut self,
        f: &RouteFile,
        names: &HashMap<String, BackendId>,
        backend: Option<BackendId>,
    ) -> Option<Shadow> {
        let Some(s) = &f.shadow else {
            if let Some(p) = &f.shadow_percent {
                self.err(p.span(), "`shadow_percent` without `shadow`".into());
            }
            if let Some(m) = &f.shadow_methods {
                self.err(m.span(), "`shadow_methods` without `shadow`".into());
            }
            return None;
        };
        let id = self.backend_ref(s, names, "shadow")?;
        if Some(id) == backend {
            self.err(
                s.span(),
                "`shadow` is the route's own backend: a request would be compared with itself"
                    .into(),
            );
        }
        let percent = f
            .shadow_percent
            .as_ref()
            .map_or(100.0, |p| self.percent(p, "shadow_percent"));
        let methods = match &f.shadow_methods {
            Some(m) => self.methods(m, "shadow_methods"),
            None => DEFAULT_SHADOW_METHODS.to_vec(),
        };
        Some(Shadow {
            backend: id,
            percent,
            methods,
        })
    }

    pub(super) fn canary(
        &mut self,
        c: &Spanned<CanaryFile>,
        names: &HashMap<String, BackendId>,
        backend: Option<BackendId>,
    ) -> Option<Canary> {
        let c = c.get_ref();
        let id = self.backend_ref(&c.backend, names, "canary.backend")?;
        if Some(id) == backend {
            self.err(
                c.backend.span(),
                "`canary.backend` is the route's own backend".into(),
            );
        }
        let percent = self.percent(&c.percent, "canary.percent");
        let sticky = match &c.sticky {
            None => Sticky::Random,
            Some(s) => self.sticky(s)?,
        };
        Some(Canary {
            backend: id,
            percent,
            sticky,
        })
    }

    fn sticky(&mut self, s: &Spanned<String>) -> Option<Sticky> {
        let text = s.get_ref();
        // Every request of a route has the same `route` key: it would never split.
        let sticky = RequestKey::parse(text)
            .filter(|k| *k != RequestKey::Route)
            .map(Sticky::Key);
        if sticky.is_none() {
            self.err(
                s.span(),
                format!(
                    "`canary.sticky` {text:?}: expected \"header:NAME\", \"cookie:NAME\" (a token), \"claim:NAME\" or \"ip\""
                ),
            );
        }
        sticky
    }

    pub(super) fn compare(&mut self, c: Option<&CompareFile>) -> Compare {
        let mut out = Compare {
            ignore: vec![],
            headers: vec![http::header::CONTENT_TYPE],
            noise: false,
            max_body: DEFAULT_COMPARE_MAX_BODY,
            tolerance: 0.0,
            min_comparisons: DEFAULT_GATE_MIN_COMPARISONS,
            max_mismatch_rate: DEFAULT_GATE_MAX_MISMATCH_RATE,
        };
        let Some(c) = c else { return out };
        for p in c.ignore.iter().flatten() {
            let text = p.get_ref();
            let ok = text.starts_with('/')
                || text
                    .strip_prefix("header:")
                    .is_some_and(|h| HeaderName::from_bytes(h.as_bytes()).is_ok());
            if !ok {
                self.err(p.span(), format!("`compare.ignore` {text:?}: expected a JSON pointer such as \"/meta/generated_at\" or \"header:NAME\""));
            }
            out.ignore.push(crate::compare::Pattern::parse(text));
        }
        if let Some(headers) = &c.headers {
            out.headers = headers
                .iter()
                .filter_map(|h| match HeaderName::from_bytes(h.get_ref().as_bytes()) {
                    Ok(n) => Some(n),
                    Err(_) => {
                        self.err(
                            h.span(),
                            format!("`compare.headers`: {:?} is not a header name", h.get_ref()),
                        );
                        None
                    }
                })
                .collect();
        }
        out.noise = c.noise.unwrap_or(false);
        out.max_body = self.size(
            c.max_body.as_ref(),
            "compare.max_body",
            DEFAULT_COMPARE_MAX_BODY,
        );
        if let Some(t) = &c.tolerance {
            if !t.get_ref().is_finite() || *t.get_ref() < 0.0 {
                self.err(
                    t.span(),
                    format!(
                        "`compare.tolerance` must be a number >= 0, got {}",
                        t.get_ref()
                    ),
                );
            }
            out.tolerance = t.get_ref().max(0.0);
        }
        if let Some(g) = &c.gate {
            let g = g.get_ref();
            out.min_comparisons = self.count(&g.min_comparisons, "gate.min_comparisons", 1);
            out.max_mismatch_rate = self.rate(&g.max_mismatch_rate, "gate.max_mismatch_rate");
        }
        out
    }

    pub(super) fn guard(
        &mut self,
        g: &Spanned<GuardFile>,
        names: &HashMap<String, BackendId>,
        legacy: Option<BackendId>,
    ) -> Option<Guard> {
        let span = g.span();
        let g = g.get_ref();
        let max_error_rate = self.rate(&g.max_error_rate, "guard.max_error_rate");
        let window = self.duration(g.window.as_ref(), "guard.window", DEFAULT_GUARD_WINDOW);
        let min_requests = g
            .min_requests
            .as_ref()
            .map_or(DEFAULT_GUARD_MIN_REQUESTS as u64, |m| {
                self.count(m, "guard.min_requests", 1)
            });
        let to = match &g.to {
            Some(t) => self.backend_ref(t, names, "guard.to")?,
            None => {
                match legacy {
                    Some(l) => l,
                    None => {
                        self.err(span, "`[routes.guard]` needs `to`: there is no legacy backend to roll back to".into());
                        return None;
                    }
                }
            }
        };
        Some(Guard {
            max_error_rate,
            window,
            min_requests,
            to,
        })
    }

    pub(super) fn table_warnings(&mut self, table: &RouteTable) {
        if !table.has_catch_all() {
            self.warnings.push(Diagnostic {
                line: 1,
                col: 1,
                message: "no route without filters catches `/`: requests outside every prefix get 404 no_route".into(),
            });
        }
        for (hidden, by) in table.hidden_routes() {
            let (h, b) = (table.route(hidden), table.route(by));
            self.warnings.push(Diagnostic {
                line: h.line,
                col: 1,
                message: format!("route `{}` can never match: the route on line {} accepts every request it would", h.prefix, b.line),
            });
        }
        for id in table.route_ids() {
            let route = table.route(id);
            if route.guard.is_some()
                && Some(route.backend) == table.legacy()
                && route.canary.is_none()
            {
                self.warnings.push(Diagnostic {
                    line: route.line,
                    col: 1,
                    message: format!("route `{}` ({}) has a guard, but the legacy backend answers it: the guard watches new backends only", route.prefix, table.stage(id)),
                });
            }
        }
    }
}

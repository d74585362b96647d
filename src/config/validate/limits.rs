//! A route's `rate_limit` windows and `stale_if_error`; `[ratelimit_store]` and
//! `[server] stale_store_size`.

use toml::Spanned;

use super::*;
use crate::config::file::{RateLimitFile, RateLimitStoreFile, RateLimitsFile, StaleFile};
use crate::config::{OnStoreError, RateLimitStore};
use crate::routes::{RateLimit, RequestKey, Stale};

/// Keys a window tracks at most, per replica.
const DEFAULT_MAX_KEYS: i64 = 100_000;
/// The longest window: bucket times are u64 nanoseconds, and a longer `per` is no rate.
const MAX_PER: Duration = Duration::from_secs(31_557_600);
/// A global limit's budget for its round trip to Redis.
const DEFAULT_STORE_TIMEOUT: Duration = Duration::from_millis(50);
/// Stored answers, all routes together.
pub(super) const DEFAULT_STALE_STORE_SIZE: u64 = 64 << 20;
/// The largest answer stored by default.
const DEFAULT_MAX_ENTRY: u64 = 1 << 20;
/// What triggers a stale answer by default.
const DEFAULT_STALE_STATUSES: [u16; 4] = [500, 502, 503, 504];
/// Request headers that may never key a stored copy (credentials; the proxy's own).
const UNVARYABLE: [&str; 4] = ["authorization", "cookie", "x-request-id", "traceparent"];

impl Ctx {
    /// A route's `rate_limit`: one window, or several `[[routes.rate_limit]]` with names.
    pub(super) fn rate_limits(
        &mut self,
        f: &Spanned<RateLimitsFile>,
        has_auth: bool,
        store: bool,
    ) -> Vec<RateLimit> {
        let windows: Vec<(&RateLimitFile, Range<usize>)> = match f.get_ref() {
            RateLimitsFile::One(w) => vec![(w, f.span())],
            RateLimitsFile::Many(list) => {
                if list.is_empty() {
                    self.err(f.span(), "`rate_limit` is an empty list".into());
                }
                list.iter().map(|w| (w.get_ref(), w.span())).collect()
            }
        };
        let several = windows.len() > 1;
        let mut out: Vec<RateLimit> = Vec::new();
        for (w, span) in windows {
            let name = match &w.name {
                Some(n) => {
                    let ok = !n.get_ref().is_empty()
                        && n.get_ref()
                            .bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b"_-.".contains(&b));
                    if !ok {
                        self.err(
                            n.span(),
                            format!(
                                "`rate_limit.name` {:?} must be made of [A-Za-z0-9_.-]",
                                n.get_ref()
                            ),
                        );
                    }
                    n.get_ref().clone()
                }
                None if several => {
                    self.err(
                        span.clone(),
                        "each of several `[[routes.rate_limit]]` windows needs a `name`".into(),
                    );
                    String::new()
                }
                None => "default".to_string(),
            };
            if out.iter().any(|o| o.name == name) && !name.is_empty() {
                let at = w.name.as_ref().map_or(span.clone(), Spanned::span);
                self.err(at, format!("`rate_limit`: two windows named {name:?}"));
            }
            if let Some(limit) = self.window(w, name, has_auth, store) {
                out.push(limit);
            }
        }
        out
    }

    fn window(
        &mut self,
        w: &RateLimitFile,
        name: String,
        has_auth: bool,
        store: bool,
    ) -> Option<RateLimit> {
        let limit = self.count(&w.limit, "rate_limit.limit", 1);
        let per = self.duration(Some(&w.per), "rate_limit.per", Duration::from_secs(1));
        let burst = w
            .burst
            .as_ref()
            .map_or(limit, |b| self.count(b, "rate_limit.burst", 1));
        // The window's arithmetic divides `per` by a u32 and keeps times in u64 nanoseconds.
        if limit > u64::from(u32::MAX) {
            self.err(
                w.limit.span(),
                format!(
                    "`rate_limit.limit` must be at most {}, got {limit}",
                    u32::MAX
                ),
            );
        } else if per.as_nanos() / u128::from(limit.max(1)) < 1_000 {
            self.err(
                w.limit.span(),
                "`rate_limit`: more than a million requests per second is not a limit".into(),
            );
        }
        if per > MAX_PER {
            self.err(
                w.per.span(),
                format!(
                    "`rate_limit.per` must be at most a year ({}), got {}",
                    humantime::format_duration(MAX_PER),
                    humantime::format_duration(per)
                ),
            );
        }
        // A bad key is reported and the window's other keys are still checked.
        let key = match &w.key {
            None => Some(RequestKey::Client),
            Some(k) => self.limit_key(k, has_auth),
        };
        let dry_run = match w.mode.as_ref().map(|m| m.get_ref().as_str()) {
            None | Some("enforce") => false,
            Some("dry_run") => true,
            Some(other) => {
                let span = w.mode.as_ref().map_or(0..0, Spanned::span);
                self.err(
                    span,
                    format!("`rate_limit.mode` {other:?}: expected \"enforce\" or \"dry_run\""),
                );
                false
            }
        };
        let max_keys = w.max_keys.as_ref().map_or(DEFAULT_MAX_KEYS as u64, |m| {
            self.count(m, "rate_limit.max_keys", 1)
        }) as usize;
        let global = match w.scope.as_ref().map(|s| s.get_ref().as_str()) {
            None | Some("replica") => false,
            Some("global") => {
                if !store {
                    let span = w.scope.as_ref().map_or(0..0, Spanned::span);
                    self.err(
                        span,
                        "`rate_limit.scope = \"global\"` needs a `[ratelimit_store]` (Redis) to count in".into(),
                    );
                }
                true
            }
            Some(other) => {
                let span = w.scope.as_ref().map_or(0..0, Spanned::span);
                self.err(
                    span,
                    format!("`rate_limit.scope` {other:?}: expected \"replica\" or \"global\""),
                );
                false
            }
        };
        Some(RateLimit {
            name,
            limit,
            per,
            burst,
            key: key?,
            dry_run,
            max_keys,
            global,
        })
    }

    fn limit_key(&mut self, k: &Spanned<String>, has_auth: bool) -> Option<RequestKey> {
        let text = k.get_ref();
        let key = RequestKey::parse(text);
        match &key {
            None => self.err(
                k.span(),
                format!("`rate_limit.key` {text:?}: {}", crate::routes::KEY_EXPECTED),
            ),
            Some(RequestKey::Claim(c)) if !has_auth => self.err(
                k.span(),
                format!("`rate_limit.key` \"claim:{c}\" needs `auth` on the route: claims come from a verified token"),
            ),
            Some(_) => {}
        }
        key
    }

    /// A route's `stale_if_error`.
    pub(super) fn stale(&mut self, f: &Spanned<StaleFile>, has_auth: bool) -> Option<Stale> {
        let s = f.get_ref();
        let max_stale = self.duration(
            Some(&s.max_stale),
            "stale_if_error.max_stale",
            Duration::from_secs(60),
        );
        let max_entry = self.size(
            s.max_entry.as_ref(),
            "stale_if_error.max_entry",
            DEFAULT_MAX_ENTRY,
        );
        let (mut on_connect, mut on_timeout, mut on_status) = (false, false, vec![]);
        match &s.on {
            None => {
                (on_connect, on_timeout) = (true, true);
                on_status = DEFAULT_STALE_STATUSES.to_vec();
            }
            Some(list) => {
                if list.get_ref().is_empty() {
                    self.err(
                        list.span(),
                        "`stale_if_error.on` is empty: nothing would trigger it".into(),
                    );
                }
                for v in list.get_ref() {
                    match v.get_ref().as_str() {
                        "connect" => on_connect = true,
                        "timeout" => on_timeout = true,
                        code => match code.parse::<u16>() {
                            Ok(c) if (500..600).contains(&c) => on_status.push(c),
                            _ => self.err(
                                v.span(),
                                format!("`stale_if_error.on` {code:?}: expected \"connect\", \"timeout\" or a 5xx status such as \"503\" (a 4xx is the client's answer, never replaced)"),
                            ),
                        },
                    }
                }
            }
        }
        let mut vary = Vec::new();
        for v in s.vary.as_ref().map(Spanned::get_ref).into_iter().flatten() {
            match HeaderName::from_bytes(v.get_ref().as_bytes()) {
                Ok(h) if UNVARYABLE.contains(&h.as_str()) => self.err(
                    v.span(),
                    format!("`stale_if_error.vary`: {h} cannot key stored copies (credentials go through `per_user`)"),
                ),
                Ok(h) => vary.push(h),
                Err(_) => self.err(
                    v.span(),
                    format!("`stale_if_error.vary`: {:?} is not a header name", v.get_ref()),
                ),
            }
        }
        let per_user = s.per_user.as_ref().and_then(|p| {
            match p.get_ref().strip_prefix("claim:").filter(|c| !c.is_empty()) {
                Some(claim) if has_auth => Some(claim.to_string()),
                Some(_) => {
                    self.err(p.span(), "`stale_if_error.per_user` needs `auth` on the route: copies are keyed by a verified claim".into());
                    None
                }
                None => {
                    self.err(
                        p.span(),
                        format!("`stale_if_error.per_user` {:?}: expected \"claim:NAME\" (e.g. \"claim:sub\")", p.get_ref()),
                    );
                    None
                }
            }
        });
        Some(Stale {
            max_stale,
            max_entry,
            on_connect,
            on_timeout,
            on_status,
            vary,
            per_user,
        })
    }

    /// `[ratelimit_store]`: the Redis URL from the environment, never inline.
    pub(super) fn ratelimit_store(
        &mut self,
        f: RateLimitStoreFile,
        at: Range<usize>,
    ) -> Option<RateLimitStore> {
        if let Some(u) = &f.url {
            self.err(
                u.span(),
                "[ratelimit_store] `url`: the URL may carry a password and routes.toml is often a ConfigMap in git; use `url_env = \"VAR\"`".into(),
            );
        }
        let timeout = self.duration(
            f.timeout.as_ref(),
            "ratelimit_store.timeout",
            DEFAULT_STORE_TIMEOUT,
        );
        let on_error = match f.on_error.as_ref().map(|o| o.get_ref().as_str()) {
            None | Some("local") => OnStoreError::Local,
            Some("allow") => OnStoreError::Allow,
            Some("deny") => OnStoreError::Deny,
            Some(other) => {
                let span = f.on_error.as_ref().map_or(at.clone(), Spanned::span);
                self.err(
                    span,
                    format!("[ratelimit_store] `on_error` {other:?}: expected \"local\", \"allow\" or \"deny\""),
                );
                OnStoreError::Local
            }
        };
        let Some(var) = &f.url_env else {
            self.err(
                at,
                "[ratelimit_store] needs `url_env`: the variable holding the redis:// URL".into(),
            );
            return None;
        };
        let url = std::env::var(var.get_ref()).unwrap_or_default();
        if !(url.starts_with("redis://") || url.starts_with("rediss://")) {
            let why = if url.is_empty() {
                "is unset or empty"
            } else {
                "does not hold a redis:// or rediss:// URL"
            };
            self.err(
                var.span(),
                format!("[ratelimit_store] `url_env`: {} {why}", var.get_ref()),
            );
            return None;
        }
        Some(RateLimitStore {
            url,
            url_env: var.get_ref().clone(),
            timeout,
            on_error,
        })
    }
}

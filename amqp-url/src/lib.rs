//! `amqp://user:pass@host:port/vhost?heartbeat=N`, the AMQP URI scheme RabbitMQ documents,
//! parsed once at start by both the proxy (`[events]`) and users-service (its consumer).
//! `amqps://` (TLS) is refused with a clear error: the AMQP client here (amqprs, built
//! without its TLS feature) speaks plain AMQP 0-9-1 only. Errors never repeat the URL (it
//! may hold a password), and neither do `Display` and `Debug`.

use amqprs::connection::OpenConnectionArguments;

/// A broker address.
#[derive(Clone, PartialEq, Eq)]
pub struct AmqpUrl {
    pub host: String,
    pub port: u16,
    pub user: String,
    pub password: String,
    pub vhost: String,
    /// `?heartbeat=SECONDS`, when given.
    pub heartbeat: Option<u16>,
}

/// `amqp://USER@HOST:PORT/VHOST`, without the password.
impl std::fmt::Display for AmqpUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        let vhost = self.vhost.replace('%', "%25").replace('/', "%2f");
        write!(f, "amqp://{}@{host}:{}/{vhost}", self.user, self.port)
    }
}

impl std::fmt::Debug for AmqpUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{self}")
    }
}

impl AmqpUrl {
    /// Parses an `amqp://` URL; the error says what is wrong, as a phrase ("not an amqp://
    /// URL"), never echoing the URL.
    pub fn parse(url: &str) -> Result<AmqpUrl, String> {
        let bad = |why: &str| Err(why.to_string());
        let rest = if let Some(r) = url.strip_prefix("amqp://") {
            r
        } else if url.starts_with("amqps://") {
            return bad("an amqps:// URL: TLS to the broker is not supported by this build; use amqp:// (the broker on a private network, or a local TLS sidecar)");
        } else {
            return bad("not an amqp:// URL");
        };
        let (rest, query) = match rest.split_once('?') {
            Some((r, q)) => (r, Some(q)),
            None => (rest, None),
        };
        if rest.contains('#') {
            return bad("a URL with a #fragment");
        }
        let (authority, path) = match rest.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (rest, None),
        };
        let (userinfo, hostport) = match authority.rsplit_once('@') {
            Some((u, h)) => (Some(u), h),
            None => (None, authority),
        };
        let (user, password) = match userinfo {
            None => ("guest".to_string(), "guest".to_string()),
            Some(u) => {
                let (name, pass) = u.split_once(':').unwrap_or((u, ""));
                let Some(name) = percent_decode(name) else {
                    return bad("a URL whose user name has a bad %-escape");
                };
                let Some(pass) = percent_decode(pass) else {
                    return bad("a URL whose password has a bad %-escape");
                };
                (name, pass)
            }
        };
        let (host, port) = if let Some(v6) = hostport.strip_prefix('[') {
            let Some((h, after)) = v6.split_once(']') else {
                return bad("a URL whose IPv6 host has no closing ]");
            };
            (h.to_string(), after.strip_prefix(':'))
        } else {
            match hostport.rsplit_once(':') {
                Some((h, p)) => (h.to_string(), Some(p)),
                None => (hostport.to_string(), None),
            }
        };
        if host.is_empty() {
            return bad("a URL without a host");
        }
        let port = match port {
            None | Some("") => 5672,
            Some(p) => match p.parse::<u16>() {
                Ok(p) if p > 0 => p,
                _ => return bad("a URL whose port is not a number from 1 to 65535"),
            },
        };
        let vhost = match path {
            None | Some("") => "/".to_string(),
            Some(p) if p.contains('/') => {
                return bad("a URL whose vhost is more than one path segment (%2f for /)")
            }
            Some(p) => match percent_decode(p) {
                Some(v) => v,
                None => return bad("a URL whose vhost has a bad %-escape"),
            },
        };
        let mut heartbeat = None;
        for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
            match pair.split_once('=') {
                Some(("heartbeat", v)) => match v.parse::<u16>() {
                    Ok(s) => heartbeat = Some(s),
                    Err(_) => return bad("a URL whose heartbeat is not a number of seconds"),
                },
                _ => return bad("a URL with a query parameter other than heartbeat=SECONDS"),
            }
        }
        Ok(AmqpUrl {
            host,
            port,
            user,
            password,
            vhost,
            heartbeat,
        })
    }

    /// amqprs's connection arguments, naming the connection `name` (shown by the broker's
    /// management tools); the heartbeat is the URL's, else `default_heartbeat` seconds.
    pub fn open_args(&self, name: &str, default_heartbeat: u16) -> OpenConnectionArguments {
        OpenConnectionArguments::new(&self.host, self.port, &self.user, &self.password)
            .virtual_host(&self.vhost)
            .connection_name(name)
            .heartbeat(self.heartbeat.unwrap_or(default_heartbeat))
            .finish()
    }
}

/// `%XX` escapes decoded; `None` for a malformed escape or bytes that are not UTF-8.
fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn parses_the_documented_forms() {
        let u = AmqpUrl::parse("amqp://app:s%40cret@broker.internal:5673/%2f").unwrap();
        assert_eq!(
            (
                u.user.as_str(),
                u.password.as_str(),
                u.host.as_str(),
                u.port,
                u.vhost.as_str()
            ),
            ("app", "s@cret", "broker.internal", 5673, "/")
        );
        assert_eq!(u.to_string(), "amqp://app@broker.internal:5673/%2f");
        let u = AmqpUrl::parse("amqp://localhost").unwrap();
        assert_eq!(
            (u.user.as_str(), u.port, u.vhost.as_str()),
            ("guest", 5672, "/")
        );
        let u = AmqpUrl::parse("amqp://u%40x:p%3Ass@rabbit/prod?heartbeat=10").unwrap();
        assert_eq!((u.user.as_str(), u.password.as_str()), ("u@x", "p:ss"));
        assert_eq!((u.vhost.as_str(), u.heartbeat), ("prod", Some(10)));
        let u = AmqpUrl::parse("amqp://u:hunter2@[::1]:5000/fittrack").unwrap();
        assert_eq!((u.host.as_str(), u.vhost.as_str()), ("::1", "fittrack"));
        assert_eq!(u.to_string(), "amqp://u@[::1]:5000/fittrack");
        assert!(
            !format!("{u} {u:?}").contains("hunter2"),
            "the password is never shown"
        );
    }

    #[test]
    fn refuses_garbage_with_a_reason_that_does_not_repeat_it() {
        for bad in [
            "",
            "http://x",
            "amqps://x",
            "amqp://",
            "amqp://h:0",
            "amqp://h:99999",
            "amqp://h:port",
            "amqp://h/%zz",
            "amqp://u:%zz@h",
            "amqp://h/a/b",
            "amqp://[::1/x",
            "amqp://h/v?frame_max=5",
            "amqp://h/v?heartbeat=soon",
            "amqp://h/v#top",
        ] {
            let err = AmqpUrl::parse(bad).unwrap_err();
            assert!(
                !err.is_empty() && (bad.len() < 8 || !err.contains(bad)),
                "{bad}: {err}"
            );
        }
    }
}

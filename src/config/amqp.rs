//! `amqp://user:pass@host:port/vhost`, the AMQP URI scheme RabbitMQ documents, parsed once at
//! start. TLS (`amqps://`) is refused with a clear error: this build's client speaks plain
//! AMQP only (see the README: a local TLS sidecar, or the broker on the pod network).

/// A broker address. Never printed with its password.
#[derive(Clone, PartialEq, Eq)]
pub struct AmqpUrl {
    pub host: String,
    pub port: u16,
    pub user: String,
    pub password: String,
    pub vhost: String,
}

impl std::fmt::Debug for AmqpUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{self}")
    }
}

/// `amqp://USER@HOST:PORT/VHOST`, without the password.
impl std::fmt::Display for AmqpUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "amqp://{}@{}:{}/{}",
            self.user,
            self.host,
            self.port,
            self.vhost.replace('/', "%2f")
        )
    }
}

impl AmqpUrl {
    /// Parses an `amqp://` URL; the error says what is wrong (never echoing the URL, which
    /// may hold a password).
    pub fn parse(url: &str) -> Result<AmqpUrl, String> {
        if url.starts_with("amqps://") {
            return Err("holds an amqps:// URL: TLS to the broker is not supported by this build; use amqp:// (a TLS sidecar, or the broker on a private network)".into());
        }
        let Some(rest) = url.strip_prefix("amqp://") else {
            return Err("does not hold an amqp:// URL".into());
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], Some(&rest[i + 1..])),
            None => (rest, None),
        };
        if rest.contains(['?', '#']) {
            return Err("holds a URL with a query or fragment, which are not supported".into());
        }
        let (userinfo, hostport) = match authority.rfind('@') {
            Some(i) => (Some(&authority[..i]), &authority[i + 1..]),
            None => (None, authority),
        };
        let (user, password) = match userinfo {
            None => ("guest".to_string(), "guest".to_string()),
            Some(u) => {
                let (user, pass) = u.split_once(':').unwrap_or((u, ""));
                (decode(user)?, decode(pass)?)
            }
        };
        let (host, port) = if let Some(v6) = hostport.strip_prefix('[') {
            let Some((h, after)) = v6.split_once(']') else {
                return Err("holds a URL with an unclosed [IPv6] host".into());
            };
            (h.to_string(), after.strip_prefix(':'))
        } else {
            match hostport.rsplit_once(':') {
                Some((h, p)) => (h.to_string(), Some(p)),
                None => (hostport.to_string(), None),
            }
        };
        if host.is_empty() {
            return Err("holds a URL without a host".into());
        }
        let port = match port {
            None | Some("") => 5672,
            Some(p) => p
                .parse::<u16>()
                .ok()
                .filter(|&p| p > 0)
                .ok_or("holds a URL whose port is not a number from 1 to 65535")?,
        };
        let vhost = match path {
            None | Some("") => "/".to_string(),
            Some(p) => decode(p)?,
        };
        Ok(AmqpUrl {
            host,
            port,
            user,
            password,
            vhost,
        })
    }
}

/// Percent-decoding of one URL component.
fn decode(s: &str) -> Result<String, String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or("holds a URL with a bad %-escape")?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| "holds a URL whose %-escapes are not UTF-8".to_string())
}

#[cfg(test)]
mod tests {
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
        let u = AmqpUrl::parse("amqp://localhost").unwrap();
        assert_eq!(
            (u.user.as_str(), u.port, u.vhost.as_str()),
            ("guest", 5672, "/")
        );
        let u = AmqpUrl::parse("amqp://u:p@[::1]:5672/fittrack").unwrap();
        assert_eq!((u.host.as_str(), u.vhost.as_str()), ("::1", "fittrack"));
        assert!(
            !format!("{u} {u:?}").contains(":p@"),
            "the password is never shown"
        );
    }

    #[test]
    fn refuses_garbage_with_a_reason() {
        for bad in [
            "",
            "http://x",
            "amqps://x",
            "amqp://",
            "amqp://h:0",
            "amqp://h:99999",
            "amqp://h:port",
            "amqp://h/%zz",
            "amqp://[::1/x",
            "amqp://h/v?heartbeat=5",
        ] {
            let err = AmqpUrl::parse(bad).unwrap_err();
            assert!(!err.is_empty(), "{bad}");
        }
    }
}

//! `tls` on the server and on backends, and `protocol` on backends. The files named are read
//! here (through `Ctx::files`), so a missing or broken certificate is an error of the file
//! that names it, at the key that names it.

use std::ops::Range;
use std::path::PathBuf;

use rustls_pki_types::ServerName;

use super::*;
use crate::config::file::TlsFile;
use crate::routes::Protocol;
use crate::tls::{self, ClientAuth, ClientTls, ServerTls, ServerTlsFiles};

impl Ctx {
    fn path(&self, v: &Spanned<String>) -> PathBuf {
        self.dir.join(v.get_ref())
    }

    /// Reports each load error at the key naming the file at fault (`at` when none is).
    fn file_errors(
        &mut self,
        section: &str,
        errors: Vec<tls::TlsError>,
        keys: &[(Range<usize>, PathBuf)],
        at: Range<usize>,
    ) {
        for e in errors {
            let span = keys
                .iter()
                .find(|(_, p)| e.path.as_ref() == Some(p))
                .map_or_else(|| at.clone(), |(s, _)| s.clone());
            self.err(span, format!("{section}`tls`: {e}"));
        }
    }

    /// Keys of `tls` that do not belong on this side (`keys` are the ones that do).
    fn foreign(&mut self, t: &TlsFile, keys: &[&str], hint: &str) {
        let spans = [
            ("cert", t.cert.as_ref().map(Spanned::span)),
            ("key", t.key.as_ref().map(Spanned::span)),
            ("ca", t.ca.as_ref().map(Spanned::span)),
            ("client_ca", t.client_ca.as_ref().map(Spanned::span)),
            ("client_auth", t.client_auth.as_ref().map(Spanned::span)),
            ("server_name", t.server_name.as_ref().map(Spanned::span)),
            ("sni", t.sni.as_ref().map(Spanned::span)),
        ];
        for (key, span) in spans {
            if let (Some(span), false) = (span, keys.contains(&key)) {
                self.err(
                    span,
                    format!("`tls.{key}` {hint}; expected {}", keys.join(", ")),
                );
            }
        }
    }

    /// `[server] tls`: the listener's certificates, loaded.
    pub(super) fn server_tls(
        &mut self,
        t: &Spanned<TlsFile>,
    ) -> (Option<ServerTlsFiles>, Option<ServerTls>) {
        let (at, f) = (t.span(), t.get_ref());
        self.foreign(
            f,
            &["cert", "key", "sni", "client_ca", "client_auth"],
            "is not a listener setting",
        );
        let (Some(cert), Some(key)) = (&f.cert, &f.key) else {
            self.err(
                at,
                "`tls` needs both `cert` (PEM chain) and `key` (PEM private key)".into(),
            );
            return (None, None);
        };
        let mut keys = vec![];
        let mut pairs = vec![];
        let mut pair = |cx: &Ctx, c: &Spanned<String>, k: &Spanned<String>| {
            let (cp, kp) = (cx.path(c), cx.path(k));
            keys.push((c.span(), cp.clone()));
            keys.push((k.span(), kp.clone()));
            pairs.push((cp, kp));
        };
        pair(self, cert, key);
        for p in f.sni.iter().flat_map(|l| l.get_ref()) {
            pair(self, &p.get_ref().cert, &p.get_ref().key);
        }
        let client_ca = f.client_ca.as_ref().map(|c| {
            keys.push((c.span(), self.path(c)));
            self.path(c)
        });
        let client_auth = match (&f.client_auth, &client_ca) {
            (None, _) => ClientAuth::Required,
            (Some(a), None) => {
                self.err(a.span(), "`tls.client_auth` needs `tls.client_ca`, the CA that signs client certificates".into());
                ClientAuth::Required
            }
            (Some(a), Some(_)) => {
                match a.get_ref().as_str() {
                    "required" => ClientAuth::Required,
                    "optional" => ClientAuth::Optional,
                    other => {
                        self.err(
                        a.span(),
                        format!("`tls.client_auth` {other:?}: expected \"required\" or \"optional\""),
                    );
                        ClientAuth::Required
                    }
                }
            }
        };
        let spec = ServerTlsFiles {
            pairs,
            client_ca,
            client_auth,
        };
        match tls::load_server(&spec, &mut self.files) {
            Ok(loaded) => (Some(spec), Some(loaded)),
            Err(errors) => {
                self.file_errors("", errors, &keys, at);
                (Some(spec), None)
            }
        }
    }

    /// `[backends.NAME] protocol`.
    pub(super) fn protocol(
        &mut self,
        name: &str,
        v: Option<&Spanned<String>>,
        https: bool,
    ) -> Protocol {
        let Some(v) = v else { return Protocol::Http1 };
        match v.get_ref().as_str() {
            "http1" | "http/1.1" => Protocol::Http1,
            "h2" => Protocol::H2,
            "h2c" if !https => Protocol::H2,
            "h2c" => {
                self.err(v.span(), format!("[backends.{name}] `protocol` \"h2c\" is cleartext HTTP/2 but the url is https://; use \"h2\""));
                Protocol::H2
            }
            other => {
                self.err(
                    v.span(),
                    format!("[backends.{name}] `protocol` {other:?}: expected \"http1\", \"h2\" or \"h2c\""),
                );
                Protocol::Http1
            }
        }
    }

    /// The client side of an `https://` backend; `tls` on an `http://` one is an error.
    pub(super) fn backend_tls(
        &mut self,
        name: &str,
        t: Option<&Spanned<TlsFile>>,
        uri: &Uri,
        url_span: Range<usize>,
        protocol: Protocol,
    ) -> Option<ClientTls> {
        let https = uri.scheme_str() == Some("https");
        if !https {
            if let Some(t) = t {
                self.err(
                    t.span(),
                    format!("[backends.{name}] `tls` applies to https:// URLs; this backend's url is http://"),
                );
            }
            return None;
        }
        let empty = TlsFile {
            cert: None,
            key: None,
            ca: None,
            client_ca: None,
            client_auth: None,
            server_name: None,
            sni: None,
        };
        let (at, f) = t.map_or((url_span, &empty), |t| (t.span(), t.get_ref()));
        self.foreign(
            f,
            &["ca", "cert", "key", "server_name"],
            &format!("is not a backend setting in [backends.{name}]"),
        );
        let host = uri.host().unwrap_or_default();
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let named = f.server_name.as_ref();
        let server_name = match ServerName::try_from(named.map_or(host, |n| n.get_ref().as_str())) {
            Ok(n) => n.to_owned(),
            Err(e) => {
                let span = named.map_or(at.clone(), Spanned::span);
                self.err(
                    span,
                    format!(
                        "[backends.{name}] `tls.server_name`: not a DNS name or IP address ({e})"
                    ),
                );
                return None;
            }
        };
        let mut keys = vec![];
        let ca = f.ca.as_ref().map(|c| {
            keys.push((c.span(), self.path(c)));
            self.path(c)
        });
        let identity = match (&f.cert, &f.key) {
            (Some(c), Some(k)) => {
                keys.push((c.span(), self.path(c)));
                keys.push((k.span(), self.path(k)));
                Some((self.path(c), self.path(k)))
            }
            (None, None) => None,
            (Some(one), None) | (None, Some(one)) => {
                self.err(one.span(), format!("[backends.{name}] a client certificate needs both `tls.cert` and `tls.key`"));
                return None;
            }
        };
        let alpn = match protocol {
            Protocol::H2 => tls::ALPN_H2,
            Protocol::Http1 => tls::ALPN_HTTP11,
        };
        let spec = tls::ClientTlsFiles {
            ca: ca.as_deref(),
            identity: identity.as_ref().map(|(c, k)| (c.as_path(), k.as_path())),
            server_name,
            alpn,
        };
        match tls::load_client(&spec, &mut self.files) {
            Ok(c) => Some(c),
            Err(e) => {
                self.file_errors(&format!("[backends.{name}] "), vec![e], &keys, at);
                None
            }
        }
    }
}

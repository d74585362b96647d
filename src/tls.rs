//! TLS material, read from PEM files: the listener's certificates (several, chosen by SNI),
//! its optional client-certificate check, and the client side of `https://` backends (their
//! roots, an optional client certificate for mTLS, the name they are verified against).
//!
//! Files are read while routes.toml is validated, so `strangler check` and a reload see the
//! same errors, and every file read goes into [`Files`]: the list the watcher follows and the
//! fingerprint that tells a reload whether a certificate changed on disk.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use sha2::{Digest, Sha256};

/// The listener's TLS configuration, swapped when its certificate files change.
pub type TlsConfig = Arc<arc_swap::ArcSwap<ServerConfig>>;

/// ALPN ids.
pub const ALPN_H2: &[u8] = b"h2";
pub const ALPN_HTTP11: &[u8] = b"http/1.1";

/// The one crypto provider (ring): no process-wide default is installed or needed.
pub fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER
        .get_or_init(|| Arc::new(rustls::crypto::ring::default_provider()))
        .clone()
}

/// Why TLS could not be set up: what is wrong, and the file at fault when one is (the
/// validator reports the error at the key that names that file).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{message}")]
pub struct TlsError {
    pub path: Option<PathBuf>,
    pub message: String,
}

impl TlsError {
    fn at(path: &Path, message: String) -> Self {
        TlsError {
            path: Some(path.to_path_buf()),
            message,
        }
    }

    fn general(message: String) -> Self {
        TlsError {
            path: None,
            message,
        }
    }
}

/// Every file the configuration read, in order, with a digest of its content.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Files {
    entries: Vec<(PathBuf, [u8; 32])>,
}

impl Files {
    /// Reads `path`, recording it; the error names the file.
    pub fn read(&mut self, path: &Path) -> Result<Vec<u8>, TlsError> {
        let bytes = std::fs::read(path)
            .map_err(|e| TlsError::at(path, format!("cannot read {}: {e}", path.display())))?;
        self.entries
            .push((path.to_path_buf(), Sha256::digest(&bytes).into()));
        Ok(bytes)
    }

    /// Records what `other` read, after what this one did.
    pub fn extend(&mut self, other: &Files) {
        self.entries.extend(other.entries.iter().cloned());
    }

    pub fn paths(&self) -> impl Iterator<Item = &Path> {
        self.entries.iter().map(|(p, _)| p.as_path())
    }

    /// The files whose content differs between `old` and this set, or that only one of them
    /// read: this set's order first, then what only `old` read. Each path once.
    pub fn changed<'a>(&'a self, old: &'a Files) -> Vec<&'a Path> {
        let digest = |files: &Files, path: &Path| {
            files
                .entries
                .iter()
                .find(|(p, _)| p == path)
                .map(|(_, d)| *d)
        };
        let mut changed: Vec<&Path> = Vec::new();
        for path in self.paths().chain(old.paths()) {
            if digest(self, path) != digest(old, path) && !changed.contains(&path) {
                changed.push(path);
            }
        }
        changed
    }

    /// Hex SHA-256 over every file read (path and content); `""` when none was.
    pub fn fingerprint(&self) -> String {
        if self.entries.is_empty() {
            return String::new();
        }
        let mut h = Sha256::new();
        for (path, digest) in &self.entries {
            let p = path.as_os_str().as_encoded_bytes();
            h.update((p.len() as u64).to_le_bytes());
            h.update(p);
            h.update(digest);
        }
        hex(&h.finalize())
    }

    /// The same files read again now; an unreadable one gets a digest of its error, so it
    /// counts as changed.
    pub fn reread(&self) -> Files {
        let entries = self
            .entries
            .iter()
            .map(|(p, _)| {
                let digest = match std::fs::read(p) {
                    Ok(bytes) => Sha256::digest(&bytes),
                    Err(e) => Sha256::digest(format!("unreadable: {e}")),
                };
                (p.clone(), digest.into())
            })
            .collect();
        Files { entries }
    }
}

/// `[server] tls`: where the listener's material comes from (compared to tell whether a
/// restart is needed; the contents themselves reload live).
#[derive(Debug, Clone, PartialEq)]
pub struct ServerTlsFiles {
    /// The default certificate and key, then the extra `sni` ones, in order.
    pub pairs: Vec<(PathBuf, PathBuf)>,
    pub client_ca: Option<PathBuf>,
    pub client_auth: ClientAuth,
}

/// Whether a client certificate is demanded when `client_ca` is set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientAuth {
    Required,
    /// Asked for and verified when presented; clients without one still get in.
    Optional,
}

/// The listener's loaded TLS configuration.
#[derive(Clone)]
pub struct ServerTls {
    pub config: Arc<ServerConfig>,
    /// Of the files it was built from.
    pub fingerprint: String,
}

impl fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerTls").finish_non_exhaustive()
    }
}

/// Builds the listener's configuration (ALPN `h2`, `http/1.1`). Errors name the file.
pub fn load_server(spec: &ServerTlsFiles, all: &mut Files) -> Result<ServerTls, Vec<TlsError>> {
    let mut files = Files::default();
    let loaded = server_config(spec, &mut files)?;
    all.extend(&files);
    Ok(ServerTls {
        config: Arc::new(loaded),
        fingerprint: files.fingerprint(),
    })
}

fn server_config(spec: &ServerTlsFiles, files: &mut Files) -> Result<ServerConfig, Vec<TlsError>> {
    let mut errors = vec![];
    let mut keys = vec![];
    for (cert, key) in &spec.pairs {
        match certified_key(cert, key, files) {
            Ok((k, _)) => keys.push(Arc::new(k)),
            Err(e) => errors.push(e),
        }
    }
    let verifier = match &spec.client_ca {
        None => Ok(WebPkiClientVerifier::no_client_auth()),
        Some(ca) => roots_from("client_ca", ca, files).and_then(|roots| {
            let b = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider());
            let b = match spec.client_auth {
                ClientAuth::Required => b,
                ClientAuth::Optional => b.allow_unauthenticated(),
            };
            b.build()
                .map_err(|e| TlsError::at(ca, format!("client_ca {}: {e}", ca.display())))
        }),
    };
    let verifier = match verifier {
        Ok(v) if errors.is_empty() && !keys.is_empty() => v,
        Ok(_) => return Err(errors),
        Err(e) => {
            errors.push(e);
            return Err(errors);
        }
    };
    let default = keys.remove(0);
    let resolver = BySni {
        named: keys,
        default,
    };
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| vec![TlsError::general(format!("TLS versions: {e}"))])?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(Arc::new(resolver));
    config.alpn_protocols = vec![ALPN_H2.to_vec(), ALPN_HTTP11.to_vec()];
    Ok(config)
}

/// A certificate chain and its key, checked to belong together.
fn certified_key(
    cert: &Path,
    key: &Path,
    files: &mut Files,
) -> Result<(CertifiedKey, PrivateKeyDer<'static>), TlsError> {
    let chain = chain_from("cert", cert, files)?;
    let key_pem = files.read(key)?;
    let der = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| {
        TlsError::at(
            key,
            format!(
                "key {}: no PEM private key (PKCS#8, PKCS#1 or SEC1) found: {e}",
                key.display()
            ),
        )
    })?;
    let signing = provider()
        .key_provider
        .load_private_key(der.clone_key())
        .map_err(|e| TlsError::at(key, format!("key {}: unusable: {e}", key.display())))?;
    let ck = CertifiedKey::new(chain, signing);
    // About the key: the certificate may be fine for another key.
    ck.keys_match().map_err(|e| {
        TlsError::at(
            key,
            format!(
                "key {} does not belong to certificate {} ({e})",
                key.display(),
                cert.display()
            ),
        )
    })?;
    Ok((ck, der))
}

/// The certificates of a PEM file; `what` names the key in errors.
fn chain_from(
    what: &str,
    path: &Path,
    files: &mut Files,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = files.read(path)?;
    let fault = |message| TlsError::at(path, message);
    let chain = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| fault(format!("{what} {}: malformed PEM: {e}", path.display())))?;
    if chain.is_empty() {
        return Err(fault(format!(
            "{what} {}: no PEM certificate found (expected -----BEGIN CERTIFICATE-----)",
            path.display()
        )));
    }
    if let Some(bad) = chain
        .iter()
        .position(|c| webpki::EndEntityCert::try_from(c).is_err())
    {
        return Err(fault(format!(
            "{what} {}: certificate #{} is not a valid X.509 certificate",
            path.display(),
            bad + 1
        )));
    }
    Ok(chain)
}

fn roots_from(what: &str, path: &Path, files: &mut Files) -> Result<RootCertStore, TlsError> {
    let certs = chain_from(what, path, files)?;
    let mut roots = RootCertStore::empty();
    let (added, ignored) = roots.add_parsable_certificates(certs);
    if added == 0 || ignored > 0 {
        return Err(TlsError::at(
            path,
            format!(
                "{}: {ignored} certificate(s) cannot be used as trust anchors",
                path.display()
            ),
        ));
    }
    Ok(roots)
}

/// Picks the first extra certificate valid for the client's SNI name, else the default.
#[derive(Debug)]
struct BySni {
    named: Vec<Arc<CertifiedKey>>,
    default: Arc<CertifiedKey>,
}

impl ResolvesServerCert for BySni {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let name = hello
            .server_name()
            .and_then(|n| ServerName::try_from(n).ok());
        let found = name.and_then(|name| {
            self.named.iter().find(|ck| {
                ck.end_entity_cert().is_ok_and(|der| {
                    webpki::EndEntityCert::try_from(der)
                        .is_ok_and(|ee| ee.verify_is_valid_for_subject_name(&name).is_ok())
                })
            })
        });
        Some(found.unwrap_or(&self.default).clone())
    }
}

/// `[backends.X] tls` and https:// URLs: how the proxy connects to the upstream.
#[derive(Clone)]
pub struct ClientTls {
    pub config: Arc<ClientConfig>,
    /// Sent as SNI and verified against the certificate.
    pub server_name: ServerName<'static>,
    /// Whether a client certificate is presented (mTLS).
    pub client_cert: bool,
    /// Whether `tls.ca` replaces the system roots.
    pub own_ca: bool,
    /// Of the files this was built from (empty: system roots, no client certificate).
    fingerprint: String,
}

impl fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientTls")
            .field("server_name", &self.server_name)
            .finish_non_exhaustive()
    }
}

impl PartialEq for ClientTls {
    fn eq(&self, other: &Self) -> bool {
        self.server_name == other.server_name
            && self.fingerprint == other.fingerprint
            && self.config.alpn_protocols == other.config.alpn_protocols
    }
}

impl ClientTls {
    /// One line for operators: how the upstream is verified and who we are to it.
    pub fn describe(&self) -> String {
        format!(
            "TLS, verified as {} against {}{}",
            self.server_name.to_str(),
            if self.own_ca {
                "tls.ca"
            } else {
                "the system roots"
            },
            if self.client_cert {
                ", with a client certificate (mTLS)"
            } else {
                ""
            }
        )
    }
}

impl ServerTlsFiles {
    /// One line for operators about the listener.
    pub fn describe(&self) -> String {
        let clients = match (&self.client_ca, self.client_auth) {
            (None, _) => "",
            (Some(_), ClientAuth::Required) => ", client certificates required",
            (Some(_), ClientAuth::Optional) => ", client certificates verified when presented",
        };
        format!(
            "TLS with {} certificate(s) chosen by SNI{clients}; HTTP/2 and HTTP/1.1 by ALPN",
            self.pairs.len()
        )
    }
}

/// The client side of one backend.
pub struct ClientTlsFiles<'a> {
    pub ca: Option<&'a Path>,
    /// Client certificate and key for mTLS.
    pub identity: Option<(&'a Path, &'a Path)>,
    pub server_name: ServerName<'static>,
    pub alpn: &'a [u8],
}

pub fn load_client(spec: &ClientTlsFiles<'_>, files: &mut Files) -> Result<ClientTls, TlsError> {
    let mut own = Files::default();
    let roots = match spec.ca {
        Some(ca) => Arc::new(roots_from("ca", ca, &mut own)?),
        None => system_roots().map_err(TlsError::general)?,
    };
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::general(format!("TLS versions: {e}")))?
        .with_root_certificates(roots);
    let mut config = match spec.identity {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => {
            let (ck, der) = certified_key(cert, key, &mut own)?;
            builder.with_client_auth_cert(ck.cert, der).map_err(|e| {
                TlsError::at(cert, format!("client certificate {}: {e}", cert.display()))
            })?
        }
    };
    config.alpn_protocols = vec![spec.alpn.to_vec()];
    files.extend(&own);
    Ok(ClientTls {
        config: Arc::new(config),
        server_name: spec.server_name.clone(),
        client_cert: spec.identity.is_some(),
        own_ca: spec.ca.is_some(),
        fingerprint: own.fingerprint(),
    })
}

/// The operating system's trust store, read once.
fn system_roots() -> Result<Arc<RootCertStore>, String> {
    static ROOTS: OnceLock<Result<Arc<RootCertStore>, String>> = OnceLock::new();
    ROOTS
        .get_or_init(|| {
            let found = rustls_native_certs::load_native_certs();
            let mut roots = RootCertStore::empty();
            roots.add_parsable_certificates(found.certs);
            if roots.is_empty() {
                let why = found
                    .errors
                    .first()
                    .map_or_else(String::new, |e| format!(" ({e})"));
                return Err(format!("no system root certificates found{why}: install the ca-certificates package, or set `tls.ca`"));
            }
            Ok(Arc::new(roots))
        })
        .clone()
}

/// Lower-case hex of a digest.
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut out, b| {
            let _ = write!(out, "{b:02x}");
            out
        })
}

/// Hex SHA-256 of `bytes`: how the configuration's files are told apart.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::Files;
    use std::path::Path;

    #[test]
    fn changed_names_only_the_files_whose_content_or_presence_differs() {
        let dir = tempfile::tempdir().unwrap();
        let [a, b, c] = ["a.pem", "b.json", "c.secret"].map(|n| dir.path().join(n));
        for p in [&a, &b, &c] {
            std::fs::write(p, "one").unwrap();
        }
        let read = |paths: &[&Path]| {
            let mut files = Files::default();
            for p in paths {
                files.read(p).unwrap();
            }
            files
        };
        let old = read(&[&a, &b]);
        assert!(read(&[&a, &b]).changed(&old).is_empty());
        std::fs::write(&b, "two").unwrap();
        assert_eq!(read(&[&a, &b]).changed(&old), [b.as_path()]);
        // a file only one side read: added, then dropped
        assert_eq!(
            read(&[&a, &b, &c]).changed(&old),
            [b.as_path(), c.as_path()]
        );
        assert_eq!(read(&[&b]).changed(&old), [b.as_path(), a.as_path()]);
    }
}

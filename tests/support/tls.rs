//! TLS test fixtures: a throwaway CA issuing server and client certificates (rcgen), TLS
//! clients that trust it, an https upstream (optionally demanding a client certificate), and
//! a gRPC-style HTTP/2 server that streams each message back as it arrives and ends with
//! trailers.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Response};
use http_body::{Body, Frame};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_rustls::client::TlsStream;

use super::{listener, stopper, Running};

/// A certificate authority for one test.
pub struct Pki {
    pub ca_pem: String,
    ca_der: CertificateDer<'static>,
    issuer: Issuer<'static, KeyPair>,
}

/// An issued certificate: PEM chain and key, and the leaf's DER to recognize it.
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
    pub der: CertificateDer<'static>,
}

impl Pki {
    pub fn new(name: &str) -> Pki {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let cert = params.self_signed(&key).unwrap();
        Pki {
            ca_pem: cert.pem(),
            ca_der: cert.der().clone(),
            issuer: Issuer::new(params, key),
        }
    }

    /// A leaf for `names` (DNS names or IP addresses), for servers or for clients.
    pub fn issue(&self, names: &[&str], client: bool) -> Issued {
        let key = KeyPair::generate().unwrap();
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let mut params = CertificateParams::new(names.clone()).unwrap();
        params.distinguished_name.push(
            DnType::CommonName,
            names.first().cloned().unwrap_or_default(),
        );
        params.extended_key_usages = vec![if client {
            ExtendedKeyUsagePurpose::ClientAuth
        } else {
            ExtendedKeyUsagePurpose::ServerAuth
        }];
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            der: cert.der().clone(),
        }
    }

    pub fn roots(&self) -> rustls::RootCertStore {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.ca_der.clone()).unwrap();
        roots
    }

    /// A client trusting this CA, offering `alpn`, with an optional client certificate.
    pub fn client(&self, alpn: &[&[u8]], identity: Option<&Issued>) -> Arc<rustls::ClientConfig> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let b = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(self.roots());
        let mut c = match identity {
            None => b.with_no_client_auth(),
            Some(id) => {
                use rustls::pki_types::pem::PemObject;
                let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(id.key_pem.as_bytes())
                    .unwrap();
                b.with_client_auth_cert(vec![id.der.clone()], key).unwrap()
            }
        };
        c.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Arc::new(c)
    }
}

impl Issued {
    /// Writes `NAME.pem` and `NAME.key` into `dir`.
    pub fn write(&self, dir: &Path, name: &str) {
        std::fs::write(dir.join(format!("{name}.pem")), &self.cert_pem).unwrap();
        std::fs::write(dir.join(format!("{name}.key")), &self.key_pem).unwrap();
    }
}

/// A TLS connection to `addr` asking for `name` by SNI.
pub async fn connect(
    addr: SocketAddr,
    name: &str,
    config: Arc<rustls::ClientConfig>,
) -> std::io::Result<TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    let name = ServerName::try_from(name.to_string()).unwrap();
    tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
}

/// The leaf certificate the server presented.
pub fn presented(stream: &TlsStream<TcpStream>) -> CertificateDer<'static> {
    stream.get_ref().1.peer_certificates().unwrap()[0].clone()
}

pub type TestBody = BoxBody<Bytes, Infallible>;

/// An HTTP/2 client on an open stream (TLS with ALPN h2, or cleartext prior knowledge).
pub async fn h2_client<I>(io: I) -> hyper::client::conn::http2::SendRequest<TestBody>
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(io))
            .await
            .unwrap();
    tokio::spawn(conn);
    sender
}

/// A request body fed frame by frame through the returned sender.
pub fn channel_body() -> (mpsc::Sender<Frame<Bytes>>, TestBody) {
    let (tx, rx) = mpsc::channel::<Frame<Bytes>>(8);
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|f| (Ok::<_, Infallible>(f), rx))
    });
    (tx, StreamBody::new(stream).boxed())
}

pub fn empty() -> TestBody {
    http_body_util::Empty::new().boxed()
}

/// An https upstream answering like `start_echo` (over HTTP/1.1 or h2, as ALPN says), with
/// `x-client-cert: yes|no`; with `client_ca`, a handshake without a client certificate
/// signed by it fails.
pub async fn start_tls_echo(name: &'static str, cert: &Issued, client_ca: Option<&Pki>) -> Running {
    use rustls::pki_types::pem::PemObject;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let b = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap();
    let b = match client_ca {
        None => b.with_no_client_auth(),
        Some(ca) => b.with_client_cert_verifier(
            rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(ca.roots()),
                provider,
            )
            .build()
            .unwrap(),
        ),
    };
    let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(cert.key_pem.as_bytes()).unwrap();
    let mut config = b.with_single_cert(vec![cert.der.clone()], key).unwrap();
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    serving(move |tcp| {
        let acceptor = acceptor.clone();
        async move {
            let Ok(tls) = acceptor.accept(tcp).await else {
                return;
            };
            let with_cert = tls.get_ref().1.peer_certificates().is_some();
            let svc = service_fn(move |req: Request<Incoming>| async move {
                let version = format!("{:?}", req.version());
                let mut resp = super::echo(name, req).await;
                let h = resp.headers_mut();
                h.insert(
                    "x-client-cert",
                    HeaderValue::from_static(if with_cert { "yes" } else { "no" }),
                );
                h.insert(
                    "x-upstream-version",
                    HeaderValue::from_str(&version).unwrap(),
                );
                Ok::<_, Infallible>(resp)
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(tls), svc)
                .await;
        }
    })
    .await
}

/// A gRPC-style server over cleartext HTTP/2 (prior knowledge): every request body frame is
/// sent back as soon as it arrives, then trailers `grpc-status` (the request's
/// `x-grpc-status`, default 0, or `forced`) and `x-echo-trailers` (how many trailer fields
/// the request ended with). Answers `content-type: application/grpc`.
pub async fn start_grpc(forced: Option<&'static str>) -> Running {
    serving(move |tcp| async move {
        let svc = service_fn(move |req: Request<Incoming>| async move {
            let status = match forced {
                Some(s) => HeaderValue::from_static(s),
                None => req
                    .headers()
                    .get("x-grpc-status")
                    .cloned()
                    .unwrap_or(HeaderValue::from_static("0")),
            };
            let te = req.headers().get("te").cloned();
            let body = Echo {
                inner: req.into_body(),
                status: Some(status),
                seen_trailers: 0,
            };
            let mut resp = Response::new(body);
            resp.headers_mut()
                .insert("content-type", HeaderValue::from_static("application/grpc"));
            if let Some(te) = te {
                resp.headers_mut().insert("x-seen-te", te);
            }
            Ok::<_, Infallible>(resp)
        });
        let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
            .serve_connection(TokioIo::new(tcp), svc)
            .await;
    })
    .await
}

/// Streams the request body back, then ends with trailers.
struct Echo {
    inner: Incoming,
    status: Option<HeaderValue>,
    seen_trailers: usize,
}

impl Body for Echo {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        loop {
            let Some(status) = self.status.clone() else {
                return Poll::Ready(None);
            };
            match std::task::ready!(Pin::new(&mut self.inner).poll_frame(cx)) {
                Some(Ok(f)) => match f.into_data() {
                    Ok(data) => return Poll::Ready(Some(Ok(Frame::data(data)))),
                    Err(f) => {
                        self.seen_trailers += f.trailers_ref().map_or(0, HeaderMap::len);
                    }
                },
                Some(Err(e)) => return Poll::Ready(Some(Err(e))),
                None => {
                    self.status = None;
                    let mut t = HeaderMap::new();
                    t.insert("grpc-status", status);
                    t.insert("x-echo-trailers", HeaderValue::from(self.seen_trailers));
                    return Poll::Ready(Some(Ok(Frame::trailers(t))));
                }
            }
        }
    }
}

/// Accepts on a new port-0 listener until dropped, serving each connection in its own task.
async fn serving<F, Fut>(serve: F) -> Running
where
    F: Fn(TcpStream) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (l, addr) = listener().await;
    let (tx, stop) = stopper();
    tokio::spawn(async move {
        tokio::pin!(stop);
        loop {
            let (tcp, _) = tokio::select! {
                _ = &mut stop => return,
                r = l.accept() => r.unwrap(),
            };
            tokio::spawn(serve(tcp));
        }
    });
    Running {
        addr,
        stop: Some(tx),
    }
}

/// A gRPC message frame: uncompressed flag, big-endian length, payload.
pub fn grpc_message(payload: &[u8]) -> Bytes {
    let mut v = vec![0u8];
    v.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    v.extend_from_slice(payload);
    Bytes::from(v)
}

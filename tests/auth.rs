//! JWT authentication per route, end to end: real RSA, P-256 and Ed25519 keys made per run,
//! real tokens signed with them, a real proxy and real backends on 127.0.0.1:0. What is
//! checked: valid tokens of each key type pass; every forgery and every stale, misaddressed or
//! malformed token is refused before any backend or shadow sees it; JWKS rotation from a file
//! (on reload) and from a URL (single flight, cooldown, outage); observe, optional and required
//! modes; claims as headers; trusted proxies and claim-sticky canaries; CORS preflights. The
//! config errors are in tests/auth_config.rs.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a panic is a failure report

mod support;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::{Duration, Instant};

use aws_lc_rs::encoding::{AsDer, Pkcs8V1Der};
use aws_lc_rs::rsa::KeySize;
use aws_lc_rs::signature::{
    EcdsaKeyPair, Ed25519KeyPair, KeyPair, RsaKeyPair, ECDSA_P256_SHA256_FIXED_SIGNING,
};
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine as _;
use bytes::Bytes;
use futures_util::StreamExt;
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use jsonwebtoken::jwk::{Jwk, JwkSet};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use support::jwt::{now, ISSUER};
use support::*;

// ------------------------------------------------------------------------------------ keys

const AUDIENCE: &str = "fittrack-api";

/// Signing keys, made once per run (RSA generation is the slow part).
struct Keys {
    /// `rsa-1`.
    rsa: EncodingKey,
    /// Another RSA key: a forger's, presented under `rsa-1`'s kid.
    rsa_forger: EncodingKey,
    /// DER SubjectPublicKeyInfo of `rsa-1`: the "secret" of an algorithm-confusion forgery.
    rsa_public_der: Vec<u8>,
    /// `ec-1`.
    es: EncodingKey,
    /// `ec-2`: the key rotated in.
    es_next: EncodingKey,
    /// `ed-1`.
    ed: EncodingKey,
}

static KEYS: LazyLock<Keys> = LazyLock::new(|| {
    let rsa_pair = RsaKeyPair::generate(KeySize::Rsa2048).unwrap();
    let rsa_public_der = rsa_pair.public_key().as_der().unwrap().as_ref().to_vec();
    Keys {
        rsa: rsa_key(&rsa_pair),
        rsa_forger: rsa_key(&RsaKeyPair::generate(KeySize::Rsa2048).unwrap()),
        rsa_public_der,
        es: es256_key(),
        es_next: es256_key(),
        ed: EncodingKey::from_ed_der(
            Ed25519KeyPair::generate()
                .unwrap()
                .to_pkcs8v1()
                .unwrap()
                .as_ref(),
        ),
    }
});

/// jsonwebtoken's aws-lc backend reads an RSA private key as PKCS#1; aws-lc exports PKCS#8.
fn rsa_key(pair: &RsaKeyPair) -> EncodingKey {
    let pkcs8 = AsDer::<Pkcs8V1Der>::as_der(pair).unwrap();
    EncodingKey::from_rsa_der(&pkcs8_to_pkcs1(pkcs8.as_ref()))
}

fn es256_key() -> EncodingKey {
    let pair = EcdsaKeyPair::generate(&ECDSA_P256_SHA256_FIXED_SIGNING).unwrap();
    EncodingKey::from_ec_der(pair.to_pkcs8v1().unwrap().as_ref())
}

/// The PKCS#1 RSAPrivateKey inside a PKCS#8 v1 PrivateKeyInfo
/// (SEQUENCE { INTEGER 0, SEQUENCE algorithm, OCTET STRING pkcs1 }).
fn pkcs8_to_pkcs1(pkcs8: &[u8]) -> Vec<u8> {
    fn tlv(b: &[u8]) -> (u8, &[u8], &[u8]) {
        let (len, head) = if b[1] < 0x80 {
            (usize::from(b[1]), 2)
        } else {
            let n = usize::from(b[1] & 0x7f);
            let len = b[2..2 + n]
                .iter()
                .fold(0usize, |a, &x| (a << 8) | usize::from(x));
            (len, 2 + n)
        };
        (b[0], &b[head..head + len], &b[head + len..])
    }
    let (tag, seq, _) = tlv(pkcs8);
    assert_eq!(tag, 0x30);
    let (tag, _, rest) = tlv(seq);
    assert_eq!(tag, 0x02);
    let (tag, _, rest) = tlv(rest);
    assert_eq!(tag, 0x30);
    let (tag, pkcs1, _) = tlv(rest);
    assert_eq!(tag, 0x04);
    pkcs1.to_vec()
}

/// A JWKS document with the public halves of `keys` (`alg` set by jsonwebtoken).
fn jwks(keys: &[(&EncodingKey, Algorithm, &str)]) -> String {
    let keys = keys
        .iter()
        .map(|(key, alg, kid)| {
            let mut jwk = Jwk::from_encoding_key(key, *alg).unwrap();
            jwk.common.key_id = Some(kid.to_string());
            jwk
        })
        .collect();
    serde_json::to_string(&JwkSet { keys }).unwrap()
}

/// `rsa-1`, `ec-1` and `ed-1`.
fn standard_jwks() -> String {
    let k = &*KEYS;
    jwks(&[
        (&k.rsa, Algorithm::RS256, "rsa-1"),
        (&k.es, Algorithm::ES256, "ec-1"),
        (&k.ed, Algorithm::EdDSA, "ed-1"),
    ])
}

/// Claims that pass the test providers' rules, with `changes` applied (`null` removes).
fn claims(changes: Value) -> Value {
    let n = now();
    let mut c = json!({
        "iss": ISSUER,
        "aud": [AUDIENCE, "another-api"],
        "sub": "user-7",
        "scope": "users:read profile",
        "iat": n,
        "exp": n + 600,
    });
    for (k, v) in changes.as_object().unwrap() {
        if v.is_null() {
            c.as_object_mut().unwrap().remove(k);
        } else {
            c[k] = v.clone();
        }
    }
    c
}

fn sign(alg: Algorithm, kid: &str, key: &EncodingKey, claims: &Value) -> String {
    let mut header = Header::new(alg);
    header.kid = Some(kid.to_string());
    jsonwebtoken::encode(&header, claims, key).unwrap()
}

fn rs256(claims: &Value) -> String {
    sign(Algorithm::RS256, "rsa-1", &KEYS.rsa, claims)
}

fn es256(kid: &str, claims: &Value) -> String {
    sign(Algorithm::ES256, kid, &KEYS.es, claims)
}

/// A token put together by hand: any header, any signature bytes.
fn raw_token(header: &Value, claims: &Value, signature: &[u8]) -> String {
    format!(
        "{}.{}.{}",
        B64.encode(serde_json::to_vec(header).unwrap()),
        B64.encode(serde_json::to_vec(claims).unwrap()),
        B64.encode(signature)
    )
}

// -------------------------------------------------------------------------------- backends

/// A backend that counts what reaches it, keeps the request headers, and answers
/// `{"backend", "headers": {name: [values]}}`.
struct Counted {
    addr: SocketAddr,
    hits: Arc<AtomicUsize>,
    seen: Arc<Mutex<Vec<HeaderMap>>>,
    _running: Running,
}

impl Counted {
    fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }

    fn last_headers(&self) -> HeaderMap {
        self.seen.lock().unwrap().last().cloned().unwrap()
    }
}

async fn counted(name: &'static str) -> Counted {
    let (l, addr) = listener().await;
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let hits = Arc::new(AtomicUsize::new(0));
    let seen = Arc::new(Mutex::new(Vec::new()));
    let (h, s) = (hits.clone(), seen.clone());
    tokio::spawn(legacy_stub::http::serve(
        l,
        move |req: Request<hyper::body::Incoming>, _| {
            let (hits, seen) = (h.clone(), s.clone());
            async move {
                seen.lock().unwrap().push(req.headers().clone());
                hits.fetch_add(1, Ordering::SeqCst);
                legacy_stub::http::json(
                    StatusCode::OK,
                    &json!({"backend": name, "headers": headers_json(req.headers())}),
                )
            }
        },
        async move {
            let _ = rx.await;
        },
    ));
    Counted {
        addr,
        hits,
        seen,
        _running: Running {
            addr,
            stop: Some(tx),
        },
    }
}

fn headers_json(headers: &HeaderMap) -> Value {
    let mut out = serde_json::Map::new();
    for (k, v) in headers {
        out.entry(k.as_str())
            .or_insert_with(|| json!([]))
            .as_array_mut()
            .unwrap()
            .push(json!(String::from_utf8_lossy(v.as_bytes())));
    }
    Value::Object(out)
}

/// A table whose `/` needs a `fittrack` token (ES256) with keys from `jwks` over plain HTTP,
/// the provider's other `settings` (newline-separated keys) after its `jwks_url`.
fn url_table(legacy: SocketAddr, jwks: SocketAddr, settings: &str) -> String {
    format!(
        "{SERVER}{}{}{}",
        backend("legacy", legacy),
        provider(
            "fittrack",
            r#"["ES256"]"#,
            &format!("jwks_url = \"http://{jwks}/jwks.json\"\n{settings}")
        ),
        route("/", "legacy", "auth = \"fittrack\""),
    )
}

/// A JWKS URL: serves `doc` at any path (with `status`, after `delay`, and with
/// `Cache-Control` when asked), over TLS when started with a certificate; counts the requests
/// that reach it and when they came; closes every connection after its answer (so a stopped
/// server is unreachable, not reachable over a pooled connection).
struct JwksServer {
    addr: SocketAddr,
    fetches: Arc<AtomicUsize>,
    at: Arc<Mutex<Vec<Instant>>>,
    doc: Arc<Mutex<String>>,
    status: Arc<Mutex<StatusCode>>,
    delay: Arc<Mutex<Duration>>,
    task: tokio::task::JoinHandle<()>,
}

impl JwksServer {
    async fn start(doc: String) -> JwksServer {
        Self::start_with(doc, None, None).await
    }

    async fn start_with(
        doc: String,
        tls: Option<&support::tls::Issued>,
        cache_control: Option<&'static str>,
    ) -> JwksServer {
        let (l, addr) = listener().await;
        let fetches = Arc::new(AtomicUsize::new(0));
        let at = Arc::new(Mutex::new(Vec::new()));
        let doc = Arc::new(Mutex::new(doc));
        let status = Arc::new(Mutex::new(StatusCode::OK));
        let delay = Arc::new(Mutex::new(Duration::ZERO));
        let acceptor = tls.map(|cert| {
            use rustls::pki_types::pem::PemObject;
            let key =
                rustls::pki_types::PrivateKeyDer::from_pem_slice(cert.key_pem.as_bytes()).unwrap();
            let config = rustls::ServerConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![cert.der.clone()], key)
            .unwrap();
            tokio_rustls::TlsAcceptor::from(Arc::new(config))
        });
        let (f, t, d, st, dl) = (
            fetches.clone(),
            at.clone(),
            doc.clone(),
            status.clone(),
            delay.clone(),
        );
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = l.accept().await {
                let (f, t, d, st, dl) = (f.clone(), t.clone(), d.clone(), st.clone(), dl.clone());
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |_req: Request<hyper::body::Incoming>| {
                        f.fetch_add(1, Ordering::SeqCst);
                        t.lock().unwrap().push(Instant::now());
                        let body = d.lock().unwrap().clone();
                        let status = *st.lock().unwrap();
                        let delay = *dl.lock().unwrap();
                        async move {
                            tokio::time::sleep(delay).await;
                            let mut resp = http::Response::builder()
                                .status(status)
                                .header("content-type", "application/json");
                            if let Some(cc) = cache_control {
                                resp = resp.header("cache-control", cc);
                            }
                            Ok::<_, Infallible>(resp.body(Full::new(Bytes::from(body))).unwrap())
                        }
                    });
                    let mut http = hyper::server::conn::http1::Builder::new();
                    match acceptor {
                        None => {
                            let _ = http
                                .keep_alive(false)
                                .serve_connection(TokioIo::new(stream), svc)
                                .await;
                        }
                        Some(acceptor) => {
                            let Ok(tls) = acceptor.accept(stream).await else {
                                return;
                            };
                            let _ = http
                                .keep_alive(false)
                                .serve_connection(TokioIo::new(tls), svc)
                                .await;
                        }
                    }
                });
            }
        });
        JwksServer {
            addr,
            fetches,
            at,
            doc,
            status,
            delay,
            task,
        }
    }

    fn fetches(&self) -> usize {
        self.fetches.load(Ordering::SeqCst)
    }

    /// When each request reached the server.
    fn fetched_at(&self) -> Vec<Instant> {
        self.at.lock().unwrap().clone()
    }

    fn set_doc(&self, doc: String) {
        *self.doc.lock().unwrap() = doc;
    }

    fn set_status(&self, status: StatusCode) {
        *self.status.lock().unwrap() = status;
    }

    fn set_delay(&self, delay: Duration) {
        *self.delay.lock().unwrap() = delay;
    }

    /// Closes the listener: fetches are refused from now on.
    async fn stop(&self) {
        self.task.abort();
        eventually(Duration::from_secs(5), || async {
            tokio::net::TcpStream::connect(self.addr)
                .await
                .is_err()
                .then_some(())
        })
        .await;
    }
}

// ---------------------------------------------------------------------------------- config

/// An `[auth.NAME]` section with the test issuer and audience, and `rest` lines.
fn provider(name: &str, algorithms: &str, rest: &str) -> String {
    format!("[auth.{name}]\nissuer = \"{ISSUER}\"\naudiences = [\"{AUDIENCE}\"]\nalgorithms = {algorithms}\n{rest}\n")
}

/// A temp dir holding `jwks.json` with the standard keys.
fn dir_with_jwks() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("jwks.json"), standard_jwks()).unwrap();
    dir
}

// ---------------------------------------------------------------------------------- calls

/// GET `path` with `Authorization: Bearer token` (when given) and `extra` headers.
async fn call(proxy: &Proxy, path: &str, token: Option<&str>, extra: &[(&str, &str)]) -> Reply {
    let bearer = token.map(|t| format!("Bearer {t}"));
    let mut headers: Vec<(&str, &str)> = extra.to_vec();
    if let Some(b) = &bearer {
        headers.push(("authorization", b));
    }
    send_with(Method::GET, &proxy.url(path), &headers, Bytes::new()).await
}

async fn send_on(client: &HttpClient, req: Request<Full<Bytes>>) -> Reply {
    let resp = client.request(req).await.unwrap();
    let (parts, body) = resp.into_parts();
    Reply {
        status: parts.status,
        headers: parts.headers,
        body: body.collect().await.unwrap().to_bytes(),
    }
}

fn www_authenticate(r: &Reply) -> String {
    r.headers
        .get("www-authenticate")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default()
}

/// A refusal in the contract's shape: status, `code`, a request id, nothing of the token.
fn assert_refusal(what: &str, r: &Reply, status: u16, code: &str) {
    assert_eq!(r.status.as_u16(), status, "{what}: {}", r.text());
    let body = r.json();
    assert_eq!(body["code"], code, "{what}: {body}");
    assert!(body["error"].is_string(), "{what}: {body}");
    assert!(
        body["request_id"].as_str().is_some_and(|s| !s.is_empty()),
        "{what}: {body}"
    );
    assert_eq!(
        r.headers.get("x-request-id").map(|v| v.to_str().unwrap()),
        body["request_id"].as_str(),
        "{what}"
    );
}

fn auth_count(m: &str, route: &str, outcome: &str) -> f64 {
    metric(
        m,
        "strangler_auth_total",
        &[("route", route), ("outcome", outcome)],
    )
    .unwrap_or(0.0)
}

fn fetch_count(m: &str, provider: &str, outcome: &str) -> f64 {
    metric(
        m,
        "strangler_jwks_fetch_total",
        &[("provider", provider), ("outcome", outcome)],
    )
    .unwrap_or(0.0)
}

// ---------------------------------------------------------------------------------- 1

#[tokio::test]
async fn tokens_of_each_key_type_pass_and_every_bad_token_is_refused_before_the_backend() {
    let legacy = counted("legacy").await;
    let dir = dir_with_jwks();
    let text = format!(
        "{SERVER}{}{}{}{}{}",
        backend("legacy", legacy.addr),
        provider(
            "fittrack",
            r#"["RS256", "ES256", "EdDSA"]"#,
            "jwks_file = \"jwks.json\"\nclock_skew = \"60s\""
        ),
        provider("rsonly", r#"["RS256"]"#, "jwks_file = \"jwks.json\""),
        route("/api/users", "legacy", "auth = \"fittrack\""),
        route("/rs", "legacy", "auth = \"rsonly\""),
    );
    let proxy = Proxy::start_in(dir, &text).await;
    let k = &*KEYS;
    let n = now();

    // Valid: one token per key type, and the clock skew on both ends.
    let valid = [
        ("RS256", rs256(&claims(json!({})))),
        ("ES256", es256("ec-1", &claims(json!({})))),
        (
            "EdDSA",
            sign(Algorithm::EdDSA, "ed-1", &k.ed, &claims(json!({}))),
        ),
        (
            "expired 30 s ago, inside the 60 s skew",
            rs256(&claims(json!({"exp": n - 30}))),
        ),
        (
            "nbf 30 s ahead, inside the 60 s skew",
            rs256(&claims(json!({"nbf": n + 30}))),
        ),
        ("aud as a string", rs256(&claims(json!({"aud": AUDIENCE})))),
    ];
    for (what, token) in &valid {
        let r = call(&proxy, "/api/users/7", Some(token), &[]).await;
        assert_eq!(r.status, 200, "{what}: {}", r.text());
        assert_eq!(r.backend(), "legacy");
    }
    assert_eq!(legacy.hits(), valid.len());

    // No token: 401 with the challenge and no error code (RFC 6750 §3.1).
    let r = call(&proxy, "/api/users/7", None, &[]).await;
    assert_refusal("no token", &r, 401, "unauthorized");
    assert_eq!(www_authenticate(&r), r#"Bearer realm="fittrack""#);
    // Another scheme is no bearer token: missing, not malformed.
    let r = call(
        &proxy,
        "/api/users/7",
        None,
        &[("authorization", "Basic dXNlcjpwYXNz")],
    )
    .await;
    assert_refusal("Basic", &r, 401, "unauthorized");
    assert_eq!(www_authenticate(&r), r#"Bearer realm="fittrack""#);

    let mut jku = Header::new(Algorithm::RS256);
    jku.kid = Some("rsa-1".into());
    jku.jku = Some(format!("http://{}/evil-jwks.json", legacy.addr));
    let mut embedded = Header::new(Algorithm::RS256);
    embedded.kid = Some("rsa-1".into());
    embedded.jwk = Some(Jwk::from_encoding_key(&k.rsa_forger, Algorithm::RS256).unwrap());
    let mut x5u = Header::new(Algorithm::RS256);
    x5u.kid = Some("rsa-1".into());
    x5u.x5u = Some(format!("http://{}/evil.pem", legacy.addr));
    let mut crit = Header::new(Algorithm::RS256);
    crit.kid = Some("rsa-1".into());
    crit.crit = Some(vec!["exp".into()]);
    let hs_confusion = {
        let mut h = Header::new(Algorithm::HS256);
        h.kid = Some("rsa-1".into());
        jsonwebtoken::encode(
            &h,
            &claims(json!({})),
            &EncodingKey::from_secret(&k.rsa_public_der),
        )
        .unwrap()
    };
    let invalid: Vec<(&str, &str, String, &str)> = vec![
        (
            "expired beyond the skew",
            "/api/users/7",
            rs256(&claims(json!({"exp": n - 120}))),
            "expired",
        ),
        (
            "nbf beyond the skew",
            "/api/users/7",
            rs256(&claims(json!({"nbf": n + 300}))),
            "not_yet_valid",
        ),
        (
            "wrong issuer",
            "/api/users/7",
            rs256(&claims(json!({"iss": "https://evil.test/"}))),
            "bad_issuer",
        ),
        (
            "issuer without its trailing slash",
            "/api/users/7",
            rs256(&claims(json!({"iss": "https://auth.test"}))),
            "bad_issuer",
        ),
        (
            "wrong audience",
            "/api/users/7",
            rs256(&claims(json!({"aud": ["billing-api"]}))),
            "bad_audience",
        ),
        (
            "no exp",
            "/api/users/7",
            rs256(&claims(json!({"exp": null}))),
            "bad_claims",
        ),
        (
            "a string exp",
            "/api/users/7",
            rs256(&claims(json!({"exp": (n + 600).to_string()}))),
            "bad_claims",
        ),
        (
            "a string nbf",
            "/api/users/7",
            rs256(&claims(json!({"nbf": (n - 10).to_string()}))),
            "bad_claims",
        ),
        (
            "a string iat",
            "/api/users/7",
            rs256(&claims(json!({"iat": n.to_string()}))),
            "bad_claims",
        ),
        (
            "iss as an array holding the issuer",
            "/api/users/7",
            rs256(&claims(json!({"iss": ["https://evil.test/", ISSUER]}))),
            "bad_issuer",
        ),
        (
            "signed by another key under the same kid",
            "/api/users/7",
            sign(Algorithm::RS256, "rsa-1", &k.rsa_forger, &claims(json!({}))),
            "bad_signature",
        ),
        (
            "claims changed after signing",
            "/api/users/7",
            {
                let good = rs256(&claims(json!({})));
                let parts: Vec<&str> = good.split('.').collect();
                let forged =
                    B64.encode(serde_json::to_vec(&claims(json!({"sub": "admin"}))).unwrap());
                format!("{}.{forged}.{}", parts[0], parts[2])
            },
            "bad_signature",
        ),
        (
            "alg none, unsigned",
            "/api/users/7",
            raw_token(
                &json!({"alg": "none", "typ": "JWT", "kid": "rsa-1"}),
                &claims(json!({})),
                b"",
            ),
            "bad_algorithm",
        ),
        (
            "HS256 signed with the RSA public key as the secret",
            "/api/users/7",
            hs_confusion,
            "bad_algorithm",
        ),
        (
            "RS384, not in the allow-list",
            "/api/users/7",
            sign(Algorithm::RS384, "rsa-1", &k.rsa, &claims(json!({}))),
            "bad_algorithm",
        ),
        (
            "ES256 where only RS256 is allowed",
            "/rs",
            es256("ec-1", &claims(json!({}))),
            "bad_algorithm",
        ),
        (
            "a jku header",
            "/api/users/7",
            jsonwebtoken::encode(&jku, &claims(json!({})), &k.rsa).unwrap(),
            "forbidden_header",
        ),
        (
            "an embedded jwk, signed by its own key",
            "/api/users/7",
            jsonwebtoken::encode(&embedded, &claims(json!({})), &k.rsa_forger).unwrap(),
            "forbidden_header",
        ),
        (
            "an x5u header",
            "/api/users/7",
            jsonwebtoken::encode(&x5u, &claims(json!({})), &k.rsa).unwrap(),
            "forbidden_header",
        ),
        (
            "a crit header",
            "/api/users/7",
            jsonwebtoken::encode(&crit, &claims(json!({})), &k.rsa).unwrap(),
            "forbidden_header",
        ),
        (
            "an unknown kid",
            "/api/users/7",
            es256("ec-404", &claims(json!({}))),
            "unknown_key",
        ),
        (
            "a kid naming a key of another type",
            "/api/users/7",
            es256("rsa-1", &claims(json!({}))),
            "unknown_key",
        ),
        ("not a JWT", "/api/users/7", "not-a-jwt".into(), "bad_token"),
    ];
    for (what, path, token, _) in &invalid {
        let r = call(&proxy, path, Some(token), &[]).await;
        assert_refusal(what, &r, 401, "unauthorized");
        let challenge = www_authenticate(&r);
        assert!(
            challenge.starts_with("Bearer realm=")
                && challenge.contains(r#"error="invalid_token""#),
            "{what}: {challenge}"
        );
        assert!(
            !r.text().contains(token.as_str()),
            "{what}: the answer echoes the token"
        );
    }

    // Malformed credentials: 400 invalid_request.
    let good = rs256(&claims(json!({})));
    let two = format!("Bearer {good}");
    let malformed: [(&str, Vec<(&str, &str)>); 4] = [
        (
            "two Authorization headers",
            vec![
                ("authorization", two.as_str()),
                ("authorization", two.as_str()),
            ],
        ),
        ("Bearer with nothing", vec![("authorization", "Bearer")]),
        ("Bearer with spaces", vec![("authorization", "Bearer   ")]),
        (
            "characters outside token68",
            vec![("authorization", "Bearer abc$def.ghi")],
        ),
    ];
    for (what, headers) in &malformed {
        let r = send_with(
            Method::GET,
            &proxy.url("/api/users/7"),
            headers,
            Bytes::new(),
        )
        .await;
        assert_refusal(what, &r, 400, "bad_request");
        assert!(
            www_authenticate(&r).contains(r#"error="invalid_request""#),
            "{what}: {}",
            www_authenticate(&r)
        );
    }

    assert_eq!(
        legacy.hits(),
        valid.len(),
        "a refused request reached the backend"
    );

    let m = metrics_text(&proxy).await;
    let mut want: std::collections::BTreeMap<(&str, &str), f64> = Default::default();
    for (_, path, _, outcome) in &invalid {
        let route = if *path == "/rs" { "/rs" } else { "/api/users" };
        *want.entry((route, outcome)).or_default() += 1.0;
    }
    want.insert(("/api/users", "ok"), valid.len() as f64);
    want.insert(("/api/users", "missing"), 2.0);
    want.insert(("/api/users", "malformed"), malformed.len() as f64);
    for ((route, outcome), n) in &want {
        assert_eq!(auth_count(&m, route, outcome), *n, "{route} {outcome}\n{m}");
    }
    let refused_401 = (invalid.len() - 1 + 2) as f64;
    assert_eq!(
        metric(
            &m,
            "strangler_requests_total",
            &[
                ("route", "/api/users"),
                ("backend", "none"),
                ("status", "401")
            ]
        ),
        Some(refused_401),
        "{m}"
    );
    assert_eq!(
        metric(
            &m,
            "strangler_requests_total",
            &[
                ("route", "/api/users"),
                ("backend", "none"),
                ("status", "400")
            ]
        ),
        Some(malformed.len() as f64),
        "{m}"
    );
}

#[tokio::test]
async fn an_hmac_secret_from_a_file_verifies_hs256_only() {
    let legacy = counted("legacy").await;
    let dir = tempfile::tempdir().unwrap();
    let secret = "0123456789abcdef0123456789abcdef-test-secret";
    std::fs::write(dir.path().join("secret"), format!("{secret}\n")).unwrap();
    let text = format!(
        "{SERVER}{}{}{}",
        backend("legacy", legacy.addr),
        provider("internal", r#"["HS256"]"#, "secret_file = \"secret\""),
        route("/", "legacy", "auth = \"internal\""),
    );
    let proxy = Proxy::start_in(dir, &text).await;
    let hs = |key: &[u8]| {
        jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims(json!({})),
            &EncodingKey::from_secret(key),
        )
        .unwrap()
    };
    let r = call(&proxy, "/x", Some(&hs(secret.as_bytes())), &[]).await;
    assert_eq!(r.status, 200, "{}", r.text());
    // A secret has no key id: whatever kid the issuer puts in the header names it.
    let mut with_kid = Header::new(Algorithm::HS256);
    with_kid.kid = Some("hs-2026".into());
    let token = jsonwebtoken::encode(
        &with_kid,
        &claims(json!({})),
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap();
    let r = call(&proxy, "/x", Some(&token), &[]).await;
    assert_eq!(r.status, 200, "an HS256 token with a kid: {}", r.text());
    let r = call(
        &proxy,
        "/x",
        Some(&hs(b"another-secret-another-secret-!!")),
        &[],
    )
    .await;
    assert_refusal("wrong secret", &r, 401, "unauthorized");
    let r = call(&proxy, "/x", Some(&rs256(&claims(json!({})))), &[]).await;
    assert_refusal("RS256 at an HS256 provider", &r, 401, "unauthorized");
    assert_eq!(legacy.hits(), 2);
    let m = metrics_text(&proxy).await;
    assert_eq!(auth_count(&m, "/", "bad_signature"), 1.0, "{m}");
    assert_eq!(auth_count(&m, "/", "bad_algorithm"), 1.0, "{m}");
}

// ---------------------------------------------------------------------------------- 2

#[tokio::test]
async fn a_jwks_file_rotation_takes_effect_on_reload_without_a_restart() {
    let legacy = counted("legacy").await;
    let dir = tempfile::tempdir().unwrap();
    let k = &*KEYS;
    let jwks_path = dir.path().join("jwks.json");
    std::fs::write(&jwks_path, jwks(&[(&k.es, Algorithm::ES256, "ec-1")])).unwrap();
    let text = format!(
        "{SERVER}{}{}{}",
        backend("legacy", legacy.addr),
        provider("fittrack", r#"["ES256"]"#, "jwks_file = \"jwks.json\""),
        route("/", "legacy", "auth = \"fittrack\""),
    );
    let proxy = Proxy::start_in(dir, &text).await;
    let old = es256("ec-1", &claims(json!({})));
    let new = sign(Algorithm::ES256, "ec-2", &k.es_next, &claims(json!({})));
    assert_eq!(call(&proxy, "/x", Some(&old), &[]).await.status, 200);
    let r = call(&proxy, "/x", Some(&new), &[]).await;
    assert_refusal("kid not yet published", &r, 401, "unauthorized");

    let reload = || async {
        let r = send_with(Method::POST, &proxy.admin_url("/reload"), &[], Bytes::new()).await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.json()["changed"], true, "{}", r.text());
    };
    // The identity provider publishes ec-2 next to ec-1.
    std::fs::write(
        &jwks_path,
        jwks(&[
            (&k.es, Algorithm::ES256, "ec-1"),
            (&k.es_next, Algorithm::ES256, "ec-2"),
        ]),
    )
    .unwrap();
    reload().await;
    assert_eq!(call(&proxy, "/x", Some(&new), &[]).await.status, 200);
    assert_eq!(call(&proxy, "/x", Some(&old), &[]).await.status, 200);
    // Then retires ec-1: its tokens stop working, cached verdicts included.
    std::fs::write(&jwks_path, jwks(&[(&k.es_next, Algorithm::ES256, "ec-2")])).unwrap();
    reload().await;
    let r = call(&proxy, "/x", Some(&old), &[]).await;
    assert_refusal("retired key", &r, 401, "unauthorized");
    assert_eq!(call(&proxy, "/x", Some(&new), &[]).await.status, 200);
    assert_eq!(legacy.hits(), 4);
    // A broken file keeps the keys that worked.
    std::fs::write(&jwks_path, "{ not json").unwrap();
    let r = send_with(Method::POST, &proxy.admin_url("/reload"), &[], Bytes::new()).await;
    assert_eq!(r.status, 422, "{}", r.text());
    assert!(r.text().contains("jwks_file"), "{}", r.text());
    assert_eq!(call(&proxy, "/x", Some(&new), &[]).await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_jwks_url_rotates_with_single_flight_fetches_and_survives_an_outage() {
    let legacy = counted("legacy").await;
    let k = &*KEYS;
    let server = JwksServer::start(jwks(&[(&k.es, Algorithm::ES256, "ec-1")])).await;
    let text = url_table(
        legacy.addr,
        server.addr,
        "jwks_cooldown = \"1s\"\njwks_timeout = \"2s\"",
    );
    let proxy = Proxy::start(&text).await;
    // The fetch at start.
    eventually(Duration::from_secs(5), || async {
        (server.fetches() >= 1).then_some(())
    })
    .await;
    let old = es256("ec-1", &claims(json!({})));
    let new = |sub: &str| {
        sign(
            Algorithm::ES256,
            "ec-2",
            &k.es_next,
            &claims(json!({"sub": sub})),
        )
    };
    let r = eventually(Duration::from_secs(5), || async {
        let r = call(&proxy, "/x", Some(&old), &[]).await;
        (r.status == 200).then_some(r)
    })
    .await;
    assert_eq!(r.backend(), "legacy");
    let r = call(&proxy, "/x", Some(&new("a")), &[]).await;
    assert_refusal("kid not yet published", &r, 401, "unauthorized");

    // The identity provider publishes ec-2; after one cooldown a token with it forces a fetch.
    server.set_doc(jwks(&[
        (&k.es, Algorithm::ES256, "ec-1"),
        (&k.es_next, Algorithm::ES256, "ec-2"),
    ]));
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let before = server.fetches();
    let r = call(&proxy, "/x", Some(&new("b")), &[]).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(server.fetches(), before + 1);

    // A flood of random kids, 50 at a time, right after the cooldown ran out: one forced
    // fetch, shared by every request waiting for it, and no more within one cooldown.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let tokens: Vec<String> = (0..1000)
        .map(|i| {
            raw_token(
                &json!({"alg": "ES256", "typ": "JWT", "kid": format!("random-{i}-{}", fastrand::u64(..))}),
                &claims(json!({})),
                &[7u8; 64],
            )
        })
        .collect();
    let hits = legacy.hits();
    let before = server.fetches();
    let client = client();
    let url = proxy.url("/x");
    let started = Instant::now();
    let statuses: Vec<StatusCode> = futures_util::stream::iter(tokens)
        .map(|t| {
            let req = Request::get(&url)
                .header("authorization", format!("Bearer {t}"))
                .body(Full::new(Bytes::new()))
                .unwrap();
            let client = &client;
            async move { send_on(client, req).await.status }
        })
        .buffer_unordered(50)
        .collect()
        .await;
    let took = started.elapsed();
    assert!(statuses.iter().all(|s| *s == 401), "{statuses:?}");
    let during = server.fetches() - before;
    eprintln!("1000 random kids took {took:?} and caused {during} JWKS fetch(es)");
    assert!(during >= 1, "the flood never forced a fetch");
    // At most one forced fetch per cooldown (1 s) the flood lasted: exactly one when it fits
    // in one cooldown (it takes about 0.2 s here, in a debug build).
    if took < Duration::from_secs(1) {
        assert_eq!(
            during, 1,
            "{during} fetches in {took:?} with a 1 s cooldown"
        );
    }
    assert!(
        during <= 1 + took.as_secs() as usize,
        "{during} fetches in {took:?} with a 1 s cooldown"
    );
    assert_eq!(legacy.hits(), hits);

    // The identity provider goes away: known keys keep working...
    server.stop().await;
    let r = call(&proxy, "/x", Some(&new("c")), &[]).await;
    assert_eq!(r.status, 200, "{}", r.text());
    // ...and once a fetch may be forced again, an unknown kid is a server-side outage (503
    // with Retry-After), not the client's fault.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let r = call(&proxy, "/x", Some(&es256("ec-3", &claims(json!({})))), &[]).await;
    assert_refusal("unknown kid, JWKS down", &r, 503, "auth_unavailable");
    let retry: u64 = r.headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert_eq!(retry, 1, "Retry-After");
    // Within the cooldown, another unknown kid gets the same answer without a fetch.
    let r = call(&proxy, "/x", Some(&es256("ec-4", &claims(json!({})))), &[]).await;
    assert_refusal(
        "unknown kid, JWKS down, in cooldown",
        &r,
        503,
        "auth_unavailable",
    );
    let r = call(&proxy, "/x", Some(&new("d")), &[]).await;
    assert_eq!(
        r.status,
        200,
        "known keys survive a failed fetch: {}",
        r.text()
    );

    let m = metrics_text(&proxy).await;
    assert_eq!(
        fetch_count(&m, "fittrack", "ok"),
        server.fetches() as f64,
        "{m}"
    );
    // One failed forced fetch (two if the machine took over a cooldown between the 503s).
    let failed = fetch_count(&m, "fittrack", "error");
    assert!((1.0..=2.0).contains(&failed), "{m}");
    assert_eq!(auth_count(&m, "/", "keys_unavailable"), 2.0, "{m}");
}

#[tokio::test]
async fn a_reload_while_the_jwks_url_is_down_keeps_the_keys_it_gave() {
    let legacy = counted("legacy").await;
    let server = JwksServer::start(jwks(&[(&KEYS.es, Algorithm::ES256, "ec-1")])).await;
    let text = |realm: &str| {
        format!(
            "{SERVER}{}{}{}",
            backend("legacy", legacy.addr),
            provider(
                "fittrack",
                r#"["ES256"]"#,
                &format!(
                    "jwks_url = \"http://{}/jwks.json\"\njwks_cooldown = \"1s\"\nrealm = \"{realm}\"",
                    server.addr
                )
            ),
            route("/", "legacy", "auth = \"fittrack\""),
        )
    };
    let proxy = Proxy::start(&text("fittrack")).await;
    let token = es256("ec-1", &claims(json!({})));
    eventually(Duration::from_secs(5), || async {
        (call(&proxy, "/x", Some(&token), &[]).await.status == 200).then_some(())
    })
    .await;
    // The identity provider goes down, then the provider's settings change.
    server.stop().await;
    reload_with(&proxy, &text("fittrack-2")).await;
    let r = call(
        &proxy,
        "/x",
        Some(&es256("ec-1", &claims(json!({"sub": "other"})))),
        &[],
    )
    .await;
    assert_eq!(
        r.status,
        200,
        "the keys fetched before the reload still verify: {}",
        r.text()
    );
    let r = call(&proxy, "/x", None, &[]).await;
    assert_eq!(www_authenticate(&r), r#"Bearer realm="fittrack-2""#);
}

// ---------------------------------------------------------------------------------- 3

#[tokio::test]
async fn observe_forwards_everything_and_counts_while_required_refuses_before_backend_and_shadow() {
    let legacy = counted("legacy").await;
    let users = counted("users").await;
    let text = format!(
        "{SERVER}{}{}{}{}{}{}{}",
        backend("legacy", legacy.addr),
        backend("users", users.addr),
        provider(
            "fittrack",
            r#"["RS256", "ES256"]"#,
            "jwks_file = \"jwks.json\""
        ),
        route(
            "/observe",
            "legacy",
            "auth = { provider = \"fittrack\", mode = \"observe\" }"
        ),
        route(
            "/optional",
            "legacy",
            "auth = { provider = \"fittrack\", mode = \"optional\" }"
        ),
        route(
            "/write",
            "legacy",
            "auth = { provider = \"fittrack\", require = { scope = \"users:write\" } }"
        ),
        route(
            "/required",
            "legacy",
            "auth = \"fittrack\"\nshadow = \"users\""
        ),
    );
    let proxy = Proxy::start_in(dir_with_jwks(), &text).await;
    let valid = es256("ec-1", &claims(json!({})));
    let expired = es256("ec-1", &claims(json!({"exp": now() - 3600})));

    // Observe: everything reaches the backend; what would have been refused is counted.
    for token in [None, Some(expired.as_str()), Some(valid.as_str())] {
        let r = call(&proxy, "/observe/x", token, &[]).await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.backend(), "legacy");
    }
    assert_eq!(legacy.hits(), 3);
    let m = metrics_text(&proxy).await;
    for outcome in ["missing", "expired", "ok"] {
        assert_eq!(auth_count(&m, "/observe", outcome), 1.0, "{outcome}\n{m}");
    }

    // Optional: no token passes anonymously; a bad token does not.
    assert_eq!(call(&proxy, "/optional", None, &[]).await.status, 200);
    let r = call(&proxy, "/optional", Some(&expired), &[]).await;
    assert_refusal("optional, expired", &r, 401, "unauthorized");
    assert_eq!(
        call(&proxy, "/optional", Some(&valid), &[]).await.status,
        200
    );
    assert_eq!(legacy.hits(), 5);

    // Required claims: 403 naming the missing scope.
    let r = call(&proxy, "/write", Some(&valid), &[]).await;
    assert_refusal("no users:write", &r, 403, "forbidden");
    let challenge = www_authenticate(&r);
    assert!(
        challenge.contains(r#"error="insufficient_scope""#)
            && challenge.contains(r#"scope="users:write""#),
        "{challenge}"
    );
    let writer = es256("ec-1", &claims(json!({"scope": "users:read users:write"})));
    assert_eq!(call(&proxy, "/write", Some(&writer), &[]).await.status, 200);
    assert_eq!(legacy.hits(), 6);

    // Required with a shadow: refused requests reach neither.
    let forged = sign(
        Algorithm::RS256,
        "rsa-1",
        &KEYS.rsa_forger,
        &claims(json!({})),
    );
    for (what, token) in [
        ("no token", None),
        ("expired", Some(expired.as_str())),
        ("forged", Some(forged.as_str())),
    ] {
        let r = call(&proxy, "/required", token, &[]).await;
        assert_refusal(what, &r, 401, "unauthorized");
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(legacy.hits(), 6, "a refused request reached the backend");
    assert_eq!(users.hits(), 0, "a refused request reached the shadow");
    let r = call(&proxy, "/required", Some(&valid), &[]).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(legacy.hits(), 7);
    eventually(Duration::from_secs(5), || async {
        (users.hits() == 1).then_some(())
    })
    .await;
    let m = metrics_text(&proxy).await;
    assert_eq!(auth_count(&m, "/required", "missing"), 1.0, "{m}");
    assert_eq!(auth_count(&m, "/required", "expired"), 1.0, "{m}");
    assert_eq!(auth_count(&m, "/required", "bad_signature"), 1.0, "{m}");
    assert_eq!(auth_count(&m, "/required", "ok"), 1.0, "{m}");
    assert_eq!(auth_count(&m, "/optional", "anonymous"), 1.0, "{m}");
    assert_eq!(auth_count(&m, "/write", "insufficient_scope"), 1.0, "{m}");
}

// ---------------------------------------------------------------------------------- 4

#[tokio::test]
async fn claims_become_headers_for_backend_and_shadow_and_client_copies_never_pass() {
    let legacy = counted("legacy").await;
    let users = counted("users").await;
    let text = format!(
        "{SERVER}{}{}{}{}{}{}{}",
        backend("legacy", legacy.addr),
        backend("users", users.addr),
        provider(
            "fittrack",
            r#"["ES256"]"#,
            "jwks_file = \"jwks.json\"\nclaims_to_headers = { \"x-user-id\" = \"sub\", \"x-scope\" = \"scope\" }\nforward_token = true"
        ),
        provider(
            "bare",
            r#"["ES256"]"#,
            "jwks_file = \"jwks.json\"\nforward_token = false\ntoken_from = [\"header:authorization\", \"cookie:session\"]"
        ),
        route("/api", "legacy", "auth = \"fittrack\"\nshadow = \"users\""),
        route("/bare", "legacy", "auth = \"bare\""),
        route("/open", "legacy", ""),
    );
    let proxy = Proxy::start_in(dir_with_jwks(), &text).await;
    let token = es256("ec-1", &claims(json!({"sub": "user-42"})));
    let seen = |r: &Reply, name: &str| -> Vec<String> {
        r.json()["headers"][name]
            .as_array()
            .map(|a| a.iter().map(|v| v.as_str().unwrap().to_string()).collect())
            .unwrap_or_default()
    };

    // The client's own x-user-id never passes; the verified sub does.
    let r = call(
        &proxy,
        "/api/me",
        Some(&token),
        &[("x-user-id", "admin"), ("x-scope", "users:write")],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(seen(&r, "x-user-id"), ["user-42"]);
    assert_eq!(seen(&r, "x-scope"), ["users:read profile"]);
    assert_eq!(
        seen(&r, "authorization"),
        [format!("Bearer {token}")],
        "forward_token = true"
    );
    // The shadow gets the same identity.
    eventually(Duration::from_secs(5), || async {
        (users.hits() == 1).then_some(())
    })
    .await;
    let shadow = users.last_headers();
    let ids: Vec<_> = shadow.get_all("x-user-id").iter().collect();
    assert_eq!(ids, ["user-42"], "{shadow:?}");

    // A token without the claim: the header is absent, not the client's.
    let no_sub = es256("ec-1", &claims(json!({"sub": null})));
    let r = call(&proxy, "/api/me", Some(&no_sub), &[("x-user-id", "admin")]).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(seen(&r, "x-user-id"), Vec::<String>::new());

    // A route without auth strips it too: the name belongs to a provider of this file.
    let r = call(
        &proxy,
        "/open",
        None,
        &[("x-user-id", "admin"), ("X-User-Id", "root")],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(seen(&r, "x-user-id"), Vec::<String>::new());
    assert_eq!(seen(&r, "x-scope"), Vec::<String>::new());
    // And so does a route of another provider.
    let r = call(&proxy, "/bare", Some(&token), &[("x-user-id", "admin")]).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(seen(&r, "x-user-id"), Vec::<String>::new());
    // forward_token = false: the credential stops at the proxy, other cookies pass.
    assert_eq!(seen(&r, "authorization"), Vec::<String>::new());
    let r = call(
        &proxy,
        "/bare",
        None,
        &[("cookie", &format!("theme=dark; session={token}; lang=en"))],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(seen(&r, "cookie"), ["theme=dark; lang=en"]);
    assert_eq!(legacy.hits(), 5);
}

// ---------------------------------------------------------------------------------- 5

/// Two client addresses on opposite sides of a 50% canary (`users` below 5000).
fn two_sides() -> (String, String) {
    let addrs: Vec<String> = (1..=254).map(|i| format!("203.0.113.{i}")).collect();
    let side = |a: &String| {
        strangler::routes::in_canary(strangler::routes::canary_bucket(a.as_bytes()), 50.0)
    };
    let inside = addrs.iter().find(|a| side(a)).unwrap().clone();
    let outside = addrs.iter().find(|a| !side(a)).unwrap().clone();
    (inside, outside)
}

#[tokio::test]
async fn x_forwarded_for_decides_an_ip_canary_only_from_trusted_proxies() {
    let legacy = counted("legacy").await;
    let users = counted("users").await;
    let text = |trusted: &str| {
        format!(
            "{SERVER}trusted_proxies = {trusted}\n{}{}{}",
            backend("legacy", legacy.addr),
            backend("users", users.addr),
            route(
                "/",
                "legacy",
                "canary = { backend = \"users\", percent = 50, sticky = \"ip\" }"
            ),
        )
    };
    let (inside, outside) = two_sides();
    let this_side =
        if strangler::routes::in_canary(strangler::routes::canary_bucket(b"127.0.0.1"), 50.0) {
            "users"
        } else {
            "legacy"
        };

    // 127.0.0.1 is no trusted proxy: a spoofed X-Forwarded-For changes nothing.
    let untrusted = Proxy::start(&text(r#"["10.0.0.0/8"]"#)).await;
    for xff in [
        inside.as_str(),
        outside.as_str(),
        &format!("{inside}, 10.1.2.3"),
    ] {
        for _ in 0..5 {
            let r = call(&untrusted, "/x", None, &[("x-forwarded-for", xff)]).await;
            assert_eq!(r.backend(), this_side, "X-Forwarded-For: {xff}");
        }
    }

    // 127.0.0.1 trusted: the address it forwards for decides.
    let trusted = Proxy::start(&text(r#"["127.0.0.1/32", "10.0.0.0/8"]"#)).await;
    let cases = [
        (inside.clone(), "users"),
        (outside.clone(), "legacy"),
        (format!("{outside}, {inside}"), "users"),
        (format!("{inside}, 10.9.9.9"), "users"),
        (format!("{outside}, 10.9.9.9, 10.1.1.1"), "legacy"),
    ];
    for (xff, want) in &cases {
        for _ in 0..5 {
            let r = call(&trusted, "/x", None, &[("x-forwarded-for", xff)]).await;
            assert_eq!(r.backend(), *want, "X-Forwarded-For: {xff}");
        }
    }
}

// ---------------------------------------------------------------------------------- 6

#[tokio::test]
async fn a_claim_sticky_canary_keeps_each_subject_on_its_side() {
    let legacy = counted("legacy").await;
    let users = counted("users").await;
    let text = format!(
        "{SERVER}{}{}{}{}",
        backend("legacy", legacy.addr),
        backend("users", users.addr),
        provider("fittrack", r#"["ES256"]"#, "jwks_file = \"jwks.json\""),
        route(
            "/",
            "legacy",
            "auth = \"fittrack\"\ncanary = { backend = \"users\", percent = 50, sticky = \"claim:sub\" }"
        ),
    );
    let proxy = Proxy::start_in(dir_with_jwks(), &text).await;
    let subs: Vec<String> = (0..200).map(|i| format!("user-{i}")).collect();
    let side = |s: &String| {
        strangler::routes::in_canary(strangler::routes::canary_bucket(s.as_bytes()), 50.0)
    };
    let inside = subs.iter().find(|s| side(s)).unwrap();
    let outside = subs.iter().find(|s| !side(s)).unwrap();
    for (sub, want) in [(inside, "users"), (outside, "legacy")] {
        for i in 0..20 {
            // A fresh token each time (another jti): the subject, not the token, decides.
            let token = es256(
                "ec-1",
                &claims(json!({"sub": sub, "jti": format!("{sub}-{i}")})),
            );
            let r = call(&proxy, "/x", Some(&token), &[]).await;
            assert_eq!(r.status, 200, "{}", r.text());
            assert_eq!(r.backend(), want, "sub {sub}, request {i}");
        }
    }
    assert_eq!(users.hits(), 20);
    assert_eq!(legacy.hits(), 20);
}

// ---------------------------------------------------------------------------------- 7

#[tokio::test]
async fn a_cors_preflight_without_credentials_passes_a_required_route() {
    let legacy = counted("legacy").await;
    let text = format!(
        "{SERVER}{}{}{}",
        backend("legacy", legacy.addr),
        provider("fittrack", r#"["ES256"]"#, "jwks_file = \"jwks.json\""),
        route("/api", "legacy", "auth = \"fittrack\""),
    );
    let proxy = Proxy::start_in(dir_with_jwks(), &text).await;
    let preflight = [
        ("origin", "https://app.fittrack.test"),
        ("access-control-request-method", "DELETE"),
        ("access-control-request-headers", "authorization"),
    ];
    let r = send_with(
        Method::OPTIONS,
        &proxy.url("/api/users/7"),
        &preflight,
        Bytes::new(),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.backend(), "legacy");
    // OPTIONS without the preflight headers is an ordinary request.
    let r = send_with(
        Method::OPTIONS,
        &proxy.url("/api/users/7"),
        &[("origin", "https://app.fittrack.test")],
        Bytes::new(),
    )
    .await;
    assert_refusal("OPTIONS, not a preflight", &r, 401, "unauthorized");
    // A preflight that carries a bad token is checked like any request.
    let mut with_token = preflight.to_vec();
    with_token.push(("authorization", "Bearer not-a-jwt"));
    let r = send_with(
        Method::OPTIONS,
        &proxy.url("/api/users/7"),
        &with_token,
        Bytes::new(),
    )
    .await;
    assert_refusal("preflight with a bad token", &r, 401, "unauthorized");
    // The actual request still needs its token.
    let r = send_with(
        Method::DELETE,
        &proxy.url("/api/users/7"),
        &preflight[..1],
        Bytes::new(),
    )
    .await;
    assert_refusal("DELETE without a token", &r, 401, "unauthorized");
    assert_eq!(legacy.hits(), 1);
    let m = metrics_text(&proxy).await;
    assert_eq!(auth_count(&m, "/api", "preflight"), 1.0, "{m}");
}

// ---------------------------------------------------------------------------------- 8

/// `POST /reload`: the answer's JSON.
async fn post_reload(proxy: &Proxy) -> Value {
    let r = send_with(Method::POST, &proxy.admin_url("/reload"), &[], Bytes::new()).await;
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()
}

/// `/routes`' `auth_providers` entry of `name`.
async fn provider_json(proxy: &Proxy, name: &str) -> Value {
    routes_json(proxy).await["auth_providers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == name)
        .unwrap_or_else(|| panic!("no provider {name} in /routes"))
        .clone()
}

#[tokio::test]
async fn a_rewritten_jwks_file_is_picked_up_by_the_watcher_without_a_reload_call() {
    let legacy = counted("legacy").await;
    let dir = tempfile::tempdir().unwrap();
    let k = &*KEYS;
    let jwks_path = dir.path().join("jwks.json");
    std::fs::write(&jwks_path, jwks(&[(&k.es, Algorithm::ES256, "ec-1")])).unwrap();
    // Watched as by default (filesystem events), with the periodic check as the safety net.
    let text = format!(
        "{}{}{}{}",
        server("watch_interval = \"200ms\""),
        backend("legacy", legacy.addr),
        provider("fittrack", r#"["ES256"]"#, "jwks_file = \"jwks.json\""),
        route("/", "legacy", "auth = \"fittrack\""),
    );
    let proxy = Proxy::start_in(dir, &text).await;
    let old = es256("ec-1", &claims(json!({})));
    let new = sign(Algorithm::ES256, "ec-2", &k.es_next, &claims(json!({})));
    assert_eq!(call(&proxy, "/x", Some(&old), &[]).await.status, 200);
    assert_refusal(
        "kid not yet published",
        &call(&proxy, "/x", Some(&new), &[]).await,
        401,
        "unauthorized",
    );
    let generation = routes_json(&proxy).await["generation"].as_u64().unwrap();

    // The identity provider's sync job rewrites the file in place: no POST /reload, no signal.
    std::fs::write(
        &jwks_path,
        jwks(&[
            (&k.es, Algorithm::ES256, "ec-1"),
            (&k.es_next, Algorithm::ES256, "ec-2"),
        ]),
    )
    .unwrap();
    eventually(Duration::from_secs(10), || async {
        (call(&proxy, "/x", Some(&new), &[]).await.status == 200).then_some(())
    })
    .await;
    let routes = routes_json(&proxy).await;
    assert_eq!(routes["generation"].as_u64(), Some(generation + 1));
    assert_eq!(
        provider_json(&proxy, "fittrack").await["key_ids"],
        json!(["ec-1", "ec-2"])
    );

    // Then retires ec-1 the way kubelet swaps a mounted Secret: a new file renamed over it.
    let staged = jwks_path.with_extension("json.tmp");
    std::fs::write(&staged, jwks(&[(&k.es_next, Algorithm::ES256, "ec-2")])).unwrap();
    std::fs::rename(&staged, &jwks_path).unwrap();
    eventually(Duration::from_secs(10), || async {
        (call(&proxy, "/x", Some(&old), &[]).await.status == 401).then_some(())
    })
    .await;
    assert_eq!(call(&proxy, "/x", Some(&new), &[]).await.status, 200);
    assert_eq!(
        routes_json(&proxy).await["generation"].as_u64(),
        Some(generation + 2)
    );
    let m = metrics_text(&proxy).await;
    assert_eq!(
        metric(
            &m,
            "strangler_config_reloads_total",
            &[("outcome", "success")]
        ),
        Some(2.0),
        "{m}"
    );
}

#[tokio::test]
async fn a_reload_names_the_changed_key_files_in_its_changes() {
    let legacy = counted("legacy").await;
    let dir = tempfile::tempdir().unwrap();
    let k = &*KEYS;
    std::fs::write(
        dir.path().join("jwks.json"),
        jwks(&[(&k.es, Algorithm::ES256, "ec-1")]),
    )
    .unwrap();
    std::fs::write(dir.path().join("secret"), support::jwt::SECRET).unwrap();
    let text = format!(
        "{SERVER}{}{}{}{}{}",
        backend("legacy", legacy.addr),
        provider("fittrack", r#"["ES256"]"#, "jwks_file = \"jwks.json\""),
        provider("internal", r#"["HS256"]"#, "secret_file = \"secret\""),
        route("/", "legacy", "auth = \"fittrack\""),
        route("/internal", "legacy", "auth = \"internal\""),
    );
    let proxy = Proxy::start_in(dir, &text).await;
    std::fs::write(
        proxy.dir.path().join("jwks.json"),
        jwks(&[
            (&k.es, Algorithm::ES256, "ec-1"),
            (&k.es_next, Algorithm::ES256, "ec-2"),
        ]),
    )
    .unwrap();
    let r = post_reload(&proxy).await;
    assert_eq!(r["changed"], true, "{r}");
    assert_eq!(
        r["changes"],
        json!([
            "auth fittrack: keys jwks_file jwks.json (1 key) -> jwks_file jwks.json (2 keys)",
            "watched files changed: jwks.json",
        ]),
        "{r}"
    );
    // A rotated secret is a watched file too (not a "certificate").
    std::fs::write(
        proxy.dir.path().join("secret"),
        "another-secret-another-secret-another-secret",
    )
    .unwrap();
    let r = post_reload(&proxy).await;
    assert_eq!(r["changed"], true, "{r}");
    let changes: Vec<&str> = r["changes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap())
        .collect();
    assert!(
        changes.contains(&"watched files changed: secret")
            && changes.contains(&"auth internal: keys changed in secret_file secret (1 key)"),
        "{r}"
    );
    assert!(!r.to_string().contains("certificate"), "{r}");
    let token = support::jwt::hs256(
        "another-secret-another-secret-another-secret",
        AUDIENCE,
        None,
    );
    assert_eq!(
        call(&proxy, "/internal", Some(&token), &[]).await.status,
        200
    );
}

#[tokio::test]
async fn an_https_jwks_url_is_verified_with_jwks_ca_and_not_with_the_system_roots() {
    let legacy = counted("legacy").await;
    let idp_ca = support::tls::Pki::new("identity provider CA");
    let cert = idp_ca.issue(&["127.0.0.1"], false);
    let server = JwksServer::start_with(
        jwks(&[(&KEYS.es, Algorithm::ES256, "ec-1")]),
        Some(&cert),
        None,
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("idp-ca.pem"), &idp_ca.ca_pem).unwrap();
    let url = format!("https://{}/.well-known/jwks.json", server.addr);
    let text = format!(
        "{SERVER}{}{}{}{}{}",
        backend("legacy", legacy.addr),
        provider(
            "private",
            r#"["ES256"]"#,
            &format!("jwks_url = \"{url}\"\njwks_ca = \"idp-ca.pem\"\njwks_cooldown = \"1s\"")
        ),
        provider(
            "system",
            r#"["ES256"]"#,
            &format!("jwks_url = \"{url}\"\njwks_cooldown = \"1s\"")
        ),
        route("/private", "legacy", "auth = \"private\""),
        route("/system", "legacy", "auth = \"system\""),
    );
    let proxy = Proxy::start_in(dir, &text).await;
    let token = es256("ec-1", &claims(json!({})));
    // With the CA the proxy was given: fetched over TLS, and the token verifies.
    let r = eventually(Duration::from_secs(5), || async {
        let r = call(&proxy, "/private/x", Some(&token), &[]).await;
        (r.status == 200).then_some(r)
    })
    .await;
    assert_eq!(r.backend(), "legacy");
    assert_eq!(
        provider_json(&proxy, "private").await["key_ids"],
        json!(["ec-1"])
    );
    // The same URL on the system roots: the handshake fails, the fetch is counted failed,
    // and the unknown key is the proxy's outage (503), not the client's fault.
    eventually(Duration::from_secs(5), || async {
        let m = metrics_text(&proxy).await;
        (fetch_count(&m, "system", "error") >= 1.0).then_some(())
    })
    .await;
    let r = call(&proxy, "/system/x", Some(&token), &[]).await;
    assert_refusal(
        "JWKS over an untrusted certificate",
        &r,
        503,
        "auth_unavailable",
    );
    assert!(r.headers.contains_key("retry-after"));
    assert_eq!(legacy.hits(), 1);
    let m = metrics_text(&proxy).await;
    assert_eq!(fetch_count(&m, "system", "ok"), 0.0, "{m}");
    assert!(fetch_count(&m, "private", "ok") >= 1.0, "{m}");
    assert_eq!(
        provider_json(&proxy, "system").await["keys_loaded"],
        0,
        "no key from a server the proxy does not trust"
    );
    // Only the trusted client's requests got through the handshake to the server.
    assert_eq!(server.fetches() as f64, fetch_count(&m, "private", "ok"));
}

/// The proxy as a child process (`strangler run`) with `env` set: how a secret reaches it
/// from the environment. Answers the listen address, and the child (killed on drop).
async fn run_binary(
    dir: &Path,
    env: &[(&str, &str)],
) -> Result<(String, tokio::process::Child), String> {
    use tokio::io::AsyncBufReadExt;
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_strangler"));
    cmd.args(["run", "--log-format", "json", "--config"])
        .arg(dir.join("routes.toml"))
        .env_remove("STRANGLER_CONFIG")
        .env("RUST_LOG", "info")
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().unwrap();
    let mut lines = tokio::io::BufReader::new(child.stderr.take().unwrap()).lines();
    let mut seen = Vec::new();
    let serving: Value = loop {
        let next = tokio::time::timeout(Duration::from_secs(20), lines.next_line()).await;
        match next {
            Ok(Ok(Some(line))) if line.contains("strangler is serving") => {
                break serde_json::from_str(&line).unwrap()
            }
            Ok(Ok(Some(line))) => seen.push(line),
            _ => return Err(seen.join("\n")),
        }
    };
    // Keep reading so the child never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    let listen = serving["fields"]["listen"].as_str().unwrap().to_string();
    Ok((listen, child))
}

#[tokio::test]
async fn a_secret_from_the_environment_verifies_hs256_end_to_end() {
    let legacy = counted("legacy").await;
    let var = "STRANGLER_TEST_JWT_SECRET_E2E";
    let secret = "env-secret-env-secret-env-secret-0123456789";
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        "{SERVER}{}{}{}",
        backend("legacy", legacy.addr),
        provider(
            "internal",
            r#"["HS256"]"#,
            &format!("secret_env = \"{var}\"")
        ),
        route("/", "legacy", "auth = \"internal\""),
    );
    std::fs::write(dir.path().join("routes.toml"), &text).unwrap();

    // Without the variable, the proxy does not start, and says where.
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_strangler"))
        .args(["run", "--config"])
        .arg(dir.path().join("routes.toml"))
        .env_remove(var)
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let (line, col) = position(&text, &format!("\"{var}\""));
    assert!(
        stderr.contains(&format!("routes.toml:{line}:{col}: "))
            && stderr.contains("the secret is empty or unset"),
        "{stderr}"
    );

    let (listen, mut child) = run_binary(dir.path(), &[(var, secret)]).await.unwrap();
    let url = format!("http://{listen}/x");
    let get_with = |token: String| {
        let url = url.clone();
        async move {
            send_with(
                Method::GET,
                &url,
                &[("authorization", &format!("Bearer {token}"))],
                Bytes::new(),
            )
            .await
        }
    };
    let r = get_with(support::jwt::hs256(secret, AUDIENCE, Some("svc-7"))).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.backend(), "legacy");
    let r = get_with(support::jwt::hs256(
        "not-the-secret-not-the-secret-not-the",
        AUDIENCE,
        None,
    ))
    .await;
    assert_refusal("another secret", &r, 401, "unauthorized");
    let r = get_with(support::jwt::hs256(secret, "another-api", None)).await;
    assert_refusal("another audience", &r, 401, "unauthorized");
    assert_eq!(legacy.hits(), 1);
    child.kill().await.unwrap();
}

#[tokio::test]
async fn retry_after_counts_down_to_the_next_allowed_fetch_and_a_retry_then_fetches() {
    let legacy = counted("legacy").await;
    let k = &*KEYS;
    // The identity provider is failing (500) from the start.
    let server = JwksServer::start(jwks(&[(&k.es, Algorithm::ES256, "ec-1")])).await;
    server.set_status(StatusCode::INTERNAL_SERVER_ERROR);
    let cooldown = 5u64;
    let text = url_table(
        legacy.addr,
        server.addr,
        &format!("jwks_cooldown = \"{cooldown}s\""),
    );
    let started = Instant::now();
    let proxy = Proxy::start(&text).await;
    // The fetch at start fails; from then on, one forced fetch may come after 5 s.
    eventually(Duration::from_secs(5), || async {
        (server.fetches() == 1).then_some(())
    })
    .await;
    let first_fetch = server.fetched_at()[0];
    let failed = || async { fetch_count(&metrics_text(&proxy).await, "fittrack", "error") };
    eventually(Duration::from_secs(5), || async {
        (failed().await == 1.0).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;

    let token = sign(Algorithm::ES256, "ec-2", &k.es_next, &claims(json!({})));
    let asked = Instant::now();
    let r = call(&proxy, "/x", Some(&token), &[]).await;
    assert_refusal("unknown kid, JWKS failing", &r, 503, "auth_unavailable");
    let retry: u64 = r.headers["retry-after"].to_str().unwrap().parse().unwrap();
    // Rounded up: the time left of the 5 s, counted from the fetch (which the server saw
    // after the proxy started and before this request).
    let most = cooldown as f64 - asked.duration_since(first_fetch).as_secs_f64();
    let least = cooldown as f64 - Instant::now().duration_since(started).as_secs_f64();
    assert!(
        (1..=cooldown).contains(&retry)
            && retry as f64 >= least.floor()
            && retry as f64 <= most.ceil(),
        "Retry-After {retry}, want between {least:.2} and {most:.2} rounded"
    );
    assert!(
        retry < cooldown,
        "Retry-After {retry} ignores the 2 s that passed"
    );
    assert_eq!(server.fetches(), 1, "no fetch inside the cooldown");
    // The same token again, and another unknown kid, inside the cooldown: no fetch.
    let r = call(&proxy, "/x", Some(&token), &[]).await;
    assert_refusal("again, in cooldown", &r, 503, "auth_unavailable");
    let r = call(&proxy, "/x", Some(&es256("ec-9", &claims(json!({})))), &[]).await;
    assert_refusal("another kid, in cooldown", &r, 503, "auth_unavailable");
    assert_eq!(server.fetches(), 1, "no fetch inside the cooldown");

    // The identity provider recovers and publishes ec-2; a client that waits exactly the
    // Retry-After it was given gets its answer from a fresh fetch.
    server.set_doc(jwks(&[
        (&k.es, Algorithm::ES256, "ec-1"),
        (&k.es_next, Algorithm::ES256, "ec-2"),
    ]));
    server.set_status(StatusCode::OK);
    tokio::time::sleep(Duration::from_secs(retry)).await;
    let r = call(&proxy, "/x", Some(&token), &[]).await;
    assert_eq!(
        r.status,
        200,
        "after Retry-After {retry} s the fetch is allowed: {}",
        r.text()
    );
    assert_eq!(server.fetches(), 2);
    assert_eq!(legacy.hits(), 1);
    let m = metrics_text(&proxy).await;
    assert_eq!(fetch_count(&m, "fittrack", "error"), 1.0, "{m}");
    assert_eq!(fetch_count(&m, "fittrack", "ok"), 1.0, "{m}");
}

#[tokio::test]
async fn an_oversized_jwks_is_invalid_and_a_slow_one_times_out_and_both_keep_the_keys() {
    let legacy = counted("legacy").await;
    let k = &*KEYS;
    let server = JwksServer::start(jwks(&[(&k.es, Algorithm::ES256, "ec-1")])).await;
    let text = url_table(
        legacy.addr,
        server.addr,
        "jwks_cooldown = \"1s\"\njwks_timeout = \"1s\"",
    );
    let proxy = Proxy::start(&text).await;
    let known = es256("ec-1", &claims(json!({})));
    eventually(Duration::from_secs(5), || async {
        (call(&proxy, "/x", Some(&known), &[]).await.status == 200).then_some(())
    })
    .await;
    let counts = || async {
        let m = metrics_text(&proxy).await;
        ["ok", "error", "timeout", "invalid"].map(|o| fetch_count(&m, "fittrack", o))
    };
    assert_eq!(counts().await, [1.0, 0.0, 0.0, 0.0]);

    // A document past 256 KiB that would carry ec-2: refused whole, counted invalid.
    let with_next = jwks(&[
        (&k.es, Algorithm::ES256, "ec-1"),
        (&k.es_next, Algorithm::ES256, "ec-2"),
    ]);
    let padded = format!(
        "{}, \"padding\": \"{}\"}}",
        with_next.trim_end_matches('}'),
        "x".repeat(257 << 10)
    );
    assert!(serde_json::from_str::<Value>(&padded).is_ok());
    server.set_doc(padded);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let next = sign(Algorithm::ES256, "ec-2", &k.es_next, &claims(json!({})));
    let r = call(&proxy, "/x", Some(&next), &[]).await;
    assert_refusal(
        "ec-2 only in an oversized JWKS",
        &r,
        503,
        "auth_unavailable",
    );
    assert_eq!(counts().await, [1.0, 0.0, 0.0, 1.0]);
    assert_eq!(call(&proxy, "/x", Some(&known), &[]).await.status, 200);
    assert_eq!(
        provider_json(&proxy, "fittrack").await["key_ids"],
        json!(["ec-1"])
    );
    // Just under the cap is taken.
    server.set_doc(format!(
        "{}, \"padding\": \"{}\"}}",
        with_next.trim_end_matches('}'),
        "x".repeat((256 << 10) - with_next.len() - 20)
    ));
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(call(&proxy, "/x", Some(&next), &[]).await.status, 200);
    assert_eq!(counts().await, [2.0, 0.0, 0.0, 1.0]);

    // A server that answers after 3 s: the fetch gives up at jwks_timeout (1 s), counted
    // timeout; the request that forced it waits no longer than that.
    server.set_delay(Duration::from_secs(3));
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let third = es256("ec-3", &claims(json!({})));
    let asked = Instant::now();
    let r = call(&proxy, "/x", Some(&third), &[]).await;
    let waited = asked.elapsed();
    assert_refusal("JWKS too slow", &r, 503, "auth_unavailable");
    assert!(
        waited >= Duration::from_millis(950) && waited < Duration::from_millis(2500),
        "the forced fetch took {waited:?} with jwks_timeout 1s"
    );
    assert_eq!(counts().await, [2.0, 0.0, 1.0, 1.0]);
    // The keys that worked still do.
    assert_eq!(call(&proxy, "/x", Some(&known), &[]).await.status, 200);
    assert_eq!(call(&proxy, "/x", Some(&next), &[]).await.status, 200);
}

#[tokio::test]
async fn observe_forwards_and_counts_every_reason_in_metrics_and_on_routes() {
    let legacy = counted("legacy").await;
    // A JWKS URL nothing answers: its keys are unavailable.
    let down = closed_port().await;
    let text = format!(
        "{SERVER}{}{}{}{}{}",
        backend("legacy", legacy.addr),
        provider(
            "fittrack",
            r#"["RS256", "ES256"]"#,
            "jwks_file = \"jwks.json\""
        ),
        provider(
            "remote",
            r#"["ES256"]"#,
            &format!("jwks_url = \"http://{down}/jwks.json\"\njwks_cooldown = \"1s\"")
        ),
        route(
            "/observe",
            "legacy",
            "auth = { provider = \"fittrack\", mode = \"observe\", require = { scope = \"users:write\" } }"
        ),
        route(
            "/remote",
            "legacy",
            "auth = { provider = \"remote\", mode = \"observe\" }"
        ),
    );
    let proxy = Proxy::start_in(dir_with_jwks(), &text).await;
    let writer = es256("ec-1", &claims(json!({"scope": "users:write"})));
    let reader = es256("ec-1", &claims(json!({})));
    let expired = es256("ec-1", &claims(json!({"exp": now() - 3600})));
    let forged = sign(
        Algorithm::RS256,
        "rsa-1",
        &KEYS.rsa_forger,
        &claims(json!({"scope": "users:write"})),
    );
    let bearer = |t: &str| format!("Bearer {t}");
    let (w, f, e) = (bearer(&writer), bearer(&forged), bearer(&expired));
    let requests: Vec<(&str, Vec<(&str, &str)>)> = vec![
        ("ok", vec![("authorization", w.as_str())]),
        ("ok", vec![("authorization", w.as_str())]),
        ("missing", vec![]),
        ("expired", vec![("authorization", e.as_str())]),
        ("bad_signature", vec![("authorization", f.as_str())]),
        (
            "malformed",
            vec![("authorization", w.as_str()), ("authorization", w.as_str())],
        ),
        ("malformed", vec![("authorization", "Bearer abc$def.ghi")]),
        ("bad_token", vec![("authorization", "Bearer not-a-jwt")]),
    ];
    for (outcome, headers) in &requests {
        let r = send_with(Method::GET, &proxy.url("/observe/x"), headers, Bytes::new()).await;
        assert_eq!(r.status, 200, "{outcome}: {}", r.text());
        assert_eq!(r.backend(), "legacy", "{outcome}");
    }
    // A valid token without the required scope: forwarded, with its identity.
    let r = call(&proxy, "/observe/x", Some(&reader), &[]).await;
    assert_eq!(r.status, 200, "{}", r.text());
    // Keys that cannot be fetched.
    eventually(Duration::from_secs(5), || async {
        let m = metrics_text(&proxy).await;
        (fetch_count(&m, "remote", "error") >= 1.0).then_some(())
    })
    .await;
    for _ in 0..2 {
        let r = call(&proxy, "/remote/x", Some(&reader), &[]).await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert!(!r.headers.contains_key("retry-after"));
    }
    assert_eq!(legacy.hits(), requests.len() + 3, "everything forwarded");

    let want = json!({
        "ok": 2, "missing": 1, "expired": 1, "bad_signature": 1, "malformed": 2,
        "bad_token": 1, "insufficient_scope": 1,
    });
    let m = metrics_text(&proxy).await;
    for (outcome, n) in want.as_object().unwrap() {
        assert_eq!(
            auth_count(&m, "/observe", outcome),
            n.as_f64().unwrap(),
            "{outcome}\n{m}"
        );
    }
    assert_eq!(auth_count(&m, "/remote", "keys_unavailable"), 2.0, "{m}");
    let observe = route_json(&proxy, "/observe").await;
    assert_eq!(
        observe["auth"],
        json!({
            "mode": "observe",
            "provider": "fittrack",
            "require": {"scope": ["users:write"]},
            "outcomes": want,
        }),
        "{observe}"
    );
    assert_eq!(
        route_json(&proxy, "/remote").await["auth"]["outcomes"],
        json!({"keys_unavailable": 2})
    );
    // Forwarded requests are the backend's answers, not refusals.
    assert_eq!(
        metric(
            &m,
            "strangler_requests_total",
            &[
                ("route", "/observe"),
                ("backend", "legacy"),
                ("status", "200")
            ]
        ),
        Some((requests.len() + 1) as f64),
        "{m}"
    );
}

#[tokio::test]
async fn refused_requests_neither_trip_the_guard_nor_dilute_its_error_rate() {
    let legacy = counted("legacy").await;
    let users = start_echo("users").await;
    let text = format!(
        "{SERVER}{}{}{}{}",
        backend("legacy", legacy.addr),
        backend("users", users.addr),
        provider("fittrack", r#"["ES256"]"#, "jwks_file = \"jwks.json\""),
        route(
            "/",
            "users",
            "auth = \"fittrack\"\n[routes.guard]\nmax_error_rate = 0.5\nmin_requests = 10\nwindow = \"1m\""
        ),
    );
    let proxy = Proxy::start_in(dir_with_jwks(), &text).await;
    let token = es256("ec-1", &claims(json!({})));
    let forged = sign(
        Algorithm::RS256,
        "rsa-1",
        &KEYS.rsa_forger,
        &claims(json!({})),
    );
    let tripped = || async { route_json(&proxy, "/").await["guard_tripped"] == true };
    let refuse = |n: usize| {
        let (proxy, forged) = (&proxy, &forged);
        async move {
            for i in 0..n {
                let token = (i % 2 == 0).then_some(forged.as_str());
                let r = call(proxy, "/ok", token, &[]).await;
                assert_eq!(r.status, 401, "{}", r.text());
            }
        }
    };

    // 200 refusals: not errors of the new backend, so the guard stays.
    refuse(200).await;
    assert!(!tripped().await, "401s tripped the guard");

    // Real answers among many more refusals: 4 successes, then 6 backend 500s. The guard
    // judges those 10 alone: at the 10th answer, 6 of 10 failed (over 0.5) and it trips,
    // exactly as it would with no refusal around them.
    for i in 0..10usize {
        refuse(20).await;
        let path = if i < 4 { "/ok" } else { "/status/500" };
        let r = call(&proxy, path, Some(&token), &[]).await;
        assert_eq!(r.backend(), "users");
        assert_eq!(r.status, if i < 4 { 200 } else { 500 });
        assert_eq!(
            tripped().await,
            i == 9,
            "after {} answers of the backend ({} of them 500) among {} refusals",
            i + 1,
            i.saturating_sub(3),
            200 + 20 * (i + 1)
        );
    }
    assert_eq!(
        route_json(&proxy, "/").await["stage"],
        "rolled back by guard"
    );
    // Rolled back: a verified request goes to legacy; a refused one still reaches nobody.
    let r = call(&proxy, "/ok", Some(&token), &[]).await;
    assert_eq!(r.backend(), "legacy");
    refuse(2).await;
    assert_eq!(legacy.hits(), 1);
    let m = metrics_text(&proxy).await;
    assert_eq!(
        metric(
            &m,
            "strangler_requests_total",
            &[("route", "/"), ("backend", "none"), ("status", "401")]
        ),
        Some(402.0),
        "{m}"
    );
}

/// Takes about 33 s: the refresh comes at three quarters of the JWKS's `max-age` (44 s),
/// well before `jwks_refresh` (60 s), and neither at 30 s (the floor) nor at 44 s.
#[tokio::test]
async fn the_background_refresh_comes_at_three_quarters_of_max_age_before_jwks_refresh() {
    let legacy = counted("legacy").await;
    let k = &*KEYS;
    let server = JwksServer::start_with(
        jwks(&[(&k.es, Algorithm::ES256, "ec-1")]),
        None,
        Some("public, max-age=44"),
    )
    .await;
    let text = url_table(
        legacy.addr,
        server.addr,
        "jwks_refresh = \"60s\"\njwks_cooldown = \"30s\"",
    );
    let proxy = Proxy::start(&text).await;
    eventually(Duration::from_secs(5), || async {
        (server.fetches() == 1).then_some(())
    })
    .await;
    // The identity provider publishes ec-2; nobody asks for it (no forced fetch), so only the
    // background refresh can bring it.
    server.set_doc(jwks(&[
        (&k.es, Algorithm::ES256, "ec-1"),
        (&k.es_next, Algorithm::ES256, "ec-2"),
    ]));
    eventually(Duration::from_secs(40), || async {
        (server.fetches() >= 2).then_some(())
    })
    .await;
    let at = server.fetched_at();
    let gap = at[1].duration_since(at[0]);
    assert!(
        gap >= Duration::from_millis(32_900) && gap < Duration::from_secs(38),
        "refreshed {gap:?} after the first fetch; want 33 s (3/4 of max-age 44 s)"
    );
    assert_eq!(server.fetches(), 2);
    let token = sign(Algorithm::ES256, "ec-2", &k.es_next, &claims(json!({})));
    let r = eventually(Duration::from_secs(5), || async {
        let r = call(&proxy, "/x", Some(&token), &[]).await;
        (r.status == 200).then_some(r)
    })
    .await;
    assert_eq!(r.backend(), "legacy");
    assert_eq!(
        server.fetches(),
        2,
        "ec-2 came with the refresh, not a forced fetch"
    );
}

#[tokio::test]
async fn routes_shows_auth_state_and_an_unrelated_reload_keeps_keys_caches_and_counts() {
    let legacy = counted("legacy").await;
    let server = JwksServer::start(jwks(&[(&KEYS.es, Algorithm::ES256, "ec-1")])).await;
    let text = |extra_route: bool, realm: &str| {
        format!(
            "{SERVER}{}{}{}{}{}",
            backend("legacy", legacy.addr),
            provider(
                "fittrack",
                r#"["ES256"]"#,
                &format!(
                    "jwks_url = \"http://{}/jwks.json\"\njwks_cooldown = \"1s\"\nrealm = \"{realm}\"\nclaims_to_headers = {{ \"x-user-id\" = \"sub\" }}",
                    server.addr
                )
            ),
            provider("files", r#"["RS256", "ES256", "EdDSA"]"#, "jwks_file = \"jwks.json\"\nforward_token = false\ntoken_from = [\"cookie:session\"]"),
            route(
                "/api",
                "legacy",
                "auth = { provider = \"fittrack\", require = { scope = \"users:read\" } }"
            ),
            if extra_route {
                route("/other", "legacy", "")
            } else {
                String::new()
            },
        )
    };
    let proxy = Proxy::start_in(dir_with_jwks(), &text(false, "fittrack")).await;
    let token = es256("ec-1", &claims(json!({})));
    eventually(Duration::from_secs(5), || async {
        (call(&proxy, "/api/x", Some(&token), &[]).await.status == 200).then_some(())
    })
    .await;
    assert_eq!(call(&proxy, "/api/x", Some(&token), &[]).await.status, 200);
    assert_eq!(call(&proxy, "/api/x", None, &[]).await.status, 401);

    let fittrack = provider_json(&proxy, "fittrack").await;
    assert_eq!(
        fittrack,
        json!({
            "name": "fittrack",
            "algorithms": ["ES256"],
            "audiences": [AUDIENCE],
            "issuer": ISSUER,
            "cached_tokens": 1,
            "claims_to_headers": {"x-user-id": "sub"},
            "clock_skew": "1m",
            "forward_token": true,
            "key_ids": ["ec-1"],
            "keys": format!("jwks_url http://{}/jwks.json (refreshed every 10m)", server.addr),
            "keys_loaded": 1,
            "realm": "fittrack",
            "token_from": ["header:authorization"],
        }),
        "{fittrack}"
    );
    let files = provider_json(&proxy, "files").await;
    assert_eq!(
        files["key_ids"],
        json!(["ec-1", "ed-1", "rsa-1"]),
        "{files}"
    );
    assert_eq!(files["keys_loaded"], 3, "{files}");
    assert_eq!(files["cached_tokens"], 0, "{files}");
    assert_eq!(files["keys"], "jwks_file jwks.json (3 keys)", "{files}");
    assert_eq!(files["forward_token"], false, "{files}");
    assert_eq!(files["token_from"], json!(["cookie:session"]), "{files}");
    let api = route_json(&proxy, "/api").await;
    assert_eq!(
        api["auth"],
        json!({
            "mode": "required",
            "provider": "fittrack",
            "require": {"scope": ["users:read"]},
            "outcomes": {"ok": 2, "missing": 1},
        }),
        "{api}"
    );
    let fetch_ok = || async { fetch_count(&metrics_text(&proxy).await, "fittrack", "ok") };
    let (fetches, counted_ok) = (server.fetches(), fetch_ok().await);
    assert_eq!(fetches as f64, counted_ok);

    // An edit that leaves the provider alone: same keys, same cache, no fetch, counts kept.
    reload_with(&proxy, &text(true, "fittrack")).await;
    assert!(route_json(&proxy, "/other").await.get("auth").is_none());
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        server.fetches(),
        fetches,
        "a fetch after an unrelated reload"
    );
    assert_eq!(fetch_ok().await, counted_ok);
    let kept = provider_json(&proxy, "fittrack").await;
    assert_eq!(kept["cached_tokens"], 1, "{kept}");
    assert_eq!(kept["key_ids"], json!(["ec-1"]), "{kept}");
    assert_eq!(
        route_json(&proxy, "/api").await["auth"]["outcomes"],
        json!({"ok": 2, "missing": 1})
    );
    assert_eq!(call(&proxy, "/api/x", Some(&token), &[]).await.status, 200);
    assert_eq!(
        provider_json(&proxy, "fittrack").await["cached_tokens"],
        1,
        "the same token, still one cached verdict"
    );
    assert_eq!(
        route_json(&proxy, "/api").await["auth"]["outcomes"],
        json!({"ok": 3, "missing": 1})
    );

    // An edit of the provider (its realm) starts it afresh: an empty cache and a fetch of
    // its own; the route's counts are the route's and stay.
    reload_with(&proxy, &text(true, "fittrack-2")).await;
    let fresh = provider_json(&proxy, "fittrack").await;
    assert_eq!(fresh["cached_tokens"], 0, "{fresh}");
    assert_eq!(fresh["realm"], "fittrack-2", "{fresh}");
    eventually(Duration::from_secs(5), || async {
        (server.fetches() == fetches + 1).then_some(())
    })
    .await;
    assert_eq!(
        route_json(&proxy, "/api").await["auth"]["outcomes"],
        json!({"ok": 3, "missing": 1})
    );
    assert_eq!(call(&proxy, "/api/x", Some(&token), &[]).await.status, 200);
    assert_eq!(provider_json(&proxy, "fittrack").await["cached_tokens"], 1);
}

//! The CPU cost of a route's `auth` phase, per request, for `bench/auth_cost.sh`: the real
//! phase (`RouteAuthRuntime::authenticate`, as the proxy calls it) on a provider per algorithm,
//! with keys made here.
//!
//! `auth_cost ALG MODE N`: makes keys and tokens signed with ALG (RS256, ES256, EdDSA,
//! HS256), then authenticates N requests in [`authenticate_all`]: `miss` with N distinct
//! tokens (each verified: signature, claims, then cached), `hit` with one token verified once
//! before (a cache hit: the token's SHA-256, a lookup, `exp` rechecked). `bench/auth_cost.sh`
//! runs it under callgrind collecting inside `authenticate_all` only, so key generation and
//! signing (whose cost varies from run to run) are not counted.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a benchmark: a panic is a failure report

use aws_lc_rs::encoding::AsDer;
use aws_lc_rs::rsa::KeySize;
use aws_lc_rs::signature::{
    EcdsaKeyPair, Ed25519KeyPair, RsaKeyPair, ECDSA_P256_SHA256_FIXED_SIGNING,
};
use http::{HeaderMap, HeaderValue, Method};
use jsonwebtoken::jwk::{Jwk, JwkSet};
use jsonwebtoken::{Algorithm, EncodingKey, Header};

const SECRET: &str = "bench-secret-bench-secret-bench-secret-0123";

/// PKCS#1 RSAPrivateKey from inside a PKCS#8 wrapper (jsonwebtoken's aws-lc backend reads
/// RSA signing keys as PKCS#1).
fn pkcs8_to_pkcs1(pkcs8: &[u8]) -> Vec<u8> {
    fn tlv(b: &[u8]) -> (&[u8], &[u8]) {
        let (len, hdr) = if b[1] < 0x80 {
            (b[1] as usize, 2)
        } else {
            let n = (b[1] & 0x7f) as usize;
            (
                b[2..2 + n].iter().fold(0, |a, &x| (a << 8) | x as usize),
                2 + n,
            )
        };
        (&b[hdr..hdr + len], &b[hdr + len..])
    }
    let (seq, _) = tlv(pkcs8);
    let (_version, rest) = tlv(seq);
    let (_algorithm, rest) = tlv(rest);
    let (pkcs1, _) = tlv(rest);
    pkcs1.to_vec()
}

fn signing_key(alg: Algorithm) -> EncodingKey {
    match alg {
        Algorithm::RS256 => {
            let kp = RsaKeyPair::generate(KeySize::Rsa2048).unwrap();
            let der = AsDer::<aws_lc_rs::encoding::Pkcs8V1Der>::as_der(&kp).unwrap();
            EncodingKey::from_rsa_der(&pkcs8_to_pkcs1(der.as_ref()))
        }
        Algorithm::ES256 => {
            let kp = EcdsaKeyPair::generate(&ECDSA_P256_SHA256_FIXED_SIGNING).unwrap();
            EncodingKey::from_ec_der(kp.to_pkcs8v1().unwrap().as_ref())
        }
        Algorithm::EdDSA => {
            let kp = Ed25519KeyPair::generate().unwrap();
            EncodingKey::from_ed_der(kp.to_pkcs8v1().unwrap().as_ref())
        }
        _ => EncodingKey::from_secret(SECRET.as_bytes()),
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let [_, alg, mode, n] = args.as_slice() else {
        eprintln!("usage: auth_cost RS256|ES256|EdDSA|HS256 miss|hit N");
        std::process::exit(2);
    };
    let alg: Algorithm = alg.parse().expect("an algorithm");
    let n: usize = n.parse().unwrap();
    let total = if mode == "hit" { 1 } else { n };
    let dir = tempfile::tempdir().unwrap();
    let key = signing_key(alg);
    let source = if alg == Algorithm::HS256 {
        // One thread so far: nothing else reads the environment while it changes.
        std::env::set_var("AUTH_COST_SECRET", SECRET);
        "secret_env = \"AUTH_COST_SECRET\"".to_string()
    } else {
        let mut jwk = Jwk::from_encoding_key(&key, alg).unwrap();
        jwk.common.key_id = Some("k1".into());
        let set = JwkSet { keys: vec![jwk] };
        std::fs::write(
            dir.path().join("jwks.json"),
            serde_json::to_vec(&set).unwrap(),
        )
        .unwrap();
        "jwks_file = \"jwks.json\"".to_string()
    };
    let toml = format!(
        "[backends.legacy]\nurl = \"http://127.0.0.1:9\"\n\
         [auth.bench]\nissuer = \"https://issuer.bench/\"\naudiences = [\"bench\"]\n\
         algorithms = [\"{alg:?}\"]\n{source}\n\
         claims_to_headers = {{ \"x-user-id\" = \"sub\" }}\n\
         [[routes]]\nprefix = \"/\"\nbackend = \"legacy\"\nauth = \"bench\"\n"
    );
    let parsed = strangler::config::parse_at(&toml, dir.path()).expect("a valid config");
    let table = &parsed.table;
    let metrics = strangler::metrics::Metrics::new();
    let registry = strangler::auth::Auth::default();
    let providers = registry.providers(table, &metrics);
    let routes = registry.routes(table, &providers);
    let runtime = routes[0].as_ref().expect("the route has auth");
    let route_auth = table
        .route(strangler::routes::RouteId::new(0))
        .auth
        .as_ref()
        .unwrap();
    let provider = table.provider(route_auth.provider);

    let now = strangler::jwt::now();
    let mut header = Header::new(alg);
    header.kid = (alg != Algorithm::HS256).then(|| "k1".to_string());
    let tokens: Vec<HeaderMap> = (0..total)
        .map(|i| {
            let claims = serde_json::json!({
                "iss": "https://issuer.bench/", "aud": "bench", "sub": format!("user-{i}"),
                "scope": "read write", "iat": now, "exp": now + 3600,
            });
            let token = jsonwebtoken::encode(&header, &claims, &key).unwrap();
            let mut h = HeaderMap::new();
            h.insert(
                http::header::AUTHORIZATION,
                HeaderValue::from_str(&format!("Bearer {token}")).unwrap(),
            );
            h
        })
        .collect();
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let check = |h: &HeaderMap| {
        let passed = rt
            .block_on(runtime.authenticate(provider, route_auth, &metrics, "/", &Method::GET, h))
            .expect("a valid token passes");
        assert!(passed.claims.is_some());
    };
    let requests: Vec<&HeaderMap> = match mode.as_str() {
        "miss" => tokens.iter().collect(),
        "hit" => {
            check(&tokens[0]);
            std::iter::repeat_n(&tokens[0], n).collect()
        }
        other => panic!("unknown mode {other:?}"),
    };
    let start = std::time::Instant::now();
    authenticate_all(&requests, check);
    let each = start.elapsed() / n.max(1) as u32;
    println!("{alg:?} {mode}: {n} requests authenticated, {each:?} each (wall clock)");
}

/// The measured part: one `auth` phase per request.
#[inline(never)]
fn authenticate_all(requests: &[&HeaderMap], check: impl Fn(&HeaderMap)) {
    for h in requests {
        check(h);
    }
}

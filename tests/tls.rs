#![allow(clippy::unwrap_used, clippy::expect_used)]
//! TLS termination (curl over HTTP/1.1 and HTTP/2, SNI, client certificates, certificate
//! reload), h2c, https and HTTP/2 upstreams with mTLS, trailers and gRPC-style streaming,
//! gRPC shadow comparison, and bad certificate files. Certificates come from a CA made in
//! each test (rcgen).

mod support;

use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body::Frame;
use http_body_util::BodyExt;
use support::tls::*;
use support::*;

const NAMES: &[&str] = &["localhost", "127.0.0.1"];

/// A proxy terminating TLS with `proxy.pem`/`proxy.key` from `pki`, `extra_tls` added inside
/// the `tls` table and `extra_server` to `[server]`; `routes` is the rest of the file.
async fn tls_proxy(
    pki: &Pki,
    extra_tls: &str,
    extra_server: &str,
    routes: &str,
    prepare: impl FnOnce(&Path),
) -> Proxy {
    let dir = tempfile::tempdir().unwrap();
    pki.issue(NAMES, false).write(dir.path(), "proxy");
    std::fs::write(dir.path().join("ca.pem"), &pki.ca_pem).unwrap();
    prepare(dir.path());
    let text = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\ndrain_timeout = \"2s\"\n{extra_server}\ntls = {{ cert = \"proxy.pem\", key = \"proxy.key\"{extra_tls} }}\n\n{routes}"
    );
    Proxy::start_in(dir, &text).await
}

async fn curl(args: &[&str]) -> (bool, String, String) {
    let out = tokio::process::Command::new("curl")
        .args(args)
        .output()
        .await
        .expect("curl must be installed (CI installs it)");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// GET `path` over HTTP/1.1 on a TLS connection; the status, or the error.
async fn get_tls(
    proxy: &Proxy,
    name: &str,
    config: std::sync::Arc<rustls::ClientConfig>,
    path: &str,
) -> Result<(StatusCode, http::HeaderMap, Bytes), String> {
    let tls = connect(proxy.addr, name, config)
        .await
        .map_err(|e| e.to_string())?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
            .await
            .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let req = Request::get(path)
        .header("host", name)
        .body(empty())
        .unwrap();
    let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.map_err(|e| e.to_string())?.to_bytes();
    Ok((parts.status, parts.headers, body))
}

#[tokio::test]
async fn curl_reaches_the_monolith_over_http1_and_http2_with_the_ca() {
    let pki = Pki::new("strangler test CA");
    let legacy = start_echo("legacy").await;
    let routes = legacy_route(legacy.addr, "/");
    let proxy = tls_proxy(&pki, "", "", &routes, |_| {}).await;
    let port = proxy.addr.port();
    let ca = proxy.dir.path().join("ca.pem");
    let url = format!("https://localhost:{port}/api/users?page=2");
    let resolve = format!("localhost:{port}:127.0.0.1");
    for (flag, version) in [("--http1.1", "1.1"), ("--http2", "2")] {
        let (ok, out, err) = curl(&[
            "-sS",
            flag,
            "--cacert",
            ca.to_str().unwrap(),
            "--resolve",
            &resolve,
            "-w",
            "\n%{http_version} %{http_code}",
            &url,
        ])
        .await;
        assert!(ok, "curl {flag} failed: {err}");
        let (body, tail) = out.rsplit_once('\n').unwrap();
        assert_eq!(tail, format!("{version} 200"), "curl {flag}");
        let echoed: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(echoed["path"], "/api/users?page=2", "{flag}");
        assert_eq!(echoed["headers"]["x-forwarded-proto"][0], "https", "{flag}");
        // HTTP/2 has no Host header; the backend (HTTP/1.1) gets :authority as Host.
        assert_eq!(
            echoed["headers"]["host"][0],
            format!("localhost:{port}"),
            "{flag}"
        );
    }
    // Without the CA, curl refuses the certificate: it really is verified against it.
    let (ok, _, err) = curl(&["-sS", "--resolve", &resolve, &url]).await;
    assert!(!ok && err.contains("certificate"), "{err}");
    // Plain HTTP on the TLS port gets nowhere.
    let (ok, _, _) = curl(&[
        "-sS",
        "--max-time",
        "5",
        &format!("http://127.0.0.1:{port}/"),
    ])
    .await;
    assert!(!ok);
}

#[tokio::test]
async fn sni_selects_the_certificate_and_the_default_covers_the_rest() {
    let pki = Pki::new("sni CA");
    let legacy = start_legacy(Default::default()).await;
    let api = pki.issue(&["api.fittrack.example"], false);
    let routes = legacy_route(legacy.addr, "/");
    let proxy = tls_proxy(
        &pki,
        ", sni = [{ cert = \"api.pem\", key = \"api.key\" }]",
        "",
        &routes,
        |dir| api.write(dir, "api"),
    )
    .await;
    let client = pki.client(&[b"http/1.1"], None);
    let s = connect(proxy.addr, "api.fittrack.example", client.clone())
        .await
        .unwrap();
    assert_eq!(
        presented(&s),
        api.der,
        "SNI api.fittrack.example gets its own certificate"
    );
    let default = connect(proxy.addr, "localhost", client.clone())
        .await
        .unwrap();
    assert_ne!(presented(&default), api.der, "other names get the default");
    // No SNI at all (an IP address): the default, which covers 127.0.0.1.
    let by_ip = connect(proxy.addr, "127.0.0.1", client.clone())
        .await
        .unwrap();
    assert_eq!(presented(&by_ip), presented(&default));
    let (status, _, _) = get_tls(&proxy, "api.fittrack.example", client, "/api/users/7")
        .await
        .unwrap();
    assert_eq!(status, 200);
}

#[tokio::test]
async fn changed_certificate_files_are_served_without_a_restart_and_a_bad_one_is_refused() {
    let pki = Pki::new("reload CA");
    let legacy = start_legacy(Default::default()).await;
    let routes = legacy_route(legacy.addr, "/");
    let proxy = tls_proxy(&pki, "", "watch_interval = \"200ms\"", &routes, |_| {}).await;
    let client = pki.client(&[b"http/1.1"], None);
    let first = presented(
        &connect(proxy.addr, "localhost", client.clone())
            .await
            .unwrap(),
    );
    // An open connection survives the swap.
    let kept = connect(proxy.addr, "localhost", client.clone())
        .await
        .unwrap();

    let next = pki.issue(NAMES, false);
    // Key first, then certificate: for a moment the pair does not match, and is refused.
    std::fs::write(proxy.dir.path().join("proxy.key"), &next.key_pem).unwrap();
    std::fs::write(proxy.dir.path().join("proxy.pem"), &next.cert_pem).unwrap();
    eventually(Duration::from_secs(10), || async {
        let s = connect(proxy.addr, "localhost", client.clone())
            .await
            .ok()?;
        (presented(&s) == next.der).then_some(())
    })
    .await;
    assert_ne!(first, next.der);
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(kept))
            .await
            .unwrap();
    tokio::spawn(conn);
    let r = sender
        .send_request(
            Request::get("/healthz")
                .header("host", "localhost")
                .body(empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(
        r.status(),
        200,
        "a connection from before the swap still works"
    );

    // A broken certificate never replaces a good one.
    let failures_before = failures(&proxy).await;
    std::fs::write(
        proxy.dir.path().join("proxy.pem"),
        "-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydA==\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    eventually(Duration::from_secs(10), || async {
        (failures(&proxy).await > failures_before).then_some(())
    })
    .await;
    let error = routes_json(&proxy).await["last_reload"]["error"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        error.contains("proxy.pem") && error.contains("routes.toml:"),
        "{error}"
    );
    let s = connect(proxy.addr, "localhost", client.clone())
        .await
        .unwrap();
    assert_eq!(
        presented(&s),
        next.der,
        "the last good certificate keeps serving"
    );
    let (status, _, _) = get_tls(&proxy, "localhost", client, "/api/users/1")
        .await
        .unwrap();
    assert_eq!(status, 200);
}

async fn failures(proxy: &Proxy) -> f64 {
    failed_reloads(&metrics_text(proxy).await).unwrap_or(0.0)
}

#[tokio::test]
async fn client_ca_admits_only_callers_with_a_certificate_it_signed() {
    let pki = Pki::new("server CA");
    let callers = Pki::new("callers CA");
    let strangers = Pki::new("strangers CA");
    let legacy = start_legacy(Default::default()).await;
    let routes = legacy_route(legacy.addr, "/");
    let callers_pem = callers.ca_pem.clone();
    let required = tls_proxy(&pki, ", client_ca = \"callers.pem\"", "", &routes, |d| {
        std::fs::write(d.join("callers.pem"), &callers_pem).unwrap();
    })
    .await;
    let member = callers.issue(&["billing-job"], true);
    let stranger = strangers.issue(&["intruder"], true);
    let ok = get_tls(
        &required,
        "localhost",
        pki.client(&[b"http/1.1"], Some(&member)),
        "/api/users/1",
    )
    .await;
    assert_eq!(ok.unwrap().0, 200);
    for (who, client) in [
        ("no certificate", pki.client(&[b"http/1.1"], None)),
        (
            "a certificate from another CA",
            pki.client(&[b"http/1.1"], Some(&stranger)),
        ),
    ] {
        let r = get_tls(&required, "localhost", client, "/api/users/1").await;
        assert!(r.is_err(), "{who} got in: {:?}", r.map(|r| r.0));
    }
    let m = metrics_text(&required).await;
    assert_eq!(
        metric(
            &m,
            "strangler_tls_handshake_errors_total",
            &[("reason", "failed")]
        ),
        Some(2.0),
        "both refused handshakes are counted"
    );

    let callers_pem = callers.ca_pem.clone();
    let optional = tls_proxy(
        &pki,
        ", client_ca = \"callers.pem\", client_auth = \"optional\"",
        "",
        &routes,
        |d| {
            std::fs::write(d.join("callers.pem"), &callers_pem).unwrap();
        },
    )
    .await;
    let anon = get_tls(
        &optional,
        "localhost",
        pki.client(&[b"http/1.1"], None),
        "/api/users/1",
    )
    .await;
    assert_eq!(anon.unwrap().0, 200, "optional: no certificate is fine");
    let bad = get_tls(
        &optional,
        "localhost",
        pki.client(&[b"http/1.1"], Some(&stranger)),
        "/api/users/1",
    )
    .await;
    assert!(
        bad.is_err(),
        "optional: a certificate that does not verify is still refused"
    );
}

#[tokio::test]
async fn https_upstreams_are_verified_and_mtls_presents_the_client_certificate() {
    let upstream_ca = Pki::new("upstream CA");
    let clients = Pki::new("proxy clients CA");
    let server_cert = upstream_ca.issue(&["users.internal"], false);
    let mtls = start_tls_echo("users", &server_cert, Some(&clients)).await;
    let open = start_tls_echo("open", &server_cert, None).await;
    let client_cert = clients.issue(&["strangler"], true);
    let other_ca = Pki::new("unrelated CA");

    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("upstream-ca.pem"), &upstream_ca.ca_pem).unwrap();
    std::fs::write(dir.path().join("other-ca.pem"), &other_ca.ca_pem).unwrap();
    client_cert.write(dir.path(), "client");
    let (m, o) = (mtls.addr, open.addr);
    let text = format!(
        r#"[backends.legacy]
url = "http://127.0.0.1:9"
legacy = true

[backends.mtls]
url = "https://{m}"
tls = {{ ca = "upstream-ca.pem", cert = "client.pem", key = "client.key", server_name = "users.internal" }}

[backends.mtls_h2]
url = "https://{m}"
protocol = "h2"
tls = {{ ca = "upstream-ca.pem", cert = "client.pem", key = "client.key", server_name = "users.internal" }}

[backends.nocert]
url = "https://{m}"
tls = {{ ca = "upstream-ca.pem", server_name = "users.internal" }}

[backends.wrongca]
url = "https://{o}"
tls = {{ ca = "other-ca.pem", server_name = "users.internal" }}

[backends.wrongname]
url = "https://{o}"
tls = {{ ca = "upstream-ca.pem", server_name = "billing.internal" }}

[backends.sysroots]
url = "https://{o}"
tls = {{ server_name = "users.internal" }}

[[routes]]
prefix = "/mtls"
backend = "mtls"

[[routes]]
prefix = "/h2"
backend = "mtls_h2"

[[routes]]
prefix = "/nocert"
backend = "nocert"

[[routes]]
prefix = "/wrongca"
backend = "wrongca"

[[routes]]
prefix = "/wrongname"
backend = "wrongname"

[[routes]]
prefix = "/sysroots"
backend = "sysroots"
"#
    );
    let proxy = Proxy::start_in(dir, &text).await;
    let r = get(&proxy.url("/mtls/x")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.headers["x-client-cert"], "yes");
    assert_eq!(r.headers["x-upstream-version"], "HTTP/1.1");
    assert_eq!(r.json()["path"], "/mtls/x");
    let r = get(&proxy.url("/h2/y")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.headers["x-upstream-version"], "HTTP/2.0");
    assert_eq!(r.headers["x-client-cert"], "yes");
    let h2 = routes_json(&proxy).await["backends"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["name"] == "mtls_h2")
        .unwrap()
        .clone();
    assert_eq!(h2["protocol"], "h2");
    assert_eq!(
        h2["tls"],
        serde_json::json!({"server_name": "users.internal", "ca": "tls.ca", "client_certificate": true})
    );
    // Without `tls.ca` the system roots decide, and they do not know the test's CA.
    for path in ["/nocert", "/wrongca", "/wrongname", "/sysroots"] {
        let r = get(&proxy.url(path)).await;
        assert_eq!(r.status, 502, "{path}: {}", r.text());
        assert_eq!(r.json()["code"], "upstream_unavailable", "{path}");
    }
}

#[tokio::test]
async fn grpc_streams_both_ways_and_trailers_pass_through() {
    let pki = Pki::new("grpc CA");
    let grpc = start_grpc(None).await;
    let routes = format!(
        "[backends.legacy]\nurl = \"http://127.0.0.1:9\"\nlegacy = true\n[backends.echo]\nurl = \"http://{}\"\nprotocol = \"h2c\"\n[[routes]]\nprefix = \"/echo.Echo\"\nbackend = \"echo\"\n",
        grpc.addr
    );
    let proxy = tls_proxy(&pki, "", "", &routes, |_| {}).await;
    let tls = connect(proxy.addr, "localhost", pki.client(&[b"h2"], None))
        .await
        .unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let mut h2 = h2_client(tls).await;
    let (tx, body) = channel_body();
    let req = Request::builder()
        .method(Method::POST)
        .uri(format!(
            "https://localhost:{}/echo.Echo/Stream",
            proxy.addr.port()
        ))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(body)
        .unwrap();
    let resp = h2.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "application/grpc");
    assert_eq!(
        resp.headers()["x-seen-te"],
        "trailers",
        "TE: trailers reaches a gRPC backend"
    );
    let mut body = resp.into_body();
    // Each message comes back before the next is sent: streaming, not buffering.
    for n in 0..3u8 {
        let msg = grpc_message(&[n; 5]);
        tx.send(Frame::data(msg.clone())).await.unwrap();
        let frame = tokio::time::timeout(Duration::from_secs(5), body.frame())
            .await
            .expect("the echo of a message arrives while the request is still open")
            .unwrap()
            .unwrap();
        assert_eq!(frame.into_data().unwrap(), msg);
    }
    let mut trailers = http::HeaderMap::new();
    trailers.insert("x-client-done", "1".parse().unwrap());
    tx.send(Frame::trailers(trailers)).await.unwrap();
    drop(tx);
    let last = tokio::time::timeout(Duration::from_secs(5), body.frame())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let t = last.into_trailers().expect("the call ends with trailers");
    assert_eq!(t["grpc-status"], "0");
    assert_eq!(
        t["x-echo-trailers"], "1",
        "request trailers reached the backend"
    );
}

#[tokio::test]
async fn h2c_and_http1_share_the_plain_listener() {
    let legacy = start_echo("legacy").await;
    let text = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\nh2c = true\n\n{}[[routes]]\nprefix = \"/\"\nbackend = \"legacy\"\n",
        legacy_at(legacy.addr)
    );
    let proxy = Proxy::start(&text).await;
    let tcp = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    let mut h2 = h2_client(tcp).await;
    let resp = h2
        .send_request(
            Request::get(format!(
                "http://127.0.0.1:{}/api/workouts",
                proxy.addr.port()
            ))
            .body(empty())
            .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.version(), http::Version::HTTP_2);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    let echoed: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(echoed["headers"]["x-forwarded-proto"][0], "http");
    assert_eq!(echoed["path"], "/api/workouts");
    // HTTP/1.1 on the same port.
    let r = get(&proxy.url("/api/users")).await;
    assert_eq!(r.status, 200);
}

#[tokio::test]
async fn shadowed_grpc_calls_compare_by_grpc_status() {
    let primary = start_grpc(None).await;
    let same = start_grpc(Some("0")).await;
    let broken = start_grpc(Some("13")).await;
    let text = format!(
        r#"[server]
listen = "127.0.0.1:0"
admin = "127.0.0.1:0"
h2c = true

[backends.legacy]
url = "http://{p}"
protocol = "h2c"
legacy = true

[backends.same]
url = "http://{s}"
protocol = "h2c"

[backends.broken]
url = "http://{b}"
protocol = "h2c"

[[routes]]
prefix = "/fit.Users"
backend = "legacy"
shadow = "same"
shadow_methods = ["POST"]

[[routes]]
prefix = "/fit.Workouts"
backend = "legacy"
shadow = "broken"
shadow_methods = ["POST"]
"#,
        p = primary.addr,
        s = same.addr,
        b = broken.addr
    );
    let proxy = Proxy::start(&text).await;
    let tcp = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    let mut h2 = h2_client(tcp).await;
    for path in ["/fit.Users/Get", "/fit.Workouts/Get"] {
        let body = http_body_util::Full::new(grpc_message(b"\x08\x07"))
            .map_err(|never| match never {})
            .boxed();
        let resp = h2
            .send_request(
                Request::post(format!("http://127.0.0.1:{}{path}", proxy.addr.port()))
                    .header("content-type", "application/grpc")
                    .header("te", "trailers")
                    .body(body)
                    .unwrap(),
            )
            .await
            .unwrap();
        let all = resp.into_body().collect().await.unwrap();
        assert_eq!(
            all.trailers().unwrap()["grpc-status"],
            "0",
            "the client gets the primary's answer"
        );
    }
    let shadow = |route: &'static str, outcome: &'static str| {
        let proxy = &proxy;
        async move {
            let m = metrics_text(proxy).await;
            metric(
                &m,
                "strangler_shadow_total",
                &[("route", route), ("outcome", outcome)],
            )
        }
    };
    eventually(Duration::from_secs(10), || async {
        (shadow("/fit.Users", "match").await == Some(1.0)
            && shadow("/fit.Workouts", "mismatch").await == Some(1.0))
        .then_some(())
    })
    .await;
    let diffs = get(&proxy.admin_url("/diffs")).await.json();
    assert_eq!(diffs[0]["route"], "/fit.Workouts");
    assert_eq!(
        diffs[0]["differences"],
        serde_json::json!([{"path": "grpc-status", "kind": "changed", "primary": "0", "shadow": "13"}])
    );
}

#[tokio::test]
async fn bad_certificate_files_are_reported_at_the_key_that_names_them() {
    let pki = Pki::new("bad files CA");
    let good = pki.issue(NAMES, false);
    let other = pki.issue(NAMES, false);
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    good.write(d, "good");
    std::fs::write(d.join("garbage.pem"), "hello, I am not a certificate\n").unwrap();
    std::fs::write(d.join("empty.key"), "").unwrap();
    std::fs::write(d.join("other.key"), &other.key_pem).unwrap();
    std::fs::write(
        d.join("broken.pem"),
        "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    let cases: &[(&str, &str)] = &[
        ("[server]\ntls = { cert = \"garbage.pem\", key = \"good.key\" }\n", "routes.toml:2:16: `tls`: cert "),
        ("[server]\ntls = { cert = \"good.pem\", key = \"empty.key\" }\n", "no PEM private key"),
        ("[server]\ntls = { cert = \"good.pem\", key = \"other.key\" }\n", "routes.toml:2:34: `tls`: key "),
        ("[server]\ntls = { cert = \"broken.pem\", key = \"good.key\" }\n", "not a valid X.509 certificate"),
        ("[server]\ntls = { cert = \"good.pem\", key = \"good.key\", client_ca = \"garbage.pem\" }\n", "routes.toml:2:58: `tls`: client_ca ... garbage.pem"),
        ("[server]\ntls = { cert = \"good.pem\", key = \"good.key\", sni = [{ cert = \"good.pem\", key = \"other.key\" }] }\n", "does not belong"),
        ("[backends.x]\nurl = \"https://127.0.0.1:1\"\ntls = { ca = \"garbage.pem\" }\n", "routes.toml:11:14: [backends.x] `tls`: ca ... garbage.pem: no PEM certificate found"),
        ("[backends.x]\nurl = \"https://127.0.0.1:1\"\ntls = { cert = \"good.pem\", key = \"other.key\" }\n", "does not belong"),
    ];
    for (section, want) in cases {
        let text = if section.starts_with("[server]") {
            format!("{section}\n[backends.legacy]\nurl = \"http://127.0.0.1:9\"\n[[routes]]\nprefix = \"/\"\nbackend = \"legacy\"\n")
        } else {
            format!("[backends.legacy]\nurl = \"http://127.0.0.1:9\"\n[[routes]]\nprefix = \"/\"\nbackend = \"legacy\"\n\n\n\n{section}")
        };
        std::fs::write(d.join("routes.toml"), &text).unwrap();
        let err = strangler::config::load(&d.join("routes.toml")).unwrap_err();
        let lines = err.lines();
        let (head, tail) = want.split_once(" ... ").unwrap_or((want, ""));
        assert!(
            lines.iter().any(|l| l.contains(head) && l.contains(tail)),
            "{section}: want {want:?} in {lines:#?}"
        );
    }
    // The good pair loads, and `check` describes the listener.
    let text = "[server]\ntls = { cert = \"good.pem\", key = \"good.key\", client_ca = \"good.pem\", client_auth = \"optional\" }\n[backends.legacy]\nurl = \"http://127.0.0.1:9\"\n[[routes]]\nprefix = \"/\"\nbackend = \"legacy\"\n";
    std::fs::write(d.join("routes.toml"), text).unwrap();
    let loaded = strangler::config::load(&d.join("routes.toml")).unwrap();
    let report = strangler::cli::check_report(&loaded);
    assert!(
        report.contains("TLS with 1 certificate(s) chosen by SNI, client certificates verified when presented; HTTP/2 and HTTP/1.1 by ALPN"),
        "{report}"
    );
}

/// h2load over TLS: thousands of requests on multiplexed streams, none failed. Needs h2load
/// (Debian's nghttp2-client); CI installs it and runs the ignored tests.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs h2load (nghttp2-client); CI installs it and runs this"]
async fn h2load_over_tls_completes_every_request() {
    let pki = Pki::new("h2load CA");
    let legacy = start_legacy(Default::default()).await;
    let routes = legacy_route(legacy.addr, "/");
    let proxy = tls_proxy(&pki, "", "", &routes, |_| {}).await;
    let out = tokio::process::Command::new("h2load")
        .args(["-n", "5000", "-c", "10", "-m", "20"])
        .arg(format!(
            "https://127.0.0.1:{}/api/users/7",
            proxy.addr.port()
        ))
        .output()
        .await
        .expect("h2load must be installed (apt-get install nghttp2-client)");
    let text = String::from_utf8_lossy(&out.stdout);
    eprintln!("{text}");
    assert!(out.status.success(), "{text}");
    assert!(text.contains("Application protocol: h2"), "{text}");
    assert!(
        text.contains(
            "requests: 5000 total, 5000 started, 5000 done, 5000 succeeded, 0 failed, 0 errored"
        ),
        "{text}"
    );
    assert!(text.contains("status codes: 5000 2xx"), "{text}");
}

#[tokio::test]
async fn shutdown_lets_in_flight_http2_streams_finish() {
    let pki = Pki::new("drain CA");
    let echo = start_echo("legacy").await;
    let routes = legacy_route(echo.addr, "/");
    let mut proxy = tls_proxy(&pki, "", "", &routes, |_| {}).await;
    let tls = connect(proxy.addr, "localhost", pki.client(&[b"h2"], None))
        .await
        .unwrap();
    let mut h2 = h2_client(tls).await;
    let url = |p: &str| format!("https://localhost:{}{p}", proxy.addr.port());
    // Two streams on one connection, both in flight when shutdown starts.
    let slow = [
        h2.send_request(Request::get(url("/slow/500")).body(empty()).unwrap()),
        h2.send_request(Request::get(url("/slow/300")).body(empty()).unwrap()),
    ];
    let in_flight = tokio::spawn(async move {
        let mut statuses = vec![];
        for s in slow {
            let resp = s.await.unwrap();
            let status = resp.status();
            resp.into_body().collect().await.unwrap();
            statuses.push(status);
        }
        statuses
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let done = proxy.shutdown();
    assert_eq!(in_flight.await.unwrap(), [StatusCode::OK, StatusCode::OK]);
    tokio::time::timeout(Duration::from_secs(5), done)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}

/// An h2c connection to the proxy with the raw h2 client (frames, settings, resets).
async fn raw_h2(
    proxy: &Proxy,
) -> (
    h2::client::SendRequest<Bytes>,
    tokio::task::JoinHandle<Result<(), h2::Error>>,
) {
    let tcp = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    let (send, conn) = h2::client::handshake(tcp).await.unwrap();
    (send, tokio::spawn(conn))
}

/// GET `path` on a new raw h2 connection; the status, and the connection's handle.
async fn raw_get(proxy: &Proxy, path: &str) -> (StatusCode, h2::client::SendRequest<Bytes>) {
    let (send, _conn) = raw_h2(proxy).await;
    let mut send = send.ready().await.unwrap();
    let req = Request::get(format!("http://localhost{path}"))
        .body(())
        .unwrap();
    let (resp, _) = send.send_request(req, true).unwrap();
    (resp.await.unwrap().status(), send)
}

async fn h2c_proxy(routes: &str) -> Proxy {
    Proxy::start(&format!("{}\n{routes}", server("h2c = true"))).await
}

#[tokio::test]
async fn http2_limits_are_advertised_and_a_reset_flood_ends_the_connection_only() {
    let legacy = start_echo("legacy").await;
    let proxy = h2c_proxy(&legacy_route(legacy.addr, "/")).await;
    let (status, send) = raw_get(&proxy, "/api/users").await;
    assert_eq!(status, 200);
    assert_eq!(
        send.current_max_send_streams(),
        128,
        "the server's SETTINGS_MAX_CONCURRENT_STREAMS"
    );

    // Rapid reset: open streams and cancel them at once, far past the pending-reset bound.
    let (send, conn) = raw_h2(&proxy).await;
    let mut send = send.ready().await.unwrap();
    for _ in 0..200 {
        match send.send_request(
            Request::get("http://localhost/slow/200").body(()).unwrap(),
            true,
        ) {
            Ok((_, mut stream)) => stream.send_reset(h2::Reason::CANCEL),
            Err(_) => break,
        }
    }
    let ended = tokio::time::timeout(Duration::from_secs(5), conn)
        .await
        .expect("the flooding connection is closed")
        .unwrap();
    let error = ended.expect_err("closed with an error, not cleanly");
    assert_eq!(
        error.reason(),
        Some(h2::Reason::ENHANCE_YOUR_CALM),
        "GOAWAY ENHANCE_YOUR_CALM: {error}"
    );
    // Everyone else is served.
    assert_eq!(raw_get(&proxy, "/api/users").await.0, 200);
}

#[tokio::test]
async fn a_handshake_that_never_comes_is_cut_at_header_read_timeout_and_counted() {
    let pki = Pki::new("slow CA");
    let legacy = start_legacy(Default::default()).await;
    let proxy = tls_proxy(
        &pki,
        "",
        "header_read_timeout = \"300ms\"",
        &legacy_route(legacy.addr, "/"),
        |_| {},
    )
    .await;
    let mut silent = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(
        Duration::from_secs(5),
        tokio::io::AsyncReadExt::read(&mut silent, &mut buf),
    )
    .await
    .expect("the proxy closes a connection that never says hello")
    .unwrap_or(0);
    assert_eq!(n, 0);
    let m = metrics_text(&proxy).await;
    assert_eq!(
        metric(
            &m,
            "strangler_tls_handshake_errors_total",
            &[("reason", "timeout")]
        ),
        Some(1.0)
    );
}

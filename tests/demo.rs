//! The FitTrack demo system: legacy-stub and users-service as real servers, their flags,
//! and the demo route table.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a panic is a failure report

mod support;

use std::time::Duration;

use bytes::Bytes;
use http::Method;
use serde_json::json;
use support::*;

async fn post(url: &str, body: serde_json::Value) -> Reply {
    send_with(
        Method::POST,
        url,
        &[("content-type", "application/json")],
        body.to_string(),
    )
    .await
}

#[tokio::test]
async fn legacy_serves_every_fittrack_endpoint() {
    let l = start_legacy(Default::default()).await;
    let u = |p: &str| format!("http://{}{p}", l.addr);
    let users = get(&u("/api/users")).await.json();
    assert_eq!(users["total"], 20);
    assert!(users["generated_at"].is_string());
    assert_eq!(get(&u("/api/users/7")).await.json()["user"]["id"], 7);
    assert_eq!(get(&u("/api/users/999")).await.status, 404);
    assert_eq!(get(&u("/api/users/abc")).await.status, 400);
    let created = post(
        &u("/api/users"),
        json!({"name": "Rosalind Franklin", "email": "rosalind@fittrack.example"}),
    )
    .await;
    assert_eq!(created.status, 201);
    assert_eq!(created.json()["user"]["id"], 21);
    let put = send_with(Method::PUT, &u("/api/users/21"), &[], r#"{"plan":"pro"}"#).await;
    assert_eq!(put.json()["user"]["plan"], "pro");
    assert_eq!(
        send_with(Method::DELETE, &u("/api/users/21"), &[], Bytes::new())
            .await
            .status,
        204
    );
    assert_eq!(get(&u("/api/workouts")).await.json()["total"], 60);
    assert!(get(&u("/api/workouts?user_id=7")).await.json()["workouts"]
        .as_array()
        .unwrap()
        .iter()
        .all(|w| w["user_id"] == 7));
    assert_eq!(get(&u("/api/workouts/3")).await.json()["workout"]["id"], 3);
    assert_eq!(
        post(
            &u("/api/workouts"),
            json!({"user_id": 1, "kind": "run", "duration_min": 30})
        )
        .await
        .status,
        201
    );
    assert_eq!(get(&u("/api/social/feed")).await.json()["total"], 30);
    assert_eq!(
        post(&u("/api/social/posts"), json!({"user_id": 1, "text": "hi"}))
            .await
            .status,
        201
    );
    assert_eq!(get(&u("/healthz")).await.json()["status"], "ok");
    // Garbage in: clear 4xx JSON.
    for (body, status) in [
        ("not json", 400),
        ("[1,2]", 400),
        ("{\"name\": 5, \"email\": \"x@y\"}", 400),
    ] {
        let r = send_with(Method::POST, &u("/api/users"), &[], body).await;
        assert_eq!(r.status, status, "{body}");
        assert!(r.json()["error"].is_string());
    }
    let big = send_with(Method::POST, &u("/api/users"), &[], vec![b' '; 100_000]).await;
    assert_eq!(big.status, 413);
}

#[tokio::test]
async fn legacy_misbehaves_on_request() {
    let l = start_legacy(legacy_stub::Options {
        latency: Some(Duration::from_millis(100)),
        error_rate: 0.0,
        fail_paths: vec!["/api/workouts".into()],
    })
    .await;
    let started = std::time::Instant::now();
    assert_eq!(
        get(&format!("http://{}/api/users/1", l.addr)).await.status,
        200
    );
    assert!(started.elapsed() >= Duration::from_millis(100));
    assert_eq!(
        get(&format!("http://{}/api/workouts/1", l.addr))
            .await
            .status,
        500
    );
    assert_eq!(
        get(&format!("http://{}/api/workoutsx", l.addr))
            .await
            .status,
        404,
        "fail-path is segment-aware"
    );
    let flaky = start_legacy(legacy_stub::Options {
        error_rate: 0.5,
        ..Default::default()
    })
    .await;
    let mut errors = 0;
    for _ in 0..200 {
        if get(&format!("http://{}/api/users/1", flaky.addr))
            .await
            .status
            == 500
        {
            errors += 1;
        }
    }
    assert!(
        (60..=140).contains(&errors),
        "error rate 0.5 gave {errors}/200"
    );
}

#[tokio::test]
async fn users_service_matches_the_monolith_except_for_its_bug() {
    let l = start_legacy(Default::default()).await;
    let good = start_users(None).await;
    let buggy = start_users(Some(users_service::Bug::EmailCase)).await;
    let strip = |mut v: serde_json::Value| {
        v.as_object_mut().unwrap().remove("generated_at");
        v
    };
    for path in ["/api/users", "/api/users/7", "/api/users/999"] {
        let a = strip(get(&format!("http://{}{path}", l.addr)).await.json());
        let b = strip(get(&format!("http://{}{path}", good.addr)).await.json());
        assert_eq!(a, b, "{path}");
    }
    let legacy_user = get(&format!("http://{}/api/users/7", l.addr)).await.json();
    let buggy_user = get(&format!("http://{}/api/users/7", buggy.addr))
        .await
        .json();
    assert_ne!(legacy_user["user"]["email"], buggy_user["user"]["email"]);
    assert_eq!(
        legacy_user["user"]["email"]
            .as_str()
            .unwrap()
            .to_lowercase(),
        buggy_user["user"]["email"]
    );
    assert_eq!(
        get(&format!("http://{}/api/workouts", good.addr))
            .await
            .status,
        404,
        "only users were extracted"
    );
}

#[tokio::test]
async fn users_service_does_not_keep_shadow_writes() {
    let u = start_users(None).await;
    let url = format!("http://{}/api/users", u.addr);
    let r = send_with(
        Method::POST,
        &url,
        &[("x-strangler-shadow", "1")],
        r#"{"name":"Shadow","email":"s@x"}"#,
    )
    .await;
    assert_eq!(r.status, 201, "answered as if created");
    assert_eq!(get(&url).await.json()["total"], 20, "but not kept");
    let r = post(&url, json!({"name": "Real", "email": "r@x"})).await;
    assert_eq!(r.json()["user"]["id"], 21);
    assert_eq!(get(&url).await.json()["total"], 21);
}

#[tokio::test]
async fn the_demo_route_table_is_valid_and_flows_through_the_proxy() {
    let demo =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/routes.toml")).unwrap();
    let parsed = strangler::config::parse(&demo).unwrap();
    let t = &parsed.table;
    let stage_of = |p: &str| {
        t.routes()
            .iter()
            .position(|r| r.prefix == p)
            .map(|id| t.stage(strangler::routes::RouteId::new(id)).to_string())
    };
    assert_eq!(stage_of("/api/users").as_deref(), Some("shadowing"));
    assert_eq!(stage_of("/api/workouts").as_deref(), Some("legacy"));
    assert!(t.has_catch_all());
    // The social routes require the demo provider's tokens.
    let social = t
        .routes()
        .iter()
        .find(|r| r.prefix == "/api/social")
        .unwrap();
    assert!(social.auth.is_some());
    // The same routes, pointed at port-0 instances of the demo services.
    let l = start_legacy(Default::default()).await;
    let u = start_users(None).await;
    let routes = demo
        .split("[[routes]]")
        .skip(1)
        .map(|r| format!("[[routes]]{r}"))
        .collect::<String>();
    // The auth provider, with its key file where the test runs.
    let auth = &demo[demo.find("[auth.fittrack]").unwrap()..demo.find("[[routes]]").unwrap()];
    let jwks = concat!(env!("CARGO_MANIFEST_DIR"), "/demo/jwks.json");
    let auth = auth.replace("\"demo/jwks.json\"", &format!("{jwks:?}"));
    // The events section the users route publishes to (off here: no broker URL in the test's
    // environment unless one was exported, and then it only publishes).
    let events = &demo[demo.find("[events]").unwrap()..demo.find("[backends.legacy]").unwrap()];
    assert_eq!(
        parsed.server.events.as_ref().map(|e| e.url_env.as_str()),
        Some("STRANGLER_AMQP_URL")
    );
    let proxy = Proxy::start(&format!(
        "{}[backends.users]\nurl = \"http://{}\"\n{events}{auth}{routes}",
        legacy_at(l.addr),
        u.addr
    ))
    .await;
    assert_eq!(
        get(&proxy.url("/api/users/7")).await.json()["user"]["name"],
        "Margaret Hopper"
    );
    let anonymous = get(&proxy.url("/api/social/feed")).await;
    assert_eq!(anonymous.status, 401);
    assert_eq!(anonymous.json()["code"], "unauthorized");
    // The token `strangler demo` prints opens it.
    let token =
        strangler::demo::demo_token(&parsed.table.providers()[0], "7", Duration::from_secs(60))
            .expect("the demo provider trusts the demo key");
    let feed = send_with(
        Method::GET,
        &proxy.url("/api/social/feed"),
        &[("authorization", &format!("Bearer {token}"))],
        Bytes::new(),
    )
    .await;
    assert_eq!(feed.status, 200);
    assert_eq!(feed.json()["total"], 30);
    assert_eq!(get(&proxy.url("/healthz")).await.status, 200);
}

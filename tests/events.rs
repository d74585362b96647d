//! `[events]` end to end against a real RabbitMQ: a private `rabbitmq-server` node per test
//! ([`support::rabbitmq`]), the proxy in-process on 127.0.0.1:0, and the real FitTrack
//! backends (`legacy_stub`, `users_service`). What is checked:
//!
//! 1. a shadow mismatch reaches a queue bound to `mismatch.#` within 1 s as a valid
//!    CloudEvent carrying the `/diffs` entry (differences by JSON pointer); a matching shadow
//!    publishes nothing;
//! 2. a successful write publishes exactly one `write` event (bodies when `body` is set, the
//!    path without its query string unless `query = true`); a 4xx, a 500, a request refused
//!    by the proxy (401, 413) and a read publish none; no event carries `authorization`,
//!    `cookie` or the bearer token;
//! 3. the write-interception story: the monolith answers a POST, users-service (the shadow)
//!    applies its `write` event, and the shadowed GET of the new user then matches; without
//!    the consumer it mismatches (users-service answers 404);
//! 4. broker trouble never touches clients: (a) no broker at start (a refused port, and an
//!    acceptor that never answers): every request answered, p99 close to events off, drops
//!    counted; (b) the broker stopped mid-run and started again: no failed request, and
//!    publishing resumes by itself; (c) the broker under a memory alarm: no failed or slow
//!    request, events dropped or failed and counted, publishing resumes after the alarm;
//!    and `/routes` shows the link `stalled` while confirms are overdue;
//! 5. a burst of ten times `buffer` events, with the broker keeping up and then under a
//!    memory alarm (the buffer full): published + dropped + failed = produced (also in
//!    `/metrics`), a consumer gets between published and published + failed, and no request
//!    waits;
//! 6. shutdown flushes: (a) a burst then an immediate shutdown publishes everything; (b)
//!    events buffered while the broker was away are published by the shutdown flush once it
//!    is back; (c) a broker that stops reading (memory alarm) bounds the shutdown by
//!    `drain_timeout`, and every event is still counted.
//!
//! Every test is `#[ignore]`d for a plain `cargo test` (each starts its own broker, ~4 s;
//! 4a needs none); run them with
//!
//! ```sh
//! cargo test --test events -- --ignored --test-threads=1
//! ```
//!
//! One thread because tests 4 and 5 measure latencies (and a broker booting takes a core of
//! this 2-core machine); they also pass with more threads, with noisier figures. Add
//! `--nocapture` to see the measured figures (p99s, counts).

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a panic is a failure report

mod support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use serde_json::{json, Value};
use support::jwt::secret_dir;
use support::rabbitmq::{need_broker, start_users_with_events, Broker, Consumer, Delivery};
use support::*;

const EXCHANGE: &str = "strangler";
const CLOUDEVENTS: &str = "application/cloudevents+json";
const SOURCE: &str = "https://strangler.test/fittrack";
/// The consumer's queue in users-service.
const USERS_QUEUE: &str = "users-service.writes";

// ----------------------------------------------------------------------------------- setup

/// A fresh environment variable holding `url`, for `url_env` (read when routes.toml is
/// loaded, so every proxy gets its own).
fn amqp_env(url: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    let name = format!(
        "STRANGLER_TEST_AMQP_{}_{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    );
    std::env::set_var(&name, url);
    name
}

/// `[server]` on port 0, no file watching, with `extra` lines.
fn server_section(extra: &str) -> String {
    format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\nwatch = \"off\"\n{extra}\n\n"
    )
}

/// `[events]` reading the broker URL from `var`, with `extra` lines.
fn events_section(var: &str, extra: &str) -> String {
    format!("[events]\nurl_env = \"{var}\"\nsource = \"{SOURCE}\"\n{extra}\n\n")
}

fn backend(name: &str, addr: SocketAddr, extra: &str) -> String {
    format!("[backends.{name}]\nurl = \"http://{addr}\"\n{extra}\n\n")
}

/// A proxy in front of the monolith at `legacy`: `/api/users` with `events`, `[events]` on
/// `var` with `events_extra`, `[server]` with `server_extra`.
async fn users_proxy(
    legacy: SocketAddr,
    var: &str,
    events: &str,
    events_extra: &str,
    server_extra: &str,
) -> Proxy {
    Proxy::start(&format!(
        "{}{}{}[[routes]]\nprefix = \"/api/users\"\nbackend = \"legacy\"\nevents = {events}\n",
        server_section(server_extra),
        events_section(var, events_extra),
        backend("legacy", legacy, "legacy = true"),
    ))
    .await
}

// ------------------------------------------------------------------------- /routes events

async fn events_json(proxy: &Proxy) -> Value {
    routes_json(proxy).await["events"].clone()
}

fn num(v: &Value, key: &str) -> u64 {
    v[key]
        .as_u64()
        .unwrap_or_else(|| panic!("no number `{key}` in {v}"))
}

/// `published + dropped + failed`.
fn counted(v: &Value) -> u64 {
    num(v, "published") + num(v, "dropped") + num(v, "failed")
}

/// Waits until `/routes` shows the publisher's link `want`.
async fn wait_link(proxy: &Proxy, want: &str, within: Duration) {
    let until = Instant::now() + within;
    loop {
        let ev = events_json(proxy).await;
        if ev["link"] == want {
            return;
        }
        assert!(
            Instant::now() < until,
            "the events link is not `{want}` after {within:?}: {ev}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Waits until nothing is buffered and every one of `produced` events is counted
/// (published, dropped or failed); never more counted than produced. Returns `events`.
async fn settled(proxy: &Proxy, produced: u64, within: Duration) -> Value {
    let until = Instant::now() + within;
    loop {
        let ev = events_json(proxy).await;
        let sum = counted(&ev);
        assert!(
            sum <= produced,
            "{sum} events counted, but only {produced} produced: {ev}"
        );
        if num(&ev, "buffered") == 0 && sum == produced {
            return ev;
        }
        assert!(
            Instant::now() < until,
            "after {within:?}, {sum} of {produced} events counted and {} buffered: {ev}",
            num(&ev, "buffered")
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// -------------------------------------------------------------------------------- messages

/// Checks a delivery is a CloudEvents 1.0 structured-mode event on `key` (content type,
/// persistence, every required attribute, `time` in RFC 3339 and recent); returns its JSON.
fn cloudevent(d: &Delivery, key: &str) -> Value {
    let (routing_key, body, content_type, mode) = d;
    let text = String::from_utf8_lossy(body);
    assert_eq!(routing_key, key, "routing key of {text}");
    assert_eq!(content_type.as_deref(), Some(CLOUDEVENTS), "{text}");
    assert_eq!(*mode, Some(2), "not persistent: {text}");
    let v: Value =
        serde_json::from_slice(body).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"));
    assert_eq!(v["specversion"], "1.0", "{v}");
    let kind = key.split('.').next().unwrap();
    assert_eq!(v["type"], format!("dev.strangler.{kind}"), "{v}");
    assert_eq!(v["source"], SOURCE, "{v}");
    assert!(
        v["id"].as_str().is_some_and(|id| !id.is_empty()),
        "no id: {v}"
    );
    let time = v["time"].as_str().unwrap_or_else(|| panic!("no time: {v}"));
    let at = humantime::parse_rfc3339(time).unwrap_or_else(|e| panic!("time {time:?}: {e}"));
    let now = SystemTime::now();
    assert!(
        now.duration_since(at).unwrap_or_default() < Duration::from_secs(120)
            && at.duration_since(now).unwrap_or_default() < Duration::from_secs(5),
        "time {time} is not now"
    );
    assert_eq!(v["datacontenttype"], "application/json", "{v}");
    assert!(v["subject"].is_string(), "{v}");
    assert!(v["data"].is_object(), "{v}");
    v
}

/// No credentials in an event: neither the header names nor the `secrets` themselves.
fn assert_no_secrets(d: &Delivery, secrets: &[&str]) {
    let text = String::from_utf8_lossy(&d.1).to_lowercase();
    for word in ["authorization", "cookie"] {
        assert!(!text.contains(word), "`{word}` in an event: {text}");
    }
    for s in secrets {
        assert!(
            !text.contains(&s.to_lowercase()),
            "the secret {s:?} is in an event: {text}"
        );
    }
}

/// Reads deliveries until one whose `data.path` is `path` (others are skipped and counted).
async fn wait_for_path(c: &mut Consumer, key: &str, path: &str, within: Duration) -> Value {
    let until = Instant::now() + within;
    let mut skipped = 0;
    loop {
        let left = until.saturating_duration_since(Instant::now());
        let Some(d) = c.next(left).await else {
            panic!("no event for {path} within {within:?} ({skipped} others arrived)");
        };
        let v = cloudevent(&d, key);
        if v["data"]["path"] == path {
            return v;
        }
        skipped += 1;
    }
}

// --------------------------------------------------------------------------------- clients

type Outcome = Result<StatusCode, String>;

fn get_req(url: &str) -> Request<Full<Bytes>> {
    Request::get(url).body(Full::new(Bytes::new())).unwrap()
}

/// Sends `req`, reads the answer whole; the outcome and how long it took (10 s at most).
async fn timed(c: &HttpClient, req: Request<Full<Bytes>>) -> (Outcome, Duration) {
    let t = Instant::now();
    let outcome = tokio::time::timeout(Duration::from_secs(10), async {
        let resp = c.request(req).await.map_err(|e| format!("{e:?}"))?;
        let status = resp.status();
        resp.into_body()
            .collect()
            .await
            .map_err(|e| format!("body: {e}"))?;
        Ok(status)
    })
    .await
    .unwrap_or_else(|_| Err("no answer within 10 s".into()));
    (outcome, t.elapsed())
}

/// Requests and their latencies.
struct Summary {
    n: usize,
    /// Errors and answers other than 200, with their index.
    failed: Vec<String>,
    p50: Duration,
    p99: Duration,
    max: Duration,
}

fn summarize(results: &[(Outcome, Duration)]) -> Summary {
    let failed = results
        .iter()
        .enumerate()
        .filter(|(_, (o, _))| !matches!(o, Ok(StatusCode::OK)))
        .map(|(i, (o, t))| format!("#{i}: {o:?} after {t:?}"))
        .collect();
    let mut times: Vec<Duration> = results.iter().map(|(_, t)| *t).collect();
    times.sort();
    let at = |q: f64| {
        let i = ((times.len() as f64 * q).ceil() as usize).clamp(1, times.len().max(1)) - 1;
        times.get(i).copied().unwrap_or_default()
    };
    Summary {
        n: results.len(),
        failed,
        p50: at(0.5),
        p99: at(0.99),
        max: times.last().copied().unwrap_or_default(),
    }
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} requests, {} failed, p50 {:.2?}, p99 {:.2?}, max {:.2?}",
            self.n,
            self.failed.len(),
            self.p50,
            self.p99,
            self.max
        )
    }
}

/// Sequential GETs of `PATH?load=N` (one keep-alive client) every `gap`, until finished.
struct Load {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<Vec<(Outcome, Duration)>>,
}

impl Load {
    fn start(proxy: &Proxy, path: &str, gap: Duration) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let (flag, base) = (stop.clone(), proxy.url(path));
        let task = tokio::spawn(async move {
            let c = client();
            let mut results = Vec::new();
            while !flag.load(Ordering::Relaxed) {
                let url = format!("{base}?load={}", results.len());
                results.push(timed(&c, get_req(&url)).await);
                tokio::time::sleep(gap).await;
            }
            results
        });
        Load { stop, task }
    }

    async fn finish(self) -> Vec<(Outcome, Duration)> {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.unwrap()
    }
}

/// `n` GETs of `PATH?burst=I` from `workers` concurrent clients.
async fn burst(proxy: &Proxy, path: &str, n: usize, workers: usize) -> Vec<(Outcome, Duration)> {
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..workers {
        let (next, base) = (next.clone(), proxy.url(path));
        tasks.push(tokio::spawn(async move {
            let c = client();
            let mut results = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    return results;
                }
                results.push(timed(&c, get_req(&format!("{base}?burst={i}"))).await);
            }
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    all
}

// -------------------------------------------------------------------------------------- 1

/// `/api/users` answered by the monolith and shadowed by users-service at `shadow`, with
/// mismatch events.
fn shadowed_users(var: &str, legacy: SocketAddr, shadow: SocketAddr, events: &str) -> String {
    format!(
        "{}{}{}{}[[routes]]\nprefix = \"/api/users\"\nbackend = \"legacy\"\nshadow = \"users\"\n\
         events = {events}\n[routes.compare]\nignore = [\"/generated_at\"]\n",
        server_section(""),
        events_section(var, ""),
        backend("legacy", legacy, "legacy = true"),
        backend("users", shadow, ""),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs rabbitmq-server (Debian package); CI runs it"]
async fn a_mismatch_is_published_within_a_second_and_a_match_publishes_nothing() {
    need_broker();
    let broker = Broker::start().await;
    let legacy = start_legacy(legacy_stub::Options::default()).await;
    let buggy = start_users(Some(users_service::Bug::EmailCase)).await;
    let correct = start_users(None).await;
    let mut mismatches = broker.bind(EXCHANGE, "mismatch.#").await;

    let proxy = Proxy::start(&shadowed_users(
        &amqp_env(&broker.url()),
        legacy.addr,
        buggy.addr,
        "[\"mismatch\"]",
    ))
    .await;
    let route = route_json(&proxy, "/api/users").await;
    assert_eq!(
        route["events"]["routing_keys"],
        json!(["mismatch.api.users"]),
        "{route}"
    );
    wait_link(&proxy, "up", Duration::from_secs(15)).await;

    let sent = Instant::now();
    let reply = send_with(
        Method::GET,
        &proxy.url("/api/users/1"),
        &[
            ("authorization", "Bearer tok-SECRET-4711"),
            ("cookie", "session=cookie-SECRET-4711"),
        ],
        Bytes::new(),
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let left = Duration::from_secs(1).saturating_sub(sent.elapsed());
    let Some(d) = mismatches.next(left).await else {
        panic!(
            "no mismatch event within 1 s of the request; /routes events: {}",
            events_json(&proxy).await
        );
    };
    let took = sent.elapsed();
    let v = cloudevent(&d, "mismatch.api.users");
    assert_no_secrets(&d, &["tok-SECRET-4711", "cookie-SECRET-4711"]);
    assert_eq!(v["subject"], "/api/users/1", "{v}");
    let data = &v["data"];
    let request_id = reply.headers["x-request-id"].to_str().unwrap();
    assert_eq!(data["request_id"], request_id, "{v}");
    assert_eq!(data["route"], "/api/users", "{v}");
    assert_eq!(data["method"], "GET", "{v}");
    assert_eq!(data["path"], "/api/users/1", "{v}");
    assert_eq!(data["backend"], "legacy", "{v}");
    assert_eq!(data["status"], 200, "{v}");
    assert_eq!(data["shadow"]["backend"], "users", "{v}");
    assert_eq!(data["shadow"]["status"], 200, "{v}");
    let differences = data["differences"]
        .as_array()
        .unwrap_or_else(|| panic!("no differences: {v}"));
    assert!(
        differences
            .iter()
            .all(|d| d["path"].as_str().is_some_and(|p| p.starts_with('/'))),
        "every difference is named by its JSON pointer: {v}"
    );
    let email = reply.json()["user"]["email"].as_str().unwrap().to_string();
    assert_ne!(
        email,
        email.to_lowercase(),
        "the seed has an upper-case email"
    );
    let diff = differences
        .iter()
        .find(|d| d["path"] == "/user/email")
        .unwrap_or_else(|| panic!("no /user/email difference: {v}"));
    assert_eq!(diff["primary"], email, "{v}");
    assert_eq!(diff["shadow"], email.to_lowercase(), "{v}");
    assert_eq!(data["total_differences"], differences.len(), "{v}");
    // The same entry as /diffs.
    let listed = get(&proxy.admin_url("/diffs")).await.json();
    assert_eq!(listed[0]["request_id"], request_id, "{listed}");
    assert_eq!(listed[0]["differences"], data["differences"], "{listed}");
    let ev = events_json(&proxy).await;
    assert_eq!(ev["by_kind"]["mismatch"]["published"], 1, "{ev}");
    assert_eq!(ev["link"], "up", "{ev}");
    eprintln!("mismatch event arrived {took:.1?} after the request was sent");

    // A shadow that agrees: compared, matched, nothing published.
    let quiet = Proxy::start(&shadowed_users(
        &amqp_env(&broker.url()),
        legacy.addr,
        correct.addr,
        "[\"mismatch\"]",
    ))
    .await;
    wait_link(&quiet, "up", Duration::from_secs(15)).await;
    for id in 1..=5 {
        let r = get(&quiet.url(&format!("/api/users/{id}"))).await;
        assert_eq!(r.status, StatusCode::OK);
    }
    let route = eventually(Duration::from_secs(5), || async {
        let r = route_json(&quiet, "/api/users").await;
        (r["compared"] == 5).then_some(r)
    })
    .await;
    assert_eq!(route["mismatched"], 0, "{route}");
    let extra = mismatches.drain(Duration::from_secs(1)).await;
    assert!(
        extra.is_empty(),
        "a matching shadow published {} mismatch events: {:?}",
        extra.len(),
        extra
            .iter()
            .map(|d| String::from_utf8_lossy(&d.1).into_owned())
            .collect::<Vec<_>>()
    );
    let ev = events_json(&quiet).await;
    assert_eq!(counted(&ev), 0, "{ev}");
    assert_eq!(num(&ev, "buffered"), 0, "{ev}");
}

// -------------------------------------------------------------------------------------- 2

const SECRET: &str = "0123456789abcdef0123456789abcdef-events-test";
const PROVIDER: &str = "[auth.internal]\nissuer = \"https://auth.test/\"\naudiences = [\"api\"]\n\
                        algorithms = [\"HS256\"]\nsecret_file = \"secret\"\n\n";

fn token(sub: &str) -> String {
    support::jwt::hs256(SECRET, "api", Some(sub))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs rabbitmq-server (Debian package); CI runs it"]
async fn a_successful_write_publishes_one_event_and_failed_or_refused_ones_none() {
    need_broker();
    let broker = Broker::start().await;
    let legacy = start_legacy(legacy_stub::Options {
        fail_paths: vec!["/api/users/broken".into()],
        ..Default::default()
    })
    .await;
    let mut writes = broker.bind(EXCHANGE, "write.#").await;
    let dir = secret_dir(SECRET);
    let text = format!(
        "{}{}{}{PROVIDER}\
         [[routes]]\nprefix = \"/api/users\"\nbackend = \"legacy\"\n\
         events = {{ kinds = [\"write\"], body = \"16KiB\" }}\n\n\
         [[routes]]\nprefix = \"/api/workouts\"\nbackend = \"legacy\"\n\
         events = {{ kinds = [\"write\"], query = true }}\n\n\
         [[routes]]\nprefix = \"/api/social\"\nbackend = \"legacy\"\nauth = \"internal\"\n\
         events = {{ kinds = [\"write\"], body = \"16KiB\" }}\n",
        server_section("max_request_body = \"1KiB\""),
        events_section(&amqp_env(&broker.url()), ""),
        backend("legacy", legacy.addr, "legacy = true"),
    );
    let proxy = Proxy::start_in(dir, &text).await;
    wait_link(&proxy, "up", Duration::from_secs(15)).await;
    let json_ct = ("content-type", "application/json");
    let bearer = format!("Bearer {}", token("user-7"));
    let secrets = [
        "tok-SECRET-0815",
        "cookie-SECRET-0815",
        "qs-SECRET-0815",
        bearer.trim_start_matches("Bearer "),
    ];

    // 201 with both bodies; the query string (which carries a secret) is not shown.
    let posted = json!({"name": "Ada Events", "email": "Ada@Events.example"});
    let created = send_with(
        Method::POST,
        &proxy.url("/api/users?token=qs-SECRET-0815&x=1"),
        &[
            json_ct,
            ("authorization", "Bearer tok-SECRET-0815"),
            ("cookie", "session=cookie-SECRET-0815"),
        ],
        posted.to_string(),
    )
    .await;
    assert_eq!(created.status, StatusCode::CREATED, "{}", created.text());
    let d = writes
        .next(Duration::from_secs(5))
        .await
        .expect("no write event for a 201 POST");
    let v = cloudevent(&d, "write.api.users");
    assert_no_secrets(&d, &secrets);
    let data = &v["data"];
    assert_eq!(
        data["request_id"],
        created.headers["x-request-id"].to_str().unwrap(),
        "{v}"
    );
    assert_eq!(data["route"], "/api/users", "{v}");
    assert_eq!(data["method"], "POST", "{v}");
    assert_eq!(
        data["path"], "/api/users",
        "the query string is not shown: {v}"
    );
    assert_eq!(v["subject"], "/api/users", "{v}");
    assert_eq!(data["backend"], "legacy", "{v}");
    assert_eq!(data["status"], 201, "{v}");
    assert_eq!(data["request"]["content_type"], "application/json", "{v}");
    assert_eq!(data["request"]["body"], posted, "{v}");
    assert!(
        data["response"]["content_type"]
            .as_str()
            .is_some_and(|ct| ct.starts_with("application/json")),
        "{v}"
    );
    assert_eq!(data["response"]["body"], created.json(), "{v}");

    // A route with `query = true` shows it; without `body`, no bodies.
    let workout = send_with(
        Method::POST,
        &proxy.url("/api/workouts?source=watch&page=2"),
        &[json_ct],
        json!({"user_id": 1, "kind": "run", "duration_min": 30}).to_string(),
    )
    .await;
    assert_eq!(workout.status, StatusCode::CREATED, "{}", workout.text());
    let d = writes
        .next(Duration::from_secs(5))
        .await
        .expect("no write event for the workout");
    let v = cloudevent(&d, "write.api.workouts");
    assert_eq!(
        v["data"]["path"], "/api/workouts?source=watch&page=2",
        "{v}"
    );
    assert_eq!(v["data"]["status"], 201, "{v}");
    assert!(
        v["data"].get("request").is_none() && v["data"].get("response").is_none(),
        "bodies without `body`: {v}"
    );

    // None of these publishes anything (each carries a cookie; none a token).
    let refused: [(&str, Method, &str, String, u16); 6] = [
        (
            "a 400 from the monolith",
            Method::POST,
            "/api/users",
            json!({"name": ""}).to_string(),
            400,
        ),
        (
            "a 500 from the monolith",
            Method::POST,
            "/api/users/broken",
            posted.to_string(),
            500,
        ),
        (
            "a 404 PUT",
            Method::PUT,
            "/api/users/9999",
            posted.to_string(),
            404,
        ),
        (
            "a write refused by auth",
            Method::POST,
            "/api/social/posts",
            json!({"user_id": 1, "text": "hi"}).to_string(),
            401,
        ),
        (
            "a body over max_request_body",
            Method::POST,
            "/api/users",
            json!({"name": "x".repeat(2048), "email": "a@b"}).to_string(),
            413,
        ),
        ("a read", Method::GET, "/api/users/1", String::new(), 200),
    ];
    for (what, method, path, body, status) in refused {
        let h = [json_ct, ("cookie", "session=cookie-SECRET-0815")];
        let r = send_with(method, &proxy.url(path), &h, body).await;
        assert_eq!(r.status.as_u16(), status, "{what}: {}", r.text());
    }

    // Then a write that passes auth, carrying the token and a cookie: the next event is
    // its (events leave in order), so none of the above published one.
    let post = send_with(
        Method::POST,
        &proxy.url("/api/social/posts"),
        &[
            json_ct,
            ("authorization", &bearer),
            ("cookie", "session=cookie-SECRET-0815"),
        ],
        json!({"user_id": 7, "text": "ran 5k"}).to_string(),
    )
    .await;
    assert_eq!(post.status, StatusCode::CREATED, "{}", post.text());
    let d = writes
        .next(Duration::from_secs(5))
        .await
        .expect("no write event for the authenticated POST");
    let v = cloudevent(&d, "write.api.social");
    assert_no_secrets(&d, &secrets);
    assert_eq!(v["data"]["path"], "/api/social/posts", "{v}");
    assert_eq!(v["data"]["request"]["body"]["text"], "ran 5k", "{v}");
    let extra = writes.drain(Duration::from_secs(1)).await;
    assert!(
        extra.is_empty(),
        "unexpected write events: {:?}",
        extra
            .iter()
            .map(|d| String::from_utf8_lossy(&d.1).into_owned())
            .collect::<Vec<_>>()
    );

    let ev = events_json(&proxy).await;
    assert_eq!(
        ev["by_kind"]["write"],
        json!({"published": 3, "dropped": 0, "failed": 0}),
        "{ev}"
    );
    assert_eq!(counted(&ev), 3, "{ev}");
    let m = metrics_text(&proxy).await;
    let total = |kind, outcome| {
        metric(
            &m,
            "strangler_events_total",
            &[("kind", kind), ("outcome", outcome)],
        )
        .unwrap_or(0.0)
    };
    assert_eq!(total("write", "published"), 3.0, "{m}");
    assert_eq!(
        total("write", "dropped") + total("write", "failed"),
        0.0,
        "{m}"
    );
}

// -------------------------------------------------------------------------------------- 3

/// What the shadowed GET of a user just created through the proxy came to.
struct Story {
    id: u64,
    /// The route's `(compared, mismatched)` before and after that GET.
    before: (u64, u64),
    after: (u64, u64),
    /// `/diffs` entries of that GET's path.
    diffs: Vec<Value>,
    /// Mismatch events of that path.
    events: Vec<Value>,
}

/// POST /api/users through `proxy` (the monolith answers), wait for `applied` (users-service
/// has the user, when it consumes events), then GET the user through the proxy and wait for
/// the shadow comparison.
async fn write_then_read(
    proxy: &Proxy,
    users: SocketAddr,
    mismatches: &mut Consumer,
    consuming: bool,
) -> Story {
    let created = send_with(
        Method::POST,
        &proxy.url("/api/users"),
        &[("content-type", "application/json")],
        json!({"name": "Grace Story", "email": "Grace@Story.example"}).to_string(),
    )
    .await;
    assert_eq!(created.status, StatusCode::CREATED, "{}", created.text());
    let id = created.json()["user"]["id"].as_u64().unwrap();
    assert!(id > 20, "a new user, not a seeded one: {id}");
    let direct = format!("http://{users}/api/users/{id}");
    if consuming {
        eventually(Duration::from_secs(5), || async {
            (get(&direct).await.status == StatusCode::OK).then_some(())
        })
        .await;
    } else {
        // Nothing would apply it: give a consumer that should not exist the same chance.
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(get(&direct).await.status, StatusCode::NOT_FOUND);
    }
    let counts = |r: &Value| {
        (
            r["compared"].as_u64().unwrap(),
            r["mismatched"].as_u64().unwrap(),
        )
    };
    let before = counts(&route_json(proxy, "/api/users").await);
    let path = format!("/api/users/{id}");
    let read = get(&proxy.url(&path)).await;
    assert_eq!(
        read.status,
        StatusCode::OK,
        "the monolith has it: {}",
        read.text()
    );
    let after = eventually(Duration::from_secs(5), || async {
        let c = counts(&route_json(proxy, "/api/users").await);
        (c.0 > before.0).then_some(c)
    })
    .await;
    let diffs = get(&proxy.admin_url("/diffs?route=/api/users"))
        .await
        .json()
        .as_array()
        .unwrap()
        .iter()
        .filter(|d| d["path"] == path)
        .cloned()
        .collect();
    let events = mismatches
        .drain(Duration::from_millis(700))
        .await
        .iter()
        .map(|d| cloudevent(d, "mismatch.api.users"))
        .filter(|v| v["data"]["path"] == path)
        .collect();
    Story {
        id,
        before,
        after,
        diffs,
        events,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs rabbitmq-server (Debian package); CI runs it"]
async fn users_service_applies_the_monoliths_writes_so_the_shadowed_read_matches() {
    need_broker();
    let broker = Broker::start().await;
    let events = "{ kinds = [\"mismatch\", \"write\"], body = \"16KiB\" }";

    // With the consumer: users-service applies the write event before the read.
    let legacy = start_legacy(legacy_stub::Options::default()).await;
    let users = start_users_with_events(&broker).await;
    eventually(Duration::from_secs(15), || async {
        matches!(broker.queue_counts(USERS_QUEUE).await, Some((_, 1))).then_some(())
    })
    .await;
    let mut mismatches = broker.bind(EXCHANGE, "mismatch.#").await;
    let proxy = Proxy::start(&shadowed_users(
        &amqp_env(&broker.url()),
        legacy.addr,
        users.addr,
        events,
    ))
    .await;
    wait_link(&proxy, "up", Duration::from_secs(15)).await;
    let with = write_then_read(&proxy, users.addr, &mut mismatches, true).await;
    assert_eq!(
        with.after,
        (with.before.0 + 1, with.before.1),
        "the read of user {} was compared and matched",
        with.id
    );
    assert!(with.diffs.is_empty(), "{:?}", with.diffs);
    assert!(with.events.is_empty(), "{:?}", with.events);
    let ev = events_json(&proxy).await;
    assert_eq!(ev["by_kind"]["write"]["published"], 1, "{ev}");
    drop(proxy);
    drop(users);

    // Without it: users-service never hears of the user, answers 404, and the read
    // mismatches (and is published as such).
    let legacy = start_legacy(legacy_stub::Options::default()).await;
    let users = start_users(None).await;
    let proxy = Proxy::start(&shadowed_users(
        &amqp_env(&broker.url()),
        legacy.addr,
        users.addr,
        events,
    ))
    .await;
    wait_link(&proxy, "up", Duration::from_secs(15)).await;
    let without = write_then_read(&proxy, users.addr, &mut mismatches, false).await;
    assert_eq!(
        without.after,
        (without.before.0 + 1, without.before.1 + 1),
        "the read of user {} was compared and mismatched",
        without.id
    );
    assert_eq!(without.diffs.len(), 1, "{:?}", without.diffs);
    assert_eq!(
        without.diffs[0]["shadow"]["status"], 404,
        "{:?}",
        without.diffs
    );
    assert_eq!(without.events.len(), 1, "{:?}", without.events);
    assert_eq!(without.events[0]["data"]["shadow"]["status"], 404);
}

// ------------------------------------------------------------------------------------- 4a

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a latency comparison run with the rabbitmq tests (needs no broker); CI runs it"]
async fn no_broker_at_start_costs_clients_nothing_and_drops_are_counted() {
    let legacy = start_legacy(legacy_stub::Options::default()).await;
    let events = "[\"request\"]";
    let extra = "buffer = 50\npublish_timeout = \"1s\"";
    // Events off: the variable is unset (the same routes.toml otherwise).
    let unset = format!("STRANGLER_TEST_AMQP_UNSET_{}", std::process::id());
    let off = users_proxy(legacy.addr, &unset, events, extra, "").await;
    let off_events = events_json(&off).await;
    assert_eq!(off_events["enabled"], false, "{off_events}");
    // Nothing listens on the port: connections are refused.
    let refused_url = format!("amqp://guest:guest@{}/%2f", closed_port().await);
    let refused = users_proxy(legacy.addr, &amqp_env(&refused_url), events, extra, "").await;
    // Something accepts and never answers: every attempt waits out publish_timeout.
    let hang = start_raw(Misbehave::Hang).await;
    let hang_url = format!("amqp://guest:guest@{}/%2f", hang.addr);
    let hung = users_proxy(legacy.addr, &amqp_env(&hang_url), events, extra, "").await;

    // Measured once both have failed a first attempt (refused at once; silent after
    // publish_timeout), so the requests run beside the reconnect loop.
    wait_link(&refused, "down", Duration::from_secs(5)).await;
    wait_link(&hung, "down", Duration::from_secs(5)).await;
    let proxies = [&off, &refused, &hung];
    let c = client();
    let warmup = 20;
    let rounds = 300;
    let mut results: [Vec<(Outcome, Duration)>; 3] = Default::default();
    for i in 0..warmup + rounds {
        // Each round asks all three, in a rotating order, so noise falls on all alike.
        for k in 0..3 {
            let which = (i + k) % 3;
            let r = timed(&c, get_req(&proxies[which].url("/api/users/1"))).await;
            if i >= warmup {
                results[which].push(r);
            } else {
                assert!(matches!(r.0, Ok(StatusCode::OK)), "warm-up: {r:?}");
            }
        }
    }
    let [s_off, s_refused, s_hung] = results.map(|r| summarize(&r));
    eprintln!("events off:               {s_off}");
    eprintln!("broker refusing:          {s_refused}");
    eprintln!("broker accepting, silent: {s_hung}");
    let produced = (warmup + rounds) as u64;
    for (name, s, proxy) in [
        ("refused", &s_refused, &refused),
        ("silent", &s_hung, &hung),
    ] {
        assert!(s.failed.is_empty(), "{name}: {:?}", s.failed);
        assert!(s_off.failed.is_empty(), "events off: {:?}", s_off.failed);
        assert!(
            s.p99 <= s_off.p99 * 3 + Duration::from_millis(20),
            "{name}: p99 {:?} against {:?} with events off",
            s.p99,
            s_off.p99
        );
        assert!(
            s.max < Duration::from_millis(500),
            "{name}: a request took {:?} (publish_timeout is 1 s)",
            s.max
        );
        let ev = events_json(proxy).await;
        eprintln!("{name}: {ev}");
        assert!(
            ev["link"] == "down" || ev["link"] == "connecting",
            "{name}: {ev}"
        );
        assert!(ev["last_error"].is_string(), "{name}: {ev}");
        assert_eq!(num(&ev, "published"), 0, "{name}: {ev}");
        assert_eq!(num(&ev, "failed"), 0, "{name}: {ev}");
        assert_eq!(num(&ev, "buffered"), 50, "{name}: {ev}");
        assert_eq!(num(&ev, "dropped"), produced - 50, "{name}: {ev}");
        assert_eq!(ev["by_kind"]["request"]["dropped"], produced - 50, "{ev}");
        let m = metrics_text(proxy).await;
        assert_eq!(
            metric(
                &m,
                "strangler_events_total",
                &[("kind", "request"), ("outcome", "dropped")]
            ),
            Some((produced - 50) as f64),
            "{name}"
        );
    }
}

// ------------------------------------------------------------------------------------- 4b

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs rabbitmq-server (Debian package); CI runs it"]
async fn a_broker_restart_fails_no_request_and_publishing_resumes_by_itself() {
    need_broker();
    let mut broker = Broker::start().await;
    let legacy = start_legacy(legacy_stub::Options::default()).await;
    let proxy = users_proxy(
        legacy.addr,
        &amqp_env(&broker.url()),
        "{ kinds = [\"request\"], query = true }",
        "publish_timeout = \"1s\"",
        "",
    )
    .await;
    let mut consumer = broker.bind(EXCHANGE, "request.#").await;
    wait_link(&proxy, "up", Duration::from_secs(15)).await;
    let c = client();
    let mut markers = Vec::new();
    let load = Load::start(&proxy, "/api/users/1", Duration::from_millis(10));
    markers.push(timed(&c, get_req(&proxy.url("/api/users/2?marker=before"))).await);
    wait_for_path(
        &mut consumer,
        "request.api.users",
        "/api/users/2?marker=before",
        Duration::from_secs(5),
    )
    .await;

    let t = Instant::now();
    broker.stop().await;
    drop(consumer);
    wait_link(&proxy, "down", Duration::from_secs(15)).await;
    eprintln!("broker stopped in {:.1?}", t.elapsed());
    tokio::time::sleep(Duration::from_secs(1)).await; // clients carry on without it
    let down = events_json(&proxy).await;
    assert!(down["last_error"].is_string(), "{down}");

    let t = Instant::now();
    broker.start_again().await;
    let mut consumer = broker.bind(EXCHANGE, "request.#").await;
    wait_link(&proxy, "up", Duration::from_secs(30)).await;
    eprintln!("broker back and link up after {:.1?}", t.elapsed());
    markers.push(timed(&c, get_req(&proxy.url("/api/users/2?marker=after"))).await);
    wait_for_path(
        &mut consumer,
        "request.api.users",
        "/api/users/2?marker=after",
        Duration::from_secs(10),
    )
    .await;

    let mut results = load.finish().await;
    results.extend(markers);
    let s = summarize(&results);
    eprintln!("through the restart: {s}");
    assert!(s.failed.is_empty(), "{:?}", s.failed);
    assert!(s.max < Duration::from_millis(500), "{s}");
    let ev = settled(&proxy, results.len() as u64, Duration::from_secs(15)).await;
    eprintln!("{ev}");
    assert_eq!(ev["link"], "up", "{ev}");
    assert!(num(&ev, "published") > 0, "{ev}");
}

// ------------------------------------------------------------------------------------- 4c

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs rabbitmq-server (Debian package); CI runs it"]
async fn a_memory_alarm_fails_and_slows_no_request_and_publishing_resumes_after_it() {
    need_broker();
    let broker = Broker::start().await;
    let legacy = start_legacy(legacy_stub::Options::default()).await;
    let proxy = users_proxy(
        legacy.addr,
        &amqp_env(&broker.url()),
        "{ kinds = [\"request\"], query = true }",
        "buffer = 100\npublish_timeout = \"500ms\"",
        "",
    )
    .await;
    let mut consumer = broker.bind(EXCHANGE, "request.#").await;
    wait_link(&proxy, "up", Duration::from_secs(15)).await;
    let c = client();
    let mut all = Vec::new();
    let run = |n: usize, tag: &'static str| {
        let (c, base) = (c.clone(), proxy.url("/api/users/1"));
        async move {
            let mut out = Vec::new();
            for i in 0..n {
                out.push(timed(&c, get_req(&format!("{base}?{tag}={i}"))).await);
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            out
        }
    };
    let before = run(100, "before").await;
    wait_for_path(
        &mut consumer,
        "request.api.users",
        "/api/users/1?before=99",
        Duration::from_secs(5),
    )
    .await;
    let s_before = summarize(&before);
    all.extend(before);

    broker.block().await;
    let blocked = run(300, "blocked").await;
    let s_blocked = summarize(&blocked);
    all.extend(blocked);
    let ev = eventually(Duration::from_secs(10), || async {
        let ev = events_json(&proxy).await;
        (num(&ev, "dropped") + num(&ev, "failed") > 0).then_some(ev)
    })
    .await;
    eprintln!("before the alarm: {s_before}");
    eprintln!("during the alarm: {s_blocked}");
    eprintln!("events during the alarm: {ev}");
    assert!(s_before.failed.is_empty(), "{:?}", s_before.failed);
    assert!(s_blocked.failed.is_empty(), "{:?}", s_blocked.failed);
    assert!(
        s_blocked.max < Duration::from_millis(500),
        "a request waited {:?} (publish_timeout is 500 ms)",
        s_blocked.max
    );
    assert!(
        s_blocked.p99 <= s_before.p99 * 3 + Duration::from_millis(20),
        "p99 {:?} during the alarm against {:?} before",
        s_blocked.p99,
        s_before.p99
    );

    let t = Instant::now();
    broker.unblock().await;
    // The backlog goes out (the buffer is full at this point: an event now would be
    // dropped), then a new event is published.
    eventually(Duration::from_secs(20), || async {
        let ev = events_json(&proxy).await;
        (num(&ev, "buffered") == 0).then_some(())
    })
    .await;
    let after = timed(&c, get_req(&proxy.url("/api/users/1?after=1"))).await;
    assert!(matches!(after.0, Ok(StatusCode::OK)), "{after:?}");
    all.push(after);
    wait_for_path(
        &mut consumer,
        "request.api.users",
        "/api/users/1?after=1",
        Duration::from_secs(10),
    )
    .await;
    eprintln!(
        "backlog out and a new event published {:.1?} after the alarm cleared",
        t.elapsed()
    );
    let ev = settled(&proxy, all.len() as u64, Duration::from_secs(20)).await;
    eprintln!("{ev}");
    assert!(num(&ev, "dropped") + num(&ev, "failed") > 0, "{ev}");
    wait_link(&proxy, "up", Duration::from_secs(10)).await;
}

// -------------------------------------------------------------------------------------- 5

/// Waits until the `produced` events are counted, then checks the counters against each
/// other, `/metrics`, and what reached `consumer` (at most once: between published and
/// published + failed; `received` counts them across calls).
async fn check_accounts(
    proxy: &Proxy,
    produced: u64,
    consumer: &mut Consumer,
    received: &mut u64,
) -> Value {
    let ev = settled(proxy, produced, Duration::from_secs(30)).await;
    *received += consumer.drain(Duration::from_secs(1)).await.len() as u64;
    let (published, failed) = (num(&ev, "published"), num(&ev, "failed"));
    assert!(
        published <= *received && *received <= published + failed,
        "{received} received, {published} published, {failed} failed"
    );
    let m = metrics_text(proxy).await;
    let total = |outcome| {
        metric(
            &m,
            "strangler_events_total",
            &[("kind", "request"), ("outcome", outcome)],
        )
        .unwrap_or(0.0) as u64
    };
    for outcome in ["published", "dropped", "failed"] {
        assert_eq!(total(outcome), num(&ev, outcome), "{outcome}: {ev}\n{m}");
        assert_eq!(ev["by_kind"]["request"][outcome], num(&ev, outcome), "{ev}");
    }
    eprintln!("received {received}: {ev}");
    ev
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs rabbitmq-server (Debian package); CI runs it"]
async fn a_burst_of_ten_buffers_is_counted_exactly_and_no_request_waits() {
    need_broker();
    let broker = Broker::start().await;
    let legacy = start_legacy(legacy_stub::Options::default()).await;
    let proxy = users_proxy(
        legacy.addr,
        &amqp_env(&broker.url()),
        "[\"request\"]",
        "buffer = 50\npublish_timeout = \"1s\"",
        "",
    )
    .await;
    let mut consumer = broker.bind(EXCHANGE, "request.#").await;
    wait_link(&proxy, "up", Duration::from_secs(15)).await;

    // With the broker keeping up.
    let results = burst(&proxy, "/api/users/1", 500, 25).await;
    let s = summarize(&results);
    eprintln!("burst, broker up: {s}");
    assert!(s.failed.is_empty(), "{:?}", s.failed);
    assert!(s.max < Duration::from_millis(500), "{s}");
    let mut received = 0;
    check_accounts(&proxy, 500, &mut consumer, &mut received).await;

    // With a broker that stopped taking them (memory alarm): the buffer fills, the rest is
    // dropped, and still no request waits. First a stall: until confirms are overdue, the
    // window of the connection (grown by the 500 confirms above) would take the whole
    // burst off the buffer; the next connection starts again at one event in flight.
    broker.block().await;
    let c = client();
    let mut stall = Vec::new();
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        stall.push(timed(&c, get_req(&proxy.url("/api/users/1?stall=1"))).await);
        let ev = events_json(&proxy).await;
        if num(&ev, "failed") > 0 {
            break;
        }
        assert!(Instant::now() < until, "no confirm overdue in 10 s: {ev}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let s = summarize(&stall);
    assert!(s.failed.is_empty(), "{:?}", s.failed);
    let results = burst(&proxy, "/api/users/1", 500, 25).await;
    let s = summarize(&results);
    let full = events_json(&proxy).await;
    eprintln!("burst, broker blocked: {s}\n{full}");
    assert!(s.failed.is_empty(), "{:?}", s.failed);
    assert!(s.max < Duration::from_millis(500), "{s}");
    assert!(
        num(&full, "dropped") > 0,
        "the buffer of 50 never filled: {full}"
    );
    broker.unblock().await;
    let produced = 1000 + stall.len() as u64;
    check_accounts(&proxy, produced, &mut consumer, &mut received).await;
}

/// The link during a memory alarm: sampled every 10 ms for 3 s while requests keep events
/// coming (after a first `publish_timeout` has passed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs rabbitmq-server (Debian package); CI runs it"]
async fn a_memory_alarm_shows_on_routes_as_a_stalled_link() {
    need_broker();
    let broker = Broker::start().await;
    let legacy = start_legacy(legacy_stub::Options::default()).await;
    let proxy = users_proxy(
        legacy.addr,
        &amqp_env(&broker.url()),
        "[\"request\"]",
        "publish_timeout = \"500ms\"",
        "",
    )
    .await;
    wait_link(&proxy, "up", Duration::from_secs(15)).await;
    broker.block().await;
    let load = Load::start(&proxy, "/api/users/1", Duration::from_millis(10));
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut seen = std::collections::BTreeMap::<String, usize>::new();
    let mut errors = std::collections::BTreeSet::new();
    let until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < until {
        let ev = events_json(&proxy).await;
        *seen
            .entry(ev["link"].as_str().unwrap().to_string())
            .or_default() += 1;
        errors.insert(ev["last_error"].to_string());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let s = summarize(&load.finish().await);
    let ev = events_json(&proxy).await;
    eprintln!("link states seen during the alarm: {seen:?}; last_error: {errors:?}\n{s}\n{ev}");
    broker.unblock().await;
    assert!(s.failed.is_empty(), "{:?}", s.failed);
    assert!(num(&ev, "failed") > 0, "confirms were overdue: {ev}");
    assert!(
        seen.contains_key("stalled"),
        "confirms were overdue for 3 s ({} events failed), yet /routes never showed the link \
         `stalled`: {seen:?}",
        num(&ev, "failed")
    );
}

// -------------------------------------------------------------------------------------- 6

/// The proxy's own counters: `(published, dropped, failed, buffered)`.
fn totals(proxy: &Proxy) -> (u64, u64, u64, usize) {
    let events = proxy.state.events().expect("events are on");
    let (p, d, f) = events.totals();
    (p, d, f, events.buffered())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs rabbitmq-server (Debian package); CI runs it"]
async fn shutdown_right_after_a_burst_publishes_every_event() {
    need_broker();
    let broker = Broker::start().await;
    let legacy = start_legacy(legacy_stub::Options::default()).await;
    let mut proxy = users_proxy(
        legacy.addr,
        &amqp_env(&broker.url()),
        "[\"request\"]",
        "",
        "drain_timeout = \"10s\"",
    )
    .await;
    let mut consumer = broker.bind(EXCHANGE, "request.#").await;
    wait_link(&proxy, "up", Duration::from_secs(15)).await;
    let results = burst(&proxy, "/api/users/1", 300, 30).await;
    let at_shutdown = totals(&proxy);
    let t = Instant::now();
    let task = proxy.shutdown();
    tokio::time::timeout(Duration::from_secs(15), task)
        .await
        .expect("shutdown within drain_timeout")
        .unwrap()
        .unwrap();
    let took = t.elapsed();
    let after = totals(&proxy);
    eprintln!("at shutdown {at_shutdown:?}, after {after:?}, shutdown took {took:.1?}");
    assert!(summarize(&results).failed.is_empty());
    assert_eq!(
        after,
        (300, 0, 0, 0),
        "(published, dropped, failed, buffered)"
    );
    let received = consumer.drain(Duration::from_secs(1)).await.len();
    assert_eq!(received, 300);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs rabbitmq-server (Debian package); CI runs it"]
async fn shutdown_waits_for_the_broker_to_publish_what_was_buffered() {
    need_broker();
    let mut broker = Broker::start().await;
    // A durable queue of our own, bound before the broker goes away: it is there again, with
    // its binding, when the broker comes back, whoever reconnects first.
    let conn = broker.connect().await;
    let ch = conn.open_channel(None).await.unwrap();
    ch.exchange_declare(
        amqprs::channel::ExchangeDeclareArguments::of_type(
            EXCHANGE,
            amqprs::channel::ExchangeType::Topic,
        )
        .durable(true)
        .auto_delete(false)
        .finish(),
    )
    .await
    .unwrap();
    ch.queue_declare(amqprs::channel::QueueDeclareArguments::durable_client_named("flush-check"))
        .await
        .unwrap();
    ch.queue_bind(amqprs::channel::QueueBindArguments::new(
        "flush-check",
        EXCHANGE,
        "request.#",
    ))
    .await
    .unwrap();
    drop(ch);
    let _ = conn.close().await;
    broker.stop().await;

    let legacy = start_legacy(legacy_stub::Options::default()).await;
    let mut proxy = users_proxy(
        legacy.addr,
        &amqp_env(&broker.url()),
        "[\"request\"]",
        "",
        "drain_timeout = \"30s\"",
    )
    .await;
    let results = burst(&proxy, "/api/users/1", 100, 10).await;
    assert!(summarize(&results).failed.is_empty());
    let ev = events_json(&proxy).await;
    assert_eq!(num(&ev, "buffered"), 100, "{ev}");
    assert_eq!(ev["link"], "down", "{ev}");

    // Shutdown first, the broker back after: the flush waits for it (until drain_timeout).
    let t = Instant::now();
    let task = proxy.shutdown();
    broker.start_again().await;
    tokio::time::timeout(Duration::from_secs(40), task)
        .await
        .expect("shutdown within drain_timeout")
        .unwrap()
        .unwrap();
    let took = t.elapsed();
    let after = totals(&proxy);
    eprintln!("shutdown with the broker coming back took {took:.1?}: {after:?}");
    assert_eq!(
        after,
        (100, 0, 0, 0),
        "(published, dropped, failed, buffered)"
    );
    assert_eq!(broker.queue_counts("flush-check").await, Some((100, 0)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs rabbitmq-server (Debian package); CI runs it"]
async fn shutdown_under_a_memory_alarm_is_bounded_and_counts_every_event() {
    need_broker();
    let broker = Broker::start().await;
    let legacy = start_legacy(legacy_stub::Options::default()).await;
    // Confirms would be awaited for 10 s, but the drain allows 1 s.
    let mut proxy = users_proxy(
        legacy.addr,
        &amqp_env(&broker.url()),
        "[\"request\"]",
        "publish_timeout = \"10s\"",
        "drain_timeout = \"1s\"",
    )
    .await;
    wait_link(&proxy, "up", Duration::from_secs(15)).await;
    broker.block().await;
    let results = burst(&proxy, "/api/users/1", 50, 5).await;
    let s = summarize(&results);
    assert!(s.failed.is_empty(), "{:?}", s.failed);
    assert!(s.max < Duration::from_millis(500), "{s}");
    // The publisher has sent what its window allows and waits for confirms.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let at_shutdown = totals(&proxy);
    let t = Instant::now();
    let task = proxy.shutdown();
    tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .expect("shutdown bounded")
        .unwrap()
        .unwrap();
    let took = t.elapsed();
    let (p, d, f, buffered) = totals(&proxy);
    let m = proxy.state.metrics().render();
    let gauge = metric(&m, "strangler_events_buffered", &[]);
    let link = proxy.state.events().unwrap().to_json()["link"].clone();
    eprintln!(
        "at shutdown {at_shutdown:?}, after {:?} (strangler_events_buffered {gauge:?}, link \
         {link}), shutdown took {took:.1?}",
        (p, d, f, buffered)
    );
    assert!(
        took < Duration::from_secs(4),
        "drain_timeout is 1 s, shutdown took {took:?}"
    );
    assert_eq!(buffered, 0, "events left in the buffer after shutdown");
    assert_eq!(
        p + d + f,
        50,
        "every event published, dropped or failed: {:?}",
        (p, d, f)
    );
    assert_eq!(gauge, Some(0.0), "strangler_events_buffered after shutdown");
    assert_eq!(link, "closed");
    broker.unblock().await;
}

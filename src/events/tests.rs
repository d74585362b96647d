use super::*;
use crate::config::EventsSettings;

fn settings(buffer: usize, buffer_bytes: usize) -> EventsSettings {
    EventsSettings {
        url: Some(AmqpUrl::parse("amqp://127.0.0.1:1").unwrap()),
        url_env: "X".into(),
        exchange: "strangler".into(),
        buffer,
        buffer_bytes,
        publish_timeout: Duration::from_secs(1),
        source: "strangler".into(),
    }
}

fn facts() -> RequestFacts<'static> {
    RequestFacts {
        request_id: "r-1",
        route: "/api/users",
        method: "POST",
        path: "/api/users",
        backend: "legacy",
        status: 201,
    }
}

#[test]
fn off_without_a_url() {
    let mut s = settings(10, 1 << 20);
    s.url = None;
    assert!(Events::new(&s, &Metrics::new()).is_none());
}

#[test]
fn a_full_buffer_drops_and_counts_without_waiting() {
    let events = Events::new(&settings(3, 1 << 20), &Metrics::new()).unwrap();
    for _ in 0..10 {
        events.emit(Event::write("api.users", &facts(), None));
    }
    assert_eq!(events.buffered(), 3);
    assert_eq!(events.totals(), (0, 7, 0));
}

#[test]
fn the_byte_bound_drops_too() {
    let events = Events::new(&settings(100, 2 * EVENT_OVERHEAD + 10), &Metrics::new()).unwrap();
    for _ in 0..5 {
        events.emit(Event::request(
            "api.users",
            &facts(),
            Duration::from_millis(3),
        ));
    }
    assert_eq!(events.buffered(), 2);
    assert_eq!(events.totals().1, 3);
}

#[test]
fn a_cloudevent_has_the_required_attributes_and_no_credentials() {
    let budget = Budget::new(1 << 20);
    let body = |ct: &str, b: &'static [u8]| {
        let (mut tee, mut rx) = Tee::new(1024, &budget);
        tee.push(&bytes::Bytes::from_static(b));
        tee.finish();
        Body::render(Some(ct), rx.try_recv().ok())
    };
    let ev = Event::write(
        "api.users",
        &facts(),
        Some((
            body("application/json", br#"{"name":"Ada"}"#),
            body("text/plain", b"created"),
        )),
    );
    assert_eq!(ev.routing_key(), "write.api.users");
    let v: Value = serde_json::from_slice(&ev.to_cloudevent("strangler", "abc")).unwrap();
    for attr in [
        "specversion",
        "type",
        "source",
        "id",
        "time",
        "datacontenttype",
        "subject",
    ] {
        assert!(v.get(attr).is_some(), "{attr} missing: {v}");
    }
    assert_eq!(v["specversion"], "1.0");
    assert_eq!(v["type"], "dev.strangler.write");
    assert_eq!(v["data"]["status"], 201);
    assert_eq!(v["data"]["request"]["body"]["name"], "Ada");
    assert_eq!(v["data"]["response"]["text"], "created");
    assert!(humantime::parse_rfc3339(v["time"].as_str().unwrap()).is_ok());
    let text = v.to_string().to_lowercase();
    assert!(!text.contains("authorization") && !text.contains("cookie"));
}

#[test]
fn bodies_over_the_cap_or_cut_short_are_named_omitted() {
    let budget = Budget::new(1 << 20);
    let (mut tee, mut rx) = Tee::new(4, &budget);
    tee.push(&bytes::Bytes::from_static(b"0123456789"));
    let over = Body::render(Some("application/json"), rx.try_recv().ok());
    assert_eq!(over.value["omitted"], "over the events body cap");
    let cut = Body::render(None, None);
    assert!(cut.value["omitted"].is_string());
    let (mut tee, mut rx) = Tee::new(64, &budget);
    tee.push(&bytes::Bytes::from_static(&[0xff, 0x00, 0xfe]));
    tee.finish();
    let binary = Body::render(Some("application/octet-stream"), rx.try_recv().ok());
    assert_eq!(binary.value["base64"], "/wD+");
}

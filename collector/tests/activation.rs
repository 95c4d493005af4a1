//! Activation through real HTTP to a local webhook receiver that checks what it gets:
//! the HMAC-SHA256 signature (computed here with the `hmac` crate from the secret), the
//! idempotency key, the personalised message. Events move profiles into segments;
//! campaigns deliver once, retry failures with backoff, go dead on a permanent error
//! and are replayed; consent and frequency caps skip; a restart with deliveries pending
//! loses none and delivers none twice; a destination is paced; a segment is exported
//! as a customer-match CSV to a file and by upload; bad destinations and campaigns get
//! clear errors.

mod common;

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use common::{Harness, error_code, eventually};
use hmac::{Hmac, Mac};
use reqwest::Method;
use serde_json::{Value, json};
use sha2::Sha256;

const SECRET: &str = "whsec-test-secret";

/// One request the receiver took.
#[derive(Debug, Clone)]
struct Received {
    key: String,
    body: Value,
    raw: Vec<u8>,
    answered: u16,
}

#[derive(Default)]
struct Inbox {
    received: Vec<Received>,
    /// Statuses to answer next (then 200).
    plan: VecDeque<u16>,
    /// Requests whose signature did not verify.
    forged: usize,
}

/// A webhook receiver on 127.0.0.1, port 0, on its own thread and runtime.
struct Receiver {
    addr: SocketAddr,
    inbox: Arc<Mutex<Inbox>>,
}

fn verify(headers: &HeaderMap, body: &[u8]) -> bool {
    let Some(signature) = headers.get("kith-signature").and_then(|v| v.to_str().ok()) else {
        return false;
    };
    let mut t = None;
    let mut v1 = None;
    for part in signature.split(',') {
        match part.split_once('=') {
            Some(("t", value)) => t = value.parse::<i64>().ok(),
            Some(("v1", value)) => v1 = Some(value.to_owned()),
            _ => {}
        }
    }
    let (Some(t), Some(v1)) = (t, v1) else {
        return false;
    };
    let now = jiff::Timestamp::now().as_second();
    if (now - t).abs() > 300 {
        return false;
    }
    let Ok(expected) = (0..v1.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(v1.get(i..i + 2).unwrap_or("zz"), 16))
        .collect::<Result<Vec<u8>, _>>()
    else {
        return false;
    };
    let mut mac = Hmac::<Sha256>::new_from_slice(SECRET.as_bytes()).expect("key");
    mac.update(format!("{t}.").as_bytes());
    mac.update(body);
    mac.verify_slice(&expected).is_ok()
}

async fn take(
    State(inbox): State<Arc<Mutex<Inbox>>>,
    headers: HeaderMap,
    body: Bytes,
) -> StatusCode {
    let mut inbox = inbox.lock().expect("inbox");
    if !verify(&headers, &body) {
        inbox.forged += 1;
        return StatusCode::UNAUTHORIZED;
    }
    let answered = inbox.plan.pop_front().unwrap_or(200);
    let key = headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    inbox.received.push(Received {
        key,
        body: serde_json::from_slice(&body).unwrap_or(Value::Null),
        raw: body.to_vec(),
        answered,
    });
    StatusCode::from_u16(answered).expect("status")
}

impl Receiver {
    fn start() -> Self {
        let inbox = Arc::new(Mutex::new(Inbox::default()));
        let state = inbox.clone();
        let addr = common::serve(move |_| {
            axum::Router::new()
                .route("/hook", axum::routing::post(take))
                .with_state(state)
        });
        Receiver { addr, inbox }
    }

    fn url(&self) -> String {
        format!("http://{}/hook", self.addr)
    }

    fn plan(&self, statuses: &[u16]) {
        self.inbox.lock().expect("inbox").plan = statuses.iter().copied().collect();
    }

    fn received(&self) -> Vec<Received> {
        let inbox = self.inbox.lock().expect("inbox");
        assert_eq!(inbox.forged, 0, "a request's signature did not verify");
        inbox.received.clone()
    }
}

/// A segment, a webhook destination to `receiver` and a campaign on entering the segment.
fn campaign(h: &Harness, receiver: &Receiver, extra: Value) -> (String, String) {
    let segment_exists = h.admin_get("/v1/segments/pro").status() == 200;
    if !segment_exists {
        h.create(
            "/v1/segments",
            json!({"key": "pro", "definition": "traits.plan = \"pro\""}),
        );
    }
    let destination = h.create(
        "/v1/destinations",
        json!({"name": "CRM", "type": "webhook", "url": receiver.url(), "secret": SECRET,
               "retry_base_ms": 20, "max_attempts": 4}),
    );
    assert_eq!(destination["secret"], "(set)", "secrets are not shown");
    let destination = destination["id"].as_str().expect("id").to_owned();
    let mut body = json!({
        "name": "Welcome",
        "trigger": {"type": "segment_entered", "segment": "pro"},
        "destination": destination,
        "template": {"title": "Welcome {{traits.first_name}}", "body": "You are in {{segment}}"}
    });
    if let (Value::Object(body), Value::Object(extra)) = (&mut body, extra) {
        body.extend(extra);
    }
    let campaign = h.create("/v1/campaigns", body);
    (destination, campaign["id"].as_str().expect("id").to_owned())
}

#[test]
fn a_segment_entry_is_delivered_once_signed_retried_and_on_the_timeline() {
    let h = Harness::with_identity();
    let receiver = Receiver::start();
    receiver.plan(&[500, 503]);
    let (_, campaign_id) = campaign(&h, &receiver, json!({}));

    h.send_batch(json!([{"type": "identify", "userId": "ann",
                         "traits": {"plan": "pro", "first_name": "Ann"}}]));
    let delivered = eventually("the delivery", || {
        let found = h.deliveries("state=delivered");
        (!found.is_empty()).then_some(found)
    });
    assert_eq!(delivered.len(), 1);
    let delivery = &delivered[0];
    assert_eq!(
        delivery["attempts"], 3,
        "two failures, then taken: {delivery}"
    );
    assert_eq!(delivery["campaign"], campaign_id.as_str());

    let received = receiver.received();
    assert_eq!(received.len(), 3);
    let key = delivery["idempotency_key"].as_str().expect("key");
    assert!(
        received.iter().all(|r| r.key == key),
        "one key on every attempt"
    );
    assert_eq!(
        received.iter().map(|r| r.answered).collect::<Vec<_>>(),
        [500, 503, 200]
    );
    let body = &received[2].body;
    assert_eq!(
        body["message"],
        json!({"title": "Welcome Ann", "body": "You are in pro"})
    );
    assert_eq!(body["type"], "entered");
    assert_eq!(body["segment"], "pro");

    // The outcome is in the profile's timeline.
    let profile = body["profile_id"].as_str().expect("profile");
    eventually("the timeline event", || {
        let events: Value = h
            .admin_get(&format!("/v1/profiles/{profile}/events"))
            .json()
            .ok()?;
        events["events"]
            .as_array()?
            .iter()
            .any(|e| e["message"]["event"] == "Webhook Delivered")
            .then_some(())
    });

    // More events that do not move ann into the segment again send nothing more.
    h.send_batch(json!([{"type": "identify", "userId": "ann", "traits": {"city": "Lyon"}}]));
    assert_eq!(h.deliveries("").len(), 1);
    assert_eq!(receiver.received().len(), 3);
}

#[test]
fn permanent_failures_go_dead_and_are_replayed_consent_and_caps_skip() {
    let h = Harness::with_identity();
    let receiver = Receiver::start();
    receiver.plan(&[400]);
    let (_, capped) = campaign(
        &h,
        &receiver,
        json!({"frequency_cap": {"max": 1, "per_secs": 3600}}),
    );
    let (_, consented) = campaign(&h, &receiver, json!({"consent_purpose": "marketing"}));

    h.send_batch(json!([{"type": "identify", "userId": "bo", "traits": {"plan": "pro"}}]));
    let dead = eventually("a dead delivery", || {
        let found = h.deliveries("state=dead");
        (!found.is_empty()).then_some(found)
    });
    assert_eq!(dead.len(), 1, "a 400 is not retried");
    assert_eq!(dead[0]["attempts"], 1);
    assert_eq!(dead[0]["campaign"], capped.as_str());
    let skipped = h.deliveries("state=skipped");
    assert_eq!(skipped.len(), 1, "no consent for marketing");
    assert_eq!(skipped[0]["campaign"], consented.as_str());

    let replayed: Value = h
        .admin_send(Method::POST, "/v1/deliveries/replay", &json!({}))
        .json()
        .expect("json");
    assert_eq!(replayed["replayed"], 1);
    eventually("the replayed delivery", || {
        (h.deliveries("state=delivered").len() == 1).then_some(())
    });

    // Out and in again within the hour: the capped campaign skips, the consented one
    // (consent granted now) sends.
    h.send_batch(json!([{"type": "identify", "userId": "bo", "traits": {"plan": "free"}}]));
    h.send_batch(json!([{"type": "identify", "userId": "bo",
                         "traits": {"plan": "pro", "consent": {"marketing": true}}}]));
    eventually("the consented delivery", || {
        (h.deliveries("state=delivered").len() == 2).then_some(())
    });
    let skipped = h.deliveries("state=skipped");
    assert_eq!(skipped.len(), 2);
    assert_eq!(skipped[1]["campaign"], capped.as_str());
    assert!(
        skipped[1]["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("frequency cap"))
    );
}

#[test]
fn a_restart_with_deliveries_pending_loses_none_and_repeats_none() {
    let mut h = Harness::with_identity();
    let receiver = Receiver::start();
    receiver.plan(&[503; 10_000]);
    campaign(&h, &receiver, json!({}));
    let users: Vec<Value> = (0..20)
        .map(|i| json!({"type": "identify", "userId": format!("user-{i}"), "traits": {"plan": "pro"}}))
        .collect();
    h.send_batch(Value::Array(users));
    eventually("20 deliveries in the outbox", || {
        (h.deliveries("state=pending").len() == 20).then_some(())
    });

    h.restart(|config| config.identity = true);
    receiver.plan(&[]);
    eventually("every delivery taken", || {
        (h.deliveries("state=delivered").len() == 20).then_some(())
    });
    let mut taken: BTreeMap<String, usize> = BTreeMap::new();
    for r in receiver.received() {
        if r.answered == 200 {
            *taken.entry(r.key).or_default() += 1;
        }
    }
    assert_eq!(taken.len(), 20, "one delivery per profile");
    assert!(
        taken.values().all(|n| *n == 1),
        "none taken twice: {taken:?}"
    );
    assert_eq!(h.deliveries("").len(), 20, "none created twice");
}

#[test]
fn bad_destinations_and_campaigns_get_clear_errors() {
    let h = Harness::with_identity();
    let receiver = Receiver::start();
    for (body, code) in [
        (json!({"type": "carrier-pigeon"}), "invalid_body"),
        (json!({"type": "webhook", "secret": "s"}), "invalid_body"),
        (
            json!({"type": "webhook", "url": "ftp://x", "secret": "s"}),
            "invalid_body",
        ),
        (
            json!({"type": "webhook", "url": "not a url", "secret": "s"}),
            "invalid_body",
        ),
        (
            json!({"type": "webhook", "url": receiver.url()}),
            "invalid_body",
        ),
        (
            json!({"type": "webhook", "url": receiver.url(), "secret": "s", "colour": 1}),
            "invalid_body",
        ),
        (
            json!({"type": "webhook", "url": receiver.url(), "secret": "s", "max_attempts": 0}),
            "invalid_body",
        ),
    ] {
        assert_eq!(
            error_code(h.admin_send(Method::POST, "/v1/destinations", &body)),
            (400, code.to_owned()),
            "{body}"
        );
    }
    let (destination, campaign_id) = campaign(&h, &receiver, json!({}));
    for (body, code) in [
        (
            json!({"trigger": {"type": "segment_entered", "segment": "nope"}, "destination": destination, "template": {}}),
            "unknown_segment",
        ),
        (
            json!({"trigger": {"type": "segment_entered", "segment": "pro"}, "destination": "dst_nope", "template": {}}),
            "unknown_destination",
        ),
        (
            json!({"trigger": {"type": "sometimes", "segment": "pro"}, "destination": destination, "template": {}}),
            "invalid_body",
        ),
        (
            json!({"trigger": {"type": "segment_exited", "segment": "pro"}, "destination": destination}),
            "invalid_body",
        ),
        (
            json!({"trigger": {"type": "segment_exited", "segment": "pro"}, "destination": destination, "template": {},
                "frequency_cap": {"max": 0, "per_secs": 1}}),
            "invalid_body",
        ),
    ] {
        assert_eq!(
            error_code(h.admin_send(Method::POST, "/v1/campaigns", &body)),
            (400, code.to_owned()),
            "{body}"
        );
    }
    let delete = |path: &str| {
        h.http
            .delete(h.url(path))
            .bearer_auth(common::ADMIN_TOKEN)
            .send()
            .expect("sent")
    };
    assert_eq!(
        error_code(delete(&format!("/v1/destinations/{destination}"))),
        (400, "destination_in_use".to_owned())
    );
    assert_eq!(
        error_code(delete("/v1/segments/pro")),
        (400, "segment_in_use".to_owned()),
        "a campaign is triggered by it"
    );
    assert_eq!(
        delete(&format!("/v1/campaigns/{campaign_id}")).status(),
        200
    );
    assert_eq!(
        delete(&format!("/v1/destinations/{destination}")).status(),
        200
    );
    assert_eq!(
        error_code(h.admin_get(&format!("/v1/destinations/{destination}"))),
        (404, "not_found".to_owned())
    );
    assert_eq!(
        error_code(h.admin_get("/v1/deliveries?state=lost")),
        (400, "invalid_query".to_owned())
    );
    let without = Harness::start();
    assert_eq!(error_code(without.admin_get("/v1/campaigns")).0, 404);
}

fn sha256_hex(text: &str) -> String {
    use sha2::Digest as _;
    Sha256::digest(text.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[test]
fn a_segment_is_exported_as_hashed_customer_match_csv_to_a_file_and_by_upload() {
    let h = Harness::with_identity();
    let receiver = Receiver::start();
    h.create(
        "/v1/segments",
        json!({"key": "pro", "definition": "traits.plan = \"pro\""}),
    );
    h.send_batch(json!([
        {"type": "identify", "userId": "ann", "traits": {"plan": "pro", "email": " Ann@Example.COM ",
         "phone": "+33 6 12 34 56 78", "first_name": " Ann ", "last_name": "Lee", "country": "FR", "zip": "69001"}},
        {"type": "identify", "userId": "bo", "traits": {"plan": "pro", "email": "bo@example.com"}},
        {"type": "identify", "userId": "cy", "traits": {"plan": "pro"}},
        {"type": "identify", "userId": "dee", "traits": {"plan": "free", "email": "dee@example.com"}}
    ]));
    for outside in ["/etc", "../../elsewhere", "ok/../../.."] {
        let refused = h.admin_send(
            Method::POST,
            "/v1/destinations",
            &json!({"type": "audience_export", "directory": outside}),
        );
        assert_eq!(
            error_code(refused),
            (400, "refused_destination".to_owned()),
            "{outside}"
        );
    }
    let destination = h.create(
        "/v1/destinations",
        json!({"type": "audience_export", "directory": "audiences", "url": receiver.url(),
               "secret": SECRET}),
    );
    let id = destination["id"].as_str().expect("id");
    let report: Value = h
        .admin_send(
            Method::POST,
            &format!("/v1/destinations/{id}/export"),
            &json!({"segment": "pro"}),
        )
        .json()
        .expect("json");
    assert_eq!(report["rows"], 2, "{report}");
    assert_eq!(report["skipped_without_email_or_phone"], 1);
    assert_eq!(report["uploaded_status"], 200);
    let path = report["file"].as_str().expect("file");
    assert!(
        std::path::Path::new(path).starts_with(h.dir.path().join("exports/audiences")),
        "{path}: under the export root"
    );
    let file = std::fs::read_to_string(path).expect("csv");
    let mut lines: Vec<&str> = file.lines().collect();
    assert_eq!(
        lines.remove(0),
        "Email,Phone,First Name,Last Name,Country,Zip"
    );
    lines.sort();
    let mut expected = vec![
        format!(
            "{},{},{},{},FR,69001",
            sha256_hex("ann@example.com"),
            sha256_hex("+33612345678"),
            sha256_hex("ann"),
            sha256_hex("lee")
        ),
        format!("{},,,,,", sha256_hex("bo@example.com")),
    ];
    expected.sort();
    assert_eq!(lines, expected);
    let uploaded = receiver.received();
    assert_eq!(uploaded.len(), 1, "one signed upload");
    assert_eq!(String::from_utf8_lossy(&uploaded[0].raw), file);

    // Campaigns cannot send to an export; an unknown segment is refused.
    assert_eq!(
        error_code(h.admin_send(
            Method::POST,
            &format!("/v1/destinations/{id}/export"),
            &json!({"segment": "nope"})
        )),
        (400, "unknown_segment".to_owned())
    );
    let refused = h.admin_send(
        Method::POST,
        "/v1/campaigns",
        &json!({"trigger": {"type": "segment_entered", "segment": "pro"}, "destination": id,
                "template": {}}),
    );
    assert_eq!(error_code(refused), (400, "invalid_destination".to_owned()));
}

#[test]
fn a_paced_destination_spaces_its_deliveries() {
    let h = Harness::with_identity();
    let receiver = Receiver::start();
    // An unpaced campaign, and a second one to a destination paced at 20/s.
    campaign(&h, &receiver, json!({}));
    let paced = h.create(
        "/v1/destinations",
        json!({"type": "webhook", "url": receiver.url(), "secret": SECRET, "rate_per_sec": 20}),
    );
    let paced_id = paced["id"].as_str().expect("id");
    h.create(
        "/v1/campaigns",
        json!({"trigger": {"type": "segment_entered", "segment": "pro"}, "destination": paced_id,
               "template": {"n": "{{profile_id}}"}}),
    );
    let started = std::time::Instant::now();
    let users: Vec<Value> = (0..10)
        .map(|i| json!({"type": "identify", "userId": format!("p-{i}"), "traits": {"plan": "pro"}}))
        .collect();
    h.send_batch(Value::Array(users));
    eventually("20 deliveries", || {
        (h.deliveries("state=delivered").len() == 20).then_some(())
    });
    // Ten deliveries at 20 per second take at least 9 intervals of 50 ms; the unpaced
    // destination's ten do not count against it.
    assert!(
        started.elapsed() >= std::time::Duration::from_millis(450),
        "paced: {:?}",
        started.elapsed()
    );
}

#[test]
fn an_event_from_a_profile_in_the_segment_fires_its_campaign() {
    let h = Harness::with_identity();
    let receiver = Receiver::start();
    h.create(
        "/v1/segments",
        json!({"key": "pro", "definition": "traits.plan = \"pro\""}),
    );
    let destination = h.create(
        "/v1/destinations",
        json!({"type": "webhook", "url": receiver.url(), "secret": SECRET}),
    );
    h.create(
        "/v1/campaigns",
        json!({"trigger": {"type": "event", "event": "Cart Abandoned", "segment": "pro"},
               "destination": destination["id"], "template": {"nudge": "Come back {{traits.first_name}}"}}),
    );
    h.send_batch(json!([
        {"type": "identify", "userId": "ann", "traits": {"plan": "pro", "first_name": "Ann"}},
        {"type": "identify", "userId": "bo", "traits": {"plan": "free"}}
    ]));
    h.send_batch(json!([
        {"type": "track", "userId": "ann", "event": "Cart Abandoned"},
        {"type": "track", "userId": "bo", "event": "Cart Abandoned"},
        {"type": "track", "userId": "ann", "event": "Page Viewed"}
    ]));
    // The same chunk can move a profile in and fire: memberships as the chunk left them.
    h.send_batch(json!([
        {"type": "identify", "userId": "cy", "traits": {"plan": "pro", "first_name": "Cy"}},
        {"type": "track", "userId": "cy", "event": "Cart Abandoned"}
    ]));
    let delivered = eventually("two deliveries", || {
        let found = h.deliveries("state=delivered");
        (found.len() == 2).then_some(found)
    });
    let received = receiver.received();
    assert_eq!(received.len(), 2, "bo is not in the segment");
    let nudges: Vec<&Value> = received
        .iter()
        .map(|r| &r.body["message"]["nudge"])
        .collect();
    assert_eq!(nudges, [&json!("Come back Ann"), &json!("Come back Cy")]);
    assert!(received.iter().all(|r| r.body["type"] == "event"
        && r.body["event"] == "Cart Abandoned"
        && r.body["segment"] == "pro"));
    assert!(delivered.iter().all(|d| d["trigger"]["event_seq"].is_u64()));
}

#[test]
fn consent_withdrawn_while_a_delivery_waits_stops_it() {
    let h = Harness::with_identity();
    let receiver = Receiver::start();
    receiver.plan(&[503; 10_000]);
    campaign(&h, &receiver, json!({"consent_purpose": "marketing"}));
    h.send_batch(json!([{"type": "identify", "userId": "ann",
                         "traits": {"plan": "pro", "consent": {"marketing": true}}}]));
    eventually("a first attempt", || {
        let pending = h.deliveries("state=pending");
        (pending.len() == 1 && pending[0]["attempts"].as_u64() >= Some(1)).then_some(())
    });
    h.send_batch(json!([{"type": "identify", "userId": "ann",
                         "traits": {"consent": {"marketing": false}}}]));
    receiver.plan(&[]);
    let skipped = eventually("the delivery stopped", || {
        let found = h.deliveries("state=skipped");
        (found.len() == 1).then_some(found)
    });
    assert_eq!(skipped[0]["last_error"], "consent withdrawn before sending");
    assert!(
        receiver.received().iter().all(|r| r.answered == 503),
        "nothing was taken after consent was withdrawn"
    );
}

#[test]
fn secrets_stored_in_clear_by_an_earlier_version_are_sealed_at_start() {
    use kith_collector::store::{Space, Store, Writes, space_key};
    let mut h = Harness::with_identity();
    h.collector.shutdown().expect("stops");
    let clear = json!({"id": "dst_old", "name": "old", "type": "webhook",
                       "url": "http://127.0.0.1:9/hook", "secret": "old-clear-secret",
                       "max_attempts": 8, "retry_base_ms": 1000,
                       "created_at": "2026-01-01T00:00:00Z"});
    let key = space_key(b'd', &[b"dst_old"]);
    {
        let store = Store::open(h.dir.path(), 1 << 20).expect("store");
        let mut writes = Writes::new();
        writes.insert(key.clone(), Some(clear.to_string().into_bytes()));
        store.apply(Space::Activation, writes).expect("written");
        store.flush().expect("flushed");
    }
    h.restart(|config| config.identity = true);
    let shown: Value = h
        .admin_get("/v1/destinations/dst_old")
        .json()
        .expect("json");
    assert_eq!(shown["secret"], "(set)");
    h.collector.shutdown().expect("stops");
    let store = Store::open(h.dir.path(), 1 << 20).expect("store");
    let stored = store
        .get(Space::Activation, &key)
        .expect("read")
        .expect("kept");
    let text = String::from_utf8(stored).expect("utf-8");
    assert!(!text.contains("old-clear-secret"), "{text}");
    assert!(text.contains("kith:sealed:v1:"), "{text}");
}

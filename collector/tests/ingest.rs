//! The ingest API over real HTTP: every endpoint, auth path, limit and validation rule,
//! mixed valid and invalid batches, gzip and `text/plain`, deduplication, enrichment,
//! CORS and rate limiting.

mod common;

use std::time::Duration;

use common::{Harness, WRITE_KEY, error_code, gzip};
use kith_sdk_core::protocol::{MAX_BATCH_BYTES, MAX_BATCH_EVENTS, MAX_EVENT_BYTES};
use serde_json::{Value, json};

fn track(user: &str, message_id: &str) -> Value {
    json!({"type": "track", "event": "Order Completed", "userId": user, "messageId": message_id,
           "properties": {"total": 12.5}})
}

#[test]
fn a_batch_is_stored_and_found_by_every_filter() {
    let h = Harness::start();
    let response = h.post_json(
        "/v1/batch",
        &json!({
            "batch": [
                track("u1", "m1"),
                {"type": "identify", "anonymousId": "a1", "messageId": "m2",
                 "traits": {"email": "ann@example.com"}, "context": {"locale": "fr-FR"}},
                {"type": "page", "anonymousId": "a1", "userId": "u1", "name": "Home", "messageId": "m3"}
            ],
            "context": {"library": {"name": "test-lib", "version": "1"}, "locale": "en-US"},
            "integrations": {"All": true}
        }),
    );
    assert_eq!(response.status(), 200);
    let reply: Value = response.json().expect("json");
    assert_eq!(reply, json!({"success": true, "accepted": 3}));

    let all = h.events("");
    let ids: Vec<_> = all
        .iter()
        .map(|e| e["message"]["messageId"].clone())
        .collect();
    assert_eq!(ids, [json!("m3"), json!("m2"), json!("m1")], "newest first");
    let identify = &all[1]["message"];
    assert_eq!(
        identify["context"]["library"]["name"], "test-lib",
        "batch context merged"
    );
    assert_eq!(
        identify["context"]["locale"], "fr-FR",
        "the event's own context wins"
    );
    assert_eq!(identify["integrations"], json!({"All": true}));
    assert_eq!(identify["traits"]["email"], "ann@example.com");
    assert_eq!(
        all[0]["source"],
        json!(kith_collector::server::source_id(WRITE_KEY))
    );

    let by = |q: &str| -> Vec<Value> {
        h.events(q)
            .iter()
            .map(|e| e["message"]["messageId"].clone())
            .collect()
    };
    assert_eq!(by("user_id=u1"), [json!("m3"), json!("m1")]);
    assert_eq!(by("anonymous_id=a1"), [json!("m3"), json!("m2")]);
    assert_eq!(by("message_id=m2"), [json!("m2")]);
    assert_eq!(by("user_id=nobody"), [] as [Value; 0]);
    assert_eq!(by("limit=1"), [json!("m3")]);
    let first_page: Value = h.admin_get("/v1/events?limit=2").json().expect("json");
    let before = first_page["next_before"].as_u64().expect("a next page");
    assert_eq!(by(&format!("before={before}")), [json!("m1")]);
}

#[test]
fn every_single_event_endpoint_takes_its_type() {
    let h = Harness::start();
    let bodies = [
        ("track", json!({"event": "Clicked", "userId": "u"})),
        (
            "identify",
            json!({"userId": "u", "traits": {"plan": "pro"}}),
        ),
        ("page", json!({"anonymousId": "a", "name": "Pricing"})),
        ("screen", json!({"anonymousId": "a", "name": "Home"})),
        ("group", json!({"userId": "u", "groupId": "g1"})),
        ("alias", json!({"userId": "u", "previousId": "a"})),
    ];
    for (kind, body) in &bodies {
        let response = h.post_json(&format!("/v1/{kind}"), body);
        assert_eq!(response.status(), 200, "{kind}");
    }
    let stored = h.events("");
    let mut kinds: Vec<_> = stored
        .iter()
        .map(|e| e["message"]["type"].clone())
        .collect();
    kinds.reverse();
    assert_eq!(
        kinds,
        bodies.iter().map(|(k, _)| json!(k)).collect::<Vec<_>>()
    );

    let mismatch = h.post_json(
        "/v1/track",
        &json!({"type": "page", "userId": "u", "event": "E"}),
    );
    assert_eq!(error_code(mismatch), (400, "type_mismatch".to_owned()));
    let invalid = h.post_json("/v1/group", &json!({"userId": "u"}));
    assert_eq!(error_code(invalid), (400, "missing_group_id".to_owned()));
    let not_object = h.post_json("/v1/track", &json!([1, 2]));
    assert_eq!(error_code(not_object), (400, "invalid_json".to_owned()));
}

#[test]
fn auth_by_basic_header_or_body_write_key() {
    let h = Harness::start();
    let event = track("u", "m");
    let no_key = h
        .http
        .post(h.url("/v1/batch"))
        .body(json!({"batch": [event]}).to_string())
        .send()
        .expect("sent");
    assert_eq!(error_code(no_key), (401, "unauthorized".to_owned()));

    let wrong_basic = h
        .http
        .post(h.url("/v1/batch"))
        .basic_auth("wrong", Some(""))
        .body(json!({"batch": [event]}).to_string())
        .send()
        .expect("sent");
    assert_eq!(error_code(wrong_basic), (401, "unauthorized".to_owned()));

    let not_basic = h
        .http
        .post(h.url("/v1/batch"))
        .bearer_auth(WRITE_KEY)
        .body(json!({"batch": [event]}).to_string())
        .send()
        .expect("sent");
    assert_eq!(error_code(not_basic), (401, "unauthorized".to_owned()));

    let wrong_body_key = h
        .http
        .post(h.url("/v1/batch"))
        .body(json!({"batch": [event], "writeKey": "wrong"}).to_string())
        .send()
        .expect("sent");
    assert_eq!(error_code(wrong_body_key), (401, "unauthorized".to_owned()));

    let body_key = h
        .http
        .post(h.url("/v1/batch"))
        .body(json!({"batch": [event], "writeKey": WRITE_KEY}).to_string())
        .send()
        .expect("sent");
    assert_eq!(body_key.status(), 200);

    let single_body_key = h
        .http
        .post(h.url("/v1/track"))
        .body(json!({"event": "E", "userId": "u2", "writeKey": WRITE_KEY}).to_string())
        .send()
        .expect("sent");
    assert_eq!(single_body_key.status(), 200);
    let stored = h.events("user_id=u2");
    assert!(
        stored[0]["message"].get("writeKey").is_none(),
        "the key is not stored"
    );

    assert_eq!(h.stats()["requests_rejected"]["unauthorized"], 4);
}

#[test]
fn text_plain_and_gzip_bodies() {
    let h = Harness::start();
    let beacon = h
        .http
        .post(h.url("/v1/batch"))
        .header("content-type", "text/plain;charset=UTF-8")
        .body(json!({"batch": [track("u", "beacon")], "writeKey": WRITE_KEY}).to_string())
        .send()
        .expect("sent");
    assert_eq!(beacon.status(), 200);

    let zipped = h
        .post("/v1/batch")
        .header("content-encoding", "gzip")
        .body(gzip(
            json!({"batch": [track("u", "zipped")]})
                .to_string()
                .as_bytes(),
        ))
        .send()
        .expect("sent");
    assert_eq!(zipped.status(), 200);
    assert_eq!(h.events("message_id=beacon").len(), 1);
    assert_eq!(h.events("message_id=zipped").len(), 1);

    let corrupt = h
        .post("/v1/batch")
        .header("content-encoding", "gzip")
        .body(b"not gzip at all".to_vec())
        .send()
        .expect("sent");
    assert_eq!(error_code(corrupt), (400, "invalid_gzip".to_owned()));

    let brotli = h
        .post("/v1/batch")
        .header("content-encoding", "br")
        .body("{}")
        .send()
        .expect("sent");
    assert_eq!(error_code(brotli), (400, "unsupported_encoding".to_owned()));

    // 2 MB of zeros compresses to a few KB but is over the limit once inflated.
    let bomb = gzip(&vec![b' '; 2 * MAX_BATCH_BYTES]);
    assert!(bomb.len() < MAX_BATCH_BYTES);
    let bomb = h
        .post("/v1/batch")
        .header("content-encoding", "gzip")
        .body(bomb)
        .send()
        .expect("sent");
    assert_eq!(error_code(bomb), (413, "body_too_large".to_owned()));
}

#[test]
fn a_mixed_batch_rejects_bad_events_one_by_one() {
    let h = Harness::start();
    let huge = "x".repeat(MAX_EVENT_BYTES);
    let batch = json!({"batch": [
        track("u", "good-1"),
        {"type": "track", "userId": "u"},
        {"type": "track", "event": "E"},
        {"type": "alias", "userId": "u"},
        {"type": "group", "userId": "u"},
        {"type": "identify", "userId": "u", "messageId": "m".repeat(101)},
        {"type": "track", "event": "E", "userId": "u", "timestamp": "last tuesday"},
        {"type": "track", "event": 42, "userId": "u"},
        {"type": "click", "userId": "u"},
        {"type": "track", "event": "E", "userId": "u", "properties": {"blob": huge}},
        "not an object",
        {"type": "identify", "userId": "u", "messageId": "good-2", "unknownKey": {"kept": true}}
    ]});
    let response = h.post_json("/v1/batch", &batch);
    assert_eq!(response.status(), 200);
    let reply: Value = response.json().expect("json");
    assert_eq!(reply["accepted"], 2);
    let rejected: Vec<(u64, String)> = reply["rejected"]
        .as_array()
        .expect("rejections")
        .iter()
        .map(|r| {
            assert!(r["message"].as_str().is_some_and(|m| !m.is_empty()), "{r}");
            (
                r["index"].as_u64().expect("index"),
                r["code"].as_str().expect("code").to_owned(),
            )
        })
        .collect();
    let expected = [
        (1, "missing_event"),
        (2, "missing_identity"),
        (3, "missing_previous_id"),
        (4, "missing_group_id"),
        (5, "message_id_too_long"),
        (6, "invalid_event"),
        (7, "invalid_event"),
        (8, "invalid_event"),
        (9, "event_too_large"),
        (10, "invalid_event"),
    ];
    assert_eq!(rejected, expected.map(|(i, c)| (i, c.to_owned())).to_vec());
    let stored = h.events("user_id=u");
    assert_eq!(stored.len(), 2);
    assert_eq!(stored[0]["message"]["unknownKey"], json!({"kept": true}));
    let stats = h.stats();
    assert_eq!(stats["received"], 12);
    assert_eq!(stats["accepted"], 2);
    assert_eq!(stats["rejected"]["invalid_event"], 4);
    assert_eq!(stats["stored"], 2);
}

#[test]
fn limits_answer_413_or_400() {
    let h = Harness::start();
    let too_many: Vec<Value> = (0..=MAX_BATCH_EVENTS)
        .map(|i| json!({"type": "page", "anonymousId": i.to_string()}))
        .collect();
    let response = h.post_json("/v1/batch", &json!({"batch": too_many}));
    assert_eq!(error_code(response), (413, "too_many_events".to_owned()));

    let big: Vec<Value> = (0..40)
        .map(|i| {
            json!({"type": "track", "event": "E", "userId": i.to_string(),
                        "properties": {"pad": "p".repeat(16 * 1024)}})
        })
        .collect();
    let response = h.post_json("/v1/batch", &json!({"batch": big}));
    assert_eq!(error_code(response), (413, "body_too_large".to_owned()));

    let chunked = h
        .post("/v1/batch")
        .body(reqwest::blocking::Body::new(std::io::Cursor::new(vec![
            b' ';
            MAX_BATCH_BYTES + 10
        ])))
        .send()
        .expect("sent");
    assert_eq!(error_code(chunked), (413, "body_too_large".to_owned()));

    let single = h.post_json(
        "/v1/track",
        &json!({"event": "E", "userId": "u", "properties": {"pad": "p".repeat(MAX_EVENT_BYTES)}}),
    );
    assert_eq!(error_code(single), (413, "event_too_large".to_owned()));

    for bad in ["{not json", "", "{\"batch\": 5}", "[]", "{\"batch\": [1"] {
        let response = h.post("/v1/batch").body(bad).send().expect("sent");
        assert_eq!(
            error_code(response),
            (400, "invalid_json".to_owned()),
            "{bad:?}"
        );
    }
    assert_eq!(h.stats()["accepted"], 0);
}

#[test]
fn duplicates_are_answered_200_and_stored_once() {
    let h = Harness::start();
    for _ in 0..3 {
        assert_eq!(
            h.post_json("/v1/batch", &json!({"batch": [track("u", "same")]}))
                .status(),
            200
        );
    }
    assert_eq!(h.post_json("/v1/track", &track("u", "same")).status(), 200);
    assert_eq!(h.events("message_id=same").len(), 1);
    let stats = h.wait_processed();
    assert_eq!(stats["accepted"], 4);
    assert_eq!(stats["deduplicated"], 3);
    assert_eq!(stats["stored"], 1);
}

#[test]
fn the_dedup_window_is_configurable() {
    let h = Harness::start_with(|c| c.dedup_window = Duration::ZERO);
    for _ in 0..2 {
        assert_eq!(h.post_json("/v1/track", &track("u", "same")).status(), 200);
    }
    assert_eq!(
        h.events("message_id=same").len(),
        2,
        "outside a zero window"
    );
}

#[test]
fn enrichment_sets_ids_times_and_ip() {
    let h = Harness::start();
    let response = h.post_json(
        "/v1/batch",
        &json!({
            "batch": [{"type": "track", "event": "E", "userId": "skew",
                       "timestamp": "2020-01-01T00:00:00Z"}],
            "sentAt": "2020-01-01T00:00:10Z"
        }),
    );
    assert_eq!(response.status(), 200);
    let event = &h.events("user_id=skew")[0]["message"];
    let received: jiff::Timestamp = event["receivedAt"]
        .as_str()
        .expect("receivedAt")
        .parse()
        .expect("ts");
    let corrected: jiff::Timestamp = event["timestamp"]
        .as_str()
        .expect("timestamp")
        .parse()
        .expect("ts");
    assert_eq!(
        received.duration_since(corrected),
        jiff::SignedDuration::from_secs(10)
    );
    assert_eq!(event["originalTimestamp"], "2020-01-01T00:00:00Z");
    assert_eq!(event["context"]["ip"], "127.0.0.1");
    assert_eq!(event["messageId"].as_str().map(str::len), Some(36));

    let forwarded = h
        .post("/v1/track")
        .header("x-forwarded-for", "198.51.100.7")
        .body(json!({"event": "E", "userId": "xff"}).to_string())
        .send()
        .expect("sent");
    assert_eq!(forwarded.status(), 200);
    assert_eq!(
        h.events("user_id=xff")[0]["message"]["context"]["ip"],
        "127.0.0.1",
        "X-Forwarded-For from an untrusted peer is ignored"
    );
}

#[test]
fn x_forwarded_for_is_honoured_from_trusted_proxies() {
    let h = Harness::start_with(|c| c.trusted_proxies = vec!["127.0.0.0/8".parse().expect("net")]);
    let response = h
        .post("/v1/track")
        .header("x-forwarded-for", "198.51.100.7, 127.0.0.5")
        .body(json!({"event": "E", "userId": "xff"}).to_string())
        .send()
        .expect("sent");
    assert_eq!(response.status(), 200);
    assert_eq!(
        h.events("user_id=xff")[0]["message"]["context"]["ip"],
        "198.51.100.7"
    );
}

#[test]
fn cors_is_open_including_preflight() {
    let h = Harness::start();
    let preflight = h
        .http
        .request(reqwest::Method::OPTIONS, h.url("/v1/batch"))
        .header("origin", "https://shop.example")
        .header("access-control-request-method", "POST")
        .header(
            "access-control-request-headers",
            "content-type,authorization",
        )
        .send()
        .expect("sent");
    assert!(preflight.status().is_success());
    let headers = preflight.headers();
    assert_eq!(headers["access-control-allow-origin"], "*");
    assert!(headers.contains_key("access-control-allow-methods"));
    assert!(headers.contains_key("access-control-allow-headers"));

    let post = h
        .post("/v1/page")
        .header("origin", "https://shop.example")
        .body(json!({"anonymousId": "a"}).to_string())
        .send()
        .expect("sent");
    assert_eq!(post.headers()["access-control-allow-origin"], "*");
}

#[test]
fn a_write_key_over_its_rate_gets_429_with_retry_after() {
    let h = Harness::start_with(|c| c.rate_limit = 10);
    let batch: Vec<Value> = (0..20).map(|i| track("u", &format!("r{i}"))).collect();
    assert_eq!(
        h.post_json("/v1/batch", &json!({"batch": batch})).status(),
        200
    );
    let limited = h.post_json("/v1/track", &track("u", "r-next"));
    let retry_after: u64 = limited.headers()["retry-after"]
        .to_str()
        .expect("ascii")
        .parse()
        .expect("seconds");
    assert!((1..=2).contains(&retry_after), "{retry_after}");
    assert_eq!(error_code(limited), (429, "rate_limited".to_owned()));
}

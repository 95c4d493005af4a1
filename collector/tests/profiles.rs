//! Identity resolution through the collector over real HTTP: events in, unified profiles
//! out; merges and their log, split, delete with suppression, guardrail refusals on the
//! stored event, bad requests, profiles surviving a restart, and the API saying so when
//! identity resolution is off.

mod common;

use common::{Harness, error_code};
use reqwest::Method;
use serde_json::{Value, json};

fn profile(h: &Harness, identifier: &str) -> Value {
    let response = h.admin_get(&format!("/v1/profiles?identifier={identifier}"));
    assert_eq!(response.status(), 200, "{identifier}");
    response.json().expect("json")
}

fn identifiers(profile: &Value) -> Vec<String> {
    let mut ids: Vec<String> = profile["identifiers"]
        .as_array()
        .expect("identifiers")
        .iter()
        .map(|i| i.as_str().expect("text").to_owned())
        .collect();
    ids.sort();
    ids
}

#[test]
fn events_build_profiles_that_merge_split_and_erase() {
    let h = Harness::with_identity();
    h.send_batch(json!([
            {"type": "page", "anonymousId": "a1", "name": "Home", "timestamp": "2024-01-01T10:00:00Z"},
            {"type": "identify", "anonymousId": "a1", "userId": "u1", "timestamp": "2024-01-01T10:01:00Z",
             "traits": {"email": "ann@example.com", "plan": "free"}},
            {"type": "track", "userId": "u1", "event": "Order Completed", "timestamp": "2024-01-02T10:00:00Z"},
            {"type": "page", "anonymousId": "a2", "timestamp": "2024-01-03T10:00:00Z"},
            {"type": "identify", "anonymousId": "a2", "traits": {"plan": "pro"}, "timestamp": "2024-01-03T10:01:00Z"}
        ]),
    );
    let ann = profile(&h, "user_id:u1");
    let ann_id = ann["id"].as_str().expect("id").to_owned();
    assert_eq!(
        identifiers(&ann),
        ["anonymous_id:a1", "email:ann@example.com", "user_id:u1"]
    );
    assert_eq!(
        ann["traits"],
        json!({"email": "ann@example.com", "plan": "free"})
    );
    assert_eq!(ann["event_counts"], json!({"Order Completed": 1}));
    assert_eq!(ann["events"], 3);
    assert_eq!(ann["first_seen"], "2024-01-01T10:00:00Z");
    let second = profile(&h, "anonymous_id:a2");
    let second_id = second["id"].as_str().expect("id").to_owned();
    assert_ne!(second_id, ann_id);
    let stored = h.events("user_id=u1");
    assert_eq!(
        stored[0]["message"]["context"]["kith"]["profile_id"],
        ann_id.as_str()
    );

    // Ann logs in on the second device: the profiles merge, the older id survives.
    h.send_batch(json!([{"type": "identify", "anonymousId": "a2", "userId": "u1", "timestamp": "2024-01-04T10:00:00Z"}]),
    );
    let merged = profile(&h, "anonymous_id:a2");
    assert_eq!(merged["id"], ann_id.as_str());
    assert_eq!(merged["traits"]["plan"], "pro", "the newest value wins");
    assert_eq!(merged["events"], 6);
    let by_old_id: Value = h
        .admin_get(&format!("/v1/profiles/{second_id}"))
        .json()
        .expect("json");
    assert_eq!(by_old_id["id"], ann_id.as_str());
    assert_eq!(by_old_id["merged_id"], second_id.as_str());
    let log: Value = h
        .admin_get(&format!("/v1/profiles/{ann_id}/merges"))
        .json()
        .expect("json");
    let merge = &log["merges"][0];
    assert_eq!(merge["merged"], second_id.as_str());
    assert!(
        merge["reason"].as_str().is_some_and(|r| r.contains("a2")),
        "{merge}"
    );
    let timeline: Value = h
        .admin_get(&format!("/v1/profiles/{ann_id}/events?limit=4"))
        .json()
        .expect("json");
    assert_eq!(timeline["events"].as_array().map(Vec::len), Some(4));
    assert!(timeline["next_before"].is_u64());
    let all: Value = h
        .admin_get(&format!("/v1/events?profile_id={second_id}"))
        .json()
        .expect("json");
    assert_eq!(
        all["events"].as_array().map(Vec::len),
        Some(6),
        "a merged id answers for the survivor"
    );

    // Split it: both profiles come back with their own events.
    let split = h.admin_send(
        Method::POST,
        &format!("/v1/merges/{}/split", merge["id"]),
        &json!({}),
    );
    assert_eq!(split.status(), 200);
    let restored = profile(&h, "anonymous_id:a2");
    assert_eq!(restored["id"], second_id.as_str());
    assert_eq!(restored["traits"]["plan"], "pro");
    assert_eq!(profile(&h, "user_id:u1")["traits"]["plan"], "free");
    let again = h.admin_send(
        Method::POST,
        &format!("/v1/merges/{}/split", merge["id"]),
        &json!({}),
    );
    assert_eq!(error_code(again), (400, "already_split".to_owned()));

    // Erase Ann: her events go, her identifiers are suppressed.
    let erased: Value = h
        .http
        .delete(h.url(&format!("/v1/profiles/{ann_id}")))
        .bearer_auth(common::ADMIN_TOKEN)
        .send()
        .expect("sent")
        .json()
        .expect("json");
    assert_eq!(erased["deleted"], ann_id.as_str());
    assert!(h.events("user_id=u1").is_empty(), "her events are erased");
    let gone = h.admin_get(&format!("/v1/profiles/{ann_id}"));
    assert_eq!(error_code(gone), (404, "not_found".to_owned()));
    h.send_batch(json!([{"type": "track", "userId": "u1", "event": "Came Back"}]));
    let stats = h.stats();
    assert_eq!(stats["dropped"]["suppressed"], 1, "{stats}");
    assert!(h.events("user_id=u1").is_empty());
}

#[test]
fn refused_identifiers_are_recorded_on_the_event() {
    let h = Harness::with_identity();
    h.send_batch(json!([{"type": "identify", "userId": "ann", "anonymousId": "kiosk"}]));
    h.send_batch(json!([{"type": "identify", "userId": "bo", "anonymousId": "kiosk"}]));
    let bo = profile(&h, "user_id:bo");
    assert_eq!(identifiers(&bo), ["user_id:bo"]);
    let stored = h.events("user_id=bo");
    let refused = &stored[0]["message"]["context"]["kith"]["identity_refused"];
    assert_eq!(refused[0]["identifier"], "anonymous_id:kiosk");
    assert!(
        refused[0]["reason"]
            .as_str()
            .is_some_and(|r| r.contains("limit 1")),
        "{refused}"
    );
}

#[test]
fn bad_profile_requests_get_clear_errors() {
    let h = Harness::with_identity();
    let cases = [
        ("/v1/profiles?identifier=nocolon", 400, "invalid_identifier"),
        ("/v1/profiles", 400, "invalid_query"),
        ("/v1/profiles?identifier=user_id:nobody", 404, "not_found"),
        ("/v1/profiles/prf_404", 404, "not_found"),
        ("/v1/profiles/prf_404/events", 404, "not_found"),
        ("/v1/profiles/prf_404/merges", 404, "not_found"),
    ];
    for (path, status, code) in cases {
        assert_eq!(
            error_code(h.admin_get(path)),
            (status, code.to_owned()),
            "{path}"
        );
    }
    let split = h.admin_send(Method::POST, "/v1/merges/77/split", &json!({}));
    assert_eq!(error_code(split), (404, "not_found".to_owned()));
    let no_auth = h
        .http
        .get(h.url("/v1/profiles/prf_1"))
        .send()
        .expect("sent");
    assert_eq!(no_auth.status(), 401);
}

#[test]
fn identity_settings_come_from_the_config_file_and_profiles_survive_a_restart() {
    let data = tempfile::tempdir().expect("tempdir");
    let start = || {
        let mut config = common::config(data.path());
        config.file = Some(kith_collector::config::FileConfig {
            identity: Some(
                serde_json::from_value(json!({"blocked_values": ["shared-tablet"],
                                              "trait_identifiers": {"loyalty": "loyalty_id"}}))
                .expect("identity config"),
            ),
            ..Default::default()
        });
        Harness {
            dir: tempfile::tempdir().expect("tempdir"),
            collector: kith_collector::Running::start(&config).expect("starts"),
            http: reqwest::blocking::Client::new(),
        }
    };
    let h = start();
    h.send_batch(json!([
            {"type": "identify", "userId": "ann", "anonymousId": "shared-tablet", "traits": {"loyalty": "L1"}},
            {"type": "identify", "userId": "bo", "anonymousId": "shared-tablet"},
            {"type": "identify", "anonymousId": "phone-9", "traits": {"loyalty": "L1"}}
        ]),
    );
    let ann = profile(&h, "user_id:ann");
    assert_eq!(
        identifiers(&ann),
        ["anonymous_id:phone-9", "loyalty_id:L1", "user_id:ann"]
    );
    let Harness { collector, .. } = h;
    collector.stop().expect("stops");
    let h = start();
    assert_eq!(profile(&h, "loyalty_id:L1")["id"], ann["id"]);
    assert_eq!(identifiers(&profile(&h, "user_id:bo")), ["user_id:bo"]);
}

#[test]
fn without_identity_resolution_the_profile_api_says_how_to_turn_it_on() {
    let h = Harness::start();
    h.send_batch(json!([{"type": "identify", "userId": "ann"}]));
    let response = h.admin_get("/v1/profiles?identifier=user_id:ann");
    assert_eq!(response.status(), 404);
    let body: Value = response.json().expect("json");
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("--identity")),
        "{body}"
    );
    let stored = h.events("user_id=ann");
    assert_eq!(
        stored[0]["message"]["context"].get("kith"),
        None,
        "no profile id"
    );
}

#[test]
fn probabilistic_matching_merges_the_same_people() {
    let (records, truth) = kith_identity::synthetic::population(150, 3);
    let h = matching_collector(kith_identity::synthetic::person_config());
    let report = load_population(&h, &records);
    assert!(report["merged"].as_u64() > Some(100), "{report}");

    // Pairwise precision and recall of the resulting profiles against the truth.
    let profile_of: Vec<String> = records
        .iter()
        .map(|r| {
            profile(&h, &format!("anonymous_id:{}", r.id))["id"]
                .as_str()
                .expect("id")
                .to_owned()
        })
        .collect();
    let (mut tp, mut fp, mut fnn) = (0u32, 0u32, 0u32);
    for i in 0..records.len() {
        for j in i + 1..records.len() {
            match (truth[i] == truth[j], profile_of[i] == profile_of[j]) {
                (true, true) => tp += 1,
                (false, true) => fp += 1,
                (true, false) => fnn += 1,
                (false, false) => {}
            }
        }
    }
    let (precision, recall) = (
        f64::from(tp) / f64::from(tp + fp),
        f64::from(tp) / f64::from(tp + fnn),
    );
    println!("through the collector: precision {precision:.4}, recall {recall:.4}; {report}");
    assert!(
        precision >= 0.97 && recall >= 0.97,
        "precision {precision}, recall {recall}"
    );

    // The merge log says why.
    let merged_profile = profile_of
        .iter()
        .find(|p| profile_of.iter().filter(|q| q == p).count() > 1)
        .expect("a merged profile");
    let log: Value = h
        .admin_get(&format!("/v1/profiles/{merged_profile}/merges"))
        .json()
        .expect("json");
    assert!(
        log["merges"][0]["reason"]
            .as_str()
            .is_some_and(|r| r.starts_with("probabilistic match")),
        "{log}"
    );
}

fn matching_collector(matching: kith_identity::matching::MatchConfig) -> Harness {
    Harness::start_with(|config| {
        config.file = Some(kith_collector::config::FileConfig {
            identity: Some(kith_identity::rules::Config {
                matching: Some(matching),
                ..Default::default()
            }),
            ..Default::default()
        });
    })
}

/// Sends each record as an identify of its own anonymous id, then runs matching.
fn load_population(h: &Harness, records: &[kith_identity::matching::Record]) -> Value {
    let suggestions: Value = h.admin_get("/v1/suggested-merges").json().expect("json");
    assert_eq!(suggestions["suggestions"], json!([]), "none before a run");
    let events: Vec<Value> = records
        .iter()
        .map(|r| json!({"type": "identify", "anonymousId": r.id, "traits": r.fields}))
        .collect();
    for chunk in events.chunks(100) {
        h.send_batch(json!(chunk));
    }
    let report: Value = h
        .admin_send(Method::POST, "/v1/matching/run", &json!({}))
        .json()
        .expect("json");
    assert_eq!(report["profiles"], records.len(), "{report}");
    report
}

#[test]
fn doubtful_pairs_are_suggested_and_accepted_or_dismissed_once() {
    let (records, _) = kith_identity::synthetic::population(150, 3);
    // A strict match probability, so that many pairs are only suggested.
    let mut matching = kith_identity::synthetic::person_config();
    matching.match_probability = 0.999_999_9;
    matching.review_probability = 1e-6;
    let h = matching_collector(matching);
    let report = load_population(&h, &records);
    let listed: Value = h.admin_get("/v1/suggested-merges").json().expect("json");
    let suggestions = listed["suggestions"].as_array().expect("list").clone();
    assert!(suggestions.len() >= 2, "{report}");
    assert_eq!(
        suggestions.len() as u64,
        report["suggested"].as_u64().unwrap_or(0)
    );
    assert!(
        suggestions
            .iter()
            .all(|s| s["probability"].as_f64() < Some(0.999_999_9))
    );
    let pair = |s: &Value| json!({"a": s["a"], "b": s["b"]});
    let dismissed = h.admin_send(
        Method::POST,
        "/v1/suggested-merges/dismiss",
        &pair(&suggestions[0]),
    );
    assert_eq!(dismissed.status(), 200);
    let again = h.admin_send(
        Method::POST,
        "/v1/suggested-merges/accept",
        &pair(&suggestions[0]),
    );
    assert_eq!(error_code(again), (404, "not_found".to_owned()));
    let accepted = h.admin_send(
        Method::POST,
        "/v1/suggested-merges/accept",
        &pair(&suggestions[1]),
    );
    let status = accepted.status().as_u16();
    let body: Value = accepted.json().expect("json");
    match status {
        200 => assert!(
            body["merged"]["reason"]
                .as_str()
                .is_some_and(|r| r.starts_with("suggested merge accepted")),
            "{body}"
        ),
        400 => assert_eq!(
            body["error"]["code"], "merge_refused",
            "a guardrail may refuse: {body}"
        ),
        other => panic!("accepting answered {other}: {body}"),
    }
    let bad = h.admin_send(
        Method::POST,
        "/v1/suggested-merges/accept",
        &json!({"a": 1}),
    );
    assert_eq!(error_code(bad), (400, "invalid_body".to_owned()));
}

#[test]
fn matching_without_settings_says_so() {
    let h = Harness::with_identity();
    let response = h.admin_send(Method::POST, "/v1/matching/run", &json!({}));
    assert_eq!(
        error_code(response),
        (400, "matching_not_configured".to_owned())
    );
}

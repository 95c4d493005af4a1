//! Processing over real HTTP: rules set through the admin API and the config file,
//! cleaning and transformations on stored events, tracking-plan outcomes, the
//! failed-events store and replay after the rules are fixed.

mod common;

use common::{Harness, error_code};
use kith_collector::server::source_id;
use reqwest::Method;
use serde_json::{Value, json};

fn rules_path() -> String {
    format!("/v1/sources/{}/rules", source_id(common::WRITE_KEY))
}

fn put_rules(h: &Harness, rules: &Value) -> reqwest::blocking::Response {
    h.admin_send(Method::PUT, &rules_path(), rules)
}

fn failed(h: &Harness) -> Vec<Value> {
    h.wait_processed();
    let body: Value = h.admin_get("/v1/failed").json().expect("failed json");
    body["failed"].as_array().expect("failed array").clone()
}

#[test]
fn rules_clean_transform_and_check_stored_events() {
    let h = Harness::start();
    let rules = json!({
        "cleaning": {"default_region": "US"},
        "transformations": [
            {"op": "rename", "from": "properties.price", "to": "properties.revenue"},
            {"op": "hash", "path": "context.traits.email"},
            {"op": "drop", "path": "context.ip"},
            {"op": "drop_event", "when": {"path": "properties.env", "equals": "test"}}
        ],
        "tracking_plan": {
            "events": {"Order Completed": {"type": "object", "required": ["revenue"],
                                           "properties": {"revenue": {"type": "number"}}}},
            "on_violation": "record"
        }
    });
    let answer: Value = put_rules(&h, &rules).json().expect("json");
    assert_eq!(answer["own_rules"], true);
    let got: Value = h.admin_get(&rules_path()).json().expect("json");
    assert_eq!(got["rules"]["transformations"], rules["transformations"]);

    h.send_batch(json!([
            {"type": "identify", "userId": " u1 ", "traits": {"email": "Ann@Example.COM", "phone": "(415) 555-2671",
                                                          "nickname": "N/A", "since": "2024-01-01T12:00:00+01:00"}},
            {"type": "track", "userId": "u1", "event": "Order Completed", "properties": {"price": 12.5},
             "context": {"traits": {"email": "ann@example.com"}}},
            {"type": "track", "userId": "u1", "event": "Order Completed", "properties": {"price": "12"}},
            {"type": "track", "userId": "u1", "event": "Order Completed", "properties": {"env": "test", "price": 1}}
        ]),
    );
    let stats = h.wait_processed();
    assert_eq!(stats["dropped"]["transformation"], 1, "{stats}");
    let events = h.events("user_id=u1");
    assert_eq!(events.len(), 3, "the test event was dropped: {events:?}");
    let identify = &events[2]["message"];
    assert_eq!(identify["traits"]["email"], "ann@example.com");
    assert_eq!(identify["traits"]["phone"], "+14155552671");
    assert_eq!(identify["traits"]["since"], "2024-01-01T11:00:00Z");
    assert_eq!(identify["traits"].get("nickname"), None);
    let rules_applied: Vec<&str> = identify["context"]["kith"]["cleaned"]
        .as_array()
        .expect("cleaning recorded")
        .iter()
        .map(|c| c["rule"].as_str().expect("rule"))
        .collect();
    for rule in ["trim", "junk", "timestamp", "email", "phone"] {
        assert!(rules_applied.contains(&rule), "{rule} in {rules_applied:?}");
    }
    assert_eq!(
        identify["context"].get("ip"),
        None,
        "dropped by the transformation"
    );

    let good = &events[1]["message"];
    assert_eq!(good["properties"], json!({"revenue": 12.5}));
    assert_eq!(
        good["context"]["traits"]["email"],
        "71d4f55f72fa128dfb468a1a3901507c804b74316488744d769d7f4b16696476"
    );
    assert_eq!(good["context"]["kith"].get("violations"), None);
    let recorded = &events[0]["message"]["context"]["kith"]["violations"];
    assert_eq!(recorded[0]["path"], "/properties/revenue", "{recorded}");
}

#[test]
fn failed_events_are_listed_and_replayed_once_the_rules_are_fixed() {
    let h = Harness::start();
    let strict = json!({"tracking_plan": {
        "events": {"Signed Up": {"properties": {"plan": {"enum": ["free", "pro"]}}}},
        "allow_unplanned": false, "on_violation": "block"}});
    assert_eq!(put_rules(&h, &strict).status(), 200);
    h.send_batch(json!([
        {"type": "track", "userId": "u2", "event": "Signed Up", "properties": {"plan": "pro"}},
        {"type": "track", "userId": "u2", "event": "Signed Up", "properties": {"plan": "team"}},
        {"type": "track", "userId": "u2", "event": "Unplanned"},
        {"type": "identify", "userId": "u2", "traits": {"email": "not-an-email"}}
    ]));
    let failed_events = failed(&h);
    assert_eq!(failed_events.len(), 3, "{failed_events:?}");
    let stats = h.stats();
    assert_eq!(
        stats["failed"],
        json!({"tracking_plan": 2, "cleaning": 1}),
        "{stats}"
    );
    assert_eq!(stats["stored"], 1);
    let reasons: Vec<&str> = failed_events
        .iter()
        .map(|f| f["reason"].as_str().expect("reason"))
        .collect();
    assert!(reasons[0].contains("not-an-email"), "{reasons:?}");
    assert!(reasons[1].contains("Unplanned"), "{reasons:?}");
    assert!(reasons[2].contains("/properties/plan"), "{reasons:?}");
    // Kept as it came in, to be replayed.
    assert_eq!(failed_events[1]["message"]["event"], "Unplanned");
    let by_source: Value = h
        .admin_get(&format!(
            "/v1/failed?source={}&limit=1",
            source_id(common::WRITE_KEY)
        ))
        .json()
        .expect("json");
    assert_eq!(by_source["failed"].as_array().map(Vec::len), Some(1));
    assert!(by_source["next_before"].is_u64());

    // Fix the rules: plan "team" and allow unplanned events; replay the plan failures.
    let fixed = json!({"tracking_plan": {
        "events": {"Signed Up": {"properties": {"plan": {"enum": ["free", "pro", "team"]}}}},
        "on_violation": "block"}});
    assert_eq!(put_rules(&h, &fixed).status(), 200);
    let plan_failures: Vec<&Value> = failed_events
        .iter()
        .filter(|f| f["code"] == "tracking_plan")
        .map(|f| &f["seq"])
        .collect();
    let replayed: Value = h
        .admin_send(
            Method::POST,
            "/v1/failed/replay",
            &json!({"seqs": plan_failures}),
        )
        .json()
        .expect("json");
    assert_eq!(replayed["replayed"], 2);
    let left = failed(&h);
    assert_eq!(left.len(), 1, "only the bad email is left: {left:?}");
    let stored = h.events("user_id=u2");
    assert_eq!(stored.len(), 3);
    let names: Vec<&str> = stored
        .iter()
        .filter_map(|e| e["message"]["event"].as_str())
        .collect();
    assert!(names.contains(&"Unplanned"));

    // Replaying again changes nothing; replaying the rest with the rule unchanged fails it again.
    let again: Value = h
        .admin_send(
            Method::POST,
            "/v1/failed/replay",
            &json!({"seqs": plan_failures}),
        )
        .json()
        .expect("json");
    assert_eq!(again["replayed"], 0);
    let all: Value = h
        .admin_send(Method::POST, "/v1/failed/replay", &json!({}))
        .json()
        .expect("json");
    assert_eq!(all["replayed"], 1);
    let left = failed(&h);
    assert_eq!(left.len(), 1, "still invalid, failed again");
    assert_eq!(h.stats()["deduplicated"], 0);

    // One failed event is deleted on its own.
    let seq = left[0]["seq"].as_u64().expect("seq");
    let path = format!("/v1/failed/{seq}");
    assert_eq!(
        h.admin_send(Method::DELETE, &path, &json!({})).status(),
        200
    );
    assert!(failed(&h).is_empty());
    assert_eq!(
        error_code(h.admin_send(Method::DELETE, &path, &json!({}))),
        (404, "not_found".to_owned())
    );
    assert_eq!(
        error_code(h.admin_send(Method::DELETE, "/v1/failed/x", &json!({}))),
        (400, "invalid_seq".to_owned())
    );
}

#[test]
fn bad_rules_and_requests_get_clear_errors_and_change_nothing() {
    let h = Harness::start();
    let cases = [
        (json!({"transformations": [{"op": "explode"}]}), "explode"),
        (
            json!({"transformations": [{"op": "drop", "path": "messageId"}]}),
            "messageId",
        ),
        (
            json!({"cleaning": {"default_region": "Atlantis"}}),
            "Atlantis",
        ),
        (
            json!({"tracking_plan": {"events": {"E": {"type": 12}}}}),
            "\"E\"",
        ),
        (json!({"colour": "blue"}), "colour"),
        (json!([1, 2]), "struct"),
    ];
    for (rules, says) in cases {
        let response = put_rules(&h, &rules);
        assert_eq!(response.status(), 400, "{rules}");
        let body: Value = response.json().expect("json");
        assert_eq!(body["error"]["code"], "invalid_rules");
        let message = body["error"]["message"].as_str().expect("message");
        assert!(message.contains(says), "{rules}: {message}");
    }
    let got: Value = h.admin_get(&rules_path()).json().expect("json");
    assert_eq!(got["own_rules"], false, "nothing was stored: {got}");

    let unknown = h.admin_send(Method::PUT, "/v1/sources/src_nope/rules", &json!({}));
    assert_eq!(error_code(unknown), (404, "not_found".to_owned()));
    for bad in [json!({"seqs": "all"}), json!({"everything": true})] {
        let response = h.admin_send(Method::POST, "/v1/failed/replay", &bad);
        assert_eq!(
            error_code(response),
            (400, "invalid_replay".to_owned()),
            "{bad}"
        );
    }
    let too_many: Vec<u64> = (0..1001).collect();
    let response = h.admin_send(
        Method::POST,
        "/v1/failed/replay",
        &json!({"seqs": too_many}),
    );
    assert_eq!(error_code(response), (413, "too_many_events".to_owned()));
    let response = h.admin_get("/v1/failed?limit=0");
    assert_eq!(error_code(response), (400, "invalid_limit".to_owned()));
    let no_auth = h.http.get(h.url("/v1/sources")).send().expect("sent");
    assert_eq!(no_auth.status(), 401);
}

#[test]
fn rules_come_from_the_config_file_and_survive_a_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("kith.json");
    std::fs::write(
        &file,
        json!({
            "sources": [{"write_key": "wk_file", "rules": {"transformations": [
                {"op": "set", "path": "properties.from_file", "value": true}]}}],
            "default_rules": {"cleaning": {"trim": false}}
        })
        .to_string(),
    )
    .expect("write config");
    let data = tempfile::tempdir().expect("tempdir");
    let start = || {
        let mut config = common::config(data.path());
        config.file = Some(
            kith_collector::config::FileConfig::load(file.to_str().expect("path")).expect("config"),
        );
        kith_collector::Running::start(&config).expect("starts")
    };
    let h = Harness {
        dir: tempfile::tempdir().expect("tempdir"),
        collector: start(),
        http: reqwest::blocking::Client::new(),
    };
    let from_file = h
        .http
        .post(h.url("/v1/track"))
        .basic_auth("wk_file", Some(""))
        .json(&json!({"userId": "u3", "event": "E"}))
        .send()
        .expect("sent");
    assert_eq!(from_file.status(), 200, "the file's write key is accepted");
    h.send_batch(json!([{"type": "track", "userId": " u3 ", "event": "E"}]));
    let stored = h.events("");
    assert_eq!(stored.len(), 2);
    assert_eq!(stored[1]["message"]["properties"]["from_file"], true);
    assert_eq!(
        stored[0]["message"]["userId"], " u3 ",
        "default rules: no trimming"
    );

    // Rules set through the API persist.
    let api_rules =
        json!({"transformations": [{"op": "set", "path": "properties.api", "value": 1}]});
    assert_eq!(put_rules(&h, &api_rules).status(), 200);
    let Harness { collector, .. } = h;
    collector.stop().expect("stops");
    let h = Harness {
        dir: tempfile::tempdir().expect("tempdir"),
        collector: start(),
        http: reqwest::blocking::Client::new(),
    };
    let got: Value = h.admin_get(&rules_path()).json().expect("json");
    assert_eq!(
        got["rules"]["transformations"],
        api_rules["transformations"]
    );
    let sources: Value = h.admin_get("/v1/sources").json().expect("json");
    assert_eq!(sources["sources"].as_array().map(Vec::len), Some(2));
    assert_eq!(sources["default_rules"]["cleaning"]["trim"], false);
}

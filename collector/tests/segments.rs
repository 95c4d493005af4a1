//! Segments over HTTP: definitions created, changed and deleted; members computed from
//! traits, identifiers, events in windows and other segments; preview; paging; bad
//! definitions with line and column, unknown references, cycles.

mod common;

use common::{Harness, error_code, eventually};
use reqwest::Method;
use serde_json::{Value, json};

fn profile_id(h: &Harness, user: &str) -> String {
    let profile: Value = h
        .admin_get(&format!("/v1/profiles?identifier=user_id:{user}"))
        .json()
        .expect("json");
    profile["id"].as_str().expect("id").to_owned()
}

/// Waits until a segment is computed for every profile.
fn ready(h: &Harness, key: &str) {
    eventually(&format!("segment {key} computed"), || {
        let shown: Value = h.admin_get(&format!("/v1/segments/{key}")).json().ok()?;
        (shown["progress"]["state"] == "ready").then_some(())
    });
}

fn members(h: &Harness, key: &str) -> Vec<String> {
    ready(h, key);
    let body: Value = h
        .admin_get(&format!("/v1/segments/{key}/members"))
        .json()
        .expect("json");
    body["members"]
        .as_array()
        .unwrap_or_else(|| panic!("members of {key}: {body}"))
        .iter()
        .map(|m| m.as_str().expect("id").to_owned())
        .collect()
}

fn sorted(mut ids: Vec<String>) -> Vec<String> {
    ids.sort();
    ids
}

#[test]
fn segments_select_profiles_by_traits_events_and_other_segments() {
    let h = Harness::with_identity();
    h.send_batch(json!([
            {"type": "identify", "userId": "ann", "traits": {"plan": "pro", "email": "ann@example.com"}},
            {"type": "track", "userId": "ann", "event": "Order Completed", "properties": {"total": 30}},
            {"type": "track", "userId": "ann", "event": "Order Completed", "properties": {"total": 90}},
            {"type": "identify", "userId": "bo", "traits": {"plan": "free", "email": "bo@example.com"}},
            {"type": "track", "userId": "bo", "event": "Order Completed", "properties": {"total": 500}},
            {"type": "identify", "userId": "cy", "traits": {"plan": "pro"}}
        ]),
    );
    let (ann, bo, cy) = (
        profile_id(&h, "ann"),
        profile_id(&h, "bo"),
        profile_id(&h, "cy"),
    );

    let created = h.admin_send(
        Method::POST,
        "/v1/segments",
        &json!({"key": "pro_buyers", "name": "Pro buyers",
                "definition": "traits.plan = \"pro\" and count(event \"Order Completed\" within 30d) >= 2"}),
    );
    assert_eq!(created.status(), 201);
    assert_eq!(members(&h, "pro_buyers"), std::slice::from_ref(&ann));

    let big = json!({"key": "big_spenders",
                     "definition": "sum(event \"Order Completed\", properties.total) > 100 and has email"});
    assert_eq!(
        h.admin_send(Method::POST, "/v1/segments", &big).status(),
        201
    );
    assert_eq!(
        sorted(members(&h, "big_spenders")),
        sorted(vec![ann.clone(), bo.clone()])
    );

    let vip = json!({"key": "vip", "definition": "in_segment(\"pro_buyers\") or in_segment(\"big_spenders\")"});
    assert_eq!(
        h.admin_send(Method::POST, "/v1/segments", &vip).status(),
        201
    );
    assert_eq!(
        sorted(members(&h, "vip")),
        sorted(vec![ann.clone(), bo.clone()])
    );
    let not_vip = h.admin_send(
        Method::POST,
        "/v1/segments/preview",
        &json!({"definition": "not in_segment(\"vip\")"}),
    );
    let not_vip: Value = not_vip.json().expect("json");
    assert_eq!(not_vip["count"], 1);
    assert_eq!(not_vip["sample"], json!([cy.clone()]));

    // Change a definition: members follow.
    let changed = h.admin_send(
        Method::PUT,
        "/v1/segments/pro_buyers",
        &json!({"definition": "traits.plan = \"pro\""}),
    );
    assert_eq!(changed.status(), 200);
    assert_eq!(
        sorted(members(&h, "pro_buyers")),
        sorted(vec![ann.clone(), cy.clone()])
    );
    let shown: Value = h.admin_get("/v1/segments/pro_buyers").json().expect("json");
    assert_eq!(shown["name"], "Pro buyers", "the name is kept");

    // Paging.
    let page: Value = h
        .admin_get("/v1/segments/vip/members?limit=1")
        .json()
        .expect("json");
    assert_eq!(page["total"], 3);
    let after = page["next_after"].as_str().expect("next page");
    let next: Value = h
        .admin_get(&format!("/v1/segments/vip/members?limit=5&after={after}"))
        .json()
        .expect("json");
    assert_eq!(next["members"].as_array().map(Vec::len), Some(2));

    let listed: Value = h.admin_get("/v1/segments").json().expect("json");
    assert_eq!(listed["segments"].as_array().map(Vec::len), Some(3));

    // A profile's segments, and a CSV export of members.
    let of_bo: Value = h
        .admin_get(&format!("/v1/profiles/{bo}/segments"))
        .json()
        .expect("json");
    assert_eq!(of_bo["segments"], json!(["big_spenders", "vip"]));
    let csv = h.admin_get("/v1/segments/big_spenders/members.csv");
    assert_eq!(csv.headers()["content-type"], "text/csv; charset=utf-8");
    let text = csv.text().expect("csv");
    let mut lines = text.lines();
    assert_eq!(
        lines.next(),
        Some("profile_id,user_ids,emails,phones,traits")
    );
    let rows: Vec<&str> = lines.collect();
    assert_eq!(rows.len(), 2);
    let bo_row = rows
        .iter()
        .find(|r| r.starts_with(&format!("{bo},")))
        .expect("bo's row");
    assert!(
        bo_row.starts_with(&format!("{bo},bo,bo@example.com,,\"{{")),
        "{bo_row}"
    );
    assert!(
        bo_row.contains("\"\"plan\"\":\"\"free\"\""),
        "traits as quoted JSON: {bo_row}"
    );
    // A cell a spreadsheet would take for a formula stays text.
    h.send_batch(json!([
        {"type": "identify", "userId": "=HYPERLINK(\"http://x\")", "traits": {"email": "f@x.io"}},
        {"type": "track", "userId": "=HYPERLINK(\"http://x\")", "event": "Order Completed",
         "properties": {"total": 999}}
    ]));
    let csv = h
        .admin_get("/v1/segments/big_spenders/members.csv")
        .text()
        .expect("csv");
    assert!(csv.contains(",\"'=HYPERLINK(\"\"http://x\"\")\","), "{csv}");
    assert_eq!(
        error_code(h.admin_get("/v1/profiles/prf_none/segments")),
        (404, "not_found".to_owned())
    );
}

#[test]
fn bad_segments_get_clear_errors() {
    let h = Harness::with_identity();
    let create = |body: Value| h.admin_send(Method::POST, "/v1/segments", &body);
    let response = create(json!({"key": "s", "definition": "traits.plan = \n  = \"pro\""}));
    let body: Value = response.json().expect("json");
    assert_eq!(body["error"]["code"], "invalid_definition");
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("line 2, column 3")),
        "{body}"
    );
    let cases = [
        (
            json!({"key": "s", "definition": "in_segment(\"nope\")"}),
            "unknown_segment",
        ),
        (
            json!({"key": "bad key", "definition": "has email"}),
            "invalid_key",
        ),
        (json!({"definition": "has email"}), "invalid_body"),
        (
            json!({"key": "s", "definition": "has email", "colour": 1}),
            "invalid_body",
        ),
    ];
    for (body, code) in cases {
        assert_eq!(
            error_code(create(body.clone())),
            (400, code.to_owned()),
            "{body}"
        );
    }
    assert_eq!(
        create(json!({"key": "a", "definition": "has email"})).status(),
        201
    );
    assert_eq!(
        error_code(create(json!({"key": "a", "definition": "has email"}))),
        (400, "segment_exists".to_owned())
    );
    assert_eq!(
        create(json!({"key": "b", "definition": "in_segment(\"a\")"})).status(),
        201
    );
    let cycle = h.admin_send(
        Method::PUT,
        "/v1/segments/a",
        &json!({"definition": "in_segment(\"b\")"}),
    );
    assert_eq!(error_code(cycle), (400, "segment_cycle".to_owned()));
    let in_use = h
        .http
        .delete(h.url("/v1/segments/a"))
        .bearer_auth(common::ADMIN_TOKEN)
        .send()
        .expect("sent");
    assert_eq!(error_code(in_use), (400, "segment_in_use".to_owned()));
    let gone = h
        .http
        .delete(h.url("/v1/segments/b"))
        .bearer_auth(common::ADMIN_TOKEN)
        .send()
        .expect("sent");
    assert_eq!(gone.status(), 200);
    for path in ["/v1/segments/b", "/v1/segments/b/members"] {
        assert_eq!(
            error_code(h.admin_get(path)),
            (404, "not_found".to_owned()),
            "{path}"
        );
    }
    let put_unknown = h.admin_send(
        Method::PUT,
        "/v1/segments/zzz",
        &json!({"definition": "has email"}),
    );
    assert_eq!(error_code(put_unknown), (404, "not_found".to_owned()));
    assert_eq!(
        error_code(h.admin_get("/v1/segments/a/members?limit=0")),
        (400, "invalid_limit".to_owned())
    );

    let without = Harness::start();
    let refused = without.admin_send(
        Method::POST,
        "/v1/segments",
        &json!({"key": "a", "definition": "has email"}),
    );
    let (status, _) = error_code(refused);
    assert_eq!(status, 404);
}

/// The membership changes recorded so far (after `after`), as (segment, profile, type,
/// cause) tuples.
fn changes_after(h: &Harness, after: u64) -> Vec<Value> {
    let body: Value = h
        .admin_get(&format!("/v1/membership-changes?after={after}&limit=1000"))
        .json()
        .expect("json");
    body["changes"].as_array().expect("changes").clone()
}

fn summary(changes: &[Value]) -> Vec<(String, String, String, String)> {
    changes
        .iter()
        .map(|c| {
            let text = |k: &str| c[k].as_str().unwrap_or_default().to_owned();
            (
                text("segment"),
                text("profile_id"),
                text("type"),
                text("cause"),
            )
        })
        .collect()
}

fn change(
    segment: &str,
    profile: &str,
    kind: &str,
    cause: &str,
) -> (String, String, String, String) {
    (
        segment.to_owned(),
        profile.to_owned(),
        kind.to_owned(),
        cause.to_owned(),
    )
}

fn delete(h: &Harness, path: &str) -> reqwest::blocking::Response {
    h.http
        .delete(h.url(path))
        .bearer_auth(common::ADMIN_TOKEN)
        .send()
        .expect("sent")
}

#[test]
fn memberships_follow_events_windows_merges_splits_and_deletes_exactly_once() {
    let h = Harness::with_identity();
    for (key, definition) in [
        ("pro", r#"traits.plan = "pro""#),
        ("active", r#"count(event "Signed In" within 1s) >= 1"#),
        (
            "pro_active",
            r#"in_segment("pro") and in_segment("active")"#,
        ),
    ] {
        let created = h.admin_send(
            Method::POST,
            "/v1/segments",
            &json!({"key": key, "definition": definition}),
        );
        assert_eq!(created.status(), 201);
        ready(&h, key);
    }

    // Events in, changes out: the trait, then the event and the dependent segment.
    h.send_batch(json!([{"type": "identify", "userId": "ann", "traits": {"plan": "pro"}}]));
    let ann = profile_id(&h, "ann");
    let first = changes_after(&h, 0);
    assert_eq!(summary(&first), [change("pro", &ann, "entered", "event")]);
    assert!(first[0]["event_seq"].is_u64() && first[0]["event_received_at"].is_string());
    h.send_batch(json!([{"type": "track", "userId": "ann", "event": "Signed In"}]));
    let entered = changes_after(&h, 1);
    assert_eq!(
        summary(&entered),
        [
            change("active", &ann, "entered", "event"),
            change("pro_active", &ann, "entered", "event"),
        ]
    );

    // An event no segment reads and a trait no segment reads change nothing.
    h.send_batch(json!([
        {"type": "track", "userId": "ann", "event": "Page Viewed"},
        {"type": "identify", "userId": "ann", "traits": {"name": "Ann"}}
    ]));
    assert!(changes_after(&h, 3).is_empty());

    // The window passes: a timer takes ann out of "active" and "pro_active", once.
    let expired = eventually("the window to pass", || {
        let found = changes_after(&h, 3);
        (found.len() >= 2).then_some(found)
    });
    assert_eq!(
        summary(&expired),
        [
            change("active", &ann, "exited", "time"),
            change("pro_active", &ann, "exited", "time"),
        ]
    );
    let segments_of = |id: &str| -> Value {
        h.admin_get(&format!("/v1/profiles/{id}/segments"))
            .json::<Value>()
            .expect("json")["segments"]
            .clone()
    };
    assert_eq!(segments_of(&ann), json!(["pro"]));

    // An anonymous visitor who is "pro" enters, then is recognised as ann: the merged
    // profile leaves, ann (already a member) enters nothing again.
    h.send_batch(json!([{"type": "identify", "anonymousId": "anon-1", "traits": {"plan": "pro"}}]));
    let visitor: Value = h
        .admin_get("/v1/profiles?identifier=anonymous_id:anon-1")
        .json()
        .expect("json");
    let visitor = visitor["id"].as_str().expect("id").to_owned();
    assert_eq!(
        summary(&changes_after(&h, 5)),
        [change("pro", &visitor, "entered", "event")]
    );
    h.send_batch(json!([{"type": "identify", "anonymousId": "anon-1", "userId": "ann"}]));
    assert_eq!(
        summary(&changes_after(&h, 6)),
        [change("pro", &visitor, "exited", "profile")]
    );
    assert_eq!(segments_of(&ann), json!(["pro"]));

    // Split the merge: the visitor's profile is back, and a member again.
    let log: Value = h
        .admin_get(&format!("/v1/profiles/{ann}/merges"))
        .json()
        .expect("json");
    let merge = log["merges"][0]["id"].as_u64().expect("a merge");
    let split = h.admin_send(
        Method::POST,
        &format!("/v1/merges/{merge}/split"),
        &json!({}),
    );
    assert_eq!(split.status(), 200);
    assert_eq!(
        summary(&changes_after(&h, 7)),
        [change("pro", &visitor, "entered", "profile")]
    );

    // Delete ann: she leaves every segment, once, because she was erased.
    assert_eq!(delete(&h, &format!("/v1/profiles/{ann}")).status(), 200);
    assert_eq!(
        summary(&changes_after(&h, 8)),
        [change("pro", &ann, "exited", "erased")]
    );
    assert_eq!(members(&h, "pro"), std::slice::from_ref(&visitor));

    // A segment created over existing profiles is computed in the background.
    let created = h.admin_send(
        Method::POST,
        "/v1/segments",
        &json!({"key": "visitors", "definition": "has anonymous_id"}),
    );
    assert_eq!(created.status(), 201);
    assert_eq!(members(&h, "visitors"), std::slice::from_ref(&visitor));
    let shown: Value = h.admin_get("/v1/segments/visitors").json().expect("json");
    assert_eq!(
        shown["progress"],
        json!({"state": "ready", "done": 1, "total": 1})
    );
    assert_eq!(
        summary(&changes_after(&h, 9)),
        [change("visitors", &visitor, "entered", "computed")]
    );

    // A deleted segment's members are forgotten, with no exit recorded.
    assert_eq!(delete(&h, "/v1/segments/visitors").status(), 200);
    eventually("the deleted segment forgotten", || {
        (segments_of(&visitor) == json!(["pro"])).then_some(())
    });
    assert!(changes_after(&h, 10).is_empty());

    // Filters and paging of the feed.
    let of_visitor: Value = h
        .admin_get(&format!(
            "/v1/membership-changes?profile_id={visitor}&segment=pro&limit=1"
        ))
        .json()
        .expect("json");
    assert_eq!(of_visitor["changes"].as_array().map(Vec::len), Some(1));
    assert_eq!(of_visitor["next_after"], 6);
    assert_eq!(
        error_code(h.admin_get("/v1/membership-changes?after=x")),
        (400, "invalid_query".to_owned())
    );
}

#[test]
fn an_unreadable_stored_segment_is_reported_and_the_collector_still_starts() {
    let mut h = Harness::with_identity();
    h.create(
        "/v1/segments",
        json!({"key": "good", "definition": "traits.plan = \"pro\""}),
    );
    h.collector.shutdown().expect("stops");
    {
        let store = kith_collector::store::Store::open(h.dir.path(), 1 << 20).expect("store");
        store
            .put_segment(
                "broken",
                Some(&json!({"key": "broken", "tree": "not a tree"})),
            )
            .expect("written");
    }
    h.restart(|config| config.identity = true);
    let listed: Value = h.admin_get("/v1/segments").json().expect("json");
    let segments = listed["segments"].as_array().expect("segments");
    assert_eq!(segments.len(), 2, "{listed}");
    let broken = segments
        .iter()
        .find(|s| s["key"] == "broken")
        .expect("listed");
    assert!(broken["broken"].is_string(), "{broken}");
    h.send_batch(json!([{"type": "identify", "userId": "u1", "traits": {"plan": "pro"}}]));
    assert_eq!(members(&h, "good").len(), 1, "the readable one works");
    let replaced = h.admin_send(
        Method::PUT,
        "/v1/segments/broken",
        &json!({"definition": "has email"}),
    );
    assert_eq!(replaced.status(), 200);
    assert_eq!(delete(&h, "/v1/segments/broken").status(), 200);
}

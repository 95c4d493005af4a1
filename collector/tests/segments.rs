//! Segments over HTTP: definitions created, changed and deleted; members computed from
//! traits, identifiers, events in windows and other segments; preview; paging; bad
//! definitions with line and column, unknown references, cycles.

mod common;

use common::{Harness, error_code};
use reqwest::Method;
use serde_json::{Value, json};

fn profile_id(h: &Harness, user: &str) -> String {
    let profile: Value = h
        .admin_get(&format!("/v1/profiles?identifier=user_id:{user}"))
        .json()
        .expect("json");
    profile["id"].as_str().expect("id").to_owned()
}

fn members(h: &Harness, key: &str) -> Vec<String> {
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

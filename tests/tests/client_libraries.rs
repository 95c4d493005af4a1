//! The collector fed by the client libraries users already have: Segment's and
//! RudderStack's own packages from npm and PyPI, run for real in Node and Python, plus
//! Kith's own wire types from sdk-core. "Segment-compatible" means whatever these send.
//!
//! The npm and PyPI packages are installed by `tests/run.sh` (pinned in
//! `tests/compat/package.json` and `tests/compat/requirements.txt`); the tests that need
//! them are ignored by a plain `cargo test` and run by `tests/run.sh`.

use std::path::{Path, PathBuf};
use std::process::Command;

use kith_collector::Running;
use kith_e2e::{WRITE_KEY, admin, stored};
use kith_sdk_core::protocol::{Batch, Common, Message, Track};
use serde_json::{Value, json};

fn collector() -> (tempfile::TempDir, Running) {
    let dir = tempfile::tempdir().expect("tempdir");
    let running = kith_e2e::collector(dir.path());
    (dir, running)
}

/// Stored events of `user_id`, oldest first.
fn events_of(running: &Running, user_id: &str) -> Vec<Value> {
    let mut events = stored(running, &format!("user_id={user_id}"));
    events.reverse();
    events
}

fn compat_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("compat")
}

fn run(program: &Path, args: &[&str]) {
    let output = Command::new(program)
        .args(args)
        .current_dir(compat_dir())
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run {}: {e} (run tests/run.sh to install it)",
                program.display()
            )
        });
    assert!(
        output.status.success(),
        "{} {args:?} failed:\n{}\n{}",
        program.display(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Checks that the six messages a sender script sends arrived whole.
fn assert_six_messages(running: &Running, user_id: &str, library: &str) {
    let events = events_of(running, user_id);
    let types: Vec<_> = events.iter().map(|e| e["type"].clone()).collect();
    assert_eq!(
        types,
        ["identify", "track", "page", "screen", "group", "alias"].map(Value::from),
        "{user_id}"
    );
    for event in &events {
        assert_eq!(event["context"]["library"]["name"], library, "{event}");
        assert!(event["messageId"].as_str().is_some_and(|id| !id.is_empty()));
        for field in ["timestamp", "originalTimestamp", "sentAt", "receivedAt"] {
            assert!(event[field].is_string(), "{field} missing in {event}");
        }
        assert_eq!(event["context"]["ip"], "127.0.0.1");
    }
    // Sent as "Ann@Example.com"; the default cleaning lower-cases emails and says so
    // (RudderStack's libraries also send the traits in context.traits).
    assert_eq!(events[0]["traits"]["email"], "ann@example.com");
    let cleaned = events[0]["context"]["kith"]["cleaned"]
        .as_array()
        .expect("cleaning recorded");
    assert!(cleaned.contains(&json!({"field": "traits.email", "rule": "email"})));
    assert_eq!(events[0]["anonymousId"], format!("anon-{user_id}"));
    assert_eq!(events[1]["event"], "Order Completed");
    assert_eq!(
        events[1]["properties"],
        json!({"total": 42.5, "currency": "EUR"})
    );
    assert_eq!(events[2]["name"], "Pricing");
    assert_eq!(events[3]["name"], "Home");
    assert_eq!(events[4]["groupId"], "acme");
    assert_eq!(events[5]["previousId"], format!("anon-{user_id}"));
}

fn node_sender(library: &str, npm_name: &str) {
    let (_dir, running) = collector();
    let url = running.url("");
    run(
        Path::new("node"),
        &["send.mjs", library, &url, WRITE_KEY, "r1"],
    );
    assert_six_messages(&running, &format!("{library}-node-r1"), npm_name);
    assert_eq!(admin(&running, "/v1/stats")["rejected"], json!({}));
}

fn python_sender(library: &str) {
    let (_dir, running) = collector();
    let url = running.url("");
    let python = compat_dir().join(".venv/bin/python");
    run(&python, &["send.py", library, &url, WRITE_KEY, "r1"]);
    assert_six_messages(
        &running,
        &format!("{library}-python-r1"),
        "analytics-python",
    );
    assert_eq!(admin(&running, "/v1/stats")["rejected"], json!({}));
}

#[test]
#[ignore = "needs the npm packages that tests/run.sh installs"]
fn segment_analytics_node() {
    node_sender("segment", "@segment/analytics-node");
}

#[test]
#[ignore = "needs the npm packages that tests/run.sh installs"]
fn rudderstack_sdk_node() {
    node_sender("rudderstack", "analytics-node");
}

#[test]
#[ignore = "needs the PyPI packages that tests/run.sh installs"]
fn segment_analytics_python() {
    python_sender("segment");
}

#[test]
#[ignore = "needs the PyPI packages that tests/run.sh installs"]
fn rudderstack_sdk_python() {
    python_sender("rudderstack");
}

#[test]
fn sdk_core_wire_types_are_what_the_collector_takes() {
    let (_dir, running) = collector();
    let batch = Batch {
        batch: vec![Message::Track(Track {
            common: Common {
                user_id: Some("core-user".to_owned()),
                message_id: Some("core-1".to_owned()),
                ..Common::default()
            },
            event: Some("Signed Up".to_owned()),
            properties: Some(json!({"plan": "pro"}).as_object().cloned().expect("object")),
        })],
        context: Some(
            json!({"library": {"name": kith_sdk_core::LIBRARY_NAME}})
                .as_object()
                .cloned()
                .expect("object"),
        ),
        integrations: None,
        sent_at: Some(jiff::Timestamp::now()),
        write_key: Some(WRITE_KEY.to_owned()),
    };
    let response = reqwest::blocking::Client::new()
        .post(running.url("/v1/batch"))
        .json(&batch)
        .send()
        .expect("sent");
    assert_eq!(response.status(), 200);
    let events = events_of(&running, "core-user");
    assert_eq!(events.len(), 1);
    let stored: Message = serde_json::from_value(events[0].clone())
        .expect("stored events parse as sdk-core messages");
    let Message::Track(track) = stored else {
        panic!("not a track")
    };
    assert_eq!(track.event.as_deref(), Some("Signed Up"));
    assert_eq!(track.common.message_id.as_deref(), Some("core-1"));
    assert_eq!(
        track.common.context.expect("context")["library"]["name"],
        kith_sdk_core::LIBRARY_NAME
    );
}

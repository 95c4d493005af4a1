//! The native SDK (sdk-core's engine and uploader) against the real collector over real
//! HTTP: events captured in Rust are found through the admin API, and a capturing
//! process killed with SIGKILL a hundred times loses nothing whose capture returned.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use kith_e2e::{WRITE_KEY, admin, caught_up, collector, collector_with, stored};
use kith_sdk_core::engine::{CaptureOptions, Config, Engine};
use kith_sdk_core::native::{Client, HttpTransport};
use kith_sdk_core::protocol::Map;
use kith_sdk_core::queue::MemoryStore;
use serde_json::{Value, json};

const KILLS: usize = 100;

fn object(value: Value) -> Map {
    value.as_object().cloned().expect("object")
}

#[test]
fn a_push_token_set_in_the_sdk_reaches_the_profile() {
    let dir = tempfile::tempdir().expect("tempdir");
    let running = collector_with(dir.path(), |config| config.identity = true);
    let engine = Engine::open(
        Box::new(MemoryStore::new()),
        Config::new(WRITE_KEY, running.url("")),
    )
    .expect("engine");
    let transport = Arc::new(HttpTransport::new(Duration::from_secs(10)).expect("transport"));
    let client = Client::start(engine, transport).expect("client");
    client
        .identify(Some("pushy"), Map::new(), CaptureOptions::default())
        .expect("identify");
    client
        .with_engine(|e| e.set_push_token("fcm", "fcm-token-1", jiff::Timestamp::now()))
        .expect("token");
    client.shutdown(Duration::from_secs(10));
    caught_up(&running);
    let profile = admin(&running, "/v1/profiles?identifier=user_id:pushy");
    let id = profile["id"].as_str().expect("profile id");
    assert_eq!(
        admin(&running, &format!("/v1/profiles/{id}/push-tokens"))["tokens"],
        json!([{"provider": "fcm", "token": "fcm-token-1"}])
    );
}

#[test]
fn events_captured_in_rust_reach_the_collector() {
    let dir = tempfile::tempdir().expect("tempdir");
    let running = collector(dir.path());
    let mut config = Config::new(WRITE_KEY, running.url(""));
    config.context = object(json!({"app": {"name": "e2e", "version": "1.0"}}));
    let engine = Engine::open(Box::new(MemoryStore::new()), config).expect("engine");
    let transport = Arc::new(HttpTransport::new(Duration::from_secs(10)).expect("transport"));
    let client = Client::start(engine, transport).expect("client");
    let none = CaptureOptions::default;
    client
        .identify(
            Some("rust-user"),
            object(json!({"email": "ann@example.com"})),
            none(),
        )
        .expect("identify");
    let track = client
        .track("Order Completed", object(json!({"total": 42})), none())
        .expect("track");
    client.page(Some("Home"), Map::new(), none()).expect("page");
    client
        .screen(Some("Settings"), Map::new(), none())
        .expect("screen");
    client
        .group("acme", object(json!({"name": "Acme"})), none())
        .expect("group");
    client.alias("rust-user-2", none()).expect("alias");
    client.shutdown(Duration::from_secs(10));
    let stats = client.stats();
    assert_eq!((stats.captured, stats.delivered, stats.pending), (6, 6, 0));

    let stored = stored(&running, "");
    assert_eq!(stored.len(), 6);
    let by_id = admin(&running, &format!("/v1/events?message_id={track}"));
    let event = &by_id["events"][0]["message"];
    assert_eq!(event["event"], "Order Completed");
    assert_eq!(event["userId"], "rust-user");
    assert_eq!(
        event["context"]["library"]["name"],
        kith_sdk_core::LIBRARY_NAME
    );
    assert_eq!(event["context"]["app"]["name"], "e2e");
    assert!(event["sentAt"].is_string() && event["originalTimestamp"].is_string());
    let alias = stored
        .iter()
        .find(|e| e["type"] == "alias")
        .expect("alias stored");
    assert_eq!(alias["previousId"], "rust-user");
    assert_eq!(admin(&running, "/v1/stats")["rejected"], json!({}));
}

#[test]
fn a_capturing_process_killed_a_hundred_times_loses_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let running = collector(&dir.path().join("collector"));
    let queue = dir.path().join("sdk").join("events.log");
    let url = running.url("");
    let capture = |extra: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_kith-capture"))
            .arg(&queue)
            .args([url.as_str(), WRITE_KEY])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("capture process starts")
    };
    let mut seed = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .expect("clock")
        .as_nanos() as u64
        | 1;
    println!("seed {seed}");
    let mut random = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let mut returned: Vec<String> = Vec::new();
    for _ in 0..KILLS {
        let mut child = capture(&[]);
        let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
        // Kill after a random number of returned captures: mid-capture, mid-upload.
        let captures = random() % 40 + 1;
        for _ in 0..captures {
            match lines.next() {
                Some(Ok(id)) => returned.push(id),
                _ => break,
            }
        }
        child.kill().expect("SIGKILL");
        child.wait().expect("reaped");
        // Lines the child wrote before dying belong to captures that returned.
        returned.extend(lines.map_while(Result::ok));
    }
    let mut drain = capture(&["--drain"]);
    let output = BufReader::new(drain.stdout.take().expect("stdout"))
        .lines()
        .map_while(Result::ok)
        .last()
        .expect("drain prints its stats");
    assert!(drain.wait().expect("drain exits").success());
    let stats: Value = serde_json::from_str(&output).expect("stats json");
    assert_eq!(stats["pending"], 0, "no stuck queue: {stats}");
    assert_eq!(stats["dropped"], json!({}), "{stats}");

    let mut counts: HashMap<String, usize> = HashMap::new();
    for event in stored(&running, "") {
        *counts
            .entry(event["messageId"].as_str().expect("id").to_owned())
            .or_default() += 1;
    }
    assert!(
        returned.len() >= KILLS,
        "captures happened: {}",
        returned.len()
    );
    let lost: Vec<_> = returned
        .iter()
        .filter(|id| !counts.contains_key(*id))
        .take(5)
        .collect();
    assert!(lost.is_empty(), "captured but never delivered: {lost:?}");
    let doubled: Vec<_> = counts.iter().filter(|(_, n)| **n > 1).take(5).collect();
    assert!(doubled.is_empty(), "delivered more than once: {doubled:?}");
    println!(
        "{} captures returned across {KILLS} kills; {} events stored, each once; corrupt records skipped: {}",
        returned.len(),
        counts.len(),
        stats["corrupt_records"]
    );
}

//! Kill -9 under load: the real `kith-collector` binary takes concurrent batches, is
//! killed with SIGKILL at random moments and restarted on the same data; clients resend
//! what was not acknowledged (as SDKs do). In the end every acknowledged `messageId` is
//! stored exactly once, (identity resolution on) each user's profile counts exactly
//! its stored events, and each segment membership change was recorded exactly once:
//! per profile and segment, enters and exits alternate and end in the membership the
//! profile's final traits and events give. An import killed midway resumes at the next start and stores
//! every row exactly once, its report counting each row once.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::process::{Child, Command};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};

use serde_json::{Value, json};

const WRITE_KEY: &str = "crash-write-key";
const ADMIN_TOKEN: &str = "crash-admin-token";
const KILL_CYCLES: usize = 4;
const CLIENTS: usize = 4;
const BATCH_EVENTS: usize = 100;

/// A small deterministic generator, seeded per run and printed so a failure can be
/// replayed.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// The real binary, with identity resolution on, so that its pipeline stage is killed
/// mid-chunk too.
fn start(data_dir: &Path) -> (Child, String) {
    kith_collector::child::spawn(
        Path::new(env!("CARGO_BIN_EXE_kith-collector")),
        data_dir,
        WRITE_KEY,
        ADMIN_TOKEN,
        &["--identity"],
    )
    .expect("collector starts")
}

fn client(id: usize, url: &RwLock<String>, acked: &Mutex<HashSet<String>>, stop: &AtomicBool) {
    let http = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("client");
    let mut batch_no = 0;
    while !stop.load(Ordering::Relaxed) {
        let ids: Vec<String> = (0..BATCH_EVENTS)
            .map(|i| format!("c{id}-b{batch_no}-e{i}"))
            .collect();
        // Tracks, and one identify whose trait flips the "odd" segment's membership.
        let mut events: Vec<Value> = ids[1..]
            .iter()
            .map(|m| json!({"type": "track", "event": "Crash Test", "userId": format!("user-{id}"), "messageId": m}))
            .collect();
        events.push(
            json!({"type": "identify", "userId": format!("user-{id}"), "messageId": ids[0],
                           "traits": {"parity": batch_no % 2}}),
        );
        let body = json!({ "batch": events }).to_string();
        // Resend the same batch until it is acknowledged, as an SDK would.
        loop {
            let target = format!("{}/v1/batch", url.read().expect("url lock"));
            let sent = http
                .post(target)
                .basic_auth(WRITE_KEY, Some(""))
                .body(body.clone())
                .send();
            if matches!(&sent, Ok(r) if r.status() == 200) {
                acked
                    .lock()
                    .expect("acked lock")
                    .extend(ids.iter().cloned());
                break;
            }
            if stop.load(Ordering::Relaxed) {
                return;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        batch_no += 1;
    }
}

fn all_stored(http: &reqwest::blocking::Client, url: &str) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let stats: Value = http
            .get(format!("{url}/v1/stats"))
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .expect("stats")
            .json()
            .expect("json");
        if stats["pending"] == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "pipeline did not catch up: {stats}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut events = Vec::new();
    let mut before: Option<u64> = None;
    loop {
        let mut query = format!("{url}/v1/events?limit=1000");
        if let Some(b) = before {
            query.push_str(&format!("&before={b}"));
        }
        let page: Value = http
            .get(query)
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .expect("events")
            .json()
            .expect("json");
        events.extend(page["events"].as_array().expect("array").iter().cloned());
        match page["next_before"].as_u64() {
            Some(next) => before = Some(next),
            None => return events,
        }
    }
}

/// A profile's membership changes alternate, enter first, and end in the membership its
/// final traits and events give, which the profile's segments agree with.
fn memberships_recorded_once(http: &reqwest::blocking::Client, url: &str, profile: &Value) {
    let id = profile["id"].as_str().expect("profile id");
    let get = |path: String| -> Value {
        http.get(format!("{url}{path}"))
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .expect("sent")
            .json()
            .expect("json")
    };
    let segments = get(format!("/v1/profiles/{id}/segments"))["segments"].clone();
    for (segment, expected) in [("odd", profile["traits"]["parity"] == 1), ("tested", true)] {
        let changes = get(format!(
            "/v1/membership-changes?segment={segment}&profile_id={id}&limit=1000"
        ))["changes"]
            .as_array()
            .expect("changes")
            .clone();
        let kinds: Vec<&str> = changes
            .iter()
            .map(|c| c["type"].as_str().expect("type"))
            .collect();
        for (i, kind) in kinds.iter().enumerate() {
            let want = if i % 2 == 0 { "entered" } else { "exited" };
            assert_eq!(*kind, want, "{segment}/{id}: changes {kinds:?}");
        }
        assert_eq!(
            kinds.len() % 2 == 1,
            expected,
            "{segment}/{id}: {kinds:?}, {profile}"
        );
        let listed = segments
            .as_array()
            .expect("segments")
            .iter()
            .any(|s| s == segment);
        assert_eq!(listed, expected, "{segment}/{id}: {segments}");
        if segment == "tested" {
            assert_eq!(kinds, ["entered"], "{id} entered once");
        }
        println!("{id}: {} changes of {segment}", kinds.len());
    }
}

#[test]
fn every_acknowledged_event_survives_sigkill_exactly_once() {
    let seed = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .expect("clock")
        .as_nanos() as u64
        | 1;
    println!("crash test seed {seed}");
    let mut rng = XorShift(seed);
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut child, first_url) = start(dir.path());
    let http = reqwest::blocking::Client::new();
    for (key, definition) in [
        ("odd", "traits.parity = 1"),
        ("tested", "count(event \"Crash Test\") >= 1"),
    ] {
        let created = http
            .post(format!("{first_url}/v1/segments"))
            .bearer_auth(ADMIN_TOKEN)
            .json(&json!({"key": key, "definition": definition}))
            .send()
            .expect("segment created");
        assert_eq!(created.status(), 201);
    }
    let url = Arc::new(RwLock::new(first_url));
    let acked = Arc::new(Mutex::new(HashSet::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..CLIENTS)
        .map(|id| {
            let (url, acked, stop) = (url.clone(), acked.clone(), stop.clone());
            std::thread::spawn(move || client(id, &url, &acked, &stop))
        })
        .collect();

    for cycle in 0..KILL_CYCLES {
        // Let load build (at least one acknowledged batch), then kill at a random moment.
        let floor = acked.lock().expect("lock").len();
        while acked.lock().expect("lock").len() == floor {
            std::thread::sleep(Duration::from_millis(5));
        }
        std::thread::sleep(Duration::from_millis(rng.next() % 400));
        child.kill().expect("SIGKILL");
        child.wait().expect("reaped");
        println!(
            "cycle {cycle}: killed with {} acknowledged",
            acked.lock().expect("lock").len()
        );
        let (next, next_url) = start(dir.path());
        child = next;
        *url.write().expect("lock") = next_url;
    }
    stop.store(true, Ordering::Relaxed);
    for client in clients {
        client.join().expect("client thread");
    }

    let stored = all_stored(&http, &url.read().expect("lock"));
    let mut counts: HashMap<String, usize> = HashMap::new();
    for event in &stored {
        let id = event["message"]["messageId"]
            .as_str()
            .expect("messageId")
            .to_owned();
        *counts.entry(id).or_default() += 1;
    }
    let acked = acked.lock().expect("lock");
    assert!(
        acked.len() >= KILL_CYCLES * BATCH_EVENTS,
        "load was too light"
    );
    let missing: Vec<_> = acked
        .iter()
        .filter(|id| !counts.contains_key(*id))
        .take(5)
        .collect();
    assert!(missing.is_empty(), "acknowledged but lost: {missing:?}");
    let doubled: Vec<_> = counts.iter().filter(|(_, n)| **n > 1).take(5).collect();
    assert!(doubled.is_empty(), "stored more than once: {doubled:?}");
    // Each client's user has one profile counting exactly its stored events.
    for id in 0..CLIENTS {
        let user = format!("user-{id}");
        let stored_for_user = stored
            .iter()
            .filter(|e| e["message"]["userId"] == user.as_str())
            .count();
        let profile: Value = http
            .get(format!(
                "{}/v1/profiles?identifier=user_id:{user}",
                url.read().expect("lock")
            ))
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .expect("profile")
            .json()
            .expect("json");
        assert_eq!(profile["events"], stored_for_user, "{user}: {profile}");
        memberships_recorded_once(&http, &url.read().expect("lock"), &profile);
    }
    println!(
        "{} acknowledged, {} stored, each exactly once",
        acked.len(),
        stored.len()
    );
    child.kill().expect("stop");
    child.wait().expect("reaped");
}

#[test]
fn sigterm_drains_flushes_and_exits_cleanly() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut child, url) = start(dir.path());
    let http = reqwest::blocking::Client::new();
    let body = json!({"batch": (0..50).map(|i| json!({
        "type": "track", "event": "Before Shutdown", "userId": "u", "messageId": format!("t{i}")
    })).collect::<Vec<_>>()});
    let sent = http
        .post(format!("{url}/v1/batch"))
        .basic_auth(WRITE_KEY, Some(""))
        .body(body.to_string())
        .send()
        .expect("sent");
    assert_eq!(sent.status(), 200);
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill runs");
    assert!(status.success());
    let exit = child.wait().expect("collector exits");
    assert!(exit.success(), "graceful shutdown exits 0, got {exit}");

    let (mut child, url) = start(dir.path());
    let stored = all_stored(&http, &url);
    assert_eq!(stored.len(), 50);
    child.kill().expect("stop");
    child.wait().expect("reaped");
}

/// Polls an import's report until `done(report)`.
fn report_until(
    http: &reqwest::blocking::Client,
    url: &str,
    id: &str,
    done: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let report: Value = http
            .get(format!("{url}/v1/imports/{id}"))
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .expect("report")
            .json()
            .expect("json");
        if done(&report) {
            return report;
        }
        assert!(Instant::now() < deadline, "import stuck: {report}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn an_import_killed_midway_resumes_and_stores_every_row_once() {
    const ROWS: usize = 30_000;
    let seed = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .expect("clock")
        .as_nanos() as u64
        | 1;
    println!("import crash test seed {seed}");
    let mut rng = XorShift(seed);
    let dir = tempfile::tempdir().expect("tempdir");
    let mut csv = String::from("id,plan\n");
    for i in 0..ROWS {
        csv.push_str(&format!("r{i},plan-{}\n", i % 7));
    }
    let (mut child, url) = start(dir.path());
    let http = reqwest::blocking::Client::new();
    let accepted: Value = http
        .post(format!(
            "{url}/v1/imports?user_id=id&traits=plan&format=csv"
        ))
        .bearer_auth(ADMIN_TOKEN)
        .body(csv)
        .send()
        .expect("upload")
        .json()
        .expect("json");
    let id = accepted["id"].as_str().expect("import id").to_owned();
    // Kill once some batches are durable, at a random moment after.
    report_until(&http, &url, &id, |r| r["ingested"].as_u64() >= Some(1_000));
    std::thread::sleep(Duration::from_millis(rng.next() % 300));
    child.kill().expect("SIGKILL");
    child.wait().expect("reaped");

    let (mut child, url) = start(dir.path());
    let report = report_until(&http, &url, &id, |r| r["status"] != "processing");
    println!("after the kill: {report}");
    assert_eq!(report["status"], "succeeded");
    assert_eq!(report["total"], ROWS);
    let counted =
        report["ingested"].as_u64().unwrap_or(0) + report["duplicates"].as_u64().unwrap_or(0);
    assert_eq!(counted, ROWS as u64, "every row counted once: {report}");

    let stored = all_stored(&http, &url);
    let mut counts: HashMap<String, usize> = HashMap::new();
    for event in &stored {
        let user = event["message"]["userId"]
            .as_str()
            .expect("userId")
            .to_owned();
        *counts.entry(user).or_default() += 1;
    }
    assert_eq!(counts.len(), ROWS, "every row stored");
    assert!(counts.values().all(|n| *n == 1), "no row stored twice");
    child.kill().expect("stop");
    child.wait().expect("reaped");
}

//! `kith-load`: the collector's load tool. It measures, in one run on one machine:
//!
//! 1. the raw sled write rate for the same events under the same flush policy (each
//!    client's batch is durable before its next one), as the baseline;
//! 2. the durable ingest rate of the real `kith-collector` binary over HTTP: concurrent
//!    clients posting 100-event batches to `/v1/batch`, each waiting for its 200;
//! 3. the collector's peak RSS under that load (VmHWM), and how long its pipeline takes
//!    to catch up afterwards.
//!
//! With `--import-mb N` it measures a batch import instead: it writes an N MB customer
//! CSV, times the `csv` crate reading it (the baseline: the least an import must do),
//! then uploads it to the real collector's `POST /v1/imports`, and reports the import's
//! rows/s, the ratio to the baseline, and the collector's peak RSS until its pipeline has
//! processed every imported event.
//!
//! With `--stitch-identifiers N` it measures identity resolution on the collector's
//! embedded store: people with a user id, an email and two devices send the events of a
//! login on each device (the second login merges two profiles), through the identity
//! stage exactly as the pipeline runs it (chunks of 2,000, one atomic batch each), until
//! N identifiers are stored. It reports events/s against the raw sled rate of the same
//! number of writes (the baseline) and the p50/p99 latency of the merge decisions.
//!
//! With `--match-people N` it runs probabilistic matching on N generated people (records
//! with typos, swapped names, missing values) and reports precision, recall, F1 and the
//! run time, with the cost per compared pair against one bare Jaro-Winkler comparison.
//!
//! With `--segment-profiles N` it evaluates the segment of the segments issue's example
//! over N generated profiles in memory (traits, identifier types, a few events each),
//! against the same condition written by hand in Rust (the baseline).
//!
//! With `--membership-profiles N` it measures segments in the real collector (identity
//! on): N profiles loaded through the pipeline, then a new segment computed for all of
//! them in the background, against the evaluator alone over the same profiles in memory
//! (the baseline); then, under a steady load (`--rate`, `--seconds`) of events that each
//! move a profile into a segment, the latency from the event's receipt to its membership
//! change, against the durable ingest latency of the same requests (the baseline).
//!
//! With `--deliveries N` it measures activation in the real collector: N webhook
//! deliveries (a campaign on entering a segment) drained from the outbox by a replay,
//! against the rate of the same signed POSTs sent straight to the same local receiver
//! (the baseline); then, under a steady load of events that each bring a new profile
//! with a Web Push subscription into a segment whose campaign pushes to it, the latency
//! from sending the event to the local push service receiving the encrypted push,
//! against the durable ingest latency of the same requests.
//!
//! Run: `cargo run --release -p kith-collector --bin kith-load -- --events 500000`,
//! `... -- --import-mb 200`, `... -- --stitch-identifiers 1000000`,
//! `... -- --match-people 20000`, `... -- --segment-profiles 1000000`, or
//! `... -- --membership-profiles 1000000`, or `... -- --deliveries 20000`.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use clap::Parser;
use serde_json::{Value, json};

const WRITE_KEY: &str = "load-write-key";
const ADMIN_TOKEN: &str = "load-admin-token";

/// Load-test the collector against the raw sled baseline.
#[derive(Debug, Parser)]
struct Args {
    /// Events to send in each measurement.
    #[arg(long, default_value_t = 500_000)]
    events: usize,
    /// Events per batch request.
    #[arg(long, default_value_t = 100)]
    batch: usize,
    /// Concurrent clients.
    #[arg(long, default_value_t = 16)]
    clients: usize,
    /// The collector binary (default: `kith-collector` next to this tool).
    #[arg(long)]
    collector: Option<PathBuf>,
    /// Measure the import of a CSV file of this many MB instead of HTTP ingest.
    #[arg(long)]
    import_mb: Option<u64>,
    /// Measure identity resolution until this many identifiers are stored.
    #[arg(long)]
    stitch_identifiers: Option<u64>,
    /// Measure probabilistic matching on a generated population of this many people.
    #[arg(long)]
    match_people: Option<usize>,
    /// Measure a full evaluation of a segment over this many generated profiles.
    #[arg(long)]
    segment_profiles: Option<usize>,
    /// Measure segments in the collector: computing a segment over this many profiles,
    /// then event-to-membership-change latency under steady load.
    #[arg(long)]
    membership_profiles: Option<usize>,
    /// Measure activation: this many webhook deliveries drained from the outbox, then
    /// event-to-webhook latency under steady load.
    #[arg(long)]
    deliveries: Option<usize>,
    /// The steady load of the latency measurement, in events per second.
    #[arg(long, default_value_t = 1_000)]
    rate: usize,
    /// How long the steady load lasts, in seconds.
    #[arg(long, default_value_t = 20)]
    seconds: u64,
}

/// One realistic analytics.js-style track event, about 600 bytes of JSON.
fn event(n: usize) -> Value {
    json!({
        "type": "track",
        "event": "Product Added",
        "messageId": format!("load-{n:012}"),
        "anonymousId": format!("anon-{}", n % 10_000),
        "userId": format!("user-{}", n % 5_000),
        "timestamp": "2026-11-29T12:00:00.000Z",
        "sentAt": "2026-11-29T12:00:00.100Z",
        "properties": {"product_id": format!("sku-{}", n % 997), "name": "Monopoly: 3rd Edition",
                       "price": 18.99, "quantity": 1, "currency": "USD", "category": "Games"},
        "context": {
            "library": {"name": "analytics.js", "version": "next-1.70.0"},
            "page": {"path": "/products/monopoly", "url": "https://shop.example/products/monopoly",
                     "referrer": "https://search.example/?q=board+games", "title": "Monopoly"},
            "userAgent": "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 Chrome/126.0 Safari/537.36",
            "locale": "en-US"
        }
    })
}

fn bodies(args: &Args) -> Vec<String> {
    (0..args.events.div_ceil(args.batch))
        .map(|b| {
            let batch: Vec<Value> = (b * args.batch..((b + 1) * args.batch).min(args.events))
                .map(event)
                .collect();
            json!({"batch": batch}).to_string()
        })
        .collect()
}

/// Runs `work(batch_index)` on `clients` threads until every batch is done; events/s.
fn run_clients(
    clients: usize,
    batches: usize,
    events: usize,
    work: impl Fn(usize) + Send + Sync,
) -> f64 {
    let next = AtomicUsize::new(0);
    let started = Instant::now();
    std::thread::scope(|scope| {
        for _ in 0..clients {
            scope.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= batches {
                        break;
                    }
                    work(i);
                }
            });
        }
    });
    events as f64 / started.elapsed().as_secs_f64()
}

fn raw_sled_rate(args: &Args, events: &[Vec<Vec<u8>>]) -> f64 {
    let dir = tempfile::tempdir().expect("temp dir");
    let db = sled::Config::new()
        .path(dir.path())
        .cache_capacity(kith_collector::config::DEFAULT_CACHE_BYTES)
        .open()
        .expect("sled opens");
    let log = db.open_tree("log").expect("tree");
    let seq = AtomicU64::new(0);
    run_clients(args.clients, events.len(), args.events, |i| {
        let mut batch = sled::Batch::default();
        for event in &events[i] {
            batch.insert(
                &seq.fetch_add(1, Ordering::Relaxed).to_be_bytes(),
                event.as_slice(),
            );
        }
        log.apply_batch(batch).expect("sled write");
        db.flush().expect("sled flush");
    })
}

fn peak_rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(f64::NAN);
    kib / 1024.0
}

/// Writes a customer CSV of about `mb` megabytes; answers its data rows.
fn write_csv(path: &std::path::Path, mb: u64) -> u64 {
    use std::io::Write as _;
    let mut out = std::io::BufWriter::new(std::fs::File::create(path).expect("csv file"));
    writeln!(
        out,
        "id,email,first_name,last_name,phone,plan,country,signed_up"
    )
    .expect("write");
    let (mut rows, mut bytes) = (0u64, 0u64);
    let plans = ["free", "pro", "team", "enterprise"];
    let countries = ["US", "GB", "DE", "FR", "BR", "IN", "JP"];
    while bytes < mb * 1_000_000 {
        rows += 1;
        let line = format!(
            "cust-{rows:09},customer.{rows}@example.com,First{},Last{},+1415555{:04},{},{},2024-{:02}-{:02}T10:{:02}:00Z\n",
            rows % 9_973,
            rows % 7_919,
            rows % 10_000,
            plans[(rows % 4) as usize],
            countries[(rows % 7) as usize],
            rows % 12 + 1,
            rows % 28 + 1,
            rows % 60
        );
        bytes += line.len() as u64;
        out.write_all(line.as_bytes()).expect("write");
    }
    out.flush().expect("flush");
    rows
}

/// Starts the collector binary on `dir` with the tool's credentials and `extra` flags.
fn start(
    collector: &std::path::Path,
    dir: &std::path::Path,
    extra: &[&str],
) -> (std::process::Child, String) {
    kith_collector::child::spawn(collector, dir, WRITE_KEY, ADMIN_TOKEN, extra)
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", collector.display()))
}

/// Waits until the collector's pipeline has processed everything accepted; its stats.
fn caught_up(http: &reqwest::blocking::Client, url: &str) -> Value {
    loop {
        let stats: Value = http
            .get(format!("{url}/v1/stats"))
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .and_then(|r| r.json())
            .expect("stats");
        if stats["pending"] == 0 {
            return stats;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn import_benchmark(collector: &std::path::Path, mb: u64) {
    let dir = tempfile::tempdir().expect("temp dir");
    let csv_path = dir.path().join("customers.csv");
    let rows = write_csv(&csv_path, mb);
    let size = std::fs::metadata(&csv_path).map_or(0, |m| m.len());
    println!(
        "kith-load: import of a {:.0} MB CSV, {rows} rows",
        size as f64 / 1e6
    );

    let started = Instant::now();
    let mut reader = csv::Reader::from_path(&csv_path).expect("csv");
    let parsed = reader.records().filter(Result::is_ok).count();
    let baseline = parsed as f64 / started.elapsed().as_secs_f64();
    println!("baseline: csv crate reads {baseline:.0} rows/s");

    let data = dir.path().join("data");
    let (mut child, url) = start(collector, &data, &[]);
    let http = reqwest::blocking::Client::builder()
        .timeout(None)
        .build()
        .expect("client");
    let started = Instant::now();
    let accepted: Value = http
        .post(format!("{url}/v1/imports"))
        .query(&[
            ("type", "identify"),
            ("user_id", "id"),
            ("email", "email"),
            ("phone", "phone"),
            ("timestamp", "signed_up"),
            ("traits", "first_name,last_name,plan,country"),
        ])
        .bearer_auth(ADMIN_TOKEN)
        .header("content-type", "text/csv")
        .body(std::fs::File::open(&csv_path).expect("csv"))
        .send()
        .and_then(|r| r.error_for_status())
        .and_then(|r| r.json())
        .expect("import accepted");
    let uploaded = started.elapsed();
    let id = accepted["id"].as_str().expect("import id").to_owned();
    let report = loop {
        let report: Value = http
            .get(format!("{url}/v1/imports/{id}"))
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .and_then(|r| r.json())
            .expect("report");
        if report["status"] != "processing" {
            break report;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let imported = started.elapsed();
    let rss_import = peak_rss_mib(child.id());
    let final_stats = caught_up(&http, &url);
    let processed = started.elapsed();
    let rss_all = peak_rss_mib(child.id());
    let _ = child.kill();
    let _ = child.wait();
    let rate = rows as f64 / imported.as_secs_f64();
    println!(
        "import {}: status {}, ingested {}, failed {}",
        id, report["status"], report["ingested"], report["failed"]
    );
    println!("upload (streamed to disk): {:.2} s", uploaded.as_secs_f64());
    println!(
        "import, upload to report: {rate:.0} rows/s ({:.1} s)",
        imported.as_secs_f64()
    );
    println!("ratio import / csv parse: {:.3}", rate / baseline);
    println!(
        "pipeline processed every imported event {:.1} s after the upload began; stored {}",
        processed.as_secs_f64(),
        final_stats["stored"]
    );
    println!(
        "collector peak RSS (VmHWM): {rss_import:.1} MiB when the import finished, {rss_all:.1} MiB after the pipeline caught up"
    );
}

/// The four events of person `n`: a visit and a login on each of two devices.
fn person_events(n: u64) -> [Value; 4] {
    let (user, email) = (format!("user-{n}"), format!("person{n}@example.com"));
    let (a, b) = (format!("anon-{n}-a"), format!("anon-{n}-b"));
    let at = "2026-11-29T12:00:00Z";
    [
        json!({"type": "page", "anonymousId": a, "timestamp": at, "messageId": format!("{n}-1")}),
        json!({"type": "identify", "anonymousId": a, "userId": user, "timestamp": at,
               "messageId": format!("{n}-2"), "traits": {"email": email, "plan": "pro"}}),
        json!({"type": "page", "anonymousId": b, "timestamp": at, "messageId": format!("{n}-3")}),
        json!({"type": "identify", "anonymousId": b, "userId": user, "timestamp": at,
               "messageId": format!("{n}-4")}),
    ]
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn stitch_benchmark(identifiers: u64) {
    use kith_collector::pipeline::{Outcome, Stage};
    use kith_collector::store::{Store, StoredEvent};

    const CHUNK: u64 = 2_000;
    let people = identifiers.div_ceil(4);
    let events = people * 4;
    println!(
        "kith-load: identity resolution, {people} people, {events} events, {identifiers} identifiers"
    );

    // Baseline: the raw sled rate of one small write per event, in chunk batches.
    let dir = tempfile::tempdir().expect("temp dir");
    let db = sled::Config::new()
        .path(dir.path())
        .cache_capacity(kith_collector::config::DEFAULT_CACHE_BYTES)
        .open()
        .expect("sled opens");
    let tree = db.open_tree("t").expect("tree");
    let started = Instant::now();
    for chunk in 0..events.div_ceil(CHUNK) {
        let mut batch = sled::Batch::default();
        for i in chunk * CHUNK..((chunk + 1) * CHUNK).min(events) {
            batch.insert(
                format!("o\0anonymous_id:anon-{i}").as_bytes(),
                b"prf_000000".as_slice(),
            );
        }
        tree.apply_batch(batch).expect("write");
        db.flush().expect("flush");
    }
    let raw = events as f64 / started.elapsed().as_secs_f64();
    drop((tree, db));
    println!(
        "baseline: raw sled, one small write per event in 2,000-write batches: {raw:.0} writes/s"
    );

    let data = tempfile::tempdir().expect("temp dir");
    let store = std::sync::Arc::new(
        Store::open(data.path(), kith_collector::config::DEFAULT_CACHE_BYTES).expect("store"),
    );
    let identity = std::sync::Arc::new(kith_collector::identity::Identity::new(
        store.clone(),
        kith_identity::rules::Rules::default(),
    ));
    let stage = identity.stage();
    let mut merge_decisions = Vec::with_capacity(people as usize);
    let started = Instant::now();
    let mut seq = 0;
    for chunk in 0..people.div_ceil(CHUNK / 4) {
        stage.begin_chunk();
        for n in chunk * (CHUNK / 4)..((chunk + 1) * (CHUNK / 4)).min(people) {
            for (i, message) in person_events(n).into_iter().enumerate() {
                seq += 1;
                let mut event = StoredEvent {
                    seq,
                    source: "src_load".to_owned(),
                    message: serde_json::from_value(message).expect("message"),
                };
                let decided = Instant::now();
                let outcome = stage.process(&mut event).expect("identity stage");
                if i == 3 {
                    merge_decisions.push(decided.elapsed());
                }
                assert_eq!(outcome, Outcome::Continue);
            }
        }
        stage.end_chunk().expect("chunk applied");
        store.flush().expect("flush");
    }
    let elapsed = started.elapsed();
    let rate = events as f64 / elapsed.as_secs_f64();
    merge_decisions.sort_unstable();
    let check = identity
        .find(&"user_id:user-0".parse().expect("identifier"))
        .expect("store")
        .expect("profile");
    assert_eq!(
        check.identifiers.len(),
        4,
        "the two devices merged into one profile"
    );
    println!(
        "identity stage: {rate:.0} events/s ({:.1} s)",
        elapsed.as_secs_f64()
    );
    println!("ratio stitching / raw sled writes: {:.3}", rate / raw);
    println!(
        "merge decisions (second device's login): p50 {:?}, p99 {:?}, max {:?}",
        percentile(&merge_decisions, 0.5),
        percentile(&merge_decisions, 0.99),
        merge_decisions.last().copied().unwrap_or_default()
    );
    println!(
        "peak RSS (VmHWM) of this process: {:.1} MiB",
        peak_rss_mib(std::process::id())
    );
}

fn match_benchmark(people: usize) {
    use kith_identity::{matching, synthetic};

    let (records, truth) = synthetic::population(people, 2026);
    println!(
        "kith-load: probabilistic matching, {} records of {people} people",
        records.len()
    );
    let names: Vec<&String> = records
        .iter()
        .filter_map(|r| r.fields.get("last_name"))
        .collect();
    let started = Instant::now();
    let mut checksum = 0.0;
    for (i, name) in names.iter().enumerate() {
        checksum += strsim::jaro_winkler(name, names[(i * 7 + 1) % names.len()]);
    }
    let per_comparison = started.elapsed().as_secs_f64() / names.len() as f64;
    println!(
        "baseline: one Jaro-Winkler comparison {:.0} ns (checksum {checksum:.1})",
        per_comparison * 1e9
    );
    let started = Instant::now();
    let outcome = matching::run(&synthetic::person_config(), &records);
    let elapsed = started.elapsed();
    let scores = synthetic::score(&records, &truth, &outcome.matches);
    let all_pairs = records.len() * (records.len() - 1) / 2;
    println!(
        "blocking: {} candidate pairs of {all_pairs} ({:.4} %)",
        outcome.compared,
        outcome.compared as f64 * 100.0 / all_pairs as f64
    );
    println!(
        "matching run (blocking, comparisons, EM, classification): {:.2} s; {:.0} ns per candidate pair = {:.1} Jaro-Winkler comparisons",
        elapsed.as_secs_f64(),
        elapsed.as_secs_f64() * 1e9 / outcome.compared as f64,
        elapsed.as_secs_f64() / outcome.compared as f64 / per_comparison
    );
    println!(
        "{} matched, {} suggested; precision {:.4}, recall {:.4}, F1 {:.4}",
        outcome.matches.len(),
        outcome.suggestions.len(),
        scores.precision,
        scores.recall,
        scores.f1
    );
}

/// A generated profile: traits, identifier types, `Order Completed` events.
type Generated = (
    serde_json::Map<String, Value>,
    std::collections::BTreeSet<String>,
    Vec<kith_segments::eval::EventRecord>,
);

/// The segment the segment benchmarks evaluate.
const SEGMENT: &str =
    r#"traits.plan = "pro" and count(event "Order Completed" within 30d) >= 2 and has email"#;

/// `profiles` generated profiles: a plan, an age, an email on every other one, and up to
/// three orders spread over 60 days before `now` (half a day off each day boundary, so
/// that a 30-day window holds the same orders for hours).
fn generated_profiles(profiles: usize, now: jiff::Timestamp) -> Vec<Generated> {
    use kith_segments::eval::EventRecord;

    let day = jiff::SignedDuration::from_hours(24);
    let plans = ["free", "pro", "team"];
    (0..profiles)
        .map(|i| {
            let traits = json!({"plan": plans[i % 3], "age": 18 + i % 60});
            let events = (0..(i % 4))
                .map(|k| EventRecord {
                    name: "Order Completed".to_owned(),
                    timestamp: now
                        - day * ((i * 7 + k * 13) % 60) as i32
                        - jiff::SignedDuration::from_hours(12),
                    properties: json!({"total": 10 + (i + k) % 90})
                        .as_object()
                        .cloned()
                        .unwrap_or_default(),
                })
                .collect();
            let identifiers = if i % 2 == 0 {
                ["email".to_owned()].into()
            } else {
                std::collections::BTreeSet::new()
            };
            (
                traits.as_object().cloned().unwrap_or_default(),
                identifiers,
                events,
            )
        })
        .collect()
}

/// The segment evaluator alone over `data`: members and seconds.
fn evaluate_in_memory(data: &[Generated], now: jiff::Timestamp) -> (usize, Duration) {
    use kith_segments::eval::{Profile, evaluate};

    let segments = std::collections::BTreeSet::new();
    let expr = kith_segments::parse(SEGMENT).expect("parses");
    let started = Instant::now();
    let members = data
        .iter()
        .filter(|(traits, identifiers, events)| {
            let profile = Profile {
                traits,
                identifiers,
                events,
                segments: &segments,
            };
            evaluate(&expr, &profile, now)
        })
        .count();
    (members, started.elapsed())
}

fn segment_benchmark(profiles: usize) {
    let now: jiff::Timestamp = "2026-11-29T12:00:00Z".parse().expect("timestamp");
    let day = jiff::SignedDuration::from_hours(24);
    let data = generated_profiles(profiles, now);
    println!("kith-load: segment evaluation over {profiles} profiles: {SEGMENT}");

    let started = Instant::now();
    let by_hand = data
        .iter()
        .filter(|(traits, ids, events)| {
            traits.get("plan").and_then(Value::as_str) == Some("pro")
                && ids.contains("email")
                && events
                    .iter()
                    .filter(|e| {
                        e.name == "Order Completed"
                            && e.timestamp >= now - day * 30
                            && e.timestamp <= now
                    })
                    .count()
                    >= 2
        })
        .count();
    let baseline = started.elapsed();
    let (members, elapsed) = evaluate_in_memory(&data, now);
    assert_eq!(
        members, by_hand,
        "the evaluator agrees with the hand-written condition"
    );
    println!(
        "baseline: the condition written by hand in Rust: {:.3} s",
        baseline.as_secs_f64()
    );
    println!(
        "segment evaluator: {:.3} s ({:.0} profiles/s), {members} members; ratio to the baseline {:.2}",
        elapsed.as_secs_f64(),
        profiles as f64 / elapsed.as_secs_f64(),
        elapsed.as_secs_f64() / baseline.as_secs_f64()
    );
}

/// An admin request to the collector; its JSON answer.
fn admin(
    http: &reqwest::blocking::Client,
    method: reqwest::Method,
    url: &str,
    body: Option<&Value>,
) -> Value {
    let mut request = http.request(method, url).bearer_auth(ADMIN_TOKEN);
    if let Some(body) = body {
        request = request.json(body);
    }
    request
        .send()
        .and_then(|r| r.error_for_status())
        .and_then(|r| r.json())
        .unwrap_or_else(|e| panic!("{url}: {e}"))
}

/// Posts events in batches of 500 from 4 clients.
fn send_events(http: &reqwest::blocking::Client, url: &str, events: &[Value]) {
    let batches: Vec<&[Value]> = events.chunks(500).collect();
    run_clients(4, batches.len(), events.len(), |i| {
        http.post(format!("{url}/v1/batch"))
            .basic_auth(WRITE_KEY, Some(""))
            .json(&json!({"batch": batches[i]}))
            .send()
            .and_then(|r| r.error_for_status())
            .expect("batch accepted");
    });
}

/// What a steady load sent.
struct SteadyLoad {
    /// When each event was sent, by index.
    sent: Vec<Instant>,
    /// Each request's durable ingest latency (HTTP 200 after fsync).
    acks: Vec<Duration>,
    /// Events per second offered.
    offered: f64,
}

/// Sends `rate` events/s for `seconds` as a batch every 10 ms, event `i` made by
/// `event(i)`, each batch waiting for its 200.
fn steady_load(
    http: &reqwest::blocking::Client,
    url: &str,
    rate: usize,
    seconds: u64,
    mut event: impl FnMut(usize) -> Value,
) -> SteadyLoad {
    let per_tick = rate.div_ceil(100).max(1);
    let mut load = SteadyLoad {
        sent: Vec::new(),
        acks: Vec::new(),
        offered: 0.0,
    };
    let started = Instant::now();
    for tick in 0..seconds * 100 {
        let due = started + Duration::from_millis(tick * 10);
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        let first = load.sent.len();
        let batch: Vec<Value> = (first..first + per_tick).map(&mut event).collect();
        let at = Instant::now();
        load.sent.extend(std::iter::repeat_n(at, per_tick));
        http.post(format!("{url}/v1/batch"))
            .basic_auth(WRITE_KEY, Some(""))
            .json(&json!({ "batch": batch }))
            .send()
            .and_then(|r| r.error_for_status())
            .expect("batch accepted");
        load.acks.push(at.elapsed());
    }
    load.offered = load.sent.len() as f64 / started.elapsed().as_secs_f64();
    load
}

/// Prints the ingest latency (the baseline) and `what`'s latency, both sorted.
fn report_latency(what: &str, acks: &[Duration], latencies: &[Duration]) {
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!(
        "baseline: durable ingest (HTTP 200 after fsync) p50 {:.1} ms, p99 {:.1} ms",
        ms(percentile(acks, 0.5)),
        ms(percentile(acks, 0.99))
    );
    println!(
        "{what}: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms; ratio p99 / ingest p99 {:.1}",
        ms(percentile(latencies, 0.5)),
        ms(percentile(latencies, 0.99)),
        ms(*latencies.last().expect("latencies")),
        ms(percentile(latencies, 0.99)) / ms(percentile(acks, 0.99))
    );
}

/// Waits until a segment is computed for every profile.
fn wait_ready(http: &reqwest::blocking::Client, url: &str, key: &str) {
    loop {
        let shown = admin(
            http,
            reqwest::Method::GET,
            &format!("{url}/v1/segments/{key}"),
            None,
        );
        if shown["progress"]["state"] == "ready" {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn membership_benchmark(collector: &std::path::Path, profiles: usize, rate: usize, seconds: u64) {
    let now = jiff::Timestamp::now();
    let data = generated_profiles(profiles, now);
    println!("kith-load: segments in the collector, {profiles} profiles; segment: {SEGMENT}");
    let dir = tempfile::tempdir().expect("temp dir");
    let (mut child, url) = start(collector, dir.path(), &["--identity"]);
    let http = reqwest::blocking::Client::builder()
        .timeout(None)
        .build()
        .expect("client");

    // The profiles, through the real pipeline (identity on).
    let started = Instant::now();
    let mut events = Vec::new();
    for (i, (traits, identifiers, orders)) in data.iter().enumerate() {
        let mut traits = traits.clone();
        if identifiers.contains("email") {
            traits.insert("email".to_owned(), json!(format!("person{i}@example.com")));
        }
        events.push(json!({"type": "identify", "userId": format!("u{i}"), "traits": traits}));
        for order in orders {
            events.push(json!({"type": "track", "userId": format!("u{i}"), "event": order.name,
                               "timestamp": order.timestamp.to_string(), "properties": order.properties}));
        }
    }
    let sent = events.len();
    send_events(&http, &url, &events);
    drop(events);
    caught_up(&http, &url);
    println!(
        "loaded {sent} events into {profiles} profiles in {:.1} s",
        started.elapsed().as_secs_f64()
    );

    // Full evaluation: a new segment computed for every profile in the background.
    let (expected, in_memory) = evaluate_in_memory(&data, jiff::Timestamp::now());
    drop(data);
    let started = Instant::now();
    admin(
        &http,
        reqwest::Method::POST,
        &format!("{url}/v1/segments"),
        Some(&json!({"key": "pro_buyers", "definition": SEGMENT})),
    );
    wait_ready(&http, &url, "pro_buyers");
    let computed = started.elapsed();
    let members = admin(
        &http,
        reqwest::Method::GET,
        &format!("{url}/v1/segments/pro_buyers/members?limit=1"),
        None,
    )["total"]
        .as_u64()
        .unwrap_or_default();
    assert_eq!(
        members as usize, expected,
        "the collector agrees with the evaluator"
    );
    println!(
        "baseline: the evaluator alone over the same profiles in memory: {:.3} s",
        in_memory.as_secs_f64()
    );
    println!(
        "collector, new segment computed for every profile: {:.1} s ({:.0} profiles/s), {members} members; ratio to the baseline {:.0}",
        computed.as_secs_f64(),
        profiles as f64 / computed.as_secs_f64(),
        computed.as_secs_f64() / in_memory.as_secs_f64()
    );

    // Event to membership change under steady load: each event is a new visitor's
    // first checkout, which enters "checkout".
    admin(
        &http,
        reqwest::Method::POST,
        &format!("{url}/v1/segments"),
        Some(&json!({"key": "checkout", "definition": "count(event \"Checkout Started\") >= 1"})),
    );
    wait_ready(&http, &url, "checkout");
    let load = steady_load(&http, &url, rate, seconds, |i| {
        json!({"type": "track", "anonymousId": format!("visitor-{i}"),
               "event": "Checkout Started", "properties": {"total": 42}})
    });
    let (n, mut acks, offered) = (load.sent.len(), load.acks, load.offered);
    caught_up(&http, &url);
    let mut latencies: Vec<Duration> = Vec::new();
    let mut after = 0u64;
    loop {
        let page = admin(
            &http,
            reqwest::Method::GET,
            &format!("{url}/v1/membership-changes?segment=checkout&after={after}&limit=1000"),
            None,
        );
        let changes = page["changes"].as_array().cloned().unwrap_or_default();
        if changes.is_empty() {
            break;
        }
        for change in &changes {
            let at: jiff::Timestamp = change["at"]
                .as_str()
                .and_then(|t| t.parse().ok())
                .expect("at");
            let received: jiff::Timestamp = change["event_received_at"]
                .as_str()
                .and_then(|t| t.parse().ok())
                .expect("event_received_at");
            latencies.push(Duration::try_from(at.duration_since(received)).unwrap_or_default());
        }
        after = page["next_after"].as_u64().expect("next_after");
    }
    let rss = peak_rss_mib(child.id());
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(latencies.len(), n, "one change per event");
    latencies.sort();
    acks.sort();
    println!(
        "steady load: {n} events at {offered:.0} events/s for {seconds} s, a batch every 10 ms"
    );
    report_latency(
        "event received to membership change recorded",
        &acks,
        &latencies,
    );
    println!("collector peak RSS (VmHWM): {rss:.1} MiB");
}

/// A local webhook receiver: the moment each campaign message's `user` first arrived.
struct Receiver {
    url: String,
    /// Answer 503 while set.
    failing: std::sync::Arc<std::sync::atomic::AtomicBool>,
    arrived: std::sync::Arc<std::sync::Mutex<std::collections::HashMap<String, Instant>>>,
}

fn receiver() -> Receiver {
    use std::sync::atomic::AtomicBool;
    use std::sync::{Arc, Mutex};

    let failing = Arc::new(AtomicBool::new(false));
    let arrived: Arc<Mutex<std::collections::HashMap<String, Instant>>> = Arc::default();
    let (fail, seen) = (failing.clone(), arrived.clone());
    let pushed = arrived.clone();
    let app = axum::Router::new()
        .route(
            "/push/{user}",
            axum::routing::post(
                move |axum::extract::Path(user): axum::extract::Path<String>| {
                    let pushed = pushed.clone();
                    async move {
                        pushed
                            .lock()
                            .expect("receiver")
                            .entry(user)
                            .or_insert_with(Instant::now);
                        axum::http::StatusCode::CREATED
                    }
                },
            ),
        )
        .route(
            "/hook",
            axum::routing::post(move |body: axum::body::Bytes| {
                let (fail, seen) = (fail.clone(), seen.clone());
                async move {
                    if fail.load(Ordering::Relaxed) {
                        return axum::http::StatusCode::SERVICE_UNAVAILABLE;
                    }
                    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                    let user = body["message"]["user"]
                        .as_str()
                        .unwrap_or_default()
                        .to_owned();
                    seen.lock()
                        .expect("receiver")
                        .entry(user)
                        .or_insert_with(Instant::now);
                    axum::http::StatusCode::OK
                }
            }),
        );
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.set_nonblocking(true).expect("nonblocking");
    let url = format!("http://{}/hook", listener.local_addr().expect("addr"));
    std::thread::spawn(move || {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime")
            .block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
                axum::serve(listener, app).await.expect("serve");
            });
    });
    Receiver {
        url,
        failing,
        arrived,
    }
}

fn activation_benchmark(collector: &std::path::Path, deliveries: usize, rate: usize, seconds: u64) {
    let receiver = receiver();
    let http = reqwest::blocking::Client::builder()
        .timeout(None)
        .build()
        .expect("client");
    println!("kith-load: activation, {deliveries} webhook deliveries");

    // Baseline: the same signed POSTs, one after another, straight to the receiver.
    let started = Instant::now();
    for i in 0..deliveries {
        let body = json!({"id": i, "idempotency_key": format!("baseline:{i}"), "campaign": "c",
                          "profile_id": format!("prf_{i}"), "segment": "pro", "type": "entered",
                          "message": {"user": format!("baseline-{i}")}})
        .to_string();
        let t = jiff::Timestamp::now().as_second();
        let signature = kith_collector::activation::webhook::sign("secret", t, body.as_bytes());
        http.post(&receiver.url)
            .header("content-type", "application/json")
            .header("idempotency-key", format!("baseline:{i}"))
            .header("kith-signature", format!("t={t},v1={signature}"))
            .body(body)
            .send()
            .and_then(|r| r.error_for_status())
            .expect("baseline POST");
    }
    let baseline = deliveries as f64 / started.elapsed().as_secs_f64();
    println!("baseline: signed POSTs straight to the receiver, one at a time: {baseline:.0}/s");

    let dir = tempfile::tempdir().expect("temp dir");
    let (mut child, url) = start(
        collector,
        dir.path(),
        &["--identity", "--allow-private-destinations"],
    );
    let post = |path: &str, body: Value| {
        admin(
            &http,
            reqwest::Method::POST,
            &format!("{url}{path}"),
            Some(&body),
        )
    };
    let get = |path: &str| admin(&http, reqwest::Method::GET, &format!("{url}{path}"), None);
    post(
        "/v1/segments",
        json!({"key": "pro", "definition": "traits.plan = \"pro\""}),
    );
    let destination = post(
        "/v1/destinations",
        json!({"type": "webhook", "url": receiver.url, "secret": "secret", "max_attempts": 1}),
    );
    post(
        "/v1/campaigns",
        json!({"trigger": {"type": "segment_entered", "segment": "pro"},
               "destination": destination["id"], "template": {"user": "{{traits.user}}"}}),
    );

    // Fill the outbox: the receiver answers 503, so every delivery fails once and is dead.
    receiver.failing.store(true, Ordering::Relaxed);
    let events: Vec<Value> = (0..deliveries)
        .map(|i| {
            json!({"type": "identify", "userId": format!("u{i}"),
                        "traits": {"plan": "pro", "user": format!("u{i}")}})
        })
        .collect();
    send_events(&http, &url, &events);
    caught_up(&http, &url);
    loop {
        let last = get(&format!("/v1/deliveries?after={}&limit=1", deliveries - 1));
        let pending = get("/v1/deliveries?state=pending&limit=1");
        let created = last["deliveries"].as_array().is_some_and(|d| !d.is_empty());
        let waiting = pending["deliveries"]
            .as_array()
            .is_some_and(|d| !d.is_empty());
        if created && !waiting {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    // Drain: replay them all and time until the receiver has every one.
    receiver.failing.store(false, Ordering::Relaxed);
    let started = Instant::now();
    post("/v1/deliveries/replay", json!({}));
    while receiver.arrived.lock().expect("receiver").len() < deliveries * 2 {
        std::thread::sleep(Duration::from_millis(5));
    }
    let drained = deliveries as f64 / started.elapsed().as_secs_f64();
    println!(
        "collector outbox drained to the receiver: {drained:.0} deliveries/s; ratio to the baseline {:.2}",
        drained / baseline
    );

    // Latency under steady load: each event brings a new profile, with a Web Push
    // subscription to the receiver, into a segment whose campaign pushes to it.
    use p256::elliptic_curve::sec1::ToEncodedPoint as _;
    let b64 = |bytes: &[u8]| kith_collector::activation::push::b64url(bytes);
    let vapid = p256::SecretKey::random(&mut rand_core::OsRng);
    let browser = p256::SecretKey::random(&mut rand_core::OsRng);
    let keys = json!({"p256dh": b64(browser.public_key().to_encoded_point(false).as_bytes()),
                      "auth": b64(&[7u8; 16])});
    post(
        "/v1/segments",
        json!({"key": "live", "definition": "traits.wave = \"live\""}),
    );
    let push = post(
        "/v1/destinations",
        json!({"type": "web_push", "vapid_private_key": b64(&vapid.to_bytes()),
               "subject": "mailto:load@example.com"}),
    );
    post(
        "/v1/campaigns",
        json!({"trigger": {"type": "segment_entered", "segment": "live"},
               "destination": push["id"], "template": {"title": "Hi {{traits.user}}"}}),
    );
    let push_base = receiver.url.replace("/hook", "/push");
    let load = steady_load(&http, &url, rate, seconds, |i| {
        let user = format!("live-{i}");
        let subscription = json!({"endpoint": format!("{push_base}/{user}"), "keys": keys});
        json!({"type": "identify", "userId": user, "traits": {"wave": "live", "user": user},
               "context": {"device": {"token": subscription.to_string(), "tokenProvider": "webpush"}}})
    });
    let (mut acks, offered) = (load.acks, load.offered);
    let sent: Vec<(String, Instant)> = load
        .sent
        .iter()
        .enumerate()
        .map(|(i, at)| (format!("live-{i}"), *at))
        .collect();
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut latencies: Vec<Duration> = loop {
        let arrived = receiver.arrived.lock().expect("receiver");
        let found: Vec<Duration> = sent
            .iter()
            .filter_map(|(user, at)| arrived.get(user).map(|t| t.duration_since(*at)))
            .collect();
        if found.len() == sent.len() || Instant::now() > deadline {
            break found;
        }
        drop(arrived);
        std::thread::sleep(Duration::from_millis(20));
    };
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(
        latencies.len(),
        sent.len(),
        "every event reached the webhook"
    );
    latencies.sort();
    acks.sort();
    println!(
        "steady load: {} events at {offered:.0} events/s for {seconds} s",
        sent.len()
    );
    report_latency(
        "event sent to Web Push received (encrypted, VAPID-signed)",
        &acks,
        &latencies,
    );
}

fn main() {
    let args = Args::parse();
    if let Some(profiles) = args.segment_profiles {
        segment_benchmark(profiles);
        return;
    }
    if let Some(people) = args.match_people {
        match_benchmark(people);
        return;
    }
    if let Some(identifiers) = args.stitch_identifiers {
        stitch_benchmark(identifiers);
        return;
    }
    let collector = args.collector.clone().unwrap_or_else(|| {
        let me = std::env::current_exe().expect("own path");
        me.with_file_name("kith-collector")
    });
    if let Some(mb) = args.import_mb {
        import_benchmark(&collector, mb);
        return;
    }
    if let Some(deliveries) = args.deliveries {
        activation_benchmark(&collector, deliveries, args.rate, args.seconds);
        return;
    }
    if let Some(profiles) = args.membership_profiles {
        membership_benchmark(&collector, profiles, args.rate, args.seconds);
        return;
    }
    println!(
        "kith-load: {} events in {}-event batches, {} concurrent clients, {} cores",
        args.events,
        args.batch,
        args.clients,
        std::thread::available_parallelism().map_or(0, usize::from)
    );
    let bodies = bodies(&args);
    let encoded: Vec<Vec<Vec<u8>>> = bodies
        .iter()
        .map(|body| {
            let value: Value = serde_json::from_str(body).expect("own json");
            value["batch"]
                .as_array()
                .expect("batch")
                .iter()
                .map(|e| serde_json::to_vec(e).expect("json"))
                .collect()
        })
        .collect();

    let raw = raw_sled_rate(&args, &encoded);
    println!("raw sled (apply_batch + flush per batch): {raw:.0} events/s");

    let dir = tempfile::tempdir().expect("temp dir");
    let (mut child, url) = start(&collector, dir.path(), &[]);
    let http = reqwest::blocking::Client::builder()
        .pool_max_idle_per_host(args.clients)
        .timeout(Duration::from_secs(60))
        .build()
        .expect("client");
    let failures = AtomicUsize::new(0);
    let ingest = run_clients(args.clients, bodies.len(), args.events, |i| {
        let response = http
            .post(format!("{url}/v1/batch"))
            .basic_auth(WRITE_KEY, Some(""))
            .header("content-type", "application/json")
            .body(bodies[i].clone())
            .send();
        if !matches!(response, Ok(r) if r.status() == 200) {
            failures.fetch_add(1, Ordering::Relaxed);
        }
    });
    let rss_under_load = peak_rss_mib(child.id());
    let drain_started = Instant::now();
    let stats = caught_up(&http, &url);
    let drain = drain_started.elapsed();
    let rss_after_drain = peak_rss_mib(child.id());
    let _ = child.kill();
    let _ = child.wait();

    println!("collector durable ingest over HTTP: {ingest:.0} events/s");
    println!("ratio ingest / raw sled: {:.2}", ingest / raw);
    println!("collector peak RSS (VmHWM) under load: {rss_under_load:.1} MiB");
    println!(
        "pipeline caught up {:.2} s after the last 200; peak RSS then {rss_after_drain:.1} MiB",
        drain.as_secs_f64()
    );
    println!(
        "failed requests: {}; accepted {}, stored {}",
        failures.load(Ordering::Relaxed),
        stats["accepted"],
        stats["stored"]
    );
}

//! The hostile-input and fault suite: the real `kith-collector` binary over HTTP, one
//! test per way a stranger (with the public write key) or a broken part could try to
//! stop it, exhaust it, make it leak or make it lie. Each test shows the attack
//! refused or contained and the collector still serving good events.

mod common;

use std::path::Path;
use std::process::Child;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use reqwest::blocking::{Client, Response};
use serde_json::{Value, json};

const WRITE_KEY: &str = "hostile-write-key";
const ADMIN_TOKEN: &str = "hostile-admin-token";

/// The real binary on a fresh data directory, killed when dropped.
struct Collector {
    child: Child,
    url: String,
    http: Client,
    dir: tempfile::TempDir,
}

impl Collector {
    fn start(extra: &[&str]) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        Self::start_in(dir, extra)
    }

    fn start_in(dir: tempfile::TempDir, extra: &[&str]) -> Self {
        let (child, url) = spawn(dir.path(), extra);
        let http = Client::builder()
            .timeout(Duration::from_secs(30))
            .build()
            .expect("client");
        Collector {
            child,
            url,
            http,
            dir,
        }
    }

    /// Stops it (SIGKILL) and starts it again on the same data.
    fn restart(&mut self, extra: &[&str]) {
        self.child.kill().expect("kill");
        self.child.wait().expect("wait");
        (self.child, self.url) = spawn(self.dir.path(), extra);
    }

    fn post(&self, path: &str, body: &Value) -> Response {
        self.http
            .post(format!("{}{path}", self.url))
            .basic_auth(WRITE_KEY, Some(""))
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .expect("sent")
    }

    fn admin(&self, method: reqwest::Method, path: &str, body: Option<&Value>) -> Response {
        let mut request = self
            .http
            .request(method, format!("{}{path}", self.url))
            .bearer_auth(ADMIN_TOKEN);
        if let Some(body) = body {
            request = request
                .header("content-type", "application/json")
                .body(body.to_string());
        }
        request.send().expect("sent")
    }

    fn get(&self, path: &str) -> Value {
        let response = self.admin(reqwest::Method::GET, path, None);
        assert!(
            response.status().is_success(),
            "{path}: {}",
            response.status()
        );
        response.json().expect("json")
    }

    /// Waits (30 s at most) until the pipeline has processed everything accepted.
    fn wait_processed(&self) -> Value {
        eventually("the pipeline to catch up", || {
            let stats = self.get("/v1/stats");
            (stats["pending"] == 0).then_some(stats)
        })
    }

    fn metrics(&self) -> String {
        self.admin(reqwest::Method::GET, "/metrics", None)
            .text()
            .expect("metrics")
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn(dir: &Path, extra: &[&str]) -> (Child, String) {
    kith_collector::child::spawn(
        Path::new(env!("CARGO_BIN_EXE_kith-collector")),
        dir,
        WRITE_KEY,
        ADMIN_TOKEN,
        extra,
    )
    .expect("collector starts")
}

/// Polls `check` until it answers something, failing after 30 s with `what`.
fn eventually<T>(what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(found) = check() {
            return found;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `levels` objects nested in each other.
fn nested(levels: usize) -> Value {
    (0..levels).fold(json!("leaf"), |inner, _| json!({ "a": inner }))
}

fn status_and_code(response: Response) -> (u16, String) {
    let status = response.status().as_u16();
    let body: Value = response.json().expect("json error");
    (
        status,
        body["error"]["code"].as_str().unwrap_or("").to_owned(),
    )
}

#[test]
fn a_deeply_nested_event_is_refused_and_the_next_one_is_stored() {
    let c = Collector::start(&["--identity"]);
    // 125 levels: under serde's parsing limit, over Kith's.
    let deep = json!({"type": "identify", "userId": "deep", "messageId": "deep-1",
                      "traits": {"t": nested(122)}});
    let single = c.post("/v1/identify", &deep);
    assert_eq!(status_and_code(single), (400, "too_deep".to_owned()));
    let batch = c.post(
        "/v1/batch",
        &json!({"batch": [deep, {"type": "track", "event": "After", "userId": "u1",
                                  "messageId": "after-1"}]}),
    );
    assert_eq!(batch.status(), 200);
    let reply: Value = batch.json().expect("json");
    assert_eq!(reply["accepted"], 1);
    assert_eq!(reply["rejected"][0]["code"], "too_deep");
    // Beyond serde's own limit too: a clean 400, not a crash.
    let deeper = c.post(
        "/v1/track",
        &json!({"event": "E", "userId": "u", "properties": nested(1_000)}),
    );
    assert_eq!(deeper.status(), 400);
    let stored = eventually("the normal event", || {
        let found = c.get("/v1/events?message_id=after-1");
        (found["events"].as_array()?.len() == 1).then_some(found)
    });
    assert_eq!(stored["events"][0]["message"]["event"], "After");
    let profile = c.get("/v1/profiles?identifier=user_id:u1");
    assert_eq!(profile["events"], 1, "the pipeline went on to the profile");
    assert_eq!(c.get("/v1/failed")["failed"], json!([]));
    assert!(
        c.admin(reqwest::Method::GET, "/readyz", None)
            .status()
            .is_success()
    );
}

#[test]
fn a_stage_that_panics_on_one_event_quarantines_it_and_goes_on() {
    let faults = "--faults=stage_panic:Poison";
    let mut c = Collector::start(&["--identity", faults]);
    let mut batch = Vec::new();
    for i in 0..20 {
        batch.push(
            json!({"type": "track", "event": "Fine", "userId": format!("u{i}"),
                          "messageId": format!("fine-{i}")}),
        );
        if i == 7 {
            batch.push(json!({"type": "track", "event": "Poison", "userId": "u7",
                              "messageId": "poison-1"}));
        }
    }
    assert_eq!(
        c.post("/v1/batch", &json!({ "batch": batch })).status(),
        200
    );
    let stats = c.wait_processed();
    assert_eq!(stats["stored"], 20, "{stats}");
    assert_eq!(stats["failed"]["stage_panicked"], 1, "{stats}");
    let failed = c.get("/v1/failed");
    let quarantined = &failed["failed"][0];
    assert_eq!(quarantined["code"], "stage_panicked");
    assert_eq!(quarantined["message"]["messageId"], "poison-1");
    assert!(
        quarantined["reason"]
            .as_str()
            .is_some_and(|r| r.contains("fault injection")),
        "{quarantined}"
    );
    // The quarantined event left no trace in the profile: its effects were undone.
    let profile = c.get("/v1/profiles?identifier=user_id:u7");
    assert_eq!(profile["events"], 1, "{profile}");
    assert!(
        c.metrics()
            .lines()
            .any(|l| l == "kith_events_quarantined_total 1")
    );
    // Replayed once the fault is gone, it is stored, not taken for its own duplicate.
    c.restart(&["--identity"]);
    let replay = c.admin(reqwest::Method::POST, "/v1/failed/replay", Some(&json!({})));
    assert_eq!(replay.status(), 200);
    c.wait_processed();
    let stored = c.get("/v1/events?message_id=poison-1");
    assert_eq!(
        stored["events"].as_array().map(Vec::len),
        Some(1),
        "{stored}"
    );
}

#[test]
fn a_background_thread_that_panics_is_restarted() {
    let c = Collector::start(&[
        "--identity",
        "--faults=thread_panic:pipeline,thread_panic:segments,thread_panic:log-writer",
    ]);
    let metrics = eventually("the restarts to show", || {
        let text = c.metrics();
        ["pipeline", "segments", "log-writer"]
            .iter()
            .all(|t| {
                text.lines()
                    .any(|l| l == format!("kith_thread_restarts_total{{thread=\"{t}\"}} 1"))
            })
            .then_some(text)
    });
    assert!(metrics.contains("kith_thread_up{thread=\"pipeline\"}"));
    eventually("ready again", || {
        c.admin(reqwest::Method::GET, "/readyz", None)
            .status()
            .is_success()
            .then_some(())
    });
    let sent = c.post(
        "/v1/identify",
        &json!({"userId": "after-restart", "traits": {"plan": "pro"}}),
    );
    assert_eq!(sent.status(), 200);
    c.wait_processed();
    let profile = c.get("/v1/profiles?identifier=user_id:after-restart");
    assert_eq!(profile["traits"]["plan"], "pro", "{profile}");
}

#[test]
fn deeply_nested_segment_definitions_are_refused_and_a_restart_works() {
    let mut c = Collector::start(&["--identity"]);
    let post = |c: &Collector, key: &str, definition: String| {
        c.admin(
            reqwest::Method::POST,
            "/v1/segments",
            Some(&json!({"key": key, "definition": definition})),
        )
    };
    for (key, definition) in [
        ("parens", format!("{}has email", "(".repeat(100_000))),
        ("parens_small", format!("{}has email", "(".repeat(10_000))),
        ("nots", format!("{}has email", "not ".repeat(126))),
        (
            "preview",
            format!("{}has email{}", "not (".repeat(60), ")".repeat(60)),
        ),
    ] {
        let (status, code) = status_and_code(post(&c, key, definition));
        assert_eq!(
            (status, code.as_str()),
            (400, "invalid_definition"),
            "{key}"
        );
    }
    let preview = c.admin(
        reqwest::Method::POST,
        "/v1/segments/preview",
        Some(&json!({"definition": format!("{}has email", "not ".repeat(126))})),
    );
    assert_eq!(preview.status(), 400);
    let fine = post(&c, "fine", "traits.plan = \"pro\"".to_owned());
    assert_eq!(fine.status(), 201);
    c.restart(&["--identity"]);
    let listed = c.get("/v1/segments");
    let keys: Vec<&str> = listed["segments"]
        .as_array()
        .expect("segments")
        .iter()
        .filter_map(|s| s["key"].as_str())
        .collect();
    assert_eq!(keys, ["fine"]);
}

/// The collector's peak resident memory so far, from `/proc`.
fn peak_rss_kib(c: &Collector) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{}/status", c.child.id())).expect("status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM")
}

fn import(c: &Collector, query: &str, gzip: bool, body: Vec<u8>) -> Response {
    let mut request = c
        .http
        .post(format!("{}/v1/imports?{query}", c.url))
        .bearer_auth(ADMIN_TOKEN)
        .body(body);
    if gzip {
        request = request.header("content-encoding", "gzip");
    }
    request.send().expect("sent")
}

fn import_report(c: &Collector, accepted: Response) -> Value {
    assert_eq!(accepted.status(), 202);
    let id = accepted.json::<Value>().expect("json")["id"]
        .as_str()
        .expect("id")
        .to_owned();
    eventually("the import to finish", || {
        let report = c.get(&format!("/v1/imports/{id}"));
        (report["status"] != "processing").then_some(report)
    })
}

/// `head`, then `bytes` bytes of `fill`, then `tail`, gzipped.
fn gzipped(head: &[u8], fill: u8, bytes: usize, tail: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    encoder.write_all(head).expect("gzip");
    let chunk = vec![fill; 1 << 20];
    for _ in 0..bytes / chunk.len() {
        encoder.write_all(&chunk).expect("gzip");
    }
    encoder.write_all(tail).expect("gzip");
    encoder.finish().expect("gzip")
}

#[test]
fn imports_need_a_secret_and_read_bombs_in_bounded_memory() {
    let c = Collector::start(&[]);
    let by_write_key = c
        .http
        .post(format!("{}/v1/imports?user_id=id&format=csv", c.url))
        .basic_auth(WRITE_KEY, Some(""))
        .body("id\nu1\n")
        .send()
        .expect("sent");
    assert_eq!(
        status_and_code(by_write_key),
        (401, "unauthorized".to_owned())
    );

    // One 64 MiB NDJSON line in a small gzip, then a good line.
    let bomb = gzipped(
        b"{\"id\": \"x\", \"pad\": \"",
        b'x',
        64 << 20,
        b"\"}\n{\"id\": \"after\"}\n",
    );
    assert!(bomb.len() < 1 << 20, "{} bytes compressed", bomb.len());
    let before = peak_rss_kib(&c);
    let report = import_report(&c, import(&c, "user_id=id&format=ndjson", true, bomb));
    let grown = peak_rss_kib(&c).saturating_sub(before);
    assert_eq!(report["ingested"], 1, "{report}");
    assert_eq!(report["failed"], 1, "{report}");
    assert!(
        report["errors"][0]["message"]
            .as_str()
            .is_some_and(|m| m.contains("longer than")),
        "{report}"
    );
    assert!(
        grown < 32 << 10,
        "peak RSS grew by {grown} KiB reading a 64 MiB line"
    );

    // The same with one huge quoted CSV field.
    let bomb = gzipped(b"id,note\nx,\"", b'x', 64 << 20, b"\"\nafter-csv,ok\n");
    let before = peak_rss_kib(&c);
    let report = import_report(&c, import(&c, "user_id=id&format=csv", true, bomb));
    let grown = peak_rss_kib(&c).saturating_sub(before);
    assert_eq!(
        (report["ingested"].clone(), report["failed"].clone()),
        (json!(1), json!(1)),
        "{report}"
    );
    assert!(
        grown < 32 << 10,
        "peak RSS grew by {grown} KiB reading a 64 MiB CSV field"
    );
    c.wait_processed();
    assert_eq!(
        c.get("/v1/events?user_id=after-csv")["events"]
            .as_array()
            .map(Vec::len),
        Some(1)
    );
}

#[test]
fn the_import_limit_counts_decompressed_bytes_and_sources_have_a_quota() {
    use std::io::Write;
    let c = Collector::start(&["--max-import-bytes", "1000000"]);
    let mut lines = String::new();
    for i in 0..200_000 {
        lines.push_str(&format!("{{\"id\": \"u{i}\"}}\n"));
    }
    let small = gzipped(lines.as_bytes(), b'\n', 0, b"");
    assert!(small.len() < 1_000_000);
    let report = import_report(&c, import(&c, "user_id=id&format=ndjson", true, small));
    assert_eq!(report["status"], "failed", "{report}");
    assert!(
        report["error"]
            .as_str()
            .is_some_and(|e| e.contains("larger than 1000000 bytes")),
        "{report}"
    );

    // Four uploads held open: the fifth is refused until one ends.
    let addr = c.url.trim_start_matches("http://").to_owned();
    let mut held = Vec::new();
    for _ in 0..4 {
        let mut stream = std::net::TcpStream::connect(&addr).expect("connect");
        write!(
            stream,
            "POST /v1/imports?user_id=id&format=csv HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {ADMIN_TOKEN}\r\ncontent-length: 1000\r\n\r\nid\n"
        )
        .expect("write");
        held.push(stream);
    }
    let refused = eventually("the fifth upload refused", || {
        let response = import(&c, "user_id=id&format=csv", false, b"id\nq\n".to_vec());
        (response.status() == 429).then_some(response)
    });
    assert!(refused.headers().contains_key("retry-after"));
    drop(held);
    eventually("uploads taken again", || {
        let response = import(&c, "user_id=id&format=csv", false, b"id\nq2\n".to_vec());
        (response.status() == 202).then_some(())
    });
}

/// Reads from `stream` until the server closes it (or 20 s pass); answers what came.
fn read_until_closed(stream: &mut std::net::TcpStream) -> Option<String> {
    use std::io::Read;
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    let mut answer = Vec::new();
    let mut buffer = [0u8; 4096];
    loop {
        match stream.read(&mut buffer) {
            Ok(0) => return Some(String::from_utf8_lossy(&answer).into_owned()),
            Ok(n) => answer.extend_from_slice(&buffer[..n]),
            Err(error) if error.kind() == std::io::ErrorKind::ConnectionReset => {
                return Some(String::from_utf8_lossy(&answer).into_owned());
            }
            Err(_) => return None,
        }
    }
}

fn connect(c: &Collector) -> std::net::TcpStream {
    std::net::TcpStream::connect(c.url.trim_start_matches("http://")).expect("connect")
}

#[test]
fn half_sent_requests_are_closed_by_the_header_and_body_timeouts() {
    use std::io::Write;
    let c = Collector::start(&["--header-timeout", "1s", "--body-timeout", "1s"]);
    let mut half_sent: Vec<std::net::TcpStream> = (0..300)
        .map(|_| {
            let mut stream = connect(&c);
            stream
                .write_all(
                    b"POST /v1/batch HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n",
                )
                .expect("write");
            stream
        })
        .collect();
    for stream in &mut half_sent {
        assert!(
            read_until_closed(stream).is_some(),
            "a half-sent request was held"
        );
    }
    // Headers sent, the body never finished: 408.
    let mut slow_body = connect(&c);
    write!(
        slow_body,
        "POST /v1/batch HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 1000\r\n\r\n{{\"batch\": ["
    )
    .expect("write");
    let answer = read_until_closed(&mut slow_body).expect("answered");
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    let fine = c.post("/v1/track", &json!({"event": "E", "userId": "u"}));
    assert_eq!(fine.status(), 200);
}

#[test]
fn connections_and_live_tails_are_capped() {
    use std::io::Write;
    let c = Collector::start(&["--max-connections", "8", "--max-live-tails", "2"]);
    // The test's own client keeps one connection alive: 7 more fill the cap.
    assert_eq!(
        c.post("/v1/track", &json!({"event": "E", "userId": "u"}))
            .status(),
        200
    );
    let mut idle: Vec<std::net::TcpStream> = Vec::new();
    for _ in 0..7 {
        let mut stream = connect(&c);
        // A complete request keeps each connection open and proves it was accepted.
        stream
            .write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
            .expect("write");
        let mut first = [0u8; 12];
        std::io::Read::read_exact(&mut stream, &mut first).expect("answered");
        assert_eq!(&first, b"HTTP/1.1 200");
        idle.push(stream);
    }
    let mut over = connect(&c);
    let answer = read_until_closed(&mut over).expect("closed at once");
    assert!(answer.is_empty(), "{answer}");
    drop(idle);
    let metrics = eventually("the cap to free", || {
        let response = c
            .http
            .get(format!("{}/metrics", c.url))
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .ok()?;
        response
            .status()
            .is_success()
            .then(|| response.text().ok())
            .flatten()
    });
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("kith_connections_refused_total ") && !l.ends_with(" 0")),
        "{metrics}"
    );
    let tail = |c: &Collector| {
        c.http
            .get(format!("{}/v1/events/live", c.url))
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .expect("sent")
    };
    let open = [tail(&c), tail(&c)];
    assert!(open.iter().all(|t| t.status() == 200));
    assert_eq!(tail(&c).status(), 429, "a third live tail");
    drop(open);
    eventually("a live tail place again", || {
        (tail(&c).status() == 200).then_some(())
    });
}

#[test]
fn a_nearly_full_disk_answers_503_and_recovers_when_space_returns() {
    use fs4::FileExt;
    let dir = tempfile::tempdir().expect("tempdir");
    let free = fs4::available_space(dir.path()).expect("free space");
    // The watermark 256 MiB under today's free space; a 768 MiB file crosses it.
    let watermark = free.saturating_sub(256 << 20);
    let c = Collector::start_in(dir, &["--min-free-disk", &watermark.to_string()]);
    let track = |c: &Collector, id: &str| {
        c.post(
            "/v1/track",
            &json!({"event": "E", "userId": "u", "messageId": id}),
        )
    };
    assert_eq!(track(&c, "before").status(), 200);
    let filler_path = c.dir.path().join("filler");
    let filler = std::fs::File::create(&filler_path).expect("filler");
    filler.allocate(768 << 20).expect("allocate");
    let mut attempt = 0;
    let refused = eventually("ingest refused", || {
        attempt += 1;
        let response = track(&c, &format!("while-full-{attempt}"));
        (response.status() == 503).then_some(response)
    });
    let refused_id = format!("while-full-{attempt}");
    assert!(refused.headers().contains_key("retry-after"));
    let upload = import(&c, "user_id=id&format=csv", false, b"id\nx\n".to_vec());
    assert_eq!(upload.status(), 503);
    drop(filler);
    std::fs::remove_file(&filler_path).expect("remove");
    eventually("ingest again", || {
        (track(&c, "after").status() == 200).then_some(())
    });
    c.wait_processed();
    for (id, stored) in [("before", 1), (refused_id.as_str(), 0), ("after", 1)] {
        let found = c.get(&format!("/v1/events?message_id={id}"));
        assert_eq!(
            found["events"].as_array().map(Vec::len),
            Some(stored),
            "{id}"
        );
    }
}

/// A local HTTP server that records the path and headers of every request it gets and
/// answers `status`, with a `Location` when one is given.
struct Spy {
    addr: std::net::SocketAddr,
    hits: Arc<Mutex<Vec<Hit>>>,
}

/// A request a [`Spy`] got: its path and header names.
type Hit = (String, Vec<String>);

impl Spy {
    fn start(status: u16, location: Option<String>) -> Self {
        Self::slow(status, location, Duration::ZERO)
    }

    fn slow(status: u16, location: Option<String>, delay: Duration) -> Self {
        let hits = Arc::new(Mutex::new(Vec::new()));
        let seen = hits.clone();
        let addr = common::serve(move |_| {
            axum::Router::new().fallback(move |request: axum::extract::Request| {
                let seen = seen.clone();
                let location = location.clone();
                async move {
                    let headers = request
                        .headers()
                        .keys()
                        .map(|k| k.as_str().to_owned())
                        .collect();
                    seen.lock()
                        .expect("hits")
                        .push((request.uri().path().to_owned(), headers));
                    tokio::time::sleep(delay).await;
                    let mut response = axum::http::Response::builder().status(status);
                    if let Some(location) = location {
                        response = response.header("location", location);
                    }
                    response.body(axum::body::Body::empty()).expect("response")
                }
            })
        });
        Spy { addr, hits }
    }

    fn hits(&self) -> Vec<Hit> {
        self.hits.lock().expect("hits").clone()
    }
}

fn create(c: &Collector, path: &str, body: Value) -> Response {
    c.admin(reqwest::Method::POST, path, Some(&body))
}

/// A VAPID key, as the API takes it (a base64url P-256 scalar).
fn vapid_key() -> String {
    use base64::Engine as _;
    let key = p256::ecdsa::SigningKey::random(&mut rand_core::OsRng);
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(key.to_bytes())
}

#[test]
fn outbound_requests_to_private_addresses_are_refused() {
    let c = Collector::start(&["--identity"]);
    let spy = Spy::start(200, None);
    let port = spy.addr.port();
    for url in [
        format!("http://127.0.0.1:{port}/hook"),
        "http://10.0.0.1/hook".to_owned(),
        "http://169.254.169.254/latest/meta-data/".to_owned(),
        format!("http://[::1]:{port}/hook"),
        format!("http://localhost:{port}/hook"),
        format!("http://[::ffff:127.0.0.1]:{port}/hook"),
    ] {
        let refused = create(
            &c,
            "/v1/destinations",
            json!({"type": "webhook", "url": url, "secret": "s"}),
        );
        assert_eq!(
            status_and_code(refused),
            (400, "refused_destination".to_owned()),
            "{url}"
        );
    }
    let apns_key = p256::ecdsa::SigningKey::random(&mut rand_core::OsRng);
    let pem =
        p256::pkcs8::EncodePrivateKey::to_pkcs8_pem(&apns_key, Default::default()).expect("pem");
    let refused = create(
        &c,
        "/v1/destinations",
        json!({"type": "apns", "team_id": "T", "key_id": "K", "private_key": pem.as_str(),
               "topic": "app", "base_url": format!("https://127.0.0.1:{port}")}),
    );
    assert_eq!(
        status_and_code(refused),
        (400, "refused_destination".to_owned())
    );

    // Web Push subscriptions arrive in public events: one pointing inside is never kept.
    let destination: Value = create(
        &c,
        "/v1/destinations",
        json!({"type": "web_push", "vapid_private_key": vapid_key(), "subject": "mailto:ops@example.com"}),
    )
    .json()
    .expect("json");
    let created = create(
        &c,
        "/v1/segments",
        json!({"key": "all", "definition": "has user_id"}),
    );
    assert_eq!(created.status(), 201);
    let campaign = create(
        &c,
        "/v1/campaigns",
        json!({"name": "hi", "trigger": {"type": "segment_entered", "segment": "all"},
               "destination": destination["id"], "template": {"title": "Hi"}}),
    );
    assert_eq!(campaign.status(), 201);
    let endpoints = [
        format!("http://127.0.0.1:{port}/internal-service/admin/delete"),
        format!("https://127.0.0.1:{port}/internal"),
        "https://169.254.169.254/latest/meta-data/".to_owned(),
        "https://10.1.2.3/push".to_owned(),
        format!("https://[::1]:{port}/push"),
        "http://updates.example.com/push".to_owned(),
    ];
    let events: Vec<Value> = endpoints
        .iter()
        .enumerate()
        .map(|(i, endpoint)| {
            let subscription = json!({"endpoint": endpoint, "keys": {"p256dh": "x", "auth": "y"}});
            json!({"type": "identify", "userId": format!("victim-{i}"),
                   "context": {"device": {"token": subscription.to_string(), "tokenProvider": "webpush"}}})
        })
        .collect();
    assert_eq!(
        c.post("/v1/batch", &json!({ "batch": events })).status(),
        200
    );
    c.wait_processed();
    for (i, endpoint) in endpoints.iter().enumerate() {
        let profile = c.get(&format!("/v1/profiles?identifier=user_id:victim-{i}"));
        let id = profile["id"].as_str().expect("id");
        let tokens = c.get(&format!("/v1/profiles/{id}/push-tokens"));
        assert_eq!(tokens["tokens"], json!([]), "{endpoint}");
    }
    let skipped = eventually("the deliveries to be skipped", || {
        let deliveries = c.get("/v1/deliveries?state=skipped");
        (deliveries["deliveries"].as_array()?.len() == endpoints.len()).then_some(deliveries)
    });
    assert!(
        skipped["deliveries"][0]["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("no push token"))
    );
    assert_eq!(spy.hits(), Vec::new(), "nothing reached the local server");
}

#[test]
fn signed_requests_do_not_follow_redirects() {
    let c = Collector::start(&["--identity", "--allow-private-destinations"]);
    let target = Spy::start(200, None);
    let redirector = Spy::start(307, Some(format!("http://{}/stolen", target.addr)));
    let destination: Value = create(
        &c,
        "/v1/destinations",
        json!({"type": "webhook", "url": format!("http://{}/hook", redirector.addr), "secret": "s"}),
    )
    .json()
    .expect("json");
    create(
        &c,
        "/v1/segments",
        json!({"key": "all", "definition": "has user_id"}),
    );
    let campaign = create(
        &c,
        "/v1/campaigns",
        json!({"name": "hi", "trigger": {"type": "segment_entered", "segment": "all"},
               "destination": destination["id"], "template": {"title": "Hi"}}),
    );
    assert_eq!(campaign.status(), 201);
    assert_eq!(
        c.post("/v1/identify", &json!({"userId": "u1"})).status(),
        200
    );
    let dead = eventually("the delivery to fail", || {
        let deliveries = c.get("/v1/deliveries?state=dead");
        deliveries["deliveries"].as_array()?.first().cloned()
    });
    assert!(
        dead["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("307")),
        "{dead}"
    );
    let hits = redirector.hits();
    assert_eq!(hits.len(), 1, "{hits:?}");
    assert!(hits[0].1.iter().any(|h| h == "kith-signature"));
    assert_eq!(target.hits(), Vec::new(), "the redirect was not followed");
}

#[test]
fn a_slow_destination_does_not_hold_up_the_others() {
    let c = Collector::start(&["--identity", "--allow-private-destinations"]);
    let slow = Spy::slow(200, None, Duration::from_secs(3));
    let fast = Spy::start(200, None);
    create(
        &c,
        "/v1/segments",
        json!({"key": "all", "definition": "has user_id"}),
    );
    for spy in [&slow, &fast] {
        let destination: Value = create(
            &c,
            "/v1/destinations",
            json!({"type": "webhook", "url": format!("http://{}/hook", spy.addr), "secret": "s"}),
        )
        .json()
        .expect("json");
        let campaign = create(
            &c,
            "/v1/campaigns",
            json!({"name": "hi", "trigger": {"type": "segment_entered", "segment": "all"},
                   "destination": destination["id"], "template": {"title": "Hi"}}),
        );
        assert_eq!(campaign.status(), 201);
    }
    let users: Vec<Value> = (0..10)
        .map(|i| json!({"type": "identify", "userId": format!("u{i}")}))
        .collect();
    assert_eq!(
        c.post("/v1/batch", &json!({ "batch": users })).status(),
        200
    );
    eventually("every delivery to the fast destination", || {
        (fast.hits().len() == 10).then_some(())
    });
    assert!(
        slow.hits().len() <= 2,
        "at most two requests to the slow destination in flight: {}",
        slow.hits().len()
    );
}

/// Starts the real binary with no credentials given, so that it generates them; answers
/// the child, its URL and the lines it printed before listening.
fn spawn_generating(data: &Path, key_file: &Path) -> (Child, String, Vec<String>) {
    use std::io::BufRead;
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_kith-collector"))
        // Private destinations allowed: the example hosts need no DNS then.
        .args([
            "--listen",
            "127.0.0.1:0",
            "--identity",
            "--allow-private-destinations",
        ])
        .arg("--data-dir")
        .arg(data)
        .arg("--secret-key-file")
        .arg(key_file)
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("starts");
    let stdout = child.stdout.take().expect("stdout");
    let mut lines = std::io::BufReader::new(stdout).lines();
    let mut printed = Vec::new();
    for line in lines.by_ref() {
        let line = line.expect("line");
        if let Some(url) = line.strip_prefix("listening on ") {
            let url = url.to_owned();
            std::thread::spawn(move || lines.for_each(drop));
            return (child, url, printed);
        }
        printed.push(line);
    }
    let status = child.wait();
    panic!("the collector exited ({status:?}): {printed:?}");
}

/// Every file under `dir`, recursively.
fn files(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).expect("read dir") {
        let path = entry.expect("entry").path();
        if path.is_dir() {
            found.extend(files(&path));
        } else {
            found.push(path);
        }
    }
    found
}

#[test]
fn secrets_are_sealed_at_rest_and_the_token_printed_once() {
    const FCM_KEY: &str = include_str!("fixtures/fcm-service-account-key.pem");
    let data = tempfile::tempdir().expect("tempdir");
    let keys = tempfile::tempdir().expect("tempdir");
    let key_file = keys.path().join("kith.key");
    let (mut child, url, printed) = spawn_generating(data.path(), &key_file);
    let value_after = |prefix: &str| {
        printed
            .iter()
            .find_map(|l| l.strip_prefix(prefix))
            .and_then(|rest| rest.split_whitespace().next())
            .map(str::to_owned)
            .unwrap_or_else(|| panic!("no {prefix:?} in {printed:?}"))
    };
    let write_key = value_after("write key: ");
    let admin_token = value_after("admin token: ");
    let http = Client::new();
    let create = |body: Value| {
        let response = http
            .post(format!("{url}/v1/destinations"))
            .bearer_auth(&admin_token)
            .json(&body)
            .send()
            .expect("sent");
        assert_eq!(response.status(), 201, "{body}");
        response.json::<Value>().expect("json")
    };
    let apns_key = p256::ecdsa::SigningKey::random(&mut rand_core::OsRng);
    let apns_pem = p256::pkcs8::EncodePrivateKey::to_pkcs8_pem(&apns_key, Default::default())
        .expect("pem")
        .to_string();
    let vapid = vapid_key();
    let account = json!({"type": "service_account", "project_id": "p", "private_key_id": "k",
        "private_key": FCM_KEY, "client_email": "kith@p.iam.gserviceaccount.com",
        "token_uri": "https://oauth2.googleapis.com/token"});
    let webhook = create(
        json!({"type": "webhook", "url": "https://hooks.example.com/x",
                                "secret": "whsec-very-secret-value"}),
    );
    create(json!({"type": "fcm", "service_account": account}));
    create(
        json!({"type": "apns", "team_id": "T", "key_id": "K", "private_key": apns_pem,
                  "topic": "app"}),
    );
    let push = create(json!({"type": "web_push", "vapid_private_key": vapid,
                             "subject": "mailto:ops@example.com"}));
    create(
        json!({"type": "audience_export", "url": "https://upload.example.com/",
                  "secret": "export-signing-secret"}),
    );
    assert_eq!(webhook["secret"], "(set)");
    child.kill().expect("kill");
    child.wait().expect("wait");

    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(data.path())
            .expect("meta")
            .permissions()
            .mode();
        assert_eq!(
            mode & 0o777,
            0o700,
            "the data directory is the collector's alone"
        );
    }
    // The key bodies' lines, not just whole values: no piece of a secret is in clear.
    let pem_lines = |pem: &str| -> Vec<String> {
        pem.lines()
            .filter(|l| !l.starts_with("-----") && l.len() > 20)
            .map(str::to_owned)
            .collect()
    };
    let mut secrets = vec![
        write_key.clone(),
        admin_token.clone(),
        "whsec-very-secret-value".to_owned(),
        "export-signing-secret".to_owned(),
        vapid.clone(),
    ];
    secrets.extend(pem_lines(FCM_KEY));
    secrets.extend(pem_lines(&apns_pem));
    for file in files(data.path()) {
        let bytes = std::fs::read(&file).expect("read");
        for secret in &secrets {
            assert!(
                !bytes.windows(secret.len()).any(|w| w == secret.as_bytes()),
                "{} holds a secret in clear",
                file.display()
            );
        }
    }

    // After a restart the sealed secrets open again, and the token is not printed.
    let (mut child, url, printed) = spawn_generating(data.path(), &key_file);
    assert!(
        !printed.iter().any(|l| l.contains(&admin_token)),
        "{printed:?}"
    );
    let shown: Value = http
        .get(format!(
            "{url}/v1/destinations/{}",
            push["id"].as_str().expect("id")
        ))
        .bearer_auth(&admin_token)
        .send()
        .expect("sent")
        .json()
        .expect("json");
    assert_eq!(
        shown["vapid_public_key"], push["vapid_public_key"],
        "{shown}"
    );
    let ingest = http
        .post(format!("{url}/v1/track"))
        .basic_auth(&write_key, Some(""))
        .json(&json!({"event": "E", "userId": "u"}))
        .send()
        .expect("sent");
    assert_eq!(ingest.status(), 200);
    child.kill().expect("kill");
    child.wait().expect("wait");
}

#[test]
fn erasing_a_person_leaves_no_trace_in_any_store_and_fires_no_campaign() {
    let c = Collector::start(&["--identity", "--allow-private-destinations"]);
    let spy = Spy::start(200, None);
    create(
        &c,
        "/v1/segments",
        json!({"key": "pro", "definition": "traits.plan = \"pro\""}),
    );
    let hook: Value = create(
        &c,
        "/v1/destinations",
        json!({"type": "webhook", "url": format!("http://{}/hook", spy.addr), "secret": "s"}),
    )
    .json()
    .expect("json");
    for trigger in ["segment_entered", "segment_exited"] {
        let campaign = create(
            &c,
            "/v1/campaigns",
            json!({"name": trigger, "trigger": {"type": trigger, "segment": "pro"},
                   "destination": hook["id"], "template": {"who": "{{traits.email}}"}}),
        );
        assert_eq!(campaign.status(), 201);
    }
    let export: Value = create(
        &c,
        "/v1/destinations",
        json!({"type": "audience_export", "directory": "audiences"}),
    )
    .json()
    .expect("json");
    let batch = json!({"batch": [
        {"type": "identify", "userId": "ann", "traits": {"plan": "pro", "email": "ann@example.com"},
         "context": {"device": {"token": "fcm-token-ann"}}},
        {"type": "track", "userId": "ann", "event": "Viewed"},
        {"type": "track", "userId": "ann", "event": "Bad", "context": {"traits": {"email": "not-an-email"}}},
        {"type": "identify", "userId": "bo", "traits": {"plan": "pro", "email": "bo@example.com"}}
    ]});
    assert_eq!(c.post("/v1/batch", &batch).status(), 200);
    c.wait_processed();
    eventually("both entries delivered", || {
        (spy.hits().len() == 2).then_some(())
    });
    let exported = c.admin(
        reqwest::Method::POST,
        &format!(
            "/v1/destinations/{}/export",
            export["id"].as_str().expect("id")
        ),
        Some(&json!({"segment": "pro"})),
    );
    let exported: Value = exported.json().expect("json");
    let file = exported["file"].as_str().expect("file").to_owned();
    assert_eq!(
        std::fs::read_to_string(&file).expect("csv").lines().count(),
        3
    );
    let ann = c.get("/v1/profiles?identifier=user_id:ann");
    let ann_id = ann["id"].as_str().expect("id").to_owned();
    assert_eq!(
        c.get("/v1/failed")["failed"].as_array().map(Vec::len),
        Some(1)
    );

    let erased = c.admin(
        reqwest::Method::DELETE,
        &format!("/v1/profiles/{ann_id}"),
        None,
    );
    assert_eq!(erased.status(), 200);
    let report: Value = erased.json().expect("json");
    let removed = &report["removed"];
    // The identify, the track, and the timeline's "Webhook Delivered".
    assert_eq!(removed["events"], 3, "{report}");
    assert_eq!(removed["failed_events"], 1, "{report}");
    assert_eq!(removed["push_tokens"], 1, "{report}");
    assert_eq!(removed["export_rows"], 1, "{report}");
    assert!(removed["deliveries"].as_u64() >= Some(1), "{report}");
    assert!(
        removed["membership_history"].as_u64() >= Some(1),
        "{report}"
    );

    // Gone from every API.
    let gone = c.admin(
        reqwest::Method::GET,
        &format!("/v1/profiles/{ann_id}"),
        None,
    );
    assert_eq!(gone.status(), 404);
    assert_eq!(c.get("/v1/events?user_id=ann")["events"], json!([]));
    assert_eq!(c.get("/v1/failed")["failed"], json!([]));
    let deliveries = c.get("/v1/deliveries?limit=1000");
    assert!(
        deliveries["deliveries"]
            .as_array()
            .expect("deliveries")
            .iter()
            .all(|d| d["profile_id"] != ann_id.as_str()),
        "{deliveries}"
    );
    let changes = c.get(&format!("/v1/membership-changes?profile_id={ann_id}"));
    let kinds: Vec<(&str, &str)> = changes["changes"]
        .as_array()
        .expect("changes")
        .iter()
        .map(|ch| {
            (
                ch["type"].as_str().unwrap_or(""),
                ch["cause"].as_str().unwrap_or(""),
            )
        })
        .collect();
    assert_eq!(kinds, [("exited", "erased")], "{changes}");
    let csv = std::fs::read_to_string(&file).expect("csv");
    assert_eq!(csv.lines().count(), 2, "the header and bo's row: {csv}");
    let everything = serde_json::to_string(&[
        c.get("/v1/events?limit=1000"),
        c.get("/v1/deliveries?limit=1000"),
        c.get("/v1/membership-changes?limit=1000"),
        c.get("/v1/failed"),
    ])
    .expect("json");
    assert!(!everything.contains("ann@example.com") && !everything.contains("\"ann\""));

    // No campaign fired for the erased person's exit: bo's exit arrives alone.
    assert_eq!(
        c.post(
            "/v1/identify",
            &json!({"userId": "bo", "traits": {"plan": "free"}})
        )
        .status(),
        200
    );
    eventually("bo's exit delivered", || {
        (spy.hits().len() >= 3).then_some(())
    });
    let delivered = c.get("/v1/deliveries?state=delivered");
    assert_eq!(
        delivered["deliveries"].as_array().map(Vec::len),
        Some(2),
        "{delivered}"
    );
    assert_eq!(spy.hits().len(), 3);

    // Suppression keeps working.
    assert_eq!(
        c.post(
            "/v1/identify",
            &json!({"userId": "ann", "traits": {"plan": "pro"}})
        )
        .status(),
        200
    );
    let stats = c.wait_processed();
    assert_eq!(stats["dropped"]["suppressed"], 1, "{stats}");
}

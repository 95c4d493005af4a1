//! The engine driven by the native uploader over real HTTP, against a local server that
//! injects faults: 500s, 429 with Retry-After, 413, timeouts, connection refused, and a
//! server that commits a batch but drops the response. Each test checks what was sent,
//! when, and the final accounting.

use std::collections::{HashSet, VecDeque};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kith_sdk_core::engine::{CaptureOptions, Config, Engine, Stats};
use kith_sdk_core::native::{Client, HttpTransport};
use kith_sdk_core::protocol::Map;
use kith_sdk_core::queue::MemoryStore;
use kith_sdk_core::retry::RetryPolicy;
use serde_json::Value;

#[derive(Debug, Clone)]
enum Behavior {
    Status(u16, Option<u64>),
    /// Answer 200, but only after this long.
    Hang(Duration),
    /// Take the batch (committed), then close the connection without an answer.
    CommitAndDrop,
}

#[derive(Debug, Clone)]
struct Received {
    at: Instant,
    ids: Vec<String>,
    authorization: String,
}

struct FakeCollector {
    addr: SocketAddr,
    received: Arc<Mutex<Vec<Received>>>,
    stop: Arc<AtomicBool>,
}

impl FakeCollector {
    fn start(script: Vec<Behavior>) -> Self {
        Self::start_on(TcpListener::bind("127.0.0.1:0").expect("bind"), script)
    }

    fn start_on(listener: TcpListener, script: Vec<Behavior>) -> Self {
        let addr = listener.local_addr().expect("addr");
        let received = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let script = Arc::new(Mutex::new(VecDeque::from(script)));
        let (log, stopping) = (received.clone(), stop.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                if stopping.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(stream) = stream else { continue };
                let (log, script) = (log.clone(), script.clone());
                std::thread::spawn(move || serve(stream, &log, &script));
            }
        });
        FakeCollector {
            addr,
            received,
            stop,
        }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn received(&self) -> Vec<Received> {
        self.received.lock().expect("lock").clone()
    }
}

impl Drop for FakeCollector {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(self.addr);
    }
}

fn serve(stream: TcpStream, log: &Mutex<Vec<Received>>, script: &Mutex<VecDeque<Behavior>>) {
    let mut reader = BufReader::new(stream.try_clone().expect("clone"));
    let mut length = 0;
    let mut authorization = String::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        let lower = line.to_ascii_lowercase();
        if let Some(v) = lower.strip_prefix("content-length:") {
            length = v.trim().parse().unwrap_or(0);
        }
        if lower.starts_with("authorization:") {
            authorization = line["authorization:".len()..].trim().to_owned();
        }
    }
    let mut body = vec![0; length];
    if reader.read_exact(&mut body).is_err() {
        return;
    }
    let parsed: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let ids = parsed["batch"]
        .as_array()
        .map(|b| {
            b.iter()
                .filter_map(|e| e["messageId"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    log.lock().expect("lock").push(Received {
        at: Instant::now(),
        ids,
        authorization,
    });
    let behavior = script
        .lock()
        .expect("lock")
        .pop_front()
        .unwrap_or(Behavior::Status(200, None));
    let mut stream = stream;
    let (status, retry_after) = match behavior {
        Behavior::Status(status, retry_after) => (status, retry_after),
        Behavior::Hang(wait) => {
            std::thread::sleep(wait);
            (200, None)
        }
        Behavior::CommitAndDrop => {
            let _ = stream.shutdown(std::net::Shutdown::Both);
            return;
        }
    };
    let body = r#"{"success":true}"#;
    let retry = retry_after
        .map(|s| format!("Retry-After: {s}\r\n"))
        .unwrap_or_default();
    let _ = write!(
        stream,
        "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\n{retry}Connection: close\r\n\r\n{body}",
        body.len()
    );
}

fn client(endpoint: &str, timeout: Duration) -> Arc<Client> {
    client_with_interval(endpoint, timeout, Duration::from_millis(20))
}

fn client_with_interval(endpoint: &str, timeout: Duration, interval: Duration) -> Arc<Client> {
    let mut config = Config::new("test-key", endpoint);
    config.max_batch_events = 5;
    config.flush_interval = interval;
    config.retry = RetryPolicy {
        initial: Duration::from_millis(100),
        max: Duration::from_millis(400),
        pause: Duration::from_secs(60),
    };
    let engine = Engine::open(Box::new(MemoryStore::new()), config).expect("engine");
    Client::start(
        engine,
        Arc::new(HttpTransport::new(timeout).expect("transport")),
    )
    .expect("client")
}

fn capture(client: &Client, n: usize) -> Vec<String> {
    (0..n)
        .map(|i| {
            let mut properties = Map::new();
            properties.insert("i".into(), Value::from(i));
            client
                .track("Tested", properties, CaptureOptions::default())
                .expect("captured")
        })
        .collect()
}

fn wait_for(client: &Client, what: &str, done: impl Fn(&Stats) -> bool) -> Stats {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let stats = client.stats();
        if done(&stats) {
            return stats;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}: {stats:?}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn delivered(n: u64) -> impl Fn(&Stats) -> bool {
    move |s| s.delivered == n && s.pending == 0
}

fn gaps(received: &[Received]) -> Vec<Duration> {
    received.windows(2).map(|w| w[1].at - w[0].at).collect()
}

#[test]
fn server_errors_are_retried_with_backoff_until_delivered() {
    let server = FakeCollector::start(vec![
        Behavior::Status(500, None),
        Behavior::Status(503, None),
    ]);
    let client = client(&server.url(), Duration::from_secs(5));
    let ids = capture(&client, 5);
    let stats = wait_for(&client, "delivery", delivered(5));
    assert_eq!(stats.failures, 0, "a success resets the backoff");
    let received = server.received();
    assert_eq!(received.len(), 3);
    assert!(
        received.iter().all(|r| r.ids == ids),
        "the same batch each time"
    );
    assert!(
        gaps(&received)
            .iter()
            .all(|g| *g >= Duration::from_millis(100)),
        "{:?}",
        gaps(&received)
    );
    assert_eq!(received[0].authorization, "Basic dGVzdC1rZXk6");
    client.shutdown(Duration::from_secs(1));
}

#[test]
fn retry_after_is_honoured() {
    let server = FakeCollector::start(vec![Behavior::Status(429, Some(1))]);
    let client = client(&server.url(), Duration::from_secs(5));
    capture(&client, 5);
    wait_for(&client, "delivery", delivered(5));
    let received = server.received();
    assert_eq!(received.len(), 2);
    assert!(
        gaps(&received)[0] >= Duration::from_secs(1),
        "{:?}",
        gaps(&received)
    );
    client.shutdown(Duration::from_secs(1));
}

#[test]
fn a_413_splits_the_batch() {
    let server = FakeCollector::start(vec![Behavior::Status(413, None)]);
    let client = client(&server.url(), Duration::from_secs(5));
    let ids = capture(&client, 5);
    wait_for(&client, "delivery", delivered(5));
    let sizes: Vec<usize> = server.received().iter().map(|r| r.ids.len()).collect();
    assert_eq!(sizes, [5, 2, 3]);
    let sent: Vec<String> = server.received()[1..]
        .iter()
        .flat_map(|r| r.ids.clone())
        .collect();
    assert_eq!(sent, ids, "in order, each once after the split");
    client.shutdown(Duration::from_secs(1));
}

#[test]
fn a_timeout_is_retried_and_the_duplicate_is_harmless() {
    let server = FakeCollector::start(vec![Behavior::Hang(Duration::from_millis(1500))]);
    let client = client(&server.url(), Duration::from_millis(300));
    let ids = capture(&client, 5);
    let stats = wait_for(&client, "delivery", delivered(5));
    let received = server.received();
    assert_eq!(received.len(), 2, "one timed out, one delivered");
    assert!(received.iter().all(|r| r.ids == ids));
    assert_eq!(stats.captured, 5);
    assert!(stats.dropped.is_empty());
    client.shutdown(Duration::from_secs(1));
}

#[test]
fn refused_connections_back_off_without_a_storm_then_deliver() {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    drop(listener); // nothing listens: connections are refused
    let client = client(&format!("http://{addr}"), Duration::from_secs(5));
    capture(&client, 12);
    let outage = Instant::now();
    wait_for(&client, "three failures", |s| s.failures >= 3);
    std::thread::sleep(Duration::from_millis(600));
    let failures = client.stats().failures;
    let elapsed = outage.elapsed();
    assert!(
        u128::from(failures) <= elapsed.as_millis() / 100 + 1,
        "at most one attempt per 100 ms backoff: {failures} in {elapsed:?}"
    );
    let server = FakeCollector::start_on(TcpListener::bind(addr).expect("rebind"), Vec::new());
    let stats = wait_for(&client, "delivery", delivered(12));
    assert_eq!(stats.captured, 12);
    let sizes: Vec<usize> = server.received().iter().map(|r| r.ids.len()).collect();
    assert_eq!(sizes.iter().sum::<usize>(), 12);
    client.shutdown(Duration::from_secs(1));
}

#[test]
fn a_committed_batch_whose_answer_is_lost_is_resent_and_counted_once() {
    let server = FakeCollector::start(vec![Behavior::CommitAndDrop]);
    let client = client(&server.url(), Duration::from_secs(5));
    let ids = capture(&client, 5);
    let stats = wait_for(&client, "delivery", delivered(5));
    let received = server.received();
    assert_eq!(received.len(), 2);
    assert_eq!(
        received[0].ids, received[1].ids,
        "resent with the same messageIds"
    );
    let distinct: HashSet<&String> = received.iter().flat_map(|r| &r.ids).collect();
    assert_eq!(
        distinct.len(),
        ids.len(),
        "the collector can deduplicate by messageId"
    );
    assert_eq!((stats.captured, stats.delivered), (5, 5));
    client.shutdown(Duration::from_secs(1));
}

#[test]
fn shutdown_flushes_what_is_queued() {
    let server = FakeCollector::start(Vec::new());
    // An hour-long interval: only the shutdown's flush sends these three.
    let client = client_with_interval(
        &server.url(),
        Duration::from_secs(5),
        Duration::from_secs(3600),
    );
    let ids = capture(&client, 3);
    assert!(server.received().is_empty());
    client.shutdown(Duration::from_secs(5));
    let stats = client.stats();
    assert_eq!((stats.delivered, stats.pending), (3, 0));
    let sent: Vec<String> = server
        .received()
        .iter()
        .flat_map(|r| r.ids.clone())
        .collect();
    assert_eq!(sent, ids);
}

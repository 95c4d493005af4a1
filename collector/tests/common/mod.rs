//! Helpers shared by the collector's integration tests: a collector on port 0 and a
//! blocking HTTP client that speaks to it.

#![allow(dead_code)]

use std::io::Write;
use std::time::{Duration, Instant};

use kith_collector::{Config, Running};
use reqwest::blocking::{Client, RequestBuilder, Response};
use serde_json::Value;

pub const WRITE_KEY: &str = "test-write-key";
pub const ADMIN_TOKEN: &str = "test-admin-token";

/// Serves the app `make` builds for its own address on 127.0.0.1, port 0, from its own
/// thread and runtime: the local stand-ins for webhook receivers and push services.
pub fn serve(make: impl FnOnce(std::net::SocketAddr) -> axum::Router) -> std::net::SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.set_nonblocking(true).expect("nonblocking");
    let addr = listener.local_addr().expect("addr");
    let app = make(addr);
    std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
            .block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
                axum::serve(listener, app).await.expect("serve");
            });
    });
    addr
}

/// A collector on a fresh data directory, with fixed credentials.
pub struct Harness {
    pub dir: tempfile::TempDir,
    pub collector: Running,
    pub http: Client,
}

pub fn config(dir: &std::path::Path) -> Config {
    let mut config = Config::for_data_dir(dir);
    config.write_keys = vec![WRITE_KEY.to_owned()];
    config.admin_token = Some(ADMIN_TOKEN.to_owned());
    // The tests' webhook receivers and push services listen on 127.0.0.1.
    config.allow_private_destinations = true;
    config
}

impl Harness {
    pub fn start() -> Self {
        Self::start_with(|_| {})
    }

    pub fn start_with(change: impl FnOnce(&mut Config)) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut config = config(dir.path());
        change(&mut config);
        let collector = Running::start(&config).expect("collector starts");
        Harness {
            dir,
            collector,
            http: Client::new(),
        }
    }

    /// POSTs `body` to an admin path, expects a 201, answers the JSON.
    pub fn create(&self, path: &str, body: Value) -> Value {
        let response = self.admin_send(reqwest::Method::POST, path, &body);
        assert_eq!(response.status(), 201, "{path} {body}");
        response.json().expect("json")
    }

    /// The outbox's deliveries matching a query (`state=delivered`...).
    pub fn deliveries(&self, query: &str) -> Vec<Value> {
        let body: Value = self
            .admin_get(&format!("/v1/deliveries?{query}"))
            .json()
            .expect("json");
        body["deliveries"].as_array().expect("deliveries").clone()
    }

    /// Stops the collector gracefully and starts a new one on the same data directory.
    pub fn restart(&mut self, change: impl FnOnce(&mut Config)) {
        self.collector.shutdown().expect("collector stops");
        let mut config = config(self.dir.path());
        change(&mut config);
        self.collector = Running::start(&config).expect("collector restarts");
    }

    /// A collector with identity resolution on.
    pub fn with_identity() -> Self {
        Self::start_with(|config| config.identity = true)
    }

    /// Posts `events` as one batch, expects a 200, and waits until the pipeline has
    /// processed them.
    pub fn send_batch(&self, events: Value) {
        let response = self.post_json("/v1/batch", &serde_json::json!({"batch": events}));
        assert_eq!(response.status(), 200);
        self.wait_processed();
    }

    pub fn url(&self, path: &str) -> String {
        self.collector.url(path)
    }

    /// A POST authenticated with the write key as Basic user.
    pub fn post(&self, path: &str) -> RequestBuilder {
        self.http
            .post(self.url(path))
            .basic_auth(WRITE_KEY, Some(""))
    }

    pub fn post_json(&self, path: &str, body: &Value) -> Response {
        self.post(path)
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .expect("request sent")
    }

    pub fn admin_get(&self, path_and_query: &str) -> Response {
        self.http
            .get(self.url(path_and_query))
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .expect("request sent")
    }

    /// An admin request with a JSON body.
    pub fn admin_send(&self, method: reqwest::Method, path: &str, body: &Value) -> Response {
        self.http
            .request(method, self.url(path))
            .bearer_auth(ADMIN_TOKEN)
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .expect("request sent")
    }

    pub fn stats(&self) -> Value {
        self.admin_get("/v1/stats").json().expect("stats json")
    }

    /// Waits until the pipeline has processed everything accepted.
    pub fn wait_processed(&self) -> Value {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let stats = self.stats();
            if stats["pending"] == 0 {
                return stats;
            }
            assert!(
                Instant::now() < deadline,
                "pipeline did not catch up: {stats}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Stored events matching the query (`user_id=u1`...), newest first.
    pub fn events(&self, query: &str) -> Vec<Value> {
        self.wait_processed();
        let body: Value = self
            .admin_get(&format!("/v1/events?{query}"))
            .json()
            .expect("events json");
        body["events"].as_array().expect("events array").clone()
    }
}

/// Polls `check` until it answers something, failing the test after 30 s with `what`.
pub fn eventually<T>(what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(found) = check() {
            return found;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

pub fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    encoder.write_all(bytes).expect("gzip");
    encoder.finish().expect("gzip")
}

/// The `{"error": {"code": ...}}` code of an error response, with its status.
pub fn error_code(response: Response) -> (u16, String) {
    let status = response.status().as_u16();
    let body: Value = response.json().expect("error body is JSON");
    let code = body["error"]["code"]
        .as_str()
        .unwrap_or_else(|| panic!("no error code in {body}"))
        .to_owned();
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty())
    );
    (status, code)
}

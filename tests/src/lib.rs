//! What the end-to-end tests in `tests/tests/` share: a real collector in the test
//! process (on 127.0.0.1, port 0) with fixed credentials, and its admin API.

use std::path::Path;
use std::time::{Duration, Instant};

use kith_collector::{Config, Running};
use serde_json::Value;

/// The write key of the collector [`collector`] starts.
pub const WRITE_KEY: &str = "e2e-write-key";
/// The admin token of the collector [`collector`] starts.
pub const ADMIN_TOKEN: &str = "e2e-admin-token";

/// A collector with its data in `dir`, serving on a free port of 127.0.0.1.
///
/// # Panics
///
/// When it cannot start.
pub fn collector(dir: &Path) -> Running {
    collector_with(dir, |_| {})
}

/// A collector on `dir` with fixed credentials and `change` made to its config.
///
/// # Panics
///
/// When it cannot start.
pub fn collector_with(dir: &Path, change: impl FnOnce(&mut Config)) -> Running {
    let mut config = Config::for_data_dir(dir);
    config.write_keys = vec![WRITE_KEY.to_owned()];
    config.admin_token = Some(ADMIN_TOKEN.to_owned());
    change(&mut config);
    Running::start(&config).expect("collector starts")
}

/// `GET path` on the admin API, as JSON.
///
/// # Panics
///
/// When the request fails or the answer is not JSON.
pub fn admin(running: &Running, path: &str) -> Value {
    reqwest::blocking::Client::new()
        .get(running.url(path))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .expect("admin request")
        .json()
        .expect("admin answer is JSON")
}

/// Waits until the pipeline has processed every accepted event.
///
/// # Panics
///
/// After a minute.
pub fn caught_up(running: &Running) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while admin(running, "/v1/stats")["pending"] != 0 {
        assert!(Instant::now() < deadline, "the pipeline did not catch up");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Every stored message matching `query` (such as `user_id=u1`, or empty), newest first,
/// once the pipeline has caught up.
///
/// # Panics
///
/// As [`admin`].
pub fn stored(running: &Running, query: &str) -> Vec<Value> {
    caught_up(running);
    let mut events = Vec::new();
    let mut before: Option<u64> = None;
    loop {
        let mut path = format!("/v1/events?limit=1000&{query}");
        if let Some(before) = before {
            path.push_str(&format!("&before={before}"));
        }
        let page = admin(running, &path);
        let found = page["events"].as_array().expect("events array");
        events.extend(found.iter().map(|e| e["message"].clone()));
        match page["next_before"].as_u64() {
            Some(next) => before = Some(next),
            None => return events,
        }
    }
}

//! The admin API and probes over real HTTP: auth, event queries and their errors, the
//! live tail, stats, health, metrics, and what survives a restart.

mod common;

use std::io::{BufRead, BufReader};
use std::sync::mpsc;
use std::time::Duration;

use common::{ADMIN_TOKEN, Harness, error_code};
use kith_collector::{Config, Running};
use serde_json::{Value, json};

#[test]
fn the_admin_api_needs_the_bearer_token() {
    let h = Harness::start();
    for path in ["/v1/events", "/v1/stats", "/v1/events/live"] {
        let none = h.http.get(h.url(path)).send().expect("sent");
        assert_eq!(error_code(none), (401, "unauthorized".to_owned()), "{path}");
        let wrong = h
            .http
            .get(h.url(path))
            .bearer_auth("nope")
            .send()
            .expect("sent");
        assert_eq!(
            error_code(wrong),
            (401, "unauthorized".to_owned()),
            "{path}"
        );
    }
    let write_key_is_not_admin = h
        .http
        .get(h.url("/v1/events"))
        .basic_auth(common::WRITE_KEY, Some(""))
        .send()
        .expect("sent");
    assert_eq!(write_key_is_not_admin.status(), 401);
}

#[test]
fn event_queries_refuse_bad_parameters() {
    let h = Harness::start();
    let cases = [
        ("limit=0", "invalid_limit"),
        ("limit=100000", "invalid_limit"),
        ("limit=ten", "invalid_query"),
        ("colour=blue", "invalid_query"),
        ("user_id=u&anonymous_id=a", "conflicting_filters"),
        ("user_id=u&profile_id=p", "conflicting_filters"),
    ];
    for (query, code) in cases {
        let response = h.admin_get(&format!("/v1/events?{query}"));
        assert_eq!(error_code(response), (400, code.to_owned()), "{query}");
    }
    let unknown = h.admin_get("/v1/nothing-here");
    assert_eq!(error_code(unknown), (404, "not_found".to_owned()));
}

#[test]
fn probes_and_metrics() {
    let h = Harness::start();
    assert_eq!(
        h.http.get(h.url("/healthz")).send().expect("sent").status(),
        200
    );
    assert_eq!(
        h.http.get(h.url("/readyz")).send().expect("sent").status(),
        200
    );
    h.post_json("/v1/track", &json!({"event": "E", "userId": "u"}));
    h.post_json("/v1/track", &json!({"userId": "u"}));
    h.wait_processed();
    let anonymous = h.http.get(h.url("/metrics")).send().expect("sent");
    assert_eq!(
        error_code(anonymous).0,
        401,
        "the main address serves metrics to the admin only"
    );
    let metrics = h.admin_get("/metrics");
    assert!(
        metrics.headers()["content-type"]
            .to_str()
            .expect("ascii")
            .starts_with("text/plain")
    );
    let text = metrics.text().expect("text");
    for line in [
        "kith_events_received_total 2",
        "kith_events_accepted_total 1",
        "kith_events_rejected_total{code=\"missing_event\"} 1",
        "kith_events_stored_total 1",
        "kith_pipeline_pending 0",
        "kith_pipeline_lag_seconds 0.000",
        "kith_events_quarantined_total 0",
        "kith_thread_up{thread=\"pipeline\"} 1",
        "kith_thread_restarts_total{thread=\"log-writer\"} 0",
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "{line} missing from\n{text}"
        );
    }
}

#[test]
fn metrics_listen_serves_metrics_alone_without_auth() {
    let h = Harness::start_with(|config| {
        config.metrics_listen = Some("127.0.0.1:0".parse().expect("addr"));
    });
    let metrics_addr = h.collector.metrics_addr.expect("metrics address");
    let url = |path: &str| format!("http://{metrics_addr}{path}");
    let text = h
        .http
        .get(url("/metrics"))
        .send()
        .expect("sent")
        .text()
        .expect("text");
    assert!(text.contains("kith_events_received_total 0"), "{text}");
    let other = h.http.get(url("/v1/stats")).send().expect("sent");
    assert_eq!(other.status(), 404, "nothing else on the metrics address");
}

#[test]
fn the_token_in_the_query_opens_the_live_tail_only() {
    let h = Harness::start();
    for path in ["/v1/events", "/v1/stats", "/v1/segments", "/metrics"] {
        let response = h
            .http
            .get(h.url(&format!("{path}?access_token={ADMIN_TOKEN}")))
            .send()
            .expect("sent");
        assert_eq!(response.status(), 401, "{path}");
    }
    let live = h
        .http
        .get(h.url(&format!("/v1/events/live?access_token={ADMIN_TOKEN}")))
        .send()
        .expect("sent");
    assert_eq!(live.status(), 200);
}

#[test]
fn the_live_tail_streams_stored_events() {
    let h = Harness::start();
    let response = h
        .http
        .get(h.url("/v1/events/live"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .expect("sent");
    assert_eq!(response.status(), 200);
    assert!(
        response.headers()["content-type"]
            .to_str()
            .expect("ascii")
            .starts_with("text/event-stream")
    );
    let (lines_tx, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(response).lines() {
            let Ok(line) = line else { break };
            if lines_tx.send(line).is_err() {
                break;
            }
        }
    });
    // The subscription exists once the response headers are in; events sent now are tailed.
    h.post_json(
        "/v1/track",
        &json!({"event": "Live", "userId": "u", "messageId": "live-1"}),
    );
    let data = loop {
        let line = lines
            .recv_timeout(Duration::from_secs(20))
            .expect("an SSE line");
        if let Some(data) = line.strip_prefix("data:") {
            break data.trim().to_owned();
        }
    };
    let event: Value = serde_json::from_str(&data).expect("json");
    assert_eq!(event["message"]["messageId"], "live-1");
    assert_eq!(event["message"]["event"], "Live");
}

#[test]
fn events_counters_and_generated_credentials_survive_a_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = Config::for_data_dir(dir.path());
    let first = Running::start(&config).expect("starts");
    let (write_key, admin_token) = (first.write_key.clone(), first.admin_token.clone());
    assert!(write_key.starts_with("wk_") && admin_token.starts_with("adm_"));
    let http = reqwest::blocking::Client::new();
    let sent = http
        .post(first.url("/v1/batch"))
        .basic_auth(&write_key, Some(""))
        .body(
            json!({"batch": [{"type": "track", "event": "E", "userId": "u", "messageId": "keep"}]})
                .to_string(),
        )
        .send()
        .expect("sent");
    assert_eq!(sent.status(), 200);
    first.stop().expect("stops");

    let second = Running::start(&config).expect("restarts");
    assert_eq!(second.write_key, write_key, "the dev key is stored");
    assert_eq!(second.admin_token, admin_token);
    let again = http
        .post(second.url("/v1/track"))
        .basic_auth(&write_key, Some(""))
        .body(json!({"event": "E", "userId": "u", "messageId": "keep"}).to_string())
        .send()
        .expect("sent");
    assert_eq!(again.status(), 200);
    let stats: Value = loop {
        let stats: Value = http
            .get(second.url("/v1/stats"))
            .bearer_auth(&admin_token)
            .send()
            .expect("sent")
            .json()
            .expect("json");
        if stats["pending"] == 0 {
            break stats;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    assert_eq!(stats["accepted"], 2);
    assert_eq!(stats["deduplicated"], 1, "dedup remembers across restarts");
    let events: Value = http
        .get(second.url("/v1/events?message_id=keep"))
        .bearer_auth(&admin_token)
        .send()
        .expect("sent")
        .json()
        .expect("json");
    assert_eq!(events["events"].as_array().map(Vec::len), Some(1));
}

#[test]
fn a_collector_that_is_shutting_down_answers_503_with_retry_after() {
    let dir = tempfile::tempdir().expect("tempdir");
    let collector = kith_collector::Collector::open(&common::config(dir.path())).expect("opens");
    let router = collector.router();
    // The log writer is closed: nothing more can be made durable.
    collector.shutdown();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    runtime.spawn(async move { axum::serve(listener, router).await });
    let response = reqwest::blocking::Client::new()
        .post(format!("http://{addr}/v1/track"))
        .basic_auth(common::WRITE_KEY, Some(""))
        .body(json!({"event": "E", "userId": "u"}).to_string())
        .send()
        .expect("sent");
    assert_eq!(response.headers()["retry-after"], "1");
    assert_eq!(error_code(response), (503, "unavailable".to_owned()));
    let readyz = reqwest::blocking::get(format!("http://{addr}/readyz")).expect("sent");
    assert_eq!(readyz.status(), 503);
}

//! Property test: random sequences of captures, uploads with random outcomes, faults,
//! consent changes, queue overflow and time passing. After every step the accounting
//! identity holds, no event is counted as delivered twice, and the SDK never resends an
//! event the collector acknowledged.

use std::collections::HashSet;
use std::time::Duration;

use jiff::Timestamp;
use kith_sdk_core::engine::{CaptureOptions, Config, Engine, UploadResult, UploadTask};
use kith_sdk_core::protocol::Map;
use kith_sdk_core::queue::MemoryStore;
use kith_sdk_core::retry::RetryPolicy;
use proptest::prelude::*;
use serde_json::{Value, json};

#[derive(Debug, Clone)]
enum Reply {
    Ok {
        reject_every: Option<usize>,
    },
    Status(u16),
    RetryAfter(u16, u64),
    Network,
    /// The collector committed the batch but the answer never arrived.
    CommittedButLost,
    /// The platform never reports back.
    Forgotten,
}

#[derive(Debug, Clone)]
enum Step {
    Capture {
        count: usize,
        purpose: Option<&'static str>,
    },
    Upload(Reply),
    Advance(u64),
    Consent(&'static str, bool),
    Flush,
}

fn reply() -> impl Strategy<Value = Reply> {
    prop_oneof![
        4 => prop::option::of(2usize..6).prop_map(|reject_every| Reply::Ok { reject_every }),
        1 => prop::sample::select(vec![400u16, 401, 403, 404, 413, 500, 502, 503]).prop_map(Reply::Status),
        1 => (prop::sample::select(vec![429u16, 503]), 1u64..120).prop_map(|(s, w)| Reply::RetryAfter(s, w)),
        1 => Just(Reply::Network),
        1 => Just(Reply::CommittedButLost),
        1 => Just(Reply::Forgotten),
    ]
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        4 => (1usize..30, prop::option::of(prop::sample::select(vec!["ads", "analytics"])))
            .prop_map(|(count, purpose)| Step::Capture { count, purpose }),
        4 => reply().prop_map(Step::Upload),
        2 => (0u64..4_000).prop_map(Step::Advance),
        1 => (prop::sample::select(vec!["ads", "analytics"]), any::<bool>())
            .prop_map(|(p, g)| Step::Consent(p, g)),
        1 => Just(Step::Flush),
    ]
}

fn message_ids(body: &str) -> Vec<String> {
    let body: Value = serde_json::from_str(body).expect("batch body is JSON");
    body["batch"]
        .as_array()
        .expect("batch array")
        .iter()
        .map(|e| e["messageId"].as_str().expect("messageId").to_owned())
        .collect()
}

fn reply_to(
    reply: Reply,
    ids: &[String],
    acknowledged: &mut HashSet<String>,
) -> Option<UploadResult> {
    Some(match reply {
        Reply::Ok { reject_every } => {
            let rejected: Vec<Value> = reject_every
                .map(|n| {
                    (0..ids.len())
                        .step_by(n)
                        .map(|index| json!({"index": index, "code": "invalid_event"}))
                        .collect()
                })
                .unwrap_or_default();
            acknowledged.extend(ids.iter().cloned());
            UploadResult::Response {
                status: 200,
                retry_after: None,
                body: Some(json!({"success": true, "rejected": rejected})),
            }
        }
        Reply::Status(status) => UploadResult::Response {
            status,
            retry_after: None,
            body: None,
        },
        Reply::RetryAfter(status, secs) => UploadResult::Response {
            status,
            retry_after: Some(Duration::from_secs(secs)),
            body: None,
        },
        Reply::Network => UploadResult::NetworkError("connection refused".into()),
        Reply::CommittedButLost => UploadResult::NetworkError("connection reset".into()),
        Reply::Forgotten => return None,
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn accounting_holds_and_nothing_is_delivered_twice(steps in prop::collection::vec(step(), 1..120)) {
        let mut config = Config::new("key", "http://collector.test");
        config.max_queue_events = 200;
        config.max_age = Duration::from_secs(20_000);
        config.retry = RetryPolicy {
            initial: Duration::from_secs(1),
            max: Duration::from_secs(300),
            pause: Duration::from_secs(900),
        };
        let mut engine = Engine::open(Box::new(MemoryStore::new()), config).expect("opens");
        let mut now = Timestamp::from_second(1_800_000_000).expect("time");
        let mut acknowledged: HashSet<String> = HashSet::new();
        for step in steps {
            match step {
                Step::Capture { count, purpose } => {
                    for i in 0..count {
                        let options = CaptureOptions { purpose: purpose.map(str::to_owned), ..CaptureOptions::default() };
                        let mut properties = Map::new();
                        properties.insert("i".into(), Value::from(i));
                        engine.track("Step", properties, options, now).expect("captured");
                    }
                }
                Step::Upload(reply) => {
                    if let UploadTask::Send(request) = engine.next_upload(now).expect("task") {
                        let ids = message_ids(&request.body);
                        prop_assert_eq!(ids.len(), request.events);
                        prop_assert!(ids.iter().all(|id| !acknowledged.contains(id)),
                            "the SDK resent an event the collector had acknowledged");
                        if let Some(result) = reply_to(reply, &ids, &mut acknowledged) {
                            engine.on_upload_result(request.batch_id, result, now).expect("result");
                        }
                    }
                }
                Step::Advance(secs) => now = now.checked_add(Duration::from_secs(secs)).expect("time"),
                Step::Consent(purpose, granted) => engine.set_consent(purpose, granted).expect("consent"),
                Step::Flush => engine.flush(),
            }
            let stats = engine.stats();
            let dropped = stats.dropped.total();
            prop_assert_eq!(stats.captured, stats.delivered + dropped + stats.pending, "{:?}", stats);
            let rejected = stats.dropped.get("rejected:invalid_event");
            // Acknowledged events that had already been evicted or purged while in flight
            // are not counted again, so this is at most, not exactly, the acknowledged set.
            prop_assert!(stats.delivered + rejected <= acknowledged.len() as u64,
                "an event was counted as delivered twice: {:?} vs {}", stats, acknowledged.len());
        }
    }
}

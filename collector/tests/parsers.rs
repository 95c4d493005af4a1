//! Every parser that reads outside input, fed arbitrary and mutated input (proptest):
//! the wire protocol at the ingest endpoints, import mappings and files, processing
//! rules with their JSON paths, destination configs and the config file. None may
//! panic, and each answers a clean error: an HTTP status below 500 with the JSON
//! error body, or an `Err` with a message.
//!
//! The HTTP cases go through the collector's real router, in process.

use std::io::Write as _;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use kith_collector::imports::Format;
use kith_collector::imports::records::read;
use kith_collector::processing::path::FieldPath;
use kith_collector::{Collector, Config};
use proptest::prelude::*;
use serde_json::{Map, Value, json};
use tower::ServiceExt as _;

const WRITE_KEY: &str = "parser-write-key";
const ADMIN_TOKEN: &str = "parser-admin-token";

/// Keys a mutated event is likely to hold: the spec's fields and some strangers.
const KEYS: &[&str] = &[
    "type",
    "event",
    "userId",
    "anonymousId",
    "messageId",
    "timestamp",
    "sentAt",
    "originalTimestamp",
    "context",
    "properties",
    "traits",
    "integrations",
    "groupId",
    "previousId",
    "name",
    "batch",
    "writeKey",
    "ip",
    "device",
    "token",
    "email",
    "phone",
    "__proto__",
    "",
    "a.b",
    "\u{0}",
];

/// Arbitrary JSON, up to `depth` levels, with keys from [`KEYS`] or anywhere.
fn json_value(depth: u32) -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(Value::from),
        prop::sample::select(vec![
            "track",
            "identify",
            "page",
            "screen",
            "group",
            "alias",
            "2024-01-01T00:00:00Z",
            "not-a-time",
            "",
            "a@b.c",
            "+33612345678",
            "https://127.0.0.1/x",
        ])
        .prop_map(Value::from),
        ".{0,40}".prop_map(Value::from),
    ];
    leaf.prop_recursive(depth, 256, 8, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::vec(
                (
                    prop_oneof![
                        prop::sample::select(KEYS.to_vec()).prop_map(str::to_owned),
                        ".{0,12}"
                    ],
                    inner
                ),
                0..8
            )
            .prop_map(|pairs| Value::Object(pairs.into_iter().collect::<Map<_, _>>())),
        ]
    })
}

/// A valid event of each type, with some of its fields replaced by arbitrary values.
fn mutated_event() -> impl Strategy<Value = Value> {
    let base = prop::sample::select(vec![
        json!({"type": "track", "event": "E", "userId": "u", "properties": {"a": 1}}),
        json!({"type": "identify", "anonymousId": "a", "traits": {"email": "a@b.c"}}),
        json!({"type": "page", "userId": "u", "name": "Home", "context": {"ip": "1.2.3.4"}}),
        json!({"type": "group", "userId": "u", "groupId": "g", "traits": {}}),
        json!({"type": "alias", "userId": "u", "previousId": "p"}),
    ]);
    (
        base,
        prop::collection::vec((prop::sample::select(KEYS.to_vec()), json_value(4)), 0..4),
    )
        .prop_map(|(mut event, changes)| {
            for (key, value) in changes {
                event[key] = value;
            }
            event
        })
}

/// The real router, in process, with its own data directory and runtime.
struct App {
    _dir: tempfile::TempDir,
    _collector: Collector,
    router: axum::Router,
    runtime: tokio::runtime::Runtime,
}

impl App {
    fn start() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut config = Config::for_data_dir(dir.path());
        config.write_keys = vec![WRITE_KEY.to_owned()];
        config.admin_token = Some(ADMIN_TOKEN.to_owned());
        config.identity = true;
        let collector = Collector::open(&config).expect("opens");
        let router = collector.router();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        App {
            _dir: dir,
            _collector: collector,
            router,
            runtime,
        }
    }

    /// Sends one request; answers the status and the body as JSON (when it is).
    fn send(&self, method: &str, uri: &str, auth: &str, body: Vec<u8>) -> (StatusCode, Value) {
        let request = Request::builder()
            .method(method)
            .uri(uri)
            .header("authorization", auth)
            .header("content-type", "application/json")
            .body(Body::from(body))
            .expect("request");
        let router = self.router.clone();
        self.runtime.block_on(async move {
            let response = router.oneshot(request).await.expect("infallible");
            let status = response.status();
            let bytes = axum::body::to_bytes(response.into_body(), 1 << 20)
                .await
                .expect("body");
            (
                status,
                serde_json::from_slice(&bytes).unwrap_or(Value::Null),
            )
        })
    }

    fn ingest(&self, path: &str, body: Vec<u8>) -> (StatusCode, Value) {
        use base64::Engine as _;
        let basic = base64::engine::general_purpose::STANDARD.encode(format!("{WRITE_KEY}:"));
        self.send("POST", path, &format!("Basic {basic}"), body)
    }

    fn admin(&self, method: &str, path: &str, body: Vec<u8>) -> (StatusCode, Value) {
        self.send(method, path, &format!("Bearer {ADMIN_TOKEN}"), body)
    }
}

/// A refusal is a 4xx with `{"error": {"code", "message"}}`.
fn clean(status: StatusCode, body: &Value, what: &str) {
    assert!(!status.is_server_error(), "{what}: {status} {body}");
    if !status.is_success() {
        assert!(
            body["error"]["code"]
                .as_str()
                .is_some_and(|c| !c.is_empty())
                && body["error"]["message"].as_str().is_some(),
            "{what}: {status} without an error body: {body}"
        );
    }
}

fn app() -> &'static App {
    static APP: std::sync::OnceLock<App> = std::sync::OnceLock::new();
    APP.get_or_init(App::start)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn the_ingest_endpoints_answer_any_body_cleanly(
        events in prop::collection::vec(mutated_event(), 0..5),
        raw in prop::collection::vec(any::<u8>(), 0..200),
        single in mutated_event(),
    ) {
        let app = app();
        let batch = serde_json::to_vec(&json!({ "batch": events })).expect("json");
        let (status, body) = app.ingest("/v1/batch", batch);
        clean(status, &body, "a batch of mutated events");
        let (status, body) = app.ingest("/v1/batch", raw.clone());
        clean(status, &body, "arbitrary bytes as a batch");
        let (status, body) = app.ingest("/v1/track", raw);
        clean(status, &body, "arbitrary bytes as a track");
        let (status, body) = app.ingest("/v1/identify", single.to_string().into_bytes());
        clean(status, &body, "a mutated single event");
    }

    #[test]
    fn arbitrary_json_at_the_ingest_endpoints_is_answered_cleanly(value in json_value(6)) {
        let app = app();
        let (status, body) = app.ingest("/v1/batch", value.to_string().into_bytes());
        clean(status, &body, "arbitrary JSON as a batch");
        let wrapped = json!({"batch": [value.clone()], "context": value});
        let (status, body) = app.ingest("/v1/batch", wrapped.to_string().into_bytes());
        clean(status, &body, "arbitrary JSON as an event");
    }

    #[test]
    fn destination_configs_are_refused_cleanly(
        value in json_value(4),
        kind in prop::sample::select(vec!["webhook", "fcm", "apns", "web_push", "audience_export", "x"]),
    ) {
        let app = app();
        let mut body = value.clone();
        if let Value::Object(map) = &mut body {
            map.insert("type".to_owned(), Value::from(kind));
        }
        let (status, answer) = app.admin("POST", "/v1/destinations", body.to_string().into_bytes());
        clean(status, &answer, "a destination");
        let (status, answer) = app.admin("POST", "/v1/campaigns", value.to_string().into_bytes());
        clean(status, &answer, "a campaign");
    }

    #[test]
    fn processing_rules_and_their_paths_are_refused_cleanly(
        value in json_value(5),
        path in prop_oneof!["[a-z._\\[\\]0-9]{0,30}", "(a\\.){10,40}a"],
        op in prop::sample::select(vec!["drop", "rename", "set", "hash", "lowercase", "filter", "x"]),
    ) {
        let app = app();
        let source = kith_collector::server::source_id(WRITE_KEY);
        let uri = format!("/v1/sources/{source}/rules");
        let (status, answer) = app.admin("PUT", &uri, value.to_string().into_bytes());
        clean(status, &answer, "rules");
        let rules = json!({"transformations": [{"op": op, "path": path, "to": path, "value": value}]});
        let (status, answer) = app.admin("PUT", &uri, rules.to_string().into_bytes());
        clean(status, &answer, "a transformation");
        app.admin("DELETE", &uri, Vec::new());
        // A path on any message: reading and writing never panic.
        if let Ok(field) = FieldPath::try_from(path) {
            let mut message = value;
            let _ = field.get(&message);
            let _ = field.set(&mut message, json!(1));
            let _ = field.take(&mut message);
        }
    }

    #[test]
    fn import_queries_are_refused_cleanly(
        pairs in prop::collection::vec((
            prop::sample::select(vec!["type", "format", "user_id", "email", "traits", "properties",
                                      "timestamp", "event", "source", "colour", ""]),
            ".{0,12}",
        ), 0..6),
    ) {
        let app = app();
        let query = serde_urlencoded::to_string(&pairs).expect("encodes");
        let (status, answer) = app.admin("POST", &format!("/v1/imports?{query}"), b"id\nu1\n".to_vec());
        clean(status, &answer, &format!("the import query {query:?}"));
    }

    #[test]
    fn import_files_of_any_bytes_read_cleanly(
        bytes in prop::collection::vec(prop_oneof![
            4 => prop::sample::select(b"a,\"\n\r{}[]:1 x\xff".to_vec()),
            1 => any::<u8>(),
        ], 0..400),
        gzip in any::<bool>(),
    ) {
        let mut file = tempfile::NamedTempFile::new().expect("temp file");
        file.write_all(&bytes).expect("write");
        for format in [Format::Csv, Format::Ndjson] {
            if let Ok(records) = read(format, gzip, file.path(), 1 << 20) {
                for record in records.items.flatten() {
                    prop_assert!(record.row >= 1);
                }
            }
        }
    }

    #[test]
    fn config_files_of_any_json_load_cleanly(value in json_value(5)) {
        let mut file = tempfile::NamedTempFile::new().expect("temp file");
        file.write_all(value.to_string().as_bytes()).expect("write");
        let _ = kith_collector::config::FileConfig::load(file.path().to_str().expect("utf-8"));
    }
}

//! Criterion benchmarks of the client engine: the cost of one capture with the memory
//! store and with the file store, and of encoding a batch body. Each has a baseline
//! measured in the same run, so figures can be read as ratios on a noisy machine:
//! serializing the same message with serde_json (the least a capture must do), and
//! appending the same bytes to a file with one `write` (the least a durable capture
//! must do).
//!
//! Run: `cargo bench -p kith-sdk-core --bench engine`.

use std::hint::black_box;

use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use jiff::Timestamp;
use kith_sdk_core::engine::{CaptureOptions, Config, Engine, encode_batch};
use kith_sdk_core::file_store::FileStore;
use kith_sdk_core::protocol::Map;
use kith_sdk_core::queue::{EventStore, MemoryStore};
use serde_json::json;

fn properties() -> Map {
    json!({"product_id": "sku-42", "name": "Monopoly: 3rd Edition", "price": 18.99,
           "quantity": 1, "currency": "USD", "category": "Games"})
    .as_object()
    .cloned()
    .unwrap_or_default()
}

fn engine(store: Box<dyn EventStore>) -> Engine {
    let mut config = Config::new("bench-key", "http://127.0.0.1:9");
    // Large budgets: measure capture, not eviction.
    config.max_queue_events = usize::MAX;
    config.max_queue_bytes = usize::MAX;
    Engine::open(store, config).unwrap_or_else(|e| panic!("engine opens: {e}"))
}

fn baselines(c: &mut Criterion) {
    let message = json!({"type": "track", "event": "Product Added", "properties": properties(),
        "messageId": "5f0c6b2e-8a4e-4a36-9a5e-0c1d2e3f4a5b", "anonymousId": "a1",
        "timestamp": "2026-11-29T12:00:00Z",
        "context": {"library": {"name": "kith-sdk-core", "version": "0.1.0"}}});
    c.bench_function("baseline: serialize the message", |b| {
        b.iter(|| black_box(serde_json::to_string(&message)));
    });
    let bytes = message.to_string().into_bytes();
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.path().join("raw.log"))
        .unwrap_or_else(|e| panic!("file opens: {e}"));
    c.bench_function("baseline: append the bytes to a file", |b| {
        b.iter(|| {
            std::io::Write::write_all(&mut file, &bytes).unwrap_or_else(|e| panic!("write: {e}"))
        });
    });
}

fn capture(c: &mut Criterion) {
    let now = Timestamp::now();
    let mut memory = engine(Box::new(MemoryStore::new()));
    c.bench_function("capture track (memory store)", |b| {
        b.iter(|| {
            memory
                .track(
                    "Product Added",
                    properties(),
                    CaptureOptions::default(),
                    now,
                )
                .unwrap_or_else(|e| panic!("captured: {e}"))
        });
    });

    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
    let store = FileStore::open(dir.path().join("events.log"), false)
        .unwrap_or_else(|e| panic!("file store opens: {e}"));
    let mut file = engine(Box::new(store));
    c.bench_function("capture track (file store)", |b| {
        b.iter(|| {
            file.track(
                "Product Added",
                properties(),
                CaptureOptions::default(),
                now,
            )
            .unwrap_or_else(|e| panic!("captured: {e}"))
        });
    });
}

fn encoding(c: &mut Criterion) {
    let event = json!({"type": "track", "event": "Product Added", "properties": properties(),
        "messageId": "5f0c6b2e-8a4e-4a36-9a5e-0c1d2e3f4a5b", "anonymousId": "a1",
        "timestamp": "2026-11-29T12:00:00Z",
        "context": {"library": {"name": "kith-sdk-core", "version": "0.1.0"}}})
    .to_string();
    for n in [20, 100] {
        c.bench_function(&format!("encode batch of {n}"), |b| {
            b.iter_batched(
                || vec![event.as_str(); n],
                |events| black_box(encode_batch(&events, Timestamp::UNIX_EPOCH, None)),
                BatchSize::SmallInput,
            );
        });
    }
}

criterion_group!(benches, baselines, capture, encoding);
criterion_main!(benches);

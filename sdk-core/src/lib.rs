//! Kith's shared client core.
//!
//! Every Kith SDK (browser, Kotlin, Swift, Python, Rust) runs this crate, and the
//! collector parses requests with its [`protocol`] types, so SDKs and collector speak
//! exactly the same Segment-spec wire format.
//!
//! - [`protocol`]: the wire types, their validation rules and limits.
//! - [`queue`]: the durable queue's state and the [`queue::EventStore`] trait, with an
//!   in-memory store; `file_store` (not on wasm): the append-only file store.
//! - [`engine`]: capture, batching and the upload state machine (no I/O: the platform
//!   asks what to send and reports back).
//! - [`retry`]: backoff timing.
//! - [`json`]: JSON text and values without serde's serializers (in the browser,
//!   numbers and reading go through the page's `JSON`).
//! - `native` (not on wasm): a thread-safe [`native::Client`] and the uploader thread
//!   that does the HTTP for Rust programs and the mobile bindings.

pub mod engine;
pub mod json;
pub mod protocol;
pub mod queue;
pub mod retry;

// What the browser build leaves out: it has no file system, threads or blocking HTTP,
// so the platform (sdk-wasm) stores the queue and drives the engine itself.
#[cfg(not(target_arch = "wasm32"))]
pub mod file_store;
#[cfg(not(target_arch = "wasm32"))]
pub mod native;

/// This library's name, as sent in `context.library.name`.
pub const LIBRARY_NAME: &str = "kith-sdk-core";

/// This library's version, as sent in `context.library.version`.
pub const LIBRARY_VERSION: &str = env!("CARGO_PKG_VERSION");

//! Kith's shared client core.
//!
//! Every Kith SDK (browser, Kotlin, Swift, Python, Rust) runs this crate, and the
//! collector parses requests with its [`protocol`] types, so SDKs and collector speak
//! exactly the same Segment-spec wire format.
//!
//! - [`protocol`]: the wire types (`track`, `identify`, `page`, `screen`, `group`,
//!   `alias`), their validation rules and limits. No I/O.

pub mod protocol;

/// This library's name, as sent in `context.library.name`.
pub const LIBRARY_NAME: &str = "kith-sdk-core";

/// This library's version, as sent in `context.library.version`.
pub const LIBRARY_VERSION: &str = env!("CARGO_PKG_VERSION");

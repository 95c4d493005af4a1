//! Kith's mobile SDK: the [`kith_sdk_core`] engine exported through UniFFI to Kotlin
//! (Android), Swift (iOS) and Python.
//!
//! This crate is a placeholder until the mobile SDK lands; it only re-exports the wire
//! protocol so that the workspace layout is complete and builds.

pub use kith_sdk_core::protocol;

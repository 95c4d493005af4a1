//! Kith's browser SDK: the [`kith_sdk_core`] engine exported through wasm-bindgen as an
//! npm package.
//!
//! This crate is a placeholder until the browser SDK lands; it only re-exports the wire
//! protocol so that the workspace layout is complete and builds.

pub use kith_sdk_core::protocol;

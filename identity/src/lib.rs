//! Kith's identity graph: identifiers, deterministic stitching rules with guardrails, and
//! probabilistic matching, as pure logic behind a storage trait.
//!
//! This crate is a placeholder until identity resolution lands (see the issue on identity
//! resolution and unified profiles); the collector does not use it yet.

//! Kith's segments: a segment language, its evaluator and incremental membership, as
//! pure logic.
//!
//! This crate is a placeholder until segmentation lands (see the issue on segments); the
//! collector does not use it yet.

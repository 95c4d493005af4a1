//! Kith's identity graph: identifiers, deterministic stitching with guardrails,
//! reversible merges and erasure, as pure logic behind a storage trait.
//!
//! - [`identifier`]: `(type, value)` pairs and how they are read from Segment messages.
//! - [`rules`]: priorities, per-type limits, the cap, blocked values, trait identifiers,
//!   source priority for traits.
//! - [`profile`]: profiles and the event summaries they are rebuilt from.
//! - [`store`]: the [`store::Store`] trait and [`store::MemoryStore`].
//! - [`graph`]: stitching, merges, split and delete.
//! - [`matching`]: probabilistic (Fellegi-Sunter) matching of profiles that share no
//!   identifier, with blocking and EM-estimated weights; [`synthetic`] generates
//!   person records with known truth to evaluate it.
//!
//! The collector runs [`graph::Graph::process`] as a pipeline stage on its sled store.

pub mod graph;
pub mod identifier;
pub mod matching;
pub mod profile;
pub mod rules;
pub mod store;
pub mod synthetic;

//! Kith's collector as a library: a thin binary (`main.rs`) parses a [`Config`] and
//! calls [`Collector::open`] and [`Collector::serve`]; tests do the same on port 0 or
//! call [`Collector::router`] directly.
//!
//! The way an event travels: [`ingest`] (HTTP, auth, validation, enrichment) →
//! [`writer`] (group commit onto the durable log in [`store`]) → [`pipeline`] (stages:
//! [`processing`], deduplicate, then with identity resolution on [`identity`],
//! [`segments`] and [`activation`]; then stored) → [`admin`] (queries, live tail,
//! counters from [`stats`]). Batch sources enter through [`imports`]; segment
//! memberships and campaign deliveries also move on their own threads (timers, the
//! outbox).

pub mod activation;
pub mod admin;
pub mod backend;
pub mod child;
pub mod config;
pub mod disk;
pub mod error;
pub mod health;
pub mod http;
pub mod identity;
pub mod imports;
pub mod ingest;
pub mod pipeline;
pub mod processing;
pub mod profiles;
pub mod ratelimit;
pub mod secrets;
pub mod segments;
pub mod server;
pub mod stats;
pub mod store;
pub mod worker;
pub mod writer;

pub use config::Config;
pub use error::{ApiError, StoreError};
pub use server::{AppState, Collector, Running, app};

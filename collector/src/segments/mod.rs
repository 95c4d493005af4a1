//! Segments over the unified profiles (identity resolution must be on): definitions in
//! the segment language (`kith-segments`), kept current in real time by [`live`], and
//! served by [`api`].

pub mod api;
pub mod live;

use std::collections::BTreeMap;

use jiff::Timestamp;
use kith_segments::ast::Expr;
use serde::{Deserialize, Serialize};

use crate::error::StoreError;
use crate::store::Store;

pub use api::routes;
pub use live::Membership;

/// A stored segment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Segment {
    /// Its key, used by `in_segment("key")` and the API.
    pub key: String,
    /// A name for people.
    pub name: String,
    /// The definition as written.
    pub definition: String,
    /// The parsed tree.
    pub tree: Expr,
    /// When it was created.
    pub created_at: Timestamp,
    /// When it was last changed: the version computed for existing profiles.
    pub updated_at: Timestamp,
}

/// Every stored segment that can be read, by key (see [`broken`] for the others).
///
/// # Errors
///
/// On a storage failure.
pub fn all(store: &Store) -> Result<BTreeMap<String, Segment>, StoreError> {
    Ok(store
        .segments::<Segment>()?
        .into_iter()
        .filter_map(|(_, segment)| segment.ok())
        .map(|s| (s.key.clone(), s))
        .collect())
}

/// The stored segments that cannot be read, by key, with the reason: they are left
/// out of membership (and logged at start), listed by the API as broken, and can be
/// deleted or replaced.
///
/// # Errors
///
/// On a storage failure.
pub fn broken(store: &Store) -> Result<BTreeMap<String, String>, StoreError> {
    Ok(store
        .segments::<Segment>()?
        .into_iter()
        .filter_map(|(key, segment)| segment.err().map(|why| (key, why)))
        .collect())
}

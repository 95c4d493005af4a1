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

/// Every stored segment, by key.
///
/// # Errors
///
/// On a storage failure or an undecodable record.
pub fn all(store: &Store) -> Result<BTreeMap<String, Segment>, StoreError> {
    Ok(store
        .segments::<Segment>()?
        .into_iter()
        .map(|s| (s.key.clone(), s))
        .collect())
}

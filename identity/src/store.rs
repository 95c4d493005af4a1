//! The storage the identity graph needs, as a trait ([`Store`]), and its in-memory
//! implementation ([`MemoryStore`]) for tests and tools. The collector implements it on
//! sled.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::convert::Infallible;

use serde::{Deserialize, Serialize};

use crate::identifier::Identifier;
use crate::profile::{EventSummary, Profile};

/// A merge of two profiles, as the merge log keeps it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Merge {
    /// Its number.
    pub id: u64,
    /// The profile that survived (the older one).
    pub survivor: String,
    /// The profile merged into it.
    pub merged: String,
    /// The event that caused it (its `seq`; 0 for a merge decided by matching).
    pub event_seq: u64,
    /// That event's `messageId`.
    pub message_id: String,
    /// The identifiers that linked the two profiles.
    pub identifiers: Vec<Identifier>,
    /// Why, for people.
    pub reason: String,
    /// The merged profile's identifiers at the time, to restore it on a split.
    pub merged_identifiers: Vec<Identifier>,
    /// Set once the merge was undone.
    #[serde(default)]
    pub undone: bool,
}

/// What the identity graph reads and writes. Each method is a point operation; the
/// caller makes a sequence of them atomic where its storage can (the collector applies
/// one pipeline chunk's effects, and replays the chunk after a crash: every operation
/// here is idempotent for the same input).
pub trait Store {
    /// The storage's failure.
    type Error: std::error::Error + Send + Sync + 'static;

    /// The profile `id` is linked to (not following merges).
    fn owner(&self, id: &Identifier) -> Result<Option<String>, Self::Error>;
    /// Links `id` to `profile`, or unlinks it.
    fn set_owner(&mut self, id: &Identifier, profile: Option<&str>) -> Result<(), Self::Error>;
    /// The profile record with this id (a merged one included).
    fn profile(&self, id: &str) -> Result<Option<Profile>, Self::Error>;
    /// Stores a profile record.
    fn put_profile(&mut self, profile: &Profile) -> Result<(), Self::Error>;
    /// Removes a profile record.
    fn delete_profile(&mut self, id: &str) -> Result<(), Self::Error>;
    /// A number never answered before (profile and merge ids).
    fn next_number(&mut self) -> Result<u64, Self::Error>;
    /// The events attributed to a profile, in `seq` order.
    fn events(&self, profile: &str) -> Result<Vec<EventSummary>, Self::Error>;
    /// Attributes an event to a profile (keyed by its `seq`: storing it again changes
    /// nothing).
    fn put_event(&mut self, profile: &str, event: &EventSummary) -> Result<(), Self::Error>;
    /// Removes the events of a profile.
    fn delete_events(&mut self, profile: &str) -> Result<(), Self::Error>;
    /// Records a merge (by its id).
    fn put_merge(&mut self, merge: &Merge) -> Result<(), Self::Error>;
    /// A merge by id.
    fn merge(&self, id: u64) -> Result<Option<Merge>, Self::Error>;
    /// Forgets a merge (when its profiles are erased).
    fn delete_merge(&mut self, id: u64) -> Result<(), Self::Error>;
    /// The merges a profile took part in, oldest first.
    fn merges_of(&self, profile: &str) -> Result<Vec<Merge>, Self::Error>;
    /// Whether `id` was erased and is suppressed.
    fn is_suppressed(&self, id: &Identifier) -> Result<bool, Self::Error>;
    /// Suppresses `id`: later events carrying it are dropped.
    fn suppress(&mut self, id: &Identifier) -> Result<(), Self::Error>;
}

/// The identity graph in memory.
#[derive(Debug, Clone, Default)]
pub struct MemoryStore {
    owners: HashMap<Identifier, String>,
    profiles: HashMap<String, Profile>,
    events: HashMap<String, BTreeMap<u64, EventSummary>>,
    merges: BTreeMap<u64, Merge>,
    suppressed: BTreeSet<Identifier>,
    next: u64,
}

impl MemoryStore {
    /// Every live (not merged) profile.
    pub fn live_profiles(&self) -> Vec<&Profile> {
        let mut live: Vec<&Profile> = self
            .profiles
            .values()
            .filter(|p| p.merged_into.is_none())
            .collect();
        live.sort_by_key(|p| p.created);
        live
    }
}

impl Store for MemoryStore {
    type Error = Infallible;

    fn owner(&self, id: &Identifier) -> Result<Option<String>, Infallible> {
        Ok(self.owners.get(id).cloned())
    }

    fn set_owner(&mut self, id: &Identifier, profile: Option<&str>) -> Result<(), Infallible> {
        match profile {
            Some(p) => self.owners.insert(id.clone(), p.to_owned()),
            None => self.owners.remove(id),
        };
        Ok(())
    }

    fn profile(&self, id: &str) -> Result<Option<Profile>, Infallible> {
        Ok(self.profiles.get(id).cloned())
    }

    fn put_profile(&mut self, profile: &Profile) -> Result<(), Infallible> {
        self.profiles.insert(profile.id.clone(), profile.clone());
        Ok(())
    }

    fn delete_profile(&mut self, id: &str) -> Result<(), Infallible> {
        self.profiles.remove(id);
        Ok(())
    }

    fn next_number(&mut self) -> Result<u64, Infallible> {
        self.next += 1;
        Ok(self.next)
    }

    fn events(&self, profile: &str) -> Result<Vec<EventSummary>, Infallible> {
        Ok(self
            .events
            .get(profile)
            .map(|e| e.values().cloned().collect())
            .unwrap_or_default())
    }

    fn put_event(&mut self, profile: &str, event: &EventSummary) -> Result<(), Infallible> {
        self.events
            .entry(profile.to_owned())
            .or_default()
            .insert(event.seq, event.clone());
        Ok(())
    }

    fn delete_events(&mut self, profile: &str) -> Result<(), Infallible> {
        self.events.remove(profile);
        Ok(())
    }

    fn put_merge(&mut self, merge: &Merge) -> Result<(), Infallible> {
        self.merges.insert(merge.id, merge.clone());
        Ok(())
    }

    fn merge(&self, id: u64) -> Result<Option<Merge>, Infallible> {
        Ok(self.merges.get(&id).cloned())
    }

    fn delete_merge(&mut self, id: u64) -> Result<(), Infallible> {
        self.merges.remove(&id);
        Ok(())
    }

    fn merges_of(&self, profile: &str) -> Result<Vec<Merge>, Infallible> {
        Ok(self
            .merges
            .values()
            .filter(|m| m.survivor == profile || m.merged == profile)
            .cloned()
            .collect())
    }

    fn is_suppressed(&self, id: &Identifier) -> Result<bool, Infallible> {
        Ok(self.suppressed.contains(id))
    }

    fn suppress(&mut self, id: &Identifier) -> Result<(), Infallible> {
        self.suppressed.insert(id.clone());
        Ok(())
    }
}

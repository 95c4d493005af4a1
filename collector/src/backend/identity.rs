//! The identity graph's state: kith-identity's [`Store`] over a transaction.
//!
//! Rows: `Owners` identifier → the profile id it is linked to; `Profiles` id →
//! [`Profile`]; `ProfileEvents` `(profile, seq)` → nothing (the timeline: summaries are
//! rebuilt from the stored events, so the graph keeps no second copy of them); `Merges`
//! number → [`Merge`]; `ProfileMerges` `(profile, merge)` → nothing; `Suppressed`
//! identifier → nothing; `Suggestions` `(a, b)` → a suggested merge; `Changed` profile →
//! nothing: its make-up changed (merged, split, erased), and its segment memberships
//! must be re-evaluated (written with the change, so a crash cannot lose it). Profile and
//! merge numbers are the `identity` number of [`super::meta`].

use std::collections::HashMap;

use kith_identity::identifier::Identifier;
use kith_identity::profile::{EventSummary, Profile};
use kith_identity::rules::Rules;
use kith_identity::store::{Merge, Store};
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::events::EventStore;
use super::{Rows, TableId, Tables, Txn, keys};
use crate::error::StoreError;

/// The number profiles and merges are counted with.
const NUMBER: &str = "identity";

fn identifier_key(id: &Identifier) -> Vec<u8> {
    keys::str(&id.to_string())
}

/// Reading the identity graph's state.
pub trait IdentityState: Tables {
    /// A profile record (a merged one included).
    ///
    /// # Errors
    ///
    /// On a storage failure or an undecodable record.
    fn profile_record(&self, id: &str) -> Result<Option<Profile>, StoreError> {
        self.get_json(TableId::Profiles, &keys::str(id))
    }

    /// Profile records in id order after `after`, at most `limit` (merged ones
    /// included).
    ///
    /// # Errors
    ///
    /// On a storage failure or an undecodable record.
    fn profile_records(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<Profile>, StoreError> {
        let from = after.map(keys::str);
        self.scan_prefix(
            TableId::Profiles,
            &[],
            from.as_deref().map(|k| (k, true)),
            limit,
        )?
        .into_iter()
        .map(|(_, v)| Ok(serde_json::from_slice(&v)?))
        .collect()
    }

    /// How many profile records there are (merged ones included).
    ///
    /// # Errors
    ///
    /// On a storage failure.
    fn profile_count(&self) -> Result<usize, StoreError> {
        self.count(TableId::Profiles, &[])
    }

    /// The `seq`s of a profile's events, oldest first.
    ///
    /// # Errors
    ///
    /// On a storage failure.
    fn profile_event_seqs(&self, profile: &str) -> Result<Vec<u64>, StoreError> {
        let prefix = keys::str(profile);
        self.all(TableId::ProfileEvents, &prefix)?
            .into_iter()
            .map(|(k, _)| keys::read_u64(&k[prefix.len()..]))
            .collect()
    }

    /// The profiles marked changed since their memberships were last re-evaluated.
    ///
    /// # Errors
    ///
    /// On a storage failure.
    fn changed_profiles(&self) -> Result<Vec<String>, StoreError> {
        self.all(TableId::Changed, &[])?
            .into_iter()
            .map(|(k, _)| keys::read_str(&k))
            .collect()
    }

    /// The suggested merges of the last matching run.
    ///
    /// # Errors
    ///
    /// On a storage failure or an undecodable record.
    fn suggestions<S: DeserializeOwned>(&self) -> Result<Vec<S>, StoreError> {
        self.all(TableId::Suggestions, &[])?
            .into_iter()
            .map(|(_, v)| Ok(serde_json::from_slice(&v)?))
            .collect()
    }

    /// One suggested merge.
    ///
    /// # Errors
    ///
    /// On a storage failure or an undecodable record.
    fn suggestion<S: DeserializeOwned>(&self, a: &str, b: &str) -> Result<Option<S>, StoreError> {
        self.get_json(TableId::Suggestions, &keys::Key::new().str(a).str(b).done())
    }
}

impl<T: Tables + ?Sized> IdentityState for T {}

impl Txn<'_> {
    /// Marks a profile changed: its memberships are re-evaluated.
    pub fn mark_changed(&mut self, profile: &str) {
        self.put(TableId::Changed, keys::str(profile), Vec::new());
    }

    /// Clears a profile's changed mark.
    pub fn clear_changed(&mut self, profile: &str) {
        self.delete(TableId::Changed, keys::str(profile));
    }

    /// Replaces the suggested merges.
    ///
    /// # Errors
    ///
    /// On a storage failure, or a suggestion that cannot be encoded.
    pub fn replace_suggestions<S: Serialize>(
        &mut self,
        pairs: &[(String, String, S)],
    ) -> Result<(), StoreError> {
        for (k, _) in self.all(TableId::Suggestions, &[])? {
            self.delete(TableId::Suggestions, k);
        }
        for (a, b, pair) in pairs {
            self.put_json(
                TableId::Suggestions,
                keys::Key::new().str(a).str(b).done(),
                pair,
            )?;
        }
        Ok(())
    }

    /// Forgets one suggested merge.
    pub fn remove_suggestion(&mut self, a: &str, b: &str) {
        self.delete(TableId::Suggestions, keys::Key::new().str(a).str(b).done());
    }
}

/// kith-identity's [`Store`] over a transaction. Event summaries are rebuilt from the
/// stored events, or taken from `chunk` for the events of the chunk being processed
/// (which are stored only when it commits).
pub struct GraphView<'t, 'b> {
    /// The transaction.
    pub txn: &'t mut Txn<'b>,
    /// The identity rules (the summaries are built with them).
    pub rules: &'t Rules,
    /// The summaries of the events of the chunk in progress, by `seq`.
    pub chunk: Option<&'t HashMap<u64, EventSummary>>,
}

impl Store for GraphView<'_, '_> {
    type Error = StoreError;

    fn owner(&self, id: &Identifier) -> Result<Option<String>, StoreError> {
        Ok(self
            .txn
            .get(TableId::Owners, &identifier_key(id))?
            .map(|v| String::from_utf8_lossy(&v).into_owned()))
    }

    fn set_owner(&mut self, id: &Identifier, profile: Option<&str>) -> Result<(), StoreError> {
        match profile {
            Some(profile) => self.txn.put(
                TableId::Owners,
                identifier_key(id),
                profile.as_bytes().to_vec(),
            ),
            None => self.txn.delete(TableId::Owners, identifier_key(id)),
        }
        Ok(())
    }

    fn profile(&self, id: &str) -> Result<Option<Profile>, StoreError> {
        self.txn.profile_record(id)
    }

    fn put_profile(&mut self, profile: &Profile) -> Result<(), StoreError> {
        self.txn
            .put_json(TableId::Profiles, keys::str(&profile.id), profile)
    }

    fn delete_profile(&mut self, id: &str) -> Result<(), StoreError> {
        self.txn.delete(TableId::Profiles, keys::str(id));
        Ok(())
    }

    fn next_number(&mut self) -> Result<u64, StoreError> {
        self.txn.next_number(NUMBER)
    }

    fn events(&self, profile: &str) -> Result<Vec<EventSummary>, StoreError> {
        let mut summaries = Vec::new();
        for seq in self.txn.profile_event_seqs(profile)? {
            if let Some(summary) = self.chunk.and_then(|chunk| chunk.get(&seq)) {
                summaries.push(summary.clone());
            } else if let Some(event) = self.txn.event(seq)? {
                let message = serde_json::to_value(&event.message)?;
                summaries.push(EventSummary::of(
                    event.seq,
                    &event.source,
                    &message,
                    self.rules,
                ));
            }
        }
        Ok(summaries)
    }

    fn put_event(&mut self, profile: &str, event: &EventSummary) -> Result<(), StoreError> {
        self.txn.put(
            TableId::ProfileEvents,
            keys::Key::new().str(profile).u64(event.seq).done(),
            Vec::new(),
        );
        Ok(())
    }

    fn delete_events(&mut self, profile: &str) -> Result<(), StoreError> {
        for (k, _) in self.txn.all(TableId::ProfileEvents, &keys::str(profile))? {
            self.txn.delete(TableId::ProfileEvents, k);
        }
        Ok(())
    }

    fn put_merge(&mut self, merge: &Merge) -> Result<(), StoreError> {
        self.txn
            .put_json(TableId::Merges, keys::u64(merge.id), merge)?;
        for profile in [&merge.survivor, &merge.merged] {
            self.txn.put(
                TableId::ProfileMerges,
                keys::Key::new().str(profile).u64(merge.id).done(),
                Vec::new(),
            );
        }
        Ok(())
    }

    fn merge(&self, id: u64) -> Result<Option<Merge>, StoreError> {
        self.txn.get_json(TableId::Merges, &keys::u64(id))
    }

    fn delete_merge(&mut self, id: u64) -> Result<(), StoreError> {
        if let Some(merge) = self.merge(id)? {
            for profile in [&merge.survivor, &merge.merged] {
                self.txn.delete(
                    TableId::ProfileMerges,
                    keys::Key::new().str(profile).u64(id).done(),
                );
            }
        }
        self.txn.delete(TableId::Merges, keys::u64(id));
        Ok(())
    }

    fn merges_of(&self, profile: &str) -> Result<Vec<Merge>, StoreError> {
        let prefix = keys::str(profile);
        let mut merges = Vec::new();
        for (k, _) in self.txn.all(TableId::ProfileMerges, &prefix)? {
            if let Some(merge) = self.merge(keys::read_u64(&k[prefix.len()..])?)? {
                merges.push(merge);
            }
        }
        Ok(merges)
    }

    fn is_suppressed(&self, id: &Identifier) -> Result<bool, StoreError> {
        Ok(self
            .txn
            .get(TableId::Suppressed, &identifier_key(id))?
            .is_some())
    }

    fn suppress(&mut self, id: &Identifier) -> Result<(), StoreError> {
        self.txn
            .put(TableId::Suppressed, identifier_key(id), Vec::new());
        Ok(())
    }
}

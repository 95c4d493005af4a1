//! Segment membership state: each profile's [`State`], the member index, the timers
//! and the numbered change feed.
//!
//! Rows: `MemberStates` profile → [`State`] (absent when it holds nothing); `Members`
//! `(segment, profile)` → nothing; `Changes` number → a change (its type is the segments
//! module's); `Timers` `(due ms, profile)` → nothing, at the profile's earliest moment;
//! `Computed` segment → the version computed for every profile. Change numbers are the
//! `membership` number of [`super::meta`].

use kith_segments::membership::State;
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::meta::Metadata;
use super::{Rows, TableId, Tables, Txn, keys};
use crate::error::StoreError;

/// The number changes are counted with.
pub const CHANGE_NUMBER: &str = "membership";

fn member_key(segment: &str, profile: &str) -> Vec<u8> {
    keys::Key::new().str(segment).str(profile).done()
}

fn timer_key(due_ms: u64, profile: &str) -> Vec<u8> {
    keys::Key::new().u64(due_ms).str(profile).done()
}

/// Reading membership state.
pub trait MembershipState: Tables {
    /// A profile's membership state (empty when none is stored).
    ///
    /// # Errors
    ///
    /// On a storage failure or an undecodable record.
    fn member_state(&self, profile: &str) -> Result<State, StoreError> {
        Ok(self
            .get_json(TableId::MemberStates, &keys::str(profile))?
            .unwrap_or_default())
    }

    /// Profiles' states in profile order after `after`, at most `limit`.
    ///
    /// # Errors
    ///
    /// On a storage failure or an undecodable record.
    fn member_states(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<(String, State)>, StoreError> {
        let from = after.map(keys::str);
        self.scan_prefix(
            TableId::MemberStates,
            &[],
            from.as_deref().map(|k| (k, true)),
            limit,
        )?
        .into_iter()
        .map(|(k, v)| Ok((keys::read_str(&k)?, serde_json::from_slice(&v)?)))
        .collect()
    }

    /// A page of a segment's members: profile ids after `after`, in id order.
    ///
    /// # Errors
    ///
    /// On a storage failure.
    fn members(
        &self,
        segment: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<String>, StoreError> {
        let prefix = keys::str(segment);
        let from = after.map(|after| member_key(segment, after));
        self.scan_prefix(
            TableId::Members,
            &prefix,
            from.as_deref().map(|k| (k, true)),
            limit,
        )?
        .into_iter()
        .map(|(k, _)| keys::read_str(&k[prefix.len()..]))
        .collect()
    }

    /// How many members a segment has.
    ///
    /// # Errors
    ///
    /// On a storage failure.
    fn member_count(&self, segment: &str) -> Result<usize, StoreError> {
        self.count(TableId::Members, &keys::str(segment))
    }

    /// Changes numbered after `after`, oldest first, at most `limit`.
    ///
    /// # Errors
    ///
    /// On a storage failure or an undecodable record.
    fn changes<C: DeserializeOwned>(&self, after: u64, limit: usize) -> Result<Vec<C>, StoreError> {
        let from = keys::u64(after);
        self.scan_prefix(TableId::Changes, &[], Some((&from, true)), limit)?
            .into_iter()
            .map(|(_, v)| Ok(serde_json::from_slice(&v)?))
            .collect()
    }

    /// The last change number given.
    ///
    /// # Errors
    ///
    /// On a storage failure.
    fn last_change(&self) -> Result<u64, StoreError> {
        self.number(CHANGE_NUMBER)
    }

    /// The earliest timers, as (due ms, profile), at most `limit`.
    ///
    /// # Errors
    ///
    /// On a storage failure.
    fn timers(&self, limit: usize) -> Result<Vec<(u64, String)>, StoreError> {
        self.scan_prefix(TableId::Timers, &[], None, limit)?
            .into_iter()
            .map(|(k, _)| {
                let mut parts = keys::Parts::of(&k);
                Ok((parts.u64()?, parts.str()?))
            })
            .collect()
    }

    /// The version of a segment computed for every profile.
    ///
    /// # Errors
    ///
    /// On a storage failure.
    fn computed(&self, segment: &str) -> Result<Option<String>, StoreError> {
        Ok(self
            .get(TableId::Computed, &keys::str(segment))?
            .map(|v| String::from_utf8_lossy(&v).into_owned()))
    }
}

impl<T: Tables + ?Sized> MembershipState for T {}

impl Txn<'_> {
    /// Stores a profile's state (removed when it holds nothing).
    ///
    /// # Errors
    ///
    /// When it cannot be encoded.
    pub fn put_member_state(&mut self, profile: &str, state: &State) -> Result<(), StoreError> {
        if *state == State::default() {
            self.delete(TableId::MemberStates, keys::str(profile));
            Ok(())
        } else {
            self.put_json(TableId::MemberStates, keys::str(profile), state)
        }
    }

    /// Adds a profile to a segment's members, or removes it.
    pub fn set_member(&mut self, segment: &str, profile: &str, member: bool) {
        if member {
            self.put(TableId::Members, member_key(segment, profile), Vec::new());
        } else {
            self.delete(TableId::Members, member_key(segment, profile));
        }
    }

    /// Sets or clears a profile's timer at `due_ms`.
    pub fn set_timer(&mut self, due_ms: u64, profile: &str, set: bool) {
        if set {
            self.put(TableId::Timers, timer_key(due_ms, profile), Vec::new());
        } else {
            self.delete(TableId::Timers, timer_key(due_ms, profile));
        }
    }

    /// Records a change under its number (taken with [`Txn::next_number`] and
    /// [`CHANGE_NUMBER`]).
    ///
    /// # Errors
    ///
    /// When it cannot be encoded.
    pub fn put_change<C: Serialize>(&mut self, number: u64, change: &C) -> Result<(), StoreError> {
        self.put_json(TableId::Changes, keys::u64(number), change)
    }

    /// Forgets a change.
    pub fn remove_change(&mut self, number: u64) {
        self.delete(TableId::Changes, keys::u64(number));
    }

    /// Records the version computed for every profile, or forgets it.
    pub fn set_computed(&mut self, segment: &str, version: Option<&str>) {
        match version {
            Some(version) => self.put(
                TableId::Computed,
                keys::str(segment),
                version.as_bytes().to_vec(),
            ),
            None => self.delete(TableId::Computed, keys::str(segment)),
        }
    }
}

//! Deterministic stitching: the [`Graph`] links an event's identifiers into one profile,
//! merges profiles whose identifiers meet, refuses what would break a guardrail, and
//! undoes merges (split) and erases profiles (delete with suppression).
//!
//! An event's identifiers are taken in priority order. The first one that has a profile
//! (or a new profile, when none has) is the anchor; each next identifier is linked to
//! it when it is new, or its profile is merged with it when it has another one — unless
//! the result would break a per-type limit or the cap, or the two were split apart: then
//! that lower-priority identifier is left out and the refusal is reported with its
//! reason. Blocked values never link. The older of two merging profiles survives, and the
//! merged id keeps resolving to it.

use crate::identifier::Identifier;
use crate::profile::{EventSummary, Profile};
use crate::rules::Rules;
use crate::store::{Merge, Store};

/// An identifier left out of an event's stitching, and why.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Refusal {
    /// The identifier.
    pub identifier: Identifier,
    /// Why.
    pub reason: String,
}

/// What stitching one event did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Resolution {
    /// The profile the event belongs to; none when it carries no usable identifier.
    pub profile: Option<String>,
    /// Merges it caused.
    pub merges: Vec<Merge>,
    /// Identifiers left out.
    pub refusals: Vec<Refusal>,
    /// Set when the event carries an erased identifier: it must be dropped.
    pub suppressed: Option<Identifier>,
}

/// Why two profiles merge, as the merge log records it.
struct Cause {
    event_seq: u64,
    message_id: String,
    identifiers: Vec<Identifier>,
    reason: String,
}

/// What a split restored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Split {
    /// The profile that had absorbed the other.
    pub survivor: String,
    /// The profile restored.
    pub restored: String,
}

/// Why a split cannot be done.
#[derive(Debug, thiserror::Error)]
pub enum SplitError<E> {
    /// No merge with that id, or its profiles are gone.
    #[error("{0}")]
    NotFound(String),
    /// It was undone already.
    #[error("merge {0} was already undone")]
    AlreadyUndone(u64),
    /// The store failed.
    #[error(transparent)]
    Store(E),
}

/// What erasing a profile removed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Deleted {
    /// The profile erased.
    pub profile: String,
    /// Its identifiers, now suppressed.
    pub identifiers: Vec<Identifier>,
    /// The `seq`s of its events, for the event store to erase.
    pub event_seqs: Vec<u64>,
}

/// The identity graph's logic over a [`Store`].
#[derive(Debug, Clone, Default)]
pub struct Graph {
    rules: Rules,
}

impl Graph {
    /// A graph applying `rules`.
    pub fn new(rules: Rules) -> Self {
        Graph { rules }
    }

    /// The rules.
    pub fn rules(&self) -> &Rules {
        &self.rules
    }

    /// The live profile answering for `id`: itself, or the one it was merged into.
    ///
    /// # Errors
    ///
    /// When the store fails.
    pub fn live<S: Store>(&self, store: &S, id: &str) -> Result<Option<Profile>, S::Error> {
        let mut current = store.profile(id)?;
        // Merge chains are short; the bound only guards against a corrupt cycle.
        for _ in 0..64 {
            match current {
                Some(Profile {
                    merged_into: Some(next),
                    ..
                }) => current = store.profile(&next)?,
                other => return Ok(other),
            }
        }
        Ok(None)
    }

    /// The live profile holding `id`.
    ///
    /// # Errors
    ///
    /// When the store fails.
    pub fn find<S: Store>(&self, store: &S, id: &Identifier) -> Result<Option<Profile>, S::Error> {
        match store.owner(id)? {
            Some(owner) => self.live(store, &owner),
            None => Ok(None),
        }
    }

    /// Stitches one event and attributes it to its profile (an event already applied,
    /// by `seq`, is not counted again).
    ///
    /// # Errors
    ///
    /// When the store fails.
    pub fn process<S: Store>(
        &self,
        store: &mut S,
        event: &EventSummary,
    ) -> Result<Resolution, S::Error> {
        let mut resolution = Resolution::default();
        for id in &event.identifiers {
            if store.is_suppressed(id)? {
                resolution.suppressed = Some(id.clone());
                return Ok(resolution);
            }
        }
        let mut ids: Vec<&Identifier> = Vec::new();
        for id in &event.identifiers {
            match self.rules.blocked(id) {
                Some(reason) => resolution.refusals.push(Refusal {
                    identifier: id.clone(),
                    reason,
                }),
                None => ids.push(id),
            }
        }
        ids.sort_by_key(|id| self.rules.rank(&id.kind));

        let mut anchor: Option<Profile> = None;
        let mut new = false;
        let mut linked: Vec<Identifier> = Vec::new();
        for id in ids {
            let owner = self.find(store, id)?;
            let Some(current) = anchor.as_mut() else {
                anchor = Some(match owner {
                    Some(profile) => profile,
                    None => {
                        new = true;
                        linked.push(id.clone());
                        let mut profile = Profile::new(String::new(), 0);
                        profile.identifiers.push(id.clone());
                        profile
                    }
                });
                continue;
            };
            match owner {
                None => self.link(current, id, &mut linked, &mut resolution.refusals),
                Some(other) if other.id == current.id => {}
                Some(other) if new => {
                    // The event's new identifiers so far join the profile found now.
                    let combined = union(&other.identifiers, &current.identifiers);
                    match self.rules.breach(&combined) {
                        None => {
                            let pending = std::mem::take(&mut current.identifiers);
                            let mut other = other;
                            for pending_id in pending {
                                if !other.identifiers.contains(&pending_id) {
                                    other.identifiers.push(pending_id);
                                }
                            }
                            anchor = Some(other);
                            new = false;
                        }
                        Some(reason) => resolution.refusals.push(Refusal {
                            identifier: id.clone(),
                            reason: format!("{id} belongs to {}, not merged: {reason}", other.id),
                        }),
                    }
                }
                Some(other) => {
                    let split = current.split_from.contains(&other.id)
                        || other.split_from.contains(&current.id);
                    let breach = self
                        .rules
                        .breach(&union(&current.identifiers, &other.identifiers));
                    match (split, breach) {
                        (false, None) => {
                            let taken = anchor.take().unwrap_or_else(|| other.clone());
                            let (survivor, merge) = self.merge(store, taken, other, event, id)?;
                            resolution.merges.push(merge);
                            anchor = Some(survivor);
                        }
                        (true, _) => resolution.refusals.push(Refusal {
                            identifier: id.clone(),
                            reason: format!(
                                "{id} belongs to {}, which was split from {}",
                                other.id, current.id
                            ),
                        }),
                        (false, Some(reason)) => resolution.refusals.push(Refusal {
                            identifier: id.clone(),
                            reason: format!(
                                "{id} belongs to {}, not merged with {}: {reason}",
                                other.id, current.id
                            ),
                        }),
                    }
                }
            }
        }
        let Some(mut profile) = anchor else {
            return Ok(resolution);
        };
        if new {
            let number = store.next_number()?;
            profile.id = format!("prf_{number}");
            profile.created = number;
        }
        for id in &linked {
            if profile.identifiers.contains(id) {
                store.set_owner(id, Some(&profile.id))?;
            }
        }
        if event.seq > profile.last_seq {
            profile.apply(event, &self.rules);
            store.put_event(&profile.id, event)?;
        }
        store.put_profile(&profile)?;
        resolution.profile = Some(profile.id);
        Ok(resolution)
    }

    /// Links a new identifier to `profile` unless a guardrail says no.
    fn link(
        &self,
        profile: &mut Profile,
        id: &Identifier,
        linked: &mut Vec<Identifier>,
        refusals: &mut Vec<Refusal>,
    ) {
        let mut with: Vec<&Identifier> = profile.identifiers.iter().collect();
        with.push(id);
        match self.rules.breach(&with) {
            None => {
                profile.identifiers.push(id.clone());
                linked.push(id.clone());
            }
            Some(reason) => refusals.push(Refusal {
                identifier: id.clone(),
                reason: format!("{id} not linked to {}: {reason}", profile.id_or_new()),
            }),
        }
    }

    /// Merges two live profiles because an event's identifier links them.
    fn merge<S: Store>(
        &self,
        store: &mut S,
        a: Profile,
        b: Profile,
        event: &EventSummary,
        id: &Identifier,
    ) -> Result<(Profile, Merge), S::Error> {
        let cause = Cause {
            event_seq: event.seq,
            message_id: event.message_id.clone(),
            identifiers: event.identifiers.clone(),
            reason: format!("event {} carries {id}, which links both", event.message_id),
        };
        self.join(store, a, b, cause)
    }

    /// Merges two live profiles: the older survives and takes the other's identifiers,
    /// traits, counts and events. Answers the survivor and the merge record.
    fn join<S: Store>(
        &self,
        store: &mut S,
        a: Profile,
        b: Profile,
        cause: Cause,
    ) -> Result<(Profile, Merge), S::Error> {
        let (mut survivor, mut merged) = if a.created <= b.created {
            (a, b)
        } else {
            (b, a)
        };
        let merge = Merge {
            id: store.next_number()?,
            survivor: survivor.id.clone(),
            merged: merged.id.clone(),
            event_seq: cause.event_seq,
            message_id: cause.message_id,
            identifiers: cause.identifiers,
            reason: cause.reason,
            merged_identifiers: merged.identifiers.clone(),
            undone: false,
        };
        self.absorb(store, &mut survivor, &mut merged)?;
        store.put_merge(&merge)?;
        Ok((survivor, merge))
    }

    fn absorb<S: Store>(
        &self,
        store: &mut S,
        survivor: &mut Profile,
        merged: &mut Profile,
    ) -> Result<(), S::Error> {
        survivor.absorb(merged, &self.rules);
        for id in &merged.identifiers {
            store.set_owner(id, Some(&survivor.id))?;
        }
        for event in store.events(&merged.id)? {
            store.put_event(&survivor.id, &event)?;
        }
        store.delete_events(&merged.id)?;
        merged.merged_into = Some(survivor.id.clone());
        merged.identifiers.clear();
        merged.reset_derived();
        store.put_profile(merged)?;
        store.put_profile(survivor)
    }

    /// Merges two profiles on another ground than a shared identifier (probabilistic
    /// matching, an admin), if the guardrails allow; answers the merge.
    ///
    /// # Errors
    ///
    /// When the store fails; `Ok(Err(reason))` when a guardrail refuses.
    pub fn merge_profiles<S: Store>(
        &self,
        store: &mut S,
        a: &str,
        b: &str,
        reason: &str,
    ) -> Result<Result<Merge, String>, S::Error> {
        let (Some(a), Some(b)) = (self.live(store, a)?, self.live(store, b)?) else {
            return Ok(Err("no such profile".to_owned()));
        };
        if a.id == b.id {
            return Ok(Err(format!(
                "{} and {} are one profile already",
                a.id, b.id
            )));
        }
        if a.split_from.contains(&b.id) || b.split_from.contains(&a.id) {
            return Ok(Err(format!("{} was split from {}", a.id, b.id)));
        }
        if let Some(breach) = self.rules.breach(&union(&a.identifiers, &b.identifiers)) {
            return Ok(Err(breach));
        }
        let cause = Cause {
            event_seq: 0,
            message_id: String::new(),
            identifiers: Vec::new(),
            reason: reason.to_owned(),
        };
        let (_, merge) = self.join(store, a, b, cause)?;
        Ok(Ok(merge))
    }

    /// Undoes a merge: the merged profile gets back its identifiers (those its survivor
    /// still holds), the events are re-attributed by their highest-priority identifier,
    /// both profiles are rebuilt from their events, and the two are never merged
    /// automatically again.
    ///
    /// # Errors
    ///
    /// An unknown or undone merge, or a store failure.
    pub fn split<S: Store>(
        &self,
        store: &mut S,
        merge_id: u64,
    ) -> Result<Split, SplitError<S::Error>> {
        let mut merge = store
            .merge(merge_id)
            .map_err(SplitError::Store)?
            .ok_or_else(|| SplitError::NotFound(format!("no merge {merge_id}")))?;
        if merge.undone {
            return Err(SplitError::AlreadyUndone(merge_id));
        }
        let gone = || SplitError::NotFound(format!("the profiles of merge {merge_id} were erased"));
        let mut holder = self
            .live(store, &merge.survivor)
            .map_err(SplitError::Store)?
            .ok_or_else(gone)?;
        let mut restored = store
            .profile(&merge.merged)
            .map_err(SplitError::Store)?
            .ok_or_else(gone)?;
        restored.identifiers = merge
            .merged_identifiers
            .iter()
            .filter(|id| holder.identifiers.contains(id))
            .cloned()
            .collect();
        holder
            .identifiers
            .retain(|id| !restored.identifiers.contains(id));
        restored.merged_into = None;
        for id in &restored.identifiers {
            store
                .set_owner(id, Some(&restored.id))
                .map_err(SplitError::Store)?;
        }
        let events = store.events(&holder.id).map_err(SplitError::Store)?;
        store.delete_events(&holder.id).map_err(SplitError::Store)?;
        holder.reset_derived();
        restored.reset_derived();
        for event in events {
            let mut ranked: Vec<&Identifier> = event.identifiers.iter().collect();
            ranked.sort_by_key(|id| self.rules.rank(&id.kind));
            let to_restored = ranked
                .iter()
                .find(|id| restored.identifiers.contains(id) || holder.identifiers.contains(id))
                .is_some_and(|id| restored.identifiers.contains(id));
            let target = if to_restored {
                &mut restored
            } else {
                &mut holder
            };
            target.apply(&event, &self.rules);
            store
                .put_event(&target.id, &event)
                .map_err(SplitError::Store)?;
        }
        holder.split_from.push(restored.id.clone());
        restored.split_from.push(holder.id.clone());
        store.put_profile(&holder).map_err(SplitError::Store)?;
        store.put_profile(&restored).map_err(SplitError::Store)?;
        merge.undone = true;
        store.put_merge(&merge).map_err(SplitError::Store)?;
        Ok(Split {
            survivor: holder.id,
            restored: restored.id,
        })
    }

    /// Erases a profile (or the one it was merged into): its identifiers are unlinked
    /// and suppressed, its events and merges forgotten. Answers what was erased, for the
    /// event store to erase the events too.
    ///
    /// # Errors
    ///
    /// When the store fails.
    pub fn delete<S: Store>(&self, store: &mut S, id: &str) -> Result<Option<Deleted>, S::Error> {
        let Some(profile) = self.live(store, id)? else {
            return Ok(None);
        };
        for id in &profile.identifiers {
            store.suppress(id)?;
            store.set_owner(id, None)?;
        }
        let event_seqs = store.events(&profile.id)?.iter().map(|e| e.seq).collect();
        store.delete_events(&profile.id)?;
        let mut merged = vec![profile.id.clone()];
        let mut i = 0;
        while let Some(current) = merged.get(i).cloned() {
            for merge in store.merges_of(&current)? {
                if merge.survivor == current && !merge.undone {
                    merged.push(merge.merged.clone());
                }
                store.delete_merge(merge.id)?;
            }
            store.delete_profile(&current)?;
            i += 1;
        }
        Ok(Some(Deleted {
            profile: profile.id,
            identifiers: profile.identifiers,
            event_seqs,
        }))
    }
}

fn union<'a>(a: &'a [Identifier], b: &'a [Identifier]) -> Vec<&'a Identifier> {
    let mut all: Vec<&Identifier> = a.iter().collect();
    for id in b {
        if !all.contains(&id) {
            all.push(id);
        }
    }
    all
}

impl Profile {
    fn id_or_new(&self) -> &str {
        if self.id.is_empty() {
            "a new profile"
        } else {
            &self.id
        }
    }
}

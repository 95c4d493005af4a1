//! Real-time membership: kith-segments' incremental [`Catalog`] run on the embedded
//! store, as a pipeline stage after identity resolution and on a background thread for
//! window timers and for computing new or edited segments.
//!
//! - The stage notes, per chunk, which profiles its events touched and what they changed
//!   (trait names, `track` event names); at the chunk's end those profiles, and those
//!   whose make-up a merge changed, are re-evaluated for the segments touched.
//! - Each profile's [`State`] (memberships, identifier types, per windowed segment the
//!   moment time alone can change it) is stored with a timer entry at its earliest
//!   moment; the background thread wakes at the earliest timer and re-evaluates what came
//!   due, so a profile leaves a window's segment when the window passes, with no rescan.
//! - Every enter and exit is recorded once, as a [`MembershipChange`] numbered in order:
//!   it is written in the same atomic batch as the state it moves, so a replayed chunk,
//!   which finds the state already moved, records nothing twice.
//! - A created or edited segment is computed for every live profile in the background,
//!   in batches, with its progress visible ([`Progress`]); a deleted one is forgotten.
//!
//! Keys of the membership tree: `p\0{profile}` → [`State`] (absent when it holds
//! nothing); `i\0{segment}\0{profile}` → a member; `h\0{number}` → a
//! [`MembershipChange`]; `t\0{due ms}\0{profile}` → a timer; `c\0{segment}` → the
//! version (`updated_at`) computed for all profiles; `n` → the last change number.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};
use std::time::Duration;

use jiff::Timestamp;
use kith_sdk_core::protocol::Message;
use kith_segments::eval::EventRecord;
use kith_segments::membership::{Catalog, Change, State, Subject, Transition};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::Segment;
use crate::error::StoreError;
use crate::health::panic_message;
use crate::identity::Identity;
use crate::pipeline::{Outcome, Stage};
use crate::store::{Space, Store, StoredEvent, Writes, space_key as key};
use crate::worker::Worker;

/// Profiles re-evaluated per batch when a segment is computed for all of them: small,
/// so that the pipeline never waits long for a batch to let go.
const BATCH: usize = 100;
/// Timers handled per pass.
const TIMERS_PER_PASS: usize = 1_000;
/// The longest the background thread sleeps without looking at the timers.
const MAX_SLEEP: Duration = Duration::from_secs(60);

fn timer_key(due: Timestamp, profile: &str) -> Vec<u8> {
    // Rounded up to the millisecond: a timer never fires before its moment.
    let ms = u64::try_from(due.as_millisecond()).unwrap_or(0) + 1;
    key(b't', &[&ms.to_be_bytes(), profile.as_bytes()])
}

/// Why memberships were re-evaluated.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Cause {
    /// An event of the profile (the last one of its chunk).
    Event,
    /// A merge, split or deletion changed the profile, or a push token was removed.
    Profile,
    /// A window passed.
    Time,
    /// The segment was created or edited and computed for existing profiles.
    Computed,
    /// The profile was erased (`DELETE /v1/profiles/{id}`): it left every segment, and
    /// these exits trigger no campaign.
    Erased,
}

/// One enter or exit, as activation consumes it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MembershipChange {
    /// Its number: changes are numbered in the order they happened.
    pub id: u64,
    /// The segment.
    pub segment: String,
    /// The profile.
    pub profile_id: String,
    /// `entered` or `exited`.
    #[serde(rename = "type")]
    pub kind: Kind,
    /// When it was found.
    pub at: Timestamp,
    /// What led to it.
    pub cause: Cause,
    /// The event that led to it (`cause` = `event`): its `seq` and when it was received.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event_seq: Option<u64>,
    /// When that event was received.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event_received_at: Option<Timestamp>,
}

/// Entered or exited.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// The profile entered the segment.
    Entered,
    /// The profile left it.
    Exited,
}

/// How far the computation of a segment for existing profiles is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Progress {
    /// `computing`, `ready`, or `failed` (the computation stopped on an error: saving
    /// the segment again retries it).
    pub state: String,
    /// Profiles evaluated.
    pub done: usize,
    /// Profiles to evaluate.
    pub total: usize,
    /// Why the computation failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// One profile to re-evaluate.
#[derive(Debug, Default)]
struct Update {
    change: Change,
    cause: Option<Cause>,
    event: Option<(u64, Option<Timestamp>)>,
    /// The timer entries that fired, removed whatever the state says.
    timers: Vec<Vec<u8>>,
}

/// What the stage gathered in the current chunk.
#[derive(Debug, Default)]
struct Chunk {
    touched: BTreeMap<String, Update>,
    /// The chunk's events as processed, by `seq`: the log still holds them as received.
    events: HashMap<u64, EventRecord>,
}

/// Work for the background thread.
#[derive(Debug)]
enum Job {
    /// Compute a segment for every live profile (this generation of it).
    Compute(String, u64),
    /// Forget a deleted segment.
    Forget(String),
    /// Timers may have moved earlier.
    Tick,
}

/// Identifier types a profile has outside the identity graph (push tokens, kept by
/// activation), for `has` conditions.
pub trait MoreIdentifiers: Send + Sync + std::fmt::Debug {
    /// Whether it can give identifier type `kind` (only then is it asked).
    fn provides(&self, kind: &str) -> bool;

    /// The extra identifier types of a live profile.
    ///
    /// # Errors
    ///
    /// On a storage failure.
    fn identifier_types(&self, profile: &str) -> Result<BTreeSet<String>, StoreError>;
}

/// The membership engine of a collector.
#[derive(Debug)]
pub struct Membership {
    more: RwLock<Option<std::sync::Weak<dyn MoreIdentifiers>>>,
    store: Arc<Store>,
    identity: Arc<Identity>,
    catalog: RwLock<Arc<Catalog>>,
    /// Serialises re-evaluations (stage, timers, computations, admin operations).
    updating: Mutex<()>,
    chunk: Mutex<Chunk>,
    progress: Mutex<BTreeMap<String, (u64, Progress)>>,
    worker: Mutex<Option<Worker<Job>>>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The record segments read from a `track` event.
pub fn event_record(message: &Message) -> Option<EventRecord> {
    let Message::Track(track) = message else {
        return None;
    };
    Some(EventRecord {
        name: track.event.clone()?,
        timestamp: track.common.timestamp.or(track.common.received_at)?,
        properties: track.properties.clone().unwrap_or_default(),
    })
}

/// What an event changes on its profile: the trait names it sets and its event name.
fn change_of(message: &Message) -> Change {
    let traits = match message {
        Message::Identify(m) => m.traits.as_ref(),
        Message::Group(m) => m.traits.as_ref(),
        _ => None,
    }
    .or_else(|| {
        message
            .common()
            .context
            .as_ref()?
            .get("traits")?
            .as_object()
    });
    Change {
        traits: traits
            .map(|t| t.keys().cloned().collect())
            .unwrap_or_default(),
        events: match message {
            Message::Track(t) => t.event.iter().cloned().collect(),
            _ => BTreeSet::new(),
        },
        ..Change::default()
    }
}

impl Membership {
    /// The engine over `store` and `identity`, with the stored `segments`; starts the
    /// background thread and queues the computation of every segment not computed in
    /// its current version.
    ///
    /// # Errors
    ///
    /// A storage failure, or when the thread cannot start.
    pub fn start(
        store: Arc<Store>,
        identity: Arc<Identity>,
        segments: &[Segment],
        health: &Arc<crate::health::Health>,
    ) -> Result<Arc<Self>, StoreError> {
        let membership = Arc::new(Membership {
            more: RwLock::new(None),
            store,
            identity,
            catalog: RwLock::new(Arc::new(Catalog::default())),
            updating: Mutex::new(()),
            chunk: Mutex::new(Chunk::default()),
            progress: Mutex::new(BTreeMap::new()),
            worker: Mutex::new(None),
        });
        membership.set_catalog(segments);
        let mut queued = vec![Job::Tick];
        for segment in segments {
            let computed = membership
                .store
                .get(Space::Membership, &key(b'c', &[segment.key.as_bytes()]))?;
            if computed.as_deref() != Some(segment.updated_at.to_string().as_bytes()) {
                queued.push(Job::Compute(
                    segment.key.clone(),
                    membership.begin(&segment.key),
                ));
            } else {
                membership.finish(&segment.key, 0, 0);
            }
        }
        let engine = Arc::downgrade(&membership);
        let worker = Worker::start("segments", health, queued, move |rx| {
            background(&engine, rx);
        })?;
        *lock(&membership.worker) = Some(worker);
        Ok(membership)
    }

    /// Stops the background thread after its current job.
    pub fn close(&self) {
        let worker = lock(&self.worker).take();
        if let Some(worker) = worker {
            worker.close();
        }
    }

    /// Takes identifier types from `more` too (activation's push tokens).
    pub fn add_identifiers(&self, more: std::sync::Weak<dyn MoreIdentifiers>) {
        *self.more.write().unwrap_or_else(PoisonError::into_inner) = Some(more);
    }

    /// The identifier types of a live profile: its graph identifiers', and the others'
    /// when a segment of `catalog` reads one of them.
    ///
    /// # Errors
    ///
    /// On a storage failure.
    pub fn identifier_types(
        &self,
        profile: &kith_identity::profile::Profile,
        catalog: &Catalog,
    ) -> Result<BTreeSet<String>, StoreError> {
        let mut types: BTreeSet<String> =
            profile.identifiers.iter().map(|i| i.kind.clone()).collect();
        let more = self
            .more
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref()
            .and_then(std::sync::Weak::upgrade)
            .filter(|more| catalog.identifier_types().iter().any(|k| more.provides(k)));
        if let Some(more) = more {
            types.extend(more.identifier_types(&profile.id)?);
        }
        Ok(types)
    }

    /// Re-evaluates a profile whose identifier types outside the graph changed.
    ///
    /// # Errors
    ///
    /// On a storage failure.
    pub fn touch(&self, profile: &str) -> Result<(), StoreError> {
        let _updating = lock(&self.updating);
        let mut updates = BTreeMap::new();
        updates.insert(
            profile.to_owned(),
            Update {
                cause: Some(Cause::Profile),
                ..Update::default()
            },
        );
        self.apply(updates, &HashMap::new())
    }

    fn set_catalog(&self, segments: &[Segment]) {
        let catalog = Catalog::new(segments.iter().map(|s| (s.key.clone(), s.tree.clone())));
        *self.catalog.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(catalog);
    }

    fn catalog(&self) -> Arc<Catalog> {
        self.catalog
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn send(&self, job: Job) {
        if let Some(worker) = lock(&self.worker).as_ref()
            && worker.send(job).is_err()
        {
            tracing::warn!("segments thread stopped; a membership job is dropped");
        }
    }

    /// Starts a new generation of a segment's computation.
    fn begin(&self, segment: &str) -> u64 {
        let mut progress = lock(&self.progress);
        let generation = progress.get(segment).map_or(1, |(g, _)| g + 1);
        progress.insert(
            segment.to_owned(),
            (
                generation,
                Progress {
                    state: "computing".to_owned(),
                    done: 0,
                    total: 0,
                    error: None,
                },
            ),
        );
        generation
    }

    fn finish(&self, segment: &str, done: usize, total: usize) {
        let mut progress = lock(&self.progress);
        let generation = progress.get(segment).map_or(1, |(g, _)| *g);
        progress.insert(
            segment.to_owned(),
            (
                generation,
                Progress {
                    state: "ready".to_owned(),
                    done,
                    total,
                    error: None,
                },
            ),
        );
    }

    /// Marks the computation of `segment` failed, with the reason.
    fn failed(&self, segment: &str, error: String) {
        if let Some((_, progress)) = lock(&self.progress).get_mut(segment) {
            progress.state = "failed".to_owned();
            progress.error = Some(error);
        }
    }

    /// How far the computation of `segment` is.
    pub fn progress(&self, segment: &str) -> Option<Progress> {
        lock(&self.progress).get(segment).map(|(_, p)| p.clone())
    }

    /// A segment was created or edited: take the new definitions and compute it for
    /// every profile in the background.
    pub fn segment_saved(&self, segments: &[Segment], key: &str) {
        self.set_catalog(segments);
        let generation = self.begin(key);
        self.send(Job::Compute(key.to_owned(), generation));
    }

    /// A segment was deleted: take the new definitions and forget its members.
    pub fn segment_deleted(&self, segments: &[Segment], key: &str) {
        self.set_catalog(segments);
        lock(&self.progress).remove(key);
        self.send(Job::Forget(key.to_owned()));
    }

    /// The segments a live profile is a member of, as last evaluated.
    ///
    /// # Errors
    ///
    /// On a storage failure.
    pub fn segments_of(&self, profile: &str) -> Result<BTreeSet<String>, StoreError> {
        Ok(self.state(profile)?.segments)
    }

    /// A page of a segment's members: profile ids after `after`, in id order.
    ///
    /// # Errors
    ///
    /// On a storage failure.
    pub fn members(
        &self,
        segment: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<String>, StoreError> {
        let prefix = key(b'i', &[segment.as_bytes(), b""]);
        let from = match after {
            Some(after) => {
                let mut from = key(b'i', &[segment.as_bytes(), after.as_bytes()]);
                from.push(0); // just after `after`
                from
            }
            None => prefix.clone(),
        };
        let page = self
            .store
            .scan_from(Space::Membership, &prefix, &from, limit)?
            .into_iter()
            .map(|(k, _)| String::from_utf8_lossy(&k[prefix.len()..]).into_owned())
            .collect();
        Ok(page)
    }

    /// How many members a segment has.
    ///
    /// # Errors
    ///
    /// On a storage failure.
    pub fn member_count(&self, segment: &str) -> Result<usize, StoreError> {
        self.store
            .count(Space::Membership, &key(b'i', &[segment.as_bytes(), b""]))
    }

    /// Calls `visit` with every member of a segment, in id order, a page at a time.
    ///
    /// # Errors
    ///
    /// On a storage failure, or what `visit` answers.
    pub fn each_member(
        &self,
        segment: &str,
        mut visit: impl FnMut(&str) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        const PAGE: usize = 1_000;
        let mut after: Option<String> = None;
        loop {
            let page = self.members(segment, after.as_deref(), PAGE)?;
            for id in &page {
                visit(id)?;
            }
            if page.len() < PAGE {
                return Ok(());
            }
            after = page.last().cloned();
        }
    }

    /// Forgets the membership history of erased profiles, but for the exits their
    /// erasure recorded; answers how many records went.
    ///
    /// # Errors
    ///
    /// On a storage failure.
    pub fn forget_history(&self, profiles: &BTreeSet<String>) -> Result<usize, StoreError> {
        let _updating = lock(&self.updating);
        let prefix = key(b'h', &[b""]);
        let mut writes = Writes::new();
        for (k, v) in self.store.scan(Space::Membership, &prefix)? {
            let Ok(change) = serde_json::from_slice::<MembershipChange>(&v) else {
                continue;
            };
            if profiles.contains(&change.profile_id) && change.cause != Cause::Erased {
                writes.insert(k, None);
            }
        }
        let removed = writes.len();
        self.store.apply(Space::Membership, writes)?;
        self.store.flush()?;
        Ok(removed)
    }

    /// Membership changes numbered after `after`, oldest first, at most `limit`, of a
    /// segment and a profile when given.
    ///
    /// # Errors
    ///
    /// On a storage failure or an undecodable record.
    pub fn changes(
        &self,
        after: u64,
        limit: usize,
        segment: Option<&str>,
        profile: Option<&str>,
    ) -> Result<Vec<MembershipChange>, StoreError> {
        let prefix = key(b'h', &[b""]);
        let from = key(b'h', &[&after.saturating_add(1).to_be_bytes()]);
        let mut found = Vec::new();
        for entry in self
            .store
            .scan_from(Space::Membership, &prefix, &from, usize::MAX)?
        {
            let change: MembershipChange = serde_json::from_slice(&entry.1)?;
            if segment.is_none_or(|s| s == change.segment)
                && profile.is_none_or(|p| p == change.profile_id)
            {
                found.push(change);
                if found.len() == limit {
                    break;
                }
            }
        }
        Ok(found)
    }

    fn state(&self, profile: &str) -> Result<State, StoreError> {
        Ok(self
            .store
            .get(Space::Membership, &key(b'p', &[profile.as_bytes()]))?
            .map(|v| serde_json::from_slice(&v))
            .transpose()?
            .unwrap_or_default())
    }

    /// Re-evaluates the profiles whose make-up changed (merges, splits, deletes) since
    /// they were last evaluated. Admin operations call it after changing the graph.
    ///
    /// # Errors
    ///
    /// On a storage failure.
    pub fn refresh(&self) -> Result<(), StoreError> {
        let _updating = lock(&self.updating);
        self.refresh_changed(BTreeMap::new(), &HashMap::new())
    }

    /// Re-evaluates `updates` and the profiles marked changed by the identity graph,
    /// then clears those marks. Holds `updating`.
    fn refresh_changed(
        &self,
        mut updates: BTreeMap<String, Update>,
        chunk_events: &HashMap<u64, EventRecord>,
    ) -> Result<(), StoreError> {
        let marks = self.identity.changed_profiles()?;
        for (profile, _) in &marks {
            let update = updates.entry(profile.clone()).or_default();
            update.change.everything = true;
            update.cause = Some(Cause::Profile);
        }
        self.apply(updates, chunk_events)?;
        self.identity.clear_changed(&marks)
    }

    /// Re-evaluates profiles and writes, in one batch, their states, the member index,
    /// their timers and the changes found. Holds `updating`.
    fn apply(
        &self,
        updates: BTreeMap<String, Update>,
        chunk_events: &HashMap<u64, EventRecord>,
    ) -> Result<(), StoreError> {
        if updates.is_empty() {
            return Ok(());
        }
        let catalog = self.catalog();
        let now = Timestamp::now();
        let mut writes = Writes::new();
        let mut number: u64 = match self.store.get(Space::Membership, b"n")? {
            Some(bytes) => u64::from_be_bytes(
                bytes
                    .as_slice()
                    .try_into()
                    .map_err(|_| StoreError::Corrupt("membership change number".to_owned()))?,
            ),
            None => 0,
        };
        let mut timers_moved = false;
        for (profile_id, mut update) in updates {
            for fired in std::mem::take(&mut update.timers) {
                writes.insert(fired, None);
            }
            let before = self.state(&profile_id)?;
            let mut state = before.clone();
            let found = self.identity.profile(&profile_id)?;
            if found.is_none() {
                update.cause = Some(Cause::Erased);
            }
            let transitions = match found {
                Some(profile) if profile.id == profile_id => {
                    update.change.segments.extend(state.due_at(now));
                    let traits = profile.trait_values();
                    let identifiers = self.identifier_types(&profile, &catalog)?;
                    catalog.update(
                        &mut state,
                        &update.change,
                        Subject {
                            traits: &traits,
                            identifiers: &identifiers,
                        },
                        || self.events(&profile_id, catalog.event_names(), chunk_events),
                        now,
                    )?
                }
                // Merged into another, or deleted.
                _ => state.leave_all(),
            };
            timers_moved |= write_state(&mut writes, &profile_id, &before, &state)?;
            for Transition { segment, entered } in transitions {
                let member = key(b'i', &[segment.as_bytes(), profile_id.as_bytes()]);
                writes.insert(member, entered.then(Vec::new));
                number += 1;
                let change = MembershipChange {
                    id: number,
                    segment,
                    profile_id: profile_id.clone(),
                    kind: if entered { Kind::Entered } else { Kind::Exited },
                    at: now,
                    cause: update.cause.clone().unwrap_or(Cause::Event),
                    event_seq: update.event.map(|(seq, _)| seq),
                    event_received_at: update.event.and_then(|(_, at)| at),
                };
                writes.insert(
                    key(b'h', &[&number.to_be_bytes()]),
                    Some(serde_json::to_vec(&change)?),
                );
            }
        }
        writes.insert(b"n".to_vec(), Some(number.to_be_bytes().to_vec()));
        self.store.apply(Space::Membership, writes)?;
        if timers_moved {
            self.send(Job::Tick);
        }
        Ok(())
    }

    /// A profile's events that segments read, oldest first; this chunk's as processed.
    fn events(
        &self,
        profile: &str,
        names: &BTreeSet<String>,
        chunk_events: &HashMap<u64, EventRecord>,
    ) -> Result<Vec<EventRecord>, StoreError> {
        let seqs = self.identity.event_seqs(profile)?;
        let (ours, stored): (Vec<u64>, Vec<u64>) =
            seqs.into_iter().partition(|s| chunk_events.contains_key(s));
        let mut events: Vec<EventRecord> = self
            .store
            .events_by_seq(&stored)?
            .iter()
            .filter_map(|e| event_record(&e.message))
            .collect();
        events.extend(ours.iter().filter_map(|s| chunk_events.get(s).cloned()));
        events.retain(|e| names.contains(&e.name));
        Ok(events)
    }

    /// The pipeline stage.
    pub fn stage(self: &Arc<Self>) -> Track {
        Track {
            membership: self.clone(),
        }
    }

    /// Re-evaluates the profiles whose timers came due; answers whether there may be
    /// more.
    fn fire_timers(&self) -> Result<bool, StoreError> {
        let now_ms = u64::try_from(Timestamp::now().as_millisecond()).unwrap_or(0);
        let prefix = key(b't', &[b""]);
        let due: Vec<Vec<u8>> = self
            .store
            .scan_from(Space::Membership, &prefix, &prefix, TIMERS_PER_PASS)?
            .into_iter()
            .map(|(k, _)| k)
            .take_while(|k| timer_ms(k, prefix.len()) <= now_ms)
            .collect();
        if due.is_empty() {
            return Ok(false);
        }
        let more = due.len() == TIMERS_PER_PASS;
        let mut updates: BTreeMap<String, Update> = BTreeMap::new();
        for timer in due {
            let profile = String::from_utf8_lossy(&timer[prefix.len() + 9..]).into_owned();
            let update = updates.entry(profile).or_default();
            update.cause = Some(Cause::Time);
            update.timers.push(timer);
        }
        let _updating = lock(&self.updating);
        self.apply(updates, &HashMap::new())?;
        Ok(more)
    }

    /// How long until the earliest timer.
    fn until_next_timer(&self) -> Result<Duration, StoreError> {
        let prefix = key(b't', &[b""]);
        let first = self
            .store
            .scan_from(Space::Membership, &prefix, &prefix, 1)?
            .into_iter()
            .next();
        let Some((k, _)) = first else {
            return Ok(MAX_SLEEP);
        };
        let now_ms = u64::try_from(Timestamp::now().as_millisecond()).unwrap_or(0);
        Ok(Duration::from_millis(timer_ms(&k, prefix.len()).saturating_sub(now_ms)).min(MAX_SLEEP))
    }

    /// Computes a segment for every live profile, in batches; stops early when a newer
    /// generation of it was queued.
    fn compute(&self, segment: &str, generation: u64) -> Result<(), StoreError> {
        let current = || lock(&self.progress).get(segment).map(|(g, _)| *g) == Some(generation);
        if !current() {
            return Ok(());
        }
        let Some(version) = super::all(&self.store)?
            .remove(segment)
            .map(|s| s.updated_at)
        else {
            return Ok(());
        };
        let total = self.store.count(Space::Identity, b"p\0")?;
        let mut done = 0;
        let mut after: Option<String> = None;
        loop {
            if !current() {
                return Ok(());
            }
            let batch = self.identity.live_profile_ids(after.as_deref(), BATCH)?;
            let Some(last) = batch.last().cloned() else {
                break;
            };
            done += batch.len();
            let updates = batch
                .into_iter()
                .map(|profile| {
                    (
                        profile,
                        Update {
                            change: Change::segments([segment.to_owned()]),
                            cause: Some(Cause::Computed),
                            ..Update::default()
                        },
                    )
                })
                .collect();
            {
                let _updating = lock(&self.updating);
                self.apply(updates, &HashMap::new())?;
            }
            if let Some((_, progress)) = lock(&self.progress).get_mut(segment) {
                progress.done = done;
                progress.total = total.max(done);
            }
            after = Some(last);
            // Timers keep firing while a large segment computes.
            while self.fire_timers()? {}
        }
        let total = done;
        if current() {
            let mut writes = Writes::new();
            writes.insert(
                key(b'c', &[segment.as_bytes()]),
                Some(version.to_string().into_bytes()),
            );
            self.store.apply(Space::Membership, writes)?;
            self.finish(segment, total, total);
        }
        Ok(())
    }

    /// Forgets a deleted segment: its members' states drop it; no exit is recorded.
    fn forget(&self, segment: &str) -> Result<(), StoreError> {
        let prefix = key(b'i', &[segment.as_bytes(), b""]);
        let _updating = lock(&self.updating);
        let mut writes = Writes::new();
        let mut profiles: BTreeSet<String> = BTreeSet::new();
        for (k, _) in self.store.scan(Space::Membership, &prefix)? {
            profiles.insert(String::from_utf8_lossy(&k[prefix.len()..]).into_owned());
            writes.insert(k, None);
        }
        // Profiles with a timer for it but not members.
        for (k, v) in self.store.scan(Space::Membership, &key(b'p', &[b""]))? {
            let state: State = serde_json::from_slice(&v)?;
            if state.due.contains_key(segment) {
                profiles.insert(String::from_utf8_lossy(&k[2..]).into_owned());
            }
        }
        for profile in profiles {
            let before = self.state(&profile)?;
            let mut state = before.clone();
            state.forget(segment);
            write_state(&mut writes, &profile, &before, &state)?;
        }
        writes.insert(key(b'c', &[segment.as_bytes()]), None);
        self.store.apply(Space::Membership, writes)
    }
}

/// Writes a profile's new state (none when it holds nothing) and moves its timer;
/// answers whether a timer was set.
fn write_state(
    writes: &mut Writes,
    profile: &str,
    before: &State,
    state: &State,
) -> Result<bool, StoreError> {
    let state_key = key(b'p', &[profile.as_bytes()]);
    if state.segments.is_empty() && state.due.is_empty() {
        if *before != State::default() {
            writes.insert(state_key, None);
        }
    } else if state != before {
        writes.insert(state_key, Some(serde_json::to_vec(state)?));
    }
    if before.next_due() == state.next_due() {
        return Ok(false);
    }
    if let Some(due) = before.next_due() {
        writes.insert(timer_key(due, profile), None);
    }
    let set = state.next_due();
    if let Some(due) = set {
        writes.insert(timer_key(due, profile), Some(Vec::new()));
    }
    Ok(set.is_some())
}

fn timer_ms(key: &[u8], prefix: usize) -> u64 {
    key.get(prefix..prefix + 8)
        .and_then(|b| <[u8; 8]>::try_from(b).ok())
        .map_or(u64::MAX, u64::from_be_bytes)
}

/// The background thread: jobs as they come, timers as they fall due.
fn background(engine: &std::sync::Weak<Membership>, rx: &Receiver<Job>) {
    loop {
        let Some(membership) = engine.upgrade() else {
            return;
        };
        let wait = match membership.until_next_timer() {
            Ok(wait) => wait,
            Err(error) => {
                tracing::error!(%error, "reading the segment timers failed");
                MAX_SLEEP
            }
        };
        drop(membership);
        let job = match rx.recv_timeout(wait) {
            Ok(job) => Some(job),
            Err(RecvTimeoutError::Timeout) => None,
            Err(RecvTimeoutError::Disconnected) => return,
        };
        let Some(membership) = engine.upgrade() else {
            return;
        };
        let result = match job {
            Some(Job::Compute(segment, generation)) => {
                // One segment's computation cannot take the thread down with it.
                let outcome = catch_unwind(AssertUnwindSafe(|| {
                    membership.compute(&segment, generation)
                }))
                .unwrap_or_else(|panic| {
                    Err(StoreError::Corrupt(format!(
                        "the computation panicked: {}",
                        panic_message(panic.as_ref())
                    )))
                });
                if let Err(error) = &outcome {
                    tracing::error!(segment = %segment, %error, "computing a segment failed");
                    membership.failed(&segment, error.to_string());
                }
                Ok(())
            }
            Some(Job::Forget(segment)) => membership.forget(&segment),
            Some(Job::Tick) | None => Ok(()),
        }
        .and_then(|()| {
            while membership.fire_timers()? {}
            membership.refresh()
        });
        if let Err(error) = result {
            tracing::error!(%error, "a segment membership job failed");
        }
    }
}

/// The segments pipeline stage, after identity resolution: see the module docs.
#[derive(Debug)]
pub struct Track {
    membership: Arc<Membership>,
}

impl Stage for Track {
    fn name(&self) -> &'static str {
        "segments"
    }

    fn begin_chunk(&self) {
        let mut chunk = lock(&self.membership.chunk);
        chunk.touched.clear();
        chunk.events.clear();
    }

    fn process(&self, event: &mut StoredEvent) -> Result<Outcome, StoreError> {
        let common = event.message.common();
        let Some(profile) = common
            .context
            .as_ref()
            .and_then(|c| c.get("kith"))
            .and_then(|k| k.get("profile_id"))
            .and_then(Value::as_str)
        else {
            return Ok(Outcome::Continue);
        };
        let catalog = self.membership.catalog();
        let mut chunk = lock(&self.membership.chunk);
        if let Some(record) = event_record(&event.message)
            && catalog.event_names().contains(&record.name)
        {
            chunk.events.insert(event.seq, record);
        }
        let update = chunk.touched.entry(profile.to_owned()).or_default();
        update.change.absorb(change_of(&event.message));
        update.event = Some((event.seq, common.received_at));
        Ok(Outcome::Continue)
    }

    fn end_chunk(&self) -> Result<(), StoreError> {
        let chunk = std::mem::take(&mut *lock(&self.membership.chunk));
        let _updating = lock(&self.membership.updating);
        self.membership
            .refresh_changed(chunk.touched, &chunk.events)
    }
}

//! The embedded store: one sled database holding the durable event log, the stored
//! events with their lookup indexes, the deduplication index, the pipeline checkpoint,
//! the counters and the generated credentials.
//!
//! sled is kept behind this module (it is marked unmaintained upstream), so that another
//! backend can replace it without touching handlers or stages.
//!
//! Trees:
//! - `log`: `seq` → `source_id \n message JSON`. The log is also the event store: the
//!   writer appends, the pipeline rewrites an entry a stage changed and removes one a
//!   stage dropped; entries up to the checkpoint are the stored events.
//! - `by_message_id`: `(messageId, source)` → receive time of the event holding it for
//!   deduplication, its `seq`, and the `seq`s of earlier events with that id (outside
//!   the window). Deduplication claims and `messageId` lookups in one point read.
//! - `by_user_id`, `by_anonymous_id`: `(id, seq)` lookup indexes.
//! - `failed`: `seq` → a [`FailedEvent`]: events a stage failed, as they came in, with
//!   the reason, until they are replayed.
//! - `imports`: import id (time-ordered) → the import job and its report.
//! - `identity`: the identity graph (identifier owners, profiles, their events, merges,
//!   suppressed identifiers), one tree so that a pipeline chunk's identity writes apply
//!   atomically, in one batch.
//! - `segments`: segment key → its definition.
//! - `meta`: checkpoint, counters, credentials, each source's processing rules
//!   (`rules:{source}`).

use std::path::Path;

use jiff::Timestamp;
use kith_sdk_core::protocol::Message;
use serde::{Deserialize, Serialize};
use sled::{Batch, IVec, Tree};

use crate::error::StoreError;
use crate::processing::SourceRules;
use crate::secrets::MasterKey;
use crate::stats::{IngestCounters, PipelineCounters};

const CHECKPOINT: &[u8] = b"checkpoint";
const INGEST_COUNTERS: &[u8] = b"counters:ingest";
const PIPELINE_COUNTERS: &[u8] = b"counters:pipeline";
const RULES_PREFIX: &str = "rules:";

/// An event a pipeline stage failed, kept as it came in so that it can be replayed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FailedEvent {
    /// Its position in the log when it failed.
    pub seq: u64,
    /// The source that sent it.
    pub source: String,
    /// The failure code (`cleaning`, `transformation`, `tracking_plan`, `invalid`).
    pub code: String,
    /// What was wrong, for the developer.
    pub reason: String,
    /// When it failed.
    pub failed_at: Timestamp,
    /// The message as it was accepted, before any stage ran.
    pub message: serde_json::Value,
}

impl FailedEvent {
    /// A failed event from its log entry's value.
    ///
    /// # Errors
    ///
    /// When the entry cannot be decoded.
    pub fn new(seq: u64, log_value: &[u8], code: &str, reason: String) -> Result<Self, StoreError> {
        let (source, message) = split_log_value(seq, log_value)?;
        Ok(FailedEvent {
            seq,
            source: source.to_owned(),
            code: code.to_owned(),
            reason,
            failed_at: Timestamp::now(),
            message: serde_json::from_slice(message)?,
        })
    }
}

/// An event as stored: its position in the log, its source and the message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredEvent {
    /// Position in the log; increases with arrival order.
    pub seq: u64,
    /// The source (write key) that sent it.
    pub source: String,
    /// The message, as enriched at ingest and changed by the pipeline.
    pub message: Message,
}

/// Which stored events a query wants.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EventFilter {
    /// Every event.
    All,
    /// Events with this `messageId` (from any source).
    MessageId(String),
    /// Events with this `userId`.
    UserId(String),
    /// Events with this `anonymousId`.
    AnonymousId(String),
}

/// The embedded sled store. Cheap to share behind an `Arc`.
#[derive(Debug)]
pub struct Store {
    db: sled::Db,
    meta: Tree,
    log: Tree,
    by_message_id: Tree,
    by_user_id: Tree,
    by_anonymous_id: Tree,
    failed: Tree,
    imports: Tree,
    identity: Tree,
    segments: Tree,
    membership: Tree,
    activation: Tree,
}

/// A tree whose keys and values belong to one module, which lays them out itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Space {
    /// The identity graph ([`crate::identity`]).
    Identity,
    /// Segment memberships, their history and timers ([`crate::segments::live`]).
    Membership,
    /// Destinations, campaigns and the delivery outbox ([`crate::activation`]).
    Activation,
}

/// A key of a [`Space`]: a one-byte tag, then the parts, each after a NUL.
pub fn space_key(tag: u8, parts: &[&[u8]]) -> Vec<u8> {
    let mut key = vec![tag, 0];
    for (i, part) in parts.iter().enumerate() {
        if i > 0 {
            key.push(0);
        }
        key.extend_from_slice(part);
    }
    key
}

/// Writes to a [`Space`], applied together ([`Store::apply`]); `None` removes.
pub type Writes = std::collections::BTreeMap<Vec<u8>, Option<Vec<u8>>>;

/// Entries of a [`Space`], in key order.
pub type Entries = Vec<(Vec<u8>, Vec<u8>)>;

/// A `seq` as a sled key: big-endian, so keys sort in log order.
fn seq_key(seq: u64) -> [u8; 8] {
    seq.to_be_bytes()
}

fn seq_from(bytes: &[u8]) -> Result<u64, StoreError> {
    bytes
        .get(..8)
        .and_then(|b| <[u8; 8]>::try_from(b).ok())
        .map(u64::from_be_bytes)
        .ok_or_else(|| StoreError::Corrupt("short sequence key".to_owned()))
}

/// Index key prefix for an id: its length then its bytes, so that no id is a prefix of
/// another's key.
fn id_prefix(id: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(4 + id.len() + 8);
    key.extend_from_slice(&u32::try_from(id.len()).unwrap_or(u32::MAX).to_be_bytes());
    key.extend_from_slice(id.as_bytes());
    key
}

fn index_key(id: &str, seq: u64) -> Vec<u8> {
    let mut key = id_prefix(id);
    key.extend_from_slice(&seq_key(seq));
    key
}

fn millis(ts: Timestamp) -> i64 {
    ts.as_millisecond()
}

impl Store {
    /// Opens (or creates) the store in `dir`, with `cache_bytes` of page cache.
    ///
    /// # Errors
    ///
    /// When sled cannot open the directory (permissions, corruption, another process
    /// holding it).
    pub fn open(dir: &Path, cache_bytes: u64) -> Result<Self, StoreError> {
        std::fs::create_dir_all(dir)
            .map_err(|e| StoreError::Start(format!("the data directory {}: {e}", dir.display())))?;
        // Only the collector's own user may read its data.
        #[cfg(unix)]
        std::fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))
            .map_err(|e| StoreError::Start(format!("the data directory {}: {e}", dir.display())))?;
        let db = sled::Config::new()
            .path(dir)
            .cache_capacity(cache_bytes)
            .open()?;
        Ok(Store {
            meta: db.open_tree("meta")?,
            log: db.open_tree("log")?,
            by_message_id: db.open_tree("by_message_id")?,
            by_user_id: db.open_tree("by_user_id")?,
            by_anonymous_id: db.open_tree("by_anonymous_id")?,
            failed: db.open_tree("failed")?,
            imports: db.open_tree("imports")?,
            identity: db.open_tree("identity")?,
            segments: db.open_tree("segments")?,
            membership: db.open_tree("membership")?,
            activation: db.open_tree("activation")?,
            db,
        })
    }

    /// Makes everything written so far durable (fsync).
    ///
    /// # Errors
    ///
    /// On an I/O error.
    pub fn flush(&self) -> Result<(), StoreError> {
        self.db.flush()?;
        Ok(())
    }

    /// A stored credential, or `generate()`'s value stored under `name` when there is
    /// none yet. The flag says whether it was generated now.
    ///
    /// # Errors
    ///
    /// On a storage failure.
    pub fn credential(
        &self,
        name: &str,
        secrets: &MasterKey,
        generate: impl FnOnce() -> String,
    ) -> Result<(String, bool), StoreError> {
        let key = format!("credential:{name}");
        if let Some(value) = self.meta.get(&key)? {
            let stored = String::from_utf8(value.to_vec())
                .map_err(|_| StoreError::Corrupt(format!("{key} is not UTF-8")))?;
            let value = secrets.open(&stored)?;
            if !MasterKey::is_sealed(&stored) {
                // Stored in clear by an earlier version: sealed from now on.
                self.meta.insert(&key, secrets.seal(&value).as_bytes())?;
                self.flush()?;
            }
            return Ok((value, false));
        }
        let value = generate();
        self.meta.insert(key, secrets.seal(&value).as_bytes())?;
        self.flush()?;
        Ok((value, true))
    }

    /// The highest `seq` ever assigned: the log's last entry, or the checkpoint when the
    /// log has been trimmed empty.
    ///
    /// # Errors
    ///
    /// On a storage failure.
    pub fn last_seq(&self) -> Result<u64, StoreError> {
        let last_logged = match self.log.last()? {
            Some((key, _)) => seq_from(&key)?,
            None => 0,
        };
        Ok(last_logged.max(self.checkpoint()?))
    }

    /// Appends encoded log records (`seq`, value) in one atomic batch. Not flushed.
    ///
    /// # Errors
    ///
    /// On a storage failure.
    pub fn append(&self, records: Batch) -> Result<(), StoreError> {
        self.log.apply_batch(records)?;
        Ok(())
    }

    /// Encodes one log record's value.
    pub fn log_value(source: &str, message_json: &[u8]) -> Vec<u8> {
        let mut value = Vec::with_capacity(source.len() + 1 + message_json.len());
        value.extend_from_slice(source.as_bytes());
        value.push(b'\n');
        value.extend_from_slice(message_json);
        value
    }

    /// A log key for `seq`.
    pub fn log_key(seq: u64) -> [u8; 8] {
        seq_key(seq)
    }

    /// Up to `limit` log entries after `after`, as stored (see [`StoredEvent::decode`]).
    ///
    /// # Errors
    ///
    /// On a storage failure.
    pub fn read_log(&self, after: u64, limit: usize) -> Result<Vec<(u64, IVec)>, StoreError> {
        let mut out = Vec::new();
        for entry in self
            .log
            .range(seq_key(after.saturating_add(1))..)
            .take(limit)
        {
            let (key, value) = entry?;
            out.push((seq_from(&key)?, value));
        }
        Ok(out)
    }

    /// Writes what a pipeline chunk leaves behind: the index entries of the events it
    /// kept (sorted, one batch per tree), the events stages changed, and the removal of
    /// those stages dropped. Idempotent, so a replayed chunk settles the same.
    ///
    /// # Errors
    ///
    /// On a storage failure.
    pub fn settle(&self, settlement: Settlement) -> Result<(), StoreError> {
        let Settlement {
            mut by_user_id,
            mut by_anonymous_id,
            rewritten,
            removed,
            failed,
        } = settlement;
        // Failed events are kept before their log entries go.
        if !failed.is_empty() {
            let mut batch = Batch::default();
            for event in failed {
                if let Some(message_id) = event.message.get("messageId").and_then(|v| v.as_str()) {
                    self.release_message_id(&event.source, message_id, event.seq)?;
                }
                batch.insert(&seq_key(event.seq), serde_json::to_vec(&event)?);
            }
            self.failed.apply_batch(batch)?;
        }
        for (tree, keys) in [
            (&self.by_user_id, &mut by_user_id),
            (&self.by_anonymous_id, &mut by_anonymous_id),
        ] {
            if keys.is_empty() {
                continue;
            }
            // Sorted keys land on neighbouring leaves one after another.
            keys.sort_unstable();
            let mut batch = Batch::default();
            for key in keys.drain(..) {
                batch.insert(key, &[]);
            }
            tree.apply_batch(batch)?;
        }
        if !rewritten.is_empty() || !removed.is_empty() {
            let mut batch = Batch::default();
            for (seq, value) in rewritten {
                batch.insert(&seq_key(seq), value);
            }
            for seq in removed {
                batch.remove(&seq_key(seq));
            }
            self.log.apply_batch(batch)?;
        }
        Ok(())
    }

    /// When the oldest event the pipeline has not processed yet was received: how far
    /// behind the pipeline is. `None` when it has caught up.
    ///
    /// # Errors
    ///
    /// On a storage failure.
    pub fn pending_since(&self) -> Result<Option<Timestamp>, StoreError> {
        let checkpoint = self.checkpoint()?;
        Ok(self
            .read_log(checkpoint, 1)?
            .first()
            .and_then(|(seq, value)| StoredEvent::decode(*seq, value).ok())
            .map(|event| {
                event
                    .message
                    .common()
                    .received_at
                    .unwrap_or_else(Timestamp::now)
            }))
    }

    /// The last `seq` the pipeline has fully processed.
    ///
    /// # Errors
    ///
    /// On a storage failure.
    pub fn checkpoint(&self) -> Result<u64, StoreError> {
        match self.meta.get(CHECKPOINT)? {
            Some(value) => seq_from(&value),
            None => Ok(0),
        }
    }

    /// Records the checkpoint and the pipeline counters in one atomic batch.
    ///
    /// # Errors
    ///
    /// On a storage failure.
    pub fn commit_checkpoint(
        &self,
        seq: u64,
        counters: &PipelineCounters,
    ) -> Result<(), StoreError> {
        let mut batch = Batch::default();
        batch.insert(CHECKPOINT, &seq_key(seq));
        batch.insert(PIPELINE_COUNTERS, serde_json::to_vec(counters)?);
        self.meta.apply_batch(batch)?;
        Ok(())
    }

    /// Records the ingest counters (the log writer does, before each flush).
    ///
    /// # Errors
    ///
    /// On a storage failure.
    pub fn put_ingest_counters(&self, counters: &IngestCounters) -> Result<(), StoreError> {
        self.meta
            .insert(INGEST_COUNTERS, serde_json::to_vec(counters)?)?;
        Ok(())
    }

    /// The persisted counters.
    ///
    /// # Errors
    ///
    /// On a storage failure or undecodable counters.
    pub fn counters(&self) -> Result<(IngestCounters, PipelineCounters), StoreError> {
        let ingest = match self.meta.get(INGEST_COUNTERS)? {
            Some(v) => serde_json::from_slice(&v)?,
            None => IngestCounters::default(),
        };
        let pipeline = match self.meta.get(PIPELINE_COUNTERS)? {
            Some(v) => serde_json::from_slice(&v)?,
            None => PipelineCounters::default(),
        };
        Ok((ingest, pipeline))
    }

    /// Claims `(source, messageId)` for the event at `seq`. Answers `true` when another
    /// event holds it since less than `window_ms` before `received`: a duplicate, which
    /// claims nothing. Claiming is idempotent for the same `seq`, so a pipeline replay
    /// after a crash is no duplicate. One point read, at most one write: this runs per
    /// event.
    ///
    /// # Errors
    ///
    /// On a storage failure.
    pub fn claim_message_id(
        &self,
        source: &str,
        message_id: &str,
        seq: u64,
        received: Timestamp,
        window_ms: i64,
    ) -> Result<bool, StoreError> {
        let mut key = id_prefix(message_id);
        key.extend_from_slice(source.as_bytes());
        let mut value = millis(received).to_be_bytes().to_vec();
        value.extend_from_slice(&seq_key(seq));
        if let Some(held) = self.by_message_id.get(&key)? {
            let (held_at, holders) = decode_claim(&held)?;
            if holders.contains(&seq) {
                return Ok(false);
            }
            if millis(received).saturating_sub(held_at) < window_ms {
                return Ok(true);
            }
            // Outside the window: this event takes the id over; earlier ones stay findable.
            value.extend_from_slice(&held[8..]);
        }
        self.by_message_id.insert(key, value)?;
        Ok(false)
    }

    /// Gives up the claim the event at `seq` holds on `(source, messageId)`, if it holds
    /// it: an event moved to the failed-events store must not make its own replay a
    /// duplicate. Earlier holders stay findable, outside any window.
    fn release_message_id(
        &self,
        source: &str,
        message_id: &str,
        seq: u64,
    ) -> Result<(), StoreError> {
        let mut key = id_prefix(message_id);
        key.extend_from_slice(source.as_bytes());
        let Some(held) = self.by_message_id.get(&key)? else {
            return Ok(());
        };
        let (_, holders) = decode_claim(&held)?;
        match holders.split_first() {
            Some((&holder, earlier)) if holder == seq => {
                if earlier.is_empty() {
                    self.by_message_id.remove(key)?;
                } else {
                    let mut value = i64::MIN.to_be_bytes().to_vec();
                    for seq in earlier {
                        value.extend_from_slice(&seq_key(*seq));
                    }
                    self.by_message_id.insert(key, value)?;
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// Whether an event of `source` holding `message_id` was received within `window_ms`
    /// before `now` (what [`Store::claim_message_id`] would call a duplicate).
    ///
    /// # Errors
    ///
    /// On a storage failure.
    pub fn is_claimed(
        &self,
        source: &str,
        message_id: &str,
        now: Timestamp,
        window_ms: i64,
    ) -> Result<bool, StoreError> {
        let mut key = id_prefix(message_id);
        key.extend_from_slice(source.as_bytes());
        match self.by_message_id.get(&key)? {
            Some(held) => {
                let (held_at, _) = decode_claim(&held)?;
                Ok(millis(now).saturating_sub(held_at) < window_ms)
            }
            None => Ok(false),
        }
    }

    /// Stored events matching `filter`, newest first, with `seq` below `before` when
    /// given, at most `limit`.
    ///
    /// # Errors
    ///
    /// On a storage failure or an undecodable event.
    pub fn query(
        &self,
        filter: &EventFilter,
        before: Option<u64>,
        limit: usize,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        // Entries past the checkpoint are not processed yet: not stored events.
        let before = before
            .unwrap_or(u64::MAX)
            .min(self.checkpoint()?.saturating_add(1));
        let seqs: Vec<u64> = match filter {
            EventFilter::All => self
                .log
                .range(..seq_key(before))
                .keys()
                .rev()
                .take(limit)
                .map(|k| k.map_err(StoreError::from).and_then(|k| seq_from(&k)))
                .collect::<Result<_, _>>()?,
            EventFilter::UserId(id) => index_scan(&self.by_user_id, id, before, limit)?,
            EventFilter::AnonymousId(id) => index_scan(&self.by_anonymous_id, id, before, limit)?,
            EventFilter::MessageId(id) => {
                let mut seqs = Vec::new();
                for claim in self.by_message_id.scan_prefix(id_prefix(id)).values() {
                    seqs.extend(decode_claim(&claim?)?.1.into_iter().filter(|s| *s < before));
                }
                seqs.sort_unstable_by(|a, b| b.cmp(a));
                seqs.truncate(limit);
                seqs
            }
        };
        self.events_by_seq(&seqs)
    }

    /// The stored events with these `seq`s (those that exist), in the order given.
    ///
    /// # Errors
    ///
    /// On a storage failure or an undecodable event.
    pub fn events_by_seq(&self, seqs: &[u64]) -> Result<Vec<StoredEvent>, StoreError> {
        let mut events = Vec::with_capacity(seqs.len());
        for seq in seqs {
            if let Some(value) = self.log.get(seq_key(*seq))? {
                events.push(StoredEvent::decode(*seq, &value)?);
            }
        }
        Ok(events)
    }
}

impl Store {
    /// Failed events, newest first, from `source` if given, with a `seq` below `before`.
    ///
    /// # Errors
    ///
    /// On a storage failure or an undecodable record.
    pub fn failed_events(
        &self,
        source: Option<&str>,
        before: Option<u64>,
        limit: usize,
    ) -> Result<Vec<FailedEvent>, StoreError> {
        let mut events = Vec::new();
        for value in self
            .failed
            .range(..seq_key(before.unwrap_or(u64::MAX)))
            .values()
            .rev()
        {
            let event: FailedEvent = serde_json::from_slice(&value?)?;
            if source.is_none_or(|s| s == event.source) {
                events.push(event);
                if events.len() == limit {
                    break;
                }
            }
        }
        Ok(events)
    }

    /// The failed events with these `seq`s (those that exist).
    ///
    /// # Errors
    ///
    /// On a storage failure or an undecodable record.
    pub fn failed_by_seq(&self, seqs: &[u64]) -> Result<Vec<FailedEvent>, StoreError> {
        let mut events = Vec::new();
        for seq in seqs {
            if let Some(value) = self.failed.get(seq_key(*seq))? {
                events.push(serde_json::from_slice(&value)?);
            }
        }
        Ok(events)
    }

    /// Forgets every failed event `erased` picks (an erased person's); answers how
    /// many.
    ///
    /// # Errors
    ///
    /// On a storage failure.
    pub fn erase_failed(&self, erased: impl Fn(&FailedEvent) -> bool) -> Result<usize, StoreError> {
        let mut batch = Batch::default();
        let mut removed = 0;
        for entry in self.failed.iter() {
            let (key, value) = entry?;
            if serde_json::from_slice::<FailedEvent>(&value).is_ok_and(|event| erased(&event)) {
                batch.remove(key);
                removed += 1;
            }
        }
        self.failed.apply_batch(batch)?;
        self.flush()?;
        Ok(removed)
    }

    /// Forgets the failed events that failed before `cutoff`, and the oldest ones
    /// beyond the newest `keep`; answers how many went.
    ///
    /// # Errors
    ///
    /// On a storage failure.
    pub fn trim_failed(&self, cutoff: Timestamp, keep: usize) -> Result<usize, StoreError> {
        let total = self.failed.len();
        let mut over = total.saturating_sub(keep);
        let mut batch = Batch::default();
        let mut removed = 0;
        for entry in self.failed.iter() {
            let (key, value) = entry?;
            let old = serde_json::from_slice::<FailedEvent>(&value)
                .map_or(true, |event| event.failed_at < cutoff);
            if over == 0 && !old {
                // Keys follow the log, so failure times grow too: the rest is newer.
                break;
            }
            batch.remove(key);
            over = over.saturating_sub(1);
            removed += 1;
        }
        self.failed.apply_batch(batch)?;
        Ok(removed)
    }

    /// Forgets failed events (once replayed, or deleted).
    ///
    /// # Errors
    ///
    /// On a storage failure.
    pub fn remove_failed(&self, seqs: &[u64]) -> Result<(), StoreError> {
        let mut batch = Batch::default();
        for seq in seqs {
            batch.remove(&seq_key(*seq));
        }
        self.failed.apply_batch(batch)?;
        Ok(())
    }

    /// Records an import (its job and report) under its id, durably.
    ///
    /// # Errors
    ///
    /// On a storage failure.
    pub fn put_import<T: Serialize>(&self, id: &str, import: &T) -> Result<(), StoreError> {
        self.imports.insert(id, serde_json::to_vec(import)?)?;
        self.flush()
    }

    /// The import with this id.
    ///
    /// # Errors
    ///
    /// On a storage failure or an unreadable record.
    pub fn import<T: for<'de> Deserialize<'de>>(&self, id: &str) -> Result<Option<T>, StoreError> {
        self.imports
            .get(id)?
            .map(|value| serde_json::from_slice(&value).map_err(StoreError::from))
            .transpose()
    }

    /// The imports, newest first, at most `limit`.
    ///
    /// # Errors
    ///
    /// On a storage failure or an unreadable record.
    pub fn imports<T: for<'de> Deserialize<'de>>(
        &self,
        limit: usize,
    ) -> Result<Vec<T>, StoreError> {
        let mut all = Vec::new();
        for value in self.imports.iter().values().rev().take(limit) {
            all.push(serde_json::from_slice(&value?)?);
        }
        Ok(all)
    }

    /// A stored value of `meta` under `key` (a source's cursor...).
    ///
    /// # Errors
    ///
    /// On a storage failure.
    pub fn meta_text(&self, key: &str) -> Result<Option<String>, StoreError> {
        Ok(self
            .meta
            .get(key)?
            .map(|v| String::from_utf8_lossy(&v).into_owned()))
    }

    /// Stores `value` in `meta` under `key`, durably.
    ///
    /// # Errors
    ///
    /// On a storage failure.
    pub fn put_meta_text(&self, key: &str, value: &str) -> Result<(), StoreError> {
        self.meta.insert(key, value.as_bytes())?;
        self.flush()
    }

    /// Stores a segment definition under its key (`None` removes it), durably.
    ///
    /// # Errors
    ///
    /// On a storage failure.
    pub fn put_segment<T: Serialize>(
        &self,
        key: &str,
        segment: Option<&T>,
    ) -> Result<(), StoreError> {
        match segment {
            Some(segment) => self.segments.insert(key, serde_json::to_vec(segment)?)?,
            None => self.segments.remove(key)?,
        };
        self.flush()
    }

    /// Every segment definition with its key, or why it cannot be read: one unreadable
    /// record is reported, it does not hide the others.
    ///
    /// # Errors
    ///
    /// On a storage failure.
    pub fn segments<T: for<'de> Deserialize<'de>>(
        &self,
    ) -> Result<Vec<(String, Decoded<T>)>, StoreError> {
        self.segments
            .iter()
            .map(|entry| {
                let (key, value) = entry?;
                let decoded = serde_json::from_slice(&value).map_err(|e| e.to_string());
                Ok((String::from_utf8_lossy(&key).into_owned(), decoded))
            })
            .collect()
    }

    fn space(&self, space: Space) -> &Tree {
        match space {
            Space::Identity => &self.identity,
            Space::Membership => &self.membership,
            Space::Activation => &self.activation,
        }
    }

    /// A value of a space.
    ///
    /// # Errors
    ///
    /// On a storage failure.
    pub fn get(&self, space: Space, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.space(space).get(key)?.map(|v| v.to_vec()))
    }

    /// The entries of a space under `prefix`, in key order.
    ///
    /// # Errors
    ///
    /// On a storage failure.
    pub fn scan(&self, space: Space, prefix: &[u8]) -> Result<Entries, StoreError> {
        self.scan_from(space, prefix, prefix, usize::MAX)
    }

    /// At most `limit` entries of a space under `prefix`, from the key `from` on.
    ///
    /// # Errors
    ///
    /// On a storage failure.
    pub fn scan_from(
        &self,
        space: Space,
        prefix: &[u8],
        from: &[u8],
        limit: usize,
    ) -> Result<Entries, StoreError> {
        self.space(space)
            .range(from..)
            .take_while(|entry| entry.as_ref().map_or(true, |(k, _)| k.starts_with(prefix)))
            .take(limit)
            .map(|entry| {
                let (k, v) = entry?;
                Ok((k.to_vec(), v.to_vec()))
            })
            .collect()
    }

    /// How many keys of a space start with `prefix`.
    ///
    /// # Errors
    ///
    /// On a storage failure.
    pub fn count(&self, space: Space, prefix: &[u8]) -> Result<usize, StoreError> {
        let mut count = 0;
        for key in self.space(space).scan_prefix(prefix).keys() {
            key?;
            count += 1;
        }
        Ok(count)
    }

    /// Applies writes to a space in one atomic batch.
    ///
    /// # Errors
    ///
    /// On a storage failure; nothing of the batch is applied then.
    pub fn apply(&self, space: Space, writes: Writes) -> Result<(), StoreError> {
        if writes.is_empty() {
            return Ok(());
        }
        let mut batch = Batch::default();
        for (key, value) in writes {
            match value {
                Some(value) => batch.insert(key, value),
                None => batch.remove(key),
            }
        }
        self.space(space).apply_batch(batch)?;
        Ok(())
    }

    /// Erases stored events (a deleted profile's) from the log and its indexes.
    ///
    /// # Errors
    ///
    /// On a storage failure.
    pub fn erase_events(&self, seqs: &[u64]) -> Result<(), StoreError> {
        let mut log = Batch::default();
        let (mut by_user, mut by_anonymous, mut by_message) =
            (Batch::default(), Batch::default(), Vec::new());
        for seq in seqs {
            let Some(value) = self.log.get(seq_key(*seq))? else {
                continue;
            };
            if let Ok(event) = StoredEvent::decode(*seq, &value) {
                let common = event.message.common();
                if let Some(user_id) = &common.user_id {
                    by_user.remove(index_key(user_id, *seq));
                }
                if let Some(anonymous_id) = &common.anonymous_id {
                    by_anonymous.remove(index_key(anonymous_id, *seq));
                }
                if let Some(message_id) = &common.message_id {
                    let mut key = id_prefix(message_id);
                    key.extend_from_slice(event.source.as_bytes());
                    by_message.push(key);
                }
            }
            log.remove(&seq_key(*seq));
        }
        self.by_user_id.apply_batch(by_user)?;
        self.by_anonymous_id.apply_batch(by_anonymous)?;
        for key in by_message {
            self.by_message_id.remove(key)?;
        }
        self.log.apply_batch(log)?;
        self.flush()
    }

    /// Every source's stored processing rules.
    ///
    /// # Errors
    ///
    /// On a storage failure or an unreadable record.
    pub fn rules(&self) -> Result<Vec<(String, SourceRules)>, StoreError> {
        let mut all = Vec::new();
        for entry in self.meta.scan_prefix(RULES_PREFIX) {
            let (key, value) = entry?;
            let source = String::from_utf8_lossy(&key[RULES_PREFIX.len()..]).into_owned();
            all.push((source, serde_json::from_slice(&value)?));
        }
        Ok(all)
    }

    /// Stores `source`'s processing rules, or removes them when `None`.
    ///
    /// # Errors
    ///
    /// On a storage failure.
    pub fn put_rules(&self, source: &str, rules: Option<&SourceRules>) -> Result<(), StoreError> {
        let key = format!("{RULES_PREFIX}{source}");
        match rules {
            Some(rules) => self.meta.insert(key, serde_json::to_vec(rules)?)?,
            None => self.meta.remove(key)?,
        };
        self.flush()
    }
}

/// A stored record, or why it cannot be read.
pub type Decoded<T> = Result<T, String>;

/// Whether `value`, written as the store writes it, reads back as the same value. A
/// definition that could be written but not read again would break every later read
/// (and start): each API that stores one checks this first.
pub fn reads_back<T: Serialize + for<'de> Deserialize<'de> + PartialEq>(value: &T) -> bool {
    serde_json::to_vec(value)
        .ok()
        .and_then(|bytes| serde_json::from_slice::<T>(&bytes).ok())
        .is_some_and(|back| back == *value)
}

/// A `by_message_id` value: receive time of the holder, then the `seq`s holding the id,
/// the current holder first.
fn decode_claim(value: &[u8]) -> Result<(i64, Vec<u64>), StoreError> {
    let corrupt = || StoreError::Corrupt("bad message id entry".to_owned());
    let (held_at, seqs) = value.split_first_chunk::<8>().ok_or_else(corrupt)?;
    if seqs.is_empty() || seqs.len() % 8 != 0 {
        return Err(corrupt());
    }
    let seqs = seqs
        .chunks_exact(8)
        .map(seq_from)
        .collect::<Result<_, _>>()?;
    Ok((i64::from_be_bytes(*held_at), seqs))
}

/// What one pipeline chunk leaves behind, gathered for [`Store::settle`].
#[derive(Debug, Default)]
pub struct Settlement {
    by_user_id: Vec<Vec<u8>>,
    by_anonymous_id: Vec<Vec<u8>>,
    rewritten: Vec<(u64, Vec<u8>)>,
    removed: Vec<u64>,
    failed: Vec<FailedEvent>,
}

impl Settlement {
    /// Keeps an event that passed every stage: indexes it, and writes it back when the
    /// stages changed it from its log entry `original`.
    ///
    /// # Errors
    ///
    /// When the event cannot be encoded.
    pub fn keep(&mut self, event: &StoredEvent, original: &[u8]) -> Result<(), StoreError> {
        let common = event.message.common();
        if let Some(user_id) = &common.user_id {
            self.by_user_id.push(index_key(user_id, event.seq));
        }
        if let Some(anonymous_id) = &common.anonymous_id {
            self.by_anonymous_id
                .push(index_key(anonymous_id, event.seq));
        }
        let encoded = event.encode()?;
        if encoded != original {
            self.rewritten.push((event.seq, encoded));
        }
        Ok(())
    }

    /// Removes the log entry of an event a stage dropped.
    pub fn remove(&mut self, seq: u64) {
        self.removed.push(seq);
    }

    /// Moves an event a stage failed from the log to the failed-events store.
    pub fn fail(&mut self, event: FailedEvent) {
        self.removed.push(event.seq);
        self.failed.push(event);
    }
}

fn index_scan(tree: &Tree, id: &str, before: u64, limit: usize) -> Result<Vec<u64>, StoreError> {
    let prefix = id_prefix(id);
    let start = index_key(id, 0);
    let end = index_key(id, before);
    let mut seqs = Vec::new();
    for key in tree.range(start..end).keys().rev().take(limit) {
        let key = key?;
        seqs.push(seq_from(&key[prefix.len()..])?);
    }
    Ok(seqs)
}

/// A log entry's value split into its source and its message JSON.
fn split_log_value(seq: u64, value: &[u8]) -> Result<(&str, &[u8]), StoreError> {
    let split = value
        .iter()
        .position(|b| *b == b'\n')
        .ok_or_else(|| StoreError::Corrupt(format!("log entry {seq} has no source")))?;
    let source = std::str::from_utf8(&value[..split])
        .map_err(|_| StoreError::Corrupt(format!("log entry {seq} has a bad source")))?;
    Ok((source, &value[split + 1..]))
}

impl StoredEvent {
    /// Decodes a log entry's value.
    ///
    /// # Errors
    ///
    /// When the entry is not `source \n message JSON`.
    pub fn decode(seq: u64, value: &[u8]) -> Result<Self, StoreError> {
        let (source, message) = split_log_value(seq, value)?;
        Ok(StoredEvent {
            seq,
            source: source.to_owned(),
            message: serde_json::from_slice(message)?,
        })
    }

    /// Encodes the event as a log entry's value.
    ///
    /// # Errors
    ///
    /// When the message cannot be serialized.
    pub fn encode(&self) -> Result<Vec<u8>, StoreError> {
        Ok(Store::log_value(
            &self.source,
            &serde_json::to_vec(&self.message)?,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn event(seq: u64, user: &str, message_id: &str) -> StoredEvent {
        StoredEvent {
            seq,
            source: "src".to_owned(),
            message: serde_json::from_value(json!({
                "type": "track", "event": "E", "userId": user, "messageId": message_id,
                "anonymousId": format!("anon-{user}")
            }))
            .expect("message"),
        }
    }

    fn open() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path(), 8 << 20).expect("open");
        (dir, store)
    }

    fn append(store: &Store, events: &[StoredEvent]) {
        let mut batch = Batch::default();
        for event in events {
            batch.insert(&Store::log_key(event.seq), event.encode().expect("encode"));
        }
        store.append(batch).expect("append");
    }

    #[test]
    fn log_round_trip_settle_and_checkpoint() {
        let (_dir, store) = open();
        append(
            &store,
            &(1..=3)
                .map(|seq| event(seq, "u", &format!("m{seq}")))
                .collect::<Vec<_>>(),
        );
        let mut garbage = Batch::default();
        garbage.insert(&Store::log_key(4), b"garbage".to_vec());
        store.append(garbage).expect("append");
        let read = store.read_log(1, 10).expect("read");
        assert_eq!(
            read.iter().map(|(seq, _)| *seq).collect::<Vec<_>>(),
            [2, 3, 4]
        );
        let decoded = StoredEvent::decode(2, &read[0].1).expect("decodes");
        assert_eq!(decoded, event(2, "u", "m2"));
        assert_eq!(
            decoded.encode().expect("encode"),
            read[0].1.to_vec(),
            "stable encoding"
        );
        assert!(matches!(
            StoredEvent::decode(4, &read[2].1),
            Err(StoreError::Corrupt(_))
        ));
        let read = store.read_log(0, 2).expect("read");
        assert_eq!(store.last_seq().expect("last"), 4);

        let mut changed = event(3, "changed", "m3");
        changed.source = "other".into();
        let mut settlement = Settlement::default();
        settlement
            .keep(&event(1, "u", "m1"), &read[0].1)
            .expect("keep");
        settlement.keep(&changed, &read[1].1).expect("keep");
        settlement.remove(2);
        settlement.remove(4);
        assert_eq!(
            settlement.rewritten.len(),
            1,
            "only the changed event is rewritten"
        );
        store.settle(settlement).expect("settle");
        let read = store.read_log(0, 10).expect("read");
        assert_eq!(read.iter().map(|(seq, _)| *seq).collect::<Vec<_>>(), [1, 3]);
        assert_eq!(
            StoredEvent::decode(3, &read[1].1).expect("decodes"),
            changed
        );
        store
            .commit_checkpoint(4, &PipelineCounters::default())
            .expect("checkpoint");
        assert_eq!(store.checkpoint().expect("checkpoint"), 4);
        assert_eq!(store.last_seq().expect("last"), 4, "seq survives removals");
    }

    #[test]
    fn claims_detect_duplicates_within_the_window_only() {
        let (_dir, store) = open();
        let t0 = Timestamp::from_second(1_000_000).expect("ts");
        let later = Timestamp::from_second(1_000_000 + 3600).expect("ts");
        assert!(
            !store
                .claim_message_id("s", "m", 1, t0, 60_000)
                .expect("claim")
        );
        assert!(
            !store
                .claim_message_id("s", "m", 1, t0, 60_000)
                .expect("replay")
        );
        assert!(
            store
                .claim_message_id("s", "m", 2, t0, 60_000)
                .expect("dup")
        );
        assert!(
            !store
                .claim_message_id("other", "m", 3, t0, 60_000)
                .expect("other source")
        );
        assert!(
            !store
                .claim_message_id("s", "m", 4, later, 60_000)
                .expect("expired")
        );
        assert!(
            store
                .claim_message_id("s", "m", 5, later, 60_000)
                .expect("dup of 4")
        );
        assert!(
            !store
                .claim_message_id("s", "m-other", 6, t0, 60_000)
                .expect("other id")
        );
        assert!(
            !store
                .claim_message_id("s", "m-", 7, t0, 60_000)
                .expect("a prefix is no dup")
        );
    }

    #[test]
    fn queries_by_index_newest_first_with_paging() {
        let (_dir, store) = open();
        let events: Vec<_> = (1..=6)
            .map(|seq| {
                event(
                    seq,
                    if seq % 2 == 0 { "even" } else { "odd" },
                    &format!("m{seq}"),
                )
            })
            .collect();
        append(&store, &events);
        let mut settlement = Settlement::default();
        for event in &events[..5] {
            settlement
                .keep(event, &event.encode().expect("encode"))
                .expect("keep");
            let id = event.message.common().message_id.clone().expect("id");
            store
                .claim_message_id("src", &id, event.seq, Timestamp::UNIX_EPOCH, 1)
                .expect("claim");
        }
        store.settle(settlement).expect("settle");
        store
            .commit_checkpoint(5, &PipelineCounters::default())
            .expect("checkpoint");
        let seqs = |events: Vec<StoredEvent>| events.iter().map(|e| e.seq).collect::<Vec<_>>();
        let q = |f: EventFilter, before, limit| store.query(&f, before, limit).expect("query");
        assert_eq!(
            seqs(q(EventFilter::All, None, 10)),
            [5, 4, 3, 2, 1],
            "6 is not processed"
        );
        assert_eq!(seqs(q(EventFilter::All, Some(4), 2)), [3, 2]);
        assert_eq!(
            seqs(q(EventFilter::UserId("odd".into()), None, 10)),
            [5, 3, 1]
        );
        assert_eq!(seqs(q(EventFilter::UserId("odd".into()), Some(5), 1)), [3]);
        assert_eq!(
            seqs(q(EventFilter::UserId("od".into()), None, 10)),
            [] as [u64; 0]
        );
        assert_eq!(
            seqs(q(EventFilter::AnonymousId("anon-even".into()), None, 10)),
            [4, 2]
        );
        assert_eq!(seqs(q(EventFilter::MessageId("m3".into()), None, 10)), [3]);
    }

    #[test]
    fn failed_events_are_trimmed_by_age_and_count() {
        let (_dir, store) = open();
        let mut settlement = Settlement::default();
        let old = Timestamp::from_second(1_000).expect("ts");
        for seq in 1..=10 {
            let mut failed = FailedEvent::new(
                seq,
                &event(seq, "u", &format!("m{seq}"))
                    .encode()
                    .expect("encode"),
                "cleaning",
                "bad".to_owned(),
            )
            .expect("failed");
            if seq <= 3 {
                failed.failed_at = old;
            }
            settlement.fail(failed);
        }
        store.settle(settlement).expect("settle");
        let cutoff = Timestamp::from_second(2_000).expect("ts");
        assert_eq!(
            store.trim_failed(cutoff, 100).expect("trim"),
            3,
            "the old ones"
        );
        assert_eq!(
            store.trim_failed(cutoff, 5).expect("trim"),
            2,
            "the oldest beyond 5"
        );
        let left: Vec<u64> = store
            .failed_events(None, None, 100)
            .expect("list")
            .iter()
            .map(|e| e.seq)
            .collect();
        assert_eq!(left, [10, 9, 8, 7, 6]);
    }

    #[test]
    fn credentials_are_generated_once() {
        let (_dir, store) = open();
        let secrets = MasterKey::new(&[1; 32]);
        let (first, generated) = store
            .credential("k", &secrets, || "one".into())
            .expect("cred");
        assert!(generated);
        let (again, generated) = store
            .credential("k", &secrets, || "two".into())
            .expect("cred");
        assert_eq!(
            (first.as_str(), again.as_str(), generated),
            ("one", "one", false)
        );
    }
}

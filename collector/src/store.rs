//! The embedded store: one sled database holding the durable event log, the stored
//! events with their lookup indexes, the deduplication index, the pipeline checkpoint,
//! the counters and the generated credentials.
//!
//! sled is kept behind this module (it is marked unmaintained upstream), so that another
//! backend can replace it without touching handlers or stages.
//!
//! Trees:
//! - `log`: `seq` → `source_id \n message JSON`, appended by [`crate::writer`], trimmed
//!   once the pipeline has processed and flushed past an entry.
//! - `events`: `seq` → [`StoredEvent`] JSON, as the pipeline left it.
//! - `by_message_id`, `by_user_id`, `by_anonymous_id`: lookup indexes.
//! - `dedup`: `(messageId, source)` → the `seq` and receive time of its first event.
//! - `meta`: checkpoint, counters, credentials.

use std::path::Path;

use jiff::Timestamp;
use kith_sdk_core::protocol::Message;
use serde::{Deserialize, Serialize};
use sled::{Batch, Tree};

use crate::error::StoreError;
use crate::stats::{IngestCounters, PipelineCounters};

const CHECKPOINT: &[u8] = b"checkpoint";
const INGEST_COUNTERS: &[u8] = b"counters:ingest";
const PIPELINE_COUNTERS: &[u8] = b"counters:pipeline";

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
    events: Tree,
    by_message_id: Tree,
    by_user_id: Tree,
    by_anonymous_id: Tree,
    dedup: Tree,
}

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

fn message_id_key(message_id: &str, source: &str) -> Vec<u8> {
    let mut key = id_prefix(message_id);
    key.extend_from_slice(source.as_bytes());
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
        let db = sled::Config::new()
            .path(dir)
            .cache_capacity(cache_bytes)
            .open()?;
        Ok(Store {
            meta: db.open_tree("meta")?,
            log: db.open_tree("log")?,
            events: db.open_tree("events")?,
            by_message_id: db.open_tree("by_message_id")?,
            by_user_id: db.open_tree("by_user_id")?,
            by_anonymous_id: db.open_tree("by_anonymous_id")?,
            dedup: db.open_tree("dedup")?,
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
        generate: impl FnOnce() -> String,
    ) -> Result<(String, bool), StoreError> {
        let key = format!("credential:{name}");
        if let Some(value) = self.meta.get(&key)? {
            let value = String::from_utf8(value.to_vec())
                .map_err(|_| StoreError::Corrupt(format!("{key} is not UTF-8")))?;
            return Ok((value, false));
        }
        let value = generate();
        self.meta.insert(key, value.as_bytes())?;
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

    /// Up to `limit` log entries after `after`, decoded. An entry that cannot be decoded
    /// is returned as an error value in its place, so that one bad record cannot block
    /// the log.
    ///
    /// # Errors
    ///
    /// On a storage failure.
    #[allow(clippy::type_complexity)]
    pub fn read_log(
        &self,
        after: u64,
        limit: usize,
    ) -> Result<Vec<(u64, Result<StoredEvent, StoreError>)>, StoreError> {
        let mut out = Vec::new();
        for entry in self
            .log
            .range(seq_key(after.saturating_add(1))..)
            .take(limit)
        {
            let (key, value) = entry?;
            let seq = seq_from(&key)?;
            out.push((seq, decode_log_value(seq, &value)));
        }
        Ok(out)
    }

    /// Removes log entries up to and including `through`.
    ///
    /// # Errors
    ///
    /// On a storage failure.
    pub fn trim_log(&self, through: u64) -> Result<(), StoreError> {
        let mut batch = Batch::default();
        for key in self.log.range(..=seq_key(through)).keys() {
            batch.remove(key?);
        }
        self.log.apply_batch(batch)?;
        Ok(())
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
    /// event already holds it within `window_ms` of `received`: a duplicate. Claiming is
    /// idempotent for the same `seq`, so a pipeline replay after a crash is no duplicate.
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
        let key = message_id_key(message_id, source);
        if let Some(value) = self.dedup.get(&key)? {
            let holder = seq_from(&value)?;
            let held_at = value
                .get(8..16)
                .and_then(|b| <[u8; 8]>::try_from(b).ok())
                .map(i64::from_be_bytes)
                .ok_or_else(|| StoreError::Corrupt("short message id entry".to_owned()))?;
            if holder == seq {
                return Ok(false);
            }
            if millis(received).saturating_sub(held_at) < window_ms {
                return Ok(true);
            }
        }
        let mut value = seq_key(seq).to_vec();
        value.extend_from_slice(&millis(received).to_be_bytes());
        self.dedup.insert(key, value)?;
        Ok(false)
    }

    /// Stores an event and its index entries. Idempotent: storing the same `seq` again
    /// overwrites it.
    ///
    /// # Errors
    ///
    /// On a storage or encoding failure.
    pub fn put_event(&self, event: &StoredEvent) -> Result<(), StoreError> {
        self.events
            .insert(seq_key(event.seq), serde_json::to_vec(event)?)?;
        let common = event.message.common();
        if let Some(message_id) = &common.message_id {
            self.by_message_id
                .insert(index_key(message_id, event.seq), &[])?;
        }
        if let Some(user_id) = &common.user_id {
            self.by_user_id.insert(index_key(user_id, event.seq), &[])?;
        }
        if let Some(anonymous_id) = &common.anonymous_id {
            self.by_anonymous_id
                .insert(index_key(anonymous_id, event.seq), &[])?;
        }
        Ok(())
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
        let before = before.unwrap_or(u64::MAX);
        let seqs: Vec<u64> = match filter {
            EventFilter::All => self
                .events
                .range(..seq_key(before))
                .keys()
                .rev()
                .take(limit)
                .map(|k| k.map_err(StoreError::from).and_then(|k| seq_from(&k)))
                .collect::<Result<_, _>>()?,
            EventFilter::UserId(id) => index_scan(&self.by_user_id, id, before, limit)?,
            EventFilter::AnonymousId(id) => index_scan(&self.by_anonymous_id, id, before, limit)?,
            EventFilter::MessageId(id) => index_scan(&self.by_message_id, id, before, limit)?,
        };
        let mut events = Vec::with_capacity(seqs.len());
        for seq in seqs {
            if let Some(value) = self.events.get(seq_key(seq))? {
                events.push(serde_json::from_slice(&value)?);
            }
        }
        Ok(events)
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

fn decode_log_value(seq: u64, value: &[u8]) -> Result<StoredEvent, StoreError> {
    let split = value
        .iter()
        .position(|b| *b == b'\n')
        .ok_or_else(|| StoreError::Corrupt(format!("log entry {seq} has no source")))?;
    let source = std::str::from_utf8(&value[..split])
        .map_err(|_| StoreError::Corrupt(format!("log entry {seq} has a bad source")))?;
    Ok(StoredEvent {
        seq,
        source: source.to_owned(),
        message: serde_json::from_slice(&value[split + 1..])?,
    })
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

    #[test]
    fn log_round_trip_checkpoint_and_trim() {
        let (_dir, store) = open();
        let mut batch = Batch::default();
        for seq in 1..=3 {
            let json =
                serde_json::to_vec(&event(seq, "u", &format!("m{seq}")).message).expect("json");
            batch.insert(&Store::log_key(seq), Store::log_value("src", &json));
        }
        batch.insert(&Store::log_key(4), b"garbage".to_vec());
        store.append(batch).expect("append");
        let read = store.read_log(1, 10).expect("read");
        assert_eq!(read.len(), 3);
        assert_eq!(read[0].1.as_ref().expect("decoded").seq, 2);
        assert!(matches!(read[2], (4, Err(StoreError::Corrupt(_)))));
        assert_eq!(store.last_seq().expect("last"), 4);
        store
            .commit_checkpoint(4, &PipelineCounters::default())
            .expect("checkpoint");
        store.trim_log(4).expect("trim");
        assert!(store.read_log(0, 10).expect("read").is_empty());
        assert_eq!(store.last_seq().expect("last"), 4, "seq survives trimming");
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
    }

    #[test]
    fn queries_by_index_newest_first_with_paging() {
        let (_dir, store) = open();
        for seq in 1..=5 {
            let user = if seq % 2 == 0 { "even" } else { "odd" };
            store
                .put_event(&event(seq, user, &format!("m{seq}")))
                .expect("put");
            store
                .claim_message_id("src", &format!("m{seq}"), seq, Timestamp::UNIX_EPOCH, 1)
                .expect("claim");
        }
        let seqs = |events: Vec<StoredEvent>| events.iter().map(|e| e.seq).collect::<Vec<_>>();
        let q = |f: EventFilter, before, limit| store.query(&f, before, limit).expect("query");
        assert_eq!(seqs(q(EventFilter::All, None, 10)), [5, 4, 3, 2, 1]);
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
    fn credentials_are_generated_once() {
        let (_dir, store) = open();
        let (first, generated) = store.credential("k", || "one".into()).expect("cred");
        assert!(generated);
        let (again, generated) = store.credential("k", || "two".into()).expect("cred");
        assert_eq!(
            (first.as_str(), again.as_str(), generated),
            ("one", "one", false)
        );
    }
}

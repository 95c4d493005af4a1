//! The storage seam: everything the collector keeps, behind one small contract that
//! each backend implements, and typed views of it that the rest of the collector uses.
//!
//! A backend implements two things:
//!
//! - [`EventLog`]: the durable, append-only log of accepted events. Appending assigns
//!   positions (`seq`s); readers read after a position and are woken when it grows;
//!   entries are never rewritten, only trimmed once processed.
//! - [`Tables`]: ordered tables of rows (a key, a value; both bytes), read by key or by
//!   range, and written only by [`Backend::apply`], which applies a [`Batch`] of writes
//!   to any tables atomically.
//!
//! What the tables hold, and how keys are laid out, is decided once, here, for every
//! backend: [`TableId`] lists the tables, [`keys`] encodes keys so that they sort as
//! their parts do, and the domain modules give typed views: [`events`] (stored events,
//! lookup indexes, deduplication claims, failed events), [`identity`] (the identity
//! graph, as kith-identity's `Store`), [`membership`] (segment memberships, the member
//! index, timers, the numbered change feed), [`activation`] (destinations, campaigns,
//! the outbox and its due queue, caps, push tokens) and [`meta`] (checkpoint, counters,
//! credentials, rules, cursors, imports, segment definitions). Their read methods work on
//! any [`Tables`]: a backend's committed state, or a transaction.
//!
//! A [`Txn`] is how state changes: it takes the backend's writer lock, reads see its own
//! pending writes over the committed state, and [`Backend::commit`] applies them in one
//! batch. A pipeline chunk is one transaction, its checkpoint included, so a chunk lands
//! whole or not at all; a crash replays it from the old checkpoint, and every write is
//! keyed so that the replay writes the same rows.
//!
//! Backends: [`memory`] (for fast tests of stages and handlers) and [`sled`] (the
//! embedded default, and the only module that knows sled). The shared suite
//! ([`suite`]) runs against each.

pub mod activation;
pub mod events;
pub mod identity;
pub mod keys;
pub mod membership;
pub mod memory;
pub mod meta;
pub mod sled;
#[cfg(test)]
pub mod suite;

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::ops::Bound;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use crate::error::StoreError;
use crate::stats::IngestCounters;

/// The tables every backend holds. Their key layouts are in the domain modules.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[repr(u8)]
pub enum TableId {
    /// Named values: checkpoint, counters, credentials, cursors, numbers, the format.
    Meta = 1,
    /// Stored events by `seq`.
    Events = 2,
    /// `(userId, seq)`: the user id lookup index.
    ByUser = 3,
    /// `(anonymousId, seq)`: the anonymous id lookup index.
    ByAnonymous = 4,
    /// `(messageId, source)` → the claim: deduplication, and the `messageId` index.
    Claims = 5,
    /// Failed events by `seq`.
    Failed = 6,
    /// Import jobs and reports by id (time-ordered).
    Imports = 7,
    /// Each source's processing rules.
    Rules = 8,
    /// Segment definitions by key.
    Segments = 9,
    /// Identifier → the profile it is linked to.
    Owners = 10,
    /// Profiles by id (merged ones included).
    Profiles = 11,
    /// `(profile, seq)`: a profile's events.
    ProfileEvents = 12,
    /// Merges by number.
    Merges = 13,
    /// `(profile, merge)`: the merges a profile took part in.
    ProfileMerges = 14,
    /// Suppressed (erased) identifiers.
    Suppressed = 15,
    /// `(a, b)` → a suggested merge from the last matching run.
    Suggestions = 16,
    /// Profile → a mark: its make-up changed and its memberships must be re-evaluated.
    Changed = 17,
    /// Profile → its segment membership state.
    MemberStates = 18,
    /// `(segment, profile)`: the member index.
    Members = 19,
    /// Membership changes by number: the feed.
    Changes = 20,
    /// `(due ms, profile)`: the next moment time alone can change a membership.
    Timers = 21,
    /// Segment → the version computed for every profile.
    Computed = 22,
    /// Destinations by id (secrets sealed).
    Destinations = 23,
    /// Campaigns by id.
    Campaigns = 24,
    /// Deliveries by number: the outbox.
    Deliveries = 25,
    /// `(due ms, delivery)`: the deliveries waiting to be sent.
    Due = 26,
    /// `(campaign, profile)` → when it was sent to the profile (frequency caps).
    Caps = 27,
    /// `(profile, provider, token)` → the `seq` of the event that brought it.
    Tokens = 28,
    /// `(campaign, seq)`: the event fired the campaign.
    Fired = 29,
}

impl TableId {
    /// Every table.
    pub const ALL: [TableId; 29] = [
        TableId::Meta,
        TableId::Events,
        TableId::ByUser,
        TableId::ByAnonymous,
        TableId::Claims,
        TableId::Failed,
        TableId::Imports,
        TableId::Rules,
        TableId::Segments,
        TableId::Owners,
        TableId::Profiles,
        TableId::ProfileEvents,
        TableId::Merges,
        TableId::ProfileMerges,
        TableId::Suppressed,
        TableId::Suggestions,
        TableId::Changed,
        TableId::MemberStates,
        TableId::Members,
        TableId::Changes,
        TableId::Timers,
        TableId::Computed,
        TableId::Destinations,
        TableId::Campaigns,
        TableId::Deliveries,
        TableId::Due,
        TableId::Caps,
        TableId::Tokens,
        TableId::Fired,
    ];

    /// The table's byte, as a backend may store it.
    pub fn byte(self) -> u8 {
        self as u8
    }

    /// The table with this byte.
    pub fn from_byte(byte: u8) -> Option<TableId> {
        TableId::ALL.iter().copied().find(|t| t.byte() == byte)
    }
}

/// A row: its key and its value.
pub type Row = (Vec<u8>, Vec<u8>);

/// Reading tables: what a backend's committed state and a transaction both offer.
pub trait Tables {
    /// The value of a row.
    ///
    /// # Errors
    ///
    /// On a storage failure.
    fn get(&self, table: TableId, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError>;

    /// Up to `limit` rows with keys in the range, in key order (descending when
    /// `reverse`).
    ///
    /// # Errors
    ///
    /// On a storage failure.
    fn scan(
        &self,
        table: TableId,
        start: Bound<&[u8]>,
        end: Bound<&[u8]>,
        limit: usize,
        reverse: bool,
    ) -> Result<Vec<Row>, StoreError>;
}

/// The end of the range of keys starting with `prefix`: the first key after them all.
pub fn prefix_end(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < u8::MAX {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}

/// Whether no key can lie in the range (its start is past its end): backends answer no
/// rows then rather than hand the range to a map that would panic.
pub fn empty_range(start: Bound<&[u8]>, end: Bound<&[u8]>) -> bool {
    match (start, end) {
        (Bound::Unbounded, _) | (_, Bound::Unbounded) => false,
        (Bound::Included(s), Bound::Included(e)) => s > e,
        (Bound::Included(s) | Bound::Excluded(s), Bound::Excluded(e))
        | (Bound::Excluded(s), Bound::Included(e)) => s >= e,
    }
}

/// Typed and prefix reads, for any [`Tables`].
pub trait Rows: Tables {
    /// A row's value read as JSON.
    ///
    /// # Errors
    ///
    /// On a storage failure, or a value that is not a `T`.
    fn get_json<T: serde::de::DeserializeOwned>(
        &self,
        table: TableId,
        key: &[u8],
    ) -> Result<Option<T>, StoreError> {
        self.get(table, key)?
            .map(|value| serde_json::from_slice(&value).map_err(StoreError::from))
            .transpose()
    }

    /// Up to `limit` rows whose keys start with `prefix`, from the key `from` on (or
    /// after it, when `after`), in key order.
    ///
    /// # Errors
    ///
    /// On a storage failure.
    fn scan_prefix(
        &self,
        table: TableId,
        prefix: &[u8],
        from: Option<(&[u8], bool)>,
        limit: usize,
    ) -> Result<Vec<Row>, StoreError> {
        let start = match from {
            Some((key, true)) => Bound::Excluded(key),
            Some((key, false)) => Bound::Included(key),
            None => Bound::Included(prefix),
        };
        let end = prefix_end(prefix);
        let end = end.as_deref().map_or(Bound::Unbounded, Bound::Excluded);
        self.scan(table, start, end, limit, false)
    }

    /// Up to `limit` rows whose keys start with `prefix`, before `before` when given,
    /// in descending key order.
    ///
    /// # Errors
    ///
    /// On a storage failure.
    fn scan_prefix_rev(
        &self,
        table: TableId,
        prefix: &[u8],
        before: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<Row>, StoreError> {
        let end = prefix_end(prefix);
        let end = match before {
            Some(before) => Bound::Excluded(before),
            None => end.as_deref().map_or(Bound::Unbounded, Bound::Excluded),
        };
        self.scan(table, Bound::Included(prefix), end, limit, true)
    }

    /// Every row of a table whose key starts with `prefix`.
    ///
    /// # Errors
    ///
    /// On a storage failure.
    fn all(&self, table: TableId, prefix: &[u8]) -> Result<Vec<Row>, StoreError> {
        self.scan_prefix(table, prefix, None, usize::MAX)
    }

    /// How many rows of a table have keys starting with `prefix`.
    ///
    /// # Errors
    ///
    /// On a storage failure.
    fn count(&self, table: TableId, prefix: &[u8]) -> Result<usize, StoreError> {
        Ok(self.all(table, prefix)?.len())
    }
}

impl<T: Tables + ?Sized> Rows for T {}

/// Writes to apply together: per table and key, the new value or `None` to remove.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Batch {
    rows: BTreeMap<(TableId, Vec<u8>), Option<Vec<u8>>>,
}

impl Batch {
    /// Sets a row.
    pub fn put(&mut self, table: TableId, key: Vec<u8>, value: Vec<u8>) {
        self.rows.insert((table, key), Some(value));
    }

    /// Removes a row.
    pub fn delete(&mut self, table: TableId, key: Vec<u8>) {
        self.rows.insert((table, key), None);
    }

    /// Whether there is nothing to write.
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// How many rows it writes.
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    /// The writes, in table and key order.
    pub fn iter(&self) -> impl Iterator<Item = (TableId, &[u8], Option<&[u8]>)> {
        self.rows
            .iter()
            .map(|((table, key), value)| (*table, key.as_slice(), value.as_deref()))
    }

    /// The pending value of a row: `Some(None)` when the batch removes it.
    fn pending(&self, table: TableId, key: &[u8]) -> Option<Option<&[u8]>> {
        self.rows
            .get(&(table, key.to_vec()))
            .map(|value| value.as_deref())
    }

    /// The pending rows of a table in a range, in key order.
    fn pending_range<'b>(
        &'b self,
        table: TableId,
        start: Bound<&[u8]>,
        end: Bound<&[u8]>,
    ) -> impl DoubleEndedIterator<Item = (&'b [u8], Option<&'b [u8]>)> {
        let low = match start {
            Bound::Included(k) => Bound::Included((table, k.to_vec())),
            Bound::Excluded(k) => Bound::Excluded((table, k.to_vec())),
            Bound::Unbounded => Bound::Included((table, Vec::new())),
        };
        let high = match end {
            Bound::Included(k) => Bound::Included((table, k.to_vec())),
            Bound::Excluded(k) => Bound::Excluded((table, k.to_vec())),
            // Every key of a table sorts before the next table's empty key.
            Bound::Unbounded => match TableId::from_byte(table.byte() + 1) {
                Some(next) => Bound::Excluded((next, Vec::new())),
                None => Bound::Unbounded,
            },
        };
        self.rows
            .range((low, high))
            .map(|((_, key), value)| (key.as_slice(), value.as_deref()))
    }
}

/// When written data must be on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// Before `apply` returns (fsync): acknowledgements, checkpoints, admin changes.
    Now,
    /// At the next durable write: work that a crash would simply redo (a segment's
    /// computation, fired timers).
    Later,
}

/// A record to append to the log: the source it came from and the message's JSON.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogRecord {
    /// The source (its id).
    pub source: Arc<str>,
    /// The message JSON as accepted.
    pub message: Vec<u8>,
}

/// A record read from the log, with the position the log gave it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogEntry {
    /// Its position: increasing with arrival order.
    pub seq: u64,
    /// The source.
    pub source: String,
    /// The message JSON as accepted.
    pub message: Vec<u8>,
}

/// The durable log of accepted events.
pub trait EventLog: Send + Sync {
    /// Appends `records` (given consecutive positions after the last one) and records
    /// the ingest counters, durably: once it returns, a crash loses neither. Answers
    /// the position of the last record appended.
    ///
    /// # Errors
    ///
    /// On a storage failure: nothing was appended then.
    fn append(&self, records: &[LogRecord], counters: &IngestCounters) -> Result<u64, StoreError>;

    /// Up to `limit` entries after position `after`, in order.
    ///
    /// # Errors
    ///
    /// On a storage failure.
    fn read(&self, after: u64, limit: usize) -> Result<Vec<LogEntry>, StoreError>;

    /// The last position given (0 when none was).
    ///
    /// # Errors
    ///
    /// On a storage failure.
    fn last(&self) -> Result<u64, StoreError>;

    /// Forgets the entries up to position `up_to`, which the pipeline has processed.
    ///
    /// # Errors
    ///
    /// On a storage failure.
    fn trim(&self, up_to: u64) -> Result<(), StoreError>;

    /// Notified after every append.
    fn wake(&self) -> &Arc<Wake>;
}

/// A storage backend: the log and the tables, and the one way to change the tables.
pub trait Backend: Tables + EventLog + Debug + Send + Sync {
    /// Applies `batch` atomically: after a crash, all of it or none is there. With
    /// [`Durability::Now`] it is on disk when this returns.
    ///
    /// # Errors
    ///
    /// On a storage failure: nothing of the batch is applied then.
    fn apply(&self, batch: Batch, durability: Durability) -> Result<(), StoreError>;

    /// Serialises the transactions of this process ([`Txn`]).
    fn writer_lock(&self) -> &Mutex<()>;

    /// Makes everything applied so far durable.
    ///
    /// # Errors
    ///
    /// On a storage failure.
    fn flush(&self) -> Result<(), StoreError>;
}

impl dyn Backend + '_ {
    /// A transaction: it holds the writer lock until committed or dropped, and reads its
    /// own pending writes over the committed state.
    pub fn begin(&self) -> Txn<'_> {
        Txn {
            base: self,
            batch: Batch::default(),
            _lock: Some(
                self.writer_lock()
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner),
            ),
        }
    }

    /// Runs `work` in a transaction and commits what it wrote.
    ///
    /// # Errors
    ///
    /// The work's error (nothing is written then), or a storage failure.
    pub fn write<T>(
        &self,
        durability: Durability,
        work: impl FnOnce(&mut Txn<'_>) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let mut txn = self.begin();
        let result = work(&mut txn)?;
        self.commit(txn, durability)?;
        Ok(result)
    }

    /// Applies a transaction's writes in one batch and lets the lock go.
    ///
    /// # Errors
    ///
    /// On a storage failure: nothing of it is applied then.
    pub fn commit(&self, txn: Txn<'_>, durability: Durability) -> Result<(), StoreError> {
        let Txn { batch, _lock, .. } = txn;
        if batch.is_empty() {
            return Ok(());
        }
        self.apply(batch, durability)
    }
}

/// Pending writes over a backend's committed state; see [`Backend::begin`].
pub struct Txn<'b> {
    base: &'b dyn Tables,
    batch: Batch,
    _lock: Option<MutexGuard<'b, ()>>,
}

impl Debug for Txn<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Txn")
            .field("pending", &self.batch.len())
            .finish()
    }
}

impl<'b> Txn<'b> {
    /// A view of committed state with writes that go nowhere: what read-only work over
    /// a writable interface (the identity graph's) is given. It takes no lock.
    pub fn scratch(base: &'b dyn Tables) -> Self {
        Txn {
            base,
            batch: Batch::default(),
            _lock: None,
        }
    }

    /// Sets a row.
    pub fn put(&mut self, table: TableId, key: Vec<u8>, value: Vec<u8>) {
        self.batch.put(table, key, value);
    }

    /// Removes a row.
    pub fn delete(&mut self, table: TableId, key: Vec<u8>) {
        self.batch.delete(table, key);
    }

    /// Sets a row to `value` as JSON.
    ///
    /// # Errors
    ///
    /// When `value` cannot be encoded.
    pub fn put_json<T: serde::Serialize + ?Sized>(
        &mut self,
        table: TableId,
        key: Vec<u8>,
        value: &T,
    ) -> Result<(), StoreError> {
        self.batch.put(table, key, serde_json::to_vec(value)?);
        Ok(())
    }

    /// Forgets every pending write (a failed chunk's).
    pub fn discard(&mut self) {
        self.batch = Batch::default();
    }

    /// The pending writes.
    pub fn batch(&self) -> &Batch {
        &self.batch
    }
}

impl Tables for Txn<'_> {
    fn get(&self, table: TableId, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        match self.batch.pending(table, key) {
            Some(pending) => Ok(pending.map(<[u8]>::to_vec)),
            None => self.base.get(table, key),
        }
    }

    fn scan(
        &self,
        table: TableId,
        start: Bound<&[u8]>,
        end: Bound<&[u8]>,
        limit: usize,
        reverse: bool,
    ) -> Result<Vec<Row>, StoreError> {
        if empty_range(start, end) || limit == 0 {
            return Ok(Vec::new());
        }
        let pending: Vec<(&[u8], Option<&[u8]>)> = if reverse {
            self.batch.pending_range(table, start, end).rev().collect()
        } else {
            self.batch.pending_range(table, start, end).collect()
        };
        if pending.is_empty() {
            return self.base.scan(table, start, end, limit, reverse);
        }
        // Each pending write hides at most one committed row: read that many more.
        let base = self.base.scan(
            table,
            start,
            end,
            limit.saturating_add(pending.len()),
            reverse,
        )?;
        let mut merged: BTreeMap<Vec<u8>, Vec<u8>> = base.into_iter().collect();
        let base_complete = merged.len() < limit.saturating_add(pending.len());
        let frontier = if base_complete {
            None
        } else if reverse {
            merged.keys().next().cloned()
        } else {
            merged.keys().next_back().cloned()
        };
        for (key, value) in pending {
            // A pending row beyond the last committed row read may sort after rows not
            // read: it waits for a later page.
            let beyond = frontier.as_ref().is_some_and(|f| {
                if reverse {
                    key < f.as_slice()
                } else {
                    key > f.as_slice()
                }
            });
            if beyond {
                continue;
            }
            match value {
                Some(value) => merged.insert(key.to_vec(), value.to_vec()),
                None => merged.remove(key),
            };
        }
        let rows: Vec<Row> = if reverse {
            merged.into_iter().rev().take(limit).collect()
        } else {
            merged.into_iter().take(limit).collect()
        };
        Ok(rows)
    }
}

/// Wakes the pipeline when the log grows, and tells it to stop.
#[derive(Debug, Default)]
pub struct Wake {
    state: Mutex<WakeState>,
    cond: Condvar,
}

#[derive(Debug, Default)]
struct WakeState {
    pending: bool,
    stop: bool,
}

impl Wake {
    fn lock(&self) -> MutexGuard<'_, WakeState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// New entries are in the log.
    pub fn notify(&self) {
        self.lock().pending = true;
        self.cond.notify_all();
    }

    /// Readers should stop.
    pub fn stop(&self) {
        self.lock().stop = true;
        self.cond.notify_all();
    }

    /// Whether [`Wake::stop`] was called.
    pub fn stopped(&self) -> bool {
        self.lock().stop
    }

    /// Waits for a notification (or `timeout`); `false` once stopped.
    pub fn wait(&self, timeout: Option<Duration>) -> bool {
        let mut state = self.lock();
        while !state.pending && !state.stop {
            state = match timeout {
                None => self
                    .cond
                    .wait(state)
                    .unwrap_or_else(PoisonError::into_inner),
                Some(t) => {
                    let (state, result) = self
                        .cond
                        .wait_timeout(state, t)
                        .unwrap_or_else(PoisonError::into_inner);
                    if result.timed_out() {
                        return !state.stop;
                    }
                    state
                }
            };
        }
        state.pending = false;
        !state.stop
    }
}

//! The embedded backend on sled, and the only module that knows sled (it is marked
//! unmaintained upstream: keeping it here means another engine replaces it in one
//! place; a test checks that no other module names it).
//!
//! Two trees: `log.v2`, the event log (`seq` big-endian → `source \n message`), and
//! `state.v2`, every table in one tree, each row's key prefixed with its table's byte,
//! so that one batch applies a transaction's writes to any tables atomically. A data
//! directory of the previous layout (one tree per module, the log doubling as the event
//! store) is migrated on open, once; see [`migrate`].

mod migrate;

use std::ops::Bound;
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};

use super::meta::{INGEST_COUNTERS, Metadata};
use super::{
    Backend, Batch, Durability, EventLog, LogEntry, LogRecord, Row, TableId, Tables, Wake,
    empty_range,
};
use crate::error::StoreError;
use crate::stats::IngestCounters;

/// The layout this module writes.
pub const FORMAT: &str = "2";

fn storage(error: sled::Error) -> StoreError {
    StoreError::Storage(error.to_string())
}

/// The embedded store.
#[derive(Debug)]
pub struct SledBackend {
    db: sled::Db,
    log: sled::Tree,
    state: sled::Tree,
    /// The last position given.
    last: Mutex<u64>,
    wake: Arc<Wake>,
    writer: Mutex<()>,
}

fn row_key(table: TableId, key: &[u8]) -> Vec<u8> {
    let mut row = Vec::with_capacity(key.len() + 1);
    row.push(table.byte());
    row.extend_from_slice(key);
    row
}

fn seq_of(key: &[u8]) -> Result<u64, StoreError> {
    <[u8; 8]>::try_from(key)
        .map(u64::from_be_bytes)
        .map_err(|_| StoreError::Corrupt("a log key is not 8 bytes".to_owned()))
}

fn log_value(source: &str, message: &[u8]) -> Vec<u8> {
    let mut value = Vec::with_capacity(source.len() + 1 + message.len());
    value.extend_from_slice(source.as_bytes());
    value.push(b'\n');
    value.extend_from_slice(message);
    value
}

fn log_entry(seq: u64, value: &[u8]) -> Result<LogEntry, StoreError> {
    let split = value
        .iter()
        .position(|b| *b == b'\n')
        .ok_or_else(|| StoreError::Corrupt(format!("log entry {seq} has no source")))?;
    let source = std::str::from_utf8(&value[..split])
        .map_err(|_| StoreError::Corrupt(format!("log entry {seq} has a bad source")))?;
    Ok(LogEntry {
        seq,
        source: source.to_owned(),
        message: value[split + 1..].to_vec(),
    })
}

impl SledBackend {
    /// Opens (or creates) the store in `dir`, with `cache_bytes` of page cache, and
    /// migrates a data directory of the previous layout.
    ///
    /// # Errors
    ///
    /// When sled cannot open the directory (permissions, corruption, another process
    /// holding it), or the migration fails (nothing of the old layout is removed then).
    pub fn open(dir: &Path, cache_bytes: u64) -> Result<Self, StoreError> {
        let db = sled::Config::new()
            .path(dir)
            .cache_capacity(cache_bytes)
            .open()
            .map_err(storage)?;
        let backend = SledBackend {
            log: db.open_tree("log.v2").map_err(storage)?,
            state: db.open_tree("state.v2").map_err(storage)?,
            db,
            last: Mutex::new(0),
            wake: Arc::new(Wake::default()),
            writer: Mutex::new(()),
        };
        migrate::from_v1(&backend)?;
        let logged = match backend.log.last().map_err(storage)? {
            Some((key, _)) => seq_of(&key)?,
            None => 0,
        };
        let last = logged.max(backend.checkpoint()?);
        *backend.last.lock().unwrap_or_else(PoisonError::into_inner) = last;
        if backend.format()?.is_none() {
            let mut batch = Batch::default();
            batch.put(
                TableId::Meta,
                super::meta::FORMAT.to_vec(),
                FORMAT.as_bytes().to_vec(),
            );
            backend.apply(batch, Durability::Now)?;
        }
        Ok(backend)
    }

    fn sled_batch(batch: &Batch) -> sled::Batch {
        let mut out = sled::Batch::default();
        for (table, key, value) in batch.iter() {
            match value {
                Some(value) => out.insert(row_key(table, key), value),
                None => out.remove(row_key(table, key)),
            }
        }
        out
    }
}

impl Tables for SledBackend {
    fn get(&self, table: TableId, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self
            .state
            .get(row_key(table, key))
            .map_err(storage)?
            .map(|v| v.to_vec()))
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
        let low = match start {
            Bound::Included(k) => Bound::Included(row_key(table, k)),
            Bound::Excluded(k) => Bound::Excluded(row_key(table, k)),
            Bound::Unbounded => Bound::Included(vec![table.byte()]),
        };
        let high = match end {
            Bound::Included(k) => Bound::Included(row_key(table, k)),
            Bound::Excluded(k) => Bound::Excluded(row_key(table, k)),
            Bound::Unbounded => Bound::Excluded(vec![table.byte() + 1]),
        };
        let range = self.state.range::<Vec<u8>, _>((low, high));
        let take = |entry: sled::Result<(sled::IVec, sled::IVec)>| -> Result<Row, StoreError> {
            let (key, value) = entry.map_err(storage)?;
            Ok((key[1..].to_vec(), value.to_vec()))
        };
        if reverse {
            range.rev().take(limit).map(take).collect()
        } else {
            range.take(limit).map(take).collect()
        }
    }
}

impl EventLog for SledBackend {
    fn append(&self, records: &[LogRecord], counters: &IngestCounters) -> Result<u64, StoreError> {
        let mut last = self.last.lock().unwrap_or_else(PoisonError::into_inner);
        let mut next = *last;
        let mut batch = sled::Batch::default();
        for record in records {
            next += 1;
            batch.insert(
                &next.to_be_bytes(),
                log_value(&record.source, &record.message),
            );
        }
        self.log.apply_batch(batch).map_err(storage)?;
        self.state
            .insert(
                row_key(TableId::Meta, INGEST_COUNTERS),
                serde_json::to_vec(counters)?,
            )
            .map_err(storage)?;
        self.db.flush().map_err(storage)?;
        *last = next;
        drop(last);
        self.wake.notify();
        Ok(next)
    }

    fn read(&self, after: u64, limit: usize) -> Result<Vec<LogEntry>, StoreError> {
        self.log
            .range(after.saturating_add(1).to_be_bytes()..)
            .take(limit)
            .map(|entry| {
                let (key, value) = entry.map_err(storage)?;
                log_entry(seq_of(&key)?, &value)
            })
            .collect()
    }

    fn last(&self) -> Result<u64, StoreError> {
        Ok(*self.last.lock().unwrap_or_else(PoisonError::into_inner))
    }

    fn trim(&self, up_to: u64) -> Result<(), StoreError> {
        let mut batch = sled::Batch::default();
        for key in self.log.range(..=up_to.to_be_bytes()).keys() {
            batch.remove(key.map_err(storage)?);
        }
        self.log.apply_batch(batch).map_err(storage)
    }

    fn wake(&self) -> &Arc<Wake> {
        &self.wake
    }
}

impl Backend for SledBackend {
    fn apply(&self, batch: Batch, durability: Durability) -> Result<(), StoreError> {
        self.state
            .apply_batch(Self::sled_batch(&batch))
            .map_err(storage)?;
        if durability == Durability::Now {
            self.db.flush().map_err(storage)?;
        }
        Ok(())
    }

    fn writer_lock(&self) -> &Mutex<()> {
        &self.writer
    }

    fn flush(&self) -> Result<(), StoreError> {
        self.db.flush().map_err(storage)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    crate::backend_suite!({
        let dir = tempfile::tempdir().expect("tempdir");
        let backend = SledBackend::open(dir.path(), 8 << 20).expect("open");
        Fixture {
            backend: Box::new(backend),
            _keep: Some(dir),
        }
    });

    #[test]
    fn what_was_committed_is_there_after_a_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let backend = SledBackend::open(dir.path(), 8 << 20).expect("open");
            let records = [LogRecord {
                source: Arc::from("src"),
                message: b"{}".to_vec(),
            }];
            assert_eq!(
                backend
                    .append(&records, &IngestCounters::default())
                    .expect("append"),
                1
            );
            let mut batch = Batch::default();
            batch.put(TableId::Profiles, b"p".to_vec(), b"v".to_vec());
            backend.apply(batch, Durability::Now).expect("apply");
        }
        let backend = SledBackend::open(dir.path(), 8 << 20).expect("reopen");
        assert_eq!(backend.last().expect("last"), 1);
        assert_eq!(
            backend.get(TableId::Profiles, b"p").expect("get"),
            Some(b"v".to_vec())
        );
        assert_eq!(backend.format().expect("format").as_deref(), Some(FORMAT));
    }
}

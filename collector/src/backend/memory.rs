//! The in-memory backend: ordered maps behind a lock, for fast tests of stages and
//! handlers. It keeps the same contract as the others (the shared suite checks it);
//! nothing survives the process.

use std::collections::BTreeMap;
use std::ops::Bound;
use std::sync::{Arc, Mutex, PoisonError, RwLock, RwLockReadGuard};

use super::meta::INGEST_COUNTERS;
use super::{
    Backend, Batch, Durability, EventLog, LogEntry, LogRecord, Row, TableId, Tables, Wake,
    empty_range,
};
use crate::error::StoreError;
use crate::stats::IngestCounters;

/// Every table's rows, by table and key.
type Rowmap = BTreeMap<(TableId, Vec<u8>), Vec<u8>>;

/// Everything in memory.
#[derive(Debug, Default)]
pub struct MemoryBackend {
    rows: RwLock<Rowmap>,
    log: RwLock<BTreeMap<u64, LogEntry>>,
    last: Mutex<u64>,
    wake: Arc<Wake>,
    writer: Mutex<()>,
}

impl MemoryBackend {
    /// An empty backend.
    pub fn new() -> Self {
        MemoryBackend::default()
    }

    fn rows(&self) -> RwLockReadGuard<'_, Rowmap> {
        self.rows.read().unwrap_or_else(PoisonError::into_inner)
    }
}

fn bound(table: TableId, bound: Bound<&[u8]>) -> Bound<(TableId, Vec<u8>)> {
    match bound {
        Bound::Included(k) => Bound::Included((table, k.to_vec())),
        Bound::Excluded(k) => Bound::Excluded((table, k.to_vec())),
        Bound::Unbounded => Bound::Unbounded,
    }
}

impl Tables for MemoryBackend {
    fn get(&self, table: TableId, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.rows().get(&(table, key.to_vec())).cloned())
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
        let low = match bound(table, start) {
            Bound::Unbounded => Bound::Included((table, Vec::new())),
            low => low,
        };
        let high = match bound(table, end) {
            Bound::Unbounded => match TableId::from_byte(table.byte() + 1) {
                Some(next) => Bound::Excluded((next, Vec::new())),
                None => Bound::Unbounded,
            },
            high => high,
        };
        let rows = self.rows();
        let range = rows.range((low, high));
        let pick =
            |((_, key), value): (&(TableId, Vec<u8>), &Vec<u8>)| (key.clone(), value.clone());
        Ok(if reverse {
            range.rev().take(limit).map(pick).collect()
        } else {
            range.take(limit).map(pick).collect()
        })
    }
}

impl EventLog for MemoryBackend {
    fn append(&self, records: &[LogRecord], counters: &IngestCounters) -> Result<u64, StoreError> {
        let mut last = self.last.lock().unwrap_or_else(PoisonError::into_inner);
        {
            let mut log = self.log.write().unwrap_or_else(PoisonError::into_inner);
            for record in records {
                *last += 1;
                log.insert(
                    *last,
                    LogEntry {
                        seq: *last,
                        source: record.source.to_string(),
                        message: record.message.clone(),
                    },
                );
            }
        }
        self.rows
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(
                (TableId::Meta, INGEST_COUNTERS.to_vec()),
                serde_json::to_vec(counters)?,
            );
        let appended = *last;
        drop(last);
        self.wake.notify();
        Ok(appended)
    }

    fn read(&self, after: u64, limit: usize) -> Result<Vec<LogEntry>, StoreError> {
        let log = self.log.read().unwrap_or_else(PoisonError::into_inner);
        Ok(log
            .range(after.saturating_add(1)..)
            .take(limit)
            .map(|(_, entry)| entry.clone())
            .collect())
    }

    fn last(&self) -> Result<u64, StoreError> {
        Ok(*self.last.lock().unwrap_or_else(PoisonError::into_inner))
    }

    fn trim(&self, up_to: u64) -> Result<(), StoreError> {
        let mut log = self.log.write().unwrap_or_else(PoisonError::into_inner);
        let kept = log.split_off(&up_to.saturating_add(1));
        *log = kept;
        Ok(())
    }

    fn wake(&self) -> &Arc<Wake> {
        &self.wake
    }
}

impl Backend for MemoryBackend {
    fn apply(&self, batch: Batch, _durability: Durability) -> Result<(), StoreError> {
        let mut rows = self.rows.write().unwrap_or_else(PoisonError::into_inner);
        for (table, key, value) in batch.iter() {
            match value {
                Some(value) => rows.insert((table, key.to_vec()), value.to_vec()),
                None => rows.remove(&(table, key.to_vec())),
            };
        }
        Ok(())
    }

    fn writer_lock(&self) -> &Mutex<()> {
        &self.writer
    }

    fn flush(&self) -> Result<(), StoreError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::MemoryBackend;

    crate::backend_suite!(Fixture {
        backend: Box::new(MemoryBackend::new()),
        _keep: None,
    });
}

//! The file store: the queue's [`Op`]s in an append-only log file, replayed on open.
//!
//! Each record is framed as `MAGIC (4 bytes) | length (u32 LE) | CRC-32 (u32 LE) | JSON
//! op`. An op is written with one `write` before [`EventStore::apply`] returns, so it
//! survives the process being killed (the kernel has it); `sync: true` also fsyncs, for
//! power loss. On open, a record torn by a crash (at the tail) or corrupted on disk is
//! skipped and counted; the reader resynchronises on the next magic, so one bad record
//! never blocks the queue. When the log holds much more than the live queue, or when bad
//! records were found, it is compacted: the live state is written to a new file that
//! atomically replaces the old one.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use crate::queue::{EventStore, Op, QueueState, StoreError};

const MAGIC: &[u8; 4] = b"KQ1\n";
const HEADER_BYTES: usize = 12;
/// No op is larger than this (an event is at most 32 KB); a longer length is corruption.
const MAX_RECORD_BYTES: usize = 1 << 20;
/// The log is compacted when it is this much larger than the live queue...
const COMPACT_RATIO: u64 = 4;
/// ...and at least this large.
const COMPACT_MIN_BYTES: u64 = 1 << 20;

/// A queue persisted in one log file.
#[derive(Debug)]
pub struct FileStore {
    path: PathBuf,
    file: File,
    file_bytes: u64,
    live_bytes: u64,
    sync: bool,
    state: QueueState,
    corrupt: u64,
}

fn frame(op: &Op) -> Result<Vec<u8>, StoreError> {
    let payload = match op {
        // Serde's form, without reading the event's JSON again on every capture.
        Op::Append { event } => {
            format!("{{\"append\":{{\"event\":{}}}}}", event.to_json()).into_bytes()
        }
        _ => serde_json::to_vec(op)?,
    };
    let mut record = Vec::with_capacity(HEADER_BYTES + payload.len());
    record.extend_from_slice(MAGIC);
    record.extend_from_slice(
        &u32::try_from(payload.len())
            .unwrap_or(u32::MAX)
            .to_le_bytes(),
    );
    record.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
    record.extend_from_slice(&payload);
    Ok(record)
}

/// Decodes every good record of `bytes`; answers the ops and how many bad records were
/// skipped (a torn tail counts as one).
fn decode_all(bytes: &[u8]) -> (Vec<Op>, u64) {
    let mut ops = Vec::new();
    let mut bad = 0;
    let mut at = 0;
    let mut in_bad_run = false;
    while at < bytes.len() {
        match decode_one(&bytes[at..]) {
            Some((op, used)) => {
                ops.push(op);
                at += used;
                in_bad_run = false;
            }
            None => {
                if !in_bad_run {
                    bad += 1;
                    in_bad_run = true;
                }
                // Resynchronise on the next magic.
                at += 1;
                match bytes[at..].windows(MAGIC.len()).position(|w| w == MAGIC) {
                    Some(offset) => at += offset,
                    None => break,
                }
            }
        }
    }
    (ops, bad)
}

fn decode_one(bytes: &[u8]) -> Option<(Op, usize)> {
    let header = bytes.get(..HEADER_BYTES)?;
    if &header[..4] != MAGIC {
        return None;
    }
    let len = u32::from_le_bytes(header[4..8].try_into().ok()?) as usize;
    let crc = u32::from_le_bytes(header[8..12].try_into().ok()?);
    if len > MAX_RECORD_BYTES {
        return None;
    }
    let payload = bytes.get(HEADER_BYTES..HEADER_BYTES + len)?;
    if crc32fast::hash(payload) != crc {
        return None;
    }
    let op = serde_json::from_slice(payload).ok()?;
    Some((op, HEADER_BYTES + len))
}

/// The ops that rebuild `state` from nothing.
fn snapshot_ops(state: &QueueState) -> Vec<Op> {
    let mut counters = state.counters().clone();
    // Appending the live events counts them as captured again; start below that.
    counters.captured -= state.len() as u64;
    let mut ops = vec![Op::Snapshot {
        counters,
        next_id: state.next_id(),
    }];
    ops.extend(state.all_meta().iter().map(|(key, value)| Op::Meta {
        key: key.clone(),
        value: value.clone(),
    }));
    ops.extend(state.events().map(|event| Op::Append {
        event: event.clone(),
    }));
    ops
}

impl FileStore {
    /// Opens (or creates) the queue log at `path`, replaying it. With `sync`, every op
    /// is fsynced as well as written.
    ///
    /// # Errors
    ///
    /// When the file cannot be read, created or (after bad records) compacted.
    pub fn open(path: impl Into<PathBuf>, sync: bool) -> Result<Self, StoreError> {
        let path = path.into();
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent)?;
        }
        let mut bytes = Vec::new();
        match File::open(&path) {
            Ok(mut file) => {
                file.read_to_end(&mut bytes)?;
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e.into()),
        }
        let (ops, corrupt) = decode_all(&bytes);
        let mut state = QueueState::default();
        for op in ops {
            state.apply(op);
        }
        let file = OpenOptions::new().create(true).append(true).open(&path)?;
        let mut store = FileStore {
            path,
            file,
            file_bytes: bytes.len() as u64,
            live_bytes: 0,
            sync,
            state,
            corrupt,
        };
        store.live_bytes = store.encoded_state_bytes()?;
        if corrupt > 0 {
            // Rewrite without the bad records, so they are skipped (and counted) once.
            store.compact()?;
        }
        Ok(store)
    }

    /// The log file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn encoded_state_bytes(&self) -> Result<u64, StoreError> {
        let mut total = 0;
        for op in snapshot_ops(&self.state) {
            total += frame(&op)?.len() as u64;
        }
        Ok(total)
    }

    /// Rewrites the log as the live state only, replacing the old file atomically.
    ///
    /// # Errors
    ///
    /// When the new file cannot be written or renamed; the old one is then kept.
    pub fn compact(&mut self) -> Result<(), StoreError> {
        let mut buffer = Vec::new();
        for op in snapshot_ops(&self.state) {
            buffer.extend_from_slice(&frame(&op)?);
        }
        let tmp = self.path.with_extension("compacting");
        {
            let mut file = File::create(&tmp)?;
            file.write_all(&buffer)?;
            file.sync_all()?;
        }
        std::fs::rename(&tmp, &self.path)?;
        self.file = OpenOptions::new().append(true).open(&self.path)?;
        self.file_bytes = buffer.len() as u64;
        self.live_bytes = self.file_bytes;
        Ok(())
    }
}

impl EventStore for FileStore {
    fn apply(&mut self, op: Op) -> Result<(), StoreError> {
        let record = frame(&op)?;
        self.file.write_all(&record)?;
        if self.sync {
            self.file.sync_data()?;
        }
        self.file_bytes += record.len() as u64;
        match &op {
            Op::Append { .. } => self.live_bytes += record.len() as u64,
            Op::Remove { ids, .. } => {
                let freed: u64 = ids
                    .iter()
                    .filter_map(|id| self.state.get(*id))
                    .map(|e| e.json().len() as u64 + 64)
                    .sum();
                self.live_bytes = self.live_bytes.saturating_sub(freed);
            }
            _ => {}
        }
        self.state.apply(op);
        if self.file_bytes > COMPACT_MIN_BYTES && self.file_bytes > self.live_bytes * COMPACT_RATIO
        {
            self.compact()?;
        }
        Ok(())
    }

    fn state(&self) -> &QueueState {
        &self.state
    }

    fn corrupt_records(&self) -> u64 {
        self.corrupt
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::{Outcome, suite};

    fn path(dir: &tempfile::TempDir) -> PathBuf {
        dir.path().join("queue").join("events.log")
    }

    #[test]
    fn an_append_record_is_serde_form_without_reparsing() {
        for id in [3, 4] {
            let op = Op::Append {
                event: suite::event(id, r#"{"type":"track","event":"A"}"#),
            };
            let record = frame(&op).expect("frames");
            let serde = serde_json::to_vec(&op).expect("serializes");
            assert_eq!(&record[HEADER_BYTES..], serde.as_slice());
        }
    }

    #[test]
    fn file_store_passes_the_suite() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = path(&dir);
        suite::run(
            &mut || Box::new(FileStore::open(&p, false).expect("open")),
            &mut |store| {
                drop(store);
                Box::new(FileStore::open(&p, true).expect("reopen"))
            },
        );
    }

    fn append(store: &mut FileStore, id: u64) {
        store
            .apply(Op::Append {
                event: suite::event(id, &format!("{{\"n\":{id}}}")),
            })
            .expect("append");
    }

    #[test]
    fn a_torn_tail_is_skipped_counted_and_cut() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = path(&dir);
        let mut store = FileStore::open(&p, false).expect("open");
        for id in 0..3 {
            append(&mut store, id);
        }
        drop(store);
        let full = std::fs::read(&p).expect("read");
        // A crash in the middle of writing the third record.
        std::fs::write(&p, &full[..full.len() - 7]).expect("tear");
        let mut store = FileStore::open(&p, false).expect("reopen");
        assert_eq!(store.corrupt_records(), 1);
        assert_eq!(
            store.state().events().map(|e| e.id).collect::<Vec<_>>(),
            [0, 1]
        );
        append(&mut store, 3);
        drop(store);
        let store = FileStore::open(&p, false).expect("reopen again");
        assert_eq!(store.corrupt_records(), 0, "counted once, then cut away");
        assert_eq!(
            store.state().events().map(|e| e.id).collect::<Vec<_>>(),
            [0, 1, 3]
        );
    }

    #[test]
    fn a_corrupt_record_in_the_middle_does_not_block_the_rest() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = path(&dir);
        let mut store = FileStore::open(&p, false).expect("open");
        for id in 0..4 {
            append(&mut store, id);
        }
        drop(store);
        let mut bytes = std::fs::read(&p).expect("read");
        let second = bytes
            .windows(4)
            .enumerate()
            .filter(|(_, w)| w == MAGIC)
            .nth(1)
            .map(|(i, _)| i)
            .expect("second record");
        bytes[second + HEADER_BYTES + 3] ^= 0xff; // flip a payload byte: CRC mismatch
        std::fs::write(&p, &bytes).expect("corrupt");
        let store = FileStore::open(&p, false).expect("reopen");
        assert_eq!(store.corrupt_records(), 1);
        assert_eq!(
            store.state().events().map(|e| e.id).collect::<Vec<_>>(),
            [0, 2, 3]
        );

        // Garbage where a length should be, and trailing junk.
        let mut bytes = std::fs::read(&p).expect("read");
        bytes.splice(4..8, [0xff, 0xff, 0xff, 0x7f]);
        bytes.extend_from_slice(b"junk");
        std::fs::write(&p, &bytes).expect("corrupt");
        let store = FileStore::open(&p, false).expect("reopen");
        assert_eq!(store.corrupt_records(), 2);
        assert_eq!(
            store.state().events().map(|e| e.id).collect::<Vec<_>>(),
            [0, 2, 3]
        );
    }

    #[test]
    fn compaction_keeps_state_and_bounds_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = path(&dir);
        let mut store = FileStore::open(&p, false).expect("open");
        let big = format!("\"{}\"", "x".repeat(2_000));
        for id in 0..2_000 {
            store
                .apply(Op::Append {
                    event: suite::event(id, &big),
                })
                .expect("append");
            if id >= 10 {
                store
                    .apply(Op::Remove {
                        ids: vec![id - 10],
                        outcome: Outcome::Delivered,
                    })
                    .expect("remove");
            }
        }
        let size = std::fs::metadata(&p).expect("meta").len();
        assert!(
            size < 4 * COMPACT_MIN_BYTES,
            "log stays bounded: {size} bytes"
        );
        let before = store.state().clone();
        drop(store);
        let store = FileStore::open(&p, false).expect("reopen");
        assert_eq!(store.state(), &before);
        assert_eq!(store.state().counters().delivered, 1_990);
        assert_eq!(store.state().len(), 10);
    }
}

//! Metadata: the pipeline's checkpoint and counters, credentials (sealed), sources'
//! cursors, the numbers other modules count with, each source's processing rules,
//! segment definitions and imports.
//!
//! Rows: `Meta` holds named values (`checkpoint`, `counters:ingest`,
//! `counters:pipeline`, `format`, `credential:{name}`, `cursor:{name}`, `number:{name}`);
//! `Rules` source → rules (JSON); `Segments` key → definition (JSON, read back by the
//! segments module, which reports an unreadable one); `Imports` id → job and report
//! (JSON; ids are time-ordered).

use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

use super::{Rows, TableId, Tables, Txn, keys};
use crate::error::StoreError;
use crate::stats::{IngestCounters, PipelineCounters};

/// The key of the ingest counters (the log writes them with each append).
pub const INGEST_COUNTERS: &[u8] = b"counters:ingest";
const PIPELINE_COUNTERS: &[u8] = b"counters:pipeline";
const CHECKPOINT: &[u8] = b"checkpoint";
/// The key of the layout version.
pub const FORMAT: &[u8] = b"format";

fn named(kind: &str, name: &str) -> Vec<u8> {
    format!("{kind}:{name}").into_bytes()
}

fn number_of(bytes: &[u8]) -> Result<u64, StoreError> {
    <[u8; 8]>::try_from(bytes)
        .map(u64::from_be_bytes)
        .map_err(|_| StoreError::Corrupt("a stored number is not 8 bytes".to_owned()))
}

/// Reading metadata.
pub trait Metadata: Tables {
    /// The last `seq` the pipeline has fully processed.
    ///
    /// # Errors
    ///
    /// On a storage failure.
    fn checkpoint(&self) -> Result<u64, StoreError> {
        self.get(TableId::Meta, CHECKPOINT)?
            .map_or(Ok(0), |v| number_of(&v))
    }

    /// The persisted counters.
    ///
    /// # Errors
    ///
    /// On a storage failure or undecodable counters.
    fn counters(&self) -> Result<(IngestCounters, PipelineCounters), StoreError> {
        Ok((
            self.get_json(TableId::Meta, INGEST_COUNTERS)?
                .unwrap_or_default(),
            self.get_json(TableId::Meta, PIPELINE_COUNTERS)?
                .unwrap_or_default(),
        ))
    }

    /// A stored credential (sealed).
    ///
    /// # Errors
    ///
    /// On a storage failure.
    fn credential(&self, name: &str) -> Result<Option<String>, StoreError> {
        text(self, &named("credential", name))
    }

    /// A source's stored cursor.
    ///
    /// # Errors
    ///
    /// On a storage failure.
    fn cursor(&self, name: &str) -> Result<Option<String>, StoreError> {
        text(self, &named("cursor", name))
    }

    /// The last number counted under `name` (0 when none was).
    ///
    /// # Errors
    ///
    /// On a storage failure.
    fn number(&self, name: &str) -> Result<u64, StoreError> {
        self.get(TableId::Meta, &named("number", name))?
            .map_or(Ok(0), |v| number_of(&v))
    }

    /// The layout version, when one is recorded.
    ///
    /// # Errors
    ///
    /// On a storage failure.
    fn format(&self) -> Result<Option<String>, StoreError> {
        text(self, FORMAT)
    }

    /// Every source's stored rules, as JSON.
    ///
    /// # Errors
    ///
    /// On a storage failure or an unreadable record.
    fn rules(&self) -> Result<Vec<(String, Value)>, StoreError> {
        self.all(TableId::Rules, &[])?
            .into_iter()
            .map(|(k, v)| Ok((keys::read_str(&k)?, serde_json::from_slice(&v)?)))
            .collect()
    }

    /// Every segment definition with its key, as stored.
    ///
    /// # Errors
    ///
    /// On a storage failure.
    fn segment_definitions(&self) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        self.all(TableId::Segments, &[])?
            .into_iter()
            .map(|(k, v)| Ok((keys::read_str(&k)?, v)))
            .collect()
    }

    /// An import's record.
    ///
    /// # Errors
    ///
    /// On a storage failure or an unreadable record.
    fn import<T: DeserializeOwned>(&self, id: &str) -> Result<Option<T>, StoreError> {
        self.get_json(TableId::Imports, &keys::str(id))
    }

    /// The newest imports' records, newest first, at most `limit`.
    ///
    /// # Errors
    ///
    /// On a storage failure or an unreadable record.
    fn imports<T: DeserializeOwned>(&self, limit: usize) -> Result<Vec<T>, StoreError> {
        self.scan_prefix_rev(TableId::Imports, &[], None, limit)?
            .into_iter()
            .map(|(_, v)| Ok(serde_json::from_slice(&v)?))
            .collect()
    }
}

impl<T: Tables + ?Sized> Metadata for T {}

fn text<T: Tables + ?Sized>(tables: &T, key: &[u8]) -> Result<Option<String>, StoreError> {
    Ok(tables
        .get(TableId::Meta, key)?
        .map(|v| String::from_utf8_lossy(&v).into_owned()))
}

impl Txn<'_> {
    /// Records the checkpoint with the pipeline counters.
    ///
    /// # Errors
    ///
    /// When the counters cannot be encoded.
    pub fn set_checkpoint(
        &mut self,
        seq: u64,
        counters: &PipelineCounters,
    ) -> Result<(), StoreError> {
        self.put(
            TableId::Meta,
            CHECKPOINT.to_vec(),
            seq.to_be_bytes().to_vec(),
        );
        self.put_json(TableId::Meta, PIPELINE_COUNTERS.to_vec(), counters)
    }

    /// Stores a credential (sealed by the caller).
    pub fn put_credential(&mut self, name: &str, sealed: &str) {
        self.put(
            TableId::Meta,
            named("credential", name),
            sealed.as_bytes().to_vec(),
        );
    }

    /// Stores a source's cursor.
    pub fn put_cursor(&mut self, name: &str, cursor: &str) {
        self.put(
            TableId::Meta,
            named("cursor", name),
            cursor.as_bytes().to_vec(),
        );
    }

    /// Counts one more under `name`; answers the new number.
    ///
    /// # Errors
    ///
    /// On a storage failure.
    pub fn next_number(&mut self, name: &str) -> Result<u64, StoreError> {
        let next = self.number(name)? + 1;
        self.set_number(name, next);
        Ok(next)
    }

    /// Sets the number counted under `name`.
    pub fn set_number(&mut self, name: &str, number: u64) {
        self.put(
            TableId::Meta,
            named("number", name),
            number.to_be_bytes().to_vec(),
        );
    }

    /// Records the layout version.
    pub fn set_format(&mut self, format: &str) {
        self.put(TableId::Meta, FORMAT.to_vec(), format.as_bytes().to_vec());
    }

    /// Stores a source's rules, or removes them when `None`.
    ///
    /// # Errors
    ///
    /// When they cannot be encoded.
    pub fn put_rules<R: Serialize>(
        &mut self,
        source: &str,
        rules: Option<&R>,
    ) -> Result<(), StoreError> {
        match rules {
            Some(rules) => self.put_json(TableId::Rules, keys::str(source), rules),
            None => {
                self.delete(TableId::Rules, keys::str(source));
                Ok(())
            }
        }
    }

    /// Stores a segment definition under its key, or removes it when `None`.
    ///
    /// # Errors
    ///
    /// When it cannot be encoded.
    pub fn put_segment<S: Serialize>(
        &mut self,
        key: &str,
        segment: Option<&S>,
    ) -> Result<(), StoreError> {
        match segment {
            Some(segment) => self.put_json(TableId::Segments, keys::str(key), segment),
            None => {
                self.delete(TableId::Segments, keys::str(key));
                Ok(())
            }
        }
    }

    /// Stores an import's record under its id.
    ///
    /// # Errors
    ///
    /// When it cannot be encoded.
    pub fn put_import<I: Serialize>(&mut self, id: &str, import: &I) -> Result<(), StoreError> {
        self.put_json(TableId::Imports, keys::str(id), import)
    }
}

//! The one-way migration from the first layout (one sled tree per module; the log
//! doubling as the event store; keys as `tag \0 part \0 part`) to this one. It runs at
//! open when the old trees are there: every row is rewritten into the new tables (the
//! log's processed entries become stored events with their indexes, the others stay on
//! the log), in batches, then the old trees are dropped and the format recorded. It is
//! idempotent: a crash midway leaves the old trees, and the next open starts again.

use std::collections::HashSet;

use super::{SledBackend, log_entry, storage};
use crate::backend::events::StoredEvent;
use crate::backend::{Backend as _, Durability, TableId, Tables, Txn, keys};
use crate::error::StoreError;

/// The trees of the first layout.
const OLD_TREES: [&str; 11] = [
    "meta",
    "log",
    "by_message_id",
    "by_user_id",
    "by_anonymous_id",
    "failed",
    "imports",
    "identity",
    "segments",
    "membership",
    "activation",
];

/// Rows written per batch.
const BATCH_ROWS: usize = 10_000;

/// A tables view that is never read: migration only writes.
struct Nothing;

impl Tables for Nothing {
    fn get(&self, _: TableId, _: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(None)
    }

    fn scan(
        &self,
        _: TableId,
        _: std::ops::Bound<&[u8]>,
        _: std::ops::Bound<&[u8]>,
        _: usize,
        _: bool,
    ) -> Result<Vec<crate::backend::Row>, StoreError> {
        Ok(Vec::new())
    }
}

/// Writes in batches of [`BATCH_ROWS`].
struct Writer<'b> {
    backend: &'b SledBackend,
    txn: Txn<'static>,
    rows: usize,
}

static NOTHING: Nothing = Nothing;

impl Writer<'_> {
    fn txn(&mut self) -> Result<&mut Txn<'static>, StoreError> {
        self.rows += 1;
        if self.rows >= BATCH_ROWS {
            self.flush()?;
        }
        Ok(&mut self.txn)
    }

    fn flush(&mut self) -> Result<(), StoreError> {
        let batch = std::mem::replace(&mut self.txn, Txn::scratch(&NOTHING))
            .batch()
            .clone();
        self.rows = 0;
        self.backend.apply(batch, Durability::Later)
    }
}

fn corrupt(what: &str) -> StoreError {
    StoreError::Corrupt(format!("migrating the old layout: {what}"))
}

/// The parts of an old space key after its tag: split at NULs.
fn parts(key: &[u8]) -> Vec<&[u8]> {
    key.get(2..)
        .unwrap_or_default()
        .split(|b| *b == 0)
        .collect()
}

fn text(bytes: &[u8]) -> Result<&str, StoreError> {
    std::str::from_utf8(bytes).map_err(|_| corrupt("a key part is not UTF-8"))
}

fn number(bytes: &[u8]) -> Result<u64, StoreError> {
    <[u8; 8]>::try_from(bytes)
        .map(u64::from_be_bytes)
        .map_err(|_| corrupt("a number is not 8 bytes"))
}

/// A key whose last 8 bytes are a number after `tag \0 {text} \0`.
fn text_then_number(key: &[u8]) -> Result<(&str, u64), StoreError> {
    let body = key.get(2..).ok_or_else(|| corrupt("a short key"))?;
    if body.len() < 9 {
        return Err(corrupt("a short key"));
    }
    let (head, seq) = body.split_at(body.len() - 8);
    Ok((text(&head[..head.len() - 1])?, number(seq)?))
}

/// Migrates the first layout, when the data directory holds it.
///
/// # Errors
///
/// On a storage failure or an old row that does not decode.
pub fn from_v1(backend: &SledBackend) -> Result<(), StoreError> {
    let names: HashSet<Vec<u8>> = backend
        .db
        .tree_names()
        .into_iter()
        .map(|n| n.to_vec())
        .collect();
    if !names.contains(b"by_message_id".as_slice()) {
        return Ok(());
    }
    tracing::info!("migrating the data directory to the new storage layout");
    let tree = |name: &str| backend.db.open_tree(name).map_err(storage);
    let mut out = Writer {
        backend,
        txn: Txn::scratch(&NOTHING),
        rows: 0,
    };

    let meta = tree("meta")?;
    let mut checkpoint = 0;
    for entry in meta.iter() {
        let (key, value) = entry.map_err(storage)?;
        let name = String::from_utf8_lossy(&key).into_owned();
        let txn = out.txn()?;
        if name == "checkpoint" {
            checkpoint = number(&value)?;
            txn.put(TableId::Meta, key.to_vec(), value.to_vec());
        } else if name.starts_with("counters:") {
            txn.put(TableId::Meta, key.to_vec(), value.to_vec());
        } else if let Some(credential) = name.strip_prefix("credential:") {
            txn.put_credential(credential, &String::from_utf8_lossy(&value));
        } else if let Some(source) = name.strip_prefix("rules:") {
            txn.put(TableId::Rules, keys::str(source), value.to_vec());
        } else if let Some(cursor) = name.strip_prefix("postgres_cursor:") {
            txn.put_cursor(
                &format!("postgres:{cursor}"),
                &String::from_utf8_lossy(&value),
            );
        } else {
            tracing::warn!(key = %name, "an old metadata row is not migrated");
        }
    }

    // The processed part of the old log is the event store; the rest stays on the log.
    let old_log = tree("log")?;
    let mut pending = sled::Batch::default();
    for entry in old_log.iter() {
        let (key, value) = entry.map_err(storage)?;
        let seq = number(&key)?;
        if seq > checkpoint {
            pending.insert(key, value);
            continue;
        }
        let logged = log_entry(seq, &value)?;
        let Ok(mut event) = StoredEvent::from_log(seq, &logged.source, &logged.message) else {
            tracing::warn!(seq, "an undecodable stored event is not migrated");
            continue;
        };
        event.profile_id = event
            .message
            .common()
            .context
            .as_ref()
            .and_then(|c| c.get("kith"))
            .and_then(|k| k.get("profile_id"))
            .and_then(serde_json::Value::as_str)
            .map(str::to_owned);
        out.txn()?.store_event(&event)?;
    }
    backend.log.apply_batch(pending).map_err(storage)?;

    for entry in tree("by_message_id")?.iter() {
        let (key, value) = entry.map_err(storage)?;
        let (len, rest) = key
            .split_first_chunk::<4>()
            .ok_or_else(|| corrupt("a short claim key"))?;
        let len = u32::from_be_bytes(*len) as usize;
        let message_id = text(
            rest.get(..len)
                .ok_or_else(|| corrupt("a short claim key"))?,
        )?;
        let source = text(&rest[len..])?;
        out.txn()?.put(
            TableId::Claims,
            keys::Key::new().str(message_id).str(source).done(),
            value.to_vec(),
        );
    }
    for (name, table) in [("failed", TableId::Failed), ("imports", TableId::Imports)] {
        for entry in tree(name)?.iter() {
            let (key, value) = entry.map_err(storage)?;
            let key = match table {
                TableId::Failed => keys::u64(number(&key)?),
                _ => keys::str(text(&key)?),
            };
            out.txn()?.put(table, key, value.to_vec());
        }
    }
    for entry in tree("segments")?.iter() {
        let (key, value) = entry.map_err(storage)?;
        out.txn()?
            .put(TableId::Segments, keys::str(text(&key)?), value.to_vec());
    }
    identity(&tree("identity")?, &mut out)?;
    membership(&tree("membership")?, &mut out)?;
    activation(&tree("activation")?, &mut out)?;
    out.flush()?;
    backend.flush()?;
    for name in OLD_TREES {
        backend.db.drop_tree(name).map_err(storage)?;
    }
    backend.flush()?;
    tracing::info!("migration done");
    Ok(())
}

fn identity(old: &sled::Tree, out: &mut Writer<'_>) -> Result<(), StoreError> {
    for entry in old.iter() {
        let (key, value) = entry.map_err(storage)?;
        let txn = out.txn()?;
        let value = value.to_vec();
        match key.first() {
            Some(b'n') if key.len() == 1 => txn.set_number("identity", number(&value)?),
            Some(b'o') => txn.put(TableId::Owners, keys::str(text(&key[2..])?), value),
            Some(b'p') => txn.put(TableId::Profiles, keys::str(text(&key[2..])?), value),
            Some(b's') => txn.put(TableId::Suppressed, keys::str(text(&key[2..])?), value),
            Some(b'd') => txn.mark_changed(text(&key[2..])?),
            Some(b'm') => txn.put(TableId::Merges, keys::u64(number(&key[2..])?), value),
            Some(b'e') => {
                let (profile, seq) = text_then_number(&key)?;
                txn.put(
                    TableId::ProfileEvents,
                    keys::Key::new().str(profile).u64(seq).done(),
                    value,
                );
            }
            Some(b'x') => {
                let (profile, merge) = text_then_number(&key)?;
                txn.put(
                    TableId::ProfileMerges,
                    keys::Key::new().str(profile).u64(merge).done(),
                    value,
                );
            }
            Some(b'g') => {
                let parts = parts(&key);
                let [a, b] = parts.as_slice() else {
                    return Err(corrupt("a suggestion key"));
                };
                txn.put(
                    TableId::Suggestions,
                    keys::Key::new().str(text(a)?).str(text(b)?).done(),
                    value,
                );
            }
            _ => tracing::warn!("an old identity row is not migrated"),
        }
    }
    Ok(())
}

fn membership(old: &sled::Tree, out: &mut Writer<'_>) -> Result<(), StoreError> {
    for entry in old.iter() {
        let (key, value) = entry.map_err(storage)?;
        let txn = out.txn()?;
        let value = value.to_vec();
        match key.first() {
            Some(b'n') if key.len() == 1 => txn.set_number("membership", number(&value)?),
            Some(b'p') => txn.put(TableId::MemberStates, keys::str(text(&key[2..])?), value),
            Some(b'c') => txn.put(TableId::Computed, keys::str(text(&key[2..])?), value),
            Some(b'h') => txn.put(TableId::Changes, keys::u64(number(&key[2..])?), value),
            Some(b'i') => {
                let parts = parts(&key);
                let [segment, profile] = parts.as_slice() else {
                    return Err(corrupt("a member key"));
                };
                txn.set_member(text(segment)?, text(profile)?, true);
            }
            Some(b't') => {
                let body = key.get(2..).ok_or_else(|| corrupt("a timer key"))?;
                let due = number(body.get(..8).ok_or_else(|| corrupt("a timer key"))?)?;
                txn.set_timer(due, text(body.get(9..).unwrap_or_default())?, true);
            }
            _ => tracing::warn!("an old membership row is not migrated"),
        }
    }
    Ok(())
}

fn activation(old: &sled::Tree, out: &mut Writer<'_>) -> Result<(), StoreError> {
    for entry in old.iter() {
        let (key, value) = entry.map_err(storage)?;
        let txn = out.txn()?;
        let value = value.to_vec();
        match key.first() {
            Some(b'k') if key.len() == 1 => {
                txn.set_number(crate::backend::activation::CURSOR, number(&value)?);
            }
            Some(b'n') if key.len() == 1 => {
                txn.set_number(crate::backend::activation::DELIVERY_NUMBER, number(&value)?);
            }
            Some(b'd') => txn.put(TableId::Destinations, keys::str(text(&key[2..])?), value),
            Some(b'c') => txn.put(TableId::Campaigns, keys::str(text(&key[2..])?), value),
            Some(b'o') => txn.put(TableId::Deliveries, keys::u64(number(&key[2..])?), value),
            Some(b'q') => {
                let body = key.get(2..).ok_or_else(|| corrupt("a queue key"))?;
                let due = number(body.get(..8).ok_or_else(|| corrupt("a queue key"))?)?;
                let id = number(body.get(9..).ok_or_else(|| corrupt("a queue key"))?)?;
                txn.set_due(due, id, true);
            }
            Some(b'f') => {
                let parts = parts(&key);
                let [campaign, profile] = parts.as_slice() else {
                    return Err(corrupt("a cap key"));
                };
                txn.put(
                    TableId::Caps,
                    keys::Key::new()
                        .str(text(campaign)?)
                        .str(text(profile)?)
                        .done(),
                    value,
                );
            }
            Some(b't') => {
                let body = key.get(2..).ok_or_else(|| corrupt("a token key"))?;
                let mut split = body.splitn(3, |b| *b == 0);
                let (Some(profile), Some(provider), Some(token)) =
                    (split.next(), split.next(), split.next())
                else {
                    return Err(corrupt("a token key"));
                };
                txn.set_token(
                    text(profile)?,
                    text(provider)?,
                    text(token)?,
                    Some(number(&value).unwrap_or(0)),
                );
            }
            Some(b'e') => {
                let (campaign, seq) = text_then_number(&key)?;
                txn.set_fired(campaign, seq, true);
            }
            _ => tracing::warn!("an old activation row is not migrated"),
        }
    }
    Ok(())
}

//! The event store: events the pipeline kept, their lookup indexes, the deduplication
//! claims, and the failed events.
//!
//! Rows: `Events` seq → the event (`source \n profile_id \n message JSON`); `ByUser` and
//! `ByAnonymous` `(id, seq)` → nothing; `Claims` `(messageId, source)` → the receive time
//! of the event holding the id for deduplication and the `seq`s of every event stored
//! with it (the holder first), so one point read both deduplicates and finds events by
//! `messageId`; `Failed` seq → a [`FailedEvent`].

use jiff::Timestamp;
use kith_sdk_core::protocol::Message;
use serde::{Deserialize, Serialize};

use super::{Rows, TableId, Tables, Txn, keys};
use crate::error::StoreError;

/// An event as stored: its position in the log, its source, the profile identity
/// resolution attributed it to, and the message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredEvent {
    /// Position in the log; increases with arrival order.
    pub seq: u64,
    /// The source (write key) that sent it.
    pub source: String,
    /// The profile it belongs to, once identity resolution ran.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub profile_id: Option<String>,
    /// The message, as enriched at ingest and changed by the pipeline.
    pub message: Message,
}

impl StoredEvent {
    /// An event as the log holds it, before any stage ran.
    ///
    /// # Errors
    ///
    /// When the message is not valid JSON for a Segment message.
    pub fn from_log(seq: u64, source: &str, message: &[u8]) -> Result<Self, StoreError> {
        Ok(StoredEvent {
            seq,
            source: source.to_owned(),
            profile_id: None,
            message: serde_json::from_slice(message)?,
        })
    }

    /// The row's value.
    ///
    /// # Errors
    ///
    /// When the message cannot be serialized.
    pub fn encode(&self) -> Result<Vec<u8>, StoreError> {
        let message = serde_json::to_vec(&self.message)?;
        let profile = self.profile_id.as_deref().unwrap_or_default();
        let mut value = Vec::with_capacity(self.source.len() + profile.len() + 2 + message.len());
        value.extend_from_slice(self.source.as_bytes());
        value.push(b'\n');
        value.extend_from_slice(profile.as_bytes());
        value.push(b'\n');
        value.extend_from_slice(&message);
        Ok(value)
    }

    /// An event from its row.
    ///
    /// # Errors
    ///
    /// When the row is not `source \n profile \n message JSON`.
    pub fn decode(seq: u64, value: &[u8]) -> Result<Self, StoreError> {
        let corrupt = || StoreError::Corrupt(format!("stored event {seq} is malformed"));
        let mut parts = value.splitn(3, |b| *b == b'\n');
        let (Some(source), Some(profile), Some(message)) =
            (parts.next(), parts.next(), parts.next())
        else {
            return Err(corrupt());
        };
        let text = |bytes: &[u8]| {
            std::str::from_utf8(bytes)
                .map(str::to_owned)
                .map_err(|_| corrupt())
        };
        let profile = text(profile)?;
        Ok(StoredEvent {
            seq,
            source: text(source)?,
            profile_id: (!profile.is_empty()).then_some(profile),
            message: serde_json::from_slice(message)?,
        })
    }
}

/// An event a pipeline stage failed, kept as it came in so that it can be replayed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FailedEvent {
    /// Its position in the log when it failed.
    pub seq: u64,
    /// The source that sent it.
    pub source: String,
    /// The failure code (`cleaning`, `transformation`, `tracking_plan`, `invalid`,
    /// `stage_failed`, `stage_panicked`).
    pub code: String,
    /// What was wrong, for the developer.
    pub reason: String,
    /// When it failed.
    pub failed_at: Timestamp,
    /// The message as it was accepted, before any stage ran.
    pub message: serde_json::Value,
}

impl FailedEvent {
    /// A failed event from its log record.
    ///
    /// # Errors
    ///
    /// When the message is not JSON.
    pub fn new(
        seq: u64,
        source: &str,
        message: &[u8],
        code: &str,
        reason: String,
    ) -> Result<Self, StoreError> {
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

/// Who holds a `(source, messageId)` for deduplication.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claim {
    /// When the holder was received, in Unix milliseconds (`i64::MIN` once released).
    pub held_at_ms: i64,
    /// The `seq`s of the events stored with the id, the holder first.
    pub holders: Vec<u64>,
}

impl Claim {
    fn encode(&self) -> Vec<u8> {
        let mut value = self.held_at_ms.to_be_bytes().to_vec();
        for seq in &self.holders {
            value.extend_from_slice(&seq.to_be_bytes());
        }
        value
    }

    fn decode(value: &[u8]) -> Result<Self, StoreError> {
        let corrupt = || StoreError::Corrupt("a message id claim is malformed".to_owned());
        let (held_at, seqs) = value.split_first_chunk::<8>().ok_or_else(corrupt)?;
        if seqs.is_empty() || seqs.len() % 8 != 0 {
            return Err(corrupt());
        }
        Ok(Claim {
            held_at_ms: i64::from_be_bytes(*held_at),
            holders: seqs
                .chunks_exact(8)
                .map(|b| b.try_into().map(u64::from_be_bytes).map_err(|_| corrupt()))
                .collect::<Result<_, _>>()?,
        })
    }
}

fn claim_key(source: &str, message_id: &str) -> Vec<u8> {
    keys::Key::new().str(message_id).str(source).done()
}

fn index_key(id: &str, seq: u64) -> Vec<u8> {
    keys::Key::new().str(id).u64(seq).done()
}

/// Reading the event store.
pub trait EventStore: Tables {
    /// A stored event.
    ///
    /// # Errors
    ///
    /// On a storage failure or an undecodable event.
    fn event(&self, seq: u64) -> Result<Option<StoredEvent>, StoreError> {
        self.get(TableId::Events, &keys::u64(seq))?
            .map(|v| StoredEvent::decode(seq, &v))
            .transpose()
    }

    /// The stored events with these `seq`s (those that exist), in the order given.
    ///
    /// # Errors
    ///
    /// On a storage failure or an undecodable event.
    fn events_by_seq(&self, seqs: &[u64]) -> Result<Vec<StoredEvent>, StoreError> {
        let mut events = Vec::with_capacity(seqs.len());
        for seq in seqs {
            if let Some(event) = self.event(*seq)? {
                events.push(event);
            }
        }
        Ok(events)
    }

    /// Stored events matching `filter`, newest first, with `seq` below `before` when
    /// given, at most `limit`.
    ///
    /// # Errors
    ///
    /// On a storage failure or an undecodable event.
    fn query(
        &self,
        filter: &EventFilter,
        before: Option<u64>,
        limit: usize,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        let before = before.unwrap_or(u64::MAX);
        let seqs: Vec<u64> = match filter {
            EventFilter::All => {
                return self
                    .scan_prefix_rev(TableId::Events, &[], Some(&keys::u64(before)), limit)?
                    .into_iter()
                    .map(|(k, v)| StoredEvent::decode(keys::read_u64(&k)?, &v))
                    .collect();
            }
            EventFilter::UserId(id) => index_scan(self, TableId::ByUser, id, before, limit)?,
            EventFilter::AnonymousId(id) => {
                index_scan(self, TableId::ByAnonymous, id, before, limit)?
            }
            EventFilter::MessageId(id) => {
                let mut seqs = Vec::new();
                for (_, claim) in self.all(TableId::Claims, &keys::str(id))? {
                    seqs.extend(
                        Claim::decode(&claim)?
                            .holders
                            .into_iter()
                            .filter(|s| *s < before),
                    );
                }
                seqs.sort_unstable_by(|a, b| b.cmp(a));
                seqs.truncate(limit);
                seqs
            }
        };
        self.events_by_seq(&seqs)
    }

    /// Who holds `(source, messageId)`.
    ///
    /// # Errors
    ///
    /// On a storage failure or a malformed claim.
    fn claim(&self, source: &str, message_id: &str) -> Result<Option<Claim>, StoreError> {
        self.get(TableId::Claims, &claim_key(source, message_id))?
            .map(|v| Claim::decode(&v))
            .transpose()
    }

    /// Whether an event of `source` holding `message_id` was received within `window_ms`
    /// before `now` (what [`Txn::claim_message_id`] would call a duplicate).
    ///
    /// # Errors
    ///
    /// On a storage failure.
    fn is_claimed(
        &self,
        source: &str,
        message_id: &str,
        now: Timestamp,
        window_ms: i64,
    ) -> Result<bool, StoreError> {
        Ok(self
            .claim(source, message_id)?
            .is_some_and(|claim| now.as_millisecond().saturating_sub(claim.held_at_ms) < window_ms))
    }

    /// Failed events, newest first, from `source` if given, with a `seq` below `before`.
    /// One that cannot be read is left out (and logged): it can still be deleted.
    ///
    /// # Errors
    ///
    /// On a storage failure.
    fn failed_events(
        &self,
        source: Option<&str>,
        before: Option<u64>,
        limit: usize,
    ) -> Result<Vec<FailedEvent>, StoreError> {
        let mut events = Vec::new();
        let mut before = before.unwrap_or(u64::MAX);
        loop {
            let page = self.scan_prefix_rev(TableId::Failed, &[], Some(&keys::u64(before)), 500)?;
            let Some((last, _)) = page.last() else {
                return Ok(events);
            };
            before = keys::read_u64(last)?;
            let full = page.len() == 500;
            for (key, value) in page {
                let event: FailedEvent = match serde_json::from_slice(&value) {
                    Ok(event) => event,
                    Err(error) => {
                        tracing::warn!(seq = keys::read_u64(&key).unwrap_or(0), %error, "a failed event cannot be read");
                        continue;
                    }
                };
                if source.is_none_or(|s| s == event.source) {
                    events.push(event);
                    if events.len() == limit {
                        return Ok(events);
                    }
                }
            }
            if !full {
                return Ok(events);
            }
        }
    }

    /// The failed events with these `seq`s (those that exist).
    ///
    /// # Errors
    ///
    /// On a storage failure or an undecodable record.
    fn failed_by_seq(&self, seqs: &[u64]) -> Result<Vec<FailedEvent>, StoreError> {
        let mut events = Vec::new();
        for seq in seqs {
            if let Some(event) = self.get_json(TableId::Failed, &keys::u64(*seq))? {
                events.push(event);
            }
        }
        Ok(events)
    }

    /// Failed events, oldest first, after `after`, at most `limit`; one that cannot be
    /// read is answered as an error with its `seq`, so that it can still be removed.
    ///
    /// # Errors
    ///
    /// On a storage failure.
    #[allow(clippy::type_complexity)]
    fn failed_oldest(
        &self,
        after: Option<u64>,
        limit: usize,
    ) -> Result<Vec<(u64, Result<FailedEvent, String>)>, StoreError> {
        let from = after.map(keys::u64);
        self.scan_prefix(
            TableId::Failed,
            &[],
            from.as_deref().map(|k| (k, true)),
            limit,
        )?
        .into_iter()
        .map(|(k, v)| {
            Ok((
                keys::read_u64(&k)?,
                serde_json::from_slice(&v).map_err(|e| e.to_string()),
            ))
        })
        .collect()
    }
}

impl<T: Tables + ?Sized> EventStore for T {}

fn index_scan<T: Tables + ?Sized>(
    tables: &T,
    table: TableId,
    id: &str,
    before: u64,
    limit: usize,
) -> Result<Vec<u64>, StoreError> {
    let prefix = keys::str(id);
    tables
        .scan_prefix_rev(table, &prefix, Some(&index_key(id, before)), limit)?
        .into_iter()
        .map(|(k, _)| keys::read_u64(&k[prefix.len()..]))
        .collect()
}

impl Txn<'_> {
    /// Stores an event the pipeline kept, with its lookup indexes.
    ///
    /// # Errors
    ///
    /// When the event cannot be encoded.
    pub fn store_event(&mut self, event: &StoredEvent) -> Result<(), StoreError> {
        let common = event.message.common();
        if let Some(user_id) = &common.user_id {
            self.put(TableId::ByUser, index_key(user_id, event.seq), Vec::new());
        }
        if let Some(anonymous_id) = &common.anonymous_id {
            self.put(
                TableId::ByAnonymous,
                index_key(anonymous_id, event.seq),
                Vec::new(),
            );
        }
        self.put(TableId::Events, keys::u64(event.seq), event.encode()?);
        Ok(())
    }

    /// Erases stored events (an erased person's) with their indexes and their claims.
    ///
    /// # Errors
    ///
    /// On a storage failure.
    pub fn erase_events(&mut self, seqs: &[u64]) -> Result<(), StoreError> {
        for seq in seqs {
            let Some(event) = self.event(*seq)? else {
                continue;
            };
            let common = event.message.common();
            if let Some(user_id) = &common.user_id {
                self.delete(TableId::ByUser, index_key(user_id, *seq));
            }
            if let Some(anonymous_id) = &common.anonymous_id {
                self.delete(TableId::ByAnonymous, index_key(anonymous_id, *seq));
            }
            if let Some(message_id) = &common.message_id {
                self.delete(TableId::Claims, claim_key(&event.source, message_id));
            }
            self.delete(TableId::Events, keys::u64(*seq));
        }
        Ok(())
    }

    /// Claims `(source, messageId)` for the event at `seq`. Answers `true` when another
    /// event holds it since less than `window_ms` before `received`: a duplicate, which
    /// claims nothing. Claiming again for the same `seq` is no duplicate, so a chunk
    /// replayed after a crash is not taken for its own duplicate. Outside the window the
    /// event takes the id over; earlier holders stay findable.
    ///
    /// # Errors
    ///
    /// On a storage failure.
    pub fn claim_message_id(
        &mut self,
        source: &str,
        message_id: &str,
        seq: u64,
        received: Timestamp,
        window_ms: i64,
    ) -> Result<bool, StoreError> {
        let received_ms = received.as_millisecond();
        let mut claim = Claim {
            held_at_ms: received_ms,
            holders: vec![seq],
        };
        if let Some(held) = self.claim(source, message_id)? {
            if held.holders.contains(&seq) {
                return Ok(false);
            }
            if received_ms.saturating_sub(held.held_at_ms) < window_ms {
                return Ok(true);
            }
            claim.holders.extend(held.holders);
        }
        self.put(
            TableId::Claims,
            claim_key(source, message_id),
            claim.encode(),
        );
        Ok(false)
    }

    /// Keeps a failed event.
    ///
    /// # Errors
    ///
    /// When it cannot be encoded.
    pub fn put_failed(&mut self, event: &FailedEvent) -> Result<(), StoreError> {
        self.put_json(TableId::Failed, keys::u64(event.seq), event)
    }

    /// Forgets failed events (replayed, deleted, past their retention).
    pub fn remove_failed(&mut self, seqs: &[u64]) {
        for seq in seqs {
            self.delete(TableId::Failed, keys::u64(*seq));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_and_claims_encode_and_decode() {
        let event = StoredEvent {
            seq: 7,
            source: "src_1".to_owned(),
            profile_id: Some("prf_2".to_owned()),
            message: serde_json::from_value(
                serde_json::json!({"type": "track", "event": "E\nF", "userId": "u"}),
            )
            .expect("message"),
        };
        let encoded = event.encode().expect("encode");
        assert_eq!(StoredEvent::decode(7, &encoded).expect("decode"), event);
        let anonymous = StoredEvent {
            profile_id: None,
            ..event
        };
        let encoded = anonymous.encode().expect("encode");
        assert_eq!(StoredEvent::decode(7, &encoded).expect("decode"), anonymous);
        assert!(StoredEvent::decode(7, b"no newline").is_err());
        let claim = Claim {
            held_at_ms: -5,
            holders: vec![3, 1],
        };
        assert_eq!(Claim::decode(&claim.encode()).expect("decode"), claim);
        assert!(Claim::decode(&[1, 2]).is_err());
    }
}

//! The durable event queue: what is queued, what happened to every captured event, and
//! the [`EventStore`] trait that persists it.
//!
//! Every change is an [`Op`]. [`QueueState::apply`] holds the one piece of logic that
//! turns ops into state (queued events, counters, metadata), so every store behaves the
//! same: [`MemoryStore`] only applies ops, and the file store
//! ([`crate::file_store::FileStore`]) also appends them to its log and replays them on
//! open. The counters are derived from the ops, so `captured = delivered + dropped +
//! pending` holds in every state a store can be in, a crash included.

use std::collections::{BTreeMap, VecDeque};

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::Value;
use serde_json::value::RawValue;

use crate::json;

/// An event waiting in the queue.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueuedEvent {
    /// Position in the queue; increases with capture order.
    pub id: u64,
    /// Capture time, milliseconds since the Unix epoch (for the age budget).
    pub captured_at_ms: i64,
    /// The consent purpose the event needs, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub purpose: Option<String>,
    /// The message JSON, serialized once at capture, and written to a store's log as
    /// raw JSON (not re-escaped as a string).
    #[serde(serialize_with = "raw_json", deserialize_with = "raw_json_text")]
    pub json: String,
}

impl QueuedEvent {
    /// The message JSON.
    pub fn json(&self) -> &str {
        &self.json
    }

    /// Its serde form, written by hand for the stores: the message JSON, written at
    /// capture, goes in as it is, where serde would read it again to check it.
    pub fn to_json(&self) -> String {
        let mut text = format!(
            "{{\"id\":{},\"captured_at_ms\":{}",
            self.id, self.captured_at_ms
        );
        if let Some(purpose) = &self.purpose {
            text.push_str(",\"purpose\":");
            text.push_str(&json::to_text(&Value::from(purpose.as_str())));
        }
        text.push_str(",\"json\":");
        text.push_str(&self.json);
        text.push('}');
        text
    }
}

/// Writes JSON text as JSON (checked, as serde_json only writes valid raw JSON). The
/// stores write [`QueuedEvent::to_json`] instead.
fn raw_json<S: Serializer>(text: &str, serializer: S) -> Result<S::Ok, S::Error> {
    RawValue::from_string(text.to_owned())
        .map_err(serde::ser::Error::custom)?
        .serialize(serializer)
}

/// Reads a JSON value as its text.
fn raw_json_text<'de, D: Deserializer<'de>>(deserializer: D) -> Result<String, D::Error> {
    Ok(Box::<RawValue>::deserialize(deserializer)?.get().to_owned())
}

/// What became of events leaving the queue.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Outcome {
    /// The collector accepted them.
    Delivered,
    /// They were given up, for this reason.
    Dropped {
        /// A stable reason, such as `expired` or `evicted`.
        reason: String,
    },
}

/// One change to a store. Stores persist ops; [`QueueState::apply`] interprets them.
///
/// Externally tagged (`{"append": {...}}`): an internally tagged enum would buffer its
/// content, and raw JSON cannot be read back from a buffer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Op {
    /// An event was captured and queued.
    Append {
        /// The event.
        event: QueuedEvent,
    },
    /// Events left the queue.
    Remove {
        /// Their ids; ids no longer queued are ignored, so a replay is harmless.
        ids: Vec<u64>,
        /// Delivered or dropped.
        outcome: Outcome,
    },
    /// An event was captured and dropped at once (by a plugin), never queued.
    DropAtCapture {
        /// Why.
        reason: String,
    },
    /// A metadata value (identity, retry state, consent) was set; `null` removes it.
    Meta {
        /// The key.
        key: String,
        /// The new value.
        value: Value,
    },
    /// The counters and next id, written first when a store compacts its log.
    Snapshot {
        /// Counters at the time.
        counters: Counters,
        /// The next event id.
        next_id: u64,
    },
}

/// Event accounting, as persisted.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    /// Events captured (queued, or dropped at capture).
    pub captured: u64,
    /// Events the collector accepted.
    pub delivered: u64,
    /// Events given up, by reason.
    pub dropped: Tally,
}

/// Counts by reason, in reason order; JSON as an object (`{"expired": 2}`).
///
/// A short sorted list rather than a map: there are few reasons, and in the browser each
/// map type costs download size.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tally(Vec<(String, u64)>);

impl Tally {
    /// Adds `n` to `reason`'s count.
    pub fn add(&mut self, reason: &str, n: u64) {
        match self.0.binary_search_by(|(r, _)| r.as_str().cmp(reason)) {
            Ok(at) => self.0[at].1 += n,
            Err(at) => self.0.insert(at, (reason.to_owned(), n)),
        }
    }

    /// `reason`'s count (0 when never counted).
    pub fn get(&self, reason: &str) -> u64 {
        self.iter()
            .find(|(r, _)| *r == reason)
            .map_or(0, |(_, n)| n)
    }

    /// The sum of every count.
    pub fn total(&self) -> u64 {
        self.0.iter().map(|(_, n)| n).sum()
    }

    /// Whether nothing was counted.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Each reason with its count, in reason order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, u64)> {
        self.0.iter().map(|(r, n)| (r.as_str(), *n))
    }
}

impl Serialize for Tally {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_map(self.iter())
    }
}

impl<'de> Deserialize<'de> for Tally {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        // A map's keys come sorted and unique, as `add` keeps them.
        let map = BTreeMap::<String, u64>::deserialize(deserializer)?;
        Ok(Tally(map.into_iter().collect()))
    }
}

/// The queue's state: what every store holds, whatever it persists to.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct QueueState {
    /// In id order. A deque rather than a map: events leave mostly from the front, and
    /// the browser download carries one map type fewer.
    events: VecDeque<QueuedEvent>,
    bytes: usize,
    meta: BTreeMap<String, Value>,
    counters: Counters,
    next_id: u64,
}

impl QueueState {
    /// Applies one op. Idempotent for removals, so replaying a log is safe.
    pub fn apply(&mut self, op: Op) {
        match op {
            Op::Append { event } => {
                self.counters.captured += 1;
                self.next_id = self.next_id.max(event.id + 1);
                self.bytes += event.json().len();
                match self.position(event.id) {
                    Ok(at) => {
                        let replaced = std::mem::replace(&mut self.events[at], event);
                        self.bytes -= replaced.json().len();
                    }
                    Err(at) => self.events.insert(at, event),
                }
            }
            Op::Remove { ids, outcome } => {
                let removed = self.remove(&ids);
                match &outcome {
                    Outcome::Delivered => self.counters.delivered += removed,
                    Outcome::Dropped { reason } => {
                        if removed > 0 {
                            self.counters.dropped.add(reason, removed);
                        }
                    }
                }
            }
            Op::DropAtCapture { reason } => {
                self.counters.captured += 1;
                self.counters.dropped.add(&reason, 1);
            }
            Op::Meta { key, value } => {
                if value.is_null() {
                    self.meta.remove(&key);
                } else {
                    self.meta.insert(key, value);
                }
            }
            Op::Snapshot { counters, next_id } => {
                self.counters = counters;
                self.next_id = self.next_id.max(next_id);
            }
        }
    }

    /// Removes the events with these ids (ids not queued are ignored); answers how many.
    fn remove(&mut self, ids: &[u64]) -> u64 {
        let before = self.events.len();
        // A batch leaves from the front, one event at a time at little cost. Many ids
        // (a consent purge, expiry) are marked first and swept in one pass, so removing
        // k events scattered through n costs O(k log n + n), not O(k n).
        if ids.len() <= 64 {
            for &id in ids {
                if let Some(event) = self.position(id).ok().and_then(|at| self.events.remove(at)) {
                    self.bytes -= event.json().len();
                }
            }
        } else {
            let mut doomed = vec![false; self.events.len()];
            for &id in ids {
                if let Ok(at) = self.position(id) {
                    doomed[at] = true;
                }
            }
            let (mut at, bytes) = (0, &mut self.bytes);
            self.events.retain(|event| {
                let keep = !doomed[at];
                at += 1;
                if !keep {
                    *bytes -= event.json().len();
                }
                keep
            });
        }
        (before - self.events.len()) as u64
    }

    /// Where the event with this id is, or would go.
    fn position(&self, id: u64) -> Result<usize, usize> {
        // Appends come in id order: check the back before searching.
        match self.events.back() {
            Some(last) if last.id < id => Err(self.events.len()),
            None => Err(0),
            Some(_) => self.events.binary_search_by_key(&id, |e| e.id),
        }
    }

    /// Queued events, oldest first.
    pub fn events(&self) -> impl DoubleEndedIterator<Item = &QueuedEvent> {
        self.events.iter()
    }

    /// The queued event with this id.
    pub fn get(&self, id: u64) -> Option<&QueuedEvent> {
        self.events.get(self.position(id).ok()?)
    }

    /// How many events are queued.
    pub fn len(&self) -> usize {
        self.events.len()
    }

    /// Whether nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.events.is_empty()
    }

    /// Bytes of queued message JSON.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// A metadata value.
    pub fn meta(&self, key: &str) -> Option<&Value> {
        self.meta.get(key)
    }

    /// Every metadata value.
    pub fn all_meta(&self) -> &BTreeMap<String, Value> {
        &self.meta
    }

    /// The counters.
    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    /// The id the next captured event gets.
    pub fn next_id(&self) -> u64 {
        self.next_id
    }
}

/// A failure to persist an op. The op has not been applied.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The file system failed (disk full, permissions, I/O error).
    #[cfg(not(target_arch = "wasm32"))]
    #[error("queue storage: {0}")]
    Io(#[from] std::io::Error),
    /// The platform's storage refused (the browser's `localStorage` full or disabled).
    #[error("queue storage: {0}")]
    Refused(String),
    /// An op could not be encoded for the file store's log.
    #[cfg(not(target_arch = "wasm32"))]
    #[error("queue encoding: {0}")]
    Encoding(#[from] serde_json::Error),
}

/// Persists the queue. An op is durable against a process crash once
/// [`EventStore::apply`] returns.
pub trait EventStore: Send {
    /// Persists `op`, then applies it to the state.
    ///
    /// # Errors
    ///
    /// When it cannot be persisted; the state is then unchanged.
    fn apply(&mut self, op: Op) -> Result<(), StoreError>;

    /// The current state.
    fn state(&self) -> &QueueState;

    /// Records found torn or corrupt (and skipped) when the store was opened.
    fn corrupt_records(&self) -> u64 {
        0
    }
}

/// A store that keeps the queue in memory only: for tests, and for platforms that
/// persist elsewhere.
#[derive(Debug, Default)]
pub struct MemoryStore {
    state: QueueState,
}

impl MemoryStore {
    /// An empty queue.
    pub fn new() -> Self {
        Self::default()
    }
}

impl EventStore for MemoryStore {
    fn apply(&mut self, op: Op) -> Result<(), StoreError> {
        self.state.apply(op);
        Ok(())
    }

    fn state(&self) -> &QueueState {
        &self.state
    }
}

/// The test suite every [`EventStore`] runs: `open` gives a fresh store, `reopen` the
/// same store as a new process would find it (for a memory store, the same one).
#[cfg(test)]
pub(crate) mod suite {
    use super::*;
    use serde_json::json;

    pub(crate) fn event(id: u64, json: &str) -> QueuedEvent {
        QueuedEvent {
            id,
            captured_at_ms: 1_000 + i64::try_from(id).expect("small id"),
            purpose: id.is_multiple_of(3).then(|| "marketing".to_owned()),
            json: json.to_owned(),
        }
    }

    fn identity_holds(state: &QueueState) {
        let c = state.counters();
        let dropped = c.dropped.total();
        assert_eq!(
            c.captured,
            c.delivered + dropped + state.len() as u64,
            "{c:?}"
        );
    }

    pub(crate) fn run(
        open: &mut dyn FnMut() -> Box<dyn EventStore>,
        reopen: &mut dyn FnMut(Box<dyn EventStore>) -> Box<dyn EventStore>,
    ) {
        let mut store = open();
        assert!(store.state().is_empty());
        for id in 0..5 {
            store
                .apply(Op::Append {
                    event: event(id, &format!("{{\"n\":{id}}}")),
                })
                .expect("append");
        }
        store
            .apply(Op::Remove {
                ids: vec![0, 1],
                outcome: Outcome::Delivered,
            })
            .expect("remove");
        store
            .apply(Op::Remove {
                ids: vec![1, 2],
                outcome: Outcome::Dropped {
                    reason: "expired".into(),
                },
            })
            .expect("remove");
        store
            .apply(Op::DropAtCapture {
                reason: "plugin".into(),
            })
            .expect("drop");
        store
            .apply(Op::Meta {
                key: "userId".into(),
                value: json!("u1"),
            })
            .expect("meta");
        store
            .apply(Op::Meta {
                key: "gone".into(),
                value: json!(1),
            })
            .expect("meta");
        store
            .apply(Op::Meta {
                key: "gone".into(),
                value: Value::Null,
            })
            .expect("meta");
        identity_holds(store.state());

        let check = |state: &QueueState| {
            let ids: Vec<u64> = state.events().map(|e| e.id).collect();
            assert_eq!(ids, [3, 4]);
            assert_eq!(state.bytes(), 14);
            assert_eq!(state.counters().captured, 6);
            assert_eq!(state.counters().delivered, 2);
            assert_eq!(
                state.counters().dropped.get("expired"),
                1,
                "id 1 was already gone"
            );
            assert_eq!(state.counters().dropped.get("plugin"), 1);
            assert_eq!(state.meta("userId"), Some(&json!("u1")));
            assert_eq!(state.meta("gone"), None);
            assert_eq!(state.next_id(), 5);
            assert_eq!(
                state
                    .events()
                    .next()
                    .and_then(|e| e.purpose.clone())
                    .as_deref(),
                Some("marketing")
            );
            identity_holds(state);
        };
        check(store.state());
        let store = reopen(store);
        check(store.state());
        assert_eq!(store.corrupt_records(), 0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_store_passes_the_suite() {
        suite::run(&mut || Box::new(MemoryStore::new()), &mut |store| store);
    }

    #[test]
    fn many_scattered_removals_keep_order_bytes_and_counts() {
        let mut state = QueueState::default();
        for id in 0..200 {
            state.apply(Op::Append {
                event: suite::event(id, r#"{"n":1}"#),
            });
        }
        // Odd ids, newest first, with duplicates and ids never queued: the one-pass sweep.
        let mut ids: Vec<u64> = (0..200).rev().filter(|id| id % 2 == 1).collect();
        ids.extend([1, 3, 500, 501]);
        state.apply(Op::Remove {
            ids,
            outcome: Outcome::Dropped {
                reason: "consent_revoked".to_owned(),
            },
        });
        let left: Vec<u64> = state.events().map(|e| e.id).collect();
        assert_eq!(left, (0..200).step_by(2).collect::<Vec<_>>());
        assert_eq!(state.bytes(), 100 * r#"{"n":1}"#.len());
        assert_eq!(state.counters().dropped.get("consent_revoked"), 100);
        assert!(state.get(2).is_some() && state.get(3).is_none());
    }

    #[test]
    fn tally_counts_in_reason_order_and_is_a_json_object() {
        let mut tally = Tally::default();
        assert!(tally.is_empty());
        for reason in ["expired", "evicted", "expired", "consent_revoked"] {
            tally.add(reason, 1);
        }
        tally.add("evicted", 5);
        let counts: Vec<_> = tally.iter().collect();
        assert_eq!(
            counts,
            [("consent_revoked", 1), ("evicted", 6), ("expired", 2)]
        );
        assert_eq!(
            (tally.get("evicted"), tally.get("never"), tally.total()),
            (6, 0, 9)
        );
        let text = serde_json::to_string(&tally).expect("serializes");
        assert_eq!(text, r#"{"consent_revoked":1,"evicted":6,"expired":2}"#);
        let back: Tally = serde_json::from_str(&text).expect("deserializes");
        assert_eq!(back, tally);
    }

    #[test]
    fn a_queued_event_keeps_its_json_raw_in_a_log_and_refuses_bad_json() {
        let event = suite::event(4, r#"{"type":"track","event":"A"}"#);
        let text = serde_json::to_string(&event).expect("serializes");
        assert!(
            text.contains(r#""json":{"type":"track","event":"A"}"#),
            "{text}"
        );
        let back: QueuedEvent = serde_json::from_str(&text).expect("deserializes");
        assert_eq!(back, event);
        // The stores' hand-written form is serde's, with and without a purpose.
        for event in [
            suite::event(3, r#"{"a":[1,"\u00e9"]}"#),
            suite::event(4, "{}"),
        ] {
            let serde = serde_json::to_string(&event).expect("serializes");
            assert_eq!(event.to_json(), serde);
        }
        let broken = QueuedEvent {
            json: "{not json".to_owned(),
            ..event
        };
        assert!(serde_json::to_string(&broken).is_err());
    }
}

//! The pipeline runner: reads the durable log from a persisted checkpoint and runs each
//! event through an ordered list of [`Stage`]s.
//!
//! Stages are small and per event: each looks at one [`StoredEvent`], may change it, and
//! answers [`Outcome::Continue`], [`Outcome::Drop`] with a reason, or [`Outcome::Fail`]
//! (the event moves to the failed-events store, as it came in, to be replayed). The
//! stages are processing ([`crate::processing::Process`]) then [`Deduplicate`], so that
//! only events that are kept claim their `messageId`, and a replayed event is not taken
//! for a duplicate of itself; with identity resolution on, identity, segments and
//! activation follow, in that order.
//!
//! Storing is the runner's last step, not a stage, because the log is also the event
//! store: an event that passed every stage is indexed (and written back in place if a
//! stage changed it), one a stage dropped or failed is removed, and the entries up to the
//! checkpoint are the stored events. The chunk's index writes go in sorted batches. Crash safety: a chunk's effects are written first, then the checkpoint with
//! the counters in one atomic batch, then a flush. A crash anywhere replays the chunk
//! from the old checkpoint, and every effect is idempotent for the same `seq`
//! (deduplication claims and index entries are keyed to it), so a replay has no
//! duplicate effects.

use std::collections::BTreeMap;
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use tokio::sync::broadcast;

use crate::error::StoreError;
use crate::stats::{DUPLICATE, Stats};
use crate::store::{FailedEvent, Settlement, Store, StoredEvent};

/// How many log entries one pipeline pass takes.
const CHUNK_EVENTS: usize = 2_000;

/// How long the runner waits before retrying after a storage failure.
const RETRY_AFTER_FAILURE: Duration = Duration::from_secs(1);

/// The reason given for a log record that cannot be decoded.
const CORRUPT_RECORD: &str = "corrupt_record";

/// What a stage decides for an event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Pass the event to the next stage.
    Continue,
    /// Stop here; the event is counted as dropped for this reason.
    Drop(&'static str),
    /// Stop here; the event goes to the failed-events store, counted by the code, kept
    /// with the full reason, to be replayed once the rules are fixed.
    Fail(&'static str, String),
}

/// One step of the pipeline, run on each event in log order.
pub trait Stage: Send + Sync {
    /// The stage's name, for logs.
    fn name(&self) -> &'static str;

    /// Processes one event. Its effects must be idempotent for the same `event.seq`.
    ///
    /// # Errors
    ///
    /// A storage failure; the whole chunk is retried later.
    fn process(&self, event: &mut StoredEvent) -> Result<Outcome, StoreError>;

    /// Called before a chunk's first event: forget what a failed chunk left pending.
    fn begin_chunk(&self) {}

    /// Called after a chunk's last event, before the chunk is settled: make the
    /// chunk's effects durable in one go.
    ///
    /// # Errors
    ///
    /// A storage failure; the whole chunk is retried later.
    fn end_chunk(&self) -> Result<(), StoreError> {
        Ok(())
    }
}

/// Drops an event whose `(source, messageId)` was seen within the window.
#[derive(Debug)]
pub struct Deduplicate {
    store: Arc<Store>,
    window_ms: i64,
}

impl Deduplicate {
    /// A deduplication stage remembering ids for `window`.
    pub fn new(store: Arc<Store>, window: Duration) -> Self {
        Deduplicate {
            store,
            window_ms: i64::try_from(window.as_millis()).unwrap_or(i64::MAX),
        }
    }
}

impl Stage for Deduplicate {
    fn name(&self) -> &'static str {
        "deduplicate"
    }

    fn process(&self, event: &mut StoredEvent) -> Result<Outcome, StoreError> {
        let common = event.message.common();
        // Ingest always sets both; an event without them cannot be a duplicate.
        let (Some(message_id), Some(received)) = (&common.message_id, common.received_at) else {
            return Ok(Outcome::Continue);
        };
        let duplicate = self.store.claim_message_id(
            &event.source,
            message_id,
            event.seq,
            received,
            self.window_ms,
        )?;
        Ok(if duplicate {
            Outcome::Drop(DUPLICATE)
        } else {
            Outcome::Continue
        })
    }
}

/// Wakes the runner when the log grows, and tells it to stop.
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
    /// New entries are in the log.
    pub fn notify(&self) {
        self.state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pending = true;
        self.cond.notify_all();
    }

    /// The runner should stop after its current chunk.
    pub fn stop(&self) {
        self.state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .stop = true;
        self.cond.notify_all();
    }

    fn stopped(&self) -> bool {
        self.state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .stop
    }

    /// Waits for a notification (or `timeout`); `false` once stopped.
    fn wait(&self, timeout: Option<Duration>) -> bool {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
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

/// The stages and what they run on.
pub struct Pipeline {
    store: Arc<Store>,
    stats: Arc<Stats>,
    stages: Vec<Box<dyn Stage>>,
    live: broadcast::Sender<Arc<str>>,
}

impl std::fmt::Debug for Pipeline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<_> = self.stages.iter().map(|s| s.name()).collect();
        f.debug_struct("Pipeline").field("stages", &names).finish()
    }
}

impl Pipeline {
    /// A pipeline running `stages` in order; stored events are also sent, as JSON, to
    /// `live` subscribers.
    pub fn new(
        store: Arc<Store>,
        stats: Arc<Stats>,
        stages: Vec<Box<dyn Stage>>,
        live: broadcast::Sender<Arc<str>>,
    ) -> Self {
        Pipeline {
            store,
            stats,
            stages,
            live,
        }
    }

    /// Processes one chunk of the log after the checkpoint; answers how many entries.
    ///
    /// # Errors
    ///
    /// A storage failure; nothing of the chunk is committed and it is replayed later.
    pub fn run_once(&self) -> Result<usize, StoreError> {
        let checkpoint = self.store.checkpoint()?;
        let entries = self.store.read_log(checkpoint, CHUNK_EVENTS)?;
        let Some(last) = entries.last().map(|(seq, _)| *seq) else {
            return Ok(0);
        };
        let count = entries.len();
        let mut dropped: BTreeMap<String, u64> = BTreeMap::new();
        let mut failed: BTreeMap<String, u64> = BTreeMap::new();
        let mut settlement = Settlement::default();
        let mut live = Vec::new();
        let watching = self.live.receiver_count() > 0;
        for stage in &self.stages {
            stage.begin_chunk();
        }
        for (seq, value) in entries {
            let mut event = match StoredEvent::decode(seq, &value) {
                Ok(event) => event,
                Err(error) => {
                    tracing::warn!(seq, %error, "dropping an undecodable log record");
                    *dropped.entry(CORRUPT_RECORD.to_owned()).or_default() += 1;
                    settlement.remove(seq);
                    continue;
                }
            };
            match self.run_stages(&mut event)? {
                Outcome::Continue => {}
                Outcome::Drop(reason) => {
                    *dropped.entry(reason.to_owned()).or_default() += 1;
                    settlement.remove(seq);
                    continue;
                }
                Outcome::Fail(code, reason) => {
                    *failed.entry(code.to_owned()).or_default() += 1;
                    settlement.fail(FailedEvent::new(seq, &value, code, reason)?);
                    continue;
                }
            }
            settlement.keep(&event, &value)?;
            if watching {
                live.push(Arc::from(serde_json::to_string(&event)?));
            }
        }
        for stage in &self.stages {
            stage.end_chunk()?;
        }
        self.store.settle(settlement)?;
        let mut counters = self.stats.pipeline();
        counters.add(count as u64, &dropped, &failed);
        self.store.commit_checkpoint(last, &counters)?;
        self.store.flush()?;
        self.stats.set_pipeline(counters);
        for event in live {
            // No subscriber left is fine: the live tail is best effort.
            let _ = self.live.send(event);
        }
        Ok(count)
    }

    fn run_stages(&self, event: &mut StoredEvent) -> Result<Outcome, StoreError> {
        for stage in &self.stages {
            let outcome = stage.process(event)?;
            if outcome != Outcome::Continue {
                return Ok(outcome);
            }
        }
        Ok(Outcome::Continue)
    }

    /// Runs the pipeline on its own thread until `wake` says stop.
    ///
    /// # Errors
    ///
    /// When the thread cannot be spawned.
    pub fn start(self, wake: Arc<Wake>) -> std::io::Result<JoinHandle<()>> {
        std::thread::Builder::new()
            .name("kith-pipeline".to_owned())
            .spawn(move || {
                loop {
                    if wake.stopped() {
                        break;
                    }
                    match self.run_once() {
                        Ok(0) => {
                            if !wake.wait(None) {
                                break;
                            }
                        }
                        Ok(_) => {}
                        Err(error) => {
                            tracing::error!(%error, "pipeline pass failed; retrying");
                            wake.wait(Some(RETRY_AFTER_FAILURE));
                        }
                    }
                }
            })
    }
}

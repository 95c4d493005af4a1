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
//! One event never stops the pipeline: when a stage answers an error about the data (not
//! a storage failure) or panics on an event, the chunk's pending effects are forgotten
//! and the chunk runs again with that event sent straight to the failed-events store
//! (quarantined, with the stage and the reason). A stage failing at a chunk's end, on
//! no event in particular, makes the runner take the same events one at a time to
//! find the one to quarantine. Only storage failures retry a chunk as it is, with
//! backoff.
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
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use sled::IVec;
use tokio::sync::broadcast;

use crate::error::StoreError;
use crate::health::{Health, panic_message, supervise};
use crate::stats::{DUPLICATE, Stats};
use crate::store::{FailedEvent, Settlement, Store, StoredEvent};

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// How many log entries one pipeline pass takes.
const CHUNK_EVENTS: usize = 2_000;

/// How long the runner waits before retrying after a storage failure; the wait doubles
/// while failures go on, up to [`MAX_RETRY`].
const FIRST_RETRY: Duration = Duration::from_millis(100);
/// The longest wait between retries after storage failures.
const MAX_RETRY: Duration = Duration::from_secs(30);

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

/// A stage that panics on `track` events of one name: the test-only fault switch
/// (`--faults stage_panic:NAME`) that shows one event cannot stop the pipeline. It runs
/// last, after every stage has pending effects for the event.
#[derive(Debug)]
pub struct PanicOn(pub String);

impl Stage for PanicOn {
    fn name(&self) -> &'static str {
        "fault injection"
    }

    fn process(&self, event: &mut StoredEvent) -> Result<Outcome, StoreError> {
        if let kith_sdk_core::protocol::Message::Track(track) = &event.message
            && track.event.as_deref() == Some(self.0.as_str())
        {
            panic!("injected fault on {:?} events", self.0);
        }
        Ok(Outcome::Continue)
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
    health: Arc<Health>,
    stages: Vec<Box<dyn Stage>>,
    live: broadcast::Sender<Arc<str>>,
    /// Up to this `seq`, chunks are one event long: a stage failed at the end of a
    /// longer chunk, on no event in particular, and one-event chunks find which.
    narrow_until: Mutex<u64>,
    /// How long, and how many, failed events are kept.
    retention: FailedRetention,
    /// When the failed-events store was last trimmed.
    trimmed: Mutex<Option<std::time::Instant>>,
}

/// How long failed events are kept, and how many at most (the oldest go first).
#[derive(Debug, Clone, Copy)]
pub struct FailedRetention {
    /// Failed events older than this are forgotten.
    pub max_age: Duration,
    /// At most this many are kept.
    pub max_count: usize,
}

impl Default for FailedRetention {
    fn default() -> Self {
        FailedRetention {
            max_age: Duration::from_secs(30 * 24 * 3600),
            max_count: 100_000,
        }
    }
}

/// How often the failed-events store is trimmed at most.
const TRIM_EVERY: Duration = Duration::from_secs(10);

impl std::fmt::Debug for Pipeline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<_> = self.stages.iter().map(|s| s.name()).collect();
        f.debug_struct("Pipeline").field("stages", &names).finish()
    }
}

/// Why a chunk was not committed.
enum ChunkFailure {
    /// Storage failed: the chunk is retried later, as it is.
    Storage(StoreError),
    /// A stage failed or panicked on this event: it is quarantined and the chunk runs
    /// again without it.
    Event(u64, Quarantine),
    /// A stage failed or panicked at the chunk's end, on no event in particular.
    Chunk(String),
}

impl From<StoreError> for ChunkFailure {
    fn from(error: StoreError) -> Self {
        ChunkFailure::Storage(error)
    }
}

/// Why an event was quarantined: its failure code and the full reason.
type Quarantine = (&'static str, String);

/// The failure code of an event a stage answered an error for (not a storage failure).
pub const STAGE_FAILED: &str = "stage_failed";
/// The failure code of an event a stage panicked on.
pub const STAGE_PANICKED: &str = "stage_panicked";

/// Runs `work` for `stage`, turning a panic or an error about the data into a
/// quarantine reason and leaving storage failures as they are.
fn guarded<T>(
    stage: &dyn Stage,
    work: impl FnOnce() -> Result<T, StoreError>,
) -> Result<Result<T, Quarantine>, StoreError> {
    match catch_unwind(AssertUnwindSafe(work)) {
        Ok(Ok(value)) => Ok(Ok(value)),
        Ok(Err(error)) if error.is_about_data() => Ok(Err((
            STAGE_FAILED,
            format!("the {} stage failed: {error}", stage.name()),
        ))),
        Ok(Err(error)) => Err(error),
        Err(panic) => Ok(Err((
            STAGE_PANICKED,
            format!(
                "the {} stage panicked: {}",
                stage.name(),
                panic_message(panic.as_ref())
            ),
        ))),
    }
}

impl Pipeline {
    /// A pipeline running `stages` in order; stored events are also sent, as JSON, to
    /// `live` subscribers.
    pub fn new(
        store: Arc<Store>,
        stats: Arc<Stats>,
        health: Arc<Health>,
        stages: Vec<Box<dyn Stage>>,
        live: broadcast::Sender<Arc<str>>,
    ) -> Self {
        Pipeline {
            store,
            stats,
            health,
            stages,
            live,
            narrow_until: Mutex::new(0),
            retention: FailedRetention::default(),
            trimmed: Mutex::new(None),
        }
    }

    /// Keeps failed events as `retention` says.
    pub fn with_retention(mut self, retention: FailedRetention) -> Self {
        self.retention = retention;
        self
    }

    /// Trims the failed-events store, at most every [`TRIM_EVERY`].
    fn trim_failed(&self) -> Result<(), StoreError> {
        let mut trimmed = lock(&self.trimmed);
        if trimmed.is_some_and(|at| at.elapsed() < TRIM_EVERY) {
            return Ok(());
        }
        *trimmed = Some(std::time::Instant::now());
        let cutoff = jiff::Timestamp::now()
            .checked_sub(jiff::SignedDuration::try_from(self.retention.max_age).unwrap_or_default())
            .unwrap_or(jiff::Timestamp::MIN);
        let removed = self.store.trim_failed(cutoff, self.retention.max_count)?;
        if removed > 0 {
            tracing::info!(removed, "forgot failed events past their retention");
        }
        Ok(())
    }

    /// Processes one chunk of the log after the checkpoint; answers how many entries.
    /// An event a stage fails or panics on goes to the failed-events store (code
    /// [`STAGE_FAILED`] or [`STAGE_PANICKED`]) and the chunk is run again without it,
    /// so that one event never stops the pipeline.
    ///
    /// # Errors
    ///
    /// A storage failure; nothing of the chunk is committed and it is replayed later.
    pub fn run_once(&self) -> Result<usize, StoreError> {
        let checkpoint = self.store.checkpoint()?;
        let narrow = *lock(&self.narrow_until) > checkpoint;
        let size = if narrow { 1 } else { CHUNK_EVENTS };
        let entries = self.store.read_log(checkpoint, size)?;
        let mut quarantine = BTreeMap::new();
        loop {
            match self.run_chunk(&entries, &quarantine) {
                Ok(count) => {
                    for _ in &quarantine {
                        self.health.record_quarantined();
                    }
                    return Ok(count);
                }
                Err(ChunkFailure::Storage(error)) => return Err(error),
                Err(ChunkFailure::Event(seq, why)) => {
                    tracing::error!(seq, reason = %why.1, "an event is quarantined in the failed-events store");
                    quarantine.insert(seq, why);
                }
                Err(ChunkFailure::Chunk(reason)) => match entries.as_slice() {
                    [(seq, _)] if !quarantine.contains_key(seq) => {
                        tracing::error!(seq, %reason, "an event is quarantined in the failed-events store");
                        quarantine.insert(*seq, (STAGE_FAILED, reason));
                    }
                    [_] => {
                        return Err(StoreError::Corrupt(format!(
                            "a stage fails at the end of every chunk: {reason}"
                        )));
                    }
                    _ => {
                        tracing::warn!(%reason, "a chunk failed at its end; running it one event at a time");
                        let last = entries.last().map_or(checkpoint, |(seq, _)| *seq);
                        *lock(&self.narrow_until) = last;
                        return self.run_once();
                    }
                },
            }
        }
    }

    /// Runs the stages over one chunk, the quarantined events going straight to the
    /// failed-events store, and commits it with the checkpoint.
    fn run_chunk(
        &self,
        entries: &[(u64, IVec)],
        quarantine: &BTreeMap<u64, Quarantine>,
    ) -> Result<usize, ChunkFailure> {
        let Some(last) = entries.last().map(|(seq, _)| *seq) else {
            return Ok(0);
        };
        let mut dropped: BTreeMap<String, u64> = BTreeMap::new();
        let mut failed: BTreeMap<String, u64> = BTreeMap::new();
        let mut settlement = Settlement::default();
        let mut live = Vec::new();
        let watching = self.live.receiver_count() > 0;
        for stage in &self.stages {
            stage.begin_chunk();
        }
        for (seq, value) in entries {
            let seq = *seq;
            let decoded = StoredEvent::decode(seq, value);
            let (mut event, failure) = match (decoded, quarantine.get(&seq)) {
                (Ok(event), None) => (event, None),
                (Ok(event), Some(why)) => (event, Some(why.clone())),
                (Err(error), _) => {
                    tracing::warn!(seq, %error, "dropping an undecodable log record");
                    *dropped.entry(CORRUPT_RECORD.to_owned()).or_default() += 1;
                    settlement.remove(seq);
                    continue;
                }
            };
            let outcome = match failure {
                Some((code, reason)) => Outcome::Fail(code, reason),
                None => match self.run_stages(&mut event)? {
                    Ok(outcome) => outcome,
                    Err(why) => return Err(ChunkFailure::Event(seq, why)),
                },
            };
            match outcome {
                Outcome::Continue => {}
                Outcome::Drop(reason) => {
                    *dropped.entry(reason.to_owned()).or_default() += 1;
                    settlement.remove(seq);
                    continue;
                }
                Outcome::Fail(code, reason) => {
                    *failed.entry(code.to_owned()).or_default() += 1;
                    match FailedEvent::new(seq, value, code, reason) {
                        Ok(failed) => settlement.fail(failed),
                        Err(error) => {
                            tracing::warn!(seq, %error, "dropping an undecodable log record");
                            settlement.remove(seq);
                        }
                    }
                    continue;
                }
            }
            if let Err(error) = settlement.keep(&event, value) {
                return Err(ChunkFailure::Event(
                    seq,
                    (STAGE_FAILED, format!("the event cannot be stored: {error}")),
                ));
            }
            if watching && let Ok(json) = serde_json::to_string(&event) {
                live.push(Arc::<str>::from(json));
            }
        }
        for stage in &self.stages {
            if let Err((_, reason)) = guarded(stage.as_ref(), || stage.end_chunk())? {
                return Err(ChunkFailure::Chunk(reason));
            }
        }
        let any_failed = !failed.is_empty();
        self.store.settle(settlement)?;
        if any_failed {
            self.trim_failed()?;
        }
        let mut counters = self.stats.pipeline();
        counters.add(entries.len() as u64, &dropped, &failed);
        self.store.commit_checkpoint(last, &counters)?;
        self.store.flush()?;
        self.stats.set_pipeline(counters);
        for event in live {
            // No subscriber left is fine: the live tail is best effort.
            let _ = self.live.send(event);
        }
        Ok(entries.len())
    }

    /// The stages' outcome for one event, or why it must be quarantined.
    fn run_stages(
        &self,
        event: &mut StoredEvent,
    ) -> Result<Result<Outcome, Quarantine>, StoreError> {
        for stage in &self.stages {
            match guarded(stage.as_ref(), || stage.process(event))? {
                Ok(Outcome::Continue) => {}
                Ok(outcome) => return Ok(Ok(outcome)),
                Err(why) => return Ok(Err(why)),
            }
        }
        Ok(Ok(Outcome::Continue))
    }

    /// Runs the pipeline on its own thread until `wake` says stop, supervised (see
    /// [`supervise`]). After a storage failure it waits, 100 ms at first and doubling to
    /// 30 s while failures go on, then runs the same chunk again.
    ///
    /// # Errors
    ///
    /// When the thread cannot be spawned.
    pub fn start(self, wake: Arc<Wake>) -> std::io::Result<JoinHandle<()>> {
        let health = self.health.clone();
        std::thread::Builder::new()
            .name("kith-pipeline".to_owned())
            .spawn(move || {
                supervise("pipeline", &health, || {
                    let mut backoff = FIRST_RETRY;
                    while !wake.stopped() {
                        match self.run_once() {
                            Ok(0) => {
                                if !wake.wait(None) {
                                    break;
                                }
                            }
                            Ok(_) => backoff = FIRST_RETRY,
                            Err(error) => {
                                tracing::error!(%error, retry_in = ?backoff, "pipeline pass failed");
                                wake.wait(Some(backoff));
                                backoff = (backoff * 2).min(MAX_RETRY);
                            }
                        }
                    }
                });
            })
    }
}

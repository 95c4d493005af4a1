//! The log writer: group commit of accepted events onto the durable log.
//!
//! Handlers hand their accepted events to one writer thread and wait. The thread takes
//! every request waiting at that moment, assigns each event its `seq`, appends them all
//! in one batch, persists the ingest counters and flushes once; then it answers every
//! request in the group and wakes the pipeline. So a 200 always follows an fsync, and
//! concurrent requests share it: the more load, the larger the group, the fewer flushes
//! per event.

use std::sync::Arc;
use std::sync::mpsc::Receiver;

use sled::Batch;
use tokio::sync::oneshot;

use crate::error::StoreError;
use crate::health::Health;
use crate::pipeline::Wake;
use crate::stats::Stats;
use crate::store::Store;
use crate::worker::Worker;

/// The most events one group commit takes, to bound its latency and memory.
const MAX_GROUP_EVENTS: usize = 50_000;

/// What one ingest request hands the writer.
#[derive(Debug)]
pub struct Append {
    /// The source the events came from.
    pub source: Arc<str>,
    /// Accepted events, each encoded as message JSON.
    pub events: Vec<Vec<u8>>,
    /// Events in the request (accepted and rejected).
    pub received: u64,
    /// Reason codes of the events rejected one by one.
    pub rejected: Vec<&'static str>,
}

#[derive(Debug)]
struct Pending {
    append: Append,
    done: oneshot::Sender<Result<(), StoreError>>,
}

/// Handle to the writer thread.
#[derive(Debug)]
pub struct LogWriter {
    worker: Worker<Pending>,
}

impl LogWriter {
    /// Starts the writer thread, continuing the log after `store.last_seq()` (read again
    /// when the thread is restarted after a panic).
    ///
    /// # Errors
    ///
    /// When the last `seq` cannot be read, or the thread cannot be spawned.
    pub fn start(
        store: Arc<Store>,
        stats: Arc<Stats>,
        wake: Arc<Wake>,
        health: &Arc<Health>,
    ) -> Result<Self, StoreError> {
        store.last_seq()?;
        let worker = Worker::start("log-writer", health, Vec::new(), move |rx| {
            match store.last_seq() {
                Ok(last) => run(&store, &stats, &wake, rx, last + 1),
                // Supervision restarts the thread after a pause.
                Err(error) => panic!("cannot read the end of the log: {error}"),
            }
        })?;
        Ok(LogWriter { worker })
    }

    /// Appends the request's events and waits until they are durable.
    ///
    /// # Errors
    ///
    /// [`StoreError::ShuttingDown`] after [`LogWriter::close`], or the store's failure.
    pub async fn append(&self, append: Append) -> Result<(), StoreError> {
        self.send(append)?
            .await
            .map_err(|_| StoreError::CommitFailed)?
    }

    /// [`LogWriter::append`] for threads outside the async runtime (the importer).
    ///
    /// # Errors
    ///
    /// As [`LogWriter::append`].
    pub fn append_blocking(&self, append: Append) -> Result<(), StoreError> {
        self.send(append)?
            .blocking_recv()
            .map_err(|_| StoreError::CommitFailed)?
    }

    fn send(
        &self,
        append: Append,
    ) -> Result<oneshot::Receiver<Result<(), StoreError>>, StoreError> {
        let (done, result) = oneshot::channel();
        self.worker.send(Pending { append, done })?;
        Ok(result)
    }

    /// Whether the writer takes no more appends (the collector is stopping).
    pub fn is_closed(&self) -> bool {
        self.worker.is_closed()
    }

    /// Refuses new appends, commits what is queued and waits for the thread to end.
    pub fn close(&self) {
        self.worker.close();
    }
}

fn run(store: &Store, stats: &Stats, wake: &Wake, rx: &Receiver<Pending>, mut next_seq: u64) {
    while let Ok(first) = rx.recv() {
        let mut group = vec![first];
        let mut events = group[0].append.events.len();
        while events < MAX_GROUP_EVENTS {
            match rx.try_recv() {
                Ok(more) => {
                    events += more.append.events.len();
                    group.push(more);
                }
                Err(_) => break,
            }
        }
        let result = commit(store, stats, &group, &mut next_seq);
        if let Err(error) = &result {
            tracing::error!(%error, "group commit failed");
        }
        for pending in group {
            let answer = match &result {
                Ok(()) => Ok(()),
                Err(_) => Err(StoreError::CommitFailed),
            };
            // A client that went away no longer waits for its answer; that is fine.
            let _ = pending.done.send(answer);
        }
        if result.is_ok() {
            wake.notify();
        }
    }
}

fn commit(
    store: &Store,
    stats: &Stats,
    group: &[Pending],
    next_seq: &mut u64,
) -> Result<(), StoreError> {
    let mut batch = Batch::default();
    for pending in group {
        for event in &pending.append.events {
            batch.insert(
                &Store::log_key(*next_seq),
                Store::log_value(&pending.append.source, event),
            );
            *next_seq += 1;
        }
    }
    store.append(batch)?;
    for pending in group {
        let append = &pending.append;
        stats.record_ingest(
            append.received,
            append.events.len() as u64,
            &append.rejected,
        );
    }
    store.put_ingest_counters(&stats.ingest())?;
    store.flush()
}

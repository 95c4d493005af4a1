//! File imports: the [`ImportJob`] (a file, its format and mapping, its report), the
//! readers that stream a file's records, and the [`Importer`] thread that runs jobs one
//! at a time and resumes interrupted ones at start.

use std::collections::HashMap;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::PathBuf;
use std::sync::mpsc::Receiver;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::records::read;
use super::{Converter, Format, ImportReport, Mapping, Status};
use crate::disk::{Disk, IMPORT_PAUSE};
use crate::error::StoreError;
use crate::health::{Health, panic_message};
use crate::store::Store;
use crate::worker::Worker;
use crate::writer::{Append, LogWriter};

/// What happens to the file once its import is over.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Finish {
    /// Delete it (an upload's spooled copy).
    Delete,
    /// Move it to `done/` or `failed/` under this directory, with its report beside it
    /// (a watched directory's drop).
    MoveUnder(PathBuf),
}

/// A file import: what to read, how, and how far it got.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImportJob {
    /// The report, persisted as the import goes.
    pub report: ImportReport,
    /// How records become messages.
    pub mapping: Mapping,
    /// The file's format.
    pub format: Format,
    /// Whether the file is gzip-compressed.
    pub gzip: bool,
    /// The file.
    pub file: PathBuf,
    /// What happens to the file at the end.
    pub finish: Finish,
}

/// Runs file imports one at a time on its own thread.
#[derive(Debug)]
pub struct Importer {
    store: Arc<Store>,
    worker: Worker<String>,
    open: Arc<OpenImports>,
}

/// The imports each source has open: uploads under way, and submitted jobs (by id)
/// until the importer has finished them.
#[derive(Debug, Default)]
struct OpenImports {
    uploading: Mutex<HashMap<Arc<str>, usize>>,
    submitted: Mutex<HashMap<String, Arc<str>>>,
}

impl OpenImports {
    fn count(&self, source: &str) -> usize {
        let uploading = lock(&self.uploading).get(source).copied().unwrap_or(0);
        let submitted = lock(&self.submitted)
            .values()
            .filter(|s| ***s == *source)
            .count();
        uploading + submitted
    }

    fn finished(&self, job: &str) {
        lock(&self.submitted).remove(job);
    }
}

/// One of a source's open imports, taken before its upload starts; given back when
/// dropped, unless the job was submitted (it is then given back when it finishes).
#[derive(Debug)]
pub struct OpenSlot {
    open: Arc<OpenImports>,
    source: Arc<str>,
}

impl Drop for OpenSlot {
    fn drop(&mut self) {
        let mut uploading = lock(&self.open.uploading);
        if let Some(n) = uploading.get_mut(&self.source) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                uploading.remove(&self.source);
            }
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// What the importer thread works with.
struct Run {
    store: Arc<Store>,
    writer: Arc<LogWriter>,
    dedup_window_ms: i64,
    /// The most bytes a file is read for, after decompression.
    max_bytes: u64,
    disk: Arc<Disk>,
    open: Arc<OpenImports>,
}

impl Importer {
    /// Starts the importer thread, and resumes the imports a stop interrupted.
    ///
    /// # Errors
    ///
    /// When the store cannot be read or the thread cannot start.
    pub fn start(
        store: Arc<Store>,
        writer: Arc<LogWriter>,
        dedup_window: Duration,
        max_bytes: u64,
        disk: Arc<Disk>,
        health: &Arc<Health>,
    ) -> Result<Self, StoreError> {
        let interrupted: Vec<String> = store
            .imports::<Value>(usize::MAX)?
            .into_iter()
            .rev()
            .filter_map(|value| serde_json::from_value::<ImportJob>(value).ok())
            .filter(|job| job.report.status == Status::Processing)
            .map(|job| job.report.id)
            .collect();
        for id in &interrupted {
            tracing::info!(%id, "resuming an interrupted import");
        }
        let open = Arc::new(OpenImports::default());
        let run = Run {
            store: store.clone(),
            writer,
            dedup_window_ms: i64::try_from(dedup_window.as_millis()).unwrap_or(i64::MAX),
            max_bytes,
            disk,
            open: open.clone(),
        };
        let worker = Worker::start("importer", health, interrupted, move |rx| run.run(rx))?;
        Ok(Importer {
            store,
            worker,
            open,
        })
    }

    /// One more open import for `source` (an upload about to start), unless it has
    /// `max` open already.
    pub fn open_slot(&self, source: &Arc<str>, max: usize) -> Option<OpenSlot> {
        if self.open.count(source) >= max {
            return None;
        }
        *lock(&self.open.uploading)
            .entry(source.clone())
            .or_default() += 1;
        Some(OpenSlot {
            open: self.open.clone(),
            source: source.clone(),
        })
    }

    /// Records `job` and queues it; its `slot`, when it has one, stays taken until the
    /// importer has finished it.
    ///
    /// # Errors
    ///
    /// When it cannot be stored, or the importer is stopping.
    pub fn submit(&self, job: &ImportJob, slot: Option<OpenSlot>) -> Result<(), StoreError> {
        self.store.put_import(&job.report.id, job)?;
        if let Some(slot) = slot {
            lock(&self.open.submitted).insert(job.report.id.clone(), slot.source.clone());
        }
        let sent = self.worker.send(job.report.id.clone());
        if sent.is_err() {
            self.open.finished(&job.report.id);
        }
        sent
    }

    /// Stops taking jobs and waits for the thread; the import in progress stops at its
    /// next batch (the log writer is closed first) and resumes at the next start.
    pub fn close(&self) {
        self.worker.close();
    }
}

/// Gives a job's open slot back when the importer is done with it, however it ends.
struct Finished<'a>(&'a OpenImports, &'a str);

impl Drop for Finished<'_> {
    fn drop(&mut self) {
        self.0.finished(self.1);
    }
}

impl Run {
    fn run(&self, rx: &Receiver<String>) {
        while let Ok(id) = rx.recv() {
            let _finished = Finished(&self.open, &id);
            let job = match self.store.import::<ImportJob>(&id) {
                Ok(Some(job)) if job.report.status == Status::Processing => job,
                Ok(_) => continue,
                Err(error) => {
                    tracing::error!(%id, %error, "cannot read an import");
                    continue;
                }
            };
            match self.import(job) {
                Ok(()) => {}
                Err(StoreError::ShuttingDown) => {
                    tracing::info!(%id, "import interrupted by shutdown; it resumes at the next start");
                    return;
                }
                Err(error) => tracing::error!(%id, %error, "import failed on storage"),
            }
        }
    }

    fn import(&self, mut job: ImportJob) -> Result<(), StoreError> {
        let outcome = catch_unwind(AssertUnwindSafe(|| self.read_all(&mut job)));
        let error = match outcome {
            Ok(Ok(error)) => error,
            Ok(Err(StoreError::ShuttingDown)) => return Err(StoreError::ShuttingDown),
            Ok(Err(error)) => Some(format!("storage failed: {error}")),
            Err(panic) => Some(format!(
                "the import stopped on an internal error: {}",
                panic_message(panic.as_ref())
            )),
        };
        job.report.finish(error);
        finish_file(&job);
        self.store.put_import(&job.report.id, &job)?;
        tracing::info!(id = %job.report.id, status = ?job.report.status, total = job.report.total,
                       ingested = job.report.ingested, failed = job.report.failed, "import finished");
        Ok(())
    }

    /// Reads every record after the report's last row; answers the error that stopped
    /// the file, if one did.
    fn read_all(&self, job: &mut ImportJob) -> Result<Option<String>, StoreError> {
        let records = match read(job.format, job.gzip, &job.file, self.max_bytes) {
            Ok(records) => records,
            Err(error) => return Ok(Some(error)),
        };
        if let Err(error) = job.mapping.check(records.columns.as_deref()) {
            return Ok(Some(error));
        }
        let resume_after = job.report.last_row;
        let mapping = job.mapping.clone();
        let mut converter = Converter::new(&mapping, &self.store, self.dedup_window_ms);
        let mut stopped = None;
        for item in records.items {
            let record = match item {
                Ok(record) => record,
                Err(error) => {
                    stopped = Some(error);
                    break;
                }
            };
            if record.row <= resume_after {
                continue;
            }
            converter.take(record, &mut job.report)?;
            if converter.full() {
                self.commit(&mut converter, job)?;
            }
        }
        self.commit(&mut converter, job)?;
        Ok(stopped)
    }

    /// Appends the converted events and records the report.
    fn commit(&self, converter: &mut Converter<'_>, job: &mut ImportJob) -> Result<(), StoreError> {
        let events = converter.drain();
        let count = events.len() as u64;
        // A nearly full disk pauses the import; it goes on once space is back.
        while count > 0 && self.disk.low() {
            if self.writer.is_closed() {
                return Err(StoreError::ShuttingDown);
            }
            std::thread::sleep(IMPORT_PAUSE);
        }
        if count > 0 {
            self.writer.append_blocking(Append {
                source: Arc::from(job.report.source.as_str()),
                events,
                received: count,
                rejected: Vec::new(),
            })?;
        }
        job.report.ingested += count;
        self.store.put_import(&job.report.id, &*job)
    }
}

/// Deletes or moves the file of a finished import.
fn finish_file(job: &ImportJob) {
    let result = match &job.finish {
        Finish::Delete => std::fs::remove_file(&job.file),
        Finish::MoveUnder(root) => super::watch::file_away(root, &job.file, &job.report),
    };
    if let Err(error) = result {
        tracing::warn!(file = %job.file.display(), %error, "cannot clean up an imported file");
    }
}

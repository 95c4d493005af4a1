//! File imports: the [`ImportJob`] (a file, its format and mapping, its report), the
//! readers that stream a file's records, and the [`Importer`] thread that runs jobs one
//! at a time and resumes interrupted ones at start.

use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc::Receiver;
use std::time::Duration;

use flate2::read::GzDecoder;
use kith_sdk_core::protocol::MAX_EVENT_BYTES;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::{Converter, Format, ImportReport, Mapping, Record, Status, cell};
use crate::error::StoreError;
use crate::health::{Health, panic_message};
use crate::store::Store;
use crate::worker::Worker;
use crate::writer::{Append, LogWriter};

/// The longest NDJSON line read; longer ones fail as one record (a message is at most
/// 32 KB, so this leaves room for fields the mapping leaves out).
pub const MAX_LINE_BYTES: usize = 4 * MAX_EVENT_BYTES;

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

/// One item of a record stream: a record, or a failure that ends the stream.
pub type Item = Result<Record, String>;

/// A stream of records, and the columns when the format has a header.
pub struct Records {
    /// The CSV header's columns.
    pub columns: Option<Vec<String>>,
    /// The records.
    pub items: Box<dyn Iterator<Item = Item> + Send>,
}

fn open(path: &Path, gzip: bool) -> Result<Box<dyn Read + Send>, String> {
    let file = File::open(path).map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    Ok(if gzip {
        Box::new(GzDecoder::new(file))
    } else {
        Box::new(file)
    })
}

/// Streams the records of a file.
///
/// # Errors
///
/// When the file cannot be opened, or a CSV header cannot be read or repeats a column.
pub fn read(format: Format, gzip: bool, path: &Path) -> Result<Records, String> {
    let reader = BufReader::with_capacity(256 * 1024, open(path, gzip)?);
    match format {
        Format::Csv => csv_records(reader),
        Format::Ndjson => Ok(Records {
            columns: None,
            items: Box::new(NdjsonLines {
                reader,
                line: 0,
                done: false,
            }),
        }),
    }
}

fn csv_records(reader: impl Read + Send + 'static) -> Result<Records, String> {
    let mut csv = csv::ReaderBuilder::new()
        .flexible(false)
        .from_reader(reader);
    let columns: Vec<String> = csv
        .headers()
        .map_err(|e| format!("cannot read the CSV header: {e}"))?
        .iter()
        .map(|c| c.trim_start_matches('\u{feff}').trim().to_owned())
        .collect();
    if let Some(repeated) = columns
        .iter()
        .enumerate()
        .find(|(i, c)| columns[..*i].contains(c))
    {
        return Err(format!("the CSV header repeats column {:?}", repeated.1));
    }
    let names = columns.clone();
    let mut stopped = false;
    let items = csv.into_records().map_while(move |result| {
        if stopped {
            return None;
        }
        Some(match result {
            Ok(record) => {
                let row = record.position().map_or(0, csv::Position::line);
                let fields: Map<String, Value> = names
                    .iter()
                    .zip(record.iter())
                    .filter_map(|(name, text)| cell(text).map(|v| (name.clone(), v)))
                    .collect();
                Ok(Record {
                    row,
                    fields: Ok(fields),
                })
            }
            Err(error) => {
                let row = error.position().map_or(0, csv::Position::line);
                if let csv::ErrorKind::Io(io) = error.kind() {
                    stopped = true;
                    Err(format!("reading stopped at line {row}: {io}"))
                } else {
                    let message = match error.kind() {
                        csv::ErrorKind::UnequalLengths {
                            expected_len, len, ..
                        } => {
                            format!("the row has {len} fields; the header has {expected_len}")
                        }
                        csv::ErrorKind::Utf8 { .. } => "the row is not valid UTF-8".to_owned(),
                        _ => error.to_string(),
                    };
                    Ok(Record {
                        row,
                        fields: Err(message),
                    })
                }
            }
        })
    });
    Ok(Records {
        columns: Some(columns),
        items: Box::new(items),
    })
}

/// NDJSON lines, each read up to [`MAX_LINE_BYTES`].
struct NdjsonLines<R> {
    reader: R,
    line: u64,
    done: bool,
}

impl<R: BufRead> Iterator for NdjsonLines<R> {
    type Item = Item;

    fn next(&mut self) -> Option<Item> {
        let mut buffer = Vec::new();
        while !self.done {
            buffer.clear();
            self.line += 1;
            let read = (&mut self.reader)
                .take(MAX_LINE_BYTES as u64 + 1)
                .read_until(b'\n', &mut buffer);
            match read {
                Ok(0) => self.done = true,
                Ok(_) if buffer.len() > MAX_LINE_BYTES && !buffer.ends_with(b"\n") => {
                    // Skip the rest of the overlong line.
                    let mut rest = Vec::new();
                    let skipped = self.reader.read_until(b'\n', &mut rest);
                    if skipped.is_err() {
                        self.done = true;
                    }
                    return Some(Ok(Record {
                        row: self.line,
                        fields: Err(format!("the line is longer than {MAX_LINE_BYTES} bytes")),
                    }));
                }
                Ok(_) => {
                    if buffer.iter().all(u8::is_ascii_whitespace) {
                        continue;
                    }
                    let fields = match serde_json::from_slice::<Value>(&buffer) {
                        Ok(Value::Object(object)) => Ok(object),
                        Ok(_) => Err("the line is not a JSON object".to_owned()),
                        Err(e) => Err(format!("the line is not JSON: {e}")),
                    };
                    return Some(Ok(Record {
                        row: self.line,
                        fields,
                    }));
                }
                Err(error) => {
                    self.done = true;
                    return Some(Err(format!(
                        "reading stopped at line {}: {error}",
                        self.line
                    )));
                }
            }
        }
        None
    }
}

/// Runs file imports one at a time on its own thread.
#[derive(Debug)]
pub struct Importer {
    store: Arc<Store>,
    worker: Worker<String>,
}

/// What the importer thread works with.
struct Run {
    store: Arc<Store>,
    writer: Arc<LogWriter>,
    dedup_window_ms: i64,
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
        let run = Run {
            store: store.clone(),
            writer,
            dedup_window_ms: i64::try_from(dedup_window.as_millis()).unwrap_or(i64::MAX),
        };
        let worker = Worker::start("importer", health, interrupted, move |rx| run.run(rx))?;
        Ok(Importer { store, worker })
    }

    /// Records `job` and queues it.
    ///
    /// # Errors
    ///
    /// When it cannot be stored, or the importer is stopping.
    pub fn submit(&self, job: &ImportJob) -> Result<(), StoreError> {
        self.store.put_import(&job.report.id, job)?;
        self.worker.send(job.report.id.clone())
    }

    /// Stops taking jobs and waits for the thread; the import in progress stops at its
    /// next batch (the log writer is closed first) and resumes at the next start.
    pub fn close(&self) {
        self.worker.close();
    }
}

impl Run {
    fn run(&self, rx: &Receiver<String>) {
        while let Ok(id) = rx.recv() {
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
        let records = match read(job.format, job.gzip, &job.file) {
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    type Row = (u64, Result<Map<String, Value>, String>);

    fn rows(items: Vec<Item>) -> Vec<Row> {
        items
            .into_iter()
            .map(|i| i.expect("no fatal error"))
            .map(|r| (r.row, r.fields))
            .collect()
    }

    fn records(format: Format, text: &[u8]) -> (Option<Vec<String>>, Vec<Item>) {
        let mut file = tempfile::NamedTempFile::new().expect("temp file");
        file.write_all(text).expect("write");
        let records = read(format, false, file.path()).expect("readable");
        (records.columns, records.items.collect())
    }

    #[test]
    fn csv_rows_carry_their_line_and_bad_rows_say_why() {
        let (columns, items) = records(
            Format::Csv,
            b"\xef\xbb\xbfid,name,zip\n1,Ann,02134\n2,\"Bo, Jr.\"\n3,\"multi\nline\",1\n4,\xff,1\n",
        );
        assert_eq!(
            columns,
            Some(vec!["id".to_owned(), "name".to_owned(), "zip".to_owned()])
        );
        let rows = rows(items);
        assert_eq!(rows.len(), 4);
        assert_eq!(rows[0].0, 2);
        let first = rows[0].1.as_ref().expect("valid");
        assert_eq!(first["id"], 1);
        assert_eq!(first["zip"], "02134");
        assert_eq!(rows[1].0, 3);
        assert_eq!(
            rows[1].1,
            Err("the row has 2 fields; the header has 3".to_owned())
        );
        assert_eq!(rows[2].0, 4);
        assert_eq!(rows[2].1.as_ref().expect("valid")["name"], "multi\nline");
        assert_eq!(rows[3].0, 6);
        assert_eq!(rows[3].1, Err("the row is not valid UTF-8".to_owned()));
    }

    #[test]
    fn csv_headers_are_checked() {
        let mut file = tempfile::NamedTempFile::new().expect("temp file");
        file.write_all(b"id,id\n1,2\n").expect("write");
        let error = read(Format::Csv, false, file.path())
            .err()
            .expect("repeated column");
        assert!(error.contains("\"id\""), "{error}");
        assert!(read(Format::Csv, false, Path::new("/nonexistent.csv")).is_err());
    }

    #[test]
    fn ndjson_lines_are_objects_and_long_lines_are_skipped() {
        let long = format!("{{\"a\": \"{}\"}}\n", "x".repeat(MAX_LINE_BYTES));
        let text = format!("{{\"id\": 1}}\n\n[1]\nnot json\n{long}{{\"id\": 2}}");
        let (columns, items) = records(Format::Ndjson, text.as_bytes());
        assert_eq!(columns, None);
        let rows = rows(items);
        assert_eq!(rows.len(), 5);
        assert_eq!(rows[0].0, 1);
        assert_eq!(
            rows[1],
            (3, Err("the line is not a JSON object".to_owned()))
        );
        assert_eq!(rows[2].0, 4);
        assert!(
            rows[2]
                .1
                .as_ref()
                .is_err_and(|e| e.starts_with("the line is not JSON"))
        );
        assert_eq!(rows[3].0, 5);
        assert!(rows[3].1.as_ref().is_err_and(|e| e.contains("longer")));
        assert_eq!(rows[4].0, 6);
        assert_eq!(rows[4].1.as_ref().expect("valid")["id"], 2);
    }

    #[test]
    fn a_corrupt_gzip_stops_the_stream_with_an_error() {
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        for i in 0..2000 {
            writeln!(encoder, "{{\"id\": {i}, \"pad\": \"{i:0>40}\"}}").expect("write");
        }
        let mut gz = encoder.finish().expect("gzip");
        let middle = gz.len() / 2;
        gz.truncate(middle);
        let mut file = tempfile::NamedTempFile::new().expect("temp file");
        file.write_all(&gz).expect("write");
        let items: Vec<Item> = read(Format::Ndjson, true, file.path())
            .expect("opens")
            .items
            .collect();
        assert!(items.len() > 1, "the readable part is read");
        assert!(
            items.last().is_some_and(Result::is_err),
            "then the stream stops"
        );
    }
}

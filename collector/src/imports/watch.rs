//! Watched directories, for data-lake drops: a file dropped into a watched directory is
//! imported for the directory's source, then moved to `done/` (succeeded or partially
//! succeeded) or `failed/`, with its report beside it as `<file>.report.json`.
//!
//! A file is taken once its size and modification time stayed the same over one poll
//! (so a file still being copied is left alone; writing under a name starting with `.`
//! and renaming it in is safer still). Its format comes from its extension (`.csv`,
//! `.ndjson`, `.jsonl`, each optionally `.gz`), its mapping from `<file>.mapping.json`
//! beside it or else the directory's `mapping.json`. Taken files wait in `processing/`,
//! so a restart resumes them.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use super::job::{Finish, ImportJob, Importer};
use super::{Format, ImportReport, Mapping, new_id};
use crate::server::source_id;

/// How often a watched directory is scanned by default.
pub const DEFAULT_POLL: Duration = Duration::from_secs(1);

/// A watched directory, as the config file gives it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WatchedDir {
    /// The directory.
    pub path: PathBuf,
    /// The write key of the source its files are imported for.
    pub write_key: String,
    /// Milliseconds between two scans (default 1000).
    #[serde(default)]
    pub poll_ms: Option<u64>,
}

/// The format and compression of a file, from its name; `None` for other files.
fn format_of(name: &str) -> Option<(Format, bool)> {
    let (base, gzip) = match name.strip_suffix(".gz") {
        Some(base) => (base, true),
        None => (name, false),
    };
    if name.starts_with('.') || name.ends_with(".mapping.json") || name.ends_with(".report.json") {
        return None;
    }
    let format = match Path::new(base).extension()?.to_str()? {
        "csv" => Format::Csv,
        "ndjson" | "jsonl" => Format::Ndjson,
        _ => return None,
    };
    Some((format, gzip))
}

/// The mapping for `name` in `dir`: its own `<name>.mapping.json`, else `mapping.json`.
fn mapping_for(dir: &Path, name: &str) -> Result<Mapping, String> {
    let own = dir.join(format!("{name}.mapping.json"));
    let path = if own.exists() {
        own
    } else {
        dir.join("mapping.json")
    };
    let text = std::fs::read_to_string(&path)
        .map_err(|e| format!("no mapping: cannot read {}: {e}", path.display()))?;
    let mapping: Mapping =
        serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    mapping
        .check(None)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(mapping)
}

/// Moves a finished import's file to `done/` or `failed/` under `root` and writes its
/// report beside it (a name already taken there gets the import id as a prefix).
///
/// # Errors
///
/// When the file cannot be moved or the report written.
pub fn file_away(root: &Path, file: &Path, report: &ImportReport) -> std::io::Result<()> {
    let failed = report.status == super::Status::Failed;
    let target_dir = root.join(if failed { "failed" } else { "done" });
    std::fs::create_dir_all(&target_dir)?;
    let taken = file
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    // Waiting in processing/, the file's name has the import id in front.
    let prefix = format!("{}-", report.id);
    let name = taken.strip_prefix(&prefix).unwrap_or(&taken).to_owned();
    let mut target = target_dir.join(&name);
    if target.exists() {
        target = target_dir.join(format!("{}-{name}", report.id));
    }
    std::fs::rename(file, &target)?;
    let own_mapping = root.join(format!("{name}.mapping.json"));
    if own_mapping.exists() {
        std::fs::rename(
            &own_mapping,
            target_dir.join(format!("{name}.mapping.json")),
        )?;
    }
    let report_path = PathBuf::from(format!("{}.report.json", target.display()));
    std::fs::write(report_path, serde_json::to_vec_pretty(report)?)
}

/// The threads scanning the watched directories.
#[derive(Debug, Default)]
pub struct Watchers {
    stop: Arc<(Mutex<bool>, Condvar)>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl Watchers {
    /// Starts one thread per directory.
    ///
    /// # Errors
    ///
    /// When a directory cannot be created or a thread cannot start.
    pub fn start(dirs: &[WatchedDir], importer: &Arc<Importer>) -> std::io::Result<Self> {
        let watchers = Watchers::default();
        for dir in dirs {
            std::fs::create_dir_all(dir.path.join("processing"))?;
            let watch = Watch {
                dir: dir.clone(),
                source: source_id(&dir.write_key),
                importer: importer.clone(),
                seen: HashMap::new(),
            };
            let stop = watchers.stop.clone();
            let thread = std::thread::Builder::new()
                .name("kith-watch".to_owned())
                .spawn(move || watch.run(&stop))?;
            watchers
                .threads
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(thread);
        }
        Ok(watchers)
    }

    /// Stops every thread and waits for them.
    pub fn stop(&self) {
        let (stopped, wake) = &*self.stop;
        *stopped.lock().unwrap_or_else(PoisonError::into_inner) = true;
        wake.notify_all();
        for thread in self
            .threads
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .drain(..)
        {
            if thread.join().is_err() {
                tracing::error!("a directory watcher panicked");
            }
        }
    }
}

struct Watch {
    dir: WatchedDir,
    source: String,
    importer: Arc<Importer>,
    /// Size and modification time of each candidate at the previous scan.
    seen: HashMap<PathBuf, (u64, Option<SystemTime>)>,
}

impl Watch {
    fn run(mut self, stop: &(Mutex<bool>, Condvar)) {
        let poll = self.dir.poll_ms.map_or(DEFAULT_POLL, Duration::from_millis);
        let (stopped, wake) = stop;
        loop {
            if let Err(error) = self.scan() {
                tracing::warn!(dir = %self.dir.path.display(), %error, "cannot scan a watched directory");
            }
            let guard = stopped.lock().unwrap_or_else(PoisonError::into_inner);
            let (guard, _) = wake
                .wait_timeout_while(guard, poll, |stopped| !*stopped)
                .unwrap_or_else(PoisonError::into_inner);
            if *guard {
                return;
            }
        }
    }

    fn scan(&mut self) -> std::io::Result<()> {
        let mut now_seen = HashMap::new();
        for entry in std::fs::read_dir(&self.dir.path)? {
            let entry = entry?;
            let metadata = entry.metadata()?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some((format, gzip)) = format_of(&name).filter(|_| metadata.is_file()) else {
                continue;
            };
            let shape = (metadata.len(), metadata.modified().ok());
            let path = entry.path();
            if self.seen.get(&path) == Some(&shape) {
                self.take(&path, &name, format, gzip)?;
            } else {
                now_seen.insert(path, shape);
            }
        }
        self.seen = now_seen;
        Ok(())
    }

    /// Moves a stable file to `processing/` and submits its import.
    fn take(&self, path: &Path, name: &str, format: Format, gzip: bool) -> std::io::Result<()> {
        let id = new_id();
        let processing = self
            .dir
            .path
            .join("processing")
            .join(format!("{id}-{name}"));
        std::fs::rename(path, &processing)?;
        let mut report = ImportReport::new(id, self.source.clone(), format!("directory:{name}"));
        let mapping = match mapping_for(&self.dir.path, name) {
            Ok(mapping) => mapping,
            Err(error) => {
                report.finish(Some(error));
                return file_away(&self.dir.path, &processing, &report);
            }
        };
        let job = ImportJob {
            report,
            mapping,
            format,
            gzip,
            file: processing,
            finish: Finish::MoveUnder(self.dir.path.clone()),
        };
        tracing::info!(file = name, id = %job.report.id, "importing a dropped file");
        self.importer
            .submit(&job, None)
            .map_err(std::io::Error::other)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_come_from_the_file_name() {
        assert_eq!(format_of("a.csv"), Some((Format::Csv, false)));
        assert_eq!(format_of("a.csv.gz"), Some((Format::Csv, true)));
        assert_eq!(format_of("a.ndjson"), Some((Format::Ndjson, false)));
        assert_eq!(format_of("a.jsonl.gz"), Some((Format::Ndjson, true)));
        for ignored in [
            ".a.csv",
            "a.txt",
            "mapping.json",
            "a.csv.mapping.json",
            "a.csv.report.json",
            "csv",
        ] {
            assert_eq!(format_of(ignored), None, "{ignored}");
        }
    }
}

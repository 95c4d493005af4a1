//! The free-space watermark: before the data directory's disk fills, ingest and import
//! uploads answer 503 with `Retry-After` and the importer pauses; all resume by
//! themselves once space is back. Nothing acknowledged is at risk, since nothing is
//! acknowledged while the disk is low.

use std::path::PathBuf;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use crate::error::ApiError;

/// How long a reading of the free space is trusted.
const FRESH: Duration = Duration::from_millis(250);

/// How long the importer waits before looking at the disk again.
pub const IMPORT_PAUSE: Duration = Duration::from_secs(1);

/// Watches the free space of the data directory's file system.
#[derive(Debug)]
pub struct Disk {
    dir: PathBuf,
    watermark: u64,
    last: Mutex<Option<(Instant, u64)>>,
}

impl Disk {
    /// A watch on `dir`'s file system, low below `watermark` free bytes (0: never).
    pub fn new(dir: PathBuf, watermark: u64) -> Self {
        Disk {
            dir,
            watermark,
            last: Mutex::new(None),
        }
    }

    /// The bytes available to the collector, read at most every 250 ms.
    fn available(&self) -> u64 {
        let mut last = self.last.lock().unwrap_or_else(PoisonError::into_inner);
        match *last {
            Some((at, bytes)) if at.elapsed() < FRESH => bytes,
            _ => {
                // An unreadable figure counts as plenty: the watermark is a guard, and
                // a full disk still makes writes fail cleanly (503) rather than lose data.
                let bytes = fs4::available_space(&self.dir).unwrap_or(u64::MAX);
                *last = Some((Instant::now(), bytes));
                bytes
            }
        }
    }

    /// Whether the free space is below the watermark.
    pub fn low(&self) -> bool {
        self.watermark > 0 && self.available() < self.watermark
    }

    /// 503 with `Retry-After` while the disk is low.
    ///
    /// # Errors
    ///
    /// [`ApiError::Unavailable`] below the watermark.
    pub fn check(&self) -> Result<(), ApiError> {
        if self.low() {
            Err(ApiError::Unavailable(format!(
                "the collector's disk is nearly full (less than {} bytes free); retry later",
                self.watermark
            )))
        } else {
            Ok(())
        }
    }
}

/// Reads a size in bytes: a number, optionally with a unit (`k`/`kb`, `m`/`mb`, `g`/
/// `gb`: powers of 1,000; `kib`, `mib`, `gib`: powers of 1,024).
///
/// # Errors
///
/// A sentence when the text is not a size.
pub fn parse_bytes(text: &str) -> Result<u64, String> {
    let text = text.trim().to_ascii_lowercase();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a size in bytes"))?;
    let scale: u64 = match unit.trim() {
        "" | "b" => 1,
        "k" | "kb" => 1_000,
        "m" | "mb" => 1_000_000,
        "g" | "gb" => 1_000_000_000,
        "kib" => 1 << 10,
        "mib" => 1 << 20,
        "gib" => 1 << 30,
        other => return Err(format!("unknown size unit {other:?}")),
    };
    number
        .checked_mul(scale)
        .ok_or_else(|| format!("{text:?} is too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_units() {
        assert_eq!(parse_bytes("512"), Ok(512));
        assert_eq!(parse_bytes("512MiB"), Ok(512 << 20));
        assert_eq!(parse_bytes("2 GB"), Ok(2_000_000_000));
        assert_eq!(parse_bytes("0"), Ok(0));
        assert!(parse_bytes("lots").is_err());
        assert!(parse_bytes("5 parsecs").is_err());
        assert!(parse_bytes("99999999999999 GiB").is_err());
    }

    #[test]
    fn the_watermark_compares_with_the_free_space() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert!(!Disk::new(dir.path().to_owned(), 0).low(), "0 turns it off");
        assert!(!Disk::new(dir.path().to_owned(), 1).low());
        let full = Disk::new(dir.path().to_owned(), u64::MAX);
        assert!(full.low());
        assert!(full.check().is_err());
    }
}

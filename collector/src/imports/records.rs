//! Reading an import file's records with bounded memory, whatever the file holds: a
//! CSV record or NDJSON line longer than [`MAX_RECORD_BYTES`] is parsed through
//! without being kept and reported as that row's error, and a file that decompresses
//! to more than the import limit stops with an error (a gzip bomb is read only up to
//! the limit).

use std::collections::HashSet;
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read};
use std::path::Path;

use csv_core::ReadRecordResult;
use flate2::read::GzDecoder;
use kith_sdk_core::protocol::MAX_EVENT_BYTES;
use serde_json::{Map, Value};

use super::{Format, Record, cell};

/// The longest record (a CSV row or an NDJSON line) read; longer ones fail as one
/// record. A message is at most 32 KB: this leaves room for fields the mapping leaves
/// out.
pub const MAX_RECORD_BYTES: usize = 4 * MAX_EVENT_BYTES;

/// The longest CSV header read.
pub const MAX_HEADER_BYTES: usize = 1 << 20;

/// One item of a record stream: a record, or a failure that ends the stream.
pub type Item = Result<Record, String>;

/// A stream of records, and the columns when the format has a header.
pub struct Records {
    /// The CSV header's columns.
    pub columns: Option<Vec<String>>,
    /// The records.
    pub items: Box<dyn Iterator<Item = Item> + Send>,
}

/// A reader that fails once more than `left` bytes came through it.
struct Limited<R> {
    inner: R,
    left: u64,
    limit: u64,
}

impl<R: Read> Read for Limited<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.left = self.left.checked_sub(n as u64).ok_or_else(|| {
            io::Error::other(format!(
                "the file is larger than {} bytes (counted after decompression)",
                self.limit
            ))
        })?;
        Ok(n)
    }
}

type Opened = BufReader<Limited<Box<dyn Read + Send>>>;

fn open(path: &Path, gzip: bool, max_bytes: u64) -> Result<Opened, String> {
    let file = File::open(path).map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    let decoded: Box<dyn Read + Send> = if gzip {
        Box::new(GzDecoder::new(file))
    } else {
        Box::new(file)
    };
    Ok(BufReader::with_capacity(
        256 * 1024,
        Limited {
            inner: decoded,
            left: max_bytes,
            limit: max_bytes,
        },
    ))
}

/// Streams the records of a file, reading at most `max_bytes` of it (after
/// decompression).
///
/// # Errors
///
/// When the file cannot be opened, or a CSV header cannot be read or repeats a column.
pub fn read(format: Format, gzip: bool, path: &Path, max_bytes: u64) -> Result<Records, String> {
    let reader = open(path, gzip, max_bytes)?;
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

/// A CSV record as read: its fields, or why it was not kept.
enum Raw {
    Fields(Vec<Vec<u8>>),
    TooLong,
}

/// CSV records parsed by csv-core into buffers that never grow past a limit.
struct CsvReader<R> {
    reader: R,
    core: csv_core::Reader,
    output: Vec<u8>,
    ends: Vec<usize>,
    done: bool,
}

impl<R: BufRead> CsvReader<R> {
    fn new(reader: R) -> Self {
        CsvReader {
            reader,
            core: csv_core::Reader::new(),
            output: vec![0; 4096],
            ends: vec![0; 64],
            done: false,
        }
    }

    /// The next record and the line it starts on, keeping at most `max` bytes of it.
    fn next_record(&mut self, max: usize) -> Option<io::Result<(u64, Raw)>> {
        if self.done {
            return None;
        }
        let line = self.core.line();
        let (mut written, mut ended, mut too_long) = (0, 0, false);
        loop {
            let input = match self.reader.fill_buf() {
                Ok(input) => input,
                Err(error) => {
                    self.done = true;
                    return Some(Err(error));
                }
            };
            let (result, read, out, end) =
                self.core
                    .read_record(input, &mut self.output[written..], &mut self.ends[ended..]);
            self.reader.consume(read);
            written += out;
            ended += end;
            match result {
                ReadRecordResult::InputEmpty => {}
                ReadRecordResult::OutputFull | ReadRecordResult::OutputEndsFull
                    if too_long || self.output.len() + self.ends.len() * 8 >= max =>
                {
                    // Over the limit: parse on to the record's end, keeping nothing.
                    too_long = true;
                    (written, ended) = (0, 0);
                }
                ReadRecordResult::OutputFull => {
                    let grown = (self.output.len() * 2).min(max);
                    self.output.resize(grown, 0);
                }
                ReadRecordResult::OutputEndsFull => {
                    let grown = self.ends.len() * 2;
                    self.ends.resize(grown, 0);
                }
                ReadRecordResult::Record if too_long => {
                    return Some(Ok((line, Raw::TooLong)));
                }
                ReadRecordResult::Record => {
                    let mut fields = Vec::with_capacity(ended);
                    let mut start = 0;
                    for &end in &self.ends[..ended] {
                        fields.push(self.output[start..end].to_vec());
                        start = end;
                    }
                    return Some(Ok((line, Raw::Fields(fields))));
                }
                ReadRecordResult::End => {
                    self.done = true;
                    return None;
                }
            }
        }
    }
}

fn csv_records(reader: impl BufRead + Send + 'static) -> Result<Records, String> {
    let mut csv = CsvReader::new(reader);
    let header = match csv.next_record(MAX_HEADER_BYTES) {
        None => return Err("the CSV file is empty: it needs a header row".to_owned()),
        Some(Err(error)) => return Err(format!("cannot read the CSV header: {error}")),
        Some(Ok((_, Raw::TooLong))) => {
            return Err(format!(
                "the CSV header is longer than {MAX_HEADER_BYTES} bytes"
            ));
        }
        Some(Ok((_, Raw::Fields(fields)))) => fields,
    };
    let mut columns = Vec::with_capacity(header.len());
    let mut seen = HashSet::with_capacity(header.len());
    for field in header {
        let name = String::from_utf8(field)
            .map_err(|_| "the CSV header is not valid UTF-8".to_owned())?
            .trim_start_matches('\u{feff}')
            .trim()
            .to_owned();
        if !seen.insert(name.clone()) {
            return Err(format!("the CSV header repeats column {name:?}"));
        }
        columns.push(name);
    }
    let names = columns.clone();
    let items = std::iter::from_fn(move || {
        let (row, raw) = match csv.next_record(MAX_RECORD_BYTES)? {
            Ok(next) => next,
            Err(error) => return Some(Err(format!("reading stopped: {error}"))),
        };
        let fields = match raw {
            Raw::TooLong => Err(format!("the row is longer than {MAX_RECORD_BYTES} bytes")),
            Raw::Fields(fields) if fields.len() != names.len() => Err(format!(
                "the row has {} fields; the header has {}",
                fields.len(),
                names.len()
            )),
            Raw::Fields(fields) => fields
                .into_iter()
                .zip(&names)
                .filter_map(|(field, name)| match String::from_utf8(field) {
                    Ok(text) => cell(&text).map(|v| Ok((name.clone(), v))),
                    Err(_) => Some(Err("the row is not valid UTF-8".to_owned())),
                })
                .collect::<Result<Map<String, Value>, String>>(),
        };
        Some(Ok(Record { row, fields }))
    });
    Ok(Records {
        columns: Some(columns),
        items: Box::new(items),
    })
}

/// NDJSON lines, each kept up to [`MAX_RECORD_BYTES`].
struct NdjsonLines<R> {
    reader: R,
    line: u64,
    done: bool,
}

impl<R: BufRead> NdjsonLines<R> {
    /// Consumes the rest of the current line without keeping it.
    fn skip_line(&mut self) -> io::Result<()> {
        loop {
            let input = self.reader.fill_buf()?;
            if input.is_empty() {
                return Ok(());
            }
            match input.iter().position(|b| *b == b'\n') {
                Some(at) => {
                    self.reader.consume(at + 1);
                    return Ok(());
                }
                None => {
                    let n = input.len();
                    self.reader.consume(n);
                }
            }
        }
    }
}

impl<R: BufRead> Iterator for NdjsonLines<R> {
    type Item = Item;

    fn next(&mut self) -> Option<Item> {
        let mut buffer = Vec::new();
        while !self.done {
            buffer.clear();
            self.line += 1;
            let read = (&mut self.reader)
                .take(MAX_RECORD_BYTES as u64 + 1)
                .read_until(b'\n', &mut buffer);
            let stopped = |line: u64, error: io::Error| {
                Some(Err(format!("reading stopped at line {line}: {error}")))
            };
            match read {
                Ok(0) => self.done = true,
                Ok(_) if buffer.len() > MAX_RECORD_BYTES && !buffer.ends_with(b"\n") => {
                    if let Err(error) = self.skip_line() {
                        self.done = true;
                        return stopped(self.line, error);
                    }
                    return Some(Ok(Record {
                        row: self.line,
                        fields: Err(format!("the line is longer than {MAX_RECORD_BYTES} bytes")),
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
                    return stopped(self.line, error);
                }
            }
        }
        None
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

    fn file(bytes: &[u8]) -> tempfile::NamedTempFile {
        let mut file = tempfile::NamedTempFile::new().expect("temp file");
        file.write_all(bytes).expect("write");
        file
    }

    fn records(format: Format, text: &[u8]) -> (Option<Vec<String>>, Vec<Item>) {
        let file = file(text);
        let records = read(format, false, file.path(), u64::MAX).expect("readable");
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
    fn csv_headers_are_checked_in_linear_time() {
        for (text, says) in [
            (&b"id,id\n1,2\n"[..], "\"id\""),
            (b"", "empty"),
            (b"\xff,a\n", "UTF-8"),
        ] {
            let error = read(Format::Csv, false, file(text).path(), u64::MAX)
                .err()
                .expect("refused");
            assert!(error.contains(says), "{error}");
        }
        assert!(read(Format::Csv, false, Path::new("/nonexistent.csv"), 1).is_err());
        // 40,000 columns, the last one repeated: found at once.
        let mut header: Vec<String> = (0..40_000).map(|i| format!("c{i}")).collect();
        header.push("c0".to_owned());
        let text = format!("{}\n", header.join(","));
        let error = read(Format::Csv, false, file(text.as_bytes()).path(), u64::MAX)
            .err()
            .expect("repeated");
        assert!(error.contains("\"c0\""), "{error}");
    }

    #[test]
    fn an_overlong_csv_record_is_a_row_error_and_the_next_rows_are_read() {
        let huge = "x".repeat(MAX_RECORD_BYTES * 8);
        let many_fields = ",".repeat(MAX_RECORD_BYTES);
        let text = format!("id,note\n1,\"{huge}\"\n2,{many_fields}\n3,ok\n");
        let (_, items) = records(Format::Csv, text.as_bytes());
        let rows = rows(items);
        assert_eq!(
            rows.len(),
            3,
            "{:?}",
            rows.iter().map(|r| r.0).collect::<Vec<_>>()
        );
        for row in &rows[..2] {
            assert!(
                row.1.as_ref().is_err_and(|e| e.contains("longer than")),
                "{:?}",
                row.1
            );
        }
        assert_eq!((rows[0].0, rows[1].0, rows[2].0), (2, 3, 4));
        assert_eq!(rows[2].1.as_ref().expect("valid")["note"], "ok");
    }

    #[test]
    fn ndjson_lines_are_objects_and_long_lines_are_skipped() {
        let long = format!("{{\"a\": \"{}\"}}\n", "x".repeat(MAX_RECORD_BYTES * 8));
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
    fn a_file_is_read_up_to_the_limit_after_decompression() {
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        for i in 0..100_000 {
            writeln!(encoder, "{{\"id\": {i}}}").expect("write");
        }
        let gz = encoder.finish().expect("gzip");
        let file = file(&gz);
        let items: Vec<Item> = read(Format::Ndjson, true, file.path(), 100_000)
            .expect("opens")
            .items
            .collect();
        let last = items.last().expect("items");
        assert!(
            last.as_ref()
                .is_err_and(|e| e.contains("larger than 100000 bytes")),
            "{last:?}"
        );
        assert!(items.len() < 20_000, "stopped at the limit");
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
        let file = file(&gz);
        let items: Vec<Item> = read(Format::Ndjson, true, file.path(), u64::MAX)
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

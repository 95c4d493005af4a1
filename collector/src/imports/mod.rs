//! Batch ingestion: a file (CSV or NDJSON) or a query's rows turned into Segment
//! messages by a [`Mapping`], as one import with an id and a report.
//!
//! An import streams: records are read one at a time, turned into messages, and handed
//! to the log writer in batches of [`BATCH_RECORDS`], so memory stays bounded whatever
//! the size of the file. The [`ImportReport`] (status, counts, and each failed record's
//! row number and message) is persisted after every durable batch, so it is exact after
//! a crash and an interrupted import resumes where its report stops.
//!
//! Each record's `messageId` is derived from the source, the message type and the
//! record's content, so importing the same file again adds nothing: records already
//! stored are counted as `duplicates` and skipped, and the pipeline's deduplication
//! catches repeats within one file.
//!
//! Sources: `POST /v1/imports` ([`api`]), the `kith-collector import` command (which
//! posts a local file), watched directories ([`watch`]) and PostgreSQL queries
//! ([`postgres`]). File imports run one at a time on the importer thread ([`job`]).

pub mod api;
pub mod cli;
pub mod job;
pub mod postgres;
pub mod records;
pub mod watch;

use std::str::FromStr;

use jiff::Timestamp;
use kith_sdk_core::protocol::{Message, MessageType};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};

use crate::error::StoreError;
use crate::ingest::accept_imported;
use crate::store::Store;

/// Records handed to the log writer at once (and between two report updates).
pub const BATCH_RECORDS: usize = 1_000;

/// Failed records listed in a report; beyond this they are only counted.
pub const MAX_LISTED_ERRORS: usize = 1_000;

/// The file formats an import reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// Comma-separated values with a header row.
    Csv,
    /// One JSON object per line.
    Ndjson,
}

/// How records become messages: which column (or NDJSON field) holds what.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, clap::Args)]
#[serde(deny_unknown_fields)]
pub struct Mapping {
    /// The message type of every record: identify (default), track, page, screen,
    /// group or alias.
    #[arg(long = "type")]
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// The file format (csv or ndjson); for files, taken from the name or the
    /// Content-Type when not given.
    #[arg(long, value_enum)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<Format>,
    /// Column holding the userId.
    #[arg(long)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_id: Option<String>,
    /// Column holding the anonymousId.
    #[arg(long)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub anonymous_id: Option<String>,
    /// Column holding the email (a trait).
    #[arg(long)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub email: Option<String>,
    /// Column holding the phone number (a trait).
    #[arg(long)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phone: Option<String>,
    /// Column holding when the record happened (RFC 3339, `YYYY-MM-DD[ HH:MM:SS]` in UTC,
    /// or Unix seconds).
    #[arg(long)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timestamp: Option<String>,
    /// Column holding the event name (track).
    #[arg(long)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event: Option<String>,
    /// Column holding the page or screen name.
    #[arg(long)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Column holding the groupId (group).
    #[arg(long)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group_id: Option<String>,
    /// Column holding the previousId (alias).
    #[arg(long)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_id: Option<String>,
    /// Columns that become traits (comma separated; `*` for every other column).
    #[arg(long)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traits: Option<String>,
    /// Columns that become properties (comma separated; `*` for every other column).
    #[arg(long)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub properties: Option<String>,
}

/// One record read from a file or a query: its row number and its fields.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    /// Where it is: the line in a file (a CSV header is line 1), the row of a query.
    pub row: u64,
    /// Its fields, or why it could not be read.
    pub fields: Result<Map<String, Value>, String>,
}

impl Mapping {
    /// The message type.
    ///
    /// # Errors
    ///
    /// When `type` is not a Segment message type.
    pub fn kind(&self) -> Result<MessageType, String> {
        MessageType::from_str(self.kind.as_deref().unwrap_or("identify"))
            .map_err(|e| format!("type: {e}; use identify, track, page, screen, group or alias"))
    }

    fn identity_columns(&self) -> [(&'static str, Option<&String>); 9] {
        [
            ("user_id", self.user_id.as_ref()),
            ("anonymous_id", self.anonymous_id.as_ref()),
            ("email", self.email.as_ref()),
            ("phone", self.phone.as_ref()),
            ("timestamp", self.timestamp.as_ref()),
            ("event", self.event.as_ref()),
            ("name", self.name.as_ref()),
            ("group_id", self.group_id.as_ref()),
            ("previous_id", self.previous_id.as_ref()),
        ]
    }

    fn listed(list: Option<&String>) -> Vec<&str> {
        list.map(|l| {
            l.split(',')
                .map(str::trim)
                .filter(|c| !c.is_empty())
                .collect()
        })
        .unwrap_or_default()
    }

    /// Checks the mapping, and, when the columns are known (a CSV header), that every
    /// column it names exists.
    ///
    /// # Errors
    ///
    /// A sentence saying what is missing or unknown.
    pub fn check(&self, columns: Option<&[String]>) -> Result<(), String> {
        let kind = self.kind()?;
        if self.user_id.is_none() && self.anonymous_id.is_none() {
            return Err("the mapping needs a user_id or an anonymous_id column".to_owned());
        }
        let required = match kind {
            MessageType::Track => Some(("event", &self.event)),
            MessageType::Group => Some(("group_id", &self.group_id)),
            MessageType::Alias => Some(("previous_id", &self.previous_id)),
            _ => None,
        };
        if let Some((field, None)) = required {
            return Err(format!("a {kind} import needs a {field} column"));
        }
        let Some(columns) = columns else {
            return Ok(());
        };
        let named = self
            .identity_columns()
            .into_iter()
            .filter_map(|(_, c)| c.map(String::as_str))
            .chain(Self::listed(self.traits.as_ref()))
            .chain(Self::listed(self.properties.as_ref()))
            .filter(|c| *c != "*");
        for column in named {
            if !columns.iter().any(|c| c == column) {
                return Err(format!(
                    "column {column:?} is not in the file; its columns are {}",
                    columns.join(", ")
                ));
            }
        }
        Ok(())
    }

    /// The columns of `fields` that `list` selects (`*`: those mapped to nothing else).
    fn select(&self, list: Option<&String>, fields: &Map<String, Value>) -> Map<String, Value> {
        let listed = Self::listed(list);
        let mapped: Vec<&str> = self
            .identity_columns()
            .into_iter()
            .filter_map(|(_, c)| c.map(String::as_str))
            .collect();
        fields
            .iter()
            .filter(|(key, value)| {
                !value.is_null()
                    && (listed.contains(&key.as_str())
                        || (listed.contains(&"*") && !mapped.contains(&key.as_str())))
            })
            .map(|(key, value)| (key.clone(), value.clone()))
            .collect()
    }

    /// The message for one record of `source`.
    ///
    /// # Errors
    ///
    /// A sentence saying what is wrong with the record.
    pub fn message(&self, source: &str, fields: &Map<String, Value>) -> Result<Message, String> {
        let kind = self.kind()?;
        let text = |column: Option<&String>| -> Option<String> {
            let value = fields.get(column?)?;
            match value {
                Value::Null => None,
                Value::String(s) if s.trim().is_empty() => None,
                Value::String(s) => Some(s.trim().to_owned()),
                other => Some(other.to_string()),
            }
        };
        let mut message = json!({
            "type": kind.as_str(),
            "messageId": message_id(source, kind, fields),
        });
        let mut set = |key: &str, value: Option<String>| {
            if let Some(value) = value {
                message[key] = Value::String(value);
            }
        };
        set("userId", text(self.user_id.as_ref()));
        set("anonymousId", text(self.anonymous_id.as_ref()));
        set("event", text(self.event.as_ref()));
        set("name", text(self.name.as_ref()));
        set("groupId", text(self.group_id.as_ref()));
        set("previousId", text(self.previous_id.as_ref()));
        if let Some(raw) = text(self.timestamp.as_ref()) {
            message["timestamp"] = json!(parse_time(&raw)?);
        }
        let mut traits = self.select(self.traits.as_ref(), fields);
        for (trait_name, column) in [("email", &self.email), ("phone", &self.phone)] {
            if let Some(value) = text(column.as_ref()) {
                traits.insert(trait_name.to_owned(), Value::String(value));
            }
        }
        if !traits.is_empty() {
            if matches!(kind, MessageType::Identify | MessageType::Group) {
                message["traits"] = Value::Object(traits);
            } else {
                message["context"] = json!({"traits": traits});
            }
        }
        let properties = self.select(self.properties.as_ref(), fields);
        if !properties.is_empty() {
            message["properties"] = Value::Object(properties);
        }
        serde_json::from_value(message).map_err(|e| e.to_string())
    }
}

/// A record's `messageId`: a hash of the source, the type and the record's fields
/// (sorted by name, so the column order does not matter).
fn message_id(source: &str, kind: MessageType, fields: &Map<String, Value>) -> String {
    let mut hasher = Sha256::new();
    hasher.update(source.as_bytes());
    hasher.update([0]);
    hasher.update(kind.as_str().as_bytes());
    hasher.update([0]);
    hasher.update(Value::Object(fields.clone()).to_string().as_bytes());
    let digest = hasher.finalize();
    let hex: String = digest[..16].iter().map(|b| format!("{b:02x}")).collect();
    format!("imp-{hex}")
}

/// Reads a time as RFC 3339, `YYYY-MM-DD HH:MM:SS` or `YYYY-MM-DD` (both in UTC), or
/// Unix seconds.
fn parse_time(raw: &str) -> Result<Timestamp, String> {
    if let Ok(ts) = raw.parse::<Timestamp>() {
        return Ok(ts);
    }
    if let Ok(dt) = raw.parse::<jiff::civil::DateTime>() {
        return jiff::tz::Offset::UTC
            .to_timestamp(dt)
            .map_err(|e| e.to_string());
    }
    if let Ok(seconds) = raw.parse::<i64>() {
        return Timestamp::from_second(seconds).map_err(|e| e.to_string());
    }
    Err(format!(
        "timestamp {raw:?} is not a time (RFC 3339, YYYY-MM-DD[ HH:MM:SS] or Unix seconds)"
    ))
}

/// A CSV cell as a JSON value: integers, decimals and booleans whose text is their
/// canonical form become numbers and booleans (so `02134` and `30.50` stay strings);
/// empty cells are absent.
pub fn cell(text: &str) -> Option<Value> {
    if text.is_empty() {
        return None;
    }
    if let Ok(n) = text.parse::<i64>()
        && n.to_string() == text
    {
        return Some(Value::from(n));
    }
    if let Ok(x) = text.parse::<f64>()
        && x.is_finite()
        && x.to_string() == text
    {
        return Some(Value::from(x));
    }
    Some(match text {
        "true" => Value::Bool(true),
        "false" => Value::Bool(false),
        _ => Value::String(text.to_owned()),
    })
}

/// Where an import is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Records are being read.
    Processing,
    /// Every record was ingested (or was already stored).
    Succeeded,
    /// Some records were ingested and some failed.
    PartiallySucceeded,
    /// Nothing was ingested: the file could not be read, or every record failed.
    Failed,
}

/// A record that could not be imported.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RowError {
    /// Its row (the line in a file; a CSV header is line 1).
    pub row: u64,
    /// What is wrong with it.
    pub message: String,
}

/// What `GET /v1/imports/{id}` answers, persisted as the import goes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImportReport {
    /// The import's id.
    pub id: String,
    /// The source it imports for.
    pub source: String,
    /// Where the records come from: `http`, `directory:<file>`, `postgres:<name>`.
    pub origin: String,
    /// Where it is.
    pub status: Status,
    /// Records read.
    pub total: u64,
    /// Records stored as new events.
    pub ingested: u64,
    /// Records already stored (by an earlier import of the same data), skipped.
    pub duplicates: u64,
    /// Records that failed.
    pub failed: u64,
    /// The failed records, at most [`MAX_LISTED_ERRORS`] of them.
    pub errors: Vec<RowError>,
    /// Failed records beyond those listed.
    pub errors_not_listed: u64,
    /// Why the whole import failed (unreadable file, bad mapping), when it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// When it was created.
    pub created_at: Timestamp,
    /// When it finished.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<Timestamp>,
    /// The last row whose outcome the counts include (an interrupted import resumes
    /// after it).
    pub last_row: u64,
}

impl ImportReport {
    /// A new report, processing.
    pub fn new(id: String, source: String, origin: String) -> Self {
        ImportReport {
            id,
            source,
            origin,
            status: Status::Processing,
            total: 0,
            ingested: 0,
            duplicates: 0,
            failed: 0,
            errors: Vec::new(),
            errors_not_listed: 0,
            error: None,
            created_at: Timestamp::now(),
            finished_at: None,
            last_row: 0,
        }
    }

    /// Records a failed record.
    pub fn fail_row(&mut self, row: u64, message: String) {
        self.failed += 1;
        if self.errors.len() < MAX_LISTED_ERRORS {
            self.errors.push(RowError { row, message });
        } else {
            self.errors_not_listed += 1;
        }
    }

    /// Ends the import, with its status from the counts (or failed with `error`).
    pub fn finish(&mut self, error: Option<String>) {
        self.status =
            if error.is_some() || (self.failed > 0 && self.ingested + self.duplicates == 0) {
                Status::Failed
            } else if self.failed > 0 {
                Status::PartiallySucceeded
            } else {
                Status::Succeeded
            };
        self.error = error;
        self.finished_at = Some(Timestamp::now());
    }
}

/// Any import as stored: its report (a file import keeps its job beside it).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredImport {
    /// The report.
    pub report: ImportReport,
}

/// A new import id: a UUID v7, so ids sort by creation time.
pub fn new_id() -> String {
    format!("imp_{}", uuid::Uuid::now_v7().simple())
}

/// Turns records into encoded events for one import, counting into its report.
#[derive(Debug)]
pub struct Converter<'a> {
    mapping: &'a Mapping,
    store: &'a Store,
    dedup_window_ms: i64,
    pending: Vec<Vec<u8>>,
}

impl<'a> Converter<'a> {
    /// A converter for records mapped by `mapping`, checking earlier imports in `store`.
    pub fn new(mapping: &'a Mapping, store: &'a Store, dedup_window_ms: i64) -> Self {
        Converter {
            mapping,
            store,
            dedup_window_ms,
            pending: Vec::with_capacity(BATCH_RECORDS),
        }
    }

    /// Takes one record: an event to append, a duplicate, or a failure in `report`.
    ///
    /// # Errors
    ///
    /// A storage failure while checking for duplicates.
    pub fn take(&mut self, record: Record, report: &mut ImportReport) -> Result<(), StoreError> {
        report.total += 1;
        report.last_row = record.row;
        let built = record
            .fields
            .and_then(|fields| self.mapping.message(&report.source, &fields));
        let message = match built {
            Ok(message) => message,
            Err(why) => {
                report.fail_row(record.row, why);
                return Ok(());
            }
        };
        let now = Timestamp::now();
        if let Some(id) = &message.common().message_id
            && self
                .store
                .is_claimed(&report.source, id, now, self.dedup_window_ms)?
        {
            report.duplicates += 1;
            return Ok(());
        }
        match accept_imported(message, now) {
            Ok(encoded) => self.pending.push(encoded),
            Err((_, why)) => report.fail_row(record.row, why),
        }
        Ok(())
    }

    /// Whether a batch is ready to append.
    pub fn full(&self) -> bool {
        self.pending.len() >= BATCH_RECORDS
    }

    /// The events taken since the last call, to append; count them as ingested in the
    /// report once they are durable.
    pub fn drain(&mut self) -> Vec<Vec<u8>> {
        std::mem::take(&mut self.pending)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(json: Value) -> Map<String, Value> {
        json.as_object().expect("object").clone()
    }

    fn mapping(json: Value) -> Mapping {
        serde_json::from_value(json).expect("mapping parses")
    }

    #[test]
    fn cells_keep_their_text_unless_it_is_canonical() {
        assert_eq!(cell("12"), Some(json!(12)));
        assert_eq!(cell("-3"), Some(json!(-3)));
        assert_eq!(cell("12.5"), Some(json!(12.5)));
        assert_eq!(cell("0.5"), Some(json!(0.5)));
        assert_eq!(cell("true"), Some(json!(true)));
        for text in [
            "02134", "+1", "1e3", "12.", ".5", "00.5", "NaN", "inf", "True", "1 000",
        ] {
            assert_eq!(cell(text), Some(json!(text)), "{text}");
        }
        assert_eq!(cell(""), None);
    }

    #[test]
    fn records_become_messages_of_the_mapped_type() {
        let identify = mapping(json!({"user_id": "id", "email": "mail", "timestamp": "at",
                                      "traits": "first,plan"}));
        let message = identify
            .message(
                "src",
                &fields(
                    json!({"id": 7, "mail": "a@b.co", "at": "2024-02-01", "first": "Ann",
                               "plan": "pro", "other": "x"}),
                ),
            )
            .expect("valid");
        let json = serde_json::to_value(&message).expect("json");
        assert_eq!(json["type"], "identify");
        assert_eq!(json["userId"], "7");
        assert_eq!(json["timestamp"], "2024-02-01T00:00:00Z");
        assert_eq!(
            json["traits"],
            json!({"first": "Ann", "plan": "pro", "email": "a@b.co"})
        );
        assert!(
            json["messageId"]
                .as_str()
                .is_some_and(|id| id.starts_with("imp-"))
        );

        let track = mapping(
            json!({"type": "track", "anonymous_id": "anon", "event": "what",
                                   "properties": "*", "email": "mail"}),
        );
        let json = serde_json::to_value(
            track
                .message(
                    "src",
                    &fields(json!({"anon": "a1", "what": "Bought", "price": 3, "mail": "x@y.z"})),
                )
                .expect("valid"),
        )
        .expect("json");
        assert_eq!(json["event"], "Bought");
        assert_eq!(
            json["properties"],
            json!({"price": 3}),
            "mapped columns are not properties"
        );
        assert_eq!(json["context"]["traits"]["email"], "x@y.z");
    }

    #[test]
    fn message_ids_follow_the_content_not_the_column_order() {
        let a = fields(json!({"id": "1", "x": "2"}));
        let mut b = Map::new();
        b.insert("x".to_owned(), json!("2"));
        b.insert("id".to_owned(), json!("1"));
        assert_eq!(
            message_id("s", MessageType::Identify, &a),
            message_id("s", MessageType::Identify, &b)
        );
        assert_ne!(
            message_id("s", MessageType::Identify, &a),
            message_id("t", MessageType::Identify, &a)
        );
        assert_ne!(
            message_id("s", MessageType::Identify, &a),
            message_id("s", MessageType::Track, &a)
        );
    }

    #[test]
    fn times_are_read_in_the_usual_shapes() {
        assert_eq!(
            parse_time("2024-02-01T10:00:00+01:00").map(|t| t.to_string()),
            Ok("2024-02-01T09:00:00Z".to_owned())
        );
        assert_eq!(
            parse_time("2024-02-01 10:00:00").map(|t| t.to_string()),
            Ok("2024-02-01T10:00:00Z".to_owned())
        );
        assert_eq!(
            parse_time("1700000000").map(|t| t.to_string()),
            Ok("2023-11-14T22:13:20Z".to_owned())
        );
        assert!(
            parse_time("yesterday")
                .expect_err("not a time")
                .contains("yesterday")
        );
    }

    #[test]
    fn mappings_and_records_are_checked() {
        let columns = ["id".to_owned(), "name".to_owned()];
        assert!(
            mapping(json!({"user_id": "id", "traits": "name"}))
                .check(Some(&columns))
                .is_ok()
        );
        for (bad, says) in [
            (json!({"traits": "name"}), "user_id or an anonymous_id"),
            (json!({"user_id": "id", "type": "track"}), "event column"),
            (json!({"user_id": "id", "type": "group"}), "group_id"),
            (json!({"user_id": "id", "type": "alias"}), "previous_id"),
            (json!({"user_id": "id", "type": "purchase"}), "purchase"),
            (json!({"user_id": "id", "traits": "name,age"}), "\"age\""),
            (json!({"user_id": "uid"}), "\"uid\""),
        ] {
            let error = mapping(bad.clone())
                .check(Some(&columns))
                .expect_err("bad mapping");
            assert!(error.contains(says), "{bad}: {error}");
        }
        assert!(
            serde_json::from_value::<Mapping>(json!({"user_id": "id", "colour": "x"})).is_err()
        );

        let m = mapping(json!({"user_id": "id", "timestamp": "at"}));
        let error = m
            .message("s", &fields(json!({"id": "1", "at": "soon"})))
            .expect_err("bad time");
        assert!(error.contains("soon"), "{error}");
    }
}

//! The PostgreSQL source, a warehouse connector: the rows of a query imported
//! incrementally by a cursor column (an `updated_at` or an increasing id).
//!
//! Each run reads the rows whose cursor is at or after the last one stored, in cursor
//! order, streamed (PostgreSQL turns each row into JSON with `row_to_json`, so every
//! column type arrives as JSON), maps them like a file's records, appends them in
//! batches and stores the cursor after each durable batch. Rows at the stored cursor
//! are read again on purpose: rows sharing one cursor value are never skipped, and
//! those already imported are recognised by their `messageId` and counted as
//! duplicates. A run that brings anything new is recorded as an import
//! (`origin: postgres:<name>`), with per-row errors.

use std::sync::Arc;
use std::time::Duration;

use futures_util::{StreamExt, pin_mut};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::sync::watch;

use super::{Converter, ImportReport, Mapping, Record, new_id};
use crate::error::StoreError;
use crate::server::{AppState, source_id};
use crate::writer::Append;

/// How often a source is read by default.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(60);

/// A PostgreSQL source, as the config file gives it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostgresSource {
    /// A name, unique among the sources (its cursor is stored under it).
    pub name: String,
    /// Connection string: `postgres://user:password@host:port/db` or `host=... user=...`.
    pub url: String,
    /// The query whose rows are imported, such as `SELECT id, email, updated_at FROM users`.
    pub query: String,
    /// The column that orders the rows and marks progress.
    pub cursor: String,
    /// The write key of the source the rows are imported for.
    pub write_key: String,
    /// How columns become messages.
    pub mapping: Mapping,
    /// Milliseconds between two runs (default 60000).
    #[serde(default)]
    pub interval_ms: Option<u64>,
}

/// Why a run stopped.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    /// PostgreSQL refused or failed.
    #[error("postgres: {0}")]
    Postgres(#[from] tokio_postgres::Error),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The source is misconfigured.
    #[error("{0}")]
    Config(String),
}

fn quote(identifier: &str) -> String {
    format!("\"{}\"", identifier.replace('"', "\"\""))
}

impl PostgresSource {
    fn cursor_key(&self) -> String {
        format!("postgres_cursor:{}", self.name)
    }

    /// Runs the source every interval until `stop` turns true.
    pub async fn run(self, state: Arc<AppState>, mut stop: watch::Receiver<bool>) {
        let interval = self
            .interval_ms
            .map_or(DEFAULT_INTERVAL, Duration::from_millis);
        loop {
            match self.sync(&state).await {
                Ok(Some(report)) => tracing::info!(source = %self.name, id = %report.id,
                    ingested = report.ingested, failed = report.failed, "postgres rows imported"),
                Ok(None) => {}
                Err(error) => {
                    tracing::warn!(source = %self.name, %error, "postgres import run failed")
                }
            }
            tokio::select! {
                () = tokio::time::sleep(interval) => {}
                _ = stop.wait_for(|stopping| *stopping) => return,
            }
        }
    }

    /// One run: imports the rows at or after the stored cursor. Answers the run's report
    /// when it brought new rows or failures.
    ///
    /// # Errors
    ///
    /// When PostgreSQL or the store fails; what was committed before stays, with its
    /// cursor.
    pub async fn sync(&self, state: &AppState) -> Result<Option<ImportReport>, SyncError> {
        self.mapping.check(None).map_err(SyncError::Config)?;
        let (client, connection) =
            tokio_postgres::connect(&self.url, tokio_postgres::NoTls).await?;
        let connection = tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::warn!(%error, "postgres connection closed");
            }
        });
        let cursor = quote(&self.cursor);
        let probe = client
            .prepare(&format!(
                "SELECT q.{cursor} FROM ({}) q LIMIT 0",
                self.query
            ))
            .await?;
        let cursor_type = probe
            .columns()
            .first()
            .map(|c| c.type_().name().to_owned())
            .ok_or_else(|| SyncError::Config("the query has no cursor column".to_owned()))?;
        let sql = format!(
            "SELECT row_to_json(q)::text, (q.{cursor})::text FROM ({}) q \
             WHERE $1::text IS NULL OR q.{cursor} >= $1::text::{cursor_type} ORDER BY q.{cursor}",
            self.query
        );
        let store = state.store.clone();
        let from: Option<String> = store.meta_text(&self.cursor_key())?;
        let rows = client.query_raw(&sql, [from.as_deref()]).await?;
        pin_mut!(rows);

        let source = source_id(&self.write_key);
        let mut report = ImportReport::new(new_id(), source, format!("postgres:{}", self.name));
        let mut converter = Converter::new(&self.mapping, &store, state.dedup_window_ms);
        let mut row_number = 0;
        let mut last_cursor = None;
        while let Some(row) = rows.next().await {
            let row = row?;
            row_number += 1;
            let json: &str = row.try_get(0)?;
            last_cursor = row.try_get::<_, Option<String>>(1)?;
            let fields = match serde_json::from_str(json) {
                Ok(serde_json::Value::Object(fields)) => Ok(fields),
                _ => Err("the row did not convert to a JSON object".to_owned()),
            };
            converter.take(
                Record {
                    row: row_number,
                    fields,
                },
                &mut report,
            )?;
            if converter.full() {
                self.commit(state, &mut converter, &mut report, last_cursor.as_deref())
                    .await?;
            }
        }
        self.commit(state, &mut converter, &mut report, last_cursor.as_deref())
            .await?;
        drop(client);
        let _ = connection.await;
        if report.ingested + report.failed == 0 {
            return Ok(None);
        }
        report.finish(None);
        store.put_import(&report.id, &json!({"report": report}))?;
        Ok(Some(report))
    }

    async fn commit(
        &self,
        state: &AppState,
        converter: &mut Converter<'_>,
        report: &mut ImportReport,
        cursor: Option<&str>,
    ) -> Result<(), SyncError> {
        let events = converter.drain();
        let count = events.len() as u64;
        if count > 0 {
            state
                .writer
                .append(Append {
                    source: Arc::from(report.source.as_str()),
                    events,
                    received: count,
                    rejected: Vec::new(),
                })
                .await?;
            report.ingested += count;
        }
        if let Some(cursor) = cursor {
            state.store.put_meta_text(&self.cursor_key(), cursor)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers_are_quoted() {
        assert_eq!(quote("updated_at"), "\"updated_at\"");
        assert_eq!(quote("we\"ird"), "\"we\"\"ird\"");
    }
}

//! The imports API.
//!
//! - `POST /v1/imports?type=identify&user_id=id&traits=first_name,plan&...`: the body is
//!   the file (CSV or NDJSON, gzip accepted with `Content-Encoding: gzip`), the query is
//!   the [`Mapping`] (and `source=src_…` with the admin token when the collector has
//!   several sources). Authenticated with a secret: the admin token, or the source's
//!   import key (`Authorization: Bearer`, or HTTP Basic with the key as user), never the
//!   write key, which ships in web pages. The file is streamed to disk (never held in
//!   memory), then answered `202 Accepted` with the import's report, while the importer
//!   reads it. A source has at most [`MAX_OPEN_IMPORTS`] imports uploading or waiting.
//! - `GET /v1/imports/{id}`: the report, for the admin token or the source's import key.
//! - `GET /v1/imports`: the latest imports (admin token).

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, RawQuery, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::StreamExt;
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;

use super::job::{Finish, ImportJob};
use super::{Format, ImportReport, Mapping, StoredImport, new_id};
use crate::admin::{bearer_token, blocking, is_admin};
use crate::disk::Disk;
use crate::error::ApiError;
use crate::ingest::basic_auth_key;
use crate::server::AppState;

/// Imports listed by `GET /v1/imports`.
const LISTED_IMPORTS: usize = 100;

/// The most imports one source may have uploading or waiting for the importer; more
/// are answered 429.
pub const MAX_OPEN_IMPORTS: usize = 4;

/// The routes (each checks its own credentials).
pub fn routes() -> Router<Arc<AppState>> {
    Router::new()
        .route("/v1/imports", post(create).get(list))
        .route("/v1/imports/{id}", get(show))
}

/// The format from the mapping, else from the Content-Type.
fn format(mapping: &Mapping, headers: &HeaderMap) -> Result<Format, ApiError> {
    if let Some(format) = mapping.format {
        return Ok(format);
    }
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    match content_type.split(';').next().map(str::trim) {
        Some("text/csv") => Ok(Format::Csv),
        Some("application/x-ndjson" | "application/jsonl" | "application/x-jsonlines") => {
            Ok(Format::Ndjson)
        }
        _ => Err(ApiError::invalid(
            "unknown_format",
            "say the format: format=csv or format=ndjson, or Content-Type text/csv or application/x-ndjson",
        )),
    }
}

fn gzip(headers: &HeaderMap) -> Result<bool, ApiError> {
    match headers.get(header::CONTENT_ENCODING) {
        None => Ok(false),
        Some(v) if v.as_bytes().eq_ignore_ascii_case(b"gzip") => Ok(true),
        Some(v) if v.as_bytes().eq_ignore_ascii_case(b"identity") => Ok(false),
        Some(_) => Err(ApiError::invalid(
            "unsupported_encoding",
            "Content-Encoding must be gzip or nothing",
        )),
    }
}

/// The secret a request carries: a bearer token, or an HTTP Basic user.
fn credential(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    if let Some(token) = bearer_token(headers) {
        return Ok(Some(token.to_owned()));
    }
    basic_auth_key(headers)
}

/// The source an import is for: the admin token imports into the source the query
/// names (or the only one), an import key into its own source.
fn import_source(
    state: &AppState,
    headers: &HeaderMap,
    named: Option<&str>,
) -> Result<Arc<str>, ApiError> {
    let key = credential(headers)?.ok_or(ApiError::Unauthorized(
        "imports need the admin token or the source's import key (Authorization: Bearer)",
    ))?;
    if is_admin(state, headers) {
        let mut sources = state.source_ids();
        return match named {
            Some(named) => state
                .source_ids()
                .find(|s| ***s == *named)
                .cloned()
                .ok_or_else(|| ApiError::invalid("unknown_source", format!("no source {named:?}"))),
            None => match (sources.next(), sources.next()) {
                (Some(only), None) => Ok(only.clone()),
                _ => Err(ApiError::invalid(
                    "source_required",
                    "this collector has several sources: say which with source=src_…",
                )),
            },
        };
    }
    match state.import_source_for(&key) {
        Some(source) if named.is_none_or(|n| *n == *source) => Ok(source),
        Some(_) => Err(ApiError::invalid(
            "unknown_source",
            "the import key belongs to another source",
        )),
        None if state.source_for(&key).is_some() => Err(ApiError::Unauthorized(
            "the write key cannot import (it ships in web pages): use the admin token or the source's import key",
        )),
        None => Err(ApiError::Unauthorized("unknown import key")),
    }
}

/// The query of `POST /v1/imports`: the mapping, and `source` apart.
fn import_query(query: Option<&str>) -> Result<(Mapping, Option<String>), ApiError> {
    let invalid =
        |e: serde_urlencoded::de::Error| ApiError::invalid("invalid_mapping", e.to_string());
    let mut pairs: Vec<(String, String)> =
        serde_urlencoded::from_str(query.unwrap_or("")).map_err(invalid)?;
    let source = pairs
        .iter()
        .position(|(name, _)| name == "source")
        .map(|i| pairs.remove(i).1);
    let rest = serde_urlencoded::to_string(&pairs)
        .map_err(|e| ApiError::invalid("invalid_mapping", e.to_string()))?;
    Ok((serde_urlencoded::from_str(&rest).map_err(invalid)?, source))
}

async fn create(
    State(state): State<Arc<AppState>>,
    RawQuery(query): RawQuery,
    request: Request,
) -> Result<impl IntoResponse, ApiError> {
    state.disk.check()?;
    let (mapping, named) = import_query(query.as_deref())?;
    let source = import_source(&state, request.headers(), named.as_deref())?;
    let slot =
        state
            .importer
            .open_slot(&source, MAX_OPEN_IMPORTS)
            .ok_or(ApiError::RateLimited {
                retry_after_secs: 10,
            })?;
    mapping
        .check(None)
        .map_err(|e| ApiError::invalid("invalid_mapping", e))?;
    let format = format(&mapping, request.headers())?;
    let gzip = gzip(request.headers())?;

    let id = new_id();
    let dir = state.imports_dir.clone();
    tokio::fs::create_dir_all(&dir)
        .await
        .map_err(|e| ApiError::Unavailable(format!("cannot store the upload: {e}")))?;
    let path = dir.join(format!("{id}.upload"));
    if let Err(error) = spool(
        Body::new(request.into_body()),
        &path,
        state.max_import_bytes,
        &state.disk,
    )
    .await
    {
        let _ = tokio::fs::remove_file(&path).await;
        return Err(error);
    }
    let job = ImportJob {
        report: ImportReport::new(id, source.to_string(), "http".to_owned()),
        mapping,
        format,
        gzip,
        file: path,
        finish: Finish::Delete,
    };
    let report = job.report.clone();
    let importer = state.importer.clone();
    blocking(move || importer.submit(&job, Some(slot))).await?;
    Ok((StatusCode::ACCEPTED, Json(report)))
}

/// Writes the body to `path` and syncs it, refusing more than `max_bytes`.
async fn spool(
    body: Body,
    path: &std::path::Path,
    max_bytes: u64,
    disk: &Disk,
) -> Result<(), ApiError> {
    let unavailable =
        |e: std::io::Error| ApiError::Unavailable(format!("cannot store the upload: {e}"));
    let mut file = tokio::fs::File::create(path).await.map_err(unavailable)?;
    let mut written = 0u64;
    let mut stream = body.into_data_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| ApiError::invalid("upload_interrupted", e.to_string()))?;
        written += chunk.len() as u64;
        disk.check()?;
        if written > max_bytes {
            return Err(ApiError::too_large(
                "file_too_large",
                format!("an import file may be at most {max_bytes} bytes"),
            ));
        }
        file.write_all(&chunk).await.map_err(unavailable)?;
    }
    file.sync_all().await.map_err(unavailable)?;
    Ok(())
}

async fn show(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Json<ImportReport>, ApiError> {
    let admin = is_admin(&state, &headers);
    let source = if admin {
        None
    } else {
        let key = credential(&headers)?.ok_or(ApiError::Unauthorized(
            "an import's report needs the admin token or the source's import key",
        ))?;
        Some(
            state
                .import_source_for(&key)
                .ok_or(ApiError::Unauthorized("unknown import key"))?,
        )
    };
    let store = state.store.clone();
    let key = id.clone();
    let found: Option<StoredImport> = blocking(move || store.import(&key)).await?;
    match found {
        Some(found) if admin || source.is_some_and(|s| *s == *found.report.source) => {
            Ok(Json(found.report))
        }
        _ => Err(ApiError::NotFound(format!("no import {id:?}"))),
    }
}

async fn list(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    if !is_admin(&state, &headers) {
        return Err(ApiError::Unauthorized(
            "listing imports needs Authorization: Bearer <admin token>",
        ));
    }
    let store = state.store.clone();
    let found: Vec<StoredImport> = blocking(move || store.imports(LISTED_IMPORTS)).await?;
    let reports: Vec<ImportReport> = found.into_iter().map(|i| i.report).collect();
    Ok(Json(json!({"imports": reports})))
}

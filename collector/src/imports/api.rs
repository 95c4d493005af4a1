//! The imports API.
//!
//! - `POST /v1/imports?type=identify&user_id=id&traits=first_name,plan&...`: the body is
//!   the file (CSV or NDJSON, gzip accepted with `Content-Encoding: gzip`), the query is
//!   the [`Mapping`]. Authenticated with the source's write key, like every ingest
//!   endpoint. The file is streamed to disk (never held in memory), then answered
//!   `202 Accepted` with the import's report, while the importer reads it.
//! - `GET /v1/imports/{id}`: the report, for the admin token or the source's write key.
//! - `GET /v1/imports`: the latest imports (admin token).

use std::sync::Arc;

use axum::body::Body;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::StreamExt;
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;

use super::job::{Finish, ImportJob};
use super::{Format, ImportReport, Mapping, StoredImport, new_id};
use crate::admin::{blocking, is_admin};
use crate::error::ApiError;
use crate::ingest::basic_auth_key;
use crate::server::AppState;

/// Imports listed by `GET /v1/imports`.
const LISTED_IMPORTS: usize = 100;

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

async fn create(
    State(state): State<Arc<AppState>>,
    mapping: Result<Query<Mapping>, QueryRejection>,
    request: Request,
) -> Result<impl IntoResponse, ApiError> {
    let source = state.authenticate(basic_auth_key(request.headers())?.as_deref())?;
    let Query(mapping) =
        mapping.map_err(|e| ApiError::invalid("invalid_mapping", e.body_text()))?;
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
    blocking(move || importer.submit(&job)).await?;
    Ok((StatusCode::ACCEPTED, Json(report)))
}

/// Writes the body to `path` and syncs it, refusing more than `max_bytes`.
async fn spool(body: Body, path: &std::path::Path, max_bytes: u64) -> Result<(), ApiError> {
    let unavailable =
        |e: std::io::Error| ApiError::Unavailable(format!("cannot store the upload: {e}"));
    let mut file = tokio::fs::File::create(path).await.map_err(unavailable)?;
    let mut written = 0u64;
    let mut stream = body.into_data_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| ApiError::invalid("upload_interrupted", e.to_string()))?;
        written += chunk.len() as u64;
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
        Some(state.authenticate(basic_auth_key(&headers)?.as_deref())?)
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

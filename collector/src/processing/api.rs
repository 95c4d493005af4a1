//! The admin API of processing: each source's rules, and the failed-events store with
//! replay.
//!
//! - `GET /v1/sources`: the sources (write keys' ids) and the rules in force for each.
//! - `GET|PUT|DELETE /v1/sources/{source}/rules`: a source's own rules (`default` for
//!   the rules of sources without their own). `PUT` checks and compiles them first: a
//!   bad rule is a 400 naming it, and the rules in force stay.
//! - `GET /v1/failed?source=&before=&limit=`: failed events, newest first, with reasons;
//!   `DELETE /v1/failed/{seq}` forgets one. They are kept `--failed-retention` (30 days)
//!   and `--max-failed-events` (100,000) at most, the oldest going first.
//! - `POST /v1/failed/replay` (`{"seqs": [...]}`, or `{}` for every failed event up to
//!   [`MAX_REPLAY`]): puts them back on the log as they came in, so they run through
//!   the rules in force now; they leave the failed store once the log has them.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{Value, json};

use super::{DEFAULT_RULES, SourceRules};
use crate::admin::{blocking, limit, next_before};
use crate::error::ApiError;
use crate::server::AppState;
use crate::writer::Append;

/// Failed events answered when no `limit` is given.
const DEFAULT_FAILED_LIMIT: usize = 100;
/// The most failed events one request lists or replays.
pub const MAX_REPLAY: usize = 1_000;

/// The routes, to be put behind the admin check.
pub fn routes() -> Router<Arc<AppState>> {
    Router::new()
        .route("/v1/sources", get(sources))
        .route(
            "/v1/sources/{source}/rules",
            get(get_rules).put(put_rules).delete(delete_rules),
        )
        .route("/v1/failed", get(failed))
        .route("/v1/failed/{seq}", axum::routing::delete(delete_failed))
        .route("/v1/failed/replay", post(replay))
}

fn known_source(state: &AppState, source: &str) -> Result<(), ApiError> {
    if source == DEFAULT_RULES || state.source_ids().any(|id| **id == *source) {
        Ok(())
    } else {
        Err(ApiError::NotFound(format!(
            "no source {source:?}: use a source id from GET /v1/sources, or \"{DEFAULT_RULES}\""
        )))
    }
}

/// An empty body reads as `{}` (no rules, replay everything).
fn parse_body<T: for<'de> Deserialize<'de>>(
    body: &[u8],
    code: &'static str,
) -> Result<T, ApiError> {
    let blank = body.iter().all(u8::is_ascii_whitespace);
    ApiError::json_body(if blank { b"{}" } else { body }, code)
}

async fn sources(State(state): State<Arc<AppState>>) -> Json<Value> {
    let configured = state.rules.all();
    let sources: Vec<Value> = state
        .source_ids()
        .map(|id| {
            json!({"id": &**id, "own_rules": configured.contains_key(&**id),
                   "rules": state.rules.for_source(id).rules()})
        })
        .collect();
    Json(json!({"sources": sources, "default_rules": configured.get(DEFAULT_RULES)}))
}

async fn get_rules(
    State(state): State<Arc<AppState>>,
    Path(source): Path<String>,
) -> Result<Json<Value>, ApiError> {
    known_source(&state, &source)?;
    let own = state.rules.configured(&source);
    Ok(Json(json!({
        "source": source,
        "own_rules": own.is_some(),
        "rules": own.unwrap_or_else(|| state.rules.for_source(&source).rules().clone()),
    })))
}

async fn put_rules(
    State(state): State<Arc<AppState>>,
    Path(source): Path<String>,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    known_source(&state, &source)?;
    let rules: SourceRules = parse_body(&body, "invalid_rules")?;
    rules
        .clone()
        .compile()
        .map_err(|e| ApiError::invalid("invalid_rules", e))?;
    ApiError::unless_reads_back(&rules, "rules")?;
    let store = state.store.clone();
    let (key, stored) = (source.clone(), rules.clone());
    blocking(move || store.put_rules(&key, Some(&stored))).await?;
    state
        .rules
        .set(&source, rules.clone())
        .map_err(|e| ApiError::invalid("invalid_rules", e))?;
    Ok(Json(
        json!({"source": source, "own_rules": true, "rules": rules}),
    ))
}

async fn delete_rules(
    State(state): State<Arc<AppState>>,
    Path(source): Path<String>,
) -> Result<Json<Value>, ApiError> {
    known_source(&state, &source)?;
    let store = state.store.clone();
    let key = source.clone();
    blocking(move || store.put_rules(&key, None)).await?;
    let removed = state.rules.remove(&source);
    Ok(Json(json!({"source": source, "removed": removed})))
}

/// The filters of `GET /v1/failed`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FailedQuery {
    source: Option<String>,
    before: Option<u64>,
    limit: Option<usize>,
}

async fn failed(
    State(state): State<Arc<AppState>>,
    query: Result<Query<FailedQuery>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let Query(query) = query?;
    let limit = limit(query.limit, DEFAULT_FAILED_LIMIT, MAX_REPLAY)?;
    let store = state.store.clone();
    let found =
        blocking(move || store.failed_events(query.source.as_deref(), query.before, limit)).await?;
    let next_before = next_before(&found, limit, |e| e.seq);
    Ok(Json(json!({"failed": found, "next_before": next_before})))
}

/// `DELETE /v1/failed/{seq}`: forgets one failed event.
async fn delete_failed(
    State(state): State<Arc<AppState>>,
    Path(seq): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let seq: u64 = seq.parse().map_err(|_| {
        ApiError::invalid(
            "invalid_seq",
            format!("{seq:?} is not a failed event's seq"),
        )
    })?;
    let store = state.store.clone();
    let found = blocking(move || -> Result<bool, ApiError> {
        let found = !store.failed_by_seq(&[seq])?.is_empty();
        store.remove_failed(&[seq])?;
        store.flush()?;
        Ok(found)
    })
    .await?;
    if found {
        Ok(Json(json!({"deleted": seq})))
    } else {
        Err(ApiError::NotFound(format!("no failed event {seq}")))
    }
}

/// The body of `POST /v1/failed/replay`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ReplayRequest {
    /// The failed events to replay; all of them (up to [`MAX_REPLAY`]) when absent.
    seqs: Option<Vec<u64>>,
}

async fn replay(State(state): State<Arc<AppState>>, body: Bytes) -> Result<Json<Value>, ApiError> {
    let request: ReplayRequest = parse_body(&body, "invalid_replay")?;
    if request.seqs.as_ref().is_some_and(|s| s.len() > MAX_REPLAY) {
        return Err(ApiError::too_large(
            "too_many_events",
            format!("replay at most {MAX_REPLAY} events per request"),
        ));
    }
    let store = state.store.clone();
    let events = blocking(move || match request.seqs {
        Some(seqs) => store.failed_by_seq(&seqs),
        None => store.failed_events(None, None, MAX_REPLAY),
    })
    .await?;
    let mut by_source: BTreeMap<String, (Vec<u64>, Vec<Vec<u8>>)> = BTreeMap::new();
    for event in events {
        let (seqs, messages) = by_source.entry(event.source).or_default();
        seqs.push(event.seq);
        messages.push(
            serde_json::to_vec(&event.message).map_err(|e| ApiError::Unavailable(e.to_string()))?,
        );
    }
    let mut replayed = 0;
    for (source, (seqs, messages)) in by_source {
        let count = messages.len() as u64;
        state
            .writer
            .append(Append {
                source: Arc::from(source),
                events: messages,
                received: count,
                rejected: Vec::new(),
            })
            .await?;
        let store = state.store.clone();
        blocking(move || store.remove_failed(&seqs)).await?;
        replayed += count;
    }
    Ok(Json(json!({"replayed": replayed})))
}

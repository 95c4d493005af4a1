//! The segments API (identity resolution must be on).
//!
//! - `GET /v1/segments`, `POST /v1/segments` (`{"key", "name", "definition"}`);
//!   `GET|PUT|DELETE /v1/segments/{key}`. A definition that does not parse is a 400 with
//!   the line and column; a reference to an unknown segment or a cycle is a 400. Each
//!   segment answers with its `progress`: `computing` (with `done` of `total` profiles)
//!   while a new or edited definition is computed for existing profiles, then `ready`.
//! - `POST /v1/segments/preview` (`{"definition"}`): the member count and a sample,
//!   computed from scratch, before saving.
//! - `GET /v1/segments/{key}/members?limit=&after=`: members, by profile id, paged.
//! - `GET /v1/segments/{key}/members.csv`: every member as CSV (profile id, user ids,
//!   emails, phones, traits as JSON).
//! - `GET /v1/profiles/{id}/segments`: the segments a profile is a member of.
//! - `GET /v1/membership-changes?after=&limit=&segment=&profile_id=`: every enter and
//!   exit, numbered in order, oldest first (the feed activation consumes).
//!
//! Members and memberships are read from what [`super::live`] keeps current.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::IntoResponse as _;
use axum::routing::{get, post};
use axum::{Json, Router};
use jiff::Timestamp;
use kith_identity::profile::Profile;
use kith_segments::ast::Expr;
use kith_segments::eval::EventRecord;
use kith_segments::membership::{Catalog, Change, State as Memberships, Subject};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::live::{Membership, MembershipChange, Progress, event_record};
use super::{Segment, all};
use crate::admin::{blocking, limit};
use crate::error::{ApiError, StoreError};
use crate::identity::Identity;
use crate::profiles::identity;
use crate::server::AppState;
use crate::store::Store;

/// Members answered when no `limit` is given.
const DEFAULT_LIMIT: usize = 100;
/// The most members or changes one request answers.
const MAX_LIMIT: usize = 1_000;
/// Profiles listed in a preview's sample.
const SAMPLE: usize = 10;

/// The routes, to be put behind the admin check.
pub fn routes() -> Router<Arc<AppState>> {
    Router::new()
        .route("/v1/segments", get(list).post(create))
        .route("/v1/segments/preview", post(preview))
        .route("/v1/segments/{key}", get(show).put(update).delete(remove))
        .route("/v1/segments/{key}/members", get(members))
        .route("/v1/segments/{key}/members.csv", get(export))
        .route("/v1/profiles/{id}/segments", get(profile_segments))
        .route("/v1/membership-changes", get(changes))
}

/// The membership engine, or why there is none.
fn membership(state: &AppState) -> Result<Arc<Membership>, ApiError> {
    identity(state)?;
    state
        .membership
        .clone()
        .ok_or_else(|| ApiError::Unavailable("segments are not running".to_owned()))
}

/// A segment as the API answers it: the stored record and its progress.
#[derive(Debug, Serialize)]
struct Answer {
    #[serde(flatten)]
    segment: Segment,
    progress: Option<Progress>,
}

fn answer(membership: &Membership, segment: Segment) -> Answer {
    Answer {
        progress: membership.progress(&segment.key),
        segment,
    }
}

/// The body of a create, update or preview.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Body {
    #[serde(default)]
    key: Option<String>,
    #[serde(default)]
    name: Option<String>,
    definition: String,
}

/// Parses a definition off the async runtime: the parser's work grows with the text.
async fn parse_definition(definition: String) -> Result<Expr, ApiError> {
    blocking(move || {
        kith_segments::parse(&definition)
            .map_err(|e| ApiError::invalid("invalid_definition", e.to_string()))
    })
    .await
}

/// Checks that `tree`, stored as `key`, references only known segments and no cycle.
fn check_references(
    key: &str,
    tree: &Expr,
    others: &BTreeMap<String, Segment>,
) -> Result<(), ApiError> {
    let references = |k: &str| -> BTreeSet<String> {
        if k == key {
            tree.inputs().segments
        } else {
            others
                .get(k)
                .map(|s| s.tree.inputs().segments)
                .unwrap_or_default()
        }
    };
    let mut stack: Vec<(String, Vec<String>)> = vec![(key.to_owned(), vec![key.to_owned()])];
    while let Some((current, path)) = stack.pop() {
        for next in references(&current) {
            if next == key {
                return Err(ApiError::invalid(
                    "segment_cycle",
                    format!(
                        "segments would reference each other in a cycle: {} → {key}",
                        path.join(" → ")
                    ),
                ));
            }
            if next != key && !others.contains_key(&next) {
                return Err(ApiError::invalid(
                    "unknown_segment",
                    format!("in_segment({next:?}): no such segment"),
                ));
            }
            if !path.contains(&next) {
                let mut longer = path.clone();
                longer.push(next.clone());
                stack.push((next, longer));
            }
        }
    }
    Ok(())
}

/// The live profiles meeting `tree` (evaluated with the stored segments it references),
/// in id order: a preview, computed from scratch.
fn members_of(
    store: &Store,
    identity: &Identity,
    membership: &Membership,
    tree: &Expr,
) -> Result<Vec<Profile>, StoreError> {
    const PREVIEW: &str = "\0preview";
    let mut segments: Vec<(String, Expr)> =
        all(store)?.into_values().map(|s| (s.key, s.tree)).collect();
    segments.push((PREVIEW.to_owned(), tree.clone()));
    let catalog = Catalog::new(segments);
    let now = Timestamp::now();
    let mut found = Vec::new();
    for profile in identity.live_profiles()? {
        let traits = profile.trait_values();
        let identifiers = membership.identifier_types(&profile, &catalog)?;
        let mut state = Memberships::default();
        catalog.update(
            &mut state,
            &Change::everything(),
            Subject {
                traits: &traits,
                identifiers: &identifiers,
            },
            || -> Result<Vec<EventRecord>, StoreError> {
                let seqs = identity.event_seqs(&profile.id)?;
                Ok(store
                    .events_by_seq(&seqs)?
                    .iter()
                    .filter_map(|e| event_record(&e.message))
                    .collect())
            },
            now,
        )?;
        if state.segments.contains(PREVIEW) {
            found.push(profile);
        }
    }
    found.sort_by(|a, b| a.id.cmp(&b.id));
    Ok(found)
}

fn not_found(key: &str) -> ApiError {
    ApiError::NotFound(format!("no segment {key:?}"))
}

async fn list(State(state): State<Arc<AppState>>) -> Result<Json<Value>, ApiError> {
    let membership = membership(&state)?;
    let store = state.store.clone();
    let (segments, broken) =
        blocking(move || Ok::<_, StoreError>((all(&store)?, super::broken(&store)?))).await?;
    let mut answers: Vec<Value> = segments
        .into_values()
        .map(|s| json!(answer(&membership, s)))
        .collect();
    answers.extend(
        broken
            .into_iter()
            .map(|(key, why)| json!({"key": key, "broken": why})),
    );
    Ok(Json(json!({"segments": answers})))
}

async fn show(
    State(state): State<Arc<AppState>>,
    Path(key): Path<String>,
) -> Result<Json<Answer>, ApiError> {
    let membership = membership(&state)?;
    let store = state.store.clone();
    let wanted = key.clone();
    let found = blocking(move || all(&store).map(|mut m| m.remove(&wanted))).await?;
    found
        .map(|s| Json(answer(&membership, s)))
        .ok_or_else(|| not_found(&key))
}

async fn save(
    state: &Arc<AppState>,
    key: String,
    name: Option<String>,
    definition: String,
    create: bool,
) -> Result<Answer, ApiError> {
    let membership = membership(state)?;
    if key.is_empty()
        || !key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    {
        return Err(ApiError::invalid(
            "invalid_key",
            "a segment key is letters, digits, '_' and '-'",
        ));
    }
    let tree = parse_definition(definition.clone()).await?;
    let store = state.store.clone();
    blocking(move || -> Result<Answer, ApiError> {
        let mut segments = all(&store)?;
        let existing = segments.remove(&key);
        // A stored segment that cannot be read still exists: PUT replaces it.
        let exists = existing.is_some() || super::broken(&store)?.contains_key(&key);
        match (exists, create) {
            (true, true) => {
                return Err(ApiError::invalid(
                    "segment_exists",
                    format!("segment {key:?} exists; PUT to change it"),
                ));
            }
            (false, false) => return Err(not_found(&key)),
            _ => {}
        }
        check_references(&key, &tree, &segments)?;
        let now = Timestamp::now();
        let segment = Segment {
            name: name
                .or_else(|| existing.as_ref().map(|e| e.name.clone()))
                .unwrap_or_else(|| key.clone()),
            key: key.clone(),
            definition,
            tree,
            created_at: existing.map_or(now, |e| e.created_at),
            updated_at: now,
        };
        ApiError::unless_reads_back(&segment, "segment")?;
        store.put_segment(&key, Some(&segment))?;
        segments.insert(key.clone(), segment.clone());
        let stored: Vec<Segment> = segments.into_values().collect();
        membership.segment_saved(&stored, &key);
        Ok(answer(&membership, segment))
    })
    .await
}

async fn create(
    State(state): State<Arc<AppState>>,
    body: Bytes,
) -> Result<(StatusCode, Json<Answer>), ApiError> {
    let body: Body = ApiError::json_body(&body, "invalid_body")?;
    let key = body
        .key
        .ok_or_else(|| ApiError::invalid("invalid_body", "a segment needs a \"key\""))?;
    let segment = save(&state, key, body.name, body.definition, true).await?;
    Ok((StatusCode::CREATED, Json(segment)))
}

async fn update(
    State(state): State<Arc<AppState>>,
    Path(key): Path<String>,
    body: Bytes,
) -> Result<Json<Answer>, ApiError> {
    let body: Body = ApiError::json_body(&body, "invalid_body")?;
    if body.key.as_ref().is_some_and(|k| *k != key) {
        return Err(ApiError::invalid("invalid_body", "the key cannot change"));
    }
    Ok(Json(
        save(&state, key, body.name, body.definition, false).await?,
    ))
}

async fn remove(
    State(state): State<Arc<AppState>>,
    Path(key): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let membership = membership(&state)?;
    let activation = state.activation.clone();
    let store = state.store.clone();
    let wanted = key.clone();
    blocking(move || -> Result<(), ApiError> {
        let mut segments = all(&store)?;
        if !segments.contains_key(&wanted) {
            if super::broken(&store)?.contains_key(&wanted) {
                store.put_segment::<Segment>(&wanted, None)?;
                return Ok(());
            }
            return Err(not_found(&wanted));
        }
        if let Some(user) = segments
            .values()
            .find(|s| s.tree.inputs().segments.contains(&wanted))
        {
            return Err(ApiError::invalid(
                "segment_in_use",
                format!(
                    "segment {:?} references it; change that one first",
                    user.key
                ),
            ));
        }
        if let Some(campaign) = activation
            .map(|a| a.campaigns())
            .transpose()?
            .into_iter()
            .flatten()
            .find(|c| c.trigger.segment() == wanted)
        {
            return Err(ApiError::invalid(
                "segment_in_use",
                format!(
                    "campaign {:?} is triggered by it; delete that one first",
                    campaign.id
                ),
            ));
        }
        store.put_segment::<Segment>(&wanted, None)?;
        segments.remove(&wanted);
        let stored: Vec<Segment> = segments.into_values().collect();
        membership.segment_deleted(&stored, &wanted);
        Ok(())
    })
    .await?;
    Ok(Json(json!({"deleted": key})))
}

async fn preview(State(state): State<Arc<AppState>>, body: Bytes) -> Result<Json<Value>, ApiError> {
    let identity = identity(&state)?;
    let membership = membership(&state)?;
    let body: Body = ApiError::json_body(&body, "invalid_body")?;
    let tree = parse_definition(body.definition).await?;
    let segments = {
        let store = state.store.clone();
        blocking(move || all(&store)).await?
    };
    check_references("(preview)", &tree, &segments)?;
    let store = state.store.clone();
    let found = blocking(move || members_of(&store, &identity, &membership, &tree)).await?;
    let sample: Vec<&String> = found.iter().take(SAMPLE).map(|p| &p.id).collect();
    Ok(Json(json!({"count": found.len(), "sample": sample})))
}

/// The paging of `GET /v1/segments/{key}/members`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Page {
    limit: Option<usize>,
    after: Option<String>,
}

async fn members(
    State(state): State<Arc<AppState>>,
    Path(key): Path<String>,
    page: Result<Query<Page>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let membership = membership(&state)?;
    let Query(page) = page?;
    let limit = limit(page.limit, DEFAULT_LIMIT, MAX_LIMIT)?;
    let store = state.store.clone();
    let wanted = key.clone();
    let engine = membership.clone();
    let (members, total) = blocking(move || -> Result<Option<_>, StoreError> {
        if !all(&store)?.contains_key(&wanted) {
            return Ok(None);
        }
        let members = engine.members(&wanted, page.after.as_deref(), limit)?;
        Ok(Some((members, engine.member_count(&wanted)?)))
    })
    .await?
    .ok_or_else(|| not_found(&key))?;
    let next_after = (members.len() == limit)
        .then(|| members.last().cloned())
        .flatten();
    Ok(Json(json!({
        "segment": key,
        "progress": membership.progress(&key),
        "total": total,
        "members": members,
        "next_after": next_after,
    })))
}

/// One CSV field: quoted when it holds a comma, a quote or a line break, and, when it
/// starts with `=`, `+`, `-`, `@`, a tab or a carriage return (which spreadsheets read
/// as a formula), prefixed with `'` so that it stays text (OWASP's CSV injection rule).
pub(crate) fn csv_field(text: &str) -> String {
    let text = if text.starts_with(['=', '+', '-', '@', '\t', '\r']) {
        std::borrow::Cow::Owned(format!("'{text}"))
    } else {
        std::borrow::Cow::Borrowed(text)
    };
    if text.contains([',', '"', '\n', '\r', '\'']) {
        format!("\"{}\"", text.replace('"', "\"\""))
    } else {
        text.into_owned()
    }
}

/// How many CSV bytes are gathered before they are sent on.
const CSV_CHUNK: usize = 64 * 1024;

async fn export(
    State(state): State<Arc<AppState>>,
    Path(key): Path<String>,
) -> Result<axum::response::Response, ApiError> {
    let membership = membership(&state)?;
    let identity = identity(&state)?;
    let store = state.store.clone();
    let wanted = key.clone();
    if !blocking(move || all(&store).map(|s| s.contains_key(&wanted))).await? {
        return Err(not_found(&key));
    }
    // Streamed: rows are written on a blocking thread and sent a chunk at a time, so a
    // segment of millions never sits in memory.
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<String, std::io::Error>>(4);
    tokio::task::spawn_blocking(move || {
        let mut out = String::from("profile_id,user_ids,emails,phones,traits\n");
        let written = membership.each_member(&key, |id| {
            let Some(profile) = identity.profile(id)? else {
                return Ok(());
            };
            let of = |kind: &str| {
                profile
                    .identifiers
                    .iter()
                    .filter(|i| i.kind == kind)
                    .map(|i| i.value.clone())
                    .collect::<Vec<_>>()
                    .join(" ")
            };
            let traits = Value::Object(profile.trait_values()).to_string();
            let row = [
                profile.id.clone(),
                of("user_id"),
                of("email"),
                of("phone"),
                traits,
            ];
            let fields: Vec<String> = row.iter().map(|f| csv_field(f)).collect();
            out.push_str(&fields.join(","));
            out.push('\n');
            if out.len() >= CSV_CHUNK && tx.blocking_send(Ok(std::mem::take(&mut out))).is_err() {
                // The client went away.
                return Err(StoreError::ShuttingDown);
            }
            Ok(())
        });
        let last = match written {
            Ok(()) => Ok(out),
            Err(StoreError::ShuttingDown) => return,
            Err(error) => {
                tracing::error!(%error, "a members export stopped");
                Err(std::io::Error::other(error.to_string()))
            }
        };
        let _ = tx.blocking_send(last);
    });
    let body = axum::body::Body::from_stream(tokio_stream::wrappers::ReceiverStream::new(rx));
    Ok((
        [(axum::http::header::CONTENT_TYPE, "text/csv; charset=utf-8")],
        body,
    )
        .into_response())
}

async fn profile_segments(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let membership = membership(&state)?;
    let identity = identity(&state)?;
    let wanted = id.clone();
    let found = blocking(
        move || -> Result<Option<(String, BTreeSet<String>)>, StoreError> {
            let Some(profile) = identity.profile(&wanted)? else {
                return Ok(None);
            };
            let segments = membership.segments_of(&profile.id)?;
            Ok(Some((profile.id, segments)))
        },
    )
    .await?
    .ok_or_else(|| ApiError::NotFound(format!("no profile {id:?}")))?;
    Ok(Json(json!({"profile": found.0, "segments": found.1})))
}

/// The query of `GET /v1/membership-changes`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ChangesQuery {
    after: Option<u64>,
    limit: Option<usize>,
    segment: Option<String>,
    profile_id: Option<String>,
}

async fn changes(
    State(state): State<Arc<AppState>>,
    query: Result<Query<ChangesQuery>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let membership = membership(&state)?;
    let Query(query) = query?;
    let limit = limit(query.limit, DEFAULT_LIMIT, MAX_LIMIT)?;
    let after = query.after.unwrap_or(0);
    let found: Vec<MembershipChange> = blocking(move || {
        membership.changes(
            after,
            limit,
            query.segment.as_deref(),
            query.profile_id.as_deref(),
        )
    })
    .await?;
    let next_after = found.last().map_or(after, |c| c.id);
    Ok(Json(json!({"changes": found, "next_after": next_after})))
}

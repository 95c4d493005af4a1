//! Segments over the unified profiles (identity resolution must be on): definitions in
//! the segment language (`kith-segments`), stored, previewed, and their members computed
//! on demand from the profiles' traits, identifier types, `track` events and memberships
//! of the segments they reference.
//!
//! - `GET /v1/segments`, `POST /v1/segments` (`{"key", "name", "definition"}`);
//!   `GET|PUT|DELETE /v1/segments/{key}`. A definition that does not parse is a 400 with
//!   the line and column; a reference to an unknown segment or a cycle is a 400.
//! - `POST /v1/segments/preview` (`{"definition"}`): the member count and a sample.
//! - `GET /v1/segments/{key}/members?limit=&after=`: members, by profile id, paged.
//! - `GET /v1/segments/{key}/members.csv`: every member as CSV (profile id, user ids,
//!   emails, phones, traits as JSON).
//! - `GET /v1/profiles/{id}/segments`: the segments a profile is a member of.
//!
//! Real-time membership (a pipeline stage, window timers, enter/exit changes) is not
//! built yet: members are computed when asked.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use jiff::Timestamp;
use kith_identity::profile::Profile;
use kith_segments::ast::Expr;
use kith_segments::eval::{self, EventRecord};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

use crate::admin::{blocking, limit};
use crate::error::{ApiError, StoreError};
use crate::identity::Identity;
use crate::profiles::identity;
use crate::server::AppState;
use crate::store::Store;

/// Members answered when no `limit` is given.
const DEFAULT_LIMIT: usize = 100;
/// The most members one request answers.
const MAX_LIMIT: usize = 1_000;
/// Profiles listed in a preview's sample.
const SAMPLE: usize = 10;

/// A stored segment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Segment {
    /// Its key, used by `in_segment("key")` and the API.
    pub key: String,
    /// A name for people.
    pub name: String,
    /// The definition as written.
    pub definition: String,
    /// The parsed tree.
    pub tree: Expr,
    /// When it was created.
    pub created_at: Timestamp,
    /// When it was last changed.
    pub updated_at: Timestamp,
}

/// The routes, to be put behind the admin check.
pub fn routes() -> Router<Arc<AppState>> {
    Router::new()
        .route("/v1/segments", get(list).post(create))
        .route("/v1/segments/preview", post(preview))
        .route("/v1/segments/{key}", get(show).put(update).delete(remove))
        .route("/v1/segments/{key}/members", get(members))
        .route("/v1/segments/{key}/members.csv", get(export))
        .route("/v1/profiles/{id}/segments", get(profile_segments))
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

fn parse_body(bytes: &[u8]) -> Result<Body, ApiError> {
    serde_json::from_slice(bytes).map_err(|e| ApiError::invalid("invalid_body", e.to_string()))
}

fn parse_definition(definition: &str) -> Result<Expr, ApiError> {
    kith_segments::parse(definition)
        .map_err(|e| ApiError::invalid("invalid_definition", e.to_string()))
}

fn all(store: &Store) -> Result<BTreeMap<String, Segment>, StoreError> {
    Ok(store
        .segments::<Segment>()?
        .into_iter()
        .map(|s| (s.key.clone(), s))
        .collect())
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

/// What a segment is evaluated on, for one profile.
struct Subject {
    traits: Map<String, Value>,
    identifiers: BTreeSet<String>,
    events: Vec<EventRecord>,
}

fn subject(store: &Store, identity: &Identity, profile: &Profile) -> Result<Subject, StoreError> {
    let seqs = identity.event_seqs(&profile.id)?;
    let events = store
        .events_by_seq(&seqs)?
        .into_iter()
        .filter_map(|stored| {
            let message = serde_json::to_value(&stored.message).ok()?;
            if message.get("type").and_then(Value::as_str) != Some("track") {
                return None;
            }
            Some(EventRecord {
                name: message.get("event")?.as_str()?.to_owned(),
                timestamp: message.get("timestamp")?.as_str()?.parse().ok()?,
                properties: message
                    .get("properties")
                    .and_then(Value::as_object)
                    .cloned()
                    .unwrap_or_default(),
            })
        })
        .collect();
    Ok(Subject {
        traits: profile.trait_values(),
        identifiers: profile.identifiers.iter().map(|i| i.kind.clone()).collect(),
        events,
    })
}

/// Whether the subject meets `tree`, evaluating the segments it references first.
fn member(
    tree: &Expr,
    subject: &Subject,
    segments: &BTreeMap<String, Segment>,
    now: Timestamp,
    depth: usize,
) -> bool {
    let memberships: BTreeSet<String> = if depth < 16 {
        tree.inputs()
            .segments
            .into_iter()
            .filter(|key| {
                segments
                    .get(key)
                    .is_some_and(|s| member(&s.tree, subject, segments, now, depth + 1))
            })
            .collect()
    } else {
        BTreeSet::new()
    };
    let profile = eval::Profile {
        traits: &subject.traits,
        identifiers: &subject.identifiers,
        events: &subject.events,
        segments: &memberships,
    };
    eval::evaluate(tree, &profile, now)
}

/// The live profiles meeting `tree`, in id order.
fn members_of(store: &Store, identity: &Identity, tree: &Expr) -> Result<Vec<Profile>, StoreError> {
    let segments = all(store)?;
    let now = Timestamp::now();
    let mut found = Vec::new();
    for profile in identity.live_profiles()? {
        if member(
            tree,
            &subject(store, identity, &profile)?,
            &segments,
            now,
            0,
        ) {
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
    let store = state.store.clone();
    let segments: Vec<Segment> =
        blocking(move || all(&store).map(|m| m.into_values().collect())).await?;
    Ok(Json(json!({"segments": segments})))
}

async fn show(
    State(state): State<Arc<AppState>>,
    Path(key): Path<String>,
) -> Result<Json<Segment>, ApiError> {
    let store = state.store.clone();
    let wanted = key.clone();
    let found = blocking(move || all(&store).map(|mut m| m.remove(&wanted))).await?;
    found.map(Json).ok_or_else(|| not_found(&key))
}

async fn save(
    state: &Arc<AppState>,
    key: String,
    name: Option<String>,
    definition: String,
    create: bool,
) -> Result<Segment, ApiError> {
    identity(state)?;
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
    let tree = parse_definition(&definition)?;
    let store = state.store.clone();
    blocking(move || -> Result<Segment, ApiError> {
        let mut segments = all(&store)?;
        let existing = segments.remove(&key);
        match (&existing, create) {
            (Some(_), true) => {
                return Err(ApiError::invalid(
                    "segment_exists",
                    format!("segment {key:?} exists; PUT to change it"),
                ));
            }
            (None, false) => return Err(not_found(&key)),
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
        store.put_segment(&key, Some(&segment))?;
        Ok(segment)
    })
    .await
}

async fn create(
    State(state): State<Arc<AppState>>,
    body: Bytes,
) -> Result<(StatusCode, Json<Segment>), ApiError> {
    let body = parse_body(&body)?;
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
) -> Result<Json<Segment>, ApiError> {
    let body = parse_body(&body)?;
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
    let store = state.store.clone();
    let wanted = key.clone();
    blocking(move || -> Result<(), ApiError> {
        let segments = all(&store)?;
        if !segments.contains_key(&wanted) {
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
        store.put_segment::<Segment>(&wanted, None)?;
        Ok(())
    })
    .await?;
    Ok(Json(json!({"deleted": key})))
}

async fn preview(State(state): State<Arc<AppState>>, body: Bytes) -> Result<Json<Value>, ApiError> {
    let identity = identity(&state)?;
    let body = parse_body(&body)?;
    let tree = parse_definition(&body.definition)?;
    let segments = {
        let store = state.store.clone();
        blocking(move || all(&store)).await?
    };
    check_references("(preview)", &tree, &segments)?;
    let store = state.store.clone();
    let found = blocking(move || members_of(&store, &identity, &tree)).await?;
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
    let identity = identity(&state)?;
    let Query(page) = page.map_err(|e| ApiError::invalid("invalid_query", e.body_text()))?;
    let limit = limit(page.limit, DEFAULT_LIMIT, MAX_LIMIT)?;
    let store = state.store.clone();
    let wanted = key.clone();
    let found = blocking(move || -> Result<Option<Vec<String>>, StoreError> {
        let Some(segment) = all(&store)?.remove(&wanted) else {
            return Ok(None);
        };
        let members = members_of(&store, &identity, &segment.tree)?;
        Ok(Some(members.into_iter().map(|p| p.id).collect()))
    })
    .await?
    .ok_or_else(|| not_found(&key))?;
    let total = found.len();
    let page: Vec<String> = found
        .into_iter()
        .filter(|id| page.after.as_ref().is_none_or(|after| id > after))
        .take(limit)
        .collect();
    let next_after = (page.len() == limit)
        .then(|| page.last().cloned())
        .flatten();
    Ok(Json(
        json!({"segment": key, "total": total, "members": page, "next_after": next_after}),
    ))
}

/// One CSV field, quoted when it holds a comma, a quote or a line break.
fn csv_field(text: &str) -> String {
    if text.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", text.replace('"', "\"\""))
    } else {
        text.to_owned()
    }
}

async fn export(
    State(state): State<Arc<AppState>>,
    Path(key): Path<String>,
) -> Result<([(axum::http::HeaderName, &'static str); 1], String), ApiError> {
    let identity = identity(&state)?;
    let store = state.store.clone();
    let wanted = key.clone();
    let csv = blocking(move || -> Result<Option<String>, StoreError> {
        let Some(segment) = all(&store)?.remove(&wanted) else {
            return Ok(None);
        };
        let mut out = String::from("profile_id,user_ids,emails,phones,traits\n");
        for profile in members_of(&store, &identity, &segment.tree)? {
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
        }
        Ok(Some(out))
    })
    .await?
    .ok_or_else(|| not_found(&key))?;
    Ok((
        [(axum::http::header::CONTENT_TYPE, "text/csv; charset=utf-8")],
        csv,
    ))
}

async fn profile_segments(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let identity = identity(&state)?;
    let store = state.store.clone();
    let wanted = id.clone();
    let found = blocking(
        move || -> Result<Option<(String, Vec<String>)>, StoreError> {
            let Some(profile) = identity.profile(&wanted)? else {
                return Ok(None);
            };
            let segments = all(&store)?;
            let subject = subject(&store, &identity, &profile)?;
            let now = Timestamp::now();
            let keys = segments
                .values()
                .filter(|s| member(&s.tree, &subject, &segments, now, 0))
                .map(|s| s.key.clone())
                .collect();
            Ok(Some((profile.id, keys)))
        },
    )
    .await?
    .ok_or_else(|| ApiError::NotFound(format!("no profile {id:?}")))?;
    Ok(Json(json!({"profile": found.0, "segments": found.1})))
}

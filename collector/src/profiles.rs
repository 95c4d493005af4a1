//! The profile API (admin token), over the identity graph:
//!
//! - `GET /v1/profiles?identifier=TYPE:VALUE`: the profile holding an identifier.
//! - `GET /v1/profiles/{id}`: a profile; a merged id answers with its survivor (and
//!   says so in `merged_id`).
//! - `GET /v1/profiles/{id}/events?limit=&before=`: its stored events, newest first.
//! - `GET /v1/profiles/{id}/merges`: its merge log.
//! - `DELETE /v1/profiles/{id}`: erases the person from every store (see [`erase`]) and
//!   suppresses the identifiers (later events carrying them are dropped and counted);
//!   the answer reports what was removed where.
//! - `POST /v1/merges/{id}/split`: undoes a merge.
//! - `POST /v1/matching/run`: probabilistic matching over the profiles' traits (when the
//!   identity settings have a `matching` section): merges likely pairs, keeps the
//!   doubtful ones as suggestions.
//! - `GET /v1/suggested-merges`; `POST /v1/suggested-merges/accept` and `/dismiss` with
//!   `{"a": id, "b": id}`.

use std::collections::BTreeSet;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::routing::{get, post};
use axum::{Json, Router};
use kith_identity::graph::SplitError;
use kith_identity::identifier::Identifier;
use kith_identity::profile::Profile;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::activation::audience;
use crate::admin::{blocking, limit, next_before};
use crate::error::ApiError;
use crate::identity::{Identity, MatchError, MatchReport};
use crate::server::AppState;
use crate::store::StoredEvent;

/// Events answered by `GET /v1/profiles/{id}/events` when no `limit` is given.
const DEFAULT_LIMIT: usize = 100;
/// The most events one request answers.
const MAX_LIMIT: usize = 1_000;

/// The routes, to be put behind the admin check.
pub fn routes() -> Router<Arc<AppState>> {
    Router::new()
        .route("/v1/profiles", get(lookup))
        .route("/v1/profiles/{id}", get(show).delete(erase))
        .route("/v1/profiles/{id}/events", get(events))
        .route("/v1/profiles/{id}/merges", get(merges))
        .route("/v1/merges/{id}/split", post(split))
        .route("/v1/matching/run", post(run_matching))
        .route("/v1/suggested-merges", get(suggestions))
        .route("/v1/suggested-merges/{decision}", post(decide))
}

/// A profile as the API shows it.
pub fn profile_json(profile: &Profile, requested: &str) -> Value {
    let mut body = json!({
        "id": profile.id,
        "identifiers": profile.identifiers,
        "traits": profile.trait_values(),
        "trait_sources": profile.traits,
        "first_seen": profile.first_seen,
        "last_seen": profile.last_seen,
        "events": profile.events,
        "event_counts": profile.event_counts,
    });
    if requested != profile.id {
        body["merged_id"] = json!(requested);
    }
    body
}

fn not_found(id: &str) -> ApiError {
    ApiError::NotFound(format!("no profile {id:?}"))
}

/// The identity graph, or a 404 saying how to turn identity resolution on.
pub fn identity(state: &AppState) -> Result<Arc<Identity>, ApiError> {
    state.identity.clone().ok_or_else(|| {
        ApiError::NotFound(
            "identity resolution is off: start the collector with --identity, or give the \
             config file an \"identity\" section"
                .to_owned(),
        )
    })
}

/// The query of `GET /v1/profiles`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LookupQuery {
    identifier: String,
}

async fn lookup(
    State(state): State<Arc<AppState>>,
    query: Result<Query<LookupQuery>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let Query(query) = query?;
    let id: Identifier =
        query
            .identifier
            .parse()
            .map_err(|e: kith_identity::identifier::NotAnIdentifier| {
                ApiError::invalid("invalid_identifier", e.to_string())
            })?;
    let identity = identity(&state)?;
    let wanted = id.clone();
    let found = blocking(move || identity.find(&wanted)).await?;
    let profile = found.ok_or_else(|| ApiError::NotFound(format!("no profile holds {id}")))?;
    Ok(Json(profile_json(&profile, &profile.id)))
}

async fn show(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let identity = identity(&state)?;
    let wanted = id.clone();
    let profile = blocking(move || identity.profile(&wanted))
        .await?
        .ok_or_else(|| not_found(&id))?;
    Ok(Json(profile_json(&profile, &id)))
}

/// The paging of `GET /v1/profiles/{id}/events`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Page {
    limit: Option<usize>,
    before: Option<u64>,
}

async fn events(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    page: Result<Query<Page>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let Query(page) = page?;
    let limit = limit(page.limit, DEFAULT_LIMIT, MAX_LIMIT)?;
    let found = profile_events(&state, &id, page.before, limit)
        .await?
        .ok_or_else(|| not_found(&id))?;
    let next_before = next_before(&found, limit, |e| e.seq);
    Ok(Json(json!({"events": found, "next_before": next_before})))
}

/// A profile's stored events with a `seq` below `before`, newest first; `None` when
/// there is no such profile.
///
/// # Errors
///
/// On a storage failure.
pub async fn profile_events(
    state: &Arc<AppState>,
    id: &str,
    before: Option<u64>,
    limit: usize,
) -> Result<Option<Vec<StoredEvent>>, ApiError> {
    let state = state.clone();
    let id = id.to_owned();
    let identity = identity(&state)?;
    blocking(move || {
        if identity.profile(&id)?.is_none() {
            return Ok(None);
        }
        let mut seqs = identity.event_seqs(&id)?;
        seqs.retain(|seq| before.is_none_or(|b| *seq < b));
        seqs.reverse();
        seqs.truncate(limit);
        state.store.events_by_seq(&seqs).map(Some)
    })
    .await
}

async fn merges(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let identity = identity(&state)?;
    let wanted = id.clone();
    let (profile, merges) = blocking(move || {
        Ok::<_, crate::error::StoreError>((identity.profile(&wanted)?, identity.merges(&wanted)?))
    })
    .await?;
    let profile = profile.ok_or_else(|| not_found(&id))?;
    Ok(Json(json!({"profile": profile.id, "merges": merges})))
}

/// `DELETE /v1/profiles/{id}`: erases the person from every store and answers what
/// went where. The graph forgets the profile (and the profiles merged into it) and
/// suppresses its identifiers; its events go from the event store; its segment
/// memberships end with cause `erased` (no campaign fires on them) and its earlier
/// membership history goes; the outbox forgets its deliveries, push tokens and
/// frequency caps; failed events carrying its identifiers go; audience export files
/// lose its rows.
async fn erase(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let identity = identity(&state)?;
    let (graph, wanted) = (identity.clone(), id.clone());
    let (owners, deleted) = blocking(move || -> Result<_, ApiError> {
        let mut owners: BTreeSet<String> = BTreeSet::new();
        if let Some(profile) = graph.profile(&wanted)? {
            owners.insert(profile.id.clone());
            for merge in graph.merges(&profile.id)? {
                // A split gave the merged profile back its own life: it is not erased.
                if merge.survivor == profile.id && !merge.undone {
                    owners.insert(merge.merged);
                }
            }
        }
        Ok((owners, graph.delete(&wanted)?))
    })
    .await?;
    let deleted = deleted.ok_or_else(|| not_found(&id))?;
    refresh_segments(&state).await;
    let membership = state.membership.clone();
    let activation = state.activation.clone();
    let store = state.store.clone();
    let identifiers: BTreeSet<Identifier> = deleted.identifiers.iter().cloned().collect();
    let (seqs, forgotten_owners) = (deleted.event_seqs.clone(), owners.clone());
    let removed = blocking(move || -> Result<Value, ApiError> {
        let failed = store.erase_failed(|event| {
            identity
                .identifiers_in(&event.message)
                .iter()
                .any(|i| identifiers.contains(i))
        })?;
        let history = match &membership {
            Some(membership) => membership.forget_history(&forgotten_owners)?,
            None => 0,
        };
        let (outbox, export_rows) = match &activation {
            Some(activation) => {
                let forgotten = activation.forget_profiles(&forgotten_owners, &seqs)?;
                let hashes: Vec<String> = identifiers
                    .iter()
                    .filter_map(|i| match i.kind.as_str() {
                        "email" => Some(audience::hashed(Some(&audience::normal_email(&i.value)))),
                        "phone" => Some(audience::hashed(Some(&audience::normal_phone(&i.value)))),
                        _ => None,
                    })
                    .filter(|h| !h.is_empty())
                    .collect();
                let rows = activation
                    .scrub_exports(&hashes)
                    .map_err(|why| ApiError::Unavailable(format!("the exports: {why}")))?;
                (forgotten, rows)
            }
            None => Default::default(),
        };
        Ok(json!({
            "events": seqs.len(),
            "failed_events": failed,
            "membership_history": history,
            "deliveries": outbox.deliveries,
            "push_tokens": outbox.push_tokens,
            "frequency_caps": outbox.frequency_caps,
            "export_rows": export_rows,
        }))
    })
    .await?;
    Ok(Json(json!({
        "deleted": deleted.profile,
        "profiles": owners,
        "suppressed_identifiers": deleted.identifiers,
        "erased_events": deleted.event_seqs.len(),
        "removed": removed,
    })))
}

async fn split(
    State(state): State<Arc<AppState>>,
    Path(id): Path<u64>,
) -> Result<Json<Value>, ApiError> {
    let identity = identity(&state)?;
    let result = tokio::task::spawn_blocking(move || identity.split(id))
        .await
        .map_err(|e| ApiError::Unavailable(e.to_string()))?;
    refresh_segments(&state).await;
    match result {
        Ok(split) => Ok(Json(
            json!({"merge": id, "survivor": split.survivor, "restored": split.restored}),
        )),
        Err(SplitError::NotFound(message)) => Err(ApiError::NotFound(message)),
        Err(SplitError::AlreadyUndone(_)) => Err(ApiError::invalid(
            "already_split",
            format!("merge {id} was already undone"),
        )),
        Err(SplitError::Store(error)) => Err(error.into()),
    }
}

/// Re-evaluates the segment memberships of the profiles an admin operation changed.
/// A failure is only logged: the profiles stay marked, and the segments thread retries.
async fn refresh_segments(state: &Arc<AppState>) {
    let Some(membership) = state.membership.clone() else {
        return;
    };
    if let Err(error) = blocking(move || membership.refresh()).await {
        tracing::error!(
            ?error,
            "re-evaluating segment memberships failed; retried later"
        );
    }
}

fn match_error(error: MatchError) -> ApiError {
    match error {
        MatchError::NotConfigured => {
            ApiError::invalid("matching_not_configured", error.to_string())
        }
        MatchError::NoSuggestion => ApiError::NotFound(error.to_string()),
        MatchError::Store(error) => error.into(),
    }
}

async fn run_matching(State(state): State<Arc<AppState>>) -> Result<Json<MatchReport>, ApiError> {
    let identity = identity(&state)?;
    let report = tokio::task::spawn_blocking(move || identity.run_matching())
        .await
        .map_err(|e| ApiError::Unavailable(e.to_string()))?
        .map_err(match_error)?;
    refresh_segments(&state).await;
    Ok(Json(report))
}

async fn suggestions(State(state): State<Arc<AppState>>) -> Result<Json<Value>, ApiError> {
    let identity = identity(&state)?;
    let suggestions = blocking(move || identity.suggestions()).await?;
    Ok(Json(json!({"suggestions": suggestions})))
}

/// The body of a decision on a suggested merge.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Pair {
    a: String,
    b: String,
}

async fn decide(
    State(state): State<Arc<AppState>>,
    Path(decision): Path<String>,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    let accept = match decision.as_str() {
        "accept" => true,
        "dismiss" => false,
        _ => return Err(ApiError::NotFound("use /accept or /dismiss".to_owned())),
    };
    let pair: Pair = serde_json::from_slice(&body).map_err(|e| {
        ApiError::invalid(
            "invalid_body",
            format!("send {{\"a\": id, \"b\": id}}: {e}"),
        )
    })?;
    let identity = identity(&state)?;
    let decided = tokio::task::spawn_blocking(move || identity.decide(&pair.a, &pair.b, accept))
        .await
        .map_err(|e| ApiError::Unavailable(e.to_string()))?
        .map_err(match_error)?;
    refresh_segments(&state).await;
    match decided {
        None => Ok(Json(json!({"dismissed": true}))),
        Some(Ok(merge)) => Ok(Json(json!({"merged": merge}))),
        Some(Err(why)) => Err(ApiError::invalid("merge_refused", why)),
    }
}

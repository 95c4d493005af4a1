//! The admin API (`Authorization: Bearer <admin token>`): stored events with filters,
//! the live tail a developer watches while instrumenting an app, and the counters; the
//! processing routes ([`crate::processing::api`]) sit behind the same check. Also
//! the unauthenticated probes: `/healthz`, `/readyz` and Prometheus `/metrics`.

use std::convert::Infallible;
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, Request, State};
use axum::http::{HeaderMap, header};
use axum::middleware::{self, Next};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use futures_util::{Stream, StreamExt};
use jiff::Timestamp;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio_stream::wrappers::BroadcastStream;
use tokio_stream::wrappers::errors::BroadcastStreamRecvError;

use crate::error::ApiError;
use crate::server::AppState;
use crate::stats::StatsReport;
use crate::store::EventFilter;

/// Events answered by `GET /v1/events` when no `limit` is given.
const DEFAULT_EVENT_LIMIT: usize = 100;
/// The most events one `GET /v1/events` answers.
const MAX_EVENT_LIMIT: usize = 1_000;

/// The admin routes, behind the bearer-token check; the live tail also takes the token
/// as `?access_token=` (an `EventSource` cannot set headers), no other route does.
pub fn routes(state: Arc<AppState>) -> Router<Arc<AppState>> {
    let bearer = Router::new()
        .route("/v1/events", get(events))
        .route("/v1/stats", get(stats))
        .route("/metrics", get(metrics))
        .merge(crate::processing::api::routes())
        .merge(crate::profiles::routes())
        .merge(crate::segments::routes())
        .merge(crate::activation::api::routes())
        .route_layer(middleware::from_fn_with_state(state.clone(), require_admin));
    let live = Router::new()
        .route("/v1/events/live", get(live))
        .route_layer(middleware::from_fn_with_state(
            state,
            require_admin_or_query,
        ));
    bearer.merge(live)
}

/// `/metrics` alone, without authentication: what `--metrics-listen` serves.
pub fn metrics_routes(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .with_state(state)
}

/// A page size: `given`, or `default`; a 400 outside 1 to `max`.
///
/// # Errors
///
/// 400 `invalid_limit`.
pub fn limit(given: Option<usize>, default: usize, max: usize) -> Result<usize, ApiError> {
    let limit = given.unwrap_or(default);
    if limit == 0 || limit > max {
        return Err(ApiError::invalid(
            "invalid_limit",
            format!("limit must be between 1 and {max}"),
        ));
    }
    Ok(limit)
}

/// The `before` of the next page: the last item's `seq` when the page is full.
pub fn next_before<T>(page: &[T], limit: usize, seq: impl Fn(&T) -> u64) -> Option<u64> {
    (page.len() == limit)
        .then(|| page.last().map(seq))
        .flatten()
}

/// Runs storage work off the async runtime.
///
/// # Errors
///
/// The work's own error, or 503 when the blocking task could not run.
pub async fn blocking<T, E>(
    work: impl FnOnce() -> Result<T, E> + Send + 'static,
) -> Result<T, ApiError>
where
    T: Send + 'static,
    E: Into<ApiError> + Send + 'static,
{
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| ApiError::Unavailable(e.to_string()))?
        .map_err(Into::into)
}

/// Compares without stopping at the first differing byte, so that timing does not
/// reveal how much of a guessed token is right.
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The token of an `Authorization: Bearer` header.
pub fn bearer_token(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
        .map(str::trim)
}

/// `access_token` in the query, for `EventSource`, which cannot set headers.
fn query_token(request: &Request) -> Option<String> {
    request
        .uri()
        .query()?
        .split('&')
        .find_map(|pair| pair.strip_prefix("access_token="))
        .map(str::to_owned)
}

/// Whether the request carries the admin token (`Bearer`).
pub fn is_admin(state: &AppState, headers: &HeaderMap) -> bool {
    bearer_token(headers).is_some_and(|t| same_secret(t.as_bytes(), state.admin_token.as_bytes()))
}

async fn require_admin(
    State(state): State<Arc<AppState>>,
    request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let token = bearer_token(request.headers()).map(str::to_owned);
    admit(&state, token, request, next).await
}

async fn require_admin_or_query(
    State(state): State<Arc<AppState>>,
    request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let token = bearer_token(request.headers())
        .map(str::to_owned)
        .or_else(|| query_token(&request));
    admit(&state, token, request, next).await
}

async fn admit(
    state: &AppState,
    token: Option<String>,
    request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    match token {
        Some(token) if same_secret(token.as_bytes(), state.admin_token.as_bytes()) => {
            Ok(next.run(request).await)
        }
        Some(_) => Err(ApiError::Unauthorized("wrong admin token")),
        None => Err(ApiError::Unauthorized(
            "the admin API needs Authorization: Bearer <admin token>",
        )),
    }
}

/// The filters of `GET /v1/events`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventsQuery {
    message_id: Option<String>,
    user_id: Option<String>,
    anonymous_id: Option<String>,
    profile_id: Option<String>,
    limit: Option<usize>,
    before: Option<u64>,
}

impl EventsQuery {
    fn filter(self) -> Result<EventFilter, ApiError> {
        let filters = [
            self.message_id.map(EventFilter::MessageId),
            self.user_id.map(EventFilter::UserId),
            self.anonymous_id.map(EventFilter::AnonymousId),
        ];
        let mut given = filters.into_iter().flatten();
        match (given.next(), given.next()) {
            (None, _) => Ok(EventFilter::All),
            (Some(filter), None) => Ok(filter),
            (Some(_), Some(_)) => Err(ApiError::invalid(
                "conflicting_filters",
                "give at most one of message_id, user_id, anonymous_id, profile_id",
            )),
        }
    }
}

async fn events(
    State(state): State<Arc<AppState>>,
    query: Result<Query<EventsQuery>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let Query(query) = query?;
    let limit = limit(query.limit, DEFAULT_EVENT_LIMIT, MAX_EVENT_LIMIT)?;
    let before = query.before;
    if let Some(profile) = query.profile_id.clone() {
        if query.message_id.is_some() || query.user_id.is_some() || query.anonymous_id.is_some() {
            return Err(ApiError::invalid(
                "conflicting_filters",
                "give at most one of message_id, user_id, anonymous_id, profile_id",
            ));
        }
        let found = crate::profiles::profile_events(&state, &profile, before, limit)
            .await?
            .unwrap_or_default();
        let next = next_before(&found, limit, |e| e.seq);
        return Ok(Json(json!({"events": found, "next_before": next})));
    }
    let filter = query.filter()?;
    let store = state.store.clone();
    let found = blocking(move || store.query(&filter, before, limit)).await?;
    let next = next_before(&found, limit, |e| e.seq);
    Ok(Json(json!({"events": found, "next_before": next})))
}

async fn live(
    State(state): State<Arc<AppState>>,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    // Held as long as the stream lives: a bounded number of tails are open at once.
    let place =
        state
            .live_tails
            .clone()
            .try_acquire_owned()
            .map_err(|_| ApiError::RateLimited {
                retry_after_secs: 5,
            })?;
    let mut shutdown = state.shutdown_signal();
    let stream = BroadcastStream::new(state.live.subscribe())
        .map(move |item| {
            let _place = &place;
            Ok(match item {
                Ok(json) => Event::default().event("event").data(&*json),
                Err(BroadcastStreamRecvError::Lagged(missed)) => {
                    Event::default().event("lagged").data(missed.to_string())
                }
            })
        })
        .take_until(async move {
            let _ = shutdown.wait_for(|stopping| *stopping).await;
        });
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()))
}

async fn stats(State(state): State<Arc<AppState>>) -> Json<StatsReport> {
    Json(state.stats.report())
}

/// `GET /healthz`: the process is up.
pub async fn healthz() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

/// How far behind the pipeline is: the age of the oldest event it has not processed.
async fn pipeline_lag(state: &Arc<AppState>) -> Result<Duration, ApiError> {
    let store = state.store.clone();
    let since = blocking(move || store.pending_since()).await?;
    Ok(since
        .and_then(|since| Timestamp::now().duration_since(since).try_into().ok())
        .unwrap_or_default())
}

/// `GET /readyz`: the collector takes traffic: not shutting down, every background
/// thread up, and the pipeline at most `--ready-max-lag` behind.
///
/// # Errors
///
/// 503 with the reason otherwise.
pub async fn readyz(State(state): State<Arc<AppState>>) -> Result<Json<Value>, ApiError> {
    if !state.ready() {
        return Err(ApiError::Unavailable("shutting down".to_owned()));
    }
    let down = state.health.down();
    if !down.is_empty() {
        return Err(ApiError::Unavailable(format!(
            "background threads are down: {}",
            down.join(", ")
        )));
    }
    let lag = pipeline_lag(&state).await?;
    if lag > state.ready_max_lag {
        return Err(ApiError::Unavailable(format!(
            "the pipeline is {} s behind (more than {} s)",
            lag.as_secs(),
            state.ready_max_lag.as_secs()
        )));
    }
    Ok(Json(json!({"status": "ready"})))
}

/// `GET /metrics`: the counters, the pipeline's lag and the threads' health in
/// Prometheus' text format. Behind the admin token on the main address; open on
/// `--metrics-listen`.
pub async fn metrics(State(state): State<Arc<AppState>>) -> Result<Response, ApiError> {
    let lag = pipeline_lag(&state).await?;
    let mut text = state.stats.prometheus();
    let _ = writeln!(
        text,
        "# HELP kith_pipeline_lag_seconds Age of the oldest event the pipeline has not processed.\n\
         # TYPE kith_pipeline_lag_seconds gauge\nkith_pipeline_lag_seconds {:.3}",
        lag.as_secs_f64()
    );
    let _ = writeln!(
        text,
        "# HELP kith_events_quarantined_total Events a stage failed or panicked on, moved to the failed-events store, since start.\n\
         # TYPE kith_events_quarantined_total counter\nkith_events_quarantined_total {}",
        state.health.quarantined()
    );
    let _ = writeln!(
        text,
        "# HELP kith_connections_refused_total Connections closed at once because --max-connections were open.\n\
         # TYPE kith_connections_refused_total counter\nkith_connections_refused_total {}",
        state.refused_connections.count()
    );
    let threads = state.health.snapshot();
    let _ = writeln!(
        text,
        "# HELP kith_thread_up Whether a background thread is running (0 between a panic and its restart).\n# TYPE kith_thread_up gauge"
    );
    for (name, thread) in &threads {
        let _ = writeln!(
            text,
            "kith_thread_up{{thread=\"{name}\"}} {}",
            u8::from(thread.up)
        );
    }
    let _ = writeln!(
        text,
        "# HELP kith_thread_restarts_total Times a background thread panicked and was restarted.\n# TYPE kith_thread_restarts_total counter"
    );
    for (name, thread) in &threads {
        let _ = writeln!(
            text,
            "kith_thread_restarts_total{{thread=\"{name}\"}} {}",
            thread.restarts
        );
    }
    Ok(([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_compare_whole() {
        assert!(same_secret(b"abc", b"abc"));
        assert!(!same_secret(b"abc", b"abd"));
        assert!(!same_secret(b"abc", b"ab"));
    }
}

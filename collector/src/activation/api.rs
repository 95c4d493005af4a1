//! The activation API (identity resolution must be on).
//!
//! - `GET /v1/destinations`, `POST /v1/destinations`, `GET|DELETE /v1/destinations/{id}`.
//!   A destination is `{"name", "type", ..., "rate_per_sec"?, "max_attempts"?,
//!   "retry_base_ms"?}` with, per type: `webhook`: `url`, `secret`; `fcm`:
//!   `service_account` (the key file's JSON), `base_url`?; `apns`: `team_id`, `key_id`,
//!   `private_key` (the `.p8` PEM), `topic`, `base_url`?, `ca_certificate`?; `web_push`:
//!   `vapid_private_key`, `subject`. Secrets are never shown; a Web Push destination
//!   shows its `vapid_public_key` (the `applicationServerKey` browsers subscribe with).
//!   `audience_export`: `directory` and/or `url` (with `secret` to sign uploads);
//!   `POST /v1/destinations/{id}/export` (`{"segment"}`) exports the segment's members
//!   there (see [`super::audience`]). Every URL must reach a public address (checked
//!   after DNS resolution) unless the collector runs with
//!   `--allow-private-destinations`, and an export `directory` lies under the export
//!   root: otherwise 400 `refused_destination`.
//! - `GET /v1/campaigns`, `POST /v1/campaigns` (`{"name", "trigger": {"type":
//!   "segment_entered" | "segment_exited", "segment"}, "destination", "template",
//!   "frequency_cap"?: {"max", "per_secs"}, "consent_purpose"?}`),
//!   `GET|DELETE /v1/campaigns/{id}`.
//! - `GET /v1/profiles/{id}/push-tokens`: the push tokens and Web Push subscriptions
//!   events brought to a profile (`context.device.token`).
//! - `GET /v1/deliveries?after=&limit=&state=&campaign=`: the outbox, oldest first,
//!   looking at up to [`super::DELIVERIES_SCANNED`] deliveries a request (`next_after`
//!   says where to go on; a page may be short or empty when filters match few);
//!   `POST /v1/deliveries/replay` (`{"ids": [...]}`, or `{}` for every dead one, up to
//!   [`super::MAX_REPLAYED`] a request).

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use jiff::Timestamp;
use serde::Deserialize;
use serde_json::{Value, json};

use p256::pkcs8::DecodePrivateKey as _;

use super::{
    Activation, Campaign, Delivery, DeliveryState, Destination, FrequencyCap, Provider, Trigger,
    push,
};
use crate::admin::{blocking, limit};
use crate::error::ApiError;
use crate::server::AppState;

/// Deliveries answered when no `limit` is given.
const DEFAULT_LIMIT: usize = 100;
/// The most deliveries one request answers.
const MAX_LIMIT: usize = 1_000;

/// The routes, to be put behind the admin check.
pub fn routes() -> Router<Arc<AppState>> {
    Router::new()
        .route(
            "/v1/destinations",
            get(destinations).post(create_destination),
        )
        .route(
            "/v1/destinations/{id}",
            get(destination).delete(delete_destination),
        )
        .route("/v1/destinations/{id}/export", post(export))
        .route("/v1/campaigns", get(campaigns).post(create_campaign))
        .route("/v1/campaigns/{id}", get(campaign).delete(delete_campaign))
        .route("/v1/deliveries", get(deliveries))
        .route("/v1/deliveries/replay", post(replay))
        .route("/v1/profiles/{id}/push-tokens", get(push_tokens))
}

fn activation(state: &AppState) -> Result<Arc<Activation>, ApiError> {
    crate::profiles::identity(state)?;
    state
        .activation
        .clone()
        .ok_or_else(|| ApiError::Unavailable("activation is not running".to_owned()))
}

fn invalid(message: impl Into<String>) -> ApiError {
    ApiError::invalid("invalid_body", message)
}

fn new_id(prefix: &str) -> String {
    format!("{prefix}_{}", uuid::Uuid::now_v7().simple())
}

/// A destination as posted.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DestinationBody {
    name: Option<String>,
    #[serde(rename = "type")]
    kind: String,
    url: Option<String>,
    secret: Option<String>,
    service_account: Option<Value>,
    base_url: Option<String>,
    team_id: Option<String>,
    key_id: Option<String>,
    private_key: Option<String>,
    topic: Option<String>,
    ca_certificate: Option<String>,
    vapid_private_key: Option<String>,
    subject: Option<String>,
    directory: Option<String>,
    rate_per_sec: Option<f64>,
    max_attempts: Option<u32>,
    retry_base_ms: Option<u64>,
}

/// An http or https URL.
fn http_url(url: &str, what: &str) -> Result<String, ApiError> {
    let parsed = reqwest::Url::parse(url).map_err(|e| invalid(format!("{what:?} {url:?}: {e}")))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(invalid(format!("{what:?} is an http or https URL")));
    }
    Ok(url.to_owned())
}

fn parse_destination(bytes: &[u8]) -> Result<Destination, ApiError> {
    let body: DestinationBody = ApiError::json_body(bytes, "invalid_body")?;
    let required = |value: Option<String>, what: &str| {
        value
            .filter(|v| !v.trim().is_empty())
            .ok_or_else(|| invalid(format!("a {} destination needs {what:?}", body.kind)))
    };
    let base_url = body
        .base_url
        .clone()
        .map(|url| http_url(&url, "base_url"))
        .transpose()?;
    let provider = match body.kind.as_str() {
        "webhook" => Provider::Webhook {
            url: http_url(&required(body.url.clone(), "url")?, "url")?,
            secret: required(body.secret.clone(), "secret")?,
        },
        "fcm" => {
            let account: Result<push::ServiceAccount, _> = match body.service_account.clone() {
                Some(Value::String(text)) => serde_json::from_str(&text),
                Some(value) => serde_json::from_value(value),
                None => return Err(invalid("a fcm destination needs \"service_account\"")),
            };
            let account = account.map_err(|e| invalid(format!("\"service_account\": {e}")))?;
            rsa::RsaPrivateKey::from_pkcs8_pem(&account.private_key).map_err(|e| {
                invalid(format!(
                    "the service account's private_key is not an RSA PKCS#8 PEM key: {e}"
                ))
            })?;
            http_url(&account.token_uri, "service_account.token_uri")?;
            Provider::Fcm {
                service_account: account,
                base_url,
            }
        }
        "apns" => {
            let key = push::ApnsKey {
                team_id: required(body.team_id.clone(), "team_id")?,
                key_id: required(body.key_id.clone(), "key_id")?,
                private_key: required(body.private_key.clone(), "private_key")?,
            };
            p256::ecdsa::SigningKey::from_pkcs8_pem(&key.private_key).map_err(|e| {
                invalid(format!(
                    "private_key is not a P-256 PKCS#8 PEM key (.p8): {e}"
                ))
            })?;
            if let Some(pem) = &body.ca_certificate {
                reqwest::Certificate::from_pem(pem.as_bytes())
                    .map_err(|e| invalid(format!("\"ca_certificate\": {e}")))?;
            }
            Provider::Apns {
                key,
                topic: required(body.topic.clone(), "topic")?,
                base_url,
                ca_certificate: body.ca_certificate.clone(),
            }
        }
        "audience_export" => {
            if body.directory.is_none() && body.url.is_none() {
                return Err(invalid(
                    "an audience_export destination needs a \"directory\" or a \"url\"",
                ));
            }
            let url = body.url.clone().map(|u| http_url(&u, "url")).transpose()?;
            Provider::AudienceExport {
                directory: body.directory.clone(),
                url,
                secret: body.secret.clone(),
            }
        }
        "web_push" => {
            let vapid = required(body.vapid_private_key.clone(), "vapid_private_key")?;
            push::vapid_key(&vapid)
                .map_err(|e| invalid(format!("\"vapid_private_key\" is not a P-256 key: {e}")))?;
            let subject = required(body.subject.clone(), "subject")?;
            if !(subject.starts_with("mailto:") || subject.starts_with("https:")) {
                return Err(invalid("\"subject\" is a mailto: or https: contact"));
            }
            Provider::WebPush {
                vapid_private_key: vapid,
                subject,
            }
        }
        other => {
            return Err(invalid(format!(
                "unknown destination type {other:?}: use webhook, fcm, apns, web_push or audience_export"
            )));
        }
    };
    if body
        .rate_per_sec
        .is_some_and(|r| !(r > 0.0 && r.is_finite()))
    {
        return Err(invalid("\"rate_per_sec\" is a positive number"));
    }
    if body.max_attempts == Some(0) {
        return Err(invalid("\"max_attempts\" is at least 1"));
    }
    let id = new_id("dst");
    Ok(Destination {
        name: body.name.unwrap_or_else(|| id.clone()),
        id,
        provider,
        rate_per_sec: body.rate_per_sec,
        max_attempts: body.max_attempts.unwrap_or_else(super::default_attempts),
        retry_base_ms: body.retry_base_ms.unwrap_or_else(super::default_retry_ms),
        created_at: Timestamp::now(),
    })
}

async fn destinations(State(state): State<Arc<AppState>>) -> Result<Json<Value>, ApiError> {
    let activation = activation(&state)?;
    let found = blocking(move || activation.destinations()).await?;
    let shown: Vec<Value> = found.iter().map(Destination::redacted).collect();
    Ok(Json(json!({"destinations": shown})))
}

async fn destination(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let activation = activation(&state)?;
    let wanted = id.clone();
    let found = blocking(move || activation.destination(&wanted)).await?;
    found
        .map(|d| Json(d.redacted()))
        .ok_or_else(|| ApiError::NotFound(format!("no destination {id:?}")))
}

async fn create_destination(
    State(state): State<Arc<AppState>>,
    body: Bytes,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let activation = activation(&state)?;
    let destination = parse_destination(&body)?;
    ApiError::unless_reads_back(&destination, "destination")?;
    let shown = destination.redacted();
    blocking(move || -> Result<(), ApiError> {
        activation
            .check_destination(&destination)
            .map_err(|why| ApiError::invalid("refused_destination", why))?;
        Ok(activation.put_destination(&destination.id, Some(&destination))?)
    })
    .await?;
    Ok((StatusCode::CREATED, Json(shown)))
}

async fn delete_destination(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let activation = activation(&state)?;
    let wanted = id.clone();
    blocking(move || -> Result<(), ApiError> {
        if activation.destination(&wanted)?.is_none() {
            return Err(ApiError::NotFound(format!("no destination {wanted:?}")));
        }
        if let Some(user) = activation
            .campaigns()?
            .into_iter()
            .find(|c| c.destination == wanted)
        {
            return Err(ApiError::invalid(
                "destination_in_use",
                format!("campaign {:?} sends to it; delete that one first", user.id),
            ));
        }
        Ok(activation.put_destination(&wanted, None)?)
    })
    .await?;
    Ok(Json(json!({"deleted": id})))
}

/// A campaign as posted.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CampaignBody {
    name: Option<String>,
    trigger: Trigger,
    destination: String,
    template: Value,
    frequency_cap: Option<FrequencyCap>,
    consent_purpose: Option<String>,
}

async fn campaigns(State(state): State<Arc<AppState>>) -> Result<Json<Value>, ApiError> {
    let activation = activation(&state)?;
    let found = blocking(move || activation.campaigns()).await?;
    Ok(Json(json!({"campaigns": found})))
}

async fn campaign(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Json<Campaign>, ApiError> {
    let activation = activation(&state)?;
    let wanted = id.clone();
    let found = blocking(move || activation.campaign(&wanted)).await?;
    found
        .map(Json)
        .ok_or_else(|| ApiError::NotFound(format!("no campaign {id:?}")))
}

async fn create_campaign(
    State(state): State<Arc<AppState>>,
    body: Bytes,
) -> Result<(StatusCode, Json<Campaign>), ApiError> {
    let activation = activation(&state)?;
    let body: CampaignBody = ApiError::json_body(&body, "invalid_body")?;
    if body
        .frequency_cap
        .is_some_and(|c| c.max == 0 || c.per_secs == 0)
    {
        return Err(invalid(
            "a \"frequency_cap\" has a \"max\" and \"per_secs\" of at least 1",
        ));
    }
    let store = state.store.clone();
    let campaign = blocking(move || -> Result<Campaign, ApiError> {
        let Some(destination) = activation.destination(&body.destination)? else {
            return Err(ApiError::invalid(
                "unknown_destination",
                format!("no destination {:?}", body.destination),
            ));
        };
        if matches!(destination.provider, Provider::AudienceExport { .. }) {
            return Err(ApiError::invalid(
                "invalid_destination",
                "an audience export runs on demand: POST /v1/destinations/{id}/export",
            ));
        }
        let segment = body.trigger.segment();
        if !crate::segments::all(&store)?.contains_key(segment) {
            return Err(ApiError::invalid(
                "unknown_segment",
                format!("no segment {segment:?}"),
            ));
        }
        let id = new_id("cmp");
        let campaign = Campaign {
            name: body.name.unwrap_or_else(|| id.clone()),
            id,
            trigger: body.trigger,
            destination: body.destination,
            template: body.template,
            frequency_cap: body.frequency_cap,
            consent_purpose: body.consent_purpose,
            created_at: Timestamp::now(),
        };
        ApiError::unless_reads_back(&campaign, "campaign")?;
        activation.put_campaign(&campaign.id, Some(&campaign))?;
        Ok(campaign)
    })
    .await?;
    Ok((StatusCode::CREATED, Json(campaign)))
}

async fn delete_campaign(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let activation = activation(&state)?;
    let wanted = id.clone();
    blocking(move || -> Result<(), ApiError> {
        if activation.campaign(&wanted)?.is_none() {
            return Err(ApiError::NotFound(format!("no campaign {wanted:?}")));
        }
        Ok(activation.put_campaign(&wanted, None)?)
    })
    .await?;
    Ok(Json(json!({"deleted": id})))
}

/// The query of `GET /v1/deliveries`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DeliveriesQuery {
    after: Option<u64>,
    limit: Option<usize>,
    state: Option<DeliveryState>,
    campaign: Option<String>,
}

async fn deliveries(
    State(state): State<Arc<AppState>>,
    query: Result<Query<DeliveriesQuery>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let activation = activation(&state)?;
    let Query(query) = query?;
    let limit = limit(query.limit, DEFAULT_LIMIT, MAX_LIMIT)?;
    let after = query.after.unwrap_or(0);
    let (found, next_after): (Vec<Delivery>, u64) = blocking(move || {
        activation.deliveries(after, limit, query.state, query.campaign.as_deref())
    })
    .await?;
    Ok(Json(json!({"deliveries": found, "next_after": next_after})))
}

/// The body of a replay.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ReplayBody {
    ids: Option<Vec<u64>>,
}

async fn replay(State(state): State<Arc<AppState>>, body: Bytes) -> Result<Json<Value>, ApiError> {
    let activation = activation(&state)?;
    let body: ReplayBody = ApiError::json_body(&body, "invalid_body")?;
    let replayed = blocking(move || activation.replay(body.ids.as_deref())).await?;
    Ok(Json(json!({"replayed": replayed})))
}

async fn push_tokens(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let activation = activation(&state)?;
    let identity = crate::profiles::identity(&state)?;
    let wanted = id.clone();
    let found = blocking(move || -> Result<Option<Value>, ApiError> {
        let Some(profile) = identity.profile(&wanted)? else {
            return Ok(None);
        };
        let tokens: Vec<Value> = activation
            .tokens(&profile.id, None)?
            .into_iter()
            .map(|(provider, token)| json!({"provider": provider, "token": token}))
            .collect();
        Ok(Some(json!({"profile": profile.id, "tokens": tokens})))
    })
    .await?;
    found
        .map(Json)
        .ok_or_else(|| ApiError::NotFound(format!("no profile {id:?}")))
}

/// The body of an export.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ExportBody {
    segment: String,
}

async fn export(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    let activation = activation(&state)?;
    let body: ExportBody = ApiError::json_body(&body, "invalid_body")?;
    let store = state.store.clone();
    let report = blocking(move || -> Result<Value, ApiError> {
        let destination = activation
            .destination(&id)?
            .ok_or_else(|| ApiError::NotFound(format!("no destination {id:?}")))?;
        if !crate::segments::all(&store)?.contains_key(&body.segment) {
            return Err(ApiError::invalid(
                "unknown_segment",
                format!("no segment {:?}", body.segment),
            ));
        }
        activation
            .export(&destination, &body.segment)
            .map_err(|why| ApiError::invalid("export_failed", why))
    })
    .await?;
    Ok(Json(report))
}

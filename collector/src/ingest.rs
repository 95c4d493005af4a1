//! The Segment-compatible ingest API: `POST /v1/batch` and the single-event endpoints
//! `/v1/track`, `/v1/identify`, `/v1/page`, `/v1/screen`, `/v1/group`, `/v1/alias`.
//!
//! A request is read (gzip and `text/plain` included), authenticated (HTTP Basic with the
//! write key as user, or `writeKey` in the body), parsed with sdk-core's
//! [`protocol`](kith_sdk_core::protocol) types, validated event by event, enriched
//! (`messageId`, `receivedAt`, clock-skew-corrected `timestamp`, `context.ip`) and handed
//! to the [`LogWriter`](crate::writer::LogWriter). The 200 is sent only once the events
//! are durable.
//!
//! In a batch, an invalid event is rejected on its own: the answer lists it by index with
//! a code and a message, and the valid events are stored.

use std::io::Read;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Json;
use axum::body::Body;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderMap, header};
use base64::Engine;
use flate2::read::GzDecoder;
use jiff::Timestamp;
use kith_sdk_core::protocol::{
    Batch, MAX_BATCH_BYTES, MAX_BATCH_EVENTS, MAX_EVENT_BYTES, Map, Message, MessageType,
};
use serde::Serialize;
use serde_json::Value;
use serde_json::value::RawValue;

use crate::config::StoreIp;
use crate::error::ApiError;
use crate::server::AppState;
use crate::writer::Append;

/// The answer to an accepted ingest request.
#[derive(Debug, Serialize)]
pub struct IngestReply {
    /// Always `true`: the request was taken (Segment's answer).
    pub success: bool,
    /// How many events were durably accepted.
    pub accepted: usize,
    /// The events refused one by one. Empty for a fully valid request.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub rejected: Vec<Rejection>,
}

/// One event refused within an accepted batch.
#[derive(Debug, Serialize)]
pub struct Rejection {
    /// The event's index in the `batch` array.
    pub index: usize,
    /// A stable, machine-readable reason.
    pub code: &'static str,
    /// A sentence for the developer.
    pub message: String,
}

/// `POST /v1/batch`.
///
/// # Errors
///
/// 401 for a bad key, 400 for an unparseable body, 413 over the batch limits, 429 over
/// the rate limit, 503 when the store fails.
pub async fn batch(
    State(state): State<Arc<AppState>>,
    request: Request,
) -> Result<Json<IngestReply>, ApiError> {
    let result = ingest_batch(&state, request).await;
    count_refusal(&state, &result);
    result.map(Json)
}

/// `POST /v1/{type}`, for one event of the given type.
///
/// # Errors
///
/// As [`batch`], and 400 when the event itself is invalid.
pub async fn single(
    state: Arc<AppState>,
    kind: MessageType,
    request: Request,
) -> Result<Json<IngestReply>, ApiError> {
    let result = ingest_single(&state, kind, request).await;
    count_refusal(&state, &result);
    result.map(Json)
}

fn count_refusal(state: &AppState, result: &Result<IngestReply, ApiError>) {
    if let Err(error) = result {
        state.stats.record_request_rejected(error.code());
    }
}

async fn ingest_batch(state: &AppState, request: Request) -> Result<IngestReply, ApiError> {
    state.disk.check()?;
    let context = RequestContext::of(state, &request);
    let header_key = basic_auth_key(request.headers())?;
    let body = read_body(request, state.body_timeout).await?;
    let batch: Batch<Box<RawValue>> = serde_json::from_slice(&body)
        .map_err(|e| ApiError::invalid("invalid_json", format!("the body is not a batch: {e}")))?;
    let source = state.authenticate(header_key.as_deref().or(batch.write_key.as_deref()))?;
    if batch.batch.len() > MAX_BATCH_EVENTS {
        return Err(ApiError::too_large(
            "too_many_events",
            format!(
                "a batch holds at most {MAX_BATCH_EVENTS} events, this one has {}",
                batch.batch.len()
            ),
        ));
    }
    state.check_rate(&source, batch.batch.len())?;

    let mut accepted = Vec::with_capacity(batch.batch.len());
    let mut rejected = Vec::new();
    for (index, raw) in batch.batch.iter().enumerate() {
        let prepared = prepare(raw, &batch, &context);
        match prepared {
            Ok(encoded) => accepted.push(encoded),
            Err((code, message)) => rejected.push(Rejection {
                index,
                code,
                message,
            }),
        }
    }
    commit(state, source, batch.batch.len(), accepted, rejected).await
}

async fn ingest_single(
    state: &AppState,
    kind: MessageType,
    request: Request,
) -> Result<IngestReply, ApiError> {
    state.disk.check()?;
    let context = RequestContext::of(state, &request);
    let header_key = basic_auth_key(request.headers())?;
    let body = read_body(request, state.body_timeout).await?;
    if body.len() > MAX_EVENT_BYTES {
        return Err(ApiError::too_large(
            "event_too_large",
            format!("an event may be at most {MAX_EVENT_BYTES} bytes"),
        ));
    }
    let mut object: Map = serde_json::from_slice(&body).map_err(|e| {
        ApiError::invalid(
            "invalid_json",
            format!("the body is not a JSON object: {e}"),
        )
    })?;
    let body_key = match object.remove("writeKey") {
        Some(Value::String(key)) => Some(key),
        _ => None,
    };
    let source = state.authenticate(header_key.as_deref().or(body_key.as_deref()))?;
    match object.get("type") {
        None => {
            object.insert("type".to_owned(), Value::from(kind.as_str()));
        }
        Some(Value::String(t)) if t == kind.as_str() => {}
        Some(other) => {
            return Err(ApiError::invalid(
                "type_mismatch",
                format!("/v1/{kind} takes {kind} messages, not type {other}"),
            ));
        }
    }
    state.check_rate(&source, 1)?;
    let encoded = serde_json::to_string(&object)
        .ok()
        .and_then(|json| RawValue::from_string(json).ok())
        .ok_or_else(|| ApiError::invalid("invalid_event", "the event cannot be encoded"))?;
    let no_batch: Batch<Box<RawValue>> = Batch {
        batch: Vec::new(),
        context: None,
        integrations: None,
        sent_at: None,
        write_key: None,
    };
    match prepare(&encoded, &no_batch, &context) {
        Ok(event) => commit(state, source, 1, vec![event], Vec::new()).await,
        Err((code, message)) => {
            // The refusal is an event-level rejection: counted as such, answered as 400.
            state.stats.record_ingest(1, 0, &[code]);
            Err(ApiError::Invalid { code, message })
        }
    }
}

async fn commit(
    state: &AppState,
    source: Arc<str>,
    received: usize,
    events: Vec<Vec<u8>>,
    rejected: Vec<Rejection>,
) -> Result<IngestReply, ApiError> {
    let accepted = events.len();
    state
        .writer
        .append(Append {
            source,
            events,
            received: received as u64,
            rejected: rejected.iter().map(|r| r.code).collect(),
        })
        .await?;
    Ok(IngestReply {
        success: true,
        accepted,
        rejected,
    })
}

/// What enrichment takes from the request rather than from the event.
struct RequestContext {
    received_at: Timestamp,
    client_ip: Option<IpAddr>,
    store_ip: StoreIp,
}

impl RequestContext {
    fn of(state: &AppState, request: &Request) -> Self {
        let peer = request
            .extensions()
            .get::<ConnectInfo<SocketAddr>>()
            .map(|info| info.0.ip());
        RequestContext {
            received_at: Timestamp::now(),
            client_ip: peer.map(|peer| state.client_ip(peer, request.headers())),
            store_ip: state.store_ip,
        }
    }
}

/// Parses, validates, enriches and encodes one event of a batch.
fn prepare(
    raw: &RawValue,
    batch: &Batch<Box<RawValue>>,
    context: &RequestContext,
) -> Result<Vec<u8>, (&'static str, String)> {
    if raw.get().len() > MAX_EVENT_BYTES {
        return Err((
            "event_too_large",
            format!(
                "the event is {} bytes; at most {MAX_EVENT_BYTES} are accepted",
                raw.get().len()
            ),
        ));
    }
    let mut message: Message =
        serde_json::from_str(raw.get()).map_err(|e| ("invalid_event", e.to_string()))?;
    message.merge_batch_defaults(batch.context.as_ref(), batch.integrations.as_ref());
    message.validate().map_err(|e| (e.code, e.message))?;
    enrich(&mut message, batch.sent_at, context);
    serde_json::to_vec(&message).map_err(|e| ("invalid_event", e.to_string()))
}

/// Validates, enriches and encodes a message built by an import (no request, so no
/// client address and no `sentAt`), refusing one over the event size limit.
pub(crate) fn accept_imported(
    mut message: Message,
    received_at: Timestamp,
) -> Result<Vec<u8>, (&'static str, String)> {
    message.validate().map_err(|e| (e.code, e.message))?;
    let context = RequestContext {
        received_at,
        client_ip: None,
        store_ip: StoreIp::Full,
    };
    enrich(&mut message, None, &context);
    let encoded = serde_json::to_vec(&message).map_err(|e| ("invalid_event", e.to_string()))?;
    if encoded.len() > MAX_EVENT_BYTES {
        return Err((
            "event_too_large",
            format!(
                "the event is {} bytes; at most {MAX_EVENT_BYTES} are accepted",
                encoded.len()
            ),
        ));
    }
    Ok(encoded)
}

/// Sets `messageId` when missing, `receivedAt`, the clock-skew-corrected `timestamp`
/// (keeping the client's as `originalTimestamp`) and `context.ip` when missing. An
/// identify whose traits came only in `context.traits` (RudderStack's SDKs send them
/// there) gets them as `traits` too, where Segment's spec and later stages look.
fn enrich(message: &mut Message, batch_sent_at: Option<Timestamp>, context: &RequestContext) {
    if let Message::Identify(identify) = message
        && identify.traits.as_ref().is_none_or(Map::is_empty)
        && let Some(Value::Object(traits)) = identify
            .common
            .context
            .as_ref()
            .and_then(|c| c.get("traits"))
    {
        identify.traits = Some(traits.clone());
    }
    let common = message.common_mut();
    if common.message_id.is_none() {
        common.message_id = Some(uuid::Uuid::new_v4().to_string());
    }
    let received = context.received_at;
    common.received_at = Some(received);
    if common.sent_at.is_none() {
        common.sent_at = batch_sent_at;
    }
    // RudderStack's SDKs send `originalTimestamp` rather than `timestamp`.
    common.timestamp = match common.timestamp.or(common.original_timestamp) {
        None => Some(received),
        Some(happened) => {
            common.original_timestamp = Some(happened);
            let corrected = common
                .sent_at
                .map(|sent| sent.duration_since(happened))
                .and_then(|delay| received.checked_sub(delay).ok());
            Some(corrected.unwrap_or(happened))
        }
    };
    if let Some(ip) = context.client_ip {
        let ctx = common.context.get_or_insert_with(Map::new);
        ctx.entry("ip")
            .or_insert_with(|| Value::from(ip.to_string()));
    }
    if context.store_ip != StoreIp::Full
        && let Some(ctx) = common.context.as_mut()
        && let Some(given) = ctx.remove("ip")
    {
        // An address the event gave is treated like the peer's; one that is no address
        // is not kept either.
        let kept = given
            .as_str()
            .and_then(|text| text.trim().parse::<IpAddr>().ok())
            .and_then(|ip| context.store_ip.apply(ip));
        if let Some(ip) = kept {
            ctx.insert("ip".to_owned(), Value::from(ip.to_string()));
        }
    }
}

/// The write key from an `Authorization: Basic` header (user part), if there is one.
pub(crate) fn basic_auth_key(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(value) = headers.get(header::AUTHORIZATION) else {
        return Ok(None);
    };
    let bad =
        || ApiError::Unauthorized("the Authorization header is not HTTP Basic with a write key");
    let value = value.to_str().map_err(|_| bad())?;
    let encoded = value
        .strip_prefix("Basic ")
        .or_else(|| value.strip_prefix("basic "))
        .ok_or_else(bad)?;
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .map_err(|_| bad())?;
    let decoded = String::from_utf8(decoded).map_err(|_| bad())?;
    let user = decoded
        .split_once(':')
        .map_or(decoded.as_str(), |(user, _)| user);
    Ok(Some(user.to_owned()))
}

/// Reads the body, at most [`MAX_BATCH_BYTES`] after gzip decompression, all of it
/// within `deadline`.
async fn read_body(request: Request, deadline: Duration) -> Result<Vec<u8>, ApiError> {
    let too_large = || {
        ApiError::too_large(
            "body_too_large",
            format!("a request body may be at most {MAX_BATCH_BYTES} bytes"),
        )
    };
    let gzip = match request.headers().get(header::CONTENT_ENCODING) {
        None => false,
        Some(v) if v.as_bytes().eq_ignore_ascii_case(b"gzip") => true,
        Some(v) if v.as_bytes().eq_ignore_ascii_case(b"identity") => false,
        Some(v) => {
            return Err(ApiError::invalid(
                "unsupported_encoding",
                format!(
                    "Content-Encoding {:?} is not supported; send gzip or nothing",
                    String::from_utf8_lossy(v.as_bytes())
                ),
            ));
        }
    };
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|len| len > MAX_BATCH_BYTES) {
        return Err(too_large());
    }
    let raw = tokio::time::timeout(
        deadline,
        axum::body::to_bytes(Body::new(request.into_body()), MAX_BATCH_BYTES),
    )
    .await
    .map_err(|_| {
        ApiError::Timeout(format!(
            "the body did not arrive within {} s",
            deadline.as_secs()
        ))
    })?
    .map_err(|error| {
        let over_limit = std::error::Error::source(&error)
            .is_some_and(|e| e.is::<http_body_util::LengthLimitError>());
        if over_limit {
            too_large()
        } else {
            // The body stopped arriving (the idle timeout) or broke off.
            ApiError::Timeout(format!("the body did not arrive: {error}"))
        }
    })?;
    if !gzip {
        return Ok(raw.to_vec());
    }
    let mut decoded = Vec::new();
    GzDecoder::new(raw.as_ref())
        .take(MAX_BATCH_BYTES as u64 + 1)
        .read_to_end(&mut decoded)
        .map_err(|e| ApiError::invalid("invalid_gzip", format!("the gzip body is corrupt: {e}")))?;
    if decoded.len() > MAX_BATCH_BYTES {
        return Err(too_large());
    }
    Ok(decoded)
}

impl AppState {
    /// The source behind a write key.
    pub(crate) fn authenticate(&self, key: Option<&str>) -> Result<Arc<str>, ApiError> {
        let key = key.ok_or(ApiError::Unauthorized(
            "no write key: send HTTP Basic auth with the write key as user, or writeKey in the body",
        ))?;
        self.source_for(key)
            .ok_or(ApiError::Unauthorized("unknown write key"))
    }

    fn check_rate(&self, source: &str, events: usize) -> Result<(), ApiError> {
        match &self.limiter {
            Some(limiter) => limiter
                .check(source, events, Instant::now())
                .map_err(|retry_after_secs| ApiError::RateLimited { retry_after_secs }),
            None => Ok(()),
        }
    }

    /// The client's address: the peer, or, when the peer is a trusted proxy, the
    /// right-most `X-Forwarded-For` address that is not a trusted proxy.
    fn client_ip(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
        let trusted = |ip: &IpAddr| self.trusted_proxies.iter().any(|net| net.contains(ip));
        if !trusted(&peer) {
            return peer;
        }
        let forwarded: Vec<IpAddr> = headers
            .get_all("x-forwarded-for")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|part| part.trim().parse().ok())
            .collect();
        forwarded
            .iter()
            .rev()
            .find(|ip| !trusted(ip))
            .or(forwarded.first())
            .copied()
            .unwrap_or(peer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn context(received: &str) -> RequestContext {
        RequestContext {
            received_at: received.parse().expect("timestamp"),
            client_ip: Some("203.0.113.9".parse().expect("ip")),
            store_ip: StoreIp::Full,
        }
    }

    fn enriched(value: Value, batch_sent_at: Option<&str>) -> Value {
        let mut message: Message = serde_json::from_value(value).expect("message");
        let sent = batch_sent_at.map(|s| s.parse().expect("timestamp"));
        enrich(&mut message, sent, &context("2024-01-01T12:00:00Z"));
        serde_json::to_value(message).expect("json")
    }

    #[test]
    fn corrects_clock_skew_and_keeps_the_original() {
        // The client's clock is 1 h fast: it says it sent at 13:00:05 an event of 13:00:00.
        let out = enriched(
            json!({"type": "track", "event": "E", "userId": "u",
                   "timestamp": "2024-01-01T13:00:00Z", "sentAt": "2024-01-01T13:00:05Z"}),
            None,
        );
        assert_eq!(out["timestamp"], json!("2024-01-01T11:59:55Z"));
        assert_eq!(out["originalTimestamp"], json!("2024-01-01T13:00:00Z"));
        assert_eq!(out["receivedAt"], json!("2024-01-01T12:00:00Z"));
        assert_eq!(out["context"]["ip"], json!("203.0.113.9"));
        assert!(out["messageId"].as_str().is_some_and(|id| id.len() == 36));
    }

    #[test]
    fn uses_batch_sent_at_original_timestamp_and_keeps_client_ip() {
        let out = enriched(
            json!({"type": "track", "event": "E", "userId": "u", "messageId": "m",
                   "originalTimestamp": "2024-01-01T10:00:00Z", "context": {"ip": "1.2.3.4"}}),
            Some("2024-01-01T10:00:10Z"),
        );
        assert_eq!(out["timestamp"], json!("2024-01-01T11:59:50Z"));
        assert_eq!(out["messageId"], json!("m"));
        assert_eq!(out["context"]["ip"], json!("1.2.3.4"));
    }

    #[test]
    fn without_timestamps_the_event_happened_on_receipt() {
        let out = enriched(json!({"type": "page", "anonymousId": "a"}), None);
        assert_eq!(out["timestamp"], json!("2024-01-01T12:00:00Z"));
        assert!(out.get("originalTimestamp").is_none());
        let out = enriched(
            json!({"type": "page", "anonymousId": "a", "timestamp": "2024-01-01T09:00:00Z"}),
            None,
        );
        assert_eq!(
            out["timestamp"],
            json!("2024-01-01T09:00:00Z"),
            "no sentAt, no correction"
        );
    }

    #[test]
    fn the_ip_policy_applies_to_the_peer_and_to_addresses_events_give() {
        let run = |store_ip, event: Value| {
            let mut message: Message = serde_json::from_value(event).expect("message");
            let mut context = context("2024-01-01T12:00:00Z");
            context.store_ip = store_ip;
            enrich(&mut message, None, &context);
            serde_json::to_value(message).expect("json")["context"]["ip"].clone()
        };
        let plain = json!({"type": "page", "anonymousId": "a"});
        let given = json!({"type": "page", "anonymousId": "a", "context": {"ip": "2001:db8:85a3:8d3:1319:8a2e:370:7348"}});
        let junk = json!({"type": "page", "anonymousId": "a", "context": {"ip": "not an ip"}});
        assert_eq!(run(StoreIp::Full, plain.clone()), json!("203.0.113.9"));
        assert_eq!(run(StoreIp::Truncated, plain.clone()), json!("203.0.113.0"));
        assert_eq!(
            run(StoreIp::Truncated, given.clone()),
            json!("2001:db8:85a3::")
        );
        assert_eq!(run(StoreIp::Truncated, junk), Value::Null);
        assert_eq!(run(StoreIp::None, plain), Value::Null);
        assert_eq!(run(StoreIp::None, given), Value::Null);
    }

    #[test]
    fn identify_traits_sent_in_context_are_lifted() {
        let out = enriched(
            json!({"type": "identify", "userId": "u", "context": {"traits": {"email": "a@b.c"}}}),
            None,
        );
        assert_eq!(out["traits"], json!({"email": "a@b.c"}));
        assert_eq!(
            out["context"]["traits"],
            json!({"email": "a@b.c"}),
            "context is kept"
        );
        let out = enriched(
            json!({"type": "identify", "userId": "u", "traits": {"plan": "pro"},
                   "context": {"traits": {"email": "a@b.c"}}}),
            None,
        );
        assert_eq!(
            out["traits"],
            json!({"plan": "pro"}),
            "the event's own traits win"
        );
    }

    #[test]
    fn basic_auth_takes_the_user_part() {
        let mut headers = HeaderMap::new();
        assert_eq!(basic_auth_key(&headers).expect("none"), None);
        for raw in ["key:", "key", "key:ignored"] {
            let encoded = base64::engine::general_purpose::STANDARD.encode(raw);
            headers.insert(
                header::AUTHORIZATION,
                format!("Basic {encoded}").parse().expect("header"),
            );
            assert_eq!(
                basic_auth_key(&headers).expect("key").as_deref(),
                Some("key")
            );
        }
        headers.insert(header::AUTHORIZATION, "Bearer x".parse().expect("header"));
        assert!(basic_auth_key(&headers).is_err());
    }
}

//! Webhook deliveries: a JSON POST signed with HMAC-SHA256.
//!
//! The body is `{"id", "idempotency_key", "campaign", "profile_id", "segment", "type"
//! (`entered`, `exited` or `event`), "event", "message"}`. Headers: `Idempotency-Key` (the same on every attempt) and
//! `Kith-Signature: t={unix seconds},v1={hex HMAC-SHA256(secret, "{t}.{body}")}`, in the
//! manner of Stripe's webhook signatures, so that a receiver checks the sender and
//! refuses replays of old requests.

use hmac::{Hmac, Mac};
use jiff::Timestamp;
use serde_json::json;
use sha2::Sha256;

use super::{Attempt, Delivery};

/// The header carrying the signature.
pub const SIGNATURE_HEADER: &str = "kith-signature";

/// `v1`: hex HMAC-SHA256 of `"{t}.{body}"` under `secret`.
pub fn sign(secret: &str, timestamp: i64, body: &[u8]) -> String {
    let mut mac =
        Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC takes keys of any size");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    mac.finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Sends one delivery.
pub fn send(
    http: &reqwest::blocking::Client,
    url: &str,
    secret: &str,
    delivery: &Delivery,
) -> Attempt {
    let body = json!({
        "id": delivery.id,
        "idempotency_key": delivery.idempotency_key,
        "campaign": delivery.campaign,
        "profile_id": delivery.profile_id,
        "segment": delivery.trigger.segment,
        "type": delivery.trigger.kind,
        "event": delivery.trigger.event,
        "message": delivery.message,
    })
    .to_string();
    let timestamp = Timestamp::now().as_second();
    let signature = format!(
        "t={timestamp},v1={}",
        sign(secret, timestamp, body.as_bytes())
    );
    let response = http
        .post(url)
        .header("content-type", "application/json")
        .header("idempotency-key", &delivery.idempotency_key)
        .header(SIGNATURE_HEADER, signature)
        .body(body)
        .send();
    match response {
        Err(error) => Attempt::Retry(format!("webhook request failed: {error}")),
        Ok(response) => {
            let status = response.status();
            if status.is_success() {
                Attempt::Delivered
            } else if status.as_u16() == 408 || status.as_u16() == 429 || status.is_server_error() {
                Attempt::Retry(format!("webhook answered {status}"))
            } else {
                Attempt::Fatal(format!("webhook answered {status}"))
            }
        }
    }
}

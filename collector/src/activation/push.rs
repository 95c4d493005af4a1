//! Push providers, each speaking its documented protocol, with every base URL
//! configurable:
//!
//! - **FCM HTTP v1**: a JWT signed RS256 with the service account's private key is
//!   exchanged at its `token_uri` for an OAuth access token (cached until five minutes
//!   before it expires); messages go to
//!   `POST {base}/v1/projects/{project_id}/messages:send`. `UNREGISTERED` retires the
//!   token.
//! - **APNs**: token-based auth with an ES256 JWT (`iss` team, `kid` key) reused for 50
//!   minutes; `POST {base}/3/device/{token}` over HTTP/2 and TLS with `apns-topic`,
//!   `apns-push-type` and `apns-priority`. `410` (Unregistered) and `BadDeviceToken`
//!   retire the token.
//! - **Web Push**: the payload encrypted per RFC 8291 (`aes128gcm`: ECDH P-256 with the
//!   subscription's `p256dh`, HKDF-SHA256 with its `auth` secret, AES-128-GCM), and the
//!   request authorised per RFC 8292 (VAPID: an ES256 JWT for the push service's origin,
//!   with the application server's public key; signed for 12 hours, reused for one). `404` and `410` retire the subscription.
//!
//! A campaign's rendered message gives `title`, `body` and `data` (an object).

use std::collections::BTreeMap;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use aes_gcm::aead::{Aead, KeyInit};
use aes_gcm::{Aes128Gcm, Nonce};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hkdf::Hkdf;
use jiff::Timestamp;
use p256::ecdsa::signature::Signer as _;
use p256::elliptic_curve::sec1::ToEncodedPoint;
use rsa::pkcs8::DecodePrivateKey as _;
use rsa::signature::SignatureEncoding as _;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sha2::Sha256;

use super::Attempt;
use super::outbound::{Outbound, answer_json};

/// FCM's public endpoint.
pub const FCM_BASE: &str = "https://fcm.googleapis.com";
/// APNs' production endpoint.
pub const APNS_BASE: &str = "https://api.push.apple.com";
/// The OAuth scope FCM sends need.
const FCM_SCOPE: &str = "https://www.googleapis.com/auth/firebase.messaging";
/// How long an APNs provider token is reused (Apple refuses ones older than an hour).
const APNS_TOKEN_LIFE: Duration = Duration::from_secs(50 * 60);
/// How long a VAPID header is reused (it is signed for 12 hours).
const VAPID_REUSE: Duration = Duration::from_secs(3600);
/// Web Push record size (one record: the payload is small).
const RECORD_SIZE: u32 = 4096;

/// Base64url without padding, as JWTs and Web Push use it.
pub fn b64url(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

/// A compact JWT: `header.claims.signature`, the signature made by `sign` over the
/// first two parts.
pub fn jwt(header: &Value, claims: &Value, sign: impl FnOnce(&[u8]) -> Vec<u8>) -> String {
    let signing_input = format!(
        "{}.{}",
        b64url(header.to_string().as_bytes()),
        b64url(claims.to_string().as_bytes())
    );
    let signature = sign(signing_input.as_bytes());
    format!("{signing_input}.{}", b64url(&signature))
}

/// The fields of a Google service-account key file that FCM needs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceAccount {
    /// The Firebase project.
    pub project_id: String,
    /// The account, the JWT's issuer.
    pub client_email: String,
    /// Its RSA private key, PKCS#8 PEM.
    pub private_key: String,
    /// Where the JWT is exchanged for an access token.
    pub token_uri: String,
}

/// A message as the providers take it, from a campaign's rendered template.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Notification {
    /// The title.
    pub title: Option<String>,
    /// The text.
    pub body: Option<String>,
    /// Extra key/values.
    pub data: serde_json::Map<String, Value>,
}

impl Notification {
    /// `title`, `body` and `data` of a rendered template.
    pub fn of(message: &Value) -> Self {
        let text = |k: &str| message.get(k).and_then(Value::as_str).map(str::to_owned);
        Notification {
            title: text("title"),
            body: text("body"),
            data: message
                .get("data")
                .and_then(Value::as_object)
                .cloned()
                .unwrap_or_default(),
        }
    }
}

/// Cached credentials: FCM access tokens and APNs provider tokens, per destination.
#[derive(Debug, Default)]
pub struct Credentials {
    cached: Mutex<BTreeMap<String, (String, Instant)>>,
    /// Held while a credential is made, so that senders running at once make one.
    making: Mutex<()>,
}

impl Credentials {
    /// The cached credential under `name`, or the one `make` makes (then cached for
    /// the life it answers); one maker at a time.
    fn get_or_make<E>(
        &self,
        name: &str,
        make: impl FnOnce() -> Result<(String, Duration), E>,
    ) -> Result<String, E> {
        if let Some(found) = self.get(name) {
            return Ok(found);
        }
        let _making = self.making.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(found) = self.get(name) {
            return Ok(found);
        }
        let (made, life) = make()?;
        self.put(name, &made, life);
        Ok(made)
    }

    fn get(&self, destination: &str) -> Option<String> {
        let cached = self.cached.lock().unwrap_or_else(PoisonError::into_inner);
        cached
            .get(destination)
            .filter(|(_, until)| Instant::now() < *until)
            .map(|(token, _)| token.clone())
    }

    fn put(&self, destination: &str, token: &str, life: Duration) {
        self.cached
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(
                destination.to_owned(),
                (token.to_owned(), Instant::now() + life),
            );
    }

    /// Forgets a destination's credential (it was refused).
    pub fn forget(&self, destination: &str) {
        self.cached
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(destination);
    }
}

/// An FCM access token for `account`, from the cache or a new exchange.
fn fcm_access_token(
    http: &reqwest::blocking::Client,
    credentials: &Credentials,
    destination: &str,
    account: &ServiceAccount,
) -> Result<String, Attempt> {
    credentials.get_or_make(destination, || fcm_exchange(http, account))
}

/// Exchanges a signed JWT for an FCM access token and its life.
fn fcm_exchange(
    http: &reqwest::blocking::Client,
    account: &ServiceAccount,
) -> Result<(String, Duration), Attempt> {
    let key = rsa::RsaPrivateKey::from_pkcs8_pem(&account.private_key)
        .map_err(|e| Attempt::Fatal(format!("the service account's private key: {e}")))?;
    let signer = rsa::pkcs1v15::SigningKey::<Sha256>::new(key);
    let now = Timestamp::now().as_second();
    let assertion = jwt(
        &json!({"alg": "RS256", "typ": "JWT"}),
        &json!({"iss": account.client_email, "scope": FCM_SCOPE, "aud": account.token_uri,
                "iat": now, "exp": now + 3600}),
        |input| signer.sign(input).to_vec(),
    );
    let answer = http
        .post(&account.token_uri)
        .form(&[
            ("grant_type", "urn:ietf:params:oauth:grant-type:jwt-bearer"),
            ("assertion", assertion.as_str()),
        ])
        .send()
        .map_err(|e| Attempt::Retry(format!("OAuth token exchange failed: {e}")))?;
    let status = answer.status();
    let body = answer_json(answer);
    if !status.is_success() {
        let why = format!("OAuth token exchange answered {status}: {body}");
        return Err(if status.is_server_error() {
            Attempt::Retry(why)
        } else {
            Attempt::Fatal(why)
        });
    }
    let token = body["access_token"]
        .as_str()
        .ok_or_else(|| Attempt::Retry(format!("no access_token in {body}")))?;
    let life = body["expires_in"]
        .as_u64()
        .unwrap_or(3600)
        .saturating_sub(300);
    Ok((token.to_owned(), Duration::from_secs(life)))
}

/// Sends one FCM message to `token`.
pub fn fcm_send(
    http: &reqwest::blocking::Client,
    credentials: &Credentials,
    destination: &str,
    account: &ServiceAccount,
    base: &str,
    token: &str,
    message: &Notification,
) -> Attempt {
    let access = match fcm_access_token(http, credentials, destination, account) {
        Ok(access) => access,
        Err(attempt) => return attempt,
    };
    let mut payload = json!({"token": token});
    if message.title.is_some() || message.body.is_some() {
        payload["notification"] = json!({"title": message.title, "body": message.body});
    }
    if !message.data.is_empty() {
        // FCM data values are strings.
        let data: serde_json::Map<String, Value> = message
            .data
            .iter()
            .map(|(k, v)| {
                let text = v.as_str().map_or_else(|| v.to_string(), str::to_owned);
                (k.clone(), Value::String(text))
            })
            .collect();
        payload["data"] = Value::Object(data);
    }
    let url = format!(
        "{}/v1/projects/{}/messages:send",
        base.trim_end_matches('/'),
        account.project_id
    );
    let response = match http
        .post(url)
        .bearer_auth(&access)
        .json(&json!({"message": payload}))
        .send()
    {
        Ok(response) => response,
        Err(e) => return Attempt::Retry(format!("FCM request failed: {e}")),
    };
    let status = response.status();
    if status.is_success() {
        return Attempt::Delivered;
    }
    let body = answer_json(response);
    let codes: Vec<&str> = body["error"]["details"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|d| d["errorCode"].as_str())
        .collect();
    let why = format!("FCM answered {status}: {body}");
    if codes.contains(&"UNREGISTERED") {
        Attempt::Gone(why)
    } else if status.as_u16() == 401 {
        credentials.forget(destination);
        Attempt::Retry(why)
    } else if status.as_u16() == 429 || status.is_server_error() {
        Attempt::Retry(why)
    } else {
        Attempt::Fatal(why)
    }
}

/// APNs token-based auth: the key that signs provider tokens.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApnsKey {
    /// The developer team.
    pub team_id: String,
    /// The key's id.
    pub key_id: String,
    /// The `.p8` key: P-256, PKCS#8 PEM.
    pub private_key: String,
}

fn apns_provider_token(
    credentials: &Credentials,
    destination: &str,
    key: &ApnsKey,
) -> Result<String, Attempt> {
    credentials.get_or_make(destination, || {
        let signing = p256::ecdsa::SigningKey::from_pkcs8_pem(&key.private_key)
            .map_err(|e| Attempt::Fatal(format!("the APNs key: {e}")))?;
        let token = jwt(
            &json!({"alg": "ES256", "kid": key.key_id}),
            &json!({"iss": key.team_id, "iat": Timestamp::now().as_second()}),
            |input| {
                let signature: p256::ecdsa::Signature = signing.sign(input);
                signature.to_bytes().to_vec()
            },
        );
        Ok((token, APNS_TOKEN_LIFE))
    })
}

/// Sends one APNs notification to a device token.
#[allow(clippy::too_many_arguments)]
pub fn apns_send(
    http: &reqwest::blocking::Client,
    credentials: &Credentials,
    destination: &str,
    key: &ApnsKey,
    base: &str,
    topic: &str,
    token: &str,
    message: &Notification,
    apns_id: &str,
) -> Attempt {
    let provider_token = match apns_provider_token(credentials, destination, key) {
        Ok(token) => token,
        Err(attempt) => return attempt,
    };
    let mut body = json!({"aps": {"alert": {"title": message.title, "body": message.body}}});
    for (k, v) in &message.data {
        if k != "aps" {
            body[k] = v.clone();
        }
    }
    let url = format!("{}/3/device/{token}", base.trim_end_matches('/'));
    let response = match http
        .post(url)
        .header("authorization", format!("bearer {provider_token}"))
        .header("apns-topic", topic)
        .header("apns-push-type", "alert")
        .header("apns-priority", "10")
        .header("apns-id", apns_id)
        .json(&body)
        .send()
    {
        Ok(response) => response,
        Err(e) => return Attempt::Retry(format!("APNs request failed: {e}")),
    };
    let status = response.status();
    if status.is_success() {
        return Attempt::Delivered;
    }
    let answer = answer_json(response);
    let reason = answer["reason"].as_str().unwrap_or_default();
    let why = format!("APNs answered {status}: {answer}");
    match (status.as_u16(), reason) {
        (410, _) | (400, "BadDeviceToken") => Attempt::Gone(why),
        (403, "ExpiredProviderToken") => {
            credentials.forget(destination);
            Attempt::Retry(why)
        }
        (429, _) => Attempt::Retry(why),
        (code, _) if code >= 500 => Attempt::Retry(why),
        _ => Attempt::Fatal(why),
    }
}

/// A browser's push subscription (`PushSubscription.toJSON()`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Subscription {
    /// The push service URL.
    pub endpoint: String,
    /// Its keys.
    pub keys: SubscriptionKeys,
}

/// A subscription's keys, base64url.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct SubscriptionKeys {
    /// The user agent's P-256 public key.
    pub p256dh: String,
    /// The authentication secret.
    pub auth: String,
}

fn b64_decode(text: &str) -> Result<Vec<u8>, String> {
    let trimmed = text.trim_end_matches('=');
    URL_SAFE_NO_PAD
        .decode(trimmed)
        .or_else(|_| base64::engine::general_purpose::STANDARD_NO_PAD.decode(trimmed))
        .map_err(|e| format!("bad base64: {e}"))
}

/// Encrypts `payload` for a subscription (RFC 8291 `aes128gcm`), with a fresh sender
/// key pair and salt. The answer is the whole request body.
///
/// # Errors
///
/// A subscription whose keys are not a P-256 point and a 16-byte secret.
pub fn encrypt(subscription: &Subscription, payload: &[u8]) -> Result<Vec<u8>, String> {
    let ua_public_bytes = b64_decode(&subscription.keys.p256dh)?;
    let ua_public = p256::PublicKey::from_sec1_bytes(&ua_public_bytes)
        .map_err(|_| "p256dh is not a P-256 public key".to_owned())?;
    let auth = b64_decode(&subscription.keys.auth)?;
    if auth.len() != 16 {
        return Err("auth is not 16 bytes".to_owned());
    }
    let sender = p256::ecdh::EphemeralSecret::random(&mut rand_core::OsRng);
    let sender_public = sender.public_key().to_encoded_point(false);
    let shared = sender.diffie_hellman(&ua_public);
    let mut key_info = b"WebPush: info\0".to_vec();
    key_info.extend_from_slice(ua_public.to_encoded_point(false).as_bytes());
    key_info.extend_from_slice(sender_public.as_bytes());
    let mut ikm = [0u8; 32];
    Hkdf::<Sha256>::new(Some(&auth), shared.raw_secret_bytes())
        .expand(&key_info, &mut ikm)
        .map_err(|e| e.to_string())?;
    let mut salt = [0u8; 16];
    rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut salt);
    let prk = Hkdf::<Sha256>::new(Some(&salt), &ikm);
    let mut cek = [0u8; 16];
    let mut nonce = [0u8; 12];
    prk.expand(b"Content-Encoding: aes128gcm\0", &mut cek)
        .map_err(|e| e.to_string())?;
    prk.expand(b"Content-Encoding: nonce\0", &mut nonce)
        .map_err(|e| e.to_string())?;
    let mut padded = payload.to_vec();
    padded.push(2); // the last (and only) record's delimiter
    let cipher = Aes128Gcm::new_from_slice(&cek).map_err(|e| e.to_string())?;
    let sealed = cipher
        .encrypt(Nonce::from_slice(&nonce), padded.as_slice())
        .map_err(|e| e.to_string())?;
    let mut body = salt.to_vec();
    body.extend_from_slice(&RECORD_SIZE.to_be_bytes());
    body.push(65);
    body.extend_from_slice(sender_public.as_bytes());
    body.extend_from_slice(&sealed);
    Ok(body)
}

/// The application server's VAPID key: a P-256 private key, as the raw 32-byte scalar
/// in base64url (what `web-push generate-vapid-keys` prints) or PKCS#8 PEM.
///
/// # Errors
///
/// A key that is neither.
pub fn vapid_key(text: &str) -> Result<p256::ecdsa::SigningKey, String> {
    if text.contains("BEGIN") {
        return p256::ecdsa::SigningKey::from_pkcs8_pem(text).map_err(|e| e.to_string());
    }
    let bytes = b64_decode(text)?;
    p256::ecdsa::SigningKey::from_slice(&bytes).map_err(|e| e.to_string())
}

/// The VAPID public key of a private one, base64url of the uncompressed point.
pub fn vapid_public(key: &p256::ecdsa::SigningKey) -> String {
    b64url(key.verifying_key().to_encoded_point(false).as_bytes())
}

/// Sends one Web Push message.
#[allow(clippy::too_many_arguments)]
pub fn web_push_send(
    http: &reqwest::blocking::Client,
    outbound: &Outbound,
    credentials: &Credentials,
    destination: &str,
    vapid: &str,
    subject: &str,
    subscription: &str,
    message: &Value,
) -> Attempt {
    let subscription: Subscription = match serde_json::from_str(subscription) {
        Ok(s) => s,
        Err(e) => return Attempt::Gone(format!("not a push subscription: {e}")),
    };
    let endpoint = match outbound.check_push_endpoint(&subscription.endpoint) {
        Ok(endpoint) => endpoint,
        Err(why) => return Attempt::Gone(why),
    };
    let body = match encrypt(&subscription, message.to_string().as_bytes()) {
        Ok(body) => body,
        Err(e) => return Attempt::Gone(format!("cannot encrypt for the subscription: {e}")),
    };
    // One VAPID header per push service origin, signed for 12 hours and reused for one.
    let audience = endpoint.origin().ascii_serialization();
    let cache_key = format!("{destination}\0{audience}");
    let authorization = credentials.get_or_make(&cache_key, || {
        let key = vapid_key(vapid).map_err(|e| Attempt::Fatal(format!("the VAPID key: {e}")))?;
        let exp = Timestamp::now().as_second() + 12 * 3600;
        let token = jwt(
            &json!({"typ": "JWT", "alg": "ES256"}),
            &json!({"aud": audience, "exp": exp, "sub": subject}),
            |input| {
                let signature: p256::ecdsa::Signature = key.sign(input);
                signature.to_bytes().to_vec()
            },
        );
        Ok((
            format!("vapid t={token}, k={}", vapid_public(&key)),
            VAPID_REUSE,
        ))
    });
    let authorization = match authorization {
        Ok(header) => header,
        Err(attempt) => return attempt,
    };
    let response = match http
        .post(endpoint)
        .header("authorization", authorization)
        .header("content-encoding", "aes128gcm")
        .header("content-type", "application/octet-stream")
        .header("ttl", "86400")
        .header("urgency", "normal")
        .body(body)
        .send()
    {
        Ok(response) => response,
        Err(e) => return Attempt::Retry(format!("push service request failed: {e}")),
    };
    let status = response.status();
    let why = format!("push service answered {status}");
    match status.as_u16() {
        200..=299 => Attempt::Delivered,
        404 | 410 => Attempt::Gone(why),
        429 => Attempt::Retry(why),
        code if code >= 500 => Attempt::Retry(why),
        _ => Attempt::Fatal(why),
    }
}

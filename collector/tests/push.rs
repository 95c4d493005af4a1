//! Push notifications through local servers that speak each provider's documented
//! protocol and check what they receive:
//!
//! - FCM HTTP v1: the OAuth token endpoint verifies the JWT assertion's RS256 signature
//!   with the service account's public key and its claims; the send endpoint checks the
//!   bearer token and the message; `UNREGISTERED` retires a token.
//! - Web Push: the push service verifies the VAPID JWT (ES256, with the key in `k`) and
//!   decrypts the RFC 8291 `aes128gcm` body with the subscription's private key; `410`
//!   retires the subscription.
//! - APNs: a TLS server speaking HTTP/2 only verifies the provider token (ES256, with
//!   the `.p8` key's public half, `kid` and `iss`) and the `apns-topic`,
//!   `apns-push-type` and `apns-id` headers; `410 Unregistered` retires the token.
//!
//! End to end: an event moves a profile into a segment and the personalised push
//! arrives exactly once, also across a collector restart while deliveries are pending.

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use aes_gcm::aead::{Aead, KeyInit};
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use common::{Harness, eventually};
use p256::ecdsa::signature::Verifier as _;
use p256::elliptic_curve::sec1::ToEncodedPoint;
use rsa::pkcs8::DecodePrivateKey as _;
use serde_json::{Value, json};

const FCM_KEY: &str = include_str!("fixtures/fcm-service-account-key.pem");
const CLIENT_EMAIL: &str = "kith-test@kith-test.iam.gserviceaccount.com";

fn b64(text: &str) -> Vec<u8> {
    URL_SAFE_NO_PAD
        .decode(text.trim_end_matches('='))
        .expect("base64url")
}

/// Splits a compact JWT and decodes its header and claims.
fn jwt_parts(token: &str) -> (Value, Value, String, Vec<u8>) {
    let mut parts = token.split('.');
    let (header, claims, signature) = (
        parts.next().expect("header"),
        parts.next().expect("claims"),
        parts.next().expect("signature"),
    );
    (
        serde_json::from_slice(&b64(header)).expect("header json"),
        serde_json::from_slice(&b64(claims)).expect("claims json"),
        format!("{header}.{claims}"),
        b64(signature),
    )
}

/// Decodes `%XX` and `+` of a form value.
fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).expect("hex");
                out.push(u8::from_str_radix(hex, 16).expect("hex"));
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            other => {
                out.push(other);
                i += 1;
            }
        }
    }
    String::from_utf8(out).expect("utf-8")
}

fn now() -> i64 {
    jiff::Timestamp::now().as_second()
}

/// A segment "pro" and a campaign on entering it, to a destination made from `body`.
fn campaign(h: &Harness, destination: Value) -> String {
    h.create(
        "/v1/segments",
        json!({"key": "pro", "definition": "traits.plan = \"pro\""}),
    );
    let destination = h.create("/v1/destinations", destination);
    let id = destination["id"].as_str().expect("id").to_owned();
    h.create(
        "/v1/campaigns",
        json!({"trigger": {"type": "segment_entered", "segment": "pro"}, "destination": id,
               "template": {"title": "Hi {{traits.first_name}}", "body": "Welcome to {{segment}}",
                            "data": {"screen": "offers", "level": 2}}}),
    );
    destination["id"].as_str().expect("id").to_owned()
}

fn tokens(h: &Harness, user: &str) -> Vec<Value> {
    let profile: Value = h
        .admin_get(&format!("/v1/profiles?identifier=user_id:{user}"))
        .json()
        .expect("profile");
    let id = profile["id"].as_str().expect("id");
    let tokens: Value = h
        .admin_get(&format!("/v1/profiles/{id}/push-tokens"))
        .json()
        .expect("tokens");
    tokens["tokens"].as_array().expect("tokens").clone()
}

fn timeline_has(h: &Harness, user: &str, event: &str) -> bool {
    let profile: Value = h
        .admin_get(&format!("/v1/profiles?identifier=user_id:{user}"))
        .json()
        .expect("profile");
    let id = profile["id"].as_str().expect("id");
    let events: Value = h
        .admin_get(&format!("/v1/profiles/{id}/events"))
        .json()
        .expect("events");
    events["events"]
        .as_array()
        .expect("events")
        .iter()
        .any(|e| e["message"]["event"] == event)
}

// ---------------------------------------------------------------------------------
// FCM

#[derive(Default)]
struct Fcm {
    /// Sends answer 503 while set.
    unavailable: bool,
    exchanges: usize,
    messages: Vec<Value>,
    refused: Vec<String>,
}

type FcmState = Arc<Mutex<Fcm>>;

async fn fcm_token(State(fcm): State<FcmState>, body: String) -> impl IntoResponse {
    let form: BTreeMap<String, String> = body
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .map(|(k, v)| (k.to_owned(), percent_decode(v)))
        .collect();
    let mut fcm = fcm.lock().expect("fcm");
    let refuse = |fcm: &mut Fcm, why: &str| {
        fcm.refused.push(why.to_owned());
        (
            StatusCode::BAD_REQUEST,
            axum::Json(json!({"error": "invalid_grant"})),
        )
    };
    if form.get("grant_type").map(String::as_str)
        != Some("urn:ietf:params:oauth:grant-type:jwt-bearer")
    {
        return refuse(&mut fcm, "grant_type");
    }
    let (header, claims, signed, signature) = jwt_parts(form.get("assertion").expect("jwt"));
    let private = rsa::RsaPrivateKey::from_pkcs8_pem(FCM_KEY).expect("key");
    let public = rsa::pkcs1v15::VerifyingKey::<sha2::Sha256>::new(private.to_public_key());
    let signature = rsa::pkcs1v15::Signature::try_from(signature.as_slice()).expect("signature");
    if header["alg"] != "RS256" || public.verify(signed.as_bytes(), &signature).is_err() {
        return refuse(&mut fcm, "signature");
    }
    let exp = claims["exp"].as_i64().unwrap_or(0);
    if claims["iss"] != CLIENT_EMAIL
        || !claims["scope"]
            .as_str()
            .is_some_and(|s| s.contains("https://www.googleapis.com/auth/firebase.messaging"))
        || !claims["aud"]
            .as_str()
            .is_some_and(|a| a.ends_with("/token"))
        || exp <= now()
        || exp > now() + 3700
    {
        return refuse(&mut fcm, "claims");
    }
    fcm.exchanges += 1;
    (
        StatusCode::OK,
        axum::Json(
            json!({"access_token": "ya29.test-access", "expires_in": 3599, "token_type": "Bearer"}),
        ),
    )
}

async fn fcm_send(
    State(fcm): State<FcmState>,
    Path(project): Path<String>,
    headers: HeaderMap,
    axum::Json(body): axum::Json<Value>,
) -> impl IntoResponse {
    let mut fcm = fcm.lock().expect("fcm");
    if headers.get("authorization").and_then(|v| v.to_str().ok()) != Some("Bearer ya29.test-access")
        || project != "kith-test/messages:send"
    {
        fcm.refused.push(format!("auth or path {project}"));
        return (
            StatusCode::UNAUTHORIZED,
            axum::Json(json!({"error": {"code": 401}})),
        );
    }
    if fcm.unavailable {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(json!({"error": {"code": 503, "status": "UNAVAILABLE"}})),
        );
    }
    if body["message"]["token"] == "gone-token" {
        return (
            StatusCode::NOT_FOUND,
            axum::Json(json!({"error": {"code": 404, "status": "NOT_FOUND",
                "message": "Requested entity was not found.",
                "details": [{"@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError",
                             "errorCode": "UNREGISTERED"}]}})),
        );
    }
    fcm.messages.push(body["message"].clone());
    (
        StatusCode::OK,
        axum::Json(json!({"name": "projects/kith-test/messages/1"})),
    )
}

/// A local FCM: the token and send endpoints.
fn fcm_server(fcm: &FcmState) -> SocketAddr {
    let state = fcm.clone();
    common::serve(move |_| {
        axum::Router::new()
            .route("/token", axum::routing::post(fcm_token))
            .route("/v1/projects/{*send}", axum::routing::post(fcm_send))
            .with_state(state)
    })
}

/// An FCM destination to the local server, behind the "pro" campaign.
fn fcm_campaign(h: &Harness, addr: SocketAddr) -> String {
    let service_account = json!({
        "type": "service_account", "project_id": "kith-test", "private_key_id": "k1",
        "private_key": FCM_KEY, "client_email": CLIENT_EMAIL,
        "token_uri": format!("http://{addr}/token")
    });
    campaign(
        h,
        json!({"type": "fcm", "name": "Android", "service_account": service_account,
               "base_url": format!("http://{addr}"), "retry_base_ms": 20}),
    )
}

#[test]
fn fcm_exchanges_a_signed_jwt_sends_once_and_retires_unregistered_tokens() {
    let fcm: FcmState = Arc::default();
    let addr = fcm_server(&fcm);
    let h = Harness::with_identity();
    let destination = fcm_campaign(&h, addr);
    h.create(
        "/v1/segments",
        json!({"key": "reachable", "definition": "has push_token_fcm"}),
    );
    let shown: Value = h
        .admin_get(&format!("/v1/destinations/{destination}"))
        .json()
        .expect("json");
    assert_eq!(shown["service_account"]["private_key"], "(set)");

    h.send_batch(json!([
        {"type": "identify", "userId": "ann", "traits": {"plan": "pro", "first_name": "Ann"},
         "context": {"device": {"token": "ann-device", "type": "android"}}},
        {"type": "identify", "userId": "bo", "traits": {"plan": "pro", "first_name": "Bo"},
         "context": {"device": {"token": "gone-token", "tokenProvider": "fcm"}}}
    ]));
    eventually("both deliveries settled", || {
        let settled = h.deliveries("state=delivered").len() + h.deliveries("state=dead").len();
        (settled == 2).then_some(())
    });
    let fcm = fcm.lock().expect("fcm");
    assert!(fcm.refused.is_empty(), "refused: {:?}", fcm.refused);
    assert_eq!(
        fcm.exchanges, 1,
        "one token exchange, cached for both sends"
    );
    assert_eq!(fcm.messages.len(), 1);
    assert_eq!(
        fcm.messages[0],
        json!({"token": "ann-device",
               "notification": {"title": "Hi Ann", "body": "Welcome to pro"},
               "data": {"screen": "offers", "level": "2"}})
    );
    drop(fcm);
    let dead = h.deliveries("state=dead");
    assert!(
        dead[0]["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("UNREGISTERED")),
        "{dead:?}"
    );
    assert!(
        tokens(&h, "bo").is_empty(),
        "the unregistered token is gone"
    );
    // `has push_token_fcm`: both entered with their tokens; bo left when his was retired.
    let body: Value = h
        .admin_get("/v1/membership-changes?segment=reachable")
        .json()
        .expect("json");
    let reachable: Vec<(&str, &str)> = body["changes"]
        .as_array()
        .expect("changes")
        .iter()
        .map(|c| {
            (
                c["type"].as_str().expect("type"),
                c["cause"].as_str().expect("cause"),
            )
        })
        .collect();
    assert_eq!(
        reachable,
        [
            ("entered", "event"),
            ("entered", "event"),
            ("exited", "profile")
        ]
    );
    assert_eq!(
        tokens(&h, "ann"),
        [json!({"provider": "fcm", "token": "ann-device"})]
    );
    eventually("the timeline events", || {
        (timeline_has(&h, "ann", "Push Sent") && timeline_has(&h, "bo", "Push Failed"))
            .then_some(())
    });
}

#[test]
fn a_restart_with_pushes_pending_loses_none_and_sends_none_twice() {
    let fcm: FcmState = Arc::default();
    fcm.lock().expect("fcm").unavailable = true;
    let addr = fcm_server(&fcm);
    let mut h = Harness::with_identity();
    fcm_campaign(&h, addr);
    let users: Vec<Value> = (0..10)
        .map(|i| {
            json!({"type": "identify", "userId": format!("user-{i}"),
                   "traits": {"plan": "pro", "first_name": format!("U{i}")},
                   "context": {"device": {"token": format!("device-{i}"), "type": "android"}}})
        })
        .collect();
    h.send_batch(Value::Array(users));
    eventually("every push tried at least once", || {
        let pending = h.deliveries("state=pending");
        (pending.len() == 10 && pending.iter().all(|d| d["attempts"].as_u64() >= Some(1)))
            .then_some(())
    });
    h.restart(|config| config.identity = true);
    fcm.lock().expect("fcm").unavailable = false;
    eventually("every push delivered", || {
        (h.deliveries("state=delivered").len() == 10).then_some(())
    });
    let fcm = fcm.lock().expect("fcm");
    let mut per_token: BTreeMap<String, usize> = BTreeMap::new();
    for message in &fcm.messages {
        *per_token
            .entry(message["token"].as_str().expect("token").to_owned())
            .or_default() += 1;
        let n = message["token"]
            .as_str()
            .expect("token")
            .trim_start_matches("device-");
        assert_eq!(message["notification"]["title"], format!("Hi U{n}"));
    }
    assert_eq!(per_token.len(), 10, "every device got its push");
    assert!(
        per_token.values().all(|n| *n == 1),
        "none twice: {per_token:?}"
    );
    assert_eq!(h.deliveries("").len(), 10, "none created twice");
}

// ---------------------------------------------------------------------------------
// Web Push

/// A browser's subscription: its key pair and auth secret.
struct Browser {
    key: p256::SecretKey,
    auth: [u8; 16],
}

impl Browser {
    fn new(seed: u8) -> Self {
        Browser {
            key: p256::SecretKey::random(&mut rand_core::OsRng),
            auth: [seed; 16],
        }
    }

    fn subscription(&self, endpoint: &str) -> String {
        json!({"endpoint": endpoint, "keys": {
            "p256dh": URL_SAFE_NO_PAD.encode(self.key.public_key().to_encoded_point(false).as_bytes()),
            "auth": URL_SAFE_NO_PAD.encode(self.auth)}})
        .to_string()
    }

    /// RFC 8291 decryption, as a browser does it.
    fn decrypt(&self, body: &[u8]) -> Vec<u8> {
        let salt = &body[..16];
        let record_size = u32::from_be_bytes(body[16..20].try_into().expect("rs"));
        assert_eq!(record_size, 4096);
        let id_len = body[20] as usize;
        let sender = p256::PublicKey::from_sec1_bytes(&body[21..21 + id_len]).expect("keyid");
        let ciphertext = &body[21 + id_len..];
        let shared = p256::ecdh::diffie_hellman(self.key.to_nonzero_scalar(), sender.as_affine());
        let mut info = b"WebPush: info\0".to_vec();
        info.extend_from_slice(self.key.public_key().to_encoded_point(false).as_bytes());
        info.extend_from_slice(sender.to_encoded_point(false).as_bytes());
        let mut ikm = [0u8; 32];
        hkdf::Hkdf::<sha2::Sha256>::new(Some(&self.auth), shared.raw_secret_bytes())
            .expand(&info, &mut ikm)
            .expect("ikm");
        let prk = hkdf::Hkdf::<sha2::Sha256>::new(Some(salt), &ikm);
        let (mut cek, mut nonce) = ([0u8; 16], [0u8; 12]);
        prk.expand(b"Content-Encoding: aes128gcm\0", &mut cek)
            .expect("cek");
        prk.expand(b"Content-Encoding: nonce\0", &mut nonce)
            .expect("nonce");
        let mut plain = aes_gcm::Aes128Gcm::new_from_slice(&cek)
            .expect("cipher")
            .decrypt(aes_gcm::Nonce::from_slice(&nonce), ciphertext)
            .expect("the payload decrypts with the subscription's key");
        // Strip the padding: trailing zeros, then the delimiter 2 of the last record.
        while plain.last() == Some(&0) {
            plain.pop();
        }
        assert_eq!(plain.pop(), Some(2), "last-record delimiter");
        plain
    }
}

#[derive(Default)]
struct PushService {
    received: Vec<(String, Vec<u8>)>,
    refused: Vec<String>,
}

type PushState = Arc<Mutex<PushService>>;

async fn push_service(
    State(service): State<(PushState, String)>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> StatusCode {
    let (service, origin) = service;
    let mut service = service.lock().expect("push");
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned()
    };
    if header("content-encoding") != "aes128gcm" || header("ttl").is_empty() {
        service.refused.push("headers".to_owned());
        return StatusCode::BAD_REQUEST;
    }
    // Authorization: vapid t=<jwt>, k=<public key>
    let authorization = header("authorization");
    let Some(rest) = authorization.strip_prefix("vapid ") else {
        service.refused.push("scheme".to_owned());
        return StatusCode::UNAUTHORIZED;
    };
    let mut t = "";
    let mut k = "";
    for part in rest.split(',') {
        match part.trim().split_once('=') {
            Some(("t", v)) => t = v,
            Some(("k", v)) => k = v,
            _ => {}
        }
    }
    let (jwt_header, claims, signed, signature) = jwt_parts(t);
    let key = p256::ecdsa::VerifyingKey::from_sec1_bytes(&b64(k)).expect("k");
    let signature = p256::ecdsa::Signature::from_slice(&signature).expect("signature");
    let exp = claims["exp"].as_i64().unwrap_or(0);
    if jwt_header["alg"] != "ES256"
        || key.verify(signed.as_bytes(), &signature).is_err()
        || claims["aud"] != origin.as_str()
        || claims["sub"] != "mailto:push@example.com"
        || exp <= now()
        || exp > now() + 24 * 3600
    {
        service.refused.push(format!("vapid {claims}"));
        return StatusCode::FORBIDDEN;
    }
    if id == "gone" {
        return StatusCode::GONE;
    }
    service.received.push((id, body.to_vec()));
    StatusCode::CREATED
}

#[test]
fn web_push_is_encrypted_for_the_subscription_and_vapid_signed() {
    let service: PushState = Arc::default();
    let state = service.clone();
    let addr = common::serve(move |addr| {
        axum::Router::new()
            .route("/push/{id}", axum::routing::post(push_service))
            .with_state((state, format!("http://{addr}")))
    });
    let origin = format!("http://{addr}");

    let h = Harness::with_identity();
    let vapid = p256::SecretKey::random(&mut rand_core::OsRng);
    let destination = campaign(
        &h,
        json!({"type": "web_push", "vapid_private_key": URL_SAFE_NO_PAD.encode(vapid.to_bytes()),
               "subject": "mailto:push@example.com", "retry_base_ms": 20}),
    );
    let shown: Value = h
        .admin_get(&format!("/v1/destinations/{destination}"))
        .json()
        .expect("json");
    assert_eq!(shown["vapid_private_key"], "(set)");
    assert_eq!(
        shown["vapid_public_key"],
        URL_SAFE_NO_PAD.encode(vapid.public_key().to_encoded_point(false).as_bytes()),
        "the applicationServerKey browsers subscribe with"
    );

    let ann = Browser::new(7);
    let bo = Browser::new(9);
    h.send_batch(json!([
        {"type": "identify", "userId": "ann", "traits": {"plan": "pro", "first_name": "Ann"},
         "context": {"device": {"token": ann.subscription(&format!("{origin}/push/ann")),
                                "tokenProvider": "webpush"}}},
        {"type": "identify", "userId": "bo", "traits": {"plan": "pro", "first_name": "Bo"},
         "context": {"device": {"token": bo.subscription(&format!("{origin}/push/gone")),
                                "tokenProvider": "webpush"}}}
    ]));
    eventually("both deliveries settled", || {
        let settled = h.deliveries("state=delivered").len() + h.deliveries("state=dead").len();
        (settled == 2).then_some(())
    });
    let service = service.lock().expect("push");
    assert!(service.refused.is_empty(), "refused: {:?}", service.refused);
    assert_eq!(service.received.len(), 1, "one push, to ann");
    let (id, body) = &service.received[0];
    assert_eq!(id, "ann");
    let payload: Value = serde_json::from_slice(&ann.decrypt(body)).expect("json payload");
    assert_eq!(
        payload,
        json!({"title": "Hi Ann", "body": "Welcome to pro", "data": {"screen": "offers", "level": 2}})
    );
    drop(service);
    assert!(
        tokens(&h, "bo").is_empty(),
        "the gone subscription is retired"
    );
    assert_eq!(tokens(&h, "ann").len(), 1);
}

// ---------------------------------------------------------------------------------
// APNs

const APNS_CA: &str = include_str!("fixtures/apns-ca.pem");
const APNS_SERVER_CERT: &str = include_str!("fixtures/apns-server.pem");
const APNS_SERVER_KEY: &str = include_str!("fixtures/apns-server-key.pem");

#[derive(Default)]
struct Apns {
    received: Vec<(String, BTreeMap<String, String>, Value)>,
    refused: Vec<String>,
    tokens_seen: Vec<String>,
}

type ApnsState = Arc<Mutex<Apns>>;

async fn apns_handle(
    request: hyper::Request<hyper::body::Incoming>,
    state: ApnsState,
    key: p256::ecdsa::VerifyingKey,
) -> Result<hyper::Response<http_body_util::Full<Bytes>>, std::convert::Infallible> {
    use http_body_util::BodyExt as _;

    let respond = |status: u16, body: Value| {
        Ok(hyper::Response::builder()
            .status(status)
            .header("apns-id", "00000000-0000-0000-0000-000000000000")
            .body(http_body_util::Full::new(Bytes::from(body.to_string())))
            .expect("response"))
    };
    let version = request.version();
    let path = request.uri().path().to_owned();
    let headers: BTreeMap<String, String> = request
        .headers()
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or_default().to_owned()))
        .collect();
    let body = request
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let mut apns = state.lock().expect("apns");
    if version != hyper::Version::HTTP_2 {
        apns.refused.push(format!("{version:?}"));
        return respond(400, json!({"reason": "BadRequest"}));
    }
    let token = headers
        .get("authorization")
        .and_then(|a| a.strip_prefix("bearer "))
        .unwrap_or_default()
        .to_owned();
    let (header, claims, signed, signature) = jwt_parts(&token);
    let signature = p256::ecdsa::Signature::from_slice(&signature).expect("signature");
    let iat = claims["iat"].as_i64().unwrap_or(0);
    if header["alg"] != "ES256"
        || header["kid"] != "KEY1234567"
        || claims["iss"] != "TEAM123456"
        || (now() - iat).abs() > 3600
        || key.verify(signed.as_bytes(), &signature).is_err()
    {
        apns.refused.push(format!("token {header} {claims}"));
        return respond(403, json!({"reason": "InvalidProviderToken"}));
    }
    apns.tokens_seen.push(token);
    if headers.get("apns-topic").map(String::as_str) != Some("com.example.app")
        || headers.get("apns-push-type").map(String::as_str) != Some("alert")
        || headers.get("apns-id").is_none_or(|id| id.len() != 36)
    {
        apns.refused.push(format!("headers {headers:?}"));
        return respond(400, json!({"reason": "MissingTopic"}));
    }
    let Some(device) = path.strip_prefix("/3/device/") else {
        apns.refused.push(path);
        return respond(404, json!({"reason": "BadPath"}));
    };
    if device == "gone-device" {
        return respond(
            410,
            json!({"reason": "Unregistered", "timestamp": 1_700_000_000_000_u64}),
        );
    }
    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    apns.received.push((device.to_owned(), headers, body));
    respond(200, json!({}))
}

/// An APNs-like server: TLS (the fixture certificate, signed by the fixture CA) and
/// HTTP/2 only (ALPN `h2`).
fn apns_server(state: ApnsState, key: p256::ecdsa::VerifyingKey) -> SocketAddr {
    use tokio_rustls::rustls;
    use tokio_rustls::rustls::pki_types::pem::PemObject as _;
    use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};

    let certs: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(APNS_SERVER_CERT.as_bytes())
            .collect::<Result<_, _>>()
            .expect("certificate");
    let private = PrivateKeyDer::from_pem_slice(APNS_SERVER_KEY.as_bytes()).expect("key");
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_no_client_auth()
    .with_single_cert(certs, private)
    .expect("server config");
    config.alpn_protocols = vec![b"h2".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.set_nonblocking(true).expect("nonblocking");
    let addr = listener.local_addr().expect("addr");
    std::thread::spawn(move || {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime")
            .block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
                loop {
                    let Ok((tcp, _)) = listener.accept().await else {
                        continue;
                    };
                    let (acceptor, state, key) = (acceptor.clone(), state.clone(), key);
                    tokio::spawn(async move {
                        let Ok(tls) = acceptor.accept(tcp).await else {
                            return;
                        };
                        if tls.get_ref().1.alpn_protocol() != Some(b"h2") {
                            state
                                .lock()
                                .expect("apns")
                                .refused
                                .push("no h2 ALPN".to_owned());
                            return;
                        }
                        let service = hyper::service::service_fn(move |request| {
                            apns_handle(request, state.clone(), key)
                        });
                        let _ = hyper::server::conn::http2::Builder::new(
                            hyper_util::rt::TokioExecutor::new(),
                        )
                        .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                        .await;
                    });
                }
            });
    });
    addr
}

#[test]
fn apns_goes_over_tls_and_http2_with_a_verified_provider_token() {
    use p256::pkcs8::EncodePrivateKey as _;

    let signing = p256::ecdsa::SigningKey::random(&mut rand_core::OsRng);
    let p8 = signing
        .to_pkcs8_pem(p256::pkcs8::LineEnding::LF)
        .expect("p8")
        .to_string();
    let state: ApnsState = Arc::default();
    let addr = apns_server(state.clone(), *signing.verifying_key());
    let h = Harness::with_identity();
    campaign(
        &h,
        json!({"type": "apns", "team_id": "TEAM123456", "key_id": "KEY1234567",
               "private_key": p8, "topic": "com.example.app",
               "base_url": format!("https://127.0.0.1:{}", addr.port()),
               "ca_certificate": APNS_CA, "retry_base_ms": 20}),
    );
    h.send_batch(json!([
        {"type": "identify", "userId": "ann", "traits": {"plan": "pro", "first_name": "Ann"},
         "context": {"device": {"token": "ann-iphone", "type": "ios"}}},
        {"type": "identify", "userId": "bo", "traits": {"plan": "pro", "first_name": "Bo"},
         "context": {"device": {"token": "gone-device", "type": "ios"}}}
    ]));
    eventually("both deliveries settled", || {
        let settled = h.deliveries("state=delivered").len() + h.deliveries("state=dead").len();
        (settled == 2).then_some(())
    });
    let apns = state.lock().expect("apns");
    assert!(apns.refused.is_empty(), "refused: {:?}", apns.refused);
    assert_eq!(apns.received.len(), 1);
    let (device, headers, body) = &apns.received[0];
    assert_eq!(device, "ann-iphone");
    assert_eq!(headers["apns-priority"], "10");
    assert_eq!(
        body,
        &json!({"aps": {"alert": {"title": "Hi Ann", "body": "Welcome to pro"}},
                "screen": "offers", "level": 2})
    );
    assert_eq!(apns.tokens_seen.len(), 2);
    assert_eq!(
        apns.tokens_seen[0], apns.tokens_seen[1],
        "one provider token reused"
    );
    drop(apns);
    assert!(
        tokens(&h, "bo").is_empty(),
        "410 Unregistered retires the token"
    );
    assert_eq!(
        tokens(&h, "ann"),
        [json!({"provider": "apns", "token": "ann-iphone"})]
    );
}

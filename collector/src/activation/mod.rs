//! Activation: campaigns that turn segment membership changes and events into
//! deliveries to destinations, through a durable outbox (identity resolution must be
//! on).
//!
//! - A [`Destination`] is where deliveries go, with its credentials: a webhook (a JSON
//!   POST signed with HMAC-SHA256, [`webhook`]), FCM, APNs or Web Push ([`push`]), or an
//!   audience export ([`audience`], run on demand).
//! - A [`Campaign`] has a trigger (a profile entered or exited a segment, or sent an
//!   event while in one), a destination, a message template personalised with the
//!   profile's traits (`{{traits.first_name}}`), an optional frequency cap per profile
//!   and an optional consent purpose.
//! - The activation thread reads the membership changes after its stored cursor, and for
//!   each campaign a change triggers writes its deliveries (one per push token for push
//!   destinations) to the outbox, in the same atomic batch as the cursor's advance: a
//!   restart neither loses nor repeats one. Event triggers are fired by the [`Events`]
//!   pipeline stage, with a mark per event and campaign. Each delivery carries an
//!   idempotency key (campaign, trigger, destination, token) that the receiver can
//!   deduplicate on, since delivery is at least once.
//! - The same thread sends the deliveries that are due, one destination paced to its
//!   `rate_per_sec`; a failure is retried with exponential backoff and jitter up to the
//!   destination's `max_attempts`, then the delivery is dead (listed, and replayable).
//!   An answer that cannot succeed on retry (a 4xx other than 408 and 429) makes it dead
//!   at once; a provider saying a token is gone removes the token. Each outcome lands in
//!   the profile's timeline as an event (`Push Sent`, `Push Failed`, `Webhook
//!   Delivered`, `Webhook Failed`).
//! - Push tokens come from events (`context.device.token`), kept by the [`Tokens`]
//!   stage before segments, so that `has push_token` sees them.
//!
//! Keys of the activation tree: `d\0{id}` → [`Destination`]; `c\0{id}` → [`Campaign`];
//! `o\0{number}` → [`Delivery`]; `q\0{due ms}\0{number}` → a delivery waiting to be sent;
//! `f\0{campaign}\0{profile}` → the times it was sent to that profile (frequency cap);
//! `t\0{profile}\0{provider}\0{token}` → a push token; `e\0{campaign}\0{seq}` → the
//! event fired that campaign; `k` → the last membership change read; `n` → the last
//! delivery number.

pub mod api;
pub mod audience;
pub mod outbound;
pub mod push;
pub mod webhook;

use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::{Duration, Instant};

use jiff::Timestamp;
use kith_identity::profile::Profile;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

use self::outbound::Outbound;
use crate::error::StoreError;
use crate::identity::Identity;
use crate::secrets::MasterKey;
use crate::segments::Membership;
use crate::segments::live::{Cause, Kind, MembershipChange};
use crate::store::{Space, Store, Writes, space_key as key};
use crate::worker::Worker;
use crate::writer::{Append, LogWriter};

/// Membership changes read per pass.
const CHANGES_PER_PASS: usize = 500;
/// Deliveries sent per pass before new changes are read again.
const SENDS_PER_PASS: usize = 200;
/// The most deliveries one `GET /v1/deliveries` looks at (it answers where to go on).
pub const DELIVERIES_SCANNED: usize = 10_000;
/// The most dead deliveries one replay puts back.
pub const MAX_REPLAYED: usize = 10_000;
/// Deliveries in flight at once in a pass.
const SENDERS: usize = 8;
/// Deliveries to one destination in flight at once.
const SENDERS_PER_DESTINATION: usize = 2;
/// How often the thread looks for new changes and due deliveries (a few sled reads
/// when there is nothing to do).
const POLL: Duration = Duration::from_millis(5);
/// The most push tokens a profile keeps per provider; a newer one replaces the oldest.
pub const MAX_TOKENS_PER_PROVIDER: usize = 10;
/// The source recorded on the timeline events activation writes.
const SOURCE: &str = "kith-activation";

/// Where deliveries go.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Destination {
    /// Its id.
    pub id: String,
    /// A name for people.
    pub name: String,
    /// The provider and its credentials.
    #[serde(flatten)]
    pub provider: Provider,
    /// The most deliveries per second (none: as fast as answers come).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_per_sec: Option<f64>,
    /// Attempts before a delivery is dead.
    #[serde(default = "default_attempts")]
    pub max_attempts: u32,
    /// The first retry's delay, in milliseconds; each retry doubles it (up to an hour).
    #[serde(default = "default_retry_ms")]
    pub retry_base_ms: u64,
    /// When it was created.
    pub created_at: Timestamp,
}

fn default_attempts() -> u32 {
    8
}

fn default_retry_ms() -> u64 {
    1_000
}

/// A destination's provider.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Provider {
    /// A JSON POST signed with HMAC-SHA256.
    Webhook {
        /// Where to POST.
        url: String,
        /// The signing secret.
        secret: String,
    },
    /// Firebase Cloud Messaging, HTTP v1, to `fcm` tokens.
    Fcm {
        /// The service-account key file's fields.
        service_account: push::ServiceAccount,
        /// FCM's base URL (default [`push::FCM_BASE`]).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        base_url: Option<String>,
    },
    /// Apple Push Notification service, token-based, to `apns` tokens.
    Apns {
        /// The signing key.
        #[serde(flatten)]
        key: push::ApnsKey,
        /// The app's bundle id (`apns-topic`).
        topic: String,
        /// APNs' base URL (default [`push::APNS_BASE`]).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        base_url: Option<String>,
        /// A PEM root certificate to trust besides the system's (a private APNs proxy).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        ca_certificate: Option<String>,
    },
    /// Audience exports of a segment's members, on demand
    /// (`POST /v1/destinations/{id}/export`): a file in a directory, or an HTTP upload.
    AudienceExport {
        /// The directory files are written to.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        directory: Option<String>,
        /// The URL files are POSTed to.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        url: Option<String>,
        /// The upload's signing secret.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        secret: Option<String>,
    },
    /// Web Push (RFC 8291 and RFC 8292) to `webpush` subscriptions.
    WebPush {
        /// The VAPID private key (base64url scalar or PKCS#8 PEM).
        vapid_private_key: String,
        /// The VAPID `sub`: `mailto:` or `https:` contact.
        subject: String,
    },
}

impl Provider {
    /// The push provider whose tokens it sends to, if it is a push provider.
    pub fn push_provider(&self) -> Option<&'static str> {
        match self {
            Provider::Webhook { .. } | Provider::AudienceExport { .. } => None,
            Provider::Fcm { .. } => Some("fcm"),
            Provider::Apns { .. } => Some("apns"),
            Provider::WebPush { .. } => Some("webpush"),
        }
    }
}

/// Where a destination's secrets are in its JSON: sealed at rest, never shown.
const SECRET_FIELDS: [&str; 4] = [
    "/secret",
    "/private_key",
    "/vapid_private_key",
    "/service_account/private_key",
];

impl Destination {
    /// The URLs the destination sends to (besides push endpoints from events).
    pub fn urls(&self) -> Vec<&str> {
        match &self.provider {
            Provider::Webhook { url, .. } => vec![url.as_str()],
            Provider::Fcm {
                service_account,
                base_url,
            } => [
                Some(service_account.token_uri.as_str()),
                base_url.as_deref(),
            ]
            .into_iter()
            .flatten()
            .collect(),
            Provider::Apns { base_url, .. } => base_url.as_deref().into_iter().collect(),
            Provider::AudienceExport { url, .. } => url.as_deref().into_iter().collect(),
            Provider::WebPush { .. } => Vec::new(),
        }
    }

    /// The destination as the API shows it: secrets replaced by a mark.
    pub fn redacted(&self) -> Value {
        let mut value = serde_json::to_value(self).unwrap_or(Value::Null);
        for secret in SECRET_FIELDS {
            if let Some(found) = value.pointer_mut(secret) {
                *found = json!("(set)");
            }
        }
        if let Provider::WebPush {
            vapid_private_key, ..
        } = &self.provider
            && let Ok(key) = push::vapid_key(vapid_private_key)
        {
            value["vapid_public_key"] = json!(push::vapid_public(&key));
        }
        value
    }
}

/// What starts a campaign.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Trigger {
    /// A profile entered the segment.
    SegmentEntered {
        /// The segment's key.
        segment: String,
    },
    /// A profile left the segment.
    SegmentExited {
        /// The segment's key.
        segment: String,
    },
    /// A profile in the segment sent this `track` event.
    Event {
        /// The event name.
        event: String,
        /// The segment's key.
        segment: String,
    },
}

impl Trigger {
    fn matches(&self, change: &MembershipChange) -> bool {
        // An erased person gets nothing more, not even a goodbye.
        if change.cause == Cause::Erased {
            return false;
        }
        match self {
            Trigger::SegmentEntered { segment } => {
                change.kind == Kind::Entered && *segment == change.segment
            }
            Trigger::SegmentExited { segment } => {
                change.kind == Kind::Exited && *segment == change.segment
            }
            Trigger::Event { .. } => false,
        }
    }

    /// The segment it watches.
    pub fn segment(&self) -> &str {
        match self {
            Trigger::SegmentEntered { segment }
            | Trigger::SegmentExited { segment }
            | Trigger::Event { segment, .. } => segment,
        }
    }
}

/// What triggered a delivery.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Triggered {
    /// `entered`, `exited` or `event`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The segment.
    pub segment: String,
    /// The membership change (`entered`, `exited`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub change_id: Option<u64>,
    /// The event's name (`event`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event: Option<String>,
    /// The `seq` of the event behind it, when an event was.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event_seq: Option<u64>,
    /// When that event was received.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event_received_at: Option<Timestamp>,
}

impl Triggered {
    fn of_change(change: &MembershipChange) -> Self {
        Triggered {
            kind: match change.kind {
                Kind::Entered => "entered",
                Kind::Exited => "exited",
            }
            .to_owned(),
            segment: change.segment.clone(),
            change_id: Some(change.id),
            event: None,
            event_seq: change.event_seq,
            event_received_at: change.event_received_at,
        }
    }

    /// The part of the idempotency key that names the trigger.
    fn key(&self) -> String {
        match (self.change_id, self.event_seq) {
            (Some(change), _) => change.to_string(),
            (None, Some(seq)) => format!("event-{seq}"),
            (None, None) => String::new(),
        }
    }
}

/// At most `max` deliveries of a campaign to one profile in `per_secs`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FrequencyCap {
    /// Deliveries allowed in the window.
    pub max: u32,
    /// The window, in seconds.
    pub per_secs: u64,
}

/// A campaign: a trigger, a destination and a message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Campaign {
    /// Its id.
    pub id: String,
    /// A name for people.
    pub name: String,
    /// What starts it.
    pub trigger: Trigger,
    /// The destination's id.
    pub destination: String,
    /// The message: any JSON, whose strings may hold `{{traits.x}}`, `{{profile_id}}`
    /// and `{{segment}}`.
    pub template: Value,
    /// A frequency cap per profile.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub frequency_cap: Option<FrequencyCap>,
    /// The consent purpose the profile must have granted (`traits.consent.<purpose>`
    /// is `true`), when set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consent_purpose: Option<String>,
    /// When it was created.
    pub created_at: Timestamp,
}

/// Where a delivery is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeliveryState {
    /// Waiting to be sent (or retried).
    Pending,
    /// The destination took it.
    Delivered,
    /// It failed for good; replayable.
    Dead,
    /// Not sent: the frequency cap or missing consent.
    Skipped,
}

/// One message to one destination for one profile.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Delivery {
    /// Its number.
    pub id: u64,
    /// The same on every attempt: `{campaign}:{change}:{destination}`.
    pub idempotency_key: String,
    /// The campaign.
    pub campaign: String,
    /// The destination.
    pub destination: String,
    /// The profile.
    pub profile_id: String,
    /// What triggered it.
    pub trigger: Triggered,
    /// The push token or subscription it goes to (push destinations).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    /// The rendered message.
    pub message: Value,
    /// Where it is.
    pub state: DeliveryState,
    /// Attempts made.
    pub attempts: u32,
    /// Why the last attempt failed, or why it was skipped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// When it was created.
    pub created_at: Timestamp,
    /// When it is next due (pending).
    pub next_attempt_at: Timestamp,
    /// When the destination took it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delivered_at: Option<Timestamp>,
}

/// What one attempt found.
#[derive(Debug)]
pub enum Attempt {
    /// Taken.
    Delivered,
    /// Failed; worth retrying.
    Retry(String),
    /// Failed; retrying cannot help.
    Fatal(String),
    /// The provider says the push token is gone: it is removed from the profile.
    Gone(String),
}

/// Replaces `{{traits.x}}`, `{{profile_id}}` and `{{segment}}` in every string of
/// `template`; a missing trait renders as an empty string.
pub fn render(
    template: &Value,
    traits: &Map<String, Value>,
    profile: &str,
    segment: &str,
) -> Value {
    match template {
        Value::String(text) => {
            let mut out = String::with_capacity(text.len());
            let mut rest = text.as_str();
            while let Some(start) = rest.find("{{") {
                out.push_str(&rest[..start]);
                let Some(end) = rest[start..].find("}}") else {
                    out.push_str(&rest[start..]);
                    rest = "";
                    break;
                };
                let name = rest[start + 2..start + end].trim();
                match name {
                    "profile_id" => out.push_str(profile),
                    "segment" => out.push_str(segment),
                    _ => {
                        let value = name.strip_prefix("traits.").and_then(|path| {
                            let mut parts = path.split('.');
                            let mut current = traits.get(parts.next()?)?;
                            for part in parts {
                                current = current.get(part)?;
                            }
                            Some(current)
                        });
                        match value {
                            Some(Value::String(s)) => out.push_str(s),
                            Some(Value::Null) | None => {}
                            Some(other) => out.push_str(&other.to_string()),
                        }
                    }
                }
                rest = &rest[start + end + 2..];
            }
            out.push_str(rest);
            Value::String(out)
        }
        Value::Array(items) => Value::Array(
            items
                .iter()
                .map(|v| render(v, traits, profile, segment))
                .collect(),
        ),
        Value::Object(fields) => Value::Object(
            fields
                .iter()
                .map(|(k, v)| (k.clone(), render(v, traits, profile, segment)))
                .collect(),
        ),
        other => other.clone(),
    }
}

/// Whether a profile with `traits` gave the consent `campaign` needs: the trait
/// `consent.<purpose>` is `true` (or the campaign needs none).
fn consented(campaign: &Campaign, traits: &Map<String, Value>) -> bool {
    campaign.consent_purpose.as_ref().is_none_or(|purpose| {
        traits
            .get("consent")
            .and_then(|c| c.get(purpose))
            .and_then(Value::as_bool)
            == Some(true)
    })
}

/// The delay before retry number `attempt` (from 1): `base · 2^(attempt-1)`, capped at
/// an hour, with full jitter from `noise` (any number: the low bits choose).
fn backoff(base_ms: u64, attempt: u32, noise: u64) -> Duration {
    let ceiling = base_ms
        .saturating_mul(1u64 << attempt.saturating_sub(1).min(20))
        .min(3_600_000);
    // Half fixed, half jitter: retries spread out but never come at once.
    let half = ceiling / 2;
    Duration::from_millis(half + noise % (half + 1))
}

fn ms(at: Timestamp) -> u64 {
    u64::try_from(at.as_millisecond()).unwrap_or(0)
}

fn queue_key(due: Timestamp, id: u64) -> Vec<u8> {
    key(b'q', &[&ms(due).to_be_bytes(), &id.to_be_bytes()])
}

fn number(store: &Store, name: &[u8]) -> Result<u64, StoreError> {
    Ok(match store.get(Space::Activation, name)? {
        Some(bytes) => u64::from_be_bytes(
            bytes
                .as_slice()
                .try_into()
                .map_err(|_| StoreError::Corrupt("activation number".to_owned()))?,
        ),
        None => 0,
    })
}

fn get_json<T: for<'de> Deserialize<'de>>(
    store: &Store,
    key: &[u8],
) -> Result<Option<T>, StoreError> {
    store
        .get(Space::Activation, key)?
        .map(|v| serde_json::from_slice(&v).map_err(StoreError::from))
        .transpose()
}

/// Every record under `tag`; one that cannot be read is logged and left out, so that
/// it cannot stop the others.
fn all_json<T: for<'de> Deserialize<'de>>(store: &Store, tag: u8) -> Result<Vec<T>, StoreError> {
    Ok(store
        .scan(Space::Activation, &key(tag, &[b""]))?
        .into_iter()
        .filter_map(|(k, v)| match serde_json::from_slice(&v) {
            Ok(record) => Some(record),
            Err(error) => {
                tracing::error!(key = %String::from_utf8_lossy(&k), %error, "an activation record cannot be read; it is left out");
                None
            }
        })
        .collect())
}

/// Where activation may send and write, and the key its secrets are sealed with.
#[derive(Debug)]
pub struct Settings {
    /// Which addresses outbound requests may go to.
    pub outbound: Outbound,
    /// The directory audience exports are written under.
    pub export_root: PathBuf,
    /// Seals and opens the destinations' secrets.
    pub secrets: Arc<MasterKey>,
}

/// The activation engine of a collector.
#[derive(Debug)]
pub struct Activation {
    store: Arc<Store>,
    identity: Arc<Identity>,
    membership: Arc<Membership>,
    writer: Arc<LogWriter>,
    /// Serialises outbox writes (the thread, replays from the API).
    outbox: Mutex<()>,
    /// When each destination may next send (pacing).
    paced: Mutex<BTreeMap<String, Instant>>,
    /// FCM access tokens and APNs provider tokens.
    credentials: push::Credentials,
    /// HTTP clients, built on first use (never inside the async runtime): the shared
    /// one under `""`, and an HTTP/2 one per APNs destination.
    clients: Mutex<BTreeMap<String, reqwest::blocking::Client>>,
    /// Which addresses outbound requests may go to.
    outbound: Outbound,
    /// Where audience exports are written.
    export_root: PathBuf,
    /// Seals and opens the destinations' secrets.
    secrets: Arc<MasterKey>,
    worker: Mutex<Option<Worker<()>>>,
}

impl Activation {
    /// The engine, with its thread started.
    ///
    /// # Errors
    ///
    /// When the thread cannot start or the HTTP client cannot be built.
    pub fn start(
        store: Arc<Store>,
        identity: Arc<Identity>,
        membership: Arc<Membership>,
        writer: Arc<LogWriter>,
        settings: Settings,
        health: &Arc<crate::health::Health>,
    ) -> Result<Arc<Self>, StoreError> {
        let Settings {
            outbound,
            export_root,
            secrets,
        } = settings;
        let activation = Arc::new(Activation {
            store,
            identity,
            membership,
            writer,
            outbox: Mutex::new(()),
            paced: Mutex::new(BTreeMap::new()),
            credentials: push::Credentials::default(),
            clients: Mutex::new(BTreeMap::new()),
            outbound,
            export_root,
            secrets,
            worker: Mutex::new(None),
        });
        activation.seal_stored_secrets()?;
        let engine = Arc::downgrade(&activation);
        let worker = Worker::start("activation", health, Vec::new(), move |rx| run(&engine, rx))?;
        *activation
            .worker
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(worker);
        Ok(activation)
    }

    /// Stops the thread after its current pass.
    pub fn close(&self) {
        let worker = self
            .worker
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(worker) = worker {
            worker.close();
        }
        // A blocking client must not be dropped inside the async runtime, where the last
        // reference to the engine may go: drop them here, on the closing thread.
        self.clients
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
    }

    /// Checks where a new destination would send: every URL to a public address
    /// (resolved now; unless private addresses are allowed) and an export directory
    /// under the export root.
    ///
    /// # Errors
    ///
    /// A sentence saying what is refused.
    pub fn check_destination(&self, destination: &Destination) -> Result<(), String> {
        for url in destination.urls() {
            self.outbound.check_url_now(url)?;
        }
        if let Provider::AudienceExport {
            directory: Some(directory),
            ..
        } = &destination.provider
        {
            self.export_dir(directory)?;
        }
        Ok(())
    }

    /// Where an export destination's `directory` is: relative to the export root, or
    /// an absolute path inside it; never outside (no `..`).
    ///
    /// # Errors
    ///
    /// A directory outside the export root.
    pub fn export_dir(&self, directory: &str) -> Result<PathBuf, String> {
        let path = Path::new(directory);
        let outside = || {
            format!(
                "the export directory {directory:?} is not inside the export root {} (--export-dir)",
                self.export_root.display()
            )
        };
        if path
            .components()
            .any(|c| matches!(c, Component::ParentDir | Component::Prefix(_)))
        {
            return Err(outside());
        }
        if path.is_absolute() {
            return if path.starts_with(&self.export_root) {
                Ok(path.to_owned())
            } else {
                Err(outside())
            };
        }
        Ok(self.export_root.join(path))
    }

    /// The destinations, their secrets opened.
    ///
    /// # Errors
    ///
    /// On a storage failure.
    pub fn destinations(&self) -> Result<Vec<Destination>, StoreError> {
        let sealed: Vec<Value> = all_json(&self.store, b'd')?;
        Ok(sealed
            .into_iter()
            .filter_map(|value| match self.open_destination(value) {
                Ok(destination) => Some(destination),
                Err(error) => {
                    tracing::error!(%error, "a destination cannot be read; it is left out");
                    None
                }
            })
            .collect())
    }

    /// One destination, its secrets opened.
    ///
    /// # Errors
    ///
    /// On a storage failure, or secrets that do not open with the master key.
    pub fn destination(&self, id: &str) -> Result<Option<Destination>, StoreError> {
        get_json::<Value>(&self.store, &key(b'd', &[id.as_bytes()]))?
            .map(|value| self.open_destination(value))
            .transpose()
    }

    fn open_destination(&self, mut value: Value) -> Result<Destination, StoreError> {
        self.secrets.open_fields(&mut value, &SECRET_FIELDS)?;
        Ok(serde_json::from_value(value)?)
    }

    /// Stores a destination, its secrets sealed (or removes it).
    ///
    /// # Errors
    ///
    /// On a storage failure.
    pub fn put_destination(&self, id: &str, value: Option<&Destination>) -> Result<(), StoreError> {
        let sealed = value
            .map(|destination| {
                let mut value = serde_json::to_value(destination)?;
                self.secrets.seal_fields(&mut value, &SECRET_FIELDS);
                Ok::<_, StoreError>(value)
            })
            .transpose()?;
        self.put(b'd', id, sealed.as_ref())
    }

    /// Seals the secrets of destinations an earlier version stored in clear.
    fn seal_stored_secrets(&self) -> Result<(), StoreError> {
        let stored: Vec<Value> = all_json(&self.store, b'd')?;
        for value in stored {
            let in_clear = SECRET_FIELDS.iter().any(|p| {
                value
                    .pointer(p)
                    .and_then(Value::as_str)
                    .is_some_and(|s| !MasterKey::is_sealed(s))
            });
            if in_clear && let Ok(destination) = self.open_destination(value) {
                self.put_destination(&destination.id, Some(&destination))?;
                tracing::info!(destination = %destination.id, "sealed the destination's secrets");
            }
        }
        Ok(())
    }

    /// The campaigns.
    ///
    /// # Errors
    ///
    /// On a storage failure.
    pub fn campaigns(&self) -> Result<Vec<Campaign>, StoreError> {
        all_json(&self.store, b'c')
    }

    /// One campaign.
    ///
    /// # Errors
    ///
    /// On a storage failure.
    pub fn campaign(&self, id: &str) -> Result<Option<Campaign>, StoreError> {
        get_json(&self.store, &key(b'c', &[id.as_bytes()]))
    }

    /// Stores a campaign (or removes it). A new campaign acts on membership changes
    /// from now on, not on earlier ones.
    ///
    /// # Errors
    ///
    /// On a storage failure.
    pub fn put_campaign(&self, id: &str, value: Option<&Campaign>) -> Result<(), StoreError> {
        self.put(b'c', id, value)
    }

    fn put<T: Serialize>(&self, tag: u8, id: &str, value: Option<&T>) -> Result<(), StoreError> {
        let mut writes = Writes::new();
        writes.insert(
            key(tag, &[id.as_bytes()]),
            value.map(serde_json::to_vec).transpose()?,
        );
        self.store.apply(Space::Activation, writes)?;
        self.store.flush()
    }

    /// Deliveries numbered after `after`, oldest first, at most `limit`, of a state and
    /// a campaign when given, looking at no more than [`DELIVERIES_SCANNED`] of them;
    /// and the number to go on after (the last one looked at).
    ///
    /// # Errors
    ///
    /// On a storage failure.
    pub fn deliveries(
        &self,
        after: u64,
        limit: usize,
        state: Option<DeliveryState>,
        campaign: Option<&str>,
    ) -> Result<(Vec<Delivery>, u64), StoreError> {
        let prefix = key(b'o', &[b""]);
        let from = key(b'o', &[&after.saturating_add(1).to_be_bytes()]);
        let mut found = Vec::new();
        let mut last = after;
        for (_, value) in
            self.store
                .scan_from(Space::Activation, &prefix, &from, DELIVERIES_SCANNED)?
        {
            let delivery: Delivery = serde_json::from_slice(&value)?;
            last = delivery.id;
            if state.is_none_or(|s| s == delivery.state)
                && campaign.is_none_or(|c| c == delivery.campaign)
            {
                found.push(delivery);
                if found.len() == limit {
                    break;
                }
            }
        }
        Ok((found, last))
    }

    /// Puts dead deliveries (these, or every dead one) back in the outbox, due now,
    /// with their attempts reset; answers how many.
    ///
    /// # Errors
    ///
    /// On a storage failure.
    pub fn replay(&self, ids: Option<&[u64]>) -> Result<usize, StoreError> {
        let _outbox = self.outbox.lock().unwrap_or_else(PoisonError::into_inner);
        let dead: Vec<Delivery> = match ids {
            Some(ids) => ids
                .iter()
                .filter_map(|id| {
                    get_json::<Delivery>(&self.store, &key(b'o', &[&id.to_be_bytes()])).transpose()
                })
                .collect::<Result<Vec<_>, _>>()?,
            None => {
                // Every dead one, a bounded scan at a time.
                let mut dead = Vec::new();
                let mut after = 0;
                loop {
                    let (page, last) =
                        self.deliveries(after, usize::MAX, Some(DeliveryState::Dead), None)?;
                    dead.extend(page);
                    if last == after || dead.len() >= MAX_REPLAYED {
                        break;
                    }
                    after = last;
                }
                dead.truncate(MAX_REPLAYED);
                dead
            }
        };
        let now = Timestamp::now();
        let mut writes = Writes::new();
        let mut count = 0;
        for mut delivery in dead {
            if delivery.state != DeliveryState::Dead {
                continue;
            }
            delivery.state = DeliveryState::Pending;
            delivery.attempts = 0;
            delivery.next_attempt_at = now;
            writes.insert(queue_key(now, delivery.id), Some(Vec::new()));
            writes.insert(
                key(b'o', &[&delivery.id.to_be_bytes()]),
                Some(serde_json::to_vec(&delivery)?),
            );
            count += 1;
        }
        self.store.apply(Space::Activation, writes)?;
        self.store.flush()?;
        Ok(count)
    }

    /// Exports a segment's members to an audience-export destination; answers what it
    /// did.
    ///
    /// # Errors
    ///
    /// A destination that is not an audience export, a storage failure, or a failed
    /// write or upload.
    pub fn export(&self, destination: &Destination, segment: &str) -> Result<Value, String> {
        let Provider::AudienceExport {
            directory,
            url,
            secret,
        } = &destination.provider
        else {
            return Err("not an audience_export destination".to_owned());
        };
        let mut csv = String::from(audience::HEADER);
        csv.push('\n');
        let (mut rows, mut skipped) = (0, 0);
        self.membership
            .each_member(segment, |id| {
                match self.identity.profile(id)?.as_ref().and_then(audience::row) {
                    Some(row) => {
                        csv.push_str(&row);
                        csv.push('\n');
                        rows += 1;
                    }
                    None => skipped += 1,
                }
                Ok(())
            })
            .map_err(|e| e.to_string())?;
        let file = match directory {
            Some(dir) => Some(
                audience::write_file(&self.export_dir(dir)?, segment, &csv)
                    .map_err(|e| format!("writing the export into {dir}: {e}"))?,
            ),
            None => None,
        };
        let status = match url {
            Some(url) => Some(audience::upload(
                &self.http()?,
                &self.outbound,
                url,
                secret.as_deref(),
                segment,
                csv,
            )?),
            None => None,
        };
        Ok(audience::report(rows, skipped, file.as_deref(), status))
    }

    /// Reads new membership changes and writes the deliveries they trigger, with the
    /// cursor, in one batch; answers whether there may be more. A change an event of a
    /// chunk not yet committed made waits for that commit, so that the push tokens the
    /// same chunk brought are there.
    fn dispatch(&self) -> Result<bool, StoreError> {
        let cursor = number(&self.store, b"k")?;
        let committed = self.store.checkpoint()?;
        let mut changes = self
            .membership
            .changes(cursor, CHANGES_PER_PASS, None, None)?;
        if let Some(waiting) = changes
            .iter()
            .position(|c| c.event_seq.is_some_and(|seq| seq > committed))
        {
            changes.truncate(waiting);
        }
        let Some(last) = changes.last().map(|c| c.id) else {
            return Ok(false);
        };
        let campaigns = self.campaigns()?;
        let mut plan = self.plan()?;
        for change in &changes {
            let triggered = Triggered::of_change(change);
            for campaign in campaigns.iter().filter(|c| c.trigger.matches(change)) {
                plan.deliveries(self, campaign, &change.profile_id, &triggered)?;
            }
        }
        plan.writes
            .insert(b"k".to_vec(), Some(last.to_be_bytes().to_vec()));
        plan.commit(self)?;
        // More only when a full page was taken (not cut short by an uncommitted chunk).
        Ok(changes.len() == CHANGES_PER_PASS)
    }

    /// A batch of new deliveries, under the outbox lock.
    fn plan(&self) -> Result<Plan<'_>, StoreError> {
        let guard = self.outbox.lock().unwrap_or_else(PoisonError::into_inner);
        Ok(Plan {
            _guard: guard,
            destinations: self
                .destinations()?
                .into_iter()
                .map(|d| (d.id.clone(), d))
                .collect(),
            next: number(&self.store, b"n")?,
            writes: Writes::new(),
            caps: BTreeMap::new(),
            now: Timestamp::now(),
        })
    }

    /// The push tokens of a live profile, as (provider, token), of one provider when
    /// given: its own and those of the profiles merged into it.
    ///
    /// # Errors
    ///
    /// On a storage failure.
    pub fn tokens(
        &self,
        profile: &str,
        provider: Option<&str>,
    ) -> Result<Vec<(String, String)>, StoreError> {
        let mut owners = vec![profile.to_owned()];
        for merge in self.identity.merges(profile)? {
            if merge.survivor == profile && !merge.undone {
                owners.push(merge.merged);
            }
        }
        let mut tokens = Vec::new();
        for owner in owners {
            let prefix = match provider {
                Some(provider) => key(b't', &[owner.as_bytes(), provider.as_bytes(), b""]),
                None => key(b't', &[owner.as_bytes(), b""]),
            };
            let owner_prefix = key(b't', &[owner.as_bytes(), b""]);
            for (k, _) in self.store.scan(Space::Activation, &prefix)? {
                let rest = String::from_utf8_lossy(&k[owner_prefix.len()..]).into_owned();
                if let Some((provider, token)) = rest.split_once('\0') {
                    tokens.push((provider.to_owned(), token.to_owned()));
                }
            }
        }
        tokens.sort();
        tokens.dedup();
        Ok(tokens)
    }

    /// Forgets erased profiles: their deliveries (and their places in the queue),
    /// push tokens and frequency caps, and the marks of campaigns their events fired.
    ///
    /// # Errors
    ///
    /// On a storage failure.
    pub fn forget_profiles(
        &self,
        profiles: &std::collections::BTreeSet<String>,
        seqs: &[u64],
    ) -> Result<ForgottenActivation, StoreError> {
        let _outbox = self.outbox.lock().unwrap_or_else(PoisonError::into_inner);
        let mut writes = Writes::new();
        let mut forgotten = ForgottenActivation::default();
        for (k, v) in self.store.scan(Space::Activation, &key(b'o', &[b""]))? {
            let Ok(delivery) = serde_json::from_slice::<Delivery>(&v) else {
                continue;
            };
            if profiles.contains(&delivery.profile_id) {
                writes.insert(queue_key(delivery.next_attempt_at, delivery.id), None);
                writes.insert(k, None);
                forgotten.deliveries += 1;
            }
        }
        for profile in profiles {
            for (k, _) in self
                .store
                .scan(Space::Activation, &key(b't', &[profile.as_bytes(), b""]))?
            {
                writes.insert(k, None);
                forgotten.push_tokens += 1;
            }
        }
        let caps = key(b'f', &[b""]);
        for (k, _) in self.store.scan(Space::Activation, &caps)? {
            let profile = k[caps.len()..]
                .split(|b| *b == 0)
                .nth(1)
                .map(String::from_utf8_lossy);
            if profile.is_some_and(|p| profiles.contains(p.as_ref())) {
                writes.insert(k, None);
                forgotten.frequency_caps += 1;
            }
        }
        let seqs: std::collections::BTreeSet<[u8; 8]> =
            seqs.iter().map(|s| s.to_be_bytes()).collect();
        let marks = key(b'e', &[b""]);
        for (k, _) in self.store.scan(Space::Activation, &marks)? {
            if k.len() >= 8 && seqs.contains(&k[k.len() - 8..]) {
                writes.insert(k, None);
            }
        }
        self.store.apply(Space::Activation, writes)?;
        self.store.flush()?;
        Ok(forgotten)
    }

    /// Removes an erased person's rows from the audience export files under the export
    /// root (rows whose hashed email or phone is theirs); answers the rows removed.
    ///
    /// # Errors
    ///
    /// When a file cannot be read or rewritten.
    pub fn scrub_exports(&self, hashes: &[String]) -> Result<usize, String> {
        if hashes.is_empty() || !self.export_root.exists() {
            return Ok(0);
        }
        let mut removed = 0;
        let mut dirs = vec![self.export_root.clone()];
        while let Some(dir) = dirs.pop() {
            let entries = std::fs::read_dir(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
            for entry in entries.flatten() {
                let path = entry.path();
                if path.is_dir() {
                    dirs.push(path);
                    continue;
                }
                if path.extension().is_none_or(|e| e != "csv") {
                    continue;
                }
                let text = std::fs::read_to_string(&path)
                    .map_err(|e| format!("{}: {e}", path.display()))?;
                let theirs = |line: &str| {
                    line.split(',')
                        .take(2)
                        .any(|field| !field.is_empty() && hashes.iter().any(|h| h == field))
                };
                let kept: Vec<&str> = text.lines().filter(|l| !theirs(l)).collect();
                let gone = text.lines().count() - kept.len();
                if gone > 0 {
                    let mut rewritten = kept.join("\n");
                    rewritten.push('\n');
                    let dir = path.parent().unwrap_or(&self.export_root);
                    let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
                    audience::write_named(dir, name.as_deref().unwrap_or("export.csv"), &rewritten)
                        .map_err(|e| format!("{}: {e}", path.display()))?;
                    removed += gone;
                }
            }
        }
        Ok(removed)
    }

    /// Removes a token the provider said is gone, from every profile holding it.
    fn retire(&self, profile: &str, provider: &str, token: &str) -> Result<(), StoreError> {
        let mut owners = vec![profile.to_owned()];
        for merge in self.identity.merges(profile)? {
            owners.push(merge.merged);
        }
        let mut writes = Writes::new();
        for owner in owners {
            writes.insert(
                key(
                    b't',
                    &[owner.as_bytes(), provider.as_bytes(), token.as_bytes()],
                ),
                None,
            );
        }
        self.store.apply(Space::Activation, writes)?;
        // `has push_token` may no longer hold.
        self.membership.touch(profile)
    }

    /// Sends the deliveries that are due; answers whether more are due.
    fn send_due(&self) -> Result<bool, StoreError> {
        let prefix = key(b'q', &[b""]);
        let now_ms = ms(Timestamp::now());
        let due: Vec<Vec<u8>> = self
            .store
            .scan_from(Space::Activation, &prefix, &prefix, SENDS_PER_PASS)?
            .into_iter()
            .map(|(k, _)| k)
            .take_while(|k| {
                k.get(prefix.len()..prefix.len() + 8)
                    .and_then(|b| <[u8; 8]>::try_from(b).ok())
                    .is_some_and(|b| u64::from_be_bytes(b) <= now_ms)
            })
            .collect();
        let more = due.len() == SENDS_PER_PASS;
        let mut destinations: BTreeMap<String, Option<Destination>> = BTreeMap::new();
        let mut campaigns: BTreeMap<String, Option<Campaign>> = BTreeMap::new();
        let mut loaded: Vec<(Vec<u8>, u64, Delivery, Option<Destination>)> = Vec::new();
        for queued in due {
            let Some(id) = queued
                .get(prefix.len() + 9..)
                .and_then(|b| <[u8; 8]>::try_from(b).ok())
                .map(u64::from_be_bytes)
            else {
                continue;
            };
            let Some(delivery) =
                get_json::<Delivery>(&self.store, &key(b'o', &[&id.to_be_bytes()]))?
            else {
                self.remove_queued(queued)?;
                continue;
            };
            if !destinations.contains_key(&delivery.destination) {
                let found = self.destination(&delivery.destination)?;
                destinations.insert(delivery.destination.clone(), found);
            }
            if !campaigns.contains_key(&delivery.campaign) {
                let found = self.campaign(&delivery.campaign)?;
                campaigns.insert(delivery.campaign.clone(), found);
            }
            // Consent is checked again before each attempt: it may have been withdrawn.
            if let Some(campaign) = campaigns.get(&delivery.campaign).cloned().flatten()
                && campaign.consent_purpose.is_some()
            {
                let traits = self
                    .identity
                    .profile(&delivery.profile_id)?
                    .map(|p| p.trait_values())
                    .unwrap_or_default();
                if !consented(&campaign, &traits) {
                    let mut delivery = delivery;
                    delivery.state = DeliveryState::Skipped;
                    delivery.last_error = Some("consent withdrawn before sending".to_owned());
                    let mut writes = Writes::new();
                    writes.insert(queued, None);
                    writes.insert(
                        key(b'o', &[&id.to_be_bytes()]),
                        Some(serde_json::to_vec(&delivery)?),
                    );
                    let _outbox = self.outbox.lock().unwrap_or_else(PoisonError::into_inner);
                    self.store.apply(Space::Activation, writes)?;
                    continue;
                }
            }
            let destination = destinations.get(&delivery.destination).cloned().flatten();
            loaded.push((queued, id, delivery, destination));
        }
        let attempts = self.attempt_all(&loaded);
        let mut timeline: Vec<Vec<u8>> = Vec::new();
        for ((queued, id, mut delivery, destination), attempt) in loaded.into_iter().zip(attempts) {
            let delivery_key = key(b'o', &[&id.to_be_bytes()]);
            delivery.attempts += 1;
            let now = Timestamp::now();
            let mut writes = Writes::new();
            writes.insert(queued, None);
            let outcome = match attempt {
                Attempt::Delivered => {
                    delivery.state = DeliveryState::Delivered;
                    delivery.delivered_at = Some(now);
                    delivery.last_error = None;
                    Some("Delivered")
                }
                Attempt::Retry(why)
                    if delivery.attempts < destination.as_ref().map_or(1, |d| d.max_attempts) =>
                {
                    let base = destination.as_ref().map_or(1_000, |d| d.retry_base_ms);
                    let wait = backoff(base, delivery.attempts, now.as_nanosecond() as u64);
                    delivery.next_attempt_at = now
                        .checked_add(jiff::SignedDuration::try_from(wait).unwrap_or_default())
                        .unwrap_or(now);
                    delivery.last_error = Some(why);
                    writes.insert(queue_key(delivery.next_attempt_at, id), Some(Vec::new()));
                    None
                }
                Attempt::Gone(why) => {
                    if let (Some(target), Some(provider)) = (
                        &delivery.target,
                        destination
                            .as_ref()
                            .and_then(|d| d.provider.push_provider()),
                    ) {
                        self.retire(&delivery.profile_id, provider, target)?;
                    }
                    delivery.state = DeliveryState::Dead;
                    delivery.last_error = Some(format!("{why}; the token was removed"));
                    Some("Failed")
                }
                Attempt::Retry(why) | Attempt::Fatal(why) => {
                    delivery.state = DeliveryState::Dead;
                    delivery.last_error = Some(why);
                    Some("Failed")
                }
            };
            writes.insert(delivery_key, Some(serde_json::to_vec(&delivery)?));
            {
                let _outbox = self.outbox.lock().unwrap_or_else(PoisonError::into_inner);
                self.store.apply(Space::Activation, writes)?;
            }
            if let (Some(outcome), Some(destination)) = (outcome, &destination)
                && let Some(event) = self.timeline_event(&delivery, destination, outcome)
            {
                timeline.push(event);
            }
        }
        // One flush per pass: a crash before it resends (at least once, with the same
        // idempotency key) what this pass sent.
        self.store.flush()?;
        self.record(timeline);
        Ok(more)
    }

    /// Attempts the deliveries on up to [`SENDERS`] threads at once, at most
    /// [`SENDERS_PER_DESTINATION`] of them on one destination, so that a slow
    /// destination holds two threads while the others go on; pacing is shared. The
    /// attempts, in the deliveries' order.
    fn attempt_all(
        &self,
        loaded: &[(Vec<u8>, u64, Delivery, Option<Destination>)],
    ) -> Vec<Attempt> {
        let attempt =
            |(_, _, delivery, destination): &(Vec<u8>, u64, Delivery, Option<Destination>)| {
                match destination {
                    None => Attempt::Fatal(format!("no destination {:?}", delivery.destination)),
                    Some(destination) => {
                        self.pace(destination);
                        let tried = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                            self.attempt(destination, delivery)
                        }));
                        tried.unwrap_or_else(|panic| {
                            Attempt::Retry(format!(
                                "sending panicked: {}",
                                crate::health::panic_message(panic.as_ref())
                            ))
                        })
                    }
                }
            };
        if loaded.len() <= 1 {
            return loaded.iter().map(attempt).collect();
        }
        // Indexes not yet taken, and attempts in flight per destination.
        let queue = Mutex::new((
            (0..loaded.len()).collect::<std::collections::VecDeque<usize>>(),
            BTreeMap::<&str, usize>::new(),
        ));
        let results: Mutex<Vec<Option<Attempt>>> =
            Mutex::new((0..loaded.len()).map(|_| None).collect());
        let destination_of = |i: usize| loaded[i].2.destination.as_str();
        std::thread::scope(|scope| {
            for _ in 0..SENDERS.min(loaded.len()) {
                scope.spawn(|| {
                    loop {
                        let next = {
                            let mut guard = queue.lock().unwrap_or_else(PoisonError::into_inner);
                            let (waiting, busy) = &mut *guard;
                            let position = waiting.iter().position(|&i| {
                                busy.get(destination_of(i)).copied().unwrap_or(0)
                                    < SENDERS_PER_DESTINATION
                            });
                            // Nothing this thread may take: the busy threads finish the rest.
                            let Some(i) = position.and_then(|p| waiting.remove(p)) else {
                                break;
                            };
                            *busy.entry(destination_of(i)).or_default() += 1;
                            i
                        };
                        let outcome = attempt(&loaded[next]);
                        results.lock().unwrap_or_else(PoisonError::into_inner)[next] =
                            Some(outcome);
                        let mut guard = queue.lock().unwrap_or_else(PoisonError::into_inner);
                        if let Some(n) = guard.1.get_mut(destination_of(next)) {
                            *n -= 1;
                        }
                    }
                });
            }
        });
        results
            .into_inner()
            .unwrap_or_else(PoisonError::into_inner)
            .into_iter()
            .map(|a| a.unwrap_or_else(|| Attempt::Retry("not attempted in this pass".to_owned())))
            .collect()
    }

    fn remove_queued(&self, queued: Vec<u8>) -> Result<(), StoreError> {
        let mut writes = Writes::new();
        writes.insert(queued, None);
        self.store.apply(Space::Activation, writes)
    }

    /// Waits until the destination may send again.
    fn pace(&self, destination: &Destination) {
        let Some(rate) = destination.rate_per_sec.filter(|r| *r > 0.0) else {
            return;
        };
        let interval = Duration::from_secs_f64(1.0 / rate);
        let wait = {
            let mut paced = self.paced.lock().unwrap_or_else(PoisonError::into_inner);
            let now = Instant::now();
            let slot = paced.get(&destination.id).copied().unwrap_or(now).max(now);
            paced.insert(destination.id.clone(), slot + interval);
            slot - now
        };
        if !wait.is_zero() {
            std::thread::sleep(wait);
        }
    }

    fn attempt(&self, destination: &Destination, delivery: &Delivery) -> Attempt {
        let target = delivery.target.as_deref().unwrap_or_default();
        // Checked on every attempt: the rules may be stricter than when it was made.
        for url in destination.urls() {
            if let Err(why) = self.outbound.check_url(url) {
                return Attempt::Fatal(why);
            }
        }
        let notification = push::Notification::of(&delivery.message);
        let http = match self.http() {
            Ok(http) => http,
            Err(why) => return Attempt::Retry(why),
        };
        match &destination.provider {
            Provider::Webhook { url, secret } => webhook::send(&http, url, secret, delivery),
            Provider::AudienceExport { .. } => {
                Attempt::Fatal("an audience export takes no campaign deliveries".to_owned())
            }
            Provider::Fcm {
                service_account,
                base_url,
            } => push::fcm_send(
                &http,
                &self.credentials,
                &destination.id,
                service_account,
                base_url.as_deref().unwrap_or(push::FCM_BASE),
                target,
                &notification,
            ),
            Provider::Apns {
                key,
                topic,
                base_url,
                ca_certificate,
            } => {
                let client = match self.client(&destination.id, ca_certificate.as_deref(), true) {
                    Ok(client) => client,
                    Err(why) => return Attempt::Fatal(why),
                };
                // The same apns-id on every attempt, derived from the idempotency key.
                let digest =
                    <sha2::Sha256 as sha2::Digest>::digest(delivery.idempotency_key.as_bytes());
                let mut bytes = [0u8; 16];
                bytes.copy_from_slice(&digest[..16]);
                let apns_id = uuid::Builder::from_custom_bytes(bytes).into_uuid();
                push::apns_send(
                    &client,
                    &self.credentials,
                    &destination.id,
                    key,
                    base_url.as_deref().unwrap_or(push::APNS_BASE),
                    topic,
                    target,
                    &notification,
                    &apns_id.to_string(),
                )
            }
            Provider::WebPush {
                vapid_private_key,
                subject,
            } => push::web_push_send(
                &http,
                &self.outbound,
                &self.credentials,
                &destination.id,
                vapid_private_key,
                subject,
                target,
                &delivery.message,
            ),
        }
    }

    /// The shared HTTP client.
    fn http(&self) -> Result<reqwest::blocking::Client, String> {
        self.client("", None, false)
    }

    /// An HTTP client by name, built on first use: HTTP/2 only when `http2`, trusting
    /// `ca_certificate` besides the system's roots when given.
    fn client(
        &self,
        name: &str,
        ca_certificate: Option<&str>,
        http2: bool,
    ) -> Result<reqwest::blocking::Client, String> {
        let mut clients = self.clients.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(client) = clients.get(name) {
            return Ok(client.clone());
        }
        let mut builder = self.outbound.client();
        if http2 {
            builder = builder.http2_prior_knowledge();
        }
        if let Some(pem) = ca_certificate {
            let certificate = reqwest::Certificate::from_pem(pem.as_bytes())
                .map_err(|e| format!("the destination's ca_certificate: {e}"))?;
            builder = builder.add_root_certificate(certificate);
        }
        let client = builder
            .build()
            .map_err(|e| format!("an HTTP client: {e}"))?;
        clients.insert(name.to_owned(), client.clone());
        Ok(client)
    }

    /// The timeline event of a delivery's outcome (`Webhook Delivered`, `Push Sent`,
    /// `Push Failed`...), for a profile that has a user or anonymous id to carry it.
    fn timeline_event(
        &self,
        delivery: &Delivery,
        destination: &Destination,
        outcome: &str,
    ) -> Option<Vec<u8>> {
        let name = match (&destination.provider, outcome) {
            (Provider::Webhook { .. } | Provider::AudienceExport { .. }, _) => {
                format!("Webhook {outcome}")
            }
            (_, "Delivered") => "Push Sent".to_owned(),
            (_, _) => "Push Failed".to_owned(),
        };
        let profile = self.identity.profile(&delivery.profile_id).ok()??;
        let (field, value) = profile
            .identifiers
            .iter()
            .find(|i| i.kind == "user_id")
            .map(|i| ("userId", i.value.clone()))
            .or_else(|| {
                profile
                    .identifiers
                    .iter()
                    .find(|i| i.kind == "anonymous_id")
                    .map(|i| ("anonymousId", i.value.clone()))
            })?;
        let mut event = json!({
            "type": "track",
            "event": name,
            "messageId": format!("kith-delivery-{}-{}", delivery.id, outcome.to_lowercase()),
            "properties": {
                "delivery_id": delivery.id,
                "campaign": delivery.campaign,
                "destination": delivery.destination,
                "attempts": delivery.attempts,
                "error": delivery.last_error,
                "provider": destination.provider.push_provider(),
            },
        });
        event[field] = Value::String(value);
        let encoded = serde_json::from_value(event)
            .map_err(|e| e.to_string())
            .and_then(|message| {
                crate::ingest::accept_imported(message, Timestamp::now()).map_err(|(_, why)| why)
            });
        match encoded {
            Ok(encoded) => Some(encoded),
            Err(error) => {
                tracing::warn!(delivery = delivery.id, %error, "no timeline event for the delivery");
                None
            }
        }
    }

    /// Appends timeline events in one durable write (best effort: the deliveries' own
    /// records are what count).
    fn record(&self, events: Vec<Vec<u8>>) {
        if events.is_empty() {
            return;
        }
        let received = events.len() as u64;
        let appended = self.writer.append_blocking(Append {
            source: Arc::from(SOURCE),
            events,
            received,
            rejected: Vec::new(),
        });
        if let Err(error) = appended {
            tracing::warn!(%error, "delivery timeline events were not written");
        }
    }
}

/// What [`Activation::forget_profiles`] removed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct ForgottenActivation {
    /// Deliveries in the outbox.
    pub deliveries: usize,
    /// Push tokens and subscriptions.
    pub push_tokens: usize,
    /// Frequency caps.
    pub frequency_caps: usize,
}

/// New deliveries being written together.
struct Plan<'a> {
    _guard: std::sync::MutexGuard<'a, ()>,
    destinations: BTreeMap<String, Destination>,
    next: u64,
    writes: Writes,
    caps: BTreeMap<Vec<u8>, Vec<u64>>,
    now: Timestamp,
}

impl Plan<'_> {
    /// The deliveries of `campaign` for a profile (one per push token for push
    /// destinations), pending, or skipped for consent, the frequency cap or no token.
    fn deliveries(
        &mut self,
        activation: &Activation,
        campaign: &Campaign,
        profile_id: &str,
        triggered: &Triggered,
    ) -> Result<(), StoreError> {
        let now = self.now;
        let profile = activation.identity.profile(profile_id)?;
        let traits = profile
            .as_ref()
            .map(Profile::trait_values)
            .unwrap_or_default();
        let message = render(&campaign.template, &traits, profile_id, &triggered.segment);
        let consented = consented(campaign, &traits);
        let cap_key = key(b'f', &[campaign.id.as_bytes(), profile_id.as_bytes()]);
        if !self.caps.contains_key(&cap_key) {
            let sent: Vec<u64> = get_json(&activation.store, &cap_key)?.unwrap_or_default();
            self.caps.insert(cap_key.clone(), sent);
        }
        let sent = self.caps.entry(cap_key).or_default();
        if let Some(cap) = campaign.frequency_cap {
            let since = ms(now).saturating_sub(cap.per_secs.saturating_mul(1_000));
            sent.retain(|t| *t > since);
        }
        let capped = campaign
            .frequency_cap
            .is_some_and(|cap| sent.len() >= cap.max as usize);
        let provider = self
            .destinations
            .get(&campaign.destination)
            .and_then(|d| d.provider.push_provider());
        let targets: Vec<Option<String>> = match provider {
            None => vec![None],
            Some(provider) => {
                let tokens = activation.tokens(profile_id, Some(provider))?;
                if tokens.is_empty() {
                    vec![None]
                } else {
                    tokens.into_iter().map(|(_, token)| Some(token)).collect()
                }
            }
        };
        let skipped = if !consented {
            Some("no consent for the campaign's purpose")
        } else if capped {
            Some("frequency cap reached")
        } else if provider.is_some() && targets == [None] {
            Some("the profile has no push token for this destination")
        } else {
            None
        };
        if skipped.is_none() && campaign.frequency_cap.is_some() {
            sent.push(ms(now));
        }
        for target in targets {
            self.next += 1;
            let id = self.next;
            let mut idempotency_key = format!(
                "{}:{}:{}",
                campaign.id,
                triggered.key(),
                campaign.destination
            );
            if let Some(target) = &target {
                let digest = <sha2::Sha256 as sha2::Digest>::digest(target.as_bytes());
                let short: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
                idempotency_key.push(':');
                idempotency_key.push_str(&short);
            }
            let delivery = Delivery {
                id,
                idempotency_key,
                campaign: campaign.id.clone(),
                destination: campaign.destination.clone(),
                profile_id: profile_id.to_owned(),
                trigger: triggered.clone(),
                target,
                message: message.clone(),
                state: if skipped.is_some() {
                    DeliveryState::Skipped
                } else {
                    DeliveryState::Pending
                },
                attempts: 0,
                last_error: skipped.map(str::to_owned),
                created_at: now,
                next_attempt_at: now,
                delivered_at: None,
            };
            if skipped.is_none() {
                self.writes.insert(queue_key(now, id), Some(Vec::new()));
            }
            self.writes.insert(
                key(b'o', &[&id.to_be_bytes()]),
                Some(serde_json::to_vec(&delivery)?),
            );
        }
        Ok(())
    }

    /// Writes the deliveries, the caps and the number, in one batch, durably.
    fn commit(mut self, activation: &Activation) -> Result<(), StoreError> {
        for (cap_key, sent) in std::mem::take(&mut self.caps) {
            self.writes
                .insert(cap_key, Some(serde_json::to_vec(&sent)?));
        }
        self.writes
            .insert(b"n".to_vec(), Some(self.next.to_be_bytes().to_vec()));
        activation
            .store
            .apply(Space::Activation, std::mem::take(&mut self.writes))?;
        activation.store.flush()
    }
}

/// The push-token pipeline stage, after identity and before segments: keeps the push
/// tokens events carry (`context.device.token`, with `context.device.tokenProvider`,
/// else `apns` for an iOS device and `fcm` otherwise: what Segment's mobile libraries
/// send) on the event's profile, so that `has push_token` segments see them at once.
#[derive(Debug)]
pub struct Tokens {
    activation: Arc<Activation>,
    seen: Mutex<Writes>,
}

impl crate::pipeline::Stage for Tokens {
    fn name(&self) -> &'static str {
        "push tokens"
    }

    fn begin_chunk(&self) {
        self.seen
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
    }

    fn process(
        &self,
        event: &mut crate::store::StoredEvent,
    ) -> Result<crate::pipeline::Outcome, StoreError> {
        let context = event.message.common().context.as_ref();
        let profile = context
            .and_then(|c| c.get("kith"))
            .and_then(|k| k.get("profile_id"))
            .and_then(Value::as_str);
        if let (Some(device), Some(profile)) = (context.and_then(|c| c.get("device")), profile)
            && let Some(token) = device
                .get("token")
                .and_then(Value::as_str)
                .filter(|t| !t.is_empty() && t.len() <= 4_096 && !t.contains('\0'))
        {
            let provider = match device.get("tokenProvider").and_then(Value::as_str) {
                Some(provider) => provider.to_owned(),
                None if device
                    .get("type")
                    .and_then(Value::as_str)
                    .is_some_and(|t| t.eq_ignore_ascii_case("ios")) =>
                {
                    "apns".to_owned()
                }
                None => "fcm".to_owned(),
            };
            if provider == "webpush"
                && let Err(why) = serde_json::from_str::<push::Subscription>(token)
                    .map_err(|e| e.to_string())
                    .and_then(|s| self.activation.outbound.check_push_endpoint(&s.endpoint))
            {
                tracing::warn!(seq = event.seq, reason = %why, "a Web Push subscription is refused");
                return Ok(crate::pipeline::Outcome::Continue);
            }
            self.seen
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .insert(
                    key(
                        b't',
                        &[profile.as_bytes(), provider.as_bytes(), token.as_bytes()],
                    ),
                    Some(event.seq.to_be_bytes().to_vec()),
                );
        }
        Ok(crate::pipeline::Outcome::Continue)
    }

    fn end_chunk(&self) -> Result<(), StoreError> {
        let mut seen =
            std::mem::take(&mut *self.seen.lock().unwrap_or_else(PoisonError::into_inner));
        // Each (profile, provider) keeps its newest tokens, by the event that brought them.
        let owners: std::collections::BTreeSet<Vec<u8>> = seen
            .keys()
            .filter_map(|k| {
                let end = k.iter().rposition(|b| *b == 0)?;
                Some(k[..=end].to_vec())
            })
            .collect();
        for owner in owners {
            let mut held: BTreeMap<Vec<u8>, Vec<u8>> = self
                .activation
                .store
                .scan(Space::Activation, &owner)?
                .into_iter()
                .collect();
            for (k, v) in seen.range(owner.clone()..) {
                if !k.starts_with(&owner) {
                    break;
                }
                if let Some(v) = v {
                    held.insert(k.clone(), v.clone());
                }
            }
            if held.len() > MAX_TOKENS_PER_PROVIDER {
                let mut by_age: Vec<(Vec<u8>, Vec<u8>)> = held.into_iter().collect();
                by_age.sort_by(|a, b| a.1.cmp(&b.1));
                let extra = by_age.len() - MAX_TOKENS_PER_PROVIDER;
                for (k, _) in by_age.into_iter().take(extra) {
                    seen.insert(k, None);
                }
            }
        }
        self.activation.store.apply(Space::Activation, seen)
    }
}

/// The campaign pipeline stage, after segments: fires the campaigns an event triggers
/// (`track` events named by an `event` trigger, from a profile in its segment,
/// memberships as this chunk left them), at most once per event and campaign: a mark is
/// written with the deliveries.
#[derive(Debug)]
pub struct Events {
    activation: Arc<Activation>,
    chunk: Mutex<EventsChunk>,
}

/// What the stage gathered in a chunk.
#[derive(Debug, Default)]
struct EventsChunk {
    /// Event campaigns, read once a chunk.
    campaigns: Option<Vec<Campaign>>,
    /// `track` events some event campaign names: (seq, profile, name, received).
    fired: Vec<(u64, String, String, Option<Timestamp>)>,
}

impl Activation {
    /// The push-token stage (before segments).
    pub fn tokens_stage(self: &Arc<Self>) -> Tokens {
        Tokens {
            activation: self.clone(),
            seen: Mutex::new(Writes::new()),
        }
    }

    /// The campaign stage (after segments).
    pub fn events_stage(self: &Arc<Self>) -> Events {
        Events {
            activation: self.clone(),
            chunk: Mutex::new(EventsChunk::default()),
        }
    }
}

impl crate::segments::live::MoreIdentifiers for Activation {
    fn provides(&self, kind: &str) -> bool {
        kind.starts_with("push_token")
    }

    /// `push_token` when the profile has any, and `push_token_{provider}` per provider.
    fn identifier_types(
        &self,
        profile: &str,
    ) -> Result<std::collections::BTreeSet<String>, StoreError> {
        let mut types = std::collections::BTreeSet::new();
        for (provider, _) in self.tokens(profile, None)? {
            types.insert("push_token".to_owned());
            types.insert(format!("push_token_{provider}"));
        }
        Ok(types)
    }
}

impl crate::pipeline::Stage for Events {
    fn name(&self) -> &'static str {
        "campaigns"
    }

    fn begin_chunk(&self) {
        *self.chunk.lock().unwrap_or_else(PoisonError::into_inner) = EventsChunk::default();
    }

    fn process(
        &self,
        event: &mut crate::store::StoredEvent,
    ) -> Result<crate::pipeline::Outcome, StoreError> {
        let common = event.message.common();
        let context = common.context.as_ref();
        let Some(profile) = context
            .and_then(|c| c.get("kith"))
            .and_then(|k| k.get("profile_id"))
            .and_then(Value::as_str)
        else {
            return Ok(crate::pipeline::Outcome::Continue);
        };
        let mut chunk = self.chunk.lock().unwrap_or_else(PoisonError::into_inner);
        if let kith_sdk_core::protocol::Message::Track(track) = &event.message
            && let Some(name) = &track.event
        {
            if chunk.campaigns.is_none() {
                let campaigns = self.activation.campaigns()?;
                chunk.campaigns = Some(
                    campaigns
                        .into_iter()
                        .filter(|c| matches!(c.trigger, Trigger::Event { .. }))
                        .collect(),
                );
            }
            let named = chunk
                .campaigns
                .iter()
                .flatten()
                .any(|c| matches!(&c.trigger, Trigger::Event { event, .. } if event == name));
            if named {
                chunk.fired.push((
                    event.seq,
                    profile.to_owned(),
                    name.clone(),
                    common.received_at,
                ));
            }
        }
        Ok(crate::pipeline::Outcome::Continue)
    }

    fn end_chunk(&self) -> Result<(), StoreError> {
        let chunk = std::mem::take(&mut *self.chunk.lock().unwrap_or_else(PoisonError::into_inner));
        let activation = &self.activation;
        if chunk.fired.is_empty() {
            return Ok(());
        }
        let campaigns = chunk.campaigns.unwrap_or_default();
        let mut plan = activation.plan()?;
        for (seq, profile, name, received) in chunk.fired {
            let memberships = activation.membership.segments_of(&profile)?;
            for campaign in &campaigns {
                let Trigger::Event { event, segment } = &campaign.trigger else {
                    continue;
                };
                if *event != name || !memberships.contains(segment) {
                    continue;
                }
                let mark = key(b'e', &[campaign.id.as_bytes(), &seq.to_be_bytes()]);
                if activation.store.get(Space::Activation, &mark)?.is_some() {
                    continue; // a replayed chunk: fired already
                }
                let triggered = Triggered {
                    kind: "event".to_owned(),
                    segment: segment.clone(),
                    change_id: None,
                    event: Some(name.clone()),
                    event_seq: Some(seq),
                    event_received_at: received,
                };
                plan.deliveries(activation, campaign, &profile, &triggered)?;
                plan.writes.insert(mark, Some(Vec::new()));
            }
        }
        plan.commit(activation)
    }
}

/// The activation thread: new changes into the outbox, due deliveries out.
fn run(engine: &Weak<Activation>, rx: &Receiver<()>) {
    loop {
        match rx.recv_timeout(POLL) {
            Ok(()) | Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => return,
        }
        let Some(activation) = engine.upgrade() else {
            return;
        };
        let pass = (|| -> Result<(), StoreError> {
            while activation.dispatch()? {}
            while activation.send_due()? {}
            Ok(())
        })();
        if let Err(error) = pass {
            tracing::error!(%error, "an activation pass failed; retrying");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_take_traits_profile_and_segment() {
        let traits = json!({"first_name": "Ann", "address": {"city": "Lyon"}, "age": 34})
            .as_object()
            .cloned()
            .unwrap_or_default();
        let template = json!({
            "title": "Hi {{ traits.first_name }}!",
            "body": ["{{traits.address.city}} {{traits.age}} {{traits.missing}}", 3],
            "who": "{{profile_id}} in {{segment}}", "broken": "{{traits.first_name"
        });
        assert_eq!(
            render(&template, &traits, "prf_1", "pro"),
            json!({"title": "Hi Ann!", "body": ["Lyon 34 ", 3], "who": "prf_1 in pro",
                   "broken": "{{traits.first_name"})
        );
    }

    #[test]
    fn backoff_doubles_with_jitter_and_a_ceiling() {
        for attempt in 1..=5 {
            let ceiling = 1_000u64 << (attempt - 1);
            for noise in [0, 7, u64::MAX] {
                let wait = backoff(1_000, attempt, noise).as_millis() as u64;
                assert!(wait >= ceiling / 2 && wait <= ceiling, "{attempt}: {wait}");
            }
        }
        assert!(backoff(1_000, 40, 0) <= Duration::from_secs(3_600));
    }
}

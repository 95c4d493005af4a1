//! The client engine every Kith SDK runs: capture in Segment's terms, a durable queue,
//! batching, and an upload state machine that does no I/O.
//!
//! The engine decides what to send and when; the platform does the request. A platform
//! loop asks [`Engine::next_upload`] for an [`UploadTask`] (send this batch, wait this
//! long, or nothing to do), performs the request, and reports the outcome with
//! [`Engine::on_upload_result`]. Time comes in as an argument, so the engine is the same
//! state machine in a browser, on a phone and in tests.
//!
//! Retry policy, by outcome: 2xx delivers the batch (events the collector rejected one
//! by one are dropped with their reason); 413 splits the batch (a lone event is dropped
//! as `too_large`); 429 and 503 wait for `Retry-After`; 401, 403 and 404 pause uploads
//! for [`RetryPolicy::pause`] without losing events; other 4xx drop the batch as
//! `rejected:<status>`; 408, 5xx and network errors back off with full jitter. One batch is
//! in flight at a time, and retry state is persisted, so a client never sends faster
//! than one request per backoff interval, across restarts too.

use std::time::Duration;

use base64::Engine as _;
use jiff::Timestamp;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::json;
use crate::protocol::{
    Alias, Common, Group, Identify, Invalid, MAX_BATCH_BYTES, MAX_EVENT_BYTES, Map, Message, Page,
    Screen, Track,
};
use crate::queue::{EventStore, Op, Outcome, QueuedEvent, StoreError, Tally};
use crate::retry::RetryPolicy;
use crate::{LIBRARY_NAME, LIBRARY_VERSION};

/// Events per batch by default.
pub const DEFAULT_BATCH_EVENTS: usize = 20;
/// How long an event may wait for a batch to fill by default.
pub const DEFAULT_FLUSH_INTERVAL: Duration = Duration::from_secs(10);
/// How many events the queue holds by default before evicting the oldest.
pub const DEFAULT_QUEUE_EVENTS: usize = 10_000;
/// How many bytes of events the queue holds by default before evicting the oldest.
pub const DEFAULT_QUEUE_BYTES: usize = 8 * 1024 * 1024;
/// How old an event may get before it is dropped as `expired`, by default.
pub const DEFAULT_MAX_AGE: Duration = Duration::from_secs(7 * 24 * 60 * 60);
/// A batch in flight longer than this is taken as lost (a network error).
pub const IN_FLIGHT_TIMEOUT: Duration = Duration::from_secs(120);

/// Room kept in a batch body for the envelope around the events.
const ENVELOPE_BYTES: usize = 256;

const META_ANONYMOUS_ID: &str = "anonymousId";
const META_USER_ID: &str = "userId";
const META_TRAITS: &str = "traits";
const META_RETRY: &str = "retry";
const META_CONSENT: &str = "consent";
const META_APP_VERSION: &str = "app";
const META_PUSH_TOKEN: &str = "pushToken";

/// Segment's names for the application lifecycle events.
pub mod lifecycle {
    /// First launch of the app on this device.
    pub const INSTALLED: &str = "Application Installed";
    /// First launch after the version or build changed.
    pub const UPDATED: &str = "Application Updated";
    /// The app came to the foreground.
    pub const OPENED: &str = "Application Opened";
    /// The app went to the background.
    pub const BACKGROUNDED: &str = "Application Backgrounded";
}

/// Reasons events are dropped, as counted in [`Stats::dropped`].
pub mod reason {
    /// Older than [`super::Config::max_age`].
    pub const EXPIRED: &str = "expired";
    /// Pushed out of a full queue.
    pub const EVICTED: &str = "evicted";
    /// A lone event the collector answered 413 for.
    pub const TOO_LARGE: &str = "too_large";
    /// Its consent purpose was revoked.
    pub const CONSENT_REVOKED: &str = "consent_revoked";
}

/// How the engine batches, retries and bounds its queue.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// The source's write key.
    pub write_key: String,
    /// The collector's base URL, such as `http://127.0.0.1:8787`.
    pub endpoint: String,
    /// A batch is sent once it has this many events.
    pub max_batch_events: usize,
    /// A batch body is at most this many bytes.
    pub max_batch_bytes: usize,
    /// A batch is sent once its oldest event waited this long.
    pub flush_interval: Duration,
    /// The queue holds at most this many events (oldest evicted first).
    pub max_queue_events: usize,
    /// The queue holds at most this many bytes of events (oldest evicted first).
    pub max_queue_bytes: usize,
    /// Events older than this are dropped as `expired`.
    pub max_age: Duration,
    /// Retry timing.
    pub retry: RetryPolicy,
    /// Context the platform supplies (device, os, app, locale...), merged into every
    /// event under the event's own context.
    pub context: Map,
}

impl Config {
    /// The defaults for a source's write key and a collector URL.
    pub fn new(write_key: impl Into<String>, endpoint: impl Into<String>) -> Self {
        Config {
            write_key: write_key.into(),
            endpoint: endpoint.into(),
            max_batch_events: DEFAULT_BATCH_EVENTS,
            max_batch_bytes: MAX_BATCH_BYTES,
            flush_interval: DEFAULT_FLUSH_INTERVAL,
            max_queue_events: DEFAULT_QUEUE_EVENTS,
            max_queue_bytes: DEFAULT_QUEUE_BYTES,
            max_age: DEFAULT_MAX_AGE,
            retry: RetryPolicy::default(),
            context: Map::new(),
        }
    }
}

/// Per-call options of a capture.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CaptureOptions {
    /// The consent purpose the event needs (held until granted, purged when revoked).
    pub purpose: Option<String>,
    /// Context for this event, over the platform's.
    pub context: Option<Map>,
    /// Destinations this event is for.
    pub integrations: Option<Map>,
    /// When it happened, if not now.
    pub timestamp: Option<Timestamp>,
}

/// Why a capture was refused. Nothing was queued.
#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    /// The event breaks the spec (a missing event name, group id...).
    #[error("invalid event: {0}")]
    Invalid(#[from] Invalid),
    /// The event is larger than the collector accepts.
    #[error("the event is {size} bytes; at most {MAX_EVENT_BYTES} are accepted")]
    TooLarge {
        /// Its serialized size.
        size: usize,
    },
    /// The queue could not persist it.
    #[error(transparent)]
    Storage(#[from] StoreError),
}

/// What a before-send plugin decides.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PluginAction {
    /// Queue the (possibly changed) event.
    Keep,
    /// Drop it; it is counted as dropped with reason `plugin:<name>`.
    Drop,
}

/// A before-send hook: enriches, changes or drops each event at capture.
pub trait Plugin: Send {
    /// The plugin's name, used in drop reasons.
    fn name(&self) -> &str;
    /// Sees each event before it is queued.
    fn before_send(&self, message: &mut Message) -> PluginAction;
}

/// One request the platform should make.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UploadRequest {
    /// Pass back to [`Engine::on_upload_result`].
    pub batch_id: u64,
    /// Where to POST.
    pub url: String,
    /// The `Authorization` header value.
    pub authorization: String,
    /// The JSON body.
    pub body: String,
    /// How many events the batch carries.
    pub events: usize,
}

/// What the platform should do next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UploadTask {
    /// Make this request and report its result.
    Send(UploadRequest),
    /// Nothing to send before this much time has passed.
    Wait(Duration),
    /// Nothing to send until something is captured or flushed.
    Idle,
}

/// The outcome of an upload request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UploadResult {
    /// The collector answered with this status.
    Response {
        /// HTTP status.
        status: u16,
        /// The `Retry-After` header, in seconds, if any.
        retry_after: Option<Duration>,
        /// The response body as JSON, if it was read and parsed. The platform parses
        /// it (the browser with its own `JSON.parse`, which costs no download size).
        body: Option<Value>,
    },
    /// No answer: connection refused, reset, timed out...
    NetworkError(String),
}

/// Event accounting and upload state. `captured = delivered + dropped + pending`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stats {
    /// Events captured.
    pub captured: u64,
    /// Events the collector accepted.
    pub delivered: u64,
    /// Events queued (in flight or waiting).
    pub pending: u64,
    /// Events given up, by reason.
    pub dropped: Tally,
    /// Of the pending events, those held for consent.
    pub held: u64,
    /// Consecutive failed uploads.
    pub failures: u32,
    /// Uploads are paused because the collector refused the write key.
    pub paused: bool,
    /// Bad records skipped when the queue was opened.
    pub corrupt_records: u64,
}

#[derive(Debug, Clone, Default, PartialEq)]
struct RetryState {
    failures: u32,
    next_attempt_ms: Option<i64>,
    paused: bool,
}

impl RetryState {
    /// Read and written by hand rather than by derived serde code: in the browser every
    /// typed (de)serializer costs download size.
    fn from_value(value: &Value) -> Self {
        RetryState {
            failures: value["failures"]
                .as_u64()
                .and_then(|n| u32::try_from(n).ok())
                .unwrap_or(0),
            next_attempt_ms: value["next_attempt_ms"].as_i64(),
            paused: value["paused"].as_bool().unwrap_or(false),
        }
    }

    fn to_value(&self) -> Value {
        json::object([
            ("failures", self.failures.into()),
            ("next_attempt_ms", self.next_attempt_ms.into()),
            ("paused", self.paused.into()),
        ])
    }
}

#[derive(Debug)]
struct InFlight {
    batch_id: u64,
    ids: Vec<u64>,
    started: Timestamp,
}

/// The engine. Not thread-safe by itself: native platforms share it through
/// [`crate::native::Client`], the browser owns it on its one thread.
pub struct Engine {
    store: Box<dyn EventStore>,
    config: Config,
    plugins: Vec<Box<dyn Plugin>>,
    anonymous_id: String,
    user_id: Option<String>,
    traits: Map,
    /// Purpose → granted (a JSON bool), as persisted.
    consent: Map,
    retry: RetryState,
    in_flight: Option<InFlight>,
    batch_limit: usize,
    flush_requested: bool,
    next_batch_id: u64,
    opened_since_launch: bool,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("config", &self.config)
            .field("pending", &self.store.state().len())
            .finish_non_exhaustive()
    }
}

fn millis(ts: Timestamp) -> i64 {
    ts.as_millisecond()
}

fn duration_until(from: Timestamp, until_ms: i64) -> Duration {
    Duration::from_millis(u64::try_from(until_ms - millis(from)).unwrap_or(0))
}

fn as_ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

fn new_id() -> String {
    uuid::Uuid::new_v4().to_string()
}

impl Engine {
    /// Opens the engine on `store`, restoring the identity, consent and retry state it
    /// holds (an anonymous id is generated and persisted on first use).
    ///
    /// # Errors
    ///
    /// When the store cannot persist the new anonymous id.
    pub fn open(store: Box<dyn EventStore>, config: Config) -> Result<Self, StoreError> {
        let state = store.state();
        let anonymous_id = state
            .meta(META_ANONYMOUS_ID)
            .and_then(Value::as_str)
            .map(str::to_owned);
        let user_id = state
            .meta(META_USER_ID)
            .and_then(Value::as_str)
            .map(str::to_owned);
        let traits = state
            .meta(META_TRAITS)
            .and_then(Value::as_object)
            .cloned()
            .unwrap_or_default();
        let consent = state
            .meta(META_CONSENT)
            .and_then(Value::as_object)
            .cloned()
            .unwrap_or_default();
        let retry = state
            .meta(META_RETRY)
            .map(RetryState::from_value)
            .unwrap_or_default();
        let batch_limit = config.max_batch_events.max(1);
        let mut engine = Engine {
            store,
            config,
            plugins: Vec::new(),
            anonymous_id: anonymous_id.clone().unwrap_or_default(),
            user_id,
            traits,
            consent,
            retry,
            in_flight: None,
            batch_limit,
            flush_requested: false,
            next_batch_id: 1,
            opened_since_launch: false,
        };
        if anonymous_id.is_none() {
            engine.new_anonymous_id()?;
        }
        Ok(engine)
    }

    fn new_anonymous_id(&mut self) -> Result<(), StoreError> {
        let id = new_id();
        self.store.apply(Op::Meta {
            key: META_ANONYMOUS_ID.to_owned(),
            value: Value::from(id.clone()),
        })?;
        self.anonymous_id = id;
        Ok(())
    }

    /// Adds a before-send plugin; plugins run in the order added.
    pub fn add_plugin(&mut self, plugin: Box<dyn Plugin>) {
        self.plugins.push(plugin);
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The persisted anonymous id.
    pub fn anonymous_id(&self) -> &str {
        &self.anonymous_id
    }

    /// The user id set by `identify` or `alias`, if any.
    pub fn user_id(&self) -> Option<&str> {
        self.user_id.as_deref()
    }

    /// Captures a `track` event.
    ///
    /// # Errors
    ///
    /// See [`CaptureError`].
    pub fn track(
        &mut self,
        event: &str,
        properties: Map,
        options: CaptureOptions,
        now: Timestamp,
    ) -> Result<String, CaptureError> {
        self.capture(
            Message::Track(Track {
                common: Common::default(),
                event: Some(event.to_owned()),
                properties: Some(properties),
            }),
            options,
            now,
        )
    }

    /// Captures an `identify`: keeps the user id (when given) and merges the traits into
    /// the kept ones, which the event carries.
    ///
    /// # Errors
    ///
    /// See [`CaptureError`].
    pub fn identify(
        &mut self,
        user_id: Option<&str>,
        traits: Map,
        options: CaptureOptions,
        now: Timestamp,
    ) -> Result<String, CaptureError> {
        if let Some(user_id) = user_id.filter(|id| !id.trim().is_empty()) {
            self.set_user_id(Some(user_id.to_owned()))?;
        }
        for (key, value) in traits {
            self.traits.insert(key, value);
        }
        self.store.apply(Op::Meta {
            key: META_TRAITS.to_owned(),
            value: Value::Object(self.traits.clone()),
        })?;
        self.capture(
            Message::Identify(Identify {
                common: Common::default(),
                traits: Some(self.traits.clone()),
            }),
            options,
            now,
        )
    }

    /// Captures a `page` view.
    ///
    /// # Errors
    ///
    /// See [`CaptureError`].
    pub fn page(
        &mut self,
        name: Option<&str>,
        properties: Map,
        options: CaptureOptions,
        now: Timestamp,
    ) -> Result<String, CaptureError> {
        self.capture(
            Message::Page(Page {
                common: Common::default(),
                name: name.map(str::to_owned),
                properties: Some(properties),
            }),
            options,
            now,
        )
    }

    /// Captures a `screen` view.
    ///
    /// # Errors
    ///
    /// See [`CaptureError`].
    pub fn screen(
        &mut self,
        name: Option<&str>,
        properties: Map,
        options: CaptureOptions,
        now: Timestamp,
    ) -> Result<String, CaptureError> {
        self.capture(
            Message::Screen(Screen {
                common: Common::default(),
                name: name.map(str::to_owned),
                properties: Some(properties),
            }),
            options,
            now,
        )
    }

    /// Captures a `group` call.
    ///
    /// # Errors
    ///
    /// See [`CaptureError`].
    pub fn group(
        &mut self,
        group_id: &str,
        traits: Map,
        options: CaptureOptions,
        now: Timestamp,
    ) -> Result<String, CaptureError> {
        self.capture(
            Message::Group(Group {
                common: Common::default(),
                group_id: Some(group_id.to_owned()),
                traits: Some(traits),
            }),
            options,
            now,
        )
    }

    /// Captures an `alias`: links the current identity (user id, else anonymous id) to
    /// `user_id`, which becomes the current user id.
    ///
    /// # Errors
    ///
    /// See [`CaptureError`].
    pub fn alias(
        &mut self,
        user_id: &str,
        options: CaptureOptions,
        now: Timestamp,
    ) -> Result<String, CaptureError> {
        let previous = self
            .user_id
            .clone()
            .unwrap_or_else(|| self.anonymous_id.clone());
        let message = Message::Alias(Alias {
            common: Common {
                user_id: Some(user_id.to_owned()),
                ..Common::default()
            },
            previous_id: Some(previous),
        });
        message.validate()?;
        let id = self.capture(message, options, now)?;
        self.set_user_id(Some(user_id.to_owned()))?;
        Ok(id)
    }

    /// Forgets the user: clears the user id and traits and starts a new anonymous id.
    /// Queued events are kept.
    ///
    /// # Errors
    ///
    /// When the store cannot persist the change.
    pub fn reset(&mut self) -> Result<(), StoreError> {
        self.set_user_id(None)?;
        self.traits.clear();
        self.store.apply(Op::Meta {
            key: META_TRAITS.to_owned(),
            value: Value::Null,
        })?;
        self.new_anonymous_id()
    }

    fn set_user_id(&mut self, user_id: Option<String>) -> Result<(), StoreError> {
        self.store.apply(Op::Meta {
            key: META_USER_ID.to_owned(),
            value: user_id.clone().map_or(Value::Null, Value::from),
        })?;
        self.user_id = user_id;
        Ok(())
    }

    fn capture(
        &mut self,
        mut message: Message,
        options: CaptureOptions,
        now: Timestamp,
    ) -> Result<String, CaptureError> {
        let message_id = new_id();
        {
            let common = message.common_mut();
            common.message_id = Some(message_id.clone());
            common.anonymous_id = Some(self.anonymous_id.clone());
            if common.user_id.is_none() {
                common.user_id = self.user_id.clone();
            }
            common.timestamp = Some(options.timestamp.unwrap_or(now));
            let mut context = options.context.unwrap_or_default();
            for (key, value) in &self.config.context {
                context.entry(key.clone()).or_insert_with(|| value.clone());
            }
            context.insert(
                "library".to_owned(),
                json::object([
                    ("name", LIBRARY_NAME.into()),
                    ("version", LIBRARY_VERSION.into()),
                ]),
            );
            if let Some(Value::Object(push)) = self.store.state().meta(META_PUSH_TOKEN)
                && let Value::Object(device) = context
                    .entry("device")
                    .or_insert_with(|| Value::Object(Map::new()))
            {
                for (key, value) in push {
                    device.insert(key.clone(), value.clone());
                }
            }
            common.context = Some(context);
            common.integrations = options.integrations;
        }
        for plugin in &self.plugins {
            if plugin.before_send(&mut message) == PluginAction::Drop {
                self.store.apply(Op::DropAtCapture {
                    reason: format!("plugin:{}", plugin.name()),
                })?;
                return Ok(message_id);
            }
        }
        message.validate()?;
        let json = json::to_text(&message.into_value());
        if json.len() > MAX_EVENT_BYTES {
            return Err(CaptureError::TooLarge { size: json.len() });
        }
        let id = self.store.state().next_id();
        self.store.apply(Op::Append {
            event: QueuedEvent {
                id,
                captured_at_ms: millis(now),
                purpose: options.purpose,
                json,
            },
        })?;
        self.enforce_budgets()?;
        Ok(message_id)
    }

    fn enforce_budgets(&mut self) -> Result<(), StoreError> {
        loop {
            let state = self.store.state();
            if state.len() <= self.config.max_queue_events
                && state.bytes() <= self.config.max_queue_bytes
            {
                return Ok(());
            }
            let Some(oldest) = state.events().next().map(|e| e.id) else {
                return Ok(());
            };
            self.store.apply(Op::Remove {
                ids: vec![oldest],
                outcome: Outcome::Dropped {
                    reason: reason::EVICTED.to_owned(),
                },
            })?;
        }
    }

    /// Reports that the app launched at `version` (`build`): emits `Application
    /// Installed` on the first launch ever and `Application Updated` (with the previous
    /// version and build) when they changed since the last launch.
    ///
    /// # Errors
    ///
    /// See [`CaptureError`].
    pub fn app_launched(
        &mut self,
        version: &str,
        build: &str,
        now: Timestamp,
    ) -> Result<Option<String>, CaptureError> {
        self.opened_since_launch = false;
        let current = json::object([("version", version.into()), ("build", build.into())]);
        let previous = self.store.state().meta(META_APP_VERSION).cloned();
        let event = match &previous {
            None => Some((lifecycle::INSTALLED, current.clone())),
            Some(previous) if *previous != current => Some((
                lifecycle::UPDATED,
                json::object([
                    ("version", version.into()),
                    ("build", build.into()),
                    ("previous_version", previous["version"].clone()),
                    ("previous_build", previous["build"].clone()),
                ]),
            )),
            Some(_) => None,
        };
        let Some((name, properties)) = event else {
            return Ok(None);
        };
        let properties = properties.as_object().cloned().unwrap_or_default();
        let id = self.track(name, properties, CaptureOptions::default(), now)?;
        self.store.apply(Op::Meta {
            key: META_APP_VERSION.to_owned(),
            value: current,
        })?;
        Ok(Some(id))
    }

    /// Reports that the app came to the foreground: emits `Application Opened`, with
    /// `from_background` false for the first time since launch.
    ///
    /// # Errors
    ///
    /// See [`CaptureError`].
    pub fn app_foregrounded(&mut self, now: Timestamp) -> Result<String, CaptureError> {
        let app = self
            .store
            .state()
            .meta(META_APP_VERSION)
            .cloned()
            .unwrap_or(Value::Null);
        let mut properties = Map::new();
        properties.insert(
            "from_background".to_owned(),
            Value::from(self.opened_since_launch),
        );
        for key in ["version", "build"] {
            if let Some(value) = app.get(key) {
                properties.insert(key.to_owned(), value.clone());
            }
        }
        self.opened_since_launch = true;
        self.track(
            lifecycle::OPENED,
            properties,
            CaptureOptions::default(),
            now,
        )
    }

    /// Reports that the app went to the background: emits `Application Backgrounded`
    /// and flushes, since the app may not run again soon.
    ///
    /// # Errors
    ///
    /// See [`CaptureError`].
    pub fn app_backgrounded(&mut self, now: Timestamp) -> Result<String, CaptureError> {
        let id = self.track(
            lifecycle::BACKGROUNDED,
            Map::new(),
            CaptureOptions::default(),
            now,
        )?;
        self.flush();
        Ok(id)
    }

    /// Keeps the device's push token (`provider` is `fcm`, `apns`...): every later event
    /// carries it as `context.device.token` and `context.device.tokenProvider`, and an
    /// `identify` is sent now so the collector learns it at once.
    ///
    /// # Errors
    ///
    /// See [`CaptureError`].
    pub fn set_push_token(
        &mut self,
        provider: &str,
        token: &str,
        now: Timestamp,
    ) -> Result<String, CaptureError> {
        self.store.apply(Op::Meta {
            key: META_PUSH_TOKEN.to_owned(),
            value: json::object([("token", token.into()), ("tokenProvider", provider.into())]),
        })?;
        let user_id = self.user_id.clone();
        self.identify(
            user_id.as_deref(),
            Map::new(),
            CaptureOptions::default(),
            now,
        )
    }

    /// Grants or revokes consent for a purpose. Granting releases the held events of
    /// that purpose; revoking drops its pending events (`consent_revoked`).
    ///
    /// # Errors
    ///
    /// When the store cannot persist the change.
    pub fn set_consent(&mut self, purpose: &str, granted: bool) -> Result<(), StoreError> {
        self.consent
            .insert(purpose.to_owned(), Value::Bool(granted));
        self.store.apply(Op::Meta {
            key: META_CONSENT.to_owned(),
            value: Value::Object(self.consent.clone()),
        })?;
        if !granted {
            let ids: Vec<u64> = self
                .store
                .state()
                .events()
                .filter(|e| e.purpose.as_deref() == Some(purpose))
                .map(|e| e.id)
                .collect();
            if !ids.is_empty() {
                self.store.apply(Op::Remove {
                    ids,
                    outcome: Outcome::Dropped {
                        reason: reason::CONSENT_REVOKED.to_owned(),
                    },
                })?;
            }
        }
        Ok(())
    }

    fn sendable(&self, event: &QueuedEvent) -> bool {
        event
            .purpose
            .as_ref()
            .is_none_or(|p| self.consent.get(p).and_then(Value::as_bool) == Some(true))
    }

    /// Asks for the queue to be sent now, without waiting for a full batch or the
    /// interval. Backoff and pauses still apply.
    pub fn flush(&mut self) {
        self.flush_requested = true;
    }

    /// Whether events wait that could be sent (not held for consent).
    pub fn has_sendable(&self) -> bool {
        self.store.state().events().any(|e| self.sendable(e))
    }

    /// What the platform should do next, at `now`.
    ///
    /// # Errors
    ///
    /// When the store cannot persist dropping expired events.
    pub fn next_upload(&mut self, now: Timestamp) -> Result<UploadTask, StoreError> {
        if let Some(in_flight) = &self.in_flight {
            let lost_at = millis(in_flight.started) + as_ms(IN_FLIGHT_TIMEOUT);
            if millis(now) < lost_at {
                return Ok(UploadTask::Wait(duration_until(now, lost_at)));
            }
            let batch_id = in_flight.batch_id;
            self.on_upload_result(
                batch_id,
                UploadResult::NetworkError("no result reported in time".to_owned()),
                now,
            )?;
        }
        self.drop_expired(now)?;
        if let Some(next) = self.retry.next_attempt_ms
            && next > millis(now)
        {
            return Ok(UploadTask::Wait(duration_until(now, next)));
        }
        let budget = self
            .config
            .max_batch_bytes
            .min(MAX_BATCH_BYTES)
            .saturating_sub(ENVELOPE_BYTES);
        let mut ids = Vec::new();
        let mut events = Vec::new();
        let mut bytes = 0;
        let mut oldest_ms = None;
        let mut full = false;
        for event in self.store.state().events().filter(|e| self.sendable(e)) {
            if ids.len() == self.batch_limit || bytes + event.json().len() + 1 > budget {
                full = true;
                break;
            }
            oldest_ms.get_or_insert(event.captured_at_ms);
            bytes += event.json().len() + 1;
            ids.push(event.id);
            events.push(event.json());
        }
        let Some(oldest_ms) = oldest_ms else {
            self.flush_requested = false;
            return Ok(UploadTask::Idle);
        };
        let due_ms = oldest_ms + as_ms(self.config.flush_interval);
        full |= ids.len() >= self.batch_limit;
        if !(full || self.flush_requested || millis(now) >= due_ms) {
            return Ok(UploadTask::Wait(duration_until(now, due_ms)));
        }
        let body = encode_batch(&events, now, None);
        let batch_id = self.next_batch_id;
        self.next_batch_id += 1;
        let count = ids.len();
        self.in_flight = Some(InFlight {
            batch_id,
            ids,
            started: now,
        });
        Ok(UploadTask::Send(UploadRequest {
            batch_id,
            url: format!("{}/v1/batch", self.config.endpoint.trim_end_matches('/')),
            authorization: format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD
                    .encode(format!("{}:", self.config.write_key))
            ),
            body,
            events: count,
        }))
    }

    fn drop_expired(&mut self, now: Timestamp) -> Result<(), StoreError> {
        let cutoff = millis(now) - as_ms(self.config.max_age);
        let in_flight: &[u64] = self.in_flight.as_ref().map_or(&[], |f| &f.ids);
        let expired: Vec<u64> = self
            .store
            .state()
            .events()
            .take_while(|e| e.captured_at_ms < cutoff)
            .map(|e| e.id)
            .filter(|id| !in_flight.contains(id))
            .collect();
        if expired.is_empty() {
            return Ok(());
        }
        self.store.apply(Op::Remove {
            ids: expired,
            outcome: Outcome::Dropped {
                reason: reason::EXPIRED.to_owned(),
            },
        })
    }

    /// Feeds back the outcome of the request for `batch_id`. A result for a batch not in
    /// flight (stale, or reported twice) is ignored.
    ///
    /// # Errors
    ///
    /// When the store cannot persist the outcome; the batch is then sent again later.
    pub fn on_upload_result(
        &mut self,
        batch_id: u64,
        result: UploadResult,
        now: Timestamp,
    ) -> Result<(), StoreError> {
        let Some(in_flight) = self.in_flight.take_if(|f| f.batch_id == batch_id) else {
            return Ok(());
        };
        let ids = in_flight.ids;
        match result {
            UploadResult::Response {
                status: 200..=299,
                body,
                ..
            } => {
                let rejected = rejected_indexes(body.as_ref());
                // Few distinct codes per batch: a list, not a map.
                let mut by_reason: Vec<(String, Vec<u64>)> = Vec::new();
                for (index, code) in rejected {
                    let Some(&id) = ids.get(index) else { continue };
                    let reason = format!("rejected:{code}");
                    match by_reason.iter_mut().find(|(r, _)| *r == reason) {
                        Some((_, same)) => same.push(id),
                        None => by_reason.push((reason, vec![id])),
                    }
                }
                for (reason, rejected_ids) in by_reason {
                    self.store.apply(Op::Remove {
                        ids: rejected_ids,
                        outcome: Outcome::Dropped { reason },
                    })?;
                }
                self.store.apply(Op::Remove {
                    ids,
                    outcome: Outcome::Delivered,
                })?;
                self.batch_limit = self.config.max_batch_events.max(1);
                self.set_retry(RetryState::default())?;
            }
            UploadResult::Response { status: 413, .. } if ids.len() > 1 => {
                self.batch_limit = (ids.len() / 2).max(1);
            }
            UploadResult::Response { status: 413, .. } => {
                self.store.apply(Op::Remove {
                    ids,
                    outcome: Outcome::Dropped {
                        reason: reason::TOO_LARGE.to_owned(),
                    },
                })?;
                self.batch_limit = self.config.max_batch_events.max(1);
            }
            UploadResult::Response {
                status: 401 | 403 | 404,
                ..
            } => {
                self.set_retry(RetryState {
                    failures: self.retry.failures + 1,
                    next_attempt_ms: Some(millis(now) + as_ms(self.config.retry.pause)),
                    paused: true,
                })?;
            }
            UploadResult::Response {
                status: 429 | 503,
                retry_after: Some(wait),
                ..
            } => {
                self.set_retry(RetryState {
                    failures: self.retry.failures + 1,
                    next_attempt_ms: Some(millis(now) + as_ms(wait)),
                    paused: false,
                })?;
            }
            // 408 (request timeout) and 429 are transient; any other 4xx says this batch
            // will never be taken.
            UploadResult::Response { status, .. }
                if (400..500).contains(&status) && status != 408 && status != 429 =>
            {
                self.store.apply(Op::Remove {
                    ids,
                    outcome: Outcome::Dropped {
                        reason: format!("rejected:{status}"),
                    },
                })?;
                self.set_retry(RetryState::default())?;
            }
            UploadResult::Response { .. } | UploadResult::NetworkError(_) => {
                let failures = self.retry.failures + 1;
                let wait = self.config.retry.delay(failures);
                self.set_retry(RetryState {
                    failures,
                    next_attempt_ms: Some(millis(now) + as_ms(wait)),
                    paused: false,
                })?;
            }
        }
        Ok(())
    }

    fn set_retry(&mut self, retry: RetryState) -> Result<(), StoreError> {
        if retry == self.retry {
            return Ok(());
        }
        self.store.apply(Op::Meta {
            key: META_RETRY.to_owned(),
            value: retry.to_value(),
        })?;
        self.retry = retry;
        Ok(())
    }

    /// Bodies for `navigator.sendBeacon` when the page is going away: every sendable
    /// event, in bodies of at most `max_body` bytes that carry the write key. The events
    /// stay queued: a page that is going away cannot learn whether its beacon arrived, so
    /// whoever runs this queue next sends them again, and the collector deduplicates them
    /// by `messageId`.
    pub fn beacon_bodies(&self, max_body: usize, now: Timestamp) -> Vec<String> {
        let budget = max_body.saturating_sub(ENVELOPE_BYTES + self.config.write_key.len());
        let mut bodies = Vec::new();
        let mut events: Vec<&str> = Vec::new();
        let mut bytes = 0;
        for event in self.store.state().events().filter(|e| self.sendable(e)) {
            let size = event.json().len() + 1;
            if !events.is_empty() && bytes + size > budget {
                bodies.push(encode_batch(&events, now, Some(&self.config.write_key)));
                events.clear();
                bytes = 0;
            }
            if size <= budget {
                events.push(event.json());
                bytes += size;
            }
        }
        if !events.is_empty() {
            bodies.push(encode_batch(&events, now, Some(&self.config.write_key)));
        }
        bodies
    }

    /// Queues an event another queue captured (a closed browser tab's), keeping its
    /// capture time and purpose. It counts as captured here.
    ///
    /// # Errors
    ///
    /// When the store cannot persist it.
    pub fn adopt(&mut self, mut event: QueuedEvent) -> Result<(), StoreError> {
        event.id = self.store.state().next_id();
        self.store.apply(Op::Append { event })?;
        self.enforce_budgets()
    }

    /// Event accounting and upload state.
    pub fn stats(&self) -> Stats {
        let state = self.store.state();
        let counters = state.counters();
        Stats {
            captured: counters.captured,
            delivered: counters.delivered,
            pending: state.len() as u64,
            dropped: counters.dropped.clone(),
            held: state.events().filter(|e| !self.sendable(e)).count() as u64,
            failures: self.retry.failures,
            paused: self.retry.paused,
            corrupt_records: self.store.corrupt_records(),
        }
    }
}

/// The body of `POST /v1/batch` for already-serialized events, stamped with `sentAt`,
/// and carrying the write key when given (for `sendBeacon`, which cannot set headers).
pub fn encode_batch(events: &[&str], sent_at: Timestamp, write_key: Option<&str>) -> String {
    let size: usize = events.iter().map(|e| e.len() + 1).sum();
    let mut body = String::with_capacity(size + 128);
    body.push_str("{\"batch\":[");
    for (i, event) in events.iter().enumerate() {
        if i > 0 {
            body.push(',');
        }
        body.push_str(event);
    }
    body.push_str("],\"sentAt\":\"");
    body.push_str(&sent_at.to_string());
    body.push('"');
    if let Some(key) = write_key {
        body.push_str(",\"writeKey\":");
        body.push_str(&json::to_text(&Value::from(key)));
    }
    body.push('}');
    body
}

/// The `(index, code)` pairs of a collector's `rejected` list, if the body has one.
fn rejected_indexes(reply: Option<&Value>) -> Vec<(usize, String)> {
    let Some(reply) = reply else {
        return Vec::new();
    };
    reply["rejected"]
        .as_array()
        .map(|rejected| {
            rejected
                .iter()
                .filter_map(|r| {
                    let index = usize::try_from(r["index"].as_u64()?).ok()?;
                    Some((index, r["code"].as_str()?.to_owned()))
                })
                .collect()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::file_store::FileStore;
    use crate::queue::MemoryStore;
    use serde_json::json;

    fn t(secs: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + secs).expect("timestamp")
    }

    fn config() -> Config {
        let mut config = Config::new("key", "http://collector.test/");
        config.retry = RetryPolicy {
            initial: Duration::from_secs(1),
            max: Duration::from_secs(60),
            pause: Duration::from_secs(600),
        };
        config.context = json!({"os": {"name": "Linux"}, "locale": "fr-FR"})
            .as_object()
            .cloned()
            .expect("object");
        config
    }

    fn engine() -> Engine {
        Engine::open(Box::new(MemoryStore::new()), config()).expect("opens")
    }

    fn file_engine(path: &std::path::Path) -> Engine {
        let store = FileStore::open(path, false).expect("store");
        Engine::open(Box::new(store), config()).expect("engine")
    }

    fn props(value: Value) -> Map {
        value.as_object().cloned().expect("object")
    }

    fn track_n(engine: &mut Engine, n: usize, now: Timestamp) -> Vec<String> {
        (0..n)
            .map(|i| {
                engine
                    .track(
                        "Clicked",
                        props(json!({"i": i})),
                        CaptureOptions::default(),
                        now,
                    )
                    .expect("captured")
            })
            .collect()
    }

    fn send(engine: &mut Engine, now: Timestamp) -> UploadRequest {
        match engine.next_upload(now).expect("task") {
            UploadTask::Send(request) => request,
            other => panic!("expected a batch, got {other:?}"),
        }
    }

    fn ok(body: &str) -> UploadResult {
        UploadResult::Response {
            status: 200,
            retry_after: None,
            body: serde_json::from_str(body).ok(),
        }
    }

    fn status(code: u16) -> UploadResult {
        UploadResult::Response {
            status: code,
            retry_after: None,
            body: None,
        }
    }

    fn batch_ids(request: &UploadRequest) -> Vec<String> {
        let body: Value = serde_json::from_str(&request.body).expect("json body");
        body["batch"]
            .as_array()
            .expect("batch")
            .iter()
            .map(|e| e["messageId"].as_str().expect("id").to_owned())
            .collect()
    }

    fn assert_identity(engine: &Engine) {
        let s = engine.stats();
        assert_eq!(
            s.captured,
            s.delivered + s.dropped.total() + s.pending,
            "{s:?}"
        );
    }

    #[test]
    fn capture_fills_the_common_fields() {
        let mut e = engine();
        let anonymous = e.anonymous_id().to_owned();
        let options = CaptureOptions {
            context: Some(props(json!({"locale": "de-DE"}))),
            ..CaptureOptions::default()
        };
        let id = e
            .track("Signed Up", props(json!({"plan": "pro"})), options, t(0))
            .expect("captured");
        let request = {
            e.flush();
            send(&mut e, t(1))
        };
        let body: Value = serde_json::from_str(&request.body).expect("json");
        let event = &body["batch"][0];
        assert_eq!(event["messageId"], json!(id));
        assert_eq!(event["anonymousId"], json!(anonymous));
        assert_eq!(event["timestamp"], json!(t(0).to_string()));
        assert_eq!(event["context"]["library"]["name"], LIBRARY_NAME);
        assert_eq!(event["context"]["os"]["name"], "Linux", "platform context");
        assert_eq!(
            event["context"]["locale"], "de-DE",
            "the call's context wins"
        );
        assert_eq!(
            body["sentAt"],
            json!(t(1).to_string()),
            "sentAt is set at send"
        );
        assert_eq!(request.url, "http://collector.test/v1/batch");
        assert_eq!(request.authorization, "Basic a2V5Og==");
        assert!(event.get("userId").is_none());
    }

    #[test]
    fn identity_is_kept_reset_and_aliased() {
        let mut e = engine();
        let first_anonymous = e.anonymous_id().to_owned();
        e.identify(
            Some("u1"),
            props(json!({"email": "a@b.c"})),
            CaptureOptions::default(),
            t(0),
        )
        .expect("identify");
        e.identify(
            None,
            props(json!({"plan": "pro"})),
            CaptureOptions::default(),
            t(0),
        )
        .expect("identify");
        e.track("After", Map::new(), CaptureOptions::default(), t(0))
            .expect("track");
        e.alias("u2", CaptureOptions::default(), t(0))
            .expect("alias");
        e.reset().expect("reset");
        e.track(
            "Anonymous again",
            Map::new(),
            CaptureOptions::default(),
            t(0),
        )
        .expect("track");
        e.flush();
        let body: Value = serde_json::from_str(&send(&mut e, t(0)).body).expect("json");
        let b = body["batch"].as_array().expect("batch");
        assert_eq!(
            b[1]["traits"],
            json!({"email": "a@b.c", "plan": "pro"}),
            "traits merge"
        );
        assert_eq!(b[1]["userId"], "u1");
        assert_eq!(b[2]["userId"], "u1");
        assert_eq!(b[3]["type"], "alias");
        assert_eq!(b[3]["previousId"], "u1");
        assert_eq!(b[3]["userId"], "u2");
        assert!(b[4].get("userId").is_none());
        assert_ne!(
            b[4]["anonymousId"],
            json!(first_anonymous),
            "reset starts a new anonymous id"
        );
        assert_eq!(b[0]["anonymousId"], json!(first_anonymous));
    }

    #[test]
    fn identity_and_retry_state_survive_a_restart() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("q.log");
        let open = || file_engine(&path);
        let mut e = open();
        let anonymous = e.anonymous_id().to_owned();
        e.identify(Some("u1"), Map::new(), CaptureOptions::default(), t(0))
            .expect("identify");
        e.flush();
        let request = send(&mut e, t(0));
        e.on_upload_result(request.batch_id, status(500), t(0))
            .expect("result");
        let waiting = e.next_upload(t(0)).expect("task");
        drop(e);
        let mut e = open();
        assert_eq!(e.anonymous_id(), anonymous);
        assert_eq!(e.user_id(), Some("u1"));
        assert_eq!(e.stats().failures, 1);
        assert_eq!(
            e.next_upload(t(0)).expect("task"),
            waiting,
            "backoff survives restart"
        );
    }

    #[test]
    fn bad_events_are_refused_and_leave_the_queue_untouched() {
        let mut e = engine();
        assert!(matches!(
            e.track("  ", Map::new(), CaptureOptions::default(), t(0)),
            Err(CaptureError::Invalid(Invalid {
                code: "missing_event",
                ..
            }))
        ));
        assert!(matches!(
            e.group("", Map::new(), CaptureOptions::default(), t(0)),
            Err(CaptureError::Invalid(Invalid {
                code: "missing_group_id",
                ..
            }))
        ));
        let huge = props(json!({"blob": "x".repeat(MAX_EVENT_BYTES)}));
        let err = e
            .track("Big", huge, CaptureOptions::default(), t(0))
            .expect_err("too large");
        assert!(matches!(err, CaptureError::TooLarge { size } if size > MAX_EVENT_BYTES));
        assert!(err.to_string().contains("at most 32768"));
        assert_eq!(e.stats(), Stats::default());
    }

    #[test]
    fn batches_by_count_interval_and_flush() {
        let mut e = engine();
        assert_eq!(e.next_upload(t(0)).expect("task"), UploadTask::Idle);
        track_n(&mut e, 3, t(0));
        assert_eq!(
            e.next_upload(t(4)).expect("task"),
            UploadTask::Wait(Duration::from_secs(6)),
            "waits for the interval"
        );
        let request = send(&mut e, t(10));
        assert_eq!(request.events, 3, "the interval sends what there is");
        e.on_upload_result(request.batch_id, ok("{}"), t(10))
            .expect("ok");

        track_n(&mut e, 45, t(20));
        let request = send(&mut e, t(20));
        assert_eq!(
            request.events, DEFAULT_BATCH_EVENTS,
            "a full batch goes at once"
        );
        assert!(
            matches!(e.next_upload(t(20)).expect("task"), UploadTask::Wait(_)),
            "one in flight"
        );
        e.on_upload_result(request.batch_id, ok("{}"), t(20))
            .expect("ok");
        assert_eq!(send(&mut e, t(20)).events, 20);
        e.on_upload_result(2 + 1, ok("{}"), t(20)).expect("ok");
        assert!(
            matches!(e.next_upload(t(20)).expect("task"), UploadTask::Wait(_)),
            "5 left wait"
        );
        e.flush();
        assert_eq!(send(&mut e, t(20)).events, 5, "flush sends a partial batch");
        assert_identity(&e);
    }

    #[test]
    fn batches_stay_under_the_byte_limit() {
        let mut e = engine();
        for _ in 0..40 {
            e.track(
                "Big",
                props(json!({"blob": "x".repeat(30_000)})),
                CaptureOptions::default(),
                t(0),
            )
            .expect("captured");
        }
        let request = send(&mut e, t(0));
        assert!(
            request.body.len() <= MAX_BATCH_BYTES,
            "{}",
            request.body.len()
        );
        assert!(
            request.events < 20 && request.events >= 15,
            "{}",
            request.events
        );
    }

    #[test]
    fn a_2xx_delivers_and_rejected_events_are_dropped_with_their_reason() {
        let mut e = engine();
        track_n(&mut e, 20, t(0));
        let request = send(&mut e, t(0));
        e.on_upload_result(
            request.batch_id,
            ok(r#"{"success":true,"rejected":[{"index":3,"code":"missing_event","message":"m"},{"index":99,"code":"x"}]}"#),
            t(0),
        )
        .expect("ok");
        let s = e.stats();
        assert_eq!((s.delivered, s.pending), (19, 0));
        assert_eq!(s.dropped.get("rejected:missing_event"), 1);
        assert_identity(&e);
        e.on_upload_result(request.batch_id, ok("{}"), t(0))
            .expect("a repeat is ignored");
        assert_eq!(e.stats().delivered, 19);
    }

    #[test]
    fn a_413_splits_the_batch_and_drops_a_lone_event() {
        let mut e = engine();
        let ids = track_n(&mut e, 20, t(0));
        let first = send(&mut e, t(0));
        e.on_upload_result(first.batch_id, status(413), t(0))
            .expect("413");
        let half = send(&mut e, t(0));
        assert_eq!(batch_ids(&half), ids[..10]);
        e.on_upload_result(half.batch_id, status(413), t(0))
            .expect("413");
        let mut sizes = Vec::new();
        loop {
            let request = send(&mut e, t(0));
            sizes.push(request.events);
            if request.events == 1 {
                e.on_upload_result(request.batch_id, status(413), t(0))
                    .expect("413");
                break;
            }
            e.on_upload_result(request.batch_id, status(413), t(0))
                .expect("413");
        }
        assert_eq!(sizes, [5, 2, 1]);
        assert_eq!(e.stats().dropped.get(reason::TOO_LARGE), 1);
        e.flush();
        let next = send(&mut e, t(0));
        e.on_upload_result(next.batch_id, ok("{}"), t(0))
            .expect("ok");
        assert_eq!(
            next.events,
            20 - 1,
            "after a success batches are full size again"
        );
        assert_identity(&e);
    }

    #[test]
    fn retry_after_pauses_and_backoff() {
        let mut e = engine();
        track_n(&mut e, 20, t(0));
        let request = send(&mut e, t(0));
        let limited = UploadResult::Response {
            status: 429,
            retry_after: Some(Duration::from_secs(30)),
            body: None,
        };
        e.on_upload_result(request.batch_id, limited, t(0))
            .expect("429");
        assert_eq!(
            e.next_upload(t(10)).expect("task"),
            UploadTask::Wait(Duration::from_secs(20))
        );
        let request = send(&mut e, t(30));

        e.on_upload_result(request.batch_id, status(401), t(30))
            .expect("401");
        assert!(e.stats().paused);
        assert_eq!(e.stats().pending, 20, "a pause loses nothing");
        e.flush();
        assert_eq!(
            e.next_upload(t(31)).expect("task"),
            UploadTask::Wait(Duration::from_secs(599)),
            "flush does not override a pause"
        );
        let request = send(&mut e, t(630));

        let mut last = t(630);
        let mut request = request;
        for failures in 1..=8u32 {
            e.on_upload_result(request.batch_id, status(500), last)
                .expect("500");
            let UploadTask::Wait(wait) = e.next_upload(last).expect("task") else {
                panic!("waits")
            };
            assert!(
                wait >= Duration::from_secs(1) && wait <= e.config().retry.ceiling(failures + 2),
                "{wait:?}"
            );
            last = last.checked_add(wait).expect("time");
            request = send(&mut e, last);
        }
        e.on_upload_result(
            request.batch_id,
            UploadResult::NetworkError("refused".into()),
            last,
        )
        .expect("net");
        let UploadTask::Wait(_) = e.next_upload(last).expect("task") else {
            panic!("waits")
        };
        e.on_upload_result(request.batch_id, ok("{}"), last)
            .expect("stale result ignored");
        assert_eq!(e.stats().delivered, 0);
        assert_identity(&e);
    }

    #[test]
    fn other_4xx_drop_the_batch() {
        let mut e = engine();
        track_n(&mut e, 20, t(0));
        let request = send(&mut e, t(0));
        e.on_upload_result(request.batch_id, status(400), t(0))
            .expect("400");
        assert_eq!(e.stats().dropped.get("rejected:400"), 20);
        assert_identity(&e);
    }

    #[test]
    fn a_lost_result_counts_as_a_network_error() {
        let mut e = engine();
        track_n(&mut e, 20, t(0));
        let _lost = send(&mut e, t(0));
        assert_eq!(
            e.next_upload(t(60)).expect("task"),
            UploadTask::Wait(Duration::from_secs(60))
        );
        let UploadTask::Wait(_) = e.next_upload(t(120)).expect("task") else {
            panic!("backs off")
        };
        assert_eq!(e.stats().failures, 1);
    }

    #[test]
    fn old_events_expire_and_full_queues_evict_the_oldest() {
        let mut config = config();
        config.max_queue_events = 5;
        config.max_queue_bytes = 10_000;
        let mut e = Engine::open(Box::new(MemoryStore::new()), config).expect("opens");
        let ids = track_n(&mut e, 7, t(0));
        assert_eq!(e.stats().dropped.get(reason::EVICTED), 2);
        e.track(
            "Big",
            props(json!({"blob": "x".repeat(9_500)})),
            CaptureOptions::default(),
            t(1),
        )
        .expect("captured");
        assert_eq!(e.stats().pending, 1, "the byte budget evicts too");
        assert_eq!(e.stats().dropped.get(reason::EVICTED), 7);
        let later = t(0)
            .checked_add(DEFAULT_MAX_AGE + Duration::from_secs(2))
            .expect("time");
        assert_eq!(e.next_upload(later).expect("task"), UploadTask::Idle);
        assert_eq!(e.stats().dropped.get(reason::EXPIRED), 1);
        assert_identity(&e);
        assert_eq!(ids.len(), 7);
    }

    #[test]
    fn consent_holds_releases_and_purges() {
        let mut e = engine();
        let marketing = CaptureOptions {
            purpose: Some("marketing".into()),
            ..CaptureOptions::default()
        };
        e.track("Ad Clicked", Map::new(), marketing.clone(), t(0))
            .expect("captured");
        e.track("Ad Seen", Map::new(), marketing.clone(), t(0))
            .expect("captured");
        e.track("Plain", Map::new(), CaptureOptions::default(), t(0))
            .expect("captured");
        assert_eq!(e.stats().held, 2);
        e.flush();
        let request = send(&mut e, t(0));
        assert_eq!(request.events, 1, "held events are not sent");
        e.on_upload_result(request.batch_id, ok("{}"), t(0))
            .expect("ok");
        e.set_consent("marketing", true).expect("grant");
        e.flush();
        assert_eq!(send(&mut e, t(0)).events, 2, "granted events are released");

        let mut e = engine();
        e.track("Ad Clicked", Map::new(), marketing, t(0))
            .expect("captured");
        e.set_consent("marketing", false).expect("revoke");
        assert_eq!(e.stats().dropped.get(reason::CONSENT_REVOKED), 1);
        assert_eq!(e.stats().pending, 0);
        assert_identity(&e);
    }

    #[test]
    fn lifecycle_events_follow_segments_names() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("q.log");
        let open = || file_engine(&path);
        let mut e = open();
        assert!(e.app_launched("1.0", "10", t(0)).expect("launch").is_some());
        e.app_foregrounded(t(1)).expect("opened");
        e.app_backgrounded(t(2)).expect("backgrounded");
        let request = send(&mut e, t(2));
        e.on_upload_result(request.batch_id, ok("{}"), t(2))
            .expect("ok");
        e.app_foregrounded(t(3)).expect("opened again");
        e.flush();
        let again: Value = serde_json::from_str(&send(&mut e, t(3)).body).expect("json");
        assert_eq!(again["batch"][0]["properties"]["from_background"], true);
        let body: Value = serde_json::from_str(&request.body).expect("json");
        let b = body["batch"].as_array().expect("batch");
        assert_eq!(b[0]["event"], lifecycle::INSTALLED);
        assert_eq!(b[0]["properties"], json!({"version": "1.0", "build": "10"}));
        assert_eq!(b[1]["event"], lifecycle::OPENED);
        assert_eq!(
            b[1]["properties"],
            json!({"from_background": false, "version": "1.0", "build": "10"})
        );
        assert_eq!(b[2]["event"], lifecycle::BACKGROUNDED);
        assert_eq!(b.len(), 3, "backgrounding flushed at once");
        drop(e);

        let mut e = open();
        assert_eq!(
            e.app_launched("1.0", "10", t(10)).expect("launch"),
            None,
            "same version: nothing"
        );
        drop(e);
        let mut e = open();
        e.app_launched("1.1", "11", t(20)).expect("launch");
        e.flush();
        let body: Value = serde_json::from_str(&send(&mut e, t(20)).body).expect("json");
        let b = body["batch"].as_array().expect("batch");
        let updated = b
            .iter()
            .find(|m| m["event"] == lifecycle::UPDATED)
            .expect("updated");
        assert_eq!(
            updated["properties"],
            json!({"version": "1.1", "build": "11", "previous_version": "1.0", "previous_build": "10"})
        );
    }

    #[test]
    fn beacon_bodies_stay_small_carry_the_key_and_keep_the_events() {
        let mut e = engine();
        for _ in 0..10 {
            e.track(
                "Big",
                props(json!({"blob": "x".repeat(20_000)})),
                CaptureOptions::default(),
                t(0),
            )
            .expect("captured");
        }
        let bodies = e.beacon_bodies(64 * 1024, t(1));
        assert!(bodies.len() >= 4, "{}", bodies.len());
        let mut count = 0;
        for body in &bodies {
            assert!(body.len() < 64 * 1024, "{}", body.len());
            let value: Value = serde_json::from_str(body).expect("json");
            assert_eq!(value["writeKey"], "key");
            count += value["batch"].as_array().map_or(0, Vec::len);
        }
        assert_eq!(count, 10);
        assert_eq!(e.stats().pending, 10, "beaconed events stay queued");
    }

    #[test]
    fn adopted_events_keep_their_message() {
        let mut other = engine();
        other
            .track("Orphan", Map::new(), CaptureOptions::default(), t(0))
            .expect("captured");
        let orphan = other
            .store
            .state()
            .events()
            .next()
            .cloned()
            .expect("queued");
        let mut e = engine();
        e.adopt(orphan.clone()).expect("adopted");
        e.flush();
        let request = send(&mut e, t(0));
        let body: Value = serde_json::from_str(&request.body).expect("json");
        let sent: Value = serde_json::from_str(orphan.json()).expect("json");
        assert_eq!(body["batch"][0], sent);
        assert_eq!(e.stats().captured, 1);
    }

    #[test]
    fn push_tokens_ride_on_every_later_event() {
        let mut e = engine();
        e.set_push_token("fcm", "tok-1", t(0)).expect("token");
        e.track("After", Map::new(), CaptureOptions::default(), t(0))
            .expect("track");
        e.flush();
        let body: Value = serde_json::from_str(&send(&mut e, t(0)).body).expect("json");
        let b = body["batch"].as_array().expect("batch");
        assert_eq!(b[0]["type"], "identify");
        for event in b {
            assert_eq!(event["context"]["device"]["token"], "tok-1");
            assert_eq!(event["context"]["device"]["tokenProvider"], "fcm");
        }
    }

    struct Tag;
    impl Plugin for Tag {
        fn name(&self) -> &str {
            "tag"
        }
        fn before_send(&self, message: &mut Message) -> PluginAction {
            if let Message::Track(track) = message {
                if track.event.as_deref() == Some("Secret") {
                    return PluginAction::Drop;
                }
                track
                    .properties
                    .get_or_insert_with(Map::new)
                    .insert("tagged".into(), json!(true));
            }
            PluginAction::Keep
        }
    }

    #[test]
    fn plugins_enrich_change_and_drop() {
        let mut e = engine();
        e.add_plugin(Box::new(Tag));
        e.track("Secret", Map::new(), CaptureOptions::default(), t(0))
            .expect("dropped quietly");
        e.track("Open", Map::new(), CaptureOptions::default(), t(0))
            .expect("captured");
        assert_eq!(e.stats().dropped.get("plugin:tag"), 1);
        e.flush();
        let body: Value = serde_json::from_str(&send(&mut e, t(0)).body).expect("json");
        assert_eq!(body["batch"][0]["properties"]["tagged"], true);
        assert_eq!(body["batch"].as_array().map(Vec::len), Some(1));
        assert_identity(&e);
    }
}

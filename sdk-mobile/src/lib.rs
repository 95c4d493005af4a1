//! Kith's mobile SDK: the [`kith_sdk_core`] engine exported through UniFFI to Kotlin
//! (Android, package `dev.kith.sdk`), Swift (iOS, module `Kith`) and Python (module
//! `kith`).
//!
//! A thin layer: [`Analytics`] wraps sdk-core's native [`Client`] (file store, uploader
//! thread) and translates types and errors. Properties, traits and context cross the FFI
//! as JSON text, the one representation every language has. All behaviour (batching,
//! retry, lifecycle events, push tokens, consent) lives in sdk-core, so the Kotlin,
//! Swift, Python, browser and Rust SDKs behave the same.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use jiff::Timestamp;
use kith_sdk_core::engine::{self, CaptureError, CaptureOptions, Config, Engine};
use kith_sdk_core::file_store::FileStore;
use kith_sdk_core::native::{self, Client, HttpTransport, REQUEST_TIMEOUT};
use kith_sdk_core::protocol::Map;
use kith_sdk_core::queue::StoreError;
use serde_json::{Value, json};

uniffi::setup_scaffolding!();

/// Name of the queue file inside [`AnalyticsConfig::data_dir`].
const QUEUE_FILE: &str = "kith-events.log";

/// How an app configures the SDK.
#[derive(Debug, Clone, uniffi::Record)]
pub struct AnalyticsConfig {
    /// The source's write key.
    pub write_key: String,
    /// The collector's base URL, such as `https://collector.example.com`.
    pub endpoint: String,
    /// A directory the SDK owns, for its durable queue (the app's files dir).
    pub data_dir: String,
    /// Events per batch (0 for the default, 20).
    #[uniffi(default = 0)]
    pub flush_at: u32,
    /// Longest wait before a partial batch is sent, in milliseconds (0 for the default,
    /// 10 s).
    #[uniffi(default = 0)]
    pub flush_interval_ms: u64,
}

/// What the platform knows about the device and the app, sent as each event's context.
#[derive(Debug, Clone, Default, uniffi::Record)]
pub struct DeviceInfo {
    /// `Android`, `iOS`...
    pub os_name: String,
    /// The OS version.
    pub os_version: String,
    /// Device manufacturer.
    pub manufacturer: String,
    /// Device model.
    pub model: String,
    /// A stable device id, if the app has one it may use.
    #[uniffi(default = None)]
    pub device_id: Option<String>,
    /// BCP 47 locale, such as `fr-FR`.
    pub locale: String,
    /// IANA time zone, such as `Europe/Paris`.
    pub timezone: String,
    /// The app's name.
    pub app_name: String,
    /// The app's version, such as `2.3.1`.
    pub app_version: String,
    /// The app's build, such as `231`.
    pub app_build: String,
    /// The app's package or bundle id.
    pub app_namespace: String,
}

/// Errors every SDK call may answer, the same in every language. Each carries its
/// explanation as the exception's message (a "flat" error: Kotlin exceptions already
/// have a `message`).
#[derive(Debug, thiserror::Error, uniffi::Error)]
#[uniffi(flat_error)]
pub enum KithError {
    /// The event breaks the spec (a missing event name, group id...). Nothing queued.
    #[error("invalid event: {0}")]
    InvalidEvent(String),
    /// The event is over 32 KB. Nothing queued.
    #[error("{0}")]
    TooLarge(String),
    /// Properties, traits or context were not a JSON object.
    #[error("invalid JSON: {0}")]
    InvalidJson(String),
    /// The queue could not be read or written (disk full, permissions).
    #[error("storage: {0}")]
    Storage(String),
}

impl From<CaptureError> for KithError {
    fn from(error: CaptureError) -> Self {
        match error {
            CaptureError::Invalid(invalid) => KithError::InvalidEvent(invalid.to_string()),
            CaptureError::TooLarge { .. } => KithError::TooLarge(error.to_string()),
            CaptureError::Storage(storage) => storage.into(),
        }
    }
}

impl From<StoreError> for KithError {
    fn from(error: StoreError) -> Self {
        KithError::Storage(error.to_string())
    }
}

/// One upload request, for an app-supplied [`Transport`].
#[derive(Debug, Clone, uniffi::Record)]
pub struct UploadRequest {
    /// Where to POST.
    pub url: String,
    /// The `Authorization` header value.
    pub authorization: String,
    /// The JSON body (send with `Content-Type: application/json`).
    pub body: String,
}

/// What an app-supplied [`Transport`] observed.
#[derive(Debug, Clone, uniffi::Record)]
pub struct UploadResponse {
    /// The HTTP status, or 0 when no response came (network error, timeout).
    pub status: u16,
    /// The `Retry-After` header, in seconds, if any.
    #[uniffi(default = None)]
    pub retry_after_secs: Option<u64>,
    /// The response body, if read.
    #[uniffi(default = None)]
    pub body: Option<String>,
    /// What went wrong, when `status` is 0.
    #[uniffi(default = None)]
    pub error: Option<String>,
}

/// An HTTP stack the app supplies (OkHttp on Android, URLSession on iOS). Called on the
/// SDK's uploader thread; it may block.
#[uniffi::export(with_foreign)]
pub trait Transport: Send + Sync {
    /// POSTs the request and reports what happened.
    fn send(&self, request: UploadRequest) -> UploadResponse;
}

/// Adapts an app's [`Transport`] to sdk-core's.
struct ForeignTransport(Arc<dyn Transport>);

impl native::Transport for ForeignTransport {
    fn send(&self, request: &engine::UploadRequest) -> engine::UploadResult {
        let response = self.0.send(UploadRequest {
            url: request.url.clone(),
            authorization: request.authorization.clone(),
            body: request.body.clone(),
        });
        if response.status == 0 {
            return engine::UploadResult::NetworkError(
                response.error.unwrap_or_else(|| "no response".to_owned()),
            );
        }
        engine::UploadResult::Response {
            status: response.status,
            retry_after: response.retry_after_secs.map(Duration::from_secs),
            body: response.body.and_then(|b| serde_json::from_str(&b).ok()),
        }
    }
}

/// Event accounting: `captured = delivered + dropped + pending`.
#[derive(Debug, Clone, uniffi::Record)]
pub struct Stats {
    /// Events captured.
    pub captured: u64,
    /// Events the collector accepted.
    pub delivered: u64,
    /// Events queued.
    pub pending: u64,
    /// Events given up, by reason.
    pub dropped: HashMap<String, u64>,
    /// Pending events held for consent.
    pub held: u64,
    /// Consecutive failed uploads.
    pub failures: u32,
    /// Uploads paused because the collector refused the write key.
    pub paused: bool,
}

fn object(json: Option<String>) -> Result<Map, KithError> {
    match json.as_deref().map(str::trim) {
        None | Some("") => Ok(Map::new()),
        Some(text) => match serde_json::from_str(text) {
            Ok(Value::Object(map)) => Ok(map),
            Ok(other) => Err(KithError::InvalidJson(format!(
                "expected a JSON object, got {other}"
            ))),
            Err(error) => Err(KithError::InvalidJson(error.to_string())),
        },
    }
}

fn device_context(device: &DeviceInfo) -> Map {
    let mut context = json!({
        "os": {"name": device.os_name, "version": device.os_version},
        "device": {"manufacturer": device.manufacturer, "model": device.model},
        "app": {"name": device.app_name, "version": device.app_version,
                "build": device.app_build, "namespace": device.app_namespace},
        "locale": device.locale,
        "timezone": device.timezone,
    });
    if let Some(id) = &device.device_id {
        context["device"]["id"] = Value::from(id.clone());
    }
    context.as_object().cloned().unwrap_or_default()
}

fn options(purpose: Option<String>) -> CaptureOptions {
    CaptureOptions {
        purpose,
        ..CaptureOptions::default()
    }
}

/// The SDK: capture calls append to a durable queue and return; uploads run on the
/// SDK's own thread.
#[derive(uniffi::Object)]
pub struct Analytics {
    client: Arc<Client>,
}

#[uniffi::export]
impl Analytics {
    /// Opens the SDK: the queue in `config.data_dir` (events left by an earlier run are
    /// sent), the device's context, and the uploader, over `transport` when the app
    /// supplies one, else the built-in HTTP client. Emits `Application Installed` or
    /// `Application Updated` when this is the first launch of this version.
    ///
    /// # Errors
    ///
    /// `Storage` when the queue cannot be opened.
    #[uniffi::constructor(default(transport = None))]
    pub fn new(
        config: AnalyticsConfig,
        device: DeviceInfo,
        transport: Option<Arc<dyn Transport>>,
    ) -> Result<Arc<Self>, KithError> {
        let store = FileStore::open(
            std::path::Path::new(&config.data_dir).join(QUEUE_FILE),
            false,
        )?;
        let mut core = Config::new(config.write_key, config.endpoint);
        if config.flush_at > 0 {
            core.max_batch_events = config.flush_at as usize;
        }
        if config.flush_interval_ms > 0 {
            core.flush_interval = Duration::from_millis(config.flush_interval_ms);
        }
        core.context = device_context(&device);
        let mut engine = Engine::open(Box::new(store), core)?;
        engine.app_launched(&device.app_version, &device.app_build, Timestamp::now())?;
        let transport: Arc<dyn native::Transport> =
            match transport {
                Some(foreign) => Arc::new(ForeignTransport(foreign)),
                None => Arc::new(HttpTransport::new(REQUEST_TIMEOUT).map_err(|e| {
                    KithError::Storage(format!("cannot build the HTTP client: {e}"))
                })?),
            };
        let client = Client::start(engine, transport)
            .map_err(|e| KithError::Storage(format!("cannot start the uploader: {e}")))?;
        Ok(Arc::new(Analytics { client }))
    }

    /// Captures a `track` event; answers its messageId.
    ///
    /// # Errors
    ///
    /// `InvalidEvent`, `TooLarge`, `InvalidJson` or `Storage`.
    #[uniffi::method(default(properties_json = None, purpose = None))]
    pub fn track(
        &self,
        event: String,
        properties_json: Option<String>,
        purpose: Option<String>,
    ) -> Result<String, KithError> {
        Ok(self
            .client
            .track(&event, object(properties_json)?, options(purpose))?)
    }

    /// Captures an `identify`: keeps the user id and merges the traits.
    ///
    /// # Errors
    ///
    /// As [`Analytics::track`].
    #[uniffi::method(default(user_id = None, traits_json = None))]
    pub fn identify(
        &self,
        user_id: Option<String>,
        traits_json: Option<String>,
    ) -> Result<String, KithError> {
        Ok(self.client.identify(
            user_id.as_deref(),
            object(traits_json)?,
            CaptureOptions::default(),
        )?)
    }

    /// Captures a `screen` view.
    ///
    /// # Errors
    ///
    /// As [`Analytics::track`].
    #[uniffi::method(default(properties_json = None))]
    pub fn screen(
        &self,
        name: String,
        properties_json: Option<String>,
    ) -> Result<String, KithError> {
        Ok(self.client.screen(
            Some(&name),
            object(properties_json)?,
            CaptureOptions::default(),
        )?)
    }

    /// Captures a `group` call.
    ///
    /// # Errors
    ///
    /// As [`Analytics::track`].
    #[uniffi::method(default(traits_json = None))]
    pub fn group(
        &self,
        group_id: String,
        traits_json: Option<String>,
    ) -> Result<String, KithError> {
        Ok(self
            .client
            .group(&group_id, object(traits_json)?, CaptureOptions::default())?)
    }

    /// Captures an `alias` from the current identity to `user_id`.
    ///
    /// # Errors
    ///
    /// As [`Analytics::track`].
    pub fn alias(&self, user_id: String) -> Result<String, KithError> {
        Ok(self.client.alias(&user_id, CaptureOptions::default())?)
    }

    /// Forgets the user (logout): new anonymous id, no user id or traits.
    ///
    /// # Errors
    ///
    /// `Storage`.
    pub fn reset(&self) -> Result<(), KithError> {
        Ok(self.client.reset()?)
    }

    /// Sends what is queued now.
    pub fn flush(&self) {
        self.client.flush();
    }

    /// Flushes for at most `timeout_ms`, then stops the uploader. What is not sent stays
    /// queued for the next start. (Named `shutdown`: Kotlin objects already have `close`.)
    pub fn shutdown(&self, timeout_ms: u64) {
        self.client.shutdown(Duration::from_millis(timeout_ms));
    }

    /// Grants or revokes consent for a purpose: held events of a granted purpose are
    /// sent; pending events of a revoked one are dropped.
    ///
    /// # Errors
    ///
    /// `Storage`.
    pub fn set_consent(&self, purpose: String, granted: bool) -> Result<(), KithError> {
        Ok(self.client.set_consent(&purpose, granted)?)
    }

    /// Registers the device's push token (`provider`: `fcm` or `apns`); it reaches the
    /// collector at once and rides on every later event as `context.device.token`.
    ///
    /// # Errors
    ///
    /// As [`Analytics::track`].
    pub fn set_push_token(&self, provider: String, token: String) -> Result<String, KithError> {
        Ok(self
            .client
            .with_engine(|e| e.set_push_token(&provider, &token, Timestamp::now()))?)
    }

    /// The app came to the foreground: emits `Application Opened`.
    ///
    /// # Errors
    ///
    /// As [`Analytics::track`].
    pub fn on_foreground(&self) -> Result<String, KithError> {
        Ok(self
            .client
            .with_engine(|e| e.app_foregrounded(Timestamp::now()))?)
    }

    /// The app went to the background: emits `Application Backgrounded` and flushes.
    ///
    /// # Errors
    ///
    /// As [`Analytics::track`].
    pub fn on_background(&self) -> Result<String, KithError> {
        Ok(self
            .client
            .with_engine(|e| e.app_backgrounded(Timestamp::now()))?)
    }

    /// The anonymous id this device sends.
    pub fn anonymous_id(&self) -> String {
        self.client.with_engine(|e| e.anonymous_id().to_owned())
    }

    /// Event accounting.
    pub fn stats(&self) -> Stats {
        let stats = self.client.stats();
        Stats {
            captured: stats.captured,
            delivered: stats.delivered,
            pending: stats.pending,
            dropped: stats
                .dropped
                .iter()
                .map(|(reason, n)| (reason.to_owned(), n))
                .collect(),
            held: stats.held,
            failures: stats.failures,
            paused: stats.paused,
        }
    }
}

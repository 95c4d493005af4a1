//! The native platform: a thread-safe [`Client`] over the [`Engine`] and the uploader
//! thread that drives it, doing the HTTP through a [`Transport`] ([`HttpTransport`] by
//! default; the mobile bindings let an app supply its own, such as OkHttp or
//! URLSession). Capture calls only append to the queue and return; uploads happen on the
//! uploader thread.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use jiff::Timestamp;

use crate::engine::{
    CaptureError, CaptureOptions, Engine, Stats, UploadRequest, UploadResult, UploadTask,
};
use crate::protocol::Map;
use crate::queue::StoreError;

/// How long an upload request may take before it counts as a network error.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Does one upload request. Implemented by [`HttpTransport`], or by the app.
pub trait Transport: Send + Sync {
    /// POSTs `request.body` to `request.url` with the `Authorization` header and
    /// `Content-Type: application/json`, and reports what happened.
    fn send(&self, request: &UploadRequest) -> UploadResult;
}

/// The default transport: blocking reqwest.
#[derive(Debug, Clone)]
pub struct HttpTransport {
    http: reqwest::blocking::Client,
}

impl HttpTransport {
    /// A transport whose requests time out after `timeout`.
    ///
    /// # Errors
    ///
    /// When the HTTP client cannot be built.
    pub fn new(timeout: Duration) -> Result<Self, reqwest::Error> {
        Ok(HttpTransport {
            http: reqwest::blocking::Client::builder()
                .timeout(timeout)
                .build()?,
        })
    }
}

impl Transport for HttpTransport {
    fn send(&self, request: &UploadRequest) -> UploadResult {
        let response = self
            .http
            .post(&request.url)
            .header("authorization", &request.authorization)
            .header("content-type", "application/json")
            .body(request.body.clone())
            .send();
        match response {
            Ok(response) => {
                let status = response.status().as_u16();
                let retry_after = response
                    .headers()
                    .get("retry-after")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.trim().parse::<u64>().ok())
                    .map(Duration::from_secs);
                match response.text() {
                    Ok(body) => UploadResult::Response {
                        status,
                        retry_after,
                        body: serde_json::from_str(&body).ok(),
                    },
                    // The status came but the body did not: the batch may or may not be
                    // committed. Resending is safe (the collector deduplicates).
                    Err(error) => UploadResult::NetworkError(error.to_string()),
                }
            }
            Err(error) => UploadResult::NetworkError(error.to_string()),
        }
    }
}

/// A thread-safe client with an uploader thread.
#[derive(Debug)]
pub struct Client {
    engine: Mutex<Engine>,
    changed: Condvar,
    stopping: AtomicBool,
    uploader: Mutex<Option<JoinHandle<()>>>,
}

impl Client {
    /// Wraps `engine` and starts the uploader thread on `transport`.
    ///
    /// # Errors
    ///
    /// When the thread cannot be spawned.
    pub fn start(engine: Engine, transport: Arc<dyn Transport>) -> std::io::Result<Arc<Self>> {
        let client = Arc::new(Client {
            engine: Mutex::new(engine),
            changed: Condvar::new(),
            stopping: AtomicBool::new(false),
            uploader: Mutex::new(None),
        });
        let worker = client.clone();
        let thread = std::thread::Builder::new()
            .name("kith-uploader".to_owned())
            .spawn(move || worker.run_uploader(transport.as_ref()))?;
        *client
            .uploader
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(thread);
        Ok(client)
    }

    fn lock(&self) -> MutexGuard<'_, Engine> {
        self.engine.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Runs `f` on the engine (for calls this wrapper does not repeat), then wakes the
    /// uploader.
    pub fn with_engine<R>(&self, f: impl FnOnce(&mut Engine) -> R) -> R {
        let result = f(&mut self.lock());
        self.changed.notify_all();
        result
    }

    /// Captures a `track` event; see [`Engine::track`].
    ///
    /// # Errors
    ///
    /// See [`CaptureError`].
    pub fn track(
        &self,
        event: &str,
        properties: Map,
        options: CaptureOptions,
    ) -> Result<String, CaptureError> {
        self.with_engine(|e| e.track(event, properties, options, Timestamp::now()))
    }

    /// Captures an `identify`; see [`Engine::identify`].
    ///
    /// # Errors
    ///
    /// See [`CaptureError`].
    pub fn identify(
        &self,
        user_id: Option<&str>,
        traits: Map,
        options: CaptureOptions,
    ) -> Result<String, CaptureError> {
        self.with_engine(|e| e.identify(user_id, traits, options, Timestamp::now()))
    }

    /// Captures a `page` view; see [`Engine::page`].
    ///
    /// # Errors
    ///
    /// See [`CaptureError`].
    pub fn page(
        &self,
        name: Option<&str>,
        properties: Map,
        options: CaptureOptions,
    ) -> Result<String, CaptureError> {
        self.with_engine(|e| e.page(name, properties, options, Timestamp::now()))
    }

    /// Captures a `screen` view; see [`Engine::screen`].
    ///
    /// # Errors
    ///
    /// See [`CaptureError`].
    pub fn screen(
        &self,
        name: Option<&str>,
        properties: Map,
        options: CaptureOptions,
    ) -> Result<String, CaptureError> {
        self.with_engine(|e| e.screen(name, properties, options, Timestamp::now()))
    }

    /// Captures a `group` call; see [`Engine::group`].
    ///
    /// # Errors
    ///
    /// See [`CaptureError`].
    pub fn group(
        &self,
        group_id: &str,
        traits: Map,
        options: CaptureOptions,
    ) -> Result<String, CaptureError> {
        self.with_engine(|e| e.group(group_id, traits, options, Timestamp::now()))
    }

    /// Captures an `alias`; see [`Engine::alias`].
    ///
    /// # Errors
    ///
    /// See [`CaptureError`].
    pub fn alias(&self, user_id: &str, options: CaptureOptions) -> Result<String, CaptureError> {
        self.with_engine(|e| e.alias(user_id, options, Timestamp::now()))
    }

    /// Forgets the user; see [`Engine::reset`].
    ///
    /// # Errors
    ///
    /// When the store cannot persist the change.
    pub fn reset(&self) -> Result<(), StoreError> {
        self.with_engine(Engine::reset)
    }

    /// Grants or revokes consent; see [`Engine::set_consent`].
    ///
    /// # Errors
    ///
    /// When the store cannot persist the change.
    pub fn set_consent(&self, purpose: &str, granted: bool) -> Result<(), StoreError> {
        self.with_engine(|e| e.set_consent(purpose, granted))
    }

    /// Asks for the queue to be sent now.
    pub fn flush(&self) {
        self.with_engine(Engine::flush);
    }

    /// Event accounting and upload state.
    pub fn stats(&self) -> Stats {
        self.lock().stats()
    }

    /// Flushes, waits until nothing sendable is left, an upload fails, or `timeout`
    /// passes, then stops the uploader. Events not sent stay queued for the next start.
    pub fn shutdown(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        {
            let mut engine = self.lock();
            engine.flush();
            self.changed.notify_all();
            let failures_before = engine.stats().failures;
            while engine.has_sendable() && engine.stats().failures <= failures_before {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break;
                }
                engine = self
                    .changed
                    .wait_timeout(engine, left)
                    .unwrap_or_else(PoisonError::into_inner)
                    .0;
            }
        }
        {
            // Under the lock, so the uploader cannot miss it between its check and wait.
            let _engine = self.lock();
            self.stopping.store(true, Ordering::SeqCst);
        }
        self.changed.notify_all();
        let thread = self
            .uploader
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(thread) = thread {
            let _ = thread.join();
        }
    }

    fn run_uploader(&self, transport: &dyn Transport) {
        let mut engine = self.lock();
        while !self.stopping.load(Ordering::SeqCst) {
            let wait = match engine.next_upload(Timestamp::now()) {
                Ok(UploadTask::Send(request)) => {
                    drop(engine);
                    let result = transport.send(&request);
                    engine = self.lock();
                    // On a store failure the batch simply stays queued and is sent again.
                    let _ = engine.on_upload_result(request.batch_id, result, Timestamp::now());
                    self.changed.notify_all();
                    continue;
                }
                Ok(UploadTask::Wait(wait)) => Some(wait),
                Ok(UploadTask::Idle) => None,
                Err(_) => Some(Duration::from_secs(1)),
            };
            self.changed.notify_all();
            engine = match wait {
                Some(wait) => {
                    self.changed
                        .wait_timeout(engine, wait)
                        .unwrap_or_else(PoisonError::into_inner)
                        .0
                }
                None => self
                    .changed
                    .wait(engine)
                    .unwrap_or_else(PoisonError::into_inner),
            };
        }
    }
}

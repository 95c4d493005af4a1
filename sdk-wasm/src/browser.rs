//! The `Analytics` class the npm package exports: sdk-core's engine driven by the
//! browser. The page does the I/O: `fetch` for uploads (through web-sys), timers for
//! waits, `localStorage` for the queue, `sendBeacon` when the page goes away, and Web
//! Locks so that tabs of one site never send the same event twice.

use std::cell::RefCell;
use std::rc::Rc;
use std::time::Duration;

use jiff::Timestamp;
use js_sys::{Function, Promise, Reflect};
use kith_sdk_core::engine::{
    CaptureError, CaptureOptions, Config, Engine, UploadRequest, UploadResult, UploadTask,
};
use kith_sdk_core::json::{self, object};
use kith_sdk_core::protocol::Map;
use serde_json::Value;
use wasm_bindgen::JsCast;
use wasm_bindgen::prelude::*;
use wasm_bindgen_futures::JsFuture;
use web_sys::{Headers, RequestInit, Response, VisibilityState, Window};

use crate::local_storage::LocalStorageStore;

/// `sendBeacon` and `fetch(keepalive)` bodies must stay under 64 KiB.
const BEACON_BODY_BYTES: usize = 60 * 1024;
/// Browser defaults: small batches sent soon, and a queue that cannot fill the site's
/// storage (browsers give a site about 5 MB of `localStorage`).
const DEFAULT_FLUSH_INTERVAL_MS: u64 = 2_000;
const DEFAULT_QUEUE_BYTES: usize = 1024 * 1024;

#[wasm_bindgen(typescript_custom_section)]
const TYPES: &str = r#"
/** A JSON value, as `JSON.stringify` accepts it. */
export type JsonValue = string | number | boolean | null | JsonValue[] | { [key: string]: JsonValue };
/** A JSON object: properties, traits, context. */
export type JsonObject = { [key: string]: JsonValue };

/** How the SDK is set up. */
export interface AnalyticsOptions {
  /** The source's write key. */
  writeKey: string;
  /** The collector's base URL, such as `https://collector.example.com`. */
  endpoint: string;
  /** Events per batch (default 20). */
  flushAt?: number;
  /** Longest wait before a partial batch is sent, in ms (default 2000). */
  flushIntervalMs?: number;
  /** Bytes of events the queue may keep in localStorage (default 1 MiB). */
  maxQueueBytes?: number;
  /** Send a `page` call for the current page on start (default false). */
  autoPage?: boolean;
  /** Prefix of the localStorage keys (default `kith`). */
  storagePrefix?: string;
}

/** Per-call options. */
export interface CaptureOptions {
  /** The consent purpose the event needs: held until granted, dropped when revoked. */
  purpose?: string;
  /** Context for this event, over the automatic page context. */
  context?: JsonObject;
}

/** Event accounting: `captured = delivered + dropped + pending`. */
export interface Stats {
  captured: number;
  delivered: number;
  pending: number;
  dropped: Record<string, number>;
  held: number;
  failures: number;
  paused: boolean;
  corrupt_records: number;
}

/** What `PushSubscription.toJSON()` gives. */
export interface PushSubscriptionJson {
  endpoint: string;
  expirationTime?: number | null;
  keys: { p256dh: string; auth: string };
}
"#;

#[wasm_bindgen]
extern "C" {
    /// `AnalyticsOptions` in TypeScript.
    #[wasm_bindgen(typescript_type = "AnalyticsOptions")]
    pub type AnalyticsOptions;
    /// `JsonObject` in TypeScript.
    #[wasm_bindgen(typescript_type = "JsonObject")]
    pub type JsonObject;
    /// `CaptureOptions` in TypeScript.
    #[wasm_bindgen(typescript_type = "CaptureOptions")]
    pub type CaptureOptionsJs;
    /// `Stats` in TypeScript.
    #[wasm_bindgen(typescript_type = "Stats")]
    pub type StatsJs;
    /// `PushSubscriptionJson` in TypeScript.
    #[wasm_bindgen(typescript_type = "PushSubscriptionJson")]
    pub type PushSubscriptionJs;
}

/// Options and per-call options are read from JSON by hand, not by derived
/// deserializers: in the browser every typed deserializer costs download size.
struct CallOptions {
    purpose: Option<String>,
    context: Option<Map>,
}

impl CallOptions {
    fn from_value(value: &Value) -> Self {
        CallOptions {
            purpose: value["purpose"].as_str().map(str::to_owned),
            context: value["context"].as_object().cloned(),
        }
    }

    fn none() -> Self {
        CallOptions {
            purpose: None,
            context: None,
        }
    }
}

/// A JS value as JSON, or a clear error for what `JSON.stringify` refuses (cycles,
/// BigInt).
fn to_json(value: &JsValue, what: &str) -> Result<Value, JsError> {
    json::from_js(value)
        .map_err(|e| JsError::new(&format!("{what} cannot be serialised to JSON: {e}")))
}

fn object_arg(value: Option<JsonObject>, what: &str) -> Result<Map, JsError> {
    match value {
        None => Ok(Map::new()),
        Some(v) if v.is_undefined() || v.is_null() => Ok(Map::new()),
        Some(v) => match to_json(&v, what)? {
            Value::Object(map) => Ok(map),
            other => Err(JsError::new(&format!(
                "{what} must be an object, not {}",
                kind_of(&other)
            ))),
        },
    }
}

/// What a JSON value is, for error messages (its text could be long, or private).
fn kind_of(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn capture_error(error: CaptureError) -> JsError {
    JsError::new(&error.to_string())
}

fn now() -> Timestamp {
    Timestamp::from_millisecond(js_sys::Date::now() as i64).unwrap_or(Timestamp::UNIX_EPOCH)
}

fn window() -> Window {
    web_sys::window().expect_throw("Kith runs in a browser window")
}

/// What stays the same for the life of the page: user agent, locale, time zone, screen.
fn device_context() -> Map {
    let window = window();
    let navigator = window.navigator();
    let resolved = js_sys::Intl::DateTimeFormat::new(&js_sys::Array::new(), &js_sys::Object::new())
        .resolved_options();
    let timezone = Reflect::get(&resolved, &"timeZone".into())
        .ok()
        .and_then(|v| v.as_string());
    let screen = window.screen().ok();
    let screen = object([
        ("width", screen.as_ref().and_then(|s| s.width().ok()).into()),
        (
            "height",
            screen.as_ref().and_then(|s| s.height().ok()).into(),
        ),
        ("density", window.device_pixel_ratio().into()),
    ]);
    let context = object([
        (
            "userAgent",
            navigator.user_agent().unwrap_or_default().into(),
        ),
        ("locale", navigator.language().unwrap_or_default().into()),
        ("timezone", timezone.into()),
        ("screen", screen),
    ]);
    match context {
        Value::Object(map) => map,
        _ => Map::new(),
    }
}

/// The current page: read at each capture, since single-page apps change it.
fn page_context() -> Value {
    let window = window();
    let document = window.document();
    let location = window.location();
    let referrer = document.as_ref().map(web_sys::Document::referrer);
    let title = document.as_ref().map(web_sys::Document::title);
    object([
        ("path", location.pathname().unwrap_or_default().into()),
        ("referrer", referrer.unwrap_or_default().into()),
        ("search", location.search().unwrap_or_default().into()),
        ("title", title.unwrap_or_default().into()),
        ("url", location.href().unwrap_or_default().into()),
    ])
}

struct Inner {
    engine: Engine,
    store_prefix: String,
    tab: String,
    timer: Option<i32>,
    sending: bool,
}

/// Kith's browser SDK.
#[wasm_bindgen]
pub struct Analytics {
    inner: Rc<RefCell<Inner>>,
}

#[wasm_bindgen]
impl Analytics {
    /// Starts the SDK: opens this tab's queue, adopts the queues of tabs that are gone,
    /// and starts sending. Throws on bad options or when `localStorage` is unavailable.
    #[wasm_bindgen(constructor)]
    pub fn new(options: AnalyticsOptions) -> Result<Analytics, JsError> {
        let options = to_json(&options, "options")?;
        let (Some(write_key), Some(endpoint)) =
            (options["writeKey"].as_str(), options["endpoint"].as_str())
        else {
            return Err(JsError::new(
                "options need a writeKey and an endpoint (strings)",
            ));
        };
        let prefix = options["storagePrefix"]
            .as_str()
            .unwrap_or("kith")
            .to_owned();
        let tab = format!(
            "{:x}{:x}",
            js_sys::Date::now() as u64,
            (js_sys::Math::random() * 1e12) as u64
        );
        let store =
            LocalStorageStore::open(&prefix, &tab).map_err(|e| JsError::new(&e.to_string()))?;
        let mut config = Config::new(write_key, endpoint);
        config.context = device_context();
        config.flush_interval = Duration::from_millis(
            options["flushIntervalMs"]
                .as_u64()
                .unwrap_or(DEFAULT_FLUSH_INTERVAL_MS),
        );
        config.max_queue_bytes = options["maxQueueBytes"]
            .as_u64()
            .and_then(|n| usize::try_from(n).ok())
            .unwrap_or(DEFAULT_QUEUE_BYTES);
        if let Some(n) = options["flushAt"]
            .as_u64()
            .and_then(|n| usize::try_from(n).ok())
            .filter(|n| *n > 0)
        {
            config.max_batch_events = n;
        }
        let engine =
            Engine::open(Box::new(store), config).map_err(|e| JsError::new(&e.to_string()))?;
        let analytics = Analytics {
            inner: Rc::new(RefCell::new(Inner {
                engine,
                store_prefix: prefix,
                tab,
                timer: None,
                sending: false,
            })),
        };
        analytics.hold_tab_lock();
        analytics.listen_for_page_exit();
        if options["autoPage"].as_bool() == Some(true) {
            analytics.page(None, None, None)?;
        }
        schedule(&analytics.inner);
        Ok(analytics)
    }

    /// Captures a `track` event; answers its messageId. Throws on a missing event name,
    /// properties that cannot be serialised, or an event over 32 KB; nothing is queued
    /// then.
    pub fn track(
        &self,
        event: &str,
        properties: Option<JsonObject>,
        options: Option<CaptureOptionsJs>,
    ) -> Result<String, JsError> {
        let properties = object_arg(properties, "properties")?;
        let options = call_options(options)?;
        self.capture(
            Box::new(|e, o| e.track(event, properties, o, now())),
            options,
        )
    }

    /// Captures an `identify`: keeps the user id and merges the traits.
    pub fn identify(
        &self,
        #[wasm_bindgen(js_name = userId)] user_id: Option<String>,
        traits: Option<JsonObject>,
        options: Option<CaptureOptionsJs>,
    ) -> Result<String, JsError> {
        let traits = object_arg(traits, "traits")?;
        let options = call_options(options)?;
        self.capture(
            Box::new(|e, o| e.identify(user_id.as_deref(), traits, o, now())),
            options,
        )
    }

    /// Captures a `page` view (the page context is added automatically).
    pub fn page(
        &self,
        name: Option<String>,
        properties: Option<JsonObject>,
        options: Option<CaptureOptionsJs>,
    ) -> Result<String, JsError> {
        let mut properties = object_arg(properties, "properties")?;
        if let Value::Object(page) = page_context() {
            for (key, value) in page {
                properties.entry(key).or_insert(value);
            }
        }
        let options = call_options(options)?;
        self.capture(
            Box::new(|e, o| e.page(name.as_deref(), properties, o, now())),
            options,
        )
    }

    /// Captures a `screen` view.
    pub fn screen(
        &self,
        name: String,
        properties: Option<JsonObject>,
        options: Option<CaptureOptionsJs>,
    ) -> Result<String, JsError> {
        let properties = object_arg(properties, "properties")?;
        let options = call_options(options)?;
        self.capture(
            Box::new(|e, o| e.screen(Some(&name), properties, o, now())),
            options,
        )
    }

    /// Captures a `group` call.
    pub fn group(
        &self,
        #[wasm_bindgen(js_name = groupId)] group_id: String,
        traits: Option<JsonObject>,
        options: Option<CaptureOptionsJs>,
    ) -> Result<String, JsError> {
        let traits = object_arg(traits, "traits")?;
        let options = call_options(options)?;
        self.capture(
            Box::new(|e, o| e.group(&group_id, traits, o, now())),
            options,
        )
    }

    /// Captures an `alias` from the current identity to `userId`.
    pub fn alias(
        &self,
        #[wasm_bindgen(js_name = userId)] user_id: String,
    ) -> Result<String, JsError> {
        self.capture(
            Box::new(|e, o| e.alias(&user_id, o, now())),
            CallOptions::none(),
        )
    }

    /// Forgets the user: new anonymous id, no user id or traits.
    pub fn reset(&self) -> Result<(), JsError> {
        self.inner
            .borrow_mut()
            .engine
            .reset()
            .map_err(|e| JsError::new(&e.to_string()))
    }

    /// Sends what is queued now.
    pub fn flush(&self) {
        self.inner.borrow_mut().engine.flush();
        schedule(&self.inner);
    }

    /// Grants or revokes consent for a purpose.
    #[wasm_bindgen(js_name = setConsent)]
    pub fn set_consent(&self, purpose: &str, granted: bool) -> Result<(), JsError> {
        self.inner
            .borrow_mut()
            .engine
            .set_consent(purpose, granted)
            .map_err(|e| JsError::new(&e.to_string()))?;
        schedule(&self.inner);
        Ok(())
    }

    /// Event accounting.
    pub fn stats(&self) -> StatsJs {
        let stats = self.inner.borrow().engine.stats();
        let mut dropped = Map::new();
        for (reason, n) in stats.dropped.iter() {
            dropped.insert(reason.to_owned(), n.into());
        }
        let stats = object([
            ("captured", stats.captured.into()),
            ("delivered", stats.delivered.into()),
            ("pending", stats.pending.into()),
            ("dropped", Value::Object(dropped)),
            ("held", stats.held.into()),
            ("failures", stats.failures.into()),
            ("paused", stats.paused.into()),
            ("corrupt_records", stats.corrupt_records.into()),
        ]);
        // JSON.parse of what we wrote: always an object.
        js_sys::JSON::parse(&json::to_text(&stats))
            .unwrap_or_default()
            .unchecked_into()
    }

    /// The anonymous id this browser sends.
    #[wasm_bindgen(getter, js_name = anonymousId)]
    pub fn anonymous_id(&self) -> String {
        self.inner.borrow().engine.anonymous_id().to_owned()
    }

    /// Sends a Web Push subscription (`PushSubscription.toJSON()`) to the collector, so
    /// that this profile can be reached by Web Push; every later event carries it as
    /// `context.device.token` (provider `webpush`).
    #[wasm_bindgen(js_name = registerPushSubscription)]
    pub fn register_push_subscription(
        &self,
        subscription: PushSubscriptionJs,
    ) -> Result<String, JsError> {
        let value = to_json(&subscription, "the push subscription")?;
        let valid = value["endpoint"].is_string()
            && value["keys"]["p256dh"].is_string()
            && value["keys"]["auth"].is_string();
        if !valid {
            return Err(JsError::new(
                "a push subscription needs an endpoint and keys.p256dh and keys.auth",
            ));
        }
        let token = json::to_text(&object([
            ("endpoint", value["endpoint"].clone()),
            ("keys", value["keys"].clone()),
        ]));
        self.capture(
            Box::new(|e, _| e.set_push_token("webpush", &token, now())),
            CallOptions::none(),
        )
    }
}

fn call_options(options: Option<CaptureOptionsJs>) -> Result<CallOptions, JsError> {
    match options {
        Some(o) if !o.is_undefined() && !o.is_null() => {
            Ok(CallOptions::from_value(&to_json(&o, "options")?))
        }
        _ => Ok(CallOptions::none()),
    }
}

/// One engine call of a capture method.
type Call<'a> = Box<dyn FnOnce(&mut Engine, CaptureOptions) -> Result<String, CaptureError> + 'a>;

impl Analytics {
    /// Boxed rather than generic, so that the download carries this once, not once per
    /// capture method.
    fn capture(&self, call: Call<'_>, options: CallOptions) -> Result<String, JsError> {
        let mut context = options.context.unwrap_or_default();
        context.entry("page").or_insert_with(page_context);
        let capture = CaptureOptions {
            purpose: options.purpose,
            context: Some(context),
            ..CaptureOptions::default()
        };
        let id = call(&mut self.inner.borrow_mut().engine, capture).map_err(capture_error)?;
        schedule(&self.inner);
        Ok(id)
    }

    /// Holds this tab's Web Lock for the tab's life, then adopts the queues of tabs
    /// that are gone.
    fn hold_tab_lock(&self) {
        let Some(locks) = web_locks() else {
            return;
        };
        let inner = self.inner.clone();
        let name = {
            let inner = inner.borrow();
            lock_name(&inner.store_prefix, &inner.tab)
        };
        let held = Closure::once_into_js(move |_lock: JsValue| -> Promise {
            {
                let inner = inner.borrow();
                if let Ok(store) = LocalStorageStore::open(&inner.store_prefix, &inner.tab) {
                    store.mark_alive();
                }
            }
            adopt_orphans(&inner);
            // Never settles: the lock is held until the page goes away.
            Promise::new(&mut |_, _| {})
        });
        let _ = call_locks(&locks, &name, None, &held);
    }

    fn listen_for_page_exit(&self) {
        let window = window();
        let inner = self.inner.clone();
        let on_pagehide = Closure::<dyn Fn()>::new(move || send_beacons(&inner));
        let _ = window
            .add_event_listener_with_callback("pagehide", on_pagehide.as_ref().unchecked_ref());
        on_pagehide.forget();
        let inner = self.inner.clone();
        let on_visibility = Closure::<dyn Fn()>::new(move || {
            let hidden = window
                .document()
                .is_some_and(|d| d.visibility_state() == VisibilityState::Hidden);
            if hidden {
                inner.borrow_mut().engine.flush();
                schedule(&inner);
            }
        });
        if let Some(document) = self::window().document() {
            let _ = document.add_event_listener_with_callback(
                "visibilitychange",
                on_visibility.as_ref().unchecked_ref(),
            );
        }
        on_visibility.forget();
    }
}

fn lock_name(prefix: &str, tab: &str) -> String {
    format!("{prefix}:tab:{tab}")
}

fn web_locks() -> Option<JsValue> {
    let locks = Reflect::get(&window().navigator(), &"locks".into()).ok()?;
    (!locks.is_undefined()).then_some(locks)
}

/// `navigator.locks.request(name, [options], callback)`.
fn call_locks(
    locks: &JsValue,
    name: &str,
    options: Option<&JsValue>,
    callback: &JsValue,
) -> Result<JsValue, JsValue> {
    let request: Function = Reflect::get(locks, &"request".into())?.dyn_into()?;
    match options {
        Some(options) => request.call3(locks, &name.into(), options, callback),
        None => request.call2(locks, &name.into(), callback),
    }
}

/// Moves the events of every tab that is gone into this tab's queue.
fn adopt_orphans(inner: &Rc<RefCell<Inner>>) {
    let Some(locks) = web_locks() else {
        return;
    };
    let (prefix, others) = {
        let inner = inner.borrow();
        let probe = LocalStorageStore::open(&inner.store_prefix, &inner.tab);
        (
            inner.store_prefix.clone(),
            probe.map(|s| s.other_tabs()).unwrap_or_default(),
        )
    };
    let if_available = js_sys::Object::new();
    let _ = Reflect::set(&if_available, &"ifAvailable".into(), &true.into());
    for tab in others {
        // A tab still starting has not marked its queue yet: leave it alone.
        if !LocalStorageStore::was_alive(&prefix, &tab) {
            continue;
        }
        let inner = inner.clone();
        let queue_prefix = prefix.clone();
        let orphan = tab.clone();
        let adopt = Closure::once_into_js(move |lock: JsValue| {
            // `null`: the tab is alive and holds its lock.
            if lock.is_null() {
                return;
            }
            {
                let mut inner = inner.borrow_mut();
                for event in LocalStorageStore::take_queue(&queue_prefix, &orphan) {
                    if inner.engine.adopt(event).is_err() {
                        return; // storage full: leave the rest for later
                    }
                }
            }
            LocalStorageStore::clear_queue(&queue_prefix, &orphan);
            schedule(&inner);
        });
        let _ = call_locks(
            &locks,
            &lock_name(&prefix, &tab),
            Some(&if_available),
            &adopt,
        );
    }
}

/// Hands what is queued to `sendBeacon` as the page goes away. The events stay queued:
/// if the beacon never arrives, the next page of the site sends them.
fn send_beacons(inner: &Rc<RefCell<Inner>>) {
    let Ok(inner) = inner.try_borrow() else {
        return;
    };
    let url = format!(
        "{}/v1/batch",
        inner.engine.config().endpoint.trim_end_matches('/')
    );
    let navigator = window().navigator();
    for body in inner.engine.beacon_bodies(BEACON_BODY_BYTES, now()) {
        let _ = navigator.send_beacon_with_opt_str(&url, Some(&body));
    }
}

/// Asks the engine what to do next, and does it: a fetch, a timer, or nothing.
fn schedule(inner: &Rc<RefCell<Inner>>) {
    let task = {
        let mut state = inner.borrow_mut();
        if state.sending {
            return;
        }
        if let Some(timer) = state.timer.take() {
            window().clear_timeout_with_handle(timer);
        }
        state.engine.next_upload(now())
    };
    match task {
        Ok(UploadTask::Send(request)) => {
            inner.borrow_mut().sending = true;
            let inner = inner.clone();
            wasm_bindgen_futures::spawn_local(async move {
                let result = fetch(&request).await;
                {
                    let mut state = inner.borrow_mut();
                    state.sending = false;
                    let _ = state
                        .engine
                        .on_upload_result(request.batch_id, result, now());
                }
                schedule(&inner);
            });
        }
        Ok(UploadTask::Wait(wait)) => set_timer(inner, wait),
        Ok(UploadTask::Idle) => {}
        Err(_) => set_timer(inner, Duration::from_secs(1)),
    }
}

fn set_timer(inner: &Rc<RefCell<Inner>>, wait: Duration) {
    let next = inner.clone();
    let callback = Closure::once_into_js(move || {
        next.borrow_mut().timer = None;
        schedule(&next);
    });
    let millis = i32::try_from(wait.as_millis()).unwrap_or(i32::MAX);
    if let Ok(handle) = window()
        .set_timeout_with_callback_and_timeout_and_arguments_0(callback.unchecked_ref(), millis)
    {
        inner.borrow_mut().timer = Some(handle);
    }
}

async fn fetch(request: &UploadRequest) -> UploadResult {
    match try_fetch(request).await {
        Ok(result) => result,
        Err(error) => UploadResult::NetworkError(json::message(&error)),
    }
}

async fn try_fetch(request: &UploadRequest) -> Result<UploadResult, JsValue> {
    let headers = Headers::new()?;
    headers.append("Authorization", &request.authorization)?;
    headers.append("Content-Type", "application/json")?;
    let init = RequestInit::new();
    init.set_method("POST");
    init.set_headers(&headers);
    init.set_body(&JsValue::from_str(&request.body));
    // A small batch survives the page going away mid-request.
    if request.body.len() < BEACON_BODY_BYTES {
        Reflect::set(&init, &"keepalive".into(), &true.into())?;
    }
    let response: Response = JsFuture::from(window().fetch_with_str_and_init(&request.url, &init))
        .await?
        .dyn_into()?;
    let retry_after = response
        .headers()
        .get("retry-after")
        .ok()
        .flatten()
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(Duration::from_secs);
    let body = JsFuture::from(response.text()?).await?.as_string();
    Ok(UploadResult::Response {
        status: response.status(),
        retry_after,
        body: body.as_deref().and_then(json::parse),
    })
}

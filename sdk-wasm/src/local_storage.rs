//! The browser's queue store: sdk-core's queue in `localStorage`, one key per event, so
//! each event is persisted when it is captured and removed when it leaves the queue.
//!
//! Each tab (each page load) owns its own queue, under its own tab id, and holds a Web
//! Lock named after it for as long as it lives. A queue whose lock is free belongs to a
//! page that is gone (closed, reloaded, crashed): another tab of the site takes the lock
//! and adopts its events. Because only the lock holder ever sends a queue's events, two
//! open tabs never send the same event. Identity (anonymous id, user id, traits) and
//! consent are shared by every tab of the site.
//!
//! Keys, under a prefix (`kith` by default):
//! - `{prefix}:q:{tab}:e:{id}`: a queued event (sdk-core's `QueuedEvent` as JSON);
//! - `{prefix}:q:{tab}:alive`: written once the tab holds its lock;
//! - `{prefix}:m:{name}`: shared metadata.
//!
//! A tab's counters are kept in memory only: its queue outlives it only to be adopted,
//! and the adopting tab counts adopted events as its own captures.

use js_sys::{JSON, Reflect};
use kith_sdk_core::json;
use kith_sdk_core::queue::{EventStore, Op, QueueState, QueuedEvent, StoreError};
use web_sys::Storage;

/// The queue of one tab in `localStorage`.
#[derive(Debug)]
pub struct LocalStorageStore {
    prefix: String,
    tab: String,
    state: QueueState,
}

fn storage() -> Result<Storage, StoreError> {
    web_sys::window()
        .and_then(|w| w.local_storage().ok().flatten())
        .ok_or_else(|| StoreError::Refused("localStorage is not available".to_owned()))
}

fn io(what: &str) -> impl FnOnce(wasm_bindgen::JsValue) -> StoreError + '_ {
    move |_| StoreError::Refused(format!("localStorage refused to {what} (full?)"))
}

/// Every key of `localStorage` that starts with `prefix`. (Callers take the rest with
/// `strip_prefix`: slicing a string by index brings panic formatting into the download.)
pub fn keys_with_prefix(prefix: &str) -> Vec<String> {
    let Ok(storage) = storage() else {
        return Vec::new();
    };
    let length = storage.length().unwrap_or(0);
    (0..length)
        .filter_map(|i| storage.key(i).ok().flatten())
        .filter(|key| key.starts_with(prefix))
        .collect()
}

impl LocalStorageStore {
    /// A new, empty queue for `tab`, with the site's shared metadata loaded.
    ///
    /// # Errors
    ///
    /// When `localStorage` is not available (disabled, private mode in old browsers).
    pub fn open(prefix: &str, tab: &str) -> Result<Self, StoreError> {
        let storage = storage()?;
        let mut state = QueueState::default();
        let meta_prefix = format!("{prefix}:m:");
        for key in keys_with_prefix(&meta_prefix) {
            if let Some(name) = key.strip_prefix(&meta_prefix)
                && let Some(value) = storage
                    .get_item(&key)
                    .ok()
                    .flatten()
                    .and_then(|v| json::parse(&v))
            {
                state.apply(Op::Meta {
                    key: name.to_owned(),
                    value,
                });
            }
        }
        Ok(LocalStorageStore {
            prefix: prefix.to_owned(),
            tab: tab.to_owned(),
            state,
        })
    }

    fn queue_prefix(prefix: &str, tab: &str) -> String {
        format!("{prefix}:q:{tab}:")
    }

    fn event_key(&self, id: u64) -> String {
        format!("{}e:{id}", Self::queue_prefix(&self.prefix, &self.tab))
    }

    /// Marks this tab's queue as owned by a live tab (call once its lock is held).
    pub fn mark_alive(&self) {
        if let Ok(storage) = storage() {
            let _ = storage.set_item(
                &format!("{}alive", Self::queue_prefix(&self.prefix, &self.tab)),
                "1",
            );
        }
    }

    /// The other tabs that have left queues, live or not.
    pub fn other_tabs(&self) -> Vec<String> {
        let queues = format!("{}:q:", self.prefix);
        // Few tabs: a linear check rather than a sort (each sort costs download size).
        let mut tabs: Vec<String> = Vec::new();
        for key in keys_with_prefix(&queues) {
            if let Some(tab) = key
                .strip_prefix(&queues)
                .and_then(|rest| rest.split(':').next())
                && tab != self.tab
                && !tabs.iter().any(|t| t == tab)
            {
                tabs.push(tab.to_owned());
            }
        }
        tabs
    }

    /// Whether `tab` ever held its lock (a queue of a page still starting has no mark).
    pub fn was_alive(prefix: &str, tab: &str) -> bool {
        storage()
            .ok()
            .and_then(|s| {
                s.get_item(&format!("{}alive", Self::queue_prefix(prefix, tab)))
                    .ok()
                    .flatten()
            })
            .is_some()
    }

    /// Takes every event of `tab`'s queue out of storage, oldest first. Call only while
    /// holding that tab's lock.
    pub fn take_queue(prefix: &str, tab: &str) -> Vec<QueuedEvent> {
        let Ok(storage) = storage() else {
            return Vec::new();
        };
        let queue = Self::queue_prefix(prefix, tab);
        let mut events = Vec::new();
        for key in keys_with_prefix(&queue) {
            if key
                .strip_prefix(&queue)
                .is_some_and(|k| k.starts_with("e:"))
                && let Some(event) = storage
                    .get_item(&key)
                    .ok()
                    .flatten()
                    .and_then(|v| queued_event(&v))
            {
                // Kept in id order by insertion (no sort code in the download).
                let at = events.partition_point(|e: &QueuedEvent| e.id < event.id);
                events.insert(at, event);
            }
        }
        events
    }

    /// Removes what is left of `tab`'s queue.
    pub fn clear_queue(prefix: &str, tab: &str) {
        if let Ok(storage) = storage() {
            for key in keys_with_prefix(&Self::queue_prefix(prefix, tab)) {
                let _ = storage.remove_item(&key);
            }
        }
    }
}

/// A stored `QueuedEvent`, read by the page's `JSON.parse`; the message's text is
/// what `JSON.stringify` gives back for it.
fn queued_event(text: &str) -> Option<QueuedEvent> {
    let record = JSON::parse(text).ok()?;
    let field = |name: &str| Reflect::get(&record, &name.into()).ok();
    let message = field("json").filter(|m| m.is_object())?;
    Some(QueuedEvent {
        id: field("id")?.as_f64()? as u64,
        captured_at_ms: field("captured_at_ms")?.as_f64()? as i64,
        purpose: field("purpose")?.as_string(),
        json: JSON::stringify(&message).ok()?.as_string()?,
    })
}

impl EventStore for LocalStorageStore {
    fn apply(&mut self, op: Op) -> Result<(), StoreError> {
        let storage = storage()?;
        match &op {
            Op::Append { event } => storage
                .set_item(&self.event_key(event.id), &event.to_json())
                .map_err(io("store an event"))?,
            Op::Remove { ids, .. } => {
                for id in ids {
                    storage
                        .remove_item(&self.event_key(*id))
                        .map_err(io("remove an event"))?;
                }
            }
            Op::Meta { key, value } => {
                let key = format!("{}:m:{key}", self.prefix);
                if value.is_null() {
                    storage.remove_item(&key).map_err(io("remove metadata"))?;
                } else {
                    storage
                        .set_item(&key, &json::to_text(value))
                        .map_err(io("store metadata"))?;
                }
            }
            Op::DropAtCapture { .. } | Op::Snapshot { .. } => {}
        }
        self.state.apply(op);
        Ok(())
    }

    fn state(&self) -> &QueueState {
        &self.state
    }
}

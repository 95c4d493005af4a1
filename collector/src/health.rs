//! The health of the collector's background threads, for `/readyz` and `/metrics`:
//! which are up, how often each was restarted, and how many events the pipeline put
//! in quarantine. [`supervise`] runs a thread's body again when it panics, so that no
//! thread is ever silently gone.

use std::any::Any;
use std::collections::BTreeMap;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

/// The first wait before a panicked thread is started again; it doubles per restart in
/// a row, up to [`MAX_RESTART_BACKOFF`].
const FIRST_RESTART_BACKOFF: Duration = Duration::from_millis(100);
/// The longest wait before a panicked thread is started again.
const MAX_RESTART_BACKOFF: Duration = Duration::from_secs(30);

/// One supervised thread's state.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ThreadHealth {
    /// Running its body now (not between a panic and its restart).
    pub up: bool,
    /// Times it panicked and was started again.
    pub restarts: u64,
    /// What its last panic said.
    pub last_panic: Option<String>,
}

/// Shared by the supervised threads and the probes.
#[derive(Debug, Default)]
pub struct Health {
    threads: Mutex<BTreeMap<&'static str, ThreadHealth>>,
    quarantined: AtomicU64,
    /// Threads made to panic once, at their first run (the test-only fault switch).
    injected: Mutex<Vec<String>>,
}

impl Health {
    fn threads(&self) -> MutexGuard<'_, BTreeMap<&'static str, ThreadHealth>> {
        self.threads.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A copy of every supervised thread's state, by name.
    pub fn snapshot(&self) -> BTreeMap<&'static str, ThreadHealth> {
        self.threads().clone()
    }

    /// The threads that are down now (between a panic and their restart).
    pub fn down(&self) -> Vec<&'static str> {
        self.threads()
            .iter()
            .filter(|(_, t)| !t.up)
            .map(|(name, _)| *name)
            .collect()
    }

    /// Counts an event the pipeline moved to the failed-events store because a stage
    /// failed or panicked on it.
    pub fn record_quarantined(&self) {
        self.quarantined.fetch_add(1, Ordering::Relaxed);
    }

    /// Events quarantined since the collector started.
    pub fn quarantined(&self) -> u64 {
        self.quarantined.load(Ordering::Relaxed)
    }

    /// Makes the thread `name` panic once, at its next run: the test-only fault switch
    /// (`--faults thread_panic:NAME`) that shows a dead thread comes back.
    pub fn inject_panic(&self, name: &str) {
        self.injected
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(name.to_owned());
    }

    fn take_injected(&self, name: &str) -> bool {
        let mut injected = self.injected.lock().unwrap_or_else(PoisonError::into_inner);
        let found = injected.iter().position(|n| n == name);
        found.map(|i| injected.remove(i)).is_some()
    }

    fn set_up(&self, name: &'static str) {
        self.threads().entry(name).or_default().up = true;
    }

    fn set_down(&self, name: &'static str, panic: String) {
        let mut threads = self.threads();
        let thread = threads.entry(name).or_default();
        thread.up = false;
        thread.restarts += 1;
        thread.last_panic = Some(panic);
    }

    /// Forgets a thread that ended normally (at shutdown).
    fn remove(&self, name: &'static str) {
        self.threads().remove(name);
    }
}

/// What a panic carried, as text.
pub fn panic_message(payload: &(dyn Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".to_owned())
}

/// Runs `body` until it returns, on the calling thread, under the name `name` in
/// `health`: when it panics, the thread is marked down, waits (100 ms, doubling to
/// 30 s for panics in a row) and runs `body` again. `body` must therefore pick up
/// where any earlier run left off from durable state, which every collector thread
/// does.
pub fn supervise(name: &'static str, health: &Arc<Health>, mut body: impl FnMut()) {
    let mut backoff = FIRST_RESTART_BACKOFF;
    loop {
        health.set_up(name);
        let run = || {
            if health.take_injected(name) {
                panic!("injected fault in the {name} thread");
            }
            body();
        };
        match catch_unwind(AssertUnwindSafe(run)) {
            Ok(()) => {
                health.remove(name);
                return;
            }
            Err(payload) => {
                let message = panic_message(payload.as_ref());
                tracing::error!(thread = name, panic = %message, "thread panicked; restarting it");
                health.set_down(name, message);
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(MAX_RESTART_BACKOFF);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panicking_body_is_restarted_and_counted() {
        let health = Arc::new(Health::default());
        let mut runs = 0;
        supervise("test", &health, || {
            runs += 1;
            if runs < 3 {
                panic!("run {runs} fails");
            }
            assert_eq!(
                health.snapshot()["test"].restarts,
                2,
                "counted while running"
            );
            assert!(health.down().is_empty(), "up again");
        });
        assert_eq!(runs, 3);
        assert!(
            health.snapshot().is_empty(),
            "a thread that ended is not reported"
        );
    }

    #[test]
    fn a_thread_is_down_between_its_panic_and_its_restart() {
        let health = Health::default();
        health.set_up("pipeline");
        assert!(health.down().is_empty());
        health.set_down("pipeline", "boom".to_owned());
        assert_eq!(health.down(), ["pipeline"], "/readyz answers 503 now");
        assert_eq!(
            health.snapshot()["pipeline"].last_panic.as_deref(),
            Some("boom")
        );
        health.set_up("pipeline");
        assert!(health.down().is_empty());
        assert_eq!(health.snapshot()["pipeline"].restarts, 1);
    }

    #[test]
    fn panic_messages_are_read() {
        let text = catch_unwind(|| panic!("plain")).expect_err("panics");
        assert_eq!(panic_message(text.as_ref()), "plain");
        let formatted = catch_unwind(|| panic!("{} {}", "with", 2)).expect_err("panics");
        assert_eq!(panic_message(formatted.as_ref()), "with 2");
    }
}

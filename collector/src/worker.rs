//! A thread fed by a channel, that can be closed and joined: the shape of the log
//! writer, the importer, the segments thread and the activation thread. Each is
//! [supervised](crate::health::supervise): a panic restarts its body on the same channel.

use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;

use crate::error::StoreError;
use crate::health::{Health, supervise};

/// A named thread taking items of type `T` from a channel until it is closed.
#[derive(Debug)]
pub struct Worker<T> {
    name: &'static str,
    tx: Mutex<Option<Sender<T>>>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl<T: Send + 'static> Worker<T> {
    /// Starts the thread `name` running `run` on the channel's receiving end until the
    /// channel is closed; when `run` panics it is run again (see [`supervise`]), its
    /// state reported in `health`. Items sent before (the `queued` ones) are the first
    /// it receives.
    ///
    /// # Errors
    ///
    /// When the thread cannot be spawned.
    pub fn start(
        name: &'static str,
        health: &Arc<Health>,
        queued: Vec<T>,
        mut run: impl FnMut(&Receiver<T>) + Send + 'static,
    ) -> Result<Self, StoreError> {
        let (tx, rx) = mpsc::channel();
        for item in queued {
            // The receiver is alive: it is right here.
            let _ = tx.send(item);
        }
        let health = health.clone();
        let thread = std::thread::Builder::new()
            .name(format!("kith-{name}"))
            .spawn(move || supervise(name, &health, || run(&rx)))
            .map_err(|e| StoreError::Start(format!("the {name}: {e}")))?;
        Ok(Worker {
            name,
            tx: Mutex::new(Some(tx)),
            thread: Mutex::new(Some(thread)),
        })
    }

    /// Hands `item` to the thread.
    ///
    /// # Errors
    ///
    /// [`StoreError::ShuttingDown`] once closed.
    pub fn send(&self, item: T) -> Result<(), StoreError> {
        self.tx
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref()
            .ok_or(StoreError::ShuttingDown)?
            .send(item)
            .map_err(|_| StoreError::ShuttingDown)
    }

    /// Whether [`Worker::close`] was called.
    pub fn is_closed(&self) -> bool {
        self.tx
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_none()
    }

    /// Closes the channel (the thread finishes what is queued) and waits for the thread.
    pub fn close(&self) {
        drop(
            self.tx
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .take(),
        );
        let thread = self
            .thread
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(thread) = thread
            && thread.join().is_err()
        {
            tracing::error!("the {} thread panicked", self.name);
        }
    }
}

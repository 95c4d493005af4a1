//! A thread fed by a channel, that can be closed and joined: the shape of the log writer
//! and the importer.

use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Mutex, PoisonError};
use std::thread::JoinHandle;

use crate::error::StoreError;

/// A named thread taking items of type `T` from a channel until it is closed.
#[derive(Debug)]
pub struct Worker<T> {
    name: &'static str,
    tx: Mutex<Option<Sender<T>>>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl<T: Send + 'static> Worker<T> {
    /// Starts the thread `name` running `run` on the channel's receiving end. Items sent
    /// before (the `queued` ones) are the first it receives.
    ///
    /// # Errors
    ///
    /// When the thread cannot be spawned.
    pub fn start(
        name: &'static str,
        queued: Vec<T>,
        run: impl FnOnce(Receiver<T>) + Send + 'static,
    ) -> Result<Self, StoreError> {
        let (tx, rx) = mpsc::channel();
        for item in queued {
            // The receiver is alive: it is right here.
            let _ = tx.send(item);
        }
        let thread = std::thread::Builder::new()
            .name(format!("kith-{name}"))
            .spawn(move || run(rx))
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

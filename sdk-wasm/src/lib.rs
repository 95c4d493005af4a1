//! Kith's browser SDK: the [`kith_sdk_core`] engine exported through wasm-bindgen as the
//! npm package built by `sdk-wasm/build.sh` into `sdk-wasm/pkg`.
//!
//! - `browser`: the exported `Analytics` class; the page does the I/O (fetch, timers,
//!   `sendBeacon`, Web Locks) and drives the engine.
//! - `local_storage`: the queue in `localStorage`, one queue per tab, adopted by another
//!   tab when its page is gone.
//!
//! On other targets the crate is empty, so the workspace builds everywhere.

// The one place where the browser build differs from the native one.
#[cfg(target_arch = "wasm32")]
mod browser;
#[cfg(target_arch = "wasm32")]
mod local_storage;

#[cfg(target_arch = "wasm32")]
pub use browser::Analytics;

/// A small allocator: dlmalloc was 7 KB of the download; the SDK makes few allocations
/// that live long (queued events), so a free list serves it.
#[cfg(target_arch = "wasm32")]
#[global_allocator]
static ALLOCATOR: lol_alloc::LockedAllocator<lol_alloc::FreeListAllocator> =
    lol_alloc::LockedAllocator::new(lol_alloc::FreeListAllocator::new());

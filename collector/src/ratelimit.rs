//! Per-source rate limiting: a token bucket of events per second for each write key.
//!
//! A request may take the bucket into debt (so a batch larger than one second's worth
//! still goes through once), and the next request then waits until the debt is paid:
//! the `Retry-After` it is told.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};
use std::time::Instant;

/// Token buckets, one per source.
#[derive(Debug)]
pub struct RateLimiter {
    events_per_sec: f64,
    buckets: Mutex<HashMap<String, Bucket>>,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    updated: Instant,
}

impl RateLimiter {
    /// A limiter allowing `events_per_sec` per source, with one second of burst.
    pub fn new(events_per_sec: u32) -> Self {
        RateLimiter {
            events_per_sec: f64::from(events_per_sec.max(1)),
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Takes `events` tokens from `source`'s bucket at `now`.
    ///
    /// # Errors
    ///
    /// The whole seconds to wait, when the bucket is empty or in debt.
    pub fn check(&self, source: &str, events: usize, now: Instant) -> Result<(), u64> {
        let mut buckets = self.buckets.lock().unwrap_or_else(PoisonError::into_inner);
        let bucket = buckets.entry(source.to_owned()).or_insert(Bucket {
            tokens: self.events_per_sec,
            updated: now,
        });
        let elapsed = now.saturating_duration_since(bucket.updated).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * self.events_per_sec).min(self.events_per_sec);
        bucket.updated = now;
        if bucket.tokens <= 0.0 {
            let wait = (-bucket.tokens / self.events_per_sec).ceil().max(1.0);
            // `wait` is a small positive whole number of seconds.
            #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
            return Err(wait as u64);
        }
        bucket.tokens -= events as f64;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn debt_is_paid_before_the_next_request() {
        let limiter = RateLimiter::new(10);
        let t0 = Instant::now();
        assert_eq!(
            limiter.check("a", 25, t0),
            Ok(()),
            "one burst may go into debt"
        );
        assert_eq!(
            limiter.check("a", 1, t0),
            Err(2),
            "15 events of debt at 10/s"
        );
        assert_eq!(limiter.check("b", 1, t0), Ok(()), "buckets are per source");
        let later = t0 + Duration::from_millis(1600);
        assert_eq!(limiter.check("a", 1, later), Ok(()));
    }
}

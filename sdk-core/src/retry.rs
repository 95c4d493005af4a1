//! Retry timing: exponential backoff with jitter. The randomness comes from a v4 UUID
//! (the OS's, or the browser's `crypto.getRandomValues`), so the browser build carries
//! no random-number generator of its own.

use std::time::Duration;

/// How the engine retries failed uploads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// The backoff ceiling after the first failure; also the shortest wait between two
    /// attempts, so a client never sends faster than this during an outage.
    pub initial: Duration,
    /// The largest backoff ceiling.
    pub max: Duration,
    /// How long uploads pause after the collector refuses the write key (401, 403, 404).
    pub pause: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            initial: Duration::from_secs(1),
            max: Duration::from_secs(5 * 60),
            pause: Duration::from_secs(15 * 60),
        }
    }
}

impl RetryPolicy {
    /// The ceiling after `failures` consecutive failures: `initial * 2^(failures-1)`,
    /// at most `max`.
    pub fn ceiling(&self, failures: u32) -> Duration {
        let doublings = failures.saturating_sub(1).min(32);
        self.initial
            .saturating_mul(1u32 << doublings.min(31))
            .min(self.max)
    }

    /// The wait before the next attempt after `failures` consecutive failures: uniform
    /// in `[initial, ceiling]` (jitter over the whole range, never below `initial`).
    pub fn delay(&self, failures: u32) -> Duration {
        let ceiling = self.ceiling(failures);
        let floor = self.initial.min(ceiling);
        let span = u64::try_from((ceiling - floor).as_millis()).unwrap_or(u64::MAX);
        // The low 64 bits of a v4 UUID: 62 random bits.
        let noise = uuid::Uuid::new_v4().as_u128() as u64;
        floor + Duration::from_millis(noise % span.saturating_add(1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ceilings_double_up_to_the_max() {
        let policy = RetryPolicy {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(1),
            pause: Duration::from_secs(60),
        };
        let ceilings: Vec<_> = (1..=6).map(|f| policy.ceiling(f).as_millis()).collect();
        assert_eq!(ceilings, [100, 200, 400, 800, 1000, 1000]);
        assert_eq!(policy.ceiling(u32::MAX), Duration::from_secs(1));
    }

    #[test]
    fn delays_are_jittered_within_bounds() {
        let policy = RetryPolicy {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(10),
            pause: Duration::from_secs(60),
        };
        let delays: Vec<Duration> = (0..200).map(|_| policy.delay(8)).collect();
        assert!(
            delays
                .iter()
                .all(|d| *d >= policy.initial && *d <= policy.ceiling(8))
        );
        let distinct: std::collections::BTreeSet<_> = delays.iter().collect();
        assert!(distinct.len() > 50, "jittered, not fixed");
        let mean = delays.iter().sum::<Duration>() / 200;
        let ceiling = policy.ceiling(8);
        assert!(
            mean > ceiling / 4 && mean < ceiling * 3 / 4,
            "about half the ceiling: {mean:?}"
        );
    }
}

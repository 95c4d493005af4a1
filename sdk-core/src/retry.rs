//! Retry timing: full-jitter exponential backoff, computed by the `backoff` crate. This
//! module is the only one that knows that crate (it is marked unmaintained upstream), so
//! it can be swapped without touching the engine.

use std::time::Duration;

use backoff::backoff::Backoff;

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
    /// in `[0, ceiling]` (full jitter), but never below `initial`.
    pub fn delay(&self, failures: u32) -> Duration {
        let ceiling = self.ceiling(failures);
        // The crate's randomization spreads `interval ± factor × interval`; an interval
        // of half the ceiling with factor 1 spreads over [0, ceiling]: full jitter.
        let half = ceiling / 2;
        let mut backoff = backoff::ExponentialBackoff {
            current_interval: half,
            initial_interval: half,
            randomization_factor: 1.0,
            multiplier: 1.0,
            max_interval: half,
            max_elapsed_time: None,
            ..backoff::ExponentialBackoff::default()
        };
        backoff
            .next_backoff()
            .unwrap_or(ceiling)
            .clamp(self.initial.min(ceiling), ceiling)
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

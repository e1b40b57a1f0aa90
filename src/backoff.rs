//! The one retry pause policy: exponential, capped, jittered (backon's), so that hosts
//! retrying the same failure do not do it in lockstep and nothing busy-loops.

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};

/// Pauses between attempts: `min`, then doubling up to `max`, each with up to as much
/// again added at random; forever, until [`Backoff::reset`].
#[derive(Debug)]
pub struct Backoff {
    builder: ExponentialBuilder,
    pauses: ExponentialBackoff,
    max: Duration,
}

impl Backoff {
    pub fn new(min: Duration, max: Duration) -> Self {
        let builder = ExponentialBuilder::default()
            .with_min_delay(min)
            .with_max_delay(max)
            .with_jitter()
            .without_max_times();
        Backoff {
            builder,
            pauses: builder.build(),
            max,
        }
    }

    /// The next pause (and the one after it grows).
    pub fn next_pause(&mut self) -> Duration {
        // Without a limit on attempts the iterator never ends; the cap is only a fallback.
        self.pauses.next().unwrap_or(self.max)
    }

    /// Back to the shortest pause (after a success).
    pub fn reset(&mut self) {
        self.pauses = self.builder.build();
    }

    pub async fn wait(&mut self) {
        tokio::time::sleep(self.next_pause()).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pauses_grow_to_the_cap_with_jitter_and_reset() {
        let (min, max) = (Duration::from_millis(10), Duration::from_millis(80));
        let mut b = Backoff::new(min, max);
        let pauses: Vec<Duration> = (0..10).map(|_| b.next_pause()).collect();
        assert!(pauses[0] >= min && pauses[0] <= min * 2, "{pauses:?}");
        // Jitter adds at most as much again as the capped pause.
        assert!(pauses.iter().all(|p| *p <= max * 2), "{pauses:?}");
        assert!(pauses[9] >= max, "{pauses:?}");
        b.reset();
        assert!(b.next_pause() <= min * 2);
    }
}

//! Bounded work per asker: a token bucket per local endpoint.
//!
//! Keyed by endpoint (a query from an address that is no local endpoint is dropped before it
//! gets here), so the table is as large as this host's containers, never as large as the
//! addresses a flood can forge.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

use crate::model::EndpointId;
use crate::sync::lock;

/// Queries per second one endpoint may ask, sustained: far above what a program resolving
/// names asks (glibc asks A and AAAA per lookup), far below what one daemon answers, so that
/// a handful of flooding containers cannot take the server from the others.
pub const PER_SOURCE_RATE: f64 = 2_000.0;
/// How many it may ask at once after a quiet spell.
pub const PER_SOURCE_BURST: f64 = 2_000.0;
/// Buckets kept before idle ones are dropped.
const MAX_BUCKETS: usize = 4096;

struct Bucket {
    tokens: f64,
    at: Instant,
}

pub struct Limiter {
    rate: f64,
    burst: f64,
    buckets: Mutex<HashMap<EndpointId, Bucket>>,
}

impl Limiter {
    pub fn new(rate: f64, burst: f64) -> Self {
        Limiter {
            rate,
            burst,
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Whether `who` may ask one more query now.
    pub fn allow(&self, who: &EndpointId) -> bool {
        self.allow_at(who, Instant::now())
    }

    fn allow_at(&self, who: &EndpointId, now: Instant) -> bool {
        let mut buckets = lock(&self.buckets);
        if buckets.len() >= MAX_BUCKETS && !buckets.contains_key(who) {
            // Full buckets are those nobody has used for a while: forgetting them costs nothing.
            let burst = self.burst;
            let rate = self.rate;
            buckets.retain(|_, b| {
                b.tokens + now.saturating_duration_since(b.at).as_secs_f64() * rate < burst
            });
        }
        let b = buckets.entry(who.clone()).or_insert(Bucket {
            tokens: self.burst,
            at: now,
        });
        let refill = now.saturating_duration_since(b.at).as_secs_f64() * self.rate;
        b.tokens = (b.tokens + refill).min(self.burst);
        b.at = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Id;
    use std::time::Duration;

    #[test]
    fn one_flooding_endpoint_is_held_to_its_rate_and_others_are_not() {
        let limiter = Limiter::new(100.0, 10.0);
        let (flood, quiet) = (Id::random(), Id::random());
        let t0 = Instant::now();
        let allowed = (0..1000).filter(|_| limiter.allow_at(&flood, t0)).count();
        assert_eq!(allowed, 10, "the burst, then nothing");
        assert!(
            limiter.allow_at(&quiet, t0),
            "another endpoint is unaffected"
        );
        let later = t0 + Duration::from_millis(100);
        let refilled = (0..1000)
            .filter(|_| limiter.allow_at(&flood, later))
            .count();
        assert_eq!(refilled, 10, "100/s for 0.1 s, capped at the burst");
    }
}

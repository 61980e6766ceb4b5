//! Per-key retry with exponential backoff for the controllers' loops, as client-go's
//! workqueue rate limiter (`ItemExponentialFailureRateLimiter`: `base * 2^failures`, capped)
//! and the controllers' `maxRetries` (a key failing that often is dropped until an event
//! queues it again). A refused write is retried later, never on every tick: a Service whose
//! slices the API refused was rewritten ~50 times a second, forever.
//!
//! Pure: the caller passes the time, so tests need no clock.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// The backoff of one controller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    pub base: Duration,
    pub max: Duration,
    /// Failures after which a key is dropped (`None`: retried forever, at `max`).
    pub max_retries: Option<u32>,
}

impl Backoff {
    /// `workqueue.DefaultTypedControllerRateLimiter`'s per-item part (5 ms doubling to
    /// 1000 s), which the ReplicaSet and Deployment controllers use.
    pub const CONTROLLER: Backoff = Backoff {
        base: Duration::from_millis(5),
        max: Duration::from_secs(1000),
        max_retries: None,
    };

    /// The EndpointSlice controller's (`pkg/controller/endpointslice`: `defaultSyncBackOff`
    /// 1 s, `maxSyncBackOff` 1000 s, `maxRetries` 15).
    pub const ENDPOINTSLICE: Backoff = Backoff {
        base: Duration::from_secs(1),
        max: Duration::from_secs(1000),
        max_retries: Some(15),
    };

    /// The delay before retry number `failures` (1 for the first failure).
    pub fn delay(&self, failures: u32) -> Duration {
        let exponent = failures.saturating_sub(1).min(31);
        self.base
            .checked_mul(1u32 << exponent)
            .map_or(self.max, |d| d.min(self.max))
    }
}

/// Keys waiting for a retry, and how often each failed since its last success.
#[derive(Debug)]
pub struct RetryQueue<K: Ord + Clone> {
    backoff: Backoff,
    failures: BTreeMap<K, u32>,
    waiting: BTreeMap<K, Instant>,
}

/// What `failed` decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retry {
    /// Retried after this long; the count of failures so far.
    After(Duration, u32),
    /// Failed `max_retries` times: dropped until something queues it again.
    Dropped(u32),
}

impl<K: Ord + Clone> RetryQueue<K> {
    pub fn new(backoff: Backoff) -> Self {
        Self {
            backoff,
            failures: BTreeMap::new(),
            waiting: BTreeMap::new(),
        }
    }

    /// A sync of `key` failed at `now`: schedules its retry (`AddRateLimited`) or drops it.
    pub fn failed(&mut self, key: K, now: Instant) -> Retry {
        let count = self.failures.entry(key.clone()).or_insert(0);
        *count = count.saturating_add(1);
        let count = *count;
        if self.backoff.max_retries.is_some_and(|max| count > max) {
            self.forget(&key);
            return Retry::Dropped(count);
        }
        let delay = self.backoff.delay(count);
        self.waiting.insert(key, now + delay);
        Retry::After(delay, count)
    }

    /// A sync of `key` succeeded (or the key is gone): its failures are forgotten (`Forget`).
    pub fn forget(&mut self, key: &K) {
        self.failures.remove(key);
        self.waiting.remove(key);
    }

    /// The keys whose retry is due at `now`, taken off the waiting list (their failure
    /// counts stay until `forget`).
    pub fn due(&mut self, now: Instant) -> Vec<K> {
        let due: Vec<K> = self
            .waiting
            .iter()
            .filter(|(_, at)| **at <= now)
            .map(|(k, _)| k.clone())
            .collect();
        for key in &due {
            self.waiting.remove(key);
        }
        due
    }

    /// Whether `key` is waiting for a retry.
    pub fn is_waiting(&self, key: &K) -> bool {
        self.waiting.contains_key(key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_double_from_the_base_up_to_the_cap() {
        let b = Backoff::CONTROLLER;
        assert_eq!(b.delay(1), Duration::from_millis(5));
        assert_eq!(b.delay(2), Duration::from_millis(10));
        assert_eq!(b.delay(11), Duration::from_millis(5 * 1024));
        assert_eq!(b.delay(30), Duration::from_secs(1000));
        assert_eq!(b.delay(u32::MAX), Duration::from_secs(1000));
        let s = Backoff::ENDPOINTSLICE;
        let delays: Vec<u64> = (1..=11).map(|n| s.delay(n).as_secs()).collect();
        // The sequence kube's endpointslice controller documents beside maxRetries.
        assert_eq!(delays, [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1000]);
    }

    #[test]
    fn a_failing_key_waits_longer_each_time_and_is_dropped_after_max_retries() {
        let mut q = RetryQueue::new(Backoff::ENDPOINTSLICE);
        let t0 = Instant::now();
        assert_eq!(q.failed("svc", t0), Retry::After(Duration::from_secs(1), 1));
        assert!(q.due(t0).is_empty(), "not before its delay");
        assert!(q.due(t0 + Duration::from_millis(999)).is_empty());
        assert_eq!(q.due(t0 + Duration::from_secs(1)), ["svc"]);
        assert!(!q.is_waiting(&"svc"), "taken off the list once due");
        assert_eq!(q.failed("svc", t0), Retry::After(Duration::from_secs(2), 2));
        for n in 3..=15 {
            assert!(matches!(q.failed("svc", t0), Retry::After(_, c) if c == n));
        }
        assert_eq!(q.failed("svc", t0), Retry::Dropped(16));
        assert!(q.due(t0 + Duration::from_secs(100_000)).is_empty());
        // Dropped means forgotten: the next failure (after an event) starts over.
        assert_eq!(q.failed("svc", t0), Retry::After(Duration::from_secs(1), 1));
    }

    #[test]
    fn success_forgets_the_failures() {
        let mut q = RetryQueue::new(Backoff::CONTROLLER);
        let t0 = Instant::now();
        q.failed("a", t0);
        q.failed("a", t0);
        q.failed("b", t0);
        q.forget(&"a");
        assert_eq!(q.due(t0 + Duration::from_secs(1)), ["b"]);
        assert_eq!(q.failed("a", t0), Retry::After(Duration::from_millis(5), 1));
    }
}

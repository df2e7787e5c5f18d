//! Per-identity issuance rate limit: a token bucket per SPIFFE ID (a burst
//! of [`RateConfig::burst`], then one certificate per
//! [`RateConfig::refill`]). A proxy renews at 70 % of a 24 h lifetime, so
//! the default (10, then 1 per 10 s) only bites on a crash loop, a
//! misbehaving client or a stolen token.
//!
//! The limit is applied after the token is verified and matched to the
//! identity, so an unauthenticated caller cannot drain another workload's
//! bucket. The clock is passed in, so the bucket is tested without sleeps.
//! Buckets that have refilled are dropped on the next sweep, so memory is
//! bounded by the identities active within `burst × refill`.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// `--certify-burst`, `--certify-refill`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RateConfig {
    /// Certificates an identity may get back to back.
    pub burst: u32,
    /// One more certificate per this interval, up to `burst`.
    pub refill: Duration,
}

impl Default for RateConfig {
    fn default() -> Self {
        RateConfig {
            burst: 10,
            refill: Duration::from_secs(10),
        }
    }
}

#[derive(Clone, Copy, Debug)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// The token buckets of every identity.
#[derive(Debug)]
pub struct RateLimiter {
    config: RateConfig,
    buckets: Mutex<HashMap<String, Bucket>>,
    last_sweep: Mutex<Option<Instant>>,
}

impl RateLimiter {
    pub fn new(config: RateConfig) -> Self {
        RateLimiter {
            config,
            buckets: Mutex::new(HashMap::new()),
            last_sweep: Mutex::new(None),
        }
    }

    fn refilled(&self, b: Bucket, now: Instant) -> f64 {
        let per_sec = if self.config.refill.is_zero() {
            f64::INFINITY
        } else {
            1.0 / self.config.refill.as_secs_f64()
        };
        let elapsed = now.saturating_duration_since(b.at).as_secs_f64();
        (b.tokens + elapsed * per_sec).min(f64::from(self.config.burst))
    }

    /// Takes one token for `key` at `now`; `Err(wait)` says how long until
    /// the next one.
    pub fn try_acquire(&self, key: &str, now: Instant) -> Result<(), Duration> {
        self.sweep(now);
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        let burst = f64::from(self.config.burst);
        let b = buckets.entry(key.to_string()).or_insert(Bucket {
            tokens: burst,
            at: now,
        });
        let tokens = self.refilled(*b, now);
        if tokens >= 1.0 {
            *b = Bucket {
                tokens: tokens - 1.0,
                at: now,
            };
            Ok(())
        } else {
            *b = Bucket { tokens, at: now };
            Err(self.config.refill.mul_f64(1.0 - tokens))
        }
    }

    /// Drops full buckets at most once per refill interval.
    fn sweep(&self, now: Instant) {
        let mut last = self.last_sweep.lock().unwrap_or_else(|e| e.into_inner());
        if last.is_some_and(|t| now.saturating_duration_since(t) < self.config.refill) {
            return;
        }
        *last = Some(now);
        drop(last);
        let burst = f64::from(self.config.burst);
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        buckets.retain(|_, b| {
            let b = *b;
            self.refilled(b, now) < burst
        });
    }

    /// Identities with a bucket (for tests).
    pub fn tracked(&self) -> usize {
        self.buckets.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_then_refill_per_identity() {
        let limiter = RateLimiter::new(RateConfig {
            burst: 3,
            refill: Duration::from_secs(10),
        });
        let t0 = Instant::now();
        for _ in 0..3 {
            assert_eq!(limiter.try_acquire("a", t0), Ok(()));
        }
        let wait = limiter.try_acquire("a", t0).expect_err("burst spent");
        assert_eq!(wait, Duration::from_secs(10));
        // Another identity has its own bucket.
        assert_eq!(limiter.try_acquire("b", t0), Ok(()));
        // Half a refill later: still refused, 5 s to go.
        let wait = limiter
            .try_acquire("a", t0 + Duration::from_secs(5))
            .expect_err("half");
        assert!((wait.as_secs_f64() - 5.0).abs() < 0.01, "{wait:?}");
        assert_eq!(
            limiter.try_acquire("a", t0 + Duration::from_secs(10)),
            Ok(())
        );
        assert!(limiter
            .try_acquire("a", t0 + Duration::from_secs(10))
            .is_err());
        // Long idle: back to a full burst, never more.
        let later = t0 + Duration::from_secs(3600);
        for _ in 0..3 {
            assert_eq!(limiter.try_acquire("a", later), Ok(()));
        }
        assert!(limiter.try_acquire("a", later).is_err());
    }

    #[test]
    fn full_buckets_are_forgotten() {
        let limiter = RateLimiter::new(RateConfig {
            burst: 2,
            refill: Duration::from_secs(1),
        });
        let t0 = Instant::now();
        for i in 0..100 {
            let _ = limiter.try_acquire(&format!("id-{i}"), t0);
        }
        assert_eq!(limiter.tracked(), 100);
        let _ = limiter.try_acquire("x", t0 + Duration::from_secs(5));
        assert_eq!(limiter.tracked(), 1);
    }
}

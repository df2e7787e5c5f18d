//! The per-endpoint circuit breaker: consecutive failures eject an endpoint; it comes back
//! for one probe after an ejection time that doubles with each consecutive ejection (with
//! jitter), and a success closes it again.
//!
//! Pure: the clock and the random jitter are passed in, so every transition is tested without
//! sleeping. The balancer holds one [`Breaker`] per endpoint and skips ejected endpoints,
//! unless every endpoint is ejected: then it still tries one rather than failing everything
//! (Envoy's panic threshold does the same).
//!
//! What counts as a failure is the caller's decision (`http` counts 5xx answers, connection
//! errors and timeouts); a success is any other answer.

use std::time::{Duration, Instant};

/// BackendPolicy `circuitBreaker` (DESIGN.md defaults).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BreakerConfig {
    /// Consecutive failures that eject an endpoint; 0 disables ejection.
    pub consecutive_failures: u32,
    pub base_ejection: Duration,
    pub max_ejection: Duration,
    /// Random extra ejection time as a fraction of it, in [0, 1].
    pub jitter: f64,
    /// Requests in flight per endpoint beyond which requests fail fast; `None`: no limit.
    pub max_concurrent_requests: Option<u32>,
    /// Requests waiting for an endpoint beyond which requests fail fast; `None`: no limit.
    pub max_pending_requests: Option<u32>,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        Self {
            consecutive_failures: 7,
            base_ejection: Duration::from_secs(1),
            max_ejection: Duration::from_secs(60),
            jitter: 0.1,
            max_concurrent_requests: None,
            max_pending_requests: None,
        }
    }
}

/// What a recorded outcome did to the endpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transition {
    None,
    /// The endpoint is ejected until the given instant.
    Ejected(Instant),
    /// An ejected (or probing) endpoint answered well and is back.
    Restored,
}

/// One endpoint's breaker.
#[derive(Clone, Debug, Default)]
pub struct Breaker {
    failures: u32,
    /// Ejections in a row without a success in between (the backoff exponent).
    ejections: u32,
    ejected_until: Option<Instant>,
}

impl Breaker {
    /// Whether the endpoint is ejected at `now` (after its ejection time it is not: the next
    /// request is its probe).
    pub fn is_ejected(&self, now: Instant) -> bool {
        self.ejected_until.is_some_and(|t| now < t)
    }

    /// Whether the endpoint is back from an ejection and not yet proven healthy.
    pub fn is_probing(&self, now: Instant) -> bool {
        self.ejected_until.is_some_and(|t| now >= t)
    }

    /// Records an answer that was not a failure.
    pub fn success(&mut self) -> Transition {
        self.failures = 0;
        self.ejections = 0;
        if self.ejected_until.take().is_some() {
            Transition::Restored
        } else {
            Transition::None
        }
    }

    /// Records a failure at `now`; `rand01` is a uniform draw in [0, 1) for the jitter.
    pub fn failure(&mut self, cfg: &BreakerConfig, now: Instant, rand01: f64) -> Transition {
        if cfg.consecutive_failures == 0 {
            return Transition::None;
        }
        self.failures = self.failures.saturating_add(1);
        // A probe that fails ejects again at once, for longer.
        let probing = self.is_probing(now);
        if !probing && self.failures < cfg.consecutive_failures {
            return Transition::None;
        }
        if self.is_ejected(now) {
            // Requests already in flight when it was ejected: no new ejection.
            return Transition::None;
        }
        let factor = 2f64.powi(self.ejections.min(30) as i32);
        let base = cfg.base_ejection.as_secs_f64() * factor;
        let base = base.min(cfg.max_ejection.as_secs_f64());
        let jittered = base * (1.0 + cfg.jitter.clamp(0.0, 1.0) * rand01.clamp(0.0, 1.0));
        let until = now + Duration::from_secs_f64(jittered);
        self.ejections = self.ejections.saturating_add(1);
        self.failures = 0;
        self.ejected_until = Some(until);
        Transition::Ejected(until)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> BreakerConfig {
        BreakerConfig {
            consecutive_failures: 3,
            base_ejection: Duration::from_secs(1),
            max_ejection: Duration::from_secs(8),
            jitter: 0.0,
            ..BreakerConfig::default()
        }
    }

    #[test]
    fn consecutive_failures_eject_and_a_success_resets_the_count() {
        let (c, t0) = (cfg(), Instant::now());
        let mut b = Breaker::default();
        assert_eq!(b.failure(&c, t0, 0.0), Transition::None);
        assert_eq!(b.failure(&c, t0, 0.0), Transition::None);
        assert_eq!(b.success(), Transition::None);
        assert_eq!(b.failure(&c, t0, 0.0), Transition::None);
        assert_eq!(b.failure(&c, t0, 0.0), Transition::None);
        let until = t0 + Duration::from_secs(1);
        assert_eq!(b.failure(&c, t0, 0.0), Transition::Ejected(until));
        assert!(b.is_ejected(t0));
        assert!(!b.is_ejected(until));
        assert!(b.is_probing(until));
    }

    #[test]
    fn a_failed_probe_ejects_again_for_twice_as_long_up_to_the_max() {
        let (c, mut now) = (cfg(), Instant::now());
        let mut b = Breaker::default();
        for _ in 0..3 {
            b.failure(&c, now, 0.0);
        }
        let mut expect = Duration::from_secs(1);
        for _ in 0..6 {
            assert!(b.is_ejected(now));
            now += expect;
            assert!(b.is_probing(now));
            expect = (expect * 2).min(Duration::from_secs(8));
            assert_eq!(b.failure(&c, now, 0.0), Transition::Ejected(now + expect));
        }
        // The probe succeeds: back in, and the next ejection starts from the base again.
        now += expect;
        assert_eq!(b.success(), Transition::Restored);
        assert!(!b.is_ejected(now) && !b.is_probing(now));
        for _ in 0..2 {
            b.failure(&c, now, 0.0);
        }
        assert_eq!(
            b.failure(&c, now, 0.0),
            Transition::Ejected(now + Duration::from_secs(1))
        );
    }

    #[test]
    fn jitter_lengthens_the_ejection_by_at_most_its_fraction() {
        let c = BreakerConfig {
            jitter: 0.5,
            ..cfg()
        };
        let t0 = Instant::now();
        let mut b = Breaker::default();
        for _ in 0..2 {
            b.failure(&c, t0, 0.99);
        }
        match b.failure(&c, t0, 0.99) {
            Transition::Ejected(until) => {
                let d = until - t0;
                assert!(d > Duration::from_millis(1400) && d < Duration::from_millis(1500));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn zero_failures_disables_ejection() {
        let c = BreakerConfig {
            consecutive_failures: 0,
            ..cfg()
        };
        let mut b = Breaker::default();
        for _ in 0..100 {
            assert_eq!(b.failure(&c, Instant::now(), 0.0), Transition::None);
        }
    }
}

//! The balancer's decisions, pure: power of two choices, and the peak-EWMA latency estimate.

use std::time::{Duration, Instant};

/// Picks an index in `0..n`, skipping `exclude`, by the power of two choices: two distinct
/// random candidates, the cheaper one wins (ties go to the first draw). `rand(k)` returns a
/// uniform integer in `0..k`.
pub fn choose(
    n: usize,
    exclude: Option<usize>,
    mut rand: impl FnMut(usize) -> usize,
    cost: impl Fn(usize) -> f64,
) -> Option<usize> {
    // Map draws over the n-1 remaining slots back to indices.
    let (avail, skip) = match exclude {
        Some(x) if x < n => (n - 1, Some(x)),
        _ => (n, None),
    };
    let index = |i: usize| match skip {
        Some(x) if i >= x => i + 1,
        _ => i,
    };
    match avail {
        0 => None,
        1 => Some(index(0)),
        _ => {
            let a = rand(avail);
            let mut b = rand(avail - 1);
            if b >= a {
                b += 1;
            }
            let (a, b) = (index(a), index(b));
            Some(if cost(b) < cost(a) { b } else { a })
        }
    }
}

/// A latency estimate that follows peaks at once and decays exponentially otherwise: an
/// endpoint that turns slow is avoided immediately, one that recovers regains traffic over
/// the decay time (Finagle's and linkerd's PeakEwma; tower's `peak_ewma` is the same model).
///
/// Between observations the estimate decays towards zero, so an endpoint that gets no
/// traffic (because it looked slow) is eventually tried again.
///
/// Two bounds keep one sample from starving an endpoint (one slow first response on a busy
/// machine used to keep an endpoint out of rotation for tens of seconds: the peak set the
/// estimate, p2c then never picked it, and only the 10 s decay could bring it back):
/// - a sample counts as at most [`MAX_STEP`] × the current estimate (at least
///   [`STEP_FLOOR`]), so an endpoint that is really slow is learnt over a few samples while
///   one outlier only moves it a bounded step;
/// - an estimate with no sample for [`STALE_AFTER`] is replaced by the next sample instead of
///   being averaged with it: the balancer probes endpoints it has not picked for that long
///   (see `balance::Balancer::pick`), and the probe's answer is what counts.
#[derive(Clone, Debug)]
pub struct PeakEwma {
    estimate_ns: f64,
    /// When `estimate_ns` was last decayed.
    stamp: Instant,
    /// When the last sample arrived.
    sampled: Instant,
    decay_ns: f64,
}

/// One sample raises the estimate at most this many times.
pub const MAX_STEP: f64 = 4.0;
/// The estimate a sample's bound is computed from is at least this.
pub const STEP_FLOOR: Duration = Duration::from_millis(1);
/// After this long without a sample, the estimate is replaced by the next one.
pub const STALE_AFTER: Duration = Duration::from_millis(500);

impl PeakEwma {
    pub fn new(initial: Duration, decay: Duration, now: Instant) -> Self {
        Self {
            estimate_ns: initial.as_nanos() as f64,
            stamp: now,
            sampled: now,
            decay_ns: (decay.as_nanos() as f64).max(1.0),
        }
    }

    /// Records one round trip (request written → response head; no connect time).
    pub fn observe(&mut self, rtt: Duration, now: Instant) {
        let current = self.estimate_ns * self.weight_of_past(now);
        let bound = current.max(STEP_FLOOR.as_nanos() as f64) * MAX_STEP;
        let rtt = (rtt.as_nanos() as f64).min(bound);
        let stale = now.saturating_duration_since(self.sampled) >= STALE_AFTER;
        self.estimate_ns = if rtt > current || stale {
            rtt
        } else {
            let w = self.weight_of_past(now);
            self.estimate_ns * w + rtt * (1.0 - w)
        };
        self.stamp = now;
        self.sampled = now;
    }

    /// Raises the estimate to at least `rtt` at once, unbounded: an attempt that failed (no
    /// connection could be made) costs the endpoint the connect timeout.
    pub fn penalize(&mut self, rtt: Duration, now: Instant) {
        let current = self.estimate_ns * self.weight_of_past(now);
        self.estimate_ns = current.max(rtt.as_nanos() as f64);
        self.stamp = now;
        self.sampled = now;
    }

    /// The estimate at `now`, in nanoseconds, decayed towards zero since the last update.
    pub fn estimate(&mut self, now: Instant) -> f64 {
        let w = self.weight_of_past(now);
        self.estimate_ns *= w;
        self.stamp = now;
        self.estimate_ns
    }

    fn weight_of_past(&self, now: Instant) -> f64 {
        let elapsed = now.saturating_duration_since(self.stamp).as_nanos() as f64;
        (-elapsed / self.decay_ns).exp()
    }
}

/// Cost of an HTTP endpoint: expected latency × (requests in flight + 1) ÷ weight. A small
/// floor keeps in-flight counts meaningful while estimates are still zero.
pub fn http_cost(estimate_ns: f64, in_flight: u32, weight: u32) -> f64 {
    const FLOOR_NS: f64 = 1_000.0;
    (estimate_ns + FLOOR_NS) * (f64::from(in_flight) + 1.0) / f64::from(weight.max(1))
}

/// Cost of a TCP endpoint: open connections + 1, ÷ weight.
pub fn tcp_cost(active: u32, weight: u32) -> f64 {
    (f64::from(active) + 1.0) / f64::from(weight.max(1))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn choose_small_sets() {
        let never = |_: usize| -> usize { panic!("no draw needed") };
        assert_eq!(choose(0, None, never, |_| 0.0), None);
        assert_eq!(choose(1, None, never, |_| 0.0), Some(0));
        assert_eq!(choose(1, Some(0), never, |_| 0.0), None);
        assert_eq!(choose(2, Some(0), never, |_| 0.0), Some(1));
        assert_eq!(choose(2, Some(1), never, |_| 0.0), Some(0));
        // An out-of-range exclusion excludes nothing.
        assert_eq!(choose(1, Some(5), never, |_| 0.0), Some(0));
    }

    #[test]
    fn choose_prefers_the_cheaper_of_two_distinct_draws() {
        let costs = [5.0, 1.0, 3.0];
        // Draws (0, 0) mean candidates 0 and 1 (the second draw skips the first).
        let mut draws = vec![0, 0].into_iter();
        assert_eq!(
            choose(3, None, |_| draws.next().unwrap(), |i| costs[i]),
            Some(1)
        );
        let mut draws = vec![2, 0].into_iter();
        assert_eq!(
            choose(3, None, |_| draws.next().unwrap(), |i| costs[i]),
            Some(2)
        );
        // Excluding 1: draws map over [0, 2].
        let mut draws = vec![0, 0].into_iter();
        assert_eq!(
            choose(3, Some(1), |_| draws.next().unwrap(), |i| costs[i]),
            Some(2)
        );
    }

    #[test]
    fn choose_never_returns_the_excluded_index_and_covers_the_rest() {
        let mut rng = fastrand::Rng::with_seed(7);
        let mut seen = HashMap::new();
        for _ in 0..10_000 {
            let i = choose(5, Some(2), |k| rng.usize(..k), |_| 1.0).unwrap();
            *seen.entry(i).or_insert(0) += 1;
        }
        assert!(!seen.contains_key(&2));
        assert_eq!(seen.len(), 4, "{seen:?}");
        // Equal costs: the first draw wins, so choices are uniform.
        assert!(seen.values().all(|&c| c > 2_000), "{seen:?}");
    }

    #[test]
    fn the_slow_endpoint_of_three_rarely_wins() {
        let mut rng = fastrand::Rng::with_seed(1);
        let costs = [1.0, 1.0, 50.0];
        let mut slow = 0;
        for _ in 0..9_000 {
            if choose(3, None, |k| rng.usize(..k), |i| costs[i]) == Some(2) {
                slow += 1;
            }
        }
        assert_eq!(
            slow, 0,
            "p2c with distinct draws never picks the worst of three"
        );
    }

    #[test]
    fn peak_ewma_jumps_up_at_once_and_decays_down_slowly() {
        let t0 = Instant::now();
        let decay = Duration::from_secs(10);
        let mut e = PeakEwma::new(Duration::ZERO, decay, t0);
        e.observe(MS, t0);
        assert_eq!(e.estimate(t0), 1e6);
        // A slower sample is taken as is, up to four times the estimate per sample.
        e.observe(50 * MS, t0 + MS);
        assert!((e.estimate(t0 + MS) - 4e6).abs() < 1e3);
        for i in 2..5 {
            e.observe(50 * MS, t0 + i * MS);
        }
        let t = t0 + 4 * MS;
        assert!((e.estimate(t) - 50e6).abs() < 1.0);
        // A faster sample a quarter second later moves it by 1 - e^(-0.25/10) ≈ 2.5 %.
        let t1 = t + Duration::from_millis(250);
        let mut f = e.clone();
        f.observe(MS, t1);
        let v = f.estimate(t1);
        let w = (-0.025f64).exp();
        let expect = 50e6 * w + 1e6 * (1.0 - w);
        assert!((v - expect).abs() / expect < 1e-6, "{v} vs {expect}");
        // Fast samples in quick succession barely move it: the decay is in time, not count.
        let mut g = e.clone();
        for i in 0..100u32 {
            g.observe(MS, t + Duration::from_micros(10 * u64::from(i)));
        }
        assert!(g.estimate(t + MS) > 49e6);
    }

    #[test]
    fn peak_ewma_decays_towards_zero_without_samples() {
        let t0 = Instant::now();
        let mut e = PeakEwma::new(Duration::ZERO, Duration::from_secs(10), t0);
        e.penalize(50 * MS, t0);
        let after = e.estimate(t0 + Duration::from_secs(10));
        assert!((after - 50e6 / std::f64::consts::E).abs() < 1e3, "{after}");
        let much_later = e.estimate(t0 + Duration::from_secs(60));
        assert!(much_later < 0.2e6, "{much_later}");
    }

    /// Issue 12: one slow sample (a first connect on a busy machine, a GC pause) moves the
    /// estimate a bounded step, and the next sample after [`STALE_AFTER`] without any replaces it.
    #[test]
    fn one_slow_sample_is_bounded_and_forgotten_by_the_next_probe() {
        let t0 = Instant::now();
        let mut e = PeakEwma::new(Duration::from_micros(300), Duration::from_secs(10), t0);
        e.observe(Duration::from_millis(500), t0);
        let after = e.estimate(t0);
        assert!(
            after <= 4e6 + 1.0,
            "one sample raised the estimate to {after} ns"
        );
        // Fast samples right after it average in as usual (the peak holds a while)...
        let mut busy = e.clone();
        busy.observe(Duration::from_micros(300), t0 + MS);
        assert!(busy.estimate(t0 + MS) > 3e6);
        // ...but a probe after half a second of no samples counts as the new estimate.
        let t1 = t0 + STALE_AFTER;
        e.observe(Duration::from_micros(300), t1);
        assert!((e.estimate(t1) - 300e3).abs() < 1.0, "{}", e.estimate(t1));
    }

    #[test]
    fn costs() {
        assert!(http_cost(1e6, 0, 1) < http_cost(1e6, 1, 1));
        assert!(http_cost(1e6, 3, 1) < http_cost(50e6, 0, 1));
        assert!(http_cost(0.0, 0, 1) < http_cost(0.0, 1, 1));
        assert_eq!(http_cost(1e6, 0, 2) * 2.0, http_cost(1e6, 0, 1));
        assert!(tcp_cost(0, 1) < tcp_cost(1, 1));
        assert_eq!(tcp_cost(3, 2), 2.0);
    }
}

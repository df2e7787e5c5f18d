//! Latency histograms and the numbers the report shows.

use anyhow::Context as _;
use hdrhistogram::Histogram;
use serde::Serialize;
use tokio::time::{Duration, Instant};

use super::schedule::SlotStats;

/// Highest latency the histograms track exactly: 60 s in microseconds.
/// Larger values are clamped to it.
const MAX_MICROS: u64 = 60_000_000;

/// A histogram of microseconds, 1 µs to 60 s, three significant digits.
pub fn new_histogram() -> Histogram<u64> {
    // Static, valid bounds: 1 <= low, high >= 2 * low, sigfig 3 <= 5.
    Histogram::new_with_bounds(1, MAX_MICROS, 3)
        .unwrap_or_else(|_| unreachable!("valid histogram bounds"))
}

/// Everything one run produced.
#[derive(Debug)]
pub struct RunStats {
    pub latency: Histogram<u64>,
    pub lag: Histogram<u64>,
    pub ok: u64,
    pub errors: u64,
    pub error_samples: Vec<String>,
    pub last_done: Option<Instant>,
    /// From the run's start to its last response (open loop), or the run's
    /// duration (closed loop).
    pub elapsed: Duration,
    /// Successes and errors by intended send time.
    pub timeline: Timeline,
}

/// Successes and errors of a run by the intended send time of each request, in
/// [`Timeline::BUCKET`] steps from the run's start: what happened after an instant the run
/// did not know in advance (an ejection, say) can be read afterwards.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Timeline {
    /// `[ok, errors]` per bucket.
    buckets: Vec<[u64; 2]>,
}

impl Timeline {
    pub const BUCKET: Duration = Duration::from_millis(10);

    fn index(offset: Duration) -> usize {
        usize::try_from(offset.as_nanos() / Self::BUCKET.as_nanos()).unwrap_or(usize::MAX)
    }

    /// Counts one request intended `offset` after the run's start.
    pub fn record(&mut self, offset: Duration, ok: bool) {
        // A run longer than ~3 h would not be bucketed sensibly anyway: clamp.
        let i = Self::index(offset).min(1 << 20);
        if self.buckets.len() <= i {
            self.buckets.resize(i + 1, [0, 0]);
        }
        self.buckets[i][usize::from(!ok)] += 1;
    }

    pub fn merge(&mut self, other: &Timeline) {
        if self.buckets.len() < other.buckets.len() {
            self.buckets.resize(other.buckets.len(), [0, 0]);
        }
        for (a, b) in self.buckets.iter_mut().zip(&other.buckets) {
            a[0] += b[0];
            a[1] += b[1];
        }
    }

    /// `(ok, errors)` of the requests intended at or after `offset`, rounded up to the next
    /// bucket boundary (so nothing before `offset` is counted).
    pub fn from(&self, offset: Duration) -> (u64, u64) {
        let mut first = Self::index(offset);
        if Self::BUCKET * u32::try_from(first).unwrap_or(u32::MAX) < offset {
            first = first.saturating_add(1);
        }
        self.buckets
            .iter()
            .skip(first)
            .fold((0, 0), |(ok, err), b| (ok + b[0], err + b[1]))
    }
}

impl RunStats {
    pub fn empty() -> Self {
        RunStats {
            latency: new_histogram(),
            lag: new_histogram(),
            ok: 0,
            errors: 0,
            error_samples: Vec::new(),
            last_done: None,
            elapsed: Duration::ZERO,
            timeline: Timeline::default(),
        }
    }

    pub fn merge_slot(&mut self, slot: SlotStats) -> anyhow::Result<()> {
        self.latency
            .add(&slot.latency)
            .context("merging latency histograms")?;
        self.lag.add(&slot.lag).context("merging lag histograms")?;
        self.ok += slot.ok;
        self.errors += slot.errors;
        self.timeline.merge(&slot.timeline);
        for e in slot.error_samples {
            if self.error_samples.len() < 5 && !self.error_samples.contains(&e) {
                self.error_samples.push(e);
            }
        }
        self.last_done = match (self.last_done, slot.last_done) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
        Ok(())
    }

    pub fn summary(&self) -> Summary {
        Summary::new(
            &self.latency,
            &self.lag,
            self.ok,
            self.errors,
            self.elapsed,
            &self.error_samples,
        )
    }
}

/// The reported figures of one run. Latencies in microseconds.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Summary {
    pub requests: u64,
    pub errors: u64,
    pub elapsed_s: f64,
    pub achieved_rps: f64,
    pub p50_us: u64,
    pub p90_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub max_us: u64,
    pub mean_us: f64,
    /// Generator timer lateness (not counted in the latencies above), p50
    /// and p99.
    pub lag_p50_us: u64,
    pub lag_p99_us: u64,
    pub error_samples: Vec<String>,
}

impl Summary {
    pub fn new(
        latency: &Histogram<u64>,
        lag: &Histogram<u64>,
        ok: u64,
        errors: u64,
        elapsed: Duration,
        error_samples: &[String],
    ) -> Self {
        let q = |h: &Histogram<u64>, q: f64| {
            if h.is_empty() {
                0
            } else {
                h.value_at_quantile(q)
            }
        };
        let secs = elapsed.as_secs_f64();
        Summary {
            requests: ok,
            errors,
            elapsed_s: secs,
            achieved_rps: if secs > 0.0 { ok as f64 / secs } else { 0.0 },
            p50_us: q(latency, 0.50),
            p90_us: q(latency, 0.90),
            p99_us: q(latency, 0.99),
            p999_us: q(latency, 0.999),
            max_us: if latency.is_empty() { 0 } else { latency.max() },
            mean_us: if latency.is_empty() {
                0.0
            } else {
                latency.mean()
            },
            lag_p50_us: q(lag, 0.50),
            lag_p99_us: q(lag, 0.99),
            error_samples: error_samples.to_vec(),
        }
    }

    /// One line for logs and the `load` subcommand.
    pub fn one_line(&self) -> String {
        format!(
            "{} ok, {} errors, {:.0} req/s; p50 {} p90 {} p99 {} p99.9 {} max {} (generator lag p99 {})",
            self.requests,
            self.errors,
            self.achieved_rps,
            fmt_us(self.p50_us),
            fmt_us(self.p90_us),
            fmt_us(self.p99_us),
            fmt_us(self.p999_us),
            fmt_us(self.max_us),
            fmt_us(self.lag_p99_us),
        )
    }
}

/// Microseconds as milliseconds with three decimals ("0.123 ms").
pub fn fmt_us(us: u64) -> String {
    format!("{:.3} ms", us as f64 / 1000.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_of_a_uniform_spread() {
        let mut h = new_histogram();
        for v in 1..=10_000u64 {
            h.record(v).expect("in range");
        }
        let s = Summary::new(&h, &new_histogram(), 10_000, 2, Duration::from_secs(4), &[]);
        // Three significant digits: within 0.1 % of the exact value.
        let near = |got: u64, want: u64| got.abs_diff(want) * 1000 <= want;
        assert!(near(s.p50_us, 5_000), "p50 {}", s.p50_us);
        assert!(near(s.p90_us, 9_000), "p90 {}", s.p90_us);
        assert!(near(s.p99_us, 9_900), "p99 {}", s.p99_us);
        assert!(near(s.p999_us, 9_990), "p99.9 {}", s.p999_us);
        assert!(near(s.max_us, 10_000), "max {}", s.max_us);
        assert_eq!(s.requests, 10_000);
        assert_eq!(s.errors, 2);
        assert!((s.achieved_rps - 2_500.0).abs() < 1e-9);
    }

    #[test]
    fn a_tail_shows_in_p99_not_p50() {
        let mut h = new_histogram();
        for _ in 0..980 {
            h.record(100).expect("in range");
        }
        for _ in 0..20 {
            h.record(20_000).expect("in range");
        }
        let s = Summary::new(&h, &new_histogram(), 1000, 0, Duration::from_secs(1), &[]);
        assert_eq!(s.p50_us, 100);
        assert_eq!(s.p90_us, 100);
        assert!(s.p99_us >= 19_980, "p99 {}", s.p99_us);
    }

    #[test]
    fn empty_run_reports_zeros() {
        let s = RunStats::empty().summary();
        assert_eq!(
            (s.requests, s.p50_us, s.max_us, s.achieved_rps),
            (0, 0, 0, 0.0)
        );
    }

    #[test]
    fn huge_latencies_are_clamped() {
        let mut h = new_histogram();
        h.saturating_record(u64::MAX);
        assert!(h.max() >= MAX_MICROS && h.max() < MAX_MICROS * 2);
    }

    #[test]
    fn timeline_counts_what_came_after_an_instant() {
        let ms = Duration::from_millis;
        let mut t = Timeline::default();
        t.record(ms(0), true);
        t.record(ms(5), false);
        t.record(ms(10), true);
        t.record(ms(25), false);
        t.record(ms(99), true);
        assert_eq!(t.from(Duration::ZERO), (3, 2));
        assert_eq!(t.from(ms(10)), (2, 1));
        // Mid-bucket: that bucket is left out.
        assert_eq!(t.from(ms(11)), (1, 1));
        assert_eq!(t.from(ms(30)), (1, 0));
        assert_eq!(t.from(ms(1000)), (0, 0));
        let mut u = Timeline::default();
        u.record(ms(200), false);
        u.merge(&t);
        assert_eq!(u.from(Duration::ZERO), (3, 3));
    }

    #[test]
    fn formats_milliseconds() {
        assert_eq!(fmt_us(1234), "1.234 ms");
        assert_eq!(fmt_us(90), "0.090 ms");
    }
}

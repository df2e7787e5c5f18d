//! Configured retries: which answers a route retries (HTTP status codes, gRPC status codes),
//! how many times, how long to back off, and the budget that caps retries as a share of
//! requests so that retries never multiply an overload.
//!
//! The decisions are pure ([`RetryConfig::retries`], [`RetryConfig::backoff`]). The budget is
//! tower's `TpsBudget` (Finagle's retry budget: every request deposits, every retry withdraws,
//! plus a floor of retries per second), wrapped only to validate the configuration, which
//! tower asserts on, and to count refusals.

use std::time::Duration;

use tower::retry::budget::{Budget as _, TpsBudget};

/// What an attempt ended with, as far as retrying is concerned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// An HTTP answer with this status; for gRPC, the `grpc-status` when it is known.
    Answered { status: u16, grpc: Option<u32> },
    /// The attempt failed before an answer (connection lost, refused), and may be repeated:
    /// the body can be replayed and the method allows it (see [`super::again`]).
    Failed,
    /// The per-try timeout (`timeouts.backendRequest`) expired.
    TimedOut,
}

/// A route's `retry` (HTTPRoute `retry`; GRPCRoute: Weft's `retry.weft.dev/*` annotations).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RetryConfig {
    /// Retries after the first attempt.
    pub attempts: u32,
    /// Retried HTTP status codes.
    pub codes: Vec<u16>,
    /// Retried gRPC status codes, as a bit set (codes 0..=31).
    pub grpc_codes: u32,
    /// First backoff; doubled per retry up to ten times it, plus up to 50 % jitter on top.
    pub backoff: Duration,
}

impl RetryConfig {
    /// Sets the bit of gRPC status `code` (codes above 31 are not gRPC codes and are ignored).
    pub fn with_grpc_code(mut self, code: u32) -> Self {
        if code < 32 {
            self.grpc_codes |= 1 << code;
        }
        self
    }

    /// Whether an attempt that ended with `outcome` is worth another, `done` retries in.
    pub fn retries(&self, outcome: Outcome, done: u32) -> bool {
        if done >= self.attempts {
            return false;
        }
        match outcome {
            Outcome::Failed => true,
            Outcome::TimedOut => self.codes.contains(&504),
            Outcome::Answered {
                grpc: Some(code), ..
            } => code < 32 && self.grpc_codes & (1 << code) != 0,
            Outcome::Answered { status, grpc: None } => self.codes.contains(&status),
        }
    }

    /// How long to wait before retry number `n` (0-based): `backoff × 2ⁿ`, at most ten times
    /// `backoff`, plus a random jitter of up to half of that on top (`rand01` uniform in
    /// [0, 1)), so retries of many clients spread out. The jitter only ever adds: the Gateway
    /// API says a retry is not sent before the configured backoff has passed. The longest
    /// wait is therefore 15 × `backoff`.
    pub fn backoff(&self, n: u32, rand01: f64) -> Duration {
        if self.backoff.is_zero() {
            return Duration::ZERO;
        }
        let full = self
            .backoff
            .saturating_mul(1u32 << n.min(16))
            .min(self.backoff.saturating_mul(10));
        let r = if rand01.is_finite() {
            rand01.clamp(0.0, 1.0)
        } else {
            0.0
        };
        full.saturating_add(full.mul_f64(0.5 * r))
    }
}

/// BackendPolicy `retryBudget` (DESIGN.md defaults: 20 % of requests plus 10 retries a
/// second, over 10 s).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BudgetConfig {
    pub ratio: f64,
    pub min_per_second: u32,
    pub ttl: Duration,
}

impl Default for BudgetConfig {
    fn default() -> Self {
        Self {
            ratio: 0.2,
            min_per_second: 10,
            ttl: Duration::from_secs(10),
        }
    }
}

/// The retry budget of one service's requests.
pub struct Budget {
    inner: TpsBudget,
    config: BudgetConfig,
}

impl std::fmt::Debug for Budget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Budget")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Budget {
    /// A budget; out-of-range settings are brought into range (ttl 1–60 s, ratio 0–10),
    /// since tower's budget asserts on them.
    pub fn new(config: BudgetConfig) -> Self {
        let ttl = config
            .ttl
            .clamp(Duration::from_secs(1), Duration::from_secs(60));
        let ratio = if config.ratio.is_finite() {
            config.ratio.clamp(0.0, 10.0)
        } else {
            0.0
        };
        Self {
            inner: TpsBudget::new(ttl, config.min_per_second, ratio as f32),
            config,
        }
    }

    pub fn config(&self) -> BudgetConfig {
        self.config
    }

    /// Counts a request (every first attempt).
    pub fn deposit(&self) {
        self.inner.deposit();
    }

    /// Takes one retry from the budget; `false`: the budget is spent, do not retry.
    pub fn withdraw(&self) -> bool {
        self.inner.withdraw()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> RetryConfig {
        RetryConfig {
            attempts: 2,
            codes: vec![500, 503],
            grpc_codes: 0,
            backoff: Duration::from_millis(10),
        }
        .with_grpc_code(14)
    }

    #[test]
    fn only_configured_codes_are_retried_and_only_so_many_times() {
        let c = cfg();
        let http = |status| Outcome::Answered { status, grpc: None };
        assert!(c.retries(http(503), 0));
        assert!(c.retries(http(500), 1));
        assert!(!c.retries(http(503), 2), "two retries were allowed");
        assert!(!c.retries(http(502), 0));
        assert!(!c.retries(http(200), 0));
        // gRPC: the status in the trailers decides, not the HTTP status.
        let grpc = |code| Outcome::Answered {
            status: 200,
            grpc: Some(code),
        };
        assert!(c.retries(grpc(14), 0));
        assert!(!c.retries(grpc(0), 0));
        assert!(!c.retries(grpc(13), 0));
        assert!(!c.retries(grpc(99), 0));
        // Failures before an answer are retried; a per-try timeout only when 504 is listed.
        assert!(c.retries(Outcome::Failed, 0));
        assert!(!c.retries(Outcome::TimedOut, 0));
        let with_504 = RetryConfig {
            codes: vec![504],
            ..cfg()
        };
        assert!(with_504.retries(Outcome::TimedOut, 0));
        // No retry configured: nothing is retried.
        assert!(!RetryConfig::default().retries(Outcome::Failed, 0));
    }

    #[test]
    fn backoff_doubles_up_to_ten_times_and_jitter_only_adds() {
        let c = cfg();
        assert_eq!(c.backoff(0, 0.0), Duration::from_millis(10));
        assert_eq!(c.backoff(0, 1.0), Duration::from_millis(15));
        assert_eq!(c.backoff(1, 0.0), Duration::from_millis(20));
        assert_eq!(c.backoff(3, 0.0), Duration::from_millis(80));
        assert_eq!(c.backoff(4, 0.0), Duration::from_millis(100));
        assert_eq!(c.backoff(40, 1.0), Duration::from_millis(150));
        assert_eq!(c.backoff(0, f64::NAN), Duration::from_millis(10));
        assert_eq!(RetryConfig::default().backoff(3, 0.5), Duration::ZERO);
        // Never below the configured (doubled) backoff, never above 1.5 × it, whatever the draw.
        for n in 0..6u32 {
            let floor = (c.backoff * (1 << n)).min(c.backoff * 10);
            for i in 0..=100 {
                let w = c.backoff(n, f64::from(i) / 100.0);
                assert!(w >= floor, "retry {n}, draw {i}: {w:?} < {floor:?}");
                assert!(w <= floor.mul_f64(1.5), "retry {n}, draw {i}: {w:?}");
            }
        }
    }

    #[test]
    fn the_budget_caps_retries_at_its_ratio_plus_the_floor() {
        let b = Budget::new(BudgetConfig {
            ratio: 0.2,
            min_per_second: 0,
            ttl: Duration::from_secs(10),
        });
        for _ in 0..1000 {
            b.deposit();
        }
        let granted = (0..1000).filter(|_| b.withdraw()).count();
        assert!(
            (195..=205).contains(&granted),
            "{granted} retries for 1000 requests"
        );
        // Nonsense settings are brought into range instead of panicking.
        let b = Budget::new(BudgetConfig {
            ratio: f64::NAN,
            min_per_second: 0,
            ttl: Duration::ZERO,
        });
        b.deposit();
        assert!(!b.withdraw());
    }
}

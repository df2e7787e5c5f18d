//! When to renew and when to retry: pure functions of the certificate's validity and the clock,
//! so the schedule is tested without waiting.

use std::time::{Duration, SystemTime};

/// Share of a certificate's lifetime after which it is renewed (DESIGN.md: 70 %).
pub const RENEW_FRACTION: f64 = 0.7;

/// First retry delay after a failed request; doubles (with jitter) up to [`BACKOFF_MAX`].
pub const BACKOFF_MIN: Duration = Duration::from_secs(1);
pub const BACKOFF_MAX: Duration = Duration::from_secs(60);

/// How long to wait from `now` (when the certificate arrived) before renewing: 70 % of the
/// validity left. Measured from receipt rather than notBefore, which the controller backdates
/// for clock skew (with a short `--cert-lifetime` the backdated 70 % point is already past);
/// never less than [`BACKOFF_MIN`], so a leaf capped by an expiring issuer cannot spin.
pub fn renew_delay(now: SystemTime, not_after: SystemTime) -> Duration {
    not_after
        .duration_since(now)
        .unwrap_or(Duration::ZERO)
        .mul_f64(RENEW_FRACTION)
        .max(BACKOFF_MIN)
}

/// After a failed attempt: wait the backoff, but while a certificate is held wake no later than
/// its expiry, so the proxy fails closed on time.
pub fn retry_delay(now: SystemTime, backoff: Duration, held_until: Option<SystemTime>) -> Duration {
    match held_until.map(|t| t.duration_since(now)) {
        Some(Ok(left)) if left > Duration::ZERO => backoff.min(left),
        _ => backoff,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::discovery::Backoff;

    fn t(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
    }

    #[test]
    fn renews_at_seventy_percent_of_the_validity_left() {
        let day = 24 * 3600;
        let now = t(1_000_000);
        let d = renew_delay(now, t(1_000_000 + day));
        assert_eq!(d, Duration::from_secs_f64(day as f64 * 0.7));
        // About 16.8 h after issuance.
        assert!((16.7..16.9).contains(&(d.as_secs_f64() / 3600.0)), "{d:?}");
        // The shortest lifetime the controller allows (60 s) renews after 42 s.
        assert_eq!(renew_delay(now, t(1_000_060)), Duration::from_secs(42));
        // Nearly or already expired (a suspended proxy, a capped leaf): soon, never a spin.
        assert_eq!(renew_delay(now, t(1_000_001)), BACKOFF_MIN);
        assert_eq!(renew_delay(now, t(999_000)), BACKOFF_MIN);
    }

    #[test]
    fn retries_back_off_from_one_second_to_a_minute_with_jitter() {
        let mut b = Backoff::new(BACKOFF_MIN, BACKOFF_MAX);
        let ceilings: Vec<u64> = (0..9)
            .map(|_| b.next_delay(0.999_999).as_secs_f64().round() as u64)
            .collect();
        assert_eq!(ceilings, vec![1, 2, 4, 8, 16, 32, 60, 60, 60]);
        let floor = Backoff::new(BACKOFF_MIN, BACKOFF_MAX).next_delay(0.0);
        assert_eq!(floor, Duration::from_millis(500));
        b.reset();
        assert_eq!(b.next_delay(0.0), Duration::from_millis(500));
    }

    #[test]
    fn retry_wakes_at_expiry_while_a_certificate_is_held() {
        let now = t(100);
        let minute = Duration::from_secs(60);
        assert_eq!(retry_delay(now, minute, None), minute);
        assert_eq!(
            retry_delay(now, minute, Some(t(110))),
            Duration::from_secs(10)
        );
        assert_eq!(retry_delay(now, minute, Some(t(1000))), minute);
        // Already expired: plain backoff (the state says expired).
        assert_eq!(retry_delay(now, minute, Some(t(100))), minute);
        assert_eq!(retry_delay(now, minute, Some(t(50))), minute);
    }
}

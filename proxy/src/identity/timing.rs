//! When to renew and when to retry: pure functions of the certificate's validity and the clock,
//! so the schedule is tested without waiting.

use std::time::{Duration, SystemTime};

/// Share of a certificate's lifetime after which it is renewed (DESIGN.md: 70 %).
pub const RENEW_FRACTION: f64 = 0.7;

/// First retry delay after a failed request; doubles (with jitter) up to [`BACKOFF_MAX`].
pub const BACKOFF_MIN: Duration = Duration::from_secs(1);
pub const BACKOFF_MAX: Duration = Duration::from_secs(60);

/// The instant at which a certificate valid over `[not_before, not_after]` is renewed.
pub fn renew_at(not_before: SystemTime, not_after: SystemTime) -> SystemTime {
    let lifetime = not_after
        .duration_since(not_before)
        .unwrap_or(Duration::ZERO);
    not_before + lifetime.mul_f64(RENEW_FRACTION)
}

/// How long to wait from `now` before renewing; zero when the renewal time has passed.
pub fn renew_delay(now: SystemTime, not_before: SystemTime, not_after: SystemTime) -> Duration {
    renew_at(not_before, not_after)
        .duration_since(now)
        .unwrap_or(Duration::ZERO)
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
    fn renews_at_seventy_percent_of_the_lifetime() {
        let day = 24 * 3600;
        // The controller backdates notBefore by a minute for clock skew.
        let (nb, na) = (t(1_000_000 - 60), t(1_000_000 + day));
        let at = renew_at(nb, na);
        assert_eq!(at, nb + Duration::from_secs_f64((day + 60) as f64 * 0.7));
        assert_eq!(
            renew_delay(t(1_000_000), nb, na),
            at.duration_since(t(1_000_000)).unwrap()
        );
        // About 16.8 h after issuance.
        let h = renew_delay(t(1_000_000), nb, na).as_secs_f64() / 3600.0;
        assert!((16.7..16.9).contains(&h), "{h}");
        // Past the renewal time (e.g. the proxy was suspended): renew now.
        assert_eq!(renew_delay(t(1_000_000 + day), nb, na), Duration::ZERO);
        // A certificate whose validity runs backwards renews at once.
        assert_eq!(renew_at(na, nb), na);
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

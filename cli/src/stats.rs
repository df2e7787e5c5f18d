//! Turns scraped proxy metrics into the numbers a person reads: request rate,
//! success rate, latency quantiles and open connections, per traffic
//! direction, over the window between two scrapes.
//!
//! Everything here is a pure function of parsed samples, so the arithmetic is
//! tested without a proxy. The metric names are the proxy's contract (see the
//! proxy's metrics module); they are constants here so a rename shows up in
//! one place.

use crate::promtext::Sample;

pub const REQUESTS_TOTAL: &str = "weft_http_requests_total";
pub const RESPONSES_TOTAL: &str = "weft_http_responses_total";
pub const RESPONSE_DURATION_BUCKET: &str = "weft_http_response_duration_seconds_bucket";
pub const TCP_CONNECTIONS_OPEN: &str = "weft_tcp_connections_open";
pub const TLS_CONNECTIONS_TOTAL: &str = "weft_tls_connections_total";

/// The `direction` label's values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    Outbound,
    Inbound,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Outbound => "outbound",
            Direction::Inbound => "inbound",
        }
    }
}

/// Cumulative values for one direction of one proxy at one scrape.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DirectionSnapshot {
    pub requests: f64,
    pub responses: f64,
    pub successes: f64,
    /// Cumulative histogram buckets `(upper bound, count)`, summed over all
    /// authorities and classifications, sorted by upper bound.
    pub buckets: Vec<(f64, f64)>,
    /// `None` when the proxy exposes no such gauge for this direction.
    pub tcp_open: Option<f64>,
    /// Requests that carried a client identity (`client_id` not empty): they
    /// arrived over mutual TLS. Meaningful inbound only.
    pub mtls_requests: f64,
    /// Connections counted by `weft_tls_connections_total`, and those of them
    /// with `tls="true"`.
    pub tls_connections: f64,
    pub mtls_connections: f64,
}

impl DirectionSnapshot {
    /// Sum the samples that belong to `direction`. Samples of other metrics,
    /// and bucket samples whose `le` is not a number, are ignored.
    pub fn from_samples(samples: &[Sample], direction: Direction) -> Self {
        Self::from_matching(samples, direction, |_| true)
    }

    /// As [`Self::from_samples`], keeping only the samples `keep` accepts
    /// (e.g. those of one authority).
    pub fn from_matching(
        samples: &[Sample],
        direction: Direction,
        keep: impl Fn(&Sample) -> bool,
    ) -> Self {
        let mut snap = DirectionSnapshot::default();
        for s in samples
            .iter()
            .filter(|s| s.label("direction") == Some(direction.as_str()) && keep(s))
        {
            match s.name.as_str() {
                REQUESTS_TOTAL => {
                    snap.requests += s.value;
                    if s.label("client_id").is_some_and(|id| !id.is_empty()) {
                        snap.mtls_requests += s.value;
                    }
                }
                TLS_CONNECTIONS_TOTAL => {
                    snap.tls_connections += s.value;
                    if s.label("tls") == Some("true") {
                        snap.mtls_connections += s.value;
                    }
                }
                RESPONSES_TOTAL => {
                    snap.responses += s.value;
                    if s.label("classification") == Some("success") {
                        snap.successes += s.value;
                    }
                }
                RESPONSE_DURATION_BUCKET => {
                    let Some(le) = s.label("le").and_then(parse_le) else {
                        continue;
                    };
                    match snap.buckets.iter_mut().find(|(b, _)| *b == le) {
                        Some((_, count)) => *count += s.value,
                        None => snap.buckets.push((le, s.value)),
                    }
                }
                TCP_CONNECTIONS_OPEN => *snap.tcp_open.get_or_insert(0.0) += s.value,
                _ => {}
            }
        }
        snap.buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
        snap
    }
}

fn parse_le(le: &str) -> Option<f64> {
    match le {
        "+Inf" | "Inf" => Some(f64::INFINITY),
        _ => le.parse().ok().filter(|v: &f64| !v.is_nan()),
    }
}

/// The increases between two snapshots of one proxy: what happened in the
/// window, before dividing by its length. Counts of several proxies add up
/// ([`WindowCounts::add`]) after each proxy's own reset handling, so one
/// restarted pod does not distort the others.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct WindowCounts {
    pub requests: f64,
    pub responses: f64,
    pub successes: f64,
    /// Per-bucket increases `(upper bound, count)`, sorted by upper bound.
    pub buckets: Vec<(f64, f64)>,
    /// The gauge at the later snapshot.
    pub tcp_open: Option<f64>,
    pub mtls_requests: f64,
    pub tls_connections: f64,
    pub mtls_connections: f64,
}

impl WindowCounts {
    pub fn between(prev: &DirectionSnapshot, cur: &DirectionSnapshot) -> Self {
        WindowCounts {
            requests: counter_delta(prev.requests, cur.requests),
            responses: counter_delta(prev.responses, cur.responses),
            successes: counter_delta(prev.successes, cur.successes),
            buckets: bucket_deltas(&prev.buckets, &cur.buckets),
            tcp_open: cur.tcp_open,
            mtls_requests: counter_delta(prev.mtls_requests, cur.mtls_requests),
            tls_connections: counter_delta(prev.tls_connections, cur.tls_connections),
            mtls_connections: counter_delta(prev.mtls_connections, cur.mtls_connections),
        }
    }

    /// Adds `other`'s counts (another proxy's, or another authority's).
    pub fn add(&mut self, other: &WindowCounts) {
        self.requests += other.requests;
        self.responses += other.responses;
        self.successes += other.successes;
        for &(le, c) in &other.buckets {
            match self.buckets.iter_mut().find(|(b, _)| *b == le) {
                Some((_, count)) => *count += c,
                None => self.buckets.push((le, c)),
            }
        }
        self.buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
        self.tcp_open = match (self.tcp_open, other.tcp_open) {
            (None, None) => None,
            (a, b) => Some(a.unwrap_or(0.0) + b.unwrap_or(0.0)),
        };
        self.mtls_requests += other.mtls_requests;
        self.tls_connections += other.tls_connections;
        self.mtls_connections += other.mtls_connections;
    }

    /// The share of the window's traffic that was mutual TLS: of requests when
    /// there were any, else of new connections; `None` when neither moved.
    pub fn mtls_share(&self) -> Option<f64> {
        if self.requests > 0.0 {
            Some((self.mtls_requests / self.requests).clamp(0.0, 1.0))
        } else if self.tls_connections > 0.0 {
            Some((self.mtls_connections / self.tls_connections).clamp(0.0, 1.0))
        } else {
            None
        }
    }
}

/// What happened in one direction between two snapshots.
#[derive(Debug, Clone, PartialEq)]
pub struct WindowStats {
    pub requests_per_sec: f64,
    /// Fraction in `0..=1`; `None` when no response was seen in the window.
    pub success_rate: Option<f64>,
    /// Seconds; `None` when the window saw no observation or there is no
    /// histogram.
    pub p50: Option<f64>,
    pub p95: Option<f64>,
    pub p99: Option<f64>,
    pub tcp_open: Option<f64>,
    /// Responses seen in the window (the denominator of `success_rate`).
    pub responses: f64,
}

impl WindowStats {
    /// Compare two snapshots taken `seconds` apart.
    pub fn between(prev: &DirectionSnapshot, cur: &DirectionSnapshot, seconds: f64) -> Self {
        Self::from_counts(&WindowCounts::between(prev, cur), seconds)
    }

    /// Rates and quantiles of counts gathered over `seconds`.
    pub fn from_counts(c: &WindowCounts, seconds: f64) -> Self {
        WindowStats {
            requests_per_sec: if seconds > 0.0 {
                c.requests / seconds
            } else {
                0.0
            },
            success_rate: (c.responses > 0.0).then(|| (c.successes / c.responses).clamp(0.0, 1.0)),
            p50: histogram_quantile(0.5, &c.buckets),
            p95: histogram_quantile(0.95, &c.buckets),
            p99: histogram_quantile(0.99, &c.buckets),
            tcp_open: c.tcp_open,
            responses: c.responses,
        }
    }
}

/// The increase of a counter; a decrease means the process restarted and
/// counted from zero again (Prometheus' `rate()` makes the same assumption).
pub fn counter_delta(prev: f64, cur: f64) -> f64 {
    if cur >= prev {
        cur - prev
    } else {
        cur
    }
}

/// Per-bucket increase between two cumulative histograms. A bucket missing
/// from `prev` counts from zero; a reset anywhere resets the whole histogram.
pub fn bucket_deltas(prev: &[(f64, f64)], cur: &[(f64, f64)]) -> Vec<(f64, f64)> {
    let prev_count = |le: f64| prev.iter().find(|(b, _)| *b == le).map_or(0.0, |(_, c)| *c);
    let reset = cur.iter().any(|&(le, c)| c < prev_count(le));
    cur.iter()
        .map(|&(le, c)| (le, if reset { c } else { c - prev_count(le) }))
        .collect()
}

/// Estimate the `q` quantile from cumulative buckets `(upper bound, count)`
/// sorted by upper bound, as Prometheus' `histogram_quantile` does: find the
/// bucket holding the rank and interpolate linearly inside it, taking the
/// lowest bucket to start at zero. When the rank falls in the `+Inf` bucket
/// the answer is the highest finite bound.
///
/// `None` when the answer is undefined: no `+Inf` bucket, fewer than two
/// buckets, no observations, or `q` outside `0..=1`.
pub fn histogram_quantile(q: f64, buckets: &[(f64, f64)]) -> Option<f64> {
    if !(0.0..=1.0).contains(&q) || buckets.len() < 2 {
        return None;
    }
    let (last_le, _) = *buckets.last()?;
    if last_le != f64::INFINITY {
        return None;
    }
    // Scrapes are not atomic across buckets, so a count can dip below the one
    // before it; Prometheus smooths that the same way.
    let mut counts = Vec::with_capacity(buckets.len());
    let mut running: f64 = 0.0;
    for &(_, c) in buckets {
        running = running.max(c);
        counts.push(running);
    }
    let total = *counts.last()?;
    if total <= 0.0 || !total.is_finite() {
        return None;
    }
    let rank = q * total;
    let b = counts.iter().position(|&c| c >= rank)?;
    if b == buckets.len() - 1 {
        return Some(buckets[b - 1].0);
    }
    if b == 0 && buckets[0].0 <= 0.0 {
        return Some(buckets[0].0);
    }
    let (start, below) = if b == 0 {
        (0.0, 0.0)
    } else {
        (buckets[b - 1].0, counts[b - 1])
    };
    let end = buckets[b].0;
    let in_bucket = counts[b] - below;
    if in_bucket <= 0.0 {
        return Some(end);
    }
    Some(start + (end - start) * ((rank - below) / in_bucket))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::promtext::parse;

    const INF: f64 = f64::INFINITY;

    fn close(a: Option<f64>, b: f64) -> bool {
        a.is_some_and(|a| (a - b).abs() < 1e-9)
    }

    #[test]
    fn quantile_interpolates_inside_the_bucket() {
        let buckets = [(1.0, 10.0), (2.0, 20.0), (4.0, 40.0), (INF, 40.0)];
        // rank 20 is the top of the (1, 2] bucket.
        assert!(close(histogram_quantile(0.5, &buckets), 2.0));
        // rank 39.6: 19.6 of the 20 in (2, 4].
        assert!(close(histogram_quantile(0.99, &buckets), 3.96));
        // rank 5 in the first bucket, which starts at zero.
        assert!(close(histogram_quantile(0.125, &buckets), 0.5));
        assert!(close(histogram_quantile(0.0, &buckets), 0.0));
        assert!(close(histogram_quantile(1.0, &buckets), 4.0));
    }

    #[test]
    fn quantile_in_the_inf_bucket_is_the_highest_finite_bound() {
        let buckets = [(0.005, 1.0), (0.01, 2.0), (INF, 100.0)];
        assert!(close(histogram_quantile(0.99, &buckets), 0.01));
    }

    #[test]
    fn quantile_with_a_non_positive_first_bound_returns_it() {
        let buckets = [(-1.0, 5.0), (1.0, 10.0), (INF, 10.0)];
        assert!(close(histogram_quantile(0.25, &buckets), -1.0));
    }

    #[test]
    fn quantile_smooths_non_monotonic_buckets() {
        // The (1, 2] bucket read lower than (0, 1]: treated as 10, so the
        // median (rank 10) is at the top of the first bucket.
        let buckets = [(1.0, 10.0), (2.0, 9.0), (4.0, 20.0), (INF, 20.0)];
        assert!(close(histogram_quantile(0.5, &buckets), 1.0));
    }

    #[test]
    fn quantile_is_undefined_when_it_should_be() {
        let ok = [(1.0, 1.0), (INF, 1.0)];
        assert_eq!(histogram_quantile(1.5, &ok), None);
        assert_eq!(histogram_quantile(-0.1, &ok), None);
        assert_eq!(histogram_quantile(f64::NAN, &ok), None);
        assert_eq!(histogram_quantile(0.5, &[]), None);
        assert_eq!(histogram_quantile(0.5, &[(INF, 3.0)]), None);
        assert_eq!(histogram_quantile(0.5, &[(1.0, 1.0), (2.0, 1.0)]), None);
        assert_eq!(histogram_quantile(0.5, &[(1.0, 0.0), (INF, 0.0)]), None);
    }

    #[test]
    fn bucket_deltas_subtract_and_handle_resets() {
        let prev = [(1.0, 5.0), (INF, 10.0)];
        let cur = [(1.0, 7.0), (INF, 15.0)];
        assert_eq!(bucket_deltas(&prev, &cur), vec![(1.0, 2.0), (INF, 5.0)]);
        let restarted = [(1.0, 1.0), (INF, 2.0)];
        assert_eq!(bucket_deltas(&prev, &restarted), restarted.to_vec());
        assert_eq!(bucket_deltas(&[], &cur), cur.to_vec());
        assert_eq!(counter_delta(10.0, 12.0), 2.0);
        assert_eq!(counter_delta(10.0, 3.0), 3.0);
    }

    fn exposition(requests: u32, ok: u32, failed: u32, fast: u32, slow: u32) -> String {
        let a = r#"authority="books.demo.svc.cluster.local:8080""#;
        let total = fast + slow;
        format!(
            "# TYPE weft_http_requests counter\n\
             weft_http_requests_total{{direction=\"outbound\",{a}}} {requests}\n\
             weft_http_requests_total{{direction=\"inbound\",{a}}} 7\n\
             weft_http_responses_total{{direction=\"outbound\",{a},status_code=\"200\",classification=\"success\"}} {ok}\n\
             weft_http_responses_total{{direction=\"outbound\",{a},status_code=\"500\",classification=\"failure\"}} {failed}\n\
             weft_http_response_duration_seconds_bucket{{direction=\"outbound\",{a},classification=\"success\",le=\"0.001\"}} 0\n\
             weft_http_response_duration_seconds_bucket{{direction=\"outbound\",{a},classification=\"success\",le=\"0.01\"}} {fast}\n\
             weft_http_response_duration_seconds_bucket{{direction=\"outbound\",{a},classification=\"success\",le=\"0.1\"}} {total}\n\
             weft_http_response_duration_seconds_bucket{{direction=\"outbound\",{a},classification=\"success\",le=\"+Inf\"}} {total}\n\
             weft_http_response_duration_seconds_bucket{{direction=\"outbound\",{a},classification=\"failure\",le=\"0.001\"}} 0\n\
             weft_http_response_duration_seconds_bucket{{direction=\"outbound\",{a},classification=\"failure\",le=\"0.01\"}} 0\n\
             weft_http_response_duration_seconds_bucket{{direction=\"outbound\",{a},classification=\"failure\",le=\"0.1\"}} 0\n\
             weft_http_response_duration_seconds_bucket{{direction=\"outbound\",{a},classification=\"failure\",le=\"+Inf\"}} 0\n\
             weft_tcp_connections_open{{direction=\"outbound\"}} 3\n\
             weft_tcp_connections_open{{direction=\"inbound\"}} 0\n\
             # EOF\n"
        )
    }

    #[test]
    fn snapshot_sums_series_of_one_direction() {
        let samples = parse(&exposition(100, 98, 2, 90, 10)).expect("parses");
        let out = DirectionSnapshot::from_samples(&samples, Direction::Outbound);
        assert_eq!(out.requests, 100.0);
        assert_eq!(out.responses, 100.0);
        assert_eq!(out.successes, 98.0);
        assert_eq!(
            out.buckets,
            vec![(0.001, 0.0), (0.01, 90.0), (0.1, 100.0), (INF, 100.0)]
        );
        assert_eq!(out.tcp_open, Some(3.0));
        let inb = DirectionSnapshot::from_samples(&samples, Direction::Inbound);
        assert_eq!(inb.requests, 7.0);
        assert_eq!(inb.responses, 0.0);
        assert!(inb.buckets.is_empty());
        assert_eq!(inb.tcp_open, Some(0.0));
    }

    #[test]
    fn window_stats_between_two_scrapes() {
        let first = parse(&exposition(100, 98, 2, 90, 10)).expect("parses");
        let second = parse(&exposition(200, 197, 3, 180, 20)).expect("parses");
        let prev = DirectionSnapshot::from_samples(&first, Direction::Outbound);
        let cur = DirectionSnapshot::from_samples(&second, Direction::Outbound);
        let w = WindowStats::between(&prev, &cur, 2.0);
        assert_eq!(w.requests_per_sec, 50.0);
        assert_eq!(w.responses, 100.0);
        assert!(close(w.success_rate, 0.99));
        // 90 of 100 new observations in (0.001, 0.01]: rank 50 is 50/90 of the way.
        assert!(close(w.p50, 0.001 + 0.009 * 50.0 / 90.0));
        // rank 99 is the 9th of 10 in (0.01, 0.1].
        assert!(close(w.p99, 0.01 + 0.09 * 0.9));
        assert_eq!(w.tcp_open, Some(3.0));

        let idle = WindowStats::between(&cur, &cur, 2.0);
        assert_eq!(idle.requests_per_sec, 0.0);
        assert_eq!(idle.success_rate, None);
        assert_eq!(idle.p50, None);
    }

    #[test]
    fn window_counts_add_up_and_give_the_mtls_share() {
        let mut a = WindowCounts {
            requests: 10.0,
            mtls_requests: 10.0,
            buckets: vec![(1.0, 4.0), (INF, 10.0)],
            tcp_open: Some(1.0),
            ..WindowCounts::default()
        };
        let b = WindowCounts {
            requests: 30.0,
            buckets: vec![(1.0, 6.0), (2.0, 20.0), (INF, 30.0)],
            ..WindowCounts::default()
        };
        a.add(&b);
        assert_eq!(a.requests, 40.0);
        assert_eq!(a.buckets, vec![(1.0, 10.0), (2.0, 20.0), (INF, 40.0)]);
        assert_eq!(a.tcp_open, Some(1.0));
        assert_eq!(a.mtls_share(), Some(0.25));
        // Without requests, the share of new connections; without either, unknown.
        let conns = WindowCounts {
            tls_connections: 4.0,
            mtls_connections: 3.0,
            ..WindowCounts::default()
        };
        assert_eq!(conns.mtls_share(), Some(0.75));
        assert_eq!(WindowCounts::default().mtls_share(), None);
        let mut none = WindowCounts::default();
        none.add(&WindowCounts::default());
        assert_eq!(none.tcp_open, None);
    }

    /// A scrape of a real `weft-proxy` (client side of `weft demo`, 3.5 s in).
    const REAL_SCRAPE: &str = include_str!("../testdata/client-proxy.metrics");

    #[test]
    fn reads_a_real_proxy_scrape() {
        let samples = parse(REAL_SCRAPE).expect("parses");
        let out = DirectionSnapshot::from_samples(&samples, Direction::Outbound);
        assert_eq!(out.requests, 174.0);
        assert_eq!(out.responses, 173.0);
        assert_eq!(out.successes, 170.0);
        assert_eq!(out.tcp_open, Some(1.0));
        // Success and failure series summed per bucket.
        assert_eq!(out.buckets.len(), 17);
        assert_eq!(out.buckets[5], (0.005, 74.0));
        assert_eq!(out.buckets[6], (0.01, 173.0));
        assert_eq!(out.buckets[16], (INF, 173.0));

        let w = WindowStats::between(&DirectionSnapshot::default(), &out, 3.48);
        assert!(close(Some(w.requests_per_sec), 174.0 / 3.48));
        assert!(close(w.success_rate, 170.0 / 173.0));
        // Both quantiles fall in (5 ms, 10 ms], which holds 99 observations.
        assert!(close(w.p50, 0.005 + 0.005 * (86.5 - 74.0) / 99.0));
        assert!(close(w.p99, 0.005 + 0.005 * (173.0 * 0.99 - 74.0) / 99.0));

        let inb = DirectionSnapshot::from_samples(&samples, Direction::Inbound);
        assert_eq!(inb.requests, 0.0);
        assert_eq!(inb.tcp_open, Some(0.0));
    }

    #[test]
    fn a_proxy_without_the_metrics_gives_empty_stats() {
        let samples = parse("other_metric 1\n").expect("parses");
        let snap = DirectionSnapshot::from_samples(&samples, Direction::Outbound);
        assert_eq!(snap, DirectionSnapshot::default());
        let w = WindowStats::between(&snap, &snap, 0.0);
        assert_eq!(w.requests_per_sec, 0.0);
        assert_eq!(w.tcp_open, None);
    }
}

//! The mesh's security state as an operator scraping a proxy's `/metrics`
//! sees it: connections with and without mutual TLS and the peer identities
//! on the mTLS ones, TLS handshake failures, which client identities the
//! inbound HTTP requests came from, and how long the proxy's own certificate
//! has left.
//!
//! Like [`crate::stats`], pure functions of parsed samples; the metric names
//! are the proxy's contract, kept as constants so a rename shows up here.

use std::collections::BTreeMap;

use crate::promtext::Sample;
use crate::stats::{counter_delta, Direction, REQUESTS_TOTAL};

/// `weft_tls_connections_total{direction, tls="true"|"false", peer_id}`.
pub const TLS_CONNECTIONS_TOTAL: &str = "weft_tls_connections_total";
/// `weft_tls_handshake_errors_total{direction, reason}`.
pub const TLS_HANDSHAKE_ERRORS_TOTAL: &str = "weft_tls_handshake_errors_total";
/// Unix seconds of the proxy certificate's notAfter; 0 before the first.
pub const CERT_EXPIRY: &str = "weft_identity_cert_expiry_timestamp_seconds";
/// The label of inbound HTTP series naming the client's SPIFFE ID ("" without mTLS).
pub const CLIENT_ID_LABEL: &str = "client_id";

/// Cumulative TLS counters of one direction of one proxy (or their increase
/// between two scrapes, see [`TlsSnapshot::since`]).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TlsSnapshot {
    /// Connections with mutual TLS, by the peer's SPIFFE ID.
    pub mtls: BTreeMap<String, f64>,
    /// Connections without TLS.
    pub plain: f64,
    /// Failed handshakes, by reason.
    pub handshake_errors: BTreeMap<String, f64>,
}

impl TlsSnapshot {
    pub fn from_samples(samples: &[Sample], direction: Direction) -> Self {
        let mut snap = TlsSnapshot::default();
        for s in samples
            .iter()
            .filter(|s| s.label("direction") == Some(direction.as_str()))
        {
            match s.name.as_str() {
                TLS_CONNECTIONS_TOTAL if s.label("tls") == Some("true") => {
                    let peer = s.label("peer_id").unwrap_or_default();
                    *snap.mtls.entry(peer.to_string()).or_default() += s.value;
                }
                TLS_CONNECTIONS_TOTAL => snap.plain += s.value,
                TLS_HANDSHAKE_ERRORS_TOTAL => {
                    let reason = s.label("reason").unwrap_or_default();
                    *snap.handshake_errors.entry(reason.to_string()).or_default() += s.value;
                }
                _ => {}
            }
        }
        snap
    }

    /// What happened between `prev` and `self`; keys that did not move are dropped.
    pub fn since(&self, prev: &TlsSnapshot) -> TlsSnapshot {
        TlsSnapshot {
            mtls: counts_since(&prev.mtls, &self.mtls),
            plain: counter_delta(prev.plain, self.plain),
            handshake_errors: counts_since(&prev.handshake_errors, &self.handshake_errors),
        }
    }

    pub fn mtls_total(&self) -> f64 {
        // Not `sum()`: an empty f64 sum is -0.0, which prints as "-0".
        self.mtls.values().fold(0.0, |a, b| a + b)
    }

    pub fn handshake_errors_total(&self) -> f64 {
        self.handshake_errors.values().fold(0.0, |a, b| a + b)
    }
}

/// The increase of each counter in `cur` since `prev` (one missing from `prev` counts from
/// zero); counters that did not move are dropped.
pub fn counts_since(
    prev: &BTreeMap<String, f64>,
    cur: &BTreeMap<String, f64>,
) -> BTreeMap<String, f64> {
    cur.iter()
        .map(|(k, &v)| {
            (
                k.clone(),
                counter_delta(prev.get(k).copied().unwrap_or(0.0), v),
            )
        })
        .filter(|(_, v)| *v > 0.0)
        .collect()
}

/// Cumulative HTTP requests of `direction` by their `client_id` label; series
/// without the label count under "".
pub fn requests_by_client(samples: &[Sample], direction: Direction) -> BTreeMap<String, f64> {
    let mut by = BTreeMap::new();
    for s in samples
        .iter()
        .filter(|s| s.name == REQUESTS_TOTAL && s.label("direction") == Some(direction.as_str()))
    {
        let client = s.label(CLIENT_ID_LABEL).unwrap_or_default();
        *by.entry(client.to_string()).or_default() += s.value;
    }
    by
}

/// Seconds until the proxy's certificate expires, as of `now_unix`; `None`
/// when the proxy has none (no identity, or none issued yet). Negative once
/// expired.
pub fn cert_seconds_left(samples: &[Sample], now_unix: f64) -> Option<f64> {
    samples
        .iter()
        .find(|s| s.name == CERT_EXPIRY)
        .map(|s| s.value)
        .filter(|&expiry| expiry > 0.0 && expiry.is_finite())
        .map(|expiry| expiry - now_unix)
}

/// A certificate's time left the way a person reads it: `23h59m`, `1d0h`,
/// `4m05s`, `30s`, or `expired`.
pub fn format_time_left(seconds: f64) -> String {
    if seconds.is_nan() || seconds <= 0.0 {
        return "expired".into();
    }
    // Saturating float-to-int cast: a huge value shows as a huge number of days.
    let s = seconds.floor() as u64;
    let (d, h, m, s) = (s / 86_400, s / 3600 % 24, s / 60 % 60, s % 60);
    if d > 0 {
        format!("{d}d{h}h")
    } else if h > 0 {
        format!("{h}h{m:02}m")
    } else if m > 0 {
        format!("{m}m{s:02}s")
    } else {
        format!("{s}s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::promtext::parse;

    const WEB: &str = "spiffe://cluster.local/ns/demo/sa/web";
    const BOOKS: &str = "spiffe://cluster.local/ns/demo/sa/books";

    fn exposition(mtls_in: u32, plain_in: u32, errors: u32, requests: u32) -> String {
        format!(
            "# TYPE weft_tls_connections counter\n\
             weft_tls_connections_total{{direction=\"inbound\",tls=\"true\",peer_id=\"{WEB}\"}} {mtls_in}\n\
             weft_tls_connections_total{{direction=\"inbound\",tls=\"true\",peer_id=\"spiffe://cluster.local/ns/x/sa/y\"}} 1\n\
             weft_tls_connections_total{{direction=\"inbound\",tls=\"false\",peer_id=\"\"}} {plain_in}\n\
             weft_tls_connections_total{{direction=\"outbound\",tls=\"true\",peer_id=\"{BOOKS}\"}} 4\n\
             weft_tls_handshake_errors_total{{direction=\"inbound\",reason=\"bad-certificate\"}} {errors}\n\
             weft_http_requests_total{{direction=\"inbound\",authority=\"books:8080\",client_id=\"{WEB}\"}} {requests}\n\
             weft_http_requests_total{{direction=\"inbound\",authority=\"books:8080\",client_id=\"\"}} 2\n\
             weft_http_requests_total{{direction=\"outbound\",authority=\"books:8080\"}} 9\n\
             weft_identity_cert_expiry_timestamp_seconds 1000\n\
             # EOF\n"
        )
    }

    #[test]
    fn snapshot_splits_connections_by_tls_and_peer() {
        let samples = parse(&exposition(3, 2, 0, 10)).expect("parses");
        let inbound = TlsSnapshot::from_samples(&samples, Direction::Inbound);
        assert_eq!(inbound.mtls.get(WEB), Some(&3.0));
        assert_eq!(inbound.mtls_total(), 4.0);
        assert_eq!(inbound.plain, 2.0);
        assert_eq!(inbound.handshake_errors.get("bad-certificate"), Some(&0.0));
        let outbound = TlsSnapshot::from_samples(&samples, Direction::Outbound);
        assert_eq!(
            outbound.mtls.into_iter().collect::<Vec<_>>(),
            vec![(BOOKS.to_string(), 4.0)]
        );
        assert_eq!(outbound.plain, 0.0);
    }

    #[test]
    fn since_keeps_what_moved() {
        let before = parse(&exposition(3, 2, 0, 10)).expect("parses");
        let after = parse(&exposition(5, 2, 1, 30)).expect("parses");
        let d = TlsSnapshot::from_samples(&after, Direction::Inbound)
            .since(&TlsSnapshot::from_samples(&before, Direction::Inbound));
        assert_eq!(
            d.mtls.into_iter().collect::<Vec<_>>(),
            vec![(WEB.into(), 2.0)]
        );
        assert_eq!(d.plain, 0.0);
        assert_eq!(
            d.handshake_errors.into_iter().collect::<Vec<_>>(),
            vec![("bad-certificate".into(), 1.0)]
        );
        // Nothing before: everything counts.
        let first =
            TlsSnapshot::from_samples(&after, Direction::Inbound).since(&TlsSnapshot::default());
        assert_eq!(first.mtls_total(), 6.0);
    }

    #[test]
    fn requests_are_grouped_by_client_identity() {
        let samples = parse(&exposition(1, 0, 0, 10)).expect("parses");
        let by = requests_by_client(&samples, Direction::Inbound);
        assert_eq!(
            by.into_iter().collect::<Vec<_>>(),
            vec![(String::new(), 2.0), (WEB.into(), 10.0)]
        );
        let out = requests_by_client(&samples, Direction::Outbound);
        assert_eq!(out.get(""), Some(&9.0));
    }

    #[test]
    fn cert_time_left_needs_an_issued_certificate() {
        let samples = parse(&exposition(0, 0, 0, 0)).expect("parses");
        assert_eq!(cert_seconds_left(&samples, 400.0), Some(600.0));
        let none = parse("weft_identity_cert_expiry_timestamp_seconds 0\n").expect("parses");
        assert_eq!(cert_seconds_left(&none, 400.0), None);
        assert_eq!(cert_seconds_left(&[], 400.0), None);
    }

    #[test]
    fn formats_time_left() {
        assert_eq!(format_time_left(86_399.5), "23h59m");
        assert_eq!(format_time_left(3600.0), "1h00m");
        assert_eq!(format_time_left(86_400.0 * 30.0 + 7200.0), "30d2h");
        assert_eq!(format_time_left(245.0), "4m05s");
        assert_eq!(format_time_left(59.9), "59s");
        assert_eq!(format_time_left(0.0), "expired");
        assert_eq!(format_time_left(-5.0), "expired");
        assert_eq!(format_time_left(f64::NAN), "expired");
    }
}

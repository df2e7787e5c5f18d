//! The live tables `weft demo` prints: golden metrics, one row per proxy and
//! direction; the client proxy's routes (success before and after retries,
//! retries, budget refusals, the split); and the mesh's security state. Pure
//! string rendering, so their exact shape is pinned by tests (the integration
//! test reads the same columns).

use std::collections::BTreeMap;
use std::fmt::Write as _;

use crate::routes::{short_backend, RouteWindow};
use crate::security::{format_time_left, TlsSnapshot};
use crate::stats::{Direction, WindowStats};

/// One line of the table.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    /// Which proxy: `client` or `server`.
    pub proxy: &'static str,
    pub direction: Direction,
    /// The numbers, or why there are none (the scrape failed).
    pub stats: Result<WindowStats, String>,
}

pub const HEADER: [&str; 7] = [
    "PROXY",
    "DIRECTION",
    "REQ/S",
    "SUCCESS",
    "P50",
    "P99",
    "TCP",
];

/// Render `rows` under a header line, columns aligned, each line ending in a
/// newline.
pub fn render(rows: &[Row]) -> String {
    let mut lines: Vec<Vec<String>> = vec![HEADER.iter().map(|h| (*h).to_string()).collect()];
    let mut errors = Vec::new();
    for row in rows {
        let mut cells = vec![row.proxy.to_string(), row.direction.as_str().to_string()];
        match &row.stats {
            Ok(s) => cells.extend([
                format!("{:.1}", s.requests_per_sec),
                percent(s.success_rate),
                s.p50.map_or_else(|| "-".into(), format_seconds),
                s.p99.map_or_else(|| "-".into(), format_seconds),
                s.tcp_open
                    .map_or_else(|| "-".into(), |n| format!("{}", n.round())),
            ]),
            Err(e) => {
                cells.extend(std::iter::repeat_n("?".to_string(), 5));
                errors.push(format!("{} proxy: {e}", row.proxy));
            }
        }
        lines.push(cells);
    }

    // Names left-aligned, numbers right-aligned.
    let mut out = align(&lines, |i| i < 2);
    errors.dedup();
    for e in errors {
        out.push_str("  ! ");
        out.push_str(&e);
        out.push('\n');
    }
    out
}

/// One line of the route table: a route rule on the client proxy.
#[derive(Debug, Clone, PartialEq)]
pub struct RouteRow {
    /// `httproute/<ns>/<name>/<rule>`.
    pub route: String,
    pub window: RouteWindow,
    /// What the rule's backends' server proxies answered (inbound, every attempt, retries
    /// included): the apps' own success rate. `None` when unknown.
    pub server_success: Option<f64>,
}

pub const ROUTE_HEADER: [&str; 7] = [
    "ROUTE", "REQ/S", "CLIENT", "SERVER", "RETRY/S", "REFUSED", "SPLIT",
];

/// Render the route rows under a header line: requests per second, success as the client got
/// it (after retries) and as the servers answered, retries per second, retries the budget
/// refused, and each backend's share of the requests. `None`: the client proxy's scrape
/// failed (the golden-metrics table says why).
pub fn render_routes(rows: Option<&[RouteRow]>) -> String {
    let rows = match rows {
        None => return "  ? (no scrape of the client proxy)\n".into(),
        Some([]) => return "  none: no request has matched a route yet\n".into(),
        Some(rows) => rows,
    };
    let mut lines: Vec<Vec<String>> = vec![ROUTE_HEADER.iter().map(|h| (*h).to_string()).collect()];
    for row in rows {
        let w = &row.window;
        let shares = w.shares();
        lines.push(vec![
            row.route.clone(),
            format!("{:.1}", w.requests_per_sec),
            percent(w.success_rate),
            percent(row.server_success),
            format!("{:.1}", w.retries_per_sec),
            format!("{}", w.budget_exhausted.round()),
            if shares.is_empty() {
                "-".into()
            } else {
                shares
                    .iter()
                    .map(|(backend, share)| {
                        format!("{} {:.0}%", short_backend(backend), share * 100.0)
                    })
                    .collect::<Vec<_>>()
                    .join(" ")
            },
        ]);
    }
    // Route and split left-aligned, numbers right-aligned.
    align(&lines, |i| i == 0 || i == ROUTE_HEADER.len() - 1)
}

fn percent(rate: Option<f64>) -> String {
    rate.map_or_else(|| "-".into(), |r| format!("{:.2}%", r * 100.0))
}

/// One line of the security table: a proxy's busy direction.
#[derive(Debug, Clone, PartialEq)]
pub struct SecurityRow {
    pub proxy: &'static str,
    pub direction: Direction,
    /// Connections and handshake failures since the demo started; `None` when the scrape
    /// failed (the golden-metrics table already says why).
    pub tls: Option<TlsSnapshot>,
    /// Seconds left on the proxy's certificate; `None` when it has none.
    pub cert_left: Option<f64>,
}

pub const SECURITY_HEADER: [&str; 6] = ["PROXY", "DIRECTION", "MTLS", "PLAIN", "CERT", "PEER"];

/// Render the security rows under a header line: connections with and without mTLS, the
/// proxy's certificate time left and the peers' identities, then a line per row whose TLS
/// handshakes failed.
pub fn render_security(rows: &[SecurityRow]) -> String {
    let mut lines: Vec<Vec<String>> =
        vec![SECURITY_HEADER.iter().map(|h| (*h).to_string()).collect()];
    let mut failures = Vec::new();
    for row in rows {
        let mut cells = vec![row.proxy.to_string(), row.direction.as_str().to_string()];
        match &row.tls {
            Some(tls) => {
                cells.push(format!("{}", tls.mtls_total().round()));
                cells.push(format!("{}", tls.plain.round()));
                let errors = tls.handshake_errors_total();
                if errors > 0.0 {
                    let reasons: Vec<String> = tls
                        .handshake_errors
                        .iter()
                        .map(|(reason, n)| format!("{reason} {}", n.round()))
                        .collect();
                    failures.push(format!(
                        "{} {}: {} TLS handshake failure(s): {}",
                        row.proxy,
                        row.direction.as_str(),
                        errors.round(),
                        reasons.join(", ")
                    ));
                }
            }
            None => cells.extend(["?".to_string(), "?".to_string()]),
        }
        cells.push(row.cert_left.map_or_else(|| "-".into(), format_time_left));
        cells.push(match row.tls.as_ref().map(|t| &t.mtls) {
            None => "?".into(),
            Some(peers) if peers.is_empty() => "-".into(),
            Some(peers) if peers.len() == 1 => peers.keys().cloned().collect(),
            Some(peers) => peers
                .iter()
                .map(|(id, n)| format!("{id} ({})", n.round()))
                .collect::<Vec<_>>()
                .join(", "),
        });
        lines.push(cells);
    }
    // Names and identities left-aligned, numbers right-aligned.
    let mut out = align(&lines, |i| i < 2 || i == SECURITY_HEADER.len() - 1);
    for f in failures {
        out.push_str("  ! ");
        out.push_str(&f);
        out.push('\n');
    }
    out
}

/// Requests by client identity (the inbound `client_id` label), as a phrase:
/// `250 from spiffe://cluster.local/ns/demo/sa/web, 3 without a client identity`.
pub fn render_clients(by_client: &BTreeMap<String, f64>) -> String {
    if by_client.is_empty() {
        return "none".into();
    }
    by_client
        .iter()
        .map(|(id, n)| {
            if id.is_empty() {
                format!("{n:.0} without a client identity")
            } else {
                format!("{n:.0} from {id}")
            }
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// Lay out `lines` in columns two spaces apart, each padded to its widest cell, left-aligned
/// where `left(column)` says so and right-aligned elsewhere; each line ends in a newline.
fn align(lines: &[Vec<String>], left: impl Fn(usize) -> bool) -> String {
    let mut widths: Vec<usize> = Vec::new();
    for line in lines {
        widths.resize(widths.len().max(line.len()), 0);
        for (w, cell) in widths.iter_mut().zip(line) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for line in lines {
        let mut text = String::new();
        for (i, (cell, &w)) in line.iter().zip(&widths).enumerate() {
            if i > 0 {
                text.push_str("  ");
            }
            if left(i) {
                let _ = write!(text, "{cell:<w$}");
            } else {
                let _ = write!(text, "{cell:>w$}");
            }
        }
        out.push_str(text.trim_end());
        out.push('\n');
    }
    out
}

/// A latency in seconds as milliseconds with sensible precision, or seconds
/// once it reaches one.
pub fn format_seconds(s: f64) -> String {
    let ms = s * 1000.0;
    if !ms.is_finite() {
        "-".into()
    } else if s >= 1.0 {
        format!("{s:.2}s")
    } else if ms < 10.0 {
        format!("{ms:.2}ms")
    } else if ms < 100.0 {
        format!("{ms:.1}ms")
    } else {
        format!("{ms:.0}ms")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats(rps: f64, success: Option<f64>, p50: Option<f64>, p99: Option<f64>) -> WindowStats {
        WindowStats {
            requests_per_sec: rps,
            success_rate: success,
            p50,
            p95: None,
            p99,
            tcp_open: Some(2.0),
            responses: 0.0,
        }
    }

    #[test]
    fn renders_aligned_rows() {
        let rows = [
            Row {
                proxy: "client",
                direction: Direction::Outbound,
                stats: Ok(stats(49.5, Some(0.99), Some(0.0031), Some(0.0472))),
            },
            Row {
                proxy: "client",
                direction: Direction::Inbound,
                stats: Ok(WindowStats {
                    tcp_open: None,
                    ..stats(0.0, None, None, None)
                }),
            },
            Row {
                proxy: "server",
                direction: Direction::Inbound,
                stats: Ok(stats(1234.25, Some(1.0), Some(0.25), Some(1.5))),
            },
        ];
        let want = "\
PROXY   DIRECTION   REQ/S  SUCCESS     P50     P99  TCP
client  outbound     49.5   99.00%  3.10ms  47.2ms    2
client  inbound       0.0        -       -       -    -
server  inbound    1234.2  100.00%   250ms   1.50s    2
";
        assert_eq!(render(&rows), want);
    }

    #[test]
    fn a_failed_scrape_shows_question_marks_and_the_reason() {
        let err = Err("GET http://127.0.0.1:1/metrics: connection refused".to_string());
        let rows = [
            Row {
                proxy: "server",
                direction: Direction::Inbound,
                stats: err.clone(),
            },
            Row {
                proxy: "server",
                direction: Direction::Outbound,
                stats: err,
            },
        ];
        let want = "\
PROXY   DIRECTION  REQ/S  SUCCESS  P50  P99  TCP
server  inbound        ?        ?    ?    ?    ?
server  outbound       ?        ?    ?    ?    ?
  ! server proxy: GET http://127.0.0.1:1/metrics: connection refused
";
        assert_eq!(render(&rows), want);
    }

    #[test]
    fn renders_security_rows_and_handshake_failures() {
        let web = "spiffe://cluster.local/ns/demo/sa/web";
        let books = "spiffe://cluster.local/ns/demo/sa/books";
        let rows = [
            SecurityRow {
                proxy: "client",
                direction: Direction::Outbound,
                tls: Some(TlsSnapshot {
                    mtls: [(books.to_string(), 2.0)].into(),
                    ..TlsSnapshot::default()
                }),
                cert_left: Some(86_340.0),
            },
            SecurityRow {
                proxy: "server",
                direction: Direction::Inbound,
                tls: Some(TlsSnapshot {
                    mtls: [
                        (web.to_string(), 12.0),
                        ("spiffe://td/ns/a/sa/b".into(), 1.0),
                    ]
                    .into(),
                    plain: 3.0,
                    handshake_errors: [("bad-certificate".to_string(), 1.0)].into(),
                }),
                cert_left: Some(59.0),
            },
            SecurityRow {
                proxy: "server",
                direction: Direction::Outbound,
                tls: Some(TlsSnapshot::default()),
                cert_left: None,
            },
            SecurityRow {
                proxy: "client",
                direction: Direction::Inbound,
                tls: None,
                cert_left: None,
            },
        ];
        let want = "\
PROXY   DIRECTION  MTLS  PLAIN    CERT  PEER
client  outbound      2      0  23h59m  spiffe://cluster.local/ns/demo/sa/books
server  inbound      13      3     59s  spiffe://cluster.local/ns/demo/sa/web (12), spiffe://td/ns/a/sa/b (1)
server  outbound      0      0       -  -
client  inbound       ?      ?       -  ?
  ! server inbound: 1 TLS handshake failure(s): bad-certificate 1
";
        assert_eq!(render_security(&rows), want);
    }

    #[test]
    fn renders_route_rows_with_the_split() {
        let books = "books.demo.svc.cluster.local:8080";
        let v2 = "books-v2.demo.svc.cluster.local:8080";
        let rows = [
            RouteRow {
                route: "httproute/demo/books/0".into(),
                window: RouteWindow {
                    requests: [(books.to_string(), 90.0), (v2.to_string(), 10.0)].into(),
                    requests_per_sec: 50.0,
                    success_rate: Some(1.0),
                    retries: [("status".to_string(), 1.0)].into(),
                    retries_per_sec: 0.5,
                    budget_exhausted: 0.0,
                },
                server_success: Some(0.9901),
            },
            RouteRow {
                route: "httproute/demo/idle/0".into(),
                window: RouteWindow {
                    requests: [(books.to_string(), 0.0)].into(),
                    ..RouteWindow::default()
                },
                server_success: None,
            },
        ];
        let want = "\
ROUTE                   REQ/S   CLIENT  SERVER  RETRY/S  REFUSED  SPLIT
httproute/demo/books/0   50.0  100.00%  99.01%      0.5        0  books 90% books-v2 10%
httproute/demo/idle/0     0.0        -       -      0.0        0  -
";
        assert_eq!(render_routes(Some(&rows)), want);
        assert!(want.lines().all(|l| l.len() <= 100));
        assert_eq!(
            render_routes(Some(&[])),
            "  none: no request has matched a route yet\n"
        );
        assert_eq!(render_routes(None), "  ? (no scrape of the client proxy)\n");
    }

    #[test]
    fn renders_requests_by_client_identity() {
        let web = "spiffe://cluster.local/ns/demo/sa/web";
        assert_eq!(render_clients(&BTreeMap::new()), "none");
        assert_eq!(
            render_clients(&[(web.to_string(), 250.0), (String::new(), 3.0)].into()),
            "3 without a client identity, 250 from spiffe://cluster.local/ns/demo/sa/web"
        );
    }

    #[test]
    fn formats_latencies() {
        assert_eq!(format_seconds(0.000_25), "0.25ms");
        assert_eq!(format_seconds(0.0123), "12.3ms");
        assert_eq!(format_seconds(0.5), "500ms");
        assert_eq!(format_seconds(2.0), "2.00s");
        assert_eq!(format_seconds(f64::INFINITY), "-");
    }
}

//! The live table `weft demo` prints: one row per proxy and direction. Pure
//! string rendering, so its exact shape is pinned by tests (the integration
//! test reads the same columns).

use std::fmt::Write as _;

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
                s.success_rate
                    .map_or_else(|| "-".into(), |r| format!("{:.2}%", r * 100.0)),
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

    let mut widths = [0usize; HEADER.len()];
    for line in &lines {
        for (w, cell) in widths.iter_mut().zip(line) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for line in &lines {
        let mut text = String::new();
        for (i, (cell, w)) in line.iter().zip(widths).enumerate() {
            if i > 0 {
                text.push_str("  ");
            }
            // Names left-aligned, numbers right-aligned.
            if i < 2 {
                let _ = write!(text, "{cell:<w$}");
            } else {
                let _ = write!(text, "{cell:>w$}");
            }
        }
        out.push_str(text.trim_end());
        out.push('\n');
    }
    errors.dedup();
    for e in errors {
        out.push_str("  ! ");
        out.push_str(&e);
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
    fn formats_latencies() {
        assert_eq!(format_seconds(0.000_25), "0.25ms");
        assert_eq!(format_seconds(0.0123), "12.3ms");
        assert_eq!(format_seconds(0.5), "500ms");
        assert_eq!(format_seconds(2.0), "2.00s");
        assert_eq!(format_seconds(f64::INFINITY), "-");
    }
}

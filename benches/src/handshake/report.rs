//! The figures and the RESULTS.md section of `weft-bench handshakes`. Pure: the caller measures
//! and writes the files.

use std::net::SocketAddr;
use std::time::Duration;

use serde::Serialize;

use super::client::HttpVersion;
use super::{Target, BENCH_CLIENT_SA};
use crate::load::stats::fmt_us;
use crate::report::{self, opt_f, Machine};
use crate::scenario::mesh;

/// Throughput and CPU figures of one measured window. Pure.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Figures {
    pub conns_per_s: f64,
    /// Proxy CPU over wall time (1.0 = one core).
    pub proxy_cpu_util: f64,
    pub proxy_cpu_us_per_conn: Option<f64>,
    /// Connections per second of proxy CPU: 1e6 / µs per connection.
    pub conns_per_proxy_core_s: Option<f64>,
}

pub fn figures(connections: u64, wall: Duration, proxy_cpu: Duration) -> Figures {
    let wall_s = wall.as_secs_f64();
    let cpu_s = proxy_cpu.as_secs_f64();
    let per_s = |n: f64, over: f64| if over > 0.0 { n / over } else { 0.0 };
    let n = connections as f64;
    Figures {
        conns_per_s: per_s(n, wall_s),
        proxy_cpu_util: per_s(cpu_s, wall_s),
        proxy_cpu_us_per_conn: (connections > 0).then(|| cpu_s * 1e6 / n),
        conns_per_proxy_core_s: (cpu_s > 0.0).then(|| n / cpu_s),
    }
}

/// `a / b` when both are there and `b` is positive.
pub fn ratio(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => Some(a / b),
        _ => None,
    }
}

/// Everything measured for one target.
#[derive(Debug, Clone, Serialize)]
pub struct TargetResult {
    pub target: Target,
    pub what: String,
    pub entry: Option<SocketAddr>,
    /// Connections completed in the measured window.
    pub connections: u64,
    pub errors: u64,
    pub error_samples: Vec<String>,
    pub elapsed_s: f64,
    pub figures: Option<Figures>,
    /// The bench server's CPU per connection (one forwarded request each).
    pub server_cpu_us_per_conn: Option<f64>,
    /// This generator's CPU over wall time: near 1.0 means it, not the proxy, was the limit.
    pub generator_cpu_util: Option<f64>,
    /// Whole-connection time (connect to close), p50 and p99, µs.
    pub conn_p50_us: u64,
    pub conn_p99_us: u64,
    pub proxy_rss_kib: u64,
    /// weft-mtls: inbound mTLS connections from the bench client the proxy counted, and
    /// the connections the generator completed, over warm-up and window together.
    pub proxy_counted: Option<(f64, u64)>,
    pub error: Option<String>,
}

impl TargetResult {
    pub(crate) fn new(target: Target, http: HttpVersion) -> Self {
        TargetResult {
            target,
            what: target.what(http),
            entry: None,
            connections: 0,
            errors: 0,
            error_samples: Vec::new(),
            elapsed_s: 0.0,
            figures: None,
            server_cpu_us_per_conn: None,
            generator_cpu_util: None,
            conn_p50_us: 0,
            conn_p99_us: 0,
            proxy_rss_kib: 0,
            proxy_counted: None,
            error: None,
        }
    }

    fn per_core(&self) -> Option<f64> {
        self.figures.and_then(|f| f.conns_per_proxy_core_s)
    }
}

/// The JSON document.
#[derive(Debug, Clone, Serialize)]
pub struct HandshakeReport {
    pub name: String,
    pub command: String,
    pub unix_time: u64,
    pub date_utc: String,
    pub machine: Machine,
    pub http: HttpVersion,
    pub concurrency: usize,
    pub duration_s: f64,
    pub warmup_s: f64,
    pub response_size: usize,
    pub pinned: Option<(usize, usize)>,
    pub results: Vec<TargetResult>,
}

fn find(results: &[TargetResult], t: Target) -> Option<&TargetResult> {
    results.iter().find(|r| r.target == t && r.error.is_none())
}

/// The RESULTS.md section.
pub fn markdown(r: &HandshakeReport) -> String {
    use std::fmt::Write as _;
    let mut md = String::new();
    // Writing to a String cannot fail.
    let _ = writeln!(md, "## mTLS handshakes: {}\n", r.name);
    // The machine always names a controller here, so the build command lists it.
    report::provenance(&mut md, &r.date_utc, &r.machine, &r.command);
    let http = match r.http {
        HttpVersion::Http1 => "HTTP/1.1 (`Connection: close`)",
        HttpVersion::Http2 => "HTTP/2",
    };
    let _ = writeln!(
        md,
        "Every connection is new: TCP connect, for TLS targets a full TLS 1.3 handshake (client \
         certificate `{}`, SNI `{}`, no session resumption), one GET over {http} with a {}-byte \
         response, close. {} connections at a time for {} s per target after a {} s warm-up. {} \
         Proxy CPU is utime+stime of the proxy process over the window; \"per core-second\" is \
         connections per second of that CPU. \"vs\" columns are ratios of connections per \
         core-second. Connections/s is bounded by whichever saturates first, the generator's CPU \
         (it does about as much public-key work per connection as the server) or the CPU the \
         proxy shares with the bench server; connections per proxy core-second does not depend \
         on which. See `benches/src/handshake/mod.rs` for the method.\n",
        mesh::spiffe_id(mesh::NAMESPACE, BENCH_CLIENT_SA),
        mesh::server_name(mesh::NAMESPACE, mesh::SERVER_SA),
        r.response_size,
        r.concurrency,
        r.duration_s,
        r.warmup_s,
        match r.pinned {
            Some((load, mesh)) => format!(
                "Generator pinned to CPU {load}; proxy, HAProxy, bench server and controller to CPU {mesh}."
            ),
            None => "Nothing pinned.".to_owned(),
        },
    );
    let _ = writeln!(
        md,
        "| target | what | connections/s | errors | proxy CPU % | proxy CPU µs/conn | conns per proxy core-second | vs weft-plain | vs haproxy-tls | conn time p50 | conn time p99 | generator CPU % |"
    );
    let _ = writeln!(
        md,
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    );
    let base = |t| find(&r.results, t).and_then(TargetResult::per_core);
    for x in &r.results {
        let Some(f) = x.figures.filter(|_| x.error.is_none()) else {
            let _ = writeln!(
                md,
                "| {} | {} | failed | | | | | | | | | |",
                x.target.name(),
                x.what
            );
            continue;
        };
        let vs = |t| {
            ratio(x.per_core(), base(t))
                .map(|v| format!("{v:.2}×"))
                .unwrap_or_else(|| "–".into())
        };
        let _ = writeln!(
            md,
            "| {} | {} | {:.0} | {} | {:.1} | {} | {} | {} | {} | {} | {} | {} |",
            x.target.name(),
            x.what,
            f.conns_per_s,
            x.errors,
            f.proxy_cpu_util * 100.0,
            opt_f(f.proxy_cpu_us_per_conn, 1),
            opt_f(f.conns_per_proxy_core_s, 0),
            vs(Target::WeftPlain),
            vs(Target::HaproxyTls),
            fmt_us(x.conn_p50_us),
            fmt_us(x.conn_p99_us),
            opt_f(x.generator_cpu_util.map(|u| u * 100.0), 1),
        );
    }
    let line = |md: &mut String, a: Target, b: Target| {
        if let (Some(x), Some(y)) = (find(&r.results, a), find(&r.results, b)) {
            if let (Some(fx), Some(fy)) = (x.figures, y.figures) {
                let _ = writeln!(
                    md,
                    "- {} vs {}: {} vs {} connections per proxy core-second ({}×); {} vs {} µs of proxy CPU per connection.",
                    a.name(),
                    b.name(),
                    opt_f(fx.conns_per_proxy_core_s, 0),
                    opt_f(fy.conns_per_proxy_core_s, 0),
                    opt_f(ratio(fx.conns_per_proxy_core_s, fy.conns_per_proxy_core_s), 2),
                    opt_f(fx.proxy_cpu_us_per_conn, 1),
                    opt_f(fy.proxy_cpu_us_per_conn, 1),
                );
            }
        }
    };
    let _ = writeln!(md);
    line(&mut md, Target::WeftMtls, Target::HaproxyTls);
    line(&mut md, Target::WeftMtls, Target::WeftPlain);
    line(&mut md, Target::HaproxyTls, Target::HaproxyPlain);
    line(&mut md, Target::WeftPlain, Target::HaproxyPlain);
    for x in &r.results {
        if let Some((counted, completed)) = x.proxy_counted {
            let _ = writeln!(
                md,
                "- {}: the proxy counted {counted} inbound mTLS connections from the bench client; the generator completed {completed} (warm-up and window).",
                x.target.name()
            );
        }
    }
    let failures: Vec<_> = r
        .results
        .iter()
        .filter(|x| x.error.is_some() || x.errors > 0)
        .collect();
    if !failures.is_empty() {
        let _ = writeln!(md, "\n### Failures and errors\n");
        for x in failures {
            if let Some(e) = &x.error {
                let _ = writeln!(md, "- {}: failed:\n\n```text\n{e}\n```\n", x.target.name());
            }
            for e in &x.error_samples {
                let _ = writeln!(md, "- {}: connection error: `{e}`", x.target.name());
            }
        }
    }
    md
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn figures_per_connection_and_per_core_second() {
        // 20 000 connections in 10 s with 4 s of proxy CPU: 200 µs each, 5 000 per core-second.
        let f = figures(20_000, Duration::from_secs(10), Duration::from_secs(4));
        assert!((f.conns_per_s - 2000.0).abs() < 1e-9);
        assert!((f.proxy_cpu_util - 0.4).abs() < 1e-9);
        assert!((f.proxy_cpu_us_per_conn.unwrap_or(0.0) - 200.0).abs() < 1e-9);
        assert!((f.conns_per_proxy_core_s.unwrap_or(0.0) - 5000.0).abs() < 1e-9);
        let none = figures(0, Duration::ZERO, Duration::ZERO);
        assert_eq!(none.conns_per_s, 0.0);
        assert_eq!(none.proxy_cpu_us_per_conn, None);
        assert_eq!(none.conns_per_proxy_core_s, None);
    }

    #[test]
    fn ratios_need_both_sides() {
        assert_eq!(ratio(Some(3.0), Some(4.0)), Some(0.75));
        assert_eq!(ratio(Some(3.0), Some(0.0)), None);
        assert_eq!(ratio(None, Some(4.0)), None);
        assert_eq!(ratio(Some(3.0), None), None);
    }

    fn result(target: Target, per_conn_us: f64, util: f64) -> TargetResult {
        let mut r = TargetResult::new(target, HttpVersion::Http1);
        r.connections = 10_000;
        r.figures = Some(Figures {
            conns_per_s: 1000.0,
            proxy_cpu_util: util,
            proxy_cpu_us_per_conn: Some(per_conn_us),
            conns_per_proxy_core_s: Some(1e6 / per_conn_us),
        });
        r.generator_cpu_util = Some(0.99);
        r
    }

    #[test]
    fn markdown_has_ratios_to_both_baselines() {
        let mut mtls = result(Target::WeftMtls, 250.0, 0.8);
        mtls.proxy_counted = Some((12_000.0, 12_000));
        let mut failed = TargetResult::new(Target::HaproxyPlain, HttpVersion::Http1);
        failed.error = Some("haproxy not found".into());
        let report = HandshakeReport {
            name: "handshakes-http1".into(),
            command: "weft-bench handshakes".into(),
            unix_time: 0,
            date_utc: report::utc_date(0),
            machine: Machine::fixture(Some("weft-controller")),
            http: HttpVersion::Http1,
            concurrency: 8,
            duration_s: 10.0,
            warmup_s: 2.0,
            response_size: 128,
            pinned: Some((0, 1)),
            results: vec![
                result(Target::WeftPlain, 50.0, 0.95),
                mtls,
                failed,
                result(Target::HaproxyTls, 200.0, 0.95),
            ],
        };
        let md = markdown(&report);
        assert!(
            md.starts_with("## mTLS handshakes: handshakes-http1\n"),
            "{md}"
        );
        assert!(
            md.contains("| weft-mtls | weft-proxy inbound, mTLS 1.3 + HTTP/1.1 | 1000 | 0 | 80.0 | 250.0 | 4000 | 0.20× | 0.80× |"),
            "{md}"
        );
        assert!(
            md.contains("| haproxy-plain | HAProxy, TCP + HTTP/1.1 | failed |"),
            "{md}"
        );
        assert!(
            md.contains("- weft-mtls vs haproxy-tls: 4000 vs 5000 connections per proxy core-second (0.80×); 250.0 vs 200.0 µs"),
            "{md}"
        );
        assert!(
            md.contains("the proxy counted 12000 inbound mTLS connections"),
            "{md}"
        );
        assert!(md.contains("- haproxy-plain: failed:"), "{md}");
        let json = serde_json::to_string(&report).expect("json");
        assert!(json.contains("\"target\":\"weft-mtls\""), "{json}");
        assert!(json.contains("\"http\":\"http1\""), "{json}");
    }
}

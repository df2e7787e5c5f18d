//! Turns scenario results into `RESULTS.md` (tables, target checks, the
//! exact command) and a JSON document. Pure: the caller writes the files.

use std::fmt::Write as _;

use serde::Serialize;

use crate::load::stats::fmt_us;
use crate::scenario::{mesh, RunConfig, ScenarioKind, ScenarioReport};

/// The machine a run was measured on.
#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    pub cpus: usize,
    pub cpu_model: String,
    pub kernel: String,
    pub haproxy: Option<String>,
    pub proxy_bin: String,
    /// When a scenario ran a controller (weft2-disc, weft2-mtls).
    pub controller_bin: Option<String>,
    /// Whether this generator was built with optimisations.
    pub release_build: bool,
}

impl Machine {
    pub fn detect(cfg: &RunConfig) -> Self {
        let haproxy = cfg
            .scenarios
            .contains(&ScenarioKind::Haproxy)
            .then_some(cfg.haproxy_bin.as_path());
        let controller = cfg
            .scenarios
            .iter()
            .any(|s| s.uses_controller())
            .then_some(cfg.controller_bin.as_path());
        Self::probe(&cfg.proxy_bin, controller, haproxy)
    }

    /// The machine, and the versions of the binaries a run used.
    pub fn probe(
        proxy_bin: &std::path::Path,
        controller_bin: Option<&std::path::Path>,
        haproxy_bin: Option<&std::path::Path>,
    ) -> Self {
        let cpu_model = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|t| {
                t.lines()
                    .find(|l| l.starts_with("model name"))
                    .and_then(|l| l.split_once(':'))
                    .map(|(_, v)| v.trim().to_owned())
            })
            .unwrap_or_else(|| "unknown".into());
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|s| s.trim().to_owned())
            .unwrap_or_default();
        Machine {
            cpus: crate::sys::affinity::online_cpus(),
            cpu_model,
            kernel,
            haproxy: haproxy_bin.and_then(crate::scenario::haproxy::version),
            proxy_bin: proxy_bin.display().to_string(),
            controller_bin: controller_bin.map(|p| p.display().to_string()),
            release_build: !cfg!(debug_assertions),
        }
    }

    /// A two-CPU release-build machine without HAProxy, for report tests.
    #[cfg(test)]
    pub(crate) fn fixture(controller_bin: Option<&str>) -> Self {
        Machine {
            cpus: 2,
            cpu_model: "test".into(),
            kernel: "6".into(),
            haproxy: None,
            proxy_bin: "weft-proxy".into(),
            controller_bin: controller_bin.map(str::to_owned),
            release_build: true,
        }
    }
}

/// The load of a run, for the JSON document.
#[derive(Debug, Clone, Serialize)]
pub struct LoadConfig {
    pub protocol: &'static str,
    pub rate: f64,
    pub connections: usize,
    pub streams: usize,
    pub duration_s: f64,
    pub warmup_s: f64,
    pub max_duration_s: f64,
    pub request_size: usize,
    pub response_size: usize,
    pub mesh_cpu: Option<usize>,
}

impl LoadConfig {
    pub fn from_run(cfg: &RunConfig) -> Self {
        LoadConfig {
            protocol: cfg.protocol.name(),
            rate: cfg.rate,
            connections: cfg.connections,
            streams: cfg.streams,
            duration_s: cfg.duration.as_secs_f64(),
            warmup_s: cfg.warmup.as_secs_f64(),
            max_duration_s: cfg.max_duration.as_secs_f64(),
            request_size: cfg.request_size,
            response_size: cfg.response_size,
            mesh_cpu: cfg.mesh_cpu,
        }
    }

    /// Whether this is the load the targets are defined for.
    fn is_reference(&self) -> bool {
        self.protocol == "http1"
            && (self.rate - 1000.0).abs() < f64::EPSILON
            && self.connections == 16
            && self.request_size == 1024
            && self.response_size == 1024
    }
}

/// Target verdicts. A miss is reported, never fatal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Verdict {
    #[serde(rename = "PASS")]
    Pass,
    #[serde(rename = "MISS")]
    Miss,
    /// A scenario it needs was not run or failed.
    #[serde(rename = "n/a")]
    NotMeasured,
}

impl Verdict {
    fn of(ok: bool) -> Self {
        if ok {
            Verdict::Pass
        } else {
            Verdict::Miss
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Verdict::Pass => "PASS",
            Verdict::Miss => "MISS",
            Verdict::NotMeasured => "n/a",
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub target: String,
    pub measured: String,
    pub verdict: Verdict,
}

/// The whole document.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub name: String,
    pub command: String,
    pub unix_time: u64,
    pub date_utc: String,
    pub machine: Machine,
    pub load: LoadConfig,
    pub scenarios: Vec<ScenarioReport>,
    pub checks: Vec<Check>,
}

const MIB: u64 = 1024;

fn find(reports: &[ScenarioReport], kind: ScenarioKind) -> Option<&ScenarioReport> {
    reports
        .iter()
        .find(|r| r.scenario == kind && r.error.is_none())
}

/// Mean CPU µs per request over the proxies of a scenario: per hop.
pub fn cpu_per_hop(report: &ScenarioReport, max_run: bool) -> Option<f64> {
    let values: Vec<f64> = report
        .processes
        .iter()
        .filter(|p| p.is_proxy())
        .filter_map(|p| {
            if max_run {
                p.cpu_us_per_req_max
            } else {
                p.cpu_us_per_req
            }
        })
        .collect();
    (!values.is_empty()).then(|| values.iter().sum::<f64>() / values.len() as f64)
}

/// Latency added over a baseline (direct, or another scenario), µs (negative when faster).
pub fn delta_us(report: &ScenarioReport, direct: &ScenarioReport) -> Option<(i64, i64)> {
    let (s, d) = (report.latency.as_ref()?, direct.latency.as_ref()?);
    Some((
        s.p50_us as i64 - d.p50_us as i64,
        s.p99_us as i64 - d.p99_us as i64,
    ))
}

fn fmt_delta(us: i64) -> String {
    format!(
        "{}{:.3} ms",
        if us < 0 { "−" } else { "+" },
        us.unsigned_abs() as f64 / 1000.0
    )
}

fn fmt_mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / MIB as f64)
}

/// The default targets, checked against whatever was measured.
pub fn checks(reports: &[ScenarioReport]) -> Vec<Check> {
    let direct = find(reports, ScenarioKind::Direct);
    let weft1 = find(reports, ScenarioKind::Weft1);
    let weft2 = find(reports, ScenarioKind::Weft2);
    let haproxy = find(reports, ScenarioKind::Haproxy);
    let mut out = Vec::new();
    let na = |target: &str| Check {
        target: target.into(),
        measured: "not measured".into(),
        verdict: Verdict::NotMeasured,
    };

    let delta = weft2.zip(direct).and_then(|(w, d)| delta_us(w, d));
    for (target, limit, pick) in [
        ("weft2 adds ≤ 0.100 ms at p50 over direct", 100, 0),
        ("weft2 adds ≤ 0.300 ms at p99 over direct", 300, 1),
    ] {
        out.push(match delta {
            Some(d) => {
                let v = if pick == 0 { d.0 } else { d.1 };
                Check {
                    target: target.into(),
                    measured: fmt_delta(v),
                    verdict: Verdict::of(v <= limit),
                }
            }
            None => na(target),
        });
    }

    let ha_cpu = haproxy.and_then(|h| cpu_per_hop(h, false));
    for (name, scenario) in [("weft1", weft1), ("weft2", weft2)] {
        let target = format!("{name} CPU per request per hop ≤ HAProxy's");
        out.push(
            match (scenario.and_then(|s| cpu_per_hop(s, false)), ha_cpu) {
                (Some(w), Some(h)) => Check {
                    target,
                    measured: format!("{w:.1} µs vs {h:.1} µs"),
                    verdict: Verdict::of(w <= h),
                },
                _ => na(&target),
            },
        );
    }

    let target = "weft1 max throughput ≥ HAProxy's";
    let max_rps = |r: Option<&ScenarioReport>| {
        r.and_then(|r| r.max_throughput.as_ref())
            .map(|m| m.achieved_rps)
    };
    out.push(match (max_rps(weft1), max_rps(haproxy)) {
        (Some(w), Some(h)) => Check {
            target: target.into(),
            measured: format!("{w:.0} req/s vs {h:.0} req/s"),
            verdict: Verdict::of(w >= h),
        },
        _ => na(target),
    });

    // Issue 4: mutual TLS between the proxies adds at most 0.1 ms at p50 over plaintext.
    let mtls = find(reports, ScenarioKind::Weft2Mtls);
    let target = "weft2-mtls adds ≤ 0.100 ms at p50 over weft2 (plaintext)";
    out.push(match mtls.zip(weft2).and_then(|(m, w)| delta_us(m, w)) {
        Some((d50, d99)) => Check {
            target: target.into(),
            measured: format!("{} (p99: {})", fmt_delta(d50), fmt_delta(d99)),
            verdict: Verdict::of(d50 <= 100),
        },
        None => na(target),
    });

    let weft_procs: Vec<_> = reports
        .iter()
        .filter(|r| r.scenario.is_weft() && r.error.is_none())
        .flat_map(|r| r.processes.iter().filter(|p| p.kind == "weft"))
        .collect();
    for (target, limit, idle) in [
        ("weft RSS ≤ 10 MiB idle", 10 * MIB, true),
        ("weft RSS ≤ 20 MiB under load", 20 * MIB, false),
    ] {
        let worst = weft_procs
            .iter()
            .map(|p| if idle { p.rss_idle_kib } else { p.rss_load_kib })
            .max();
        out.push(match worst {
            Some(kib) if kib > 0 => Check {
                target: target.into(),
                measured: format!("{} (largest proxy)", fmt_mib(kib)),
                verdict: Verdict::of(kib <= limit),
            },
            _ => na(target),
        });
    }
    out
}

/// Days since 1970-01-01 to a civil date (Howard Hinnant's algorithm).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// Seconds since the Unix epoch (0 for a time before it).
pub fn unix_secs(t: std::time::SystemTime) -> u64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// "2026-05-01 12:34 UTC".
pub fn utc_date(unix: u64) -> String {
    let days = (unix / 86_400) as i64;
    let secs = unix % 86_400;
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02} UTC",
        secs / 3600,
        secs % 3600 / 60
    )
}

/// The command line as a shell would take it back.
pub fn shell_command(args: &[String]) -> String {
    args.iter()
        .map(|a| {
            if !a.is_empty()
                && a.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_./=,:@".contains(c))
            {
                a.clone()
            } else {
                format!("'{}'", a.replace('\'', r"'\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// `v` with `digits` decimals, or "–".
pub fn opt_f(v: Option<f64>, digits: usize) -> String {
    v.map(|v| format!("{v:.digits$}"))
        .unwrap_or_else(|| "–".into())
}

/// The heading a results file starts with when [`splice`] creates it.
pub const RESULTS_HEADER: &str = "# Weft benchmark results\n\n\
Each section below is written by one `weft-bench run` (its command is in the section) and \
replaced by the next run with the same name; text outside the generated sections is kept.\n";

/// A run's markdown as a section of a results file: its headings one level down.
pub fn as_section(md: &str, title: &str) -> String {
    let mut out = String::with_capacity(md.len() + 64);
    for line in md.lines() {
        if let Some(rest) = line.strip_prefix("# Weft benchmark results") {
            out.push_str("## ");
            out.push_str(title);
            out.push_str(rest);
        } else if line.starts_with('#') {
            out.push('#');
            out.push_str(line);
        } else {
            out.push_str(line);
        }
        out.push('\n');
    }
    out
}

/// Replaces the section named `key` in `existing` (between its begin and end markers) with
/// `section`, or appends it; creates the file's header when `existing` is empty.
pub fn splice(existing: &str, key: &str, section: &str) -> String {
    let begin = format!("<!-- weft-bench:{key} begin -->");
    let end = format!("<!-- weft-bench:{key} end -->");
    let block = format!("{begin}\n{}\n{end}", section.trim_end());
    let mut base = if existing.trim().is_empty() {
        RESULTS_HEADER.to_string()
    } else {
        existing.to_string()
    };
    if let (Some(b), Some(e)) = (base.find(&begin), base.find(&end)) {
        if b < e {
            base.replace_range(b..e + end.len(), &block);
            return base;
        }
    }
    if !base.ends_with('\n') {
        base.push('\n');
    }
    base.push('\n');
    base.push_str(&block);
    base.push('\n');
    base
}

/// What a results section says under its heading: when and where it was measured, with
/// which reference proxy, whether the generator was a debug build, and the command.
pub fn provenance(md: &mut String, date_utc: &str, m: &Machine, command: &str) {
    // Writing to a String cannot fail.
    let _ = writeln!(
        md,
        "Measured {date_utc} on {} CPUs ({}, Linux {}).",
        m.cpus, m.cpu_model, m.kernel
    );
    if let Some(v) = &m.haproxy {
        let _ = writeln!(md, "Reference proxy: {v}.");
    }
    if !m.release_build {
        let _ = writeln!(
            md,
            "\n**The generator was a debug build: these figures are not comparable.**"
        );
    }
    let _ = writeln!(
        md,
        "\nCommand (after `cargo build --release -p weft-bench -p weft-proxy{}`):\n",
        if m.controller_bin.is_some() {
            " -p weft-controller"
        } else {
            ""
        }
    );
    let _ = writeln!(md, "```sh\n{command}\n```\n");
}

/// `RESULTS.md`.
pub fn markdown(report: &Report) -> String {
    let mut md = String::new();
    let l = &report.load;
    let m = &report.machine;
    // Writing to a String cannot fail.
    let _ = writeln!(md, "# Weft benchmark results\n");
    provenance(&mut md, &report.date_utc, m, &report.command);
    let streams = if l.protocol == "http1" {
        String::new()
    } else {
        format!(" × {} streams", l.streams)
    };
    let _ = writeln!(
        md,
        "Load: {}, open loop at {} req/s for {} s after a {} s warm-up, {} connections{streams}, \
         {}-byte request bodies, {}-byte responses. Max throughput: closed loop for {} s on the same \
         connections. Load generator pinned to CPU 0; bench server and proxies to CPU {}. \
         Latency counts from each request's intended send time (coordinated-omission corrected). \
         See README.md for what each column means.\n",
        l.protocol,
        l.rate,
        l.duration_s,
        l.warmup_s,
        l.connections,
        l.request_size,
        l.response_size,
        l.max_duration_s,
        l.mesh_cpu.map(|c| c.to_string()).unwrap_or_else(|| "(unpinned)".into()),
    );

    let direct = find(&report.scenarios, ScenarioKind::Direct);
    let _ = writeln!(md, "## Latency at {} req/s\n", l.rate);
    let _ = writeln!(md, "| scenario | proxies | achieved req/s | p50 | p90 | p99 | p99.9 | max | Δp50 vs direct | Δp99 vs direct | errors |");
    let _ = writeln!(
        md,
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    );
    for r in &report.scenarios {
        let Some(s) = &r.latency else {
            let _ = writeln!(
                md,
                "| {} | {} | failed | | | | | | | | |",
                r.scenario.name(),
                r.hops
            );
            continue;
        };
        let (d50, d99) = match direct.and_then(|d| delta_us(r, d)) {
            Some((a, b)) if r.scenario != ScenarioKind::Direct => (fmt_delta(a), fmt_delta(b)),
            _ => ("–".into(), "–".into()),
        };
        let _ = writeln!(
            md,
            "| {} | {} | {:.0} | {} | {} | {} | {} | {} | {d50} | {d99} | {} |",
            r.scenario.name(),
            r.hops,
            s.achieved_rps,
            fmt_us(s.p50_us),
            fmt_us(s.p90_us),
            fmt_us(s.p99_us),
            fmt_us(s.p999_us),
            fmt_us(s.max_us),
            s.errors
        );
    }
    if let Some(d) = direct {
        for r in report.scenarios.iter().filter(|r| r.hops > 0) {
            if let Some((a, b)) = delta_us(r, d) {
                let _ = writeln!(
                    md,
                    "\n{} ({} {}): {} at p50, {} at p99 over direct.",
                    r.scenario.name(),
                    r.hops,
                    if r.hops == 1 { "hop" } else { "hops" },
                    fmt_delta(a),
                    fmt_delta(b)
                );
            }
        }
    }
    mtls_section(&mut md, &report.scenarios);

    let _ = writeln!(md, "\n## Cost per process\n");
    let _ = writeln!(
        md,
        "| scenario | process | CPU µs/req at {} req/s | CPU % of a core | CPU µs/req at max | RSS idle | RSS under load | VmHWM | threads | CPUs | stop |",
        l.rate
    );
    let _ = writeln!(md, "|---|---|---:|---:|---:|---:|---:|---:|---:|---|---|");
    for r in &report.scenarios {
        for p in &r.processes {
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                r.scenario.name(),
                p.name,
                opt_f(p.cpu_us_per_req, 1),
                opt_f(p.cpu_util.map(|u| u * 100.0), 1),
                opt_f(p.cpu_us_per_req_max, 1),
                fmt_mib(p.rss_idle_kib),
                fmt_mib(p.rss_load_kib),
                fmt_mib(p.hwm_kib),
                p.threads,
                p.cpus_allowed,
                if p.kind == "server" {
                    "(shared)"
                } else {
                    p.stop.as_str()
                },
            );
        }
    }

    if report.scenarios.iter().any(|r| r.max_throughput.is_some()) {
        let _ = writeln!(
            md,
            "\n## Max throughput (closed loop; server and proxies share one core)\n"
        );
        let _ = writeln!(md, "| scenario | req/s | vs direct | p50 | p99 | errors |");
        let _ = writeln!(md, "|---|---:|---:|---:|---:|---:|");
        let direct_max = direct
            .and_then(|d| d.max_throughput.as_ref())
            .map(|m| m.achieved_rps);
        for r in &report.scenarios {
            if let Some(s) = &r.max_throughput {
                let ratio = direct_max
                    .filter(|&d| d > 0.0)
                    .map(|d| format!("{:.2}×", s.achieved_rps / d));
                let _ = writeln!(
                    md,
                    "| {} | {:.0} | {} | {} | {} | {} |",
                    r.scenario.name(),
                    s.achieved_rps,
                    ratio.unwrap_or_else(|| "–".into()),
                    fmt_us(s.p50_us),
                    fmt_us(s.p99_us),
                    s.errors
                );
            }
        }
    }

    let _ = writeln!(md, "\n## Targets\n");
    if !l.is_reference() {
        let _ = writeln!(
            md,
            "The targets are defined for HTTP/1.1 at 1000 req/s, 16 connections, 1 KiB bodies; this run used other settings.\n"
        );
    }
    for c in &report.checks {
        let _ = writeln!(
            md,
            "- **{}** {}: {}",
            c.verdict.label(),
            c.target,
            c.measured
        );
    }

    let failures: Vec<_> = report
        .scenarios
        .iter()
        .filter(|r| r.error.is_some() || has_errors(r))
        .collect();
    if !failures.is_empty() {
        let _ = writeln!(md, "\n## Failures and errors\n");
        for r in failures {
            if let Some(e) = &r.error {
                let _ = writeln!(
                    md,
                    "- {}: scenario failed:\n\n```text\n{e}\n```\n",
                    r.scenario.name()
                );
            }
            for s in [&r.latency, &r.max_throughput].into_iter().flatten() {
                for e in &s.error_samples {
                    let _ = writeln!(md, "- {}: request error: `{e}`", r.scenario.name());
                }
            }
        }
    }
    md
}

/// "Mutual TLS": weft2-mtls against the plaintext two-hop scenarios of the same run, and
/// what the proxies' counters say about its connections.
fn mtls_section(md: &mut String, reports: &[ScenarioReport]) {
    let Some(mtls) = find(reports, ScenarioKind::Weft2Mtls) else {
        return;
    };
    let _ = writeln!(md, "\n### Mutual TLS between the proxies\n");
    let _ = writeln!(
        md,
        "| weft2-mtls vs | Δp50 | Δp99 | CPU µs/req per hop | CPU µs/req per hop at max | max req/s |"
    );
    let _ = writeln!(md, "|---|---:|---:|---:|---:|---:|");
    let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => format!("{a:.1} vs {b:.1} ({:.2}×)", a / b),
        _ => "–".into(),
    };
    let max_rps = |r: &ScenarioReport| r.max_throughput.as_ref().map(|m| m.achieved_rps);
    for base in [ScenarioKind::Weft2, ScenarioKind::Weft2Disc] {
        let Some(b) = find(reports, base) else {
            continue;
        };
        let Some((d50, d99)) = delta_us(mtls, b) else {
            continue;
        };
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} |",
            base.name(),
            fmt_delta(d50),
            fmt_delta(d99),
            ratio(cpu_per_hop(mtls, false), cpu_per_hop(b, false)),
            ratio(cpu_per_hop(mtls, true), cpu_per_hop(b, true)),
            match (max_rps(mtls), max_rps(b)) {
                (Some(m), Some(b)) if b > 0.0 => format!("{m:.0} vs {b:.0} ({:.2}×)", m / b),
                _ => "–".into(),
            },
        );
    }
    if let Some(c) = &mtls.mesh {
        let _ = writeln!(
            md,
            "\nProxy counters after all runs ({} requests): proxy A opened {} mTLS connection(s) \
             to `{}`, proxy B accepted {} from `{}`; {} requests were routed through discovery.",
            c.requests,
            c.tls_outbound,
            mesh::spiffe_id(mesh::NAMESPACE, mesh::SERVER_SA),
            c.tls_inbound,
            mesh::spiffe_id(mesh::NAMESPACE, mesh::CLIENT_SA),
            c.routed_by_discovery,
        );
    }
}

fn has_errors(r: &ScenarioReport) -> bool {
    [&r.latency, &r.max_throughput]
        .into_iter()
        .flatten()
        .any(|s| s.errors > 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::load::Summary;
    use crate::scenario::ProcessReport;

    #[test]
    fn splice_creates_appends_and_replaces_sections_keeping_other_text() {
        let one = splice("", "http1-a", "## Proxy hops\nfirst\n");
        assert!(one.starts_with("# Weft benchmark results"));
        assert!(one.contains("first"));
        let mut with_notes = splice(&one, "grpc-a", "## Proxy hops\ngrpc\n");
        with_notes.push_str("\n## Analysis\nhand-written\n");
        let replaced = splice(&with_notes, "http1-a", "## Proxy hops\nsecond\n");
        assert!(!replaced.contains("first"));
        assert!(replaced.contains("second"));
        assert!(replaced.contains("grpc"));
        assert!(replaced.contains("hand-written"));
        assert_eq!(replaced.matches("weft-bench:http1-a begin").count(), 1);
        // The replaced section stays where it was: before the grpc one.
        assert!(replaced.find("second") < replaced.find("grpc"));
    }

    #[test]
    fn sections_have_their_headings_one_level_down() {
        let s = as_section(
            "# Weft benchmark results\n\ntext\n## Latency\n",
            "Hops, http1",
        );
        assert_eq!(s, "## Hops, http1\n\ntext\n### Latency\n");
    }

    fn summary(p50: u64, p99: u64, rps: f64) -> Summary {
        Summary {
            requests: 1000,
            errors: 0,
            elapsed_s: 1.0,
            achieved_rps: rps,
            p50_us: p50,
            p90_us: p50,
            p99_us: p99,
            p999_us: p99,
            max_us: p99,
            mean_us: p50 as f64,
            lag_p50_us: 0,
            lag_p99_us: 0,
            error_samples: vec![],
        }
    }

    fn proxy(kind: &'static str, cpu: f64, idle: u64, load: u64) -> ProcessReport {
        ProcessReport {
            name: kind.into(),
            kind,
            cpu_us_per_req: Some(cpu),
            rss_idle_kib: idle,
            rss_load_kib: load,
            ..Default::default()
        }
    }

    fn scenario(
        kind: ScenarioKind,
        p50: u64,
        p99: u64,
        max: f64,
        procs: Vec<ProcessReport>,
    ) -> ScenarioReport {
        ScenarioReport {
            scenario: kind,
            hops: kind.hops(),
            entry: None,
            slots: 16,
            latency: Some(summary(p50, p99, 1000.0)),
            max_throughput: Some(summary(p50, p99, max)),
            processes: procs,
            mesh: None,
            error: None,
        }
    }

    fn sample() -> Vec<ScenarioReport> {
        vec![
            scenario(
                ScenarioKind::Direct,
                100,
                300,
                30_000.0,
                vec![proxy("server", 10.0, 2000, 3000)],
            ),
            scenario(
                ScenarioKind::Weft1,
                140,
                450,
                20_000.0,
                vec![proxy("weft", 20.0, 4000, 6000)],
            ),
            scenario(
                ScenarioKind::Weft2,
                180,
                700,
                15_000.0,
                vec![
                    proxy("weft", 24.0, 4000, 6000),
                    proxy("weft", 20.0, 4000, 25_000),
                ],
            ),
            scenario(
                ScenarioKind::Haproxy,
                130,
                400,
                22_000.0,
                vec![proxy("haproxy", 21.0, 9000, 9000)],
            ),
        ]
    }

    #[test]
    fn checks_against_the_targets() {
        let checks = checks(&sample());
        let verdicts: Vec<_> = checks
            .iter()
            .map(|c| (c.target.as_str(), c.verdict))
            .collect();
        assert_eq!(
            verdicts,
            vec![
                ("weft2 adds ≤ 0.100 ms at p50 over direct", Verdict::Pass),
                ("weft2 adds ≤ 0.300 ms at p99 over direct", Verdict::Miss),
                ("weft1 CPU per request per hop ≤ HAProxy's", Verdict::Pass),
                ("weft2 CPU per request per hop ≤ HAProxy's", Verdict::Miss),
                ("weft1 max throughput ≥ HAProxy's", Verdict::Miss),
                (
                    "weft2-mtls adds ≤ 0.100 ms at p50 over weft2 (plaintext)",
                    Verdict::NotMeasured
                ),
                ("weft RSS ≤ 10 MiB idle", Verdict::Pass),
                ("weft RSS ≤ 20 MiB under load", Verdict::Miss),
            ]
        );
        assert_eq!(checks[0].measured, "+0.080 ms");
        assert_eq!(checks[3].measured, "22.0 µs vs 21.0 µs");
    }

    #[test]
    fn missing_scenarios_are_not_measured() {
        let only_direct = vec![sample().remove(0)];
        assert!(checks(&only_direct)
            .iter()
            .all(|c| c.verdict == Verdict::NotMeasured));
        let mut failed = sample();
        failed[3].error = Some("haproxy not found".into());
        let c = checks(&failed);
        assert_eq!(c[2].verdict, Verdict::NotMeasured);
        assert_eq!(c[0].verdict, Verdict::Pass);
    }

    fn with_mtls() -> Vec<ScenarioReport> {
        let mut all = sample();
        let mut disc = scenario(
            ScenarioKind::Weft2Disc,
            200,
            800,
            14_000.0,
            vec![
                proxy("weft", 25.0, 4000, 6000),
                proxy("weft", 21.0, 4000, 6000),
            ],
        );
        disc.processes.push(proxy("controller", 1.0, 9000, 9000));
        let mut mtls = scenario(
            ScenarioKind::Weft2Mtls,
            250,
            1000,
            12_000.0,
            vec![
                proxy("weft", 33.0, 5000, 7000),
                proxy("weft", 27.0, 5000, 7000),
            ],
        );
        mtls.mesh = Some(crate::scenario::MeshCheck {
            requests: 20_000,
            routed_by_discovery: 20_000.0,
            tls_outbound: 1.0,
            tls_inbound: 1.0,
            tls_any: 2.0,
        });
        all.push(disc);
        all.push(mtls);
        all
    }

    #[test]
    fn mtls_is_checked_against_plaintext_weft2() {
        let reports = with_mtls();
        let c = checks(&reports);
        let m = c
            .iter()
            .find(|c| c.target.starts_with("weft2-mtls"))
            .expect("mtls check");
        // 0.250 − 0.180 ms at p50; 1.000 − 0.700 ms at p99.
        assert_eq!(m.measured, "+0.070 ms (p99: +0.300 ms)");
        assert_eq!(m.verdict, Verdict::Pass);
        // The controller is not a proxy: it is in neither the CPU nor the RSS figures.
        assert_eq!(cpu_per_hop(&reports[5], false), Some(30.0));
        let mut slower = reports;
        slower[5].latency = Some(summary(281, 1000, 1000.0));
        let c = checks(&slower);
        assert!(c
            .iter()
            .any(|c| c.target.starts_with("weft2-mtls") && c.verdict == Verdict::Miss));
    }

    #[test]
    fn dates_and_commands() {
        assert_eq!(utc_date(0), "1970-01-01 00:00 UTC");
        assert_eq!(utc_date(1_709_210_096), "2024-02-29 12:34 UTC");
        assert_eq!(
            shell_command(&[
                "weft-bench".into(),
                "run".into(),
                "--scenarios".into(),
                "direct,weft1".into()
            ]),
            "weft-bench run --scenarios direct,weft1"
        );
        assert_eq!(
            shell_command(&["a b".into(), "it's".into()]),
            r"'a b' 'it'\''s'"
        );
    }

    #[test]
    fn markdown_has_the_tables() {
        let scenarios = sample();
        let report = Report {
            name: "http1-all".into(),
            command: "weft-bench run".into(),
            unix_time: 0,
            date_utc: utc_date(0),
            machine: Machine::fixture(None),
            load: LoadConfig {
                protocol: "http1",
                rate: 1000.0,
                connections: 16,
                streams: 1,
                duration_s: 15.0,
                warmup_s: 2.0,
                max_duration_s: 10.0,
                request_size: 1024,
                response_size: 1024,
                mesh_cpu: Some(1),
            },
            checks: checks(&scenarios),
            scenarios,
        };
        let md = markdown(&report);
        assert!(md.contains("| weft2 | 2 | 1000 | 0.180 ms |"), "{md}");
        assert!(md.contains("| +0.080 ms | +0.400 ms |"), "{md}");
        assert!(
            md.contains("weft2 (2 hops): +0.080 ms at p50, +0.400 ms at p99 over direct."),
            "{md}"
        );
        assert!(
            md.contains("- **MISS** weft2 adds ≤ 0.300 ms at p99 over direct: +0.400 ms"),
            "{md}"
        );
        assert!(md.contains("| weft1 | 20000 | 0.67× |"), "{md}");
        assert!(!md.contains("targets are defined for"), "{md}");
        let json = serde_json::to_string(&report).expect("json");
        assert!(json.contains("\"verdict\":\"MISS\""));
        assert!(!md.contains("Mutual TLS"), "{md}");

        let mut report = report;
        report.scenarios = with_mtls();
        report.machine.controller_bin = Some("weft-controller".into());
        let md = markdown(&report);
        assert!(md.contains("-p weft-proxy -p weft-controller`"), "{md}");
        assert!(md.contains("### Mutual TLS between the proxies"), "{md}");
        assert!(
            md.contains("| weft2 | +0.070 ms | +0.300 ms | 30.0 vs 22.0 (1.36×) |"),
            "{md}"
        );
        assert!(
            md.contains("| weft2-disc | +0.050 ms | +0.200 ms |"),
            "{md}"
        );
        assert!(md.contains("proxy A opened 1 mTLS connection(s)"), "{md}");
        let json = serde_json::to_string(&report).expect("json");
        assert!(json.contains("\"scenario\":\"weft2-mtls\""), "{json}");
    }
}

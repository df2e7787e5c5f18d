//! `weft-bench routing-cost` (issue 12, target c): what an HTTPRoute of ten rules with
//! retries configured (none firing) costs a proxy hop, against the same two-hop path routed
//! by name with no route.
//!
//! Proxy A resolves Services `noroute` (no HTTPRoute: the path today's `weft2-disc` measures)
//! and `routed` (an HTTPRoute of ten rules, every rule with `retry: {codes: [503], attempts:
//! 2}`, the load's `/` requests taking the last in Gateway API precedence after nine that do
//! not match: five longer path prefixes, four header matches); both have one endpoint, proxy
//! B's inbound port, which forwards to a healthy server. `direct` (the load straight to the
//! server) is the reference the latency deltas are taken from, as in the `run` report.
//!
//! The CPU figure is proxy A's utime+stime over the window per request: the hop that routes.
//! Clock ticks are 10 ms, so over a 15 s window at 1,000 req/s one tick is 0.7 µs/req. The
//! ratio is taken per round (both windows of a round are neighbours in time), and the
//! median of the per-round ratios is the verdict.

use std::fmt::Write as _;

use serde::Serialize;

use super::report::{heading, mark, ms, show, spread, Meta, Spread};
use super::{load, manifests, order, prepare, window, Harness, PolicyArgs, Settings};
use crate::scenario::{mesh, prom};

pub const BASELINE: &str = "noroute";
pub const SUBJECT: &str = "routed";
/// The same ten rules without retry: splits the subject's cost between matching and the
/// retry machinery (budget deposit, the replayable body).
pub const NO_RETRY: &str = "routed-noretry";
pub const DIRECT: &str = "direct";
pub const ROUTE_REQUESTS: &str = "weft_route_requests_total";
pub const RETRIES: &str = "weft_route_retries_total";

#[derive(Debug, Clone, Serialize)]
pub struct Run {
    pub round: usize,
    pub path: &'static str,
    pub requests: u64,
    pub errors: u64,
    pub p50_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    /// Proxy A (client side) and B (server side), CPU µs per request; `None` for direct.
    pub a_cpu_us_per_req: Option<f64>,
    pub b_cpu_us_per_req: Option<f64>,
    /// Subject: the route label that counted the most requests, and how many.
    pub route: Option<(String, f64)>,
    /// Subject: route retries in the window (must be 0: none fire).
    pub retries: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct PathFigures {
    pub p50_us: Option<Spread>,
    pub p99_us: Option<Spread>,
    pub a_cpu_us_per_req: Option<Spread>,
    pub b_cpu_us_per_req: Option<Spread>,
}

fn figures(runs: &[Run], path: &str) -> PathFigures {
    let of = |f: &dyn Fn(&Run) -> Option<f64>| {
        spread(
            &runs
                .iter()
                .filter(|r| r.path == path)
                .filter_map(f)
                .collect::<Vec<_>>(),
        )
    };
    PathFigures {
        p50_us: of(&|r| Some(r.p50_us as f64)),
        p99_us: of(&|r| Some(r.p99_us as f64)),
        a_cpu_us_per_req: of(&|r| r.a_cpu_us_per_req),
        b_cpu_us_per_req: of(&|r| r.b_cpu_us_per_req),
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub meta: Meta,
    pub runs: Vec<Run>,
    pub direct: PathFigures,
    pub baseline: PathFigures,
    pub subject: PathFigures,
    pub no_retry: PathFigures,
    /// Per round: A's CPU per request routed ÷ no route.
    pub cpu_ratio: Option<Spread>,
    /// Per round: the same for the ten rules without retry.
    pub no_retry_cpu_ratio: Option<Spread>,
    pub cpu_ok: bool,
    /// Routed minus no-route medians, and the no-route runs' own range (max − min).
    pub p50_diff_us: Option<f64>,
    pub p99_diff_us: Option<f64>,
    pub p50_noise_us: Option<f64>,
    pub p99_noise_us: Option<f64>,
    pub latency_ok: bool,
}

pub fn report(meta: Meta, runs: Vec<Run>) -> Report {
    let rounds = runs.iter().map(|r| r.round).max().map_or(0, |m| m + 1);
    let ratios = |subject: &str| -> Vec<f64> {
        (0..rounds)
            .filter_map(|round| {
                let cpu = |path: &str| {
                    runs.iter()
                        .find(|r| r.round == round && r.path == path)
                        .and_then(|r| r.a_cpu_us_per_req)
                };
                match (cpu(subject), cpu(BASELINE)) {
                    (Some(s), Some(b)) if b > 0.0 => Some(s / b),
                    _ => None,
                }
            })
            .collect()
    };
    let cpu_ratio = spread(&ratios(SUBJECT));
    let no_retry_cpu_ratio = spread(&ratios(NO_RETRY));
    let no_retry = figures(&runs, NO_RETRY);
    let (direct, baseline, subject) = (
        figures(&runs, DIRECT),
        figures(&runs, BASELINE),
        figures(&runs, SUBJECT),
    );
    let diff = |a: Option<Spread>, b: Option<Spread>| Some(a?.median - b?.median);
    let noise = |b: Option<Spread>| b.map(|b| b.max - b.min);
    let p50_diff_us = diff(subject.p50_us, baseline.p50_us);
    let p99_diff_us = diff(subject.p99_us, baseline.p99_us);
    let p50_noise_us = noise(baseline.p50_us);
    let p99_noise_us = noise(baseline.p99_us);
    let within = |d: Option<f64>, n: Option<f64>| matches!((d, n), (Some(d), Some(n)) if d <= n);
    Report {
        meta,
        cpu_ok: cpu_ratio.is_some_and(|r| r.median <= 1.10),
        latency_ok: within(p50_diff_us, p50_noise_us) && within(p99_diff_us, p99_noise_us),
        runs,
        direct,
        baseline,
        subject,
        no_retry,
        cpu_ratio,
        no_retry_cpu_ratio,
        p50_diff_us,
        p99_diff_us,
        p50_noise_us,
        p99_noise_us,
    }
}

fn yaml(b_inbound: std::net::SocketAddr) -> String {
    manifests::join(&[
        mesh::service_manifests(BASELINE, "10.96.0.81", &[b_inbound]),
        mesh::service_manifests(SUBJECT, "10.96.0.82", &[b_inbound]),
        mesh::service_manifests(NO_RETRY, "10.96.0.83", &[b_inbound]),
        manifests::http_route(SUBJECT, &manifests::ten_rules(Some(manifests::RETRY_503))),
        manifests::http_route(NO_RETRY, &manifests::ten_rules(None)),
    ])
}

/// The route label with the largest growth of [`ROUTE_REQUESTS`] between two scrapes.
fn busiest_route(before: &[prom::Sample], after: &[prom::Sample]) -> Option<(String, f64)> {
    let label = |s: &prom::Sample| {
        s.labels
            .iter()
            .find(|(k, _)| k == "route")
            .map(|(_, v)| v.clone())
    };
    after
        .iter()
        .filter(|s| s.name == ROUTE_REQUESTS)
        .filter_map(|s| {
            let route = label(s)?;
            let was: f64 = before
                .iter()
                .filter(|b| b.name == ROUTE_REQUESTS && b.labels == s.labels)
                .map(|b| b.value)
                .sum();
            Some((route, s.value - was))
        })
        .max_by(|a, b| a.1.total_cmp(&b.1))
}

async fn measure(s: &Settings) -> anyhow::Result<Vec<Run>> {
    let mut h = Harness::start(s, &[0], true, |_, b| {
        yaml(b.unwrap_or_else(|| std::net::SocketAddr::from(([127, 0, 0, 1], 9))))
    })
    .await?;
    let result = async {
        let server = h.endpoints[0].addr;
        let mut loads = [
            load(s, server, server.to_string()).await?,
            h.load_to(s, BASELINE).await?,
            h.load_to(s, SUBJECT).await?,
            h.load_to(s, NO_RETRY).await?,
        ];
        let mut runs = Vec::new();
        for round in 0..s.rounds {
            for i in order(&[0usize, 1, 2, 3], round) {
                let path = [DIRECT, BASELINE, SUBJECT, NO_RETRY][i];
                let w = window(s, &h, &mut loads[i], || {}).await?;
                let summary = w.stats.summary();
                let proxied = i > 0;
                let run = Run {
                    round,
                    path,
                    requests: summary.requests,
                    errors: summary.errors,
                    p50_us: summary.p50_us,
                    p99_us: summary.p99_us,
                    p999_us: summary.p999_us,
                    a_cpu_us_per_req: proxied.then(|| w.cpu_us_per_req[0]),
                    b_cpu_us_per_req: proxied.then(|| w.cpu_us_per_req.get(1).copied()).flatten(),
                    route: (path == SUBJECT || path == NO_RETRY)
                        .then(|| busiest_route(&w.before, &w.after))
                        .flatten(),
                    retries: w.delta(RETRIES),
                };
                tracing::info!(
                    round,
                    path,
                    "p50 {} p99 {}, proxy A {:?} µs/req, errors {}",
                    ms(run.p50_us as f64),
                    ms(run.p99_us as f64),
                    run.a_cpu_us_per_req,
                    run.errors
                );
                runs.push(run);
                h.ensure_running()?;
            }
        }
        anyhow::Ok(runs)
    }
    .await;
    h.stop(result.is_err()).await;
    result
}

pub fn execute(args: PolicyArgs) -> anyhow::Result<()> {
    let s = prepare(&args)?;
    let started = std::time::SystemTime::now();
    let runs = crate::cli::current_thread_runtime()?.block_on(measure(&s))?;
    let r = report(Meta::now(&s, started), runs);
    super::write(
        &args,
        "policy-routing-cost",
        &r,
        &markdown(&r, "policy-routing-cost"),
    )
}

fn us(v: f64) -> String {
    format!("{v:.1}")
}

fn signed_ms(us: f64) -> String {
    let sign = if us < 0.0 { "−" } else { "+" };
    format!("{sign}{:.3} ms", us.abs() / 1000.0)
}

pub fn markdown(r: &Report, name: &str) -> String {
    let mut md = String::new();
    heading(
        &mut md,
        &format!("(c) The cost of routing: {name}"),
        &r.meta,
    );
    let _ = writeln!(
        md,
        "Two hops, as `weft2-disc`: load → weft-proxy A (outbound, routing by name through \
         the controller) → weft-proxy B (inbound) → server. `{BASELINE}`: Service without \
         HTTPRoute. `{SUBJECT}`: an HTTPRoute of ten rules, each with `retry: {{codes: [503], \
         attempts: 2}}`; the load's `/` takes the last (after five longer path prefixes and \
         four header matches). `{NO_RETRY}`: the same ten rules without retry (how the \
         subject's cost splits between matching and retries). `{DIRECT}`: the load straight \
         to the server. CPU: proxy A's \
         utime+stime per request over the window (±0.7 µs/req from the 10 ms clock tick on a \
         15 s window).\n"
    );
    let _ = writeln!(
        md,
        "| path | p50 | p99 | Δp50 vs direct | Δp99 vs direct | proxy A CPU µs/req | proxy B CPU µs/req |\n|---|---:|---:|---:|---:|---:|---:|"
    );
    for (path, f) in [
        (DIRECT, &r.direct),
        (BASELINE, &r.baseline),
        (SUBJECT, &r.subject),
        (NO_RETRY, &r.no_retry),
    ] {
        let delta = |a: Option<Spread>, d: Option<Spread>| match (a, d) {
            (Some(a), Some(d)) if path != DIRECT => signed_ms(a.median - d.median),
            _ => "–".to_owned(),
        };
        let _ = writeln!(
            md,
            "| {path} | {} | {} | {} | {} | {} | {} |",
            show(f.p50_us, ms),
            show(f.p99_us, ms),
            delta(f.p50_us, r.direct.p50_us),
            delta(f.p99_us, r.direct.p99_us),
            show(f.a_cpu_us_per_req, us),
            show(f.b_cpu_us_per_req, us),
        );
    }
    let _ = writeln!(
        md,
        "\n<details><summary>Every window</summary>\n\n| round | path | requests | errors | p50 | p99 | p99.9 | A µs/req | B µs/req | route counted | route retries |\n|---:|---|---:|---:|---:|---:|---:|---:|---:|---|---:|"
    );
    for run in &r.runs {
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            run.round + 1,
            run.path,
            run.requests,
            run.errors,
            ms(run.p50_us as f64),
            ms(run.p99_us as f64),
            ms(run.p999_us as f64),
            run.a_cpu_us_per_req.map_or_else(|| "–".into(), us),
            run.b_cpu_us_per_req.map_or_else(|| "–".into(), us),
            run.route
                .as_ref()
                .map_or_else(|| "–".into(), |(l, n)| format!("`{l}` ×{n}")),
            run.retries,
        );
    }
    let _ = writeln!(md, "\n</details>\n");
    let opt = |v: Option<f64>| v.map_or_else(|| "–".to_owned(), signed_ms);
    let _ = writeln!(
        md,
        "- **{}** proxy A CPU per request, routed ÷ no route ≤ 1.10: {} (per-round ratios; \
         ten rules without retry: {})\n\
         - **{}** two-hop latency with the route no worse than without (routed − no-route \
         medians within the no-route runs' own range): p50 {} (range {}), p99 {} (range {})",
        mark(r.cpu_ok),
        show(r.cpu_ratio, |v| format!("{v:.3}×")),
        show(r.no_retry_cpu_ratio, |v| format!("{v:.3}×")),
        mark(r.latency_ok),
        opt(r.p50_diff_us),
        opt(r.p50_noise_us),
        opt(r.p99_diff_us),
        opt(r.p99_noise_us),
    );
    md
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(round: usize, path: &'static str, p50: u64, p99: u64, cpu: Option<f64>) -> Run {
        Run {
            round,
            path,
            requests: 15000,
            errors: 0,
            p50_us: p50,
            p99_us: p99,
            p999_us: p99 * 2,
            a_cpu_us_per_req: cpu,
            b_cpu_us_per_req: cpu.map(|c| c / 2.0),
            route: None,
            retries: 0.0,
        }
    }

    #[test]
    fn ratio_per_round_and_latency_within_noise() {
        let meta = Meta {
            command: "weft-bench routing-cost".into(),
            date_utc: "today".into(),
            machine: crate::report::Machine::fixture(Some("c")),
            settings: crate::policy::PolicyArgs::test_settings(),
        };
        let runs = vec![
            run(0, DIRECT, 200, 900, None),
            run(0, BASELINE, 350, 1000, Some(40.0)),
            run(0, SUBJECT, 360, 1100, Some(42.0)),
            run(1, DIRECT, 210, 950, None),
            run(1, BASELINE, 380, 1300, Some(50.0)),
            run(1, SUBJECT, 370, 1200, Some(60.0)),
            run(1, NO_RETRY, 370, 1200, Some(55.0)),
        ];
        let r = report(meta, runs);
        // Ratios 1.05 and 1.2: median 1.125.
        assert!((r.cpu_ratio.expect("ratio").median - 1.125).abs() < 1e-9);
        assert!(!r.cpu_ok);
        assert_eq!(r.no_retry_cpu_ratio.map(|x| x.median), Some(1.1));
        assert_eq!(r.p50_diff_us, Some(0.0));
        assert_eq!(r.p99_noise_us, Some(300.0));
        assert!(r.latency_ok);
        let md = markdown(&r, "policy-routing-cost");
        assert!(md.contains("| noroute | 0.365 ms (0.350 ms–0.380 ms) |"));
        assert!(md.contains("**FAIL** proxy A CPU per request"));
    }

    #[test]
    fn busiest_route_is_the_largest_growth() {
        let before = prom::parse(
            "weft_route_requests_total{route=\"a\",backend=\"x\"} 5\nweft_route_requests_total{route=\"b\",backend=\"x\"} 100\n",
        );
        let after = prom::parse(
            "weft_route_requests_total{route=\"a\",backend=\"x\"} 50\nweft_route_requests_total{route=\"b\",backend=\"x\"} 110\nweft_route_requests_total{route=\"c\",backend=\"x\"} 7\n",
        );
        assert_eq!(busiest_route(&before, &after), Some(("a".into(), 45.0)));
    }
}

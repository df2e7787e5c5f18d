//! `weft-bench ejection` (issue 12, target b): one of three endpoints hard-failing, through
//! one proxy, against three healthy endpoints.
//!
//! Service `healthy` (three healthy servers) is the baseline. Each round has its own Service
//! `eject-<round>` with three fresh servers, so that no breaker state (an ejection backing
//! off to 60 s) carries from one round to the next. Every Service has an HTTPRoute with one
//! rule and no retry (what the breaker does alone, not hidden by retries) and a BackendPolicy
//! with the default breaker (7 consecutive failures eject for 1 s, doubling up to 60 s).
//!
//! The subject's third server answers 503 to every request from the first request of the
//! measured window on (warm-up is healthy). Meanwhile proxy A's `/metrics` is polled every
//! 50 ms: the time from the window's start to the first scrape with
//! `weft_outbound_ejections_total` above its value before the window is the time to
//! ejection (so it is late by up to one poll and one scrape). Client-seen success is then
//! counted over the requests intended after that instant (the load's [`Timeline`]); the
//! failing server's counter says how many requests reached it after the ejection (probes
//! after each ejection time, and anything in flight).
//!
//! [`Timeline`]: crate::load::stats::Timeline

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use tokio::time::Instant;

use super::report::{heading, mark, ms, pct, ratio, show, spread, Meta, Spread};
use super::{manifests, order, prepare, window, Endpoint, Harness, PolicyArgs, Settings};
use crate::scenario::{mesh, prom, scrape};

pub const BASELINE: &str = "healthy";
pub const EJECTIONS: &str = "weft_outbound_ejections_total";
const POLL: Duration = Duration::from_millis(50);

/// Service of round `round` (0-based).
pub fn subject(round: usize) -> String {
    format!("eject-{}", round + 1)
}

/// One measured window.
#[derive(Debug, Clone, Serialize)]
pub struct Run {
    pub round: usize,
    pub service: String,
    pub client_requests: u64,
    pub ok: u64,
    /// Over the whole window.
    pub success: f64,
    /// Subject: from the window's start to the scrape that first showed an ejection.
    pub time_to_ejection_ms: Option<f64>,
    /// Subject: from the window's start to the failing server's last request before that
    /// scrape (the failure that ejected it), ±5 ms.
    pub last_failure_ms: Option<f64>,
    /// Subject: requests intended after that instant, and how many of them succeeded.
    pub after_requests: u64,
    pub after_ok: u64,
    pub success_after: Option<f64>,
    /// Subject: 503s the failing server gave before the ejection was seen, and requests it
    /// got after.
    pub failing_before: u64,
    pub failing_after: u64,
    /// Ejections counted in the window (the first, then re-ejections of failed probes).
    pub ejections: f64,
    pub p50_us: u64,
    pub p99_us: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub meta: Meta,
    pub runs: Vec<Run>,
    pub baseline_success: Option<Spread>,
    pub time_to_ejection_ms: Option<Spread>,
    pub success_after: Option<Spread>,
    /// Rounds in which no ejection was seen within the window.
    pub not_ejected: usize,
    pub ejected_ok: bool,
    pub success_ok: bool,
}

pub fn report(meta: Meta, runs: Vec<Run>) -> Report {
    let subject: Vec<&Run> = runs.iter().filter(|r| r.service != BASELINE).collect();
    let not_ejected = subject
        .iter()
        .filter(|r| r.time_to_ejection_ms.is_none())
        .count();
    let collect = |f: &dyn Fn(&Run) -> Option<f64>| {
        spread(&subject.iter().filter_map(|r| f(r)).collect::<Vec<_>>())
    };
    let time_to_ejection_ms = collect(&|r| r.time_to_ejection_ms);
    let success_after = collect(&|r| r.success_after);
    let baseline_success = spread(
        &runs
            .iter()
            .filter(|r| r.service == BASELINE)
            .map(|r| r.success)
            .collect::<Vec<_>>(),
    );
    Report {
        meta,
        ejected_ok: not_ejected == 0 && time_to_ejection_ms.is_some_and(|t| t.median <= 1000.0),
        success_ok: not_ejected == 0 && success_after.is_some_and(|s| s.median >= 0.999),
        runs,
        baseline_success,
        time_to_ejection_ms,
        success_after,
        not_ejected,
    }
}

fn yaml(servers: &[std::net::SocketAddr], rounds: usize) -> String {
    let mut docs = Vec::new();
    let services = std::iter::once(BASELINE.to_owned()).chain((0..rounds).map(subject));
    for (i, (service, eps)) in services.zip(servers.chunks(3)).enumerate() {
        docs.push(mesh::service_manifests(
            &service,
            &format!("10.96.0.{}", 70 + i),
            eps,
        ));
        docs.push(manifests::http_route(
            &service,
            &manifests::single_rule(None),
        ));
        docs.push(manifests::default_backend_policy(&service));
    }
    manifests::join(&docs)
}

/// What the poller saw.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Seen {
    /// When a scrape first showed the ejection.
    at: Duration,
    /// The failing server's request count then.
    failing: u64,
    /// When that count was first reached (checked every [`TICK`]): when the failure that
    /// ejected it happened, give or take a tick.
    last_failure: Duration,
}

/// How often the poller looks at the failing server's counter.
const TICK: Duration = Duration::from_millis(5);

/// Scrapes `admin` every [`POLL`] until `EJECTIONS` exceeds `base` or `limit` passes,
/// watching the failing server's counter every [`TICK`] meanwhile.
async fn poll_ejection(
    admin: std::net::SocketAddr,
    base: f64,
    started: Instant,
    limit: Duration,
    failing: Arc<std::sync::atomic::AtomicU64>,
) -> Option<Seen> {
    let count = || failing.load(std::sync::atomic::Ordering::Relaxed);
    let (mut last, mut changed) = (count(), Duration::ZERO);
    let mut next_scrape = started;
    while started.elapsed() < limit {
        let now = count();
        if now != last {
            (last, changed) = (now, started.elapsed());
        }
        if Instant::now() >= next_scrape {
            next_scrape += POLL;
            if let Ok(samples) = scrape(admin).await {
                if prom::sum(&samples, EJECTIONS, &[]) > base {
                    let at = started.elapsed();
                    let now = count();
                    if now != last {
                        (last, changed) = (now, at);
                    }
                    return Some(Seen {
                        at,
                        failing: last,
                        last_failure: changed,
                    });
                }
            }
        }
        tokio::time::sleep(TICK).await;
    }
    None
}

async fn measure(s: &Settings) -> anyhow::Result<Vec<Run>> {
    let faults = vec![0; 3 * (s.rounds + 1)];
    let rounds = s.rounds;
    let mut h = Harness::start(s, &faults, false, |servers, _| yaml(servers, rounds)).await?;
    let result = async {
        let mut baseline = h.load_to(s, BASELINE).await?;
        let mut runs = Vec::new();
        for round in 0..s.rounds {
            for is_subject in order(&[false, true], round) {
                let run = if is_subject {
                    subject_window(s, &h, round).await?
                } else {
                    let w = window(s, &h, &mut baseline, || {}).await?;
                    let summary = w.stats.summary();
                    Run {
                        round,
                        service: BASELINE.to_owned(),
                        client_requests: w.client_requests(),
                        ok: w.stats.ok,
                        success: w.success(),
                        time_to_ejection_ms: None,
                        last_failure_ms: None,
                        after_requests: 0,
                        after_ok: 0,
                        success_after: None,
                        failing_before: 0,
                        failing_after: 0,
                        ejections: w.delta(EJECTIONS),
                        p50_us: summary.p50_us,
                        p99_us: summary.p99_us,
                    }
                };
                tracing::info!(
                    round,
                    service = run.service,
                    "success {} (after ejection {}), ejected after {:?} ms",
                    pct(run.success),
                    run.success_after.map_or_else(|| "–".into(), pct),
                    run.time_to_ejection_ms
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

async fn subject_window(s: &Settings, h: &Harness, round: usize) -> anyhow::Result<Run> {
    let service = subject(round);
    let eps: Vec<Endpoint> = h.endpoints[3 * (round + 1)..3 * (round + 2)].to_vec();
    let failing = eps[2].clone();
    let mut load = h.load_to(s, &service).await?;
    let base = prom::sum(&h.client_metrics().await?, EJECTIONS, &[]);
    let mut poller = None;
    let mut failing_at_start = 0;
    let w = window(s, h, &mut load, || {
        failing_at_start = failing.requests();
        failing.fault.set_every(1);
        poller = Some(tokio::spawn(poll_ejection(
            h.client.admin,
            base,
            Instant::now(),
            s.duration(),
            failing.requests.clone(),
        )));
    })
    .await;
    failing.fault.set_every(0);
    let w = w?;
    let seen = match poller {
        Some(p) => p.await.ok().flatten(),
        None => None,
    };
    let failing_end = failing_at_start + w.backend[3 * (round + 1) + 2];
    let (after_ok, after_err) = seen.map_or((0, 0), |t| w.stats.timeline.from(t.at));
    let summary = w.stats.summary();
    Ok(Run {
        round,
        service,
        client_requests: w.client_requests(),
        ok: w.stats.ok,
        success: w.success(),
        time_to_ejection_ms: seen.map(|t| t.at.as_secs_f64() * 1e3),
        last_failure_ms: seen.map(|t| t.last_failure.as_secs_f64() * 1e3),
        after_requests: after_ok + after_err,
        after_ok,
        success_after: seen.map(|_| ratio(after_ok, after_ok + after_err)),
        failing_before: seen.map_or(0, |t| t.failing - failing_at_start),
        failing_after: seen.map_or(0, |t| failing_end.saturating_sub(t.failing)),
        ejections: w.delta(EJECTIONS),
        p50_us: summary.p50_us,
        p99_us: summary.p99_us,
    })
}

pub fn execute(args: PolicyArgs) -> anyhow::Result<()> {
    let s = prepare(&args)?;
    let started = std::time::SystemTime::now();
    let runs = crate::cli::current_thread_runtime()?.block_on(measure(&s))?;
    let r = report(Meta::now(&s, started), runs);
    super::write(
        &args,
        "policy-ejection",
        &r,
        &markdown(&r, "policy-ejection"),
    )
}

pub fn markdown(r: &Report, name: &str) -> String {
    let mut md = String::new();
    heading(
        &mut md,
        &format!("(b) Ejecting a hard-failing endpoint: {name}"),
        &r.meta,
    );
    let _ = writeln!(
        md,
        "One weft-proxy resolving by name; every Service has three bench servers, an HTTPRoute \
         of one rule without retry and a BackendPolicy with the default breaker (7 consecutive \
         failures eject for 1 s, doubling to 60 s). Baseline `{BASELINE}`: three healthy \
         servers. Subject `eject-<round>` (fresh servers and breaker state each round): the \
         third server answers 503 to every request from the first request of the measured \
         window. Time to ejection: window start to the first scrape of proxy A's `/metrics` \
         (polled every 50 ms) with `{EJECTIONS}` ≥ 1 more than before; \"last 503 before \
         it\": when the failing server's counter (watched every 5 ms) last moved before that \
         scrape, i.e. when the ejecting failure happened. Success after ejection: the requests \
         intended after the scrape.\n"
    );
    let _ = writeln!(
        md,
        "| figure | value |\n|---|---:|\n\
         | baseline success (three healthy endpoints, whole window) | {} |\n\
         | time to ejection | {} |\n\
         | success after ejection | {} |\n\
         | rounds without an ejection in the window | {} |",
        show(r.baseline_success, pct),
        show(r.time_to_ejection_ms, |v| format!("{v:.0} ms")),
        show(r.success_after, |v| format!("{:.3} %", 100.0 * v)),
        r.not_ejected,
    );
    let _ = writeln!(
        md,
        "\n| round | service | requests | success (window) | ejected after | last 503 before it at | 503s before | requests after ejection | success after | failing server's requests after | ejections in window | p50 | p99 |\n|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    );
    for run in &r.runs {
        let subject = run.service != BASELINE;
        let dash = || "–".to_owned();
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            run.round + 1,
            run.service,
            run.client_requests,
            pct(run.success),
            run.time_to_ejection_ms
                .map_or_else(dash, |t| format!("{t:.0} ms")),
            run.last_failure_ms
                .map_or_else(dash, |t| format!("{t:.0} ms")),
            if subject {
                run.failing_before.to_string()
            } else {
                dash()
            },
            if subject {
                run.after_requests.to_string()
            } else {
                dash()
            },
            run.success_after
                .map_or_else(dash, |v| format!("{:.3} %", 100.0 * v)),
            if subject {
                run.failing_after.to_string()
            } else {
                dash()
            },
            run.ejections,
            ms(run.p50_us as f64),
            ms(run.p99_us as f64),
        );
    }
    let _ = writeln!(
        md,
        "\n- **{}** the failing endpoint is ejected within 1 s: {}\n\
         - **{}** client-seen success after the ejection ≥ 99.9 %: {} (baseline: {})",
        mark(r.ejected_ok),
        show(r.time_to_ejection_ms, |v| format!("{v:.0} ms")),
        mark(r.success_ok),
        show(r.success_after, |v| format!("{:.3} %", 100.0 * v)),
        show(r.baseline_success, |v| format!("{:.3} %", 100.0 * v)),
    );
    md
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(service: &str, ejected: Option<f64>, after: Option<f64>) -> Run {
        Run {
            round: 0,
            service: service.to_owned(),
            client_requests: 15000,
            ok: 14990,
            success: 0.9993,
            time_to_ejection_ms: ejected,
            last_failure_ms: ejected.map(|t| t - 40.0),
            after_requests: 14900,
            after_ok: 14899,
            success_after: after,
            failing_before: 7,
            failing_after: 3,
            ejections: 3.0,
            p50_us: 300,
            p99_us: 900,
        }
    }

    fn meta() -> Meta {
        Meta {
            command: "weft-bench ejection".into(),
            date_utc: "today".into(),
            machine: crate::report::Machine::fixture(Some("c")),
            settings: crate::policy::PolicyArgs::test_settings(),
        }
    }

    #[test]
    fn verdicts() {
        let r = report(
            meta(),
            vec![
                run(BASELINE, None, None),
                run("eject-1", Some(60.0), Some(0.9995)),
                run("eject-2", Some(110.0), Some(0.9990)),
                run("eject-3", Some(1500.0), Some(0.9999)),
            ],
        );
        assert_eq!(r.time_to_ejection_ms.map(|t| t.median), Some(110.0));
        assert!(r.ejected_ok && r.success_ok);
        let md = markdown(&r, "policy-ejection");
        assert!(md.contains(
            "**PASS** the failing endpoint is ejected within 1 s: 110 ms (60 ms–1500 ms)"
        ));
        // A round that never ejected fails the targets.
        let r = report(meta(), vec![run("eject-1", None, None)]);
        assert_eq!(r.not_ejected, 1);
        assert!(!r.ejected_ok && !r.success_ok);
    }

    #[test]
    fn each_round_has_its_own_service() {
        let eps: Vec<std::net::SocketAddr> = (0..9)
            .map(|i| std::net::SocketAddr::from(([127, 0, 0, 1], 2000 + i)))
            .collect();
        let y = yaml(&eps, 2);
        assert!(y.contains("name: healthy-2002"));
        assert!(y.contains("name: eject-1-2005"));
        assert!(y.contains("name: eject-2-2008"));
        assert_eq!(y.matches("kind: HTTPRoute").count(), 3);
        assert!(!y.contains("retry:"));
    }
}

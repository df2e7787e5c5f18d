//! `weft-bench tracing-cost` (issue 15): what distributed tracing costs the proxies, in CPU
//! per request, against tracing off, in one invocation.
//!
//! ```text
//! load ──▶ weft-proxy A (outbound) ──▶ weft-proxy B (inbound) ──▶ server     × 3 pairs
//!   off      no WEFT_PROXY_TRACE_COLLECTOR_ADDR
//!   default  collector set, sampling 0 (the default): requests carry no traceparent, so
//!            nothing is sampled: the price of reading the headers and deciding
//!   full     collector set, WEFT_PROXY_TRACE_SAMPLING=1: every request is a CLIENT span on A
//!            and a SERVER span on B, exported over OTLP/gRPC
//! ```
//!
//! The collector is an OTLP/gRPC sink in this process (opentelemetry-proto's TraceService,
//! answering every export at once and counting spans) on its own thread, pinned with the
//! proxies. Each round measures the three pairs one after the other (ABC, then CBA); the
//! CPU figure is A's plus B's utime+stime over the window per request, and the verdict is
//! the median of the per-round ratios against `off`.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use serde::Serialize;

use crate::policy::report::{heading, ms, show, spread, Meta, Spread};
use crate::policy::{load, order, prepare, PolicyArgs, Settings};
use crate::scenario::process::{wait_ready, Child};
use crate::scenario::weft::{self, FixedTargets, ProxyAddrs};
use crate::scenario::{free_addrs, prom, scrape};
use crate::server::{spawn_thread, ServeOptions};
use crate::sys::procfs;

pub const OFF: &str = "off";
pub const DEFAULT: &str = "default";
pub const FULL: &str = "full";
const PATHS: [&str; 3] = [OFF, DEFAULT, FULL];
const SPANS: &str = "weft_trace_spans_total";

#[derive(Debug, Clone, Serialize)]
pub struct Run {
    pub round: usize,
    pub path: &'static str,
    pub requests: u64,
    pub errors: u64,
    pub p50_us: u64,
    pub p99_us: u64,
    /// Proxy A and B, CPU µs per request.
    pub a_cpu_us_per_req: f64,
    pub b_cpu_us_per_req: f64,
    /// Spans the collector received in the window.
    pub spans_received: u64,
    /// Spans A and B dropped or failed to export in the window.
    pub spans_lost: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct PathFigures {
    pub p50_us: Option<Spread>,
    pub p99_us: Option<Spread>,
    pub cpu_us_per_req: Option<Spread>,
    /// Per round: A+B CPU per request ÷ off.
    pub cpu_ratio: Option<Spread>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub meta: Meta,
    pub runs: Vec<Run>,
    pub off: PathFigures,
    pub default: PathFigures,
    pub full: PathFigures,
}

fn cpu(r: &Run) -> f64 {
    r.a_cpu_us_per_req + r.b_cpu_us_per_req
}

fn figures(runs: &[Run], path: &str) -> PathFigures {
    let of = |f: &dyn Fn(&Run) -> f64| {
        spread(
            &runs
                .iter()
                .filter(|r| r.path == path)
                .map(f)
                .collect::<Vec<_>>(),
        )
    };
    let rounds = runs.iter().map(|r| r.round).max().map_or(0, |m| m + 1);
    let ratios: Vec<f64> = (0..rounds)
        .filter_map(|round| {
            let at = |p: &str| runs.iter().find(|r| r.round == round && r.path == p);
            match (at(path), at(OFF)) {
                (Some(s), Some(b)) if cpu(b) > 0.0 => Some(cpu(s) / cpu(b)),
                _ => None,
            }
        })
        .collect();
    PathFigures {
        p50_us: of(&|r| r.p50_us as f64),
        p99_us: of(&|r| r.p99_us as f64),
        cpu_us_per_req: of(&cpu),
        cpu_ratio: spread(&ratios),
    }
}

pub fn report(meta: Meta, runs: Vec<Run>) -> Report {
    Report {
        meta,
        off: figures(&runs, OFF),
        default: figures(&runs, DEFAULT),
        full: figures(&runs, FULL),
        runs,
    }
}

/// The sink: answers every export, counts spans.
#[derive(Debug, Clone, Default)]
struct Sink(Arc<AtomicU64>);

#[tonic::async_trait]
impl TraceService for Sink {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let n: usize = request
            .into_inner()
            .resource_spans
            .iter()
            .flat_map(|r| &r.scope_spans)
            .map(|s| s.spans.len())
            .sum();
        self.0.fetch_add(n as u64, Ordering::Relaxed);
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

/// Starts the sink on its own thread (pinned to `cpu`); returns its address and counter.
fn start_sink(cpu: Option<usize>) -> anyhow::Result<(SocketAddr, Arc<AtomicU64>)> {
    let listener = std::net::TcpListener::bind(("127.0.0.1", 0))?;
    listener.set_nonblocking(true)?;
    let addr = listener.local_addr()?;
    let sink = Sink::default();
    let count = sink.0.clone();
    std::thread::Builder::new()
        .name("otlp-sink".into())
        .spawn(move || {
            if let Some(c) = cpu {
                if let Err(e) = crate::sys::affinity::pin_current_thread(c) {
                    tracing::warn!(error = %e, "pinning the OTLP sink");
                }
            }
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => return tracing::error!(error = %e, "OTLP sink runtime"),
            };
            rt.block_on(async move {
                let listener = match tokio::net::TcpListener::from_std(listener) {
                    Ok(l) => l,
                    Err(e) => return tracing::error!(error = %e, "OTLP sink listener"),
                };
                let served = tonic::transport::Server::builder()
                    .add_service(TraceServiceServer::new(sink))
                    .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener))
                    .await;
                if let Err(e) = served {
                    tracing::error!(error = %e, "OTLP sink stopped");
                }
            });
        })
        .context("starting the OTLP sink thread")?;
    Ok((addr, count))
}

struct Pair {
    a: ProxyAddrs,
    /// Admin ports of A and B.
    admins: [SocketAddr; 2],
    /// pids of A and B.
    pids: [u32; 2],
}

/// Spans A and B dropped or failed to export so far.
async fn lost(pair: &Pair) -> anyhow::Result<f64> {
    let mut n = 0.0;
    for admin in pair.admins {
        let m = scrape(admin).await?;
        n += prom::sum(&m, SPANS, &[("result", "dropped")])
            + prom::sum(&m, SPANS, &[("result", "failed")]);
    }
    Ok(n)
}

async fn measure(s: &Settings) -> anyhow::Result<Vec<Run>> {
    let server = spawn_thread(
        vec![ServeOptions {
            response_size: s.response_size,
            ..Default::default()
        }],
        s.mesh_cpu,
    )?[0];
    let (collector, received) = start_sink(s.mesh_cpu)?;
    let dir = crate::scenario::temp_dir()?;
    let mut children = Vec::new();
    let mut pairs = Vec::new();
    let started = async {
        for path in PATHS {
            let ports = free_addrs(6)?;
            let a = ProxyAddrs {
                outbound: ports[0],
                inbound: ports[1],
                admin: ports[2],
            };
            let b = ProxyAddrs {
                outbound: ports[3],
                inbound: ports[4],
                admin: ports[5],
            };
            let mut pids = [0; 2];
            for (i, (addrs, targets)) in [
                (
                    b,
                    FixedTargets {
                        outbound: None,
                        inbound: Some(server),
                    },
                ),
                (
                    a,
                    FixedTargets {
                        outbound: Some(b.inbound),
                        inbound: None,
                    },
                ),
            ]
            .into_iter()
            .enumerate()
            {
                let mut env = weft::proxy_env(&addrs, &targets);
                match path {
                    OFF => {}
                    DEFAULT => env.push(("WEFT_PROXY_TRACE_COLLECTOR_ADDR", collector.to_string())),
                    _ => {
                        env.push(("WEFT_PROXY_TRACE_COLLECTOR_ADDR", collector.to_string()));
                        env.push(("WEFT_PROXY_TRACE_SAMPLING", "1".into()));
                    }
                }
                let name = format!("weft-proxy {} ({path})", ["B", "A"][i]);
                let mut child = Child::spawn(
                    &name,
                    weft::command(&s.proxy_bin, &env),
                    s.mesh_cpu,
                    &dir.join(format!("{path}-{i}.log")),
                )?;
                wait_ready(&mut child, addrs.admin, "/ready", Duration::from_secs(10)).await?;
                // pids: A first, then B.
                pids[1 - i] = child.pid();
                children.push(child);
            }
            pairs.push(Pair {
                a,
                admins: [a.admin, b.admin],
                pids,
            });
        }
        anyhow::Ok(())
    }
    .await;
    let result = async {
        started?;
        let mut runs = Vec::new();
        for round in 0..s.rounds {
            for i in order(&[0usize, 1, 2], round) {
                let (path, pair) = (PATHS[i], &pairs[i]);
                // Fresh connections per window: idle ones would meet the proxy's protocol
                // detection timeout (10 s) while the other pairs are measured and go opaque.
                let mut gen =
                    load(s, pair.a.outbound, "bench.svc.cluster.local:8080".into()).await?;
                if !s.warmup().is_zero() {
                    gen.run(s.pacing(), s.warmup()).await?;
                }
                // Spans of the warm-up still in the proxies' queues land within a second.
                tokio::time::sleep(Duration::from_millis(1200)).await;
                let lost_before = lost(pair).await?;
                let received_before = received.load(Ordering::Relaxed);
                let cpu_before = pair
                    .pids
                    .iter()
                    .map(|&p| procfs::read_cpu(p))
                    .collect::<anyhow::Result<Vec<_>>>()?;
                let stats = gen.run(s.pacing(), s.duration()).await?;
                let cpu_after = pair
                    .pids
                    .iter()
                    .map(|&p| procfs::read_cpu(p))
                    .collect::<anyhow::Result<Vec<_>>>()?;
                tokio::time::sleep(Duration::from_millis(1200)).await;
                let hz = procfs::ticks_per_sec();
                let requests = (stats.ok + stats.errors).max(1);
                let per_req: Vec<f64> = cpu_before
                    .iter()
                    .zip(&cpu_after)
                    .map(|(b, a)| a.since(*b, hz).as_secs_f64() * 1e6 / requests as f64)
                    .collect();
                let summary = stats.summary();
                let run = Run {
                    round,
                    path,
                    requests: summary.requests,
                    errors: summary.errors,
                    p50_us: summary.p50_us,
                    p99_us: summary.p99_us,
                    a_cpu_us_per_req: per_req[0],
                    b_cpu_us_per_req: per_req[1],
                    spans_received: received.load(Ordering::Relaxed) - received_before,
                    spans_lost: lost(pair).await? - lost_before,
                };
                tracing::info!(
                    round,
                    path,
                    "p50 {} p99 {}, A {:.1} B {:.1} µs/req, spans {}, errors {}",
                    ms(run.p50_us as f64),
                    ms(run.p99_us as f64),
                    run.a_cpu_us_per_req,
                    run.b_cpu_us_per_req,
                    run.spans_received,
                    run.errors
                );
                for (who, admin) in ["A", "B"].iter().zip(pair.admins) {
                    let m = scrape(admin).await?;
                    tracing::debug!(
                        path,
                        proxy = who,
                        exported = prom::sum(&m, SPANS, &[("result", "exported")]),
                        "spans so far"
                    );
                }
                runs.push(run);
                for c in &mut children {
                    c.ensure_running()?;
                }
            }
        }
        anyhow::Ok(runs)
    }
    .await;
    for c in children.into_iter().rev() {
        c.stop(Duration::from_secs(5)).await;
    }
    if result.is_err() {
        tracing::warn!(dir = %dir.display(), "logs kept");
    } else {
        let _ = std::fs::remove_dir_all(&dir);
    }
    result
}

pub fn execute(args: PolicyArgs) -> anyhow::Result<()> {
    let s = prepare(&args)?;
    if !s.proxy_bin.is_file() {
        anyhow::bail!(
            "no weft-proxy at {}: build it (cargo build --release -p weft-proxy) or pass --proxy-bin",
            s.proxy_bin.display()
        );
    }
    let started = std::time::SystemTime::now();
    let runs = crate::cli::current_thread_runtime()?.block_on(measure(&s))?;
    let r = report(Meta::now(&s, started), runs);
    let name = args
        .common
        .name
        .clone()
        .unwrap_or_else(|| "tracing-cost".to_owned());
    let md = markdown(&r, &name);
    args.common.write_reports(&name, &r, &md, &md, args.quick)
}

fn us(v: f64) -> String {
    format!("{v:.1}")
}

pub fn markdown(r: &Report, name: &str) -> String {
    let mut md = String::new();
    heading(
        &mut md,
        &format!("The cost of distributed tracing: {name}"),
        &r.meta,
    );
    let _ = writeln!(
        md,
        "Two hops: load → weft-proxy A (outbound) → weft-proxy B (inbound) → server, three \
         such pairs measured in turn each round. `{OFF}`: no collector configured. \
         `{DEFAULT}`: collector configured, head sampling 0 (the default) and requests without \
         `traceparent`: nothing is sampled. `{FULL}`: `WEFT_PROXY_TRACE_SAMPLING=1`: a CLIENT \
         span on A and a SERVER span on B for every request, exported over OTLP/gRPC to a \
         sink in the bench process. CPU: A's plus B's utime+stime per request over the \
         window; ratio: per round against `{OFF}`, median (min–max) over the rounds.\n"
    );
    let _ = writeln!(
        md,
        "| path | p50 | p99 | A+B CPU µs/req | ÷ off |\n|---|---:|---:|---:|---:|"
    );
    for (path, f) in [(OFF, &r.off), (DEFAULT, &r.default), (FULL, &r.full)] {
        let _ = writeln!(
            md,
            "| {path} | {} | {} | {} | {} |",
            show(f.p50_us, ms),
            show(f.p99_us, ms),
            show(f.cpu_us_per_req, us),
            if path == OFF {
                "1".to_owned()
            } else {
                show(f.cpu_ratio, |v| format!("{v:.3}×"))
            },
        );
    }
    let _ = writeln!(
        md,
        "\n<details><summary>Every window</summary>\n\n| round | path | requests | errors | p50 | p99 | A µs/req | B µs/req | spans received | spans lost (A+B) |\n|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"
    );
    for run in &r.runs {
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            run.round + 1,
            run.path,
            run.requests,
            run.errors,
            ms(run.p50_us as f64),
            ms(run.p99_us as f64),
            us(run.a_cpu_us_per_req),
            us(run.b_cpu_us_per_req),
            run.spans_received,
            run.spans_lost,
        );
    }
    let _ = writeln!(md, "\n</details>\n");
    md
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(round: usize, path: &'static str, a: f64) -> Run {
        Run {
            round,
            path,
            requests: 1000,
            errors: 0,
            p50_us: 300,
            p99_us: 900,
            a_cpu_us_per_req: a,
            b_cpu_us_per_req: a / 2.0,
            spans_received: 0,
            spans_lost: 0.0,
        }
    }

    #[test]
    fn ratios_are_per_round_against_off() {
        let meta = Meta {
            command: "weft-bench tracing-cost".into(),
            date_utc: "today".into(),
            machine: crate::report::Machine::fixture(Some("c")),
            settings: PolicyArgs::test_settings(),
        };
        let runs = vec![
            run(0, OFF, 40.0),
            run(0, DEFAULT, 40.0),
            run(0, FULL, 50.0),
            run(1, OFF, 50.0),
            run(1, DEFAULT, 55.0),
            run(1, FULL, 70.0),
        ];
        let r = report(meta, runs);
        let median = |f: &PathFigures| f.cpu_ratio.map(|s| s.median).unwrap_or(f64::NAN);
        assert!((median(&r.default) - 1.05).abs() < 1e-9);
        assert!((median(&r.full) - 1.325).abs() < 1e-9);
        let md = markdown(&r, "tracing-cost");
        assert!(md.contains("| full |"), "{md}");
    }
}

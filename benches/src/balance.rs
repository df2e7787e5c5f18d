//! `weft-bench balance`: the quality of the proxy's load balancer.
//!
//! Three bench servers, one of them slower by `--slow-delay` (50 ms); a
//! `weft-controller --source dir:TMP` whose manifests list them as Service
//! `bench` (namespace `bench`), plus Service `fast` whose only endpoint is the
//! first fast server; one `weft-proxy` resolving by name through the
//! controller. The open-loop generator ([`crate::load`]) then runs, in one
//! invocation:
//!
//! 1. `fast alone`: `fast.bench.svc.cluster.local:8080` through the proxy, the
//!    baseline: the same proxy, the same discovery path, one fast endpoint;
//! 2. `balanced`: `bench.bench.svc.cluster.local:8080` through the proxy,
//!    three endpoints of which one is slow;
//! 3. `direct`: the first fast server without a proxy, for reference.
//!
//! Each run has a warm-up (not measured) and a measured window; the share of
//! requests per endpoint is read from the servers' own counters over the
//! measured window of the `balanced` run. The targets: the slow
//! endpoint gets < 10 % of the requests and the `balanced` p99 is at most 1.5×
//! the `fast alone` p99.
//!
//! The proxy's original destination is a closed port, so a request that was
//! not routed by discovery would fail and show up as an error.
//!
//! The servers run in this process on their own thread (so their counters are
//! plain atomics) pinned with the proxy and controller to `--mesh-cpu`; the
//! generator runs on `--load-cpu`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context as _};
use clap::Args;

use crate::cli::{BinArgs, PinArgs};
use crate::load::stats::fmt_us;
use crate::load::{LoadGenerator, LoadSpec, Pacing, Protocol, Summary};
use crate::report;
use crate::scenario::mesh::service_manifests;
use crate::scenario::process::{self, Child};
use crate::scenario::weft::{self, FixedTargets, ProxyAddrs};
use crate::server::{spawn_thread, ServeOptions};
use crate::sys::affinity;

const NS: &str = "bench";
const BALANCED: &str = "bench.bench.svc.cluster.local:8080";
const FAST: &str = "fast.bench.svc.cluster.local:8080";

fn parse_rate(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(r) if r.is_finite() && r > 0.0 => Ok(r),
        _ => Err(format!("{s:?} is not a positive rate")),
    }
}

#[derive(Debug, Clone, Args)]
pub struct BalanceArgs {
    /// Open-loop rate of every run, requests per second.
    #[arg(long, value_parser = parse_rate, default_value = "1000")]
    pub rate: f64,
    /// Wire protocol (HTTP/2 and gRPC are balanced per request too).
    #[arg(long, value_enum, default_value_t = Protocol::Http1)]
    pub protocol: Protocol,
    /// Generator connections.
    #[arg(long, default_value_t = 32)]
    pub connections: usize,
    /// Streams per HTTP/2 connection.
    #[arg(long, default_value_t = 8)]
    pub streams: usize,
    /// Measured window of each run.
    #[arg(long, value_parser = crate::cli::parse_duration, default_value = "20s")]
    pub duration: Duration,
    /// Warm-up before each run, not measured.
    #[arg(long, value_parser = crate::cli::parse_duration, default_value = "3s")]
    pub warmup: Duration,
    /// Extra latency of the slow endpoint.
    #[arg(long, value_parser = crate::cli::parse_duration, default_value = "50ms")]
    pub slow_delay: Duration,
    /// Response body bytes.
    #[arg(long, default_value_t = 1024)]
    pub response_size: usize,
    #[command(flatten)]
    pub bins: BinArgs,
    /// Markdown report [default: benches/BALANCE.md].
    #[arg(long)]
    pub results: Option<PathBuf>,
    /// Do not write the markdown report.
    #[arg(long, conflicts_with = "results")]
    pub no_results: bool,
    #[command(flatten)]
    pub pin: PinArgs,
}

/// One measured run.
#[derive(Debug, Clone)]
pub struct RunResult {
    pub name: &'static str,
    pub what: String,
    pub summary: Summary,
}

/// Requests each endpoint received in the `balanced` window.
#[derive(Debug, Clone)]
pub struct Share {
    pub addr: SocketAddr,
    pub delay: Duration,
    /// In the measured window.
    pub requests: u64,
    /// Including the warm-up (when the balancer was learning).
    pub with_warmup: u64,
}

/// The pass/fail figures, pure.
#[derive(Debug, Clone, PartialEq)]
pub struct Verdict {
    pub slow_share: f64,
    pub p99_ratio: f64,
    pub slow_ok: bool,
    pub p99_ok: bool,
}

/// Slow share (< 10 %) and p99 ratio (≤ 1.5) from the counters and the runs.
pub fn verdict(shares: &[Share], slow: SocketAddr, balanced_p99: u64, fast_p99: u64) -> Verdict {
    let total: u64 = shares.iter().map(|s| s.requests).sum();
    let slow_requests: u64 = shares
        .iter()
        .filter(|s| s.addr == slow)
        .map(|s| s.requests)
        .sum();
    let slow_share = if total == 0 {
        1.0
    } else {
        slow_requests as f64 / total as f64
    };
    let p99_ratio = if fast_p99 == 0 {
        f64::INFINITY
    } else {
        balanced_p99 as f64 / fast_p99 as f64
    };
    Verdict {
        slow_share,
        p99_ratio,
        slow_ok: slow_share < 0.10,
        p99_ok: p99_ratio <= 1.5,
    }
}

/// Starts the three servers on their own thread ([`spawn_thread`]); returns their addresses
/// and counters.
fn start_servers(
    delays: [Duration; 3],
    response_size: usize,
    cpu: Option<usize>,
) -> anyhow::Result<Vec<(SocketAddr, Arc<AtomicU64>)>> {
    let counters: Vec<Arc<AtomicU64>> = delays.iter().map(|_| Arc::default()).collect();
    let opts = delays
        .iter()
        .zip(&counters)
        .map(|(&delay, counter)| ServeOptions {
            response_size,
            delay,
            requests: Some(counter.clone()),
            fault: None,
        })
        .collect();
    let addrs = spawn_thread(opts, cpu)?;
    Ok(addrs.into_iter().zip(counters).collect())
}

fn counts(servers: &[(SocketAddr, Arc<AtomicU64>)]) -> Vec<u64> {
    servers
        .iter()
        .map(|(_, c)| c.load(Ordering::Relaxed))
        .collect()
}

/// Warm-up then a measured open-loop run against `connect` with `authority`.
async fn measure(
    args: &BalanceArgs,
    connect: SocketAddr,
    authority: &str,
    servers: &[(SocketAddr, Arc<AtomicU64>)],
) -> anyhow::Result<(Summary, Vec<u64>, Vec<u64>)> {
    let spec = LoadSpec {
        connect,
        authority: authority.to_owned(),
        protocol: args.protocol,
        connections: args.connections.max(1),
        streams: if args.protocol.is_h2() {
            args.streams.max(1)
        } else {
            1
        },
        request_size: 0,
        response_size: args.response_size,
    };
    let mut load = LoadGenerator::connect(&spec, Duration::from_secs(10)).await?;
    let pacing = Pacing::Open { rate: args.rate };
    let at_start = counts(servers);
    if !args.warmup.is_zero() {
        load.run(pacing, args.warmup).await?;
    }
    let before = counts(servers);
    let stats = load.run(pacing, args.duration).await?;
    let after = counts(servers);
    let delta = after.iter().zip(&before).map(|(a, b)| a - b).collect();
    let with_warmup = after.iter().zip(&at_start).map(|(a, b)| a - b).collect();
    Ok((stats.summary(), delta, with_warmup))
}

/// The report of one invocation.
#[derive(Debug, Clone)]
pub struct BalanceReport {
    pub command: String,
    pub date_utc: String,
    pub cpus: usize,
    pub pinned: bool,
    pub debug_build: bool,
    pub args: BalanceArgs,
    pub runs: Vec<RunResult>,
    pub shares: Vec<Share>,
    pub verdict: Verdict,
}

/// Runs the benchmark and writes the report.
pub fn execute(args: BalanceArgs) -> anyhow::Result<()> {
    let exe = std::env::current_exe().context("finding this executable")?;
    let proxy_bin = args.bins.proxy(&exe);
    let controller_bin = args.bins.controller(&exe);
    for (bin, what) in [
        (&proxy_bin, "weft-proxy"),
        (&controller_bin, "weft-controller"),
    ] {
        if !bin.is_file() {
            bail!(
                "no {what} at {}: build it (cargo build --release -p {}) or pass --{}-bin",
                bin.display(),
                if what == "weft-proxy" {
                    "weft-proxy"
                } else {
                    "weft-controller"
                },
                if what == "weft-proxy" {
                    "proxy"
                } else {
                    "controller"
                },
            );
        }
    }
    let cpus = affinity::online_cpus();
    let pinned = args.pin.pin()?;
    let mesh_cpu = pinned.map(|(_, mesh)| mesh);
    let started = std::time::SystemTime::now();

    let delays = [Duration::ZERO, Duration::ZERO, args.slow_delay];
    let servers = start_servers(delays, args.response_size, mesh_cpu)?;
    let dir = std::env::temp_dir().join(format!("weft-bench-balance-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let addrs: Vec<SocketAddr> = servers.iter().map(|(a, _)| *a).collect();
    std::fs::write(
        dir.join("bench.yaml"),
        service_manifests("bench", "10.96.0.50", &addrs),
    )?;
    std::fs::write(
        dir.join("fast.yaml"),
        service_manifests("fast", "10.96.0.51", &addrs[..1]),
    )?;

    let result = crate::cli::current_thread_runtime()?.block_on(run_all(
        &args,
        &proxy_bin,
        &controller_bin,
        &dir,
        &servers,
        mesh_cpu,
    ));
    let _ = std::fs::remove_dir_all(&dir);
    let (runs, (balanced_counts, with_warmup)) = result?;

    let shares: Vec<Share> = servers
        .iter()
        .zip(delays)
        .zip(balanced_counts.iter().zip(&with_warmup))
        .map(|(((addr, _), delay), (n, w))| Share {
            addr: *addr,
            delay,
            requests: *n,
            with_warmup: *w,
        })
        .collect();
    let p99 = |name: &str| {
        runs.iter()
            .find(|r| r.name == name)
            .map_or(0, |r| r.summary.p99_us)
    };
    let verdict = verdict(&shares, addrs[2], p99("balanced"), p99("fast alone"));
    let unix = report::unix_secs(started);
    let argv: Vec<String> = std::env::args().collect();
    let report = BalanceReport {
        command: report::shell_command(&argv),
        date_utc: report::utc_date(unix),
        cpus,
        pinned: pinned.is_some(),
        debug_build: cfg!(debug_assertions),
        args: args.clone(),
        runs,
        shares,
        verdict,
    };
    let md = markdown(&report);
    println!("{md}");
    if !args.no_results {
        let path = args
            .results
            .clone()
            .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("BALANCE.md"));
        std::fs::write(&path, &md).with_context(|| format!("writing {}", path.display()))?;
        println!("Markdown: {}", path.display());
    }
    let errors: u64 = report.runs.iter().map(|r| r.summary.errors).sum();
    if errors > 0 {
        bail!("{errors} requests failed");
    }
    Ok(())
}

async fn run_all(
    args: &BalanceArgs,
    proxy_bin: &Path,
    controller_bin: &Path,
    dir: &Path,
    servers: &[(SocketAddr, Arc<AtomicU64>)],
    cpu: Option<usize>,
) -> anyhow::Result<(Vec<RunResult>, (Vec<u64>, Vec<u64>))> {
    let ports = crate::scenario::free_addrs(7)?;
    let (destination, identity, controller_admin) = (ports[0], ports[1], ports[2]);
    let proxy_addrs = ProxyAddrs {
        outbound: ports[3],
        inbound: ports[4],
        admin: ports[5],
    };
    // Nothing listens here: a request not routed by discovery fails visibly.
    let closed = ports[6];
    let logs = std::env::temp_dir();
    let mut cmd = Command::new(controller_bin);
    cmd.arg("--source")
        .arg(format!("dir:{}", dir.display()))
        .arg("--destination-addr")
        .arg(destination.to_string())
        .arg("--identity-addr")
        .arg(identity.to_string())
        .arg("--admin-addr")
        .arg(controller_admin.to_string())
        // No issuer and a proxy without identity: plaintext, development mode.
        .arg("--insecure-plaintext")
        .env("WEFT_CONTROLLER_LOG", "warn");
    let mut controller = Child::spawn(
        "weft-controller",
        cmd,
        cpu,
        &logs.join("weft-bench-balance-controller.log"),
    )?;
    process::wait_ready(
        &mut controller,
        controller_admin,
        "/ready",
        Duration::from_secs(10),
    )
    .await?;

    let mut env = weft::proxy_env(
        &proxy_addrs,
        &FixedTargets {
            outbound: Some(closed),
            inbound: None,
        },
    );
    env.push((
        "WEFT_PROXY_DESTINATION_ADDR",
        format!("http://{destination}"),
    ));
    env.push(("WEFT_PROXY_NAMESPACE", NS.to_owned()));
    let mut proxy = Child::spawn(
        "weft-proxy",
        weft::command(proxy_bin, &env),
        cpu,
        &logs.join("weft-bench-balance-proxy.log"),
    )?;
    process::wait_ready(
        &mut proxy,
        proxy_addrs.admin,
        "/ready",
        Duration::from_secs(10),
    )
    .await?;

    let mut runs = Vec::new();
    let result = async {
        let (fast, _, _) = measure(args, proxy_addrs.outbound, FAST, servers).await?;
        tracing::info!("fast alone: {}", fast.one_line());
        runs.push(RunResult {
            name: "fast alone",
            what: format!("{FAST} through weft-proxy: one fast endpoint"),
            summary: fast,
        });
        let (balanced, counts, with_warmup) =
            measure(args, proxy_addrs.outbound, BALANCED, servers).await?;
        tracing::info!("balanced: {}", balanced.one_line());
        runs.push(RunResult {
            name: "balanced",
            what: format!("{BALANCED} through weft-proxy: two fast endpoints, one slow"),
            summary: balanced,
        });
        let (direct, _, _) =
            measure(args, servers[0].0, &servers[0].0.to_string(), servers).await?;
        runs.push(RunResult {
            name: "direct",
            what: "the first fast server, no proxy (reference)".to_owned(),
            summary: direct,
        });
        proxy.ensure_running()?;
        controller.ensure_running()?;
        anyhow::Ok((counts, with_warmup))
    }
    .await;
    proxy.stop(Duration::from_secs(5)).await;
    controller.stop(Duration::from_secs(5)).await;
    Ok((runs, result?))
}

/// The BALANCE.md text.
pub fn markdown(r: &BalanceReport) -> String {
    let a = &r.args;
    let mut s = String::new();
    s.push_str("# Balancer quality\n\n");
    s.push_str(
        "Generated by `weft-bench balance` (benches/src/balance.rs); the method is in that \
         module's docs. Three bench servers, the third slower by the slow delay; \
         `weft-controller --source dir:` lists them as Service `bench` and the first alone as \
         Service `fast`; one `weft-proxy` resolves both by name through the controller and \
         balances per request (power of two choices over peak-EWMA latency). The baseline is \
         the `fast alone` run: the same proxy and discovery path to one fast endpoint, in the \
         same invocation.\n\n",
    );
    s.push_str(&format!("Command: `{}`\n\n", r.command));
    s.push_str(&format!(
        "Date: {} · CPUs: {} · pinned: {} · build: {} · protocol: {} · rate: {} req/s · \
         connections: {} · warm-up {:?} + measured {:?} per run · slow delay {:?}\n\n",
        r.date_utc,
        r.cpus,
        if r.pinned {
            format!(
                "generator on CPU {}, servers+controller+proxy on CPU {}",
                a.pin.load_cpu, a.pin.mesh_cpu
            )
        } else {
            "no".to_owned()
        },
        if r.debug_build {
            "debug (figures not representative)"
        } else {
            "release"
        },
        a.protocol.name(),
        a.rate,
        a.connections,
        a.warmup,
        a.duration,
        a.slow_delay,
    ));
    s.push_str("## Latency\n\n| run | what | requests | errors | req/s | p50 | p90 | p99 | p99.9 | max |\n|---|---|---:|---:|---:|---:|---:|---:|---:|---:|\n");
    for run in &r.runs {
        let m = &run.summary;
        s.push_str(&format!(
            "| {} | {} | {} | {} | {:.0} | {} | {} | {} | {} | {} |\n",
            run.name,
            run.what,
            m.requests,
            m.errors,
            m.achieved_rps,
            fmt_us(m.p50_us),
            fmt_us(m.p90_us),
            fmt_us(m.p99_us),
            fmt_us(m.p999_us),
            fmt_us(m.max_us),
        ));
    }
    let total: u64 = r.shares.iter().map(|x| x.requests).sum();
    let total_w: u64 = r.shares.iter().map(|x| x.with_warmup).sum();
    let pct = |n: u64, t: u64| {
        if t == 0 {
            0.0
        } else {
            100.0 * n as f64 / t as f64
        }
    };
    s.push_str("\n## Share of requests in the `balanced` run (servers' counters)\n\n| endpoint | extra delay | measured window | share | incl. warm-up | share |\n|---|---:|---:|---:|---:|---:|\n");
    for x in &r.shares {
        s.push_str(&format!(
            "| {} | {:?} | {} | {:.2} % | {} | {:.2} % |\n",
            x.addr,
            x.delay,
            x.requests,
            pct(x.requests, total),
            x.with_warmup,
            pct(x.with_warmup, total_w),
        ));
    }
    let v = &r.verdict;
    let mark = |ok: bool| if ok { "PASS" } else { "FAIL" };
    s.push_str(&format!(
        "\n## Targets (issue 3)\n\n- slow endpoint share {:.2} % (target < 10 %): **{}**\n\
         - `balanced` p99 / `fast alone` p99 = {:.2} (target ≤ 1.5): **{}**\n",
        100.0 * v.slow_share,
        mark(v.slow_ok),
        v.p99_ratio,
        mark(v.p99_ok),
    ));
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn share(port: u16, n: u64) -> Share {
        Share {
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            delay: Duration::ZERO,
            requests: n,
            with_warmup: n,
        }
    }

    #[test]
    fn verdicts() {
        let slow = SocketAddr::from(([127, 0, 0, 1], 3));
        let v = verdict(
            &[share(1, 450), share(2, 450), share(3, 100)],
            slow,
            1500,
            1000,
        );
        assert!((v.slow_share - 0.10).abs() < 1e-9);
        assert!(!v.slow_ok, "10 % is not < 10 %");
        assert!(v.p99_ok);
        let v = verdict(
            &[share(1, 500), share(2, 499), share(3, 1)],
            slow,
            1600,
            1000,
        );
        assert!(v.slow_ok);
        assert!(!v.p99_ok);
        let v = verdict(&[], slow, 1, 0);
        assert!(!v.slow_ok && !v.p99_ok);
    }
}

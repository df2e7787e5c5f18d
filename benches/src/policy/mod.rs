//! The traffic-policy benchmarks of issue 12: `weft-bench retries`, `weft-bench ejection`
//! and `weft-bench routing-cost`, each against a baseline measured in the same invocation.
//!
//! ```text
//! retries       load ──▶ weft-proxy A ──▶ server failing every 5th request (503)
//!               baseline: Service `plain`, an HTTPRoute without retry;
//!               subject:  Service `retry`, the same route with retry {codes: [503], attempts: 2}
//! ejection      load ──▶ weft-proxy A ──▶ 3 servers
//!               baseline: Service `healthy`, all three healthy;
//!               subject:  Service `eject-<round>`, the third answers 503 to everything from
//!                         the first instant of the measured window
//! routing-cost  load ──▶ weft-proxy A ──▶ weft-proxy B (inbound) ──▶ server
//!               baseline: Service `noroute`, no HTTPRoute; subject: Service `routed`, an
//!               HTTPRoute of 10 rules with retries (none fire), the load taking the last;
//!               reference: the load straight to the server (`direct`)
//!          CPU 0 (generator) │ CPU 1 (servers, controller, proxies)
//! ```
//!
//! One `weft-controller --source dir:…` ([`crate::scenario::mesh`]) reads the manifests
//! ([`manifests`]: Services, EndpointSlices, HTTPRoutes, BackendPolicies); proxy A resolves
//! every Service by name through it (its original destination is a closed port, so a request
//! that was not routed fails visibly). The servers run in this process on one thread pinned
//! with the proxies ([`crate::server::spawn_thread`]), so that their request counters and
//! injected faults ([`crate::server::Fault`]) are plain atomics the benchmark reads and flips.
//!
//! **Interleaving.** Each invocation runs `--rounds` rounds; a round measures the baseline
//! and the subject (and `direct`) one after the other, in an order that alternates from round
//! to round, each window after its own warm-up. A build or anything else running beside the
//! benchmark then lands on both sides; the report gives the median of the rounds and their
//! spread (min–max), and pass/fail from the medians. No figure is ever asserted in a test.
//!
//! **What is counted.** Client-seen success: 2xx responses with the right body over all the
//! generator's requests in the window (a 503 that reaches the client is a failure). Backend
//! load: the servers' own request counters over the window. Proxy counters: deltas of
//! `/metrics` of proxy A over the window. CPU per request: utime+stime of the proxy
//! (`/proc/<pid>/stat`) over the window, divided by the generator's requests in it.

pub mod cost;
pub mod ejection;
pub mod manifests;
pub mod report;
pub mod retries;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context as _};
use clap::Args;
use tokio::time::Instant;

use crate::cli::{parse_duration, parse_rate, CommonArgs};
use crate::load::{LoadGenerator, LoadSpec, Pacing, Protocol, RunStats};
use crate::scenario::mesh::{self, ControllerAddrs, MeshDirs};
use crate::scenario::process::{wait_ready, Child};
use crate::scenario::prom::Sample;
use crate::scenario::weft::{self, FixedTargets, ProxyAddrs};
use crate::scenario::{free_addrs, scrape};
use crate::server::{spawn_thread, Fault, ServeOptions};
use crate::sys::procfs;

/// Flags every traffic-policy benchmark takes.
#[derive(Debug, Clone, Args)]
pub struct PolicyArgs {
    /// Open-loop rate of every window, requests per second.
    #[arg(long, value_parser = parse_rate, default_value = "1000")]
    pub rate: f64,
    /// TCP connections the generator opens (HTTP/1.1, one request in flight each).
    #[arg(long, default_value_t = 16)]
    pub connections: usize,
    /// Request body bytes (POST; 0 sends GET).
    #[arg(long, default_value_t = 1024)]
    pub request_size: usize,
    /// Response body bytes.
    #[arg(long, default_value_t = 1024)]
    pub response_size: usize,
    /// Measured window of each run [default: 15s, --quick 2s].
    #[arg(long, value_parser = parse_duration)]
    pub duration: Option<Duration>,
    /// Warm-up before each window, not measured [default: 2s, --quick 1s].
    #[arg(long, value_parser = parse_duration)]
    pub warmup: Option<Duration>,
    /// Rounds of baseline + subject [default: 3, --quick 1].
    #[arg(long)]
    pub rounds: Option<usize>,
    /// Short windows and one round, for a smoke test; RESULTS.md is only written if
    /// --results is given.
    #[arg(long)]
    pub quick: bool,
    /// Per-request timeout.
    #[arg(long, value_parser = parse_duration, default_value = "10s")]
    pub timeout: Duration,
    #[command(flatten)]
    pub common: CommonArgs,
}

/// [`PolicyArgs`] with the defaults applied.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Settings {
    pub rate: f64,
    pub connections: usize,
    pub request_size: usize,
    pub response_size: usize,
    pub duration_s: f64,
    pub warmup_s: f64,
    pub rounds: usize,
    pub quick: bool,
    #[serde(skip)]
    pub timeout: Duration,
    #[serde(skip)]
    pub proxy_bin: PathBuf,
    #[serde(skip)]
    pub controller_bin: PathBuf,
    /// Where the servers, controller and proxies run; `None`: unpinned.
    pub mesh_cpu: Option<usize>,
}

impl PolicyArgs {
    pub fn settings(&self, exe: &Path) -> Settings {
        let (duration, warmup, rounds) = if self.quick {
            (Duration::from_secs(2), Duration::from_secs(1), 1)
        } else {
            (Duration::from_secs(15), Duration::from_secs(2), 3)
        };
        Settings {
            rate: self.rate,
            connections: self.connections.max(1),
            request_size: self.request_size,
            response_size: self.response_size,
            duration_s: self.duration.unwrap_or(duration).as_secs_f64(),
            warmup_s: self.warmup.unwrap_or(warmup).as_secs_f64(),
            rounds: self.rounds.unwrap_or(rounds).max(1),
            quick: self.quick,
            timeout: self.timeout,
            proxy_bin: self.common.bins.proxy(exe),
            controller_bin: self.common.bins.controller(exe),
            mesh_cpu: None,
        }
    }
}

#[cfg(test)]
impl PolicyArgs {
    /// Default settings, for report tests.
    pub(crate) fn test_settings() -> Settings {
        Settings {
            rate: 1000.0,
            connections: 16,
            request_size: 1024,
            response_size: 1024,
            duration_s: 15.0,
            warmup_s: 2.0,
            rounds: 3,
            quick: false,
            timeout: Duration::from_secs(10),
            proxy_bin: "weft-proxy".into(),
            controller_bin: "weft-controller".into(),
            mesh_cpu: Some(1),
        }
    }
}

impl Settings {
    pub fn duration(&self) -> Duration {
        Duration::from_secs_f64(self.duration_s)
    }

    pub fn warmup(&self) -> Duration {
        Duration::from_secs_f64(self.warmup_s)
    }

    pub fn pacing(&self) -> Pacing {
        Pacing::Open { rate: self.rate }
    }
}

/// `Host` of requests to Service `service`: `<service>.bench.svc.cluster.local:8080`.
pub fn authority(service: &str) -> String {
    format!(
        "{service}.{}.svc.cluster.local:{}",
        mesh::NAMESPACE,
        mesh::SERVICE_PORT
    )
}

/// One in-process bench server.
#[derive(Debug, Clone)]
pub struct Endpoint {
    pub addr: SocketAddr,
    pub requests: Arc<AtomicU64>,
    pub fault: Arc<Fault>,
}

impl Endpoint {
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }
}

/// What a benchmark runs: servers, the controller, proxy A and, for two hops, proxy B.
pub struct Harness {
    pub endpoints: Vec<Endpoint>,
    /// Proxy A: the client side, resolving by name.
    pub client: ProxyAddrs,
    /// Proxy B: the server side (inbound, fixed target: the first server), two hops only.
    pub server_side: Option<ProxyAddrs>,
    /// pid of A, then B.
    pub proxy_pids: Vec<u32>,
    children: Vec<Child>,
    dir: PathBuf,
}

impl Harness {
    /// Starts one server per entry of `faults` (its `fail every`, 0: healthy), writes the
    /// manifests `manifests(servers, B's inbound)` returns, starts the controller, proxy A
    /// and (when `two_hop`) proxy B, and waits for them to be ready.
    pub async fn start(
        s: &Settings,
        faults: &[u64],
        two_hop: bool,
        manifests: impl FnOnce(&[SocketAddr], Option<SocketAddr>) -> String,
    ) -> anyhow::Result<Self> {
        for (bin, what) in [(&s.proxy_bin, "proxy"), (&s.controller_bin, "controller")] {
            if !bin.is_file() {
                bail!(
                    "no weft-{what} at {}: build it (cargo build --release -p weft-{what}) or pass --{what}-bin",
                    bin.display()
                );
            }
        }
        let endpoints: Vec<Endpoint> = faults
            .iter()
            .map(|&every| Endpoint {
                addr: SocketAddr::from(([127, 0, 0, 1], 0)),
                requests: Arc::default(),
                fault: Fault::every(every),
            })
            .collect();
        let opts = endpoints
            .iter()
            .map(|e| ServeOptions {
                response_size: s.response_size,
                requests: Some(e.requests.clone()),
                fault: Some(e.fault.clone()),
                ..Default::default()
            })
            .collect();
        let addrs = spawn_thread(opts, s.mesh_cpu)?;
        let endpoints: Vec<Endpoint> = endpoints
            .into_iter()
            .zip(&addrs)
            .map(|(e, &addr)| Endpoint { addr, ..e })
            .collect();

        let ports = free_addrs(10)?;
        let controller = ControllerAddrs {
            destination: ports[0],
            identity: ports[1],
            admin: ports[2],
        };
        let client = ProxyAddrs {
            outbound: ports[3],
            inbound: ports[4],
            admin: ports[5],
        };
        let server_side = two_hop.then_some(ProxyAddrs {
            outbound: ports[6],
            inbound: ports[7],
            admin: ports[8],
        });
        // Nothing listens here: a request the proxy did not route by name fails visibly.
        let closed = ports[9];

        let dir = crate::scenario::temp_dir()?;
        let dirs = MeshDirs::create(&dir)?;
        mesh::write_atomically(
            &dirs.manifests.join("bench.yaml"),
            &manifests(&addrs, server_side.map(|b| b.inbound)),
        )?;
        let mut harness = Harness {
            endpoints,
            client,
            server_side,
            proxy_pids: Vec::new(),
            children: Vec::new(),
            dir: dir.clone(),
        };
        // The proxies have no identity, so they reach the destination service in plaintext
        // (its mutual TLS needs a workload certificate): a development-mode controller.
        let c = mesh::start_controller_with(
            &s.controller_bin,
            &dirs,
            &controller,
            s.mesh_cpu,
            &dir.join("controller.log"),
            &["--insecure-plaintext"],
        )
        .await?;
        harness.children.push(c);

        let mut env = weft::proxy_env(
            &client,
            &FixedTargets {
                outbound: Some(closed),
                inbound: None,
            },
        );
        env.push((
            mesh::DESTINATION_ADDR,
            format!("http://{}", controller.destination),
        ));
        env.push((mesh::PROXY_NAMESPACE, mesh::NAMESPACE.to_owned()));
        let mut proxies = vec![("weft-proxy A (client side, outbound)", client, env)];
        if let (Some(b), Some(server)) = (server_side, addrs.first()) {
            let env = weft::proxy_env(
                &b,
                &FixedTargets {
                    outbound: None,
                    inbound: Some(*server),
                },
            );
            proxies.push(("weft-proxy B (server side, inbound)", b, env));
        }
        for (i, (name, a, env)) in proxies.into_iter().enumerate() {
            let mut child = Child::spawn(
                name,
                weft::command(&s.proxy_bin, &env),
                s.mesh_cpu,
                &dir.join(format!("proxy{i}.log")),
            )?;
            wait_ready(&mut child, a.admin, "/ready", Duration::from_secs(10)).await?;
            harness.proxy_pids.push(child.pid());
            harness.children.push(child);
        }
        Ok(harness)
    }

    /// An error if a child exited.
    pub fn ensure_running(&mut self) -> anyhow::Result<()> {
        self.children
            .iter_mut()
            .try_for_each(|c| c.ensure_running())
    }

    /// Stops the proxies and the controller (SIGTERM); removes the temporary directory unless
    /// `keep` (a failed run: its logs are named in the output).
    pub async fn stop(self, keep: bool) {
        for c in self.children.into_iter().rev() {
            let name = c.name.clone();
            let how = c.stop(Duration::from_secs(5)).await;
            tracing::debug!(name, how, "stopped");
        }
        if keep {
            tracing::warn!(dir = %self.dir.display(), "logs kept");
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    /// Proxy A's `/metrics`.
    pub async fn client_metrics(&self) -> anyhow::Result<Vec<Sample>> {
        scrape(self.client.admin).await
    }

    /// The generator's connections to proxy A for Service `service`.
    pub async fn load_to(&self, s: &Settings, service: &str) -> anyhow::Result<LoadGenerator> {
        load(s, self.client.outbound, authority(service)).await
    }
}

/// Connections for `s`'s load to `connect` with `Host: authority`.
pub async fn load(
    s: &Settings,
    connect: SocketAddr,
    authority: String,
) -> anyhow::Result<LoadGenerator> {
    let spec = LoadSpec {
        connect,
        authority,
        protocol: Protocol::Http1,
        connections: s.connections,
        streams: 1,
        request_size: s.request_size,
        response_size: s.response_size,
    };
    LoadGenerator::connect(&spec, s.timeout)
        .await
        .with_context(|| format!("connecting to {connect}"))
}

/// One measured window.
pub struct Window {
    pub stats: RunStats,
    pub wall: Duration,
    /// Per endpoint: requests it received in the window.
    pub backend: Vec<u64>,
    /// CPU µs per generator request of each proxy (A, then B).
    pub cpu_us_per_req: Vec<f64>,
    /// Proxy A's `/metrics` before and after.
    pub before: Vec<Sample>,
    pub after: Vec<Sample>,
}

impl Window {
    /// Requests the generator sent (successes and failures).
    pub fn client_requests(&self) -> u64 {
        self.stats.ok + self.stats.errors
    }

    /// Client-seen success ratio.
    pub fn success(&self) -> f64 {
        report::ratio(self.stats.ok, self.client_requests())
    }

    /// Growth of `name` (all series summed) on proxy A over the window.
    pub fn delta(&self, name: &str) -> f64 {
        self.delta_with(name, &[])
    }

    /// Growth of the series of `name` carrying every label of `labels` on proxy A.
    pub fn delta_with(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let sum = |s: &[Sample]| crate::scenario::prom::sum(s, name, labels);
        sum(&self.after) - sum(&self.before)
    }

    /// Connections proxy A opened to endpoints in the window (`weft_tls_connections_total`
    /// counts every outbound connection, with `tls` saying why it is plaintext).
    pub fn upstream_connections(&self) -> f64 {
        self.delta_with(
            crate::scenario::TLS_CONNECTIONS,
            &[("direction", "outbound")],
        )
    }
}

/// Warms `load` up, then measures one window of it; `at_start` runs just before the window's
/// first request (a fault flipped on, a poller started).
pub async fn window(
    s: &Settings,
    h: &Harness,
    load: &mut LoadGenerator,
    at_start: impl FnOnce(),
) -> anyhow::Result<Window> {
    if !s.warmup().is_zero() {
        load.run(s.pacing(), s.warmup()).await?;
    }
    let before = h.client_metrics().await?;
    let counts = |h: &Harness| {
        h.endpoints
            .iter()
            .map(Endpoint::requests)
            .collect::<Vec<_>>()
    };
    let backend_before = counts(h);
    let cpu_before = h
        .proxy_pids
        .iter()
        .map(|&p| procfs::read_cpu(p))
        .collect::<anyhow::Result<Vec<_>>>()?;
    at_start();
    let started = Instant::now();
    let stats = load.run(s.pacing(), s.duration()).await?;
    let wall = started.elapsed();
    let cpu_after = h
        .proxy_pids
        .iter()
        .map(|&p| procfs::read_cpu(p))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let backend = counts(h)
        .iter()
        .zip(&backend_before)
        .map(|(a, b)| a - b)
        .collect();
    let after = h.client_metrics().await?;
    let hz = procfs::ticks_per_sec();
    let requests = stats.ok + stats.errors;
    let cpu_us_per_req = cpu_before
        .iter()
        .zip(&cpu_after)
        .map(|(b, a)| a.since(*b, hz).as_secs_f64() * 1e6 / requests.max(1) as f64)
        .collect();
    Ok(Window {
        stats,
        wall,
        backend,
        cpu_us_per_req,
        before,
        after,
    })
}

/// The settings of `args` with the defaults applied, after pinning this thread to the
/// generator's CPU (before the runtime exists, so every thread inherits it).
pub fn prepare(args: &PolicyArgs) -> anyhow::Result<Settings> {
    let exe = std::env::current_exe().context("finding this executable")?;
    crate::cli::warn_if_debug_build();
    let mut s = args.settings(&exe);
    s.mesh_cpu = args.common.pin.pin()?.map(|(_, mesh)| mesh);
    Ok(s)
}

/// Round `i`'s order of `runs`: as given on even rounds, reversed on odd ones (ABBA), so a
/// drift over the invocation weighs on both sides.
pub fn order<T: Copy>(runs: &[T], i: usize) -> Vec<T> {
    let mut v = runs.to_vec();
    if i % 2 == 1 {
        v.reverse();
    }
    v
}

/// Writes JSON and the RESULTS.md block of one benchmark (only with --results under
/// --quick), prints the markdown.
pub fn write(
    args: &PolicyArgs,
    default_name: &str,
    doc: &impl serde::Serialize,
    md: &str,
) -> anyhow::Result<()> {
    let name = args
        .common
        .name
        .clone()
        .unwrap_or_else(|| default_name.to_owned());
    args.common.write_reports(&name, doc, md, md, args.quick)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounds_alternate_their_order() {
        assert_eq!(order(&[1, 2], 0), vec![1, 2]);
        assert_eq!(order(&[1, 2], 1), vec![2, 1]);
        assert_eq!(order(&[1, 2, 3], 2), vec![1, 2, 3]);
    }

    #[test]
    fn authority_names_the_service() {
        assert_eq!(authority("retry"), "retry.bench.svc.cluster.local:8080");
    }
}

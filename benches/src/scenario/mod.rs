//! The scenarios: the same load through no proxy, one Weft proxy, two Weft
//! proxies and HAProxy, in one invocation so they share the machine's noise.
//!
//! ```text
//! direct   load ──────────────────────────────────────────▶ server
//! weft1    load ──▶ weft-proxy (outbound) ────────────────▶ server
//! weft2    load ──▶ weft-proxy A (outbound) ──▶ weft-proxy B (inbound) ──▶ server
//! weft2-disc       the same, A routes by Host through the controller; plaintext HTTP/1.1 A → B
//! weft2-mtls       the same, the endpoint is meshed: one mutual-TLS HTTP/2 connection A → B
//! haproxy  load ──▶ haproxy (HTTP mode, nbthread 1) ──────▶ server
//!          CPU 0 │ CPU 1 ...................................................
//! ```
//!
//! `weft2-disc` and `weft2-mtls` also run a `weft-controller` (directory mode, development
//! CA, see [`mesh`]) and give both proxies a workload identity; they differ only in whether
//! the server pod is marked meshed, so `weft2-mtls` minus `weft2-disc` is what mutual TLS
//! costs, and `weft2-mtls` minus `weft2` is what a meshed call costs over a plaintext hop
//! with a fixed target. After their runs the proxies' `/metrics` must show that the traffic
//! took the intended path ([`verify_mesh`]); otherwise the scenario fails.
//!
//! One bench server child serves every scenario. Each scenario starts its
//! proxies, waits for them to be ready, records their idle RSS, opens the
//! generator's connections, warms up, then measures one open-loop run
//! (latency, CPU per request, RSS under load) and one closed-loop run (max
//! throughput), and stops its proxies with SIGTERM.

pub mod haproxy;
pub mod mesh;
pub mod process;
pub mod prom;
pub mod weft;

use std::io::BufRead as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context as _};
use serde::Serialize;
use tokio::time::Instant;

use crate::load::{LoadGenerator, LoadSpec, Pacing, Protocol, Summary};
use crate::server::parse_listening_line;
use crate::sys::procfs::{self, CpuTicks, RssSampler};
use process::{wait_ready, Child};

/// One way of putting something between the generator and the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ScenarioKind {
    /// Load generator straight to the server: the baseline.
    Direct,
    /// Through one Weft proxy (outbound listener).
    Weft1,
    /// Through a client-side Weft proxy (outbound) and a server-side one
    /// (inbound), plaintext, fixed forward targets.
    Weft2,
    /// Like weft2, but the client proxy routes by Host through a controller (plaintext).
    #[value(name = "weft2-disc")]
    #[serde(rename = "weft2-disc")]
    Weft2Disc,
    /// Like weft2-disc, with the endpoint meshed: mutual TLS (HTTP/2) between the proxies.
    #[value(name = "weft2-mtls")]
    #[serde(rename = "weft2-mtls")]
    Weft2Mtls,
    /// Through HAProxy in HTTP mode with one thread.
    Haproxy,
}

impl ScenarioKind {
    pub fn name(self) -> &'static str {
        match self {
            ScenarioKind::Direct => "direct",
            ScenarioKind::Weft1 => "weft1",
            ScenarioKind::Weft2 => "weft2",
            ScenarioKind::Weft2Disc => "weft2-disc",
            ScenarioKind::Weft2Mtls => "weft2-mtls",
            ScenarioKind::Haproxy => "haproxy",
        }
    }

    /// Proxies on the path.
    pub fn hops(self) -> usize {
        match self {
            ScenarioKind::Direct => 0,
            ScenarioKind::Weft1 | ScenarioKind::Haproxy => 1,
            ScenarioKind::Weft2 | ScenarioKind::Weft2Disc | ScenarioKind::Weft2Mtls => 2,
        }
    }

    pub fn is_weft(self) -> bool {
        !matches!(self, ScenarioKind::Direct | ScenarioKind::Haproxy)
    }

    /// Whether it runs a controller and routes by name ([`mesh`]).
    pub fn uses_controller(self) -> bool {
        matches!(self, ScenarioKind::Weft2Disc | ScenarioKind::Weft2Mtls)
    }
}

/// Everything a run needs, parsed from the command line.
#[derive(Debug, Clone)]
pub struct RunConfig {
    pub scenarios: Vec<ScenarioKind>,
    pub protocol: Protocol,
    /// Open-loop target rate, requests per second.
    pub rate: f64,
    pub connections: usize,
    pub streams: usize,
    pub duration: Duration,
    pub warmup: Duration,
    /// Closed-loop max-throughput run; zero skips it.
    pub max_duration: Duration,
    pub request_size: usize,
    pub response_size: usize,
    pub proxy_bin: PathBuf,
    /// For weft2-disc and weft2-mtls.
    pub controller_bin: PathBuf,
    pub haproxy_bin: PathBuf,
    /// This executable, started again as `server`.
    pub bench_bin: PathBuf,
    /// Where the server and proxies run; `None` leaves them unpinned.
    pub mesh_cpu: Option<usize>,
    /// Per-request timeout.
    pub timeout: Duration,
    /// Pause after readiness before idle RSS is read.
    pub settle: Duration,
}

/// Cost figures of one process in one scenario.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ProcessReport {
    pub name: String,
    /// "weft", "haproxy", "controller" or "server".
    pub kind: &'static str,
    pub pid: u32,
    pub cpus_allowed: String,
    pub threads: u64,
    pub rss_idle_kib: u64,
    /// Peak of `VmRSS` sampled every 100 ms during the measured run.
    pub rss_load_kib: u64,
    /// `VmHWM` after the runs: the peak since the process started.
    pub hwm_kib: u64,
    /// CPU time over requests completed, measured open-loop run.
    pub cpu_us_per_req: Option<f64>,
    /// CPU time over wall time, measured open-loop run (1.0 = one core).
    pub cpu_util: Option<f64>,
    /// The same during the max-throughput run.
    pub cpu_us_per_req_max: Option<f64>,
    pub cpu_util_max: Option<f64>,
    /// How it stopped.
    pub stop: String,
}

impl ProcessReport {
    pub fn is_proxy(&self) -> bool {
        matches!(self.kind, "weft" | "haproxy")
    }
}

/// Everything measured in one scenario.
#[derive(Debug, Clone, Serialize)]
pub struct ScenarioReport {
    pub scenario: ScenarioKind,
    pub hops: usize,
    /// Where the generator connected.
    pub entry: Option<SocketAddr>,
    /// Requests in flight at most.
    pub slots: usize,
    /// The open-loop run at the target rate.
    pub latency: Option<Summary>,
    /// The closed-loop run.
    pub max_throughput: Option<Summary>,
    pub processes: Vec<ProcessReport>,
    /// weft2-disc and weft2-mtls: what the proxies' metrics say the traffic did.
    pub mesh: Option<MeshCheck>,
    /// Why the scenario stopped early, if it did.
    pub error: Option<String>,
}

/// Counters read from the proxies' `/metrics` after a weft2-disc or weft2-mtls scenario
/// (warm-up, measured and max-throughput runs together).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct MeshCheck {
    /// Responses the generator got (successes and errors).
    pub requests: u64,
    /// HTTP requests proxy A routed through discovery (`weft_outbound_routes_total`,
    /// `route="balanced"`).
    pub routed_by_discovery: f64,
    /// TLS connections proxy A opened to the server identity
    /// (`weft_tls_connections_total{direction="outbound",tls="true",peer_id=<server>}`).
    pub tls_outbound: f64,
    /// TLS connections proxy B accepted from the client identity
    /// (`weft_tls_connections_total{direction="inbound",tls="true",peer_id=<client>}`).
    pub tls_inbound: f64,
    /// TLS connections of any peer, both proxies: must be 0 in weft2-disc.
    pub tls_any: f64,
}

pub const TLS_CONNECTIONS: &str = "weft_tls_connections_total";
pub const OUTBOUND_ROUTES: &str = "weft_outbound_routes_total";

/// Whether the traffic of a weft2-disc / weft2-mtls scenario took the intended path:
/// routed by discovery (nearly every request), and over mutual TLS with the expected peer
/// identities on both sides (weft2-mtls) or not at all (weft2-disc). `max_connections`
/// bounds the TLS connections: reuse means far fewer than one per request.
pub fn verify_mesh(
    kind: ScenarioKind,
    m: &MeshCheck,
    max_connections: usize,
) -> Result<(), String> {
    // Tolerate a few requests taking the passthrough while the first resolution was pending.
    if m.routed_by_discovery < m.requests as f64 * 0.99 {
        return Err(format!(
            "proxy A routed {} of {} requests through discovery ({OUTBOUND_ROUTES}{{route=\"balanced\"}}): the Host did not resolve through the controller",
            m.routed_by_discovery, m.requests
        ));
    }
    match kind {
        ScenarioKind::Weft2Mtls => {
            let client = mesh::spiffe_id(mesh::NAMESPACE, mesh::CLIENT_SA);
            let server = mesh::spiffe_id(mesh::NAMESPACE, mesh::SERVER_SA);
            if m.tls_outbound < 1.0 {
                return Err(format!(
                    "proxy A's /metrics show no outbound mTLS connection to {server} ({TLS_CONNECTIONS}{{direction=\"outbound\",tls=\"true\",peer_id=\"{server}\"}} is {}): the traffic did not go over mTLS",
                    m.tls_outbound
                ));
            }
            if m.tls_inbound < 1.0 {
                return Err(format!(
                    "proxy B's /metrics show no inbound mTLS connection from {client} ({TLS_CONNECTIONS}{{direction=\"inbound\",tls=\"true\",peer_id=\"{client}\"}} is {}): the traffic did not go over mTLS",
                    m.tls_inbound
                ));
            }
            let most = m.tls_outbound.max(m.tls_inbound);
            if most > max_connections as f64 {
                return Err(format!(
                    "{most} mTLS connections between the proxies for {} requests (more than {max_connections}): connections are not reused",
                    m.requests
                ));
            }
            Ok(())
        }
        _ if m.tls_any > 0.0 => Err(format!(
            "{} TLS connections in a plaintext scenario ({TLS_CONNECTIONS}{{tls=\"true\"}})",
            m.tls_any
        )),
        _ => Ok(()),
    }
}

/// A child the scenario owns, and its row in `processes`.
struct Owned {
    child: Child,
    row: usize,
}

/// A fresh directory for configs and logs of this run.
fn make_temp_dir() -> anyhow::Result<PathBuf> {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let dir = std::env::temp_dir().join(format!("weft-bench-{}-{nanos}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

/// Starts `bench_bin server` (this executable) pinned to `cpu` and returns it with the
/// address it printed.
pub async fn start_server(
    bench_bin: &Path,
    response_size: usize,
    cpu: Option<usize>,
    tmp: &Path,
) -> anyhow::Result<(Child, SocketAddr)> {
    let mut cmd = Command::new(bench_bin);
    cmd.args(["server", "--listen", "127.0.0.1:0", "--response-size"])
        .arg(response_size.to_string())
        .env("WEFT_BENCH_LOG", "warn");
    let mut child = Child::spawn_piped("bench server", cmd, cpu, &tmp.join("server.log"))?;
    let stdout = child
        .stdout()
        .context("bench server stdout was not piped")?;
    let read = tokio::task::spawn_blocking(move || {
        let mut line = String::new();
        std::io::BufReader::new(stdout)
            .read_line(&mut line)
            .map(|_| line)
    });
    let line = match tokio::time::timeout(Duration::from_secs(10), read).await {
        Ok(Ok(Ok(line))) => line,
        Ok(Ok(Err(e))) => bail!(
            "reading the bench server's address: {e}; {}",
            child.log_tail()
        ),
        Ok(Err(e)) => bail!("reading the bench server's address: {e}"),
        Err(_) => bail!(
            "the bench server printed no address within 10 s; {}",
            child.log_tail()
        ),
    };
    let Some(addr) = parse_listening_line(&line) else {
        bail!(
            "the bench server printed {line:?}, expected \"listening <addr>\"; {}",
            child.log_tail()
        );
    };
    wait_ready(&mut child, addr, "/", Duration::from_secs(10)).await?;
    Ok((child, addr))
}

/// Free loopback addresses, all distinct: the probing listeners are held
/// until every address is chosen.
pub fn free_addrs(n: usize) -> anyhow::Result<Vec<SocketAddr>> {
    weft_proto::loopback::free_addrs(n).context("choosing free loopback ports")
}

pub fn temp_dir() -> anyhow::Result<PathBuf> {
    make_temp_dir()
}

fn add_process(
    report: &mut ScenarioReport,
    owned: &mut Vec<Owned>,
    child: Child,
    kind: &'static str,
) {
    report.processes.push(ProcessReport {
        name: child.name.clone(),
        kind,
        pid: child.pid(),
        ..Default::default()
    });
    owned.push(Owned {
        child,
        row: report.processes.len() - 1,
    });
}

/// Starts the Weft proxies of weft1/weft2 (and the controller of weft2-disc/weft2-mtls);
/// returns the proxies' addresses, the generator's entry first.
async fn start_weft(
    cfg: &RunConfig,
    kind: ScenarioKind,
    server: SocketAddr,
    tmp: &Path,
    owned: &mut Vec<Owned>,
    report: &mut ScenarioReport,
) -> anyhow::Result<Vec<weft::ProxyAddrs>> {
    if !cfg.proxy_bin.is_file() {
        bail!(
            "weft-proxy not found at {}: build it with `cargo build --release -p weft-proxy`, or pass --proxy-bin",
            cfg.proxy_bin.display()
        );
    }
    let hops = kind.hops();
    let ports = free_addrs(3 * hops)?;
    let addrs: Vec<weft::ProxyAddrs> = ports
        .chunks_exact(3)
        .map(|p| weft::ProxyAddrs {
            outbound: p[0],
            inbound: p[1],
            admin: p[2],
        })
        .collect();
    let targets = weft::chain(hops, server, &addrs);
    let mesh_env = if kind.uses_controller() {
        start_controller(cfg, kind, &addrs, tmp, owned, report).await?
    } else {
        vec![Vec::new(); addrs.len()]
    };
    for (i, ((a, t), extra)) in addrs.iter().zip(&targets).zip(mesh_env).enumerate() {
        let name = match (hops, i) {
            (1, _) => "weft-proxy".to_owned(),
            (_, 0) => "weft-proxy A (client side, outbound)".to_owned(),
            _ => "weft-proxy B (server side, inbound)".to_owned(),
        };
        let mut env = weft::proxy_env(a, t);
        env.extend(extra);
        tracing::debug!(name, ?env, "starting weft-proxy");
        let log = tmp.join(format!("{}-proxy{i}.log", kind.name()));
        let child = Child::spawn(
            &name,
            weft::command(&cfg.proxy_bin, &env),
            cfg.mesh_cpu,
            &log,
        )?;
        add_process(report, owned, child, "weft");
    }
    // The proxies are the last `hops` children (a controller may come first). With an
    // identity, ready means holding a certificate.
    let first = owned.len() - addrs.len();
    for (o, a) in owned[first..].iter_mut().zip(&addrs) {
        wait_ready(&mut o.child, a.admin, "/ready", Duration::from_secs(15)).await?;
    }
    Ok(addrs)
}

/// weft2-disc and weft2-mtls: writes the manifests (the endpoint is proxy B's inbound
/// port; the pod is meshed for weft2-mtls), starts the controller with a development CA,
/// mints both proxies' tokens, and returns each proxy's extra environment: discovery for A,
/// an identity for both (`client`, `server`).
async fn start_controller(
    cfg: &RunConfig,
    kind: ScenarioKind,
    proxies: &[weft::ProxyAddrs],
    tmp: &Path,
    owned: &mut Vec<Owned>,
    report: &mut ScenarioReport,
) -> anyhow::Result<Vec<Vec<(&'static str, String)>>> {
    let [_, b] = proxies else {
        bail!("{} needs two proxies", kind.name());
    };
    let dirs = mesh::MeshDirs::create(&tmp.join(kind.name()))?;
    mesh::write_atomically(
        &dirs.manifests.join("bench.yaml"),
        &mesh::manifests(b.inbound, kind == ScenarioKind::Weft2Mtls),
    )?;
    let ports = free_addrs(3)?;
    let addrs = mesh::ControllerAddrs {
        destination: ports[0],
        identity: ports[1],
        admin: ports[2],
    };
    let log = tmp.join(format!("{}-controller.log", kind.name()));
    let child =
        mesh::start_controller(&cfg.controller_bin, &dirs, &addrs, cfg.mesh_cpu, &log).await?;
    add_process(report, owned, child, "controller");
    let client_token =
        mesh::mint_token(&cfg.controller_bin, &dirs, mesh::NAMESPACE, mesh::CLIENT_SA)?;
    let server_token =
        mesh::mint_token(&cfg.controller_bin, &dirs, mesh::NAMESPACE, mesh::SERVER_SA)?;
    let client = mesh::Workload {
        service_account: mesh::CLIENT_SA,
        pod: "client-0",
        token: &client_token,
    };
    let server = mesh::Workload {
        service_account: mesh::SERVER_SA,
        pod: mesh::SERVER_POD,
        token: &server_token,
    };
    Ok(vec![
        mesh::identity_env(&addrs, &dirs, &client, true),
        mesh::identity_env(&addrs, &dirs, &server, false),
    ])
}

/// Every sample of `GET http://admin/metrics` (a proxy's or the controller's admin port).
pub async fn scrape(admin: SocketAddr) -> anyhow::Result<Vec<prom::Sample>> {
    let (status, body) = process::http_get(admin, "/metrics")
        .await
        .with_context(|| format!("reading http://{admin}/metrics"))?;
    if !status.is_success() {
        bail!("GET http://{admin}/metrics answered {status}");
    }
    Ok(prom::parse(&body))
}

/// Reads the counters [`verify_mesh`] checks from proxies A and B.
async fn read_mesh_counters(
    a: SocketAddr,
    b: SocketAddr,
    requests: u64,
) -> anyhow::Result<MeshCheck> {
    let (a, b) = (scrape(a).await?, scrape(b).await?);
    let client = mesh::spiffe_id(mesh::NAMESPACE, mesh::CLIENT_SA);
    let server = mesh::spiffe_id(mesh::NAMESPACE, mesh::SERVER_SA);
    Ok(MeshCheck {
        requests,
        routed_by_discovery: prom::sum(
            &a,
            OUTBOUND_ROUTES,
            &[("protocol", "http"), ("route", "balanced")],
        ),
        tls_outbound: prom::sum(
            &a,
            TLS_CONNECTIONS,
            &[
                ("direction", "outbound"),
                ("tls", "true"),
                ("peer_id", &server),
            ],
        ),
        tls_inbound: prom::sum(
            &b,
            TLS_CONNECTIONS,
            &[
                ("direction", "inbound"),
                ("tls", "true"),
                ("peer_id", &client),
            ],
        ),
        tls_any: prom::sum(&a, TLS_CONNECTIONS, &[("tls", "true")])
            + prom::sum(&b, TLS_CONNECTIONS, &[("tls", "true")]),
    })
}

/// Starts HAProxy; returns the generator's entry.
async fn start_haproxy(
    cfg: &RunConfig,
    server: SocketAddr,
    tmp: &Path,
    owned: &mut Vec<Owned>,
    report: &mut ScenarioReport,
) -> anyhow::Result<SocketAddr> {
    if !cfg.haproxy_bin.is_file() {
        bail!(
            "haproxy not found at {}: install it (`apt-get install -y haproxy`), pass --haproxy-bin, or drop the haproxy scenario",
            cfg.haproxy_bin.display()
        );
    }
    let ports = free_addrs(2)?;
    let addrs = haproxy::HaproxyAddrs {
        frontend: ports[0],
        monitor: ports[1],
        backend: server,
    };
    let config = tmp.join("haproxy.cfg");
    std::fs::write(
        &config,
        haproxy::render_config(&addrs, cfg.protocol.is_h2()),
    )
    .with_context(|| format!("writing {}", config.display()))?;
    let child = Child::spawn(
        "haproxy",
        haproxy::command(&cfg.haproxy_bin, &config),
        cfg.mesh_cpu,
        &tmp.join("haproxy.log"),
    )?;
    add_process(report, owned, child, "haproxy");
    if let Some(o) = owned.last_mut() {
        wait_ready(
            &mut o.child,
            addrs.monitor,
            "/ready",
            Duration::from_secs(10),
        )
        .await?;
    }
    Ok(addrs.frontend)
}

fn read_cpus(pids: &[u32]) -> anyhow::Result<Vec<CpuTicks>> {
    pids.iter().map(|&pid| procfs::read_cpu(pid)).collect()
}

/// Fills CPU per request and utilisation of each process for one run.
fn cpu_figures(
    before: &[CpuTicks],
    after: &[CpuTicks],
    requests: u64,
    wall: Duration,
) -> Vec<(f64, f64)> {
    let hz = procfs::ticks_per_sec();
    before
        .iter()
        .zip(after)
        .map(|(b, a)| {
            let cpu = a.since(*b, hz).as_secs_f64();
            let per_req = if requests > 0 {
                cpu * 1e6 / requests as f64
            } else {
                0.0
            };
            let util = if wall.as_secs_f64() > 0.0 {
                cpu / wall.as_secs_f64()
            } else {
                0.0
            };
            (per_req, util)
        })
        .collect()
}

/// Starts what the scenario needs and measures it. Fills `report` as it
/// goes, so that a failure keeps what was measured before it.
async fn measure(
    cfg: &RunConfig,
    kind: ScenarioKind,
    server: &mut Child,
    server_addr: SocketAddr,
    tmp: &Path,
    owned: &mut Vec<Owned>,
    report: &mut ScenarioReport,
) -> anyhow::Result<()> {
    let mut proxies = Vec::new();
    let entry = match kind {
        ScenarioKind::Direct => server_addr,
        ScenarioKind::Haproxy => start_haproxy(cfg, server_addr, tmp, owned, report).await?,
        _ => {
            proxies = start_weft(cfg, kind, server_addr, tmp, owned, report).await?;
            proxies
                .first()
                .map(|p| p.outbound)
                .context("no proxy was started")?
        }
    };
    report.entry = Some(entry);
    report.processes.push(ProcessReport {
        name: "bench server".into(),
        kind: "server",
        pid: server.pid(),
        ..Default::default()
    });
    let pids: Vec<u32> = report.processes.iter().map(|p| p.pid).collect();

    tokio::time::sleep(cfg.settle).await;
    for p in &mut report.processes {
        let mem = procfs::read_mem(p.pid)?;
        p.rss_idle_kib = mem.rss_kib;
        p.threads = mem.threads;
        p.cpus_allowed = mem.cpus_allowed;
    }

    // Routed by name through the controller, or to the fixed target whatever the Host.
    let authority = if kind.uses_controller() {
        mesh::authority()
    } else {
        server_addr.to_string()
    };
    let spec = LoadSpec {
        connect: entry,
        authority,
        protocol: cfg.protocol,
        connections: cfg.connections,
        streams: cfg.streams,
        request_size: cfg.request_size,
        response_size: cfg.response_size,
    };
    let mut load = LoadGenerator::connect(&spec, cfg.timeout)
        .await
        .with_context(|| format!("connecting to {entry}"))?;
    report.slots = load.slots();
    let open = Pacing::Open { rate: cfg.rate };
    // Responses over every run, for the mesh counters.
    let mut requests = 0;
    if !cfg.warmup.is_zero() {
        let warm = load.run(open, cfg.warmup).await?;
        requests += warm.ok + warm.errors;
        tracing::info!(
            scenario = kind.name(),
            "warm-up: {}",
            warm.summary().one_line()
        );
    }

    let before = read_cpus(&pids)?;
    let sampler = RssSampler::start(pids.clone(), Duration::from_millis(100));
    let started = Instant::now();
    let run = load.run(open, cfg.duration).await?;
    requests += run.ok + run.errors;
    let wall = started.elapsed();
    let peaks = sampler.finish().await;
    let after = read_cpus(&pids)?;
    for ((p, peak), (per_req, util)) in report
        .processes
        .iter_mut()
        .zip(&peaks)
        .zip(cpu_figures(&before, &after, run.ok, wall))
    {
        p.rss_load_kib = *peak;
        p.cpu_us_per_req = Some(per_req);
        p.cpu_util = Some(util);
    }
    let summary = run.summary();
    tracing::info!(
        scenario = kind.name(),
        "at {} req/s: {}",
        cfg.rate,
        summary.one_line()
    );
    report.latency = Some(summary);

    if !cfg.max_duration.is_zero() {
        let before = read_cpus(&pids)?;
        let started = Instant::now();
        let run = load.run(Pacing::Closed, cfg.max_duration).await?;
        requests += run.ok + run.errors;
        let wall = started.elapsed();
        let after = read_cpus(&pids)?;
        for (p, (per_req, util)) in report
            .processes
            .iter_mut()
            .zip(cpu_figures(&before, &after, run.ok, wall))
        {
            p.cpu_us_per_req_max = Some(per_req);
            p.cpu_util_max = Some(util);
        }
        let summary = run.summary();
        tracing::info!(
            scenario = kind.name(),
            "max throughput: {}",
            summary.one_line()
        );
        report.max_throughput = Some(summary);
    }
    drop(load);

    for p in &mut report.processes {
        p.hwm_kib = procfs::read_mem(p.pid).map(|m| m.hwm_kib).unwrap_or(0);
    }
    if let (true, [a, b]) = (kind.uses_controller(), proxies.as_slice()) {
        let counters = read_mesh_counters(a.admin, b.admin, requests).await?;
        tracing::info!(scenario = kind.name(), ?counters, "proxy counters");
        report.mesh = Some(counters.clone());
        // Reuse: at most one connection per generator connection, far from one per request.
        verify_mesh(kind, &counters, cfg.connections)
            .map_err(|e| anyhow::anyhow!("{}: {e}", kind.name()))?;
    }

    for o in owned.iter_mut() {
        o.child.ensure_running()?;
    }
    server.ensure_running()
}

async fn run_scenario(
    cfg: &RunConfig,
    kind: ScenarioKind,
    server: &mut Child,
    server_addr: SocketAddr,
    tmp: &Path,
) -> ScenarioReport {
    let mut report = ScenarioReport {
        scenario: kind,
        hops: kind.hops(),
        entry: None,
        slots: 0,
        latency: None,
        max_throughput: None,
        processes: Vec::new(),
        mesh: None,
        error: None,
    };
    let mut owned = Vec::new();
    let result = measure(cfg, kind, server, server_addr, tmp, &mut owned, &mut report).await;
    for o in owned {
        let outcome = o.child.stop(Duration::from_secs(5)).await;
        if let Some(p) = report.processes.get_mut(o.row) {
            p.stop = outcome;
        }
    }
    if let Err(e) = result {
        tracing::error!(scenario = kind.name(), "{e:#}");
        report.error = Some(format!("{e:#}"));
    }
    report
}

/// Runs every scenario of `cfg` in order against one bench server.
pub async fn run(cfg: &RunConfig) -> anyhow::Result<Vec<ScenarioReport>> {
    let tmp = make_temp_dir()?;
    tracing::info!(dir = %tmp.display(), "configs and logs");
    let (mut server, server_addr) =
        start_server(&cfg.bench_bin, cfg.response_size, cfg.mesh_cpu, &tmp).await?;
    tracing::info!(%server_addr, pid = server.pid(), "bench server ready");
    let mut reports = Vec::new();
    for (i, &kind) in cfg.scenarios.iter().enumerate() {
        if i > 0 {
            // Let the previous scenario's sockets and processes go.
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        server.ensure_running()?;
        tracing::info!(scenario = kind.name(), "starting");
        reports.push(run_scenario(cfg, kind, &mut server, server_addr, &tmp).await);
    }
    let _ = server.stop(Duration::from_secs(5)).await;
    if reports.iter().all(|r| r.error.is_none()) {
        let _ = std::fs::remove_dir_all(&tmp);
    } else {
        tracing::warn!(dir = %tmp.display(), "some scenarios failed; their logs are kept");
    }
    Ok(reports)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_addrs_are_distinct_loopback_ports() {
        let addrs = free_addrs(6).expect("ports");
        let mut ports: Vec<u16> = addrs.iter().map(|a| a.port()).collect();
        ports.sort_unstable();
        ports.dedup();
        assert_eq!(ports.len(), 6);
        assert!(addrs.iter().all(|a| a.ip().is_loopback()));
    }

    fn counters(requests: u64, routed: f64, out: f64, inb: f64) -> MeshCheck {
        MeshCheck {
            requests,
            routed_by_discovery: routed,
            tls_outbound: out,
            tls_inbound: inb,
            tls_any: out + inb,
        }
    }

    #[test]
    fn mtls_needs_both_sides_few_connections_and_discovery() {
        let k = ScenarioKind::Weft2Mtls;
        assert_eq!(
            verify_mesh(k, &counters(20_000, 20_000.0, 1.0, 1.0), 16),
            Ok(())
        );
        // A few requests may pass through while the first resolution is pending.
        assert_eq!(
            verify_mesh(k, &counters(20_000, 19_990.0, 2.0, 2.0), 16),
            Ok(())
        );
        let no_routes = verify_mesh(k, &counters(20_000, 0.0, 1.0, 1.0), 16);
        assert!(no_routes.is_err_and(|e| e.contains("0 of 20000 requests")));
        let plaintext = verify_mesh(k, &counters(20_000, 20_000.0, 0.0, 0.0), 16);
        assert!(
            plaintext.is_err_and(|e| e.contains("no outbound mTLS connection")
                && e.contains("peer_id=\"spiffe://cluster.local/ns/bench/sa/server\""))
        );
        let one_sided = verify_mesh(k, &counters(20_000, 20_000.0, 1.0, 0.0), 16);
        assert!(one_sided.is_err_and(|e| e.contains(
            "no inbound mTLS connection from spiffe://cluster.local/ns/bench/sa/client"
        )));
        let per_request = verify_mesh(k, &counters(20_000, 20_000.0, 20_000.0, 20_000.0), 16);
        assert!(per_request.is_err_and(|e| e.contains("not reused")));
        assert!(verify_mesh(k, &counters(100, 100.0, 17.0, 1.0), 16).is_err());
    }

    #[test]
    fn plaintext_discovery_must_not_use_tls() {
        let k = ScenarioKind::Weft2Disc;
        assert_eq!(
            verify_mesh(k, &counters(1000, 1000.0, 0.0, 0.0), 16),
            Ok(())
        );
        assert!(verify_mesh(k, &counters(1000, 1000.0, 1.0, 0.0), 16).is_err());
        assert!(verify_mesh(k, &counters(1000, 10.0, 0.0, 0.0), 16).is_err());
    }

    #[test]
    fn scenario_names_round_trip() {
        use clap::ValueEnum as _;
        for k in ScenarioKind::value_variants() {
            assert_eq!(ScenarioKind::from_str(k.name(), false), Ok(*k));
            assert_eq!(
                serde_json::to_value(k).expect("json"),
                serde_json::Value::String(k.name().to_owned())
            );
        }
        assert_eq!(ScenarioKind::Weft2Mtls.hops(), 2);
        assert!(ScenarioKind::Weft2Disc.is_weft() && ScenarioKind::Weft2Disc.uses_controller());
        assert!(!ScenarioKind::Weft2.uses_controller());
    }

    #[test]
    fn cpu_per_request_and_utilisation() {
        let hz = procfs::ticks_per_sec() as f64;
        let before = [CpuTicks { utime: 0, stime: 0 }];
        // One second of CPU over 2 s of wall time and 10 000 requests.
        let after = [CpuTicks {
            utime: hz as u64,
            stime: 0,
        }];
        let figs = cpu_figures(&before, &after, 10_000, Duration::from_secs(2));
        assert!((figs[0].0 - 100.0).abs() < 1e-6, "{figs:?}");
        assert!((figs[0].1 - 0.5).abs() < 1e-6, "{figs:?}");
        assert_eq!(
            cpu_figures(&before, &after, 0, Duration::ZERO),
            vec![(0.0, 0.0)]
        );
    }
}

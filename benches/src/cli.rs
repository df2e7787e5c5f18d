//! The command line: `run` (the scenarios), `server` (the bench server),
//! `load` (the generator alone, against any loopback address), `balance`,
//! `handshakes` (new mTLS connections per proxy core), and the traffic-policy benchmarks
//! `retries`, `ejection` and `routing-cost` ([`crate::policy`]).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context as _};
use clap::{Args, Parser, Subcommand};

use crate::load::{LoadGenerator, LoadSpec, Pacing, Protocol};
use crate::report::{self, LoadConfig, Machine, Report};
use crate::scenario::{self, RunConfig, ScenarioKind};
use crate::sys::affinity;

#[derive(Debug, Parser)]
#[command(
    name = "weft-bench",
    version,
    about = "Open-loop load generator and benchmark scenarios for Weft"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    /// tracing filter for the bench's own logs (stderr).
    #[arg(
        long,
        env = "WEFT_BENCH_LOG",
        default_value = "warn,weft_bench=info",
        global = true
    )]
    pub log: String,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run scenarios and write RESULTS.md and out/<name>.json.
    Run(RunArgs),
    /// Serve the bench endpoints (HTTP/1.1, HTTP/2, gRPC echo) until SIGTERM.
    Server(ServerArgs),
    /// Run the generator alone against a loopback address and print a summary.
    Load(LoadArgs),
    /// Balancer quality: three endpoints, one slow, behind a proxy using the controller;
    /// writes BALANCE.md.
    Balance(crate::balance::BalanceArgs),
    /// New inbound connections per second per proxy CPU-second: mutual TLS into
    /// weft-proxy against plaintext and HAProxy; writes a section of RESULTS.md.
    Handshakes(crate::handshake::HandshakeArgs),
    /// Issue 12 (a): a backend failing every 5th request, with and without a route retry;
    /// client-seen success and extra backend load. Writes a section of RESULTS.md.
    Retries(crate::policy::retries::RetriesArgs),
    /// Issue 12 (b): one of three endpoints hard-failing; time to ejection and success after
    /// it, against three healthy endpoints. Writes a section of RESULTS.md.
    Ejection(crate::policy::PolicyArgs),
    /// Issue 12 (c): CPU and latency of a two-hop path with an HTTPRoute of 10 rules and
    /// retries (none firing) against no route. Writes a section of RESULTS.md.
    RoutingCost(crate::policy::PolicyArgs),
    /// Issue 13 (root): pod-to-pod throughput and request rate with 50 NetworkPolicies in
    /// the eBPF datapath against no eBPF, and policy change to enforcement with 1,000 pods in
    /// the index. Writes a section of RESULTS.md.
    Netpol(crate::netpol::NetpolArgs),
    /// Issue 14 (root): new connections per second from a pod to a ClusterIP with 1,000
    /// Services loaded, through the eBPF datapath against kube-proxy's iptables DNAT rules.
    ClusterIp(crate::cluster_ip::ClusterIpArgs),
    /// Issue 14 (root): TCP throughput between pods on two nodes over Weft's direct routing
    /// and VXLAN (eBPF datapath and agents) against the same underlay with plain routes and
    /// no eBPF.
    CrossNode(crate::cross_node::CrossNodeArgs),
    /// Issue 15: CPU per request of a two-hop path with distributed tracing off, on at the
    /// default sampling (0) and on at 100 %. Writes a section of RESULTS.md.
    TracingCost(crate::policy::PolicyArgs),
}

/// Parses "15s", "500ms", "1.5s", "2m" or a bare number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (number, scale) = if let Some(n) = s.strip_suffix("ms") {
        (n, 1e-3)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1.0)
    } else if let Some(n) = s.strip_suffix('m') {
        (n, 60.0)
    } else {
        (s, 1.0)
    };
    let value: f64 = number
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 15s or 500ms"))?;
    if !value.is_finite() || value < 0.0 {
        return Err(format!("{s:?} is not a non-negative duration"));
    }
    Ok(Duration::from_secs_f64(value * scale))
}

pub(crate) fn parse_rate(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(r) if r.is_finite() && r > 0.0 => Ok(r),
        _ => Err(format!(
            "{s:?} is not a positive rate in requests per second"
        )),
    }
}

/// Only loopback targets: the bench never sends traffic off the machine.
fn parse_loopback(s: &str) -> Result<SocketAddr, String> {
    let addr: SocketAddr = s
        .parse()
        .map_err(|_| format!("{s:?} is not an ip:port address"))?;
    if !addr.ip().is_loopback() {
        return Err(format!(
            "{addr} is not a loopback address; weft-bench only sends to 127.0.0.0/8 or ::1"
        ));
    }
    Ok(addr)
}

#[derive(Debug, Clone, Args)]
pub struct LoadShape {
    /// Wire protocol.
    #[arg(long, value_enum, default_value_t = Protocol::Http1)]
    pub protocol: Protocol,
    /// TCP connections the generator opens.
    #[arg(long, default_value_t = 16)]
    pub connections: usize,
    /// Requests in flight per HTTP/2 connection (HTTP/1.1 always has one).
    #[arg(long, default_value_t = 8)]
    pub streams: usize,
    /// Request body bytes (POST; 0 sends GET). For gRPC, the message size.
    #[arg(long, default_value_t = 1024)]
    pub request_size: usize,
    /// Response body bytes the bench server sends (gRPC echoes the request).
    #[arg(long, default_value_t = 1024)]
    pub response_size: usize,
    /// Per-request timeout; a request slower than this is an error.
    #[arg(long, value_parser = parse_duration, default_value = "10s")]
    pub timeout: Duration,
}

#[derive(Debug, Clone, Args)]
pub struct RunArgs {
    /// Scenarios to run, in order, in this one invocation.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "direct,weft1,weft2,haproxy"
    )]
    pub scenarios: Vec<ScenarioKind>,
    /// Open-loop target rate, requests per second.
    #[arg(long, value_parser = parse_rate, default_value = "1000")]
    pub rate: f64,
    #[command(flatten)]
    pub shape: LoadShape,
    /// Measured open-loop run per scenario [default: 15s, --quick 3s].
    #[arg(long, value_parser = parse_duration)]
    pub duration: Option<Duration>,
    /// Warm-up before it, not measured [default: 2s, --quick 1s].
    #[arg(long, value_parser = parse_duration)]
    pub warmup: Option<Duration>,
    /// Closed-loop max-throughput run per scenario, 0 to skip
    /// [default: 10s, --quick 2s].
    #[arg(long, value_parser = parse_duration)]
    pub max_duration: Option<Duration>,
    /// Short runs for a smoke test; RESULTS.md is only written if --results
    /// is given.
    #[arg(long)]
    pub quick: bool,
    #[command(flatten)]
    pub common: CommonArgs,
}

/// The Weft binaries a benchmark starts (`run`, `handshakes`, `balance`).
#[derive(Debug, Clone, Args)]
pub struct BinArgs {
    /// weft-proxy binary [default: next to this executable].
    #[arg(long)]
    pub proxy_bin: Option<PathBuf>,
    /// weft-controller binary, when a scenario or target needs one [default: next to this
    /// executable].
    #[arg(long)]
    pub controller_bin: Option<PathBuf>,
}

impl BinArgs {
    /// --proxy-bin, or `weft-proxy` next to `exe`.
    pub fn proxy(&self, exe: &Path) -> PathBuf {
        self.proxy_bin
            .clone()
            .unwrap_or_else(|| exe.with_file_name("weft-proxy"))
    }

    /// --controller-bin, or `weft-controller` next to `exe`.
    pub fn controller(&self, exe: &Path) -> PathBuf {
        self.controller_bin
            .clone()
            .unwrap_or_else(|| exe.with_file_name("weft-controller"))
    }
}

/// Which CPU the generator runs on and which one everything it measures shares.
#[derive(Debug, Clone, Args)]
pub struct PinArgs {
    /// CPU the load generator runs on.
    #[arg(long, default_value_t = 0)]
    pub load_cpu: usize,
    /// CPU the bench server(s), the proxies, HAProxy and the controller run on.
    #[arg(long, default_value_t = 1)]
    pub mesh_cpu: usize,
    /// Do not pin anything to CPUs.
    #[arg(long)]
    pub no_pin: bool,
}

impl PinArgs {
    /// (load CPU, mesh CPU) on a machine with `cpus` online CPUs, or `None` when pinning
    /// was not asked for or cannot be done as asked.
    pub fn plan(&self, cpus: usize) -> Option<(usize, usize)> {
        let possible = cpus >= 2
            && self.load_cpu < cpus
            && self.mesh_cpu < cpus
            && self.load_cpu != self.mesh_cpu;
        (!self.no_pin && possible).then_some((self.load_cpu, self.mesh_cpu))
    }

    /// Pins this thread to the load CPU when [`plan`](Self::plan) allows (warning when
    /// pinning was asked for but cannot be done) and returns the plan. Call it before the
    /// runtime exists, so that every thread inherits the mask.
    pub fn pin(&self) -> anyhow::Result<Option<(usize, usize)>> {
        let cpus = affinity::online_cpus();
        let plan = self.plan(cpus);
        match plan {
            Some((load, _)) => pin_self(load)?,
            None if !self.no_pin => tracing::warn!(
                cpus,
                load_cpu = self.load_cpu,
                mesh_cpu = self.mesh_cpu,
                "cannot pin as asked; running unpinned"
            ),
            None => {}
        }
        Ok(plan)
    }
}

/// The flags `run` and `handshakes` share: the binaries they start, where their reports
/// go, and the CPUs.
#[derive(Debug, Clone, Args)]
pub struct CommonArgs {
    #[command(flatten)]
    pub bins: BinArgs,
    /// HAProxy binary.
    #[arg(long, default_value = "/usr/sbin/haproxy")]
    pub haproxy_bin: PathBuf,
    /// Markdown report to splice a section into [default: benches/RESULTS.md, not written
    /// by `run --quick`].
    #[arg(long)]
    pub results: Option<PathBuf>,
    /// Do not write the markdown report.
    #[arg(long, conflicts_with = "results")]
    pub no_results: bool,
    /// Directory for <name>.json [default: benches/out].
    #[arg(long)]
    pub out_dir: Option<PathBuf>,
    /// Name of the run (JSON file and RESULTS.md section) [default: `run`:
    /// <protocol>-<scenarios>, `handshakes`: handshakes-<http>].
    #[arg(long)]
    pub name: Option<String>,
    #[command(flatten)]
    pub pin: PinArgs,
}

impl CommonArgs {
    /// Writes `<out-dir>/<name>.json` and, unless --no-results (or `no_default_results`
    /// without --results), splices `section` into the markdown report under `name`; then
    /// prints `md` and the paths written.
    pub fn write_reports(
        &self,
        name: &str,
        doc: &impl serde::Serialize,
        md: &str,
        section: &str,
        no_default_results: bool,
    ) -> anyhow::Result<()> {
        let out_dir = self
            .out_dir
            .clone()
            .unwrap_or_else(|| crate_dir().join("out"));
        std::fs::create_dir_all(&out_dir)
            .with_context(|| format!("creating {}", out_dir.display()))?;
        let json_path = out_dir.join(format!("{name}.json"));
        let json = serde_json::to_string_pretty(doc).context("encoding the JSON report")?;
        std::fs::write(&json_path, json + "\n")
            .with_context(|| format!("writing {}", json_path.display()))?;

        let results = match (&self.results, no_default_results || self.no_results) {
            (Some(p), _) => Some(p.clone()),
            (None, false) => Some(crate_dir().join("RESULTS.md")),
            (None, true) => None,
        };
        if let Some(path) = &results {
            // One file collects several runs (one section per run name); text outside the
            // generated sections, such as analysis, is kept.
            let existing = match std::fs::read_to_string(path) {
                Ok(s) => s,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
                Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
            };
            let updated = report::splice(&existing, name, section);
            std::fs::write(path, updated).with_context(|| format!("writing {}", path.display()))?;
        }
        println!("{md}");
        println!("JSON: {}", json_path.display());
        if let Some(path) = results {
            println!("Markdown: {}", path.display());
        }
        Ok(())
    }
}

/// Figures from a debug build are not worth comparing: say so before measuring.
pub fn warn_if_debug_build() {
    if cfg!(debug_assertions) {
        tracing::warn!(
            "weft-bench is a debug build: build with --release for figures worth comparing"
        );
    }
}

#[derive(Debug, Clone, Args)]
pub struct ServerArgs {
    /// Listen address (loopback).
    #[arg(long, value_parser = parse_loopback, default_value = "127.0.0.1:0")]
    pub listen: SocketAddr,
    /// Response body bytes.
    #[arg(long, default_value_t = 1024)]
    pub response_size: usize,
    /// Answer every N-th request (by arrival) with 503: 5 fails 20 %, 1 fails every request
    /// (a hard-failing endpoint), 0 none.
    #[arg(long, default_value_t = 0)]
    pub fail_every: u64,
}

#[derive(Debug, Clone, Args)]
pub struct LoadArgs {
    /// Where to send (loopback only).
    #[arg(long, value_parser = parse_loopback)]
    pub target: SocketAddr,
    /// Host / :authority [default: the target].
    #[arg(long)]
    pub authority: Option<String>,
    /// Open-loop rate; without it, a closed-loop max-throughput run.
    #[arg(long, value_parser = parse_rate)]
    pub rate: Option<f64>,
    #[command(flatten)]
    pub shape: LoadShape,
    #[arg(long, value_parser = parse_duration, default_value = "10s")]
    pub duration: Duration,
    #[arg(long, value_parser = parse_duration, default_value = "1s")]
    pub warmup: Duration,
    /// Pin the generator to this CPU.
    #[arg(long)]
    pub cpu: Option<usize>,
}

/// The directory of this crate's sources, where RESULTS.md lives.
pub fn crate_dir() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

pub fn current_thread_runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("building the tokio runtime")
}

fn pin_self(cpu: usize) -> anyhow::Result<()> {
    affinity::pin_current_thread(cpu)
        .with_context(|| format!("pinning the load generator to CPU {cpu}"))
}

/// Runs a parsed command line. Tracing is set up by the caller.
pub fn execute(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Server(args) => {
            let opts = crate::server::ServeOptions {
                response_size: args.response_size,
                fault: (args.fail_every > 0).then(|| crate::server::Fault::every(args.fail_every)),
                ..Default::default()
            };
            current_thread_runtime()?.block_on(crate::server::run(args.listen, opts))
        }
        Command::Load(args) => execute_load(args),
        Command::Run(args) => execute_run(args),
        Command::Balance(args) => crate::balance::execute(args),
        Command::Handshakes(args) => crate::handshake::execute(args),
        Command::Retries(args) => crate::policy::retries::execute(args),
        Command::Ejection(args) => crate::policy::ejection::execute(args),
        Command::RoutingCost(args) => crate::policy::cost::execute(args),
        Command::Netpol(args) => crate::netpol::execute(args),
        Command::ClusterIp(args) => crate::cluster_ip::execute(args),
        Command::CrossNode(args) => crate::cross_node::execute(args),
        Command::TracingCost(args) => crate::tracing_cost::execute(args),
    }
}

fn execute_load(args: LoadArgs) -> anyhow::Result<()> {
    if let Some(cpu) = args.cpu {
        pin_self(cpu)?;
    }
    let spec = LoadSpec {
        connect: args.target,
        authority: args.authority.unwrap_or_else(|| args.target.to_string()),
        protocol: args.shape.protocol,
        connections: args.shape.connections,
        streams: args.shape.streams,
        request_size: args.shape.request_size,
        response_size: args.shape.response_size,
    };
    let pacing = args
        .rate
        .map_or(Pacing::Closed, |rate| Pacing::Open { rate });
    current_thread_runtime()?.block_on(async {
        let mut load = LoadGenerator::connect(&spec, args.shape.timeout).await?;
        if !args.warmup.is_zero() {
            load.run(pacing, args.warmup).await?;
        }
        let stats = load.run(pacing, args.duration).await?;
        println!("{}", stats.summary().one_line());
        for e in &stats.error_samples {
            println!("error: {e}");
        }
        Ok(())
    })
}

/// Turns `run` flags into a [`RunConfig`].
pub fn run_config(args: &RunArgs, current_exe: &Path) -> anyhow::Result<RunConfig> {
    if args.scenarios.is_empty() {
        bail!("--scenarios is empty");
    }
    let (duration, warmup, max) = if args.quick {
        (
            Duration::from_secs(3),
            Duration::from_secs(1),
            Duration::from_secs(2),
        )
    } else {
        (
            Duration::from_secs(15),
            Duration::from_secs(2),
            Duration::from_secs(10),
        )
    };
    let common = &args.common;
    Ok(RunConfig {
        scenarios: args.scenarios.clone(),
        protocol: args.shape.protocol,
        rate: args.rate,
        connections: args.shape.connections.max(1),
        streams: if args.shape.protocol.is_h2() {
            args.shape.streams.max(1)
        } else {
            1
        },
        duration: args.duration.unwrap_or(duration),
        warmup: args.warmup.unwrap_or(warmup),
        max_duration: args.max_duration.unwrap_or(max),
        request_size: args.shape.request_size,
        response_size: args.shape.response_size,
        proxy_bin: common.bins.proxy(current_exe),
        controller_bin: common.bins.controller(current_exe),
        haproxy_bin: common.haproxy_bin.clone(),
        bench_bin: current_exe.to_owned(),
        mesh_cpu: (!common.pin.no_pin).then_some(common.pin.mesh_cpu),
        timeout: args.shape.timeout,
        settle: Duration::from_millis(500),
    })
}

/// Default name of a scenario set: "http1-direct-weft1-weft2-haproxy".
pub fn default_name(protocol: Protocol, scenarios: &[ScenarioKind]) -> String {
    let mut name = protocol.name().to_owned();
    for s in scenarios {
        name.push('-');
        name.push_str(s.name());
    }
    name
}

fn execute_run(args: RunArgs) -> anyhow::Result<()> {
    let exe = std::env::current_exe().context("finding this executable")?;
    let mut cfg = run_config(&args, &exe)?;
    warn_if_debug_build();
    cfg.mesh_cpu = args.common.pin.pin()?.map(|(_, mesh)| mesh);
    let name = args
        .common
        .name
        .clone()
        .unwrap_or_else(|| default_name(cfg.protocol, &cfg.scenarios));
    let started = std::time::SystemTime::now();

    let scenarios = current_thread_runtime()?.block_on(scenario::run(&cfg))?;

    let unix_time = report::unix_secs(started);
    let argv: Vec<String> = std::env::args().collect();
    let checks = report::checks(&scenarios);
    let report = Report {
        name: name.clone(),
        command: report::shell_command(&argv),
        unix_time,
        date_utc: report::utc_date(unix_time),
        machine: Machine::detect(&cfg),
        load: LoadConfig::from_run(&cfg),
        scenarios,
        checks,
    };

    let md = report::markdown(&report);
    let section = report::as_section(&md, &format!("Proxy hops: {name}"));
    args.common
        .write_reports(&name, &report, &md, &section, args.quick)?;
    let failed: Vec<_> = report
        .scenarios
        .iter()
        .filter(|r| r.error.is_some())
        .map(|r| r.scenario.name())
        .collect();
    if !failed.is_empty() {
        bail!("scenarios failed: {}", failed.join(", "));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("15s"), Ok(Duration::from_secs(15)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("1.5"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("0"), Ok(Duration::ZERO));
        assert!(parse_duration("-1s").is_err());
        assert!(parse_duration("soon").is_err());
    }

    #[test]
    fn only_loopback_targets() {
        assert!(parse_loopback("127.0.0.1:80").is_ok());
        assert!(parse_loopback("[::1]:80").is_ok());
        assert!(parse_loopback("10.0.0.1:80").is_err());
        assert!(parse_loopback("localhost").is_err());
    }

    /// The config of `weft-bench <argv>`, a `run` command, started from `exe`.
    fn run_cfg(argv: &[&str], exe: &str) -> RunConfig {
        let cli = Cli::try_parse_from(std::iter::once("weft-bench").chain(argv.iter().copied()))
            .expect("parse");
        let Command::Run(args) = cli.command else {
            panic!("not run")
        };
        run_config(&args, Path::new(exe)).expect("config")
    }

    #[test]
    fn run_defaults_and_quick() {
        let cfg = run_cfg(&["run"], "/t/release/weft-bench");
        assert_eq!(
            cfg.scenarios,
            vec![
                ScenarioKind::Direct,
                ScenarioKind::Weft1,
                ScenarioKind::Weft2,
                ScenarioKind::Haproxy
            ]
        );
        assert_eq!(cfg.rate, 1000.0);
        assert_eq!(cfg.connections, 16);
        assert_eq!(cfg.streams, 1);
        assert_eq!((cfg.request_size, cfg.response_size), (1024, 1024));
        assert_eq!(cfg.duration, Duration::from_secs(15));
        assert_eq!(cfg.warmup, Duration::from_secs(2));
        assert_eq!(cfg.proxy_bin, Path::new("/t/release/weft-proxy"));
        assert_eq!(cfg.controller_bin, Path::new("/t/release/weft-controller"));
        assert_eq!(cfg.mesh_cpu, Some(1));

        let cfg = run_cfg(
            &[
                "run",
                "--quick",
                "--scenarios",
                "direct,haproxy",
                "--protocol",
                "grpc",
                "--duration",
                "1s",
            ],
            "/x/weft-bench",
        );
        assert_eq!(
            cfg.scenarios,
            vec![ScenarioKind::Direct, ScenarioKind::Haproxy]
        );
        assert_eq!(cfg.duration, Duration::from_secs(1));
        assert_eq!(cfg.warmup, Duration::from_secs(1));
        assert_eq!(cfg.max_duration, Duration::from_secs(2));
        assert_eq!(cfg.streams, 8);
        assert_eq!(
            default_name(cfg.protocol, &cfg.scenarios),
            "grpc-direct-haproxy"
        );
    }

    #[test]
    fn mesh_scenarios_parse() {
        let cfg = run_cfg(
            &["run", "--scenarios", "weft2,weft2-disc,weft2-mtls"],
            "/x/weft-bench",
        );
        assert_eq!(
            cfg.scenarios,
            vec![
                ScenarioKind::Weft2,
                ScenarioKind::Weft2Disc,
                ScenarioKind::Weft2Mtls
            ]
        );
        assert_eq!(
            default_name(cfg.protocol, &cfg.scenarios),
            "http1-weft2-weft2-disc-weft2-mtls"
        );
    }

    #[test]
    fn shared_flags_parse_for_run_and_handshakes() {
        let cfg = run_cfg(
            &[
                "run",
                "--proxy-bin",
                "/p",
                "--controller-bin",
                "/c",
                "--haproxy-bin",
                "/h",
                "--no-pin",
            ],
            "/x/weft-bench",
        );
        assert_eq!(cfg.proxy_bin, Path::new("/p"));
        assert_eq!(cfg.controller_bin, Path::new("/c"));
        assert_eq!(cfg.haproxy_bin, Path::new("/h"));
        assert_eq!(cfg.mesh_cpu, None);

        let cli = Cli::try_parse_from([
            "weft-bench",
            "handshakes",
            "--name",
            "hs",
            "--out-dir",
            "/o",
            "--no-results",
            "--load-cpu",
            "2",
            "--mesh-cpu",
            "3",
        ])
        .expect("parse");
        let Command::Handshakes(args) = cli.command else {
            panic!("not handshakes")
        };
        let common = &args.common;
        assert_eq!(common.name.as_deref(), Some("hs"));
        assert_eq!(common.out_dir.as_deref(), Some(Path::new("/o")));
        assert!(common.no_results);
        assert_eq!(common.haproxy_bin, Path::new("/usr/sbin/haproxy"));
        assert_eq!((common.pin.load_cpu, common.pin.mesh_cpu), (2, 3));
        assert!(Cli::try_parse_from([
            "weft-bench",
            "handshakes",
            "--results",
            "/r.md",
            "--no-results"
        ])
        .is_err());
    }

    #[test]
    fn pins_only_two_distinct_online_cpus() {
        let pin = |load_cpu, mesh_cpu, no_pin| PinArgs {
            load_cpu,
            mesh_cpu,
            no_pin,
        };
        assert_eq!(pin(0, 1, false).plan(2), Some((0, 1)));
        assert_eq!(pin(2, 3, false).plan(4), Some((2, 3)));
        assert_eq!(pin(0, 1, true).plan(2), None);
        assert_eq!(pin(0, 1, false).plan(1), None);
        assert_eq!(pin(1, 1, false).plan(4), None);
        assert_eq!(pin(0, 2, false).plan(2), None);
    }

    #[test]
    fn rejects_unknown_scenarios() {
        assert!(Cli::try_parse_from(["weft-bench", "run", "--scenarios", "direct,envoy"]).is_err());
    }
}

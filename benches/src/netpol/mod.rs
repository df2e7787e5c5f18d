//! `weft-bench netpol` (root): issue 13's CNI figures, each against a baseline in the same
//! run.
//!
//! ```text
//! baseline node ns: client pod ──veth── (routes, proxy ARP) ──veth── server pod    nothing attached
//! subject node ns:  client pod ──veth══ weft datapath (tcx) ══veth── server pod    weft-cni ADD,
//!                   weft-cni-agent --source dir: (1,000 index Pods, 50 NetworkPolicies)
//!                   CPU 0: iperf3 -c, HTTP/1.1 generator, connection loop │ CPU 1: servers
//! ```
//!
//! 1. **Throughput and request rate ≥ 90 % of no eBPF.** Both nodes exist side by side, with
//!    the same pod addresses, MTU and routes; the baseline's pods are wired by hand as
//!    weft-cni wires them ([`ns::wire_plain`]), the subject's by the real plugin and agent,
//!    whose policies make the traffic isolated in both directions and allowed by one rule
//!    each way. Each round runs iperf3, a closed-loop HTTP/1.1 window and a new-connection
//!    window on both, in an order that alternates from round to round; ratios are per round.
//! 2. **Policy change → enforcement ≤ 1 s with 1,000 pods in the index**
//!    ([`change::measure`]): the subject's `probe-allow` policy is rewritten, its port flipped
//!    so the probe port is alternately denied and allowed, and a new TCP connection every
//!    ~10 ms times the flip; the agent's `weft_cni_policy_update_seconds` is read around
//!    each change to separate the source's 250 ms polling from its compute+write.
//!
//! Everything lives in guards ([`ns`]): the namespaces, the agent, the servers, the temporary
//! directory (manifests, IPAM leases, agent state) and the bpffs pin directory are removed on
//! return, error or panic.

pub mod change;
pub mod manifests;
pub mod ns;
pub mod report;
pub mod traffic;

use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use anyhow::{bail, ensure, Context as _, Result};
use clap::Args;
use serde::Serialize;

use crate::cli::parse_duration;
use crate::policy::order;
use manifests::{CONN_PORT, PODS_FILE, POLICIES, POLICIES_FILE, PROBE_FILE};
use ns::{Netns, PinDir, TempDir};
use report::{Figures, Pair, Setup, Verdicts};

#[derive(Debug, Clone, Args)]
pub struct NetpolArgs {
    /// Rounds of baseline + subject [default: 3, --quick 1].
    #[arg(long)]
    pub rounds: Option<usize>,
    /// iperf3 measured time per run (after a 1 s omitted ramp-up) [default: 10s, --quick 2s].
    #[arg(long, value_parser = parse_duration)]
    pub iperf_duration: Option<Duration>,
    /// iperf3 parallel streams.
    #[arg(long, default_value_t = 1)]
    pub streams: usize,
    /// Request and new-connection windows [default: 5s, --quick 2s].
    #[arg(long, value_parser = parse_duration)]
    pub duration: Option<Duration>,
    /// Warm-up before each request and new-connection window [default: 1s].
    #[arg(long, value_parser = parse_duration, default_value = "1s")]
    pub warmup: Duration,
    /// HTTP/1.1 connections of the closed-loop request window.
    #[arg(long, default_value_t = 16)]
    pub connections: usize,
    /// Concurrent connect-exchange-close loops of the new-connection window.
    #[arg(long, default_value_t = 16)]
    pub conn_concurrency: usize,
    /// Request body bytes (0: GET).
    #[arg(long, default_value_t = 0)]
    pub request_size: usize,
    /// Response body bytes.
    #[arg(long, default_value_t = 1024)]
    pub response_size: usize,
    /// MTU of every veth (both variants).
    #[arg(long, default_value_t = 1500)]
    pub mtu: u32,
    /// Pods in the agent's index besides the two real ones.
    #[arg(long, default_value_t = 1000)]
    pub index_pods: usize,
    /// Policy changes timed [default: 20, --quick 4].
    #[arg(long)]
    pub changes: Option<usize>,
    /// Short runs, one round; RESULTS.md is only written if --results is given.
    #[arg(long)]
    pub quick: bool,
    /// weft-cni-agent binary [default: next to weft-bench].
    #[arg(long)]
    pub agent_bin: Option<PathBuf>,
    /// weft-cni plugin binary [default: next to weft-bench].
    #[arg(long)]
    pub cni_bin: Option<PathBuf>,
    /// Markdown report to splice the block into [default: benches/RESULTS.md].
    #[arg(long)]
    pub results: Option<PathBuf>,
    /// Do not write the markdown report.
    #[arg(long, conflicts_with = "results")]
    pub no_results: bool,
    /// Directory for <name>.json [default: benches/out].
    #[arg(long)]
    pub out_dir: Option<PathBuf>,
    /// Name of the run (JSON file and RESULTS.md block).
    #[arg(long, default_value = "cni-netpol")]
    pub name: String,
    /// Do not pin clients to CPU 0 and servers to CPU 1.
    #[arg(long)]
    pub no_pin: bool,
}

/// Everything `benches/out/<name>.json` holds.
#[derive(Debug, Serialize)]
struct Doc<'a> {
    setup: &'a Setup,
    figures: &'a Figures,
    verdicts: &'a Verdicts,
    rounds: &'a [serde_json::Value],
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
enum Variant {
    Baseline,
    Subject,
}

fn beside_me(name: &str, given: &Option<PathBuf>) -> Result<PathBuf> {
    let p = match given {
        Some(p) => p.clone(),
        None => std::env::current_exe()?
            .parent()
            .context("weft-bench's directory")?
            .join(name),
    };
    ensure!(
        p.exists(),
        "{} is missing: `cargo build --release -p weft-bench -p weft-cni -p weft-cni-agent` \
         (or pass --agent-bin / --cni-bin)",
        p.display()
    );
    Ok(p)
}

fn preflight() -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!(
            "netpol needs root (network namespaces, eBPF, bpffs pins): run it with \
             sudo"
        );
    }
    ensure!(
        std::path::Path::new(ns::CNI_BIN_DIR)
            .join("host-local")
            .exists(),
        "{}/host-local is missing: install containernetworking-plugins (scripts/setup.sh)",
        ns::CNI_BIN_DIR
    );
    let v = std::process::Command::new("iperf3")
        .arg("--version")
        .output()
        .context("iperf3 is not installed (scripts/setup.sh installs it)")?;
    ensure!(v.status.success(), "iperf3 --version failed");
    ensure!(
        std::path::Path::new("/sys/fs/bpf").exists(),
        "/sys/fs/bpf is not mounted (mount -t bpf bpf /sys/fs/bpf)"
    );
    Ok(())
}

/// The two pods of one node.
struct Pods {
    node: Netns,
    client: Netns,
    server: Netns,
    client_ip: std::net::IpAddr,
}

pub fn execute(args: NetpolArgs) -> Result<()> {
    preflight()?;
    let agent_bin = beside_me("weft-cni-agent", &args.agent_bin)?;
    let cni_bin = beside_me("weft-cni", &args.cni_bin)?;
    let started = SystemTime::now();
    let rounds = args.rounds.unwrap_or(if args.quick { 1 } else { 3 }).max(1);
    let iperf_d = args.iperf_duration.unwrap_or(if args.quick {
        Duration::from_secs(2)
    } else {
        Duration::from_secs(10)
    });
    let window = args.duration.unwrap_or(if args.quick {
        Duration::from_secs(2)
    } else {
        Duration::from_secs(5)
    });
    let n_changes = args.changes.unwrap_or(if args.quick { 4 } else { 20 });
    let pinned = !args.no_pin && crate::sys::affinity::online_cpus() >= 2;
    let (client_cpu, server_cpu) = if pinned {
        (Some(0), Some(1))
    } else {
        (None, None)
    };

    // Guards, dropped in reverse: servers, agent, pods and nodes, then pins and files.
    let work = TempDir::new("netpol")?;
    let pins = PinDir::new("netpol");
    let manifests_dir = work.0.join("manifests");
    std::fs::create_dir_all(&manifests_dir)?;
    change::write_manifest(&manifests_dir, PODS_FILE, &manifests::pods(args.index_pods))?;
    change::write_manifest(&manifests_dir, POLICIES_FILE, &manifests::policies())?;
    change::write_manifest(&manifests_dir, PROBE_FILE, &manifests::probe_policy(true))?;

    let tag = std::process::id();
    // Subject: the agent, then the pods through the plugin.
    let s_node = Netns::named(format!("wbn{tag}-node-s"))?;
    tracing::info!(
        "starting weft-cni-agent with {} index pods",
        args.index_pods
    );
    let mut agent = ns::start_agent(&s_node, &agent_bin, &manifests_dir, &pins.0, &work.0)?;
    let conf = ns::plugin_conf(
        &work.0.join("cni.sock"),
        &work.0.join("ipam"),
        "10.77.0.0/24",
        args.mtu,
    );
    let s_client = Netns::named(format!("wbn{tag}-client-s"))?;
    let s_server = Netns::named(format!("wbn{tag}-server-s"))?;
    let r = ns::cni_add(
        &s_node,
        &cni_bin,
        &format!("wbn{tag}-client"),
        &s_client,
        ("bench", "client"),
        &conf,
    )
    .with_context(|| ns::tail(&work.0.join("agent.log"), 20))?;
    let (client_ip, client_cidr) = ns::result_addr(&r)?;
    let r = ns::cni_add(
        &s_node,
        &cni_bin,
        &format!("wbn{tag}-server"),
        &s_server,
        ("bench", "server"),
        &conf,
    )
    .with_context(|| ns::tail(&work.0.join("agent.log"), 20))?;
    let (server_ip, server_cidr) = ns::result_addr(&r)?;
    let subject = Pods {
        node: s_node,
        client: s_client,
        server: s_server,
        client_ip,
    };

    // Baseline: the same addresses and wiring, by hand, nothing attached.
    let b_node = Netns::named(format!("wbn{tag}-node-b"))?;
    let b_client = Netns::named(format!("wbn{tag}-client-b"))?;
    let b_server = Netns::named(format!("wbn{tag}-server-b"))?;
    ns::wire_plain(&b_node, &b_client, "hclient", &client_cidr, args.mtu)?;
    ns::wire_plain(&b_node, &b_server, "hserver", &server_cidr, args.mtu)?;
    let baseline = Pods {
        node: b_node,
        client: b_client,
        server: b_server,
        client_ip,
    };

    let _servers = [
        traffic::Servers::start(&baseline.server, server_ip, server_cpu, args.response_size)?,
        traffic::Servers::start(&subject.server, server_ip, server_cpu, args.response_size)?,
    ];
    let _probe = change::ProbeServer::start(&subject.server, server_ip)?;

    // Both paths carry the allowed traffic; only the subject enforces (a port no rule allows
    // is dropped there and refused by the kernel in the baseline).
    for (what, pods) in [("baseline", &baseline), ("subject", &subject)] {
        ensure!(
            change::probe(&pods.client, server_ip, CONN_PORT, Duration::from_secs(3))?,
            "{what}: client {} cannot reach server {server_ip}:{CONN_PORT}",
            pods.client_ip
        );
    }
    let closed = |pods: &Pods| -> Result<Option<std::io::ErrorKind>> {
        pods.client.run(move || {
            std::net::TcpStream::connect_timeout(
                &std::net::SocketAddr::new(server_ip, 7),
                Duration::from_millis(500),
            )
            .err()
            .map(|e| e.kind())
        })
    };
    ensure!(
        closed(&baseline)? == Some(std::io::ErrorKind::ConnectionRefused),
        "baseline: a closed port should be refused"
    );
    let dropped = closed(&subject)?;
    ensure!(
        matches!(dropped, Some(k) if k != std::io::ErrorKind::ConnectionRefused),
        "subject: port 7 (no rule allows it) was not dropped ({dropped:?}): is policy enforced?"
    );
    let baseline_programs = ns::attached_programs(&baseline.node)?;
    let subject_links = ns::pinned_links(&pins.0);
    ensure!(
        subject_links.len() >= 2,
        "the subject's datapath is not attached: pinned tcx links {subject_links:?}"
    );
    let subject_programs = format!("tcx links {}", subject_links.join(", "));
    ensure!(
        baseline_programs.is_empty(),
        "the baseline node has programs attached: {baseline_programs}"
    );

    let mut figures = Figures {
        throughput_gbit: Pair::new(),
        requests_per_s: Pair::new(),
        connections_per_s: Pair::new(),
        agent_cpu_conn: Vec::new(),
        changes: Vec::new(),
    };
    let mut per_round = Vec::new();
    for round in 0..rounds {
        for v in order(&[Variant::Baseline, Variant::Subject], round) {
            let pods = match v {
                Variant::Baseline => &baseline,
                Variant::Subject => &subject,
            };
            agent.check_alive()?;
            let t = traffic::iperf(&pods.client, server_ip, iperf_d, args.streams, client_cpu)?;
            let cpu0 = agent_cpu(&agent);
            let r = traffic::requests(
                &pods.client,
                server_ip,
                args.connections,
                args.request_size,
                args.response_size,
                args.warmup,
                window,
                client_cpu,
            )?;
            let cpu1 = agent_cpu(&agent);
            let c = traffic::connections(
                &pods.client,
                server_ip,
                args.conn_concurrency,
                args.warmup,
                window,
                client_cpu,
            )?;
            let cpu2 = agent_cpu(&agent);
            // Only the subject's windows load the agent (the baseline's traffic is elsewhere).
            let agent_share = |a: Option<Duration>, b: Option<Duration>, wall: Duration| {
                (v == Variant::Subject)
                    .then(|| Some((b? - a?).as_secs_f64() / wall.as_secs_f64()))
                    .flatten()
            };
            let agent_rr = agent_share(cpu0, cpu1, args.warmup + window);
            let agent_conn = agent_share(cpu1, cpu2, args.warmup + window);
            if let Some(a) = agent_conn {
                figures.agent_cpu_conn.push(a);
            }
            tracing::info!(
                "round {} {v:?}: {:.2} Gbit/s, {:.0} req/s ({} errors), {:.0} conn/s ({} errors)",
                round + 1,
                t.gbit_per_s,
                r.requests_per_s,
                r.errors,
                c.connections_per_s,
                c.errors
            );
            let (tp, rp, cp) = match v {
                Variant::Baseline => (
                    &mut figures.throughput_gbit.baseline,
                    &mut figures.requests_per_s.baseline,
                    &mut figures.connections_per_s.baseline,
                ),
                Variant::Subject => (
                    &mut figures.throughput_gbit.subject,
                    &mut figures.requests_per_s.subject,
                    &mut figures.connections_per_s.subject,
                ),
            };
            tp.push(t.gbit_per_s);
            rp.push(r.requests_per_s);
            cp.push(c.connections_per_s);
            per_round.push(serde_json::json!({
                "round": round + 1, "variant": v, "iperf": t, "requests": r, "connections": c,
                "agent_cpu_share": {"requests": agent_rr, "connections": agent_conn},
            }));
        }
    }

    tracing::info!("timing {n_changes} policy changes");
    figures.changes = change::measure(
        &subject.node,
        &subject.client,
        server_ip,
        &manifests_dir,
        n_changes,
        true,
    )?;
    agent.check_alive()?;
    let verdicts = report::verdicts(&figures);

    let machine = crate::report::Machine::probe(&agent_bin, None, None);
    let unix = crate::report::unix_secs(started);
    let argv: Vec<String> = std::env::args().collect();
    let setup = Setup {
        command: crate::report::shell_command(&argv),
        date_utc: crate::report::utc_date(unix),
        cpus: machine.cpus,
        cpu_model: machine.cpu_model,
        kernel: machine.kernel,
        release_build: machine.release_build,
        iperf3: std::process::Command::new("iperf3")
            .arg("--version")
            .output()
            .map(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .next()
                    .unwrap_or("")
                    .to_owned()
            })
            .unwrap_or_default(),
        rounds,
        iperf_seconds: iperf_d.as_secs_f64(),
        streams: args.streams,
        window_seconds: window.as_secs_f64(),
        warmup_seconds: args.warmup.as_secs_f64(),
        connections: args.connections,
        conn_concurrency: args.conn_concurrency,
        request_size: args.request_size,
        response_size: args.response_size,
        mtu: args.mtu,
        index_pods: args.index_pods,
        policies: POLICIES,
        changes: n_changes,
        pinned,
        baseline_programs,
        subject_programs,
    };
    let md = report::markdown(&args.name, &setup, &figures, &verdicts);
    write(
        &args,
        &Doc {
            setup: &setup,
            figures: &figures,
            verdicts: &verdicts,
            rounds: &per_round,
        },
        &md,
    )?;
    agent.stop();
    Ok(())
}

/// The agent's CPU time so far (utime + stime).
fn agent_cpu(agent: &ns::Proc) -> Option<Duration> {
    let pid = agent.child.as_ref()?.id();
    let t = crate::sys::procfs::read_cpu(pid).ok()?;
    Some(Duration::from_secs_f64(
        t.total() as f64 / crate::sys::procfs::ticks_per_sec() as f64,
    ))
}

fn write(args: &NetpolArgs, doc: &Doc<'_>, md: &str) -> Result<()> {
    let out_dir = args
        .out_dir
        .clone()
        .unwrap_or_else(|| crate::cli::crate_dir().join("out"));
    std::fs::create_dir_all(&out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    let json_path = out_dir.join(format!("{}.json", args.name));
    std::fs::write(&json_path, serde_json::to_string_pretty(doc)? + "\n")
        .with_context(|| format!("writing {}", json_path.display()))?;
    let results = match (&args.results, args.quick || args.no_results) {
        (Some(p), _) => Some(p.clone()),
        (None, false) => Some(crate::cli::crate_dir().join("RESULTS.md")),
        (None, true) => None,
    };
    if let Some(path) = &results {
        let existing = match std::fs::read_to_string(path) {
            Ok(s) => s,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        std::fs::write(path, crate::report::splice(&existing, &args.name, md))
            .with_context(|| format!("writing {}", path.display()))?;
    }
    println!("{md}");
    println!("JSON: {}", json_path.display());
    if let Some(p) = results {
        println!("Markdown: {}", p.display());
    }
    Ok(())
}

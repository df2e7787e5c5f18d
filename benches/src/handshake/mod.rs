//! `weft-bench handshakes`: how many new inbound mutual-TLS connections a Weft proxy accepts
//! per second of its own CPU, against plaintext connections and HAProxy in the same run.
//!
//! # Method
//!
//! A `weft-controller` (directory mode, development CA, see [`crate::scenario::mesh`])
//! issues the server-side proxy its certificate (`spiffe://cluster.local/ns/bench/sa/server`).
//! The bench signs itself a client leaf with the same CA
//! (`spiffe://cluster.local/ns/bench/sa/bench-client`, [`pki`]) and, for each target in turn,
//! runs `--concurrency` tasks that each loop on: TCP connect, TLS 1.3 handshake with that
//! client certificate (SNI `server.bench.serviceaccount.identity.cluster.local`, ALPN
//! `http/1.1` or `h2`, the server's chain and SPIFFE ID verified), one small GET, read the
//! response, close ([`client`]). No keep-alive and no session resumption: every connection is
//! a full handshake.
//!
//! Over a measured window (after a warm-up) the runner reads utime+stime of the proxy process
//! from `/proc/<pid>/stat` and reports:
//!
//! - connections completed per second (bounded by whichever side saturates first: the
//!   generator does about as much public-key work per connection as the server);
//! - the proxy's CPU per connection (µs) and its inverse, **connections per proxy
//!   core-second**: the figure that does not depend on who saturated;
//! - ratios of that figure to the baselines of the same run.
//!
//! Targets: `weft-plain` (the proxy's inbound without identity, TCP + HTTP), `weft-mtls`
//! (the proxy with its identity: it terminates the mTLS and forwards to the server),
//! `haproxy-plain` and `haproxy-tls` (HAProxy, one thread, terminating TLS 1.3 with an ECDSA
//! P-256 certificate from the same CA and verifying client certificates against the same trust
//! anchors). Each forwards to the bench server over reused keep-alive connections, so the
//! server side costs the same everywhere. For `weft-mtls` the proxy's own
//! `weft_tls_connections_total{direction="inbound",tls="true",peer_id=<bench-client>}` must
//! account for every connection, or the target fails.
//!
//! The generator runs on `--load-cpu`; the proxy (or HAProxy), the bench server and the
//! controller on `--mesh-cpu`, as in `weft-bench run`.

pub mod client;
pub mod pki;
pub mod report;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context as _};
use clap::Args;
use serde::Serialize;
use tokio::time::Instant;

use crate::cli::CommonArgs;
use crate::load::stats::fmt_us;
use crate::report::Machine;
use crate::scenario::mesh::{self, ControllerAddrs, MeshDirs, Workload};
use crate::scenario::process::{self, wait_ready, Child};
use crate::scenario::{self as scn, haproxy, prom, weft};
use crate::sys::procfs;
use client::{ChurnStats, Connector, HttpVersion, Wire};
pub use report::{figures, markdown, ratio, Figures, HandshakeReport, TargetResult};

/// The bench client's ServiceAccount (its certificate's identity).
pub const BENCH_CLIENT_SA: &str = "bench-client";

/// What the churning connections go to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Target {
    /// weft-proxy inbound without identity: TCP and one plaintext request.
    WeftPlain,
    /// weft-proxy inbound with its mesh identity: mutual TLS 1.3, then one request.
    WeftMtls,
    /// HAProxy (one thread), plaintext.
    HaproxyPlain,
    /// HAProxy (one thread) terminating TLS 1.3 and verifying client certificates.
    HaproxyTls,
}

impl Target {
    pub fn name(self) -> &'static str {
        match self {
            Target::WeftPlain => "weft-plain",
            Target::WeftMtls => "weft-mtls",
            Target::HaproxyPlain => "haproxy-plain",
            Target::HaproxyTls => "haproxy-tls",
        }
    }

    pub fn is_tls(self) -> bool {
        matches!(self, Target::WeftMtls | Target::HaproxyTls)
    }

    pub fn is_haproxy(self) -> bool {
        matches!(self, Target::HaproxyPlain | Target::HaproxyTls)
    }

    pub(crate) fn what(self, http: HttpVersion) -> String {
        let http = match http {
            HttpVersion::Http1 => "HTTP/1.1",
            HttpVersion::Http2 => "HTTP/2",
        };
        match self {
            Target::WeftPlain => format!("weft-proxy inbound, TCP + {http}"),
            Target::WeftMtls => format!("weft-proxy inbound, mTLS 1.3 + {http}"),
            Target::HaproxyPlain => format!("HAProxy, TCP + {http}"),
            Target::HaproxyTls => format!("HAProxy, TLS 1.3 + client cert + {http}"),
        }
    }
}

#[derive(Debug, Clone, Args)]
pub struct HandshakeArgs {
    /// Targets, in order.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "weft-plain,weft-mtls,haproxy-plain,haproxy-tls"
    )]
    pub targets: Vec<Target>,
    /// The one request of each connection.
    #[arg(long, value_enum, default_value_t = HttpVersion::Http1)]
    pub http: HttpVersion,
    /// Connections being opened at once (enough to keep both the generator and the proxy
    /// busy through the handshake's round trips).
    #[arg(long, default_value_t = 32)]
    pub concurrency: usize,
    /// Measured window per target.
    #[arg(long, value_parser = crate::cli::parse_duration, default_value = "10s")]
    pub duration: Duration,
    /// Warm-up per target, not measured.
    #[arg(long, value_parser = crate::cli::parse_duration, default_value = "2s")]
    pub warmup: Duration,
    /// Response body bytes.
    #[arg(long, default_value_t = 128)]
    pub response_size: usize,
    /// Bound on one whole connection.
    #[arg(long, value_parser = crate::cli::parse_duration, default_value = "5s")]
    pub timeout: Duration,
    #[command(flatten)]
    pub common: CommonArgs,
}

struct Bins {
    bench: PathBuf,
    proxy: PathBuf,
    controller: PathBuf,
    haproxy: PathBuf,
}

/// The dev CA, the proxy's token and the client's TLS config, when a TLS target runs.
struct Pki {
    dirs: MeshDirs,
    controller: ControllerAddrs,
    server_token: PathBuf,
    ca: pki::DevCa,
    client: Arc<rustls::ClientConfig>,
}

/// Runs the benchmark and writes the reports.
pub fn execute(args: HandshakeArgs) -> anyhow::Result<()> {
    if args.targets.is_empty() {
        bail!("--targets is empty");
    }
    let common = &args.common;
    let exe = std::env::current_exe().context("finding this executable")?;
    let bins = Bins {
        proxy: common.bins.proxy(&exe),
        controller: common.bins.controller(&exe),
        haproxy: common.haproxy_bin.clone(),
        bench: exe,
    };
    crate::cli::warn_if_debug_build();
    let pinned = common.pin.pin()?;
    let mesh_cpu = pinned.map(|(_, mesh)| mesh);
    let started = std::time::SystemTime::now();
    let results =
        crate::cli::current_thread_runtime()?.block_on(run_targets(&args, &bins, mesh_cpu))?;

    let unix_time = crate::report::unix_secs(started);
    let argv: Vec<String> = std::env::args().collect();
    let name = common
        .name
        .clone()
        .unwrap_or_else(|| format!("handshakes-{}", args.http.name()));
    let report = HandshakeReport {
        name: name.clone(),
        command: crate::report::shell_command(&argv),
        unix_time,
        date_utc: crate::report::utc_date(unix_time),
        machine: Machine::probe(
            &bins.proxy,
            Some(&bins.controller),
            args.targets
                .iter()
                .any(|t| t.is_haproxy())
                .then_some(bins.haproxy.as_path()),
        ),
        http: args.http,
        concurrency: args.concurrency,
        duration_s: args.duration.as_secs_f64(),
        warmup_s: args.warmup.as_secs_f64(),
        response_size: args.response_size,
        pinned,
        results,
    };

    let md = markdown(&report);
    common.write_reports(&name, &report, &md, &md, false)?;
    let failed: Vec<_> = report
        .results
        .iter()
        .filter(|r| r.error.is_some())
        .map(|r| r.target.name())
        .collect();
    if !failed.is_empty() {
        bail!("targets failed: {}", failed.join(", "));
    }
    Ok(())
}

async fn run_targets(
    args: &HandshakeArgs,
    bins: &Bins,
    cpu: Option<usize>,
) -> anyhow::Result<Vec<TargetResult>> {
    let tmp = scn::temp_dir()?;
    tracing::info!(dir = %tmp.display(), "configs and logs");
    let (mut server, server_addr) =
        scn::start_server(&bins.bench, args.response_size, cpu, &tmp).await?;
    let mut controller = None;
    let mut keys = None;
    if args.targets.iter().any(|t| t.is_tls()) {
        let dirs = MeshDirs::create(&tmp.join("mesh"))?;
        let ports = scn::free_addrs(3)?;
        let addrs = ControllerAddrs {
            destination: ports[0],
            identity: ports[1],
            admin: ports[2],
        };
        let child = mesh::start_controller(
            &bins.controller,
            &dirs,
            &addrs,
            cpu,
            &tmp.join("controller.log"),
        )
        .await?;
        controller = Some(child);
        let ca = pki::DevCa::load(&dirs.ca)?;
        let leaf = ca.issue(
            &mesh::spiffe_id(mesh::NAMESPACE, BENCH_CLIENT_SA),
            Duration::from_secs(86_400),
        )?;
        let client = pki::client_config(&ca, &leaf, args.http.alpn())?;
        let server_token =
            mesh::mint_token(&bins.controller, &dirs, mesh::NAMESPACE, mesh::SERVER_SA)?;
        keys = Some(Pki {
            dirs,
            controller: addrs,
            server_token,
            ca,
            client,
        });
    }
    let mut results = Vec::new();
    for (i, &target) in args.targets.iter().enumerate() {
        if i > 0 {
            // Let the previous target's sockets go.
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        server.ensure_running()?;
        tracing::info!(target = target.name(), "starting");
        let mut result = TargetResult::new(target, args.http);
        let mut owned = None;
        let outcome = measure(
            args,
            bins,
            target,
            server_addr,
            server.pid(),
            keys.as_ref(),
            cpu,
            &tmp,
            &mut owned,
            &mut result,
        )
        .await;
        if let Some(child) = owned {
            let stop = child.stop(Duration::from_secs(5)).await;
            tracing::debug!(target = target.name(), stop, "stopped");
        }
        if let Err(e) = outcome {
            tracing::error!(target = target.name(), "{e:#}");
            result.error = Some(format!("{e:#}"));
        }
        results.push(result);
    }
    if let Some(c) = controller {
        c.stop(Duration::from_secs(5)).await;
    }
    server.stop(Duration::from_secs(5)).await;
    if results.iter().all(|r| r.error.is_none()) {
        let _ = std::fs::remove_dir_all(&tmp);
    } else {
        tracing::warn!(dir = %tmp.display(), "some targets failed; their logs are kept");
    }
    Ok(results)
}

/// Starts the target's proxy, churns, and fills `result`.
#[allow(clippy::too_many_arguments)]
async fn measure(
    args: &HandshakeArgs,
    bins: &Bins,
    target: Target,
    server_addr: SocketAddr,
    server_pid: u32,
    keys: Option<&Pki>,
    cpu: Option<usize>,
    tmp: &Path,
    owned: &mut Option<Child>,
    result: &mut TargetResult,
) -> anyhow::Result<()> {
    let ports = scn::free_addrs(3)?;
    let log = tmp.join(format!("{}.log", target.name()));
    let (entry, admin) = if target.is_haproxy() {
        if !bins.haproxy.is_file() {
            bail!(
                "haproxy not found at {}: install it (`apt-get install -y haproxy`), pass --haproxy-bin, or drop the haproxy targets",
                bins.haproxy.display()
            );
        }
        let addrs = haproxy::HaproxyAddrs {
            frontend: ports[0],
            monitor: ports[1],
            backend: server_addr,
        };
        let crt = tmp.join("haproxy-server.pem");
        let tls = match (target, keys) {
            (Target::HaproxyTls, Some(k)) => {
                // The same identity as the Weft server proxy's, so one client verifier fits both.
                let leaf = k.ca.issue(
                    &mesh::spiffe_id(mesh::NAMESPACE, mesh::SERVER_SA),
                    Duration::from_secs(86_400),
                )?;
                std::fs::write(&crt, &leaf.pem_bundle)
                    .with_context(|| format!("writing {}", crt.display()))?;
                Some((crt.clone(), k.dirs.trust_anchors()))
            }
            (Target::HaproxyTls, None) => bail!("no CA for haproxy-tls"),
            _ => None,
        };
        let config = tmp.join(format!("{}.cfg", target.name()));
        let bind = tls
            .as_ref()
            .map(|(crt, ca)| haproxy::TlsBind { crt, ca_file: ca });
        std::fs::write(
            &config,
            haproxy::render_handshake_config(&addrs, bind, args.http == HttpVersion::Http2),
        )
        .with_context(|| format!("writing {}", config.display()))?;
        let child = Child::spawn(
            "haproxy",
            haproxy::command(&bins.haproxy, &config),
            cpu,
            &log,
        )?;
        *owned = Some(child);
        (addrs.frontend, addrs.monitor)
    } else {
        if !bins.proxy.is_file() {
            bail!(
                "weft-proxy not found at {}: build it with `cargo build --release -p weft-proxy`, or pass --proxy-bin",
                bins.proxy.display()
            );
        }
        let addrs = weft::ProxyAddrs {
            outbound: ports[0],
            inbound: ports[1],
            admin: ports[2],
        };
        let mut env = weft::proxy_env(
            &addrs,
            &weft::FixedTargets {
                outbound: None,
                inbound: Some(server_addr),
            },
        );
        if target == Target::WeftMtls {
            let k = keys.context("no CA for weft-mtls")?;
            let workload = Workload {
                service_account: mesh::SERVER_SA,
                pod: mesh::SERVER_POD,
                token: &k.server_token,
            };
            env.extend(mesh::identity_env(&k.controller, &k.dirs, &workload, false));
        }
        let child = Child::spawn("weft-proxy", weft::command(&bins.proxy, &env), cpu, &log)?;
        *owned = Some(child);
        (addrs.inbound, addrs.admin)
    };
    let child = owned.as_mut().context("no process was started")?;
    wait_ready(child, admin, "/ready", Duration::from_secs(15)).await?;
    result.entry = Some(entry);
    let pid = child.pid();

    let wire = match (target.is_tls(), keys) {
        (true, Some(k)) => Wire::Tls {
            connector: tokio_rustls::TlsConnector::from(Arc::clone(&k.client)),
            server_name: rustls_pki_types::ServerName::try_from(mesh::server_name(
                mesh::NAMESPACE,
                mesh::SERVER_SA,
            ))
            .context("the mesh server name is not a valid TLS server name")?,
        },
        (true, None) => bail!("no client certificate for {}", target.name()),
        (false, _) => Wire::Plain,
    };
    let connector = Arc::new(Connector {
        addr: entry,
        wire,
        http: args.http,
        authority: mesh::authority(),
        expect_len: args.response_size,
        timeout: args.timeout,
    });

    let mut completed = 0;
    if !args.warmup.is_zero() {
        let warm = client::churn(Arc::clone(&connector), args.concurrency, args.warmup).await;
        tracing::info!(target = target.name(), "warm-up: {}", one_line(&warm));
        completed += warm.ok;
    }
    let me = std::process::id();
    let pids = [pid, server_pid, me];
    let before: Vec<_> = pids
        .iter()
        .map(|&p| procfs::read_cpu(p))
        .collect::<Result<_, _>>()?;
    let started = Instant::now();
    let stats = client::churn(Arc::clone(&connector), args.concurrency, args.duration).await;
    let wall = started.elapsed();
    let after: Vec<_> = pids
        .iter()
        .map(|&p| procfs::read_cpu(p))
        .collect::<Result<_, _>>()?;
    completed += stats.ok;
    tracing::info!(target = target.name(), "measured: {}", one_line(&stats));

    let hz = procfs::ticks_per_sec();
    let cpu_of = |i: usize| after[i].since(before[i], hz);
    result.connections = stats.ok;
    result.errors = stats.errors;
    result.error_samples = stats.error_samples.clone();
    result.elapsed_s = wall.as_secs_f64();
    result.figures = Some(figures(stats.ok, wall, cpu_of(0)));
    result.server_cpu_us_per_conn =
        (stats.ok > 0).then(|| cpu_of(1).as_secs_f64() * 1e6 / stats.ok as f64);
    result.generator_cpu_util = Some(cpu_of(2).as_secs_f64() / wall.as_secs_f64().max(1e-9));
    result.conn_p50_us = stats.latency.value_at_quantile(0.5);
    result.conn_p99_us = stats.latency.value_at_quantile(0.99);
    result.proxy_rss_kib = procfs::read_mem(pid).map(|m| m.rss_kib).unwrap_or(0);

    if stats.ok == 0 {
        bail!(
            "no connection completed; errors: {}",
            stats.error_samples.join("; ")
        );
    }
    if target == Target::WeftMtls {
        let (status, body) = process::http_get(admin, "/metrics").await?;
        if !status.is_success() {
            bail!("GET http://{admin}/metrics answered {status}");
        }
        let client_id = mesh::spiffe_id(mesh::NAMESPACE, BENCH_CLIENT_SA);
        let counted = prom::sum(
            &prom::parse(&body),
            scn::TLS_CONNECTIONS,
            &[
                ("direction", "inbound"),
                ("tls", "true"),
                ("peer_id", &client_id),
            ],
        );
        result.proxy_counted = Some((counted, completed));
        check_counted(counted, completed, &client_id)?;
    }
    if let Some(child) = owned.as_mut() {
        child.ensure_running()?;
    }
    Ok(())
}

/// The proxy must have counted (at least) every mTLS connection the generator completed.
pub fn check_counted(counted: f64, completed: u64, client_id: &str) -> anyhow::Result<()> {
    if counted < 1.0 || counted < completed as f64 * 0.99 {
        bail!(
            "the proxy counted {counted} inbound mTLS connections from {client_id} \
             ({}{{direction=\"inbound\",tls=\"true\",peer_id=\"{client_id}\"}}), but {completed} completed",
            scn::TLS_CONNECTIONS
        );
    }
    Ok(())
}

fn one_line(s: &ChurnStats) -> String {
    format!(
        "{} connections in {:.1} s ({:.0}/s), {} errors, p50 {}, p99 {}",
        s.ok,
        s.elapsed.as_secs_f64(),
        s.ok as f64 / s.elapsed.as_secs_f64().max(1e-9),
        s.errors,
        fmt_us(s.latency.value_at_quantile(0.5)),
        fmt_us(s.latency.value_at_quantile(0.99)),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_proxy_must_count_every_connection() {
        let id = "spiffe://cluster.local/ns/bench/sa/bench-client";
        assert!(check_counted(1000.0, 1000, id).is_ok());
        assert!(check_counted(1002.0, 1000, id).is_ok());
        assert!(check_counted(995.0, 1000, id).is_ok());
        let e = check_counted(0.0, 1000, id).expect_err("none counted");
        assert!(e
            .to_string()
            .contains("peer_id=\"spiffe://cluster.local/ns/bench/sa/bench-client\""));
        assert!(check_counted(500.0, 1000, id).is_err());
    }

    #[test]
    fn target_names_parse() {
        use clap::ValueEnum as _;
        for t in Target::value_variants() {
            assert_eq!(Target::from_str(t.name(), false), Ok(*t));
            assert_eq!(
                serde_json::to_value(t).expect("json"),
                serde_json::Value::String(t.name().to_owned())
            );
        }
    }
}

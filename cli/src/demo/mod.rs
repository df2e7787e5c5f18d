//! `weft demo`: a two-proxy mesh with its controller on loopback, with no
//! root and no cluster, the proxies talking mutual TLS with certificates from
//! the controller's development CA.
//!
//! ```text
//!  web ──▶ client proxy ═════════ mTLS ═════════▶ server proxy ─────────▶ books
//!  (in-process  outbound: routes by Host          inbound: terminates     (in-process
//!   generator)  books.demo.svc.cluster.local,     mTLS (the SNI names      JSON app)
//!               checks the server is sa/books,    sa/books), HTTP/1.1 to
//!               HTTP/2 to it                      its fixed target
//!               identity sa/web                   identity sa/books
//!                    │ Resolve, Certify                │ Certify
//!                    ▼                                 ▼
//!               weft-controller --source dir:<log dir>/manifests --dev-ca <log dir>/ca
//!               (Service books → endpoint: the server proxy's inbound port, pod books-0,
//!                meshed, ServiceAccount books: identity and HTTP/2 hint)
//! ```
//!
//! Identities are `spiffe://cluster.local/ns/demo/sa/{web,books}`. Each proxy
//! proves its ServiceAccount to the controller's identity service with a token
//! minted by `weft-controller token --dev-ca --pod <pod>` into
//! `<log dir>/tokens/<pod>.token`, the stand-in for a kubelet-projected token
//! (bound to its pod, so issuance is rate-limited per pod), and is ready only once it holds a
//! certificate; the CA (`<log dir>/ca`) is created by the controller.
//!
//! In a pod, iptables redirects the app's traffic to the proxy and the proxy
//! reads the original destination with `SO_ORIGINAL_DST`; both need root.
//! Here each listener is given a fixed target instead
//! (`WEFT_PROXY_{OUTBOUND,INBOUND}_FIXED_TARGET`): the client proxy's is the
//! books ClusterIP, what the app would have connected to. `web` connects
//! straight to the client proxy's outbound port with the Host header a cluster
//! app would send, and the client proxy routes by that name: it asks the
//! controller (`WEFT_PROXY_DESTINATION_ADDR`) for the endpoints of
//! `books.demo.svc.cluster.local:8080` and balances over them.
//!
//! Every number in the live tables is read from the proxies' `/metrics`
//! endpoints, never from the generator, so the demo shows what an operator
//! scraping the mesh would see: golden metrics per proxy and direction, and
//! the security state (connections with mTLS and their peers' identities,
//! handshake failures, each certificate's time left).

pub mod apps;
pub mod child;
pub mod controller;
pub mod proxy;
pub mod table;

use std::io::{IsTerminal, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitStatus;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::net::TcpListener;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use self::apps::{BooksConfig, TrafficConfig, TrafficCounts};
use self::controller::{
    ControllerAddrs, ControllerProcess, DevCa, BOOKS_CLUSTER_IP, BOOKS_POD, BOOKS_PORT,
    BOOKS_SERVICE_ACCOUNT, WEB_POD, WEB_SERVICE_ACCOUNT,
};
use self::proxy::{AdminClient, ProxyAddrs, ProxyIdentity, ProxyProcess, ProxySpec};
use self::table::{Row, SecurityRow};
use crate::promtext::Sample;
use crate::security::{self, TlsSnapshot};
use crate::stats::{Direction, DirectionSnapshot, WindowStats};

/// The Host header web sends (with the service port, [`BOOKS_PORT`]).
pub const BOOKS_HOST: &str = "books.demo.svc.cluster.local";

/// How often the table is refreshed.
pub const REFRESH: Duration = Duration::from_secs(2);

/// Options of `weft demo`.
#[derive(Debug, Clone)]
pub struct DemoConfig {
    pub proxy_bin: PathBuf,
    pub controller_bin: PathBuf,
    pub rps: u32,
    /// Stop after this long; `None` runs until Ctrl-C or SIGTERM.
    pub duration: Option<Duration>,
    /// The proxies' `WEFT_PROXY_LOG`.
    pub proxy_log: String,
    pub ready_timeout: Duration,
    /// How long a proxy has to exit after SIGTERM before it is killed.
    pub shutdown_grace: Duration,
    pub books: BooksConfig,
}

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error(
        "no proxy binary at {0}: build it with `cargo build -p weft-proxy` or pass --proxy-bin"
    )]
    ProxyBinaryMissing(PathBuf),
    #[error(
        "no controller binary at {0}: build it with `cargo build -p weft-controller` or pass --controller-bin"
    )]
    ControllerBinaryMissing(PathBuf),
    #[error("could not write the demo manifests in {path}: {source}")]
    Manifests {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("could not start {bin}: {source}")]
    Spawn {
        bin: PathBuf,
        source: std::io::Error,
    },
    #[error("could not create the log directory {path}: {source}")]
    LogDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("could not create the proxy log {path}: {source}")]
    LogFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "could not mint the identity token of ServiceAccount {service_account} into {path}: {reason}"
    )]
    Token {
        service_account: String,
        path: PathBuf,
        reason: String,
    },
    #[error("could not reserve loopback ports: {0}")]
    Ports(std::io::Error),
    #[error("could not listen on 127.0.0.1 for the books app: {0}")]
    BindBooks(std::io::Error),
    #[error("could not install the SIGTERM handler: {0}")]
    Signal(std::io::Error),
    #[error(
        "the {what} did not answer 200 on http://{admin}/ready within {timeout:?} \
         (last: {last}); its log is {log}"
    )]
    NotReady {
        what: String,
        admin: SocketAddr,
        timeout: Duration,
        last: String,
        log: PathBuf,
    },
    #[error("the {what} exited unexpectedly ({status}); its log is {log}")]
    Exited {
        what: String,
        status: ExitStatus,
        log: PathBuf,
    },
    #[error("interrupted before the proxies were ready")]
    Interrupted,
}

/// Which rows the table shows, in order: each proxy's busy direction first.
const ROWS: [(usize, &str, Direction); 4] = [
    (0, "client", Direction::Outbound),
    (1, "server", Direction::Inbound),
    (0, "client", Direction::Inbound),
    (1, "server", Direction::Outbound),
];

/// Which rows the security table shows: the directions the demo's traffic takes.
const SECURITY_ROWS: [(usize, &str, Direction); 2] = [
    (0, "client", Direction::Outbound),
    (1, "server", Direction::Inbound),
];

/// One scrape of both proxies.
#[derive(Debug, Clone)]
struct Scrape {
    at: Instant,
    /// Wall-clock time of the scrape, Unix seconds, for certificate expiry.
    unix: f64,
    proxies: [Result<Vec<Sample>, String>; 2],
}

impl Scrape {
    async fn take(admin: &AdminClient, addrs: [SocketAddr; 2]) -> Self {
        let (client, server) = tokio::join!(admin.metrics(addrs[0]), admin.metrics(addrs[1]));
        Self {
            at: Instant::now(),
            unix: SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64()),
            proxies: [client, server],
        }
    }

    /// The security rows: TLS connections and handshake failures since `start`, and each
    /// proxy's certificate time left now.
    fn security_since(&self, start: &Scrape) -> Vec<SecurityRow> {
        SECURITY_ROWS
            .iter()
            .map(|&(i, proxy, direction)| {
                let now = self.proxies[i].as_ref().ok();
                // A failed first scrape counts from zero: the proxies had no traffic yet.
                let before = start.proxies[i]
                    .as_ref()
                    .map(|s| TlsSnapshot::from_samples(s, direction))
                    .unwrap_or_default();
                SecurityRow {
                    proxy,
                    direction,
                    tls: now.map(|s| TlsSnapshot::from_samples(s, direction).since(&before)),
                    cert_left: now.and_then(|s| security::cert_seconds_left(s, self.unix)),
                }
            })
            .collect()
    }

    /// Both tables for the window from `prev` to `self`, security since `start`.
    fn render(&self, prev: &Scrape, start: &Scrape) -> String {
        format!(
            "{}{SECURITY_CAPTION}\n{}",
            table::render(&self.rows_since(prev)),
            table::render_security(&self.security_since(start)),
        )
    }

    /// The table rows for the window from `prev` to `self`.
    fn rows_since(&self, prev: &Scrape) -> Vec<Row> {
        let seconds = self.at.duration_since(prev.at).as_secs_f64();
        ROWS.iter()
            .map(|&(i, proxy, direction)| {
                let stats = match (&prev.proxies[i], &self.proxies[i]) {
                    (Ok(p), Ok(c)) => Ok(WindowStats::between(
                        &DirectionSnapshot::from_samples(p, direction),
                        &DirectionSnapshot::from_samples(c, direction),
                        seconds,
                    )),
                    (_, Err(e)) | (Err(e), _) => Err(e.clone()),
                };
                Row {
                    proxy,
                    direction,
                    stats,
                }
            })
            .collect()
    }
}

const SECURITY_CAPTION: &str =
    "Mesh TLS since the start (connections; CERT: time left on each proxy's certificate)";

/// Writes tables to stdout: in place on a terminal, appended otherwise (so
/// a log or a test sees every one).
struct Screen {
    tty: bool,
    last_lines: usize,
}

impl Screen {
    fn print_live(&mut self, title: &str, table: &str) {
        let text = format!("{title}\n{table}");
        let mut out = std::io::stdout().lock();
        if self.tty && self.last_lines > 0 {
            // Up to the first line of the previous table, then clear below.
            let _ = write!(out, "\x1b[{}F\x1b[J", self.last_lines);
        } else if !self.tty {
            let _ = writeln!(out);
        }
        let _ = write!(out, "{text}");
        let _ = out.flush();
        self.last_lines = text.lines().count();
    }
}

/// Run the demo until Ctrl-C, SIGTERM or `config.duration`.
pub async fn run(config: DemoConfig) -> Result<(), DemoError> {
    if !config.proxy_bin.is_file() {
        return Err(DemoError::ProxyBinaryMissing(config.proxy_bin));
    }
    if !config.controller_bin.is_file() {
        return Err(DemoError::ControllerBinaryMissing(config.controller_bin));
    }
    let stop = CancellationToken::new();
    spawn_signal_watcher(stop.clone())?;

    let log_dir = make_log_dir()?;
    let ca = DevCa::in_log_dir(&log_dir);
    let shutdown_apps = CancellationToken::new();

    // books, in-process, on a port it keeps (no reservation race).
    let books_listener = TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(DemoError::BindBooks)?;
    let books_addr = books_listener.local_addr().map_err(DemoError::BindBooks)?;
    let books_task = tokio::spawn(apps::serve_books(
        books_listener,
        config.books.clone(),
        shutdown_apps.clone(),
        Duration::from_secs(2),
    ));

    let ports = proxy::free_loopback_ports(9).map_err(DemoError::Ports)?;
    let client_addrs = ProxyAddrs {
        outbound: ports[0],
        inbound: ports[1],
        admin: ports[2],
    };
    let server_addrs = ProxyAddrs {
        outbound: ports[3],
        inbound: ports[4],
        admin: ports[5],
    };
    let controller_addrs = ControllerAddrs {
        destination: ports[6],
        identity: ports[7],
        admin: ports[8],
    };
    // What the app would have connected to: the service's ClusterIP. The client proxy routes
    // by Host instead, through the controller.
    let cluster_ip = SocketAddr::new(
        BOOKS_CLUSTER_IP
            .parse()
            .unwrap_or(std::net::Ipv4Addr::LOCALHOST.into()),
        BOOKS_PORT,
    );
    let identity = |service_account: &str, pod_name: &str| ProxyIdentity {
        addr: controller_addrs.identity,
        service_account: service_account.into(),
        pod_name: pod_name.into(),
        token_file: ca.token_file(pod_name),
        trust_anchors: ca.trust_anchors(),
    };
    let specs = [
        ProxySpec {
            name: "client",
            addrs: client_addrs,
            outbound_target: Some(cluster_ip),
            inbound_target: None,
            log_filter: config.proxy_log.clone(),
            destination: Some(controller_addrs.destination),
            namespace: Some(controller::BOOKS_NAMESPACE.into()),
            identity: Some(identity(WEB_SERVICE_ACCOUNT, WEB_POD)),
        },
        ProxySpec {
            name: "server",
            addrs: server_addrs,
            outbound_target: None,
            inbound_target: Some(books_addr),
            log_filter: config.proxy_log.clone(),
            destination: None,
            namespace: Some(controller::BOOKS_NAMESPACE.into()),
            identity: Some(identity(BOOKS_SERVICE_ACCOUNT, BOOKS_POD)),
        },
    ];

    let mut controller = ControllerProcess::spawn(
        &config.controller_bin,
        controller_addrs,
        server_addrs.inbound,
        &ca,
        if config.proxy_log == "debug" {
            "debug"
        } else {
            "warn"
        },
        &log_dir,
    )?;
    let admin = AdminClient::new(Duration::from_secs(1));
    let mut proxies: Vec<ProxyProcess> = Vec::with_capacity(2);
    let started = async {
        controller
            .wait_ready(
                &AdminClient::new(Duration::from_millis(500)),
                config.ready_timeout,
                &stop,
            )
            .await?;
        // The CA exists once the controller is ready; each proxy needs its token before it
        // starts (it checks the file at start-up).
        for id in specs.iter().filter_map(|s| s.identity.as_ref()) {
            ca.mint_token(&config.controller_bin, &id.service_account, &id.pod_name)
                .await?;
        }
        start_proxies(&config, &specs, &log_dir, &stop, &mut proxies).await
    }
    .await;
    let result = match started {
        Ok(()) => {
            print_banner(
                &config,
                books_addr,
                &specs,
                &proxies,
                &controller,
                &ca,
                &log_dir,
            );
            run_traffic(&config, &admin, &stop, &mut proxies).await
        }
        // Ctrl-C while waiting for the proxies is a request to stop, not a failure.
        Err(DemoError::Interrupted) => Ok("Stopped before the proxies were ready.\n".into()),
        Err(e) => Err(e),
    };

    // Whatever happened, stop the proxies one at a time, client first so its
    // in-flight requests can still reach the server, and the apps last.
    let mut endings = Vec::new();
    for p in &mut proxies {
        let how = p.terminate(config.shutdown_grace).await;
        endings.push(format!("{} proxy {how}", p.spec.name));
    }
    let how = controller.child.terminate(config.shutdown_grace).await;
    endings.push(format!("controller {how}"));
    shutdown_apps.cancel();
    let _ = books_task.await;

    let mut text = result?;
    for e in endings {
        text.push_str(&format!("  {e}\n"));
    }
    text.push_str(&format!(
        "  proxy and controller logs: {}\n",
        log_dir.display()
    ));
    say(&text);
    Ok(())
}

async fn start_proxies(
    config: &DemoConfig,
    specs: &[ProxySpec; 2],
    log_dir: &std::path::Path,
    stop: &CancellationToken,
    proxies: &mut Vec<ProxyProcess>,
) -> Result<(), DemoError> {
    // Server first: the client's fixed target is its inbound listener.
    for spec in specs.iter().rev() {
        proxies.push(ProxyProcess::spawn(
            &config.proxy_bin,
            spec.clone(),
            log_dir,
        )?);
    }
    proxies.reverse();
    let admin = AdminClient::new(Duration::from_millis(500));
    for p in proxies.iter_mut() {
        p.wait_ready(&admin, config.ready_timeout, stop).await?;
    }
    Ok(())
}

fn print_banner(
    config: &DemoConfig,
    books: SocketAddr,
    specs: &[ProxySpec; 2],
    proxies: &[ProxyProcess],
    controller: &ControllerProcess,
    ca: &DevCa,
    log_dir: &std::path::Path,
) {
    let pid = |i: usize| {
        proxies
            .get(i)
            .and_then(ProxyProcess::pid)
            .map_or_else(|| "?".into(), |p| p.to_string())
    };
    let mut text = String::from(
        "weft demo: a two-proxy mesh and its controller on loopback, mTLS between the proxies\n",
    );
    text.push_str(&format!(
        "  web           {} req/s to {} with Host: {BOOKS_HOST}:{BOOKS_PORT}\n",
        config.rps, specs[0].addrs.outbound,
    ));
    text.push_str(&format!(
        "  controller    pid {:<7} destination {}  manifests {}\n",
        controller
            .child
            .pid()
            .map_or_else(|| "?".into(), |p| p.to_string()),
        controller.addrs.destination,
        controller.manifests.display()
    ));
    text.push_str(&format!(
        "  identity      dev CA {}  tokens {}  (identity service {})\n",
        ca.dir.display(),
        ca.tokens.display(),
        controller.addrs.identity,
    ));
    text.push_str(&format!(
        "  client proxy  pid {:<7} outbound {}  admin http://{}/metrics  sa {}\n",
        pid(0),
        specs[0].addrs.outbound,
        specs[0].addrs.admin,
        WEB_SERVICE_ACCOUNT,
    ));
    text.push_str(&format!(
        "  server proxy  pid {:<7} inbound  {}  admin http://{}/metrics  sa {}\n",
        pid(1),
        specs[1].addrs.inbound,
        specs[1].addrs.admin,
        BOOKS_SERVICE_ACCOUNT,
    ));
    text.push_str(&format!("  books         {books}\n"));
    text.push_str(&format!("  logs          {}\n", log_dir.display()));
    text.push_str(&match config.duration {
        Some(d) => format!("Running for {}s (Ctrl-C stops sooner).\n", d.as_secs()),
        None => "Press Ctrl-C to stop.\n".into(),
    });
    say(&text);
}

/// Write to stdout, ignoring failures: with stdout piped into `head` the
/// demo must still stop its proxies rather than panic on a closed pipe.
fn say(text: &str) {
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(text.as_bytes());
    let _ = out.flush();
}

/// Send traffic and print the table until told to stop; return the summary.
async fn run_traffic(
    config: &DemoConfig,
    admin: &AdminClient,
    stop: &CancellationToken,
    proxies: &mut [ProxyProcess],
) -> Result<String, DemoError> {
    let [client, server] = proxies else {
        unreachable!("two proxies are started");
    };
    let admins = [client.spec.addrs.admin, server.spec.addrs.admin];
    let baseline = Scrape::take(admin, admins).await;

    let counts = Arc::new(TrafficCounts::default());
    let stop_traffic = CancellationToken::new();
    let traffic = tokio::spawn(apps::generate_traffic(
        TrafficConfig {
            connect_to: client.spec.addrs.outbound,
            authority: format!("{BOOKS_HOST}:{BOOKS_PORT}"),
            rps: config.rps,
            request_timeout: Duration::from_secs(5),
            max_in_flight: 1024,
        },
        counts.clone(),
        stop_traffic.clone(),
    ));

    let start = baseline.at;
    let end = config.duration.map(|d| start + d);
    let mut ticker = tokio::time::interval_at(start + REFRESH, REFRESH);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut screen = Screen {
        tty: std::io::stdout().is_terminal(),
        last_lines: 0,
    };
    let mut prev = baseline.clone();
    let mut early_exit = None;
    loop {
        tokio::select! {
            () = stop.cancelled() => break,
            () = sleep_until_opt(end) => break,
            status = client.exited() => {
                early_exit = Some(status_or_error(client, status));
                break;
            }
            status = server.exited() => {
                early_exit = Some(status_or_error(server, status));
                break;
            }
            _ = ticker.tick() => {
                let now = Scrape::take(admin, admins).await;
                let title = format!(
                    "[{:>4.0}s] window {:.1}s, from the proxies' /metrics",
                    now.at.duration_since(start).as_secs_f64(),
                    now.at.duration_since(prev.at).as_secs_f64(),
                );
                screen.print_live(&title, &now.render(&prev, &baseline));
                prev = now;
            }
        }
    }

    stop_traffic.cancel();
    let _ = traffic.await;
    if let Some(e) = early_exit {
        return Err(e);
    }
    // The last scrape happens before SIGTERM, while the admin port is up.
    let last = Scrape::take(admin, admins).await;
    let elapsed = last.at.duration_since(start).as_secs_f64();
    let routed = |s: &Scrape, route: &str| {
        s.proxies[0].as_ref().map_or(0.0, |samples| {
            samples
                .iter()
                .filter(|x| {
                    x.name == "weft_outbound_routes_total"
                        && x.label("protocol") == Some("http")
                        && x.label("route") == Some(route)
                })
                .map(|x| x.value)
                .sum::<f64>()
        })
    };
    let endpoints = last.proxies[0].as_ref().map_or(0.0, |samples| {
        samples
            .iter()
            .filter(|x| x.name == "weft_balancer_endpoints")
            .map(|x| x.value)
            .sum::<f64>()
    });
    let clients = |s: &Scrape| {
        s.proxies[1]
            .as_ref()
            .map(|samples| security::requests_by_client(samples, Direction::Inbound))
            .unwrap_or_default()
    };
    Ok(format!(
        "\nSummary over {elapsed:.1}s, from the proxies' /metrics (TCP: open at the end):\n{}\n  {}\n  \
         server proxy inbound requests by client identity: {}\n  \
         client proxy routing: {:.0} requests balanced over endpoints from the controller \
         ({endpoints:.0} endpoint(s) known), {:.0} passed through\n",
        last.render(&baseline, &baseline),
        counts.summary(),
        table::render_clients(&security::counts_since(&clients(&baseline), &clients(&last))),
        routed(&last, "balanced") - routed(&baseline, "balanced"),
        routed(&last, "passthrough") - routed(&baseline, "passthrough"),
    ))
}

fn status_or_error(p: &ProxyProcess, status: std::io::Result<ExitStatus>) -> DemoError {
    match status {
        Ok(status) => p.exited_early(status),
        Err(source) => DemoError::Spawn {
            bin: PathBuf::from(p.spec.name),
            source,
        },
    }
}

async fn sleep_until_opt(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// Cancel `stop` on the first SIGINT or SIGTERM.
fn spawn_signal_watcher(stop: CancellationToken) -> Result<(), DemoError> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).map_err(DemoError::Signal)?;
    let mut int = signal(SignalKind::interrupt()).map_err(DemoError::Signal)?;
    tokio::spawn(async move {
        let which = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        };
        tracing::info!("{which} received; stopping");
        stop.cancel();
    });
    Ok(())
}

/// A fresh directory for the proxies' logs, kept after the demo so they can
/// be read.
fn make_log_dir() -> Result<PathBuf, DemoError> {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let dir = std::env::temp_dir().join(format!("weft-demo-{}-{nanos:x}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|source| DemoError::LogDir {
        path: dir.clone(),
        source,
    })?;
    Ok(dir)
}

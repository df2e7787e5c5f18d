//! `weft demo`: a small mesh with its controller on loopback, with no root and no cluster:
//! web calls books through a client proxy, books runs in two versions (`books` and
//! `books-v2`, each behind its own server proxy), the proxies talk mutual TLS with
//! certificates from the controller's development CA, and web's traffic follows an HTTPRoute
//! with retries and a BackendPolicy's retry budget.
//!
//! ```text
//!  web ──▶ web proxy ══════ mTLS ═════▶ books proxy ─────▶ books     (in-process JSON app,
//!          outbound: HTTPRoute books      inbound: mTLS,            1 % of answers 503)
//!          splits by weight, retries      HTTP/1.1 to its
//!          503s within the budget,        fixed target
//!          balances each backend     ═══▶ books-v2 proxy ──▶ books-v2  (the same app)
//!          identity sa/web                identity sa/books (both versions)
//!               │ Resolve, ClientPolicy, Certify    │ Certify
//!               ▼                                   ▼
//!          weft-controller --source dir:<log dir>/manifests --dev-ca <log dir>/ca
//!          (Services books and books-v2, each with one endpoint: its server proxy's
//!           inbound port, a meshed pod; route.yaml; backendpolicy.yaml)
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
//! (`WEFT_PROXY_{OUTBOUND,INBOUND}_FIXED_TARGET`): the web proxy's is the
//! books ClusterIP, what the app would have connected to. `web` connects
//! straight to the web proxy's outbound port with the Host header a cluster
//! app would send, and the web proxy routes by that name: it asks the
//! controller (`WEFT_PROXY_DESTINATION_ADDR`) for the ClientPolicy of
//! `books.demo.svc.cluster.local:8080` (HTTPRoute `books`: which backend, which retries) and
//! for the endpoints of the backend each request draws, and balances over them.
//!
//! The route lives in `<log dir>/manifests/route.yaml`, and the demo says so at start:
//! editing its weights (say 90/10 to books-v2) moves the traffic within a second, which the
//! route table's split column shows.
//!
//! Every number in the live tables is read from the proxies' `/metrics`
//! endpoints, never from the generator, so the demo shows what an operator
//! scraping the mesh would see: golden metrics per proxy and direction; the web
//! proxy's routes, with the success rate web got (after retries) next to what
//! the books proxies answered (every attempt), retries, budget refusals and the
//! split; and the security state (connections with mTLS and their peers' identities,
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
    BooksDeployment, ControllerAddrs, ControllerProcess, DevCa, BOOKS, BOOKS_CLUSTER_IP,
    BOOKS_PORT, BOOKS_ROUTE_LABEL, BOOKS_SERVICE_ACCOUNT, BOOKS_V2, ROUTE_FILE, WEB_POD,
    WEB_SERVICE_ACCOUNT,
};
use self::proxy::{AdminClient, ProxyAddrs, ProxyIdentity, ProxyProcess, ProxySpec};
use self::table::{RouteRow, Row, SecurityRow};
use crate::promtext::Sample;
use crate::routes::{self, RouteSnapshot};
use crate::security::{self, TlsSnapshot};
use crate::stats::{counter_delta, Direction, DirectionSnapshot, WindowStats};

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

/// The demo's proxies, in the order they are stopped: web's first, so its requests in
/// flight can still reach books. Each name labels its table rows and log file
/// (`<name>-proxy.log`); a server proxy fronts one books deployment.
const PROXIES: [(&str, Option<BooksDeployment>); PROXY_COUNT] = [
    ("web", None),
    ("books", Some(BOOKS)),
    ("books-v2", Some(BOOKS_V2)),
];
const PROXY_COUNT: usize = 3;
/// Index of the web (client) proxy in [`PROXIES`].
const WEB: usize = 0;

/// Which rows both tables show, in order: the directions the demo's traffic takes (the
/// others stay at zero).
const ROWS: [(usize, &str, Direction); PROXY_COUNT] = [
    (WEB, PROXIES[WEB].0, Direction::Outbound),
    (1, PROXIES[1].0, Direction::Inbound),
    (2, PROXIES[2].0, Direction::Inbound),
];

/// One scrape of every proxy.
#[derive(Debug, Clone)]
struct Scrape {
    at: Instant,
    /// Wall-clock time of the scrape, Unix seconds, for certificate expiry.
    unix: f64,
    proxies: [Result<Vec<Sample>, String>; PROXY_COUNT],
}

impl Scrape {
    async fn take(admin: &AdminClient, addrs: [SocketAddr; PROXY_COUNT]) -> Self {
        let (web, books, books_v2) = tokio::join!(
            admin.metrics(addrs[0]),
            admin.metrics(addrs[1]),
            admin.metrics(addrs[2])
        );
        Self {
            at: Instant::now(),
            unix: SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64()),
            proxies: [web, books, books_v2],
        }
    }

    /// The security rows: TLS connections and handshake failures since `start`, and each
    /// proxy's certificate time left now.
    fn security_since(&self, start: &Scrape) -> Vec<SecurityRow> {
        ROWS.iter()
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

    /// The three tables for the window from `prev` to `self`, security since `start`.
    fn render(&self, prev: &Scrape, start: &Scrape) -> String {
        format!(
            "{}{ROUTES_CAPTION}\n{}{SECURITY_CAPTION}\n{}",
            table::render(&self.rows_since(prev)),
            table::render_routes(self.routes_since(prev).as_deref()),
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

    /// The web proxy's route rules over the window from `prev` (a failed earlier scrape counts
    /// from zero); `None` when this scrape of the web proxy failed.
    fn routes_since(&self, prev: &Scrape) -> Option<Vec<RouteRow>> {
        let seconds = self.at.duration_since(prev.at).as_secs_f64();
        let windows = routes::windows_between(&prev.routes(), &self.web_routes()?, seconds);
        Some(
            windows
                .into_iter()
                .map(|(route, window)| RouteRow {
                    server_success: self.server_success(prev, window.requests.keys()),
                    route,
                    window,
                })
                .collect(),
        )
    }

    /// The web proxy's route counters; empty when its scrape failed.
    fn routes(&self) -> std::collections::BTreeMap<String, RouteSnapshot> {
        self.web_routes().unwrap_or_default()
    }

    fn web_routes(&self) -> Option<std::collections::BTreeMap<String, RouteSnapshot>> {
        self.proxies[WEB]
            .as_ref()
            .ok()
            .map(|s| routes::routes_from_samples(s))
    }

    /// The inbound success rate since `prev` of the server proxies that front `backends`
    /// (route backend labels), together: every attempt the apps answered, retries included.
    /// `None` when none of them answered (or none is one of the demo's).
    fn server_success<'a>(
        &self,
        prev: &Scrape,
        backends: impl Iterator<Item = &'a String>,
    ) -> Option<f64> {
        let (mut responses, mut successes) = (0.0, 0.0);
        for backend in backends {
            let Some(i) = PROXIES
                .iter()
                .position(|(_, d)| d.is_some_and(|d| d.backend() == *backend))
            else {
                continue;
            };
            let Ok(cur) = &self.proxies[i] else {
                continue;
            };
            let cur = DirectionSnapshot::from_samples(cur, Direction::Inbound);
            let before = prev.proxies[i]
                .as_ref()
                .map(|s| DirectionSnapshot::from_samples(s, Direction::Inbound))
                .unwrap_or_default();
            responses += counter_delta(before.responses, cur.responses);
            successes += counter_delta(before.successes, cur.successes);
        }
        (responses > 0.0).then(|| (successes / responses).clamp(0.0, 1.0))
    }
}

const ROUTES_CAPTION: &str =
    "Routes on the web proxy (CLIENT: after retries; SERVER: at the books proxies, every attempt)";
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

    // books, both versions, in-process, on ports they keep (no reservation race).
    let mut books_addrs = Vec::with_capacity(2);
    let mut books_tasks = Vec::with_capacity(2);
    for _ in [BOOKS, BOOKS_V2] {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(DemoError::BindBooks)?;
        books_addrs.push(listener.local_addr().map_err(DemoError::BindBooks)?);
        books_tasks.push(tokio::spawn(apps::serve_books(
            listener,
            config.books.clone(),
            shutdown_apps.clone(),
            Duration::from_secs(2),
        )));
    }

    let ports = proxy::free_loopback_ports(3 * PROXY_COUNT + 3).map_err(DemoError::Ports)?;
    let proxy_addrs: Vec<ProxyAddrs> = ports
        .chunks(3)
        .take(PROXY_COUNT)
        .map(|p| ProxyAddrs {
            outbound: p[0],
            inbound: p[1],
            admin: p[2],
        })
        .collect();
    let controller_addrs = ControllerAddrs {
        destination: ports[3 * PROXY_COUNT],
        identity: ports[3 * PROXY_COUNT + 1],
        admin: ports[3 * PROXY_COUNT + 2],
    };
    // What the app would have connected to: the service's ClusterIP. The web proxy routes
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
    let specs: Vec<ProxySpec> = PROXIES
        .iter()
        .zip(&proxy_addrs)
        .map(|(&(name, books), &addrs)| match books {
            None => ProxySpec {
                name,
                addrs,
                outbound_target: Some(cluster_ip),
                inbound_target: None,
                log_filter: config.proxy_log.clone(),
                destination: Some(controller_addrs.destination),
                namespace: Some(controller::BOOKS_NAMESPACE.into()),
                identity: Some(identity(WEB_SERVICE_ACCOUNT, WEB_POD)),
            },
            Some(deployment) => ProxySpec {
                name,
                addrs,
                outbound_target: None,
                inbound_target: Some(books_addrs[usize::from(deployment == BOOKS_V2)]),
                log_filter: config.proxy_log.clone(),
                destination: None,
                namespace: Some(controller::BOOKS_NAMESPACE.into()),
                identity: Some(identity(BOOKS_SERVICE_ACCOUNT, deployment.pod)),
            },
        })
        .collect();
    // Each books Service's endpoint is its server proxy's inbound listener.
    let deployments: Vec<(BooksDeployment, SocketAddr)> = PROXIES
        .iter()
        .zip(&proxy_addrs)
        .filter_map(|((_, d), addrs)| Some(((*d)?, addrs.inbound)))
        .collect();

    let mut controller = ControllerProcess::spawn(
        &config.controller_bin,
        controller_addrs,
        &deployments,
        &ca,
        if config.proxy_log == "debug" {
            "debug"
        } else {
            "warn"
        },
        &log_dir,
    )?;
    let admin = AdminClient::new(Duration::from_secs(1));
    let mut proxies: Vec<ProxyProcess> = Vec::with_capacity(PROXY_COUNT);
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
                &books_addrs,
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

    // Whatever happened, stop the proxies one at a time, web's first so its
    // in-flight requests can still reach books, and the apps last.
    let mut endings = Vec::new();
    for p in &mut proxies {
        let how = p.terminate(config.shutdown_grace).await;
        endings.push(format!("{} proxy {how}", p.spec.name));
    }
    let how = controller.child.terminate(config.shutdown_grace).await;
    endings.push(format!("controller {how}"));
    shutdown_apps.cancel();
    for task in books_tasks {
        let _ = task.await;
    }

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
    specs: &[ProxySpec],
    log_dir: &std::path::Path,
    stop: &CancellationToken,
    proxies: &mut Vec<ProxyProcess>,
) -> Result<(), DemoError> {
    // Server proxies first: web's traffic goes to their inbound listeners.
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

/// The one-line hint about the live edit, printed under the banner.
pub const ROUTE_HINT: &str =
    "edit manifests/route.yaml (e.g. weights 90/10 to books-v2) and save: \
     the split changes within a second";

fn print_banner(
    config: &DemoConfig,
    books: &[SocketAddr],
    specs: &[ProxySpec],
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
        "weft demo: web calls books through Weft proxies on loopback, mTLS between the proxies,\n\
         traffic under an HTTPRoute with retries and a BackendPolicy's retry budget\n",
    );
    text.push_str(&format!(
        "  web             {} req/s to {} with Host: {BOOKS_HOST}:{BOOKS_PORT}\n",
        config.rps, specs[WEB].addrs.outbound,
    ));
    text.push_str(&format!(
        "  controller      pid {:<7} destination {}  manifests {}\n",
        controller
            .child
            .pid()
            .map_or_else(|| "?".into(), |p| p.to_string()),
        controller.addrs.destination,
        controller.manifests.display()
    ));
    text.push_str(&format!(
        "  identity        dev CA {}  tokens {}  (identity service {})\n",
        ca.dir.display(),
        ca.tokens.display(),
        controller.addrs.identity,
    ));
    for (i, spec) in specs.iter().enumerate() {
        let (direction, listener) = if spec.inbound_target.is_some() {
            ("inbound ", spec.addrs.inbound)
        } else {
            ("outbound", spec.addrs.outbound)
        };
        let sa = spec
            .identity
            .as_ref()
            .map_or("-", |id| id.service_account.as_str());
        text.push_str(&format!(
            "  {:<15} pid {:<7} {direction} {listener}  admin http://{}/metrics  sa {sa}\n",
            format!("{} proxy", spec.name),
            pid(i),
            spec.addrs.admin,
        ));
    }
    let apps: Vec<String> = PROXIES
        .iter()
        .filter_map(|(name, d)| d.map(|_| *name))
        .zip(books)
        .map(|(name, addr)| format!("{name} {addr}"))
        .collect();
    text.push_str(&format!("  apps            {}\n", apps.join("  ")));
    text.push_str(&format!("  logs            {}\n", log_dir.display()));
    text.push_str(&format!(
        "  route           {}: HTTPRoute books, 100 % to books, retries 503s twice\n\
         \x20 policy          {}: retry budget 20 % + 10/s, circuit breaker\n",
        controller.manifests.join(ROUTE_FILE).display(),
        controller.manifests.join("backendpolicy.yaml").display(),
    ));
    text.push_str(&format!("Live: {ROUTE_HINT}.\n"));
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
    assert_eq!(proxies.len(), PROXY_COUNT, "every proxy is started");
    let admins: [SocketAddr; PROXY_COUNT] = std::array::from_fn(|i| proxies[i].spec.addrs.admin);
    let baseline = Scrape::take(admin, admins).await;

    let counts = Arc::new(TrafficCounts::default());
    let stop_traffic = CancellationToken::new();
    let traffic = tokio::spawn(apps::generate_traffic(
        TrafficConfig {
            connect_to: proxies[WEB].spec.addrs.outbound,
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
            e = first_exit(proxies) => {
                early_exit = Some(e);
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
    let web_sum = |s: &Scrape, keep: &dyn Fn(&Sample) -> bool| {
        s.proxies[WEB].as_ref().map_or(0.0, |samples| {
            samples
                .iter()
                .filter(|x| keep(x))
                .fold(0.0, |sum, x| sum + x.value)
        })
    };
    let routed = |s: &Scrape, route: &str| {
        web_sum(s, &|x| {
            x.name == "weft_outbound_routes_total"
                && x.label("protocol") == Some("http")
                && x.label("route") == Some(route)
        })
    };
    let endpoints = web_sum(&last, &|x| x.name == "weft_balancer_endpoints");
    // Requests by client identity, over every books proxy.
    let clients = |s: &Scrape| {
        let mut by = std::collections::BTreeMap::new();
        for (i, _) in PROXIES.iter().enumerate().filter(|(_, (_, d))| d.is_some()) {
            if let Ok(samples) = &s.proxies[i] {
                for (id, n) in security::requests_by_client(samples, Direction::Inbound) {
                    *by.entry(id).or_insert(0.0) += n;
                }
            }
        }
        by
    };
    Ok(format!(
        "\nSummary over {elapsed:.1}s, from the proxies' /metrics (TCP: open at the end):\n{}\n  {}\n  \
         books proxies' inbound requests by client identity: {}\n  \
         web proxy routing: {:.0} requests balanced over endpoints from the controller \
         ({endpoints:.0} endpoint(s) known), {:.0} passed through\n{}",
        last.render(&baseline, &baseline),
        counts.summary(),
        table::render_clients(&security::counts_since(&clients(&baseline), &clients(&last))),
        routed(&last, "balanced") - routed(&baseline, "balanced"),
        routed(&last, "passthrough") - routed(&baseline, "passthrough"),
        route_summary(&baseline.routes(), &last.routes()),
    ))
}

/// One line per route rule of the web proxy over the run: requests by backend, retries by
/// reason and budget refusals, e.g. `route httproute/demo/books/0 on the web proxy: 250
/// requests (books 250), 3 retries (status 3), 0 refused by the retry budget`.
fn route_summary(
    baseline: &std::collections::BTreeMap<String, RouteSnapshot>,
    last: &std::collections::BTreeMap<String, RouteSnapshot>,
) -> String {
    let mut text = String::new();
    if !last.contains_key(BOOKS_ROUTE_LABEL) {
        text.push_str(&format!(
            "  route {BOOKS_ROUTE_LABEL}: no request matched it (was {ROUTE_FILE} edited?)\n"
        ));
    }
    for (route, w) in routes::windows_between(baseline, last, 1.0) {
        let list = |m: &std::collections::BTreeMap<String, f64>| {
            m.iter()
                .map(|(k, n)| format!("{k} {n:.0}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let retries = if w.retries.is_empty() {
            "0 retries".to_string()
        } else {
            format!("{:.0} retries ({})", w.total_retries(), list(&w.retries))
        };
        let split = w
            .shares()
            .iter()
            .map(|(backend, _)| {
                let n = w.requests.get(*backend).copied().unwrap_or(0.0);
                format!("{} {n:.0}", routes::short_backend(backend))
            })
            .collect::<Vec<_>>()
            .join(", ");
        text.push_str(&format!(
            "  route {route} on the web proxy: {:.0} requests ({split}), {retries}, {:.0} refused by the retry budget\n",
            w.total_requests(),
            w.budget_exhausted,
        ));
    }
    text
}

/// Resolves when the first proxy exits, with the error naming it and its log.
async fn first_exit(proxies: &mut [ProxyProcess]) -> DemoError {
    let mut exits: Vec<_> = proxies
        .iter_mut()
        .map(|p| {
            Box::pin(async move {
                let status = p.exited().await;
                status_or_error(p, status)
            })
        })
        .collect();
    std::future::poll_fn(|cx| {
        for exit in &mut exits {
            if let std::task::Poll::Ready(e) = std::future::Future::poll(exit.as_mut(), cx) {
                return std::task::Poll::Ready(e);
            }
        }
        std::task::Poll::Pending
    })
    .await
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

//! `weft`: parse the command line, set up logging, run the subcommand.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;
use weft_cli::demo::{self, apps::BooksConfig, DemoConfig};

#[derive(Debug, Parser)]
#[command(name = "weft", version, about = "Weft service mesh command line")]
struct Cli {
    /// Log filter for weft itself (tracing's EnvFilter syntax).
    #[arg(
        long,
        env = "WEFT_LOG",
        default_value = "warn,weft=info,weft_cli=info",
        global = true
    )]
    log: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a small mesh on loopback and watch its golden metrics, routes and mTLS.
    ///
    /// Starts in-process apps (web, a traffic generator, and books, a small
    /// JSON service failing 1 % of requests, in two versions), a weft-proxy
    /// process for each and a weft-controller with a development CA that
    /// certifies every proxy: web → web proxy (outbound: HTTPRoute books with
    /// retries, BackendPolicy retry budget) → mTLS → books proxy (inbound) →
    /// books, or books-v2 once the route's weights say so. Editing
    /// manifests/route.yaml in the demo's log directory changes the split live.
    /// Needs no root and no cluster. Stops on Ctrl-C, SIGTERM or --duration.
    Demo(DemoArgs),
    /// Add the Weft proxy to workloads in Kubernetes manifests (files or stdin) and print them.
    ///
    /// The same patch the admission webhook applies, for `weft inject app.yaml | kubectl apply -f -`.
    Inject(weft_cli::inject::InjectArgs),
    /// Ask why Kubernetes NetworkPolicies allow or deny a connection (exit 0 allowed, 1 denied, 2 error).
    Policy(weft_cli::policy::PolicyArgs),
    /// The CNI: `weft cni flows` streams the node's NetworkPolicy verdicts, `weft cni status`
    /// shows each node agent's state.
    Cni(weft_cli::cni::CniArgs),
    /// Golden signals per deployment, service, route or pod (exit 2 on error).
    ///
    /// Request rate, success rate, p50/p95/p99 latency, open TCP connections
    /// and the mTLS share, from a Prometheus server (--prometheus URL) or
    /// from the proxies' admin endpoints: two scrapes --window apart of the
    /// addresses given with --from-proxies, or of the meshed pods found in
    /// a manifest directory (--source dir:PATH). Deployment and pod rows are
    /// the traffic they received; service rows what meshed clients sent them;
    /// route rows what the clients' proxies counted on the route.
    Stat(weft_cli::stat::StatArgs),
    /// Check the cluster before installing Weft (--pre) or the installed Weft's health.
    ///
    /// One line per check, ✔ passed, ‼ warning, ✖ failed with what was found and a hint;
    /// -o json for scripts. Exit 0 when nothing failed, 1 when a check failed, 2 when the
    /// API server cannot be asked (no kubeconfig).
    Check(weft_cli::check::CheckArgs),
    /// A live stream of the requests chosen proxies handle (exit 2 on error).
    ///
    /// One line per request and direction, as each finishes: method,
    /// authority, path, status, latency (-o wide: route, endpoint, identities,
    /// retries), and the weft-proxy-error cause when the proxy answered
    /// itself; -o json for the raw objects. The proxies are given by admin
    /// address (--to-proxies) or found in a manifest directory (--source
    /// dir:PATH); filters are applied by the proxies.
    Tap(weft_cli::tap::TapArgs),
}

#[derive(Debug, clap::Args)]
struct DemoArgs {
    /// Requests per second web sends.
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    rps: u32,
    /// Stop after this many seconds instead of waiting for Ctrl-C.
    #[arg(long, value_name = "SECS", value_parser = clap::value_parser!(u64).range(1..))]
    duration: Option<u64>,
    /// The weft-proxy binary [default: weft-proxy next to this weft].
    #[arg(long, value_name = "PATH", env = "WEFT_DEMO_PROXY_BIN")]
    proxy_bin: Option<PathBuf>,
    /// The weft-controller binary [default: weft-controller next to this weft].
    #[arg(long, value_name = "PATH", env = "WEFT_DEMO_CONTROLLER_BIN")]
    controller_bin: Option<PathBuf>,
    /// The proxies' log filter (WEFT_PROXY_LOG) [default: warn, or debug with --verbose].
    #[arg(long, value_name = "FILTER")]
    proxy_log: Option<String>,
    /// Verbose proxy logs, and debug logs from weft itself.
    #[arg(short, long)]
    verbose: bool,
    /// Seconds to wait for each proxy's /ready.
    #[arg(long, value_name = "SECS", default_value_t = 15)]
    ready_timeout: u64,
    /// Fraction of books' responses that are 503s (the route retries them).
    #[arg(long, value_name = "FRACTION", default_value_t = 0.01)]
    failure_rate: f64,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let args = match cli.command {
        Command::Demo(args) => args,
        Command::Inject(args) => return run_inject(&args),
        Command::Policy(args) => return weft_cli::policy::run(&args),
        Command::Cni(args) => return weft_cli::cni::run(&args),
        Command::Stat(args) => return weft_cli::stat::run(&args),
        Command::Check(args) => return weft_cli::check::run(&args),
        Command::Tap(args) => return weft_cli::tap::run(&args),
    };
    let filter = if args.verbose {
        "info,weft=debug,weft_cli=debug"
    } else {
        cli.log.as_str()
    };
    let env_filter = match EnvFilter::try_new(filter) {
        Ok(f) => f,
        Err(e) => {
            eprintln!(
                "weft: invalid --log / WEFT_LOG filter {filter:?} (expected tracing's EnvFilter syntax, e.g. warn,weft=info): {e}"
            );
            return ExitCode::from(2);
        }
    };
    tracing_subscriber::fmt()
        .with_env_filter(env_filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();

    match run_demo(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("weft demo: {}", weft_proto::report::chain(e.chain()));
            ExitCode::FAILURE
        }
    }
}

fn run_inject(args: &weft_cli::inject::InjectArgs) -> ExitCode {
    let mut out = std::io::stdout().lock();
    match weft_cli::inject::run(args, &mut std::io::stdin().lock(), &mut out) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("weft inject: {}", weft_proto::report::chain(e.chain()));
            ExitCode::FAILURE
        }
    }
}

fn run_demo(args: DemoArgs) -> anyhow::Result<()> {
    if !(0.0..=1.0).contains(&args.failure_rate) {
        anyhow::bail!(
            "--failure-rate must be between 0 and 1, not {}",
            args.failure_rate
        );
    }
    let proxy_bin = match args.proxy_bin {
        Some(p) => p,
        None => demo::proxy::default_proxy_bin()?,
    };
    let controller_bin = match args.controller_bin {
        Some(p) => p,
        None => demo::controller::default_controller_bin()?,
    };
    let config = DemoConfig {
        proxy_bin,
        controller_bin,
        rps: args.rps,
        duration: args.duration.map(Duration::from_secs),
        proxy_log: args
            .proxy_log
            .unwrap_or_else(|| if args.verbose { "debug" } else { "warn" }.into()),
        ready_timeout: Duration::from_secs(args.ready_timeout),
        shutdown_grace: Duration::from_secs(10),
        books: BooksConfig {
            failure_rate: args.failure_rate,
            ..BooksConfig::default()
        },
    };
    // Two workers: the apps and the scraper share the machine with two
    // proxy processes, so more would only contend.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(demo::run(config))?;
    Ok(())
}

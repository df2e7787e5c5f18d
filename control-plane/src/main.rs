//! `weft-controller`: parses flags (with environment fallbacks), starts
//! logging and the runtime, and calls [`weft_controller::runtime::run`].

use std::net::SocketAddr;
use std::process::ExitCode;

use clap::Parser;
use tracing_subscriber::EnvFilter;
use weft_controller::runtime::{self, Config};
use weft_controller::source::SourceConfig;

#[derive(Debug, Parser)]
#[command(
    name = "weft-controller",
    version,
    about = "Weft control plane: destination discovery for Weft proxies"
)]
struct Args {
    /// Where cluster state comes from: `kube` (the Kubernetes API) or
    /// `dir:PATH` (a directory of YAML manifests, reloaded on change).
    #[arg(long, env = "WEFT_CONTROLLER_SOURCE", default_value = "kube")]
    source: SourceConfig,
    /// Destination + policy gRPC listen address.
    #[arg(
        long,
        env = "WEFT_CONTROLLER_DESTINATION_ADDR",
        default_value = "0.0.0.0:8086"
    )]
    destination_addr: SocketAddr,
    /// Identity gRPC listen address.
    #[arg(
        long,
        env = "WEFT_CONTROLLER_IDENTITY_ADDR",
        default_value = "0.0.0.0:8080"
    )]
    identity_addr: SocketAddr,
    /// Admin listen address: /metrics, /ready, /live.
    #[arg(
        long,
        env = "WEFT_CONTROLLER_ADMIN_ADDR",
        default_value = "0.0.0.0:9990"
    )]
    admin_addr: SocketAddr,
    /// Cluster DNS domain, for names like svc.ns.svc.<domain>.
    #[arg(
        long,
        env = "WEFT_CONTROLLER_CLUSTER_DOMAIN",
        default_value = "cluster.local"
    )]
    cluster_domain: String,
    /// SPIFFE trust domain of workload identities.
    #[arg(
        long,
        env = "WEFT_CONTROLLER_TRUST_DOMAIN",
        default_value = "cluster.local"
    )]
    trust_domain: String,
    /// tracing filter.
    #[arg(
        long,
        env = "WEFT_CONTROLLER_LOG",
        default_value = "warn,weft=info,weft_controller=info"
    )]
    log: String,
    /// Log as JSON lines.
    #[arg(long, env = "WEFT_CONTROLLER_LOG_JSON")]
    log_json: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let filter = match EnvFilter::try_new(&args.log) {
        Ok(f) => f,
        Err(e) => {
            eprintln!(
                "weft-controller: --log / WEFT_CONTROLLER_LOG {:?} is not a tracing filter: {e}",
                args.log
            );
            return ExitCode::from(2);
        }
    };
    let fmt = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if args.log_json {
        fmt.json().init();
    } else {
        fmt.init();
    }
    let config = Config {
        source: args.source,
        destination_addr: args.destination_addr,
        identity_addr: args.identity_addr,
        admin_addr: args.admin_addr,
        cluster_domain: args.cluster_domain,
        trust_domain: args.trust_domain,
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("weft-controller: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(runtime::run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("weft-controller: {e}");
            ExitCode::FAILURE
        }
    }
}

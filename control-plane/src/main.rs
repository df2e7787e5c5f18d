//! `weft-controller`: parses flags (with environment fallbacks), starts
//! logging and the runtime, and calls [`weft_controller::runtime::run`].
//! Subcommands: `token` mints a local-mode identity token, `dev-ca`
//! creates a development CA.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;
use weft_controller::identity::ca::IssuerFiles;
use weft_controller::identity::rate::{CeilingConfig, RateConfig};
use weft_controller::identity::token::{LocalTokens, PodBinding};
use weft_controller::identity::{
    devca, parse_duration, IdentityConfig, IssuerSource, ServiceAccount, SpiffeId, TokenMode,
};
use weft_controller::runtime::{self, Config};
use weft_controller::source::SourceConfig;

#[derive(Debug, Parser)]
#[command(
    name = "weft-controller",
    version,
    about = "Weft control plane: destination discovery and workload identity for Weft proxies"
)]
struct Args {
    #[command(subcommand)]
    command: Option<Command>,
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
    /// Only the holder of a Lease writes route and policy status: run several replicas
    /// with this on (with --source kube; needs get/create/update on leases).
    #[arg(long, env = "WEFT_CONTROLLER_LEADER_ELECT")]
    leader_elect: bool,
    /// The controller's own namespace (the downward API's metadata.namespace): the Lease's,
    /// and the one its server certificates name (`identity.<ns>.serviceaccount.identity.<td>`,
    /// `destination.<ns>.…`), which proxies verify (their WEFT_PROXY_CONTROLLER_NAMESPACE).
    #[arg(
        long = "namespace",
        alias = "leader-elect-namespace",
        env = "WEFT_CONTROLLER_NAMESPACE",
        default_value = "weft"
    )]
    leader_elect_namespace: String,
    /// Development only: serve the identity and destination ports without TLS (tokens and
    /// policy cross the network in the clear, anyone may ask for any policy). Without it the
    /// identity port is TLS and the destination port mutual TLS, which needs an issuer
    /// (--issuer-* or --dev-ca). `weft check` warns while a controller runs with it.
    #[arg(long, env = "WEFT_CONTROLLER_INSECURE_PLAINTEXT")]
    insecure_plaintext: bool,
    /// This replica's identity in the Lease (its pod name: metadata.name); default: the
    /// host name.
    #[arg(long, env = "WEFT_CONTROLLER_POD_NAME")]
    leader_elect_identity: Option<String>,
    /// Issuer certificate (PEM; the issuer first, then any intermediates).
    /// Reloaded when it changes. With --issuer-key and --trust-anchors;
    /// without them (and without --dev-ca) no certificates are issued.
    #[arg(long, env = "WEFT_CONTROLLER_ISSUER_CERT", conflicts_with = "dev_ca")]
    issuer_cert: Option<PathBuf>,
    /// Issuer private key (PEM: PKCS#8 PRIVATE KEY or SEC1 EC PRIVATE KEY).
    #[arg(long, env = "WEFT_CONTROLLER_ISSUER_KEY", conflicts_with = "dev_ca")]
    issuer_key: Option<PathBuf>,
    /// Trust-anchor bundle (PEM, one or more roots); the issuer must chain
    /// to one of them.
    #[arg(long, env = "WEFT_CONTROLLER_TRUST_ANCHORS", conflicts_with = "dev_ca")]
    trust_anchors: Option<PathBuf>,
    /// Development CA directory (local mode; created when missing):
    /// trust-anchors.pem, issuer.crt, issuer.key, token-key. Not for production.
    #[arg(long, env = "WEFT_CONTROLLER_DEV_CA")]
    dev_ca: Option<PathBuf>,
    /// Local mode: the HMAC key file of controller-signed tokens (default
    /// with --dev-ca: DIR/token-key). Kube mode uses TokenReview.
    #[arg(long, env = "WEFT_CONTROLLER_TOKEN_KEY")]
    token_key: Option<PathBuf>,
    /// Lifetime of workload certificates.
    #[arg(long, env = "WEFT_CONTROLLER_CERT_LIFETIME", default_value = "24h", value_parser = parse_duration)]
    cert_lifetime: Duration,
    /// Certificates one pod may get back to back (the per-pod bucket; a
    /// token bound to no pod gets a bucket of its own).
    #[arg(long, env = "WEFT_CONTROLLER_CERTIFY_BURST", default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..))]
    certify_burst: u32,
    /// After the burst: one certificate per pod per this interval.
    #[arg(long, env = "WEFT_CONTROLLER_CERTIFY_REFILL", default_value = "10s", value_parser = parse_duration)]
    certify_refill: Duration,
    /// Controller-wide ceiling: certificates per second over all pods,
    /// sustained (a fraction of what one core signs; see control-plane/README.md).
    #[arg(long, env = "WEFT_CONTROLLER_CERTIFY_MAX_RATE", default_value_t = CeilingConfig::DEFAULT_RATE, value_parser = parse_rate)]
    certify_max_rate: f64,
    /// Controller-wide ceiling: certificates issued back to back over all
    /// pods (a rollout of this many pods at once sees no refusal).
    #[arg(long, env = "WEFT_CONTROLLER_CERTIFY_MAX_BURST", default_value_t = CeilingConfig::DEFAULT_BURST, value_parser = clap::value_parser!(u32).range(1..))]
    certify_max_burst: u32,
    /// Inbound policy of ports no Server selects, unless the pod or its namespace says
    /// otherwise (annotation config.weft.dev/default-inbound-policy): all-unauthenticated,
    /// all-authenticated, cluster-unauthenticated, cluster-authenticated, deny or audit.
    #[arg(
        long,
        env = "WEFT_CONTROLLER_DEFAULT_INBOUND_POLICY",
        default_value = "all-unauthenticated"
    )]
    default_inbound_policy: weft_controller::model::authz::DefaultPolicy,
    /// The cluster's pod and node networks, comma-separated CIDRs: where the cluster-*
    /// inbound policies allow clients from.
    #[arg(long, env = "WEFT_CONTROLLER_CLUSTER_NETWORKS", default_value = weft_controller::model::authz::DEFAULT_CLUSTER_NETWORKS, value_parser = parse_cluster_networks)]
    cluster_networks: ClusterNetworks,
    /// How often the issuer files are checked for changes.
    #[arg(long, env = "WEFT_CONTROLLER_ISSUER_RELOAD_INTERVAL", default_value = "5s", value_parser = parse_duration)]
    issuer_reload_interval: Duration,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Mints a local-mode identity token for a ServiceAccount and prints it
    /// (the proxy reads it from WEFT_PROXY_IDENTITY_TOKEN_FILE).
    Token(TokenArgs),
    /// Creates a development CA in DIR (if missing) and prints its files.
    DevCa {
        /// Directory for trust-anchors.pem, issuer.crt, issuer.key, token-key.
        dir: PathBuf,
    },
}

#[derive(Debug, clap::Args)]
struct TokenArgs {
    #[arg(long)]
    namespace: String,
    #[arg(long)]
    service_account: String,
    /// Bind the token to this pod (what a projected token is in a cluster):
    /// the controller rate-limits issuance per pod.
    #[arg(long)]
    pod: Option<String>,
    /// The pod's UID (with --pod).
    #[arg(long, requires = "pod")]
    pod_uid: Option<String>,
    /// The HMAC key file (as given to the controller's --token-key).
    #[arg(long, conflicts_with = "dev_ca", required_unless_present = "dev_ca")]
    token_key: Option<PathBuf>,
    /// Use DIR/token-key of a development CA (created if missing).
    #[arg(long)]
    dev_ca: Option<PathBuf>,
    /// How long the token is valid.
    #[arg(long, default_value = "720h", value_parser = parse_duration)]
    lifetime: Duration,
    /// Write the token to this file (mode 0600) instead of stdout.
    #[arg(long)]
    out: Option<PathBuf>,
}

/// `--cluster-networks`: one flag value, a comma-separated list.
#[derive(Clone, Debug)]
struct ClusterNetworks(Vec<weft_controller::model::netpol::Cidr>);

fn parse_cluster_networks(s: &str) -> Result<ClusterNetworks, String> {
    weft_controller::model::authz::parse_networks(s).map(ClusterNetworks)
}

/// A positive, finite number of certificates per second (`0.5`, `200`).
fn parse_rate(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(r) if r.is_finite() && r > 0.0 => Ok(r),
        _ => Err(format!(
            "{s:?} is not a positive number of certificates per second (e.g. 200 or 0.5)"
        )),
    }
}

fn mint(args: &TokenArgs) -> Result<(), String> {
    let sa = ServiceAccount::new(args.namespace.clone(), args.service_account.clone());
    // Validate the names the same way Certify will.
    SpiffeId::parse(&SpiffeId::new("check", sa.clone()).to_string())
        .map_err(|e| format!("--namespace / --service-account: {e}"))?;
    let pod = match &args.pod {
        Some(name) => Some(
            PodBinding::new(name.clone(), args.pod_uid.clone())
                .map_err(|e| format!("--pod / --pod-uid: {e}"))?,
        ),
        None => None,
    };
    let key = match (&args.token_key, &args.dev_ca) {
        (Some(k), _) => k.clone(),
        (None, Some(dir)) => {
            devca::ensure(dir).map_err(|e| e.to_string())?;
            dir.join(devca::TOKEN_KEY)
        }
        (None, None) => return Err("pass --token-key FILE or --dev-ca DIR".into()),
    };
    let tokens = LocalTokens::load(&key).map_err(|e| e.to_string())?;
    let token = match &pod {
        Some(pod) => tokens.mint_for_pod(&sa, pod, args.lifetime),
        None => tokens.mint(&sa, args.lifetime),
    };
    match &args.out {
        None => println!("{token}"),
        Some(path) => {
            use std::io::Write as _;
            let mut opts = std::fs::OpenOptions::new();
            opts.write(true).create(true).truncate(true);
            #[cfg(unix)]
            {
                use std::os::unix::fs::OpenOptionsExt as _;
                opts.mode(0o600);
            }
            opts.open(path)
                .and_then(|mut f| f.write_all(token.as_bytes()))
                .map_err(|e| format!("--out {}: {e}", path.display()))?;
        }
    }
    Ok(())
}

fn identity_config(args: &Args) -> Result<Option<IdentityConfig>, String> {
    let issuer = match (
        &args.dev_ca,
        &args.issuer_cert,
        &args.issuer_key,
        &args.trust_anchors,
    ) {
        (Some(dir), ..) => IssuerSource::DevCa(dir.clone()),
        (None, Some(cert), Some(key), Some(trust_anchors)) => IssuerSource::Files(IssuerFiles {
            cert: cert.clone(),
            key: key.clone(),
            trust_anchors: trust_anchors.clone(),
        }),
        (None, None, None, None) => return Ok(None),
        (None, cert, key, anchors) => {
            let missing: Vec<&str> = [
                (cert.is_none(), "--issuer-cert"),
                (key.is_none(), "--issuer-key"),
                (anchors.is_none(), "--trust-anchors"),
            ]
            .iter()
            .filter(|(m, _)| *m)
            .map(|(_, n)| *n)
            .collect();
            return Err(format!(
                "the identity service needs --issuer-cert, --issuer-key and --trust-anchors together; missing {}",
                missing.join(", ")
            ));
        }
    };
    if args.cert_lifetime < Duration::from_secs(60) {
        return Err(format!(
            "--cert-lifetime {:?} is too short; expected at least 1m",
            args.cert_lifetime
        ));
    }
    let mut config = IdentityConfig::new(issuer);
    config.tokens = args.token_key.clone().map(TokenMode::Local);
    config.cert_lifetime = args.cert_lifetime;
    config.rate = RateConfig {
        burst: args.certify_burst,
        refill: args.certify_refill,
    };
    config.ceiling = CeilingConfig {
        rate: args.certify_max_rate,
        burst: args.certify_max_burst,
    };
    config.reload_interval = args.issuer_reload_interval.max(Duration::from_millis(100));
    Ok(Some(config))
}

/// The host name (a pod's name in Kubernetes), else a random identity: two replicas must
/// never share one.
fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| format!("weft-controller-{:016x}", fallback_id()))
}

fn fallback_id() -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    t ^ u64::from(std::process::id()).rotate_left(32)
}

fn main() -> ExitCode {
    let args = Args::parse();
    match &args.command {
        Some(Command::Token(t)) => {
            return match mint(t) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("weft-controller token: {e}");
                    ExitCode::from(2)
                }
            }
        }
        Some(Command::DevCa { dir }) => {
            return match devca::ensure(dir) {
                Ok(created) => {
                    for f in [
                        devca::TRUST_ANCHORS,
                        devca::ISSUER_CERT,
                        devca::ISSUER_KEY,
                        devca::TOKEN_KEY,
                    ] {
                        println!("{}", dir.join(f).display());
                    }
                    eprintln!("weft-controller dev-ca: {created:?} development CA in {} (dev only: keys are unencrypted)", dir.display());
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("weft-controller dev-ca: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        None => {}
    }
    let identity = match identity_config(&args) {
        Ok(i) => i,
        Err(e) => {
            eprintln!("weft-controller: {e}");
            return ExitCode::from(2);
        }
    };
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
    // Colour only on a terminal: a file or a log collector gets plain text.
    let fmt = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
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
        identity,
        leader_election: args.leader_elect.then(|| {
            let identity = args.leader_elect_identity.clone().unwrap_or_else(hostname);
            weft_controller::lease::LeaseConfig::new(&args.leader_elect_namespace, &identity)
        }),
        inbound: weft_controller::index::inbound::InboundConfig {
            default_policy: args.default_inbound_policy,
            cluster_networks: args.cluster_networks.0.clone(),
            trust_domain: String::new(), // the runtime uses --trust-domain
        },
        namespace: args.leader_elect_namespace.clone(),
        insecure_plaintext: args.insecure_plaintext,
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

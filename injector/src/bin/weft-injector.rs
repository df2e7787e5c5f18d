//! `weft-injector`: the mutating admission webhook. Parses flags, loads the serving
//! certificate, and serves until SIGTERM. The work is in `weft_injector::webhook`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use weft_injector::patch::SidecarMode;
use weft_injector::patch::{InjectConfig, NamespaceMeta};
use weft_injector::ports::PortList;
use weft_injector::webhook::namespaces::{KubeNamespaces, NamespaceSource, StaticNamespaces};
use weft_injector::webhook::server::{self, ServerConfig, State};
use weft_injector::webhook::tls::CertStore;

#[derive(Debug, Parser)]
#[command(
    name = "weft-injector",
    version,
    about = "Weft's sidecar-injecting admission webhook"
)]
struct Args {
    /// HTTPS listen address.
    #[arg(long, env = "WEFT_INJECTOR_ADDR", default_value = "0.0.0.0:8443")]
    addr: SocketAddr,
    /// PEM certificate chain (cert-manager's tls.crt).
    #[arg(
        long,
        env = "WEFT_INJECTOR_TLS_CERT",
        default_value = "/var/run/weft.dev/tls/tls.crt"
    )]
    tls_cert: PathBuf,
    /// PEM private key (tls.key).
    #[arg(
        long,
        env = "WEFT_INJECTOR_TLS_KEY",
        default_value = "/var/run/weft.dev/tls/tls.key"
    )]
    tls_key: PathBuf,
    /// How often to check the certificate files for changes, in seconds.
    #[arg(long, env = "WEFT_INJECTOR_TLS_RELOAD_SECS", default_value_t = 10)]
    tls_reload_secs: u64,
    /// Largest AdmissionReview body accepted, in bytes.
    #[arg(long, env = "WEFT_INJECTOR_MAX_BODY_BYTES", default_value_t = server::DEFAULT_MAX_BODY_BYTES)]
    max_body_bytes: usize,
    /// Where namespace metadata comes from: kube (the API server), or none (only pods'
    /// own weft.dev/inject annotations count).
    #[arg(long, env = "WEFT_INJECTOR_NAMESPACES", default_value = "kube")]
    namespaces: String,
    /// Namespaces to treat as weft.dev/inject: enabled when --namespaces=none (comma-separated).
    #[arg(long, env = "WEFT_INJECTOR_ENABLED_NAMESPACES", default_value = "")]
    enabled_namespaces: String,
    #[arg(long, env = "WEFT_INJECTOR_PROXY_IMAGE")]
    proxy_image: Option<String>,
    #[arg(long, env = "WEFT_INJECTOR_INIT_IMAGE")]
    init_image: Option<String>,
    #[arg(long, env = "WEFT_INJECTOR_IMAGE_PULL_POLICY")]
    image_pull_policy: Option<String>,
    /// Inject the proxy as a native sidecar: `auto` (native on Kubernetes 1.29+, read from
    /// the API server at start; native when it cannot be read), `true` or `false` (classic).
    #[arg(long, env = "WEFT_INJECTOR_NATIVE_SIDECAR", default_value = "auto")]
    native_sidecar: weft_injector::patch::SidecarMode,
    /// The CNI plugin installs the redirect: do not add weft-init.
    #[arg(long, env = "WEFT_INJECTOR_CNI", default_value_t = false, action = clap::ArgAction::Set)]
    cni: bool,
    /// WEFT_PROXY_DESTINATION_ADDR for injected proxies.
    #[arg(long, env = "WEFT_INJECTOR_DESTINATION_ADDR")]
    destination_addr: Option<String>,
    /// WEFT_PROXY_IDENTITY_ADDR for injected proxies.
    #[arg(long, env = "WEFT_INJECTOR_IDENTITY_ADDR")]
    identity_addr: Option<String>,
    /// WEFT_PROXY_CONTROLLER_NAMESPACE for injected proxies: the controller's namespace, named
    /// in its TLS certificates (the chart passes the release namespace).
    #[arg(long, env = "WEFT_INJECTOR_CONTROLLER_NAMESPACE")]
    controller_namespace: Option<String>,
    #[arg(
        long,
        env = "WEFT_INJECTOR_TRUST_DOMAIN",
        default_value = "cluster.local"
    )]
    trust_domain: String,
    /// ConfigMap with the trust anchors (ca.crt) to mount into proxies.
    #[arg(long, env = "WEFT_INJECTOR_TRUST_ANCHORS_CONFIGMAP")]
    trust_anchors_configmap: Option<String>,
    /// Audience of the projected ServiceAccount token the proxy shows the identity service.
    #[arg(
        long,
        env = "WEFT_INJECTOR_TOKEN_AUDIENCE",
        default_value = "identity.weft.dev"
    )]
    token_audience: String,
    /// Access log format for every injected proxy (`json` or `apache`; pods choose theirs with
    /// config.weft.dev/access-log).
    #[arg(long, env = "WEFT_INJECTOR_ACCESS_LOG", value_parser = ["json", "apache"])]
    access_log: Option<String>,
    /// OTLP/gRPC collector (HOST:PORT) injected proxies export spans to (pods override it with
    /// config.weft.dev/trace-collector).
    #[arg(long, env = "WEFT_INJECTOR_TRACE_COLLECTOR", value_parser = host_port)]
    trace_collector: Option<String>,
    /// Head sampling rate (0..=1) for requests without a trace (config.weft.dev/trace-sampling).
    #[arg(long, env = "WEFT_INJECTOR_TRACE_SAMPLING", value_parser = rate)]
    trace_sampling: Option<String>,
    /// The cluster's default inbound policy (the controller's --default-inbound-policy): the
    /// fallback injected proxies apply until the controller answers, unless the pod or its
    /// namespace sets config.weft.dev/default-inbound-policy.
    #[arg(long, env = "WEFT_INJECTOR_DEFAULT_INBOUND_POLICY")]
    default_inbound_policy: Option<weft_model::authz::DefaultPolicy>,
    /// Opaque ports for every injected proxy (pods add theirs with config.weft.dev/opaque-ports).
    #[arg(long, env = "WEFT_INJECTOR_OPAQUE_PORTS", default_value = "")]
    opaque_ports: PortList,
    /// Log filter.
    #[arg(
        long,
        env = "WEFT_INJECTOR_LOG",
        default_value = "warn,weft=info,weft_injector=info"
    )]
    log: String,
    /// Log as JSON lines.
    #[arg(long, env = "WEFT_INJECTOR_LOG_JSON")]
    log_json: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    if let Err(e) = weft_injector::telemetry::init(&args.log, args.log_json) {
        eprintln!("{}: {e}", env!("CARGO_BIN_NAME"));
        return ExitCode::from(2);
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("weft-injector: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("weft-injector: {}", weft_proto::report::chain(e.chain()));
            ExitCode::FAILURE
        }
    }
}

fn host_port(s: &str) -> Result<String, String> {
    if weft_injector::patch::is_host_port(s) {
        Ok(s.to_string())
    } else {
        Err(format!("{s:?} is not HOST:PORT"))
    }
}

fn rate(s: &str) -> Result<String, String> {
    if weft_injector::patch::is_rate(s) {
        Ok(s.to_string())
    } else {
        Err(format!("{s:?} is not a rate between 0 and 1"))
    }
}

fn inject_config(args: &Args) -> InjectConfig {
    let mut cfg = InjectConfig::default();
    if let Some(i) = &args.proxy_image {
        cfg.proxy_image = i.clone();
    }
    if let Some(i) = &args.init_image {
        cfg.init_image = i.clone();
    }
    cfg.image_pull_policy = args.image_pull_policy.clone();
    cfg.native_sidecar = args.native_sidecar.native(None);
    cfg.cni = args.cni;
    cfg.destination_addr = args.destination_addr.clone();
    cfg.identity_addr = args.identity_addr.clone();
    cfg.controller_namespace = args.controller_namespace.clone();
    cfg.access_log = args.access_log.clone();
    cfg.trace_collector = args.trace_collector.clone();
    cfg.trace_sampling = args.trace_sampling.clone();
    cfg.default_inbound_policy = args.default_inbound_policy;
    cfg.trust_domain = args.trust_domain.clone();
    cfg.trust_anchors_configmap = args.trust_anchors_configmap.clone();
    cfg.token_audience = args.token_audience.clone();
    cfg.opaque_ports = args.opaque_ports.clone();
    cfg
}

/// The API server's `(major, minor)`, if a client can be built and asked within 5 s.
async fn server_version() -> Option<(u32, u32)> {
    match kube::Client::try_default().await {
        Ok(client) => weft_injector::patch::server_version(&client, Duration::from_secs(5)).await,
        Err(e) => {
            tracing::warn!(error = %e, "--native-sidecar=auto: no Kubernetes client to read the version; injecting native sidecars");
            None
        }
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    let namespaces: Box<dyn NamespaceSource> = match args.namespaces.as_str() {
        "kube" => {
            let client = kube::Client::try_default()
                .await
                .context("--namespaces=kube: cannot build a Kubernetes client (in-cluster config or KUBECONFIG)")?;
            Box::new(KubeNamespaces::new(client, Duration::from_secs(30)))
        }
        "none" => Box::new(StaticNamespaces::new(
            args.enabled_namespaces
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(NamespaceMeta::enabled),
        )),
        other => anyhow::bail!("--namespaces={other:?}: want kube or none"),
    };
    let certs = CertStore::open(&args.tls_cert, &args.tls_key)?;
    let mut config = inject_config(&args);
    if args.native_sidecar == SidecarMode::Auto {
        let server = server_version().await;
        config.native_sidecar = SidecarMode::Auto.native(server);
        tracing::info!(
            kubernetes = ?server.map(|(a, b)| format!("{a}.{b}")),
            native = config.native_sidecar,
            "--native-sidecar=auto: {}",
            if config.native_sidecar { "native sidecars" } else { "classic sidecars (Kubernetes before 1.29)" }
        );
    }
    let state = Arc::new(State::new(
        config,
        namespaces,
        ServerConfig {
            max_body_bytes: args.max_body_bytes,
            ..Default::default()
        },
    ));
    let listener = tokio::net::TcpListener::bind(args.addr)
        .await
        .with_context(|| format!("binding {}", args.addr))?;
    tracing::info!(addr = %args.addr, "weft-injector serving");
    tokio::spawn(
        certs
            .clone()
            .watch(Duration::from_secs(args.tls_reload_secs.max(1))),
    );
    let shutdown = async {
        #[cfg(unix)]
        {
            if let Ok(mut term) =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
                return;
            }
        }
        let _ = tokio::signal::ctrl_c().await;
    };
    server::serve(listener, certs, state, shutdown).await?;
    tracing::info!("weft-injector stopped");
    Ok(())
}

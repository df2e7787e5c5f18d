//! Wires one source, the index and the servers together. The binary only
//! parses flags into [`Config`] and calls [`run`]; tests and benchmarks
//! call [`Controller::start`] on loopback ports.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use weft_proto::destination::destination_server::DestinationServer;
use weft_proto::identity::identity_server::IdentityServer;
use weft_proto::policy::policy_server::PolicyServer;

use crate::admin::Admin;
use crate::grpc::destination::DestinationConfig;
use crate::grpc::identity::IdentityParts;
use crate::grpc::tls::{caller_interceptor, Port as TlsPort, ServerTls};
use crate::grpc::{DestinationService, IdentityService, PolicyService};
use crate::identity::ca::{CaError, FileCa, IssuerFiles, Reload};
use crate::identity::devca::{self, DevCaError};
use crate::identity::token::{LocalTokens, TokenKeyError, TokenReviewVerifier, TokenVerifier};
use crate::identity::{IdentityConfig, IssuerSource, TokenMode};
use crate::index::{Index, ResolveConfig};
use crate::metrics::Metrics;
use crate::model::Kind;
use crate::source::dir::DirError;
use crate::source::{Readiness, SourceConfig};
use crate::source::{Source, SourceError};

#[derive(Clone, Debug)]
pub struct Config {
    pub source: SourceConfig,
    pub destination_addr: SocketAddr,
    pub identity_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub cluster_domain: String,
    pub trust_domain: String,
    /// The identity service; `None`: Certify answers UNIMPLEMENTED.
    pub identity: Option<IdentityConfig>,
    /// Leader election for the status writer (`--leader-elect`); `None`: this replica
    /// writes status whenever the source is kube.
    pub leader_election: Option<crate::lease::LeaseConfig>,
    /// `Policy.ServerPolicy`: `--default-inbound-policy` and `--cluster-networks` (its
    /// `trust_domain` is replaced by [`Config::trust_domain`]).
    pub inbound: crate::index::inbound::InboundConfig,
    /// The controller's namespace (`--namespace`): its server certificates name
    /// `identity.<ns>.serviceaccount.identity.<trust-domain>` and
    /// `destination.<ns>.serviceaccount.identity.<trust-domain>` (see [`crate::grpc::tls`]).
    pub namespace: String,
    /// `--insecure-plaintext`: both gRPC ports without TLS (development only). Otherwise
    /// the identity port is TLS and the destination port mutual TLS, which needs an issuer.
    pub insecure_plaintext: bool,
}

impl Config {
    /// Every server on an ephemeral 127.0.0.1 port and the default domains:
    /// for tests and demos that run the controller in-process (read the
    /// bound addresses from [`Controller`]). Plaintext (`insecure_plaintext`),
    /// as those clients are plain tonic clients; set it to `false` (with an
    /// issuer) to test TLS.
    pub fn loopback(source: SourceConfig) -> Self {
        let any = SocketAddr::from(([127, 0, 0, 1], 0));
        Config {
            source,
            destination_addr: any,
            identity_addr: any,
            admin_addr: any,
            cluster_domain: "cluster.local".into(),
            trust_domain: "cluster.local".into(),
            identity: None,
            leader_election: None,
            inbound: crate::index::inbound::InboundConfig::default(),
            namespace: "weft".into(),
            insecure_plaintext: true,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("cannot listen on {addr} for the {what} server: {source}; is another process using the port?")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Dir(#[from] DirError),
    #[error("cannot build a Kubernetes client (in-cluster config or KUBECONFIG): {0}")]
    Kube(#[from] kube::Error),
    #[error("identity: {0}")]
    Ca(#[from] CaError),
    #[error("identity: {0}")]
    DevCa(#[from] DevCaError),
    #[error("identity: {0}")]
    TokenKey(#[from] TokenKeyError),
    #[error("identity: {0}")]
    IdentityConfig(String),
    #[error("the control plane serves TLS with certificates from its identity issuer, and none is configured: pass --issuer-cert, --issuer-key and --trust-anchors (or --dev-ca DIR), or --insecure-plaintext for development (tokens and policy then cross the network in the clear)")]
    PlaintextNotAllowed,
    #[error("control-plane TLS: {0}")]
    Tls(#[from] crate::grpc::tls::TlsError),
    #[error("{what} server failed: {message}")]
    Server { what: &'static str, message: String },
}

impl From<SourceError> for RuntimeError {
    fn from(e: SourceError) -> Self {
        match e {
            SourceError::Dir(e) => RuntimeError::Dir(e),
            SourceError::Kube(e) => RuntimeError::Kube(e),
        }
    }
}

/// A running controller: its bound addresses and tasks.
#[derive(Debug)]
pub struct Controller {
    pub destination_addr: SocketAddr,
    pub identity_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub index: Index,
    pub metrics: Metrics,
    pub readiness: Readiness,
    /// The identity service's CA, when configured.
    pub ca: Option<Arc<FileCa>>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Controller {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

async fn bind(what: &'static str, addr: SocketAddr) -> Result<TcpListener, RuntimeError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| RuntimeError::Bind { what, addr, source })
}

impl Controller {
    /// Binds every port, starts the source and the servers, and returns
    /// without waiting for the source to sync (see `/ready`).
    pub async fn start(config: Config) -> Result<Self, RuntimeError> {
        Self::start_with_client(config, None).await
    }

    /// Like [`Controller::start`], with a given Kubernetes client for
    /// `--source kube` (tests pass one pointed at the fake API server).
    pub async fn start_with_client(
        config: Config,
        client: Option<kube::Client>,
    ) -> Result<Self, RuntimeError> {
        let index = Index::new();
        let metrics = Metrics::new();
        let readiness = Readiness::default();
        // Validate the source before binding anything.
        let source = Source::open(&config.source, metrics.clone(), client).await?;
        // The issuer is validated before any port is bound, too.
        let identity_parts = match &config.identity {
            Some(ic) => Some(identity_parts(ic, &config, source.client())?),
            None => None,
        };
        // So are the controller's own certificates (issued in memory from the issuer).
        let tls = match (&identity_parts, config.insecure_plaintext) {
            (_, true) => {
                tracing::warn!("--insecure-plaintext: the identity and destination ports serve plaintext; tokens and policy cross the network in the clear (development only)");
                None
            }
            (None, false) => return Err(RuntimeError::PlaintextNotAllowed),
            (Some((_, ca, _)), false) => {
                let make = |port| {
                    ServerTls::new(ca.clone(), port, &config.trust_domain, &config.namespace)
                };
                Some((make(TlsPort::Identity)?, make(TlsPort::Destination)?))
            }
        };
        let destination = bind("destination", config.destination_addr).await?;
        let identity = bind("identity", config.identity_addr).await?;
        let admin = bind("admin", config.admin_addr).await?;
        let local = |l: &TcpListener, what, addr| {
            l.local_addr()
                .map_err(|source| RuntimeError::Bind { what, addr, source })
        };
        let destination_addr = local(&destination, "destination", config.destination_addr)?;
        let identity_addr = local(&identity, "identity", config.identity_addr)?;
        let admin_addr = local(&admin, "admin", config.admin_addr)?;

        let mut tasks = Vec::new();
        // The status writer needs the client after the source takes it.
        if let Some(client) = source.client().cloned() {
            let leader = match &config.leader_election {
                Some(lease) => {
                    let (tx, rx) = tokio::sync::watch::channel(false);
                    tasks.push(tokio::spawn(crate::lease::run(
                        kube::Api::namespaced(client.clone(), &lease.namespace),
                        lease.clone(),
                        tx,
                        metrics.clone(),
                    )));
                    rx
                }
                None => {
                    metrics.leader.set(1);
                    // Always the leader: the sender is never dropped while the writer runs.
                    let (tx, rx) = tokio::sync::watch::channel(true);
                    tasks.push(tokio::spawn(async move {
                        tx.closed().await;
                    }));
                    rx
                }
            };
            tasks.push(tokio::spawn(crate::status::run(
                client,
                index.clone(),
                metrics.clone(),
                leader,
            )));
        }
        tasks.push(source.spawn(
            index.clone(),
            metrics.clone(),
            readiness.clone(),
            &Kind::ALL,
        ));

        let svc = DestinationService::new(
            index.clone(),
            DestinationConfig {
                cluster_domain: config.cluster_domain.clone(),
                resolve: ResolveConfig {
                    trust_domain: config.trust_domain.clone(),
                },
            },
            metrics.clone(),
        );
        let policy_svc = PolicyService::new(
            index.clone(),
            crate::index::inbound::InboundConfig {
                trust_domain: config.trust_domain.clone(),
                ..config.inbound.clone()
            },
            metrics.clone(),
        );
        // grpc.health.v1 on the destination port: `weft.destination.Destination` is SERVING
        // once the source has synced (the index holds the cluster), NOT_SERVING before.
        // Proxies are not ready until they have seen it SERVING once.
        let (health, health_service) = tonic_health::server::health_reporter();
        health
            .set_not_serving::<DestinationServer<DestinationService>>()
            .await;
        let synced = readiness.clone();
        tasks.push(tokio::spawn(async move {
            while !synced.is_ready() {
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
            health
                .set_serving::<DestinationServer<DestinationService>>()
                .await;
        }));
        // The verified client identity (mTLS) reaches the handlers as `CallerIdentity`.
        let router = tonic::transport::Server::builder()
            .add_service(health_service)
            .add_service(DestinationServer::with_interceptor(svc, caller_interceptor))
            .add_service(PolicyServer::with_interceptor(
                policy_svc,
                caller_interceptor,
            ));
        let result = |what: &'static str| {
            move |r: Result<(), tonic::transport::Error>| {
                if let Err(e) = r {
                    tracing::error!(error = %e, "{what} gRPC server stopped");
                }
            }
        };
        match &tls {
            Some((_, dest_tls)) => {
                tracing::info!(id = %dest_tls.identity(), "destination port: mutual TLS, workload certificates required");
                let (incoming, accept) = crate::grpc::tls::incoming(destination, dest_tls.clone());
                tasks.push(accept);
                let done = result("destination");
                tasks.push(tokio::spawn(async move {
                    done(router.serve_with_incoming(incoming).await)
                }));
            }
            None => {
                let incoming = tonic::transport::server::TcpIncoming::from(destination)
                    .with_nodelay(Some(true));
                let done = result("destination");
                tasks.push(tokio::spawn(async move {
                    done(router.serve_with_incoming(incoming).await)
                }));
            }
        }
        let (identity_svc, ca) = match identity_parts {
            Some((parts, ca, interval)) => {
                tasks.push(tokio::spawn(watch_issuer(
                    ca.clone(),
                    interval,
                    metrics.clone(),
                )));
                (IdentityService::new(parts, metrics.clone()), Some(ca))
            }
            None => (IdentityService::disabled(metrics.clone()), None),
        };
        let router =
            tonic::transport::Server::builder().add_service(IdentityServer::new(identity_svc));
        match &tls {
            Some((id_tls, _)) => {
                tracing::info!(id = %id_tls.identity(), "identity port: TLS");
                let (incoming, accept) = crate::grpc::tls::incoming(identity, id_tls.clone());
                tasks.push(accept);
                let done = result("identity");
                tasks.push(tokio::spawn(async move {
                    done(router.serve_with_incoming(incoming).await)
                }));
            }
            None => {
                let incoming =
                    tonic::transport::server::TcpIncoming::from(identity).with_nodelay(Some(true));
                let done = result("identity");
                tasks.push(tokio::spawn(async move {
                    done(router.serve_with_incoming(incoming).await)
                }));
            }
        }
        tasks.push(tokio::spawn(
            Admin {
                metrics: metrics.clone(),
                readiness: readiness.clone(),
                index: index.clone(),
            }
            .serve(admin),
        ));
        tracing::info!(%destination_addr, %identity_addr, %admin_addr, source = %config.source, "controller started");
        Ok(Controller {
            destination_addr,
            identity_addr,
            admin_addr,
            index,
            metrics,
            readiness,
            ca,
            tasks,
        })
    }
}

/// Loads the issuer and picks the token verifier for `ic`.
fn identity_parts(
    ic: &IdentityConfig,
    config: &Config,
    client: Option<&kube::Client>,
) -> Result<(IdentityParts, Arc<FileCa>, std::time::Duration), RuntimeError> {
    let files = match &ic.issuer {
        IssuerSource::Files(f) => f.clone(),
        IssuerSource::DevCa(dir) => {
            devca::ensure(dir)?;
            IssuerFiles::in_dir(dir)
        }
    };
    let ca = Arc::new(FileCa::load(files)?);
    let status = crate::identity::ca::CertificateAuthority::status(&*ca);
    tracing::info!(
        issuer = %status.issuer_subject,
        trust_anchors = status.trust_anchors,
        cert = %ca.files().cert.display(),
        "identity issuer loaded"
    );
    let tokens: Arc<dyn TokenVerifier> = match (&ic.tokens, client, &ic.issuer) {
        (Some(TokenMode::Local(path)), _, _) => Arc::new(LocalTokens::load(path)?),
        (Some(TokenMode::TokenReview) | None, Some(client), _) => {
            Arc::new(TokenReviewVerifier::new(client.clone()))
        }
        (Some(TokenMode::TokenReview), None, _) => {
            return Err(RuntimeError::IdentityConfig(format!(
                "TokenReview needs the Kubernetes API (--source kube), but the source is {}",
                config.source
            )))
        }
        (None, None, IssuerSource::DevCa(dir)) => {
            Arc::new(LocalTokens::load(&dir.join(devca::TOKEN_KEY))?)
        }
        (None, None, IssuerSource::Files(_)) => {
            return Err(RuntimeError::IdentityConfig(
                "local mode needs a token key: pass --token-key FILE (or use --dev-ca DIR)".into(),
            ))
        }
    };
    let reserved = [TlsPort::Identity, TlsPort::Destination]
        .map(|p| {
            crate::grpc::tls::server_identity(&config.trust_domain, &config.namespace, p)
                .to_string()
        })
        .to_vec();
    let parts = IdentityParts {
        reserved,
        trust_domain: config.trust_domain.clone(),
        ca: ca.clone(),
        tokens,
        cert_lifetime: ic.cert_lifetime,
        rate: ic.rate,
        ceiling: ic.ceiling,
    };
    Ok((parts, ca, ic.reload_interval))
}

/// Polls the issuer files; publishes issuer expiry and anchor count.
async fn watch_issuer(ca: Arc<FileCa>, interval: std::time::Duration, metrics: Metrics) {
    use crate::identity::ca::CertificateAuthority as _;
    let publish = |ca: &FileCa| {
        let status = ca.status();
        let expiry = status
            .issuer_not_after
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
        metrics.identity_issuer_expiry.set(expiry);
        metrics
            .identity_trust_anchors
            .set(i64::try_from(status.trust_anchors).unwrap_or(i64::MAX));
    };
    publish(&ca);
    loop {
        tokio::time::sleep(interval).await;
        let reload_ca = ca.clone();
        let outcome = tokio::task::spawn_blocking(move || reload_ca.reload_if_changed()).await;
        let result = match outcome {
            Ok(Reload::Unchanged) => continue,
            Ok(Reload::Reloaded) => {
                let status = ca.status();
                tracing::info!(issuer = %status.issuer_subject, trust_anchors = status.trust_anchors, "identity issuer reloaded");
                "ok"
            }
            Ok(Reload::Failed(e)) => {
                tracing::warn!(error = %e, "identity issuer files changed but do not load; still signing with the previous issuer");
                "failed"
            }
            Err(e) => {
                tracing::warn!(error = %e, "identity issuer reload task failed");
                "failed"
            }
        };
        metrics
            .identity_issuer_reloads
            .get_or_create(&crate::metrics::ResultLabels { result })
            .inc();
        publish(&ca);
    }
}

/// Runs the controller until SIGTERM or Ctrl-C.
pub async fn run(config: Config) -> Result<(), RuntimeError> {
    let controller = Controller::start(config).await?;
    shutdown_signal().await;
    tracing::info!("shutting down");
    drop(controller);
    Ok(())
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

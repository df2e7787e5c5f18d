//! Wires one source, the index and the servers together. The binary only
//! parses flags into [`Config`] and calls [`run`]; tests and benchmarks
//! call [`Controller::start`] on loopback ports.

use std::net::SocketAddr;

use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use weft_proto::destination::destination_server::DestinationServer;
use weft_proto::identity::identity_server::IdentityServer;
use weft_proto::policy::policy_server::PolicyServer;

use crate::admin::Admin;
use crate::grpc::destination::DestinationConfig;
use crate::grpc::unimplemented::{IdentityService, PolicyService};
use crate::grpc::DestinationService;
use crate::index::{Index, ResolveConfig};
use crate::metrics::Metrics;
use crate::source::dir::{DirError, DirSource};
use crate::source::{Readiness, SourceConfig};

#[derive(Clone, Debug)]
pub struct Config {
    pub source: SourceConfig,
    pub destination_addr: SocketAddr,
    pub identity_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub cluster_domain: String,
    pub trust_domain: String,
}

impl Config {
    /// Every server on an ephemeral 127.0.0.1 port and the default domains:
    /// for tests and demos that run the controller in-process (read the
    /// bound addresses from [`Controller`]).
    pub fn loopback(source: SourceConfig) -> Self {
        let any = SocketAddr::from(([127, 0, 0, 1], 0));
        Config {
            source,
            destination_addr: any,
            identity_addr: any,
            admin_addr: any,
            cluster_domain: "cluster.local".into(),
            trust_domain: "cluster.local".into(),
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
    #[error("{what} server failed: {message}")]
    Server { what: &'static str, message: String },
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
        let dir = match &config.source {
            SourceConfig::Dir(path) => Some(DirSource::new(path.clone(), metrics.clone())?),
            SourceConfig::Kube => None,
        };
        let client = match (&config.source, client) {
            (SourceConfig::Kube, Some(c)) => Some(c),
            (SourceConfig::Kube, None) => Some(kube::Client::try_default().await?),
            (SourceConfig::Dir(_), _) => None,
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
        match (dir, client) {
            (Some(dir), _) => {
                let (index, readiness) = (index.clone(), readiness.clone());
                tasks.push(tokio::spawn(async move {
                    if let Err(e) = dir.run(index, readiness).await {
                        tracing::error!(error = %e, "directory source stopped");
                    }
                }));
            }
            (None, Some(client)) => {
                tasks.push(tokio::spawn(crate::source::kube::run(
                    client,
                    index.clone(),
                    metrics.clone(),
                    readiness.clone(),
                )));
            }
            (None, None) => {}
        }

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
        let incoming =
            tonic::transport::server::TcpIncoming::from(destination).with_nodelay(Some(true));
        tasks.push(tokio::spawn(async move {
            let result = tonic::transport::Server::builder()
                .add_service(DestinationServer::new(svc))
                .add_service(PolicyServer::new(PolicyService))
                .serve_with_incoming(incoming)
                .await;
            if let Err(e) = result {
                tracing::error!(error = %e, "destination gRPC server stopped");
            }
        }));
        let incoming =
            tonic::transport::server::TcpIncoming::from(identity).with_nodelay(Some(true));
        tasks.push(tokio::spawn(async move {
            let result = tonic::transport::Server::builder()
                .add_service(IdentityServer::new(IdentityService))
                .serve_with_incoming(incoming)
                .await;
            if let Err(e) = result {
                tracing::error!(error = %e, "identity gRPC server stopped");
            }
        }));
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
            tasks,
        })
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

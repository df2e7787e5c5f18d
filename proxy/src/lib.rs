//! # weft-proxy
//!
//! Weft's sidecar proxy. Pod traffic reaches it through an iptables redirect: outbound
//! connections on `127.0.0.1:4140`, inbound on `0.0.0.0:4143`. For each connection it recovers
//! the original destination (`SO_ORIGINAL_DST`), detects the protocol by peeking (HTTP/1.x,
//! HTTP/2, TLS, otherwise opaque TCP), and forwards it: HTTP request by request over pooled
//! connections, everything else as a byte relay with half-close and resets preserved. The admin
//! port (`4191`) serves Prometheus metrics, readiness, liveness and shutdown.
//!
//! The tree follows the request path: [`transport`] (listening, original destination, detection),
//! [`http`] and [`tcp`] (the two ways a connection is forwarded), [`discovery`] (the
//! controller's `Destination.Resolve` client) and [`balance`] (per-request p2c over peak-EWMA
//! for HTTP, per-connection for TCP), [`identity`] (the controller's `Identity.Certify` client:
//! the workload certificate, renewed, held in a watch for the TLS stacks), [`metrics`],
//! [`admin`], [`config`]. [`Bound::serve`]
//! wires them together; `main.rs` only parses config and builds the runtime.
//!
//! With no control plane configured the proxy is a transparent proxy: every connection goes to
//! its original destination. With `WEFT_PROXY_DESTINATION_ADDR` set, outbound HTTP is routed
//! by original destination when that is a service's ClusterIP, else by authority, and
//! outbound opaque TCP by original destination, to the endpoints the controller names; unknown targets still go to their original destination. With
//! `WEFT_PROXY_IDENTITY_ADDR` set, the proxy obtains a workload certificate and is not ready
//! without a valid one; it then originates mutual TLS to the endpoints the controller marks as
//! meshed (HTTP carried over HTTP/2 between proxies) and terminates mTLS addressed to its own
//! identity ([`transport::mesh`]). HTTP/2 between proxies writes through
//! [`transport::coalesce`], so the frames one turn of the runtime produces (a request's HEADERS
//! and its body) leave in one TLS record and one write.
//!
//! Outbound traffic policy: [`route`] (the controller's `Destination.ClientPolicy`: Gateway API
//! route matching, filters, weighted backends) and [`resilience`] (timeouts, retries with a
//! budget, the circuit breaker, replayable bodies, failover), put together on the request path
//! in `http/outbound.rs` in the order route → filters → timeout → retry → balance → breaker →
//! endpoint.
//!
//! Inbound authorization: [`authz`] (the controller's `Policy.ServerPolicy` per inbound
//! port, the pure allow/deny decision), enforced in `serve.rs` per opaque connection and in
//! `http/mod.rs` per request. [`follow`] is the per-key stream machinery the ClientPolicy and
//! ServerPolicy clients share.

pub mod admin;
pub mod authz;
pub mod balance;
pub mod config;
pub mod discovery;
pub mod follow;
pub mod http;
pub mod identity;
pub mod metrics;
pub mod observe;
pub mod resilience;
pub mod route;
pub mod serve;
pub mod tcp;
pub mod telemetry;
pub mod transport;

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use config::{env, Config};
use metrics::{Direction, Metrics};
use transport::orig_dst::{FixedTarget, OrigDst, SoOriginalDst};

/// Errors that stop the proxy from starting.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("cannot listen on {var}={addr}: {source}")]
    Bind {
        var: &'static str,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot install signal handler: {0}")]
    Signal(#[source] std::io::Error),
    #[error(transparent)]
    Discovery(#[from] discovery::DiscoveryError),
    #[error(transparent)]
    Identity(#[from] identity::IdentityError),
    #[error("{var}: {source}", var = env::IDENTITY)]
    Tls {
        #[source]
        source: transport::tls::TlsError,
    },
    #[error("{var}: cannot start the access log writer: {0}", var = env::ACCESS_LOG)]
    AccessLog(#[source] std::io::Error),
    #[error(transparent)]
    Trace(#[from] observe::trace::TraceError),
}

/// Bound listeners, before serving (so tests and embedders can learn ephemeral ports).
#[derive(Debug)]
pub struct Bound {
    config: Arc<Config>,
    metrics: Arc<Metrics>,
    identity: Option<identity::Client>,
    mesh: Option<Arc<transport::mesh::Mesh>>,
    outbound: TcpListener,
    inbound: TcpListener,
    admin: TcpListener,
}

async fn bind(var: &'static str, addr: SocketAddr) -> Result<TcpListener, RunError> {
    let sock = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()
    } else {
        tokio::net::TcpSocket::new_v6()
    }
    .map_err(|source| RunError::Bind { var, addr, source })?;
    let bind_err = |source| RunError::Bind { var, addr, source };
    sock.set_reuseaddr(true).map_err(bind_err)?;
    sock.bind(addr).map_err(bind_err)?;
    sock.listen(1024).map_err(bind_err)
}

impl Bound {
    /// Checks the identity files (trust anchors, token) and creates the private key, then binds
    /// every listener; fails with the variable and the file or address at fault.
    pub async fn bind(config: Config) -> Result<Self, RunError> {
        let metrics = Metrics::new();
        let identity = match &config.identity {
            Some(c) => Some(identity::Client::new(c.clone(), metrics.identity.clone())?),
            None => None,
        };
        let mesh = match (&identity, &config.identity) {
            (Some(client), Some(c)) => Some(
                transport::mesh::Mesh::new(
                    &c.id,
                    client.subscribe(),
                    client.trust_anchors(),
                    metrics.tls.clone(),
                )
                .map_err(|source| RunError::Tls { source })?,
            ),
            _ => None,
        };
        Ok(Self {
            metrics,
            identity,
            mesh,
            outbound: bind(env::OUTBOUND_ADDR, config.outbound.addr).await?,
            inbound: bind(env::INBOUND_ADDR, config.inbound.addr).await?,
            admin: bind(env::ADMIN_ADDR, config.admin_addr).await?,
            config: Arc::new(config),
        })
    }

    pub fn outbound_addr(&self) -> std::io::Result<SocketAddr> {
        self.outbound.local_addr()
    }
    pub fn inbound_addr(&self) -> std::io::Result<SocketAddr> {
        self.inbound.local_addr()
    }
    pub fn admin_addr(&self) -> std::io::Result<SocketAddr> {
        self.admin.local_addr()
    }

    /// Serves until `shutdown` is cancelled (or `/shutdown` is called), then drains: listeners
    /// close at once, in-flight connections get the grace period to finish. Fails before
    /// serving only when the discovery client cannot be built.
    pub async fn serve(
        self,
        shutdown: CancellationToken,
        logs: telemetry::LogHandle,
    ) -> Result<(), RunError> {
        let Bound {
            config,
            metrics,
            identity,
            mesh,
            outbound,
            inbound,
            admin,
        } = self;
        let identity_state = identity.as_ref().map(identity::Client::subscribe);
        // Mutual TLS to the destination service with the workload certificate (unless its
        // address says http://): every discovery and policy stream shares that channel.
        let controller_tls = match (&identity, &config.identity) {
            (Some(client), Some(c)) => Some(
                transport::control::ControllerTls::new(
                    transport::control::controller_identity(
                        transport::control::trust_domain(&c.id),
                        &c.controller_namespace,
                        transport::control::Service::Destination,
                    ),
                    client.trust_anchors(),
                    Some(client.subscribe()),
                )
                .map_err(|source| RunError::Tls { source })?,
            ),
            _ => None,
        };
        let identity_task = identity.map(|client| {
            if let Some(c) = &config.identity {
                tracing::info!(id = %c.id, addr = %c.addr, anchors = client.trust_anchors().borrow().len(), "identity enabled");
            }
            tokio::spawn(client.run())
        });
        // Outbound connections to original destinations are counted as not meshed; inbound
        // ones go to the local application.
        let not_meshed =
            metrics
                .tls
                .connections(Direction::Outbound, metrics::TlsStatus::NotMeshed, "");
        let clients = |opened| {
            http::client::Clients::new(config.connect_timeout, config.pool_idle_timeout, opened)
        };
        let (outbound_clients, inbound_clients) = (clients(Some(not_meshed)), clients(None));
        // Whether the controller has served once: the proxy is not ready before (see
        // `discovery::ControllerState`).
        let mut controller = None;
        // Inbound authorization: the fallback policy, and the ServerPolicy streams when a
        // controller is configured (on the resolver's channel).
        let fallback = Arc::new(authz::ServerPolicy::fallback(config.inbound_default_policy));
        let mut server_policies = None;
        let router = match &config.discovery {
            Some(d) => {
                let resolver = discovery::Resolver::new(
                    d.clone(),
                    &config.workload,
                    metrics.discovery.clone(),
                    controller_tls,
                )?;
                tracing::info!(addr = %d.addr, namespace = %config.workload.namespace, "discovery enabled");
                controller = Some(resolver.watch_controller());
                server_policies = Some(authz::client::ServerPolicies::new(
                    resolver.channel(),
                    d.clone(),
                    &config.workload,
                    fallback.clone(),
                    metrics.authz.streams.clone(),
                ));
                Some(balance::Router::new(
                    resolver,
                    balance::Context {
                        settings: balance::Settings {
                            connect_timeout: config.connect_timeout,
                            pool_idle_timeout: config.pool_idle_timeout,
                            decay: d.balancer_decay,
                            discovery_timeout: d.timeout,
                            idle_timeout: d.idle_timeout,
                        },
                        mesh: mesh.clone(),
                        tls: metrics.tls.clone(),
                        metrics: metrics.discovery.clone(),
                        mesh_pools: Default::default(),
                    },
                    metrics.policy.clone(),
                ))
            }
            None => None,
        };
        tracing::info!(default_policy = %config.inbound_default_policy, from_controller = server_policies.is_some(), "inbound authorization");
        let inbound_authz = authz::Authz::new(fallback, server_policies, metrics.authz.clone());
        let mut sinks: Vec<Arc<dyn observe::Sink>> = Vec::new();
        if let Some(format) = config.access_log {
            let log = observe::access::AccessLog::start(
                format,
                Box::new(std::io::stdout()),
                &metrics.observe,
            )
            .map_err(RunError::AccessLog)?;
            sinks.push(log);
        }
        let taps = observe::tap::Taps::new(&metrics.observe);
        sinks.push(taps.clone());
        let tracer = match &config.tracing {
            Some(t) => {
                tracing::info!(collector = %t.collector, sampling = t.sampling.millionths() as f64 / 1e6, "tracing enabled");
                Some(observe::trace::Tracer::start(
                    t,
                    &config.workload,
                    &metrics.observe,
                )?)
            }
            None => None,
        };
        let flush_at_exit = tracer.clone();
        let observe = observe::Observe::with_tracer(sinks, tracer);
        let tracker = TaskTracker::new();
        let admin_state = Arc::new(admin::Admin {
            metrics: metrics.clone(),
            ready: false.into(),
            shutdown: shutdown.clone(),
            logs,
            identity: identity_state,
            controller,
            taps,
            mesh: mesh.clone(),
            tap_authorized: config
                .identity
                .as_ref()
                .map(|c| Arc::from(c.tap_authorized_identity.as_str())),
        });
        let admin_task = tokio::spawn(admin::serve(admin, admin_state.clone()));

        let mut loops = Vec::new();
        for (direction, listener, lc) in [
            (Direction::Outbound, outbound, &config.outbound),
            (Direction::Inbound, inbound, &config.inbound),
        ] {
            let orig_dst: Arc<dyn OrigDst> = match lc.fixed_target {
                Some(t) => Arc::new(FixedTarget(t)),
                None => Arc::new(SoOriginalDst),
            };
            let local = listener.local_addr().unwrap_or(lc.addr);
            tracing::info!(%direction, addr = %local, fixed_target = ?lc.fixed_target, "listening");
            loops.push(tokio::spawn(serve::accept_loop(serve::Listener {
                direction,
                listener,
                local,
                orig_dst,
                config: config.clone(),
                metrics: metrics.clone(),
                clients: match direction {
                    Direction::Outbound => outbound_clients.clone(),
                    Direction::Inbound => inbound_clients.clone(),
                },
                // Inbound traffic is already at its pod: only outbound is routed.
                router: match direction {
                    Direction::Outbound => router.clone(),
                    Direction::Inbound => None,
                },
                mesh: mesh.clone(),
                // The admin port is another listener: never subject to policy.
                authz: (direction == Direction::Inbound).then(|| inbound_authz.clone()),
                observe: observe.clone(),
                drain: shutdown.clone(),
                tracker: tracker.clone(),
            })));
        }
        admin_state.ready.store(true, Ordering::Release);

        shutdown.cancelled().await;
        for l in loops {
            let _ = l.await;
        }
        tracker.close();
        let open = tracker.len();
        tracing::info!(open, grace = ?config.shutdown_grace_period, "draining");
        if tokio::time::timeout(config.shutdown_grace_period, tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                open = tracker.len(),
                "grace period over; closing remaining connections"
            );
        } else {
            tracing::info!("drained");
        }
        // The spans of the last requests: exported now rather than lost with the process.
        if let Some(t) = flush_at_exit {
            if !t.flush(observe::trace::EXPORT_TIMEOUT).await {
                tracing::warn!(
                    "trace spans queued at shutdown were not all exported within {:?}",
                    observe::trace::EXPORT_TIMEOUT
                );
            }
        }
        admin_task.abort();
        if let Some(t) = identity_task {
            t.abort();
        }
        Ok(())
    }
}

/// Cancels `token` on SIGTERM or SIGINT.
pub fn cancel_on_signals(token: CancellationToken) -> Result<(), RunError> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).map_err(RunError::Signal)?;
    let mut int = signal(SignalKind::interrupt()).map_err(RunError::Signal)?;
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM received"),
            _ = int.recv() => tracing::info!("SIGINT received"),
        }
        token.cancel();
    });
    Ok(())
}

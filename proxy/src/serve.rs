//! Accepting connections and sending each to the handler for its protocol.
//!
//! accept → original destination (or fixed target) → loop check → opaque port? → detect →
//! HTTP/1 (first head checked) | HTTP/2 | TLS and opaque → TCP relay.
//!
//! Inbound, a TLS ClientHello whose SNI names this workload's identity (or another mesh
//! identity, see [`Mesh::terminates`]) is mesh traffic from a peer proxy: the proxy terminates
//! it ([`Mesh::accept`]), and the negotiated ALPN says what it carries (HTTP/2, HTTP/1.1 for
//! upgrades, or opaque TCP), which is then served like a plaintext connection with the
//! client's identity attached. Any other TLS is an
//! application's own and is relayed untouched. Every inbound connection is counted with its
//! TLS status (`weft_tls_connections_total`).
//!
//! Outbound, connections are accepted in plaintext from the application; the balancer's
//! endpoints decide whether the connection to the peer is mTLS.
//!
//! Inbound, every connection first gets its port's authorization policy ([`crate::authz`]):
//! opaque TCP, TLS passed through and mTLS carrying opaque TCP are decided at once (a denied
//! client is reset); HTTP is decided per request in `http/mod.rs`.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use prometheus_client::metrics::counter::Counter;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::authz::{Authz, PolicyRx};
use crate::balance::{self, InFlight, Pick, Router};
use crate::config::Config;
use crate::http::{self, client::Clients, head, Cause, ConnCtx, Limits};
use crate::metrics::{Direction, Metrics, TcpMetrics, TlsStatus};
use crate::observe::Observe;
use crate::tcp::{self, ByteCounters, Stream};
use crate::transport::coalesce::Coalesce;
use crate::transport::counting::CountingIo;
use crate::transport::detect::{self, Detection, Protocol};
use crate::transport::mesh::{Alpn, Mesh};
use crate::transport::orig_dst::{self, OrigDst};
use crate::transport::prefixed::PrefixedIo;

/// One listener and what its connections need.
pub struct Listener {
    pub direction: Direction,
    pub listener: TcpListener,
    pub local: SocketAddr,
    pub orig_dst: Arc<dyn OrigDst>,
    pub config: Arc<Config>,
    pub metrics: Arc<Metrics>,
    pub clients: Arc<Clients>,
    /// Discovery-based routing (outbound with a controller); `None`: original destinations.
    pub router: Option<Arc<Router>>,
    /// This proxy's mesh TLS (identity configured): inbound terminates mTLS addressed to it.
    pub mesh: Option<Arc<Mesh>>,
    /// Inbound: authorization policy by port.
    pub authz: Option<Arc<Authz>>,
    /// Access log, taps and traces.
    pub observe: Arc<Observe>,
    pub drain: CancellationToken,
    pub tracker: TaskTracker,
}

/// Inbound: counters of accepted connections by TLS status.
struct InboundTls {
    /// Plaintext clients (`plaintext`, or `no-identity` without mesh TLS).
    plain: Counter,
    /// TLS not addressed to this workload.
    passthrough: Counter,
}

struct ConnShared {
    direction: Direction,
    local: SocketAddr,
    orig_dst: Arc<dyn OrigDst>,
    config: Arc<Config>,
    metrics: Arc<Metrics>,
    tcp: TcpMetrics,
    clients: Arc<Clients>,
    router: Option<Arc<Router>>,
    mesh: Option<Arc<Mesh>>,
    /// Inbound only.
    authz: Option<Arc<Authz>>,
    /// Inbound only.
    inbound_tls: Option<InboundTls>,
    /// Outbound: connections to original destinations (`not-meshed`).
    outbound_plain: Counter,
    observe: Arc<Observe>,
    drain: CancellationToken,
}

/// Accepts until drained; each connection runs as a tracked task. Returns when the listener
/// is closed (dropped), so new connections are refused from then on.
pub async fn accept_loop(l: Listener) {
    let tls = &l.metrics.tls;
    let inbound_tls = (l.direction == Direction::Inbound).then(|| InboundTls {
        plain: tls.connections(
            Direction::Inbound,
            if l.mesh.is_some() {
                TlsStatus::Plaintext
            } else {
                TlsStatus::NoIdentity
            },
            "",
        ),
        passthrough: tls.connections(Direction::Inbound, TlsStatus::Passthrough, ""),
    });
    let outbound_plain = tls.connections(Direction::Outbound, TlsStatus::NotMeshed, "");
    let shared = Arc::new(ConnShared {
        inbound_tls,
        outbound_plain,
        mesh: l.mesh,
        authz: l.authz,
        direction: l.direction,
        local: l.local,
        orig_dst: l.orig_dst,
        tcp: l.metrics.tcp(l.direction),
        config: l.config,
        metrics: l.metrics,
        clients: l.clients,
        router: l.router,
        observe: l.observe,
        drain: l.drain.clone(),
    });
    loop {
        tokio::select! {
            _ = l.drain.cancelled() => break,
            r = l.listener.accept() => match r {
                Ok((stream, peer)) => {
                    let peer = orig_dst::canonical(peer);
                    let s = shared.clone();
                    let span = tracing::debug_span!("conn", direction = %s.direction, %peer);
                    l.tracker.spawn(handle(s, stream, peer).instrument(span));
                }
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(direction = %l.direction, error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            }
        }
    }
    tracing::debug!(direction = %l.direction, "listener closed");
}

async fn handle(s: Arc<ConnShared>, mut stream: TcpStream, peer: SocketAddr) {
    let _open = s.tcp.open_guard();
    let _ = stream.set_nodelay(true);
    let target = match s.orig_dst.orig_dst(&stream) {
        Ok(t) => t,
        Err(e) => {
            s.metrics.error(s.direction, "no-original-destination");
            tracing::warn!(%peer, error = %e, "cannot read the original destination; closing (is the iptables redirect installed?)");
            return;
        }
    };
    if target == s.local || (target.port() == s.local.port() && target.ip().is_loopback()) {
        s.metrics.error(s.direction, "loop-detected");
        tracing::warn!(%peer, %target, "connection addressed to the proxy itself; closing to avoid a loop");
        tcp::reset(&stream);
        return;
    }
    // Inbound: the port's policy (a port new to the proxy waits for the controller's first
    // answer, up to the discovery timeout).
    let policy = match &s.authz {
        Some(a) => Some(a.policy(target.port()).await),
        None => None,
    };
    // A Server's `opaque` protocol does not skip detection here: a meshed client still sends
    // mTLS unless the port is opaque on the pod (what `opaque_ports` says), and detection
    // finds opaque TCP by itself.
    if s.config.opaque_ports.contains(target.port()) {
        s.metrics.detected(s.direction, "skipped");
        s.count_plain();
        if !s.admit(policy.as_ref(), None, peer, target) {
            tcp::reset(&stream);
            return;
        }
        forward_tcp(&s, stream, Bytes::new(), target).await;
        return;
    }
    let mut buf = BytesMut::with_capacity(1024);
    let detection = match detect::detect(&mut stream, &mut buf, s.config.detect_timeout).await {
        Ok(d) => d,
        Err(e) => {
            tracing::debug!(error = %e, "client failed during detection");
            return;
        }
    };
    s.metrics.detected(s.direction, detection.label());
    tracing::debug!(%target, protocol = detection.label(), "detected");
    if let Detection::Protocol(Protocol::Tls { sni }) = &detection {
        if let Some(tls) = &s.inbound_tls {
            match (&s.mesh, sni) {
                (Some(mesh), Some(sni)) if mesh.terminates(sni) => {
                    let io = PrefixedIo::new(buf.freeze(), stream);
                    return terminate(&s, mesh, io, peer, target, policy).await;
                }
                _ => {
                    tls.passthrough.inc();
                }
            }
        }
    } else {
        s.count_plain();
    }
    match detection {
        Detection::Protocol(Protocol::Http1) => {
            let deadline = tokio::time::Instant::now() + s.config.header_read_timeout;
            if let Err(e) =
                head::read_first_head(&mut stream, &mut buf, s.config.max_header_bytes, deadline)
                    .await
            {
                let cause = match e {
                    head::HeadError::TooLarge { .. } | head::HeadError::TooManyHeaders => {
                        Cause::HeaderTooLarge
                    }
                    head::HeadError::Timeout => Cause::HeaderTimeout,
                    head::HeadError::Malformed(_) => Cause::BadRequest,
                    head::HeadError::Closed | head::HeadError::Io(_) => return,
                };
                s.metrics.error(s.direction, cause.as_str());
                tracing::info!(%peer, cause = cause.as_str(), error = %e, "refused request head");
                let _ = stream.write_all(&cause.raw_http1(&e.to_string())).await;
                let _ = stream.shutdown().await;
                return;
            }
            let io = PrefixedIo::new(buf.freeze(), stream);
            serve_http(&s, io, peer, target, false, None, policy).await;
        }
        Detection::Protocol(Protocol::Http2) => {
            let io = PrefixedIo::new(buf.freeze(), stream);
            serve_http(&s, io, peer, target, true, None, policy).await
        }
        Detection::Protocol(Protocol::Tls { .. } | Protocol::Opaque)
        | Detection::Timeout
        | Detection::Eof => {
            if !s.admit(policy.as_ref(), None, peer, target) {
                tcp::reset(&stream);
                return;
            }
            forward_tcp(&s, stream, buf.freeze(), target).await
        }
    }
}

impl ConnShared {
    /// Counts an inbound plaintext connection.
    fn count_plain(&self) {
        if let Some(tls) = &self.inbound_tls {
            tls.plain.inc();
        }
    }

    /// Inbound connections relayed as opaque TCP: decided once, now (counted, and denials
    /// logged once per server and client). `false`: the caller resets the client.
    fn admit(
        &self,
        policy: Option<&PolicyRx>,
        client_id: Option<Arc<str>>,
        peer: SocketAddr,
        target: SocketAddr,
    ) -> bool {
        let (Some(authz), Some(policy)) = (&self.authz, policy) else {
            return true;
        };
        let conn = authz.conn(policy.clone(), client_id, peer.ip());
        let (allowed, detail) = conn.decide_connection();
        if !allowed {
            self.metrics
                .error(self.direction, Cause::Unauthorized.as_str());
            tracing::debug!(%peer, %target, detail = detail.as_deref().unwrap_or(""), "inbound connection refused by authorization policy; resetting");
        }
        allowed
    }
}

/// Terminates mesh TLS from a peer proxy and serves what it carries, with the client's
/// identity attached. A failed handshake closes the connection (counted by reason).
async fn terminate(
    s: &ConnShared,
    mesh: &Mesh,
    io: PrefixedIo<TcpStream>,
    peer: SocketAddr,
    target: SocketAddr,
    policy: Option<PolicyRx>,
) {
    let (tls, accepted) = match mesh.accept(io).await {
        Ok(t) => t,
        Err(e) => {
            tracing::info!(%peer, error = %e, "mesh TLS refused");
            return;
        }
    };
    tracing::debug!(%peer, client_id = %accepted.client_id, alpn = ?accepted.alpn, "mesh TLS terminated");
    let client_id = Some(accepted.client_id);
    match accepted.alpn {
        // Frames written in one turn of the runtime leave in one TLS record and one write.
        Alpn::H2 => serve_http(s, Coalesce::new(tls), peer, target, true, client_id, policy).await,
        Alpn::Http1 => serve_http(s, tls, peer, target, false, client_id, policy).await,
        Alpn::Opaque => {
            if !s.admit(policy.as_ref(), client_id, peer, target) {
                tcp::reset(tcp::Stream::tcp(&tls));
                return;
            }
            forward_tcp(s, tls, Bytes::new(), target).await
        }
    }
}

/// Serves HTTP on `io`; `client_id`: the peer proxy's verified identity (inbound mTLS);
/// `policy`: inbound, the port's authorization policy, applied per request.
async fn serve_http<I>(
    s: &ConnShared,
    io: I,
    peer: SocketAddr,
    target: SocketAddr,
    h2: bool,
    client_id: Option<Arc<str>>,
    policy: Option<PolicyRx>,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let ctx = Arc::new(ConnCtx {
        direction: s.direction,
        peer,
        target,
        h2,
        metrics: s.metrics.clone(),
        client: s.clients.get(target, h2),
        // A peer proxy carries HTTP/1 clients' requests over HTTP/2.
        h1_client: (h2 && client_id.is_some()).then(|| s.clients.get(target, false)),
        mesh: client_id.as_ref().and(s.mesh.clone()),
        authz: s
            .authz
            .as_ref()
            .zip(policy)
            .map(|(a, p)| a.conn(p, client_id.clone(), peer.ip())),
        client_id,
        router: s.router.clone(),
        limits: Limits {
            max_header_bytes: s.config.max_header_bytes,
            header_read_timeout: s.config.header_read_timeout,
        },
        last_authority: Default::default(),
        destination: Default::default(),
        observe: s.observe.clone(),
    });
    let io = CountingIo::new(io, s.tcp.read.clone(), s.tcp.write.clone());
    if h2 {
        http::serve_http2(io, ctx, s.drain.clone()).await
    } else {
        http::serve_http1(io, ctx, s.drain.clone()).await
    }
}

/// What an opaque connection is sent to.
enum TcpRoute {
    /// The original destination.
    Forward,
    /// An endpoint discovery chose, with its connection counted until dropped; mTLS when the
    /// endpoint is meshed.
    Balanced(Box<dyn Stream>, InFlight),
    /// Failed: the cause is counted and the client reset.
    Failed(Cause),
}

/// Routes an opaque connection by its original destination `ip:port` (a ClusterIP resolves
/// to its service's endpoints): one endpoint per connection, p2c over open connections, one
/// retry on another endpoint when the connect fails.
async fn route_tcp(s: &ConnShared, router: &Router, target: SocketAddr) -> TcpRoute {
    let Some(b) = router.balancer(&target.to_string(), balance::Protocol::Tcp) else {
        return TcpRoute::Forward;
    };
    let mut pick = b.pick_ready().await;
    let mut exclude = None;
    for _ in 0..2 {
        let f = match pick {
            Pick::Endpoint(f) => f,
            Pick::NoEndpoints if exclude.is_none() => return TcpRoute::Failed(Cause::NoEndpoints),
            Pick::NoEndpoints => break,
            Pick::Pending => {
                b.passthrough();
                return TcpRoute::Forward;
            }
            Pick::Forward => return TcpRoute::Forward,
            // TCP picks set no concurrency limit.
            Pick::Overloaded => return TcpRoute::Failed(Cause::Overloaded),
        };
        let addr = f.member().addr;
        match connect_member(s, f.member()).await {
            Ok(stream) => return TcpRoute::Balanced(stream, f),
            Err(cause) => {
                b.attempt_failed(f.member());
                if exclude.is_some() {
                    return TcpRoute::Failed(cause);
                }
                exclude = Some(addr);
                pick = b.pick(exclude);
            }
        }
    }
    TcpRoute::Failed(Cause::ConnectError)
}

/// Connects to a balanced endpoint: opaque mTLS when it is meshed (never dialled without a
/// valid local certificate), else plain TCP.
async fn connect_member(s: &ConnShared, m: &balance::Member) -> Result<Box<dyn Stream>, Cause> {
    let addr = m.addr;
    if let Some(t) = &m.mesh {
        if let Err(e) = t.check_certificate() {
            tracing::info!(endpoint = %addr, error = %e, "not connecting to a meshed endpoint");
            return Err(Cause::IdentityUnavailable);
        }
    }
    let tcp = tcp::connect(addr, s.config.connect_timeout)
        .await
        .map_err(|e| {
            tracing::info!(endpoint = %addr, error = %e, "tcp connect to endpoint failed");
            Cause::of_connect(&e)
        })?;
    match &m.mesh {
        None => {
            m.plain_connection();
            Ok(Box::new(tcp))
        }
        Some(t) => match t.connect(tcp, Alpn::Opaque).await {
            Ok(tls) => Ok(Box::new(tls)),
            Err(e) => {
                tracing::info!(endpoint = %addr, error = %e, "mTLS to endpoint failed");
                Err(Cause::TlsHandshake)
            }
        },
    }
}

async fn forward_tcp<C: Stream>(s: &ConnShared, client: C, prefix: Bytes, target: SocketAddr) {
    if let Some(router) = &s.router {
        match route_tcp(s, router, target).await {
            TcpRoute::Forward => {}
            TcpRoute::Balanced(server, in_flight) => {
                relay(s, client, prefix, server).await;
                drop(in_flight);
                return;
            }
            TcpRoute::Failed(cause) => {
                s.metrics.error(s.direction, cause.as_str());
                tracing::info!(%target, cause = cause.as_str(), "no endpoint reachable; resetting client");
                tcp::reset(client.tcp());
                return;
            }
        }
    }
    let server = match tcp::connect(target, s.config.connect_timeout).await {
        Ok(server) => server,
        Err(e) => {
            let cause = Cause::of_connect(&e);
            s.metrics.error(s.direction, cause.as_str());
            tracing::info!(%target, cause = cause.as_str(), error = %e, "tcp connect failed; resetting client");
            tcp::reset(client.tcp());
            return;
        }
    };
    if s.direction == Direction::Outbound {
        s.outbound_plain.inc();
    }
    relay(s, client, prefix, server).await;
}

/// Relays bytes between `client` and `server` (connected by [`tcp::connect`], so already
/// TCP_NODELAY).
async fn relay<C: Stream, S: Stream>(s: &ConnShared, client: C, prefix: Bytes, server: S) {
    let counters = ByteCounters {
        read: s.tcp.read.clone(),
        write: s.tcp.write.clone(),
    };
    s.tcp.read.inc_by(prefix.len() as u64);
    let outcome = tcp::forward(client, prefix, server, &counters).await;
    tracing::debug!(?outcome, "tcp forward done");
}

//! The mesh TLS context of the data path: originating mTLS to meshed endpoints and terminating
//! it for this workload.
//!
//! [`Mesh`] holds the rustls configs built by [`super::tls`] from the identity client's
//! certificate watch and the trust anchors, and rebuilds them whenever the anchors are reloaded
//! (the configs read the certificate at every handshake themselves). Connections already
//! established keep the configuration they were verified with.
//!
//! - Outbound, a [`MeshTarget`] is one endpoint's expected identity: [`MeshTarget::connect`]
//!   refuses to start without a valid local certificate (fail closed), handshakes TLS 1.3 with
//!   the identity encoded in the SNI, checks the negotiated ALPN and counts the connection
//!   (`weft_tls_connections_total{tls="true",peer_id=…}`) or the failure
//!   (`weft_tls_handshake_errors_total{reason=…}`).
//! - Inbound, [`Mesh::accept`] terminates a ClientHello whose SNI is a mesh server name in this
//!   trust domain ([`Mesh::terminates`]; normally this workload's own):
//!   the client must present a certificate chaining to the anchors and naming one SPIFFE ID,
//!   which becomes the connection's `client_id`. The negotiated ALPN says what the peer proxy
//!   carries: `h2` (HTTP, multiplexed), `http/1.1` (HTTP/1 upgrades such as WebSocket) or
//!   nothing (opaque TCP).

use std::io;
use std::sync::{Arc, RwLock, Weak};
use std::time::{Duration, SystemTime};

use prometheus_client::metrics::counter::Counter;
use rustls::{CertificateError, ClientConfig, ServerConfig};
use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio_rustls::{client, server, TlsAcceptor, TlsConnector};

use super::tls::{self, TlsError, ALPN_H2, ALPN_HTTP1};
use crate::identity::{CertState, TrustAnchors};
use crate::metrics::{Direction, TlsMetrics, TlsStatus};

/// How long a mesh TLS handshake may take, either way.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// What a mesh connection carries, as negotiated by ALPN.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Alpn {
    /// HTTP/2: all HTTP between proxies, HTTP/1.1 apps' requests included.
    H2,
    /// HTTP/1.1: requests that upgrade the connection (WebSocket), which HTTP/2 cannot carry.
    Http1,
    /// No ALPN: opaque TCP.
    Opaque,
}

impl Alpn {
    fn of(negotiated: Option<&[u8]>) -> Option<Self> {
        match negotiated {
            Some(ALPN_H2) => Some(Alpn::H2),
            Some(ALPN_HTTP1) => Some(Alpn::Http1),
            None => Some(Alpn::Opaque),
            Some(_) => None,
        }
    }
}

/// Why an outbound mesh connection could not be made. The request never reached the peer's
/// application, so it may be retried elsewhere.
#[derive(Debug, thiserror::Error)]
pub enum ConnectTlsError {
    #[error("no valid workload certificate to originate mTLS with: {0}")]
    NoCertificate(String),
    #[error("mTLS handshake with {id} timed out after {timeout:?}", timeout = HANDSHAKE_TIMEOUT)]
    Timeout { id: Arc<str> },
    #[error("mTLS handshake with {id} failed ({reason}): {source}")]
    Handshake {
        id: Arc<str>,
        reason: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("peer {id} negotiated ALPN {got:?}, expected {expected:?}")]
    Alpn {
        id: Arc<str>,
        expected: Alpn,
        got: Option<String>,
    },
}

/// Why an inbound mesh handshake failed (the connection is closed).
#[derive(Debug, thiserror::Error)]
pub enum AcceptTlsError {
    #[error("no valid workload certificate to terminate mTLS with: {0}")]
    NoCertificate(String),
    #[error("mTLS handshake timed out after {timeout:?}", timeout = HANDSHAKE_TIMEOUT)]
    Timeout,
    #[error("mTLS handshake failed ({reason}): {source}")]
    Handshake {
        reason: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("client certificate refused: {0}")]
    PeerId(#[from] tls::PeerIdError),
    #[error("client negotiated unknown ALPN {0:?}")]
    Alpn(String),
}

/// A terminated inbound mesh connection's peer.
#[derive(Clone, Debug)]
pub struct Accepted {
    pub client_id: Arc<str>,
    pub alpn: Alpn,
}

struct Configs {
    server: Arc<ServerConfig>,
    h2: Arc<ClientConfig>,
    http1: Arc<ClientConfig>,
    opaque: Arc<ClientConfig>,
}

impl Configs {
    fn build(cert: &watch::Receiver<CertState>, anchors: &TrustAnchors) -> Result<Self, TlsError> {
        let server = tls::server_config(cert.clone(), anchors)?;
        let h2 = tls::client_config(cert.clone(), anchors)?;
        let mut http1 = h2.clone();
        http1.alpn_protocols = vec![ALPN_HTTP1.to_vec()];
        let mut opaque = h2.clone();
        opaque.alpn_protocols = Vec::new();
        Ok(Self {
            server: Arc::new(server),
            h2: Arc::new(h2),
            http1: Arc::new(http1),
            opaque: Arc::new(opaque),
        })
    }
}

/// This proxy's mesh TLS: its identity, certificate and the configs built on the anchors.
pub struct Mesh {
    local_id: Arc<str>,
    /// The SNI naming this workload (`<sa>.<ns>.serviceaccount.identity.<trust-domain>`).
    local_name: String,
    /// `.serviceaccount.identity.<trust-domain>`: the suffix of every mesh server name here.
    mesh_suffix: String,
    cert: watch::Receiver<CertState>,
    configs: RwLock<Arc<Configs>>,
    metrics: TlsMetrics,
}

impl std::fmt::Debug for Mesh {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mesh")
            .field("local_id", &self.local_id)
            .finish_non_exhaustive()
    }
}

impl Mesh {
    /// Builds the configs from the current anchors and follows later anchor changes (the
    /// follower task ends when the mesh is dropped). Must run inside a tokio runtime.
    pub fn new(
        local_id: &str,
        cert: watch::Receiver<CertState>,
        mut anchors: watch::Receiver<Arc<TrustAnchors>>,
        metrics: TlsMetrics,
    ) -> Result<Arc<Self>, TlsError> {
        let local_name = tls::server_name(local_id)?.to_str().into_owned();
        let mesh_suffix = local_name
            .find(tls::MARKER)
            .map(|i| local_name[i..].to_string())
            .unwrap_or_default();
        let current = anchors.borrow_and_update().clone();
        let configs = Configs::build(&cert, &current)?;
        let mesh = Arc::new(Self {
            local_id: Arc::from(local_id),
            local_name,
            mesh_suffix,
            cert,
            configs: RwLock::new(Arc::new(configs)),
            metrics,
        });
        let weak = Arc::downgrade(&mesh);
        tokio::spawn(follow_anchors(weak, anchors));
        Ok(mesh)
    }

    pub fn local_id(&self) -> &Arc<str> {
        &self.local_id
    }

    /// Whether a ClientHello's SNI names this workload.
    pub fn is_local_name(&self, sni: &str) -> bool {
        sni.eq_ignore_ascii_case(&self.local_name)
    }

    /// Whether the proxy terminates a ClientHello with this SNI: its own identity's name, or
    /// any other mesh server name of its trust domain. The latter is a peer proxy that expects
    /// another workload at this address (a stale endpoint whose IP was reused): answering with
    /// this proxy's certificate lets that peer refuse with a precise wrong-identity error,
    /// where relaying its TLS to the application would only produce garbage. Applications'
    /// own TLS never uses these names, so it still passes through.
    pub fn terminates(&self, sni: &str) -> bool {
        if self.is_local_name(sni) {
            return true;
        }
        let sni = sni.to_ascii_lowercase();
        !self.mesh_suffix.is_empty()
            && sni.ends_with(&self.mesh_suffix)
            && tls::identity_from_server_name(&sni).is_some()
    }

    /// Why this proxy cannot do mTLS right now (no certificate yet, or it expired).
    pub fn certificate_problem(&self) -> Option<String> {
        self.cert.borrow().readiness(SystemTime::now()).err()
    }

    fn configs(&self) -> Arc<Configs> {
        match self.configs.read() {
            Ok(c) => c.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    pub fn metrics(&self) -> &TlsMetrics {
        &self.metrics
    }

    /// The outbound target for an endpoint expected to present `id`.
    pub fn target(self: &Arc<Self>, id: &str) -> Result<MeshTarget, TlsError> {
        let name = tls::server_name(id)?;
        Ok(MeshTarget {
            established: self
                .metrics
                .connections(Direction::Outbound, TlsStatus::Mtls, id),
            mesh: self.clone(),
            id: Arc::from(id),
            name,
        })
    }

    /// Terminates mesh TLS on `io` (whose ClientHello named [`Mesh::is_local_name`]).
    pub async fn accept<I>(&self, io: I) -> Result<(server::TlsStream<I>, Accepted), AcceptTlsError>
    where
        I: AsyncRead + AsyncWrite + Unpin,
    {
        let fail = |reason| self.metrics.handshake_error(Direction::Inbound, reason);
        if let Some(why) = self.certificate_problem() {
            fail("no-local-certificate");
            return Err(AcceptTlsError::NoCertificate(why));
        }
        let acceptor = TlsAcceptor::from(self.configs().server.clone());
        let stream = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(io)).await {
            Err(_) => {
                fail("timeout");
                return Err(AcceptTlsError::Timeout);
            }
            Ok(Err(source)) => {
                let reason = handshake_reason(&source);
                fail(reason);
                return Err(AcceptTlsError::Handshake { reason, source });
            }
            Ok(Ok(s)) => s,
        };
        let conn = stream.get_ref().1;
        let client_id: Arc<str> = match tls::peer_identity(conn) {
            Ok(id) => id.into(),
            Err(e) => {
                fail("bad-identity");
                return Err(e.into());
            }
        };
        let Some(alpn) = Alpn::of(conn.alpn_protocol()) else {
            fail("protocol");
            let got = String::from_utf8_lossy(conn.alpn_protocol().unwrap_or_default());
            return Err(AcceptTlsError::Alpn(got.into_owned()));
        };
        self.metrics
            .connections(Direction::Inbound, TlsStatus::Mtls, &client_id)
            .inc();
        Ok((stream, Accepted { client_id, alpn }))
    }
}

/// Rebuilds the configs whenever the trust anchors change.
async fn follow_anchors(mesh: Weak<Mesh>, mut anchors: watch::Receiver<Arc<TrustAnchors>>) {
    while anchors.changed().await.is_ok() {
        let current = anchors.borrow_and_update().clone();
        let Some(mesh) = mesh.upgrade() else { return };
        match Configs::build(&mesh.cert, &current) {
            Ok(c) => {
                *mesh.configs.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(c);
                tracing::info!(
                    anchors = current.len(),
                    "mesh TLS now verifies peers against the reloaded trust anchors"
                );
            }
            Err(e) => {
                tracing::error!(error = %e, "reloaded trust anchors are unusable for TLS; keeping the previous ones")
            }
        }
    }
}

/// One meshed endpoint's expected identity, for outbound connections.
#[derive(Clone)]
pub struct MeshTarget {
    mesh: Arc<Mesh>,
    pub id: Arc<str>,
    name: ServerName<'static>,
    established: Counter,
}

impl std::fmt::Debug for MeshTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MeshTarget").field("id", &self.id).finish()
    }
}

impl MeshTarget {
    /// Fails at once (before dialling) when this proxy holds no valid certificate; counted
    /// as a failed handshake.
    pub fn check_certificate(&self) -> Result<(), ConnectTlsError> {
        self.certificate_valid().inspect_err(|_| {
            self.mesh
                .metrics
                .handshake_error(Direction::Outbound, "no-local-certificate")
        })
    }

    /// Whether this proxy may use its identity now (checked per request on established
    /// connections, so they stop carrying traffic once the certificate expires).
    pub fn certificate_valid(&self) -> Result<(), ConnectTlsError> {
        match self.mesh.certificate_problem() {
            None => Ok(()),
            Some(why) => Err(ConnectTlsError::NoCertificate(why)),
        }
    }

    /// Counts a failed handshake with this peer detected after TLS itself (a TLS 1.3 client
    /// learns that the server refused its certificate only from the next read).
    pub fn handshake_failed(&self, direction: Direction, reason: &'static str) {
        self.mesh.metrics.handshake_error(direction, reason);
    }

    /// Originates mTLS on `tcp`, requiring the peer to present exactly [`MeshTarget::id`] and
    /// to agree on `alpn`. Call [`MeshTarget::check_certificate`] before dialling.
    pub async fn connect(
        &self,
        tcp: TcpStream,
        alpn: Alpn,
    ) -> Result<client::TlsStream<TcpStream>, ConnectTlsError> {
        let fail = |reason| {
            self.mesh
                .metrics
                .handshake_error(Direction::Outbound, reason)
        };
        let configs = self.mesh.configs();
        let config = match alpn {
            Alpn::H2 => &configs.h2,
            Alpn::Http1 => &configs.http1,
            Alpn::Opaque => &configs.opaque,
        };
        let connector = TlsConnector::from(config.clone());
        let stream = match tokio::time::timeout(
            HANDSHAKE_TIMEOUT,
            connector.connect(self.name.clone(), tcp),
        )
        .await
        {
            Err(_) => {
                fail("timeout");
                return Err(ConnectTlsError::Timeout {
                    id: self.id.clone(),
                });
            }
            Ok(Err(source)) => {
                let reason = handshake_reason(&source);
                fail(reason);
                return Err(ConnectTlsError::Handshake {
                    id: self.id.clone(),
                    reason,
                    source,
                });
            }
            Ok(Ok(s)) => s,
        };
        let negotiated = stream.get_ref().1.alpn_protocol();
        if Alpn::of(negotiated) != Some(alpn) {
            fail("protocol");
            return Err(ConnectTlsError::Alpn {
                id: self.id.clone(),
                expected: alpn,
                got: negotiated.map(|p| String::from_utf8_lossy(p).into_owned()),
            });
        }
        self.established.inc();
        Ok(stream)
    }
}

/// The `reason` label of a failed handshake.
pub fn handshake_reason(e: &io::Error) -> &'static str {
    let Some(tls) = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) else {
        return "protocol";
    };
    match tls {
        rustls::Error::InvalidCertificate(c) => match c {
            CertificateError::NotValidForName
            | CertificateError::NotValidForNameContext { .. }
            // Our verifier's "no single SPIFFE ID" / "SNI is not an identity".
            | CertificateError::Other(_) => "wrong-identity",
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => "expired",
            _ => "untrusted",
        },
        rustls::Error::NoCertificatesPresented => "no-client-certificate",
        rustls::Error::AlertReceived(_) => "peer-refused",
        _ => "protocol",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn mesh(id: &str) -> Arc<Mesh> {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut p = rcgen::CertificateParams::default();
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let root = p.self_signed(&key).unwrap().pem();
        let anchors = TrustAnchors::from_pem(Path::new("a.pem"), root.as_bytes()).unwrap();
        let (_, anchors) = watch::channel(Arc::new(anchors));
        let (_, cert) = watch::channel(CertState::Pending {
            reason: "not yet".into(),
        });
        Mesh::new(id, cert, anchors, TlsMetrics::default()).unwrap()
    }

    #[tokio::test]
    async fn terminates_mesh_names_of_its_trust_domain_only() {
        let m = mesh("spiffe://cluster.local/ns/books/sa/web");
        assert!(m.is_local_name("web.books.serviceaccount.identity.cluster.local"));
        assert!(m.terminates("WEB.books.serviceaccount.identity.cluster.local"));
        // Another workload's name: terminated, so the peer sees the wrong identity.
        assert!(m.terminates("db.books.serviceaccount.identity.cluster.local"));
        assert!(!m.is_local_name("db.books.serviceaccount.identity.cluster.local"));
        // Other trust domains and applications' own names pass through.
        assert!(!m.terminates("web.books.serviceaccount.identity.other.org"));
        assert!(!m.terminates("books.example.com"));
        assert!(!m.terminates("serviceaccount.identity.cluster.local"));
    }

    #[tokio::test]
    async fn without_a_certificate_nothing_is_dialled_or_accepted() {
        let m = mesh("spiffe://cluster.local/ns/books/sa/web");
        let t = m.target("spiffe://cluster.local/ns/books/sa/db").unwrap();
        assert!(matches!(
            t.check_certificate(),
            Err(ConnectTlsError::NoCertificate(why)) if why.contains("not yet")
        ));
        let (a, _b) = tokio::io::duplex(64);
        assert!(matches!(
            m.accept(a).await,
            Err(AcceptTlsError::NoCertificate(_))
        ));
        let errors = |direction| {
            m.metrics()
                .handshake_errors
                .get_or_create(&crate::metrics::HandshakeErrorLabels {
                    direction,
                    reason: "no-local-certificate",
                })
                .get()
        };
        assert_eq!(errors(Direction::Outbound), 1);
        assert_eq!(errors(Direction::Inbound), 1);
        assert!(m.target("not a spiffe id").is_err());
    }

    #[test]
    fn handshake_failures_are_classified() {
        let tls = |e: rustls::Error| io::Error::new(io::ErrorKind::InvalidData, e);
        let cert = |c| tls(rustls::Error::InvalidCertificate(c));
        assert_eq!(
            handshake_reason(&cert(CertificateError::NotValidForName)),
            "wrong-identity"
        );
        assert_eq!(
            handshake_reason(&cert(CertificateError::Expired)),
            "expired"
        );
        assert_eq!(
            handshake_reason(&cert(CertificateError::UnknownIssuer)),
            "untrusted"
        );
        assert_eq!(
            handshake_reason(&tls(rustls::Error::NoCertificatesPresented)),
            "no-client-certificate"
        );
        assert_eq!(
            handshake_reason(&tls(rustls::Error::AlertReceived(
                rustls::AlertDescription::BadCertificate
            ))),
            "peer-refused"
        );
        assert_eq!(
            handshake_reason(&io::Error::from(io::ErrorKind::UnexpectedEof)),
            "protocol"
        );
    }
}

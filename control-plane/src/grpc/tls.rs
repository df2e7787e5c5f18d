//! TLS on the controller's gRPC ports, so that no one can impersonate the control plane and
//! no token crosses the network in the clear.
//!
//! The controller issues its own server certificates from the identity issuer (the same one
//! that signs workload certificates), so proxies verify them against the trust anchors they
//! already hold. Each port has its own identity, written in the mesh's server-name scheme
//! (`<sa>.<ns>.serviceaccount.identity.<trust-domain>` stands for
//! `spiffe://<trust-domain>/ns/<ns>/sa/<sa>`, see the proxy's `transport::tls`):
//!
//! | port | certificate (URI SAN) | server name the proxy verifies |
//! |---|---|---|
//! | identity (8080) | `spiffe://<td>/ns/<controller-ns>/sa/identity` | `identity.<controller-ns>.serviceaccount.identity.<td>` |
//! | destination + policy (8086) | `spiffe://<td>/ns/<controller-ns>/sa/destination` | `destination.<controller-ns>.serviceaccount.identity.<td>` |
//!
//! The identity port asks for no client certificate (a proxy has none before Certify); the
//! proxy authenticates with its token, which travels only inside TLS. The destination port
//! requires a client certificate chaining to the trust anchors (a workload certificate); its
//! SPIFFE ID reaches the handlers as a [`CallerIdentity`] request extension
//! ([`caller_interceptor`]), which `Policy.ServerPolicy` checks against the requested pod.
//!
//! Certificates are issued in memory (a P-256 key made at start, never written), re-issued at
//! 70 % of their lifetime, and whenever the issuer files are reloaded; the client-certificate
//! verifier follows reloaded trust anchors the same way. Both are checked at each accepted
//! connection ([`ServerTls::config`]), so nothing needs a timer.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use futures_util::Stream;
use rcgen::{KeyPair, PKCS_ECDSA_P256_SHA256};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::{CertifiedKey, SigningKey};
use rustls::{RootCertStore, ServerConfig};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tonic::transport::server::Connected;
use tonic::{Request, Status};
use x509_parser::prelude::{FromDer, GeneralName, ParsedExtension, X509Certificate};

use super::policy::CallerIdentity;
use crate::identity::ca::{CertificateAuthority, FileCa, Issuer, LeafRequest};
use crate::identity::{ServiceAccount, SpiffeId};

/// The ServiceAccount name in the identity port's certificate.
pub const IDENTITY_NAME: &str = "identity";
/// The ServiceAccount name in the destination port's certificate.
pub const DESTINATION_NAME: &str = "destination";
/// How long a TLS handshake may take before the connection is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Lifetime of the controller's own certificates (re-issued at 70 %).
const LIFETIME: Duration = Duration::from_secs(24 * 3600);
/// Handshakes in progress at once per port; further connections wait in the backlog.
const MAX_HANDSHAKES: usize = 1024;

/// Why TLS cannot be set up (at start) or a certificate not issued.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot create the controller's TLS key: {0}")]
    Key(String),
    #[error("cannot issue the controller's certificate for {id}: {reason}")]
    Issue { id: String, reason: String },
    #[error("trust anchor #{index} cannot be used to verify clients: {reason}")]
    Anchor { index: usize, reason: String },
    #[error("cannot build the TLS config: {0}")]
    Config(String),
}

/// Which side of the control plane a port serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Port {
    /// Server TLS only: proxies have no certificate yet.
    Identity,
    /// Mutual TLS: the client's workload certificate is required.
    Destination,
}

/// The TLS settings of one port: its identity, key and the current config.
pub struct ServerTls {
    ca: Arc<FileCa>,
    port: Port,
    id: SpiffeId,
    key: Arc<dyn SigningKey>,
    spki: Vec<u8>,
    current: Mutex<Option<Current>>,
}

struct Current {
    issuer: Arc<Issuer>,
    renew_at: SystemTime,
    config: Arc<ServerConfig>,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls")
            .field("id", &self.id.to_string())
            .field("port", &self.port)
            .finish_non_exhaustive()
    }
}

/// `spiffe://<td>/ns/<namespace>/sa/<name>`: the controller's identity on `port`.
pub fn server_identity(trust_domain: &str, namespace: &str, port: Port) -> SpiffeId {
    let name = match port {
        Port::Identity => IDENTITY_NAME,
        Port::Destination => DESTINATION_NAME,
    };
    SpiffeId::new(trust_domain, ServiceAccount::new(namespace, name))
}

impl ServerTls {
    /// Makes the key and issues the first certificate, so a broken issuer fails start-up.
    pub fn new(
        ca: Arc<FileCa>,
        port: Port,
        trust_domain: &str,
        namespace: &str,
    ) -> Result<Arc<Self>, TlsError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)
            .map_err(|e| TlsError::Key(e.to_string()))?;
        let spki = rcgen::PublicKeyData::subject_public_key_info(&key);
        let pkcs8 = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let key = rustls::crypto::ring::sign::any_ecdsa_type(&pkcs8)
            .map_err(|e| TlsError::Key(e.to_string()))?;
        let tls = Arc::new(Self {
            ca,
            port,
            id: server_identity(trust_domain, namespace, port),
            key,
            spki,
            current: Mutex::new(None),
        });
        tls.config()?;
        Ok(tls)
    }

    /// The SPIFFE ID this port presents.
    pub fn identity(&self) -> String {
        self.id.to_string()
    }

    /// The config for the next handshake: re-issued when the issuer changed or the
    /// certificate reached 70 % of its lifetime.
    pub fn config(&self) -> Result<Arc<ServerConfig>, TlsError> {
        let issuer = self.ca.current();
        let now = SystemTime::now();
        let mut current = self.current.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = current.as_ref() {
            if Arc::ptr_eq(&c.issuer, &issuer) && now < c.renew_at {
                return Ok(c.config.clone());
            }
        }
        let fresh = self.build(&issuer, now)?;
        let config = fresh.config.clone();
        *current = Some(fresh);
        Ok(config)
    }

    fn build(&self, issuer: &Arc<Issuer>, now: SystemTime) -> Result<Current, TlsError> {
        let issued = issuer
            .issue(&LeafRequest {
                identity: &self.id,
                spki_der: &self.spki,
                lifetime: LIFETIME,
                now,
            })
            .map_err(|e| TlsError::Issue {
                id: self.id.to_string(),
                reason: e.to_string(),
            })?;
        let lifetime = issued
            .not_after
            .duration_since(issued.not_before)
            .unwrap_or_default();
        let renew_at = issued.not_before + lifetime.mul_f64(0.7);
        let chain: Vec<CertificateDer<'static>> = std::iter::once(issued.leaf_der)
            .chain(issued.intermediates_der)
            .map(CertificateDer::from)
            .collect();
        let cert = Arc::new(CertifiedKey::new(chain, self.key.clone()));
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| TlsError::Config(e.to_string()))?;
        let builder = match self.port {
            Port::Identity => builder.with_no_client_auth(),
            Port::Destination => {
                let mut roots = RootCertStore::empty();
                for (i, der) in issuer.trust_anchors().iter().enumerate() {
                    roots
                        .add(CertificateDer::from(der.clone()))
                        .map_err(|e| TlsError::Anchor {
                            index: i + 1,
                            reason: e.to_string(),
                        })?;
                }
                let verifier =
                    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                        .build()
                        .map_err(|e| TlsError::Config(e.to_string()))?;
                builder.with_client_cert_verifier(verifier)
            }
        };
        let mut config = builder.with_cert_resolver(Arc::new(Fixed(cert)));
        config.alpn_protocols = vec![b"h2".to_vec()];
        tracing::debug!(id = %self.id, port = ?self.port, "controller certificate issued");
        Ok(Current {
            issuer: issuer.clone(),
            renew_at,
            config: Arc::new(config),
        })
    }
}

/// Always the same certificate (the config is rebuilt when it changes).
#[derive(Debug)]
struct Fixed(Arc<CertifiedKey>);

impl ResolvesServerCert for Fixed {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
}

/// What a TLS connection tells the handlers (a request extension).
#[derive(Clone, Debug)]
pub struct TlsPeer {
    pub remote: Option<SocketAddr>,
    /// The SPIFFE ID of the client certificate; `None` on the identity port.
    pub id: Option<String>,
}

/// A terminated connection.
#[derive(Debug)]
pub struct TlsIo {
    inner: TlsStream<TcpStream>,
    peer: TlsPeer,
}

impl Connected for TlsIo {
    type ConnectInfo = TlsPeer;
    fn connect_info(&self) -> TlsPeer {
        self.peer.clone()
    }
}

impl AsyncRead for TlsIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// The single `spiffe://` URI SAN of a client certificate.
pub fn leaf_spiffe_id(der: &[u8]) -> Result<String, String> {
    let (_, cert) = X509Certificate::from_der(der).map_err(|e| e.to_string())?;
    let mut uris = Vec::new();
    for ext in cert.extensions() {
        if let ParsedExtension::SubjectAlternativeName(san) = ext.parsed_extension() {
            for name in &san.general_names {
                match name {
                    GeneralName::URI(u) => uris.push(u.to_string()),
                    other => return Err(format!("unexpected SAN {other:?}")),
                }
            }
        }
    }
    match uris.as_slice() {
        [one] if one.starts_with("spiffe://") => Ok(one.clone()),
        _ => Err(format!("expected one spiffe:// URI SAN, found {uris:?}")),
    }
}

/// Accepts TCP connections on `listener` and hands tonic those whose TLS handshake
/// succeeded (with `tls`'s config at that moment). Failed handshakes are logged and dropped:
/// a client without a mesh certificate never reaches a handler. The task ends when the
/// returned stream is dropped or aborted.
pub fn incoming(
    listener: TcpListener,
    tls: Arc<ServerTls>,
) -> (
    impl Stream<Item = Result<TlsIo, std::io::Error>> + Send + 'static,
    JoinHandle<()>,
) {
    let (tx, rx) = mpsc::channel::<TlsIo>(64);
    let handshakes = Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES));
    let task = tokio::spawn(async move {
        loop {
            let (tcp, remote) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    tracing::debug!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            };
            if tx.is_closed() {
                return;
            }
            let _ = tcp.set_nodelay(true);
            let Ok(permit) = handshakes.clone().acquire_owned().await else {
                return;
            };
            let (tx, tls) = (tx.clone(), tls.clone());
            tokio::spawn(async move {
                let _permit = permit;
                match handshake(tcp, remote, &tls).await {
                    Ok(io) => {
                        let _ = tx.send(io).await;
                    }
                    Err(why) => {
                        tracing::info!(%remote, port = ?tls.port, "TLS handshake refused: {why}")
                    }
                }
            });
        }
    });
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|io| (Ok(io), rx))
    });
    (stream, task)
}

async fn handshake(tcp: TcpStream, remote: SocketAddr, tls: &ServerTls) -> Result<TlsIo, String> {
    let config = tls.config().map_err(|e| e.to_string())?;
    let stream = tokio::time::timeout(HANDSHAKE_TIMEOUT, TlsAcceptor::from(config).accept(tcp))
        .await
        .map_err(|_| format!("no handshake within {HANDSHAKE_TIMEOUT:?}"))?
        .map_err(|e| e.to_string())?;
    let id = match tls.port {
        Port::Identity => None,
        Port::Destination => {
            let leaf = stream
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .ok_or("the client presented no certificate")?;
            Some(leaf_spiffe_id(leaf).map_err(|e| format!("client certificate: {e}"))?)
        }
    };
    Ok(TlsIo {
        inner: stream,
        peer: TlsPeer {
            remote: Some(remote),
            id,
        },
    })
}

/// Puts the verified client identity of a TLS connection into the request as
/// [`CallerIdentity`]. A TLS connection without one is refused `UNAUTHENTICATED` (the
/// handshake already requires a certificate; this keeps the handlers from ever running
/// without one). Plaintext connections (`--insecure-plaintext`) carry no [`TlsPeer`] and
/// pass unchanged.
#[allow(clippy::result_large_err)] // tonic's interceptor signature
pub fn caller_interceptor(mut req: Request<()>) -> Result<Request<()>, Status> {
    let Some(peer) = req.extensions().get::<TlsPeer>().cloned() else {
        return Ok(req);
    };
    match peer.id {
        Some(id) => {
            req.extensions_mut().insert(CallerIdentity(id));
            Ok(req)
        }
        None => Err(Status::unauthenticated(
            "the destination service requires a mesh client certificate (mTLS with the workload certificate)",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::ca::IssuerFiles;
    use crate::identity::devca;

    fn dev_ca(name: &str) -> (std::path::PathBuf, Arc<FileCa>) {
        let dir = std::env::temp_dir().join(format!(
            "weft-grpc-tls-{name}-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        devca::ensure(&dir).expect("dev CA");
        let ca = FileCa::load(IssuerFiles::in_dir(&dir)).expect("issuer");
        (dir, Arc::new(ca))
    }

    #[test]
    fn each_port_presents_its_own_identity_and_reuses_its_config() {
        let (dir, ca) = dev_ca("ids");
        let id = ServerTls::new(ca.clone(), Port::Identity, "cluster.local", "weft-system")
            .expect("identity TLS");
        let dest = ServerTls::new(ca, Port::Destination, "cluster.local", "weft-system")
            .expect("destination TLS");
        assert_eq!(
            id.identity(),
            "spiffe://cluster.local/ns/weft-system/sa/identity"
        );
        assert_eq!(
            dest.identity(),
            "spiffe://cluster.local/ns/weft-system/sa/destination"
        );
        // Until the issuer changes or 70 % of the lifetime passes, one config serves.
        let a = dest.config().expect("config");
        let b = dest.config().expect("config");
        assert!(Arc::ptr_eq(&a, &b));
        assert_eq!(a.alpn_protocols, vec![b"h2".to_vec()]);
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn the_leaf_names_one_spiffe_id() {
        let (dir, ca) = dev_ca("leaf");
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).expect("key");
        let id = server_identity("cluster.local", "weft", Port::Destination);
        let issued = ca
            .issue(&LeafRequest {
                identity: &id,
                spki_der: &rcgen::PublicKeyData::subject_public_key_info(&key),
                lifetime: LIFETIME,
                now: SystemTime::now(),
            })
            .expect("leaf");
        assert_eq!(
            leaf_spiffe_id(&issued.leaf_der).as_deref(),
            Ok("spiffe://cluster.local/ns/weft/sa/destination")
        );
        // The issuer (a CA, no URI SAN) is no client identity.
        assert!(leaf_spiffe_id(&issued.intermediates_der[0]).is_err());
        assert!(leaf_spiffe_id(b"not a certificate").is_err());
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn the_interceptor_hands_over_the_verified_identity() {
        // Plaintext (no TlsPeer): passes, nothing to check.
        let req = caller_interceptor(Request::new(())).expect("plaintext passes");
        assert!(req.extensions().get::<CallerIdentity>().is_none());
        // mTLS: the certificate's identity becomes the CallerIdentity.
        let mut req = Request::new(());
        req.extensions_mut().insert(TlsPeer {
            remote: None,
            id: Some("spiffe://cluster.local/ns/shop/sa/web".into()),
        });
        let req = caller_interceptor(req).expect("mTLS passes");
        assert_eq!(
            req.extensions().get::<CallerIdentity>(),
            Some(&CallerIdentity(
                "spiffe://cluster.local/ns/shop/sa/web".into()
            ))
        );
        // TLS without a client identity never reaches a handler.
        let mut req = Request::new(());
        req.extensions_mut().insert(TlsPeer {
            remote: None,
            id: None,
        });
        let status = caller_interceptor(req).expect_err("no identity");
        assert_eq!(status.code(), tonic::Code::Unauthenticated);
    }
}

//! Mutual TLS between proxies: rustls configs backed by the identity client's certificate watch.
//!
//! Both sides read the certificate from [`CertState`] at every handshake, so a renewal is
//! served from the next connection on, and a missing or expired certificate makes the handshake
//! fail (fail closed) rather than fall back to anything.
//!
//! Only TLS 1.3 with the ring provider. The server requires a client certificate that chains to
//! the trust anchors; the client accepts a server only if its chain verifies to the anchors *and*
//! its single URI SAN is exactly the SPIFFE ID the controller said the endpoint has. Session
//! resumption is off on both sides: a resumed TLS 1.3 session presents no certificate, so it
//! would bypass the expiry check.
//!
//! # Server names
//!
//! The expected identity travels with each connection as the TLS server name (SNI), so one
//! [`rustls::ClientConfig`] (and its session cache) serves every endpoint. The SPIFFE ID
//! `spiffe://<trust-domain>/ns/<ns>/sa/<sa>` is written, as linkerd does,
//!
//! ```text
//! <sa>.<ns>.serviceaccount.identity.<trust-domain>
//! ```
//!
//! ([`server_name`]) and read back by [`identity_from_server_name`]: split at the first
//! `.serviceaccount.identity.`, the namespace is the last label before it. [`server_name`]
//! refuses identities whose name would not read back to the same ID (a namespace with a dot,
//! a ServiceAccount containing the marker), so the mapping is exact. The inbound side can use
//! the same function on a peeked SNI to decide whether a ClientHello is addressed to this
//! workload.

use std::sync::Arc;
use std::time::SystemTime;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::ResolvesClientCert;
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::server::{ClientHello, ParsedCertificate, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{
    CertificateError, ClientConfig, CommonState, DigitallySignedStruct, OtherError, RootCertStore,
    ServerConfig, SignatureScheme,
};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use tokio::sync::watch;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::identity::verify::san_names;
use crate::identity::{CertState, TrustAnchors};

/// ALPN between proxies: HTTP/2 only on the client; the server also takes HTTP/1.1.
pub const ALPN_H2: &[u8] = b"h2";
pub const ALPN_HTTP1: &[u8] = b"http/1.1";

/// The label between the ServiceAccount/namespace and the trust domain in a server name.
pub const MARKER: &str = ".serviceaccount.identity.";

/// Why a TLS config cannot be built (at start, from the trust anchors).
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("trust anchor #{index} cannot be added to the TLS root store: {source}")]
    Anchor {
        index: usize,
        #[source]
        source: rustls::Error,
    },
    #[error("cannot build the client-certificate verifier from the trust anchors: {0}")]
    ClientVerifier(#[from] rustls::server::VerifierBuilderError),
    #[error("the ring provider does not offer TLS 1.3: {0}")]
    Protocol(#[source] rustls::Error),
    #[error("identity {0:?} has no TLS server name: expected spiffe://<trust-domain>/ns/<namespace>/sa/<serviceaccount> with a dot-free namespace")]
    NoServerName(String),
}

/// Why a peer's certificate does not name a mesh identity.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PeerIdError {
    #[error("the peer presented no certificate")]
    NoCertificate,
    #[error("the peer certificate does not parse: {0}")]
    Parse(String),
    #[error("the peer certificate names {0:?}; a mesh peer names exactly one spiffe:// URI")]
    NotOneSpiffeId(Vec<String>),
}

/// Why the client refused a server beyond chain errors (a wrong identity is reported as
/// rustls' `NotValidForNameContext`, which names both).
#[derive(Debug, thiserror::Error)]
pub enum ServerIdError {
    #[error("server name {0:?} does not encode a mesh identity (<sa>.<ns>.serviceaccount.identity.<trust-domain>)")]
    NotAnIdentity(String),
    #[error(transparent)]
    Peer(#[from] PeerIdError),
}

/// The TLS server name for a SPIFFE ID (see the module docs).
pub fn server_name(id: &str) -> Result<ServerName<'static>, TlsError> {
    let no = || TlsError::NoServerName(id.to_string());
    let rest = id.strip_prefix("spiffe://").ok_or_else(no)?;
    let (td, path) = rest.split_once('/').ok_or_else(no)?;
    let (ns, sa) = match path.split('/').collect::<Vec<_>>().as_slice() {
        ["ns", ns, "sa", sa] => (*ns, *sa),
        _ => return Err(no()),
    };
    let name = format!("{sa}.{ns}{MARKER}{td}");
    if identity_from_server_name(&name).as_deref() != Some(id) {
        return Err(no());
    }
    ServerName::try_from(name).map_err(|_| no())
}

/// The SPIFFE ID a server name stands for, if it is one written by [`server_name`].
pub fn identity_from_server_name(name: &str) -> Option<String> {
    let (left, td) = name.split_once(MARKER)?;
    let (sa, ns) = left.rsplit_once('.')?;
    if sa.is_empty() || ns.is_empty() || td.is_empty() {
        return None;
    }
    Some(format!("spiffe://{td}/ns/{ns}/sa/{sa}"))
}

/// Hands rustls this proxy's certificate while the identity client holds a valid one; `None`
/// otherwise, which fails the handshake on the server and sends no certificate from the client
/// (which the peer then refuses).
#[derive(Debug)]
pub struct CertResolver {
    state: watch::Receiver<CertState>,
}

impl CertResolver {
    pub fn new(state: watch::Receiver<CertState>) -> Self {
        Self { state }
    }

    fn current(&self) -> Option<Arc<CertifiedKey>> {
        let key = self
            .state
            .borrow()
            .valid_at(SystemTime::now())
            .map(|c| c.key.clone());
        if key.is_none() {
            tracing::debug!("no valid certificate: TLS handshake refused");
        }
        key
    }
}

impl ResolvesServerCert for CertResolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current()
    }
}

impl ResolvesClientCert for CertResolver {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        self.current()
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// ring's provider with TLS_AES_128_GCM_SHA256 first (ring lists AES-256 first). AES-128 matches
/// the 128-bit strength of the P-256 keys, takes 10 AES rounds per block instead of 14, and its
/// key schedule hashes with SHA-256, which ring runs on the CPU's SHA extensions where they exist,
/// while SHA-384 runs in software (6 % of a handshake's CPU in the profile in
/// benches/RESULTS.md). The other TLS 1.3 suites follow in ring's order.
fn provider() -> Arc<CryptoProvider> {
    let mut provider = rustls::crypto::ring::default_provider();
    provider
        .cipher_suites
        .sort_by_key(|s| s.suite() != rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
    Arc::new(provider)
}

fn root_store(anchors: &TrustAnchors) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for (i, der) in anchors.ders().iter().enumerate() {
        roots.add(der.clone()).map_err(|source| TlsError::Anchor {
            index: i + 1,
            source,
        })?;
    }
    Ok(roots)
}

/// The inbound config: TLS 1.3, this proxy's certificate from `identity`, a client certificate
/// chaining to `anchors` required, ALPN `h2` then `http/1.1`.
pub fn server_config(
    identity: watch::Receiver<CertState>,
    anchors: &TrustAnchors,
) -> Result<ServerConfig, TlsError> {
    let provider = provider();
    let verifier = WebPkiClientVerifier::builder_with_provider(
        Arc::new(root_store(anchors)?),
        provider.clone(),
    )
    .build()?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(TlsError::Protocol)?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(Arc::new(CertResolver::new(identity)));
    config.alpn_protocols = vec![ALPN_H2.to_vec(), ALPN_HTTP1.to_vec()];
    // No resumption: a resumed session skips both certificates, which would let a proxy whose
    // certificate expired keep handshaking on old tickets. Proxies reuse their connections, so
    // full handshakes are rare.
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(config)
}

/// The outbound config: TLS 1.3, this proxy's certificate from `identity` as the client
/// certificate, servers verified by [`MeshServerVerifier`], ALPN `h2`. Connect with
/// [`server_name`] of the endpoint's expected identity.
pub fn client_config(
    identity: watch::Receiver<CertState>,
    anchors: &TrustAnchors,
) -> Result<ClientConfig, TlsError> {
    let provider = provider();
    let verifier = MeshServerVerifier {
        roots: root_store(anchors)?,
        algs: provider.signature_verification_algorithms,
    };
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(TlsError::Protocol)?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_client_cert_resolver(Arc::new(CertResolver::new(identity)));
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    // No resumption (see `server_config`).
    config.resumption = rustls::client::Resumption::disabled();
    Ok(config)
}

/// The config of a channel to the controller (see [`super::control`]): TLS 1.3, servers
/// verified by [`MeshServerVerifier`] (so the controller's certificate must name the identity
/// in the SNI), the workload certificate presented when `identity` is given (the destination
/// service), none otherwise (the identity service). Resumption is off as in
/// [`client_config`].
pub fn controller_client_config(
    identity: Option<watch::Receiver<CertState>>,
    anchors: &TrustAnchors,
) -> Result<ClientConfig, TlsError> {
    let provider = provider();
    let verifier = MeshServerVerifier {
        roots: root_store(anchors)?,
        algs: provider.signature_verification_algorithms,
    };
    let builder = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(TlsError::Protocol)?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier));
    let mut config = match identity {
        Some(identity) => builder.with_client_cert_resolver(Arc::new(CertResolver::new(identity))),
        None => builder.with_no_client_auth(),
    };
    config.resumption = rustls::client::Resumption::disabled();
    Ok(config)
}

/// Accepts a server whose chain verifies to the trust anchors for server auth and whose leaf
/// names exactly the identity encoded in the server name. No DNS-name check: mesh leaves carry
/// only the SPIFFE URI.
#[derive(Debug)]
pub struct MeshServerVerifier {
    roots: RootCertStore,
    algs: WebPkiSupportedAlgorithms,
}

fn refuse(e: ServerIdError) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(e))))
}

impl ServerCertVerifier for MeshServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let name = server_name.to_str();
        let expected = identity_from_server_name(&name)
            .ok_or_else(|| refuse(ServerIdError::NotAnIdentity(name.to_string())))?;
        let cert = ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &cert,
            &self.roots,
            intermediates,
            now,
            self.algs.all,
        )?;
        let found = leaf_identity(end_entity).map_err(|e| refuse(e.into()))?;
        if found != expected {
            // "certificate not valid for name \"<sni>\"; certificate is only valid for <id>".
            return Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForNameContext {
                    expected: server_name.to_owned(),
                    presented: vec![found],
                },
            ));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

/// The SPIFFE ID of the peer of a completed handshake (the `client_id` label on inbound).
pub fn peer_identity(conn: &CommonState) -> Result<String, PeerIdError> {
    let leaf = conn
        .peer_certificates()
        .and_then(|c| c.first())
        .ok_or(PeerIdError::NoCertificate)?;
    leaf_identity(leaf)
}

/// The single `spiffe://` URI SAN of a leaf; anything else (no SAN, several names, other
/// name types) is refused.
pub fn leaf_identity(leaf: &CertificateDer<'_>) -> Result<String, PeerIdError> {
    let (_, cert) =
        X509Certificate::from_der(leaf).map_err(|e| PeerIdError::Parse(e.to_string()))?;
    let names = san_names(&cert).map_err(PeerIdError::Parse)?;
    match names.as_slice() {
        [one] if one.starts_with("spiffe://") => Ok(one.clone()),
        _ => Err(PeerIdError::NotOneSpiffeId(names)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;
    use std::time::Duration;

    use rcgen::{
        BasicConstraints, CertificateParams, DistinguishedName, ExtendedKeyUsagePurpose, IsCa,
        Issuer, KeyPair, KeyUsagePurpose, SanType, PKCS_ECDSA_P256_SHA256,
    };
    use rustls_pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_rustls::{TlsAcceptor, TlsConnector};

    use crate::identity::Certificate;

    const A: &str = "spiffe://cluster.local/ns/books/sa/web";
    const B: &str = "spiffe://cluster.local/ns/books/sa/db";

    /// A root and an issuer under it, like the controller's.
    struct Pki {
        root_pem: String,
        issuer_der: CertificateDer<'static>,
        issuer: Issuer<'static, KeyPair>,
    }

    fn ca_params() -> CertificateParams {
        let mut p = CertificateParams::default();
        // Distinct names, so a stranger's chain is an unknown issuer, not a bad signature.
        p.distinguished_name = DistinguishedName::new();
        p.distinguished_name.push(
            rcgen::DnType::CommonName,
            format!("weft test CA {}", fastrand::u64(..)),
        );
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign];
        p
    }

    fn pki() -> Pki {
        let root_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let root_params = ca_params();
        let root_pem = root_params.self_signed(&root_key).unwrap().pem();
        let root = Issuer::new(root_params, root_key);
        let issuer_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let issuer_params = ca_params();
        let issuer_cert = issuer_params.signed_by(&issuer_key, &root).unwrap();
        Pki {
            root_pem,
            issuer_der: issuer_cert.der().clone(),
            issuer: Issuer::new(issuer_params, issuer_key),
        }
    }

    fn anchors(pems: &[&Pki]) -> TrustAnchors {
        let bundle: String = pems.iter().map(|p| p.root_pem.as_str()).collect();
        TrustAnchors::from_pem(Path::new("anchors.pem"), bundle.as_bytes()).unwrap()
    }

    /// A `Ready` state holding a fresh leaf for `id` from `pki`, valid until `not_after`.
    fn ready(pki: &Pki, id: &str, not_after: SystemTime) -> CertState {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let mut p = CertificateParams::default();
        p.distinguished_name = DistinguishedName::new();
        p.subject_alt_names = vec![SanType::URI(id.try_into().unwrap())];
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let leaf = p.signed_by(&key, &pki.issuer).unwrap();
        let pkcs8 = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let signer = rustls::crypto::ring::sign::any_ecdsa_type(&pkcs8).unwrap();
        let chain = vec![leaf.der().clone(), pki.issuer_der.clone()];
        CertState::Ready(Arc::new(Certificate {
            key: Arc::new(CertifiedKey::new(chain, signer)),
            id: id.into(),
            not_before: SystemTime::now() - Duration::from_secs(60),
            not_after,
        }))
    }

    fn hour() -> SystemTime {
        SystemTime::now() + Duration::from_secs(3600)
    }

    fn state(s: CertState) -> watch::Receiver<CertState> {
        watch::channel(s).1
    }

    type ServerSide = std::io::Result<tokio_rustls::server::TlsStream<tokio::io::DuplexStream>>;
    type ClientSide = std::io::Result<tokio_rustls::client::TlsStream<tokio::io::DuplexStream>>;

    /// One handshake over an in-memory pipe, then a ping/pong so both sides know whether the
    /// other accepted (in TLS 1.3 the server judges the client certificate after the client
    /// has finished). The client connects expecting `expect`.
    async fn handshake(
        server: ServerConfig,
        client: ClientConfig,
        expect: &str,
    ) -> (ServerSide, ClientSide) {
        let (s, c) = tokio::io::duplex(64 * 1024);
        let acceptor = TlsAcceptor::from(Arc::new(server));
        let connector = TlsConnector::from(Arc::new(client));
        let name = server_name(expect).unwrap();
        let server = async {
            let mut s = acceptor.accept(s).await?;
            let mut buf = [0u8; 4];
            s.read_exact(&mut buf).await?;
            assert_eq!(&buf, b"ping");
            s.write_all(b"pong").await?;
            s.flush().await?;
            Ok(s)
        };
        let client = async {
            let mut c = connector.connect(name, c).await?;
            c.write_all(b"ping").await?;
            c.flush().await?;
            let mut buf = [0u8; 4];
            c.read_exact(&mut buf).await?;
            assert_eq!(&buf, b"pong");
            Ok(c)
        };
        tokio::time::timeout(Duration::from_secs(10), async {
            tokio::join!(server, client)
        })
        .await
        .unwrap()
    }

    fn configs(
        server: (CertState, &TrustAnchors),
        client: (CertState, &TrustAnchors),
    ) -> (ServerConfig, ClientConfig) {
        (
            server_config(state(server.0), server.1).unwrap(),
            client_config(state(client.0), client.1).unwrap(),
        )
    }

    #[tokio::test]
    async fn mutual_handshake_sees_both_identities_h2_and_aes_128_gcm() {
        let pki = pki();
        let trust = anchors(&[&pki]);
        let (sc, cc) = configs(
            (ready(&pki, A, hour()), &trust),
            (ready(&pki, B, hour()), &trust),
        );
        let (server, client) = handshake(sc, cc, A).await;
        let (server, client) = (server.unwrap(), client.unwrap());
        let s = server.get_ref().1;
        let c = client.get_ref().1;
        assert_eq!(peer_identity(s).unwrap(), B);
        assert_eq!(peer_identity(c).unwrap(), A);
        assert_eq!(s.alpn_protocol(), Some(ALPN_H2));
        assert_eq!(c.alpn_protocol(), Some(ALPN_H2));
        assert_eq!(s.protocol_version(), Some(rustls::ProtocolVersion::TLSv1_3));
        // AES-128-GCM is preferred over ring's default AES-256 (see `provider`).
        for suite in [s.negotiated_cipher_suite(), c.negotiated_cipher_suite()] {
            assert_eq!(
                suite.map(|s| s.suite()),
                Some(rustls::CipherSuite::TLS13_AES_128_GCM_SHA256)
            );
        }
    }

    #[tokio::test]
    async fn client_refuses_a_server_with_another_identity() {
        let pki = pki();
        let trust = anchors(&[&pki]);
        // The server is B; the client was told the endpoint is A.
        let (sc, cc) = configs(
            (ready(&pki, B, hour()), &trust),
            (ready(&pki, A, hour()), &trust),
        );
        let (server, client) = handshake(sc, cc, A).await;
        let err = client.unwrap_err().to_string();
        assert!(
            err.contains(&format!(
                "not valid for name \"web.books.serviceaccount.identity.cluster.local\"; certificate is only valid for {B}"
            )),
            "{err}"
        );
        assert!(server.is_err());
    }

    #[tokio::test]
    async fn client_refuses_a_server_from_an_untrusted_root() {
        let (pki, stranger) = (pki(), pki());
        let trust = anchors(&[&pki]);
        let (sc, cc) = configs(
            (ready(&stranger, A, hour()), &anchors(&[&stranger, &pki])),
            (ready(&pki, B, hour()), &trust),
        );
        let (_, client) = handshake(sc, cc, A).await;
        let err = client.unwrap_err().to_string();
        assert!(err.contains("UnknownIssuer"), "{err}");
    }

    #[tokio::test]
    async fn server_refuses_a_client_from_an_untrusted_root() {
        let (pki, stranger) = (pki(), pki());
        let trust = anchors(&[&pki]);
        let (sc, cc) = configs(
            (ready(&pki, A, hour()), &trust),
            (ready(&stranger, B, hour()), &trust),
        );
        let (server, client) = handshake(sc, cc, A).await;
        let err = server.unwrap_err().to_string();
        assert!(err.contains("UnknownIssuer"), "{err}");
        assert!(client.is_err());
    }

    #[tokio::test]
    async fn server_fails_closed_without_a_valid_certificate() {
        let pki = pki();
        let trust = anchors(&[&pki]);
        let expired = CertState::Expired {
            at: SystemTime::now(),
            reason: "identity service unreachable".into(),
        };
        let past = SystemTime::now() - Duration::from_secs(1);
        let pending = CertState::Pending {
            reason: "first request".into(),
        };
        for bad in [expired, ready(&pki, A, past), pending] {
            let (sc, cc) = configs((bad.clone(), &trust), (ready(&pki, B, hour()), &trust));
            let (server, client) = handshake(sc, cc, A).await;
            assert!(server.is_err(), "{bad:?}");
            assert!(client.is_err(), "{bad:?}");
        }
    }

    #[tokio::test]
    async fn client_without_a_valid_certificate_is_refused() {
        let pki = pki();
        let trust = anchors(&[&pki]);
        let expired = CertState::Expired {
            at: SystemTime::now(),
            reason: "x".into(),
        };
        let (sc, cc) = configs((ready(&pki, A, hour()), &trust), (expired, &trust));
        let (server, client) = handshake(sc, cc, A).await;
        let err = server.unwrap_err().to_string();
        assert!(err.contains("no certificates"), "{err}");
        assert!(client.is_err());
    }

    #[tokio::test]
    async fn renewal_is_served_from_the_next_handshake() {
        let pki = pki();
        let trust = anchors(&[&pki]);
        let (tx, rx) = watch::channel(CertState::Pending {
            reason: "start".into(),
        });
        let sc = server_config(rx, &trust).unwrap();
        let cc = client_config(state(ready(&pki, B, hour())), &trust).unwrap();
        let (server, _) = handshake(sc.clone(), cc.clone(), A).await;
        assert!(server.is_err());
        tx.send_replace(ready(&pki, A, hour()));
        let (server, client) = handshake(sc, cc, A).await;
        assert!(server.is_ok() && client.is_ok());
    }

    /// No session resumption: a resumed TLS 1.3 session sends no certificate, so an expired
    /// proxy could otherwise keep handshaking on old tickets.
    #[tokio::test]
    async fn expiry_fails_closed_even_after_earlier_handshakes() {
        let pki = pki();
        let trust = anchors(&[&pki]);
        let (server_tx, server_rx) = watch::channel(ready(&pki, A, hour()));
        let (client_tx, client_rx) = watch::channel(ready(&pki, B, hour()));
        let sc = server_config(server_rx, &trust).unwrap();
        let cc = client_config(client_rx, &trust).unwrap();
        let (server, client) = handshake(sc.clone(), cc.clone(), A).await;
        assert!(server.is_ok() && client.is_ok());
        let expired = || CertState::Expired {
            at: SystemTime::now(),
            reason: "x".into(),
        };
        client_tx.send_replace(expired());
        let (server, _) = handshake(sc.clone(), cc.clone(), A).await;
        assert!(server.is_err(), "an expired client must not resume");
        client_tx.send_replace(ready(&pki, B, hour()));
        server_tx.send_replace(expired());
        let (server, client) = handshake(sc, cc, A).await;
        assert!(
            server.is_err() && client.is_err(),
            "an expired server must not resume"
        );
    }

    #[tokio::test]
    async fn two_roots_accept_leaves_from_both_during_rotation() {
        let (old, new) = (pki(), pki());
        let trust = anchors(&[&old, &new]);
        for (s, c) in [(&old, &new), (&new, &old)] {
            let (sc, cc) = configs((ready(s, A, hour()), &trust), (ready(c, B, hour()), &trust));
            let (server, client) = handshake(sc, cc, A).await;
            assert_eq!(peer_identity(server.unwrap().get_ref().1).unwrap(), B);
            assert_eq!(peer_identity(client.unwrap().get_ref().1).unwrap(), A);
        }
    }

    #[test]
    fn server_names_round_trip_exactly() {
        let name = server_name(A).unwrap();
        assert_eq!(
            name.to_str(),
            "web.books.serviceaccount.identity.cluster.local"
        );
        assert_eq!(identity_from_server_name(&name.to_str()).unwrap(), A);
        let dotted = "spiffe://example.org/ns/books/sa/api.v2";
        assert_eq!(
            identity_from_server_name(&server_name(dotted).unwrap().to_str()).unwrap(),
            dotted
        );
        for bad in [
            "web.books.svc.cluster.local",
            "books.serviceaccount.identity.td",
            ".books.serviceaccount.identity.td",
            "web.books.serviceaccount.identity.",
        ] {
            assert_eq!(identity_from_server_name(bad), None, "{bad}");
        }
        for bad in [
            "https://td/ns/a/sa/b",
            "spiffe://td/ns/a.b/sa/c",
            "spiffe://td/ns/a/sa/x.serviceaccount.identity.y",
            "spiffe://td/ns/a",
        ] {
            assert!(server_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn leaf_identity_wants_one_spiffe_uri() {
        let pki = pki();
        let CertState::Ready(c) = ready(&pki, A, hour()) else {
            unreachable!()
        };
        assert_eq!(leaf_identity(&c.key.cert[0]).unwrap(), A);
        let CertState::Ready(c) = ready(&pki, "https://example.org/x", hour()) else {
            unreachable!()
        };
        assert_eq!(
            leaf_identity(&c.key.cert[0]),
            Err(PeerIdError::NotOneSpiffeId(vec![
                "https://example.org/x".into()
            ]))
        );
        assert!(matches!(
            leaf_identity(&CertificateDer::from(&b"junk"[..])),
            Err(PeerIdError::Parse(_))
        ));
    }
}

//! The bench's side of the mesh PKI: certificates signed with the development CA the
//! controller created (`issuer.crt`, `issuer.key`, `trust-anchors.pem`), and a TLS 1.3 client
//! that checks a server the way a Weft proxy does: the chain verifies to the trust anchors and
//! the leaf's only URI SAN is the SPIFFE ID we expect. The server name we send (SNI) encodes
//! that ID ([`crate::scenario::mesh::server_name`]); it is not a DNS name in the certificate,
//! so rustls' stock name check does not apply and this verifier replaces it.
//!
//! Leaves are shaped like the controller's: ECDSA P-256, an empty subject, one URI SAN,
//! EKU serverAuth + clientAuth, presented with the issuer behind them.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::{bail, Context as _};
use rcgen::{
    CertificateParams, DistinguishedName, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, WebPkiSupportedAlgorithms};
use rustls::server::ParsedCertificate;
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use x509_parser::extensions::GeneralName;

use crate::scenario::mesh;

/// A development CA read from its directory.
pub struct DevCa {
    issuer_pem: String,
    issuer_key_pem: String,
    /// issuer.crt: the issuer first, then any intermediates.
    issuer_chain: Vec<CertificateDer<'static>>,
    anchors: Vec<CertificateDer<'static>>,
}

/// A certificate chain (leaf first) and its private key, in DER and PEM.
pub struct Leaf {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivatePkcs8KeyDer<'static>,
    /// Leaf, issuer chain, then the PKCS#8 key: the file HAProxy's `crt` takes.
    pub pem_bundle: String,
}

fn read(path: &Path) -> anyhow::Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
}

fn certs(pem: &str, path: &Path) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("parsing the certificates in {}", path.display()))?;
    if certs.is_empty() {
        bail!("{} holds no certificate", path.display());
    }
    Ok(certs)
}

impl DevCa {
    /// Reads `dir/{issuer.crt,issuer.key,trust-anchors.pem}`.
    pub fn load(dir: &Path) -> anyhow::Result<Self> {
        let cert_path = dir.join(mesh::CA_ISSUER_CERT);
        let anchors_path = dir.join(mesh::CA_TRUST_ANCHORS);
        let issuer_pem = read(&cert_path)?;
        let anchors_pem = read(&anchors_path)?;
        Ok(DevCa {
            issuer_chain: certs(&issuer_pem, &cert_path)?,
            anchors: certs(&anchors_pem, &anchors_path)?,
            issuer_key_pem: read(&dir.join(mesh::CA_ISSUER_KEY))?,
            issuer_pem,
        })
    }

    /// A fresh P-256 leaf for `spiffe_id`, valid from a minute ago for `lifetime`.
    pub fn issue(&self, spiffe_id: &str, lifetime: Duration) -> anyhow::Result<Leaf> {
        let issuer_key = KeyPair::from_pem(&self.issuer_key_pem)
            .context("parsing the issuer key (PKCS#8 or SEC1 PEM)")?;
        let issuer = Issuer::from_ca_cert_pem(&self.issuer_pem, issuer_key)
            .context("parsing the issuer certificate")?;
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .context("generating a P-256 key")?;
        let mut params = CertificateParams::default();
        // The identity is the URI SAN alone (rcgen marks the SAN critical for an empty subject).
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names =
            vec![SanType::URI(spiffe_id.try_into().with_context(|| {
                format!("{spiffe_id:?} is not an IA5 string")
            })?)];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        let now = SystemTime::now();
        params.not_before = (now - Duration::from_secs(60)).into();
        params.not_after = (now + lifetime).into();
        let cert = params
            .signed_by(&key, &issuer)
            .with_context(|| format!("signing a leaf for {spiffe_id}"))?;

        let mut pem_bundle = cert.pem();
        let mut chain = vec![cert.der().clone()];
        for c in &self.issuer_chain {
            chain.push(c.clone());
        }
        // issuer.crt as it is on disk (PEM), then the key.
        pem_bundle.push_str(self.issuer_pem.trim_end());
        pem_bundle.push('\n');
        pem_bundle.push_str(&key.serialize_pem());
        Ok(Leaf {
            chain,
            key: PrivatePkcs8KeyDer::from(key.serialize_der()),
            pem_bundle,
        })
    }

    /// The trust anchors as a rustls root store.
    pub fn roots(&self) -> anyhow::Result<RootCertStore> {
        let mut roots = RootCertStore::empty();
        for (i, a) in self.anchors.iter().enumerate() {
            roots
                .add(a.clone())
                .with_context(|| format!("trust anchor #{i} is not a usable root"))?;
        }
        Ok(roots)
    }
}

/// The URI SANs of a DER certificate.
pub fn uri_sans(der: &[u8]) -> Result<Vec<String>, String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| e.to_string())?;
    let san = cert.subject_alternative_name().map_err(|e| e.to_string())?;
    Ok(san
        .map(|s| {
            s.value
                .general_names
                .iter()
                .filter_map(|g| match g {
                    GeneralName::URI(u) => Some((*u).to_owned()),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default())
}

/// Accepts a server whose chain verifies to `roots` for server auth and whose leaf names
/// exactly `expected` (one URI SAN).
#[derive(Debug)]
pub struct SpiffeServerVerifier {
    roots: Arc<RootCertStore>,
    expected: String,
    algs: WebPkiSupportedAlgorithms,
}

impl SpiffeServerVerifier {
    pub fn new(roots: RootCertStore, expected: String) -> Self {
        SpiffeServerVerifier {
            roots: Arc::new(roots),
            expected,
            algs: rustls::crypto::ring::default_provider().signature_verification_algorithms,
        }
    }
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let cert = ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &cert,
            &self.roots,
            intermediates,
            now,
            self.algs.all,
        )?;
        let uris = uri_sans(end_entity)
            .map_err(|_| rustls::Error::InvalidCertificate(CertificateError::BadEncoding))?;
        if uris != [self.expected.as_str()] {
            return Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForNameContext {
                    expected: server_name.to_owned(),
                    presented: uris,
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
        verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

/// A TLS 1.3 client (ring provider) presenting `client`, offering `alpn`, accepting only a
/// server that [`SpiffeServerVerifier`] accepts for `expected_server`. No session resumption:
/// every connection is a full handshake, as between Weft proxies.
pub fn client_config(
    ca: &DevCa,
    client: &Leaf,
    expected_server: &str,
    alpn: &[u8],
) -> anyhow::Result<Arc<ClientConfig>> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = SpiffeServerVerifier::new(ca.roots()?, expected_server.to_owned());
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .context("TLS 1.3 with the ring provider")?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_client_auth_cert(
            client.chain.clone(),
            PrivateKeyDer::Pkcs8(client.key.clone_key()),
        )
        .context("the client certificate and key do not fit together")?;
    config.alpn_protocols = vec![alpn.to_vec()];
    config.resumption = rustls::client::Resumption::disabled();
    Ok(Arc::new(config))
}

/// A development CA on disk for tests, shaped like the controller's.
#[cfg(test)]
pub(crate) mod testing {
    use super::*;
    use rcgen::BasicConstraints;

    /// A root and an issuer, written like the controller's dev CA.
    pub fn dev_ca_dir(name: &str) -> std::path::PathBuf {
        let dir =
            std::env::temp_dir().join(format!("weft-bench-pki-test-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let ca_params = |cn: &str| {
            let mut p = CertificateParams::default();
            p.distinguished_name.push(rcgen::DnType::CommonName, cn);
            p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
            p
        };
        let root_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
        let root = ca_params("root").self_signed(&root_key).expect("root");
        let root_issuer = Issuer::new(ca_params("root"), root_key);
        let issuer_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
        let issuer = ca_params("issuer")
            .signed_by(&issuer_key, &root_issuer)
            .expect("issuer");
        std::fs::write(dir.join(mesh::CA_TRUST_ANCHORS), root.pem()).expect("write");
        std::fs::write(dir.join(mesh::CA_ISSUER_CERT), issuer.pem()).expect("write");
        std::fs::write(dir.join(mesh::CA_ISSUER_KEY), issuer_key.serialize_pem()).expect("write");
        dir
    }
}

#[cfg(test)]
mod tests {
    use super::testing::dev_ca_dir;
    use super::*;

    fn verify(
        v: &SpiffeServerVerifier,
        leaf: &Leaf,
        name: &str,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let name = ServerName::try_from(name.to_owned()).expect("name");
        v.verify_server_cert(
            &leaf.chain[0],
            &leaf.chain[1..],
            &name,
            &[],
            UnixTime::now(),
        )
    }

    #[test]
    fn leaves_chain_to_the_anchors_and_name_their_identity() {
        let dir = dev_ca_dir("mesh");
        let ca = DevCa::load(&dir).expect("load");
        let server_id = mesh::spiffe_id("bench", "server");
        let leaf = ca
            .issue(&server_id, Duration::from_secs(3600))
            .expect("issue");
        assert_eq!(leaf.chain.len(), 2);
        assert_eq!(
            uri_sans(&leaf.chain[0]).expect("sans"),
            vec![server_id.clone()]
        );
        assert_eq!(leaf.pem_bundle.matches("BEGIN CERTIFICATE").count(), 2);
        assert!(leaf.pem_bundle.contains("BEGIN PRIVATE KEY"));

        let sni = mesh::server_name("bench", "server");
        let v = SpiffeServerVerifier::new(ca.roots().expect("roots"), server_id.clone());
        assert!(verify(&v, &leaf, &sni).is_ok());

        // Another identity from the same CA is refused, naming what it presented.
        let other = ca
            .issue(
                &mesh::spiffe_id("bench", "other"),
                Duration::from_secs(3600),
            )
            .expect("issue");
        let err = verify(&v, &other, &sni).expect_err("wrong identity");
        assert!(
            err.to_string()
                .contains("spiffe://cluster.local/ns/bench/sa/other"),
            "{err}"
        );

        // Without the issuer the chain does not reach the anchor.
        let alone = Leaf {
            chain: leaf.chain[..1].to_vec(),
            key: leaf.key.clone_key(),
            pem_bundle: String::new(),
        };
        let name = ServerName::try_from(sni.clone()).expect("name");
        assert!(v
            .verify_server_cert(&alone.chain[0], &[], &name, &[], UnixTime::now())
            .is_err());

        // A chain from another CA is refused.
        let other_dir = dev_ca_dir("stranger");
        let stranger = DevCa::load(&other_dir).expect("other CA");
        let foreign = stranger
            .issue(&server_id, Duration::from_secs(3600))
            .expect("issue");
        assert!(verify(&v, &foreign, &sni).is_err());

        assert!(client_config(&ca, &leaf, &server_id, b"h2").is_ok());
        let _ = std::fs::remove_dir_all(&dir);
        let _ = std::fs::remove_dir_all(&other_dir);
    }

    #[test]
    fn uri_sans_of_garbage_is_an_error() {
        assert!(uri_sans(b"not a certificate").is_err());
    }
}

//! The bench's side of the mesh PKI: certificates signed with the development CA the
//! controller created (`issuer.crt`, `issuer.key`, `trust-anchors.pem`), and a TLS 1.3 client
//! that is a Weft proxy's own client config ([`weft_proxy::transport::tls::client_config`]):
//! the chain must verify to the trust anchors and the leaf's only URI SAN must be the SPIFFE ID
//! the server name (SNI) encodes ([`crate::scenario::mesh::server_name`]).
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
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, RootCertStore};
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::sync::watch;
use weft_proxy::identity::{CertState, Certificate, TrustAnchors};

use crate::scenario::mesh;

/// A development CA read from its directory.
pub struct DevCa {
    issuer_pem: String,
    issuer_key_pem: String,
    /// issuer.crt: the issuer first, then any intermediates.
    issuer_chain: Vec<CertificateDer<'static>>,
    anchors: TrustAnchors,
}

/// A certificate chain (leaf first) and its private key, in DER and PEM.
pub struct Leaf {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivatePkcs8KeyDer<'static>,
    /// Leaf, issuer chain, then the PKCS#8 key: the file HAProxy's `crt` takes.
    pub pem_bundle: String,
    pub spiffe_id: String,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
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
            anchors: TrustAnchors::from_pem(&anchors_path, anchors_pem.as_bytes())?,
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
        let (not_before, not_after) = (now - Duration::from_secs(60), now + lifetime);
        params.not_before = not_before.into();
        params.not_after = not_after.into();
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
            spiffe_id: spiffe_id.to_owned(),
            not_before,
            not_after,
        })
    }

    /// The trust anchors as a rustls root store.
    pub fn roots(&self) -> anyhow::Result<RootCertStore> {
        let mut roots = RootCertStore::empty();
        for (i, a) in self.anchors.ders().iter().enumerate() {
            roots
                .add(a.clone())
                .with_context(|| format!("trust anchor #{i} is not a usable root"))?;
        }
        Ok(roots)
    }
}

/// A Weft proxy's TLS 1.3 client config presenting `client`, offering `alpn`: it accepts only
/// a server whose chain verifies to the trust anchors and whose leaf names exactly the
/// identity encoded in the SNI. No session resumption, so every connection is a full
/// handshake, as between Weft proxies.
pub fn client_config(ca: &DevCa, client: &Leaf, alpn: &[u8]) -> anyhow::Result<Arc<ClientConfig>> {
    let signer =
        rustls::crypto::ring::sign::any_ecdsa_type(&PrivateKeyDer::Pkcs8(client.key.clone_key()))
            .context("the client key is not an ECDSA key")?;
    let held = CertState::Ready(Arc::new(Certificate {
        key: Arc::new(CertifiedKey::new(client.chain.clone(), signer)),
        id: client.spiffe_id.as_str().into(),
        not_before: client.not_before,
        not_after: client.not_after,
    }));
    // The receiver keeps the last value after the sender is gone.
    let (_, state) = watch::channel(held);
    let mut config = weft_proxy::transport::tls::client_config(state, &ca.anchors)?;
    config.alpn_protocols = vec![alpn.to_vec()];
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

    /// Leaves are shaped like the controller's; the verification of servers is the proxy's
    /// own (tested in `weft_proxy::transport::tls`, and end to end by the churn tests in
    /// `client.rs`: a server with another identity is refused).
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
            weft_proxy::transport::tls::leaf_identity(&leaf.chain[0]).expect("identity"),
            server_id
        );
        assert_eq!(leaf.pem_bundle.matches("BEGIN CERTIFICATE").count(), 2);
        assert!(leaf.pem_bundle.contains("BEGIN PRIVATE KEY"));
        assert!(leaf.not_before < SystemTime::now() && SystemTime::now() < leaf.not_after);
        assert_eq!(ca.roots().expect("roots").len(), 1);
        assert!(client_config(&ca, &leaf, b"h2").is_ok());
        let _ = std::fs::remove_dir_all(&dir);
    }
}

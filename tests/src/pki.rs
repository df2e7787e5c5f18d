//! Test PKI for the mTLS tests: leaves signed by the controller's dev-CA issuer (valid or
//! expired), leaves from a stranger's CA, and a second root with an issuer under it for trust
//! rotation. Everything is written as PEM files that `openssl` and the controller read.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType, PKCS_ECDSA_P256_SHA256,
};

/// A CA that can sign leaves: its certificate PEM (the chain to send after a leaf) and key.
pub struct Ca {
    pub cert_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

/// A leaf written to disk: `cert` holds the leaf then the issuer, `key` the PKCS#8 key, and
/// `chain` only the issuer's certificates (what `openssl s_client -cert_chain` sends).
#[derive(Debug, Clone)]
pub struct LeafFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub chain: PathBuf,
}

fn ca_params(name: &str) -> CertificateParams {
    let mut p = CertificateParams::default();
    p.distinguished_name = DistinguishedName::new();
    p.distinguished_name.push(DnType::CommonName, name);
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    p
}

impl Ca {
    /// The issuer of a dev-CA directory (`issuer.crt`, first certificate; `issuer.key`).
    pub fn dev_ca_issuer(dir: &Path) -> Result<Self> {
        let cert_pem = std::fs::read_to_string(dir.join("issuer.crt"))?;
        let key_pem = std::fs::read_to_string(dir.join("issuer.key"))?;
        let key = KeyPair::from_pem(&key_pem).context("issuer.key")?;
        let issuer = Issuer::from_ca_cert_pem(&cert_pem, key).context("issuer.crt")?;
        Ok(Self { cert_pem, issuer })
    }

    /// A new self-signed root.
    pub fn root(name: &str) -> Result<Self> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let params = ca_params(name);
        let cert_pem = params.self_signed(&key)?.pem();
        Ok(Self {
            cert_pem,
            issuer: Issuer::new(params, key),
        })
    }

    /// An intermediate issuer under this root; returns it and its key PEM (for the
    /// controller's `issuer.key`). Its `cert_pem` is the issuer then this root.
    pub fn intermediate(&self, name: &str) -> Result<(Self, String)> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let params = ca_params(name);
        let cert = params.signed_by(&key, &self.issuer)?;
        let key_pem = key.serialize_pem();
        Ok((
            Self {
                cert_pem: format!("{}{}", cert.pem(), self.cert_pem),
                issuer: Issuer::new(params, key),
            },
            key_pem,
        ))
    }

    /// Writes a leaf for SPIFFE `id` valid from `not_before` to `not_after` as
    /// `dir/<name>.crt` (leaf + this CA's chain) and `dir/<name>.key`.
    pub fn leaf(
        &self,
        dir: &Path,
        name: &str,
        id: &str,
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> Result<LeafFiles> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut p = CertificateParams::default();
        p.distinguished_name = DistinguishedName::new();
        p.subject_alt_names = vec![SanType::URI(id.try_into()?)];
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.not_before = not_before.into();
        p.not_after = not_after.into();
        let cert = p.signed_by(&key, &self.issuer)?;
        let files = LeafFiles {
            cert: dir.join(format!("{name}.crt")),
            key: dir.join(format!("{name}.key")),
            chain: dir.join(format!("{name}-chain.pem")),
        };
        std::fs::write(&files.cert, format!("{}{}", cert.pem(), self.cert_pem))?;
        std::fs::write(&files.chain, &self.cert_pem)?;
        std::fs::write(&files.key, key.serialize_pem())?;
        Ok(files)
    }

    /// A leaf valid for the next hour.
    pub fn valid_leaf(&self, dir: &Path, name: &str, id: &str) -> Result<LeafFiles> {
        let now = SystemTime::now();
        self.leaf(
            dir,
            name,
            id,
            now - Duration::from_secs(60),
            now + Duration::from_secs(3600),
        )
    }
}

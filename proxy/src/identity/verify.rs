//! Trust anchors and the check every issued chain passes before the proxy uses it: it verifies
//! to an anchor with rustls-webpki (the verifier rustls will use for peers), for client and
//! server auth, names exactly the expected SPIFFE ID, and carries the proxy's own key.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, UnixTime};
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

use crate::config::env;

/// Why the trust-anchor bundle cannot be used (checked before any port is bound).
#[derive(Debug, thiserror::Error)]
pub enum AnchorsError {
    #[error("{var}={path}: cannot read: {source}", var = env::TRUST_ANCHORS, path = .path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{var}={path}: not a PEM bundle: {reason}", var = env::TRUST_ANCHORS, path = .path.display())]
    Pem { path: PathBuf, reason: String },
    #[error("{var}={path}: no CERTIFICATE block (expected one or more PEM root certificates)", var = env::TRUST_ANCHORS, path = .path.display())]
    Empty { path: PathBuf },
    #[error("{var}={path}: certificate #{index} is not a usable trust anchor: {reason}", var = env::TRUST_ANCHORS, path = .path.display())]
    Invalid {
        path: PathBuf,
        index: usize,
        reason: String,
    },
}

/// DER trust anchors from `WEFT_PROXY_TRUST_ANCHORS`.
#[derive(Clone, Debug)]
pub struct TrustAnchors {
    ders: Vec<CertificateDer<'static>>,
}

impl TrustAnchors {
    /// Reads and checks the bundle: readable, PEM, at least one certificate, each a valid anchor.
    pub fn load(path: &Path) -> Result<Self, AnchorsError> {
        let pem = std::fs::read(path).map_err(|source| AnchorsError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_pem(path, &pem)
    }

    pub fn from_pem(path: &Path, pem: &[u8]) -> Result<Self, AnchorsError> {
        let ders = CertificateDer::pem_slice_iter(pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| AnchorsError::Pem {
                path: path.to_path_buf(),
                reason: e.to_string(),
            })?;
        if ders.is_empty() {
            return Err(AnchorsError::Empty {
                path: path.to_path_buf(),
            });
        }
        for (i, der) in ders.iter().enumerate() {
            webpki::anchor_from_trusted_cert(der).map_err(|e| AnchorsError::Invalid {
                path: path.to_path_buf(),
                index: i + 1,
                reason: format!("{e:?}"),
            })?;
        }
        Ok(Self { ders })
    }

    pub fn len(&self) -> usize {
        self.ders.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ders.is_empty()
    }

    /// The anchors as DER certificates (for rustls root stores).
    pub fn ders(&self) -> &[CertificateDer<'static>] {
        &self.ders
    }
}

/// Why an issued chain was not accepted.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ChainError {
    #[error("leaf certificate does not parse: {0}")]
    Parse(String),
    #[error("chain does not verify against the trust anchors ({usage}): {reason}")]
    Untrusted { usage: &'static str, reason: String },
    #[error("leaf names {found:?}, expected exactly [{expected:?}]")]
    WrongIdentity {
        expected: String,
        found: Vec<String>,
    },
    #[error("leaf is not for this proxy's key")]
    WrongKey,
}

/// A verified leaf's validity.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Validity {
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

/// Every subject alternative name of `cert`: URIs as text, other kinds in their debug form
/// (so a refusal can show them). Shared by the check of our own chain and of peers' leaves.
pub fn san_names(cert: &X509Certificate<'_>) -> Result<Vec<String>, String> {
    let san = cert.subject_alternative_name().map_err(|e| e.to_string())?;
    Ok(san
        .map(|s| {
            s.value
                .general_names
                .iter()
                .map(|n| match n {
                    GeneralName::URI(u) => (*u).to_string(),
                    other => format!("{other:?}"),
                })
                .collect()
        })
        .unwrap_or_default())
}

/// Accepts `leaf` (+ `intermediates`) only if it verifies to `anchors` at `now` for client and
/// server auth, its only URI SAN is `id` and it holds the public key `spki` (DER
/// SubjectPublicKeyInfo).
pub fn check_chain(
    leaf: &[u8],
    intermediates: &[Vec<u8>],
    anchors: &TrustAnchors,
    id: &str,
    spki: &[u8],
    now: SystemTime,
) -> Result<Validity, ChainError> {
    let leaf_der = CertificateDer::from(leaf);
    let ee = webpki::EndEntityCert::try_from(&leaf_der)
        .map_err(|e| ChainError::Parse(format!("{e:?}")))?;
    let roots = anchors
        .ders
        .iter()
        .filter_map(|a| webpki::anchor_from_trusted_cert(a).ok())
        .collect::<Vec<_>>();
    let inter: Vec<CertificateDer<'_>> = intermediates
        .iter()
        .map(|c| CertificateDer::from(c.as_slice()))
        .collect();
    let time = UnixTime::since_unix_epoch(now.duration_since(UNIX_EPOCH).unwrap_or_default());
    for (usage, name) in [
        (webpki::KeyUsage::server_auth(), "server auth"),
        (webpki::KeyUsage::client_auth(), "client auth"),
    ] {
        ee.verify_for_usage(
            webpki::ALL_VERIFICATION_ALGS,
            &roots,
            &inter,
            time,
            usage,
            None,
            None,
        )
        .map_err(|e| ChainError::Untrusted {
            usage: name,
            reason: format!("{e:?}"),
        })?;
    }
    let (_, cert) =
        X509Certificate::from_der(leaf).map_err(|e| ChainError::Parse(e.to_string()))?;
    let names = san_names(&cert).map_err(ChainError::Parse)?;
    if names != [id] {
        return Err(ChainError::WrongIdentity {
            expected: id.to_string(),
            found: names,
        });
    }
    if cert.public_key().raw != spki {
        return Err(ChainError::WrongKey);
    }
    let to_system = |t: i64| UNIX_EPOCH + Duration::from_secs(u64::try_from(t).unwrap_or(0));
    Ok(Validity {
        not_before: to_system(cert.validity().not_before.timestamp()),
        not_after: to_system(cert.validity().not_after.timestamp()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{
        BasicConstraints, CertificateParams, DistinguishedName, ExtendedKeyUsagePurpose, IsCa,
        KeyPair, KeyUsagePurpose, SanType, PKCS_ECDSA_P256_SHA256,
    };

    const ID: &str = "spiffe://cluster.local/ns/books/sa/web";

    struct Ca {
        pem: String,
        issuer: rcgen::Issuer<'static, KeyPair>,
    }

    fn ca() -> Ca {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let mut p = CertificateParams::default();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign];
        let cert = p.self_signed(&key).unwrap();
        Ca {
            pem: cert.pem(),
            issuer: rcgen::Issuer::new(p, key),
        }
    }

    fn leaf(ca: &Ca, key: &KeyPair, sans: &[&str]) -> Vec<u8> {
        let mut p = CertificateParams::default();
        p.distinguished_name = DistinguishedName::new();
        p.subject_alt_names = sans
            .iter()
            .map(|s| SanType::URI((*s).try_into().unwrap()))
            .collect();
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        p.signed_by(key, &ca.issuer).unwrap().der().to_vec()
    }

    fn anchors(ca: &Ca) -> TrustAnchors {
        TrustAnchors::from_pem(Path::new("a.pem"), ca.pem.as_bytes()).unwrap()
    }

    #[test]
    fn accepts_a_chain_for_this_identity_and_key() {
        let ca = ca();
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let spki = rcgen::PublicKeyData::subject_public_key_info(&key);
        let der = leaf(&ca, &key, &[ID]);
        let v = check_chain(&der, &[], &anchors(&ca), ID, &spki, SystemTime::now()).unwrap();
        assert!(v.not_after > SystemTime::now());
    }

    #[test]
    fn refuses_other_identities_keys_and_roots() {
        let ca = ca();
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let spki = rcgen::PublicKeyData::subject_public_key_info(&key);
        let now = SystemTime::now();
        let other = "spiffe://cluster.local/ns/books/sa/db";
        let err = check_chain(
            &leaf(&ca, &key, &[other]),
            &[],
            &anchors(&ca),
            ID,
            &spki,
            now,
        );
        assert!(
            matches!(err, Err(ChainError::WrongIdentity { .. })),
            "{err:?}"
        );
        let two = leaf(&ca, &key, &[ID, other]);
        let err = check_chain(&two, &[], &anchors(&ca), ID, &spki, now);
        assert!(
            matches!(err, Err(ChainError::WrongIdentity { .. })),
            "{err:?}"
        );
        let stranger = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let err = check_chain(
            &leaf(&ca, &stranger, &[ID]),
            &[],
            &anchors(&ca),
            ID,
            &spki,
            now,
        );
        assert_eq!(err, Err(ChainError::WrongKey));
        let err = check_chain(
            &leaf(&ca, &key, &[ID]),
            &[],
            &anchors(&self::ca()),
            ID,
            &spki,
            now,
        );
        assert!(matches!(err, Err(ChainError::Untrusted { .. })), "{err:?}");
        assert!(check_chain(b"junk", &[], &anchors(&ca), ID, &spki, now).is_err());
    }

    #[test]
    fn anchor_bundle_errors_name_the_variable() {
        let p = Path::new("/etc/weft/ca.pem");
        let empty = TrustAnchors::from_pem(p, b"").unwrap_err().to_string();
        assert!(
            empty.contains("WEFT_PROXY_TRUST_ANCHORS=/etc/weft/ca.pem"),
            "{empty}"
        );
        assert!(empty.contains("no CERTIFICATE"), "{empty}");
        let junk = b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";
        let bad = TrustAnchors::from_pem(p, junk).unwrap_err().to_string();
        assert!(bad.contains("WEFT_PROXY_TRUST_ANCHORS"), "{bad}");
        let missing = TrustAnchors::load(Path::new("/nonexistent/ca.pem"))
            .unwrap_err()
            .to_string();
        assert!(missing.contains("cannot read"), "{missing}");
        let two = format!("{}{}", ca().pem, ca().pem);
        assert_eq!(TrustAnchors::from_pem(p, two.as_bytes()).unwrap().len(), 2);
    }
}

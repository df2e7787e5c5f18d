//! The certificate authority behind `Identity.Certify`.
//!
//! [`CertificateAuthority`] is the seam: the gRPC service asks it to sign
//! a leaf and never sees a key. [`Issuer`] is one validated issuer
//! (certificate + key + trust anchors) and signs in memory; [`FileCa`]
//! loads an `Issuer` from PEM files and swaps in a new one when the files
//! change, so rotating the issuer (a Secret update in kube mode) needs no
//! restart. Tests can use an `Issuer` directly or their own CA.
//!
//! Loading checks, each failure naming the file and the problem:
//! the issuer certificate file holds one or more CERTIFICATE blocks (the
//! issuer first, then any intermediates up to a root); the key file holds
//! the issuer's private key (PKCS#8 `PRIVATE KEY`, or SEC1 `EC PRIVATE KEY`
//! for P-256/P-384) and it matches the certificate; each certificate of the
//! chain is a CA, valid now, and signed by the next; the last one is a
//! trust anchor or is signed by one (the bundle may hold several roots,
//! for rotation). Finally a probe leaf is signed and verified with
//! rustls-webpki against the anchors, the way proxies will verify.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{
    CertificateParams, DistinguishedName, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose,
    SanType, SerialNumber,
};
use ring::rand::SecureRandom as _;
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, UnixTime};
use x509_parser::certificate::X509Certificate;
use x509_parser::prelude::FromDer as _;

use super::{ServiceAccount, SpiffeId, BACKDATE};

/// How often [`FileCa`] checks its files for changes by default.
pub const RELOAD_INTERVAL: Duration = Duration::from_secs(5);

/// `--issuer-cert`, `--issuer-key`, `--trust-anchors`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IssuerFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub trust_anchors: PathBuf,
}

impl IssuerFiles {
    /// The files of a directory laid out like the dev CA
    /// (`issuer.crt`, `issuer.key`, `trust-anchors.pem`; see [`super::devca`]).
    pub fn in_dir(dir: &Path) -> Self {
        IssuerFiles {
            cert: dir.join(super::devca::ISSUER_CERT),
            key: dir.join(super::devca::ISSUER_KEY),
            trust_anchors: dir.join(super::devca::TRUST_ANCHORS),
        }
    }
}

/// An issuer that cannot be loaded or a leaf that cannot be signed.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("{}: cannot read: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: {message}", path.display())]
    File { path: PathBuf, message: String },
    #[error("private key {} does not belong to the issuer certificate in {}; were the files rotated together?", key.display(), cert.display())]
    KeyMismatch { cert: PathBuf, key: PathBuf },
    #[error("issuer certificate {} ({subject}) is not signed by any trust anchor in {} (anchors: {anchors}); add its root to the bundle", cert.display(), trust_anchors.display())]
    Untrusted {
        cert: PathBuf,
        trust_anchors: PathBuf,
        subject: String,
        anchors: String,
    },
    #[error("a test leaf signed by the issuer in {} does not verify against the trust anchors in {}: {message}", cert.display(), trust_anchors.display())]
    Probe {
        cert: PathBuf,
        trust_anchors: PathBuf,
        message: String,
    },
    #[error("cannot sign the leaf certificate: {0}")]
    Sign(String),
}

/// A signed leaf and what a proxy needs with it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IssuedCertificate {
    pub leaf_der: Vec<u8>,
    /// The issuer first, then any intermediates (never the anchor).
    pub intermediates_der: Vec<Vec<u8>>,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

/// What to sign.
#[derive(Clone, Debug)]
pub struct LeafRequest<'a> {
    pub identity: &'a SpiffeId,
    /// SubjectPublicKeyInfo DER of the workload's key.
    pub spki_der: &'a [u8],
    pub lifetime: Duration,
    pub now: SystemTime,
}

/// What the CA reports to metrics.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CaStatus {
    pub issuer_subject: String,
    pub issuer_not_after: SystemTime,
    pub trust_anchors: usize,
}

/// The seam in front of the CA.
pub trait CertificateAuthority: Send + Sync + 'static {
    fn issue(&self, req: &LeafRequest<'_>) -> Result<IssuedCertificate, CaError>;
    fn status(&self) -> CaStatus;
}

/// One validated issuer.
pub struct Issuer {
    signer: rcgen::Issuer<'static, KeyPair>,
    /// Issuer certificate, then intermediates.
    chain: Vec<Vec<u8>>,
    anchors: Vec<Vec<u8>>,
    status: CaStatus,
}

impl std::fmt::Debug for Issuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Issuer")
            .field("status", &self.status)
            .finish_non_exhaustive()
    }
}

fn file_err(path: &Path, message: impl Into<String>) -> CaError {
    CaError::File {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

fn read(path: &Path) -> Result<Vec<u8>, CaError> {
    std::fs::read(path).map_err(|source| CaError::Read {
        path: path.to_path_buf(),
        source,
    })
}

fn certs_of(path: &Path, pem: &[u8], what: &str) -> Result<Vec<Vec<u8>>, CaError> {
    let certs: Vec<Vec<u8>> = CertificateDer::pem_slice_iter(pem)
        .map(|c| c.map(|c| c.to_vec()))
        .collect::<Result<_, _>>()
        .map_err(|e| file_err(path, format!("is not PEM: {e}")))?;
    if certs.is_empty() {
        return Err(file_err(
            path,
            format!("holds no CERTIFICATE block; expected {what} in PEM"),
        ));
    }
    Ok(certs)
}

fn parse_cert<'a>(path: &Path, der: &'a [u8], n: usize) -> Result<X509Certificate<'a>, CaError> {
    X509Certificate::from_der(der).map(|(_, c)| c).map_err(|e| {
        file_err(
            path,
            format!("certificate #{} is not valid X.509: {e}", n + 1),
        )
    })
}

fn unix(t: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(u64::try_from(t).unwrap_or(0))
}

fn secs(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// Wraps a SEC1 `ECPrivateKey` in PKCS#8 (ring reads only PKCS#8) for
/// the given named-curve OID (DER contents).
fn sec1_to_pkcs8(sec1: &[u8], curve_oid: &[u8]) -> Vec<u8> {
    fn tlv(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut out = vec![tag];
        let len = body.len();
        if len < 0x80 {
            out.push(len as u8);
        } else {
            let bytes: Vec<u8> = len
                .to_be_bytes()
                .into_iter()
                .skip_while(|b| *b == 0)
                .collect();
            out.push(0x80 | bytes.len() as u8);
            out.extend(bytes);
        }
        out.extend_from_slice(body);
        out
    }
    const EC_PUBLIC_KEY: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01];
    let alg = tlv(
        0x30,
        &[tlv(0x06, EC_PUBLIC_KEY), tlv(0x06, curve_oid)].concat(),
    );
    tlv(0x30, &[tlv(0x02, &[0]), alg, tlv(0x04, sec1)].concat())
}

fn load_key(path: &Path, pem: &[u8]) -> Result<KeyPair, CaError> {
    let key = PrivateKeyDer::from_pem_slice(pem).map_err(|e| {
        file_err(
            path,
            format!("holds no private key in PEM (PRIVATE KEY or EC PRIVATE KEY): {e}"),
        )
    })?;
    match &key {
        PrivateKeyDer::Pkcs8(p) => KeyPair::try_from(p)
            .map_err(|e| file_err(path, format!("PKCS#8 private key cannot be used: {e}"))),
        PrivateKeyDer::Sec1(sec1) => {
            const P256: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
            const P384: &[u8] = &[0x2b, 0x81, 0x04, 0x00, 0x22];
            [P256, P384]
                .iter()
                .find_map(|curve| {
                    let pkcs8 = sec1_to_pkcs8(sec1.secret_sec1_der(), curve);
                    KeyPair::try_from(&PrivatePkcs8KeyDer::from(pkcs8)).ok()
                })
                .ok_or_else(|| file_err(path, "EC PRIVATE KEY is not a P-256 or P-384 key"))
        }
        PrivateKeyDer::Pkcs1(_) => Err(file_err(
            path,
            "holds an RSA PRIVATE KEY (PKCS#1); convert it with `openssl pkcs8 -topk8 -nocrypt`",
        )),
        _ => Err(file_err(path, "holds an unsupported private key type")),
    }
}

impl Issuer {
    /// Loads and validates the issuer from files at `now`.
    pub fn load(files: &IssuerFiles, now: SystemTime) -> Result<Self, CaError> {
        let cert_pem = read(&files.cert)?;
        let key_pem = read(&files.key)?;
        let anchors_pem = read(&files.trust_anchors)?;
        Self::from_pem(files, &cert_pem, &key_pem, &anchors_pem, now)
    }

    /// Validates PEM contents; `files` only name them in errors.
    pub fn from_pem(
        files: &IssuerFiles,
        cert_pem: &[u8],
        key_pem: &[u8],
        anchors_pem: &[u8],
        now: SystemTime,
    ) -> Result<Self, CaError> {
        let chain = certs_of(&files.cert, cert_pem, "the issuer certificate")?;
        let anchors = certs_of(&files.trust_anchors, anchors_pem, "the trust anchors")?;
        let key = load_key(&files.key, key_pem)?;

        let parsed: Vec<X509Certificate<'_>> = chain
            .iter()
            .enumerate()
            .map(|(i, der)| parse_cert(&files.cert, der, i))
            .collect::<Result<_, _>>()?;
        let parsed_anchors: Vec<X509Certificate<'_>> = anchors
            .iter()
            .enumerate()
            .map(|(i, der)| parse_cert(&files.trust_anchors, der, i))
            .collect::<Result<_, _>>()?;
        let issuer = &parsed[0];
        if issuer.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
            return Err(CaError::KeyMismatch {
                cert: files.cert.clone(),
                key: files.key.clone(),
            });
        }
        let now_s = secs(now);
        for (i, c) in parsed.iter().enumerate() {
            let which = if i == 0 {
                format!("issuer certificate ({})", c.subject())
            } else {
                format!("certificate #{} ({})", i + 1, c.subject())
            };
            if !c.is_ca() {
                return Err(file_err(
                    &files.cert,
                    format!("{which} is not a CA (basicConstraints CA:TRUE is required to sign workload certificates)"),
                ));
            }
            if let Ok(Some(ku)) = c.key_usage() {
                if !ku.value.key_cert_sign() {
                    return Err(file_err(
                        &files.cert,
                        format!("{which} key usage does not allow keyCertSign"),
                    ));
                }
            }
            let v = c.validity();
            if now_s >= v.not_after.timestamp() {
                return Err(file_err(
                    &files.cert,
                    format!("{which} expired at {}", v.not_after),
                ));
            }
            if now_s < v.not_before.timestamp() {
                return Err(file_err(
                    &files.cert,
                    format!("{which} is not valid before {}", v.not_before),
                ));
            }
            if let Some(next) = parsed.get(i + 1) {
                if c.issuer() != next.subject()
                    || c.verify_signature(Some(next.public_key())).is_err()
                {
                    return Err(file_err(
                        &files.cert,
                        format!("{which} is not signed by the next certificate in the file ({}); order the chain issuer first, then its issuers", next.subject()),
                    ));
                }
            }
        }
        for (i, a) in parsed_anchors.iter().enumerate() {
            if !a.is_ca() {
                return Err(file_err(
                    &files.trust_anchors,
                    format!(
                        "certificate #{} ({}) is not a CA certificate",
                        i + 1,
                        a.subject()
                    ),
                ));
            }
        }
        let top_der = chain.last().map(Vec::as_slice).unwrap_or_default();
        let top = parsed.last().unwrap_or(issuer);
        let trusted = anchors.iter().any(|a| a.as_slice() == top_der)
            || parsed_anchors.iter().any(|a| {
                a.subject() == top.issuer() && top.verify_signature(Some(a.public_key())).is_ok()
            });
        if !trusted {
            return Err(CaError::Untrusted {
                cert: files.cert.clone(),
                trust_anchors: files.trust_anchors.clone(),
                subject: top.subject().to_string(),
                anchors: parsed_anchors
                    .iter()
                    .map(|a| a.subject().to_string())
                    .collect::<Vec<_>>()
                    .join("; "),
            });
        }
        let status = CaStatus {
            issuer_subject: issuer.subject().to_string(),
            issuer_not_after: unix(issuer.validity().not_after.timestamp()),
            trust_anchors: anchors.len(),
        };
        let signer =
            rcgen::Issuer::from_ca_cert_der(&CertificateDer::from(chain[0].as_slice()), key)
                .map_err(|e| {
                    file_err(
                        &files.cert,
                        format!("cannot use the issuer certificate: {e}"),
                    )
                })?;
        drop(parsed);
        drop(parsed_anchors);
        let ca = Issuer {
            signer,
            chain,
            anchors,
            status,
        };
        ca.probe(files, now)?;
        Ok(ca)
    }

    /// Signs a throwaway leaf and verifies it as a proxy would.
    fn probe(&self, files: &IssuerFiles, now: SystemTime) -> Result<(), CaError> {
        let probe_err = |message: String| CaError::Probe {
            cert: files.cert.clone(),
            trust_anchors: files.trust_anchors.clone(),
            message,
        };
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .map_err(|e| probe_err(e.to_string()))?;
        let id = SpiffeId::new("weft.probe", ServiceAccount::new("weft", "probe"));
        let spki = rcgen::PublicKeyData::subject_public_key_info(&key);
        let leaf = self
            .issue(&LeafRequest {
                identity: &id,
                spki_der: &spki,
                lifetime: Duration::from_secs(3600),
                now,
            })
            .map_err(|e| probe_err(e.to_string()))?;
        verify_leaf(&leaf.leaf_der, &leaf.intermediates_der, &self.anchors, now).map_err(probe_err)
    }

    /// DER trust anchors.
    pub fn trust_anchors(&self) -> &[Vec<u8>] {
        &self.anchors
    }
}

/// Verifies a leaf for client and server auth against DER anchors with
/// rustls-webpki (the verifier rustls, and so the proxy, uses).
pub fn verify_leaf(
    leaf: &[u8],
    intermediates: &[Vec<u8>],
    anchors: &[Vec<u8>],
    now: SystemTime,
) -> Result<(), String> {
    let anchor_ders: Vec<CertificateDer<'_>> = anchors
        .iter()
        .map(|a| CertificateDer::from(a.as_slice()))
        .collect();
    let anchors = anchor_ders
        .iter()
        .map(|a| webpki::anchor_from_trusted_cert(a).map_err(|e| format!("trust anchor: {e}")))
        .collect::<Result<Vec<_>, _>>()?;
    let inter: Vec<CertificateDer<'_>> = intermediates
        .iter()
        .map(|c| CertificateDer::from(c.as_slice()))
        .collect();
    let leaf = CertificateDer::from(leaf);
    let ee = webpki::EndEntityCert::try_from(&leaf).map_err(|e| format!("leaf: {e}"))?;
    let time = UnixTime::since_unix_epoch(now.duration_since(UNIX_EPOCH).unwrap_or_default());
    for usage in [
        webpki::KeyUsage::client_auth(),
        webpki::KeyUsage::server_auth(),
    ] {
        ee.verify_for_usage(
            webpki::ALL_VERIFICATION_ALGS,
            &anchors,
            &inter,
            time,
            usage,
            None,
            None,
        )
        .map_err(|e| format!("{e:?}"))?;
    }
    Ok(())
}

impl CertificateAuthority for Issuer {
    fn issue(&self, req: &LeafRequest<'_>) -> Result<IssuedCertificate, CaError> {
        let sign = |e: rcgen::Error| CaError::Sign(e.to_string());
        let spki = rcgen::SubjectPublicKeyInfo::from_der(req.spki_der).map_err(sign)?;
        let not_before = req.now.checked_sub(BACKDATE).unwrap_or(req.now);
        // Never outlive the issuer: such a leaf would stop verifying early.
        let not_after = (req.now + req.lifetime).min(self.status.issuer_not_after);
        let mut serial = [0u8; 16];
        ring::rand::SystemRandom::new()
            .fill(&mut serial)
            .map_err(|_| CaError::Sign("no randomness for the serial number".into()))?;
        serial[0] &= 0x7f;
        serial[0] |= 0x01;
        let mut params = CertificateParams::default();
        // An empty subject: the identity is the URI SAN (marked critical).
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = vec![SanType::URI(
            req.identity.to_string().try_into().map_err(sign)?,
        )];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        params.serial_number = Some(SerialNumber::from_slice(&serial));
        params.not_before = time::OffsetDateTime::from(not_before);
        params.not_after = time::OffsetDateTime::from(not_after);
        let cert = params.signed_by(&spki, &self.signer).map_err(sign)?;
        Ok(IssuedCertificate {
            leaf_der: cert.der().to_vec(),
            intermediates_der: self.chain.clone(),
            // Certificates hold whole seconds.
            not_before: unix(secs(not_before)),
            not_after: unix(secs(not_after)),
        })
    }

    fn status(&self) -> CaStatus {
        self.status.clone()
    }
}

/// (mtime, length) of each file: what the reload poll compares.
type Stamps = Vec<Option<(SystemTime, u64)>>;

fn stamps(files: &IssuerFiles) -> Stamps {
    [&files.cert, &files.key, &files.trust_anchors]
        .iter()
        .map(|p| {
            // metadata() follows symlinks, as in a Secret volume's ..data swap.
            std::fs::metadata(p)
                .ok()
                .and_then(|m| Some((m.modified().ok()?, m.len())))
        })
        .collect()
}

/// An [`Issuer`] read from files and replaced when they change.
pub struct FileCa {
    files: IssuerFiles,
    current: RwLock<Arc<Issuer>>,
    seen: Mutex<Stamps>,
}

impl std::fmt::Debug for FileCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileCa")
            .field("files", &self.files)
            .finish_non_exhaustive()
    }
}

/// What a reload check did.
#[derive(Debug)]
pub enum Reload {
    Unchanged,
    Reloaded,
    /// The files changed but do not validate; the previous issuer stays.
    Failed(CaError),
}

impl FileCa {
    /// Loads and validates the files; an error here should stop start-up.
    pub fn load(files: IssuerFiles) -> Result<Self, CaError> {
        let seen = stamps(&files);
        let issuer = Issuer::load(&files, SystemTime::now())?;
        Ok(FileCa {
            files,
            current: RwLock::new(Arc::new(issuer)),
            seen: Mutex::new(seen),
        })
    }

    pub fn files(&self) -> &IssuerFiles {
        &self.files
    }

    /// The issuer in use.
    pub fn current(&self) -> Arc<Issuer> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Reloads when any file's mtime or size changed since the last check.
    /// A change that does not validate (say the certificate was updated
    /// before the key) keeps the previous issuer and is retried on the
    /// next change.
    pub fn reload_if_changed(&self) -> Reload {
        let now_stamps = stamps(&self.files);
        {
            let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
            if *seen == now_stamps {
                return Reload::Unchanged;
            }
            *seen = now_stamps;
        }
        match Issuer::load(&self.files, SystemTime::now()) {
            Ok(issuer) => {
                *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(issuer);
                Reload::Reloaded
            }
            Err(e) => Reload::Failed(e),
        }
    }
}

impl CertificateAuthority for FileCa {
    fn issue(&self, req: &LeafRequest<'_>) -> Result<IssuedCertificate, CaError> {
        self.current().issue(req)
    }

    fn status(&self) -> CaStatus {
        self.current().status()
    }
}

impl<T: CertificateAuthority> CertificateAuthority for Arc<T> {
    fn issue(&self, req: &LeafRequest<'_>) -> Result<IssuedCertificate, CaError> {
        (**self).issue(req)
    }

    fn status(&self) -> CaStatus {
        (**self).status()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::devca::CaCert;
    use x509_parser::extensions::{GeneralName, ParsedExtension};

    const DAY: Duration = Duration::from_secs(86400);

    fn files() -> IssuerFiles {
        IssuerFiles {
            cert: "/s/issuer.crt".into(),
            key: "/s/issuer.key".into(),
            trust_anchors: "/s/ca.crt".into(),
        }
    }

    fn load(cert: &str, key: &str, anchors: &str, now: SystemTime) -> Result<Issuer, CaError> {
        Issuer::from_pem(
            &files(),
            cert.as_bytes(),
            key.as_bytes(),
            anchors.as_bytes(),
            now,
        )
    }

    #[test]
    fn load_errors_name_the_file_and_the_problem() {
        let now = SystemTime::now();
        let root = CaCert::root("root", now, 3650 * DAY).expect("root");
        let other_root = CaCert::root("other", now, 3650 * DAY).expect("root");
        let issuer = root.issue_ca("issuer", now, 365 * DAY).expect("issuer");
        let expired = root
            .issue_ca("old issuer", now - 10 * DAY, DAY)
            .expect("issuer");
        let other_key = other_root.key_pem();
        // A leaf (not a CA) posing as issuer.
        let leaf_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
        let leaf = CertificateParams::new(vec!["x".to_string()])
            .expect("params")
            .self_signed(&leaf_key)
            .expect("leaf");
        let ok = (
            issuer.cert_pem.as_str(),
            issuer.key_pem(),
            root.cert_pem.as_str(),
        );
        assert!(load(ok.0, &ok.1, ok.2, now).is_ok());
        // Several roots in the bundle, ours second.
        let bundle = format!("{}{}", other_root.cert_pem, root.cert_pem);
        assert_eq!(
            load(ok.0, &ok.1, &bundle, now)
                .expect("bundle")
                .status()
                .trust_anchors,
            2
        );
        // The root itself as issuer.
        assert!(load(&root.cert_pem, &root.key_pem(), &root.cert_pem, now).is_ok());
        // Issuer + an intermediate chain: root → mid → issuer.
        let mid = root
            .issue_ca_path_len("mid", now, 365 * DAY, Some(1))
            .expect("mid");
        let low = mid.issue_ca("low", now, 30 * DAY).expect("low");
        let chain = format!("{}{}", low.cert_pem, mid.cert_pem);
        let ca = load(&chain, &low.key_pem(), &root.cert_pem, now).expect("chain");
        assert_eq!(ca.chain.len(), 2);
        let reversed = format!("{}{}", mid.cert_pem, low.cert_pem);
        // Under a pathLen:0 CA, the chain is structurally fine but a proxy
        // would reject its leaves: the webpki probe says so.
        let under = issuer.issue_ca("under", now, 30 * DAY).expect("under");
        let bad_chain = format!("{}{}", under.cert_pem, issuer.cert_pem);

        let cases: Vec<(&str, String, String, String, &str)> = vec![
            ("no cert", String::new(), ok.1.clone(), ok.2.into(), "/s/issuer.crt: holds no CERTIFICATE block"),
            ("no anchors", ok.0.into(), ok.1.clone(), "junk".into(), "/s/ca.crt: holds no CERTIFICATE block"),
            ("no key", ok.0.into(), String::new(), ok.2.into(), "/s/issuer.key: holds no private key"),
            ("wrong key", ok.0.into(), other_key, ok.2.into(), "private key /s/issuer.key does not belong to the issuer certificate in /s/issuer.crt"),
            ("untrusted", ok.0.into(), ok.1.clone(), other_root.cert_pem.clone(), "is not signed by any trust anchor in /s/ca.crt (anchors: O=weft, CN=other)"),
            ("expired", expired.cert_pem.clone(), expired.key_pem(), ok.2.into(), "expired at"),
            ("not a CA", leaf.pem(), leaf_key.serialize_pem(), leaf.pem(), "is not a CA"),
            ("chain out of order", reversed, mid.key_pem(), ok.2.into(), "is not signed by the next certificate"),
            ("path length", bad_chain, under.key_pem(), ok.2.into(), "does not verify against the trust anchors in /s/ca.crt: PathLenConstraintViolated"),
        ];
        for (name, cert, key, anchors, says) in cases {
            let err = load(&cert, &key, &anchors, now)
                .expect_err(name)
                .to_string();
            assert!(err.contains(says), "{name}: {err}");
        }
        // A future issuer.
        let err = load(ok.0, &ok.1, ok.2, now - 2 * DAY)
            .expect_err("future")
            .to_string();
        assert!(err.contains("is not valid before"), "{err}");
    }

    #[test]
    fn leaf_has_the_identity_usages_and_lifetime() {
        let now = SystemTime::now();
        let root = CaCert::root("root", now, 3650 * DAY).expect("root");
        let issuer = root.issue_ca("issuer", now, 365 * DAY).expect("issuer");
        let ca = load(&issuer.cert_pem, &issuer.key_pem(), &root.cert_pem, now).expect("load");
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
        let spki = rcgen::PublicKeyData::subject_public_key_info(&key);
        let id = SpiffeId::parse("spiffe://cluster.local/ns/books/sa/web").expect("id");
        let leaf = ca
            .issue(&LeafRequest {
                identity: &id,
                spki_der: &spki,
                lifetime: DAY,
                now,
            })
            .expect("issue");
        assert_eq!(leaf.intermediates_der, vec![issuer.cert_der.clone()]);
        let (_, cert) = X509Certificate::from_der(&leaf.leaf_der).expect("parse");
        assert!(!cert.is_ca());
        assert_eq!(cert.public_key().raw, spki.as_slice());
        let v = cert.validity();
        assert_eq!(
            v.not_after.timestamp() - v.not_before.timestamp(),
            86400 + 60
        );
        assert_eq!(unix(v.not_after.timestamp()), leaf.not_after);
        let mut uris = Vec::new();
        let (mut server, mut client, mut san_critical) = (false, false, false);
        for ext in cert.extensions() {
            match ext.parsed_extension() {
                ParsedExtension::SubjectAlternativeName(san) => {
                    san_critical = ext.critical;
                    for n in &san.general_names {
                        match n {
                            GeneralName::URI(u) => uris.push(u.to_string()),
                            other => panic!("unexpected SAN {other:?}"),
                        }
                    }
                }
                ParsedExtension::ExtendedKeyUsage(eku) => {
                    server = eku.server_auth;
                    client = eku.client_auth;
                }
                _ => {}
            }
        }
        assert_eq!(uris, [id.to_string()]);
        assert!(server && client && san_critical);
        verify_leaf(
            &leaf.leaf_der,
            &leaf.intermediates_der,
            ca.trust_anchors(),
            now,
        )
        .expect("verifies");

        // A leaf never outlives its issuer.
        let short = root
            .issue_ca("short", now, 3600 * Duration::from_secs(1))
            .expect("short");
        let ca = load(&short.cert_pem, &short.key_pem(), &root.cert_pem, now).expect("load");
        let leaf = ca
            .issue(&LeafRequest {
                identity: &id,
                spki_der: &spki,
                lifetime: DAY,
                now,
            })
            .expect("issue");
        assert_eq!(leaf.not_after, ca.status().issuer_not_after);
    }

    #[test]
    fn sec1_wrapping_round_trips_through_ring() {
        // rcgen writes PKCS#8; its inner ECPrivateKey is the SEC1 key.
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
        let pkcs8 = key.serialize_der();
        let (_, info) = x509_parser::der_parser::parse_der(&pkcs8).expect("der");
        let seq = info.as_sequence().expect("seq");
        let sec1 = seq[2].as_slice().expect("octets");
        let wrapped = sec1_to_pkcs8(sec1, &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07]);
        let again = KeyPair::try_from(&PrivatePkcs8KeyDer::from(wrapped)).expect("ring reads it");
        assert_eq!(again.public_key_raw(), key.public_key_raw());
    }
}

//! A development CA for local mode (`weft-controller --dev-ca DIR`,
//! `weft-controller dev-ca DIR`). **Not for production**: the issuer key
//! and the token key sit unencrypted in DIR.
//!
//! Files in DIR (created when missing, reused when present, so a
//! restarted controller keeps the same trust and proxies keep working):
//!
//! | file | what | who reads it |
//! |---|---|---|
//! | `trust-anchors.pem` | the dev root certificate | proxies (`WEFT_PROXY_TRUST_ANCHORS`) and the controller |
//! | `issuer.crt` | the issuer certificate, signed by the root | the controller |
//! | `issuer.key` | the issuer's PKCS#8 private key (mode 0600) | the controller |
//! | `token-key` | the HMAC key of local tokens (mode 0600) | the controller, `weft-controller token` |
//!
//! The root's private key is never written: it signs the issuer once and
//! is dropped. To rotate a dev CA, delete DIR.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use base64::Engine as _;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, KeyPair, KeyUsagePurpose,
};
use ring::rand::SecureRandom as _;

pub const TRUST_ANCHORS: &str = "trust-anchors.pem";
pub const ISSUER_CERT: &str = "issuer.crt";
pub const ISSUER_KEY: &str = "issuer.key";
pub const TOKEN_KEY: &str = "token-key";

/// Dev root lifetime.
pub const ROOT_LIFETIME: Duration = Duration::from_secs(10 * 365 * 86400);
/// Dev issuer lifetime.
pub const ISSUER_LIFETIME: Duration = Duration::from_secs(365 * 86400);

#[derive(Debug, thiserror::Error)]
pub enum DevCaError {
    #[error("dev CA {}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("dev CA directory {} holds {present} but not {missing}; delete the directory to create a new dev CA", dir.display())]
    Incomplete {
        dir: PathBuf,
        present: String,
        missing: String,
    },
    #[error("cannot generate the dev CA: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("no randomness for the token key")]
    Random,
}

/// A CA certificate and its key (in memory).
#[derive(Debug)]
pub struct CaCert {
    pub cert_pem: String,
    pub cert_der: Vec<u8>,
    pub key: KeyPair,
    params: CertificateParams,
}

impl CaCert {
    /// A self-signed P-256 root named `cn`, valid from `now` for `lifetime`.
    pub fn root(cn: &str, now: SystemTime, lifetime: Duration) -> Result<Self, rcgen::Error> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let params = ca_params(cn, now, lifetime, None);
        let cert = params.self_signed(&key)?;
        Ok(CaCert {
            cert_pem: cert.pem(),
            cert_der: cert.der().to_vec(),
            key,
            params,
        })
    }

    /// A P-256 issuer named `cn` signed by this CA (pathLen 0: it signs
    /// only leaves).
    pub fn issue_ca(
        &self,
        cn: &str,
        now: SystemTime,
        lifetime: Duration,
    ) -> Result<Self, rcgen::Error> {
        self.issue_ca_path_len(cn, now, lifetime, Some(0))
    }

    /// A P-256 CA named `cn` signed by this CA, with the given pathLen
    /// constraint (`None`: unconstrained).
    pub fn issue_ca_path_len(
        &self,
        cn: &str,
        now: SystemTime,
        lifetime: Duration,
        path_len: Option<u8>,
    ) -> Result<Self, rcgen::Error> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let params = ca_params(cn, now, lifetime, path_len);
        let issuer = rcgen::Issuer::from_params(&self.params, &self.key);
        let cert = params.signed_by(&key, &issuer)?;
        Ok(CaCert {
            cert_pem: cert.pem(),
            cert_der: cert.der().to_vec(),
            key,
            params,
        })
    }

    /// The private key, PKCS#8 PEM.
    pub fn key_pem(&self) -> String {
        self.key.serialize_pem()
    }
}

fn ca_params(
    cn: &str,
    now: SystemTime,
    lifetime: Duration,
    path_len: Option<u8>,
) -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "weft");
    dn.push(DnType::CommonName, cn);
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(match path_len {
        Some(n) => BasicConstraints::Constrained(n),
        None => BasicConstraints::Unconstrained,
    });
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.not_before = time::OffsetDateTime::from(now - Duration::from_secs(60));
    params.not_after = time::OffsetDateTime::from(now + lifetime);
    params
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> DevCaError + '_ {
    move |source| DevCaError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Writes atomically (temp file + rename); `secret` files get mode 0600.
fn write_file(path: &Path, contents: &[u8], secret: bool) -> Result<(), DevCaError> {
    let tmp = path.with_extension("tmp");
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        opts.mode(if secret { 0o600 } else { 0o644 });
    }
    let mut f = opts.open(&tmp).map_err(io(&tmp))?;
    f.write_all(contents).map_err(io(&tmp))?;
    f.sync_all().map_err(io(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io(path))
}

/// What [`ensure`] did.
#[derive(Debug, PartialEq, Eq)]
pub enum Created {
    /// A new root and issuer were written.
    New,
    /// The CA existed; only missing non-CA files (the token key) were added.
    Existing,
}

/// Creates the dev CA in `dir` unless it exists. Idempotent, and safe
/// when several processes call it at once (a controller starting with
/// `--dev-ca` and `weft-controller token --dev-ca`): creation happens under
/// an exclusive `DIR/.lock` file.
pub fn ensure(dir: &Path) -> Result<Created, DevCaError> {
    let all = [TRUST_ANCHORS, ISSUER_CERT, ISSUER_KEY, TOKEN_KEY];
    if all.iter().all(|f| dir.join(f).exists()) {
        return Ok(Created::Existing);
    }
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let _lock = Lock::acquire(&dir.join(".lock"))?;
    create_missing(dir)
}

/// An exclusive lock file, removed on drop.
struct Lock(PathBuf);

impl Lock {
    fn acquire(path: &Path) -> Result<Self, DevCaError> {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            match std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(path)
            {
                Ok(_) => return Ok(Lock(path.to_path_buf())),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    if std::time::Instant::now() > deadline {
                        return Err(DevCaError::Io {
                            path: path.to_path_buf(),
                            source: std::io::Error::other(
                                "held for over 10 s; if no weft-controller is creating the dev CA, remove it",
                            ),
                        });
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => return Err(io(path)(e)),
            }
        }
    }
}

impl Drop for Lock {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn create_missing(dir: &Path) -> Result<Created, DevCaError> {
    let ca_files = [TRUST_ANCHORS, ISSUER_CERT, ISSUER_KEY];
    let (present, missing): (Vec<&str>, Vec<&str>) =
        ca_files.iter().partition(|f| dir.join(f).exists());
    let created = if missing.is_empty() {
        Created::Existing
    } else if present.is_empty() {
        let now = SystemTime::now();
        let root = CaCert::root("weft dev root", now, ROOT_LIFETIME)?;
        let issuer = root.issue_ca("weft dev issuer", now, ISSUER_LIFETIME)?;
        write_file(&dir.join(ISSUER_KEY), issuer.key_pem().as_bytes(), true)?;
        write_file(&dir.join(ISSUER_CERT), issuer.cert_pem.as_bytes(), false)?;
        write_file(&dir.join(TRUST_ANCHORS), root.cert_pem.as_bytes(), false)?;
        tracing::info!(dir = %dir.display(), "created a development CA (dev only: keys are unencrypted)");
        Created::New
    } else {
        return Err(DevCaError::Incomplete {
            dir: dir.to_path_buf(),
            present: present.join(", "),
            missing: missing.join(", "),
        });
    };
    let token_key = dir.join(TOKEN_KEY);
    if !token_key.exists() {
        let mut key = [0u8; 32];
        ring::rand::SystemRandom::new()
            .fill(&mut key)
            .map_err(|_| DevCaError::Random)?;
        let text = format!(
            "{}\n",
            base64::engine::general_purpose::STANDARD.encode(key)
        );
        write_file(&token_key, text.as_bytes(), true)?;
    }
    Ok(created)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::ca::{Issuer, IssuerFiles};

    #[test]
    fn concurrent_callers_share_one_ca() {
        let dir = std::env::temp_dir().join(format!("weft-devca-race-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let results: Vec<Created> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..8)
                .map(|_| s.spawn(|| ensure(&dir).expect("ensure")))
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("join"))
                .collect()
        });
        assert_eq!(results.iter().filter(|c| **c == Created::New).count(), 1);
        Issuer::load(&IssuerFiles::in_dir(&dir), SystemTime::now()).expect("load");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn creates_once_and_loads() {
        let dir = std::env::temp_dir().join(format!(
            "weft-devca-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(ensure(&dir).expect("create"), Created::New);
        let anchors = std::fs::read(dir.join(TRUST_ANCHORS)).expect("anchors");
        assert_eq!(ensure(&dir).expect("again"), Created::Existing);
        assert_eq!(
            std::fs::read(dir.join(TRUST_ANCHORS)).expect("anchors"),
            anchors
        );
        let issuer = Issuer::load(&IssuerFiles::in_dir(&dir), SystemTime::now()).expect("load");
        assert_eq!(issuer.trust_anchors().len(), 1);
        // No root key anywhere in DIR.
        let mut names: Vec<String> = std::fs::read_dir(&dir)
            .expect("ls")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, [ISSUER_CERT, ISSUER_KEY, TOKEN_KEY, TRUST_ANCHORS]);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = std::fs::metadata(dir.join(ISSUER_KEY))
                .expect("meta")
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        std::fs::remove_file(dir.join(ISSUER_KEY)).expect("rm");
        let err = ensure(&dir).expect_err("incomplete").to_string();
        assert!(err.contains("not issuer.key"), "{err}");
        assert!(!dir.join(".lock").exists());
        let _ = std::fs::remove_dir_all(&dir);
    }
}

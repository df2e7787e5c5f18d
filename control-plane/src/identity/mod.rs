//! The identity service's domain: who a workload is, how it proves it, and
//! the CA that turns a proof plus a CSR into a leaf certificate.
//!
//! ```text
//!  CertifyRequest{identity, token, csr}
//!     │ decide::check_request   (pure) identity string + CSR → SpiffeId, key
//!     ▼
//!  token::TokenVerifier         kube: TokenReview │ local: controller-signed token
//!     │                         → ServiceAccount + the pod the token is bound to
//!     │ decide::authorize       (pure) token's ServiceAccount == identity's
//!     ▼
//!  rate::IssuanceLimits         (pure, clock passed in) per-pod token bucket,
//!     │                         then the controller-wide ceiling
//!     ▼
//!  ca::CertificateAuthority     the seam: FileCa (issuer files, reloaded) │ test CAs
//! ```
//!
//! - [`decide`]: the pure decision functions and the [`decide::Refusal`]
//!   each failure maps to (gRPC status + bounded metric label).
//! - [`csr`]: PKCS#10 parsing and the checks a CSR must pass.
//! - [`token`]: the [`token::TokenVerifier`] seam, Kubernetes TokenReview
//!   and local HMAC-signed tokens, and the pod a token is bound to.
//! - [`ca`]: issuer + trust anchors from PEM files, validated at load,
//!   reloaded on change; [`ca::CertificateAuthority`] is the seam.
//! - [`devca`]: a development root and issuer for local mode.
//! - [`rate`]: the issuance limits: a token bucket per pod and a
//!   controller-wide ceiling.
//!
//! The gRPC service that strings these together is
//! [`crate::grpc::identity::IdentityService`].

pub mod ca;
pub mod csr;
pub mod decide;
pub mod devca;
pub mod rate;
pub mod token;

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

/// The audience the identity service accepts tokens for, in both modes
/// (TokenReview `spec.audiences`, local token `aud`).
pub const TOKEN_AUDIENCE: &str = "identity.weft.dev";

/// Default leaf lifetime (DESIGN.md: 24 h).
pub const DEFAULT_CERT_LIFETIME: Duration = Duration::from_secs(24 * 3600);

/// Leaves start this long before "now", for clocks that lag the controller's.
pub const BACKDATE: Duration = Duration::from_secs(60);

/// A Kubernetes ServiceAccount: what a token proves (with, for a
/// pod-bound token, the pod: [`token::Authenticated`]).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceAccount {
    pub namespace: String,
    pub name: String,
}

impl ServiceAccount {
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        ServiceAccount {
            namespace: namespace.into(),
            name: name.into(),
        }
    }

    /// `system:serviceaccount:<ns>:<sa>`, the username Kubernetes gives it.
    pub fn username(&self) -> String {
        format!("system:serviceaccount:{}:{}", self.namespace, self.name)
    }
}

impl fmt::Display for ServiceAccount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// A workload identity: `spiffe://<trust-domain>/ns/<ns>/sa/<sa>`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    pub trust_domain: String,
    pub service_account: ServiceAccount,
}

impl SpiffeId {
    pub fn new(trust_domain: impl Into<String>, sa: ServiceAccount) -> Self {
        SpiffeId {
            trust_domain: trust_domain.into(),
            service_account: sa,
        }
    }

    /// Parses `spiffe://<td>/ns/<ns>/sa/<sa>`; the error says which part is
    /// wrong. Namespace and ServiceAccount must be DNS labels / subdomains
    /// as Kubernetes requires, so no identity can smuggle a `/`.
    pub fn parse(s: &str) -> Result<Self, String> {
        let rest = s
            .strip_prefix("spiffe://")
            .ok_or_else(|| format!("identity {s:?} does not start with spiffe://"))?;
        let parts: Vec<&str> = rest.split('/').collect();
        match parts.as_slice() {
            [td, "ns", ns, "sa", sa] => {
                if !is_trust_domain(td) {
                    return Err(format!(
                        "identity {s:?}: trust domain {td:?} is not a lowercase DNS name"
                    ));
                }
                if !is_dns_label(ns) {
                    return Err(format!(
                        "identity {s:?}: namespace {ns:?} is not a DNS label"
                    ));
                }
                if !is_dns_subdomain(sa) {
                    return Err(format!(
                        "identity {s:?}: service account {sa:?} is not a DNS subdomain name"
                    ));
                }
                Ok(SpiffeId::new(*td, ServiceAccount::new(*ns, *sa)))
            }
            _ => Err(format!(
                "identity {s:?} is not of the form spiffe://<trust-domain>/ns/<namespace>/sa/<serviceaccount>"
            )),
        }
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "spiffe://{}/ns/{}/sa/{}",
            self.trust_domain, self.service_account.namespace, self.service_account.name
        )
    }
}

fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

fn is_dns_subdomain(s: &str) -> bool {
    s.len() <= 253 && s.split('.').all(is_dns_label)
}

fn is_trust_domain(s: &str) -> bool {
    // SPIFFE: lowercase letters, digits, '.', '-', '_'.
    !s.is_empty()
        && s.len() <= 255
        && s.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'_')
        })
}

/// Where the issuer comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum IssuerSource {
    /// PEM files, reloaded when they change (a mounted Secret in kube mode).
    Files(ca::IssuerFiles),
    /// `--dev-ca DIR`: created on first start, then read like `Files`.
    DevCa(PathBuf),
}

/// How tokens are checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TokenMode {
    /// Kubernetes TokenReview (kube mode).
    TokenReview,
    /// Controller-signed tokens; the HMAC key file (local mode).
    Local(PathBuf),
}

/// Everything the identity service needs; `None` in the runtime config
/// means the controller serves no certificates (Certify → UNIMPLEMENTED).
#[derive(Clone, Debug, PartialEq)]
pub struct IdentityConfig {
    pub issuer: IssuerSource,
    /// `None`: TokenReview with the kube source, and the dev CA's token key
    /// (if any) with the directory source.
    pub tokens: Option<TokenMode>,
    pub cert_lifetime: Duration,
    /// The per-pod bucket.
    pub rate: rate::RateConfig,
    /// The controller-wide ceiling.
    pub ceiling: rate::CeilingConfig,
    /// How often the issuer files are checked for changes.
    pub reload_interval: Duration,
}

impl IdentityConfig {
    pub fn new(issuer: IssuerSource) -> Self {
        IdentityConfig {
            issuer,
            tokens: None,
            cert_lifetime: DEFAULT_CERT_LIFETIME,
            rate: rate::RateConfig::default(),
            ceiling: rate::CeilingConfig::default(),
            reload_interval: ca::RELOAD_INTERVAL,
        }
    }
}

/// Parses `90s`, `10m`, `24h`, `500ms`, `7d` (one number, one unit).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(|| format!("{s:?} has no unit; expected e.g. 24h, 10m, 30s, 500ms"))?;
    let (n, unit) = s.split_at(split);
    let n: u64 = n
        .parse()
        .map_err(|_| format!("{s:?} does not start with a number; expected e.g. 24h"))?;
    let secs = |k: u64| {
        n.checked_mul(k)
            .map(Duration::from_secs)
            .ok_or_else(|| format!("{s:?} is too long"))
    };
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" => secs(1),
        "m" => secs(60),
        "h" => secs(3600),
        "d" => secs(86400),
        _ => Err(format!(
            "{s:?} has unknown unit {unit:?}; expected ms, s, m, h or d"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_spiffe_ids() {
        let id = SpiffeId::parse("spiffe://cluster.local/ns/books/sa/web").expect("valid");
        assert_eq!(id.trust_domain, "cluster.local");
        assert_eq!(id.service_account, ServiceAccount::new("books", "web"));
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/books/sa/web");
        for (bad, says) in [
            ("https://cluster.local/ns/a/sa/b", "spiffe://"),
            ("spiffe://cluster.local/ns/a", "of the form"),
            ("spiffe://cluster.local/ns/a/sa/b/c", "of the form"),
            ("spiffe://Cluster.local/ns/a/sa/b", "trust domain"),
            ("spiffe:///ns/a/sa/b", "trust domain"),
            ("spiffe://cluster.local/ns/A/sa/b", "namespace"),
            ("spiffe://cluster.local/ns//sa/b", "namespace"),
            ("spiffe://cluster.local/ns/a/sa/b..c", "service account"),
            ("spiffe://cluster.local/ns/a/sa/-b", "service account"),
        ] {
            let err = SpiffeId::parse(bad).expect_err(bad);
            assert!(err.contains(says), "{bad}: {err}");
        }
    }

    #[test]
    fn parses_durations() {
        assert_eq!(parse_duration("24h"), Ok(Duration::from_secs(86400)));
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2d"), Ok(Duration::from_secs(172800)));
        for bad in ["", "h", "10", "10y", "-1h", "99999999999999999999d"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }
}

//! The pure decisions of `Identity.Certify`: is the request well formed,
//! and does the authenticated ServiceAccount match what is asked for.
//! Every failure is a [`Refusal`]: a gRPC code, a bounded metric label and
//! a message that names what was wrong.

use super::csr::{self, CsrError};
use super::token::TokenError;
use super::{ServiceAccount, SpiffeId};

/// Why a Certify call was refused (or failed).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RefusalKind {
    /// Malformed identity or CSR, wrong key type: `INVALID_ARGUMENT`.
    InvalidRequest,
    /// Missing, malformed, expired, wrong-audience token: `UNAUTHENTICATED`.
    Unauthenticated,
    /// The token or the CSR names another identity: `PERMISSION_DENIED`.
    PermissionDenied,
    /// A rate limit (the pod's own bucket or the controller-wide ceiling;
    /// which one is in the message and in
    /// `weft_controller_identity_certify_rate_limited_total{limit}`):
    /// `RESOURCE_EXHAUSTED`.
    RateLimited,
    /// The token could not be checked (TokenReview failed): `UNAVAILABLE`.
    Unavailable,
    /// No issuer is configured: `UNIMPLEMENTED`.
    NotConfigured,
    /// Signing failed: `INTERNAL`.
    Internal,
}

impl RefusalKind {
    /// The `result` label of `weft_controller_identity_certify_total`.
    pub fn label(self) -> &'static str {
        match self {
            RefusalKind::InvalidRequest => "invalid_request",
            RefusalKind::Unauthenticated => "unauthenticated",
            RefusalKind::PermissionDenied => "permission_denied",
            RefusalKind::RateLimited => "rate_limited",
            RefusalKind::Unavailable => "unavailable",
            RefusalKind::NotConfigured => "not_configured",
            RefusalKind::Internal => "error",
        }
    }

    pub fn code(self) -> tonic::Code {
        match self {
            RefusalKind::InvalidRequest => tonic::Code::InvalidArgument,
            RefusalKind::Unauthenticated => tonic::Code::Unauthenticated,
            RefusalKind::PermissionDenied => tonic::Code::PermissionDenied,
            RefusalKind::RateLimited => tonic::Code::ResourceExhausted,
            RefusalKind::Unavailable => tonic::Code::Unavailable,
            RefusalKind::NotConfigured => tonic::Code::Unimplemented,
            RefusalKind::Internal => tonic::Code::Internal,
        }
    }
}

/// A refused Certify call.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct Refusal {
    pub kind: RefusalKind,
    pub message: String,
}

impl Refusal {
    pub fn new(kind: RefusalKind, message: impl Into<String>) -> Self {
        Refusal {
            kind,
            message: message.into(),
        }
    }

    pub fn to_status(&self) -> tonic::Status {
        tonic::Status::new(self.kind.code(), self.message.clone())
    }
}

impl From<CsrError> for Refusal {
    fn from(e: CsrError) -> Self {
        Refusal::new(RefusalKind::InvalidRequest, e.to_string())
    }
}

impl From<TokenError> for Refusal {
    fn from(e: TokenError) -> Self {
        let kind = if e.is_unavailable() {
            RefusalKind::Unavailable
        } else {
            RefusalKind::Unauthenticated
        };
        Refusal::new(kind, e.to_string())
    }
}

/// A well-formed request for an identity of this trust domain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckedRequest {
    pub identity: SpiffeId,
    /// The CSR's public key (SubjectPublicKeyInfo DER, ECDSA P-256).
    pub spki_der: Vec<u8>,
}

/// Checks everything that does not need the token: the identity is a
/// SPIFFE ID of `trust_domain`, and the CSR is valid and asks for exactly
/// that identity (one URI SAN, nothing else).
pub fn check_request(
    trust_domain: &str,
    identity: &str,
    csr_der: &[u8],
) -> Result<CheckedRequest, Refusal> {
    let id = SpiffeId::parse(identity).map_err(|e| Refusal::new(RefusalKind::InvalidRequest, e))?;
    if id.trust_domain != trust_domain {
        return Err(Refusal::new(
            RefusalKind::PermissionDenied,
            format!(
                "identity {id} is in trust domain {:?}; this controller issues for {trust_domain:?}",
                id.trust_domain
            ),
        ));
    }
    let csr = csr::parse(csr_der)?;
    if !csr.other_sans.is_empty() {
        return Err(Refusal::new(
            RefusalKind::PermissionDenied,
            format!(
                "certificate signing request asks for names other than {id}: {}; request only the URI SAN",
                csr.other_sans.join(", ")
            ),
        ));
    }
    match csr.uris.as_slice() {
        [one] if one == identity => {}
        [] => {
            return Err(Refusal::new(
                RefusalKind::InvalidRequest,
                format!("certificate signing request has no URI subject alternative name; expected exactly {id}"),
            ))
        }
        [one] => {
            return Err(Refusal::new(
                RefusalKind::PermissionDenied,
                format!("certificate signing request is for {one}, but the request is for identity {id}"),
            ))
        }
        many => {
            return Err(Refusal::new(
                RefusalKind::PermissionDenied,
                format!(
                    "certificate signing request asks for {} URIs ({}); expected exactly {id}",
                    many.len(),
                    many.join(", ")
                ),
            ))
        }
    }
    Ok(CheckedRequest {
        identity: id,
        spki_der: csr.spki_der,
    })
}

/// The token proved `authenticated`; the request is for `requested`.
pub fn authorize(requested: &SpiffeId, authenticated: &ServiceAccount) -> Result<(), Refusal> {
    if &requested.service_account == authenticated {
        Ok(())
    } else {
        Err(Refusal::new(
            RefusalKind::PermissionDenied,
            format!(
                "the token belongs to service account {authenticated}, not {}: a workload can only get a certificate for its own service account",
                requested.service_account
            ),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::csr::tests::{csr_with, uri};
    use rcgen::SanType;

    const ID: &str = "spiffe://cluster.local/ns/books/sa/web";

    /// (name, identity, CSR, expected refusal)
    type Case = (
        &'static str,
        &'static str,
        Vec<u8>,
        Option<(RefusalKind, &'static str)>,
    );

    #[test]
    fn check_request_table() {
        let p256 = &rcgen::PKCS_ECDSA_P256_SHA256;
        let dns = |s: &str| SanType::DnsName(s.try_into().expect("ia5"));
        let cases: Vec<Case> = vec![
            ("valid", ID, csr_with(p256, vec![uri(ID)]), None),
            (
                "identity not spiffe",
                "books/web",
                csr_with(p256, vec![uri(ID)]),
                Some((RefusalKind::InvalidRequest, "does not start with spiffe://")),
            ),
            (
                "other trust domain",
                "spiffe://evil.org/ns/books/sa/web",
                csr_with(p256, vec![uri("spiffe://evil.org/ns/books/sa/web")]),
                Some((RefusalKind::PermissionDenied, "trust domain \"evil.org\"")),
            ),
            (
                "csr for another identity",
                ID,
                csr_with(p256, vec![uri("spiffe://cluster.local/ns/books/sa/admin")]),
                Some((
                    RefusalKind::PermissionDenied,
                    "is for spiffe://cluster.local/ns/books/sa/admin",
                )),
            ),
            (
                "csr without san",
                ID,
                csr_with(p256, vec![]),
                Some((
                    RefusalKind::InvalidRequest,
                    "no URI subject alternative name",
                )),
            ),
            (
                "csr with extra dns san",
                ID,
                csr_with(p256, vec![uri(ID), dns("web.books.svc")]),
                Some((RefusalKind::PermissionDenied, "DNS:web.books.svc")),
            ),
            (
                "csr with two uris",
                ID,
                csr_with(p256, vec![uri(ID), uri("spiffe://cluster.local/ns/x/sa/y")]),
                Some((RefusalKind::PermissionDenied, "asks for 2 URIs")),
            ),
            (
                "p384 key",
                ID,
                csr_with(&rcgen::PKCS_ECDSA_P384_SHA384, vec![uri(ID)]),
                Some((RefusalKind::InvalidRequest, "expected an ECDSA P-256 key")),
            ),
            (
                "malformed csr",
                ID,
                b"not a csr".to_vec(),
                Some((RefusalKind::InvalidRequest, "not DER-encoded")),
            ),
        ];
        for (name, identity, csr, want) in cases {
            let got = check_request("cluster.local", identity, &csr);
            match (got, want) {
                (Ok(c), None) => assert_eq!(c.identity.to_string(), identity, "{name}"),
                (Err(r), Some((kind, says))) => {
                    assert_eq!(r.kind, kind, "{name}: {r}");
                    assert!(r.message.contains(says), "{name}: {r}");
                }
                (got, want) => panic!("{name}: got {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn authorize_table() {
        let id = SpiffeId::parse(ID).expect("id");
        let cases = [
            (ServiceAccount::new("books", "web"), true),
            (ServiceAccount::new("books", "admin"), false),
            (ServiceAccount::new("shop", "web"), false),
        ];
        for (sa, ok) in cases {
            let got = authorize(&id, &sa);
            assert_eq!(got.is_ok(), ok, "{sa}: {got:?}");
            if let Err(r) = got {
                assert_eq!(r.kind, RefusalKind::PermissionDenied);
                assert!(r.message.contains(&format!("service account {sa}")), "{r}");
            }
        }
    }

    #[test]
    fn kinds_map_to_grpc_codes_and_bounded_labels() {
        use RefusalKind::*;
        let all = [
            InvalidRequest,
            Unauthenticated,
            PermissionDenied,
            RateLimited,
            Unavailable,
            NotConfigured,
            Internal,
        ];
        let labels: std::collections::BTreeSet<_> = all.iter().map(|k| k.label()).collect();
        assert_eq!(labels.len(), all.len());
        assert_eq!(RateLimited.code(), tonic::Code::ResourceExhausted);
        assert_eq!(Unauthenticated.code(), tonic::Code::Unauthenticated);
    }
}

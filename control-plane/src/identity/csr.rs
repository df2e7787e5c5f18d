//! PKCS#10 certificate signing requests: parse one and say exactly what is
//! wrong with it. Pure (no I/O, no clock).
//!
//! Only two things are taken from a CSR: its public key (which must be
//! ECDSA P-256, DESIGN.md's workload key) and its requested subject
//! alternative names (which the caller compares with the identity). The
//! subject and any other requested extension are ignored rather than
//! refused, so a proxy built on a library that adds, say, a key-usage
//! request still works; the leaf's extensions are always the CA's choice.

use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::oid_registry::{OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY};
use x509_parser::prelude::FromDer as _;

/// What a valid CSR asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Csr {
    /// The SubjectPublicKeyInfo, DER (an ECDSA P-256 key).
    pub spki_der: Vec<u8>,
    /// URI subject alternative names, in order.
    pub uris: Vec<String>,
    /// Every other requested SAN, rendered for error messages
    /// (`DNS:x`, `IP:..`, `email:..`, ...).
    pub other_sans: Vec<String>,
}

/// Why a CSR cannot be used; each message names the part to fix.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CsrError {
    #[error("certificate signing request is empty")]
    Empty,
    #[error("certificate signing request is not DER-encoded PKCS#10: {0}")]
    Malformed(String),
    #[error("certificate signing request has {0} trailing bytes after the DER structure")]
    Trailing(usize),
    #[error("certificate signing request signature does not verify with its own public key: {0}")]
    BadSignature(String),
    #[error("certificate signing request key is {0}; expected an ECDSA P-256 key")]
    KeyType(String),
    #[error("certificate signing request has a malformed subject alternative name extension: {0}")]
    BadSan(String),
}

/// Parses and checks a DER CSR: well-formed, self-signature valid, ECDSA
/// P-256 key, readable SANs.
pub fn parse(der: &[u8]) -> Result<Csr, CsrError> {
    if der.is_empty() {
        return Err(CsrError::Empty);
    }
    let (rest, csr) =
        X509CertificationRequest::from_der(der).map_err(|e| CsrError::Malformed(e.to_string()))?;
    if !rest.is_empty() {
        return Err(CsrError::Trailing(rest.len()));
    }
    let info = &csr.certification_request_info;
    let alg = &info.subject_pki.algorithm;
    if alg.algorithm != OID_KEY_TYPE_EC_PUBLIC_KEY {
        return Err(CsrError::KeyType(key_name(&alg.algorithm.to_id_string())));
    }
    let curve = alg
        .parameters
        .as_ref()
        .and_then(|p| p.as_oid().ok())
        .map(|o| o.to_id_string());
    if curve.as_deref() != Some(&OID_EC_P256.to_id_string()) {
        return Err(CsrError::KeyType(format!(
            "ECDSA on curve {}",
            curve.as_deref().map_or("(none)".into(), curve_name)
        )));
    }
    csr.verify_signature()
        .map_err(|e| CsrError::BadSignature(e.to_string()))?;

    let mut uris = Vec::new();
    let mut other_sans = Vec::new();
    for ext in csr.requested_extensions().into_iter().flatten() {
        match ext {
            ParsedExtension::SubjectAlternativeName(san) => {
                for name in &san.general_names {
                    match name {
                        GeneralName::URI(u) => uris.push((*u).to_string()),
                        GeneralName::DNSName(d) => other_sans.push(format!("DNS:{d}")),
                        GeneralName::RFC822Name(e) => other_sans.push(format!("email:{e}")),
                        GeneralName::IPAddress(ip) => other_sans.push(format!("IP:{ip:02x?}")),
                        other => other_sans.push(format!("{other:?}")),
                    }
                }
            }
            ParsedExtension::ParseError { error } => {
                return Err(CsrError::BadSan(error.to_string()));
            }
            _ => {}
        }
    }
    Ok(Csr {
        spki_der: info.subject_pki.raw.to_vec(),
        uris,
        other_sans,
    })
}

fn key_name(oid: &str) -> String {
    match oid {
        "1.2.840.113549.1.1.1" => "RSA".into(),
        "1.3.101.112" => "Ed25519".into(),
        "1.3.101.113" => "Ed448".into(),
        other => format!("of algorithm {other}"),
    }
}

fn curve_name(oid: &str) -> String {
    match oid {
        "1.3.132.0.34" => "P-384 (secp384r1)".into(),
        "1.3.132.0.35" => "P-521 (secp521r1)".into(),
        "1.3.132.0.10" => "secp256k1".into(),
        other => other.into(),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use rcgen::{CertificateParams, DistinguishedName, KeyPair, SanType};

    /// A CSR with the given SANs over a fresh key of `alg`.
    pub(crate) fn csr_with(alg: &'static rcgen::SignatureAlgorithm, sans: Vec<SanType>) -> Vec<u8> {
        let key = KeyPair::generate_for(alg).expect("keygen");
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = sans;
        params.serialize_request(&key).expect("csr").der().to_vec()
    }

    pub(crate) fn uri(s: &str) -> SanType {
        SanType::URI(s.try_into().expect("ia5"))
    }

    #[test]
    fn reads_key_and_sans() {
        let der = csr_with(
            &rcgen::PKCS_ECDSA_P256_SHA256,
            vec![
                uri("spiffe://td/ns/a/sa/b"),
                SanType::DnsName("x.example".try_into().expect("ia5")),
            ],
        );
        let csr = parse(&der).expect("valid");
        assert_eq!(csr.uris, ["spiffe://td/ns/a/sa/b"]);
        assert_eq!(csr.other_sans, ["DNS:x.example"]);
        assert!(!csr.spki_der.is_empty());
    }

    #[test]
    fn refuses_bad_csrs_naming_the_problem() {
        let good = csr_with(
            &rcgen::PKCS_ECDSA_P256_SHA256,
            vec![uri("spiffe://td/ns/a/sa/b")],
        );
        let mut trailing = good.clone();
        trailing.push(0);
        // Flip a bit inside the signature (the last bytes).
        let mut bad_sig = good.clone();
        let last = bad_sig.len() - 3;
        bad_sig[last] ^= 1;
        let p384 = csr_with(&rcgen::PKCS_ECDSA_P384_SHA384, vec![]);
        let ed = csr_with(&rcgen::PKCS_ED25519, vec![]);
        let cases: Vec<(&str, Vec<u8>, &str)> = vec![
            ("empty", vec![], "is empty"),
            ("garbage", b"hello".to_vec(), "not DER-encoded PKCS#10"),
            (
                "pem not der",
                b"-----BEGIN CERTIFICATE REQUEST-----".to_vec(),
                "not DER",
            ),
            ("truncated", good[..good.len() / 2].to_vec(), "not DER"),
            ("trailing", trailing, "trailing bytes"),
            ("signature", bad_sig, "signature does not verify"),
            ("p384", p384, "curve P-384"),
            ("ed25519", ed, "key is Ed25519"),
        ];
        for (name, der, says) in cases {
            let err = parse(&der).expect_err(name).to_string();
            assert!(err.contains(says), "{name}: {err}");
        }
    }

    proptest::proptest! {
        #[test]
        fn parser_never_panics(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..600)) {
            let _ = parse(&bytes);
        }
    }
}

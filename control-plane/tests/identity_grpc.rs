//! `Identity.Certify` as a proxy sees it: a running controller on
//! loopback, the generated tonic client, real CSRs; certificates checked
//! with `openssl` and with the verifier the proxy uses
//! (`rustls::server::WebPkiClientVerifier`).
#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use common::{eventually, TempDir};
use rcgen::{CertificateParams, DistinguishedName, KeyPair, SanType};
use rustls::pki_types::{CertificateDer, UnixTime};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use weft_controller::identity::ca::{Issuer, IssuerFiles};
use weft_controller::identity::devca::{self, CaCert};
use weft_controller::identity::rate::{CeilingConfig, RateConfig};
use weft_controller::identity::token::{LocalTokens, PodBinding};
use weft_controller::identity::{IdentityConfig, IssuerSource, ServiceAccount, TokenMode};
use weft_controller::runtime::{Config, Controller};
use weft_controller::source::SourceConfig;
use weft_controller::testing::fake_apiserver::FakeApiServer;
use weft_proto::identity::identity_client::IdentityClient;
use weft_proto::identity::{CertifyRequest, CertifyResponse};

const WEB: &str = "spiffe://cluster.local/ns/books/sa/web";
const ADMIN: &str = "spiffe://cluster.local/ns/books/sa/admin";
const WITHIN: Duration = Duration::from_secs(10);

type Client = IdentityClient<tonic::transport::Channel>;

fn csr_for(alg: &'static rcgen::SignatureAlgorithm, uris: &[&str]) -> Vec<u8> {
    let key = KeyPair::generate_for(alg).unwrap();
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = uris
        .iter()
        .map(|u| SanType::URI((*u).try_into().unwrap()))
        .collect();
    params.serialize_request(&key).unwrap().der().to_vec()
}

fn p256_csr(uri: &str) -> Vec<u8> {
    csr_for(&rcgen::PKCS_ECDSA_P256_SHA256, &[uri])
}

fn req(identity: &str, token: &str, csr: Vec<u8>) -> CertifyRequest {
    CertifyRequest {
        identity: identity.into(),
        token: token.as_bytes().to_vec(),
        certificate_signing_request: csr,
    }
}

async fn client(c: &Controller) -> Client {
    IdentityClient::connect(format!("http://{}", c.identity_addr))
        .await
        .unwrap()
}

async fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

/// A controller in local mode with a dev CA in `dir/ca`.
async fn local_controller(dir: &TempDir, rate: RateConfig) -> Controller {
    local_controller_with_ceiling(dir, rate, CeilingConfig::default()).await
}

/// [`local_controller`] with a controller-wide ceiling.
async fn local_controller_with_ceiling(
    dir: &TempDir,
    rate: RateConfig,
    ceiling: CeilingConfig,
) -> Controller {
    let manifests = dir.path().join("manifests");
    std::fs::create_dir_all(&manifests).unwrap();
    let mut config = Config::loopback(SourceConfig::Dir(manifests));
    let mut identity = IdentityConfig::new(IssuerSource::DevCa(dir.path().join("ca")));
    identity.rate = rate;
    identity.ceiling = ceiling;
    config.identity = Some(identity);
    Controller::start(config).await.unwrap()
}

/// A controller in kube mode against `fake`, its issuer a dev CA in
/// `dir/secret` (returned: where the trust anchors are).
async fn kube_controller(
    fake: &FakeApiServer,
    dir: &TempDir,
    rate: RateConfig,
) -> (Controller, std::path::PathBuf) {
    let ca_dir = dir.path().join("secret");
    devca::ensure(&ca_dir).unwrap();
    let mut config = Config::loopback(SourceConfig::Kube);
    let mut identity = IdentityConfig::new(IssuerSource::Files(IssuerFiles::in_dir(&ca_dir)));
    identity.rate = rate;
    config.identity = Some(identity);
    let controller = Controller::start_with_client(config, Some(fake.client().unwrap()))
        .await
        .unwrap();
    (controller, ca_dir)
}

/// A local token of books/web bound to pod `name` (UID `uid-<name>`).
fn pod_token(dir: &TempDir, name: &str) -> String {
    let pod = PodBinding::new(name, Some(format!("uid-{name}"))).unwrap();
    tokens(dir).mint_for_pod(
        &ServiceAccount::new("books", "web"),
        &pod,
        Duration::from_secs(3600),
    )
}

fn tokens(dir: &TempDir) -> LocalTokens {
    LocalTokens::load(&dir.path().join("ca").join(devca::TOKEN_KEY)).unwrap()
}

fn pem(label: &str, der: &[u8]) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).unwrap());
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

/// Writes leaf.pem and chain.pem for `rsp` into `dir` under `tag`.
fn write_chain(dir: &Path, tag: &str, rsp: &CertifyResponse) -> (String, String) {
    let leaf = dir.join(format!("{tag}-leaf.pem"));
    let chain = dir.join(format!("{tag}-chain.pem"));
    std::fs::write(&leaf, pem("CERTIFICATE", &rsp.leaf_certificate)).unwrap();
    let inter: String = rsp
        .intermediate_certificates
        .iter()
        .map(|c| pem("CERTIFICATE", c))
        .collect();
    std::fs::write(&chain, inter).unwrap();
    (leaf.display().to_string(), chain.display().to_string())
}

fn openssl(args: &[&str]) -> (bool, String) {
    let out = Command::new("openssl").args(args).output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// What the proxy will do with a client certificate: rustls's WebPKI
/// client verifier over the trust-anchor bundle.
fn rustls_verify(anchors_pem: &Path, rsp: &CertifyResponse) -> Result<(), rustls::Error> {
    use rustls::pki_types::pem::PemObject as _;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(anchors_pem).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        Arc::new(rustls::crypto::ring::default_provider()),
    )
    .build()
    .unwrap();
    let inter: Vec<CertificateDer<'_>> = rsp
        .intermediate_certificates
        .iter()
        .map(|c| CertificateDer::from(c.as_slice()))
        .collect();
    verifier
        .verify_client_cert(
            &CertificateDer::from(rsp.leaf_certificate.as_slice()),
            &inter,
            UnixTime::now(),
        )
        .map(|_| ())
}

fn metric(text: &str, line_prefix: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(line_prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn valid_certify_gives_a_chain_openssl_and_rustls_accept() {
    let dir = TempDir::new("id-ok");
    let controller = local_controller(&dir, RateConfig::default()).await;
    let token = tokens(&dir).mint(
        &ServiceAccount::new("books", "web"),
        Duration::from_secs(3600),
    );
    let before = SystemTime::now();
    let rsp = client(&controller)
        .await
        .certify(req(WEB, &token, p256_csr(WEB)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(rsp.intermediate_certificates.len(), 1);
    let until = rsp.valid_until.unwrap();
    let until = UNIX_EPOCH + Duration::from_secs(u64::try_from(until.seconds).unwrap());
    let lifetime = until.duration_since(before).unwrap();
    assert!(
        lifetime > Duration::from_secs(24 * 3600 - 5) && lifetime <= Duration::from_secs(24 * 3600),
        "{lifetime:?}"
    );

    let anchors = dir.path().join("ca").join(devca::TRUST_ANCHORS);
    let (leaf, chain) = write_chain(dir.path(), "web", &rsp);
    let anchors_s = anchors.display().to_string();
    for purpose in ["sslclient", "sslserver"] {
        let (ok, out) = openssl(&[
            "verify",
            "-purpose",
            purpose,
            "-CAfile",
            &anchors_s,
            "-untrusted",
            &chain,
            &leaf,
        ]);
        assert!(
            ok && out.contains(": OK"),
            "openssl verify ({purpose}): {out}"
        );
    }
    let (ok, text) = openssl(&["x509", "-in", &leaf, "-noout", "-text"]);
    assert!(ok, "{text}");
    for want in [
        "URI:spiffe://cluster.local/ns/books/sa/web",
        "TLS Web Server Authentication, TLS Web Client Authentication",
        "NIST CURVE: P-256",
        "CA:FALSE",
        "Digital Signature",
    ] {
        assert!(text.contains(want), "missing {want:?} in:\n{text}");
    }
    assert!(!text.contains("DNS:"), "{text}");
    rustls_verify(&anchors, &rsp).unwrap();

    let metrics = http_get(controller.admin_addr, "/metrics").await;
    assert_eq!(
        metric(
            &metrics,
            "weft_controller_identity_certify_total{result=\"ok\"}"
        ),
        Some(1.0),
        "{metrics}"
    );
    assert_eq!(
        metric(&metrics, "weft_controller_identity_trust_anchors "),
        Some(1.0)
    );
    let expiry = metric(
        &metrics,
        "weft_controller_identity_issuer_expiry_timestamp_seconds ",
    )
    .unwrap();
    assert!(
        expiry
            > SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap()
                .as_secs_f64()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_are_clear_and_the_controller_keeps_serving() {
    let dir = TempDir::new("id-refuse");
    let controller = local_controller(&dir, RateConfig::default()).await;
    let mut c = client(&controller).await;
    let web = ServiceAccount::new("books", "web");
    let good = tokens(&dir).mint(&web, Duration::from_secs(3600));
    let foreign = LocalTokens::new(&[9u8; 32]).mint(&web, Duration::from_secs(3600));
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let expired = tokens(&dir).mint_at(&web, Duration::from_secs(60), now - 3600);
    let admin_token = tokens(&dir).mint(
        &ServiceAccount::new("books", "admin"),
        Duration::from_secs(3600),
    );
    // A correctly signed token for another audience.
    let key = std::fs::read(dir.path().join("ca").join(devca::TOKEN_KEY)).unwrap();
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key.trim_ascii_end());
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let body = b64.encode(format!(
        r#"{{"ns":"books","sa":"web","aud":"kubernetes","iat":{now},"exp":{}}}"#,
        now + 3600
    ));
    let signed = format!("weft1.{body}");
    let tag = b64.encode(ring::hmac::sign(&key, signed.as_bytes()).as_ref());
    let wrong_aud = format!("{signed}.{tag}");

    // The controller's own TLS identity (namespace `weft` in Config::loopback), with a token
    // that names it.
    const CONTROLLER_DESTINATION: &str = "spiffe://cluster.local/ns/weft/sa/destination";
    let controller_token = tokens(&dir).mint(
        &ServiceAccount::new("weft", "destination"),
        Duration::from_secs(3600),
    );
    use tonic::Code::*;
    let cases: Vec<(&str, CertifyRequest, tonic::Code, &str)> = vec![
        (
            "the controller's own identity",
            req(
                CONTROLLER_DESTINATION,
                &controller_token,
                p256_csr(CONTROLLER_DESTINATION),
            ),
            PermissionDenied,
            "is the controller's own TLS identity",
        ),
        (
            "csr for another identity",
            req(WEB, &good, p256_csr(ADMIN)),
            PermissionDenied,
            "is for spiffe://cluster.local/ns/books/sa/admin",
        ),
        (
            "token for another identity",
            req(ADMIN, &admin_token, p256_csr(WEB)),
            PermissionDenied,
            "is for spiffe://cluster.local/ns/books/sa/web",
        ),
        (
            "identity of another sa",
            req(ADMIN, &good, p256_csr(ADMIN)),
            PermissionDenied,
            "the token belongs to service account books/web, not books/admin",
        ),
        (
            "wrong token key",
            req(WEB, &foreign, p256_csr(WEB)),
            Unauthenticated,
            "signature does not verify",
        ),
        (
            "expired token",
            req(WEB, &expired, p256_csr(WEB)),
            Unauthenticated,
            "token expired at",
        ),
        (
            "wrong audience",
            req(WEB, &wrong_aud, p256_csr(WEB)),
            Unauthenticated,
            "audience is [\"kubernetes\"]",
        ),
        (
            "no token",
            req(WEB, "", p256_csr(WEB)),
            Unauthenticated,
            "carries no token",
        ),
        (
            "garbage token",
            req(WEB, "hello", p256_csr(WEB)),
            Unauthenticated,
            "does not start with \"weft1.\"",
        ),
        (
            "malformed csr",
            req(WEB, &good, b"\x30\x03junk".to_vec()),
            InvalidArgument,
            "not DER-encoded PKCS#10",
        ),
        (
            "empty csr",
            req(WEB, &good, vec![]),
            InvalidArgument,
            "certificate signing request is empty",
        ),
        (
            "p384 key",
            req(WEB, &good, csr_for(&rcgen::PKCS_ECDSA_P384_SHA384, &[WEB])),
            InvalidArgument,
            "expected an ECDSA P-256 key",
        ),
        (
            "ed25519 key",
            req(WEB, &good, csr_for(&rcgen::PKCS_ED25519, &[WEB])),
            InvalidArgument,
            "key is Ed25519",
        ),
        (
            "bad identity",
            req("web", &good, p256_csr(WEB)),
            InvalidArgument,
            "does not start with spiffe://",
        ),
        (
            "other trust domain",
            req(
                "spiffe://evil.org/ns/books/sa/web",
                &good,
                p256_csr("spiffe://evil.org/ns/books/sa/web"),
            ),
            PermissionDenied,
            "this controller issues for \"cluster.local\"",
        ),
    ];
    let n = cases.len();
    for (name, request, code, says) in cases {
        let err = c.certify(request).await.expect_err(name);
        assert_eq!(err.code(), code, "{name}: {}", err.message());
        assert!(err.message().contains(says), "{name}: {}", err.message());
    }
    // Still serving, on the same connection.
    c.certify(req(WEB, &good, p256_csr(WEB))).await.unwrap();
    let metrics = http_get(controller.admin_addr, "/metrics").await;
    let refused: f64 = ["invalid_request", "unauthenticated", "permission_denied"]
        .iter()
        .filter_map(|r| {
            metric(
                &metrics,
                &format!("weft_controller_identity_certify_total{{result=\"{r}\"}}"),
            )
        })
        .sum();
    assert_eq!(refused as usize, n, "{metrics}");
    assert!(
        !metrics.contains("spiffe://"),
        "no identity labels: {metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replayed_unbound_token_is_rate_limited() {
    let dir = TempDir::new("id-rate");
    let controller = local_controller(
        &dir,
        RateConfig {
            burst: 2,
            refill: Duration::from_secs(3600),
        },
    )
    .await;
    let mut c = client(&controller).await;
    let web = tokens(&dir).mint(
        &ServiceAccount::new("books", "web"),
        Duration::from_secs(3600),
    );
    let admin = tokens(&dir).mint(
        &ServiceAccount::new("books", "admin"),
        Duration::from_secs(3600),
    );
    for _ in 0..2 {
        c.certify(req(WEB, &web, p256_csr(WEB))).await.unwrap();
    }
    // A token bound to no pod has a bucket of its own: replayed, it is
    // throttled like a crash-looping pod.
    let err = c.certify(req(WEB, &web, p256_csr(WEB))).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::ResourceExhausted);
    assert!(
        err.message().starts_with(
            "per-pod rate limit: too many certificates for this token (bound to no pod) of spiffe://cluster.local/ns/books/sa/web; retry in"
        ),
        "{}",
        err.message()
    );
    // Another token has its own budget; a bad token spends none.
    c.certify(req(ADMIN, &admin, p256_csr(ADMIN)))
        .await
        .unwrap();
    for _ in 0..5 {
        let err = c
            .certify(req(ADMIN, "weft1.x.y", p256_csr(ADMIN)))
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unauthenticated);
    }
    c.certify(req(ADMIN, &admin, p256_csr(ADMIN)))
        .await
        .unwrap();
    let metrics = http_get(controller.admin_addr, "/metrics").await;
    assert_eq!(
        metric(
            &metrics,
            "weft_controller_identity_certify_total{result=\"rate_limited\"}"
        ),
        Some(1.0),
        "{metrics}"
    );
    assert_eq!(
        metric(
            &metrics,
            "weft_controller_identity_certify_rate_limited_total{limit=\"pod\"}"
        ),
        Some(1.0),
        "{metrics}"
    );
}

/// Issue 11: every replica of a Deployment shares one ServiceAccount. A
/// rollout of 200 pods at once, each with its own pod-bound token, gets
/// every certificate within 10 s under the default limits (keyed by
/// identity, 190 of them were refused).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_pods_of_one_service_account_get_certificates_at_once() {
    let dir = TempDir::new("id-rollout");
    let controller = local_controller(&dir, RateConfig::default()).await;
    let c = client(&controller).await;
    let requests: Vec<CertifyRequest> = (0..200)
        .map(|i| req(WEB, &pod_token(&dir, &format!("web-{i}")), p256_csr(WEB)))
        .collect();
    let calls: Vec<_> = requests
        .into_iter()
        .map(|r| {
            let mut c = c.clone();
            tokio::spawn(async move { c.certify(r).await })
        })
        .collect();
    let results = tokio::time::timeout(WITHIN, futures_util::future::join_all(calls))
        .await
        .expect("200 certificates within 10 s");
    for (i, r) in results.into_iter().enumerate() {
        let rsp = r.unwrap().unwrap_or_else(|e| panic!("pod web-{i}: {e:?}"));
        assert!(!rsp.into_inner().leaf_certificate.is_empty());
    }
    let metrics = http_get(controller.admin_addr, "/metrics").await;
    assert_eq!(
        metric(
            &metrics,
            "weft_controller_identity_certify_total{result=\"ok\"}"
        ),
        Some(200.0),
        "{metrics}"
    );
    assert!(!metrics.contains("result=\"rate_limited\""), "{metrics}");
}

/// One pod in a crash loop spends its own bucket and is refused; its
/// siblings (other pods, same ServiceAccount) still get certificates at
/// once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_looping_pod_is_refused_while_its_siblings_get_certificates() {
    let dir = TempDir::new("id-crashloop");
    let rate = RateConfig::default();
    let controller = local_controller(&dir, rate).await;
    let mut c = client(&controller).await;
    let looping = pod_token(&dir, "web-0");
    // Each restart: a new key and CSR, the same projected token.
    for i in 0..rate.burst {
        c.certify(req(WEB, &looping, p256_csr(WEB)))
            .await
            .unwrap_or_else(|e| panic!("restart {i}: {e:?}"));
    }
    let err = c
        .certify(req(WEB, &looping, p256_csr(WEB)))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::ResourceExhausted);
    let says = err.message();
    assert!(
        says.starts_with("per-pod rate limit: too many certificates for pod books/web-0 (uid uid-web-0) of spiffe://cluster.local/ns/books/sa/web; retry in ")
            && says.contains("--certify-burst 10 then one per --certify-refill 10s"),
        "{says}"
    );
    let started = std::time::Instant::now();
    for i in 1..=20 {
        c.certify(req(
            WEB,
            &pod_token(&dir, &format!("web-{i}")),
            p256_csr(WEB),
        ))
        .await
        .unwrap_or_else(|e| panic!("sibling web-{i}: {e:?}"));
    }
    assert!(started.elapsed() < WITHIN, "{:?}", started.elapsed());
    // Still refused.
    let err = c
        .certify(req(WEB, &looping, p256_csr(WEB)))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::ResourceExhausted);
    let metrics = http_get(controller.admin_addr, "/metrics").await;
    for (line, want) in [
        (
            "weft_controller_identity_certify_total{result=\"ok\"}",
            30.0,
        ),
        (
            "weft_controller_identity_certify_total{result=\"rate_limited\"}",
            2.0,
        ),
        (
            "weft_controller_identity_certify_rate_limited_total{limit=\"pod\"}",
            2.0,
        ),
    ] {
        assert_eq!(metric(&metrics, line), Some(want), "{line}: {metrics}");
    }
    assert!(!metrics.contains("limit=\"controller\""), "{metrics}");
    assert!(!metrics.contains("web-0"), "no pod labels: {metrics}");
}

/// The controller-wide ceiling: many pods, each within its own budget,
/// together asking faster than the ceiling allows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_controller_ceiling_refuses_pods_within_their_own_budget() {
    let dir = TempDir::new("id-ceiling");
    let controller = local_controller_with_ceiling(
        &dir,
        RateConfig::default(),
        CeilingConfig {
            rate: 0.01,
            burst: 3,
        },
    )
    .await;
    let mut c = client(&controller).await;
    for i in 0..3 {
        c.certify(req(
            WEB,
            &pod_token(&dir, &format!("web-{i}")),
            p256_csr(WEB),
        ))
        .await
        .unwrap();
    }
    let err = c
        .certify(req(WEB, &pod_token(&dir, "web-3"), p256_csr(WEB)))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::ResourceExhausted);
    let says = err.message();
    assert!(
        says.starts_with("controller rate limit: this controller is issuing at its ceiling (--certify-max-burst 3 then --certify-max-rate 0.01/s over all pods); retry in ")
            && says.ends_with(" s"),
        "{says}"
    );
    // 1 / 0.01 per second: about 100 s to the next token.
    let wait: f64 = says
        .rsplit("retry in ")
        .next()
        .and_then(|w| w.trim_end_matches(" s").parse().ok())
        .unwrap();
    assert!((90.0..=100.0).contains(&wait), "{says}");
    let metrics = http_get(controller.admin_addr, "/metrics").await;
    assert_eq!(
        metric(
            &metrics,
            "weft_controller_identity_certify_rate_limited_total{limit=\"controller\"}"
        ),
        Some(1.0),
        "{metrics}"
    );
    assert_eq!(
        metric(
            &metrics,
            "weft_controller_identity_certify_total{result=\"rate_limited\"}"
        ),
        Some(1.0),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kube_mode_checks_tokens_with_token_review() {
    let fake = FakeApiServer::start().await.unwrap();
    let aud = weft_controller::identity::TOKEN_AUDIENCE;
    fake.add_token("web-token", "system:serviceaccount:books:web", &[aud]);
    fake.add_token(
        "api-token",
        "system:serviceaccount:books:web",
        &["https://kubernetes.default.svc"],
    );
    fake.add_token("user-token", "alice", &[aud]);
    let dir = TempDir::new("id-kube");
    let (controller, ca_dir) = kube_controller(&fake, &dir, RateConfig::default()).await;
    let mut c = client(&controller).await;

    let rsp = c
        .certify(req(WEB, "web-token\n", p256_csr(WEB)))
        .await
        .unwrap()
        .into_inner();
    rustls_verify(&ca_dir.join(devca::TRUST_ANCHORS), &rsp).unwrap();
    assert_eq!(fake.token_reviews(), 1);

    use tonic::Code::*;
    let cases = [
        (
            "unknown token",
            req(WEB, "stolen", p256_csr(WEB)),
            Unauthenticated,
            "did not authenticate the token: [invalid bearer token",
        ),
        (
            "api-server audience",
            req(WEB, "api-token", p256_csr(WEB)),
            Unauthenticated,
            "is invalid for the target audiences [\"identity.weft.dev\"]",
        ),
        (
            "not a service account",
            req(WEB, "user-token", p256_csr(WEB)),
            Unauthenticated,
            "\"alice\", which is not a ServiceAccount",
        ),
        (
            "another identity",
            req(ADMIN, "web-token", p256_csr(ADMIN)),
            PermissionDenied,
            "the token belongs to service account books/web",
        ),
    ];
    for (name, request, code, says) in cases {
        let err = c.certify(request).await.expect_err(name);
        assert_eq!(err.code(), code, "{name}: {}", err.message());
        assert!(err.message().contains(says), "{name}: {}", err.message());
    }
    // A malformed CSR is refused before any TokenReview.
    let reviews = fake.token_reviews();
    let err = c
        .certify(req(WEB, "web-token", b"junk".to_vec()))
        .await
        .unwrap_err();
    assert_eq!(err.code(), InvalidArgument);
    assert_eq!(fake.token_reviews(), reviews);
    // Missing RBAC: UNAVAILABLE (retryable), naming the cause.
    fake.fail_token_reviews(true);
    let err = c
        .certify(req(WEB, "web-token", p256_csr(WEB)))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Unavailable, "{}", err.message());
    assert!(
        err.message().contains("TokenReview failed") && err.message().contains("forbidden"),
        "{}",
        err.message()
    );
    fake.fail_token_reviews(false);
    c.certify(req(WEB, "web-token", p256_csr(WEB)))
        .await
        .unwrap();
}

/// Kube mode: the TokenReview names the pod a projected token is bound to
/// (`status.user.extra`), and the rate limit is per pod.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kube_mode_rate_limits_the_pod_the_token_review_names() {
    let fake = FakeApiServer::start().await.unwrap();
    let aud = weft_controller::identity::TOKEN_AUDIENCE;
    let user = "system:serviceaccount:books:web";
    for i in 0..3 {
        fake.add_pod_token(
            &format!("web-{i}-token"),
            user,
            &[aud],
            &format!("web-{i}"),
            &format!("5a0c7e0e-0000-4000-8000-00000000000{i}"),
        );
    }
    let dir = TempDir::new("id-kube-pod");
    let (controller, _) = kube_controller(
        &fake,
        &dir,
        RateConfig {
            burst: 2,
            refill: Duration::from_secs(3600),
        },
    )
    .await;
    let mut c = client(&controller).await;
    for _ in 0..2 {
        c.certify(req(WEB, "web-0-token", p256_csr(WEB)))
            .await
            .unwrap();
    }
    let err = c
        .certify(req(WEB, "web-0-token", p256_csr(WEB)))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::ResourceExhausted);
    assert!(
        err.message().contains(
            "too many certificates for pod books/web-0 (uid 5a0c7e0e-0000-4000-8000-000000000000) of spiffe://cluster.local/ns/books/sa/web"
        ),
        "{}",
        err.message()
    );
    // Same ServiceAccount, other pods: their own buckets.
    for token in ["web-1-token", "web-2-token", "web-1-token"] {
        c.certify(req(WEB, token, p256_csr(WEB))).await.unwrap();
    }
    assert_eq!(fake.token_reviews(), 6);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trust_anchor_rotation_keeps_old_and_new_leaves_valid() {
    let dir = TempDir::new("id-rotate");
    let secret = dir.path().join("secret");
    std::fs::create_dir_all(&secret).unwrap();
    let files = IssuerFiles::in_dir(&secret);
    let now = SystemTime::now();
    let year = Duration::from_secs(365 * 86400);
    let write = |path: &Path, text: &str| {
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, path).unwrap();
    };
    let old_root = CaCert::root("old root", now, 10 * year).unwrap();
    let old_issuer = old_root.issue_ca("old issuer", now, year).unwrap();
    write(&files.cert, &old_issuer.cert_pem);
    write(&files.key, &old_issuer.key_pem());
    write(&files.trust_anchors, &old_root.cert_pem);
    let token_key = dir.path().join("token-key");
    std::fs::write(&token_key, [5u8; 32]).unwrap();

    let manifests = dir.path().join("manifests");
    std::fs::create_dir_all(&manifests).unwrap();
    let mut config = Config::loopback(SourceConfig::Dir(manifests));
    let mut identity = IdentityConfig::new(IssuerSource::Files(files.clone()));
    identity.tokens = Some(TokenMode::Local(token_key.clone()));
    identity.reload_interval = Duration::from_millis(50);
    config.identity = Some(identity);
    let controller = Controller::start(config).await.unwrap();
    let ca = controller.ca.clone().unwrap();
    let token = LocalTokens::load(&token_key).unwrap().mint(
        &ServiceAccount::new("books", "web"),
        Duration::from_secs(3600),
    );
    let mut c = client(&controller).await;
    let old_leaf = c
        .certify(req(WEB, &token, p256_csr(WEB)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        old_leaf.intermediate_certificates,
        std::slice::from_ref(&old_issuer.cert_der)
    );

    // 1. A broken update is refused; the old issuer keeps signing.
    write(&files.cert, "not a certificate\n");
    let reloads = |result: &'static str| {
        let text = controller.metrics.encode();
        metric(
            &text,
            &format!("weft_controller_identity_issuer_reloads_total{{result=\"{result}\"}}"),
        )
    };
    eventually("failed reload counted", WITHIN, || {
        reloads("failed").is_some()
    })
    .await;
    let still = c
        .certify(req(WEB, &token, p256_csr(WEB)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        still.intermediate_certificates,
        std::slice::from_ref(&old_issuer.cert_der)
    );
    write(&files.cert, &old_issuer.cert_pem);

    // 2. Add the new root to the bundle (proxies would pick this up first).
    let new_root = CaCert::root("new root", now, 10 * year).unwrap();
    write(
        &files.trust_anchors,
        &format!("{}{}", old_root.cert_pem, new_root.cert_pem),
    );
    eventually("bundle of two loaded", WITHIN, || {
        weft_controller::identity::ca::CertificateAuthority::status(&*ca).trust_anchors == 2
    })
    .await;

    // 3. Re-issue the issuer from the new root (key first, then cert, as a
    //    Secret update may land; the mismatched moment is refused).
    let new_issuer = new_root.issue_ca("new issuer", now, year).unwrap();
    write(&files.key, &new_issuer.key_pem());
    write(&files.cert, &new_issuer.cert_pem);
    eventually("new issuer in use", WITHIN, || {
        weft_controller::identity::ca::CertificateAuthority::status(&*ca)
            .issuer_subject
            .contains("new issuer")
    })
    .await;
    let new_leaf = c
        .certify(req(WEB, &token, p256_csr(WEB)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        new_leaf.intermediate_certificates,
        std::slice::from_ref(&new_issuer.cert_der)
    );

    // During the overlap both leaves verify against the bundle, with the
    // proxy's verifier and with openssl.
    rustls_verify(&files.trust_anchors, &old_leaf).unwrap();
    rustls_verify(&files.trust_anchors, &new_leaf).unwrap();
    let bundle = files.trust_anchors.display().to_string();
    for (tag, rsp) in [("old", &old_leaf), ("new", &new_leaf)] {
        let (leaf, chain) = write_chain(dir.path(), tag, rsp);
        let (ok, out) = openssl(&["verify", "-CAfile", &bundle, "-untrusted", &chain, &leaf]);
        assert!(ok, "{tag}: {out}");
    }
    // Each only against its own root (the bundle is what makes the overlap work).
    let only_new = dir.path().join("only-new.pem");
    std::fs::write(&only_new, &new_root.cert_pem).unwrap();
    assert!(rustls_verify(&only_new, &old_leaf).is_err());
    assert!(rustls_verify(&only_new, &new_leaf).is_ok());

    let metrics = http_get(controller.admin_addr, "/metrics").await;
    assert_eq!(
        metric(&metrics, "weft_controller_identity_trust_anchors "),
        Some(2.0),
        "{metrics}"
    );
    assert!(reloads("ok").unwrap_or(0.0) >= 2.0, "{metrics}");
}

#[test]
fn issuer_made_with_openssl_and_a_sec1_key_is_accepted() {
    let dir = TempDir::new("id-openssl");
    let p = |f: &str| dir.path().join(f).display().to_string();
    let run = |args: &[&str]| {
        let (ok, out) = openssl(args);
        assert!(ok, "openssl {args:?}: {out}");
    };
    std::fs::write(
        p("ext.cnf"),
        "basicConstraints=critical,CA:TRUE,pathlen:0\nkeyUsage=critical,keyCertSign,cRLSign\nsubjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n",
    )
    .unwrap();
    run(&[
        "ecparam",
        "-name",
        "prime256v1",
        "-genkey",
        "-noout",
        "-out",
        &p("root.key"),
    ]);
    run(&[
        "req",
        "-x509",
        "-new",
        "-key",
        &p("root.key"),
        "-subj",
        "/C=DE/O=Example Corp/CN=Example Root",
        "-days",
        "3650",
        "-out",
        &p("root.crt"),
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
    ]);
    run(&[
        "ecparam",
        "-name",
        "prime256v1",
        "-genkey",
        "-noout",
        "-out",
        &p("issuer.key"),
    ]);
    run(&[
        "req",
        "-new",
        "-key",
        &p("issuer.key"),
        "-subj",
        "/C=DE/O=Example Corp/CN=Weft Issuer",
        "-out",
        &p("issuer.csr"),
    ]);
    run(&[
        "x509",
        "-req",
        "-in",
        &p("issuer.csr"),
        "-CA",
        &p("root.crt"),
        "-CAkey",
        &p("root.key"),
        "-CAcreateserial",
        "-days",
        "365",
        "-extfile",
        &p("ext.cnf"),
        "-out",
        &p("issuer.crt"),
    ]);
    let key = std::fs::read_to_string(p("issuer.key")).unwrap();
    assert!(key.contains("BEGIN EC PRIVATE KEY"), "{key}");
    let files = IssuerFiles {
        cert: p("issuer.crt").into(),
        key: p("issuer.key").into(),
        trust_anchors: p("root.crt").into(),
    };
    // Loading runs the probe: a leaf signed with the SEC1 key verifies
    // under the openssl-made root with rustls-webpki.
    let issuer = Issuer::load(&files, SystemTime::now()).unwrap();
    assert_eq!(issuer.trust_anchors().len(), 1);
}

//! The `weft-controller` binary's identity flags and subcommands: `dev-ca`,
//! `token`, flag errors before any port is bound, and a run with
//! `--dev-ca` that answers Certify.
#![allow(clippy::unwrap_used)]

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::TempDir;
use weft_controller::identity::devca;
use weft_controller::identity::token::{Authenticated, LocalTokens, PodBinding};
use weft_controller::identity::ServiceAccount;

use common::free_port;

const BIN: &str = env!("CARGO_BIN_EXE_weft-controller");

#[test]
fn dev_ca_and_token_subcommands() {
    let dir = TempDir::new("bin-devca");
    let ca = dir.path().join("ca");
    let out = Command::new(BIN)
        .args(["dev-ca", ca.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let listed = String::from_utf8(out.stdout).unwrap();
    for f in [
        devca::TRUST_ANCHORS,
        devca::ISSUER_CERT,
        devca::ISSUER_KEY,
        devca::TOKEN_KEY,
    ] {
        assert!(listed.contains(f), "{listed}");
        assert!(ca.join(f).exists());
    }
    let out = Command::new(BIN)
        .args([
            "token",
            "--dev-ca",
            ca.to_str().unwrap(),
            "--namespace",
            "books",
            "--service-account",
            "web",
            "--lifetime",
            "1h",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let token = String::from_utf8(out.stdout).unwrap();
    assert!(token.starts_with("weft1."), "{token}");
    let tokens = LocalTokens::load(&ca.join(devca::TOKEN_KEY)).unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let web = ServiceAccount::new("books", "web");
    assert_eq!(
        tokens.verify_at(token.as_bytes(), now),
        Ok(Authenticated::unbound(web.clone()))
    );
    assert!(tokens.verify_at(token.as_bytes(), now + 3601).is_err());
    // --pod (and --pod-uid) bind the token to a pod.
    let mint = |extra: &[&str]| {
        Command::new(BIN)
            .args([
                "token",
                "--dev-ca",
                ca.to_str().unwrap(),
                "--namespace",
                "books",
                "--service-account",
                "web",
            ])
            .args(extra)
            .output()
            .unwrap()
    };
    for (extra, pod) in [
        (&["--pod", "web-0"][..], PodBinding::new("web-0", None)),
        (
            &["--pod", "web-1", "--pod-uid", "7f3e"][..],
            PodBinding::new("web-1", Some("7f3e".into())),
        ),
    ] {
        let out = mint(extra);
        assert!(out.status.success(), "{extra:?}: {out:?}");
        let token = String::from_utf8(out.stdout).unwrap();
        assert_eq!(
            tokens.verify_at(token.as_bytes(), now),
            Ok(Authenticated {
                service_account: web.clone(),
                pod: Some(pod.unwrap()),
            }),
            "{extra:?}"
        );
    }
    for (extra, says) in [
        (&["--pod-uid", "7f3e"][..], "--pod <POD>"),
        (
            &["--pod", "Web_0"][..],
            "--pod / --pod-uid: the token's pod binding is invalid: pod name \"Web_0\"",
        ),
    ] {
        let out = mint(extra);
        assert!(!out.status.success(), "{extra:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(says), "{extra:?}: {stderr}");
    }
    // --out writes the file the proxy reads.
    let file = dir.path().join("token");
    let out = Command::new(BIN)
        .args([
            "token",
            "--token-key",
            ca.join(devca::TOKEN_KEY).to_str().unwrap(),
            "--namespace",
            "books",
            "--service-account",
            "web",
            "--out",
            file.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(std::fs::read_to_string(&file)
        .unwrap()
        .starts_with("weft1."));
    // Names Kubernetes would refuse.
    let out = Command::new(BIN)
        .args([
            "token",
            "--dev-ca",
            ca.to_str().unwrap(),
            "--namespace",
            "Books",
            "--service-account",
            "web",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("namespace \"Books\""));
}

#[test]
fn identity_flag_errors_come_before_binding() {
    let dir = TempDir::new("bin-idflags");
    let manifests = dir.path().display().to_string();
    let source = format!("dir:{manifests}");
    let out = Command::new(BIN)
        .args(["--source", &source, "--issuer-cert", "/x/issuer.crt"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("missing --issuer-key, --trust-anchors"),
        "{stderr}"
    );

    let ca = dir.path().join("ca");
    devca::ensure(&ca).unwrap();
    std::fs::write(
        ca.join(devca::ISSUER_KEY),
        "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
    )
    .unwrap();
    let identity = free_port();
    let out = Command::new(BIN)
        .args([
            "--source",
            &source,
            "--dev-ca",
            ca.to_str().unwrap(),
            "--identity-addr",
            &identity.to_string(),
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("issuer.key") && stderr.contains("private key"),
        "{stderr}"
    );

    let out = Command::new(BIN)
        .args([
            "--source",
            &source,
            "--dev-ca",
            ca.to_str().unwrap(),
            "--cert-lifetime",
            "1y",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown unit \"y\""));

    for (flag, value, says) in [
        (
            "--certify-max-rate",
            "0",
            "not a positive number of certificates per second",
        ),
        (
            "--certify-max-rate",
            "fast",
            "not a positive number of certificates per second",
        ),
        ("--certify-max-burst", "0", "--certify-max-burst"),
    ] {
        let out = Command::new(BIN)
            .args([
                "--source",
                &source,
                "--dev-ca",
                ca.to_str().unwrap(),
                flag,
                value,
            ])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{flag} {value}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(says), "{flag} {value}: {stderr}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_ca_run_answers_certify() {
    let dir = TempDir::new("bin-certify");
    let ca = dir.path().join("ca");
    let (dest, ident, admin) = (free_port(), free_port(), free_port());
    let mut child = Command::new(BIN)
        .args([
            "--source",
            &format!("dir:{}", dir.path().display()),
            "--dev-ca",
            ca.to_str().unwrap(),
            "--destination-addr",
            &dest.to_string(),
            "--identity-addr",
            &ident.to_string(),
            "--admin-addr",
            &admin.to_string(),
            "--certify-max-rate",
            "50",
            "--certify-max-burst",
            "300",
            // A plain tonic client; TLS on this port is tested end to end
            // (tests/tests/control_plane_tls.rs).
            "--insecure-plaintext",
        ])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let token = Command::new(BIN)
        .args([
            "token",
            "--dev-ca",
            ca.to_str().unwrap(),
            "--namespace",
            "books",
            "--service-account",
            "web",
            "--pod",
            "web-0",
        ])
        .output()
        .unwrap();
    let token = token.stdout;
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::default();
    let id = "spiffe://cluster.local/ns/books/sa/web";
    params.subject_alt_names = vec![rcgen::SanType::URI(id.try_into().unwrap())];
    let csr = params.serialize_request(&key).unwrap().der().to_vec();
    let deadline = Instant::now() + Duration::from_secs(10);
    let rsp = loop {
        let attempt = async {
            let mut c = weft_proto::identity::identity_client::IdentityClient::connect(format!(
                "http://{ident}"
            ))
            .await?;
            let rsp = c
                .certify(weft_proto::identity::CertifyRequest {
                    identity: id.into(),
                    token: token.clone(),
                    certificate_signing_request: csr.clone(),
                })
                .await?;
            anyhow::Ok(rsp.into_inner())
        };
        match attempt.await {
            Ok(r) => break Some(r),
            Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            Err(e) => {
                eprintln!("certify: {e:#}");
                break None;
            }
        }
    };
    let _ = child.kill();
    let _ = child.wait();
    let rsp = rsp.expect("certify against the binary");
    assert!(!rsp.leaf_certificate.is_empty());
    assert_eq!(rsp.intermediate_certificates.len(), 1);
}

//! A control plane no one can impersonate (issue 16): the identity port is TLS, the
//! destination port mutual TLS, with certificates the controller issues itself from the mesh
//! issuer. Real `weft-controller` (with `--dev-ca`) and `weft-proxy` processes on loopback;
//! the in-test clients are tonic clients on the proxy's own controller channel
//! (`weft_proxy::transport::control`), with or without a workload certificate.
//!
//! - A proxy that trusts another CA refuses the identity service, never sends its token,
//!   and `/ready` says why (the address and the verification error).
//! - A client without a mesh certificate cannot stream Resolve, ClientPolicy or
//!   ServerPolicy; one with another workload's certificate gets PERMISSION_DENIED for
//!   ServerPolicy of a pod that is not its own, and for Resolve and ClientPolicy asked as
//!   a namespace that is not its certificate's.
//! - Through a recording TCP relay, a proxy's whole conversation with the controller holds
//!   no token bytes, and every connection starts with a TLS ClientHello.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use anyhow::{bail, Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tonic::transport::Channel;
use weft_e2e::controller::DevCa;
use weft_e2e::pki::Ca;
use weft_e2e::{admin_get, eventually, Metrics, Proxy, ProxyOpts};
use weft_proto::destination::destination_client::DestinationClient;
use weft_proto::destination::{CallerContext, ClientPolicyRequest, ResolveRequest};
use weft_proto::policy::policy_client::PolicyClient;
use weft_proto::policy::ServerPolicyRequest;
use weft_proxy::identity::{CertState, Certificate, TrustAnchors};
use weft_proxy::transport::control::{self, ControllerTls, Service};

const NS: &str = "shop";

/// One relayed connection: what the client sent and what the server answered.
#[derive(Clone, Debug, Default)]
struct Conn {
    up: Vec<u8>,
    down: Vec<u8>,
}

/// A TCP relay to `upstream` that records every byte of every connection.
struct Relay {
    addr: SocketAddr,
    conns: Arc<Mutex<Vec<Arc<Mutex<Conn>>>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    conn: Arc<Mutex<Conn>>,
    up: bool,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        {
            let mut c = conn.lock().unwrap_or_else(|p| p.into_inner());
            let side = if up { &mut c.up } else { &mut c.down };
            side.extend_from_slice(&buf[..n]);
        }
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
}

impl Relay {
    async fn start(upstream: SocketAddr) -> Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let conns: Arc<Mutex<Vec<Arc<Mutex<Conn>>>>> = Arc::default();
        let all = conns.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = TcpStream::connect(upstream).await else {
                    continue;
                };
                let conn = Arc::new(Mutex::new(Conn::default()));
                all.lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(conn.clone());
                let (cr, cw) = client.into_split();
                let (sr, sw) = server.into_split();
                tokio::spawn(pipe(cr, sw, conn.clone(), true));
                tokio::spawn(pipe(sr, cw, conn, false));
            }
        });
        Ok(Self { addr, conns, task })
    }

    fn conns(&self) -> Vec<Conn> {
        self.conns
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|c| c.lock().unwrap_or_else(|p| p.into_inner()).clone())
            .collect()
    }

    /// Every connection opened with a TLS handshake record, and no bytes of `secrets` went
    /// either way.
    fn assert_tls_only(&self, what: &str, secrets: &[&str]) {
        let conns = self.conns();
        assert!(!conns.is_empty(), "{what}: the proxy never connected");
        for (i, c) in conns.iter().enumerate() {
            if let Some(first) = c.up.first() {
                assert_eq!(
                    *first, 0x16,
                    "{what}: connection {i} did not start with a TLS handshake record"
                );
            }
            for s in secrets {
                for (dir, bytes) in [("up", &c.up), ("down", &c.down)] {
                    assert!(
                        !contains(bytes, s.as_bytes()),
                        "{what}: connection {i} carried {s:?} ({dir})"
                    );
                }
            }
        }
    }
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && hay.windows(needle.len()).any(|w| w == needle)
}

/// The token and its base64 parts (`weft1.<payload>.<signature>`).
fn secrets(token: &str) -> Vec<String> {
    let token = token.trim();
    let mut out = vec![token.to_string()];
    out.extend(
        token
            .split('.')
            .filter(|p| p.len() >= 16)
            .map(str::to_string),
    );
    out
}

fn pod_yaml(ns: &str, name: &str, sa: &str, ip: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {ns}, annotations: {{weft.dev/inject: enabled}}}}\n\
         spec:\n  serviceAccountName: {sa}\n  containers: [{{name: app, image: app, ports: [{{containerPort: 8080}}]}}]\n\
         status: {{podIP: \"{ip}\", phase: Running}}\n"
    )
}

/// A certificate state holding `leaf` (PEM chain file) and its key.
fn cert_state(leaf: &Path, key: &Path, id: &str) -> Result<watch::Receiver<CertState>> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let chain: Vec<CertificateDer<'static>> =
        CertificateDer::pem_file_iter(leaf)?.collect::<Result<_, _>>()?;
    let key = PrivateKeyDer::from_pem_file(key)?;
    let signer = rustls::crypto::ring::sign::any_ecdsa_type(&key)?;
    let now = SystemTime::now();
    let cert = Certificate {
        key: Arc::new(rustls::sign::CertifiedKey::new(chain, signer)),
        id: id.into(),
        not_before: now - Duration::from_secs(60),
        not_after: now + Duration::from_secs(3600),
    };
    let (tx, rx) = watch::channel(CertState::Ready(Arc::new(cert)));
    std::mem::forget(tx);
    Ok(rx)
}

/// A channel to the destination port over TLS (verifying the controller), presenting
/// `cert` when given.
fn destination_channel(ca: &DevCa, cert: Option<watch::Receiver<CertState>>) -> Result<Channel> {
    let anchors = TrustAnchors::load(&ca.anchors())?;
    let (tx, rx) = watch::channel(Arc::new(anchors));
    std::mem::forget(tx);
    let expected = control::controller_identity("cluster.local", "weft", Service::Destination);
    let tls = ControllerTls::new(expected, rx, cert)?;
    Ok(control::channel(
        &ca.controller.destination.to_string(),
        Some(tls),
        |e| e.connect_timeout(Duration::from_secs(2)),
    )?)
}

fn context() -> CallerContext {
    CallerContext {
        namespace: NS.into(),
        pod_name: "web-0".into(),
        service_account: "web".into(),
    }
}

/// The three streams on `channel`: Resolve, ClientPolicy, ServerPolicy of `pod`; each
/// result is the first message or the status.
async fn ask(channel: &Channel, pod: &str) -> [Result<(), tonic::Status>; 3] {
    let timeout = Duration::from_secs(5);
    let mut dest = DestinationClient::new(channel.clone());
    let mut dest2 = dest.clone();
    let mut policy = PolicyClient::new(channel.clone());
    let resolve = async {
        let mut s = dest
            .resolve(ResolveRequest {
                target: "web.shop.svc.cluster.local:8080".into(),
                context: Some(context()),
            })
            .await?
            .into_inner();
        s.message().await.map(|_| ())
    };
    let client_policy = async {
        let mut s = dest2
            .client_policy(ClientPolicyRequest {
                target: "web.shop.svc.cluster.local:8080".into(),
                context: Some(context()),
            })
            .await?
            .into_inner();
        s.message().await.map(|_| ())
    };
    let server_policy = async {
        let mut s = policy
            .server_policy(ServerPolicyRequest {
                port: 8080,
                namespace: NS.into(),
                pod_name: pod.into(),
            })
            .await?
            .into_inner();
        s.message().await.map(|_| ())
    };
    let limit = |r: Result<Result<(), tonic::Status>, _>| {
        r.unwrap_or_else(|_| Err(tonic::Status::deadline_exceeded("no answer within 5 s")))
    };
    [
        limit(tokio::time::timeout(timeout, resolve).await),
        limit(tokio::time::timeout(timeout, client_policy).await),
        limit(tokio::time::timeout(timeout, server_policy).await),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_without_a_mesh_certificate_cannot_stream() -> Result<()> {
    let ca = DevCa::prepare("cp-tls-clients", &[])?;
    ca.manifests
        .write("web.yaml", &pod_yaml(NS, "web-0", "web", "127.0.0.10"))?;
    let mut ca = ca;
    ca.controller.launch()?;
    ca.controller.wait_objects("Pod", 1.0)?;
    let names = ["Resolve", "ClientPolicy", "ServerPolicy"];

    // Plaintext HTTP/2 to the TLS port.
    let plain = Channel::from_shared(format!("http://{}", ca.controller.destination))?
        .connect_timeout(Duration::from_secs(2))
        .connect_lazy();
    for (name, r) in names.iter().zip(ask(&plain, "web-0").await) {
        let e = r
            .err()
            .with_context(|| format!("plaintext {name} was answered"))?;
        assert_ne!(e.code(), tonic::Code::Ok, "{name}");
    }

    // TLS without a client certificate: the handshake is refused.
    let anonymous = destination_channel(&ca, None)?;
    for (name, r) in names.iter().zip(ask(&anonymous, "web-0").await) {
        // The server refuses the handshake (TLS 1.3: after the client's Finished), so the
        // call fails as the connection closes: UNAVAILABLE, CANCELLED or UNKNOWN.
        let e = r
            .err()
            .with_context(|| format!("{name} without a client certificate was answered"))?;
        assert_ne!(e.code(), tonic::Code::Ok, "{name}");
    }

    // A certificate from another CA for the right identity: refused too.
    let dir = ca.ca.path();
    let stranger = Ca::root("stranger")?;
    let web_id = format!("spiffe://cluster.local/ns/{NS}/sa/web");
    let forged = stranger.valid_leaf(dir, "forged-web", &web_id)?;
    let forged = destination_channel(&ca, Some(cert_state(&forged.cert, &forged.key, &web_id)?))?;
    for (name, r) in names.iter().zip(ask(&forged, "web-0").await) {
        assert!(
            r.is_err(),
            "{name} with a stranger's certificate was answered"
        );
    }

    // A mesh certificate of another workload (db): discovery works, ServerPolicy of web-0
    // is refused, its own pod's is served.
    let issuer = Ca::dev_ca_issuer(dir)?;
    let db_id = format!("spiffe://cluster.local/ns/{NS}/sa/db");
    let db = issuer.valid_leaf(dir, "db", &db_id)?;
    let db = destination_channel(&ca, Some(cert_state(&db.cert, &db.key, &db_id)?))?;
    let [resolve, client_policy, server_policy] = ask(&db, "web-0").await;
    resolve.context("Resolve with a mesh certificate")?;
    client_policy.context("ClientPolicy with a mesh certificate")?;
    let denied = server_policy.expect_err("db read web-0's inbound policy");
    assert_eq!(denied.code(), tonic::Code::PermissionDenied, "{denied:?}");
    assert!(
        denied.message().contains(&db_id) && denied.message().contains("web-0"),
        "{}",
        denied.message()
    );
    let [_, _, own] = ask(&db, "db-0").await;
    own.context("ServerPolicy of its own (not yet indexed) pod")?;

    // A workload of another namespace claiming to ask as one of this namespace (whose
    // consumer routes it would read): refused, naming both namespaces.
    let spy_id = "spiffe://cluster.local/ns/other/sa/spy".to_string();
    let spy = issuer.valid_leaf(dir, "spy", &spy_id)?;
    let spy = destination_channel(&ca, Some(cert_state(&spy.cert, &spy.key, &spy_id)?))?;
    let [resolve, client_policy, _] = ask(&spy, "web-0").await;
    for (name, r) in [("Resolve", resolve), ("ClientPolicy", client_policy)] {
        let denied = r.err().with_context(|| {
            format!("{name} as namespace {NS} with a certificate of namespace other was answered")
        })?;
        assert_eq!(
            denied.code(),
            tonic::Code::PermissionDenied,
            "{name}: {denied:?}"
        );
        assert!(
            denied.message().contains(&spy_id) && denied.message().contains(&format!("{NS:?}")),
            "{name}: {}",
            denied.message()
        );
    }

    // The controller with --insecure-plaintext serves plaintext; without an issuer and
    // without the flag it does not start, naming the flag.
    let bare = weft_e2e::controller::ManifestDir::new("cp-tls-bare")?;
    let out = std::process::Command::new(weft_e2e::bin("weft-controller")?)
        .arg("--source")
        .arg(format!("dir:{}", bare.path().display()))
        .args([
            "--destination-addr",
            "127.0.0.1:0",
            "--identity-addr",
            "127.0.0.1:0",
            "--admin-addr",
            "127.0.0.1:0",
        ])
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("--insecure-plaintext"), "{stderr}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_refuses_an_identity_service_from_another_ca() -> Result<()> {
    let ca = DevCa::start("cp-tls-stranger", &[])?;
    let relay = Relay::start(ca.controller.identity).await?;
    let token_file = ca.token(NS, "web")?;
    let token = std::fs::read_to_string(&token_file)?;
    // The proxy trusts only a stranger's root.
    let stranger = Ca::root("stranger")?;
    let anchors = ca.ca.path().join("stranger-anchors.pem");
    std::fs::write(&anchors, &stranger.cert_pem)?;
    let mut env = ca.proxy_env(NS, "web", &token_file);
    for (k, v) in env.iter_mut() {
        match k.as_str() {
            "WEFT_PROXY_IDENTITY_ADDR" => *v = relay.addr.to_string(),
            "WEFT_PROXY_TRUST_ANCHORS" => *v = anchors.display().to_string(),
            _ => {}
        }
    }
    let proxy = Proxy::spawn(ProxyOpts {
        env,
        ..Default::default()
    })?;
    let mut why = String::new();
    eventually(Duration::from_secs(10), || {
        let (status, body) = admin_get(proxy.admin, "/ready")?;
        why = body;
        Ok(status == 503 && why.contains("TLS"))
    })
    .with_context(|| format!("/ready never said why: {why}"))?;
    for want in [
        relay.addr.to_string().as_str(),
        "identity.weft.serviceaccount.identity.cluster.local",
        "UnknownIssuer",
    ] {
        assert!(why.contains(want), "/ready does not name {want:?}: {why}");
    }
    relay.assert_tls_only(
        "identity",
        &secrets(&token)
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    );
    // The controller never saw a Certify call.
    let (_, metrics) = admin_get(ca.controller.admin, "/metrics")?;
    let calls = Metrics::parse(&metrics).sum("weft_controller_identity_certify_total", &[]);
    if calls != 0.0 {
        bail!("the controller answered {calls} Certify calls");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_token_bytes_cross_the_loopback() -> Result<()> {
    let ca = DevCa::start("cp-tls-capture", &[])?;
    let identity = Relay::start(ca.controller.identity).await?;
    let destination = Relay::start(ca.controller.destination).await?;
    let token_file = ca.token(NS, "web")?;
    let token = std::fs::read_to_string(&token_file)?;
    let mut env = ca.proxy_env(NS, "web", &token_file);
    for (k, v) in env.iter_mut() {
        if k == "WEFT_PROXY_IDENTITY_ADDR" {
            *v = identity.addr.to_string();
        }
    }
    env.push((
        "WEFT_PROXY_DESTINATION_ADDR".into(),
        destination.addr.to_string(),
    ));
    // Ready: a certificate through the identity relay, the controller SERVING through the
    // destination relay (mTLS with that certificate).
    let proxy = Proxy::start(ProxyOpts {
        env,
        ..Default::default()
    })?;
    let (_, metrics) = admin_get(ca.controller.admin, "/metrics")?;
    let ok = Metrics::parse(&metrics).sum(
        "weft_controller_identity_certify_total",
        &[("result", "ok")],
    );
    assert!(ok >= 1.0, "no certificate was issued");
    let secrets = secrets(&token);
    let secrets: Vec<&str> = secrets.iter().map(String::as_str).collect();
    assert!(secrets.len() >= 3, "{secrets:?}");
    identity.assert_tls_only("identity", &secrets);
    destination.assert_tls_only("destination", &secrets);
    // Plaintext gRPC would show its path in the clear; nothing of it either.
    for c in identity.conns().iter().chain(destination.conns().iter()) {
        assert!(!contains(&c.up, b"weft.identity.Identity"));
        assert!(!contains(&c.up, b"grpc.health.v1"));
    }
    drop(proxy);
    Ok(())
}

//! The webhook over real TLS on loopback: AdmissionReview JSON as the API server sends it, the
//! patch it returns applied to the pod, malformed and oversized requests, and certificate
//! rotation without a restart.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
use rustls_pki_types::{CertificateDer, ServerName};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use weft_injector::patch::{InjectConfig, NamespaceMeta};
use weft_injector::webhook::namespaces::StaticNamespaces;
use weft_injector::webhook::server::{serve, ServerConfig, State};
use weft_injector::webhook::tls::CertStore;

/// A CA and a serving certificate for `localhost` signed by it.
struct Pki {
    ca_der: CertificateDer<'static>,
    cert_pem: String,
    key_pem: String,
}

fn pki() -> Pki {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let key = KeyPair::generate().unwrap();
    let params = CertificateParams::new(vec![
        "localhost".to_string(),
        "weft-injector.weft.svc".to_string(),
    ])
    .unwrap();
    let cert = params.signed_by(&key, &issuer).unwrap();
    Pki {
        ca_der: ca.der().clone(),
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    }
}

fn write_pki(dir: &Path, p: &Pki) {
    std::fs::write(dir.join("tls.crt"), &p.cert_pem).unwrap();
    std::fs::write(dir.join("tls.key"), &p.key_pem).unwrap();
}

struct Webhook {
    addr: SocketAddr,
    certs: Arc<CertStore>,
    _dir: TempDir,
    _stop: tokio::sync::oneshot::Sender<()>,
}

struct TempDir(std::path::PathBuf);

impl TempDir {
    fn new() -> Self {
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let p = std::env::temp_dir().join(format!("weft-injector-test-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&p).unwrap();
        Self(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

async fn start(p: &Pki, server: ServerConfig) -> Webhook {
    let dir = TempDir::new();
    write_pki(&dir.0, p);
    let certs = CertStore::open(&dir.0.join("tls.crt"), &dir.0.join("tls.key")).unwrap();
    let state = Arc::new(State::new(
        InjectConfig {
            destination_addr: Some("weft-destination.weft:8086".into()),
            ..Default::default()
        },
        Box::new(StaticNamespaces::new([NamespaceMeta::enabled("shop")])),
        server,
    ));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(serve(listener, certs.clone(), state, async {
        let _ = rx.await;
    }));
    Webhook {
        addr,
        certs,
        _dir: dir,
        _stop: tx,
    }
}

async fn tls_connect(
    addr: SocketAddr,
    ca: &CertificateDer<'static>,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.clone()).unwrap();
    let cfg = rustls::ClientConfig::builder_with_provider(weft_injector::webhook::tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(cfg));
    let tcp = TcpStream::connect(addr).await?;
    connector
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
}

/// One HTTP/1.1 request over a fresh TLS connection; (status, body).
async fn request(
    addr: SocketAddr,
    ca: &CertificateDer<'static>,
    method: &str,
    path: &str,
    body: Vec<u8>,
) -> (u16, Vec<u8>) {
    let tls = tls_connect(addr, ca).await.unwrap();
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = http::Request::builder()
        .method(method)
        .uri(path)
        .header("host", "localhost")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))
        .unwrap();
    let resp = send.send_request(req).await.unwrap();
    let status = resp.status().as_u16();
    let body = resp
        .into_body()
        .collect()
        .await
        .unwrap()
        .to_bytes()
        .to_vec();
    (status, body)
}

async fn post_json(w: &Webhook, ca: &CertificateDer<'static>, body: Vec<u8>) -> (u16, Value) {
    let (status, body) = request(w.addr, ca, "POST", "/mutate", body).await;
    let v = serde_json::from_slice(&body).unwrap_or_else(|e| {
        panic!(
            "response is not JSON ({e}): {}",
            String::from_utf8_lossy(&body)
        )
    });
    (status, v)
}

/// An AdmissionReview as kube-apiserver sends it for `kubectl run` in namespace `ns`.
fn review(ns: &str, pod_annotations: Value) -> Value {
    json!({
        "kind": "AdmissionReview",
        "apiVersion": "admission.k8s.io/v1",
        "request": {
            "uid": "705ab4f5-6393-11e8-b7cc-42010a800002",
            "kind": { "group": "", "version": "v1", "kind": "Pod" },
            "resource": { "group": "", "version": "v1", "resource": "pods" },
            "requestKind": { "group": "", "version": "v1", "kind": "Pod" },
            "requestResource": { "group": "", "version": "v1", "resource": "pods" },
            "name": "web",
            "namespace": ns,
            "operation": "CREATE",
            "userInfo": { "username": "admin", "uid": "014fbff9a07c", "groups": ["system:authenticated"] },
            "object": {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {
                    "name": "web",
                    "namespace": ns,
                    "labels": { "run": "web" },
                    "annotations": pod_annotations,
                    "creationTimestamp": null
                },
                "spec": {
                    "containers": [{
                        "name": "web",
                        "image": "nginx:1.27",
                        "ports": [{ "name": "http", "containerPort": 80, "protocol": "TCP" }],
                        "resources": {},
                        "terminationMessagePath": "/dev/termination-log",
                        "terminationMessagePolicy": "File",
                        "imagePullPolicy": "IfNotPresent"
                    }],
                    "restartPolicy": "Always",
                    "dnsPolicy": "ClusterFirst",
                    "serviceAccountName": "default",
                    "securityContext": {},
                    "schedulerName": "default-scheduler",
                    "enableServiceLinks": true
                },
                "status": {}
            },
            "oldObject": null,
            "dryRun": false,
            "options": { "kind": "CreateOptions", "apiVersion": "meta.k8s.io/v1", "fieldManager": "kubectl-run" }
        }
    })
}

fn response(v: &Value) -> &Value {
    assert_eq!(v["apiVersion"], "admission.k8s.io/v1", "{v}");
    assert_eq!(v["kind"], "AdmissionReview", "{v}");
    assert_eq!(
        v["response"]["uid"], "705ab4f5-6393-11e8-b7cc-42010a800002",
        "{v}"
    );
    &v["response"]
}

#[tokio::test]
async fn injects_over_tls_and_answers_everything_else_cleanly() {
    let p = pki();
    let w = start(&p, ServerConfig::default()).await;
    let ca = &p.ca_der;

    // Injection: a JSONPatch that, applied to the pod, adds the proxy.
    let rv = review("shop", json!({}));
    let (status, v) = post_json(&w, ca, serde_json::to_vec(&rv).unwrap()).await;
    assert_eq!(status, 200);
    let r = response(&v);
    assert_eq!(r["allowed"], true, "{v}");
    assert_eq!(r["patchType"], "JSONPatch", "{v}");
    let patch = base64::engine::general_purpose::STANDARD
        .decode(r["patch"].as_str().unwrap())
        .unwrap();
    let patch: json_patch::Patch = serde_json::from_slice(&patch).unwrap();
    let mut pod = rv["request"]["object"].clone();
    json_patch::patch(&mut pod, &patch).unwrap();
    let names = |list: &Value| -> Vec<String> {
        list.as_array()
            .unwrap()
            .iter()
            .map(|c| c["name"].as_str().unwrap().to_string())
            .collect()
    };
    // A native sidecar (the default): after weft-init, restartPolicy Always.
    assert_eq!(names(&pod["spec"]["containers"]), ["web"]);
    assert_eq!(
        names(&pod["spec"]["initContainers"]),
        ["weft-init", "weft-proxy"]
    );
    assert_eq!(pod["spec"]["initContainers"][1]["restartPolicy"], "Always");
    let env = pod["spec"]["initContainers"][1]["env"].as_array().unwrap();
    assert!(env
        .iter()
        .any(|e| e["name"] == "WEFT_PROXY_DESTINATION_ADDR"
            && e["value"] == "weft-destination.weft:8086"));

    // Namespace not enabled, and pod opted out: allowed, no patch, a reason.
    for (ns, ann, why) in [
        ("other", json!({}), "namespace"),
        ("shop", json!({ "weft.dev/inject": "disabled" }), "disabled"),
    ] {
        let (status, v) = post_json(&w, ca, serde_json::to_vec(&review(ns, ann)).unwrap()).await;
        assert_eq!(status, 200);
        let r = response(&v);
        assert_eq!(r["allowed"], true, "{v}");
        assert!(r.get("patch").is_none(), "{v}");
        assert!(
            r["status"]["message"].as_str().unwrap().contains(why),
            "{v}"
        );
    }

    // An invalid annotation: denied, naming the annotation and the value.
    let rv = review(
        "shop",
        json!({ "config.weft.dev/skip-outbound-ports": "5432,postgres" }),
    );
    let (status, v) = post_json(&w, ca, serde_json::to_vec(&rv).unwrap()).await;
    assert_eq!(status, 200);
    let r = response(&v);
    assert_eq!(r["allowed"], false, "{v}");
    assert_eq!(r["status"]["code"], 400, "{v}");
    let msg = r["status"]["message"].as_str().unwrap();
    assert!(
        msg.contains("config.weft.dev/skip-outbound-ports") && msg.contains("postgres"),
        "{msg}"
    );

    // Wrong kind, wrong version, UPDATE, a pod that is not a pod: allowed, with a message.
    let mut deployment = review("shop", json!({}));
    deployment["request"]["kind"] =
        json!({ "group": "apps", "version": "v1", "kind": "Deployment" });
    let mut v1beta1 = review("shop", json!({}));
    v1beta1["apiVersion"] = json!("admission.k8s.io/v1beta1");
    let mut update = review("shop", json!({}));
    update["request"]["operation"] = json!("UPDATE");
    let mut garbage_pod = review("shop", json!({}));
    garbage_pod["request"]["object"]["spec"]["containers"] = json!("web");
    let mut no_object = review("shop", json!({}));
    no_object["request"]["object"] = Value::Null;
    for (name, rv, want) in [
        ("deployment", deployment, "apps/v1/Deployment"),
        ("v1beta1", v1beta1, "v1beta1"),
        ("update", update, "UPDATE"),
        ("garbage pod", garbage_pod, "does not parse"),
        ("no object", no_object, "no request.object"),
    ] {
        let (status, v) = post_json(&w, ca, serde_json::to_vec(&rv).unwrap()).await;
        assert_eq!(status, 200, "{name}");
        let r = response(&v);
        assert_eq!(r["allowed"], true, "{name}: {v}");
        assert!(r.get("patch").is_none(), "{name}: {v}");
        let msg = r["status"]["message"].as_str().unwrap();
        assert!(msg.contains(want), "{name}: {msg}");
    }

    // Bodies that cannot be answered as a review: 400 with a JSON error.
    for (body, want) in [
        (b"{not json".to_vec(), "not JSON"),
        (b"[]".to_vec(), "no request.uid"),
        (br#"{"request": {"uid": 7}}"#.to_vec(), "no request.uid"),
        (Vec::new(), "not JSON"),
    ] {
        let (status, v) = post_json(&w, ca, body).await;
        assert_eq!(status, 400);
        assert!(v["error"].as_str().unwrap().contains(want), "{v}");
    }

    // Oversized: 413 from the declared length, without reading 2 MiB.
    let mut big = serde_json::to_vec(&review("shop", json!({}))).unwrap();
    big.resize(2 * 1024 * 1024, b' ');
    let (status, v) = post_json(&w, ca, big).await;
    assert_eq!(status, 413);
    assert!(v["error"].as_str().unwrap().contains("1048576"), "{v}");

    // Other routes.
    let (status, _) = request(w.addr, ca, "GET", "/mutate", Vec::new()).await;
    assert_eq!(status, 405);
    for path in ["/ready", "/live"] {
        let (status, body) = request(w.addr, ca, "GET", path, Vec::new()).await;
        assert_eq!(
            (status, body.as_slice()),
            (200, b"ok\n".as_slice()),
            "{path}"
        );
    }
    let (status, body) = request(w.addr, ca, "GET", "/metrics", Vec::new()).await;
    assert_eq!(status, 200);
    let text = String::from_utf8(body).unwrap();
    assert!(
        text.contains("weft_injector_reviews_total{result=\"injected\"} 1\n"),
        "{text}"
    );
    assert!(
        text.contains("weft_injector_reviews_total{result=\"denied\"} 1\n"),
        "{text}"
    );
    assert!(
        text.contains("weft_injector_reviews_total{result=\"bad_request\"} 6\n"),
        "{text}"
    );
}

#[tokio::test]
async fn chunked_body_over_the_limit_gets_413() {
    let p = pki();
    let w = start(
        &p,
        ServerConfig {
            max_body_bytes: 4096,
            ..Default::default()
        },
    )
    .await;
    let mut tls = tls_connect(w.addr, &p.ca_der).await.unwrap();
    let chunk = vec![b'x'; 8192];
    let mut req = b"POST /mutate HTTP/1.1\r\nhost: localhost\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n".to_vec();
    req.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
    req.extend_from_slice(&chunk);
    req.extend_from_slice(b"\r\n0\r\n\r\n");
    tls.write_all(&req).await.unwrap();
    let mut resp = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), tls.read_to_end(&mut resp)).await;
    let text = String::from_utf8_lossy(&resp);
    assert!(text.starts_with("HTTP/1.1 413"), "{text}");
    assert!(text.contains("4096 bytes"), "{text}");
}

#[tokio::test]
async fn rotated_certificate_is_served_without_a_restart() {
    let first = pki();
    let w = start(&first, ServerConfig::default()).await;
    tokio::spawn(w.certs.clone().watch(Duration::from_millis(50)));
    let (status, _) = request(w.addr, &first.ca_der, "GET", "/ready", Vec::new()).await;
    assert_eq!(status, 200);

    // A broken write (a key that does not match) is not picked up: the old pair stays.
    let second = pki();
    let dir = w._dir.0.clone();
    std::fs::write(dir.join("tls.crt"), &second.cert_pem).unwrap();
    std::fs::write(dir.join("tls.key"), &first.key_pem).unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        tls_connect(w.addr, &first.ca_der).await.is_ok(),
        "the old certificate must stay in use"
    );

    // The complete new pair is picked up: clients trusting the new CA connect, old ones fail.
    write_pki(&dir, &second);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if tls_connect(w.addr, &second.ca_der).await.is_ok() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the new certificate was not served within 5s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(tls_connect(w.addr, &first.ca_der).await.is_err());
    let (status, _) = request(w.addr, &second.ca_der, "GET", "/live", Vec::new()).await;
    assert_eq!(status, 200);
}

#[test]
fn bad_certificate_files_are_named() {
    let dir = TempDir::new();
    let cert = dir.0.join("tls.crt");
    let key = dir.0.join("tls.key");
    let err = CertStore::open(&cert, &key).unwrap_err().to_string();
    assert!(err.contains("tls.crt"), "{err}");
    std::fs::write(&cert, "not pem").unwrap();
    let err = CertStore::open(&cert, &key).unwrap_err().to_string();
    assert!(
        err.contains("tls.crt") && err.contains("no CERTIFICATE"),
        "{err}"
    );
    let p = pki();
    std::fs::write(&cert, &p.cert_pem).unwrap();
    std::fs::write(&key, "junk").unwrap();
    let err = CertStore::open(&cert, &key).unwrap_err().to_string();
    assert!(err.contains("tls.key"), "{err}");
    std::fs::write(&key, pki().key_pem).unwrap();
    let err = CertStore::open(&cert, &key).unwrap_err().to_string();
    assert!(err.contains("do not match"), "{err}");
}

//! `weft cni status --all-nodes`: the agent pods come from the API server (the project's
//! fake one), each is asked at its pod address, and a pod without an address is reported
//! rather than skipped.

#![allow(clippy::unwrap_used)] // tests fail loudly on unexpected errors

mod support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::process::Command;

use serde_json::{json, Value};
use weft_controller::testing::fake_apiserver::FakeApiServer;

/// A stand-in agent on `addr` answering every request with `status` (as `/status` does).
fn fake_agent(addr: SocketAddr, status: Value) {
    let listener = TcpListener::bind(addr).unwrap();
    std::thread::spawn(move || {
        for mut conn in listener.incoming().flatten() {
            let mut buf = [0u8; 1024];
            let _ = conn.read(&mut buf);
            let body = status.to_string();
            let _ = conn.write_all(
                format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                )
                .as_bytes(),
            );
        }
    });
}

fn status(node: &str) -> Value {
    json!({
        "node": node, "version": "0.1.0", "ready": true,
        "last_sync": "2026-12-05T22:00:00.000Z", "last_sync_age_seconds": 1.0,
        "endpoints": 2,
        "programs": {"object": "abc", "attached_interfaces": 2, "endpoints_not_attached": []},
        "policies": {"network_policies": 1, "programmed": 1},
        "maps": [], "problems": []
    })
}

fn agent_pod(name: &str, node: &str, ip: Option<&str>) -> Value {
    let mut status = json!({"phase": "Running"});
    if let Some(ip) = ip {
        status["podIP"] = json!(ip);
    }
    json!({
        "kind": "Pod",
        "metadata": {"namespace": "weft", "name": name,
                     "labels": {"app.kubernetes.io/name": "weft-cni-agent"}},
        "spec": {"nodeName": node, "hostNetwork": true, "containers": [{"name": "agent"}]},
        "status": status,
    })
}

fn weft(args: &[&str], kubeconfig: &str) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_weft"))
        .args(["cni", "status"])
        .args(args)
        .env("KUBECONFIG", kubeconfig)
        .env("HOME", "/nonexistent")
        .env_remove("KUBERNETES_SERVICE_HOST")
        .output()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_nodes_asks_every_agent_pod_the_api_server_lists() {
    let port = weft_proto::loopback::free_addr().unwrap().port();
    fake_agent(SocketAddr::from(([127, 0, 0, 1], port)), status("node-1"));
    fake_agent(SocketAddr::from(([127, 0, 0, 2], port)), status("node-2"));
    let fake = FakeApiServer::start().await.unwrap();
    fake.apply(agent_pod("weft-cni-agent-a", "node-1", Some("127.0.0.1")));
    fake.apply(agent_pod("weft-cni-agent-b", "node-2", Some("127.0.0.2")));
    fake.apply(agent_pod("weft-cni-agent-c", "node-3", None));
    // Not an agent: ignored.
    fake.apply(
        json!({"kind": "Pod", "metadata": {"namespace": "weft", "name": "weft-controller-0",
        "labels": {"app.kubernetes.io/name": "weft-controller"}},
        "spec": {"containers": [{"name": "c"}]}, "status": {"podIP": "127.0.0.3"}}),
    );
    let dir = tempfile::tempdir().unwrap();
    let config = support::kubeconfig(dir.path(), &format!("http://{}", fake.addr()));
    let port_arg = port.to_string();

    let out = tokio::task::spawn_blocking({
        let config = config.clone();
        move || {
            let args = [
                "--all-nodes",
                "-n",
                "weft",
                "--port",
                &port_arg,
                "-o",
                "json",
            ];
            weft(&args, &config)
        }
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    // node-3's agent has no address: a problem, so exit 1.
    assert_eq!(
        out.status.code(),
        Some(1),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let answers: Vec<Value> = serde_json::from_str(&stdout).unwrap();
    assert_eq!(answers.len(), 3, "{stdout}");
    assert_eq!(answers[0]["status"]["node"], "node-1", "{stdout}");
    assert_eq!(answers[0]["agent"], format!("127.0.0.1:{port}"));
    assert_eq!(answers[1]["status"]["node"], "node-2", "{stdout}");
    let missing = answers[2]["error"].as_str().unwrap();
    assert!(
        missing.contains("weft/weft-cni-agent-c")
            && missing.contains("node-3")
            && missing.contains("no address"),
        "{missing}"
    );

    // No agents in the namespace asked: said so, exit 1.
    let out = tokio::task::spawn_blocking({
        let config = config.clone();
        move || weft(&["--all-nodes", "-n", "elsewhere"], &config)
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(
        stdout.contains("no weft-cni-agent pods in namespace elsewhere"),
        "{stdout}"
    );

    // No API server: exit 2, naming why.
    let out = tokio::task::spawn_blocking(|| weft(&["--all-nodes"], "/nonexistent/kubeconfig"))
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.starts_with("weft cni status: "), "{stderr}");
}

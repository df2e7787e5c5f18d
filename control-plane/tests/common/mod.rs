//! Helpers shared by the integration tests.
#![allow(dead_code, clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use weft_controller::index::{Index, Resolution, ResolveConfig};
use weft_controller::model::names::parse_target;

/// A loopback address with a port that was free a moment ago.
pub fn free_port() -> std::net::SocketAddr {
    weft_proto::loopback::free_addr().expect("a free loopback port")
}

/// Polls `check` until it is true or `within` passes; panics with `what`.
pub async fn eventually(what: &str, within: Duration, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !check() {
        assert!(
            Instant::now() < deadline,
            "timed out after {within:?} waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The sorted endpoint addresses of a target, `None` when unknown.
pub fn endpoints(index: &Index, target: &str) -> Option<Vec<String>> {
    let t = parse_target(target, "default", "cluster.local").unwrap();
    match index.resolve(&t, &ResolveConfig::default()).0 {
        Resolution::Unknown => None,
        Resolution::Endpoints(set) => Some(set.keys().map(|a| a.to_string()).collect()),
    }
}

pub fn strings(v: &[&str]) -> Option<Vec<String>> {
    Some(v.iter().map(|s| s.to_string()).collect())
}

/// A fresh directory under the system temp dir, removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let path = std::env::temp_dir().join(format!(
            "weft-controller-{tag}-{}-{nanos}",
            std::process::id()
        ));
        std::fs::create_dir_all(&path).unwrap();
        TempDir(path)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    /// Writes a file atomically (write + rename), as editors and
    /// ConfigMap updates do.
    pub fn write(&self, name: &str, text: &str) {
        let tmp = self.0.join(format!(".{name}.tmp"));
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, self.0.join(name)).unwrap();
    }

    pub fn remove(&self, name: &str) {
        std::fs::remove_file(self.0.join(name)).unwrap();
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A Service, its slice and pods as YAML: `name` in `ns` on port 80 with
/// endpoints `ips` at targetPort 8080.
pub fn service_yaml(ns: &str, name: &str, cluster_ip: &str, ips: &[&str]) -> String {
    let mut out = format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n  clusterIP: {cluster_ip}\n  ports: [{{name: http, port: 80, targetPort: 8080}}]\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}-1\n  namespace: {ns}\n  labels: {{kubernetes.io/service-name: {name}}}\naddressType: IPv4\nports: [{{name: http, port: 8080}}]\nendpoints:\n"
    );
    // Pods are named after their IP so an endpoint keeps its pod across edits.
    let pod = |ip: &str| format!("{name}-{}", ip.replace('.', "-"));
    for ip in ips {
        let i = pod(ip);
        out.push_str(&format!(
            "  - addresses: [{ip}]\n    targetRef: {{kind: Pod, name: {i}}}\n"
        ));
    }
    for ip in ips {
        let i = pod(ip);
        out.push_str(&format!(
            "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {i}, namespace: {ns}, annotations: {{weft.dev/inject: enabled}}}}\nspec: {{serviceAccountName: {name}, containers: [{{name: app}}]}}\nstatus: {{phase: Running, podIP: {ip}}}\n"
        ));
    }
    out
}

//! A real `weft-controller --source dir:PATH` process and the manifests it reads.
//!
//! Services are written one file each; endpoints are loopback ports, so every endpoint gets
//! its own EndpointSlice whose named port `http` carries its port (the service's
//! `targetPort: http` resolves per endpoint). Files are written to a hidden temporary name
//! and renamed, so the controller never reads half a file.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::{admin_get, bin, free_addr};

/// A temporary manifest directory, removed on drop.
#[derive(Debug)]
pub struct ManifestDir {
    path: PathBuf,
}

impl ManifestDir {
    pub fn new(name: &str) -> Result<Self> {
        let path = std::env::temp_dir().join(format!(
            "weft-e2e-{name}-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
                .as_nanos()
        ));
        std::fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(Self { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes (atomically) `file` with `content`.
    pub fn write(&self, file: &str, content: &str) -> Result<()> {
        let tmp = self.path.join(format!(".{file}.tmp"));
        std::fs::write(&tmp, content).with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, self.path.join(file))?;
        Ok(())
    }

    /// Writes service `name` in namespace `ns` with `cluster_ip:port` and these endpoints.
    pub fn service(
        &self,
        ns: &str,
        name: &str,
        cluster_ip: &str,
        port: u16,
        endpoints: &[SocketAddr],
    ) -> Result<()> {
        self.write(
            &format!("{ns}-{name}.yaml"),
            &service_yaml(ns, name, cluster_ip, port, endpoints),
        )
    }
}

impl Drop for ManifestDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// A Service with one port named `http` and one EndpointSlice per endpoint.
pub fn service_yaml(
    ns: &str,
    name: &str,
    cluster_ip: &str,
    port: u16,
    endpoints: &[SocketAddr],
) -> String {
    let mut out = format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: {ns}}}\n\
         spec:\n  clusterIP: {cluster_ip}\n  ports: [{{name: http, port: {port}, targetPort: http}}]\n"
    );
    for ep in endpoints {
        let (ip, p) = (ep.ip(), ep.port());
        let family = if ip.is_ipv4() { "IPv4" } else { "IPv6" };
        out.push_str(&format!(
            "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
             metadata:\n  name: {name}-{p}\n  namespace: {ns}\n  labels: {{kubernetes.io/service-name: {name}}}\n\
             addressType: {family}\nports: [{{name: http, port: {p}}}]\n\
             endpoints:\n  - addresses: [\"{ip}\"]\n    conditions: {{ready: true}}\n"
        ));
    }
    out
}

/// A running controller, killed on drop.
#[derive(Debug)]
pub struct Controller {
    child: Option<Child>,
    dir: PathBuf,
    pub destination: SocketAddr,
    pub admin: SocketAddr,
    pub identity: SocketAddr,
    /// Extra command-line arguments (e.g. `--dev-ca DIR`).
    args: Vec<String>,
}

impl Controller {
    /// Starts `weft-controller --source dir:<dir>` on free loopback ports; waits for `/ready`.
    pub fn start(dir: &Path) -> Result<Self> {
        let mut c = Self::prepare(dir, &[])?;
        c.spawn()?;
        Ok(c)
    }

    /// Picks the ports but does not start the process yet ([`Controller::launch`] does), so
    /// proxies can be pointed at a controller that is not up.
    pub fn prepare(dir: &Path, args: &[&str]) -> Result<Self> {
        Ok(Self {
            child: None,
            dir: dir.to_path_buf(),
            destination: free_addr()?,
            admin: free_addr()?,
            identity: free_addr()?,
            args: args.iter().map(|a| a.to_string()).collect(),
        })
    }

    /// Starts a prepared controller and waits for `/ready`.
    pub fn launch(&mut self) -> Result<()> {
        self.spawn()
    }

    fn spawn(&mut self) -> Result<()> {
        let child = Command::new(bin("weft-controller")?)
            .arg("--source")
            .arg(format!("dir:{}", self.dir.display()))
            .arg("--destination-addr")
            .arg(self.destination.to_string())
            .arg("--identity-addr")
            .arg(self.identity.to_string())
            .arg("--admin-addr")
            .arg(self.admin.to_string())
            .args(&self.args)
            .env(
                "WEFT_CONTROLLER_LOG",
                std::env::var("WEFT_TEST_CONTROLLER_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdin(Stdio::null())
            .spawn()
            .context("spawning weft-controller (cargo build -p weft-controller)")?;
        self.child = Some(child);
        self.wait_ready(Duration::from_secs(10))
    }

    fn wait_ready(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Some(status) = child.try_wait()? {
                    bail!("weft-controller exited before becoming ready: {status}");
                }
            }
            if let Ok((200, _)) = admin_get(self.admin, "/ready") {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("weft-controller not ready within {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL, and wait for the process to be gone.
    pub fn kill(&mut self) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            child.kill()?;
            child.wait()?;
        }
        Ok(())
    }

    /// Starts again on the same ports (after [`Controller::kill`]).
    pub fn restart(&mut self) -> Result<()> {
        self.kill()?;
        self.spawn()
    }

    /// The proxy's setting for this controller.
    pub fn env(&self) -> (String, String) {
        (
            "WEFT_PROXY_DESTINATION_ADDR".into(),
            self.destination.to_string(),
        )
    }
}

/// `weft-controller token --dev-ca DIR --namespace NS --service-account SA --out FILE`.
pub fn mint_token(dev_ca: &Path, ns: &str, sa: &str, out: &Path) -> Result<()> {
    let status = Command::new(bin("weft-controller")?)
        .arg("token")
        .arg("--dev-ca")
        .arg(dev_ca)
        .args(["--namespace", ns, "--service-account", sa, "--out"])
        .arg(out)
        .stdin(Stdio::null())
        .status()
        .context("running weft-controller token")?;
    if !status.success() {
        bail!("weft-controller token failed: {status}");
    }
    Ok(())
}

impl Drop for Controller {
    fn drop(&mut self) {
        let _ = self.kill();
    }
}

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

use crate::{admin_get, bin, free_addr, Proxy, ProxyOpts};

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

/// A Service like [`service_yaml`] whose endpoints are meshed pods: each endpoint's slice
/// entry points (`targetRef`) at a Pod annotated `weft.dev/inject: enabled` running as
/// ServiceAccount `sa`, so the controller gives it the identity
/// `spiffe://cluster.local/ns/<ns>/sa/<sa>` and the HTTP/2 hint. `opaque`: the pods list the
/// endpoint port as opaque.
pub fn meshed_service_yaml(
    ns: &str,
    name: &str,
    cluster_ip: &str,
    port: u16,
    endpoints: &[(SocketAddr, &str)],
    opaque: bool,
) -> String {
    let mut out = format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: {ns}}}\n\
         spec:\n  clusterIP: {cluster_ip}\n  ports: [{{name: http, port: {port}, targetPort: http}}]\n"
    );
    for (ep, sa) in endpoints {
        let (ip, p) = (ep.ip(), ep.port());
        let family = if ip.is_ipv4() { "IPv4" } else { "IPv6" };
        let pod = format!("{name}-{p}");
        let opaque_ann = if opaque {
            format!(", config.weft.dev/opaque-ports: \"{p}\"")
        } else {
            String::new()
        };
        out.push_str(&format!(
            "---\napiVersion: v1\nkind: Pod\n\
             metadata:\n  name: {pod}\n  namespace: {ns}\n  annotations: {{weft.dev/inject: enabled{opaque_ann}}}\n\
             spec:\n  serviceAccountName: {sa}\n  containers: [{{name: app, image: app, ports: [{{name: http, containerPort: {p}}}]}}]\n\
             status: {{podIP: \"{ip}\", phase: Running}}\n\
             ---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
             metadata:\n  name: {name}-{p}\n  namespace: {ns}\n  labels: {{kubernetes.io/service-name: {name}}}\n\
             addressType: {family}\nports: [{{name: http, port: {p}}}]\n\
             endpoints:\n  - addresses: [\"{ip}\"]\n    conditions: {{ready: true}}\n    targetRef: {{kind: Pod, name: {pod}}}\n"
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
    /// Runs with `--insecure-plaintext`: proxies reach it at `http://` addresses.
    pub plaintext: bool,
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
    ///
    /// Without an issuer (`--dev-ca`, `--issuer-cert`) the controller cannot serve TLS, so it
    /// gets `--insecure-plaintext` (and [`Controller::env`] an `http://` address); with one it
    /// serves TLS unless `args` say `--insecure-plaintext` themselves.
    pub fn prepare(dir: &Path, args: &[&str]) -> Result<Self> {
        let mut args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        let has = |flag: &str| args.iter().any(|a| a == flag);
        if !has("--dev-ca") && !has("--issuer-cert") && !has("--insecure-plaintext") {
            args.push("--insecure-plaintext".into());
        }
        let plaintext = args.iter().any(|a| a == "--insecure-plaintext");
        Ok(Self {
            child: None,
            dir: dir.to_path_buf(),
            destination: free_addr()?,
            admin: free_addr()?,
            identity: free_addr()?,
            args,
            plaintext,
        })
    }

    /// A controller address as a proxy is given it: `http://` when plaintext.
    pub fn proxy_addr(&self, addr: SocketAddr) -> String {
        if self.plaintext {
            format!("http://{addr}")
        } else {
            addr.to_string()
        }
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

    /// Waits until the index holds at least `n` objects of `kind` (say after writing
    /// manifests to a running controller's directory).
    pub fn wait_objects(&self, kind: &str, n: f64) -> Result<()> {
        let admin = self.admin;
        crate::eventually(Duration::from_secs(10), || {
            let (_, body) = admin_get(admin, "/metrics")?;
            Ok(
                crate::Metrics::parse(&body)
                    .sum("weft_controller_index_objects", &[("kind", kind)])
                    >= n,
            )
        })
        .with_context(|| format!("the controller did not index {n} {kind} objects"))
    }

    /// The proxy's setting for this controller (mTLS, or `http://` when plaintext).
    pub fn env(&self) -> (String, String) {
        (
            "WEFT_PROXY_DESTINATION_ADDR".into(),
            self.proxy_addr(self.destination),
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

/// A controller issuing certificates from a development CA (`--dev-ca`), with its manifest
/// directory; mints tokens and writes the proxies' identity settings.
#[derive(Debug)]
pub struct DevCa {
    pub manifests: ManifestDir,
    pub ca: ManifestDir,
    pub controller: Controller,
}

impl DevCa {
    /// A prepared (not yet started) controller with `--dev-ca` plus `args`; the CA is created
    /// on disk at once (`weft-controller dev-ca`), so tokens can be minted before launch.
    pub fn prepare(name: &str, args: &[&str]) -> Result<Self> {
        let manifests = ManifestDir::new(&format!("{name}-manifests"))?;
        let ca = ManifestDir::new(&format!("{name}-ca"))?;
        let ca_dir = ca.path().display().to_string();
        let mut all = vec!["--dev-ca", ca_dir.as_str()];
        all.extend_from_slice(args);
        let controller = Controller::prepare(manifests.path(), &all)?;
        Ok(Self {
            manifests,
            ca,
            controller,
        })
    }

    /// [`DevCa::prepare`] and launch.
    pub fn start(name: &str, args: &[&str]) -> Result<Self> {
        let mut s = Self::prepare(name, args)?;
        s.controller.launch()?;
        Ok(s)
    }

    /// The trust-anchor bundle proxies read.
    pub fn anchors(&self) -> PathBuf {
        self.ca.path().join("trust-anchors.pem")
    }

    /// A token for `ns`/`sa`, written to the CA directory.
    pub fn token(&self, ns: &str, sa: &str) -> Result<PathBuf> {
        let out = self.ca.path().join(format!("{ns}-{sa}.token"));
        mint_token(self.ca.path(), ns, sa, &out)?;
        Ok(out)
    }

    /// A proxy running as `ns`/`sa` with a token minted for it, ready (it holds a certificate,
    /// and with `discovery` its controller has served): `opts` as given, its `env` after the
    /// identity settings (and the controller's address with `discovery`).
    pub fn meshed_proxy(
        &self,
        ns: &str,
        sa: &str,
        discovery: bool,
        opts: ProxyOpts,
    ) -> Result<Proxy> {
        let token = self.token(ns, sa)?;
        let mut env = self.proxy_env(ns, sa, &token);
        if discovery {
            env.push(self.controller.env());
        }
        env.extend(opts.env);
        let mut p = Proxy::spawn(ProxyOpts { env, ..opts })?;
        p.wait_ready(Duration::from_secs(15))?;
        Ok(p)
    }

    /// The identity settings of a proxy running as `ns`/`sa` with `token`.
    pub fn proxy_env(&self, ns: &str, sa: &str, token: &Path) -> Vec<(String, String)> {
        vec![
            (
                "WEFT_PROXY_IDENTITY_ADDR".into(),
                self.controller.proxy_addr(self.controller.identity),
            ),
            ("WEFT_PROXY_NAMESPACE".into(), ns.into()),
            ("WEFT_PROXY_SERVICE_ACCOUNT".into(), sa.into()),
            ("WEFT_PROXY_POD_NAME".into(), format!("{sa}-0")),
            (
                "WEFT_PROXY_IDENTITY_TOKEN_FILE".into(),
                token.display().to_string(),
            ),
            (
                "WEFT_PROXY_TRUST_ANCHORS".into(),
                self.anchors().display().to_string(),
            ),
        ]
    }
}

//! Helpers for the namespace tests: root check, network namespaces, a fake
//! node agent served with `weft_cni::agent_proto`, running the plugin like a
//! container runtime does, and connectivity probes.
#![allow(dead_code)]

use std::fs::File;
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use weft_cni::agent_proto::{self, Handler, Request, Response};

/// The plugin binary under test.
pub const PLUGIN: &str = env!("CARGO_BIN_EXE_weft-cni");
/// Where Debian's containernetworking-plugins live (scripts/setup.sh installs them).
pub const CNI_BIN_DIR: &str = "/usr/lib/cni";

/// `true` when the test may run. Without root it is skipped with a message,
/// or fails when `CI=true` (CI runs as root; a skip there would hide the tests).
pub fn require_root(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        if !Path::new(CNI_BIN_DIR).join("host-local").exists() {
            panic!("{test}: {CNI_BIN_DIR}/host-local is missing: install containernetworking-plugins (scripts/setup.sh)");
        }
        return true;
    }
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!(
            "{test}: needs root (network namespaces, veth pairs); CI must run the tests as root"
        );
    }
    eprintln!("skipping {test}: needs root (network namespaces, veth pairs)");
    false
}

static SEQ: AtomicUsize = AtomicUsize::new(0);

/// A named network namespace (`ip netns add`), deleted on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(tag: &str) -> Result<Netns> {
        let name = format!(
            "wcni-{}-{}-{tag}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        );
        ip(&["netns", "add", &name])?;
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// A node: a namespace standing in for the host, with addresses of its
    /// own on `lo` (10.250.0.1, fd00:250::1) to talk to pods from.
    pub fn node() -> Result<Netns> {
        let ns = Netns::new("node")?;
        ns.ip(&["addr", "add", "10.250.0.1/32", "dev", "lo"])?;
        ns.ip(&["-6", "addr", "add", "fd00:250::1/128", "dev", "lo"])?;
        Ok(ns)
    }

    pub fn path(&self) -> String {
        format!("/run/netns/{}", self.name)
    }

    /// `ip -n <ns> args...`, stdout.
    pub fn ip(&self, args: &[&str]) -> Result<String> {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend_from_slice(args);
        ip(&all)
    }

    /// Interface names in this namespace.
    pub fn links(&self) -> Result<Vec<String>> {
        let v: Value = serde_json::from_str(&self.ip(&["-j", "link", "show"])?)?;
        Ok(v.as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|l| l["ifname"].as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default())
    }

    /// The index of link `name`.
    pub fn ifindex(&self, name: &str) -> Result<u32> {
        let v: Value = serde_json::from_str(&self.ip(&["-j", "link", "show", "dev", name])?)?;
        v[0]["ifindex"]
            .as_u64()
            .map(|i| i as u32)
            .context("no ifindex")
    }

    /// All routes (both families, main table) as `ip` prints them.
    pub fn routes(&self) -> Result<String> {
        Ok(format!(
            "{}{}",
            self.ip(&["route", "show"])?,
            self.ip(&["-6", "route", "show"])?
        ))
    }

    /// Runs `f` on a thread inside this namespace.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T> {
        let file = File::open(self.path())?;
        std::thread::scope(|s| {
            s.spawn(|| {
                // SAFETY: setns with an open netns fd changes only this thread.
                if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    bail!("setns {}: {}", self.name, std::io::Error::last_os_error());
                }
                Ok(f())
            })
            .join()
            .map_err(|_| anyhow::anyhow!("thread in {} panicked", self.name))?
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = ip(&["netns", "del", &self.name]);
    }
}

pub fn ip(args: &[&str]) -> Result<String> {
    let out = Command::new("ip").args(args).output().context("run ip")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A fake node agent: records every request, answers `ok` (STATUS answers
/// as told by `ready`).
#[derive(Default)]
pub struct Recorder {
    pub requests: Mutex<Vec<Request>>,
    pub ready: Mutex<bool>,
}

impl Handler for Recorder {
    async fn handle(&self, request: Request) -> Response {
        let status = matches!(request, Request::Status);
        self.requests.lock().expect("lock").push(request);
        if status && !*self.ready.lock().expect("lock") {
            return Response::Error {
                msg: "datapath not loaded yet".into(),
            };
        }
        Response::Ok
    }
}

pub struct FakeAgent {
    pub socket: PathBuf,
    pub recorder: Arc<Recorder>,
    _dir: tempfile::TempDir,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl FakeAgent {
    pub fn start() -> Result<FakeAgent> {
        let dir = tempfile::tempdir()?;
        let socket = dir.path().join("cni.sock");
        let recorder = Arc::new(Recorder {
            ready: Mutex::new(true),
            ..Recorder::default()
        });
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let (path, handler) = (socket.clone(), recorder.clone());
        let thread = std::thread::spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = ready_tx.send(Err(e.to_string()));
                    return;
                }
            };
            rt.block_on(async move {
                let listener = match agent_proto::bind(&path) {
                    Ok(l) => l,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e.to_string()));
                        return;
                    }
                };
                let _ = ready_tx.send(Ok(()));
                tokio::select! {
                    _ = agent_proto::serve(listener, handler) => {}
                    _ = stop_rx => {}
                }
            });
        });
        ready_rx.recv()?.map_err(anyhow::Error::msg)?;
        Ok(FakeAgent {
            socket,
            recorder,
            _dir: dir,
            stop: Some(stop_tx),
            thread: Some(thread),
        })
    }

    pub fn requests(&self) -> Vec<Request> {
        self.recorder.requests.lock().expect("lock").clone()
    }

    pub fn set_ready(&self, ready: bool) {
        *self.recorder.ready.lock().expect("lock") = ready;
    }

    pub fn socket_str(&self) -> String {
        self.socket.display().to_string()
    }
}

impl Drop for FakeAgent {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A host-local IPAM section over `ranges` in a temp data dir.
pub struct HostLocal {
    pub dir: tempfile::TempDir,
}

impl HostLocal {
    pub fn new() -> Result<HostLocal> {
        Ok(HostLocal {
            dir: tempfile::tempdir()?,
        })
    }

    pub fn ipam(&self, ranges: &[&[&str]]) -> Value {
        let ranges: Vec<Value> = ranges
            .iter()
            .map(|r| json!(r.iter().map(|s| json!({ "subnet": s })).collect::<Vec<_>>()))
            .collect();
        json!({ "type": "host-local", "dataDir": self.dir.path(), "ranges": ranges })
    }

    /// Lease files left in the data dir (host-local's lock and
    /// last-reserved bookkeeping are not leases).
    pub fn leases(&self) -> Result<Vec<String>> {
        let mut out = Vec::new();
        for net in std::fs::read_dir(self.dir.path())? {
            let net = net?;
            for f in std::fs::read_dir(net.path())? {
                let name = f?.file_name().to_string_lossy().into_owned();
                if name != "lock" && !name.starts_with("last_reserved_ip") {
                    out.push(name);
                }
            }
        }
        Ok(out)
    }
}

/// What a plugin run printed and how it exited.
#[derive(Debug, Clone)]
pub struct Ran {
    pub code: i32,
    pub stdout: String,
}

impl Ran {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.stdout).unwrap_or(Value::Null)
    }

    /// Asserts success and returns the printed JSON (Null if nothing).
    #[track_caller]
    pub fn ok(&self) -> Value {
        assert_eq!(self.code, 0, "plugin failed: {}", self.stdout);
        self.json()
    }

    /// Asserts a spec error object with `code`; returns its `msg`.
    #[track_caller]
    pub fn err(&self, code: u64) -> String {
        assert_ne!(self.code, 0, "plugin succeeded: {}", self.stdout);
        let v = self.json();
        assert_eq!(
            v["code"].as_u64(),
            Some(code),
            "wrong error: {}",
            self.stdout
        );
        assert!(v["cniVersion"].is_string(), "{}", self.stdout);
        v["msg"].as_str().unwrap_or_default().to_string()
    }
}

/// One invocation's environment.
#[derive(Debug, Clone)]
pub struct Call {
    pub command: &'static str,
    pub container_id: String,
    pub netns: Option<String>,
    pub ifname: String,
    pub path: Option<String>,
    pub args: String,
}

impl Call {
    pub fn new(command: &'static str, container_id: &str, netns: &str) -> Call {
        Call {
            command,
            container_id: container_id.to_string(),
            netns: Some(netns.to_string()),
            ifname: "eth0".into(),
            path: Some(CNI_BIN_DIR.into()),
            args: format!(
                "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=pod-{container_id}"
            ),
        }
    }

    pub fn command(&self, command: &'static str) -> Call {
        Call {
            command,
            ..self.clone()
        }
    }

    pub fn env(&self) -> Vec<(String, String)> {
        let mut env = vec![
            ("CNI_COMMAND".to_string(), self.command.to_string()),
            ("CNI_CONTAINERID".to_string(), self.container_id.clone()),
            ("CNI_IFNAME".to_string(), self.ifname.clone()),
            ("CNI_ARGS".to_string(), self.args.clone()),
        ];
        if let Some(n) = &self.netns {
            env.push(("CNI_NETNS".into(), n.clone()));
        }
        if let Some(p) = &self.path {
            env.push(("CNI_PATH".into(), p.clone()));
        }
        env
    }

    /// Runs `binary` (the plugin unless told otherwise) in `node` the way a
    /// runtime does: a process with the conf on stdin and the CNI_* env.
    pub fn exec_in(&self, node: &Netns, binary: &str, conf: &Value) -> Result<Ran> {
        self.exec_bytes(node, binary, &serde_json::to_vec(conf)?)
    }

    /// Runs `binary` in `node` with `stdin` as given (for malformed input).
    pub fn exec_bytes(&self, node: &Netns, binary: &str, stdin: &[u8]) -> Result<Ran> {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &node.name, binary]);
        for (k, _) in std::env::vars() {
            if k.starts_with("CNI_") {
                cmd.env_remove(k);
            }
        }
        cmd.envs(self.env())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut child = cmd.spawn().context("spawn plugin")?;
        child.stdin.take().context("stdin")?.write_all(stdin)?;
        let out = child.wait_with_output()?;
        Ok(Ran {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        })
    }

    /// Runs the plugin binary in `node`.
    pub fn exec(&self, node: &Netns, conf: &Value) -> Result<Ran> {
        self.exec_in(node, PLUGIN, conf)
    }

    /// Runs the plugin in-process (the library entry point) on the current
    /// thread, which must already be in the node's namespace.
    pub fn run_here(&self, conf: &Value) -> Ran {
        let env: weft_cni::EnvMap = self.env().into_iter().collect();
        let out = weft_cni::run(&env, &serde_json::to_vec(conf).unwrap_or_default());
        Ran {
            code: out.exit_code,
            stdout: out.stdout,
        }
    }
}

/// `conf` with `prevResult` set.
pub fn with_prev(conf: &Value, prev: &Value) -> Value {
    let mut c = conf.clone();
    c["prevResult"] = prev.clone();
    c
}

/// Connects over TCP from namespace `from` to `to_ip` in namespace `to`:
/// a listener in `to`, a connect and a short exchange from `from`.
pub fn tcp_check(from: &Netns, to: &Netns, to_ip: IpAddr) -> Result<()> {
    let listener = to.run(move || TcpListener::bind(SocketAddr::new(to_ip, 0)))??;
    let port = listener.local_addr()?.port();
    let server = std::thread::spawn(move || -> std::io::Result<()> {
        listener.set_nonblocking(false)?;
        let (mut s, _) = listener.accept()?;
        let mut buf = [0u8; 4];
        s.read_exact(&mut buf)?;
        s.write_all(&buf)
    });
    let deadline = Instant::now() + Duration::from_secs(5);
    let result = from.run(move || -> Result<()> {
        loop {
            match TcpStream::connect_timeout(&SocketAddr::new(to_ip, port), Duration::from_secs(1))
            {
                Ok(mut s) => {
                    s.set_read_timeout(Some(Duration::from_secs(2)))?;
                    s.write_all(b"weft")?;
                    let mut buf = [0u8; 4];
                    s.read_exact(&mut buf)?;
                    anyhow::ensure!(&buf == b"weft", "echo mismatch");
                    return Ok(());
                }
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(e) => bail!("connect {}:{port} from {}: {e}", to_ip, "netns"),
            }
        }
    })?;
    match result {
        Ok(()) => {
            server
                .join()
                .map_err(|_| anyhow::anyhow!("server panicked"))??;
            Ok(())
        }
        Err(e) => {
            // Unblock the listener thread with a local connection, then report.
            let _ = to.run(move || {
                TcpStream::connect_timeout(
                    &SocketAddr::new(to_ip, port),
                    Duration::from_millis(200),
                )
            });
            let _ = server.join();
            Err(e).with_context(|| format!("TCP from {} to {to_ip} in {}", from.name, to.name))
        }
    }
}

/// The pod addresses (without prefix) in an ADD result.
pub fn result_ips(result: &Value) -> Vec<IpAddr> {
    result["ips"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|ip| ip["address"].as_str()?.split('/').next()?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

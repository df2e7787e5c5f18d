//! Helpers for the namespace tests: root check, network namespaces, a fake
//! node agent served with `weft_cni::agent_proto`, running the plugin like a
//! container runtime does, and connectivity probes.
#![allow(dead_code)]

use std::net::{IpAddr, SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use weft_cni::agent_proto::{self, Handler, Request, Response};
pub use weft_netns_testing::{Netns, CNI_BIN_DIR};

/// The plugin binary under test.
pub const PLUGIN: &str = env!("CARGO_BIN_EXE_weft-cni");

/// `true` when the test may run. Without root it is skipped with a message,
/// or fails when `CI=true` (CI runs as root; a skip there would hide the tests).
pub fn require_root(test: &str) -> bool {
    weft_netns_testing::require_root_and_cni_plugins(test, "network namespaces, veth pairs")
}

/// A node: a namespace standing in for the host, with addresses of its
/// own on `lo` (10.250.0.1, fd00:250::1) to talk to pods from.
pub fn node_ns() -> Result<Netns> {
    Netns::node(&["10.250.0.1/32", "fd00:250::1/128"])
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
        weft_netns_testing::host_local_leases(self.dir.path())
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

    /// Asserts a spec error object with `code`, a `cniVersion` and a non-empty
    /// `details` (optional in the spec; the plugin always fills it with the
    /// whole cause chain); returns its `msg`.
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
        assert!(
            v["details"].as_str().is_some_and(|d| !d.trim().is_empty()),
            "error object without details: {}",
            self.stdout
        );
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

    /// The same call with `CNI_IFNAME` set to `ifname` (`Call::new` uses `eth0`).
    pub fn with_ifname(self, ifname: &str) -> Call {
        Call {
            ifname: ifname.to_string(),
            ..self
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
        let out = weft_netns_testing::exec_cni(node, binary, self.env(), stdin, Stdio::inherit())?;
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
    let server = weft_netns_testing::TcpEcho::start(&to.name, SocketAddr::new(to_ip, 0))?;
    let port = server.port();
    let deadline = Instant::now() + Duration::from_secs(5);
    from.run(move || -> Result<()> {
        loop {
            match TcpStream::connect_timeout(&SocketAddr::new(to_ip, port), Duration::from_secs(1))
            {
                Ok(mut s) => {
                    let echoed = weft_netns_testing::echo(&mut s, Duration::from_secs(2));
                    anyhow::ensure!(echoed, "echo mismatch");
                    return Ok(());
                }
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(e) => bail!("connect {}:{port} from {}: {e}", to_ip, "netns"),
            }
        }
    })?
    .with_context(|| format!("TCP from {} to {to_ip} in {}", from.name, to.name))
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

//! The protocol between the plugin and the node agent (`weft-cni-agent`).
//!
//! A unix stream socket (default `/run/weft/cni.sock`, conf field
//! `agentSocket`) carrying newline-delimited JSON: the client writes one
//! [`Request`] per line, the server answers each with one [`Response`] line,
//! in order. The plugin opens one connection per invocation and sends one
//! request; a server must also accept several on one connection.
//!
//! ```text
//! → {"op":"add","container_id":"c1","netns":"/run/netns/p","ifname":"eth0","host_ifname":"lxc1a2b3c4d5e6f","host_ifindex":7,"ips":["10.0.0.5"],"pod_namespace":"default","pod_name":"web-0","chained":false}
//! ← {"result":"ok"}
//! → {"op":"status"}
//! ← {"result":"error","msg":"bpf programs not loaded"}
//! → {"op":"node"}
//! ← {"result":"node","name":"node-1","pod_cidrs":["10.244.1.0/24","fd00:10:244:1::/64"]}
//! ```
//!
//! What each request means to the agent:
//!
//! * `add`: register the endpoint; attach the datapath to `host_ifindex` and
//!   compute the pod's policy *before* answering, so the pod is isolated
//!   correctly from its first packet. An `error` answer fails the ADD.
//! * `del`: forget the endpoint. The plugin sends it when the agent is
//!   reachable and goes on without it otherwise: the agent must also collect
//!   endpoints whose host interface disappeared.
//! * `check`: is the endpoint registered and its datapath attached?
//! * `status`: is the agent ready to serve ADD (`ok`) or not (`error`)?
//! * `gc`: every attachment not in `valid_attachments` is stale.
//! * `node`: this node's name and pod CIDRs (its Node's `spec.podCIDRs`), answered
//!   `node`, or `error` saying why not (the Node is not known, or has no pod CIDR yet).
//!   The plugin asks only when the IPAM configuration says `"subnet": "usePodCidr"`
//!   ([`crate::pod_cidr`]). An agent older than the request answers an `error` naming
//!   the unknown variant `node` ([`is_unknown_request`]), which the plugin reports as such.
//!
//! Lines are at most [`MAX_LINE`] bytes; a malformed line gets an `error`
//! answer and the connection stays usable.

use std::future::Future;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::IpAddr;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};

/// The longest line either side reads.
pub const MAX_LINE: usize = 1 << 20;
/// How long the client waits to connect by default.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// How long the client waits for an answer by default.
pub const DEFAULT_REPLY_TIMEOUT: Duration = Duration::from_secs(10);

/// A request from the plugin.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    Add(AddRequest),
    Del(DelRequest),
    Check(CheckRequest),
    Status,
    Gc(GcRequest),
    /// This node's pod CIDRs (`{"op":"node"}`).
    Node,
}

impl Request {
    /// The request's name on the wire.
    pub fn op(&self) -> &'static str {
        match self {
            Request::Add(_) => "add",
            Request::Del(_) => "del",
            Request::Check(_) => "check",
            Request::Status => "status",
            Request::Gc(_) => "gc",
            Request::Node => "node",
        }
    }
}

/// Register a pod's endpoint (ADD).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AddRequest {
    pub container_id: String,
    pub netns: String,
    /// The interface inside the pod (`CNI_IFNAME`).
    pub ifname: String,
    /// The host side of the pod's veth, where the datapath attaches.
    pub host_ifname: String,
    pub host_ifindex: u32,
    /// The pod's addresses.
    pub ips: Vec<IpAddr>,
    #[serde(default)]
    pub pod_namespace: Option<String>,
    #[serde(default)]
    pub pod_name: Option<String>,
    /// Whether another plugin created the interface (chained mode).
    #[serde(default)]
    pub chained: bool,
}

/// Forget a pod's endpoint (DEL). Host fields are absent when the interface
/// is already gone.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DelRequest {
    pub container_id: String,
    pub ifname: String,
    #[serde(default)]
    pub netns: Option<String>,
    #[serde(default)]
    pub host_ifname: Option<String>,
    #[serde(default)]
    pub host_ifindex: Option<u32>,
    #[serde(default)]
    pub pod_namespace: Option<String>,
    #[serde(default)]
    pub pod_name: Option<String>,
}

/// Verify a pod's endpoint (CHECK).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckRequest {
    pub container_id: String,
    pub netns: String,
    pub ifname: String,
    pub host_ifname: String,
    pub host_ifindex: u32,
    pub ips: Vec<IpAddr>,
}

/// Collect stale endpoints (GC): all but these.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GcRequest {
    pub valid_attachments: Vec<Attachment>,
}

/// One attachment, as CNI identifies it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Attachment {
    pub container_id: String,
    pub ifname: String,
}

/// The agent's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum Response {
    Ok,
    /// The answer to an ADD (`{"result":"added","mtu":1450}`): the endpoint is registered,
    /// and what the plugin should still set up. `mtu`: the MTU for both veth ends (the node's
    /// encapsulation decides it); absent, the plugin keeps the network configuration's. A
    /// plugin treats `ok` to an ADD (an older agent, a fake one) as `added` with nothing set.
    Added {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        mtu: Option<u32>,
    },
    /// The answer to `node`: the node the agent runs on (`--node`) and its pod CIDRs, at most
    /// one per IP family, in the Node's order.
    Node {
        name: String,
        pod_cidrs: Vec<crate::result::IpNet>,
    },
    Error {
        msg: String,
    },
}

/// Whether `msg`, an agent's `error` answer, says that it does not know request `op`: what an
/// agent built before `op` existed answers (its JSON decoder's "unknown variant" for the
/// `op` tag, after "malformed request").
pub fn is_unknown_request(msg: &str, op: &str) -> bool {
    msg.contains(&format!("unknown variant `{op}`"))
}

/// Why a call to the agent failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to {socket}: {source}")]
    Connect {
        socket: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("no answer from {socket} within {after:?}")]
    Timeout { socket: PathBuf, after: Duration },
    #[error("talking to {socket}: {source}")]
    Io {
        socket: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{socket} closed the connection without answering")]
    Closed { socket: PathBuf },
    #[error("{socket} answered something that is not a response: {reason}")]
    Protocol { socket: PathBuf, reason: String },
}

/// A client of the agent's socket. Each [`call`](AgentClient::call) opens a
/// connection, sends one request and reads one answer, within the timeouts.
#[derive(Debug, Clone)]
pub struct AgentClient {
    socket: PathBuf,
    connect_timeout: Duration,
    reply_timeout: Duration,
}

impl AgentClient {
    /// A client of `socket` with the default timeouts.
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        AgentClient {
            socket: socket.into(),
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            reply_timeout: DEFAULT_REPLY_TIMEOUT,
        }
    }

    /// The same client with other timeouts.
    pub fn with_timeouts(mut self, connect: Duration, reply: Duration) -> Self {
        self.connect_timeout = connect;
        self.reply_timeout = reply;
        self
    }

    /// The socket this client talks to.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Sends `request` and returns the agent's answer.
    pub fn call(&self, request: &Request) -> Result<Response, ClientError> {
        let socket = || self.socket.clone();
        let io = |source: std::io::Error| {
            if matches!(
                source.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) {
                ClientError::Timeout {
                    socket: socket(),
                    after: self.reply_timeout,
                }
            } else {
                ClientError::Io {
                    socket: socket(),
                    source,
                }
            }
        };
        let stream = self.connect().map_err(|source| ClientError::Connect {
            socket: socket(),
            source,
        })?;
        stream
            .set_read_timeout(Some(self.reply_timeout))
            .map_err(io)?;
        stream
            .set_write_timeout(Some(self.reply_timeout))
            .map_err(io)?;
        let mut line = serde_json::to_vec(request).map_err(|e| ClientError::Protocol {
            socket: socket(),
            reason: e.to_string(),
        })?;
        line.push(b'\n');
        (&stream).write_all(&line).map_err(io)?;
        let mut reader = BufReader::new((&stream).take(MAX_LINE as u64 + 1));
        let mut answer = Vec::new();
        reader.read_until(b'\n', &mut answer).map_err(io)?;
        if answer.is_empty() {
            return Err(ClientError::Closed { socket: socket() });
        }
        if answer.last() != Some(&b'\n') {
            return Err(ClientError::Protocol {
                socket: socket(),
                reason: format!("answer cut short or longer than {MAX_LINE} bytes"),
            });
        }
        serde_json::from_slice(&answer).map_err(|e| ClientError::Protocol {
            socket: socket(),
            reason: e.to_string(),
        })
    }

    fn connect(&self) -> std::io::Result<UnixStream> {
        let addr = socket2::SockAddr::unix(&self.socket)?;
        let sock = socket2::Socket::new(socket2::Domain::UNIX, socket2::Type::STREAM, None)?;
        sock.connect_timeout(&addr, self.connect_timeout)?;
        sock.set_nonblocking(false)?;
        Ok(UnixStream::from(std::os::fd::OwnedFd::from(sock)))
    }
}

/// The agent's side: answers each request.
pub trait Handler: Send + Sync + 'static {
    /// The answer to `request`.
    fn handle(&self, request: Request) -> impl Future<Output = Response> + Send;
}

/// Binds the agent's socket at `path`: creates its directory and replaces a
/// stale socket file left by a previous agent. Needs a tokio runtime.
pub fn bind(path: &Path) -> std::io::Result<tokio::net::UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    tokio::net::UnixListener::bind(path)
}

/// Serves the protocol on `listener` with `handler`, one task per
/// connection, until accepting fails for a reason other than a transient one
/// (aborted connection, file descriptors exhausted).
pub async fn serve<H: Handler>(
    listener: tokio::net::UnixListener,
    handler: Arc<H>,
) -> std::io::Result<()> {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let handler = handler.clone();
                tokio::spawn(async move {
                    // A broken connection ends only itself.
                    let _ = serve_connection(stream, handler).await;
                });
            }
            Err(e) if is_transient_accept_error(&e) => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => return Err(e),
        }
    }
}

fn is_transient_accept_error(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::ConnectionAborted
            | std::io::ErrorKind::Interrupted
            | std::io::ErrorKind::ConnectionReset
    ) || matches!(
        e.raw_os_error(),
        Some(libc::EMFILE) | Some(libc::ENFILE) | Some(libc::ENOBUFS) | Some(libc::ENOMEM)
    )
}

async fn serve_connection<H: Handler>(
    stream: tokio::net::UnixStream,
    handler: Arc<H>,
) -> std::io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut reader = tokio::io::BufReader::new(read);
    loop {
        let mut line = Vec::new();
        let n = (&mut reader)
            .take(MAX_LINE as u64 + 1)
            .read_until(b'\n', &mut line)
            .await?;
        if n == 0 {
            return Ok(());
        }
        let too_long = line.len() > MAX_LINE;
        let response = if too_long {
            Response::Error {
                msg: format!("request longer than {MAX_LINE} bytes"),
            }
        } else {
            match serde_json::from_slice::<Request>(&line) {
                Ok(request) => handler.handle(request).await,
                Err(e) => Response::Error {
                    msg: format!("malformed request: {e}"),
                },
            }
        };
        let mut out = serde_json::to_vec(&response).map_err(std::io::Error::other)?;
        out.push(b'\n');
        write.write_all(&out).await?;
        if too_long {
            // The rest of that line cannot be told from the next request.
            return Ok(());
        }
    }
}

/// Tests: serves `handler` at `path` on a thread of its own (its own runtime), returning
/// once the socket is bound.
#[cfg(test)]
pub(crate) fn serve_on_thread<H: Handler>(handler: Arc<H>, path: &Path) {
    let (tx, rx) = std::sync::mpsc::channel();
    let p = path.to_path_buf();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async move {
            let listener = bind(&p).expect("bind");
            tx.send(()).expect("ready");
            let _ = serve(listener, handler).await;
        });
    });
    rx.recv().expect("server up");
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[derive(Default)]
    struct Recorder {
        seen: Mutex<Vec<Request>>,
        delay: Option<Duration>,
    }

    impl Handler for Recorder {
        async fn handle(&self, request: Request) -> Response {
            if let Some(d) = self.delay {
                tokio::time::sleep(d).await;
            }
            let answer = match &request {
                Request::Status => Response::Error {
                    msg: "not ready".into(),
                },
                _ => Response::Ok,
            };
            self.seen.lock().expect("lock").push(request);
            answer
        }
    }

    /// Serves `handler` on a socket in a fresh temp dir, on a thread of its own.
    fn start(handler: Arc<Recorder>) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("run/weft/cni.sock");
        serve_on_thread(handler, &path);
        (dir, path)
    }

    fn add() -> Request {
        Request::Add(AddRequest {
            container_id: "c1".into(),
            netns: "/run/netns/p".into(),
            ifname: "eth0".into(),
            host_ifname: "lxc1a2b3c4d5e6f".into(),
            host_ifindex: 7,
            ips: vec![
                "10.0.0.5".parse().expect("ip"),
                "fd00::5".parse().expect("ip"),
            ],
            pod_namespace: Some("default".into()),
            pod_name: Some("web-0".into()),
            chained: false,
        })
    }

    #[test]
    fn wire_format_is_pinned() {
        let json = serde_json::to_value(add()).expect("json");
        assert_eq!(json["op"], "add");
        assert_eq!(json["host_ifindex"], 7);
        assert_eq!(json["ips"][1], "fd00::5");
        assert_eq!(
            serde_json::to_string(&Request::Status).expect("json"),
            r#"{"op":"status"}"#
        );
        assert_eq!(
            serde_json::to_string(&Request::Node).expect("json"),
            r#"{"op":"node"}"#
        );
        assert_eq!(
            serde_json::to_string(&Response::Node {
                name: "n1".into(),
                pod_cidrs: vec![
                    "10.244.1.0/24".parse().expect("cidr"),
                    "fd00:10:244:1::/64".parse().expect("cidr")
                ],
            })
            .expect("json"),
            r#"{"result":"node","name":"n1","pod_cidrs":["10.244.1.0/24","fd00:10:244:1::/64"]}"#
        );
        assert_eq!(
            serde_json::to_string(&Response::Ok).expect("json"),
            r#"{"result":"ok"}"#
        );
        assert_eq!(
            serde_json::to_string(&Response::Error { msg: "x".into() }).expect("json"),
            r#"{"result":"error","msg":"x"}"#
        );
        let del: Request =
            serde_json::from_str(r#"{"op":"del","container_id":"c","ifname":"eth0"}"#)
                .expect("del");
        assert!(matches!(
            del,
            Request::Del(DelRequest {
                host_ifindex: None,
                ..
            })
        ));
        let gc = Request::Gc(GcRequest {
            valid_attachments: vec![Attachment {
                container_id: "c".into(),
                ifname: "eth0".into(),
            }],
        });
        let back: Request =
            serde_json::from_str(&serde_json::to_string(&gc).expect("json")).expect("gc");
        assert_eq!(back, gc);
    }

    #[test]
    fn add_answer_carries_the_mtu() {
        let added = Response::Added { mtu: Some(1450) };
        let text = serde_json::to_string(&added).expect("json");
        assert_eq!(text, r#"{"result":"added","mtu":1450}"#);
        assert_eq!(
            serde_json::from_str::<Response>(&text).expect("back"),
            added
        );
        let bare: Response = serde_json::from_str(r#"{"result":"added"}"#).expect("no mtu");
        assert_eq!(bare, Response::Added { mtu: None });
    }

    #[test]
    fn client_and_server_round_trip() {
        let handler = Arc::new(Recorder::default());
        let (_dir, path) = start(handler.clone());
        let client = AgentClient::new(&path);
        assert_eq!(client.call(&add()).expect("add"), Response::Ok);
        assert_eq!(
            client.call(&Request::Status).expect("status"),
            Response::Error {
                msg: "not ready".into()
            }
        );
        let seen = handler.seen.lock().expect("lock").clone();
        assert_eq!(seen, vec![add(), Request::Status]);
    }

    /// What an agent built before `node` existed answers it, recognised as such; a real
    /// refusal is not mistaken for it.
    #[test]
    fn an_older_agents_answer_to_node_is_recognised() {
        #[derive(Debug, Deserialize)]
        #[serde(tag = "op", rename_all = "snake_case")]
        #[allow(dead_code)]
        enum Old {
            Add(AddRequest),
            Del(DelRequest),
            Check(CheckRequest),
            Status,
            Gc(GcRequest),
        }
        let line = serde_json::to_vec(&Request::Node).expect("json");
        let e = serde_json::from_slice::<Old>(&line).expect_err("unknown to it");
        // serve_connection's answer to a line it cannot decode.
        let msg = format!("malformed request: {e}");
        assert!(is_unknown_request(&msg, "node"), "{msg}");
        assert!(!is_unknown_request(
            "node n1 has no pod CIDR yet (spec.podCIDRs is empty)",
            "node"
        ));
        assert!(!is_unknown_request(&msg, "gc"));
    }

    #[test]
    fn several_requests_and_garbage_on_one_connection() {
        let handler = Arc::new(Recorder::default());
        let (_dir, path) = start(handler.clone());
        let mut stream = UnixStream::connect(&path).expect("connect");
        stream
            .write_all(b"not json\n{\"op\":\"gc\",\"valid_attachments\":[]}\n")
            .expect("write");
        let mut reader = BufReader::new(stream.try_clone().expect("clone"));
        let mut first = String::new();
        reader.read_line(&mut first).expect("line");
        assert!(first.contains("malformed request"), "{first}");
        let mut second = String::new();
        reader.read_line(&mut second).expect("line");
        assert_eq!(second, "{\"result\":\"ok\"}\n");
    }

    #[test]
    fn unreachable_agent_is_a_connect_error_naming_the_socket() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("nobody.sock");
        let err = AgentClient::new(&path)
            .call(&Request::Status)
            .expect_err("nobody listens");
        assert!(matches!(err, ClientError::Connect { .. }), "{err:?}");
        assert!(err.to_string().contains("nobody.sock"));
        // A socket file with no listener behind it (an agent that died).
        drop(std::os::unix::net::UnixListener::bind(&path).expect("bind"));
        let err = AgentClient::new(&path)
            .call(&Request::Status)
            .expect_err("dead agent");
        assert!(matches!(err, ClientError::Connect { .. }), "{err:?}");
    }

    #[test]
    fn slow_agent_times_out() {
        let handler = Arc::new(Recorder {
            delay: Some(Duration::from_secs(2)),
            ..Recorder::default()
        });
        let (_dir, path) = start(handler);
        let client = AgentClient::new(&path)
            .with_timeouts(Duration::from_secs(1), Duration::from_millis(100));
        let started = std::time::Instant::now();
        let err = client.call(&Request::Status).expect_err("too slow");
        assert!(matches!(err, ClientError::Timeout { .. }), "{err:?}");
        assert!(started.elapsed() < Duration::from_secs(1));
    }
}

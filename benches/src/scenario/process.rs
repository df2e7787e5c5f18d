//! Child processes of a run: spawned pinned, logged to a file, probed for
//! readiness, stopped with SIGTERM, and killed if a run is abandoned.

use std::fs::File;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context as _};
use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt as _, Empty};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::sys::affinity;

/// A running child process.
pub struct Child {
    pub name: String,
    child: std::process::Child,
    log: PathBuf,
}

impl Child {
    /// Starts `cmd`, pinned to `cpu` if given, its stdout and stderr written
    /// to `log`.
    pub fn spawn(
        name: &str,
        mut cmd: Command,
        cpu: Option<usize>,
        log: &Path,
    ) -> anyhow::Result<Self> {
        let file = File::create(log).with_context(|| format!("creating {}", log.display()))?;
        let err = file
            .try_clone()
            .context("duplicating the log file handle")?;
        cmd.stdin(Stdio::null()).stdout(file).stderr(err);
        Self::spawn_inner(name, cmd, cpu, log)
    }

    /// Like [`Child::spawn`], but stdout is piped for the caller to read.
    pub fn spawn_piped(
        name: &str,
        mut cmd: Command,
        cpu: Option<usize>,
        log: &Path,
    ) -> anyhow::Result<Self> {
        let file = File::create(log).with_context(|| format!("creating {}", log.display()))?;
        cmd.stdin(Stdio::null()).stderr(file).stdout(Stdio::piped());
        Self::spawn_inner(name, cmd, cpu, log)
    }

    fn spawn_inner(
        name: &str,
        mut cmd: Command,
        cpu: Option<usize>,
        log: &Path,
    ) -> anyhow::Result<Self> {
        if let Some(cpu) = cpu {
            affinity::pin_command(&mut cmd, cpu)?;
        }
        let program = cmd.get_program().to_string_lossy().into_owned();
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {name} ({program})"))?;
        tracing::debug!(name, pid = child.id(), log = %log.display(), "started");
        Ok(Child {
            name: name.to_owned(),
            child,
            log: log.to_owned(),
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn stdout(&mut self) -> Option<std::process::ChildStdout> {
        self.child.stdout.take()
    }

    /// The last lines of its log, for error messages.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let tail = lines[lines.len().saturating_sub(15)..].join("\n");
        format!("last lines of {}:\n{}", self.log.display(), tail)
    }

    /// An error if the process has exited.
    pub fn ensure_running(&mut self) -> anyhow::Result<()> {
        match self.child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(status)) => bail!(
                "{} exited unexpectedly ({status}); {}",
                self.name,
                self.log_tail()
            ),
            Err(e) => bail!("checking on {}: {e}", self.name),
        }
    }

    /// Sends SIGTERM and waits up to `grace` for it to exit, then kills it.
    /// Returns how it went, for the report.
    pub async fn stop(mut self, grace: Duration) -> String {
        if let Ok(Some(status)) = self.child.try_wait() {
            return format!("had already exited ({status})");
        }
        let Ok(pid) = libc::pid_t::try_from(self.child.id()) else {
            let _ = self.child.kill();
            return "killed (pid out of range)".into();
        };
        let started = Instant::now();
        // SAFETY: kill has no memory-safety preconditions; the pid is our own
        // child, not yet reaped, so it cannot have been reused.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        while started.elapsed() < grace {
            match self.child.try_wait() {
                Ok(Some(status)) => {
                    return format!(
                        "exited on SIGTERM after {} ms ({status})",
                        started.elapsed().as_millis()
                    );
                }
                Ok(None) => tokio::time::sleep(Duration::from_millis(10)).await,
                Err(e) => return format!("wait failed: {e}"),
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        format!("did not exit within {grace:?} of SIGTERM; killed")
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        // A run that bails out must not leave processes behind.
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// `GET http://addr{path}` over HTTP/1.1; the status.
pub async fn http_get_status(addr: SocketAddr, path: &str) -> anyhow::Result<StatusCode> {
    Ok(http_get(addr, path).await?.0)
}

/// `GET http://addr{path}` over HTTP/1.1; the status and the body as text (lossy UTF-8).
pub async fn http_get(addr: SocketAddr, path: &str) -> anyhow::Result<(StatusCode, String)> {
    let stream = TcpStream::connect(addr)
        .await
        .with_context(|| format!("connecting to {addr}"))?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(TokioIo::new(stream))
            .await
            .context("HTTP/1.1 handshake")?;
    tokio::spawn(conn);
    let request = Request::get(path)
        .header(http::header::HOST, addr.to_string())
        .body(Empty::new())
        .context("building the probe request")?;
    let response = sender
        .send_request(request)
        .await
        .context("sending the probe")?;
    let status = response.status();
    let body = response
        .into_body()
        .collect()
        .await
        .with_context(|| format!("reading the body of GET http://{addr}{path}"))?
        .to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

/// Polls `GET http://addr{path}` until it answers 200, the child exits, or
/// `deadline` passes.
pub async fn wait_ready(
    child: &mut Child,
    addr: SocketAddr,
    path: &str,
    deadline: Duration,
) -> anyhow::Result<()> {
    let started = Instant::now();
    let mut last = String::from("no attempt");
    while started.elapsed() < deadline {
        child.ensure_running()?;
        let probe = tokio::time::timeout(Duration::from_secs(1), http_get_status(addr, path)).await;
        match probe {
            Ok(Ok(StatusCode::OK)) => {
                tracing::debug!(
                    name = child.name,
                    ms = started.elapsed().as_millis() as u64,
                    "ready"
                );
                return Ok(());
            }
            Ok(Ok(status)) => last = format!("answered {status}"),
            Ok(Err(e)) => last = format!("{e:#}"),
            Err(_) => last = "no answer within 1 s".into(),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!(
        "{} not ready: GET http://{addr}{path} did not answer 200 within {deadline:?} (last: {last}); {}",
        child.name,
        child.log_tail()
    )
}

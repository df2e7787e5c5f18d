//! A process the demo runs (a proxy or the controller): output appended to a log file, its own
//! process group (a Ctrl-C in the terminal reaches only `weft demo`, which then stops the
//! children in order), killed if `weft` goes away, ready once its admin `/ready` answers 200,
//! stopped with SIGTERM and, after a grace period, SIGKILL.

use std::fs::File;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use http::StatusCode;
use tokio::process::{Child, Command};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::proxy::AdminClient;
use super::DemoError;

#[derive(Debug)]
pub struct DemoChild {
    /// What the summary and errors call it ("client proxy", "controller").
    pub what: String,
    pub log_path: PathBuf,
    child: Child,
}

impl DemoChild {
    /// Starts `cmd` (built for `bin`) with stdout and stderr going to `log_path`.
    pub fn spawn(
        what: impl Into<String>,
        bin: &Path,
        mut cmd: Command,
        log_path: PathBuf,
    ) -> Result<Self, DemoError> {
        let log_error = |source| DemoError::LogFile {
            path: log_path.clone(),
            source,
        };
        // One open file description for both streams, so their lines interleave in order.
        let log = File::create(&log_path).map_err(log_error)?;
        let log_err = log.try_clone().map_err(log_error)?;
        cmd.stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log_err))
            .process_group(0)
            // If weft demo itself fails on the way out, its children must not outlive it.
            .kill_on_drop(true);
        // kill_on_drop does not run when weft itself is killed or aborts (release builds abort
        // on panic); have the kernel send SIGTERM then. The signal fires when the spawning
        // *thread* exits: the thread driving `demo::run`, which lives as long as the demo.
        #[cfg(target_os = "linux")]
        // SAFETY: the closure runs in the forked child before exec and only calls prctl(2),
        // which is async-signal-safe, allocating nothing.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) == 0 {
                    Ok(())
                } else {
                    Err(std::io::Error::last_os_error())
                }
            });
        }
        let child = cmd.spawn().map_err(|source| DemoError::Spawn {
            bin: bin.to_path_buf(),
            source,
        })?;
        let what = what.into();
        tracing::debug!(%what, pid = ?child.id(), ?log_path, "started");
        Ok(Self {
            what,
            log_path,
            child,
        })
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// Resolves when the child exits (for watching it while the demo runs).
    pub async fn exited(&mut self) -> std::io::Result<ExitStatus> {
        self.child.wait().await
    }

    pub fn exited_early(&self, status: ExitStatus) -> DemoError {
        DemoError::Exited {
            what: self.what.clone(),
            status,
            log: self.log_path.clone(),
        }
    }

    /// Polls `GET /ready` on `admin_addr` until it answers 200, the child exits, `stop` fires or
    /// `timeout` passes.
    pub async fn wait_ready(
        &mut self,
        admin: &AdminClient,
        admin_addr: SocketAddr,
        timeout: Duration,
        stop: &CancellationToken,
    ) -> Result<(), DemoError> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(self.exited_early(status));
            }
            let last = match admin.get(admin_addr, "/ready").await {
                Ok((StatusCode::OK, _)) => return Ok(()),
                // The body says why (a proxy waiting for its certificate names the refusal).
                Ok((status, body)) => format!("answered {status}: {}", quote_body(&body)),
                Err(e) => e,
            };
            if Instant::now() >= deadline {
                return Err(DemoError::NotReady {
                    what: self.what.clone(),
                    admin: admin_addr,
                    timeout,
                    last,
                    log: self.log_path.clone(),
                });
            }
            tokio::select! {
                () = stop.cancelled() => return Err(DemoError::Interrupted),
                () = tokio::time::sleep(Duration::from_millis(50)) => {}
            }
        }
    }

    /// SIGTERM, then SIGKILL if it has not exited within `grace`; how it ended, for the summary.
    pub async fn terminate(&mut self, grace: Duration) -> String {
        if let Ok(Some(status)) = self.child.try_wait() {
            return format!("had already exited ({status})");
        }
        if let Some(pid) = self.child.id() {
            sigterm(pid);
        }
        match tokio::time::timeout(grace, self.child.wait()).await {
            Ok(Ok(status)) if status.success() => "exited cleanly after SIGTERM".into(),
            Ok(Ok(status)) => format!("exited after SIGTERM with {status}"),
            Ok(Err(e)) => format!("could not be waited for: {e}"),
            Err(_) => {
                tracing::warn!(what = %self.what, ?grace, "ignored SIGTERM; killing it");
                let _ = self.child.kill().await;
                format!("did not exit within {grace:?} of SIGTERM and was killed")
            }
        }
    }
}

/// A `/ready` body for an error message: one line, at most 300 characters.
fn quote_body(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let line = text.split_whitespace().collect::<Vec<_>>().join(" ");
    if line.is_empty() {
        return "(empty body)".into();
    }
    match line.char_indices().nth(300) {
        Some((cut, _)) => format!("{:?}…", &line[..cut]),
        None => format!("{line:?}"),
    }
}

fn sigterm(pid: u32) {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return;
    };
    // SAFETY: kill(2) has no memory-safety preconditions. The pid is our own child, not yet
    // reaped (tokio reaps only in wait/try_wait, which have just reported it running), so it
    // cannot name another process.
    let rc = unsafe { libc::kill(pid, libc::SIGTERM) };
    if rc != 0 {
        tracing::warn!(pid, error = %std::io::Error::last_os_error(), "could not send SIGTERM");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    #[test]
    fn ready_bodies_are_quoted_on_one_line() {
        assert_eq!(
            quote_body(b"not ready: no certificate:\n token refused\n"),
            "\"not ready: no certificate: token refused\""
        );
        assert_eq!(quote_body(b"\n"), "(empty body)");
        let long = "x".repeat(400);
        assert_eq!(quote_body(long.as_bytes()), format!("{:?}…", &long[..300]));
    }

    /// A proxy that never becomes ready: the error names what its `/ready` says.
    #[tokio::test]
    async fn not_ready_error_quotes_the_ready_body() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let admin_addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            while let Ok((mut conn, _)) = listener.accept().await {
                let mut buf = [0u8; 1024];
                let _ = conn.read(&mut buf).await;
                let body = "not ready: no certificate: the identity service refused the token\n";
                let resp = format!(
                    "HTTP/1.1 503 Service Unavailable\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = conn.write_all(resp.as_bytes()).await;
            }
        });
        let mut cmd = Command::new("sleep");
        cmd.arg("30");
        let log = std::env::temp_dir().join(format!("weft-child-test-{}.log", std::process::id()));
        let mut child = DemoChild::spawn("server proxy", Path::new("sleep"), cmd, log.clone())
            .expect("spawn sleep");
        let err = child
            .wait_ready(
                &AdminClient::new(Duration::from_secs(1)),
                admin_addr,
                Duration::from_millis(300),
                &CancellationToken::new(),
            )
            .await
            .expect_err("never ready");
        child.terminate(Duration::from_secs(1)).await;
        let _ = std::fs::remove_file(log);
        let text = err.to_string();
        assert!(
            text.contains(
                "(last: answered 503 Service Unavailable: \"not ready: no certificate: \
                 the identity service refused the token\")"
            ),
            "{text}"
        );
    }
}

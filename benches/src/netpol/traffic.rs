//! The traffic between the two pods: iperf3 TCP throughput, closed-loop HTTP/1.1 requests
//! over reused connections (weft-bench's own generator and server, on threads that entered
//! the pods' namespaces), and new TCP connections per second (one 4-byte exchange each).
//!
//! Client work runs on CPU 0 and server work on CPU 1 when pinned, as the other benchmarks
//! lay it out: every packet crosses cores once each way, in both variants alike.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{bail, Context as _, Result};
use serde::Serialize;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};

use super::manifests::{CONN_PORT, HTTP_PORT, IPERF_PORT};
use super::ns::{spawn_in, Netns, Proc};
use crate::load::{LoadGenerator, LoadSpec, Pacing, Protocol};

/// What the servers in one pod are: the bench HTTP server, the connection echo server and
/// an iperf3 server; stopped on drop.
pub struct Servers {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<Result<()>>>,
    _iperf: Proc,
}

impl Servers {
    pub fn start(
        pod: &Netns,
        ip: IpAddr,
        cpu: Option<usize>,
        response_size: usize,
    ) -> Result<Servers> {
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<()>>();
        let thread = spawn_in(pod, cpu, move || {
            let rt = crate::cli::current_thread_runtime()?;
            rt.block_on(async move {
                let bound = async {
                    let http = TcpListener::bind((ip, HTTP_PORT)).await?;
                    let conn = TcpListener::bind((ip, CONN_PORT)).await?;
                    anyhow::Ok((http, conn))
                }
                .await;
                let (http, conn) = match bound {
                    Ok(l) => {
                        let _ = ready_tx.send(Ok(()));
                        l
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return Ok(());
                    }
                };
                tokio::select! {
                    r = crate::server::serve(http, response_size) => r,
                    r = echo_and_close(conn) => r,
                    _ = stop_rx => Ok(()),
                }
            })
        })?;
        ready_rx
            .recv_timeout(Duration::from_secs(5))
            .context("the servers did not bind within 5 s")??;
        let mut cmd = pod.command("iperf3")?;
        cmd.args(["-s", "-B", &ip.to_string(), "-p", &IPERF_PORT.to_string()])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        if let Some(cpu) = cpu {
            crate::sys::affinity::pin_command(&mut cmd, cpu)?;
        }
        let iperf = Proc::new(cmd.spawn().context("starting iperf3 -s")?, "iperf3 -s");
        Ok(Servers {
            stop: Some(stop_tx),
            thread: Some(thread),
            _iperf: iperf,
        })
    }
}

impl Drop for Servers {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Per connection: reads 4 bytes, writes them back and closes first (so TIME_WAIT stays on
/// the server and the client's ports are free again at once).
async fn echo_and_close(listener: TcpListener) -> Result<()> {
    loop {
        let (mut s, _) = listener.accept().await?;
        tokio::spawn(async move {
            let mut buf = [0u8; 4];
            if s.read_exact(&mut buf).await.is_ok() {
                let _ = s.write_all(&buf).await;
            }
        });
    }
}

/// One iperf3 run.
#[derive(Debug, Clone, Serialize)]
pub struct Throughput {
    pub gbit_per_s: f64,
    pub retransmits: u64,
}

/// iperf3 from `client` to `server_ip` for `duration` (after a 1 s omitted ramp-up) with
/// `streams` parallel streams; the receiver's rate.
pub fn iperf(
    client: &Netns,
    server_ip: IpAddr,
    duration: Duration,
    streams: usize,
    cpu: Option<usize>,
) -> Result<Throughput> {
    let mut last = String::new();
    // The server may still be starting on the first run: retry a refused connection.
    for _ in 0..20 {
        let mut cmd = client.command("iperf3")?;
        cmd.args(["-c", &server_ip.to_string(), "-p", &IPERF_PORT.to_string()])
            .args(["-t", &format!("{:.0}", duration.as_secs_f64().max(1.0))])
            .args(["-O", "1", "-P", &streams.to_string(), "-J"]);
        if let Some(cpu) = cpu {
            crate::sys::affinity::pin_command(&mut cmd, cpu)?;
        }
        let out = cmd.output().context("running iperf3 -c")?;
        let text = String::from_utf8_lossy(&out.stdout);
        match parse_iperf(&text) {
            Ok(t) => return Ok(t),
            Err(e) => last = format!("{e:#}"),
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    bail!("iperf3 to {server_ip}:{IPERF_PORT} failed: {last}")
}

/// The receiver's bits per second and the sender's retransmits of `iperf3 -J` output.
pub fn parse_iperf(json: &str) -> Result<Throughput> {
    let v: serde_json::Value =
        serde_json::from_str(json).with_context(|| format!("iperf3 output is not JSON: {json}"))?;
    if let Some(e) = v["error"].as_str() {
        bail!("iperf3: {e}");
    }
    let bps = v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .context("no end.sum_received.bits_per_second in iperf3's output")?;
    Ok(Throughput {
        gbit_per_s: bps / 1e9,
        retransmits: v["end"]["sum_sent"]["retransmits"].as_u64().unwrap_or(0),
    })
}

/// One closed-loop request window.
#[derive(Debug, Clone, Serialize)]
pub struct Requests {
    pub requests_per_s: f64,
    pub errors: u64,
    pub p50_us: u64,
    pub p99_us: u64,
}

/// Closed loop: `connections` HTTP/1.1 connections, each sending its next request as soon as
/// the last answered, for `warmup` then `duration`.
#[allow(clippy::too_many_arguments)]
pub fn requests(
    client: &Netns,
    server_ip: IpAddr,
    connections: usize,
    request_size: usize,
    response_size: usize,
    warmup: Duration,
    duration: Duration,
    cpu: Option<usize>,
) -> Result<Requests> {
    let spec = LoadSpec {
        connect: SocketAddr::new(server_ip, HTTP_PORT),
        authority: format!("server.bench:{HTTP_PORT}"),
        protocol: Protocol::Http1,
        connections,
        streams: 1,
        request_size,
        response_size,
    };
    spawn_in(client, cpu, move || {
        crate::cli::current_thread_runtime()?.block_on(async move {
            let mut g = LoadGenerator::connect(&spec, Duration::from_secs(5)).await?;
            if !warmup.is_zero() {
                g.run(Pacing::Closed, warmup).await?;
            }
            let s = g.run(Pacing::Closed, duration).await?.summary();
            Ok(Requests {
                requests_per_s: s.achieved_rps,
                errors: s.errors,
                p50_us: s.p50_us,
                p99_us: s.p99_us,
            })
        })
    })?
    .join()
    .map_err(|_| anyhow::anyhow!("the request generator panicked"))?
}

/// One new-connection window.
#[derive(Debug, Clone, Serialize)]
pub struct Connections {
    pub connections_per_s: f64,
    pub errors: u64,
}

/// `concurrency` loops, each: connect, send 4 bytes, read them back and the server's close;
/// completed exchanges per second over `duration` (after `warmup`).
pub fn connections(
    client: &Netns,
    server_ip: IpAddr,
    concurrency: usize,
    warmup: Duration,
    duration: Duration,
    cpu: Option<usize>,
) -> Result<Connections> {
    let addr = SocketAddr::new(server_ip, CONN_PORT);
    spawn_in(client, cpu, move || {
        crate::cli::current_thread_runtime()?.block_on(async move {
            let ok = Arc::new(AtomicU64::new(0));
            let errors = Arc::new(AtomicU64::new(0));
            let end = tokio::time::Instant::now() + warmup + duration;
            let tasks: Vec<_> = (0..concurrency)
                .map(|_| {
                    let (ok, errors) = (ok.clone(), errors.clone());
                    tokio::spawn(async move {
                        while tokio::time::Instant::now() < end {
                            let r =
                                tokio::time::timeout(Duration::from_secs(2), exchange(addr)).await;
                            match r {
                                Ok(Ok(())) => ok.fetch_add(1, Ordering::Relaxed),
                                _ => errors.fetch_add(1, Ordering::Relaxed),
                            };
                        }
                    })
                })
                .collect();
            tokio::time::sleep(warmup).await;
            let (ok0, err0) = (ok.load(Ordering::Relaxed), errors.load(Ordering::Relaxed));
            let t0 = tokio::time::Instant::now();
            tokio::time::sleep(duration).await;
            let (ok1, err1) = (ok.load(Ordering::Relaxed), errors.load(Ordering::Relaxed));
            let secs = t0.elapsed().as_secs_f64();
            for t in tasks {
                let _ = t.await;
            }
            Ok(Connections {
                connections_per_s: (ok1 - ok0) as f64 / secs,
                errors: err1 - err0,
            })
        })
    })?
    .join()
    .map_err(|_| anyhow::anyhow!("the connection generator panicked"))?
}

async fn exchange(addr: SocketAddr) -> Result<()> {
    let mut s = TcpStream::connect(addr).await?;
    s.set_nodelay(true)?;
    s.write_all(b"weft").await?;
    let mut buf = [0u8; 8];
    let mut got = 0;
    loop {
        let n = s.read(&mut buf[got..]).await?;
        if n == 0 {
            break;
        }
        got += n;
        if got > 4 {
            bail!("more than the 4 bytes sent came back");
        }
    }
    if &buf[..got] != b"weft" {
        bail!("{got} bytes came back, not the 4 sent");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iperf_json_gives_the_receivers_rate() {
        let t = parse_iperf(
            r#"{"end":{"sum_sent":{"bits_per_second":2.1e10,"retransmits":3},
                "sum_received":{"bits_per_second":2.0e10}}}"#,
        )
        .expect("parse");
        assert_eq!(t.gbit_per_s, 20.0);
        assert_eq!(t.retransmits, 3);
        let e = parse_iperf(r#"{"start":{},"error":"unable to connect to server"}"#)
            .expect_err("error");
        assert!(e.to_string().contains("unable to connect"), "{e}");
        assert!(parse_iperf("iperf3: error").is_err());
    }
}

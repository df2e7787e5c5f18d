//! Policy change → enforcement: `bench/probe-allow` is rewritten to allow the probe port, or
//! the port after it, and a TCP probe from the client pod to the server's probe port (a new
//! connection every ~10 ms) times when the verdict flips. The agent's own
//! `weft_cni_policy_update_seconds` (change seen → maps written) is read around each change,
//! so the directory source's polling (250 ms) is told apart from the agent's compute+write.

use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use serde::Serialize;

use super::manifests::{probe_policy, PROBE_FILE, PROBE_PORT};
use super::ns::{http_get, Netns};

/// A probe waits this long for the handshake before calling the SYN dropped. Pods on one
/// node answer in well under a millisecond; a verdict is confirmed with longer probes.
const PROBE_TIMEOUT: Duration = Duration::from_millis(15);
const CONFIRM_TIMEOUT: Duration = Duration::from_millis(200);
/// Probes start this often.
const PROBE_EVERY: Duration = Duration::from_millis(10);
/// A change not seen by then is reported as this (a FAIL).
const GIVE_UP: Duration = Duration::from_secs(5);

/// Replaces a manifest file atomically (the source never reads half of it).
pub fn write_manifest(dir: &Path, name: &str, text: &str) -> Result<()> {
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, dir.join(name)).with_context(|| format!("renaming {}", tmp.display()))
}

/// A listener on the probe port in the server pod that accepts and closes; stopped on drop.
pub struct ProbeServer {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl ProbeServer {
    pub fn start(pod: &Netns, ip: IpAddr) -> Result<ProbeServer> {
        let listener = pod.run(move || TcpListener::bind(SocketAddr::new(ip, PROBE_PORT)))??;
        listener.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((c, _)) => drop(c),
                    Err(_) => std::thread::sleep(Duration::from_millis(1)),
                }
            }
        });
        Ok(ProbeServer {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for ProbeServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// True when a new TCP connection from `from` to `to:port` completes within `timeout`.
pub fn probe(from: &Netns, to: IpAddr, port: u16, timeout: Duration) -> Result<bool> {
    from.run(move || TcpStream::connect_timeout(&SocketAddr::new(to, port), timeout).is_ok())
}

/// The agent's `weft_cni_policy_update_seconds` sum and count.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct UpdateHistogram {
    pub sum_s: f64,
    pub count: u64,
}

/// Reads [`UpdateHistogram`] from Prometheus text.
pub fn parse_update_histogram(text: &str) -> Option<UpdateHistogram> {
    let value = |series: &str| {
        text.lines()
            .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
            .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
    };
    Some(UpdateHistogram {
        sum_s: value("weft_cni_policy_update_seconds_sum")?,
        count: value("weft_cni_policy_update_seconds_count")? as u64,
    })
}

fn scrape(node: &Netns) -> Result<UpdateHistogram> {
    let (code, text) = http_get(node, "/metrics")?;
    if code != 200 {
        bail!("the agent's /metrics answered {code}");
    }
    parse_update_histogram(&text)
        .context("no weft_cni_policy_update_seconds_{sum,count} on the agent's /metrics")
}

/// One change.
#[derive(Debug, Clone, Serialize)]
pub struct Change {
    /// true: the probe port became allowed; false: denied.
    pub to_allowed: bool,
    /// From the file's rename to the start of the first probe with the new verdict; `None`
    /// if not seen within 5 s.
    pub enforced_ms: Option<f64>,
    /// The agent's syncs during the change and their total change-seen → maps-written time.
    pub agent_syncs: u64,
    pub agent_total_ms: f64,
    /// Probes after the first new verdict that disagreed with it (should be 0).
    pub confirm_mismatches: u32,
}

/// Flips `probe-allow` `reps` times (starting from the state `allowed_now`), each after a
/// pause that walks across the 250 ms polling period so that writes do not lock to its
/// phase.
pub fn measure(
    node: &Netns,
    client: &Netns,
    server_ip: IpAddr,
    manifests: &Path,
    reps: usize,
    mut allowed_now: bool,
) -> Result<Vec<Change>> {
    let mut out = Vec::with_capacity(reps);
    for i in 0..reps {
        // Steady state first.
        let deadline = Instant::now() + GIVE_UP;
        while probe(client, server_ip, PROBE_PORT, CONFIRM_TIMEOUT)? != allowed_now {
            if Instant::now() > deadline {
                bail!(
                    "the probe port is not {} before change {i}",
                    if allowed_now { "allowed" } else { "denied" }
                );
            }
            std::thread::sleep(PROBE_EVERY);
        }
        std::thread::sleep(Duration::from_millis(150 + (i as u64 * 37) % 250));
        let before = scrape(node)?;
        let want = !allowed_now;
        write_manifest(manifests, PROBE_FILE, &probe_policy(want))?;
        let t0 = Instant::now();
        let mut enforced = None;
        while t0.elapsed() < GIVE_UP {
            let started = Instant::now();
            if probe(client, server_ip, PROBE_PORT, PROBE_TIMEOUT)? == want {
                enforced = Some(started.saturating_duration_since(t0));
                break;
            }
            std::thread::sleep(PROBE_EVERY.saturating_sub(started.elapsed()));
        }
        let mut confirm_mismatches = 0;
        for _ in 0..3 {
            if probe(client, server_ip, PROBE_PORT, CONFIRM_TIMEOUT)? != want {
                confirm_mismatches += 1;
            }
        }
        // The sync that wrote the maps has been observed by now (enforcement follows it).
        let after = scrape(node)?;
        out.push(Change {
            to_allowed: want,
            enforced_ms: enforced.map(|d| d.as_secs_f64() * 1000.0),
            agent_syncs: after.count.saturating_sub(before.count),
            agent_total_ms: (after.sum_s - before.sum_s).max(0.0) * 1000.0,
            confirm_mismatches,
        });
        allowed_now = want;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_update_histogram() {
        let text = "# TYPE weft_cni_policy_update_seconds histogram\n\
            weft_cni_policy_update_seconds_bucket{le=\"0.005\"} 1\n\
            weft_cni_policy_update_seconds_sum 0.0125\n\
            weft_cni_policy_update_seconds_count 3\n\
            weft_cni_policy_updates_total 7\n";
        assert_eq!(
            parse_update_histogram(text),
            Some(UpdateHistogram {
                sum_s: 0.0125,
                count: 3
            })
        );
        assert_eq!(parse_update_histogram("weft_cni_endpoints 2\n"), None);
    }
}

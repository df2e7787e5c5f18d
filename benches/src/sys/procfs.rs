//! CPU time and memory of a process, from `/proc/<pid>/stat` and
//! `/proc/<pid>/status`. The parsers are pure and tested on captured text.

use std::collections::HashMap;
use std::time::Duration;

use anyhow::{bail, Context as _};

/// CPU time of a whole process (all threads, live and exited).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CpuTicks {
    pub utime: u64,
    pub stime: u64,
}

impl CpuTicks {
    pub fn total(self) -> u64 {
        self.utime + self.stime
    }

    /// CPU time between `earlier` and `self`.
    pub fn since(self, earlier: CpuTicks, ticks_per_sec: u64) -> Duration {
        let ticks = self.total().saturating_sub(earlier.total());
        Duration::from_secs_f64(ticks as f64 / ticks_per_sec.max(1) as f64)
    }
}

/// Parses `/proc/<pid>/stat`. The command name (field 2) may hold spaces and
/// parentheses, so fields are counted from the last `)`.
pub fn parse_stat(text: &str) -> anyhow::Result<CpuTicks> {
    let Some(close) = text.rfind(')') else {
        bail!("no ')' after the command name in {text:?}");
    };
    // After ")": field 3 (state) onwards; utime and stime are fields 14, 15.
    let fields: Vec<&str> = text[close + 1..].split_whitespace().collect();
    let field = |n: usize| -> anyhow::Result<u64> {
        let raw = fields
            .get(n - 3)
            .with_context(|| format!("stat has no field {n}"))?;
        raw.parse()
            .with_context(|| format!("stat field {n} is {raw:?}, not a number"))
    };
    Ok(CpuTicks {
        utime: field(14)?,
        stime: field(15)?,
    })
}

/// Memory figures from `/proc/<pid>/status`, in KiB.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct MemStatus {
    /// Resident set size now.
    pub rss_kib: u64,
    /// Peak resident set size since the process started.
    pub hwm_kib: u64,
    /// Threads.
    pub threads: u64,
    /// The CPUs the main thread may run on, as the kernel lists them ("1").
    pub cpus_allowed: String,
}

/// Parses `/proc/<pid>/status` ("Key:\tvalue kB" lines).
pub fn parse_status(text: &str) -> anyhow::Result<MemStatus> {
    let fields: HashMap<&str, &str> = text
        .lines()
        .filter_map(|line| line.split_once(':'))
        .map(|(k, v)| (k.trim(), v.trim()))
        .collect();
    let kib = |key: &str| -> anyhow::Result<u64> {
        let raw = fields
            .get(key)
            .with_context(|| format!("status has no {key} line"))?;
        let number = raw.strip_suffix("kB").unwrap_or(raw).trim();
        number
            .parse()
            .with_context(|| format!("status {key} is {raw:?}, not a number of kB"))
    };
    Ok(MemStatus {
        rss_kib: kib("VmRSS")?,
        hwm_kib: kib("VmHWM")?,
        threads: kib("Threads").unwrap_or(0),
        cpus_allowed: fields
            .get("Cpus_allowed_list")
            .map(|s| s.to_string())
            .unwrap_or_default(),
    })
}

/// Clock ticks per second for `/proc/<pid>/stat` times (usually 100).
pub fn ticks_per_sec() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let n = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    u64::try_from(n).ok().filter(|&n| n > 0).unwrap_or(100)
}

pub fn read_cpu(pid: u32) -> anyhow::Result<CpuTicks> {
    let path = format!("/proc/{pid}/stat");
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("reading {path}: has the process exited?"))?;
    parse_stat(&text).with_context(|| format!("parsing {path}"))
}

pub fn read_mem(pid: u32) -> anyhow::Result<MemStatus> {
    let path = format!("/proc/{pid}/status");
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("reading {path}: has the process exited?"))?;
    parse_status(&text).with_context(|| format!("parsing {path}"))
}

/// Samples the RSS of some processes in the background and keeps the peak.
pub struct RssSampler {
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Vec<u64>>,
}

impl RssSampler {
    /// Starts sampling `pids` every `every`.
    pub fn start(pids: Vec<u32>, every: Duration) -> Self {
        let (stop, mut stopped) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(async move {
            let mut peaks = vec![0u64; pids.len()];
            let mut tick = tokio::time::interval(every);
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = &mut stopped => break,
                }
                for (peak, &pid) in peaks.iter_mut().zip(&pids) {
                    if let Ok(mem) = read_mem(pid) {
                        *peak = (*peak).max(mem.rss_kib);
                    }
                }
            }
            peaks
        });
        RssSampler { stop, task }
    }

    /// Stops sampling and returns the peak RSS (KiB) of each process, in the
    /// order they were given.
    pub async fn finish(self) -> Vec<u64> {
        let _ = self.stop.send(());
        self.task.await.unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_stat_with_an_awkward_command_name() {
        let text = "4242 (weft (proxy) x) S 1 4242 4242 0 -1 4194560 1203 0 0 0 \
                    731 264 0 0 20 0 2 0 123456 12345678 2048 18446744073709551615 \
                    1 1 0 0 0 0 0 4096 17664 0 0 0 17 1 0 0 0 0 0\n";
        assert_eq!(
            parse_stat(text).expect("parse"),
            CpuTicks {
                utime: 731,
                stime: 264
            }
        );
    }

    #[test]
    fn rejects_truncated_stat() {
        assert!(parse_stat("12 (x) S 1 2 3").is_err());
        assert!(parse_stat("garbage").is_err());
        assert!(parse_stat("1 (x) S 1 1 1 0 -1 0 0 0 0 0 abc 2").is_err());
    }

    #[test]
    fn cpu_time_between_samples() {
        let a = CpuTicks {
            utime: 100,
            stime: 50,
        };
        let b = CpuTicks {
            utime: 180,
            stime: 70,
        };
        assert_eq!(b.since(a, 100), Duration::from_secs(1));
        assert_eq!(a.since(b, 100), Duration::ZERO);
    }

    #[test]
    fn parses_status() {
        let text = "Name:\tweft-proxy\nUmask:\t0022\nState:\tS (sleeping)\nVmPeak:\t  20000 kB\n\
                    VmHWM:\t    9120 kB\nVmRSS:\t    8004 kB\nRssAnon:\t 1234 kB\nThreads:\t2\n\
                    Cpus_allowed:\t2\nCpus_allowed_list:\t1\n";
        let s = parse_status(text).expect("parse");
        assert_eq!(
            s,
            MemStatus {
                rss_kib: 8004,
                hwm_kib: 9120,
                threads: 2,
                cpus_allowed: "1".into()
            }
        );
    }

    #[test]
    fn rejects_status_without_rss() {
        // Kernel threads and zombies have no Vm lines.
        assert!(parse_status("Name:\tkthreadd\nState:\tS\n").is_err());
        assert!(parse_status("VmRSS:\tlots kB\nVmHWM:\t1 kB\n").is_err());
    }

    #[test]
    fn reads_this_process() {
        let pid = std::process::id();
        let cpu = read_cpu(pid).expect("stat");
        let mem = read_mem(pid).expect("status");
        assert!(mem.rss_kib > 0 && mem.hwm_kib >= mem.rss_kib);
        let _ = cpu.total();
        assert!(ticks_per_sec() > 0);
    }
}

//! Process metrics read from /proc at scrape time: memory, CPU, file descriptors, and the
//! number of live tokio tasks (for leak checks).

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;

#[derive(Debug)]
pub struct ProcessCollector {
    runtime: Option<tokio::runtime::Handle>,
    start_time: f64,
}

impl ProcessCollector {
    pub fn new() -> Self {
        let start_time = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0);
        Self {
            runtime: tokio::runtime::Handle::try_current().ok(),
            start_time,
        }
    }
}

/// Values read from /proc/self; None where the file could not be read.
#[derive(Debug, Default, PartialEq)]
pub struct ProcStat {
    pub rss_bytes: Option<i64>,
    pub cpu_seconds: Option<f64>,
    pub open_fds: Option<i64>,
}

/// Parses utime+stime (fields 14 and 15) from /proc/<pid>/stat, in clock ticks.
pub fn parse_stat_cpu_ticks(stat: &str) -> Option<u64> {
    // The command name (field 2) may contain spaces and parentheses: split after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    // rest starts at field 3 (state); utime is field 14 → index 11 here.
    let utime: u64 = fields.nth(11)?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

/// Parses VmRSS from /proc/<pid>/status, in bytes.
pub fn parse_status_rss(status: &str) -> Option<i64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: i64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

fn read_self() -> ProcStat {
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let ticks = if ticks > 0 { ticks as f64 } else { 100.0 };
    ProcStat {
        rss_bytes: std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| parse_status_rss(&s)),
        cpu_seconds: std::fs::read_to_string("/proc/self/stat")
            .ok()
            .and_then(|s| parse_stat_cpu_ticks(&s))
            .map(|t| t as f64 / ticks),
        open_fds: std::fs::read_dir("/proc/self/fd")
            .ok()
            .map(|d| d.count() as i64 - 1), // minus the directory handle itself
    }
}

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let p = read_self();
        if let Some(rss) = p.rss_bytes {
            let m = encoder.encode_descriptor(
                "process_resident_memory_bytes",
                "Resident memory size in bytes",
                None,
                MetricType::Gauge,
            )?;
            ConstGauge::new(rss).encode(m)?;
        }
        if let Some(cpu) = p.cpu_seconds {
            let m = encoder.encode_descriptor(
                "process_cpu_seconds",
                "Total user and system CPU time spent in seconds",
                None,
                MetricType::Counter,
            )?;
            ConstCounter::new(cpu).encode(m)?;
        }
        if let Some(fds) = p.open_fds {
            let m = encoder.encode_descriptor(
                "process_open_fds",
                "Number of open file descriptors",
                None,
                MetricType::Gauge,
            )?;
            ConstGauge::new(fds).encode(m)?;
        }
        let m = encoder.encode_descriptor(
            "process_start_time_seconds",
            "Start time of the process since the Unix epoch in seconds",
            None,
            MetricType::Gauge,
        )?;
        ConstGauge::new(self.start_time).encode(m)?;
        if let Some(rt) = &self.runtime {
            let m = encoder.encode_descriptor(
                "weft_runtime_alive_tasks",
                "Tasks alive in the proxy's async runtime",
                None,
                MetricType::Gauge,
            )?;
            ConstGauge::new(rt.metrics().num_alive_tasks() as i64).encode(m)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_files() {
        let stat = "1234 (weft proxy) (x) S 1 1234 1234 0 -1 4194560 300 0 0 0 17 5 0 0 20 0 1 0 100 1000 200";
        assert_eq!(parse_stat_cpu_ticks(stat), Some(22));
        assert_eq!(parse_stat_cpu_ticks("garbage"), None);
        let status = "Name:\tweft\nVmRSS:\t  5120 kB\n";
        assert_eq!(parse_status_rss(status), Some(5 * 1024 * 1024));
        assert!(read_self().rss_bytes.unwrap() > 0);
    }
}

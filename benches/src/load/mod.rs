//! The load generator: an open-loop schedule ([`schedule`]) driving
//! HTTP/1.1, HTTP/2 or gRPC slots ([`http`]), with latency in HDR
//! histograms ([`stats`]).

pub mod http;
pub mod schedule;
pub mod stats;

use tokio::time::Duration;

pub use http::{connect, LoadSpec, Protocol};
pub use schedule::{run_slots, Pacing, Transport};
pub use stats::{RunStats, Summary};

/// Connections opened once and reused by several runs (warm-up, measured
/// run, max-throughput run), so that every run sees the same connections.
pub struct LoadGenerator {
    slots: Vec<Box<dyn Transport>>,
    timeout: Duration,
}

impl LoadGenerator {
    /// Opens the connections of `spec`. `timeout` bounds each request.
    pub async fn connect(spec: &LoadSpec, timeout: Duration) -> anyhow::Result<Self> {
        Ok(LoadGenerator {
            slots: http::connect(spec).await?,
            timeout,
        })
    }

    /// Slots: requests that may be in flight at once.
    pub fn slots(&self) -> usize {
        self.slots.len()
    }

    /// One run of `duration` at `pacing`.
    pub async fn run(&mut self, pacing: Pacing, duration: Duration) -> anyhow::Result<RunStats> {
        let slots = std::mem::take(&mut self.slots);
        let (slots, stats) = run_slots(slots, pacing, duration, self.timeout).await?;
        self.slots = slots;
        Ok(stats)
    }
}

//! Flow events: one per new-connection decision, read from the `weft_flows` ring buffer.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use aya::maps::{Map, MapData, RingBuf};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

use crate::abi::{self, FlowEventRaw};
use crate::error::{cause, cause_msg};
use crate::policy::ip_from_bytes;
use crate::{sys, Direction, Error, Reason, Verdict};

/// A new-connection decision as the datapath took it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FlowEvent {
    /// When, as wall-clock time (converted from `ts_ns`).
    pub time: SystemTime,
    /// When, as CLOCK_BOOTTIME nanoseconds (`bpf_ktime_get_boot_ns`).
    pub ts_ns: u64,
    pub ep_id: u32,
    pub direction: Direction,
    pub verdict: Verdict,
    pub reason: Reason,
    /// The deciding policy (0 when not isolated, or denied).
    pub policy: u32,
    /// IP protocol number.
    pub proto: u8,
    pub src: IpAddr,
    pub dst: IpAddr,
    /// Ports (ICMP echo: the identifier; other protocols without ports: 0).
    pub sport: u16,
    pub dport: u16,
}

impl FlowEvent {
    /// Decodes a ring buffer record; `None` for a record this build cannot read.
    pub fn decode(bytes: &[u8]) -> Option<Self> {
        Self::from_raw(
            &FlowEventRaw::from_bytes(bytes)?,
            sys::boottime_ns(),
            SystemTime::now(),
        )
    }

    fn from_raw(raw: &FlowEventRaw, boot_now: u64, wall_now: SystemTime) -> Option<Self> {
        let verdict = match raw.verdict {
            abi::VERDICT_ALLOWED => Verdict::Allowed,
            abi::VERDICT_DENIED => Verdict::Denied,
            _ => return None,
        };
        let family = if raw.family == 0 { 4 } else { raw.family };
        let age = Duration::from_nanos(boot_now.saturating_sub(raw.ts_ns));
        Some(FlowEvent {
            time: wall_now.checked_sub(age).unwrap_or(wall_now),
            ts_ns: raw.ts_ns,
            ep_id: raw.ep_id,
            direction: Direction::from_u8(raw.direction)?,
            verdict,
            reason: Reason::from_u8(raw.reason),
            policy: raw.policy,
            proto: raw.proto,
            src: ip_from_bytes(family, &raw.saddr)?,
            dst: ip_from_bytes(family, &raw.daddr)?,
            sport: raw.sport,
            dport: raw.dport,
        })
    }
}

/// Reads flow events from the pinned ring buffer, asynchronously (tokio).
///
/// The ring buffer has a single consumer position: run one reader per node (the agent), and
/// fan events out from there.
pub struct FlowReader {
    ring: AsyncFd<RingBuf<MapData>>,
    path: PathBuf,
}

impl std::fmt::Debug for FlowReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FlowReader")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl FlowReader {
    /// Opens `<pin_dir>/weft_flows`. Must be called within a tokio runtime.
    pub fn open(pin_dir: impl AsRef<Path>) -> Result<Self, Error> {
        let path = pin_dir.as_ref().join(abi::map::FLOWS);
        let fail = |e| Error::Flows {
            path: path.clone(),
            cause: e,
        };
        let data = MapData::from_pin(&path).map_err(|e| fail(cause(e)))?;
        let map = Map::from_map_data(data).map_err(|e| fail(cause(e)))?;
        let ring = RingBuf::try_from(map).map_err(|e| fail(cause(e)))?;
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(fail(cause_msg("not within a tokio runtime")));
        }
        // SAFETY: the RingBuf owns its map descriptor, which stays open and unchanged for as
        // long as the RingBuf lives, and the AsyncFd owns the RingBuf.
        let ring = unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE) }
            .map_err(|e| fail(cause(e.into_parts().1)))?;
        Ok(Self { ring, path })
    }

    /// The next event, waiting for one.
    pub async fn next(&mut self) -> Result<FlowEvent, Error> {
        loop {
            let mut guard = self.ring.readable_mut().await.map_err(|e| Error::Flows {
                path: self.path.clone(),
                cause: cause(e),
            })?;
            if let Some(event) = pop(guard.get_inner_mut(), &self.path) {
                return Ok(event);
            }
            guard.clear_ready();
        }
    }

    /// The next event if one is waiting.
    pub fn try_next(&mut self) -> Option<FlowEvent> {
        pop(self.ring.get_mut(), &self.path)
    }
}

fn pop(ring: &mut RingBuf<MapData>, path: &Path) -> Option<FlowEvent> {
    loop {
        let item = ring.next()?;
        match FlowEvent::decode(&item) {
            Some(event) => return Some(event),
            None => {
                let e = cause_msg(format!("{} bytes", item.len()));
                tracing::warn!(ring = %path.display(), record = %crate::error::Chain(&e),
                    "skipping a flow record this build cannot decode");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_raw_record_decodes_with_wall_clock_time() {
        let mut raw = FlowEventRaw {
            ts_ns: 9_000_000_000,
            ep_id: 3,
            policy: 12,
            direction: abi::DIR_EGRESS,
            verdict: abi::VERDICT_ALLOWED,
            proto: 6,
            family: 4,
            sport: 40000,
            dport: 80,
            reason: abi::REASON_POLICY,
            ..Default::default()
        };
        raw.saddr[..4].copy_from_slice(&[10, 0, 0, 1]);
        raw.daddr[..4].copy_from_slice(&[10, 0, 0, 2]);
        let wall = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let ev = FlowEvent::from_raw(&raw, 10_000_000_000, wall).expect("decodes");
        assert_eq!(ev.time, wall - Duration::from_secs(1));
        assert_eq!(ev.src, "10.0.0.1".parse::<IpAddr>().expect("addr"));
        assert_eq!(ev.dst, "10.0.0.2".parse::<IpAddr>().expect("addr"));
        assert_eq!(
            (ev.direction, ev.verdict, ev.reason),
            (Direction::Egress, Verdict::Allowed, Reason::Policy)
        );
        assert_eq!((ev.sport, ev.dport, ev.policy), (40000, 80, 12));

        raw.verdict = 9;
        assert!(FlowEvent::from_raw(&raw, 0, wall).is_none());
        assert!(FlowEvent::decode(&[0u8; 10]).is_none(), "short record");
    }
}

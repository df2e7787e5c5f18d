//! Flow events: the agent is the ring buffer's one reader; it names what it knows (pods by
//! address, the deciding policy, the policies isolating a denied direction) and fans the
//! events out to `/flows` clients through a bounded broadcast. A slow client misses events
//! (counted as `slow_reader` losses); the reader, and so the datapath, never waits for one.
//!
//! The stream is NDJSON, one [`FlowRecord`] per line:
//!
//! ```text
//! {"time":"2026-12-05T17:10:16.123Z","verdict":"deny","direction":"ingress","protocol":"TCP",
//!  "src":{"ip":"10.1.0.5","port":40312,"namespace":"a","pod":"client"},
//!  "dst":{"ip":"10.1.0.6","port":80,"namespace":"b","pod":"web"},
//!  "endpoint":{"namespace":"b","pod":"web"},"reason":"no entry for the peer",
//!  "policy":null,"isolated_by":["b/default-deny"]}
//! ```
//!
//! `policy` is the deciding policy of an allowed connection (`namespace/name`, `node` for
//! the node's own traffic, null when the direction is not isolated); `isolated_by` lists
//! the policies isolating the pod in that direction (for a denial: the ones to look at).

use std::net::IpAddr;
use std::sync::{Arc, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;
use weft_datapath::{Direction, FlowEvent, Reason, Verdict};

use crate::endpoints::Names;
use crate::metrics::Metrics;

/// Events a `/flows` client may fall behind by before it loses some.
pub const BROADCAST_CAPACITY: usize = 4096;

/// One side of a flow.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowPeer {
    pub ip: IpAddr,
    pub port: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodRef {
    pub namespace: String,
    pub pod: String,
}

/// A flow as `/flows` serves it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowRecord {
    /// RFC 3339, UTC, milliseconds.
    pub time: String,
    /// `allow` or `deny`.
    pub verdict: String,
    /// From the local pod's point of view.
    pub direction: String,
    /// `TCP`, `UDP`, `SCTP`, `ICMP`, `ICMPv6` or `IP protocol N`.
    pub protocol: String,
    pub src: FlowPeer,
    pub dst: FlowPeer,
    /// The local pod whose check point decided.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<PodRef>,
    pub reason: String,
    pub policy: Option<String>,
    #[serde(default)]
    pub isolated_by: Vec<String>,
}

/// Names a datapath event.
pub fn enrich(ev: &FlowEvent, names: &Names) -> FlowRecord {
    let peer = |ip: IpAddr, port: u16| {
        let pod = names.pods_by_ip.get(&ip);
        FlowPeer {
            ip,
            port,
            namespace: pod.map(|k| k.namespace.clone()),
            pod: pod.map(|k| k.name.clone()),
        }
    };
    let ep = names.endpoints.get(&ev.ep_id);
    // A spoofed source is dropped whatever the policies say: none of them is to read.
    let isolated_by = ep
        .filter(|_| ev.reason != Reason::SpoofedSource)
        .map(|e| match ev.direction {
            Direction::Ingress => e.ingress_by.clone(),
            Direction::Egress => e.egress_by.clone(),
        })
        .unwrap_or_default();
    let policy = match ev.verdict {
        Verdict::Allowed if ev.policy != 0 => Some(
            names
                .policies
                .get(&ev.policy)
                .cloned()
                .unwrap_or_else(|| format!("(policy id {})", ev.policy)),
        ),
        _ => None,
    };
    FlowRecord {
        time: rfc3339(ev.time),
        verdict: match ev.verdict {
            Verdict::Allowed => "allow",
            Verdict::Denied => "deny",
        }
        .into(),
        direction: ev.direction.to_string(),
        protocol: protocol_name(ev.proto),
        src: peer(ev.src, ev.sport),
        dst: peer(ev.dst, ev.dport),
        endpoint: ep.map(|e| PodRef {
            namespace: e.namespace.clone(),
            pod: e.pod.clone(),
        }),
        reason: reason_text(ev.reason),
        policy,
        isolated_by,
    }
}

fn protocol_name(p: u8) -> String {
    match p {
        6 => "TCP".into(),
        17 => "UDP".into(),
        132 => "SCTP".into(),
        1 => "ICMP".into(),
        58 => "ICMPv6".into(),
        n => format!("IP protocol {n}"),
    }
}

fn reason_text(r: Reason) -> String {
    match r {
        Reason::NotIsolated => "not isolated".into(),
        Reason::Policy => "allowed by policy".into(),
        Reason::NoPeer => "no rule allows the peer".into(),
        Reason::NoPort => "no rule allows the port".into(),
        Reason::Unparseable => "unparseable headers".into(),
        Reason::SpoofedSource => "spoofed source address".into(),
        Reason::Unknown(n) => format!("reason {n}"),
    }
}

/// `2026-12-05T17:10:16.123Z`.
pub fn rfc3339(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil from days (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        d.subsec_millis()
    )
}

/// The fan-out of flow lines to `/flows` clients.
#[derive(Clone, Debug)]
pub struct FlowHub {
    tx: broadcast::Sender<Bytes>,
    pub metrics: Metrics,
}

impl FlowHub {
    pub fn new(metrics: Metrics) -> Self {
        FlowHub {
            tx: broadcast::channel(BROADCAST_CAPACITY).0,
            metrics,
        }
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Bytes> {
        self.tx.subscribe()
    }

    /// Sends one record to every client (never waits; nobody listening is fine).
    pub fn publish(&self, record: &FlowRecord) {
        if self.tx.receiver_count() == 0 {
            return;
        }
        match serde_json::to_vec(record) {
            Ok(mut line) => {
                line.push(b'\n');
                let _ = self.tx.send(Bytes::from(line));
            }
            Err(e) => tracing::warn!(error = %e, "encoding a flow record failed"),
        }
    }
}

/// Reads the ring buffer until the task is dropped.
pub async fn run_reader(
    mut reader: weft_datapath::FlowReader,
    names: Arc<RwLock<Names>>,
    hub: FlowHub,
) {
    loop {
        match reader.next().await {
            Ok(ev) => {
                let record = {
                    let names = names.read().unwrap_or_else(|e| e.into_inner());
                    enrich(&ev, &names)
                };
                hub.publish(&record);
            }
            Err(e) => {
                tracing::error!(error = %e, "reading flow events failed; /flows stops");
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::EndpointNames;
    use std::time::Duration;
    use weft_model::ObjectKey;

    #[test]
    fn events_are_named_and_times_are_rfc3339() {
        let ip = |s: &str| s.parse::<IpAddr>().expect("ip");
        let mut names = Names::default();
        names
            .pods_by_ip
            .insert(ip("10.1.0.5"), ObjectKey::new("a", "client"));
        names
            .pods_by_ip
            .insert(ip("10.1.0.6"), ObjectKey::new("b", "web"));
        names.policies.insert(4, "b/allow-web".into());
        names.endpoints.insert(
            2,
            EndpointNames {
                namespace: "b".into(),
                pod: "web".into(),
                ingress_by: vec!["b/allow-web".into(), "b/deny".into()],
                egress_by: vec![],
            },
        );
        let mut ev = FlowEvent {
            time: UNIX_EPOCH + Duration::from_millis(1_796_490_616_123),
            ts_ns: 0,
            ep_id: 2,
            direction: Direction::Ingress,
            verdict: Verdict::Allowed,
            reason: Reason::Policy,
            policy: 4,
            proto: 6,
            src: ip("10.1.0.5"),
            dst: ip("10.1.0.6"),
            sport: 40312,
            dport: 80,
        };
        let r = enrich(&ev, &names);
        assert_eq!(r.time, "2026-12-05T17:10:16.123Z");
        assert_eq!(r.policy.as_deref(), Some("b/allow-web"));
        assert_eq!(r.src.pod.as_deref(), Some("client"));
        assert_eq!(r.dst.namespace.as_deref(), Some("b"));
        assert_eq!(r.protocol, "TCP");
        assert_eq!((r.src.port, r.dst.port), (40312, 80));
        ev.verdict = Verdict::Denied;
        ev.reason = Reason::NoPort;
        ev.policy = 0;
        ev.src = ip("192.0.2.1");
        let r = enrich(&ev, &names);
        assert_eq!((r.verdict.as_str(), r.policy.as_deref()), ("deny", None));
        assert_eq!(r.isolated_by, vec!["b/allow-web", "b/deny"]);
        assert_eq!(r.src.pod, None);
        ev.proto = 17;
        let r = enrich(&ev, &names);
        assert_eq!((r.protocol.as_str(), r.dst.port), ("UDP", 80));
        let line = serde_json::to_string(&r).expect("json");
        let back: FlowRecord = serde_json::from_str(&line).expect("parse");
        assert_eq!(back, r);
        ev.reason = Reason::SpoofedSource;
        let r = enrich(&ev, &names);
        assert_eq!(r.reason, "spoofed source address");
        assert!(r.isolated_by.is_empty(), "no policy to read: {r:?}");
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        assert_eq!(
            rfc3339(UNIX_EPOCH + Duration::from_secs(951_782_400)),
            "2000-02-29T00:00:00.000Z"
        );
    }
}

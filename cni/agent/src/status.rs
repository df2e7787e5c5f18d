//! `GET /status`: one node's CNI state for `weft cni status` — whether the agent is ready,
//! when it last wrote policy, its endpoints and whether each carries the programs, the
//! policies in force, and how full each pinned map is — plus the problems an operator should
//! act on, decided by [`problems`] (a pure function, tested on its own).
//!
//! Counts only, no pod names or addresses: unlike `/flows`, it is served to any client of the
//! metrics port, so that `weft cni status` can ask every node's agent.

use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use serde::{Deserialize, Serialize};

use crate::agent::Agent;
use crate::dataplane::Dataplane;

/// A map this full (or fuller) is a problem: new entries start failing (hash maps) or
/// evicting live ones (LRU conntrack) soon.
pub const MAP_FULL_WARN: f64 = 0.9;

/// How often the maps are counted at most (counting walks every key: the conntrack map alone
/// holds up to 131,072).
pub const FILL_CACHE: Duration = Duration::from_secs(5);

/// What `/status` answers.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NodeStatus {
    pub node: String,
    pub version: String,
    pub ready: bool,
    /// When policy was last computed and written (RFC 3339), null before the first sync.
    pub last_sync: Option<String>,
    pub last_sync_age_seconds: Option<f64>,
    pub endpoints: usize,
    pub programs: Programs,
    pub policies: Policies,
    pub maps: Vec<MapStatus>,
    /// What needs attention; empty when all is well.
    pub problems: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Programs {
    /// The fingerprint of the datapath object this agent loads (`weft_datapath::OBJECT_HASH`).
    pub object: String,
    /// Interfaces carrying our tcx links.
    pub attached_interfaces: usize,
    /// Registered endpoints whose host interface has no links (`container/ifname (host if)`).
    pub endpoints_not_attached: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Policies {
    /// NetworkPolicies the agent's source holds (all namespaces).
    pub network_policies: usize,
    /// Policies with a datapath id (selecting, or having selected, a pod on this node).
    pub programmed: usize,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MapStatus {
    pub name: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub entries: u64,
    pub max_entries: u32,
}

impl From<&weft_datapath::MapFill> for MapStatus {
    fn from(f: &weft_datapath::MapFill) -> Self {
        MapStatus {
            name: f.name.clone(),
            kind: f.kind.clone(),
            entries: f.entries,
            max_entries: f.max_entries,
        }
    }
}

impl MapStatus {
    pub fn ratio(&self) -> f64 {
        if self.max_entries == 0 {
            0.0
        } else {
            self.entries as f64 / f64::from(self.max_entries)
        }
    }
}

/// The problems in a status, one sentence each, with what to do.
pub fn problems(s: &NodeStatus, map_error: Option<&str>) -> Vec<String> {
    let mut out = Vec::new();
    if !s.ready {
        out.push(
            "not ready: the cluster source has not synced (check the agent's log and its \
             access to the API server)"
                .to_string(),
        );
    }
    if s.ready && s.last_sync.is_none() {
        out.push("ready but policy was never written".to_string());
    }
    for ep in &s.programs.endpoints_not_attached {
        out.push(format!(
            "endpoint {ep} has no programs attached: its pod is not policed (the agent \
             re-attaches at start; restart it, or delete the pod)"
        ));
    }
    for m in &s.maps {
        if m.ratio() >= MAP_FULL_WARN {
            out.push(format!(
                "map {} is {:.0} % full ({} of {}): new entries will fail or evict live ones",
                m.name,
                m.ratio() * 100.0,
                m.entries,
                m.max_entries
            ));
        }
    }
    if let Some(e) = map_error {
        out.push(format!("reading the map fill levels failed: {e}"));
    }
    out
}

/// A count of the maps' fill levels, or why it failed.
type Fill = Result<Vec<weft_datapath::MapFill>, String>;

/// What `/status` needs besides the agent.
#[derive(Debug)]
pub struct StatusSource {
    pub node: String,
    pub pin_dir: PathBuf,
    fill: Mutex<Option<(Instant, Fill)>>,
}

impl StatusSource {
    pub fn new(node: String, pin_dir: PathBuf) -> Self {
        StatusSource {
            node,
            pin_dir,
            fill: Mutex::new(None),
        }
    }

    /// The map fill levels, counted at most every [`FILL_CACHE`].
    pub fn map_fill(&self) -> Fill {
        let mut cached = self.fill.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((at, fill)) = cached.as_ref() {
            if at.elapsed() < FILL_CACHE {
                return fill.clone();
            }
        }
        let fill = weft_datapath::map_fill(&self.pin_dir).map_err(|e| e.to_string());
        *cached = Some((Instant::now(), fill.clone()));
        fill
    }

    /// The node's status now.
    pub fn gather<D: Dataplane>(&self, agent: &Agent<D>) -> NodeStatus {
        let last_sync = agent.last_sync();
        let (endpoints, attached, not_attached, programmed) = {
            let core = agent.core();
            let attached = core.dataplane().attached().unwrap_or_default();
            let not_attached = core
                .state()
                .endpoints
                .values()
                .filter(|r| !attached.contains(&r.host_ifindex))
                .map(|r| format!("{}/{} ({})", r.container_id, r.ifname, r.host_ifname))
                .collect::<Vec<_>>();
            (
                core.state().endpoints.len(),
                attached.len(),
                not_attached,
                core.state().policy_ids.ids.len(),
            )
        };
        let network_policies = agent.index().read().network_policies.len();
        let fill = self.map_fill();
        let (maps, map_error) = match &fill {
            Ok(f) => (f.iter().map(MapStatus::from).collect(), None),
            Err(e) => (Vec::new(), Some(e.as_str())),
        };
        let mut status = NodeStatus {
            node: self.node.clone(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            ready: agent.is_ready(),
            last_sync: last_sync.map(crate::flows::rfc3339),
            last_sync_age_seconds: last_sync.map(|t| {
                SystemTime::now()
                    .duration_since(t)
                    .unwrap_or_default()
                    .as_secs_f64()
            }),
            endpoints,
            programs: Programs {
                object: weft_datapath::OBJECT_HASH.to_string(),
                attached_interfaces: attached,
                endpoints_not_attached: not_attached,
            },
            policies: Policies {
                network_policies,
                programmed,
            },
            maps,
            problems: Vec::new(),
        };
        status.problems = problems(&status, map_error);
        status
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn healthy() -> NodeStatus {
        NodeStatus {
            node: "n1".into(),
            version: "0.1.0".into(),
            ready: true,
            last_sync: Some("2026-12-05T22:00:00.000Z".into()),
            last_sync_age_seconds: Some(1.0),
            endpoints: 2,
            programs: Programs {
                object: "abc".into(),
                attached_interfaces: 2,
                endpoints_not_attached: vec![],
            },
            policies: Policies {
                network_policies: 3,
                programmed: 1,
            },
            maps: vec![MapStatus {
                name: "weft_ct".into(),
                kind: "lru_hash".into(),
                entries: 10,
                max_entries: 100,
            }],
            problems: vec![],
        }
    }

    #[test]
    fn a_healthy_node_has_no_problems() {
        assert!(problems(&healthy(), None).is_empty());
    }

    #[test]
    fn each_problem_is_named_with_what_to_do() {
        let mut s = healthy();
        s.ready = false;
        s.programs.endpoints_not_attached = vec!["c1/eth0 (lxc1)".into()];
        s.maps[0].entries = 95;
        let p = problems(&s, Some("pin directory gone"));
        assert_eq!(p.len(), 4, "{p:#?}");
        assert!(p[0].starts_with("not ready"), "{}", p[0]);
        assert!(p[1].contains("c1/eth0 (lxc1)") && p[1].contains("not policed"));
        assert!(
            p[2].contains("weft_ct is 95 % full (95 of 100)"),
            "{}",
            p[2]
        );
        assert!(p[3].contains("pin directory gone"));
        // 89 % is not yet a problem; 90 % is.
        s = healthy();
        s.maps[0].entries = 89;
        assert!(problems(&s, None).is_empty());
        s.maps[0].entries = 90;
        assert_eq!(problems(&s, None).len(), 1);
    }

    #[test]
    fn ready_without_a_sync_is_a_problem() {
        let mut s = healthy();
        s.last_sync = None;
        assert_eq!(
            problems(&s, None),
            vec!["ready but policy was never written"]
        );
    }
}

//! The agent's Prometheus metrics (`/metrics` on `--metrics-addr`).
//!
//! The datapath keeps its counters in per-CPU maps; at each scrape the agent reads them and
//! adds what moved since the last scrape to its own counters ([`Metrics::observe`]), mapping
//! policy ids to `namespace/name` and endpoint ids to pods. Labels are bounded: a policy
//! label per NetworkPolicy (plus `node` and `none`), a pod label per local pod (removed with
//! the endpoint), two directions, two loss reasons.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use weft_datapath::{Direction, PolicyCounters};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PolicyLabel {
    pub policy: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PodLabels {
    pub namespace: String,
    pub pod: String,
    pub direction: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PodLabel {
    pub namespace: String,
    pub pod: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: String,
}

/// Which endpoint an id is and what isolates it (from the last policy sync).
#[derive(Clone, Debug, Default)]
pub struct EndpointNames {
    pub namespace: String,
    pub pod: String,
    pub ingress_by: Vec<String>,
    pub egress_by: Vec<String>,
}

#[derive(Default)]
struct Seen {
    counters: BTreeMap<u32, u64>,
    drops: BTreeMap<(u32, Direction), u64>,
    source_drops: BTreeMap<u32, u64>,
    flow_lost: u64,
}

#[derive(Clone)]
pub struct Metrics {
    registry: Arc<Registry>,
    pub policy_allowed: Family<PolicyLabel, Counter>,
    pub denied: Family<PodLabels, Counter>,
    pub policy_denied: Family<PolicyLabel, Counter>,
    pub spoofed: Family<PodLabel, Counter>,
    pub endpoints: Gauge,
    pub policy_updates: Counter,
    pub policy_errors: Counter,
    pub policy_update_seconds: Histogram,
    pub flow_events_lost: Family<ReasonLabel, Counter>,
    pub service_frontends: Gauge,
    pub service_backends: Gauge,
    pub service_errors: Counter,
    pub service_update_seconds: Histogram,
    pub map_entries: Family<MapLabel, Gauge>,
    pub map_capacity: Family<MapLabel, Gauge>,
    pub attached_interfaces: Gauge,
    pub last_sync: Gauge<f64, std::sync::atomic::AtomicU64>,
    pub remote_pod_cidrs: Gauge,
    pub remote_pod_cidrs_skipped: Gauge,
    pub route_errors: Counter,
    pub route_update_seconds: Histogram,
    seen: Arc<Mutex<Seen>>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MapLabel {
    pub map: String,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Loss reason: the kernel's ring buffer was full.
pub const LOST_RING_FULL: &str = "ring_full";
/// Loss reason: a `/flows` client read too slowly and missed events.
pub const LOST_SLOW_READER: &str = "slow_reader";

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("weft_cni");
        let m = Metrics {
            registry: Arc::new(Registry::default()),
            policy_allowed: Family::default(),
            denied: Family::default(),
            policy_denied: Family::default(),
            spoofed: Family::default(),
            endpoints: Gauge::default(),
            policy_updates: Counter::default(),
            policy_errors: Counter::default(),
            policy_update_seconds: Histogram::new([
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
            ]),
            flow_events_lost: Family::default(),
            service_frontends: Gauge::default(),
            service_backends: Gauge::default(),
            service_errors: Counter::default(),
            service_update_seconds: Histogram::new([
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
            ]),
            map_entries: Family::default(),
            map_capacity: Family::default(),
            attached_interfaces: Gauge::default(),
            last_sync: Gauge::default(),
            remote_pod_cidrs: Gauge::default(),
            remote_pod_cidrs_skipped: Gauge::default(),
            route_errors: Counter::default(),
            route_update_seconds: Histogram::new([
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
            ]),
            seen: Arc::default(),
        };
        registry.register(
            "policy_allowed_connections",
            "New connections allowed, by the deciding NetworkPolicy (namespace/name; \"node\": \
             traffic from or to the node itself; \"none\": the direction was not isolated)",
            m.policy_allowed.clone(),
        );
        registry.register(
            "denied_connections",
            "New connections denied, by local pod and direction (from the pod's point of view)",
            m.denied.clone(),
        );
        registry.register(
            "policy_denied_connections",
            "New connections denied, counted under every NetworkPolicy isolating the pod in that \
             direction (a denial has no single deciding policy, so one drop counts once per \
             isolating policy)",
            m.policy_denied.clone(),
        );
        registry.register(
            "spoofed_source_drops",
            "Packets a local pod sent from an address that is not its own, dropped",
            m.spoofed.clone(),
        );
        registry.register(
            "endpoints",
            "Pod endpoints registered on this node",
            m.endpoints.clone(),
        );
        registry.register(
            "policy_updates",
            "Endpoint policies written to the datapath",
            m.policy_updates.clone(),
        );
        registry.register(
            "policy_errors",
            "Endpoint policies that could not be computed or written (the endpoint keeps its \
             previous policy)",
            m.policy_errors.clone(),
        );
        registry.register(
            "policy_update_seconds",
            "Time from a change seen (cluster state or endpoints) to the maps written",
            m.policy_update_seconds.clone(),
        );
        registry.register(
            "flow_events_lost",
            "Flow events lost: ring_full (the kernel's ring buffer was full), slow_reader (a \
             /flows client fell behind)",
            m.flow_events_lost.clone(),
        );
        registry.register(
            "map_entries",
            "Entries in each pinned keyed eBPF map (counted at most every 5 s)",
            m.map_entries.clone(),
        );
        registry.register(
            "map_capacity",
            "Maximum entries of each pinned keyed eBPF map",
            m.map_capacity.clone(),
        );
        registry.register(
            "attached_interfaces",
            "Interfaces carrying the datapath's tcx links",
            m.attached_interfaces.clone(),
        );
        registry.register(
            "remote_pod_cidrs",
            "Other nodes' pod CIDRs routed (direct routing or VXLAN), from the Node objects",
            m.remote_pod_cidrs.clone(),
        );
        registry.register(
            "remote_pod_cidrs_skipped",
            "Other nodes' pod CIDRs not routed (overlapping this node's or another's, or of a \
             family the underlay cannot carry); each is logged",
            m.remote_pod_cidrs_skipped.clone(),
        );
        registry.register(
            "route_errors",
            "Failed updates of the routes to other nodes (retried at the next change and every \
             30 s)",
            m.route_errors.clone(),
        );
        registry.register(
            "route_update_seconds",
            "Time to reconcile the routes to other nodes with the Node objects",
            m.route_update_seconds.clone(),
        );
        registry.register(
            "last_sync_timestamp_seconds",
            "When policy was last computed and written (Unix time; 0 before the first sync)",
            m.last_sync.clone(),
        );
        registry.register(
            "service_frontends",
            "Service frontends (ClusterIP, port, protocol) programmed in the datapath",
            m.service_frontends.clone(),
        );
        registry.register(
            "service_backends",
            "Backends programmed over all Service frontends",
            m.service_backends.clone(),
        );
        registry.register(
            "service_errors",
            "Service problems reported (an unresolvable targetPort, too many endpoints, an \
             untranslated protocol, a failed map write); each counted once while it lasts",
            m.service_errors.clone(),
        );
        registry.register(
            "service_update_seconds",
            "Time from an index change seen to the service maps written",
            m.service_update_seconds.clone(),
        );
        Metrics {
            registry: Arc::new(registry),
            ..m
        }
    }

    /// Sets the status gauges (map fill, attachments, last sync) from a `/status` answer.
    pub fn observe_status(
        &self,
        status: &crate::status::NodeStatus,
        last_sync: Option<std::time::SystemTime>,
    ) {
        for m in &status.maps {
            let label = MapLabel {
                map: m.name.clone(),
            };
            self.map_entries
                .get_or_create(&label)
                .set(i64::try_from(m.entries).unwrap_or(i64::MAX));
            self.map_capacity
                .get_or_create(&label)
                .set(i64::from(m.max_entries));
        }
        self.attached_interfaces
            .set(i64::try_from(status.programs.attached_interfaces).unwrap_or(i64::MAX));
        let unix = last_sync
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0);
        self.last_sync.set(unix);
    }

    /// Adds what the datapath's counters moved since the last call.
    pub fn observe(
        &self,
        counters: &BTreeMap<u32, PolicyCounters>,
        drops: &BTreeMap<(u32, Direction), u64>,
        flow_lost: u64,
        policy_names: &BTreeMap<u32, String>,
        endpoints: &HashMap<u32, EndpointNames>,
    ) {
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        for (id, c) in counters {
            let last = seen.counters.insert(*id, c.allowed_conns).unwrap_or(0);
            let delta = delta(last, c.allowed_conns);
            let Some(name) = policy_names.get(id) else {
                continue;
            };
            if delta > 0 {
                self.policy_allowed
                    .get_or_create(&PolicyLabel {
                        policy: name.clone(),
                    })
                    .inc_by(delta);
            }
        }
        seen.counters.retain(|id, _| counters.contains_key(id));
        for ((ep_id, direction), n) in drops {
            let last = seen.drops.insert((*ep_id, *direction), *n).unwrap_or(0);
            let delta = delta(last, *n);
            let Some(ep) = endpoints.get(ep_id) else {
                continue;
            };
            if delta == 0 {
                continue;
            }
            self.denied
                .get_or_create(&PodLabels {
                    namespace: ep.namespace.clone(),
                    pod: ep.pod.clone(),
                    direction: direction.to_string(),
                })
                .inc_by(delta);
            let by = match direction {
                Direction::Ingress => &ep.ingress_by,
                Direction::Egress => &ep.egress_by,
            };
            for policy in by {
                self.policy_denied
                    .get_or_create(&PolicyLabel {
                        policy: policy.clone(),
                    })
                    .inc_by(delta);
            }
        }
        seen.drops.retain(|k, _| drops.contains_key(k));
        let lost = delta(seen.flow_lost, flow_lost);
        seen.flow_lost = flow_lost;
        if lost > 0 {
            self.lost(LOST_RING_FULL, lost);
        }
    }

    /// Adds what the datapath's spoofed-source drops (per endpoint id) moved since the last
    /// call.
    pub fn observe_source_drops(
        &self,
        drops: &BTreeMap<u32, u64>,
        endpoints: &HashMap<u32, EndpointNames>,
    ) {
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        for (ep_id, n) in drops {
            let last = seen.source_drops.insert(*ep_id, *n).unwrap_or(0);
            let delta = delta(last, *n);
            let Some(ep) = endpoints.get(ep_id) else {
                continue;
            };
            if delta > 0 {
                self.spoofed
                    .get_or_create(&PodLabel {
                        namespace: ep.namespace.clone(),
                        pod: ep.pod.clone(),
                    })
                    .inc_by(delta);
            }
        }
        seen.source_drops.retain(|k, _| drops.contains_key(k));
    }

    pub fn lost(&self, reason: &str, n: u64) {
        self.flow_events_lost
            .get_or_create(&ReasonLabel {
                reason: reason.to_string(),
            })
            .inc_by(n);
    }

    /// Drops a deleted policy's series.
    pub fn forget_policy(&self, name: &str) {
        let label = PolicyLabel {
            policy: name.to_string(),
        };
        self.policy_allowed.remove(&label);
        self.policy_denied.remove(&label);
    }

    /// Drops a deleted pod's series.
    pub fn forget_pod(&self, namespace: &str, pod: &str) {
        for direction in [Direction::Ingress, Direction::Egress] {
            self.denied.remove(&PodLabels {
                namespace: namespace.to_string(),
                pod: pod.to_string(),
                direction: direction.to_string(),
            });
        }
        self.spoofed.remove(&PodLabel {
            namespace: namespace.to_string(),
            pod: pod.to_string(),
        });
    }

    /// The OpenMetrics text (ends with `# EOF`).
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::warn!(error = %e, "encoding metrics failed");
        }
        out
    }
}

/// How much a kernel counter moved (a counter that went back was reset: all of it is new).
fn delta(last: u64, now: u64) -> u64 {
    if now >= last {
        now - last
    } else {
        now
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_counters_become_named_monotonic_counters() {
        let m = Metrics::new();
        let names: BTreeMap<u32, String> = [(3, "a/web".to_string())].into();
        let eps: HashMap<u32, EndpointNames> = [(
            9,
            EndpointNames {
                namespace: "a".into(),
                pod: "p".into(),
                ingress_by: vec!["a/web".into(), "a/deny".into()],
                egress_by: vec![],
            },
        )]
        .into();
        let counters = |n| {
            [(
                3,
                PolicyCounters {
                    allowed_conns: n,
                    allowed_packets: 10 * n,
                },
            )]
            .into()
        };
        let drops = |n| [((9, Direction::Ingress), n)].into();
        m.observe(&counters(2), &drops(1), 0, &names, &eps);
        m.observe(&counters(5), &drops(4), 3, &names, &eps);
        m.observe_source_drops(&[(9, 2)].into(), &eps);
        m.observe_source_drops(&[(9, 7)].into(), &eps);
        let text = m.encode();
        for want in [
            "weft_cni_spoofed_source_drops_total{namespace=\"a\",pod=\"p\"} 7",
            "weft_cni_policy_allowed_connections_total{policy=\"a/web\"} 5",
            "weft_cni_denied_connections_total{namespace=\"a\",pod=\"p\",direction=\"ingress\"} 4",
            "weft_cni_policy_denied_connections_total{policy=\"a/web\"} 4",
            "weft_cni_policy_denied_connections_total{policy=\"a/deny\"} 4",
            "weft_cni_flow_events_lost_total{reason=\"ring_full\"} 3",
        ] {
            assert!(text.contains(want), "missing {want} in\n{text}");
        }
        m.forget_pod("a", "p");
        m.forget_policy("a/web");
        let text = m.encode();
        assert!(
            !text.contains("pod=\"p\"") && !text.contains("a/web"),
            "{text}"
        );
    }
}

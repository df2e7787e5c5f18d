//! Services in the datapath (the kube-proxy replacement): from the index's Services and
//! EndpointSlices to the frontends and backends the eBPF programs translate to.
//!
//! ```text
//!   index (Services, EndpointSlices, Pods) ──Snapshot──▶ compute() ──▶ frontends + problems
//!        ──generation (debounced)──▶ Writer::sync ──▶ weft_lb_svc (new first, stale after)
//! ```
//!
//! - A frontend is a ClusterIP, a service port and its protocol (TCP or UDP; SCTP ports are
//!   left to the kernel and reported once). A dual-stack Service has one per ClusterIP.
//! - Backends are the **ready** endpoints of the Service's EndpointSlices of the frontend's
//!   address family (an endpoint's first address, as the API allows), at the port
//!   [`weft_model::ports::endpoint_port`] gives: the slice's port of the same name, else the
//!   `targetPort` resolved against the endpoint's pod (named ports through the pod's
//!   container ports). Those helpers speak TCP; for a UDP port they are shown the slice's and
//!   pod's UDP ports, so the rule itself is written once. An endpoint whose port cannot be
//!   resolved is left out, and reported once, naming the Service, the field and the pod.
//! - A Service without ready backends keeps its frontends with no backends: the datapath
//!   refuses its connections (ICMP port unreachable) instead of blackholing them.
//! - More than [`weft_datapath::abi::LB_MAX_BACKENDS`] backends: the first ones (sorted)
//!   are programmed and the Service is reported.
//! - Frontend ids are stable: the pinned map's ids are adopted at start (an agent restart
//!   keeps affinities and counters), new frontends take the next free id.
//! - `sessionAffinity: ClientIP` gives each of the Service's frontends its timeout.
//! - A port with a `nodePort` also has a NodePort frontend on each address of the node's
//!   external interface ([`NodeView::addrs`]), served by `weft_nodeport.o` there.
//!   `externalTrafficPolicy: Cluster` (the default): every ready endpoint; those not on this
//!   node ([`NodeView::local`] and the node's own addresses are) are marked remote, and the
//!   datapath reaches them through source NAT (the node's address and a port of
//!   [`weft_datapath::abi::SNAT_PORTS`]), so their answers come back through this node.
//!   `Local`: only this node's endpoints, which see the client's address; a node without one
//!   refuses.
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use weft_controller::index::Index;
use weft_controller::source::Readiness;
use weft_datapath::{self as dp, abi::LB_MAX_BACKENDS, Frontend, ServiceMaps, L4};
use weft_model::ports::endpoint_port;
use weft_model::{AddressType, EndpointSlice, ObjectKey, Pod, Service, ServicePort};

use crate::metrics::Metrics;

/// A copy of what services need from the index.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    pub services: Vec<Arc<Service>>,
    /// Slices by the Service they belong to.
    pub slices: HashMap<ObjectKey, Vec<Arc<EndpointSlice>>>,
    pub pods: HashMap<ObjectKey, Arc<Pod>>,
    /// This node, for NodePort frontends.
    pub node: NodeView,
}

/// What NodePort frontends need of the node.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeView {
    /// The addresses NodePorts are served on: the external interface's (empty: no NodePort
    /// frontends, e.g. no external interface was found).
    pub addrs: Vec<IpAddr>,
    /// The addresses of this node's pods (the local endpoints).
    pub local: BTreeSet<IpAddr>,
}

impl Snapshot {
    pub fn from_index(index: &Index) -> Snapshot {
        let st = index.read();
        let mut slices: HashMap<ObjectKey, Vec<Arc<EndpointSlice>>> = HashMap::new();
        for s in st.slices.values() {
            if let Some(svc) = s.service_key() {
                slices.entry(svc).or_default().push(s.clone());
            }
        }
        Snapshot {
            services: st.services.values().cloned().collect(),
            slices,
            pods: st
                .pods
                .iter()
                .map(|(k, p)| (k.clone(), p.clone()))
                .collect(),
            node: NodeView::default(),
        }
    }
}

/// Something about a Service the datapath cannot do as asked; reported once.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Problem {
    /// `namespace/name` of the Service.
    pub service: String,
    /// The field at fault, e.g. `spec.ports[0].targetPort`.
    pub field: String,
    pub message: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Service {} {}: {}",
            self.service, self.field, self.message
        )
    }
}

/// A frontend before it has an id.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Wanted {
    pub service: ObjectKey,
    pub frontend: Frontend,
    pub backends: Vec<SocketAddr>,
    /// The Service's sessionAffinity ClientIP timeout.
    pub affinity_timeout_s: Option<u32>,
    /// A NodePort frontend (a node address).
    pub node_port: bool,
    /// The backends on another node (a Cluster NodePort's, reached through source NAT).
    pub remote: Vec<SocketAddr>,
}

fn family_matches(t: AddressType, ip: &IpAddr) -> bool {
    matches!(
        (t, ip),
        (AddressType::IPv4, IpAddr::V4(_)) | (AddressType::IPv6, IpAddr::V6(_))
    )
}

/// The model's port rule for `proto`: for UDP the slice's and pod's UDP ports are presented
/// as the TCP ones the helpers look for (and their TCP ports hidden).
fn backend_port(
    svc_port: &ServicePort,
    proto: L4,
    slice: &EndpointSlice,
    pod: Option<&Pod>,
) -> Option<u16> {
    if proto == L4::Tcp {
        return endpoint_port(svc_port, slice, pod);
    }
    let udp = |p: &str| p.eq_ignore_ascii_case("UDP");
    let mut slice_view = EndpointSlice {
        key: slice.key.clone(),
        service: None,
        address_type: slice.address_type,
        ports: Vec::new(),
        endpoints: Vec::new(),
    };
    slice_view.ports = slice
        .ports
        .iter()
        .filter(|p| udp(&p.protocol))
        .map(|p| weft_model::SlicePort {
            protocol: "TCP".into(),
            ..p.clone()
        })
        .collect();
    let pod_view = pod.map(|p| {
        let mut p = p.clone();
        p.container_ports.retain(|c| udp(&c.protocol));
        for c in &mut p.container_ports {
            c.protocol = "TCP".into();
        }
        p
    });
    endpoint_port(svc_port, &slice_view, pod_view.as_ref())
}

/// Every frontend the cluster asks for, and what could not be done as asked.
pub fn compute(snap: &Snapshot) -> (Vec<Wanted>, Vec<Problem>) {
    let mut out = Vec::new();
    let mut problems = BTreeSet::new();
    let no_slices = Vec::new();
    for svc in &snap.services {
        if svc.headless || svc.cluster_ips.is_empty() {
            continue;
        }
        let name = format!("{}/{}", svc.key.namespace, svc.key.name);
        let slices = snap.slices.get(&svc.key).unwrap_or(&no_slices);
        for (i, sp) in svc.ports.iter().enumerate() {
            let Some(proto) = L4::from_k8s(&sp.protocol) else {
                problems.insert(Problem {
                    service: name.clone(),
                    field: format!("spec.ports[{i}].protocol"),
                    message: format!(
                        "{} is not translated by the datapath (TCP and UDP are)",
                        sp.protocol
                    ),
                });
                continue;
            };
            for vip in &svc.cluster_ips {
                let mut backends = BTreeSet::new();
                for slice in slices {
                    if !family_matches(slice.address_type, vip) {
                        continue;
                    }
                    for ep in slice.endpoints.iter().filter(|e| e.ready) {
                        let Some(ip) = ep.addresses.first() else {
                            continue;
                        };
                        let pod_key = ep
                            .pod
                            .as_ref()
                            .map(|p| ObjectKey::new(svc.key.namespace.clone(), p.clone()));
                        let pod = pod_key.as_ref().and_then(|k| snap.pods.get(k));
                        match backend_port(sp, proto, slice, pod.map(|p| &**p)) {
                            Some(port) => {
                                backends.insert(SocketAddr::new(*ip, port));
                            }
                            None => {
                                let who = ep.pod.as_ref().map_or_else(
                                    || format!("endpoint {ip} (no pod)"),
                                    |p| format!("pod {}/{p}", svc.key.namespace),
                                );
                                problems.insert(Problem {
                                    service: name.clone(),
                                    field: format!("spec.ports[{i}].targetPort"),
                                    message: format!(
                                        "{:?} ({proto}) does not resolve for {who} in \
                                         EndpointSlice {}: the endpoint is left out",
                                        sp.target_port.to_string(),
                                        slice.key.name
                                    ),
                                });
                            }
                        }
                    }
                }
                let mut backends: Vec<SocketAddr> = backends.into_iter().collect();
                if backends.len() > LB_MAX_BACKENDS {
                    problems.insert(Problem {
                        service: name.clone(),
                        field: format!("spec.ports[{i}]"),
                        message: format!(
                            "{} ready endpoints for {vip}; the datapath holds {LB_MAX_BACKENDS} \
                             per frontend, the rest are left out",
                            backends.len()
                        ),
                    });
                    backends.truncate(LB_MAX_BACKENDS);
                }
                if let Some(node_port) = sp.node_port {
                    // This node's pods, and host-network endpoints on this node.
                    let on_node = |b: &&SocketAddr| {
                        snap.node.local.contains(&b.ip()) || snap.node.addrs.contains(&b.ip())
                    };
                    let (np_backends, remote): (Vec<SocketAddr>, Vec<SocketAddr>) =
                        if svc.external_traffic_local {
                            (
                                backends.iter().filter(on_node).copied().collect(),
                                Vec::new(),
                            )
                        } else {
                            let remote = backends.iter().filter(|b| !on_node(b)).copied();
                            (backends.clone(), remote.collect())
                        };
                    for addr in snap
                        .node
                        .addrs
                        .iter()
                        .filter(|a| a.is_ipv4() == vip.is_ipv4())
                    {
                        out.push(Wanted {
                            service: svc.key.clone(),
                            frontend: Frontend {
                                addr: *addr,
                                port: node_port,
                                proto,
                            },
                            backends: np_backends.clone(),
                            affinity_timeout_s: svc.affinity_timeout_s,
                            node_port: true,
                            remote: remote.clone(),
                        });
                    }
                }
                out.push(Wanted {
                    service: svc.key.clone(),
                    frontend: Frontend {
                        addr: *vip,
                        port: sp.port,
                        proto,
                    },
                    backends,
                    affinity_timeout_s: svc.affinity_timeout_s,
                    node_port: false,
                    remote: Vec::new(),
                });
            }
        }
    }
    // A ClusterIP claimed twice for one port: the first Service (by name) keeps it.
    out.sort_by(|a, b| (a.frontend, &a.service).cmp(&(b.frontend, &b.service)));
    let mut seen = BTreeSet::new();
    out.retain(|w| {
        if seen.insert(w.frontend) {
            return true;
        }
        problems.insert(Problem {
            service: format!("{}/{}", w.service.namespace, w.service.name),
            field: if w.node_port {
                "spec.ports[].nodePort".into()
            } else {
                "spec.clusterIPs".into()
            },
            message: format!("{} is another Service's frontend: ignored", w.frontend),
        });
        false
    });
    (out, problems.into_iter().collect())
}

/// Stable ids per frontend (0 is never used).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FrontendIds {
    ids: BTreeMap<Frontend, u32>,
    next: u32,
}

impl FrontendIds {
    /// The ids a writer left in the maps.
    pub fn adopt(existing: &[dp::Service]) -> Self {
        let ids: BTreeMap<Frontend, u32> = existing.iter().map(|s| (s.frontend, s.id)).collect();
        let next = ids.values().copied().max().unwrap_or(0);
        FrontendIds { ids, next }
    }

    /// Keeps exactly `frontends`, giving new ones the next free id.
    pub fn update<'a>(&mut self, frontends: impl IntoIterator<Item = &'a Frontend>) {
        let wanted: BTreeSet<Frontend> = frontends.into_iter().copied().collect();
        self.ids.retain(|f, _| wanted.contains(f));
        let used: BTreeSet<u32> = self.ids.values().copied().collect();
        for f in wanted {
            if self.ids.contains_key(&f) {
                continue;
            }
            loop {
                self.next = self.next.wrapping_add(1);
                if self.next != 0 && !used.contains(&self.next) {
                    break;
                }
            }
            self.ids.insert(f, self.next);
        }
    }

    pub fn get(&self, f: &Frontend) -> Option<u32> {
        self.ids.get(f).copied()
    }
}

/// What one sync did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SyncReport {
    pub frontends: usize,
    pub backends: usize,
    pub written: usize,
    pub deleted: usize,
    /// UDP translations to removed backends forgotten.
    pub forgotten: usize,
    pub error: bool,
}

/// Writes the services into the maps; logs each problem once.
pub struct Writer<M: ServiceMaps> {
    maps: M,
    ids: FrontendIds,
    /// What was last written, by frontend.
    written: BTreeMap<Frontend, dp::Service>,
    logged: BTreeSet<String>,
    metrics: Metrics,
}

impl<M: ServiceMaps> std::fmt::Debug for Writer<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Writer")
            .field("frontends", &self.written.len())
            .finish_non_exhaustive()
    }
}

impl<M: ServiceMaps> Writer<M> {
    /// Adopts what the pinned maps hold (ids, and the frontends as last written).
    pub fn new(maps: M, metrics: Metrics) -> Self {
        let existing = maps.services().unwrap_or_else(|e| {
            tracing::warn!(error = %e, "reading the pinned services failed; starting afresh");
            Vec::new()
        });
        if !existing.is_empty() {
            tracing::info!(
                frontends = existing.len(),
                "adopted the pinned service frontends"
            );
        }
        Writer {
            ids: FrontendIds::adopt(&existing),
            written: existing.into_iter().map(|s| (s.frontend, s)).collect(),
            maps,
            logged: BTreeSet::new(),
            metrics,
        }
    }

    pub fn maps(&self) -> &M {
        &self.maps
    }

    fn log_once(&mut self, message: String, error: bool) -> bool {
        if self.logged.insert(message.clone()) {
            if error {
                tracing::error!("{message}");
            } else {
                tracing::warn!("{message}");
            }
            return true;
        }
        false
    }

    /// Makes the maps hold what `snap` asks for.
    pub fn sync(&mut self, snap: &Snapshot) -> SyncReport {
        let (wanted, problems) = compute(snap);
        let mut current: BTreeSet<String> = BTreeSet::new();
        for p in problems {
            let message = p.to_string();
            if self.log_once(message.clone(), false) {
                self.metrics.service_errors.inc();
            }
            current.insert(message);
        }
        self.ids.update(wanted.iter().map(|w| &w.frontend));
        let services: Vec<dp::Service> = wanted
            .into_iter()
            .filter_map(|w| {
                Some(dp::Service {
                    id: self.ids.get(&w.frontend)?,
                    frontend: w.frontend,
                    backends: w.backends,
                    affinity_timeout_s: w.affinity_timeout_s,
                    node_port: w.node_port,
                    remote: w.remote,
                })
            })
            .collect();
        let mut report = SyncReport {
            frontends: services.len(),
            backends: services.iter().map(|s| s.backends.len()).sum(),
            ..SyncReport::default()
        };
        match self.maps.replace_services(&services) {
            Ok(w) => {
                report.written = w.written;
                report.deleted = w.deleted;
            }
            Err(e) => {
                let message = format!("writing the service frontends: {e}");
                if self.log_once(message.clone(), true) {
                    self.metrics.service_errors.inc();
                }
                current.insert(message);
                report.error = true;
            }
        }
        // A problem that went away is logged again should it come back.
        self.logged.retain(|m| current.contains(m));
        if report.error {
            return report;
        }
        // UDP has no end of connection: translations to backends that went are forgotten.
        let now: BTreeMap<Frontend, dp::Service> =
            services.into_iter().map(|s| (s.frontend, s)).collect();
        let mut removed = BTreeSet::new();
        for (f, old) in &self.written {
            if f.proto != L4::Udp {
                continue;
            }
            let kept = now.get(f).map(|s| s.backends.as_slice()).unwrap_or(&[]);
            removed.extend(old.backends.iter().filter(|b| !kept.contains(b)).copied());
        }
        // A backend still serving another UDP frontend keeps its translations.
        for s in now.values().filter(|s| s.frontend.proto == L4::Udp) {
            for b in &s.backends {
                removed.remove(b);
            }
        }
        if !removed.is_empty() {
            let removed: Vec<SocketAddr> = removed.into_iter().collect();
            match self.maps.forget_backends(L4::Udp, &removed) {
                Ok(n) => report.forgotten = n,
                Err(e) => tracing::warn!(error = %e, "forgetting UDP translations failed"),
            }
        }
        self.written = now;
        self.metrics.service_frontends.set(report.frontends as i64);
        self.metrics.service_backends.set(report.backends as i64);
        report
    }
}

/// Keeps the service maps equal to the index: recomputed on every index change, debounced
/// like policy. Runs until the index goes away.
/// How often the node's view (external addresses, local pods) is re-read for NodePorts.
pub const NODE_VIEW_POLL: Duration = Duration::from_secs(1);

/// Where [`run`] reads the node's view from (the agent: its interfaces and registry).
pub type NodeViewFn = Arc<dyn Fn() -> NodeView + Send + Sync>;

pub async fn run<M: ServiceMaps + Send + 'static>(
    maps: M,
    index: Index,
    readiness: Readiness,
    metrics: Metrics,
    debounce: Duration,
    node_view: NodeViewFn,
) {
    let mut generation = index.generation();
    while !readiness.is_ready() {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut writer = Writer::new(maps, metrics.clone());
    let mut poll = tokio::time::interval(NODE_VIEW_POLL);
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut node = node_view();
    loop {
        let since = Instant::now();
        tokio::time::sleep(debounce).await;
        generation.borrow_and_update();
        let mut snap = Snapshot::from_index(&index);
        snap.node = node.clone();
        let report = writer.sync(&snap);
        let took = since.elapsed();
        metrics.service_update_seconds.observe(took.as_secs_f64());
        if report.written > 0 || report.deleted > 0 || report.forgotten > 0 {
            tracing::info!(
                frontends = report.frontends,
                backends = report.backends,
                written = report.written,
                deleted = report.deleted,
                forgotten_udp = report.forgotten,
                change_to_maps_ms = took.as_secs_f64() * 1000.0,
                "services synced"
            );
        }
        // Wait for the index, or for the node's view to change (a pod added or removed on
        // this node, an address of the external interface).
        loop {
            tokio::select! {
                r = generation.changed() => {
                    if r.is_err() {
                        return;
                    }
                    node = node_view();
                    break;
                }
                _ = poll.tick() => {
                    let now = node_view();
                    if now != node {
                        node = now;
                        break;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use weft_model::{ContainerPort, SliceEndpoint, SlicePort, TargetPort};

    fn svc(name: &str, vip: &str, ports: Vec<ServicePort>) -> Arc<Service> {
        Arc::new(Service {
            key: ObjectKey::new("shop", name),
            cluster_ips: vec![vip.parse().expect("ip")],
            headless: false,
            ports,
            selector: None,
            affinity_timeout_s: None,
            external_traffic_local: false,
        })
    }

    fn port(name: &str, port: u16, target: TargetPort, protocol: &str) -> ServicePort {
        ServicePort {
            name: Some(name.into()),
            port,
            target_port: target,
            protocol: protocol.into(),
            node_port: None,
        }
    }

    fn endpoint(ip: &str, pod: &str, ready: bool) -> SliceEndpoint {
        SliceEndpoint {
            addresses: vec![ip.parse().expect("ip")],
            ready,
            serving: ready,
            terminating: false,
            zone: None,
            pod: Some(pod.into()),
        }
    }

    fn pod(name: &str, ports: &[(&str, u16, &str)]) -> Arc<Pod> {
        let mut p = crate::policy::unknown_pod(ObjectKey::new("shop", name), vec![]);
        p.container_ports = ports
            .iter()
            .map(|(n, port, proto)| ContainerPort {
                name: Some((*n).into()),
                port: *port,
                protocol: (*proto).into(),
                container: "app".into(),
            })
            .collect();
        Arc::new(p)
    }

    fn snapshot(
        services: Vec<Arc<Service>>,
        slices: Vec<EndpointSlice>,
        pods: Vec<Arc<Pod>>,
    ) -> Snapshot {
        let mut by_svc: HashMap<ObjectKey, Vec<Arc<EndpointSlice>>> = HashMap::new();
        for s in slices {
            let key = s.service_key().expect("named service");
            by_svc.entry(key).or_default().push(Arc::new(s));
        }
        Snapshot {
            services,
            slices: by_svc,
            pods: pods.into_iter().map(|p| (p.key.clone(), p)).collect(),
            node: NodeView::default(),
        }
    }

    fn slice(
        name: &str,
        svc: &str,
        ports: Vec<SlicePort>,
        eps: Vec<SliceEndpoint>,
    ) -> EndpointSlice {
        EndpointSlice {
            key: ObjectKey::new("shop", name),
            service: Some(svc.into()),
            address_type: AddressType::IPv4,
            ports,
            endpoints: eps,
        }
    }

    fn sa(s: &str) -> SocketAddr {
        s.parse().expect("socket address")
    }

    #[test]
    fn ready_endpoints_with_named_ports_resolved_per_protocol() {
        let web = svc(
            "web",
            "10.96.0.10",
            vec![
                port("http", 80, TargetPort::Name("http".into()), "TCP"),
                port("dns", 53, TargetPort::Name("dns".into()), "UDP"),
                port("sctp", 9, TargetPort::Number(9), "SCTP"),
            ],
        );
        // A hand-written slice without ports: the pods' container ports decide.
        let s = slice(
            "web-1",
            "web",
            vec![],
            vec![
                endpoint("10.0.0.2", "a", true),
                endpoint("10.0.0.3", "b", true),
                endpoint("10.0.0.4", "c", false),
                endpoint("10.0.0.5", "d", true),
            ],
        );
        let pods = vec![
            pod("a", &[("http", 8080, "TCP"), ("dns", 5353, "UDP")]),
            pod("b", &[("http", 8081, "TCP"), ("dns", 5354, "UDP")]),
            // d names its UDP port "http" only: no "dns", and http is not UDP.
            pod("d", &[("http", 8082, "TCP"), ("other", 5355, "UDP")]),
        ];
        let (wanted, problems) = compute(&snapshot(vec![web], vec![s], pods));
        assert_eq!(wanted.len(), 2, "{wanted:?}");
        let tcp = wanted
            .iter()
            .find(|w| w.frontend.proto == L4::Tcp)
            .expect("tcp");
        assert_eq!(
            tcp.backends,
            vec![
                sa("10.0.0.2:8080"),
                sa("10.0.0.3:8081"),
                sa("10.0.0.5:8082")
            ]
        );
        let udp = wanted
            .iter()
            .find(|w| w.frontend.proto == L4::Udp)
            .expect("udp");
        assert_eq!(udp.backends, vec![sa("10.0.0.2:5353"), sa("10.0.0.3:5354")]);
        let text: Vec<String> = problems.iter().map(ToString::to_string).collect();
        assert_eq!(problems.len(), 2, "{text:?}");
        assert!(text
            .iter()
            .any(|t| t.contains("shop/web spec.ports[2].protocol")));
        assert!(text
            .iter()
            .any(|t| t.contains("spec.ports[1].targetPort") && t.contains("pod shop/d")));
    }

    #[test]
    fn node_ports_reach_remote_endpoints_through_snat_unless_local() {
        let mut web = (*svc(
            "web",
            "10.96.0.10",
            vec![port("http", 80, TargetPort::Number(8080), "TCP")],
        ))
        .clone();
        web.ports[0].node_port = Some(30080);
        // A pod on this node, one on another node, and a host-network endpoint on this node.
        let s = slice(
            "web-1",
            "web",
            vec![],
            vec![
                endpoint("10.0.0.2", "a", true),
                endpoint("10.0.1.2", "b", true),
                endpoint("192.168.1.10", "c", true),
            ],
        );
        let mut snap = snapshot(vec![Arc::new(web.clone())], vec![s.clone()], vec![]);
        snap.node = NodeView {
            addrs: vec!["192.168.1.10".parse().expect("ip")],
            local: ["10.0.0.2".parse().expect("ip")].into_iter().collect(),
        };
        let node_port = |snap: &Snapshot| {
            let (wanted, problems) = compute(snap);
            assert!(problems.is_empty(), "{problems:?}");
            let cluster_ip = wanted.iter().find(|w| !w.node_port).expect("ClusterIP");
            assert!(cluster_ip.remote.is_empty(), "a ClusterIP never SNATs");
            assert_eq!(cluster_ip.backends.len(), 3);
            wanted.into_iter().find(|w| w.node_port).expect("NodePort")
        };
        let cluster = node_port(&snap);
        assert_eq!(cluster.frontend.addr.to_string(), "192.168.1.10");
        assert_eq!(
            cluster.backends,
            vec![
                sa("10.0.0.2:8080"),
                sa("10.0.1.2:8080"),
                sa("192.168.1.10:8080")
            ],
            "Cluster: every ready endpoint"
        );
        assert_eq!(
            cluster.remote,
            vec![sa("10.0.1.2:8080")],
            "only the other node's pod"
        );
        web.external_traffic_local = true;
        snap.services = vec![Arc::new(web)];
        let local = node_port(&snap);
        assert_eq!(
            local.backends,
            vec![sa("10.0.0.2:8080"), sa("192.168.1.10:8080")],
            "Local: this node's endpoints only"
        );
        assert!(local.remote.is_empty());
    }

    #[test]
    fn client_ip_affinity_reaches_every_frontend_of_the_service() {
        let mut web = (*svc(
            "web",
            "10.96.0.10",
            vec![
                port("http", 80, TargetPort::Number(8080), "TCP"),
                port("dns", 53, TargetPort::Number(5353), "UDP"),
            ],
        ))
        .clone();
        web.affinity_timeout_s = Some(60);
        let other = svc(
            "other",
            "10.96.0.11",
            vec![port("http", 80, TargetPort::Number(80), "TCP")],
        );
        let (wanted, _) = compute(&snapshot(vec![Arc::new(web), other], vec![], vec![]));
        let of = |name: &str| -> Vec<Option<u32>> {
            wanted
                .iter()
                .filter(|w| w.service.name == name)
                .map(|w| w.affinity_timeout_s)
                .collect()
        };
        assert_eq!(of("web"), vec![Some(60), Some(60)]);
        assert_eq!(of("other"), vec![None]);
    }

    #[test]
    fn slice_ports_win_and_a_service_without_endpoints_keeps_its_frontend() {
        let web = svc(
            "web",
            "10.96.0.10",
            vec![port("http", 80, TargetPort::Name("http".into()), "TCP")],
        );
        let empty = svc(
            "empty",
            "10.96.0.11",
            vec![port("http", 80, TargetPort::Number(80), "TCP")],
        );
        let s = slice(
            "web-1",
            "web",
            vec![SlicePort {
                name: Some("http".into()),
                port: Some(9090),
                protocol: "TCP".into(),
            }],
            vec![endpoint("10.0.0.2", "gone", true)],
        );
        let (wanted, problems) = compute(&snapshot(vec![web, empty], vec![s], vec![]));
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(wanted.len(), 2);
        let by_vip = |ip: &str| {
            wanted
                .iter()
                .find(|w| w.frontend.addr == ip.parse::<IpAddr>().expect("ip"))
                .expect("frontend")
        };
        assert_eq!(by_vip("10.96.0.10").backends, vec![sa("10.0.0.2:9090")]);
        assert!(
            by_vip("10.96.0.11").backends.is_empty(),
            "refused, not dropped"
        );
    }

    #[test]
    fn ids_are_stable_and_adopted_from_the_maps() {
        let f = |port| Frontend {
            addr: "10.96.0.1".parse().expect("ip"),
            port,
            proto: L4::Tcp,
        };
        let mut ids = FrontendIds::default();
        ids.update([&f(1), &f(2)]);
        assert_eq!((ids.get(&f(1)), ids.get(&f(2))), (Some(1), Some(2)));
        ids.update([&f(2), &f(3)]);
        assert_eq!((ids.get(&f(2)), ids.get(&f(3))), (Some(2), Some(3)));
        let adopted = FrontendIds::adopt(&[dp::Service {
            id: 7,
            frontend: f(2),
            backends: vec![],
            affinity_timeout_s: None,
            node_port: false,
            remote: Vec::new(),
        }]);
        let mut again = adopted.clone();
        again.update([&f(2), &f(4)]);
        assert_eq!((again.get(&f(2)), again.get(&f(4))), (Some(7), Some(8)));
    }

    #[test]
    fn the_writer_writes_changes_logs_problems_once_and_forgets_removed_udp_backends() {
        let dns = |eps: Vec<SliceEndpoint>| {
            snapshot(
                vec![svc(
                    "dns",
                    "10.96.0.10",
                    vec![port("dns", 53, TargetPort::Number(53), "UDP")],
                )],
                vec![slice("dns-1", "dns", vec![], eps)],
                vec![],
            )
        };
        let metrics = Metrics::new();
        let mut w = Writer::new(dp::FakeMaps::new(), metrics);
        let two = dns(vec![
            endpoint("10.0.0.2", "a", true),
            endpoint("10.0.0.3", "b", true),
        ]);
        let r = w.sync(&two);
        assert_eq!((r.frontends, r.backends, r.written), (1, 2, 1));
        assert_eq!(w.sync(&two).written, 0, "nothing changed");
        let one = dns(vec![endpoint("10.0.0.2", "a", true)]);
        let r = w.sync(&one);
        assert_eq!(r.written, 1);
        assert_eq!(w.maps().forgotten, vec![(L4::Udp, sa("10.0.0.3:53"))]);
        let services = w.maps().services().expect("fake");
        assert_eq!(services[0].backends, vec![sa("10.0.0.2:53")]);
        let r = w.sync(&snapshot(vec![], vec![], vec![]));
        assert_eq!((r.frontends, r.deleted), (0, 1));
    }
}

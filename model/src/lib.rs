//! `weft-model`: the typed Kubernetes domain Weft reasons about, and the
//! pure functions over it that every Weft deployable reuses — the
//! controller, the injector, the CNI agent and the CLI. Nothing here does
//! I/O, and the crate links no gRPC, async runtime or Kubernetes client.
//!
//! - Label selectors ([`labels`]), named-port resolution and port lists
//!   ([`ports`]), target names ([`names`]), Gateway API durations
//!   ([`duration`]).
//! - The mesh's objects (Service, EndpointSlice, Pod, Namespace, routes,
//!   BackendPolicy), built from `k8s-openapi` objects by [`convert`], the
//!   same way for the Kubernetes source, the directory source and the
//!   admission webhook. Routes and policies keep their API spec as is
//!   ([`gateway`], [`policy`]): the controller's compilation into a proxy's
//!   policy (`index::outbound`) reads them whole.
//! - Inbound authorization ([`authz`]): the `Server` and
//!   `AuthorizationPolicy` CRDs, checked by [`convert`] into what the
//!   controller's `index::inbound` compiles into a proxy's `InboundServer`.
//! - Kubernetes NetworkPolicy ([`netpol`]): the typed policy with its
//!   validation, the reference evaluator (a connection → a verdict and the
//!   deciding policy and rule, for `weft policy explain`) and the compiler
//!   to the eBPF datapath's longest-prefix-match entries, with a simulation
//!   of the datapath's lookup that property tests hold to the evaluator.
//!
//! The controller re-exports this crate as `weft_controller::model`.

pub mod authz;
pub mod convert;
pub mod duration;
pub mod gateway;
pub mod labels;
pub mod names;
pub mod netpol;
pub mod policy;
pub mod ports;
pub mod yaml;

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;

pub use labels::{Labels, Selector};
pub use ports::{PortSet, TargetPort};

/// Annotation (pod or namespace) that asks for the Weft proxy.
pub const INJECT_ANNOTATION: &str = "weft.dev/inject";
/// Name of the proxy container the injector adds.
pub const PROXY_CONTAINER: &str = "weft-proxy";
/// The proxy container's variable naming its inbound listener
/// (`host:port`); the port is [`Pod::proxy_inbound_port`].
pub const PROXY_INBOUND_ADDR_ENV: &str = "WEFT_PROXY_INBOUND_ADDR";
/// The proxy's inbound port when the pod does not say otherwise.
pub const DEFAULT_PROXY_INBOUND_PORT: u16 = 4143;
/// Pod annotation listing ports whose traffic is opaque TCP.
pub const OPAQUE_PORTS_ANNOTATION: &str = "config.weft.dev/opaque-ports";
/// Label an EndpointSlice carries to name its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// Label the API server puts on every Namespace, set to its name
/// (NetworkPolicy namespace selectors rely on it).
pub const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";

/// Namespace and name of a namespaced object; `namespace` is empty for
/// cluster-scoped objects (Namespace).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjectKey {
    pub namespace: String,
    pub name: String,
}

impl ObjectKey {
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        ObjectKey {
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

impl fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.namespace.is_empty() {
            f.write_str(&self.name)
        } else {
            write!(f, "{}/{}", self.namespace, self.name)
        }
    }
}

/// The kinds of object the index holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    Service,
    EndpointSlice,
    Pod,
    Namespace,
    HttpRoute,
    GrpcRoute,
    BackendPolicy,
    NetworkPolicy,
    Server,
    AuthorizationPolicy,
    /// A cluster node: its pod CIDRs and addresses, for the CNI agent's
    /// routes between nodes. Not in [`Kind::ALL`]: only the CNI agent asks
    /// for Nodes, and the controller's RBAC does not grant them.
    Node,
}

impl Kind {
    /// The kinds the controller indexes and watches (every kind but
    /// [`Kind::Node`]).
    pub const ALL: [Kind; 10] = [
        Kind::Service,
        Kind::EndpointSlice,
        Kind::Pod,
        Kind::Namespace,
        Kind::HttpRoute,
        Kind::GrpcRoute,
        Kind::BackendPolicy,
        Kind::NetworkPolicy,
        Kind::Server,
        Kind::AuthorizationPolicy,
    ];

    /// Every kind, [`Kind::Node`] included: what a directory of manifests
    /// may hold (a consumer reads only the kinds it needs).
    pub const EVERY: [Kind; 11] = [
        Kind::Service,
        Kind::EndpointSlice,
        Kind::Pod,
        Kind::Namespace,
        Kind::HttpRoute,
        Kind::GrpcRoute,
        Kind::BackendPolicy,
        Kind::NetworkPolicy,
        Kind::Server,
        Kind::AuthorizationPolicy,
        Kind::Node,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Service => "Service",
            Kind::EndpointSlice => "EndpointSlice",
            Kind::Pod => "Pod",
            Kind::Namespace => "Namespace",
            Kind::HttpRoute => "HTTPRoute",
            Kind::GrpcRoute => "GRPCRoute",
            Kind::BackendPolicy => "BackendPolicy",
            Kind::NetworkPolicy => "NetworkPolicy",
            Kind::Server => "Server",
            Kind::AuthorizationPolicy => "AuthorizationPolicy",
            Kind::Node => "Node",
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A Service: where clients send traffic.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Service {
    pub key: ObjectKey,
    /// ClusterIPs (one per IP family); empty for headless services.
    pub cluster_ips: Vec<IpAddr>,
    /// `clusterIP: None`.
    pub headless: bool,
    pub ports: Vec<ServicePort>,
    /// `None`: the service has no selector (endpoints are managed by hand).
    pub selector: Option<Labels>,
    /// `sessionAffinity: ClientIP`: how long a client keeps its endpoint after its last
    /// connection (`sessionAffinityConfig.clientIP.timeoutSeconds`, Kubernetes' default
    /// 10800). `None`: no affinity.
    pub affinity_timeout_s: Option<u32>,
    /// `externalTrafficPolicy: Local`: a NodePort is served only by endpoints on the node
    /// that received the connection, which see the client's address. `false` is `Cluster`,
    /// Kubernetes' default: any ready endpoint, reached from another node through source NAT.
    pub external_traffic_local: bool,
}

impl Service {
    /// The service port a client connects to, TCP only.
    pub fn port(&self, port: u16) -> Option<&ServicePort> {
        self.ports
            .iter()
            .find(|p| p.port == port && p.protocol.eq_ignore_ascii_case("TCP"))
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServicePort {
    /// Required by Kubernetes when a service has several ports.
    pub name: Option<String>,
    pub port: u16,
    pub target_port: TargetPort,
    pub protocol: String,
    /// The port on every node's addresses (`type: NodePort` or `LoadBalancer`), if allocated.
    pub node_port: Option<u16>,
}

/// Address family of an EndpointSlice.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AddressType {
    IPv4,
    IPv6,
    /// Not used by the mesh (no IP to connect to).
    Fqdn,
}

/// An EndpointSlice: the current backends of (part of) a service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointSlice {
    pub key: ObjectKey,
    /// From the `kubernetes.io/service-name` label.
    pub service: Option<String>,
    pub address_type: AddressType,
    pub ports: Vec<SlicePort>,
    pub endpoints: Vec<SliceEndpoint>,
}

impl EndpointSlice {
    /// The key of the owning service, if the slice names one.
    pub fn service_key(&self) -> Option<ObjectKey> {
        self.service
            .as_ref()
            .map(|s| ObjectKey::new(self.key.namespace.clone(), s.clone()))
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SlicePort {
    /// Matches the service port's name ("" and `None` are the same).
    pub name: Option<String>,
    pub port: Option<u16>,
    pub protocol: String,
}

/// One backend of a slice, with the conditions as the API defines them: an
/// unset `ready` means ready, an unset `serving` means the same as `ready`,
/// an unset `terminating` means not terminating.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SliceEndpoint {
    pub addresses: Vec<IpAddr>,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
    pub zone: Option<String>,
    /// Name of the pod (`targetRef` of kind Pod, same namespace).
    pub pod: Option<String>,
}

/// A Pod: the workload behind an endpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pod {
    pub key: ObjectKey,
    pub ips: Vec<IpAddr>,
    pub labels: Labels,
    pub service_account: String,
    /// Runs a Weft proxy: has a `weft-proxy` container or
    /// `weft.dev/inject: enabled`.
    pub meshed: bool,
    pub container_ports: Vec<ContainerPort>,
    /// From `config.weft.dev/opaque-ports`.
    pub opaque_ports: PortSet,
    /// Phase Succeeded or Failed: the pod will not serve again.
    pub terminated: bool,
    /// The port the pod's proxy accepts inbound connections on: the port of
    /// the `weft-proxy` container's `WEFT_PROXY_INBOUND_ADDR`, else
    /// [`DEFAULT_PROXY_INBOUND_PORT`]. Meaningful only when `meshed`.
    pub proxy_inbound_port: u16,
    /// What inbound policy needs of the pod.
    pub inbound: PodInbound,
}

/// What the inbound policy of a pod's ports reads from the pod.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PodInbound {
    /// `config.weft.dev/default-inbound-policy` as written.
    pub default_policy: Option<String>,
    /// The kubelet's HTTP probes (`httpGet`, scheme HTTP) of the app
    /// containers: port (named ports resolved in the probe's container)
    /// and path (without query), sorted, without duplicates.
    pub http_probes: Vec<HttpProbe>,
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct HttpProbe {
    pub port: u16,
    pub path: String,
}

impl Pod {
    /// The ports the pod's applications serve: its TCP container ports
    /// outside the proxy container, without the proxy's inbound port.
    /// Ports a container does not declare are not known here.
    pub fn app_ports(&self) -> impl Iterator<Item = u16> + '_ {
        self.container_ports
            .iter()
            .filter(|c| c.container != PROXY_CONTAINER && c.protocol.eq_ignore_ascii_case("TCP"))
            .map(|c| c.port)
            .filter(|p| *p != self.proxy_inbound_port)
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ContainerPort {
    pub name: Option<String>,
    pub port: u16,
    /// As written in the pod spec (`TCP` when unset).
    pub protocol: String,
    /// Name of the container that declares the port.
    pub container: String,
}

/// A Namespace: kept for namespace-wide settings (`weft.dev/inject`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Namespace {
    pub name: String,
    pub labels: Labels,
    /// `weft.dev/inject`: `Some(true)` enabled, `Some(false)` disabled.
    pub inject: Option<bool>,
    /// `config.weft.dev/default-inbound-policy` as written.
    pub default_inbound_policy: Option<String>,
}

/// A Node: what the CNI agent needs to reach the node's pods from another
/// node. Cluster-scoped (its key's namespace is empty).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Node {
    pub name: String,
    /// `spec.podCIDRs` (or the older single `spec.podCIDR`): at most one
    /// per IP family.
    pub pod_cidrs: Vec<netpol::Cidr>,
    /// `status.addresses` of type `InternalIP`, in the API's order: where
    /// another node sends this node's pod traffic.
    pub internal_ips: Vec<IpAddr>,
}

impl Node {
    /// The first InternalIP of `ipv4`'s family: the next hop (or tunnel
    /// endpoint) for this node's pod CIDR of that family.
    pub fn internal_ip(&self, ipv4: bool) -> Option<IpAddr> {
        self.internal_ips
            .iter()
            .copied()
            .find(|ip| ip.is_ipv4() == ipv4)
    }
}

/// Annotation prefixes a route may carry for what its kind cannot say
/// (GRPCRoute has no `retry` or `timeouts`): see `index::outbound`.
pub const ROUTE_ANNOTATION_PREFIXES: [&str; 2] = ["retry.weft.dev/", "timeout.weft.dev/"];

/// What the API object's metadata says that route and policy precedence
/// and status need.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Meta {
    pub key: ObjectKey,
    /// `metadata.generation` (status' `observedGeneration`).
    pub generation: Option<i64>,
    /// `metadata.creationTimestamp`: older routes win ties. Unset (a
    /// hand-written manifest) sorts after every set one.
    pub created: Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::Time>,
}

/// An HTTPRoute or a GRPCRoute.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    pub meta: Meta,
    /// Only the `retry.weft.dev/*` and `timeout.weft.dev/*` annotations.
    pub annotations: BTreeMap<String, String>,
    pub spec: RouteSpec,
    pub status: Option<gateway::RouteStatus>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RouteSpec {
    Http(gateway::HttpRouteSpec),
    Grpc(gateway::GrpcRouteSpec),
}

impl Route {
    pub fn kind(&self) -> Kind {
        match self.spec {
            RouteSpec::Http(_) => Kind::HttpRoute,
            RouteSpec::Grpc(_) => Kind::GrpcRoute,
        }
    }

    pub fn parent_refs(&self) -> &[gateway::ParentReference] {
        match &self.spec {
            RouteSpec::Http(s) => &s.parent_refs,
            RouteSpec::Grpc(s) => &s.parent_refs,
        }
    }

    /// The Servers (`policy.weft.dev`) this route names as parents
    /// (namespace defaulted): an inbound route.
    pub fn parent_servers(&self) -> impl Iterator<Item = ObjectKey> + '_ {
        self.parent_refs()
            .iter()
            .filter(|p| p.is_server())
            .map(|p| {
                ObjectKey::new(
                    p.namespace
                        .clone()
                        .filter(|n| !n.is_empty())
                        .unwrap_or_else(|| self.meta.key.namespace.clone()),
                    p.name.clone(),
                )
            })
    }

    /// The Services this route names as parents (namespace defaulted).
    pub fn parent_services(&self) -> impl Iterator<Item = ObjectKey> + '_ {
        self.parent_refs()
            .iter()
            .filter(|p| p.is_service())
            .map(|p| {
                ObjectKey::new(
                    p.namespace
                        .clone()
                        .filter(|n| !n.is_empty())
                        .unwrap_or_else(|| self.meta.key.namespace.clone()),
                    p.name.clone(),
                )
            })
    }
}

/// A BackendPolicy.
#[derive(Clone, Debug, PartialEq)]
pub struct Policy {
    pub meta: Meta,
    pub spec: policy::BackendPolicySpec,
    pub status: Option<policy::BackendPolicyStatus>,
}

impl Policy {
    /// The Services the policy targets (its own namespace).
    pub fn target_services(&self) -> impl Iterator<Item = ObjectKey> + '_ {
        self.spec
            .target_refs
            .iter()
            .filter(|t| matches!(t.group.as_str(), "" | "core") && t.kind == "Service")
            .map(|t| ObjectKey::new(self.meta.key.namespace.clone(), t.name.clone()))
    }
}

/// Any object the index holds.
#[derive(Clone, Debug, PartialEq)]
pub enum Object {
    Service(Service),
    EndpointSlice(EndpointSlice),
    Pod(Pod),
    Namespace(Namespace),
    /// Boxed: a route is much larger than the other objects.
    Route(Box<Route>),
    BackendPolicy(Box<Policy>),
    NetworkPolicy(Box<netpol::NetworkPolicy>),
    Server(Box<authz::IndexedServer>),
    AuthorizationPolicy(Box<authz::IndexedAuthorization>),
    Node(Node),
}

impl Object {
    pub fn kind(&self) -> Kind {
        match self {
            Object::Service(_) => Kind::Service,
            Object::EndpointSlice(_) => Kind::EndpointSlice,
            Object::Pod(_) => Kind::Pod,
            Object::Namespace(_) => Kind::Namespace,
            Object::Route(r) => r.kind(),
            Object::BackendPolicy(_) => Kind::BackendPolicy,
            Object::NetworkPolicy(_) => Kind::NetworkPolicy,
            Object::Server(_) => Kind::Server,
            Object::AuthorizationPolicy(_) => Kind::AuthorizationPolicy,
            Object::Node(_) => Kind::Node,
        }
    }

    pub fn key(&self) -> ObjectKey {
        match self {
            Object::Service(s) => s.key.clone(),
            Object::EndpointSlice(s) => s.key.clone(),
            Object::Pod(p) => p.key.clone(),
            Object::Namespace(n) => ObjectKey::new("", n.name.clone()),
            Object::Route(r) => r.meta.key.clone(),
            Object::BackendPolicy(p) => p.meta.key.clone(),
            Object::NetworkPolicy(p) => p.key.clone(),
            Object::Server(s) => s.meta.key.clone(),
            Object::AuthorizationPolicy(a) => a.meta.key.clone(),
            Object::Node(n) => ObjectKey::new("", n.name.clone()),
        }
    }
}

/// Every Weft CRD as (file name under `charts/weft/crds/`, YAML): what
/// the chart ships (checked by the controller's `tests/crds.rs` and the
/// chart test).
pub fn crd_files() -> Result<Vec<(String, String)>, serde_yaml_ng::Error> {
    Ok(vec![
        (
            "backendpolicies.policy.weft.dev.yaml".into(),
            policy::crd_yaml()?,
        ),
        (
            "servers.policy.weft.dev.yaml".into(),
            authz::server_crd_yaml()?,
        ),
        (
            "authorizationpolicies.policy.weft.dev.yaml".into(),
            authz::authorization_policy_crd_yaml()?,
        ),
    ])
}

/// The SPIFFE identity of a workload.
pub fn spiffe_id(trust_domain: &str, namespace: &str, service_account: &str) -> String {
    format!("spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}")
}

/// Parses `weft.dev/inject`: `enabled` / `disabled`, anything else unset.
pub fn parse_inject(value: Option<&str>) -> Option<bool> {
    match value.map(str::trim) {
        Some("enabled") => Some(true),
        Some("disabled") => Some(false),
        _ => None,
    }
}

/// Labels copied from a map of annotations or labels (helper for convert).
pub(crate) fn labels_of(map: Option<&BTreeMap<String, String>>) -> Labels {
    map.cloned().unwrap_or_default()
}

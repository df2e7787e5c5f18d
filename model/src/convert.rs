//! `k8s-openapi` objects → the model. One conversion for every source, so
//! the directory source, the Kubernetes source and the admission webhook
//! accept and reject the same objects.

use std::net::IpAddr;

use k8s_openapi::api::core::v1 as core;
use k8s_openapi::api::discovery::v1 as discovery;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::authz::{
    self, AuthorizationPolicy, AuthorizationTarget, ClientNetwork, Clients, IndexedAuthorization,
    IndexedServer, DEFAULT_INBOUND_POLICY_ANNOTATION,
};
use super::gateway::{GrpcRoute, HttpRoute};
use super::policy::BackendPolicy;
use super::{
    labels_of, parse_inject, AddressType, ContainerPort, EndpointSlice, HttpProbe, Kind, Meta,
    Namespace, Node, ObjectKey, Pod, PodInbound, Policy, PortSet, Route, RouteSpec, Service,
    ServicePort, SliceEndpoint, SlicePort, TargetPort, DEFAULT_PROXY_INBOUND_PORT,
    INJECT_ANNOTATION, NAMESPACE_NAME_LABEL, OPAQUE_PORTS_ANNOTATION, PROXY_CONTAINER,
    PROXY_INBOUND_ADDR_ENV, ROUTE_ANNOTATION_PREFIXES, SERVICE_NAME_LABEL,
};

/// An object the mesh cannot use, naming the object, the field and the
/// value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{kind} {object}: field {field} is {value:?}: {reason}")]
pub struct ConvertError {
    pub kind: Kind,
    pub object: String,
    pub field: String,
    pub value: String,
    pub reason: String,
}

fn key_of(
    kind: Kind,
    meta: &ObjectMeta,
    default_namespace: &str,
) -> Result<ObjectKey, ConvertError> {
    let name = meta.name.clone().unwrap_or_default();
    if name.is_empty() {
        return Err(ConvertError {
            kind,
            object: "<unnamed>".into(),
            field: "metadata.name".into(),
            value: String::new(),
            reason: "every object needs a name".into(),
        });
    }
    let namespace = match kind {
        Kind::Namespace | Kind::Node => String::new(),
        _ => meta
            .namespace
            .clone()
            .filter(|n| !n.is_empty())
            .unwrap_or_else(|| default_namespace.to_string()),
    };
    Ok(ObjectKey { namespace, name })
}

fn parse_ip(kind: Kind, key: &ObjectKey, field: &str, value: &str) -> Result<IpAddr, ConvertError> {
    value.trim().parse().map_err(|_| ConvertError {
        kind,
        object: key.to_string(),
        field: field.to_string(),
        value: value.to_string(),
        reason: "not an IP address".into(),
    })
}

fn port_u16(kind: Kind, key: &ObjectKey, field: &str, value: i32) -> Result<u16, ConvertError> {
    match u16::try_from(value) {
        Ok(p) if p > 0 => Ok(p),
        _ => Err(ConvertError {
            kind,
            object: key.to_string(),
            field: field.to_string(),
            value: value.to_string(),
            reason: "not a port number 1-65535".into(),
        }),
    }
}

/// Kubernetes' `sessionAffinityConfig.clientIP.timeoutSeconds` default (3 hours).
pub const DEFAULT_AFFINITY_TIMEOUT_S: i32 = 10_800;

/// A Service. Objects without a namespace get `default_namespace`.
pub fn service(svc: &core::Service, default_namespace: &str) -> Result<Service, ConvertError> {
    let kind = Kind::Service;
    let key = key_of(kind, &svc.metadata, default_namespace)?;
    let spec = svc.spec.clone().unwrap_or_default();
    let mut raw_ips: Vec<String> = spec.cluster_ips.clone().unwrap_or_default();
    if raw_ips.is_empty() {
        raw_ips.extend(spec.cluster_ip.clone());
    }
    let headless = raw_ips.iter().any(|ip| ip.eq_ignore_ascii_case("None"));
    let mut cluster_ips = Vec::new();
    if !headless {
        for (i, ip) in raw_ips.iter().enumerate().filter(|(_, ip)| !ip.is_empty()) {
            cluster_ips.push(parse_ip(kind, &key, &format!("spec.clusterIPs[{i}]"), ip)?);
        }
    }
    let mut ports = Vec::new();
    for (i, p) in spec.ports.iter().flatten().enumerate() {
        let port = port_u16(kind, &key, &format!("spec.ports[{i}].port"), p.port)?;
        let target_port = match &p.target_port {
            None => TargetPort::Number(port),
            Some(IntOrString::Int(n)) => TargetPort::Number(port_u16(
                kind,
                &key,
                &format!("spec.ports[{i}].targetPort"),
                *n,
            )?),
            Some(IntOrString::String(s)) => match s.parse::<i32>() {
                Ok(n) => TargetPort::Number(port_u16(
                    kind,
                    &key,
                    &format!("spec.ports[{i}].targetPort"),
                    n,
                )?),
                Err(_) if !s.is_empty() => TargetPort::Name(s.clone()),
                Err(_) => TargetPort::Number(port),
            },
        };
        ports.push(ServicePort {
            name: p.name.clone().filter(|n| !n.is_empty()),
            port,
            target_port,
            protocol: p.protocol.clone().unwrap_or_else(|| "TCP".into()),
            node_port: match p.node_port {
                None | Some(0) => None,
                Some(n) => Some(port_u16(
                    kind,
                    &key,
                    &format!("spec.ports[{i}].nodePort"),
                    n,
                )?),
            },
        });
    }
    let affinity_timeout_s = match spec.session_affinity.as_deref() {
        Some("ClientIP") => {
            let timeout = spec
                .session_affinity_config
                .as_ref()
                .and_then(|c| c.client_ip.as_ref())
                .and_then(|c| c.timeout_seconds)
                .unwrap_or(DEFAULT_AFFINITY_TIMEOUT_S);
            // Kubernetes allows 1..=86400.
            if !(1..=86_400).contains(&timeout) {
                return Err(ConvertError {
                    kind,
                    object: key.to_string(),
                    field: "spec.sessionAffinityConfig.clientIP.timeoutSeconds".into(),
                    value: timeout.to_string(),
                    reason: "not between 1 and 86400 seconds".into(),
                });
            }
            Some(timeout as u32)
        }
        _ => None,
    };
    let external_traffic_local = match spec.external_traffic_policy.as_deref() {
        None | Some("Cluster") => false,
        Some("Local") => true,
        Some(other) => {
            return Err(ConvertError {
                kind,
                object: key.to_string(),
                field: "spec.externalTrafficPolicy".into(),
                value: other.to_string(),
                reason: "not Cluster or Local".into(),
            })
        }
    };
    Ok(Service {
        key,
        cluster_ips,
        headless,
        ports,
        selector: spec.selector.clone(),
        affinity_timeout_s,
        external_traffic_local,
    })
}

/// An EndpointSlice.
pub fn endpoint_slice(
    slice: &discovery::EndpointSlice,
    default_namespace: &str,
) -> Result<EndpointSlice, ConvertError> {
    let kind = Kind::EndpointSlice;
    let key = key_of(kind, &slice.metadata, default_namespace)?;
    let address_type = match slice.address_type.as_str() {
        "IPv4" => AddressType::IPv4,
        "IPv6" => AddressType::IPv6,
        "FQDN" => AddressType::Fqdn,
        other => {
            return Err(ConvertError {
                kind,
                object: key.to_string(),
                field: "addressType".into(),
                value: other.into(),
                reason: "expected IPv4, IPv6 or FQDN".into(),
            })
        }
    };
    let mut ports = Vec::new();
    for (i, p) in slice.ports.iter().flatten().enumerate() {
        ports.push(SlicePort {
            name: p.name.clone().filter(|n| !n.is_empty()),
            port: p
                .port
                .map(|n| port_u16(kind, &key, &format!("ports[{i}].port"), n))
                .transpose()?,
            protocol: p.protocol.clone().unwrap_or_else(|| "TCP".into()),
        });
    }
    let mut endpoints = Vec::new();
    for (i, e) in slice.endpoints.iter().enumerate() {
        let addresses = if address_type == AddressType::Fqdn {
            Vec::new()
        } else {
            e.addresses
                .iter()
                .enumerate()
                .map(|(j, a)| parse_ip(kind, &key, &format!("endpoints[{i}].addresses[{j}]"), a))
                .collect::<Result<Vec<_>, _>>()?
        };
        let cond = e.conditions.clone().unwrap_or_default();
        let ready = cond.ready.unwrap_or(true);
        let pod = e
            .target_ref
            .as_ref()
            .filter(|r| r.kind.as_deref() == Some("Pod"))
            .filter(|r| r.namespace.as_deref().is_none_or(|ns| ns == key.namespace))
            .and_then(|r| r.name.clone());
        endpoints.push(SliceEndpoint {
            addresses,
            ready,
            serving: cond.serving.unwrap_or(ready),
            terminating: cond.terminating.unwrap_or(false),
            zone: e.zone.clone().filter(|z| !z.is_empty()),
            pod,
        });
    }
    let service = slice
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(SERVICE_NAME_LABEL))
        .cloned();
    Ok(EndpointSlice {
        key,
        service,
        address_type,
        ports,
        endpoints,
    })
}

/// A Pod. A bad `config.weft.dev/opaque-ports` annotation is an error, so
/// it is reported rather than silently ignored.
pub fn pod(pod: &core::Pod, default_namespace: &str) -> Result<Pod, ConvertError> {
    let kind = Kind::Pod;
    let key = key_of(kind, &pod.metadata, default_namespace)?;
    let spec = pod.spec.clone().unwrap_or_default();
    let status = pod.status.clone().unwrap_or_default();
    let mut ips = Vec::new();
    for (i, ip) in status.pod_ips.iter().flatten().enumerate() {
        ips.push(parse_ip(
            kind,
            &key,
            &format!("status.podIPs[{i}].ip"),
            &ip.ip,
        )?);
    }
    if ips.is_empty() {
        if let Some(ip) = status.pod_ip.as_deref().filter(|s| !s.is_empty()) {
            ips.push(parse_ip(kind, &key, "status.podIP", ip)?);
        }
    }
    let annotations = pod.metadata.annotations.clone().unwrap_or_default();
    let has_proxy = spec
        .containers
        .iter()
        .chain(spec.init_containers.iter().flatten())
        .any(|c| c.name == PROXY_CONTAINER);
    let meshed = has_proxy
        || parse_inject(annotations.get(INJECT_ANNOTATION).map(String::as_str)) == Some(true);
    let opaque_ports = match annotations.get(OPAQUE_PORTS_ANNOTATION) {
        None => PortSet::default(),
        Some(v) => v
            .parse()
            .map_err(|e: super::ports::PortSetError| ConvertError {
                kind,
                object: key.to_string(),
                field: format!("metadata.annotations[{OPAQUE_PORTS_ANNOTATION}]"),
                value: v.clone(),
                reason: e.to_string(),
            })?,
    };
    let mut container_ports = Vec::new();
    for (ci, c) in spec.containers.iter().enumerate() {
        for (pi, p) in c.ports.iter().flatten().enumerate() {
            container_ports.push(ContainerPort {
                name: p.name.clone().filter(|n| !n.is_empty()),
                port: port_u16(
                    kind,
                    &key,
                    &format!("spec.containers[{ci}].ports[{pi}].containerPort"),
                    p.container_port,
                )?,
                protocol: p.protocol.clone().unwrap_or_else(|| "TCP".into()),
                container: c.name.clone(),
            });
        }
    }
    let proxy_inbound_port = proxy_inbound_port(&key, &spec)?;
    let inbound = PodInbound {
        default_policy: annotations.get(DEFAULT_INBOUND_POLICY_ANNOTATION).cloned(),
        http_probes: http_probes(&spec),
    };
    let service_account = spec
        .service_account_name
        .clone()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "default".into());
    Ok(Pod {
        key,
        ips,
        labels: labels_of(pod.metadata.labels.as_ref()),
        service_account,
        meshed,
        container_ports,
        opaque_ports,
        terminated: matches!(status.phase.as_deref(), Some("Succeeded" | "Failed")),
        proxy_inbound_port,
        inbound,
    })
}

/// The kubelet's HTTP probes of the app containers (see
/// [`PodInbound::http_probes`]); probes that name no usable port, or use
/// HTTPS (the proxy sees TLS, not a path), are left out.
fn http_probes(spec: &core::PodSpec) -> Vec<HttpProbe> {
    let mut out = Vec::new();
    for c in spec.containers.iter().filter(|c| c.name != PROXY_CONTAINER) {
        let probes = [&c.liveness_probe, &c.readiness_probe, &c.startup_probe];
        for get in probes
            .into_iter()
            .flatten()
            .filter_map(|p| p.http_get.as_ref())
        {
            if get
                .scheme
                .as_deref()
                .is_some_and(|s| !s.eq_ignore_ascii_case("HTTP"))
            {
                continue;
            }
            let port = match &get.port {
                IntOrString::Int(n) => u16::try_from(*n).ok(),
                IntOrString::String(name) => name.parse::<u16>().ok().or_else(|| {
                    c.ports
                        .iter()
                        .flatten()
                        .find(|p| p.name.as_deref() == Some(name.as_str()))
                        .and_then(|p| u16::try_from(p.container_port).ok())
                }),
            };
            let Some(port) = port.filter(|p| *p > 0) else {
                continue;
            };
            let raw = get.path.as_deref().unwrap_or("/");
            let path = raw.split(['?', '#']).next().unwrap_or_default();
            let path = if path.starts_with('/') {
                path.to_string()
            } else {
                format!("/{path}")
            };
            out.push(HttpProbe { port, path });
        }
    }
    out.sort();
    out.dedup();
    out
}

/// The port of the proxy container's `WEFT_PROXY_INBOUND_ADDR` (a literal
/// `host:port`; a value from a reference cannot be known here and leaves
/// the default).
fn proxy_inbound_port(key: &ObjectKey, spec: &core::PodSpec) -> Result<u16, ConvertError> {
    let containers = spec
        .containers
        .iter()
        .enumerate()
        .map(|(i, c)| (format!("spec.containers[{i}]"), c))
        .chain(
            spec.init_containers
                .iter()
                .flatten()
                .enumerate()
                .map(|(i, c)| (format!("spec.initContainers[{i}]"), c)),
        );
    for (path, c) in containers.filter(|(_, c)| c.name == PROXY_CONTAINER) {
        let value = c
            .env
            .iter()
            .flatten()
            .find(|e| e.name == PROXY_INBOUND_ADDR_ENV)
            .and_then(|e| e.value.as_deref());
        let Some(value) = value else { continue };
        let port = value
            .trim()
            .rsplit_once(':')
            .and_then(|(_, p)| p.parse::<u16>().ok())
            .filter(|p| *p > 0);
        return port.ok_or_else(|| ConvertError {
            kind: Kind::Pod,
            object: key.to_string(),
            field: format!("{path}.env[{PROXY_INBOUND_ADDR_ENV}]"),
            value: value.to_string(),
            reason: "expected host:port with a port 1-65535, like 0.0.0.0:4143".into(),
        });
    }
    Ok(DEFAULT_PROXY_INBOUND_PORT)
}

/// A Namespace, with the `kubernetes.io/metadata.name` label set to its
/// name as the API server does.
pub fn namespace(ns: &core::Namespace) -> Result<Namespace, ConvertError> {
    let key = key_of(Kind::Namespace, &ns.metadata, "")?;
    let inject = parse_inject(
        ns.metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(INJECT_ANNOTATION))
            .map(String::as_str),
    );
    let mut labels = labels_of(ns.metadata.labels.as_ref());
    // The API server sets this label on every namespace; manifests from the
    // directory source may lack it.
    labels.insert(NAMESPACE_NAME_LABEL.to_string(), key.name.clone());
    let default_inbound_policy = ns
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(DEFAULT_INBOUND_POLICY_ANNOTATION))
        .cloned();
    Ok(Namespace {
        name: key.name,
        labels,
        inject,
        default_inbound_policy,
    })
}

/// A Node: `spec.podCIDRs` (falling back to `spec.podCIDR`) and the
/// `InternalIP` addresses of `status.addresses`. A pod CIDR that does not
/// parse refuses the Node (routing to half of it would be worse than
/// saying so); an address that does not parse is an error too.
pub fn node(n: &core::Node) -> Result<Node, ConvertError> {
    let key = key_of(Kind::Node, &n.metadata, "")?;
    let spec = n.spec.as_ref();
    let mut raw: Vec<(String, &str)> = spec
        .and_then(|s| s.pod_cidrs.as_ref())
        .map(|c| {
            c.iter()
                .enumerate()
                .map(|(i, v)| (format!("spec.podCIDRs[{i}]"), v.as_str()))
                .collect()
        })
        .unwrap_or_default();
    if raw.is_empty() {
        if let Some(c) = spec.and_then(|s| s.pod_cidr.as_deref()) {
            raw.push(("spec.podCIDR".into(), c));
        }
    }
    let mut pod_cidrs = Vec::new();
    for (field, value) in raw {
        let cidr: super::netpol::Cidr = value.trim().parse().map_err(|e| ConvertError {
            kind: Kind::Node,
            object: key.to_string(),
            field: field.clone(),
            value: value.to_string(),
            reason: format!("not a CIDR: {e}"),
        })?;
        if pod_cidrs
            .iter()
            .any(|c: &super::netpol::Cidr| c.is_ipv4() == cidr.is_ipv4())
        {
            return Err(ConvertError {
                kind: Kind::Node,
                object: key.to_string(),
                field,
                value: value.to_string(),
                reason: "a second pod CIDR of the same IP family".into(),
            });
        }
        pod_cidrs.push(cidr);
    }
    let mut internal_ips = Vec::new();
    let addresses = n.status.as_ref().and_then(|s| s.addresses.as_ref());
    for (i, a) in addresses.into_iter().flatten().enumerate() {
        if a.type_ == "InternalIP" {
            let field = format!("status.addresses[{i}].address");
            internal_ips.push(parse_ip(Kind::Node, &key, &field, &a.address)?);
        }
    }
    Ok(Node {
        name: key.name,
        pod_cidrs,
        internal_ips,
    })
}

fn meta(kind: Kind, m: &ObjectMeta, default_namespace: &str) -> Result<Meta, ConvertError> {
    Ok(Meta {
        key: key_of(kind, m, default_namespace)?,
        generation: m.generation,
        created: m.creation_timestamp.clone(),
    })
}

fn route_annotations(m: &ObjectMeta) -> std::collections::BTreeMap<String, String> {
    m.annotations
        .iter()
        .flatten()
        .filter(|(k, _)| ROUTE_ANNOTATION_PREFIXES.iter().any(|p| k.starts_with(p)))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// An HTTPRoute. Its rules are checked when it is compiled into a policy
/// (an invalid rule makes the route not Accepted; it never fails the load).
pub fn http_route(route: &HttpRoute, default_namespace: &str) -> Result<Route, ConvertError> {
    Ok(Route {
        meta: meta(Kind::HttpRoute, &route.metadata, default_namespace)?,
        annotations: route_annotations(&route.metadata),
        spec: RouteSpec::Http(route.spec.clone()),
        status: route.status.clone(),
    })
}

/// A GRPCRoute (see [`http_route`]).
pub fn grpc_route(route: &GrpcRoute, default_namespace: &str) -> Result<Route, ConvertError> {
    Ok(Route {
        meta: meta(Kind::GrpcRoute, &route.metadata, default_namespace)?,
        annotations: route_annotations(&route.metadata),
        spec: RouteSpec::Grpc(route.spec.clone()),
        status: route.status.clone(),
    })
}

/// A BackendPolicy (its fields are checked when it is applied).
pub fn backend_policy(
    policy: &BackendPolicy,
    default_namespace: &str,
) -> Result<Policy, ConvertError> {
    Ok(Policy {
        meta: meta(Kind::BackendPolicy, &policy.metadata, default_namespace)?,
        spec: policy.spec.clone(),
        status: policy.status.clone(),
    })
}

/// A Server, every field checked (see [`crate::authz`]).
pub fn server(s: &authz::Server, default_namespace: &str) -> Result<IndexedServer, ConvertError> {
    let kind = Kind::Server;
    let meta = meta(kind, &s.metadata, default_namespace)?;
    let err = |field: String, value: String, reason: String| ConvertError {
        kind,
        object: meta.key.to_string(),
        field,
        value,
        reason,
    };
    let selector = s.spec.pod_selector.selector().map_err(|e| {
        let (field, value) = match &e {
            crate::labels::SelectorError::Operator { index, operator } => (
                format!("spec.podSelector.matchExpressions[{index}].operator"),
                operator.clone(),
            ),
            crate::labels::SelectorError::NoValues { index, .. } => (
                format!("spec.podSelector.matchExpressions[{index}].values"),
                "[]".to_string(),
            ),
        };
        err(field, value, e.to_string())
    })?;
    let number = |n: i32| port_u16(kind, &meta.key, "spec.port", n);
    let port = match &s.spec.port {
        IntOrString::Int(n) => TargetPort::Number(number(*n)?),
        IntOrString::String(v) => match v.parse::<i32>() {
            Ok(n) => TargetPort::Number(number(n)?),
            Err(_) if authz::is_port_name(v) => TargetPort::Name(v.clone()),
            Err(_) => return Err(err(
                "spec.port".into(),
                v.clone(),
                "expected a port number 1-65535 or a container port name (1-15 of a-z, 0-9 and -)"
                    .into(),
            )),
        },
    };
    let protocol = match s.spec.proxy_protocol.as_deref() {
        None => authz::ProxyProtocol::default(),
        Some(v) => v
            .parse()
            .map_err(|reason| err("spec.proxyProtocol".into(), v.to_string(), reason))?,
    };
    let access_policy = match s.spec.access_policy.as_deref() {
        None => authz::DefaultPolicy::Deny,
        Some(v) => v.parse().map_err(|e: authz::DefaultPolicyError| {
            err("spec.accessPolicy".into(), v.to_string(), e.to_string())
        })?,
    };
    Ok(IndexedServer {
        meta,
        selector,
        port,
        protocol,
        access_policy,
    })
}

/// An AuthorizationPolicy, every field checked (see [`crate::authz`]).
pub fn authorization_policy(
    a: &AuthorizationPolicy,
    default_namespace: &str,
) -> Result<IndexedAuthorization, ConvertError> {
    let kind = Kind::AuthorizationPolicy;
    let meta = meta(kind, &a.metadata, default_namespace)?;
    let ns = meta.key.namespace.clone();
    let err = |field: String, value: &str, reason: String| ConvertError {
        kind,
        object: meta.key.to_string(),
        field,
        value: value.to_string(),
        reason,
    };
    let spec = &a.spec;
    let t = &spec.target_ref;
    if t.name.is_empty() {
        return Err(err(
            "spec.targetRef.name".into(),
            "",
            "the target needs a name".into(),
        ));
    }
    let target = match (t.group.as_str(), t.kind.as_str()) {
        (crate::policy::GROUP, "Server") => AuthorizationTarget::Server(t.name.clone()),
        ("gateway.networking.k8s.io", "HTTPRoute") => {
            AuthorizationTarget::Route(Kind::HttpRoute, t.name.clone())
        }
        ("gateway.networking.k8s.io", "GRPCRoute") => {
            AuthorizationTarget::Route(Kind::GrpcRoute, t.name.clone())
        }
        ("" | "core", "Namespace") if t.name == ns => AuthorizationTarget::Namespace,
        ("" | "core", "Namespace") => {
            return Err(err(
                "spec.targetRef.name".into(),
                &t.name,
                format!("a policy can target only its own namespace ({ns})"),
            ))
        }
        (group, kind_name) => {
            return Err(err(
                "spec.targetRef".into(),
                &format!("{group}/{kind_name}"),
                "expected policy.weft.dev/Server, gateway.networking.k8s.io/HTTPRoute, gateway.networking.k8s.io/GRPCRoute or /Namespace".into(),
            ))
        }
    };
    for (i, id) in spec.identities.iter().enumerate() {
        let ok = id
            .strip_prefix("spiffe://")
            .is_some_and(|rest| rest.contains('/') && !rest.starts_with('/'))
            && !id.chars().any(char::is_whitespace);
        if !ok {
            return Err(err(
                format!("spec.identities[{i}]"),
                id,
                "expected a SPIFFE ID like spiffe://cluster.local/ns/shop/sa/web".into(),
            ));
        }
    }
    let mut service_accounts = Vec::new();
    for (i, sa) in spec.service_accounts.iter().enumerate() {
        let sa_ns = sa
            .namespace
            .clone()
            .filter(|n| !n.is_empty())
            .unwrap_or_else(|| ns.clone());
        if !crate::names::is_dns_label(&sa_ns) {
            return Err(err(
                format!("spec.serviceAccounts[{i}].namespace"),
                &sa_ns,
                "not a namespace name".into(),
            ));
        }
        if sa.name.is_empty() || sa.name.len() > 253 || sa.name.contains('/') {
            return Err(err(
                format!("spec.serviceAccounts[{i}].name"),
                &sa.name,
                "not a ServiceAccount name".into(),
            ));
        }
        service_accounts.push(ObjectKey::new(sa_ns, sa.name.clone()));
    }
    for (i, n) in spec.namespaces.iter().enumerate() {
        if !crate::names::is_dns_label(n) {
            return Err(err(
                format!("spec.namespaces[{i}]"),
                n,
                "not a namespace name".into(),
            ));
        }
    }
    let mesh = !spec.identities.is_empty()
        || !service_accounts.is_empty()
        || !spec.namespaces.is_empty()
        || spec.authenticated;
    let clients = match (spec.unauthenticated, mesh) {
        (true, true) => {
            return Err(err(
                "spec.unauthenticated".into(),
                "true",
                "already allows every client; drop identities, serviceAccounts, namespaces and authenticated, or write two policies".into(),
            ))
        }
        (true, false) => Clients::Unauthenticated,
        (false, true) => Clients::Mesh {
            identities: spec.identities.clone(),
            service_accounts,
            namespaces: spec.namespaces.clone(),
            any: spec.authenticated,
        },
        (false, false) => {
            return Err(err(
                "spec".into(),
                "",
                "names no client: set identities, serviceAccounts, namespaces, authenticated: true or unauthenticated: true".into(),
            ))
        }
    };
    let mut networks = Vec::new();
    for (i, n) in spec.networks.iter().enumerate() {
        let field = format!("spec.networks[{i}].cidr");
        let cidr: crate::netpol::Cidr = n
            .cidr
            .parse()
            .map_err(|e: crate::netpol::CidrError| err(field, &n.cidr, e.to_string()))?;
        let mut except = Vec::new();
        for (j, e) in n.except.iter().enumerate() {
            let field = format!("spec.networks[{i}].except[{j}]");
            let c: crate::netpol::Cidr = e
                .parse()
                .map_err(|x: crate::netpol::CidrError| err(field.clone(), e, x.to_string()))?;
            if !(cidr.covers(&c) && c.prefix_len() > cidr.prefix_len()) {
                return Err(err(
                    field,
                    e,
                    format!("must be strictly inside cidr {}", n.cidr),
                ));
            }
            except.push(c);
        }
        networks.push(ClientNetwork { cidr, except });
    }
    Ok(IndexedAuthorization {
        meta,
        target,
        clients,
        networks,
    })
}

/// A NetworkPolicy ([`crate::netpol::network_policy`]), its error in this module's terms.
pub fn network_policy(
    policy: &k8s_openapi::api::networking::v1::NetworkPolicy,
    default_namespace: &str,
) -> Result<crate::netpol::NetworkPolicy, ConvertError> {
    crate::netpol::network_policy(policy, default_namespace).map_err(|e| ConvertError {
        kind: Kind::NetworkPolicy,
        object: e.policy,
        field: e.field,
        value: e.value,
        reason: e.reason,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn from_json<T: serde::de::DeserializeOwned>(v: serde_json::Value) -> T {
        serde_json::from_value(v).expect("valid API object")
    }

    #[test]
    fn node_pod_cidrs_and_internal_ips() {
        let n: core::Node = from_json(serde_json::json!({
            "metadata": {"name": "n1"},
            "spec": {"podCIDR": "10.1.0.0/24", "podCIDRs": ["10.1.0.0/24", "fd00:1::/64"]},
            "status": {"addresses": [
                {"type": "Hostname", "address": "n1"},
                {"type": "InternalIP", "address": "192.0.2.1"},
                {"type": "ExternalIP", "address": "203.0.113.1"},
                {"type": "InternalIP", "address": "2001:db8::1"}
            ]}
        }));
        let m = node(&n).expect("converts");
        assert_eq!(m.name, "n1");
        let cidrs: Vec<String> = m.pod_cidrs.iter().map(ToString::to_string).collect();
        assert_eq!(cidrs, ["10.1.0.0/24", "fd00:1::/64"]);
        assert_eq!(m.internal_ip(true), Some("192.0.2.1".parse().expect("ip")));
        assert_eq!(
            m.internal_ip(false),
            Some("2001:db8::1".parse().expect("ip"))
        );
        assert_eq!(m.internal_ips.len(), 2);

        // The older single field, and a node not yet given a CIDR or an address.
        let old: core::Node = from_json(serde_json::json!({
            "metadata": {"name": "n2"}, "spec": {"podCIDR": "10.2.0.0/24"}
        }));
        assert_eq!(node(&old).expect("converts").pod_cidrs.len(), 1);
        let bare: core::Node = from_json(serde_json::json!({"metadata": {"name": "n3"}}));
        let bare = node(&bare).expect("converts");
        assert!(bare.pod_cidrs.is_empty() && bare.internal_ips.is_empty());

        for (spec, status, field, value) in [
            (
                serde_json::json!({"podCIDRs": ["10.1.0.0/33"]}),
                serde_json::json!({}),
                "spec.podCIDRs[0]",
                "10.1.0.0/33",
            ),
            (
                serde_json::json!({"podCIDRs": ["10.1.0.0/24", "10.2.0.0/24"]}),
                serde_json::json!({}),
                "spec.podCIDRs[1]",
                "10.2.0.0/24",
            ),
            (
                serde_json::json!({}),
                serde_json::json!({"addresses": [{"type": "InternalIP", "address": "nope"}]}),
                "status.addresses[0].address",
                "nope",
            ),
        ] {
            let n: core::Node = from_json(serde_json::json!({
                "metadata": {"name": "bad"}, "spec": spec, "status": status
            }));
            let e = node(&n).expect_err(value);
            assert_eq!((e.field.as_str(), e.value.as_str()), (field, value), "{e}");
            assert!(e.to_string().contains("Node bad"), "{e}");
        }
    }

    #[test]
    fn service_forms() {
        let s: core::Service = from_json(serde_json::json!({
            "metadata": {"name": "web"},
            "spec": {"clusterIP": "10.96.0.10", "ports": [
                {"name": "http", "port": 80, "targetPort": "http"},
                {"name": "admin", "port": 9000, "targetPort": 9001},
                {"name": "plain", "port": 81},
                {"name": "str-num", "port": 82, "targetPort": "8082"}
            ]}
        }));
        let m = service(&s, "shop").expect("converts");
        assert_eq!(m.key, ObjectKey::new("shop", "web"));
        assert_eq!(
            m.cluster_ips,
            vec!["10.96.0.10".parse::<IpAddr>().expect("ip")]
        );
        assert!(!m.headless);
        let targets: Vec<_> = m.ports.iter().map(|p| p.target_port.clone()).collect();
        assert_eq!(
            targets,
            vec![
                TargetPort::Name("http".into()),
                TargetPort::Number(9001),
                TargetPort::Number(81),
                TargetPort::Number(8082)
            ]
        );
        let headless: core::Service = from_json(serde_json::json!({
            "metadata": {"name": "db", "namespace": "data"},
            "spec": {"clusterIP": "None", "ports": [{"port": 5432}]}
        }));
        let h = service(&headless, "shop").expect("converts");
        assert!(h.headless && h.cluster_ips.is_empty());
        assert_eq!(h.key.namespace, "data");
        assert_eq!(m.affinity_timeout_s, None);
        assert!(m.ports.iter().all(|p| p.node_port.is_none()));
    }

    #[test]
    fn node_ports_and_client_ip_affinity() {
        let s: core::Service = from_json(serde_json::json!({
            "metadata": {"name": "web", "namespace": "shop"},
            "spec": {"type": "NodePort", "clusterIP": "10.96.0.10", "sessionAffinity": "ClientIP",
                     "ports": [{"port": 80, "nodePort": 30080}, {"port": 81}]}
        }));
        let m = service(&s, "shop").expect("converts");
        assert_eq!(m.ports[0].node_port, Some(30080));
        assert_eq!(m.ports[1].node_port, None);
        assert!(!m.external_traffic_local, "Cluster is Kubernetes' default");
        let policy = |p: &str| {
            let s: core::Service = from_json(serde_json::json!({
                "metadata": {"name": "web", "namespace": "shop"},
                "spec": {"type": "NodePort", "clusterIP": "10.96.0.10",
                         "externalTrafficPolicy": p, "ports": [{"port": 80, "nodePort": 30080}]}
            }));
            service(&s, "shop")
        };
        assert!(policy("Local").expect("converts").external_traffic_local);
        assert!(!policy("Cluster").expect("converts").external_traffic_local);
        let e = policy("Nearest").expect_err("not a policy");
        assert_eq!(e.field, "spec.externalTrafficPolicy");
        assert_eq!(e.value, "Nearest");
        assert_eq!(
            m.affinity_timeout_s,
            Some(10_800),
            "Kubernetes' default timeout"
        );
        let with_timeout: core::Service = from_json(serde_json::json!({
            "metadata": {"name": "web", "namespace": "shop"},
            "spec": {"clusterIP": "10.96.0.10", "sessionAffinity": "ClientIP",
                     "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 60}},
                     "ports": [{"port": 80}]}
        }));
        assert_eq!(
            service(&with_timeout, "shop")
                .expect("converts")
                .affinity_timeout_s,
            Some(60)
        );
        for (field, spec) in [
            (
                "spec.ports[0].nodePort",
                serde_json::json!({"ports": [{"port": 80, "nodePort": 70000}]}),
            ),
            (
                "spec.sessionAffinityConfig.clientIP.timeoutSeconds",
                serde_json::json!({"sessionAffinity": "ClientIP",
                    "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 0}}, "ports": [{"port": 80}]}),
            ),
        ] {
            let bad: core::Service = from_json(serde_json::json!({
                "metadata": {"name": "web", "namespace": "shop"}, "spec": spec
            }));
            let err = service(&bad, "shop").expect_err(field).to_string();
            assert!(
                err.contains("Service shop/web") && err.contains(field),
                "{err}"
            );
        }
    }

    #[test]
    fn errors_name_object_field_and_value() {
        let s: core::Service = from_json(serde_json::json!({
            "metadata": {"name": "web", "namespace": "shop"},
            "spec": {"clusterIP": "10.96.0.300"}
        }));
        let err = service(&s, "default").expect_err("bad ip").to_string();
        assert!(
            err.contains("Service shop/web")
                && err.contains("spec.clusterIPs[0]")
                && err.contains("10.96.0.300"),
            "{err}"
        );
        let p: core::Pod = from_json(serde_json::json!({
            "metadata": {"name": "p", "annotations": {OPAQUE_PORTS_ANNOTATION: "3306,mysql"}},
        }));
        let err = pod(&p, "ns").expect_err("bad annotation").to_string();
        assert!(err.contains("Pod ns/p") && err.contains("mysql"), "{err}");
    }

    #[test]
    fn pod_meshed_and_defaults() {
        let p: core::Pod = from_json(serde_json::json!({
            "metadata": {"name": "web-1", "namespace": "shop", "labels": {"app": "web"}},
            "spec": {"containers": [
                {"name": "app", "ports": [{"name": "http", "containerPort": 8080}]},
                {"name": "weft-proxy"}
            ]},
            "status": {"podIP": "10.1.0.5", "phase": "Running"}
        }));
        let m = pod(&p, "default").expect("converts");
        assert!(m.meshed);
        assert_eq!(m.service_account, "default");
        assert_eq!(m.ips, vec!["10.1.0.5".parse::<IpAddr>().expect("ip")]);
        assert_eq!(m.container_ports[0].port, 8080);
        let annotated: core::Pod = from_json(serde_json::json!({
            "metadata": {"name": "x", "annotations": {"weft.dev/inject": "enabled"}},
            "spec": {"serviceAccountName": "api", "containers": [{"name": "app"}]},
            "status": {"phase": "Failed"}
        }));
        let a = pod(&annotated, "default").expect("converts");
        assert!(a.meshed && a.terminated);
        assert_eq!(a.service_account, "api");
        assert_eq!(m.proxy_inbound_port, DEFAULT_PROXY_INBOUND_PORT);
        assert_eq!(m.container_ports[0].container, "app");
        assert_eq!(m.app_ports().collect::<Vec<_>>(), vec![8080]);
    }

    #[test]
    fn proxy_inbound_port_from_the_proxy_environment() {
        let with = |addr: &str| -> core::Pod {
            from_json(serde_json::json!({
                "metadata": {"name": "web-1", "namespace": "shop"},
                "spec": {"containers": [
                    {"name": "app", "ports": [{"containerPort": 8080}]},
                    {"name": "weft-proxy",
                     "env": [{"name": "WEFT_PROXY_INBOUND_ADDR", "value": addr}],
                     "ports": [{"name": "weft-inbound", "containerPort": 4150}]}
                ]}
            }))
        };
        let m = pod(&with("0.0.0.0:4150"), "default").expect("converts");
        assert_eq!(m.proxy_inbound_port, 4150);
        // The proxy's own ports are not the app's.
        assert_eq!(m.app_ports().collect::<Vec<_>>(), vec![8080]);
        assert_eq!(
            pod(&with("[::]:4151"), "default")
                .expect("converts")
                .proxy_inbound_port,
            4151
        );
        let err = pod(&with("0.0.0.0"), "default").expect_err("no port");
        assert_eq!(err.field, "spec.containers[1].env[WEFT_PROXY_INBOUND_ADDR]");
        assert_eq!(err.value, "0.0.0.0");
    }

    #[test]
    fn namespaces_carry_their_name_label() {
        let ns: core::Namespace = from_json(serde_json::json!({
            "metadata": {"name": "shop", "labels": {"team": "a"}}
        }));
        let m = namespace(&ns).expect("converts");
        assert_eq!(
            m.labels.get(NAMESPACE_NAME_LABEL).map(String::as_str),
            Some("shop")
        );
        assert_eq!(m.labels.get("team").map(String::as_str), Some("a"));
    }

    #[test]
    fn slice_conditions_default_per_api() {
        let s: discovery::EndpointSlice = from_json(serde_json::json!({
            "metadata": {"name": "web-abc", "namespace": "shop", "labels": {SERVICE_NAME_LABEL: "web"}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080}],
            "endpoints": [
                {"addresses": ["10.1.0.5"], "zone": "a", "targetRef": {"kind": "Pod", "name": "web-1"}},
                {"addresses": ["10.1.0.6"], "conditions": {"ready": false, "serving": true, "terminating": true}}
            ]
        }));
        let m = endpoint_slice(&s, "default").expect("converts");
        assert_eq!(m.service.as_deref(), Some("web"));
        assert!(m.endpoints[0].ready && m.endpoints[0].serving && !m.endpoints[0].terminating);
        assert_eq!(m.endpoints[0].pod.as_deref(), Some("web-1"));
        assert!(!m.endpoints[1].ready && m.endpoints[1].serving && m.endpoints[1].terminating);
    }
}

#[cfg(test)]
mod authz_tests {
    use super::*;
    use crate::authz::{DefaultPolicy, ProxyProtocol};

    fn server_of(spec: serde_json::Value) -> Result<IndexedServer, ConvertError> {
        let s: authz::Server = serde_json::from_value(serde_json::json!({
            "apiVersion": "policy.weft.dev/v1alpha1", "kind": "Server",
            "metadata": {"name": "web", "namespace": "shop"}, "spec": spec
        }))
        .expect("decodes");
        server(&s, "default")
    }

    fn policy_of(spec: serde_json::Value) -> Result<IndexedAuthorization, ConvertError> {
        let a: AuthorizationPolicy = serde_json::from_value(serde_json::json!({
            "apiVersion": "policy.weft.dev/v1alpha1", "kind": "AuthorizationPolicy",
            "metadata": {"name": "p", "namespace": "shop"}, "spec": spec
        }))
        .expect("decodes");
        authorization_policy(&a, "default")
    }

    #[test]
    fn server_fields() {
        let s = server_of(
            serde_json::json!({"podSelector": {"matchLabels": {"app": "web"}}, "port": "http"}),
        )
        .expect("ok");
        assert_eq!(s.port, TargetPort::Name("http".into()));
        assert_eq!(s.protocol, ProxyProtocol::Detect);
        assert_eq!(s.access_policy, DefaultPolicy::Deny);
        let s = server_of(serde_json::json!({"podSelector": {}, "port": 8080, "proxyProtocol": "gRPC", "accessPolicy": "audit"}))
            .expect("ok");
        assert_eq!(s.port, TargetPort::Number(8080));
        assert_eq!(s.protocol, ProxyProtocol::Grpc);
        assert_eq!(s.access_policy, DefaultPolicy::Audit);
        assert_eq!(
            server_of(serde_json::json!({"podSelector": {}, "port": "8080"}))
                .expect("ok")
                .port,
            TargetPort::Number(8080)
        );
    }

    #[test]
    fn server_errors_name_the_field_and_value() {
        let cases = [
            (
                serde_json::json!({"podSelector": {}, "port": 0}),
                "spec.port",
                "0",
            ),
            (
                serde_json::json!({"podSelector": {}, "port": 70000}),
                "spec.port",
                "70000",
            ),
            (
                serde_json::json!({"podSelector": {}, "port": "Not_A_Name"}),
                "spec.port",
                "Not_A_Name",
            ),
            (
                serde_json::json!({"podSelector": {}, "port": 80, "proxyProtocol": "http"}),
                "spec.proxyProtocol",
                "http",
            ),
            (
                serde_json::json!({"podSelector": {}, "port": 80, "accessPolicy": "allow"}),
                "spec.accessPolicy",
                "allow",
            ),
            (
                serde_json::json!({"podSelector": {"matchExpressions": [{"key": "a", "operator": "Is"}]}, "port": 80}),
                "spec.podSelector.matchExpressions[0].operator",
                "Is",
            ),
        ];
        for (spec, field, value) in cases {
            let e = server_of(spec.clone()).expect_err(&spec.to_string());
            assert_eq!(e.field, field, "{e}");
            assert_eq!(e.value, value, "{e}");
            assert_eq!(e.kind, Kind::Server);
            assert!(e.to_string().contains("shop/web"), "{e}");
        }
    }

    #[test]
    fn authorization_policy_fields() {
        let a = policy_of(serde_json::json!({
            "targetRef": {"group": "policy.weft.dev", "kind": "Server", "name": "web"},
            "identities": ["spiffe://cluster.local/ns/a/sa/b"],
            "serviceAccounts": [{"name": "client"}, {"name": "x", "namespace": "other"}],
            "namespaces": ["ops"],
            "networks": [{"cidr": "10.0.0.0/8", "except": ["10.1.0.0/16"]}]
        }))
        .expect("ok");
        assert_eq!(a.target, AuthorizationTarget::Server("web".into()));
        assert_eq!(
            a.clients,
            Clients::Mesh {
                identities: vec!["spiffe://cluster.local/ns/a/sa/b".into()],
                service_accounts: vec![
                    ObjectKey::new("shop", "client"),
                    ObjectKey::new("other", "x")
                ],
                namespaces: vec!["ops".into()],
                any: false,
            }
        );
        assert_eq!(a.networks[0].except[0].to_string(), "10.1.0.0/16");
        let a = policy_of(serde_json::json!({
            "targetRef": {"kind": "Namespace", "name": "shop"}, "unauthenticated": true
        }))
        .expect("ok");
        assert_eq!(
            (a.target, a.clients),
            (AuthorizationTarget::Namespace, Clients::Unauthenticated)
        );
        let a = policy_of(serde_json::json!({
            "targetRef": {"group": "gateway.networking.k8s.io", "kind": "HTTPRoute", "name": "r"}, "authenticated": true
        }))
        .expect("ok");
        assert_eq!(
            a.target,
            AuthorizationTarget::Route(Kind::HttpRoute, "r".into())
        );
    }

    #[test]
    fn authorization_policy_errors_name_the_field_and_value() {
        let server =
            serde_json::json!({"group": "policy.weft.dev", "kind": "Server", "name": "web"});
        let cases = [
            (
                serde_json::json!({"targetRef": server, "authenticated": true, "unauthenticated": true}),
                "spec.unauthenticated",
                "true",
            ),
            (serde_json::json!({"targetRef": server}), "spec", ""),
            (
                serde_json::json!({"targetRef": server, "identities": ["web"]}),
                "spec.identities[0]",
                "web",
            ),
            (
                serde_json::json!({"targetRef": server, "namespaces": ["Bad_NS"]}),
                "spec.namespaces[0]",
                "Bad_NS",
            ),
            (
                serde_json::json!({"targetRef": server, "serviceAccounts": [{"name": ""}]}),
                "spec.serviceAccounts[0].name",
                "",
            ),
            (
                serde_json::json!({"targetRef": server, "unauthenticated": true, "networks": [{"cidr": "10.0.0.0/33"}]}),
                "spec.networks[0].cidr",
                "10.0.0.0/33",
            ),
            (
                serde_json::json!({"targetRef": server, "unauthenticated": true, "networks": [{"cidr": "10.0.0.0/16", "except": ["10.1.0.0/24"]}]}),
                "spec.networks[0].except[0]",
                "10.1.0.0/24",
            ),
            (
                serde_json::json!({"targetRef": {"kind": "Namespace", "name": "other"}, "authenticated": true}),
                "spec.targetRef.name",
                "other",
            ),
            (
                serde_json::json!({"targetRef": {"group": "apps", "kind": "Deployment", "name": "web"}, "authenticated": true}),
                "spec.targetRef",
                "apps/Deployment",
            ),
            (
                serde_json::json!({"targetRef": {"group": "policy.weft.dev", "kind": "Server", "name": ""}, "authenticated": true}),
                "spec.targetRef.name",
                "",
            ),
        ];
        for (spec, field, value) in cases {
            let e = policy_of(spec.clone()).expect_err(&spec.to_string());
            assert_eq!(e.field, field, "{e}");
            assert_eq!(e.value, value, "{e}");
            assert_eq!(e.kind, Kind::AuthorizationPolicy);
        }
    }

    #[test]
    fn pod_probes_and_annotation() {
        let p: core::Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "web-0", "namespace": "shop",
                         "annotations": {"config.weft.dev/default-inbound-policy": "deny"}},
            "spec": {"containers": [
                {"name": "app", "ports": [{"name": "http", "containerPort": 8080}],
                 "readinessProbe": {"httpGet": {"port": "http", "path": "/ready?full=1"}},
                 "livenessProbe": {"httpGet": {"port": 8080, "path": "live"}},
                 "startupProbe": {"httpGet": {"port": 8443, "scheme": "HTTPS", "path": "/s"}}},
                {"name": "side", "readinessProbe": {"httpGet": {"port": "nope"}}}
            ]}
        }))
        .expect("pod");
        let pod = pod(&p, "default").expect("ok");
        assert_eq!(pod.inbound.default_policy.as_deref(), Some("deny"));
        assert_eq!(
            pod.inbound.http_probes,
            [
                HttpProbe {
                    port: 8080,
                    path: "/live".into()
                },
                HttpProbe {
                    port: 8080,
                    path: "/ready".into()
                },
            ]
        );
    }
}

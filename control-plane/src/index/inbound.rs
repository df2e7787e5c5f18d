//! (index, pod, port) → `weft.policy.InboundServer`: what a proxy enforces
//! on one port of its workload. Pure: the index state in, the policy and
//! the topics it depends on out (the pod, and its namespace's Servers,
//! AuthorizationPolicies, inbound routes and Namespace object).
//!
//! - **The Server**: of the Servers of the pod's namespace that select the
//!   pod (labels) and the port (number, or the pod's container port of that
//!   name), the oldest (`creationTimestamp`; unset sorts last), then the
//!   first by name. The others are ignored for this pod and port.
//! - **With a Server**: `authorizations` are the AuthorizationPolicies
//!   targeting the Server or the namespace (sorted by name), then what the
//!   Server's `accessPolicy` allows (named `default:<policy>`, as a default
//!   policy's; `deny` and `audit` allow nothing, `audit` sets `audit`).
//!   `routes`: the HTTPRoutes and GRPCRoutes of the Server's namespace
//!   whose parentRef is the Server (GRPCRoutes win over HTTPRoutes, as for
//!   mesh routes), their matches compiled by [`super::outbound`] (a route
//!   whose matches cannot be compiled is left out; filters and backendRefs
//!   have no meaning inbound and are ignored). One `InboundRoute` per
//!   match, in Gateway API precedence order (the first whose match matches
//!   is the request's route), carrying the AuthorizationPolicies that
//!   target the route.
//! - **Without a Server** (or an unknown pod): the default policy, the
//!   pod's `config.weft.dev/default-inbound-policy` annotation, else its
//!   namespace's, else `--default-inbound-policy`. An annotation that does
//!   not parse counts as `deny` (fail closed). Protocol: opaque when the
//!   pod's `config.weft.dev/opaque-ports` lists the port, else detect.
//!   all-unauthenticated: one unauthenticated authorization from anywhere;
//!   all-authenticated: any mesh identity from anywhere; cluster-*: the
//!   same from the cluster networks (`--cluster-networks`); deny: none;
//!   audit: none, with `audit`.
//! - **Kubelet probes**: for each HTTP probe of the pod on the port, an
//!   `InboundRoute` (ref kind `default`, name `probe`) matching `GET` on
//!   the exact probe path, with the authorization `default:probe`
//!   (unauthenticated, any network), ahead of every other route, so probes
//!   work under `deny` and nothing else is allowed by them. When there were
//!   no routes, a catch-all route (ref kind `default`, name `default`,
//!   PathPrefix `/`, no authorizations of its own) follows, so every other
//!   request is still decided by `authorizations` alone. Not added when an
//!   authorization already admits anyone from anywhere and there are no
//!   routes (nothing to widen), nor on opaque ports (the proxy sees no
//!   path: declare such ports HTTP, or probe another port).

use std::cmp::Ordering;
use std::collections::HashMap;
use std::net::IpAddr;

use weft_proto::destination as dpb;
use weft_proto::net::IpNetwork;
use weft_proto::policy as pb;

use super::outbound::{rule_matches, MatchRank};
use super::{State, Topic};
use crate::model::authz::{
    AuthorizationTarget, Clients, DefaultPolicy, IndexedAuthorization, IndexedServer, ProxyProtocol,
};
use crate::model::netpol::Cidr;
use crate::model::{spiffe_id, Kind, Meta, ObjectKey, Pod};

/// What the compilation depends on besides the index.
#[derive(Clone, Debug)]
pub struct InboundConfig {
    /// `--default-inbound-policy`: for ports no Server selects, when
    /// neither the pod nor its namespace says otherwise.
    pub default_policy: DefaultPolicy,
    /// `--cluster-networks`: where `cluster-*` policies allow clients from.
    pub cluster_networks: Vec<Cidr>,
    /// For ServiceAccounts in AuthorizationPolicies (sent as SPIFFE IDs).
    pub trust_domain: String,
}

impl Default for InboundConfig {
    fn default() -> Self {
        InboundConfig {
            default_policy: DefaultPolicy::default(),
            cluster_networks: crate::model::authz::default_cluster_networks(),
            trust_domain: "cluster.local".into(),
        }
    }
}

/// The name of the authorization that admits kubelet probes.
pub const PROBE_AUTHORIZATION: &str = "default:probe";

/// The inbound policy of `port` of pod `namespace`/`pod_name`, and the
/// topics it depends on.
pub fn inbound_server(
    state: &State,
    namespace: &str,
    pod_name: &str,
    port: u16,
    config: &InboundConfig,
) -> (pb::InboundServer, Vec<Topic>) {
    let key = ObjectKey::new(namespace, pod_name);
    let topics = vec![
        Topic::Pod(key.clone()),
        Topic::Inbound(namespace.to_string()),
    ];
    let pod = state.pods.get(&key).map(|p| &**p);
    let mut server = match pod.and_then(|p| selecting_server(state, p, port)) {
        Some(s) => server_policy(state, s, config),
        None => default_server(state, pod, namespace, port, config),
    };
    if let Some(pod) = pod {
        add_probes(&mut server, pod, port);
    }
    (server, topics)
}

fn by_age(a: &Meta, b: &Meta) -> Ordering {
    (a.created.is_none(), &a.created, &a.key.name).cmp(&(
        b.created.is_none(),
        &b.created,
        &b.key.name,
    ))
}

/// The Server that applies to `pod`:`port` (see the module docs).
pub fn selecting_server<'a>(state: &'a State, pod: &Pod, port: u16) -> Option<&'a IndexedServer> {
    state
        .servers_in(&pod.key.namespace)
        .filter(|s| s.selects(pod, port))
        .min_by(|a, b| by_age(&a.meta, &b.meta))
        .map(|s| &**s)
}

/// The default inbound policy of `pod` (or of an unknown pod in
/// `namespace`): pod annotation, namespace annotation, then the flag.
pub fn effective_default(
    state: &State,
    pod: Option<&Pod>,
    namespace: &str,
    config: &InboundConfig,
) -> DefaultPolicy {
    let parse = |v: &str, whose: &str| {
        v.parse::<DefaultPolicy>().unwrap_or_else(|e| {
            tracing::debug!(%whose, error = %e, "invalid default inbound policy annotation; denying");
            DefaultPolicy::Deny
        })
    };
    if let Some(v) = pod.and_then(|p| p.inbound.default_policy.as_deref()) {
        return parse(v, "pod");
    }
    if let Some(v) = state
        .namespaces
        .get(namespace)
        .and_then(|n| n.default_inbound_policy.as_deref())
    {
        return parse(v, "namespace");
    }
    config.default_policy
}

fn pb_default(p: DefaultPolicy) -> pb::DefaultPolicy {
    match p {
        DefaultPolicy::AllUnauthenticated => pb::DefaultPolicy::AllUnauthenticated,
        DefaultPolicy::AllAuthenticated => pb::DefaultPolicy::AllAuthenticated,
        DefaultPolicy::ClusterUnauthenticated => pb::DefaultPolicy::ClusterUnauthenticated,
        DefaultPolicy::ClusterAuthenticated => pb::DefaultPolicy::ClusterAuthenticated,
        DefaultPolicy::Deny => pb::DefaultPolicy::Deny,
        DefaultPolicy::Audit => pb::DefaultPolicy::Audit,
    }
}

fn pb_protocol(p: ProxyProtocol) -> pb::ProtocolKind {
    match p {
        ProxyProtocol::Detect => pb::ProtocolKind::Detect,
        ProxyProtocol::Http1 => pb::ProtocolKind::Http1,
        ProxyProtocol::Http2 => pb::ProtocolKind::Http2,
        ProxyProtocol::Grpc => pb::ProtocolKind::Grpc,
        ProxyProtocol::Opaque => pb::ProtocolKind::Opaque,
    }
}

fn ip_network(c: &Cidr) -> IpNetwork {
    IpNetwork {
        ip: match c.addr() {
            IpAddr::V4(a) => a.octets().to_vec(),
            IpAddr::V6(a) => a.octets().to_vec(),
        },
        prefix_len: u32::from(c.prefix_len()),
    }
}

fn unauthenticated() -> pb::authorization::Authentication {
    pb::authorization::Authentication::Unauthenticated(pb::Unauthenticated {})
}

fn any_mesh_client() -> pb::authorization::Authentication {
    pb::authorization::Authentication::MeshTls(pb::MeshTls {
        identities: Vec::new(),
        namespaces: Vec::new(),
        any: true,
    })
}

/// What a default policy (or a Server's `accessPolicy`) allows, named
/// `default:<policy>`.
pub fn default_authorizations(
    policy: DefaultPolicy,
    config: &InboundConfig,
) -> Vec<pb::Authorization> {
    let cluster = || {
        config
            .cluster_networks
            .iter()
            .map(|c| pb::Network {
                net: Some(ip_network(c)),
                except: Vec::new(),
            })
            .collect::<Vec<_>>()
    };
    let (networks, authentication) = match policy {
        DefaultPolicy::AllUnauthenticated => (Vec::new(), unauthenticated()),
        DefaultPolicy::AllAuthenticated => (Vec::new(), any_mesh_client()),
        DefaultPolicy::ClusterUnauthenticated => (cluster(), unauthenticated()),
        DefaultPolicy::ClusterAuthenticated => (cluster(), any_mesh_client()),
        DefaultPolicy::Deny | DefaultPolicy::Audit => return Vec::new(),
    };
    vec![pb::Authorization {
        name: format!("default:{policy}"),
        networks,
        authentication: Some(authentication),
    }]
}

/// One AuthorizationPolicy as the proxy applies it.
pub fn authorization(a: &IndexedAuthorization, config: &InboundConfig) -> pb::Authorization {
    let networks = a
        .networks
        .iter()
        .map(|n| pb::Network {
            net: Some(ip_network(&n.cidr)),
            except: n.except.iter().map(ip_network).collect(),
        })
        .collect();
    let authentication = match &a.clients {
        Clients::Unauthenticated => unauthenticated(),
        Clients::Mesh {
            identities,
            service_accounts,
            namespaces,
            any,
        } => {
            let mut ids = identities.clone();
            ids.extend(
                service_accounts
                    .iter()
                    .map(|sa| spiffe_id(&config.trust_domain, &sa.namespace, &sa.name)),
            );
            ids.sort();
            ids.dedup();
            let mut namespaces = namespaces.clone();
            namespaces.sort();
            namespaces.dedup();
            pb::authorization::Authentication::MeshTls(pb::MeshTls {
                identities: ids,
                namespaces,
                any: *any,
            })
        }
    };
    pb::Authorization {
        name: format!(
            "authorizationpolicy/{}/{}",
            a.meta.key.namespace, a.meta.key.name
        ),
        networks,
        authentication: Some(authentication),
    }
}

fn labels(kind: &str, name: &str) -> HashMap<String, String> {
    HashMap::from([
        ("kind".to_string(), kind.to_string()),
        ("name".to_string(), name.to_string()),
    ])
}

fn default_server(
    state: &State,
    pod: Option<&Pod>,
    namespace: &str,
    port: u16,
    config: &InboundConfig,
) -> pb::InboundServer {
    let policy = effective_default(state, pod, namespace, config);
    let protocol = if pod.is_some_and(|p| p.opaque_ports.contains(port)) {
        pb::ProtocolKind::Opaque
    } else {
        pb::ProtocolKind::Detect
    };
    pb::InboundServer {
        protocol: protocol as i32,
        authorizations: default_authorizations(policy, config),
        default_policy: pb_default(policy) as i32,
        source: format!("default:{policy}"),
        labels: labels("default", policy.as_str()),
        routes: Vec::new(),
        audit: policy == DefaultPolicy::Audit,
    }
}

fn server_policy(
    state: &State,
    server: &IndexedServer,
    config: &InboundConfig,
) -> pb::InboundServer {
    let ns = &server.meta.key.namespace;
    // Sorted by name: the namespace's set is ordered.
    let policies: Vec<&IndexedAuthorization> = state.authorizations_in(ns).map(|a| &**a).collect();
    let mut authorizations: Vec<pb::Authorization> = policies
        .iter()
        .filter(|a| match &a.target {
            AuthorizationTarget::Server(name) => *name == server.meta.key.name,
            AuthorizationTarget::Namespace => true,
            AuthorizationTarget::Route(..) => false,
        })
        .map(|a| authorization(a, config))
        .collect();
    authorizations.extend(default_authorizations(server.access_policy, config));
    pb::InboundServer {
        protocol: pb_protocol(server.protocol) as i32,
        authorizations,
        default_policy: pb_default(server.access_policy) as i32,
        source: format!("server/{ns}/{}", server.meta.key.name),
        labels: labels("server", &server.meta.key.name),
        routes: inbound_routes(state, server, &policies, config),
        audit: server.access_policy == DefaultPolicy::Audit,
    }
}

/// The routes of `server`, one per match, in precedence order.
fn inbound_routes(
    state: &State,
    server: &IndexedServer,
    policies: &[&IndexedAuthorization],
    config: &InboundConfig,
) -> Vec<pb::InboundRoute> {
    let mut compiled = Vec::new();
    for (kind, key) in state
        .routes_by_server
        .get(&server.meta.key)
        .into_iter()
        .flatten()
    {
        if key.namespace != server.meta.key.namespace {
            continue; // a route attaches to Servers of its own namespace only
        }
        let Some(route) = state.route_in_force(*kind, key) else {
            continue;
        };
        match rule_matches(route) {
            Ok(rules) => compiled.push((route, rules)),
            Err(e) => {
                tracing::debug!(route = %route.meta.key, kind = %route.kind(), error = %e, "inbound route not applied")
            }
        }
    }
    if compiled.iter().any(|(r, _)| r.kind() == Kind::GrpcRoute) {
        compiled.retain(|(r, _)| r.kind() == Kind::GrpcRoute);
    }
    let mut ranked = Vec::new();
    for (route, rules) in compiled {
        let authorizations: Vec<pb::Authorization> = policies
            .iter()
            .filter(|a| {
                matches!(&a.target, AuthorizationTarget::Route(k, n)
                    if *k == route.kind() && *n == route.meta.key.name)
            })
            .map(|a| authorization(a, config))
            .collect();
        for (rule, (route_ref, matches)) in rules.into_iter().enumerate() {
            for (index, (specificity, m)) in matches.into_iter().enumerate() {
                ranked.push((
                    MatchRank::new(route, rule, index, specificity),
                    pb::InboundRoute {
                        r#ref: Some(route_ref.clone()),
                        matches: vec![m],
                        authorizations: authorizations.clone(),
                    },
                ));
            }
        }
    }
    ranked.sort_by(|a, b| a.0.cmp(&b.0));
    ranked.into_iter().map(|(_, r)| r).collect()
}

fn default_route_ref(namespace: &str, name: &str) -> dpb::RouteRef {
    dpb::RouteRef {
        kind: "default".into(),
        namespace: namespace.into(),
        name: name.into(),
        rule: String::new(),
    }
}

/// Adds the kubelet's probe routes (see the module docs).
fn add_probes(server: &mut pb::InboundServer, pod: &Pod, port: u16) {
    let paths: Vec<&str> = pod
        .inbound
        .http_probes
        .iter()
        .filter(|p| p.port == port)
        .map(|p| p.path.as_str())
        .collect();
    if paths.is_empty() || server.protocol == pb::ProtocolKind::Opaque as i32 {
        return;
    }
    let open = server.authorizations.iter().any(|a| {
        a.networks.is_empty()
            && matches!(
                a.authentication,
                Some(pb::authorization::Authentication::Unauthenticated(_))
            )
    });
    if open && server.routes.is_empty() {
        return;
    }
    let ns = &pod.key.namespace;
    let probe = pb::Authorization {
        name: PROBE_AUTHORIZATION.into(),
        networks: Vec::new(),
        authentication: Some(unauthenticated()),
    };
    let mut routes: Vec<pb::InboundRoute> = paths
        .into_iter()
        .map(|path| pb::InboundRoute {
            r#ref: Some(default_route_ref(ns, "probe")),
            matches: vec![dpb::RouteMatch {
                route: 0,
                path: Some(dpb::PathMatch {
                    kind: Some(dpb::path_match::Kind::Exact(path.to_string())),
                }),
                headers: Vec::new(),
                query_params: Vec::new(),
                method: "GET".into(),
            }],
            authorizations: vec![probe.clone()],
        })
        .collect();
    if server.routes.is_empty() {
        routes.push(pb::InboundRoute {
            r#ref: Some(default_route_ref(ns, "default")),
            matches: vec![dpb::RouteMatch {
                route: 0,
                path: Some(dpb::PathMatch {
                    kind: Some(dpb::path_match::Kind::Prefix("/".into())),
                }),
                ..Default::default()
            }],
            authorizations: Vec::new(),
        });
    }
    routes.append(&mut server.routes);
    server.routes = routes;
}

#[cfg(test)]
mod tests;

//! The proxy's compiled form of an `InboundServer`: what the controller sent for one port,
//! checked once and turned into what the decision reads (networks parsed and masked, route
//! matches compiled with the outbound matcher's types), so no request parses anything.
//!
//! Mistakes fail closed: an authorization with a bad network, a bad exception or no
//! authentication is dropped (it allows no one, instead of allowing more than written), and
//! a route with a bad match is dropped with its authorizations (its requests fall to the next
//! route or 404 `no-route`). Each problem is returned beside the policy for the caller to log
//! once.

use std::sync::Arc;

use weft_proto::policy as pb;

use super::network::{parse_net, NetError, Network};
use crate::route::policy::{compile_route_match, route_label, Match};

/// The inbound policy of one port, ready for the decision.
#[derive(Debug)]
pub struct ServerPolicy {
    /// Where it comes from, for metrics and messages: `server/<ns>/<name>`, or
    /// `default:<policy>`.
    pub server: Arc<str>,
    pub protocol: Protocol,
    pub authorizations: Vec<Authorization>,
    /// Routes in precedence order; empty: the server is not routed.
    pub routes: Vec<InboundRoute>,
    /// Decide, count and log, but allow.
    pub audit: bool,
    pub default_policy: DefaultPolicy,
    /// The authorization that allows anyone from anywhere when the server has no routes:
    /// every decision is that one, without looking at the client.
    pub(super) open: Option<usize>,
}

/// What the server says its port speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    Detect,
    Http1,
    Http2,
    Grpc,
    /// Never detected: relayed as TCP, authorized per connection.
    Opaque,
}

/// One way to be allowed.
#[derive(Debug)]
pub struct Authorization {
    /// `authorizationpolicy/<ns>/<name>`, `default:<policy>`, `default:probe`.
    pub name: Arc<str>,
    /// Client networks allowed; empty: any.
    pub networks: Vec<Network>,
    pub authn: Authn,
}

#[derive(Debug)]
pub enum Authn {
    /// Anyone, meshed or not.
    Unauthenticated,
    /// Clients with a verified mesh identity matching one of these.
    Mesh {
        /// Exact SPIFFE IDs.
        identities: Vec<Box<str>>,
        /// Namespaces whose every identity is allowed.
        namespaces: Vec<Box<str>>,
        /// Any verified identity.
        any: bool,
    },
}

/// A route of the server (an HTTPRoute or GRPCRoute rule with the Server as parent).
#[derive(Debug)]
pub struct InboundRoute {
    /// `httproute/<ns>/<name>/<rule>`.
    pub label: Arc<str>,
    /// Any one matching matches the route.
    pub matches: Vec<Match>,
    /// Allowed on this route besides the server's own authorizations.
    pub authorizations: Vec<Authorization>,
}

/// The default inbound policies (cluster, namespace annotation, pod annotation, or this
/// proxy's `WEFT_PROXY_INBOUND_DEFAULT_POLICY` when the controller has not answered).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum DefaultPolicy {
    #[default]
    AllUnauthenticated,
    AllAuthenticated,
    ClusterUnauthenticated,
    ClusterAuthenticated,
    Deny,
    Audit,
}

/// The networks `cluster-*` default policies allow when the proxy decides alone (no
/// controller answer): the controller's own `--cluster-networks` default (the RFC 1918
/// ranges and fd00::/8). The controller sends the cluster's configured networks in its
/// authorizations.
pub const CLUSTER_NETWORKS: &[&str] =
    &["10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fd00::/8"];

impl DefaultPolicy {
    pub const ALL: [DefaultPolicy; 6] = [
        DefaultPolicy::AllUnauthenticated,
        DefaultPolicy::AllAuthenticated,
        DefaultPolicy::ClusterUnauthenticated,
        DefaultPolicy::ClusterAuthenticated,
        DefaultPolicy::Deny,
        DefaultPolicy::Audit,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            DefaultPolicy::AllUnauthenticated => "all-unauthenticated",
            DefaultPolicy::AllAuthenticated => "all-authenticated",
            DefaultPolicy::ClusterUnauthenticated => "cluster-unauthenticated",
            DefaultPolicy::ClusterAuthenticated => "cluster-authenticated",
            DefaultPolicy::Deny => "deny",
            DefaultPolicy::Audit => "audit",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|p| p.as_str() == s)
    }

    fn from_pb(v: i32) -> Self {
        match pb::DefaultPolicy::try_from(v) {
            Ok(pb::DefaultPolicy::AllAuthenticated) => DefaultPolicy::AllAuthenticated,
            Ok(pb::DefaultPolicy::ClusterUnauthenticated) => DefaultPolicy::ClusterUnauthenticated,
            Ok(pb::DefaultPolicy::ClusterAuthenticated) => DefaultPolicy::ClusterAuthenticated,
            Ok(pb::DefaultPolicy::Deny) => DefaultPolicy::Deny,
            Ok(pb::DefaultPolicy::Audit) => DefaultPolicy::Audit,
            Ok(pb::DefaultPolicy::AllUnauthenticated) | Err(_) => DefaultPolicy::AllUnauthenticated,
        }
    }
}

impl std::fmt::Display for DefaultPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl ServerPolicy {
    /// The policy a proxy applies on its own for `default` (no controller, or no answer
    /// yet): no routes, one authorization named `default:<policy>`; `deny` and `audit` have
    /// none (`audit` allows anyway). Kubelet probes are not known to the proxy alone: under
    /// `deny` they are refused until the controller's policy (with `default:probe`) arrives.
    pub fn fallback(default: DefaultPolicy) -> Self {
        let name: Arc<str> = Arc::from(format!("default:{default}"));
        let cluster = || -> Vec<Network> {
            CLUSTER_NETWORKS
                .iter()
                .filter_map(|n| parse_net(n))
                .map(|net| Network {
                    net,
                    except: Vec::new(),
                })
                .collect()
        };
        let mesh_any = || Authn::Mesh {
            identities: Vec::new(),
            namespaces: Vec::new(),
            any: true,
        };
        let one = |networks, authn| {
            vec![Authorization {
                name: name.clone(),
                networks,
                authn,
            }]
        };
        let authorizations = match default {
            DefaultPolicy::AllUnauthenticated => one(Vec::new(), Authn::Unauthenticated),
            DefaultPolicy::AllAuthenticated => one(Vec::new(), mesh_any()),
            DefaultPolicy::ClusterUnauthenticated => one(cluster(), Authn::Unauthenticated),
            DefaultPolicy::ClusterAuthenticated => one(cluster(), mesh_any()),
            DefaultPolicy::Deny | DefaultPolicy::Audit => Vec::new(),
        };
        Self::new(
            name.clone(),
            Protocol::Detect,
            authorizations,
            Vec::new(),
            default == DefaultPolicy::Audit,
            default,
        )
    }

    /// Everything refused: for ports beyond the proxy's bound on followed ports.
    pub fn deny(server: &str) -> Self {
        Self::new(
            Arc::from(server),
            Protocol::Detect,
            Vec::new(),
            Vec::new(),
            false,
            DefaultPolicy::Deny,
        )
    }

    fn new(
        server: Arc<str>,
        protocol: Protocol,
        authorizations: Vec<Authorization>,
        routes: Vec<InboundRoute>,
        audit: bool,
        default_policy: DefaultPolicy,
    ) -> Self {
        let open = if routes.is_empty() {
            authorizations
                .iter()
                .position(|a| matches!(a.authn, Authn::Unauthenticated) && a.networks.is_empty())
        } else {
            None
        };
        Self {
            server,
            protocol,
            authorizations,
            routes,
            audit,
            default_policy,
            open,
        }
    }

    /// Whether every client is allowed without looking at it (no routes, and an
    /// authorization for anyone from anywhere).
    pub fn is_open(&self) -> bool {
        self.open.is_some()
    }
}

/// A compiled policy and what had to be left out of it.
#[derive(Debug)]
pub struct Compiled {
    pub policy: ServerPolicy,
    pub problems: Vec<String>,
}

/// Compiles one `InboundServer` (see the module docs for what is dropped).
pub fn compile(pb: &pb::InboundServer) -> Compiled {
    let default_policy = DefaultPolicy::from_pb(pb.default_policy);
    let server: Arc<str> = if pb.source.is_empty() {
        Arc::from(format!("default:{default_policy}"))
    } else {
        Arc::from(pb.source.as_str())
    };
    let mut problems = Vec::new();
    let authorizations = compile_authorizations(&pb.authorizations, &server, &mut problems);
    let mut routes = Vec::with_capacity(pb.routes.len());
    'routes: for (i, r) in pb.routes.iter().enumerate() {
        let label = route_label(r.r#ref.as_ref(), i);
        let mut matches = Vec::with_capacity(r.matches.len().max(1));
        for m in &r.matches {
            match compile_route_match(m) {
                Ok(m) => matches.push(m),
                Err(e) => {
                    problems.push(format!("{server}: route {label} dropped: {e}"));
                    continue 'routes;
                }
            }
        }
        // A rule without matches matches every request (the Gateway API's default match).
        if matches.is_empty() {
            if let Ok(m) = compile_route_match(&Default::default()) {
                matches.push(m);
            }
        }
        let authorizations = compile_authorizations(&r.authorizations, &server, &mut problems);
        routes.push(InboundRoute {
            label,
            matches,
            authorizations,
        });
    }
    let protocol = match pb::ProtocolKind::try_from(pb.protocol) {
        Ok(pb::ProtocolKind::Http1) => Protocol::Http1,
        Ok(pb::ProtocolKind::Http2) => Protocol::Http2,
        Ok(pb::ProtocolKind::Grpc) => Protocol::Grpc,
        Ok(pb::ProtocolKind::Opaque) => Protocol::Opaque,
        Ok(pb::ProtocolKind::Detect) | Err(_) => Protocol::Detect,
    };
    Compiled {
        policy: ServerPolicy::new(
            server,
            protocol,
            authorizations,
            routes,
            pb.audit,
            default_policy,
        ),
        problems,
    }
}

fn compile_authorizations(
    list: &[pb::Authorization],
    server: &str,
    problems: &mut Vec<String>,
) -> Vec<Authorization> {
    let mut out = Vec::with_capacity(list.len());
    for a in list {
        match authorization(a) {
            Ok(a) => out.push(a),
            Err(e) => problems.push(format!(
                "{server}: authorization {:?} dropped (it allows no one): {e}",
                a.name
            )),
        }
    }
    out
}

#[derive(Debug, thiserror::Error)]
enum AuthzError {
    #[error("network {index}: {source}")]
    Network {
        index: usize,
        #[source]
        source: NetError,
    },
    #[error("no authentication (neither unauthenticated nor meshTLS)")]
    NoAuthentication,
}

fn authorization(a: &pb::Authorization) -> Result<Authorization, AuthzError> {
    use pb::authorization::Authentication;
    let networks = a
        .networks
        .iter()
        .enumerate()
        .map(|(index, n)| {
            Network::from_pb(n).map_err(|source| AuthzError::Network { index, source })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let authn = match &a.authentication {
        Some(Authentication::Unauthenticated(_)) => Authn::Unauthenticated,
        Some(Authentication::MeshTls(m)) => Authn::Mesh {
            identities: m.identities.iter().map(|s| s.as_str().into()).collect(),
            namespaces: m.namespaces.iter().map(|s| s.as_str().into()).collect(),
            any: m.any,
        },
        None => return Err(AuthzError::NoAuthentication),
    };
    let name = if a.name.is_empty() {
        Arc::from("unnamed")
    } else {
        Arc::from(a.name.as_str())
    };
    Ok(Authorization {
        name,
        networks,
        authn,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_policies_parse_and_print() {
        for p in DefaultPolicy::ALL {
            assert_eq!(DefaultPolicy::parse(p.as_str()), Some(p));
        }
        assert_eq!(DefaultPolicy::parse("allow"), None);
        assert!(ServerPolicy::fallback(DefaultPolicy::AllUnauthenticated).is_open());
        assert!(!ServerPolicy::fallback(DefaultPolicy::ClusterUnauthenticated).is_open());
        let audit = ServerPolicy::fallback(DefaultPolicy::Audit);
        assert!(audit.audit && audit.authorizations.is_empty());
        assert_eq!(&*audit.server, "default:audit");
    }

    #[test]
    fn bad_parts_are_dropped_and_named() {
        use weft_proto::destination as dpb;
        let bad_net = pb::Network {
            net: Some(weft_proto::net::IpNetwork {
                ip: vec![10, 0, 0, 0],
                prefix_len: 40,
            }),
            except: vec![],
        };
        let unauth = Some(pb::authorization::Authentication::Unauthenticated(
            pb::Unauthenticated {},
        ));
        let server = pb::InboundServer {
            source: "server/ns/web".into(),
            authorizations: vec![
                pb::Authorization {
                    name: "authorizationpolicy/ns/bad-net".into(),
                    networks: vec![bad_net],
                    authentication: unauth.clone(),
                },
                pb::Authorization {
                    name: "authorizationpolicy/ns/none".into(),
                    ..Default::default()
                },
                pb::Authorization {
                    name: "authorizationpolicy/ns/good".into(),
                    networks: vec![],
                    authentication: unauth,
                },
            ],
            routes: vec![
                pb::InboundRoute {
                    r#ref: Some(dpb::RouteRef {
                        kind: "httproute".into(),
                        namespace: "ns".into(),
                        name: "bad".into(),
                        rule: "0".into(),
                    }),
                    matches: vec![dpb::RouteMatch {
                        path: Some(dpb::PathMatch {
                            kind: Some(dpb::path_match::Kind::Regex("(".into())),
                        }),
                        ..Default::default()
                    }],
                    authorizations: vec![],
                },
                pb::InboundRoute {
                    r#ref: None,
                    matches: vec![],
                    authorizations: vec![],
                },
            ],
            ..Default::default()
        };
        let c = compile(&server);
        assert_eq!(c.policy.authorizations.len(), 1);
        assert_eq!(
            &*c.policy.authorizations[0].name,
            "authorizationpolicy/ns/good"
        );
        assert_eq!(c.policy.routes.len(), 1, "the bad route is dropped");
        assert_eq!(c.policy.routes[0].matches.len(), 1, "no matches: match all");
        assert_eq!(c.problems.len(), 3, "{:?}", c.problems);
        assert!(c.problems[0].contains("bad-net") && c.problems[0].contains("prefix length 40"));
        assert!(
            c.problems[2].contains("httproute/ns/bad/0"),
            "{:?}",
            c.problems
        );
        // Routes make the server closed to the fast path.
        assert!(!c.policy.is_open());
    }

    #[test]
    fn an_unnamed_source_is_its_default() {
        let c = compile(&pb::InboundServer {
            default_policy: pb::DefaultPolicy::Deny as i32,
            ..Default::default()
        });
        assert_eq!(&*c.policy.server, "default:deny");
        assert_eq!(c.policy.default_policy, DefaultPolicy::Deny);
    }
}

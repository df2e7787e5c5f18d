//! The decision: policy and client (and request) in, verdict out. Pure, and allocation-free
//! on every path but a denial's message ([`deny_detail`]).
//!
//! A connection, or an HTTP request, is allowed when (weft.policy.InboundServer):
//! - the server has no routes, and one of its authorizations allows the client; or
//! - it has routes (HTTP only), the request matches one (else 404 `no-route`), and one of the
//!   server's or that route's authorizations allows the client.
//!
//! An authorization allows a client when the client's address is in one of its networks
//! (no networks: any address) and its authentication holds: `unauthenticated` always;
//! `meshTLS` when the client proved a mesh identity (terminated mTLS) that is one of the
//! exact SPIFFE IDs, or lives in one of the namespaces (`spiffe://<td>/ns/<ns>/sa/<sa>`),
//! or, with `any`, is any verified identity. The trust domain is not compared: the client
//! was verified against this proxy's trust anchors, which define the mesh.
//!
//! Connections of opaque TCP, TLS passed through and mTLS carrying opaque TCP are decided
//! once, at accept, against the server's authorizations only (routes are HTTP).

use std::net::IpAddr;
use std::sync::Arc;

use http::{HeaderMap, Method, Uri};

use super::policy::{Authn, Authorization, InboundRoute, ServerPolicy};
use crate::route::matching::matches;

/// Who is asking.
#[derive(Clone, Copy, Debug)]
pub struct Client<'a> {
    /// The verified mesh identity (inbound mTLS terminated by this proxy), else `None`.
    pub id: Option<&'a str>,
    /// The client's address (any form: canonicalised where compared).
    pub ip: IpAddr,
}

/// The verdict.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision<'p> {
    Allow {
        /// The authorization that allowed it.
        authorization: &'p Arc<str>,
        route: Option<&'p Arc<str>>,
    },
    /// No authorization allows the client.
    Deny { route: Option<&'p Arc<str>> },
    /// Would be denied, but the server is in audit mode: allowed, counted and logged.
    AuditDeny { route: Option<&'p Arc<str>> },
    /// The server has routes and none matches the request (404 `no-route`).
    NoRoute,
}

impl<'p> Decision<'p> {
    /// The `result` metric label.
    pub fn result(&self) -> &'static str {
        match self {
            Decision::Allow { .. } => "allow",
            Decision::Deny { .. } | Decision::NoRoute => "deny",
            Decision::AuditDeny { .. } => "audit_deny",
        }
    }

    pub fn is_allowed(&self) -> bool {
        matches!(self, Decision::Allow { .. } | Decision::AuditDeny { .. })
    }

    pub fn route(&self) -> Option<&'p Arc<str>> {
        match *self {
            Decision::Allow { route, .. }
            | Decision::Deny { route }
            | Decision::AuditDeny { route } => route,
            Decision::NoRoute => None,
        }
    }

    pub fn authorization(&self) -> Option<&'p Arc<str>> {
        match *self {
            Decision::Allow { authorization, .. } => Some(authorization),
            _ => None,
        }
    }
}

/// A connection (opaque TCP, TLS passthrough, mTLS carrying opaque TCP).
pub fn connection<'p>(policy: &'p ServerPolicy, client: &Client<'_>) -> Decision<'p> {
    if let Some(i) = policy.open {
        return Decision::Allow {
            authorization: &policy.authorizations[i].name,
            route: None,
        };
    }
    verdict(policy, first_allowing(&policy.authorizations, client), None)
}

/// An HTTP request.
pub fn request<'p>(
    policy: &'p ServerPolicy,
    client: &Client<'_>,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
) -> Decision<'p> {
    if policy.routes.is_empty() {
        return connection(policy, client);
    }
    let Some(route) = route(&policy.routes, method, uri, headers) else {
        return Decision::NoRoute;
    };
    let allowed = first_allowing(&policy.authorizations, client)
        .or_else(|| first_allowing(&route.authorizations, client));
    verdict(policy, allowed, Some(&route.label))
}

fn route<'p>(
    routes: &'p [InboundRoute],
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
) -> Option<&'p InboundRoute> {
    routes
        .iter()
        .find(|r| r.matches.iter().any(|m| matches(m, method, uri, headers)))
}

fn verdict<'p>(
    policy: &'p ServerPolicy,
    allowed: Option<&'p Arc<str>>,
    route: Option<&'p Arc<str>>,
) -> Decision<'p> {
    match allowed {
        Some(authorization) => Decision::Allow {
            authorization,
            route,
        },
        None if policy.audit => Decision::AuditDeny { route },
        None => Decision::Deny { route },
    }
}

fn first_allowing<'p>(list: &'p [Authorization], client: &Client<'_>) -> Option<&'p Arc<str>> {
    list.iter().find(|a| allows(a, client)).map(|a| &a.name)
}

/// Whether `a` allows `client`.
pub fn allows(a: &Authorization, client: &Client<'_>) -> bool {
    if !a.networks.is_empty() && !a.networks.iter().any(|n| n.contains(client.ip)) {
        return false;
    }
    match &a.authn {
        Authn::Unauthenticated => true,
        Authn::Mesh {
            identities,
            namespaces,
            any,
        } => {
            let Some(id) = client.id else {
                return false;
            };
            *any || identities.iter().any(|i| **i == *id)
                || namespace_of(id).is_some_and(|ns| namespaces.iter().any(|n| **n == *ns))
        }
    }
}

/// The namespace of a mesh identity `spiffe://<td>/ns/<ns>/sa/<sa>`; `None` for any other
/// shape.
pub fn namespace_of(id: &str) -> Option<&str> {
    let rest = id.strip_prefix("spiffe://")?;
    let (td, path) = rest.split_once('/')?;
    let (ns, sa) = path.strip_prefix("ns/")?.split_once("/sa/")?;
    let ok = |s: &str| !s.is_empty() && !s.contains('/');
    (ok(td) && ok(ns) && ok(sa)).then_some(ns)
}

/// The message of a denial (the `weft-proxy-error` response's detail): the server, the route,
/// and the client. Routes the controller adds itself (kind `default`: the probe routes and the
/// catch-all after them) are not the user's, and not named.
pub fn deny_detail(policy: &ServerPolicy, route: Option<&Arc<str>>, client: &Client<'_>) -> String {
    let route = route.filter(|r| !r.starts_with("default/"));
    let who = match client.id {
        Some(id) => format!("client {id} ({})", client.ip.to_canonical()),
        None => format!("unauthenticated client {}", client.ip.to_canonical()),
    };
    match route {
        Some(r) => format!(
            "{}: no authorization of the server or of route {r} allows {who}",
            policy.server
        ),
        None => format!("{}: no authorization allows {who}", policy.server),
    }
}

#[cfg(test)]
mod tests {
    use weft_proto::destination as dpb;
    use weft_proto::policy as pb;

    use super::*;
    use crate::authz::policy::{compile, DefaultPolicy};

    const WEB: &str = "spiffe://cluster.local/ns/shop/sa/web";
    const CART: &str = "spiffe://cluster.local/ns/shop/sa/cart";
    const OTHER: &str = "spiffe://cluster.local/ns/other/sa/web";

    fn net(s: &str) -> pb::Network {
        let n = crate::authz::network::Network::parse(s).unwrap();
        let wire = |n: crate::authz::network::IpNet| weft_proto::net::IpNetwork {
            ip: weft_proto::ip_to_bytes(n.addr()),
            prefix_len: u32::from(n.prefix()),
        };
        pb::Network {
            net: Some(wire(n.net)),
            except: n.except.into_iter().map(wire).collect(),
        }
    }

    fn unauth(name: &str, nets: &[&str]) -> pb::Authorization {
        pb::Authorization {
            name: name.into(),
            networks: nets.iter().map(|n| net(n)).collect(),
            authentication: Some(pb::authorization::Authentication::Unauthenticated(
                pb::Unauthenticated {},
            )),
        }
    }

    fn mesh(name: &str, ids: &[&str], nss: &[&str], any: bool) -> pb::Authorization {
        pb::Authorization {
            name: name.into(),
            networks: vec![],
            authentication: Some(pb::authorization::Authentication::MeshTls(pb::MeshTls {
                identities: ids.iter().map(|s| s.to_string()).collect(),
                namespaces: nss.iter().map(|s| s.to_string()).collect(),
                any,
            })),
        }
    }

    fn server(authorizations: Vec<pb::Authorization>, audit: bool) -> ServerPolicy {
        let c = compile(&pb::InboundServer {
            source: "server/shop/api".into(),
            authorizations,
            audit,
            ..Default::default()
        });
        assert_eq!(c.problems, Vec::<String>::new());
        c.policy
    }

    fn client<'a>(id: Option<&'a str>, ip: &str) -> Client<'a> {
        Client {
            id,
            ip: ip.parse().unwrap(),
        }
    }

    /// "allow:<authorization>", "deny", "audit".
    fn conn(p: &ServerPolicy, id: Option<&str>, ip: &str) -> String {
        show(connection(p, &client(id, ip)))
    }

    fn show(d: Decision<'_>) -> String {
        let route = d.route().map(|r| format!("@{r}")).unwrap_or_default();
        match d {
            Decision::Allow { authorization, .. } => format!("allow:{authorization}{route}"),
            Decision::Deny { .. } => format!("deny{route}"),
            Decision::AuditDeny { .. } => format!("audit{route}"),
            Decision::NoRoute => "no-route".into(),
        }
    }

    #[test]
    fn connections_by_identity_namespace_and_network() {
        let p = server(
            vec![
                mesh("ap/exact", &[WEB], &[], false),
                mesh("ap/ns", &[], &["other"], false),
                unauth("ap/net", &["192.168.0.0/16 except 192.168.9.0/24"]),
            ],
            false,
        );
        let cases: &[(Option<&str>, &str, &str)] = &[
            (Some(WEB), "10.0.0.1", "allow:ap/exact"),
            (Some(CART), "10.0.0.1", "deny"),
            (Some(OTHER), "10.0.0.1", "allow:ap/ns"),
            (Some("spiffe://cluster.local/ns/other"), "10.0.0.1", "deny"),
            (None, "10.0.0.1", "deny"),
            (None, "192.168.1.1", "allow:ap/net"),
            (None, "::ffff:192.168.1.1", "allow:ap/net"),
            (None, "192.168.9.1", "deny"),
            (Some(CART), "192.168.1.1", "allow:ap/net"),
        ];
        for (id, ip, want) in cases {
            assert_eq!(conn(&p, *id, ip), *want, "{id:?} from {ip}");
        }
    }

    #[test]
    fn any_authenticated_and_networks_together() {
        let mut a = mesh("ap/any-in-cluster", &[], &[], true);
        a.networks = vec![net("10.0.0.0/8"), net("fd00::/8")];
        let p = server(vec![a], false);
        assert_eq!(conn(&p, Some(CART), "10.1.1.1"), "allow:ap/any-in-cluster");
        assert_eq!(conn(&p, Some(CART), "fd00::1"), "allow:ap/any-in-cluster");
        assert_eq!(conn(&p, Some(CART), "8.8.8.8"), "deny");
        assert_eq!(conn(&p, None, "10.1.1.1"), "deny");
    }

    #[test]
    fn audit_allows_what_it_would_deny() {
        let p = server(vec![mesh("ap/exact", &[WEB], &[], false)], true);
        assert_eq!(conn(&p, Some(WEB), "10.0.0.1"), "allow:ap/exact");
        let d = connection(&p, &client(Some(CART), "10.0.0.1"));
        assert_eq!(show(d), "audit");
        assert!(d.is_allowed());
        assert_eq!(d.result(), "audit_deny");
        let audit = ServerPolicy::fallback(DefaultPolicy::Audit);
        assert_eq!(conn(&audit, None, "1.2.3.4"), "audit");
        let deny = ServerPolicy::fallback(DefaultPolicy::Deny);
        assert_eq!(conn(&deny, Some(WEB), "10.0.0.1"), "deny");
    }

    #[test]
    fn fallbacks() {
        let cases: &[(DefaultPolicy, Option<&str>, &str, &str)] = &[
            (
                DefaultPolicy::AllUnauthenticated,
                None,
                "8.8.8.8",
                "allow:default:all-unauthenticated",
            ),
            (DefaultPolicy::AllAuthenticated, None, "10.0.0.1", "deny"),
            (
                DefaultPolicy::AllAuthenticated,
                Some(WEB),
                "8.8.8.8",
                "allow:default:all-authenticated",
            ),
            (
                DefaultPolicy::ClusterUnauthenticated,
                None,
                "10.0.0.1",
                "allow:default:cluster-unauthenticated",
            ),
            (
                DefaultPolicy::ClusterUnauthenticated,
                None,
                "8.8.8.8",
                "deny",
            ),
            (
                DefaultPolicy::ClusterAuthenticated,
                Some(WEB),
                "172.20.0.1",
                "allow:default:cluster-authenticated",
            ),
            (
                DefaultPolicy::ClusterAuthenticated,
                None,
                "172.20.0.1",
                "deny",
            ),
            (DefaultPolicy::Deny, Some(WEB), "10.0.0.1", "deny"),
            (DefaultPolicy::Audit, None, "8.8.8.8", "audit"),
        ];
        for (p, id, ip, want) in cases {
            let policy = ServerPolicy::fallback(*p);
            assert_eq!(conn(&policy, *id, ip), *want, "{p} {id:?} {ip}");
        }
    }

    fn routed() -> ServerPolicy {
        let rule = |name: &str| dpb::RouteRef {
            kind: "httproute".into(),
            namespace: "shop".into(),
            name: name.into(),
            rule: "0".into(),
        };
        let on = |method: &str, kind: dpb::path_match::Kind| dpb::RouteMatch {
            method: method.into(),
            path: Some(dpb::PathMatch { kind: Some(kind) }),
            ..Default::default()
        };
        use dpb::path_match::Kind;
        let c = compile(&pb::InboundServer {
            source: "server/shop/api".into(),
            authorizations: vec![mesh("ap/admin", &[CART], &[], false)],
            routes: vec![
                pb::InboundRoute {
                    r#ref: Some(rule("probes")),
                    matches: vec![on("GET", Kind::Exact("/ready".into()))],
                    authorizations: vec![unauth("default:probe", &[])],
                },
                pb::InboundRoute {
                    r#ref: Some(rule("read")),
                    matches: vec![on("GET", Kind::Prefix("/books".into()))],
                    authorizations: vec![mesh("ap/readers", &[], &["shop"], false)],
                },
                pb::InboundRoute {
                    r#ref: Some(rule("write")),
                    matches: vec![on("POST", Kind::Prefix("/books".into()))],
                    authorizations: vec![],
                },
            ],
            ..Default::default()
        });
        assert_eq!(c.problems, Vec::<String>::new());
        c.policy
    }

    #[test]
    fn requests_by_route_method_and_path() {
        let p = routed();
        let cases: &[(&str, &str, Option<&str>, &str)] = &[
            (
                "GET",
                "/ready",
                None,
                "allow:default:probe@httproute/shop/probes/0",
            ),
            (
                "GET",
                "/books/1",
                Some(WEB),
                "allow:ap/readers@httproute/shop/read/0",
            ),
            ("GET", "/books/1", Some(OTHER), "deny@httproute/shop/read/0"),
            ("GET", "/books/1", None, "deny@httproute/shop/read/0"),
            ("POST", "/books", Some(WEB), "deny@httproute/shop/write/0"),
            // The server's own authorizations hold on every route.
            (
                "POST",
                "/books",
                Some(CART),
                "allow:ap/admin@httproute/shop/write/0",
            ),
            (
                "GET",
                "/ready",
                Some(CART),
                "allow:ap/admin@httproute/shop/probes/0",
            ),
            ("DELETE", "/books/1", Some(CART), "no-route"),
            ("GET", "/bookshelf", Some(WEB), "no-route"),
        ];
        for (method, path, id, want) in cases {
            let d = request(
                &p,
                &client(*id, "10.0.0.1"),
                &method.parse().unwrap(),
                &path.parse().unwrap(),
                &HeaderMap::new(),
            );
            assert_eq!(show(d), *want, "{method} {path} {id:?}");
        }
        // A connection-level decision ignores routes.
        assert_eq!(conn(&p, Some(WEB), "10.0.0.1"), "deny");
    }

    #[test]
    fn namespaces_of_identities() {
        let cases: &[(&str, Option<&str>)] = &[
            ("spiffe://cluster.local/ns/shop/sa/web", Some("shop")),
            ("spiffe://td/ns/a/sa/b", Some("a")),
            ("spiffe://cluster.local/ns//sa/web", None),
            ("spiffe://cluster.local/ns/shop/sa/", None),
            ("spiffe://cluster.local/ns/shop/sa/web/x", None),
            ("spiffe://cluster.local/ns/shop", None),
            ("spiffe:///ns/shop/sa/web", None),
            ("https://cluster.local/ns/shop/sa/web", None),
            ("", None),
        ];
        for (id, want) in cases {
            assert_eq!(namespace_of(id), *want, "{id}");
        }
    }

    #[test]
    fn denials_name_the_server_route_and_client() {
        let p = routed();
        let c = client(Some(OTHER), "::ffff:10.0.0.7");
        let route: Arc<str> = Arc::from("httproute/shop/read/0");
        assert_eq!(
            deny_detail(&p, Some(&route), &c),
            "server/shop/api: no authorization of the server or of route httproute/shop/read/0 allows client spiffe://cluster.local/ns/other/sa/web (10.0.0.7)"
        );
        let synthesized: Arc<str> = Arc::from("default/shop/default/1");
        assert_eq!(
            deny_detail(&p, Some(&synthesized), &client(None, "10.0.0.7")),
            "server/shop/api: no authorization allows unauthenticated client 10.0.0.7"
        );
        assert_eq!(
            deny_detail(&p, None, &client(None, "10.0.0.7")),
            "server/shop/api: no authorization allows unauthenticated client 10.0.0.7"
        );
    }
}

//! Tables for the inbound compilation, with fixtures written as the
//! manifests a user would apply (parsed by the directory source's loader).

use std::path::Path;

use super::*;
use crate::index::{Change, Index};
use crate::source::dir::load_manifests;

/// Namespace `shop` with pod `web-0` (labels app=web, SA web, container
/// port http=8080 and admin=9090, a readiness probe on /ready:8080) and pod
/// `db-0` (app=db, port 5432, opaque).
const PODS: &str = "
apiVersion: v1
kind: Namespace
metadata: {name: shop}
---
apiVersion: v1
kind: Pod
metadata: {name: web-0, namespace: shop, labels: {app: web}, creationTimestamp: '2024-01-01T00:00:00Z'}
spec:
  serviceAccountName: web
  containers:
  - name: app
    ports: [{name: http, containerPort: 8080}, {name: admin, containerPort: 9090}]
    readinessProbe: {httpGet: {port: http, path: /ready}}
status: {phase: Running, podIP: 10.1.0.1}
---
apiVersion: v1
kind: Pod
metadata: {name: db-0, namespace: shop, labels: {app: db}, annotations: {config.weft.dev/opaque-ports: '5432'}}
spec:
  containers: [{name: db, ports: [{containerPort: 5432}]}]
status: {phase: Running, podIP: 10.1.0.2}
";

fn index(yaml: &str) -> Index {
    let text = format!("{PODS}---\n{yaml}");
    let loaded = load_manifests(Path::new("test.yaml"), &text).expect("fixture parses");
    assert!(loaded.skipped.is_empty(), "{:?}", loaded.skipped);
    let index = Index::new();
    index.apply(loaded.objects.into_iter().map(Change::Upsert));
    index
}

fn compile(index: &Index, pod: &str, port: u16, config: &InboundConfig) -> pb::InboundServer {
    inbound_server(&index.read(), "shop", pod, port, config).0
}

fn config(default_policy: DefaultPolicy) -> InboundConfig {
    InboundConfig {
        default_policy,
        ..InboundConfig::default()
    }
}

/// An authorization rendered compactly: `name: who @ networks`.
fn render(a: &pb::Authorization) -> String {
    let net = |n: &IpNetwork| {
        let ip: IpAddr = match n.ip.len() {
            4 => IpAddr::from(<[u8; 4]>::try_from(n.ip.as_slice()).expect("v4")),
            _ => IpAddr::from(<[u8; 16]>::try_from(n.ip.as_slice()).expect("v6")),
        };
        format!("{ip}/{}", n.prefix_len)
    };
    let who = match &a.authentication {
        Some(pb::authorization::Authentication::Unauthenticated(_)) => "anyone".to_string(),
        Some(pb::authorization::Authentication::MeshTls(m)) => {
            let mut parts: Vec<String> = m.identities.clone();
            parts.extend(m.namespaces.iter().map(|n| format!("ns:{n}")));
            if m.any {
                parts.push("any-mesh".into());
            }
            parts.join(",")
        }
        None => "none".into(),
    };
    let networks: Vec<String> = a
        .networks
        .iter()
        .map(|n| {
            let mut s = n.net.as_ref().map(net).unwrap_or_default();
            for e in &n.except {
                s.push_str(&format!(" except {}", net(e)));
            }
            s
        })
        .collect();
    if networks.is_empty() {
        format!("{}: {who}", a.name)
    } else {
        format!("{}: {who} @ {}", a.name, networks.join("; "))
    }
}

fn rendered(s: &pb::InboundServer) -> Vec<String> {
    s.authorizations.iter().map(render).collect()
}

/// Routes rendered: `kind/name rule: METHOD path [authorizations]`.
fn routes(s: &pb::InboundServer) -> Vec<String> {
    s.routes
        .iter()
        .map(|r| {
            let rr = r.r#ref.clone().unwrap_or_default();
            let m = r.matches.first().cloned().unwrap_or_default();
            let path = match m.path.and_then(|p| p.kind) {
                Some(dpb::path_match::Kind::Exact(p)) => format!("={p}"),
                Some(dpb::path_match::Kind::Prefix(p)) => format!("{p}*"),
                Some(dpb::path_match::Kind::Regex(p)) => format!("~{p}"),
                None => "*".into(),
            };
            let auths: Vec<String> = r.authorizations.iter().map(|a| a.name.clone()).collect();
            format!(
                "{}/{} {}: {}{path} [{}]",
                rr.kind,
                rr.name,
                rr.rule,
                if m.method.is_empty() {
                    String::new()
                } else {
                    format!("{} ", m.method)
                },
                auths.join(",")
            )
        })
        .collect()
}

const CLUSTER: &str = "10.0.0.0/8; 172.16.0.0/12; 192.168.0.0/16; fd00::/8";

#[test]
fn no_server_each_default_policy() {
    let index = index("");
    let cases = [
        (
            DefaultPolicy::AllUnauthenticated,
            vec!["default:all-unauthenticated: anyone".to_string()],
            false,
        ),
        (
            DefaultPolicy::AllAuthenticated,
            vec!["default:all-authenticated: any-mesh".to_string()],
            false,
        ),
        (
            DefaultPolicy::ClusterUnauthenticated,
            vec![format!(
                "default:cluster-unauthenticated: anyone @ {CLUSTER}"
            )],
            false,
        ),
        (
            DefaultPolicy::ClusterAuthenticated,
            vec![format!(
                "default:cluster-authenticated: any-mesh @ {CLUSTER}"
            )],
            false,
        ),
        (DefaultPolicy::Deny, vec![], false),
        (DefaultPolicy::Audit, vec![], true),
    ];
    for (policy, want, audit) in cases {
        // Port 9090 has no probe: no routes.
        let s = compile(&index, "web-0", 9090, &config(policy));
        assert_eq!(rendered(&s), want, "{policy}");
        assert_eq!(s.audit, audit, "{policy}");
        assert_eq!(s.source, format!("default:{policy}"));
        assert_eq!(s.default_policy, pb_default(policy) as i32);
        assert_eq!(s.protocol, pb::ProtocolKind::Detect as i32);
        assert!(s.routes.is_empty(), "{policy}: {:?}", s.routes);
    }
    // The pod's opaque-ports annotation makes the default opaque.
    let s = compile(&index, "db-0", 5432, &InboundConfig::default());
    assert_eq!(s.protocol, pb::ProtocolKind::Opaque as i32);
    // An unknown pod gets its namespace's default.
    let s = compile(&index, "nope", 80, &config(DefaultPolicy::Deny));
    assert_eq!(s.source, "default:deny");
}

#[test]
fn annotations_pick_the_default_pod_over_namespace_over_flag() {
    let ns = "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop, annotations: {config.weft.dev/default-inbound-policy: all-authenticated}}\n";
    let index_ns = index(ns);
    let flag = config(DefaultPolicy::Deny);
    assert_eq!(
        compile(&index_ns, "web-0", 9090, &flag).source,
        "default:all-authenticated"
    );
    assert_eq!(
        compile(&index_ns, "unknown", 9090, &flag).source,
        "default:all-authenticated"
    );
    let pod = format!(
        "{ns}---\napiVersion: v1\nkind: Pod\nmetadata: {{name: web-0, namespace: shop, labels: {{app: web}}, annotations: {{config.weft.dev/default-inbound-policy: audit}}}}\nspec: {{containers: [{{name: app}}]}}\n"
    );
    let index_pod = index(&pod);
    let s = compile(&index_pod, "web-0", 9090, &flag);
    assert_eq!((s.source.as_str(), s.audit), ("default:audit", true));
    // A value that does not parse fails closed.
    let bad = pod.replace("audit", "allow-all");
    let s = compile(&index(&bad), "web-0", 9090, &InboundConfig::default());
    assert_eq!(s.source, "default:deny");
}

const SERVER_BY_NAME: &str = "
apiVersion: policy.weft.dev/v1alpha1
kind: Server
metadata: {name: web-http, namespace: shop, creationTimestamp: '2024-01-01T00:00:00Z'}
spec: {podSelector: {matchLabels: {app: web}}, port: http, proxyProtocol: HTTP/1}
";

#[test]
fn server_by_port_number_and_by_name() {
    let index = index(SERVER_BY_NAME);
    let s = compile(&index, "web-0", 8080, &InboundConfig::default());
    assert_eq!(s.source, "server/shop/web-http");
    assert_eq!(s.protocol, pb::ProtocolKind::Http1 as i32);
    assert_eq!(s.default_policy, pb::DefaultPolicy::Deny as i32);
    assert_eq!(s.labels.get("name").map(String::as_str), Some("web-http"));
    assert!(
        rendered(&s).is_empty(),
        "deny by default: {:?}",
        rendered(&s)
    );
    // Another port, another pod: the default.
    assert_eq!(
        compile(&index, "web-0", 9090, &InboundConfig::default()).source,
        "default:all-unauthenticated"
    );
    assert_eq!(
        compile(&index, "db-0", 5432, &InboundConfig::default()).source,
        "default:all-unauthenticated"
    );

    // By number, and two Servers on one port: the older wins.
    let index = index_two_servers();
    let s = compile(&index, "web-0", 9090, &InboundConfig::default());
    assert_eq!(s.source, "server/shop/admin-old");
    assert_eq!(rendered(&s), ["default:all-authenticated: any-mesh"]);
}

fn index_two_servers() -> Index {
    index(
        "
apiVersion: policy.weft.dev/v1alpha1
kind: Server
metadata: {name: admin-new, namespace: shop, creationTimestamp: '2024-02-01T00:00:00Z'}
spec: {podSelector: {}, port: 9090}
---
apiVersion: policy.weft.dev/v1alpha1
kind: Server
metadata: {name: admin-old, namespace: shop, creationTimestamp: '2024-01-01T00:00:00Z'}
spec: {podSelector: {matchExpressions: [{key: app, operator: In, values: [web]}]}, port: 9090, accessPolicy: all-authenticated}
",
    )
}

fn policy(name: &str, target: &str, who: &str) -> String {
    format!(
        "---\napiVersion: policy.weft.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {{name: {name}, namespace: shop}}\nspec:\n  targetRef: {target}\n{who}"
    )
}

const TO_SERVER: &str = "{group: policy.weft.dev, kind: Server, name: web-http}";

#[test]
fn authorization_policies_by_identity_sa_namespace_authenticated_networks() {
    let yaml = [
        SERVER_BY_NAME.to_string(),
        policy(
            "a-ids",
            TO_SERVER,
            "  identities: ['spiffe://cluster.local/ns/x/sa/y']\n",
        ),
        policy(
            "b-sas",
            TO_SERVER,
            "  serviceAccounts: [{name: client}, {name: ops, namespace: tools}]\n",
        ),
        policy("c-ns", TO_SERVER, "  namespaces: [front, back]\n"),
        policy(
            "d-any",
            TO_SERVER,
            "  authenticated: true\n  networks: [{cidr: 10.0.0.0/8, except: [10.9.0.0/16]}]\n",
        ),
        policy(
            "e-lan",
            TO_SERVER,
            "  unauthenticated: true\n  networks: [{cidr: 192.168.1.0/24}, {cidr: 'fd00::/64'}]\n",
        ),
        policy(
            "f-ns-wide",
            "{kind: Namespace, name: shop}",
            "  namespaces: [monitoring]\n",
        ),
        policy(
            "g-other",
            "{group: policy.weft.dev, kind: Server, name: other}",
            "  authenticated: true\n",
        ),
    ]
    .concat();
    let index = index(&yaml);
    let config = InboundConfig {
        trust_domain: "example.org".into(),
        ..InboundConfig::default()
    };
    let s = compile(&index, "web-0", 8080, &config);
    assert_eq!(
        rendered(&s),
        [
            "authorizationpolicy/shop/a-ids: spiffe://cluster.local/ns/x/sa/y",
            "authorizationpolicy/shop/b-sas: spiffe://example.org/ns/shop/sa/client,spiffe://example.org/ns/tools/sa/ops",
            "authorizationpolicy/shop/c-ns: ns:back,ns:front",
            "authorizationpolicy/shop/d-any: any-mesh @ 10.0.0.0/8 except 10.9.0.0/16",
            "authorizationpolicy/shop/e-lan: anyone @ 192.168.1.0/24; fd00::/64",
            "authorizationpolicy/shop/f-ns-wide: ns:monitoring",
        ]
    );
    // Namespace-wide policies apply to Servers only, not to the default.
    assert_eq!(
        rendered(&compile(&index, "web-0", 9090, &config)),
        ["default:all-unauthenticated: anyone"]
    );
}

#[test]
fn route_level_authorization_and_probes() {
    let yaml = [
        SERVER_BY_NAME.to_string(),
        "---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: reads, namespace: shop, creationTimestamp: '2024-01-01T00:00:00Z'}
spec:
  parentRefs: [{group: policy.weft.dev, kind: Server, name: web-http}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /books}, method: GET}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: admin, namespace: shop, creationTimestamp: '2024-01-02T00:00:00Z'}
spec:
  parentRefs: [{group: policy.weft.dev, kind: Server, name: web-http}]
  rules:
  - name: exact
    matches: [{path: {type: Exact, value: /books/admin}}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: mesh-route, namespace: shop}
spec:
  parentRefs: [{group: '', kind: Service, name: web}]
  rules: [{backendRefs: [{name: web, port: 80}]}]
"
        .to_string(),
        policy(
            "readers",
            "{group: gateway.networking.k8s.io, kind: HTTPRoute, name: reads}",
            "  authenticated: true\n",
        ),
        policy(
            "admins",
            "{group: gateway.networking.k8s.io, kind: HTTPRoute, name: admin}",
            "  serviceAccounts: [{name: ops}]\n",
        ),
    ]
    .concat();
    let index = index(&yaml);
    let s = compile(&index, "web-0", 8080, &InboundConfig::default());
    assert!(rendered(&s).is_empty(), "{:?}", rendered(&s));
    assert_eq!(
        routes(&s),
        [
            "default/probe : GET =/ready [default:probe]",
            "httproute/admin exact: =/books/admin [authorizationpolicy/shop/admins]",
            "httproute/reads 0: GET /books* [authorizationpolicy/shop/readers]",
        ]
    );
    let probe = &s.routes[0].authorizations[0];
    assert_eq!(render(probe), "default:probe: anyone");
}

#[test]
fn probes_do_not_widen_and_audit() {
    // No Server, deny: the probe route, then a catch-all without authorizations.
    let index = index("");
    let s = compile(&index, "web-0", 8080, &config(DefaultPolicy::Deny));
    assert!(s.authorizations.is_empty());
    assert_eq!(
        routes(&s),
        [
            "default/probe : GET =/ready [default:probe]",
            "default/default : /* []"
        ]
    );
    // Open already: nothing added.
    assert!(compile(&index, "web-0", 8080, &InboundConfig::default())
        .routes
        .is_empty());
    // cluster-unauthenticated is not open to every network: probes added.
    let s = compile(
        &index,
        "web-0",
        8080,
        &config(DefaultPolicy::ClusterUnauthenticated),
    );
    assert_eq!(s.routes.len(), 2);
    // Audit Server: nothing allowed besides the policies, audit set.
    let audit = SERVER_BY_NAME.replace("proxyProtocol: HTTP/1", "accessPolicy: audit");
    let s = compile(
        &super::tests::index(&audit),
        "web-0",
        8080,
        &InboundConfig::default(),
    );
    assert!(s.audit);
    assert_eq!(s.default_policy, pb::DefaultPolicy::Audit as i32);
    assert!(s.authorizations.is_empty());
    // Opaque Server: the proxy cannot see paths, so no probe route.
    let opaque = SERVER_BY_NAME.replace("HTTP/1", "opaque");
    let s = compile(
        &super::tests::index(&opaque),
        "web-0",
        8080,
        &InboundConfig::default(),
    );
    assert!(s.routes.is_empty());
}

#[test]
fn topics_are_the_pod_and_its_namespace() {
    let index = index(SERVER_BY_NAME);
    let (_, topics) = inbound_server(
        &index.read(),
        "shop",
        "web-0",
        8080,
        &InboundConfig::default(),
    );
    assert_eq!(
        topics,
        [
            Topic::Pod(ObjectKey::new("shop", "web-0")),
            Topic::Inbound("shop".into())
        ]
    );
}

/// The proto's rule for an unauthenticated HTTP client from `ip` (what the
/// proxy decides; only Exact/Prefix paths and methods occur here).
fn allows(s: &pb::InboundServer, method: &str, path: &str, ip: IpAddr) -> bool {
    let admits = |a: &pb::Authorization| {
        let in_net = a.networks.is_empty()
            || a.networks.iter().any(|n| {
                let net = n.net.as_ref().expect("net");
                let cidr = |x: &IpNetwork| {
                    let addr: IpAddr = match x.ip.len() {
                        4 => IpAddr::from(<[u8; 4]>::try_from(x.ip.as_slice()).expect("v4")),
                        _ => IpAddr::from(<[u8; 16]>::try_from(x.ip.as_slice()).expect("v6")),
                    };
                    Cidr::new(addr, u8::try_from(x.prefix_len).expect("len")).expect("cidr")
                };
                cidr(net).contains(ip) && !n.except.iter().any(|e| cidr(e).contains(ip))
            });
        in_net
            && matches!(
                a.authentication,
                Some(pb::authorization::Authentication::Unauthenticated(_))
            )
    };
    let top = s.authorizations.iter().any(admits);
    if s.routes.is_empty() {
        return top || s.audit;
    }
    let matched = s.routes.iter().find(|r| {
        r.matches.iter().any(|m| {
            let path_ok = match m.path.as_ref().and_then(|p| p.kind.as_ref()) {
                Some(dpb::path_match::Kind::Exact(p)) => p == path,
                Some(dpb::path_match::Kind::Prefix(p)) => {
                    p == "/" || path == p || path.starts_with(&format!("{p}/"))
                }
                _ => false,
            };
            path_ok && (m.method.is_empty() || m.method == method)
        })
    });
    match matched {
        None => false,
        Some(r) => top || r.authorizations.iter().any(admits) || s.audit,
    }
}

proptest::proptest! {
    /// Probes are allowed on their paths with GET under every default policy, and nothing
    /// else changes: any other request is decided as without probes.
    #[test]
    fn probes_allow_their_paths_and_widen_nothing(
        policy in proptest::sample::select(DefaultPolicy::ALL.to_vec()),
        probe_paths in proptest::collection::btree_set("/[a-c]{1,3}", 1..3),
        method in proptest::sample::select(vec!["GET", "POST", "HEAD"]),
        path in "/[a-c]{1,4}",
        ip in proptest::sample::select(vec!["10.1.2.3", "192.0.2.1", "fd00::5", "2001:db8::1"]),
    ) {
        let ip: IpAddr = ip.parse().expect("ip");
        let pod = |probes: bool| Pod {
            key: ObjectKey::new("shop", "p"),
            ips: vec![],
            labels: Default::default(),
            service_account: "default".into(),
            meshed: true,
            container_ports: vec![],
            opaque_ports: Default::default(),
            terminated: false,
            proxy_inbound_port: crate::model::DEFAULT_PROXY_INBOUND_PORT,
            inbound: crate::model::PodInbound {
                default_policy: None,
                http_probes: if probes {
                    probe_paths
                        .iter()
                        .map(|p| crate::model::HttpProbe { port: 8080, path: p.clone() })
                        .collect()
                } else {
                    vec![]
                },
            },
        };
        let compile_with = |probes: bool| {
            let index = Index::new();
            index.apply([Change::Upsert(crate::model::Object::Pod(pod(probes)))]);
            compile_in(&index, "p", &config(policy))
        };
        let (with, without) = (compile_with(true), compile_with(false));
        if method == "GET" && probe_paths.contains(&path) {
            proptest::prop_assert!(allows(&with, method, &path, ip));
        } else {
            proptest::prop_assert_eq!(
                allows(&with, method, &path, ip),
                allows(&without, method, &path, ip)
            );
        }
    }
}

fn compile_in(index: &Index, pod: &str, config: &InboundConfig) -> pb::InboundServer {
    inbound_server(&index.read(), "shop", pod, 8080, config).0
}

#[test]
fn namespace_sets_follow_upserts_and_deletes() {
    let index = index_two_servers();
    let names = |index: &Index| -> Vec<String> {
        index
            .read()
            .servers_in("shop")
            .map(|s| s.meta.key.name.clone())
            .collect()
    };
    assert_eq!(names(&index), ["admin-new", "admin-old"]);
    index.apply([Change::Delete(
        Kind::Server,
        ObjectKey::new("shop", "admin-old"),
    )]);
    assert_eq!(names(&index), ["admin-new"]);
    assert_eq!(
        compile(&index, "web-0", 9090, &InboundConfig::default()).source,
        "server/shop/admin-new"
    );
    index.apply([Change::Delete(
        Kind::Server,
        ObjectKey::new("shop", "admin-new"),
    )]);
    assert!(index.read().servers_by_namespace.is_empty());
}

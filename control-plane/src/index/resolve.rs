//! Target → endpoints, a pure function of the index state.
//!
//! Rules (documented choices):
//! - A Service name resolves through the service port equal to the
//!   requested port (TCP). A port the service does not expose is "does not
//!   exist", so the proxy forwards unchanged. A headless service with no
//!   ports passes the requested port through to its endpoints.
//! - A ClusterIP:port resolves like the service's name. A pod IP:port is
//!   that one pod at that port (without a zone: pods do not carry one).
//! - Endpoints are the **ready** addresses of the service's slices. When no
//!   address is ready, addresses that are **serving and terminating** are
//!   used instead, as kube-proxy does (KEP-1669), so a rollout that
//!   terminates the last pods still drains to them rather than failing.
//! - Named target ports resolve per endpoint ([`crate::model::ports::endpoint_port`]);
//!   an endpoint whose port cannot be resolved is left out.
//! - An endpoint whose pod is meshed gets the pod's SPIFFE identity and the
//!   H2 protocol hint (opaque if the pod lists the port as opaque).
//! - Labels are bounded for metrics: namespace, service, pod, serviceaccount.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use crate::model::names::Target;
use crate::model::{ports, spiffe_id, AddressType, ObjectKey, Pod, Service};

use super::{State, Topic};

/// Settings the answer depends on.
#[derive(Clone, Debug)]
pub struct ResolveConfig {
    /// SPIFFE trust domain of expected identities.
    pub trust_domain: String,
}

impl Default for ResolveConfig {
    fn default() -> Self {
        ResolveConfig {
            trust_domain: "cluster.local".into(),
        }
    }
}

/// The mesh's view of one endpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointInfo {
    pub addr: SocketAddr,
    pub weight: u32,
    /// Expected SPIFFE identity; `Some` exactly when the pod is meshed.
    pub identity: Option<String>,
    pub hint: Hint,
    pub zone: Option<String>,
    pub labels: BTreeMap<String, String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hint {
    Unknown,
    H2,
    Opaque,
}

/// The answer for a target.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Resolution {
    /// The controller does not know the target.
    Unknown,
    /// A known target and its endpoints (possibly none).
    Endpoints(BTreeMap<SocketAddr, EndpointInfo>),
}

/// Resolves `target` and lists the topics the answer depends on.
pub fn resolve(state: &State, target: &Target, config: &ResolveConfig) -> (Resolution, Vec<Topic>) {
    match target {
        Target::External { .. } => (Resolution::Unknown, Vec::new()),
        Target::Service {
            namespace,
            name,
            port,
        } => {
            let key = ObjectKey::new(namespace.clone(), name.clone());
            let topics = vec![Topic::Service(key.clone())];
            let resolution = match state.services.get(&key) {
                Some(svc) => service_endpoints(state, svc, *port, config),
                None => Resolution::Unknown,
            };
            (resolution, topics)
        }
        Target::Addr(addr) => {
            let mut topics = vec![Topic::Ip(addr.ip())];
            if let Some(key) = state
                .by_cluster_ip
                .get(&addr.ip())
                .and_then(|keys| keys.iter().next())
            {
                topics.push(Topic::Service(key.clone()));
                let resolution = match state.services.get(key) {
                    Some(svc) => service_endpoints(state, svc, addr.port(), config),
                    None => Resolution::Unknown,
                };
                return (resolution, topics);
            }
            let pod = state
                .pods_by_ip
                .get(&addr.ip())
                .into_iter()
                .flatten()
                .filter_map(|k| state.pods.get(k))
                .find(|p| !p.terminated);
            let resolution = match pod {
                Some(pod) => {
                    let info = endpoint_info(*addr, Some(pod), None, None, config);
                    Resolution::Endpoints(BTreeMap::from([(*addr, info)]))
                }
                None => Resolution::Unknown,
            };
            (resolution, topics)
        }
    }
}

fn service_endpoints(
    state: &State,
    svc: &Service,
    port: u16,
    config: &ResolveConfig,
) -> Resolution {
    let svc_port = svc.port(port);
    if svc_port.is_none() && !(svc.headless && svc.ports.is_empty()) {
        return Resolution::Unknown;
    }
    let mut ready = BTreeMap::new();
    let mut fallback = BTreeMap::new();
    let slice_names = state.slices_by_service.get(&svc.key).into_iter().flatten();
    for slice in slice_names.filter_map(|n| {
        state
            .slices
            .get(&ObjectKey::new(svc.key.namespace.clone(), n.clone()))
    }) {
        if slice.address_type == AddressType::Fqdn {
            continue;
        }
        for ep in &slice.endpoints {
            let use_it = if ep.ready {
                &mut ready
            } else if ep.serving && ep.terminating {
                &mut fallback
            } else {
                continue;
            };
            let pod = ep
                .pod
                .as_ref()
                .and_then(|p| {
                    state
                        .pods
                        .get(&ObjectKey::new(svc.key.namespace.clone(), p.clone()))
                })
                .map(|p| p.as_ref());
            let target_port = match svc_port {
                Some(sp) => ports::endpoint_port(sp, slice, pod),
                None => Some(port),
            };
            let Some(target_port) = target_port else {
                tracing::debug!(service = %svc.key, slice = %slice.key, pod = ?ep.pod, port, "endpoint has no port for this service port; skipped");
                continue;
            };
            for ip in &ep.addresses {
                let addr = SocketAddr::new(*ip, target_port);
                use_it.entry(addr).or_insert_with(|| {
                    endpoint_info(addr, pod, Some(svc), ep.zone.clone(), config)
                });
            }
        }
    }
    Resolution::Endpoints(if ready.is_empty() { fallback } else { ready })
}

fn endpoint_info(
    addr: SocketAddr,
    pod: Option<&Pod>,
    svc: Option<&Service>,
    zone: Option<String>,
    config: &ResolveConfig,
) -> EndpointInfo {
    let mut labels = BTreeMap::new();
    if let Some(svc) = svc {
        labels.insert("namespace".into(), svc.key.namespace.clone());
        labels.insert("service".into(), svc.key.name.clone());
    }
    let (identity, hint) = match pod {
        Some(pod) => {
            labels.insert("namespace".into(), pod.key.namespace.clone());
            labels.insert("pod".into(), pod.key.name.clone());
            labels.insert("serviceaccount".into(), pod.service_account.clone());
            if pod.meshed {
                let hint = if pod.opaque_ports.contains(addr.port()) {
                    Hint::Opaque
                } else {
                    Hint::H2
                };
                (
                    Some(spiffe_id(
                        &config.trust_domain,
                        &pod.key.namespace,
                        &pod.service_account,
                    )),
                    hint,
                )
            } else {
                (None, Hint::Unknown)
            }
        }
        None => (None, Hint::Unknown),
    };
    EndpointInfo {
        addr,
        weight: 1,
        identity,
        hint,
        zone,
        labels,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::{Change, Index};
    use crate::model::names::parse_target;
    use crate::model::{
        ContainerPort, EndpointSlice, Object, PortSet, ServicePort, SliceEndpoint, SlicePort,
        TargetPort,
    };
    use std::net::IpAddr;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    fn service(
        ns: &str,
        name: &str,
        cluster_ip: Option<&str>,
        ports: &[(Option<&str>, u16, TargetPort)],
    ) -> Object {
        Object::Service(Service {
            key: ObjectKey::new(ns, name),
            cluster_ips: cluster_ip.map(ip).into_iter().collect(),
            headless: cluster_ip.is_none(),
            ports: ports
                .iter()
                .map(|(n, p, t)| ServicePort {
                    name: n.map(String::from),
                    port: *p,
                    target_port: t.clone(),
                    protocol: "TCP".into(),
                    node_port: None,
                })
                .collect(),
            selector: None,
            affinity_timeout_s: None,
            external_traffic_local: false,
        })
    }

    struct Ep<'a> {
        ip: &'a str,
        pod: Option<&'a str>,
        ready: bool,
        serving: bool,
        terminating: bool,
    }

    fn ready<'a>(ip: &'a str, pod: Option<&'a str>) -> Ep<'a> {
        Ep {
            ip,
            pod,
            ready: true,
            serving: true,
            terminating: false,
        }
    }

    fn slice(
        ns: &str,
        name: &str,
        svc: &str,
        ports: &[(Option<&str>, u16)],
        eps: &[Ep<'_>],
    ) -> Object {
        Object::EndpointSlice(EndpointSlice {
            key: ObjectKey::new(ns, name),
            service: Some(svc.into()),
            address_type: AddressType::IPv4,
            ports: ports
                .iter()
                .map(|(n, p)| SlicePort {
                    name: n.map(String::from),
                    port: Some(*p),
                    protocol: "TCP".into(),
                })
                .collect(),
            endpoints: eps
                .iter()
                .map(|e| SliceEndpoint {
                    addresses: vec![ip(e.ip)],
                    ready: e.ready,
                    serving: e.serving,
                    terminating: e.terminating,
                    zone: Some("zone-a".into()),
                    pod: e.pod.map(String::from),
                })
                .collect(),
        })
    }

    fn pod(ns: &str, name: &str, pod_ip: &str, meshed: bool, ports: &[(&str, u16)]) -> Object {
        Object::Pod(Pod {
            key: ObjectKey::new(ns, name),
            ips: vec![ip(pod_ip)],
            labels: Default::default(),
            service_account: "web-sa".into(),
            meshed,
            container_ports: ports
                .iter()
                .map(|(n, p)| ContainerPort {
                    name: Some(n.to_string()),
                    port: *p,
                    protocol: "TCP".into(),
                    container: "app".into(),
                })
                .collect(),
            opaque_ports: "3306".parse().unwrap_or(PortSet::default()),
            terminated: false,
            proxy_inbound_port: crate::model::DEFAULT_PROXY_INBOUND_PORT,
            inbound: Default::default(),
        })
    }

    fn fixture() -> Index {
        let index = Index::new();
        let http = || TargetPort::Name("http".into());
        index.apply(
            [
                service(
                    "shop",
                    "web",
                    Some("10.96.0.10"),
                    &[
                        (Some("http"), 80, http()),
                        (Some("db"), 3306, TargetPort::Number(3306)),
                    ],
                ),
                slice(
                    "shop",
                    "web-1",
                    "web",
                    &[],
                    &[
                        ready("10.1.0.1", Some("web-a")),
                        ready("10.1.0.2", Some("web-b")),
                    ],
                ),
                pod("shop", "web-a", "10.1.0.1", true, &[("http", 8080)]),
                pod("shop", "web-b", "10.1.0.2", false, &[("http", 9090)]),
                service(
                    "shop",
                    "api",
                    Some("10.96.0.11"),
                    &[(None, 8080, TargetPort::Number(8080))],
                ),
                slice(
                    "shop",
                    "api-1",
                    "api",
                    &[(None, 8080)],
                    &[
                        ready("10.1.1.1", None),
                        Ep {
                            ip: "10.1.1.2",
                            pod: None,
                            ready: false,
                            serving: true,
                            terminating: true,
                        },
                        Ep {
                            ip: "10.1.1.3",
                            pod: None,
                            ready: false,
                            serving: false,
                            terminating: false,
                        },
                    ],
                ),
                service(
                    "shop",
                    "draining",
                    Some("10.96.0.12"),
                    &[(None, 80, TargetPort::Number(80))],
                ),
                slice(
                    "shop",
                    "draining-1",
                    "draining",
                    &[(None, 80)],
                    &[
                        Ep {
                            ip: "10.1.2.1",
                            pod: None,
                            ready: false,
                            serving: true,
                            terminating: true,
                        },
                        Ep {
                            ip: "10.1.2.2",
                            pod: None,
                            ready: false,
                            serving: false,
                            terminating: true,
                        },
                    ],
                ),
                service("data", "db", None, &[]),
                slice(
                    "data",
                    "db-1",
                    "db",
                    &[],
                    &[ready("10.2.0.1", None), ready("10.2.0.2", None)],
                ),
                service(
                    "shop",
                    "empty",
                    Some("10.96.0.13"),
                    &[(None, 80, TargetPort::Number(80))],
                ),
            ]
            .into_iter()
            .map(Change::Upsert),
        );
        index
    }

    fn addrs(index: &Index, target: &str, caller: &str) -> Option<Vec<String>> {
        let t = parse_target(target, caller, "cluster.local").expect("valid target");
        match index.resolve(&t, &ResolveConfig::default()).0 {
            Resolution::Unknown => None,
            Resolution::Endpoints(set) => Some(set.keys().map(|a| a.to_string()).collect()),
        }
    }

    #[test]
    fn table() {
        let index = fixture();
        let web = Some(vec![
            "10.1.0.1:8080".to_string(),
            "10.1.0.2:9090".to_string(),
        ]);
        let cases: Vec<(&str, &str, Option<Vec<String>>)> = vec![
            ("web:80", "shop", web.clone()),
            ("web.shop:80", "other", web.clone()),
            ("web.shop.svc:80", "other", web.clone()),
            ("web.shop.svc.cluster.local:80", "other", web.clone()),
            ("10.96.0.10:80", "other", web.clone()),
            ("web:80", "other", None),
            ("web.shop:81", "other", None),
            ("10.96.0.10:81", "other", None),
            ("api.shop:8080", "x", Some(vec!["10.1.1.1:8080".into()])),
            ("draining.shop:80", "x", Some(vec!["10.1.2.1:80".into()])),
            (
                "db.data:5432",
                "x",
                Some(vec!["10.2.0.1:5432".into(), "10.2.0.2:5432".into()]),
            ),
            ("empty.shop:80", "x", Some(vec![])),
            ("10.1.0.2:9090", "x", Some(vec!["10.1.0.2:9090".into()])),
            ("10.1.0.2:1234", "x", Some(vec!["10.1.0.2:1234".into()])),
            ("10.9.9.9:80", "x", None),
            ("www.example.com:443", "x", None),
        ];
        for (target, caller, want) in cases {
            assert_eq!(
                addrs(&index, target, caller),
                want,
                "{target} from {caller}"
            );
        }
    }

    #[test]
    fn endpoint_metadata() {
        let index = fixture();
        let t = parse_target("web.shop:80", "", "cluster.local").expect("target");
        let Resolution::Endpoints(set) = index
            .resolve(
                &t,
                &ResolveConfig {
                    trust_domain: "example.org".into(),
                },
            )
            .0
        else {
            panic!("web.shop should resolve");
        };
        let meshed = &set[&"10.1.0.1:8080".parse().expect("addr")];
        assert_eq!(
            meshed.identity.as_deref(),
            Some("spiffe://example.org/ns/shop/sa/web-sa")
        );
        assert_eq!(meshed.hint, Hint::H2);
        assert_eq!(meshed.zone.as_deref(), Some("zone-a"));
        assert_eq!(meshed.labels.get("pod").map(String::as_str), Some("web-a"));
        assert_eq!(
            meshed.labels.get("service").map(String::as_str),
            Some("web")
        );
        let plain = &set[&"10.1.0.2:9090".parse().expect("addr")];
        assert_eq!((plain.identity.as_ref(), plain.hint), (None, Hint::Unknown));
        // Opaque port on a meshed pod, by pod IP.
        let t = parse_target("10.1.0.1:3306", "", "cluster.local").expect("target");
        let Resolution::Endpoints(set) = index.resolve(&t, &ResolveConfig::default()).0 else {
            panic!("pod ip should resolve");
        };
        assert_eq!(set.values().next().map(|e| e.hint), Some(Hint::Opaque));
    }

    #[test]
    fn pod_changes_reach_service_readers() {
        let index = fixture();
        let t = parse_target("web.shop:80", "", "cluster.local").expect("target");
        let (_, mut rx) = index.resolve(&t, &ResolveConfig::default());
        // A pod's container port renamed: the named target port moves.
        index.apply([Change::Upsert(pod(
            "shop",
            "web-b",
            "10.1.0.2",
            false,
            &[("http", 9999)],
        ))]);
        assert!(rx.iter_mut().any(|r| r.has_changed().unwrap_or(false)));
        assert!(addrs(&index, "web.shop:80", "")
            .expect("known")
            .contains(&"10.1.0.2:9999".to_string()));
        // An unrelated change does not wake the reader.
        let (_, mut rx) = index.resolve(&t, &ResolveConfig::default());
        index.apply([Change::Upsert(service(
            "other",
            "x",
            Some("10.96.9.9"),
            &[],
        ))]);
        assert!(!rx.iter_mut().any(|r| r.has_changed().unwrap_or(false)));
        // Deleting the slice empties the service.
        index.apply([Change::Delete(
            crate::model::Kind::EndpointSlice,
            ObjectKey::new("shop", "web-1"),
        )]);
        assert!(rx.iter_mut().any(|r| r.has_changed().unwrap_or(false)));
        assert_eq!(addrs(&index, "web.shop:80", ""), Some(vec![]));
    }

    #[test]
    fn equal_upserts_are_not_changes() {
        let index = fixture();
        let again = index.apply([Change::Upsert(pod(
            "shop",
            "web-a",
            "10.1.0.1",
            true,
            &[("http", 8080)],
        ))]);
        assert_eq!(again.changed, 0);
    }

    #[test]
    fn reset_deletes_what_is_missing() {
        let index = fixture();
        let applied = index.reset(
            crate::model::Kind::Service,
            vec![service("shop", "web", Some("10.96.0.10"), &[])],
        );
        assert!(applied.changed >= 5, "{applied:?}");
        assert_eq!(index.counts()[&crate::model::Kind::Service], 1);
        assert_eq!(addrs(&index, "10.96.0.11:8080", ""), None);
        // Reverse maps follow deletes.
        assert!(!index.read().by_cluster_ip.contains_key(&ip("10.96.0.11")));
    }
}

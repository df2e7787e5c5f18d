//! Ports: a Service's `targetPort` (number or container-port name), the
//! named-port resolution rule, and the comma-separated port lists used in
//! Weft annotations and environment variables.

use std::fmt;
use std::ops::RangeInclusive;
use std::str::FromStr;

use super::{ContainerPort, EndpointSlice, Pod, ServicePort};

/// A Service's `targetPort`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TargetPort {
    Number(u16),
    /// The name of a container port of each backend pod.
    Name(String),
}

impl fmt::Display for TargetPort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TargetPort::Number(n) => write!(f, "{n}"),
            TargetPort::Name(n) => f.write_str(n),
        }
    }
}

/// A container port named `name` (TCP), as Kubernetes resolves a named
/// `targetPort` for one pod.
pub fn container_port_named<'a>(
    ports: &'a [ContainerPort],
    name: &str,
) -> Option<&'a ContainerPort> {
    ports
        .iter()
        .find(|p| p.name.as_deref() == Some(name) && p.protocol.eq_ignore_ascii_case("TCP"))
}

/// The port of one pod that a service port sends to: a number as is, a
/// name looked up in the pod's container ports.
pub fn resolve_target_port(target: &TargetPort, pod: Option<&Pod>) -> Option<u16> {
    match target {
        TargetPort::Number(n) => Some(*n),
        TargetPort::Name(name) => {
            pod.and_then(|p| container_port_named(&p.container_ports, name).map(|c| c.port))
        }
    }
}

/// The port to dial for an endpoint of `slice` serving `svc_port`.
///
/// The EndpointSlice controller has already resolved named target ports per
/// pod and groups endpoints with the same numbers into one slice, so the
/// slice port with the service port's name wins. Hand-written slices (the
/// directory source) may omit ports: then the service's `targetPort` is
/// resolved against the endpoint's pod.
pub fn endpoint_port(
    svc_port: &ServicePort,
    slice: &EndpointSlice,
    pod: Option<&Pod>,
) -> Option<u16> {
    let want = svc_port.name.as_deref().unwrap_or("");
    let from_slice = slice
        .ports
        .iter()
        .find(|p| p.name.as_deref().unwrap_or("") == want && p.protocol.eq_ignore_ascii_case("TCP"))
        .and_then(|p| p.port);
    from_slice.or_else(|| resolve_target_port(&svc_port.target_port, pod))
}

/// A set of TCP ports written as `"80,443,8000-8100"`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PortSet(Vec<RangeInclusive<u16>>);

/// A port list that does not parse; names the bad element.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{element:?} in port list {list:?} is not a port (1-65535) or a range like 8000-8100")]
pub struct PortSetError {
    pub list: String,
    pub element: String,
}

impl PortSet {
    pub fn contains(&self, port: u16) -> bool {
        self.0.iter().any(|r| r.contains(&port))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl FromStr for PortSet {
    type Err = PortSetError;
    fn from_str(list: &str) -> Result<Self, PortSetError> {
        let mut ranges = Vec::new();
        for element in list.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            let err = || PortSetError {
                list: list.to_string(),
                element: element.to_string(),
            };
            let port = |s: &str| match s.trim().parse::<u16>() {
                Ok(p) if p > 0 => Ok(p),
                _ => Err(err()),
            };
            let range = match element.split_once('-') {
                Some((lo, hi)) => {
                    let (lo, hi) = (port(lo)?, port(hi)?);
                    if lo > hi {
                        return Err(err());
                    }
                    lo..=hi
                }
                None => {
                    let p = port(element)?;
                    p..=p
                }
            };
            ranges.push(range);
        }
        Ok(PortSet(ranges))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{AddressType, ObjectKey, SlicePort};
    use proptest::prelude::*;

    fn pod(ports: &[(&str, u16)]) -> Pod {
        Pod {
            key: ObjectKey::new("ns", "p"),
            ips: vec![],
            labels: Default::default(),
            service_account: "default".into(),
            meshed: false,
            container_ports: ports
                .iter()
                .map(|(n, p)| ContainerPort {
                    name: Some(n.to_string()),
                    port: *p,
                    protocol: "TCP".into(),
                    container: "app".into(),
                })
                .collect(),
            opaque_ports: PortSet::default(),
            terminated: false,
            proxy_inbound_port: crate::DEFAULT_PROXY_INBOUND_PORT,
            inbound: Default::default(),
        }
    }

    fn svc_port(name: Option<&str>, target: TargetPort) -> ServicePort {
        ServicePort {
            name: name.map(String::from),
            port: 80,
            target_port: target,
            protocol: "TCP".into(),
            node_port: None,
        }
    }

    fn slice(ports: &[(Option<&str>, Option<u16>)]) -> EndpointSlice {
        EndpointSlice {
            key: ObjectKey::new("ns", "s"),
            service: Some("web".into()),
            address_type: AddressType::IPv4,
            ports: ports
                .iter()
                .map(|(n, p)| SlicePort {
                    name: n.map(String::from),
                    port: *p,
                    protocol: "TCP".into(),
                })
                .collect(),
            endpoints: vec![],
        }
    }

    #[test]
    fn endpoint_port_table() {
        let http = || TargetPort::Name("http".into());
        let p8080 = pod(&[("http", 8080), ("admin", 9000)]);
        let p9090 = pod(&[("http", 9090)]);
        #[allow(clippy::type_complexity)]
        let cases: Vec<(&str, ServicePort, EndpointSlice, Option<&Pod>, Option<u16>)> = vec![
            (
                "numeric target, no slice ports",
                svc_port(None, TargetPort::Number(8080)),
                slice(&[]),
                None,
                Some(8080),
            ),
            (
                "named target from pod",
                svc_port(Some("web"), http()),
                slice(&[]),
                Some(&p8080),
                Some(8080),
            ),
            (
                "named target differs per pod",
                svc_port(Some("web"), http()),
                slice(&[]),
                Some(&p9090),
                Some(9090),
            ),
            (
                "named target, pod lacks the name",
                svc_port(Some("web"), TargetPort::Name("grpc".into())),
                slice(&[]),
                Some(&p8080),
                None,
            ),
            (
                "named target, no pod",
                svc_port(Some("web"), http()),
                slice(&[]),
                None,
                None,
            ),
            (
                "slice port by service port name wins",
                svc_port(Some("web"), http()),
                slice(&[(Some("web"), Some(7000))]),
                Some(&p8080),
                Some(7000),
            ),
            (
                "unnamed service port matches unnamed slice port",
                svc_port(None, http()),
                slice(&[(None, Some(7001))]),
                None,
                Some(7001),
            ),
            (
                "empty name equals unset name",
                svc_port(Some(""), http()),
                slice(&[(None, Some(7002))]),
                None,
                Some(7002),
            ),
            (
                "other slice port name falls back to pod",
                svc_port(Some("web"), http()),
                slice(&[(Some("metrics"), Some(1))]),
                Some(&p8080),
                Some(8080),
            ),
            (
                "slice port without number falls back",
                svc_port(Some("web"), TargetPort::Number(81)),
                slice(&[(Some("web"), None)]),
                None,
                Some(81),
            ),
        ];
        for (name, sp, sl, pod, want) in cases {
            assert_eq!(endpoint_port(&sp, &sl, pod), want, "{name}");
        }
    }

    #[test]
    fn port_set_table() {
        let ok: Vec<(&str, Vec<u16>, Vec<u16>)> = vec![
            ("", vec![], vec![1, 80]),
            ("80", vec![80], vec![81]),
            (
                " 25, 3306 ,8000-8002",
                vec![25, 3306, 8000, 8001, 8002],
                vec![8003, 26],
            ),
            ("1-65535", vec![1, 65535], vec![]),
        ];
        for (list, inside, outside) in ok {
            let set: PortSet = list.parse().expect(list);
            for p in inside {
                assert!(set.contains(p), "{list} should contain {p}");
            }
            for p in outside {
                assert!(!set.contains(p), "{list} should not contain {p}");
            }
        }
        for bad in ["x", "0", "70000", "90-80", "1-", "80,,http"] {
            let err = bad.parse::<PortSet>().expect_err(bad);
            assert!(err.to_string().contains(&format!("{bad:?}")), "{err}");
        }
    }

    proptest! {
        #[test]
        fn port_set_never_panics(s in ".{0,40}") {
            let _ = s.parse::<PortSet>();
        }

        #[test]
        fn port_set_contains_what_it_lists(ports in proptest::collection::vec(1u16.., 1..10)) {
            let list = ports.iter().map(u16::to_string).collect::<Vec<_>>().join(",");
            let set: PortSet = list.parse().map_err(|e: PortSetError| TestCaseError::fail(e.to_string()))?;
            for p in ports {
                prop_assert!(set.contains(p));
            }
        }

        #[test]
        fn numeric_target_ignores_pod(n in any::<u16>(), names in proptest::collection::vec("[a-z]{1,5}", 0..4)) {
            let ports: Vec<(&str, u16)> = names.iter().map(|s| (s.as_str(), 1)).collect();
            let p = pod(&ports);
            prop_assert_eq!(resolve_target_port(&TargetPort::Number(n), Some(&p)), Some(n));
        }
    }
}

//! What a Resolve target names: a Service by DNS name, or an address.
//!
//! The accepted names are those a pod's resolver would expand to a Service:
//! `svc`, `svc.ns`, `svc.ns.svc` and `svc.ns.svc.<cluster-domain>` (an
//! optional trailing dot, any letter case), always with a port. A short name
//! is in the caller's namespace (`default` when the caller did not say).
//! Anything else that has a port is [`Target::External`]: not a cluster name,
//! so the controller answers "does not exist" and the proxy forwards it
//! unchanged. Only a missing or bad port is an error.

use std::net::SocketAddr;

/// The namespace a short name resolves in when the caller sent none.
pub const DEFAULT_NAMESPACE: &str = "default";

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Target {
    /// A Service name in a namespace, with the service port.
    Service {
        namespace: String,
        name: String,
        port: u16,
    },
    /// An IP and port: a ClusterIP or a pod IP.
    Addr(SocketAddr),
    /// A name that cannot be a Service of this cluster.
    External { host: String, port: u16 },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TargetError {
    #[error("target is empty; expected a name or address with a port, like web.shop:80")]
    Empty,
    #[error("target {0:?} has no port; expected host:port, like web.shop:80")]
    MissingPort(String),
    #[error("target {target:?} has port {port:?}; expected a number 1-65535")]
    InvalidPort { target: String, port: String },
}

/// Parses a Resolve target. Pure: the cluster state decides later whether
/// the named Service exists.
pub fn parse_target(
    target: &str,
    caller_namespace: &str,
    cluster_domain: &str,
) -> Result<Target, TargetError> {
    let target = target.trim();
    if target.is_empty() {
        return Err(TargetError::Empty);
    }
    if let Ok(addr) = target.parse::<SocketAddr>() {
        if addr.port() == 0 {
            return Err(TargetError::InvalidPort {
                target: target.to_string(),
                port: "0".into(),
            });
        }
        return Ok(Target::Addr(addr));
    }
    let Some((host, port_str)) = target.rsplit_once(':') else {
        return Err(TargetError::MissingPort(target.to_string()));
    };
    if host.contains(':') || host.starts_with('[') {
        // An IPv6 literal without brackets, or a bracketed one that did not
        // parse above: there is no unambiguous port.
        return Err(TargetError::MissingPort(target.to_string()));
    }
    let port = match port_str.parse::<u16>() {
        Ok(p) if p > 0 => p,
        _ => {
            return Err(TargetError::InvalidPort {
                target: target.to_string(),
                port: port_str.to_string(),
            })
        }
    };
    let host_lc = host.to_ascii_lowercase();
    let external = || Target::External {
        host: host_lc.clone(),
        port,
    };
    let name = host_lc.strip_suffix('.').unwrap_or(&host_lc);
    let labels: Vec<&str> = name.split('.').collect();
    if !labels.iter().all(|l| is_dns_label(l)) {
        return Ok(external());
    }
    let domain = cluster_domain.trim_end_matches('.').to_ascii_lowercase();
    let domain_labels: Vec<&str> = domain.split('.').filter(|l| !l.is_empty()).collect();
    let caller_ns = if caller_namespace.is_empty() {
        DEFAULT_NAMESPACE
    } else {
        caller_namespace
    };
    let service = |name: &str, namespace: &str| Target::Service {
        namespace: namespace.to_string(),
        name: name.to_string(),
        port,
    };
    // A trailing dot means the name is fully qualified: only the full form.
    let fully_qualified = host_lc.ends_with('.');
    Ok(match labels.as_slice() {
        [svc] if !fully_qualified => service(svc, caller_ns),
        [svc, ns] if !fully_qualified => service(svc, ns),
        [svc, ns, "svc"] if !fully_qualified => service(svc, ns),
        [svc, ns, "svc", rest @ ..]
            if !domain_labels.is_empty() && rest == domain_labels.as_slice() =>
        {
            service(svc, ns)
        }
        _ => external(),
    })
}

/// An RFC 1123 label: 1-63 of `a-z0-9-`, not starting or ending with `-`.
pub fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn svc(ns: &str, name: &str, port: u16) -> Result<Target, TargetError> {
        Ok(Target::Service {
            namespace: ns.into(),
            name: name.into(),
            port,
        })
    }

    fn ext(host: &str, port: u16) -> Result<Target, TargetError> {
        Ok(Target::External {
            host: host.into(),
            port,
        })
    }

    #[test]
    fn table() {
        let cases: Vec<(&str, &str, Result<Target, TargetError>)> = vec![
            ("web:80", "shop", svc("shop", "web", 80)),
            ("web:80", "", svc("default", "web", 80)),
            ("web.other:8080", "shop", svc("other", "web", 8080)),
            ("web.other.svc:80", "shop", svc("other", "web", 80)),
            (
                "web.other.svc.cluster.local:80",
                "shop",
                svc("other", "web", 80),
            ),
            (
                "web.other.svc.cluster.local.:80",
                "shop",
                svc("other", "web", 80),
            ),
            (
                "Web.Other.SVC.Cluster.Local:80",
                "shop",
                svc("other", "web", 80),
            ),
            ("  web:80 ", "shop", svc("shop", "web", 80)),
            (
                "web.other.svc.example.org:80",
                "shop",
                ext("web.other.svc.example.org", 80),
            ),
            ("web.other.pod:80", "shop", ext("web.other.pod", 80)),
            ("web.:80", "shop", ext("web.", 80)),
            ("example.com:443", "shop", svc("com", "example", 443)),
            ("www.example.com:443", "shop", ext("www.example.com", 443)),
            ("under_score:80", "shop", ext("under_score", 80)),
            ("-bad:80", "shop", ext("-bad", 80)),
            (
                "10.96.0.10:80",
                "shop",
                Ok(Target::Addr("10.96.0.10:80".parse().expect("addr"))),
            ),
            (
                "[fd00::1]:443",
                "shop",
                Ok(Target::Addr("[fd00::1]:443".parse().expect("addr"))),
            ),
            ("", "shop", Err(TargetError::Empty)),
            ("web", "shop", Err(TargetError::MissingPort("web".into()))),
            (
                "fd00::1",
                "shop",
                Err(TargetError::MissingPort("fd00::1".into())),
            ),
            (
                "web:http",
                "shop",
                Err(TargetError::InvalidPort {
                    target: "web:http".into(),
                    port: "http".into(),
                }),
            ),
            (
                "web:0",
                "shop",
                Err(TargetError::InvalidPort {
                    target: "web:0".into(),
                    port: "0".into(),
                }),
            ),
            (
                "web:65536",
                "shop",
                Err(TargetError::InvalidPort {
                    target: "web:65536".into(),
                    port: "65536".into(),
                }),
            ),
            (
                "10.0.0.1:0",
                "shop",
                Err(TargetError::InvalidPort {
                    target: "10.0.0.1:0".into(),
                    port: "0".into(),
                }),
            ),
        ];
        for (target, ns, want) in cases {
            assert_eq!(
                parse_target(target, ns, "cluster.local"),
                want,
                "target {target:?} from {ns:?}"
            );
        }
    }

    #[test]
    fn custom_cluster_domain() {
        assert_eq!(
            parse_target("a.b.svc.corp.internal:1", "x", "corp.internal."),
            svc("b", "a", 1)
        );
        assert_eq!(
            parse_target("a.b.svc.cluster.local:1", "x", "corp.internal"),
            ext("a.b.svc.cluster.local", 1)
        );
    }

    proptest! {
        #[test]
        fn never_panics(s in ".{0,60}", ns in "[a-z]{0,8}") {
            let _ = parse_target(&s, &ns, "cluster.local");
        }

        /// Every spelling of a service name resolves to the same service.
        #[test]
        fn all_forms_agree(name in "[a-z][a-z0-9-]{0,10}[a-z0-9]", ns in "[a-z][a-z0-9]{0,8}", port in 1u16..) {
            let want = svc(&ns, &name, port);
            prop_assert_eq!(parse_target(&format!("{name}:{port}"), &ns, "cluster.local"), want.clone());
            prop_assert_eq!(parse_target(&format!("{name}.{ns}:{port}"), "elsewhere", "cluster.local"), want.clone());
            prop_assert_eq!(parse_target(&format!("{name}.{ns}.svc:{port}"), "elsewhere", "cluster.local"), want.clone());
            prop_assert_eq!(parse_target(&format!("{name}.{ns}.svc.cluster.local:{port}"), "elsewhere", "cluster.local"), want.clone());
            prop_assert_eq!(parse_target(&format!("{}.{}.SVC.cluster.local.:{port}", name.to_uppercase(), ns), "elsewhere", "cluster.local"), want);
        }

        #[test]
        fn socket_addrs_are_addrs(ip in any::<std::net::IpAddr>(), port in 1u16..) {
            let addr = SocketAddr::new(ip, port);
            prop_assert_eq!(parse_target(&addr.to_string(), "ns", "cluster.local"), Ok(Target::Addr(addr)));
        }
    }
}

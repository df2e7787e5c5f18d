//! `k8s-openapi` NetworkPolicy → [`NetworkPolicy`], with the API server's
//! validation (`pkg/apis/networking/validation`) and defaults. Objects from
//! the directory source never went through an API server, so everything the
//! server would refuse is refused here, naming the policy, the field and the
//! value.

use k8s_openapi::api::networking::v1 as net;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::{
    Cidr, IpBlock, NamespaceScope, NetworkPolicy, PolicyPeer, PolicyTypes, PortMatch, PortSpec,
    Protocol, Rule,
};
use crate::labels::SelectorError;
use crate::{ObjectKey, Selector};

/// A NetworkPolicy Weft cannot enforce as written.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("NetworkPolicy {policy}: field {field} is {value:?}: {reason}")]
pub struct NetpolError {
    /// `namespace/name`.
    pub policy: String,
    /// Path in the object, like `spec.ingress[0].from[1].ipBlock.except[0]`.
    pub field: String,
    pub value: String,
    pub reason: String,
}

struct Ctx {
    policy: String,
}

impl Ctx {
    fn err(
        &self,
        field: impl Into<String>,
        value: impl Into<String>,
        reason: impl Into<String>,
    ) -> NetpolError {
        NetpolError {
            policy: self.policy.clone(),
            field: field.into(),
            value: value.into(),
            reason: reason.into(),
        }
    }

    fn selector(&self, sel: &LabelSelector, path: &str) -> Result<Selector, NetpolError> {
        Selector::from_api(sel).map_err(|e| match e {
            SelectorError::Operator { index, operator } => self.err(
                format!("{path}.matchExpressions[{index}].operator"),
                operator,
                "expected In, NotIn, Exists or DoesNotExist",
            ),
            SelectorError::NoValues {
                index,
                key,
                operator,
            } => self.err(
                format!("{path}.matchExpressions[{index}].values"),
                "",
                format!("{operator} on {key:?} needs at least one value"),
            ),
        })
    }

    fn cidr(&self, value: &str, path: &str) -> Result<Cidr, NetpolError> {
        value
            .parse()
            .map_err(|e: super::CidrError| self.err(path, value, e.to_string()))
    }
}

/// Converts and validates a NetworkPolicy. Objects without a namespace get
/// `default_namespace`.
pub fn network_policy(
    np: &net::NetworkPolicy,
    default_namespace: &str,
) -> Result<NetworkPolicy, NetpolError> {
    let name = np.metadata.name.clone().unwrap_or_default();
    let namespace = np
        .metadata
        .namespace
        .clone()
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| default_namespace.to_string());
    let key = ObjectKey::new(namespace, name);
    let ctx = Ctx {
        policy: if key.name.is_empty() {
            "<unnamed>".into()
        } else {
            key.to_string()
        },
    };
    if key.name.is_empty() {
        return Err(ctx.err("metadata.name", "", "every object needs a name"));
    }
    let spec = np.spec.clone().unwrap_or_default();
    // podSelector is optional since Kubernetes 1.33; missing means {}.
    let pod_selector = match &spec.pod_selector {
        Some(sel) => ctx.selector(sel, "spec.podSelector")?,
        None => Selector::default(),
    };

    let mut ingress = Vec::new();
    for (i, r) in spec.ingress.iter().flatten().enumerate() {
        let path = format!("spec.ingress[{i}]");
        ingress.push(rule(
            &ctx,
            r.from.as_deref().unwrap_or_default(),
            r.ports.as_deref().unwrap_or_default(),
            &path,
            "from",
        )?);
    }
    let mut egress = Vec::new();
    for (i, r) in spec.egress.iter().flatten().enumerate() {
        let path = format!("spec.egress[{i}]");
        egress.push(rule(
            &ctx,
            r.to.as_deref().unwrap_or_default(),
            r.ports.as_deref().unwrap_or_default(),
            &path,
            "to",
        )?);
    }

    let policy_types = match spec.policy_types.as_deref() {
        None | Some([]) => PolicyTypes {
            ingress: true,
            egress: !egress.is_empty(),
        },
        Some(types) => {
            if types.len() > 2 {
                return Err(ctx.err(
                    "spec.policyTypes",
                    types.join(","),
                    "may not list more than two policy types",
                ));
            }
            let mut t = PolicyTypes::default();
            for (i, ty) in types.iter().enumerate() {
                match ty.as_str() {
                    "Ingress" => t.ingress = true,
                    "Egress" => t.egress = true,
                    other => {
                        return Err(ctx.err(
                            format!("spec.policyTypes[{i}]"),
                            other,
                            "expected Ingress or Egress",
                        ))
                    }
                }
            }
            t
        }
    };

    Ok(NetworkPolicy {
        key,
        pod_selector,
        policy_types,
        ingress,
        egress,
    })
}

fn rule(
    ctx: &Ctx,
    peers: &[net::NetworkPolicyPeer],
    ports: &[net::NetworkPolicyPort],
    path: &str,
    peers_field: &str,
) -> Result<Rule, NetpolError> {
    let peers = peers
        .iter()
        .enumerate()
        .map(|(i, p)| peer(ctx, p, &format!("{path}.{peers_field}[{i}]")))
        .collect::<Result<Vec<_>, _>>()?;
    let ports = ports
        .iter()
        .enumerate()
        .map(|(i, p)| port(ctx, p, &format!("{path}.ports[{i}]")))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Rule { peers, ports })
}

fn peer(ctx: &Ctx, p: &net::NetworkPolicyPeer, path: &str) -> Result<PolicyPeer, NetpolError> {
    match (&p.pod_selector, &p.namespace_selector, &p.ip_block) {
        (None, None, None) => Err(ctx.err(
            path,
            "{}",
            "a peer needs podSelector, namespaceSelector or ipBlock",
        )),
        (None, None, Some(block)) => {
            let base = format!("{path}.ipBlock");
            if block.cidr.is_empty() {
                return Err(ctx.err(format!("{base}.cidr"), "", "ipBlock needs a cidr"));
            }
            let cidr = ctx.cidr(&block.cidr, &format!("{base}.cidr"))?;
            let mut except = Vec::new();
            for (i, e) in block.except.iter().flatten().enumerate() {
                let field = format!("{base}.except[{i}]");
                let c = ctx.cidr(e, &field)?;
                if !(cidr.covers(&c) && c.prefix_len() > cidr.prefix_len()) {
                    return Err(ctx.err(
                        field,
                        e.as_str(),
                        format!("must be strictly inside cidr {}", block.cidr),
                    ));
                }
                except.push(c);
            }
            Ok(PolicyPeer::IpBlock(IpBlock { cidr, except }))
        }
        (_, _, Some(_)) => Err(ctx.err(
            path,
            "ipBlock with a selector",
            "ipBlock cannot be combined with podSelector or namespaceSelector (write two peers)",
        )),
        (pods, namespaces, None) => {
            let pods = match pods {
                Some(sel) => ctx.selector(sel, &format!("{path}.podSelector"))?,
                None => Selector::default(),
            };
            let namespaces = match namespaces {
                Some(sel) => NamespaceScope::Matching(
                    ctx.selector(sel, &format!("{path}.namespaceSelector"))?,
                ),
                None => NamespaceScope::Own,
            };
            Ok(PolicyPeer::Pods { pods, namespaces })
        }
    }
}

fn port(ctx: &Ctx, p: &net::NetworkPolicyPort, path: &str) -> Result<PortMatch, NetpolError> {
    let protocol = match p.protocol.as_deref() {
        None => Protocol::Tcp,
        Some(s) => Protocol::parse_k8s(s).ok_or_else(|| {
            ctx.err(
                format!("{path}.protocol"),
                s,
                "unknown protocol: expected TCP, UDP or SCTP (upper case)",
            )
        })?,
    };
    let number = |field: &str, n: i32| -> Result<u16, NetpolError> {
        match u16::try_from(n) {
            Ok(n) if n > 0 => Ok(n),
            _ => Err(ctx.err(
                format!("{path}.{field}"),
                n.to_string(),
                "not a port number 1-65535",
            )),
        }
    };
    let port = match (&p.port, p.end_port) {
        (None, None) => PortSpec::Any,
        (None, Some(end)) => {
            return Err(ctx.err(
                format!("{path}.endPort"),
                end.to_string(),
                "endPort needs a numeric port to start the range",
            ))
        }
        (Some(IntOrString::Int(n)), end) => {
            let lo = number("port", *n)?;
            let hi = match end {
                None => lo,
                Some(e) => {
                    let hi = number("endPort", e)?;
                    if hi < lo {
                        return Err(ctx.err(
                            format!("{path}.endPort"),
                            e.to_string(),
                            format!("must be at least port {lo}"),
                        ));
                    }
                    hi
                }
            };
            PortSpec::Range(lo, hi)
        }
        (Some(IntOrString::String(name)), end) => {
            if let Some(e) = end {
                return Err(ctx.err(
                    format!("{path}.endPort"),
                    e.to_string(),
                    format!("endPort cannot follow the named port {name:?} (ranges need a number)"),
                ));
            }
            if let Some(reason) = invalid_port_name(name) {
                return Err(ctx.err(format!("{path}.port"), name.as_str(), reason));
            }
            PortSpec::Named(name.clone())
        }
    };
    Ok(PortMatch { protocol, port })
}

/// Why `name` is not a valid port name (IANA service name: 1-15 of
/// `a-z0-9-`, at least one letter, no leading, trailing or doubled `-`).
fn invalid_port_name(name: &str) -> Option<String> {
    if name.bytes().all(|b| b.is_ascii_digit()) && !name.is_empty() {
        return Some(format!(
            "a quoted number is a port name, and names need a letter: write {name} without quotes"
        ));
    }
    let ok = (1..=15).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && name.bytes().any(|b| b.is_ascii_lowercase())
        && !name.starts_with('-')
        && !name.ends_with('-')
        && !name.contains("--");
    (!ok).then(|| {
        "not a port name: 1-15 characters a-z, 0-9 and '-', with a letter, \
         no leading, trailing or doubled '-'"
            .to_string()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(spec: serde_json::Value) -> net::NetworkPolicy {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "p", "namespace": "x"},
            "spec": spec,
        }))
        .expect("valid API object")
    }

    fn convert(spec: serde_json::Value) -> Result<NetworkPolicy, NetpolError> {
        network_policy(&policy(spec), "default")
    }

    #[test]
    fn defaults() {
        let p = convert(serde_json::json!({})).expect("converts");
        assert_eq!(p.key, ObjectKey::new("x", "p"));
        assert_eq!(p.pod_selector, Selector::default());
        assert_eq!(
            p.policy_types,
            PolicyTypes {
                ingress: true,
                egress: false
            }
        );
        // An egress section makes the policy affect egress; an empty one does not.
        let p = convert(serde_json::json!({"egress": [{}]})).expect("converts");
        assert!(p.policy_types.ingress && p.policy_types.egress);
        let p = convert(serde_json::json!({"egress": []})).expect("converts");
        assert!(p.policy_types.ingress && !p.policy_types.egress);
        // Explicit types win, whatever sections exist.
        let p = convert(serde_json::json!({"policyTypes": ["Egress"], "ingress": [{}]}))
            .expect("converts");
        assert!(!p.policy_types.ingress && p.policy_types.egress);
        assert_eq!(p.rules(super::super::Direction::Ingress), &[]);
        // Protocol defaults to TCP; a port without number is every port.
        let p = convert(serde_json::json!({"ingress": [{"ports": [{}, {"protocol": "UDP", "port": 53}, {"port": 8000, "endPort": 8080}, {"port": "http"}]}]}))
            .expect("converts");
        assert_eq!(
            p.ingress[0].ports,
            vec![
                PortMatch {
                    protocol: Protocol::Tcp,
                    port: PortSpec::Any
                },
                PortMatch {
                    protocol: Protocol::Udp,
                    port: PortSpec::Range(53, 53)
                },
                PortMatch {
                    protocol: Protocol::Tcp,
                    port: PortSpec::Range(8000, 8080)
                },
                PortMatch {
                    protocol: Protocol::Tcp,
                    port: PortSpec::Named("http".into())
                },
            ]
        );
        // Peers: pod selector alone is the own namespace; namespace selector
        // alone selects every pod there.
        let p = convert(serde_json::json!({"ingress": [{"from": [
            {"podSelector": {"matchLabels": {"pod": "b"}}},
            {"namespaceSelector": {}},
            {"ipBlock": {"cidr": "10.0.0.1/8", "except": ["10.1.0.0/16"]}},
        ]}]}))
        .expect("converts");
        let peers = &p.ingress[0].peers;
        assert!(
            matches!(&peers[0], PolicyPeer::Pods { namespaces: NamespaceScope::Own, pods } if !pods.requirements.is_empty())
        );
        assert!(
            matches!(&peers[1], PolicyPeer::Pods { namespaces: NamespaceScope::Matching(s), pods } if s.requirements.is_empty() && pods.requirements.is_empty())
        );
        assert!(
            matches!(&peers[2], PolicyPeer::IpBlock(b) if b.cidr.to_string() == "10.0.0.0/8" && b.except.len() == 1)
        );
    }

    #[test]
    fn errors_name_policy_field_and_value() {
        #[allow(clippy::type_complexity)]
        let cases: Vec<(serde_json::Value, &str, &str)> = vec![
            (
                serde_json::json!({"podSelector": {"matchExpressions": [{"key": "a", "operator": "Like", "values": ["x"]}]}}),
                "spec.podSelector.matchExpressions[0].operator",
                "Like",
            ),
            (
                serde_json::json!({"ingress": [{"from": [{"namespaceSelector": {"matchExpressions": [{"key": "a", "operator": "In"}]}}]}]}),
                "spec.ingress[0].from[0].namespaceSelector.matchExpressions[0].values",
                "",
            ),
            (
                serde_json::json!({"egress": [{"to": [{"ipBlock": {"cidr": "10.0.0.0/33"}}]}]}),
                "spec.egress[0].to[0].ipBlock.cidr",
                "10.0.0.0/33",
            ),
            (
                serde_json::json!({"egress": [{"to": [{"ipBlock": {"cidr": "banana"}}]}]}),
                "spec.egress[0].to[0].ipBlock.cidr",
                "banana",
            ),
            (
                serde_json::json!({"egress": [{"to": [{"ipBlock": {"cidr": "10.0.0.0/16", "except": ["10.1.0.0/24"]}}]}]}),
                "spec.egress[0].to[0].ipBlock.except[0]",
                "10.1.0.0/24",
            ),
            (
                serde_json::json!({"egress": [{"to": [{"ipBlock": {"cidr": "10.0.0.0/16", "except": ["10.0.0.0/16"]}}]}]}),
                "spec.egress[0].to[0].ipBlock.except[0]",
                "10.0.0.0/16",
            ),
            (
                serde_json::json!({"egress": [{"to": [{"ipBlock": {"cidr": "10.0.0.0/16", "except": ["fd00::/64"]}}]}]}),
                "spec.egress[0].to[0].ipBlock.except[0]",
                "fd00::/64",
            ),
            (
                serde_json::json!({"ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0.0/8"}, "podSelector": {}}]}]}),
                "spec.ingress[0].from[0]",
                "ipBlock with a selector",
            ),
            (
                serde_json::json!({"ingress": [{"from": [{}]}]}),
                "spec.ingress[0].from[0]",
                "{}",
            ),
            (
                serde_json::json!({"ingress": [{"ports": [{"port": 90, "endPort": 80}]}]}),
                "spec.ingress[0].ports[0].endPort",
                "80",
            ),
            (
                serde_json::json!({"ingress": [{"ports": [{"port": "http", "endPort": 80}]}]}),
                "spec.ingress[0].ports[0].endPort",
                "80",
            ),
            (
                serde_json::json!({"ingress": [{"ports": [{"endPort": 80}]}]}),
                "spec.ingress[0].ports[0].endPort",
                "80",
            ),
            (
                serde_json::json!({"ingress": [{"ports": [{"port": 80, "endPort": 70000}]}]}),
                "spec.ingress[0].ports[0].endPort",
                "70000",
            ),
            (
                serde_json::json!({"ingress": [{"ports": [{"port": 0}]}]}),
                "spec.ingress[0].ports[0].port",
                "0",
            ),
            (
                serde_json::json!({"ingress": [{"ports": [{"port": "80"}]}]}),
                "spec.ingress[0].ports[0].port",
                "80",
            ),
            (
                serde_json::json!({"ingress": [{"ports": [{"port": "Http_Port"}]}]}),
                "spec.ingress[0].ports[0].port",
                "Http_Port",
            ),
            (
                serde_json::json!({"egress": [{"ports": [{"protocol": "ICMP"}]}]}),
                "spec.egress[0].ports[0].protocol",
                "ICMP",
            ),
            (
                serde_json::json!({"egress": [{"ports": [{"protocol": "tcp"}]}]}),
                "spec.egress[0].ports[0].protocol",
                "tcp",
            ),
            (
                serde_json::json!({"policyTypes": ["Ingress", "Outbound"]}),
                "spec.policyTypes[1]",
                "Outbound",
            ),
            (
                serde_json::json!({"policyTypes": ["Ingress", "Egress", "Ingress"]}),
                "spec.policyTypes",
                "Ingress,Egress,Ingress",
            ),
        ];
        for (spec, field, value) in cases {
            let err = convert(spec.clone()).expect_err(&spec.to_string());
            assert_eq!(err.policy, "x/p", "{spec}");
            assert_eq!(err.field, field, "{spec}: {err}");
            assert_eq!(err.value, value, "{spec}: {err}");
            let text = err.to_string();
            assert!(
                text.starts_with("NetworkPolicy x/p: field ") && text.contains(field),
                "{text}"
            );
        }
    }

    #[test]
    fn port_names() {
        for ok in ["http", "serve-80-tcp", "a", "h2c", "x1-y2"] {
            assert_eq!(invalid_port_name(ok), None, "{ok}");
        }
        for bad in [
            "",
            "80",
            "-http",
            "http-",
            "ht--tp",
            "HTTP",
            "a_b",
            "abcdefghijklmnop",
        ] {
            assert!(invalid_port_name(bad).is_some(), "{bad:?}");
        }
    }
}

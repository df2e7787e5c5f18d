//! `"subnet": "usePodCidr"`: host-local over this node's own pod CIDRs.
//!
//! Kubernetes gives each node its pod CIDRs (`Node.spec.podCIDRs`, at most one per IP
//! family, set by kube-controller-manager's `--allocate-node-cidrs` or by whoever created
//! the Node), and the agent routes every other node's pod CIDRs to that node. The conflist
//! is one file for every node, so it cannot name them; instead a host-local `subnet` may
//! be a placeholder that weft-cni replaces before it runs host-local. The convention and
//! its rules are Calico's (its CNI plugin does the same for host-local), so a conflist
//! written for one works with the other:
//!
//! | `subnet` (any case) | replaced by |
//! |---|---|
//! | `usePodCidr` | the node's IPv4 pod CIDR |
//! | `usePodCidrIPv6` | the node's IPv6 pod CIDR |
//!
//! in every range (`ipam.ranges[i][j].subnet`) and in host-local's older single-range form
//! (`ipam.subnet`), only when `ipam.type` is `host-local` (another IPAM plugin sees its
//! section unchanged). `usePodCidr` is IPv4 also on an IPv6-only node, as in Calico: write
//! `usePodCidrIPv6` there. Dual stack is one range set per family:
//! `"ranges": [[{"subnet": "usePodCidr"}], [{"subnet": "usePodCidrIPv6"}]]`.
//!
//! Where the CIDRs come from (`commands/mod.rs`): the node agent's answer to `node`
//! ([`crate::agent_proto`]), read from the same index its routes to the other nodes come
//! from. ADD without that answer, or with no pod CIDR of a family a range asks for, fails
//! before anything is allocated (the kubelet retries): allocating from a wrong range is
//! worse. CHECK, DEL and GC use the answer too when there is one, and otherwise
//! [`PodCidrs::teardown`]'s `0.0.0.0/0` and `::/0` (as Calico's DEL does): host-local finds
//! an attachment's leases by container id and interface, the ranges only have to parse,
//! and tearing a pod down must not depend on the agent. STATUS reports the plugin not
//! available when ADD would fail for this reason.

use std::fmt;

use serde_json::Value;

use crate::error::Error;
use crate::result::IpNet;

/// `subnet` placeholder for the node's IPv4 pod CIDR.
pub const USE_POD_CIDR: &str = "usePodCidr";
/// `subnet` placeholder for the node's IPv6 pod CIDR.
pub const USE_POD_CIDR_IPV6: &str = "usePodCidrIPv6";
/// The IPAM plugin whose ranges may hold placeholders.
pub const HOST_LOCAL: &str = "host-local";

/// An IP family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    fn of(net: &IpNet) -> Family {
        if net.addr.is_ipv4() {
            Family::V4
        } else {
            Family::V6
        }
    }

    /// The family a `subnet` value asks for, if it is a placeholder.
    pub fn asked_by(subnet: &str) -> Option<Family> {
        if subnet.eq_ignore_ascii_case(USE_POD_CIDR) {
            Some(Family::V4)
        } else if subnet.eq_ignore_ascii_case(USE_POD_CIDR_IPV6) {
            Some(Family::V6)
        } else {
            None
        }
    }
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Family::V4 => "IPv4",
            Family::V6 => "IPv6",
        })
    }
}

/// One `subnet` that asks for the node's pod CIDR.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placeholder {
    /// Where it is: `ipam.ranges[1][0].subnet`, `ipam.subnet`.
    pub field: String,
    /// As written.
    pub value: String,
    pub family: Family,
}

impl fmt::Display for Placeholder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} = {:?}", self.field, self.value)
    }
}

/// A node's pod CIDRs, at most one per family.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodCidrs {
    /// The node's name, for messages.
    pub node: String,
    pub v4: Option<IpNet>,
    pub v6: Option<IpNet>,
}

impl PodCidrs {
    /// From the agent's answer; two CIDRs of one family are refused (Kubernetes allows
    /// one per family, and host-local would get a different range than the routes).
    pub fn new(node: impl Into<String>, cidrs: &[IpNet]) -> Result<PodCidrs, String> {
        let mut out = PodCidrs {
            node: node.into(),
            v4: None,
            v6: None,
        };
        for cidr in cidrs {
            let slot = match Family::of(cidr) {
                Family::V4 => &mut out.v4,
                Family::V6 => &mut out.v6,
            };
            if let Some(first) = slot {
                return Err(format!(
                    "node {} has two {} pod CIDRs, {first} and {cidr}",
                    out.node,
                    Family::of(cidr)
                ));
            }
            // host-local refuses a subnet with host bits set.
            *slot = Some(cidr.network());
        }
        Ok(out)
    }

    /// What DEL, GC and CHECK give host-local when the agent cannot answer: any range
    /// parses, and host-local releases and finds leases by attachment, not by range.
    pub fn teardown() -> PodCidrs {
        PodCidrs {
            node: "(none: teardown placeholders)".into(),
            v4: Some(IpNet {
                addr: [0u8; 4].into(),
                prefix: 0,
            }),
            v6: Some(IpNet {
                addr: [0u16; 8].into(),
                prefix: 0,
            }),
        }
    }

    fn get(&self, family: Family) -> Option<IpNet> {
        match family {
            Family::V4 => self.v4,
            Family::V6 => self.v6,
        }
    }

    fn list(&self) -> String {
        let all: Vec<String> = self
            .v4
            .iter()
            .chain(&self.v6)
            .map(|c| c.to_string())
            .collect();
        format!("[{}]", all.join(", "))
    }
}

/// The placeholders in an `ipam` section, in document order; none unless `ipam.type` is
/// host-local.
pub fn placeholders(ipam: &Value) -> Vec<Placeholder> {
    let mut out = Vec::new();
    let mut copy = ipam.clone();
    // The closure never fails.
    let _ = for_each_placeholder(&mut copy, |field, value, family, _| {
        out.push(Placeholder {
            field,
            value: value.to_string(),
            family,
        });
        Ok(())
    });
    out
}

/// `ipam` with every placeholder replaced by `cidrs`' CIDR of its family; unchanged when it
/// has none. A placeholder whose family the node has no pod CIDR of is an invalid
/// configuration for this node, named by its field.
pub fn substitute(ipam: &Value, cidrs: &PodCidrs) -> Result<Value, Error> {
    let mut out = ipam.clone();
    for_each_placeholder(&mut out, |field, value, family, subnet| {
        let cidr = cidrs.get(family).ok_or_else(|| {
            Error::config(
                field,
                format!(
                    "{value:?} asks for node {}'s {family} pod CIDR, but its spec.podCIDRs {}: remove this range, or give the node an {family} pod CIDR",
                    cidrs.node,
                    if cidrs.v4.is_none() && cidrs.v6.is_none() {
                        "is empty".to_string()
                    } else {
                        format!("({}) has none", cidrs.list())
                    }
                ),
            )
        })?;
        *subnet = Value::String(cidr.to_string());
        Ok(())
    })?;
    Ok(out)
}

/// Calls `f(field, value, family, subnet)` for each placeholder `subnet` of a host-local
/// `ipam` section. Anything not shaped as host-local expects is left to host-local to
/// refuse.
fn for_each_placeholder(
    ipam: &mut Value,
    mut f: impl FnMut(String, &str, Family, &mut Value) -> Result<(), Error>,
) -> Result<(), Error> {
    if ipam.get("type").and_then(Value::as_str) != Some(HOST_LOCAL) {
        return Ok(());
    }
    let mut visit = |field: String, subnet: &mut Value| -> Result<(), Error> {
        let Some(value) = subnet.as_str().map(str::to_string) else {
            return Ok(());
        };
        match Family::asked_by(&value) {
            Some(family) => f(field, &value, family, subnet),
            None => Ok(()),
        }
    };
    if let Some(subnet) = ipam.get_mut("subnet") {
        visit("ipam.subnet".into(), subnet)?;
    }
    if let Some(Value::Array(sets)) = ipam.get_mut("ranges") {
        for (i, set) in sets.iter_mut().enumerate() {
            let Value::Array(ranges) = set else { continue };
            for (j, range) in ranges.iter_mut().enumerate() {
                if let Some(subnet) = range.get_mut("subnet") {
                    visit(format!("ipam.ranges[{i}][{j}].subnet"), subnet)?;
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::codes;
    use serde_json::json;

    fn cidrs(list: &[&str]) -> PodCidrs {
        let nets: Vec<IpNet> = list.iter().map(|c| c.parse().expect("cidr")).collect();
        PodCidrs::new("node-1", &nets).expect("one per family")
    }

    fn host_local(ranges: Value) -> Value {
        json!({"type": "host-local", "dataDir": "/var/lib/cni/networks", "ranges": ranges})
    }

    #[test]
    fn both_families_are_replaced_and_the_rest_is_kept() {
        let ipam = host_local(json!([
            [{"subnet": "usePodCidr", "gateway": "10.0.0.1"}],
            [{"subnet": "usePodCidrIPv6"}]
        ]));
        let got = substitute(&ipam, &cidrs(&["10.77.1.0/24", "fd77:0:1::/64"])).expect("ok");
        assert_eq!(
            got,
            host_local(json!([
                [{"subnet": "10.77.1.0/24", "gateway": "10.0.0.1"}],
                [{"subnet": "fd77:0:1::/64"}]
            ]))
        );
        // The Node's order does not matter; the range sets keep theirs.
        let swapped = substitute(&ipam, &cidrs(&["fd77:0:1::/64", "10.77.1.0/24"])).expect("ok");
        assert_eq!(swapped, got);
    }

    #[test]
    fn placeholders_are_found_in_any_case_and_in_the_single_subnet_form() {
        let ipam = json!({"type": "host-local", "subnet": "USEPODCIDR",
            "ranges": [[{"subnet": "10.9.0.0/16"}, {"subnet": "usepodcidripv6"}]]});
        let found = placeholders(&ipam);
        assert_eq!(
            found,
            vec![
                Placeholder {
                    field: "ipam.subnet".into(),
                    value: "USEPODCIDR".into(),
                    family: Family::V4
                },
                Placeholder {
                    field: "ipam.ranges[0][1].subnet".into(),
                    value: "usepodcidripv6".into(),
                    family: Family::V6
                },
            ]
        );
        assert_eq!(
            found[1].to_string(),
            r#"ipam.ranges[0][1].subnet = "usepodcidripv6""#
        );
        let got = substitute(&ipam, &cidrs(&["10.77.1.0/24", "fd77:0:1::/64"])).expect("ok");
        assert_eq!(got["subnet"], "10.77.1.0/24");
        assert_eq!(got["ranges"][0][0]["subnet"], "10.9.0.0/16");
        assert_eq!(got["ranges"][0][1]["subnet"], "fd77:0:1::/64");
    }

    #[test]
    fn without_placeholders_nothing_changes() {
        let fixed = host_local(json!([[{"subnet": "10.244.0.0/24"}]]));
        assert!(placeholders(&fixed).is_empty());
        assert_eq!(substitute(&fixed, &cidrs(&[])).expect("ok"), fixed);
        // Another IPAM plugin's section is its own business, placeholder-looking or not.
        let other = json!({"type": "whereabouts", "ranges": [[{"subnet": "usePodCidr"}]]});
        assert!(placeholders(&other).is_empty());
        assert_eq!(substitute(&other, &cidrs(&[])).expect("ok"), other);
        // Shapes host-local would refuse are left for it to refuse.
        let odd =
            json!({"type": "host-local", "subnet": 7, "ranges": [{"subnet": "usePodCidr"}, [5]]});
        assert!(placeholders(&odd).is_empty());
        assert_eq!(substitute(&odd, &cidrs(&[])).expect("ok"), odd);
    }

    #[test]
    fn a_family_the_node_lacks_is_an_error_naming_the_field() {
        let ipam = host_local(json!([[{"subnet": "usePodCidr"}], [{"subnet": "usePodCidrIPv6"}]]));
        let e = substitute(&ipam, &cidrs(&["10.77.1.0/24"])).expect_err("no IPv6");
        assert_eq!(e.code(), codes::INVALID_CONFIG);
        let msg = e.to_object("1.1.0").msg;
        for needle in [
            "ipam.ranges[1][0].subnet",
            "usePodCidrIPv6",
            "node-1",
            "IPv6",
            "spec.podCIDRs ([10.77.1.0/24]) has none",
        ] {
            assert!(msg.contains(needle), "{msg:?} lacks {needle:?}");
        }
        // IPv6-only node: usePodCidr is IPv4 (Calico's rule), so it names the IPv4 family.
        let v4 = host_local(json!([[{"subnet": "usePodCidr"}]]));
        let msg = substitute(&v4, &cidrs(&["fd77:0:1::/64"]))
            .expect_err("no IPv4")
            .to_string();
        assert!(
            msg.contains("ipam.ranges[0][0].subnet") && msg.contains("IPv4"),
            "{msg}"
        );
        let msg = substitute(&v4, &cidrs(&[])).expect_err("none").to_string();
        assert!(msg.contains("spec.podCIDRs is empty"), "{msg}");
    }

    #[test]
    fn the_agents_cidrs_are_checked_and_normalised() {
        let two: Vec<IpNet> = ["10.1.0.0/24", "10.2.0.0/24"]
            .iter()
            .map(|c| c.parse().expect("cidr"))
            .collect();
        let e = PodCidrs::new("n", &two).expect_err("two IPv4");
        assert!(e.contains("two IPv4 pod CIDRs"), "{e}");
        let c = cidrs(&["10.77.1.9/24"]);
        assert_eq!(c.v4.map(|n| n.to_string()).as_deref(), Some("10.77.1.0/24"));
    }

    proptest::proptest! {
        /// Any host-local-shaped section: substitution with both families leaves no
        /// placeholder and changes nothing else; with one family it fails only for a
        /// placeholder of the other, naming its field.
        #[test]
        fn substitution_replaces_exactly_the_placeholders(
            sets in proptest::collection::vec(
                proptest::collection::vec(
                    proptest::prop_oneof![
                        proptest::strategy::Just(json!("usePodCidr")),
                        proptest::strategy::Just(json!("USEPODCIDRIPV6")),
                        proptest::strategy::Just(json!("10.1.0.0/16")),
                        proptest::strategy::Just(json!("usePodCidrIPv4")),
                        proptest::strategy::Just(json!(null)),
                        proptest::strategy::Just(json!(42)),
                    ],
                    0..3,
                ),
                0..3,
            ),
            single in proptest::option::of(proptest::prop_oneof![
                proptest::strategy::Just("usePodCidr"),
                proptest::strategy::Just("10.2.0.0/16"),
            ]),
        ) {
            let ranges: Vec<Value> = sets
                .iter()
                .map(|set| Value::Array(set.iter().map(|s| json!({"subnet": s})).collect()))
                .collect();
            let mut ipam = host_local(Value::Array(ranges));
            if let Some(s) = single {
                ipam["subnet"] = json!(s);
            }
            let wanted = placeholders(&ipam);
            let full = substitute(&ipam, &cidrs(&["10.77.1.0/24", "fd77:0:1::/64"])).expect("both families");
            proptest::prop_assert!(placeholders(&full).is_empty());
            // Only the placeholders' fields changed.
            let mut back = full.clone();
            for p in &wanted {
                let field = p.field.trim_start_matches("ipam.");
                let value = Value::String(p.value.clone());
                if field == "subnet" {
                    back["subnet"] = value;
                } else {
                    let (i, j) = field
                        .trim_start_matches("ranges[")
                        .trim_end_matches("].subnet")
                        .split_once("][")
                        .expect("ranges[i][j]");
                    let (i, j): (usize, usize) = (i.parse().expect("i"), j.parse().expect("j"));
                    back["ranges"][i][j]["subnet"] = value;
                }
            }
            proptest::prop_assert_eq!(back, ipam.clone());
            match substitute(&ipam, &cidrs(&["10.77.1.0/24"])) {
                Ok(_) => proptest::prop_assert!(wanted.iter().all(|p| p.family == Family::V4)),
                Err(e) => {
                    let first = wanted.iter().find(|p| p.family == Family::V6).expect("an IPv6 placeholder");
                    proptest::prop_assert!(e.to_string().contains(&first.field), "{}", e);
                }
            }
        }
    }

    #[test]
    fn teardown_placeholders_fill_every_family() {
        let ipam = host_local(json!([[{"subnet": "usePodCidr"}], [{"subnet": "usePodCidrIPv6"}]]));
        let got = substitute(&ipam, &PodCidrs::teardown()).expect("ok");
        assert_eq!(got["ranges"][0][0]["subnet"], "0.0.0.0/0");
        assert_eq!(got["ranges"][1][0]["subnet"], "::/0");
    }
}

//! The seam in front of the eBPF map writer: [`PolicyMaps`] is what the agent and the CNI
//! plugin program against. [`crate::Datapath`] implements it on the pinned maps,
//! [`crate::FakeMaps`] in memory for unit tests.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::ops::BitOr;

use crate::abi::{EndpointAddrsValue, EP_MAX_ADDRS};
use crate::{Direction, Entry, Error};

/// `weft_endpoints` flags: which directions of the pod some policy isolates.
#[derive(Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct EndpointFlags(u32);

impl EndpointFlags {
    /// Nothing isolated: everything passes (and is still tracked and counted under policy 0).
    pub const NONE: Self = Self(0);
    pub const INGRESS_ISOLATED: Self = Self(crate::abi::EP_INGRESS_ISOLATED);
    pub const EGRESS_ISOLATED: Self = Self(crate::abi::EP_EGRESS_ISOLATED);

    pub const fn from_bits(bits: u32) -> Self {
        Self(bits)
    }

    pub const fn bits(self) -> u32 {
        self.0
    }

    pub const fn isolates(self, direction: Direction) -> bool {
        let bit = match direction {
            Direction::Ingress => crate::abi::EP_INGRESS_ISOLATED,
            Direction::Egress => crate::abi::EP_EGRESS_ISOLATED,
        };
        self.0 & bit != 0
    }
}

impl BitOr for EndpointFlags {
    type Output = Self;
    fn bitor(self, rhs: Self) -> Self {
        Self(self.0 | rhs.0)
    }
}

impl fmt::Debug for EndpointFlags {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts = Vec::new();
        if self.isolates(Direction::Ingress) {
            parts.push("INGRESS_ISOLATED");
        }
        if self.isolates(Direction::Egress) {
            parts.push("EGRESS_ISOLATED");
        }
        if parts.is_empty() {
            parts.push("NONE");
        }
        f.write_str(&parts.join(" | "))
    }
}

/// A managed interface: which endpoint it belongs to and what is isolated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Endpoint {
    pub ep_id: u32,
    pub flags: EndpointFlags,
}

/// One policy's counters, summed over CPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PolicyCounters {
    /// New connections this policy allowed.
    pub allowed_conns: u64,
    /// Packets of those connections, both ways.
    pub allowed_packets: u64,
}

/// The eBPF map writer, as the agent sees it.
///
/// Policy ids are the agent's; 0 means "not isolated" in counters and flow events. Changes
/// apply to new connections: established ones keep their conntrack entry until it expires
/// (or [`PolicyMaps::flush_conntrack`] drops them, which re-judges their next packet).
pub trait PolicyMaps {
    /// Makes `ifindex` (a host-side veth) a managed endpoint, or updates its id and flags.
    fn set_endpoint(&mut self, ifindex: u32, ep_id: u32, flags: EndpointFlags)
        -> Result<(), Error>;

    /// Records the addresses interface `ifindex`'s pod may send from (its IPAM addresses):
    /// `from_pod` then drops IPv4/IPv6 packets with any other source, except IPv6
    /// link-local and `::` ([`source_allowed`]). Replaces what was recorded. An empty list
    /// removes the record: the interface's sources are then not checked. At most
    /// [`EP_MAX_ADDRS`] per family ([`Error::TooManyAddresses`]; nothing is written).
    fn set_endpoint_addrs(&mut self, ifindex: u32, addrs: &[IpAddr]) -> Result<(), Error>;

    /// The recorded addresses by ifindex.
    fn endpoint_addrs(&self) -> Result<BTreeMap<u32, Vec<IpAddr>>, Error>;

    /// Unmanages `ifindex`, and forgets its addresses. When no other interface carries its
    /// endpoint id, everything keyed by that id goes too: policy entries, conntrack entries,
    /// drop counters. Removing an unknown interface succeeds.
    fn remove_endpoint(&mut self, ifindex: u32) -> Result<(), Error>;

    /// Managed interfaces by ifindex.
    fn endpoints(&self) -> Result<BTreeMap<u32, Endpoint>, Error>;

    /// Makes `entries` the endpoint's whole policy: writes every new or changed entry first,
    /// then deletes the entries no longer wanted, so no allowed peer is denied in between.
    /// Invalid entries are refused before anything is written.
    fn replace_policy(&mut self, ep_id: u32, entries: &[Entry]) -> Result<(), Error>;

    /// Deletes every policy entry of the endpoint.
    fn remove_policy(&mut self, ep_id: u32) -> Result<(), Error> {
        self.replace_policy(ep_id, &[])
    }

    /// Drops the endpoint's conntrack entries; returns how many there were.
    fn flush_conntrack(&mut self, ep_id: u32) -> Result<usize, Error>;

    /// Per-policy counters (policy 0: connections of directions that were not isolated).
    fn counters(&self) -> Result<BTreeMap<u32, PolicyCounters>, Error>;

    /// Forgets a policy's counters (when the agent deletes the policy).
    fn remove_counters(&mut self, policy: u32) -> Result<(), Error>;

    /// Denied new connections per (endpoint, direction). A denial has no deciding policy:
    /// the agent attributes it to the policies isolating that direction.
    fn drops(&self) -> Result<BTreeMap<(u32, Direction), u64>, Error>;

    /// Packets `from_pod` dropped per endpoint id because their source address was not the
    /// endpoint's.
    fn source_drops(&self) -> Result<BTreeMap<u32, u64>, Error>;

    /// Flow events lost because the ring buffer was full.
    fn flow_lost(&self) -> Result<u64, Error>;
}

/// The `from_pod` source rule: may a pod whose recorded addresses are `recorded` send from
/// `src`? Nothing recorded (`None`): not checked. IPv6 link-local (`fe80::/10`) and `::`
/// (neighbour discovery, MLD, duplicate address detection) always pass.
pub fn source_allowed(recorded: Option<&[IpAddr]>, src: IpAddr) -> bool {
    let Some(recorded) = recorded else {
        return true;
    };
    if let IpAddr::V6(v6) = src {
        if v6.is_unspecified() || (v6.segments()[0] & 0xffc0) == 0xfe80 {
            return true;
        }
    }
    recorded.contains(&src)
}

/// `weft_endpoint_addrs`' value for `addrs` (deduplicated); `None` for an empty list.
pub(crate) fn encode_addrs(
    ifindex: u32,
    addrs: &[IpAddr],
) -> Result<Option<EndpointAddrsValue>, Error> {
    let mut v = EndpointAddrsValue::default();
    let (mut n4, mut n6) = (Vec::new(), Vec::new());
    for a in addrs {
        match a {
            IpAddr::V4(a) if !n4.contains(&a.octets()) => n4.push(a.octets()),
            IpAddr::V6(a) if !n6.contains(&a.octets()) => n6.push(a.octets()),
            _ => {}
        }
    }
    if n4.is_empty() && n6.is_empty() {
        return Ok(None);
    }
    for (family, count) in [(4, n4.len()), (6, n6.len())] {
        if count > EP_MAX_ADDRS {
            return Err(Error::TooManyAddresses {
                ifindex,
                family,
                count,
                max: EP_MAX_ADDRS,
            });
        }
    }
    v.count4 = n4.len() as u8;
    v.count6 = n6.len() as u8;
    v.addr4[..n4.len()].copy_from_slice(&n4);
    v.addr6[..n6.len()].copy_from_slice(&n6);
    Ok(Some(v))
}

/// The addresses in a `weft_endpoint_addrs` value (counts beyond the arrays are clamped).
pub(crate) fn decode_addrs(v: &EndpointAddrsValue) -> Vec<IpAddr> {
    let n4 = usize::from(v.count4).min(EP_MAX_ADDRS);
    let n6 = usize::from(v.count6).min(EP_MAX_ADDRS);
    v.addr4[..n4]
        .iter()
        .map(|a| IpAddr::from(*a))
        .chain(v.addr6[..n6].iter().map(|a| IpAddr::from(*a)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    #[test]
    fn addresses_encode_per_family_and_round_trip() {
        let addrs = [
            ip("10.0.0.2"),
            ip("fd00::2"),
            ip("10.0.0.2"),
            ip("10.0.1.2"),
        ];
        let v = encode_addrs(7, &addrs).expect("fits").expect("some");
        assert_eq!((v.count4, v.count6), (2, 1));
        assert_eq!(
            decode_addrs(&v),
            vec![ip("10.0.0.2"), ip("10.0.1.2"), ip("fd00::2")]
        );
        assert_eq!(encode_addrs(7, &[]).expect("empty"), None);
        let five: Vec<IpAddr> = (1..=5).map(|i| ip(&format!("10.0.0.{i}"))).collect();
        assert!(matches!(
            encode_addrs(7, &five),
            Err(Error::TooManyAddresses {
                family: 4,
                count: 5,
                ..
            })
        ));
    }

    #[test]
    fn the_source_rule() {
        let own = [ip("10.0.0.2"), ip("fd00::2")];
        let ok = |s: &str| source_allowed(Some(&own), ip(s));
        assert!(ok("10.0.0.2") && ok("fd00::2"));
        assert!(!ok("10.0.0.3") && !ok("fd00::3") && !ok("0.0.0.0"));
        assert!(ok("fe80::1234") && ok("febf::1") && ok("::"));
        assert!(!ok("fec0::1"), "site-local is not link-local");
        assert!(
            source_allowed(None, ip("10.9.9.9")),
            "nothing recorded: not checked"
        );
        assert!(!source_allowed(Some(&[]), ip("10.0.0.2")));
    }
}

//! The seam in front of the eBPF map writer: [`PolicyMaps`] is what the agent and the CNI
//! plugin program against. [`crate::Datapath`] implements it on the pinned maps,
//! [`crate::FakeMaps`] in memory for unit tests.

use std::collections::BTreeMap;
use std::fmt;
use std::ops::BitOr;

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

    /// Unmanages `ifindex`. When no other interface carries its endpoint id, everything keyed
    /// by that id goes too: policy entries, conntrack entries, drop counters. Removing an
    /// unknown interface succeeds.
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

    /// Flow events lost because the ring buffer was full.
    fn flow_lost(&self) -> Result<u64, Error>;
}

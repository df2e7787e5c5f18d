//! `#[repr(C)]` mirrors of the map keys, values and the flow event declared in
//! `cni/bpf/include/weft_maps.h`, and the constants both sides share. The test at the bottom
//! checks every size and field offset against the BTF clang emitted for the compiled object,
//! so a change on one side without the other fails `cargo test`.

/// `weft_endpoint.flags`: the pod's ingress is isolated (a policy selects it for ingress).
pub const EP_INGRESS_ISOLATED: u32 = 1;
/// `weft_endpoint.flags`: the pod's egress is isolated.
pub const EP_EGRESS_ISOLATED: u32 = 2;

pub const DIR_INGRESS: u8 = 0;
pub const DIR_EGRESS: u8 = 1;

pub const PROTO_ANY: u8 = 0;
pub const MAX_PORT_RANGES: usize = 32;
/// LPM prefix bits always matched: ep_id, direction, proto and pad.
pub const POLICY_FIXED_PREFIX: u32 = 64;

pub const VERDICT_ALLOWED: u8 = 1;
pub const VERDICT_DENIED: u8 = 2;

pub const REASON_NOT_ISOLATED: u8 = 0;
pub const REASON_POLICY: u8 = 1;
pub const REASON_NO_PEER: u8 = 2;
pub const REASON_NO_PORT: u8 = 3;
pub const REASON_UNPARSEABLE: u8 = 4;
pub const REASON_SPOOFED_SOURCE: u8 = 5;

/// Addresses per family `weft_endpoint_addrs` holds for one endpoint.
pub const EP_MAX_ADDRS: usize = 4;

/// Services: frontends, backends per frontend, translated connections, affinities.
pub const LB_SVC_MAX: u32 = 65536;
pub const LB_MAX_BACKENDS: usize = 128;
pub const LB_CT_MAX: u32 = 262144;
pub const LB_AFFINITY_MAX: u32 = 65536;
/// `weft_lb_svc.flags`: sessionAffinity ClientIP.
pub const LB_F_AFFINITY: u16 = 1;
/// `weft_lb_svc.flags`: a NodePort frontend (a node address).
pub const LB_F_NODEPORT: u16 = 2;
/// `weft_lb_backend.flags`: on another node; a NodePort frontend source-NATs to it.
pub const LB_BE_REMOTE: u16 = 1;
/// Two `weft_lb_snat` entries per source-NATed NodePort connection.
pub const LB_SNAT_MAX: u32 = 131072;
/// The source ports NodePort source NAT takes on the node's address (above Linux's default
/// `net.ipv4.ip_local_port_range`, 32768-60999).
pub const SNAT_PORTS: std::ops::RangeInclusive<u16> = 61000..=65535;
/// The source a pod reaching itself through a Service sees (hairpin).
pub const HAIRPIN_V4: std::net::Ipv4Addr = std::net::Ipv4Addr::new(169, 254, 42, 1);
/// The IPv6 hairpin source.
pub const HAIRPIN_V6: std::net::Ipv6Addr =
    std::net::Ipv6Addr::new(0xfd77, 0, 0, 0, 0, 0, 0xa9fe, 0x2a01);
/// `weft_lb_ct_key.dir`: keyed by what the client sent (value: the backend).
pub const LB_CT_FORWARD: u8 = 0;
/// `weft_lb_ct_key.dir`: keyed by what the backend answers (value: the frontend).
pub const LB_CT_REVERSE: u8 = 1;

pub const CT_FIN_ORIG: u32 = 1;
pub const CT_FIN_REPLY: u32 = 2;
pub const CT_RST: u32 = 4;

/// Map names (and pin file names under the pin directory).
pub mod map {
    pub const ENDPOINTS: &str = "weft_endpoints";
    pub const ENDPOINT_ADDRS: &str = "weft_endpoint_addrs";
    pub const POLICY4: &str = "weft_policy4";
    pub const POLICY6: &str = "weft_policy6";
    pub const CT: &str = "weft_ct";
    pub const COUNTERS: &str = "weft_counters";
    pub const DROPS: &str = "weft_drops";
    pub const SOURCE_DROPS: &str = "weft_source_drops";
    pub const FLOWS: &str = "weft_flows";
    pub const FLOW_LOST: &str = "weft_flow_lost";
    pub const LB_SVC: &str = "weft_lb_svc";
    pub const LB_CT: &str = "weft_lb_ct";
    pub const LB_AFFINITY: &str = "weft_lb_affinity";
    pub const LB_STATS: &str = "weft_lb_stats";
    pub const LB_SNAT: &str = "weft_lb_snat";
    /// Per-CPU scratch space for the entries the programs write (not read by the agent).
    pub const LB_SCRATCH: &str = "weft_lb_scratch";
    /// Every map of the object.
    pub const ALL: [&str; 16] = [
        ENDPOINTS,
        ENDPOINT_ADDRS,
        POLICY4,
        POLICY6,
        CT,
        COUNTERS,
        DROPS,
        SOURCE_DROPS,
        FLOWS,
        FLOW_LOST,
        LB_SVC,
        LB_CT,
        LB_AFFINITY,
        LB_STATS,
        LB_SNAT,
        LB_SCRATCH,
    ];
}

/// Value of `weft_endpoints` (key: host-veth ifindex, `u32`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EndpointValue {
    pub ep_id: u32,
    pub flags: u32,
}

/// Value of `weft_endpoint_addrs` (key: host-veth ifindex, `u32`): the endpoint's own
/// addresses, the only sources `from_pod` lets through (besides IPv6 link-local and `::`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EndpointAddrsValue {
    pub count4: u8,
    pub count6: u8,
    pub pad: [u8; 2],
    pub addr4: [[u8; 4]; EP_MAX_ADDRS],
    pub addr6: [[u8; 16]; EP_MAX_ADDRS],
}

/// Key of `weft_policy4` without its leading `prefixlen` (aya's `lpm_trie::Key` adds it).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Policy4KeyData {
    /// Network byte order.
    pub ep_id_be: u32,
    pub direction: u8,
    pub proto: u8,
    pub pad: u16,
    pub addr: [u8; 4],
}

/// Key of `weft_policy6` without its leading `prefixlen`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Policy6KeyData {
    /// Network byte order.
    pub ep_id_be: u32,
    pub direction: u8,
    pub proto: u8,
    pub pad: u16,
    pub addr: [u8; 16],
}

/// The whole `weft_policy4_key` (what the kernel sees: `prefixlen` then the data).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct Policy4Key {
    pub prefixlen: u32,
    pub data: Policy4KeyData,
}

/// The whole `weft_policy6_key`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct Policy6Key {
    pub prefixlen: u32,
    pub data: Policy6KeyData,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PortRangeValue {
    /// Host byte order, inclusive.
    pub lo: u16,
    /// Host byte order, inclusive.
    pub hi: u16,
    pub policy: u32,
}

/// Value of both policy tries.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PolicyValue {
    pub count: u32,
    pub ranges: [PortRangeValue; MAX_PORT_RANGES],
}

impl Default for PolicyValue {
    fn default() -> Self {
        Self {
            count: 0,
            ranges: [PortRangeValue::default(); MAX_PORT_RANGES],
        }
    }
}

/// Key of `weft_ct`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct CtKey {
    pub ep_id: u32,
    pub direction: u8,
    pub proto: u8,
    pub family: u8,
    pub pad: u8,
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
    /// Network byte order.
    pub sport: u16,
    /// Network byte order.
    pub dport: u16,
}

/// Value of `weft_ct`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CtValue {
    pub created_ns: u64,
    pub last_seen_ns: u64,
    pub policy: u32,
    pub flags: u32,
}

/// Per-CPU value of `weft_counters` (key: policy id, `u32`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PolicyCountersValue {
    pub allowed_conns: u64,
    pub allowed_packets: u64,
}

/// Key of `weft_drops` (value: per-CPU `u64`, denied new connections).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct DropKey {
    pub ep_id: u32,
    pub direction: u8,
    pub pad: [u8; 3],
}

/// A record of `weft_flows`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowEventRaw {
    pub ts_ns: u64,
    pub ep_id: u32,
    pub policy: u32,
    pub direction: u8,
    pub verdict: u8,
    pub proto: u8,
    pub family: u8,
    /// Host byte order.
    pub sport: u16,
    /// Host byte order.
    pub dport: u16,
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
    pub reason: u8,
    pub pad: [u8; 7],
}

/// Key of `weft_lb_svc`: a frontend. IPv4 in the first 4 bytes of `addr`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LbSvcKey {
    pub family: u8,
    pub proto: u8,
    /// Network byte order.
    pub port: u16,
    pub addr: [u8; 16],
}

/// One backend in `weft_lb_svc`'s value.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LbBackend {
    pub addr: [u8; 16],
    /// Network byte order.
    pub port: u16,
    /// `LB_BE_*`.
    pub flags: u16,
}

/// Value of `weft_lb_svc`: the frontend's id, options and its whole backend set.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LbSvcValue {
    pub svc_id: u32,
    pub count: u16,
    pub flags: u16,
    pub affinity_timeout_s: u32,
    pub pad: u32,
    pub backends: [LbBackend; LB_MAX_BACKENDS],
}

impl Default for LbSvcValue {
    fn default() -> Self {
        Self {
            svc_id: 0,
            count: 0,
            flags: 0,
            affinity_timeout_s: 0,
            pad: 0,
            backends: [LbBackend::default(); LB_MAX_BACKENDS],
        }
    }
}

/// Key of `weft_lb_ct`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct LbCtKey {
    pub family: u8,
    pub proto: u8,
    pub dir: u8,
    pub pad: u8,
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
    /// Network byte order.
    pub sport: u16,
    /// Network byte order.
    pub dport: u16,
}

/// Value of `weft_lb_ct`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LbCtValue {
    pub created_ns: u64,
    pub last_seen_ns: u64,
    /// FORWARD: the backend; REVERSE: the frontend address.
    pub addr: [u8; 16],
    /// Network byte order.
    pub port: u16,
    pub pad: u16,
    pub svc_id: u32,
    pub flags: u32,
    pub pad2: u32,
}

/// Key of `weft_lb_affinity`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct LbAffinityKey {
    pub svc_id: u32,
    pub family: u8,
    pub pad: [u8; 3],
    pub client: [u8; 16],
}

/// Value of `weft_lb_affinity`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LbAffinityValue {
    pub last_seen_ns: u64,
    pub backend: LbBackend,
    pub pad: u32,
}

/// Value of `weft_lb_snat` (key: [`LbCtKey`]): one direction of a source-NATed NodePort
/// connection.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LbSnatValue {
    pub created_ns: u64,
    pub last_seen_ns: u64,
    /// FORWARD: the backend; REVERSE: the client.
    pub addr: [u8; 16],
    /// FORWARD: the source the backend sees; REVERSE: the frontend.
    pub nat_addr: [u8; 16],
    /// Network byte order. FORWARD: the backend's port; REVERSE: the client's.
    pub port: u16,
    /// Network byte order. FORWARD: the allocated source port; REVERSE: the nodePort.
    pub nat_port: u16,
    pub svc_id: u32,
    /// `CT_*`.
    pub flags: u32,
    pub pad: u32,
}

/// Per-CPU value of `weft_lb_stats` (key: svc_id).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LbStatsValue {
    pub conns: u64,
    pub refused: u64,
}

// SAFETY: all of these are #[repr(C)] plain integers and arrays, padding-free (checked by the
// layout test), valid for any bit pattern.
unsafe impl aya::Pod for EndpointValue {}
unsafe impl aya::Pod for EndpointAddrsValue {}
unsafe impl aya::Pod for Policy4KeyData {}
unsafe impl aya::Pod for Policy6KeyData {}
unsafe impl aya::Pod for PolicyValue {}
unsafe impl aya::Pod for CtKey {}
unsafe impl aya::Pod for CtValue {}
unsafe impl aya::Pod for PolicyCountersValue {}
unsafe impl aya::Pod for DropKey {}
unsafe impl aya::Pod for LbSvcKey {}
unsafe impl aya::Pod for LbSvcValue {}
unsafe impl aya::Pod for LbCtKey {}
unsafe impl aya::Pod for LbCtValue {}
unsafe impl aya::Pod for LbAffinityKey {}
unsafe impl aya::Pod for LbAffinityValue {}
unsafe impl aya::Pod for LbStatsValue {}
unsafe impl aya::Pod for LbSnatValue {}

impl FlowEventRaw {
    /// Reads a ring buffer record; `None` when it is shorter than the struct.
    pub fn from_bytes(bytes: &[u8]) -> Option<Self> {
        if bytes.len() < std::mem::size_of::<Self>() {
            return None;
        }
        // SAFETY: the length is checked above, the type is plain data valid for any bit
        // pattern, and read_unaligned copes with the record's alignment.
        Some(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<Self>()) })
    }
}

#[cfg(test)]
mod tests;

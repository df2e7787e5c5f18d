//! Policy entries as the agent hands them over, their encoding into `weft_policy4/6` keys and
//! values, and a pure model of the datapath's decision (the same lookup the C does), for
//! tests and for the in-memory fake.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::abi::{
    self, Policy4KeyData, Policy6KeyData, PolicyValue, PortRangeValue, MAX_PORT_RANGES,
    POLICY_FIXED_PREFIX,
};
use crate::Error;

/// A direction from the pod's point of view.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Direction {
    /// Into the pod (checked by `to_pod`, tc egress on the host veth).
    Ingress,
    /// Out of the pod (checked by `from_pod`, tc ingress on the host veth).
    Egress,
}

impl Direction {
    pub const fn as_u8(self) -> u8 {
        match self {
            Direction::Ingress => abi::DIR_INGRESS,
            Direction::Egress => abi::DIR_EGRESS,
        }
    }

    pub const fn from_u8(v: u8) -> Option<Self> {
        match v {
            abi::DIR_INGRESS => Some(Direction::Ingress),
            abi::DIR_EGRESS => Some(Direction::Egress),
            _ => None,
        }
    }
}

impl fmt::Display for Direction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Direction::Ingress => "ingress",
            Direction::Egress => "egress",
        })
    }
}

/// The protocol of a policy entry. TCP, UDP and SCTP are matched by port; `Any` stands for
/// every other protocol (ICMP, ICMPv6, ...) and ignores ports.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Protocol {
    Any,
    Tcp,
    Udp,
    Sctp,
}

impl Protocol {
    /// The key's `proto` byte: the IP protocol number, or 0 for `Any`.
    pub const fn as_u8(self) -> u8 {
        match self {
            Protocol::Any => abi::PROTO_ANY,
            Protocol::Tcp => 6,
            Protocol::Udp => 17,
            Protocol::Sctp => 132,
        }
    }

    /// How the datapath classifies a packet's IP protocol number.
    pub const fn of_ip_proto(proto: u8) -> Self {
        match proto {
            6 => Protocol::Tcp,
            17 => Protocol::Udp,
            132 => Protocol::Sctp,
            _ => Protocol::Any,
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Any => "any",
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
            Protocol::Sctp => "SCTP",
        })
    }
}

/// Allowed destination ports `lo..=hi`, and the policy id reported when they match.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PortRange {
    pub lo: u16,
    pub hi: u16,
    pub policy: u32,
}

impl PortRange {
    /// Every port, decided by `policy`.
    pub const fn all(policy: u32) -> Self {
        Self {
            lo: 0,
            hi: u16::MAX,
            policy,
        }
    }
}

/// One policy trie entry for an endpoint: what `addr/prefix_len` may do in `direction` with
/// `proto`.
///
/// The datapath only consults the *longest* matching prefix, so an entry must list every
/// range allowed for the addresses it covers, including those of covering shorter prefixes;
/// an entry without ranges is a hole (an ipBlock `except`). With [`Protocol::Any`] ports are
/// ignored: any range allows, and the first one's policy is reported.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub direction: Direction,
    pub proto: Protocol,
    pub addr: IpAddr,
    pub prefix_len: u8,
    pub ranges: Vec<PortRange>,
}

impl fmt::Display for Entry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {} {}/{}",
            self.direction, self.proto, self.addr, self.prefix_len
        )?;
        for (i, r) in self.ranges.iter().enumerate() {
            let sep = if i == 0 { " ports " } else { "," };
            if r.lo == r.hi {
                write!(f, "{sep}{}#{}", r.lo, r.policy)?;
            } else {
                write!(f, "{sep}{}-{}#{}", r.lo, r.hi, r.policy)?;
            }
        }
        Ok(())
    }
}

/// A policy trie key in canonical form (host bits cleared), for either family.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PolicyKey {
    V4 {
        prefix_len: u32,
        data: Policy4KeyData,
    },
    V6 {
        prefix_len: u32,
        data: Policy6KeyData,
    },
}

impl PolicyKey {
    /// The endpoint the key belongs to.
    pub fn ep_id(&self) -> u32 {
        match self {
            PolicyKey::V4 { data, .. } => u32::from_be(data.ep_id_be),
            PolicyKey::V6 { data, .. } => u32::from_be(data.ep_id_be),
        }
    }
}

fn mask(addr: &mut [u8], prefix_len: u8) {
    let bits = usize::from(prefix_len);
    for (i, byte) in addr.iter_mut().enumerate() {
        let start = i * 8;
        if start >= bits {
            *byte = 0;
        } else if start + 8 > bits {
            *byte &= 0xffu8 << (8 - (bits - start));
        }
    }
}

impl Entry {
    /// Checks the entry and encodes it for endpoint `ep_id`; `index` names it in errors.
    pub fn encode(&self, ep_id: u32, index: usize) -> Result<(PolicyKey, PolicyValue), Error> {
        let invalid = |reason: String| Error::InvalidEntry {
            ep_id,
            index,
            entry: self.to_string(),
            reason,
        };
        if self.ranges.len() > MAX_PORT_RANGES {
            return Err(invalid(format!(
                "{} port ranges, the datapath holds at most {MAX_PORT_RANGES} per entry",
                self.ranges.len()
            )));
        }
        let mut value = PolicyValue::default();
        for (i, r) in self.ranges.iter().enumerate() {
            if r.lo > r.hi {
                return Err(invalid(format!("port range {}-{} is empty", r.lo, r.hi)));
            }
            value.ranges[i] = PortRangeValue {
                lo: r.lo,
                hi: r.hi,
                policy: r.policy,
            };
        }
        value.count = self.ranges.len() as u32;
        let key = match self.addr {
            IpAddr::V4(a) => {
                if self.prefix_len > 32 {
                    return Err(invalid(format!(
                        "prefix length {} is longer than 32",
                        self.prefix_len
                    )));
                }
                let mut addr = a.octets();
                mask(&mut addr, self.prefix_len);
                PolicyKey::V4 {
                    prefix_len: POLICY_FIXED_PREFIX + u32::from(self.prefix_len),
                    data: Policy4KeyData {
                        ep_id_be: ep_id.to_be(),
                        direction: self.direction.as_u8(),
                        proto: self.proto.as_u8(),
                        pad: 0,
                        addr,
                    },
                }
            }
            IpAddr::V6(a) => {
                if self.prefix_len > 128 {
                    return Err(invalid(format!(
                        "prefix length {} is longer than 128",
                        self.prefix_len
                    )));
                }
                let mut addr = a.octets();
                mask(&mut addr, self.prefix_len);
                PolicyKey::V6 {
                    prefix_len: POLICY_FIXED_PREFIX + u32::from(self.prefix_len),
                    data: Policy6KeyData {
                        ep_id_be: ep_id.to_be(),
                        direction: self.direction.as_u8(),
                        proto: self.proto.as_u8(),
                        pad: 0,
                        addr,
                    },
                }
            }
        };
        Ok((key, value))
    }
}

/// Checks and encodes a whole replacement set; two entries for one key are an error.
pub(crate) fn encode_all(
    ep_id: u32,
    entries: &[Entry],
) -> Result<Vec<(PolicyKey, PolicyValue)>, Error> {
    let mut out: Vec<(PolicyKey, PolicyValue)> = Vec::with_capacity(entries.len());
    let mut seen = std::collections::HashMap::new();
    for (index, entry) in entries.iter().enumerate() {
        let (key, value) = entry.encode(ep_id, index)?;
        if let Some(first) = seen.insert(key, index) {
            return Err(Error::InvalidEntry {
                ep_id,
                index,
                entry: entry.to_string(),
                reason: format!(
                    "same direction, protocol and prefix as entry #{first}: merge their ranges"
                ),
            });
        }
        out.push((key, value));
    }
    Ok(out)
}

/// Whether a new connection passes, as the datapath reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Verdict {
    Allowed,
    Denied,
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Verdict::Allowed => "allowed",
            Verdict::Denied => "denied",
        })
    }
}

/// Why the verdict is what it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reason {
    /// The direction is not isolated: allowed, policy 0.
    NotIsolated,
    /// A policy entry's port range matched; the policy id says which.
    Policy,
    /// No entry covers the peer address.
    NoPeer,
    /// The peer's longest-prefix entry has no range with this port (or is a hole).
    NoPort,
    /// The headers could not be parsed; denied because the direction is isolated.
    Unparseable,
    /// `from_pod`: the source address is not one of the endpoint's; dropped whatever the
    /// policy (policy 0).
    SpoofedSource,
    /// A reason code this build does not know.
    Unknown(u8),
}

impl Reason {
    pub const fn from_u8(v: u8) -> Self {
        match v {
            abi::REASON_NOT_ISOLATED => Reason::NotIsolated,
            abi::REASON_POLICY => Reason::Policy,
            abi::REASON_NO_PEER => Reason::NoPeer,
            abi::REASON_NO_PORT => Reason::NoPort,
            abi::REASON_UNPARSEABLE => Reason::Unparseable,
            abi::REASON_SPOOFED_SOURCE => Reason::SpoofedSource,
            other => Reason::Unknown(other),
        }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reason::NotIsolated => f.write_str("not isolated"),
            Reason::Policy => f.write_str("policy"),
            Reason::NoPeer => f.write_str("no rule for the peer"),
            Reason::NoPort => f.write_str("no rule for the port"),
            Reason::Unparseable => f.write_str("unparseable headers"),
            Reason::SpoofedSource => f.write_str("spoofed source"),
            Reason::Unknown(v) => write!(f, "reason {v}"),
        }
    }
}

/// A new-connection decision.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Decision {
    pub verdict: Verdict,
    /// The deciding policy id (0 when not isolated or denied).
    pub policy: u32,
    pub reason: Reason,
}

impl Decision {
    pub const fn allowed(&self) -> bool {
        matches!(self.verdict, Verdict::Allowed)
    }
}

fn contains(entry_addr: IpAddr, prefix_len: u8, peer: IpAddr) -> bool {
    match (entry_addr, peer) {
        (IpAddr::V4(a), IpAddr::V4(p)) => {
            let mut a = a.octets();
            let mut p = p.octets();
            mask(&mut a, prefix_len);
            mask(&mut p, prefix_len);
            a == p
        }
        (IpAddr::V6(a), IpAddr::V6(p)) => {
            let mut a = a.octets();
            let mut p = p.octets();
            mask(&mut a, prefix_len);
            mask(&mut p, prefix_len);
            a == p
        }
        _ => false,
    }
}

/// The datapath's decision for a new connection, computed in Rust from an endpoint's entries:
/// `ip_proto` is the packet's IP protocol number, `peer` the other side's address (the
/// destination for egress, the source for ingress), `port` the destination port.
pub fn evaluate(
    entries: &[Entry],
    isolated: bool,
    direction: Direction,
    ip_proto: u8,
    peer: IpAddr,
    port: u16,
) -> Decision {
    let deny = |reason| Decision {
        verdict: Verdict::Denied,
        policy: 0,
        reason,
    };
    if !isolated {
        return Decision {
            verdict: Verdict::Allowed,
            policy: 0,
            reason: Reason::NotIsolated,
        };
    }
    let proto = Protocol::of_ip_proto(ip_proto);
    let best = entries
        .iter()
        .filter(|e| {
            e.direction == direction && e.proto == proto && contains(e.addr, e.prefix_len, peer)
        })
        .max_by_key(|e| e.prefix_len);
    let Some(entry) = best else {
        return deny(Reason::NoPeer);
    };
    let hit = if proto == Protocol::Any {
        entry.ranges.first()
    } else {
        entry
            .ranges
            .iter()
            .take(MAX_PORT_RANGES)
            .find(|r| r.lo <= port && port <= r.hi)
    };
    match hit {
        Some(r) => Decision {
            verdict: Verdict::Allowed,
            policy: r.policy,
            reason: Reason::Policy,
        },
        None => deny(Reason::NoPort),
    }
}

/// Address bytes as the maps and events carry them (IPv4 in the first four bytes).
pub(crate) fn ip_from_bytes(family: u8, bytes: &[u8; 16]) -> Option<IpAddr> {
    match family {
        4 => Some(IpAddr::V4(Ipv4Addr::new(
            bytes[0], bytes[1], bytes[2], bytes[3],
        ))),
        6 => Some(IpAddr::V6(Ipv6Addr::from(*bytes))),
        _ => None,
    }
}

/// The reference compiler's entry (`weft_model::netpol::compile_endpoint`) as the datapath
/// takes it: the one conversion the agent and the datapath's own tests use.
impl From<&weft_model::netpol::Entry> for Entry {
    fn from(e: &weft_model::netpol::Entry) -> Entry {
        use weft_model::netpol::ProtoKey;
        Entry {
            direction: e.direction.into(),
            proto: match e.proto {
                ProtoKey::Any => Protocol::Any,
                ProtoKey::Tcp => Protocol::Tcp,
                ProtoKey::Udp => Protocol::Udp,
                ProtoKey::Sctp => Protocol::Sctp,
            },
            addr: e.prefix.addr(),
            prefix_len: e.prefix.prefix_len(),
            ranges: e
                .ranges
                .iter()
                .map(|r| PortRange {
                    lo: r.lo,
                    hi: r.hi,
                    policy: r.policy,
                })
                .collect(),
        }
    }
}

impl From<weft_model::netpol::Direction> for Direction {
    fn from(d: weft_model::netpol::Direction) -> Direction {
        match d {
            weft_model::netpol::Direction::Ingress => Direction::Ingress,
            weft_model::netpol::Direction::Egress => Direction::Egress,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v4(s: &str) -> IpAddr {
        s.parse().expect("test address")
    }

    fn entry(addr: &str, len: u8, proto: Protocol, ranges: &[(u16, u16, u32)]) -> Entry {
        Entry {
            direction: Direction::Ingress,
            proto,
            addr: v4(addr),
            prefix_len: len,
            ranges: ranges
                .iter()
                .map(|&(lo, hi, policy)| PortRange { lo, hi, policy })
                .collect(),
        }
    }

    #[test]
    fn encoding_clears_host_bits_and_adds_the_fixed_prefix() {
        let e = entry("10.1.2.3", 20, Protocol::Tcp, &[(80, 80, 7)]);
        let (key, value) = e.encode(0x0102_0304, 0).expect("valid");
        match key {
            PolicyKey::V4 { prefix_len, data } => {
                assert_eq!(prefix_len, 64 + 20);
                assert_eq!(data.addr, [10, 1, 0, 0]);
                assert_eq!(data.ep_id_be.to_ne_bytes(), [1, 2, 3, 4]);
                assert_eq!(data.proto, 6);
                assert_eq!(data.direction, 0);
            }
            PolicyKey::V6 { .. } => panic!("v4 entry encoded as v6"),
        }
        assert_eq!(value.count, 1);
        assert_eq!(
            value.ranges[0],
            PortRangeValue {
                lo: 80,
                hi: 80,
                policy: 7
            }
        );
        assert_eq!(key.ep_id(), 0x0102_0304);
    }

    #[test]
    fn invalid_entries_are_refused_with_the_reason() {
        let too_long = entry("10.0.0.0", 33, Protocol::Tcp, &[]);
        let err = too_long.encode(5, 3).expect_err("prefix 33");
        assert!(err.to_string().contains("endpoint 5, entry #3"), "{err}");
        assert!(err.to_string().contains("longer than 32"), "{err}");

        let empty = entry("10.0.0.0", 8, Protocol::Tcp, &[(90, 80, 1)]);
        assert!(empty.encode(5, 0).is_err());

        let many: Vec<(u16, u16, u32)> = (0..33).map(|p| (p, p, 1)).collect();
        let err = entry("10.0.0.0", 8, Protocol::Udp, &many)
            .encode(5, 0)
            .expect_err("33 ranges");
        assert!(err.to_string().contains("at most 32"), "{err}");

        let dup = [
            entry("10.0.0.1", 8, Protocol::Tcp, &[(1, 1, 1)]),
            entry("10.0.0.2", 8, Protocol::Tcp, &[(2, 2, 1)]),
        ];
        let err = encode_all(5, &dup).expect_err("same key after masking");
        assert!(err.to_string().contains("entry #0"), "{err}");
    }

    #[test]
    fn the_model_uses_the_longest_prefix_then_the_first_matching_range() {
        let entries = [
            entry("10.0.0.0", 8, Protocol::Tcp, &[(80, 80, 1)]),
            // The longer prefix inherits port 80 and adds 443.
            entry("10.1.0.0", 16, Protocol::Tcp, &[(80, 80, 1), (443, 443, 2)]),
            // An except hole.
            entry("10.1.2.0", 24, Protocol::Tcp, &[]),
            entry("10.0.0.0", 8, Protocol::Any, &[(0, u16::MAX, 3)]),
        ];
        let check = |proto: u8, peer: &str, port: u16| {
            evaluate(&entries, true, Direction::Ingress, proto, v4(peer), port)
        };
        assert_eq!(check(6, "10.9.9.9", 80).policy, 1);
        assert_eq!(check(6, "10.9.9.9", 443).reason, Reason::NoPort);
        assert_eq!(check(6, "10.1.9.9", 443).policy, 2);
        assert_eq!(check(6, "10.1.2.3", 80).reason, Reason::NoPort);
        assert_eq!(check(6, "11.0.0.1", 80).reason, Reason::NoPeer);
        assert_eq!(check(1, "10.1.2.3", 0).policy, 3, "ICMP uses the Any entry");
        assert_eq!(
            check(17, "10.9.9.9", 80).reason,
            Reason::NoPeer,
            "no UDP entry"
        );
        let open = evaluate(&entries, false, Direction::Ingress, 17, v4("1.1.1.1"), 9);
        assert_eq!((open.verdict, open.policy), (Verdict::Allowed, 0));
        let egress = evaluate(&entries, true, Direction::Egress, 6, v4("10.9.9.9"), 80);
        assert_eq!(egress.reason, Reason::NoPeer, "entries are per direction");
    }
}

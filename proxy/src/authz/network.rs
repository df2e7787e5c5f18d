//! Client networks of an authorization: CIDRs with exceptions, IPv4 and IPv6.
//!
//! Addresses are compared in canonical form: an IPv4-mapped IPv6 address (`::ffff:10.0.0.1`,
//! as a dual-stack listener reports an IPv4 client) is its IPv4 address, and a network
//! written as `::ffff:10.0.0.0/104` is `10.0.0.0/8`, so a rule written either way matches a
//! client however the socket reports it. A network is stored masked (`10.1.2.3/8` is
//! `10.0.0.0/8`), as Kubernetes' own CIDR fields are read.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use weft_proto::net as pb;

/// An IP network: a canonical, masked address and a prefix length.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct IpNet {
    addr: IpAddr,
    prefix: u8,
}

/// Why a network from the controller cannot be used.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum NetError {
    #[error("network address has {0} bytes; expected 4 (IPv4) or 16 (IPv6)")]
    Length(usize),
    #[error("prefix length {prefix} is longer than the address ({max} bits)")]
    Prefix { prefix: u32, max: u32 },
    #[error("network is missing")]
    Missing,
}

fn mask4(prefix: u8) -> u32 {
    u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0)
}

fn mask6(prefix: u8) -> u128 {
    u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0)
}

impl IpNet {
    /// `addr/prefix`, canonicalised (v4-mapped IPv6 networks of prefix 96 or more become IPv4)
    /// and masked.
    pub fn new(addr: IpAddr, prefix: u32) -> Result<Self, NetError> {
        let (addr, prefix) = match addr {
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) if prefix >= 96 => (IpAddr::V4(v4), prefix - 96),
                _ => (addr, prefix),
            },
            v4 => (v4, prefix),
        };
        let max = if addr.is_ipv4() { 32 } else { 128 };
        if prefix > max {
            return Err(NetError::Prefix { prefix, max });
        }
        let prefix = prefix as u8;
        let addr = match addr {
            IpAddr::V4(a) => IpAddr::V4(Ipv4Addr::from(u32::from(a) & mask4(prefix))),
            IpAddr::V6(a) => IpAddr::V6(Ipv6Addr::from(u128::from(a) & mask6(prefix))),
        };
        Ok(Self { addr, prefix })
    }

    /// From the wire (`weft.net.IpNetwork`).
    pub fn from_pb(n: &pb::IpNetwork) -> Result<Self, NetError> {
        let addr = weft_proto::ip_from_bytes(&n.ip).map_err(|_| NetError::Length(n.ip.len()))?;
        Self::new(addr, n.prefix_len)
    }

    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    /// Whether `ip` (any form: it is canonicalised here) is in this network.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip.to_canonical()) {
            (IpAddr::V4(n), IpAddr::V4(a)) => u32::from(a) & mask4(self.prefix) == u32::from(n),
            (IpAddr::V6(n), IpAddr::V6(a)) => u128::from(a) & mask6(self.prefix) == u128::from(n),
            // An IPv6 network shorter than /96 may cover the v4-mapped range.
            (IpAddr::V6(n), IpAddr::V4(a)) => {
                u128::from(a.to_ipv6_mapped()) & mask6(self.prefix) == u128::from(n)
            }
            (IpAddr::V4(_), IpAddr::V6(_)) => false,
        }
    }
}

impl std::fmt::Display for IpNet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// A network with exceptions: an address is in it when it is in `net` and in none of
/// `except`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Network {
    pub net: IpNet,
    pub except: Vec<IpNet>,
}

impl Network {
    pub fn contains(&self, ip: IpAddr) -> bool {
        self.net.contains(ip) && !self.except.iter().any(|e| e.contains(ip))
    }

    /// From the wire; a bad network or exception fails the whole network (an exception
    /// dropped would widen it).
    pub fn from_pb(n: &weft_proto::policy::Network) -> Result<Self, NetError> {
        let net = IpNet::from_pb(n.net.as_ref().ok_or(NetError::Missing)?)?;
        let except = n
            .except
            .iter()
            .map(IpNet::from_pb)
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self { net, except })
    }

    /// `10.0.0.0/8` or `"10.0.0.0/8 except 10.1.0.0/16"`, for tests and messages.
    pub fn parse(s: &str) -> Option<Self> {
        let mut parts = s.split(" except ");
        let net = parse_net(parts.next()?)?;
        let except = parts.map(parse_net).collect::<Option<Vec<_>>>()?;
        Some(Self { net, except })
    }
}

/// `addr/prefix` (or a bare address: a host network).
pub fn parse_net(s: &str) -> Option<IpNet> {
    let (a, p) = match s.trim().split_once('/') {
        Some((a, p)) => (a, Some(p)),
        None => (s.trim(), None),
    };
    let addr: IpAddr = a.parse().ok()?;
    let prefix = match p {
        Some(p) => p.parse().ok()?,
        None if addr.is_ipv4() => 32,
        None => 128,
    };
    IpNet::new(addr, prefix).ok()
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn networks_contain_what_they_should() {
        let cases: &[(&str, &str, bool)] = &[
            ("10.0.0.0/8", "10.1.2.3", true),
            ("10.0.0.0/8", "11.0.0.1", false),
            ("10.1.2.3/8", "10.200.0.1", true),
            ("0.0.0.0/0", "192.168.1.1", true),
            ("0.0.0.0/0", "::1", false),
            ("10.0.0.1/32", "10.0.0.1", true),
            ("10.0.0.1/32", "10.0.0.2", false),
            ("10.0.0.1", "10.0.0.1", true),
            // v4-mapped clients are their IPv4 address.
            ("10.0.0.0/8", "::ffff:10.9.9.9", true),
            ("::ffff:10.0.0.0/104", "10.9.9.9", true),
            ("::ffff:10.0.0.0/104", "::ffff:10.9.9.9", true),
            ("::ffff:10.0.0.0/104", "11.0.0.1", false),
            // An IPv6 network covering the mapped range covers IPv4 clients.
            ("::/0", "10.0.0.1", true),
            ("::/0", "fd00::1", true),
            ("fd00::/8", "fd12:3456::1", true),
            ("fd00::/8", "fe80::1", false),
            ("fd00::/8", "10.0.0.1", false),
            ("2001:db8::/32", "2001:db8:ffff::1", true),
            ("2001:db8::/128", "2001:db8::", true),
            ("2001:db8::/128", "2001:db8::1", false),
        ];
        for (net, addr, want) in cases {
            let n = parse_net(net).unwrap();
            assert_eq!(n.contains(ip(addr)), *want, "{net} contains {addr}");
        }
    }

    #[test]
    fn exceptions_cut_holes() {
        let n = Network::parse("10.0.0.0/8 except 10.1.0.0/16 except 10.2.3.4").unwrap();
        assert!(n.contains(ip("10.0.0.1")));
        assert!(!n.contains(ip("10.1.200.1")));
        assert!(!n.contains(ip("::ffff:10.1.0.1")));
        assert!(!n.contains(ip("10.2.3.4")));
        assert!(n.contains(ip("10.2.3.5")));
        assert!(!n.contains(ip("11.0.0.0")));
    }

    #[test]
    fn bad_networks_are_refused() {
        let pb = |ip: Vec<u8>, prefix_len| pb::IpNetwork { ip, prefix_len };
        assert_eq!(
            IpNet::from_pb(&pb(vec![10, 0, 0, 0], 33)),
            Err(NetError::Prefix {
                prefix: 33,
                max: 32
            })
        );
        assert_eq!(
            IpNet::from_pb(&pb(vec![10, 0, 0], 8)),
            Err(NetError::Length(3))
        );
        assert!(IpNet::from_pb(&pb(vec![0; 16], 129)).is_err());
        assert_eq!(
            IpNet::from_pb(&pb(vec![10, 0, 0, 0], 8))
                .unwrap()
                .to_string(),
            "10.0.0.0/8"
        );
        let mapped = Ipv4Addr::new(10, 0, 0, 0)
            .to_ipv6_mapped()
            .octets()
            .to_vec();
        assert_eq!(
            IpNet::from_pb(&pb(mapped, 104)).unwrap().to_string(),
            "10.0.0.0/8"
        );
        // A bad exception fails the network instead of widening it.
        let n = weft_proto::policy::Network {
            net: Some(pb(vec![10, 0, 0, 0], 8)),
            except: vec![pb(vec![10, 1, 0, 0], 40)],
        };
        assert!(Network::from_pb(&n).is_err());
        assert_eq!(
            Network::from_pb(&weft_proto::policy::Network::default()),
            Err(NetError::Missing)
        );
    }

    /// The reference: the first `prefix` bits are equal.
    fn same_prefix(a: u128, b: u128, bits: u32, prefix: u32) -> bool {
        prefix == 0 || (a ^ b) >> (bits - prefix) == 0
    }

    proptest! {
        #[test]
        fn v4_containment_is_prefix_equality(n in any::<u32>(), a in any::<u32>(), prefix in 0u32..=32) {
            let net = IpNet::new(IpAddr::V4(Ipv4Addr::from(n)), prefix).unwrap();
            let want = same_prefix(u128::from(n), u128::from(a), 32, prefix);
            prop_assert_eq!(net.contains(IpAddr::V4(Ipv4Addr::from(a))), want);
            // The same client seen through a dual-stack socket.
            prop_assert_eq!(net.contains(IpAddr::V6(Ipv4Addr::from(a).to_ipv6_mapped())), want);
            // The same network written v4-mapped.
            let mapped = IpNet::new(IpAddr::V6(Ipv4Addr::from(n).to_ipv6_mapped()), prefix + 96).unwrap();
            prop_assert_eq!(mapped, net);
        }

        #[test]
        fn v6_containment_is_prefix_equality(n in any::<u128>(), a in any::<u128>(), prefix in 0u32..=128) {
            let net = IpNet::new(IpAddr::V6(Ipv6Addr::from(n)), prefix).unwrap();
            let addr = Ipv6Addr::from(a);
            // Mapped addresses and networks are IPv4 ones; canonicalising both keeps this.
            prop_assert_eq!(net.contains(IpAddr::V6(addr)), same_prefix(n, a, 128, prefix));
            prop_assert!(net.contains(IpAddr::V6(Ipv6Addr::from(n))));
        }

        #[test]
        fn a_network_contains_itself_and_no_exception(n in any::<u32>(), prefix in 0u32..=32, e in any::<u32>(), eprefix in 0u32..=32, a in any::<u32>()) {
            let base = IpNet::new(IpAddr::V4(Ipv4Addr::from(n)), prefix).unwrap();
            prop_assert!(base.contains(IpAddr::V4(Ipv4Addr::from(n))));
            let except = IpNet::new(IpAddr::V4(Ipv4Addr::from(e)), eprefix).unwrap();
            let net = Network { net: base, except: vec![except] };
            let a = IpAddr::V4(Ipv4Addr::from(a));
            prop_assert_eq!(net.contains(a), base.contains(a) && !except.contains(a));
            if except.contains(a) {
                prop_assert!(!net.contains(a));
            }
        }
    }
}

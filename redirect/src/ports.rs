//! Port lists and CIDRs as users write them in annotations and flags.
//!
//! One parser serves the webhook (validating `config.weft.dev/*` annotations before a pod is
//! admitted) and the redirect installers, `weft-init` and `weft-cni` (turning the same strings
//! into iptables matches), so a value the webhook accepts is a value they can install.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

/// Why a port list or CIDR list did not parse. The caller adds where the value came from.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("{0:?} is not a port (want 1-65535)")]
    Port(String),
    #[error("{0:?} is not a port range (want LOW-HIGH with LOW <= HIGH)")]
    Range(String),
    #[error("{0:?} is not a CIDR (want ADDRESS/PREFIX, e.g. 10.0.0.0/8 or fd00::/8)")]
    Cidr(String),
}

/// An inclusive port range; a single port is `lo == hi`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PortRange {
    pub lo: u16,
    pub hi: u16,
}

impl PortRange {
    pub fn single(port: u16) -> Self {
        Self { lo: port, hi: port }
    }

    pub fn contains(&self, port: u16) -> bool {
        self.lo <= port && port <= self.hi
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.lo == self.hi {
            write!(f, "{}", self.lo)
        } else {
            write!(f, "{}-{}", self.lo, self.hi)
        }
    }
}

/// A comma-separated list of ports and ranges: `"25,3306,8000-8100"`. Whitespace around items
/// is ignored, and so are empty items (`"25,"`), so an empty string is an empty list.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct PortList(pub Vec<PortRange>);

impl PortList {
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn contains(&self, port: u16) -> bool {
        self.0.iter().any(|r| r.contains(port))
    }

    /// This list with `other`'s ranges appended (duplicates removed, order kept).
    pub fn union(&self, other: &PortList) -> PortList {
        let mut out = self.0.clone();
        for r in &other.0 {
            if !out.contains(r) {
                out.push(*r);
            }
        }
        PortList(out)
    }
}

fn parse_port(s: &str) -> Result<u16, ParseError> {
    match s.parse::<u16>() {
        Ok(p) if p > 0 => Ok(p),
        _ => Err(ParseError::Port(s.to_string())),
    }
}

impl FromStr for PortList {
    type Err = ParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut out = Vec::new();
        for item in s.split(',').map(str::trim).filter(|i| !i.is_empty()) {
            let range = match item.split_once('-') {
                Some((lo, hi)) => {
                    let (lo, hi) = (lo.trim(), hi.trim());
                    let range_err = || ParseError::Range(item.to_string());
                    let lo = parse_port(lo).map_err(|_| range_err())?;
                    let hi = parse_port(hi).map_err(|_| range_err())?;
                    if lo > hi {
                        return Err(range_err());
                    }
                    PortRange { lo, hi }
                }
                None => PortRange::single(parse_port(item)?),
            };
            if !out.contains(&range) {
                out.push(range);
            }
        }
        Ok(PortList(out))
    }
}

impl fmt::Display for PortList {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, r) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{r}")?;
        }
        Ok(())
    }
}

/// An IPv4 or IPv6 network, `ADDRESS/PREFIX`. A bare address means a single host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Cidr {
    pub addr: IpAddr,
    pub prefix: u8,
}

impl Cidr {
    pub fn is_ipv4(&self) -> bool {
        self.addr.is_ipv4()
    }

    /// The network address: host bits cleared, as iptables stores and prints it
    /// (`10.1.2.3/16` → `10.1.0.0/16`).
    pub fn network(&self) -> Cidr {
        let addr = match self.addr {
            IpAddr::V4(a) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                IpAddr::V4((u32::from(a) & mask).into())
            }
            IpAddr::V6(a) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                IpAddr::V6((u128::from(a) & mask).into())
            }
        };
        Cidr {
            addr,
            prefix: self.prefix,
        }
    }
}

impl FromStr for Cidr {
    type Err = ParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || ParseError::Cidr(s.to_string());
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = addr.trim().parse().map_err(|_| err())?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            Some(p) => p.trim().parse::<u8>().map_err(|_| err())?,
            None => max,
        };
        if prefix > max {
            return Err(err());
        }
        Ok(Cidr { addr, prefix })
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// A comma-separated list of CIDRs, IPv4 and IPv6 mixed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct CidrList(pub Vec<Cidr>);

impl CidrList {
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl FromStr for CidrList {
    type Err = ParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut out = Vec::new();
        for item in s.split(',').map(str::trim).filter(|i| !i.is_empty()) {
            let c: Cidr = item.parse()?;
            if !out.contains(&c) {
                out.push(c);
            }
        }
        Ok(CidrList(out))
    }
}

impl fmt::Display for CidrList {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, c) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{c}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn port_lists() {
        let ok = [
            ("", ""),
            (" ", ""),
            ("25", "25"),
            ("25, 3306 ,8000-8100,", "25,3306,8000-8100"),
            ("80,80", "80"),
            ("1-65535", "1-65535"),
            ("7-7", "7"),
        ];
        for (input, want) in ok {
            let got: PortList = input.parse().unwrap_or_else(|e| panic!("{input:?}: {e}"));
            assert_eq!(got.to_string(), want, "{input:?}");
        }
        let bad = ["0", "65536", "http", "10-5", "-5", "5-", "1.5", "80;81"];
        for input in bad {
            assert!(input.parse::<PortList>().is_err(), "{input:?} parsed");
        }
        let l: PortList = "25,8000-8100".parse().unwrap_or_default();
        assert!(l.contains(8050) && l.contains(25) && !l.contains(26));
    }

    #[test]
    fn cidrs() {
        let l: CidrList = "10.0.0.0/8, 192.168.1.1,fd00::/8"
            .parse()
            .unwrap_or_default();
        assert_eq!(l.to_string(), "10.0.0.0/8,192.168.1.1/32,fd00::/8");
        for (given, network) in [
            ("10.1.2.3/16", "10.1.0.0/16"),
            ("10.1.2.3", "10.1.2.3/32"),
            ("0.0.0.0/0", "0.0.0.0/0"),
            ("fd00::1/8", "fd00::/8"),
            ("::/0", "::/0"),
        ] {
            let c: Cidr = given.parse().unwrap_or_else(|e| panic!("{given}: {e}"));
            assert_eq!(c.network().to_string(), network);
        }
        for bad in ["10.0.0.0/33", "fd00::/129", "10.0.0/8", "x", "10.0.0.0/"] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad:?} parsed");
        }
    }

    proptest! {
        #[test]
        fn port_list_display_round_trips(ranges in proptest::collection::vec((1u16.., 0u16..100), 0..8)) {
            let list = PortList(ranges.iter().map(|&(lo, w)| PortRange { lo, hi: lo.saturating_add(w) }).collect());
            let text = list.to_string();
            let parsed: PortList = text.parse().map_err(|e| TestCaseError::fail(format!("{e}")))?;
            let mut dedup = Vec::new();
            for r in list.0 { if !dedup.contains(&r) { dedup.push(r) } }
            prop_assert_eq!(parsed.0, dedup);
        }

        #[test]
        fn port_list_parser_never_panics(s in "\\PC{0,40}") {
            let _ = s.parse::<PortList>();
            let _ = s.parse::<CidrList>();
        }
    }
}

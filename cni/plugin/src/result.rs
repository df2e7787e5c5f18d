//! The spec's result types (section 5): what ADD prints, what an IPAM plugin
//! returns, what `prevResult` holds. 1.0.0 and 1.1.0 share this format.
//!
//! [`IpNet`] is written here rather than taken from the `ipnet` crate: the
//! plugin needs parse, print and a network mask, a few dozen lines, and the
//! type's serde form must be the spec's CIDR string.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::error::Error;

/// An address with a prefix length, in CIDR notation (`10.0.0.5/24`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IpNet {
    pub addr: IpAddr,
    pub prefix: u8,
}

impl IpNet {
    /// `addr` with the prefix length that covers it alone (/32 or /128).
    pub fn host(addr: IpAddr) -> IpNet {
        IpNet {
            addr,
            prefix: if addr.is_ipv4() { 32 } else { 128 },
        }
    }

    /// The default route's destination for `addr`'s family.
    pub fn default_for(addr: &IpAddr) -> IpNet {
        let any = if addr.is_ipv4() {
            IpAddr::from([0u8; 4])
        } else {
            IpAddr::from([0u16; 8])
        };
        IpNet {
            addr: any,
            prefix: 0,
        }
    }

    /// The network address (host bits cleared).
    pub fn network(&self) -> IpNet {
        let addr = match self.addr {
            IpAddr::V4(a) => {
                let bits = u32::from(a);
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                IpAddr::from((bits & mask).to_be_bytes())
            }
            IpAddr::V6(a) => {
                let bits = u128::from(a);
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                IpAddr::from((bits & mask).to_be_bytes())
            }
        };
        IpNet {
            addr,
            prefix: self.prefix,
        }
    }
}

impl fmt::Display for IpNet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl FromStr for IpNet {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (a, p) = s
            .split_once('/')
            .ok_or_else(|| format!("{s:?} is not in CIDR notation (address/prefix)"))?;
        let addr: IpAddr = a
            .parse()
            .map_err(|_| format!("{a:?} in {s:?} is not an IP address"))?;
        let prefix: u8 = p
            .parse()
            .map_err(|_| format!("prefix {p:?} in {s:?} is not a number"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        if prefix > max {
            return Err(format!("prefix /{prefix} in {s:?} is longer than {max}"));
        }
        Ok(IpNet { addr, prefix })
    }
}

impl Serialize for IpNet {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for IpNet {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// An ADD result (or an IPAM plugin's abbreviated one).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CniResult {
    pub cni_version: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub interfaces: Vec<Interface>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ips: Vec<IpConfig>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<Route>,
    #[serde(default, skip_serializing_if = "Dns::is_empty")]
    pub dns: Dns,
}

impl CniResult {
    /// Decodes a result from JSON; `what` names its source in the error.
    pub fn parse(bytes: &[u8], what: &str) -> Result<CniResult, Error> {
        serde_json::from_slice(bytes).map_err(|e| Error::Decode {
            what: what.to_string(),
            reason: e.to_string(),
        })
    }

    /// The index of the interface `ifname` inside `sandbox`, if listed.
    pub fn sandbox_interface(&self, ifname: &str, sandbox: Option<&str>) -> Option<usize> {
        self.interfaces.iter().position(|i| {
            i.name == ifname && !i.sandbox.is_empty() && sandbox.is_none_or(|s| s == i.sandbox)
        })
    }

    /// The addresses assigned to interface `index` (or, for results that do
    /// not say which interface, every address).
    pub fn ips_of(&self, index: Option<usize>) -> Vec<IpNet> {
        self.ips
            .iter()
            .filter(|ip| ip.interface.is_none() || ip.interface == index)
            .map(|ip| ip.address)
            .collect()
    }
}

/// One interface of a result.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Interface {
    pub name: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub mac: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub sandbox: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub socket_path: Option<String>,
    #[serde(default, rename = "pciID", skip_serializing_if = "Option::is_none")]
    pub pci_id: Option<String>,
}

/// One address of a result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IpConfig {
    pub address: IpNet,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<IpAddr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interface: Option<usize>,
}

/// One route of a result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Route {
    pub dst: IpNet,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gw: Option<IpAddr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub advmss: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub table: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<u32>,
}

/// DNS settings of a result.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dns {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nameservers: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub search: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub options: Vec<String>,
}

impl Dns {
    pub fn is_empty(&self) -> bool {
        self.nameservers.is_empty()
            && self.domain.is_none()
            && self.search.is_empty()
            && self.options.is_empty()
    }
}

/// The VERSION result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VersionResult {
    pub cni_version: String,
    pub supported_versions: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipnet_round_trips_and_rejects() {
        for s in ["10.0.0.5/24", "0.0.0.0/0", "fd00::5/128", "::/0"] {
            let n: IpNet = s.parse().expect(s);
            assert_eq!(n.to_string(), s);
        }
        for s in ["10.0.0.5", "10.0.0.5/33", "fd00::/129", "x/1", "10.0.0.1/x"] {
            assert!(s.parse::<IpNet>().is_err(), "{s}");
        }
        let n: IpNet = "10.1.2.3/16".parse().expect("valid");
        assert_eq!(n.network().to_string(), "10.1.0.0/16");
        let n: IpNet = "fd00::1:2/112".parse().expect("valid");
        assert_eq!(n.network().to_string(), "fd00::1:0/112");
        assert_eq!(IpNet::host("10.0.0.1".parse().expect("ip")).prefix, 32);
    }

    #[test]
    fn host_local_output_parses() {
        let out = br#"{"cniVersion":"1.0.0","ips":[{"address":"10.99.0.2/24","gateway":"10.99.0.1"},{"address":"fd99::2/64","gateway":"fd99::1"}],"routes":[{"dst":"0.0.0.0/0"}],"dns":{}}"#;
        let r = CniResult::parse(out, "IPAM output").expect("parses");
        assert_eq!(r.ips.len(), 2);
        assert_eq!(r.ips[0].interface, None);
        assert!(r.dns.is_empty());
        let json = serde_json::to_string(&r).expect("serializes");
        assert!(!json.contains("dns"), "{json}");
    }

    #[test]
    fn sandbox_interface_and_its_ips() {
        let r: CniResult = serde_json::from_str(
            r#"{"cniVersion":"1.0.0",
                "interfaces":[{"name":"veth1"},{"name":"eth0","sandbox":"/run/netns/a"}],
                "ips":[{"address":"10.0.0.2/24","interface":1},{"address":"10.9.9.9/32","interface":0}]}"#,
        )
        .expect("parses");
        assert_eq!(r.sandbox_interface("eth0", Some("/run/netns/a")), Some(1));
        assert_eq!(r.sandbox_interface("eth0", Some("/run/netns/b")), None);
        assert_eq!(r.sandbox_interface("veth1", None), None);
        assert_eq!(
            r.ips_of(Some(1)),
            vec!["10.0.0.2/24".parse::<IpNet>().expect("ip")]
        );
    }
}

//! The seam in front of the kernel: the datapath (maps, attachments) and the node's
//! interfaces. [`weft_datapath::Datapath`] plus the OS in production, [`FakeDataplane`] in
//! unit tests.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::CStr;
use std::net::IpAddr;

use weft_datapath::{self as dp, Datapath, FakeMaps, PolicyMaps};

/// What the agent needs from the node: the map writer, attaching programs, and which
/// interfaces exist.
pub trait Dataplane: PolicyMaps + Send + 'static {
    fn attach(&mut self, ifindex: u32) -> Result<(), dp::Error>;
    fn detach(&mut self, ifindex: u32) -> Result<(), dp::Error>;
    /// Interfaces that have our programs attached (pinned links), existing or not.
    fn attached(&self) -> Result<Vec<u32>, dp::Error>;
    /// The name of interface `ifindex` in the agent's namespace, if it exists.
    fn interface_name(&self, ifindex: u32) -> Option<String>;
}

impl Dataplane for Datapath {
    fn attach(&mut self, ifindex: u32) -> Result<(), dp::Error> {
        Datapath::attach(self, ifindex)
    }
    fn detach(&mut self, ifindex: u32) -> Result<(), dp::Error> {
        Datapath::detach(self, ifindex)
    }
    fn attached(&self) -> Result<Vec<u32>, dp::Error> {
        Datapath::attached(self)
    }
    fn interface_name(&self, ifindex: u32) -> Option<String> {
        if_name(ifindex)
    }
}

/// `if_indextoname`.
pub fn if_name(ifindex: u32) -> Option<String> {
    let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: buf has IF_NAMESIZE bytes, as if_indextoname requires.
    let p = unsafe { libc::if_indextoname(ifindex, buf.as_mut_ptr()) };
    if p.is_null() {
        return None;
    }
    // SAFETY: on success the buffer holds a NUL-terminated name.
    let name = unsafe { CStr::from_ptr(buf.as_ptr()) };
    Some(name.to_string_lossy().into_owned())
}

/// The addresses of this network namespace's interfaces, by interface name
/// (`getifaddrs`).
pub fn interface_addresses() -> std::io::Result<Vec<(String, IpAddr)>> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `head` with a list we free below.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut out = Vec::new();
    let mut cur = head;
    while !cur.is_null() {
        // SAFETY: cur is a node of the list getifaddrs returned, not yet freed.
        let ifa = unsafe { &*cur };
        cur = ifa.ifa_next;
        if ifa.ifa_addr.is_null() || ifa.ifa_name.is_null() {
            continue;
        }
        // SAFETY: ifa_name is a NUL-terminated string owned by the list.
        let name = unsafe { CStr::from_ptr(ifa.ifa_name) }
            .to_string_lossy()
            .into_owned();
        // SAFETY: ifa_addr points at a sockaddr whose family says its real type.
        let family = i32::from(unsafe { (*ifa.ifa_addr).sa_family });
        let ip = match family {
            libc::AF_INET => {
                // SAFETY: family AF_INET: a sockaddr_in.
                let sin = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in) };
                IpAddr::from(u32::from_be(sin.sin_addr.s_addr).to_be_bytes())
            }
            libc::AF_INET6 => {
                // SAFETY: family AF_INET6: a sockaddr_in6.
                let sin6 = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in6) };
                IpAddr::from(sin6.sin6_addr.s6_addr)
            }
            _ => continue,
        };
        out.push((name, ip));
    }
    // SAFETY: head came from getifaddrs and is freed once.
    unsafe { libc::freeifaddrs(head) };
    Ok(out)
}

/// The node's own addresses, as a pod sees them: every address of an interface that is not a
/// pod's host veth (`pod_ifnames`), without loopback, link-local and unspecified ones, plus
/// the configured `extra` (`--node-ip`). Sorted, deduplicated.
pub fn node_addresses(
    addrs: &[(String, IpAddr)],
    pod_ifnames: &BTreeSet<String>,
    extra: &[IpAddr],
) -> Vec<IpAddr> {
    let mut out: BTreeSet<IpAddr> = addrs
        .iter()
        .filter(|(name, _)| !pod_ifnames.contains(name))
        .map(|(_, ip)| *ip)
        .filter(|ip| !ip.is_loopback() && !ip.is_unspecified() && !is_link_local(ip))
        .collect();
    out.extend(extra.iter().copied());
    out.into_iter().collect()
}

pub(crate) fn is_link_local(ip: &IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_link_local(),
        IpAddr::V6(v6) => (v6.segments()[0] & 0xffc0) == 0xfe80,
    }
}

/// An in-memory dataplane for unit tests: [`FakeMaps`], a set of attached interfaces and a
/// set of interfaces that exist.
#[derive(Debug, Default)]
pub struct FakeDataplane {
    pub maps: FakeMaps,
    pub attached: BTreeSet<u32>,
    /// ifindex → name of the interfaces that "exist".
    pub interfaces: BTreeMap<u32, String>,
    /// Make the next attach fail.
    pub fail_attach: bool,
}

impl Dataplane for FakeDataplane {
    fn attach(&mut self, ifindex: u32) -> Result<(), dp::Error> {
        if self.fail_attach || !self.interfaces.contains_key(&ifindex) {
            return Err(dp::Error::NoInterface { ifindex });
        }
        self.attached.insert(ifindex);
        Ok(())
    }
    fn detach(&mut self, ifindex: u32) -> Result<(), dp::Error> {
        self.attached.remove(&ifindex);
        Ok(())
    }
    fn attached(&self) -> Result<Vec<u32>, dp::Error> {
        Ok(self.attached.iter().copied().collect())
    }
    fn interface_name(&self, ifindex: u32) -> Option<String> {
        self.interfaces.get(&ifindex).cloned()
    }
}

impl PolicyMaps for FakeDataplane {
    fn set_endpoint(
        &mut self,
        ifindex: u32,
        ep_id: u32,
        flags: dp::EndpointFlags,
    ) -> Result<(), dp::Error> {
        self.maps.set_endpoint(ifindex, ep_id, flags)
    }
    fn set_endpoint_addrs(&mut self, ifindex: u32, addrs: &[IpAddr]) -> Result<(), dp::Error> {
        self.maps.set_endpoint_addrs(ifindex, addrs)
    }
    fn endpoint_addrs(&self) -> Result<BTreeMap<u32, Vec<IpAddr>>, dp::Error> {
        self.maps.endpoint_addrs()
    }
    fn remove_endpoint(&mut self, ifindex: u32) -> Result<(), dp::Error> {
        self.maps.remove_endpoint(ifindex)
    }
    fn endpoints(&self) -> Result<BTreeMap<u32, dp::Endpoint>, dp::Error> {
        self.maps.endpoints()
    }
    fn replace_policy(&mut self, ep_id: u32, entries: &[dp::Entry]) -> Result<(), dp::Error> {
        self.maps.replace_policy(ep_id, entries)
    }
    fn flush_conntrack(&mut self, ep_id: u32) -> Result<usize, dp::Error> {
        self.maps.flush_conntrack(ep_id)
    }
    fn counters(&self) -> Result<BTreeMap<u32, dp::PolicyCounters>, dp::Error> {
        self.maps.counters()
    }
    fn remove_counters(&mut self, policy: u32) -> Result<(), dp::Error> {
        self.maps.remove_counters(policy)
    }
    fn drops(&self) -> Result<BTreeMap<(u32, dp::Direction), u64>, dp::Error> {
        self.maps.drops()
    }
    fn source_drops(&self) -> Result<BTreeMap<u32, u64>, dp::Error> {
        self.maps.source_drops()
    }
    fn flow_lost(&self) -> Result<u64, dp::Error> {
        self.maps.flow_lost()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_addresses_leave_out_pod_veths_loopback_and_link_local() {
        let ip = |s: &str| s.parse::<IpAddr>().expect("ip");
        let addrs = vec![
            ("lo".to_string(), ip("127.0.0.1")),
            ("lo".to_string(), ip("10.250.0.1")),
            ("eth0".to_string(), ip("192.168.1.5")),
            ("eth0".to_string(), ip("fe80::1")),
            ("lxcabc".to_string(), ip("169.254.1.1")),
            ("lxcdef".to_string(), ip("10.9.9.9")),
        ];
        let pods: BTreeSet<String> = ["lxcdef".to_string()].into();
        assert_eq!(
            node_addresses(&addrs, &pods, &[ip("203.0.113.7")]),
            vec![ip("10.250.0.1"), ip("192.168.1.5"), ip("203.0.113.7")]
        );
        let here = interface_addresses().expect("getifaddrs");
        assert!(here.iter().any(|(_, a)| a.is_loopback()), "{here:?}");
    }
}

//! The decisions of an attachment, as pure functions: which mode, which host
//! interface name, which addresses and routes go where, what ADD prints, and
//! whether what CHECK observed matches `prevResult`.
//!
//! The wiring is Cilium's veth mode without eBPF ARP replies: no bridge, every
//! packet a pod sends leaves through its veth to the host, which routes it.
//!
//! * In the pod, each address is installed as a host prefix (/32, /128), so
//!   nothing is on-link and every destination goes through the gateway.
//! * IPv4 gateway: [`GATEWAY_V4`] (169.254.1.1), a link-local address nobody
//!   owns, reached `onlink`; the pod gets a permanent neighbour entry mapping
//!   it to the host veth's MAC, and the host veth answers ARP for it anyway
//!   (`proxy_arp`) should the entry be flushed.
//! * IPv6 gateway: [`GATEWAY_V6`] (fe80::1), added to the host veth (without
//!   duplicate address detection, so it works at once); every host veth has
//!   it, which link-local scope allows.
//! * On the host, one route per pod address (/32, /128) through the host veth.
//! * Routes the IPAM plugin returns are installed through the same gateway:
//!   their `gw` cannot be honoured without a bridge, so it is replaced. A
//!   default route from IPAM is the one the plugin installs anyway.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::config::NetConf;
use crate::env::Command;
use crate::error::Error;
use crate::result::{CniResult, Dns, Interface, IpConfig, IpNet, Route};

/// The pod's IPv4 next hop.
pub const GATEWAY_V4: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);
/// The pod's IPv6 next hop, owned by every host veth.
pub const GATEWAY_V6: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1);
/// The prefix of host-side interface names (Cilium's).
pub const HOST_IFNAME_PREFIX: &str = "lxc";

/// The gateway for `addr`'s family.
pub fn gateway_for(addr: &IpAddr) -> IpAddr {
    if addr.is_ipv4() {
        IpAddr::V4(GATEWAY_V4)
    } else {
        IpAddr::V6(GATEWAY_V6)
    }
}

/// How this plugin takes part in the attachment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// weft-cni creates the veth and delegates addresses to IPAM.
    Primary,
    /// Another plugin created the interface; weft-cni registers it.
    Chained,
}

/// The mode for `command` under `conf`.
///
/// ADD decides by `prevResult` (the spec gives the first plugin none); DEL,
/// CHECK, STATUS and GC decide by the `ipam` section, since the runtime hands
/// every plugin a `prevResult` for those. An ADD with both is refused: it
/// would be chained on ADD and primary on DEL.
pub fn mode(command: Command, conf: &NetConf) -> Result<Mode, Error> {
    let has_ipam = conf.ipam_type.is_some();
    match command {
        Command::Add => match (conf.prev_result.is_some(), has_ipam) {
            (true, false) => Ok(Mode::Chained),
            (false, true) => Ok(Mode::Primary),
            (true, true) => Err(Error::config(
                "ipam",
                "set together with prevResult: weft-cni chained after another plugin (prevResult present) uses that plugin's addresses; remove the ipam section, or make weft-cni the first plugin",
            )),
            (false, false) => Err(Error::config(
                "ipam",
                "missing: as the first plugin weft-cni needs an ipam section (e.g. {\"type\": \"host-local\", ...}); chained after another plugin it needs that plugin's prevResult",
            )),
        },
        _ if has_ipam => Ok(Mode::Primary),
        _ => Ok(Mode::Chained),
    }
}

/// The host-side veth name for an attachment: `lxc` and 12 hex digits of
/// SHA-256 over the container id and interface name (15 bytes, the kernel's
/// limit), so DEL finds it from the same two values.
pub fn host_ifname(container_id: &str, ifname: &str) -> String {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(container_id.as_bytes());
    ctx.update(b"/");
    ctx.update(ifname.as_bytes());
    let digest = ctx.finish();
    let mut name = String::from(HOST_IFNAME_PREFIX);
    for b in &digest.as_ref()[..6] {
        name.push_str(&format!("{b:02x}"));
    }
    name
}

/// A route in the pod: `dst` via `via` on the pod's interface (`onlink`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodRoute {
    pub dst: IpNet,
    pub via: IpAddr,
}

/// What to install for one primary-mode attachment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// The pod's addresses, as host prefixes.
    pub addrs: Vec<IpNet>,
    /// Routes in the pod, defaults first.
    pub routes: Vec<PodRoute>,
    /// Routes on the host through the host veth (one per pod address).
    pub host_routes: Vec<IpNet>,
    pub dns: Dns,
}

impl Plan {
    pub fn has_v4(&self) -> bool {
        self.addrs.iter().any(|a| a.addr.is_ipv4())
    }
    pub fn has_v6(&self) -> bool {
        self.addrs.iter().any(|a| a.addr.is_ipv6())
    }
}

/// The plan for an IPAM result (`ipam_plugin` names it in errors).
pub fn plan(ipam: &CniResult, ipam_plugin: &str) -> Result<Plan, Error> {
    let mut addrs: Vec<IpNet> = Vec::new();
    for ip in &ipam.ips {
        let a = IpNet::host(ip.address.addr);
        if !addrs.contains(&a) {
            addrs.push(a);
        }
    }
    if addrs.is_empty() {
        return Err(Error::Ipam {
            plugin: ipam_plugin.to_string(),
            command: "ADD".into(),
            reason: "returned no addresses (field ips is empty)".into(),
        });
    }
    let mut routes: Vec<PodRoute> = Vec::new();
    let mut push = |r: PodRoute| {
        if !routes.contains(&r) {
            routes.push(r);
        }
    };
    for a in &addrs {
        push(PodRoute {
            dst: IpNet::default_for(&a.addr),
            via: gateway_for(&a.addr),
        });
    }
    for r in &ipam.routes {
        let family_has_addr = addrs
            .iter()
            .any(|a| a.addr.is_ipv4() == r.dst.addr.is_ipv4());
        if r.dst.prefix == 0 || !family_has_addr {
            continue;
        }
        push(PodRoute {
            dst: r.dst.network(),
            via: gateway_for(&r.dst.addr),
        });
    }
    Ok(Plan {
        host_routes: addrs.clone(),
        addrs,
        routes,
        dns: ipam.dns.clone(),
    })
}

/// A link as the result reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkInfo {
    pub name: String,
    pub mac: String,
    pub index: u32,
}

/// The ADD result for a primary-mode attachment: the host veth (index 0),
/// the pod interface (index 1) and what the plan installed.
pub fn build_result(
    cni_version: &str,
    plan: &Plan,
    host: &LinkInfo,
    pod: &LinkInfo,
    netns: &str,
    mtu: u32,
) -> CniResult {
    CniResult {
        cni_version: cni_version.to_string(),
        interfaces: vec![
            Interface {
                name: host.name.clone(),
                mac: host.mac.clone(),
                mtu: Some(mtu),
                ..Interface::default()
            },
            Interface {
                name: pod.name.clone(),
                mac: pod.mac.clone(),
                mtu: Some(mtu),
                sandbox: netns.to_string(),
                ..Interface::default()
            },
        ],
        ips: plan
            .addrs
            .iter()
            .map(|a| IpConfig {
                address: *a,
                gateway: Some(gateway_for(&a.addr)),
                interface: Some(1),
            })
            .collect(),
        routes: plan
            .routes
            .iter()
            .map(|r| Route {
                dst: r.dst,
                gw: Some(r.via),
                mtu: None,
                advmss: None,
                priority: None,
                table: None,
                scope: None,
            })
            .collect(),
        dns: plan.dns.clone(),
    }
}

/// `prevResult` passed through as this plugin's result, in the
/// configuration's version.
pub fn pass_through(prev_raw: &serde_json::Value, cni_version: &str) -> serde_json::Value {
    let mut v = prev_raw.clone();
    if let Some(obj) = v.as_object_mut() {
        obj.insert(
            "cniVersion".into(),
            serde_json::Value::String(cni_version.to_string()),
        );
    }
    v
}

/// The addresses `prev` gives the pod interface `ifname` in `netns` (every
/// address, if the result does not say which interface has which).
pub fn attachment_ips(prev: &CniResult, ifname: &str, netns: Option<&str>) -> Vec<IpAddr> {
    let idx = prev.sandbox_interface(ifname, netns);
    let ips: Vec<IpAddr> = prev
        .ips
        .iter()
        .filter(|ip| idx.is_none() || ip.interface.is_none() || ip.interface == idx)
        .map(|ip| ip.address.addr)
        .collect();
    ips
}

/// A MAC address as results print it.
pub fn format_mac(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// What CHECK found in the pod.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Observed {
    pub mac: String,
    pub addrs: Vec<IpNet>,
    /// Routes through the pod interface: destination and gateway.
    pub routes: Vec<(IpNet, Option<IpAddr>)>,
}

/// CHECK in the pod: the interface, its addresses and its routes against
/// `prev`. Routes a later plugin added are allowed; missing ones are not.
pub fn check_pod(
    prev: &CniResult,
    ifname: &str,
    netns: &str,
    observed: &Observed,
) -> Result<(), Error> {
    let idx = prev
        .sandbox_interface(ifname, Some(netns))
        .ok_or_else(|| Error::CheckMismatch {
            what: format!("prevResult lists no interface {ifname} with sandbox {netns}"),
        })?;
    let want_mac = &prev.interfaces[idx].mac;
    if !want_mac.is_empty() && !want_mac.eq_ignore_ascii_case(&observed.mac) {
        return Err(Error::CheckMismatch {
            what: format!(
                "{ifname} in {netns} has MAC {}, prevResult says {want_mac}",
                observed.mac
            ),
        });
    }
    for ip in prev.ips.iter().filter(|ip| ip.interface == Some(idx)) {
        if !observed.addrs.contains(&ip.address) {
            return Err(Error::CheckMismatch {
                what: format!(
                    "address {} is missing on {ifname} in {netns} (found: {})",
                    ip.address,
                    list(&observed.addrs)
                ),
            });
        }
    }
    for r in &prev.routes {
        let found = observed
            .routes
            .iter()
            .any(|(dst, gw)| *dst == r.dst.network() && (r.gw.is_none() || *gw == r.gw));
        if !found {
            return Err(Error::CheckMismatch {
                what: format!(
                    "route to {}{} is missing in {netns}",
                    r.dst,
                    r.gw.map(|g| format!(" via {g}")).unwrap_or_default()
                ),
            });
        }
    }
    Ok(())
}

/// CHECK on the host: one route per pod address through the host veth.
pub fn check_host_routes(
    pod_addrs: &[IpAddr],
    host_ifname: &str,
    host_routes: &[IpNet],
) -> Result<(), Error> {
    for a in pod_addrs {
        let want = IpNet::host(*a);
        if !host_routes.contains(&want) {
            return Err(Error::CheckMismatch {
                what: format!("host route to {want} via {host_ifname} is missing"),
            });
        }
    }
    Ok(())
}

fn list(v: &[IpNet]) -> String {
    if v.is_empty() {
        return "none".into();
    }
    v.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> IpNet {
        s.parse().expect("cidr")
    }

    fn ipam(json: &str) -> CniResult {
        CniResult::parse(json.as_bytes(), "test").expect("result")
    }

    fn conf(json: &str) -> NetConf {
        NetConf::parse(json.as_bytes()).expect("conf")
    }

    #[test]
    fn host_ifname_is_deterministic_short_and_distinct() {
        let a = host_ifname("abc", "eth0");
        assert_eq!(a, host_ifname("abc", "eth0"));
        assert_eq!(a.len(), 15);
        assert!(a.starts_with("lxc"));
        assert_ne!(a, host_ifname("abc", "eth1"));
        assert_ne!(a, host_ifname("abd", "eth0"));
        assert!(crate::env::validate_ifname(&a).is_ok());
    }

    #[test]
    fn mode_table() {
        let primary = conf(
            r#"{"cniVersion":"1.1.0","name":"n","type":"weft-cni","ipam":{"type":"host-local"}}"#,
        );
        let chained = conf(
            r#"{"cniVersion":"1.1.0","name":"n","type":"weft-cni","prevResult":{"cniVersion":"1.1.0"}}"#,
        );
        let primary_del = conf(
            r#"{"cniVersion":"1.1.0","name":"n","type":"weft-cni","ipam":{"type":"host-local"},"prevResult":{"cniVersion":"1.1.0"}}"#,
        );
        let bare = conf(r#"{"cniVersion":"1.1.0","name":"n","type":"weft-cni"}"#);
        assert_eq!(mode(Command::Add, &primary).ok(), Some(Mode::Primary));
        assert_eq!(mode(Command::Add, &chained).ok(), Some(Mode::Chained));
        assert_eq!(mode(Command::Del, &primary_del).ok(), Some(Mode::Primary));
        assert_eq!(mode(Command::Check, &primary_del).ok(), Some(Mode::Primary));
        assert_eq!(mode(Command::Del, &chained).ok(), Some(Mode::Chained));
        assert_eq!(mode(Command::Del, &bare).ok(), Some(Mode::Chained));
        assert_eq!(
            mode(Command::Add, &primary_del).map_err(|e| e.code()).err(),
            Some(7)
        );
        assert_eq!(
            mode(Command::Add, &bare).map_err(|e| e.code()).err(),
            Some(7)
        );
    }

    #[test]
    fn dual_stack_plan() {
        let p = plan(
            &ipam(
                r#"{"cniVersion":"1.0.0","ips":[{"address":"10.99.0.5/24","gateway":"10.99.0.1"},{"address":"fd99::5/64"}],
                    "routes":[{"dst":"0.0.0.0/0","gw":"10.99.0.1"},{"dst":"192.168.7.9/16"},{"dst":"fd77::/48","gw":"fd99::1"},{"dst":"::/0"}],
                    "dns":{"nameservers":["10.96.0.10"]}}"#,
            ),
            "host-local",
        )
        .expect("plan");
        assert_eq!(p.addrs, vec![net("10.99.0.5/32"), net("fd99::5/128")]);
        assert_eq!(p.host_routes, p.addrs);
        assert_eq!(
            p.routes,
            vec![
                PodRoute {
                    dst: net("0.0.0.0/0"),
                    via: "169.254.1.1".parse().expect("ip")
                },
                PodRoute {
                    dst: net("::/0"),
                    via: "fe80::1".parse().expect("ip")
                },
                PodRoute {
                    dst: net("192.168.0.0/16"),
                    via: "169.254.1.1".parse().expect("ip")
                },
                PodRoute {
                    dst: net("fd77::/48"),
                    via: "fe80::1".parse().expect("ip")
                },
            ]
        );
        assert!(p.has_v4() && p.has_v6());
        assert_eq!(p.dns.nameservers, vec!["10.96.0.10".to_string()]);
    }

    #[test]
    fn plan_drops_routes_of_a_family_without_addresses_and_needs_an_address() {
        let p = plan(
            &ipam(r#"{"cniVersion":"1.0.0","ips":[{"address":"fd99::5/64"}],"routes":[{"dst":"10.0.0.0/8"}]}"#),
            "h",
        )
        .expect("plan");
        assert_eq!(p.routes.len(), 1);
        assert!(!p.has_v4());
        let e = plan(&ipam(r#"{"cniVersion":"1.0.0"}"#), "host-local").expect_err("no ips");
        assert_eq!(e.code(), crate::error::codes::IPAM_FAILED);
        assert!(e.to_string().contains("host-local"));
    }

    #[test]
    fn result_and_check_agree() {
        let p = plan(
            &ipam(r#"{"cniVersion":"1.0.0","ips":[{"address":"10.99.0.5/24"}]}"#),
            "h",
        )
        .expect("plan");
        let host = LinkInfo {
            name: "lxc0123456789ab".into(),
            mac: "aa:bb:cc:dd:ee:01".into(),
            index: 7,
        };
        let pod = LinkInfo {
            name: "eth0".into(),
            mac: "aa:bb:cc:dd:ee:02".into(),
            index: 2,
        };
        let r = build_result("1.1.0", &p, &host, &pod, "/run/netns/a", 1500);
        let json = serde_json::to_value(&r).expect("json");
        assert_eq!(json["interfaces"][1]["sandbox"], "/run/netns/a");
        assert_eq!(json["ips"][0]["interface"], 1);
        assert_eq!(json["ips"][0]["address"], "10.99.0.5/32");
        assert_eq!(json["routes"][0]["gw"], "169.254.1.1");
        assert_eq!(
            attachment_ips(&r, "eth0", Some("/run/netns/a")),
            vec!["10.99.0.5".parse::<IpAddr>().expect("ip")]
        );

        let good = Observed {
            mac: "AA:BB:CC:DD:EE:02".into(),
            addrs: vec![net("10.99.0.5/32"), net("fe80::1234/64")],
            routes: vec![(net("0.0.0.0/0"), Some("169.254.1.1".parse().expect("ip")))],
        };
        check_pod(&r, "eth0", "/run/netns/a", &good).expect("matches");
        let mut no_addr = good.clone();
        no_addr.addrs.remove(0);
        assert!(check_pod(&r, "eth0", "/run/netns/a", &no_addr)
            .expect_err("addr")
            .to_string()
            .contains("10.99.0.5/32"));
        let mut no_route = good.clone();
        no_route.routes.clear();
        assert!(check_pod(&r, "eth0", "/run/netns/a", &no_route)
            .expect_err("route")
            .to_string()
            .contains("0.0.0.0/0"));
        let mut other_mac = good.clone();
        other_mac.mac = "00:00:00:00:00:01".into();
        assert_eq!(
            check_pod(&r, "eth0", "/run/netns/a", &other_mac).map_err(|e| e.code()),
            Err(105)
        );
        assert!(check_pod(&r, "eth1", "/run/netns/a", &good).is_err());

        let addrs = ["10.99.0.5".parse().expect("ip")];
        check_host_routes(&addrs, "lxc", &[net("10.99.0.5/32")]).expect("host route");
        assert!(check_host_routes(&addrs, "lxc", &[]).is_err());
    }

    #[test]
    fn pass_through_keeps_prev_result_and_sets_version() {
        let prev =
            serde_json::json!({"cniVersion":"1.0.0","ips":[{"address":"10.1.0.2/24"}],"custom":1});
        let out = pass_through(&prev, "1.1.0");
        assert_eq!(out["cniVersion"], "1.1.0");
        assert_eq!(out["custom"], 1);
        assert_eq!(format_mac(&[0xaa, 0x01, 0x0f]), "aa:01:0f");
    }
}

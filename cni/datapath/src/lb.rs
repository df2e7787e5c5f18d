//! Services in the datapath (the kube-proxy replacement): the frontends (ClusterIP or node
//! address, port, protocol) with their backends, as the agent writes them into `weft_lb_svc`,
//! and what the programs record about translated connections (`weft_lb_ct`, `weft_lb_stats`).
//!
//! [`ServiceMaps`] is the writer's seam: [`crate::Datapath`] implements it on the pinned maps,
//! [`crate::FakeMaps`] in memory. The whole backend set of a frontend is one map value, so
//! one update replaces it atomically; [`ServiceMaps::replace_services`] writes new and changed
//! frontends first and deletes stale ones afterwards, so no connection ever sees a frontend
//! without its backends during an update.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use aya::maps::{HashMap, MapData, MapError, PerCpuHashMap};

use crate::abi::{
    self, LbBackend, LbCtKey, LbCtValue, LbStatsValue, LbSvcKey, LbSvcValue, LB_MAX_BACKENDS,
};
use crate::datapath::typed;
use crate::error::cause;
use crate::Error;

/// The transport protocols services are translated for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum L4 {
    Tcp,
    Udp,
}

impl L4 {
    /// The IP protocol number.
    pub const fn ip_proto(self) -> u8 {
        match self {
            L4::Tcp => 6,
            L4::Udp => 17,
        }
    }

    pub const fn from_ip_proto(proto: u8) -> Option<Self> {
        match proto {
            6 => Some(L4::Tcp),
            17 => Some(L4::Udp),
            _ => None,
        }
    }

    /// `TCP`, `UDP` (as Kubernetes spells them); anything else is `None`.
    pub fn from_k8s(protocol: &str) -> Option<Self> {
        if protocol.eq_ignore_ascii_case("TCP") {
            Some(L4::Tcp)
        } else if protocol.eq_ignore_ascii_case("UDP") {
            Some(L4::Udp)
        } else {
            None
        }
    }
}

impl fmt::Display for L4 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            L4::Tcp => "TCP",
            L4::Udp => "UDP",
        })
    }
}

/// Where clients connect: a ClusterIP (or a node address for NodePort), a port, a protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Frontend {
    pub addr: IpAddr,
    pub port: u16,
    pub proto: L4,
}

impl fmt::Display for Frontend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}/{}",
            SocketAddr::new(self.addr, self.port),
            self.proto
        )
    }
}

/// One frontend and its ready backends, as the datapath holds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Service {
    /// The writer's id for the frontend (affinity entries and counters are keyed by it).
    pub id: u32,
    pub frontend: Frontend,
    /// Ready backends (empty: connections are refused), same family as the frontend, at
    /// most [`LB_MAX_BACKENDS`].
    pub backends: Vec<SocketAddr>,
    /// sessionAffinity ClientIP: a client keeps its backend for this many seconds after its
    /// last new connection.
    pub affinity_timeout_s: Option<u32>,
    /// A NodePort frontend (a node address) rather than a ClusterIP.
    pub node_port: bool,
    /// The backends (a subset of `backends`) on another node, which a NodePort frontend
    /// reaches through source NAT (`externalTrafficPolicy: Cluster`): the connection leaves
    /// with the node's address, so the answer comes back through this node. Sorted.
    pub remote: Vec<SocketAddr>,
}

/// Connections a frontend's id translated and refused (summed over CPUs).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServiceStats {
    pub conns: u64,
    pub refused: u64,
}

/// What a [`ServiceMaps::replace_services`] changed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServiceWrite {
    /// Frontends written (new or changed).
    pub written: usize,
    /// Frontends deleted (no longer wanted).
    pub deleted: usize,
}

/// The service map writer, as the agent sees it.
pub trait ServiceMaps {
    /// Makes `services` the whole frontend table: new and changed frontends are written
    /// first, stale ones deleted afterwards. Invalid services (too many backends, a backend
    /// of the other family, a frontend given twice) are refused before anything is written.
    fn replace_services(&mut self, services: &[Service]) -> Result<ServiceWrite, Error>;

    /// What the frontend table holds (sorted by frontend).
    fn services(&self) -> Result<Vec<Service>, Error>;

    /// Per frontend id: connections translated and refused.
    fn service_stats(&self) -> Result<BTreeMap<u32, ServiceStats>, Error>;

    /// Forgets the translations of `proto` connections to these backends (kube-proxy does
    /// the same for UDP when an endpoint goes: a "connection" without end would otherwise keep
    /// sending to it). Returns the number of connections forgotten.
    fn forget_backends(&mut self, proto: L4, backends: &[SocketAddr]) -> Result<usize, Error>;
}

fn addr16(ip: IpAddr) -> (u8, [u8; 16]) {
    let mut out = [0u8; 16];
    match ip {
        IpAddr::V4(v4) => {
            out[..4].copy_from_slice(&v4.octets());
            (4, out)
        }
        IpAddr::V6(v6) => (6, v6.octets()),
    }
}

fn ip_of(family: u8, addr: &[u8; 16]) -> Option<IpAddr> {
    match family {
        4 => Some(IpAddr::from([addr[0], addr[1], addr[2], addr[3]])),
        6 => Some(IpAddr::from(*addr)),
        _ => None,
    }
}

/// The `weft_lb_svc` key of a frontend.
pub fn encode_frontend(f: &Frontend) -> LbSvcKey {
    let (family, addr) = addr16(f.addr);
    LbSvcKey {
        family,
        proto: f.proto.ip_proto(),
        port: f.port.to_be(),
        addr,
    }
}

/// A frontend's key and value, checked.
pub fn encode_service(s: &Service) -> Result<(LbSvcKey, LbSvcValue), Error> {
    let invalid = |reason: String| Error::InvalidService {
        frontend: s.frontend.to_string(),
        svc_id: s.id,
        reason,
    };
    if s.backends.len() > LB_MAX_BACKENDS {
        return Err(invalid(format!(
            "{} backends, the datapath holds at most {LB_MAX_BACKENDS} per frontend",
            s.backends.len()
        )));
    }
    let key = encode_frontend(&s.frontend);
    let mut value = LbSvcValue {
        svc_id: s.id,
        count: s.backends.len() as u16,
        ..LbSvcValue::default()
    };
    if let Some(t) = s.affinity_timeout_s {
        value.flags |= abi::LB_F_AFFINITY;
        value.affinity_timeout_s = t;
    }
    if s.node_port {
        value.flags |= abi::LB_F_NODEPORT;
    }
    for (slot, b) in value.backends.iter_mut().zip(&s.backends) {
        let (family, addr) = addr16(b.ip());
        if family != key.family {
            return Err(invalid(format!(
                "backend {b} is not of the frontend's address family"
            )));
        }
        *slot = LbBackend {
            addr,
            port: b.port().to_be(),
            flags: if s.remote.contains(b) {
                abi::LB_BE_REMOTE
            } else {
                0
            },
        };
    }
    if let Some(r) = s.remote.iter().find(|r| !s.backends.contains(r)) {
        return Err(invalid(format!(
            "remote backend {r} is not one of the frontend's backends"
        )));
    }
    Ok((key, value))
}

/// The service a `weft_lb_svc` entry holds; `None` for a key no writer produces.
pub fn decode_service(k: &LbSvcKey, v: &LbSvcValue) -> Option<Service> {
    let addr = ip_of(k.family, &k.addr)?;
    let proto = L4::from_ip_proto(k.proto)?;
    let n = usize::from(v.count).min(LB_MAX_BACKENDS);
    let mut backends = Vec::with_capacity(n);
    let mut remote = Vec::new();
    for b in &v.backends[..n] {
        let Some(ip) = ip_of(k.family, &b.addr) else {
            continue;
        };
        let addr = SocketAddr::new(ip, u16::from_be(b.port));
        if b.flags & abi::LB_BE_REMOTE != 0 {
            remote.push(addr);
        }
        backends.push(addr);
    }
    remote.sort();
    Some(Service {
        id: v.svc_id,
        frontend: Frontend {
            addr,
            port: u16::from_be(k.port),
            proto,
        },
        backends,
        affinity_timeout_s: (v.flags & abi::LB_F_AFFINITY != 0).then_some(v.affinity_timeout_s),
        node_port: v.flags & abi::LB_F_NODEPORT != 0,
        remote,
    })
}

/// Every service encoded, keyed by frontend; refuses a frontend given twice.
pub(crate) fn encode_services(
    services: &[Service],
) -> Result<BTreeMap<LbSvcKey, LbSvcValue>, Error> {
    let mut out = BTreeMap::new();
    for s in services {
        let (k, v) = encode_service(s)?;
        if out.insert(k, v).is_some() {
            return Err(Error::InvalidService {
                frontend: s.frontend.to_string(),
                svc_id: s.id,
                reason: "the frontend is given twice".to_string(),
            });
        }
    }
    Ok(out)
}

/// A translated connection, as `weft_lb_ct` records it (for tests and debugging).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Translation {
    pub proto: L4,
    pub client: SocketAddr,
    pub frontend: SocketAddr,
    pub backend: SocketAddr,
    pub svc_id: u32,
}

/// The service maps on their pins.
pub(crate) struct LbMaps {
    pin_dir: PathBuf,
    svc: HashMap<MapData, LbSvcKey, LbSvcValue>,
    ct: HashMap<MapData, LbCtKey, LbCtValue>,
    stats: PerCpuHashMap<MapData, u32, LbStatsValue>,
    /// What this writer believes `weft_lb_svc` holds, read back on first use.
    installed: Option<BTreeMap<LbSvcKey, LbSvcValue>>,
}

fn is_not_found(e: &MapError) -> bool {
    match e {
        MapError::KeyNotFound | MapError::ElementNotFound => true,
        MapError::SyscallError(s) => s.io_error.kind() == std::io::ErrorKind::NotFound,
        _ => false,
    }
}

impl LbMaps {
    pub(crate) fn open(pin_dir: &Path) -> Result<Self, Error> {
        Ok(LbMaps {
            pin_dir: pin_dir.to_path_buf(),
            svc: typed(pin_dir, abi::map::LB_SVC)?,
            ct: typed(pin_dir, abi::map::LB_CT)?,
            stats: typed(pin_dir, abi::map::LB_STATS)?,
            installed: None,
        })
    }

    fn map_error(
        &self,
        map: &'static str,
        op: impl Into<String>,
    ) -> impl FnOnce(MapError) -> Error {
        let path = self.pin_dir.join(map);
        let op = op.into();
        move |e| Error::Map {
            map,
            path,
            op,
            cause: cause(e),
        }
    }

    fn read_svc(&self) -> Result<BTreeMap<LbSvcKey, LbSvcValue>, Error> {
        let mut out = BTreeMap::new();
        for item in self.svc.iter() {
            match item {
                Ok((k, v)) => {
                    out.insert(k, v);
                }
                Err(e) if is_not_found(&e) => {}
                Err(e) => return Err(self.map_error(abi::map::LB_SVC, "reading entries")(e)),
            }
        }
        Ok(out)
    }

    pub(crate) fn replace(&mut self, services: &[Service]) -> Result<ServiceWrite, Error> {
        let wanted = encode_services(services)?;
        let mut current = match self.installed.take() {
            Some(c) => c,
            None => self.read_svc()?,
        };
        let mut report = ServiceWrite::default();
        let mut result = Ok(());
        for (k, v) in &wanted {
            if current.get(k) == Some(v) {
                continue;
            }
            let frontend =
                decode_service(k, v).map_or_else(String::new, |s| s.frontend.to_string());
            if let Err(e) = self.svc.insert(k, v, 0) {
                result = Err(self
                    .map_error(abi::map::LB_SVC, format!("writing frontend {frontend}"))(
                    e,
                ));
                break;
            }
            current.insert(*k, *v);
            report.written += 1;
        }
        if result.is_ok() {
            let stale: Vec<LbSvcKey> = current
                .keys()
                .filter(|k| !wanted.contains_key(k))
                .copied()
                .collect();
            for k in stale {
                match self.svc.remove(&k) {
                    Ok(()) => {}
                    Err(e) if is_not_found(&e) => {}
                    Err(e) => {
                        result = Err(self
                            .map_error(abi::map::LB_SVC, "deleting a stale frontend")(
                            e
                        ));
                        break;
                    }
                }
                current.remove(&k);
                report.deleted += 1;
            }
        }
        self.installed = Some(current);
        result.map(|()| report)
    }

    pub(crate) fn services(&self) -> Result<Vec<Service>, Error> {
        Ok(self
            .read_svc()?
            .iter()
            .filter_map(|(k, v)| decode_service(k, v))
            .collect())
    }

    pub(crate) fn stats(&self) -> Result<BTreeMap<u32, ServiceStats>, Error> {
        let mut out = BTreeMap::new();
        for item in self.stats.iter() {
            match item {
                Ok((id, per_cpu)) => {
                    let mut sum = ServiceStats::default();
                    for v in per_cpu.iter() {
                        sum.conns += v.conns;
                        sum.refused += v.refused;
                    }
                    out.insert(id, sum);
                }
                Err(e) if is_not_found(&e) => {}
                Err(e) => return Err(self.map_error(abi::map::LB_STATS, "reading entries")(e)),
            }
        }
        Ok(out)
    }

    fn ct_entries(&self) -> Result<Vec<(LbCtKey, LbCtValue)>, Error> {
        let mut out = Vec::new();
        for item in self.ct.iter() {
            match item {
                Ok(kv) => out.push(kv),
                Err(e) if is_not_found(&e) => {}
                Err(e) => return Err(self.map_error(abi::map::LB_CT, "reading entries")(e)),
            }
        }
        Ok(out)
    }

    pub(crate) fn translations(&self) -> Result<Vec<Translation>, Error> {
        Ok(self
            .ct_entries()?
            .iter()
            .filter(|(k, _)| k.dir == abi::LB_CT_FORWARD)
            .filter_map(|(k, v)| {
                Some(Translation {
                    proto: L4::from_ip_proto(k.proto)?,
                    client: SocketAddr::new(ip_of(k.family, &k.saddr)?, u16::from_be(k.sport)),
                    frontend: SocketAddr::new(ip_of(k.family, &k.daddr)?, u16::from_be(k.dport)),
                    backend: SocketAddr::new(ip_of(k.family, &v.addr)?, u16::from_be(v.port)),
                    svc_id: v.svc_id,
                })
            })
            .collect())
    }

    pub(crate) fn forget_backends(
        &mut self,
        proto: L4,
        backends: &[SocketAddr],
    ) -> Result<usize, Error> {
        if backends.is_empty() {
            return Ok(0);
        }
        let gone = |family: u8, addr: &[u8; 16], port: u16| {
            ip_of(family, addr)
                .map(|ip| backends.contains(&SocketAddr::new(ip, u16::from_be(port))))
                .unwrap_or(false)
        };
        let mut doomed = Vec::new();
        let mut forgotten = 0;
        for (k, v) in self.ct_entries()? {
            if k.proto != proto.ip_proto() {
                continue;
            }
            let hit = if k.dir == abi::LB_CT_FORWARD {
                gone(k.family, &v.addr, v.port)
            } else {
                gone(k.family, &k.saddr, k.sport)
            };
            if hit {
                if k.dir == abi::LB_CT_FORWARD {
                    forgotten += 1;
                }
                doomed.push(k);
            }
        }
        for k in doomed {
            match self.ct.remove(&k) {
                Ok(()) => {}
                Err(e) if is_not_found(&e) => {}
                Err(e) => return Err(self.map_error(abi::map::LB_CT, "deleting a translation")(e)),
            }
        }
        Ok(forgotten)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc(id: u32, frontend: &str, proto: L4, backends: &[&str]) -> Service {
        let f: SocketAddr = frontend.parse().expect("frontend");
        Service {
            id,
            frontend: Frontend {
                addr: f.ip(),
                port: f.port(),
                proto,
            },
            backends: backends
                .iter()
                .map(|b| b.parse().expect("backend"))
                .collect(),
            affinity_timeout_s: None,
            node_port: false,
            remote: Vec::new(),
        }
    }

    #[test]
    fn services_encode_in_network_order_and_round_trip() {
        let mut s = svc(
            7,
            "10.96.0.10:53",
            L4::Udp,
            &["10.0.0.2:5353", "10.0.0.3:5353"],
        );
        s.affinity_timeout_s = Some(10800);
        let (k, v) = encode_service(&s).expect("valid");
        assert_eq!((k.family, k.proto), (4, 17));
        assert_eq!(k.port.to_ne_bytes(), 53u16.to_be_bytes());
        assert_eq!(&k.addr[..4], &[10, 96, 0, 10]);
        assert_eq!(v.count, 2);
        assert_eq!(v.flags, abi::LB_F_AFFINITY);
        assert_eq!(v.backends[1].port.to_ne_bytes(), 5353u16.to_be_bytes());
        assert_eq!(decode_service(&k, &v), Some(s));

        let v6 = svc(8, "[fd00::10]:80", L4::Tcp, &["[fd00::2]:8080"]);
        let (k, v) = encode_service(&v6).expect("valid");
        assert_eq!(decode_service(&k, &v), Some(v6));
    }

    #[test]
    fn invalid_services_are_refused_naming_the_frontend() {
        let mixed = svc(1, "10.96.0.1:80", L4::Tcp, &["[fd00::2]:80"]);
        let err = encode_service(&mixed).expect_err("mixed families");
        assert!(err.to_string().contains("10.96.0.1:80/TCP"), "{err}");
        let many: Vec<String> = (0..=LB_MAX_BACKENDS)
            .map(|i| format!("10.1.{}.{}:80", i / 200, i % 200 + 1))
            .collect();
        let refs: Vec<&str> = many.iter().map(String::as_str).collect();
        let err = encode_service(&svc(2, "10.96.0.2:80", L4::Tcp, &refs)).expect_err("too many");
        assert!(err.to_string().contains("at most 128"), "{err}");
        let twice = [
            svc(3, "10.96.0.3:80", L4::Tcp, &[]),
            svc(4, "10.96.0.3:80", L4::Tcp, &[]),
        ];
        assert!(encode_services(&twice).is_err());
        // The same address and port over another protocol is another frontend.
        let both = [
            svc(3, "10.96.0.3:53", L4::Tcp, &[]),
            svc(4, "10.96.0.3:53", L4::Udp, &[]),
        ];
        assert_eq!(encode_services(&both).expect("distinct").len(), 2);
    }
}

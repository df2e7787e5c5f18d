//! An in-memory [`PolicyMaps`] for unit tests of code that drives the datapath (the agent's
//! policy sync, the CNI plugin): it validates entries exactly as the real writer does, keeps
//! what was written, and answers "would this new connection pass?" with the same lookup the
//! eBPF programs perform ([`crate::evaluate`]).

use std::collections::BTreeMap;
use std::net::IpAddr;

use crate::maps::{
    decode_addrs, encode_addrs, source_allowed, Endpoint, EndpointFlags, PolicyCounters, PolicyMaps,
};
use crate::policy::{encode_all, evaluate, Decision};
use crate::{Direction, Entry, Error};

#[derive(Debug, Default, Clone)]
pub struct FakeMaps {
    endpoints: BTreeMap<u32, Endpoint>,
    policies: BTreeMap<u32, Vec<Entry>>,
    addrs: BTreeMap<u32, Vec<IpAddr>>,
    /// Counters and drops a test wants the fake to report.
    pub counters: BTreeMap<u32, PolicyCounters>,
    pub drops: BTreeMap<(u32, Direction), u64>,
    pub source_drops: BTreeMap<u32, u64>,
    pub flow_lost: u64,
    /// How many replace_policy calls were made (for tests of change batching).
    pub replace_calls: usize,
    /// The frontend table, as `weft_lb_svc` would hold it.
    services: BTreeMap<crate::Frontend, crate::Service>,
    /// Per frontend id: what a test wants `service_stats` to report.
    pub service_stats: BTreeMap<u32, crate::ServiceStats>,
    /// Backends passed to `forget_backends`, in order.
    pub forgotten: Vec<(crate::L4, std::net::SocketAddr)>,
}

impl FakeMaps {
    pub fn new() -> Self {
        Self::default()
    }

    /// The entries last written for an endpoint (empty when none).
    pub fn policy(&self, ep_id: u32) -> &[Entry] {
        self.policies.get(&ep_id).map_or(&[], Vec::as_slice)
    }

    /// Total policy entries over all endpoints (what the tries would hold).
    pub fn policy_entry_count(&self) -> usize {
        self.policies.values().map(Vec::len).sum()
    }

    /// The decision the datapath would take for a new connection on interface `ifindex`:
    /// `None` when the interface is not managed (the packet passes untouched).
    pub fn decide(
        &self,
        ifindex: u32,
        direction: Direction,
        ip_proto: u8,
        peer: IpAddr,
        port: u16,
    ) -> Option<Decision> {
        let ep = self.endpoints.get(&ifindex)?;
        Some(evaluate(
            self.policy(ep.ep_id),
            ep.flags.isolates(direction),
            direction,
            ip_proto,
            peer,
            port,
        ))
    }
}

impl FakeMaps {
    /// Would `from_pod` on interface `ifindex` let a packet with source `src` through
    /// ([`source_allowed`])? `None` when the interface is not managed.
    pub fn source_allowed(&self, ifindex: u32, src: IpAddr) -> Option<bool> {
        self.endpoints.get(&ifindex)?;
        Some(source_allowed(
            self.addrs.get(&ifindex).map(Vec::as_slice),
            src,
        ))
    }
}

impl PolicyMaps for FakeMaps {
    fn set_endpoint(
        &mut self,
        ifindex: u32,
        ep_id: u32,
        flags: EndpointFlags,
    ) -> Result<(), Error> {
        self.endpoints.insert(ifindex, Endpoint { ep_id, flags });
        Ok(())
    }

    fn set_endpoint_addrs(&mut self, ifindex: u32, addrs: &[IpAddr]) -> Result<(), Error> {
        // Validated and normalised exactly as the real writer does.
        match encode_addrs(ifindex, addrs)? {
            Some(v) => self.addrs.insert(ifindex, decode_addrs(&v)),
            None => self.addrs.remove(&ifindex),
        };
        Ok(())
    }

    fn endpoint_addrs(&self) -> Result<BTreeMap<u32, Vec<IpAddr>>, Error> {
        Ok(self.addrs.clone())
    }

    fn remove_endpoint(&mut self, ifindex: u32) -> Result<(), Error> {
        self.addrs.remove(&ifindex);
        if let Some(ep) = self.endpoints.remove(&ifindex) {
            if !self.endpoints.values().any(|e| e.ep_id == ep.ep_id) {
                self.policies.remove(&ep.ep_id);
                self.drops.retain(|(id, _), _| *id != ep.ep_id);
                self.source_drops.remove(&ep.ep_id);
            }
        }
        Ok(())
    }

    fn endpoints(&self) -> Result<BTreeMap<u32, Endpoint>, Error> {
        Ok(self.endpoints.clone())
    }

    fn replace_policy(&mut self, ep_id: u32, entries: &[Entry]) -> Result<(), Error> {
        encode_all(ep_id, entries)?;
        self.replace_calls += 1;
        if entries.is_empty() {
            self.policies.remove(&ep_id);
        } else {
            self.policies.insert(ep_id, entries.to_vec());
        }
        Ok(())
    }

    fn flush_conntrack(&mut self, _ep_id: u32) -> Result<usize, Error> {
        Ok(0)
    }

    fn counters(&self) -> Result<BTreeMap<u32, PolicyCounters>, Error> {
        Ok(self.counters.clone())
    }

    fn remove_counters(&mut self, policy: u32) -> Result<(), Error> {
        self.counters.remove(&policy);
        Ok(())
    }

    fn drops(&self) -> Result<BTreeMap<(u32, Direction), u64>, Error> {
        Ok(self.drops.clone())
    }

    fn source_drops(&self) -> Result<BTreeMap<u32, u64>, Error> {
        Ok(self.source_drops.clone())
    }

    fn flow_lost(&self) -> Result<u64, Error> {
        Ok(self.flow_lost)
    }
}

impl crate::ServiceMaps for FakeMaps {
    fn replace_services(
        &mut self,
        services: &[crate::Service],
    ) -> Result<crate::ServiceWrite, Error> {
        // The same checks as the real writer, before anything changes.
        crate::lb::encode_services(services)?;
        let mut report = crate::ServiceWrite::default();
        let wanted: BTreeMap<crate::Frontend, crate::Service> =
            services.iter().map(|s| (s.frontend, s.clone())).collect();
        for (f, s) in &wanted {
            if self.services.get(f) != Some(s) {
                report.written += 1;
            }
        }
        report.deleted = self
            .services
            .keys()
            .filter(|f| !wanted.contains_key(f))
            .count();
        self.services = wanted;
        Ok(report)
    }

    fn services(&self) -> Result<Vec<crate::Service>, Error> {
        Ok(self.services.values().cloned().collect())
    }

    fn service_stats(&self) -> Result<BTreeMap<u32, crate::ServiceStats>, Error> {
        Ok(self.service_stats.clone())
    }

    fn forget_backends(
        &mut self,
        proto: crate::L4,
        backends: &[std::net::SocketAddr],
    ) -> Result<usize, Error> {
        self.forgotten.extend(backends.iter().map(|b| (proto, *b)));
        Ok(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{PortRange, Protocol, Verdict};

    #[test]
    fn the_fake_decides_like_the_datapath_and_cleans_up_on_removal() {
        let mut maps = FakeMaps::new();
        maps.set_endpoint(7, 100, EndpointFlags::INGRESS_ISOLATED)
            .expect("set");
        let entries = vec![Entry {
            direction: Direction::Ingress,
            proto: Protocol::Tcp,
            addr: "10.0.0.0".parse().expect("addr"),
            prefix_len: 24,
            ranges: vec![PortRange {
                lo: 8080,
                hi: 8089,
                policy: 4,
            }],
        }];
        maps.replace_policy(100, &entries).expect("replace");
        let peer: IpAddr = "10.0.0.9".parse().expect("addr");
        let d = maps
            .decide(7, Direction::Ingress, 6, peer, 8081)
            .expect("managed");
        assert_eq!((d.verdict, d.policy), (Verdict::Allowed, 4));
        let d = maps
            .decide(7, Direction::Ingress, 6, peer, 80)
            .expect("managed");
        assert_eq!(d.verdict, Verdict::Denied);
        let d = maps
            .decide(7, Direction::Egress, 6, peer, 80)
            .expect("managed");
        assert_eq!(d.verdict, Verdict::Allowed, "egress not isolated");
        assert!(maps.decide(8, Direction::Ingress, 6, peer, 80).is_none());

        let own: IpAddr = "10.1.0.7".parse().expect("addr");
        assert_eq!(maps.source_allowed(7, peer), Some(true), "nothing recorded");
        maps.set_endpoint_addrs(7, &[own]).expect("addrs");
        assert_eq!(maps.source_allowed(7, peer), Some(false));
        assert_eq!(maps.source_allowed(7, own), Some(true));

        maps.remove_endpoint(7).expect("remove");
        assert_eq!(maps.policy_entry_count(), 0);
        assert!(maps.endpoint_addrs().expect("addrs").is_empty());
        maps.remove_endpoint(7).expect("idempotent");
    }
}

//! The endpoint registry at work: what the plugin's ADD, DEL, CHECK and GC do to the
//! datapath, and the policy sync that keeps every endpoint's maps equal to what the cluster
//! state asks for. [`Core`] is synchronous and generic over the [`Dataplane`], so all of it
//! runs against [`crate::dataplane::FakeDataplane`] in unit tests.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::{Arc, RwLock};

use weft_cni::agent_proto::{AddRequest, Attachment, CheckRequest, DelRequest};
use weft_datapath::{self as dp, EndpointFlags};
use weft_model::netpol::NetworkPolicy;
use weft_model::{Namespace, ObjectKey, Pod};

use crate::dataplane::Dataplane;
use crate::metrics::{EndpointNames, Metrics};
use crate::policy::{self, key_name, Desired, EndpointError};
use crate::registry::{Record, State, StateError, Store};

/// A copy of the cluster state the policies are computed from.
#[derive(Clone, Debug, Default)]
pub struct Cluster {
    pub namespaces: Vec<Namespace>,
    pub pods: Vec<Pod>,
    pub policies: Vec<NetworkPolicy>,
}

impl Cluster {
    /// Copies what the CNI needs out of the controller's index.
    pub fn from_index(index: &weft_controller::index::Index) -> Cluster {
        let st = index.read();
        Cluster {
            namespaces: st.namespaces.values().map(|n| (**n).clone()).collect(),
            pods: st.pods.values().map(|p| (**p).clone()).collect(),
            policies: st
                .network_policies
                .values()
                .map(|p| (**p).clone())
                .collect(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum EndpointsError {
    #[error("attaching the datapath to {host_ifname} (ifindex {ifindex}) for {pod}: {source}")]
    Attach {
        pod: String,
        host_ifname: String,
        ifindex: u32,
        source: Box<dp::Error>,
    },
    #[error("writing the policy of {pod} (endpoint {ep_id}, ifindex {ifindex}): {source}")]
    Write {
        pod: String,
        ep_id: u32,
        ifindex: u32,
        source: Box<dp::Error>,
    },
    #[error("computing the policy of a new endpoint: {0}")]
    Compile(Box<EndpointError>),
    #[error("{host_ifname} (ifindex {ifindex}) is already registered for {other}; DEL it first")]
    IfindexTaken {
        host_ifname: String,
        ifindex: u32,
        other: String,
    },
    #[error(transparent)]
    State(#[from] StateError),
    #[error("{0}")]
    Check(String),
    #[error("removing endpoint {pod} (ifindex {ifindex}) from the datapath: {source}")]
    Remove {
        pod: String,
        ifindex: u32,
        source: Box<dp::Error>,
    },
}

impl From<EndpointError> for EndpointsError {
    fn from(e: EndpointError) -> Self {
        EndpointsError::Compile(Box::new(e))
    }
}

/// What flows and metrics need to name things, from the last sync.
#[derive(Clone, Debug, Default)]
pub struct Names {
    /// Pod addresses of the whole cluster (local ones from IPAM).
    pub pods_by_ip: HashMap<IpAddr, ObjectKey>,
    pub endpoints: HashMap<u32, EndpointNames>,
    /// Policy id → `namespace/name` (with `node` and `none`).
    pub policies: BTreeMap<u32, String>,
}

/// What a sync did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SyncReport {
    /// Endpoints whose maps were written.
    pub updated: usize,
    /// Endpoints whose policy failed (they keep their previous one).
    pub errors: usize,
}

pub struct Core<D: Dataplane> {
    dp: D,
    store: Store,
    state: State,
    /// What each endpoint's maps hold, as last written by this process.
    applied: HashMap<u32, Desired>,
    /// The last error logged per endpoint (an error is logged once, not at every sync).
    logged: HashMap<u32, String>,
    node_ips: Vec<IpAddr>,
    names: Arc<RwLock<Names>>,
    metrics: Metrics,
}

impl<D: Dataplane> std::fmt::Debug for Core<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Core")
            .field("endpoints", &self.state.endpoints.len())
            .finish_non_exhaustive()
    }
}

impl<D: Dataplane> Core<D> {
    /// Loads the persisted registry. Call [`Core::recover`] next.
    pub fn new(dp: D, store: Store, metrics: Metrics) -> Result<Self, StateError> {
        let state = store.load()?;
        metrics.endpoints.set(state.endpoints.len() as i64);
        Ok(Core {
            dp,
            store,
            state,
            applied: HashMap::new(),
            logged: HashMap::new(),
            node_ips: Vec::new(),
            names: Arc::default(),
            metrics,
        })
    }

    pub fn names(&self) -> Arc<RwLock<Names>> {
        self.names.clone()
    }

    pub fn dataplane(&self) -> &D {
        &self.dp
    }

    pub fn state(&self) -> &State {
        &self.state
    }

    pub fn set_node_ips(&mut self, ips: Vec<IpAddr>) -> bool {
        let changed = self.node_ips != ips;
        self.node_ips = ips;
        changed
    }

    pub fn node_ips(&self) -> &[IpAddr] {
        &self.node_ips
    }

    /// Host veth names of the registered endpoints.
    pub fn pod_ifnames(&self) -> BTreeSet<String> {
        self.state
            .endpoints
            .values()
            .map(|r| r.host_ifname.clone())
            .collect()
    }

    fn save(&self) -> Result<(), StateError> {
        self.metrics
            .endpoints
            .set(self.state.endpoints.len() as i64);
        self.store.save(&self.state)
    }

    /// After a (re)start: collects endpoints whose interface is gone, removes datapath
    /// endpoints and links nobody registered, and re-attaches the rest (moving them to this
    /// build's programs). Returns the endpoints collected.
    pub fn recover(&mut self) -> Result<Vec<Record>, EndpointsError> {
        let gone = self.collect_gone()?;
        let known: BTreeSet<u32> = self
            .state
            .endpoints
            .values()
            .map(|r| r.host_ifindex)
            .collect();
        if let Ok(eps) = self.dp.endpoints() {
            for ifindex in eps.keys().filter(|i| !known.contains(i)) {
                tracing::info!(ifindex, "removing a datapath endpoint no registration owns");
                self.remove_from_datapath("(unregistered)", *ifindex)?;
            }
        }
        if let Ok(links) = self.dp.attached() {
            for ifindex in links.into_iter().filter(|i| !known.contains(i)) {
                tracing::info!(ifindex, "detaching programs no registration owns");
                self.remove_from_datapath("(unregistered)", ifindex)?;
            }
        }
        if let Ok(addrs) = self.dp.endpoint_addrs() {
            for ifindex in addrs.keys().filter(|i| !known.contains(i)) {
                tracing::info!(ifindex, "removing addresses no registration owns");
                self.remove_from_datapath("(unregistered)", *ifindex)?;
            }
        }
        let records: Vec<Record> = self.state.endpoints.values().cloned().collect();
        for r in records {
            // Endpoints registered by an agent that did not record addresses get them now
            // (and a restart heals a lost map).
            if let Err(source) = self.dp.set_endpoint_addrs(r.host_ifindex, &r.ips) {
                tracing::warn!(pod = %r.display_name(), error = %source,
                    "recording an endpoint's addresses after restart failed; its source \
                     addresses stay as they were");
            }
            if let Err(source) = self.dp.attach(r.host_ifindex) {
                tracing::warn!(pod = %r.display_name(), error = %source,
                    "re-attaching an endpoint after restart failed; its old programs keep enforcing");
            }
        }
        Ok(gone)
    }

    /// Endpoints whose host interface no longer exists (or is now another interface) are
    /// removed: a DEL the agent never heard of.
    pub fn collect_gone(&mut self) -> Result<Vec<Record>, EndpointsError> {
        let gone: Vec<Record> = self
            .state
            .endpoints
            .values()
            .filter(|r| self.dp.interface_name(r.host_ifindex).as_deref() != Some(&r.host_ifname))
            .cloned()
            .collect();
        for r in &gone {
            tracing::info!(pod = %r.display_name(), container = %r.container_id,
                interface = %r.host_ifname, "collecting an endpoint whose interface is gone");
            self.forget(r)?;
        }
        if !gone.is_empty() {
            self.save()?;
        }
        Ok(gone)
    }

    fn remove_from_datapath(&mut self, pod: &str, ifindex: u32) -> Result<(), EndpointsError> {
        let fail = |source| EndpointsError::Remove {
            pod: pod.to_string(),
            ifindex,
            source: Box::new(source),
        };
        self.dp.remove_endpoint(ifindex).map_err(fail)?;
        self.dp.detach(ifindex).map_err(fail)?;
        Ok(())
    }

    /// Removes an endpoint from the datapath and the registry (not saved).
    fn forget(&mut self, r: &Record) -> Result<(), EndpointsError> {
        let name = r.display_name();
        // Flush explicitly too: remove_endpoint keeps conntrack when another interface
        // shares the id, which the agent never does, but be certain.
        let _ = self.dp.flush_conntrack(r.ep_id);
        self.remove_from_datapath(&name, r.host_ifindex)?;
        self.state.remove(&r.container_id, &r.ifname);
        self.applied.remove(&r.ep_id);
        self.logged.remove(&r.ep_id);
        if let Some(k) = r.pod() {
            self.metrics.forget_pod(&k.namespace, &k.name);
        }
        if let Ok(mut names) = self.names.write() {
            names.endpoints.remove(&r.ep_id);
        }
        Ok(())
    }

    /// ADD: registers the endpoint, writes its policy and flags, then attaches the programs,
    /// so that the pod is isolated from its first packet. On failure nothing stays behind.
    pub fn add(&mut self, req: &AddRequest, cluster: &Cluster) -> Result<u32, EndpointsError> {
        if let Some(other) = self.state.by_ifindex(req.host_ifindex) {
            if (other.container_id.as_str(), other.ifname.as_str())
                != (req.container_id.as_str(), req.ifname.as_str())
            {
                if self.dp.interface_name(req.host_ifindex).as_deref()
                    == Some(other.host_ifname.as_str())
                    && other.host_ifname != req.host_ifname
                {
                    return Err(EndpointsError::IfindexTaken {
                        host_ifname: req.host_ifname.clone(),
                        ifindex: req.host_ifindex,
                        other: other.display_name(),
                    });
                }
                // The interface that had this index is gone: its endpoint is stale.
                let stale = other.clone();
                self.forget(&stale)?;
            }
        }
        let ep_id = match self.state.get(&req.container_id, &req.ifname) {
            // A repeated ADD (the runtime retried): same endpoint, maybe a new interface.
            Some(r) => {
                let r = r.clone();
                if r.host_ifindex != req.host_ifindex {
                    self.remove_from_datapath(&r.display_name(), r.host_ifindex)?;
                    self.applied.remove(&r.ep_id);
                }
                r.ep_id
            }
            None => self.state.next_ep_id(),
        };
        let record = Record {
            container_id: req.container_id.clone(),
            ifname: req.ifname.clone(),
            netns: req.netns.clone(),
            host_ifname: req.host_ifname.clone(),
            host_ifindex: req.host_ifindex,
            ep_id,
            ips: req.ips.clone(),
            pod_namespace: req.pod_namespace.clone(),
            pod_name: req.pod_name.clone(),
        };
        let mut local: Vec<_> = self.state.endpoints.values().map(Record::local).collect();
        local.retain(|l| l.ep_id != ep_id);
        local.push(record.local());
        let world = policy::world(
            cluster.namespaces.iter().cloned(),
            cluster.pods.iter().cloned(),
            cluster.policies.iter().cloned(),
            &local,
        );
        self.update_policy_ids(cluster);
        let ids = self.state.policy_ids.policy_ids();
        let desired = policy::desired(&world, &record.local(), &ids, &self.node_ips)?;
        let name = record.display_name();
        let result = self
            .dp
            .set_endpoint_addrs(record.host_ifindex, &record.ips)
            .map_err(|source| EndpointsError::Write {
                pod: name.clone(),
                ep_id,
                ifindex: record.host_ifindex,
                source: Box::new(source),
            })
            .and_then(|()| self.write(record.host_ifindex, ep_id, &desired, &name))
            .and_then(|()| {
                self.dp
                    .attach(record.host_ifindex)
                    .map_err(|source| EndpointsError::Attach {
                        pod: name.clone(),
                        host_ifname: record.host_ifname.clone(),
                        ifindex: record.host_ifindex,
                        source: Box::new(source),
                    })
            });
        if let Err(e) = result {
            let _ = self.remove_from_datapath(&name, record.host_ifindex);
            self.applied.remove(&ep_id);
            self.state.remove(&record.container_id, &record.ifname);
            let _ = self.save();
            return Err(e);
        }
        self.applied.insert(ep_id, desired.clone());
        self.note_endpoint(&record, &desired);
        self.state.insert(record);
        self.save()?;
        Ok(ep_id)
    }

    fn note_endpoint(&self, r: &Record, d: &Desired) {
        let Some(pod) = r.pod() else { return };
        if let Ok(mut names) = self.names.write() {
            for ip in &r.ips {
                names.pods_by_ip.insert(*ip, pod.clone());
            }
            names.endpoints.insert(
                r.ep_id,
                EndpointNames {
                    namespace: pod.namespace.clone(),
                    pod: pod.name.clone(),
                    ingress_by: d.ingress_by.iter().map(key_name).collect(),
                    egress_by: d.egress_by.iter().map(key_name).collect(),
                },
            );
        }
    }

    /// Writes an endpoint's maps, never opening a window where a peer allowed before and
    /// after is denied: isolation that goes is lifted first, entries are replaced, then
    /// isolation that comes is set.
    fn write(
        &mut self,
        ifindex: u32,
        ep_id: u32,
        d: &Desired,
        pod: &str,
    ) -> Result<(), EndpointsError> {
        let fail = |source| EndpointsError::Write {
            pod: pod.to_string(),
            ep_id,
            ifindex,
            source: Box::new(source),
        };
        let before = self.applied.get(&ep_id);
        let same_entries = before.is_some_and(|b| b.entries == d.entries);
        if let Some(b) = before {
            let both = EndpointFlags::from_bits(b.flags.bits() & d.flags.bits());
            if both != b.flags {
                self.dp.set_endpoint(ifindex, ep_id, both).map_err(fail)?;
            }
        }
        if !same_entries {
            self.dp.replace_policy(ep_id, &d.entries).map_err(fail)?;
        }
        self.dp
            .set_endpoint(ifindex, ep_id, d.flags)
            .map_err(fail)?;
        self.metrics.policy_updates.inc();
        Ok(())
    }

    /// DEL: removes the endpoint's datapath state (entry, policy, conntrack, counters,
    /// links) and its registration. Unknown endpoints succeed.
    pub fn del(&mut self, req: &DelRequest) -> Result<(), EndpointsError> {
        match self.state.get(&req.container_id, &req.ifname).cloned() {
            Some(r) => {
                self.forget(&r)?;
                self.save()?;
            }
            None => {
                // Not registered; clean the interface the plugin names if nobody owns it.
                if let Some(ifindex) = req.host_ifindex {
                    if self.state.by_ifindex(ifindex).is_none() {
                        self.remove_from_datapath("(unregistered)", ifindex)?;
                    }
                }
            }
        }
        Ok(())
    }

    /// CHECK: registered with this interface, in the endpoints map, programs attached.
    pub fn check(&self, req: &CheckRequest) -> Result<(), EndpointsError> {
        let what = format!("{}/{}", req.container_id, req.ifname);
        let r = self
            .state
            .get(&req.container_id, &req.ifname)
            .ok_or_else(|| EndpointsError::Check(format!("endpoint {what} is not registered")))?;
        if r.host_ifindex != req.host_ifindex {
            return Err(EndpointsError::Check(format!(
                "endpoint {what} is registered on ifindex {}, not {}",
                r.host_ifindex, req.host_ifindex
            )));
        }
        let in_map = self
            .dp
            .endpoints()
            .map(|e| e.get(&r.host_ifindex).map(|e| e.ep_id) == Some(r.ep_id))
            .unwrap_or(false);
        if !in_map {
            return Err(EndpointsError::Check(format!(
                "endpoint {what} (ifindex {}) is missing from the datapath's endpoints map",
                r.host_ifindex
            )));
        }
        let attached = self
            .dp
            .attached()
            .map(|a| a.contains(&r.host_ifindex))
            .unwrap_or(false);
        if !attached {
            return Err(EndpointsError::Check(format!(
                "endpoint {what}: no programs attached to {} (ifindex {})",
                r.host_ifname, r.host_ifindex
            )));
        }
        Ok(())
    }

    /// GC: removes every endpoint not in `valid`; returns how many went.
    pub fn gc(&mut self, valid: &[Attachment]) -> Result<usize, EndpointsError> {
        let valid: BTreeSet<(String, String)> = valid
            .iter()
            .map(|a| (a.container_id.clone(), a.ifname.clone()))
            .collect();
        let stale: Vec<Record> = self
            .state
            .endpoints
            .values()
            .filter(|r| !valid.contains(&r.key()))
            .cloned()
            .collect();
        for r in &stale {
            tracing::info!(pod = %r.display_name(), container = %r.container_id, "GC: removing a stale endpoint");
            self.forget(r)?;
        }
        if !stale.is_empty() {
            self.save()?;
        }
        Ok(stale.len())
    }

    /// Recomputes every endpoint's policy and writes what changed. An endpoint whose policy
    /// fails keeps its previous one; the error is logged once (until it changes) and counted.
    pub fn sync(&mut self, cluster: &Cluster) -> SyncReport {
        let mut report = SyncReport::default();
        self.update_policy_ids(cluster);
        let records: Vec<Record> = self.state.endpoints.values().cloned().collect();
        let local: Vec<_> = records.iter().map(Record::local).collect();
        let world = policy::world(
            cluster.namespaces.iter().cloned(),
            cluster.pods.iter().cloned(),
            cluster.policies.iter().cloned(),
            &local,
        );
        let ids = self.state.policy_ids.policy_ids();
        for r in &records {
            let name = r.display_name();
            let outcome = policy::desired(&world, &r.local(), &ids, &self.node_ips)
                .map_err(EndpointsError::from)
                .and_then(|d| {
                    if self.applied.get(&r.ep_id) != Some(&d) {
                        self.write(r.host_ifindex, r.ep_id, &d, &name)?;
                        self.applied.insert(r.ep_id, d.clone());
                        report.updated += 1;
                    }
                    Ok(d)
                });
            match outcome {
                Ok(d) => {
                    self.logged.remove(&r.ep_id);
                    self.note_endpoint(r, &d);
                }
                Err(e) => {
                    report.errors += 1;
                    let msg = e.to_string();
                    if self.logged.get(&r.ep_id) != Some(&msg) {
                        tracing::error!(pod = %name, ep_id = r.ep_id, error = %msg,
                            "endpoint policy not updated; it keeps its previous policy");
                        self.metrics.policy_errors.inc();
                        self.logged.insert(r.ep_id, msg);
                    }
                }
            }
        }
        if let Ok(mut names) = self.names.write() {
            names.policies = self.state.policy_ids.names();
            names.pods_by_ip = world
                .pods()
                .flat_map(|p| world.owned_ips(p).map(|ip| (ip, p.key.clone())))
                .collect();
        }
        if let Err(e) = self.save() {
            tracing::warn!(error = %e, "saving the policy id table failed");
        }
        report
    }

    /// Gives new policies ids; forgets deleted ones with their counters.
    fn update_policy_ids(&mut self, cluster: &Cluster) {
        let old_names = self.state.policy_ids.names();
        let removed = self
            .state
            .policy_ids
            .update(cluster.policies.iter().map(|p| &p.key));
        for id in removed {
            if let Err(e) = self.dp.remove_counters(id) {
                tracing::warn!(policy_id = id, error = %e, "removing a deleted policy's counters failed");
            }
            if let Some(name) = old_names.get(&id) {
                self.metrics.forget_policy(name);
            }
        }
    }

    /// Reads the datapath's counters into the metrics.
    pub fn observe_metrics(&self) {
        let counters = self.dp.counters().unwrap_or_default();
        let drops = self.dp.drops().unwrap_or_default();
        let source_drops = self.dp.source_drops().unwrap_or_default();
        let lost = self.dp.flow_lost().unwrap_or(0);
        let names = self.names.read().map(|n| n.clone()).unwrap_or_default();
        self.metrics
            .observe(&counters, &drops, lost, &names.policies, &names.endpoints);
        self.metrics
            .observe_source_drops(&source_drops, &names.endpoints);
    }
}

#[cfg(test)]
mod tests;

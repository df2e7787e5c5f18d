//! The one in-memory index of cluster state, written by a source and read by
//! the gRPC services.
//!
//! Writers apply a batch of changes under a write lock ([`Index::apply`],
//! [`Index::reset`]); an object equal to the one held is not a change. Each
//! change names the *topics* it touches — a Service (its object, its
//! EndpointSlices, the pods those slices point at) or an IP (a ClusterIP or a
//! pod IP) — and after the lock is released every topic that changed is
//! bumped once. A reader resolves under the read lock and subscribes to the
//! topics its answer depends on *while still holding it*, so no change can
//! slip between its read and its subscription ([`Index::resolve`]). A
//! Resolve stream therefore wakes only for changes that may alter its
//! answer, and recomputes its whole answer (cheap: one service) before
//! diffing against what it last sent.

pub mod inbound;
pub mod outbound;
pub mod resolve;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::IpAddr;
use std::sync::{Arc, Mutex, RwLock};

use tokio::sync::watch;

use crate::model::authz::{IndexedAuthorization, IndexedServer};
use crate::model::netpol::NetworkPolicy;
use crate::model::{
    EndpointSlice, Kind, Namespace, Node, Object, ObjectKey, Pod, Policy, Route, Service,
};
pub use resolve::{EndpointInfo, Resolution, ResolveConfig};

/// What a reader may depend on.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Topic {
    /// A Service object, its slices, and the pods its slices point at.
    Service(ObjectKey),
    /// A Service ClusterIP or a pod IP.
    Ip(IpAddr),
    /// The routes that name a Service as their parent and the
    /// BackendPolicies that target it.
    Policy(ObjectKey),
    /// A namespace's inbound policy objects: its Servers,
    /// AuthorizationPolicies, routes whose parent is one of its Servers, and
    /// the Namespace object itself (its default inbound policy annotation).
    Inbound(String),
    /// A pod object (its labels, ports, probes and annotations).
    Pod(ObjectKey),
}

/// One change from a source.
#[derive(Clone, Debug)]
pub enum Change {
    Upsert(Object),
    Delete(Kind, ObjectKey),
}

/// The indexed cluster state. Read it through [`Index::read`].
#[derive(Debug, Default)]
pub struct State {
    pub services: HashMap<ObjectKey, Arc<Service>>,
    pub slices: HashMap<ObjectKey, Arc<EndpointSlice>>,
    pub pods: HashMap<ObjectKey, Arc<Pod>>,
    pub namespaces: HashMap<String, Arc<Namespace>>,
    /// ClusterIP → services (normally one).
    pub by_cluster_ip: HashMap<IpAddr, BTreeSet<ObjectKey>>,
    /// Pod IP → pods (several only for host-network pods).
    pub pods_by_ip: HashMap<IpAddr, BTreeSet<ObjectKey>>,
    /// Service → names of its slices.
    pub slices_by_service: HashMap<ObjectKey, BTreeSet<String>>,
    /// Pod → slices that point at it.
    pub slices_by_pod: HashMap<ObjectKey, BTreeSet<ObjectKey>>,
    /// The latest version of each HTTPRoute and GRPCRoute (what status is
    /// written for), valid or not.
    pub http_routes: HashMap<ObjectKey, Arc<Route>>,
    pub grpc_routes: HashMap<ObjectKey, Arc<Route>>,
    /// The last accepted version of each route whose latest version cannot
    /// be applied ([`outbound::route_problem`]: a bad regex, an unsupported
    /// filter): it stays in force for traffic until the route is fixed or
    /// deleted, so an edit that breaks a live route never changes what
    /// proxies do. A route that was never valid has no entry and is left
    /// out. Read routes for traffic through [`State::route_in_force`].
    pub held_routes: HashMap<(Kind, ObjectKey), Arc<Route>>,
    pub policies: HashMap<ObjectKey, Arc<Policy>>,
    /// Service → the routes (kind, key) whose version in force names it as
    /// a parent.
    pub routes_by_parent: HashMap<ObjectKey, BTreeSet<(Kind, ObjectKey)>>,
    /// Service → the BackendPolicies that target it.
    pub policies_by_target: HashMap<ObjectKey, BTreeSet<ObjectKey>>,
    /// Kubernetes NetworkPolicies, for the CNI agent and `weft policy explain` (the
    /// controller's services do not read them; a reader follows [`Index::generation`]).
    pub network_policies: HashMap<ObjectKey, Arc<NetworkPolicy>>,
    /// Servers (`policy.weft.dev`): inbound policy.
    pub servers: HashMap<ObjectKey, Arc<IndexedServer>>,
    /// AuthorizationPolicies.
    pub authorizations: HashMap<ObjectKey, Arc<IndexedAuthorization>>,
    /// Server → the routes (kind, key) whose version in force names it as
    /// a parent.
    pub routes_by_server: HashMap<ObjectKey, BTreeSet<(Kind, ObjectKey)>>,
    /// Namespace → names of its Servers.
    pub servers_by_namespace: HashMap<String, BTreeSet<String>>,
    /// Namespace → names of its AuthorizationPolicies.
    pub authorizations_by_namespace: HashMap<String, BTreeSet<String>>,
    /// Nodes by name, for the CNI agent's routes to other nodes' pod CIDRs
    /// (only a source asked for [`Kind::Node`] fills it; a reader follows
    /// [`Index::generation`]).
    pub nodes: HashMap<String, Arc<Node>>,
}

impl State {
    pub fn len(&self, kind: Kind) -> usize {
        match kind {
            Kind::Service => self.services.len(),
            Kind::EndpointSlice => self.slices.len(),
            Kind::Pod => self.pods.len(),
            Kind::Namespace => self.namespaces.len(),
            Kind::HttpRoute => self.http_routes.len(),
            Kind::GrpcRoute => self.grpc_routes.len(),
            Kind::BackendPolicy => self.policies.len(),
            Kind::NetworkPolicy => self.network_policies.len(),
            Kind::Server => self.servers.len(),
            Kind::AuthorizationPolicy => self.authorizations.len(),
            Kind::Node => self.nodes.len(),
        }
    }

    /// A route by kind and key.
    pub fn route(&self, kind: Kind, key: &ObjectKey) -> Option<&Arc<Route>> {
        match kind {
            Kind::HttpRoute => self.http_routes.get(key),
            Kind::GrpcRoute => self.grpc_routes.get(key),
            _ => None,
        }
    }

    /// The version of a route that applies to traffic: the latest one, or,
    /// when the latest cannot be applied, the last accepted one
    /// ([`State::held_routes`]).
    pub fn route_in_force(&self, kind: Kind, key: &ObjectKey) -> Option<&Arc<Route>> {
        self.held_routes
            .get(&(kind, key.clone()))
            .or_else(|| self.route(kind, key))
    }

    /// The object of `kind` named `key` as the index holds it (the latest
    /// version of a route).
    pub fn object(&self, kind: Kind, key: &ObjectKey) -> Option<Object> {
        Some(match kind {
            Kind::Service => Object::Service((**self.services.get(key)?).clone()),
            Kind::EndpointSlice => Object::EndpointSlice((**self.slices.get(key)?).clone()),
            Kind::Pod => Object::Pod((**self.pods.get(key)?).clone()),
            Kind::Namespace => Object::Namespace((**self.namespaces.get(&key.name)?).clone()),
            Kind::HttpRoute | Kind::GrpcRoute => {
                Object::Route(Box::new((**self.route(kind, key)?).clone()))
            }
            Kind::BackendPolicy => {
                Object::BackendPolicy(Box::new((**self.policies.get(key)?).clone()))
            }
            Kind::NetworkPolicy => {
                Object::NetworkPolicy(Box::new((**self.network_policies.get(key)?).clone()))
            }
            Kind::Server => Object::Server(Box::new((**self.servers.get(key)?).clone())),
            Kind::AuthorizationPolicy => {
                Object::AuthorizationPolicy(Box::new((**self.authorizations.get(key)?).clone()))
            }
            Kind::Node => Object::Node((**self.nodes.get(&key.name)?).clone()),
        })
    }

    pub fn contains(&self, kind: Kind, key: &ObjectKey) -> bool {
        match kind {
            Kind::Service => self.services.contains_key(key),
            Kind::EndpointSlice => self.slices.contains_key(key),
            Kind::Pod => self.pods.contains_key(key),
            Kind::Namespace => self.namespaces.contains_key(&key.name),
            Kind::HttpRoute => self.http_routes.contains_key(key),
            Kind::GrpcRoute => self.grpc_routes.contains_key(key),
            Kind::BackendPolicy => self.policies.contains_key(key),
            Kind::NetworkPolicy => self.network_policies.contains_key(key),
            Kind::Server => self.servers.contains_key(key),
            Kind::AuthorizationPolicy => self.authorizations.contains_key(key),
            Kind::Node => self.nodes.contains_key(&key.name),
        }
    }

    fn keys(&self, kind: Kind) -> Vec<ObjectKey> {
        match kind {
            Kind::Service => self.services.keys().cloned().collect(),
            Kind::EndpointSlice => self.slices.keys().cloned().collect(),
            Kind::Pod => self.pods.keys().cloned().collect(),
            Kind::Namespace => self
                .namespaces
                .keys()
                .map(|n| ObjectKey::new("", n.clone()))
                .collect(),
            Kind::HttpRoute => self.http_routes.keys().cloned().collect(),
            Kind::GrpcRoute => self.grpc_routes.keys().cloned().collect(),
            Kind::BackendPolicy => self.policies.keys().cloned().collect(),
            Kind::NetworkPolicy => self.network_policies.keys().cloned().collect(),
            Kind::Server => self.servers.keys().cloned().collect(),
            Kind::AuthorizationPolicy => self.authorizations.keys().cloned().collect(),
            Kind::Node => self
                .nodes
                .keys()
                .map(|n| ObjectKey::new("", n.clone()))
                .collect(),
        }
    }

    /// The Servers of `namespace`.
    pub fn servers_in<'a>(
        &'a self,
        namespace: &str,
    ) -> impl Iterator<Item = &'a Arc<IndexedServer>> + 'a {
        let names = self
            .servers_by_namespace
            .get(namespace)
            .into_iter()
            .flatten();
        let ns = namespace.to_string();
        names.filter_map(move |n| self.servers.get(&ObjectKey::new(ns.clone(), n.clone())))
    }

    /// The AuthorizationPolicies of `namespace`.
    pub fn authorizations_in<'a>(
        &'a self,
        namespace: &str,
    ) -> impl Iterator<Item = &'a Arc<IndexedAuthorization>> + 'a {
        let names = self
            .authorizations_by_namespace
            .get(namespace)
            .into_iter()
            .flatten();
        let ns = namespace.to_string();
        names.filter_map(move |n| {
            self.authorizations
                .get(&ObjectKey::new(ns.clone(), n.clone()))
        })
    }

    /// Applies one change; returns whether anything changed, pushing the
    /// topics it touched.
    fn apply(&mut self, change: Change, topics: &mut HashSet<Topic>) -> bool {
        match change {
            Change::Upsert(Object::Service(s)) => {
                self.put_service(Some(s.key.clone()), Some(s), topics)
            }
            Change::Upsert(Object::EndpointSlice(s)) => {
                self.put_slice(s.key.clone(), Some(s), topics)
            }
            Change::Upsert(Object::Pod(p)) => self.put_pod(p.key.clone(), Some(p), topics),
            Change::Upsert(Object::Namespace(n)) => {
                let new = Arc::new(n);
                let changed = match self.namespaces.insert(new.name.clone(), new.clone()) {
                    Some(old) => *old != *new,
                    None => true,
                };
                if changed {
                    topics.insert(Topic::Inbound(new.name.clone()));
                }
                changed
            }
            Change::Delete(Kind::Service, key) => self.put_service(Some(key), None, topics),
            Change::Delete(Kind::EndpointSlice, key) => self.put_slice(key, None, topics),
            Change::Delete(Kind::Pod, key) => self.put_pod(key, None, topics),
            Change::Delete(Kind::Namespace, key) => {
                let removed = self.namespaces.remove(&key.name).is_some();
                if removed {
                    topics.insert(Topic::Inbound(key.name));
                }
                removed
            }
            Change::Upsert(Object::Route(r)) => {
                self.put_route(r.kind(), r.meta.key.clone(), Some(*r), topics)
            }
            Change::Delete(kind @ (Kind::HttpRoute | Kind::GrpcRoute), key) => {
                self.put_route(kind, key, None, topics)
            }
            Change::Upsert(Object::BackendPolicy(p)) => {
                self.put_policy(p.meta.key.clone(), Some(*p), topics)
            }
            Change::Delete(Kind::BackendPolicy, key) => self.put_policy(key, None, topics),
            Change::Upsert(Object::NetworkPolicy(p)) => {
                let new = Arc::new(*p);
                match self.network_policies.insert(new.key.clone(), new.clone()) {
                    Some(old) => *old != *new,
                    None => true,
                }
            }
            Change::Delete(Kind::NetworkPolicy, key) => {
                self.network_policies.remove(&key).is_some()
            }
            Change::Upsert(Object::Server(s)) => put_inbound(
                &mut self.servers,
                &mut self.servers_by_namespace,
                s.meta.key.clone(),
                Some(*s),
                topics,
            ),
            Change::Delete(Kind::Server, key) => put_inbound(
                &mut self.servers,
                &mut self.servers_by_namespace,
                key,
                None,
                topics,
            ),
            Change::Upsert(Object::AuthorizationPolicy(a)) => put_inbound(
                &mut self.authorizations,
                &mut self.authorizations_by_namespace,
                a.meta.key.clone(),
                Some(*a),
                topics,
            ),
            Change::Delete(Kind::AuthorizationPolicy, key) => put_inbound(
                &mut self.authorizations,
                &mut self.authorizations_by_namespace,
                key,
                None,
                topics,
            ),
            // No topic: the agent's routing follows the generation, like NetworkPolicies.
            Change::Upsert(Object::Node(n)) => {
                let new = Arc::new(n);
                match self.nodes.insert(new.name.clone(), new.clone()) {
                    Some(old) => *old != *new,
                    None => true,
                }
            }
            Change::Delete(Kind::Node, key) => self.nodes.remove(&key.name).is_some(),
        }
    }

    /// Puts or removes the latest version of a route, and keeps the last
    /// accepted version in force when the latest cannot be applied (see
    /// [`State::held_routes`]). The parent indexes and topics follow the
    /// version in force; a new latest version that leaves it as it was
    /// still counts as a change (its status differs).
    fn put_route(
        &mut self,
        kind: Kind,
        key: ObjectKey,
        new: Option<Route>,
        topics: &mut HashSet<Topic>,
    ) -> bool {
        let entry = (kind, key.clone());
        let old = self.route(kind, &key).cloned();
        if old.as_deref() == new.as_ref() {
            return false;
        }
        let old_in_force = self
            .held_routes
            .get(&entry)
            .cloned()
            .or_else(|| old.clone());
        let new = new.map(Arc::new);
        let held = match &new {
            None => None,
            Some(n) if outbound::route_problem(n).is_none() => None,
            // Invalid: what was in force stays, if it was ever accepted.
            Some(_) => self
                .held_routes
                .get(&entry)
                .cloned()
                .or_else(|| old.clone().filter(|o| outbound::route_problem(o).is_none())),
        };
        let new_in_force = held.clone().or_else(|| new.clone());
        match held {
            Some(h) => self.held_routes.insert(entry.clone(), h),
            None => self.held_routes.remove(&entry),
        };
        let map = match kind {
            Kind::HttpRoute => &mut self.http_routes,
            _ => &mut self.grpc_routes,
        };
        match new {
            Some(new) => map.insert(key, new),
            None => map.remove(&key),
        };
        if old_in_force == new_in_force {
            return true;
        }
        if let Some(old) = &old_in_force {
            for parent in old.parent_services() {
                topics.insert(Topic::Policy(parent.clone()));
                remove_from(&mut self.routes_by_parent, &parent, &entry);
            }
            for parent in old.parent_servers() {
                topics.insert(Topic::Inbound(parent.namespace.clone()));
                remove_from(&mut self.routes_by_server, &parent, &entry);
            }
        }
        if let Some(new) = &new_in_force {
            for parent in new.parent_services() {
                topics.insert(Topic::Policy(parent.clone()));
                self.routes_by_parent
                    .entry(parent)
                    .or_default()
                    .insert(entry.clone());
            }
            for parent in new.parent_servers() {
                topics.insert(Topic::Inbound(parent.namespace.clone()));
                self.routes_by_server
                    .entry(parent)
                    .or_default()
                    .insert(entry.clone());
            }
        }
        true
    }

    fn put_policy(
        &mut self,
        key: ObjectKey,
        new: Option<Policy>,
        topics: &mut HashSet<Topic>,
    ) -> bool {
        let old = self.policies.get(&key).cloned();
        if old.as_deref() == new.as_ref() {
            return false;
        }
        if let Some(old) = &old {
            for target in old.target_services() {
                topics.insert(Topic::Policy(target.clone()));
                remove_from(&mut self.policies_by_target, &target, &key);
            }
        }
        match new {
            Some(new) => {
                for target in new.target_services() {
                    topics.insert(Topic::Policy(target.clone()));
                    self.policies_by_target
                        .entry(target)
                        .or_default()
                        .insert(key.clone());
                }
                self.policies.insert(key, Arc::new(new));
            }
            None => {
                self.policies.remove(&key);
            }
        }
        true
    }

    fn put_service(
        &mut self,
        key: Option<ObjectKey>,
        new: Option<Service>,
        topics: &mut HashSet<Topic>,
    ) -> bool {
        let Some(key) = key else { return false };
        let old = self.services.get(&key).cloned();
        if old.as_deref() == new.as_ref() {
            return false;
        }
        topics.insert(Topic::Service(key.clone()));
        if let Some(old) = &old {
            for ip in &old.cluster_ips {
                topics.insert(Topic::Ip(*ip));
                remove_from(&mut self.by_cluster_ip, ip, &key);
            }
        }
        match new {
            Some(new) => {
                for ip in &new.cluster_ips {
                    topics.insert(Topic::Ip(*ip));
                    self.by_cluster_ip
                        .entry(*ip)
                        .or_default()
                        .insert(key.clone());
                }
                self.services.insert(key, Arc::new(new));
            }
            None => {
                self.services.remove(&key);
            }
        }
        true
    }

    fn put_slice(
        &mut self,
        key: ObjectKey,
        new: Option<EndpointSlice>,
        topics: &mut HashSet<Topic>,
    ) -> bool {
        let old = self.slices.get(&key).cloned();
        if old.as_deref() == new.as_ref() {
            return false;
        }
        if let Some(old) = &old {
            if let Some(svc) = old.service_key() {
                topics.insert(Topic::Service(svc.clone()));
                remove_from(&mut self.slices_by_service, &svc, &key.name);
            }
            for pod in old.endpoints.iter().filter_map(|e| e.pod.as_ref()) {
                remove_from(
                    &mut self.slices_by_pod,
                    &ObjectKey::new(key.namespace.clone(), pod.clone()),
                    &key,
                );
            }
        }
        match new {
            Some(new) => {
                if let Some(svc) = new.service_key() {
                    topics.insert(Topic::Service(svc.clone()));
                    self.slices_by_service
                        .entry(svc)
                        .or_default()
                        .insert(key.name.clone());
                }
                for pod in new.endpoints.iter().filter_map(|e| e.pod.as_ref()) {
                    self.slices_by_pod
                        .entry(ObjectKey::new(key.namespace.clone(), pod.clone()))
                        .or_default()
                        .insert(key.clone());
                }
                self.slices.insert(key, Arc::new(new));
            }
            None => {
                self.slices.remove(&key);
            }
        }
        true
    }

    fn put_pod(&mut self, key: ObjectKey, new: Option<Pod>, topics: &mut HashSet<Topic>) -> bool {
        let old = self.pods.get(&key).cloned();
        if old.as_deref() == new.as_ref() {
            return false;
        }
        topics.insert(Topic::Pod(key.clone()));
        // Services whose slices point at this pod see its identity, ports
        // and labels.
        for slice in self.slices_by_pod.get(&key).into_iter().flatten() {
            if let Some(svc) = self.slices.get(slice).and_then(|s| s.service_key()) {
                topics.insert(Topic::Service(svc));
            }
        }
        if let Some(old) = &old {
            for ip in &old.ips {
                topics.insert(Topic::Ip(*ip));
                remove_from(&mut self.pods_by_ip, ip, &key);
            }
        }
        match new {
            Some(new) => {
                for ip in &new.ips {
                    topics.insert(Topic::Ip(*ip));
                    self.pods_by_ip.entry(*ip).or_default().insert(key.clone());
                }
                self.pods.insert(key, Arc::new(new));
            }
            None => {
                self.pods.remove(&key);
            }
        }
        true
    }
}

/// Puts or removes a Server or AuthorizationPolicy; a change bumps its
/// namespace's [`Topic::Inbound`].
fn put_inbound<T: PartialEq>(
    map: &mut HashMap<ObjectKey, Arc<T>>,
    by_namespace: &mut HashMap<String, BTreeSet<String>>,
    key: ObjectKey,
    new: Option<T>,
    topics: &mut HashSet<Topic>,
) -> bool {
    if map.get(&key).map(|o| &**o) == new.as_ref() {
        return false;
    }
    topics.insert(Topic::Inbound(key.namespace.clone()));
    match new {
        Some(new) => {
            by_namespace
                .entry(key.namespace.clone())
                .or_default()
                .insert(key.name.clone());
            map.insert(key, Arc::new(new));
        }
        None => {
            remove_from(by_namespace, &key.namespace, &key.name);
            map.remove(&key);
        }
    }
    true
}

fn remove_from<K: std::hash::Hash + Eq, V: Ord>(
    map: &mut HashMap<K, BTreeSet<V>>,
    key: &K,
    value: &V,
) {
    if let Some(set) = map.get_mut(key) {
        set.remove(value);
        if set.is_empty() {
            map.remove(key);
        }
    }
}

/// A cheaply clonable handle to the index.
#[derive(Clone, Default)]
pub struct Index {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Index {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Index").finish_non_exhaustive()
    }
}

#[derive(Default)]
struct Inner {
    state: RwLock<State>,
    topics: Mutex<HashMap<Topic, watch::Sender<u64>>>,
    /// Bumped after every batch that changed something.
    generation: watch::Sender<u64>,
}

/// What a batch did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Applied {
    pub changed: usize,
    pub topics: usize,
}

impl Index {
    pub fn new() -> Self {
        Self::default()
    }

    /// Read access to the state (keep it short: writers wait).
    pub fn read(&self) -> std::sync::RwLockReadGuard<'_, State> {
        // A poisoned lock means a writer panicked mid-batch; the state is
        // still structurally valid (every step keeps the maps consistent), so
        // keep serving rather than take the controller down.
        self.inner.state.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, State> {
        self.inner.state.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Applies changes as one batch and notifies readers once per topic.
    pub fn apply(&self, changes: impl IntoIterator<Item = Change>) -> Applied {
        let mut topics = HashSet::new();
        let mut changed = 0;
        {
            let mut state = self.write();
            for change in changes {
                if state.apply(change, &mut topics) {
                    changed += 1;
                }
            }
        }
        self.notify(changed, topics)
    }

    /// Replaces every object of `kind` with `objects` (a re-list): objects
    /// not in the list are deleted, equal ones are left alone.
    pub fn reset(&self, kind: Kind, objects: Vec<Object>) -> Applied {
        self.reset_kinds(&[kind], objects)
    }

    /// Replaces every object of the given kinds with `objects` in one batch
    /// (the directory source replaces everything after a reload).
    pub fn reset_kinds(&self, kinds: &[Kind], objects: Vec<Object>) -> Applied {
        let mut topics = HashSet::new();
        let mut changed = 0;
        {
            let mut state = self.write();
            let keep: HashSet<(Kind, ObjectKey)> =
                objects.iter().map(|o| (o.kind(), o.key())).collect();
            for kind in kinds {
                for key in state.keys(*kind) {
                    if !keep.contains(&(*kind, key.clone()))
                        && state.apply(Change::Delete(*kind, key), &mut topics)
                    {
                        changed += 1;
                    }
                }
            }
            for object in objects {
                if state.apply(Change::Upsert(object), &mut topics) {
                    changed += 1;
                }
            }
        }
        self.notify(changed, topics)
    }

    fn notify(&self, changed: usize, topics: HashSet<Topic>) -> Applied {
        let n = topics.len();
        if changed > 0 {
            let mut registry = self.inner.topics.lock().unwrap_or_else(|e| e.into_inner());
            for topic in topics {
                if let Some(tx) = registry.get(&topic) {
                    if tx.receiver_count() == 0 {
                        registry.remove(&topic);
                    } else {
                        tx.send_modify(|v| *v += 1);
                    }
                }
            }
            drop(registry);
            self.inner.generation.send_modify(|g| *g += 1);
        }
        Applied { changed, topics: n }
    }

    /// A receiver that changes after every batch that changed something.
    pub fn generation(&self) -> watch::Receiver<u64> {
        self.inner.generation.subscribe()
    }

    fn subscribe(&self, topics: &[Topic]) -> Vec<watch::Receiver<u64>> {
        let mut registry = self.inner.topics.lock().unwrap_or_else(|e| e.into_inner());
        // Drop topics nobody listens to any more, now and then.
        if registry.len() > 1024 && registry.len().is_power_of_two() {
            registry.retain(|_, tx| tx.receiver_count() > 0);
        }
        topics
            .iter()
            .map(|t| {
                registry
                    .entry(t.clone())
                    .or_insert_with(|| watch::channel(0).0)
                    .subscribe()
            })
            .collect()
    }

    /// Resolves a target and subscribes to everything the answer depends
    /// on, atomically with respect to writers.
    pub fn resolve(
        &self,
        target: &crate::model::names::Target,
        config: &ResolveConfig,
    ) -> (Resolution, Vec<watch::Receiver<u64>>) {
        let state = self.read();
        let (resolution, topics) = resolve::resolve(&state, target, config);
        let receivers = self.subscribe(&topics);
        drop(state);
        (resolution, receivers)
    }

    /// The outbound policy of `target` for a client in `caller_ns`, and
    /// receivers for everything it depends on, atomically with respect to
    /// writers (like [`Index::resolve`]).
    pub fn outbound_policy(
        &self,
        target: &crate::model::names::Target,
        caller_ns: &str,
        config: &outbound::OutboundConfig,
    ) -> (
        weft_proto::destination::OutboundPolicy,
        Vec<watch::Receiver<u64>>,
    ) {
        let state = self.read();
        let (policy, mut topics) = outbound::outbound_policy(&state, target, caller_ns, config);
        let mut seen = HashSet::new();
        topics.retain(|t| seen.insert(t.clone()));
        let receivers = self.subscribe(&topics);
        drop(state);
        (policy, receivers)
    }

    /// The inbound policy of `port` of pod `namespace`/`pod`, and
    /// receivers for everything it depends on (the pod and its namespace's
    /// inbound objects), atomically with respect to writers (like
    /// [`Index::resolve`]).
    pub fn inbound_server(
        &self,
        namespace: &str,
        pod: &str,
        port: u16,
        config: &inbound::InboundConfig,
    ) -> (weft_proto::policy::InboundServer, Vec<watch::Receiver<u64>>) {
        let state = self.read();
        let (server, topics) = inbound::inbound_server(&state, namespace, pod, port, config);
        let receivers = self.subscribe(&topics);
        drop(state);
        (server, receivers)
    }

    /// Object counts by kind.
    pub fn counts(&self) -> BTreeMap<Kind, usize> {
        let state = self.read();
        Kind::ALL.iter().map(|k| (*k, state.len(*k))).collect()
    }

    /// Number of topics with a registered channel (for metrics and tests).
    pub fn topic_count(&self) -> usize {
        self.inner
            .topics
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .len()
    }
}

/// Waits until any receiver changes. Returns `false` if every sender is
/// gone (cannot happen while the index lives).
pub async fn changed(receivers: &mut [watch::Receiver<u64>]) -> bool {
    if receivers.is_empty() {
        return std::future::pending().await;
    }
    let futures = receivers.iter_mut().map(|r| Box::pin(r.changed()));
    let (result, _, _) = futures_util::future::select_all(futures).await;
    result.is_ok()
}

//! `Destination.Resolve`. Each distinct target has one *resolver* task,
//! shared by every stream that asks for it: it resolves the target against
//! the index, publishes the answer on a `watch` channel, and re-resolves
//! when an index topic the answer depends on changes. Each stream has a
//! small task that diffs the latest answer against what that stream was
//! last sent. So 500 proxies watching one service cost one resolution per
//! change, not 500; a slow stream simply skips to the latest answer.
//!
//! Updates (see `weft.destination.Update` in weft-proto):
//! - first message: `Add` with every endpoint, or `NoEndpoints{exists}` when
//!   there are none (`exists = false`: unknown target, forward unchanged);
//! - then `Add` for new endpoints and endpoints whose metadata changed
//!   (replace by address), `Remove` for endpoints that left, and
//!   `NoEndpoints` when the set becomes empty or the target disappears.
//!   Adds are sent before removes so a client never drops to zero
//!   endpoints in the middle of a replacement.
//!
//! `Destination.ClientPolicy`: the target resolves as for Resolve (names in
//! the caller's namespace, a ClusterIP:port is its service, a pod IP or an
//! unknown name gets a policy without `service`); the policy is compiled
//! by [`crate::index::outbound`]. Each stream has one task: it sends the
//! whole policy first, then waits for a change of any index topic the
//! policy depends on (the service, its routes and BackendPolicies, each
//! backend service and its policies), recompiles, and sends the whole
//! policy again only when it differs from what that stream was last sent.
//! Unlike Resolve, streams do not share a compiler task: a policy depends
//! on the caller's namespace (consumer routes), and compiling one is
//! cheap next to the change that triggers it.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use futures_util::Stream;
use tokio::sync::{mpsc, watch};
use tonic::{Request, Response, Status};
use weft_proto::destination::destination_server::Destination;
use weft_proto::destination::{
    update, AddEndpoints, ClientPolicyRequest, Endpoint, NoEndpoints, OutboundPolicy, ProtocolHint,
    RemoveEndpoints, ResolveRequest, TlsIdentity, Update,
};

use super::stream::{watch_answers, StreamMetrics};
use crate::index::outbound::OutboundConfig;
use crate::index::resolve::Hint;
use crate::index::{self, EndpointInfo, Index, Resolution, ResolveConfig};
use crate::metrics::{Metrics, UpdateLabels};
use crate::model::names::{parse_target, Target};

/// Settings of the destination service.
#[derive(Clone, Debug)]
pub struct DestinationConfig {
    pub cluster_domain: String,
    pub resolve: ResolveConfig,
}

impl Default for DestinationConfig {
    fn default() -> Self {
        DestinationConfig {
            cluster_domain: "cluster.local".into(),
            resolve: ResolveConfig::default(),
        }
    }
}

/// The `Destination` gRPC service.
#[derive(Clone, Debug)]
pub struct DestinationService {
    index: Index,
    config: DestinationConfig,
    metrics: Metrics,
    resolvers: Arc<Mutex<HashMap<Target, watch::Sender<Arc<Resolution>>>>>,
}

impl DestinationService {
    pub fn new(index: Index, config: DestinationConfig, metrics: Metrics) -> Self {
        DestinationService {
            index,
            config,
            metrics,
            resolvers: Arc::default(),
        }
    }

    /// The latest answer for `target`, starting its resolver if no stream
    /// watches it yet. The resolver stops when its last stream is gone.
    fn watch(&self, target: &Target) -> watch::Receiver<Arc<Resolution>> {
        let mut resolvers = self.resolvers.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(tx) = resolvers.get(target) {
            if !tx.is_closed() {
                return tx.subscribe();
            }
        }
        let (resolution, mut topics) = self.index.resolve(target, &self.config.resolve);
        let (tx, rx) = watch::channel(Arc::new(resolution));
        resolvers.insert(target.clone(), tx.clone());
        let (index, config, target, registry) = (
            self.index.clone(),
            self.config.resolve.clone(),
            target.clone(),
            self.resolvers.clone(),
        );
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    alive = index::changed(&mut topics) => if !alive { break },
                    () = tx.closed() => break,
                }
                let (next, t) = index.resolve(&target, &config);
                topics = t;
                tx.send_if_modified(|current| {
                    if **current == next {
                        false
                    } else {
                        *current = Arc::new(next);
                        true
                    }
                });
            }
            let mut resolvers = registry.lock().unwrap_or_else(|e| e.into_inner());
            if resolvers.get(&target).is_some_and(|t| t.same_channel(&tx)) {
                resolvers.remove(&target);
            }
        });
        rx
    }
}

pub use super::stream::UpdateStream;

/// The namespace whose consumer routes and short names apply to a caller. Over mTLS the
/// caller's certificate decides: its SPIFFE ID is `spiffe://<trust_domain>/ns/<ns>/sa/<sa>`,
/// an empty `claimed` namespace takes `<ns>`, and a different one is refused (a proxy cannot
/// read another namespace's consumer routes by naming it). On a plaintext connection
/// (`--insecure-plaintext`) the claim is all there is.
#[allow(clippy::result_large_err)] // tonic's Status, as every handler returns
pub fn caller_namespace(
    caller: Option<&str>,
    claimed: &str,
    trust_domain: &str,
) -> Result<String, Status> {
    let Some(caller) = caller else {
        return Ok(claimed.to_string());
    };
    let verified = crate::identity::SpiffeId::parse(caller)
        .ok()
        .filter(|id| id.trust_domain == trust_domain)
        .map(|id| id.service_account.namespace);
    match verified.as_deref() {
        Some(ns) if claimed.is_empty() || claimed == ns => Ok(ns.to_string()),
        Some(ns) => Err(Status::permission_denied(format!(
            "{caller} may not ask as namespace {claimed:?}: its certificate is of namespace \
             {ns:?} (WEFT_PROXY_NAMESPACE must be the pod's namespace)"
        ))),
        None => Err(Status::permission_denied(format!(
            "{caller} is not a workload identity of trust domain {trust_domain}"
        ))),
    }
}

#[tonic::async_trait]
impl Destination for DestinationService {
    type ResolveStream = UpdateStream<Update>;
    type ClientPolicyStream = Pin<Box<dyn Stream<Item = Result<OutboundPolicy, Status>> + Send>>;

    async fn resolve(
        &self,
        request: Request<ResolveRequest>,
    ) -> Result<Response<UpdateStream<Update>>, Status> {
        let caller = super::policy::caller_identity(&request).map(str::to_string);
        let req = request.into_inner();
        let claimed = req
            .context
            .as_ref()
            .map(|c| c.namespace.as_str())
            .unwrap_or("");
        let caller_ns = caller_namespace(
            caller.as_deref(),
            claimed,
            &self.config.resolve.trust_domain,
        )?;
        let target = parse_target(&req.target, &caller_ns, &self.config.cluster_domain)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        tracing::debug!(target = %req.target, ?target, caller = ?req.context, "resolve");
        let (tx, rx) = mpsc::channel(8);
        let mut answers = self.watch(&target);
        let metrics = self.metrics.clone();
        tokio::spawn(async move {
            metrics.resolve_streams.inc();
            let mut last: Option<Arc<Resolution>> = None;
            'stream: loop {
                let next = answers.borrow_and_update().clone();
                for update in diff(last.as_deref(), &next) {
                    metrics
                        .resolve_updates
                        .get_or_create(&UpdateLabels {
                            update: update_name(&update),
                        })
                        .inc();
                    if tx.send(Ok(update)).await.is_err() {
                        break 'stream;
                    }
                }
                last = Some(next);
                tokio::select! {
                    changed = answers.changed() => if changed.is_err() { break },
                    () = tx.closed() => break,
                }
            }
            metrics.resolve_streams.dec();
        });
        Ok(Response::new(UpdateStream(rx)))
    }

    async fn client_policy(
        &self,
        request: Request<ClientPolicyRequest>,
    ) -> Result<Response<Self::ClientPolicyStream>, Status> {
        let caller = super::policy::caller_identity(&request).map(str::to_string);
        let req = request.into_inner();
        let claimed = req
            .context
            .as_ref()
            .map(|c| c.namespace.as_str())
            .unwrap_or("");
        let caller_ns = caller_namespace(
            caller.as_deref(),
            claimed,
            &self.config.resolve.trust_domain,
        )?;
        let target = parse_target(&req.target, &caller_ns, &self.config.cluster_domain)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        tracing::debug!(target = %req.target, ?target, caller = ?req.context, "client policy");
        let config = OutboundConfig {
            cluster_domain: self.config.cluster_domain.clone(),
        };
        let metrics = StreamMetrics {
            open: self.metrics.client_policy_streams.clone(),
            sent: self.metrics.client_policy_updates.clone(),
        };
        let stream = watch_answers(self.index.clone(), metrics, move |index| {
            index.outbound_policy(&target, &caller_ns, &config)
        });
        Ok(Response::new(Box::pin(stream)))
    }
}

fn update_name(update: &Update) -> &'static str {
    match update.update {
        Some(update::Update::Add(_)) => "add",
        Some(update::Update::Remove(_)) => "remove",
        Some(update::Update::NoEndpoints(_)) => "no_endpoints",
        None => "none",
    }
}

/// The updates that take a client from `last` (what it was sent; `None`
/// before the first message) to `next`. Pure.
pub fn diff(last: Option<&Resolution>, next: &Resolution) -> Vec<Update> {
    let no_endpoints = |exists: bool| Update {
        update: Some(update::Update::NoEndpoints(NoEndpoints { exists })),
    };
    let add = |eps: Vec<&EndpointInfo>| Update {
        update: Some(update::Update::Add(AddEndpoints {
            endpoints: eps.into_iter().map(to_proto).collect(),
        })),
    };
    let empty = BTreeMap::new();
    let (last_set, last_known) = match last {
        None => (None, false),
        Some(Resolution::Unknown) => (Some(&empty), false),
        Some(Resolution::Endpoints(set)) => (Some(set), true),
    };
    match next {
        Resolution::Unknown => {
            if last.is_some() && !last_known {
                Vec::new()
            } else {
                vec![no_endpoints(false)]
            }
        }
        Resolution::Endpoints(set) if set.is_empty() => match last_set {
            Some(prev) if last_known && prev.is_empty() => Vec::new(),
            _ => vec![no_endpoints(true)],
        },
        Resolution::Endpoints(set) => {
            let prev = last_set.unwrap_or(&empty);
            let added: Vec<&EndpointInfo> = set
                .iter()
                .filter(|(addr, ep)| prev.get(*addr) != Some(*ep))
                .map(|(_, ep)| ep)
                .collect();
            let removed: Vec<SocketAddr> = prev
                .keys()
                .filter(|a| !set.contains_key(*a))
                .copied()
                .collect();
            let mut out = Vec::new();
            if !added.is_empty() {
                out.push(add(added));
            }
            if !removed.is_empty() {
                out.push(Update {
                    update: Some(update::Update::Remove(RemoveEndpoints {
                        addrs: removed.into_iter().map(Into::into).collect(),
                    })),
                });
            }
            out
        }
    }
}

fn to_proto(ep: &EndpointInfo) -> Endpoint {
    Endpoint {
        addr: Some(ep.addr.into()),
        weight: ep.weight,
        tls_identity: ep.identity.as_ref().map(|id| TlsIdentity {
            spiffe_id: id.clone(),
        }),
        protocol_hint: match ep.hint {
            Hint::Unknown => ProtocolHint::Unknown,
            Hint::H2 => ProtocolHint::H2,
            Hint::Opaque => ProtocolHint::Opaque,
        } as i32,
        zone: ep.zone.clone().unwrap_or_default(),
        labels: ep.labels.clone().into_iter().collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ep(addr: &str, zone: &str) -> EndpointInfo {
        EndpointInfo {
            addr: addr.parse().expect("addr"),
            weight: 1,
            identity: None,
            hint: Hint::Unknown,
            zone: Some(zone.into()),
            labels: BTreeMap::new(),
        }
    }

    fn set(eps: &[(&str, &str)]) -> Resolution {
        Resolution::Endpoints(
            eps.iter()
                .map(|(a, z)| (a.parse().expect("addr"), ep(a, z)))
                .collect(),
        )
    }

    /// Updates rendered compactly: "add a,b", "remove c", "none exists=true".
    fn render(updates: Vec<Update>) -> Vec<String> {
        updates
            .into_iter()
            .map(|u| match u.update {
                Some(update::Update::Add(a)) => format!(
                    "add {}",
                    a.endpoints
                        .iter()
                        .map(|e| e.socket_addr().map(|a| a.to_string()).unwrap_or_default())
                        .collect::<Vec<_>>()
                        .join(",")
                ),
                Some(update::Update::Remove(r)) => format!(
                    "remove {}",
                    r.addrs
                        .iter()
                        .map(|a| a
                            .to_socket_addr()
                            .map(|a| a.to_string())
                            .unwrap_or_default())
                        .collect::<Vec<_>>()
                        .join(",")
                ),
                Some(update::Update::NoEndpoints(n)) => format!("none exists={}", n.exists),
                None => "empty".into(),
            })
            .collect()
    }

    #[test]
    fn the_certificate_decides_the_callers_namespace() {
        let td = "cluster.local";
        let me = Some("spiffe://cluster.local/ns/shop/sa/web");
        assert_eq!(caller_namespace(me, "shop", td).expect("own"), "shop");
        assert_eq!(
            caller_namespace(me, "", td).expect("from the certificate"),
            "shop"
        );
        let e = caller_namespace(me, "bank", td).expect_err("another namespace");
        assert_eq!(e.code(), tonic::Code::PermissionDenied);
        assert!(
            e.message().contains("namespace \"bank\"") && e.message().contains("\"shop\""),
            "{}",
            e.message()
        );
        let e = caller_namespace(Some("spiffe://other.org/ns/shop/sa/web"), "shop", td)
            .expect_err("another trust domain");
        assert!(
            e.message().contains("trust domain cluster.local"),
            "{}",
            e.message()
        );
        // Plaintext (--insecure-plaintext): the claim stands.
        assert_eq!(
            caller_namespace(None, "bank", td).expect("plaintext"),
            "bank"
        );
    }

    #[test]
    fn table() {
        let a = ("10.0.0.1:80", "z1");
        let b = ("10.0.0.2:80", "z1");
        let c = ("10.0.0.3:80", "z1");
        let a_moved = ("10.0.0.1:80", "z2");
        let unknown = Resolution::Unknown;
        let empty = set(&[]);
        let cases: Vec<(&str, Option<Resolution>, Resolution, Vec<&str>)> = vec![
            (
                "first: unknown",
                None,
                unknown.clone(),
                vec!["none exists=false"],
            ),
            (
                "first: empty",
                None,
                empty.clone(),
                vec!["none exists=true"],
            ),
            (
                "first: full set",
                None,
                set(&[a, b]),
                vec!["add 10.0.0.1:80,10.0.0.2:80"],
            ),
            ("no change", Some(set(&[a, b])), set(&[a, b]), vec![]),
            (
                "no change unknown",
                Some(unknown.clone()),
                unknown.clone(),
                vec![],
            ),
            (
                "no change empty",
                Some(empty.clone()),
                empty.clone(),
                vec![],
            ),
            (
                "add and remove",
                Some(set(&[a, b])),
                set(&[b, c]),
                vec!["add 10.0.0.3:80", "remove 10.0.0.1:80"],
            ),
            (
                "metadata change re-adds",
                Some(set(&[a, b])),
                set(&[a_moved, b]),
                vec!["add 10.0.0.1:80"],
            ),
            (
                "to empty",
                Some(set(&[a])),
                empty.clone(),
                vec!["none exists=true"],
            ),
            (
                "to unknown",
                Some(set(&[a])),
                unknown.clone(),
                vec!["none exists=false"],
            ),
            (
                "unknown to set",
                Some(unknown.clone()),
                set(&[a]),
                vec!["add 10.0.0.1:80"],
            ),
            (
                "empty to set",
                Some(empty.clone()),
                set(&[a]),
                vec!["add 10.0.0.1:80"],
            ),
            (
                "empty to unknown",
                Some(empty),
                unknown,
                vec!["none exists=false"],
            ),
        ];
        for (name, last, next, want) in cases {
            assert_eq!(render(diff(last.as_ref(), &next)), want, "{name}");
        }
    }

    proptest::proptest! {
        /// Applying diff(last, next) to the client's view of `last` yields `next`.
        #[test]
        fn diffs_converge(
            first in proptest::collection::btree_set(0u8..20, 0..8),
            second in proptest::collection::btree_set(0u8..20, 0..8),
            zones in proptest::collection::vec(0u8..2, 20),
        ) {
            let mk = |s: &std::collections::BTreeSet<u8>, shift: usize| -> Resolution {
                Resolution::Endpoints(s.iter().map(|i| {
                    let addr = format!("10.0.0.{i}:80");
                    let zone = format!("z{}", zones[(usize::from(*i) + shift) % zones.len()]);
                    (addr.parse().expect("addr"), ep(&addr, &zone))
                }).collect())
            };
            let (r1, r2) = (mk(&first, 0), mk(&second, 1));
            let mut view: BTreeMap<SocketAddr, Endpoint> = BTreeMap::new();
            for u in diff(None, &r1).into_iter().chain(diff(Some(&r1), &r2)) {
                match u.update {
                    Some(update::Update::Add(a)) => for e in a.endpoints { view.insert(e.socket_addr().expect("addr"), e); },
                    Some(update::Update::Remove(r)) => for a in r.addrs { view.remove(&a.to_socket_addr().expect("addr")); },
                    Some(update::Update::NoEndpoints(_)) => view.clear(),
                    None => {}
                }
            }
            let Resolution::Endpoints(want) = &r2 else { unreachable!() };
            let want: BTreeMap<SocketAddr, Endpoint> = want.iter().map(|(a, e)| (*a, to_proto(e))).collect();
            proptest::prop_assert_eq!(view, want);
        }
    }
}

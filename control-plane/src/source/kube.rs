//! The Kubernetes source: one kube-rs `watcher` per kind (Services,
//! EndpointSlices, Pods, Namespaces, HTTPRoutes, GRPCRoutes,
//! BackendPolicies, NetworkPolicies, Servers, AuthorizationPolicies; all
//! namespaces) feeding the index. Nodes are watched only when a consumer
//! asks for [`Kind::Node`] (the CNI agent, for its routes between nodes:
//! the agent's RBAC grants get/list/watch on nodes, the controller's does
//! not, and [`Kind::ALL`] leaves them out).
//!
//! Re-list semantics: on `Init` the objects of a kind are buffered until
//! `InitDone`, then [`Index::reset`] replaces that kind in one batch, so an
//! object deleted while the watch was broken (e.g. after a 410 Gone) is
//! removed, and readers never see a half-listed kind. An object that stops
//! converting keeps its last good version in the index, on a watch event
//! and on a re-list alike. `Apply`/`Delete`
//! events apply one by one. Watch errors are logged, counted, and retried
//! with kube-rs's default backoff. The source is ready once every kind has
//! completed its first list. A kind whose CRD is not installed (the first
//! list answers 404: no Gateway API or no Weft CRDs in the cluster) counts
//! as listed and empty, with a warning, so the mesh still runs without
//! routes; the watcher keeps retrying and picks the kind up once the CRD
//! is installed.
//!
//! RBAC: get/list/watch on [`WATCHED_RESOURCES`], and update/patch on the
//! status of [`STATUS_RESOURCES`] (written by [`crate::status`]), granted
//! by `charts/weft/templates/controller-rbac.yaml`.

use std::fmt::Debug;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use futures_util::StreamExt as _;
use k8s_openapi::api::core::v1 as core;
use k8s_openapi::api::discovery::v1 as discovery;
use k8s_openapi::api::networking::v1 as networking;
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt as _;
use kube::{Api, Client, Resource, ResourceExt as _};
use serde::de::DeserializeOwned;

use super::Readiness;
use crate::index::{Change, Index};
use crate::metrics::{KindLabels, Metrics};
use crate::model::authz::{AuthorizationPolicy, Server};
use crate::model::gateway::{GrpcRoute, HttpRoute};
use crate::model::policy::BackendPolicy;
use crate::model::{convert, Kind, Object, ObjectKey};

/// The (API group, resource) pairs the source lists and watches, for RBAC:
/// `charts/weft/templates/controller-rbac.yaml` grants exactly get/list/watch
/// on these (checked by `tests/rbac.rs`).
pub const WATCHED_RESOURCES: &[(&str, &str)] = &[
    ("", "services"),
    ("discovery.k8s.io", "endpointslices"),
    ("", "pods"),
    ("", "namespaces"),
    ("gateway.networking.k8s.io", "httproutes"),
    ("gateway.networking.k8s.io", "grpcroutes"),
    ("policy.weft.dev", "backendpolicies"),
    ("networking.k8s.io", "networkpolicies"),
    ("policy.weft.dev", "servers"),
    ("policy.weft.dev", "authorizationpolicies"),
];

/// The status subresources the controller writes (verbs update, patch).
pub const STATUS_RESOURCES: &[(&str, &str)] = &[
    ("gateway.networking.k8s.io", "httproutes/status"),
    ("gateway.networking.k8s.io", "grpcroutes/status"),
    ("policy.weft.dev", "backendpolicies/status"),
];

/// Watches every kind until the process ends.
pub async fn run(client: Client, index: Index, metrics: Metrics, readiness: Readiness) {
    run_kinds(client, index, metrics, readiness, &Kind::ALL).await
}

/// Watches `kinds` until the process ends (the CNI agent needs only pods, namespaces,
/// NetworkPolicies and nodes); ready once each of them has been listed.
pub async fn run_kinds(
    client: Client,
    index: Index,
    metrics: Metrics,
    readiness: Readiness,
    kinds: &[Kind],
) {
    let synced = Arc::new(AtomicUsize::new(0));
    let ctx = Ctx {
        index,
        metrics,
        readiness,
        synced,
        wanted: kinds.len(),
    };
    let on = |kind: Kind| kinds.contains(&kind);
    macro_rules! watch {
        ($ty:ty, $kind:expr, $api:expr, $conv:expr) => {
            async {
                if on($kind) {
                    watch_kind::<$ty>($api, $kind, ctx.clone(), $conv).await
                }
            }
        };
    }
    tokio::join!(
        watch!(
            core::Service,
            Kind::Service,
            Api::all(client.clone()),
            |s| convert::service(s, "default").map(Object::Service)
        ),
        watch!(
            discovery::EndpointSlice,
            Kind::EndpointSlice,
            Api::all(client.clone()),
            |s| convert::endpoint_slice(s, "default").map(Object::EndpointSlice)
        ),
        watch!(core::Pod, Kind::Pod, Api::all(client.clone()), |p| {
            convert::pod(p, "default").map(Object::Pod)
        }),
        watch!(
            core::Namespace,
            Kind::Namespace,
            Api::all(client.clone()),
            |n| convert::namespace(n).map(Object::Namespace)
        ),
        watch!(HttpRoute, Kind::HttpRoute, Api::all(client.clone()), |r| {
            convert::http_route(r, "default").map(|r| Object::Route(Box::new(r)))
        }),
        watch!(GrpcRoute, Kind::GrpcRoute, Api::all(client.clone()), |r| {
            convert::grpc_route(r, "default").map(|r| Object::Route(Box::new(r)))
        }),
        watch!(
            BackendPolicy,
            Kind::BackendPolicy,
            Api::all(client.clone()),
            |p| convert::backend_policy(p, "default").map(|p| Object::BackendPolicy(Box::new(p)))
        ),
        watch!(
            networking::NetworkPolicy,
            Kind::NetworkPolicy,
            Api::all(client.clone()),
            |p| convert::network_policy(p, "default").map(|p| Object::NetworkPolicy(Box::new(p)))
        ),
        watch!(Server, Kind::Server, Api::all(client.clone()), |s| {
            convert::server(s, "default").map(|s| Object::Server(Box::new(s)))
        }),
        watch!(
            AuthorizationPolicy,
            Kind::AuthorizationPolicy,
            Api::all(client.clone()),
            |a| convert::authorization_policy(a, "default")
                .map(|a| Object::AuthorizationPolicy(Box::new(a)))
        ),
        watch!(core::Node, Kind::Node, Api::all(client.clone()), |n| {
            convert::node(n).map(Object::Node)
        }),
    );
}

#[derive(Clone)]
struct Ctx {
    index: Index,
    metrics: Metrics,
    readiness: Readiness,
    synced: Arc<AtomicUsize>,
    /// How many kinds must list before the source is ready.
    wanted: usize,
}

fn key_of<K: Resource>(kind: Kind, obj: &K) -> ObjectKey {
    let namespace = match kind {
        Kind::Namespace | Kind::Node => String::new(),
        _ => obj.namespace().unwrap_or_else(|| "default".into()),
    };
    ObjectKey::new(namespace, obj.name_any())
}

async fn watch_kind<K>(
    api: Api<K>,
    kind: Kind,
    ctx: Ctx,
    to_model: fn(&K) -> Result<Object, convert::ConvertError>,
) where
    K: Resource + Clone + DeserializeOwned + Debug + Send + 'static,
    K::DynamicType: Default,
{
    let mut events = watcher::watcher(api, watcher::Config::default())
        .default_backoff()
        .boxed();
    let mut buffer: Vec<Object> = Vec::new();
    let mut first_sync = true;
    let mark_synced = |first_sync: &mut bool| {
        if *first_sync {
            *first_sync = false;
            if ctx.synced.fetch_add(1, Ordering::AcqRel) + 1 == ctx.wanted {
                tracing::info!("kubernetes source synced; ready");
                ctx.readiness.set_ready();
            }
        }
    };
    let convert = |obj: &K| match to_model(obj) {
        Ok(o) => Some(o),
        Err(e) => {
            tracing::warn!(error = %e, "ignoring object the mesh cannot use");
            ctx.metrics
                .invalid_objects
                .get_or_create(&KindLabels::from(kind))
                .inc();
            None
        }
    };
    while let Some(event) = events.next().await {
        match event {
            Ok(Event::Init) => {
                tracing::debug!(%kind, "listing");
                buffer.clear();
            }
            // On a re-list too, an object that no longer converts keeps the version the
            // index holds (else the reset would delete it).
            Ok(Event::InitApply(obj)) => match convert(&obj) {
                Some(o) => buffer.push(o),
                None => buffer.extend(ctx.index.read().object(kind, &key_of(kind, &obj))),
            },
            Ok(Event::InitDone) => {
                let applied = ctx.index.reset(kind, std::mem::take(&mut buffer));
                ctx.metrics.index_changes.inc_by(applied.changed as u64);
                tracing::info!(%kind, changed = applied.changed, "listed");
                mark_synced(&mut first_sync);
            }
            Ok(Event::Apply(obj)) => {
                // An object that no longer converts keeps its last good
                // state in the index (the error is logged and counted).
                if let Some(o) = convert(&obj) {
                    let applied = ctx.index.apply([Change::Upsert(o)]);
                    ctx.metrics.index_changes.inc_by(applied.changed as u64);
                }
            }
            Ok(Event::Delete(obj)) => {
                let applied = ctx.index.apply([Change::Delete(kind, key_of(kind, &obj))]);
                ctx.metrics.index_changes.inc_by(applied.changed as u64);
            }
            Err(watcher::Error::InitialListFailed(kube::Error::Api(status)))
                if first_sync && status.code == 404 =>
            {
                tracing::warn!(%kind, "the API server does not serve this kind (is its CRD installed?); treating it as empty and retrying");
                mark_synced(&mut first_sync);
            }
            Err(e) => {
                ctx.metrics
                    .kube_watch_errors
                    .get_or_create(&KindLabels::from(kind))
                    .inc();
                tracing::warn!(%kind, error = %e, "watch failed; retrying with backoff (check the API server and the controller's RBAC)");
            }
        }
        ctx.metrics.observe_index(&ctx.index);
    }
}

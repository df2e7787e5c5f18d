//! The Kubernetes source: one kube-rs `watcher` per kind (Services,
//! EndpointSlices, Pods, Namespaces, HTTPRoutes, GRPCRoutes,
//! BackendPolicies; all namespaces) feeding the index.
//!
//! Re-list semantics: on `Init` the objects of a kind are buffered until
//! `InitDone`, then [`Index::reset`] replaces that kind in one batch, so an
//! object deleted while the watch was broken (e.g. after a 410 Gone) is
//! removed, and readers never see a half-listed kind. `Apply`/`Delete`
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
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt as _;
use kube::{Api, Client, Resource, ResourceExt as _};
use serde::de::DeserializeOwned;

use super::Readiness;
use crate::index::{Change, Index};
use crate::metrics::{KindLabels, Metrics};
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
];

/// The status subresources the controller writes (verbs update, patch).
pub const STATUS_RESOURCES: &[(&str, &str)] = &[
    ("gateway.networking.k8s.io", "httproutes/status"),
    ("gateway.networking.k8s.io", "grpcroutes/status"),
    ("policy.weft.dev", "backendpolicies/status"),
];

/// Watches every kind until the process ends.
pub async fn run(client: Client, index: Index, metrics: Metrics, readiness: Readiness) {
    let synced = Arc::new(AtomicUsize::new(0));
    let ctx = Ctx {
        index,
        metrics,
        readiness,
        synced,
    };
    tokio::join!(
        watch_kind::<core::Service>(Api::all(client.clone()), Kind::Service, ctx.clone(), |s| {
            convert::service(s, "default").map(Object::Service)
        }),
        watch_kind::<discovery::EndpointSlice>(
            Api::all(client.clone()),
            Kind::EndpointSlice,
            ctx.clone(),
            |s| { convert::endpoint_slice(s, "default").map(Object::EndpointSlice) }
        ),
        watch_kind::<core::Pod>(Api::all(client.clone()), Kind::Pod, ctx.clone(), |p| {
            convert::pod(p, "default").map(Object::Pod)
        }),
        watch_kind::<core::Namespace>(
            Api::all(client.clone()),
            Kind::Namespace,
            ctx.clone(),
            |n| { convert::namespace(n).map(Object::Namespace) }
        ),
        watch_kind::<HttpRoute>(
            Api::all(client.clone()),
            Kind::HttpRoute,
            ctx.clone(),
            |r| { convert::http_route(r, "default").map(|r| Object::Route(Box::new(r))) }
        ),
        watch_kind::<GrpcRoute>(
            Api::all(client.clone()),
            Kind::GrpcRoute,
            ctx.clone(),
            |r| { convert::grpc_route(r, "default").map(|r| Object::Route(Box::new(r))) }
        ),
        watch_kind::<BackendPolicy>(Api::all(client), Kind::BackendPolicy, ctx, |p| {
            convert::backend_policy(p, "default").map(|p| Object::BackendPolicy(Box::new(p)))
        }),
    );
}

#[derive(Clone)]
struct Ctx {
    index: Index,
    metrics: Metrics,
    readiness: Readiness,
    synced: Arc<AtomicUsize>,
}

fn key_of<K: Resource>(kind: Kind, obj: &K) -> ObjectKey {
    let namespace = match kind {
        Kind::Namespace => String::new(),
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
            if ctx.synced.fetch_add(1, Ordering::AcqRel) + 1 == Kind::ALL.len() {
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
            Ok(Event::InitApply(obj)) => buffer.extend(convert(&obj)),
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

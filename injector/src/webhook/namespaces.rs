//! The pod's namespace metadata: the namespace's `weft.dev/inject` can turn injection on.
//!
//! In a cluster, [`KubeNamespaces`] reads the namespace's metadata from the API server (RBAC:
//! `get` on `namespaces`) and caches it briefly: a namespace's annotations change rarely, and a
//! `kubectl rollout restart` of a large Deployment asks about the same namespace many times.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::patch::NamespaceMeta;

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

#[derive(Debug, thiserror::Error)]
#[error("cannot read namespace {name}: {reason} (does the injector's ServiceAccount may get namespaces?)")]
pub struct NamespaceError {
    pub name: String,
    pub reason: String,
}

/// Looks up a namespace's metadata. A namespace that does not exist has empty metadata.
pub trait NamespaceSource: Send + Sync {
    fn get<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<NamespaceMeta, NamespaceError>>;
}

/// A fixed set of namespaces; unknown ones have no annotations.
#[derive(Debug, Default, Clone)]
pub struct StaticNamespaces(pub HashMap<String, NamespaceMeta>);

impl StaticNamespaces {
    pub fn new(namespaces: impl IntoIterator<Item = NamespaceMeta>) -> Self {
        Self(
            namespaces
                .into_iter()
                .map(|n| (n.name.clone(), n))
                .collect(),
        )
    }
}

impl NamespaceSource for StaticNamespaces {
    fn get<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<NamespaceMeta, NamespaceError>> {
        let ns = self.0.get(name).cloned().unwrap_or_else(|| NamespaceMeta {
            name: name.to_string(),
            ..Default::default()
        });
        Box::pin(async move { Ok(ns) })
    }
}

/// Reads namespaces from the Kubernetes API, caching each answer for `ttl`.
pub struct KubeNamespaces {
    api: kube::Api<k8s_openapi::api::core::v1::Namespace>,
    ttl: Duration,
    cache: Mutex<HashMap<String, (Instant, NamespaceMeta)>>,
}

impl std::fmt::Debug for KubeNamespaces {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeNamespaces")
            .field("ttl", &self.ttl)
            .finish()
    }
}

impl KubeNamespaces {
    pub fn new(client: kube::Client, ttl: Duration) -> Self {
        Self {
            api: kube::Api::all(client),
            ttl,
            cache: Mutex::new(HashMap::new()),
        }
    }

    fn cached(&self, name: &str) -> Option<NamespaceMeta> {
        let cache = self.cache.lock().ok()?;
        let (at, ns) = cache.get(name)?;
        (at.elapsed() < self.ttl).then(|| ns.clone())
    }
}

impl NamespaceSource for KubeNamespaces {
    fn get<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<NamespaceMeta, NamespaceError>> {
        Box::pin(async move {
            if let Some(ns) = self.cached(name) {
                return Ok(ns);
            }
            let meta = self
                .api
                .get_metadata_opt(name)
                .await
                .map_err(|e| NamespaceError {
                    name: name.to_string(),
                    reason: e.to_string(),
                })?;
            let ns = match meta {
                Some(m) => NamespaceMeta {
                    name: name.to_string(),
                    annotations: m.metadata.annotations.unwrap_or_default(),
                    labels: m.metadata.labels.unwrap_or_default(),
                },
                None => NamespaceMeta {
                    name: name.to_string(),
                    ..Default::default()
                },
            };
            if let Ok(mut cache) = self.cache.lock() {
                cache.insert(name.to_string(), (Instant::now(), ns.clone()));
            }
            Ok(ns)
        })
    }
}

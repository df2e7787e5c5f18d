//! What feeds the index: the Kubernetes API (production) or a directory of
//! manifests (local mode). Both convert API objects with
//! [`crate::model::convert`] and write [`crate::index::Change`]s; the index
//! is the seam between them and everything that reads cluster state.

pub mod dir;
pub mod kube;

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// `--source`: `kube` or `dir:PATH`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SourceConfig {
    Kube,
    Dir(PathBuf),
}

impl FromStr for SourceConfig {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "kube" => Ok(SourceConfig::Kube),
            _ => match s.strip_prefix("dir:") {
                Some(path) if !path.is_empty() => Ok(SourceConfig::Dir(PathBuf::from(path))),
                _ => Err(format!("{s:?} is not a source; expected kube or dir:PATH")),
            },
        }
    }
}

impl fmt::Display for SourceConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SourceConfig::Kube => f.write_str("kube"),
            SourceConfig::Dir(p) => write!(f, "dir:{}", p.display()),
        }
    }
}

/// A configured source, checked before anything else starts (the directory exists and its
/// files load, or a Kubernetes client was built). The controller and the CNI agent start theirs
/// through it.
pub enum Source {
    /// Boxed: the directory source carries the metrics handles and its files' state.
    Dir(Box<dir::DirSource>),
    Kube(::kube::Client),
}

/// Why a [`Source`] could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error(transparent)]
    Dir(#[from] dir::DirError),
    #[error("cannot build a Kubernetes client (in-cluster config or KUBECONFIG): {0}")]
    Kube(#[from] ::kube::Error),
}

impl Source {
    /// Opens `config`; for `kube`, `client` if given (tests pass one pointed at the fake API
    /// server), else one from KUBECONFIG or the in-cluster configuration.
    pub async fn open(
        config: &SourceConfig,
        metrics: crate::metrics::Metrics,
        client: Option<::kube::Client>,
    ) -> Result<Self, SourceError> {
        Ok(match (config, client) {
            (SourceConfig::Dir(path), _) => {
                Source::Dir(Box::new(dir::DirSource::new(path.clone(), metrics)?))
            }
            (SourceConfig::Kube, Some(c)) => Source::Kube(c),
            (SourceConfig::Kube, None) => Source::Kube(::kube::Client::try_default().await?),
        })
    }

    /// The Kubernetes client of a `kube` source.
    pub fn client(&self) -> Option<&::kube::Client> {
        match self {
            Source::Kube(c) => Some(c),
            Source::Dir(_) => None,
        }
    }

    /// Feeds `index` until the task is aborted: a directory loads every kind it finds; the
    /// Kubernetes source watches `kinds`.
    pub fn spawn(
        self,
        index: crate::index::Index,
        metrics: crate::metrics::Metrics,
        readiness: Readiness,
        kinds: &'static [crate::model::Kind],
    ) -> tokio::task::JoinHandle<()> {
        match self {
            Source::Dir(dir) => tokio::spawn(async move {
                if let Err(e) = dir.run(index, readiness).await {
                    tracing::error!(error = %e, "directory source stopped");
                }
            }),
            Source::Kube(client) => {
                tokio::spawn(kube::run_kinds(client, index, metrics, readiness, kinds))
            }
        }
    }
}

impl fmt::Debug for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Dir(_) => f.write_str("Source::Dir"),
            Source::Kube(_) => f.write_str("Source::Kube"),
        }
    }
}

/// Set once the source has loaded a complete first view of the cluster;
/// `/ready` answers 200 from then on.
#[derive(Clone, Debug, Default)]
pub struct Readiness(Arc<AtomicBool>);

impl Readiness {
    pub fn set_ready(&self) {
        self.0.store(true, Ordering::Release);
    }

    pub fn is_ready(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_sources() {
        assert_eq!("kube".parse(), Ok(SourceConfig::Kube));
        assert_eq!("dir:/tmp/m".parse(), Ok(SourceConfig::Dir("/tmp/m".into())));
        for bad in ["", "dir:", "k8s", "file:/x"] {
            let err = bad.parse::<SourceConfig>().expect_err(bad);
            assert!(err.contains(&format!("{bad:?}")), "{err}");
        }
    }
}

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

//! Weft's traffic redirect into the sidecar proxy: the iptables nat rules, installing them
//! idempotently in a pod's network namespace, and the configuration that says which.
//!
//! One implementation, two installers:
//! - `weft-init` (weft-injector), the init container the injector adds by default;
//! - the `weft-cni` plugin, which installs the same rules during the pod's CNI ADD when the
//!   injector runs in CNI mode (the pod then carries [`config::ANNOTATION`] and needs no
//!   privileged init container: Linkerd's `linkerd-cni` and Istio's CNI mode do the same).
//!
//! Small on purpose: no Kubernetes, async runtime or argument parser (`clap` only behind the
//! feature of that name), because the CNI plugin binary links it.
//!
//! - [`config`]: [`RedirectConfig`], `weft-init`'s flags and the `weft.dev/redirect`
//!   annotation, both produced from one value;
//! - [`rules`]: the chains, the `iptables-restore` script, [`Runner`] (the seam in front of
//!   the iptables programs) with [`SystemRunner`] and [`FakeRunner`], install and verify;
//! - [`ports`]: port and CIDR lists, the one parser of the `config.weft.dev/*` values.

pub mod config;
pub mod ports;
pub mod rules;

pub use config::{AnnotationError, Backend, Family, RedirectConfig, ANNOTATION};
pub use rules::{
    chain_rules, detect_backend, dry_run, families, install, restore_script, verify, FakeRunner,
    RedirectError, Runner, SystemRunner,
};

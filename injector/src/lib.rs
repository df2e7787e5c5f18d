//! Weft's auto-injection: how a pod gets its sidecar.
//!
//! Three deployables share this library:
//! - the `weft-injector` binary, a Kubernetes mutating admission webhook ([`webhook`]) that
//!   answers AdmissionReview v1 requests for Pods with a JSONPatch;
//! - `weft inject` in the `weft` CLI, which runs the same logic offline over manifests
//!   ([`manifest`]);
//! - the `weft-init` binary, the init container that installs the iptables redirect in the
//!   pod's network namespace with the [`redirect`] crate (weft-redirect), which the `weft-cni`
//!   plugin uses too when the injector runs in CNI mode.
//!
//! The decision itself is [`patch::patch_pod`], a pure function from a pod (or pod template),
//! its namespace's metadata and an [`patch::InjectConfig`] to an RFC 6902 patch; the webhook and
//! the CLI are thin I/O around it. Port lists and CIDRs share one parser ([`ports`]) so the
//! webhook only admits what `weft-init` and the CNI can install. Annotation names live in [`annotations`].

pub mod annotations;
pub mod manifest;
pub mod patch;
pub mod telemetry;
pub mod webhook;

pub use weft_redirect as redirect;
/// The port and CIDR lists of the `config.weft.dev/*` annotations (weft-redirect's parser).
pub use weft_redirect::ports;

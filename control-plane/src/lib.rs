//! `weft-controller`: the Weft control plane.
//!
//! Data flows one way through three layers:
//!
//! ```text
//!   source (kube watchers | directory of YAML)      what the cluster says
//!        │  Change::Upsert / Delete, reset on re-list
//!        ▼
//!   index (one in-memory State + per-topic change notification)
//!        │  resolve(target) → endpoints + topics to watch
//!        │  outbound_policy(target, caller ns) → OutboundPolicy + topics
//!        ▼
//!   grpc  (Destination.Resolve streams: full set, then Add/Remove diffs;
//!          Destination.ClientPolicy streams: the whole policy per change)
//! ```
//!
//! - [`model`]: the `weft-model` crate, re-exported: the typed domain
//!   (Service, EndpointSlice, Pod, Namespace, Gateway API
//!   HTTPRoute/GRPCRoute, the BackendPolicy CRD, NetworkPolicy) and the pure
//!   functions every Weft crate reuses: label selectors, named-port
//!   resolution, port lists, target names, Gateway API durations,
//!   NetworkPolicy evaluation.
//! - [`index`]: the single index, the pure resolution of a target against
//!   it ([`index::resolve`]) and the pure compilation of routes and
//!   policies into a proxy's outbound policy ([`index::outbound`]).
//! - [`source`]: what feeds the index — [`source::kube`] (kube-rs watchers, the
//!   production mode) or [`source::dir`] (a directory of manifests, the local
//!   mode). The index's change API is the seam: tests drive the kube source
//!   against a fake API server (`testing` feature) and the dir source
//!   against a temporary directory.
//! - [`grpc`]: the gRPC services on the destination port (8086) and the
//!   identity port (8080): `Destination.Resolve`,
//!   `Destination.ClientPolicy` and `Identity.Certify` are implemented;
//!   `Policy.ServerPolicy` answers `UNIMPLEMENTED` with a message saying
//!   so.
//! - [`identity`]: workload certificates — SPIFFE IDs, CSR checks, token
//!   verification (Kubernetes TokenReview or controller-signed local
//!   tokens), the issuance limits (per pod, plus a controller-wide
//!   ceiling), and the CA behind the
//!   [`identity::ca::CertificateAuthority`] seam (issuer files reloaded on
//!   change, or a development CA).
//! - [`status`]: route and BackendPolicy status (`Accepted`,
//!   `ResolvedRefs`) written through the status subresource in kube mode,
//!   logged with the file in directory mode.
//! - [`admin`]: `/metrics`, `/ready`, `/live` on port 9990.
//! - [`runtime`]: wires a source, the index and the servers together; the
//!   binary is a thin clap wrapper around it.

pub mod admin;
pub mod grpc;
pub mod identity;
pub mod index;
pub mod lease;
pub mod metrics;
/// The shared model lives in its own crate (`weft-model`); this path keeps
/// `crate::model::...` and `weft_controller::model::...` working.
pub use weft_model as model;
pub mod runtime;
pub mod source;
pub mod status;
#[cfg(feature = "testing")]
pub mod testing;

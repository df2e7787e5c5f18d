//! The mutating admission webhook: AdmissionReview v1 for Pods in, a JSONPatch out.
//!
//! - [`review`]: one review, from request bytes to the response body (no sockets); every
//!   malformed input gets an answer, never a panic.
//! - [`namespaces`]: where the pod's namespace metadata comes from (the API server, or a fixed
//!   map in tests and local runs).
//! - [`tls`]: the serving certificate, read from files and reloaded when they change.
//! - [`server`]: HTTPS on `0.0.0.0:8443`: `POST /mutate`, `GET /ready`, `/live`, `/metrics`.

pub mod namespaces;
pub mod review;
pub mod server;
pub mod tls;

//! The gRPC services proxies talk to. `Destination.Resolve` and
//! `Destination.ClientPolicy` read the index ([`destination`]);
//! `Policy.ServerPolicy` streams a port's inbound policy ([`policy`]);
//! `Identity.Certify` signs workload certificates ([`identity`]). The
//! policy streams share their shape ([`stream`]). [`tls`] puts TLS on both ports
//! and hands the verified client identity to the handlers.

pub mod destination;
pub mod identity;
pub mod policy;
pub mod stream;
pub mod tls;

pub use destination::DestinationService;
pub use identity::IdentityService;
pub use policy::PolicyService;

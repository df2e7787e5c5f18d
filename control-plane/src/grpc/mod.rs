//! The gRPC services proxies talk to. `Destination.Resolve` and
//! `Destination.ClientPolicy` read the index ([`destination`]);
//! `Identity.Certify` signs workload certificates ([`identity`]);
//! `Policy.ServerPolicy` is defined in weft-proto and answers
//! `UNIMPLEMENTED` here until the issue that implements it lands.

pub mod destination;
pub mod identity;
pub mod unimplemented;

pub use destination::DestinationService;
pub use identity::IdentityService;

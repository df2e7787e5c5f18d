//! The gRPC services proxies talk to. `Destination.Resolve` reads the
//! index; `Identity.Certify` signs workload certificates ([`identity`]);
//! the rest of the API (`Destination.ClientPolicy`, `Policy.ServerPolicy`)
//! is defined in weft-proto and answers `UNIMPLEMENTED` here until the
//! issues that implement it land.

pub mod destination;
pub mod identity;
pub mod unimplemented;

pub use destination::DestinationService;
pub use identity::IdentityService;

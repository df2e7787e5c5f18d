//! The gRPC services proxies talk to. `Destination.Resolve` reads the
//! index; the rest of the API (`Destination.ClientPolicy`,
//! `Policy.ServerPolicy`, `Identity.Certify`) is defined in weft-proto and
//! answers `UNIMPLEMENTED` here until the issues that implement it land.

pub mod destination;
pub mod unimplemented;

pub use destination::DestinationService;

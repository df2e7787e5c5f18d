//! `weft-proto`: the gRPC API between the Weft proxy and the controller.
//!
//! The `.proto` files in `proto/weft/` are the one source of truth. `build.rs`
//! compiles them with protox (pure Rust, no `protoc`) and generates prost
//! messages and tonic clients and servers into `OUT_DIR`, so there is no
//! committed generated code that could drift.
//!
//! | proto package | Rust module | services |
//! |---|---|---|
//! | `weft.net` | [`net`] | (addresses) |
//! | `weft.destination` | [`destination`] | `Destination.Resolve`, `Destination.ClientPolicy` |
//! | `weft.policy` | [`policy`] | `Policy.ServerPolicy` |
//! | `weft.identity` | [`identity`] | `Identity.Certify` |
//!
//! The client a proxy uses for discovery is
//! [`destination::destination_client::DestinationClient`]; the controller
//! implements [`destination::destination_server::Destination`].
//!
//! Addresses convert to and from [`std::net::SocketAddr`] / [`std::net::IpAddr`]
//! with `From` / `TryFrom` (see [`net`]).

#![allow(clippy::doc_lazy_continuation, clippy::large_enum_variant)]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// The well-known types used in messages (`Duration`, `Timestamp`).
pub use prost_types;

pub mod exposition;
pub mod loopback;
pub mod report;

/// `weft.net`: addresses shared by every API.
pub mod net {
    include!(concat!(env!("OUT_DIR"), "/weft.net.rs"));
}

/// `weft.destination`: `Resolve` (endpoints) and `ClientPolicy` (routes).
pub mod destination {
    include!(concat!(env!("OUT_DIR"), "/weft.destination.rs"));
}

/// `weft.policy`: `ServerPolicy` (inbound authorization).
pub mod policy {
    include!(concat!(env!("OUT_DIR"), "/weft.policy.rs"));
}

/// `weft.identity`: `Certify` (workload certificates).
pub mod identity {
    include!(concat!(env!("OUT_DIR"), "/weft.identity.rs"));
}

/// A wire address that does not make a valid socket address.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AddressError {
    #[error("ip field has {0} bytes; expected 4 (IPv4) or 16 (IPv6)")]
    IpLength(usize),
    #[error("port field is {0}; expected 0..=65535")]
    Port(u32),
    #[error("address field is missing")]
    Missing,
}

/// Wire bytes of an IP: 4 bytes for IPv4, 16 for IPv6.
pub fn ip_to_bytes(ip: IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => v6.octets().to_vec(),
    }
}

/// Parses the wire bytes of an IP.
pub fn ip_from_bytes(bytes: &[u8]) -> Result<IpAddr, AddressError> {
    if let Ok(b) = <[u8; 4]>::try_from(bytes) {
        Ok(IpAddr::V4(Ipv4Addr::from(b)))
    } else if let Ok(b) = <[u8; 16]>::try_from(bytes) {
        Ok(IpAddr::V6(Ipv6Addr::from(b)))
    } else {
        Err(AddressError::IpLength(bytes.len()))
    }
}

impl From<SocketAddr> for net::TcpAddress {
    fn from(addr: SocketAddr) -> Self {
        net::TcpAddress {
            ip: ip_to_bytes(addr.ip()),
            port: u32::from(addr.port()),
        }
    }
}

impl TryFrom<&net::TcpAddress> for SocketAddr {
    type Error = AddressError;
    fn try_from(addr: &net::TcpAddress) -> Result<Self, AddressError> {
        let ip = ip_from_bytes(&addr.ip)?;
        let port = u16::try_from(addr.port).map_err(|_| AddressError::Port(addr.port))?;
        Ok(SocketAddr::new(ip, port))
    }
}

impl TryFrom<net::TcpAddress> for SocketAddr {
    type Error = AddressError;
    fn try_from(addr: net::TcpAddress) -> Result<Self, AddressError> {
        SocketAddr::try_from(&addr)
    }
}

impl net::TcpAddress {
    /// The socket address, or why the wire value is invalid.
    pub fn to_socket_addr(&self) -> Result<SocketAddr, AddressError> {
        SocketAddr::try_from(self)
    }
}

impl destination::Endpoint {
    /// The endpoint's socket address (`addr` is required on the wire).
    pub fn socket_addr(&self) -> Result<SocketAddr, AddressError> {
        self.addr
            .as_ref()
            .ok_or(AddressError::Missing)?
            .to_socket_addr()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn rejects_bad_lengths_and_ports() {
        let bad_ip = net::TcpAddress {
            ip: vec![1, 2, 3],
            port: 80,
        };
        assert_eq!(bad_ip.to_socket_addr(), Err(AddressError::IpLength(3)));
        let bad_port = net::TcpAddress {
            ip: vec![10, 0, 0, 1],
            port: 70_000,
        };
        assert_eq!(bad_port.to_socket_addr(), Err(AddressError::Port(70_000)));
        assert_eq!(
            destination::Endpoint::default().socket_addr(),
            Err(AddressError::Missing)
        );
    }

    proptest! {
        #[test]
        fn socket_addr_round_trips(v4 in any::<[u8; 4]>(), v6 in any::<[u8; 16]>(), port in any::<u16>()) {
            for ip in [IpAddr::from(v4), IpAddr::from(v6)] {
                let addr = SocketAddr::new(ip, port);
                let wire = net::TcpAddress::from(addr);
                prop_assert_eq!(wire.to_socket_addr(), Ok(addr));
            }
        }
    }
}

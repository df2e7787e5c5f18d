//! What a connection passes through before it is HTTP or TCP: the listener, the original
//! destination lookup, protocol detection by buffered peeking, the TLS ClientHello reader, and
//! the mutual-TLS configs between proxies, and TLS to the controller ([`control`]).

pub mod coalesce;
pub mod control;
pub mod counting;
pub mod detect;
pub mod mesh;
pub mod orig_dst;
pub mod prefixed;
pub mod tls;
pub mod tls_hello;

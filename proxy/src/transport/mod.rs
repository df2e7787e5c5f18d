//! What a connection passes through before it is HTTP or TCP: the listener, the original
//! destination lookup, protocol detection by buffered peeking, and the TLS ClientHello reader.

pub mod counting;
pub mod detect;
pub mod orig_dst;
pub mod prefixed;
pub mod tls_hello;

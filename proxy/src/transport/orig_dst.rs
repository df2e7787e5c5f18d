//! Recovering where a redirected connection was going.
//!
//! iptables' REDIRECT rewrites the destination to the proxy's listener; the kernel keeps the
//! original in conntrack, readable with `SO_ORIGINAL_DST` (IPv4) or `IP6T_SO_ORIGINAL_DST` (IPv6).
//! [`OrigDst`] is the seam: [`SoOriginalDst`] in production, [`FixedTarget`] for local mode and
//! loopback tests where no redirect exists.

use std::io;
use std::net::SocketAddr;

use socket2::SockRef;
use tokio::net::TcpStream;

/// Looks up the destination a client originally dialled.
pub trait OrigDst: Send + Sync + 'static {
    fn orig_dst(&self, stream: &TcpStream) -> io::Result<SocketAddr>;
}

/// Reads the conntrack original destination from the kernel.
#[derive(Clone, Copy, Debug, Default)]
pub struct SoOriginalDst;

impl OrigDst for SoOriginalDst {
    fn orig_dst(&self, stream: &TcpStream) -> io::Result<SocketAddr> {
        let local = stream.local_addr()?;
        let sock = SockRef::from(stream);
        // A dual-stack listener (`[::]:port`) accepts IPv4 clients as v4-mapped IPv6 sockets.
        // Their conntrack entry is an IPv4 one, so it must be read with the IPv4 option (which
        // Linux serves on such sockets too); the IPv6 lookup would fail with ENOENT.
        let addr = if canonical(local).is_ipv4() {
            sock.original_dst_v4()?
        } else {
            sock.original_dst_v6()?
        };
        addr.as_socket().map(canonical).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                "SO_ORIGINAL_DST returned a non-IP address",
            )
        })
    }
}

/// `[::ffff:a.b.c.d]:p` → `a.b.c.d:p`; every other address unchanged. Used for addresses
/// that reach logs, metrics labels and `Host`-less authorities, so one peer has one spelling.
pub fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

/// Sends every connection to one address.
#[derive(Clone, Copy, Debug)]
pub struct FixedTarget(pub SocketAddr);

impl OrigDst for FixedTarget {
    fn orig_dst(&self, _: &TcpStream) -> io::Result<SocketAddr> {
        Ok(self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_unmaps_v4_mapped_addresses_only() {
        let mapped: SocketAddr = "[::ffff:10.1.2.3]:80".parse().unwrap();
        assert_eq!(
            canonical(mapped),
            "10.1.2.3:80".parse::<SocketAddr>().unwrap()
        );
        let v6: SocketAddr = "[fd00::1]:80".parse().unwrap();
        assert_eq!(canonical(v6), v6);
    }

    #[tokio::test]
    async fn without_redirect_the_kernel_has_no_original_destination_or_returns_the_local_one() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let _c = TcpStream::connect(addr).await.unwrap();
        let (s, _) = l.accept().await.unwrap();
        // Without conntrack NAT the lookup either fails (no conntrack entry) or reports the
        // listener itself; the proxy treats the latter as a loop.
        match SoOriginalDst.orig_dst(&s) {
            Ok(a) => assert_eq!(a, addr),
            Err(e) => assert!(e.raw_os_error().is_some(), "{e}"),
        }
    }
}

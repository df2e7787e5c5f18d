//! Loopback ports for a process that binds them later (the demo, the benches and the
//! end-to-end tests start the controller and proxies on ports chosen beforehand).
//!
//! Binding `127.0.0.1:0` and releasing the port is racy: the kernel hands ports of its
//! ephemeral range (`net.ipv4.ip_local_port_range`) to every outgoing connection too, so
//! a proxy dialling the controller can take the port between "chosen" and "bound", and
//! the process then fails with `Address already in use`. Ports chosen here come from
//! *below* that range, which the kernel never assigns on its own; a per-process cursor
//! that starts at a random offset keeps two choices in one process distinct, and each
//! port is test-bound while the set is chosen, so ports already in use are skipped.
//! No crate does this, hence the few lines here.

use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicU32, Ordering};

/// Lowest port handed out: above the well-known and common service ports.
const FLOOR: u16 = 10_000;

/// The kernel's ephemeral range as `(low, high)`, or the Linux default when unreadable.
fn ephemeral_range() -> (u16, u16) {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| parse_range(&s))
        .unwrap_or((32_768, 60_999))
}

fn parse_range(s: &str) -> Option<(u16, u16)> {
    let mut it = s.split_whitespace().map(str::parse::<u16>);
    match (it.next(), it.next()) {
        (Some(Ok(lo)), Some(Ok(hi))) if lo <= hi => Some((lo, hi)),
        _ => None,
    }
}

/// The ports to choose from: `[FLOOR, low)` when the ephemeral range leaves room below
/// it, else the ports above it, else `None` (then the kernel picks, as before).
fn candidates((lo, hi): (u16, u16)) -> Option<(u16, u16)> {
    if lo > FLOOR + 1_000 {
        Some((FLOOR, lo - 1))
    } else if hi < u16::MAX - 1_000 {
        Some((hi + 1, u16::MAX))
    } else {
        None
    }
}

fn cursor_start() -> u32 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    std::process::id().wrapping_mul(2_654_435_761) ^ nanos
}

static CURSOR: AtomicU32 = AtomicU32::new(0);
static SEEDED: std::sync::Once = std::sync::Once::new();

/// `n` distinct loopback addresses (127.0.0.1) whose ports were free a moment ago and that
/// no outgoing connection will take in the meantime.
pub fn free_addrs(n: usize) -> std::io::Result<Vec<SocketAddr>> {
    let Some((lo, hi)) = candidates(ephemeral_range()) else {
        return kernel_chosen(n);
    };
    SEEDED.call_once(|| CURSOR.store(cursor_start(), Ordering::Relaxed));
    let span = u32::from(hi - lo) + 1;
    let mut held = Vec::with_capacity(n);
    let mut tries = 0u32;
    while held.len() < n {
        if tries >= span {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AddrInUse,
                format!("no free loopback port in {lo}..={hi}"),
            ));
        }
        tries += 1;
        let port = lo + (CURSOR.fetch_add(1, Ordering::Relaxed) % span) as u16;
        if let Ok(l) = TcpListener::bind(("127.0.0.1", port)) {
            held.push(l);
        }
    }
    held.iter().map(TcpListener::local_addr).collect()
}

/// One address; see [`free_addrs`].
pub fn free_addr() -> std::io::Result<SocketAddr> {
    free_addrs(1).map(|mut v| v.remove(0))
}

fn kernel_chosen(n: usize) -> std::io::Result<Vec<SocketAddr>> {
    let held = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0"))
        .collect::<std::io::Result<Vec<_>>>()?;
    held.iter().map(TcpListener::local_addr).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_distinct_and_outside_the_ephemeral_range() {
        let (lo, hi) = ephemeral_range();
        let addrs = free_addrs(50).expect("ports");
        let mut ports: Vec<u16> = addrs.iter().map(SocketAddr::port).collect();
        assert!(addrs.iter().all(|a| a.ip().is_loopback()));
        if candidates((lo, hi)).is_some() {
            assert!(ports.iter().all(|p| *p < lo || *p > hi), "{ports:?}");
        }
        ports.sort_unstable();
        ports.dedup();
        assert_eq!(ports.len(), 50);
    }

    #[test]
    fn the_range_file_is_parsed_or_rejected() {
        assert_eq!(parse_range("32768\t60999\n"), Some((32768, 60999)));
        assert_eq!(parse_range("1024 65535"), Some((1024, 65535)));
        assert_eq!(parse_range("60999 32768"), None);
        assert_eq!(parse_range("garbage"), None);
        assert_eq!(candidates((32768, 60999)), Some((FLOOR, 32767)));
        assert_eq!(candidates((1024, 40000)), Some((40001, u16::MAX)));
        assert_eq!(candidates((1024, 65535)), None);
    }
}

//! Source address validation with real sockets: a pod that puts another pod's address on its
//! own interface and sends UDP from it reaches its peer until the datapath knows the pod's
//! addresses, and never afterwards, while its genuine packets keep arriving. Needs root
//! (skips otherwise, fails when CI=true).

mod support;

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::time::Instant;

use anyhow::{ensure, Context, Result};
use support::{in_ns, ip, Node, Pod, ALLOW_DEADLINE, PROBE_TIMEOUT};
use weft_datapath::{Datapath, EndpointFlags, PolicyMaps};

/// Sends `payload` from `src` (bound explicitly) in `pod`'s namespace to `dst`.
fn send_from(pod: &Pod, src: IpAddr, dst: SocketAddr, payload: &[u8]) -> Result<()> {
    in_ns(&pod.ns, || -> Result<()> {
        let sock = UdpSocket::bind(SocketAddr::new(src, 0)).context("binding the source")?;
        sock.send_to(payload, dst).context("sending")?;
        Ok(())
    })?
}

/// Whether `payload` arrives at `rx` within one probe timeout (other datagrams are skipped).
fn arrives(rx: &UdpSocket, payload: &[u8]) -> Result<bool> {
    let deadline = Instant::now() + PROBE_TIMEOUT;
    let mut buf = [0u8; 64];
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        rx.set_read_timeout(Some(left.max(std::time::Duration::from_millis(1))))?;
        match rx.recv_from(&mut buf) {
            Ok((n, _)) if &buf[..n] == payload => return Ok(true),
            Ok(_) => {}
            Err(_) => return Ok(false),
        }
    }
    Ok(false)
}

/// Sends until `payload` arrives (first packets wait for ARP/ND), or the deadline passes.
fn delivered(
    a: &Pod,
    src: IpAddr,
    rx: &UdpSocket,
    dst: SocketAddr,
    payload: &[u8],
) -> Result<bool> {
    let deadline = Instant::now() + ALLOW_DEADLINE;
    while Instant::now() < deadline {
        send_from(a, src, dst, payload)?;
        if arrives(rx, payload)? {
            return Ok(true);
        }
    }
    Ok(false)
}

#[test]
fn a_pod_cannot_send_from_another_pods_address() -> Result<()> {
    if !support::require_root("a_pod_cannot_send_from_another_pods_address")? {
        return Ok(());
    }
    let node = Node::new("spoof", 3)?;
    let (a, b, c) = (
        node.pod(0).clone(),
        node.pod(1).clone(),
        node.pod(2).clone(),
    );
    let mut dp = Datapath::open(&node.pin_dir)?;
    for (pod, id) in [(&a, 1), (&b, 2), (&c, 3)] {
        node.run(|| dp.attach(pod.ifindex))??;
        dp.set_endpoint(pod.ifindex, id, EndpointFlags::NONE)?;
    }
    // a takes c's addresses as its own: the kernel then sends from them on request.
    ip(&[
        "-n",
        &a.ns,
        "addr",
        "add",
        &format!("{}/32", c.v4),
        "dev",
        "eth0",
    ])?;
    let c6 = format!("{}/128", c.v6);
    ip(&[
        "-n", &a.ns, "-6", "addr", "add", &c6, "dev", "eth0", "nodad",
    ])?;

    for v6 in [false, true] {
        let family = if v6 { "IPv6" } else { "IPv4" };
        let dst = b.addr(v6, 7000);
        let rx = in_ns(&b.ns, || UdpSocket::bind(dst))??;
        let (own, forged) = (a.addr(v6, 0).ip(), c.addr(v6, 0).ip());
        let tag = |what: &str| format!("{family} {what}").into_bytes();

        // Before a's addresses are recorded its sources are not checked: the forgery works
        // (so what follows is the check's doing, not routing or rp_filter).
        dp.set_endpoint_addrs(a.ifindex, &[])?;
        ensure!(
            delivered(&a, forged, &rx, dst, &tag("forged, unchecked"))?,
            "{family}: the forged datagram did not arrive even without the check"
        );

        dp.set_endpoint_addrs(a.ifindex, &[a.v4.into(), a.v6.into()])?;
        let before = dp.source_drops()?.get(&1).copied().unwrap_or(0);
        ensure!(
            delivered(&a, own, &rx, dst, &tag("genuine"))?,
            "{family}: a's genuine datagram did not arrive"
        );
        for i in 0..3 {
            let payload = tag(&format!("forged {i}"));
            send_from(&a, forged, dst, &payload)?;
            ensure!(
                !arrives(&rx, &payload)?,
                "{family}: a datagram from c's address sent by a arrived at b"
            );
        }
        let after = dp.source_drops()?.get(&1).copied().unwrap_or(0);
        ensure!(
            after >= before + 3,
            "{family}: source drops of a went {before} -> {after}"
        );
        // a's genuine datagrams still arrive after the drops (nothing else broke).
        ensure!(
            delivered(&a, own, &rx, dst, &tag("genuine again"))?,
            "{family}: a's genuine datagram did not arrive after the forgeries"
        );
    }
    Ok(())
}

//! Services in the programs, on crafted packets (BPF_PROG_TEST_RUN): a connection to a
//! frontend is translated to a backend (destination and checksums rewritten), its later
//! packets keep that backend, the backend's replies get the frontend back as their source,
//! sessionAffinity ClientIP sticks, egress policy judges the backend, and a frontend without
//! backends answers with an ICMP / ICMPv6 port unreachable sent back into the pod. Needs root
//! (skips otherwise, fails when CI=true).

mod support;

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use anyhow::{ensure, Context, Result};
use aya::programs::{SchedClassifier, TestRun, TestRunOptions};
use support::Node;
use weft_datapath::{
    Datapath, Direction, EndpointFlags, Entry, Frontend, PolicyMaps, PortRange, Protocol, Service,
    ServiceMaps, L4, OBJECT_HASH,
};

/// TC_ACT_UNSPEC (-1): the packet goes on.
const PASS: u32 = u32::MAX;
/// TC_ACT_SHOT.
const DROP: u32 = 2;
/// TC_ACT_REDIRECT: the refusal goes back into the pod.
const REDIRECT: u32 = 7;

const EP: u32 = 21;
const POD4: [u8; 4] = [10, 0, 0, 2];
const VIP4: [u8; 4] = [10, 96, 0, 10];
const BACKENDS4: [[u8; 4]; 2] = [[10, 0, 1, 5], [10, 0, 2, 6]];
const EMPTY_VIP4: [u8; 4] = [10, 96, 0, 11];
const AFFINITY_VIP4: [u8; 4] = [10, 96, 0, 12];
const SYN: u8 = 0x02;
const SYN_ACK: u8 = 0x12;
const ACK: u8 = 0x10;

/// The Internet checksum of `data` (ones' complement of the ones' complement sum).
fn csum(chunks: &[&[u8]]) -> u16 {
    let mut sum: u32 = 0;
    for data in chunks {
        for pair in data.chunks(2) {
            let word = u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]);
            sum += u32::from(word);
        }
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn eth(ethertype: u16) -> Vec<u8> {
    let mut p = vec![0x02, 0, 0, 0, 0, 1, 0x02, 0, 0, 0, 0, 2];
    p.extend_from_slice(&ethertype.to_be_bytes());
    p
}

fn tcp(sport: u16, dport: u16, flags: u8) -> Vec<u8> {
    let mut h = Vec::new();
    h.extend_from_slice(&sport.to_be_bytes());
    h.extend_from_slice(&dport.to_be_bytes());
    h.extend_from_slice(&[
        0, 0, 0x30, 0x39, 0, 0, 0, 0, 0x50, flags, 0xff, 0xff, 0, 0, 0, 0,
    ]);
    h
}

fn udp(sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let mut h = Vec::new();
    h.extend_from_slice(&sport.to_be_bytes());
    h.extend_from_slice(&dport.to_be_bytes());
    h.extend_from_slice(&(8 + payload.len() as u16).to_be_bytes());
    h.extend_from_slice(&[0, 0]);
    h.extend_from_slice(payload);
    h
}

fn l4_csum_off(proto: u8) -> usize {
    if proto == 6 {
        16
    } else {
        6
    }
}

/// An IPv4 packet with valid IP and L4 checksums (`udp_csum: false` leaves UDP's at 0).
fn ipv4(proto: u8, src: [u8; 4], dst: [u8; 4], mut l4: Vec<u8>, udp_csum: bool) -> Vec<u8> {
    if proto == 6 || udp_csum {
        let len = (l4.len() as u16).to_be_bytes();
        let c = csum(&[&src, &dst, &[0, proto], &len, &l4]);
        let off = l4_csum_off(proto);
        l4[off..off + 2].copy_from_slice(&c.to_be_bytes());
    }
    let mut ip = vec![0x45, 0];
    ip.extend_from_slice(&(20 + l4.len() as u16).to_be_bytes());
    ip.extend_from_slice(&[0, 1, 0x40, 0, 64, proto, 0, 0]);
    ip.extend_from_slice(&src);
    ip.extend_from_slice(&dst);
    let c = csum(&[&ip]);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    let mut p = eth(0x0800);
    p.extend_from_slice(&ip);
    p.extend_from_slice(&l4);
    p
}

fn ipv6(proto: u8, src: [u8; 16], dst: [u8; 16], mut l4: Vec<u8>) -> Vec<u8> {
    let len = (l4.len() as u32).to_be_bytes();
    let c = csum(&[&src, &dst, &len, &[0, 0, 0, proto], &l4]);
    let off = l4_csum_off(proto);
    l4[off..off + 2].copy_from_slice(&c.to_be_bytes());
    let mut p = eth(0x86dd);
    p.extend_from_slice(&[0x60, 0, 0, 0]);
    p.extend_from_slice(&(l4.len() as u16).to_be_bytes());
    p.extend_from_slice(&[proto, 64]);
    p.extend_from_slice(&src);
    p.extend_from_slice(&dst);
    p.extend_from_slice(&l4);
    p
}

/// What a test reads back from an IPv4 packet: addresses, ports, checksums valid.
#[derive(Debug, PartialEq, Eq)]
struct Seen4 {
    src: SocketAddr,
    dst: SocketAddr,
}

fn read4(p: &[u8]) -> Result<Seen4> {
    let ip = &p[14..34];
    ensure!(csum(&[ip]) == 0, "IPv4 header checksum invalid: {ip:02x?}");
    let proto = ip[9];
    let l4 = &p[34..];
    let src = [ip[12], ip[13], ip[14], ip[15]];
    let dst = [ip[16], ip[17], ip[18], ip[19]];
    let off = l4_csum_off(proto);
    let stored = u16::from_be_bytes([l4[off], l4[off + 1]]);
    if !(proto == 17 && stored == 0) {
        let len = (l4.len() as u16).to_be_bytes();
        ensure!(
            csum(&[&src, &dst, &[0, proto], &len, l4]) == 0,
            "L4 checksum invalid in {p:02x?}"
        );
    }
    let port = |o: usize| u16::from_be_bytes([l4[o], l4[o + 1]]);
    Ok(Seen4 {
        src: SocketAddr::new(IpAddr::from(src), port(0)),
        dst: SocketAddr::new(IpAddr::from(dst), port(2)),
    })
}

fn read6(p: &[u8]) -> Result<(SocketAddr, SocketAddr)> {
    let proto = p[20];
    let src: [u8; 16] = p[22..38].try_into()?;
    let dst: [u8; 16] = p[38..54].try_into()?;
    let l4 = &p[54..];
    let len = (l4.len() as u32).to_be_bytes();
    ensure!(
        csum(&[&src, &dst, &len, &[0, 0, 0, proto], l4]) == 0,
        "L4 checksum invalid in {p:02x?}"
    );
    let port = |o: usize| u16::from_be_bytes([l4[o], l4[o + 1]]);
    Ok((
        SocketAddr::new(IpAddr::from(src), port(0)),
        SocketAddr::new(IpAddr::from(dst), port(2)),
    ))
}

struct Progs {
    from_pod: SchedClassifier,
    to_pod: SchedClassifier,
    ifindex: u32,
}

impl Progs {
    /// Runs a program on a packet; the verdict and the packet as it leaves.
    fn run(&self, direction: Direction, packet: &[u8]) -> Result<(u32, Vec<u8>)> {
        let prog = match direction {
            Direction::Egress => &self.from_pod,
            Direction::Ingress => &self.to_pod,
        };
        test_run(prog, self.ifindex, packet)
    }
}

/// `BPF_PROG_TEST_RUN` of `prog` on `packet` as if it arrived on interface `ifindex`: the
/// verdict and the packet as it leaves.
fn test_run(prog: &SchedClassifier, ifindex: u32, packet: &[u8]) -> Result<(u32, Vec<u8>)> {
    let mut ctx = [0u8; 192];
    ctx[40..44].copy_from_slice(&ifindex.to_ne_bytes());
    let mut out = vec![0u8; 2048];
    let result = prog
        .test_run(TestRunOptions {
            data_in: Some(packet),
            data_out: Some(&mut out),
            ctx_in: Some(&ctx),
            ..Default::default()
        })
        .context("BPF_PROG_TEST_RUN")?;
    out.truncate(result.data_size_out as usize);
    Ok((result.return_value, out))
}

fn sa(ip: [u8; 4], port: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::from(ip), port)
}

fn service(id: u32, vip: IpAddr, port: u16, proto: L4, backends: Vec<SocketAddr>) -> Service {
    Service {
        id,
        frontend: Frontend {
            addr: vip,
            port,
            proto,
        },
        backends,
        affinity_timeout_s: None,
        node_port: false,
        remote: Vec::new(),
    }
}

fn open(node: &Node) -> Result<(Datapath, Progs)> {
    let pod = node.pod(0).clone();
    let mut dp = Datapath::open(&node.pin_dir)?;
    dp.set_endpoint(pod.ifindex, EP, EndpointFlags::NONE)?;
    let progs_dir = node.pin_dir.join("progs").join(OBJECT_HASH);
    let progs = Progs {
        from_pod: SchedClassifier::from_pin(progs_dir.join("from_pod"))?,
        to_pod: SchedClassifier::from_pin(progs_dir.join("to_pod"))?,
        ifindex: pod.ifindex,
    };
    Ok((dp, progs))
}

#[test]
fn connections_to_a_frontend_are_translated_and_replies_reverse_translated() -> Result<()> {
    if !support::require_root("connections_to_a_frontend_are_translated")? {
        return Ok(());
    }
    let node = Node::new("lbxlate", 1)?;
    let (mut dp, progs) = open(&node)?;
    let backends: Vec<SocketAddr> = BACKENDS4.iter().map(|b| sa(*b, 8080)).collect();
    let v6_vip: Ipv6Addr = "fd00:96::10".parse()?;
    let v6_backend: SocketAddr = "[fd00:1::5]:8080".parse()?;
    let pod6: Ipv6Addr = "fd00::2".parse()?;
    dp.replace_services(&[
        service(1, IpAddr::from(VIP4), 80, L4::Tcp, backends.clone()),
        service(2, IpAddr::from(VIP4), 53, L4::Udp, backends.clone()),
        service(3, v6_vip.into(), 80, L4::Tcp, vec![v6_backend]),
    ])?;

    // TCP: the SYN goes to a backend, port and checksums rewritten.
    let (v, out) = progs.run(
        Direction::Egress,
        &ipv4(6, POD4, VIP4, tcp(40000, 80, SYN), true),
    )?;
    ensure!(v == PASS, "SYN to the frontend: {v}");
    let seen = read4(&out)?;
    ensure!(seen.src == sa(POD4, 40000), "{seen:?}");
    ensure!(backends.contains(&seen.dst), "translated to {}", seen.dst);
    let chosen = seen.dst;
    // Later packets of the connection keep the backend.
    for _ in 0..8 {
        let (v, out) = progs.run(
            Direction::Egress,
            &ipv4(6, POD4, VIP4, tcp(40000, 80, ACK), true),
        )?;
        ensure!(v == PASS && read4(&out)?.dst == chosen, "same backend");
    }
    // The backend's reply comes back from the frontend.
    let reply = ipv4(
        6,
        chosen.ip().to_string().parse::<Ipv4Addr>()?.octets(),
        POD4,
        tcp(8080, 40000, SYN_ACK),
        true,
    );
    let (v, out) = progs.run(Direction::Ingress, &reply)?;
    ensure!(v == PASS, "reply: {v}");
    let seen = read4(&out)?;
    ensure!(
        seen.src == sa(VIP4, 80) && seen.dst == sa(POD4, 40000),
        "reverse translated: {seen:?}"
    );
    let xl = dp.translations()?;
    ensure!(
        xl.iter()
            .any(|t| t.client == sa(POD4, 40000) && t.backend == chosen && t.svc_id == 1),
        "{xl:?}"
    );

    // New connections spread over both backends.
    let mut used = BTreeSet::new();
    for sport in 41000..41064 {
        let (v, out) = progs.run(
            Direction::Egress,
            &ipv4(6, POD4, VIP4, tcp(sport, 80, SYN), true),
        )?;
        ensure!(v == PASS, "SYN {sport}");
        used.insert(read4(&out)?.dst);
    }
    ensure!(used.len() == 2, "both backends used: {used:?}");

    // UDP, with and without a checksum (0 stays 0: "no checksum").
    for with_csum in [true, false] {
        let p = ipv4(
            17,
            POD4,
            VIP4,
            udp(5000 + u16::from(with_csum), 53, b"query!"),
            with_csum,
        );
        let (v, out) = progs.run(Direction::Egress, &p)?;
        ensure!(v == PASS, "UDP: {v}");
        let seen = read4(&out)?;
        ensure!(backends.contains(&seen.dst), "UDP translated: {seen:?}");
        let stored = u16::from_be_bytes([out[40], out[41]]);
        ensure!(
            (stored == 0) != with_csum,
            "UDP checksum {stored:#x}, with: {with_csum}"
        );
    }

    // IPv6.
    let p = ipv6(6, pod6.octets(), v6_vip.octets(), tcp(42000, 80, SYN));
    let (v, out) = progs.run(Direction::Egress, &p)?;
    ensure!(v == PASS, "v6 SYN: {v}");
    let (src, dst) = read6(&out)?;
    ensure!(
        dst == v6_backend && src.port() == 42000,
        "v6 translated: {dst}"
    );
    let reply = ipv6(
        6,
        [0xfd, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 5],
        pod6.octets(),
        tcp(8080, 42000, SYN_ACK),
    );
    let (v, out) = progs.run(Direction::Ingress, &reply)?;
    ensure!(v == PASS, "v6 reply: {v}");
    let (src, _) = read6(&out)?;
    ensure!(
        src == SocketAddr::new(v6_vip.into(), 80),
        "v6 reverse: {src}"
    );

    // Traffic to other addresses and ports is left alone.
    let p = ipv4(6, POD4, VIP4, tcp(43000, 81, SYN), true);
    let (v, out) = progs.run(Direction::Egress, &p)?;
    ensure!(v == PASS && out == p, "not a frontend: untouched");

    let stats = dp.service_stats()?;
    ensure!(stats.get(&1).map(|s| s.conns) == Some(65), "{stats:?}");
    Ok(())
}

#[test]
fn affinity_sticks_and_egress_policy_judges_the_backend() -> Result<()> {
    if !support::require_root("affinity_sticks_and_egress_policy_judges_the_backend")? {
        return Ok(());
    }
    let node = Node::new("lbaff", 1)?;
    let (mut dp, progs) = open(&node)?;
    let backends: Vec<SocketAddr> = BACKENDS4.iter().map(|b| sa(*b, 8080)).collect();
    let mut sticky = service(
        5,
        IpAddr::from(AFFINITY_VIP4),
        80,
        L4::Tcp,
        backends.clone(),
    );
    sticky.affinity_timeout_s = Some(60);
    dp.replace_services(&[
        sticky.clone(),
        service(6, IpAddr::from(VIP4), 80, L4::Tcp, backends.clone()),
    ])?;
    let mut used = BTreeSet::new();
    for sport in 30000..30032 {
        let p = ipv4(6, POD4, AFFINITY_VIP4, tcp(sport, 80, SYN), true);
        let (v, out) = progs.run(Direction::Egress, &p)?;
        ensure!(v == PASS, "SYN {sport}: {v}");
        used.insert(read4(&out)?.dst);
    }
    ensure!(used.len() == 1, "one backend for the client: {used:?}");
    // The backend goes: the affinity does not outlive it.
    let kept = *used.iter().next().context("one")?;
    sticky.backends.retain(|b| *b != kept);
    dp.replace_services(&[sticky])?;
    let p = ipv4(6, POD4, AFFINITY_VIP4, tcp(30100, 80, SYN), true);
    let (_, out) = progs.run(Direction::Egress, &p)?;
    ensure!(read4(&out)?.dst != kept, "a removed backend is not chosen");

    // Egress isolated, only the first backend's port 8080 allowed: judged on the backend.
    dp.replace_services(&[service(
        6,
        IpAddr::from(VIP4),
        80,
        L4::Tcp,
        vec![backends[0]],
    )])?;
    dp.set_endpoint(progs.ifindex, EP, EndpointFlags::EGRESS_ISOLATED)?;
    dp.replace_policy(
        EP,
        &[Entry {
            direction: Direction::Egress,
            proto: Protocol::Tcp,
            addr: IpAddr::from(BACKENDS4[0]),
            prefix_len: 32,
            ranges: vec![PortRange {
                lo: 8080,
                hi: 8080,
                policy: 9,
            }],
        }],
    )?;
    let (v, _) = progs.run(
        Direction::Egress,
        &ipv4(6, POD4, VIP4, tcp(31000, 80, SYN), true),
    )?;
    ensure!(
        v == PASS,
        "allowed to the backend through the frontend: {v}"
    );
    dp.replace_services(&[service(
        6,
        IpAddr::from(VIP4),
        80,
        L4::Tcp,
        vec![backends[1]],
    )])?;
    let (v, _) = progs.run(
        Direction::Egress,
        &ipv4(6, POD4, VIP4, tcp(31001, 80, SYN), true),
    )?;
    ensure!(v == DROP, "the other backend is not allowed: {v}");
    ensure!(
        !dp.translations()?.iter().any(|t| t.client.port() == 31001),
        "a denied connection leaves no translation"
    );
    Ok(())
}

#[test]
fn a_frontend_without_backends_answers_port_unreachable() -> Result<()> {
    if !support::require_root("a_frontend_without_backends_answers_port_unreachable")? {
        return Ok(());
    }
    let node = Node::new("lbrefuse", 1)?;
    let (mut dp, progs) = open(&node)?;
    let v6_vip: Ipv6Addr = "fd00:96::11".parse()?;
    let pod6: Ipv6Addr = "fd00::2".parse()?;
    dp.replace_services(&[
        service(7, IpAddr::from(EMPTY_VIP4), 80, L4::Tcp, vec![]),
        service(8, IpAddr::from(EMPTY_VIP4), 53, L4::Udp, vec![]),
        service(9, v6_vip.into(), 80, L4::Tcp, vec![]),
        service(10, v6_vip.into(), 53, L4::Udp, vec![]),
    ])?;

    // TCP: a RST from the frontend acknowledging the SYN (seq 12345 + 1).
    let syn = ipv4(6, POD4, EMPTY_VIP4, tcp(40000, 80, SYN), true);
    let (v, out) = progs.run(Direction::Egress, &syn)?;
    ensure!(v == REDIRECT, "TCP: verdict {v}");
    ensure!(out.len() == 14 + 40, "TCP: {} bytes", out.len());
    ensure!(
        out[..6] == syn[6..12] && out[6..12] == syn[..6],
        "MACs swapped"
    );
    let seen = read4(&out)?;
    ensure!(
        seen.src == sa(EMPTY_VIP4, 80) && seen.dst == sa(POD4, 40000),
        "{seen:?}"
    );
    ensure!(out[47] == 0x14, "RST|ACK: {:#x}", out[47]);
    ensure!(
        out[42..46] == 12346u32.to_be_bytes(),
        "acknowledges the SYN"
    );

    // UDP: an ICMP port unreachable quoting the refused header.
    let packet = ipv4(17, POD4, EMPTY_VIP4, udp(5000, 53, b"x"), true);
    let (v, out) = progs.run(Direction::Egress, &packet)?;
    ensure!(v == REDIRECT, "UDP: verdict {v}");
    ensure!(out.len() == 14 + 56, "UDP: {} bytes", out.len());
    let ip = &out[14..34];
    ensure!(csum(&[ip]) == 0, "IP checksum");
    ensure!(
        ip[9] == 1 && ip[12..16] == EMPTY_VIP4 && ip[16..20] == POD4,
        "{ip:?}"
    );
    let icmp = &out[34..];
    ensure!(icmp[0] == 3 && icmp[1] == 3, "port unreachable: {icmp:?}");
    ensure!(csum(&[icmp]) == 0, "ICMP checksum");
    ensure!(icmp[8..36] == packet[14..42], "the refused header quoted");

    // IPv6 TCP: a RST.
    let p = ipv6(6, pod6.octets(), v6_vip.octets(), tcp(40000, 80, SYN));
    let (v, out) = progs.run(Direction::Egress, &p)?;
    ensure!(v == REDIRECT, "v6 TCP: verdict {v}");
    ensure!(out.len() == 14 + 40 + 20, "v6 TCP: {} bytes", out.len());
    let (src, dst) = read6(&out)?;
    ensure!(
        src == SocketAddr::new(v6_vip.into(), 80) && dst == SocketAddr::new(pod6.into(), 40000),
        "{src} → {dst}"
    );
    ensure!(out[67] == 0x14, "v6 RST|ACK");

    // IPv6 UDP: an ICMPv6 port unreachable.
    let p = ipv6(17, pod6.octets(), v6_vip.octets(), udp(5000, 53, b"x"));
    let (v, out) = progs.run(Direction::Egress, &p)?;
    ensure!(v == REDIRECT, "v6 UDP: verdict {v}");
    ensure!(out.len() == 14 + 40 + 8 + 48, "v6 UDP: {} bytes", out.len());
    ensure!(
        out[20] == 58 && out[54] == 1 && out[55] == 4,
        "ICMPv6 port unreachable"
    );
    ensure!(
        out[22..38] == v6_vip.octets() && out[38..54] == pod6.octets(),
        "addresses"
    );
    let len = ((out.len() - 54) as u32).to_be_bytes();
    ensure!(
        csum(&[&out[22..38], &out[38..54], &len, &[0, 0, 0, 58], &out[54..]]) == 0,
        "ICMPv6 checksum"
    );
    ensure!(out[62..] == p[14..62], "v6: the refused header quoted");
    let stats = dp.service_stats()?;
    ensure!(stats.get(&7).map(|s| s.refused) == Some(1), "{stats:?}");
    Ok(())
}

#[test]
fn nodeport_on_the_external_interface_translates_and_reverse_translates() -> Result<()> {
    if !support::require_root("nodeport_on_the_external_interface")? {
        return Ok(());
    }
    use weft_datapath::nodeport::{NodePort, PROG_FROM_NETDEV, PROG_TO_NETDEV};
    let node = Node::new("lbnodeport", 1)?;
    let (mut dp, progs) = open(&node)?;
    let node_ip: [u8; 4] = [192, 168, 77, 11];
    let outside: [u8; 4] = [203, 0, 113, 7];
    let backend = sa(BACKENDS4[0], 8080);
    let mut np = service(11, IpAddr::from(node_ip), 30080, L4::Tcp, vec![backend]);
    np.node_port = true;
    let mut empty = service(12, IpAddr::from(node_ip), 30081, L4::Udp, vec![]);
    empty.node_port = true;
    dp.replace_services(&[
        np,
        empty,
        service(13, IpAddr::from(VIP4), 80, L4::Tcp, vec![backend]),
    ])?;
    let mut nodeport = NodePort::open(&node.pin_dir, None)?;
    let mut run = |name: &str, packet: &[u8]| -> Result<(u32, Vec<u8>)> {
        let prog = nodeport.program(name).context("program")?;
        test_run(prog, progs.ifindex, packet)
    };

    // From outside to NodeIP:nodePort: to the local backend, the client's address kept.
    let syn = ipv4(6, outside, node_ip, tcp(40000, 30080, SYN), true);
    let (v, out) = run(PROG_FROM_NETDEV, &syn)?;
    ensure!(v == PASS, "NodePort SYN: {v}");
    let seen = read4(&out)?;
    ensure!(
        seen.dst == backend && seen.src == sa(outside, 40000),
        "translated: {seen:?}"
    );
    // The backend's reply leaves the node from NodeIP:nodePort.
    let reply = ipv4(6, BACKENDS4[0], outside, tcp(8080, 40000, SYN_ACK), true);
    let (v, out) = run(PROG_TO_NETDEV, &reply)?;
    ensure!(v == PASS, "reply: {v}");
    let seen = read4(&out)?;
    ensure!(
        seen.src == sa(node_ip, 30080) && seen.dst == sa(outside, 40000),
        "reverse translated: {seen:?}"
    );
    // A ClusterIP is not reachable from outside through this program.
    let p = ipv4(6, outside, VIP4, tcp(40001, 80, SYN), true);
    let (v, out) = run(PROG_FROM_NETDEV, &p)?;
    ensure!(v == PASS && out == p, "a ClusterIP from outside: untouched");
    // No backend: port unreachable back out of the interface.
    let p = ipv4(17, outside, node_ip, udp(5000, 30081, b"x"), true);
    let (v, out) = run(PROG_FROM_NETDEV, &p)?;
    ensure!(v == REDIRECT, "refused: {v}");
    ensure!(
        out[34] == 3 && out[35] == 3 && out[26..30] == node_ip,
        "{out:?}"
    );
    // Other traffic to the node is left alone.
    let p = ipv4(6, outside, node_ip, tcp(40002, 22, SYN), true);
    let (v, out) = run(PROG_FROM_NETDEV, &p)?;
    ensure!(v == PASS && out == p, "ssh to the node: untouched");
    Ok(())
}

#[test]
fn a_pod_is_not_sent_to_itself_when_another_backend_exists() -> Result<()> {
    if !support::require_root("a_pod_is_not_sent_to_itself")? {
        return Ok(());
    }
    let node = Node::new("lbhairpin", 1)?;
    let (mut dp, progs) = open(&node)?;
    let other = sa(BACKENDS4[0], 8080);
    dp.replace_services(&[service(
        14,
        IpAddr::from(VIP4),
        80,
        L4::Tcp,
        vec![sa(POD4, 8080), other],
    )])?;
    for sport in 20000..20032 {
        let (v, out) = progs.run(
            Direction::Egress,
            &ipv4(6, POD4, VIP4, tcp(sport, 80, SYN), true),
        )?;
        ensure!(v == PASS, "SYN {sport}: {v}");
        ensure!(
            read4(&out)?.dst == other,
            "SYN {sport} went to the client itself"
        );
    }
    Ok(())
}

//! The programs on crafted packets (BPF_PROG_TEST_RUN), for what real sockets in namespaces
//! cannot easily send: SCTP, IPv6 extension headers, fragments, ICMP errors about tracked
//! connections, neighbour discovery, ARP, truncated headers. Needs root (skips otherwise,
//! fails when CI=true).

mod support;

use std::net::{Ipv4Addr, Ipv6Addr};

use anyhow::{ensure, Context, Result};
use aya::programs::{SchedClassifier, TestRun, TestRunOptions};
use support::Node;
use weft_datapath::{
    Datapath, Direction, EndpointFlags, Entry, PolicyMaps, PortRange, Protocol, OBJECT_HASH,
};

/// TC_ACT_UNSPEC (-1): no objection, the packet goes on.
const PASS: u32 = u32::MAX;
/// TC_ACT_SHOT.
const DROP: u32 = 2;

const EP: u32 = 9;
const POD4: [u8; 4] = [10, 0, 0, 2];
const PEER4: [u8; 4] = [10, 0, 0, 1];
const OTHER4: [u8; 4] = [10, 0, 0, 9];
const ROUTER4: [u8; 4] = [10, 0, 0, 254];
const SERVICE4: [u8; 4] = [10, 0, 0, 7];

fn v6(s: &str) -> [u8; 16] {
    s.parse::<Ipv6Addr>()
        .map(|a| a.octets())
        .unwrap_or_default()
}

fn eth(ethertype: u16) -> Vec<u8> {
    let mut p = vec![0x02, 0, 0, 0, 0, 1, 0x02, 0, 0, 0, 0, 2];
    p.extend_from_slice(&ethertype.to_be_bytes());
    p
}

fn ipv4(proto: u8, src: [u8; 4], dst: [u8; 4], frag_off: u16, l4: &[u8]) -> Vec<u8> {
    let mut p = eth(0x0800);
    p.extend_from_slice(&[0x45, 0]);
    p.extend_from_slice(&(20 + l4.len() as u16).to_be_bytes());
    p.extend_from_slice(&[0, 1]);
    p.extend_from_slice(&frag_off.to_be_bytes());
    p.extend_from_slice(&[64, proto, 0, 0]);
    p.extend_from_slice(&src);
    p.extend_from_slice(&dst);
    p.extend_from_slice(l4);
    p
}

/// An IPv6 packet; `ext` is a chain of (header type, bytes) before the L4 header.
fn ipv6(proto: u8, src: [u8; 16], dst: [u8; 16], ext: &[(u8, Vec<u8>)], l4: &[u8]) -> Vec<u8> {
    let mut payload = Vec::new();
    let first = ext.first().map_or(proto, |(t, _)| *t);
    for (i, (_, body)) in ext.iter().enumerate() {
        let next = ext.get(i + 1).map_or(proto, |(t, _)| *t);
        let mut h = body.clone();
        h[0] = next;
        payload.extend_from_slice(&h);
    }
    payload.extend_from_slice(l4);
    let mut p = eth(0x86dd);
    p.extend_from_slice(&[0x60, 0, 0, 0]);
    p.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    p.extend_from_slice(&[first, 64]);
    p.extend_from_slice(&src);
    p.extend_from_slice(&dst);
    p.extend_from_slice(&payload);
    p
}

/// An 8-byte options header (hop-by-hop or destination options, PadN).
fn opts8() -> Vec<u8> {
    vec![0, 0, 1, 4, 0, 0, 0, 0]
}

fn frag6(offset_units: u16, more: bool) -> Vec<u8> {
    let off = (offset_units << 3) | u16::from(more);
    let mut h = vec![0, 0];
    h.extend_from_slice(&off.to_be_bytes());
    h.extend_from_slice(&[0, 0, 0, 7]);
    h
}

fn tcp(sport: u16, dport: u16, flags: u8) -> Vec<u8> {
    let mut h = Vec::new();
    h.extend_from_slice(&sport.to_be_bytes());
    h.extend_from_slice(&dport.to_be_bytes());
    h.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 0x50, flags, 0xff, 0xff, 0, 0, 0, 0]);
    h
}

const SYN: u8 = 0x02;

fn ports(sport: u16, dport: u16, rest: usize) -> Vec<u8> {
    let mut h = Vec::new();
    h.extend_from_slice(&sport.to_be_bytes());
    h.extend_from_slice(&dport.to_be_bytes());
    h.resize(4 + rest, 0);
    h
}

fn icmp(kind: u8, code: u8, id: u16, body: &[u8]) -> Vec<u8> {
    let mut h = vec![kind, code, 0, 0];
    h.extend_from_slice(&id.to_be_bytes());
    h.extend_from_slice(&[0, 1]);
    h.extend_from_slice(body);
    h
}

/// The IP packet (no Ethernet header) inside an ICMP error.
fn inner(packet: &[u8]) -> Vec<u8> {
    packet[14..].to_vec()
}

fn entry(
    direction: Direction,
    proto: Protocol,
    addr: impl Into<std::net::IpAddr>,
    len: u8,
    ports: &[(u16, u16, u32)],
) -> Entry {
    Entry {
        direction,
        proto,
        addr: addr.into(),
        prefix_len: len,
        ranges: ports
            .iter()
            .map(|&(lo, hi, policy)| PortRange { lo, hi, policy })
            .collect(),
    }
}

struct Progs {
    from_pod: SchedClassifier,
    to_pod: SchedClassifier,
    ifindex: u32,
}

impl Progs {
    /// Runs a program on a packet as if it crossed the endpoint's interface.
    fn run(&self, direction: Direction, packet: &[u8]) -> Result<u32> {
        let prog = match direction {
            Direction::Egress => &self.from_pod,
            Direction::Ingress => &self.to_pod,
        };
        // struct __sk_buff (192 bytes) with only ifindex (offset 40) set.
        let mut ctx = [0u8; 192];
        ctx[40..44].copy_from_slice(&self.ifindex.to_ne_bytes());
        let result = prog
            .test_run(TestRunOptions {
                data_in: Some(packet),
                ctx_in: Some(&ctx),
                ..Default::default()
            })
            .context("BPF_PROG_TEST_RUN")?;
        Ok(result.return_value)
    }
}

fn verdict(v: u32) -> &'static str {
    match v {
        PASS => "pass",
        DROP => "drop",
        _ => "other",
    }
}

#[test]
fn crafted_packets_get_the_documented_verdicts() -> Result<()> {
    if !support::require_root("crafted_packets_get_the_documented_verdicts")? {
        return Ok(());
    }
    // One pod: its host veth gives test runs a real ifindex in the node namespace.
    let node = Node::new("progrun", 1)?;
    let pod = node.pod(0).clone();
    let mut dp = Datapath::open(&node.pin_dir)?;
    dp.set_endpoint(
        pod.ifindex,
        EP,
        EndpointFlags::INGRESS_ISOLATED | EndpointFlags::EGRESS_ISOLATED,
    )?;
    let peer6: Ipv6Addr = "fd00::1".parse()?;
    let service6: Ipv6Addr = "fd00::7".parse()?;
    dp.replace_policy(
        EP,
        &[
            entry(
                Direction::Ingress,
                Protocol::Tcp,
                Ipv4Addr::from(PEER4),
                32,
                &[(80, 80, 1)],
            ),
            entry(
                Direction::Ingress,
                Protocol::Sctp,
                Ipv4Addr::from(PEER4),
                32,
                &[(9, 9, 2)],
            ),
            entry(
                Direction::Ingress,
                Protocol::Any,
                Ipv4Addr::from(PEER4),
                32,
                &[(0, 65535, 3)],
            ),
            entry(
                Direction::Ingress,
                Protocol::Tcp,
                peer6,
                128,
                &[(80, 80, 4)],
            ),
            entry(
                Direction::Egress,
                Protocol::Tcp,
                Ipv4Addr::from(SERVICE4),
                32,
                &[(443, 443, 5)],
            ),
            entry(
                Direction::Egress,
                Protocol::Tcp,
                service6,
                128,
                &[(443, 443, 6)],
            ),
        ],
    )?;
    let progs_dir = node.pin_dir.join("progs").join(OBJECT_HASH);
    let progs = Progs {
        from_pod: SchedClassifier::from_pin(progs_dir.join("from_pod"))?,
        to_pod: SchedClassifier::from_pin(progs_dir.join("to_pod"))?,
        ifindex: pod.ifindex,
    };

    let (pod6, other6) = (v6("fd00::2"), v6("fd00::9"));
    let tcp_syn_v4 = |src, dst, dport| ipv4(6, src, dst, 0, &tcp(1000, dport, SYN));
    let out_v4 = tcp_syn_v4(POD4, SERVICE4, 443);
    let out_v6 = ipv6(6, pod6, service6.octets(), &[], &tcp(2000, 443, SYN));
    let mut many_ext = Vec::new();
    for _ in 0..7 {
        many_ext.push((60, opts8()));
    }

    use Direction::{Egress, Ingress};
    let cases: Vec<(&str, Direction, Vec<u8>, u32)> = vec![
        (
            "TCP from the peer to an allowed port",
            Ingress,
            tcp_syn_v4(PEER4, POD4, 80),
            PASS,
        ),
        (
            "TCP from the peer to another port",
            Ingress,
            tcp_syn_v4(PEER4, POD4, 81),
            DROP,
        ),
        (
            "TCP from another address",
            Ingress,
            tcp_syn_v4(OTHER4, POD4, 80),
            DROP,
        ),
        (
            "SCTP to an allowed port",
            Ingress,
            ipv4(132, PEER4, POD4, 0, &ports(5, 9, 8)),
            PASS,
        ),
        (
            "SCTP to another port",
            Ingress,
            ipv4(132, PEER4, POD4, 0, &ports(5, 10, 8)),
            DROP,
        ),
        (
            "UDP without a UDP entry",
            Ingress,
            ipv4(17, PEER4, POD4, 0, &ports(53, 53, 4)),
            DROP,
        ),
        (
            "ICMP echo from the peer (Any)",
            Ingress,
            ipv4(1, PEER4, POD4, 0, &icmp(8, 0, 77, &[])),
            PASS,
        ),
        (
            "ICMP echo from another address",
            Ingress,
            ipv4(1, OTHER4, POD4, 0, &icmp(8, 0, 78, &[])),
            DROP,
        ),
        (
            "GRE from the peer (Any)",
            Ingress,
            ipv4(47, PEER4, POD4, 0, &[0; 8]),
            PASS,
        ),
        (
            "an IPv4 non-first fragment",
            Ingress,
            ipv4(17, OTHER4, POD4, 185, &[0; 8]),
            PASS,
        ),
        (
            "an IPv4 header longer than the packet",
            Ingress,
            {
                let mut p = tcp_syn_v4(PEER4, POD4, 80);
                p.truncate(14 + 20 + 2);
                p[14] = 0x4f;
                p
            },
            DROP,
        ),
        (
            "a truncated TCP header",
            Ingress,
            ipv4(6, PEER4, POD4, 0, &[0, 80, 0]),
            DROP,
        ),
        (
            "ARP",
            Ingress,
            {
                let mut p = eth(0x0806);
                p.resize(42, 0);
                p
            },
            PASS,
        ),
        (
            "IPv6 TCP behind hop-by-hop and destination options",
            Ingress,
            ipv6(
                6,
                peer6.octets(),
                pod6,
                &[(0, opts8()), (60, opts8())],
                &tcp(1000, 80, SYN),
            ),
            PASS,
        ),
        (
            "the same to another port",
            Ingress,
            ipv6(
                6,
                peer6.octets(),
                pod6,
                &[(0, opts8()), (60, opts8())],
                &tcp(1000, 81, SYN),
            ),
            DROP,
        ),
        (
            "IPv6 TCP in a first fragment",
            Ingress,
            ipv6(
                6,
                peer6.octets(),
                pod6,
                &[(44, frag6(0, true))],
                &tcp(1001, 80, SYN),
            ),
            PASS,
        ),
        (
            "an IPv6 non-first fragment",
            Ingress,
            ipv6(6, other6, pod6, &[(44, frag6(100, false))], &[0; 8]),
            PASS,
        ),
        (
            "IPv6 with more extension headers than walked",
            Ingress,
            ipv6(6, peer6.octets(), pod6, &many_ext, &tcp(1002, 80, SYN)),
            DROP,
        ),
        (
            "IPv6 TCP from another address",
            Ingress,
            ipv6(6, other6, pod6, &[], &tcp(1000, 80, SYN)),
            DROP,
        ),
        (
            "ICMPv6 neighbour solicitation",
            Ingress,
            ipv6(
                58,
                v6("fe80::1"),
                v6("ff02::1:ff00:2"),
                &[],
                &icmp(135, 0, 0, &[0; 16]),
            ),
            PASS,
        ),
        (
            "ICMPv6 echo from another address",
            Ingress,
            ipv6(58, other6, pod6, &[], &icmp(128, 0, 5, &[])),
            DROP,
        ),
        // Outgoing connections and the ICMP errors about them.
        ("TCP out to the service", Egress, out_v4.clone(), PASS),
        (
            "TCP out to another port",
            Egress,
            tcp_syn_v4(POD4, SERVICE4, 444),
            DROP,
        ),
        (
            "frag-needed from a router about the tracked connection",
            Ingress,
            ipv4(1, ROUTER4, POD4, 0, &icmp(3, 4, 0, &inner(&out_v4))),
            PASS,
        ),
        (
            "frag-needed about an unknown connection",
            Ingress,
            ipv4(
                1,
                ROUTER4,
                POD4,
                0,
                &icmp(3, 4, 0, &inner(&tcp_syn_v4(POD4, SERVICE4, 444))),
            ),
            DROP,
        ),
        ("IPv6 TCP out to the service", Egress, out_v6.clone(), PASS),
        (
            "packet-too-big about the tracked IPv6 connection",
            Ingress,
            ipv6(
                58,
                v6("fd00::fe"),
                pod6,
                &[],
                &icmp(2, 0, 0, &inner(&out_v6)),
            ),
            PASS,
        ),
        (
            "the service's SYN-ACK (a reply)",
            Ingress,
            ipv4(6, SERVICE4, POD4, 0, &tcp(443, 1000, 0x12)),
            PASS,
        ),
    ];

    let mut failures = Vec::new();
    node.run(|| -> Result<()> {
        for (what, direction, packet, want) in &cases {
            let got = progs
                .run(*direction, packet)
                .with_context(|| what.to_string())?;
            if got != *want {
                failures.push(format!(
                    "{what}: {} (want {})",
                    verdict(got),
                    verdict(*want)
                ));
            }
        }
        Ok(())
    })??;
    ensure!(
        failures.is_empty(),
        "wrong verdicts:\n  {}",
        failures.join("\n  ")
    );

    // The counters saw it: policies 1-6 allowed something, the isolated directions dropped.
    let counters = dp.counters()?;
    for policy in 1..=6 {
        ensure!(
            counters.contains_key(&policy),
            "policy {policy} counted: {counters:?}"
        );
    }
    let drops = dp.drops()?;
    ensure!(
        drops.get(&(EP, Ingress)).is_some_and(|&n| n >= 9),
        "ingress drops {drops:?}"
    );
    ensure!(
        drops.get(&(EP, Egress)).is_some_and(|&n| n >= 1),
        "egress drops {drops:?}"
    );
    Ok(())
}

/// from_pod drops what the pod sends from an address that is not its own (Cilium's "invalid
/// source ip"), before conntrack; IPv6 link-local and `::` sources pass (ND, MLD, DAD);
/// an endpoint with no recorded addresses is not checked.
#[test]
fn spoofed_sources_are_dropped_leaving_the_pod() -> Result<()> {
    if !support::require_root("spoofed_sources_are_dropped_leaving_the_pod")? {
        return Ok(());
    }
    let node = Node::new("progrun-spoof", 1)?;
    let pod = node.pod(0).clone();
    let mut dp = Datapath::open(&node.pin_dir)?;
    // Nothing isolated: every drop below is the source check's.
    dp.set_endpoint(pod.ifindex, EP, EndpointFlags::NONE)?;
    let (pod6, other6) = (v6("fd00::2"), v6("fd00::9"));
    dp.set_endpoint_addrs(
        pod.ifindex,
        &[Ipv4Addr::from(POD4).into(), Ipv6Addr::from(pod6).into()],
    )?;
    let progs_dir = node.pin_dir.join("progs").join(OBJECT_HASH);
    let progs = Progs {
        from_pod: SchedClassifier::from_pin(progs_dir.join("from_pod"))?,
        to_pod: SchedClassifier::from_pin(progs_dir.join("to_pod"))?,
        ifindex: pod.ifindex,
    };
    let udp4 = |src| ipv4(17, src, PEER4, 0, &ports(5000, 53, 4));
    let udp6 = |src| ipv6(17, src, v6("fd00::1"), &[], &ports(5000, 53, 4));
    let ns = |src, dst| ipv6(58, src, dst, &[], &icmp(135, 0, 0, &[0; 16]));
    let mut arp = eth(0x0806);
    arp.extend_from_slice(&[0; 28]);

    use Direction::{Egress, Ingress};
    let cases: Vec<(&str, Direction, Vec<u8>, u32)> = vec![
        ("UDP from the pod's address", Egress, udp4(POD4), PASS),
        ("UDP from another pod's address", Egress, udp4(OTHER4), DROP),
        ("UDP from 0.0.0.0", Egress, udp4([0; 4]), DROP),
        (
            "TCP SYN from a forged address",
            Egress,
            ipv4(6, OTHER4, SERVICE4, 0, &tcp(1000, 443, SYN)),
            DROP,
        ),
        (
            "a non-first fragment from a forged address",
            Egress,
            ipv4(17, OTHER4, PEER4, 185, &[0; 8]),
            DROP,
        ),
        (
            "a non-first fragment from the pod",
            Egress,
            ipv4(17, POD4, PEER4, 185, &[0; 8]),
            PASS,
        ),
        ("IPv6 UDP from the pod's address", Egress, udp6(pod6), PASS),
        ("IPv6 UDP from another address", Egress, udp6(other6), DROP),
        (
            "IPv6 UDP from a link-local address",
            Egress,
            ipv6(17, v6("fe80::2"), v6("fe80::1"), &[], &ports(5000, 53, 4)),
            PASS,
        ),
        (
            "neighbour solicitation from link-local",
            Egress,
            ns(v6("fe80::2"), v6("ff02::1:ff00:1")),
            PASS,
        ),
        (
            "duplicate address detection from ::",
            Egress,
            ns(v6("::"), v6("ff02::1:ff00:2")),
            PASS,
        ),
        (
            "neighbour solicitation from a forged global address",
            Egress,
            ns(other6, v6("ff02::1:ff00:1")),
            DROP,
        ),
        ("ARP", Egress, arp, PASS),
        (
            "into the pod from any source (ingress is not source-checked)",
            Ingress,
            ipv4(17, OTHER4, POD4, 0, &ports(53, 5000, 4)),
            PASS,
        ),
    ];
    let drops_wanted = cases.iter().filter(|c| c.3 == DROP).count() as u64;

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let _rt = rt.enter();
    let mut flows = dp.flows()?;
    let mut failures = Vec::new();
    node.run(|| -> Result<()> {
        for (what, direction, packet, want) in &cases {
            let got = progs
                .run(*direction, packet)
                .with_context(|| what.to_string())?;
            if got != *want {
                failures.push(format!(
                    "{what}: {} (want {})",
                    verdict(got),
                    verdict(*want)
                ));
            }
        }
        Ok(())
    })??;
    ensure!(
        failures.is_empty(),
        "wrong verdicts:\n  {}",
        failures.join("\n  ")
    );

    // Counted per endpoint, not as policy denials; one flow event each.
    let source_drops = dp.source_drops()?;
    ensure!(
        source_drops.get(&EP) == Some(&drops_wanted),
        "source drops {source_drops:?}, want {drops_wanted}"
    );
    ensure!(dp.drops()?.is_empty(), "policy drops {:?}", dp.drops()?);
    let mut spoofed = Vec::new();
    while let Some(ev) = flows.try_next() {
        if ev.reason == weft_datapath::Reason::SpoofedSource {
            spoofed.push(ev);
        }
    }
    ensure!(
        spoofed.len() as u64 == drops_wanted
            && spoofed.iter().all(|e| e.ep_id == EP
                && e.direction == Egress
                && e.verdict == weft_datapath::Verdict::Denied
                && e.policy == 0),
        "spoofed-source flow events: {spoofed:?}"
    );
    ensure!(
        spoofed
            .iter()
            .any(|e| e.src == std::net::IpAddr::from(OTHER4) && e.dport == 53),
        "the forged UDP's event names its source: {spoofed:?}"
    );
    // No conntrack entry under a forged tuple (the ingress case above has one, rightly).
    let forged: Vec<_> = dp
        .conntrack(EP)?
        .into_iter()
        .filter(|(k, _)| k.direction == 1 && (k.saddr[..4] == OTHER4 || k.saddr == other6))
        .collect();
    ensure!(
        forged.is_empty(),
        "conntrack under a forged source: {forged:?}"
    );

    // No addresses recorded (an endpoint from before the upgrade): not checked.
    dp.set_endpoint_addrs(pod.ifindex, &[])?;
    ensure!(dp.endpoint_addrs()?.is_empty());
    let got = node.run(|| progs.run(Egress, &udp4(OTHER4)))??;
    ensure!(got == PASS, "unchecked endpoint: {}", verdict(got));

    // Removing the endpoint removes its addresses and its counter.
    dp.set_endpoint_addrs(pod.ifindex, &[Ipv4Addr::from(POD4).into()])?;
    dp.remove_endpoint(pod.ifindex)?;
    ensure!(dp.endpoint_addrs()?.is_empty(), "addresses left");
    ensure!(dp.counter_entry_count(EP)? == 0, "counters left");
    Ok(())
}

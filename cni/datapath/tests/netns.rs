//! The datapath against real sockets: pods as network namespaces around a node namespace
//! (see `support`), both programs attached to every host veth, maps filled by hand. Needs
//! root: skips otherwise, fails when CI=true. Every test builds its own node, so they run in
//! parallel.

mod support;

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use support::{echo, tcp_echo, udp_echo, Node};
use weft_datapath::{
    Datapath, Direction, EndpointFlags, Entry, FlowEvent, PolicyMaps, PortRange, Protocol, Reason,
    Verdict,
};

const A: u32 = 1;
const B: u32 = 2;
const C: u32 = 3;

fn entry(
    direction: Direction,
    proto: Protocol,
    addr: impl Into<IpAddr>,
    prefix_len: u8,
    ranges: &[(u16, u16, u32)],
) -> Entry {
    Entry {
        direction,
        proto,
        addr: addr.into(),
        prefix_len,
        ranges: ranges
            .iter()
            .map(|&(lo, hi, policy)| PortRange { lo, hi, policy })
            .collect(),
    }
}

/// Opens the datapath for a node and attaches it to every pod's host veth.
fn attach_all(node: &Node) -> Result<Datapath> {
    let mut dp = Datapath::open(&node.pin_dir).context("opening the datapath")?;
    for pod in &node.pods {
        node.run(|| dp.attach(pod.ifindex))?
            .with_context(|| format!("attaching to {}", pod.host_if))?;
    }
    Ok(dp)
}

macro_rules! root_or_skip {
    ($name:literal) => {
        if !support::require_root($name)? {
            return Ok(());
        }
    };
}

#[test]
fn tcp_is_decided_by_port_range_and_longest_prefix() -> Result<()> {
    root_or_skip!("tcp_is_decided_by_port_range_and_longest_prefix");
    let node = Node::new("tcp", 3)?;
    let (a, b, c) = (
        node.pod(0).clone(),
        node.pod(1).clone(),
        node.pod(2).clone(),
    );
    let _servers = [8001, 8020, 9000].map(|p| tcp_echo(&b, p));
    let mut dp = attach_all(&node)?;
    for (pod, id) in [(&a, A), (&b, B), (&c, C)] {
        dp.set_endpoint(pod.ifindex, id, EndpointFlags::NONE)?;
    }
    // The network works before any isolation (so a drop below is the policy's doing).
    c.expect("c -> b:8020, not isolated", || {
        c.tcp_ok(b.addr(false, 8020))
    })?;

    // b's ingress: 10.200.0.0/24 may use 9000 (policy 12), a may also use 8000-8010 (11),
    // c is excepted from the /24 (a hole). a's /32 entry carries the /24's range too.
    dp.replace_policy(
        B,
        &[
            entry(
                Direction::Ingress,
                Protocol::Tcp,
                a.v4,
                32,
                &[(8000, 8010, 11), (9000, 9000, 12)],
            ),
            entry(
                Direction::Ingress,
                Protocol::Tcp,
                [10, 200, 0, 0],
                24,
                &[(9000, 9000, 12)],
            ),
            entry(Direction::Ingress, Protocol::Tcp, c.v4, 32, &[]),
        ],
    )?;
    dp.set_endpoint(b.ifindex, B, EndpointFlags::INGRESS_ISOLATED)?;

    a.expect("a -> b:8001 (range 8000-8010)", || {
        a.tcp_ok(b.addr(false, 8001))
    })?;
    a.expect("a -> b:9000 (the /24's range)", || {
        a.tcp_ok(b.addr(false, 9000))
    })?;
    a.expect_dropped("a -> b:8020 (no range)", || a.tcp_ok(b.addr(false, 8020)))?;
    c.expect_dropped("c -> b:9000 (excepted from the /24)", || {
        c.tcp_ok(b.addr(false, 9000))
    })?;
    c.expect_dropped("c -> b:8001", || c.tcp_ok(b.addr(false, 8001)))?;
    // c's egress is not isolated and b's answers never left: nothing else was denied.
    let counters = dp.counters()?;
    ensure!(
        counters.get(&11).is_some_and(|c| c.allowed_conns >= 1),
        "policy 11: {counters:?}"
    );
    ensure!(
        counters.get(&12).is_some_and(|c| c.allowed_conns >= 1),
        "policy 12: {counters:?}"
    );
    let drops = dp.drops()?;
    ensure!(
        drops.get(&(B, Direction::Ingress)).is_some_and(|&n| n >= 6),
        "drops {drops:?}"
    );
    ensure!(
        !drops.contains_key(&(A, Direction::Egress)),
        "a's egress is not isolated: {drops:?}"
    );
    Ok(())
}

#[test]
fn udp_is_allowed_or_denied_and_answers_come_back() -> Result<()> {
    root_or_skip!("udp_is_allowed_or_denied_and_answers_come_back");
    let node = Node::new("udp", 2)?;
    let (a, b) = (node.pod(0).clone(), node.pod(1).clone());
    let _s1 = udp_echo(&b, 5353)?;
    let _s2 = udp_echo(&b, 5354)?;
    let mut dp = attach_all(&node)?;
    dp.set_endpoint(a.ifindex, A, EndpointFlags::NONE)?;
    dp.set_endpoint(b.ifindex, B, EndpointFlags::NONE)?;
    a.expect("a -> b udp/5354, not isolated", || {
        a.udp_ok(b.addr(false, 5354))
    })?;

    dp.replace_policy(
        B,
        &[entry(
            Direction::Ingress,
            Protocol::Udp,
            a.v4,
            32,
            &[(5353, 5353, 21)],
        )],
    )?;
    dp.set_endpoint(b.ifindex, B, EndpointFlags::INGRESS_ISOLATED)?;
    // a isolates its ingress with nothing allowed: b's answers still arrive (conntrack).
    dp.set_endpoint(a.ifindex, A, EndpointFlags::INGRESS_ISOLATED)?;

    a.expect("a -> b udp/5353 and back", || a.udp_ok(b.addr(false, 5353)))?;
    a.expect_dropped("a -> b udp/5354 (other port)", || {
        a.udp_ok(b.addr(true, 5354))
    })?;
    // A TCP entry does not allow UDP on the same port.
    dp.replace_policy(
        B,
        &[entry(
            Direction::Ingress,
            Protocol::Tcp,
            a.v4,
            32,
            &[(5353, 5354, 22)],
        )],
    )?;
    a.expect_dropped("a -> b udp/5354 with only a TCP rule", || {
        a.udp_ok(b.addr(false, 5354))
    })?;
    Ok(())
}

#[test]
fn replies_of_an_allowed_connection_pass_an_isolated_direction() -> Result<()> {
    root_or_skip!("replies_of_an_allowed_connection_pass_an_isolated_direction");
    let node = Node::new("ct", 2)?;
    let (a, b) = (node.pod(0).clone(), node.pod(1).clone());
    let _sb = tcp_echo(&b, 8080)?;
    let _sa = tcp_echo(&a, 8081)?;
    let mut dp = attach_all(&node)?;
    dp.set_endpoint(b.ifindex, B, EndpointFlags::NONE)?;
    // a: both directions isolated; egress to b:8080 allowed, nothing in.
    dp.replace_policy(
        A,
        &[entry(
            Direction::Egress,
            Protocol::Tcp,
            b.v4,
            32,
            &[(8080, 8080, 31)],
        )],
    )?;
    dp.set_endpoint(
        a.ifindex,
        A,
        EndpointFlags::INGRESS_ISOLATED | EndpointFlags::EGRESS_ISOLATED,
    )?;

    a.expect(
        "a -> b:8080 with answers through a's isolated ingress",
        || a.tcp_ok(b.addr(false, 8080)),
    )?;
    // A long exchange on one connection: every answer is a reply, none a new connection.
    let mut conn = a.connect(b.addr(false, 8080))??;
    for _ in 0..20 {
        ensure!(echo(&mut conn), "echo on an established connection");
    }
    b.expect_dropped("b -> a:8081 (a's ingress allows nothing)", || {
        b.tcp_ok(a.addr(false, 8081))
    })?;
    a.expect_dropped("a -> b:8081 (a's egress allows only 8080)", || {
        a.tcp_ok(b.addr(false, 8081))
    })?;

    let ct = dp.conntrack(A)?;
    ensure!(
        ct.iter()
            .any(|(k, v)| k.direction == 1 && u16::from_be(k.dport) == 8080 && v.policy == 31),
        "a's egress entry for b:8080: {ct:?}"
    );
    ensure!(
        ct.iter().all(|(k, _)| k.direction == 1),
        "nothing entered a as new: {ct:?}"
    );
    Ok(())
}

#[test]
fn unisolated_and_unmanaged_interfaces_pass_everything() -> Result<()> {
    root_or_skip!("unisolated_and_unmanaged_interfaces_pass_everything");
    let node = Node::new("open", 3)?;
    let (a, b, c) = (
        node.pod(0).clone(),
        node.pod(1).clone(),
        node.pod(2).clone(),
    );
    let _t = tcp_echo(&b, 7000)?;
    let _u = udp_echo(&b, 7001)?;
    let mut dp = attach_all(&node)?;
    // a and b are endpoints with nothing isolated (policy entries exist but do not apply);
    // c's interface has the programs but is no endpoint.
    dp.set_endpoint(a.ifindex, A, EndpointFlags::NONE)?;
    dp.set_endpoint(b.ifindex, B, EndpointFlags::NONE)?;
    dp.replace_policy(
        B,
        &[entry(Direction::Ingress, Protocol::Tcp, c.v4, 32, &[])],
    )?;

    for (who, v6) in [(&a, false), (&a, true), (&c, false), (&c, true)] {
        who.expect("tcp to b:7000", || who.tcp_ok(b.addr(v6, 7000)))?;
        who.expect("udp to b:7001", || who.udp_ok(b.addr(v6, 7001)))?;
    }
    ensure!(dp.drops()?.is_empty(), "no drops: {:?}", dp.drops()?);
    let counters = dp.counters()?;
    let open = counters.get(&0).copied().unwrap_or_default();
    ensure!(
        open.allowed_conns >= 4,
        "policy 0 counts unisolated connections: {counters:?}"
    );
    ensure!(
        dp.conntrack(C)?.is_empty(),
        "an unmanaged interface is not tracked"
    );
    Ok(())
}

#[test]
fn ipv6_is_allowed_or_denied_by_prefix_and_port() -> Result<()> {
    root_or_skip!("ipv6_is_allowed_or_denied_by_prefix_and_port");
    let node = Node::new("v6", 3)?;
    let (a, b, c) = (
        node.pod(0).clone(),
        node.pod(1).clone(),
        node.pod(2).clone(),
    );
    let _s = [8080, 8081].map(|p| tcp_echo(&b, p));
    let _u = udp_echo(&b, 8082)?;
    let mut dp = attach_all(&node)?;
    dp.set_endpoint(a.ifindex, A, EndpointFlags::NONE)?;
    dp.set_endpoint(c.ifindex, C, EndpointFlags::NONE)?;
    dp.set_endpoint(b.ifindex, B, EndpointFlags::NONE)?;
    c.expect("c -> [b]:8081, not isolated", || {
        c.tcp_ok(b.addr(true, 8081))
    })?;

    // fd00::/64 may use 8080 and udp/8082; c's /128 is excepted.
    let net: std::net::Ipv6Addr = "fd00::".parse()?;
    dp.replace_policy(
        B,
        &[
            entry(
                Direction::Ingress,
                Protocol::Tcp,
                net,
                64,
                &[(8080, 8080, 41)],
            ),
            entry(
                Direction::Ingress,
                Protocol::Udp,
                net,
                64,
                &[(8082, 8082, 42)],
            ),
            entry(Direction::Ingress, Protocol::Tcp, c.v6, 128, &[]),
        ],
    )?;
    dp.set_endpoint(b.ifindex, B, EndpointFlags::INGRESS_ISOLATED)?;
    a.expect("a -> [b]:8080", || a.tcp_ok(b.addr(true, 8080)))?;
    a.expect("a -> [b] udp/8082", || a.udp_ok(b.addr(true, 8082)))?;
    a.expect_dropped("a -> [b]:8081", || a.tcp_ok(b.addr(true, 8081)))?;
    c.expect_dropped("c -> [b]:8080 (excepted)", || c.tcp_ok(b.addr(true, 8080)))?;
    // The v4 trie has nothing for b: IPv4 is denied.
    a.expect_dropped("a -> b:8080 over IPv4", || a.tcp_ok(b.addr(false, 8080)))?;
    // Neighbour discovery keeps working under isolation (the probes above needed it, and
    // so does a fresh resolution).
    support::ip(&["-n", &node.ns, "-6", "neigh", "flush", "dev", &b.host_if])?;
    a.expect("a -> [b]:8080 after a neighbour flush", || {
        a.tcp_ok(b.addr(true, 8080))
    })?;
    Ok(())
}

#[test]
fn a_replaced_policy_applies_to_the_next_new_connection() -> Result<()> {
    root_or_skip!("a_replaced_policy_applies_to_the_next_new_connection");
    let node = Node::new("replace", 2)?;
    let (a, b) = (node.pod(0).clone(), node.pod(1).clone());
    let _s = [8080, 9090].map(|p| tcp_echo(&b, p));
    let mut dp = attach_all(&node)?;
    dp.set_endpoint(a.ifindex, A, EndpointFlags::NONE)?;
    dp.replace_policy(
        B,
        &[entry(
            Direction::Ingress,
            Protocol::Tcp,
            a.v4,
            32,
            &[(8080, 8080, 51)],
        )],
    )?;
    dp.set_endpoint(b.ifindex, B, EndpointFlags::INGRESS_ISOLATED)?;
    a.expect("a -> b:8080 under policy 51", || {
        a.tcp_ok(b.addr(false, 8080))
    })?;
    let mut established = a.connect(b.addr(false, 8080))??;
    ensure!(echo(&mut established), "echo before the change");

    // The same key with a new value, and a second entry: written in place.
    let started = Instant::now();
    dp.replace_policy(
        B,
        &[
            entry(
                Direction::Ingress,
                Protocol::Tcp,
                a.v4,
                32,
                &[(9090, 9090, 52)],
            ),
            entry(
                Direction::Ingress,
                Protocol::Tcp,
                [10, 200, 0, 0],
                24,
                &[(9090, 9090, 53)],
            ),
        ],
    )?;
    ensure!(
        started.elapsed() < Duration::from_secs(1),
        "replace took {:?}",
        started.elapsed()
    );
    a.expect_dropped("a -> b:8080, a new connection after the change", || {
        a.tcp_ok(b.addr(false, 8080))
    })?;
    a.expect("a -> b:9090 under policy 52", || {
        a.tcp_ok(b.addr(false, 9090))
    })?;
    ensure!(
        echo(&mut established),
        "the established connection outlives the change"
    );
    ensure!(
        dp.policy_entry_counts()? == (2, 0),
        "entries {:?}",
        dp.policy_entry_counts()?
    );

    // Back to one entry: the stale /24 goes.
    dp.replace_policy(
        B,
        &[entry(
            Direction::Ingress,
            Protocol::Tcp,
            a.v4,
            32,
            &[(9090, 9090, 52)],
        )],
    )?;
    ensure!(
        dp.policy_entry_counts()? == (1, 0),
        "entries {:?}",
        dp.policy_entry_counts()?
    );

    // Flushing conntrack re-judges the established connection: its next segment is new and
    // denied (policy 52 does not allow 8080).
    let flushed = dp.flush_conntrack(B)?;
    ensure!(flushed >= 1, "flushed {flushed}");
    ensure!(
        !echo(&mut established),
        "the flushed connection is judged anew and dropped"
    );
    Ok(())
}

fn wait_for_flows(dp: &Datapath, want: &[&dyn Fn(&FlowEvent) -> bool]) -> Result<Vec<FlowEvent>> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let mut reader = dp.flows()?;
        let mut seen = Vec::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while !want.iter().all(|w| seen.iter().any(w)) {
            match tokio::time::timeout_at(deadline, reader.next()).await {
                Ok(ev) => seen.push(ev?),
                Err(_) => bail!("flow events missing after 5 s; saw {seen:#?}"),
            }
        }
        Ok(seen)
    })
}

#[test]
fn counters_and_flow_events_reflect_the_decisions() -> Result<()> {
    root_or_skip!("counters_and_flow_events_reflect_the_decisions");
    let node = Node::new("flows", 2)?;
    let (a, b) = (node.pod(0).clone(), node.pod(1).clone());
    let _s = [8080, 8081].map(|p| tcp_echo(&b, p));
    let _u = udp_echo(&b, 8082)?;
    // Warm the neighbour caches first, so that every probe below is exactly one decision.
    a.expect("a -> b udp/8082 before attach", || {
        a.udp_ok(b.addr(false, 8082))
    })?;
    let mut dp = attach_all(&node)?;
    dp.set_endpoint(a.ifindex, A, EndpointFlags::NONE)?;
    dp.replace_policy(
        B,
        &[entry(
            Direction::Ingress,
            Protocol::Tcp,
            a.v4,
            32,
            &[(8080, 8080, 61)],
        )],
    )?;
    dp.set_endpoint(b.ifindex, B, EndpointFlags::INGRESS_ISOLATED)?;

    for i in 0..2 {
        ensure!(
            a.tcp_ok(b.addr(false, 8080))?,
            "a -> b:8080, connection {i}"
        );
    }
    a.expect_dropped("a -> b:8081", || a.tcp_ok(b.addr(false, 8081)))?;
    a.expect_dropped("a -> b udp/8082", || a.udp_ok(b.addr(false, 8082)))?;

    let (av4, bv4) = (IpAddr::V4(a.v4), IpAddr::V4(b.v4));
    let allowed = |e: &FlowEvent| {
        e.ep_id == B
            && e.direction == Direction::Ingress
            && e.verdict == Verdict::Allowed
            && e.reason == Reason::Policy
            && e.policy == 61
            && e.proto == 6
            && (e.src, e.dst, e.dport) == (av4, bv4, 8080)
    };
    let denied_port = |e: &FlowEvent| {
        e.ep_id == B
            && e.verdict == Verdict::Denied
            && e.reason == Reason::NoPort
            && e.dport == 8081
            && e.policy == 0
    };
    let denied_udp = |e: &FlowEvent| {
        e.ep_id == B && e.verdict == Verdict::Denied && e.reason == Reason::NoPeer && e.proto == 17
    };
    let a_egress = |e: &FlowEvent| {
        e.ep_id == A
            && e.direction == Direction::Egress
            && e.reason == Reason::NotIsolated
            && e.dport == 8080
    };
    let seen = wait_for_flows(&dp, &[&allowed, &denied_port, &denied_udp, &a_egress])?;
    // One event per decision, not per packet: the two allowed connections at b.
    let allowed_events = seen.iter().filter(|e| allowed(e)).count();
    ensure!(
        allowed_events == 2,
        "{allowed_events} allowed events: {seen:#?}"
    );
    let age = seen[0].time.elapsed().unwrap_or_default();
    ensure!(
        age < Duration::from_secs(60),
        "event time is wall-clock: {age:?} old"
    );

    let counters = dp.counters()?;
    let c61 = counters.get(&61).copied().unwrap_or_default();
    ensure!(
        c61.allowed_conns == 2,
        "policy 61 counts connections: {counters:?}"
    );
    ensure!(
        c61.allowed_packets > c61.allowed_conns,
        "and their packets: {counters:?}"
    );
    let drops: BTreeMap<_, _> = dp.drops()?;
    ensure!(
        drops.get(&(B, Direction::Ingress)).is_some_and(|&n| n >= 4),
        "drops {drops:?}"
    );
    ensure!(dp.flow_lost()? == 0, "no events lost");
    Ok(())
}

#[test]
fn a_restart_keeps_policy_and_reattaching_does_not_duplicate() -> Result<()> {
    root_or_skip!("a_restart_keeps_policy_and_reattaching_does_not_duplicate");
    let node = Node::new("restart", 2)?;
    let (a, b) = (node.pod(0).clone(), node.pod(1).clone());
    let _s = [8080, 8081].map(|p| tcp_echo(&b, p));
    {
        let mut dp = attach_all(&node)?;
        dp.set_endpoint(a.ifindex, A, EndpointFlags::NONE)?;
        dp.replace_policy(
            B,
            &[entry(
                Direction::Ingress,
                Protocol::Tcp,
                a.v4,
                32,
                &[(8080, 8080, 71)],
            )],
        )?;
        dp.set_endpoint(b.ifindex, B, EndpointFlags::INGRESS_ISOLATED)?;
        a.expect("a -> b:8080", || a.tcp_ok(b.addr(false, 8080)))?;
    } // the "agent" exits: links, programs and maps stay pinned

    a.expect("a -> b:8080 with no process holding anything", || {
        a.tcp_ok(b.addr(false, 8080))
    })?;
    a.expect_dropped("a -> b:8081 still denied", || a.tcp_ok(b.addr(false, 8081)))?;

    let mut dp = Datapath::open(&node.pin_dir)?;
    ensure!(
        dp.endpoints()?.len() == 2,
        "endpoints survive: {:?}",
        dp.endpoints()?
    );
    ensure!(dp.policy_entry_counts()? == (1, 0), "policy survives");
    // Reattaching (twice) swaps programs in place: one program per hook, ever.
    for _ in 0..2 {
        for pod in [&a, &b] {
            node.run(|| dp.attach(pod.ifindex))??;
            ensure!(
                node.tcx_programs(&pod.host_if)? == (1, 1),
                "one program per hook"
            );
        }
    }
    ensure!(
        dp.attached()? == vec![a.ifindex, b.ifindex],
        "links {:?}",
        dp.attached()?
    );
    // The reopened writer knows what is installed: replacing removes the old entry.
    dp.replace_policy(
        B,
        &[entry(
            Direction::Ingress,
            Protocol::Tcp,
            a.v4,
            24,
            &[(8081, 8081, 72)],
        )],
    )?;
    ensure!(
        dp.policy_entry_counts()? == (1, 0),
        "the restored index removed the stale entry"
    );
    a.expect("a -> b:8081 under the new policy", || {
        a.tcp_ok(b.addr(false, 8081))
    })?;

    // A new build of the programs (here: their pins removed, so open loads them again) is
    // swapped into the existing links by attach: still one program per hook, the new one.
    drop(dp);
    let progs = node.pin_dir.join("progs").join(weft_datapath::OBJECT_HASH);
    let old_id = program_id(&progs.join("to_pod"))?;
    for p in ["from_pod", "to_pod"] {
        std::fs::remove_file(progs.join(p))?;
    }
    let mut dp = Datapath::open(&node.pin_dir)?;
    let new_id = program_id(&progs.join("to_pod"))?;
    ensure!(new_id != old_id, "reloaded");
    node.run(|| dp.attach(b.ifindex))??;
    ensure!(
        node.tcx_programs(&b.host_if)? == (1, 1),
        "one program per hook after the swap"
    );
    let attached = node.run(|| -> Result<Vec<u32>> {
        let (_, progs) = aya::programs::SchedClassifier::query_tcx(
            &b.host_if,
            aya::programs::TcAttachType::Egress,
        )?;
        Ok(progs.iter().map(|p| p.id()).collect())
    })??;
    ensure!(
        attached == vec![new_id],
        "the new to_pod runs: {attached:?} (new {new_id})"
    );
    a.expect("a -> b:8081 through the new program", || {
        a.tcp_ok(b.addr(false, 8081))
    })?;
    a.expect_dropped("a -> b:8080 through the new program", || {
        a.tcp_ok(b.addr(false, 8080))
    })?;
    Ok(())
}

fn program_id(pin: &std::path::Path) -> Result<u32> {
    Ok(aya::programs::SchedClassifier::from_pin(pin)?.info()?.id())
}

#[test]
fn an_incompatible_pinned_map_is_replaced() -> Result<()> {
    root_or_skip!("an_incompatible_pinned_map_is_replaced");
    let node = Node::new("compat", 1)?;
    std::fs::create_dir_all(&node.pin_dir)?;
    // What an older build might have left: weft_drops with another value size.
    let pin = node.pin_dir.join("weft_drops");
    let pin_str = pin.to_str().context("pin path")?;
    let out = std::process::Command::new("bpftool")
        .args([
            "map",
            "create",
            pin_str,
            "type",
            "percpu_hash",
            "key",
            "8",
            "value",
            "16",
        ])
        .args(["entries", "16", "name", "weft_drops"])
        .output()
        .context("running bpftool (scripts/setup.sh installs it)")?;
    ensure!(
        out.status.success(),
        "bpftool: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    let dp = Datapath::open(&node.pin_dir)?;
    let info = aya::maps::MapInfo::from_pin(&pin)?;
    ensure!(
        info.value_size() == 8,
        "replaced: value size {}",
        info.value_size()
    );
    ensure!(dp.drops()?.is_empty(), "and readable");
    Ok(())
}

#[test]
fn removal_detach_and_unpin_leave_nothing_behind() -> Result<()> {
    root_or_skip!("removal_detach_and_unpin_leave_nothing_behind");
    let node = Node::new("cleanup", 2)?;
    let (a, b) = (node.pod(0).clone(), node.pod(1).clone());
    let _s = [8080, 8081].map(|p| tcp_echo(&b, p));
    let mut dp = attach_all(&node)?;
    dp.set_endpoint(a.ifindex, A, EndpointFlags::EGRESS_ISOLATED)?;
    dp.set_endpoint(b.ifindex, B, EndpointFlags::INGRESS_ISOLATED)?;
    dp.replace_policy(
        A,
        &[
            entry(
                Direction::Egress,
                Protocol::Tcp,
                b.v4,
                32,
                &[(8080, 8080, 81)],
            ),
            entry(
                Direction::Egress,
                Protocol::Tcp,
                b.v6,
                128,
                &[(8080, 8080, 81)],
            ),
        ],
    )?;
    dp.replace_policy(
        B,
        &[entry(
            Direction::Ingress,
            Protocol::Tcp,
            a.v4,
            32,
            &[(8080, 8080, 82)],
        )],
    )?;
    a.expect("a -> b:8080", || a.tcp_ok(b.addr(false, 8080)))?;
    a.expect_dropped("a -> b:8081", || a.tcp_ok(b.addr(false, 8081)))?;
    ensure!(
        !dp.conntrack(A)?.is_empty() && !dp.conntrack(B)?.is_empty(),
        "tracked"
    );
    ensure!(!dp.drops()?.is_empty(), "a drop was counted");

    for pod in [&a, &b] {
        dp.remove_endpoint(pod.ifindex)?;
        dp.remove_endpoint(pod.ifindex)?; // idempotent
        node.run(|| dp.detach(pod.ifindex))??;
        node.run(|| dp.detach(pod.ifindex))??; // idempotent
        ensure!(
            node.tcx_programs(&pod.host_if)? == (0, 0),
            "detached from {}",
            pod.host_if
        );
    }
    ensure!(
        dp.endpoints()?.is_empty(),
        "endpoints {:?}",
        dp.endpoints()?
    );
    ensure!(
        dp.policy_entry_counts()? == (0, 0),
        "policy {:?}",
        dp.policy_entry_counts()?
    );
    ensure!(
        dp.conntrack(A)?.is_empty() && dp.conntrack(B)?.is_empty(),
        "conntrack"
    );
    ensure!(dp.drops()?.is_empty(), "drops {:?}", dp.drops()?);
    ensure!(dp.attached()?.is_empty(), "link pins {:?}", dp.attached()?);
    // Detached: traffic flows unjudged.
    a.expect("a -> b:8081 after detach", || a.tcp_ok(b.addr(false, 8081)))?;

    drop(dp);
    weft_datapath::unpin_all(&node.pin_dir)?;
    weft_datapath::unpin_all(&node.pin_dir)?; // idempotent
    ensure!(!node.pin_dir.exists(), "{} removed", node.pin_dir.display());
    node.delete_namespaces();
    ensure!(
        node.namespaces()?.is_empty(),
        "namespaces left: {:?}",
        node.namespaces()?
    );
    Ok(())
}

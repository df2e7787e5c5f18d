//! The plugin as a container runtime runs it, against real network
//! namespaces: a "node" namespace stands in for the host (so the tests never
//! touch the machine's own interfaces or sysctls), pods are namespaces, IPAM
//! is Debian's host-local in a temp dir, and the node agent is a fake served
//! with `weft_cni::agent_proto` that records what it was told.
//!
//! Root only: skipped with a message otherwise, failed when `CI=true`.

mod common;

use std::time::Instant;

use anyhow::Result;
use serde_json::{json, Value};
use weft_cni::agent_proto::Request;

use common::*;

fn conf(version: &str, agent: &str, ipam: Value) -> Value {
    json!({
        "cniVersion": version,
        "name": "weft",
        "type": "weft-cni",
        "mtu": 1400,
        "agentSocket": agent,
        "agentTimeoutMs": 2000,
        "ipam": ipam,
    })
}

fn host_ifname(result: &Value) -> String {
    result["interfaces"][0]["name"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

fn adds(agent: &FakeAgent) -> Vec<weft_cni::agent_proto::AddRequest> {
    agent
        .requests()
        .into_iter()
        .filter_map(|r| match r {
            Request::Add(a) => Some(a),
            _ => None,
        })
        .collect()
}

/// ADD two pods with `CNI_IFNAME=ifname`, prove connectivity pod↔pod and
/// node→pod in every family, CHECK, break a route and CHECK again, DEL twice,
/// DEL after the netns is gone.
fn lifecycle(ranges: &[&[&str]], version: &str, ifname: &str) -> Result<()> {
    let node = node_ns()?;
    let (pod_a, pod_b) = (Netns::new("a")?, Netns::new("b")?);
    let agent = FakeAgent::start()?;
    let ipam = HostLocal::new()?;
    let conf = conf(version, &agent.socket_str(), ipam.ipam(ranges));

    let call_a = Call::new("ADD", "pod-a", &pod_a.path()).with_ifname(ifname);
    let call_b = Call::new("ADD", "pod-b", &pod_b.path()).with_ifname(ifname);
    let res_a = call_a.exec(&node, &conf)?.ok();
    let res_b = call_b.exec(&node, &conf)?.ok();

    // The result: spec shape, host veth first, the pod's interface in its sandbox.
    assert_eq!(res_a["cniVersion"], version);
    assert_eq!(res_a["interfaces"][1]["name"], ifname);
    assert_eq!(res_a["interfaces"][1]["sandbox"], pod_a.path().as_str());
    assert_eq!(res_a["interfaces"][1]["mtu"], 1400);
    let ips_a = result_ips(&res_a);
    let ips_b = result_ips(&res_b);
    assert_eq!(ips_a.len(), ranges.len(), "{res_a}");
    for ip in res_a["ips"].as_array().into_iter().flatten() {
        assert_eq!(ip["interface"], 1);
    }
    // The pod's interface is named CNI_IFNAME and carries the result's addresses.
    for (pod, ips) in [(&pod_a, &ips_a), (&pod_b, &ips_b)] {
        let mut want = vec!["lo".to_string(), ifname.to_string()];
        let mut links = pod.links()?;
        links.sort();
        want.sort();
        assert_eq!(links, want, "links in {}", pod.name);
        let addrs = pod.ip(&["-o", "addr", "show", "dev", ifname])?;
        for ip in ips.iter() {
            assert!(
                addrs.contains(&format!(" {ip}/")),
                "{ip} not on {ifname} in {}: {addrs}",
                pod.name
            );
        }
    }
    let host_a = host_ifname(&res_a);
    assert!(host_a.starts_with("lxc") && host_a.len() <= 15, "{host_a}");
    assert!(node.links()?.contains(&host_a));
    assert!(node.ip(&["link", "show", &host_a])?.contains("mtu 1400"));

    // The agent heard of both, with the host veth's real index.
    let added = adds(&agent);
    assert_eq!(added.len(), 2);
    assert_eq!(added[0].host_ifname, host_a);
    assert_eq!(added[0].host_ifindex, node.ifindex(&host_a)?);
    assert_eq!(added[0].ips, ips_a);
    assert_eq!(added[0].pod_namespace.as_deref(), Some("default"));
    assert_eq!(added[0].pod_name.as_deref(), Some("pod-pod-a"));
    assert!(!added[0].chained);

    // Real connectivity, every family: pod to pod, node to pod.
    for (a, b) in ips_a.iter().zip(&ips_b) {
        tcp_check(&pod_a, &pod_b, *b)?;
        tcp_check(&pod_b, &pod_a, *a)?;
        tcp_check(&node, &pod_a, *a)?;
    }

    // CHECK passes, then fails once the pod's default route is gone.
    let check_a = with_prev(&conf, &res_a);
    call_a.command("CHECK").exec(&node, &check_a)?.ok();
    assert!(agent
        .requests()
        .iter()
        .any(|r| matches!(r, Request::Check(c) if c.host_ifname == host_a)));
    let family = if ips_a[0].is_ipv4() { "-4" } else { "-6" };
    pod_a.ip(&[family, "route", "del", "default"])?;
    let msg = call_a.command("CHECK").exec(&node, &check_a)?.err(105);
    assert!(
        msg.contains("route to") && msg.contains(&pod_a.path()),
        "{msg}"
    );

    // DEL, and DEL again: both succeed, nothing of pod A is left.
    call_a.command("DEL").exec(&node, &check_a)?.ok();
    call_a.command("DEL").exec(&node, &check_a)?.ok();
    assert!(!node.links()?.contains(&host_a));
    assert_eq!(pod_a.links()?, vec!["lo".to_string()]);
    for ip in &ips_a {
        assert!(
            !node.routes()?.contains(&ip.to_string()),
            "route to {ip} left: {}",
            node.routes()?
        );
    }
    assert_eq!(
        ipam.leases()?.len(),
        ranges.len(),
        "only pod B's leases remain"
    );

    // DEL after the pod's namespace is gone.
    drop(pod_b);
    call_b
        .command("DEL")
        .exec(&node, &with_prev(&conf, &res_b))?
        .ok();
    assert!(ipam.leases()?.is_empty(), "{:?}", ipam.leases()?);
    assert!(
        !node.links()?.iter().any(|l| l.starts_with("lxc")),
        "{:?}",
        node.links()?
    );
    let dels = agent
        .requests()
        .iter()
        .filter(|r| matches!(r, Request::Del(_)))
        .count();
    assert_eq!(dels, 3);
    Ok(())
}

#[test]
fn ipv4_add_check_del() -> Result<()> {
    if !require_root("ipv4_add_check_del") {
        return Ok(());
    }
    lifecycle(&[&["10.99.1.0/24"]], "1.1.0", "eth0")
}

#[test]
fn ipv6_add_check_del() -> Result<()> {
    if !require_root("ipv6_add_check_del") {
        return Ok(());
    }
    lifecycle(&[&["fd00:99:2::/64"]], "1.1.0", "eth0")
}

#[test]
fn dual_stack_add_check_del_with_a_1_0_0_config_and_ifname_net1() -> Result<()> {
    if !require_root("dual_stack_add_check_del_with_a_1_0_0_config_and_ifname_net1") {
        return Ok(());
    }
    // CNI_IFNAME is not always eth0 (Multus' second networks are net1, net2…).
    lifecycle(&[&["10.99.3.0/24"], &["fd00:99:3::/64"]], "1.0.0", "net1")
}

#[test]
fn error_paths_answer_spec_errors_and_leave_nothing() -> Result<()> {
    if !require_root("error_paths_answer_spec_errors_and_leave_nothing") {
        return Ok(());
    }
    let node = node_ns()?;
    let pod = Netns::new("err")?;
    let agent = FakeAgent::start()?;
    let ipam = HostLocal::new()?;
    let good = conf(
        "1.1.0",
        &agent.socket_str(),
        ipam.ipam(&[&["10.99.4.0/24"]]),
    );
    let add = Call::new("ADD", "err-1", &pod.path());
    let nothing_left = |what: &str| -> Result<()> {
        assert!(
            !node.links()?.iter().any(|l| l.starts_with("lxc")),
            "{what}: {:?}",
            node.links()?
        );
        assert_eq!(pod.links()?, vec!["lo".to_string()], "{what}");
        assert!(
            ipam.leases().unwrap_or_default().is_empty(),
            "{what}: {:?}",
            ipam.leases()
        );
        Ok(())
    };

    // Bad JSON → 6.
    assert!(add
        .exec_bytes(&node, PLUGIN, b"{not json")?
        .err(6)
        .contains("not valid JSON"));

    // Unsupported version → 1, naming it.
    let mut old = good.clone();
    old["cniVersion"] = json!("0.4.0");
    assert!(add.exec(&node, &old)?.err(1).contains("0.4.0"));

    // Missing environment → 4, naming the variable.
    let mut no_netns = add.clone();
    no_netns.netns = None;
    assert!(no_netns.exec(&node, &good)?.err(4).contains("CNI_NETNS"));
    let mut no_path = add.clone();
    no_path.path = None;
    assert!(no_path.exec(&node, &good)?.err(4).contains("CNI_PATH"));

    // A netns that does not exist → 102, naming it.
    let gone = Call::new("ADD", "err-1", "/run/netns/wcni-no-such-ns");
    assert!(gone
        .exec(&node, &good)?
        .err(102)
        .contains("/run/netns/wcni-no-such-ns"));

    // Invalid config → 7, naming the field and value.
    let mut bad_mtu = good.clone();
    bad_mtu["mtu"] = json!("jumbo");
    let msg = add.exec(&node, &bad_mtu)?.err(7);
    assert!(msg.contains("mtu") && msg.contains("jumbo"), "{msg}");

    // IPAM plugin not in CNI_PATH → 101; IPAM failing (range exhausted) → 100.
    let mut no_ipam = good.clone();
    no_ipam["ipam"]["type"] = json!("no-such-ipam");
    assert!(add.exec(&node, &no_ipam)?.err(101).contains("no-such-ipam"));
    nothing_left("IPAM not found")?;
    let mut tiny = good.clone();
    tiny["ipam"]["ranges"] =
        json!([[{"subnet": "10.99.5.0/24", "rangeStart": "10.99.5.7", "rangeEnd": "10.99.5.7"}]]);
    let first = add.exec(&node, &tiny)?.ok();
    let other_pod = Netns::new("err2")?;
    let msg = Call::new("ADD", "err-2", &other_pod.path())
        .exec(&node, &tiny)?
        .err(100);
    assert!(msg.contains("host-local"), "{msg}");
    assert_eq!(other_pod.links()?, vec!["lo".to_string()]);

    // The interface exists already in the pod → 107, and the first attachment is untouched.
    let msg = Call::new("ADD", "err-3", &pod.path())
        .exec(&node, &tiny)?
        .err(107);
    assert!(msg.contains("eth0"), "{msg}");
    tcp_check(&node, &pod, result_ips(&first)[0])?;
    add.command("DEL")
        .exec(&node, &with_prev(&tiny, &first))?
        .ok();
    nothing_left("after DEL")?;

    // Agent down → 11 naming the socket, and ADD undone: no veth, no lease.
    let down = conf(
        "1.1.0",
        "/run/weft-test-nobody/cni.sock",
        ipam.ipam(&[&["10.99.4.0/24"], &["fd00:99:4::/64"]]),
    );
    let msg = add.exec(&node, &down)?.err(11);
    assert!(msg.contains("/run/weft-test-nobody/cni.sock"), "{msg}");
    assert!(msg.contains("weft-cni-agent runs on this node"), "{msg}");
    nothing_left("agent down")?;

    // CHECK of a missing interface → 103.
    let fake_prev =
        json!({"cniVersion": "1.1.0", "interfaces": [{"name": "eth0", "sandbox": pod.path()}]});
    add.command("CHECK")
        .exec(&node, &with_prev(&good, &fake_prev))?
        .err(103);
    Ok(())
}

#[test]
fn chained_after_ptp_registers_ptps_host_veth() -> Result<()> {
    if !require_root("chained_after_ptp_registers_ptps_host_veth") {
        return Ok(());
    }
    let node = node_ns()?;
    let pod = Netns::new("ptp")?;
    let agent = FakeAgent::start()?;
    let ipam = HostLocal::new()?;
    // Debian's ptp speaks up to 1.0.0: the whole list is 1.0.0.
    let ptp = json!({"cniVersion": "1.0.0", "name": "ptpnet", "type": "ptp", "ipam": ipam.ipam(&[&["10.99.6.0/24"]])});
    let weft = json!({"cniVersion": "1.0.0", "name": "ptpnet", "type": "weft-cni", "agentSocket": agent.socket_str()});
    let call = Call::new("ADD", "chain-1", &pod.path());
    let ptp_bin = format!("{CNI_BIN_DIR}/ptp");

    let prev = call.exec_in(&node, &ptp_bin, &ptp)?.ok();
    let out = call.exec(&node, &with_prev(&weft, &prev))?.ok();
    assert_eq!(out, prev, "prevResult passes through unchanged");

    let ptp_host = prev["interfaces"]
        .as_array()
        .and_then(|a| {
            a.iter().find(|i| {
                i.get("sandbox")
                    .is_none_or(|s| s.as_str().unwrap_or("").is_empty())
            })
        })
        .and_then(|i| i["name"].as_str())
        .unwrap_or_default()
        .to_string();
    let added = adds(&agent);
    assert_eq!(added.len(), 1);
    assert!(added[0].chained);
    assert_eq!(added[0].host_ifname, ptp_host);
    assert_eq!(added[0].host_ifindex, node.ifindex(&ptp_host)?);
    assert_eq!(added[0].ips, result_ips(&prev));
    assert!(
        !node.links()?.iter().any(|l| l.starts_with("lxc")),
        "chained mode creates nothing"
    );

    // CHECK and DEL in the chain's order (DEL runs in reverse).
    let with = with_prev(&weft, &out);
    call.command("CHECK").exec(&node, &with)?.ok();
    call.command("DEL").exec(&node, &with)?.ok();
    call.command("DEL")
        .exec_in(&node, &ptp_bin, &with_prev(&ptp, &prev))?
        .ok();
    call.command("DEL").exec(&node, &with)?.ok();
    let del = agent.requests().into_iter().find_map(|r| match r {
        Request::Del(d) => Some(d),
        _ => None,
    });
    assert_eq!(
        del.and_then(|d| d.host_ifindex),
        Some(added[0].host_ifindex)
    );

    // Chained without a veth behind CNI_IFNAME → 103.
    let empty = Netns::new("ptp2")?;
    let msg = Call::new("ADD", "chain-2", &empty.path())
        .exec(&node, &with_prev(&weft, &prev))?
        .err(103);
    assert!(msg.contains("eth0"), "{msg}");
    Ok(())
}

#[test]
fn version_output() -> Result<()> {
    if !require_root("version_output") {
        return Ok(());
    }
    let node = Netns::new("ver")?;
    let mut call = Call::new("VERSION", "", "");
    call.netns = None;
    let v = call.exec(&node, &json!({"cniVersion": "1.0.0"}))?.ok();
    assert_eq!(
        v,
        json!({"cniVersion": "1.0.0", "supportedVersions": ["1.0.0", "1.1.0"]})
    );
    Ok(())
}

#[test]
fn status_follows_the_agent() -> Result<()> {
    if !require_root("status_follows_the_agent") {
        return Ok(());
    }
    let node = Netns::new("status")?;
    let agent = FakeAgent::start()?;
    let ipam = HostLocal::new()?;
    let mut call = Call::new("STATUS", "", "");
    call.netns = None;
    let up = conf(
        "1.1.0",
        &agent.socket_str(),
        ipam.ipam(&[&["10.99.7.0/24"]]),
    );
    assert_eq!(call.exec(&node, &up)?.ok(), Value::Null);
    assert!(agent.requests().contains(&Request::Status));

    agent.set_ready(false);
    let msg = call.exec(&node, &up)?.err(50);
    assert!(msg.contains("datapath not loaded yet"), "{msg}");

    let down = conf(
        "1.1.0",
        "/run/weft-test-nobody/cni.sock",
        ipam.ipam(&[&["10.99.7.0/24"]]),
    );
    let msg = call.exec(&node, &down)?.err(50);
    assert!(
        msg.contains("/run/weft-test-nobody/cni.sock") && msg.contains("weft-cni-agent"),
        "{msg}"
    );

    // STATUS is a 1.1.0 command.
    let mut old = up.clone();
    old["cniVersion"] = json!("1.0.0");
    call.exec(&node, &old)?.err(1);
    Ok(())
}

#[test]
fn gc_tells_the_agent_and_delegates_to_an_ipam_that_has_gc() -> Result<()> {
    if !require_root("gc_tells_the_agent_and_delegates_to_an_ipam_that_has_gc") {
        return Ok(());
    }
    let node = Netns::new("gc")?;
    let agent = FakeAgent::start()?;
    // An IPAM plugin that speaks 1.1.0 and records what it was asked.
    let bin = tempfile::tempdir()?;
    let script = bin.path().join("recording-ipam");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\ncat > {dir}/$CNI_COMMAND.stdin\nif [ \"$CNI_COMMAND\" = VERSION ]; then echo '{{\"cniVersion\":\"1.1.0\",\"supportedVersions\":[\"1.0.0\",\"1.1.0\"]}}'; fi\n",
            dir = bin.path().display()
        ),
    )?;
    std::process::Command::new("chmod")
        .args(["+x"])
        .arg(&script)
        .status()?;
    let mut gc_conf = conf(
        "1.1.0",
        &agent.socket_str(),
        json!({"type": "recording-ipam"}),
    );
    gc_conf["cni.dev/valid-attachments"] = json!([{"containerID": "keep-1", "ifname": "eth0"}]);
    let mut call = Call::new("GC", "", "");
    call.netns = None;
    call.path = Some(format!("{}:{CNI_BIN_DIR}", bin.path().display()));
    call.exec(&node, &gc_conf)?.ok();

    let seen: Value = serde_json::from_slice(&std::fs::read(bin.path().join("GC.stdin"))?)?;
    assert_eq!(
        seen["cni.dev/valid-attachments"][0]["containerID"],
        "keep-1"
    );
    assert_eq!(seen["cniVersion"], "1.1.0");
    let gc = agent.requests().into_iter().find_map(|r| match r {
        Request::Gc(g) => Some(g),
        _ => None,
    });
    let gc = gc.expect("agent got GC");
    assert_eq!(gc.valid_attachments.len(), 1);
    assert_eq!(gc.valid_attachments[0].container_id, "keep-1");

    // host-local (1.0.0 only) has no GC: skipped, GC still succeeds; no agent is fine too.
    let hl = HostLocal::new()?;
    let mut plain = conf(
        "1.1.0",
        "/run/weft-test-nobody/cni.sock",
        hl.ipam(&[&["10.99.8.0/24"]]),
    );
    plain["cni.dev/valid-attachments"] = json!([]);
    call.path = Some(CNI_BIN_DIR.into());
    call.exec(&node, &plain)?.ok();
    Ok(())
}

#[test]
fn thousand_add_del_cycles_leave_nothing_behind() -> Result<()> {
    if !require_root("thousand_add_del_cycles_leave_nothing_behind") {
        return Ok(());
    }
    const CYCLES: usize = 1000;
    const THROUGH_BINARY: usize = 50;
    let node = node_ns()?;
    let pod = Netns::new("cycle")?;
    let agent = FakeAgent::start()?;
    let ipam = HostLocal::new()?;
    let conf = conf(
        "1.1.0",
        &agent.socket_str(),
        ipam.ipam(&[&["10.99.9.0/24"], &["fd00:99:9::/64"]]),
    );
    let links_before = node.links()?;
    let routes_before = node.routes()?;
    let started = Instant::now();

    // Some cycles through the real binary, as a runtime would run them.
    for i in 0..THROUGH_BINARY {
        let call = Call::new("ADD", &format!("cycle-{i}"), &pod.path());
        let res = call.exec(&node, &conf)?.ok();
        call.command("DEL")
            .exec(&node, &with_prev(&conf, &res))?
            .ok();
    }
    // The rest in-process through the library entry point, on one thread in the node.
    let path = pod.path();
    let in_process = node.run(|| -> Result<()> {
        for i in THROUGH_BINARY..CYCLES {
            let call = Call::new("ADD", &format!("cycle-{i}"), &path);
            let res = call.run_here(&conf);
            anyhow::ensure!(res.code == 0, "cycle {i} ADD: {}", res.stdout);
            let del = call.command("DEL").run_here(&with_prev(&conf, &res.json()));
            anyhow::ensure!(del.code == 0, "cycle {i} DEL: {}", del.stdout);
        }
        Ok(())
    })?;
    in_process?;
    let elapsed = started.elapsed();
    eprintln!("{CYCLES} ADD/DEL cycles ({THROUGH_BINARY} through the binary) took {elapsed:?}");

    assert_eq!(node.links()?, links_before, "interfaces left on the node");
    assert_eq!(
        pod.links()?,
        vec!["lo".to_string()],
        "interfaces left in the pod"
    );
    assert_eq!(node.routes()?, routes_before, "routes left on the node");
    assert!(
        ipam.leases()?.is_empty(),
        "leases left: {:?}",
        ipam.leases()?
    );
    let files: Vec<_> = std::fs::read_dir(agent.socket.parent().expect("dir"))?.collect();
    assert_eq!(files.len(), 1, "only the agent's socket in its dir");
    let requests = agent.requests();
    assert_eq!(
        requests
            .iter()
            .filter(|r| matches!(r, Request::Add(_)))
            .count(),
        CYCLES
    );
    assert_eq!(
        requests
            .iter()
            .filter(|r| matches!(r, Request::Del(_)))
            .count(),
        CYCLES
    );
    Ok(())
}

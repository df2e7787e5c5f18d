//! The CNI plugin's input: the network configuration on stdin with its `prevResult`
//! (`config::NetConf::parse`, `result::CniResult`), CNI 1.0.0 and 1.1.0, and the `CNI_*`
//! environment (`env::Invocation::parse`, `CNI_ARGS`).
//!
//! Beyond "no panic": a configuration that parses survives being written back (what weft-cni
//! hands a delegated IPAM plugin) and its `prevResult` round-trips, and the pure planning
//! steps that follow parsing accept whatever parsing accepted.

use proptest::collection::vec;
use proptest::prelude::*;
use serde_json::{json, Value};
use weft_cni::config::{sniff_version, NetConf};
use weft_cni::env::{parse_args, vars, Command, EnvMap, Invocation};
use weft_cni::plan;
use weft_cni::result::CniResult;
use weft_fuzz::{fuzz, mutate};

fn prev_result(version: &str) -> Value {
    json!({
        "cniVersion": version,
        "interfaces": [
            { "name": "cali1234567890a", "mac": "ee:ee:ee:ee:ee:ee" },
            { "name": "eth0", "mac": "0a:58:0a:f4:01:05", "mtu": 1450,
              "sandbox": "/var/run/netns/cni-1b2c3d4e-aaaa-bbbb-cccc-1234567890ab" }
        ],
        "ips": [
            { "address": "10.244.1.5/24", "gateway": "10.244.1.1", "interface": 1 },
            { "address": "fd00:10:244:1::5/64", "gateway": "fd00:10:244:1::1", "interface": 1 }
        ],
        "routes": [
            { "dst": "0.0.0.0/0", "gw": "10.244.1.1" },
            { "dst": "::/0", "mtu": 1400, "priority": 100, "table": 254, "scope": 0 }
        ],
        "dns": { "nameservers": ["10.96.0.10"], "domain": "cluster.local",
                 "search": ["default.svc.cluster.local", "svc.cluster.local"], "options": ["ndots:5"] }
    })
}

fn seeds() -> Vec<Value> {
    vec![
        // Chained after the primary plugin (the usual conflist), 1.0.0.
        json!({
            "cniVersion": "1.0.0",
            "name": "k8s-pod-network",
            "type": "weft-cni",
            "agentSocket": "/run/weft/cni.sock",
            "agentTimeoutMs": 10000,
            "prevResult": prev_result("1.0.0"),
        }),
        // 1.1.0, primary with host-local IPAM.
        json!({
            "cniVersion": "1.1.0",
            "name": "weft",
            "type": "weft-cni",
            "mtu": 1450,
            "ipMasq": false,
            "ipam": {
                "type": "host-local",
                "ranges": [[{ "subnet": "10.244.1.0/24" }], [{ "subnet": "fd00:10:244:1::/64" }]],
                "routes": [{ "dst": "0.0.0.0/0" }],
                "dataDir": "/var/lib/cni/networks"
            },
        }),
        // GC with the attachments still in use.
        json!({
            "cniVersion": "1.1.0",
            "name": "weft",
            "type": "weft-cni",
            "ipam": { "type": "host-local" },
            "cni.dev/valid-attachments": [
                { "containerID": "0123456789abcdef", "ifname": "eth0" },
                { "containerID": "fedcba9876543210", "ifname": "net1" }
            ],
        }),
        // An IPAM plugin's abbreviated result as prevResult (no interfaces).
        json!({
            "cniVersion": "1.0.0",
            "name": "weft",
            "type": "weft-cni",
            "prevResult": { "cniVersion": "1.0.0", "ips": [{ "address": "192.168.0.9/16" }] },
        }),
    ]
}

fn check(bytes: &[u8]) -> Result<(), String> {
    let _ = sniff_version(bytes);
    let Ok(conf) = NetConf::parse(bytes) else {
        return Ok(());
    };
    // What a delegated plugin receives parses to the same configuration. (A block: the
    // copy is dropped before the checks below, so that the peak allocation measured is the
    // parser's, not this check's own copies held at once.)
    {
        let again = NetConf::parse(&conf.to_bytes_with_version(&conf.cni_version))
            .map_err(|e| format!("the configuration written back does not parse: {e}"))?;
        if (
            again.name.as_str(),
            again.mtu,
            &again.prev_result,
            &again.ipam_type,
        ) != (
            conf.name.as_str(),
            conf.mtu,
            &conf.prev_result,
            &conf.ipam_type,
        ) {
            return Err("the configuration written back parses differently".into());
        }
    }
    for command in [Command::Add, Command::Del, Command::Check, Command::Gc] {
        let _ = plan::mode(command, &conf);
    }
    if let Some(prev) = &conf.prev_result {
        let text = serde_json::to_vec(prev).map_err(|e| e.to_string())?;
        let back = CniResult::parse(&text, "prevResult")
            .map_err(|e| format!("prevResult written back does not parse: {e}"))?;
        if &back != prev {
            return Err(format!(
                "prevResult does not round-trip: {prev:?} -> {back:?}"
            ));
        }
        for ip in &prev.ips {
            let _ = ip.address.network();
        }
        let _ = plan::plan(prev, "fuzz");
        let idx = prev.sandbox_interface("eth0", None);
        let _ = prev.ips_of(idx);
        let _ = plan::attachment_ips(prev, "eth0", Some("/var/run/netns/x"));
        let _ = plan::pass_through(
            conf.prev_result_raw.as_ref().unwrap_or(&Value::Null),
            "1.1.0",
        );
    }
    Ok(())
}

#[test]
fn seeds_parse() {
    for (i, s) in seeds().iter().enumerate() {
        let bytes = serde_json::to_vec(s).expect("json");
        NetConf::parse(&bytes).unwrap_or_else(|e| panic!("seed {i}: {e}"));
        check(&bytes).unwrap_or_else(|e| panic!("seed {i}: {e}"));
    }
}

#[test]
fn config_mutated_as_trees() {
    fuzz("cni::config", mutate::mutated_json(seeds(), 6), |conf| {
        check(&serde_json::to_vec(conf).map_err(|e| e.to_string())?)
    });
}

#[test]
fn config_bytes() {
    let seeds: Vec<Vec<u8>> = seeds()
        .iter()
        .map(|s| serde_json::to_vec_pretty(s).expect("json"))
        .collect();
    let tokens = [
        "{", "}", "[", "]", "\"", ",", ":", "null", "/", "::", "1.1.0", "/0", "/129",
    ]
    .iter()
    .map(|t| t.as_bytes().to_vec())
    .collect();
    fuzz(
        "cni::config_bytes",
        mutate::mutated_bytes(seeds, tokens, 6),
        |b| check(b),
    );
}

fn env_value() -> impl Strategy<Value = String> {
    let samples: Vec<String> = [
        "ADD", "DEL", "CHECK", "VERSION", "STATUS", "GC", "add", "",
        "0123456789abcdef0123456789abcdef", "/var/run/netns/cni-1234", "eth0", "net1",
        "a-very-long-interface-name", "eth0/", ".", "..", "lo",
        "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-0;K8S_POD_INFRA_CONTAINER_ID=abc",
        "K8S_POD_NAMESPACE=;=x;;a", "/opt/cni/bin:/usr/libexec/cni", ":", "\u{0}",
    ]
    .into_iter()
    .map(String::from)
    .collect();
    prop_oneof![
        3 => prop::sample::select(samples.clone()),
        2 => mutate::mutated_text(samples, vec!["=".into(), ";".into(), ":".into()], 3),
        1 => "\\PC{0,24}",
    ]
}

#[test]
fn environment() {
    let names = vec![
        vars::COMMAND,
        vars::CONTAINER_ID,
        vars::NETNS,
        vars::IFNAME,
        vars::ARGS,
        vars::PATH,
    ];
    let strategy = vec((prop::sample::select(names), env_value()), 0..8).prop_map(|p| {
        p.into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect::<Vec<_>>()
    });
    fuzz("cni::env", strategy, |pairs| {
        let env: EnvMap = pairs.iter().cloned().collect();
        let _ = Invocation::parse(&env);
        for (_, v) in pairs {
            let _ = parse_args(v);
        }
        Ok(())
    });
}

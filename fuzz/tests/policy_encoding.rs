//! The eBPF map encoding of NetworkPolicies: the model's compiler (`netpol::compile`), the
//! conversion (`weft_datapath::Entry::from`) and the datapath's key/value encoding
//! (`Entry::encode`, and `replace_policy`'s whole-set check through [`FakeMaps`]).
//!
//! Properties beyond "no panic": an entry encodes exactly when it is valid; its key's prefix
//! length is the fixed 64 bits plus the entry's (so at most 96 or 192), its address has no
//! bits past the prefix, and decoding the key and value gives the entry back (with host bits
//! cleared); whatever the compiler produces from any policies encodes as a set.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use proptest::collection::vec;
use proptest::prelude::*;
use serde_json::{json, Value};
use weft_datapath::abi::{PolicyValue, MAX_PORT_RANGES, POLICY_FIXED_PREFIX};
use weft_datapath::{Direction, Entry, FakeMaps, PolicyKey, PolicyMaps, PortRange, Protocol};
use weft_fuzz::{fuzz, mutate, InputSize};
use weft_model::netpol::testing::{e2e, random};
use weft_model::netpol::{assign_policy_ids, compile, CompileError, World};

/// An entry and the endpoint id it is encoded for.
#[derive(Clone, Debug)]
struct Case {
    ep_id: u32,
    entries: Vec<Entry>,
}

impl InputSize for Case {
    fn input_size(&self) -> usize {
        self.entries.iter().map(|e| 24 + 8 * e.ranges.len()).sum()
    }
}

fn entry() -> impl Strategy<Value = Entry> {
    let addr = prop_oneof![
        any::<u32>().prop_map(|a| IpAddr::V4(Ipv4Addr::from(a))),
        any::<u128>().prop_map(|a| IpAddr::V6(Ipv6Addr::from(a))),
        Just(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1))),
    ];
    let range = prop_oneof![
        (any::<u16>(), any::<u16>(), any::<u32>()).prop_map(|(lo, hi, policy)| PortRange {
            lo,
            hi,
            policy
        }),
        (any::<u16>(), any::<u32>()).prop_map(|(p, policy)| PortRange {
            lo: p,
            hi: p,
            policy
        }),
    ];
    (
        prop::sample::select(vec![Direction::Ingress, Direction::Egress]),
        prop::sample::select(vec![
            Protocol::Any,
            Protocol::Tcp,
            Protocol::Udp,
            Protocol::Sctp,
        ]),
        addr,
        prop_oneof![0u8..=33, 0u8..=129, any::<u8>()],
        prop_oneof![vec(range.clone(), 0..4), vec(range, 28..36)],
    )
        .prop_map(|(direction, proto, addr, prefix_len, ranges)| Entry {
            direction,
            proto,
            addr,
            prefix_len,
            ranges,
        })
}

fn max_prefix(addr: IpAddr) -> u8 {
    if addr.is_ipv4() {
        32
    } else {
        128
    }
}

fn valid(e: &Entry) -> bool {
    e.prefix_len <= max_prefix(e.addr)
        && e.ranges.len() <= MAX_PORT_RANGES
        && e.ranges.iter().all(|r| r.lo <= r.hi)
}

/// The entry with its address's host bits cleared: what a key can give back.
fn canonical(e: &Entry) -> Entry {
    let mask = |width: u32| -> u128 {
        let len = u32::from(e.prefix_len).min(width);
        if len == 0 {
            0
        } else {
            (u128::MAX << (128 - len)) >> (128 - width)
        }
    };
    let addr = match e.addr {
        IpAddr::V4(a) => IpAddr::V4(Ipv4Addr::from(u32::from(a) & mask(32) as u32)),
        IpAddr::V6(a) => IpAddr::V6(Ipv6Addr::from(u128::from(a) & mask(128))),
    };
    Entry { addr, ..e.clone() }
}

/// The inverse of `Entry::encode`, written from the map layout (abi.rs / the C header).
fn decode(key: &PolicyKey, value: &PolicyValue) -> Result<(u32, Entry), String> {
    let (prefix_len, ep_id_be, direction, proto, pad, addr, width) = match key {
        PolicyKey::V4 { prefix_len, data } => (
            *prefix_len,
            data.ep_id_be,
            data.direction,
            data.proto,
            data.pad,
            IpAddr::V4(Ipv4Addr::from(data.addr)),
            32,
        ),
        PolicyKey::V6 { prefix_len, data } => (
            *prefix_len,
            data.ep_id_be,
            data.direction,
            data.proto,
            data.pad,
            IpAddr::V6(Ipv6Addr::from(data.addr)),
            128,
        ),
    };
    if !(POLICY_FIXED_PREFIX..=POLICY_FIXED_PREFIX + width).contains(&prefix_len) {
        return Err(format!("key prefix length {prefix_len} out of bounds"));
    }
    if pad != 0 {
        return Err(format!("key padding {pad} is not zero"));
    }
    let direction = Direction::from_u8(direction).ok_or(format!("direction byte {direction}"))?;
    let proto = match proto {
        0 => Protocol::Any,
        6 => Protocol::Tcp,
        17 => Protocol::Udp,
        132 => Protocol::Sctp,
        p => return Err(format!("protocol byte {p}")),
    };
    let count = value.count as usize;
    if count > MAX_PORT_RANGES {
        return Err(format!("value count {count} out of bounds"));
    }
    if value.ranges[count..]
        .iter()
        .any(|r| *r != Default::default())
    {
        return Err("value has ranges past its count".into());
    }
    let ranges = value.ranges[..count]
        .iter()
        .map(|r| PortRange {
            lo: r.lo,
            hi: r.hi,
            policy: r.policy,
        })
        .collect();
    Ok((
        u32::from_be(ep_id_be),
        Entry {
            direction,
            proto,
            addr,
            prefix_len: (prefix_len - POLICY_FIXED_PREFIX) as u8,
            ranges,
        },
    ))
}

fn check_entries(ep_id: u32, entries: &[Entry]) -> Result<(), String> {
    let mut keys = BTreeSet::new();
    let mut all_valid = true;
    for (i, e) in entries.iter().enumerate() {
        let encoded = e.encode(ep_id, i);
        match (&encoded, valid(e)) {
            (Ok((key, value)), true) => {
                let (id, back) = decode(key, value)?;
                if id != ep_id {
                    return Err(format!("endpoint {ep_id} decodes as {id}"));
                }
                if back != canonical(e) {
                    return Err(format!("{e} decodes as {back}"));
                }
                if key.ep_id() != ep_id {
                    return Err("PolicyKey::ep_id disagrees".into());
                }
                keys.insert(*key);
            }
            (Err(_), false) => all_valid = false,
            (Ok(_), false) => return Err(format!("invalid entry {e} encoded")),
            (Err(err), true) => return Err(format!("valid entry {e} refused: {err}")),
        }
    }
    // The whole set: accepted exactly when every entry is valid and no two share a key.
    let mut maps = FakeMaps::new();
    let whole = maps.replace_policy(ep_id, entries);
    let want = all_valid && keys.len() == entries.len();
    if whole.is_ok() != want {
        return Err(format!(
            "replace_policy said {whole:?}, expected {}",
            if want { "Ok" } else { "an error" }
        ));
    }
    Ok(())
}

#[test]
fn entries_encode_exactly_when_valid_and_round_trip() {
    let strategy =
        (any::<u32>(), vec(entry(), 0..6)).prop_map(|(ep_id, entries)| Case { ep_id, entries });
    fuzz("policy::encode", strategy, |c| {
        check_entries(c.ep_id, &c.entries)
    });
}

/// A world generated by the model's own strategies, with its size for the allocation bound.
#[derive(Clone, Debug)]
struct Generated(random::GeneratedWorld);

impl InputSize for Generated {
    fn input_size(&self) -> usize {
        format!("{:?}", self.0).len()
    }
}

fn compile_and_encode(world: &World) -> Result<(), String> {
    let ids = assign_policy_ids(world.policies());
    let local: Vec<_> = world.pods().map(|p| p.key.clone()).collect();
    let compiled = match compile(world, &local, &ids) {
        Ok(c) => c,
        // The one refusal the compiler may make: it names the endpoint and the limit.
        Err(CompileError::TooManyRanges { .. }) => return Ok(()),
        Err(e) => return Err(format!("compile: {e}")),
    };
    for (i, (key, ep)) in compiled.iter().enumerate() {
        let entries: Vec<Entry> = ep.entries.iter().map(Entry::from).collect();
        if entries.iter().any(|e| !valid(e)) {
            return Err(format!("{key}: the compiler produced an invalid entry"));
        }
        check_entries(i as u32 + 1, &entries)?;
        let mut maps = FakeMaps::new();
        maps.replace_policy(i as u32 + 1, &entries)
            .map_err(|e| format!("{key}: compiled entries refused: {e}"))?;
    }
    Ok(())
}

#[test]
fn compiled_worlds_encode() {
    let strategy = random::model_layout()
        .prop_flat_map(random::world)
        .prop_map(Generated);
    fuzz("policy::compile", strategy, |g| {
        compile_and_encode(&g.0.world())
    });
}

fn k8s_policies() -> Vec<Value> {
    vec![
        json!({
            "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": { "name": "allow", "namespace": "x" },
            "spec": {
                "podSelector": { "matchLabels": { "pod": "a" } },
                "policyTypes": ["Ingress", "Egress"],
                "ingress": [{
                    "from": [
                        { "namespaceSelector": { "matchLabels": { "ns": "y" } },
                          "podSelector": { "matchExpressions": [{ "key": "pod", "operator": "In", "values": ["b", "c"] }] } },
                        { "ipBlock": { "cidr": "10.0.0.0/8", "except": ["10.1.0.0/16"] } }
                    ],
                    "ports": [{ "protocol": "TCP", "port": 80 }, { "protocol": "UDP", "port": 81, "endPort": 90 },
                              { "port": "serve-80-tcp" }]
                }],
                "egress": [{
                    "to": [{ "ipBlock": { "cidr": "::/0", "except": ["fd00::/8"] } }],
                    "ports": [{ "protocol": "SCTP", "port": 80 }]
                }, { "to": [{ "podSelector": {} }] }]
            }
        }),
        json!({
            "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": { "name": "deny-all", "namespace": "y" },
            "spec": { "podSelector": {}, "policyTypes": ["Ingress", "Egress"] }
        }),
        json!({
            "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": { "name": "ports", "namespace": "z" },
            "spec": {
                "podSelector": { "matchExpressions": [{ "key": "pod", "operator": "NotIn", "values": ["a"] }] },
                "ingress": [{ "ports": [{ "port": 1, "endPort": 65535 }, { "port": 53, "protocol": "UDP" }] }]
            }
        }),
    ]
}

#[test]
fn k8s_policies_convert_compile_and_encode() {
    let strategy = vec(mutate::mutated_json(k8s_policies(), 6), 1..4);
    fuzz("policy::k8s", strategy, |docs| {
        let mut policies = Vec::new();
        for d in docs {
            let Ok(p) = serde_json::from_value(d.clone()) else {
                continue;
            };
            if let Ok(p) = weft_model::convert::network_policy(&p, "default") {
                policies.push(p);
            }
        }
        compile_and_encode(&e2e::e2e_world(policies))
    });
}

#[test]
fn k8s_seeds_convert_and_compile_to_entries() {
    let policies: Vec<_> = k8s_policies()
        .iter()
        .map(|d| {
            let p = serde_json::from_value(d.clone()).expect("k8s NetworkPolicy");
            weft_model::convert::network_policy(&p, "default").expect("converts")
        })
        .collect();
    let world = e2e::e2e_world(policies);
    let ids = assign_policy_ids(world.policies());
    let local: Vec<_> = world.pods().map(|p| p.key.clone()).collect();
    let compiled = compile(&world, &local, &ids).expect("compiles");
    assert!(compiled.values().map(|e| e.entries.len()).sum::<usize>() > 10);
    compile_and_encode(&world).expect("encodes");
}

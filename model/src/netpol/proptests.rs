//! The compiled datapath against the reference evaluator, on random worlds:
//! namespaces with labels (some only implicit), pods with labels, addresses
//! from a small shared pool (so ipBlocks, excepts and pod addresses
//! overlap), named container ports on several protocols, meshed pods, and
//! policies using every feature. Every connection between every pair of
//! peers (pods by key, pod and outside addresses) on a few ports and
//! protocols must get the same answer from `evaluate` and from
//! `datapath_verdict` over `compile`, and the range that allows it must
//! carry the id of the policy the evaluator names. The worlds come from
//! [`super::testing::random`], which weft-datapath's differential test
//! shares.

use std::net::{IpAddr, Ipv4Addr};

use proptest::prelude::*;

use super::testing::random::{self, pool_v4, pool_v6, GeneratedWorld, PORTS};
use super::*;
use crate::ObjectKey;

/// Addresses used as peers directly: two from the pool (maybe a pod's,
/// maybe free), one outside every generated prefix but /0, and one v6.
fn addresses() -> impl Strategy<Value = Vec<IpAddr>> {
    (0u8..16, 0u8..16, 0u16..8).prop_map(|(a, b, c)| {
        vec![
            pool_v4(a),
            pool_v4(b),
            IpAddr::V4(Ipv4Addr::new(192, 168, 7, 7)),
            pool_v6(c),
        ]
    })
}

fn check_world(generated: GeneratedWorld, addresses: Vec<IpAddr>) -> Result<(), TestCaseError> {
    let world = generated.world();
    let ids = assign_policy_ids(world.policies());
    let keys: Vec<ObjectKey> = world.pods().map(|p| p.key.clone()).collect();
    let compiled = match compile(&world, &keys, &ids) {
        Ok(c) => c,
        Err(CompileError::TooManyRanges { .. }) => {
            return Err(TestCaseError::reject(
                "more port ranges than the datapath holds",
            ))
        }
        Err(e) => return Err(TestCaseError::fail(e.to_string())),
    };
    let peers: Vec<Peer> = keys
        .iter()
        .cloned()
        .map(Peer::Pod)
        .chain(addresses.into_iter().map(Peer::Ip))
        .collect();
    let protocols = [
        Protocol::Tcp,
        Protocol::Udp,
        Protocol::Sctp,
        Protocol::Other(1),
    ];
    for src in &peers {
        for dst in &peers {
            for protocol in protocols {
                for port in PORTS {
                    let conn = Connection {
                        src: src.clone(),
                        dst: dst.clone(),
                        port,
                        protocol,
                    };
                    let verdict =
                        evaluate(&world, &conn).map_err(|e| TestCaseError::fail(e.to_string()))?;
                    if verdict.src.ip.is_none() || verdict.dst.ip.is_none() {
                        // A v4-only pod and a v6 address: no such connection.
                        continue;
                    }
                    let datapath = datapath_verdict(&world, &compiled, &conn)
                        .map_err(|e| TestCaseError::fail(e.to_string()))?;
                    prop_assert_eq!(
                        verdict.allowed,
                        datapath,
                        "{:?}\nevaluator: {}\n",
                        conn,
                        verdict
                    );
                    if verdict.loopback {
                        continue;
                    }
                    // The allowing range names the evaluator's policy.
                    for (direction, at, peer, v) in [
                        (
                            Direction::Egress,
                            &verdict.src,
                            &verdict.dst,
                            &verdict.egress,
                        ),
                        (
                            Direction::Ingress,
                            &verdict.dst,
                            &verdict.src,
                            &verdict.ingress,
                        ),
                    ] {
                        let DirectionVerdict::Allowed { policy, .. } = v else {
                            continue;
                        };
                        let (Some(key), Some(peer_ip)) = (&at.pod, peer.ip) else {
                            continue;
                        };
                        let ep = &compiled[key];
                        prop_assert_eq!(
                            lookup(ep, direction, protocol, peer_ip, port),
                            ids.get(policy).copied(),
                            "{:?} {}: {}",
                            conn,
                            direction,
                            verdict
                        );
                    }
                }
            }
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 768, ..ProptestConfig::default() })]

    #[test]
    fn datapath_agrees_with_the_evaluator(
        generated in random::model_layout().prop_flat_map(random::world),
        addresses in addresses(),
    ) {
        check_world(generated, addresses)?;
    }
}

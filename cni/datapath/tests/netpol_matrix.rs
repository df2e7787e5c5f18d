//! Kubernetes' NetworkPolicy e2e truth tables through the real eBPF datapath (issue 13,
//! "Tests and figures"). Needs root: skips otherwise, fails when CI=true.
//!
//! The tables are weft-model's (`weft_model::netpol::testing::e2e`, the same ones the model
//! checks against its evaluator and compiler): namespaces x, y, z with pods a, b, c, here nine
//! network namespaces at the tables' addresses (10.0.<ns>.<pod>), each serving TCP and UDP
//! echo on 80 and 81. For each case the world is compiled and written as the agent would
//! (flags, entries, conntrack flushed), then every ordered pair of pods exchanges data on the
//! table's port and protocol, all pairs at once, and the observed reachability must be the
//! table's. Between them the cases use every NetworkPolicy feature: podSelector
//! (matchLabels, matchExpressions), namespaceSelector, both in one peer, ipBlock with except,
//! named ports (ingress and egress), endPort, ingress and egress, explicit and defaulted
//! policyTypes, allow rules as a union across policies, `kubernetes.io/metadata.name`. Every
//! exchange needs its reply, so replies of allowed connections passing an isolated
//! direction (conntrack) are checked throughout: x/a -> y/a under a default-deny ingress in
//! x only works when y/a's answer passes x/a's ingress. Successive cases replace each
//! other's policies, so removing a policy is exercised too.
//!
//! SCTP rows are skipped: this kernel may lack the sctp module (sockets cannot be created
//! without it, and it is not loadable in CI containers); what the tables say about SCTP is
//! checked against the compiled entries by the model's tests, and the programs' SCTP handling
//! on crafted packets by `prog_run.rs`. A failing table prints the expected and the observed
//! matrix the way the e2e suite does (rows: clients, columns: servers, `.` reached, `X` not),
//! the evaluator's reasons for each wrong cell and the entries of the pods involved.

mod world;

use std::net::{IpAddr, SocketAddr};
use std::time::Instant;

use anyhow::{bail, Result};
use weft_model::netpol::testing::e2e::{self, Matrix};
use weft_model::netpol::{evaluate, Connection, Peer, Protocol};
use world::{Cluster, PodSpec, Probe, Transport};

#[test]
fn e2e_truth_tables_hold_in_the_kernel() -> Result<()> {
    if !world::require_root("e2e_truth_tables_hold_in_the_kernel")? {
        return Ok(());
    }
    let started = Instant::now();
    let names = e2e::pod_names();
    let specs: Vec<PodSpec> = names
        .iter()
        .map(|n| {
            let key = e2e::key(n);
            let IpAddr::V4(v4) = e2e::pod_ip(&key.namespace, &key.name) else {
                unreachable!("e2e pods are IPv4")
            };
            PodSpec { key, v4, v6: None }
        })
        .collect();
    let ports = e2e::SERVED_PORTS;
    let mut cluster = Cluster::new("netpol-matrix", &specs, None, None, &ports, &ports)?;
    let built = started.elapsed();
    let sctp = world::sctp_available();

    let mut failures = Vec::new();
    let (mut tables, mut skipped) = (0, 0);
    let cases = e2e::cases();
    for case in &cases {
        let world = e2e::e2e_world(case.policies.clone());
        let installed = cluster
            .install(&world)
            .map_err(|e| anyhow::anyhow!("{}: {e}", case.name))?;
        for check in &case.checks {
            let transport = match check.protocol {
                Protocol::Tcp => Transport::Tcp,
                Protocol::Udp => Transport::Udp,
                _ => {
                    skipped += 1;
                    continue;
                }
            };
            tables += 1;
            let pairs: Vec<(&String, &String)> = names
                .iter()
                .flat_map(|a| names.iter().map(move |b| (a, b)))
                .filter(|(a, b)| a != b)
                .collect();
            let probes: Vec<Probe> = pairs
                .iter()
                .map(|(from, to)| {
                    let from = cluster.pod(&e2e::key(from)).expect("built");
                    let to = cluster.pod(&e2e::key(to)).expect("built");
                    Probe {
                        from_ns: from.ns.clone(),
                        from: IpAddr::V4(from.v4),
                        to: SocketAddr::new(IpAddr::V4(to.v4), check.port),
                        transport,
                    }
                })
                .collect();
            let want: Vec<bool> = pairs
                .iter()
                .map(|(a, b)| check.want.allowed(a, b))
                .collect();
            let got = cluster.probe(&probes, &want);
            if got == want {
                continue;
            }
            let mut observed = Matrix::all();
            let mut wrong = String::new();
            let mut involved: Vec<String> = Vec::new();
            for (i, (from, to)) in pairs.iter().enumerate() {
                observed = observed.set(from, to, got[i]);
                if got[i] == want[i] {
                    continue;
                }
                let conn = Connection {
                    src: Peer::Pod(e2e::key(from)),
                    dst: Peer::Pod(e2e::key(to)),
                    port: check.port,
                    protocol: check.protocol,
                };
                let verdict = match evaluate(&world, &conn) {
                    Ok(v) => v.to_string(),
                    Err(e) => e.to_string(),
                };
                wrong.push_str(&format!(
                    "  {from} -> {to}: want {}, the kernel {}; the evaluator says {verdict}\n",
                    if want[i] { "reached" } else { "not reached" },
                    if got[i] { "passed it" } else { "dropped it" },
                ));
                for p in [from, to] {
                    if !involved.contains(*p) {
                        involved.push((*p).clone());
                    }
                }
            }
            let entries: String = involved
                .iter()
                .map(|p| installed.describe(&e2e::key(p)))
                .collect();
            failures.push(format!(
                "{} on {}/{}:\nexpected:\n{}observed:\n{}wrong:\n{wrong}entries written:\n{entries}",
                case.name, check.port, check.protocol, check.want, observed
            ));
        }
    }
    eprintln!(
        "netpol_matrix: {} cases, {tables} tables of 72 pairs through the kernel, {skipped} SCTP \
         tables skipped (SCTP sockets {}); node {:.1?}, total {:.1?}",
        cases.len(),
        if sctp {
            "available but not probed"
        } else {
            "unavailable on this kernel"
        },
        built,
        started.elapsed()
    );
    if !failures.is_empty() {
        bail!(
            "{} of {tables} tables differ in the kernel:\n\n{}",
            failures.len(),
            failures.join("\n")
        );
    }
    Ok(())
}

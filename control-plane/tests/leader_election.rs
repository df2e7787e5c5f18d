//! Leader election for the status writer (`--leader-elect`) against the fake API server's
//! Leases: one of several candidates leads, a dead leader's lease is taken over once it
//! expires, and of two controllers on one cluster exactly one writes status.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::eventually;
use k8s_openapi::api::coordination::v1::Lease;
use serde_json::json;
use tokio::sync::watch;
use weft_controller::lease::{self, LeaseConfig};
use weft_controller::metrics::Metrics;
use weft_controller::runtime::{Config, Controller};
use weft_controller::source::SourceConfig;
use weft_controller::testing::fake_apiserver::{FakeApiServer, Resource};

const WITHIN: Duration = Duration::from_secs(10);

fn fast(identity: &str) -> LeaseConfig {
    LeaseConfig {
        duration: Duration::from_secs(2),
        renew: Duration::from_millis(300),
        retry: Duration::from_millis(200),
        ..LeaseConfig::new("weft", identity)
    }
}

fn candidate(
    fake: &FakeApiServer,
    identity: &str,
) -> (tokio::task::JoinHandle<()>, watch::Receiver<bool>, Metrics) {
    let (tx, rx) = watch::channel(false);
    let metrics = Metrics::new();
    let api = kube::Api::<Lease>::namespaced(fake.client().unwrap(), "weft");
    let task = tokio::spawn(lease::run(api, fast(identity), tx, metrics.clone()));
    (task, rx, metrics)
}

/// The leader gauge says 1.
fn leads(m: &Metrics) -> bool {
    m.encode().lines().any(|l| l == "weft_controller_leader 1")
}

fn holder(fake: &FakeApiServer) -> Option<(String, i64)> {
    let l = fake.get(Resource::Leases, "weft", "weft-controller-status")?;
    Some((
        l["spec"]["holderIdentity"].as_str()?.to_string(),
        l["spec"]["leaseTransitions"].as_i64().unwrap_or(0),
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_candidate_leads_and_a_dead_leaders_lease_is_taken_over() {
    let fake = FakeApiServer::start().await.unwrap();
    let candidates: Vec<_> = ["a", "b", "c"]
        .iter()
        .map(|id| candidate(&fake, id))
        .collect();
    eventually("a leader", WITHIN, || {
        candidates.iter().any(|(_, rx, _)| *rx.borrow())
    })
    .await;
    // Stable: for several renewals, exactly one leads, and it is the Lease's holder.
    for _ in 0..10 {
        let leaders: Vec<usize> = (0..3).filter(|i| *candidates[*i].1.borrow()).collect();
        assert_eq!(leaders.len(), 1, "leaders: {leaders:?}");
        let (h, _) = holder(&fake).unwrap();
        assert_eq!(h, ["a", "b", "c"][leaders[0]]);
        let gauges: Vec<f64> = candidates
            .iter()
            .map(|(_, _, m)| if leads(m) { 1.0 } else { 0.0 })
            .collect();
        assert_eq!(gauges.iter().sum::<f64>(), 1.0, "{gauges:?}");
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    let (first, transitions) = holder(&fake).unwrap();
    assert_eq!(transitions, 0);
    let i = ["a", "b", "c"].iter().position(|c| *c == first).unwrap();
    // The leader dies without releasing: another takes over after the lease expires (2 s).
    candidates[i].0.abort();
    let started = std::time::Instant::now();
    eventually("another leader", WITHIN, || {
        holder(&fake).is_some_and(|(h, _)| h != first)
            && candidates
                .iter()
                .enumerate()
                .any(|(j, (_, rx, _))| j != i && *rx.borrow())
    })
    .await;
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(1500),
        "took over after {took:?}, before the lease expired"
    );
    let (_, transitions) = holder(&fake).unwrap();
    assert_eq!(transitions, 1);
    let leaders = candidates
        .iter()
        .enumerate()
        .filter(|(j, (_, rx, _))| *j != i && *rx.borrow())
        .count();
    assert_eq!(leaders, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn of_two_controllers_one_writes_status() {
    let fake = FakeApiServer::start().await.unwrap();
    fake.apply(
        json!({"kind": "Service", "metadata": {"name": "web", "namespace": "shop"},
                      "spec": {"clusterIP": "10.96.0.1", "ports": [{"name": "http", "port": 80}]}}),
    );
    fake.apply(json!({"kind": "HTTPRoute", "metadata": {"name": "r", "namespace": "shop", "generation": 1},
                      "spec": {"parentRefs": [{"group": "", "kind": "Service", "name": "web", "port": 80}],
                               "rules": [{"backendRefs": [{"name": "web", "port": 80}]}]}}));
    let start = |id: &'static str| {
        let mut config = Config::loopback(SourceConfig::Kube);
        config.leader_election = Some(fast(id));
        Controller::start_with_client(config, Some(fake.client().unwrap()))
    };
    let (a, b) = (start("a").await.unwrap(), start("b").await.unwrap());
    eventually("status written", WITHIN, || {
        fake.get(Resource::HttpRoutes, "shop", "r")
            .is_some_and(|r| {
                r["status"]["parents"]
                    .as_array()
                    .is_some_and(|p| !p.is_empty())
            })
    })
    .await;
    let leading = |c: &Controller| leads(&c.metrics);
    eventually("one leader", WITHIN, || leading(&a) ^ leading(&b)).await;
    let writes = |c: &Controller| {
        c.metrics
            .encode()
            .lines()
            .find(|l| l.starts_with("weft_controller_status_writes_total{result=\"ok\"}"))
            .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    let (leader, follower) = if leading(&a) { (&a, &b) } else { (&b, &a) };
    // The counter moves once the API server's answer is back, which can be after the fake
    // already shows the status.
    eventually("the leader's write counted", WITHIN, || {
        writes(leader) >= 1.0
    })
    .await;
    assert_eq!(writes(follower), 0.0, "the follower wrote status");
    assert_eq!(
        fake.status_writes(Resource::HttpRoutes),
        writes(leader) as usize
    );
}

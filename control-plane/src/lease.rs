//! Leader election for the status writer, so that a highly available control plane (several
//! controller replicas, all serving proxies) has exactly one replica writing route and policy
//! status: the holder of a `coordination.k8s.io/v1` Lease.
//!
//! The algorithm is client-go's `leaderelection` with a Lease lock: read the Lease; create it
//! when missing; renew it while holding it; take it over once its holder has not renewed it
//! for `leaseDurationSeconds`; every write is an update with the resourceVersion that was
//! read, so two candidates racing for one Lease cannot both win (the loser gets 409 Conflict).
//! A leader that cannot renew before its lease would expire steps down first, so two writers
//! never overlap while the API server is reachable.
//!
//! Written here rather than with `kube-lease-manager` (the maintained kube 5 crate): that crate
//! takes the lock with server-side apply and detects a lost race from field-manager
//! conflicts, which the project's fake API server (and so the tests of this module) does not
//! model; the update-with-resourceVersion protocol is what Kubernetes' own components use
//! and needs only get, create and replace. The decision is the pure function [`decide`].

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, PostParams};
use tokio::sync::watch;

use crate::metrics::Metrics;

/// Where the lock lives and who we are.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaseConfig {
    pub namespace: String,
    pub name: String,
    /// This replica's identity (its pod name).
    pub identity: String,
    /// How long a lease is valid without renewal (client-go's default: 15 s).
    pub duration: Duration,
    /// How often the leader renews (must be well below `duration`; client-go: 10 s deadline,
    /// 2 s retry).
    pub renew: Duration,
    /// How often a follower tries to take the lease.
    pub retry: Duration,
}

impl LeaseConfig {
    pub fn new(namespace: &str, identity: &str) -> Self {
        Self {
            namespace: namespace.to_string(),
            name: "weft-controller-status".into(),
            identity: identity.to_string(),
            duration: Duration::from_secs(15),
            renew: Duration::from_secs(5),
            retry: Duration::from_secs(2),
        }
    }
}

/// What to do with the Lease as read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// No Lease: create it, held by us.
    Create,
    /// We hold it: renew.
    Renew,
    /// Its holder let it expire (or it has none): take it over.
    TakeOver { previous: Option<String> },
    /// Someone else holds it, and it is valid: wait.
    Follow { holder: String },
}

/// The decision for one round, from the Lease's spec (`None`: no Lease), our identity and
/// the time.
pub fn decide(spec: Option<&LeaseSpec>, me: &str, now: Timestamp) -> Action {
    let Some(spec) = spec else {
        return Action::Create;
    };
    let holder = spec.holder_identity.clone().filter(|h| !h.is_empty());
    match holder {
        Some(h) if h == me => Action::Renew,
        Some(h) => {
            // In microseconds, as renewTime is written (a MicroTime): whole seconds would let a
            // follower take over up to a second before the lease ends.
            let valid_until = spec.renew_time.as_ref().map(|t| {
                t.0.as_microsecond().saturating_add(
                    i64::from(spec.lease_duration_seconds.unwrap_or(0)).saturating_mul(1_000_000),
                )
            });
            match valid_until {
                Some(until) if until > now.as_microsecond() => Action::Follow { holder: h },
                _ => Action::TakeOver { previous: Some(h) },
            }
        }
        None => Action::TakeOver { previous: None },
    }
}

fn held_by(
    me: &str,
    duration: Duration,
    now: Timestamp,
    transitions: i32,
    acquired: Option<MicroTime>,
) -> LeaseSpec {
    LeaseSpec {
        holder_identity: Some(me.to_string()),
        lease_duration_seconds: Some(i32::try_from(duration.as_secs()).unwrap_or(i32::MAX)),
        acquire_time: Some(acquired.unwrap_or(MicroTime(now))),
        renew_time: Some(MicroTime(now)),
        lease_transitions: Some(transitions),
        ..LeaseSpec::default()
    }
}

/// Runs the election until the process ends: `leader` says whether this replica holds the
/// Lease now. Errors are logged and retried; a leader that has not renewed for 2/3 of the
/// lease duration steps down.
pub async fn run(
    api: Api<Lease>,
    config: LeaseConfig,
    leader: watch::Sender<bool>,
    metrics: Metrics,
) {
    let mut last_renewal: Option<tokio::time::Instant> = None;
    loop {
        let now = Timestamp::now();
        let outcome = round(&api, &config, now).await;
        let is_leader = match outcome {
            Ok(true) => {
                last_renewal = Some(tokio::time::Instant::now());
                true
            }
            Ok(false) => false,
            Err(e) => {
                // Keep leading only while the lease we last wrote is surely still ours.
                let safe = last_renewal.is_some_and(|t| t.elapsed() < config.duration * 2 / 3);
                tracing::warn!(lease = %config.name, error = %e, still_leader = safe && *leader.borrow(), "leader election: cannot read or write the Lease");
                safe && *leader.borrow()
            }
        };
        if !is_leader {
            last_renewal = None;
        }
        if *leader.borrow() != is_leader {
            tracing::info!(lease = %config.name, identity = %config.identity, leader = is_leader, "leader election: {}", if is_leader { "leading: this replica writes status" } else { "following: another replica writes status" });
            leader.send_replace(is_leader);
        }
        metrics.leader.set(i64::from(is_leader));
        tokio::time::sleep(if is_leader {
            config.renew
        } else {
            config.retry
        })
        .await;
    }
}

/// One round: `Ok(true)` when we hold the Lease after it.
async fn round(
    api: &Api<Lease>,
    config: &LeaseConfig,
    now: Timestamp,
) -> Result<bool, kube::Error> {
    let current = api.get_opt(&config.name).await?;
    let spec = current.as_ref().and_then(|l| l.spec.as_ref());
    let me = config.identity.as_str();
    let write = match decide(spec, me, now) {
        Action::Follow { .. } => return Ok(false),
        Action::Create => {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(config.name.clone()),
                    namespace: Some(config.namespace.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(held_by(me, config.duration, now, 0, None)),
            };
            return conflict_is_false(api.create(&PostParams::default(), &lease).await);
        }
        Action::Renew => {
            let s = spec.cloned().unwrap_or_default();
            held_by(
                me,
                config.duration,
                now,
                s.lease_transitions.unwrap_or(0),
                s.acquire_time,
            )
        }
        Action::TakeOver { previous } => {
            tracing::info!(lease = %config.name, ?previous, "leader election: taking over an expired lease");
            let transitions = spec.and_then(|s| s.lease_transitions).unwrap_or(0);
            held_by(
                me,
                config.duration,
                now,
                transitions.saturating_add(1),
                None,
            )
        }
    };
    let Some(mut lease) = current else {
        return Ok(false);
    };
    lease.spec = Some(write);
    // The resourceVersion read above makes this a compare-and-swap.
    conflict_is_false(
        api.replace(&config.name, &PostParams::default(), &lease)
            .await,
    )
}

/// A 409 (someone else wrote first) is a lost race, not an error.
fn conflict_is_false(r: Result<Lease, kube::Error>) -> Result<bool, kube::Error> {
    match r {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: i64) -> Timestamp {
        Timestamp::from_second(s).unwrap()
    }

    fn spec(holder: Option<&str>, renewed: i64, duration: i32) -> LeaseSpec {
        LeaseSpec {
            holder_identity: holder.map(String::from),
            renew_time: Some(MicroTime(at(renewed))),
            lease_duration_seconds: Some(duration),
            ..LeaseSpec::default()
        }
    }

    #[test]
    fn decisions() {
        assert_eq!(decide(None, "a", at(100)), Action::Create);
        assert_eq!(
            decide(Some(&spec(Some("a"), 0, 15)), "a", at(100)),
            Action::Renew
        );
        assert_eq!(
            decide(Some(&spec(Some("b"), 90, 15)), "a", at(100)),
            Action::Follow { holder: "b".into() }
        );
        // Expired: renewed at 80 for 15 s, now 100.
        assert_eq!(
            decide(Some(&spec(Some("b"), 80, 15)), "a", at(100)),
            Action::TakeOver {
                previous: Some("b".into())
            }
        );
        // Exactly at expiry it is expired.
        assert_eq!(
            decide(Some(&spec(Some("b"), 85, 15)), "a", at(100)),
            Action::TakeOver {
                previous: Some("b".into())
            }
        );
        // Sub-second: renewed at 100.9 for 2 s is valid until 102.9, not 102.0.
        let renewed = LeaseSpec {
            renew_time: Some(MicroTime(Timestamp::from_millisecond(100_900).unwrap())),
            ..spec(Some("b"), 0, 2)
        };
        for (ms, follows) in [(102_000, true), (102_899, true), (102_900, false)] {
            let got = decide(
                Some(&renewed),
                "a",
                Timestamp::from_millisecond(ms).unwrap(),
            );
            assert_eq!(
                got == Action::Follow { holder: "b".into() },
                follows,
                "at {ms} ms: {got:?}"
            );
        }
        // Released (no holder) or never renewed.
        assert_eq!(
            decide(Some(&spec(None, 99, 15)), "a", at(100)),
            Action::TakeOver { previous: None }
        );
        let never = LeaseSpec {
            holder_identity: Some("b".into()),
            ..LeaseSpec::default()
        };
        assert_eq!(
            decide(Some(&never), "a", at(100)),
            Action::TakeOver {
                previous: Some("b".into())
            }
        );
    }
}

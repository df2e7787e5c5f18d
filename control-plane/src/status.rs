//! Route and policy status: the verdicts of [`crate::index::outbound`]
//! (the same functions that decide what proxies get) written back where
//! users look.
//!
//! - Kube mode: for each HTTPRoute and GRPCRoute, one `status.parents[]`
//!   entry per Service parentRef with `controllerName: weft.dev/controller`
//!   and the conditions `Accepted` (reasons `Accepted`, `NoMatchingParent`,
//!   `UnsupportedValue`, `IncompatibleFilters`, `Conflicted`) and
//!   `ResolvedRefs` (`ResolvedRefs`, `BackendNotFound`, `InvalidKind`),
//!   with messages and `observedGeneration` (when a live route's new
//!   generation cannot be applied, `Accepted=False` says so and that the
//!   last accepted version stays in force: [`crate::index::State::held_routes`]);
//!   entries of other controllers
//!   are kept as they are. For each BackendPolicy, `status.ancestors[]`,
//!   one per targetRef, with `Accepted` (`Accepted`, `Conflicted`,
//!   `TargetNotFound`, `Invalid`). Written with a JSON merge patch on the
//!   `/status` subresource, only when the wanted status differs from the
//!   object's (a condition keeps its `lastTransitionTime` while its status
//!   does not change), after each index change (batched over 100 ms) and
//!   every 30 s (retries failed writes). RBAC: update/patch on
//!   `httproutes/status`, `grpcroutes/status`, `backendpolicies/status`.
//! - Directory mode: the same verdicts are logged once per change with the
//!   file and the object ([`crate::source::dir`]).
//!
//! With several controller replicas only the holder of a Lease writes
//! ([`crate::lease`], `--leader-elect`); the others compute nothing.
//!
//! The wanted status is a pure function ([`wanted_route_status`],
//! [`wanted_policy_status`], [`pending`]); [`run`] is the I/O around it.

use std::time::Duration;

use kube::api::{Patch, PatchParams};
use kube::{Api, Client};

use crate::index::outbound::{self, OutboundConfig, ParentVerdict, Verdict};
use crate::index::{Index, State};
use crate::metrics::{Metrics, ResultLabels};
use crate::model::gateway::{
    Condition, GrpcRoute, HttpRoute, ParentReference, RouteParentStatus, RouteStatus,
    CONTROLLER_NAME,
};
use crate::model::policy::{BackendPolicy, BackendPolicyStatus, PolicyAncestorStatus};
use crate::model::{Kind, ObjectKey, Policy, Route};

/// How long changes are batched before status is computed.
pub const BATCH: Duration = Duration::from_millis(100);
/// How often status is recomputed without a change (retries failed writes).
pub const RESYNC: Duration = Duration::from_secs(30);

/// "Now" as a `metav1.Time` string (whole seconds, UTC).
pub fn now() -> String {
    let now = k8s_openapi::jiff::Timestamp::now();
    k8s_openapi::jiff::Timestamp::from_second(now.as_second())
        .map(|t| t.to_string())
        .unwrap_or_else(|_| now.to_string())
}

fn condition(
    type_: &str,
    v: &Verdict,
    generation: Option<i64>,
    previous: &[Condition],
    now: &str,
) -> Condition {
    let status = if v.ok { "True" } else { "False" };
    let last_transition_time = previous
        .iter()
        .find(|c| c.type_ == type_ && c.status == status)
        .map(|c| c.last_transition_time.clone())
        .filter(|t| !t.is_empty())
        .unwrap_or_else(|| now.to_string());
    Condition {
        type_: type_.into(),
        status: status.into(),
        reason: v.reason.clone(),
        message: v.message.clone(),
        observed_generation: generation,
        last_transition_time,
    }
}

/// The status a route should have: other controllers' parents as they
/// are, then Weft's, one per Service parentRef in spec order.
pub fn wanted_route_status(route: &Route, verdicts: &[ParentVerdict], now: &str) -> RouteStatus {
    let existing = route.status.clone().unwrap_or_default();
    let mut parents: Vec<RouteParentStatus> = existing
        .parents
        .iter()
        .filter(|p| p.controller_name != CONTROLLER_NAME)
        .cloned()
        .collect();
    for v in verdicts {
        let previous = existing
            .parents
            .iter()
            .find(|p| p.controller_name == CONTROLLER_NAME && p.parent_ref == v.parent_ref)
            .map(|p| p.conditions.as_slice())
            .unwrap_or_default();
        parents.push(RouteParentStatus {
            parent_ref: v.parent_ref.clone(),
            controller_name: CONTROLLER_NAME.into(),
            conditions: vec![
                condition(
                    "Accepted",
                    &v.accepted,
                    route.meta.generation,
                    previous,
                    now,
                ),
                condition(
                    "ResolvedRefs",
                    &v.resolved_refs,
                    route.meta.generation,
                    previous,
                    now,
                ),
            ],
        });
    }
    RouteStatus { parents }
}

/// The status a BackendPolicy should have (see [`wanted_route_status`]).
pub fn wanted_policy_status(
    policy: &Policy,
    verdicts: &[(ParentReference, Verdict)],
    now: &str,
) -> BackendPolicyStatus {
    let existing = policy.status.clone().unwrap_or_default();
    let mut ancestors: Vec<PolicyAncestorStatus> = existing
        .ancestors
        .iter()
        .filter(|a| a.controller_name != CONTROLLER_NAME)
        .cloned()
        .collect();
    for (ancestor, v) in verdicts {
        let previous = existing
            .ancestors
            .iter()
            .find(|a| a.controller_name == CONTROLLER_NAME && a.ancestor_ref == *ancestor)
            .map(|a| a.conditions.as_slice())
            .unwrap_or_default();
        ancestors.push(PolicyAncestorStatus {
            ancestor_ref: ancestor.clone(),
            controller_name: CONTROLLER_NAME.into(),
            conditions: vec![condition(
                "Accepted",
                v,
                policy.meta.generation,
                previous,
                now,
            )],
        });
    }
    BackendPolicyStatus { ancestors }
}

/// A status that differs from the object's.
#[derive(Clone, Debug, PartialEq)]
pub struct StatusWrite {
    pub kind: Kind,
    pub key: ObjectKey,
    /// The whole `status` object.
    pub status: serde_json::Value,
}

/// Every route and policy whose status should change.
pub fn pending(state: &State, config: &OutboundConfig, now: &str) -> Vec<StatusWrite> {
    let mut out = Vec::new();
    for route in state.http_routes.values().chain(state.grpc_routes.values()) {
        let verdicts = outbound::route_verdicts(state, route, config);
        let wanted = wanted_route_status(route, &verdicts, now);
        if route.status.clone().unwrap_or_default() != wanted {
            out.push(StatusWrite {
                kind: route.kind(),
                key: route.meta.key.clone(),
                status: serde_json::to_value(&wanted).unwrap_or_default(),
            });
        }
    }
    for policy in state.policies.values() {
        let verdicts = outbound::policy_verdicts(state, policy);
        let wanted = wanted_policy_status(policy, &verdicts, now);
        if policy.status.clone().unwrap_or_default() != wanted {
            out.push(StatusWrite {
                kind: Kind::BackendPolicy,
                key: policy.meta.key.clone(),
                status: serde_json::to_value(&wanted).unwrap_or_default(),
            });
        }
    }
    out.sort_by(|a, b| (a.kind, &a.key).cmp(&(b.kind, &b.key)));
    out
}

/// Writes status after each index change until the task is dropped.
pub async fn run(
    client: Client,
    index: Index,
    metrics: Metrics,
    mut leader: tokio::sync::watch::Receiver<bool>,
) {
    let config = OutboundConfig::default();
    let mut generation = index.generation();
    loop {
        tokio::select! {
            changed = generation.changed() => if changed.is_err() { return },
            // Becoming the leader writes at once what the previous leader may have left.
            changed = leader.changed() => if changed.is_err() { return },
            () = tokio::time::sleep(RESYNC) => {}
        }
        tokio::time::sleep(BATCH).await;
        generation.borrow_and_update();
        if !*leader.borrow_and_update() {
            continue;
        }
        let writes = {
            let state = index.read();
            pending(&state, &config, &now())
        };
        for w in writes {
            let patch = Patch::Merge(serde_json::json!({ "status": w.status }));
            let params = PatchParams::default();
            let (ns, name) = (w.key.namespace.as_str(), w.key.name.as_str());
            let result = match w.kind {
                Kind::HttpRoute => Api::<HttpRoute>::namespaced(client.clone(), ns)
                    .patch_status(name, &params, &patch)
                    .await
                    .map(|_| ()),
                Kind::GrpcRoute => Api::<GrpcRoute>::namespaced(client.clone(), ns)
                    .patch_status(name, &params, &patch)
                    .await
                    .map(|_| ()),
                _ => Api::<BackendPolicy>::namespaced(client.clone(), ns)
                    .patch_status(name, &params, &patch)
                    .await
                    .map(|_| ()),
            };
            let result = match result {
                Ok(()) => {
                    tracing::debug!(kind = %w.kind, object = %w.key, "status written");
                    "ok"
                }
                Err(e) => {
                    tracing::warn!(kind = %w.kind, object = %w.key, error = %e, "writing status failed; retrying later (check the controller's RBAC on the status subresource)");
                    "failed"
                }
            };
            metrics
                .status_writes
                .get_or_create(&ResultLabels { result })
                .inc();
        }
    }
}

/// One line per verdict for logs: `Accepted=False UnsupportedValue: ...`.
pub fn describe(accepted: &Verdict, resolved: Option<&Verdict>) -> String {
    let one = |t: &str, v: &Verdict| {
        format!(
            "{t}={} {}: {}",
            if v.ok { "True" } else { "False" },
            v.reason,
            v.message
        )
    };
    match resolved {
        Some(r) => format!("{}; {}", one("Accepted", accepted), one("ResolvedRefs", r)),
        None => one("Accepted", accepted),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::Change;
    use crate::source::dir::load_manifests;

    fn index(yaml: &str) -> Index {
        let loaded = load_manifests(std::path::Path::new("t.yaml"), yaml).expect("parses");
        let index = Index::new();
        index.apply(loaded.objects.into_iter().map(Change::Upsert));
        index
    }

    const FIXTURE: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: shop}\nspec: {clusterIP: 10.96.0.1, ports: [{port: 80}]}\n---\napiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: r, namespace: shop, generation: 3}\nspec:\n  parentRefs: [{group: '', kind: Service, name: web}, {name: gw}]\n  rules: [{backendRefs: [{name: web, port: 80}, {name: nope, port: 80}]}]\nstatus:\n  parents:\n  - parentRef: {name: gw}\n    controllerName: example.com/gateway\n    conditions: [{type: Accepted, status: 'True', reason: Accepted, message: '', lastTransitionTime: '2024-01-01T00:00:00Z'}]\n---\napiVersion: policy.weft.dev/v1alpha1\nkind: BackendPolicy\nmetadata: {name: p, namespace: shop, generation: 1}\nspec:\n  targetRefs: [{group: '', kind: Service, name: web}]\n";

    #[test]
    fn wanted_status_keeps_other_controllers_and_is_stable() {
        let idx = index(FIXTURE);
        let cfg = OutboundConfig::default();
        let writes = pending(&idx.read(), &cfg, "2025-01-01T00:00:00Z");
        assert_eq!(writes.len(), 2, "{writes:?}");
        let route = &writes[0];
        assert_eq!(
            (route.kind, route.key.name.as_str()),
            (Kind::HttpRoute, "r")
        );
        let parents = route.status["parents"].as_array().expect("parents");
        assert_eq!(parents.len(), 2);
        assert_eq!(parents[0]["controllerName"], "example.com/gateway");
        let ours = &parents[1];
        assert_eq!(ours["controllerName"], CONTROLLER_NAME);
        assert_eq!(ours["parentRef"]["name"], "web");
        let cond = |t: &str| {
            ours["conditions"]
                .as_array()
                .and_then(|c| c.iter().find(|c| c["type"] == t))
                .cloned()
                .expect(t)
        };
        assert_eq!(cond("Accepted")["status"], "True");
        assert_eq!(cond("Accepted")["observedGeneration"], 3);
        assert_eq!(cond("ResolvedRefs")["status"], "False");
        assert_eq!(cond("ResolvedRefs")["reason"], "BackendNotFound");
        assert_eq!(
            cond("ResolvedRefs")["lastTransitionTime"],
            "2025-01-01T00:00:00Z"
        );
        let policy = &writes[1];
        assert_eq!(policy.kind, Kind::BackendPolicy);
        assert_eq!(
            policy.status["ancestors"][0]["conditions"][0]["reason"],
            "Accepted"
        );

        // Once written (as the watch would report), nothing is pending,
        // even later: times are kept while statuses do not change.
        let state = idx.read();
        let mut applied = Vec::new();
        for w in &writes {
            match w.kind {
                Kind::HttpRoute => {
                    let mut r = (**state.http_routes.get(&w.key).expect("r")).clone();
                    r.status = Some(serde_json::from_value(w.status.clone()).expect("status"));
                    applied.push(Change::Upsert(crate::model::Object::Route(Box::new(r))));
                }
                _ => {
                    let mut p = (**state.policies.get(&w.key).expect("p")).clone();
                    p.status = Some(serde_json::from_value(w.status.clone()).expect("status"));
                    applied.push(Change::Upsert(crate::model::Object::BackendPolicy(
                        Box::new(p),
                    )));
                }
            }
        }
        drop(state);
        idx.apply(applied);
        assert_eq!(pending(&idx.read(), &cfg, "2025-06-01T00:00:00Z"), []);
    }
}

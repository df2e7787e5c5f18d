//! `BackendPolicy` (`policy.weft.dev/v1alpha1`): what the Gateway API does
//! not say about a backend — the retry budget of requests sent to it, its
//! circuit breaker, and its connection and default request timeouts. It is
//! a Gateway API *policy attachment* (GEP-713): `spec.targetRefs` name
//! Services in the policy's own namespace, optionally one port
//! (`sectionName` = the port's name, or `port`).
//!
//! The CRD is generated from these types ([`crd_yaml`]); the committed copy
//! is `charts/weft/crds/backendpolicies.policy.weft.dev.yaml` and
//! `tests/crds.rs` fails when it drifts. Unset fields take the defaults of
//! DESIGN.md ([`defaults`]); durations are Gateway API durations
//! ([`super::duration`]).
//!
//! Status follows the Gateway API's policy status: one entry per target
//! (`status.ancestors[]`, `ancestorRef` = the Service) with an `Accepted`
//! condition (reasons `Accepted`, `Conflicted`, `TargetNotFound`,
//! `Invalid`).

use std::time::Duration;

use kube_core::CustomResourceExt as _;
use kube_derive::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::gateway::{Condition, ParentReference};

/// The API group of Weft's CRDs.
pub const GROUP: &str = "policy.weft.dev";

/// Defaults for every unset field (DESIGN.md "Defaults users will look
/// for"; the connect and idle timeouts are the proxy's own defaults,
/// `WEFT_PROXY_CONNECT_TIMEOUT` 1 s and its 60 s pool idle timeout).
pub mod defaults {
    use std::time::Duration;

    pub const RETRY_RATIO: f64 = 0.2;
    pub const MIN_RETRIES_PER_SECOND: u32 = 10;
    pub const RETRY_TTL: Duration = Duration::from_secs(10);
    pub const CONSECUTIVE_FAILURES: u32 = 7;
    pub const BASE_EJECTION: Duration = Duration::from_secs(1);
    pub const MAX_EJECTION: Duration = Duration::from_secs(60);
    pub const JITTER: f64 = 0.1;
    pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
    pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
}

/// `BackendPolicy.spec`.
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    crates(kube_core = ::kube_core),
    group = "policy.weft.dev",
    version = "v1alpha1",
    kind = "BackendPolicy",
    plural = "backendpolicies",
    shortname = "bpol",
    doc = "Retry budget, circuit breaker and timeouts of the Services it targets (Gateway API policy attachment).",
    namespaced,
    status = "BackendPolicyStatus",
    derive = "PartialEq",
    derive = "Default",
    printcolumn = r#"{"name":"Targets","type":"string","jsonPath":".spec.targetRefs[*].name"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct BackendPolicySpec {
    /// The Services (in this namespace) the policy applies to.
    #[schemars(length(min = 1, max = 16))]
    pub target_refs: Vec<PolicyTargetRef>,
    /// Retries allowed on top of the requests sent to the targets.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_budget: Option<RetryBudgetSpec>,
    /// Outlier ejection and load shedding per endpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub circuit_breaker: Option<CircuitBreakerSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeouts: Option<BackendTimeouts>,
}

/// A Service the policy attaches to.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PolicyTargetRef {
    /// `""` (core).
    #[schemars(regex(pattern = r"^$|^core$"))]
    pub group: String,
    /// `Service`.
    #[schemars(regex(pattern = r"^Service$"))]
    pub kind: String,
    pub name: String,
    /// A port name of the Service: the policy applies to that port only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub section_name: Option<String>,
    /// A port number of the Service: the policy applies to that port only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: Option<i32>,
}

/// The retry budget: retries may add at most `retryRatio` of the requests
/// plus `minRetriesPerSecond`, counted over `ttl`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RetryBudgetSpec {
    /// Default 0.2.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0, max = 1000.0))]
    pub retry_ratio: Option<f64>,
    /// Default 10.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(max = 1000000))]
    pub min_retries_per_second: Option<u32>,
    /// Default `10s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^([0-9]{1,5}(h|m|s|ms)){1,4}$"))]
    pub ttl: Option<String>,
}

/// Consecutive failures eject an endpoint for `baseEjectionTime`, doubling
/// per ejection up to `maxEjectionTime`, plus up to `jitter` of it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CircuitBreakerSpec {
    /// Default 7; 0 disables ejection.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(max = 1000000))]
    pub consecutive_failures: Option<u32>,
    /// Default `1s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^([0-9]{1,5}(h|m|s|ms)){1,4}$"))]
    pub base_ejection_time: Option<String>,
    /// Default `60s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^([0-9]{1,5}(h|m|s|ms)){1,4}$"))]
    pub max_ejection_time: Option<String>,
    /// Default 0.1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub jitter: Option<f64>,
    /// Requests in flight per endpoint before new ones fail fast (default
    /// 0: no limit).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_concurrent_requests: Option<u32>,
    /// Requests waiting for an endpoint before new ones fail fast (default
    /// 0: no limit).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_pending_requests: Option<u32>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BackendTimeouts {
    /// TCP (and TLS) connect to an endpoint. Default `1s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^([0-9]{1,5}(h|m|s|ms)){1,4}$"))]
    pub connect: Option<String>,
    /// An unused pooled connection is closed after this. Default `60s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^([0-9]{1,5}(h|m|s|ms)){1,4}$"))]
    pub idle: Option<String>,
    /// Whole-request timeout for routes that set none. Default: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^([0-9]{1,5}(h|m|s|ms)){1,4}$"))]
    pub request: Option<String>,
}

/// `BackendPolicy.status`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BackendPolicyStatus {
    #[serde(default)]
    pub ancestors: Vec<PolicyAncestorStatus>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PolicyAncestorStatus {
    pub ancestor_ref: ParentReference,
    pub controller_name: String,
    #[serde(default)]
    pub conditions: Vec<Condition>,
}

/// The settings a policy (or the defaults) gives a backend, durations
/// parsed. Pure data, built by [`settings`].
#[derive(Clone, Debug, PartialEq)]
pub struct Settings {
    pub retry_ratio: f64,
    pub min_retries_per_second: u32,
    pub retry_ttl: Duration,
    pub consecutive_failures: u32,
    pub base_ejection: Duration,
    pub max_ejection: Duration,
    pub jitter: f64,
    pub max_concurrent_requests: u32,
    pub max_pending_requests: u32,
    pub connect_timeout: Duration,
    pub idle_timeout: Duration,
    pub request_timeout: Option<Duration>,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            retry_ratio: defaults::RETRY_RATIO,
            min_retries_per_second: defaults::MIN_RETRIES_PER_SECOND,
            retry_ttl: defaults::RETRY_TTL,
            consecutive_failures: defaults::CONSECUTIVE_FAILURES,
            base_ejection: defaults::BASE_EJECTION,
            max_ejection: defaults::MAX_EJECTION,
            jitter: defaults::JITTER,
            max_concurrent_requests: 0,
            max_pending_requests: 0,
            connect_timeout: defaults::CONNECT_TIMEOUT,
            idle_timeout: defaults::IDLE_TIMEOUT,
            request_timeout: None,
        }
    }
}

/// A field of a BackendPolicy that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("field {field} is {value}: {reason}")]
pub struct PolicyError {
    pub field: String,
    pub value: String,
    pub reason: String,
}

/// The settings of `spec`, defaults for unset fields. An invalid field
/// (bad duration, ratio out of range, base ejection above max) is an error
/// naming it; the policy is then not accepted and the defaults apply.
pub fn settings(spec: &BackendPolicySpec) -> Result<Settings, PolicyError> {
    let mut s = Settings::default();
    let duration = |field: &str, v: &Option<String>, into: &mut Duration| {
        if let Some(v) = v {
            *into = super::duration::parse(v).map_err(|e| PolicyError {
                field: field.to_string(),
                value: format!("{v:?}"),
                reason: e.reason.to_string(),
            })?;
        }
        Ok::<(), PolicyError>(())
    };
    if let Some(b) = &spec.retry_budget {
        if let Some(r) = b.retry_ratio {
            if !(0.0..=1000.0).contains(&r) {
                return Err(PolicyError {
                    field: "spec.retryBudget.retryRatio".into(),
                    value: r.to_string(),
                    reason: "must be between 0 and 1000 (0.2 = 20 %)".into(),
                });
            }
            s.retry_ratio = r;
        }
        if let Some(m) = b.min_retries_per_second {
            s.min_retries_per_second = m;
        }
        duration("spec.retryBudget.ttl", &b.ttl, &mut s.retry_ttl)?;
        if s.retry_ttl.is_zero() {
            return Err(PolicyError {
                field: "spec.retryBudget.ttl".into(),
                value: "\"0s\"".into(),
                reason: "the budget's window must be longer than 0".into(),
            });
        }
    }
    if let Some(c) = &spec.circuit_breaker {
        if let Some(n) = c.consecutive_failures {
            s.consecutive_failures = n;
        }
        duration(
            "spec.circuitBreaker.baseEjectionTime",
            &c.base_ejection_time,
            &mut s.base_ejection,
        )?;
        duration(
            "spec.circuitBreaker.maxEjectionTime",
            &c.max_ejection_time,
            &mut s.max_ejection,
        )?;
        if s.base_ejection > s.max_ejection {
            return Err(PolicyError {
                field: "spec.circuitBreaker.baseEjectionTime".into(),
                value: format!("{:?}", s.base_ejection),
                reason: format!("must not exceed maxEjectionTime ({:?})", s.max_ejection),
            });
        }
        if let Some(j) = c.jitter {
            if !(0.0..=1.0).contains(&j) {
                return Err(PolicyError {
                    field: "spec.circuitBreaker.jitter".into(),
                    value: j.to_string(),
                    reason: "must be between 0 and 1".into(),
                });
            }
            s.jitter = j;
        }
        s.max_concurrent_requests = c.max_concurrent_requests.unwrap_or(0);
        s.max_pending_requests = c.max_pending_requests.unwrap_or(0);
    }
    if let Some(t) = &spec.timeouts {
        duration("spec.timeouts.connect", &t.connect, &mut s.connect_timeout)?;
        duration("spec.timeouts.idle", &t.idle, &mut s.idle_timeout)?;
        if let Some(r) = &t.request {
            let mut d = Duration::ZERO;
            duration("spec.timeouts.request", &Some(r.clone()), &mut d)?;
            s.request_timeout = Some(d);
        }
    }
    Ok(s)
}

/// The BackendPolicy CRD as YAML, exactly as committed under
/// `charts/weft/crds/`.
pub fn crd_yaml() -> Result<String, serde_yaml_ng::Error> {
    let body = serde_yaml_ng::to_string(&BackendPolicy::crd())?;
    Ok(format!(
        "# Generated from control-plane/src/model/policy.rs; do not edit.\n\
         # Regenerate: WEFT_UPDATE_CRDS=1 cargo test -p weft-controller --test crds\n\
         {body}"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(yaml: &str) -> BackendPolicySpec {
        serde_yaml_ng::from_str(yaml).expect("spec")
    }

    #[test]
    fn defaults_fill_unset_fields() {
        let s = settings(&spec("targetRefs: [{group: '', kind: Service, name: web}]")).expect("ok");
        assert_eq!(s, Settings::default());
        assert_eq!(s.retry_ratio, 0.2);
        assert_eq!(s.min_retries_per_second, 10);
        assert_eq!(s.retry_ttl, Duration::from_secs(10));
        assert_eq!(s.consecutive_failures, 7);
        assert_eq!(s.base_ejection, Duration::from_secs(1));
        assert_eq!(s.max_ejection, Duration::from_secs(60));
        assert_eq!(s.connect_timeout, Duration::from_secs(1));
    }

    #[test]
    fn fields_override_defaults() {
        let s = settings(&spec(
            "targetRefs: [{group: '', kind: Service, name: web}]\n\
             retryBudget: {retryRatio: 0.5, minRetriesPerSecond: 3, ttl: 30s}\n\
             circuitBreaker: {consecutiveFailures: 3, baseEjectionTime: 500ms, maxEjectionTime: 10s, jitter: 0, maxConcurrentRequests: 100, maxPendingRequests: 10}\n\
             timeouts: {connect: 250ms, idle: 5m, request: 2s}\n",
        ))
        .expect("ok");
        assert_eq!(s.retry_ratio, 0.5);
        assert_eq!(s.min_retries_per_second, 3);
        assert_eq!(s.retry_ttl, Duration::from_secs(30));
        assert_eq!(s.consecutive_failures, 3);
        assert_eq!(s.base_ejection, Duration::from_millis(500));
        assert_eq!(s.max_ejection, Duration::from_secs(10));
        assert_eq!(s.jitter, 0.0);
        assert_eq!(s.max_concurrent_requests, 100);
        assert_eq!(s.max_pending_requests, 10);
        assert_eq!(s.connect_timeout, Duration::from_millis(250));
        assert_eq!(s.idle_timeout, Duration::from_secs(300));
        assert_eq!(s.request_timeout, Some(Duration::from_secs(2)));
    }

    #[test]
    fn errors_name_the_field_and_value() {
        let cases = [
            ("retryBudget: {ttl: 10}", "spec.retryBudget.ttl", "\"10\""),
            ("retryBudget: {ttl: 0s}", "spec.retryBudget.ttl", "0s"),
            (
                "retryBudget: {retryRatio: -1}",
                "spec.retryBudget.retryRatio",
                "-1",
            ),
            (
                "circuitBreaker: {jitter: 2}",
                "spec.circuitBreaker.jitter",
                "2",
            ),
            (
                "circuitBreaker: {baseEjectionTime: 2m, maxEjectionTime: 1m}",
                "spec.circuitBreaker.baseEjectionTime",
                "120s",
            ),
            ("timeouts: {connect: 1d}", "spec.timeouts.connect", "\"1d\""),
        ];
        for (extra, field, value) in cases {
            let yaml = format!("targetRefs: [{{group: '', kind: Service, name: web}}]\n{extra}\n");
            let e = settings(&spec(&yaml)).expect_err(extra);
            assert_eq!(e.field, field, "{extra}: {e}");
            assert!(e.to_string().contains(value), "{extra}: {e}");
        }
    }

    #[test]
    fn crd_is_structural_and_names_the_group() {
        let yaml = crd_yaml().expect("yaml");
        assert!(
            yaml.contains("name: backendpolicies.policy.weft.dev"),
            "{yaml}"
        );
        assert!(yaml.contains("subresources:"), "status subresource: {yaml}");
        assert!(!yaml.contains("$ref"), "schemas must be inlined: {yaml}");
    }
}

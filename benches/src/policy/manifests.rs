//! The Gateway API and `policy.weft.dev` manifests the traffic-policy benchmarks give the
//! controller's directory source, in the formats of `charts/weft/examples/`. Pure.

use std::fmt::Write as _;

use crate::scenario::mesh::{NAMESPACE, SERVICE_PORT};

/// `retry` of an HTTPRoute rule (Gateway API experimental channel).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retry {
    pub code: u16,
    pub attempts: u32,
}

/// The retry the benchmarks configure: `retry: {codes: [503], attempts: 2}`.
pub const RETRY_503: Retry = Retry {
    code: 503,
    attempts: 2,
};

/// How the rule is chosen in [`http_route`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Match {
    /// No `matches`: every request.
    All,
    /// `PathPrefix` on this value.
    PathPrefix(String),
    /// `PathPrefix: /` and header `x-bench-rule` equal to this value.
    Header(String),
}

/// One rule of a route to `service`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub name: String,
    pub matches: Match,
    pub retry: Option<Retry>,
}

/// The header the header-matching rules look at; the load never sends it.
pub const RULE_HEADER: &str = "x-bench-rule";

/// An HTTPRoute named after `service` whose parentRef is Service `service` (port
/// [`SERVICE_PORT`]) and whose every rule sends to that same Service (GAMMA: the route
/// changes how traffic to a Service is handled, not where it goes).
pub fn http_route(service: &str, rules: &[Rule]) -> String {
    let mut y = format!(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\n\
         metadata: {{name: {service}, namespace: {NAMESPACE}}}\nspec:\n  parentRefs:\n    \
         - {{group: \"\", kind: Service, name: {service}, port: {SERVICE_PORT}}}\n  rules:\n"
    );
    // Writing to a String cannot fail.
    for r in rules {
        let _ = writeln!(y, "    - name: {}", r.name);
        match &r.matches {
            Match::All => {}
            Match::PathPrefix(p) => {
                let _ = writeln!(
                    y,
                    "      matches:\n        - path: {{type: PathPrefix, value: {p}}}"
                );
            }
            Match::Header(v) => {
                let _ = writeln!(
                    y,
                    "      matches:\n        - path: {{type: PathPrefix, value: /}}\n          \
                     headers: [{{name: {RULE_HEADER}, value: \"{v}\"}}]"
                );
            }
        }
        let _ = writeln!(
            y,
            "      backendRefs:\n        - {{name: {service}, port: {SERVICE_PORT}}}"
        );
        if let Some(retry) = r.retry {
            let _ = writeln!(
                y,
                "      retry: {{codes: [{}], attempts: {}}}",
                retry.code, retry.attempts
            );
        }
    }
    y
}

/// One rule for every request, with `retry` or none.
pub fn single_rule(retry: Option<Retry>) -> Vec<Rule> {
    vec![Rule {
        name: "all".into(),
        matches: Match::All,
        retry,
    }]
}

/// Ten rules, each with `retry`: five on path prefixes `/r1`…`/r5`, four on
/// `PathPrefix: /` plus a header, and last in Gateway API precedence `PathPrefix: /`, the
/// one the load's `/` requests take. Every request is tested against the nine others first.
pub fn ten_rules(retry: Option<Retry>) -> Vec<Rule> {
    let mut rules = Vec::with_capacity(10);
    for i in 1..=5 {
        rules.push(Rule {
            name: format!("r{i}"),
            matches: Match::PathPrefix(format!("/r{i}")),
            retry,
        });
    }
    for i in 6..=9 {
        rules.push(Rule {
            name: format!("r{i}"),
            matches: Match::Header(format!("{i}")),
            retry,
        });
    }
    rules.push(Rule {
        name: "r10".into(),
        matches: Match::PathPrefix("/".into()),
        retry,
    });
    rules
}

/// A retry budget (BackendPolicy `retryBudget`, ttl 10 s).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct Budget {
    pub ratio: f64,
    pub min_per_second: u32,
}

/// DESIGN.md's default budget: 20 % of requests plus 10 retries a second.
pub const DEFAULT_BUDGET: Budget = Budget {
    ratio: 0.2,
    min_per_second: 10,
};

/// A BackendPolicy on Service `service` spelling out DESIGN.md's defaults: retry budget
/// 20 % + 10/s over 10 s; 7 consecutive failures eject for 1 s doubling to 60 s.
pub fn default_backend_policy(service: &str) -> String {
    backend_policy(service, DEFAULT_BUDGET)
}

/// [`default_backend_policy`] with another retry budget.
pub fn backend_policy(service: &str, budget: Budget) -> String {
    format!(
        "apiVersion: policy.weft.dev/v1alpha1\nkind: BackendPolicy\n\
         metadata: {{name: {service}, namespace: {NAMESPACE}}}\nspec:\n  targetRefs:\n    \
         - {{group: \"\", kind: Service, name: {service}}}\n  \
         retryBudget: {{retryRatio: {}, minRetriesPerSecond: {}, ttl: 10s}}\n  \
         circuitBreaker: {{consecutiveFailures: 7, baseEjectionTime: 1s, maxEjectionTime: 60s}}\n",
        budget.ratio, budget.min_per_second
    )
}

/// Documents joined into one multi-document YAML file.
pub fn join(docs: &[String]) -> String {
    let mut out = String::from("# Generated by weft-bench (traffic-policy benchmarks).\n");
    for (i, d) in docs.iter().enumerate() {
        if i > 0 {
            out.push_str("---\n");
        }
        out.push_str(d.trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_route_with_retry_attaches_to_its_service() {
        let y = http_route("retry", &single_rule(Some(RETRY_503)));
        assert!(y.contains("kind: HTTPRoute"));
        assert!(y.contains("metadata: {name: retry, namespace: bench}"));
        assert!(y.contains("- {group: \"\", kind: Service, name: retry, port: 8080}"));
        assert!(y.contains("- {name: retry, port: 8080}"));
        assert!(y.contains("retry: {codes: [503], attempts: 2}"));
        assert!(!y.contains("matches"));
        let plain = http_route("plain", &single_rule(None));
        assert!(!plain.contains("retry:"));
    }

    #[test]
    fn ten_rules_end_with_the_catch_all() {
        assert!(ten_rules(None).iter().all(|r| r.retry.is_none()));
        let rules = ten_rules(Some(RETRY_503));
        assert_eq!(rules.len(), 10);
        assert!(rules.iter().all(|r| r.retry == Some(RETRY_503)));
        assert_eq!(rules[9].matches, Match::PathPrefix("/".into()));
        let y = http_route("routed", &rules);
        assert_eq!(y.matches("    - name: r").count(), 10);
        assert_eq!(y.matches("retry: {codes: [503], attempts: 2}").count(), 10);
        assert!(y.contains("- path: {type: PathPrefix, value: /r5}"));
        assert!(y.contains("headers: [{name: x-bench-rule, value: \"9\"}]"));
        assert_eq!(y.matches("headers:").count(), 4);
    }

    #[test]
    fn backend_policy_and_join() {
        let p = default_backend_policy("eject-1");
        assert!(p.contains("kind: BackendPolicy"));
        assert!(p.contains("apiVersion: policy.weft.dev/v1alpha1"));
        assert!(p.contains("- {group: \"\", kind: Service, name: eject-1}"));
        assert!(p.contains("consecutiveFailures: 7"));
        assert!(p.contains("retryRatio: 0.2"));
        let all = join(&["a: 1\n".into(), "b: 2".into()]);
        assert!(all.ends_with("a: 1\n---\nb: 2\n"));
    }
}

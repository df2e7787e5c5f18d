//! The manifests `weft-bench netpol` gives the agent's directory source: the two real pods in
//! namespace `bench`, a thousand index-only Pods in ten `team-*` namespaces (other nodes'
//! pods: they exist only as selector peers), and 50 NetworkPolicies. Pure text; the tests
//! check the counts and that the policies a benchmark relies on are there.

use std::fmt::Write as _;

/// The namespace of the two real pods.
pub const NAMESPACE: &str = "bench";
/// Namespaces holding the index-only pods.
pub const TEAMS: usize = 10;
/// Policies in `bench`; the rest (4 per team namespace) make up [`POLICIES`].
pub const BENCH_POLICIES: usize = 10;
pub const POLICIES: usize = BENCH_POLICIES + 4 * TEAMS;

/// Ports the traffic uses, all allowed client → server by `allow-client-to-server` (ingress)
/// and `allow-client-egress` (egress).
pub const IPERF_PORT: u16 = 5201;
pub const HTTP_PORT: u16 = 8080;
pub const CONN_PORT: u16 = 8081;
/// The probe port of the policy-change measurement: allowed only while `probe-allow` names
/// it ([`probe_policy`] with `allowed = true`).
pub const PROBE_PORT: u16 = 9000;

/// Files in the manifest directory.
pub const PODS_FILE: &str = "pods.yaml";
pub const POLICIES_FILE: &str = "policies.yaml";
pub const PROBE_FILE: &str = "probe.yaml";

/// Namespaces, the two real pods (`bench/client`, `bench/server`; their addresses come from
/// the agent's registry) and `index_pods` other pods with addresses in 10.80.0.0/16.
pub fn pods(index_pods: usize) -> String {
    let mut y = String::new();
    let ns = |y: &mut String, name: &str, labels: &str| {
        let _ = write!(
            y,
            "---\napiVersion: v1\nkind: Namespace\nmetadata: {{name: {name}, labels: {{{labels}}}}}\n"
        );
    };
    ns(&mut y, NAMESPACE, "env: prod, team: bench");
    ns(&mut y, "monitoring", "team: monitoring");
    ns(&mut y, "kube-system", "");
    for t in 0..TEAMS {
        let env = if t % 2 == 0 { "prod" } else { "staging" };
        ns(
            &mut y,
            &format!("team-{t}"),
            &format!("env: {env}, team: t{t}"),
        );
    }
    let _ = write!(
        y,
        "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: client, namespace: {NAMESPACE}, \
         labels: {{app: client, role: loadgen}}}}\nspec: {{containers: [{{name: app, image: x}}]}}\n"
    );
    let _ = write!(
        y,
        "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: server, namespace: {NAMESPACE}, \
         labels: {{app: server, tier: backend}}}}\nspec:\n  containers:\n  - name: app\n    \
         image: x\n    ports: [{{name: http, containerPort: {HTTP_PORT}}}, \
         {{name: iperf, containerPort: {IPERF_PORT}}}, {{name: conn, containerPort: {CONN_PORT}}}]\n"
    );
    for i in 0..index_pods {
        let team = i % TEAMS;
        let tier = ["frontend", "backend", "db"][i % 3];
        let _ = write!(
            y,
            "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: pod-{i}, namespace: team-{team}, \
             labels: {{app: app-{app}, tier: {tier}}}}}\nspec: {{nodeName: other-{node}, \
             containers: [{{name: app, image: x, ports: [{{name: http, containerPort: 8080}}]}}]}}\n\
             status: {{podIP: {ip}, podIPs: [{{ip: {ip}}}]}}\n",
            app = (i / TEAMS) % 10,
            node = i % 7,
            ip = index_ip(i),
        );
    }
    y
}

/// The address of index pod `i`: 10.80.0.1 onwards, 250 per /24.
pub fn index_ip(i: usize) -> String {
    format!("10.80.{}.{}", i / 250, i % 250 + 1)
}

fn policy(y: &mut String, ns: &str, name: &str, spec: &str) {
    let _ = write!(
        y,
        "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: {name}, \
         namespace: {ns}}}\nspec:\n{spec}"
    );
}

/// Every policy but `probe-allow` ([`probe_policy`]): [`POLICIES`] − 1 of them. In `bench`:
/// default-deny for both directions, the client → server allow rules (ingress by podSelector
/// and a named port, egress by podSelector) that the traffic takes, and seven more rules
/// selecting one or both pods (namespaceSelector, podSelector and namespaceSelector in one
/// peer, ipBlock with except, matchExpressions, endPort ranges, UDP) that the traffic does
/// not match. In each `team-*` namespace: default-deny ingress, tiered podSelector rules and
/// a namespaceSelector + ipBlock rule with a port range.
pub fn policies() -> String {
    let mut y = String::new();
    let b = NAMESPACE;
    policy(
        &mut y,
        b,
        "default-deny",
        "  podSelector: {}\n  policyTypes: [Ingress, Egress]\n",
    );
    policy(
        &mut y,
        b,
        "allow-client-to-server",
        &format!(
            "  podSelector: {{matchLabels: {{app: server}}}}\n  ingress:\n  - from: \
             [{{podSelector: {{matchLabels: {{app: client}}}}}}]\n    ports: [{{port: \
             {IPERF_PORT}}}, {{port: http}}, {{port: {CONN_PORT}, protocol: TCP}}]\n"
        ),
    );
    policy(
        &mut y,
        b,
        "allow-client-egress",
        &format!(
            "  podSelector: {{matchLabels: {{app: client}}}}\n  policyTypes: [Egress]\n  \
             egress:\n  - to: [{{podSelector: {{matchLabels: {{app: server}}}}}}]\n    ports: \
             [{{port: {IPERF_PORT}}}, {{port: {HTTP_PORT}}}, {{port: {CONN_PORT}}}, {{port: \
             {PROBE_PORT}}}]\n"
        ),
    );
    policy(
        &mut y,
        b,
        "allow-monitoring",
        "  podSelector: {}\n  ingress:\n  - from: [{namespaceSelector: {matchLabels: {team: \
         monitoring}}}]\n    ports: [{port: 9090}]\n",
    );
    policy(
        &mut y,
        b,
        "allow-prod-frontends",
        "  podSelector: {matchLabels: {app: server}}\n  ingress:\n  - from: [{namespaceSelector: \
         {matchLabels: {env: prod}}, podSelector: {matchLabels: {tier: frontend}}}]\n    ports: \
         [{port: http}]\n",
    );
    policy(
        &mut y,
        b,
        "allow-internal-https",
        "  podSelector: {matchLabels: {app: server}}\n  ingress:\n  - from: [{ipBlock: {cidr: \
         10.0.0.0/8, except: [10.77.0.0/16, 10.80.0.0/16]}}]\n    ports: [{port: 443}]\n",
    );
    policy(
        &mut y,
        b,
        "allow-range",
        "  podSelector: {matchExpressions: [{key: app, operator: In, values: [server, \
         client]}]}\n  ingress:\n  - from: [{podSelector: {matchExpressions: [{key: tier, \
         operator: NotIn, values: [db]}]}}]\n    ports: [{port: 30000, endPort: 30100}]\n",
    );
    policy(
        &mut y,
        b,
        "client-dns",
        "  podSelector: {matchLabels: {app: client}}\n  policyTypes: [Egress]\n  egress:\n  - \
         to: [{namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: kube-system}}}]\n    \
         ports: [{port: 53, protocol: UDP}, {port: 53, protocol: TCP}]\n",
    );
    policy(
        &mut y,
        b,
        "client-external",
        "  podSelector: {matchLabels: {role: loadgen}}\n  policyTypes: [Egress]\n  egress:\n  - \
         to: [{ipBlock: {cidr: 0.0.0.0/0, except: [10.0.0.0/8]}}]\n    ports: [{port: 443}]\n",
    );
    for t in 0..TEAMS {
        let ns = format!("team-{t}");
        policy(
            &mut y,
            &ns,
            "default-deny-ingress",
            "  podSelector: {}\n  policyTypes: [Ingress]\n",
        );
        policy(
            &mut y,
            &ns,
            "frontend-to-backend",
            "  podSelector: {matchLabels: {tier: backend}}\n  ingress:\n  - from: [{podSelector: \
             {matchLabels: {tier: frontend}}}]\n    ports: [{port: http}]\n",
        );
        policy(
            &mut y,
            &ns,
            "backend-to-db",
            "  podSelector: {matchLabels: {tier: db}}\n  ingress:\n  - from: [{podSelector: \
             {matchLabels: {tier: backend}}}]\n    ports: [{port: 5432}]\n",
        );
        policy(
            &mut y,
            &ns,
            "from-prod",
            &format!(
                "  podSelector: {{matchLabels: {{app: app-{t}}}}}\n  ingress:\n  - from: \
                 [{{namespaceSelector: {{matchLabels: {{env: prod}}}}}}, {{ipBlock: {{cidr: \
                 10.77.0.0/24}}}}]\n    ports: [{{port: 80, endPort: 90}}]\n"
            ),
        );
    }
    y
}

/// `bench/probe-allow`: client → server on [`PROBE_PORT`] when `allowed`, else on the port
/// after it (the same policy edited, so the policy count stays [`POLICIES`]).
pub fn probe_policy(allowed: bool) -> String {
    let port = if allowed { PROBE_PORT } else { PROBE_PORT + 1 };
    let mut y = String::new();
    policy(
        &mut y,
        NAMESPACE,
        "probe-allow",
        &format!(
            "  podSelector: {{matchLabels: {{app: server}}}}\n  ingress:\n  - from: \
             [{{podSelector: {{matchLabels: {{app: client}}}}}}]\n    ports: [{{port: {port}}}]\n"
        ),
    );
    y
}

#[cfg(test)]
mod tests {
    use super::*;

    fn count(text: &str, kind: &str) -> usize {
        text.matches(&format!("kind: {kind}\n")).count()
    }

    #[test]
    fn fifty_policies_a_thousand_index_pods_and_the_two_real_ones() {
        let all = policies() + &probe_policy(true);
        assert_eq!(count(&all, "NetworkPolicy"), POLICIES);
        assert_eq!(POLICIES, 50);
        let p = pods(1000);
        assert_eq!(count(&p, "Pod"), 1002);
        assert_eq!(count(&p, "Namespace"), 3 + TEAMS);
        assert!(p.contains("name: pod-999, namespace: team-9"));
        assert_eq!(index_ip(999), "10.80.3.250");
        assert_eq!(index_ip(0), "10.80.0.1");
    }

    #[test]
    fn probe_policy_flips_only_the_port() {
        let (on, off) = (probe_policy(true), probe_policy(false));
        assert!(on.contains("port: 9000") && !on.contains("9001"));
        assert!(off.contains("port: 9001") && !off.contains("9000"));
        assert_eq!(on.replace("9000", "9001"), off);
    }

    #[test]
    fn every_document_is_valid_yaml() {
        let text = pods(3) + &policies() + &probe_policy(false);
        for doc in text.split("---\n").filter(|d| !d.trim().is_empty()) {
            let v: serde_json::Value =
                serde_yaml_ng::from_str(doc).unwrap_or_else(|e| panic!("{e}\n{doc}"));
            assert!(v["metadata"]["name"].is_string(), "{doc}");
        }
    }
}

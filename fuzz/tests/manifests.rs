//! The controller's manifest files (`source::dir::load_manifests`): YAML documents into
//! objects, through the conversion of Services, EndpointSlices, Pods, Namespaces,
//! NetworkPolicies, HTTPRoutes, GRPCRoutes and BackendPolicies into the model.
//!
//! Two kinds of input: the text mutated (YAML syntax, document separators, anchors and
//! aliases), and the documents mutated as trees and written back as YAML (conversion).

use std::path::Path;

use serde::Deserialize;
use serde_json::Value;
use weft_controller::source::dir::{load_manifests, ManifestError};
use weft_fuzz::{fuzz, mutate};

const NETWORK_POLICIES: &str = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: api-allow, namespace: demo}
spec:
  podSelector:
    matchLabels: {app: books}
    matchExpressions:
      - {key: tier, operator: In, values: [web, api]}
      - {key: canary, operator: DoesNotExist}
  policyTypes: [Ingress, Egress]
  ingress:
    - from:
        - namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: web}}
          podSelector: {matchLabels: {app: frontend}}
        - ipBlock: {cidr: 10.0.0.0/8, except: [10.1.0.0/16, 10.2.3.4/32]}
      ports:
        - {protocol: TCP, port: 8080}
        - {protocol: TCP, port: http}
        - {protocol: UDP, port: 5000, endPort: 5100}
  egress:
    - to:
        - ipBlock: {cidr: "fd00::/8", except: ["fd00:1::/32"]}
      ports: [{protocol: SCTP, port: 9000}]
    - ports: [{port: 53, protocol: UDP}, {port: 53, protocol: TCP}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: default-deny}
spec:
  podSelector: {}
  policyTypes: [Ingress]
"#;

/// The seeds that load (the last of [`seeds`] is an alias bomb, refused).
fn loading_seeds() -> Vec<String> {
    let mut s = seeds();
    s.pop();
    s
}

fn seeds() -> Vec<String> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut out: Vec<String> = [
        "control-plane/examples/manifests/demo.yaml",
        "control-plane/examples/manifests/books-pods.yaml",
        "charts/weft/examples/httproute-mirror.yaml",
        "charts/weft/examples/httproute-split.yaml",
        "charts/weft/examples/grpcroute-retry.yaml",
        "charts/weft/examples/backendpolicy.yaml",
    ]
    .iter()
    .map(|p| std::fs::read_to_string(root.join(p)).unwrap_or_else(|e| panic!("seed {p}: {e}")))
    .collect();
    out.push(NETWORK_POLICIES.to_string());
    // Aliases: small text, large trees. The parser must bound what they expand to.
    out.push(
        "apiVersion: v1\nkind: Pod\nmetadata: {name: a, labels: &l {a: b, c: d}}\n\
         spec: {containers: [{name: x, ports: [&p {containerPort: 80}, *p, *p]}]}\n\
         x: &a [*l, *l, *l, *l]\ny: &b [*a, *a, *a, *a]\nz: [*b, *b, *b, *b]\n"
            .into(),
    );
    // Nested aliases over a wide leaf: 1 KB of text, millions of nodes once expanded.
    let mut laughs = format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: b}}\nspec: {{containers: []}}\na0: &a0 [{}]\n",
        vec!["x"; 200].join(",")
    );
    for i in 1..6 {
        let refs = vec![format!("*a{}", i - 1); 8].join(",");
        laughs.push_str(&format!("a{i}: &a{i} [{refs}]\n"));
    }
    out.push(laughs);
    out
}

fn tokens() -> Vec<String> {
    [
        "\n---\n",
        "\n...\n",
        ": ",
        "- ",
        "\n  ",
        "&a ",
        "*a",
        "!!binary ",
        "{",
        "}",
        "[",
        "]",
        "'",
        "\"",
        "#",
        "|\n",
        ">-\n",
        "? ",
        "<<: *a\n",
        "\t",
        "\u{feff}",
        "%YAML 1.2\n",
        "apiVersion: v1\nkind: Pod\n",
        "kind: NetworkPolicy\n",
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\n",
    ]
    .into_iter()
    .map(String::from)
    .collect()
}

fn check(text: &str) -> Result<(), String> {
    let path = Path::new("fuzz/manifest.yaml");
    // Line breaks as YAML counts them (a lone \r, NEL, LS and PS too), plus the line after the
    // last one, where "unexpected end of stream" points.
    let breaks = text
        .replace("\r\n", "\n")
        .matches(['\n', '\r', '\u{85}', '\u{2028}', '\u{2029}'])
        .count();
    let lines = breaks + 2;
    let in_file = |e: &ManifestError| -> Result<(), String> {
        if e.path != path {
            return Err(format!("error names another file: {e}"));
        }
        if e.line == 0 || e.line > lines {
            return Err(format!(
                "line {} outside the file's {lines} lines: {e}",
                e.line
            ));
        }
        Ok(())
    };
    match load_manifests(path, text) {
        Ok(loaded) => loaded.skipped.iter().try_for_each(in_file),
        Err(e) => in_file(&e),
    }
}

#[test]
fn seeds_load() {
    // The last seed is the alias bomb, refused.
    let seeds = seeds();
    let (bomb, seeds) = seeds.split_last().expect("seeds");
    let e = load_manifests(Path::new("bomb.yaml"), bomb).expect_err("alias bomb");
    assert!(e.message.contains("aliases"), "{e}");
    for (i, s) in seeds.iter().enumerate() {
        let loaded = load_manifests(Path::new("seed.yaml"), s)
            .unwrap_or_else(|e| panic!("seed {i} does not load: {e}"));
        assert!(loaded.skipped.is_empty(), "seed {i}: {:?}", loaded.skipped);
    }
}

#[test]
fn yaml_text() {
    fuzz(
        "manifests::text",
        mutate::mutated_text(seeds(), tokens(), 8),
        |text| check(text),
    );
}

/// Each seed document as a JSON tree (the YAML data model, minus the aliases).
fn documents() -> Vec<Value> {
    let mut out = Vec::new();
    for s in loading_seeds() {
        for doc in serde_yaml_ng::Deserializer::from_str(&s) {
            if let Ok(v) = Value::deserialize(doc) {
                if v.is_object() {
                    out.push(v);
                }
            }
        }
    }
    out
}

#[test]
fn converted_objects() {
    let docs = documents();
    assert!(docs.len() >= 10, "{} seed documents", docs.len());
    let strategy = proptest::collection::vec(mutate::mutated_json(docs, 6), 1..3);
    fuzz("manifests::objects", strategy, |docs| {
        let text = docs
            .iter()
            .map(|d| serde_yaml_ng::to_string(d).map_err(|e| e.to_string()))
            .collect::<Result<Vec<_>, _>>()?
            .join("---\n");
        check(&text)
    });
}

//! The shipped ClusterRole grants exactly what the Kubernetes source
//! watches (read verbs only), update/patch on the status subresources the
//! controller writes, plus `create` on tokenreviews for the identity
//! service, nothing more.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;

use serde_yaml_ng::Value;
use weft_controller::identity::token::TOKEN_REVIEW_RBAC;
use weft_controller::lease::LeaseConfig;
use weft_controller::source::kube::{STATUS_RESOURCES, WATCHED_RESOURCES};

#[test]
fn cluster_role_grants_exactly_watch_status_and_token_review() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../charts/weft/templates/controller-rbac.yaml"
    );
    // The only template expression is the release namespace.
    let text = std::fs::read_to_string(path)
        .unwrap()
        .replace("{{ .Release.Namespace }}", "weft");
    assert!(
        !text.contains("{{"),
        "unexpected template expression in {path}"
    );
    let docs: Vec<Value> = serde_yaml_ng::Deserializer::from_str(&text)
        .map(|d| serde::Deserialize::deserialize(d).unwrap())
        .collect();
    let kinds: Vec<&str> = docs.iter().map(|d| d["kind"].as_str().unwrap()).collect();
    assert_eq!(
        kinds,
        [
            "ServiceAccount",
            "ClusterRole",
            "ClusterRoleBinding",
            "Role",
            "RoleBinding"
        ]
    );
    let mut granted = BTreeSet::new();
    let mut status = BTreeSet::new();
    let mut token_review = false;
    for rule in docs[1]["rules"].as_sequence().unwrap() {
        let verbs: BTreeSet<&str> = rule["verbs"]
            .as_sequence()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        let pairs: Vec<(String, String)> = rule["apiGroups"]
            .as_sequence()
            .unwrap()
            .iter()
            .flat_map(|g| {
                rule["resources"]
                    .as_sequence()
                    .unwrap()
                    .iter()
                    .map(move |r| {
                        (
                            g.as_str().unwrap().to_string(),
                            r.as_str().unwrap().to_string(),
                        )
                    })
            })
            .collect();
        let (tr_group, tr_resource, tr_verb) = TOKEN_REVIEW_RBAC;
        if verbs == BTreeSet::from([tr_verb]) {
            assert_eq!(
                pairs,
                [(tr_group.to_string(), tr_resource.to_string())],
                "{path}: only tokenreviews may be created: {rule:?}"
            );
            token_review = true;
            continue;
        }
        if verbs == BTreeSet::from(["update", "patch"]) {
            for (g, r) in &pairs {
                assert!(
                    r.ends_with("/status"),
                    "{path}: only status may be written: {rule:?}"
                );
                status.insert((g.clone(), r.clone()));
            }
            continue;
        }
        assert_eq!(
            verbs,
            BTreeSet::from(["get", "list", "watch"]),
            "{path}: {rule:?}"
        );
        granted.extend(pairs);
    }
    assert!(token_review, "{path} must allow creating tokenreviews");
    let watched: BTreeSet<(String, String)> = WATCHED_RESOURCES
        .iter()
        .map(|(g, r)| (g.to_string(), r.to_string()))
        .collect();
    assert_eq!(
        granted, watched,
        "{path} must grant exactly what source::kube watches"
    );
    let written: BTreeSet<(String, String)> = STATUS_RESOURCES
        .iter()
        .map(|(g, r)| (g.to_string(), r.to_string()))
        .collect();
    assert_eq!(
        status, written,
        "{path} must grant update/patch on exactly the status the controller writes"
    );
    assert_eq!(docs[2]["roleRef"]["name"], docs[1]["metadata"]["name"]);
    assert_eq!(docs[2]["subjects"][0]["name"], docs[0]["metadata"]["name"]);

    // Leader election: get/update on its own Lease, create of leases, in its namespace only.
    let lease = LeaseConfig::new("weft", "any");
    let role = &docs[3];
    assert_eq!(role["metadata"]["namespace"], lease.namespace.as_str());
    // (apiGroups, resources, resourceNames, verbs)
    type Rule<'a> = (Vec<&'a str>, Vec<&'a str>, Vec<&'a str>, Vec<&'a str>);
    let rules: Vec<Rule> = role["rules"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|r| {
            let list = |k: &str| {
                r[k].as_sequence()
                    .map(|s| s.iter().map(|v| v.as_str().unwrap()).collect())
                    .unwrap_or_default()
            };
            (
                list("apiGroups"),
                list("resources"),
                list("resourceNames"),
                list("verbs"),
            )
        })
        .collect();
    assert_eq!(
        rules,
        [
            (
                vec!["coordination.k8s.io"],
                vec!["leases"],
                vec![lease.name.as_str()],
                vec!["get", "update"]
            ),
            (
                vec!["coordination.k8s.io"],
                vec!["leases"],
                vec![],
                vec!["create"]
            ),
        ]
    );
    assert_eq!(docs[4]["roleRef"]["name"], role["metadata"]["name"]);
    assert_eq!(docs[4]["subjects"][0]["name"], docs[0]["metadata"]["name"]);
}

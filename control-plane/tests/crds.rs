//! The committed CRDs under `charts/weft/crds/` are exactly what the Rust
//! types generate. Regenerate after changing the types:
//! `WEFT_UPDATE_CRDS=1 cargo test -p weft-controller --test crds`.
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;

fn crds_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../charts/weft/crds")
}

#[test]
fn backend_policy_crd_matches_the_types() {
    let want = weft_controller::model::policy::crd_yaml().unwrap();
    let path = crds_dir().join("backendpolicies.policy.weft.dev.yaml");
    if std::env::var_os("WEFT_UPDATE_CRDS").is_some() {
        std::fs::create_dir_all(crds_dir()).unwrap();
        std::fs::write(&path, &want).unwrap();
    }
    let have = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        have == want,
        "{} differs from what model/src/policy.rs (weft-model) generates; \
         regenerate it with `WEFT_UPDATE_CRDS=1 cargo test -p weft-controller --test crds` \
         and commit the result",
        path.display()
    );
}

#[test]
fn backend_policy_crd_is_a_valid_crd_document() {
    let text =
        std::fs::read_to_string(crds_dir().join("backendpolicies.policy.weft.dev.yaml")).unwrap();
    let crd: k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition =
        serde_yaml_ng::from_str(&text).unwrap();
    assert_eq!(crd.spec.group, "policy.weft.dev");
    assert_eq!(crd.spec.names.kind, "BackendPolicy");
    assert_eq!(crd.spec.scope, "Namespaced");
    let v = &crd.spec.versions[0];
    assert_eq!(v.name, "v1alpha1");
    assert!(v.subresources.as_ref().unwrap().status.is_some());
}

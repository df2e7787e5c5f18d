//! The committed CRDs under `charts/weft/crds/` are exactly what the Rust
//! types generate (`weft_model::crd_files`). Regenerate after changing the
//! types: `WEFT_UPDATE_CRDS=1 cargo test -p weft-controller --test crds`.
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;

fn crds_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../charts/weft/crds")
}

#[test]
fn crds_match_the_types() {
    for (file, want) in weft_controller::model::crd_files().unwrap() {
        let path = crds_dir().join(&file);
        if std::env::var_os("WEFT_UPDATE_CRDS").is_some() {
            std::fs::create_dir_all(crds_dir()).unwrap();
            std::fs::write(&path, &want).unwrap();
        }
        let have = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            have == want,
            "{} differs from what weft-model (model/src/policy.rs, model/src/authz.rs) generates; \
             regenerate it with `WEFT_UPDATE_CRDS=1 cargo test -p weft-controller --test crds` \
             and commit the result",
            path.display()
        );
    }
}

#[test]
fn crds_are_valid_crd_documents() {
    let want = [
        (
            "backendpolicies.policy.weft.dev.yaml",
            "BackendPolicy",
            true,
        ),
        ("servers.policy.weft.dev.yaml", "Server", false),
        (
            "authorizationpolicies.policy.weft.dev.yaml",
            "AuthorizationPolicy",
            false,
        ),
    ];
    let files: Vec<String> = weft_controller::model::crd_files()
        .unwrap()
        .into_iter()
        .map(|(f, _)| f)
        .collect();
    assert_eq!(files, want.map(|(f, _, _)| f.to_string()));
    for (file, kind, status) in want {
        let text = std::fs::read_to_string(crds_dir().join(file)).unwrap();
        let crd: CustomResourceDefinition = serde_yaml_ng::from_str(&text).unwrap();
        assert_eq!(crd.spec.group, "policy.weft.dev");
        assert_eq!(crd.spec.names.kind, kind);
        assert_eq!(crd.spec.scope, "Namespaced");
        let v = &crd.spec.versions[0];
        assert_eq!(v.name, "v1alpha1");
        assert_eq!(
            v.subresources.as_ref().is_some_and(|s| s.status.is_some()),
            status,
            "{file}"
        );
    }
}

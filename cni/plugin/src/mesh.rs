//! The mesh's redirect, installed by the plugin: for a pod the injector prepared in CNI mode,
//! the iptables rules `weft-init` would have installed, from the same code (`weft-redirect`),
//! so the pod needs no privileged init container (Linkerd's `linkerd-cni`, Istio's CNI mode).
//!
//! # How the plugin learns what to install
//!
//! The injector writes the complete redirect configuration into one pod annotation,
//! `weft.dev/redirect` (see `weft_redirect::config` for why one annotation and not the user's
//! `config.weft.dev/*` ones re-derived here). The plugin gets the pod's annotations from the
//! container runtime, with the ADD itself: the conflist declares the CNI capability
//! [`POD_ANNOTATIONS_CAPABILITY`] and the runtime passes the sandbox's annotations under
//! `runtimeConfig` (containerd since 1.5, CRI-O since 1.29; the kubelet copies the pod's
//! annotations into the sandbox config).
//!
//! Why the runtime and not the node agent's index: the annotations arrive with the very call
//! that needs them, so there is no race with an informer that has not seen the new pod yet
//! (no bounded wait, no "pod unknown" case), the plugin needs no Kubernetes client, and the
//! decision does not depend on the agent having synced. The agent's index does not keep pod
//! annotations anyway (`weft_model::Pod` holds only what policy and discovery read).
//!
//! # What happens when
//!
//! | the runtime passed | ADD | CHECK |
//! |---|---|---|
//! | annotations with `weft.dev/redirect` | install (idempotent: a retried ADD leaves the same table); a value that does not decode fails with code 7 naming the annotation and the value | the nat table must hold exactly those rules (code 105 otherwise) |
//! | annotations without it | nothing (not meshed, or meshed with `weft-init`) | nothing |
//! | no annotations, capability declared | **fail** (code 7): the runtime does not pass annotations, so the plugin cannot tell a meshed pod from another, and a meshed pod without its redirect would bypass the proxy and its policy | nothing to compare |
//! | no annotations, capability not declared | nothing: CNI mesh mode is off in this conflist | nothing |
//!
//! The agent is asked before the redirect is installed (ADD registers the endpoint first, as
//! always): with the agent down ADD fails with code 11 for every pod, meshed or not, as
//! before. DEL does nothing here: the rules live in the pod's network namespace and die with it.
//!
//! The rules are written with the iptables programs (`iptables-nft-restore` and friends, the
//! backend the annotation names; `auto` by default) found on the runtime's `PATH` on the node,
//! run inside the pod's namespace.

use serde_json::Value;
use weft_redirect::{RedirectConfig, SystemRunner, ANNOTATION};

use crate::config::NetConf;
use crate::error::Error;
use crate::wiring::netns::Netns;

/// The CNI capability under which containerd and CRI-O pass the pod's annotations.
pub const POD_ANNOTATIONS_CAPABILITY: &str = "io.kubernetes.cri.pod-annotations";

/// The configuration field a bad or missing annotation is reported under.
fn field() -> String {
    format!("runtimeConfig.{POD_ANNOTATIONS_CAPABILITY}[{ANNOTATION}]")
}

/// What the pod needs, from the configuration on stdin (ADD): `Some` when the runtime passed
/// the injector's `weft.dev/redirect` annotation; an error when it cannot be known.
pub fn expected(conf: &NetConf) -> Result<Option<RedirectConfig>, Error> {
    redirect_of(conf, true)
}

/// [`expected`] for CHECK: a runtime that passed no annotations leaves nothing to compare.
pub fn to_verify(conf: &NetConf) -> Result<Option<RedirectConfig>, Error> {
    redirect_of(conf, false)
}

fn redirect_of(conf: &NetConf, strict: bool) -> Result<Option<RedirectConfig>, Error> {
    let declared = conf
        .raw
        .get("capabilities")
        .and_then(|c| c.get(POD_ANNOTATIONS_CAPABILITY))
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let passed = conf
        .raw
        .get("runtimeConfig")
        .and_then(|r| r.as_object())
        .and_then(|r| r.get(POD_ANNOTATIONS_CAPABILITY));
    let annotations = match passed {
        // `null`: the runtime passes annotations and this sandbox has none.
        Some(Value::Null) => return Ok(None),
        Some(Value::Object(a)) => a,
        Some(other) => {
            return Err(Error::config(
                format!("runtimeConfig.{POD_ANNOTATIONS_CAPABILITY}"),
                format!("expected an object of pod annotations, got {other}"),
            ))
        }
        None if declared && strict => {
            return Err(Error::config(
                format!("runtimeConfig.{POD_ANNOTATIONS_CAPABILITY}"),
                format!(
                    "missing, though the network configuration declares the capability \
                     {POD_ANNOTATIONS_CAPABILITY}: the container runtime does not pass pod \
                     annotations to CNI plugins (containerd 1.5+ and CRI-O 1.29+ do), so \
                     weft-cni cannot tell whether the pod needs the mesh's redirect ({ANNOTATION}). \
                     Upgrade the runtime, or turn CNI mesh mode off (remove the capability and \
                     run the injector without --cni, so that weft-init installs the redirect)"
                ),
            ))
        }
        None => return Ok(None),
    };
    match annotations.get(ANNOTATION) {
        None => Ok(None),
        Some(Value::String(v)) => RedirectConfig::from_annotation(v)
            .map(Some)
            .map_err(|e| Error::config(field(), e.to_string())),
        Some(other) => Err(Error::config(
            field(),
            format!("annotation {ANNOTATION}={other} is not a string"),
        )),
    }
}

/// Installs `cfg` in the pod's namespace (ADD). Installing twice leaves the same table.
pub fn install(netns: &Netns, cfg: &RedirectConfig) -> Result<(), Error> {
    netns.run(|| {
        // The iptables programs are children of this thread, so they run in the pod's
        // namespace (namespaces are inherited from the forking thread).
        weft_redirect::install(&mut SystemRunner, cfg)
            .map(drop)
            .map_err(|e| Error::MeshRedirect {
                netns: netns.path().to_string(),
                reason: e.to_string(),
            })
    })
}

/// Checks that the pod's nat table holds `cfg`'s redirect (CHECK).
pub fn verify(netns: &Netns, cfg: &RedirectConfig) -> Result<(), Error> {
    netns.run(|| {
        weft_redirect::verify(&mut SystemRunner, cfg).map_err(|e| Error::CheckMismatch {
            what: format!("the mesh redirect ({ANNOTATION}) in {}: {e}", netns.path()),
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn conf(extra: Value) -> NetConf {
        let mut base = json!({"cniVersion": "1.1.0", "name": "weft", "type": "weft-cni"});
        if let (Some(b), Value::Object(e)) = (base.as_object_mut(), extra) {
            b.extend(e);
        }
        NetConf::parse(base.to_string().as_bytes()).expect("conf")
    }

    fn with_annotations(a: Value) -> NetConf {
        conf(json!({
            "capabilities": {POD_ANNOTATIONS_CAPABILITY: true},
            "runtimeConfig": {POD_ANNOTATIONS_CAPABILITY: a},
        }))
    }

    #[test]
    fn the_injectors_annotation_decides() {
        let cfg = RedirectConfig {
            skip_outbound_ports: "5432".parse().unwrap_or_default(),
            ..Default::default()
        };
        let got = expected(&with_annotations(json!({
            ANNOTATION: cfg.to_annotation(),
            "kubernetes.io/config.seen": "2026-12-05T00:00:00Z",
        })))
        .expect("decodes");
        assert_eq!(got, Some(cfg));

        // Not meshed by the CNI: other annotations, none at all, or mesh mode off.
        let none = [
            with_annotations(json!({"weft.dev/proxy-version": "0.1.0"})),
            with_annotations(Value::Null),
            conf(json!({})),
        ];
        for c in none {
            assert_eq!(expected(&c).expect("no redirect"), None);
        }
    }

    #[test]
    fn bad_or_unknowable_is_an_error_naming_what() {
        let e = expected(&with_annotations(json!({ANNOTATION: "{\"proxyUid\":1}"})))
            .expect_err("bad value");
        assert_eq!(e.code(), crate::error::codes::INVALID_CONFIG);
        let msg = e.to_string();
        assert!(
            msg.contains(ANNOTATION) && msg.contains("proxyUid"),
            "{msg}"
        );

        let e = expected(&with_annotations(json!({ ANNOTATION: 7 }))).expect_err("not a string");
        assert!(e.to_string().contains(ANNOTATION), "{e}");

        // Mesh mode declared, runtime silent: fail rather than leave a meshed pod unredirected.
        let silent = conf(json!({"capabilities": {POD_ANNOTATIONS_CAPABILITY: true}}));
        let e = expected(&silent).expect_err("runtime passes nothing");
        assert!(e.to_string().contains("containerd 1.5+"), "{e}");
        // CHECK then has nothing to compare.
        assert_eq!(to_verify(&silent).expect("nothing to check"), None);
    }
}

//! Offline injection over manifests (`weft inject`): multi-document YAML in, the same documents
//! out with every workload's pod template injected.
//!
//! Workloads are Pods and everything that carries a pod template: Deployments, StatefulSets,
//! DaemonSets, ReplicaSets, ReplicationControllers, Jobs, CronJobs, and `kind: List` of those.
//! Other documents are passed through byte for byte; injected documents are re-serialized (so
//! their comments are lost). Offline there is no namespace to ask, so every workload is treated
//! as if its namespace said `weft.dev/inject: enabled`; pods that opt out stay as they are.

use serde_json::Value;

use crate::patch::{patch_pod, Decision, InjectConfig, NamespaceMeta, Outcome, PatchError};

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("document {index}: not valid YAML: {source}")]
    Yaml {
        index: usize,
        #[source]
        source: serde_yaml_ng::Error,
    },
    #[error("document {index} ({kind} {name}): {source}")]
    Inject {
        index: usize,
        kind: String,
        name: String,
        #[source]
        source: Box<PatchError>,
    },
    #[error("document {index} ({kind} {name}): the patch does not apply: {source}")]
    Apply {
        index: usize,
        kind: String,
        name: String,
        #[source]
        source: json_patch::PatchError,
    },
    #[error("document {index}: cannot write YAML: {source}")]
    Write {
        index: usize,
        #[source]
        source: serde_yaml_ng::Error,
    },
}

/// Where a workload kind keeps its pod template (`Some("")` for a Pod itself).
pub fn template_pointer(kind: &str) -> Option<&'static str> {
    match kind {
        "Pod" => Some(""),
        "Deployment"
        | "StatefulSet"
        | "DaemonSet"
        | "ReplicaSet"
        | "ReplicationController"
        | "Job" => Some("/spec/template"),
        "CronJob" => Some("/spec/jobTemplate/spec/template"),
        _ => None,
    }
}

/// What happened to one object.
#[derive(Debug, Clone, PartialEq)]
pub enum ObjectResult {
    /// Not a workload: untouched.
    NotWorkload,
    /// A workload; the decision and the patched object (equal to the input when skipped).
    Workload { decision: Decision, object: Value },
}

/// Injects one Kubernetes object (any kind).
pub fn inject_object(obj: &Value, cfg: &InjectConfig) -> Result<ObjectResult, ObjectError> {
    let kind = obj.get("kind").and_then(Value::as_str).unwrap_or_default();
    if kind == "List" {
        let Some(items) = obj.get("items").and_then(Value::as_array) else {
            return Ok(ObjectResult::NotWorkload);
        };
        let mut out = obj.clone();
        let mut any = false;
        let mut decision = Decision::Skip(crate::patch::SkipReason::NotEnabled);
        let mut new_items = Vec::with_capacity(items.len());
        for item in items {
            match inject_object(item, cfg)? {
                ObjectResult::NotWorkload => new_items.push(item.clone()),
                ObjectResult::Workload {
                    decision: d,
                    object,
                } => {
                    any = true;
                    if d == Decision::Inject {
                        decision = d;
                    }
                    new_items.push(object);
                }
            }
        }
        if !any {
            return Ok(ObjectResult::NotWorkload);
        }
        out["items"] = Value::Array(new_items);
        return Ok(ObjectResult::Workload {
            decision,
            object: out,
        });
    }
    let Some(ptr) = template_pointer(kind) else {
        return Ok(ObjectResult::NotWorkload);
    };
    let Some(template) = obj.pointer(ptr) else {
        return Err(ObjectError::Inject(PatchError::MissingSpec));
    };
    let ns = obj
        .pointer("/metadata/namespace")
        .and_then(Value::as_str)
        .unwrap_or("default");
    let Outcome { decision, patch } =
        patch_pod(template, ptr, &NamespaceMeta::enabled(ns), cfg).map_err(ObjectError::Inject)?;
    let mut object = obj.clone();
    json_patch::patch(&mut object, &patch).map_err(ObjectError::Apply)?;
    Ok(ObjectResult::Workload { decision, object })
}

#[derive(Debug, thiserror::Error)]
pub enum ObjectError {
    #[error(transparent)]
    Inject(PatchError),
    #[error(transparent)]
    Apply(json_patch::PatchError),
}

/// Splits multi-document YAML at `---` lines, keeping each document's text.
pub fn split_documents(text: &str) -> Vec<&str> {
    let mut docs = Vec::new();
    let mut start = 0;
    let mut pos = 0;
    for line in text.split_inclusive('\n') {
        let bare = line.trim_end_matches(['\n', '\r']);
        let is_marker = bare == "---"
            || bare.starts_with("--- ")
            || bare.starts_with("---\t")
            || bare.starts_with("---#");
        if is_marker {
            docs.push(&text[start..pos]);
            start = pos + line.len();
        }
        pos += line.len();
    }
    docs.push(&text[start..]);
    docs
}

fn is_blank(doc: &str) -> bool {
    doc.lines()
        .all(|l| l.trim().is_empty() || l.trim_start().starts_with('#'))
}

/// Injects every workload in a multi-document YAML stream. Document indexes in errors count
/// from 0 over the documents that have content.
pub fn inject_yaml(text: &str, cfg: &InjectConfig) -> Result<String, ManifestError> {
    let mut out = Vec::new();
    for (index, doc) in split_documents(text)
        .into_iter()
        .filter(|d| !is_blank(d))
        .enumerate()
    {
        // Refuse alias bombs before they expand (weft_model::yaml).
        weft_model::yaml::check_expansion(doc)
            .map_err(|source| ManifestError::Yaml { index, source })?;
        let value: Value =
            serde_yaml_ng::from_str(doc).map_err(|source| ManifestError::Yaml { index, source })?;
        let kind = value
            .get("kind")
            .and_then(Value::as_str)
            .unwrap_or("<no kind>")
            .to_string();
        let name = value
            .pointer("/metadata/name")
            .and_then(Value::as_str)
            .unwrap_or("<no name>")
            .to_string();
        match inject_object(&value, cfg) {
            Ok(ObjectResult::Workload {
                decision: Decision::Inject,
                object,
            }) => {
                let yaml = serde_yaml_ng::to_string(&object)
                    .map_err(|source| ManifestError::Write { index, source })?;
                out.push(yaml);
            }
            Ok(_) => out.push(doc.to_string()),
            Err(ObjectError::Inject(source)) => {
                return Err(ManifestError::Inject {
                    index,
                    kind,
                    name,
                    source: Box::new(source),
                })
            }
            Err(ObjectError::Apply(source)) => {
                return Err(ManifestError::Apply {
                    index,
                    kind,
                    name,
                    source,
                })
            }
        }
    }
    let mut s = String::new();
    for (i, doc) in out.iter().enumerate() {
        if i > 0 {
            s.push_str("---\n");
        }
        s.push_str(doc);
        if !doc.ends_with('\n') {
            s.push('\n');
        }
    }
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alias_bombs_are_refused_before_they_expand() {
        let mut bomb = String::from(
            "kind: Pod\nmetadata: {name: web}\nx0: &x0 [a, a, a, a, a, a, a, a, a, a]\n",
        );
        for i in 1..9 {
            let p = i - 1;
            bomb.push_str(&format!("x{i}: &x{i} [*x{p}, *x{p}, *x{p}, *x{p}, *x{p}, *x{p}, *x{p}, *x{p}, *x{p}, *x{p}]\n"));
        }
        let started = std::time::Instant::now();
        let err = inject_yaml(&bomb, &InjectConfig::default())
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("document 0: not valid YAML") && err.contains("expands to more than"),
            "{err}"
        );
        assert!(started.elapsed() < std::time::Duration::from_secs(2));
    }

    #[test]
    fn splits_documents() {
        let docs = split_documents("---\na: 1\n---\nb: 2\n--- # c\nc: 3");
        assert_eq!(docs, vec!["", "a: 1\n", "b: 2\n", "c: 3"]);
        assert_eq!(split_documents("a: '---'\n"), vec!["a: '---'\n"]);
    }
}

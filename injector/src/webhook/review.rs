//! One AdmissionReview: request bytes in, HTTP status and response JSON out.
//!
//! The answers, from the API server's point of view:
//! - a review we can answer (it has `request.uid`) always gets 200 and an AdmissionReview v1
//!   response: `allowed: true` with a JSONPatch when injecting; `allowed: true` with no patch
//!   and a `status.message` saying why when skipping or when the review is not one we handle
//!   (wrong apiVersion, not a Pod, not CREATE, unparsable pod); `allowed: false` (code 400)
//!   when the pod's `weft.dev/*` annotations are invalid, naming the annotation and the value,
//!   so the user sees the mistake instead of a silently unmeshed pod;
//! - a body that is not JSON or has no `request.uid` cannot be answered as a review: 400 with
//!   `{"error": ...}`.

use base64::Engine;
use serde_json::{json, Value};

use crate::patch::{patch_pod, Decision, InjectConfig, NamespaceMeta, PatchError};
use crate::webhook::namespaces::NamespaceSource;

pub const API_VERSION: &str = "admission.k8s.io/v1";

/// What one review came to, for logs and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Injected,
    Skipped,
    Ignored,
    Denied,
    BadRequest,
}

impl Verdict {
    pub fn label(self) -> &'static str {
        match self {
            Verdict::Injected => "injected",
            Verdict::Skipped => "skipped",
            Verdict::Ignored => "ignored",
            Verdict::Denied => "denied",
            Verdict::BadRequest => "bad_request",
        }
    }
}

/// The HTTP answer to one review.
#[derive(Debug, Clone, PartialEq)]
pub struct Reply {
    pub status: u16,
    pub body: Value,
    pub result: Verdict,
}

impl Reply {
    /// A 400 with `{"error": message}`, for bodies that cannot be answered as a review.
    pub fn error(status: u16, message: impl Into<String>) -> Self {
        Self {
            status,
            body: json!({ "error": message.into() }),
            result: Verdict::BadRequest,
        }
    }
}

fn review(uid: &str, response: Value) -> Value {
    let mut response = response;
    response["uid"] = Value::String(uid.to_string());
    json!({ "apiVersion": API_VERSION, "kind": "AdmissionReview", "response": response })
}

fn allowed(uid: &str, message: &str, result: Verdict) -> Reply {
    Reply {
        status: 200,
        body: review(
            uid,
            json!({ "allowed": true, "status": { "code": 200, "message": message } }),
        ),
        result,
    }
}

/// Answers one AdmissionReview request body.
pub async fn handle(body: &[u8], namespaces: &dyn NamespaceSource, cfg: &InjectConfig) -> Reply {
    let v: Value = match serde_json::from_slice(body) {
        Ok(v) => v,
        Err(e) => return Reply::error(400, format!("request body is not JSON: {e}")),
    };
    let Some(uid) = v.pointer("/request/uid").and_then(Value::as_str) else {
        return Reply::error(
            400,
            "not an AdmissionReview: no request.uid (the injector answers AdmissionReview admission.k8s.io/v1)",
        );
    };
    let api_version = v.get("apiVersion").and_then(Value::as_str).unwrap_or("");
    let kind = v.get("kind").and_then(Value::as_str).unwrap_or("");
    if api_version != API_VERSION || kind != "AdmissionReview" {
        return allowed(
            uid,
            &format!(
                "weft-injector: unsupported review {api_version:?} {kind:?} (want {API_VERSION} AdmissionReview); not injected"
            ),
            Verdict::Ignored,
        );
    }
    let req = &v["request"];
    let gvk = (
        req.pointer("/kind/group")
            .and_then(Value::as_str)
            .unwrap_or(""),
        req.pointer("/kind/version")
            .and_then(Value::as_str)
            .unwrap_or(""),
        req.pointer("/kind/kind")
            .and_then(Value::as_str)
            .unwrap_or(""),
    );
    if gvk != ("", "v1", "Pod") {
        return allowed(
            uid,
            &format!(
                "weft-injector: only core/v1 Pods are injected, not {}/{}/{}; not injected",
                gvk.0, gvk.1, gvk.2
            ),
            Verdict::Ignored,
        );
    }
    let operation = req
        .get("operation")
        .and_then(Value::as_str)
        .unwrap_or("CREATE");
    if operation != "CREATE" {
        return allowed(
            uid,
            &format!("weft-injector: pods are injected on CREATE, not {operation}"),
            Verdict::Ignored,
        );
    }
    let Some(pod) = req.get("object").filter(|o| o.is_object()) else {
        return allowed(
            uid,
            "weft-injector: the review has no request.object; not injected",
            Verdict::Ignored,
        );
    };
    let ns_name = req
        .get("namespace")
        .and_then(Value::as_str)
        .or_else(|| pod.pointer("/metadata/namespace").and_then(Value::as_str))
        .unwrap_or("default");
    let pod_name = pod
        .pointer("/metadata/name")
        .or_else(|| pod.pointer("/metadata/generateName"))
        .and_then(Value::as_str)
        .unwrap_or("");
    let ns = match namespaces.get(ns_name).await {
        Ok(ns) => ns,
        Err(e) => {
            // The pod's own annotation can still decide; only the namespace's is unknown.
            tracing::warn!(namespace = ns_name, error = %e, "namespace lookup failed");
            NamespaceMeta {
                name: ns_name.to_string(),
                ..Default::default()
            }
        }
    };
    match patch_pod(pod, "", &ns, cfg) {
        Ok(outcome) => match outcome.decision {
            Decision::Inject => {
                let patch = match serde_json::to_vec(&outcome.patch) {
                    Ok(p) => p,
                    Err(e) => {
                        return allowed(
                            uid,
                            &format!("weft-injector: cannot encode the patch: {e}"),
                            Verdict::Ignored,
                        )
                    }
                };
                tracing::info!(
                    namespace = ns_name,
                    pod = pod_name,
                    ops = outcome.patch.0.len(),
                    "injected"
                );
                Reply {
                    status: 200,
                    body: review(
                        uid,
                        json!({
                            "allowed": true,
                            "patchType": "JSONPatch",
                            "patch": base64::engine::general_purpose::STANDARD.encode(patch),
                        }),
                    ),
                    result: Verdict::Injected,
                }
            }
            Decision::Skip(reason) => {
                tracing::debug!(namespace = ns_name, pod = pod_name, %reason, "not injected");
                allowed(
                    uid,
                    &format!("weft-injector: not injected: {reason}"),
                    Verdict::Skipped,
                )
            }
        },
        Err(e @ PatchError::Annotation { .. }) => {
            tracing::info!(namespace = ns_name, pod = pod_name, error = %e, "denied");
            Reply {
                status: 200,
                body: review(
                    uid,
                    json!({
                        "allowed": false,
                        "status": { "code": 400, "reason": "BadRequest", "message": format!("weft-injector: {e}") },
                    }),
                ),
                result: Verdict::Denied,
            }
        }
        Err(e) => allowed(
            uid,
            &format!("weft-injector: {e}; not injected"),
            Verdict::Ignored,
        ),
    }
}

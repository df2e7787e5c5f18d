//! The injector's AdmissionReview handling (`webhook::review::handle`), through `patch_pod`
//! and the `weft.dev/*` / `config.weft.dev/*` annotation parsing.
//!
//! Beyond "no panic": every answer is one the API server can use (a review with our uid, or
//! a 400 with an error), and an injection's JSONPatch applies to the pod it was made for and
//! yields a pod that a second review leaves alone (the webhook may be invoked again).

use base64::Engine;
use proptest::collection::vec;
use proptest::prelude::*;
use serde_json::{json, Value};
use weft_fuzz::{fuzz, mutate};
use weft_injector::annotations as ann;
use weft_injector::patch::{patch_pod, Decision, InjectConfig, NamespaceMeta, SkipReason};
use weft_injector::webhook::namespaces::StaticNamespaces;
use weft_injector::webhook::review::{handle, Verdict};

const UID: &str = "705ab4f5-6393-11e8-b7cc-42010a800002";

fn review(ns: &str, annotations: Value, spec: Value) -> Value {
    json!({
        "kind": "AdmissionReview",
        "apiVersion": "admission.k8s.io/v1",
        "request": {
            "uid": UID,
            "kind": { "group": "", "version": "v1", "kind": "Pod" },
            "resource": { "group": "", "version": "v1", "resource": "pods" },
            "namespace": ns,
            "operation": "CREATE",
            "userInfo": { "username": "admin", "groups": ["system:authenticated"] },
            "object": {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {
                    "generateName": "web-7d4b9c-",
                    "namespace": ns,
                    "labels": { "app": "web" },
                    "annotations": annotations,
                },
                "spec": spec,
            },
            "dryRun": false,
        }
    })
}

fn web_spec() -> Value {
    json!({
        "containers": [{
            "name": "web",
            "image": "nginx:1.27",
            "ports": [{ "name": "http", "containerPort": 80, "protocol": "TCP" },
                      { "name": "metrics", "containerPort": 9090 }],
            "readinessProbe": { "httpGet": { "path": "/ready", "port": "http" } },
            "livenessProbe": { "tcpSocket": { "port": 80 } },
            "env": [{ "name": "A", "value": "b" }],
            "resources": { "requests": { "cpu": "100m" } },
        }],
        "serviceAccountName": "web",
    })
}

fn seeds() -> Vec<Value> {
    let enabled = json!({ ann::INJECT: ann::ENABLED });
    vec![
        review("default", enabled.clone(), web_spec()),
        review("meshed", json!({}), web_spec()),
        review(
            "default",
            json!({
                ann::INJECT: "enabled",
                ann::SKIP_INBOUND_PORTS: "22,8000-8100",
                ann::SKIP_OUTBOUND_PORTS: "5432",
                ann::SKIP_INBOUND_CIDRS: "10.0.0.0/8",
                ann::SKIP_OUTBOUND_CIDRS: "169.254.169.254/32,fd00::/8",
                ann::OPAQUE_PORTS: "3306",
                ann::CNI: "enabled",
                ann::NATIVE_SIDECAR: "disabled",
                ann::ACCESS_LOG: "json",
                ann::TRACE_COLLECTOR: "otel.monitoring:4317",
                ann::TRACE_SAMPLING: "0.5",
                ann::PROXY_LOG: "warn,weft=debug",
                ann::PROXY_CPU_REQUEST: "50m",
                ann::PROXY_CPU_LIMIT: "1",
                ann::PROXY_MEMORY_REQUEST: "20Mi",
                ann::PROXY_MEMORY_LIMIT: "1Gi",
                ann::PROMETHEUS_SCRAPE: "true",
            }),
            web_spec(),
        ),
        review(
            "default",
            enabled.clone(),
            json!({
                "initContainers": [{ "name": "migrate", "image": "migrate:1" },
                                   { "name": "sidecar", "image": "s:1", "restartPolicy": "Always" }],
                "containers": [{ "name": "app", "image": "app:1" }, { "name": "two", "image": "b:2" }],
            }),
        ),
        review(
            "default",
            enabled.clone(),
            json!({ "hostNetwork": true, "containers": [{ "name": "a" }] }),
        ),
        review(
            "default",
            json!({ ann::INJECT: "enabled", ann::PROXY_VERSION: "0.1.0" }),
            web_spec(),
        ),
        review("default", json!({ ann::INJECT: "disabled" }), web_spec()),
    ]
}

/// Annotation values: valid, nearly valid and odd.
fn annotation_value() -> impl Strategy<Value = String> {
    let samples: Vec<String> = [
        "enabled",
        "disabled",
        " enabled ",
        "Enabled",
        "",
        "80",
        "0",
        "65535",
        "65536",
        "1-65535",
        "8000-7999",
        "22,80,443",
        ",",
        "80,,81",
        "10.0.0.0/8",
        "::/0",
        "10.0.0.1/33",
        "fd00::/129",
        "1.2.3.4",
        "10m",
        "1",
        "1.5",
        "0.5Gi",
        "1e3",
        "100Mi",
        "-1",
        "json",
        "apache",
        "xml",
        "otel:4317",
        "otel",
        ":4317",
        "0.01",
        "2",
        "NaN",
        "warn",
        "\u{0}",
    ]
    .into_iter()
    .map(String::from)
    .collect();
    prop_oneof![
        4 => prop::sample::select(samples.clone()),
        2 => mutate::mutated_text(samples, vec![",".into(), "-".into(), "/".into()], 3),
        1 => "\\PC{0,16}",
    ]
}

fn annotated_reviews() -> impl Strategy<Value = Value> {
    let keys = vec![
        ann::INJECT,
        ann::SKIP_INBOUND_PORTS,
        ann::SKIP_OUTBOUND_PORTS,
        ann::SKIP_INBOUND_CIDRS,
        ann::SKIP_OUTBOUND_CIDRS,
        ann::OPAQUE_PORTS,
        ann::CNI,
        ann::NATIVE_SIDECAR,
        ann::ACCESS_LOG,
        ann::TRACE_COLLECTOR,
        ann::TRACE_SAMPLING,
        ann::PROXY_LOG,
        ann::PROXY_CPU_REQUEST,
        ann::PROXY_CPU_LIMIT,
        ann::PROXY_MEMORY_REQUEST,
        ann::PROXY_MEMORY_LIMIT,
        ann::PROMETHEUS_SCRAPE,
        ann::PROMETHEUS_PORT,
        ann::PROMETHEUS_PATH,
    ];
    vec((prop::sample::select(keys), annotation_value()), 0..8).prop_map(|pairs| {
        let mut a = serde_json::Map::new();
        a.insert(ann::INJECT.into(), ann::ENABLED.into());
        for (k, v) in pairs {
            a.insert(k.to_string(), Value::String(v));
        }
        review("default", Value::Object(a), web_spec())
    })
}

fn namespaces() -> StaticNamespaces {
    StaticNamespaces::new([NamespaceMeta::enabled("meshed")])
}

/// The property: a usable answer, and an injection whose patch applies and sticks.
fn check(rt: &tokio::runtime::Runtime, body: &[u8], cfg: &InjectConfig) -> Result<(), String> {
    let reply = rt.block_on(handle(body, &namespaces(), cfg));
    let request: Option<Value> = serde_json::from_slice(body).ok();
    match reply.status {
        400 => {
            if reply.body.get("error").and_then(Value::as_str).is_none() {
                return Err(format!("400 without an error message: {}", reply.body));
            }
            return Ok(());
        }
        200 => {}
        s => return Err(format!("status {s}")),
    }
    let uid = request
        .as_ref()
        .and_then(|r| r.pointer("/request/uid"))
        .and_then(Value::as_str);
    if reply.body.pointer("/response/uid").and_then(Value::as_str) != uid {
        return Err(format!("response uid is not the request's: {}", reply.body));
    }
    if reply.result != Verdict::Injected {
        return Ok(());
    }
    let patch = reply
        .body
        .pointer("/response/patch")
        .and_then(Value::as_str)
        .ok_or("injected without a patch")?;
    let patch = base64::engine::general_purpose::STANDARD
        .decode(patch)
        .map_err(|e| format!("patch is not base64: {e}"))?;
    let ops: json_patch::Patch =
        serde_json::from_slice(&patch).map_err(|e| format!("patch is not a JSONPatch: {e}"))?;
    let mut pod = request
        .as_ref()
        .and_then(|r| r.pointer("/request/object"))
        .cloned()
        .ok_or("injected a review without an object")?;
    json_patch::patch(&mut pod, &ops).map_err(|e| format!("the patch does not apply: {e}"))?;
    let ns = NamespaceMeta::enabled("default");
    match patch_pod(&pod, "", &ns, cfg) {
        Ok(o) if o.decision == Decision::Skip(SkipReason::AlreadyInjected) => Ok(()),
        Ok(o) => Err(format!(
            "the patched pod is not seen as injected: {:?}",
            o.decision
        )),
        Err(e) => Err(format!("the patched pod does not parse: {e}")),
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime")
}

#[test]
fn seeds_are_injected_or_skipped_as_meant() {
    let rt = runtime();
    let cfg = InjectConfig::default();
    let want = [
        Verdict::Injected,
        Verdict::Injected,
        Verdict::Injected,
        Verdict::Injected,
        Verdict::Skipped,
        Verdict::Skipped,
        Verdict::Skipped,
    ];
    for (i, (seed, want)) in seeds().iter().zip(want).enumerate() {
        let body = serde_json::to_vec(seed).expect("json");
        check(&rt, &body, &cfg).unwrap_or_else(|e| panic!("seed {i}: {e}"));
        let reply = rt.block_on(handle(&body, &namespaces(), &cfg));
        assert_eq!(reply.result, want, "seed {i}: {}", reply.body);
    }
}

#[test]
fn reviews_mutated_as_trees() {
    let rt = runtime();
    let cfg = InjectConfig::default();
    fuzz(
        "admission::review",
        mutate::mutated_json(seeds(), 6),
        |review| {
            let body = serde_json::to_vec(review).map_err(|e| e.to_string())?;
            check(&rt, &body, &cfg)
        },
    );
}

#[test]
fn annotations() {
    let rt = runtime();
    let cfg = InjectConfig::default();
    fuzz("admission::annotations", annotated_reviews(), |review| {
        let body = serde_json::to_vec(review).map_err(|e| e.to_string())?;
        check(&rt, &body, &cfg)
    });
}

#[test]
fn review_bytes() {
    let rt = runtime();
    let cfg = InjectConfig::default();
    let seeds: Vec<Vec<u8>> = seeds()
        .iter()
        .map(|s| serde_json::to_vec_pretty(s).expect("json"))
        .collect();
    let tokens = [
        "{", "}", "[", "]", "\"", ",", ":", "null", "\\u0000", "1e999", "-0",
    ]
    .iter()
    .map(|t| t.as_bytes().to_vec())
    .collect();
    fuzz(
        "admission::bytes",
        mutate::mutated_bytes(seeds, tokens, 6),
        |body| check(&rt, body, &cfg),
    );
}

//! The patch on realistic pods, checked field by field after applying it with json-patch, plus
//! property tests: a patched pod patched again gets an empty patch, and the patch only adds.
#![allow(clippy::unwrap_used)]

use json_patch::PatchOperation;
use proptest::prelude::*;
use serde_json::{json, Value};
use weft_injector::manifest::{inject_object, inject_yaml, ObjectResult};
use weft_injector::patch::{
    patch_pod, Decision, InjectConfig, NamespaceMeta, PatchError, SkipReason, INIT_CONTAINER,
    PROXY_CONTAINER, TOKEN_VOLUME,
};

/// A web app: two containers with named ports, an existing init container, volumes, pod- and
/// container-level security contexts.
fn web_pod() -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": "web-7d9f",
            "namespace": "shop",
            "labels": { "app": "web" },
            "annotations": { "team": "storefront" }
        },
        "spec": {
            "serviceAccountName": "web",
            "securityContext": { "runAsNonRoot": true, "fsGroup": 2000 },
            "initContainers": [{
                "name": "migrate",
                "image": "shop/migrate:1.2",
                "args": ["--up"]
            }],
            "containers": [
                {
                    "name": "web",
                    "image": "shop/web:3.1",
                    "ports": [{ "name": "http", "containerPort": 8080 }, { "name": "grpc", "containerPort": 9090 }],
                    "securityContext": { "readOnlyRootFilesystem": true, "runAsUser": 1000 },
                    "volumeMounts": [{ "name": "cache", "mountPath": "/cache" }],
                    "readinessProbe": { "httpGet": { "path": "/healthz", "port": "http" } }
                },
                {
                    "name": "log-shipper",
                    "image": "fluent/fluent-bit:3",
                    "volumeMounts": [{ "name": "cache", "mountPath": "/logs", "readOnly": true }]
                }
            ],
            "volumes": [{ "name": "cache", "emptyDir": {} }]
        }
    })
}

fn enabled_ns() -> NamespaceMeta {
    NamespaceMeta::enabled("shop")
}

fn apply(doc: &Value, patch: &json_patch::Patch) -> Value {
    let mut out = doc.clone();
    json_patch::patch(&mut out, patch).unwrap();
    out
}

/// The injector's defaults with a classic sidecar: most tables here read the proxy among
/// the pod's containers. (The default is native: `the_default_is_a_native_sidecar`.)
fn classic() -> InjectConfig {
    InjectConfig {
        native_sidecar: false,
        ..InjectConfig::default()
    }
}

fn injected(pod: &Value, cfg: &InjectConfig) -> Value {
    let outcome = patch_pod(pod, "", &enabled_ns(), cfg).unwrap();
    assert_eq!(outcome.decision, Decision::Inject);
    apply(pod, &outcome.patch)
}

fn names(list: &Value) -> Vec<&str> {
    list.as_array()
        .map(|a| a.iter().filter_map(|c| c["name"].as_str()).collect())
        .unwrap_or_default()
}

fn env_of<'a>(container: &'a Value, name: &str) -> Option<&'a Value> {
    container["env"]
        .as_array()?
        .iter()
        .find(|e| e["name"] == name)
}

fn env_value<'a>(container: &'a Value, name: &str) -> Option<&'a str> {
    env_of(container, name)?["value"].as_str()
}

fn container<'a>(list: &'a Value, name: &str) -> &'a Value {
    list.as_array()
        .and_then(|a| a.iter().find(|c| c["name"] == name))
        .unwrap_or_else(|| panic!("no container {name} in {list}"))
}

#[test]
fn regular_sidecar_keeps_everything_and_adds_the_proxy_first() {
    let pod = web_pod();
    let cfg = InjectConfig {
        destination_addr: Some("weft-dst.weft:8086".into()),
        identity_addr: Some("weft-identity.weft:8080".into()),
        controller_namespace: Some("weft-system".into()),
        ..classic()
    };
    let out = injected(&pod, &cfg);
    let spec = &out["spec"];

    // Containers: proxy first, the app's untouched after it.
    assert_eq!(
        names(&spec["containers"]),
        ["weft-proxy", "web", "log-shipper"]
    );
    assert_eq!(spec["containers"][1], pod["spec"]["containers"][0]);
    assert_eq!(spec["containers"][2], pod["spec"]["containers"][1]);
    // Init containers: weft-init first, then the existing one unchanged.
    assert_eq!(names(&spec["initContainers"]), ["weft-init", "migrate"]);
    assert_eq!(spec["initContainers"][1], pod["spec"]["initContainers"][0]);
    // Pod-level security context untouched; volumes kept, ours appended.
    assert_eq!(spec["securityContext"], pod["spec"]["securityContext"]);
    assert_eq!(
        names(&spec["volumes"]),
        ["cache", TOKEN_VOLUME, "weft-xtables-lock"]
    );
    assert_eq!(spec["serviceAccountName"], "web");

    let proxy = &spec["containers"][0];
    assert!(proxy.get("restartPolicy").is_none());
    assert_eq!(proxy["securityContext"]["runAsUser"], 2102);
    assert_eq!(proxy["securityContext"]["runAsNonRoot"], true);
    assert_eq!(proxy["securityContext"]["allowPrivilegeEscalation"], false);
    assert_eq!(
        env_value(proxy, "WEFT_PROXY_OUTBOUND_ADDR"),
        Some("[::]:4140")
    );
    assert_eq!(
        env_value(proxy, "WEFT_PROXY_INBOUND_ADDR"),
        Some("[::]:4143")
    );
    assert_eq!(env_value(proxy, "WEFT_PROXY_ADMIN_ADDR"), Some("[::]:4191"));
    assert_eq!(
        env_value(proxy, "WEFT_PROXY_DESTINATION_ADDR"),
        Some("weft-dst.weft:8086")
    );
    assert_eq!(
        env_value(proxy, "WEFT_PROXY_IDENTITY_ADDR"),
        Some("weft-identity.weft:8080")
    );
    // The names the controller's TLS certificates carry.
    assert_eq!(
        env_value(proxy, "WEFT_PROXY_CONTROLLER_NAMESPACE"),
        Some("weft-system")
    );
    assert_eq!(
        env_value(proxy, "WEFT_PROXY_IDENTITY_TOKEN_FILE"),
        Some("/var/run/secrets/weft.dev/serviceaccount/token")
    );
    assert_eq!(
        env_of(proxy, "WEFT_PROXY_NAMESPACE").unwrap()["valueFrom"]["fieldRef"]["fieldPath"],
        "metadata.namespace"
    );
    assert_eq!(
        env_of(proxy, "WEFT_PROXY_SERVICE_ACCOUNT").unwrap()["valueFrom"]["fieldRef"]["fieldPath"],
        "spec.serviceAccountName"
    );
    assert_eq!(
        env_of(proxy, "WEFT_PROXY_POD_NAME").unwrap()["valueFrom"]["fieldRef"]["fieldPath"],
        "metadata.name"
    );
    // Dependent variables must be defined before WEFT_PROXY_IDENTITY uses them.
    let env_names: Vec<&str> = names(&proxy["env"]);
    let pos = |n: &str| env_names.iter().position(|x| *x == n).unwrap();
    assert!(pos("WEFT_PROXY_IDENTITY") > pos("WEFT_PROXY_NAMESPACE"));
    assert!(pos("WEFT_PROXY_IDENTITY") > pos("WEFT_PROXY_SERVICE_ACCOUNT"));
    assert!(pos("WEFT_PROXY_IDENTITY") > pos("WEFT_PROXY_TRUST_DOMAIN"));
    assert!(env_of(proxy, "WEFT_PROXY_OPAQUE_PORTS").is_none());
    assert_eq!(
        proxy["resources"]["requests"],
        json!({ "cpu": "100m", "memory": "20Mi" })
    );
    assert_eq!(proxy["resources"]["limits"], json!({ "memory": "250Mi" }));
    assert_eq!(
        proxy["readinessProbe"]["httpGet"],
        json!({ "path": "/ready", "port": 4191 })
    );
    assert_eq!(
        proxy["livenessProbe"]["httpGet"],
        json!({ "path": "/live", "port": 4191 })
    );
    assert_eq!(
        proxy["volumeMounts"],
        json!([{ "name": TOKEN_VOLUME, "mountPath": "/var/run/secrets/weft.dev/serviceaccount", "readOnly": true }])
    );

    // The token volume: a projected ServiceAccount token for the identity service.
    let token = &spec["volumes"][1]["projected"]["sources"][0]["serviceAccountToken"];
    assert_eq!(token["audience"], "identity.weft.dev");
    assert_eq!(token["path"], "token");
    assert_eq!(token["expirationSeconds"], 86400);

    // weft-init: root with NET_ADMIN/NET_RAW only, despite the pod's runAsNonRoot.
    let init = &spec["initContainers"][0];
    assert_eq!(init["securityContext"]["runAsUser"], 0);
    assert_eq!(init["securityContext"]["runAsNonRoot"], false);
    assert_eq!(
        init["securityContext"]["capabilities"]["add"],
        json!(["NET_ADMIN", "NET_RAW"])
    );
    assert_eq!(
        init["securityContext"]["capabilities"]["drop"],
        json!(["ALL"])
    );
    let args: Vec<&str> = init["args"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert_eq!(
        args,
        [
            "--backend",
            "auto",
            "--proxy-uid",
            "2102",
            "--inbound-port",
            "4143",
            "--outbound-port",
            "4140",
            "--skip-inbound-ports",
            "4191"
        ]
    );

    // Annotations: existing kept, marker and Prometheus scrape added.
    let ann = &out["metadata"]["annotations"];
    assert_eq!(ann["team"], "storefront");
    assert_eq!(ann["weft.dev/proxy-version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(ann["prometheus.io/scrape"], "true");
    assert_eq!(ann["prometheus.io/port"], "4191");
    assert_eq!(ann["prometheus.io/path"], "/metrics");
    assert_eq!(out["metadata"]["labels"], pod["metadata"]["labels"]);
}

#[test]
fn annotation_keys_are_escaped_in_patch_paths() {
    let outcome = patch_pod(&web_pod(), "", &enabled_ns(), &classic()).unwrap();
    let paths: Vec<String> = outcome
        .patch
        .0
        .iter()
        .map(|op| match op {
            PatchOperation::Add(a) => a.path.to_string(),
            other => panic!("the patch only adds, got {other:?}"),
        })
        .collect();
    assert!(
        paths.contains(&"/metadata/annotations/weft.dev~1proxy-version".to_string()),
        "{paths:?}"
    );
    assert!(
        paths.contains(&"/metadata/annotations/prometheus.io~1scrape".to_string()),
        "{paths:?}"
    );
    assert!(
        paths.contains(&"/spec/initContainers/0".to_string()),
        "{paths:?}"
    );
    assert!(
        paths.contains(&"/spec/containers/0".to_string()),
        "{paths:?}"
    );
    assert!(paths.contains(&"/spec/volumes/-".to_string()), "{paths:?}");
}

#[test]
fn native_sidecar_goes_after_weft_init_with_restart_policy_always() {
    let mut pod = web_pod();
    pod["metadata"]["annotations"]["config.weft.dev/native-sidecar"] = json!("enabled");
    let out = injected(&pod, &classic());
    let spec = &out["spec"];
    assert_eq!(
        names(&spec["initContainers"]),
        ["weft-init", "weft-proxy", "migrate"]
    );
    assert_eq!(spec["initContainers"][1]["restartPolicy"], "Always");
    assert_eq!(names(&spec["containers"]), ["web", "log-shipper"]);

    // The injector's default, without the annotation: native.
    let out = injected(&web_pod(), &InjectConfig::default());
    assert_eq!(
        names(&out["spec"]["initContainers"]),
        ["weft-init", "weft-proxy", "migrate"]
    );
    assert_eq!(out["spec"]["initContainers"][1]["restartPolicy"], "Always");
    // A pod can still ask for a classic sidecar.
    let mut pod = web_pod();
    pod["metadata"]["annotations"]["config.weft.dev/native-sidecar"] = json!("disabled");
    let out = injected(&pod, &InjectConfig::default());
    assert_eq!(names(&out["spec"]["containers"])[0], "weft-proxy");
}

#[test]
fn auto_is_native_from_kubernetes_1_29_and_when_the_version_is_unknown() {
    use weft_injector::patch::SidecarMode;
    for (mode, server, native) in [
        (SidecarMode::Auto, Some((1, 28)), false),
        (SidecarMode::Auto, Some((1, 29)), true),
        (SidecarMode::Auto, Some((1, 33)), true),
        (SidecarMode::Auto, Some((2, 0)), true),
        (SidecarMode::Auto, None, true),
        (SidecarMode::Native, Some((1, 27)), true),
        (SidecarMode::Classic, Some((1, 33)), false),
    ] {
        assert_eq!(mode.native(server), native, "{mode:?} {server:?}");
    }
    for (text, mode) in [
        ("auto", SidecarMode::Auto),
        ("true", SidecarMode::Native),
        ("false", SidecarMode::Classic),
    ] {
        assert_eq!(text.parse::<SidecarMode>(), Ok(mode));
    }
    assert!("yes"
        .parse::<SidecarMode>()
        .unwrap_err()
        .contains("\"yes\""));
}

#[test]
fn cni_mode_adds_no_init_container() {
    let mut pod = web_pod();
    pod["metadata"]["annotations"]["config.weft.dev/cni"] = json!("enabled");
    let out = injected(&pod, &classic());
    assert_eq!(names(&out["spec"]["initContainers"]), ["migrate"]);
    assert_eq!(names(&out["spec"]["volumes"]), ["cache", TOKEN_VOLUME]);

    // CNI setting + native sidecar + a pod with no init containers and no volumes.
    let cfg = InjectConfig {
        cni: true,
        native_sidecar: true,
        ..classic()
    };
    let mut bare = web_pod();
    bare["spec"]
        .as_object_mut()
        .unwrap()
        .remove("initContainers");
    bare["spec"].as_object_mut().unwrap().remove("volumes");
    let out = injected(&bare, &cfg);
    assert_eq!(names(&out["spec"]["initContainers"]), ["weft-proxy"]);
    assert_eq!(names(&out["spec"]["volumes"]), [TOKEN_VOLUME]);
    // No container of the pod asks for NET_ADMIN: the CNI does the privileged part.
    assert!(!out.to_string().contains("NET_ADMIN"), "{out}");
}

/// In CNI mode the pod carries `weft.dev/redirect`: the very configuration `weft-init` would
/// have been given as flags (same user annotations, same injector settings), which the
/// weft-cni plugin installs. Without CNI mode there is no such annotation.
#[test]
fn cni_mode_writes_the_redirect_weft_init_would_have_installed() {
    use weft_injector::redirect::{RedirectConfig, ANNOTATION};
    let mut pod = web_pod();
    let a = &mut pod["metadata"]["annotations"];
    a["config.weft.dev/skip-inbound-ports"] = json!("22,8000-8100");
    a["config.weft.dev/skip-outbound-ports"] = json!("5432");
    a["config.weft.dev/skip-outbound-cidrs"] = json!("169.254.169.254,fd00::/8");
    a["config.weft.dev/skip-inbound-cidrs"] = json!("10.1.0.0/16");
    let cfg = InjectConfig {
        proxy_uid: 2200,
        outbound_port: 4150,
        ..classic()
    };

    // Classic mode: weft-init's flags, no annotation.
    let with_init = injected(&pod, &cfg);
    let init = container(&with_init["spec"]["initContainers"], INIT_CONTAINER);
    let flags: Vec<String> = init["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    assert!(with_init["metadata"]["annotations"][ANNOTATION].is_null());

    // CNI mode: the annotation, no weft-init.
    let cni = injected(
        &pod,
        &InjectConfig {
            cni: true,
            ..cfg.clone()
        },
    );
    assert!(!names(&cni["spec"]["initContainers"]).contains(&INIT_CONTAINER));
    let value = cni["metadata"]["annotations"][ANNOTATION].as_str().unwrap();
    let redirect = RedirectConfig::from_annotation(value).unwrap();
    assert_eq!(redirect.to_args(), flags, "annotation {value}");
    assert_eq!(redirect.proxy_uid, 2200);
    assert_eq!(redirect.outbound_port, 4150);
    assert_eq!(redirect.skip_inbound_ports.to_string(), "4191,22,8000-8100");

    // The per-pod switch marks the pod the same way.
    let mut per_pod = pod.clone();
    per_pod["metadata"]["annotations"]["config.weft.dev/cni"] = json!("enabled");
    let out = injected(&per_pod, &cfg);
    assert_eq!(
        out["metadata"]["annotations"][ANNOTATION].as_str(),
        Some(value)
    );
}

/// What Prometheus keys on (charts/weft/templates/prometheus-scrape-config.yaml and
/// podmonitor.yaml, docs/observability.md): the container `weft-proxy` declares its admin port
/// under the name `weft-admin`, as a regular or a native sidecar and whatever its number, and
/// the prometheus.io annotations name the same port.
#[test]
fn the_admin_port_is_named_weft_admin_for_scrapers() {
    let admin_port = |proxy: &Value| -> i64 {
        let ports = proxy["ports"].as_array().unwrap();
        let named: Vec<&Value> = ports.iter().filter(|p| p["name"] == "weft-admin").collect();
        assert_eq!(named.len(), 1, "{ports:?}");
        assert_eq!(named[0]["protocol"], "TCP");
        named[0]["containerPort"].as_i64().unwrap()
    };

    let out = injected(&web_pod(), &classic());
    let proxy = container(&out["spec"]["containers"], PROXY_CONTAINER);
    assert_eq!(admin_port(proxy), 4191);
    assert_eq!(out["metadata"]["annotations"]["prometheus.io/port"], "4191");

    let cfg = InjectConfig {
        native_sidecar: true,
        admin_port: 9191,
        ..classic()
    };
    let out = injected(&web_pod(), &cfg);
    let proxy = container(&out["spec"]["initContainers"], PROXY_CONTAINER);
    assert_eq!(admin_port(proxy), 9191);
    assert_eq!(env_value(proxy, "WEFT_PROXY_ADMIN_ADDR"), Some("[::]:9191"));
    assert_eq!(out["metadata"]["annotations"]["prometheus.io/port"], "9191");
    assert_eq!(
        out["metadata"]["annotations"]["prometheus.io/scrape"],
        "true"
    );

    // The chart's scrape config and PodMonitor key on these very names.
    let chart = concat!(env!("CARGO_MANIFEST_DIR"), "/../charts/weft/templates/");
    let scrape = std::fs::read_to_string(format!("{chart}prometheus-scrape-config.yaml")).unwrap();
    assert!(
        scrape.contains(&format!("regex: {PROXY_CONTAINER};weft-admin")),
        "prometheus-scrape-config.yaml does not keep {PROXY_CONTAINER};weft-admin"
    );
    let monitor = std::fs::read_to_string(format!("{chart}podmonitor.yaml")).unwrap();
    assert!(monitor.contains("- port: weft-admin"), "podmonitor.yaml");
    assert!(
        monitor.contains(&format!("regex: {PROXY_CONTAINER}\n")),
        "podmonitor.yaml does not keep container {PROXY_CONTAINER}"
    );
}

#[test]
fn port_and_resource_annotations_reach_the_proxy_and_weft_init() {
    let mut pod = web_pod();
    let a = &mut pod["metadata"]["annotations"];
    a["config.weft.dev/skip-inbound-ports"] = json!("9090, 7000-7010");
    a["config.weft.dev/skip-outbound-ports"] = json!("5432");
    a["config.weft.dev/skip-outbound-cidrs"] = json!("169.254.169.254/32,fd00::/8");
    a["config.weft.dev/skip-inbound-cidrs"] = json!("10.0.0.0/8");
    a["config.weft.dev/opaque-ports"] = json!("6379,11211");
    a["config.weft.dev/proxy-cpu-request"] = json!("250m");
    a["config.weft.dev/proxy-cpu-limit"] = json!("1");
    a["config.weft.dev/proxy-memory-limit"] = json!("1Gi");
    a["config.weft.dev/proxy-log-level"] = json!("info,weft=debug");
    a["prometheus.io/scrape"] = json!("false");
    let out = injected(&pod, &classic());
    let proxy = container(&out["spec"]["containers"], PROXY_CONTAINER);
    assert_eq!(
        env_value(proxy, "WEFT_PROXY_INBOUND_SKIP_PORTS"),
        Some("9090,7000-7010")
    );
    assert_eq!(
        env_value(proxy, "WEFT_PROXY_OUTBOUND_SKIP_PORTS"),
        Some("5432")
    );
    assert_eq!(
        env_value(proxy, "WEFT_PROXY_OPAQUE_PORTS"),
        Some("6379,11211")
    );
    assert_eq!(env_value(proxy, "WEFT_PROXY_LOG"), Some("info,weft=debug"));
    assert_eq!(
        proxy["resources"]["requests"],
        json!({ "cpu": "250m", "memory": "20Mi" })
    );
    assert_eq!(
        proxy["resources"]["limits"],
        json!({ "cpu": "1", "memory": "1Gi" })
    );
    let init = container(&out["spec"]["initContainers"], INIT_CONTAINER);
    let args = init["args"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect::<Vec<_>>()
        .join(" ");
    assert!(
        args.contains("--skip-inbound-ports 4191,9090,7000-7010"),
        "{args}"
    );
    assert!(args.contains("--skip-outbound-ports 5432"), "{args}");
    assert!(
        args.contains("--skip-outbound-cidrs 169.254.169.254/32,fd00::/8"),
        "{args}"
    );
    assert!(args.contains("--skip-inbound-cidrs 10.0.0.0/8"), "{args}");
    // The pod has its own scrape settings: they are left alone.
    let ann = &out["metadata"]["annotations"];
    assert_eq!(ann["prometheus.io/scrape"], "false");
    assert!(ann.get("prometheus.io/port").is_none());
}

#[test]
fn access_log_and_tracing_come_from_the_injector_or_the_pod() {
    // Off by default: none of the variables is set.
    let out = injected(&web_pod(), &classic());
    let proxy = container(&out["spec"]["containers"], PROXY_CONTAINER);
    for var in [
        "WEFT_PROXY_ACCESS_LOG",
        "WEFT_PROXY_TRACE_COLLECTOR_ADDR",
        "WEFT_PROXY_TRACE_SAMPLING",
    ] {
        assert_eq!(env_value(proxy, var), None, "{var}");
    }
    // The injector's defaults reach every proxy...
    let cfg = InjectConfig {
        access_log: Some("json".into()),
        trace_collector: Some("otel-collector.observability:4317".into()),
        trace_sampling: Some("0.01".into()),
        ..classic()
    };
    let out = injected(&web_pod(), &cfg);
    let proxy = container(&out["spec"]["containers"], PROXY_CONTAINER);
    assert_eq!(env_value(proxy, "WEFT_PROXY_ACCESS_LOG"), Some("json"));
    assert_eq!(
        env_value(proxy, "WEFT_PROXY_TRACE_COLLECTOR_ADDR"),
        Some("otel-collector.observability:4317")
    );
    assert_eq!(env_value(proxy, "WEFT_PROXY_TRACE_SAMPLING"), Some("0.01"));
    // ... and a pod's annotations override them.
    let mut pod = web_pod();
    let a = &mut pod["metadata"]["annotations"];
    a["config.weft.dev/access-log"] = json!("apache");
    a["config.weft.dev/trace-collector"] = json!("jaeger.tracing:4317");
    a["config.weft.dev/trace-sampling"] = json!("1");
    let out = injected(&pod, &cfg);
    let proxy = container(&out["spec"]["containers"], PROXY_CONTAINER);
    assert_eq!(env_value(proxy, "WEFT_PROXY_ACCESS_LOG"), Some("apache"));
    assert_eq!(
        env_value(proxy, "WEFT_PROXY_TRACE_COLLECTOR_ADDR"),
        Some("jaeger.tracing:4317")
    );
    assert_eq!(env_value(proxy, "WEFT_PROXY_TRACE_SAMPLING"), Some("1"));
}

#[test]
fn the_proxys_fallback_inbound_policy_is_the_pods_else_the_namespaces_else_the_clusters() {
    use weft_model::authz::DefaultPolicy;
    let var = "WEFT_PROXY_INBOUND_DEFAULT_POLICY";
    let proxy_env = |pod: &Value, ns: &NamespaceMeta, cfg: &InjectConfig| {
        let outcome = patch_pod(pod, "", ns, cfg).unwrap();
        let out = apply(pod, &outcome.patch);
        env_value(container(&out["spec"]["containers"], PROXY_CONTAINER), var).map(str::to_string)
    };
    // Nothing set: the proxy's own default.
    assert_eq!(proxy_env(&web_pod(), &enabled_ns(), &classic()), None);
    // The cluster's (the chart gives the injector the controller's value).
    let cfg = InjectConfig {
        default_inbound_policy: Some(DefaultPolicy::ClusterAuthenticated),
        ..classic()
    };
    assert_eq!(
        proxy_env(&web_pod(), &enabled_ns(), &cfg).as_deref(),
        Some("cluster-authenticated")
    );
    // The namespace's wins over the cluster's; a bad one is ignored (the controller does too).
    let mut ns = enabled_ns();
    let key = "config.weft.dev/default-inbound-policy";
    ns.annotations.insert(key.into(), "deny".into());
    assert_eq!(proxy_env(&web_pod(), &ns, &cfg).as_deref(), Some("deny"));
    let mut bad_ns = enabled_ns();
    bad_ns.annotations.insert(key.into(), "nope".into());
    assert_eq!(
        proxy_env(&web_pod(), &bad_ns, &cfg).as_deref(),
        Some("cluster-authenticated")
    );
    // The pod's wins over both.
    let mut pod = web_pod();
    pod["metadata"]["annotations"][key] = json!("audit");
    assert_eq!(proxy_env(&pod, &ns, &cfg).as_deref(), Some("audit"));
}

#[test]
fn bad_annotations_are_errors_naming_the_annotation_and_value() {
    let cases = [
        ("config.weft.dev/skip-inbound-ports", "80,http"),
        ("config.weft.dev/skip-outbound-ports", "70000"),
        ("config.weft.dev/opaque-ports", "900-100"),
        ("config.weft.dev/skip-outbound-cidrs", "10.0.0.0/40"),
        ("config.weft.dev/proxy-memory-limit", "lots"),
        ("config.weft.dev/cni", "yes"),
        ("weft.dev/inject", "true"),
        ("config.weft.dev/access-log", "xml"),
        ("config.weft.dev/trace-collector", "otel-collector"),
        ("config.weft.dev/trace-collector", "otel:0"),
        ("config.weft.dev/trace-sampling", "1.5"),
        ("config.weft.dev/trace-sampling", "NaN"),
        ("config.weft.dev/default-inbound-policy", "allow-all"),
    ];
    for (key, value) in cases {
        let mut pod = web_pod();
        pod["metadata"]["annotations"][key] = json!(value);
        let err = patch_pod(&pod, "", &enabled_ns(), &classic()).unwrap_err();
        assert!(
            matches!(err, PatchError::Annotation { .. }),
            "{key}: {err:?}"
        );
        let msg = err.to_string();
        assert!(
            msg.contains(key) && msg.contains(value),
            "{key}={value}: {msg}"
        );
    }
}

#[test]
fn decisions() {
    let cfg = classic();
    let plain_ns = NamespaceMeta {
        name: "shop".into(),
        ..Default::default()
    };
    let labelled_ns = NamespaceMeta {
        name: "shop".into(),
        labels: [("weft.dev/inject".to_string(), "enabled".to_string())].into(),
        ..Default::default()
    };
    let with = |key: &str, value: Value| {
        let mut p = web_pod();
        p["metadata"]["annotations"][key] = value;
        p
    };
    let mut host = web_pod();
    host["spec"]["hostNetwork"] = json!(true);
    let mut labelled_pod = web_pod();
    labelled_pod["metadata"]["labels"]["weft.dev/inject"] = json!("enabled");
    let cases: Vec<(&str, Value, NamespaceMeta, Decision)> = vec![
        (
            "namespace annotation",
            web_pod(),
            enabled_ns(),
            Decision::Inject,
        ),
        ("namespace label", web_pod(), labelled_ns, Decision::Inject),
        (
            "nothing says so",
            web_pod(),
            plain_ns.clone(),
            Decision::Skip(SkipReason::NotEnabled),
        ),
        (
            "pod annotation",
            with("weft.dev/inject", json!("enabled")),
            plain_ns.clone(),
            Decision::Inject,
        ),
        (
            "pod label",
            labelled_pod,
            plain_ns.clone(),
            Decision::Inject,
        ),
        (
            "pod opts out",
            with("weft.dev/inject", json!("disabled")),
            enabled_ns(),
            Decision::Skip(SkipReason::OptedOut),
        ),
        (
            "hostNetwork",
            host,
            enabled_ns(),
            Decision::Skip(SkipReason::HostNetwork),
        ),
        (
            "marker annotation",
            with("weft.dev/proxy-version", json!("0.0.1")),
            enabled_ns(),
            Decision::Skip(SkipReason::AlreadyInjected),
        ),
    ];
    for (name, pod, ns, want) in cases {
        let outcome = patch_pod(&pod, "", &ns, &cfg).unwrap();
        assert_eq!(outcome.decision, want, "{name}");
        assert_eq!(
            outcome.patch.0.is_empty(),
            want != Decision::Inject,
            "{name}"
        );
    }
}

#[test]
fn pods_without_annotations_metadata_or_volumes() {
    let cfg = classic();
    let minimal = json!({ "spec": { "containers": [{ "name": "app", "image": "app" }] } });
    let out = injected(&minimal, &cfg);
    assert_eq!(names(&out["spec"]["containers"]), ["weft-proxy", "app"]);
    assert_eq!(names(&out["spec"]["initContainers"]), ["weft-init"]);
    assert_eq!(out["metadata"]["annotations"]["prometheus.io/port"], "4191");

    let mut no_annotations = minimal.clone();
    no_annotations["metadata"] = json!({ "name": "x" });
    let out = injected(&no_annotations, &cfg);
    assert_eq!(out["metadata"]["name"], "x");
    assert_eq!(
        out["metadata"]["annotations"]["prometheus.io/scrape"],
        "true"
    );

    let err = patch_pod(&json!({ "metadata": {} }), "", &enabled_ns(), &cfg).unwrap_err();
    assert!(matches!(err, PatchError::MissingSpec), "{err}");
    let err = patch_pod(
        &json!({ "spec": { "containers": 5 } }),
        "",
        &enabled_ns(),
        &cfg,
    )
    .unwrap_err();
    assert!(matches!(err, PatchError::Malformed { .. }), "{err}");
}

fn deployment() -> Value {
    json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": { "name": "web", "namespace": "shop" },
        "spec": {
            "replicas": 3,
            "selector": { "matchLabels": { "app": "web" } },
            "template": {
                "metadata": { "labels": { "app": "web" } },
                "spec": web_pod()["spec"].clone()
            }
        }
    })
}

#[test]
fn workload_templates() {
    let cfg = classic();
    let dep = deployment();
    let ObjectResult::Workload { decision, object } = inject_object(&dep, &cfg).unwrap() else {
        panic!("a Deployment is a workload");
    };
    assert_eq!(decision, Decision::Inject);
    let t = &object["spec"]["template"];
    assert_eq!(
        names(&t["spec"]["containers"]),
        ["weft-proxy", "web", "log-shipper"]
    );
    assert_eq!(
        names(&t["spec"]["initContainers"]),
        ["weft-init", "migrate"]
    );
    assert_eq!(t["metadata"]["labels"], json!({ "app": "web" }));
    assert_eq!(t["metadata"]["annotations"]["prometheus.io/scrape"], "true");
    // The Deployment's own fields are untouched.
    assert_eq!(object["spec"]["replicas"], 3);
    assert!(object["metadata"].get("annotations").is_none());

    // Every kind with a template, including CronJob's nested one and a template without metadata.
    let template = json!({ "spec": { "containers": [{ "name": "app", "image": "app" }] } });
    for (kind, wrap) in [
        ("StatefulSet", json!({ "template": template })),
        ("DaemonSet", json!({ "template": template })),
        ("Job", json!({ "template": template })),
        (
            "CronJob",
            json!({ "schedule": "* * * * *", "jobTemplate": { "spec": { "template": template } } }),
        ),
    ] {
        let obj = json!({ "kind": kind, "metadata": { "name": "x" }, "spec": wrap });
        let ObjectResult::Workload { decision, object } = inject_object(&obj, &cfg).unwrap() else {
            panic!("{kind} is a workload");
        };
        assert_eq!(decision, Decision::Inject, "{kind}");
        let ptr = weft_injector::manifest::template_pointer(kind).unwrap();
        let t = object.pointer(ptr).unwrap();
        assert_eq!(
            names(&t["spec"]["containers"]),
            ["weft-proxy", "app"],
            "{kind}"
        );
        assert_eq!(
            t["metadata"]["annotations"]["weft.dev/proxy-version"],
            env!("CARGO_PKG_VERSION"),
            "{kind}"
        );
    }
    let svc = json!({ "kind": "Service", "metadata": { "name": "web" }, "spec": { "ports": [] } });
    assert_eq!(
        inject_object(&svc, &cfg).unwrap(),
        ObjectResult::NotWorkload
    );
}

#[test]
fn multi_document_yaml() {
    let input = "\
# the app
apiVersion: v1
kind: Service
metadata:
  name: web   # stays byte for byte
spec:
  ports: [{port: 80}]
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: web, namespace: shop}
spec:
  template:
    metadata:
      annotations: {weft.dev/inject: disabled}
    spec:
      containers: [{name: web, image: web}]
---
apiVersion: batch/v1
kind: CronJob
metadata: {name: nightly}
spec:
  schedule: '@daily'
  jobTemplate:
    spec:
      template:
        spec:
          restartPolicy: OnFailure
          containers: [{name: job, image: job}]
";
    let out = inject_yaml(input, &classic()).unwrap();
    let docs: Vec<&str> = weft_injector::manifest::split_documents(&out);
    assert_eq!(docs.len(), 3, "{out}");
    assert!(
        docs[0].contains("name: web   # stays byte for byte"),
        "{out}"
    );
    // The opted-out Deployment passes through unchanged.
    assert!(
        docs[1].contains("annotations: {weft.dev/inject: disabled}"),
        "{out}"
    );
    let cron: Value = serde_yaml_ng::from_str(docs[2]).unwrap();
    let t = &cron["spec"]["jobTemplate"]["spec"]["template"]["spec"];
    assert_eq!(names(&t["containers"]), ["weft-proxy", "job"]);

    let err = inject_yaml("kind: Pod\nspec: {containers: 3}\n---\n", &classic()).unwrap_err();
    assert!(
        err.to_string().starts_with("document 0 (Pod <no name>)"),
        "{err}"
    );
    let err = inject_yaml("a: 1\n---\nkind: [\n", &classic()).unwrap_err();
    assert!(err.to_string().starts_with("document 1:"), "{err}");
}

/// Pods built from arbitrary parts: containers, init containers, volumes, annotations.
fn arb_pod() -> impl Strategy<Value = Value> {
    let name = "[a-z][a-z0-9-]{0,8}";
    let containers = proptest::collection::vec(name, 1..4);
    let inits = proptest::option::of(proptest::collection::vec(name, 0..3));
    let volumes = proptest::option::of(proptest::collection::vec(name, 0..3));
    let annotations = proptest::option::of(proptest::collection::btree_map(
        "[a-z./]{1,12}",
        "[a-z0-9]{0,6}",
        0..4,
    ));
    let flags = (any::<bool>(), any::<bool>(), any::<bool>(), any::<bool>());
    (containers, inits, volumes, annotations, flags).prop_map(
        |(containers, inits, volumes, annotations, (native, cni, skip, meta))| {
            let c = |n: &String| json!({ "name": format!("c-{n}"), "image": "img" });
            let mut spec = json!({ "containers": containers.iter().map(c).collect::<Vec<_>>() });
            if let Some(i) = inits {
                spec["initContainers"] = json!(i.iter().map(c).collect::<Vec<_>>());
            }
            if let Some(v) = volumes {
                spec["volumes"] = json!(v
                    .iter()
                    .map(|n| json!({ "name": format!("v-{n}"), "emptyDir": {} }))
                    .collect::<Vec<_>>());
            }
            let mut pod = json!({ "spec": spec });
            if meta || annotations.is_some() || native || cni || skip {
                let mut a: serde_json::Map<String, Value> = annotations
                    .unwrap_or_default()
                    .into_iter()
                    .filter(|(k, _)| !k.contains("weft"))
                    .map(|(k, v)| (k, Value::String(v)))
                    .collect();
                if native {
                    a.insert("config.weft.dev/native-sidecar".into(), json!("enabled"));
                }
                if cni {
                    a.insert("config.weft.dev/cni".into(), json!("enabled"));
                }
                if skip {
                    a.insert(
                        "config.weft.dev/skip-outbound-ports".into(),
                        json!("5432,6000-6100"),
                    );
                }
                pod["metadata"] = json!({ "annotations": a });
            }
            pod
        },
    )
}

proptest! {
    #[test]
    fn patched_pod_patched_again_is_empty(pod in arb_pod()) {
        let cfg = classic();
        let first = patch_pod(&pod, "", &enabled_ns(), &cfg).unwrap();
        prop_assert_eq!(first.decision, Decision::Inject);
        let once = apply(&pod, &first.patch);
        let second = patch_pod(&once, "", &enabled_ns(), &cfg).unwrap();
        prop_assert_eq!(second.decision, Decision::Skip(SkipReason::AlreadyInjected));
        prop_assert!(second.patch.0.is_empty());
    }

    #[test]
    fn patch_keeps_every_existing_container_and_volume_in_order(pod in arb_pod()) {
        let out = apply(&pod, &patch_pod(&pod, "", &enabled_ns(), &classic()).unwrap().patch);
        for field in ["containers", "initContainers", "volumes"] {
            let before = pod["spec"][field].as_array().cloned().unwrap_or_default();
            let after: Vec<Value> = out["spec"][field]
                .as_array()
                .cloned()
                .unwrap_or_default()
                .into_iter()
                .filter(|c| !c["name"].as_str().unwrap_or("").starts_with("weft-"))
                .collect();
            prop_assert_eq!(before, after, "{}", field);
        }
        let proxies = ["containers", "initContainers"]
            .iter()
            .flat_map(|f| out["spec"][*f].as_array().cloned().unwrap_or_default())
            .filter(|c| c["name"] == PROXY_CONTAINER)
            .count();
        prop_assert_eq!(proxies, 1);
    }

    #[test]
    fn arbitrary_json_never_panics(v in arb_json()) {
        let _ = patch_pod(&v, "", &enabled_ns(), &classic());
        let _ = inject_object(&v, &classic());
    }
}

fn arb_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i32>().prop_map(|i| json!(i)),
        "[a-zA-Z/.]{0,8}".prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 32, 6, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            proptest::collection::btree_map(
                prop_oneof![
                    Just("spec".to_string()),
                    Just("metadata".to_string()),
                    Just("containers".to_string()),
                    Just("kind".to_string()),
                    Just("template".to_string()),
                    "[a-z]{1,6}"
                ],
                inner,
                0..4
            )
            .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// `--native-sidecar=auto` reads the API server's version: an HTTP server on loopback that
/// answers `/version` as a 1.28 and as a 1.31+ cluster would.
#[tokio::test]
async fn auto_reads_the_api_servers_version() {
    use std::io::{Read, Write};
    use weft_injector::patch::{server_version, SidecarMode};
    for (minor, native) in [("28", false), ("31+", true)] {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let body = json!({"major": "1", "minor": minor, "gitVersion": format!("v1.{minor}.0")})
            .to_string();
        std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf);
            let _ = write!(
                s,
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
        });
        let config = kube::Config::new(format!("http://{addr}").parse().unwrap());
        let client = kube::Client::try_from(config).unwrap();
        let v = server_version(&client, std::time::Duration::from_secs(5)).await;
        assert_eq!(SidecarMode::Auto.native(v), native, "1.{minor}: {v:?}");
    }
    // Nothing answers: unknown, so native (Weft's oldest supported Kubernetes has them).
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let config = kube::Config::new(format!("http://127.0.0.1:{port}").parse().unwrap());
    let client = kube::Client::try_from(config).unwrap();
    let v = server_version(&client, std::time::Duration::from_secs(2)).await;
    assert_eq!(v, None);
    assert!(SidecarMode::Auto.native(v));
}

/// The chart's CNI mode holds together: the injector is told `--cni` from `cni.enabled`, and
/// the weft-cni entry of the default conflist declares the capability through which the
/// runtime passes the pod's annotations (so the plugin sees `weft.dev/redirect`).
#[test]
fn the_chart_passes_pod_annotations_to_the_cni_in_cni_mode() {
    let chart = concat!(env!("CARGO_MANIFEST_DIR"), "/../charts/weft/");
    let injector = std::fs::read_to_string(format!("{chart}templates/injector.yaml")).unwrap();
    assert!(injector.contains("--cni={{ .Values.cni.enabled }}"));
    let values: Value =
        serde_yaml_ng::from_str(&std::fs::read_to_string(format!("{chart}values.yaml")).unwrap())
            .unwrap();
    let plugins = values["cni"]["conflist"]["plugins"].as_array().unwrap();
    let weft = plugins.iter().find(|p| p["type"] == "weft-cni").unwrap();
    assert_eq!(
        weft["capabilities"]["io.kubernetes.cri.pod-annotations"],
        true
    );
}

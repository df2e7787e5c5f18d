//! The injection decision and the JSONPatch that carries it out: a pure function from a pod (or
//! a workload's pod template), its namespace's metadata and the injector's configuration to an
//! RFC 6902 patch. No I/O: the webhook and `weft inject` both call [`patch_pod`].
//!
//! What an injected pod gets (see the README for the annotation reference):
//! - the `weft-init` init container, first of all init containers, unless the CNI installs the
//!   redirect (`config.weft.dev/cni: enabled` or [`InjectConfig::cni`]): then, instead, the
//!   `weft.dev/redirect` annotation ([`weft_redirect::ANNOTATION`]) carrying the same redirect
//!   configuration `weft-init` would have got as flags, which tells the `weft-cni` plugin to
//!   install it (and no container needs `NET_ADMIN`);
//! - the `weft-proxy` container: a native sidecar (an init container with
//!   `restartPolicy: Always`, right after `weft-init`, so later init containers already have a
//!   proxy) when [`InjectConfig::native_sidecar`] says so, else the first regular container;
//! - a projected ServiceAccount token for the identity service, mounted into the proxy;
//! - the proxy's environment per the injector ↔ proxy contract in DESIGN.md;
//! - Prometheus scrape annotations for the admin port, when the pod has none of its own, and
//!   `weft.dev/proxy-version`, which marks the pod as injected.
//!
//! The patch only adds: existing containers, init containers, volumes, security contexts and
//! annotations are never replaced.

use std::collections::BTreeMap;

use json_patch::jsonptr::PointerBuf;
use json_patch::{AddOperation, Patch, PatchOperation};
use k8s_openapi::api::core::v1::{
    Capabilities, Container, ContainerPort, EnvVar, EnvVarSource, HTTPGetAction,
    ObjectFieldSelector, PodSpec, Probe, ProjectedVolumeSource, ResourceRequirements,
    SecurityContext, ServiceAccountTokenProjection, Volume, VolumeMount, VolumeProjection,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde_json::{json, Value};

use crate::annotations as ann;
use crate::ports::{CidrList, PortList};
use weft_redirect::{Backend, RedirectConfig};

/// Container and volume names the injector owns.
pub const PROXY_CONTAINER: &str = "weft-proxy";
pub const INIT_CONTAINER: &str = "weft-init";
pub const TOKEN_VOLUME: &str = "weft-identity-token";
pub const TOKEN_DIR: &str = "/var/run/secrets/weft.dev/serviceaccount";
pub const TRUST_ANCHORS_VOLUME: &str = "weft-trust-anchors";
pub const TRUST_ANCHORS_DIR: &str = "/var/run/weft.dev/trust-anchors";
/// `weft-init` may run `iptables-legacy`, which wants a writable `/run/xtables.lock`.
pub const XTABLES_VOLUME: &str = "weft-xtables-lock";

/// The injector's settings; every field has a production default.
#[derive(Debug, Clone, PartialEq)]
pub struct InjectConfig {
    pub proxy_image: String,
    pub init_image: String,
    /// `imagePullPolicy` for both images; unset leaves Kubernetes' default.
    pub image_pull_policy: Option<String>,
    /// Written into `weft.dev/proxy-version`.
    pub proxy_version: String,
    /// Inject the proxy as a native sidecar (Kubernetes ≥ 1.29; the default).
    pub native_sidecar: bool,
    /// The CNI plugin installs the redirect: no `weft-init` container.
    pub cni: bool,
    pub proxy_uid: i64,
    pub outbound_port: u16,
    pub inbound_port: u16,
    pub admin_port: u16,
    /// The host part of the proxy's listen addresses; `[::]` listens dual-stack, which the
    /// IPv6 redirect needs.
    pub listen_host: String,
    pub destination_addr: Option<String>,
    pub identity_addr: Option<String>,
    /// `WEFT_PROXY_CONTROLLER_NAMESPACE`: the controller's namespace, whose name the proxy
    /// expects in the controller's TLS certificates; `None`: not written (the proxy's
    /// default, `weft`).
    pub controller_namespace: Option<String>,
    pub trust_domain: String,
    /// A ConfigMap holding `ca.crt`, mounted and named in `WEFT_PROXY_TRUST_ANCHORS`.
    pub trust_anchors_configmap: Option<String>,
    pub token_audience: String,
    pub token_expiration_seconds: i64,
    pub proxy_log: String,
    /// `WEFT_PROXY_ACCESS_LOG` for every proxy (`json` / `apache`); `None`: no access log.
    pub access_log: Option<String>,
    /// `WEFT_PROXY_TRACE_COLLECTOR_ADDR` for every proxy; `None`: tracing off.
    pub trace_collector: Option<String>,
    /// `WEFT_PROXY_TRACE_SAMPLING` for every proxy; `None`: the proxy's default (0).
    pub trace_sampling: Option<String>,
    /// The cluster's default inbound policy (the controller's `--default-inbound-policy`):
    /// the proxy's fallback until the controller answers, unless the pod or its namespace
    /// names another. `None`: the proxy's own default (all-unauthenticated).
    pub default_inbound_policy: Option<weft_model::authz::DefaultPolicy>,
    pub proxy_resources: Resources,
    pub init_resources: Resources,
    /// `weft-init --backend` (`auto`, `nft` or `legacy`); the CNI uses the same.
    pub init_backend: Backend,
    /// Inbound ports that always bypass the proxy (besides the admin port).
    pub skip_inbound_ports: PortList,
    pub skip_outbound_ports: PortList,
    pub opaque_ports: PortList,
}

/// `--native-sidecar`: how the proxy is injected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SidecarMode {
    /// Native where the cluster has native sidecars (Kubernetes 1.29+, where they are on by
    /// default), classic below; native when the version cannot be read.
    Auto,
    /// An init container with `restartPolicy: Always`: starts before the app, and lets Jobs
    /// finish.
    Native,
    /// A regular container, for clusters older than 1.29.
    Classic,
}

/// The first Kubernetes release with native sidecars on by default.
pub const NATIVE_SIDECARS_SINCE: (u32, u32) = (1, 29);

impl std::str::FromStr for SidecarMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "true" | "native" => Ok(Self::Native),
            "false" | "classic" => Ok(Self::Classic),
            _ => Err(format!(
                "{s:?}: want auto, true (native) or false (classic)"
            )),
        }
    }
}

impl SidecarMode {
    /// Whether to inject native sidecars, given the API server's `(major, minor)` when known.
    pub fn native(self, server: Option<(u32, u32)>) -> bool {
        match self {
            SidecarMode::Native => true,
            SidecarMode::Classic => false,
            SidecarMode::Auto => server.is_none_or(|v| v >= NATIVE_SIDECARS_SINCE),
        }
    }
}

/// The API server's `(major, minor)` (`/version`; "31+" reads as 31), or `None` with a warning
/// when it does not answer within `timeout`.
pub async fn server_version(
    client: &kube::Client,
    timeout: std::time::Duration,
) -> Option<(u32, u32)> {
    match tokio::time::timeout(timeout, client.apiserver_version()).await {
        Ok(Ok(info)) => {
            let n = |s: &str| {
                s.trim_end_matches(|c: char| !c.is_ascii_digit())
                    .parse()
                    .ok()
            };
            Some((n(&info.major)?, n(&info.minor)?))
        }
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "cannot read the API server's version");
            None
        }
        Err(_) => {
            tracing::warn!("the API server's version did not come within {timeout:?}");
            None
        }
    }
}

/// Requests and limits as Kubernetes quantities; `None` sets nothing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Resources {
    pub cpu_request: Option<String>,
    pub cpu_limit: Option<String>,
    pub memory_request: Option<String>,
    pub memory_limit: Option<String>,
}

impl Default for InjectConfig {
    fn default() -> Self {
        let version = env!("CARGO_PKG_VERSION").to_string();
        Self {
            proxy_image: format!("ghcr.io/weft-mesh/proxy:v{version}"),
            init_image: format!("ghcr.io/weft-mesh/init:v{version}"),
            image_pull_policy: None,
            proxy_version: version,
            native_sidecar: true,
            cni: false,
            proxy_uid: 2102,
            outbound_port: 4140,
            inbound_port: 4143,
            admin_port: 4191,
            listen_host: "[::]".into(),
            destination_addr: None,
            identity_addr: None,
            controller_namespace: None,
            trust_domain: "cluster.local".into(),
            trust_anchors_configmap: None,
            token_audience: "identity.weft.dev".into(),
            token_expiration_seconds: 86_400,
            proxy_log: "warn,weft=info".into(),
            access_log: None,
            trace_collector: None,
            trace_sampling: None,
            default_inbound_policy: None,
            proxy_resources: Resources {
                cpu_request: Some("100m".into()),
                cpu_limit: None,
                memory_request: Some("20Mi".into()),
                memory_limit: Some("250Mi".into()),
            },
            init_resources: Resources {
                cpu_request: Some("10m".into()),
                cpu_limit: Some("100m".into()),
                memory_request: Some("10Mi".into()),
                memory_limit: Some("50Mi".into()),
            },
            init_backend: Backend::Auto,
            skip_inbound_ports: PortList::default(),
            skip_outbound_ports: PortList::default(),
            opaque_ports: PortList::default(),
        }
    }
}

/// What the injector knows about the pod's namespace.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NamespaceMeta {
    pub name: String,
    pub annotations: BTreeMap<String, String>,
    pub labels: BTreeMap<String, String>,
}

impl NamespaceMeta {
    /// A namespace that has injection turned on (what `weft inject` assumes).
    pub fn enabled(name: &str) -> Self {
        Self {
            name: name.to_string(),
            annotations: BTreeMap::from([(ann::INJECT.to_string(), ann::ENABLED.to_string())]),
            labels: BTreeMap::new(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Inject,
    Skip(SkipReason),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SkipReason {
    /// Neither the pod nor its namespace says `weft.dev/inject: enabled`.
    NotEnabled,
    /// The pod says `weft.dev/inject: disabled`.
    OptedOut,
    /// `hostNetwork: true`: rules in the node's namespace would redirect the node's traffic.
    HostNetwork,
    /// The pod already has the proxy.
    AlreadyInjected,
}

impl std::fmt::Display for SkipReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SkipReason::NotEnabled => {
                "neither the pod nor its namespace has weft.dev/inject: enabled"
            }
            SkipReason::OptedOut => "the pod has weft.dev/inject: disabled",
            SkipReason::HostNetwork => "the pod uses hostNetwork",
            SkipReason::AlreadyInjected => "the pod already has the weft-proxy container",
        })
    }
}

/// The decision and the patch (empty unless the decision is [`Decision::Inject`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    pub decision: Decision,
    pub patch: Patch,
}

#[derive(Debug, thiserror::Error)]
pub enum PatchError {
    #[error("annotation {key}={value:?} is invalid: {reason}")]
    Annotation {
        key: String,
        value: String,
        reason: String,
    },
    #[error("the pod has no spec")]
    MissingSpec,
    #[error("the pod's {what} does not parse: {source}")]
    Malformed {
        what: &'static str,
        #[source]
        source: serde_json::Error,
    },
}

/// Decides and builds the patch for `pod`, a Pod or a PodTemplateSpec (anything with
/// `metadata` and `spec`) found at JSON pointer `prefix` in the document the patch applies to
/// (`""` for a Pod, `"/spec/template"` for a Deployment).
pub fn patch_pod(
    pod: &Value,
    prefix: &str,
    ns: &NamespaceMeta,
    cfg: &InjectConfig,
) -> Result<Outcome, PatchError> {
    let meta: ObjectMeta = match pod.get("metadata") {
        Some(m) if !m.is_null() => {
            serde_json::from_value(m.clone()).map_err(|source| PatchError::Malformed {
                what: "metadata",
                source,
            })?
        }
        _ => ObjectMeta::default(),
    };
    let spec: PodSpec = match pod.get("spec") {
        Some(s) if !s.is_null() => {
            serde_json::from_value(s.clone()).map_err(|source| PatchError::Malformed {
                what: "spec",
                source,
            })?
        }
        _ => return Err(PatchError::MissingSpec),
    };
    let decision = decide(&meta, &spec, ns)?;
    if decision != Decision::Inject {
        return Ok(Outcome {
            decision,
            patch: Patch(Vec::new()),
        });
    }
    let settings = PodSettings::from_annotations(&meta, ns, cfg)?;
    let ops = build_ops(pod, prefix, &meta, &spec, &settings, cfg);
    Ok(Outcome {
        decision,
        patch: Patch(ops),
    })
}

/// Whether to inject: already-injected and hostNetwork pods never; otherwise the pod's
/// `weft.dev/inject` (annotation, then label) wins over the namespace's.
pub fn decide(
    meta: &ObjectMeta,
    spec: &PodSpec,
    ns: &NamespaceMeta,
) -> Result<Decision, PatchError> {
    if is_injected(meta, spec) {
        return Ok(Decision::Skip(SkipReason::AlreadyInjected));
    }
    let pod_setting = meta
        .annotations
        .as_ref()
        .and_then(|a| a.get(ann::INJECT))
        .or_else(|| meta.labels.as_ref().and_then(|l| l.get(ann::INJECT)));
    let inject = match pod_setting.map(|s| s.trim()) {
        Some(ann::ENABLED) => true,
        Some(ann::DISABLED) => return Ok(Decision::Skip(SkipReason::OptedOut)),
        Some(other) => {
            return Err(PatchError::Annotation {
                key: ann::INJECT.into(),
                value: other.into(),
                reason: "want \"enabled\" or \"disabled\"".into(),
            })
        }
        // A namespace with a value other than "enabled" is simply not enabled: its pods are not
        // to blame for it.
        None => ns
            .annotations
            .get(ann::INJECT)
            .or_else(|| ns.labels.get(ann::INJECT))
            .is_some_and(|v| v.trim() == ann::ENABLED),
    };
    if !inject {
        return Ok(Decision::Skip(SkipReason::NotEnabled));
    }
    if spec.host_network == Some(true) {
        return Ok(Decision::Skip(SkipReason::HostNetwork));
    }
    Ok(Decision::Inject)
}

fn is_injected(meta: &ObjectMeta, spec: &PodSpec) -> bool {
    let named = |cs: &Option<Vec<Container>>| {
        cs.iter()
            .flatten()
            .any(|c| c.name == PROXY_CONTAINER || c.name == INIT_CONTAINER)
    };
    named(&spec.init_containers)
        || spec.containers.iter().any(|c| c.name == PROXY_CONTAINER)
        || meta
            .annotations
            .as_ref()
            .is_some_and(|a| a.contains_key(ann::PROXY_VERSION))
}

/// The per-pod settings, from `config.weft.dev/*` annotations over the injector's defaults.
#[derive(Debug, Clone, PartialEq)]
struct PodSettings {
    skip_inbound_ports: PortList,
    skip_outbound_ports: PortList,
    skip_inbound_cidrs: CidrList,
    skip_outbound_cidrs: CidrList,
    opaque_ports: PortList,
    cni: bool,
    native_sidecar: bool,
    proxy_log: String,
    access_log: Option<String>,
    trace_collector: Option<String>,
    trace_sampling: Option<String>,
    default_inbound_policy: Option<weft_model::authz::DefaultPolicy>,
    resources: Resources,
}

impl PodSettings {
    fn from_annotations(
        meta: &ObjectMeta,
        ns: &NamespaceMeta,
        cfg: &InjectConfig,
    ) -> Result<Self, PatchError> {
        let empty = BTreeMap::new();
        let a = meta.annotations.as_ref().unwrap_or(&empty);
        let get = |key: &str| a.get(key).map(|v| v.trim());
        let bad = |key: &str, value: &str, reason: String| PatchError::Annotation {
            key: key.to_string(),
            value: value.to_string(),
            reason,
        };
        let ports = |key: &str, base: &PortList| -> Result<PortList, PatchError> {
            match get(key) {
                None => Ok(base.clone()),
                Some(v) => v
                    .parse::<PortList>()
                    .map(|p| base.union(&p))
                    .map_err(|e| bad(key, v, e.to_string())),
            }
        };
        let cidrs = |key: &str| -> Result<CidrList, PatchError> {
            match get(key) {
                None => Ok(CidrList::default()),
                Some(v) => v
                    .parse()
                    .map_err(|e: crate::ports::ParseError| bad(key, v, e.to_string())),
            }
        };
        let switch = |key: &str, default: bool| -> Result<bool, PatchError> {
            match get(key) {
                None => Ok(default),
                Some(ann::ENABLED) => Ok(true),
                Some(ann::DISABLED) => Ok(false),
                Some(v) => Err(bad(key, v, "want \"enabled\" or \"disabled\"".into())),
            }
        };
        let quantity =
            |key: &str, default: &Option<String>| -> Result<Option<String>, PatchError> {
                match get(key) {
                    None => Ok(default.clone()),
                    Some(v) if is_quantity(v) => Ok(Some(v.to_string())),
                    Some(v) => Err(bad(
                        key,
                        v,
                        "not a Kubernetes quantity (e.g. 100m, 0.5, 64Mi, 1Gi)".into(),
                    )),
                }
            };
        let log = match get(ann::PROXY_LOG) {
            None => cfg.proxy_log.clone(),
            Some(v) if !v.is_empty() && !v.chars().any(char::is_whitespace) => v.to_string(),
            Some(v) => {
                return Err(bad(
                    ann::PROXY_LOG,
                    v,
                    "want a tracing filter such as warn,weft=debug".into(),
                ))
            }
        };
        let access_log = match get(ann::ACCESS_LOG) {
            None => cfg.access_log.clone(),
            Some(v @ ("json" | "apache")) => Some(v.to_string()),
            Some(v) => {
                return Err(bad(
                    ann::ACCESS_LOG,
                    v,
                    "want \"json\" or \"apache\"".into(),
                ))
            }
        };
        let trace_collector = match get(ann::TRACE_COLLECTOR) {
            None => cfg.trace_collector.clone(),
            Some(v) if is_host_port(v) => Some(v.to_string()),
            Some(v) => return Err(bad(
                ann::TRACE_COLLECTOR,
                v,
                "want HOST:PORT of an OTLP/gRPC collector, e.g. otel-collector.observability:4317"
                    .into(),
            )),
        };
        let trace_sampling = match get(ann::TRACE_SAMPLING) {
            None => cfg.trace_sampling.clone(),
            Some(v) if is_rate(v) => Some(v.to_string()),
            Some(v) => {
                return Err(bad(
                    ann::TRACE_SAMPLING,
                    v,
                    "want a rate between 0 and 1, e.g. 0.01".into(),
                ))
            }
        };
        // The pod's annotation, else its namespace's, else the cluster's: the order the
        // controller decides in, so the proxy's fallback is what the controller will answer.
        let default_inbound_policy = match get(ann::DEFAULT_INBOUND_POLICY) {
            Some(v) => Some(
                v.parse()
                    .map_err(|e: weft_model::authz::DefaultPolicyError| {
                        bad(ann::DEFAULT_INBOUND_POLICY, v, e.to_string())
                    })?,
            ),
            None => match ns.annotations.get(ann::DEFAULT_INBOUND_POLICY) {
                Some(v) => match v.trim().parse() {
                    Ok(p) => Some(p),
                    // Not this pod's fault: the controller ignores it too (and says so).
                    Err(e) => {
                        tracing::warn!(namespace = %ns.name, annotation = ann::DEFAULT_INBOUND_POLICY, error = %e, "namespace annotation ignored");
                        cfg.default_inbound_policy
                    }
                },
                None => cfg.default_inbound_policy,
            },
        };
        let d = &cfg.proxy_resources;
        Ok(Self {
            skip_inbound_ports: ports(ann::SKIP_INBOUND_PORTS, &cfg.skip_inbound_ports)?,
            skip_outbound_ports: ports(ann::SKIP_OUTBOUND_PORTS, &cfg.skip_outbound_ports)?,
            skip_inbound_cidrs: cidrs(ann::SKIP_INBOUND_CIDRS)?,
            skip_outbound_cidrs: cidrs(ann::SKIP_OUTBOUND_CIDRS)?,
            opaque_ports: ports(ann::OPAQUE_PORTS, &cfg.opaque_ports)?,
            cni: switch(ann::CNI, cfg.cni)?,
            native_sidecar: switch(ann::NATIVE_SIDECAR, cfg.native_sidecar)?,
            proxy_log: log,
            access_log,
            trace_collector,
            trace_sampling,
            default_inbound_policy,
            resources: Resources {
                cpu_request: quantity(ann::PROXY_CPU_REQUEST, &d.cpu_request)?,
                cpu_limit: quantity(ann::PROXY_CPU_LIMIT, &d.cpu_limit)?,
                memory_request: quantity(ann::PROXY_MEMORY_REQUEST, &d.memory_request)?,
                memory_limit: quantity(ann::PROXY_MEMORY_LIMIT, &d.memory_limit)?,
            },
        })
    }
}

/// `host:port` with a non-empty host and a port from 1 to 65535.
pub fn is_host_port(s: &str) -> bool {
    match s.rsplit_once(':') {
        Some((host, port)) => {
            !host.is_empty()
                && !host.chars().any(char::is_whitespace)
                && port.parse::<u16>().is_ok_and(|p| p > 0)
        }
        None => false,
    }
}

/// A sampling rate: a number from 0 to 1.
pub fn is_rate(s: &str) -> bool {
    s.parse::<f64>()
        .is_ok_and(|r| r.is_finite() && (0.0..=1.0).contains(&r))
}

/// Kubernetes' quantity grammar: a signed decimal number, optionally with an exponent or a
/// binary/decimal suffix (`100m`, `1.5`, `64Mi`, `1e3`).
pub fn is_quantity(s: &str) -> bool {
    let s = s.strip_prefix(['+', '-']).unwrap_or(s);
    let digits_end = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (number, suffix) = s.split_at(digits_end);
    let valid_number = !number.is_empty()
        && number.matches('.').count() <= 1
        && number.chars().any(|c| c.is_ascii_digit());
    let valid_suffix = match suffix {
        "" | "m" | "k" | "M" | "G" | "T" | "P" | "E" | "Ki" | "Mi" | "Gi" | "Ti" | "Pi" | "Ei" => {
            true
        }
        s => {
            let exp = s.strip_prefix(['e', 'E']).unwrap_or("x");
            let exp = exp.strip_prefix(['+', '-']).unwrap_or(exp);
            !exp.is_empty() && exp.chars().all(|c| c.is_ascii_digit())
        }
    };
    valid_number && valid_suffix
}

/// Escapes one JSON pointer segment (RFC 6901): `~` → `~0`, `/` → `~1`.
pub fn escape_pointer(segment: &str) -> String {
    segment.replace('~', "~0").replace('/', "~1")
}

fn add(path: String, value: Value) -> PatchOperation {
    // Every path built here starts with `/` and escapes its segments, so parsing cannot fail;
    // were it to, the root pointer makes JSONPatch fail loudly instead of patching a wrong field.
    let path = PointerBuf::parse(&path).unwrap_or_else(|e| {
        tracing::error!(path, error = %e, "built an invalid JSON pointer");
        PointerBuf::new()
    });
    PatchOperation::Add(AddOperation { path, value })
}

fn build_ops(
    pod: &Value,
    prefix: &str,
    meta: &ObjectMeta,
    spec: &PodSpec,
    s: &PodSettings,
    cfg: &InjectConfig,
) -> Vec<PatchOperation> {
    let mut ops = Vec::new();
    let spec_path = format!("{prefix}/spec");

    // Init containers: weft-init first (it must run before anything that uses the network),
    // then the proxy when it is a native sidecar, then the pod's own.
    let mut new_init = Vec::new();
    if !s.cni {
        new_init.push(init_container(s, cfg));
    }
    if s.native_sidecar {
        let mut proxy = proxy_container(s, cfg);
        proxy.restart_policy = Some("Always".into());
        new_init.push(proxy);
    }
    let raw_spec = pod.get("spec");
    let has_init = raw_spec
        .and_then(|sp| sp.get("initContainers"))
        .is_some_and(Value::is_array);
    if !new_init.is_empty() {
        if has_init {
            for (i, c) in new_init.iter().enumerate() {
                ops.push(add(format!("{spec_path}/initContainers/{i}"), to_value(c)));
            }
        } else {
            ops.push(add(
                format!("{spec_path}/initContainers"),
                Value::Array(new_init.iter().map(to_value).collect()),
            ));
        }
    }
    if !s.native_sidecar {
        let proxy = to_value(&proxy_container(s, cfg));
        if raw_spec
            .and_then(|sp| sp.get("containers"))
            .is_some_and(Value::is_array)
        {
            ops.push(add(format!("{spec_path}/containers/0"), proxy));
        } else {
            ops.push(add(format!("{spec_path}/containers"), json!([proxy])));
        }
    }

    let mut volumes = vec![token_volume(cfg)];
    if !s.cni {
        volumes.push(Volume {
            name: XTABLES_VOLUME.into(),
            empty_dir: Some(Default::default()),
            ..Default::default()
        });
    }
    if let Some(cm) = &cfg.trust_anchors_configmap {
        volumes.push(Volume {
            name: TRUST_ANCHORS_VOLUME.into(),
            config_map: Some(k8s_openapi::api::core::v1::ConfigMapVolumeSource {
                name: cm.clone(),
                ..Default::default()
            }),
            ..Default::default()
        });
    }
    if spec.volumes.is_some() {
        for v in &volumes {
            ops.push(add(format!("{spec_path}/volumes/-"), to_value(v)));
        }
    } else {
        ops.push(add(
            format!("{spec_path}/volumes"),
            Value::Array(volumes.iter().map(to_value).collect()),
        ));
    }

    let mut annotations = BTreeMap::new();
    annotations.insert(ann::PROXY_VERSION.to_string(), cfg.proxy_version.clone());
    if s.cni {
        annotations.insert(
            weft_redirect::ANNOTATION.to_string(),
            redirect_config(s, cfg).to_annotation(),
        );
    }
    let existing = meta.annotations.clone().unwrap_or_default();
    let has_scrape_config = [
        ann::PROMETHEUS_SCRAPE,
        ann::PROMETHEUS_PORT,
        ann::PROMETHEUS_PATH,
    ]
    .iter()
    .any(|k| existing.contains_key(*k));
    if !has_scrape_config {
        annotations.insert(ann::PROMETHEUS_SCRAPE.into(), "true".into());
        annotations.insert(ann::PROMETHEUS_PORT.into(), cfg.admin_port.to_string());
        annotations.insert(ann::PROMETHEUS_PATH.into(), "/metrics".into());
    }
    let raw_meta = pod.get("metadata").filter(|m| m.is_object());
    match raw_meta {
        None => ops.push(add(
            format!("{prefix}/metadata"),
            json!({ "annotations": annotations }),
        )),
        Some(m) if !m.get("annotations").is_some_and(Value::is_object) => ops.push(add(
            format!("{prefix}/metadata/annotations"),
            json!(annotations),
        )),
        Some(_) => {
            for (k, v) in annotations {
                ops.push(add(
                    format!("{prefix}/metadata/annotations/{}", escape_pointer(&k)),
                    Value::String(v),
                ));
            }
        }
    }
    ops
}

fn to_value<T: serde::Serialize>(v: &T) -> Value {
    // Serializing k8s-openapi types to a Value cannot fail (no non-string map keys).
    serde_json::to_value(v).unwrap_or(Value::Null)
}

fn env(name: &str, value: impl Into<String>) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: Some(value.into()),
        value_from: None,
    }
}

fn env_field(name: &str, field: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: None,
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                api_version: None,
                field_path: field.into(),
            }),
            ..Default::default()
        }),
    }
}

fn quantities(pairs: [(&str, &Option<String>); 2]) -> Option<BTreeMap<String, Quantity>> {
    let m: BTreeMap<String, Quantity> = pairs
        .into_iter()
        .filter_map(|(k, v)| v.as_ref().map(|v| (k.to_string(), Quantity(v.clone()))))
        .collect();
    (!m.is_empty()).then_some(m)
}

fn resources(r: &Resources) -> Option<ResourceRequirements> {
    let requests = quantities([("cpu", &r.cpu_request), ("memory", &r.memory_request)]);
    let limits = quantities([("cpu", &r.cpu_limit), ("memory", &r.memory_limit)]);
    if requests.is_none() && limits.is_none() {
        return None;
    }
    Some(ResourceRequirements {
        requests,
        limits,
        ..Default::default()
    })
}

fn admin_probe(path: &str, cfg: &InjectConfig) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::Int(i32::from(cfg.admin_port)),
            ..Default::default()
        }),
        initial_delay_seconds: Some(1),
        period_seconds: Some(5),
        ..Default::default()
    }
}

fn proxy_container(s: &PodSettings, cfg: &InjectConfig) -> Container {
    let host = &cfg.listen_host;
    let mut envs = vec![
        env("WEFT_PROXY_LOG", &s.proxy_log),
        env(
            "WEFT_PROXY_OUTBOUND_ADDR",
            format!("{host}:{}", cfg.outbound_port),
        ),
        env(
            "WEFT_PROXY_INBOUND_ADDR",
            format!("{host}:{}", cfg.inbound_port),
        ),
        env("WEFT_PROXY_ADMIN_ADDR", format!("{host}:{}", cfg.admin_port)),
        env_field("WEFT_PROXY_NAMESPACE", "metadata.namespace"),
        env_field("WEFT_PROXY_POD_NAME", "metadata.name"),
        env_field("WEFT_PROXY_SERVICE_ACCOUNT", "spec.serviceAccountName"),
        env("WEFT_PROXY_TRUST_DOMAIN", &cfg.trust_domain),
        // Kubernetes expands $(VAR) from the variables defined above it.
        env(
            "WEFT_PROXY_IDENTITY",
            "spiffe://$(WEFT_PROXY_TRUST_DOMAIN)/ns/$(WEFT_PROXY_NAMESPACE)/sa/$(WEFT_PROXY_SERVICE_ACCOUNT)",
        ),
        env(
            "WEFT_PROXY_IDENTITY_TOKEN_FILE",
            format!("{TOKEN_DIR}/token"),
        ),
    ];
    if let Some(a) = &cfg.destination_addr {
        envs.push(env("WEFT_PROXY_DESTINATION_ADDR", a));
    }
    if let Some(a) = &cfg.identity_addr {
        envs.push(env("WEFT_PROXY_IDENTITY_ADDR", a));
    }
    if let Some(ns) = &cfg.controller_namespace {
        envs.push(env("WEFT_PROXY_CONTROLLER_NAMESPACE", ns));
    }
    for (name, value) in [
        ("WEFT_PROXY_ACCESS_LOG", &s.access_log),
        ("WEFT_PROXY_TRACE_COLLECTOR_ADDR", &s.trace_collector),
        ("WEFT_PROXY_TRACE_SAMPLING", &s.trace_sampling),
    ] {
        if let Some(v) = value {
            envs.push(env(name, v));
        }
    }
    if let Some(p) = s.default_inbound_policy {
        envs.push(env("WEFT_PROXY_INBOUND_DEFAULT_POLICY", p.as_str()));
    }
    if cfg.trust_anchors_configmap.is_some() {
        envs.push(env(
            "WEFT_PROXY_TRUST_ANCHORS",
            format!("{TRUST_ANCHORS_DIR}/ca.crt"),
        ));
    }
    for (name, list) in [
        ("WEFT_PROXY_OPAQUE_PORTS", &s.opaque_ports),
        ("WEFT_PROXY_INBOUND_SKIP_PORTS", &s.skip_inbound_ports),
        ("WEFT_PROXY_OUTBOUND_SKIP_PORTS", &s.skip_outbound_ports),
    ] {
        if !list.is_empty() {
            envs.push(env(name, list.to_string()));
        }
    }
    let mut mounts = vec![VolumeMount {
        name: TOKEN_VOLUME.into(),
        mount_path: TOKEN_DIR.into(),
        read_only: Some(true),
        ..Default::default()
    }];
    if cfg.trust_anchors_configmap.is_some() {
        mounts.push(VolumeMount {
            name: TRUST_ANCHORS_VOLUME.into(),
            mount_path: TRUST_ANCHORS_DIR.into(),
            read_only: Some(true),
            ..Default::default()
        });
    }
    Container {
        name: PROXY_CONTAINER.into(),
        image: Some(cfg.proxy_image.clone()),
        image_pull_policy: cfg.image_pull_policy.clone(),
        env: Some(envs),
        ports: Some(vec![
            ContainerPort {
                name: Some("weft-inbound".into()),
                container_port: i32::from(cfg.inbound_port),
                protocol: Some("TCP".into()),
                ..Default::default()
            },
            ContainerPort {
                name: Some("weft-admin".into()),
                container_port: i32::from(cfg.admin_port),
                protocol: Some("TCP".into()),
                ..Default::default()
            },
        ]),
        resources: resources(&s.resources),
        readiness_probe: Some(admin_probe("/ready", cfg)),
        liveness_probe: Some(admin_probe("/live", cfg)),
        security_context: Some(SecurityContext {
            run_as_user: Some(cfg.proxy_uid),
            run_as_group: Some(cfg.proxy_uid),
            run_as_non_root: Some(true),
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".into()]),
                add: None,
            }),
            ..Default::default()
        }),
        volume_mounts: Some(mounts),
        termination_message_policy: Some("FallbackToLogsOnError".into()),
        ..Default::default()
    }
}

/// The pod's redirect: the same value becomes `weft-init`'s flags or, in CNI mode, the
/// `weft.dev/redirect` annotation, so both installers put the same rules in place.
fn redirect_config(s: &PodSettings, cfg: &InjectConfig) -> RedirectConfig {
    // The admin port stays reachable directly, so kubelet probes and scrapes never depend on
    // the proxy's data path.
    let admin = PortList(vec![crate::ports::PortRange::single(cfg.admin_port)]);
    RedirectConfig {
        // A UID that does not fit the kernel's u32 cannot be the proxy's; the container's
        // securityContext would be refused by the API server anyway.
        proxy_uid: u32::try_from(cfg.proxy_uid).unwrap_or(u32::MAX),
        inbound_port: cfg.inbound_port,
        outbound_port: cfg.outbound_port,
        skip_inbound_ports: admin.union(&s.skip_inbound_ports),
        skip_outbound_ports: s.skip_outbound_ports.clone(),
        skip_inbound_cidrs: s.skip_inbound_cidrs.clone(),
        skip_outbound_cidrs: s.skip_outbound_cidrs.clone(),
        ipv6: true,
        backend: cfg.init_backend,
    }
}

fn init_container(s: &PodSettings, cfg: &InjectConfig) -> Container {
    Container {
        name: INIT_CONTAINER.into(),
        image: Some(cfg.init_image.clone()),
        image_pull_policy: cfg.image_pull_policy.clone(),
        args: Some(redirect_config(s, cfg).to_args()),
        resources: resources(&cfg.init_resources),
        // Root with NET_ADMIN/NET_RAW only, explicitly: a pod-level runAsNonRoot must not apply
        // to the one container that edits the pod's netfilter tables.
        security_context: Some(SecurityContext {
            run_as_user: Some(0),
            run_as_group: Some(0),
            run_as_non_root: Some(false),
            allow_privilege_escalation: Some(false),
            privileged: Some(false),
            read_only_root_filesystem: Some(true),
            capabilities: Some(Capabilities {
                add: Some(vec!["NET_ADMIN".into(), "NET_RAW".into()]),
                drop: Some(vec!["ALL".into()]),
            }),
            ..Default::default()
        }),
        volume_mounts: Some(vec![VolumeMount {
            name: XTABLES_VOLUME.into(),
            mount_path: "/run".into(),
            ..Default::default()
        }]),
        termination_message_policy: Some("FallbackToLogsOnError".into()),
        ..Default::default()
    }
}

fn token_volume(cfg: &InjectConfig) -> Volume {
    Volume {
        name: TOKEN_VOLUME.into(),
        projected: Some(ProjectedVolumeSource {
            sources: Some(vec![VolumeProjection {
                service_account_token: Some(ServiceAccountTokenProjection {
                    audience: Some(cfg.token_audience.clone()),
                    expiration_seconds: Some(cfg.token_expiration_seconds),
                    path: "token".into(),
                }),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantities() {
        for ok in ["100m", "1", "0.5", "64Mi", "1Gi", "1e3", "+2", ".5", "2E-3"] {
            assert!(is_quantity(ok), "{ok}");
        }
        for bad in ["", "m", "1.2.3", "10 Mi", "10MiB", "abc", "1e", "-"] {
            assert!(!is_quantity(bad), "{bad}");
        }
    }

    #[test]
    fn pointer_escaping() {
        assert_eq!(
            escape_pointer("prometheus.io/scrape"),
            "prometheus.io~1scrape"
        );
        assert_eq!(escape_pointer("a~b/c"), "a~0b~1c");
    }
}

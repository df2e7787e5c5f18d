//! `weft check`: is the cluster ready for Weft (`--pre`), and is the installed Weft healthy?
//!
//! Each check is a line with ✔ (passed), ‼ (a warning: works, but needs attention) or ✖
//! (failed) and, when not passed, what was found and a hint, the way `linkerd check` reports.
//! `-o json` prints the same as a document for scripts. The exit status is 0 when nothing
//! failed (warnings allowed), 1 when a check failed, 2 when the cluster cannot be asked at all
//! (no kubeconfig).
//!
//! The work is split in two: [`fetch`] reads what the checks need from the API server into a
//! [`Snapshot`] (one list or get per object kind), and [`evaluate`] is a pure function of the
//! snapshot and the clock, so every failure message is tested without a cluster. The names
//! it looks for are the chart's ([`names`]).

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, SystemTime};

use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Node, Pod, Secret, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, ListParams};
use kube::CustomResourceExt as _;
use serde_json::{json, Value};
use x509_parser::prelude::{FromDer, GeneralName, ParsedExtension, X509Certificate};

use weft_controller::identity::ca::{CertificateAuthority as _, Issuer, IssuerFiles};
use weft_injector::annotations as ann;

/// The names of what the chart installs.
pub mod names {
    pub const CONTROLLER: &str = "weft-controller";
    pub const INJECTOR: &str = "weft-injector";
    /// The MutatingWebhookConfiguration.
    pub const WEBHOOK: &str = "weft-injector";
    /// The injector's serving certificate (`tls.crt`, `tls.key`, `ca.crt`: cert-manager's layout).
    pub const INJECTOR_TLS_SECRET: &str = "weft-injector-tls";
    /// The identity issuer (`tls.crt`, `tls.key`; `ca.crt` with the trust anchors in
    /// cert-manager's layout, else they are in [`TRUST_ANCHORS_CONFIGMAP`]).
    pub const ISSUER_SECRET: &str = "weft-identity-issuer";
    /// The trust anchors (`ca.crt`) the controller mounts, and the injector mounts into every
    /// proxy from the proxy's own namespace.
    pub const TRUST_ANCHORS_CONFIGMAP: &str = "weft-trust-anchors";
    pub const CNI_AGENT: &str = "weft-cni-agent";
    /// The label every chart workload's pods carry with their name.
    pub const NAME_LABEL: &str = "app.kubernetes.io/name";
    /// The label carrying the control plane's version.
    pub const VERSION_LABEL: &str = "app.kubernetes.io/version";
}

/// The oldest Kubernetes release Weft supports: native sidecars (optional) and every API the
/// controller watches exist in their v1 form there; the client's types are Kubernetes 1.33's.
pub const MIN_KUBERNETES: (u32, u32) = (1, 29);

/// The issuer certificate warns this long before it expires.
pub const ISSUER_EXPIRY_WARNING: Duration = Duration::from_secs(30 * 24 * 3600);

/// The Gateway API CRDs the controller watches (routes are ignored without them).
const GATEWAY_API_CRDS: [&str; 2] = [
    "httproutes.gateway.networking.k8s.io",
    "grpcroutes.gateway.networking.k8s.io",
];

#[derive(Debug, clap::Args)]
pub struct CheckArgs {
    /// Check that the cluster can take Weft, before installing it.
    #[arg(long)]
    pub pre: bool,
    /// The control plane's namespace.
    #[arg(short, long, default_value = "weft")]
    pub namespace: String,
    /// `table` (one line per check) or `json`.
    #[arg(short, long, default_value = "table", value_parser = ["table", "json"])]
    pub output: String,
    /// Require the CNI agent on every node even when its DaemonSet is not found.
    #[arg(long)]
    pub cni: bool,
    /// How long each request to the API server may take, in seconds.
    #[arg(long, default_value_t = 10)]
    pub timeout: u64,
}

/// How a check came out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Ok,
    Warning,
    Error,
}

impl Outcome {
    fn symbol(self) -> &'static str {
        match self {
            Outcome::Ok => "✔",
            Outcome::Warning => "‼",
            Outcome::Error => "✖",
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Warning => "warning",
            Outcome::Error => "error",
        }
    }
}

/// One check's result.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Check {
    pub category: &'static str,
    pub description: String,
    pub outcome: Outcome,
    /// What was found (always set unless the check passed).
    pub message: Option<String>,
    /// What to do about it.
    pub hint: Option<String>,
}

impl Check {
    fn ok(category: &'static str, description: impl Into<String>) -> Self {
        Check {
            category,
            description: description.into(),
            outcome: Outcome::Ok,
            message: None,
            hint: None,
        }
    }

    fn fail(
        category: &'static str,
        description: impl Into<String>,
        message: impl Into<String>,
        hint: impl Into<String>,
    ) -> Self {
        Check {
            category,
            description: description.into(),
            outcome: Outcome::Error,
            message: Some(message.into()),
            hint: Some(hint.into()),
        }
    }

    fn warn(
        category: &'static str,
        description: impl Into<String>,
        message: impl Into<String>,
        hint: impl Into<String>,
    ) -> Self {
        Check {
            outcome: Outcome::Warning,
            ..Check::fail(category, description, message, hint)
        }
    }

    fn with_message(mut self, message: impl Into<String>) -> Self {
        self.message = Some(message.into());
        self
    }
}

/// What the checks read from the cluster.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    /// The API server's URL.
    pub server: String,
    /// `(major, minor, gitVersion)`.
    pub version: (u32, u32, String),
    pub crds: Vec<CustomResourceDefinition>,
    pub namespace: Option<Namespace>,
    /// Pods of the control plane's namespace.
    pub pods: Vec<Pod>,
    pub injector_service: Option<Service>,
    /// EndpointSlices of the injector's Service.
    pub injector_slices: Vec<EndpointSlice>,
    pub webhook: Option<MutatingWebhookConfiguration>,
    pub injector_tls: Option<Secret>,
    pub issuer: Option<Secret>,
    /// ConfigMaps `weft-trust-anchors`, in every namespace.
    pub anchors: Vec<ConfigMap>,
    /// Every pod in the cluster that carries a proxy (the injector's annotation).
    pub meshed: Vec<Pod>,
    pub agent: Option<DaemonSet>,
    pub nodes: Vec<Node>,
}

/// Why the cluster could not be asked.
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    #[error("no usable kubeconfig: {0}")]
    KubeConfig(String),
}

/// Everything `weft check` reads, or the check that says why the API server cannot be read.
pub async fn fetch(args: &CheckArgs) -> Result<Result<Snapshot, Check>, CheckError> {
    let config = kube::Config::infer()
        .await
        .map_err(|e| CheckError::KubeConfig(e.to_string()))?;
    let server = config.cluster_url.to_string();
    let client =
        kube::Client::try_from(config).map_err(|e| CheckError::KubeConfig(e.to_string()))?;
    let timeout = Duration::from_secs(args.timeout.max(1));
    let unreachable = |message: String| {
        Check::fail(
            "kubernetes-api",
            "can reach the API server",
            format!("{server}: {message}"),
            "check the kubeconfig's server and credentials (kubectl cluster-info)",
        )
    };
    let info = match tokio::time::timeout(timeout, client.apiserver_version()).await {
        Ok(Ok(info)) => info,
        Ok(Err(e)) => return Ok(Err(unreachable(e.to_string()))),
        Err(_) => {
            return Ok(Err(unreachable(format!(
                "no answer within {} s",
                timeout.as_secs()
            ))))
        }
    };
    let number = |s: &str| {
        s.trim_end_matches(|c: char| !c.is_ascii_digit())
            .parse::<u32>()
            .unwrap_or(0)
    };
    let mut snap = Snapshot {
        version: (number(&info.major), number(&info.minor), info.git_version),
        server: server.clone(),
        ..Snapshot::default()
    };
    let ns = args.namespace.as_str();
    let c = &client;
    let read = Reader { timeout, server };
    snap.crds = read
        .list(Api::all(c.clone()), "CustomResourceDefinitions")
        .await?;
    snap.namespace = read.get(Api::all(c.clone()), ns).await?;
    snap.pods = read.list(Api::namespaced(c.clone(), ns), "pods").await?;
    snap.injector_service = read
        .get(Api::namespaced(c.clone(), ns), names::INJECTOR)
        .await?;
    snap.injector_slices = read
        .list::<EndpointSlice>(Api::namespaced(c.clone(), ns), "EndpointSlices")
        .await?
        .into_iter()
        .filter(|s| {
            s.metadata
                .labels
                .as_ref()
                .and_then(|l| l.get("kubernetes.io/service-name"))
                .is_some_and(|n| n == names::INJECTOR)
        })
        .collect();
    snap.webhook = read.get(Api::all(c.clone()), names::WEBHOOK).await?;
    snap.injector_tls = read
        .get(Api::namespaced(c.clone(), ns), names::INJECTOR_TLS_SECRET)
        .await?;
    snap.issuer = read
        .get(Api::namespaced(c.clone(), ns), names::ISSUER_SECRET)
        .await?;
    snap.anchors = read
        .list::<ConfigMap>(Api::all(c.clone()), "ConfigMaps")
        .await?
        .into_iter()
        .filter(|c| c.metadata.name.as_deref() == Some(names::TRUST_ANCHORS_CONFIGMAP))
        .collect();
    snap.meshed = read
        .list::<Pod>(Api::all(c.clone()), "pods")
        .await?
        .into_iter()
        .filter(|p| annotation(p, ann::PROXY_VERSION).is_some())
        .collect();
    snap.agent = read
        .get(Api::namespaced(c.clone(), ns), names::CNI_AGENT)
        .await?;
    snap.nodes = read.list(Api::all(c.clone()), "nodes").await?;
    Ok(Ok(snap))
}

/// Reads with a deadline; a failure after the version answered is still a failed check,
/// reported as the API server being unreachable mid-way.
struct Reader {
    timeout: Duration,
    server: String,
}

impl Reader {
    async fn list<K>(&self, api: Api<K>, what: &str) -> Result<Vec<K>, CheckError>
    where
        K: kube::Resource + Clone + k8s_openapi::serde::de::DeserializeOwned + std::fmt::Debug,
    {
        match tokio::time::timeout(self.timeout, api.list(&ListParams::default())).await {
            Ok(Ok(l)) => Ok(l.items),
            Ok(Err(kube::Error::Api(e))) if e.code == 404 || e.code == 403 => {
                tracing::debug!(what, code = e.code, "cannot list; treated as none");
                Ok(Vec::new())
            }
            Ok(Err(e)) => Err(CheckError::KubeConfig(format!(
                "{}: listing {what}: {e}",
                self.server
            ))),
            Err(_) => Err(CheckError::KubeConfig(format!(
                "{}: listing {what}: no answer within {} s",
                self.server,
                self.timeout.as_secs()
            ))),
        }
    }

    async fn get<K>(&self, api: Api<K>, name: &str) -> Result<Option<K>, CheckError>
    where
        K: kube::Resource + Clone + k8s_openapi::serde::de::DeserializeOwned + std::fmt::Debug,
    {
        match tokio::time::timeout(self.timeout, api.get_opt(name)).await {
            Ok(Ok(o)) => Ok(o),
            Ok(Err(kube::Error::Api(e))) if e.code == 403 => Ok(None),
            Ok(Err(e)) => Err(CheckError::KubeConfig(format!(
                "{}: reading {name}: {e}",
                self.server
            ))),
            Err(_) => Err(CheckError::KubeConfig(format!(
                "{}: reading {name}: no answer within {} s",
                self.server,
                self.timeout.as_secs()
            ))),
        }
    }
}

fn annotation<'a>(p: &'a Pod, key: &str) -> Option<&'a str> {
    p.metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(key))
        .map(String::as_str)
}

fn label<'a>(
    meta: &'a k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
    key: &str,
) -> Option<&'a str> {
    meta.labels
        .as_ref()
        .and_then(|l| l.get(key))
        .map(String::as_str)
}

fn pod_name(p: &Pod) -> &str {
    p.metadata.name.as_deref().unwrap_or("?")
}

fn is_ready(p: &Pod) -> bool {
    p.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// The checks, from what was read: `pre` for a cluster without Weft, else for an installed one.
pub fn evaluate(
    s: &Snapshot,
    namespace: &str,
    pre: bool,
    cni: bool,
    now: SystemTime,
) -> Vec<Check> {
    let mut out = vec![
        Check::ok("kubernetes-api", "can reach the API server").with_message(s.server.clone())
    ];
    out.push(version_check(s));
    if pre {
        out.push(namespace_free(s, namespace));
        out.extend(crds_before_install(s));
        out.push(gateway_api(s));
        return out;
    }
    out.extend(crds_current(s));
    out.push(gateway_api(s));
    out.push(match &s.namespace {
        Some(_) => Check::ok("control-plane", format!("namespace {namespace} exists")),
        None => Check::fail(
            "control-plane",
            format!("namespace {namespace} exists"),
            format!("namespace {namespace} not found"),
            format!("install Weft (helm install weft charts/weft -n {namespace} --create-namespace), or pass -n with its namespace"),
        ),
    });
    for name in [names::CONTROLLER, names::INJECTOR] {
        out.push(pods_ready(s, namespace, name));
    }
    out.extend(control_plane_tls(s, namespace));
    out.extend(webhook_checks(s, namespace, now));
    out.extend(identity_checks(s, namespace, now));
    out.push(proxy_versions(s));
    if cni || s.agent.is_some() {
        out.push(cni_agents(s, namespace));
    }
    out
}

fn version_check(s: &Snapshot) -> Check {
    let desc = "the API server's version is supported";
    let (major, minor, git) = &s.version;
    if (*major, *minor) >= MIN_KUBERNETES {
        Check::ok("kubernetes-api", desc).with_message(git.clone())
    } else {
        Check::fail(
            "kubernetes-api",
            desc,
            format!(
                "the API server is {git}; Weft needs Kubernetes {}.{} or newer",
                MIN_KUBERNETES.0, MIN_KUBERNETES.1
            ),
            "upgrade the cluster",
        )
    }
}

fn namespace_free(s: &Snapshot, namespace: &str) -> Check {
    let desc = format!("the control plane namespace {namespace} is free");
    let installed: Vec<&str> = s
        .pods
        .iter()
        .filter(|p| label(&p.metadata, names::NAME_LABEL) == Some(names::CONTROLLER))
        .map(pod_name)
        .collect();
    if installed.is_empty() {
        Check::ok("pre-install", desc)
    } else {
        Check::fail(
            "pre-install",
            desc,
            format!("Weft already runs in {namespace}: {}", installed.join(", ")),
            format!("check the installed control plane with `weft check -n {namespace}`, or upgrade it with helm upgrade"),
        )
    }
}

/// The CRDs this Weft defines, generated from their Rust types.
fn our_crds() -> Vec<CustomResourceDefinition> {
    vec![
        weft_model::policy::BackendPolicy::crd(),
        weft_model::authz::Server::crd(),
        weft_model::authz::AuthorizationPolicy::crd(),
    ]
}

fn crd_name(c: &CustomResourceDefinition) -> &str {
    c.metadata.name.as_deref().unwrap_or("?")
}

/// Why an installed CRD is not the one this Weft generates, if it is not: the served
/// versions and their schemas are compared (the API server adds defaults elsewhere).
fn crd_difference(
    installed: &CustomResourceDefinition,
    ours: &CustomResourceDefinition,
) -> Option<String> {
    let versions = |c: &CustomResourceDefinition| -> BTreeMap<String, Value> {
        c.spec
            .versions
            .iter()
            .map(|v| {
                let schema = v
                    .schema
                    .as_ref()
                    .and_then(|s| serde_json::to_value(&s.open_api_v3_schema).ok())
                    .unwrap_or(Value::Null);
                (
                    v.name.clone(),
                    json!({"served": v.served, "storage": v.storage, "schema": schema}),
                )
            })
            .collect()
    };
    let (have, want) = (versions(installed), versions(ours));
    let (have_names, want_names): (Vec<_>, Vec<_>) = (have.keys().collect(), want.keys().collect());
    if have_names != want_names {
        return Some(format!(
            "it serves versions {have_names:?}, this Weft defines {want_names:?}"
        ));
    }
    for (v, w) in &want {
        let h = &have[v];
        if h["served"] != w["served"] || h["storage"] != w["storage"] {
            return Some(format!("version {v} is served/stored differently"));
        }
        if h["schema"] != w["schema"] {
            return Some(format!(
                "the schema of version {v} differs from this Weft's"
            ));
        }
    }
    None
}

fn crds_current(s: &Snapshot) -> Vec<Check> {
    our_crds()
        .iter()
        .map(|ours| {
            let name = crd_name(ours);
            let desc = format!("CRD {name} is installed and current");
            match s.crds.iter().find(|c| crd_name(c) == name) {
                None => Check::fail(
                    "crds",
                    desc,
                    format!("CRD {name} not found"),
                    "install the chart's CRDs: kubectl apply -f charts/weft/crds/ (helm installs them on first install only)",
                ),
                Some(installed) => match crd_difference(installed, ours) {
                    None => Check::ok("crds", desc),
                    Some(why) => Check::fail(
                        "crds",
                        desc,
                        format!("CRD {name} is not this Weft's: {why}"),
                        "update the CRDs: kubectl apply -f charts/weft/crds/ (helm upgrade does not update CRDs)",
                    ),
                },
            }
        })
        .collect()
}

fn crds_before_install(s: &Snapshot) -> Vec<Check> {
    our_crds()
        .iter()
        .map(|ours| {
            let name = crd_name(ours);
            let desc = format!("CRD {name} can be installed");
            match s.crds.iter().find(|c| crd_name(c) == name) {
                None => Check::ok("pre-install", desc),
                Some(installed) => match crd_difference(installed, ours) {
                    None => Check::ok("pre-install", desc).with_message("already installed, current"),
                    Some(why) => Check::warn(
                        "pre-install",
                        desc,
                        format!("an older or other CRD {name} is installed: {why}"),
                        "helm install keeps an existing CRD: update it with kubectl apply -f charts/weft/crds/",
                    ),
                },
            }
        })
        .collect()
}

fn gateway_api(s: &Snapshot) -> Check {
    let desc = "the Gateway API CRDs (HTTPRoute, GRPCRoute) are installed";
    let missing: Vec<&str> = GATEWAY_API_CRDS
        .iter()
        .copied()
        .filter(|n| !s.crds.iter().any(|c| crd_name(c) == *n))
        .collect();
    if missing.is_empty() {
        Check::ok("crds", desc)
    } else {
        Check::warn(
            "crds",
            desc,
            format!("not found: {}; routes, retries and timeouts cannot be configured", missing.join(", ")),
            "install the Gateway API's standard channel: kubectl apply -f https://github.com/kubernetes-sigs/gateway-api/releases/download/v1.3.0/standard-install.yaml",
        )
    }
}

fn pods_ready(s: &Snapshot, namespace: &str, name: &str) -> Check {
    let desc = format!("{name} pods are ready");
    let pods: Vec<&Pod> = s
        .pods
        .iter()
        .filter(|p| label(&p.metadata, names::NAME_LABEL) == Some(name))
        .collect();
    if pods.is_empty() {
        return Check::fail(
            "control-plane",
            desc,
            format!(
                "no pod labelled {}={name} in {namespace}",
                names::NAME_LABEL
            ),
            format!("kubectl -n {namespace} get deploy {name}; kubectl -n {namespace} get events"),
        );
    }
    let not_ready: Vec<&str> = pods
        .iter()
        .filter(|p| !is_ready(p))
        .map(|p| pod_name(p))
        .collect();
    if not_ready.is_empty() {
        Check::ok("control-plane", desc).with_message(format!("{} ready", pods.len()))
    } else {
        Check::fail(
            "control-plane",
            desc,
            format!("not ready: {}", not_ready.join(", ")),
            format!("kubectl -n {namespace} describe pod {}", not_ready[0]),
        )
    }
}

/// The controller's development flag that turns off TLS on its gRPC ports.
const INSECURE_PLAINTEXT: &str = "--insecure-plaintext";

/// Whether a controller container runs with `--insecure-plaintext` (argument, or its
/// environment fallback set to a true value).
fn runs_plaintext(c: &k8s_openapi::api::core::v1::Container) -> bool {
    let arg = c.args.iter().chain(c.command.iter()).flatten().any(|a| {
        a == INSECURE_PLAINTEXT
            || a.strip_prefix(INSECURE_PLAINTEXT)
                .and_then(|v| v.strip_prefix('='))
                .is_some_and(|v| v != "false")
    });
    let env = c.env.iter().flatten().any(|e| {
        e.name == "WEFT_CONTROLLER_INSECURE_PLAINTEXT"
            && e.value.as_deref().is_some_and(|v| {
                matches!(v.to_ascii_lowercase().as_str(), "true" | "1" | "yes" | "on")
            })
    });
    arg || env
}

/// The control plane requires TLS: a controller pod started with `--insecure-plaintext`
/// serves identity tokens and policy in the clear, to anyone. No check without controller
/// pods (their absence is already an error).
fn control_plane_tls(s: &Snapshot, namespace: &str) -> Option<Check> {
    let desc = "the control plane requires TLS";
    let controllers: Vec<&Pod> = s
        .pods
        .iter()
        .filter(|p| label(&p.metadata, names::NAME_LABEL) == Some(names::CONTROLLER))
        .collect();
    if controllers.is_empty() {
        return None;
    }
    let plaintext: Vec<&str> = controllers
        .iter()
        .filter(|p| {
            p.spec
                .as_ref()
                .is_some_and(|spec| spec.containers.iter().any(runs_plaintext))
        })
        .map(|p| pod_name(p))
        .collect();
    Some(if plaintext.is_empty() {
        Check::ok("control-plane", desc)
            .with_message("the identity port serves TLS and the destination port mutual TLS")
    } else {
        Check::warn(
            "control-plane",
            desc,
            format!(
                "{} run(s) with {INSECURE_PLAINTEXT}: ServiceAccount tokens cross the network in the clear and any client may read any workload's discovery and policy",
                plaintext.join(", ")
            ),
            format!(
                "remove {INSECURE_PLAINTEXT} from the {} Deployment in {namespace} (it is for development only); with an issuer configured the controller then serves TLS, and proxies reach it at host:port addresses without http://",
                names::CONTROLLER
            ),
        )
    })
}

/// The certificates in a PEM bundle, as DER; errors name `what`.
fn pem_certs(pem: &[u8], what: &str) -> Result<Vec<Vec<u8>>, String> {
    let mut out = Vec::new();
    for p in x509_parser::pem::Pem::iter_from_buffer(pem) {
        let p = p.map_err(|e| format!("{what}: not PEM: {e}"))?;
        if p.label == "CERTIFICATE" {
            out.push(p.contents);
        }
    }
    if out.is_empty() {
        return Err(format!("{what}: no CERTIFICATE block"));
    }
    Ok(out)
}

fn parse<'a>(der: &'a [u8], what: &str) -> Result<X509Certificate<'a>, String> {
    X509Certificate::from_der(der)
        .map(|(_, c)| c)
        .map_err(|e| format!("{what}: not an X.509 certificate: {e}"))
}

/// `2026-12-05T19:30:45Z`.
fn rfc3339(t: SystemTime) -> String {
    let t = time::OffsetDateTime::from(t);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
        t.year(),
        t.month() as u8,
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    )
}

/// An X.509 time as [`rfc3339`].
fn asn1(t: x509_parser::time::ASN1Time) -> String {
    let secs = u64::try_from(t.timestamp()).unwrap_or(0);
    rfc3339(SystemTime::UNIX_EPOCH + Duration::from_secs(secs))
}

fn secs(t: SystemTime) -> i64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

fn secret_key<'a>(s: &'a Secret, key: &str) -> Option<&'a [u8]> {
    s.data
        .as_ref()
        .and_then(|d| d.get(key))
        .map(|b| b.0.as_slice())
}

fn webhook_checks(s: &Snapshot, namespace: &str, now: SystemTime) -> Vec<Check> {
    let cat = "injector-webhook";
    let Some(cfg) = &s.webhook else {
        return vec![Check::fail(
            cat,
            format!("MutatingWebhookConfiguration {} exists", names::WEBHOOK),
            format!(
                "MutatingWebhookConfiguration {} not found: pods are not injected",
                names::WEBHOOK
            ),
            "install or upgrade the chart",
        )];
    };
    let mut out = vec![Check::ok(
        cat,
        format!("MutatingWebhookConfiguration {} exists", names::WEBHOOK),
    )];
    let hooks = cfg.webhooks.as_deref().unwrap_or_default();
    let service = format!("{}/{}", namespace, names::INJECTOR);
    let desc =
        format!("the webhook calls the injector Service {service}, which has ready endpoints");
    let targets_ok = !hooks.is_empty()
        && hooks.iter().all(|h| {
            h.client_config
                .service
                .as_ref()
                .is_some_and(|svc| svc.name == names::INJECTOR && svc.namespace == namespace)
        });
    let ready = s
        .injector_slices
        .iter()
        .flat_map(|sl| sl.endpoints.iter())
        .filter(|e| e.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true))
        .count();
    out.push(if !targets_ok {
        Check::fail(
            cat,
            desc,
            format!("the webhook's clientConfig does not name Service {service}"),
            "upgrade the chart, or pass -n with the namespace it was installed in",
        )
    } else if s.injector_service.is_none() {
        Check::fail(cat, desc, format!("Service {service} not found"), "upgrade the chart")
    } else if ready == 0 {
        Check::fail(
            cat,
            desc,
            format!("Service {service} has no ready endpoint: the API server cannot reach the injector (failurePolicy decides whether pods are then created unmeshed or refused)"),
            format!("kubectl -n {namespace} get pods -l {}={}", names::NAME_LABEL, names::INJECTOR),
        )
    } else {
        Check::ok(cat, desc).with_message(format!("{ready} ready endpoint(s)"))
    });
    out.push(ca_bundle_check(s, hooks, namespace, now));
    out
}

fn ca_bundle_check(
    s: &Snapshot,
    hooks: &[k8s_openapi::api::admissionregistration::v1::MutatingWebhook],
    namespace: &str,
    now: SystemTime,
) -> Check {
    let cat = "injector-webhook";
    let desc =
        "the webhook's CA bundle signed the injector's serving certificate, valid for its Service";
    let hint = format!(
        "reissue the serving certificate (Secret {namespace}/{}) and set the webhook's caBundle to its CA, or let cert-manager's cainjector do both",
        names::INJECTOR_TLS_SECRET
    );
    let result = (|| -> Result<String, String> {
        let bundle = hooks
            .first()
            .and_then(|h| h.client_config.ca_bundle.as_ref())
            .map(|b| b.0.clone())
            .filter(|b| !b.is_empty())
            .ok_or("the webhook has no caBundle")?;
        let secret = s.injector_tls.as_ref().ok_or(format!(
            "Secret {namespace}/{} not found",
            names::INJECTOR_TLS_SECRET
        ))?;
        let crt = secret_key(secret, "tls.crt").ok_or(format!(
            "Secret {namespace}/{} has no tls.crt",
            names::INJECTOR_TLS_SECRET
        ))?;
        let cas = pem_certs(&bundle, "caBundle")?;
        let leafs = pem_certs(crt, "tls.crt")?;
        let leaf = parse(&leafs[0], "tls.crt")?;
        let signed = cas.iter().any(|der| {
            parse(der, "caBundle").is_ok_and(|ca| {
                leaf.issuer() == ca.subject()
                    && leaf.verify_signature(Some(ca.public_key())).is_ok()
            })
        });
        if !signed {
            return Err(format!(
                "the serving certificate ({}) is not signed by the caBundle's CA: the API server refuses the injector's TLS",
                leaf.subject()
            ));
        }
        let v = leaf.validity();
        if secs(now) >= v.not_after.timestamp() {
            return Err(format!(
                "the serving certificate expired at {}",
                v.not_after
            ));
        }
        let dns = format!("{}.{namespace}.svc", names::INJECTOR);
        let names_in_cert: Vec<String> = leaf
            .extensions()
            .iter()
            .filter_map(|e| match e.parsed_extension() {
                ParsedExtension::SubjectAlternativeName(san) => Some(san),
                _ => None,
            })
            .flat_map(|san| san.general_names.iter())
            .filter_map(|n| match n {
                GeneralName::DNSName(d) => Some(d.to_string()),
                _ => None,
            })
            .collect();
        if !names_in_cert.iter().any(|n| n == &dns) {
            return Err(format!(
                "the serving certificate names {names_in_cert:?}, not {dns}, which the API server connects to"
            ));
        }
        Ok(format!("valid until {}", asn1(v.not_after)))
    })();
    match result {
        Ok(m) => Check::ok(cat, desc).with_message(m),
        Err(m) => Check::fail(cat, desc, m, hint),
    }
}

/// The `ca.crt` of ConfigMap `weft-trust-anchors` in `namespace`.
fn anchors_in<'a>(s: &'a Snapshot, namespace: &str) -> Option<&'a str> {
    s.anchors
        .iter()
        .find(|c| c.metadata.namespace.as_deref() == Some(namespace))
        .and_then(|c| c.data.as_ref())
        .and_then(|d| d.get("ca.crt"))
        .map(String::as_str)
}

fn identity_checks(s: &Snapshot, namespace: &str, now: SystemTime) -> Vec<Check> {
    let cat = "identity";
    let secret = format!("{namespace}/{}", names::ISSUER_SECRET);
    let cm = format!("{namespace}/{}", names::TRUST_ANCHORS_CONFIGMAP);
    let issuer_desc = "the issuer certificate is valid and signed by the trust anchors";
    let Some(issuer) = &s.issuer else {
        return vec![Check::fail(
            cat,
            issuer_desc,
            format!("Secret {secret} not found: the controller cannot issue workload certificates"),
            "create it (tls.crt, tls.key) from your issuer, or let cert-manager do it (see charts/weft/README.md)",
        )];
    };
    let key = |k: &str| secret_key(issuer, k).unwrap_or_default();
    // The controller's anchors: the issuer Secret's ca.crt (cert-manager's layout), else the
    // ConfigMap the chart mounts into the controller.
    let (anchors, anchors_from) = match secret_key(issuer, "ca.crt").filter(|c| !c.is_empty()) {
        Some(ca) => (ca, format!("Secret {secret} ca.crt")),
        None => (
            anchors_in(s, namespace).unwrap_or_default().as_bytes(),
            format!("ConfigMap {cm} ca.crt"),
        ),
    };
    let files = IssuerFiles {
        cert: format!("Secret {secret} tls.crt").into(),
        key: format!("Secret {secret} tls.key").into(),
        trust_anchors: anchors_from.clone().into(),
    };
    let mut out = Vec::new();
    match Issuer::from_pem(&files, key("tls.crt"), key("tls.key"), anchors, now) {
        Err(e) => out.push(Check::fail(
            cat,
            issuer_desc,
            e.to_string(),
            "rotate the issuer (a new tls.crt/tls.key signed by a root in the trust anchors): see control-plane/README.md",
        )),
        Ok(i) => {
            out.push(Check::ok(cat, issuer_desc).with_message(i.status().issuer_subject));
            let not_after = i.status().issuer_not_after;
            let left = not_after.duration_since(now).unwrap_or_default();
            let desc = "the issuer certificate is not about to expire";
            let when = rfc3339(not_after);
            out.push(if left < ISSUER_EXPIRY_WARNING {
                Check::warn(
                    cat,
                    desc,
                    format!("it expires at {when} (in {} days)", left.as_secs() / 86_400),
                    "rotate the issuer before then; proxies keep their certificates until they expire",
                )
            } else {
                Check::ok(cat, desc).with_message(format!("expires at {when}"))
            });
        }
    }
    // What the proxies get: the injector mounts ConfigMap weft-trust-anchors from each
    // meshed pod's own namespace.
    let desc = "proxies are given the controller's trust anchors";
    let set = |pem: &[u8], what: &str| -> Result<BTreeSet<Vec<u8>>, String> {
        Ok(pem_certs(pem, what)?.into_iter().collect())
    };
    let subjects = |a: &BTreeSet<Vec<u8>>, b: &BTreeSet<Vec<u8>>| -> Vec<String> {
        a.difference(b)
            .map(|d| {
                parse(d, "")
                    .map(|c| c.subject().to_string())
                    .unwrap_or_default()
            })
            .collect()
    };
    let mut namespaces: BTreeSet<&str> = s
        .meshed
        .iter()
        .map(|p| p.metadata.namespace.as_deref().unwrap_or("default"))
        .collect();
    namespaces.insert(namespace);
    let compared = (|| -> Result<usize, String> {
        let controller = set(anchors, &anchors_from)?;
        for ns in &namespaces {
            let here = format!("{ns}/{}", names::TRUST_ANCHORS_CONFIGMAP);
            let Some(given) = anchors_in(s, ns) else {
                return Err(format!(
                    "ConfigMap {here} with ca.crt not found: the injector mounts it into the proxies of namespace {ns}, which then cannot verify any peer"
                ));
            };
            let given = set(given.as_bytes(), &format!("ConfigMap {here} ca.crt"))?;
            let missing = subjects(&controller, &given);
            if !missing.is_empty() {
                return Err(format!(
                    "the controller's trust anchors {missing:?} ({anchors_from}) are not in ConfigMap {here}: its proxies reject certificates they chain to"
                ));
            }
            let extra = subjects(&given, &controller);
            if !extra.is_empty() {
                return Err(format!(
                    "ConfigMap {here} has trust anchors the controller does not ({extra:?}): its proxies trust roots the controller does not"
                ));
            }
        }
        Ok(namespaces.len())
    })();
    out.push(match compared {
        Ok(n) => Check::ok(cat, desc).with_message(format!("{n} namespace(s)")),
        Err(m) => Check::fail(
            cat,
            desc,
            m,
            format!("copy {anchors_from} into ConfigMap {} ca.crt of every meshed namespace (trust-manager can keep them in sync; during a rotation all hold the old and new roots)", names::TRUST_ANCHORS_CONFIGMAP),
        ),
    });
    out
}

fn proxy_versions(s: &Snapshot) -> Check {
    let cat = "data-plane";
    let desc = "meshed pods run the control plane's proxy version";
    let control: BTreeSet<&str> = s
        .pods
        .iter()
        .filter(|p| label(&p.metadata, names::NAME_LABEL) == Some(names::CONTROLLER))
        .filter_map(|p| label(&p.metadata, names::VERSION_LABEL))
        .collect();
    let Some(version) = control.iter().next().copied() else {
        return Check::warn(
            cat,
            desc,
            format!(
                "the controller pods carry no {} label to compare with",
                names::VERSION_LABEL
            ),
            "install the control plane with the chart, which sets it",
        );
    };
    let stale: Vec<String> = s
        .meshed
        .iter()
        .filter_map(|p| {
            let v = annotation(p, ann::PROXY_VERSION)?;
            (v != version).then(|| {
                format!(
                    "{}/{} ({v})",
                    p.metadata.namespace.as_deref().unwrap_or("default"),
                    pod_name(p)
                )
            })
        })
        .collect();
    if stale.is_empty() {
        Check::ok(cat, desc).with_message(format!("{} meshed pod(s) on {version}", s.meshed.len()))
    } else {
        let shown: Vec<&str> = stale.iter().take(5).map(String::as_str).collect();
        let more = stale.len().saturating_sub(shown.len());
        Check::warn(
            cat,
            desc,
            format!(
                "{} of {} meshed pods run another proxy version than the control plane's {version}: {}{}",
                stale.len(),
                s.meshed.len(),
                shown.join(", "),
                if more > 0 { format!(" and {more} more") } else { String::new() }
            ),
            "restart their workloads (kubectl rollout restart) so they are injected with the current proxy",
        )
    }
}

fn cni_agents(s: &Snapshot, namespace: &str) -> Check {
    let cat = "cni";
    let desc = "the CNI agent runs on every node";
    if s.agent.is_none() {
        return Check::fail(
            cat,
            desc,
            format!("DaemonSet {namespace}/{} not found", names::CNI_AGENT),
            "install the chart with cni.enabled=true",
        );
    }
    let ready_on: BTreeSet<&str> = s
        .pods
        .iter()
        .filter(|p| label(&p.metadata, names::NAME_LABEL) == Some(names::CNI_AGENT) && is_ready(p))
        .filter_map(|p| p.spec.as_ref().and_then(|sp| sp.node_name.as_deref()))
        .collect();
    let missing: Vec<&str> = s
        .nodes
        .iter()
        .filter_map(|n| n.metadata.name.as_deref())
        .filter(|n| !ready_on.contains(n))
        .collect();
    if missing.is_empty() {
        Check::ok(cat, desc).with_message(format!("{} node(s)", s.nodes.len()))
    } else {
        Check::fail(
            cat,
            desc,
            format!(
                "no ready agent on: {}; pods there get no network policy and no eBPF services",
                missing.join(", ")
            ),
            format!(
                "kubectl -n {namespace} get pods -l {}={} -o wide",
                names::NAME_LABEL,
                names::CNI_AGENT
            ),
        )
    }
}

/// The report as lines for a terminal.
pub fn table(checks: &[Check]) -> String {
    let mut out = String::new();
    let mut category = "";
    for c in checks {
        if c.category != category {
            if !category.is_empty() {
                out.push('\n');
            }
            category = c.category;
            out.push_str(category);
            out.push('\n');
            out.push_str(&"-".repeat(category.chars().count()));
            out.push('\n');
        }
        out.push_str(&format!("{} {}", c.outcome.symbol(), c.description));
        if c.outcome == Outcome::Ok {
            if let Some(m) = &c.message {
                out.push_str(&format!(" ({m})"));
            }
        }
        out.push('\n');
        if c.outcome != Outcome::Ok {
            if let Some(m) = &c.message {
                out.push_str(&format!("    {m}\n"));
            }
            if let Some(h) = &c.hint {
                out.push_str(&format!("    hint: {h}\n"));
            }
        }
    }
    let failed = checks.iter().any(|c| c.outcome == Outcome::Error);
    out.push_str(&format!(
        "\nStatus check results are {}\n",
        if failed { "✖" } else { "✔" }
    ));
    out
}

/// The report as a JSON document.
pub fn json_report(checks: &[Check]) -> Value {
    json!({
        "success": !checks.iter().any(|c| c.outcome == Outcome::Error),
        "checks": checks.iter().map(|c| json!({
            "category": c.category,
            "description": c.description,
            "result": c.outcome.as_str(),
            "message": c.message,
            "hint": c.hint,
        })).collect::<Vec<_>>(),
    })
}

/// `weft check`: exit 0 when no check failed, 1 when one did, 2 when the cluster cannot be
/// asked.
pub fn run(args: &CheckArgs) -> std::process::ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("weft check: cannot start the runtime: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    match runtime.block_on(report(args, &mut std::io::stdout().lock())) {
        Ok(true) => std::process::ExitCode::SUCCESS,
        Ok(false) => std::process::ExitCode::FAILURE,
        Err(e) => {
            eprintln!("weft check: {e}");
            std::process::ExitCode::from(2)
        }
    }
}

/// Runs the checks and prints them; `Ok(true)` when none failed.
pub async fn report(args: &CheckArgs, out: &mut dyn std::io::Write) -> Result<bool, CheckError> {
    let checks = match fetch(args).await? {
        Ok(snapshot) => evaluate(
            &snapshot,
            &args.namespace,
            args.pre,
            args.cni,
            SystemTime::now(),
        ),
        Err(unreachable) => vec![unreachable],
    };
    let text = if args.output == "json" {
        format!("{:#}\n", json_report(&checks))
    } else {
        table(&checks)
    };
    // A closed stdout (e.g. `| head`) is not a failed check.
    let _ = out.write_all(text.as_bytes());
    Ok(!checks.iter().any(|c| c.outcome == Outcome::Error))
}

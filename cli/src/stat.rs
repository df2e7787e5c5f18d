//! `weft stat`: golden signals per deployment, service, route or pod, from a
//! Prometheus server or straight from the proxies' admin endpoints.
//!
//! Two ways in, one table out:
//!
//! - `--prometheus URL`: PromQL over `/api/v1/query`, grouped by the labels
//!   the chart's scrape config adds (`namespace`, `pod`, `workload`), using
//!   the chart's recording rules (`weft:request_rate`, `weft:success_rate`)
//!   when the server has them and the window is theirs (`1m`).
//! - `--from-proxies ADDR...` or `--source dir:PATH`: two scrapes of each
//!   proxy's `/metrics`, `--window` apart, turned into rates by
//!   [`crate::stats`]. With a manifest source the pods that run a Weft
//!   proxy are found through the controller's index, with their
//!   deployments (the `pod-template-hash` convention) and the services whose
//!   selector matches them.
//!
//! What a row means: a deployment's or a pod's row is the traffic its proxies
//! *received* (inbound), as `linkerd viz stat` shows it; a service's row is
//! the traffic meshed clients *sent* to it (outbound, by authority), with
//! the mTLS share the service's own proxies saw; a route's row is what the
//! clients' proxies counted on the route (`weft_route_*`: no latency).
//!
//! The grouping and arithmetic are pure functions ([`rows_from_scrapes`],
//! [`queries`], [`rows_from_prometheus`], [`parse_vector`]); the I/O sits in
//! [`run`].

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::Path;
use std::process::ExitCode;
use std::str::FromStr;
use std::time::{Duration, Instant};

use http::StatusCode;
use serde_json::{json, Value};
use weft_controller::index::State;
use weft_controller::source::SourceConfig;
use weft_injector::patch::{InjectConfig, PROXY_CONTAINER};
use weft_model::labels::Selector;
use weft_model::Kind;

use crate::demo::proxy::AdminClient;
use crate::promtext::Sample;
use crate::stats::{Direction, DirectionSnapshot, WindowCounts, WindowStats};

/// `weft stat`.
#[derive(Debug, clap::Args)]
pub struct StatArgs {
    /// What to show a row for: deploy|deployment, svc|service, route, pod.
    #[arg(value_name = "KIND", default_value = "deployment")]
    pub kind: ResourceKind,
    /// Only the resource with this name.
    #[arg(value_name = "NAME")]
    pub name: Option<String>,
    /// Only resources in this namespace.
    #[arg(short, long)]
    pub namespace: Option<String>,
    /// From the proxies: the time between the two scrapes (e.g. 30s, 2s, 1m).
    /// With --prometheus: the rate window ([1m]).
    #[arg(long, value_name = "DURATION")]
    pub window: Option<WindowArg>,
    /// Output format.
    #[arg(short, long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
    /// Query this Prometheus server (http://host:port[/prefix]).
    #[arg(long, value_name = "URL", conflicts_with_all = ["from_proxies", "source"])]
    pub prometheus: Option<String>,
    /// Scrape these proxies' admin endpoints (host:port), each optionally
    /// named `[NAMESPACE/]POD=host:port`.
    #[arg(long, value_name = "ADDR", num_args = 1.., conflicts_with = "source")]
    pub from_proxies: Vec<ProxyArg>,
    /// Find the meshed pods and their admin ports in a manifest directory
    /// (`dir:PATH`) or the cluster (`kube`: KUBECONFIG, else in-cluster) and
    /// scrape them.
    #[arg(long, value_name = "kube|dir:PATH")]
    pub source: Option<SourceConfig>,
    /// Seconds to wait for each HTTP answer.
    #[arg(long, value_name = "SECS", default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..))]
    pub timeout: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    Table,
    Json,
}

/// The kind of resource a row stands for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResourceKind {
    Deployment,
    Service,
    Route,
    Pod,
}

impl FromStr for ResourceKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "deploy" | "deployment" | "deployments" => Ok(Self::Deployment),
            "svc" | "service" | "services" => Ok(Self::Service),
            "route" | "routes" => Ok(Self::Route),
            "po" | "pod" | "pods" => Ok(Self::Pod),
            _ => Err(format!(
                "{s:?} is not a resource kind; expected deploy|deployment, svc|service, route or pod"
            )),
        }
    }
}

/// `--window`: `30s`, `1m`, `500ms`, `2h`, or PromQL's `[1m]`; a bare number is seconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WindowArg(pub Duration);

impl FromStr for WindowArg {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("{s:?} is not a window; expected e.g. 30s, 1m, 500ms");
        // PromQL's `[1m]` is accepted as written.
        let s = s
            .strip_prefix('[')
            .and_then(|t| t.strip_suffix(']'))
            .unwrap_or(s);
        let (number, unit) = match s.find(|c: char| !c.is_ascii_digit()) {
            Some(i) => s.split_at(i),
            None => (s, "s"),
        };
        let n: u64 = number.parse().map_err(|_| bad())?;
        let d = match unit {
            "ms" => Duration::from_millis(n),
            "s" => Duration::from_secs(n),
            "m" => Duration::from_secs(n.saturating_mul(60)),
            "h" => Duration::from_secs(n.saturating_mul(3600)),
            _ => return Err(bad()),
        };
        if d.is_zero() {
            return Err(format!("{s:?}: the window must be longer than zero"));
        }
        Ok(WindowArg(d))
    }
}

impl WindowArg {
    /// PromQL's duration syntax, in whole seconds (at least one).
    pub fn promql(self) -> String {
        let secs = self.0.as_secs().max(1);
        if secs % 60 == 0 {
            format!("{}m", secs / 60)
        } else {
            format!("{secs}s")
        }
    }
}

/// `--from-proxies`: `host:port`, or `[namespace/]pod=host:port`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProxyArg {
    pub namespace: Option<String>,
    pub pod: Option<String>,
    pub addr: String,
}

impl FromStr for ProxyArg {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (name, addr) = match s.split_once('=') {
            Some((name, addr)) => (Some(name), addr),
            None => (None, s),
        };
        if !addr.contains(':') {
            return Err(format!(
                "{s:?}: expected an admin address host:port, optionally named [NAMESPACE/]POD=host:port"
            ));
        }
        let (namespace, pod) =
            match name.map(|n| n.split_once('/').map_or((None, n), |(a, b)| (Some(a), b))) {
                Some((ns, pod)) if !pod.is_empty() && ns.is_none_or(|n| !n.is_empty()) => {
                    (ns.map(str::to_string), Some(pod.to_string()))
                }
                Some(_) => return Err(format!("{s:?}: the name before `=` is empty")),
                None => (None, None),
            };
        Ok(ProxyArg {
            namespace,
            pod,
            addr: addr.to_string(),
        })
    }
}

/// Why `weft stat` could not answer. Every message names what was asked of
/// whom and what was wrong.
#[derive(Debug, thiserror::Error)]
pub enum StatError {
    #[error("prometheus at {url}: {reason}")]
    Prometheus { url: String, reason: String },
    #[error("proxy admin endpoint {addr}: {reason}")]
    Proxy { addr: String, reason: String },
    #[error("{0}")]
    Manifests(#[from] crate::policy::ExplainError),
    #[error("no Kubernetes configuration ({0}): set KUBECONFIG or run in a pod, or give --source dir:PATH or --from-proxies ADDR...")]
    KubeConfig(String),
    #[error("cannot list from the Kubernetes API server at {url}: {message}; check KUBECONFIG and that the cluster is reachable")]
    KubeUnreachable { url: String, message: String },
    #[error("the Kubernetes API server at {url} did not list pods and services within {secs} s ({errors} watch errors); weft stat needs list/watch on them (RBAC)")]
    KubeSyncTimeout { url: String, secs: u64, errors: u64 },
    #[error("no meshed pods with an IP address{} in {source_text}: nothing to scrape", .namespace.as_ref().map(|n| format!(" in namespace {n}")).unwrap_or_default())]
    NoPods {
        source_text: String,
        namespace: Option<String>,
    },
    #[error("nothing to read: give --prometheus URL, --from-proxies ADDR... or --source dir:PATH")]
    NoInput,
    #[error("cannot start the async runtime: {0}")]
    Runtime(std::io::Error),
}

/// One row: the golden signals of one resource over the window. `None` is
/// "unknown" (no requests in the window, no histogram, not measured).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct StatRow {
    pub name: String,
    pub namespace: Option<String>,
    /// (pods with a proxy, pods), when the pods are known.
    pub meshed: Option<(u32, u32)>,
    pub success: Option<f64>,
    pub rps: Option<f64>,
    /// Seconds.
    pub p50: Option<f64>,
    pub p95: Option<f64>,
    pub p99: Option<f64>,
    pub tcp_conn: Option<f64>,
    /// Share of requests (or, without requests, connections) that were mutual TLS.
    pub mtls: Option<f64>,
}

/// A pod whose proxy is read, and what it belongs to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodRef {
    pub namespace: Option<String>,
    pub name: String,
    /// The deployment (or, without one, the pod itself as the chart's scrape
    /// config names a workload).
    pub deployment: Option<String>,
    pub services: Vec<String>,
    pub meshed: bool,
    /// The proxy's admin address; `None` for an unmeshed pod or one without an IP.
    pub admin: Option<String>,
}

impl PodRef {
    /// A proxy given by address: the pod is named by the `=` name or the address.
    pub fn from_arg(arg: &ProxyArg) -> Self {
        PodRef {
            namespace: arg.namespace.clone(),
            name: arg.pod.clone().unwrap_or_else(|| arg.addr.clone()),
            deployment: None,
            services: Vec::new(),
            meshed: true,
            admin: Some(arg.addr.clone()),
        }
    }

    fn workload(&self) -> &str {
        self.deployment.as_deref().unwrap_or(&self.name)
    }
}

/// The Deployment a pod belongs to by the ReplicaSet naming convention:
/// pod `<deployment>-<pod-template-hash>-<suffix>` carrying the label
/// `pod-template-hash=<hash>` (the ReplicaSet is `<deployment>-<hash>`).
pub fn deployment_of(pod_name: &str, labels: &BTreeMap<String, String>) -> Option<String> {
    let hash = labels.get("pod-template-hash")?;
    let (replica_set, _suffix) = pod_name.rsplit_once('-')?;
    let deployment = replica_set.strip_suffix(hash.as_str())?.strip_suffix('-')?;
    (!deployment.is_empty()).then(|| deployment.to_string())
}

/// The pods in the index (of `namespace`, when given), with their proxies'
/// admin addresses (pod IP : the proxy container's port that is not its
/// inbound port, else the injector's default admin port), deployments and
/// services (selectors matched with weft-model's one implementation).
pub fn pods_from_index(state: &State, namespace: Option<&str>) -> Vec<PodRef> {
    let default_admin = InjectConfig::default().admin_port;
    let mut pods: Vec<PodRef> = state
        .pods
        .values()
        .filter(|p| !p.terminated)
        .filter(|p| namespace.is_none_or(|n| p.key.namespace == n))
        .map(|p| {
            let services = state
                .services
                .values()
                .filter(|s| s.key.namespace == p.key.namespace)
                .filter(|s| {
                    s.selector
                        .as_ref()
                        .is_some_and(|sel| Selector::from_map(sel).matches(&p.labels))
                })
                .map(|s| s.key.name.clone())
                .collect::<std::collections::BTreeSet<_>>()
                .into_iter()
                .collect();
            let admin_port = p
                .container_ports
                .iter()
                .find(|c| c.container == PROXY_CONTAINER && c.port != p.proxy_inbound_port)
                .map_or(default_admin, |c| c.port);
            PodRef {
                namespace: Some(p.key.namespace.clone()),
                name: p.key.name.clone(),
                deployment: deployment_of(&p.key.name, &p.labels),
                services,
                meshed: p.meshed,
                admin: p
                    .ips
                    .first()
                    .filter(|_| p.meshed)
                    .map(|ip| SocketAddr::new(*ip, admin_port).to_string()),
            }
        })
        .collect();
    pods.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    pods
}

/// Two scrapes of one pod's proxy.
#[derive(Clone, Debug)]
pub struct PodScrape<'a> {
    pub pod: &'a PodRef,
    pub prev: &'a [Sample],
    pub cur: &'a [Sample],
}

/// `name.namespace.svc[.…][:port]` → (name, Some(namespace)); anything else
/// (an IP, a short name) → (host, None).
pub fn service_of_authority(authority: &str) -> (String, Option<String>) {
    let host = match authority.rsplit_once(':') {
        Some((h, port)) if port.chars().all(|c| c.is_ascii_digit()) && !h.ends_with(':') => h,
        _ => authority,
    };
    let mut parts = host.split('.');
    match (parts.next(), parts.next(), parts.next()) {
        (Some(name), Some(ns), Some("svc")) if !name.is_empty() && !ns.is_empty() => {
            (name.to_string(), Some(ns.to_string()))
        }
        _ => (host.to_string(), None),
    }
}

/// A route label `kind/namespace/name/rule` → (`kind/name`, Some(namespace));
/// anything else is kept whole.
pub fn route_of_label(route: &str) -> (String, Option<String>) {
    let parts: Vec<&str> = route.split('/').collect();
    match parts.as_slice() {
        [kind, ns, name, ..] if !ns.is_empty() && !name.is_empty() => {
            (format!("{kind}/{name}"), Some((*ns).to_string()))
        }
        _ => (route.to_string(), None),
    }
}

/// Whether a row called `row_name` is the one the user named: the whole name,
/// or for routes the part after `kind/`.
fn name_matches(row_name: &str, wanted: &str) -> bool {
    row_name == wanted || row_name.split_once('/').is_some_and(|(_, n)| n == wanted)
}

type Key = (Option<String>, String);

/// The rows of `kind` from two scrapes of each proxy, `seconds` apart.
///
/// `pods` are all the pods known (meshed or not, scraped or not), for the
/// MESHED column; `scrapes` are the ones read.
pub fn rows_from_scrapes(
    kind: ResourceKind,
    pods: &[PodRef],
    scrapes: &[PodScrape<'_>],
    seconds: f64,
) -> Vec<StatRow> {
    let mut counts: BTreeMap<Key, WindowCounts> = BTreeMap::new();
    let mut meshed: BTreeMap<Key, (u32, u32)> = BTreeMap::new();
    // Service rows: the share of the servers' inbound requests that were mTLS.
    let mut service_mtls: Option<BTreeMap<Key, f64>> = None;
    match kind {
        ResourceKind::Deployment | ResourceKind::Pod => {
            let key = |p: &PodRef| -> Key {
                let name = match kind {
                    ResourceKind::Pod => p.name.clone(),
                    _ => p.workload().to_string(),
                };
                (p.namespace.clone(), name)
            };
            for p in pods {
                let m = meshed.entry(key(p)).or_default();
                m.0 += u32::from(p.meshed);
                m.1 += 1;
            }
            for s in scrapes {
                let prev = DirectionSnapshot::from_samples(s.prev, Direction::Inbound);
                let cur = DirectionSnapshot::from_samples(s.cur, Direction::Inbound);
                counts
                    .entry(key(s.pod))
                    .or_default()
                    .add(&WindowCounts::between(&prev, &cur));
            }
        }
        ResourceKind::Service => {
            for p in pods {
                for svc in &p.services {
                    let m = meshed
                        .entry((p.namespace.clone(), svc.clone()))
                        .or_default();
                    m.0 += u32::from(p.meshed);
                    m.1 += 1;
                }
            }
            // What the clients sent, by authority, and the mTLS share the
            // servers' proxies saw for the same authority.
            let mut inbound: BTreeMap<Key, WindowCounts> = BTreeMap::new();
            for s in scrapes {
                for (direction, into) in [
                    (Direction::Outbound, &mut counts),
                    (Direction::Inbound, &mut inbound),
                ] {
                    for authority in authorities(s.cur, direction) {
                        let keep = |x: &Sample| x.label("authority") == Some(authority.as_str());
                        let prev = DirectionSnapshot::from_matching(s.prev, direction, keep);
                        let cur = DirectionSnapshot::from_matching(s.cur, direction, keep);
                        let (name, ns) = service_of_authority(&authority);
                        let mut w = WindowCounts::between(&prev, &cur);
                        // Open connections are not per authority.
                        w.tcp_open = None;
                        into.entry((ns, name)).or_default().add(&w);
                    }
                }
            }
            service_mtls = Some(
                inbound
                    .into_iter()
                    .filter(|(_, c)| c.requests > 0.0)
                    .map(|(k, c)| (k, (c.mtls_requests / c.requests).clamp(0.0, 1.0)))
                    .collect(),
            );
        }
        ResourceKind::Route => {
            let mut routes: BTreeMap<Key, RouteCounts> = BTreeMap::new();
            for s in scrapes {
                let prev = route_totals(s.prev);
                for (label, cur) in route_totals(s.cur) {
                    let before = prev.get(&label).copied().unwrap_or_default();
                    let (name, ns) = route_of_label(&label);
                    let r = routes.entry((ns, name)).or_default();
                    r.requests += crate::stats::counter_delta(before.requests, cur.requests);
                    r.responses += crate::stats::counter_delta(before.responses, cur.responses);
                    r.successes += crate::stats::counter_delta(before.successes, cur.successes);
                }
            }
            return routes
                .into_iter()
                .map(|((namespace, name), r)| StatRow {
                    name,
                    namespace,
                    rps: Some(if seconds > 0.0 {
                        r.requests / seconds
                    } else {
                        0.0
                    }),
                    success: (r.responses > 0.0)
                        .then(|| (r.successes / r.responses).clamp(0.0, 1.0)),
                    ..StatRow::default()
                })
                .collect();
        }
    }
    let mut keys: Vec<Key> = counts.keys().cloned().collect();
    keys.extend(meshed.keys().cloned());
    keys.sort();
    keys.dedup();
    keys.into_iter()
        .map(|key| {
            let c = counts.get(&key);
            let w = c.map(|c| WindowStats::from_counts(c, seconds));
            let (namespace, name) = key.clone();
            StatRow {
                name,
                namespace,
                meshed: meshed.get(&key).copied(),
                success: w.as_ref().and_then(|w| w.success_rate),
                rps: w.as_ref().map(|w| w.requests_per_sec),
                p50: w.as_ref().and_then(|w| w.p50),
                p95: w.as_ref().and_then(|w| w.p95),
                p99: w.as_ref().and_then(|w| w.p99),
                tcp_conn: w.as_ref().and_then(|w| w.tcp_open),
                mtls: match &service_mtls {
                    Some(m) => m.get(&key).copied(),
                    None => c.and_then(WindowCounts::mtls_share),
                },
            }
        })
        .collect()
}

/// The distinct `authority` labels of `weft_http_requests_total` in one direction.
fn authorities(samples: &[Sample], direction: Direction) -> Vec<String> {
    let mut out: Vec<String> = samples
        .iter()
        .filter(|s| {
            s.name == crate::stats::REQUESTS_TOTAL
                && s.label("direction") == Some(direction.as_str())
        })
        .filter_map(|s| s.label("authority").map(str::to_string))
        .collect();
    out.sort();
    out.dedup();
    out
}

pub const ROUTE_REQUESTS_TOTAL: &str = "weft_route_requests_total";
pub const ROUTE_RESPONSES_TOTAL: &str = "weft_route_responses_total";

#[derive(Clone, Copy, Debug, Default, PartialEq)]
struct RouteCounts {
    requests: f64,
    responses: f64,
    successes: f64,
}

/// Cumulative route counts by `route` label (backends summed).
fn route_totals(samples: &[Sample]) -> BTreeMap<String, RouteCounts> {
    let mut out: BTreeMap<String, RouteCounts> = BTreeMap::new();
    for s in samples {
        let Some(route) = s.label("route") else {
            continue;
        };
        match s.name.as_str() {
            ROUTE_REQUESTS_TOTAL => out.entry(route.to_string()).or_default().requests += s.value,
            ROUTE_RESPONSES_TOTAL => {
                let r = out.entry(route.to_string()).or_default();
                r.responses += s.value;
                if s.label("classification") == Some("success") {
                    r.successes += s.value;
                }
            }
            _ => {}
        }
    }
    out
}

/// Keeps the rows in `namespace` named `name`, when given.
pub fn filter_rows(
    rows: Vec<StatRow>,
    namespace: Option<&str>,
    name: Option<&str>,
) -> Vec<StatRow> {
    rows.into_iter()
        .filter(|r| namespace.is_none_or(|n| r.namespace.as_deref() == Some(n)))
        .filter(|r| name.is_none_or(|n| name_matches(&r.name, n)))
        .collect()
}

// ---------------------------------------------------------------- Prometheus

/// The PromQL for each column of one kind of row.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Queries {
    /// The labels each answer is grouped by: (namespace label, name label).
    pub namespace_label: &'static str,
    pub name_label: &'static str,
    pub rps: String,
    pub success: String,
    pub p50: String,
    pub p95: String,
    pub p99: String,
    pub tcp_conn: Option<String>,
    pub mtls: Option<String>,
}

/// The recording rules' window (charts/weft/rules/weft.rules.yaml).
pub const RULES_WINDOW: &str = "1m";

/// `label_replace`s that turn `authority` into `service` and `service_namespace`.
fn by_service(expr: &str) -> String {
    format!(
        r#"label_replace(label_replace({expr}, "service", "$1", "authority", "([^.:]+).*"), "service_namespace", "$1", "authority", "[^.:]+\\.([^.:]+)\\.svc.*")"#
    )
}

/// The PromQL of every column for `kind` over `window` (PromQL duration);
/// `rules`: the chart's recording rules are loaded and `window` is theirs.
pub fn queries(kind: ResourceKind, window: &str, rules: bool) -> Queries {
    let rate = |metric: &str, matchers: &str| format!("rate({metric}{{{matchers}}}[{window}])");
    let sum = |by: &str, e: String| format!("sum by ({by}) ({e})");
    if kind == ResourceKind::Route {
        let by = "route";
        return Queries {
            namespace_label: "",
            name_label: "route",
            rps: sum(by, rate(ROUTE_REQUESTS_TOTAL, "")),
            success: format!(
                "{} / {}",
                sum(
                    by,
                    rate(ROUTE_RESPONSES_TOTAL, r#"classification="success""#)
                ),
                sum(by, rate(ROUTE_RESPONSES_TOTAL, ""))
            ),
            // Route metrics carry no latency.
            p50: String::new(),
            p95: String::new(),
            p99: String::new(),
            tcp_conn: None,
            mtls: None,
        };
    }
    // (namespace label, name label, the traffic counted, how a raw series gets them).
    let (namespace_label, name_label, counted, group): (_, _, _, fn(String) -> String) = match kind
    {
        ResourceKind::Pod => ("namespace", "pod", "inbound", |e| e),
        ResourceKind::Service => ("service_namespace", "service", "outbound", |e| {
            by_service(&e)
        }),
        _ => ("namespace", "workload", "inbound", |e| e),
    };
    let by = format!("{namespace_label}, {name_label}");
    let grouped = |metric: &str, matchers: &str| sum(&by, group(rate(metric, matchers)));
    let dir = format!(r#"direction="{counted}""#);
    let quantile = |q: &str| {
        let buckets = group(rate("weft_http_response_duration_seconds_bucket", &dir));
        format!(
            "histogram_quantile({q}, {})",
            sum(&format!("{by}, le"), buckets)
        )
    };
    let (rps, success) = if rules && kind == ResourceKind::Deployment {
        let r = r#"weft:request_rate{direction="inbound"}"#;
        let s = r#"weft:success_rate{direction="inbound"}"#;
        (
            sum(&by, r.to_string()),
            format!(
                "{} / {}",
                sum(&by, format!("{s} * {r}")),
                sum(&by, r.to_string())
            ),
        )
    } else {
        (
            grouped("weft_http_requests_total", &dir),
            format!(
                "{} / {}",
                grouped(
                    "weft_http_responses_total",
                    &format!(r#"{dir},classification="success""#)
                ),
                grouped("weft_http_responses_total", &dir)
            ),
        )
    };
    // The mTLS share is always what the servers saw arrive.
    let inbound = r#"direction="inbound""#;
    Queries {
        namespace_label,
        name_label,
        rps,
        success,
        p50: quantile("0.5"),
        p95: quantile("0.95"),
        p99: quantile("0.99"),
        // Open connections are per proxy, not per authority.
        tcp_conn: (kind != ResourceKind::Service)
            .then(|| sum(&by, format!("weft_tcp_connections_open{{{dir}}}"))),
        mtls: Some(format!(
            "{} / {}",
            grouped(
                "weft_http_requests_total",
                &format!(r#"{inbound},client_id!="""#)
            ),
            grouped("weft_http_requests_total", inbound)
        )),
    }
}

/// One series of an instant-vector answer: its labels and value (`None`
/// when NaN or infinite: no traffic in the window).
pub type Series = (BTreeMap<String, String>, Option<f64>);

/// Reads a `/api/v1/query` answer: `status: error` and anything that is
/// not an instant vector are errors naming what was wrong.
pub fn parse_vector(body: &[u8]) -> Result<Vec<Series>, String> {
    let v: Value = serde_json::from_slice(body).map_err(|e| {
        let text = String::from_utf8_lossy(body);
        let excerpt: String = text.chars().take(80).collect();
        format!("the answer is not JSON ({e}): {excerpt:?}")
    })?;
    match v.get("status").and_then(Value::as_str) {
        Some("success") => {}
        Some("error") => {
            let kind = v
                .get("errorType")
                .and_then(Value::as_str)
                .unwrap_or("unknown");
            let msg = v
                .get("error")
                .and_then(Value::as_str)
                .unwrap_or("no message");
            return Err(format!("query failed ({kind}): {msg}"));
        }
        other => return Err(format!("the answer's status is {other:?}, not \"success\"")),
    }
    let data = v.get("data").ok_or("the answer has no data")?;
    if data.get("resultType").and_then(Value::as_str) != Some("vector") {
        return Err(format!(
            "expected an instant vector, got resultType {}",
            data.get("resultType").unwrap_or(&Value::Null)
        ));
    }
    let result = data
        .get("result")
        .and_then(Value::as_array)
        .ok_or("the answer's data has no result array")?;
    result
        .iter()
        .map(|series| {
            let labels = series
                .get("metric")
                .and_then(Value::as_object)
                .map(|m| {
                    m.iter()
                        .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
                        .collect()
                })
                .unwrap_or_default();
            let text = series
                .get("value")
                .and_then(|v| v.get(1))
                .and_then(Value::as_str)
                .ok_or_else(|| format!("a series without a [time, \"value\"] pair: {series}"))?;
            let value: f64 = text
                .parse()
                .map_err(|_| format!("{text:?} is not a number"))?;
            Ok((labels, value.is_finite().then_some(value)))
        })
        .collect()
}

/// The answers to one kind's [`Queries`], by column.
#[derive(Clone, Debug, Default)]
pub struct Answers {
    pub rps: Vec<Series>,
    pub success: Vec<Series>,
    pub p50: Vec<Series>,
    pub p95: Vec<Series>,
    pub p99: Vec<Series>,
    pub tcp_conn: Vec<Series>,
    pub mtls: Vec<Series>,
}

/// Rows from Prometheus' answers, one per (namespace, name) any answer named.
pub fn rows_from_prometheus(kind: ResourceKind, q: &Queries, a: &Answers) -> Vec<StatRow> {
    let mut rows: BTreeMap<Key, StatRow> = BTreeMap::new();
    let key = |labels: &BTreeMap<String, String>| -> Option<Key> {
        let name = labels.get(q.name_label)?.clone();
        if kind == ResourceKind::Route {
            let (name, ns) = route_of_label(&name);
            return Some((ns, name));
        }
        let ns = labels
            .get(q.namespace_label)
            .filter(|n| !n.is_empty())
            .cloned();
        Some((ns, name))
    };
    type Set = fn(&mut StatRow, Option<f64>);
    let columns: [(&Vec<Series>, Set); 7] = [
        (&a.rps, |r, v| r.rps = v),
        (&a.success, |r, v| r.success = v.map(|x| x.clamp(0.0, 1.0))),
        (&a.p50, |r, v| r.p50 = v),
        (&a.p95, |r, v| r.p95 = v),
        (&a.p99, |r, v| r.p99 = v),
        (&a.tcp_conn, |r, v| r.tcp_conn = v),
        (&a.mtls, |r, v| r.mtls = v.map(|x| x.clamp(0.0, 1.0))),
    ];
    for (series, set) in columns {
        for (labels, value) in series {
            let Some(k) = key(labels) else { continue };
            let row = rows.entry(k.clone()).or_insert_with(|| StatRow {
                name: k.1.clone(),
                namespace: k.0.clone(),
                ..StatRow::default()
            });
            set(row, *value);
        }
    }
    rows.into_values().collect()
}

/// Runs one query: `GET <url>/api/v1/query?query=…`.
async fn query(client: &AdminClient, base: &str, expr: &str) -> Result<Vec<Series>, StatError> {
    let url = format!("{base}/api/v1/query?query={}", url_encode(expr));
    let fail = |reason: String| StatError::Prometheus {
        url: base.to_string(),
        reason,
    };
    let (status, body) = client.get_url(&url).await.map_err(|e| {
        // The reason names the full query URL; keep the message to the server.
        fail(e.replace(&url, "/api/v1/query"))
    })?;
    // Prometheus answers 400/422/503 with a JSON error body: say what it says.
    if status != StatusCode::OK {
        let detail = parse_vector(&body)
            .err()
            .filter(|e| e.starts_with("query failed"))
            .unwrap_or_else(|| {
                let text: String = String::from_utf8_lossy(&body).chars().take(80).collect();
                format!("body {text:?}")
            });
        return Err(fail(format!("/api/v1/query answered {status}: {detail}")));
    }
    parse_vector(&body).map_err(|e| fail(format!("/api/v1/query: {e}")))
}

fn url_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 3);
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(b as char)
            }
            _ => {
                let _ = write!(out, "%{b:02X}");
            }
        }
    }
    out
}

async fn from_prometheus(
    client: &AdminClient,
    url: &str,
    kind: ResourceKind,
    window: WindowArg,
) -> Result<Vec<StatRow>, StatError> {
    let base = url.trim_end_matches('/');
    let host = base.strip_prefix("http://").unwrap_or_default();
    if host.is_empty() || host.starts_with('/') {
        return Err(StatError::Prometheus {
            url: url.to_string(),
            reason: "not an http:// URL (e.g. http://prometheus.monitoring:9090)".into(),
        });
    }
    let window = window.promql();
    let rules = window == RULES_WINDOW
        && !query(client, base, "count(weft:request_rate)")
            .await?
            .is_empty();
    let q = queries(kind, &window, rules);
    let run = |e: &str| {
        let e = e.to_string();
        async move {
            if e.is_empty() {
                Ok(Vec::new())
            } else {
                query(client, base, &e).await
            }
        }
    };
    let a = Answers {
        rps: run(&q.rps).await?,
        success: run(&q.success).await?,
        p50: run(&q.p50).await?,
        p95: run(&q.p95).await?,
        p99: run(&q.p99).await?,
        tcp_conn: run(q.tcp_conn.as_deref().unwrap_or_default()).await?,
        mtls: run(q.mtls.as_deref().unwrap_or_default()).await?,
    };
    Ok(rows_from_prometheus(kind, &q, &a))
}

// ---------------------------------------------------------------- proxies

async fn scrape_all(
    client: &AdminClient,
    targets: &[&PodRef],
) -> Result<Vec<Vec<Sample>>, StatError> {
    // All proxies at once, so every pod's window starts and ends together.
    let mut tasks = tokio::task::JoinSet::new();
    for (i, p) in targets.iter().enumerate() {
        let addr = p.admin.clone().unwrap_or_default();
        let client = client.clone();
        tasks.spawn(async move { (i, scrape_one(&client, addr).await) });
    }
    let mut out: Vec<Vec<Sample>> = vec![Vec::new(); targets.len()];
    while let Some(joined) = tasks.join_next().await {
        let (i, result) = joined.map_err(|e| StatError::Proxy {
            addr: "(scrape task)".into(),
            reason: e.to_string(),
        })?;
        out[i] = result?;
    }
    Ok(out)
}

async fn scrape_one(client: &AdminClient, addr: String) -> Result<Vec<Sample>, StatError> {
    let resolved = resolve(&addr)?;
    // One more try after a connection reset or the like: a single lost
    // scrape should not cost a whole window.
    let result = match client.metrics(resolved).await {
        Err(e) if e.contains("client error") => {
            tokio::time::sleep(Duration::from_millis(100)).await;
            client.metrics(resolved).await
        }
        other => other,
    };
    result.map_err(|reason| StatError::Proxy { addr, reason })
}

fn resolve(addr: &str) -> Result<SocketAddr, StatError> {
    let fail = |reason: String| StatError::Proxy {
        addr: addr.to_string(),
        reason,
    };
    addr.to_socket_addrs()
        .map_err(|e| fail(format!("cannot resolve the address: {e}")))?
        .next()
        .ok_or_else(|| fail("the name resolves to no address".into()))
}

async fn from_proxies(
    client: &AdminClient,
    kind: ResourceKind,
    pods: &[PodRef],
    window: Duration,
) -> Result<Vec<StatRow>, StatError> {
    let targets: Vec<&PodRef> = pods.iter().filter(|p| p.admin.is_some()).collect();
    let started = Instant::now();
    let first = scrape_all(client, &targets).await?;
    // `sleep` saturates where `started + window` would overflow.
    tokio::time::sleep(window.saturating_sub(started.elapsed())).await;
    let seconds = started.elapsed().as_secs_f64();
    let second = scrape_all(client, &targets).await?;
    let scrapes: Vec<PodScrape<'_>> = targets
        .iter()
        .zip(first.iter().zip(second.iter()))
        .map(|(pod, (prev, cur))| PodScrape { pod, prev, cur })
        .collect();
    Ok(rows_from_scrapes(kind, pods, &scrapes, seconds))
}

// ---------------------------------------------------------------- output

fn percent(v: Option<f64>) -> String {
    v.map_or("-".into(), |v| format!("{:.2}%", v * 100.0))
}

fn millis(v: Option<f64>) -> String {
    v.map_or("-".into(), |v| {
        let ms = v * 1000.0;
        if ms < 10.0 {
            format!("{ms:.1}ms")
        } else {
            format!("{ms:.0}ms")
        }
    })
}

/// The table a person reads; NAMESPACE only when some row has one.
pub fn render_table(rows: &[StatRow]) -> String {
    let with_ns = rows.iter().any(|r| r.namespace.is_some());
    let mut cells: Vec<Vec<String>> = Vec::new();
    let mut head = vec!["NAME"];
    if with_ns {
        head.push("NAMESPACE");
    }
    head.extend([
        "MESHED",
        "SUCCESS",
        "RPS",
        "LATENCY_P50",
        "LATENCY_P95",
        "LATENCY_P99",
        "TCP_CONN",
        "MTLS",
    ]);
    cells.push(head.iter().map(|s| s.to_string()).collect());
    for r in rows {
        let mut row = vec![r.name.clone()];
        if with_ns {
            row.push(r.namespace.clone().unwrap_or_else(|| "-".into()));
        }
        row.extend([
            r.meshed.map_or("-".into(), |(m, t)| format!("{m}/{t}")),
            percent(r.success),
            r.rps.map_or("-".into(), |v| format!("{v:.1}")),
            millis(r.p50),
            millis(r.p95),
            millis(r.p99),
            r.tcp_conn.map_or("-".into(), |v| format!("{v:.0}")),
            percent(r.mtls),
        ]);
        cells.push(row);
    }
    let widths: Vec<usize> = (0..cells[0].len())
        .map(|i| {
            cells
                .iter()
                .map(|r| r[i].chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for row in &cells {
        let line: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    if rows.is_empty() {
        out.push_str("(no resources)\n");
    }
    out
}

/// `-o json`: an array of objects, numbers or null.
pub fn render_json(rows: &[StatRow]) -> Value {
    let ms = |v: Option<f64>| v.map(|s| s * 1000.0);
    Value::Array(
        rows.iter()
            .map(|r| {
                json!({
                    "name": r.name,
                    "namespace": r.namespace,
                    "meshed_pods": r.meshed.map(|m| m.0),
                    "pods": r.meshed.map(|m| m.1),
                    "success": r.success,
                    "rps": r.rps,
                    "latency_p50_ms": ms(r.p50),
                    "latency_p95_ms": ms(r.p95),
                    "latency_p99_ms": ms(r.p99),
                    "tcp_conn": r.tcp_conn,
                    "mtls": r.mtls,
                })
            })
            .collect(),
    )
}

// ---------------------------------------------------------------- run

/// Runs `weft stat`; exit 0 with the table or JSON on stdout, 2 with one
/// line on stderr on any error.
pub fn run(args: &StatArgs) -> ExitCode {
    match run_inner(args) {
        Ok(text) => {
            print!("{text}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("weft stat: {e}");
            ExitCode::from(2)
        }
    }
}

fn run_inner(args: &StatArgs) -> Result<String, StatError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(StatError::Runtime)?;
    let client = AdminClient::new(Duration::from_secs(args.timeout));
    let rows = runtime.block_on(async {
        if let Some(url) = &args.prometheus {
            let window = args.window.unwrap_or(WindowArg(Duration::from_secs(60)));
            return from_prometheus(&client, url, args.kind, window).await;
        }
        let window = args.window.unwrap_or(WindowArg(Duration::from_secs(30))).0;
        let pods = if !args.from_proxies.is_empty() {
            args.from_proxies.iter().map(PodRef::from_arg).collect()
        } else if let Some(source) = &args.source {
            let pods = match source {
                SourceConfig::Dir(dir) => manifest_pods(dir, args.namespace.as_deref())?,
                SourceConfig::Kube => {
                    cluster_pods(Duration::from_secs(args.timeout), args.namespace.as_deref())
                        .await?
                }
            };
            if !pods.iter().any(|p| p.admin.is_some()) {
                return Err(StatError::NoPods {
                    source_text: source.to_string(),
                    namespace: args.namespace.clone(),
                });
            }
            pods
        } else {
            return Err(StatError::NoInput);
        };
        from_proxies(&client, args.kind, &pods, window).await
    })?;
    let rows = filter_rows(rows, args.namespace.as_deref(), args.name.as_deref());
    Ok(match args.output {
        Output::Table => render_table(&rows),
        Output::Json => format!("{:#}\n", render_json(&rows)),
    })
}

/// Pods and Services from the cluster (KUBECONFIG, else in-cluster), listed
/// once through the controller's kube source into its index.
async fn cluster_pods(
    timeout: Duration,
    namespace: Option<&str>,
) -> Result<Vec<PodRef>, StatError> {
    use crate::policy::ExplainError;
    let listed =
        crate::policy::list_kinds(timeout, &[Kind::Pod, Kind::Service], "pods and services")
            .await
            .map_err(|e| match e {
                ExplainError::KubeConfig(m) => StatError::KubeConfig(m),
                ExplainError::Unreachable { url, message } => {
                    StatError::KubeUnreachable { url, message }
                }
                ExplainError::SyncTimeout {
                    url, secs, errors, ..
                } => StatError::KubeSyncTimeout { url, secs, errors },
                other => StatError::Manifests(other),
            })?;
    let state = listed.index.read();
    Ok(pods_from_index(&state, namespace))
}

fn manifest_pods(dir: &Path, namespace: Option<&str>) -> Result<Vec<PodRef>, StatError> {
    let index = crate::policy::load_manifests(dir)?;
    let state = index.read();
    Ok(pods_from_index(&state, namespace))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::promtext::parse;

    fn close(a: Option<f64>, b: f64) -> bool {
        a.is_some_and(|a| (a - b).abs() < 1e-9)
    }

    #[test]
    fn arguments_parse_and_bad_ones_say_what_is_expected() {
        for (s, k) in [
            ("deploy", ResourceKind::Deployment),
            ("deployment", ResourceKind::Deployment),
            ("svc", ResourceKind::Service),
            ("service", ResourceKind::Service),
            ("route", ResourceKind::Route),
            ("pod", ResourceKind::Pod),
        ] {
            assert_eq!(s.parse(), Ok(k));
        }
        let e = "job".parse::<ResourceKind>().expect_err("not a kind");
        assert!(
            e.contains("deploy|deployment, svc|service, route or pod"),
            "{e}"
        );

        assert_eq!("30s".parse(), Ok(WindowArg(Duration::from_secs(30))));
        assert_eq!("2".parse(), Ok(WindowArg(Duration::from_secs(2))));
        assert_eq!("500ms".parse(), Ok(WindowArg(Duration::from_millis(500))));
        assert_eq!("[1m]".parse(), Ok(WindowArg(Duration::from_secs(60))));
        assert_eq!(
            "1m".parse::<WindowArg>().map(WindowArg::promql),
            Ok("1m".into())
        );
        assert_eq!(
            "90s".parse::<WindowArg>().map(WindowArg::promql),
            Ok("90s".into())
        );
        for bad in ["", "s", "1d", "-1s", "0s", "1.5s", "[]", "[1m"] {
            assert!(bad.parse::<WindowArg>().is_err(), "{bad}");
        }

        assert_eq!(
            "demo/web=127.0.0.1:4191".parse(),
            Ok(ProxyArg {
                namespace: Some("demo".into()),
                pod: Some("web".into()),
                addr: "127.0.0.1:4191".into()
            })
        );
        assert_eq!(
            "web=localhost:4191"
                .parse::<ProxyArg>()
                .map(|p| (p.namespace, p.pod)),
            Ok((None, Some("web".into())))
        );
        assert_eq!(
            "[::1]:4191".parse::<ProxyArg>().map(|p| p.addr),
            Ok("[::1]:4191".into())
        );
        for bad in ["localhost", "=1.2.3.4:5", "/web=1.2.3.4:5", "ns/=1.2.3.4:5"] {
            assert!(bad.parse::<ProxyArg>().is_err(), "{bad}");
        }
    }

    #[test]
    fn names_from_pods_authorities_and_routes() {
        let labels = |h: &str| BTreeMap::from([("pod-template-hash".to_string(), h.to_string())]);
        assert_eq!(
            deployment_of("web-7d9f8b6c5d-x2x9q", &labels("7d9f8b6c5d")),
            Some("web".into())
        );
        assert_eq!(
            deployment_of("my-app-v2-5f7b-abcde", &labels("5f7b")),
            Some("my-app-v2".into())
        );
        assert_eq!(
            deployment_of("web-7d9f8b6c5d-x2x9q", &BTreeMap::new()),
            None
        );
        assert_eq!(deployment_of("web-0", &labels("7d9f8b6c5d")), None);
        assert_eq!(deployment_of("7d9f8b6c5d-x", &labels("7d9f8b6c5d")), None);

        let svc = |n: &str, ns: Option<&str>| (n.to_string(), ns.map(str::to_string));
        assert_eq!(
            service_of_authority("books.demo.svc.cluster.local:8080"),
            svc("books", Some("demo"))
        );
        assert_eq!(
            service_of_authority("books.demo.svc"),
            svc("books", Some("demo"))
        );
        assert_eq!(service_of_authority("books:8080"), svc("books", None));
        assert_eq!(service_of_authority("10.0.0.1:80"), svc("10.0.0.1", None));
        assert_eq!(service_of_authority("[::1]:80"), svc("[::1]", None));
        assert_eq!(service_of_authority(""), svc("", None));

        assert_eq!(
            route_of_label("httproute/demo/books/0"),
            ("httproute/books".to_string(), Some("demo".to_string()))
        );
        assert_eq!(route_of_label("odd"), ("odd".to_string(), None));
        assert!(name_matches("httproute/books", "books"));
        assert!(name_matches("httproute/books", "httproute/books"));
        assert!(!name_matches("httproute/books", "book"));
    }

    /// A proxy's exposition: `inbound` requests (of which `failed` failed,
    /// `mtls` with a client identity) all in the (1 ms, 10 ms] bucket, and
    /// `outbound` requests to books.
    fn proxy(inbound: u32, failed: u32, mtls: u32, outbound: u32, route: u32) -> Vec<Sample> {
        let ok = inbound - failed;
        let plain = inbound - mtls;
        let a = r#"authority="books.demo.svc.cluster.local:8080""#;
        parse(&format!(
            "weft_http_requests_total{{direction=\"inbound\",{a},client_id=\"spiffe://cluster.local/ns/demo/sa/web\"}} {mtls}\n\
             weft_http_requests_total{{direction=\"inbound\",{a},client_id=\"\"}} {plain}\n\
             weft_http_responses_total{{direction=\"inbound\",{a},client_id=\"\",classification=\"success\"}} {ok}\n\
             weft_http_responses_total{{direction=\"inbound\",{a},client_id=\"\",classification=\"failure\"}} {failed}\n\
             weft_http_response_duration_seconds_bucket{{direction=\"inbound\",{a},le=\"0.001\"}} 0\n\
             weft_http_response_duration_seconds_bucket{{direction=\"inbound\",{a},le=\"0.01\"}} {inbound}\n\
             weft_http_response_duration_seconds_bucket{{direction=\"inbound\",{a},le=\"+Inf\"}} {inbound}\n\
             weft_http_requests_total{{direction=\"outbound\",{a},client_id=\"\"}} {outbound}\n\
             weft_http_responses_total{{direction=\"outbound\",{a},client_id=\"\",classification=\"success\"}} {outbound}\n\
             weft_tcp_connections_open{{direction=\"inbound\"}} 2\n\
             weft_tcp_connections_open{{direction=\"outbound\"}} 1\n\
             weft_tls_connections_total{{direction=\"inbound\",tls=\"true\",peer_id=\"x\"}} 3\n\
             weft_route_requests_total{{route=\"httproute/demo/books/0\",backend=\"books.demo.svc.cluster.local:8080\"}} {route}\n\
             weft_route_responses_total{{route=\"httproute/demo/books/0\",classification=\"success\"}} {route}\n"
        ))
        .expect("parses")
    }

    fn pod(name: &str, deployment: Option<&str>, meshed: bool) -> PodRef {
        PodRef {
            namespace: Some("demo".into()),
            name: name.into(),
            deployment: deployment.map(str::to_string),
            services: vec!["books".into()],
            meshed,
            admin: meshed.then(|| format!("{name}:4191")),
        }
    }

    #[test]
    fn deployment_rows_sum_their_pods_and_count_meshed_ones() {
        let pods = [
            pod("books-1", Some("books"), true),
            pod("books-2", Some("books"), true),
            pod("books-3", Some("books"), false),
            pod("web-1", Some("web"), true),
        ];
        let (p0, c0) = (proxy(100, 0, 100, 0, 0), proxy(200, 10, 200, 0, 0));
        // The second pod restarted: its counters start again from zero.
        let (p1, c1) = (proxy(500, 0, 0, 0, 0), proxy(100, 0, 0, 0, 0));
        let (p2, c2) = (proxy(0, 0, 0, 0, 0), proxy(0, 0, 0, 0, 0));
        let scrapes = [
            PodScrape {
                pod: &pods[0],
                prev: &p0,
                cur: &c0,
            },
            PodScrape {
                pod: &pods[1],
                prev: &p1,
                cur: &c1,
            },
            PodScrape {
                pod: &pods[3],
                prev: &p2,
                cur: &c2,
            },
        ];
        let rows = rows_from_scrapes(ResourceKind::Deployment, &pods, &scrapes, 10.0);
        assert_eq!(rows.len(), 2, "{rows:?}");
        let books = &rows[0];
        assert_eq!((books.name.as_str(), books.meshed), ("books", Some((2, 3))));
        // 100 + 100 requests in 10 s, 10 failed.
        assert!(close(books.rps, 20.0));
        assert!(close(books.success, 0.95));
        // Half from a client with an identity.
        assert!(close(books.mtls, 0.5));
        assert!(close(books.tcp_conn, 4.0));
        let p50 = books.p50.expect("p50");
        assert!(p50 > 0.001 && p50 < 0.01, "{p50}");
        assert!(books.p95.is_some() && books.p99.is_some());
        // web served nothing: a rate of 0, everything else unknown.
        let web = &rows[1];
        assert_eq!((web.name.as_str(), web.rps), ("web", Some(0.0)));
        assert_eq!((web.success, web.p50, web.mtls), (None, None, None));
        // mTLS from connections when no requests: 0 new connections here.

        let rows = rows_from_scrapes(ResourceKind::Pod, &pods, &scrapes, 10.0);
        let names: Vec<_> = rows.iter().map(|r| (r.name.as_str(), r.meshed)).collect();
        assert_eq!(
            names,
            [
                ("books-1", Some((1, 1))),
                ("books-2", Some((1, 1))),
                ("books-3", Some((0, 1))),
                ("web-1", Some((1, 1)))
            ]
        );
        // An unmeshed pod has no numbers at all.
        assert_eq!(rows[2].rps, None);
    }

    #[test]
    fn proxies_given_by_address_are_their_own_workload() {
        let a = PodRef::from_arg(&"127.0.0.1:4191".parse().expect("arg"));
        let b = PodRef::from_arg(&"demo/books=127.0.0.1:4192".parse().expect("arg"));
        let (p, c) = (proxy(0, 0, 0, 0, 0), proxy(30, 3, 0, 0, 0));
        let scrapes = [
            PodScrape {
                pod: &a,
                prev: &p,
                cur: &c,
            },
            PodScrape {
                pod: &b,
                prev: &p,
                cur: &c,
            },
        ];
        let rows = rows_from_scrapes(
            ResourceKind::Deployment,
            &[a.clone(), b.clone()],
            &scrapes,
            3.0,
        );
        let names: Vec<_> = rows
            .iter()
            .map(|r| (r.namespace.as_deref(), r.name.as_str(), r.rps))
            .collect();
        assert_eq!(
            names,
            [
                (None, "127.0.0.1:4191", Some(10.0)),
                (Some("demo"), "books", Some(10.0))
            ]
        );
        assert!(close(rows[1].success, 0.9));
        assert!(close(rows[1].mtls, 0.0));
    }

    #[test]
    fn service_rows_are_what_clients_sent_with_the_servers_mtls_share() {
        let pods = [
            pod("web-1", Some("web"), true),
            pod("books-1", Some("books"), true),
        ];
        let (web_prev, web_cur) = (proxy(0, 0, 0, 100, 0), proxy(0, 0, 0, 160, 0));
        let (books_prev, books_cur) = (proxy(100, 0, 50, 0, 0), proxy(160, 0, 110, 0, 0));
        let scrapes = [
            PodScrape {
                pod: &pods[0],
                prev: &web_prev,
                cur: &web_cur,
            },
            PodScrape {
                pod: &pods[1],
                prev: &books_prev,
                cur: &books_cur,
            },
        ];
        let rows = rows_from_scrapes(ResourceKind::Service, &pods, &scrapes, 2.0);
        assert_eq!(rows.len(), 1, "{rows:?}");
        let r = &rows[0];
        assert_eq!(
            (r.name.as_str(), r.namespace.as_deref()),
            ("books", Some("demo"))
        );
        assert_eq!(r.meshed, Some((2, 2)));
        assert!(close(r.rps, 30.0));
        assert!(close(r.success, 1.0));
        assert!(close(r.mtls, 1.0));
        // Open connections are per proxy, not per authority.
        assert_eq!(r.tcp_conn, None);
        // The outbound series carry no histogram here.
        assert_eq!(r.p99, None);

        // No server-side view: the share is unknown, not 0.
        let rows = rows_from_scrapes(ResourceKind::Service, &pods, &scrapes[..1], 2.0);
        assert_eq!(rows[0].mtls, None);
    }

    #[test]
    fn route_rows_come_from_the_route_metrics() {
        let pods = [pod("web-1", Some("web"), true)];
        let (p, c) = (proxy(0, 0, 0, 0, 10), proxy(0, 0, 0, 0, 50));
        let scrapes = [PodScrape {
            pod: &pods[0],
            prev: &p,
            cur: &c,
        }];
        let rows = rows_from_scrapes(ResourceKind::Route, &pods, &scrapes, 4.0);
        assert_eq!(rows.len(), 1);
        let r = &rows[0];
        assert_eq!(
            (r.name.as_str(), r.namespace.as_deref()),
            ("httproute/books", Some("demo"))
        );
        assert!(close(r.rps, 10.0));
        assert!(close(r.success, 1.0));
        assert_eq!(
            (r.p50, r.tcp_conn, r.mtls, r.meshed),
            (None, None, None, None)
        );
        let kept = filter_rows(rows.clone(), Some("demo"), Some("books"));
        assert_eq!(kept.len(), 1);
        assert!(filter_rows(rows.clone(), Some("other"), None).is_empty());
        assert!(filter_rows(rows, None, Some("authors")).is_empty());
    }

    #[test]
    fn prometheus_answers_are_read_and_bad_ones_explained() {
        let ok = br#"{"status":"success","data":{"resultType":"vector","result":[
            {"metric":{"namespace":"demo","workload":"books"},"value":[1.5,"12.5"]},
            {"metric":{"namespace":"demo","workload":"idle"},"value":[1.5,"NaN"]}]}}"#;
        let v = parse_vector(ok).expect("parses");
        assert_eq!(v.len(), 2);
        assert_eq!(v[0].0.get("workload").map(String::as_str), Some("books"));
        assert_eq!(v[0].1, Some(12.5));
        assert_eq!(v[1].1, None);

        let cases: [(&[u8], &str); 6] = [
            (b"<html>", "the answer is not JSON"),
            (
                br#"{"status":"error","errorType":"bad_data","error":"parse error at char 3"}"#,
                "query failed (bad_data): parse error at char 3",
            ),
            (br#"{"status":"pending"}"#, "status is Some(\"pending\")"),
            (br#"{"status":"success"}"#, "no data"),
            (
                br#"{"status":"success","data":{"resultType":"matrix","result":[]}}"#,
                "expected an instant vector",
            ),
            (
                br#"{"status":"success","data":{"resultType":"vector","result":[{"metric":{},"value":[1,"x"]}]}}"#,
                "\"x\" is not a number",
            ),
        ];
        for (body, want) in cases {
            let e = parse_vector(body).expect_err("bad answer");
            assert!(e.contains(want), "{e} should contain {want}");
        }
    }

    #[test]
    fn queries_group_by_the_scrape_configs_labels_and_use_the_rules() {
        let raw = queries(ResourceKind::Deployment, "2m", false);
        assert_eq!(
            raw.rps,
            r#"sum by (namespace, workload) (rate(weft_http_requests_total{direction="inbound"}[2m]))"#
        );
        assert!(raw
            .p99
            .starts_with("histogram_quantile(0.99, sum by (namespace, workload, le)"));
        assert!(raw
            .mtls
            .as_deref()
            .is_some_and(|m| m.contains(r#"client_id!="""#)));
        let rules = queries(ResourceKind::Deployment, "1m", true);
        assert_eq!(
            rules.rps,
            r#"sum by (namespace, workload) (weft:request_rate{direction="inbound"})"#
        );
        assert!(rules.success.contains("weft:success_rate"));
        let pod = queries(ResourceKind::Pod, "1m", true);
        assert!(pod.rps.contains("by (namespace, pod)") && !pod.rps.contains("weft:"));
        let svc = queries(ResourceKind::Service, "1m", false);
        assert!(svc.rps.contains(r#"direction="outbound""#) && svc.rps.contains("label_replace"));
        assert_eq!(svc.tcp_conn, None);
        assert!(svc.p99.starts_with(
            "histogram_quantile(0.99, sum by (service_namespace, service, le) (label_replace("
        ));
        assert!(svc
            .mtls
            .as_deref()
            .is_some_and(|m| m.contains(r#"direction="inbound""#)));
        let route = queries(ResourceKind::Route, "1m", false);
        assert!(route.p50.is_empty() && route.rps.contains("weft_route_requests_total"));
    }

    #[test]
    fn rows_from_prometheus_join_the_columns() {
        let q = queries(ResourceKind::Deployment, "1m", false);
        let s = |w: &str, v: Option<f64>| -> Series {
            (
                BTreeMap::from([
                    ("namespace".to_string(), "demo".to_string()),
                    ("workload".to_string(), w.to_string()),
                ]),
                v,
            )
        };
        let a = Answers {
            rps: vec![s("books", Some(50.0)), s("web", Some(0.0))],
            success: vec![s("books", Some(0.99))],
            p99: vec![s("books", Some(0.01))],
            mtls: vec![s("books", Some(1.0)), s("web", None)],
            ..Answers::default()
        };
        let rows = rows_from_prometheus(ResourceKind::Deployment, &q, &a);
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].name, "books");
        assert_eq!(
            (rows[0].rps, rows[0].success, rows[0].p99),
            (Some(50.0), Some(0.99), Some(0.01))
        );
        assert_eq!(
            (rows[1].rps, rows[1].success, rows[1].mtls),
            (Some(0.0), None, None)
        );
        let json = render_json(&rows);
        assert_eq!(json[1]["success"], Value::Null);
        assert_eq!(json[0]["latency_p99_ms"], json!(10.0));
        let table = render_table(&rows);
        assert!(
            table.starts_with("NAME   NAMESPACE  MESHED  SUCCESS"),
            "{table}"
        );
        assert!(
            table.contains("books  demo       -       99.00%   50.0"),
            "{table}"
        );
    }

    #[test]
    fn pods_come_from_the_manifest_index() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(
            dir.path().join("world.yaml"),
            r#"
apiVersion: v1
kind: Pod
metadata: {name: books-5f7b9c-abcde, namespace: demo, labels: {app: books, pod-template-hash: 5f7b9c}}
spec:
  containers:
  - name: books
  - name: weft-proxy
    ports: [{name: weft-inbound, containerPort: 4143}, {name: weft-admin, containerPort: 14191}]
status: {phase: Running, podIP: 127.0.0.1}
---
apiVersion: v1
kind: Pod
metadata: {name: books-5f7b9c-fghij, namespace: demo, labels: {app: books, pod-template-hash: 5f7b9c}}
spec: {containers: [{name: books}]}
status: {phase: Running, podIP: 127.0.0.2}
---
apiVersion: v1
kind: Pod
metadata: {name: web-0, namespace: demo, labels: {app: web}}
spec: {containers: [{name: web}, {name: weft-proxy}]}
status: {phase: Running, podIP: 10.0.0.3}
---
apiVersion: v1
kind: Pod
metadata: {name: other, namespace: elsewhere, labels: {app: books}}
spec: {containers: [{name: weft-proxy}]}
status: {phase: Running, podIP: 10.0.0.4}
---
apiVersion: v1
kind: Service
metadata: {name: books, namespace: demo}
spec: {selector: {app: books}, ports: [{port: 8080}]}
"#,
        )
        .expect("write");
        let pods = manifest_pods(dir.path(), Some("demo")).expect("loads");
        let got: Vec<_> = pods
            .iter()
            .map(|p| {
                (
                    p.name.as_str(),
                    p.deployment.as_deref(),
                    p.services.clone(),
                    p.admin.as_deref(),
                )
            })
            .collect();
        let books = vec!["books".to_string()];
        let default_admin = format!("10.0.0.3:{}", InjectConfig::default().admin_port);
        assert_eq!(
            got,
            [
                (
                    "books-5f7b9c-abcde",
                    Some("books"),
                    books.clone(),
                    Some("127.0.0.1:14191")
                ),
                ("books-5f7b9c-fghij", Some("books"), books, None),
                ("web-0", None, vec![], Some(default_admin.as_str())),
            ]
        );
        let err = manifest_pods(&dir.path().join("missing"), None).expect_err("no dir");
        assert!(err.to_string().contains("missing"), "{err}");
    }

    proptest::proptest! {
        /// Whatever a server answers, or a user types, is an answer or an error: no panic.
        #[test]
        fn parsers_never_panic(body in proptest::collection::vec(proptest::num::u8::ANY, 0..256), text in ".{0,40}") {
            let _ = parse_vector(&body);
            let _ = parse_vector(text.as_bytes());
            let _ = text.parse::<WindowArg>().map(WindowArg::promql);
            let _ = text.parse::<ProxyArg>();
            let _ = text.parse::<ResourceKind>();
            let _ = service_of_authority(&text);
            let _ = route_of_label(&text);
            let _ = deployment_of(&text, &BTreeMap::from([("pod-template-hash".to_string(), text.clone())]));
        }

        /// Any counter values, resets and windows give rows without a panic, and shares stay in 0..=1.
        #[test]
        fn rows_never_panic(prev in proptest::collection::vec(0u32..1000, 5), cur in proptest::collection::vec(0u32..1000, 5), secs in 0.0f64..100.0) {
            let pods = [pod("a", Some("d"), true)];
            let p = proxy(prev[0].max(prev[1]), prev[1], prev[2].min(prev[0].max(prev[1])), prev[3], prev[4]);
            let c = proxy(cur[0].max(cur[1]), cur[1], cur[2].min(cur[0].max(cur[1])), cur[3], cur[4]);
            for kind in [ResourceKind::Deployment, ResourceKind::Service, ResourceKind::Route, ResourceKind::Pod] {
                let rows = rows_from_scrapes(kind, &pods, &[PodScrape { pod: &pods[0], prev: &p, cur: &c }], secs);
                for r in &rows {
                    proptest::prop_assert!(r.success.is_none_or(|s| (0.0..=1.0).contains(&s)));
                    proptest::prop_assert!(r.mtls.is_none_or(|s| (0.0..=1.0).contains(&s)));
                }
                let _ = render_table(&rows);
                let _ = render_json(&rows);
            }
        }
    }
}

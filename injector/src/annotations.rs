//! The annotation and label names users and the injector write. One place, so the webhook,
//! `weft inject`, the chart and the README agree.

/// `enabled` or `disabled`, on a namespace (annotation or label) or a pod (annotation or label).
pub const INJECT: &str = "weft.dev/inject";
/// Written on every injected pod: the proxy version that was injected. Its presence (or a
/// `weft-proxy` container) means "already injected".
pub const PROXY_VERSION: &str = "weft.dev/proxy-version";

/// Comma-separated ports and ranges whose incoming TCP bypasses the proxy.
pub const SKIP_INBOUND_PORTS: &str = "config.weft.dev/skip-inbound-ports";
/// Comma-separated ports and ranges whose outgoing TCP bypasses the proxy.
pub const SKIP_OUTBOUND_PORTS: &str = "config.weft.dev/skip-outbound-ports";
/// Comma-separated source CIDRs whose incoming TCP bypasses the proxy.
pub const SKIP_INBOUND_CIDRS: &str = "config.weft.dev/skip-inbound-cidrs";
/// Comma-separated destination CIDRs whose outgoing TCP bypasses the proxy.
pub const SKIP_OUTBOUND_CIDRS: &str = "config.weft.dev/skip-outbound-cidrs";
/// Ports whose traffic the proxy relays as opaque TCP without protocol detection.
pub const OPAQUE_PORTS: &str = "config.weft.dev/opaque-ports";
/// `enabled`: the CNI plugin installs the redirect, so no `weft-init` container is added.
pub const CNI: &str = "config.weft.dev/cni";
/// Written by the injector in CNI mode: the complete redirect configuration (JSON) the
/// `weft-cni` plugin installs; its presence tells the plugin the pod expects it.
pub const REDIRECT: &str = weft_redirect::ANNOTATION;
/// `enabled` / `disabled`: override the injector's native-sidecar setting for this pod.
pub const NATIVE_SIDECAR: &str = "config.weft.dev/native-sidecar";
/// `json` or `apache`: the proxy writes an access log in that format (`WEFT_PROXY_ACCESS_LOG`).
pub const ACCESS_LOG: &str = "config.weft.dev/access-log";
/// `host:port` of an OTLP/gRPC collector the proxy exports spans to
/// (`WEFT_PROXY_TRACE_COLLECTOR_ADDR`); overrides the injector's `--trace-collector`.
pub const TRACE_COLLECTOR: &str = "config.weft.dev/trace-collector";
/// Head sampling rate between 0 and 1 for requests that arrive without a trace
/// (`WEFT_PROXY_TRACE_SAMPLING`); overrides the injector's `--trace-sampling`.
pub const TRACE_SAMPLING: &str = "config.weft.dev/trace-sampling";
/// The proxy's tracing filter (`WEFT_PROXY_LOG`).
/// The inbound policy of ports no Server selects, on the pod or its namespace (the
/// controller's own annotation, `weft_model::authz`); also the proxy's fallback until the
/// controller answers (`WEFT_PROXY_INBOUND_DEFAULT_POLICY`).
pub const DEFAULT_INBOUND_POLICY: &str = weft_model::authz::DEFAULT_INBOUND_POLICY_ANNOTATION;
pub const PROXY_LOG: &str = "config.weft.dev/proxy-log-level";
pub const PROXY_CPU_REQUEST: &str = "config.weft.dev/proxy-cpu-request";
pub const PROXY_CPU_LIMIT: &str = "config.weft.dev/proxy-cpu-limit";
pub const PROXY_MEMORY_REQUEST: &str = "config.weft.dev/proxy-memory-request";
pub const PROXY_MEMORY_LIMIT: &str = "config.weft.dev/proxy-memory-limit";

/// Prometheus' conventional scrape annotations; added only when the pod has none of its own.
pub const PROMETHEUS_SCRAPE: &str = "prometheus.io/scrape";
pub const PROMETHEUS_PORT: &str = "prometheus.io/port";
pub const PROMETHEUS_PATH: &str = "prometheus.io/path";

pub const ENABLED: &str = "enabled";
pub const DISABLED: &str = "disabled";

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
/// `enabled` / `disabled`: override the injector's native-sidecar setting for this pod.
pub const NATIVE_SIDECAR: &str = "config.weft.dev/native-sidecar";
/// The proxy's tracing filter (`WEFT_PROXY_LOG`).
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

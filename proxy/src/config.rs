//! Typed proxy configuration, parsed once from `WEFT_PROXY_*` environment variables.
//!
//! Every variable name lives in [`env`]. Parsing happens before any port is bound; a bad value
//! produces a [`ConfigError`] naming the variable and the value, and the binary exits non-zero.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::Duration;

/// Environment variable names: the contract between the injector and the proxy.
pub mod env {
    pub const OUTBOUND_ADDR: &str = "WEFT_PROXY_OUTBOUND_ADDR";
    pub const INBOUND_ADDR: &str = "WEFT_PROXY_INBOUND_ADDR";
    pub const ADMIN_ADDR: &str = "WEFT_PROXY_ADMIN_ADDR";
    pub const OUTBOUND_FIXED_TARGET: &str = "WEFT_PROXY_OUTBOUND_FIXED_TARGET";
    pub const INBOUND_FIXED_TARGET: &str = "WEFT_PROXY_INBOUND_FIXED_TARGET";
    pub const OPAQUE_PORTS: &str = "WEFT_PROXY_OPAQUE_PORTS";
    pub const DETECT_TIMEOUT: &str = "WEFT_PROXY_DETECT_TIMEOUT";
    pub const CONNECT_TIMEOUT: &str = "WEFT_PROXY_CONNECT_TIMEOUT";
    pub const HEADER_READ_TIMEOUT: &str = "WEFT_PROXY_HEADER_READ_TIMEOUT";
    pub const MAX_HEADER_BYTES: &str = "WEFT_PROXY_MAX_HEADER_BYTES";
    pub const POOL_IDLE_TIMEOUT: &str = "WEFT_PROXY_POOL_IDLE_TIMEOUT";
    pub const SHUTDOWN_GRACE_PERIOD: &str = "WEFT_PROXY_SHUTDOWN_GRACE_PERIOD";
    pub const WORKER_THREADS: &str = "WEFT_PROXY_WORKER_THREADS";
    pub const LOG: &str = "WEFT_PROXY_LOG";
    pub const LOG_FORMAT: &str = "WEFT_PROXY_LOG_FORMAT";
    pub const ACCESS_LOG: &str = "WEFT_PROXY_ACCESS_LOG";
    pub const DESTINATION_ADDR: &str = "WEFT_PROXY_DESTINATION_ADDR";
    pub const NAMESPACE: &str = "WEFT_PROXY_NAMESPACE";
    pub const POD_NAME: &str = "WEFT_PROXY_POD_NAME";
    pub const SERVICE_ACCOUNT: &str = "WEFT_PROXY_SERVICE_ACCOUNT";
    pub const DISCOVERY_TIMEOUT: &str = "WEFT_PROXY_DISCOVERY_TIMEOUT";
    pub const DISCOVERY_IDLE_TIMEOUT: &str = "WEFT_PROXY_DISCOVERY_IDLE_TIMEOUT";
    pub const DISCOVERY_BACKOFF_MAX: &str = "WEFT_PROXY_DISCOVERY_BACKOFF_MAX";
    pub const BALANCER_DECAY: &str = "WEFT_PROXY_BALANCER_DECAY";
    pub const IDENTITY_ADDR: &str = "WEFT_PROXY_IDENTITY_ADDR";
    pub const IDENTITY: &str = "WEFT_PROXY_IDENTITY";
    pub const TRUST_DOMAIN: &str = "WEFT_PROXY_TRUST_DOMAIN";
    pub const IDENTITY_TOKEN_FILE: &str = "WEFT_PROXY_IDENTITY_TOKEN_FILE";
    pub const TRUST_ANCHORS: &str = "WEFT_PROXY_TRUST_ANCHORS";
    pub const TRACE_COLLECTOR_ADDR: &str = "WEFT_PROXY_TRACE_COLLECTOR_ADDR";
    pub const TRACE_SAMPLING: &str = "WEFT_PROXY_TRACE_SAMPLING";
    pub const TRACE_QUEUE: &str = "WEFT_PROXY_TRACE_QUEUE";
    pub const TAP_AUTHORIZED_IDENTITY: &str = "WEFT_PROXY_TAP_AUTHORIZED_IDENTITY";
    pub const INBOUND_DEFAULT_POLICY: &str = "WEFT_PROXY_INBOUND_DEFAULT_POLICY";
    pub const CONTROLLER_NAMESPACE: &str = "WEFT_PROXY_CONTROLLER_NAMESPACE";
}

/// Every variable the proxy reads, its default as the variable would be written (empty: unset
/// by default, or derived), and what it does: `weft-proxy --help` prints this table, and tests
/// hold it to [`env`], to [`Config::default`] and to the README's configuration reference.
pub const VARS: &[(&str, &str, &str)] = &[
    (
        env::OUTBOUND_ADDR,
        "127.0.0.1:4140",
        "outbound listener (IP:PORT)",
    ),
    (env::INBOUND_ADDR, "0.0.0.0:4143", "inbound listener"),
    (
        env::ADMIN_ADDR,
        "0.0.0.0:4191",
        "admin listener: /metrics /ready /live /tap",
    ),
    (
        env::OUTBOUND_FIXED_TARGET,
        "",
        "send every outbound connection here instead of its original destination",
    ),
    (
        env::INBOUND_FIXED_TARGET,
        "",
        "send every inbound connection here instead of its original destination",
    ),
    (
        env::OPAQUE_PORTS,
        "",
        "destination ports relayed as TCP without protocol detection (25,3306,5000-5010)",
    ),
    (
        env::DETECT_TIMEOUT,
        "10s",
        "wait for a client's first bytes before treating the connection as opaque",
    ),
    (env::CONNECT_TIMEOUT, "1s", "upstream TCP connect timeout"),
    (
        env::HEADER_READ_TIMEOUT,
        "10s",
        "a request head must arrive within this (408 header-timeout)",
    ),
    (
        env::MAX_HEADER_BYTES,
        "65536",
        "largest request head accepted (431 header-too-large)",
    ),
    (
        env::POOL_IDLE_TIMEOUT,
        "60s",
        "idle upstream connections are closed after this",
    ),
    (
        env::SHUTDOWN_GRACE_PERIOD,
        "30s",
        "time in-flight work gets after SIGTERM or /shutdown",
    ),
    (
        env::WORKER_THREADS,
        "1",
        "1: current-thread runtime; more: that many workers",
    ),
    (
        env::LOG,
        DEFAULT_LOG_FILTER,
        "tracing filter (PUT /log-level changes it at run time)",
    ),
    (
        env::LOG_FORMAT,
        "plain",
        "plain or json (colour only on a terminal)",
    ),
    (
        env::ACCESS_LOG,
        "",
        "json or apache: one line per request on stdout",
    ),
    (
        env::DESTINATION_ADDR,
        "",
        "HOST:PORT of the controller's Destination gRPC, over mTLS with the workload certificate (needs WEFT_PROXY_IDENTITY_ADDR); http://HOST:PORT: plaintext, development only (unset: no discovery)",
    ),
    (env::NAMESPACE, "", "the workload's namespace"),
    (env::POD_NAME, "", "the workload's pod"),
    (env::SERVICE_ACCOUNT, "", "the workload's ServiceAccount"),
    (
        env::DISCOVERY_TIMEOUT,
        "1s",
        "a new target's first request waits this long for discovery",
    ),
    (
        env::DISCOVERY_IDLE_TIMEOUT,
        "60s",
        "unused resolutions are dropped after this",
    ),
    (
        env::DISCOVERY_BACKOFF_MAX,
        "5s",
        "ceiling of the reconnect backoff to the controller",
    ),
    (
        env::BALANCER_DECAY,
        "10s",
        "peak-EWMA decay time of the latency estimate",
    ),
    (
        env::IDENTITY_ADDR,
        "",
        "HOST:PORT of the controller's Identity gRPC, over TLS verified against the trust anchors; http://HOST:PORT: plaintext, development only (unset: no mTLS)",
    ),
    (
        env::IDENTITY,
        "",
        "the workload's SPIFFE ID (derived from trust domain, namespace, ServiceAccount)",
    ),
    (
        env::TRUST_DOMAIN,
        "cluster.local",
        "trust domain of the derived SPIFFE ID",
    ),
    (
        env::IDENTITY_TOKEN_FILE,
        "",
        "ServiceAccount token shown to the identity service",
    ),
    (
        env::TRUST_ANCHORS,
        "",
        "PEM bundle of trust anchors (re-read when it changes)",
    ),
    (
        env::TRACE_COLLECTOR_ADDR,
        "",
        "HOST:PORT of an OTLP/gRPC collector (unset: no tracing)",
    ),
    (
        env::TRACE_SAMPLING,
        "0",
        "probability that a request without a trace context starts one",
    ),
    (
        env::TRACE_QUEUE,
        "2048",
        "spans waiting for export before new ones are dropped",
    ),
    (
        env::TAP_AUTHORIZED_IDENTITY,
        "",
        "the identity allowed to tap over mTLS (default: the controller's)",
    ),
    (
        env::INBOUND_DEFAULT_POLICY,
        "all-unauthenticated",
        "inbound authorization without (or before) the controller's ServerPolicy: all-unauthenticated, all-authenticated, cluster-unauthenticated, cluster-authenticated, deny, audit",
    ),
    (
        env::CONTROLLER_NAMESPACE,
        "weft",
        "the controller's namespace: the identity and destination services must present identity.<ns>.serviceaccount.identity.<trust-domain> and destination.<ns>.…",
    ),
];

/// `weft-proxy --help`.
pub fn help() -> String {
    let mut out = format!(
        "weft-proxy {}: the Weft sidecar proxy.\n\n\
         Configured by environment variables only (the injector writes them); an invalid one\n\
         stops the proxy with exit status 2 before it listens.\n\n\
         Usage: weft-proxy [--help | --version]\n\n",
        env!("CARGO_PKG_VERSION")
    );
    let width = VARS.iter().map(|(v, _, _)| v.len()).max().unwrap_or(0);
    for (var, default, what) in VARS {
        let default = if default.is_empty() {
            String::new()
        } else {
            format!(" [default: {default}]")
        };
        out.push_str(&format!("  {var:width$}  {what}{default}\n"));
    }
    out
}

/// Errors in the proxy's environment. Each names the variable, the value and what was expected.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("{var}={value:?} is not a socket address (expected IP:PORT, e.g. 127.0.0.1:4140)")]
    Addr { var: &'static str, value: String },
    #[error("{var}={value:?} is not a duration (expected a number with a unit: 500ms, 10s, 2m)")]
    Duration { var: &'static str, value: String },
    #[error("{var}={value:?}: {reason}")]
    Ports {
        var: &'static str,
        value: String,
        reason: String,
    },
    #[error("{var}={value:?}: {reason}")]
    Number {
        var: &'static str,
        value: String,
        reason: String,
    },
    #[error("{var}={value:?} is not one of: plain, json")]
    LogFormat { var: &'static str, value: String },
    #[error("{var}={value:?} is not one of: json, apache (unset: no access log)")]
    AccessLog { var: &'static str, value: String },
    #[error("{var}={value:?} is not a gRPC address (expected HOST:PORT, e.g. weft-controller.weft.svc:8086)")]
    HostPort { var: &'static str, value: String },
    #[error("{var}={value:?}: {reason}")]
    Invalid {
        var: &'static str,
        value: String,
        reason: &'static str,
    },
    #[error("{var} is not valid UTF-8")]
    NotUnicode { var: &'static str },
    #[error("{var} must be set when {because} is set ({why})")]
    Missing {
        var: &'static str,
        because: &'static str,
        why: &'static str,
    },
}

/// How log lines are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    Plain,
    Json,
}

/// Settings for one listener direction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ListenerConfig {
    pub addr: SocketAddr,
    /// When set, every accepted connection goes here instead of its SO_ORIGINAL_DST.
    /// For local mode (`weft demo`), benchmarks and loopback tests, where no iptables redirect exists.
    pub fixed_target: Option<SocketAddr>,
}

/// The whole proxy configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    pub outbound: ListenerConfig,
    pub inbound: ListenerConfig,
    pub admin_addr: SocketAddr,
    /// Destination ports that skip protocol detection (server-speaks-first protocols).
    pub opaque_ports: PortSet,
    pub detect_timeout: Duration,
    pub connect_timeout: Duration,
    pub header_read_timeout: Duration,
    pub max_header_bytes: usize,
    pub pool_idle_timeout: Duration,
    pub shutdown_grace_period: Duration,
    pub worker_threads: usize,
    pub log_filter: String,
    pub log_format: LogFormat,
    /// One line per proxied request on stdout, in this format; `None`: no access log.
    pub access_log: Option<crate::observe::access::Format>,
    /// Service discovery through the controller; `None` when `WEFT_PROXY_DESTINATION_ADDR` is
    /// unset (every connection goes to its original destination).
    pub discovery: Option<DiscoveryConfig>,
    /// The workload this proxy serves (sent to the controller as the caller).
    pub workload: Workload,
    /// Workload certificates from the controller's identity service; `None` when
    /// `WEFT_PROXY_IDENTITY_ADDR` is unset (no identity, no mTLS).
    pub identity: Option<IdentityConfig>,
    /// Distributed tracing over OTLP/gRPC; `None` when `WEFT_PROXY_TRACE_COLLECTOR_ADDR` is
    /// unset (no trace headers are read or written).
    pub tracing: Option<TraceConfig>,
    /// The inbound policy of ports the controller has not (yet) given one, and of every
    /// port without a controller.
    pub inbound_default_policy: crate::authz::DefaultPolicy,
}

/// Where spans go and which requests make them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TraceConfig {
    /// `host:port` of an OTLP/gRPC collector.
    pub collector: String,
    /// Head sampling: the share of requests without a trace context that start one.
    pub sampling: Sampling,
    /// Finished spans waiting for export before new ones are dropped.
    pub queue: usize,
}

impl TraceConfig {
    pub fn new(collector: impl Into<String>) -> Self {
        Self {
            collector: collector.into(),
            sampling: Sampling::default(),
            queue: 2048,
        }
    }
}

/// A probability in millionths (integral, so the config stays `Eq`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Sampling(u32);

impl Sampling {
    /// `0`, `0.01`, `1`...: a number from 0 to 1.
    pub fn parse(s: &str) -> Option<Self> {
        let f: f64 = s.parse().ok()?;
        (0.0..=1.0)
            .contains(&f)
            .then(|| Self((f * 1e6).round() as u32))
    }
    pub fn millionths(self) -> u32 {
        self.0
    }
}

/// How the proxy obtains its workload certificate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IdentityConfig {
    /// `host:port` of the controller's identity gRPC service.
    pub addr: String,
    /// The address was given as `http://host:port`: no TLS (development only).
    pub plaintext: bool,
    /// The controller's namespace (`WEFT_PROXY_CONTROLLER_NAMESPACE`): the TLS names the
    /// proxy expects from its identity and destination services.
    pub controller_namespace: String,
    /// `spiffe://<trust-domain>/ns/<ns>/sa/<sa>`: what the certificate must name.
    pub id: String,
    /// Token presented to the identity service, re-read on every attempt (kubelet rotates it).
    pub token_file: std::path::PathBuf,
    /// PEM bundle of trust anchors the issued chain must verify against.
    pub trust_anchors: std::path::PathBuf,
    /// The only identity allowed to tap this proxy from off the pod (mTLS on the admin port);
    /// default: the controller's, `spiffe://<trust-domain>/ns/weft/sa/weft-controller`.
    pub tap_authorized_identity: String,
}

/// The pod a proxy serves, from the injector's environment.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Workload {
    pub namespace: String,
    pub pod_name: String,
    pub service_account: String,
}

/// How the proxy talks to the controller's `Destination` service and balances what it learns.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiscoveryConfig {
    /// `host:port` of the controller's destination gRPC service.
    pub addr: String,
    /// The address was given as `http://host:port`: no TLS, no client certificate
    /// (development only). Otherwise mutual TLS with the workload certificate.
    pub plaintext: bool,
    /// How long a request to a target not resolved yet waits for the controller's first
    /// answer before it goes to its original destination.
    pub timeout: Duration,
    /// How long a resolution (and its balancer) nobody uses is kept before it is dropped.
    pub idle_timeout: Duration,
    /// Upper bound of the reconnect backoff (it starts at 100 ms, doubles, with jitter).
    pub backoff_max: Duration,
    /// Decay time of the balancer's peak-EWMA latency estimate.
    pub balancer_decay: Duration,
}

impl DiscoveryConfig {
    pub fn new(addr: impl Into<String>) -> Self {
        Self {
            addr: addr.into(),
            plaintext: false,
            timeout: Duration::from_secs(1),
            idle_timeout: Duration::from_secs(60),
            backoff_max: Duration::from_secs(5),
            balancer_decay: Duration::from_secs(10),
        }
    }
}

pub const DEFAULT_LOG_FILTER: &str = "warn,weft=info";

impl Default for Config {
    fn default() -> Self {
        Self {
            outbound: ListenerConfig {
                addr: SocketAddr::from(([127, 0, 0, 1], 4140)),
                fixed_target: None,
            },
            inbound: ListenerConfig {
                addr: SocketAddr::from(([0, 0, 0, 0], 4143)),
                fixed_target: None,
            },
            admin_addr: SocketAddr::from(([0, 0, 0, 0], 4191)),
            opaque_ports: PortSet::default(),
            detect_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(1),
            header_read_timeout: Duration::from_secs(10),
            max_header_bytes: 64 * 1024,
            pool_idle_timeout: Duration::from_secs(60),
            shutdown_grace_period: Duration::from_secs(30),
            worker_threads: 1,
            log_filter: DEFAULT_LOG_FILTER.to_string(),
            log_format: LogFormat::Plain,
            access_log: None,
            discovery: None,
            workload: Workload::default(),
            identity: None,
            tracing: None,
            inbound_default_policy: crate::authz::DefaultPolicy::AllUnauthenticated,
        }
    }
}

impl Config {
    /// Reads the process environment.
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_lookup(|name| match std::env::var(name) {
            Ok(v) => Ok(Some(v)),
            Err(std::env::VarError::NotPresent) => Ok(None),
            Err(std::env::VarError::NotUnicode(_)) => Err(name),
        })
    }

    /// Parses configuration from any lookup function (tests pass a map).
    pub fn from_lookup(
        lookup: impl Fn(&'static str) -> Result<Option<String>, &'static str>,
    ) -> Result<Self, ConfigError> {
        let get = |var: &'static str| -> Result<Option<String>, ConfigError> {
            lookup(var)
                .map(|v| v.map(|s| s.trim().to_string()).filter(|s| !s.is_empty()))
                .map_err(|var| ConfigError::NotUnicode { var })
        };
        let mut c = Config::default();
        if let Some(v) = get(env::OUTBOUND_ADDR)? {
            c.outbound.addr = parse_addr(env::OUTBOUND_ADDR, &v)?;
        }
        if let Some(v) = get(env::INBOUND_ADDR)? {
            c.inbound.addr = parse_addr(env::INBOUND_ADDR, &v)?;
        }
        if let Some(v) = get(env::ADMIN_ADDR)? {
            c.admin_addr = parse_addr(env::ADMIN_ADDR, &v)?;
        }
        if let Some(v) = get(env::OUTBOUND_FIXED_TARGET)? {
            c.outbound.fixed_target = Some(parse_addr(env::OUTBOUND_FIXED_TARGET, &v)?);
        }
        if let Some(v) = get(env::INBOUND_FIXED_TARGET)? {
            c.inbound.fixed_target = Some(parse_addr(env::INBOUND_FIXED_TARGET, &v)?);
        }
        if let Some(v) = get(env::OPAQUE_PORTS)? {
            c.opaque_ports = PortSet::parse(&v).map_err(|reason| ConfigError::Ports {
                var: env::OPAQUE_PORTS,
                value: v.clone(),
                reason,
            })?;
        }
        let durations: [(&'static str, &mut Duration); 5] = [
            (env::DETECT_TIMEOUT, &mut c.detect_timeout),
            (env::CONNECT_TIMEOUT, &mut c.connect_timeout),
            (env::HEADER_READ_TIMEOUT, &mut c.header_read_timeout),
            (env::POOL_IDLE_TIMEOUT, &mut c.pool_idle_timeout),
            (env::SHUTDOWN_GRACE_PERIOD, &mut c.shutdown_grace_period),
        ];
        for (var, slot) in durations {
            if let Some(v) = get(var)? {
                *slot = parse_duration(&v).ok_or(ConfigError::Duration { var, value: v })?;
            }
        }
        if let Some(v) = get(env::MAX_HEADER_BYTES)? {
            c.max_header_bytes = parse_number(env::MAX_HEADER_BYTES, &v, 1024, 1 << 20)?;
        }
        if let Some(v) = get(env::WORKER_THREADS)? {
            c.worker_threads = parse_number(env::WORKER_THREADS, &v, 1, 512)?;
        }
        if let Some(v) = get(env::LOG)? {
            c.log_filter = v;
        }
        if let Some(v) = get(env::LOG_FORMAT)? {
            c.log_format = match v.as_str() {
                "plain" => LogFormat::Plain,
                "json" => LogFormat::Json,
                _ => {
                    return Err(ConfigError::LogFormat {
                        var: env::LOG_FORMAT,
                        value: v,
                    })
                }
            };
        }
        if let Some(v) = get(env::ACCESS_LOG)? {
            c.access_log = Some(crate::observe::access::Format::parse(&v).ok_or(
                ConfigError::AccessLog {
                    var: env::ACCESS_LOG,
                    value: v,
                },
            )?);
        }
        if let Some(v) = get(env::NAMESPACE)? {
            c.workload.namespace = v;
        }
        if let Some(v) = get(env::POD_NAME)? {
            c.workload.pod_name = v;
        }
        if let Some(v) = get(env::SERVICE_ACCOUNT)? {
            c.workload.service_account = v;
        }
        let mut d = DiscoveryConfig::new("");
        let durations: [(&'static str, &mut Duration); 4] = [
            (env::DISCOVERY_TIMEOUT, &mut d.timeout),
            (env::DISCOVERY_IDLE_TIMEOUT, &mut d.idle_timeout),
            (env::DISCOVERY_BACKOFF_MAX, &mut d.backoff_max),
            (env::BALANCER_DECAY, &mut d.balancer_decay),
        ];
        for (var, slot) in durations {
            if let Some(v) = get(var)? {
                *slot = parse_duration(&v).ok_or(ConfigError::Duration { var, value: v })?;
            }
        }
        for (var, value, min) in [
            (
                env::DISCOVERY_BACKOFF_MAX,
                d.backoff_max,
                Duration::from_millis(100),
            ),
            (
                env::BALANCER_DECAY,
                d.balancer_decay,
                Duration::from_millis(1),
            ),
            (
                env::DISCOVERY_IDLE_TIMEOUT,
                d.idle_timeout,
                Duration::from_secs(1),
            ),
        ] {
            if value < min {
                return Err(ConfigError::Invalid {
                    var,
                    value: format!("{value:?}"),
                    reason: "too small (backoff max >= 100ms, decay >= 1ms, idle timeout >= 1s)",
                });
            }
        }
        if let Some(v) = get(env::DESTINATION_ADDR)? {
            let (addr, plaintext) = controller_addr(&v);
            if !is_host_port(addr) {
                return Err(ConfigError::HostPort {
                    var: env::DESTINATION_ADDR,
                    value: v,
                });
            }
            d.addr = addr.to_string();
            d.plaintext = plaintext;
            c.discovery = Some(d);
        }
        if let Some(v) = get(env::INBOUND_DEFAULT_POLICY)? {
            c.inbound_default_policy = crate::authz::DefaultPolicy::parse(&v).ok_or(
                ConfigError::Invalid {
                    var: env::INBOUND_DEFAULT_POLICY,
                    value: v,
                    reason: "not one of: all-unauthenticated, all-authenticated, cluster-unauthenticated, cluster-authenticated, deny, audit",
                },
            )?;
        }
        c.identity = parse_identity(&get, &c.workload)?;
        if let Some(d) = &c.discovery {
            if !d.plaintext && c.identity.is_none() {
                return Err(ConfigError::Missing {
                    var: env::IDENTITY_ADDR,
                    because: env::DESTINATION_ADDR,
                    why: "the destination service requires mTLS with the workload certificate; for development without identity, give the address as http://HOST:PORT (plaintext)",
                });
            }
        }
        c.tracing = parse_tracing(&get)?;
        Ok(c)
    }
}

/// The tracing settings; sampling and queue size are read (and checked) only with a collector.
fn parse_tracing(
    get: &impl Fn(&'static str) -> Result<Option<String>, ConfigError>,
) -> Result<Option<TraceConfig>, ConfigError> {
    let Some(addr) = get(env::TRACE_COLLECTOR_ADDR)? else {
        return Ok(None);
    };
    if !is_host_port(&addr) {
        return Err(ConfigError::HostPort {
            var: env::TRACE_COLLECTOR_ADDR,
            value: addr,
        });
    }
    let mut t = TraceConfig::new(addr);
    if let Some(v) = get(env::TRACE_SAMPLING)? {
        t.sampling = Sampling::parse(&v).ok_or(ConfigError::Invalid {
            var: env::TRACE_SAMPLING,
            value: v,
            reason: "expected a probability from 0 to 1, e.g. 0.01",
        })?;
    }
    if let Some(v) = get(env::TRACE_QUEUE)? {
        t.queue = parse_number(env::TRACE_QUEUE, &v, 16, 1 << 20)?;
    }
    Ok(Some(t))
}

/// The identity settings: all or nothing once `WEFT_PROXY_IDENTITY_ADDR` is set. Only the
/// environment is checked here; the files are read by `identity::TrustAnchors::load` before
/// any port is bound.
fn parse_identity(
    get: &impl Fn(&'static str) -> Result<Option<String>, ConfigError>,
    workload: &Workload,
) -> Result<Option<IdentityConfig>, ConfigError> {
    let Some(value) = get(env::IDENTITY_ADDR)? else {
        return Ok(None);
    };
    let (addr, plaintext) = controller_addr(&value);
    if !is_host_port(addr) || addr.ends_with(":0") {
        return Err(ConfigError::HostPort {
            var: env::IDENTITY_ADDR,
            value,
        });
    }
    let addr = addr.to_string();
    let controller_namespace =
        get(env::CONTROLLER_NAMESPACE)?.unwrap_or_else(|| "weft".to_string());
    if !is_dns_name(&controller_namespace) || controller_namespace.contains('.') {
        return Err(ConfigError::Invalid {
            var: env::CONTROLLER_NAMESPACE,
            value: controller_namespace,
            reason: "not a Kubernetes namespace (lowercase letters, digits, '-')",
        });
    }
    let id = match get(env::IDENTITY)? {
        Some(id) => {
            if !is_spiffe_id(&id) {
                return Err(ConfigError::Invalid {
                    var: env::IDENTITY,
                    value: id,
                    reason: "expected spiffe://<trust-domain>/ns/<namespace>/sa/<serviceaccount>",
                });
            }
            id
        }
        None => {
            let td = get(env::TRUST_DOMAIN)?.unwrap_or_else(|| "cluster.local".to_string());
            if !is_dns_name(&td) {
                return Err(ConfigError::Invalid {
                    var: env::TRUST_DOMAIN,
                    value: td,
                    reason: "expected a DNS name such as cluster.local",
                });
            }
            let why = "the identity is derived from namespace and service account unless WEFT_PROXY_IDENTITY is set";
            for (var, value) in [
                (env::NAMESPACE, &workload.namespace),
                (env::SERVICE_ACCOUNT, &workload.service_account),
            ] {
                if value.is_empty() {
                    return Err(ConfigError::Missing {
                        var,
                        because: env::IDENTITY_ADDR,
                        why,
                    });
                }
                if !is_dns_name(value) {
                    return Err(ConfigError::Invalid {
                        var,
                        value: value.clone(),
                        reason: "not a Kubernetes name (lowercase letters, digits, '-', '.')",
                    });
                }
            }
            format!(
                "spiffe://{td}/ns/{}/sa/{}",
                workload.namespace, workload.service_account
            )
        }
    };
    let file = |var| -> Result<std::path::PathBuf, ConfigError> {
        get(var)?.map(Into::into).ok_or(ConfigError::Missing {
            var,
            because: env::IDENTITY_ADDR,
            why: "the identity service needs a token and the proxy needs trust anchors",
        })
    };
    let tap_authorized_identity = match get(env::TAP_AUTHORIZED_IDENTITY)? {
        Some(v) if is_spiffe_id(&v) => v,
        Some(v) => {
            return Err(ConfigError::Invalid {
                var: env::TAP_AUTHORIZED_IDENTITY,
                value: v,
                reason: "expected spiffe://<trust-domain>/ns/<namespace>/sa/<serviceaccount>",
            })
        }
        None => controller_identity(&id),
    };
    Ok(Some(IdentityConfig {
        addr,
        plaintext,
        controller_namespace,
        id,
        token_file: file(env::IDENTITY_TOKEN_FILE)?,
        trust_anchors: file(env::TRUST_ANCHORS)?,
        tap_authorized_identity,
    }))
}

/// The controller's identity in the trust domain of `id` (a valid SPIFFE ID).
fn controller_identity(id: &str) -> String {
    let td = id
        .strip_prefix("spiffe://")
        .and_then(|r| r.split('/').next())
        .unwrap_or("cluster.local");
    format!("spiffe://{td}/ns/weft/sa/weft-controller")
}

/// A controller address and whether it asks for plaintext: `http://host:port` is the
/// explicit development opt-out of TLS; `host:port` (and `https://host:port`) is TLS.
fn controller_addr(v: &str) -> (&str, bool) {
    if let Some(rest) = v.strip_prefix("http://") {
        (rest.trim_end_matches('/'), true)
    } else {
        (
            v.strip_prefix("https://")
                .unwrap_or(v)
                .trim_end_matches('/'),
            false,
        )
    }
}

/// Lowercase DNS name: labels of `[a-z0-9-]`, not starting or ending with `-`.
fn is_dns_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        })
}

/// `spiffe://<td>/ns/<ns>/sa/<sa>` with DNS-name parts (the controller checks it strictly).
fn is_spiffe_id(s: &str) -> bool {
    let Some(rest) = s.strip_prefix("spiffe://") else {
        return false;
    };
    match rest.split('/').collect::<Vec<_>>().as_slice() {
        [td, "ns", ns, "sa", sa] => is_dns_name(td) && is_dns_name(ns) && is_dns_name(sa),
        _ => false,
    }
}

/// `host:port` or `[v6]:port` with a non-zero port and a host made of DNS/IP characters.
fn is_host_port(s: &str) -> bool {
    if s.parse::<SocketAddr>().is_ok() {
        return true;
    }
    let Some((host, port)) = s.rsplit_once(':') else {
        return false;
    };
    let port_ok = matches!(port.parse::<u16>(), Ok(p) if p != 0);
    let host_ok = !host.is_empty()
        && host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-');
    port_ok && host_ok
}

fn parse_addr(var: &'static str, value: &str) -> Result<SocketAddr, ConfigError> {
    value.parse().map_err(|_| ConfigError::Addr {
        var,
        value: value.to_string(),
    })
}

fn parse_number(
    var: &'static str,
    value: &str,
    min: usize,
    max: usize,
) -> Result<usize, ConfigError> {
    let n: usize = value.parse().map_err(|_| ConfigError::Number {
        var,
        value: value.to_string(),
        reason: "not a whole number".into(),
    })?;
    if n < min || n > max {
        return Err(ConfigError::Number {
            var,
            value: value.to_string(),
            reason: format!("must be between {min} and {max}"),
        });
    }
    Ok(n)
}

/// Parses `250ms`, `10s`, `2m`, `1h`. A bare number is rejected: units are not guessed.
pub fn parse_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit() && c != '.')?;
    let (num, unit) = s.split_at(split);
    let n: f64 = num.parse().ok()?;
    if !n.is_finite() || n < 0.0 {
        return None;
    }
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => return None,
    };
    Duration::try_from_secs_f64(secs).ok()
}

/// A set of TCP ports given as `25,3306,8000-8100`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PortSet {
    ranges: BTreeSet<(u16, u16)>,
}

impl PortSet {
    pub fn parse(s: &str) -> Result<Self, String> {
        let mut ranges = BTreeSet::new();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (lo, hi) = match part.split_once('-') {
                Some((a, b)) => (parse_port(a)?, parse_port(b)?),
                None => {
                    let p = parse_port(part)?;
                    (p, p)
                }
            };
            if lo > hi {
                return Err(format!("range {part:?} runs backwards"));
            }
            ranges.insert((lo, hi));
        }
        Ok(Self { ranges })
    }

    pub fn contains(&self, port: u16) -> bool {
        self.ranges.iter().any(|&(lo, hi)| lo <= port && port <= hi)
    }

    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }
}

fn parse_port(s: &str) -> Result<u16, String> {
    match s.trim().parse::<u16>() {
        Ok(0) | Err(_) => Err(format!("{s:?} is not a port (1-65535)")),
        Ok(p) => Ok(p),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn parse(vars: &[(&'static str, &str)]) -> Result<Config, ConfigError> {
        let map: HashMap<&str, String> = vars.iter().map(|(k, v)| (*k, v.to_string())).collect();
        Config::from_lookup(|k| Ok(map.get(k).cloned()))
    }

    /// `VARS` lists every variable of [`env`] once, and each default it prints is the default:
    /// setting the variable to it changes nothing (discovery and tracing need their address).
    #[test]
    fn the_help_table_is_complete_and_its_defaults_are_the_defaults() {
        let source = include_str!("config.rs");
        let module = source
            .split("pub mod env {")
            .nth(1)
            .and_then(|s| s.split('}').next())
            .unwrap();
        let declared: Vec<&str> = module.lines().filter_map(|l| l.split('"').nth(1)).collect();
        let listed: Vec<&str> = VARS.iter().map(|(v, _, _)| *v).collect();
        assert_eq!(listed, declared, "VARS must list env's variables in order");
        let base = parse(&[]).unwrap();
        for (var, default, _) in VARS {
            if default.is_empty() {
                continue;
            }
            let mut with = vec![(*var, *default)];
            // These only matter with discovery or tracing on: compare like with like.
            if var.starts_with("WEFT_PROXY_DISCOVERY") || *var == env::BALANCER_DECAY {
                with.push((env::DESTINATION_ADDR, "http://ctl:8086"));
                let want = parse(&[(env::DESTINATION_ADDR, "http://ctl:8086")]).unwrap();
                assert_eq!(parse(&with).unwrap(), want, "{var}={default}");
            } else if var.starts_with("WEFT_PROXY_TRACE") {
                with.push((env::TRACE_COLLECTOR_ADDR, "otel:4317"));
                let want = parse(&[(env::TRACE_COLLECTOR_ADDR, "otel:4317")]).unwrap();
                assert_eq!(parse(&with).unwrap(), want, "{var}={default}");
            } else {
                assert_eq!(parse(&with).unwrap(), base, "{var}={default}");
            }
        }
        let help = help();
        for var in declared {
            assert!(help.contains(var), "{var} missing from --help");
        }
    }

    /// The README's configuration reference documents every variable.
    #[test]
    fn the_readme_documents_every_variable() {
        let readme = include_str!("../../README.md");
        for (var, _, _) in VARS {
            assert!(
                readme.contains(&format!("`{var}`")),
                "README.md does not document {var}"
            );
        }
    }

    #[test]
    fn defaults_match_design() {
        let c = parse(&[]).unwrap();
        assert_eq!(c.outbound.addr.to_string(), "127.0.0.1:4140");
        assert_eq!(c.inbound.addr.to_string(), "0.0.0.0:4143");
        assert_eq!(c.admin_addr.to_string(), "0.0.0.0:4191");
        assert_eq!(c.detect_timeout, Duration::from_secs(10));
        assert_eq!(c.worker_threads, 1);
        assert_eq!(c.log_filter, "warn,weft=info");
    }

    #[test]
    fn bad_values_name_variable_and_value() {
        let cases: &[(&'static str, &str, &str)] = &[
            (
                env::OUTBOUND_ADDR,
                "localhost",
                "WEFT_PROXY_OUTBOUND_ADDR=\"localhost\"",
            ),
            (
                env::DETECT_TIMEOUT,
                "10",
                "WEFT_PROXY_DETECT_TIMEOUT=\"10\"",
            ),
            (
                env::OPAQUE_PORTS,
                "25,x",
                "WEFT_PROXY_OPAQUE_PORTS=\"25,x\"",
            ),
            (env::OPAQUE_PORTS, "90-80", "runs backwards"),
            (env::WORKER_THREADS, "0", "between 1 and 512"),
            (env::LOG_FORMAT, "xml", "WEFT_PROXY_LOG_FORMAT=\"xml\""),
            (
                env::ACCESS_LOG,
                "yes",
                "WEFT_PROXY_ACCESS_LOG=\"yes\" is not one of: json, apache",
            ),
            (env::MAX_HEADER_BYTES, "-1", "WEFT_PROXY_MAX_HEADER_BYTES"),
            (
                env::DESTINATION_ADDR,
                "controller",
                "WEFT_PROXY_DESTINATION_ADDR=\"controller\"",
            ),
            (
                env::DESTINATION_ADDR,
                "ctl:0",
                "WEFT_PROXY_DESTINATION_ADDR",
            ),
            (
                env::DESTINATION_ADDR,
                "a b:80",
                "WEFT_PROXY_DESTINATION_ADDR",
            ),
            (
                env::DISCOVERY_TIMEOUT,
                "1",
                "WEFT_PROXY_DISCOVERY_TIMEOUT=\"1\"",
            ),
            (
                env::DISCOVERY_BACKOFF_MAX,
                "1ms",
                "WEFT_PROXY_DISCOVERY_BACKOFF_MAX",
            ),
        ];
        for (var, value, expect) in cases {
            let err = parse(&[(var, value)]).unwrap_err().to_string();
            assert!(err.contains(expect), "{var}={value}: {err}");
        }
    }

    #[test]
    fn parses_overrides() {
        let c = parse(&[
            (env::OUTBOUND_FIXED_TARGET, "127.0.0.1:8080"),
            (env::OPAQUE_PORTS, "25, 3306,8000-8100"),
            (env::DETECT_TIMEOUT, "250ms"),
            (env::LOG_FORMAT, "json"),
            (env::ACCESS_LOG, "apache"),
        ])
        .unwrap();
        assert_eq!(
            c.outbound.fixed_target,
            Some("127.0.0.1:8080".parse().unwrap())
        );
        assert!(c.opaque_ports.contains(25) && c.opaque_ports.contains(8050));
        assert!(!c.opaque_ports.contains(8101));
        assert_eq!(c.detect_timeout, Duration::from_millis(250));
        assert_eq!(c.log_format, LogFormat::Json);
        assert_eq!(c.access_log, Some(crate::observe::access::Format::Apache));
        assert_eq!(Config::default().access_log, None);
    }

    /// TLS to the controller unless an address says `http://`; mTLS to the destination
    /// service needs the workload certificate, so identity.
    #[test]
    fn the_controller_is_reached_over_tls_unless_told_otherwise() {
        let err = parse(&[(env::DESTINATION_ADDR, "ctl:8086")])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("WEFT_PROXY_IDENTITY_ADDR must be set when WEFT_PROXY_DESTINATION_ADDR")
                && err.contains("http://HOST:PORT"),
            "{err}"
        );
        let identity = [
            (env::NAMESPACE, "shop"),
            (env::SERVICE_ACCOUNT, "web"),
            (env::IDENTITY_TOKEN_FILE, "/t"),
            (env::TRUST_ANCHORS, "/a"),
        ];
        let mut vars = identity.to_vec();
        vars.push((env::DESTINATION_ADDR, "https://ctl:8086"));
        vars.push((env::IDENTITY_ADDR, "ctl:8080"));
        let c = parse(&vars).unwrap();
        let (d, i) = (c.discovery.unwrap(), c.identity.unwrap());
        assert_eq!((d.addr.as_str(), d.plaintext), ("ctl:8086", false));
        assert_eq!((i.addr.as_str(), i.plaintext), ("ctl:8080", false));
        assert_eq!(i.controller_namespace, "weft");
        let mut vars = identity.to_vec();
        vars.push((env::IDENTITY_ADDR, "http://ctl:8080"));
        vars.push((env::CONTROLLER_NAMESPACE, "weft-system"));
        let i = parse(&vars).unwrap().identity.unwrap();
        assert_eq!((i.addr.as_str(), i.plaintext), ("ctl:8080", true));
        assert_eq!(i.controller_namespace, "weft-system");
        let mut vars = identity.to_vec();
        vars.push((env::IDENTITY_ADDR, "ctl:8080"));
        vars.push((env::CONTROLLER_NAMESPACE, "a.b"));
        let err = parse(&vars).unwrap_err().to_string();
        assert!(
            err.contains("WEFT_PROXY_CONTROLLER_NAMESPACE=\"a.b\""),
            "{err}"
        );
    }

    #[test]
    fn discovery_is_off_unless_an_address_is_given() {
        let c = parse(&[(env::NAMESPACE, "shop"), (env::DISCOVERY_TIMEOUT, "2s")]).unwrap();
        assert_eq!(c.discovery, None);
        assert_eq!(c.workload.namespace, "shop");
        let c = parse(&[
            (
                env::DESTINATION_ADDR,
                "http://weft-controller.weft.svc:8086",
            ),
            (env::DISCOVERY_TIMEOUT, "250ms"),
            (env::POD_NAME, "web-1"),
            (env::SERVICE_ACCOUNT, "web"),
        ])
        .unwrap();
        let d = c.discovery.unwrap();
        assert_eq!(d.addr, "weft-controller.weft.svc:8086");
        assert!(d.plaintext);
        assert_eq!(d.timeout, Duration::from_millis(250));
        assert_eq!(d.idle_timeout, Duration::from_secs(60));
        assert_eq!(d.backoff_max, Duration::from_secs(5));
        assert_eq!(c.workload.pod_name, "web-1");
        assert_eq!(c.workload.service_account, "web");
        for ok in ["127.0.0.1:8086", "[::1]:8086", "ctl:1"] {
            let ok = format!("http://{ok}");
            assert!(parse(&[(env::DESTINATION_ADDR, &ok)]).is_ok(), "{ok}");
        }
    }

    #[test]
    fn identity_is_off_unless_an_address_is_given() {
        assert_eq!(parse(&[(env::TRUST_ANCHORS, "/x")]).unwrap().identity, None);
        let base = [
            (env::IDENTITY_ADDR, "weft-controller.weft.svc:8080"),
            (env::IDENTITY_TOKEN_FILE, "/var/run/weft/token"),
            (env::TRUST_ANCHORS, "/var/run/weft/ca.pem"),
            (env::NAMESPACE, "books"),
            (env::SERVICE_ACCOUNT, "web"),
        ];
        let i = parse(&base).unwrap().identity.unwrap();
        assert_eq!(i.id, "spiffe://cluster.local/ns/books/sa/web");
        assert_eq!(i.addr, "weft-controller.weft.svc:8080");
        assert_eq!(
            i.token_file,
            std::path::PathBuf::from("/var/run/weft/token")
        );
        let mut v = base.to_vec();
        v.push((env::TRUST_DOMAIN, "example.org"));
        assert_eq!(
            parse(&v).unwrap().identity.unwrap().id,
            "spiffe://example.org/ns/books/sa/web"
        );
        v.push((env::IDENTITY, "spiffe://td/ns/a/sa/b"));
        assert_eq!(
            parse(&v).unwrap().identity.unwrap().id,
            "spiffe://td/ns/a/sa/b"
        );
    }

    #[test]
    fn identity_errors_name_the_variable() {
        let base = [
            (env::IDENTITY_ADDR, "ctl:8080"),
            (env::IDENTITY_TOKEN_FILE, "/t"),
            (env::TRUST_ANCHORS, "/a"),
            (env::NAMESPACE, "books"),
            (env::SERVICE_ACCOUNT, "web"),
        ];
        let with = |var: &'static str, value: Option<&'static str>| {
            let mut v: Vec<_> = base.iter().filter(|(k, _)| *k != var).copied().collect();
            if let Some(value) = value {
                v.push((var, value));
            }
            parse(&v).unwrap_err().to_string()
        };
        let cases = [
            (
                with(env::IDENTITY_ADDR, Some("ctl")),
                "WEFT_PROXY_IDENTITY_ADDR=\"ctl\"",
            ),
            (
                with(env::IDENTITY_TOKEN_FILE, None),
                "WEFT_PROXY_IDENTITY_TOKEN_FILE must be set",
            ),
            (
                with(env::TRUST_ANCHORS, None),
                "WEFT_PROXY_TRUST_ANCHORS must be set",
            ),
            (
                with(env::SERVICE_ACCOUNT, None),
                "WEFT_PROXY_SERVICE_ACCOUNT must be set",
            ),
            (
                with(env::NAMESPACE, Some("Books")),
                "WEFT_PROXY_NAMESPACE=\"Books\"",
            ),
            (
                with(env::TRUST_DOMAIN, Some("a_b")),
                "WEFT_PROXY_TRUST_DOMAIN=\"a_b\"",
            ),
            (
                with(env::IDENTITY, Some("spiffe://td/ns/a")),
                "WEFT_PROXY_IDENTITY=\"spiffe://td/ns/a\"",
            ),
        ];
        for (err, expect) in cases {
            assert!(err.contains(expect), "{err} should contain {expect}");
        }
    }

    #[test]
    fn tap_authorized_identity_defaults_to_the_controller_of_the_trust_domain() {
        let base = [
            (env::IDENTITY_ADDR, "ctl:8080"),
            (env::IDENTITY_TOKEN_FILE, "/t"),
            (env::TRUST_ANCHORS, "/a"),
            (env::NAMESPACE, "books"),
            (env::SERVICE_ACCOUNT, "web"),
            (env::TRUST_DOMAIN, "example.org"),
        ];
        let i = parse(&base).unwrap().identity.unwrap();
        assert_eq!(
            i.tap_authorized_identity,
            "spiffe://example.org/ns/weft/sa/weft-controller"
        );
        let mut v = base.to_vec();
        v.push((
            env::TAP_AUTHORIZED_IDENTITY,
            "spiffe://example.org/ns/ops/sa/tap",
        ));
        let i = parse(&v).unwrap().identity.unwrap();
        assert_eq!(
            i.tap_authorized_identity,
            "spiffe://example.org/ns/ops/sa/tap"
        );
        v.pop();
        v.push((env::TAP_AUTHORIZED_IDENTITY, "controller"));
        let e = parse(&v).unwrap_err().to_string();
        assert!(
            e.contains("WEFT_PROXY_TAP_AUTHORIZED_IDENTITY=\"controller\""),
            "{e}"
        );
    }

    #[test]
    fn tracing_is_off_unless_a_collector_is_given() {
        assert_eq!(
            parse(&[(env::TRACE_SAMPLING, "bad")]).unwrap().tracing,
            None
        );
        let t = parse(&[(env::TRACE_COLLECTOR_ADDR, "otel-collector.obs.svc:4317")])
            .unwrap()
            .tracing
            .unwrap();
        assert_eq!(t.collector, "otel-collector.obs.svc:4317");
        assert_eq!(t.sampling.millionths(), 0);
        assert_eq!(t.queue, 2048);
        let t = parse(&[
            (env::TRACE_COLLECTOR_ADDR, "127.0.0.1:4317"),
            (env::TRACE_SAMPLING, "0.25"),
            (env::TRACE_QUEUE, "100"),
        ])
        .unwrap()
        .tracing
        .unwrap();
        assert_eq!(t.sampling.millionths(), 250_000);
        assert_eq!(t.queue, 100);
        let base = (env::TRACE_COLLECTOR_ADDR, "127.0.0.1:4317");
        for (vars, expect) in [
            (
                vec![(env::TRACE_COLLECTOR_ADDR, "collector")],
                "WEFT_PROXY_TRACE_COLLECTOR_ADDR=\"collector\"",
            ),
            (
                vec![base, (env::TRACE_SAMPLING, "1.5")],
                "WEFT_PROXY_TRACE_SAMPLING=\"1.5\": expected a probability",
            ),
            (
                vec![base, (env::TRACE_SAMPLING, "half")],
                "WEFT_PROXY_TRACE_SAMPLING=\"half\"",
            ),
            (
                vec![base, (env::TRACE_QUEUE, "1")],
                "WEFT_PROXY_TRACE_QUEUE=\"1\"",
            ),
        ] {
            let err = parse(&vars).unwrap_err().to_string();
            assert!(err.contains(expect), "{err} should contain {expect}");
        }
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("2m"), Some(Duration::from_secs(120)));
        assert_eq!(parse_duration("1.5s"), Some(Duration::from_millis(1500)));
        assert_eq!(parse_duration("5"), None);
        assert_eq!(parse_duration("s"), None);
        assert_eq!(parse_duration("-1s"), None);
    }
}

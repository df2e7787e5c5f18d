//! The proxy's `WEFT_PROXY_*` environment (`config::Config::from_lookup`) and the value
//! parsers under it: every variable set, unset or not Unicode, with values near valid ones.
//!
//! The variables are [`VARS`] plus any other `WEFT_PROXY_*` constant declared in
//! proxy/src/config.rs, read from the source, so a variable added there is fuzzed at once (with
//! values from the same grammar).

use std::collections::BTreeMap;

use proptest::collection::vec;
use proptest::prelude::*;
use weft_fuzz::{fuzz, mutate};
use weft_proxy::config::{env, parse_duration, Config, PortSet, Sampling};

const VARS: &[&str] = &[
    env::OUTBOUND_ADDR,
    env::INBOUND_ADDR,
    env::ADMIN_ADDR,
    env::OUTBOUND_FIXED_TARGET,
    env::INBOUND_FIXED_TARGET,
    env::OPAQUE_PORTS,
    env::DETECT_TIMEOUT,
    env::CONNECT_TIMEOUT,
    env::HEADER_READ_TIMEOUT,
    env::MAX_HEADER_BYTES,
    env::POOL_IDLE_TIMEOUT,
    env::SHUTDOWN_GRACE_PERIOD,
    env::WORKER_THREADS,
    env::LOG,
    env::LOG_FORMAT,
    env::ACCESS_LOG,
    env::DESTINATION_ADDR,
    env::NAMESPACE,
    env::POD_NAME,
    env::SERVICE_ACCOUNT,
    env::DISCOVERY_TIMEOUT,
    env::DISCOVERY_IDLE_TIMEOUT,
    env::DISCOVERY_BACKOFF_MAX,
    env::BALANCER_DECAY,
    env::IDENTITY_ADDR,
    env::IDENTITY,
    env::TRUST_DOMAIN,
    env::IDENTITY_TOKEN_FILE,
    env::TRUST_ANCHORS,
    env::TRACE_COLLECTOR_ADDR,
    env::TRACE_SAMPLING,
    env::TRACE_QUEUE,
    env::TAP_AUTHORIZED_IDENTITY,
];

/// What a lookup returns for a variable that is set but not Unicode.
const NOT_UNICODE: &str = "<not unicode>";

/// Valid and nearly valid values of every kind the variables take.
fn values() -> Vec<String> {
    [
        "127.0.0.1:4140",
        "0.0.0.0:4143",
        "[::1]:4191",
        "[::]:0",
        "localhost:8086",
        "weft-controller.weft.svc.cluster.local:8086",
        "host:0",
        ":80",
        "a:65536",
        "[::1",
        "250ms",
        "10s",
        "1.5m",
        "1h",
        "0ms",
        ".5s",
        "1e3s",
        "99999999999999999999h",
        "-1s",
        "s",
        "18446744073709551616s",
        "25,3306,8000-8100",
        "1-65535",
        "0",
        "65535-1",
        ",,",
        "80-",
        "1024",
        "1048576",
        "1048577",
        "512",
        "513",
        "16",
        "plain",
        "json",
        "apache",
        "JSON",
        "warn,weft=debug",
        "default",
        "web",
        "Web",
        "-web",
        "a.b",
        "cluster.local",
        "spiffe://cluster.local/ns/default/sa/web",
        "spiffe://cluster.local/ns/weft/sa/weft-controller",
        "spiffe://a/ns/b/sa/",
        "spiffe:///ns/a/sa/b",
        "/var/run/secrets/tokens/weft",
        "/etc/weft/ca.pem",
        "0.01",
        "1",
        "0",
        "1.0",
        "1.5",
        "-0.0",
        "NaN",
        "1e-7",
        "0.0000001",
        "",
        " ",
        NOT_UNICODE,
    ]
    .into_iter()
    .map(String::from)
    .collect()
}

fn value() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => prop::sample::select(values()),
        2 => mutate::mutated_text(values(), vec![":".into(), ".".into(), "-".into(), ",".into()], 4),
        1 => "\\PC{0,20}",
    ]
}

/// Every `pub const X: &str = "WEFT_PROXY_..."` in the proxy's config source.
fn declared_variables() -> Vec<String> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../proxy/src/config.rs");
    let source = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    source
        .lines()
        .filter_map(|l| {
            let rest = l.trim().strip_prefix("pub const ")?;
            let (_, value) = rest.split_once(": &str = \"")?;
            let name = value.strip_suffix("\";")?;
            name.starts_with("WEFT_PROXY_").then(|| name.to_string())
        })
        .collect()
}

/// [`VARS`] and whatever else the source declares.
fn variables() -> Vec<String> {
    let mut all: Vec<String> = VARS.iter().map(|v| v.to_string()).collect();
    all.extend(declared_variables());
    all.sort();
    all.dedup();
    all
}

fn environments() -> impl Strategy<Value = Vec<(String, String)>> {
    vec((prop::sample::select(variables()), value()), 0..16)
}

fn lookup(
    vars: &BTreeMap<String, String>,
) -> impl Fn(&'static str) -> Result<Option<String>, &'static str> + '_ {
    move |name| match vars.get(name) {
        Some(v) if v == NOT_UNICODE => Err(name),
        v => Ok(v.cloned()),
    }
}

#[test]
fn a_complete_valid_environment_parses() {
    let vars: BTreeMap<String, String> = [
        (env::OUTBOUND_ADDR, "127.0.0.1:4140"),
        (env::OPAQUE_PORTS, "25,3306,8000-8100"),
        (env::DETECT_TIMEOUT, "250ms"),
        (env::DESTINATION_ADDR, "weft-controller.weft:8086"),
        (env::NAMESPACE, "default"),
        (env::SERVICE_ACCOUNT, "web"),
        (env::IDENTITY_ADDR, "weft-identity.weft:8080"),
        (env::IDENTITY_TOKEN_FILE, "/var/run/secrets/tokens/weft"),
        (env::TRUST_ANCHORS, "/etc/weft/ca.pem"),
        (env::TRACE_COLLECTOR_ADDR, "otel.monitoring:4317"),
        (env::TRACE_SAMPLING, "0.01"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let c = Config::from_lookup(lookup(&vars)).expect("valid environment");
    assert!(c.identity.is_some() && c.discovery.is_some() && c.tracing.is_some());
}

#[test]
fn every_declared_variable_is_fuzzed() {
    let vars = variables();
    assert!(vars.len() >= VARS.len(), "{vars:?}");
    assert!(
        vars.iter().all(|v| v.starts_with("WEFT_PROXY_")),
        "{vars:?}"
    );
}

#[test]
fn from_lookup_is_total_and_errors_name_a_variable() {
    fuzz("config::from_lookup", environments(), |pairs| {
        let vars: BTreeMap<String, String> = pairs.iter().cloned().collect();
        match Config::from_lookup(lookup(&vars)) {
            Ok(_) => Ok(()),
            Err(e) => {
                let msg = e.to_string();
                // Every error names a variable (the bad one, or the one that requires it).
                if msg.contains("WEFT_PROXY_") {
                    Ok(())
                } else {
                    Err(format!("error names no WEFT_PROXY_* variable: {msg}"))
                }
            }
        }
    });
}

#[test]
fn value_parsers_are_total() {
    fuzz("config::values", value(), |v| {
        if let Some(d) = parse_duration(v) {
            // Whatever parses is a duration a timer can take.
            let _ = std::time::Instant::now().checked_add(d);
        }
        if let Ok(set) = PortSet::parse(v) {
            for p in [0, 1, 80, 65535] {
                let _ = set.contains(p);
            }
        }
        if let Some(s) = Sampling::parse(v) {
            if s.millionths() > 1_000_000 {
                return Err(format!("sampling {v:?} is above 1: {}", s.millionths()));
            }
        }
        Ok(())
    });
}

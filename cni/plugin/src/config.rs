//! The network configuration on stdin, parsed once into [`NetConf`].
//!
//! Fields are read one by one from the JSON object (not by a serde derive) so
//! that every error names the field and the value that was wrong. Unknown
//! fields are ignored, as the spec lets plugins do, with one exception: a
//! field weft-cni knows other plugins honour but that it cannot (`ipMasq:
//! true`) is refused with code 2 rather than silently not applied.
//!
//! | field | meaning | default |
//! |---|---|---|
//! | `cniVersion` | `1.0.0` or `1.1.0` | required |
//! | `name` | network name | required |
//! | `type` | `weft-cni` | required |
//! | `ipam` | delegated IPAM plugin's section (`type` required); its presence selects primary mode. For `host-local`, a range's `subnet` may be `usePodCidr` / `usePodCidrIPv6`: this node's pod CIDR of that family, from the agent ([`crate::pod_cidr`]) | none: chained mode |
//! | `mtu` | MTU of both veth ends (68..=65535), unless the agent's ADD answer names one (the node's encapsulation decides: `weft-cni-agent --mtu`/`--routing`) | 1500 |
//! | `agentSocket` | the node agent's unix socket | `/run/weft/cni.sock` |
//! | `agentTimeoutMs` | how long to wait for the agent's answer (1..=600000) | 10000 |
//! | `prevResult` | the previous plugin's (or ADD's) result | none |
//! | `cni.dev/valid-attachments` | GC: attachments still in use | none |

use std::path::PathBuf;
use std::time::Duration;

use serde_json::{Map, Value};

use crate::error::Error;
use crate::result::CniResult;
use crate::version;

/// The node agent's socket when `agentSocket` is not set.
pub const DEFAULT_AGENT_SOCKET: &str = "/run/weft/cni.sock";
/// The MTU when `mtu` is not set.
pub const DEFAULT_MTU: u32 = 1500;
/// How long to wait for the agent when `agentTimeoutMs` is not set: the agent
/// attaches programs and computes the pod's policy before it answers ADD.
pub const DEFAULT_AGENT_TIMEOUT: Duration = Duration::from_secs(10);

/// The parsed network configuration.
#[derive(Debug, Clone)]
pub struct NetConf {
    pub cni_version: String,
    pub name: String,
    pub plugin_type: String,
    /// `ipam.type`, when there is an `ipam` section (primary mode).
    pub ipam_type: Option<String>,
    pub mtu: u32,
    pub agent_socket: PathBuf,
    pub agent_timeout: Duration,
    /// `prevResult`, decoded.
    pub prev_result: Option<CniResult>,
    /// `prevResult` as given, to pass through unchanged in chained mode.
    pub prev_result_raw: Option<Value>,
    /// GC's `cni.dev/valid-attachments`.
    pub valid_attachments: Option<Vec<(String, String)>>,
    /// The whole configuration, for delegated plugins.
    pub raw: Map<String, Value>,
}

impl NetConf {
    /// Parses and validates a network configuration.
    pub fn parse(bytes: &[u8]) -> Result<NetConf, Error> {
        let value: Value = serde_json::from_slice(bytes).map_err(|e| Error::Decode {
            what: "the network configuration on stdin".into(),
            reason: format!("not valid JSON: {e}"),
        })?;
        let Value::Object(obj) = value else {
            return Err(Error::Decode {
                what: "the network configuration on stdin".into(),
                reason: format!("expected a JSON object, got {}", kind(&value)),
            });
        };

        let cni_version = required_str(&obj, "cniVersion")?;
        if !version::is_supported(&cni_version) {
            return Err(Error::IncompatibleVersion {
                version: cni_version,
                field: "cniVersion",
                supported: version::supported_list(),
            });
        }
        let name = required_str(&obj, "name")?;
        validate_network_name(&name)?;
        let plugin_type = required_str(&obj, "type")?;

        let ipam_type = match obj.get("ipam") {
            None | Some(Value::Null) => None,
            Some(Value::Object(ipam)) => {
                let t = match ipam.get("type") {
                    Some(Value::String(t)) => t.clone(),
                    Some(other) => {
                        return Err(Error::config(
                            "ipam.type",
                            format!("expected a string, got {}", show(other)),
                        ))
                    }
                    None => {
                        return Err(Error::config(
                            "ipam.type",
                            "missing: name the IPAM plugin, e.g. \"host-local\"",
                        ))
                    }
                };
                if t.is_empty() || t.contains('/') || t == "." || t == ".." {
                    return Err(Error::config(
                        "ipam.type",
                        format!(
                            "{t:?} is not a plugin name (a file name in CNI_PATH, without '/')"
                        ),
                    ));
                }
                Some(t)
            }
            Some(other) => {
                return Err(Error::config(
                    "ipam",
                    format!("expected an object, got {}", show(other)),
                ))
            }
        };

        let mtu = match optional_u64(&obj, "mtu", 68, 65535)? {
            Some(m) => u32::try_from(m).map_err(|_| Error::config("mtu", "out of range"))?,
            None => DEFAULT_MTU,
        };

        let agent_socket = match obj.get("agentSocket") {
            None | Some(Value::Null) => PathBuf::from(DEFAULT_AGENT_SOCKET),
            Some(Value::String(s)) if s.starts_with('/') => PathBuf::from(s),
            Some(other) => {
                return Err(Error::config(
                    "agentSocket",
                    format!(
                        "expected an absolute path to a unix socket, got {}",
                        show(other)
                    ),
                ))
            }
        };
        let agent_timeout = optional_u64(&obj, "agentTimeoutMs", 1, 600_000)?
            .map(Duration::from_millis)
            .unwrap_or(DEFAULT_AGENT_TIMEOUT);

        if let Some(v) = obj.get("ipMasq") {
            if v != &Value::Bool(false) {
                return Err(Error::UnsupportedField {
                    field: "ipMasq".into(),
                    value: show(v),
                    reason: "weft-cni does not masquerade pod traffic; remove the field or set it to false".into(),
                });
            }
        }

        let (prev_result, prev_result_raw) = match obj.get("prevResult") {
            None | Some(Value::Null) => (None, None),
            Some(v @ Value::Object(_)) => {
                let r: CniResult =
                    serde_json::from_value(v.clone()).map_err(|e| Error::Decode {
                        what: "field prevResult".into(),
                        reason: e.to_string(),
                    })?;
                (Some(r), Some(v.clone()))
            }
            Some(other) => {
                return Err(Error::config(
                    "prevResult",
                    format!("expected an object, got {}", show(other)),
                ))
            }
        };

        let valid_attachments = match obj.get("cni.dev/valid-attachments") {
            None | Some(Value::Null) => None,
            Some(Value::Array(items)) => {
                let mut out = Vec::with_capacity(items.len());
                for (i, item) in items.iter().enumerate() {
                    let field = |k: &str| format!("cni.dev/valid-attachments[{i}].{k}");
                    let get = |k: &str| -> Result<String, Error> {
                        match item.get(k) {
                            Some(Value::String(s)) => Ok(s.clone()),
                            other => Err(Error::config(
                                field(k),
                                format!(
                                    "expected a string, got {}",
                                    other.map(show).unwrap_or_else(|| "nothing".into())
                                ),
                            )),
                        }
                    };
                    out.push((get("containerID")?, get("ifname")?));
                }
                Some(out)
            }
            Some(other) => {
                return Err(Error::config(
                    "cni.dev/valid-attachments",
                    format!(
                        "expected an array of {{containerID, ifname}}, got {}",
                        show(other)
                    ),
                ))
            }
        };

        Ok(NetConf {
            cni_version,
            name,
            plugin_type,
            ipam_type,
            mtu,
            agent_socket,
            agent_timeout,
            prev_result,
            prev_result_raw,
            valid_attachments,
            raw: obj,
        })
    }

    /// The same configuration with another `ipam` section: what the delegated IPAM plugin
    /// sees once `usePodCidr` is replaced ([`crate::pod_cidr`]).
    pub fn with_ipam(&self, ipam: Value) -> NetConf {
        let mut conf = self.clone();
        conf.raw.insert("ipam".into(), ipam);
        conf
    }

    /// The configuration as JSON with `cniVersion` replaced, for a delegated
    /// plugin that speaks an older (format-compatible) version.
    pub fn to_bytes_with_version(&self, cni_version: &str) -> Vec<u8> {
        let mut obj = self.raw.clone();
        obj.insert("cniVersion".into(), Value::String(cni_version.to_string()));
        // A map of JSON values always serializes.
        serde_json::to_vec(&Value::Object(obj)).unwrap_or_default()
    }
}

/// Reads only `cniVersion`, leniently: VERSION answers with the caller's
/// version, and errors are reported in it when the rest does not parse.
pub fn sniff_version(bytes: &[u8]) -> Option<String> {
    let v: Value = serde_json::from_slice(bytes).ok()?;
    match v.get("cniVersion") {
        Some(Value::String(s)) if !s.is_empty() && s.len() <= 32 => Some(s.clone()),
        _ => None,
    }
}

fn required_str(obj: &Map<String, Value>, field: &str) -> Result<String, Error> {
    match obj.get(field) {
        Some(Value::String(s)) if !s.is_empty() => Ok(s.clone()),
        Some(Value::String(_)) => Err(Error::config(field, "must not be empty")),
        Some(other) => Err(Error::config(
            field,
            format!("expected a string, got {}", show(other)),
        )),
        None => Err(Error::config(field, "missing (required)")),
    }
}

fn optional_u64(
    obj: &Map<String, Value>,
    field: &str,
    min: u64,
    max: u64,
) -> Result<Option<u64>, Error> {
    match obj.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => match v.as_u64() {
            Some(n) if (min..=max).contains(&n) => Ok(Some(n)),
            _ => Err(Error::config(
                field,
                format!("expected an integer from {min} to {max}, got {}", show(v)),
            )),
        },
    }
}

/// The spec's rule for network names: alphanumerics, `-`, `_`, `.`, starting
/// with an alphanumeric. host-local also uses the name as a directory.
fn validate_network_name(name: &str) -> Result<(), Error> {
    let mut chars = name.chars();
    let ok = chars.next().is_some_and(|c| c.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(Error::config(
            "name",
            format!("{name:?} is not a network name: letters, digits, '-', '_' and '.', starting with a letter or digit"),
        ))
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// A value for an error message, cut short if long.
fn show(v: &Value) -> String {
    let s = v.to_string();
    if s.len() > 80 {
        let cut = (0..=80).rev().find(|i| s.is_char_boundary(*i)).unwrap_or(0);
        format!("{}…", &s[..cut])
    } else {
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::codes;
    use proptest::prelude::*;

    const PRIMARY: &str = r#"{"cniVersion":"1.1.0","name":"weft","type":"weft-cni","mtu":9000,
        "agentSocket":"/tmp/a.sock","ipam":{"type":"host-local","ranges":[[{"subnet":"10.99.0.0/24"}]]}}"#;

    #[test]
    fn primary_config_parses() {
        let c = NetConf::parse(PRIMARY.as_bytes()).expect("valid");
        assert_eq!(c.cni_version, "1.1.0");
        assert_eq!(c.ipam_type.as_deref(), Some("host-local"));
        assert_eq!(c.mtu, 9000);
        assert_eq!(c.agent_socket, PathBuf::from("/tmp/a.sock"));
        assert_eq!(c.agent_timeout, DEFAULT_AGENT_TIMEOUT);
        let down: Value = serde_json::from_slice(&c.to_bytes_with_version("1.0.0")).expect("json");
        assert_eq!(down["cniVersion"], "1.0.0");
        assert_eq!(down["ipam"]["type"], "host-local");
    }

    #[test]
    fn defaults() {
        let c = NetConf::parse(br#"{"cniVersion":"1.0.0","name":"n","type":"weft-cni"}"#)
            .expect("valid");
        assert_eq!(c.mtu, 1500);
        assert_eq!(c.agent_socket, PathBuf::from(DEFAULT_AGENT_SOCKET));
        assert!(c.ipam_type.is_none() && c.prev_result.is_none());
    }

    #[test]
    fn errors_name_field_and_value() {
        let cases: &[(&str, u32, &str)] = &[
            ("", codes::DECODING_FAILURE, "not valid JSON"),
            ("[1,2]", codes::DECODING_FAILURE, "an array"),
            (
                r#"{"name":"n","type":"t"}"#,
                codes::INVALID_CONFIG,
                "cniVersion",
            ),
            (
                r#"{"cniVersion":"0.4.0","name":"n","type":"t"}"#,
                codes::INCOMPATIBLE_VERSION,
                "0.4.0",
            ),
            (
                r#"{"cniVersion":"1.0.0","name":"-x","type":"t"}"#,
                codes::INVALID_CONFIG,
                "-x",
            ),
            (
                r#"{"cniVersion":"1.0.0","name":"n"}"#,
                codes::INVALID_CONFIG,
                "type",
            ),
            (
                r#"{"cniVersion":"1.0.0","name":"n","type":"t","mtu":"big"}"#,
                codes::INVALID_CONFIG,
                "\"big\"",
            ),
            (
                r#"{"cniVersion":"1.0.0","name":"n","type":"t","mtu":20}"#,
                codes::INVALID_CONFIG,
                "mtu",
            ),
            (
                r#"{"cniVersion":"1.0.0","name":"n","type":"t","ipam":{}}"#,
                codes::INVALID_CONFIG,
                "ipam.type",
            ),
            (
                r#"{"cniVersion":"1.0.0","name":"n","type":"t","ipam":{"type":"../sh"}}"#,
                codes::INVALID_CONFIG,
                "../sh",
            ),
            (
                r#"{"cniVersion":"1.0.0","name":"n","type":"t","agentSocket":"rel.sock"}"#,
                codes::INVALID_CONFIG,
                "agentSocket",
            ),
            (
                r#"{"cniVersion":"1.0.0","name":"n","type":"t","ipMasq":true}"#,
                codes::UNSUPPORTED_FIELD,
                "ipMasq = true",
            ),
            (
                r#"{"cniVersion":"1.0.0","name":"n","type":"t","prevResult":{"ips":7}}"#,
                codes::DECODING_FAILURE,
                "prevResult",
            ),
            (
                r#"{"cniVersion":"1.1.0","name":"n","type":"t","cni.dev/valid-attachments":[{"containerID":"a"}]}"#,
                codes::INVALID_CONFIG,
                "valid-attachments[0].ifname",
            ),
        ];
        for (input, code, needle) in cases {
            let e = NetConf::parse(input.as_bytes()).expect_err(input);
            assert_eq!(e.code(), *code, "{input}: {e}");
            let msg = e.to_object("1.1.0").msg;
            assert!(msg.contains(needle), "{input}: {msg:?} lacks {needle:?}");
        }
    }

    #[test]
    fn gc_attachments_parse() {
        let c = NetConf::parse(
            br#"{"cniVersion":"1.1.0","name":"n","type":"t","cni.dev/valid-attachments":[{"containerID":"a","ifname":"eth0"}]}"#,
        )
        .expect("valid");
        assert_eq!(
            c.valid_attachments,
            Some(vec![("a".to_string(), "eth0".to_string())])
        );
    }

    fn json_value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            any::<u32>().prop_map(Value::from),
            any::<f64>().prop_map(|f| serde_json::Number::from_f64(f)
                .map(Value::Number)
                .unwrap_or(Value::Null)),
            ".{0,12}".prop_map(Value::String),
            prop_oneof![
                Just("1.0.0"),
                Just("1.1.0"),
                Just("0.4.0"),
                Just("host-local"),
                Just("/x.sock")
            ]
            .prop_map(|s| Value::String(s.into())),
        ];
        leaf.prop_recursive(3, 24, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                prop::collection::btree_map(
                    prop_oneof![
                        Just("cniVersion".to_string()),
                        Just("name".to_string()),
                        Just("type".to_string()),
                        Just("ipam".to_string()),
                        Just("mtu".to_string()),
                        Just("prevResult".to_string()),
                        Just("ips".to_string()),
                        Just("address".to_string()),
                        Just("cni.dev/valid-attachments".to_string()),
                        ".{0,6}".prop_map(|s| s),
                    ],
                    inner,
                    0..6
                )
                .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    fn spec_code(code: u32) -> bool {
        [
            codes::INCOMPATIBLE_VERSION,
            codes::UNSUPPORTED_FIELD,
            codes::DECODING_FAILURE,
            codes::INVALID_CONFIG,
        ]
        .contains(&code)
    }

    proptest! {
        #[test]
        fn any_bytes_parse_or_fail_with_a_spec_error(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
            if let Err(e) = NetConf::parse(&bytes) {
                prop_assert!(spec_code(e.code()), "{e}");
                let o = e.to_object("1.1.0");
                prop_assert!(serde_json::to_string(&o).is_ok());
            }
        }

        #[test]
        fn any_json_parses_or_fails_with_a_spec_error(v in json_value()) {
            let bytes = serde_json::to_vec(&v).unwrap_or_default();
            match NetConf::parse(&bytes) {
                Ok(c) => prop_assert!(crate::version::is_supported(&c.cni_version)),
                Err(e) => prop_assert!(spec_code(e.code()), "{e}"),
            }
        }

        #[test]
        fn plausible_configs_parse_or_fail_with_a_spec_error(
            version in prop_oneof![Just("1.0.0"), Just("1.1.0"), Just("0.3.1"), Just("")],
            name in "[a-z0-9._-]{0,10}",
            mtu in prop::option::of(any::<i64>()),
            ipam in prop::option::of(json_value()),
            prev in prop::option::of(json_value()),
        ) {
            let mut m = Map::new();
            m.insert("cniVersion".into(), Value::String(version.into()));
            m.insert("name".into(), Value::String(name));
            m.insert("type".into(), Value::String("weft-cni".into()));
            if let Some(mtu) = mtu { m.insert("mtu".into(), Value::from(mtu)); }
            if let Some(ipam) = ipam { m.insert("ipam".into(), ipam); }
            if let Some(prev) = prev { m.insert("prevResult".into(), prev); }
            let bytes = serde_json::to_vec(&Value::Object(m)).unwrap_or_default();
            if let Err(e) = NetConf::parse(&bytes) {
                prop_assert!(spec_code(e.code()), "{e}");
            }
        }
    }
}

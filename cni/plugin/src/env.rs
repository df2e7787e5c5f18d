//! The `CNI_*` environment of one invocation, parsed and validated once.
//!
//! Which variables each command needs follows the spec (section 2): ADD and
//! CHECK need a container id, a netns and an interface name; DEL needs the
//! id and the name (the netns may already be gone); VERSION, STATUS and GC
//! need none of them. Every error names the variable and its bad value
//! (code 4).

use std::collections::BTreeMap;
use std::path::PathBuf;

use crate::error::Error;

/// The environment variable names, in one place.
pub mod vars {
    pub const COMMAND: &str = "CNI_COMMAND";
    pub const CONTAINER_ID: &str = "CNI_CONTAINERID";
    pub const NETNS: &str = "CNI_NETNS";
    pub const IFNAME: &str = "CNI_IFNAME";
    pub const ARGS: &str = "CNI_ARGS";
    pub const PATH: &str = "CNI_PATH";
    /// The `CNI_ARGS` key naming the pod's namespace (set by the kubelet).
    pub const K8S_POD_NAMESPACE: &str = "K8S_POD_NAMESPACE";
    /// The `CNI_ARGS` key naming the pod (set by the kubelet).
    pub const K8S_POD_NAME: &str = "K8S_POD_NAME";
}

/// The variables of one invocation, by name (only `CNI_*` ones matter).
pub type EnvMap = BTreeMap<String, String>;

/// A CNI command (`CNI_COMMAND`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Add,
    Del,
    Check,
    Version,
    Status,
    Gc,
}

impl Command {
    /// The command's name as the spec spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            Command::Add => "ADD",
            Command::Del => "DEL",
            Command::Check => "CHECK",
            Command::Version => "VERSION",
            Command::Status => "STATUS",
            Command::Gc => "GC",
        }
    }

    fn parse(s: &str) -> Option<Command> {
        Some(match s {
            "ADD" => Command::Add,
            "DEL" => Command::Del,
            "CHECK" => Command::Check,
            "VERSION" => Command::Version,
            "STATUS" => Command::Status,
            "GC" => Command::Gc,
            _ => return None,
        })
    }
}

/// The Kubernetes keys of `CNI_ARGS`. Other keys are left to the IPAM
/// plugin, which receives `CNI_ARGS` unchanged (host-local reads `IP=`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CniArgs {
    pub pod_namespace: Option<String>,
    pub pod_name: Option<String>,
}

/// One invocation's parameters.
#[derive(Debug, Clone)]
pub struct Invocation {
    pub command: Command,
    /// `CNI_CONTAINERID`; empty for VERSION, STATUS and GC.
    pub container_id: String,
    /// `CNI_NETNS`; `None` when unset or empty (allowed for DEL).
    pub netns: Option<String>,
    /// `CNI_IFNAME`; empty for VERSION, STATUS and GC.
    pub ifname: String,
    pub args: CniArgs,
    /// `CNI_PATH`, split; empty when unset.
    pub path: Vec<PathBuf>,
    /// Every `CNI_*` variable as given, for delegated plugins.
    pub raw: EnvMap,
}

impl Invocation {
    /// Parses and validates the environment for its command.
    pub fn parse(env: &EnvMap) -> Result<Invocation, Error> {
        let get = |name: &str| env.get(name).map(String::as_str).filter(|v| !v.is_empty());
        let command_s = get(vars::COMMAND).ok_or(Error::InvalidEnv {
            var: vars::COMMAND,
            reason: "not set; expected one of ADD, DEL, CHECK, VERSION, STATUS, GC".into(),
        })?;
        let command = Command::parse(command_s).ok_or_else(|| Error::InvalidEnv {
            var: vars::COMMAND,
            reason: format!("{command_s:?} is not a CNI command; expected one of ADD, DEL, CHECK, VERSION, STATUS, GC"),
        })?;
        let needs_attachment = matches!(command, Command::Add | Command::Del | Command::Check);
        let needs_netns = matches!(command, Command::Add | Command::Check);

        let container_id = get(vars::CONTAINER_ID).unwrap_or_default().to_string();
        if needs_attachment {
            validate_container_id(&container_id)?;
        }
        let ifname = get(vars::IFNAME).unwrap_or_default().to_string();
        if needs_attachment {
            validate_ifname(&ifname)?;
        }
        let netns = get(vars::NETNS).map(str::to_string);
        if needs_netns && netns.is_none() {
            return Err(Error::InvalidEnv {
                var: vars::NETNS,
                reason: format!(
                    "not set; {} needs the pod's network namespace path (e.g. /run/netns/<name>)",
                    command.as_str()
                ),
            });
        }
        let args = parse_args(get(vars::ARGS).unwrap_or_default())?;
        let path = get(vars::PATH)
            .map(|p| {
                p.split(':')
                    .filter(|d| !d.is_empty())
                    .map(PathBuf::from)
                    .collect()
            })
            .unwrap_or_default();
        let raw = env
            .iter()
            .filter(|(k, _)| k.starts_with("CNI_"))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        Ok(Invocation {
            command,
            container_id,
            netns,
            ifname,
            args,
            path,
            raw,
        })
    }
}

/// The spec's rule: not empty, an alphanumeric first character, then
/// alphanumerics, `_`, `.` or `-`.
fn validate_container_id(id: &str) -> Result<(), Error> {
    let mut chars = id.chars();
    let ok = match chars.next() {
        Some(c) if c.is_ascii_alphanumeric() => {
            chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
        }
        _ => false,
    };
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidEnv {
            var: vars::CONTAINER_ID,
            reason: format!(
                "{id:?} is not a container id: it must start with a letter or digit, followed by letters, digits, '_', '.' or '-'"
            ),
        })
    }
}

/// Linux's rule for interface names: 1 to 15 bytes, not `.` or `..`, no `/`,
/// `:` or whitespace.
pub fn validate_ifname(name: &str) -> Result<(), Error> {
    let bad = name.is_empty()
        || name.len() > 15
        || name == "."
        || name == ".."
        || name
            .chars()
            .any(|c| c == '/' || c == ':' || c.is_whitespace() || c == '\0');
    if bad {
        Err(Error::InvalidEnv {
            var: vars::IFNAME,
            reason: format!(
                "{name:?} is not a valid interface name: 1 to 15 bytes, not '.' or '..', without '/', ':' or whitespace"
            ),
        })
    } else {
        Ok(())
    }
}

/// `CNI_ARGS`: `KEY=VALUE` pairs separated by `;`.
pub fn parse_args(s: &str) -> Result<CniArgs, Error> {
    let mut args = CniArgs::default();
    for pair in s.split(';').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').ok_or_else(|| Error::InvalidEnv {
            var: vars::ARGS,
            reason: format!("{pair:?} is not KEY=VALUE (pairs are separated by ';')"),
        })?;
        match k {
            vars::K8S_POD_NAMESPACE => args.pod_namespace = Some(v.to_string()),
            vars::K8S_POD_NAME => args.pod_name = Some(v.to_string()),
            _ => {}
        }
    }
    Ok(args)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::codes;

    fn env(pairs: &[(&str, &str)]) -> EnvMap {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn err_var(pairs: &[(&str, &str)]) -> String {
        match Invocation::parse(&env(pairs)) {
            Err(e @ Error::InvalidEnv { .. }) => {
                assert_eq!(e.code(), codes::INVALID_ENV);
                e.to_string()
            }
            other => panic!("expected InvalidEnv, got {other:?}"),
        }
    }

    #[test]
    fn add_parses_everything() {
        let inv = Invocation::parse(&env(&[
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "abc123"),
            ("CNI_NETNS", "/run/netns/p"),
            ("CNI_IFNAME", "eth0"),
            (
                "CNI_ARGS",
                "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-0;IP=10.0.0.9",
            ),
            ("CNI_PATH", "/opt/cni/bin::/usr/lib/cni"),
            ("HOME", "/root"),
        ]))
        .expect("valid");
        assert_eq!(inv.command, Command::Add);
        assert_eq!(inv.args.pod_namespace.as_deref(), Some("default"));
        assert_eq!(inv.args.pod_name.as_deref(), Some("web-0"));
        assert_eq!(
            inv.path,
            vec![PathBuf::from("/opt/cni/bin"), PathBuf::from("/usr/lib/cni")]
        );
        assert!(inv.raw.contains_key("CNI_ARGS") && !inv.raw.contains_key("HOME"));
    }

    #[test]
    fn each_missing_or_bad_variable_is_named() {
        let base = [
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "abc"),
            ("CNI_NETNS", "/run/netns/p"),
            ("CNI_IFNAME", "eth0"),
        ];
        let without = |name: &str| -> Vec<(&str, &str)> {
            base.iter().copied().filter(|(k, _)| *k != name).collect()
        };
        assert!(err_var(&without("CNI_COMMAND")).contains("CNI_COMMAND"));
        assert!(err_var(&without("CNI_CONTAINERID")).contains("CNI_CONTAINERID"));
        assert!(err_var(&without("CNI_NETNS")).contains("CNI_NETNS"));
        assert!(err_var(&without("CNI_IFNAME")).contains("CNI_IFNAME"));
        let mut bad = base.to_vec();
        bad[0] = ("CNI_COMMAND", "EXPLODE");
        assert!(err_var(&bad).contains("EXPLODE"));
        let mut bad = base.to_vec();
        bad[1] = ("CNI_CONTAINERID", "-leading-dash");
        assert!(err_var(&bad).contains("-leading-dash"));
        let mut bad = base.to_vec();
        bad[3] = ("CNI_IFNAME", "a-name-longer-than-15");
        assert!(err_var(&bad).contains("a-name-longer-than-15"));
        let mut bad = base.to_vec();
        bad.push(("CNI_ARGS", "K8S_POD_NAME"));
        assert!(err_var(&bad).contains("CNI_ARGS"));
    }

    #[test]
    fn del_does_not_need_netns_and_version_needs_nothing() {
        let inv = Invocation::parse(&env(&[
            ("CNI_COMMAND", "DEL"),
            ("CNI_CONTAINERID", "abc"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_NETNS", ""),
        ]))
        .expect("DEL without netns");
        assert_eq!(inv.netns, None);
        for cmd in ["VERSION", "STATUS", "GC"] {
            Invocation::parse(&env(&[("CNI_COMMAND", cmd)])).expect(cmd);
        }
    }

    #[test]
    fn ifname_rules() {
        for ok in ["eth0", "net1", "a", "123456789012345"] {
            assert!(validate_ifname(ok).is_ok(), "{ok}");
        }
        for bad in ["", ".", "..", "a/b", "a:b", "a b", "1234567890123456"] {
            assert!(validate_ifname(bad).is_err(), "{bad}");
        }
    }
}

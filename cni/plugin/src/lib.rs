//! `weft-cni`: Weft's CNI plugin (CNI specification 1.1.0; 1.0.0
//! configurations are served too). A container runtime runs the `weft-cni`
//! binary for each pod with the network configuration on stdin and the
//! `CNI_*` environment; the binary calls [`run`], which parses, decides and
//! wires, and prints the spec's result or error object.
//!
//! # Modes
//!
//! * **Primary** (the configuration has an `ipam` section): weft-cni creates a
//!   veth pair, the pod end named `CNI_IFNAME` inside `CNI_NETNS`, the host
//!   end `lxc` + 12 hex digits of SHA-256(container id, ifname) (so DEL finds
//!   it again); gets addresses from the delegated IPAM plugin (`host-local`
//!   works for IPv4, IPv6 and dual stack; its `"subnet": "usePodCidr"` and
//!   `"usePodCidrIPv6"` stand for this node's pod CIDRs, `Node.spec.podCIDRs`, which
//!   the plugin asks the agent for: see [`pod_cidr`]); and routes without a bridge, as
//!   Cilium does: in the pod a default route via 169.254.1.1 `onlink` (IPv4)
//!   and via fe80::1 (IPv6), both answered by the host veth; on the host a
//!   /32 or /128 route per pod address through the host veth. See
//!   [`plan`] for the whole picture and why.
//! * **Chained** (no `ipam`, and on ADD a `prevResult` from an earlier plugin
//!   such as `ptp` or `bridge`): weft-cni creates nothing; it finds the veth
//!   that plugin made for `CNI_IFNAME`, follows its link index to the host
//!   side, registers that with the agent and passes `prevResult` through.
//!
//! Either way the endpoint is registered with the node agent
//! (`weft-cni-agent`) before ADD succeeds: the agent attaches the eBPF
//! programs and computes the pod's policy first, so the pod is isolated
//! correctly from its first packet. With the agent unreachable ADD undoes its
//! work and fails with code 11 (try again later). DEL works without the agent
//! and is idempotent. The protocol is [`agent_proto`].
//!
//! For a pod the injector prepared in CNI mode (annotation `weft.dev/redirect`, passed by
//! the runtime under `runtimeConfig` when the conflist declares the capability
//! `io.kubernetes.cri.pod-annotations`), ADD also installs the mesh's iptables redirect in
//! the pod, the rules `weft-init` would have installed, and CHECK verifies them: see [`mesh`].
//!
//! # Configuration
//!
//! `/etc/cni/net.d/05-weft.conflist`, primary mode with host-local over this node's pod
//! CIDRs, dual stack (the Helm chart's default has the IPv4 range set only):
//!
//! ```json
//! {
//!   "cniVersion": "1.1.0",
//!   "name": "weft",
//!   "plugins": [
//!     {
//!       "type": "weft-cni",
//!       "mtu": 1500,
//!       "agentSocket": "/run/weft/cni.sock",
//!       "ipam": {
//!         "type": "host-local",
//!         "ranges": [[{ "subnet": "usePodCidr" }], [{ "subnet": "usePodCidrIPv6" }]],
//!         "dataDir": "/var/lib/cni/networks"
//!       }
//!     }
//!   ]
//! }
//! ```
//!
//! Each pod then gets its addresses from its own node's pod CIDRs, the ranges the agents
//! of the other nodes route to this node. On ADD the agent must know this node's Node and
//! its `spec.podCIDRs`; until it does, ADD fails with code 11 and the kubelet retries. A
//! fixed `subnet` (`"10.244.1.0/24"`) works too, one per node, for clusters that assign
//! no pod CIDRs.
//!
//! Chained after ptp, the weft-cni entry follows ptp's and has no `ipam`:
//! `{"type": "weft-cni"}`. The fields are listed in [`config`].
//!
//! # Error codes
//!
//! Well-known: 1 incompatible version, 2 unsupported field, 4 invalid
//! environment variable, 5 I/O, 6 decoding, 7 invalid configuration, 11 try
//! again later (agent unreachable, or this node's pod CIDR for `usePodCidr` not known yet),
//! 50 not available (STATUS). Plugin codes:
//! 100 IPAM plugin failed, 101 IPAM plugin not found, 102 netns missing,
//! 103 interface missing, 104 netlink failed, 105 CHECK mismatch, 106 agent
//! refused, 107 interface already exists, 108 sysctl failed, 109 mesh redirect
//! failed (see
//! [`error::codes`]). Every message names the field, variable, path or value
//! at fault.

pub mod agent_proto;
mod commands;
pub mod config;
pub mod env;
pub mod error;
pub mod ipam;
pub mod mesh;
pub mod plan;
pub mod pod_cidr;
pub mod result;
pub mod version;
pub mod wiring;

pub use env::EnvMap;
pub use error::Error;

use config::NetConf;
use env::{Command, Invocation};
use result::VersionResult;

/// What an invocation prints on stdout and how it exits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// A result, an error object, or nothing.
    pub stdout: String,
    /// 0 on success, 1 on error.
    pub exit_code: i32,
}

impl Outcome {
    fn ok(stdout: String) -> Outcome {
        Outcome {
            stdout,
            exit_code: 0,
        }
    }

    fn error(e: &Error, cni_version: &str) -> Outcome {
        let obj = e.to_object(cni_version);
        Outcome {
            stdout: serde_json::to_string(&obj).unwrap_or_default(),
            exit_code: 1,
        }
    }

    /// The error object printed, if this outcome is an error.
    pub fn error_object(&self) -> Option<error::ErrorObject> {
        (self.exit_code != 0)
            .then(|| serde_json::from_str(&self.stdout).ok())
            .flatten()
    }
}

/// Runs one CNI invocation: `env` holds the `CNI_*` variables, `stdin` the
/// network configuration. The binary is this function plus I/O; tests call
/// it in-process too.
pub fn run(env: &EnvMap, stdin: &[u8]) -> Outcome {
    let sniffed = config::sniff_version(stdin)
        .filter(|v| version::is_supported(v))
        .unwrap_or_else(|| version::LATEST.to_string());
    let inv = match Invocation::parse(env) {
        Ok(inv) => inv,
        Err(e) => return Outcome::error(&e, &sniffed),
    };
    if inv.command == Command::Version {
        let answer = VersionResult {
            cni_version: config::sniff_version(stdin)
                .unwrap_or_else(|| version::LATEST.to_string()),
            supported_versions: version::SUPPORTED.iter().map(|s| s.to_string()).collect(),
        };
        return Outcome::ok(serde_json::to_string(&answer).unwrap_or_default());
    }
    let conf = match NetConf::parse(stdin) {
        Ok(c) => c,
        Err(e) => return Outcome::error(&e, &sniffed),
    };
    match commands::dispatch(&inv, &conf) {
        Ok(Some(result)) => Outcome::ok(result.to_string()),
        Ok(None) => Outcome::ok(String::new()),
        Err(e) => Outcome::error(&e, &conf.cni_version),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> EnvMap {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn version_answers_in_the_callers_version() {
        let out = run(
            &env(&[("CNI_COMMAND", "VERSION")]),
            br#"{"cniVersion":"1.0.0"}"#,
        );
        assert_eq!(out.exit_code, 0);
        let v: VersionResult = serde_json::from_str(&out.stdout).expect("json");
        assert_eq!(v.cni_version, "1.0.0");
        assert_eq!(v.supported_versions, vec!["1.0.0", "1.1.0"]);
        let out = run(&env(&[("CNI_COMMAND", "VERSION")]), b"");
        assert!(
            out.stdout.contains("\"cniVersion\":\"1.1.0\""),
            "{}",
            out.stdout
        );
    }

    #[test]
    fn errors_come_out_as_spec_objects() {
        let add = [
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "c"),
            ("CNI_NETNS", "/run/netns/none"),
            ("CNI_IFNAME", "eth0"),
        ];
        let out = run(&env(&add), b"{not json");
        assert_eq!(out.exit_code, 1);
        let o = out.error_object().expect("error object");
        assert_eq!((o.code, o.cni_version.as_str()), (6, "1.1.0"));

        let out = run(
            &env(&add[..1]),
            br#"{"cniVersion":"1.0.0","name":"n","type":"weft-cni"}"#,
        );
        let o = out.error_object().expect("error object");
        assert_eq!(o.code, 4);
        assert_eq!(o.cni_version, "1.0.0");
        assert!(o.msg.contains("CNI_CONTAINERID"), "{}", o.msg);

        let out = run(
            &env(&[("CNI_COMMAND", "GC")]),
            br#"{"cniVersion":"1.0.0","name":"n","type":"weft-cni"}"#,
        );
        assert_eq!(out.error_object().expect("error").code, 1);
    }
}

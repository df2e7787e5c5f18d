//! Every way a CNI invocation can fail, and its CNI error code.
//!
//! One enum for the whole plugin because one value leaves the process: the
//! spec's error object (`code`, `msg`, `details`) on stdout. Each variant names
//! what was wrong and where (the field, the variable, the path, the value), so
//! an operator reading a kubelet event knows what to check. Codes below 100 are
//! the spec's well-known codes; 100 and up are this plugin's own (see
//! [`codes`]).

use std::path::PathBuf;

use serde::Serialize;

/// The CNI error codes this plugin returns.
pub mod codes {
    /// Incompatible CNI version.
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    /// Unsupported field in the network configuration.
    pub const UNSUPPORTED_FIELD: u32 = 2;
    /// Invalid or missing `CNI_*` environment variable.
    pub const INVALID_ENV: u32 = 4;
    /// I/O failure (reading stdin).
    pub const IO_FAILURE: u32 = 5;
    /// The network configuration (or a delegated plugin's output) is not decodable.
    pub const DECODING_FAILURE: u32 = 6;
    /// The network configuration does not validate.
    pub const INVALID_CONFIG: u32 = 7;
    /// A transient condition (the node agent is unreachable, or cannot name this node's pod
    /// CIDR for `usePodCidr` yet): retry later.
    pub const TRY_AGAIN_LATER: u32 = 11;
    /// STATUS: the plugin cannot service ADD.
    pub const NOT_AVAILABLE: u32 = 50;
    /// STATUS: the plugin cannot service ADD and existing pods may have limited connectivity.
    pub const NOT_AVAILABLE_LIMITED: u32 = 51;
    /// The delegated IPAM plugin failed or returned something unusable.
    pub const IPAM_FAILED: u32 = 100;
    /// The delegated IPAM plugin was not found in `CNI_PATH`.
    pub const IPAM_NOT_FOUND: u32 = 101;
    /// The network namespace `CNI_NETNS` cannot be opened or entered.
    pub const NETNS_MISSING: u32 = 102;
    /// An interface that should exist does not.
    pub const INTERFACE_MISSING: u32 = 103;
    /// A netlink operation (link, address, route, neighbour) failed.
    pub const NETLINK_FAILED: u32 = 104;
    /// CHECK found the pod's wiring different from `prevResult`.
    pub const CHECK_MISMATCH: u32 = 105;
    /// The node agent answered with an error.
    pub const AGENT_REJECTED: u32 = 106;
    /// ADD: an interface named `CNI_IFNAME` already exists in the pod.
    pub const INTERFACE_EXISTS: u32 = 107;
    /// A kernel setting (sysctl) could not be written.
    pub const SYSCTL_FAILED: u32 = 108;
    /// The mesh's redirect (`weft.dev/redirect`) could not be installed in the pod.
    pub const MESH_REDIRECT_FAILED: u32 = 109;
}

/// A failed CNI invocation.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("incompatible CNI version {version:?} in {field}: weft-cni supports {supported}")]
    IncompatibleVersion {
        version: String,
        field: &'static str,
        supported: String,
    },
    #[error("unsupported field {field} = {value}: {reason}")]
    UnsupportedField {
        field: String,
        value: String,
        reason: String,
    },
    #[error("invalid environment variable {var}: {reason}")]
    InvalidEnv { var: &'static str, reason: String },
    #[error("I/O failure while {what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot decode {what}: {reason}")]
    Decode { what: String, reason: String },
    #[error("invalid network configuration: field {field}: {reason}")]
    InvalidConfig { field: String, reason: String },
    #[error("the weft node agent is not reachable at {socket}: {reason}; check that weft-cni-agent runs on this node, then retry")]
    AgentUnreachable { socket: PathBuf, reason: String },
    #[error("{fields}: this node's pod CIDRs are not known: the weft node agent at {socket} answered: {reason}")]
    PodCidrUnavailable {
        /// The placeholders asking for them (`ipam.ranges[0][0].subnet = "usePodCidr"`).
        fields: String,
        socket: PathBuf,
        reason: String,
    },
    #[error("weft-cni is not ready: {reason}")]
    NotAvailable { reason: String },
    #[error("IPAM plugin {plugin} failed on {command}: {reason}")]
    Ipam {
        plugin: String,
        command: String,
        reason: String,
    },
    #[error("IPAM plugin {plugin:?} (field ipam.type) not found in CNI_PATH {searched:?}")]
    IpamNotFound { plugin: String, searched: String },
    #[error("network namespace CNI_NETNS={path} cannot be used: {reason}")]
    NetnsMissing { path: String, reason: String },
    #[error("interface {ifname} not found in {place}")]
    InterfaceMissing { ifname: String, place: String },
    #[error("netlink: {op}: {reason}")]
    Netlink { op: String, reason: String },
    #[error("CHECK: {what}")]
    CheckMismatch { what: String },
    #[error("the weft node agent at {socket} refused {request}: {msg}")]
    AgentRejected {
        socket: PathBuf,
        request: &'static str,
        msg: String,
    },
    #[error("interface {ifname} (CNI_IFNAME) already exists in network namespace {netns}")]
    InterfaceExists { ifname: String, netns: String },
    #[error("cannot set sysctl {path}: {source}")]
    Sysctl {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot install the mesh's redirect (weft.dev/redirect) in {netns}: {reason}")]
    MeshRedirect { netns: String, reason: String },
}

impl Error {
    /// The CNI error code of this error.
    pub fn code(&self) -> u32 {
        use codes::*;
        match self {
            Error::IncompatibleVersion { .. } => INCOMPATIBLE_VERSION,
            Error::UnsupportedField { .. } => UNSUPPORTED_FIELD,
            Error::InvalidEnv { .. } => INVALID_ENV,
            Error::Io { .. } => IO_FAILURE,
            Error::Decode { .. } => DECODING_FAILURE,
            Error::InvalidConfig { .. } => INVALID_CONFIG,
            Error::AgentUnreachable { .. } => TRY_AGAIN_LATER,
            Error::PodCidrUnavailable { .. } => TRY_AGAIN_LATER,
            Error::NotAvailable { .. } => NOT_AVAILABLE,
            Error::Ipam { .. } => IPAM_FAILED,
            Error::IpamNotFound { .. } => IPAM_NOT_FOUND,
            Error::NetnsMissing { .. } => NETNS_MISSING,
            Error::InterfaceMissing { .. } => INTERFACE_MISSING,
            Error::Netlink { .. } => NETLINK_FAILED,
            Error::CheckMismatch { .. } => CHECK_MISMATCH,
            Error::AgentRejected { .. } => AGENT_REJECTED,
            Error::InterfaceExists { .. } => INTERFACE_EXISTS,
            Error::Sysctl { .. } => SYSCTL_FAILED,
            Error::MeshRedirect { .. } => MESH_REDIRECT_FAILED,
        }
    }

    /// A one-line summary for the spec's `msg` (the full story goes in `details`).
    fn summary(&self) -> &'static str {
        match self {
            Error::IncompatibleVersion { .. } => "incompatible CNI version",
            Error::UnsupportedField { .. } => "unsupported field",
            Error::InvalidEnv { .. } => "invalid environment variable",
            Error::Io { .. } => "I/O failure",
            Error::Decode { .. } => "decoding failure",
            Error::InvalidConfig { .. } => "invalid network configuration",
            Error::AgentUnreachable { .. } => "node agent unreachable, try again later",
            Error::PodCidrUnavailable { .. } => "node's pod CIDR not known yet, try again later",
            Error::NotAvailable { .. } => "plugin not available",
            Error::Ipam { .. } => "IPAM plugin failed",
            Error::IpamNotFound { .. } => "IPAM plugin not found",
            Error::NetnsMissing { .. } => "network namespace missing",
            Error::InterfaceMissing { .. } => "interface missing",
            Error::Netlink { .. } => "netlink operation failed",
            Error::CheckMismatch { .. } => "pod network differs from prevResult",
            Error::AgentRejected { .. } => "node agent refused the request",
            Error::InterfaceExists { .. } => "interface already exists",
            Error::Sysctl { .. } => "sysctl write failed",
            Error::MeshRedirect { .. } => "mesh redirect failed",
        }
    }

    /// The spec's error object for this error, in the protocol version in use.
    pub fn to_object(&self, cni_version: &str) -> ErrorObject {
        ErrorObject {
            cni_version: cni_version.to_string(),
            code: self.code(),
            msg: format!("{}: {self}", self.summary()),
            details: self.details(),
        }
    }

    /// The cause chain beyond the top-level message, if any.
    fn details(&self) -> String {
        let mut out = self.to_string();
        let mut source = std::error::Error::source(self);
        while let Some(s) = source {
            out.push_str(": ");
            out.push_str(&s.to_string());
            source = s.source();
        }
        out
    }

    /// A STATUS failure: the plugin cannot service ADD (code 50).
    pub fn not_available(reason: impl Into<String>) -> Self {
        Error::NotAvailable {
            reason: reason.into(),
        }
    }

    /// An invalid-configuration error for `field`.
    pub fn config(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::InvalidConfig {
            field: field.into(),
            reason: reason.into(),
        }
    }

    /// A netlink failure during `op`.
    pub fn netlink(op: impl Into<String>, reason: impl std::fmt::Display) -> Self {
        Error::Netlink {
            op: op.into(),
            reason: reason.to_string(),
        }
    }
}

/// The spec's error result (section 5, "Error"), printed on stdout.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ErrorObject {
    #[serde(default)]
    pub cni_version: String,
    pub code: u32,
    pub msg: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub details: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_unreachable_is_try_again_and_names_the_socket() {
        let e = Error::AgentUnreachable {
            socket: "/run/weft/cni.sock".into(),
            reason: "connection refused".into(),
        };
        let o = e.to_object("1.1.0");
        assert_eq!(o.code, 11);
        assert!(o.msg.contains("/run/weft/cni.sock"), "{}", o.msg);
        assert!(
            o.msg.contains("weft-cni-agent runs on this node"),
            "{}",
            o.msg
        );
        let json = serde_json::to_value(&o).expect("serializes");
        assert_eq!(json["cniVersion"], "1.1.0");
        assert_eq!(json["code"], 11);
    }

    #[test]
    fn codes_are_spec_well_known_or_plugin_range() {
        let cases: Vec<(Error, u32)> = vec![
            (
                Error::IncompatibleVersion {
                    version: "0.4.0".into(),
                    field: "cniVersion",
                    supported: "1.0.0, 1.1.0".into(),
                },
                1,
            ),
            (
                Error::InvalidEnv {
                    var: "CNI_NETNS",
                    reason: "missing".into(),
                },
                4,
            ),
            (
                Error::Decode {
                    what: "stdin".into(),
                    reason: "eof".into(),
                },
                6,
            ),
            (Error::config("mtu", "too small"), 7),
            (Error::not_available("agent down"), 50),
            (
                Error::PodCidrUnavailable {
                    fields: "ipam.ranges[0][0].subnet = \"usePodCidr\"".into(),
                    socket: "/run/weft/cni.sock".into(),
                    reason: "node n1 has no pod CIDR yet".into(),
                },
                11,
            ),
            (
                Error::IpamNotFound {
                    plugin: "x".into(),
                    searched: "/opt/cni/bin".into(),
                },
                101,
            ),
        ];
        for (e, code) in cases {
            assert_eq!(e.code(), code, "{e}");
        }
    }
}

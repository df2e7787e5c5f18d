//! What to install: [`RedirectConfig`], and the two ways it travels from the injector to the
//! program that installs it.
//!
//! - As `weft-init`'s command line ([`RedirectConfig::to_args`]), when the injector adds the
//!   init container; `weft-init` parses the flags (env fallbacks in [`mod@env`]) back into the same
//!   struct.
//! - As one pod annotation, [`ANNOTATION`] (`weft.dev/redirect`), when the CNI plugin installs
//!   the redirect instead ([`RedirectConfig::to_annotation`] / [`RedirectConfig::from_annotation`]).
//!
//! Why one annotation carrying the whole configuration, rather than the plugin re-deriving it
//! from the user's `config.weft.dev/*` annotations: the redirect depends on the injector's own
//! settings too (proxy UID, listen ports, the admin port that always bypasses the proxy, ports
//! skipped for every pod), which the CNI does not know and must not guess. The injector
//! computes the configuration once, with the same function whether it writes the init
//! container's flags or the annotation, so a pod gets the same rules either way; and the
//! annotation's presence is the marker that says "the CNI is expected to redirect this pod".
//! The injector validated the user's annotations at admission, so the plugin only decodes a
//! value a machine wrote, strictly (unknown fields are refused: a newer injector's setting an
//! older plugin cannot honour fails the pod instead of leaving part of the redirect out).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::ports::{CidrList, PortList};

/// The pod annotation that carries the redirect configuration for the CNI plugin. Written by
/// the injector in CNI mode only; its presence means the CNI must install the redirect.
pub const ANNOTATION: &str = "weft.dev/redirect";

/// Environment variables `weft-init` reads when a flag is not given.
pub mod env {
    pub const BACKEND: &str = "WEFT_INIT_BACKEND";
    pub const PROXY_UID: &str = "WEFT_INIT_PROXY_UID";
    pub const INBOUND_PORT: &str = "WEFT_INIT_INBOUND_PORT";
    pub const OUTBOUND_PORT: &str = "WEFT_INIT_OUTBOUND_PORT";
    pub const SKIP_INBOUND_PORTS: &str = "WEFT_INIT_SKIP_INBOUND_PORTS";
    pub const SKIP_OUTBOUND_PORTS: &str = "WEFT_INIT_SKIP_OUTBOUND_PORTS";
    pub const SKIP_INBOUND_CIDRS: &str = "WEFT_INIT_SKIP_INBOUND_CIDRS";
    pub const SKIP_OUTBOUND_CIDRS: &str = "WEFT_INIT_SKIP_OUTBOUND_CIDRS";
    pub const IPV6: &str = "WEFT_INIT_IPV6";
    pub const DRY_RUN: &str = "WEFT_INIT_DRY_RUN";
    pub const LOG: &str = "WEFT_INIT_LOG";
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
pub enum Backend {
    /// nftables-based iptables (`iptables-nft-restore`).
    Nft,
    /// The legacy x_tables backend (`iptables-legacy-restore`).
    Legacy,
    /// Legacy if the namespace already has legacy rules and no nft rules, else nft.
    Auto,
}

impl Backend {
    pub fn as_str(self) -> &'static str {
        match self {
            Backend::Nft => "nft",
            Backend::Legacy => "legacy",
            Backend::Auto => "auto",
        }
    }
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Backend {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "nft" => Ok(Backend::Nft),
            "legacy" => Ok(Backend::Legacy),
            "auto" => Ok(Backend::Auto),
            _ => Err(format!("{s:?}: want nft, legacy or auto")),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    /// The program name for `tool` (`save` or `restore`) with `backend` (`Nft` or `Legacy`).
    pub fn program(self, backend: Backend, tool: &str) -> String {
        let base = match self {
            Family::V4 => "iptables",
            Family::V6 => "ip6tables",
        };
        let b = match backend {
            Backend::Legacy => "legacy",
            Backend::Nft | Backend::Auto => "nft",
        };
        format!("{base}-{b}-{tool}")
    }
}

/// What to install.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedirectConfig {
    pub proxy_uid: u32,
    pub inbound_port: u16,
    pub outbound_port: u16,
    pub skip_inbound_ports: PortList,
    pub skip_outbound_ports: PortList,
    /// Source networks whose incoming connections bypass the proxy.
    pub skip_inbound_cidrs: CidrList,
    /// Destination networks whose outgoing connections bypass the proxy.
    pub skip_outbound_cidrs: CidrList,
    /// Also install IPv6 rules.
    pub ipv6: bool,
    pub backend: Backend,
}

impl Default for RedirectConfig {
    fn default() -> Self {
        Self {
            proxy_uid: 2102,
            inbound_port: 4143,
            outbound_port: 4140,
            skip_inbound_ports: PortList::default(),
            skip_outbound_ports: PortList::default(),
            skip_inbound_cidrs: CidrList::default(),
            skip_outbound_cidrs: CidrList::default(),
            ipv6: true,
            backend: Backend::Auto,
        }
    }
}

/// Why a [`ANNOTATION`] value could not be used. Names the annotation and quotes the value, so
/// the kubelet event that carries it tells the operator what to look at.
#[derive(Debug, thiserror::Error)]
#[error("annotation {ANNOTATION}={value:?} is invalid: {reason} (the injector writes it; re-create the pod with this release's injector)")]
pub struct AnnotationError {
    pub value: String,
    pub reason: String,
}

/// The annotation's JSON: ports and CIDRs in the same comma-separated syntax as the user's
/// annotations and `weft-init`'s flags.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Wire {
    proxy_uid: u32,
    inbound_port: u16,
    outbound_port: u16,
    #[serde(default)]
    skip_inbound_ports: String,
    #[serde(default)]
    skip_outbound_ports: String,
    #[serde(default)]
    skip_inbound_cidrs: String,
    #[serde(default)]
    skip_outbound_cidrs: String,
    ipv6: bool,
    backend: String,
}

impl RedirectConfig {
    /// `weft-init`'s command line for this configuration: the same port and CIDR syntax as the
    /// annotations; empty lists are left out (the flags default to empty).
    pub fn to_args(&self) -> Vec<String> {
        let mut args = vec![
            "--backend".to_string(),
            self.backend.to_string(),
            "--proxy-uid".into(),
            self.proxy_uid.to_string(),
            "--inbound-port".into(),
            self.inbound_port.to_string(),
            "--outbound-port".into(),
            self.outbound_port.to_string(),
        ];
        for (flag, value) in [
            ("--skip-inbound-ports", self.skip_inbound_ports.to_string()),
            (
                "--skip-outbound-ports",
                self.skip_outbound_ports.to_string(),
            ),
            ("--skip-inbound-cidrs", self.skip_inbound_cidrs.to_string()),
            (
                "--skip-outbound-cidrs",
                self.skip_outbound_cidrs.to_string(),
            ),
        ] {
            if !value.is_empty() {
                args.push(flag.into());
                args.push(value);
            }
        }
        if !self.ipv6 {
            args.push("--ipv6".into());
            args.push("false".into());
        }
        args
    }

    /// The value of [`ANNOTATION`] for this configuration (compact JSON).
    pub fn to_annotation(&self) -> String {
        let wire = Wire {
            proxy_uid: self.proxy_uid,
            inbound_port: self.inbound_port,
            outbound_port: self.outbound_port,
            skip_inbound_ports: self.skip_inbound_ports.to_string(),
            skip_outbound_ports: self.skip_outbound_ports.to_string(),
            skip_inbound_cidrs: self.skip_inbound_cidrs.to_string(),
            skip_outbound_cidrs: self.skip_outbound_cidrs.to_string(),
            ipv6: self.ipv6,
            backend: self.backend.to_string(),
        };
        // A struct of strings and integers always serializes.
        serde_json::to_string(&wire).unwrap_or_default()
    }

    /// Decodes an [`ANNOTATION`] value.
    pub fn from_annotation(value: &str) -> Result<Self, AnnotationError> {
        let bad = |reason: String| AnnotationError {
            value: value.to_string(),
            reason,
        };
        let w: Wire = serde_json::from_str(value).map_err(|e| bad(e.to_string()))?;
        let field = |name: &str, e: crate::ports::ParseError| bad(format!("{name}: {e}"));
        Ok(RedirectConfig {
            proxy_uid: w.proxy_uid,
            inbound_port: w.inbound_port,
            outbound_port: w.outbound_port,
            skip_inbound_ports: w
                .skip_inbound_ports
                .parse()
                .map_err(|e| field("skipInboundPorts", e))?,
            skip_outbound_ports: w
                .skip_outbound_ports
                .parse()
                .map_err(|e| field("skipOutboundPorts", e))?,
            skip_inbound_cidrs: w
                .skip_inbound_cidrs
                .parse()
                .map_err(|e| field("skipInboundCidrs", e))?,
            skip_outbound_cidrs: w
                .skip_outbound_cidrs
                .parse()
                .map_err(|e| field("skipOutboundCidrs", e))?,
            ipv6: w.ipv6,
            backend: w
                .backend
                .parse()
                .map_err(|e: String| bad(format!("backend: {e}")))?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> RedirectConfig {
        RedirectConfig {
            skip_inbound_ports: "4191,22".parse().unwrap_or_default(),
            skip_outbound_ports: "5432,6000-6100".parse().unwrap_or_default(),
            skip_outbound_cidrs: "169.254.169.254/32,fd00::/8".parse().unwrap_or_default(),
            backend: Backend::Nft,
            ..Default::default()
        }
    }

    #[test]
    fn annotation_round_trips_and_is_pinned() {
        let cfg = sample();
        let text = cfg.to_annotation();
        assert_eq!(
            text,
            r#"{"proxyUid":2102,"inboundPort":4143,"outboundPort":4140,"skipInboundPorts":"4191,22","skipOutboundPorts":"5432,6000-6100","skipInboundCidrs":"","skipOutboundCidrs":"169.254.169.254/32,fd00::/8","ipv6":true,"backend":"nft"}"#
        );
        assert_eq!(RedirectConfig::from_annotation(&text).ok(), Some(cfg));
    }

    #[test]
    fn bad_annotations_name_the_annotation_and_value() {
        for (value, why) in [
            ("", "EOF"),
            ("{}", "missing field"),
            (
                r#"{"proxyUid":2102,"inboundPort":4143,"outboundPort":4140,"ipv6":true,"backend":"nft","skipOutboundPorts":"80,http"}"#,
                "skipOutboundPorts",
            ),
            (
                r#"{"proxyUid":2102,"inboundPort":4143,"outboundPort":4140,"ipv6":true,"backend":"iptables"}"#,
                "backend",
            ),
            (
                r#"{"proxyUid":2102,"inboundPort":4143,"outboundPort":4140,"ipv6":true,"backend":"nft","mark":7}"#,
                "unknown field",
            ),
        ] {
            let Err(e) = RedirectConfig::from_annotation(value) else {
                panic!("{value:?} decoded");
            };
            let msg = e.to_string();
            assert!(msg.contains(ANNOTATION), "{msg}");
            assert!(msg.contains(why), "{value:?}: {msg}");
        }
    }

    #[test]
    fn args_carry_every_setting() {
        let args = RedirectConfig {
            ipv6: false,
            ..sample()
        }
        .to_args()
        .join(" ");
        assert_eq!(
            args,
            "--backend nft --proxy-uid 2102 --inbound-port 4143 --outbound-port 4140 \
             --skip-inbound-ports 4191,22 --skip-outbound-ports 5432,6000-6100 \
             --skip-outbound-cidrs 169.254.169.254/32,fd00::/8 --ipv6 false"
        );
    }

    proptest! {
        #[test]
        fn annotation_decoder_never_panics(s in "\\PC{0,80}") {
            let _ = RedirectConfig::from_annotation(&s);
        }

        #[test]
        fn any_config_round_trips(
            uid in any::<u32>(), inb in 1u16.., outb in 1u16..,
            ports in proptest::collection::vec(1u16.., 0..4), ipv6 in any::<bool>(),
        ) {
            let list = ports.iter().map(u16::to_string).collect::<Vec<_>>().join(",");
            let cfg = RedirectConfig {
                proxy_uid: uid, inbound_port: inb, outbound_port: outb,
                skip_outbound_ports: list.parse().map_err(|e| TestCaseError::fail(format!("{e}")))?,
                ipv6, backend: Backend::Legacy, ..Default::default()
            };
            let back = RedirectConfig::from_annotation(&cfg.to_annotation())
                .map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert_eq!(back, cfg);
        }
    }
}

//! Command line and environment, parsed once. Every flag has a `WEFT_CNI_AGENT_*`
//! environment fallback (names in [`env`]); a bad value exits with a message naming the
//! flag and the value before anything is bound.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use weft_controller::source::SourceConfig;

/// The environment variables each flag falls back to.
pub mod env {
    pub const SOURCE: &str = "WEFT_CNI_AGENT_SOURCE";
    pub const NODE: &str = "WEFT_CNI_AGENT_NODE";
    pub const NODE_IP: &str = "WEFT_CNI_AGENT_NODE_IP";
    pub const PIN_DIR: &str = "WEFT_CNI_AGENT_PIN_DIR";
    pub const SOCKET: &str = "WEFT_CNI_AGENT_SOCKET";
    pub const METRICS_ADDR: &str = "WEFT_CNI_AGENT_METRICS_ADDR";
    pub const STATE_DIR: &str = "WEFT_CNI_AGENT_STATE_DIR";
    pub const DEBOUNCE_MS: &str = "WEFT_CNI_AGENT_DEBOUNCE_MS";
    pub const LOG: &str = "WEFT_CNI_AGENT_LOG";
    pub const LOG_FORMAT: &str = "WEFT_CNI_AGENT_LOG_FORMAT";
    pub const ROUTING: &str = "WEFT_CNI_AGENT_ROUTING";
    pub const UNDERLAY_DEV: &str = "WEFT_CNI_AGENT_UNDERLAY_DEV";
    pub const MTU: &str = "WEFT_CNI_AGENT_MTU";
    pub const VXLAN_PORT: &str = "WEFT_CNI_AGENT_VXLAN_PORT";
    pub const VXLAN_VNI: &str = "WEFT_CNI_AGENT_VXLAN_VNI";
}

/// The CNI node agent: registers the pods the weft-cni plugin wires, enforces their
/// NetworkPolicies in the eBPF datapath, and serves metrics and flows.
#[derive(Clone, Debug, clap::Parser)]
#[command(name = "weft-cni-agent", version)]
pub struct Config {
    /// Where Pods, Namespaces and NetworkPolicies come from: `kube` (in-cluster or
    /// KUBECONFIG) or `dir:PATH` (a directory of manifests, watched).
    #[arg(long, env = env::SOURCE, value_parser = parse_source)]
    pub source: SourceConfig,
    /// This node's name: the Kubernetes node the agent runs on (its Node's pod CIDRs answer
    /// the plugin's `usePodCidr`; the other Nodes are routed to).
    #[arg(long, env = env::NODE, value_parser = parse_node)]
    pub node: String,
    /// Extra node addresses always allowed to and from pods (comma-separated), in addition
    /// to the addresses of this network namespace's interfaces.
    #[arg(long = "node-ip", env = env::NODE_IP, value_delimiter = ',')]
    pub node_ips: Vec<IpAddr>,
    /// bpffs directory of the pinned programs and maps.
    #[arg(long, env = env::PIN_DIR, default_value = weft_datapath::DEFAULT_PIN_DIR, value_parser = parse_abs_path)]
    pub pin_dir: PathBuf,
    /// The unix socket the plugin talks to.
    #[arg(long, env = env::SOCKET, default_value = "/run/weft/cni.sock", value_parser = parse_abs_path)]
    pub socket: PathBuf,
    /// `/metrics`, `/ready` and `/flows` (flows to loopback clients only).
    #[arg(long, env = env::METRICS_ADDR, default_value = "0.0.0.0:9964")]
    pub metrics_addr: SocketAddr,
    /// Where the endpoint registry is persisted.
    #[arg(long, env = env::STATE_DIR, default_value = "/run/weft/agent", value_parser = parse_abs_path)]
    pub state_dir: PathBuf,
    /// How long to wait after a change for more before recomputing policy.
    #[arg(long = "debounce-ms", env = env::DEBOUNCE_MS, default_value_t = 5,
          value_parser = clap::value_parser!(u64).range(0..=1000))]
    pub debounce_ms: u64,
    /// Log filter (tracing's EnvFilter syntax).
    #[arg(long, env = env::LOG, default_value = "warn,weft=info,weft_cni_agent=info")]
    pub log: String,
    /// Log format.
    #[arg(long, env = env::LOG_FORMAT, default_value = "plain", value_parser = ["plain", "json"])]
    pub log_format: String,
    /// How pod traffic reaches other nodes' pods (routes from the Nodes' podCIDRs): `direct`
    /// (via each node's InternalIP) or `vxlan` (encapsulated to it). The same for every node
    /// of a cluster.
    #[arg(long, env = env::ROUTING, default_value = "direct", value_enum)]
    pub routing: crate::routing::Mode,
    /// The underlay interface (MTU and address family of the encapsulation); default: the
    /// default route's.
    #[arg(long = "underlay-dev", env = env::UNDERLAY_DEV, value_parser = parse_ifname)]
    pub underlay_dev: Option<String>,
    /// The pods' MTU, sent to the plugin with each ADD; default: the underlay's minus 50
    /// (VXLAN over IPv4) or 70 (over IPv6), and for direct routing the plugin's own.
    #[arg(long, env = env::MTU, value_parser = clap::value_parser!(u32).range(1280..=65535))]
    pub mtu: Option<u32>,
    /// The VXLAN UDP port (every node the same).
    #[arg(long = "vxlan-port", env = env::VXLAN_PORT, default_value_t = 8472,
          value_parser = clap::value_parser!(u16).range(1..))]
    pub vxlan_port: u16,
    /// The VXLAN network identifier.
    #[arg(long = "vxlan-vni", env = env::VXLAN_VNI, default_value_t = 1,
          value_parser = clap::value_parser!(u32).range(1..=16_777_215))]
    pub vxlan_vni: u32,
}

impl Config {
    pub fn debounce(&self) -> Duration {
        Duration::from_millis(self.debounce_ms)
    }

    /// What [`crate::routing`] needs.
    pub fn routing(&self) -> crate::routing::RoutingConfig {
        crate::routing::RoutingConfig {
            mode: self.routing,
            node: self.node.clone(),
            underlay_dev: self.underlay_dev.clone(),
            mtu: self.mtu,
            vxlan_port: self.vxlan_port,
            vxlan_vni: self.vxlan_vni,
            pin_dir: self.pin_dir.clone(),
        }
    }
}

fn parse_ifname(s: &str) -> Result<String, String> {
    if s.is_empty() || s.len() > 15 || s.contains(['/', ' ', '\0']) {
        return Err(format!("{s:?} is not an interface name"));
    }
    Ok(s.to_string())
}

fn parse_source(s: &str) -> Result<SourceConfig, String> {
    let source: SourceConfig = s.parse()?;
    if let SourceConfig::Dir(path) = &source {
        if !path.is_dir() {
            return Err(format!("{} is not a directory", path.display()));
        }
    }
    Ok(source)
}

fn parse_node(s: &str) -> Result<String, String> {
    if s.trim().is_empty() {
        return Err("the node name is empty".into());
    }
    Ok(s.to_string())
}

fn parse_abs_path(s: &str) -> Result<PathBuf, String> {
    let p = PathBuf::from(s);
    if !p.is_absolute() {
        return Err(format!("{s:?} is not an absolute path"));
    }
    Ok(p)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[test]
    fn flags_parse_and_bad_values_name_flag_and_value() {
        let dir = tempfile::tempdir().expect("tempdir");
        let src = format!("dir:{}", dir.path().display());
        let c = Config::try_parse_from([
            "weft-cni-agent",
            "--source",
            &src,
            "--node",
            "n1",
            "--node-ip",
            "10.0.0.1,fd00::1",
        ])
        .expect("parses");
        assert_eq!(c.node_ips.len(), 2);
        assert_eq!(c.metrics_addr.port(), 9964);
        assert_eq!(c.socket, PathBuf::from("/run/weft/cni.sock"));
        assert_eq!(c.routing, crate::routing::Mode::Direct);
        assert_eq!((c.mtu, c.vxlan_port, c.vxlan_vni), (None, 8472, 1));
        let v = Config::try_parse_from([
            "weft-cni-agent",
            "--source",
            &src,
            "--node",
            "n1",
            "--routing",
            "vxlan",
            "--underlay-dev",
            "eth0",
            "--mtu",
            "1400",
        ])
        .expect("parses");
        assert_eq!(
            (v.routing, v.underlay_dev.as_deref(), v.mtu),
            (crate::routing::Mode::Vxlan, Some("eth0"), Some(1400))
        );
        for (flag, value) in [
            ("--source", "k8s"),
            ("--source", "dir:/no/such/dir"),
            ("--metrics-addr", "localhost"),
            ("--pin-dir", "relative/pins"),
            ("--node-ip", "10.0.0.300"),
            ("--routing", "geneve"),
            ("--mtu", "9"),
            ("--mtu", "70000"),
            ("--underlay-dev", "a/b"),
            ("--vxlan-vni", "16777216"),
            ("--vxlan-port", "0"),
        ] {
            let mut args = vec!["weft-cni-agent", "--node", "n1"];
            if flag != "--source" {
                args.extend(["--source", &src]);
            }
            args.extend([flag, value]);
            let err = Config::try_parse_from(args).expect_err(value).to_string();
            assert!(err.contains(flag) && err.contains(value), "{err}");
        }
    }
}

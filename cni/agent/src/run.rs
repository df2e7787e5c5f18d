//! Start-up in order: check the configuration, open the datapath (pins), load the registry
//! and collect what vanished while the agent was down, start the source, then bind the
//! plugin's socket and the metrics server, and serve.

use std::sync::Arc;

use tokio::net::TcpListener;
use weft_controller::index::Index;
use weft_controller::model::Kind;
use weft_controller::source::{Readiness, Source};
use weft_datapath::Datapath;

use crate::agent::Agent;
use crate::config::Config;
use crate::endpoints::Core;
use crate::flows::FlowHub;
use crate::http::Server;
use crate::metrics::Metrics;
use crate::registry::Store;

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("--source {source_flag}: {message}")]
    Source {
        source_flag: String,
        message: String,
    },
    #[error("--pin-dir {}: {source}", .path.display())]
    Datapath {
        path: std::path::PathBuf,
        source: weft_datapath::Error,
    },
    #[error("--state-dir: {0}")]
    State(#[from] crate::registry::StateError),
    #[error("recovering endpoints after a restart: {0}")]
    Recover(#[from] crate::endpoints::EndpointsError),
    #[error("--socket {}: cannot listen: {source}", .path.display())]
    Socket {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("--metrics-addr {addr}: cannot listen: {source}; is another process using the port?")]
    Metrics {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("NodePort programs on the external interface {dev}: {reason}")]
    NodePort { dev: String, reason: String },
    #[error("the plugin socket stopped serving: {0}")]
    Serve(std::io::Error),
    #[error("--routing {mode}: {source}")]
    Routing {
        mode: crate::routing::Mode,
        source: crate::routing::RoutingError,
    },
}

/// Runs the agent until the socket server fails or the process is stopped.
pub async fn run(config: Config) -> Result<(), RunError> {
    let source_metrics = weft_controller::metrics::Metrics::new();
    // Validate the source before touching the node.
    let source = Source::open(&config.source, source_metrics.clone(), None)
        .await
        .map_err(|e| RunError::Source {
            source_flag: config.source.to_string(),
            message: e.to_string(),
        })?;
    let store = Store::open(&config.state_dir)?;
    let datapath = Datapath::open(&config.pin_dir).map_err(|source| RunError::Datapath {
        path: config.pin_dir.clone(),
        source,
    })?;
    let flow_reader = datapath.flows().map_err(|source| RunError::Datapath {
        path: config.pin_dir.clone(),
        source,
    })?;

    let metrics = Metrics::new();
    let mut core = Core::new(datapath, store, metrics.clone())?;
    let gone = core.recover()?;
    tracing::info!(
        node = %config.node,
        endpoints = core.state().endpoints.len(),
        collected = gone.len(),
        pin_dir = %config.pin_dir.display(),
        "datapath open, registry loaded"
    );
    let names = core.names();
    // The node's routing before the socket: the first ADD already gets the pods' MTU.
    let router = crate::routing::Router::start(config.routing())
        .await
        .map_err(|source| RunError::Routing {
            mode: config.routing,
            source,
        })?;
    let pod_mtu = router.pod_mtu();
    // NodePorts on the external interface (none without one: a node namespace in tests).
    let external = router.underlay_dev().map(str::to_string);
    if let Some(dev) = &external {
        attach_nodeport(&config.pin_dir, dev, router.tunnel_ifindex()).map_err(|reason| {
            RunError::NodePort {
                dev: dev.clone(),
                reason,
            }
        })?;
    }

    let index = Index::new();
    let readiness = Readiness::default();
    let mut tasks = Vec::new();
    tasks.push(source.spawn(
        index.clone(),
        source_metrics.clone(),
        readiness.clone(),
        &[
            Kind::Pod,
            Kind::Namespace,
            Kind::NetworkPolicy,
            Kind::Service,
            Kind::EndpointSlice,
            Kind::Node,
        ],
    ));
    // Routes to the other nodes' pods follow the Nodes.
    tasks.push(tokio::spawn(crate::routing::run(
        router,
        index.clone(),
        readiness.clone(),
        metrics.clone(),
    )));

    let agent = Agent::new(
        core,
        index,
        readiness,
        metrics.clone(),
        config.node_ips.clone(),
    );
    // Services get their own handle on the pinned maps and their own debounced loop; the
    // node's view (external addresses, this node's pods) comes from the agent.
    let service_maps = Datapath::open(&config.pin_dir).map_err(|source| RunError::Datapath {
        path: config.pin_dir.clone(),
        source,
    })?;
    let view_agent = agent.clone();
    let node_view: crate::services::NodeViewFn =
        Arc::new(move || node_view(&view_agent, external.as_deref()));
    tasks.push(tokio::spawn(crate::services::run(
        service_maps,
        agent.index().clone(),
        agent.readiness().clone(),
        metrics.clone(),
        config.debounce(),
        node_view,
    )));
    let hub = FlowHub::new(metrics);
    tasks.push(tokio::spawn(crate::flows::run_reader(
        flow_reader,
        names,
        hub.clone(),
    )));
    tasks.push(tokio::spawn(agent.clone().run_sync(config.debounce())));

    let socket =
        weft_cni::agent_proto::bind(&config.socket).map_err(|source| RunError::Socket {
            path: config.socket.clone(),
            source,
        })?;
    let listener = TcpListener::bind(config.metrics_addr)
        .await
        .map_err(|source| RunError::Metrics {
            addr: config.metrics_addr,
            source,
        })?;
    tracing::info!(socket = %config.socket.display(), metrics = %config.metrics_addr, "serving");
    let server = Server {
        agent: agent.clone(),
        hub,
        source_metrics: Some(source_metrics),
        status: Arc::new(crate::status::StatusSource::new(
            config.node.clone(),
            config.pin_dir.clone(),
        )),
    };
    tasks.push(tokio::spawn(server.serve(listener)));
    // `node` (this node's pod CIDRs, for usePodCidr) is answered from the index; the rest by
    // the agent, with the pods' MTU added to ADD's answer.
    let (index, readiness) = (agent.index().clone(), agent.readiness().clone());
    let handler = crate::pod_cidrs::WithPodCidrs::new(
        crate::routing::WithMtu::new(agent, pod_mtu),
        config.node.clone(),
        index,
        readiness,
    );
    let result = weft_cni::agent_proto::serve(socket, handler).await;
    for t in tasks {
        t.abort();
    }
    result.map_err(RunError::Serve)
}

/// Loads and attaches the NodePort programs to `dev` (the node's external interface).
fn attach_nodeport(
    pin_dir: &std::path::Path,
    dev: &str,
    tunnel_ifindex: Option<u32>,
) -> Result<(), String> {
    let ifindex =
        weft_datapath::if_index(dev).ok_or("no such interface in the agent's network namespace")?;
    let mut np = weft_datapath::nodeport::NodePort::open(pin_dir, tunnel_ifindex)
        .map_err(|e| e.to_string())?;
    np.attach(ifindex).map_err(|e| e.to_string())?;
    tracing::info!(interface = dev, ifindex, "NodePort programs attached");
    let range = "/proc/sys/net/ipv4/ip_local_port_range";
    if let Some(warning) = std::fs::read_to_string(range)
        .ok()
        .and_then(|text| snat_range_overlap(&text))
    {
        tracing::warn!(file = range, "{warning}");
    }
    Ok(())
}

/// Whether the node's ephemeral port range (`ip_local_port_range`'s text) overlaps the ports
/// NodePort source NAT takes on the node's address: a socket of the node could then hold the
/// same tuple as a source-NATed connection, and one of them would lose its answers.
fn snat_range_overlap(text: &str) -> Option<String> {
    let mut parts = text.split_whitespace().map(str::parse::<u32>);
    let (Some(Ok(lo)), Some(Ok(hi))) = (parts.next(), parts.next()) else {
        return None;
    };
    let snat = weft_datapath::abi::SNAT_PORTS;
    let (s_lo, s_hi) = (u32::from(*snat.start()), u32::from(*snat.end()));
    (lo <= s_hi && s_lo <= hi).then(|| {
        format!(
            "the node's ephemeral ports {lo}-{hi} overlap NodePort source NAT's {s_lo}-{s_hi}: \
             set net.ipv4.ip_local_port_range below {s_lo} (Linux's default is 32768-60999)"
        )
    })
}

/// The node as NodePorts see it: the external interface's addresses and this node's pods.
fn node_view(agent: &Agent<Datapath>, external: Option<&str>) -> crate::services::NodeView {
    let addrs = match external {
        None => Vec::new(),
        Some(dev) => crate::dataplane::interface_addresses()
            .map(|all| {
                all.into_iter()
                    .filter(|(name, ip)| name == dev && !crate::dataplane::is_link_local(ip))
                    .map(|(_, ip)| ip)
                    .collect()
            })
            .unwrap_or_default(),
    };
    let local = agent
        .core()
        .state()
        .endpoints
        .values()
        .flat_map(|r| r.ips.iter().copied())
        .collect();
    crate::services::NodeView { addrs, local }
}

/// One tracing init for the binary: `--log` filter, plain or JSON.
pub fn init_tracing(filter: &str, format: &str) -> Result<(), String> {
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .map_err(|e| format!("--log {filter:?}: {e}"))?;
    // Colour only on a terminal: a file or a log collector gets plain text.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    let result = if format == "json" {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
    result.map_err(|e| format!("initialising logging: {e}"))
}

/// Keeps the compiler honest about the handler being shareable across tasks.
#[allow(dead_code)]
fn assert_send_sync(a: Arc<Agent<Datapath>>) -> impl Send + Sync {
    a
}

#[cfg(test)]
mod tests {
    use super::snat_range_overlap;

    #[test]
    fn an_ephemeral_range_reaching_the_snat_ports_is_reported() {
        assert_eq!(
            snat_range_overlap("32768\t60999\n"),
            None,
            "Linux's default"
        );
        let w = snat_range_overlap("1024 65535").expect("overlaps");
        assert!(w.contains("1024-65535") && w.contains("61000-65535"), "{w}");
        assert!(snat_range_overlap("61000 61000").is_some());
        assert_eq!(snat_range_overlap("garbage"), None);
    }
}

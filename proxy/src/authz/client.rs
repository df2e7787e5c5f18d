//! The controller's `Policy.ServerPolicy` stream: the inbound policy of each port of this
//! workload, kept current.
//!
//! A [`Follower`] keyed by port (the original destination port of inbound connections):
//! the request names the port and the workload (`WEFT_PROXY_NAMESPACE`,
//! `WEFT_PROXY_POD_NAME`); the stream shares the resolver's gRPC channel (the Policy service
//! is served on the Destination port), and the stream rules of [`crate::follow`]: the whole
//! policy first then again at each change, the last good policy kept through controller
//! outages, reconnects with backoff, idle ports dropped after the discovery idle timeout.
//!
//! Before the first answer for a port, connections wait up to the discovery timeout, then
//! get the proxy's fallback (`WEFT_PROXY_INBOUND_DEFAULT_POLICY`), as they do when the
//! controller does not serve ServerPolicy (`UNIMPLEMENTED`). At most [`MAX_PORTS`] ports are
//! followed; connections to further ports are refused (fail closed: `deny`) until others go
//! idle.

use std::sync::Arc;

use tokio::sync::watch;
use tonic::transport::Channel;
use weft_proto::policy::policy_client::PolicyClient;
use weft_proto::policy::{InboundServer, ServerPolicyRequest};

use super::policy::{compile, ServerPolicy};
use crate::config::{DiscoveryConfig, Workload};
use crate::follow::{Follower, Source, StreamMetrics};

/// Ports followed at once.
pub const MAX_PORTS: usize = 1024;

/// The `server` of the policy of ports beyond [`MAX_PORTS`].
pub const OVERFLOW_SERVER: &str = "default:deny (too many ports)";

struct ServerPolicySource {
    client: PolicyClient<Channel>,
    namespace: String,
    pod_name: String,
}

impl Source for ServerPolicySource {
    type Key = u16;
    type Message = InboundServer;
    type Value = ServerPolicy;
    const WHAT: &'static str = "inbound policy";

    fn open(
        &self,
        port: &u16,
    ) -> impl std::future::Future<Output = Result<tonic::Streaming<InboundServer>, tonic::Status>> + Send
    {
        let mut client = self.client.clone();
        let req = ServerPolicyRequest {
            port: u32::from(*port),
            namespace: self.namespace.clone(),
            pod_name: self.pod_name.clone(),
        };
        async move {
            client
                .server_policy(req)
                .await
                .map(tonic::Response::into_inner)
        }
    }

    fn compile(&self, port: &u16, message: &InboundServer) -> (ServerPolicy, Vec<String>) {
        let c = compile(message);
        tracing::debug!(port, server = %c.policy.server, authorizations = c.policy.authorizations.len(), routes = c.policy.routes.len(), audit = c.policy.audit, "inbound policy updated");
        (c.policy, c.problems)
    }
}

/// Port → watch of its inbound policy. Cheap to clone.
#[derive(Clone, Debug)]
pub struct ServerPolicies {
    follower: Follower<ServerPolicySource>,
}

impl ServerPolicies {
    /// A client on `channel` (the resolver's) for `workload`'s ports; `fallback` until the
    /// controller answers.
    pub fn new(
        channel: Channel,
        config: DiscoveryConfig,
        workload: &Workload,
        fallback: Arc<ServerPolicy>,
        metrics: StreamMetrics,
    ) -> Self {
        let source = ServerPolicySource {
            client: PolicyClient::new(channel),
            namespace: workload.namespace.clone(),
            pod_name: workload.pod_name.clone(),
        };
        Self {
            follower: Follower::new(
                source,
                config,
                metrics,
                fallback,
                Arc::new(ServerPolicy::deny(OVERFLOW_SERVER)),
                MAX_PORTS,
            ),
        }
    }

    /// A receiver of `port`'s policy, starting its stream if nobody watches it yet.
    pub fn get(&self, port: u16) -> watch::Receiver<Arc<ServerPolicy>> {
        self.follower.get(&port, || port)
    }

    /// [`ServerPolicies::get`], waiting up to the discovery timeout for the first answer.
    pub async fn ready(&self, port: u16) -> watch::Receiver<Arc<ServerPolicy>> {
        self.follower.ready(&port, || port).await
    }

    /// Ports followed now.
    pub fn len(&self) -> usize {
        self.follower.len()
    }

    pub fn is_empty(&self) -> bool {
        self.follower.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use std::pin::Pin;
    use std::time::{Duration, Instant};

    use futures_util::Stream;
    use tokio::sync::mpsc;
    use tonic::{Request, Response, Status};
    use weft_proto::policy::policy_server::{Policy, PolicyServer};

    use super::*;
    use crate::authz::policy::DefaultPolicy;

    type Tx = mpsc::UnboundedSender<Result<InboundServer, Status>>;
    type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

    /// A controller whose ServerPolicy streams the test drives.
    struct Fake {
        unimplemented: bool,
        streams: mpsc::UnboundedSender<(ServerPolicyRequest, Tx)>,
    }

    #[tonic::async_trait]
    impl Policy for Fake {
        type ServerPolicyStream = BoxStream<InboundServer>;

        async fn server_policy(
            &self,
            req: Request<ServerPolicyRequest>,
        ) -> Result<Response<Self::ServerPolicyStream>, Status> {
            if self.unimplemented {
                return Err(Status::unimplemented("ServerPolicy"));
            }
            let (tx, rx) = mpsc::unbounded_channel();
            let _ = self.streams.send((req.into_inner(), tx));
            let s = futures_util::stream::unfold(rx, |mut rx| async move {
                rx.recv().await.map(|m| (m, rx))
            });
            Ok(Response::new(Box::pin(s)))
        }
    }

    async fn controller(
        unimplemented: bool,
    ) -> (
        ServerPolicies,
        StreamMetrics,
        mpsc::UnboundedReceiver<(ServerPolicyRequest, Tx)>,
    ) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (streams_tx, streams) = mpsc::unbounded_channel();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(PolicyServer::new(Fake {
                    unimplemented,
                    streams: streams_tx,
                }))
                .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
        );
        let mut config = DiscoveryConfig::new(addr.to_string());
        config.timeout = Duration::from_millis(500);
        config.backoff_max = Duration::from_millis(200);
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect_lazy();
        let workload = Workload {
            namespace: "shop".into(),
            pod_name: "api-0".into(),
            service_account: "api".into(),
        };
        let metrics = StreamMetrics::default();
        let policies = ServerPolicies::new(
            channel,
            config,
            &workload,
            Arc::new(ServerPolicy::fallback(DefaultPolicy::Deny)),
            metrics.clone(),
        );
        (policies, metrics, streams)
    }

    fn server(source: &str) -> InboundServer {
        InboundServer {
            source: source.into(),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn follows_each_port_and_keeps_the_last_policy() {
        let (policies, metrics, mut streams) = controller(false).await;
        let rx = policies.get(8080);
        assert_eq!(
            &*rx.borrow().server,
            "default:deny",
            "the fallback until an answer"
        );
        let (req, stream) = streams.recv().await.unwrap();
        assert_eq!(
            req,
            ServerPolicyRequest {
                port: 8080,
                namespace: "shop".into(),
                pod_name: "api-0".into()
            }
        );
        stream.send(Ok(server("server/shop/api"))).unwrap();
        let mut rx = policies.ready(8080).await;
        assert_eq!(&*rx.borrow_and_update().server, "server/shop/api");
        // The stream breaks: the policy stays and the client reconnects.
        stream.send(Err(Status::unavailable("restarting"))).unwrap();
        let (_, stream) = tokio::time::timeout(Duration::from_secs(5), streams.recv())
            .await
            .expect("a reconnect")
            .unwrap();
        assert_eq!(&*rx.borrow().server, "server/shop/api");
        stream.send(Ok(server("server/shop/api-v2"))).unwrap();
        tokio::time::timeout(Duration::from_secs(5), rx.changed())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(&*rx.borrow().server, "server/shop/api-v2");
        assert_eq!(metrics.stream_connects.get(), 2);
        // Another port is another stream.
        let _other = policies.get(9090);
        let (req, _) = streams.recv().await.unwrap();
        assert_eq!(req.port, 9090);
        assert_eq!(policies.len(), 2);
        assert_eq!(metrics.streams.get(), 2);
    }

    #[tokio::test]
    async fn a_controller_without_server_policy_means_the_fallback_at_once() {
        let (policies, _, _streams) = controller(true).await;
        let start = Instant::now();
        let rx = policies.ready(8080).await;
        assert!(
            start.elapsed() < Duration::from_millis(450),
            "{:?}",
            start.elapsed()
        );
        assert_eq!(&*rx.borrow().server, "default:deny");
    }
}

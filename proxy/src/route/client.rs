//! The controller's `Destination.ClientPolicy` stream: a target's outbound policy, kept
//! current.
//!
//! A [`Follower`] of ClientPolicy (see [`crate::follow`] for the stream rules it shares with
//! the inbound ServerPolicy client): one stream per target on the resolver's gRPC channel,
//! every message a whole policy compiled once ([`super::policy::compile`]), the last good
//! policy kept through controller outages, idle targets dropped.
//!
//! Until the first answer a target has the default policy (no service: not a service address,
//! so requests are routed by authority, as without ClientPolicy); [`Policies::ready`] waits for that answer up to the discovery
//! timeout. A controller that predates ClientPolicy answers `UNIMPLEMENTED`: that means "no
//! policy" (the default), asked again only every [`UNIMPLEMENTED_RETRY`]. A controller that
//! rejects the target (`INVALID_ARGUMENT`) also gets the default.
//!
//! Problems compiling a policy (a bad regex in one route, ...) are logged once each, at warn,
//! when they first appear in a target's stream, and counted.

use std::sync::Arc;

use prometheus_client::registry::Registry;
use tokio::sync::watch;
use tonic::transport::Channel;
use weft_proto::destination::destination_client::DestinationClient;
use weft_proto::destination::{CallerContext, ClientPolicyRequest, OutboundPolicy};

use super::policy::{compile, Policy};
use crate::discovery::{Resolver, MAX_RESOLUTIONS};
pub use crate::follow::UNIMPLEMENTED_RETRY;
use crate::follow::{Follower, Source, StreamMetrics, StreamNames};

/// Policies kept at once; targets beyond this get the default policy until others go idle.
pub const MAX_POLICIES: usize = MAX_RESOLUTIONS;

/// ClientPolicy streams and what they brought (`streams`: targets with a live stream).
pub type PolicyMetrics = StreamMetrics;

/// Registers the ClientPolicy stream metrics under their `weft_policy_*` names.
pub fn register(metrics: &PolicyMetrics, registry: &mut Registry) {
    metrics.register_as(
        registry,
        StreamNames {
            streams: (
                "weft_policy_targets",
                "Targets whose outbound policy the proxy currently follows",
            ),
            connects: (
                "weft_policy_stream_connects",
                "ClientPolicy streams opened to the controller (including reconnects)",
            ),
            errors: (
                "weft_policy_stream_errors",
                "ClientPolicy streams that failed or could not be opened",
            ),
            updates: (
                "weft_policy_updates",
                "Outbound policies received from the controller",
            ),
            problems: (
                "weft_policy_problems",
                "Routes or settings of received policies that were left out because they did not convert",
            ),
        },
    );
}

/// How ClientPolicy streams are opened and compiled.
struct ClientPolicySource {
    client: DestinationClient<Channel>,
    context: CallerContext,
}

impl Source for ClientPolicySource {
    type Key = Arc<str>;
    type Message = OutboundPolicy;
    type Value = Policy;
    const WHAT: &'static str = "outbound policy";

    fn open(
        &self,
        target: &Arc<str>,
    ) -> impl std::future::Future<Output = Result<tonic::Streaming<OutboundPolicy>, tonic::Status>> + Send
    {
        let mut client = self.client.clone();
        let req = ClientPolicyRequest {
            target: target.to_string(),
            context: Some(self.context.clone()),
        };
        async move {
            client
                .client_policy(req)
                .await
                .map(tonic::Response::into_inner)
        }
    }

    fn compile(&self, target: &Arc<str>, message: &OutboundPolicy) -> (Policy, Vec<String>) {
        let compiled = compile(message);
        tracing::debug!(%target, source = %compiled.policy.source, routes = compiled.policy.routes.len(), "policy updated");
        let problems = compiled.problems.iter().map(|p| p.to_string()).collect();
        (compiled.policy, problems)
    }
}

/// The proxy's ClientPolicy client: target → watch of its policy. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Policies {
    follower: Follower<ClientPolicySource>,
}

impl Policies {
    /// A client on `resolver`'s channel (one HTTP/2 connection to the controller for both
    /// streams), with its caller context and timeouts.
    pub fn new(resolver: &Resolver, metrics: PolicyMetrics) -> Self {
        let (client, context) = resolver.client();
        let default = Arc::new(Policy::default());
        Self {
            follower: Follower::new(
                ClientPolicySource { client, context },
                resolver.config().clone(),
                metrics,
                default.clone(),
                default,
                MAX_POLICIES,
            ),
        }
    }

    /// A receiver of `target`'s policy (`svc.ns:80`, `10.96.0.10:80`: the authority the
    /// application addressed), starting its stream if nobody watches it yet. It holds the
    /// default policy until the controller answers. Beyond [`MAX_POLICIES`] targets: a
    /// receiver of the default policy that never changes.
    pub fn get(&self, target: &str) -> watch::Receiver<Arc<Policy>> {
        self.follower.get(target, || Arc::from(target))
    }

    /// [`Policies::get`], waiting up to the discovery timeout for the controller's first
    /// answer when there is none yet.
    pub async fn ready(&self, target: &str) -> watch::Receiver<Arc<Policy>> {
        self.follower.ready(target, || Arc::from(target)).await
    }

    /// Targets followed now.
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
    use std::sync::atomic::AtomicUsize;
    use std::sync::atomic::Ordering;
    use std::time::Duration;
    use std::time::Instant;

    use futures_util::Stream;
    use tokio::sync::mpsc;
    use tonic::{Request, Response, Status};
    use weft_proto::destination::destination_server::{Destination, DestinationServer};
    use weft_proto::destination::{ResolveRequest, Update};

    use super::*;
    use crate::config::{DiscoveryConfig, Workload};
    use crate::metrics::DiscoveryMetrics;
    use crate::route::test_util::{on, policy, prefix, regex};

    type Tx = mpsc::UnboundedSender<Result<OutboundPolicy, Status>>;
    type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

    /// A controller whose ClientPolicy streams the test drives: each call hands the test a
    /// sender, or answers UNIMPLEMENTED like a controller older than ClientPolicy.
    struct Fake {
        calls: Arc<AtomicUsize>,
        unimplemented: bool,
        streams: mpsc::UnboundedSender<Tx>,
    }

    #[tonic::async_trait]
    impl Destination for Fake {
        type ResolveStream = BoxStream<Update>;
        type ClientPolicyStream = BoxStream<OutboundPolicy>;

        async fn resolve(
            &self,
            _: Request<ResolveRequest>,
        ) -> Result<Response<Self::ResolveStream>, Status> {
            Err(Status::unimplemented("not in this test"))
        }

        async fn client_policy(
            &self,
            req: Request<ClientPolicyRequest>,
        ) -> Result<Response<Self::ClientPolicyStream>, Status> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            assert_eq!(req.get_ref().target, "svc.ns:80");
            if self.unimplemented {
                return Err(Status::unimplemented("ClientPolicy"));
            }
            let (tx, rx) = mpsc::unbounded_channel();
            let _ = self.streams.send(tx);
            let s = futures_util::stream::unfold(rx, |mut rx| async move {
                rx.recv().await.map(|m| (m, rx))
            });
            Ok(Response::new(Box::pin(s)))
        }
    }

    struct Controller {
        calls: Arc<AtomicUsize>,
        streams: mpsc::UnboundedReceiver<Tx>,
        policies: Policies,
        metrics: PolicyMetrics,
    }

    async fn controller(unimplemented: bool) -> Controller {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let calls = Arc::new(AtomicUsize::new(0));
        let (streams_tx, streams) = mpsc::unbounded_channel();
        let fake = Fake {
            calls: calls.clone(),
            unimplemented,
            streams: streams_tx,
        };
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(DestinationServer::new(fake))
                .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
        );
        Controller {
            calls,
            streams,
            ..client(&addr.to_string())
        }
    }

    fn client(addr: &str) -> Controller {
        let mut config = DiscoveryConfig::new(addr);
        config.timeout = Duration::from_millis(500);
        config.backoff_max = Duration::from_millis(200);
        config.plaintext = true;
        let resolver = Resolver::new(
            config,
            &Workload::default(),
            DiscoveryMetrics::default(),
            None,
        )
        .unwrap();
        let metrics = PolicyMetrics::default();
        Controller {
            calls: Arc::default(),
            streams: mpsc::unbounded_channel().1,
            policies: Policies::new(&resolver, metrics.clone()),
            metrics,
        }
    }

    fn labels(p: &Policy) -> Vec<&str> {
        p.routes.iter().map(|r| &*r.label).collect()
    }

    async fn changed(rx: &mut watch::Receiver<Arc<Policy>>) -> Arc<Policy> {
        tokio::time::timeout(Duration::from_secs(5), rx.changed())
            .await
            .expect("a policy within 5 s")
            .expect("sender alive");
        rx.borrow_and_update().clone()
    }

    #[tokio::test]
    async fn follows_the_stream_keeps_the_last_policy_and_reconnects() {
        let mut c = controller(false).await;
        let rx = c.policies.get("svc.ns:80");
        assert!(rx.borrow().service.is_none(), "the default until an answer");
        let stream = c.streams.recv().await.unwrap();
        stream.send(Ok(policy(&["a"], vec![on(0, None)]))).unwrap();
        let mut rx = c.policies.ready("svc.ns:80").await;
        assert_eq!(labels(&rx.borrow_and_update()), ["httproute/ns/a/0"]);

        // A new policy replaces the old one whole.
        stream
            .send(Ok(policy(&["b", "c"], vec![on(1, None)])))
            .unwrap();
        assert_eq!(
            labels(&*changed(&mut rx).await),
            ["httproute/ns/b/0", "httproute/ns/c/0"]
        );

        // The stream breaks: the policy stays, and the client reconnects.
        stream
            .send(Err(Status::unavailable("controller restarting")))
            .unwrap();
        let stream = tokio::time::timeout(Duration::from_secs(5), c.streams.recv())
            .await
            .expect("a reconnect within 5 s")
            .unwrap();
        assert_eq!(
            labels(&rx.borrow()),
            ["httproute/ns/b/0", "httproute/ns/c/0"]
        );
        assert!(!rx.has_changed().unwrap());
        // The same policy again (a reconnect's full state) changes nothing; a new one does.
        stream
            .send(Ok(policy(&["b", "c"], vec![on(1, None)])))
            .unwrap();
        stream.send(Ok(policy(&["d"], vec![on(0, None)]))).unwrap();
        assert_eq!(labels(&*changed(&mut rx).await), ["httproute/ns/d/0"]);
        assert_eq!(c.metrics.stream_connects.get(), 2);
        assert_eq!(c.metrics.updates.get(), 4);
        assert_eq!(c.policies.len(), 1);
        assert_eq!(c.calls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_bad_route_is_dropped_and_counted_once() {
        let mut c = controller(false).await;
        let mut rx = c.policies.get("svc.ns:80");
        let stream = c.streams.recv().await.unwrap();
        let bad = policy(
            &["good", "bad"],
            vec![on(1, regex("(")), on(0, prefix("/"))],
        );
        stream.send(Ok(bad.clone())).unwrap();
        assert_eq!(labels(&*changed(&mut rx).await), ["httproute/ns/good/0"]);
        // Sent again with another change: the same problem is not counted (or logged) again.
        let mut again = bad;
        again.source = "httproute/ns/edited".into();
        stream.send(Ok(again)).unwrap();
        assert_eq!(&*changed(&mut rx).await.source, "httproute/ns/edited");
        assert_eq!(c.metrics.problems.get(), 1);
    }

    #[tokio::test]
    async fn unimplemented_is_the_default_policy_without_waiting_or_retrying_hard() {
        let c = controller(true).await;
        let start = Instant::now();
        let rx = c.policies.ready("svc.ns:80").await;
        assert!(
            start.elapsed() < Duration::from_millis(450),
            "{:?}",
            start.elapsed()
        );
        assert!(rx.borrow().service.is_none());
        assert!(!rx.borrow().routed);
        // Asked again only after UNIMPLEMENTED_RETRY, not at the backoff's pace.
        tokio::time::sleep(Duration::from_millis(600)).await;
        assert_eq!(c.calls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn an_unreachable_controller_leaves_the_default_policy_after_the_timeout() {
        // A port nobody listens on.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let c = client(&format!("127.0.0.1:{port}"));
        let start = Instant::now();
        let rx = c.policies.ready("svc.ns:80").await;
        assert!(
            start.elapsed() < Duration::from_secs(2),
            "{:?}",
            start.elapsed()
        );
        assert!(rx.borrow().service.is_none());
        // A second caller does not wait again.
        let start = Instant::now();
        let _ = c.policies.ready("svc.ns:80").await;
        assert!(start.elapsed() < Duration::from_millis(100));
        assert!(c.metrics.stream_errors.get() >= 1);
    }
}

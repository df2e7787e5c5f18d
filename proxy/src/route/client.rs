//! The controller's `Destination.ClientPolicy` stream: a target's outbound policy, kept
//! current.
//!
//! It mirrors the Resolve client ([`crate::discovery`]) and shares its gRPC channel, backoff
//! and idle rules: one background task and one `tokio::sync::watch` of `Arc<Policy>` per
//! target, started by the first [`Policies::get`]; every message of the stream is a whole
//! policy, compiled once ([`super::policy::compile`]) and swapped in atomically; when the
//! stream breaks or the controller goes away the last good policy stays and the task
//! reconnects with jittered backoff; a target nobody watches is dropped after the idle timeout.
//!
//! Until the first answer a target has the default policy (no service: route by authority,
//! as without ClientPolicy); [`Policies::ready`] waits for that answer up to the discovery
//! timeout. A controller that predates ClientPolicy answers `UNIMPLEMENTED`: that means "no
//! policy" (the default), logged once per target at debug, and asked again only every
//! [`UNIMPLEMENTED_RETRY`]. A controller that rejects the target (`INVALID_ARGUMENT`) also
//! gets the default.
//!
//! Problems compiling a policy (a bad regex in one route, ...) are logged once each, at warn,
//! when they first appear in a target's stream, and counted.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::sync::watch;
use tonic::transport::Channel;
use weft_proto::destination::destination_client::DestinationClient;
use weft_proto::destination::{CallerContext, ClientPolicyRequest, OutboundPolicy};

use super::policy::{compile, Policy};
use crate::config::DiscoveryConfig;
use crate::discovery::{idle, Backoff, Resolver, BACKOFF_MIN, MAX_RESOLUTIONS};

/// Policies kept at once; targets beyond this get the default policy until others go idle.
pub const MAX_POLICIES: usize = MAX_RESOLUTIONS;

/// How often a controller that answered `UNIMPLEMENTED` is asked again (it may be upgraded).
pub const UNIMPLEMENTED_RETRY: Duration = Duration::from_secs(30);

/// ClientPolicy streams and what they brought.
#[derive(Clone, Debug, Default)]
pub struct PolicyMetrics {
    /// Targets with a live policy stream.
    pub policies: Gauge,
    pub stream_connects: Counter,
    pub stream_errors: Counter,
    /// Policies received (each a whole policy).
    pub updates: Counter,
    /// Routes or settings left out of a received policy because they did not convert.
    pub problems: Counter,
}

impl PolicyMetrics {
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "weft_policy_targets",
            "Targets whose outbound policy the proxy currently follows",
            self.policies.clone(),
        );
        registry.register(
            "weft_policy_stream_connects",
            "ClientPolicy streams opened to the controller (including reconnects)",
            self.stream_connects.clone(),
        );
        registry.register(
            "weft_policy_stream_errors",
            "ClientPolicy streams that failed or could not be opened",
            self.stream_errors.clone(),
        );
        registry.register(
            "weft_policy_updates",
            "Outbound policies received from the controller",
            self.updates.clone(),
        );
        registry.register(
            "weft_policy_problems",
            "Routes or settings of received policies that were left out because they did not convert",
            self.problems.clone(),
        );
    }
}

struct Entry {
    tx: Arc<watch::Sender<Arc<Policy>>>,
    /// The controller answered (or could not be reached) at least once.
    settled: Arc<AtomicBool>,
}

struct Inner {
    client: DestinationClient<Channel>,
    context: CallerContext,
    config: DiscoveryConfig,
    metrics: PolicyMetrics,
    targets: Mutex<HashMap<Arc<str>, Entry>>,
    default: Arc<Policy>,
}

/// The proxy's ClientPolicy client: target → watch of its policy. Cheap to clone.
#[derive(Clone)]
pub struct Policies {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Policies {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Policies")
            .field("addr", &self.inner.config.addr)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Policies {
    /// A client on `resolver`'s channel (one HTTP/2 connection to the controller for both
    /// streams), with its caller context and timeouts.
    pub fn new(resolver: &Resolver, metrics: PolicyMetrics) -> Self {
        let (client, context) = resolver.client();
        Self {
            inner: Arc::new(Inner {
                client,
                context,
                config: resolver.config().clone(),
                metrics,
                targets: Mutex::new(HashMap::new()),
                default: Arc::new(Policy::default()),
            }),
        }
    }

    /// A receiver of `target`'s policy (`svc.ns:80`, `10.96.0.10:80`: the authority the
    /// application addressed), starting its stream if nobody watches it yet. It holds the
    /// default policy until the controller answers. Beyond [`MAX_POLICIES`] targets: a
    /// receiver of the default policy that never changes.
    pub fn get(&self, target: &str) -> watch::Receiver<Arc<Policy>> {
        self.entry(target).0
    }

    /// [`Policies::get`], waiting up to the discovery timeout for the controller's first
    /// answer when there is none yet.
    pub async fn ready(&self, target: &str) -> watch::Receiver<Arc<Policy>> {
        let (mut rx, settled) = self.entry(target);
        if !settled.load(Ordering::Acquire) {
            let _ = tokio::time::timeout(self.inner.config.timeout, rx.changed()).await;
        }
        rx
    }

    fn entry(&self, target: &str) -> (watch::Receiver<Arc<Policy>>, Arc<AtomicBool>) {
        let mut targets = lock(&self.inner.targets);
        if let Some(e) = targets.get(target) {
            return (e.tx.subscribe(), e.settled.clone());
        }
        if targets.len() >= MAX_POLICIES {
            let (_, rx) = watch::channel(self.inner.default.clone());
            return (rx, Arc::new(AtomicBool::new(true)));
        }
        let (tx, rx) = watch::channel(self.inner.default.clone());
        let tx = Arc::new(tx);
        let settled = Arc::new(AtomicBool::new(false));
        let key: Arc<str> = Arc::from(target);
        targets.insert(
            key.clone(),
            Entry {
                tx: tx.clone(),
                settled: settled.clone(),
            },
        );
        self.inner.metrics.policies.inc();
        let inner = self.inner.clone();
        let task_settled = settled.clone();
        tokio::spawn(async move {
            run_target(&inner, &key, &tx, &task_settled).await;
            inner.metrics.policies.dec();
            tracing::debug!(target = %key, "policy dropped");
        });
        (rx, settled)
    }

    /// Targets followed now.
    pub fn len(&self) -> usize {
        lock(&self.inner.targets).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// What one target's task remembers across reconnects.
struct Stream<'a> {
    inner: &'a Inner,
    target: &'a Arc<str>,
    tx: &'a watch::Sender<Arc<Policy>>,
    settled: &'a AtomicBool,
    backoff: Backoff,
    /// The last policy received, as sent: a reconnect's identical first message changes nothing.
    last: Option<OutboundPolicy>,
    /// Problems already logged for this target.
    logged: HashSet<String>,
    unimplemented_logged: bool,
}

/// One target's life: streams, reconnects, until idle.
async fn run_target(
    inner: &Inner,
    target: &Arc<str>,
    tx: &watch::Sender<Arc<Policy>>,
    settled: &AtomicBool,
) {
    let mut s = Stream {
        inner,
        target,
        tx,
        settled,
        backoff: Backoff::new(BACKOFF_MIN, inner.config.backoff_max.max(BACKOFF_MIN)),
        last: None,
        logged: HashSet::new(),
        unimplemented_logged: false,
    };
    loop {
        let idle_timeout = inner.config.idle_timeout;
        tokio::select! {
            () = s.stream() => {}
            () = idle(tx, idle_timeout) => {
                // Under the map lock, where receivers are handed out (see discovery).
                let mut targets = lock(&inner.targets);
                if tx.receiver_count() == 0 {
                    targets.remove(target);
                    return;
                }
            }
        }
    }
}

impl Stream<'_> {
    /// Marks the first answer (or failure), waking [`Policies::ready`] waiters.
    fn settle(&self) {
        if !self.settled.swap(true, Ordering::AcqRel) {
            self.tx.send_modify(|_| {});
        }
    }

    /// Back to the default policy (no policy from this controller).
    fn use_default(&mut self) {
        self.last = None;
        let default = &self.inner.default;
        self.tx.send_if_modified(|p| {
            let changed = !Arc::ptr_eq(p, default);
            *p = default.clone();
            changed
        });
        self.settle();
    }

    fn apply(&mut self, pb: OutboundPolicy) {
        let m = &self.inner.metrics;
        m.updates.inc();
        if self.last.as_ref() == Some(&pb) {
            self.settle();
            return;
        }
        let compiled = compile(&pb);
        let target = self.target;
        let mut now = HashSet::with_capacity(compiled.problems.len());
        for p in &compiled.problems {
            let msg = p.to_string();
            if !self.logged.contains(&msg) {
                m.problems.inc();
                tracing::warn!(%target, source = %compiled.policy.source, problem = %msg, "outbound policy: part of it could not be used");
            }
            now.insert(msg);
        }
        // A problem fixed and then made again is logged again.
        self.logged = now;
        tracing::debug!(%target, source = %compiled.policy.source, routes = compiled.policy.routes.len(), "policy updated");
        self.tx.send_replace(Arc::new(compiled.policy));
        self.last = Some(pb);
        self.settle();
    }

    /// Streams until the stream fails, then sleeps the backoff; returns to be called again.
    async fn stream(&mut self) {
        let m = &self.inner.metrics;
        let target = self.target;
        let mut client = self.inner.client.clone();
        let req = ClientPolicyRequest {
            target: target.to_string(),
            context: Some(self.inner.context.clone()),
        };
        let mut delay = None;
        match client.client_policy(req).await {
            Ok(rsp) => {
                m.stream_connects.inc();
                let mut stream = rsp.into_inner();
                let mut first = true;
                loop {
                    match stream.message().await {
                        Ok(Some(p)) => {
                            if first {
                                self.backoff.reset();
                                first = false;
                            }
                            self.apply(p);
                        }
                        Ok(None) => {
                            tracing::info!(%target, "policy stream ended by the controller; reconnecting (keeping the last policy)");
                            break;
                        }
                        Err(status) => {
                            m.stream_errors.inc();
                            tracing::info!(%target, code = ?status.code(), message = status.message(), "policy stream failed; reconnecting (keeping the last policy)");
                            break;
                        }
                    }
                }
            }
            Err(status) if status.code() == tonic::Code::Unimplemented => {
                if !self.unimplemented_logged {
                    self.unimplemented_logged = true;
                    tracing::debug!(%target, "the controller does not serve ClientPolicy (older than this proxy); default routing");
                }
                self.use_default();
                delay = Some(UNIMPLEMENTED_RETRY);
            }
            Err(status) if status.code() == tonic::Code::InvalidArgument => {
                m.stream_errors.inc();
                tracing::debug!(%target, message = status.message(), "controller rejected the policy target; default routing");
                self.use_default();
            }
            Err(status) => {
                m.stream_errors.inc();
                tracing::info!(%target, addr = %self.inner.config.addr, code = ?status.code(), message = status.message(), "cannot get the outbound policy: is the controller reachable at WEFT_PROXY_DESTINATION_ADDR? (keeping the last policy)");
                self.settle();
            }
        }
        let backoff = self.backoff.next_delay(fastrand::f64());
        tokio::time::sleep(delay.map_or(backoff, |d| d.max(backoff))).await;
    }
}

#[cfg(test)]
mod tests {
    use std::pin::Pin;
    use std::sync::atomic::AtomicUsize;
    use std::time::Instant;

    use futures_util::Stream;
    use tokio::sync::mpsc;
    use tonic::{Request, Response, Status};
    use weft_proto::destination::destination_server::{Destination, DestinationServer};
    use weft_proto::destination::{ResolveRequest, Update};

    use super::*;
    use crate::config::Workload;
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
        let resolver =
            Resolver::new(config, &Workload::default(), DiscoveryMetrics::default()).unwrap();
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

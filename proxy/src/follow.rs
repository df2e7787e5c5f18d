//! Following one controller stream per key: the machinery the outbound ClientPolicy client
//! ([`crate::route::client`]) and the inbound ServerPolicy client ([`crate::authz::client`])
//! share, written once.
//!
//! It mirrors the Resolve client ([`crate::discovery`]) and shares its gRPC channel, backoff
//! and idle rules: one background task and one `tokio::sync::watch` of `Arc<Value>` per key,
//! started by the first [`Follower::get`]; every message of the stream is a whole state,
//! compiled once ([`Source::compile`]) and swapped in atomically; when the stream breaks or
//! the controller goes away the last good value stays and the task reconnects with jittered
//! backoff; a key nobody watches is dropped after the idle timeout.
//!
//! Until the first answer a key has the default value; [`Follower::ready`] waits for that
//! answer up to the discovery timeout. A controller that predates the stream answers
//! `UNIMPLEMENTED`: that means the default, logged once per key at debug, and asked again
//! only every [`UNIMPLEMENTED_RETRY`]. A controller that rejects the key (`INVALID_ARGUMENT`)
//! also gets the default. Keys beyond the bound get the overflow value, which never changes.
//!
//! Problems compiling a message (a bad regex in one route, ...) are logged once each, at
//! warn, when they first appear in a key's stream, and counted.

use std::borrow::Borrow;
use std::collections::{HashMap, HashSet};
use std::fmt;
use std::future::Future;
use std::hash::Hash;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::sync::watch;

use crate::config::DiscoveryConfig;
use crate::discovery::{idle, Backoff, BACKOFF_MIN};

/// How often a controller that answered `UNIMPLEMENTED` is asked again (it may be upgraded).
pub const UNIMPLEMENTED_RETRY: Duration = Duration::from_secs(30);

/// One kind of stream: how to open it for a key and what its messages become.
pub trait Source: Send + Sync + 'static {
    type Key: Clone + Eq + Hash + fmt::Display + Send + Sync + 'static;
    /// One whole state, as sent.
    type Message: PartialEq + Send + 'static;
    type Value: Send + Sync + 'static;
    /// For logs: "outbound policy", "inbound policy".
    const WHAT: &'static str;

    fn open(
        &self,
        key: &Self::Key,
    ) -> impl Future<Output = Result<tonic::Streaming<Self::Message>, tonic::Status>> + Send;

    /// The value of one message and the problems found in it (logged once each).
    fn compile(&self, key: &Self::Key, message: &Self::Message) -> (Self::Value, Vec<String>);
}

/// The streams of one [`Source`] and what they brought.
#[derive(Clone, Debug, Default)]
pub struct StreamMetrics {
    /// Keys with a live stream.
    pub streams: Gauge,
    pub stream_connects: Counter,
    pub stream_errors: Counter,
    /// Messages received (each a whole state).
    pub updates: Counter,
    /// Parts of received messages left out because they did not convert.
    pub problems: Counter,
}

/// Metric names and help of one [`StreamMetrics`].
pub struct StreamNames {
    /// The gauge of live streams, and its help.
    pub streams: (&'static str, &'static str),
    pub connects: (&'static str, &'static str),
    pub errors: (&'static str, &'static str),
    pub updates: (&'static str, &'static str),
    pub problems: (&'static str, &'static str),
}

impl StreamMetrics {
    pub fn register_as(&self, registry: &mut Registry, n: StreamNames) {
        registry.register(n.streams.0, n.streams.1, self.streams.clone());
        registry.register(n.connects.0, n.connects.1, self.stream_connects.clone());
        registry.register(n.errors.0, n.errors.1, self.stream_errors.clone());
        registry.register(n.updates.0, n.updates.1, self.updates.clone());
        registry.register(n.problems.0, n.problems.1, self.problems.clone());
    }
}

struct Entry<V> {
    tx: Arc<watch::Sender<Arc<V>>>,
    /// The controller answered (or could not be reached) at least once.
    settled: Arc<AtomicBool>,
}

struct Inner<S: Source> {
    source: S,
    config: DiscoveryConfig,
    metrics: StreamMetrics,
    keys: Mutex<HashMap<S::Key, Entry<S::Value>>>,
    default: Arc<S::Value>,
    overflow: Arc<S::Value>,
    max: usize,
}

/// Key → watch of its value, kept current from the controller. Cheap to clone.
pub struct Follower<S: Source> {
    inner: Arc<Inner<S>>,
}

impl<S: Source> Clone for Follower<S> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
        }
    }
}

impl<S: Source> fmt::Debug for Follower<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Follower")
            .field("what", &S::WHAT)
            .field("addr", &self.inner.config.addr)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl<S: Source> Follower<S> {
    /// `default`: the value before the first answer and when the controller has none;
    /// `overflow`: the value of keys beyond `max`.
    pub fn new(
        source: S,
        config: DiscoveryConfig,
        metrics: StreamMetrics,
        default: Arc<S::Value>,
        overflow: Arc<S::Value>,
        max: usize,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                source,
                config,
                metrics,
                keys: Mutex::new(HashMap::new()),
                default,
                overflow,
                max,
            }),
        }
    }

    pub fn config(&self) -> &DiscoveryConfig {
        &self.inner.config
    }

    /// A receiver of `key`'s value, starting its stream if nobody watches it yet (`make`
    /// builds the owned key then).
    pub fn get<Q>(&self, key: &Q, make: impl FnOnce() -> S::Key) -> watch::Receiver<Arc<S::Value>>
    where
        S::Key: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.entry(key, make).0
    }

    /// [`Follower::get`], waiting up to the discovery timeout for the controller's first
    /// answer when there is none yet.
    pub async fn ready<Q>(
        &self,
        key: &Q,
        make: impl FnOnce() -> S::Key,
    ) -> watch::Receiver<Arc<S::Value>>
    where
        S::Key: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let (mut rx, settled) = self.entry(key, make);
        if !settled.load(Ordering::Acquire) {
            let _ = tokio::time::timeout(self.inner.config.timeout, rx.changed()).await;
        }
        rx
    }

    fn entry<Q>(
        &self,
        key: &Q,
        make: impl FnOnce() -> S::Key,
    ) -> (watch::Receiver<Arc<S::Value>>, Arc<AtomicBool>)
    where
        S::Key: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let mut keys = lock(&self.inner.keys);
        if let Some(e) = keys.get(key) {
            return (e.tx.subscribe(), e.settled.clone());
        }
        if keys.len() >= self.inner.max {
            let (_, rx) = watch::channel(self.inner.overflow.clone());
            return (rx, Arc::new(AtomicBool::new(true)));
        }
        let (tx, rx) = watch::channel(self.inner.default.clone());
        let tx = Arc::new(tx);
        let settled = Arc::new(AtomicBool::new(false));
        let key = make();
        keys.insert(
            key.clone(),
            Entry {
                tx: tx.clone(),
                settled: settled.clone(),
            },
        );
        self.inner.metrics.streams.inc();
        let inner = self.inner.clone();
        let task_settled = settled.clone();
        tokio::spawn(async move {
            run_key(&inner, &key, &tx, &task_settled).await;
            inner.metrics.streams.dec();
            tracing::debug!(key = %key, what = S::WHAT, "stream dropped");
        });
        (rx, settled)
    }

    /// Keys followed now.
    pub fn len(&self) -> usize {
        lock(&self.inner.keys).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// What one key's task remembers across reconnects.
struct Stream<'a, S: Source> {
    inner: &'a Inner<S>,
    key: &'a S::Key,
    tx: &'a watch::Sender<Arc<S::Value>>,
    settled: &'a AtomicBool,
    backoff: Backoff,
    /// The last message received, as sent: a reconnect's identical first message changes
    /// nothing.
    last: Option<S::Message>,
    /// Problems already logged for this key.
    logged: HashSet<String>,
    unimplemented_logged: bool,
}

/// One key's life: streams, reconnects, until idle.
async fn run_key<S: Source>(
    inner: &Inner<S>,
    key: &S::Key,
    tx: &watch::Sender<Arc<S::Value>>,
    settled: &AtomicBool,
) {
    let mut s = Stream {
        inner,
        key,
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
                let mut keys = lock(&inner.keys);
                if tx.receiver_count() == 0 {
                    keys.remove(key);
                    return;
                }
            }
        }
    }
}

impl<S: Source> Stream<'_, S> {
    /// Marks the first answer (or failure), waking [`Follower::ready`] waiters.
    fn settle(&self) {
        if !self.settled.swap(true, Ordering::AcqRel) {
            self.tx.send_modify(|_| {});
        }
    }

    /// Back to the default value (nothing from this controller).
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

    fn apply(&mut self, message: S::Message) {
        let m = &self.inner.metrics;
        m.updates.inc();
        if self.last.as_ref() == Some(&message) {
            self.settle();
            return;
        }
        let key = self.key;
        let (value, problems) = self.inner.source.compile(key, &message);
        let mut now = HashSet::with_capacity(problems.len());
        for p in problems {
            if !self.logged.contains(&p) {
                m.problems.inc();
                tracing::warn!(%key, what = S::WHAT, problem = %p, "part of the policy could not be used");
            }
            now.insert(p);
        }
        // A problem fixed and then made again is logged again.
        self.logged = now;
        self.tx.send_replace(Arc::new(value));
        self.last = Some(message);
        self.settle();
    }

    /// Streams until the stream fails, then sleeps the backoff; returns to be called again.
    async fn stream(&mut self) {
        let m = &self.inner.metrics;
        let key = self.key;
        let what = S::WHAT;
        let mut delay = None;
        match self.inner.source.open(key).await {
            Ok(mut stream) => {
                m.stream_connects.inc();
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
                            tracing::info!(%key, what, "stream ended by the controller; reconnecting (keeping the last state)");
                            break;
                        }
                        Err(status) => {
                            m.stream_errors.inc();
                            tracing::info!(%key, what, code = ?status.code(), message = status.message(), "stream failed; reconnecting (keeping the last state)");
                            break;
                        }
                    }
                }
            }
            Err(status) if status.code() == tonic::Code::Unimplemented => {
                if !self.unimplemented_logged {
                    self.unimplemented_logged = true;
                    tracing::debug!(%key, what, "the controller does not serve this stream (older than this proxy); using the default");
                }
                self.use_default();
                delay = Some(UNIMPLEMENTED_RETRY);
            }
            Err(status) if status.code() == tonic::Code::InvalidArgument => {
                m.stream_errors.inc();
                tracing::debug!(%key, what, message = status.message(), "controller rejected the key; using the default");
                self.use_default();
            }
            Err(status) => {
                m.stream_errors.inc();
                tracing::info!(%key, what, addr = %self.inner.config.addr, code = ?status.code(), message = status.message(), "cannot get the policy: is the controller reachable at WEFT_PROXY_DESTINATION_ADDR? (keeping the last state)");
                self.settle();
            }
        }
        let backoff = self.backoff.next_delay(fastrand::f64());
        tokio::time::sleep(delay.map_or(backoff, |d| d.max(backoff))).await;
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;

    /// A source whose controller never serves the stream.
    struct Unimplemented;

    impl Source for Unimplemented {
        type Key = u16;
        type Message = ();
        type Value = &'static str;
        const WHAT: &'static str = "test";

        async fn open(&self, _: &u16) -> Result<tonic::Streaming<()>, tonic::Status> {
            Err(tonic::Status::unimplemented("test"))
        }

        fn compile(&self, _: &u16, _: &()) -> (&'static str, Vec<String>) {
            ("compiled", Vec::new())
        }
    }

    #[tokio::test]
    async fn keys_are_bounded_answered_by_default_and_dropped_when_idle() {
        let mut config = DiscoveryConfig::new("unused:1");
        config.idle_timeout = Duration::from_millis(50);
        let metrics = StreamMetrics::default();
        let f = Follower::new(
            Unimplemented,
            config,
            metrics.clone(),
            Arc::new("default"),
            Arc::new("overflow"),
            2,
        );
        let start = Instant::now();
        let a = f.ready(&1, || 1).await;
        assert!(
            start.elapsed() < Duration::from_millis(500),
            "UNIMPLEMENTED settles at once"
        );
        let b = f.get(&2, || 2);
        assert_eq!((**a.borrow(), **b.borrow()), ("default", "default"));
        // Beyond the bound: the overflow value, no stream.
        assert_eq!(**f.get(&3, || 3).borrow(), "overflow");
        assert_eq!((f.len(), metrics.streams.get()), (2, 2));
        // Nobody watches: dropped after the idle timeout, and room again.
        drop((a, b));
        let deadline = Instant::now() + Duration::from_secs(5);
        while !f.is_empty() {
            assert!(Instant::now() < deadline, "idle keys were not dropped");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(**f.get(&3, || 3).borrow(), "default");
    }
}

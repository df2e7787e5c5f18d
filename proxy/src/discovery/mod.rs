//! Service discovery: a client of the controller's `Destination.Resolve`.
//!
//! One [`Resolver`] per proxy owns one lazily connected gRPC channel shared by every stream.
//! Each target (`svc.ns:80`, `10.96.0.10:80`, ...) gets one background task and one
//! `tokio::sync::watch` of its [`Resolution`]; everyone interested in the target holds a
//! receiver. The task applies the full state, then `Add`/`Remove` diffs ([`state`]). When the
//! stream fails or the controller goes away it keeps the last known state and reconnects with
//! jittered exponential backoff ([`Backoff`]); routing never sees a controller outage. A
//! target nobody holds a receiver for is dropped after the idle timeout.
//!
//! If the controller cannot be reached before a target's first answer, the resolution
//! becomes [`Resolution::Unavailable`] (routing forwards to the original destination, as
//! with no discovery) until the controller answers.

pub mod state;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::watch;
use tonic::transport::{Channel, Endpoint as GrpcEndpoint};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;
use weft_proto::destination::destination_client::DestinationClient;
use weft_proto::destination::destination_server::SERVICE_NAME as DESTINATION_SERVICE;
use weft_proto::destination::{CallerContext, ResolveRequest};

use crate::config::{DiscoveryConfig, Workload};
use crate::metrics::DiscoveryMetrics;
use crate::transport::control::{self, ControllerTls};
use state::StreamState;

/// Resolutions kept at once; targets beyond this are not resolved (they go to their
/// original destination) until others go idle. Bounds memory and controller streams.
pub const MAX_RESOLUTIONS: usize = 10_000;

/// First reconnect delay; doubles up to the configured maximum.
pub(crate) const BACKOFF_MIN: Duration = Duration::from_millis(100);

/// One endpoint of a target, as the controller described it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointMeta {
    pub addr: SocketAddr,
    /// Relative weight, at least 1.
    pub weight: u32,
    /// Expected TLS identity when the peer is meshed (used once mTLS lands).
    pub identity: Option<Arc<str>>,
    /// The peer is a Weft proxy that accepts HTTP/2.
    pub h2_hint: bool,
    /// The peer is a Weft proxy and the port is opaque.
    pub opaque_hint: bool,
    pub zone: Arc<str>,
}

/// What the proxy knows about a target.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Resolution {
    /// No answer yet.
    Pending,
    /// The controller could not be reached before its first answer.
    Unavailable,
    /// The controller does not know the target: forward to the original destination.
    DoesNotExist,
    /// The target's endpoints; empty when the service exists but has none ready.
    Endpoints(Arc<[EndpointMeta]>),
}

/// Errors building the resolver.
#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    #[error("WEFT_PROXY_DESTINATION_ADDR={addr:?} does not make a gRPC URI: {source}")]
    Uri {
        addr: String,
        #[source]
        source: tonic::transport::Error,
    },
    #[error("WEFT_PROXY_DESTINATION_ADDR={addr:?}: the destination service requires mTLS with the workload certificate, and this proxy has no identity (set WEFT_PROXY_IDENTITY_ADDR, or give the address as http://HOST:PORT for plaintext in development)")]
    NoIdentity { addr: String },
}

struct Entry {
    tx: Arc<watch::Sender<Resolution>>,
}

struct Inner {
    client: DestinationClient<Channel>,
    context: CallerContext,
    config: DiscoveryConfig,
    metrics: DiscoveryMetrics,
    targets: Mutex<HashMap<Arc<str>, Entry>>,
    /// The channel every stream shares, for the health probe.
    channel: Channel,
}

/// Whether the controller has said, once since the proxy started, that its Destination
/// service serves the whole cluster (`grpc.health.v1` SERVING: its index has synced).
///
/// The proxy is not ready before that: a proxy that has never heard from its controller
/// routes nothing by name and applies no route, retry or mTLS expectation, so a new pod must
/// not take traffic yet (Istio's sidecar waits for its first configuration the same way).
/// Once seen, a controller outage does not unready the proxy: it keeps serving with the
/// last state it received, as it does for every stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ControllerState {
    /// Not yet; why, for `/ready`.
    Waiting(String),
    Serving,
}

/// The proxy's discovery client: target → watch of its resolution. Cheap to clone.
#[derive(Clone)]
pub struct Resolver {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Resolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Resolver")
            .field("addr", &self.inner.config.addr)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Resolver {
    /// Builds the resolver; the channel connects on first use. Must run inside a tokio runtime.
    ///
    /// `tls`: mutual TLS to the destination service with the workload certificate (see
    /// [`crate::transport::control`]), required unless the address was given as `http://`
    /// ([`DiscoveryConfig::plaintext`]). Every stream on the port (Resolve, ClientPolicy,
    /// ServerPolicy, the health probe) shares this channel, so none of them is ever sent
    /// in the clear.
    pub fn new(
        config: DiscoveryConfig,
        workload: &Workload,
        metrics: DiscoveryMetrics,
        tls: Option<ControllerTls>,
    ) -> Result<Self, DiscoveryError> {
        let tls = match (config.plaintext, tls) {
            (true, _) => {
                tracing::warn!(addr = %config.addr, "destination service over plaintext (http:// address): development only");
                None
            }
            (false, None) => {
                return Err(DiscoveryError::NoIdentity {
                    addr: config.addr.clone(),
                })
            }
            (false, Some(tls)) => Some(tls),
        };
        let channel = control::channel(&config.addr, tls, |e: GrpcEndpoint| {
            e.connect_timeout(Duration::from_secs(1))
                .tcp_nodelay(true)
                .http2_keep_alive_interval(Duration::from_secs(10))
                .keep_alive_timeout(Duration::from_secs(3))
                .keep_alive_while_idle(true)
        })
        .map_err(|source| DiscoveryError::Uri {
            addr: config.addr.clone(),
            source,
        })?;
        Ok(Self {
            inner: Arc::new(Inner {
                client: DestinationClient::new(channel.clone()),
                channel,
                context: CallerContext {
                    namespace: workload.namespace.clone(),
                    pod_name: workload.pod_name.clone(),
                    service_account: workload.service_account.clone(),
                },
                config,
                metrics,
                targets: Mutex::new(HashMap::new()),
            }),
        })
    }

    pub fn config(&self) -> &DiscoveryConfig {
        &self.inner.config
    }

    /// Starts asking the controller's health service until its Destination service is
    /// SERVING (with the reconnect backoff); the receiver says where that stands.
    pub fn watch_controller(&self) -> watch::Receiver<ControllerState> {
        let addr = self.inner.config.addr.clone();
        let (tx, rx) = watch::channel(ControllerState::Waiting(format!(
            "destination service at {addr}: not asked yet"
        )));
        let mut client = HealthClient::new(self.inner.channel.clone());
        let mut backoff = Backoff::new(BACKOFF_MIN, self.inner.config.backoff_max);
        tokio::spawn(async move {
            loop {
                let ask = client.check(HealthCheckRequest {
                    service: DESTINATION_SERVICE.to_string(),
                });
                let why = match tokio::time::timeout(Duration::from_secs(2), ask).await {
                    Ok(Ok(r)) if r.get_ref().status() == ServingStatus::Serving => {
                        tracing::info!(%addr, "controller serving: discovery state available");
                        tx.send_replace(ControllerState::Serving);
                        return;
                    }
                    Ok(Ok(r)) => {
                        format!("its index has not synced yet ({:?})", r.get_ref().status())
                    }
                    Ok(Err(s)) => format!(
                        "unreachable or unavailable ({:?}): {}",
                        s.code(),
                        control::status_reason(&s)
                    ),
                    Err(_) => "no answer within 2 s".to_string(),
                };
                tracing::debug!(%addr, why, "waiting for the controller");
                tx.send_replace(ControllerState::Waiting(format!(
                    "destination service at {addr}: {why}"
                )));
                tokio::time::sleep(backoff.next_delay(fastrand::f64())).await;
            }
        });
        rx
    }

    /// The channel every stream shares, for the other services on the destination port
    /// (`Policy.ServerPolicy`).
    pub(crate) fn channel(&self) -> Channel {
        self.inner.channel.clone()
    }

    /// The Destination client on the resolver's channel, for the other streams of the same
    /// service (`ClientPolicy`), and the caller context they send.
    pub(crate) fn client(&self) -> (DestinationClient<Channel>, CallerContext) {
        (self.inner.client.clone(), self.inner.context.clone())
    }

    /// A receiver of `target`'s resolution, starting its stream if nobody watches it yet.
    /// `None` when [`MAX_RESOLUTIONS`] targets are already resolved.
    pub fn resolve(&self, target: &str) -> Option<watch::Receiver<Resolution>> {
        let mut targets = lock(&self.inner.targets);
        if let Some(e) = targets.get(target) {
            return Some(e.tx.subscribe());
        }
        if targets.len() >= MAX_RESOLUTIONS {
            return None;
        }
        let (tx, rx) = watch::channel(Resolution::Pending);
        let tx = Arc::new(tx);
        let key: Arc<str> = Arc::from(target);
        targets.insert(key.clone(), Entry { tx: tx.clone() });
        self.inner.metrics.resolutions.inc();
        let inner = self.inner.clone();
        tokio::spawn(async move {
            run_target(&inner, &key, &tx).await;
            inner.metrics.resolutions.dec();
            tracing::debug!(target = %key, "resolution dropped");
        });
        Some(rx)
    }

    /// Targets resolved now.
    pub fn len(&self) -> usize {
        lock(&self.inner.targets).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Resolves when nobody has held a receiver for `idle`.
pub(crate) async fn idle<T>(tx: &watch::Sender<T>, idle: Duration) {
    loop {
        tx.closed().await;
        tokio::time::sleep(idle).await;
        if tx.receiver_count() == 0 {
            return;
        }
    }
}

/// One target's life: streams, reconnects, until idle.
async fn run_target(inner: &Inner, target: &Arc<str>, tx: &watch::Sender<Resolution>) {
    let mut backoff = Backoff::new(BACKOFF_MIN, inner.config.backoff_max.max(BACKOFF_MIN));
    loop {
        let idle_timeout = inner.config.idle_timeout;
        tokio::select! {
            () = stream_target(inner, target, tx, &mut backoff) => {}
            () = idle(tx, idle_timeout) => {
                // Removal happens under the map lock, where new receivers are made, so a
                // receiver handed out concurrently is never left with a dead task.
                let mut targets = lock(&inner.targets);
                if tx.receiver_count() == 0 {
                    targets.remove(target);
                    return;
                }
            }
        }
    }
}

/// Streams until the stream fails, then sleeps the backoff; returns to be called again.
async fn stream_target(
    inner: &Inner,
    target: &Arc<str>,
    tx: &watch::Sender<Resolution>,
    backoff: &mut Backoff,
) {
    let m = &inner.metrics;
    let mut client = inner.client.clone();
    let req = ResolveRequest {
        target: target.to_string(),
        context: Some(inner.context.clone()),
    };
    match client.resolve(req).await {
        Ok(rsp) => {
            m.stream_connects.inc();
            let mut stream = rsp.into_inner();
            let mut state = StreamState::default();
            let mut first = true;
            loop {
                match stream.message().await {
                    Ok(Some(update)) => {
                        m.updates.inc();
                        let applied = state.apply(update, first);
                        if applied.invalid > 0 {
                            tracing::warn!(%target, invalid = applied.invalid, "controller sent endpoints without a valid address; skipped");
                        }
                        if first {
                            backoff.reset();
                        }
                        first = false;
                        if let Some(r) = state.resolution() {
                            tracing::debug!(%target, resolution = ?r, "resolution updated");
                            tx.send_replace(r);
                        }
                    }
                    Ok(None) => {
                        tracing::info!(%target, "resolve stream ended by the controller; reconnecting (keeping the last known endpoints)");
                        break;
                    }
                    Err(status) => {
                        m.stream_errors.inc();
                        tracing::info!(%target, code = ?status.code(), message = status.message(), "resolve stream failed; reconnecting (keeping the last known endpoints)");
                        break;
                    }
                }
            }
        }
        Err(status) => {
            m.stream_errors.inc();
            if status.code() == tonic::Code::InvalidArgument {
                // Not a name the controller can resolve: route as if unknown.
                tracing::debug!(%target, message = status.message(), "controller rejected the target; forwarding to original destinations");
                tx.send_if_modified(|r| {
                    let changed = *r != Resolution::DoesNotExist;
                    *r = Resolution::DoesNotExist;
                    changed
                });
            } else {
                tracing::info!(%target, addr = %inner.config.addr, code = ?status.code(), message = status.message(), "cannot resolve: is the controller reachable at WEFT_PROXY_DESTINATION_ADDR?");
                tx.send_if_modified(|r| {
                    if *r == Resolution::Pending {
                        *r = Resolution::Unavailable;
                        true
                    } else {
                        false
                    }
                });
            }
        }
    }
    tokio::time::sleep(backoff.next_delay(fastrand::f64())).await;
}

/// Exponential backoff with jitter: each delay is drawn from `[d/2, d]` where `d` doubles from
/// `min` up to `max`. Pure given the random number.
#[derive(Clone, Debug)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    current: Duration,
}

impl Backoff {
    pub fn new(min: Duration, max: Duration) -> Self {
        Self {
            min,
            max,
            current: min,
        }
    }

    /// The next delay, given `r` uniform in `[0, 1)`.
    pub fn next_delay(&mut self, r: f64) -> Duration {
        let d = self.current;
        self.current = (self.current * 2).min(self.max);
        d.mul_f64(0.5 + 0.5 * r.clamp(0.0, 1.0))
    }

    pub fn reset(&mut self) {
        self.current = self.min;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_with_jitter_up_to_the_max_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        let ceilings: Vec<u64> = (0..10)
            .map(|_| b.next_delay(0.999_999).as_millis() as u64)
            .collect();
        assert_eq!(
            ceilings,
            vec![99, 199, 399, 799, 1599, 3199, 4999, 4999, 4999, 4999]
        );
        b.reset();
        assert_eq!(b.next_delay(0.0), Duration::from_millis(50));
        assert_eq!(b.next_delay(0.0), Duration::from_millis(100));
    }
}

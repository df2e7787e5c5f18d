//! The running agent: the plugin's socket, the policy sync loop and the node-address watch
//! around one [`Core`] behind a mutex (every map write is a short syscall; nothing awaits
//! while holding it).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::Notify;
use weft_cni::agent_proto::{Handler, Request, Response};
use weft_controller::index::Index;
use weft_controller::source::Readiness;

use crate::dataplane::{self, Dataplane};
use crate::endpoints::{Cluster, Core};
use crate::metrics::Metrics;

/// How often the node's addresses are re-read (and endpoints whose interface vanished
/// without a DEL collected).
pub const NODE_POLL: Duration = Duration::from_secs(2);

pub struct Agent<D: Dataplane> {
    core: Mutex<Core<D>>,
    index: Index,
    readiness: Readiness,
    metrics: Metrics,
    /// Wakes the sync loop (the registry changed).
    changed: Notify,
    extra_node_ips: Vec<std::net::IpAddr>,
    /// When policy was last computed and written (`/status`, `weft_cni_last_sync_*`).
    last_sync: Mutex<Option<std::time::SystemTime>>,
}

impl<D: Dataplane> std::fmt::Debug for Agent<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent").finish_non_exhaustive()
    }
}

impl<D: Dataplane> Agent<D> {
    pub fn new(
        core: Core<D>,
        index: Index,
        readiness: Readiness,
        metrics: Metrics,
        extra_node_ips: Vec<std::net::IpAddr>,
    ) -> Arc<Self> {
        let agent = Arc::new(Agent {
            core: Mutex::new(core),
            index,
            readiness,
            metrics,
            changed: Notify::new(),
            extra_node_ips,
            last_sync: Mutex::new(None),
        });
        agent.refresh_node_ips();
        agent
    }

    pub fn core(&self) -> std::sync::MutexGuard<'_, Core<D>> {
        self.core.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// The source's readiness (synced once).
    pub fn readiness(&self) -> &Readiness {
        &self.readiness
    }

    /// The index the agent computes from.
    pub fn index(&self) -> &Index {
        &self.index
    }

    /// When policy was last computed and written; `None` before the first sync.
    pub fn last_sync(&self) -> Option<std::time::SystemTime> {
        *self.last_sync.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn is_ready(&self) -> bool {
        self.readiness.is_ready()
    }

    /// Re-reads the node's addresses; true when they changed.
    pub fn refresh_node_ips(&self) -> bool {
        let addrs = match dataplane::interface_addresses() {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(error = %e, "listing the node's addresses failed");
                return false;
            }
        };
        let mut core = self.core();
        let ips = dataplane::node_addresses(&addrs, &core.pod_ifnames(), &self.extra_node_ips);
        let changed = core.set_node_ips(ips);
        if changed {
            tracing::info!(node_ips = ?core.node_ips(), "node addresses (always allowed to and from pods)");
        }
        changed
    }

    fn not_ready(&self) -> Option<String> {
        (!self.readiness.is_ready()).then(|| {
            "weft-cni-agent is not ready: the cluster source has not synced yet (Pods, \
             Namespaces, NetworkPolicies); retry shortly"
                .to_string()
        })
    }

    /// Answers one plugin request.
    pub fn answer(&self, request: Request) -> Response {
        let err = |msg: String| Response::Error { msg };
        match request {
            Request::Status => match self.not_ready() {
                Some(msg) => err(msg),
                None => Response::Ok,
            },
            Request::Add(add) => {
                if let Some(msg) = self.not_ready() {
                    return err(msg);
                }
                let cluster = Cluster::from_index(&self.index);
                let start = Instant::now();
                let result = self.core().add(&add, &cluster);
                match result {
                    Ok(ep_id) => {
                        tracing::info!(pod = ?add.pod_name, namespace = ?add.pod_namespace,
                            container = %add.container_id, interface = %add.host_ifname,
                            ifindex = add.host_ifindex, ep_id, elapsed_us = start.elapsed().as_micros() as u64,
                            "endpoint registered");
                        self.changed.notify_one();
                        Response::Ok
                    }
                    Err(e) => err(e.to_string()),
                }
            }
            Request::Del(del) => match self.core().del(&del) {
                Ok(()) => {
                    tracing::info!(container = %del.container_id, ifname = %del.ifname, "endpoint removed");
                    self.changed.notify_one();
                    Response::Ok
                }
                Err(e) => err(e.to_string()),
            },
            Request::Check(check) => match self.core().check(&check) {
                Ok(()) => Response::Ok,
                Err(e) => err(e.to_string()),
            },
            // The node's pod CIDRs are answered by crate::pod_cidrs::WithPodCidrs around this
            // handler: the endpoints side does not know which node it is on.
            Request::Node => err(
                "this handler does not answer node: serve it inside pod_cidrs::WithPodCidrs"
                    .to_string(),
            ),
            Request::Gc(gc) => match self.core().gc(&gc.valid_attachments) {
                Ok(n) => {
                    if n > 0 {
                        self.changed.notify_one();
                    }
                    Response::Ok
                }
                Err(e) => err(e.to_string()),
            },
        }
    }

    /// Recomputes policy when the index or the registry changes, debounced; also re-reads the
    /// node's addresses and collects vanished interfaces every [`NODE_POLL`].
    pub async fn run_sync(self: Arc<Self>, debounce: Duration) {
        let mut generation = self.index.generation();
        let mut poll = tokio::time::interval(NODE_POLL);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Wait for the source's first full view.
        while !self.readiness.is_ready() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let mut seen = Some(Instant::now());
        loop {
            if let Some(since) = seen.take() {
                tokio::time::sleep(debounce).await;
                generation.borrow_and_update();
                let cluster = Cluster::from_index(&self.index);
                let report = self.core().sync(&cluster);
                *self.last_sync.lock().unwrap_or_else(|e| e.into_inner()) =
                    Some(std::time::SystemTime::now());
                let took = since.elapsed();
                self.metrics
                    .policy_update_seconds
                    .observe(took.as_secs_f64());
                if report.updated > 0 || report.errors > 0 {
                    tracing::info!(
                        updated = report.updated,
                        errors = report.errors,
                        change_to_maps_ms = took.as_secs_f64() * 1000.0,
                        "policy synced"
                    );
                }
            }
            tokio::select! {
                r = generation.changed() => {
                    if r.is_err() {
                        return;
                    }
                    seen = Some(Instant::now());
                }
                _ = self.changed.notified() => seen = Some(Instant::now()),
                _ = poll.tick() => {
                    let gone = self.core().collect_gone().map(|g| g.len()).unwrap_or_else(|e| {
                        tracing::warn!(error = %e, "collecting vanished endpoints failed");
                        0
                    });
                    if self.refresh_node_ips() || gone > 0 {
                        seen = Some(Instant::now());
                    }
                }
            }
        }
    }

    /// The metrics text: the agent's, then the source's (`weft_controller_*`).
    pub fn metrics_text(&self, source: Option<&weft_controller::metrics::Metrics>) -> String {
        self.core().observe_metrics();
        let mut text = self.metrics.encode();
        if let Some(source) = source {
            if let Some(stripped) = text.strip_suffix("# EOF\n") {
                text = format!("{stripped}{}", source.encode());
            }
        }
        text
    }
}

impl<D: Dataplane> Handler for Agent<D> {
    async fn handle(&self, request: Request) -> Response {
        self.answer(request)
    }
}

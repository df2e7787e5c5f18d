//! The controller's Prometheus metrics (served on the admin port).
//! Labels are bounded: object kind, update type, Certify result and which
//! rate limit refused (pod or controller) only (no identity or pod label:
//! the per-identity view is in the logs); file paths of bad
//! manifests go to the log, not to labels.

use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::model::Kind;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    pub kind: String,
}

impl From<Kind> for KindLabels {
    fn from(kind: Kind) -> Self {
        KindLabels {
            kind: kind.as_str().to_string(),
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UpdateLabels {
    /// add, remove or no_endpoints
    pub update: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    /// A bounded outcome: `ok` or a refusal kind
    /// (see `identity::decide::RefusalKind::label`).
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LimitLabels {
    /// Which issuance limit refused: `pod` or `controller`
    /// (see `identity::rate::Limited::label`).
    pub limit: &'static str,
}

/// Handles to every metric; clone freely.
#[derive(Clone)]
pub struct Metrics {
    registry: Arc<Registry>,
    /// Open Resolve streams.
    pub resolve_streams: Gauge,
    /// Updates sent on Resolve streams, by type.
    pub resolve_updates: Family<UpdateLabels, Counter>,
    /// Open ClientPolicy streams.
    pub client_policy_streams: Gauge,
    /// Policies sent on ClientPolicy streams (the first and each change).
    pub client_policy_updates: Counter,
    /// Open Policy.ServerPolicy streams.
    pub server_policy_streams: Gauge,
    /// Inbound policies sent on ServerPolicy streams (the first and each change).
    pub server_policy_updates: Counter,
    /// Status writes on routes and BackendPolicies (kube source), by result.
    pub status_writes: Family<ResultLabels, Counter>,
    /// 1 while this replica holds the status writer's Lease (or leader election is off).
    pub leader: Gauge,
    /// Objects in the index, by kind.
    pub index_objects: Family<KindLabels, Gauge>,
    /// Objects added, changed or deleted in the index by the source.
    pub index_changes: Counter,
    /// Manifest files that failed to parse (directory source), per attempt.
    pub manifest_errors: Counter,
    /// Manifest files whose last parse failed (their last good state is used).
    pub manifest_files_invalid: Gauge,
    /// Errors from the Kubernetes watchers, by kind (they retry with backoff).
    pub kube_watch_errors: Family<KindLabels, Counter>,
    /// Objects the source could not convert (logged with the field), by kind.
    pub invalid_objects: Family<KindLabels, Counter>,
    /// Identity.Certify calls by result.
    pub identity_certify: Family<ResultLabels, Counter>,
    /// Identity.Certify calls refused by a rate limit, by limit (pod, controller).
    pub identity_certify_rate_limited: Family<LimitLabels, Counter>,
    /// notAfter of the issuer certificate in use (Unix seconds).
    pub identity_issuer_expiry: Gauge,
    /// Certificates in the trust-anchor bundle.
    pub identity_trust_anchors: Gauge,
    /// Issuer reload attempts after a file change, by result (ok, failed).
    pub identity_issuer_reloads: Family<ResultLabels, Counter>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("weft_controller");
        let m = MetricsBuilder::default();
        registry.register(
            "resolve_streams",
            "Open Destination.Resolve streams",
            m.resolve_streams.clone(),
        );
        registry.register(
            "resolve_updates",
            "Updates sent on Resolve streams",
            m.resolve_updates.clone(),
        );
        registry.register(
            "client_policy_streams",
            "Open Destination.ClientPolicy streams",
            m.client_policy_streams.clone(),
        );
        registry.register(
            "client_policy_updates",
            "Policies sent on ClientPolicy streams (the first, then one per change)",
            m.client_policy_updates.clone(),
        );
        registry.register(
            "server_policy_streams",
            "Open Policy.ServerPolicy streams",
            m.server_policy_streams.clone(),
        );
        registry.register(
            "server_policy_updates",
            "Inbound policies sent on ServerPolicy streams (the first, then one per change)",
            m.server_policy_updates.clone(),
        );
        registry.register(
            "status_writes",
            "Status writes on HTTPRoutes, GRPCRoutes and BackendPolicies, by result (ok, failed)",
            m.status_writes.clone(),
        );
        registry.register(
            "leader",
            "1 while this replica writes route and policy status (it holds the Lease, or leader election is off and the source is kube), else 0",
            m.leader.clone(),
        );
        registry.register(
            "index_objects",
            "Objects in the index",
            m.index_objects.clone(),
        );
        registry.register(
            "index_changes",
            "Objects added, changed or deleted in the index",
            m.index_changes.clone(),
        );
        registry.register(
            "manifest_errors",
            "Manifest files that failed to parse (directory source)",
            m.manifest_errors.clone(),
        );
        registry.register(
            "manifest_files_invalid",
            "Manifest files whose last parse failed; their last good objects are served",
            m.manifest_files_invalid.clone(),
        );
        registry.register(
            "kube_watch_errors",
            "Kubernetes watch errors (retried with backoff)",
            m.kube_watch_errors.clone(),
        );
        registry.register(
            "invalid_objects",
            "Objects the source could not convert",
            m.invalid_objects.clone(),
        );
        registry.register(
            "identity_certify",
            "Identity.Certify calls by result (ok, invalid_request, unauthenticated, permission_denied, rate_limited, unavailable, not_configured, error)",
            m.identity_certify.clone(),
        );
        registry.register(
            "identity_certify_rate_limited",
            "Identity.Certify calls refused by a rate limit, by limit (pod: the pod's own bucket; controller: the controller-wide ceiling)",
            m.identity_certify_rate_limited.clone(),
        );
        registry.register(
            "identity_issuer_expiry_timestamp_seconds",
            "notAfter of the issuer certificate in use, Unix seconds",
            m.identity_issuer_expiry.clone(),
        );
        registry.register(
            "identity_trust_anchors",
            "Certificates in the trust-anchor bundle",
            m.identity_trust_anchors.clone(),
        );
        registry.register(
            "identity_issuer_reloads",
            "Issuer reloads after a file change, by result (ok, failed)",
            m.identity_issuer_reloads.clone(),
        );
        Metrics {
            registry: Arc::new(registry),
            resolve_streams: m.resolve_streams,
            resolve_updates: m.resolve_updates,
            client_policy_streams: m.client_policy_streams,
            client_policy_updates: m.client_policy_updates,
            server_policy_streams: m.server_policy_streams,
            server_policy_updates: m.server_policy_updates,
            status_writes: m.status_writes,
            leader: m.leader,
            index_objects: m.index_objects,
            index_changes: m.index_changes,
            manifest_errors: m.manifest_errors,
            manifest_files_invalid: m.manifest_files_invalid,
            kube_watch_errors: m.kube_watch_errors,
            invalid_objects: m.invalid_objects,
            identity_certify: m.identity_certify,
            identity_certify_rate_limited: m.identity_certify_rate_limited,
            identity_issuer_expiry: m.identity_issuer_expiry,
            identity_trust_anchors: m.identity_trust_anchors,
            identity_issuer_reloads: m.identity_issuer_reloads,
        }
    }

    /// Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::warn!(error = %e, "encoding metrics failed");
        }
        out
    }

    /// Sets the object-count gauges from the index.
    pub fn observe_index(&self, index: &crate::index::Index) {
        for (kind, n) in index.counts() {
            self.index_objects
                .get_or_create(&KindLabels::from(kind))
                .set(i64::try_from(n).unwrap_or(i64::MAX));
        }
    }
}

#[derive(Default)]
struct MetricsBuilder {
    resolve_streams: Gauge,
    resolve_updates: Family<UpdateLabels, Counter>,
    client_policy_streams: Gauge,
    client_policy_updates: Counter,
    server_policy_streams: Gauge,
    server_policy_updates: Counter,
    status_writes: Family<ResultLabels, Counter>,
    leader: Gauge,
    index_objects: Family<KindLabels, Gauge>,
    index_changes: Counter,
    manifest_errors: Counter,
    manifest_files_invalid: Gauge,
    kube_watch_errors: Family<KindLabels, Counter>,
    invalid_objects: Family<KindLabels, Counter>,
    identity_certify: Family<ResultLabels, Counter>,
    identity_certify_rate_limited: Family<LimitLabels, Counter>,
    identity_issuer_expiry: Gauge,
    identity_trust_anchors: Gauge,
    identity_issuer_reloads: Family<ResultLabels, Counter>,
}

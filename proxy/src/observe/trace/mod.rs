//! Distributed tracing (`WEFT_PROXY_TRACE_COLLECTOR_ADDR`): the proxy takes part in W3C
//! Trace Context (B3 accepted), records one span per proxied request per direction
//! (CLIENT on outbound, SERVER on inbound) and exports them over OTLP/gRPC.
//!
//! At the request head, [`Tracer::begin`] reads the caller's context ([`context`]), decides
//! whether this hop records (a sampled parent is continued, an unsampled one is left alone,
//! no parent means head sampling at `WEFT_PROXY_TRACE_SAMPLING`, default 0) and rewrites the
//! forwarded `traceparent` so the next hop is this span's child. When the response body
//! ends, the request's [`RequestEvent`] and the span's ids go into a bounded queue
//! ([`Tracer::record`], a `try_send`): that is all the request path does. A full queue
//! drops the span and counts it (`weft_trace_spans_total{result="dropped"}`).
//!
//! One task drains the queue: it turns events into `opentelemetry_sdk` [`SpanData`] with
//! the OpenTelemetry HTTP semantic-convention attributes plus Weft's own (route, endpoint,
//! identities, retries, proxy error), and hands batches of up to [`BATCH`] spans, at least
//! every [`INTERVAL`], to an `opentelemetry-otlp` tonic [`SpanExporter`]. Why our own loop
//! rather than the SDK's `BatchSpanProcessor`: the proxy does not create spans through the
//! OpenTelemetry API (it has the whole request in one event when it ends, so a span is
//! built once, off the request path), the processor runs its own thread and does not
//! count what it drops in our metrics, and the exporter is the part worth reusing (OTLP
//! encoding, tonic channel with lazy reconnect). The exporter's own retries are disabled:
//! a failed export is counted (`result="failed"`) and the loop backs off (100 ms doubling
//! to [`BACKOFF_MAX`]) while new spans keep filling, then overflowing, the bounded queue;
//! every export is bounded by [`EXPORT_TIMEOUT`]. Memory is the queue plus one batch.
//!
//! At shutdown, after the connections drained, [`Tracer::flush`] has the loop export what is
//! queued at once (not at the next interval), so the last second of spans is not lost.

pub mod context;

use std::borrow::Cow;
use std::sync::Arc;
use std::time::Duration;

use http::HeaderMap;
use opentelemetry::trace::{
    SpanContext, SpanId, SpanKind, Status, TraceFlags, TraceId, TraceState,
};
use opentelemetry::{InstrumentationScope, KeyValue};
use opentelemetry_otlp::{WithExportConfig, WithTonicConfig};
use opentelemetry_sdk::trace::{SpanData, SpanEvents, SpanExporter, SpanLinks};
use opentelemetry_sdk::Resource;
use prometheus_client::metrics::counter::Counter;
use tokio::sync::{mpsc, oneshot};

use super::{ObserveMetrics, RequestEvent};
use crate::config::{env, TraceConfig, Workload};
use crate::metrics::Direction;
pub use context::SpanIds;

/// Spans per export.
pub const BATCH: usize = 512;
/// A batch goes out at least this often while spans are waiting.
pub const INTERVAL: Duration = Duration::from_secs(1);
/// One export's upper bound (connect included).
pub const EXPORT_TIMEOUT: Duration = Duration::from_secs(3);
/// Longest pause between exports after failures.
pub const BACKOFF_MAX: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    #[error("{var}={addr:?}: cannot build the OTLP exporter: {source}", var = env::TRACE_COLLECTOR_ADDR)]
    Exporter {
        addr: String,
        #[source]
        source: opentelemetry_otlp::ExporterBuildError,
    },
}

/// A finished request waiting for export.
#[derive(Debug)]
struct Finished {
    ids: SpanIds,
    event: Arc<RequestEvent>,
}

/// The proxy's tracer: sampling at the request head, spans queued at its end.
#[derive(Debug)]
pub struct Tracer {
    /// Head-sampling probability in millionths.
    sampling: u32,
    tx: mpsc::Sender<Finished>,
    /// Asks the export loop to send everything queued now; answered when done.
    flush: mpsc::Sender<oneshot::Sender<()>>,
    dropped: Counter,
}

impl Tracer {
    /// Starts exporting to the collector in `config` (inside the runtime: the tonic channel
    /// connects lazily, and reconnects, on it).
    pub fn start(
        config: &TraceConfig,
        workload: &Workload,
        metrics: &ObserveMetrics,
    ) -> Result<Arc<Self>, TraceError> {
        let err = |source| TraceError::Exporter {
            addr: config.collector.clone(),
            source,
        };
        let mut exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(format!("http://{}", config.collector))
            .with_timeout(EXPORT_TIMEOUT)
            .with_retry_policy(opentelemetry_otlp::RetryPolicy::disabled())
            .build()
            .map_err(err)?;
        exporter.set_resource(&resource(workload));
        Ok(Self::with_exporter(
            exporter,
            config.sampling.millionths(),
            config.queue,
            metrics,
        ))
    }

    /// A tracer exporting through any [`SpanExporter`] (tests pass an in-memory one).
    pub fn with_exporter<E: SpanExporter + 'static>(
        exporter: E,
        sampling_millionths: u32,
        queue: usize,
        metrics: &ObserveMetrics,
    ) -> Arc<Self> {
        let (tx, rx) = mpsc::channel(queue.max(1));
        let (flush, flush_rx) = mpsc::channel(1);
        let counters = Counters {
            exported: ObserveMetrics::counter(&metrics.trace_spans, "exported"),
            failed: ObserveMetrics::counter(&metrics.trace_spans, "failed"),
        };
        tokio::spawn(export_loop(rx, flush_rx, exporter, counters));
        Arc::new(Self {
            sampling: sampling_millionths,
            tx,
            flush,
            dropped: ObserveMetrics::counter(&metrics.trace_spans, "dropped"),
        })
    }

    /// At the request head: the span this hop records, if any, with the forwarded headers
    /// rewritten to make it the next hop's parent. Unsampled requests keep their headers.
    pub fn begin(&self, headers: &mut HeaderMap) -> Option<SpanIds> {
        let parent = context::extract(headers).map(|(p, _)| p);
        let sampling = self.sampling;
        let ids = context::decide(
            parent,
            || sampling > 0 && fastrand::u32(0..1_000_000) < sampling,
            || fastrand::u64(..),
        )?;
        context::inject(headers, &ids);
        Some(ids)
    }

    /// Exports every span queued so far now, waiting at most `within`; false when that did
    /// not finish in time (the collector is slow or gone: those spans count as failed or stay
    /// queued).
    pub async fn flush(&self, within: Duration) -> bool {
        let (ack, done) = oneshot::channel();
        let asked = async { self.flush.send(ack).await.is_ok() && done.await.is_ok() };
        tokio::time::timeout(within, asked).await.unwrap_or(false)
    }

    /// At the response's end: queues the span, or drops and counts it when the queue is full.
    pub fn record(&self, ids: SpanIds, event: Arc<RequestEvent>) {
        if self.tx.try_send(Finished { ids, event }).is_err() {
            self.dropped.inc();
        }
    }
}

#[derive(Debug)]
struct Counters {
    exported: Counter,
    failed: Counter,
}

async fn export_loop<E: SpanExporter>(
    mut rx: mpsc::Receiver<Finished>,
    mut flush: mpsc::Receiver<oneshot::Sender<()>>,
    exporter: E,
    counters: Counters,
) {
    let scope = InstrumentationScope::builder("weft-proxy")
        .with_version(env!("CARGO_PKG_VERSION"))
        .build();
    let mut pending = Vec::with_capacity(BATCH);
    let mut backoff = Duration::ZERO;
    loop {
        // The first span opens a batch; it leaves when full or at the interval, or at once
        // when a flush is asked for.
        let mut ack = None;
        tokio::select! {
            n = rx.recv_many(&mut pending, BATCH) => if n == 0 { return },
            Some(a) = flush.recv() => ack = Some(a),
        }
        let deadline = tokio::time::Instant::now() + INTERVAL;
        while ack.is_none() && pending.len() < BATCH {
            let room = BATCH - pending.len();
            tokio::select! {
                r = tokio::time::timeout_at(deadline, rx.recv_many(&mut pending, room)) => match r {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                },
                Some(a) = flush.recv() => ack = Some(a),
            }
        }
        if let Some(ack) = ack {
            // Everything queued leaves now, batch after batch, without backoff.
            while let Ok(f) = rx.try_recv() {
                pending.push(f);
            }
            while !pending.is_empty() {
                let take = pending.len().min(BATCH);
                let batch = pending
                    .drain(..take)
                    .map(|f| span_data(&f.ids, &f.event, &scope))
                    .collect();
                if let Err(why) = export(&exporter, batch, &counters).await {
                    tracing::warn!(error = %why, "trace export at shutdown failed");
                }
            }
            let _ = ack.send(());
            continue;
        }
        let batch: Vec<SpanData> = pending
            .drain(..)
            .map(|f| span_data(&f.ids, &f.event, &scope))
            .collect();
        let n = batch.len();
        match export(&exporter, batch, &counters).await {
            Ok(()) => {
                if !backoff.is_zero() {
                    tracing::info!("trace export works again");
                }
                backoff = Duration::ZERO;
            }
            Err(why) => {
                if backoff.is_zero() {
                    tracing::warn!(error = %why, spans = n, "trace export failed; retrying with backoff, spans beyond the queue are dropped (weft_trace_spans_total)");
                }
                backoff = (backoff * 2).clamp(Duration::from_millis(100), BACKOFF_MAX);
                tokio::time::sleep(backoff).await;
            }
        }
    }
}

/// One export, bounded by [`EXPORT_TIMEOUT`], counted as exported or failed.
async fn export<E: SpanExporter>(
    exporter: &E,
    batch: Vec<SpanData>,
    counters: &Counters,
) -> Result<(), String> {
    let n = batch.len() as u64;
    match tokio::time::timeout(EXPORT_TIMEOUT, exporter.export(batch)).await {
        Ok(Ok(())) => {
            counters.exported.inc_by(n);
            Ok(())
        }
        Ok(Err(e)) => {
            counters.failed.inc_by(n);
            Err(e.to_string())
        }
        Err(_) => {
            counters.failed.inc_by(n);
            Err(format!("no answer within {EXPORT_TIMEOUT:?}"))
        }
    }
}

/// `service.name=weft-proxy` and the pod it serves.
pub fn resource(workload: &Workload) -> Resource {
    let mut attrs = Vec::new();
    if !workload.namespace.is_empty() {
        attrs.push(KeyValue::new(
            "k8s.namespace.name",
            workload.namespace.clone(),
        ));
    }
    if !workload.pod_name.is_empty() {
        attrs.push(KeyValue::new("k8s.pod.name", workload.pod_name.clone()));
    }
    Resource::builder_empty()
        .with_service_name("weft-proxy")
        .with_attributes(attrs)
        .build()
}

/// One request as an OpenTelemetry span: HTTP semantic conventions plus `weft.*`.
pub fn span_data(ids: &SpanIds, ev: &RequestEvent, scope: &InstrumentationScope) -> SpanData {
    let mut a = Vec::with_capacity(20);
    a.push(KeyValue::new(
        "http.request.method",
        ev.method.as_str().to_string(),
    ));
    let (path, query) = match ev.path.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (ev.path.as_str(), None),
    };
    a.push(KeyValue::new("url.path", path.to_string()));
    if let Some(q) = query {
        a.push(KeyValue::new("url.query", q.to_string()));
    }
    a.push(KeyValue::new("url.scheme", "http"));
    if let Ok(auth) = ev.authority.parse::<http::uri::Authority>() {
        a.push(KeyValue::new("server.address", auth.host().to_string()));
        if let Some(p) = auth.port_u16() {
            a.push(KeyValue::new("server.port", i64::from(p)));
        }
    }
    if ev.status != 0 {
        a.push(KeyValue::new(
            "http.response.status_code",
            i64::from(ev.status),
        ));
    }
    let version = match ev.version {
        http::Version::HTTP_09 => "0.9",
        http::Version::HTTP_10 => "1.0",
        http::Version::HTTP_2 => "2",
        http::Version::HTTP_3 => "3",
        _ => "1.1",
    };
    a.push(KeyValue::new("network.protocol.version", version));
    let kind = match ev.direction {
        Direction::Outbound => SpanKind::Client,
        Direction::Inbound => {
            a.push(KeyValue::new("client.address", ev.peer.ip().to_string()));
            a.push(KeyValue::new("client.port", i64::from(ev.peer.port())));
            if let Some(ua) = &ev.user_agent {
                a.push(KeyValue::new("user_agent.original", ua.clone()));
            }
            SpanKind::Server
        }
    };
    if let Some(e) = ev.endpoint {
        a.push(KeyValue::new("network.peer.address", e.ip().to_string()));
        a.push(KeyValue::new("network.peer.port", i64::from(e.port())));
        a.push(KeyValue::new("weft.endpoint", e.to_string()));
    }
    if let Some(code) = ev.grpc_status {
        a.push(KeyValue::new("rpc.grpc.status_code", i64::from(code)));
    }
    a.push(KeyValue::new("weft.direction", ev.direction.as_str()));
    if let Some(r) = &ev.route {
        a.push(KeyValue::new("weft.route", r.to_string()));
    }
    if let Some(id) = &ev.client_id {
        a.push(KeyValue::new("weft.client_id", id.to_string()));
    }
    if let Some(id) = &ev.server_id {
        a.push(KeyValue::new("weft.server_id", id.to_string()));
    }
    a.push(KeyValue::new("weft.retries", i64::from(ev.retries)));
    let error_type: Option<Cow<'static, str>> = if let Some(c) = ev.error {
        a.push(KeyValue::new("weft.proxy_error", c.as_str()));
        Some(c.as_str().into())
    } else if ev.status >= 500 {
        Some(ev.status.to_string().into())
    } else if ev.grpc_status.is_some_and(|c| c != 0) {
        Some(format!("grpc_status_{}", ev.grpc_status.unwrap_or_default()).into())
    } else if ev.body_failed {
        Some("body_failed".into())
    } else {
        None
    };
    let status = match &error_type {
        Some(t) => {
            a.push(KeyValue::new("error.type", t.to_string()));
            Status::Error {
                description: t.clone(),
            }
        }
        None => Status::Unset,
    };
    SpanData {
        span_context: SpanContext::new(
            TraceId::from_bytes(ids.trace_id),
            SpanId::from_bytes(ids.span_id),
            TraceFlags::SAMPLED,
            false,
            TraceState::NONE,
        ),
        parent_span_id: ids.parent.map_or(SpanId::INVALID, SpanId::from_bytes),
        parent_span_is_remote: ids.parent.is_some(),
        span_kind: kind,
        name: Cow::Owned(ev.method.as_str().to_string()),
        start_time: ev.started,
        end_time: ev.started + ev.duration,
        attributes: a,
        dropped_attributes_count: 0,
        events: SpanEvents::default(),
        links: SpanLinks::default(),
        status,
        instrumentation_scope: scope.clone(),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::sync::Mutex;
    use std::time::SystemTime;

    #[derive(Debug, Default, Clone)]
    struct Memory(Arc<Mutex<Vec<SpanData>>>);

    impl SpanExporter for Memory {
        async fn export(&self, batch: Vec<SpanData>) -> opentelemetry_sdk::error::OTelSdkResult {
            self.0.lock().unwrap().extend(batch);
            Ok(())
        }
    }

    fn event(direction: Direction) -> RequestEvent {
        RequestEvent {
            direction,
            started: SystemTime::UNIX_EPOCH + Duration::from_secs(1_000),
            latency: Duration::from_millis(3),
            duration: Duration::from_millis(5),
            peer: "10.0.0.1:40000".parse().unwrap(),
            method: http::Method::GET,
            version: http::Version::HTTP_11,
            authority: "books.shop:8080".into(),
            path: "/api/books?id=1".into(),
            user_agent: Some("curl/8".into()),
            referer: None,
            status: 503,
            grpc_status: None,
            response_bytes: 0,
            route: Some("HTTPRoute/shop/books".into()),
            endpoint: Some("10.0.0.9:8080".parse().unwrap()),
            client_id: None,
            server_id: Some("spiffe://cluster.local/ns/shop/sa/books".into()),
            error: Some(crate::http::Cause::NoEndpoints),
            retries: 2,
            body_failed: false,
        }
    }

    fn attr<'a>(s: &'a SpanData, k: &str) -> Option<&'a opentelemetry::Value> {
        s.attributes
            .iter()
            .find(|kv| kv.key.as_str() == k)
            .map(|kv| &kv.value)
    }

    #[test]
    fn span_has_semantic_convention_and_weft_attributes() {
        let ids = SpanIds {
            trace_id: [1; 16],
            span_id: [2; 8],
            parent: Some([3; 8]),
        };
        let scope = InstrumentationScope::builder("t").build();
        let s = span_data(&ids, &event(Direction::Outbound), &scope);
        assert_eq!(s.span_kind, SpanKind::Client);
        assert_eq!(s.parent_span_id, SpanId::from_bytes([3; 8]));
        assert_eq!(s.end_time, s.start_time + Duration::from_millis(5));
        let get = |k| attr(&s, k).map(|v| v.to_string());
        assert_eq!(get("http.request.method").as_deref(), Some("GET"));
        assert_eq!(get("url.path").as_deref(), Some("/api/books"));
        assert_eq!(get("url.query").as_deref(), Some("id=1"));
        assert_eq!(get("server.address").as_deref(), Some("books.shop"));
        assert_eq!(get("server.port").as_deref(), Some("8080"));
        assert_eq!(get("http.response.status_code").as_deref(), Some("503"));
        assert_eq!(get("network.protocol.version").as_deref(), Some("1.1"));
        assert_eq!(get("weft.route").as_deref(), Some("HTTPRoute/shop/books"));
        assert_eq!(get("weft.endpoint").as_deref(), Some("10.0.0.9:8080"));
        assert_eq!(get("weft.retries").as_deref(), Some("2"));
        assert_eq!(get("weft.proxy_error").as_deref(), Some("no-endpoints"));
        assert_eq!(get("error.type").as_deref(), Some("no-endpoints"));
        assert_eq!(get("client.address"), None);
        assert!(matches!(s.status, Status::Error { .. }));

        let mut ok = event(Direction::Inbound);
        (ok.status, ok.error) = (200, None);
        let s = span_data(&ids, &ok, &scope);
        assert_eq!(s.span_kind, SpanKind::Server);
        assert_eq!(s.status, Status::Unset);
        assert_eq!(attr(&s, "error.type"), None);
        assert_eq!(
            attr(&s, "client.address").map(|v| v.to_string()).as_deref(),
            Some("10.0.0.1")
        );
    }

    #[tokio::test]
    async fn sampled_requests_are_rewritten_queued_and_exported() {
        let memory = Memory::default();
        let metrics = ObserveMetrics::default();
        let tracer = Tracer::with_exporter(memory.clone(), 0, 16, &metrics);
        // Default sampling: no parent, no span, headers untouched.
        let mut h = HeaderMap::new();
        assert_eq!(tracer.begin(&mut h), None);
        assert!(h.is_empty());
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        h.insert(context::TRACEPARENT, http::HeaderValue::from_static(tp));
        let ids = tracer.begin(&mut h).unwrap();
        assert_ne!(h[&context::TRACEPARENT], tp);
        assert_eq!(
            ids.parent,
            Some([0, 0xf0, 0x67, 0xaa, 0x0b, 0xa9, 0x02, 0xb7])
        );
        tracer.record(ids, Arc::new(event(Direction::Inbound)));
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while memory.0.lock().unwrap().is_empty() {
            assert!(std::time::Instant::now() < deadline, "no export");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let spans = memory.0.lock().unwrap();
        assert_eq!(
            spans[0].span_context.span_id(),
            SpanId::from_bytes(ids.span_id)
        );
        let exported = ObserveMetrics::counter(&metrics.trace_spans, "exported");
        assert_eq!(exported.get(), 1);
    }

    #[tokio::test]
    async fn flush_exports_what_is_queued_without_waiting_for_the_interval() {
        let memory = Memory::default();
        let metrics = ObserveMetrics::default();
        let tracer = Tracer::with_exporter(memory.clone(), 1_000_000, 2048, &metrics);
        // More than a batch, queued faster than the loop's interval.
        for _ in 0..BATCH + 10 {
            let ids = tracer.begin(&mut HeaderMap::new()).unwrap();
            tracer.record(ids, Arc::new(event(Direction::Outbound)));
        }
        let started = std::time::Instant::now();
        assert!(
            tracer.flush(Duration::from_secs(5)).await,
            "flush did not finish"
        );
        assert!(
            started.elapsed() < INTERVAL,
            "flush waited {:?}",
            started.elapsed()
        );
        assert_eq!(memory.0.lock().unwrap().len(), BATCH + 10);
        // Later spans still go out at the interval.
        let ids = tracer.begin(&mut HeaderMap::new()).unwrap();
        tracer.record(ids, Arc::new(event(Direction::Outbound)));
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while memory.0.lock().unwrap().len() < BATCH + 11 {
            assert!(
                std::time::Instant::now() < deadline,
                "no export after a flush"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[tokio::test]
    async fn a_full_queue_drops_and_counts() {
        #[derive(Debug)]
        struct Stuck;
        impl SpanExporter for Stuck {
            async fn export(&self, _: Vec<SpanData>) -> opentelemetry_sdk::error::OTelSdkResult {
                std::future::pending().await
            }
        }
        let metrics = ObserveMetrics::default();
        let tracer = Tracer::with_exporter(Stuck, 1_000_000, 4, &metrics);
        for _ in 0..600 {
            let ids = tracer.begin(&mut HeaderMap::new()).unwrap();
            tracer.record(ids, Arc::new(event(Direction::Outbound)));
        }
        let dropped = ObserveMetrics::counter(&metrics.trace_spans, "dropped");
        // At most one batch taken by the stuck export plus the queue.
        assert!(dropped.get() >= 600 - 4 - BATCH as u64, "{}", dropped.get());
    }
}

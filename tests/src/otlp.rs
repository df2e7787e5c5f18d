//! A small OpenTelemetry collector for tests: a real OTLP/gRPC `TraceService` server (the
//! opentelemetry-proto definitions, served by tonic) that keeps every span it receives, plus
//! a client that exports a span the way an instrumented application would.
//!
//! [`Collector::start_stalled`] accepts exports and never answers them: a collector that is
//! up but too slow, for the proxy's bounded-queue tests.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, KeyValue};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{span, ResourceSpans, ScopeSpans, Span};

/// A span as the collector received it, flattened.
#[derive(Clone, Debug)]
pub struct Received {
    /// The resource's attributes (`service.name`, `k8s.pod.name`, ...).
    pub resource: HashMap<String, String>,
    pub trace_id: Vec<u8>,
    pub span_id: Vec<u8>,
    /// Empty for a root span.
    pub parent_span_id: Vec<u8>,
    pub kind: span::SpanKind,
    pub name: String,
    pub attributes: HashMap<String, String>,
    /// `opentelemetry.proto.trace.v1.Status.StatusCode` (0 unset, 1 ok, 2 error).
    pub status_code: i32,
    pub start_unix_nano: u64,
    pub end_unix_nano: u64,
}

impl Received {
    pub fn attr(&self, key: &str) -> Option<&str> {
        self.attributes.get(key).map(String::as_str)
    }
}

#[derive(Clone, Debug, Default)]
struct Store {
    spans: Arc<Mutex<Vec<Received>>>,
    stalled: bool,
}

#[tonic::async_trait]
impl TraceService for Store {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        if self.stalled {
            std::future::pending::<()>().await;
        }
        let mut out = Vec::new();
        for rs in request.into_inner().resource_spans {
            let resource = rs
                .resource
                .map(|r| attrs(&r.attributes))
                .unwrap_or_default();
            for ss in rs.scope_spans {
                for s in ss.spans {
                    out.push(Received {
                        resource: resource.clone(),
                        kind: span::SpanKind::try_from(s.kind)
                            .unwrap_or(span::SpanKind::Unspecified),
                        attributes: attrs(&s.attributes),
                        status_code: s.status.map(|st| st.code).unwrap_or_default(),
                        trace_id: s.trace_id,
                        span_id: s.span_id,
                        parent_span_id: s.parent_span_id,
                        name: s.name,
                        start_unix_nano: s.start_time_unix_nano,
                        end_unix_nano: s.end_time_unix_nano,
                    });
                }
            }
        }
        if let Ok(mut spans) = self.spans.lock() {
            spans.extend(out);
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

fn attrs(kvs: &[KeyValue]) -> HashMap<String, String> {
    kvs.iter()
        .map(|kv| {
            let v = match kv.value.as_ref().and_then(|v| v.value.as_ref()) {
                Some(any_value::Value::StringValue(s)) => s.clone(),
                Some(any_value::Value::IntValue(i)) => i.to_string(),
                Some(any_value::Value::BoolValue(b)) => b.to_string(),
                Some(any_value::Value::DoubleValue(d)) => d.to_string(),
                Some(other) => format!("{other:?}"),
                None => String::new(),
            };
            (kv.key.clone(), v)
        })
        .collect()
}

/// A running collector on loopback; stops on drop.
#[derive(Debug)]
pub struct Collector {
    pub addr: SocketAddr,
    store: Store,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Collector {
    /// A collector that stores what it receives.
    pub async fn start() -> Result<Self> {
        Self::serve(false).await
    }

    /// A collector that accepts exports and never answers them.
    pub async fn start_stalled() -> Result<Self> {
        Self::serve(true).await
    }

    async fn serve(stalled: bool) -> Result<Self> {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0)).await?;
        let addr = listener.local_addr()?;
        let store = Store {
            stalled,
            ..Default::default()
        };
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(store.clone()))
            .serve_with_incoming_shutdown(
                tonic::transport::server::TcpIncoming::from(listener),
                async {
                    let _ = stopped.await;
                },
            );
        tokio::spawn(server);
        Ok(Self {
            addr,
            store,
            stop: Some(stop),
        })
    }

    /// Every span received so far.
    pub fn spans(&self) -> Vec<Received> {
        self.store
            .spans
            .lock()
            .map(|s| s.clone())
            .unwrap_or_default()
    }

    /// Spans of one trace.
    pub fn trace(&self, trace_id: &[u8]) -> Vec<Received> {
        self.spans()
            .into_iter()
            .filter(|s| s.trace_id == trace_id)
            .collect()
    }

    /// Polls until `n` spans of `trace_id` arrived.
    pub async fn wait_for_trace(
        &self,
        trace_id: &[u8],
        n: usize,
        timeout: Duration,
    ) -> Result<Vec<Received>> {
        let deadline = Instant::now() + timeout;
        loop {
            let spans = self.trace(trace_id);
            if spans.len() >= n {
                return Ok(spans);
            }
            if Instant::now() > deadline {
                bail!(
                    "{} span(s) of trace {} within {timeout:?}, expected {n}: {:#?}",
                    spans.len(),
                    hex(trace_id),
                    self.spans()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Polls until at least `n` spans arrived in all.
    pub async fn wait_for(&self, n: usize, timeout: Duration) -> Result<Vec<Received>> {
        let deadline = Instant::now() + timeout;
        loop {
            let spans = self.spans();
            if spans.len() >= n || Instant::now() > deadline {
                return Ok(spans);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// Exports one SERVER span as an instrumented application would (service `name`), child of
/// `parent` in `trace_id`; returns its span id.
pub async fn export_app_span(
    collector: SocketAddr,
    service: &str,
    trace_id: [u8; 16],
    parent: [u8; 8],
) -> Result<[u8; 8]> {
    let span_id = loop {
        let id = fastrand_bytes();
        if id != [0; 8] {
            break id;
        }
    };
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos() as u64;
    let kv = |k: &str, v: &str| KeyValue {
        key: k.into(),
        value: Some(AnyValue {
            value: Some(any_value::Value::StringValue(v.into())),
        }),
        ..Default::default()
    };
    let req = ExportTraceServiceRequest {
        resource_spans: vec![ResourceSpans {
            resource: Some(Resource {
                attributes: vec![kv("service.name", service)],
                ..Default::default()
            }),
            scope_spans: vec![ScopeSpans {
                spans: vec![Span {
                    trace_id: trace_id.to_vec(),
                    span_id: span_id.to_vec(),
                    parent_span_id: parent.to_vec(),
                    name: "app handler".into(),
                    kind: span::SpanKind::Internal as i32,
                    start_time_unix_nano: now.saturating_sub(1_000_000),
                    end_time_unix_nano: now,
                    ..Default::default()
                }],
                ..Default::default()
            }],
            ..Default::default()
        }],
    };
    let mut client = TraceServiceClient::connect(format!("http://{collector}"))
        .await
        .context("connecting to the test collector")?;
    client.export(req).await.context("exporting the app span")?;
    Ok(span_id)
}

fn fastrand_bytes() -> [u8; 8] {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos() as u64;
    // splitmix64: enough randomness for a test id.
    let mut z = nanos.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    (z ^ (z >> 31)).to_be_bytes()
}

/// Lowercase hex.
pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Parses a `traceparent` value into (trace id, parent id, flags).
pub fn parse_traceparent(v: &str) -> Option<([u8; 16], [u8; 8], u8)> {
    let parts: Vec<&str> = v.split('-').collect();
    if parts.len() < 4 || parts[1].len() != 32 || parts[2].len() != 16 {
        return None;
    }
    let bytes = |s: &str| -> Option<Vec<u8>> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
            .collect()
    };
    Some((
        bytes(parts[1])?.try_into().ok()?,
        bytes(parts[2])?.try_into().ok()?,
        u8::from_str_radix(parts[3], 16).ok()?,
    ))
}

//! What distributed tracing costs per request on one proxy's thread, measured in-process
//! (the end-to-end figures, `weft-bench tracing-cost`, are CPU per request of real proxies
//! and carry the noise of a shared machine; these isolate the tracing work itself):
//!
//! - `off`: `Observe::begin` with no tracer and no sink (the proxy without a collector).
//! - `default, no context`: a tracer at sampling 0, the request without `traceparent`:
//!   the header lookups and the decision.
//! - `default, unsampled context`: the same with a `traceparent` whose flags say not sampled.
//! - `sampled context`: the caller's `traceparent` continued: ids drawn, the header
//!   rewritten, a `Draft` allocated, then finished: queued, turned into `SpanData` and handed
//!   to an exporter that discards it (the OTLP encoding and the socket write are not in this
//!   figure), all on the same current-thread runtime as in the proxy.
//!
//! Run: `cargo bench -p weft-proxy --bench tracing` (add `-- --iterations N`). Prints ns per
//! request for each.

use std::sync::Arc;
use std::time::Instant;

use http::{HeaderValue, Request};
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{SpanData, SpanExporter};
use weft_proxy::metrics::Direction;
use weft_proxy::observe::trace::Tracer;
use weft_proxy::observe::{Observe, ObserveMetrics};

#[derive(Debug)]
struct Discard;

impl SpanExporter for Discard {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        std::hint::black_box(batch);
        Ok(())
    }
}

fn request(traceparent: Option<&'static str>) -> Request<()> {
    let mut r = Request::get("http://books.demo.svc.cluster.local:8080/books/1?x=1")
        .header("user-agent", "bench")
        .header("accept", "*/*")
        .body(())
        .unwrap_or_default();
    if let Some(tp) = traceparent {
        r.headers_mut()
            .insert("traceparent", HeaderValue::from_static(tp));
    }
    r
}

const SAMPLED: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
const UNSAMPLED: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00";

fn main() {
    let iterations: usize = std::env::args()
        .skip_while(|a| a != "--iterations")
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or(200_000);
    let Ok(rt) = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    else {
        eprintln!("cannot build a runtime");
        return;
    };
    let peer = std::net::SocketAddr::from(([10, 0, 0, 1], 40000));
    rt.block_on(async {
        let metrics = ObserveMetrics::default();
        let off = Observe::disabled();
        let tracer = Tracer::with_exporter(Discard, 0, 2048, &metrics);
        let traced = Observe::with_tracer(Vec::new(), Some(tracer));

        let measure = |name: &str, o: &Arc<Observe>, tp: Option<&'static str>| {
            let o = o.clone();
            let name = name.to_string();
            async move {
                let mut ns = Vec::new();
                // Three passes; the best one is the figure (the others absorb warm-up).
                for _ in 0..3 {
                    let start = Instant::now();
                    for i in 0..iterations {
                        let mut req = request(tp);
                        let draft = o.begin(Direction::Outbound, peer, None, &mut req);
                        if let Some(mut d) = draft {
                            d.event.status = 200;
                            d.event.authority = "books.demo.svc.cluster.local:8080".into();
                            d.finish();
                        }
                        std::hint::black_box(&req);
                        // Let the export loop drain the queue now and then, as the
                        // proxy's runtime does between requests.
                        if i % 256 == 255 {
                            tokio::task::yield_now().await;
                        }
                    }
                    tokio::task::yield_now().await;
                    ns.push(start.elapsed().as_nanos() as f64 / iterations as f64);
                }
                let best = ns.iter().copied().fold(f64::INFINITY, f64::min);
                println!("{name:32} {best:8.0} ns/request");
                best
            }
        };
        let base = measure("off", &off, None).await;
        let base_tp = measure("off, request with traceparent", &off, Some(SAMPLED)).await;
        let d = measure("default, no context", &traced, None).await;
        let u = measure("default, unsampled context", &traced, Some(UNSAMPLED)).await;
        let s = measure("sampled context (span made)", &traced, Some(SAMPLED)).await;
        println!(
            "tracing's share: no context {:+.0} ns, unsampled {:+.0} ns, sampled {:+.0} ns \
             (each against `off` with the same request)",
            d - base,
            u - base_tp,
            s - base_tp
        );
        let c = |r: &'static str| ObserveMetrics::counter(&metrics.trace_spans, r).get();
        println!(
            "spans: exported {}, dropped {}",
            c("exported"),
            c("dropped")
        );
    });
}

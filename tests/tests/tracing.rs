//! Loopback tier: distributed tracing. Real `weft-proxy` processes export spans over
//! OTLP/gRPC to a real OTLP receiver (`weft_e2e::otlp::Collector`, opentelemetry-proto's
//! TraceService served by tonic); the app echoes the headers it received, so each test sees
//! both what the collector got and what the next hop was told. The mTLS case runs a real
//! `weft-controller --dev-ca`: needs `cargo build --bins -p weft-proxy -p weft-controller`.

#![allow(clippy::unwrap_used)] // tests fail loudly on unexpected errors

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use weft_e2e::client::Conn;
use weft_e2e::otlp::{export_app_span, hex, parse_traceparent, Collector, Received};
use weft_e2e::servers::http_server;
use weft_e2e::{Proxy, ProxyOpts};

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CALLER_SPAN: &str = "00f067aa0ba902b7";
const WAIT: Duration = Duration::from_secs(10);

fn env(collector: SocketAddr, extra: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut v = vec![(
        "WEFT_PROXY_TRACE_COLLECTOR_ADDR".to_string(),
        collector.to_string(),
    )];
    v.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    v
}

/// Client sidecar → server sidecar → app, both proxies tracing to `collector`.
fn two_hops(app: SocketAddr, collector: SocketAddr, extra: &[(&str, &str)]) -> (Proxy, Proxy) {
    let mut server_env = env(collector, extra);
    server_env.push(("WEFT_PROXY_NAMESPACE".into(), "shop".into()));
    server_env.push(("WEFT_PROXY_POD_NAME".into(), "books-0".into()));
    let server_side = Proxy::start(ProxyOpts {
        inbound_target: Some(app),
        env: server_env,
        ..Default::default()
    })
    .unwrap();
    let client_side = Proxy::start(ProxyOpts {
        outbound_target: Some(server_side.inbound),
        env: env(collector, extra),
        ..Default::default()
    })
    .unwrap();
    (client_side, server_side)
}

/// The headers the app received, from its `/headers` echo.
async fn app_headers(conn: &mut Conn, headers: &[(&str, &str)]) -> HashMap<String, String> {
    let (status, err, body) = conn
        .get_with("books.demo:80", "/headers?q=1", headers)
        .await
        .unwrap();
    assert_eq!(status, 200, "{err}");
    String::from_utf8_lossy(&body)
        .lines()
        .filter_map(|l| l.split_once(": "))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn unhex<const N: usize>(s: &str) -> [u8; N] {
    let mut out = [0; N];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).unwrap();
    }
    out
}

fn one(spans: &[Received], kind: SpanKind) -> &Received {
    let of_kind: Vec<_> = spans.iter().filter(|s| s.kind == kind).collect();
    assert_eq!(of_kind.len(), 1, "one {kind:?} span expected: {spans:#?}");
    of_kind[0]
}

/// A request traced after the ones under test: once its spans are in, anything the
/// earlier requests exported would be in too (one exporter queue per proxy, in order).
async fn sentinel(conn: &mut Conn, collector: &Collector) {
    let tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    app_headers(conn, &[("traceparent", tp)]).await;
    collector
        .wait_for_trace(&unhex::<16>("0af7651916cd43dd8448eb211c80319c"), 2, WAIT)
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_through_two_proxies_is_a_client_and_a_server_span_and_the_app_joins_the_trace() {
    let collector = Collector::start().await.unwrap();
    let (app, _) = http_server().await.unwrap();
    let (client_side, _server_side) = two_hops(app, collector.addr, &[]);
    let mut conn = Conn::open(client_side.outbound, false).await.unwrap();

    let tp = format!("00-{TRACE_ID}-{CALLER_SPAN}-01");
    let seen = app_headers(
        &mut conn,
        &[("traceparent", &tp), ("tracestate", "congo=t61rcWkgMzE")],
    )
    .await;

    let trace_id = unhex::<16>(TRACE_ID);
    let spans = collector.wait_for_trace(&trace_id, 2, WAIT).await.unwrap();
    assert_eq!(spans.len(), 2, "{spans:#?}");
    let client = one(&spans, SpanKind::Client);
    let server = one(&spans, SpanKind::Server);
    assert_eq!(hex(&client.parent_span_id), CALLER_SPAN);
    assert_eq!(server.parent_span_id, client.span_id);
    // The app was told the server sidecar's span is its parent; tracestate went through.
    let (app_trace, app_parent, flags) = parse_traceparent(&seen["traceparent"]).unwrap();
    assert_eq!(hex(&app_trace), TRACE_ID);
    assert_eq!(app_parent.to_vec(), server.span_id);
    assert_eq!(flags & 1, 1);
    assert_eq!(seen["tracestate"], "congo=t61rcWkgMzE");

    // Semantic-convention attributes, the resource, the timing.
    for s in [client, server] {
        assert_eq!(s.attr("http.request.method"), Some("GET"), "{s:#?}");
        assert_eq!(s.attr("url.path"), Some("/headers"));
        assert_eq!(s.attr("url.query"), Some("q=1"));
        assert_eq!(s.attr("server.address"), Some("books.demo"));
        assert_eq!(s.attr("server.port"), Some("80"));
        assert_eq!(s.attr("http.response.status_code"), Some("200"));
        assert_eq!(s.attr("network.protocol.version"), Some("1.1"));
        assert_eq!(s.attr("weft.retries"), Some("0"));
        assert!(s.attr("weft.endpoint").is_some());
        assert_eq!(
            s.resource.get("service.name").map(String::as_str),
            Some("weft-proxy")
        );
        assert_eq!(s.status_code, 0);
        assert!(s.end_unix_nano >= s.start_unix_nano && s.start_unix_nano > 0);
    }
    assert_eq!(client.attr("weft.direction"), Some("outbound"));
    assert_eq!(server.attr("weft.direction"), Some("inbound"));
    assert_eq!(server.attr("client.address"), Some("127.0.0.1"));
    assert_eq!(
        server
            .resource
            .get("k8s.namespace.name")
            .map(String::as_str),
        Some("shop")
    );
    assert_eq!(
        server.resource.get("k8s.pod.name").map(String::as_str),
        Some("books-0")
    );
    // The client span encloses the server span.
    assert!(client.start_unix_nano <= server.start_unix_nano);
    assert!(client.end_unix_nano >= server.end_unix_nano);

    // The app exports its own span with the traceparent it was given: one trace of three.
    let app_span = export_app_span(collector.addr, "books", app_trace, app_parent)
        .await
        .unwrap();
    let spans = collector.wait_for_trace(&trace_id, 3, WAIT).await.unwrap();
    assert_eq!(spans.len(), 3);
    let app = spans.iter().find(|s| s.span_id == app_span).unwrap();
    assert_eq!(app.parent_span_id, server.span_id);
    assert_eq!(
        app.resource.get("service.name").map(String::as_str),
        Some("books")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsampled_and_absent_contexts_make_no_spans_and_pass_untouched_at_default_sampling() {
    let collector = Collector::start().await.unwrap();
    let (app, _) = http_server().await.unwrap();
    let (client_side, _server_side) = two_hops(app, collector.addr, &[]);
    let mut conn = Conn::open(client_side.outbound, false).await.unwrap();

    let unsampled = format!("00-{TRACE_ID}-{CALLER_SPAN}-00");
    for _ in 0..5 {
        let seen = app_headers(&mut conn, &[("traceparent", &unsampled)]).await;
        assert_eq!(seen["traceparent"], unsampled);
        let seen = app_headers(&mut conn, &[]).await;
        assert!(!seen.contains_key("traceparent"), "{seen:?}");
        // An invalid context is no context.
        let bad = format!("00-{}-{CALLER_SPAN}-01", "0".repeat(32));
        let seen = app_headers(&mut conn, &[("traceparent", &bad)]).await;
        assert_eq!(seen["traceparent"], bad);
    }
    sentinel(&mut conn, &collector).await;
    assert_eq!(collector.spans().len(), 2, "{:#?}", collector.spans());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_head_sampling_starts_a_new_trace_per_request() {
    let collector = Collector::start().await.unwrap();
    let (app, _) = http_server().await.unwrap();
    let (client_side, _server_side) =
        two_hops(app, collector.addr, &[("WEFT_PROXY_TRACE_SAMPLING", "1")]);
    let mut conn = Conn::open(client_side.outbound, false).await.unwrap();
    let mut traces = Vec::new();
    for _ in 0..3 {
        let seen = app_headers(&mut conn, &[]).await;
        let (t, parent, _) = parse_traceparent(&seen["traceparent"]).unwrap();
        let spans = collector.wait_for_trace(&t, 2, WAIT).await.unwrap();
        let client = one(&spans, SpanKind::Client);
        let server = one(&spans, SpanKind::Server);
        assert!(client.parent_span_id.is_empty(), "a root span: {client:#?}");
        assert_eq!(server.parent_span_id, client.span_id);
        assert_eq!(parent.to_vec(), server.span_id);
        traces.push(t);
    }
    traces.sort();
    traces.dedup();
    assert_eq!(traces.len(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn b3_contexts_are_continued_in_w3c_and_b3() {
    let collector = Collector::start().await.unwrap();
    let (app, _) = http_server().await.unwrap();
    let (client_side, _server_side) = two_hops(app, collector.addr, &[]);
    let mut conn = Conn::open(client_side.outbound, false).await.unwrap();

    let b3_trace = "463ac35c9f6413ad48485a3953bb6124";
    let b3_span = "a2fb4a1d1a96d312";
    let seen = app_headers(
        &mut conn,
        &[
            ("x-b3-traceid", b3_trace),
            ("x-b3-spanid", b3_span),
            ("x-b3-sampled", "1"),
        ],
    )
    .await;
    let spans = collector
        .wait_for_trace(&unhex::<16>(b3_trace), 2, WAIT)
        .await
        .unwrap();
    let client = one(&spans, SpanKind::Client);
    let server = one(&spans, SpanKind::Server);
    assert_eq!(hex(&client.parent_span_id), b3_span);
    assert_eq!(server.parent_span_id, client.span_id);
    let (t, parent, _) = parse_traceparent(&seen["traceparent"]).unwrap();
    assert_eq!(hex(&t), b3_trace);
    assert_eq!(parent.to_vec(), server.span_id);
    assert_eq!(seen["x-b3-traceid"], b3_trace);
    assert_eq!(seen["x-b3-spanid"], hex(&server.span_id));
    assert_eq!(seen["x-b3-parentspanid"], hex(&client.span_id));

    // The single-header form, with a 64-bit trace id.
    let seen = app_headers(&mut conn, &[("b3", "48485a3953bb6124-a2fb4a1d1a96d312-1")]).await;
    let (t, _, _) = parse_traceparent(&seen["traceparent"]).unwrap();
    assert_eq!(hex(&t), "000000000000000048485a3953bb6124");
    collector.wait_for_trace(&t, 2, WAIT).await.unwrap();
    assert!(seen["b3"].starts_with("000000000000000048485a3953bb6124-"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_succeed_with_the_collector_down_and_lost_spans_are_counted() {
    // Nothing listens here.
    let nowhere = weft_e2e::free_addr().unwrap();
    let (app, _) = http_server().await.unwrap();
    let proxy = Proxy::start(ProxyOpts {
        outbound_target: Some(app),
        env: env(nowhere, &[("WEFT_PROXY_TRACE_SAMPLING", "1")]),
        ..Default::default()
    })
    .unwrap();
    let mut conn = Conn::open(proxy.outbound, false).await.unwrap();
    for _ in 0..50 {
        let seen = app_headers(&mut conn, &[]).await;
        assert!(seen.contains_key("traceparent"));
    }
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let m = proxy.metrics().unwrap();
        let lost = m.sum("weft_trace_spans_total", &[("result", "failed")])
            + m.sum("weft_trace_spans_total", &[("result", "dropped")]);
        if lost >= 50.0 {
            assert_eq!(
                m.sum("weft_trace_spans_total", &[("result", "exported")]),
                0.0
            );
            break;
        }
        assert!(std::time::Instant::now() < deadline, "lost spans: {lost}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_collector_that_never_answers_costs_bounded_memory_and_drops_are_counted() {
    let collector = Collector::start_stalled().await.unwrap();
    let (app, _) = http_server().await.unwrap();
    let proxy = Proxy::start(ProxyOpts {
        outbound_target: Some(app),
        env: env(collector.addr, &[("WEFT_PROXY_TRACE_SAMPLING", "1")]),
        ..Default::default()
    })
    .unwrap();
    let send = |n: usize| {
        let addr = proxy.outbound;
        async move {
            let mut tasks = Vec::new();
            for _ in 0..8 {
                tasks.push(tokio::spawn(async move {
                    let mut conn = Conn::open(addr, false).await.unwrap();
                    for _ in 0..n / 8 {
                        let (status, err, _) = conn.get("books.demo:80", "/").await.unwrap();
                        assert_eq!(status, 200, "{err}");
                    }
                }));
            }
            for t in tasks {
                t.await.unwrap();
            }
        }
    };
    // Past the queue (2048) and one batch: the steady state.
    send(4_000).await;
    let rss_before = proxy.rss_bytes().unwrap();
    let dropped_before = proxy
        .metrics()
        .unwrap()
        .sum("weft_trace_spans_total", &[("result", "dropped")]);
    send(20_000).await;
    let rss_after = proxy.rss_bytes().unwrap();
    let m = proxy.metrics().unwrap();
    let dropped = m.sum("weft_trace_spans_total", &[("result", "dropped")]);
    // Everything beyond the queue and the batches in flight is dropped.
    assert!(
        dropped - dropped_before >= 15_000.0,
        "dropped {dropped_before} -> {dropped}"
    );
    let growth = rss_after.saturating_sub(rss_before);
    eprintln!(
        "stalled collector: dropped {dropped_before} -> {dropped}, failed {}, RSS {rss_before} -> {rss_after}",
        m.sum("weft_trace_spans_total", &[("result", "failed")])
    );
    assert!(
        growth < 8 << 20,
        "RSS grew by {growth} bytes ({rss_before} -> {rss_after}) over 20,000 traced requests"
    );
}

/// Over the mesh: a controller with a development CA, mutual TLS between the proxies, the
/// client proxy routing by name. The spans carry the verified identities and the endpoint.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mtls_spans_carry_the_peer_identities_and_the_balanced_endpoint() {
    use weft_e2e::controller::{meshed_service_yaml, DevCa};
    const NS: &str = "books";
    let collector = Collector::start().await.unwrap();
    let (app, _) = http_server().await.unwrap();
    let ca = DevCa::start("tracing-mtls", &[]).unwrap();

    let token = ca.token(NS, "books").unwrap();
    let mut server_env = ca.proxy_env(NS, "books", &token);
    server_env.extend(env(collector.addr, &[]));
    let mut server_side = Proxy::spawn(ProxyOpts {
        inbound_target: Some(app),
        env: server_env,
        ..Default::default()
    })
    .unwrap();
    server_side.wait_ready(Duration::from_secs(15)).unwrap();
    ca.manifests
        .write(
            "books.yaml",
            &meshed_service_yaml(
                NS,
                "books",
                "10.96.0.50",
                8080,
                &[(server_side.inbound, "books")],
                false,
            ),
        )
        .unwrap();
    ca.controller.wait_objects("EndpointSlice", 1.0).unwrap();

    let token = ca.token(NS, "web").unwrap();
    let mut client_env = ca.proxy_env(NS, "web", &token);
    client_env.push(ca.controller.env());
    client_env.extend(env(collector.addr, &[]));
    let mut client_side = Proxy::spawn(ProxyOpts {
        outbound_target: Some("10.96.0.50:8080".parse().unwrap()),
        env: client_env,
        ..Default::default()
    })
    .unwrap();
    client_side.wait_ready(Duration::from_secs(15)).unwrap();

    let mut conn = Conn::open(client_side.outbound, false).await.unwrap();
    let tp = format!("00-{TRACE_ID}-{CALLER_SPAN}-01");
    let (status, err, _) = conn
        .get_with(
            "books.books.svc.cluster.local:8080",
            "/",
            &[("traceparent", &tp)],
        )
        .await
        .unwrap();
    assert_eq!(status, 200, "{err}");
    let spans = collector
        .wait_for_trace(&unhex::<16>(TRACE_ID), 2, WAIT)
        .await
        .unwrap();
    let client = one(&spans, SpanKind::Client);
    let server = one(&spans, SpanKind::Server);
    assert_eq!(server.parent_span_id, client.span_id);
    assert_eq!(
        client.attr("weft.server_id"),
        Some("spiffe://cluster.local/ns/books/sa/books")
    );
    assert_eq!(
        client.attr("weft.endpoint"),
        Some(server_side.inbound.to_string().as_str())
    );
    assert_eq!(
        server.attr("weft.client_id"),
        Some("spiffe://cluster.local/ns/books/sa/web")
    );
    assert_eq!(
        client
            .resource
            .get("k8s.namespace.name")
            .map(String::as_str),
        Some("books")
    );
}

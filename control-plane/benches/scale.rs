//! Controller scale benchmark (issue 3, "Controller scale").
//!
//! Builds an index of 5,000 services and 50,000 endpoints (plus their
//! 50,000 pods) in-process, serves `Destination.Resolve` on loopback, opens
//! 500 Resolve streams over 500 separate HTTP/2 connections (one per
//! simulated proxy), then changes the watched service's endpoints and
//! measures how long each change takes to reach every stream.
//!
//! Memory is measured two ways: live heap bytes held after building the
//! index (a counting global allocator: exact, excludes allocator slack) and
//! the process RSS delta (what an operator sees; includes slack).
//!
//! Run: `cargo bench -p weft-controller --bench scale -- [--services 5000]
//! [--endpoints-per-service 10] [--streams 500] [--changes 200]
//! [--interval-ms 20]`. Results are recorded in benches/CONTROLLER.md.

#![allow(clippy::unwrap_used)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicIsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Parser;
use weft_controller::grpc::destination::DestinationConfig;
use weft_controller::grpc::DestinationService;
use weft_controller::index::{Change, Index};
use weft_controller::metrics::Metrics;
use weft_controller::model::{
    AddressType, ContainerPort, EndpointSlice, Object, ObjectKey, Pod, PortSet, Service,
    ServicePort, SliceEndpoint, SlicePort, TargetPort,
};
use weft_proto::destination::destination_client::DestinationClient;
use weft_proto::destination::destination_server::DestinationServer;
use weft_proto::destination::{update, CallerContext, ResolveRequest};

struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

// SAFETY: forwards to the system allocator and only counts bytes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: same contract as our caller's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: same contract as our caller's.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(
            new_size as isize - layout.size() as isize,
            Ordering::Relaxed,
        );
        // SAFETY: same contract as our caller's.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

#[derive(Debug, Parser)]
struct Args {
    #[arg(long, default_value_t = 5000)]
    services: usize,
    #[arg(long, default_value_t = 10)]
    endpoints_per_service: usize,
    #[arg(long, default_value_t = 500)]
    streams: usize,
    #[arg(long, default_value_t = 200)]
    changes: usize,
    /// Pause between changes, so each change is a separate update.
    #[arg(long, default_value_t = 20)]
    interval_ms: u64,
}

fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

fn mib(bytes: f64) -> f64 {
    bytes / (1024.0 * 1024.0)
}

fn endpoint_ip(n: usize) -> IpAddr {
    let n = u32::try_from(n).unwrap();
    IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + 0x0001_0000 + n))
}

fn namespace(s: usize) -> String {
    format!("ns-{}", s % 50)
}

fn slice(s: usize, eps: &[(IpAddr, String)]) -> Object {
    let ns = namespace(s);
    Object::EndpointSlice(EndpointSlice {
        key: ObjectKey::new(ns, format!("svc-{s}-abcde")),
        service: Some(format!("svc-{s}")),
        address_type: AddressType::IPv4,
        ports: vec![SlicePort {
            name: Some("http".into()),
            port: Some(8080),
            protocol: "TCP".into(),
        }],
        endpoints: eps
            .iter()
            .map(|(ip, pod)| SliceEndpoint {
                addresses: vec![*ip],
                ready: true,
                serving: true,
                terminating: false,
                zone: Some(format!("zone-{}", ip.to_string().len() % 3)),
                pod: Some(pod.clone()),
            })
            .collect(),
    })
}

fn pod(s: usize, name: &str, ip: IpAddr) -> Object {
    Object::Pod(Pod {
        key: ObjectKey::new(namespace(s), name.to_string()),
        ips: vec![ip],
        labels: [
            ("app".to_string(), format!("svc-{s}")),
            ("pod-template-hash".to_string(), "5d8f7c9b4".to_string()),
        ]
        .into_iter()
        .collect(),
        service_account: format!("svc-{s}"),
        meshed: true,
        container_ports: vec![ContainerPort {
            name: Some("http".into()),
            port: 8080,
            protocol: "TCP".into(),
            container: "app".into(),
        }],
        opaque_ports: PortSet::default(),
        terminated: false,
        proxy_inbound_port: weft_controller::model::DEFAULT_PROXY_INBOUND_PORT,
        inbound: Default::default(),
    })
}

fn build(index: &Index, args: &Args) {
    let mut next_ip = 0;
    for s in 0..args.services {
        let mut batch = Vec::with_capacity(args.endpoints_per_service + 2);
        let ns = namespace(s);
        batch.push(Object::Service(Service {
            key: ObjectKey::new(ns, format!("svc-{s}")),
            cluster_ips: vec![IpAddr::V4(Ipv4Addr::from(
                0x0a60_0000 + u32::try_from(s).unwrap(),
            ))],
            headless: false,
            ports: vec![ServicePort {
                name: Some("http".into()),
                port: 80,
                target_port: TargetPort::Name("http".into()),
                protocol: "TCP".into(),
                node_port: None,
            }],
            selector: Some(
                [("app".to_string(), format!("svc-{s}"))]
                    .into_iter()
                    .collect(),
            ),
            affinity_timeout_s: None,
            external_traffic_local: false,
        }));
        let mut eps = Vec::new();
        for e in 0..args.endpoints_per_service {
            let ip = endpoint_ip(next_ip);
            next_ip += 1;
            let name = format!("svc-{s}-7d9f8b6c5-{e:05}");
            batch.push(pod(s, &name, ip));
            eps.push((ip, name));
        }
        batch.push(slice(s, &eps));
        index.apply(batch.into_iter().map(Change::Upsert));
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn main() -> anyhow::Result<()> {
    // `cargo bench` passes --bench; ignore it.
    let args = Args::parse_from(std::env::args().filter(|a| a != "--bench"));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    let index = Index::new();
    let (heap0, rss0) = (LIVE.load(Ordering::Relaxed), rss_bytes());
    let t0 = Instant::now();
    build(&index, &args);
    let build_time = t0.elapsed();
    let (heap1, rss1) = (LIVE.load(Ordering::Relaxed), rss_bytes());
    let counts = index.counts();
    let endpoints: usize = index
        .read()
        .slices
        .values()
        .map(|s| s.endpoints.len())
        .sum();
    eprintln!("built {counts:?} ({endpoints} endpoints) in {build_time:?}");

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr: SocketAddr = listener.local_addr()?;
    let svc = DestinationService::new(index.clone(), DestinationConfig::default(), Metrics::new());
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(DestinationServer::new(svc))
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
    );

    // The hot service every stream watches, and the endpoints we churn.
    let hot = 0usize;
    let received: Arc<Mutex<Vec<HashMap<IpAddr, Instant>>>> =
        Arc::new(Mutex::new(vec![HashMap::new(); args.streams]));
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::channel::<()>(args.streams);
    let heap_before_streams = LIVE.load(Ordering::Relaxed);
    for i in 0..args.streams {
        // One connection per simulated proxy.
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
            .connect()
            .await
            .context("connect")?;
        let mut client = DestinationClient::new(channel);
        let mut stream = client
            .resolve(ResolveRequest {
                target: format!("svc-{hot}.{}:80", namespace(hot)),
                context: Some(CallerContext {
                    namespace: format!("ns-{}", i % 50),
                    pod_name: format!("proxy-{i}"),
                    service_account: "default".into(),
                }),
            })
            .await?
            .into_inner();
        let received = received.clone();
        let ready = ready_tx.clone();
        tokio::spawn(async move {
            let _client = client;
            let mut first = true;
            while let Ok(Some(msg)) = stream.message().await {
                let now = Instant::now();
                if first {
                    first = false;
                    let _ = ready.send(()).await;
                    continue;
                }
                if let Some(update::Update::Add(add)) = msg.update {
                    let mut r = received.lock().unwrap();
                    for ep in add.endpoints {
                        if let Ok(a) = ep.socket_addr() {
                            r[i].entry(a.ip()).or_insert(now);
                        }
                    }
                }
            }
        });
    }
    drop(ready_tx);
    for _ in 0..args.streams {
        ready_rx
            .recv()
            .await
            .context("a stream ended before its first update")?;
    }
    let heap_streams = LIVE.load(Ordering::Relaxed) - heap_before_streams;
    eprintln!("{} streams open", args.streams);

    // Each change adds one new endpoint to the hot service and drops the
    // previous extra one (a rolling replacement).
    let base: Vec<(IpAddr, String)> = index
        .read()
        .slices
        .get(&ObjectKey::new(namespace(hot), format!("svc-{hot}-abcde")))
        .map(|s| {
            s.endpoints
                .iter()
                .map(|e| (e.addresses[0], e.pod.clone().unwrap_or_default()))
                .collect()
        })
        .unwrap_or_default();
    let mut sent: Vec<(IpAddr, Instant)> = Vec::new();
    let mut apply_times = Vec::new();
    for c in 0..args.changes {
        let ip = IpAddr::V4(Ipv4Addr::new(10, 250, (c / 250) as u8, (c % 250) as u8 + 1));
        let name = format!("svc-{hot}-extra-{c}");
        let mut eps = base.clone();
        eps.push((ip, name.clone()));
        let t = Instant::now();
        index.apply([
            Change::Upsert(pod(hot, &name, ip)),
            Change::Upsert(slice(hot, &eps)),
        ]);
        apply_times.push(t.elapsed());
        sent.push((ip, t));
        tokio::time::sleep(Duration::from_millis(args.interval_ms)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;

    // A stream may get two quick changes in one update (the index
    // coalesces wake-ups), so change c has reached a stream at the first
    // update that reflects c or any later change.
    let received = received.lock().unwrap();
    let mut latencies = Vec::with_capacity(args.changes * args.streams);
    let mut all_streams = vec![Duration::ZERO; sent.len()];
    let mut coalesced = 0usize;
    let mut never = 0usize;
    for r in received.iter() {
        let mut earliest: Option<Instant> = None;
        for (c, (ip, t)) in sent.iter().enumerate().rev() {
            match r.get(ip) {
                Some(at) => earliest = Some(earliest.map_or(*at, |e| e.min(*at))),
                None => coalesced += 1,
            }
            match earliest {
                Some(at) => {
                    let d = at.saturating_duration_since(*t);
                    latencies.push(d);
                    all_streams[c] = all_streams[c].max(d);
                }
                None => never += 1,
            }
        }
    }
    latencies.sort();
    apply_times.sort();
    all_streams.sort();
    let missing = never;

    println!("| figure | value |");
    println!("|---|---|");
    println!(
        "| services / endpoints / pods | {} / {} / {} |",
        counts[&weft_controller::model::Kind::Service],
        endpoints,
        counts[&weft_controller::model::Kind::Pod]
    );
    println!("| index build time | {:.2} s |", build_time.as_secs_f64());
    println!(
        "| index live heap (counting allocator) | {:.1} MiB |",
        mib((heap1 - heap0) as f64)
    );
    println!(
        "| process RSS delta while building | {:.1} MiB |",
        mib(rss1.saturating_sub(rss0) as f64)
    );
    println!(
        "| process RSS total with {} streams open | {:.1} MiB |",
        args.streams,
        mib(rss_bytes() as f64)
    );
    println!(
        "| heap per open stream (client + server side) | {:.1} KiB |",
        heap_streams as f64 / args.streams as f64 / 1024.0
    );
    println!(
        "| changes × streams | {} × {} = {}; {} folded into a later update, {} never seen |",
        args.changes,
        args.streams,
        args.changes * args.streams,
        coalesced,
        missing
    );
    println!("| change interval | {} ms |", args.interval_ms);
    println!(
        "| change → stream latency p50 / p99 / max | {:.2} / {:.2} / {:.2} ms |",
        percentile(&latencies, 0.5).as_secs_f64() * 1e3,
        percentile(&latencies, 0.99).as_secs_f64() * 1e3,
        latencies.last().copied().unwrap_or_default().as_secs_f64() * 1e3
    );
    println!(
        "| change → all {} streams p50 / p99 | {:.2} / {:.2} ms |",
        args.streams,
        percentile(&all_streams, 0.5).as_secs_f64() * 1e3,
        percentile(&all_streams, 0.99).as_secs_f64() * 1e3
    );
    println!(
        "| index apply (write lock held + notify) p50 / p99 | {:.1} / {:.1} µs |",
        percentile(&apply_times, 0.5).as_secs_f64() * 1e6,
        percentile(&apply_times, 0.99).as_secs_f64() * 1e6
    );
    Ok(())
}

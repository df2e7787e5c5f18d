//! Smoke tests: the generator against the in-process bench server on
//! loopback, for each protocol, then the `run` command end to end with the
//! baseline (and HAProxy, when it is installed).

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use weft_bench::load::{LoadGenerator, LoadSpec, Pacing, Protocol};

async fn start_server() -> (SocketAddr, tokio::task::JoinHandle<anyhow::Result<()>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    (
        addr,
        tokio::spawn(weft_bench::server::serve(listener, 1024)),
    )
}

async fn one_second(protocol: Protocol) {
    let (addr, server) = start_server().await;
    let spec = LoadSpec {
        connect: addr,
        authority: addr.to_string(),
        protocol,
        connections: 4,
        streams: 4,
        request_size: 1024,
        response_size: 1024,
    };
    let mut load = LoadGenerator::connect(&spec, Duration::from_secs(5))
        .await
        .expect("connect");
    let expected_slots = if protocol == Protocol::Http1 { 4 } else { 16 };
    assert_eq!(load.slots(), expected_slots);

    let open = load
        .run(Pacing::Open { rate: 500.0 }, Duration::from_secs(1))
        .await
        .expect("open-loop run");
    let summary = open.summary();
    assert_eq!(
        open.errors, 0,
        "{protocol:?} errors: {:?}",
        open.error_samples
    );
    assert_eq!(
        open.ok, 500,
        "{protocol:?}: every scheduled request completes"
    );
    assert!(
        summary.p50_us > 0 && summary.p50_us <= summary.p99_us && summary.p99_us <= summary.max_us
    );
    assert!(
        summary.achieved_rps > 400.0,
        "{protocol:?}: {}",
        summary.one_line()
    );

    let closed = load
        .run(Pacing::Closed, Duration::from_millis(300))
        .await
        .expect("closed-loop run");
    assert_eq!(
        closed.errors, 0,
        "{protocol:?} errors: {:?}",
        closed.error_samples
    );
    assert!(
        closed.ok > 50,
        "{protocol:?}: only {} requests back to back",
        closed.ok
    );
    server.abort();
}

#[tokio::test]
async fn http1_loopback() {
    one_second(Protocol::Http1).await;
}

#[tokio::test]
async fn http2_loopback() {
    one_second(Protocol::Http2).await;
}

#[tokio::test]
async fn grpc_loopback() {
    one_second(Protocol::Grpc).await;
}

/// A wrong response size is an error the generator reports, not a success.
#[tokio::test]
async fn wrong_body_length_is_an_error() {
    let (addr, server) = start_server().await;
    let spec = LoadSpec {
        connect: addr,
        authority: addr.to_string(),
        protocol: Protocol::Http1,
        connections: 1,
        streams: 1,
        request_size: 0,
        response_size: 10,
    };
    let mut load = LoadGenerator::connect(&spec, Duration::from_secs(5))
        .await
        .expect("connect");
    let run = load
        .run(Pacing::Open { rate: 100.0 }, Duration::from_millis(100))
        .await
        .expect("run");
    assert_eq!((run.ok, run.errors), (0, 10));
    assert!(
        run.error_samples[0].contains("1024 bytes, expected 10"),
        "{:?}",
        run.error_samples
    );
    server.abort();
}

/// Runs `weft-bench run --quick` on `scenarios` at 200 req/s over 2 connections (1 s
/// measured, no warm-up, 500 ms at max throughput) and returns its `<out>/<name>.json`.
fn quick_run(scenarios: &str, name: &str, out: &Path) -> serde_json::Value {
    let status = std::process::Command::new(env!("CARGO_BIN_EXE_weft-bench"))
        .args(["run", "--quick", "--scenarios", scenarios])
        .args([
            "--duration",
            "1s",
            "--warmup",
            "0",
            "--max-duration",
            "500ms",
        ])
        .args(["--rate", "200", "--connections", "2", "--name", name])
        .arg("--out-dir")
        .arg(out)
        .env("WEFT_BENCH_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .status()
        .expect("run weft-bench");
    assert!(status.success(), "weft-bench run failed: {status}");
    let path = out.join(format!("{name}.json"));
    let json = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    serde_json::from_str(&json).expect("valid JSON")
}

/// `weft-bench run` end to end: server child, pinning, /proc sampling,
/// report files. HAProxy joins when it is installed.
#[test]
fn run_command_writes_reports() {
    let out = std::env::temp_dir().join(format!("weft-bench-smoke-{}", std::process::id()));
    let mut scenarios = "direct".to_owned();
    if Path::new("/usr/sbin/haproxy").is_file() {
        scenarios.push_str(",haproxy");
    }
    let doc = quick_run(&scenarios, "smoke", &out);
    let runs = doc["scenarios"].as_array().expect("scenarios");
    assert_eq!(runs.len(), scenarios.split(',').count());
    for run in runs {
        assert!(run["error"].is_null(), "{run}");
        assert_eq!(run["latency"]["errors"], 0, "{run}");
        assert!(
            run["latency"]["requests"].as_u64().unwrap_or(0) >= 190,
            "{run}"
        );
        assert!(
            run["max_throughput"]["requests"].as_u64().unwrap_or(0) > 0,
            "{run}"
        );
        for p in run["processes"].as_array().expect("processes") {
            assert!(p["rss_idle_kib"].as_u64().unwrap_or(0) > 0, "{p}");
        }
    }
    let _ = std::fs::remove_dir_all(&out);
}

/// `weft2-disc` and `weft2-mtls` end to end with the proxy and controller built next to
/// `weft-bench` (`cargo build --workspace --bins`): requests are routed by name through the
/// controller, and in `weft2-mtls` they cross one reused mutual-TLS connection, as the
/// proxies' own counters must show (the scenario fails otherwise). Skipped when the binaries
/// are missing, except in CI.
#[test]
fn mesh_scenarios_route_by_name_and_use_mtls() {
    let bench = Path::new(env!("CARGO_BIN_EXE_weft-bench"));
    let missing: Vec<_> = ["weft-proxy", "weft-controller"]
        .into_iter()
        .filter(|b| !bench.with_file_name(b).is_file())
        .collect();
    if !missing.is_empty() {
        let why = format!(
            "{missing:?} not built next to {}: run `cargo build --workspace --bins` first",
            bench.display()
        );
        assert!(std::env::var("CI").as_deref() != Ok("true"), "{why}");
        eprintln!("skipping: {why}");
        return;
    }
    let out = std::env::temp_dir().join(format!("weft-bench-smoke-mesh-{}", std::process::id()));
    let doc = quick_run("weft2-disc,weft2-mtls", "smoke-mesh", &out);
    let runs = doc["scenarios"].as_array().expect("scenarios");
    assert_eq!(runs.len(), 2);
    for run in runs {
        assert!(run["error"].is_null(), "{run}");
        assert_eq!(run["latency"]["errors"], 0, "{run}");
        let mesh = &run["mesh"];
        let requests = mesh["requests"].as_f64().unwrap_or(0.0);
        assert!(requests >= 190.0, "{run}");
        assert!(
            mesh["routed_by_discovery"].as_f64().unwrap_or(0.0) >= requests * 0.99,
            "{run}"
        );
    }
    let mtls = &runs[1]["mesh"];
    assert!(
        mtls["tls_outbound"].as_f64().unwrap_or(0.0) >= 1.0,
        "{mtls}"
    );
    assert!(mtls["tls_inbound"].as_f64().unwrap_or(0.0) >= 1.0, "{mtls}");
    assert_eq!(
        runs[0]["mesh"]["tls_any"].as_f64(),
        Some(0.0),
        "{}",
        runs[0]
    );
    let _ = std::fs::remove_dir_all(&out);
}

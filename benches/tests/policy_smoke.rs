//! Smoke tests of the traffic-policy benchmarks (issue 12): the bench server's fault
//! injection against the generator in-process, then `weft-bench retries`, `ejection` and
//! `routing-cost` end to end on short windows, with `weft-proxy` and `weft-controller` built
//! next to `weft-bench` (skipped otherwise, a failure when `CI=true`). They check that each
//! command completes and reports numbers; no figure is judged here.

use std::path::{Path, PathBuf};
use std::time::Duration;

use weft_bench::load::{LoadGenerator, LoadSpec, Pacing, Protocol};
use weft_bench::server::{serve_with, Fault, ServeOptions};

/// Every 5th request answered 503 reaches the client as an error; flipped to hard failure,
/// every request does.
#[tokio::test]
async fn injected_failures_reach_the_client() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let fault = Fault::every(5);
    let server = tokio::spawn(serve_with(
        listener,
        ServeOptions {
            response_size: 16,
            fault: Some(fault.clone()),
            ..Default::default()
        },
    ));
    let spec = LoadSpec {
        connect: addr,
        authority: addr.to_string(),
        protocol: Protocol::Http1,
        connections: 1,
        streams: 1,
        request_size: 0,
        response_size: 16,
    };
    let mut load = LoadGenerator::connect(&spec, Duration::from_secs(5))
        .await
        .expect("connect");
    let pacing = Pacing::Open { rate: 100.0 };
    let stats = load
        .run(pacing, Duration::from_millis(200))
        .await
        .expect("run");
    assert_eq!(
        (stats.ok, stats.errors),
        (16, 4),
        "{:?}",
        stats.error_samples
    );
    assert!(
        stats.error_samples[0].contains("503"),
        "{:?}",
        stats.error_samples
    );
    fault.set_every(1);
    let stats = load
        .run(pacing, Duration::from_millis(100))
        .await
        .expect("run");
    assert_eq!((stats.ok, stats.errors), (0, 10));
    assert_eq!(fault.failed(), 14);
    server.abort();
}

/// The directory of `weft-bench`, or `None` (after saying why) when the proxy or the
/// controller is not built next to it.
fn binaries() -> Option<PathBuf> {
    let bench = Path::new(env!("CARGO_BIN_EXE_weft-bench"));
    let missing: Vec<_> = ["weft-proxy", "weft-controller"]
        .into_iter()
        .filter(|b| !bench.with_file_name(b).is_file())
        .collect();
    if missing.is_empty() {
        return Some(bench.to_owned());
    }
    let why = format!(
        "{missing:?} not built next to {}: run `cargo build --workspace --bins` first",
        bench.display()
    );
    assert!(std::env::var("CI").as_deref() != Ok("true"), "{why}");
    eprintln!("skipping: {why}");
    None
}

/// Runs `weft-bench <command> --quick` with 1 s windows at 200 req/s over 2 connections and
/// returns its JSON document.
fn quick(command: &str) -> Option<serde_json::Value> {
    let bench = binaries()?;
    let out = std::env::temp_dir().join(format!(
        "weft-bench-policy-smoke-{command}-{}",
        std::process::id()
    ));
    let status = std::process::Command::new(&bench)
        .args([command, "--quick", "--duration", "1s", "--warmup", "500ms"])
        .args(["--rate", "200", "--connections", "2", "--name", "smoke"])
        .arg("--out-dir")
        .arg(&out)
        .env("WEFT_BENCH_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .status()
        .expect("run weft-bench");
    assert!(status.success(), "weft-bench {command} failed: {status}");
    let path = out.join("smoke.json");
    let json = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    let _ = std::fs::remove_dir_all(&out);
    Some(serde_json::from_str(&json).expect("valid JSON"))
}

fn number(v: &serde_json::Value) -> f64 {
    v.as_f64().unwrap_or_else(|| panic!("not a number: {v}"))
}

#[test]
fn retries_reports_success_and_extra_load() {
    let Some(doc) = quick("retries") else { return };
    let runs = doc["runs"].as_array().expect("runs");
    assert_eq!(runs.len(), 2, "{doc}");
    for run in runs {
        assert!(number(&run["client_requests"]) > 0.0, "{run}");
        assert!((0.0..=1.0).contains(&number(&run["success"])), "{run}");
        number(&run["extra_load"]);
        number(&run["retries"]);
        number(&run["budget_exhausted"]);
    }
    number(&doc["subject"]["success"]["median"]);
    assert!(doc["success_ok"].is_boolean() && doc["extra_load_ok"].is_boolean());
}

#[test]
fn ejection_reports_success_and_time_to_ejection() {
    let Some(doc) = quick("ejection") else { return };
    let runs = doc["runs"].as_array().expect("runs");
    assert_eq!(runs.len(), 2, "{doc}");
    for run in runs {
        assert!(number(&run["client_requests"]) > 0.0, "{run}");
        number(&run["success"]);
        let t = &run["time_to_ejection_ms"];
        assert!(t.is_null() || t.is_number(), "{run}");
    }
    number(&doc["baseline_success"]["median"]);
    assert!(doc["ejected_ok"].is_boolean() && doc["success_ok"].is_boolean());
}

#[test]
fn routing_cost_reports_cpu_and_latency() {
    let Some(doc) = quick("routing-cost") else {
        return;
    };
    let runs = doc["runs"].as_array().expect("runs");
    assert_eq!(runs.len(), 4, "{doc}");
    for run in runs {
        assert!(number(&run["requests"]) > 0.0, "{run}");
        number(&run["p50_us"]);
        if run["path"] != "direct" {
            number(&run["a_cpu_us_per_req"]);
        }
    }
    assert!(doc["cpu_ok"].is_boolean() && doc["latency_ok"].is_boolean());
}

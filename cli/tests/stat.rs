//! `weft stat` end to end, against the demo's proxies: `--from-proxies` and `--source dir:`
//! (two scrapes of the proxies' `/metrics`) and `--prometheus` (Debian's real Prometheus
//! scraping the same proxies, with the chart's recording rules), each checked against what
//! the proxies themselves counted over the same stretch of time; and every error message.
//!
//! Needs `cargo build -p weft-proxy -p weft-controller`; the Prometheus test needs
//! `prometheus` (scripts/setup.sh) and passes with a notice without it, except under CI=true.
#![allow(clippy::unwrap_used)]

mod support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use serde_json::Value;
use support::prometheus::{self, Prometheus};
use support::{scrape, sum, RunningDemo};
use weft_cli::promtext::Sample;

fn weft_stat(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_weft"))
        .arg("stat")
        .args(args)
        .output()
        .expect("run weft stat")
}

/// The JSON rows of a successful `weft stat -o json`.
fn rows(args: &[&str]) -> Vec<Value> {
    let out = weft_stat(args);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "weft stat {args:?}: {}\n{stdout}{stderr}",
        out.status
    );
    match serde_json::from_str(&stdout) {
        Ok(Value::Array(rows)) => rows,
        other => panic!("weft stat {args:?}: not a JSON array: {other:?}\n{stdout}"),
    }
}

fn row<'a>(rows: &'a [Value], name: &str) -> &'a Value {
    rows.iter()
        .find(|r| r["name"] == name)
        .unwrap_or_else(|| panic!("no row {name} in {rows:#?}"))
}

fn num(v: &Value, key: &str) -> f64 {
    v[key]
        .as_f64()
        .unwrap_or_else(|| panic!("{key} is not a number in {v}"))
}

/// `a` within `tolerance` (a fraction) of `b`.
fn near(a: f64, b: f64, tolerance: f64) -> bool {
    (a - b).abs() <= tolerance * b.abs().max(1e-9)
}

/// What a proxy counted inbound between two scrapes: (requests, responses, successes, mTLS
/// requests).
fn inbound(prev: &[Sample], cur: &[Sample]) -> (f64, f64, f64, f64) {
    let d = |name: &str, labels: &[(&str, &str)]| {
        let mut l = vec![("direction", "inbound")];
        l.extend_from_slice(labels);
        sum(cur, name, &l) - sum(prev, name, &l)
    };
    let requests = d("weft_http_requests_total", &[]);
    let plain = d("weft_http_requests_total", &[("client_id", "")]);
    (
        requests,
        d("weft_http_responses_total", &[]),
        d(
            "weft_http_responses_total",
            &[("classification", "success")],
        ),
        requests - plain,
    )
}

/// Runs `stat` while scraping `admin` just before and after: the row for `name`, and what
/// the proxy counted inbound per second and its success share over that time.
fn stat_and_count(admin: SocketAddr, name: &str, args: &[&str]) -> (Value, f64, f64, f64) {
    let started = Instant::now();
    let before = scrape(admin);
    let rows = rows(args);
    let after = scrape(admin);
    let secs = started.elapsed().as_secs_f64();
    let (requests, responses, successes, mtls) = inbound(&before, &after);
    (
        row(&rows, name).clone(),
        requests / secs,
        successes / responses,
        mtls / requests,
    )
}

const DEMO: [&str; 4] = ["--rps", "50", "--failure-rate", "0.2"];

#[test]
fn stat_from_the_proxies_shows_what_they_counted() {
    let mut demo = RunningDemo::start(&DEMO);
    let (web, books, v2) = (
        demo.admin("web"),
        demo.admin("books"),
        demo.admin("books-v2"),
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while sum(&scrape(books), "weft_http_requests_total", &[]) < 50.0 {
        assert!(Instant::now() < deadline, "no traffic:\n{}", demo.output());
        std::thread::sleep(Duration::from_millis(100));
    }
    let (w, b, b2) = (
        format!("demo/web={web}"),
        format!("demo/books={books}"),
        format!("demo/books-v2={v2}"),
    );
    let proxies = |kind: &'static str, window: &'static str| {
        let mut a = vec![kind, "-o", "json", "--window", window, "--from-proxies"];
        a.extend([w.as_str(), b.as_str(), b2.as_str()]);
        a
    };

    // Deployments (each proxy named as its own pod and workload): books served the
    // traffic, 20 % of it failing before the route's retries; all of it over mTLS.
    let (stat, rate, success, mtls) = stat_and_count(books, "books", &proxies("deploy", "3s"));
    let context = format!("{stat} (counted {rate}/s, success {success}, mTLS {mtls})");
    assert!(near(num(&stat, "rps"), rate, 0.25), "{context}");
    assert!((num(&stat, "success") - success).abs() < 0.08, "{context}");
    assert!(
        num(&stat, "success") < 0.95,
        "failures must show: {context}"
    );
    assert_eq!(num(&stat, "mtls"), 1.0, "{context}");
    assert_eq!(mtls, 1.0, "{context}");
    assert!(num(&stat, "latency_p50_ms") > 0.0, "{context}");
    assert!(
        num(&stat, "latency_p99_ms") >= num(&stat, "latency_p95_ms"),
        "{context}"
    );
    assert_eq!(stat["namespace"], "demo");
    // books-v2 gets nothing under the route's 100/0 split: a rate of 0, success unknown.
    let all = rows(&proxies("deploy", "1s"));
    let idle = row(&all, "books-v2");
    assert_eq!(idle["rps"], 0.0, "{idle}");
    assert!(
        idle["success"].is_null() && idle["latency_p99_ms"].is_null(),
        "{idle}"
    );

    // The service: what web sent (retries hide the failures), at the demo's rate.
    let svc = rows(&proxies("svc", "3s"));
    let s = row(&svc, "books");
    assert!(near(num(s, "rps"), 50.0, 0.3), "{s}");
    assert!(num(s, "success") > 0.95, "{s}");
    assert_eq!(num(s, "mtls"), 1.0, "{s}");
    assert!(s["tcp_conn"].is_null(), "{s}");

    // The route, from the web proxy's weft_route_* metrics.
    let routes = rows(&proxies("route", "2s"));
    let r = row(&routes, "httproute/books");
    assert!(near(num(r, "rps"), 50.0, 0.3), "{r}");
    assert!(num(r, "success") > 0.95, "{r}");
    assert!(r["latency_p50_ms"].is_null(), "{r}");

    // The table a person reads.
    let out = weft_stat(&[
        "pod",
        "books",
        "--window",
        "1s",
        "--from-proxies",
        b.as_str(),
    ]);
    let table = String::from_utf8_lossy(&out.stdout);
    let mut lines = table.lines();
    let head: Vec<&str> = lines
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    assert_eq!(
        head,
        [
            "NAME",
            "NAMESPACE",
            "MESHED",
            "SUCCESS",
            "RPS",
            "LATENCY_P50",
            "LATENCY_P95",
            "LATENCY_P99",
            "TCP_CONN",
            "MTLS"
        ],
        "{table}"
    );
    let cells: Vec<&str> = lines
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    assert_eq!(cells[..3], ["books", "demo", "1/1"], "{table}");
    assert_eq!(cells[9], "100.00%", "{table}");

    // Pods found in a manifest directory: the books and web pods at 127.0.0.1 with their
    // proxies' admin ports, plus a web pod without a proxy.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("pods.yaml"), manifests(books, web)).unwrap();
    let source = format!("dir:{}", dir.path().display());
    let found = rows(&[
        "deploy", "-o", "json", "--window", "2s", "--source", &source,
    ]);
    let books_row = row(&found, "books");
    assert_eq!(
        (books_row["meshed_pods"].clone(), books_row["pods"].clone()),
        (1.into(), 1.into())
    );
    assert!(num(books_row, "rps") > 10.0, "{books_row}");
    let web_row = row(&found, "web");
    assert_eq!(
        (web_row["meshed_pods"].clone(), web_row["pods"].clone()),
        (1.into(), 2.into())
    );
    let svc = rows(&[
        "svc", "books", "-o", "json", "--window", "2s", "--source", &source,
    ]);
    assert_eq!(svc.len(), 1, "{svc:?}");
    assert!(num(&svc[0], "rps") > 10.0, "{svc:?}");

    // The same pods and service from a Kubernetes API server (the controller's fake one),
    // through KUBECONFIG.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let fake = runtime
        .block_on(weft_controller::testing::fake_apiserver::FakeApiServer::start())
        .unwrap();
    for doc in manifests(books, web).split("\n---\n") {
        let value: serde_yaml_ng::Value = serde_yaml_ng::from_str(doc).unwrap();
        fake.apply(serde_json::to_value(value).unwrap());
    }
    let config = support::kubeconfig(dir.path(), &format!("http://{}", fake.addr()));
    let out = Command::new(env!("CARGO_BIN_EXE_weft"))
        .args([
            "stat", "deploy", "-o", "json", "--window", "2s", "--source", "kube",
        ])
        .env("KUBECONFIG", &config)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let from_kube: Vec<Value> = serde_json::from_str(&stdout).unwrap();
    let books_row = row(&from_kube, "books");
    assert_eq!(books_row["pods"], 1, "{books_row}");
    assert!(num(books_row, "rps") > 10.0, "{books_row}");
    assert_eq!(row(&from_kube, "web")["pods"], 2);
    drop(fake);

    let (status, output) = demo.stop();
    assert!(status.success(), "{output}");
}

/// Pods `books-…` and `web-…` of Deployments books and web (pod-template-hash), at
/// 127.0.0.1 with the proxies' admin ports, a web pod without a proxy, Service books.
fn manifests(books: SocketAddr, web: SocketAddr) -> String {
    let pod = |name: &str, app: &str, admin: Option<u16>| {
        let proxy = admin.map_or(String::new(), |port| {
            format!(
                "  - name: weft-proxy\n    ports: [{{name: weft-inbound, containerPort: 4143}}, {{name: weft-admin, containerPort: {port}}}]\n"
            )
        });
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: demo, labels: {{app: {app}, pod-template-hash: 5f7b9c}}}}\n\
             spec:\n  containers:\n  - name: {app}\n{proxy}status: {{phase: Running, podIP: 127.0.0.1}}\n---\n"
        )
    };
    format!(
        "{}{}{}apiVersion: v1\nkind: Service\nmetadata: {{name: books, namespace: demo}}\nspec: {{selector: {{app: books}}, ports: [{{port: 8080}}]}}\n",
        pod("books-5f7b9c-abcde", "books", Some(books.port())),
        pod("web-5f7b9c-abcde", "web", Some(web.port())),
        pod("web-5f7b9c-fghij", "web", None),
    )
}

#[test]
fn stat_from_prometheus_matches_what_the_proxies_counted() {
    let Some(bin) = prometheus::tool("prometheus") else {
        return;
    };
    let mut demo = RunningDemo::start(&DEMO);
    let (web, books, v2) = (
        demo.admin("web"),
        demo.admin("books"),
        demo.admin("books-v2"),
    );
    // The labels the chart's scrape config gives these pods (namespace, pod, workload),
    // written as static targets: Debian's Prometheus has no Kubernetes discovery.
    let target = |addr: SocketAddr, pod: &str, workload: &str| {
        format!(
            "      - targets: ['{addr}']\n        labels: {{namespace: demo, pod: {pod}, workload: {workload}}}\n"
        )
    };
    let rules = Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/weft/rules/weft.rules.yaml");
    let config = format!(
        "global: {{scrape_interval: 1s, evaluation_interval: 1s}}\nrule_files: ['{}']\nscrape_configs:\n  - job_name: weft-proxy\n    static_configs:\n{}{}{}",
        rules.display(),
        target(web, "web-0", "web"),
        target(books, "books-0", "books"),
        target(v2, "books-v2-0", "books-v2"),
    );
    let prom = Prometheus::start(&bin, &config, &[]).unwrap_or_else(|e| panic!("{e}"));
    let url = prom.url();

    // Wait for the recording rules' first values (two scrapes of traffic, then a rule run).
    let deadline = Instant::now() + Duration::from_secs(60);
    while prom
        .query(r#"weft:request_rate{workload="books",direction="inbound"} > 0"#)
        .map_or(true, |r| r.is_empty())
    {
        assert!(
            Instant::now() < deadline,
            "no recorded rate:\n{}",
            prom.log_tail()
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    // Let a few seconds of traffic into the window, counting it at the proxy meanwhile.
    let started = Instant::now();
    let before = scrape(books);
    std::thread::sleep(Duration::from_secs(8));
    let after = scrape(books);
    let secs = started.elapsed().as_secs_f64();
    let (requests, responses, successes, _) = inbound(&before, &after);
    let (rate, success) = (requests / secs, successes / responses);

    // The raw-metrics path (a window that is not the rules').
    let got = rows(&[
        "deploy",
        "-o",
        "json",
        "--window",
        "8s",
        "--prometheus",
        &url,
    ]);
    let b = row(&got, "books");
    let context = format!("{b} (counted {rate}/s, success {success})");
    assert!(near(num(b, "rps"), rate, 0.3), "{context}");
    assert!((num(b, "success") - success).abs() < 0.1, "{context}");
    assert!(num(b, "success") < 0.95, "{context}");
    assert_eq!(num(b, "mtls"), 1.0, "{context}");
    assert!(num(b, "latency_p99_ms") > 0.0, "{context}");
    assert_eq!(b["namespace"], "demo", "{context}");
    assert!(num(b, "tcp_conn") >= 1.0, "{context}");
    // The rules' window: the rate is the recorded weft:request_rate (which, over a [1m]
    // window holding only the seconds this mesh has run, is lower than the proxies' rate).
    let recorded = |expr: &str| -> f64 {
        let r = prom.query(expr).unwrap_or_else(|e| panic!("{e}"));
        r[0]["value"][1]
            .as_str()
            .and_then(|v| v.parse().ok())
            .unwrap_or(f64::NAN)
    };
    let got = rows(&["deploy", "books", "-o", "json", "--prometheus", &url]);
    let want = recorded(r#"sum(weft:request_rate{workload="books",direction="inbound"})"#);
    let b = &got[0];
    assert!(near(num(b, "rps"), want, 0.2), "{b}: recorded {want}");
    assert!(
        (num(b, "success") - success).abs() < 0.1,
        "{b}: counted {success}"
    );
    assert_eq!(num(b, "mtls"), 1.0, "{b}");
    let pods = rows(&[
        "pod",
        "books-0",
        "-o",
        "json",
        "--window",
        "8s",
        "--prometheus",
        &url,
    ]);
    assert_eq!(pods.len(), 1, "{pods:?}");
    assert!(near(num(&pods[0], "rps"), rate, 0.3), "{pods:?}");
    let svc = rows(&["svc", "-o", "json", "--window", "8s", "--prometheus", &url]);
    let s = row(&svc, "books");
    assert_eq!(s["namespace"], "demo", "{s}");
    assert!(near(num(s, "rps"), 50.0, 0.3), "{s}");
    assert!(num(s, "success") > 0.95, "{s}");
    assert_eq!(num(s, "mtls"), 1.0, "{s}");
    let routes = rows(&[
        "route",
        "-o",
        "json",
        "--window",
        "8s",
        "--prometheus",
        &url,
    ]);
    let r = row(&routes, "httproute/books");
    assert!(near(num(r, "rps"), 50.0, 0.3), "{r}");

    drop(prom);
    let (status, output) = demo.stop();
    assert!(status.success(), "{output}");
}

// ---------------------------------------------------------------- errors

/// A one-connection-at-a-time HTTP server answering every request with `response`.
fn fake_server(response: &'static str) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            let mut buf = [0u8; 4096];
            let _ = conn.read(&mut buf);
            let _ = conn.write_all(response.as_bytes());
        }
    });
    addr
}

fn closed_port() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

/// `weft stat` fails with exit status 2 and one line on stderr containing `want`.
fn fails_with(args: &[&str], want: &str) {
    fails_with_env(args, &[], want);
}

fn fails_with_env(args: &[&str], env: &[(&str, &str)], want: &str) {
    let out = Command::new(env!("CARGO_BIN_EXE_weft"))
        .arg("stat")
        .args(args)
        .envs(env.iter().copied())
        .output()
        .expect("run weft stat");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
    assert!(out.stdout.is_empty(), "{args:?}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "{args:?}: {stderr}");
    assert!(stderr.starts_with("weft stat: "), "{stderr}");
    assert!(
        stderr.contains(want),
        "{args:?}: {stderr:?} should contain {want:?}"
    );
}

fn http(status: &str, body: &str) -> &'static str {
    Box::leak(
        format!(
            "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .into_boxed_str(),
    )
}

#[test]
fn prometheus_errors_name_the_url_and_what_was_wrong() {
    let down = format!("http://{}", closed_port());
    fails_with(
        &["--prometheus", &down],
        &format!("prometheus at {down}: GET "),
    );

    let cases = [
        (
            http("503 Service Unavailable", "starting up"),
            "answered 503 Service Unavailable: body \"starting up\"",
        ),
        (
            http("200 OK", "<html>hello</html>"),
            "/api/v1/query: the answer is not JSON",
        ),
        (
            http(
                "400 Bad Request",
                r#"{"status":"error","errorType":"bad_data","error":"invalid parameter \"query\""}"#,
            ),
            "answered 400 Bad Request: query failed (bad_data): invalid parameter \"query\"",
        ),
        (
            http(
                "200 OK",
                r#"{"status":"error","errorType":"timeout","error":"query timed out"}"#,
            ),
            "query failed (timeout): query timed out",
        ),
        (
            http(
                "200 OK",
                r#"{"status":"success","data":{"resultType":"matrix","result":[]}}"#,
            ),
            "expected an instant vector",
        ),
    ];
    for (response, want) in cases {
        let url = format!("http://{}", fake_server(response));
        fails_with(
            &["svc", "--prometheus", &url],
            &format!("prometheus at {url}: "),
        );
        fails_with(&["svc", "--prometheus", &url], want);
    }
    for bad in ["localhost:9090", "http://", "ftp://x"] {
        fails_with(
            &["--prometheus", bad],
            &format!("prometheus at {bad}: not an http:// URL"),
        );
    }
    fails_with(
        &["--prometheus", "https://127.0.0.1:1"],
        "prometheus at https://127.0.0.1:1: not an http:// URL",
    );
}

#[test]
fn proxy_and_source_errors_name_what_was_wrong() {
    let down = closed_port();
    fails_with(
        &["--window", "1s", "--from-proxies", &format!("web={down}")],
        &format!("proxy admin endpoint {down}: GET http://{down}/metrics: "),
    );
    let not_metrics = fake_server(http("200 OK", "this is {not metrics"));
    fails_with(
        &["--window", "1s", "--from-proxies", &not_metrics.to_string()],
        &format!(
            "proxy admin endpoint {not_metrics}: GET http://{not_metrics}/metrics: metrics line 1"
        ),
    );
    fails_with(
        &["--from-proxies", "no-such-host.invalid:4191"],
        "proxy admin endpoint no-such-host.invalid:4191: cannot resolve the address",
    );
    fails_with(&[], "nothing to read: give --prometheus URL");
    fails_with_env(
        &["--source", "kube"],
        &[("KUBECONFIG", "/nonexistent/kubeconfig")],
        "no Kubernetes configuration (",
    );
    let closed = closed_port();
    let dir = tempfile::tempdir().unwrap();
    let config = support::kubeconfig(dir.path(), &format!("http://{closed}"));
    fails_with_env(
        &["--source", "kube", "--timeout", "3"],
        &[("KUBECONFIG", config.as_str())],
        &format!("cannot list from the Kubernetes API server at http://{closed}/"),
    );
    let dir = tempfile::tempdir().unwrap();
    let source = format!("dir:{}", dir.path().display());
    fails_with(
        &["--source", &source, "-n", "demo"],
        "no meshed pods with an IP address in namespace demo",
    );
    std::fs::write(dir.path().join("bad.yaml"), "kind: Pod\nmetadata: [").unwrap();
    fails_with(&["--source", &source], "bad.yaml");
    // Argument errors are clap's (exit 2 too), naming the value.
    let out = weft_stat(&["job"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("\"job\" is not a resource kind"));
}

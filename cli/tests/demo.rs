//! `weft demo` end to end: real `weft-proxy` and `weft-controller` children on
//! loopback, and the numbers a user reads in the summary, including that the
//! proxies talked mutual TLS with the identities the development CA issued;
//! that the HTTPRoute's retries hide books' simulated failures from web while
//! the books proxy counts them; and that an edit of `manifests/route.yaml`
//! moves the traffic to books-v2 within two seconds. The last two read the
//! proxies' `/metrics` while the demo runs (the banner names each admin port),
//! polling with deadlines, and stop the demo with SIGTERM (or, if a test
//! fails, when its [`RunningDemo`] is dropped).
//!
//! Needs the proxy and controller binaries next to `weft` in the target
//! directory (`cargo build -p weft-proxy -p weft-controller`; `cargo test
//! --workspace` builds them too).

mod support;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use support::{controller_bin, proxy_bin, scrape, sum, RunningDemo};
use weft_cli::promtext::Sample;

/// `web proxy routing: N requests balanced over endpoints from the controller (E
/// endpoint(s) known), P passed through`: (N, E, P).
fn routing_line(stdout: &str) -> (f64, f64, f64) {
    let line = stdout
        .lines()
        .find(|l| l.contains("web proxy routing:"))
        .unwrap_or_else(|| panic!("no routing line in output:\n{stdout}"));
    let numbers: Vec<f64> = line
        .split(|c: char| !(c.is_ascii_digit() || c == '.'))
        .filter_map(|w| w.parse().ok())
        .collect();
    assert_eq!(numbers.len(), 3, "{line}");
    (numbers[0], numbers[1], numbers[2])
}

/// A data row of the summary table: `PROXY DIRECTION REQ/S SUCCESS P50 P99 TCP`.
#[derive(Debug)]
struct Row {
    rps: f64,
    success_percent: Option<f64>,
}

fn summary(stdout: &str) -> &str {
    stdout
        .split_once("Summary over")
        .unwrap_or_else(|| panic!("no summary in output:\n{stdout}"))
        .1
}

fn summary_row(stdout: &str, proxy: &str, direction: &str) -> Row {
    let summary = summary(stdout);
    let cols: Vec<&str> = summary
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|c| c.len() >= 7 && c[0] == proxy && c[1] == direction)
        .unwrap_or_else(|| panic!("no {proxy} {direction} row in summary:\n{summary}"));
    Row {
        rps: cols[2]
            .parse()
            .unwrap_or_else(|e| panic!("REQ/S {:?}: {e}", cols[2])),
        success_percent: cols[3].strip_suffix('%').and_then(|p| p.parse().ok()),
    }
}

const WEB_ID: &str = "spiffe://cluster.local/ns/demo/sa/web";
const BOOKS_ID: &str = "spiffe://cluster.local/ns/demo/sa/books";

/// A data row of the summary's security table: `PROXY DIRECTION MTLS PLAIN CERT PEER`.
#[derive(Debug)]
struct SecurityRow {
    mtls: f64,
    plain: f64,
    cert: String,
    peer: String,
}

fn security_row(stdout: &str, proxy: &str, direction: &str) -> SecurityRow {
    let summary = summary(stdout);
    let cols: Vec<&str> = summary
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .skip_while(|c| c.get(..3) != Some(&["PROXY", "DIRECTION", "MTLS"][..]))
        .find(|c| c.len() >= 6 && c[0] == proxy && c[1] == direction)
        .unwrap_or_else(|| panic!("no {proxy} {direction} security row in summary:\n{summary}"));
    let number = |s: &str| {
        s.parse()
            .unwrap_or_else(|e| panic!("{proxy} {direction}: {s:?}: {e}\n{summary}"))
    };
    SecurityRow {
        mtls: number(cols[2]),
        plain: number(cols[3]),
        cert: cols[4].to_string(),
        peer: cols[5..].join(" "),
    }
}

/// `books proxies' inbound requests by client identity: N from <id>, ...`: the N from `id`.
fn requests_from(stdout: &str, id: &str) -> f64 {
    let line = stdout
        .lines()
        .find(|l| l.contains("requests by client identity:"))
        .unwrap_or_else(|| panic!("no client identity line in output:\n{stdout}"));
    let suffix = format!(" from {id}");
    // After the first ": " (the IDs' own colons are followed by "//").
    let (_, list) = line
        .split_once(": ")
        .unwrap_or_else(|| panic!("no list in {line:?}"));
    list.split(", ")
        .find_map(|part| part.strip_suffix(&suffix)?.parse().ok())
        .unwrap_or(0.0)
}

/// The log directory the summary names (`proxy and controller logs: <dir>`).
fn log_dir(stdout: &str) -> PathBuf {
    let line = stdout
        .lines()
        .find_map(|l| l.trim().strip_prefix("proxy and controller logs: "))
        .unwrap_or_else(|| panic!("no log directory in output:\n{stdout}"));
    PathBuf::from(line)
}

/// The proxies talked mTLS, with the identities the dev CA issued: what the
/// books proxy counted inbound, what the web proxy counted outbound, and who
/// the inbound requests came from.
fn assert_mtls(stdout: &str, context: &str) {
    let server = security_row(stdout, "books", "inbound");
    assert!(
        server.mtls > 0.0 && server.peer == WEB_ID,
        "books proxy: no inbound mTLS connections from {WEB_ID}: {server:?}\n{context}"
    );
    assert_eq!(
        server.plain, 0.0,
        "books proxy: inbound connections without TLS\n{context}"
    );
    let client = security_row(stdout, "web", "outbound");
    assert!(
        client.mtls > 0.0 && client.peer == BOOKS_ID,
        "web proxy: no outbound mTLS connections to {BOOKS_ID}: {client:?}\n{context}"
    );
    for row in [&server, &client] {
        // 24 h certificates, issued seconds ago.
        assert!(
            row.cert.starts_with("23h"),
            "certificate time left: {row:?}\n{context}"
        );
    }
    assert!(
        !summary(stdout).contains("TLS handshake failure"),
        "handshakes failed\n{context}"
    );
    let from_web = requests_from(stdout, WEB_ID);
    assert!(
        from_web > 0.0,
        "books proxy: no inbound requests carried client_id {WEB_ID}\n{context}"
    );
    assert!(
        !stdout.contains("without a client identity"),
        "books proxy: inbound requests without a client identity\n{context}"
    );
    // The CA and the tokens stay where the README says.
    let dir = log_dir(stdout);
    for file in [
        "ca/trust-anchors.pem",
        "tokens/web-0.token",
        "tokens/books-0.token",
        "tokens/books-v2-0.token",
        "manifests/route.yaml",
        "manifests/backendpolicy.yaml",
    ] {
        assert!(
            dir.join(file).is_file(),
            "{file} missing in {}\n{context}",
            dir.display()
        );
    }
}

#[test]
fn demo_runs_traffic_over_mtls_through_the_proxies_and_exits_cleanly() {
    let started = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_weft"))
        .args(["demo", "--duration", "5", "--proxy-bin"])
        .arg(proxy_bin())
        .arg("--controller-bin")
        .arg(controller_bin())
        .output()
        .expect("run weft demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let context = format!(
        "status {}\n--- stdout\n{stdout}\n--- stderr\n{stderr}",
        out.status
    );

    assert!(out.status.success(), "weft demo failed: {context}");
    // 5 s of traffic plus start-up and a clean shutdown, not a kill after
    // the 10 s grace period.
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "took {:?}: {context}",
        started.elapsed()
    );
    // Output is not a terminal here, so each 2 s table is appended: two are
    // due in 5 s; a loaded CI machine may let the second slip past the end.
    assert!(
        stdout.matches("window").count() >= 1,
        "expected live tables every 2 s: {context}"
    );

    for (proxy, direction) in [("web", "outbound"), ("books", "inbound")] {
        let row = summary_row(&stdout, proxy, direction);
        assert!(
            row.rps > 0.0,
            "{proxy} {direction}: no requests/s: {row:?}\n{context}"
        );
        let success = row
            .success_percent
            .unwrap_or_else(|| panic!("{proxy} {direction}: no success rate\n{context}"));
        assert!(
            success > 90.0,
            "{proxy} {direction}: success {success}%\n{context}"
        );
    }
    for proxy in ["web", "books", "books-v2"] {
        assert!(
            stdout.contains(&format!("{proxy} proxy exited cleanly after SIGTERM")),
            "the {proxy} proxy should stop on SIGTERM: {context}"
        );
    }
    assert!(
        stdout.contains("controller exited cleanly after SIGTERM"),
        "the controller should stop on SIGTERM: {context}"
    );
    // Requests went by service name through the controller's answer, none to the
    // original destination (the books ClusterIP, which nothing serves on loopback).
    let (balanced, endpoints, passthrough) = routing_line(&stdout);
    assert!(balanced > 0.0, "nothing routed by discovery: {context}");
    // books; books-v2 too if the proxy resolved the route's idle backend.
    assert!((1.0..=2.0).contains(&endpoints), "{context}");
    assert_eq!(passthrough, 0.0, "{context}");
    assert_mtls(&stdout, &context);
    // The start-up banner says where the route is and how to edit it.
    assert!(
        stdout.contains(
            "edit manifests/route.yaml (e.g. weights 90/10 to books-v2) and save: \
             the split changes within a second"
        ),
        "{context}"
    );
    let route = route_row(&stdout);
    assert_eq!(route.split, "books 100%", "{context}");
}

#[test]
fn demo_stops_cleanly_on_sigterm() {
    let mut demo = RunningDemo::start(&[]);
    // Wait for the first live table, so SIGTERM arrives mid-traffic.
    demo.wait_for_line(|l| l.contains("window"), Duration::from_secs(30));
    let (status, output) = demo.stop();
    assert!(status.success(), "exit {status}:\n{output}");
    assert!(output.contains("Summary over"), "{output}");
    assert!(
        output.contains("web proxy exited cleanly after SIGTERM"),
        "{output}"
    );
}

/// The summary's route row: `ROUTE REQ/S CLIENT SERVER RETRY/S REFUSED SPLIT`.
#[derive(Debug)]
struct RouteRow {
    client_percent: Option<f64>,
    server_percent: Option<f64>,
    split: String,
}

const ROUTE: &str = "httproute/demo/books/0";

fn route_row(stdout: &str) -> RouteRow {
    let summary = summary(stdout);
    let cols: Vec<&str> = summary
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|c| c.len() >= 7 && c[0] == ROUTE)
        .unwrap_or_else(|| panic!("no {ROUTE} row in summary:\n{summary}"));
    let percent = |s: &str| s.strip_suffix('%').and_then(|p| p.parse().ok());
    RouteRow {
        client_percent: percent(cols[2]),
        server_percent: percent(cols[3]),
        split: cols[6..].join(" "),
    }
}

/// Books fails 1 % of requests with a 503; the route retries them, so the web proxy answers
/// web with none of them while the books proxy counts every one, and the retries show in the
/// web proxy's metrics and the summary.
#[test]
fn demo_retries_hide_the_books_failures_from_web() {
    let mut demo = RunningDemo::start(&["--rps", "100"]);
    let web = demo.admin("web");
    let books = demo.admin("books");

    // About one failure a second at 100 req/s; wait for a few, and the retries they caused.
    let deadline = Instant::now() + Duration::from_secs(60);
    let (failed_at_books, retries) = loop {
        let failed = sum(
            &scrape(books),
            "weft_http_responses_total",
            &[("direction", "inbound"), ("classification", "failure")],
        );
        let retries = sum(
            &scrape(web),
            "weft_route_retries_total",
            &[("route", ROUTE), ("reason", "status")],
        );
        if failed >= 3.0 && retries >= 3.0 {
            break (failed, retries);
        }
        if Instant::now() > deadline {
            panic!(
                "after 60 s: {failed} failures at the books proxy, {retries} retries at the web \
                 proxy\n{}",
                demo.output()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let web_samples = scrape(web);
    let web_failures = sum(
        &web_samples,
        "weft_http_responses_total",
        &[("direction", "outbound"), ("classification", "failure")],
    );
    let route_failures = sum(
        &web_samples,
        "weft_route_responses_total",
        &[("route", ROUTE), ("classification", "failure")],
    );
    let route_successes = sum(
        &web_samples,
        "weft_route_responses_total",
        &[("route", ROUTE), ("classification", "success")],
    );
    let (status, output) = demo.stop();
    let context =
        format!("books proxy failures {failed_at_books}, web proxy retries {retries}\n{output}");
    assert_eq!(
        web_failures, 0.0,
        "the web proxy answered web with failures: {context}"
    );
    assert_eq!(route_failures, 0.0, "{context}");
    assert!(route_successes > 0.0, "{context}");
    assert!(status.success(), "exit {status}: {context}");

    // The summary says the same: web saw 100 %, the books proxy less, retries made.
    let route = route_row(&output);
    assert_eq!(route.client_percent, Some(100.0), "{route:?}: {context}");
    assert!(
        route.server_percent.is_some_and(|p| p < 100.0),
        "{route:?}: {context}"
    );
    assert!(output.contains(" 0 5xx, "), "web itself got 5xx: {context}");
    let line = output
        .lines()
        .find(|l| l.contains(&format!("route {ROUTE} on the web proxy:")))
        .unwrap_or_else(|| panic!("no route line: {context}"));
    assert!(
        line.contains("retries (status ") && line.ends_with(", 0 refused by the retry budget"),
        "{line}"
    );
}

/// Rewriting the route to send everything to books-v2 while the demo runs moves web's
/// traffic there within two seconds, without a failed request.
#[test]
fn demo_follows_a_route_edit_within_two_seconds() {
    let mut demo = RunningDemo::start(&[]);
    let web = demo.admin("web");
    let books_v2 = demo.admin("books-v2");
    let route_file = demo.log_dir().join("manifests/route.yaml");
    let books_backend = "books.demo.svc.cluster.local:8080";
    let v2_backend = "books-v2.demo.svc.cluster.local:8080";
    let to = |samples: &[Sample], backend: &str| {
        sum(
            samples,
            "weft_route_requests_total",
            &[("route", ROUTE), ("backend", backend)],
        )
    };

    // Traffic flows through the route, all of it to books.
    let deadline = Instant::now() + Duration::from_secs(30);
    while to(&scrape(web), books_backend) < 10.0 {
        assert!(
            Instant::now() < deadline,
            "no traffic through {ROUTE}:\n{}",
            demo.output()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(inbound_requests(books_v2), 0.0, "{}", demo.output());

    // The edit a person would make, saved the way editors do (a new file renamed over the
    // old one; the hidden temporary file is not loaded).
    let text = std::fs::read_to_string(&route_file).expect("read route.yaml");
    let edited = text
        .replace(
            "{name: books, port: 8080, weight: 100}",
            "{name: books, port: 8080, weight: 0}",
        )
        .replace(
            "{name: books-v2, port: 8080, weight: 0}",
            "{name: books-v2, port: 8080, weight: 100}",
        );
    assert_ne!(edited, text, "route.yaml changed shape:\n{text}");
    let tmp = route_file.with_file_name(".route.yaml.tmp");
    std::fs::write(&tmp, edited).expect("write the edited route");
    std::fs::rename(&tmp, &route_file).expect("replace route.yaml");
    let edited_at = Instant::now();

    // books-v2's proxy gets its first request within two seconds...
    loop {
        if inbound_requests(books_v2) > 0.0 {
            break;
        }
        assert!(
            edited_at.elapsed() < Duration::from_secs(2),
            "books-v2 got no request within 2 s of the edit:\n{}",
            demo.output()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let moved_after = edited_at.elapsed();
    // ...and then all of it: over the next second, nothing more to books.
    std::thread::sleep(Duration::from_millis(200));
    let before = scrape(web);
    std::thread::sleep(Duration::from_secs(1));
    let after = scrape(web);
    let to_books = to(&after, books_backend) - to(&before, books_backend);
    let to_v2 = to(&after, v2_backend) - to(&before, v2_backend);
    let web_failures = sum(
        &after,
        "weft_http_responses_total",
        &[("direction", "outbound"), ("classification", "failure")],
    );
    let (status, output) = demo.stop();
    let context = format!(
        "first books-v2 request {moved_after:?} after the edit; in the second after: \
         {to_books} to books, {to_v2} to books-v2\n{output}"
    );
    assert_eq!(to_books, 0.0, "{context}");
    assert!(to_v2 > 0.0, "{context}");
    assert_eq!(
        web_failures, 0.0,
        "requests failed across the edit: {context}"
    );
    assert!(status.success(), "exit {status}: {context}");
    // The summary's split over the whole run has both backends.
    let split = route_row(&output).split;
    assert!(
        split.starts_with("books ") && split.contains(" books-v2 "),
        "{split}: {context}"
    );
}

/// HTTP requests a proxy received from the mesh.
fn inbound_requests(admin: SocketAddr) -> f64 {
    sum(
        &scrape(admin),
        "weft_http_requests_total",
        &[("direction", "inbound")],
    )
}

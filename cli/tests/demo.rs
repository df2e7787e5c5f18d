//! `weft demo --duration 5` end to end: real `weft-proxy` children on
//! loopback, and the numbers a user reads in the summary, including that the
//! proxies talked mutual TLS with the identities the development CA issued.
//!
//! Needs the proxy and controller binaries next to `weft` in the target
//! directory (`cargo build -p weft-proxy -p weft-controller`; `cargo test
//! --workspace` builds them too).

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

fn sibling_bin(name: &str) -> PathBuf {
    let weft = PathBuf::from(env!("CARGO_BIN_EXE_weft"));
    let bin = weft.with_file_name(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    assert!(
        bin.is_file(),
        "{} is missing: run `cargo build -p {name}` (same profile) first",
        bin.display()
    );
    bin
}

fn proxy_bin() -> PathBuf {
    sibling_bin("weft-proxy")
}

fn controller_bin() -> PathBuf {
    sibling_bin("weft-controller")
}

/// `client proxy routing: N requests balanced over endpoints from the controller (E
/// endpoint(s) known), P passed through`: (N, E, P).
fn routing_line(stdout: &str) -> (f64, f64, f64) {
    let line = stdout
        .lines()
        .find(|l| l.contains("client proxy routing:"))
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

/// `server proxy inbound requests by client identity: N from <id>, ...`: the N from `id`.
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
/// server proxy counted inbound, what the client proxy counted outbound, and who
/// the inbound requests came from.
fn assert_mtls(stdout: &str, context: &str) {
    let server = security_row(stdout, "server", "inbound");
    assert!(
        server.mtls > 0.0 && server.peer == WEB_ID,
        "server proxy: no inbound mTLS connections from {WEB_ID}: {server:?}\n{context}"
    );
    assert_eq!(
        server.plain, 0.0,
        "server proxy: inbound connections without TLS\n{context}"
    );
    let client = security_row(stdout, "client", "outbound");
    assert!(
        client.mtls > 0.0 && client.peer == BOOKS_ID,
        "client proxy: no outbound mTLS connections to {BOOKS_ID}: {client:?}\n{context}"
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
        "server proxy: no inbound requests carried client_id {WEB_ID}\n{context}"
    );
    assert!(
        !stdout.contains("without a client identity"),
        "server proxy: inbound requests without a client identity\n{context}"
    );
    // The CA and the tokens stay where the README says.
    let dir = log_dir(stdout);
    for file in [
        "ca/trust-anchors.pem",
        "tokens/web-0.token",
        "tokens/books-0.token",
    ] {
        assert!(
            dir.join(file).is_file(),
            "{file} missing in {}\n{context}",
            dir.display()
        );
    }
}

#[test]
fn demo_runs_traffic_over_mtls_through_both_proxies_and_exits_cleanly() {
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

    for (proxy, direction) in [("client", "outbound"), ("server", "inbound")] {
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
    assert!(
        stdout.contains("client proxy exited cleanly after SIGTERM")
            && stdout.contains("server proxy exited cleanly after SIGTERM"),
        "proxies should stop on SIGTERM: {context}"
    );
    assert!(
        stdout.contains("controller exited cleanly after SIGTERM"),
        "the controller should stop on SIGTERM: {context}"
    );
    // Requests went by service name through the controller's answer, none to the
    // original destination (the books ClusterIP, which nothing serves on loopback).
    let (balanced, endpoints, passthrough) = routing_line(&stdout);
    assert!(balanced > 0.0, "nothing routed by discovery: {context}");
    assert_eq!(endpoints, 1.0, "{context}");
    assert_eq!(passthrough, 0.0, "{context}");
    assert_mtls(&stdout, &context);
}

#[test]
fn demo_stops_cleanly_on_sigterm() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_weft"))
        .args(["demo", "--proxy-bin"])
        .arg(proxy_bin())
        .arg("--controller-bin")
        .arg(controller_bin())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start weft demo");
    let stdout = child.stdout.take().expect("piped stdout");
    let (tx, rx) = mpsc::channel();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });

    // Wait for the first live table, so SIGTERM arrives mid-traffic.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut seen = Vec::new();
    while !seen.iter().any(|l: &String| l.contains("window")) {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => seen.push(line),
            Err(e) => {
                let _ = child.kill();
                panic!("no live table ({e}); output so far:\n{}", seen.join("\n"));
            }
        }
    }
    let pid = libc::pid_t::try_from(child.id()).expect("pid fits");
    // SAFETY: kill(2) on our own child, which has not been waited for.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);

    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("weft demo still running 30 s after SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    reader.join().expect("reader thread");
    seen.extend(rx.try_iter());
    let output = seen.join("\n");
    assert!(status.success(), "exit {status}:\n{output}");
    assert!(output.contains("Summary over"), "{output}");
    assert!(
        output.contains("client proxy exited cleanly after SIGTERM"),
        "{output}"
    );
}

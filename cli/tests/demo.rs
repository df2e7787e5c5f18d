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

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use weft_cli::promtext::{self, Sample};

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

/// A `weft demo` without `--duration`, its stdout read line by line on a thread. `stop` ends
/// it with SIGTERM; dropped without `stop` (a failed assertion), it gets SIGTERM and then
/// SIGKILL, and its children follow it (they die with it: `PR_SET_PDEATHSIG`).
struct RunningDemo {
    child: Child,
    /// Stdout lines, then stderr's text as one item once it closes.
    lines: mpsc::Receiver<String>,
    readers: Vec<JoinHandle<()>>,
    seen: Vec<String>,
}

impl RunningDemo {
    /// Starts the demo and waits for its banner (the proxies are ready).
    ///
    /// The demo reserves its loopback ports and releases them for its children to bind, so a
    /// process elsewhere on the machine can take one in between; a start that failed that way
    /// is tried once more.
    fn start(args: &[&str]) -> Self {
        match Self::try_start(args) {
            Ok(demo) => demo,
            Err(output) if output.contains("Address already in use") => {
                eprintln!("a port the demo reserved was taken; starting it again:\n{output}");
                Self::try_start(args).unwrap_or_else(|output| panic!("no banner:\n{output}"))
            }
            Err(output) => panic!("no banner:\n{output}"),
        }
    }

    /// The demo, once its banner says the proxies are ready; else its output (and the log
    /// its error names).
    fn try_start(args: &[&str]) -> Result<Self, String> {
        let mut child = Command::new(env!("CARGO_BIN_EXE_weft"))
            .arg("demo")
            .args(args)
            .arg("--proxy-bin")
            .arg(proxy_bin())
            .arg("--controller-bin")
            .arg(controller_bin())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start weft demo");
        let stdout = child.stdout.take().expect("piped stdout");
        let mut stderr = child.stderr.take().expect("piped stderr");
        let (tx, rx) = mpsc::channel();
        let tx_err = tx.clone();
        let readers = vec![
            std::thread::spawn(move || {
                for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                    let _ = tx.send(line);
                }
            }),
            std::thread::spawn(move || {
                let mut text = String::new();
                let _ = stderr.read_to_string(&mut text);
                if !text.is_empty() {
                    let _ = tx_err.send(format!("--- stderr\n{text}"));
                }
            }),
        ];
        let mut demo = Self {
            child,
            lines: rx,
            readers,
            seen: Vec::new(),
        };
        match demo.try_wait_for_line(|l| l == "Press Ctrl-C to stop.", Duration::from_secs(60)) {
            Ok(()) => Ok(demo),
            Err(e) => {
                // Stopped before the banner: its error names the log of what failed.
                let mut output = format!("{e}; output:\n{}", demo.output());
                let log = output
                    .split_once("its log is ")
                    .map(|(_, rest)| rest.lines().next().unwrap_or_default().trim().to_string());
                if let Some(text) = log.and_then(|l| std::fs::read_to_string(l).ok()) {
                    output.push_str(&format!("\n--- its log\n{text}"));
                }
                Err(output)
            }
        }
    }

    /// Reads output until a line satisfies `done`; panics with the output after `timeout`.
    fn wait_for_line(&mut self, done: impl Fn(&str) -> bool, timeout: Duration) {
        if let Err(e) = self.try_wait_for_line(done, timeout) {
            panic!(
                "waiting for a line of output ({e}); so far:\n{}",
                self.output()
            );
        }
    }

    fn try_wait_for_line(
        &mut self,
        done: impl Fn(&str) -> bool,
        timeout: Duration,
    ) -> Result<(), mpsc::RecvTimeoutError> {
        let deadline = Instant::now() + timeout;
        while !self.seen.last().is_some_and(|l| done(l)) {
            let left = deadline.saturating_duration_since(Instant::now());
            self.seen.push(self.lines.recv_timeout(left)?);
        }
        Ok(())
    }

    /// The output so far.
    fn output(&mut self) -> String {
        self.seen.extend(self.lines.try_iter());
        self.seen.join("\n")
    }

    /// The admin address of `<proxy> proxy` from the banner
    /// (`  books proxy  pid 123  inbound 127.0.0.1:1  admin http://127.0.0.1:2/metrics  sa books`).
    fn admin(&mut self, proxy: &str) -> SocketAddr {
        let prefix = format!("{proxy} proxy ");
        let output = self.output();
        output
            .lines()
            .find(|l| l.trim_start().starts_with(&prefix))
            .and_then(|l| l.split_once("admin http://")?.1.split_once("/metrics"))
            .and_then(|(addr, _)| addr.parse().ok())
            .unwrap_or_else(|| panic!("no admin address of the {proxy} proxy in:\n{output}"))
    }

    /// The log directory from the banner (`  logs  <dir>`).
    fn log_dir(&mut self) -> PathBuf {
        let output = self.output();
        output
            .lines()
            .find_map(|l| l.trim_start().strip_prefix("logs "))
            .map(|d| PathBuf::from(d.trim()))
            .filter(|d| d.is_dir())
            .unwrap_or_else(|| panic!("no log directory in:\n{output}"))
    }

    /// SIGTERM, then waits (up to 30 s) for the exit and the rest of the output.
    fn stop(mut self) -> (ExitStatus, String) {
        sigterm(&self.child);
        let deadline = Instant::now() + Duration::from_secs(30);
        let status = loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                break status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!(
                    "weft demo still running 30 s after SIGTERM:\n{}",
                    self.output()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        for reader in self.readers.drain(..) {
            reader.join().expect("reader thread");
        }
        (status, self.output())
    }
}

impl Drop for RunningDemo {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            sigterm(&self.child);
            let deadline = Instant::now() + Duration::from_secs(20);
            while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn sigterm(child: &Child) {
    let pid = libc::pid_t::try_from(child.id()).expect("pid fits");
    // SAFETY: kill(2) on our own child, which has not been waited for.
    unsafe { libc::kill(pid, libc::SIGTERM) };
}

/// `GET /metrics` from a proxy's admin port, parsed.
fn scrape(admin: SocketAddr) -> Vec<Sample> {
    let fetch = || -> std::io::Result<String> {
        let mut conn = TcpStream::connect_timeout(&admin, Duration::from_secs(2))?;
        conn.set_read_timeout(Some(Duration::from_secs(5)))?;
        conn.write_all(b"GET /metrics HTTP/1.0\r\nHost: weft-test\r\n\r\n")?;
        let mut text = String::new();
        conn.read_to_string(&mut text)?;
        Ok(text)
    };
    let text = fetch().unwrap_or_else(|e| panic!("GET http://{admin}/metrics: {e}"));
    let (head, body) = text
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("GET http://{admin}/metrics: no body in {text:?}"));
    assert!(
        head.starts_with("HTTP/1.1 200") || head.starts_with("HTTP/1.0 200"),
        "{head}"
    );
    promtext::parse(body).unwrap_or_else(|e| panic!("GET http://{admin}/metrics: {e}"))
}

/// The sum of `name`'s series that carry every one of `labels`.
fn sum(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> f64 {
    samples
        .iter()
        .filter(|s| s.name == name && labels.iter().all(|(k, v)| s.label(k) == Some(*v)))
        .fold(0.0, |total, s| total + s.value)
}

/// HTTP requests a proxy received from the mesh.
fn inbound_requests(admin: SocketAddr) -> f64 {
    sum(
        &scrape(admin),
        "weft_http_requests_total",
        &[("direction", "inbound")],
    )
}

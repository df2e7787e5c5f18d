//! What the CLI's end-to-end tests share: the proxy and controller binaries next to `weft`,
//! a running `weft demo` ([`RunningDemo`]), scraping a proxy's `/metrics`, and a Prometheus
//! server ([`prometheus`]).
#![allow(dead_code)]

pub mod prometheus;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use weft_cli::promtext::{self, Sample};

pub fn sibling_bin(name: &str) -> PathBuf {
    let weft = PathBuf::from(env!("CARGO_BIN_EXE_weft"));
    let bin = weft.with_file_name(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    assert!(
        bin.is_file(),
        "{} is missing: run `cargo build -p {name}` (same profile) first",
        bin.display()
    );
    bin
}

pub fn proxy_bin() -> PathBuf {
    sibling_bin("weft-proxy")
}

pub fn controller_bin() -> PathBuf {
    sibling_bin("weft-controller")
}

/// A `weft demo` without `--duration`, its stdout read line by line on a thread. `stop` ends
/// it with SIGTERM; dropped without `stop` (a failed assertion), it gets SIGTERM and then
/// SIGKILL, and its children follow it (they die with it: `PR_SET_PDEATHSIG`).
pub struct RunningDemo {
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
    pub fn start(args: &[&str]) -> Self {
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
    pub fn try_start(args: &[&str]) -> Result<Self, String> {
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
    pub fn wait_for_line(&mut self, done: impl Fn(&str) -> bool, timeout: Duration) {
        if let Err(e) = self.try_wait_for_line(done, timeout) {
            panic!(
                "waiting for a line of output ({e}); so far:\n{}",
                self.output()
            );
        }
    }

    pub fn try_wait_for_line(
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
    pub fn output(&mut self) -> String {
        self.seen.extend(self.lines.try_iter());
        self.seen.join("\n")
    }

    /// The admin address of `<proxy> proxy` from the banner
    /// (`  books proxy  pid 123  inbound 127.0.0.1:1  admin http://127.0.0.1:2/metrics  sa books`).
    pub fn admin(&mut self, proxy: &str) -> SocketAddr {
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
    pub fn log_dir(&mut self) -> PathBuf {
        let output = self.output();
        output
            .lines()
            .find_map(|l| l.trim_start().strip_prefix("logs "))
            .map(|d| PathBuf::from(d.trim()))
            .filter(|d| d.is_dir())
            .unwrap_or_else(|| panic!("no log directory in:\n{output}"))
    }

    /// SIGTERM, then waits (up to 30 s) for the exit and the rest of the output.
    pub fn stop(mut self) -> (ExitStatus, String) {
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

pub fn sigterm(child: &Child) {
    let pid = libc::pid_t::try_from(child.id()).expect("pid fits");
    // SAFETY: kill(2) on our own child, which has not been waited for.
    unsafe { libc::kill(pid, libc::SIGTERM) };
}

/// `GET /metrics` from a proxy's admin port, parsed.
pub fn scrape(admin: SocketAddr) -> Vec<Sample> {
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
pub fn sum(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> f64 {
    samples
        .iter()
        .filter(|s| s.name == name && labels.iter().all(|(k, v)| s.label(k) == Some(*v)))
        .fold(0.0, |total, s| total + s.value)
}

/// A kubeconfig in `dir` for an API server at `server` (the fake one: no credentials).
pub fn kubeconfig(dir: &std::path::Path, server: &str) -> String {
    let path = dir.join("kubeconfig");
    std::fs::write(
        &path,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster: {{server: \"{server}\"}}\n\
users:\n- name: fake\n  user: {{}}\ncontexts:\n- name: fake\n  context: {{cluster: fake, user: fake}}\ncurrent-context: fake\n"
        ),
    )
    .expect("writing the kubeconfig");
    path.to_str().expect("utf-8 path").to_string()
}

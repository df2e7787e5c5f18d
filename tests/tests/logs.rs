//! Logs on a pipe (a file, a log collector) are plain text without ANSI colour codes, and JSON
//! lines when asked, for the daemons: weft-proxy and weft-controller here (the injector and the
//! CNI agent share the same switch, `with_ansi(stderr is a terminal)`).

#![allow(clippy::unwrap_used)] // tests fail loudly on unexpected errors

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use weft_e2e::controller::ManifestDir;
use weft_e2e::{bin, free_addr};

/// Starts `cmd` with stderr on a pipe, reads lines until `enough` of them or 10 s, kills it.
fn first_lines(mut cmd: Command, enough: usize) -> Vec<String> {
    let mut child = cmd
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut lines = Vec::new();
    while lines.len() < enough && Instant::now() < deadline {
        if let Ok(l) = rx.recv_timeout(Duration::from_millis(100)) {
            lines.push(l);
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    lines
}

fn no_escapes(what: &str, lines: &[String]) {
    assert!(!lines.is_empty(), "{what} logged nothing");
    for l in lines {
        assert!(!l.contains('\u{1b}'), "{what}: ANSI escape in {l:?}");
    }
}

fn proxy() -> Command {
    let mut cmd = Command::new(bin("weft-proxy").unwrap());
    for var in ["OUTBOUND_ADDR", "INBOUND_ADDR", "ADMIN_ADDR"] {
        cmd.env(
            format!("WEFT_PROXY_{var}"),
            free_addr().unwrap().to_string(),
        );
    }
    cmd.env("WEFT_PROXY_LOG", "info");
    cmd
}

fn controller(dir: &ManifestDir) -> Command {
    let mut cmd = Command::new(bin("weft-controller").unwrap());
    cmd.arg("--source")
        .arg(format!("dir:{}", dir.path().display()))
        .args(["--log", "info"])
        // No issuer: plaintext must be asked for.
        .arg("--insecure-plaintext");
    for flag in ["--destination-addr", "--identity-addr", "--admin-addr"] {
        cmd.arg(flag).arg(free_addr().unwrap().to_string());
    }
    cmd
}

#[test]
fn plain_logs_on_a_pipe_have_no_colour() {
    no_escapes("weft-proxy", &first_lines(proxy(), 2));
    let dir = ManifestDir::new("logs-plain").unwrap();
    no_escapes("weft-controller", &first_lines(controller(&dir), 1));
}

#[test]
fn json_logs_are_json_lines() {
    let mut p = proxy();
    p.env("WEFT_PROXY_LOG_FORMAT", "json");
    let dir = ManifestDir::new("logs-json").unwrap();
    let mut c = controller(&dir);
    c.arg("--log-json");
    for (what, lines) in [
        ("weft-proxy", first_lines(p, 2)),
        ("weft-controller", first_lines(c, 1)),
    ] {
        no_escapes(what, &lines);
        for l in &lines {
            let v: serde_json::Value =
                serde_json::from_str(l).unwrap_or_else(|e| panic!("{what}: not JSON ({e}): {l}"));
            assert!(
                v["level"].is_string() && v["timestamp"].is_string(),
                "{what}: {l}"
            );
        }
    }
}

//! The `weft-controller` binary: flags, env fallbacks, errors before any
//! port is bound, and a real run in directory mode.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::free_port;

const BIN: &str = env!("CARGO_BIN_EXE_weft-controller");

#[test]
fn bad_source_is_rejected_naming_the_value() {
    let out = Command::new(BIN)
        .args(["--source", "file:/x"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("\"file:/x\" is not a source"), "{stderr}");
}

#[test]
fn missing_manifest_dir_fails_before_binding() {
    let admin = free_port();
    let out = Command::new(BIN)
        .env("WEFT_CONTROLLER_SOURCE", "dir:/nonexistent/weft")
        .args(["--admin-addr", &admin.to_string()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("/nonexistent/weft"), "{stderr}");
}

#[test]
fn serves_ready_from_a_manifest_directory() {
    let (dest, ident, admin) = (free_port(), free_port(), free_port());
    let manifests = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/manifests");
    let mut child = Command::new(BIN)
        .args([
            "--source",
            &format!("dir:{manifests}"),
            "--destination-addr",
            &dest.to_string(),
            "--identity-addr",
            &ident.to_string(),
            "--admin-addr",
            &admin.to_string(),
            // No issuer: plaintext must be asked for (see the test below).
            "--insecure-plaintext",
        ])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let ready = loop {
        let answer = TcpStream::connect(admin).ok().and_then(|mut s| {
            s.write_all(b"GET /ready HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
                .ok()?;
            let mut out = String::new();
            s.read_to_string(&mut out).ok()?;
            Some(out)
        });
        match answer {
            Some(a) if a.starts_with("HTTP/1.1 200") => break true,
            _ if Instant::now() > deadline => break false,
            _ => std::thread::sleep(Duration::from_millis(20)),
        }
    };
    let _ = child.kill();
    let _ = child.wait();
    assert!(ready, "/ready did not answer 200 within 10 s");
}

/// Without an issuer the controller cannot serve TLS: it refuses to start in plaintext
/// unless told to, and says which flag does it.
#[test]
fn plaintext_must_be_explicit() {
    let manifests = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/manifests");
    let out = Command::new(BIN)
        .args([
            "--source",
            &format!("dir:{manifests}"),
            "--destination-addr",
            "127.0.0.1:0",
            "--identity-addr",
            "127.0.0.1:0",
            "--admin-addr",
            "127.0.0.1:0",
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("--insecure-plaintext") && stderr.contains("--dev-ca"),
        "{stderr}"
    );
}

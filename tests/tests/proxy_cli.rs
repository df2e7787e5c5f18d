//! `weft-proxy --help` and `--version` answer and exit without starting the proxy (nothing is
//! bound: the help works even with an invalid environment and with its default ports taken);
//! any other argument is refused with a pointer to `--help`.

#![allow(clippy::unwrap_used)] // tests fail loudly on unexpected errors

use std::process::Command;

use weft_e2e::bin;

fn run(args: &[&str]) -> std::process::Output {
    Command::new(bin("weft-proxy").unwrap())
        .args(args)
        // An invalid environment: the proxy would refuse to start.
        .env("WEFT_PROXY_ADMIN_ADDR", "not-an-address")
        .output()
        .unwrap()
}

#[test]
fn help_lists_every_variable_with_its_default_and_exits() {
    let out = run(&["--help"]);
    assert_eq!(out.status.code(), Some(0));
    let text = String::from_utf8(out.stdout).unwrap();
    for (var, default, _) in weft_proxy::config::VARS {
        let line = text
            .lines()
            .find(|l| l.trim_start().starts_with(var))
            .unwrap_or_else(|| panic!("{var} missing from --help:\n{text}"));
        if !default.is_empty() {
            assert!(line.contains(&format!("[default: {default}]")), "{line}");
        }
    }
    assert!(
        out.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn version_prints_the_version_and_exits() {
    let out = run(&["--version"]);
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        format!("weft-proxy {}\n", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn other_arguments_are_refused_once() {
    let out = run(&["--outbound", "x"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8(out.stderr).unwrap();
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("unexpected argument \"--outbound\"") && err.contains("--help"),
        "{err}"
    );
}

#[test]
fn a_startup_error_is_printed_once() {
    let out = Command::new(bin("weft-proxy").unwrap())
        .env("WEFT_PROXY_OUTBOUND_ADDR", "127.0.0.1:0")
        .env("WEFT_PROXY_INBOUND_ADDR", "127.0.0.1:0")
        .env("WEFT_PROXY_ADMIN_ADDR", "127.0.0.1:0")
        .env("WEFT_PROXY_IDENTITY_ADDR", "127.0.0.1:1")
        .env("WEFT_PROXY_NAMESPACE", "ns")
        .env("WEFT_PROXY_SERVICE_ACCOUNT", "sa")
        .env("WEFT_PROXY_IDENTITY_TOKEN_FILE", "/nonexistent/token")
        .env("WEFT_PROXY_TRUST_ANCHORS", "/nonexistent/anchors.pem")
        .output()
        .unwrap();
    assert_ne!(out.status.code(), Some(0));
    let err = String::from_utf8(out.stderr).unwrap();
    let mentions = err.matches("/nonexistent/anchors.pem").count();
    assert_eq!(mentions, 1, "printed {mentions} times:\n{err}");
}

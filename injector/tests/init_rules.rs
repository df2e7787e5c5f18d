//! `weft-init` without root: the `--dry-run` output against a golden file (the binary itself,
//! flags and env fallbacks included). The planning it shares with weft-cni (idempotence,
//! backend choice, CHECK) is tested in weft-redirect's tests/rules.rs; the real iptables
//! programs by tests/tests/netns_init.rs in the weft-e2e crate.
//!
//! Regenerate the golden file after an intended change with `WEFT_BLESS=1 cargo test -p
//! weft-injector --test init_rules`.
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::process::Command;

fn golden(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(name)
}

fn check_golden(name: &str, got: &str) {
    let path = golden(name);
    if std::env::var_os("WEFT_BLESS").is_some() {
        std::fs::write(&path, got).unwrap();
    }
    let want = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e} (WEFT_BLESS=1 writes it)", path.display()));
    assert_eq!(
        got,
        want,
        "{} differs (WEFT_BLESS=1 rewrites it)",
        path.display()
    );
}

fn weft_init() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_weft-init"));
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("WEFT_INIT_") {
            c.env_remove(k);
        }
    }
    c
}

#[test]
fn dry_run_golden() {
    let out = weft_init()
        .args([
            "--dry-run",
            "--skip-inbound-ports",
            "4191,22",
            "--skip-outbound-ports",
            "5432,6000-6100",
            "--skip-inbound-cidrs",
            "10.1.0.0/16",
            "--skip-outbound-cidrs",
            "169.254.169.254,fd00:ec2::254/128",
        ])
        .env("WEFT_INIT_PROXY_UID", "2102")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    check_golden("init-dry-run.txt", &String::from_utf8(out.stdout).unwrap());
}

#[test]
fn dry_run_defaults_and_legacy_ipv4_only() {
    let out = weft_init()
        .args(["--dry-run", "--backend", "legacy", "--ipv6", "false"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.starts_with("# iptables-legacy-restore --noflush\n*nat\n"),
        "{text}"
    );
    assert!(!text.contains("ip6tables"), "{text}");
    assert!(
        text.contains("-A WEFT_OUTBOUND -m owner --uid-owner 2102 -j RETURN"),
        "{text}"
    );
    assert!(
        text.contains("-A WEFT_INBOUND_REDIRECT -p tcp -j REDIRECT --to-ports 4143"),
        "{text}"
    );
}

#[test]
fn bad_flags_exit_with_a_message_naming_the_value() {
    let out = weft_init()
        .args(["--dry-run", "--skip-outbound-ports", "80,http"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--skip-outbound-ports") && err.contains("http"),
        "{err}"
    );
    let out = weft_init()
        .args(["--dry-run"])
        .env("WEFT_INIT_SKIP_INBOUND_CIDRS", "10.0.0.0/99")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("10.0.0.0/99"));
}

//! `weft-init` without root: the `--dry-run` output against a golden file (the binary itself,
//! flags and env fallbacks included), and idempotence and backend choice against a fake runner.
//! The real iptables programs are exercised by tests/tests/netns_init.rs in the weft-e2e crate.
//!
//! Regenerate the golden file after an intended change with `WEFT_BLESS=1 cargo test -p
//! weft-injector --test init_rules`.
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::process::Command;

use weft_injector::init::{self, Backend, FakeRunner, Family, InitConfig, Runner};

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

fn cfg() -> InitConfig {
    InitConfig {
        skip_inbound_ports: "4191,22".parse().unwrap(),
        skip_outbound_ports: "5432".parse().unwrap(),
        skip_outbound_cidrs: "169.254.169.254/32,fd00::/8".parse().unwrap(),
        ..Default::default()
    }
}

fn saves(r: &mut FakeRunner) -> Vec<String> {
    [Family::V4, Family::V6]
        .iter()
        .map(|f| r.save(Backend::Nft, *f).unwrap())
        .collect()
}

#[test]
fn installing_twice_changes_nothing() {
    let mut r = FakeRunner::default();
    init::install(&mut r, &cfg()).unwrap();
    let once = saves(&mut r);
    assert_eq!(
        once[0].matches("-j WEFT_INBOUND\n").count(),
        1,
        "{}",
        once[0]
    );
    assert_eq!(
        once[0].matches("-j WEFT_OUTBOUND\n").count(),
        1,
        "{}",
        once[0]
    );
    init::install(&mut r, &cfg()).unwrap();
    assert_eq!(saves(&mut r), once);
    // The second run's scripts re-declare (flush) the chains but add no second jump.
    let (_, second_v4) = &r.restored[2];
    assert!(!second_v4.contains("-A PREROUTING"), "{second_v4}");
    assert!(!second_v4.contains("-A OUTPUT"), "{second_v4}");

    // A changed configuration replaces the chains' rules instead of adding to them.
    let mut changed = cfg();
    changed.skip_outbound_ports = "6379".parse().unwrap();
    init::install(&mut r, &changed).unwrap();
    let v4 = r.save(Backend::Nft, Family::V4).unwrap();
    assert!(
        v4.contains("--dport 6379") && !v4.contains("--dport 5432"),
        "{v4}"
    );
    assert_eq!(v4.matches("-j WEFT_OUTBOUND\n").count(), 1, "{v4}");
}

#[test]
fn existing_rules_of_others_are_kept() {
    let mut r = FakeRunner::default();
    r.restore(
        Backend::Nft,
        Family::V4,
        "*nat\n-A OUTPUT -d 10.96.0.10/32 -j RETURN\nCOMMIT\n",
    )
    .unwrap();
    init::install(&mut r, &cfg()).unwrap();
    let v4 = r.save(Backend::Nft, Family::V4).unwrap();
    assert!(
        v4.contains("-A OUTPUT -d 10.96.0.10/32 -j RETURN\n-A OUTPUT -p tcp -j WEFT_OUTBOUND"),
        "{v4}"
    );
}

#[test]
fn auto_backend_follows_existing_legacy_rules() {
    let mut r = FakeRunner::default();
    assert_eq!(init::detect_backend(&mut r, Family::V4), Backend::Nft);
    r.restore(
        Backend::Legacy,
        Family::V4,
        "*nat\n-A POSTROUTING -j MASQUERADE\nCOMMIT\n",
    )
    .unwrap();
    assert_eq!(init::detect_backend(&mut r, Family::V4), Backend::Legacy);
    init::install(
        &mut r,
        &InitConfig {
            ipv6: false,
            ..cfg()
        },
    )
    .unwrap();
    let legacy = r.save(Backend::Legacy, Family::V4).unwrap();
    assert!(legacy.contains("-j WEFT_OUTBOUND"), "{legacy}");
    let nft = r.save(Backend::Nft, Family::V4).unwrap();
    assert!(!nft.contains("WEFT"), "{nft}");
}

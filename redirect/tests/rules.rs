//! The redirect's planning against [`FakeRunner`] (no root): idempotence, other programs'
//! rules kept, the backend choice, and CHECK's verification. The real iptables programs are
//! exercised by weft-e2e's `netns_init` (weft-init) and weft-cni's `mesh_redirect` (the plugin).
#![allow(clippy::unwrap_used)]

use weft_redirect::{self as redirect, Backend, FakeRunner, Family, RedirectConfig, Runner};

fn cfg() -> RedirectConfig {
    RedirectConfig {
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
    redirect::install(&mut r, &cfg()).unwrap();
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
    redirect::install(&mut r, &cfg()).unwrap();
    assert_eq!(saves(&mut r), once);
    // The second run's scripts re-declare (flush) the chains but add no second jump.
    let (_, second_v4) = &r.restored[2];
    assert!(!second_v4.contains("-A PREROUTING"), "{second_v4}");
    assert!(!second_v4.contains("-A OUTPUT"), "{second_v4}");

    // A changed configuration replaces the chains' rules instead of adding to them.
    let mut changed = cfg();
    changed.skip_outbound_ports = "6379".parse().unwrap();
    redirect::install(&mut r, &changed).unwrap();
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
    redirect::install(&mut r, &cfg()).unwrap();
    let v4 = r.save(Backend::Nft, Family::V4).unwrap();
    assert!(
        v4.contains("-A OUTPUT -d 10.96.0.10/32 -j RETURN\n-A OUTPUT -p tcp -j WEFT_OUTBOUND"),
        "{v4}"
    );
}

#[test]
fn auto_backend_follows_existing_legacy_rules() {
    let mut r = FakeRunner::default();
    assert_eq!(redirect::detect_backend(&mut r, Family::V4), Backend::Nft);
    r.restore(
        Backend::Legacy,
        Family::V4,
        "*nat\n-A POSTROUTING -j MASQUERADE\nCOMMIT\n",
    )
    .unwrap();
    assert_eq!(
        redirect::detect_backend(&mut r, Family::V4),
        Backend::Legacy
    );
    redirect::install(
        &mut r,
        &RedirectConfig {
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

#[test]
fn verify_accepts_what_install_left_and_nothing_else() {
    let mut r = FakeRunner::default();
    assert!(
        redirect::verify(&mut r, &cfg()).is_err(),
        "empty table verified"
    );
    redirect::install(&mut r, &cfg()).unwrap();
    redirect::verify(&mut r, &cfg()).unwrap();

    // Another configuration than the one installed.
    let mut other = cfg();
    other.outbound_port = 4150;
    let err = redirect::verify(&mut r, &other).unwrap_err().to_string();
    assert!(err.contains("--to-ports 4150"), "{err}");

    // iptables-save's own spelling (`-m tcp`) and cleared host bits still verify.
    let mut saved = FakeRunner::default();
    let spelled = cfg();
    for family in [Family::V4, Family::V6] {
        let mut script = redirect::restore_script(&spelled, family, None);
        script = script.replace("-p tcp --dport", "-p tcp -m tcp --dport");
        saved.restore(Backend::Nft, family, &script).unwrap();
    }
    redirect::verify(&mut saved, &spelled).unwrap();
    let host_bits = RedirectConfig {
        skip_outbound_cidrs: "169.254.169.254/32,fd00::1/8".parse().unwrap(),
        ..cfg()
    };
    redirect::verify(&mut saved, &host_bits).unwrap();

    // A rule removed behind our back.
    let mut r = FakeRunner::default();
    redirect::install(&mut r, &cfg()).unwrap();
    let v4 = r.save(Backend::Nft, Family::V4).unwrap();
    let mut stripped = FakeRunner::default();
    let without: String = v4
        .lines()
        .filter(|l| !l.contains("--uid-owner"))
        .map(|l| format!("{l}\n"))
        .collect();
    stripped
        .restore(Backend::Nft, Family::V4, &without)
        .unwrap();
    let only_v4 = RedirectConfig {
        ipv6: false,
        ..cfg()
    };
    let err = redirect::verify(&mut stripped, &only_v4)
        .unwrap_err()
        .to_string();
    assert!(err.contains("uid-owner"), "{err}");
}

#[test]
fn the_annotation_installs_what_the_flags_install() {
    // The same configuration through weft-init's flags' values and through the annotation
    // gives the same scripts.
    let cfg = cfg();
    let back = RedirectConfig::from_annotation(&cfg.to_annotation()).unwrap();
    for family in [Family::V4, Family::V6] {
        assert_eq!(
            redirect::restore_script(&cfg, family, None),
            redirect::restore_script(&back, family, None)
        );
    }
}

//! Fatal errors are one line, each cause said once (`weft_proto::report`): the example from
//! the operability report, `weft inject` on a Deployment whose containers are a string.

#![allow(clippy::unwrap_used)] // tests fail loudly on unexpected errors

use std::process::Command;

#[test]
fn inject_says_each_cause_once() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.yaml");
    std::fs::write(
        &path,
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: web, namespace: shop}\n\
         spec:\n  selector: {matchLabels: {app: web}}\n  template:\n    metadata: {labels: {app: web}}\n\
         \x20   spec:\n      containers: \"nginx\"\n",
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_weft"))
        .arg("inject")
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8(out.stderr).unwrap();
    assert_eq!(err.lines().count(), 1, "{err}");
    assert_eq!(err.matches("does not parse").count(), 1, "{err}");
    assert_eq!(err.matches("expected a sequence").count(), 1, "{err}");
    assert!(err.starts_with("weft inject: "), "{err}");
    assert!(
        err.contains("bad.yaml") && err.contains("Deployment web"),
        "{err}"
    );
}

//! `weft tap` end to end, against the demo's proxies while its traffic flows: by address
//! (`--to-proxies`) and through a manifest directory (`--source dir:`), as lines, wide lines
//! and JSON; filters; and the errors (exit 2, naming the proxy).
//!
//! Needs `cargo build -p weft-proxy -p weft-controller`.
#![allow(clippy::unwrap_used)]

mod support;

use std::net::{SocketAddr, TcpListener};
use std::process::{Command, Output};

use serde_json::Value;
use support::RunningDemo;

fn weft_tap(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_weft"))
        .arg("tap")
        .args(args)
        .output()
        .expect("run weft tap")
}

fn ok_lines(args: &[&str]) -> Vec<String> {
    let out = weft_tap(args);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "weft tap {args:?}: {:?}\n{stdout}{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout.lines().map(str::to_string).collect()
}

#[test]
fn tap_streams_the_demo_proxies_requests() {
    let mut demo = RunningDemo::start(&["--rps", "50", "--failure-rate", "0.2"]);
    let (web, books) = (demo.admin("web"), demo.admin("books"));
    let web_arg = format!("demo/web={web}");

    // Five outbound requests of web, one line each.
    let lines = ok_lines(&[
        "--to-proxies",
        &web_arg,
        "--direction",
        "outbound",
        "--max",
        "5",
    ]);
    assert_eq!(lines.len(), 5, "{lines:#?}");
    for l in &lines {
        assert!(
            l.starts_with("rsp proxy=demo/web dir=out :method=GET :authority="),
            "{l}"
        );
        assert!(l.contains(" :status="), "{l}");
        assert!(l.contains(" latency="), "{l}");
    }

    // JSON, only the failures books' app answered (the demo fails 20 %).
    let lines = ok_lines(&[
        "--to-proxies",
        &format!("demo/books={books}"),
        "--status",
        "5xx",
        "--direction",
        "inbound",
        "--max",
        "2",
        "-o",
        "json",
    ]);
    assert_eq!(lines.len(), 2, "{lines:#?}");
    for l in &lines {
        let v: Value = serde_json::from_str(l).unwrap();
        assert_eq!(v["proxy"], "demo/books");
        assert_eq!(v["direction"], "inbound");
        assert!(v["status"].as_u64().unwrap() >= 500, "{v}");
        // Mesh traffic: books' proxy verified web's identity.
        assert_eq!(
            v["client_id"], "spiffe://cluster.local/ns/demo/sa/web",
            "{v}"
        );
    }

    // Wide: route, endpoint and the identity web's proxy required of books.
    let lines = ok_lines(&[
        "--to-proxies",
        &web_arg,
        "--direction",
        "outbound",
        "--max",
        "3",
        "-o",
        "wide",
    ]);
    assert_eq!(lines.len(), 3, "{lines:#?}");
    for l in &lines {
        assert!(l.contains(" route=httproute/demo/"), "{l}");
        assert!(l.contains(" endpoint=127.0.0.1:"), "{l}");
        assert!(
            l.contains(" dst_id=spiffe://cluster.local/ns/demo/sa/books"),
            "{l}"
        );
    }

    // Both proxies found through a manifest directory: lines from each.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("pods.yaml"), manifests(books, web)).unwrap();
    let source = format!("dir:{}", dir.path().display());
    let lines = ok_lines(&["--source", &source, "--max", "40"]);
    assert_eq!(lines.len(), 40, "{lines:#?}");
    for pod in ["demo/books-5f7b9c-abcde", "demo/web-5f7b9c-abcde"] {
        assert!(
            lines
                .iter()
                .any(|l| l.starts_with(&format!("rsp proxy={pod} "))),
            "no line from {pod}: {lines:#?}"
        );
    }

    // A bad filter: the proxy's 400, naming the proxy, exit 2.
    let out = weft_tap(&["--to-proxies", &web_arg, "--status", "6xx"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        err.trim(),
        format!("weft tap: proxy demo/web ({web}): GET /tap answered 400 Bad Request: tap: status=\"6xx\" is not valid: expected a status 100-599 or a class 1xx-5xx"),
    );
    let (status, _) = demo.stop();
    assert!(status.success());
}

#[test]
fn errors_name_the_proxy_and_exit_2() {
    let closed = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let out = weft_tap(&["--to-proxies", &format!("web={closed}")]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.starts_with(&format!(
            "weft tap: proxy web ({closed}): cannot connect to the admin port:"
        )),
        "{err}"
    );
    let out = weft_tap(&[]);
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr).trim(),
        "weft tap: nothing to tap: give --to-proxies ADDR... or --source dir:PATH"
    );
    let dir = tempfile::tempdir().unwrap();
    let source = format!("dir:{}", dir.path().display());
    let out = weft_tap(&["--source", &source]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no meshed pods with an IP address"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Pods `books-…` and `web-…` at 127.0.0.1 with the proxies' admin ports.
fn manifests(books: SocketAddr, web: SocketAddr) -> String {
    let pod = |name: &str, app: &str, port: u16| {
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: demo, labels: {{app: {app}, pod-template-hash: 5f7b9c}}}}\n\
             spec:\n  containers:\n  - name: {app}\n  - name: weft-proxy\n    ports: [{{name: weft-inbound, containerPort: 4143}}, {{name: weft-admin, containerPort: {port}}}]\n\
             status: {{phase: Running, podIP: 127.0.0.1}}\n---\n"
        )
    };
    format!(
        "{}{}",
        pod("books-5f7b9c-abcde", "books", books.port()),
        pod("web-5f7b9c-abcde", "web", web.port()),
    )
}

//! Access logs (`WEFT_PROXY_ACCESS_LOG=json|apache`): real proxies write one line per
//! request and direction on stdout, with what the proxy knew about the request, including
//! the answers it made itself; a bad value stops the proxy before it listens.

#![allow(clippy::unwrap_used)] // tests fail loudly on unexpected errors

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{ensure, Result};
use serde_json::Value;
use weft_e2e::client::Conn;
use weft_e2e::servers::http_server;
use weft_e2e::{eventually, free_addr, Proxy, ProxyOpts};

fn log_file(tag: &str) -> PathBuf {
    std::env::temp_dir().join(format!("weft-e2e-access-{tag}-{}.log", std::process::id()))
}

fn lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

fn with_log(format: &str, path: &Path, opts: ProxyOpts) -> Result<Proxy> {
    let mut opts = opts;
    opts.env
        .push(("WEFT_PROXY_ACCESS_LOG".into(), format.into()));
    opts.stdout = Some(path.to_path_buf());
    Proxy::start(opts)
}

#[tokio::test]
async fn json_lines_record_each_request_in_each_direction() -> Result<()> {
    let (app, _) = http_server().await?;
    let (server_log, client_log) = (log_file("server"), log_file("client"));
    let server = with_log(
        "json",
        &server_log,
        ProxyOpts {
            inbound_target: Some(app),
            ..Default::default()
        },
    )?;
    let client = with_log(
        "json",
        &client_log,
        ProxyOpts {
            outbound_target: Some(server.inbound),
            ..Default::default()
        },
    )?;
    let mut c = Conn::open(client.outbound, false).await?;
    for i in 0..10 {
        let (status, _, _) = c.get("books.test:8080", &format!("/uri?n={i}")).await?;
        assert_eq!(status, 200);
    }
    let (status, _, _) = c.get("books.test:8080", "/status/503").await?;
    assert_eq!(status, 503);

    // Written off the request path: the lines arrive a moment later.
    eventually(Duration::from_secs(5), || {
        Ok(lines(&client_log).len() >= 11 && lines(&server_log).len() >= 11)
    })?;
    for (path, direction) in [(&client_log, "outbound"), (&server_log, "inbound")] {
        let got: Vec<Value> = lines(path)
            .iter()
            .map(|l| serde_json::from_str(l))
            .collect::<Result<_, _>>()?;
        assert_eq!(got.len(), 11, "{direction}: {got:?}");
        for (i, v) in got.iter().take(10).enumerate() {
            assert_eq!(v["direction"], direction);
            assert_eq!(v["method"], "GET");
            assert_eq!(v["authority"], "books.test:8080");
            assert_eq!(v["path"], format!("/uri?n={i}"));
            assert_eq!(v["status"], 200);
            assert_eq!(v["protocol"], "HTTP/1.1");
            assert!(v["response_bytes"].as_u64().unwrap() > 0, "{v}");
            assert!(v["latency_ms"].as_f64().unwrap() >= 0.0, "{v}");
            assert!(
                v["duration_ms"].as_f64().unwrap() >= v["latency_ms"].as_f64().unwrap(),
                "{v}"
            );
            assert_eq!(v["proxy_error"], Value::Null);
            assert!(v["timestamp"].as_str().unwrap().ends_with('Z'), "{v}");
        }
        assert_eq!(got[10]["status"], 503);
        assert_eq!(got[10]["path"], "/status/503");
        // Where each hop sent the request.
        let want_endpoint = match direction {
            "outbound" => server.inbound,
            _ => app,
        };
        assert_eq!(got[0]["endpoint"], want_endpoint.to_string());
    }
    let m = client.metrics()?;
    assert_eq!(
        m.sum("weft_access_log_lines_total", &[("result", "written")]),
        11.0
    );
    assert_eq!(
        m.sum("weft_access_log_lines_total", &[("result", "dropped")]),
        0.0
    );
    let _ = std::fs::remove_file(&server_log);
    let _ = std::fs::remove_file(&client_log);
    Ok(())
}

#[tokio::test]
async fn apache_lines_are_combined_log_format_and_proxy_errors_are_logged() -> Result<()> {
    // Nothing listens at the target: the proxy answers 502 itself.
    let closed = free_addr()?;
    let log = log_file("apache");
    let p = with_log(
        "apache",
        &log,
        ProxyOpts {
            outbound_target: Some(closed),
            ..Default::default()
        },
    )?;
    let mut c = Conn::open(p.outbound, false).await?;
    let (status, _, _) = c
        .get_with(
            "gone.test",
            "/a%20b?x=1",
            &[
                ("user-agent", "probe/1.0 \"quoted\""),
                ("referer", "http://web.test/"),
            ],
        )
        .await?;
    assert_eq!(status, 502);
    eventually(Duration::from_secs(5), || Ok(!lines(&log).is_empty()))?;
    let got = lines(&log);
    assert_eq!(got.len(), 1, "{got:?}");
    let f = combined_fields(&got[0])?;
    assert_eq!(
        f,
        vec![
            "127.0.0.1",
            "-",
            "-",
            "GET /a%20b?x=1 HTTP/1.1",
            "502",
            // The proxy's own error body.
            f[5].as_str(),
            "http://web.test/",
            "probe/1.0 \\\"quoted\\\"",
        ]
    );
    assert!(f[5].parse::<u64>()? > 0, "{f:?}");
    let _ = std::fs::remove_file(&log);
    Ok(())
}

/// The fields of a Combined Log Format line (`host ident user [time] "request" status bytes
/// "referer" "user-agent"`), quotes and brackets removed; the time is checked for its shape.
fn combined_fields(line: &str) -> Result<Vec<String>> {
    let mut fields = Vec::new();
    let mut rest = line;
    while !rest.is_empty() {
        rest = rest.trim_start_matches(' ');
        let (field, next) = if let Some(r) = rest.strip_prefix('[') {
            let end = r.find(']').unwrap_or(r.len());
            let time = &r[..end];
            ensure!(
                time.len() == "05/Dec/2026:19:50:45 +0000".len() && time.ends_with(" +0000"),
                "time {time:?} in {line}"
            );
            (None, &r[(end + 1).min(r.len())..])
        } else if let Some(r) = rest.strip_prefix('"') {
            // Ends at the first quote not escaped by a backslash.
            let bytes = r.as_bytes();
            let mut i = 0;
            while i < bytes.len() && bytes[i] != b'"' {
                i += if bytes[i] == b'\\' { 2 } else { 1 };
            }
            ensure!(i < bytes.len(), "unterminated quote in {line}");
            (Some(&r[..i]), &r[i + 1..])
        } else {
            let end = rest.find(' ').unwrap_or(rest.len());
            (Some(&rest[..end]), &rest[end..])
        };
        if let Some(f) = field {
            fields.push(f.to_string());
        }
        rest = next;
    }
    ensure!(fields.len() == 8, "{line}: {} fields", fields.len());
    Ok(fields)
}

#[test]
fn a_bad_format_stops_the_proxy_naming_the_variable() -> Result<()> {
    let mut p = Proxy::spawn(ProxyOpts {
        env: vec![("WEFT_PROXY_ACCESS_LOG".into(), "xml".into())],
        ..Default::default()
    })?;
    let status = p.child.wait()?;
    assert_eq!(status.code(), Some(2));
    Ok(())
}

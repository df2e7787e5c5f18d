//! Network-namespace tier: the redirect installed by the real `weft-init`, as the injector's
//! init container would, in both pods, with `weft-proxy` beside it (UID 2102).
//!
//! An unmodified client (`curl`, a plain TCP socket) in "cli" talks to an unmodified server in
//! "srv" only through the two proxies: cli's outbound side and srv's inbound side both count the
//! requests. Skip ports bypass the proxies, an app dialling its own pod IP is left alone, the
//! proxies' own connections are not looped back (no `loop-detected`), and running `weft-init`
//! again changes nothing (iptables-save before and after). Also with the legacy backend.
//! Needs root: skipped otherwise, failed when `CI=true`.
//!
//! Run: `cargo build -p weft-proxy -p weft-injector && sudo -E cargo test -p weft-e2e --test netns_init`.

use std::net::SocketAddr;

use anyhow::{ensure, Result};
use weft_e2e::netns::{with_net, EchoServer, HelloServer, Net, Pod, PodProxy};
use weft_e2e::require_root;

const HTTP_PORT: u16 = 8080;
/// Skipped on the client's outbound side and the server's inbound side.
const SKIP_PORT: u16 = 9100;
/// Skipped only on the client's outbound side: the server's proxy still sees it.
const OUT_SKIP_PORT: u16 = 9200;
const PAYLOAD: &[u8] = b"\x00\x01raw bytes, not http\r\n";

fn v4(pod: &Pod, port: u16) -> SocketAddr {
    pod.v4_addr(port)
}

fn v6(pod: &Pod, port: u16) -> SocketAddr {
    pod.v6_addr(port)
}

fn url(addr: SocketAddr) -> String {
    HelloServer::url(addr)
}

/// Runs `weft-init` in the pod with `args`; its stderr (which shows the installed tables).
fn weft_init(pod: &Pod, args: &[&str]) -> Result<String> {
    let bin = weft_e2e::bin("weft-init")?;
    let out = pod
        .command(&bin.to_string_lossy())
        .args(args)
        .env_remove("WEFT_INIT_BACKEND")
        .output()?;
    ensure!(
        out.status.success(),
        "weft-init {} in pod {} failed ({}): {}",
        args.join(" "),
        pod.name,
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stderr).into_owned())
}

/// `iptables-save` output for both families without its timestamped comment lines.
fn saved(pod: &Pod, backend: &str) -> Result<String> {
    let mut all = String::new();
    for family in ["iptables", "ip6tables"] {
        let out = pod.exec(&format!("{family}-{backend}-save"), &["-t", "nat"])?;
        for line in out.lines().filter(|l| !l.starts_with('#')) {
            all.push_str(line);
            all.push('\n');
        }
    }
    Ok(all)
}

fn start_proxy(pod: &Pod) -> Result<PodProxy> {
    // Dual-stack listeners, as the injector configures them ([::]:port).
    pod.start_proxy(&[
        ("WEFT_PROXY_OUTBOUND_ADDR", "[::]:4140"),
        ("WEFT_PROXY_INBOUND_ADDR", "[::]:4143"),
    ])
}

struct Server {
    http: HelloServer,
    skip_echo: EchoServer,
    out_skip_echo: EchoServer,
}

fn start_server(net: &Net, srv: &Pod) -> Result<Server> {
    Ok(Server {
        http: HelloServer::start(net, srv, HTTP_PORT)?,
        skip_echo: EchoServer::start(srv, srv.v4_addr(SKIP_PORT))?,
        out_skip_echo: EchoServer::start(srv, srv.v4_addr(OUT_SKIP_PORT))?,
    })
}

fn count(proxy: &PodProxy, name: &str, labels: &[(&str, &str)]) -> Result<f64> {
    Ok(proxy.metrics()?.sum(name, labels))
}

#[test]
fn weft_init_meshes_two_pods() -> Result<()> {
    if !require_root("weft_init_meshes_two_pods")? {
        return Ok(());
    }
    with_net(&["cli", "srv"], |net| {
        let (cli, srv) = (net.pod("cli"), net.pod("srv"));
        let server = start_server(net, srv)?;
        let skip_out = format!("{SKIP_PORT},{OUT_SKIP_PORT}");
        let skip_in = format!("4191,{SKIP_PORT}");
        weft_init(
            cli,
            &["--backend", "nft", "--skip-outbound-ports", &skip_out],
        )?;
        weft_init(srv, &["--backend", "nft", "--skip-inbound-ports", &skip_in])?;

        // Idempotent: a second run leaves both tables as they were.
        let before = saved(cli, "nft")?;
        weft_init(
            cli,
            &["--backend", "nft", "--skip-outbound-ports", &skip_out],
        )?;
        let after = saved(cli, "nft")?;
        ensure!(
            before == after,
            "second weft-init run changed the table:\n--- before\n{before}--- after\n{after}"
        );
        ensure!(
            before.matches("-j WEFT_OUTBOUND\n").count() == 2,
            "want one OUTPUT jump per family:\n{before}"
        );

        // The rules are live: with no proxies, the app's connection goes nowhere.
        ensure!(
            cli.curl(&url(v4(srv, HTTP_PORT))).is_err(),
            "curl reached the server with no proxy running: the redirect is not in effect"
        );

        let cli_proxy = start_proxy(cli)?;
        let srv_proxy = start_proxy(srv)?;

        for target in [v4(srv, HTTP_PORT), v6(srv, HTTP_PORT)] {
            let (status, body) = cli.curl(&url(target))?;
            ensure!(
                status == 200,
                "GET {} answered {status}: {body}",
                url(target)
            );
            ensure!(
                body == server.http.body,
                "GET {} returned {body:?}",
                url(target)
            );
        }
        // Both proxies saw both requests: the client's outbound side and the server's inbound.
        for target in [v4(srv, HTTP_PORT), v6(srv, HTTP_PORT)] {
            let authority = target.to_string();
            let out = [("direction", "outbound"), ("authority", authority.as_str())];
            cli_proxy.wait_metric("weft_http_requests_total", &out, 1.0)?;
            let inb = [("direction", "inbound"), ("authority", authority.as_str())];
            srv_proxy.wait_metric("weft_http_requests_total", &inb, 1.0)?;
        }

        // A port skipped on both sides bypasses both proxies: no connection counted anywhere.
        let tcp = "weft_tcp_connections_total";
        let cli_before = count(&cli_proxy, tcp, &[])?;
        let srv_before = count(&srv_proxy, tcp, &[])?;
        let reply = cli.tcp_exchange(server.skip_echo.addr, PAYLOAD)?;
        ensure!(reply == PAYLOAD, "echo on the skip port returned {reply:?}");
        let peers = server.skip_echo.peers();
        ensure!(
            peers.len() == 1 && peers[0].ip() == cli.v4,
            "skip-port echo saw {peers:?}"
        );
        // A proxy counts a connection when it accepts it, before it dials the server, so had
        // the exchange gone through a proxy the count would already show it: no waiting needed.
        ensure!(
            count(&cli_proxy, tcp, &[])? == cli_before,
            "the client proxy saw the skip-port connection"
        );
        ensure!(
            count(&srv_proxy, tcp, &[])? == srv_before,
            "the server proxy saw the skip-port connection"
        );

        // A port skipped only outbound: the client's proxy is bypassed, the server's is not.
        let reply = cli.tcp_exchange(server.out_skip_echo.addr, PAYLOAD)?;
        ensure!(
            reply == PAYLOAD,
            "echo on the outbound-skip port returned {reply:?}"
        );
        srv_proxy.wait_metric(tcp, &[("direction", "inbound")], 3.0)?;
        ensure!(
            count(&cli_proxy, tcp, &[])? == cli_before,
            "the client proxy saw the outbound-skip connection"
        );

        // The server app dialling its own pod IP goes through lo and is left alone.
        let srv_in = count(&srv_proxy, tcp, &[("direction", "inbound")])?;
        let srv_out = count(&srv_proxy, tcp, &[("direction", "outbound")])?;
        let (status, _) = srv.curl(&url(v4(srv, HTTP_PORT)))?;
        ensure!(status == 200, "the server calling itself got {status}");
        ensure!(
            count(&srv_proxy, tcp, &[("direction", "inbound")])? == srv_in,
            "self-call went through inbound"
        );
        ensure!(
            count(&srv_proxy, tcp, &[("direction", "outbound")])? == srv_out,
            "self-call went through outbound"
        );

        // No loops, no errors: the proxies' own connections (UID 2102) were never redirected.
        for (name, p) in [("cli", &cli_proxy), ("srv", &srv_proxy)] {
            let m = p.metrics()?;
            let loops = m.sum("weft_proxy_errors_total", &[("cause", "loop-detected")]);
            ensure!(loops == 0.0, "{name}: loop-detected counted {loops} times");
            let errors = m.sum("weft_proxy_errors_total", &[]);
            ensure!(errors == 0.0, "{name}: the proxy counted {errors} errors");
        }
        // Exactly the app's connections: 2 HTTP from cli; 2 HTTP + 1 opaque into srv.
        cli_proxy.wait_metric(tcp, &[("direction", "outbound")], 2.0)?;
        srv_proxy.wait_metric(tcp, &[("direction", "inbound")], 3.0)?;
        Ok(())
    })
}

#[test]
fn weft_init_legacy_backend() -> Result<()> {
    if !require_root("weft_init_legacy_backend")? {
        return Ok(());
    }
    with_net(&["cli", "srv"], |net| {
        let (cli, srv) = (net.pod("cli"), net.pod("srv"));
        let server = start_server(net, srv)?;
        weft_init(cli, &["--backend", "legacy"])?;
        let before = saved(cli, "legacy")?;
        ensure!(
            before.contains("-A OUTPUT -p tcp -j WEFT_OUTBOUND"),
            "legacy rules missing:\n{before}"
        );
        weft_init(cli, &["--backend", "legacy"])?;
        ensure!(
            saved(cli, "legacy")? == before,
            "second legacy run changed the table"
        );
        ensure!(
            !saved(cli, "nft")?.contains("WEFT"),
            "legacy run wrote nft rules"
        );
        // `auto` now finds the legacy rules and stays with that backend.
        weft_init(cli, &["--backend", "auto"])?;
        ensure!(
            saved(cli, "legacy")? == before,
            "auto run changed the legacy table"
        );
        ensure!(
            !saved(cli, "nft")?.contains("WEFT"),
            "auto run wrote nft rules next to legacy ones"
        );

        let proxy = start_proxy(cli)?;
        let target = v6(srv, HTTP_PORT);
        let (status, body) = cli.curl(&url(target))?;
        ensure!(
            status == 200 && body == server.http.body,
            "GET {} answered {status}: {body}",
            url(target)
        );
        let authority = target.to_string();
        proxy.wait_metric(
            "weft_http_requests_total",
            &[("direction", "outbound"), ("authority", authority.as_str())],
            1.0,
        )?;
        Ok(())
    })
}

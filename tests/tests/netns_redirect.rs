//! Network-namespace tier: transparent redirection with real iptables rules.
//!
//! Two pods ("cli" and "srv") are network namespaces on a bridge. Rules in the pods' nat tables
//! (nftables backend) REDIRECT TCP to `weft-proxy`, which runs as UID 2102 with no fixed target,
//! so every connection's destination comes from `SO_ORIGINAL_DST` / `IP6T_SO_ORIGINAL_DST`.
//! Clients are unmodified (`curl`, a plain TCP socket); the HTTP server is a separate
//! `python3 -m http.server` process. Needs root: skipped otherwise, failed when `CI=true`.
//!
//! Run: `cargo build --bins && sudo -E cargo test -p weft-e2e --test netns_redirect`.

use std::net::{IpAddr, SocketAddr};

use anyhow::{ensure, Result};
use weft_e2e::netns::{
    with_net, EchoServer, Family, HelloServer, Net, Pod, INBOUND_PORT, OUTBOUND_PORT, PROXY_UID,
};
use weft_e2e::require_root;

const HTTP_PORT: u16 = 8080;
const ECHO_PORT: u16 = 9000;
const OPAQUE_PAYLOAD: &[u8] = b"\x00\x01not http, just bytes\r\n\xff";

/// The apps in the server pod: an HTTP server (its own process) and TCP echo servers.
struct Apps {
    http: HelloServer,
    echo4: EchoServer,
    echo6: EchoServer,
}

fn start_apps(net: &Net, srv: &Pod) -> Result<Apps> {
    Ok(Apps {
        http: HelloServer::start(net, srv, HTTP_PORT)?,
        echo4: EchoServer::start(srv, srv.v4_addr(ECHO_PORT))?,
        echo6: EchoServer::start(srv, srv.v6_addr(ECHO_PORT))?,
    })
}

fn url(addr: SocketAddr) -> String {
    HelloServer::url(addr)
}

/// An app in "cli" dials the server pod over IPv4 and IPv6; its pod's OUTPUT rules send the
/// connections to the proxy, which recovers the original destination and forwards them. HTTP
/// is counted per request, other TCP is relayed as opaque, and the proxy's own outgoing
/// connections (UID 2102) are not redirected back to it.
#[test]
fn outbound_redirect_ipv4_and_ipv6() -> Result<()> {
    if !require_root("outbound_redirect_ipv4_and_ipv6")? {
        return Ok(());
    }
    with_net(&["cli", "srv"], |net| {
        let (cli, srv) = (net.pod("cli"), net.pod("srv"));
        let apps = start_apps(net, srv)?;
        for family in [Family::V4, Family::V6] {
            cli.redirect_outbound(family, PROXY_UID, OUTBOUND_PORT)?;
        }
        let (http4, http6) = (srv.v4_addr(HTTP_PORT), srv.v6_addr(HTTP_PORT));

        // The rules are live: with no proxy listening, the app's connection is refused.
        ensure!(
            cli.curl(&url(http4)).is_err(),
            "curl reached {http4} without a proxy: the OUTPUT redirect is not in effect"
        );

        // Locally generated traffic is REDIRECTed to 127.0.0.1 (IPv4) and ::1 (IPv6). The proxy
        // has one outbound address, so it listens dual-stack on [::]:4140 and IPv4 connections
        // arrive as v4-mapped IPv6 sockets. The port is still unreachable from other pods in a
        // real mesh: their traffic to it is redirected to 4143 by PREROUTING.
        let proxy = cli.start_proxy(&[("WEFT_PROXY_OUTBOUND_ADDR", "[::]:4140")])?;

        for target in [http4, http6] {
            let (status, body) = cli.curl(&url(target))?;
            ensure!(
                status == 200,
                "GET {} answered {status}: {body}",
                url(target)
            );
            ensure!(
                body == apps.http.body,
                "GET {} returned {body:?}",
                url(target)
            );
        }
        for target in [http4, http6] {
            let authority = target.to_string();
            let labels = [("direction", "outbound"), ("authority", authority.as_str())];
            proxy.wait_metric("weft_http_requests_total", &labels, 1.0)?;
            let labels = [
                ("direction", "outbound"),
                ("authority", authority.as_str()),
                ("status_code", "200"),
            ];
            proxy.wait_metric("weft_http_responses_total", &labels, 1.0)?;
        }

        let peers: [(&EchoServer, IpAddr); 2] = [
            (&apps.echo4, IpAddr::V4(cli.v4)),
            (&apps.echo6, IpAddr::V6(cli.v6)),
        ];
        for (echo, peer_ip) in peers {
            let reply = cli.tcp_exchange(echo.addr, OPAQUE_PAYLOAD)?;
            ensure!(
                reply == OPAQUE_PAYLOAD,
                "echo via {} returned {reply:?}",
                echo.addr
            );
            // The proxy dialled out from the pod's own address: transparent to the server.
            let peers = echo.peers();
            ensure!(
                peers.len() == 1 && peers[0].ip() == peer_ip,
                "echo server {} saw connections from {peers:?}, want one from {peer_ip}",
                echo.addr
            );
        }
        let out = [("direction", "outbound")];
        proxy.wait_metric(
            "weft_detect_total",
            &[("direction", "outbound"), ("protocol", "opaque")],
            2.0,
        )?;
        proxy.wait_metric(
            "weft_detect_total",
            &[("direction", "outbound"), ("protocol", "http1")],
            2.0,
        )?;

        // No loop: the proxy accepted exactly the app's four connections (its own connections
        // to the server, as UID 2102, were not redirected back to it) and counted no errors,
        // in particular no `loop-detected` and no `no-original-destination`.
        proxy.wait_metric("weft_tcp_connections_total", &out, 4.0)?;
        let m = proxy.metrics()?;
        let loops = m.sum("weft_proxy_errors_total", &[("cause", "loop-detected")]);
        ensure!(loops == 0.0, "loop-detected counted {loops} times");
        let errors = m.sum("weft_proxy_errors_total", &[]);
        ensure!(errors == 0.0, "the proxy counted {errors} errors");
        Ok(())
    })
}

/// A client pod without a proxy dials the server pod; the server pod's PREROUTING rules send
/// the connections to the server's proxy, which forwards them to the app on the original port.
#[test]
fn inbound_redirect_ipv4_and_ipv6() -> Result<()> {
    if !require_root("inbound_redirect_ipv4_and_ipv6")? {
        return Ok(());
    }
    with_net(&["cli", "srv"], |net| {
        let (cli, srv) = (net.pod("cli"), net.pod("srv"));
        let apps = start_apps(net, srv)?;
        for family in [Family::V4, Family::V6] {
            for port in [HTTP_PORT, ECHO_PORT] {
                srv.redirect_inbound(family, port, INBOUND_PORT)?;
            }
        }
        let (http4, http6) = (srv.v4_addr(HTTP_PORT), srv.v6_addr(HTTP_PORT));
        ensure!(
            cli.curl(&url(http4)).is_err(),
            "curl reached {http4} without the server's proxy: the PREROUTING redirect is not in effect"
        );

        // Dual-stack for the same reason as outbound: one listener for both families.
        let proxy = srv.start_proxy(&[("WEFT_PROXY_INBOUND_ADDR", "[::]:4143")])?;

        for target in [http4, http6] {
            let (status, body) = cli.curl(&url(target))?;
            ensure!(
                status == 200,
                "GET {} answered {status}: {body}",
                url(target)
            );
            ensure!(
                body == apps.http.body,
                "GET {} returned {body:?}",
                url(target)
            );
        }
        for target in [http4, http6] {
            let authority = target.to_string();
            let labels = [("direction", "inbound"), ("authority", authority.as_str())];
            proxy.wait_metric("weft_http_requests_total", &labels, 1.0)?;
        }
        for echo in [&apps.echo4, &apps.echo6] {
            let reply = cli.tcp_exchange(echo.addr, OPAQUE_PAYLOAD)?;
            ensure!(
                reply == OPAQUE_PAYLOAD,
                "echo via {} returned {reply:?}",
                echo.addr
            );
        }
        proxy.wait_metric(
            "weft_detect_total",
            &[("direction", "inbound"), ("protocol", "opaque")],
            2.0,
        )?;
        proxy.wait_metric(
            "weft_tcp_connections_total",
            &[("direction", "inbound")],
            4.0,
        )?;
        // The client pod has no proxy, so nothing went out through the server's outbound side.
        let m = proxy.metrics()?;
        let outbound = m.sum("weft_tcp_connections_total", &[("direction", "outbound")]);
        ensure!(outbound == 0.0, "outbound accepted {outbound} connections");
        let errors = m.sum("weft_proxy_errors_total", &[]);
        ensure!(errors == 0.0, "the proxy counted {errors} errors");
        Ok(())
    })
}

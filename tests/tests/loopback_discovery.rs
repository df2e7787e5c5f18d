//! Discovery and load balancing end to end: a real `weft-controller --source dir:TMP`, real
//! `weft-proxy` processes with `WEFT_PROXY_DESTINATION_ADDR`, and loopback servers whose
//! request counters show where traffic went.
//!
//! Needs `cargo build -p weft-proxy -p weft-controller` first.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use tokio::time::Instant;
use weft_e2e::client::{echo, echo_server, Conn, Load};
use weft_e2e::controller::{Controller, ManifestDir};
use weft_e2e::servers::{http_server, Stats};
use weft_e2e::{eventually_async, Proxy, ProxyOpts};

const NS: &str = "shop";
const SVC_IP: &str = "10.96.0.10";

fn discovery_env(c: &Controller) -> Vec<(String, String)> {
    vec![
        c.env(),
        ("WEFT_PROXY_NAMESPACE".into(), NS.into()),
        ("WEFT_PROXY_POD_NAME".into(), "client-0".into()),
        ("WEFT_PROXY_SERVICE_ACCOUNT".into(), "client".into()),
        // The e2e tests never wait long for a restarted controller.
        ("WEFT_PROXY_DISCOVERY_BACKOFF_MAX".into(), "1s".into()),
    ]
}

struct Servers(Vec<(SocketAddr, Arc<Stats>)>);

impl Servers {
    async fn start(n: usize) -> Result<Self> {
        let mut v = Vec::new();
        for _ in 0..n {
            v.push(http_server().await?);
        }
        Ok(Self(v))
    }
    fn addrs(&self, idx: &[usize]) -> Vec<SocketAddr> {
        idx.iter().map(|&i| self.0[i].0).collect()
    }
    fn counts(&self) -> Vec<u64> {
        self.0
            .iter()
            .map(|(_, s)| s.requests.load(Ordering::Relaxed))
            .collect()
    }
}

/// Waits until traffic goes only to `active`: every active server has received requests
/// since the call, and the others none during the last window. (A latency-aware balancer
/// under light load may leave an equal endpoint idle for a while, so activity is counted
/// from the call, not per window.)
async fn traffic_moves_to(
    servers: &Servers,
    active: &[usize],
    timeout: Duration,
) -> Result<BTreeMap<usize, u64>> {
    traffic_within(servers, active, true, timeout).await
}

/// Like [`traffic_moves_to`]; with `each == false` it is enough that the active servers
/// together receive traffic (the set is right, the balancer may favour some).
async fn traffic_within(
    servers: &Servers,
    active: &[usize],
    each: bool,
    timeout: Duration,
) -> Result<BTreeMap<usize, u64>> {
    let window = Duration::from_millis(400);
    let deadline = Instant::now() + timeout;
    let since = servers.counts();
    loop {
        let before = servers.counts();
        tokio::time::sleep(window).await;
        let after = servers.counts();
        let idle_quiet = (0..after.len())
            .filter(|i| !active.contains(i))
            .all(|i| after[i] == before[i]);
        let active_busy = if each {
            active.iter().all(|&i| after[i] > since[i])
        } else {
            active.iter().any(|&i| after[i] > since[i])
        };
        let total: BTreeMap<usize, u64> =
            (0..after.len()).map(|i| (i, after[i] - since[i])).collect();
        if idle_quiet && active_busy {
            return Ok(total);
        }
        if Instant::now() > deadline {
            bail!("traffic did not move to {active:?} within {timeout:?}: since the change {total:?}, last window quiet: {idle_quiet}");
        }
    }
}

/// `n` requests at once (each takes 20 ms at the server, so they overlap and the balancer
/// sees them in flight): one HTTP/2 connection, or one HTTP/1.1 connection per request.
async fn concurrent_gets(proxy: SocketAddr, h2: bool, host: &str, n: usize) -> Result<()> {
    let shared = if h2 {
        Some(Conn::open(proxy, true).await?)
    } else {
        None
    };
    let mut tasks = Vec::new();
    for _ in 0..n {
        let mut conn = match &shared {
            Some(Conn::H2(s)) => Conn::H2(s.clone()),
            _ => Conn::open(proxy, false).await?,
        };
        let host = host.to_string();
        tasks.push(tokio::spawn(
            async move { conn.get(&host, "/slow?ms=20").await },
        ));
    }
    for t in tasks {
        let (status, err, _) = t.await??;
        anyhow::ensure!(status == 200 && err.is_empty(), "{host}: {status} {err}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_by_service_name_and_passes_unknown_names_through() -> Result<()> {
    let servers = Servers::start(3).await?;
    let (fallback, fallback_stats) = http_server().await?;
    let dir = ManifestDir::new("names")?;
    dir.service(NS, "web", SVC_IP, 80, &servers.addrs(&[0, 1, 2]))?;
    dir.service(NS, "empty", "10.96.0.11", 80, &[])?;
    let controller = Controller::start(dir.path())?;
    let proxy = Proxy::start(ProxyOpts {
        outbound_target: Some(fallback),
        env: discovery_env(&controller),
        ..Default::default()
    })?;

    for h2 in [false, true] {
        for host in [
            "web",
            "web:80",
            "web.shop",
            "web.shop.svc",
            "web.shop.svc.cluster.local",
            "web.shop.svc.cluster.local:80",
            "WEB.Shop:80",
            SVC_IP,
        ] {
            let before = servers.counts();
            concurrent_gets(proxy.outbound, h2, host, 30).await?;
            let after = servers.counts();
            let delta: Vec<u64> = after.iter().zip(&before).map(|(a, b)| a - b).collect();
            assert_eq!(delta.iter().sum::<u64>(), 30, "h2={h2} {host}: {delta:?}");
            assert!(
                delta.iter().all(|&d| d > 0),
                "h2={h2} {host}: not spread over all endpoints: {delta:?}"
            );
        }
        assert_eq!(fallback_stats.requests.load(Ordering::Relaxed), 0);
    }

    // Unknown names and another namespace's short name go to the original destination.
    let mut conn = Conn::open(proxy.outbound, false).await?;
    let before = servers.counts();
    for (i, host) in ["unknown", "web.other", "web:8080", "example.com"]
        .iter()
        .enumerate()
    {
        let (status, err, _) = conn.get(host, "/").await?;
        assert_eq!((status, err.as_str()), (200, ""), "{host}");
        assert_eq!(
            fallback_stats.requests.load(Ordering::Relaxed),
            i as u64 + 1,
            "{host}"
        );
    }
    assert_eq!(servers.counts(), before);

    // A service without endpoints fails fast with the cause.
    let (status, err, _) = conn.get("empty.shop", "/").await?;
    assert_eq!((status, err.as_str()), (503, "no-endpoints"));

    let m = proxy.metrics()?;
    assert!(m.sum("weft_discovery_stream_connects_total", &[]) >= 1.0);
    assert!(m.sum("weft_discovery_resolutions", &[]) >= 1.0);
    assert!(
        m.sum(
            "weft_outbound_routes_total",
            &[("protocol", "http"), ("route", "balanced")]
        ) >= 480.0
    );
    assert_eq!(
        m.sum(
            "weft_outbound_routes_total",
            &[("protocol", "http"), ("route", "no-endpoints")]
        ),
        1.0
    );
    Ok(())
}

async fn scale_under_load(h2: bool) -> Result<()> {
    let servers = Servers::start(5).await?;
    let (fallback, fallback_stats) = http_server().await?;
    let dir = ManifestDir::new(if h2 { "scale-h2" } else { "scale-h1" })?;
    dir.service(NS, "web", SVC_IP, 80, &servers.addrs(&[0, 1, 2]))?;
    let controller = Controller::start(dir.path())?;
    let proxy = Proxy::start(ProxyOpts {
        outbound_target: Some(fallback),
        env: discovery_env(&controller),
        ..Default::default()
    })?;

    let load = Load::start(proxy.outbound, "web.shop.svc.cluster.local", h2, 200, 8).await?;
    traffic_moves_to(&servers, &[0, 1, 2], Duration::from_secs(5)).await?;
    dir.service(NS, "web", SVC_IP, 80, &servers.addrs(&[2]))?;
    traffic_moves_to(&servers, &[2], Duration::from_secs(5)).await?;
    dir.service(NS, "web", SVC_IP, 80, &servers.addrs(&[0, 1, 2, 3, 4]))?;
    let spread = traffic_moves_to(&servers, &[0, 1, 2, 3, 4], Duration::from_secs(5)).await?;
    eprintln!("h2={h2}: last window after scaling to 5: {spread:?}");
    let ok = load.finish().await?;
    assert!(ok > 200, "only {ok} requests");
    assert_eq!(fallback_stats.requests.load(Ordering::Relaxed), 0);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scaling_3_1_5_under_http1_load_fails_nothing() -> Result<()> {
    scale_under_load(false).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scaling_3_1_5_under_http2_load_fails_nothing() -> Result<()> {
    scale_under_load(true).await
}

/// Service `web` with three endpoints (the servers) and a proxy routing to it by name; the
/// proxy's original destination is a server that must see nothing.
async fn three_endpoints(name: &str) -> Result<(Servers, ManifestDir, Controller, Proxy)> {
    let servers = Servers::start(3).await?;
    let (fallback, _) = http_server().await?;
    let dir = ManifestDir::new(name)?;
    dir.service(NS, "web", SVC_IP, 80, &servers.addrs(&[0, 1, 2]))?;
    let controller = Controller::start(dir.path())?;
    let proxy = Proxy::start(ProxyOpts {
        outbound_target: Some(fallback),
        env: discovery_env(&controller),
        ..Default::default()
    })?;
    Ok((servers, dir, controller, proxy))
}

/// Issue 12: an endpoint that was slow for a moment (a GC pause, its first connection on a
/// busy node) is back in rotation within 2 s of answering fast again, instead of being
/// starved while one slow sample decays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_briefly_slow_endpoint_is_back_in_rotation_within_2s() -> Result<()> {
    let (servers, _dir, _controller, proxy) = three_endpoints("briefly-slow").await?;
    let load = Load::start(proxy.outbound, "web", false, 200, 8).await?;
    traffic_within(&servers, &[0, 1, 2], false, Duration::from_secs(5)).await?;

    // Server 0 answers in 300 ms for a moment: the balancer sees it slow and moves away.
    let slow = &servers.0[0].1;
    slow.delay_ms.store(300, Ordering::Relaxed);
    let at_slow = slow.requests.load(Ordering::Relaxed);
    eventually_async(Duration::from_secs(5), || {
        Ok(slow.requests.load(Ordering::Relaxed) >= at_slow + 2)
    })
    .await
    .context("server 0 got requests while slow")?;
    tokio::time::sleep(Duration::from_millis(400)).await;
    slow.delay_ms.store(0, Ordering::Relaxed);

    // Fast again: within 2 s it carries a share of the traffic again (20 requests is about
    // a third of a second of its share at 200 req/s over three endpoints).
    let fast_at = Instant::now();
    let at_fast = slow.requests.load(Ordering::Relaxed);
    eventually_async(Duration::from_secs(2), || {
        Ok(slow.requests.load(Ordering::Relaxed) >= at_fast + 20)
    })
    .await
    .with_context(|| {
        format!(
            "server 0 got {} requests in the 2 s after it recovered",
            slow.requests.load(Ordering::Relaxed) - at_fast
        )
    })?;
    eprintln!("back in rotation after {:?}", fast_at.elapsed());
    load.finish().await?;
    Ok(())
}

/// Issue 12: an endpoint that fails every request is ejected by the circuit breaker after
/// seven consecutive failures (DESIGN.md's default), then only probed with a doubling
/// ejection time, while its healthy siblings carry the traffic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hard_failing_endpoint_is_ejected() -> Result<()> {
    let (servers, _dir, _controller, proxy) = three_endpoints("ejection").await?;
    let broken = &servers.0[0].1;
    broken.fail(1.0);
    let load = Load::start(proxy.outbound, "web", false, 200, 8).await?;
    eventually_async(Duration::from_secs(5), || {
        Ok(proxy.metrics()?.sum("weft_outbound_ejections_total", &[]) >= 1.0)
    })
    .await
    .context("the failing endpoint was ejected")?;
    // Three more seconds: ejected for 1 s, probed once, ejected for 2 s, probed once.
    let at = broken.requests.load(Ordering::Relaxed);
    let ok_at = load.ok();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let probes = broken.requests.load(Ordering::Relaxed) - at;
    let served = load.ok() - ok_at;
    let (_, failures) = load.stop().await?;
    eprintln!(
        "{} failures in all; {probes} probes while {served} requests succeeded",
        failures.len()
    );
    assert!(served > 300, "only {served} requests in 3 s");
    assert!(
        probes <= 3,
        "{probes} requests reached the ejected endpoint in 3 s"
    );
    // Before its ejection, the client saw its seven failures, then about one per probe.
    assert!(
        failures.len() <= 7 + 5,
        "{} failures: {failures:?}",
        failures.len()
    );
    assert!(
        failures.iter().all(|f| f.error.starts_with("503")),
        "{failures:?}"
    );
    let ejected = proxy.metrics()?.sum("weft_outbound_endpoints_ejected", &[]);
    assert_eq!(ejected, 1.0, "one endpoint is out");
    Ok(())
}

/// A gRPC client gets the proxy's own answers the gRPC way: `grpc-status` in a trailers-only
/// response (here 14 UNAVAILABLE for a service with no endpoints), `weft-proxy-error` naming
/// the cause, and the detail in `grpc-message`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_clients_get_proxy_errors_as_grpc_statuses() -> Result<()> {
    let (fallback, _) = http_server().await?;
    let dir = ManifestDir::new("grpc-errors")?;
    dir.service(NS, "web", SVC_IP, 80, &[])?;
    let controller = Controller::start(dir.path())?;
    let proxy = Proxy::start(ProxyOpts {
        outbound_target: Some(fallback),
        env: discovery_env(&controller),
        ..Default::default()
    })?;
    let mut conn = Conn::open(proxy.outbound, true).await?;
    let answer = conn.grpc_echo("web.shop.svc.cluster.local", b"hi").await?;
    let err = answer.expect_err("a service without endpoints cannot answer");
    assert!(err.starts_with("200 "), "{err}");
    assert!(err.contains("grpc-status=Some(\"14\")"), "{err}");
    assert!(
        err.contains("weft-proxy-error=Some(\"no-endpoints\")"),
        "{err}"
    );
    assert!(err.contains("has no ready endpoints"), "{err}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controller_restart_under_load_fails_nothing() -> Result<()> {
    let servers = Servers::start(4).await?;
    let (fallback, fallback_stats) = http_server().await?;
    let dir = ManifestDir::new("outage")?;
    dir.service(NS, "web", SVC_IP, 80, &servers.addrs(&[0, 1, 2]))?;
    let mut controller = Controller::start(dir.path())?;
    let proxy = Proxy::start(ProxyOpts {
        outbound_target: Some(fallback),
        env: discovery_env(&controller),
        ..Default::default()
    })?;
    let load = Load::start(proxy.outbound, "web", false, 200, 8).await?;
    // Only the set matters here (the endpoints came from the controller): one slow first
    // response on a busy machine can keep peak-EWMA off an endpoint for longer than 5 s.
    traffic_within(&servers, &[0, 1, 2], false, Duration::from_secs(5)).await?;

    controller.kill()?;
    // The proxy notices (its stream fails) and keeps serving from the last known endpoints.
    eventually_async(Duration::from_secs(5), || {
        Ok(proxy
            .metrics()?
            .sum("weft_discovery_stream_errors_total", &[])
            >= 1.0)
    })
    .await
    .context("stream error counted")?;
    let at_kill = load.ok();
    eventually_async(Duration::from_secs(10), || Ok(load.ok() >= at_kill + 400))
        .await
        .context("400 requests with the controller down")?;
    // Still the last known endpoints (under light load p2c may favour some of them).
    traffic_within(&servers, &[0, 1, 2], false, Duration::from_secs(2)).await?;
    // A new connection to a known target still works while the controller is down.
    let mut conn = Conn::open(proxy.outbound, false).await?;
    assert_eq!(conn.get("web", "/").await?.0, 200);

    let connects = proxy
        .metrics()?
        .sum("weft_discovery_stream_connects_total", &[]);
    controller.restart()?;
    eventually_async(Duration::from_secs(10), || {
        Ok(proxy
            .metrics()?
            .sum("weft_discovery_stream_connects_total", &[])
            > connects)
    })
    .await
    .context("stream reconnected")?;
    // A change made after the restart is picked up.
    dir.service(NS, "web", SVC_IP, 80, &servers.addrs(&[3]))?;
    traffic_moves_to(&servers, &[3], Duration::from_secs(5)).await?;
    load.finish().await?;
    assert_eq!(fallback_stats.requests.load(Ordering::Relaxed), 0);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opaque_tcp_to_a_cluster_ip_is_balanced_per_connection() -> Result<()> {
    let mut echoes = Vec::new();
    for _ in 0..3 {
        echoes.push(echo_server().await?);
    }
    let (other, other_count) = echo_server().await?;
    let dir = ManifestDir::new("tcp")?;
    let addrs: Vec<SocketAddr> = echoes.iter().map(|(a, _)| *a).collect();
    dir.service(NS, "db", "10.96.0.40", 7000, &addrs)?;
    let controller = Controller::start(dir.path())?;
    let mut env = discovery_env(&controller);
    env.push(("WEFT_PROXY_OPAQUE_PORTS".into(), "7000".into()));
    let proxy = Proxy::start(ProxyOpts {
        // The app connected to the ClusterIP; SO_ORIGINAL_DST would say so.
        outbound_target: Some("10.96.0.40:7000".parse()?),
        env: env.clone(),
        ..Default::default()
    })?;
    // 30 connections held open at once: p2c over open connections spreads them evenly.
    let mut held = Vec::new();
    for _ in 0..30 {
        held.push(echo(proxy.outbound).await?);
    }
    let counts: Vec<u64> = echoes
        .iter()
        .map(|(_, c)| c.load(Ordering::Relaxed))
        .collect();
    assert_eq!(counts.iter().sum::<u64>(), 30);
    assert!(
        counts.iter().all(|&c| (7..=13).contains(&c)),
        "uneven: {counts:?}"
    );
    drop(held);
    let m = proxy.metrics()?;
    assert_eq!(
        m.sum(
            "weft_outbound_routes_total",
            &[("protocol", "tcp"), ("route", "balanced")]
        ),
        30.0
    );

    // An address the controller does not know is passed through unchanged.
    let passthrough = Proxy::start(ProxyOpts {
        outbound_target: Some(other),
        env,
        ..Default::default()
    })?;
    drop(echo(passthrough.outbound).await?);
    assert_eq!(other_count.load(Ordering::Relaxed), 1);
    Ok(())
}

/// A proxy is not ready until its controller has served once (its index synced): `/ready`
/// says why, naming the destination address; then it is ready, and a later controller outage
/// does not unready it (the last state keeps serving).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_is_not_ready_until_its_controller_has_served_once() -> Result<()> {
    let dir = ManifestDir::new("ready-gate")?;
    let mut controller = Controller::prepare(dir.path(), &[])?;
    let mut proxy = Proxy::spawn(ProxyOpts {
        env: discovery_env(&controller),
        ..Default::default()
    })?;
    let want = format!(
        "not ready: no discovery state yet: destination service at {}",
        controller.destination
    );
    let mut body = String::new();
    eventually_async(Duration::from_secs(10), || {
        let (status, b) = weft_e2e::admin_get(proxy.admin, "/ready")?;
        body = b;
        Ok(status == 503 && body.starts_with(&want))
    })
    .await
    .with_context(|| format!("/ready said {body:?}"))?;
    assert!(body.contains("unreachable"), "{body}");
    // Still not ready a moment later: nothing answers.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(weft_e2e::admin_get(proxy.admin, "/ready")?.0, 503);

    controller.launch()?;
    proxy.wait_ready(Duration::from_secs(10))?;
    controller.kill()?;
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let (status, body) = weft_e2e::admin_get(proxy.admin, "/ready")?;
        assert_eq!(status, 200, "{body}");
    }
    Ok(())
}

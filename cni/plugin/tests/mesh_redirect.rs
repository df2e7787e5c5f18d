//! The CNI as the mesh's redirect, end to end and as root: the real `weft-cni` with the real
//! `weft-cni-agent` (a manifest directory as its source) ADDs a pod whose annotations carry
//! the injector's `weft.dev/redirect`, passed by the "runtime" under `runtimeConfig` as
//! containerd and CRI-O do. Then:
//!
//! - the pod's nat table (`iptables-nft-save`, both families) equals what the real `weft-init`
//!   leaves in a fresh namespace for the same configuration, and running `weft-init` again in
//!   the pod changes nothing (one implementation, idempotent);
//! - a TCP connection from inside the pod to an address outside it lands on a listener on the
//!   proxy's outbound port, which recovers the original destination with `SO_ORIGINAL_DST`;
//!   a skipped port is not redirected;
//! - a pod without the annotation is untouched: no Weft chains, its connection reaches the
//!   real server;
//! - CHECK passes, and fails (code 105) once a rule is removed; DEL succeeds;
//! - with the agent stopped, ADD of a meshed pod fails with code 11.
//!
//! Build the other binaries first (CI=true turns the skip without root into a failure):
//!
//! ```sh
//! cargo build -p weft-cni-agent -p weft-injector && cargo test -p weft-cni --test mesh_redirect
//! ```
#![allow(clippy::unwrap_used)]

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use serde_json::{json, Value};
use weft_cni::mesh::POD_ANNOTATIONS_CAPABILITY;
use weft_netns_testing::{
    cni_env, exec_cni, require_root_and_cni_plugins, unique, Cluster, ClusterSpec, Netns, TcpEcho,
};
use weft_redirect::{Backend, RedirectConfig, ANNOTATION};

const PLUGIN: &str = env!("CARGO_BIN_EXE_weft-cni");

/// A workspace binary built by `cargo build -p <package>` (target/<profile>/<name>).
fn workspace_bin(name: &str, package: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let profile = exe.parent().and_then(Path::parent).unwrap();
    let p = profile.join(name);
    assert!(
        p.exists(),
        "{} is missing: run `cargo build -p {package}` before this test",
        p.display()
    );
    p
}

/// What the injector would have written: the proxy's defaults, the admin port and one more
/// inbound port skipped, Postgres and the metadata service skipped outbound.
fn redirect() -> RedirectConfig {
    RedirectConfig {
        skip_inbound_ports: "4191,22".parse().unwrap(),
        skip_outbound_ports: "5432".parse().unwrap(),
        skip_outbound_cidrs: "169.254.169.254/32".parse().unwrap(),
        backend: Backend::Nft,
        ..Default::default()
    }
}

/// The conflist fields a runtime adds: the declared capability and, at call time, the pod's
/// annotations.
fn runtime(annotations: Value) -> Value {
    json!({
        "capabilities": {POD_ANNOTATIONS_CAPABILITY: true},
        "runtimeConfig": {POD_ANNOTATIONS_CAPABILITY: annotations},
    })
}

fn meshed_annotations() -> Value {
    json!({
        ANNOTATION: redirect().to_annotation(),
        "weft.dev/proxy-version": "0.1.0",
        "kubernetes.io/config.seen": "2026-12-05T22:00:00Z",
    })
}

fn manifests(node_yaml: &str) -> String {
    let value = redirect().to_annotation();
    format!(
        r#"apiVersion: v1
kind: Namespace
metadata: {{name: mesh}}
---
apiVersion: v1
kind: Pod
metadata:
  name: meshed
  namespace: mesh
  annotations:
    weft.dev/proxy-version: "0.1.0"
    {ANNOTATION}: '{value}'
spec:
  containers:
  - {{name: app, image: x}}
  - {{name: weft-proxy, image: weft-proxy, ports: [{{containerPort: 4143}}]}}
---
apiVersion: v1
kind: Pod
metadata: {{name: plain, namespace: mesh}}
spec: {{containers: [{{name: app, image: x}}]}}
---
{node_yaml}"#
    )
}

/// `<family>-nft-save -t nat` in `ns`, without the lines that differ between any two saves
/// (comments with times and versions) and with the packet counters zeroed.
fn nat_table(ns: &Netns, program: &str) -> Result<String> {
    let out = ns
        .command(program)?
        .args(["-t", "nat"])
        .output()
        .with_context(|| format!("running {program}"))?;
    ensure!(
        out.status.success(),
        "{program}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| match l.split_once(" [") {
            Some((head, _)) if l.starts_with(':') => format!("{head} [0:0]\n"),
            _ => format!("{l}\n"),
        })
        .collect())
}

fn tables(ns: &Netns) -> Result<String> {
    Ok(format!(
        "{}{}",
        nat_table(ns, "iptables-nft-save")?,
        nat_table(ns, "ip6tables-nft-save")?
    ))
}

fn run_weft_init(ns: &Netns, weft_init: &Path) -> Result<()> {
    let out = ns
        .command(weft_init)?
        .args(redirect().to_args())
        .env_remove("WEFT_INIT_LOG")
        .output()?;
    ensure!(
        out.status.success(),
        "weft-init in {}: {}",
        ns.name,
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// The original destination of an accepted, redirected IPv4 connection.
fn original_dst(conn: &TcpStream) -> Result<SocketAddrV4> {
    // SAFETY: getsockopt writes at most `len` bytes into the zeroed sockaddr_in we own.
    let mut addr: libc::sockaddr_in = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    const SO_ORIGINAL_DST: libc::c_int = 80;
    let rc = unsafe {
        libc::getsockopt(
            conn.as_raw_fd(),
            libc::SOL_IP,
            SO_ORIGINAL_DST,
            (&mut addr as *mut libc::sockaddr_in).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        bail!("SO_ORIGINAL_DST: {}", std::io::Error::last_os_error());
    }
    Ok(SocketAddrV4::new(
        Ipv4Addr::from(u32::from_be(addr.sin_addr.s_addr)),
        u16::from_be(addr.sin_port),
    ))
}

/// Connects from inside `ns` to `to`, sends a line and returns what came back.
fn exchange(ns: &Netns, to: SocketAddr) -> Result<String> {
    ns.run(|| -> Result<String> {
        let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(2))
            .with_context(|| format!("connecting to {to}"))?;
        s.set_read_timeout(Some(Duration::from_secs(2)))?;
        s.write_all(b"ping\n")?;
        let mut buf = [0u8; 128];
        let n = s.read(&mut buf)?;
        Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
    })?
}

/// CHECK of `pod` with `prev` as prevResult; the plugin's stdout and whether it succeeded.
fn check(
    node: &weft_netns_testing::ClusterNode,
    pod: &weft_netns_testing::ClusterPod,
    extra: &Value,
) -> Result<(bool, String)> {
    let mut conf = node.cni_conf(Some(extra));
    conf["prevResult"] = pod.result.clone();
    let out = exec_cni(
        &node.ns,
        PLUGIN,
        cni_env(
            "CHECK",
            &pod.container_id,
            &pod.ns.path(),
            (&pod.namespace, &pod.name),
        ),
        &serde_json::to_vec(&conf)?,
        Stdio::inherit(),
    )?;
    Ok((
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    ))
}

#[test]
fn the_cni_installs_weft_inits_redirect_for_meshed_pods_only() -> Result<()> {
    if !require_root_and_cni_plugins(
        "the_cni_installs_weft_inits_redirect_for_meshed_pods_only",
        "network namespaces, eBPF, iptables",
    ) {
        return Ok(());
    }
    let agent_bin = workspace_bin("weft-cni-agent", "weft-cni-agent");
    let weft_init = workspace_bin("weft-init", "weft-injector");
    let cluster = Cluster::new(ClusterSpec {
        nodes: 1,
        ..ClusterSpec::two_nodes("wmr")
    })?;
    let node = &cluster.nodes[0];
    let dir = tempfile::tempdir()?;
    std::fs::write(dir.path().join("pods.yaml"), manifests(&node.node_yaml()))?;
    let mut agent = node.spawn_agent(&agent_bin, dir.path(), &[])?;

    let meshed_extra = runtime(meshed_annotations());
    let plain_extra = runtime(json!({"kubernetes.io/config.seen": "2026-12-05T22:00:00Z"}));
    let meshed = node.add_pod(Path::new(PLUGIN), ("mesh", "meshed"), Some(&meshed_extra))?;
    let plain = node.add_pod(Path::new(PLUGIN), ("mesh", "plain"), Some(&plain_extra))?;

    // 1. The same table weft-init leaves, for the same configuration.
    let reference = Netns::named(unique("wmr", "ref"))?;
    run_weft_init(&reference, &weft_init)?;
    let by_cni = tables(&meshed.ns)?;
    let by_init = tables(&reference)?;
    assert!(by_cni.contains("-j WEFT_OUTBOUND"), "{by_cni}");
    assert_eq!(
        by_cni, by_init,
        "the CNI's nat tables differ from weft-init's"
    );
    run_weft_init(&meshed.ns, &weft_init)?;
    assert_eq!(
        tables(&meshed.ns)?,
        by_cni,
        "weft-init after the CNI changed the table"
    );

    // 2. Redirected: a connection to the node's echo server lands on the outbound port.
    let echo = TcpEcho::start(&node.ns.name, "0.0.0.0:0".parse()?)?;
    let outside = SocketAddr::from((node.underlay_v4, echo.port()));
    let listener = meshed
        .ns
        .run(|| TcpListener::bind(("0.0.0.0", redirect().outbound_port)))??;
    let accepted = std::thread::spawn(move || -> Result<SocketAddrV4> {
        let (mut conn, _) = listener.accept()?;
        let dst = original_dst(&conn)?;
        let mut buf = [0u8; 16];
        let _ = conn.read(&mut buf)?;
        conn.write_all(b"proxy\n")?;
        Ok(dst)
    });
    assert_eq!(exchange(&meshed.ns, outside)?, "proxy\n");
    let dst = accepted.join().unwrap()?;
    assert_eq!(SocketAddr::V4(dst), outside, "original destination");

    // A skipped port is not redirected: the node answers itself (nothing listens: refused).
    let skipped = SocketAddr::from((node.underlay_v4, 5432));
    let err = exchange(&meshed.ns, skipped).unwrap_err();
    assert!(
        format!("{err:#}").contains("refused"),
        "port 5432 should reach the node and be refused: {err:#}"
    );

    // 3. Not meshed: untouched, the real server answers.
    let plain_tables = tables(&plain.ns)?;
    assert!(!plain_tables.contains("WEFT"), "{plain_tables}");
    assert_eq!(exchange(&plain.ns, outside)?, "ping\n");

    // 4. CHECK: passes, then fails once the uid rule is gone; DEL succeeds.
    let (ok, out) = check(node, &meshed, &meshed_extra)?;
    assert!(ok, "CHECK: {out}");
    let (ok, out) = check(node, &plain, &plain_extra)?;
    assert!(ok, "CHECK of the plain pod: {out}");
    let del = meshed
        .ns
        .command("iptables-nft")?
        .args([
            "-t",
            "nat",
            "-D",
            "WEFT_OUTBOUND",
            "-m",
            "owner",
            "--uid-owner",
            "2102",
            "-j",
            "RETURN",
        ])
        .output()?;
    ensure!(
        del.status.success(),
        "{}",
        String::from_utf8_lossy(&del.stderr)
    );
    let (ok, out) = check(node, &meshed, &meshed_extra)?;
    assert!(!ok, "CHECK passed without the proxy's uid rule");
    let err: Value = serde_json::from_str(&out)?;
    assert_eq!(err["code"], 105, "{out}");
    assert!(out.contains("uid-owner"), "{out}");
    node.del_pod(Path::new(PLUGIN), &meshed)?;
    node.del_pod(Path::new(PLUGIN), &plain)?;

    // 5. The agent down: a meshed pod is not wired (no pod without its redirect).
    agent.stop();
    let err = node
        .add_pod(Path::new(PLUGIN), ("mesh", "meshed"), Some(&meshed_extra))
        .err()
        .context("ADD succeeded with the agent stopped")?;
    let text = format!("{err:#}");
    assert!(
        text.contains("\"code\":11") && text.contains("not reachable"),
        "{text}"
    );
    Ok(())
}

/// Chained after `ptp` (weft-cni creates no interface, so the runtime may repeat the ADD on
/// the same namespace): the redirect goes in, a retried ADD leaves the very same table, and
/// that table is weft-init's.
#[test]
fn chained_mode_installs_it_too_and_a_retried_add_changes_nothing() -> Result<()> {
    if !require_root_and_cni_plugins(
        "chained_mode_installs_it_too_and_a_retried_add_changes_nothing",
        "network namespaces, eBPF, iptables",
    ) {
        return Ok(());
    }
    let agent_bin = workspace_bin("weft-cni-agent", "weft-cni-agent");
    let weft_init = workspace_bin("weft-init", "weft-injector");
    let cluster = Cluster::new(ClusterSpec {
        nodes: 1,
        ..ClusterSpec::two_nodes("wmr")
    })?;
    let node = &cluster.nodes[0];
    let dir = tempfile::tempdir()?;
    std::fs::write(dir.path().join("pods.yaml"), manifests(&node.node_yaml()))?;
    let _agent = node.spawn_agent(&agent_bin, dir.path(), &[])?;

    // Debian's ptp speaks up to 1.0.0: the whole list is 1.0.0.
    let ptp = json!({
        "cniVersion": "1.0.0", "name": "ptpnet", "type": "ptp",
        "ipam": {"type": "host-local", "dataDir": node.dir.join("ptp-ipam"),
                 "ranges": [[{"subnet": "10.78.0.0/24"}]]},
    });
    let pod = Netns::named(unique("wmr", "chained"))?;
    let cid = format!("c-{}", pod.name);
    let key = ("mesh", "meshed");
    let run = |plugin: &Path, conf: &Value| -> Result<String> {
        let out = exec_cni(
            &node.ns,
            plugin,
            cni_env("ADD", &cid, &pod.path(), key),
            &serde_json::to_vec(conf)?,
            Stdio::inherit(),
        )?;
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        ensure!(out.status.success(), "ADD with {conf}: {stdout}");
        Ok(stdout)
    };
    let prev: Value = serde_json::from_str(&run(
        &Path::new(weft_netns_testing::CNI_BIN_DIR).join("ptp"),
        &ptp,
    )?)?;
    let mut weft = runtime(meshed_annotations());
    weft["cniVersion"] = json!("1.0.0");
    weft["name"] = json!("ptpnet");
    weft["type"] = json!("weft-cni");
    weft["agentSocket"] = json!(node.socket());
    weft["prevResult"] = prev;
    run(Path::new(PLUGIN), &weft)?;
    let once = tables(&pod)?;
    run(Path::new(PLUGIN), &weft)?;
    assert_eq!(tables(&pod)?, once, "a repeated ADD changed the nat tables");

    let reference = Netns::named(unique("wmr", "chref"))?;
    run_weft_init(&reference, &weft_init)?;
    assert_eq!(
        once,
        tables(&reference)?,
        "chained: the CNI's tables differ from weft-init's"
    );
    Ok(())
}

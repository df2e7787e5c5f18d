//! `weft-bench cluster-ip` (root): issue 14's Services figure: new connections per second
//! from a pod to a ClusterIP with 1,000 Services loaded, through Weft's eBPF datapath against
//! the iptables DNAT rules kube-proxy would install for the same Services, in the same run.
//!
//! ```text
//! ebpf node ns:     client ──veth══ from_pod/to_pod (tcx) ══veth── backend-0, backend-1
//!                   weft_lb_svc: 1,000 frontends × 2 backends; no iptables rules
//! iptables node ns: client ──veth── nat PREROUTING → KUBE-SERVICES (1,000 rules) →
//!                   KUBE-SVC-n (statistic random 1/2) → KUBE-SEP-n-k (DNAT) ──veth── backends
//! ```
//!
//! Both node namespaces exist side by side with the same addresses. The measured Service is
//! the 500th of 1,000 in KUBE-SERVICES (kube-proxy matches that chain linearly, so a
//! Service's cost grows with its position: the middle is the average one). A connection is
//! connect → the backend's one byte → close with RST (SO_LINGER 0, so no TIME_WAIT exhausts
//! the client's ports); `--concurrency` loops run in the client pod. Rounds alternate which
//! variant goes first; the ratio is per round.

use std::io::Read;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context as _, Result};
use clap::Args;
use weft_datapath::{Datapath, EndpointFlags, Frontend, PolicyMaps, Service, ServiceMaps, L4};
use weft_netns_testing::{in_ns, ip, router, unique, wire_pod, Netns, PodLink};

use crate::cli::parse_duration;

#[derive(Debug, Clone, Args)]
pub struct ClusterIpArgs {
    /// Services loaded (each with two backends); the measured one is in the middle.
    #[arg(long, default_value_t = 1000)]
    pub services: usize,
    /// Rounds of both variants.
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// Measured window per variant and round.
    #[arg(long, value_parser = parse_duration, default_value = "5s")]
    pub duration: Duration,
    /// Warm-up before each window.
    #[arg(long, value_parser = parse_duration, default_value = "1s")]
    pub warmup: Duration,
    /// Concurrent connect-read-close loops in the client pod.
    #[arg(long, default_value_t = 4)]
    pub concurrency: usize,
}

const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 201, 0, 10);
const BACKENDS: [Ipv4Addr; 2] = [Ipv4Addr::new(10, 201, 0, 11), Ipv4Addr::new(10, 201, 0, 12)];
const BACKEND_PORT: u16 = 8080;
const SERVICE_PORT: u16 = 80;

/// The ClusterIP of Service `i`: 10.96.x.y.
fn vip(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 96, (i / 250) as u8, (i % 250 + 1) as u8)
}

/// The backends of Service `i`: the measured one gets the real pods, the others addresses
/// that answer nothing (they are never connected to).
fn backends(i: usize, measured: usize) -> [SocketAddr; 2] {
    if i == measured {
        return BACKENDS.map(|b| SocketAddr::new(IpAddr::V4(b), BACKEND_PORT));
    }
    [0, 1].map(|k| {
        let n = i * 2 + k;
        SocketAddr::new(
            IpAddr::V4(Ipv4Addr::new(10, 202, (n / 250) as u8, (n % 250 + 1) as u8)),
            BACKEND_PORT,
        )
    })
}

/// How a world translates ClusterIPs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Variant {
    /// Weft's datapath on every veth, the Services in `weft_lb_svc`, no iptables rules.
    Ebpf,
    /// Weft's datapath on every veth (NetworkPolicy, nothing isolated) and kube-proxy's
    /// iptables rules for the Services: a Weft node that kept kube-proxy.
    WeftIptables,
    /// kube-proxy's iptables rules and no eBPF at all.
    Iptables,
}

impl Variant {
    fn name(self) -> &'static str {
        match self {
            Variant::Ebpf => "ebpf",
            Variant::WeftIptables => "weft+iptables",
            Variant::Iptables => "iptables",
        }
    }
}

/// One node namespace with a client pod and two backend pods; removed on drop.
struct World {
    variant: Variant,
    _node: Netns,
    client: Netns,
    _backends: Vec<Netns>,
    pin_dir: Option<PathBuf>,
    stop: Arc<AtomicBool>,
}

impl Drop for World {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(p) = &self.pin_dir {
            if let Err(e) = weft_datapath::unpin_all(p) {
                eprintln!("cleaning up {}: {e}", p.display());
            }
        }
    }
}

fn build(variant: Variant, args: &ClusterIpArgs) -> Result<World> {
    let name = match variant {
        Variant::Ebpf => "ebpf",
        Variant::WeftIptables => "weftipt",
        Variant::Iptables => "ipt",
    };
    let node = Netns::named(unique("wsvb", name))?;
    router(&node.name)?;
    let client = Netns::named(unique("wsvb", &format!("{name}-c")))?;
    let mut pods = vec![(client.name.clone(), "h0".to_string(), CLIENT)];
    let mut backend_ns = Vec::new();
    for (i, b) in BACKENDS.iter().enumerate() {
        let ns = Netns::named(unique("wsvb", &format!("{name}-b{i}")))?;
        pods.push((ns.name.clone(), format!("h{}", i + 1), *b));
        backend_ns.push(ns);
    }
    for (pod, host_if, v4) in &pods {
        wire_pod(&PodLink {
            node: &node.name,
            pod,
            host_if,
            v4: *v4,
            v6: None,
            src_v4: None,
            src_v6: None,
        })?;
    }
    let stop = Arc::new(AtomicBool::new(false));
    for ns in &backend_ns {
        serve(ns, stop.clone())?;
    }
    let measured = args.services / 2;
    let mut pin_dir = None;
    if variant != Variant::Iptables {
        let dir = PathBuf::from("/sys/fs/bpf").join(unique("wsvb", "pins"));
        let mut dp = Datapath::open(&dir)?;
        pin_dir = Some(dir);
        if variant == Variant::Ebpf {
            let services: Vec<Service> = (0..args.services)
                .map(|i| Service {
                    id: i as u32 + 1,
                    frontend: Frontend {
                        addr: IpAddr::V4(vip(i)),
                        port: SERVICE_PORT,
                        proto: L4::Tcp,
                    },
                    backends: backends(i, measured).to_vec(),
                    affinity_timeout_s: None,
                    node_port: false,
                    remote: Vec::new(),
                })
                .collect();
            dp.replace_services(&services)?;
        }
        let node_name = node.name.clone();
        let pods = pods.clone();
        in_ns(&node_name, move || -> Result<()> {
            for (i, (_, host_if, _)) in pods.iter().enumerate() {
                let ifindex =
                    weft_datapath::if_index(host_if).with_context(|| format!("no {host_if}"))?;
                dp.set_endpoint(ifindex, i as u32 + 1, EndpointFlags::NONE)?;
                dp.attach(ifindex)?;
            }
            Ok(())
        })??;
    }
    if variant != Variant::Ebpf {
        let rules = kube_proxy_rules(args.services, measured);
        let mut child = Command::new("ip")
            .args(["netns", "exec", &node.name, "iptables-restore"])
            .stdin(Stdio::piped())
            .spawn()
            .context("iptables-restore")?;
        std::io::Write::write_all(
            &mut child.stdin.take().context("iptables-restore stdin")?,
            rules.as_bytes(),
        )?;
        ensure!(child.wait()?.success(), "iptables-restore failed");
        let n = ip(&["netns", "exec", &node.name, "iptables", "-t", "nat", "-S"])?
            .lines()
            .count();
        eprintln!(
            "{}: {n} nat rules and chains for {} Services",
            variant.name(),
            args.services
        );
    }
    Ok(World {
        variant,
        _node: node,
        client,
        _backends: backend_ns,
        pin_dir,
        stop,
    })
}

/// What kube-proxy's iptables mode installs for `n` ClusterIP Services of two endpoints
/// each (nat table: KUBE-SERVICES → KUBE-SVC-* with statistic random → KUBE-SEP-* DNAT, the
/// hairpin mark), in iptables-restore form.
fn kube_proxy_rules(n: usize, measured: usize) -> String {
    let mut chains = String::from(
        "*nat\n:PREROUTING ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:POSTROUTING ACCEPT [0:0]\n\
         :KUBE-SERVICES - [0:0]\n:KUBE-MARK-MASQ - [0:0]\n:KUBE-POSTROUTING - [0:0]\n",
    );
    let mut rules = String::from(
        "-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
         -A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
         -A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING\n\
         -A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000\n\
         -A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN\n\
         -A KUBE-POSTROUTING -j MARK --set-xmark 0x4000/0x0\n\
         -A KUBE-POSTROUTING -j MASQUERADE\n",
    );
    for i in 0..n {
        let svc = format!("KUBE-SVC-{i:016X}");
        chains.push_str(&format!(":{svc} - [0:0]\n"));
        rules.push_str(&format!(
            "-A KUBE-SERVICES -d {}/32 -p tcp -m comment --comment \"bench/svc-{i}:http cluster \
             IP\" -m tcp --dport {SERVICE_PORT} -j {svc}\n",
            vip(i)
        ));
        let bs = backends(i, measured);
        for (k, b) in bs.iter().enumerate() {
            let sep = format!("KUBE-SEP-{i:014X}{k:02X}");
            chains.push_str(&format!(":{sep} - [0:0]\n"));
            if k + 1 < bs.len() {
                rules.push_str(&format!(
                    "-A {svc} -m comment --comment \"bench/svc-{i}:http -> {b}\" -m statistic \
                     --mode random --probability {:.11} -j {sep}\n",
                    1.0 / (bs.len() - k) as f64
                ));
            } else {
                rules.push_str(&format!(
                    "-A {svc} -m comment --comment \"bench/svc-{i}:http -> {b}\" -j {sep}\n"
                ));
            }
            rules.push_str(&format!(
                "-A {sep} -s {}/32 -m comment --comment \"bench/svc-{i}:http\" -j KUBE-MARK-MASQ\n\
                 -A {sep} -p tcp -m comment --comment \"bench/svc-{i}:http\" -m tcp -j DNAT \
                 --to-destination {b}\n",
                b.ip()
            ));
        }
    }
    format!("{chains}{rules}COMMIT\n")
}

/// Backend: every connection gets one byte; the client then resets it.
fn serve(ns: &Netns, stop: Arc<AtomicBool>) -> Result<()> {
    let listener = ns.run(|| {
        TcpListener::bind(SocketAddr::new(
            IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            BACKEND_PORT,
        ))
    })??;
    for _ in 0..4 {
        let l = listener.try_clone()?;
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 16];
            for s in l.incoming() {
                if stop.load(Ordering::Relaxed) {
                    return;
                }
                let Ok(mut s) = s else { continue };
                if std::io::Write::write_all(&mut s, b"x").is_ok() {
                    let _ = s.read(&mut buf);
                }
            }
        });
    }
    Ok(())
}

/// Closes with RST: no TIME_WAIT on either side.
fn reset(s: &TcpStream) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: a valid socket and a correctly sized option value.
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
}

/// New connections per second to `to` from the client pod over `duration` (after `warmup`),
/// and the failures seen.
fn window(w: &World, to: SocketAddr, args: &ClusterIpArgs) -> Result<(f64, u64)> {
    let done = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let counting = Arc::new(AtomicBool::new(false));
    let end = Instant::now() + args.warmup + args.duration;
    let mut threads = Vec::new();
    for _ in 0..args.concurrency {
        let (done, failed, counting) = (done.clone(), failed.clone(), counting.clone());
        let ns = w.client.name.clone();
        threads.push(std::thread::spawn(move || {
            in_ns(&ns, || {
                let mut b = [0u8; 1];
                while Instant::now() < end {
                    let ok = match TcpStream::connect_timeout(&to, Duration::from_secs(1)) {
                        Ok(mut s) => {
                            let ok = s.read_exact(&mut b).is_ok();
                            reset(&s);
                            ok
                        }
                        Err(_) => false,
                    };
                    if counting.load(Ordering::Relaxed) {
                        if ok {
                            done.fetch_add(1, Ordering::Relaxed);
                        } else {
                            failed.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            })
        }));
    }
    std::thread::sleep(args.warmup);
    counting.store(true, Ordering::Relaxed);
    let start = Instant::now();
    for t in threads {
        if t.join().is_err() {
            bail!("a client loop of {} panicked", w.variant.name());
        }
    }
    let secs = start.elapsed().as_secs_f64();
    Ok((
        done.load(Ordering::Relaxed) as f64 / secs,
        failed.load(Ordering::Relaxed),
    ))
}

/// The median (the mean of the middle two for an even count); 0 for none.
fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

pub fn execute(args: ClusterIpArgs) -> Result<()> {
    ensure!(
        (1..=60_000).contains(&args.services),
        "--services must be 1..=60000"
    );
    weft_netns_testing::remove_stale("wsvb", std::path::Path::new("/sys/fs/bpf"), "wsvb-", |p| {
        let _ = weft_datapath::unpin_all(p);
    });
    let measured = args.services / 2;
    let to = SocketAddr::new(IpAddr::V4(vip(measured)), SERVICE_PORT);
    let mut worlds = Vec::new();
    for v in [Variant::Ebpf, Variant::WeftIptables, Variant::Iptables] {
        let t = Instant::now();
        worlds.push(build(v, &args)?);
        eprintln!(
            "{} world with {} Services in {:?}",
            v.name(),
            args.services,
            t.elapsed()
        );
    }

    // Per round: conn/s of each variant, in the order of `worlds`.
    let mut rows: Vec<[f64; 3]> = Vec::new();
    for round in 0..args.rounds {
        let mut order: Vec<usize> = vec![0, 1, 2];
        order.rotate_left(round % 3);
        if round % 2 == 1 {
            order.reverse();
        }
        let mut rates = [0.0; 3];
        for i in order {
            let w = &worlds[i];
            let (rate, failed) = window(w, to, &args)?;
            eprintln!(
                "round {}: {}: {rate:.0} conn/s ({failed} failed)",
                round + 1,
                w.variant.name()
            );
            ensure!(
                (failed as f64) <= rate * 0.001,
                "{}: {failed} connections failed",
                w.variant.name()
            );
            rates[i] = rate;
        }
        rows.push(rates);
    }
    let med = |k: usize| median(rows.iter().map(|r| r[k]).collect());
    println!(
        "| round | eBPF Services (conn/s) | Weft datapath + iptables DNAT (conn/s) | iptables \
         DNAT, no eBPF (conn/s) | eBPF / Weft+iptables | eBPF / iptables |\n\
         |---|---:|---:|---:|---:|---:|"
    );
    for (i, r) in rows.iter().enumerate() {
        println!(
            "| {} | {:.0} | {:.0} | {:.0} | {:.2} | {:.2} |",
            i + 1,
            r[0],
            r[1],
            r[2],
            r[0] / r[1],
            r[0] / r[2]
        );
    }
    println!(
        "| median | {:.0} | {:.0} | {:.0} | {:.2} | {:.2} |",
        med(0),
        med(1),
        med(2),
        median(rows.iter().map(|r| r[0] / r[1]).collect()),
        median(rows.iter().map(|r| r[0] / r[2]).collect())
    );
    Ok(())
}

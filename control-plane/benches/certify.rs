//! Certificate issuance benchmark (issue 11): how many certificates one
//! core of the controller issues per second, which sizes the controller-wide
//! ceiling (`--certify-max-rate`, `--certify-max-burst`; see
//! `src/identity/rate.rs`).
//!
//! Each scenario runs on one thread (one core) over pre-made inputs: 1,000
//! distinct ECDSA P-256 CSRs for `spiffe://cluster.local/ns/books/sa/web`
//! and 1,000 pod-bound local tokens, used round-robin. Rate limits are set
//! out of the way so every call issues.
//!
//! - `sign`: the CA alone (`CertificateAuthority::issue`: build the leaf,
//!   sign it with the ECDSA P-256 issuer key). The baseline.
//! - `csr-parse`: `csr::parse` alone (DER, self-signature check, SANs).
//! - `token-verify`: `LocalTokens::verify` alone (HMAC-SHA256, JSON).
//! - `certify`: the whole `Identity.Certify` handler in-process (request
//!   checks and CSR parse, token verify, authorize, rate key and both
//!   limits, sign, metrics), called directly on a current-thread runtime.
//! - `certify-grpc`: the same over loopback gRPC: the server alone on one
//!   current-thread runtime (one core), a client on another thread keeping
//!   64 calls in flight over 4 HTTP/2 connections.
//!
//! Run: `cargo bench -p weft-controller --bench certify -- [--seconds 3]
//! [--rounds 5]`. Each scenario reports the median of its rounds. Results
//! are recorded in benches/RESULTS.md, "Certificate issuance (issue 11)".

#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use clap::Parser;
use rcgen::{CertificateParams, DistinguishedName, KeyPair, SanType};
use weft_controller::grpc::identity::IdentityParts;
use weft_controller::grpc::IdentityService;
use weft_controller::identity::ca::{CertificateAuthority, FileCa, IssuerFiles, LeafRequest};
use weft_controller::identity::rate::{CeilingConfig, RateConfig};
use weft_controller::identity::token::{LocalTokens, PodBinding, TokenVerifier};
use weft_controller::identity::{csr, devca, ServiceAccount, SpiffeId};
use weft_controller::metrics::Metrics;
use weft_proto::identity::identity_client::IdentityClient;
use weft_proto::identity::identity_server::{Identity, IdentityServer};
use weft_proto::identity::CertifyRequest;

const ID: &str = "spiffe://cluster.local/ns/books/sa/web";

#[derive(Parser, Debug)]
struct Args {
    /// Seconds per round of each scenario.
    #[arg(long, default_value_t = 3.0)]
    seconds: f64,
    /// Rounds per scenario (the median is reported).
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Distinct CSRs and tokens, used round-robin.
    #[arg(long, default_value_t = 1000)]
    inputs: usize,
    /// Only these scenarios (comma-separated); all by default.
    #[arg(long)]
    only: Option<String>,
    /// Accepted and ignored (cargo bench passes it).
    #[arg(long, hide = true)]
    bench: bool,
}

struct Inputs {
    ca: Arc<FileCa>,
    tokens: LocalTokens,
    csrs: Vec<Vec<u8>>,
    token_strings: Vec<String>,
    identity: SpiffeId,
}

fn inputs(n: usize, dir: &std::path::Path) -> Inputs {
    devca::ensure(dir).unwrap();
    let ca = Arc::new(FileCa::load(IssuerFiles::in_dir(dir)).unwrap());
    let tokens = LocalTokens::load(&dir.join(devca::TOKEN_KEY)).unwrap();
    let sa = ServiceAccount::new("books", "web");
    let csrs = (0..n)
        .map(|_| {
            let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
            let mut params = CertificateParams::default();
            params.distinguished_name = DistinguishedName::new();
            params.subject_alt_names = vec![SanType::URI(ID.try_into().unwrap())];
            params.serialize_request(&key).unwrap().der().to_vec()
        })
        .collect();
    let token_strings = (0..n)
        .map(|i| {
            let pod = PodBinding::new(format!("web-{i}"), Some(format!("uid-{i}"))).unwrap();
            tokens.mint_for_pod(&sa, &pod, Duration::from_secs(3600))
        })
        .collect();
    Inputs {
        ca,
        tokens,
        csrs,
        token_strings,
        identity: SpiffeId::parse(ID).unwrap(),
    }
}

fn service(inp: &Inputs) -> IdentityService {
    IdentityService::new(
        IdentityParts {
            reserved: Vec::new(),
            trust_domain: "cluster.local".into(),
            ca: inp.ca.clone(),
            tokens: Arc::new(inp.tokens.clone()),
            cert_lifetime: Duration::from_secs(24 * 3600),
            // Out of the way: this measures issuance, not refusals.
            rate: RateConfig {
                burst: u32::MAX,
                refill: Duration::ZERO,
            },
            ceiling: CeilingConfig {
                rate: 1e12,
                burst: u32::MAX,
            },
        },
        Metrics::new(),
    )
}

fn request(inp: &Inputs, i: usize) -> CertifyRequest {
    let k = i % inp.csrs.len();
    CertifyRequest {
        identity: ID.into(),
        token: inp.token_strings[k].as_bytes().to_vec(),
        certificate_signing_request: inp.csrs[k].clone(),
    }
}

/// Runs `op` on this thread for `secs`; operations per second.
fn run_sync(secs: f64, mut op: impl FnMut(usize)) -> f64 {
    let start = Instant::now();
    let until = start + Duration::from_secs_f64(secs);
    let mut n = 0;
    while Instant::now() < until {
        for _ in 0..16 {
            op(n);
            n += 1;
        }
    }
    n as f64 / start.elapsed().as_secs_f64()
}

fn sign(inp: &Inputs, secs: f64) -> f64 {
    let spkis: Vec<Vec<u8>> = inp
        .csrs
        .iter()
        .map(|c| csr::parse(c).unwrap().spki_der)
        .collect();
    run_sync(secs, |i| {
        let issued = inp
            .ca
            .issue(&LeafRequest {
                identity: &inp.identity,
                spki_der: &spkis[i % spkis.len()],
                lifetime: Duration::from_secs(24 * 3600),
                now: SystemTime::now(),
            })
            .unwrap();
        std::hint::black_box(issued);
    })
}

fn csr_parse(inp: &Inputs, secs: f64) -> f64 {
    run_sync(secs, |i| {
        std::hint::black_box(csr::parse(&inp.csrs[i % inp.csrs.len()]).unwrap());
    })
}

fn token_verify(inp: &Inputs, secs: f64) -> f64 {
    let rt = current_thread();
    rt.block_on(async {
        let start = Instant::now();
        let until = start + Duration::from_secs_f64(secs);
        let mut n = 0usize;
        while Instant::now() < until {
            let t = &inp.token_strings[n % inp.token_strings.len()];
            std::hint::black_box(inp.tokens.verify(t.as_bytes()).await.unwrap());
            n += 1;
        }
        n as f64 / start.elapsed().as_secs_f64()
    })
}

fn certify(inp: &Inputs, secs: f64) -> f64 {
    let svc = service(inp);
    let rt = current_thread();
    rt.block_on(async {
        let start = Instant::now();
        let until = start + Duration::from_secs_f64(secs);
        let mut n = 0usize;
        while Instant::now() < until {
            let rsp = svc
                .certify(tonic::Request::new(request(inp, n)))
                .await
                .unwrap();
            std::hint::black_box(rsp);
            n += 1;
        }
        n as f64 / start.elapsed().as_secs_f64()
    })
}

fn certify_grpc(inp: &Arc<Inputs>, secs: f64) -> f64 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    listener.set_nonblocking(true).unwrap();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let svc = service(inp);
    // The server: one thread, one current-thread runtime.
    let server = std::thread::spawn(move || {
        let (cpu0, wall0) = (thread_cpu_seconds(), Instant::now());
        current_thread().block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            let incoming =
                tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
            tonic::transport::Server::builder()
                .add_service(IdentityServer::new(svc))
                .serve_with_incoming_shutdown(incoming, async {
                    let _ = stop_rx.await;
                })
                .await
                .unwrap();
        });
        // Includes connection set-up and the idle wait for the client.
        thread_cpu_seconds()
            .zip(cpu0)
            .map(|(c1, c0)| (c1 - c0) / wall0.elapsed().as_secs_f64())
    });
    let inp = inp.clone();
    let client = std::thread::spawn(move || {
        current_thread().block_on(async move {
            let mut clients = Vec::new();
            for _ in 0..4 {
                clients.push(
                    IdentityClient::connect(format!("http://{addr}"))
                        .await
                        .unwrap(),
                );
            }
            // Warm up the connections.
            for (i, c) in clients.iter_mut().enumerate() {
                c.certify(request(&inp, i)).await.unwrap();
            }
            let start = Instant::now();
            let until = start + Duration::from_secs_f64(secs);
            let done = Arc::new(std::sync::atomic::AtomicUsize::new(0));
            let mut tasks = Vec::new();
            for w in 0..64 {
                let mut c = clients[w % clients.len()].clone();
                let inp = inp.clone();
                let done = done.clone();
                tasks.push(tokio::spawn(async move {
                    let mut i = w;
                    while Instant::now() < until {
                        c.certify(request(&inp, i)).await.unwrap();
                        done.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        i += 64;
                    }
                }));
            }
            for t in tasks {
                t.await.unwrap();
            }
            done.load(std::sync::atomic::Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64()
        })
    });
    let rate = client.join().unwrap();
    let _ = stop_tx.send(());
    if let Some(busy) = server.join().unwrap() {
        eprintln!(
            "certify-grpc: server thread busy {:.0} % of its wall time",
            busy * 100.0
        );
    }
    rate
}

/// CPU time (user + system) of the calling thread, from
/// /proc/thread-self/stat (Linux; `None` elsewhere).
fn thread_cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/thread-self/stat").ok()?;
    // Fields after the parenthesised command name; utime and stime are the
    // 14th and 15th fields of the line, in clock ticks (USER_HZ, 100).
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / 100.0)
}

fn current_thread() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let dir = std::env::temp_dir().join(format!("weft-bench-certify-{}", std::process::id()));
    let made = Instant::now();
    let inp = Arc::new(inputs(args.inputs.max(1), &dir));
    eprintln!(
        "{} CSRs and tokens made in {:.2} s",
        args.inputs,
        made.elapsed().as_secs_f64()
    );
    let wanted = |name: &str| {
        args.only
            .as_deref()
            .is_none_or(|o| o.split(',').any(|s| s.trim() == name))
    };
    type Scenario = (&'static str, Box<dyn Fn(&Arc<Inputs>, f64) -> f64>);
    let scenarios: Vec<Scenario> = vec![
        ("sign", Box::new(|i, s| sign(i, s))),
        ("csr-parse", Box::new(|i, s| csr_parse(i, s))),
        ("token-verify", Box::new(|i, s| token_verify(i, s))),
        ("certify", Box::new(|i, s| certify(i, s))),
        ("certify-grpc", Box::new(certify_grpc)),
    ];
    let mut results = Vec::new();
    for (name, run) in &scenarios {
        if !wanted(name) {
            continue;
        }
        let rounds: Vec<f64> = (0..args.rounds.max(1))
            .map(|_| run(&inp, args.seconds))
            .collect();
        let m = median(rounds.clone());
        eprintln!(
            "{name}: median {m:.0}/s, rounds {:?}",
            rounds.iter().map(|r| r.round()).collect::<Vec<_>>()
        );
        results.push((*name, m));
    }
    let sign_rate = results.iter().find(|(n, _)| *n == "sign").map(|(_, r)| *r);
    println!("| scenario | per second (one core) | µs each | vs sign |");
    println!("|---|---:|---:|---:|");
    for (name, rate) in &results {
        let ratio = sign_rate.map_or("n/a".to_string(), |s| format!("{:.2}×", rate / s));
        println!("| {name} | {rate:.0} | {:.1} | {ratio} |", 1e6 / rate);
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

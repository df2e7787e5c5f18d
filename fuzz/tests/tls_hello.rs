//! The TLS ClientHello / SNI reader (`transport::tls_hello`), seeded with real ClientHellos
//! written by rustls (TLS 1.2 and 1.3, ALPN, no SNI, fragmented records).

use std::sync::Arc;

use proptest::collection::vec;
use proptest::prelude::*;
use rustls::pki_types::ServerName;
use weft_fuzz::{fuzz, mutate};
use weft_proxy::transport::tls_hello::{self, Hello};

struct Seed {
    bytes: Vec<u8>,
    sni: Option<String>,
}

fn rustls_hello(
    server: &str,
    versions: &[&'static rustls::SupportedProtocolVersion],
    alpn: &[&str],
) -> Vec<u8> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)
        .expect("versions")
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
    let name = ServerName::try_from(server.to_string()).expect("server name");
    let mut conn = rustls::ClientConnection::new(Arc::new(config), name).expect("client");
    let mut out = Vec::new();
    while conn.wants_write() {
        conn.write_tls(&mut out).expect("write_tls");
    }
    deterministic(&mut out);
    out
}

/// Overwrites what rustls randomises (client random, session id, key shares) with fixed
/// bytes, so a seed and a replay (`WEFT_FUZZ_SEED`, `WEFT_FUZZ_CASE`) give the same input.
fn deterministic(rec: &mut [u8]) {
    fn u16_at(b: &[u8], i: usize) -> usize {
        usize::from(u16::from_be_bytes([b[i], b[i + 1]]))
    }
    let fill = |b: &mut [u8]| b.iter_mut().enumerate().for_each(|(i, x)| *x = i as u8);
    // record header 5, handshake header 4, version 2
    let mut i = 5 + 4 + 2;
    fill(&mut rec[i..i + 32]);
    i += 32;
    let sid = usize::from(rec[i]);
    fill(&mut rec[i + 1..i + 1 + sid]);
    i += 1 + sid;
    i += 2 + u16_at(rec, i); // cipher suites
    i += 1 + usize::from(rec[i]); // compression
    let end = i + 2 + u16_at(rec, i);
    i += 2;
    // rustls shuffles its extensions: put them in type order.
    let start = i;
    let mut exts: Vec<Vec<u8>> = Vec::new();
    while i + 4 <= end {
        let len = u16_at(rec, i + 2);
        exts.push(rec[i..i + 4 + len].to_vec());
        i += 4 + len;
    }
    exts.sort_by_key(|e| u16_at(e, 0));
    let mut i = start;
    for mut ext in exts {
        if u16_at(&ext, 0) == 0x0033 {
            // key_share: client_shares<2..>: group(2), key_exchange<2..>
            let mut j = 4 + 2;
            while j + 4 <= ext.len() {
                let kl = u16_at(&ext, j + 2);
                fill(&mut ext[j + 4..j + 4 + kl]);
                j += 4 + kl;
            }
        }
        rec[i..i + ext.len()].copy_from_slice(&ext);
        i += ext.len();
    }
}

/// The handshake message of `rec` split into records of at most `size` bytes.
fn fragment(rec: &[u8], size: usize) -> Vec<u8> {
    let mut out = Vec::new();
    for chunk in rec[5..].chunks(size) {
        out.extend_from_slice(&[0x16, 3, 1]);
        out.extend_from_slice(&(chunk.len() as u16).to_be_bytes());
        out.extend_from_slice(chunk);
    }
    out
}

fn seeds() -> Vec<Seed> {
    use rustls::version::{TLS12, TLS13};
    let both = &[&TLS13, &TLS12][..];
    let mut out = vec![
        Seed {
            bytes: rustls_hello("web.ns.svc.cluster.local", both, &["h2", "http/1.1"]),
            sni: Some("web.ns.svc.cluster.local".into()),
        },
        Seed {
            bytes: rustls_hello("API.Example.COM", &[&TLS13], &[]),
            sni: Some("api.example.com".into()),
        },
        Seed {
            bytes: rustls_hello("legacy.internal", &[&TLS12], &["http/1.1"]),
            sni: Some("legacy.internal".into()),
        },
        Seed {
            // An IP address: rustls sends no SNI.
            bytes: rustls_hello("10.0.0.7", both, &["h2"]),
            sni: None,
        },
    ];
    // A ClientHello fragmented over several records: TLS, SNI out of reach.
    out.push(Seed {
        bytes: fragment(&rustls_hello("web.ns", both, &[]), 64),
        sni: None,
    });
    out
}

#[test]
fn seeds_are_the_same_every_run() {
    let a: Vec<Vec<u8>> = seeds().into_iter().map(|s| s.bytes).collect();
    let b: Vec<Vec<u8>> = seeds().into_iter().map(|s| s.bytes).collect();
    assert_eq!(a, b);
}

#[test]
fn rustls_hellos_parse_and_their_prefixes_need_more() {
    for seed in seeds() {
        assert_eq!(
            tls_hello::parse(&seed.bytes),
            Hello::ClientHello {
                sni: seed.sni.clone()
            }
        );
        let first_record = 5 + usize::from(u16::from_be_bytes([seed.bytes[3], seed.bytes[4]]));
        for n in 0..first_record {
            assert_eq!(
                tls_hello::parse(&seed.bytes[..n]),
                Hello::NeedMore,
                "{n} bytes"
            );
        }
    }
}

fn tokens() -> Vec<Vec<u8>> {
    vec![
        vec![0x16, 0x03, 0x01],
        vec![0x00, 0x00], // server_name extension type
        vec![0x00, 0x10], // ALPN
        vec![0x00, 0x2b], // supported_versions
        vec![0xff; 4],
        b"\x00\x00\x0b\x00\x09\x00\x00\x06web.ns".to_vec(),
        b"WEB.NS".to_vec(),
    ]
}

fn inputs() -> impl Strategy<Value = Vec<u8>> {
    let seeds: Vec<Vec<u8>> = seeds().into_iter().map(|s| s.bytes).collect();
    prop_oneof![
        6 => mutate::mutated_bytes(seeds, tokens(), 6),
        1 => vec(any::<u8>(), 0..600).prop_map(|b| [vec![0x16, 3, 1], b].concat()),
    ]
}

#[test]
fn parse_is_total_prefix_stable_and_sni_is_clean() {
    fuzz("tls_hello::parse", inputs(), |input| {
        let full = tls_hello::parse(input);
        if let Hello::ClientHello { sni: Some(s) } = &full {
            if s.is_empty()
                || !s
                    .bytes()
                    .all(|b| b.is_ascii_graphic() && !b.is_ascii_uppercase())
            {
                return Err(format!("SNI {s:?} is not a clean lowercase name"));
            }
        }
        // Decided once, decided for good: the proxy may see any prefix first. Check a few
        // prefixes rather than all (each parse is linear in the record).
        let step = (input.len() / 64).max(1);
        let mut decided: Option<(usize, Hello)> = None;
        for n in (0..=input.len()).step_by(step).chain([input.len()]) {
            let h = tls_hello::parse(&input[..n]);
            match &decided {
                None if h != Hello::NeedMore => decided = Some((n, h)),
                Some((at, d)) if &h != d => {
                    return Err(format!("{at} bytes parse as {d:?}, {n} bytes as {h:?}"))
                }
                _ => {}
            }
        }
        Ok(())
    });
}

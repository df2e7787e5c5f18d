//! Protocol detection (`transport::detect`) and the HTTP/1 first-head pre-check
//! (`http::head`): the first bytes any client sends to a meshed pod.

use std::collections::VecDeque;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::BytesMut;
use proptest::collection::vec;
use proptest::prelude::*;
use tokio::io::{AsyncRead, ReadBuf};
use weft_fuzz::{fuzz, mutate};
use weft_proxy::http::head::{self, HeadError};
use weft_proxy::transport::detect::{self, Detection, Protocol, H2_PREFACE};

fn http_seeds() -> Vec<Vec<u8>> {
    let many_headers: String = (0..99).map(|i| format!("x-h{i}: {i}\r\n")).collect();
    [
        "GET / HTTP/1.1\r\nHost: web.ns.svc.cluster.local\r\n\r\n".to_string(),
        "GET /index.html?q=1&r=%20 HTTP/1.0\r\nUser-Agent: curl/8.5.0\r\nAccept: */*\r\n\r\n".into(),
        "POST /api/v1/items HTTP/1.1\r\nHost: api:8080\r\nContent-Type: application/json\r\nContent-Length: 13\r\n\r\n{\"a\":\"hello\"}".into(),
        "PUT /upload HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n".into(),
        "GET http://web.ns:80/path HTTP/1.1\r\nHost: web.ns:80\r\nProxy-Connection: keep-alive\r\n\r\n".into(),
        "CONNECT web.ns:443 HTTP/1.1\r\nHost: web.ns:443\r\n\r\n".into(),
        "OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n".into(),
        "GET /chat HTTP/1.1\r\nHost: ws\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n".into(),
        "GET / HTTP/1.1\r\nHost: a\r\nX-Folded: one\r\n two\r\n\r\n".into(),
        format!("GET / HTTP/1.1\r\nHost: a\r\n{many_headers}\r\n"),
        format!("GET /{} HTTP/1.1\r\nHost: a\r\n\r\n", "p".repeat(9000)),
        "M-SEARCH * HTTP/1.1\r\nHOST: 239.255.255.250:1900\r\nMAN: \"ssdp:discover\"\r\n\r\n".into(),
        "SSH-2.0-OpenSSH_9.2p1 Debian-2\r\n".into(),
        "*1\r\n$4\r\nPING\r\n".into(),
        "EHLO mail.example.com\r\n".into(),
    ]
    .into_iter()
    .map(String::into_bytes)
    .chain([
        H2_PREFACE.to_vec(),
        [H2_PREFACE, b"\x00\x00\x12\x04\x00\x00\x00\x00\x00\x00\x03\x00\x00\x00\x64"].concat(),
        vec![0x16, 3, 1, 0, 5, 1, 0, 0, 1, 0],
        vec![0x00, 0x00, 0x00, 0x2c, 0x00, 0x00, 0x00, 0x00, 0xd4, 0x07], // Postgres-ish
    ])
    .collect()
}

fn http_tokens() -> Vec<Vec<u8>> {
    [
        "\r\n",
        "\r\n\r\n",
        "\n",
        " ",
        ": ",
        "HTTP/1.1",
        "HTTP/1.0",
        "HTTP/2.0",
        "Host: ",
        "Content-Length: ",
        "Transfer-Encoding: chunked",
        "\0",
        "\t",
        "PRI * HTTP/2.0",
        "\x16\x03\x01",
        "GET ",
        "%00",
        "\x7f",
        "\u{00e9}",
    ]
    .into_iter()
    .map(|s| s.as_bytes().to_vec())
    .collect()
}

fn inputs() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        4 => mutate::mutated_bytes(http_seeds(), http_tokens(), 8),
        1 => vec(any::<u8>(), 0..600),
    ]
}

/// Serves `chunks` one read at a time, then EOF: a client that trickles its bytes in.
struct Chunks(VecDeque<Vec<u8>>);

impl AsyncRead for Chunks {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if let Some(mut c) = self.0.pop_front() {
            let n = c.len().min(buf.remaining());
            buf.put_slice(&c[..n]);
            if n < c.len() {
                self.0.push_front(c.split_off(n));
            }
        }
        Poll::Ready(Ok(()))
    }
}

/// `input` cut at the given points (taken modulo its length).
fn chunked(input: &[u8], cuts: &[usize]) -> Chunks {
    let mut points: Vec<usize> = cuts
        .iter()
        .map(|c| if input.is_empty() { 0 } else { c % input.len() })
        .collect();
    points.push(input.len());
    points.sort_unstable();
    let mut out = VecDeque::new();
    let mut start = 0;
    for p in points {
        if p > start {
            out.push_back(input[start..p].to_vec());
            start = p;
        }
    }
    Chunks(out)
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("runtime")
}

#[test]
fn classify_is_total_and_prefix_stable() {
    fuzz("detect::classify", inputs(), |input| {
        // Once a prefix is decided, more bytes never change the answer: the proxy decides on
        // whatever prefix happened to arrive first.
        // Every prefix of the first 64 bytes, then ~256 evenly spaced (each call is linear).
        let step = (input.len() / 256).max(1);
        let prefixes = (0..64.min(input.len())).chain((64..=input.len()).step_by(step));
        let mut decided: Option<(usize, Protocol)> = None;
        for n in prefixes.chain([input.len()]) {
            let c = detect::classify(&input[..n]);
            match (&decided, c) {
                (None, Some(p)) => decided = Some((n, p)),
                (Some((at, d)), c) if c.as_ref() != Some(d) => {
                    return Err(format!(
                        "{} bytes classify as {d:?} but {n} bytes as {c:?}",
                        at
                    ))
                }
                _ => {}
            }
        }
        Ok(())
    });
}

#[test]
fn detect_over_trickled_reads_agrees_with_classify() {
    let rt = runtime();
    let strategy = (inputs(), vec(any::<usize>(), 0..6));
    fuzz("detect::detect", strategy, |(input, cuts)| {
        let mut io = chunked(input, cuts);
        let mut buf = BytesMut::new();
        let d = rt
            .block_on(detect::detect(&mut io, &mut buf, Duration::from_secs(3600)))
            .map_err(|e| e.to_string())?;
        if !input.starts_with(&buf) {
            return Err("detection consumed bytes it did not keep".into());
        }
        match d {
            Detection::Protocol(p) => {
                // The decision is classify's over what was read, or opaque past a record.
                let c = detect::classify(&buf);
                if c.as_ref() != Some(&p) && p != Protocol::Opaque {
                    return Err(format!("detect said {p:?}, classify of its buffer {c:?}"));
                }
            }
            Detection::Eof => {
                if buf.len() != input.len() {
                    return Err("EOF before the input was read".into());
                }
                if let Some(c) = detect::classify(input) {
                    return Err(format!("EOF although the whole input classifies as {c:?}"));
                }
            }
            Detection::Timeout => return Err("timed out on a reader that never blocks".into()),
        }
        Ok(())
    });
}

fn head_inputs() -> impl Strategy<Value = (Vec<u8>, Vec<usize>)> {
    (
        prop_oneof![
            4 => mutate::mutated_bytes(http_seeds(), http_tokens(), 8),
            1 => vec(any::<u8>(), 0..600).prop_map(|b| [b"GET / HTTP/1.1\r\n".to_vec(), b].concat()),
        ],
        vec(any::<usize>(), 0..6),
    )
}

#[test]
fn head_check_and_read_first_head() {
    let rt = runtime();
    fuzz("http::head", head_inputs(), |(input, cuts)| {
        // Small maxima too, so TooLarge paths run on seed-sized inputs.
        let max = 64 + cuts.first().copied().unwrap_or(0) % 2048;
        let whole = head::check(input, max);
        let mut io = chunked(input, cuts);
        let mut buf = BytesMut::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(3600);
        let read = rt.block_on(head::read_first_head(&mut io, &mut buf, max, deadline));
        if !input.starts_with(&buf) {
            return Err("the head reader kept bytes that were not sent".into());
        }
        match &read {
            Ok(()) => {
                if head::check(&buf, max) != Ok(true) {
                    return Err("read_first_head returned a buffer check() refuses".into());
                }
            }
            Err(HeadError::Closed) => {
                if whole != Ok(false) {
                    return Err(format!("closed early although the input checks {whole:?}"));
                }
            }
            Err(HeadError::Timeout | HeadError::Io(_)) => {
                return Err(format!("{read:?} from a reader that never blocks or fails"))
            }
            Err(e) => {
                // A refusal on a prefix is a refusal of the whole input: the same one, unless
                // one of them is about size (which one is hit first depends on the cut).
                let size = |r: &HeadError| matches!(r, HeadError::TooLarge { .. });
                let same = match &whole {
                    Ok(_) => false,
                    Err(w) => w == e || size(w) || size(e),
                };
                if !same {
                    return Err(format!(
                        "refused a prefix with {e:?}, the whole input {whole:?}"
                    ));
                }
            }
        }
        Ok(())
    });
}

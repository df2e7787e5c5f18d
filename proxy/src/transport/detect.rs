//! Protocol detection by buffered peeking.
//!
//! Bytes read while deciding are kept and replayed to whatever handles the connection
//! ([`super::prefixed::PrefixedIo`]), so detection never consumes. A client that says nothing
//! within the timeout is treated as opaque TCP; ports configured as opaque skip detection so
//! server-speaks-first protocols (SMTP, MySQL) never wait.

use std::io;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt};

use super::tls_hello::{self, Hello};

/// The HTTP/2 client connection preface.
pub const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// Longest HTTP/1 request line we wait for before calling the stream opaque.
const MAX_REQUEST_LINE: usize = 8 * 1024;

/// A detected protocol.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Protocol {
    Http1,
    Http2,
    Tls { sni: Option<String> },
    Opaque,
}

/// The outcome of reading a connection's first bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Detection {
    Protocol(Protocol),
    /// The client sent nothing decisive before the timeout: handled as opaque.
    Timeout,
    /// The client closed before sending anything decisive (`buf` may hold a partial prefix).
    Eof,
}

impl Detection {
    /// Metric label for the outcome.
    pub fn label(&self) -> &'static str {
        match self {
            Detection::Protocol(Protocol::Http1) => "http1",
            Detection::Protocol(Protocol::Http2) => "http2",
            Detection::Protocol(Protocol::Tls { .. }) => "tls",
            Detection::Protocol(Protocol::Opaque) => "opaque",
            Detection::Timeout => "timeout",
            Detection::Eof => "closed",
        }
    }
}

/// Classifies a prefix; `None` means more bytes are needed.
pub fn classify(buf: &[u8]) -> Option<Protocol> {
    if buf.is_empty() {
        return None;
    }
    if buf[0] == 0x16 {
        return match tls_hello::parse(buf) {
            Hello::NeedMore => None,
            Hello::NotTls => Some(Protocol::Opaque),
            Hello::ClientHello { sni } => Some(Protocol::Tls { sni }),
        };
    }
    let n = buf.len().min(H2_PREFACE.len());
    if buf[..n] == H2_PREFACE[..n] {
        return if buf.len() >= H2_PREFACE.len() {
            Some(Protocol::Http2)
        } else {
            None
        };
    }
    classify_http1(buf)
}

fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

fn classify_http1(buf: &[u8]) -> Option<Protocol> {
    let line_end = buf.iter().position(|&b| b == b'\n');
    let line = match line_end {
        // Too long whether or not its end has arrived: the answer must not depend on how the
        // client's bytes were split into reads.
        Some(i) if i >= MAX_REQUEST_LINE => return Some(Protocol::Opaque),
        Some(i) => &buf[..i],
        None if buf.len() >= MAX_REQUEST_LINE => return Some(Protocol::Opaque),
        None => buf,
    };
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let mut parts = line.splitn(3, |&b| b == b' ');
    let method = parts.next().unwrap_or_default();
    if method.is_empty() && line_end.is_none() {
        return None;
    }
    if !method.iter().all(|&b| is_tchar(b)) || method.len() > 32 {
        return Some(Protocol::Opaque);
    }
    let target = parts.next();
    let version = parts.next();
    let printable = |s: &[u8]| s.iter().all(|&b| b.is_ascii_graphic());
    if line_end.is_none() {
        // Incomplete line: keep reading while it still looks like a request line.
        let ok = target.is_none_or(printable)
            && version.is_none_or(|v| b"HTTP/1.1".starts_with(v) || b"HTTP/1.0".starts_with(v));
        return if ok { None } else { Some(Protocol::Opaque) };
    }
    match (method.is_empty(), target, version) {
        (false, Some(t), Some(b"HTTP/1.1" | b"HTTP/1.0")) if !t.is_empty() && printable(t) => {
            Some(Protocol::Http1)
        }
        _ => Some(Protocol::Opaque),
    }
}

/// Reads from `io` into `buf` until the protocol is known, the client closes, or `timeout`.
pub async fn detect<I: AsyncRead + Unpin>(
    io: &mut I,
    buf: &mut BytesMut,
    timeout: Duration,
) -> io::Result<Detection> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(p) = classify(buf) {
            return Ok(Detection::Protocol(p));
        }
        if buf.len() >= tls_hello::MAX_RECORD {
            return Ok(Detection::Protocol(Protocol::Opaque));
        }
        buf.reserve(4096);
        match tokio::time::timeout_at(deadline, io.read_buf(buf)).await {
            Err(_) => return Ok(Detection::Timeout),
            Ok(Ok(0)) => return Ok(Detection::Eof),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn table() {
        let cases: &[(&[u8], Option<Protocol>)] = &[
            (b"", None),
            (b"G", None),
            (b"GET ", None),
            (b"GET /index.html HTT", None),
            (b"GET / HTTP/1.1\r\n", Some(Protocol::Http1)),
            (
                b"POST /a?b=c HTTP/1.0\r\nHost: x\r\n",
                Some(Protocol::Http1),
            ),
            (b"M-SEARCH * HTTP/1.1\r\n", Some(Protocol::Http1)),
            (b"GET / HTTP/2.0\r\n", Some(Protocol::Opaque)),
            (b"GET / SPDY\r\n", Some(Protocol::Opaque)),
            (b"PRI * HTTP/2.0\r\n", None),
            (H2_PREFACE, Some(Protocol::Http2)),
            (b"\x00\x01\x02", Some(Protocol::Opaque)),
            (b"SSH-2.0-OpenSSH_9.2\r\n", Some(Protocol::Opaque)),
            (b"*1\r\n$4\r\nPING\r\n", Some(Protocol::Opaque)),
            (b"hello world\n", Some(Protocol::Opaque)),
            (b"GET /\x01 HTTP/1.1\r\n", Some(Protocol::Opaque)),
        ];
        for (input, want) in cases {
            assert_eq!(
                &classify(input),
                want,
                "{:?}",
                String::from_utf8_lossy(input)
            );
        }
        let tls = crate::transport::tls_hello::tests::client_hello(Some("x.y"));
        assert_eq!(
            classify(&tls),
            Some(Protocol::Tls {
                sni: Some("x.y".into())
            })
        );
    }

    #[test]
    fn long_line_without_newline_is_opaque() {
        let mut v = b"GET /".to_vec();
        v.resize(MAX_REQUEST_LINE, b'a');
        assert_eq!(classify(&v), Some(Protocol::Opaque));
    }

    /// Found by fuzz/tests/detect.rs: a request line of 8 KiB or more was opaque when it
    /// arrived in small reads but HTTP/1 when its newline came in the same read.
    #[test]
    fn long_line_is_opaque_however_it_arrives() {
        let mut v = b"GET /".to_vec();
        v.resize(MAX_REQUEST_LINE + 100, b'p');
        v.extend_from_slice(b" HTTP/1.1\r\nHost: a\r\n\r\n");
        assert_eq!(classify(&v[..MAX_REQUEST_LINE]), Some(Protocol::Opaque));
        assert_eq!(classify(&v), Some(Protocol::Opaque));
        let mut fits = b"GET /".to_vec();
        fits.resize(MAX_REQUEST_LINE - 12, b'p');
        fits.extend_from_slice(b" HTTP/1.1\r\n");
        assert_eq!(classify(&fits), Some(Protocol::Http1));
    }

    #[tokio::test]
    async fn silent_client_times_out_and_keeps_nothing() {
        let (mut a, _b) = tokio::io::duplex(64);
        let mut buf = BytesMut::new();
        let d = detect(&mut a, &mut buf, Duration::from_millis(20))
            .await
            .unwrap();
        assert_eq!(d, Detection::Timeout);
        assert!(buf.is_empty());
    }

    #[tokio::test]
    async fn bytes_trickle_in() {
        use tokio::io::AsyncWriteExt;
        let (mut a, mut b) = tokio::io::duplex(64);
        tokio::spawn(async move {
            for chunk in [&b"GE"[..], b"T / HT", b"TP/1.1\r\nHost: a\r\n\r\n"] {
                b.write_all(chunk).await.unwrap();
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            b
        });
        let mut buf = BytesMut::new();
        let d = detect(&mut a, &mut buf, Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(d, Detection::Protocol(Protocol::Http1));
        assert!(buf.starts_with(b"GET / HTTP/1.1\r\n"));
    }

    proptest! {
        #[test]
        fn classify_never_panics_and_is_prefix_stable(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            // Once a prefix is classified, appending bytes never changes the answer.
            let mut decided = None;
            for n in 0..=bytes.len() {
                let c = classify(&bytes[..n]);
                if let Some(d) = &decided {
                    if matches!(d, Protocol::Opaque | Protocol::Http1 | Protocol::Http2) {
                        prop_assert_eq!(c.as_ref(), Some(d));
                    }
                } else if c.is_some() {
                    decided = c;
                }
            }
        }
    }
}

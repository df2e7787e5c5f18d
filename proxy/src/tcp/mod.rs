//! Opaque TCP forwarding: bytes both ways, half-close and reset propagated.
//!
//! When one side finishes writing (EOF), the proxy shuts down its write side towards the other
//! peer and keeps relaying the reply. When one side resets, or a write fails, both sockets are
//! closed with SO_LINGER 0 so the other peer sees a reset rather than a clean close.
//!
//! Either side may be a TLS stream (mesh mTLS terminated or originated by the proxy): a TLS
//! side's EOF is its peer's close_notify, and its shutdown sends one.

use std::io;
use std::time::Duration;

use bytes::Bytes;
use prometheus_client::metrics::counter::Counter;
use socket2::SockRef;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::transport::prefixed::PrefixedIo;

/// A relayable stream over a TCP socket (which a reset is applied to).
pub trait Stream: AsyncRead + AsyncWrite + Unpin + Send {
    fn tcp(&self) -> &TcpStream;
}

impl Stream for TcpStream {
    fn tcp(&self) -> &TcpStream {
        self
    }
}

impl<S: Stream> Stream for PrefixedIo<S> {
    fn tcp(&self) -> &TcpStream {
        self.get_ref().tcp()
    }
}

impl<S: Stream> Stream for tokio_rustls::client::TlsStream<S> {
    fn tcp(&self) -> &TcpStream {
        self.get_ref().0.tcp()
    }
}

impl<S: Stream> Stream for tokio_rustls::server::TlsStream<S> {
    fn tcp(&self) -> &TcpStream {
        self.get_ref().0.tcp()
    }
}

impl<S: Stream + ?Sized> Stream for Box<S> {
    fn tcp(&self) -> &TcpStream {
        (**self).tcp()
    }
}

const BUF: usize = 16 * 1024;

/// Byte counters for the accepted (client) side.
#[derive(Clone, Debug)]
pub struct ByteCounters {
    pub read: Counter,
    pub write: Counter,
}

/// How a forwarded connection ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Both directions reached EOF.
    Closed { to_server: u64, to_client: u64 },
    /// A side reset or failed; both were reset.
    Reset,
}

/// Relays `client` ⇄ `server`; `prefix` (bytes read during detection) goes to the server first.
pub async fn forward<C: Stream, S: Stream>(
    client: C,
    prefix: Bytes,
    server: S,
    counters: &ByteCounters,
) -> Outcome {
    let (mut cr, mut cw) = tokio::io::split(client);
    let (mut sr, mut sw) = tokio::io::split(server);
    let result = async {
        if !prefix.is_empty() {
            sw.write_all(&prefix).await?;
            sw.flush().await?;
        }
        let up = async {
            let mut buf = vec![0u8; BUF];
            let mut total = prefix.len() as u64;
            loop {
                let n = cr.read(&mut buf).await?;
                if n == 0 {
                    sw.shutdown().await?;
                    return Ok::<_, io::Error>(total);
                }
                counters.read.inc_by(n as u64);
                sw.write_all(&buf[..n]).await?;
                sw.flush().await?;
                total += n as u64;
            }
        };
        let down = async {
            let mut buf = vec![0u8; BUF];
            let mut total = 0u64;
            loop {
                let n = sr.read(&mut buf).await?;
                if n == 0 {
                    cw.shutdown().await?;
                    return Ok::<_, io::Error>(total);
                }
                cw.write_all(&buf[..n]).await?;
                cw.flush().await?;
                counters.write.inc_by(n as u64);
                total += n as u64;
            }
        };
        tokio::try_join!(up, down)
    }
    .await;
    match result {
        Ok((to_server, to_client)) => Outcome::Closed {
            to_server,
            to_client,
        },
        Err(e) => {
            tracing::debug!(error = %e, "tcp forward ended by error; resetting both sides");
            reset(cr.unsplit(cw).tcp());
            reset(sr.unsplit(sw).tcp());
            Outcome::Reset
        }
    }
}

/// Arranges for `stream` to send RST when dropped.
/// Connects to `addr` with TCP_NODELAY; a connect slower than `timeout` fails with
/// `ErrorKind::TimedOut` (which [`crate::http::Cause::of_connect`] maps to `connect-timeout`).
pub async fn connect(addr: std::net::SocketAddr, timeout: Duration) -> io::Result<TcpStream> {
    let stream = tokio::time::timeout(timeout, TcpStream::connect(addr))
        .await
        .map_err(|_| io::Error::from(io::ErrorKind::TimedOut))??;
    stream.set_nodelay(true)?;
    Ok(stream)
}

pub fn reset(stream: &TcpStream) {
    let _ = SockRef::from(stream).set_linger(Some(Duration::ZERO));
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (s, _) = l.accept().await.unwrap();
        (c, s)
    }

    fn counters() -> ByteCounters {
        ByteCounters {
            read: Counter::default(),
            write: Counter::default(),
        }
    }

    #[tokio::test]
    async fn half_close_reaches_server_and_reply_still_arrives() {
        let (mut app, proxy_client_side) = pair().await;
        let (proxy_server_side, mut srv) = pair().await;
        let c = counters();
        let cc = c.clone();
        let fwd = tokio::spawn(async move {
            forward(
                proxy_client_side,
                Bytes::from_static(b"pre:"),
                proxy_server_side,
                &cc,
            )
            .await
        });
        app.write_all(b"ping").await.unwrap();
        app.shutdown().await.unwrap();
        let mut got = Vec::new();
        srv.read_to_end(&mut got).await.unwrap(); // EOF arrives: half-close propagated
        assert_eq!(got, b"pre:ping");
        srv.write_all(b"pong").await.unwrap();
        drop(srv);
        let mut reply = Vec::new();
        app.read_to_end(&mut reply).await.unwrap();
        assert_eq!(reply, b"pong");
        assert_eq!(
            fwd.await.unwrap(),
            Outcome::Closed {
                to_server: 8,
                to_client: 4
            }
        );
        assert_eq!(c.read.get(), 4);
        assert_eq!(c.write.get(), 4);
    }

    #[tokio::test]
    async fn server_reset_reaches_client() {
        let (mut app, pc) = pair().await;
        let (ps, srv) = pair().await;
        let c = counters();
        let fwd = tokio::spawn(async move { forward(pc, Bytes::new(), ps, &c).await });
        reset(&srv);
        drop(srv);
        let mut buf = [0u8; 8];
        let err = app.read(&mut buf).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::ConnectionReset);
        assert_eq!(fwd.await.unwrap(), Outcome::Reset);
    }
}

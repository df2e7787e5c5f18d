//! The connection churner: `concurrency` tasks, each opening a fresh connection, doing the
//! TLS handshake (or not), sending one small request, reading the response and closing,
//! again and again until the window ends. Every connection is new: no keep-alive, no TLS
//! session resumption, so what the server pays per connection is a full handshake.
//!
//! HTTP/1.1 requests carry `Connection: close`; an HTTP/2 connection is closed by dropping
//! its only sender once the response is read. Either way the client waits for the
//! connection to finish closing (TLS `close_notify` included) before counting it.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::{bail, Context as _};
use bytes::Bytes;
use hdrhistogram::Histogram;
use http::header::{CONNECTION, HOST};
use http::{HeaderValue, Request};
use http_body_util::{BodyExt as _, Empty};
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;
use tokio::time::{Duration, Instant};
use tokio_rustls::TlsConnector;

use crate::load::stats::new_histogram;

/// HTTP version of the one request per connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum HttpVersion {
    /// HTTP/1.1 (ALPN `http/1.1` over TLS).
    Http1,
    /// HTTP/2 (ALPN `h2` over TLS, prior knowledge in plaintext).
    Http2,
}

impl HttpVersion {
    pub fn alpn(self) -> &'static [u8] {
        match self {
            HttpVersion::Http1 => b"http/1.1",
            HttpVersion::Http2 => b"h2",
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            HttpVersion::Http1 => "http1",
            HttpVersion::Http2 => "http2",
        }
    }
}

/// Plaintext TCP, or TLS with a server name to send.
#[derive(Clone)]
pub enum Wire {
    Plain,
    Tls {
        connector: TlsConnector,
        server_name: ServerName<'static>,
    },
}

/// What one connection does.
pub struct Connector {
    pub addr: SocketAddr,
    pub wire: Wire,
    pub http: HttpVersion,
    /// `Host` / `:authority`.
    pub authority: String,
    /// Expected response body length.
    pub expect_len: usize,
    /// Bound on one whole connection.
    pub timeout: Duration,
}

impl Connector {
    /// One connection: connect, handshake, one request, close.
    pub async fn once(&self) -> anyhow::Result<()> {
        let tcp = TcpStream::connect(self.addr)
            .await
            .with_context(|| format!("connecting to {}", self.addr))?;
        tcp.set_nodelay(true).context("setting TCP_NODELAY")?;
        match &self.wire {
            Wire::Plain => self.exchange(TokioIo::new(tcp)).await,
            Wire::Tls {
                connector,
                server_name,
            } => {
                let tls = connector
                    .connect(server_name.clone(), tcp)
                    .await
                    .context("TLS handshake")?;
                let (_, session) = tls.get_ref();
                let offered = self.http.alpn();
                if session.alpn_protocol() != Some(offered) {
                    bail!(
                        "the server negotiated ALPN {:?}, not {:?}",
                        session.alpn_protocol().map(String::from_utf8_lossy),
                        String::from_utf8_lossy(offered)
                    );
                }
                self.exchange(TokioIo::new(tls)).await
            }
        }
    }

    fn request(&self) -> anyhow::Result<Request<Empty<Bytes>>> {
        let host = HeaderValue::from_str(&self.authority)
            .with_context(|| format!("authority {:?} is not a header value", self.authority))?;
        let builder = match self.http {
            HttpVersion::Http1 => Request::get("/")
                .header(HOST, host)
                .header(CONNECTION, HeaderValue::from_static("close")),
            HttpVersion::Http2 => Request::get(format!("http://{}/", self.authority)),
        };
        builder.body(Empty::new()).context("building the request")
    }

    async fn exchange<T>(&self, io: T) -> anyhow::Result<()>
    where
        T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    {
        let request = self.request()?;
        let (response, conn) = match self.http {
            HttpVersion::Http1 => {
                let (mut sender, conn) = http1::handshake::<_, Empty<Bytes>>(io)
                    .await
                    .context("HTTP/1.1 handshake")?;
                let conn = tokio::spawn(conn);
                let response = sender.send_request(request).await;
                (response, conn)
            }
            HttpVersion::Http2 => {
                let (mut sender, conn) = http2::Builder::new(TokioExecutor::new())
                    .handshake::<_, Empty<Bytes>>(io)
                    .await
                    .context("HTTP/2 handshake")?;
                let conn = tokio::spawn(conn);
                let response = sender.send_request(request).await;
                (response, conn)
            }
        };
        // The sender is dropped here: the connection closes once the response is read.
        let response = response.context("sending the request")?;
        let status = response.status();
        let body = response
            .into_body()
            .collect()
            .await
            .context("reading the response body")?
            .to_bytes();
        if !status.is_success() {
            bail!("status {status}");
        }
        if body.len() != self.expect_len {
            bail!(
                "response body of {} bytes, expected {}",
                body.len(),
                self.expect_len
            );
        }
        conn.await
            .context("connection task")?
            .context("closing the connection")?;
        Ok(())
    }
}

/// What a churn window did.
#[derive(Debug, Clone)]
pub struct ChurnStats {
    /// Connections that completed (handshake, request, response, close).
    pub ok: u64,
    pub errors: u64,
    /// The first few distinct errors.
    pub error_samples: Vec<String>,
    /// From the start until the last task finished.
    pub elapsed: Duration,
    /// Whole-connection time of the successful ones, µs.
    pub latency: Histogram<u64>,
}

const MAX_ERROR_SAMPLES: usize = 5;

/// Runs `concurrency` churning tasks on this runtime for `window`.
pub async fn churn(connector: Arc<Connector>, concurrency: usize, window: Duration) -> ChurnStats {
    let started = Instant::now();
    let deadline = started + window;
    let tasks: Vec<_> = (0..concurrency.max(1))
        .map(|_| {
            let c = Arc::clone(&connector);
            tokio::spawn(async move {
                let mut s = ChurnStats {
                    ok: 0,
                    errors: 0,
                    error_samples: Vec::new(),
                    elapsed: Duration::ZERO,
                    latency: new_histogram(),
                };
                while Instant::now() < deadline {
                    let t = Instant::now();
                    match tokio::time::timeout(c.timeout, c.once()).await {
                        Ok(Ok(())) => {
                            s.ok += 1;
                            let us = t.elapsed().as_micros().max(1) as u64;
                            let _ = s.latency.record(us.min(60_000_000));
                        }
                        outcome => {
                            s.errors += 1;
                            let e = match outcome {
                                Ok(Err(e)) => format!("{e:#}"),
                                _ => format!("no complete exchange within {:?}", c.timeout),
                            };
                            if s.error_samples.len() < MAX_ERROR_SAMPLES
                                && !s.error_samples.contains(&e)
                            {
                                s.error_samples.push(e);
                            }
                            // Do not spin on a server that is gone.
                            tokio::time::sleep(Duration::from_millis(10)).await;
                        }
                    }
                }
                s
            })
        })
        .collect();
    let mut total = ChurnStats {
        ok: 0,
        errors: 0,
        error_samples: Vec::new(),
        elapsed: Duration::ZERO,
        latency: new_histogram(),
    };
    for t in tasks {
        match t.await {
            Ok(s) => {
                total.ok += s.ok;
                total.errors += s.errors;
                for e in s.error_samples {
                    if total.error_samples.len() < MAX_ERROR_SAMPLES
                        && !total.error_samples.contains(&e)
                    {
                        total.error_samples.push(e);
                    }
                }
                let _ = total.latency.add(&s.latency);
            }
            Err(e) => {
                total.errors += 1;
                total
                    .error_samples
                    .push(format!("a churn task failed: {e}"));
            }
        }
    }
    total.elapsed = started.elapsed();
    total
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::handshake::pki;
    use crate::scenario::mesh;
    use crate::server::{serve_with, ServeOptions};

    async fn server(response_size: usize) -> SocketAddr {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = l.local_addr().expect("addr");
        tokio::spawn(serve_with(
            l,
            ServeOptions {
                response_size,
                ..Default::default()
            },
        ));
        addr
    }

    async fn plain(http: HttpVersion, expect_len: usize) -> ChurnStats {
        let addr = server(100).await;
        let c = Arc::new(Connector {
            addr,
            wire: Wire::Plain,
            http,
            authority: addr.to_string(),
            expect_len,
            timeout: Duration::from_secs(5),
        });
        churn(c, 4, Duration::from_millis(300)).await
    }

    #[tokio::test]
    async fn plaintext_churn_completes_fresh_connections() {
        for http in [HttpVersion::Http1, HttpVersion::Http2] {
            let s = plain(http, 100).await;
            assert!(s.ok > 10, "{http:?}: {s:?}");
            assert_eq!(s.errors, 0, "{http:?}: {:?}", s.error_samples);
            assert_eq!(s.latency.len(), s.ok);
        }
    }

    /// A TLS 1.3 server that requires a client certificate from the dev CA, speaks
    /// `server_alpn`, and answers each connection's request with `body`.
    async fn tls_server(
        ca: &pki::DevCa,
        server_alpn: &[u8],
        body: &'static [u8],
    ) -> (SocketAddr, Arc<std::sync::atomic::AtomicU64>) {
        use std::sync::atomic::{AtomicU64, Ordering};
        let leaf = ca
            .issue(
                &mesh::spiffe_id("bench", "server"),
                Duration::from_secs(3600),
            )
            .expect("server leaf");
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::new(ca.roots().expect("roots")),
            Arc::clone(&provider),
        )
        .build()
        .expect("client verifier");
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("TLS 1.3")
            .with_client_cert_verifier(verifier)
            .with_single_cert(
                leaf.chain.clone(),
                rustls_pki_types::PrivateKeyDer::Pkcs8(leaf.key.clone_key()),
            )
            .expect("server cert");
        config.alpn_protocols = vec![server_alpn.to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = l.local_addr().expect("addr");
        let handshakes = Arc::new(AtomicU64::new(0));
        let counter = Arc::clone(&handshakes);
        tokio::spawn(async move {
            while let Ok((tcp, _)) = l.accept().await {
                let acceptor = acceptor.clone();
                let counter = Arc::clone(&counter);
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    counter.fetch_add(1, Ordering::Relaxed);
                    let service = hyper::service::service_fn(|_req| async {
                        Ok::<_, std::convert::Infallible>(http::Response::new(
                            http_body_util::Full::new(Bytes::from_static(body)),
                        ))
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tls), service)
                        .await;
                });
            }
        });
        (addr, handshakes)
    }

    /// A client expecting the server to run as `bench/<expect_sa>` (the SNI carries it).
    fn tls_connector(ca: &pki::DevCa, addr: SocketAddr, expect_sa: &str) -> Arc<Connector> {
        let client = ca
            .issue(
                &mesh::spiffe_id("bench", "bench-client"),
                Duration::from_secs(3600),
            )
            .expect("client leaf");
        let config = pki::client_config(ca, &client, b"http/1.1").expect("client config");
        Arc::new(Connector {
            addr,
            wire: Wire::Tls {
                connector: TlsConnector::from(config),
                server_name: ServerName::try_from(mesh::server_name("bench", expect_sa))
                    .expect("server name"),
            },
            http: HttpVersion::Http1,
            authority: mesh::authority(),
            expect_len: 5,
            timeout: Duration::from_secs(5),
        })
    }

    #[tokio::test]
    async fn mutual_tls_churn_does_a_full_handshake_per_connection() {
        let dir = pki::testing::dev_ca_dir("client-churn");
        let ca = pki::DevCa::load(&dir).expect("ca");
        let (addr, handshakes) = tls_server(&ca, b"http/1.1", b"hello").await;
        let s = churn(
            tls_connector(&ca, addr, "server"),
            2,
            Duration::from_millis(300),
        )
        .await;
        assert!(s.ok > 2, "{s:?}");
        assert_eq!(s.errors, 0, "{:?}", s.error_samples);
        // One server-side handshake per connection: no reuse, no resumption.
        let served = handshakes.load(std::sync::atomic::Ordering::Relaxed);
        assert_eq!(served, s.ok, "{s:?}");

        // A server with another identity is refused by the client.
        let s = churn(
            tls_connector(&ca, addr, "other"),
            1,
            Duration::from_millis(50),
        )
        .await;
        assert_eq!(s.ok, 0);
        assert!(
            s.error_samples[0].contains("TLS handshake"),
            "{:?}",
            s.error_samples
        );

        // A server that does not speak the offered ALPN protocol is an error too.
        let (h2_only, _) = tls_server(&ca, b"h2", b"hello").await;
        let s = churn(
            tls_connector(&ca, h2_only, "server"),
            1,
            Duration::from_millis(50),
        )
        .await;
        assert_eq!(s.ok, 0);
        assert!(
            s.error_samples
                .iter()
                .any(|e| e.contains("ALPN") || e.contains("TLS handshake")),
            "{:?}",
            s.error_samples
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn a_wrong_body_length_is_an_error() {
        let s = plain(HttpVersion::Http1, 7).await;
        assert_eq!(s.ok, 0);
        assert!(s.errors > 0);
        assert!(
            s.error_samples[0].contains("100 bytes, expected 7"),
            "{:?}",
            s.error_samples
        );
    }
}

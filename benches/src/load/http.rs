//! HTTP/1.1, HTTP/2 and gRPC slots over hyper's connection-level client.
//!
//! No pooled client: the generator opens exactly `connections` TCP
//! connections. An HTTP/1.1 connection is one slot (one request in flight);
//! an HTTP/2 connection is shared by `streams` slots, one stream in flight
//! each. A slot whose connection died reconnects on its next request.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::{bail, Context as _};
use bytes::Bytes;
use http::header::{CONTENT_TYPE, HOST, TE};
use http::{HeaderValue, Method, Request, Response, Uri};
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde::Serialize;
use tokio::net::TcpStream;
use tokio::time::Duration;

use super::schedule::{BoxFuture, Transport};
use crate::grpc;

/// The wire protocol of a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// HTTP/1.1, keep-alive, one request in flight per connection.
    Http1,
    /// HTTP/2 with prior knowledge (h2c), many streams per connection.
    Http2,
    /// gRPC unary calls over h2c, hand-framed.
    Grpc,
}

impl Protocol {
    pub fn is_h2(self) -> bool {
        matches!(self, Protocol::Http2 | Protocol::Grpc)
    }

    pub fn name(self) -> &'static str {
        match self {
            Protocol::Http1 => "http1",
            Protocol::Http2 => "http2",
            Protocol::Grpc => "grpc",
        }
    }
}

/// Where and what the generator sends.
#[derive(Debug, Clone)]
pub struct LoadSpec {
    /// The address the generator connects to (the server, or the first proxy).
    pub connect: SocketAddr,
    /// The `Host` / `:authority` of requests (the server's name).
    pub authority: String,
    pub protocol: Protocol,
    pub connections: usize,
    /// Concurrent streams per HTTP/2 connection (ignored for HTTP/1.1).
    pub streams: usize,
    /// Request body bytes (the gRPC message size for gRPC); 0 sends a GET.
    pub request_size: usize,
    /// Response body bytes the server sends (HTTP); gRPC echoes the request.
    pub response_size: usize,
}

/// The request every slot sends, built once.
#[derive(Debug)]
struct Template {
    protocol: Protocol,
    connect: SocketAddr,
    method: Method,
    uri: Uri,
    host: HeaderValue,
    body: Bytes,
    /// Expected response body length (HTTP) or message length (gRPC).
    expect_len: usize,
}

impl Template {
    fn new(spec: &LoadSpec) -> anyhow::Result<Self> {
        let host = HeaderValue::from_str(&spec.authority).with_context(|| {
            format!("authority {:?} is not a valid header value", spec.authority)
        })?;
        let path = match spec.protocol {
            Protocol::Grpc => grpc::UNARY_PATH,
            _ => "/",
        };
        // HTTP/1.1 sends origin-form plus Host; HTTP/2 needs scheme and
        // authority in the URI for its pseudo-headers.
        let uri: Uri = match spec.protocol {
            Protocol::Http1 => path.parse(),
            _ => format!("http://{}{}", spec.authority, path).parse(),
        }
        .with_context(|| format!("building a request URI for authority {:?}", spec.authority))?;
        let payload = Bytes::from(vec![b'w'; spec.request_size]);
        let (method, body, expect_len) = match spec.protocol {
            Protocol::Grpc => (Method::POST, grpc::encode(&payload), spec.request_size),
            _ if spec.request_size == 0 => (Method::GET, Bytes::new(), spec.response_size),
            _ => (Method::POST, payload, spec.response_size),
        };
        Ok(Template {
            protocol: spec.protocol,
            connect: spec.connect,
            method,
            uri,
            host,
            body,
            expect_len,
        })
    }

    fn request(&self) -> anyhow::Result<Request<Full<Bytes>>> {
        let mut builder = Request::builder()
            .method(self.method.clone())
            .uri(self.uri.clone());
        if self.protocol == Protocol::Http1 {
            builder = builder.header(HOST, self.host.clone());
        }
        if self.protocol == Protocol::Grpc {
            builder = builder
                .header(CONTENT_TYPE, HeaderValue::from_static(grpc::CONTENT_TYPE))
                .header(TE, HeaderValue::from_static("trailers"));
        }
        builder
            .body(Full::new(self.body.clone()))
            .context("building request")
    }

    /// Reads the whole response and decides whether it succeeded.
    async fn check(&self, response: Response<Incoming>) -> anyhow::Result<()> {
        let status = response.status();
        let (parts, body) = response.into_parts();
        // Read the body even for a bad status, so the connection stays usable.
        let collected = body.collect().await.context("reading response body")?;
        if !status.is_success() {
            let cause = parts
                .headers
                .get("weft-proxy-error")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            bail!("status {status} {cause}");
        }
        let trailers = collected.trailers().cloned();
        let bytes = collected.to_bytes();
        match self.protocol {
            Protocol::Grpc => {
                // Trailers-only responses carry grpc-status in the headers.
                let grpc_status = trailers
                    .as_ref()
                    .and_then(|t| t.get("grpc-status"))
                    .or_else(|| parts.headers.get("grpc-status"))
                    .map(|v| v.to_str().unwrap_or("?").to_owned());
                match grpc_status.as_deref() {
                    Some("0") => {}
                    Some(code) => bail!("grpc-status {code}"),
                    None => bail!("response has no grpc-status"),
                }
                let message = grpc::decode_single(&bytes)?;
                if message.len() != self.expect_len {
                    bail!(
                        "gRPC message of {} bytes, expected {}",
                        message.len(),
                        self.expect_len
                    );
                }
            }
            _ => {
                if bytes.len() != self.expect_len {
                    bail!(
                        "response body of {} bytes, expected {}",
                        bytes.len(),
                        self.expect_len
                    );
                }
            }
        }
        Ok(())
    }
}

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

async fn dial(addr: SocketAddr) -> anyhow::Result<TokioIo<TcpStream>> {
    let stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr))
        .await
        .map_err(|_| anyhow::anyhow!("connecting to {addr}: no answer within {CONNECT_TIMEOUT:?}"))?
        .with_context(|| format!("connecting to {addr}"))?;
    stream.set_nodelay(true).context("setting TCP_NODELAY")?;
    Ok(TokioIo::new(stream))
}

async fn connect_h1(addr: SocketAddr) -> anyhow::Result<http1::SendRequest<Full<Bytes>>> {
    let (sender, conn) = http1::handshake(dial(addr).await?)
        .await
        .context("HTTP/1.1 handshake")?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "HTTP/1.1 connection closed");
        }
    });
    Ok(sender)
}

async fn connect_h2(addr: SocketAddr) -> anyhow::Result<http2::SendRequest<Full<Bytes>>> {
    let (sender, conn) = http2::Builder::new(TokioExecutor::new())
        .handshake(dial(addr).await?)
        .await
        .context("HTTP/2 handshake")?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "HTTP/2 connection closed");
        }
    });
    Ok(sender)
}

struct H1Slot {
    template: Arc<Template>,
    sender: Option<http1::SendRequest<Full<Bytes>>>,
}

impl Transport for H1Slot {
    fn call(&mut self) -> BoxFuture<'_, anyhow::Result<()>> {
        Box::pin(async move {
            let sender = match &mut self.sender {
                Some(s) if !s.is_closed() => s,
                _ => self.sender.insert(connect_h1(self.template.connect).await?),
            };
            sender.ready().await.context("connection closed")?;
            let response = sender
                .send_request(self.template.request()?)
                .await
                .context("sending request")?;
            self.template.check(response).await
        })
    }
}

/// One HTTP/2 connection shared by its slots; replaced when it dies.
struct H2Conn {
    current: tokio::sync::Mutex<http2::SendRequest<Full<Bytes>>>,
}

struct H2Slot {
    template: Arc<Template>,
    conn: Arc<H2Conn>,
    sender: http2::SendRequest<Full<Bytes>>,
}

impl Transport for H2Slot {
    fn call(&mut self) -> BoxFuture<'_, anyhow::Result<()>> {
        Box::pin(async move {
            if self.sender.is_closed() {
                let mut current = self.conn.current.lock().await;
                if current.is_closed() {
                    *current = connect_h2(self.template.connect).await?;
                }
                self.sender = current.clone();
            }
            self.sender.ready().await.context("connection closed")?;
            let response = self
                .sender
                .send_request(self.template.request()?)
                .await
                .context("sending request")?;
            self.template.check(response).await
        })
    }
}

/// Opens the connections of `spec` and returns one slot per request that
/// may be in flight at once.
pub async fn connect(spec: &LoadSpec) -> anyhow::Result<Vec<Box<dyn Transport>>> {
    let template = Arc::new(Template::new(spec)?);
    let mut slots: Vec<Box<dyn Transport>> = Vec::new();
    for _ in 0..spec.connections {
        if spec.protocol.is_h2() {
            let sender = connect_h2(spec.connect).await?;
            let conn = Arc::new(H2Conn {
                current: tokio::sync::Mutex::new(sender.clone()),
            });
            for _ in 0..spec.streams.max(1) {
                slots.push(Box::new(H2Slot {
                    template: Arc::clone(&template),
                    conn: Arc::clone(&conn),
                    sender: sender.clone(),
                }));
            }
        } else {
            let sender = connect_h1(spec.connect).await?;
            slots.push(Box::new(H1Slot {
                template: Arc::clone(&template),
                sender: Some(sender),
            }));
        }
    }
    Ok(slots)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(protocol: Protocol, request_size: usize) -> LoadSpec {
        LoadSpec {
            connect: SocketAddr::from(([127, 0, 0, 1], 8080)),
            authority: "bench.local:8080".into(),
            protocol,
            connections: 1,
            streams: 1,
            request_size,
            response_size: 1024,
        }
    }

    #[test]
    fn http1_uses_origin_form_and_host() {
        let t = Template::new(&spec(Protocol::Http1, 1024)).expect("template");
        let req = t.request().expect("request");
        assert_eq!(req.method(), Method::POST);
        assert_eq!(req.uri(), "/");
        assert_eq!(req.headers()[HOST], "bench.local:8080");
        assert_eq!(t.expect_len, 1024);
    }

    #[test]
    fn zero_body_is_a_get() {
        let t = Template::new(&spec(Protocol::Http2, 0)).expect("template");
        assert_eq!(t.method, Method::GET);
        assert_eq!(t.uri, "http://bench.local:8080/");
    }

    #[test]
    fn grpc_frames_the_body_and_expects_an_echo() {
        let t = Template::new(&spec(Protocol::Grpc, 100)).expect("template");
        let req = t.request().expect("request");
        assert_eq!(req.uri(), "http://bench.local:8080/weft.bench.Echo/Unary");
        assert_eq!(req.headers()[CONTENT_TYPE], "application/grpc");
        assert_eq!(req.headers()[TE], "trailers");
        assert_eq!(t.body.len(), 105);
        assert_eq!(t.expect_len, 100);
    }

    #[test]
    fn bad_authority_is_an_error() {
        let mut s = spec(Protocol::Http1, 0);
        s.authority = "bad\nhost".into();
        assert!(Template::new(&s).is_err());
    }
}

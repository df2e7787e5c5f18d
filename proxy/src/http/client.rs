//! Connections to one endpoint: a pool of HTTP/1.1 connections or one shared HTTP/2 connection.
//!
//! An [`Endpoint`] dials exactly one address, so the pool key is the destination while each
//! request keeps its own authority (`Host` / `:authority`). The pool is built directly on
//! hyper's connection API rather than `hyper_util`'s legacy client: the legacy client keys a
//! shared map by URI, locks it twice per request and spawns a task per request to return the
//! connection; here a finished HTTP/1.1 response hands its connection back from the body's
//! last frame, with no task and no map lookup. That was measured as a large share of the
//! proxy's user-space time per request (benches/RESULTS.md).
//!
//! - HTTP/1.1: idle connections are reused most-recently-used first, closed after the idle
//!   timeout, and capped at [`MAX_IDLE`]. A request that finds its pooled connection closed by
//!   the server before it was written is retried once on a fresh connection (hyper returns an
//!   unsent request to us), so keep-alive races are invisible to clients.
//! - HTTP/2: one connection shared by all concurrent streams, redialled when it closes.
//!
//! An endpoint's [`Transport`] is plain TCP or mutual TLS to a meshed peer proxy. Requests are
//! put in the form the endpoint's protocol needs just before sending ([`Endpoint::try_request`]):
//! origin form and `Host` for HTTP/1.1, `:scheme` and `:authority` for HTTP/2. An HTTP/1.x
//! request sent to a meshed peer over HTTP/2 is marked with [`ORIG_PROTO`] so the peer's
//! inbound proxy hands it to its application as HTTP/1.1 again.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::{Request, Response, Uri, Version};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use prometheus_client::metrics::counter::Counter;
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::{BoxBody, BoxError};
use crate::metrics::Direction;
use crate::resilience;
use crate::transport::coalesce::Coalesce;
use crate::transport::mesh::{self, Alpn, ConnectTlsError, MeshTarget};

/// Set on an HTTP/1.x request carried to a meshed peer over HTTP/2: the peer's inbound proxy
/// removes it and sends the request to its application as HTTP/1.1.
pub const ORIG_PROTO: HeaderName = HeaderName::from_static("weft-orig-proto");
const HTTP11: HeaderValue = HeaderValue::from_static("HTTP/1.1");

/// How an endpoint's connections are made.
#[derive(Clone, Debug)]
pub enum Transport {
    /// Plain TCP, each new connection counted in `opened` when given
    /// (`weft_tls_connections_total` with the reason it is not mTLS).
    Plain(Option<Counter>),
    /// Mutual TLS to a meshed peer proxy that must present the target's identity.
    Mesh(MeshTarget),
}

/// How many destination endpoints are cached before the cache is cleared.
const MAX_ENDPOINTS: usize = 4096;
/// Idle HTTP/1.1 connections kept per endpoint.
pub const MAX_IDLE: usize = 256;

/// A failed dial, with the address and the cause.
#[derive(Debug, thiserror::Error)]
#[error("connecting to {addr}: {source}")]
pub struct ConnectError {
    pub addr: SocketAddr,
    #[source]
    pub source: std::io::Error,
}

/// Why a request to an endpoint failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error("connecting to {addr}: {source}")]
    Tls {
        addr: SocketAddr,
        #[source]
        source: ConnectTlsError,
    },
    #[error("HTTP handshake with {addr} failed: {source}")]
    Handshake {
        addr: SocketAddr,
        #[source]
        source: hyper::Error,
    },
    #[error("request to {addr} failed: {source}")]
    Request {
        addr: SocketAddr,
        #[source]
        source: hyper::Error,
    },
}

/// A failed request; `request` is the request itself when it was never sent (no connection
/// could be made), so it may be retried elsewhere.
#[derive(Debug)]
pub struct Unsent {
    pub error: ClientError,
    pub request: Option<Request<BoxBody>>,
}

impl From<ClientError> for Unsent {
    fn from(error: ClientError) -> Self {
        Self {
            error,
            request: None,
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

struct Idle {
    conn: http1::SendRequest<BoxBody>,
    since: Instant,
}

/// Connections to one address, speaking one protocol.
pub struct Endpoint {
    addr: SocketAddr,
    h2: bool,
    transport: Transport,
    /// The proxy's connect and idle timeouts, unless a BackendPolicy set others
    /// ([`Endpoint::set_timeouts`]); nanoseconds.
    defaults: (Duration, Duration),
    connect_timeout: AtomicU64,
    idle_timeout: AtomicU64,
    idle: Mutex<Vec<Idle>>,
    shared_h2: Mutex<Option<http2::SendRequest<BoxBody>>>,
    /// Serialises HTTP/2 dials so a burst of first requests opens one connection.
    h2_dial: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Endpoint")
            .field("addr", &self.addr)
            .field("h2", &self.h2)
            .field("transport", &self.transport)
            .field("idle", &lock(&self.idle).len())
            .finish()
    }
}

impl Endpoint {
    pub fn new(
        addr: SocketAddr,
        h2: bool,
        connect_timeout: Duration,
        idle_timeout: Duration,
        transport: Transport,
    ) -> Arc<Self> {
        let ep = Arc::new(Self {
            addr,
            h2,
            transport,
            defaults: (connect_timeout, idle_timeout),
            connect_timeout: AtomicU64::new(nanos(connect_timeout)),
            idle_timeout: AtomicU64::new(nanos(idle_timeout)),
            idle: Mutex::new(Vec::new()),
            shared_h2: Mutex::new(None),
            h2_dial: tokio::sync::Mutex::new(()),
        });
        if !h2 {
            tokio::spawn(sweep_idle(Arc::downgrade(&ep)));
        }
        ep
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// A BackendPolicy's connect and idle timeouts (`None`: the proxy's own).
    pub fn set_timeouts(&self, connect: Option<Duration>, idle: Option<Duration>) {
        self.connect_timeout
            .store(nanos(connect.unwrap_or(self.defaults.0)), Ordering::Relaxed);
        self.idle_timeout
            .store(nanos(idle.unwrap_or(self.defaults.1)), Ordering::Relaxed);
    }

    pub fn connect_timeout(&self) -> Duration {
        Duration::from_nanos(self.connect_timeout.load(Ordering::Relaxed))
    }

    pub fn idle_timeout(&self) -> Duration {
        Duration::from_nanos(self.idle_timeout.load(Ordering::Relaxed))
    }

    /// Idle HTTP/1.1 connections now in the pool.
    pub fn idle_count(&self) -> usize {
        lock(&self.idle).len()
    }

    /// Sends `req`; the response body returns its connection to the pool when it ends.
    pub async fn request(
        self: &Arc<Self>,
        req: Request<BoxBody>,
    ) -> Result<Response<PooledBody>, ClientError> {
        self.try_request(req).await.map_err(|u| u.error)
    }

    /// Whether this endpoint is a meshed peer reached over mTLS.
    pub fn is_mesh(&self) -> bool {
        matches!(self.transport, Transport::Mesh(_))
    }

    /// Like [`Endpoint::request`], but a request that could not be sent because no connection
    /// could be made (connect or handshake failure) comes back unread in the error, so the
    /// caller may send it elsewhere. It comes back in the form it arrived in, so another
    /// endpoint puts it in its own form exactly as if it had been the first.
    ///
    /// Boxed: this is the tier boundary between the request path and the connection clients,
    /// and every caller (the balanced path, the original destination, RequestMirror copies in
    /// their own tasks) shares one compiled copy of everything below it. Unboxed, each new
    /// caller compiled the whole HTTP/1.1 and HTTP/2 client stack again (measured: ~450 KB of
    /// text and ~1 MiB of resident memory for the mirror's task alone), for one allocation per
    /// request saved.
    pub fn try_request(
        self: &Arc<Self>,
        req: Request<BoxBody>,
    ) -> Pin<Box<dyn Future<Output = Result<Response<PooledBody>, Unsent>> + Send + '_>> {
        Box::pin(self.send_request(req))
    }

    async fn send_request(
        self: &Arc<Self>,
        mut req: Request<BoxBody>,
    ) -> Result<Response<PooledBody>, Unsent> {
        let form = ClientForm::of(&req);
        // Fail closed on pooled connections too: an expired identity carries no more requests.
        if let Transport::Mesh(t) = &self.transport {
            if let Err(source) = t.certificate_valid() {
                return Err(Unsent {
                    error: ClientError::Tls {
                        addr: self.addr,
                        source,
                    },
                    request: Some(req),
                });
            }
        }
        let sent = if self.h2 {
            to_h2_form(&mut req, self.is_mesh());
            self.request_h2(req).await
        } else {
            to_h1_form(&mut req);
            self.request_h1(req).await
        };
        sent.map_err(|mut u| {
            if let Some(r) = &mut u.request {
                form.restore(r);
            }
            u
        })
    }

    async fn request_h1(
        self: &Arc<Self>,
        req: Request<BoxBody>,
    ) -> Result<Response<PooledBody>, Unsent> {
        let mut dialled = Duration::ZERO;
        let (conn, pooled) = match self.checkout() {
            Some(c) => (c, true),
            None => match timed(&mut dialled, self.dial_h1()).await {
                Ok(c) => (c, false),
                Err(error) => {
                    return Err(Unsent {
                        error,
                        request: Some(req),
                    })
                }
            },
        };
        match self.send_h1(conn, req).await {
            // Not written: the pooled connection was closed under us. Retry once on a fresh
            // connection; a fresh connection's failure is final.
            Err(mut e) if pooled && e.message().is_some() => {
                let Some(req) = e.take_message() else {
                    return Err(self.request_error(e.into_error()).into());
                };
                tracing::debug!(addr = %self.addr, error = %e.error(), "pooled connection closed before the request was sent; retrying on a new one");
                let conn = match timed(&mut dialled, self.dial_h1()).await {
                    Ok(c) => c,
                    Err(error) => {
                        return Err(Unsent {
                            error,
                            request: Some(req),
                        })
                    }
                };
                self.send_h1(conn, req)
                    .await
                    .map(|r| connected_in(r, dialled))
                    .map_err(|e| self.request_error(e.into_error()).into())
            }
            Err(e) => Err(self.request_error(e.into_error()).into()),
            Ok(rsp) => Ok(connected_in(rsp, dialled)),
        }
    }

    async fn send_h1(
        self: &Arc<Self>,
        mut conn: http1::SendRequest<BoxBody>,
        req: Request<BoxBody>,
    ) -> Result<Response<PooledBody>, hyper::client::conn::TrySendError<Request<BoxBody>>> {
        // `ready` resolves at once for an idle connection; it only waits while the previous
        // response's end is still being processed by the connection task. An error here means
        // the connection closed: `try_send_request` then hands the request back unsent.
        let _ = conn.ready().await;
        let rsp = conn.try_send_request(req).await?;
        // A connection that switched protocols belongs to the upgraded stream now.
        let back = if rsp.status() == http::StatusCode::SWITCHING_PROTOCOLS {
            PoolReturn::None
        } else {
            PoolReturn::H1 {
                conn,
                endpoint: Arc::downgrade(self),
            }
        };
        Ok(rsp.map(|b| PooledBody::new(b, back)))
    }

    fn request_error(&self, source: hyper::Error) -> ClientError {
        ClientError::Request {
            addr: self.addr,
            source,
        }
    }

    async fn request_h2(
        self: &Arc<Self>,
        req: Request<BoxBody>,
    ) -> Result<Response<PooledBody>, Unsent> {
        let unsent = |error, req| Unsent {
            error,
            request: Some(req),
        };
        let mut dialled = Duration::ZERO;
        let conn = match timed(&mut dialled, self.h2_conn()).await {
            Ok(c) => c,
            Err(error) => return Err(unsent(error, req)),
        };
        match self.send_h2(conn, req).await {
            // Not sent: the shared connection closed (the peer went away or is draining)
            // before it took the request. Once more on a new connection.
            Err(mut e) if e.message().is_some() => {
                let Some(req) = e.take_message() else {
                    return Err(self.request_error(e.into_error()).into());
                };
                tracing::debug!(addr = %self.addr, error = %e.error(), "http/2 connection closed before the request was sent; retrying on a new one");
                let conn = match timed(&mut dialled, self.h2_conn()).await {
                    Ok(c) => c,
                    Err(error) => return Err(unsent(error, req)),
                };
                match self.send_h2(conn, req).await {
                    Ok(rsp) => Ok(connected_in(rsp, dialled)),
                    Err(mut e) => match e.take_message() {
                        Some(req) => Err(unsent(self.request_error(e.into_error()), req)),
                        None => Err(self.request_error(e.into_error()).into()),
                    },
                }
            }
            Err(e) => Err(self.request_error(e.into_error()).into()),
            Ok(rsp) => Ok(connected_in(rsp, dialled)),
        }
    }

    /// Sends on the shared HTTP/2 connection. A connection that failed or is going away (a
    /// `GOAWAY` arrived) leaves the pool, so the next request dials a new one.
    async fn send_h2(
        &self,
        mut conn: http2::SendRequest<BoxBody>,
        req: Request<BoxBody>,
    ) -> Result<Response<PooledBody>, hyper::client::conn::TrySendError<Request<BoxBody>>> {
        match conn.try_send_request(req).await {
            Ok(rsp) => Ok(rsp.map(|b| PooledBody::new(b, PoolReturn::None))),
            Err(e) => {
                if e.message().is_some() || conn.is_closed() || resilience::refused(e.error()) {
                    *lock(&self.shared_h2) = None;
                }
                Err(e)
            }
        }
    }

    async fn h2_conn(&self) -> Result<http2::SendRequest<BoxBody>, ClientError> {
        if let Some(c) = lock(&self.shared_h2).as_ref().filter(|c| !c.is_closed()) {
            return Ok(c.clone());
        }
        let _dialing = self.h2_dial.lock().await;
        if let Some(c) = lock(&self.shared_h2).as_ref().filter(|c| !c.is_closed()) {
            return Ok(c.clone());
        }
        let send = match self.connect(Alpn::H2).await? {
            Conn::Plain(tcp) => self.handshake_h2(TokioIo::new(tcp)).await?,
            // Frames written in one turn of the runtime leave in one TLS record and one write.
            Conn::Tls(tls) => self.handshake_h2(TokioIo::new(Coalesce::new(tls))).await?,
        };
        *lock(&self.shared_h2) = Some(send.clone());
        Ok(send)
    }

    async fn handshake_h2<I>(&self, io: I) -> Result<http2::SendRequest<BoxBody>, ClientError>
    where
        I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    {
        let mut b = http2::Builder::new(TokioExecutor::new());
        b.timer(TokioTimer::new())
            .initial_stream_window_size(super::H2_STREAM_WINDOW)
            .initial_connection_window_size(super::H2_CONNECTION_WINDOW);
        let (send, conn) = b
            .handshake(io)
            .await
            .map_err(|source| self.handshake_error(source))?;
        let addr = self.addr;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(%addr, error = %e, "http/2 client connection ended with an error");
            }
        });
        Ok(send)
    }

    /// A failed HTTP handshake. On a mesh connection this is usually the peer refusing our
    /// certificate: with TLS 1.3 its alert arrives after our side finished the handshake, so it
    /// is counted here.
    fn handshake_error(&self, source: hyper::Error) -> ClientError {
        if let Transport::Mesh(t) = &self.transport {
            let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(&source);
            while let Some(e) = cur {
                if let Some(io) = e.downcast_ref::<std::io::Error>() {
                    if io
                        .get_ref()
                        .is_some_and(|i| i.downcast_ref::<rustls::Error>().is_some())
                    {
                        let reason = mesh::handshake_reason(io);
                        t.handshake_failed(Direction::Outbound, reason);
                        tracing::info!(addr = %self.addr, peer = %t.id, reason, error = %io, "meshed peer refused the connection");
                    }
                    break;
                }
                cur = e.source();
            }
        }
        ClientError::Handshake {
            addr: self.addr,
            source,
        }
    }

    fn checkout(&self) -> Option<http1::SendRequest<BoxBody>> {
        let mut idle = lock(&self.idle);
        while let Some(i) = idle.pop() {
            if !i.conn.is_closed() && i.since.elapsed() < self.idle_timeout() {
                return Some(i.conn);
            }
        }
        None
    }

    fn checkin(&self, conn: http1::SendRequest<BoxBody>) {
        if conn.is_closed() {
            return;
        }
        let mut idle = lock(&self.idle);
        if idle.len() < MAX_IDLE {
            idle.push(Idle {
                conn,
                since: Instant::now(),
            });
        }
    }

    async fn dial_h1(&self) -> Result<http1::SendRequest<BoxBody>, ClientError> {
        match self.connect(Alpn::Http1).await? {
            Conn::Plain(tcp) => self.handshake_h1(TokioIo::new(tcp)).await,
            Conn::Tls(tls) => self.handshake_h1(TokioIo::new(tls)).await,
        }
    }

    async fn handshake_h1<I>(&self, io: I) -> Result<http1::SendRequest<BoxBody>, ClientError>
    where
        I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    {
        let (send, conn) = http1::Builder::new()
            .handshake(io)
            .await
            .map_err(|source| self.handshake_error(source))?;
        let addr = self.addr;
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!(%addr, error = %e, "http/1 client connection ended with an error");
            }
        });
        Ok(send)
    }

    /// Dials the endpoint; a meshed one gets mTLS negotiating `alpn`. Without a valid local
    /// certificate a meshed endpoint is not even dialled (fail closed).
    async fn connect(&self, alpn: Alpn) -> Result<Conn, ClientError> {
        let addr = self.addr;
        let tls_err = |source| ClientError::Tls { addr, source };
        if let Transport::Mesh(t) = &self.transport {
            t.check_certificate().map_err(tls_err)?;
        }
        let tcp = crate::tcp::connect(addr, self.connect_timeout())
            .await
            .map_err(|source| ConnectError { addr, source })?;
        match &self.transport {
            Transport::Plain(opened) => {
                if let Some(c) = opened {
                    c.inc();
                }
                Ok(Conn::Plain(tcp))
            }
            Transport::Mesh(t) => Ok(Conn::Tls(Box::new(
                t.connect(tcp, alpn).await.map_err(tls_err)?,
            ))),
        }
    }
}

/// Runs `f`, adding the time it took to `spent`.
async fn timed<T>(spent: &mut Duration, f: impl std::future::Future<Output = T>) -> T {
    let start = Instant::now();
    let out = f.await;
    *spent += start.elapsed();
    out
}

/// Records on the response how long this request waited for its connection.
fn connected_in(mut rsp: Response<PooledBody>, dialled: Duration) -> Response<PooledBody> {
    rsp.body_mut().connect = dialled;
    rsp
}

/// A dialled connection.
enum Conn {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

/// HTTP/2 needs `:scheme` and `:authority`: a request that came in as HTTP/1 (origin form and
/// `Host`) gets them here, and is marked with [`ORIG_PROTO`] for a meshed peer (`mesh`).
fn to_h2_form(req: &mut Request<BoxBody>, mesh: bool) {
    let from_h1 = req.version() < Version::HTTP_2;
    if req.uri().scheme().is_none() || req.uri().authority().is_none() {
        let mut parts = std::mem::take(req.uri_mut()).into_parts();
        if parts.scheme.is_none() {
            parts.scheme = Some(http::uri::Scheme::HTTP);
        }
        if parts.authority.is_none() {
            parts.authority = req
                .headers()
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
                .and_then(|h| h.parse().ok());
        }
        if parts.path_and_query.is_none() {
            parts.path_and_query = Some(http::uri::PathAndQuery::from_static("/"));
        }
        // The parts came from a valid URI plus a parsed authority, so this cannot fail;
        // if it did, the request goes as it was and h2 reports the problem.
        if let Ok(uri) = Uri::from_parts(parts) {
            *req.uri_mut() = uri;
            req.headers_mut().remove(header::HOST);
        }
    }
    if mesh && from_h1 {
        req.headers_mut().insert(ORIG_PROTO, HTTP11);
    } else {
        req.headers_mut().remove(ORIG_PROTO);
    }
    *req.version_mut() = Version::HTTP_2;
}

/// The parts of a request an endpoint's form changes, as the client sent them: a request
/// handed back unsent gets them back, so the next endpoint sees what the first one saw.
struct ClientForm {
    version: Version,
    uri: Uri,
    host: Option<HeaderValue>,
}

impl ClientForm {
    fn of<B>(req: &Request<B>) -> Self {
        ClientForm {
            version: req.version(),
            uri: req.uri().clone(),
            host: req.headers().get(header::HOST).cloned(),
        }
    }

    fn restore<B>(self, req: &mut Request<B>) {
        *req.version_mut() = self.version;
        *req.uri_mut() = self.uri;
        let headers = req.headers_mut();
        match self.host {
            Some(h) => headers.insert(header::HOST, h),
            None => headers.remove(header::HOST),
        };
        headers.remove(ORIG_PROTO);
    }
}

/// HTTP/1.1 needs the origin form (which every server accepts) and `Host`: a request that came
/// in as HTTP/2 (`:authority`, absolute form) gets them here.
fn to_h1_form(req: &mut Request<BoxBody>) {
    if req.uri().scheme().is_some() || req.uri().authority().is_some() {
        let authority = req.uri().authority().cloned();
        let path = req
            .uri()
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/"));
        *req.uri_mut() = Uri::from(path);
        if !req.headers().contains_key(header::HOST) {
            if let Some(v) = authority.and_then(|a| HeaderValue::from_str(a.as_str()).ok()) {
                req.headers_mut().insert(header::HOST, v);
            }
        }
    }
    req.headers_mut().remove(ORIG_PROTO);
    *req.version_mut() = Version::HTTP_11;
}

/// Closes idle connections older than the idle timeout, until the endpoint is dropped.
async fn sweep_idle(ep: Weak<Endpoint>) {
    loop {
        let period = match ep.upgrade() {
            Some(ep) => (ep.idle_timeout() / 2).max(Duration::from_millis(100)),
            None => return,
        };
        tokio::time::sleep(period).await;
        let Some(ep) = ep.upgrade() else { return };
        let idle_timeout = ep.idle_timeout();
        lock(&ep.idle).retain(|i| !i.conn.is_closed() && i.since.elapsed() < idle_timeout);
    }
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

enum PoolReturn {
    H1 {
        conn: http1::SendRequest<BoxBody>,
        endpoint: Weak<Endpoint>,
    },
    None,
}

pin_project_lite::pin_project! {
    /// A response body that gives its HTTP/1.1 connection back to the pool at its end. A body
    /// dropped before its end takes the connection with it (hyper then closes it), since the
    /// rest of the response would still be on the wire.
    pub struct PooledBody {
        #[pin]
        inner: Incoming,
        back: Option<PoolReturn>,
        connect: Duration,
    }
}

impl std::fmt::Debug for PooledBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PooledBody").finish_non_exhaustive()
    }
}

impl PooledBody {
    fn new(inner: Incoming, back: PoolReturn) -> Self {
        let mut body = Self {
            inner,
            back: Some(back),
            connect: Duration::ZERO,
        };
        if body.inner.is_end_stream() {
            body.release();
        }
        body
    }

    /// How long the request waited for a connection to be made (zero on a pooled one): the
    /// balancer leaves it out of the endpoint's latency estimate.
    pub fn connect_time(&self) -> Duration {
        self.connect
    }

    fn release(&mut self) {
        if let Some(PoolReturn::H1 { conn, endpoint }) = self.back.take() {
            if let Some(ep) = endpoint.upgrade() {
                ep.checkin(conn);
            }
        }
    }
}

impl Body for PooledBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.as_mut().project();
        let polled = this.inner.poll_frame(cx);
        match &polled {
            Poll::Ready(None) => self.release(),
            Poll::Ready(Some(Ok(_))) if self.inner.is_end_stream() => self.release(),
            Poll::Ready(Some(Err(_))) => *self.as_mut().project().back = None,
            _ => {}
        }
        polled.map(|f| f.map(|r| r.map_err(Into::into)))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Endpoints by destination and protocol, for connections without discovery: each goes to
/// its original destination.
#[derive(Debug)]
pub struct Clients {
    connect_timeout: Duration,
    idle_timeout: Duration,
    /// Counts new connections (outbound: `weft_tls_connections_total{tls="not-meshed"}`).
    opened: Option<Counter>,
    endpoints: Mutex<HashMap<(SocketAddr, bool), Arc<Endpoint>>>,
}

impl Clients {
    pub fn new(
        connect_timeout: Duration,
        idle_timeout: Duration,
        opened: Option<Counter>,
    ) -> Arc<Self> {
        Arc::new(Self {
            connect_timeout,
            idle_timeout,
            opened,
            endpoints: Mutex::new(HashMap::new()),
        })
    }

    /// The endpoint for `addr`, speaking HTTP/2 when `h2`.
    pub fn get(&self, addr: SocketAddr, h2: bool) -> Arc<Endpoint> {
        let mut map = lock(&self.endpoints);
        if let Some(c) = map.get(&(addr, h2)) {
            return c.clone();
        }
        if map.len() >= MAX_ENDPOINTS {
            // Idle connections of dropped endpoints close; busy ones finish their requests.
            map.clear();
        }
        let ep = Endpoint::new(
            addr,
            h2,
            self.connect_timeout,
            self.idle_timeout,
            Transport::Plain(self.opened.clone()),
        );
        map.insert((addr, h2), ep.clone());
        ep
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use http_body_util::{BodyExt, Empty};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;

    /// A raw HTTP/1.1 server answering `ok` to each request; with `close_after_each` it closes
    /// the connection after every response without saying so (a keep-alive race).
    async fn server(close_after_each: bool) -> (SocketAddr, Arc<AtomicUsize>) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 4096];
                    let mut have = Vec::new();
                    loop {
                        let n = match s.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => n,
                        };
                        have.extend_from_slice(&buf[..n]);
                        while let Some(end) = have.windows(4).position(|w| w == b"\r\n\r\n") {
                            have.drain(..end + 4);
                            let rsp = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                            if s.write_all(rsp).await.is_err() {
                                return;
                            }
                            if close_after_each {
                                return;
                            }
                        }
                    }
                });
            }
        });
        (addr, accepted)
    }

    fn plain(addr: SocketAddr, h2: bool, idle: Duration) -> Arc<Endpoint> {
        Endpoint::new(
            addr,
            h2,
            Duration::from_secs(1),
            idle,
            Transport::Plain(None),
        )
    }

    fn get() -> Request<BoxBody> {
        Request::get("http://test/")
            .body(Empty::new().map_err(|e| match e {}).boxed())
            .unwrap()
    }

    async fn ok(ep: &Arc<Endpoint>) {
        let rsp = ep.request(get()).await.unwrap();
        assert_eq!(rsp.status(), 200);
        let body = rsp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], b"ok");
    }

    fn req(uri: &str, version: Version, host: Option<&str>) -> Request<BoxBody> {
        let mut b = Request::get(uri).version(version);
        if let Some(h) = host {
            b = b.header(header::HOST, h);
        }
        b.body(Empty::new().map_err(|e| match e {}).boxed())
            .unwrap()
    }

    #[tokio::test]
    async fn requests_take_the_form_of_the_endpoint_protocol() {
        // HTTP/1.1 in, HTTP/2 out: `:scheme`/`:authority` from Host.
        let mut r = req("/a?b=1", Version::HTTP_11, Some("web.ns:8080"));
        to_h2_form(&mut r, false);
        assert_eq!(r.uri(), "http://web.ns:8080/a?b=1");
        assert_eq!(r.version(), Version::HTTP_2);
        assert!(r.headers().get(header::HOST).is_none());
        // A plain peer gets no protocol marker.
        assert!(r.headers().get(ORIG_PROTO).is_none());

        // HTTP/2 in, HTTP/1.1 out: origin form, Host from `:authority`.
        let mut r = req("http://web.ns:8080/a", Version::HTTP_2, None);
        to_h1_form(&mut r);
        assert_eq!(r.uri(), "/a");
        assert_eq!(r.headers()[header::HOST], "web.ns:8080");
        assert_eq!(r.version(), Version::HTTP_11);
        // An existing Host wins; origin-form HTTP/1.0 is upgraded to 1.1 between hops.
        let mut r = req("/x", Version::HTTP_10, Some("h"));
        to_h1_form(&mut r);
        assert_eq!(
            (r.uri().to_string().as_str(), r.version()),
            ("/x", Version::HTTP_11)
        );
        assert_eq!(r.headers()[header::HOST], "h");
    }

    /// What an endpoint receives of a request: everything but the body.
    fn head(r: &Request<BoxBody>) -> String {
        let mut headers: Vec<String> = r
            .headers()
            .iter()
            .map(|(k, v)| format!("{k}: {}", v.to_str().unwrap_or("?")))
            .collect();
        headers.sort();
        format!("{} {} {:?} {headers:?}", r.method(), r.uri(), r.version())
    }

    /// Issue 11: a request handed back unsent (the first endpoint could not be reached) reaches
    /// the next endpoint exactly as it would have reached it first, for every client protocol
    /// and every pair of endpoint kinds (plain HTTP/1.1, plain HTTP/2, meshed HTTP/2).
    #[test]
    fn a_request_retried_elsewhere_has_the_form_it_would_have_had_first() {
        #[derive(Clone, Copy, Debug)]
        enum Kind {
            PlainH1,
            PlainH2,
            Meshed,
        }
        fn put(r: &mut Request<BoxBody>, k: Kind) {
            match k {
                Kind::PlainH1 => to_h1_form(r),
                Kind::PlainH2 => to_h2_form(r, false),
                Kind::Meshed => to_h2_form(r, true),
            }
        }
        let clients: [fn() -> Request<BoxBody>; 4] = [
            || req("/a?b=1", Version::HTTP_11, Some("web.ns:8080")),
            || req("/a", Version::HTTP_10, Some("web.ns")),
            || req("http://web.ns:8080/a", Version::HTTP_2, None),
            || req("https://web.ns/grpc.Svc/Call", Version::HTTP_2, None),
        ];
        let kinds = [Kind::PlainH1, Kind::PlainH2, Kind::Meshed];
        for client in clients {
            for first in kinds {
                for next in kinds {
                    let mut direct = client();
                    put(&mut direct, next);
                    let mut retried = client();
                    let form = ClientForm::of(&retried);
                    put(&mut retried, first);
                    form.restore(&mut retried);
                    put(&mut retried, next);
                    assert_eq!(
                        head(&retried),
                        head(&direct),
                        "{first:?} then {next:?}, client {}",
                        head(&client())
                    );
                }
            }
        }
        // The defect itself: an HTTP/1.1 request tried on one meshed endpoint, then another,
        // still tells the second peer to hand it to its app as HTTP/1.1.
        let mut r = req("/a", Version::HTTP_11, Some("web.ns"));
        let form = ClientForm::of(&r);
        put(&mut r, Kind::Meshed);
        form.restore(&mut r);
        put(&mut r, Kind::Meshed);
        assert_eq!(r.headers()[ORIG_PROTO], "HTTP/1.1");
        // A plain endpoint never sees the marker, whatever came before.
        let mut r = req("/a", Version::HTTP_11, Some("web.ns"));
        put(&mut r, Kind::Meshed);
        put(&mut r, Kind::PlainH1);
        assert!(r.headers().get(ORIG_PROTO).is_none());
    }

    /// The whole path: a request whose meshed endpoint refuses connections comes back from
    /// `try_request` in the client's form.
    #[tokio::test]
    async fn a_request_handed_back_unsent_is_in_the_client_form() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        drop(l);
        let ep = plain(addr, true, Duration::from_secs(60));
        let sent = req("/a?b=1", Version::HTTP_11, Some("web.ns:8080"));
        let before = head(&sent);
        match ep.try_request(sent).await {
            Err(Unsent {
                request: Some(r), ..
            }) => assert_eq!(head(&r), before),
            other => panic!("expected the request back unsent, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn sequential_requests_reuse_one_connection() {
        let (addr, accepted) = server(false).await;
        let ep = plain(addr, false, Duration::from_secs(60));
        for _ in 0..20 {
            ok(&ep).await;
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
        assert_eq!(ep.idle_count(), 1);
    }

    #[tokio::test]
    async fn connections_closed_by_the_server_are_replaced_without_failing_requests() {
        let (addr, accepted) = server(true).await;
        let ep = plain(addr, false, Duration::from_secs(60));
        for _ in 0..50 {
            ok(&ep).await;
        }
        assert!(accepted.load(Ordering::SeqCst) >= 50);
    }

    #[tokio::test]
    async fn idle_connections_are_closed_after_the_idle_timeout() {
        let (addr, _) = server(false).await;
        let ep = plain(addr, false, Duration::from_millis(200));
        ok(&ep).await;
        assert_eq!(ep.idle_count(), 1);
        let deadline = Instant::now() + Duration::from_secs(5);
        while ep.idle_count() > 0 {
            assert!(Instant::now() < deadline, "idle connection never swept");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test]
    async fn refused_connections_are_connect_errors() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        drop(l);
        let ep = plain(addr, false, Duration::from_secs(60));
        match ep.request(get()).await {
            Err(ClientError::Connect(e)) => {
                assert_eq!(e.addr, addr);
                assert_eq!(e.source.kind(), std::io::ErrorKind::ConnectionRefused);
            }
            other => panic!("expected a connect error, got {other:?}"),
        }
    }
}

//! The admin server: `/metrics`, `/ready`, `/live`, `/shutdown`, `/log-level`, `/tap`.
//!
//! It listens on all interfaces so Prometheus can scrape it, but the endpoints that change the
//! proxy (`/shutdown`, `PUT /log-level`) answer only clients on loopback (the pod's own
//! containers).
//!
//! `/tap` streams the requests this proxy handles ([`crate::observe::tap`]): they carry paths,
//! identities and errors, so it answers clients on loopback and, from anywhere else, only a
//! client that proves the authorized identity (the controller's by default,
//! `WEFT_PROXY_TAP_AUTHORIZED_IDENTITY`) with mutual TLS. The port therefore speaks TLS too:
//! a connection whose first byte is a TLS handshake record (0x16) is terminated with the
//! workload certificate by the same [`Mesh`] that terminates inbound mTLS, and the client must
//! present a certificate from the mesh's trust anchors. Everything else is plaintext HTTP/1
//! as before. (Those handshakes are counted with the inbound mTLS connections.)

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, Limited, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use weft_proto::exposition;

use crate::metrics::Metrics;
use crate::observe::tap::{self, Subscription, TapRequest, Taps};
use crate::telemetry::LogHandle;
use crate::transport::mesh::{Alpn, Mesh};

/// Shared state the admin endpoints read.
#[derive(Debug)]
pub struct Admin {
    pub metrics: Arc<Metrics>,
    pub ready: AtomicBool,
    pub shutdown: CancellationToken,
    pub logs: LogHandle,
    /// The identity client's state when identity is configured: not ready without a valid
    /// certificate.
    pub identity: Option<tokio::sync::watch::Receiver<crate::identity::CertState>>,
    /// With discovery: whether the controller has served once since start (not ready before).
    pub controller: Option<tokio::sync::watch::Receiver<crate::discovery::ControllerState>>,
    /// The open taps (also one of the proxy's observe sinks).
    pub taps: Arc<Taps>,
    /// Terminates TLS on the admin port (identity configured), for taps from off the pod.
    pub mesh: Option<Arc<Mesh>>,
    /// The identity allowed to tap over mTLS; `None` without identity (loopback only).
    pub tap_authorized: Option<Arc<str>>,
}

type Body = UnsyncBoxBody<Bytes, Infallible>;

/// How long a client has to send its first byte (and, over TLS, finish the handshake).
const FIRST_BYTE_TIMEOUT: Duration = Duration::from_secs(10);

/// Who is on the other end of an admin connection.
#[derive(Clone, Debug)]
pub struct Caller {
    pub peer: SocketAddr,
    /// The verified identity of a TLS client.
    pub client_id: Option<Arc<str>>,
}

/// Whether `caller` may tap: loopback always; otherwise only over mTLS as `authorized`. The
/// error is the reason given with the 403.
pub fn authorize_tap(caller: &Caller, authorized: Option<&str>) -> Result<(), String> {
    if is_loopback(caller.peer.ip()) {
        return Ok(());
    }
    match (&caller.client_id, authorized) {
        (Some(id), Some(allowed)) if **id == *allowed => Ok(()),
        (Some(id), Some(allowed)) => Err(format!(
            "tap refused: client identity {id} is not authorized; only {allowed} may tap from off the pod\n"
        )),
        (None, Some(allowed)) => Err(format!(
            "tap refused: plaintext client {} (no identity) is not on loopback; connect with mTLS as {allowed}\n",
            caller.peer.ip()
        )),
        (_, None) => Err(format!(
            "tap refused: client {} is not on loopback, and this proxy has no identity to authorize an mTLS client with\n",
            caller.peer.ip()
        )),
    }
}

fn is_loopback(ip: IpAddr) -> bool {
    ip.to_canonical().is_loopback()
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Body> {
    let mut r = Response::new(Full::new(body.into()).boxed_unsync());
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

impl Admin {
    async fn handle(&self, req: Request<Incoming>, caller: &Caller) -> Response<Body> {
        let peer = caller.peer;
        let local_peer = is_loopback(peer.ip());
        match (req.method(), req.uri().path()) {
            (&Method::GET, "/tap") => self.tap(&req, caller),
            (&Method::GET, "/metrics") => {
                let om = match self.metrics.encode_openmetrics() {
                    Ok(t) => t,
                    Err(_) => {
                        return text(
                            StatusCode::INTERNAL_SERVER_ERROR,
                            "encoding metrics failed\n",
                        )
                    }
                };
                let accept = req
                    .headers()
                    .get(header::ACCEPT)
                    .and_then(|v| v.to_str().ok());
                let (body, ct) = exposition::negotiate(accept, om);
                let mut r = text(StatusCode::OK, body);
                r.headers_mut()
                    .insert(header::CONTENT_TYPE, header::HeaderValue::from_static(ct));
                r
            }
            (&Method::GET, "/live") => text(StatusCode::OK, "live\n"),
            (&Method::GET, "/ready") => {
                if self.shutdown.is_cancelled() {
                    text(StatusCode::SERVICE_UNAVAILABLE, "draining\n")
                } else if !self.ready.load(Ordering::Acquire) {
                    text(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "not ready: listeners not bound\n",
                    )
                } else if let Some(Err(why)) = self
                    .identity
                    .as_ref()
                    .map(|rx| rx.borrow().readiness(std::time::SystemTime::now()))
                {
                    text(
                        StatusCode::SERVICE_UNAVAILABLE,
                        format!("not ready: {why}\n"),
                    )
                } else if let Some(crate::discovery::ControllerState::Waiting(why)) =
                    self.controller.as_ref().map(|rx| rx.borrow().clone())
                {
                    text(
                        StatusCode::SERVICE_UNAVAILABLE,
                        format!("not ready: no discovery state yet: {why}\n"),
                    )
                } else {
                    let cert = self.identity.as_ref().and_then(|rx| match &*rx.borrow() {
                        crate::identity::CertState::Ready(c) => Some(format!(
                            "ready: certificate for {} valid until {}\n",
                            c.id,
                            crate::identity::rfc3339(c.not_after)
                        )),
                        _ => None,
                    });
                    text(StatusCode::OK, cert.unwrap_or_else(|| "ready\n".into()))
                }
            }
            (&Method::POST, "/shutdown") if local_peer => {
                tracing::info!(%peer, "shutdown requested on the admin port");
                self.shutdown.cancel();
                text(StatusCode::ACCEPTED, "shutting down\n")
            }
            (&Method::GET, "/log-level") => text(
                StatusCode::OK,
                format!("{}\n", self.logs.current().unwrap_or_default()),
            ),
            (&Method::PUT, "/log-level") if local_peer => {
                let body = match Limited::new(req.into_body(), 4096).collect().await {
                    Ok(b) => b.to_bytes(),
                    Err(e) => return text(StatusCode::BAD_REQUEST, format!("reading body: {e}\n")),
                };
                let filter = String::from_utf8_lossy(&body).trim().to_string();
                match self.logs.set_filter(&filter) {
                    Ok(()) => {
                        tracing::info!(%filter, "log filter changed");
                        text(StatusCode::OK, format!("{filter}\n"))
                    }
                    Err(e) => text(StatusCode::BAD_REQUEST, format!("{e}\n")),
                }
            }
            (_, "/shutdown" | "/log-level") if !local_peer => text(
                StatusCode::FORBIDDEN,
                "this endpoint answers only clients on loopback\n",
            ),
            (_, "/metrics" | "/live" | "/ready" | "/shutdown" | "/log-level" | "/tap") => {
                text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n")
            }
            _ => text(
                StatusCode::NOT_FOUND,
                "not found; try /metrics /ready /live /shutdown /log-level /tap\n",
            ),
        }
    }

    /// `GET /tap?…`: NDJSON, one object per request, until the reader leaves, `max` events
    /// or `duration`.
    fn tap(&self, req: &Request<Incoming>, caller: &Caller) -> Response<Body> {
        if let Err(why) = authorize_tap(caller, self.tap_authorized.as_deref()) {
            tracing::info!(peer = %caller.peer, client_id = ?caller.client_id, "tap refused");
            return text(StatusCode::FORBIDDEN, why);
        }
        let request = match TapRequest::parse_query(req.uri().query()) {
            Ok(r) => r,
            Err(e) => return text(StatusCode::BAD_REQUEST, format!("{e}\n")),
        };
        let sub = match self.taps.open(request.filter.clone()) {
            Ok(s) => s,
            Err(e) => return text(StatusCode::SERVICE_UNAVAILABLE, format!("{e}\n")),
        };
        tracing::info!(peer = %caller.peer, client_id = ?caller.client_id, filter = ?request.filter, "tap opened");
        let state = TapStream {
            sub,
            remaining: request.max,
            deadline: request.duration.map(|d| tokio::time::Instant::now() + d),
            done: false,
        };
        let stream = futures_util::stream::unfold(state, |mut st| async move {
            let chunk = st.next_chunk().await?;
            Some((Ok::<_, Infallible>(Frame::data(chunk)), st))
        });
        let mut r = Response::new(BodyExt::boxed_unsync(StreamBody::new(stream)));
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            header::HeaderValue::from_static("application/x-ndjson"),
        );
        r.headers_mut().insert(
            header::CACHE_CONTROL,
            header::HeaderValue::from_static("no-store"),
        );
        r
    }
}

/// One tap's response body, as it is produced.
struct TapStream {
    sub: Subscription,
    remaining: Option<u64>,
    deadline: Option<tokio::time::Instant>,
    done: bool,
}

/// Events written in one chunk at most.
const BATCH: usize = 64;

impl TapStream {
    /// The next lines: waits for an event, then takes what is already queued; `None` when
    /// the tap is over.
    async fn next_chunk(&mut self) -> Option<Bytes> {
        if self.done {
            return None;
        }
        let deadline = self.deadline;
        let first = tokio::select! {
            ev = self.sub.recv() => ev,
            _ = async {
                match deadline {
                    Some(d) => tokio::time::sleep_until(d).await,
                    None => std::future::pending().await,
                }
            } => None,
        };
        let mut out = String::new();
        let dropped = self.sub.take_dropped();
        if dropped > 0 {
            tap::dropped_line(dropped, &mut out);
            out.push('\n');
        }
        let Some(first) = first else {
            // Over: say what was lost since the last event, if anything.
            self.done = true;
            return (!out.is_empty()).then(|| Bytes::from(out));
        };
        let mut next = Some(first);
        let mut n = 0;
        while let Some(ev) = next {
            tap::json_line(&ev, &mut out);
            out.push('\n');
            n += 1;
            if let Some(r) = &mut self.remaining {
                *r -= 1;
                if *r == 0 {
                    self.done = true;
                    break;
                }
            }
            next = if n < BATCH { self.sub.try_recv() } else { None };
        }
        Some(Bytes::from(out))
    }
}

/// Serves the admin API until the process exits.
pub async fn serve(listener: TcpListener, admin: Arc<Admin>) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "admin accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let admin = admin.clone();
        tokio::spawn(async move { connection(admin, stream, peer).await });
    }
}

/// Serves one admin connection: TLS when it starts with a handshake record, else plaintext.
async fn connection(admin: Arc<Admin>, stream: TcpStream, peer: SocketAddr) {
    let mut first = [0u8; 1];
    let tls = match tokio::time::timeout(FIRST_BYTE_TIMEOUT, stream.peek(&mut first)).await {
        Ok(Ok(1)) => first[0] == 0x16,
        Ok(Ok(_)) | Err(_) => return,
        Ok(Err(e)) => {
            tracing::debug!(%peer, error = %e, "admin connection failed before its first byte");
            return;
        }
    };
    if !tls {
        let caller = Caller {
            peer,
            client_id: None,
        };
        return http(admin, stream, caller, false).await;
    }
    let Some(mesh) = admin.mesh.clone() else {
        tracing::info!(%peer, "TLS on the admin port refused: this proxy has no identity");
        return;
    };
    match mesh.accept(stream).await {
        Ok((tls, accepted)) => {
            let caller = Caller {
                peer,
                client_id: Some(accepted.client_id),
            };
            http(admin, tls, caller, accepted.alpn == Alpn::H2).await
        }
        Err(e) => tracing::info!(%peer, error = %e, "TLS on the admin port refused"),
    }
}

async fn http<I>(admin: Arc<Admin>, io: I, caller: Caller, h2: bool)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let caller = Arc::new(caller);
    let svc = service_fn(move |req| {
        let (admin, caller) = (admin.clone(), caller.clone());
        async move { Ok::<_, Infallible>(admin.handle(req, &caller).await) }
    });
    let io = TokioIo::new(io);
    let result = if h2 {
        hyper::server::conn::http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .serve_connection(io, svc)
            .await
    } else {
        hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(FIRST_BYTE_TIMEOUT)
            .serve_connection(io, svc)
            .await
    };
    if let Err(e) = result {
        tracing::debug!(error = %e, "admin connection error");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tap_authorization_table() {
        let ctl = "spiffe://cluster.local/ns/weft/sa/weft-controller";
        let caller = |peer: &str, id: Option<&str>| Caller {
            peer: peer.parse().unwrap(),
            client_id: id.map(Arc::from),
        };
        for (c, authorized, expect) in [
            (caller("127.0.0.1:1", None), Some(ctl), Ok(())),
            (caller("[::1]:1", None), None, Ok(())),
            (caller("[::ffff:127.0.0.1]:1", None), None, Ok(())),
            (caller("127.0.0.1:1", Some("spiffe://cluster.local/ns/a/sa/b")), Some(ctl), Ok(())),
            (caller("10.0.0.9:1", Some(ctl)), Some(ctl), Ok(())),
            (
                caller("10.0.0.9:1", None),
                Some(ctl),
                Err("tap refused: plaintext client 10.0.0.9 (no identity) is not on loopback; connect with mTLS as spiffe://cluster.local/ns/weft/sa/weft-controller\n"),
            ),
            (
                caller("10.0.0.9:1", Some("spiffe://cluster.local/ns/a/sa/b")),
                Some(ctl),
                Err("tap refused: client identity spiffe://cluster.local/ns/a/sa/b is not authorized; only spiffe://cluster.local/ns/weft/sa/weft-controller may tap from off the pod\n"),
            ),
            (
                caller("10.0.0.9:1", None),
                None,
                Err("tap refused: client 10.0.0.9 is not on loopback, and this proxy has no identity to authorize an mTLS client with\n"),
            ),
        ] {
            assert_eq!(
                authorize_tap(&c, authorized),
                expect.map_err(String::from),
                "{c:?}"
            );
        }
    }
}

//! Connections to destinations: one pooled hyper client per (address, protocol).
//!
//! Each client's connector dials exactly one address, so the pool key is the original
//! destination while the request keeps its own authority (`Host` / `:authority`). HTTP/1
//! connections are kept alive and reused; HTTP/2 connections are shared by concurrent streams.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;

/// How many destination clients are cached before the cache is cleared.
const MAX_CLIENTS: usize = 4096;

/// A connector that dials one address, whatever the URI says.
#[derive(Clone, Debug)]
pub struct FixedConnector {
    addr: SocketAddr,
    timeout: Duration,
}

/// A failed dial, with the address and the cause.
#[derive(Debug, thiserror::Error)]
#[error("connecting to {addr}: {source}")]
pub struct ConnectError {
    pub addr: SocketAddr,
    #[source]
    pub source: std::io::Error,
}

impl tower_service::Service<http::Uri> for FixedConnector {
    type Response = TokioIo<TcpStream>;
    type Error = ConnectError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: http::Uri) -> Self::Future {
        let (addr, timeout) = (self.addr, self.timeout);
        Box::pin(async move {
            let err = |source| ConnectError { addr, source };
            let stream = tokio::time::timeout(timeout, TcpStream::connect(addr))
                .await
                .map_err(|_| err(std::io::ErrorKind::TimedOut.into()))?
                .map_err(err)?;
            stream.set_nodelay(true).map_err(err)?;
            Ok(TokioIo::new(stream))
        })
    }
}

pub type HttpClient = Client<FixedConnector, Incoming>;

/// Clients by destination and protocol.
#[derive(Debug)]
pub struct Clients {
    connect_timeout: Duration,
    idle_timeout: Duration,
    clients: Mutex<HashMap<(SocketAddr, bool), HttpClient>>,
}

impl Clients {
    pub fn new(connect_timeout: Duration, idle_timeout: Duration) -> Arc<Self> {
        Arc::new(Self {
            connect_timeout,
            idle_timeout,
            clients: Mutex::new(HashMap::new()),
        })
    }

    /// The client for `addr`, speaking HTTP/2 when `h2`.
    pub fn get(&self, addr: SocketAddr, h2: bool) -> HttpClient {
        let mut map = match self.clients.lock() {
            Ok(m) => m,
            Err(p) => p.into_inner(),
        };
        if let Some(c) = map.get(&(addr, h2)) {
            return c.clone();
        }
        if map.len() >= MAX_CLIENTS {
            // Idle connections of dropped clients close; busy ones finish their requests.
            map.clear();
        }
        let mut b = Client::builder(TokioExecutor::new());
        b.pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .pool_idle_timeout(self.idle_timeout)
            .http2_only(h2);
        if h2 {
            b.http2_adaptive_window(true);
        }
        let client = b.build(FixedConnector {
            addr,
            timeout: self.connect_timeout,
        });
        map.insert((addr, h2), client.clone());
        client
    }
}

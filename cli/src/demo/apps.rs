//! The demo workloads, run in-process: `books`, a small JSON service with a
//! little latency and the odd failure (1 % of requests answered 503, which the
//! route's retries hide from web), served twice (`books` and `books-v2`), and
//! `web`, its client, an open-loop generator sending a steady request rate.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// How `books` behaves.
#[derive(Debug, Clone)]
pub struct BooksConfig {
    /// Each response waits a uniformly random time in this range (ms).
    pub latency_ms: (u64, u64),
    /// Fraction of requests answered with a 503, as an overloaded or restarting app would.
    pub failure_rate: f64,
}

impl Default for BooksConfig {
    fn default() -> Self {
        Self {
            latency_ms: (1, 5),
            failure_rate: 0.01,
        }
    }
}

const TITLES: [(&str, &str); 5] = [
    ("The Left Hand of Darkness", "Ursula K. Le Guin"),
    ("Kindred", "Octavia E. Butler"),
    ("Solaris", "Stanisław Lem"),
    ("Roadside Picnic", "Arkady and Boris Strugatsky"),
    ("The Dispossessed", "Ursula K. Le Guin"),
];

/// Serve `books` on `listener` until `stop` fires, then let open connections
/// finish their current request (bounded by `drain`).
pub async fn serve_books(
    listener: TcpListener,
    config: BooksConfig,
    stop: CancellationToken,
    drain: Duration,
) {
    let graceful = GracefulShutdown::new();
    let builder = auto::Builder::new(TokioExecutor::new());
    let config = Arc::new(config);
    loop {
        let stream = tokio::select! {
            () = stop.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(error) => {
                    // EMFILE and friends: back off rather than spin.
                    tracing::warn!(%error, "books: accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let config = config.clone();
        let service = service_fn(move |req| books_handler(req, config.clone()));
        let conn = builder.serve_connection(TokioIo::new(stream), service);
        let conn = graceful.watch(conn.into_owned());
        tokio::spawn(async move {
            if let Err(error) = conn.await {
                tracing::debug!(%error, "books: connection ended with an error");
            }
        });
    }
    if tokio::time::timeout(drain, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::debug!("books: connections still open after the drain period");
    }
}

async fn books_handler(
    req: Request<Incoming>,
    config: Arc<BooksConfig>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let (lo, hi) = config.latency_ms;
    tokio::time::sleep(Duration::from_millis(fastrand::u64(lo..=hi.max(lo)))).await;
    if fastrand::f64() < config.failure_rate {
        return Ok(json(
            StatusCode::SERVICE_UNAVAILABLE,
            &serde_json::json!({ "error": "the shelf collapsed (simulated failure)" }),
        ));
    }
    let path = req.uri().path();
    let book = path
        .strip_prefix("/books/")
        .and_then(|id| id.parse::<usize>().ok())
        .and_then(|id| Some((id, TITLES.get(id.checked_sub(1)?)?)));
    Ok(match (path, book) {
        ("/books", _) | ("/books/", _) => json(
            StatusCode::OK,
            &serde_json::json!(TITLES
                .iter()
                .enumerate()
                .map(|(i, (title, author))| serde_json::json!({"id": i + 1, "title": title, "author": author}))
                .collect::<Vec<_>>()),
        ),
        (_, Some((id, (title, author)))) => json(
            StatusCode::OK,
            &serde_json::json!({ "id": id, "title": title, "author": author }),
        ),
        _ => json(
            StatusCode::NOT_FOUND,
            &serde_json::json!({ "error": "no such book" }),
        ),
    })
}

fn json(status: StatusCode, body: &serde_json::Value) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body.to_string())));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    resp
}

/// Where and how fast `web` sends.
#[derive(Debug, Clone)]
pub struct TrafficConfig {
    /// The address web's connections go to: the client proxy's outbound
    /// listener, standing in for an iptables redirect.
    pub connect_to: SocketAddr,
    /// The Host header, naming the service as an app in a cluster would.
    pub authority: String,
    pub rps: u32,
    pub request_timeout: Duration,
    /// Requests in flight beyond this are not sent (and counted as skipped)
    /// so that a stalled proxy cannot make the generator grow without bound.
    pub max_in_flight: usize,
}

/// What `web` saw, from its own side of the proxies.
#[derive(Debug, Default)]
pub struct TrafficCounts {
    pub sent: AtomicU64,
    pub ok: AtomicU64,
    pub server_errors: AtomicU64,
    pub other_status: AtomicU64,
    pub failed: AtomicU64,
    pub skipped: AtomicU64,
}

impl TrafficCounts {
    pub fn summary(&self) -> String {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        format!(
            "web sent {} requests: {} 2xx, {} 5xx, {} other status, {} failed without a response{}",
            get(&self.sent),
            get(&self.ok),
            get(&self.server_errors),
            get(&self.other_status),
            get(&self.failed),
            match get(&self.skipped) {
                0 => String::new(),
                n => format!(", {n} not sent (too many in flight)"),
            }
        )
    }
}

/// Send `GET /books/<n>` at `config.rps` until `stop` fires, then wait (up to
/// the request timeout) for requests in flight.
///
/// Open loop: a request is due every `1/rps` seconds whether or not earlier
/// ones have answered, as real clients behave, so proxy latency shows up as
/// latency instead of as a lower rate.
pub async fn generate_traffic(
    config: TrafficConfig,
    counts: Arc<TrafficCounts>,
    stop: CancellationToken,
) {
    let client: Client<HttpConnector, Empty<Bytes>> = {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(config.request_timeout));
        Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .build(connector)
    };
    let limit = Arc::new(Semaphore::new(config.max_in_flight));
    let tracker = TaskTracker::new();
    let period = Duration::from_secs_f64(1.0 / f64::from(config.rps.max(1)));
    let mut ticker = tokio::time::interval(period);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut n: u64 = 0;
    loop {
        tokio::select! {
            () = stop.cancelled() => break,
            _ = ticker.tick() => {}
        }
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            counts.skipped.fetch_add(1, Ordering::Relaxed);
            continue;
        };
        n += 1;
        let uri = format!(
            "http://{}/books/{}",
            config.connect_to,
            n % TITLES.len() as u64 + 1
        );
        let request = Request::get(uri)
            .header(header::HOST, config.authority.as_str())
            .header(header::USER_AGENT, "weft-demo-web")
            .body(Empty::new());
        let request = match request {
            Ok(r) => r,
            Err(error) => {
                // Only a bad --authority could do this; say so once per request.
                tracing::warn!(%error, "web: could not build a request");
                counts.failed.fetch_add(1, Ordering::Relaxed);
                continue;
            }
        };
        counts.sent.fetch_add(1, Ordering::Relaxed);
        let client = client.clone();
        let counts = counts.clone();
        let timeout = config.request_timeout;
        tracker.spawn(async move {
            let _permit = permit;
            let outcome = tokio::time::timeout(timeout, async {
                let resp = client.request(request).await?;
                let status = resp.status();
                // Read the body so the connection goes back to the pool.
                resp.into_body().collect().await?;
                Ok::<_, Box<dyn std::error::Error + Send + Sync>>(status)
            })
            .await;
            let counter = match outcome {
                Ok(Ok(s)) if s.is_success() => &counts.ok,
                Ok(Ok(s)) if s.is_server_error() => &counts.server_errors,
                Ok(Ok(_)) => &counts.other_status,
                Ok(Err(error)) => {
                    tracing::debug!(%error, "web: request failed");
                    &counts.failed
                }
                Err(_) => {
                    tracing::debug!(?timeout, "web: request timed out");
                    &counts.failed
                }
            };
            counter.fetch_add(1, Ordering::Relaxed);
        });
    }
    tracker.close();
    if tokio::time::timeout(config.request_timeout, tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!("web: requests still in flight at shutdown were abandoned");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn start_books(config: BooksConfig) -> (SocketAddr, CancellationToken) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let stop = CancellationToken::new();
        tokio::spawn(serve_books(
            listener,
            config,
            stop.clone(),
            Duration::from_secs(1),
        ));
        (addr, stop)
    }

    async fn get(addr: SocketAddr, path: &str) -> (StatusCode, serde_json::Value) {
        let client: Client<HttpConnector, Empty<Bytes>> =
            Client::builder(TokioExecutor::new()).build(HttpConnector::new());
        let resp = client
            .get(format!("http://{addr}{path}").parse().expect("uri"))
            .await
            .expect("response");
        let status = resp.status();
        let body = resp.into_body().collect().await.expect("body").to_bytes();
        (status, serde_json::from_slice(&body).expect("json"))
    }

    #[tokio::test]
    async fn books_answers_json() {
        let (addr, stop) = start_books(BooksConfig {
            latency_ms: (0, 0),
            failure_rate: 0.0,
        })
        .await;
        let (status, body) = get(addr, "/books/2").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body["title"], "Kindred");
        let (status, body) = get(addr, "/books").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body.as_array().map(Vec::len), Some(TITLES.len()));
        let (status, _) = get(addr, "/books/0").await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        stop.cancel();
    }

    #[tokio::test]
    async fn books_fails_at_the_configured_rate() {
        let (addr, stop) = start_books(BooksConfig {
            latency_ms: (0, 0),
            failure_rate: 1.0,
        })
        .await;
        let (status, body) = get(addr, "/books/1").await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(body["error"].is_string());
        stop.cancel();
    }

    #[tokio::test]
    async fn web_sends_at_the_requested_rate_and_stops() {
        let (addr, books_stop) = start_books(BooksConfig {
            latency_ms: (0, 1),
            failure_rate: 0.0,
        })
        .await;
        let counts = Arc::new(TrafficCounts::default());
        let stop = CancellationToken::new();
        let task = tokio::spawn(generate_traffic(
            TrafficConfig {
                connect_to: addr,
                authority: "books.demo.svc.cluster.local:8080".into(),
                rps: 100,
                request_timeout: Duration::from_secs(2),
                max_in_flight: 64,
            },
            counts.clone(),
            stop.clone(),
        ));
        tokio::time::sleep(Duration::from_millis(500)).await;
        stop.cancel();
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("generator stops")
            .expect("no panic");
        let sent = counts.sent.load(Ordering::Relaxed);
        let ok = counts.ok.load(Ordering::Relaxed);
        // ~50 due in 0.5 s; allow for a slow machine.
        assert!((20..=60).contains(&sent), "sent {sent}");
        assert_eq!(ok, sent, "{}", counts.summary());
        books_stop.cancel();
    }
}

//! What tower layers would cost on the outbound request path, measured against the plain async
//! functions `http/outbound.rs` uses (its module docs cite this): a request timeout over a
//! retry policy with a budget over one attempt that answers at once, on a current-thread
//! runtime like the proxy's.
//!
//! - `plain`: `tokio::time::timeout` around an async loop that deposits in the budget, makes
//!   one attempt and asks the (pure) retry decision whether to go again: the shape of
//!   `ConnCtx::send_planned` / `attempts`.
//! - `tower`: `ServiceBuilder::new().timeout(..).retry(policy)` over a `service_fn`, called
//!   with `oneshot` on a clone of the stack (a stack shared by connections is cloned per
//!   request, since `Retry` needs `&mut self`), with a `tower::retry::Policy` that deposits
//!   in the same budget and clones the request head for a possible retry.
//!
//! Run: `cargo bench -p weft-proxy --bench layers` (add `-- --iterations N`). Prints ns per
//! request for both and their ratio; no attempt is ever retried, as on the hot path.

use std::future::{ready, Ready};
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::{Request, Response, StatusCode};
use tower::retry::Policy;
use tower::{service_fn, Service, ServiceBuilder, ServiceExt};
use weft_proxy::resilience::retry::{Budget, BudgetConfig, Outcome, RetryConfig};

type Req = Request<()>;
type Rsp = Response<()>;

async fn attempt(req: Req) -> Result<Rsp, std::convert::Infallible> {
    let mut rsp = Response::new(());
    *rsp.status_mut() = if req.headers().is_empty() {
        StatusCode::OK
    } else {
        StatusCode::NO_CONTENT
    };
    Ok(rsp)
}

fn request() -> Req {
    Request::get("http://books.demo.svc.cluster.local:8080/books/1")
        .header("user-agent", "bench")
        .header("accept", "*/*")
        .body(())
        .unwrap_or_default()
}

async fn plain(req: Req, retry: &RetryConfig, budget: &Budget, timeout: Duration) -> Rsp {
    let work = async {
        budget.deposit();
        let mut done = 0;
        let mut req = req;
        loop {
            let next = Request::builder()
                .method(req.method().clone())
                .uri(req.uri().clone())
                .body(())
                .unwrap_or_default();
            let rsp = match attempt(req).await {
                Ok(r) => r,
                Err(e) => match e {},
            };
            let outcome = Outcome::Answered {
                status: rsp.status().as_u16(),
                grpc: None,
            };
            if !retry.retries(outcome, done) || !budget.withdraw() {
                return rsp;
            }
            done += 1;
            req = next;
        }
    };
    match tokio::time::timeout(timeout, work).await {
        Ok(r) => r,
        Err(_) => Response::new(()),
    }
}

#[derive(Clone)]
struct RetryPolicy {
    retry: Arc<RetryConfig>,
    budget: Arc<Budget>,
    done: u32,
}

impl Policy<Req, Rsp, std::convert::Infallible> for RetryPolicy {
    type Future = Ready<()>;

    fn retry(
        &mut self,
        _req: &mut Req,
        result: &mut Result<Rsp, std::convert::Infallible>,
    ) -> Option<Self::Future> {
        let Ok(rsp) = result else { return None };
        let outcome = Outcome::Answered {
            status: rsp.status().as_u16(),
            grpc: None,
        };
        if !self.retry.retries(outcome, self.done) || !self.budget.withdraw() {
            return None;
        }
        self.done += 1;
        Some(ready(()))
    }

    fn clone_request(&mut self, req: &Req) -> Option<Req> {
        if self.done == 0 {
            self.budget.deposit();
        }
        Request::builder()
            .method(req.method().clone())
            .uri(req.uri().clone())
            .body(())
            .ok()
    }
}

fn main() {
    let iterations: u64 = std::env::args()
        .skip_while(|a| a != "--iterations")
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or(1_000_000);
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("runtime: {e}");
            return;
        }
    };
    let retry = Arc::new(RetryConfig {
        attempts: 2,
        codes: vec![503],
        grpc_codes: 0,
        backoff: Duration::ZERO,
    });
    let budget = Arc::new(Budget::new(BudgetConfig::default()));
    let timeout = Duration::from_secs(10);
    let stack = ServiceBuilder::new()
        .timeout(timeout)
        .retry(RetryPolicy {
            retry: retry.clone(),
            budget: budget.clone(),
            done: 0,
        })
        .service(service_fn(attempt));

    rt.block_on(async {
        let mut results = Vec::new();
        // Interleaved rounds, so neither gets a warmer cache or a quieter machine.
        for round in 0..6 {
            let start = Instant::now();
            for _ in 0..iterations {
                let rsp = plain(request(), &retry, &budget, timeout).await;
                std::hint::black_box(rsp);
            }
            let plain_ns = start.elapsed().as_nanos() as f64 / iterations as f64;
            let start = Instant::now();
            for _ in 0..iterations {
                let mut svc = stack.clone();
                let rsp = match svc.ready().await {
                    Ok(s) => s.call(request()).await,
                    Err(e) => Err(e),
                };
                std::hint::black_box(rsp.ok());
            }
            let tower_ns = start.elapsed().as_nanos() as f64 / iterations as f64;
            if round > 0 {
                results.push((plain_ns, tower_ns));
            }
        }
        results.sort_by(|a, b| (a.1 / a.0).total_cmp(&(b.1 / b.0)));
        let (p, t) = results[results.len() / 2];
        println!(
            "timeout + retry (budget) + one attempt, {iterations} requests x 5 rounds (median):"
        );
        println!("  plain async functions: {p:.0} ns/request");
        println!("  tower Timeout + Retry: {t:.0} ns/request ({:.2}x)", t / p);
    });
}

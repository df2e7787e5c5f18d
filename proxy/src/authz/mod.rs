//! Inbound authorization: who may connect to, and send requests to, this workload's ports.
//!
//! The controller's `Policy.ServerPolicy` stream gives each inbound port a
//! [`ServerPolicy`] ([`client`], compiled once per update by [`policy::compile`]); the
//! decision is a pure function of the policy, the client (its verified mesh identity and
//! address) and, for HTTP, the request ([`decide`]). Without a controller, or before it
//! answered, a port has the proxy's fallback: `WEFT_PROXY_INBOUND_DEFAULT_POLICY`
//! (`all-unauthenticated` unless set, the cluster default).
//!
//! Where it is enforced (`serve.rs`, `http/mod.rs`):
//! - opaque TCP, TLS passed through, and mTLS carrying opaque TCP: once, when the connection
//!   is accepted (the identity is the client's mTLS identity when the proxy terminated it,
//!   else none); a denied connection is reset;
//! - HTTP: per request, on the connection's current policy (a change applies to the next
//!   request of open connections): 403 `unauthorized` (gRPC: `PERMISSION_DENIED`), or 404
//!   `no-route` when the server has routes and none matches;
//! - audit: allowed, counted as `audit_deny`, and logged at info once per (server, client)
//!   per minute.
//!
//! A policy change reaches new connections and requests as soon as the stream delivers it;
//! opaque TCP connections already accepted are not cut. The admin port is another listener
//! and never subject to policy; kubelet probes are allowed by the controller's
//! `default:probe` authorization.
//!
//! Per request, the allow path allocates nothing: the decision borrows from the policy, and
//! the decision's counter is cached per connection. A port whose policy allows everyone with
//! no routes (the `all-unauthenticated` fallback) is decided by one branch.

pub mod client;
pub mod decide;
pub mod network;
pub mod policy;

use std::collections::HashSet;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use tokio::sync::watch;

pub use decide::{Client, Decision};
pub use policy::{DefaultPolicy, ServerPolicy};

use crate::follow::{StreamMetrics, StreamNames};

/// Distinct client identities in `weft_inbound_authz_total{client_id}` before new ones are
/// counted as `overflow`.
pub const MAX_CLIENT_IDS: usize = 256;

/// Denials and audit denials are logged once per (server, client) per this window.
pub const LOG_WINDOW: Duration = Duration::from_secs(60);

/// (server, client) pairs remembered per window; beyond, nothing more is logged until it ends.
const MAX_LOGGED: usize = 1024;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AuthzLabels {
    /// `server/<ns>/<name>` or `default:<policy>`.
    pub server: Arc<str>,
    /// The matched inbound route, or empty.
    pub route: Arc<str>,
    /// The authorization that allowed, or empty.
    pub authorization: Arc<str>,
    /// The client's mesh identity (bounded), or empty.
    pub client_id: Arc<str>,
    /// `allow`, `deny`, `audit_deny`.
    pub result: &'static str,
}

/// Decisions and the ServerPolicy streams.
#[derive(Clone, Debug, Default)]
pub struct AuthzMetrics {
    pub decisions: Family<AuthzLabels, Counter>,
    pub streams: StreamMetrics,
}

impl AuthzMetrics {
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "weft_inbound_authz",
            "Inbound authorization decisions (connections and HTTP requests) by server, route, authorization, client identity and result: allow, deny, audit_deny (allowed in audit mode, denied if enforced)",
            self.decisions.clone(),
        );
        self.streams.register_as(
            registry,
            StreamNames {
                streams: (
                    "weft_inbound_policy_streams",
                    "Inbound ports whose ServerPolicy the proxy currently follows",
                ),
                connects: (
                    "weft_inbound_policy_stream_connects",
                    "ServerPolicy streams opened to the controller (including reconnects)",
                ),
                errors: (
                    "weft_inbound_policy_stream_errors",
                    "ServerPolicy streams that failed or could not be opened",
                ),
                updates: (
                    "weft_inbound_policy_updates",
                    "Inbound policies received from the controller",
                ),
                problems: (
                    "weft_inbound_policy_problems",
                    "Authorizations or routes of received inbound policies left out because they did not convert",
                ),
            },
        );
    }
}

/// Where a port's policy comes from.
#[derive(Clone, Debug)]
pub enum PolicyRx {
    /// No controller: the fallback, for good.
    Fixed(Arc<ServerPolicy>),
    Watch(watch::Receiver<Arc<ServerPolicy>>),
}

impl PolicyRx {
    /// The policy now.
    pub fn current(&self) -> Arc<ServerPolicy> {
        match self {
            PolicyRx::Fixed(p) => p.clone(),
            PolicyRx::Watch(rx) => rx.borrow().clone(),
        }
    }
}

/// (server, client label, result) logged in the current window, and when it started.
type Logged = (Instant, HashSet<(Arc<str>, Arc<str>, &'static str)>);

/// The proxy's inbound authorization: policies by port, metrics, the log limiter.
#[derive(Debug)]
pub struct Authz {
    fallback: Arc<ServerPolicy>,
    policies: Option<client::ServerPolicies>,
    metrics: AuthzMetrics,
    /// Client identities admitted as `client_id` label values.
    clients: Mutex<HashSet<Arc<str>>>,
    /// The `client_id` of clients without an identity, and of those beyond the bound.
    no_client: Arc<str>,
    overflow: Arc<str>,
    /// (server, client, result) logged in the current window, and when it started.
    logged: Mutex<Logged>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Authz {
    /// `policies`: the ServerPolicy client when a controller is configured; without one,
    /// every port has the `fallback` policy ([`ServerPolicy::fallback`] of
    /// `WEFT_PROXY_INBOUND_DEFAULT_POLICY`).
    pub fn new(
        fallback: Arc<ServerPolicy>,
        policies: Option<client::ServerPolicies>,
        metrics: AuthzMetrics,
    ) -> Arc<Self> {
        Arc::new(Self {
            fallback,
            policies,
            metrics,
            clients: Mutex::new(HashSet::new()),
            no_client: Arc::from(""),
            overflow: Arc::from("overflow"),
            logged: Mutex::new((Instant::now(), HashSet::new())),
        })
    }

    /// The fallback policy.
    pub fn fallback(&self) -> &Arc<ServerPolicy> {
        &self.fallback
    }

    /// The policy of inbound `port`, waiting (up to the discovery timeout) for the
    /// controller's first answer about a port new to this proxy.
    pub async fn policy(&self, port: u16) -> PolicyRx {
        match &self.policies {
            None => PolicyRx::Fixed(self.fallback.clone()),
            Some(p) => PolicyRx::Watch(p.ready(port).await),
        }
    }

    /// One connection's authorization state: its policy and its client.
    pub fn conn(
        self: &Arc<Self>,
        policy: PolicyRx,
        client_id: Option<Arc<str>>,
        ip: IpAddr,
    ) -> Conn {
        let label = match &client_id {
            None => self.no_client.clone(),
            Some(id) => {
                let mut clients = lock(&self.clients);
                match clients.get(id) {
                    Some(l) => l.clone(),
                    None if clients.len() < MAX_CLIENT_IDS => {
                        clients.insert(id.clone());
                        id.clone()
                    }
                    None => self.overflow.clone(),
                }
            }
        };
        Conn {
            authz: self.clone(),
            policy,
            client_id,
            ip: ip.to_canonical(),
            label,
            cached: Mutex::new(None),
        }
    }

    /// Logs a denial or audit denial once per (server, client, result) per [`LOG_WINDOW`].
    fn log_once(&self, policy: &ServerPolicy, d: &Decision<'_>, conn: &Conn, what: &str) {
        {
            let mut logged = lock(&self.logged);
            if logged.0.elapsed() >= LOG_WINDOW {
                *logged = (Instant::now(), HashSet::new());
            }
            if logged.1.len() >= MAX_LOGGED
                || !logged
                    .1
                    .insert((policy.server.clone(), conn.label.clone(), d.result()))
            {
                return;
            }
        }
        let client = conn.client_id.as_deref().unwrap_or("-");
        let route = d.route().map_or("-", |r| &**r);
        match d {
            Decision::AuditDeny { .. } => {
                tracing::info!(server = %policy.server, route, client_id = client, client_ip = %conn.ip, what, "inbound authorization (audit): would be denied, allowed (logged once per server and client per minute)")
            }
            _ => {
                tracing::info!(server = %policy.server, route, client_id = client, client_ip = %conn.ip, what, "inbound authorization: denied (logged once per server and client per minute)")
            }
        }
    }
}

/// What one connection's decisions need.
#[derive(Debug)]
pub struct Conn {
    authz: Arc<Authz>,
    policy: PolicyRx,
    client_id: Option<Arc<str>>,
    ip: IpAddr,
    /// The `client_id` label (bounded).
    label: Arc<str>,
    /// The last decision's counter: (policy, authorization, route, result) → counter. The
    /// policy is held so the addresses compared stay its own.
    cached: Mutex<Option<Cached>>,
}

#[derive(Debug)]
struct Cached {
    policy: Arc<ServerPolicy>,
    authorization: usize,
    route: usize,
    result: &'static str,
    counter: Counter,
}

fn addr(s: Option<&Arc<str>>) -> usize {
    s.map_or(0, |s| Arc::as_ptr(s) as *const u8 as usize)
}

impl Conn {
    /// The port's policy now.
    pub fn policy(&self) -> Arc<ServerPolicy> {
        self.policy.current()
    }

    pub fn client(&self) -> Client<'_> {
        Client {
            id: self.client_id.as_deref(),
            ip: self.ip,
        }
    }

    /// Decides the connection itself (opaque TCP), counts and logs it: whether it is
    /// allowed, and why not.
    pub fn decide_connection(&self) -> (bool, Option<String>) {
        let policy = self.policy();
        let d = decide::connection(&policy, &self.client());
        self.record(&policy, &d, "connection");
        let allowed = d.is_allowed();
        let detail = (!allowed).then(|| decide::deny_detail(&policy, None, &self.client()));
        (allowed, detail)
    }

    /// Counts `d` (no-route answers are routing, not authorization: not counted) and logs
    /// denials once per window.
    pub fn record(&self, policy: &Arc<ServerPolicy>, d: &Decision<'_>, what: &str) {
        if matches!(d, Decision::NoRoute) {
            return;
        }
        let (authorization, route, result) = (addr(d.authorization()), addr(d.route()), d.result());
        {
            let mut cached = lock(&self.cached);
            if let Some(c) = &*cached {
                if Arc::ptr_eq(&c.policy, policy)
                    && c.authorization == authorization
                    && c.route == route
                    && c.result == result
                {
                    c.counter.inc();
                    return self.log(policy, d, what);
                }
            }
            let empty = || Arc::<str>::from("");
            let counter = self
                .authz
                .metrics
                .decisions
                .get_or_create(&AuthzLabels {
                    server: policy.server.clone(),
                    route: d.route().cloned().unwrap_or_else(empty),
                    authorization: d.authorization().cloned().unwrap_or_else(empty),
                    client_id: self.label.clone(),
                    result,
                })
                .clone();
            counter.inc();
            *cached = Some(Cached {
                policy: policy.clone(),
                authorization,
                route,
                result,
                counter,
            });
        }
        self.log(policy, d, what)
    }

    fn log(&self, policy: &ServerPolicy, d: &Decision<'_>, what: &str) {
        if !matches!(d, Decision::Allow { .. }) {
            self.authz.log_once(policy, d, self, what);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decisions_are_counted_with_bounded_client_ids() {
        let metrics = AuthzMetrics::default();
        let authz = Authz::new(
            Arc::new(ServerPolicy::fallback(DefaultPolicy::AllAuthenticated)),
            None,
            metrics.clone(),
        );
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let mut last = None;
        for i in 0..MAX_CLIENT_IDS + 5 {
            let id: Arc<str> = Arc::from(format!("spiffe://cluster.local/ns/a/sa/s{i}"));
            let conn = authz.conn(PolicyRx::Fixed(authz.fallback().clone()), Some(id), ip);
            assert!(conn.decide_connection().0);
            last = Some(conn);
        }
        let conn = last.unwrap();
        assert_eq!(&*conn.label, "overflow");
        // The cached counter keeps counting on the same connection.
        assert!(conn.decide_connection().0);
        let plain = authz.conn(PolicyRx::Fixed(authz.fallback().clone()), None, ip);
        let (allowed, detail) = plain.decide_connection();
        assert!(!allowed);
        assert_eq!(
            detail.unwrap(),
            "default:all-authenticated: no authorization allows unauthenticated client 10.0.0.1"
        );
        let get = |client_id: &str, result: &'static str, authorization: &str| {
            metrics
                .decisions
                .get_or_create(&AuthzLabels {
                    server: Arc::from("default:all-authenticated"),
                    route: Arc::from(""),
                    authorization: Arc::from(authorization),
                    client_id: Arc::from(client_id),
                    result,
                })
                .get()
        };
        assert_eq!(get("overflow", "allow", "default:all-authenticated"), 6);
        assert_eq!(
            get(
                "spiffe://cluster.local/ns/a/sa/s0",
                "allow",
                "default:all-authenticated"
            ),
            1
        );
        assert_eq!(get("", "deny", ""), 1);
    }
}

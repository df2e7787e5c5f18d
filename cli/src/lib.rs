//! `weft`, the command a Weft user types.
//!
//! `weft demo` runs a mesh on loopback (in-process apps: web and two versions
//! of books, a `weft-proxy` child for each and a `weft-controller` with a
//! development CA, the proxies talking mutual TLS, web's traffic to books
//! under an HTTPRoute with retries and a BackendPolicy) and shows live golden
//! metrics, the route's split and retries, and the mesh's security state read
//! from the proxies' admin endpoints; `weft inject`
//! patches manifests offline; `weft stat` shows golden signals per
//! deployment, service, route or pod. `install` and `check` will join them.
//!
//! The binary (`src/main.rs`) only parses arguments and sets up logging; the
//! work lives here:
//!
//! - [`demo`]: the demo's apps, proxy processes and live table.
//! - [`inject`]: `weft inject`, the injector's patch over manifests, offline.
//! - [`policy`]: `weft policy explain`, NetworkPolicy verdicts from the
//!   model's reference evaluator over the controller's sources, and the
//!   mesh's authorization verdict from the proxy's own decision.
//! - [`audit`]: `weft policy audit`, least-privilege AuthorizationPolicies
//!   and NetworkPolicies from the proxies' decision counters and the CNI's flows.
//! - [`promtext`]: a parser for the Prometheus text format the proxies serve.
//! - [`stat`]: `weft stat`, golden signals from Prometheus or the proxies.
//! - [`stats`]: rates, success rates and latency quantiles from two scrapes,
//!   shared by the demo's table and `weft stat`.
//! - [`routes`]: a route's split, success after retries, retries and budget
//!   refusals from a client proxy's scrape.
//! - [`tap`]: `weft tap`, the live request streams of chosen proxies.
//! - [`security`]: mTLS connections and peer identities, handshake failures
//!   and certificate lifetimes from a scrape.

pub mod agent_http;
pub mod audit;
pub mod check;
pub mod cni;
pub mod demo;
pub mod inject;
pub mod policy;
pub mod promtext;
pub mod routes;
pub mod security;
pub mod stat;
pub mod stats;
pub mod tap;

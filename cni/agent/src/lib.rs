//! The CNI node agent (`weft-cni-agent`): registers the pods the `weft-cni` plugin wires,
//! keeps each one's NetworkPolicy in the eBPF datapath's maps, and serves metrics and a live
//! flow stream.
//!
//! ```text
//!  weft-cni (ADD/DEL/CHECK/GC) ──unix socket──▶ agent::Agent ──▶ endpoints::Core ──▶ datapath maps
//!  source (kube | dir:) ──▶ Index ──generation──▶ sync loop ─────────┘   (+ attach/detach)
//!  weft_flows ring buffer ──▶ flows::run_reader ──broadcast──▶ GET /flows (loopback)
//!  weft_counters, weft_drops ──(at scrape)──▶ metrics ──▶ GET /metrics
//! ```
//!
//! - [`policy`]: pure: the World with the local endpoints overlaid, stable policy ids, the
//!   compiled entries plus the node's own addresses.
//! - [`registry`]: the endpoints and policy ids, persisted atomically in `--state-dir`.
//! - [`endpoints`]: ADD/DEL/CHECK/GC and the sync, generic over [`dataplane::Dataplane`]
//!   (the real datapath, or [`dataplane::FakeDataplane`] in tests).
//! - [`routing`]: routes to the other nodes' pod CIDRs (direct, or VXLAN with the overlay
//!   program), and the pods' MTU in the ADD answer.
//! - [`pod_cidrs`]: this node's own pod CIDRs for the plugin's `node` request (host-local's
//!   `"subnet": "usePodCidr"`).
//! - [`services`]: the Services and EndpointSlices as datapath frontends and backends.
//! - [`agent`], [`http`], [`flows`], [`metrics`], [`run`]: the process around it.

pub mod agent;
pub mod config;
pub mod dataplane;
pub mod endpoints;
pub mod flows;
pub mod http;
pub mod metrics;
pub mod pod_cidrs;
pub mod policy;
pub mod registry;
pub mod routing;
pub mod run;
pub mod services;
pub mod status;

pub use config::Config;

//! The eBPF datapath of Weft's CNI: NetworkPolicy enforced on each pod's host-side veth, and
//! Services (ClusterIP, NodePort) translated there instead of by kube-proxy.
//!
//! The C programs live in `cni/bpf/` (one object, `weft_lxc.o`, compiled by `build.rs` with
//! `clang -target bpf` and embedded here); this crate loads them with aya, pins programs,
//! maps and links under a bpffs directory ([`DEFAULT_PIN_DIR`]), attaches them to host veths
//! and fills the maps. See `cni/datapath/README.md` for the maps, the lookup and how to
//! inspect a running node with bpftool.
//!
//! ```text
//!            pod netns                 │ host netns
//!   eth0 ── veth ──────────────────────┼── host veth (tcx)
//!                                      │   ingress: from_pod  → Service translation, the pod's egress policy
//!                                      │   egress:  to_pod    → the pod's ingress policy, replies from the Service
//! ```
//!
//! - [`Datapath::open`] loads or reuses what is pinned (an agent restart keeps all policy);
//!   [`Datapath::attach`] / [`Datapath::detach`] manage an interface; [`unpin_all`] removes
//!   everything.
//! - [`PolicyMaps`] is the map writer the agent programs against; [`FakeMaps`] is its
//!   in-memory twin for unit tests, deciding with [`evaluate`], the same lookup as the C.
//! - [`FlowReader`] streams [`FlowEvent`]s from the ring buffer.
//! - [`ServiceMaps`] writes the Services' frontends and their ready backends (new first, stale
//!   after, each backend set replaced atomically); [`nodeport::NodePort`] serves NodePort
//!   frontends on the node's external interface.
//!
//! Policy changes apply to new connections; established ones keep their conntrack entry
//! until it expires (TCP 1 h idle, 10 s after close; others 60 s) unless
//! [`PolicyMaps::flush_conntrack`] drops them.

pub mod abi;
mod datapath;
mod error;
mod fake;
mod fill;
mod flows;
mod lb;
mod maps;
pub mod nodeport;
pub mod overlay;
mod pins;
mod policy;
mod sys;

pub use datapath::{Datapath, PROG_FROM_POD, PROG_TO_POD};
pub use error::{Cause, Error};
pub use fake::FakeMaps;
pub use fill::{map_fill, MapFill};
pub use flows::{FlowEvent, FlowReader};
pub use lb::{
    decode_service, encode_frontend, encode_service, Frontend, Service, ServiceMaps, ServiceStats,
    ServiceWrite, Translation, L4,
};
pub use maps::{source_allowed, Endpoint, EndpointFlags, PolicyCounters, PolicyMaps};
pub use pins::{unpin_all, DEFAULT_PIN_DIR};
pub use policy::{
    evaluate, Decision, Direction, Entry, PolicyKey, PortRange, Protocol, Reason, Verdict,
};
pub use sys::if_index;

/// The compiled `cni/bpf/weft_lxc.c` (built by build.rs).
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/weft_lxc.o"));

/// A fingerprint of [`OBJECT`]; programs are pinned per fingerprint.
pub const OBJECT_HASH: &str = env!("WEFT_LXC_OBJECT_HASH");

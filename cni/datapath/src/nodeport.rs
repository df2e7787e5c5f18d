//! NodePort on the node's external interface: `cni/bpf/weft_nodeport.c` (its own object,
//! `weft_nodeport.o`) with `from_netdev` on tc ingress and `to_netdev` on tc egress. The
//! frontends are `weft_lb_svc` entries with [`crate::Service::node_port`] set (a node address
//! and the nodePort), written like every other Service; the object shares the pinned maps of
//! the pods' programs (same pin directory, maps pinned by name).
//!
//! ```text
//! <pin_dir>/weft_lb_*                                 shared with the pods' programs
//! <pin_dir>/nodeport/link-<ifindex>-{from_netdev,to_netdev}   tcx links
//! ```
//!
//! A backend on another node (`externalTrafficPolicy: Cluster`) is reached with source NAT:
//! the connection leaves with the node's address and a port of [`crate::abi::SNAT_PORTS`]
//! (`weft_lb_snat` holds both directions), so the answer comes back through this node. Those
//! packets are sent on by the program itself, past the stack (which would drop a packet
//! arriving with one of the node's own addresses as its source): into the VXLAN device when
//! the backend is a pod behind the overlay (the overlay's pinned maps say so), else out of
//! the interface to the next hop (`bpf_redirect_neigh`).

use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

use aya::programs::links::{FdLink, PinnedLink};
use aya::programs::tc::{SchedClassifierLink, TcAttachOptions};
use aya::programs::{LinkOrder, SchedClassifier, TcAttachType};
use aya::{Ebpf, EbpfLoader};

use crate::error::{cause, cause_msg};
use crate::overlay::{MAP_OVERLAY4, MAP_OVERLAY6};
use crate::{pins, sys, Error};

/// The compiled `cni/bpf/weft_nodeport.c` (built by build.rs).
pub static NODEPORT_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/weft_nodeport.o"));

/// tc ingress of the external interface: NodeIP:nodePort → a local backend.
pub const PROG_FROM_NETDEV: &str = "from_netdev";
/// tc egress of the external interface: a backend's reply → NodeIP:nodePort.
pub const PROG_TO_NETDEV: &str = "to_netdev";

/// Where the NodePort links are pinned.
pub fn nodeport_dir(pin_dir: &Path) -> PathBuf {
    pin_dir.join("nodeport")
}

/// Both NodePort programs, loaded on the maps pinned under a pin directory.
pub struct NodePort {
    dir: PathBuf,
    ebpf: Ebpf,
}

impl std::fmt::Debug for NodePort {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodePort")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

const HOOKS: [(&str, TcAttachType, u32, &str); 2] = [
    (
        PROG_FROM_NETDEV,
        TcAttachType::Ingress,
        sys::BPF_TCX_INGRESS,
        "ingress",
    ),
    (
        PROG_TO_NETDEV,
        TcAttachType::Egress,
        sys::BPF_TCX_EGRESS,
        "egress",
    ),
];

impl NodePort {
    /// Loads both programs on the maps pinned under `pin_dir` (created and pinned when
    /// missing, as [`crate::Datapath::open`] would). `tunnel_ifindex`: the VXLAN device
    /// when pods on other nodes are reached through the overlay.
    pub fn open(pin_dir: &Path, tunnel_ifindex: Option<u32>) -> Result<NodePort, Error> {
        pins::check_pin_dir(pin_dir)?;
        pins::ensure_bpffs(pin_dir)?;
        pins::create_dirs(pin_dir)?;
        let dir = nodeport_dir(pin_dir);
        std::fs::create_dir_all(&dir).map_err(|e| Error::PinDir {
            path: dir.clone(),
            reason: format!("cannot create it: {e}"),
        })?;
        // The overlay's maps (pinned beside the VXLAN program's, which fills them) tell a
        // source-NATed packet for a pod behind the overlay to go into `tunnel_ifindex`.
        let overlay = crate::overlay::overlay_dir(pin_dir);
        std::fs::create_dir_all(&overlay).map_err(|e| Error::PinDir {
            path: overlay.clone(),
            reason: format!("cannot create it: {e}"),
        })?;
        let tunnel = tunnel_ifindex.unwrap_or(0);
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(pin_dir)
            .map_pin_path(MAP_OVERLAY4, overlay.join(MAP_OVERLAY4))
            .map_pin_path(MAP_OVERLAY6, overlay.join(MAP_OVERLAY6))
            .override_global("weft_tunnel_ifindex", &tunnel, true)
            .load(NODEPORT_OBJECT)
            .map_err(|e| Error::Load {
                pin_dir: pin_dir.to_path_buf(),
                cause: cause(e),
            })?;
        for (name, ..) in HOOKS {
            crate::datapath::load_classifier(&mut ebpf, name, &dir)?;
        }
        Ok(NodePort { dir, ebpf })
    }

    /// One of the loaded programs ([`PROG_FROM_NETDEV`], [`PROG_TO_NETDEV`]), e.g. for
    /// `BPF_PROG_TEST_RUN`.
    pub fn program(&mut self, name: &str) -> Option<&mut SchedClassifier> {
        self.ebpf.program_mut(name)?.try_into().ok()
    }

    fn link_pin(&self, ifindex: u32, program: &str) -> PathBuf {
        self.dir.join(format!("link-{ifindex}-{program}"))
    }

    /// Attaches both programs to interface `ifindex` (the node's external interface, in the
    /// calling thread's namespace) with pinned tcx links; an interface that already has them
    /// gets these programs swapped in.
    pub fn attach(&mut self, ifindex: u32) -> Result<(), Error> {
        let interface = sys::if_name(ifindex).ok_or(Error::NoInterface { ifindex })?;
        for (name, attach_type, tcx_type, hook) in HOOKS {
            let link_path = self.link_pin(ifindex, name);
            let fail = |op: &'static str, e: crate::error::Cause| Error::Attach {
                op,
                program: name,
                interface: interface.clone(),
                ifindex,
                hook,
                link: link_path.clone(),
                cause: e,
            };
            let prog: &mut SchedClassifier = self
                .ebpf
                .program_mut(name)
                .ok_or_else(|| fail("finding", cause_msg("not in the object")))?
                .try_into()
                .map_err(|e| fail("checking the type of", cause(e)))?;
            let prog_id = prog.info().map_err(|e| fail("reading", cause(e)))?.id();
            if let Ok(fd) = sys::obj_get(&link_path) {
                let info = sys::tcx_link_info(fd.as_fd())
                    .map_err(|e| fail("inspecting the pinned link of", cause(e)))?;
                let live = info.link_type == sys::BPF_LINK_TYPE_TCX
                    && info.ifindex == ifindex
                    && info.attach_type == tcx_type;
                if live && info.prog_id == prog_id {
                    continue;
                }
                if live {
                    let pinned = PinnedLink::from_pin(&link_path)
                        .map_err(|e| fail("opening the pinned link of", cause(e)))?;
                    let link = SchedClassifierLink::try_from(FdLink::from(pinned))
                        .map_err(|e| fail("converting the pinned link of", cause(e)))?;
                    let id = prog
                        .attach_to_link(link)
                        .map_err(|e| fail("swapping in", cause(e)))?;
                    drop(prog.take_link(id));
                    continue;
                }
                drop(fd);
                pins::remove_link(&link_path)
                    .map_err(|e| fail("removing the stale link of", cause(e)))?;
            }
            let id = prog
                .attach_with_options(
                    &interface,
                    attach_type,
                    TcAttachOptions::TcxOrder(LinkOrder::default()),
                )
                .map_err(|e| fail("attaching", cause(e)))?;
            let link = prog
                .take_link(id)
                .map_err(|e| fail("taking the link of", cause(e)))?;
            FdLink::try_from(link)
                .map_err(|e| fail("converting the link of", cause(e)))?
                .pin(&link_path)
                .map_err(|e| fail("pinning the link of", cause(e)))?;
        }
        Ok(())
    }

    /// Detaches both programs from `ifindex` (also when it is gone) and removes the pins.
    pub fn detach(&mut self, ifindex: u32) -> Result<(), Error> {
        for (name, _, _, hook) in HOOKS {
            let link = self.link_pin(ifindex, name);
            pins::remove_link(&link).map_err(|e| Error::Attach {
                op: "detaching",
                program: name,
                interface: sys::if_name(ifindex).unwrap_or_else(|| "(gone)".to_string()),
                ifindex,
                hook,
                link: link.clone(),
                cause: cause(e),
            })?;
        }
        Ok(())
    }
}

//! The VXLAN overlay's eBPF side: `cni/bpf/weft_overlay.c` (its own object, `weft_overlay.o`)
//! on the tc egress of the node's VXLAN device, and its two LPM maps of remote pod CIDR →
//! remote node underlay address.
//!
//! Why a program and not the kernel's own VXLAN forwarding database: a device in external
//! (collect_md) mode needs no FDB, no per-node static neighbour and no per-node MAC; the
//! routes only say "this CIDR goes out of the overlay device", and the program picks the
//! tunnel endpoint from the same node table the agent keeps for direct routing. The inner
//! Ethernet addressing is settled by convention: every node's device is NOARP and carries
//! [`OVERLAY_MAC`], and the program writes that MAC as the inner destination, so the receiving
//! device always takes the frame as its own, and [`OVERLAY_SRC_MAC`] as the source (the
//! driver drops a frame that comes from its own address).
//!
//! ```text
//! <pin_dir>/overlay/weft_overlay4, weft_overlay6   the maps (pinned by name, kept on restart)
//! <pin_dir>/overlay/link-<ifindex>                 the tcx link (egress of the VXLAN device)
//! ```
//!
//! A restart loads the program again and swaps it into the pinned link (one atomic
//! replacement, no gap); the maps are reused as they are, so the tunnel never stops.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

use aya::maps::lpm_trie::{Key, LpmTrie};
use aya::maps::MapData;
use aya::programs::links::{FdLink, PinnedLink};
use aya::programs::tc::{SchedClassifierLink, TcAttachOptions};
use aya::programs::{LinkOrder, SchedClassifier, TcAttachType};
use aya::{Ebpf, EbpfLoader};

use crate::{pins, sys};

/// The compiled `cni/bpf/weft_overlay.c` (built by build.rs).
pub static OVERLAY_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/weft_overlay.o"));

/// The program on the VXLAN device's tc egress.
pub const PROG_TO_OVERLAY: &str = "to_overlay";
/// Remote IPv4 pod CIDR → remote node.
pub const MAP_OVERLAY4: &str = "weft_overlay4";
/// Remote IPv6 pod CIDR → remote node.
pub const MAP_OVERLAY6: &str = "weft_overlay6";
/// The MAC of every node's overlay device (`WEFT_OVERLAY_MAC` in weft_overlay.h).
pub const OVERLAY_MAC: [u8; 6] = [0x0e, 0x77, 0x65, 0x66, 0x74, 0x01];
/// The inner source MAC the program writes (`WEFT_OVERLAY_SRC_MAC`): the receiving driver
/// drops a frame whose source is its own address (a loop, to it).
pub const OVERLAY_SRC_MAC: [u8; 6] = [0x0e, 0x77, 0x65, 0x66, 0x74, 0x02];
/// The maps' capacity (`WEFT_OVERLAY_MAX_ENTRIES`): remote pod CIDRs per family.
pub const OVERLAY_MAX_ENTRIES: usize = 16384;

/// `struct weft_overlay_remote`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OverlayRemote {
    /// 4 or 6.
    pub family: u8,
    pub pad: [u8; 3],
    /// Network order; IPv4 in the first four bytes.
    pub addr: [u8; 16],
}

// SAFETY: plain old data, no padding (1 + 3 + 16 bytes), every bit pattern valid.
unsafe impl aya::Pod for OverlayRemote {}

impl OverlayRemote {
    pub fn new(ip: IpAddr) -> Self {
        let mut addr = [0u8; 16];
        let family = match ip {
            IpAddr::V4(a) => {
                addr[..4].copy_from_slice(&a.octets());
                4
            }
            IpAddr::V6(a) => {
                addr = a.octets();
                6
            }
        };
        OverlayRemote {
            family,
            pad: [0; 3],
            addr,
        }
    }

    pub fn ip(&self) -> Option<IpAddr> {
        match self.family {
            4 => Some(IpAddr::V4(Ipv4Addr::new(
                self.addr[0],
                self.addr[1],
                self.addr[2],
                self.addr[3],
            ))),
            6 => Some(IpAddr::V6(Ipv6Addr::from(self.addr))),
            _ => None,
        }
    }
}

/// Why the overlay could not be loaded, attached or written.
#[derive(Debug, thiserror::Error)]
pub enum OverlayError {
    #[error("overlay pins in {}: {reason}", .path.display())]
    PinDir { path: PathBuf, reason: String },
    #[error("loading weft_overlay.o (pins in {}): {cause}", .path.display())]
    Load { path: PathBuf, cause: String },
    #[error("{op} the overlay program on interface {ifindex} (link pin {}): {cause}; needs Linux >= 6.6 (tcx)", .link.display())]
    Attach {
        op: &'static str,
        ifindex: u32,
        link: PathBuf,
        cause: String,
    },
    #[error("map {map} (pinned in {}): {op}: {cause}", .path.display())]
    Map {
        map: &'static str,
        path: PathBuf,
        op: String,
        cause: String,
    },
    #[error("the overlay maps hold at most {OVERLAY_MAX_ENTRIES} pod CIDRs per family")]
    Full,
}

/// Where the overlay pins live under the datapath's pin directory.
pub fn overlay_dir(pin_dir: &Path) -> PathBuf {
    pin_dir.join("overlay")
}

fn link_pin(dir: &Path, ifindex: u32) -> PathBuf {
    dir.join(format!("link-{ifindex}"))
}

/// A pod CIDR as the overlay keys it: network address and prefix length.
pub type OverlayCidr = (IpAddr, u8);

/// The loaded overlay program and its pinned maps.
pub struct Overlay {
    dir: PathBuf,
    ebpf: Ebpf,
}

impl std::fmt::Debug for Overlay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Overlay")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

impl Overlay {
    /// Loads the program with VXLAN network identifier `vni`, reusing (or creating and
    /// pinning) the maps under `<pin_dir>/overlay`. Mounts bpffs like
    /// [`crate::Datapath::open`] when needed.
    pub fn open(pin_dir: &Path, vni: u32) -> Result<Overlay, OverlayError> {
        let dir = overlay_dir(pin_dir);
        let pin_err = |reason: String| OverlayError::PinDir {
            path: dir.clone(),
            reason,
        };
        pins::check_pin_dir(pin_dir).map_err(|e| pin_err(e.to_string()))?;
        pins::ensure_bpffs(pin_dir).map_err(|e| pin_err(e.to_string()))?;
        std::fs::create_dir_all(&dir).map_err(|e| pin_err(format!("cannot create it: {e}")))?;
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(&dir)
            .override_global("weft_overlay_vni", &vni, true)
            .load(OVERLAY_OBJECT)
            .map_err(|e| OverlayError::Load {
                path: dir.clone(),
                cause: e.to_string(),
            })?;
        let prog: &mut SchedClassifier = ebpf
            .program_mut(PROG_TO_OVERLAY)
            .ok_or_else(|| OverlayError::Load {
                path: dir.clone(),
                cause: format!("no program {PROG_TO_OVERLAY} in the object"),
            })?
            .try_into()
            .map_err(|e: aya::programs::ProgramError| OverlayError::Load {
                path: dir.clone(),
                cause: e.to_string(),
            })?;
        prog.load().map_err(|e| OverlayError::Load {
            path: dir.clone(),
            cause: format!("the verifier refused {PROG_TO_OVERLAY}: {e}"),
        })?;
        Ok(Overlay { dir, ebpf })
    }

    fn program(&mut self) -> &mut SchedClassifier {
        // open() checked both.
        match self
            .ebpf
            .program_mut(PROG_TO_OVERLAY)
            .map(<&mut SchedClassifier>::try_from)
        {
            Some(Ok(p)) => p,
            _ => unreachable!("checked when the overlay was opened"),
        }
    }

    /// Attaches the program to the tc egress of interface `ifindex` (the VXLAN device, in the
    /// calling thread's namespace) with a tcx link pinned under the overlay directory. An
    /// existing live link gets this program swapped in atomically; links of interfaces that
    /// are gone are removed.
    pub fn attach(&mut self, ifindex: u32) -> Result<(), OverlayError> {
        let dir = self.dir.clone();
        let link_path = link_pin(&dir, ifindex);
        let fail = |op: &'static str, cause: String| OverlayError::Attach {
            op,
            ifindex,
            link: link_path.clone(),
            cause,
        };
        // Links of other (vanished or replaced) devices.
        if let Ok(rd) = std::fs::read_dir(&dir) {
            for e in rd.flatten() {
                let name = e.file_name();
                let Some(other) = name.to_str().and_then(|n| n.strip_prefix("link-")) else {
                    continue;
                };
                if other != ifindex.to_string() {
                    let _ = pins::remove_link(&e.path());
                }
            }
        }
        let interface =
            sys_if_name(ifindex).ok_or_else(|| fail("finding", "no such interface".into()))?;
        let prog = self.program();
        let prog_id = prog
            .info()
            .map_err(|e| fail("reading", e.to_string()))?
            .id();
        if let Ok(fd) = sys::obj_get(&link_path) {
            let info =
                sys::tcx_link_info(fd.as_fd()).map_err(|e| fail("inspecting", e.to_string()))?;
            let live = info.link_type == sys::BPF_LINK_TYPE_TCX
                && info.ifindex == ifindex
                && info.attach_type == sys::BPF_TCX_EGRESS;
            if live && info.prog_id == prog_id {
                return Ok(());
            }
            if live {
                let pinned = PinnedLink::from_pin(&link_path)
                    .map_err(|e| fail("opening the pinned link", e.to_string()))?;
                let link = SchedClassifierLink::try_from(FdLink::from(pinned))
                    .map_err(|e| fail("converting the pinned link", e.to_string()))?;
                let id = prog
                    .attach_to_link(link)
                    .map_err(|e| fail("swapping in", e.to_string()))?;
                drop(prog.take_link(id));
                return Ok(());
            }
            drop(fd);
            pins::remove_link(&link_path)
                .map_err(|e| fail("removing the stale link", e.to_string()))?;
        }
        let id = prog
            .attach_with_options(
                &interface,
                TcAttachType::Egress,
                TcAttachOptions::TcxOrder(LinkOrder::default()),
            )
            .map_err(|e| fail("attaching", e.to_string()))?;
        let link = prog
            .take_link(id)
            .map_err(|e| fail("taking the link", e.to_string()))?;
        let fd_link =
            FdLink::try_from(link).map_err(|e| fail("converting the link", e.to_string()))?;
        fd_link
            .pin(&link_path)
            .map_err(|e| fail("pinning the link", e.to_string()))?;
        Ok(())
    }

    /// Detaches the program from `ifindex` and removes the link pin.
    pub fn detach(&mut self, ifindex: u32) -> Result<(), OverlayError> {
        let link = link_pin(&self.dir, ifindex);
        pins::remove_link(&link).map_err(|e| OverlayError::Attach {
            op: "detaching",
            ifindex,
            link: link.clone(),
            cause: e.to_string(),
        })
    }

    fn map_err(&self, map: &'static str, op: impl Into<String>) -> impl Fn(String) -> OverlayError {
        let path = self.dir.join(map);
        let op = op.into();
        move |cause| OverlayError::Map {
            map,
            path: path.clone(),
            op: op.clone(),
            cause,
        }
    }

    fn trie4(&mut self) -> Result<LpmTrie<&mut MapData, [u8; 4], OverlayRemote>, OverlayError> {
        let err = self.map_err(MAP_OVERLAY4, "opening");
        let map = self
            .ebpf
            .map_mut(MAP_OVERLAY4)
            .ok_or_else(|| err("not in the object".into()))?;
        LpmTrie::try_from(map).map_err(|e| err(e.to_string()))
    }

    fn trie6(&mut self) -> Result<LpmTrie<&mut MapData, [u8; 16], OverlayRemote>, OverlayError> {
        let err = self.map_err(MAP_OVERLAY6, "opening");
        let map = self
            .ebpf
            .map_mut(MAP_OVERLAY6)
            .ok_or_else(|| err("not in the object".into()))?;
        LpmTrie::try_from(map).map_err(|e| err(e.to_string()))
    }

    /// Every entry: pod CIDR → remote underlay address.
    pub fn entries(&mut self) -> Result<BTreeMap<OverlayCidr, IpAddr>, OverlayError> {
        let mut out = BTreeMap::new();
        let err4 = self.map_err(MAP_OVERLAY4, "reading");
        for item in self.trie4()?.iter() {
            let (k, v) = item.map_err(|e| err4(e.to_string()))?;
            if let Some(ip) = v.ip() {
                out.insert(
                    (IpAddr::V4(Ipv4Addr::from(k.data())), k.prefix_len() as u8),
                    ip,
                );
            }
        }
        let err6 = self.map_err(MAP_OVERLAY6, "reading");
        for item in self.trie6()?.iter() {
            let (k, v) = item.map_err(|e| err6(e.to_string()))?;
            if let Some(ip) = v.ip() {
                out.insert(
                    (IpAddr::V6(Ipv6Addr::from(k.data())), k.prefix_len() as u8),
                    ip,
                );
            }
        }
        Ok(out)
    }

    /// Sends pod CIDR `cidr` to the node at underlay address `remote`.
    pub fn set(&mut self, cidr: OverlayCidr, remote: IpAddr) -> Result<(), OverlayError> {
        let value = OverlayRemote::new(remote);
        let full = |e: &aya::maps::MapError| matches!(e, aya::maps::MapError::SyscallError(s) if s.io_error.raw_os_error() == Some(libc::E2BIG) || s.io_error.raw_os_error() == Some(libc::ENOSPC));
        match cidr.0 {
            IpAddr::V4(a) => {
                let err = self.map_err(MAP_OVERLAY4, format!("writing {}/{}", a, cidr.1));
                let r = self
                    .trie4()?
                    .insert(&Key::new(u32::from(cidr.1), a.octets()), value, 0);
                r.map_err(|e| {
                    if full(&e) {
                        OverlayError::Full
                    } else {
                        err(e.to_string())
                    }
                })
            }
            IpAddr::V6(a) => {
                let err = self.map_err(MAP_OVERLAY6, format!("writing {}/{}", a, cidr.1));
                let r = self
                    .trie6()?
                    .insert(&Key::new(u32::from(cidr.1), a.octets()), value, 0);
                r.map_err(|e| {
                    if full(&e) {
                        OverlayError::Full
                    } else {
                        err(e.to_string())
                    }
                })
            }
        }
    }

    /// Forgets pod CIDR `cidr` (absent is fine).
    pub fn remove(&mut self, cidr: OverlayCidr) -> Result<(), OverlayError> {
        let gone = |e: &aya::maps::MapError| {
            matches!(e, aya::maps::MapError::KeyNotFound)
                || matches!(e, aya::maps::MapError::SyscallError(s) if s.io_error.raw_os_error() == Some(libc::ENOENT))
        };
        let r = match cidr.0 {
            IpAddr::V4(a) => self
                .trie4()?
                .remove(&Key::new(u32::from(cidr.1), a.octets())),
            IpAddr::V6(a) => self
                .trie6()?
                .remove(&Key::new(u32::from(cidr.1), a.octets())),
        };
        match r {
            Err(e) if !gone(&e) => {
                let map = if cidr.0.is_ipv4() {
                    MAP_OVERLAY4
                } else {
                    MAP_OVERLAY6
                };
                Err(self.map_err(map, format!("deleting {}/{}", cidr.0, cidr.1))(e.to_string()))
            }
            _ => Ok(()),
        }
    }
}

/// Removes everything the overlay pinned under `pin_dir` (links detached first): what an
/// uninstall, a switch to direct routing, or a test does. Missing pins are fine.
pub fn unpin_overlay(pin_dir: &Path) -> Result<(), OverlayError> {
    let dir = overlay_dir(pin_dir);
    let fail = |p: &Path, e: std::io::Error| OverlayError::PinDir {
        path: p.to_path_buf(),
        reason: format!("cannot remove it: {e}"),
    };
    let rd = match std::fs::read_dir(&dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(fail(&dir, e)),
    };
    for e in rd.flatten() {
        let p = e.path();
        let is_link = e
            .file_name()
            .to_str()
            .is_some_and(|n| n.starts_with("link-"));
        let r = if is_link {
            pins::remove_link(&p)
        } else {
            std::fs::remove_file(&p)
        };
        r.map_err(|e| fail(&p, e))?;
    }
    std::fs::remove_dir(&dir).map_err(|e| fail(&dir, e))
}

fn sys_if_name(ifindex: u32) -> Option<String> {
    let mut buf = [0u8; libc::IF_NAMESIZE];
    // SAFETY: buf has IF_NAMESIZE bytes, as if_indextoname requires.
    let p = unsafe { libc::if_indextoname(ifindex, buf.as_mut_ptr().cast()) };
    if p.is_null() {
        return None;
    }
    let end = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
    String::from_utf8(buf[..end].to_vec()).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The Rust mirror matches `struct weft_overlay_remote` (1 + 3 + 16 bytes) and the keys'
    /// data sizes (the LPM key is a u32 prefix length, then the address).
    #[test]
    fn layouts_match_the_header() {
        assert_eq!(std::mem::size_of::<OverlayRemote>(), 20);
        assert_eq!(std::mem::size_of::<Key<[u8; 4]>>(), 8);
        assert_eq!(std::mem::size_of::<Key<[u8; 16]>>(), 20);
        let header = include_str!("../../bpf/include/weft_overlay.h");
        assert!(header.contains("0x0e, 0x77, 0x65, 0x66, 0x74, 0x01"));
        assert!(header.contains("0x0e, 0x77, 0x65, 0x66, 0x74, 0x02"));
        let program = include_str!("../../bpf/weft_overlay.c");
        for mac in [OVERLAY_MAC, OVERLAY_SRC_MAC] {
            let text: Vec<String> = mac.iter().map(|b| format!("0x{b:02x}")).collect();
            assert!(program.contains(&text.join(", ")), "{text:?}");
        }
        assert!(header.contains(&format!("WEFT_OVERLAY_MAX_ENTRIES {OVERLAY_MAX_ENTRIES}")));
    }

    #[test]
    fn remote_addresses_round_trip() {
        for ip in ["192.0.2.7", "2001:db8::7"] {
            let ip: IpAddr = ip.parse().expect("ip");
            assert_eq!(OverlayRemote::new(ip).ip(), Some(ip));
        }
        assert_eq!(OverlayRemote::default().ip(), None);
    }
}

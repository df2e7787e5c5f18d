//! [`Datapath`]: the object loaded and pinned, programs attached to host veths, and the
//! [`PolicyMaps`] implementation on the pinned maps.

use std::collections::{BTreeMap, HashSet};
use std::io;
use std::net::IpAddr;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

use aya::maps::lpm_trie::{Key, LpmTrie};
use aya::maps::{HashMap, Map, MapData, MapError, MapInfo, PerCpuArray, PerCpuHashMap};
use aya::programs::links::{FdLink, PinnedLink};
use aya::programs::tc::{SchedClassifierLink, TcAttachOptions};
use aya::programs::{LinkOrder, SchedClassifier, TcAttachType};
use aya::EbpfLoader;

use crate::abi::{
    self, CtKey, CtValue, DropKey, EndpointAddrsValue, EndpointValue, Policy4KeyData,
    Policy6KeyData, PolicyCountersValue, PolicyValue,
};
use crate::error::{cause, cause_msg};
use crate::lb::{LbMaps, Service, ServiceMaps, ServiceStats, ServiceWrite, Translation, L4};
use crate::maps::{
    decode_addrs, encode_addrs, Endpoint, EndpointFlags, PolicyCounters, PolicyMaps,
};
use crate::policy::{encode_all, PolicyKey};
use crate::{pins, sys, Direction, Entry, Error, FlowReader, OBJECT, OBJECT_HASH};

/// The program for packets leaving the pod (tc ingress of the host veth): egress policy.
pub const PROG_FROM_POD: &str = "from_pod";
/// The program for packets entering the pod (tc egress of the host veth): ingress policy.
pub const PROG_TO_POD: &str = "to_pod";

/// Policy entries per endpoint, as this writer installed them.
type Installed = BTreeMap<u32, BTreeMap<PolicyKey, PolicyValue>>;

#[derive(Clone, Copy, Debug)]
enum Hook {
    FromPod,
    ToPod,
}

impl Hook {
    const ALL: [Hook; 2] = [Hook::FromPod, Hook::ToPod];

    fn program(self) -> &'static str {
        match self {
            Hook::FromPod => PROG_FROM_POD,
            Hook::ToPod => PROG_TO_POD,
        }
    }

    fn attach_type(self) -> TcAttachType {
        match self {
            Hook::FromPod => TcAttachType::Ingress,
            Hook::ToPod => TcAttachType::Egress,
        }
    }

    fn tcx_attach_type(self) -> u32 {
        match self {
            Hook::FromPod => sys::BPF_TCX_INGRESS,
            Hook::ToPod => sys::BPF_TCX_EGRESS,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Hook::FromPod => "ingress",
            Hook::ToPod => "egress",
        }
    }
}

/// The loaded datapath: both programs and every map, from the pins under one directory.
///
/// Opening is cheap when the same build already runs (programs and maps are reused from their
/// pins); a new build of the object replaces the pinned programs, keeps every compatible map
/// with its contents, and takes effect on an interface when it is attached again. Policy in
/// the maps is never dropped by a restart.
///
/// One process should write policy at a time (the agent): the writer keeps an index of the
/// entries it installed, read back from the maps the first time it changes policy (so that
/// a short-lived opener, like the CNI plugin attaching an interface, does not pay for it).
pub struct Datapath {
    pin_dir: PathBuf,
    from_pod: SchedClassifier,
    to_pod: SchedClassifier,
    endpoints: HashMap<MapData, u32, EndpointValue>,
    endpoint_addrs: HashMap<MapData, u32, EndpointAddrsValue>,
    policy4: LpmTrie<MapData, Policy4KeyData, PolicyValue>,
    policy6: LpmTrie<MapData, Policy6KeyData, PolicyValue>,
    ct: HashMap<MapData, CtKey, CtValue>,
    counters: PerCpuHashMap<MapData, u32, PolicyCountersValue>,
    drops: PerCpuHashMap<MapData, DropKey, u64>,
    source_drops: PerCpuHashMap<MapData, u32, u64>,
    flow_lost: PerCpuArray<MapData, u64>,
    /// The service maps (`weft_lb_*`).
    lb: LbMaps,
    /// What this writer believes each endpoint's policy is (key → value).
    installed: Option<Installed>,
}

impl std::fmt::Debug for Datapath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Datapath")
            .field("pin_dir", &self.pin_dir)
            .field("object", &OBJECT_HASH)
            .finish_non_exhaustive()
    }
}

fn is_not_found(e: &MapError) -> bool {
    match e {
        MapError::KeyNotFound | MapError::ElementNotFound => true,
        MapError::SyscallError(s) => s.io_error.kind() == io::ErrorKind::NotFound,
        _ => false,
    }
}

impl Datapath {
    /// Opens the datapath pinned under `pin_dir` (default [`crate::DEFAULT_PIN_DIR`]), loading
    /// and pinning what is missing. Mounts bpffs at /sys/fs/bpf when `pin_dir` is below it and
    /// nothing is mounted there. A pinned map whose type or sizes no longer match this build
    /// is replaced by an empty one (logged): the agent refills it.
    pub fn open(pin_dir: impl AsRef<Path>) -> Result<Self, Error> {
        let pin_dir = pin_dir.as_ref().to_path_buf();
        pins::check_pin_dir(&pin_dir)?;
        pins::ensure_bpffs(&pin_dir)?;
        pins::create_dirs(&pin_dir)?;
        let lock = pins::lock(&pin_dir)?;

        replace_incompatible_maps(&pin_dir)?;
        let progs = pins::progs_dir(&pin_dir).join(OBJECT_HASH);
        let (from_pod, to_pod) = match reuse_programs(&pin_dir, &progs) {
            Some(programs) => programs,
            None => load_and_pin(&pin_dir, &progs)?,
        };
        if let Err(e) = pins::remove_other_progs(&pin_dir, OBJECT_HASH) {
            tracing::warn!(dir = %pins::progs_dir(&pin_dir).display(), error = %e,
                "cannot remove the program pins of an older build");
        }
        drop(lock);

        Ok(Datapath {
            endpoints: typed(&pin_dir, abi::map::ENDPOINTS)?,
            endpoint_addrs: typed(&pin_dir, abi::map::ENDPOINT_ADDRS)?,
            policy4: typed(&pin_dir, abi::map::POLICY4)?,
            policy6: typed(&pin_dir, abi::map::POLICY6)?,
            ct: typed(&pin_dir, abi::map::CT)?,
            counters: typed(&pin_dir, abi::map::COUNTERS)?,
            drops: typed(&pin_dir, abi::map::DROPS)?,
            source_drops: typed(&pin_dir, abi::map::SOURCE_DROPS)?,
            flow_lost: typed(&pin_dir, abi::map::FLOW_LOST)?,
            lb: LbMaps::open(&pin_dir)?,
            from_pod,
            to_pod,
            installed: None,
            pin_dir,
        })
    }

    /// The directory everything is pinned under.
    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    /// Where a map is pinned.
    pub fn map_pin(&self, map: &str) -> PathBuf {
        self.pin_dir.join(map)
    }

    /// A reader of the flow events (one reader at a time: the ring buffer has one consumer
    /// position). Must be called within a tokio runtime.
    pub fn flows(&self) -> Result<FlowReader, Error> {
        FlowReader::open(&self.pin_dir)
    }

    fn map_error(
        &self,
        map: &'static str,
        op: impl Into<String>,
    ) -> impl FnOnce(MapError) -> Error {
        let path = self.pin_dir.join(map);
        let op = op.into();
        move |e| Error::Map {
            map,
            path,
            op,
            cause: cause(e),
        }
    }

    /// What is installed per endpoint, read from the tries on first use.
    fn installed(&mut self) -> Result<&mut Installed, Error> {
        if self.installed.is_none() {
            let read = self.read_installed()?;
            self.installed = Some(read);
        }
        Ok(self.installed.get_or_insert_with(BTreeMap::new))
    }

    fn read_installed(&self) -> Result<Installed, Error> {
        let mut installed: Installed = BTreeMap::new();
        for item in self.policy4.iter() {
            let (k, v) = match item {
                Ok(kv) => kv,
                Err(e) if is_not_found(&e) => continue, // deleted meanwhile
                Err(e) => return Err(self.map_error(abi::map::POLICY4, "reading entries")(e)),
            };
            let key = PolicyKey::V4 {
                prefix_len: k.prefix_len(),
                data: k.data(),
            };
            installed.entry(key.ep_id()).or_default().insert(key, v);
        }
        for item in self.policy6.iter() {
            let (k, v) = match item {
                Ok(kv) => kv,
                Err(e) if is_not_found(&e) => continue, // deleted meanwhile
                Err(e) => return Err(self.map_error(abi::map::POLICY6, "reading entries")(e)),
            };
            let key = PolicyKey::V6 {
                prefix_len: k.prefix_len(),
                data: k.data(),
            };
            installed.entry(key.ep_id()).or_default().insert(key, v);
        }
        Ok(installed)
    }

    fn program_mut(&mut self, hook: Hook) -> &mut SchedClassifier {
        match hook {
            Hook::FromPod => &mut self.from_pod,
            Hook::ToPod => &mut self.to_pod,
        }
    }

    /// Attaches `from_pod` to tc ingress and `to_pod` to tc egress of interface `ifindex` (in
    /// the calling thread's network namespace) with tcx links pinned under `links/`.
    /// Idempotent: an interface that already has our links gets them pointed at the current
    /// programs (an atomic swap, no gap), never a second copy. Needs Linux >= 6.6 (tcx).
    pub fn attach(&mut self, ifindex: u32) -> Result<(), Error> {
        let _lock = pins::lock(&self.pin_dir)?;
        let interface = sys::if_name(ifindex).ok_or(Error::NoInterface { ifindex })?;
        for hook in Hook::ALL {
            self.attach_hook(ifindex, &interface, hook)?;
        }
        Ok(())
    }

    fn attach_hook(&mut self, ifindex: u32, interface: &str, hook: Hook) -> Result<(), Error> {
        let link_path = pins::link_pin(&self.pin_dir, ifindex, hook.program());
        let fail = |op: &'static str, link: &Path, e: crate::error::Cause| Error::Attach {
            op,
            program: hook.program(),
            interface: interface.to_string(),
            ifindex,
            hook: hook.name(),
            link: link.to_path_buf(),
            cause: e,
        };
        let prog = self.program_mut(hook);
        let prog_id = prog
            .info()
            .map_err(|e| fail("reading", &link_path, cause(e)))?
            .id();

        if let Ok(fd) = sys::obj_get(&link_path) {
            let info = sys::tcx_link_info(fd.as_fd())
                .map_err(|e| fail("inspecting the pinned link of", &link_path, cause(e)))?;
            let live = info.link_type == sys::BPF_LINK_TYPE_TCX
                && info.ifindex == ifindex
                && info.attach_type == hook.tcx_attach_type();
            if live && info.prog_id == prog_id {
                return Ok(());
            }
            if live {
                let pinned = PinnedLink::from_pin(&link_path)
                    .map_err(|e| fail("opening the pinned link of", &link_path, cause(e)))?;
                let link = SchedClassifierLink::try_from(FdLink::from(pinned))
                    .map_err(|e| fail("converting the pinned link of", &link_path, cause(e)))?;
                let id = prog
                    .attach_to_link(link)
                    .map_err(|e| fail("swapping in", &link_path, cause(e)))?;
                // The pin keeps the link; our descriptor can go.
                drop(prog.take_link(id));
                return Ok(());
            }
            // The interface this link was for is gone (ifindexes are reused): start afresh.
            drop(fd);
            pins::remove_link(&link_path)
                .map_err(|e| fail("removing the stale link of", &link_path, cause(e)))?;
        }

        let id = prog
            .attach_with_options(
                interface,
                hook.attach_type(),
                TcAttachOptions::TcxOrder(LinkOrder::default()),
            )
            .map_err(|e| fail("attaching", &link_path, cause(e)))?;
        let link = prog
            .take_link(id)
            .map_err(|e| fail("taking the link of", &link_path, cause(e)))?;
        let fd_link = FdLink::try_from(link)
            .map_err(|e| fail("converting the link of", &link_path, cause(e)))?;
        // Dropping the returned PinnedLink only closes our descriptor.
        fd_link
            .pin(&link_path)
            .map_err(|e| fail("pinning the link of", &link_path, cause(e)))?;
        Ok(())
    }

    /// Detaches both programs from interface `ifindex` and removes their link pins. Works
    /// when the interface is already gone; detaching what is not attached succeeds.
    pub fn detach(&mut self, ifindex: u32) -> Result<(), Error> {
        let _lock = pins::lock(&self.pin_dir)?;
        for hook in Hook::ALL {
            let link_path = pins::link_pin(&self.pin_dir, ifindex, hook.program());
            pins::remove_link(&link_path).map_err(|e| Error::Attach {
                op: "detaching",
                program: hook.program(),
                interface: sys::if_name(ifindex).unwrap_or_else(|| "(gone)".to_string()),
                ifindex,
                hook: hook.name(),
                link: link_path.clone(),
                cause: cause(e),
            })?;
        }
        Ok(())
    }

    /// The interfaces that have pinned links (ifindexes), whether or not they still exist.
    pub fn attached(&self) -> Result<Vec<u32>, Error> {
        let dir = pins::links_dir(&self.pin_dir);
        let rd = std::fs::read_dir(&dir).map_err(|e| Error::PinDir {
            path: dir.clone(),
            reason: format!("cannot list it: {e}"),
        })?;
        let mut out: Vec<u32> = rd
            .flatten()
            .filter_map(|e| {
                let name = e.file_name();
                let name = name.to_str()?;
                name.split_once('-')?.0.parse().ok()
            })
            .collect();
        out.sort_unstable();
        out.dedup();
        Ok(out)
    }

    /// Conntrack entries of an endpoint (for tests and `weft cni` debugging).
    pub fn conntrack(&self, ep_id: u32) -> Result<Vec<(CtKey, CtValue)>, Error> {
        let mut out = Vec::new();
        for item in self.ct.iter() {
            match item {
                Ok((k, v)) if k.ep_id == ep_id => out.push((k, v)),
                Ok(_) => {}
                // Entries can vanish (LRU) between listing a key and reading it.
                Err(e) if is_not_found(&e) => {}
                Err(e) => return Err(self.map_error(abi::map::CT, "reading entries")(e)),
            }
        }
        Ok(out)
    }

    /// The connections the programs translated to a service backend (their FORWARD entries).
    pub fn translations(&self) -> Result<Vec<Translation>, Error> {
        self.lb.translations()
    }

    /// The number of entries in each policy trie (v4, v6), read from the kernel.
    pub fn policy_entry_counts(&self) -> Result<(usize, usize), Error> {
        let mut v4 = 0;
        for k in self.policy4.keys() {
            k.map_err(self.map_error(abi::map::POLICY4, "listing keys"))?;
            v4 += 1;
        }
        let mut v6 = 0;
        for k in self.policy6.keys() {
            k.map_err(self.map_error(abi::map::POLICY6, "listing keys"))?;
            v6 += 1;
        }
        Ok((v4, v6))
    }

    fn write_key(&mut self, key: &PolicyKey, value: &PolicyValue) -> Result<(), Error> {
        match key {
            PolicyKey::V4 { prefix_len, data } => {
                let err = self.map_error(
                    abi::map::POLICY4,
                    format!("writing the entry for endpoint {}", key.ep_id()),
                );
                self.policy4
                    .insert(&Key::new(*prefix_len, *data), value, 0)
                    .map_err(err)
            }
            PolicyKey::V6 { prefix_len, data } => {
                let err = self.map_error(
                    abi::map::POLICY6,
                    format!("writing the entry for endpoint {}", key.ep_id()),
                );
                self.policy6
                    .insert(&Key::new(*prefix_len, *data), value, 0)
                    .map_err(err)
            }
        }
    }

    fn delete_key(&mut self, key: &PolicyKey) -> Result<(), Error> {
        let (map, res) = match key {
            PolicyKey::V4 { prefix_len, data } => (
                abi::map::POLICY4,
                self.policy4.remove(&Key::new(*prefix_len, *data)),
            ),
            PolicyKey::V6 { prefix_len, data } => (
                abi::map::POLICY6,
                self.policy6.remove(&Key::new(*prefix_len, *data)),
            ),
        };
        match res {
            Err(e) if !is_not_found(&e) => Err(self.map_error(
                map,
                format!("deleting a stale entry of endpoint {}", key.ep_id()),
            )(e)),
            _ => Ok(()),
        }
    }

    fn remove_endpoint_addrs(&mut self, ifindex: u32) -> Result<(), Error> {
        match self.endpoint_addrs.remove(&ifindex) {
            Err(e) if !is_not_found(&e) => Err(self.map_error(
                abi::map::ENDPOINT_ADDRS,
                format!("removing the addresses of ifindex {ifindex}"),
            )(e)),
            _ => Ok(()),
        }
    }

    /// Entries keyed by endpoint id in the per-endpoint counter maps (`weft_drops`,
    /// `weft_source_drops`): what a removed endpoint must not leave behind.
    pub fn counter_entry_count(&self, ep_id: u32) -> Result<usize, Error> {
        let mut n = 0;
        for k in self.drops.keys() {
            match k {
                Ok(k) if k.ep_id == ep_id => n += 1,
                Ok(_) => {}
                Err(e) if is_not_found(&e) => {}
                Err(e) => return Err(self.map_error(abi::map::DROPS, "listing keys")(e)),
            }
        }
        for k in self.source_drops.keys() {
            match k {
                Ok(k) if k == ep_id => n += 1,
                Ok(_) => {}
                Err(e) if is_not_found(&e) => {}
                Err(e) => return Err(self.map_error(abi::map::SOURCE_DROPS, "listing keys")(e)),
            }
        }
        Ok(n)
    }

    fn remove_drops(&mut self, ep_id: u32) -> Result<(), Error> {
        if let Err(e) = self.source_drops.remove(&ep_id) {
            if !is_not_found(&e) {
                return Err(self.map_error(
                    abi::map::SOURCE_DROPS,
                    format!("deleting the counter of endpoint {ep_id}"),
                )(e));
            }
        }
        for direction in [abi::DIR_INGRESS, abi::DIR_EGRESS] {
            let key = DropKey {
                ep_id,
                direction,
                pad: [0; 3],
            };
            if let Err(e) = self.drops.remove(&key) {
                if !is_not_found(&e) {
                    return Err(self.map_error(
                        abi::map::DROPS,
                        format!("deleting the counters of endpoint {ep_id}"),
                    )(e));
                }
            }
        }
        Ok(())
    }
}

impl PolicyMaps for Datapath {
    fn set_endpoint(
        &mut self,
        ifindex: u32,
        ep_id: u32,
        flags: EndpointFlags,
    ) -> Result<(), Error> {
        let value = EndpointValue {
            ep_id,
            flags: flags.bits(),
        };
        let err = self.map_error(
            abi::map::ENDPOINTS,
            format!("setting ifindex {ifindex} to endpoint {ep_id}"),
        );
        self.endpoints.insert(ifindex, value, 0).map_err(err)
    }

    fn set_endpoint_addrs(&mut self, ifindex: u32, addrs: &[IpAddr]) -> Result<(), Error> {
        match encode_addrs(ifindex, addrs)? {
            // One update replaces the whole set: a lookup sees the old or the new one.
            Some(value) => {
                let err = self.map_error(
                    abi::map::ENDPOINT_ADDRS,
                    format!("setting the addresses of ifindex {ifindex}"),
                );
                self.endpoint_addrs.insert(ifindex, value, 0).map_err(err)
            }
            None => self.remove_endpoint_addrs(ifindex),
        }
    }

    fn endpoint_addrs(&self) -> Result<BTreeMap<u32, Vec<IpAddr>>, Error> {
        let mut out = BTreeMap::new();
        for item in self.endpoint_addrs.iter() {
            match item {
                Ok((ifindex, v)) => {
                    out.insert(ifindex, decode_addrs(&v));
                }
                Err(e) if is_not_found(&e) => {}
                Err(e) => {
                    return Err(self.map_error(abi::map::ENDPOINT_ADDRS, "reading entries")(
                        e,
                    ))
                }
            }
        }
        Ok(out)
    }

    fn remove_endpoint(&mut self, ifindex: u32) -> Result<(), Error> {
        self.remove_endpoint_addrs(ifindex)?;
        let ep_id = match self.endpoints.get(&ifindex, 0) {
            Ok(v) => v.ep_id,
            Err(e) if is_not_found(&e) => return Ok(()),
            Err(e) => {
                return Err(self.map_error(
                    abi::map::ENDPOINTS,
                    format!("reading ifindex {ifindex}"),
                )(e))
            }
        };
        if let Err(e) = self.endpoints.remove(&ifindex) {
            if !is_not_found(&e) {
                return Err(self.map_error(
                    abi::map::ENDPOINTS,
                    format!("removing ifindex {ifindex}"),
                )(e));
            }
        }
        let still_used = self.endpoints()?.values().any(|e| e.ep_id == ep_id);
        if still_used {
            return Ok(());
        }
        self.replace_policy(ep_id, &[])?;
        self.flush_conntrack(ep_id)?;
        self.remove_drops(ep_id)
    }

    fn endpoints(&self) -> Result<BTreeMap<u32, Endpoint>, Error> {
        let mut out = BTreeMap::new();
        for item in self.endpoints.iter() {
            match item {
                Ok((ifindex, v)) => {
                    out.insert(
                        ifindex,
                        Endpoint {
                            ep_id: v.ep_id,
                            flags: EndpointFlags::from_bits(v.flags),
                        },
                    );
                }
                Err(e) if is_not_found(&e) => {}
                Err(e) => return Err(self.map_error(abi::map::ENDPOINTS, "reading entries")(e)),
            }
        }
        Ok(out)
    }

    fn replace_policy(&mut self, ep_id: u32, entries: &[Entry]) -> Result<(), Error> {
        let wanted = encode_all(ep_id, entries)?;
        let mut current = self.installed()?.remove(&ep_id).unwrap_or_default();
        // New and changed entries first: an LPM update replaces a value atomically, so a
        // lookup sees the old or the new entry, never none.
        let mut result = Ok(());
        for (key, value) in &wanted {
            if current.get(key) == Some(value) {
                continue;
            }
            if let Err(e) = self.write_key(key, value) {
                result = Err(e);
                break;
            }
            current.insert(*key, *value);
        }
        // Then what is no longer wanted.
        if result.is_ok() {
            let keep: HashSet<PolicyKey> = wanted.iter().map(|(k, _)| *k).collect();
            let stale: Vec<PolicyKey> = current
                .keys()
                .filter(|k| !keep.contains(k))
                .copied()
                .collect();
            for key in stale {
                if let Err(e) = self.delete_key(&key) {
                    result = Err(e);
                    break;
                }
                current.remove(&key);
            }
        }
        if !current.is_empty() {
            self.installed()?.insert(ep_id, current);
        }
        result
    }

    fn flush_conntrack(&mut self, ep_id: u32) -> Result<usize, Error> {
        let mut keys = Vec::new();
        for k in self.ct.keys() {
            match k {
                Ok(k) if k.ep_id == ep_id => keys.push(k),
                Ok(_) => {}
                Err(e) if is_not_found(&e) => {}
                Err(e) => return Err(self.map_error(abi::map::CT, "listing keys")(e)),
            }
        }
        let mut removed = 0;
        for k in &keys {
            match self.ct.remove(k) {
                Ok(()) => removed += 1,
                Err(e) if is_not_found(&e) => {}
                Err(e) => {
                    return Err(self.map_error(
                        abi::map::CT,
                        format!("deleting an entry of endpoint {ep_id}"),
                    )(e))
                }
            }
        }
        Ok(removed)
    }

    fn counters(&self) -> Result<BTreeMap<u32, PolicyCounters>, Error> {
        let mut out = BTreeMap::new();
        for item in self.counters.iter() {
            match item {
                Ok((policy, per_cpu)) => {
                    let mut sum = PolicyCounters::default();
                    for v in per_cpu.iter() {
                        sum.allowed_conns += v.allowed_conns;
                        sum.allowed_packets += v.allowed_packets;
                    }
                    out.insert(policy, sum);
                }
                Err(e) if is_not_found(&e) => {}
                Err(e) => return Err(self.map_error(abi::map::COUNTERS, "reading entries")(e)),
            }
        }
        Ok(out)
    }

    fn remove_counters(&mut self, policy: u32) -> Result<(), Error> {
        match self.counters.remove(&policy) {
            Err(e) if !is_not_found(&e) => Err(self.map_error(
                abi::map::COUNTERS,
                format!("deleting the counters of policy {policy}"),
            )(e)),
            _ => Ok(()),
        }
    }

    fn drops(&self) -> Result<BTreeMap<(u32, Direction), u64>, Error> {
        let mut out = BTreeMap::new();
        for item in self.drops.iter() {
            match item {
                Ok((k, per_cpu)) => {
                    let Some(direction) = Direction::from_u8(k.direction) else {
                        continue;
                    };
                    out.insert((k.ep_id, direction), per_cpu.iter().sum());
                }
                Err(e) if is_not_found(&e) => {}
                Err(e) => return Err(self.map_error(abi::map::DROPS, "reading entries")(e)),
            }
        }
        Ok(out)
    }

    fn source_drops(&self) -> Result<BTreeMap<u32, u64>, Error> {
        let mut out = BTreeMap::new();
        for item in self.source_drops.iter() {
            match item {
                Ok((ep_id, per_cpu)) => {
                    out.insert(ep_id, per_cpu.iter().sum());
                }
                Err(e) if is_not_found(&e) => {}
                Err(e) => return Err(self.map_error(abi::map::SOURCE_DROPS, "reading entries")(e)),
            }
        }
        Ok(out)
    }

    fn flow_lost(&self) -> Result<u64, Error> {
        let per_cpu = self
            .flow_lost
            .get(&0, 0)
            .map_err(self.map_error(abi::map::FLOW_LOST, "reading"))?;
        Ok(per_cpu.iter().sum())
    }
}

impl ServiceMaps for Datapath {
    fn replace_services(&mut self, services: &[Service]) -> Result<ServiceWrite, Error> {
        self.lb.replace(services)
    }

    fn services(&self) -> Result<Vec<Service>, Error> {
        self.lb.services()
    }

    fn service_stats(&self) -> Result<BTreeMap<u32, ServiceStats>, Error> {
        self.lb.stats()
    }

    fn forget_backends(
        &mut self,
        proto: L4,
        backends: &[std::net::SocketAddr],
    ) -> Result<usize, Error> {
        self.lb.forget_backends(proto, backends)
    }
}

/// Opens a pinned map as its typed aya wrapper.
pub(crate) fn typed<T>(pin_dir: &Path, name: &'static str) -> Result<T, Error>
where
    T: TryFrom<Map, Error = MapError>,
{
    let path = pin_dir.join(name);
    let err = |op: &str, e: MapError| Error::Map {
        map: name,
        path: path.clone(),
        op: op.to_string(),
        cause: cause(e),
    };
    let data = MapData::from_pin(&path).map_err(|e| err("opening the pin", e))?;
    let map = Map::from_map_data(data).map_err(|e| err("reading its type", e))?;
    T::try_from(map).map_err(|e| err("checking its key and value types", e))
}

/// Unpins maps whose type, sizes or flags differ from this build's, so loading creates them
/// anew (programs of the old build keep their own maps alive until re-attached).
fn replace_incompatible_maps(pin_dir: &Path) -> Result<(), Error> {
    let obj = aya_obj::Object::parse(OBJECT).map_err(|e| Error::Load {
        pin_dir: pin_dir.to_path_buf(),
        cause: cause(e),
    })?;
    for name in abi::map::ALL {
        let path = pin_dir.join(name);
        if !path.exists() {
            continue;
        }
        let Some(want) = obj.maps.get(name) else {
            continue;
        };
        let found = MapInfo::from_pin(&path).map_err(|e| Error::Map {
            map: name,
            path: path.clone(),
            op: "reading the pinned map's info".to_string(),
            cause: cause(e),
        })?;
        let found_type = found.map_type().map(|t| t as u32).unwrap_or(u32::MAX);
        let want_max = want.max_entries();
        let same = found_type == want.map_type()
            && found.key_size() == want.key_size()
            && found.value_size() == want.value_size()
            && found.max_entries() == want_max
            && found.map_flags() == want.map_flags();
        if !same {
            tracing::warn!(
                map = name,
                pin = %path.display(),
                "pinned map does not match this build (type {}/{}, key {}/{}, value {}/{}, \
                 max_entries {}/{}): replacing it with an empty one",
                found_type, want.map_type(), found.key_size(), want.key_size(),
                found.value_size(), want.value_size(), found.max_entries(), want_max,
            );
            std::fs::remove_file(&path).map_err(|e| Error::Map {
                map: name,
                path: path.clone(),
                op: "removing the incompatible pin".to_string(),
                cause: cause(e),
            })?;
        }
    }
    Ok(())
}

/// Finds tc program `name` in a loaded object and loads it into the kernel (the verifier
/// runs here); errors name the program and `path`, where it is or will be pinned.
pub(crate) fn load_classifier<'a>(
    ebpf: &'a mut aya::Ebpf,
    name: &'static str,
    path: &Path,
) -> Result<&'a mut SchedClassifier, Error> {
    let fail = |op: &'static str, e: crate::error::Cause| Error::Program {
        program: name,
        path: path.to_path_buf(),
        op,
        cause: e,
    };
    let prog: &mut SchedClassifier = ebpf
        .program_mut(name)
        .ok_or_else(|| fail("finding it in the object", cause_msg("not there")))?
        .try_into()
        .map_err(|e| fail("checking its type", cause(e)))?;
    prog.load()
        .map_err(|e| fail("loading it (verifier)", cause(e)))?;
    Ok(prog)
}

/// The pinned programs of this build, if both exist and use the maps pinned now.
fn reuse_programs(pin_dir: &Path, progs: &Path) -> Option<(SchedClassifier, SchedClassifier)> {
    let mut map_ids = HashSet::new();
    for name in abi::map::ALL {
        map_ids.insert(MapInfo::from_pin(pin_dir.join(name)).ok()?.id());
    }
    let open = |name: &str| -> Option<SchedClassifier> {
        let prog = SchedClassifier::from_pin(progs.join(name)).ok()?;
        let uses = prog.info().ok()?.map_ids().ok()??;
        uses.iter().all(|id| map_ids.contains(id)).then_some(prog)
    };
    Some((open(PROG_FROM_POD)?, open(PROG_TO_POD)?))
}

/// Loads the object (maps pinned or reused by name under `pin_dir`), loads both programs and
/// pins them under `progs`, and returns them opened from their pins.
fn load_and_pin(pin_dir: &Path, progs: &Path) -> Result<(SchedClassifier, SchedClassifier), Error> {
    let mut ebpf = EbpfLoader::new()
        .default_map_pin_directory(pin_dir)
        .load(OBJECT)
        .map_err(|e| Error::Load {
            pin_dir: pin_dir.to_path_buf(),
            cause: cause(e),
        })?;
    std::fs::create_dir_all(progs).map_err(|e| Error::PinDir {
        path: progs.to_path_buf(),
        reason: format!("cannot create it: {e}"),
    })?;
    for name in [PROG_FROM_POD, PROG_TO_POD] {
        let path = progs.join(name);
        let prog = load_classifier(&mut ebpf, name, &path)?;
        // A half-finished earlier attempt may have left a pin behind.
        let _ = std::fs::remove_file(&path);
        prog.pin(&path).map_err(|e| Error::Program {
            program: name,
            path: path.clone(),
            op: "pinning it",
            cause: cause(e),
        })?;
    }
    let open = |name: &'static str| {
        let path = progs.join(name);
        SchedClassifier::from_pin(&path).map_err(|e| Error::Program {
            program: name,
            path,
            op: "opening the pin",
            cause: cause(e),
        })
    };
    Ok((open(PROG_FROM_POD)?, open(PROG_TO_POD)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_datapath_can_move_between_threads() {
        fn send<T: Send>() {}
        send::<Datapath>();
        send::<FlowReader>();
    }
}

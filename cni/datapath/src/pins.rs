//! Where things live on bpffs, and getting rid of them.
//!
//! ```text
//! <pin_dir>/weft_endpoints, weft_policy4, ...   maps, pinned by name
//! <pin_dir>/progs/<object-hash>/from_pod        programs of one build of weft_lxc.o
//! <pin_dir>/progs/<object-hash>/to_pod
//! <pin_dir>/links/<ifindex>-from_pod            tcx links (tc ingress of the host veth)
//! <pin_dir>/links/<ifindex>-to_pod              tcx links (tc egress of the host veth)
//! ```
//!
//! Links are pinned so that attachments outlive the process that made them (the CNI plugin
//! exits right after ADD; the agent restarts).

use std::io;
use std::path::{Path, PathBuf};

use crate::error::{cause, cause_msg};
use crate::{abi, sys, Error};

/// The default pin directory (DESIGN.md).
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/weft";

/// Where the system's bpffs is mounted when it is not.
const BPFFS_ROOT: &str = "/sys/fs/bpf";

pub(crate) fn progs_dir(pin_dir: &Path) -> PathBuf {
    pin_dir.join("progs")
}

pub(crate) fn links_dir(pin_dir: &Path) -> PathBuf {
    pin_dir.join("links")
}

pub(crate) fn link_pin(pin_dir: &Path, ifindex: u32, program: &str) -> PathBuf {
    links_dir(pin_dir).join(format!("{ifindex}-{program}"))
}

fn pin_dir_error(path: &Path, reason: impl Into<String>) -> Error {
    Error::PinDir {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

pub(crate) fn check_pin_dir(pin_dir: &Path) -> Result<(), Error> {
    if !pin_dir.is_absolute() {
        return Err(pin_dir_error(pin_dir, "must be an absolute path"));
    }
    if pin_dir.as_os_str().as_encoded_bytes().contains(&0) {
        return Err(pin_dir_error(pin_dir, "contains a NUL byte"));
    }
    Ok(())
}

/// Makes sure `pin_dir` can be created on a bpf filesystem: mounts one at /sys/fs/bpf when the
/// directory is below it and nothing is mounted there yet (as Cilium's agent does).
pub(crate) fn ensure_bpffs(pin_dir: &Path) -> Result<(), Error> {
    let existing = pin_dir
        .ancestors()
        .find(|p| p.exists())
        .unwrap_or(Path::new("/"));
    let on_bpffs = |p: &Path| {
        sys::is_bpffs(p).map_err(|e| pin_dir_error(pin_dir, format!("statfs {}: {e}", p.display())))
    };
    if on_bpffs(existing)? {
        return Ok(());
    }
    let root = Path::new(BPFFS_ROOT);
    if !pin_dir.starts_with(root) || !root.is_dir() {
        return Err(Error::BpfFs {
            path: pin_dir.to_path_buf(),
            mount: root.to_path_buf(),
            cause: cause_msg(format!(
                "{} is not on bpffs and is not below {BPFFS_ROOT}",
                existing.display()
            )),
        });
    }
    // Serialise with other processes doing the same, then look again: two stacked mounts
    // would hide each other's pins.
    let _lock = sys::DirLock::acquire(root).map_err(|e| Error::BpfFs {
        path: pin_dir.to_path_buf(),
        mount: root.to_path_buf(),
        cause: cause(e),
    })?;
    if on_bpffs(root)? {
        return Ok(());
    }
    sys::mount_bpffs(root).map_err(|e| Error::BpfFs {
        path: pin_dir.to_path_buf(),
        mount: root.to_path_buf(),
        cause: cause(e),
    })?;
    tracing::info!(mount = %root.display(), "mounted a bpf filesystem");
    Ok(())
}

pub(crate) fn create_dirs(pin_dir: &Path) -> Result<(), Error> {
    for dir in [
        pin_dir.to_path_buf(),
        progs_dir(pin_dir),
        links_dir(pin_dir),
    ] {
        std::fs::create_dir_all(&dir)
            .map_err(|e| pin_dir_error(&dir, format!("cannot create it: {e}")))?;
    }
    Ok(())
}

pub(crate) fn lock(pin_dir: &Path) -> Result<sys::DirLock, Error> {
    sys::DirLock::acquire(pin_dir)
        .map_err(|e| pin_dir_error(pin_dir, format!("cannot lock it: {e}")))
}

fn remove_file(path: &Path) -> io::Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

fn remove_dir(path: &Path) -> io::Result<()> {
    match std::fs::remove_dir(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Detaches a pinned link (also when other holders keep it open) and removes its pin.
pub(crate) fn remove_link(path: &Path) -> io::Result<()> {
    match sys::obj_get(path) {
        Ok(fd) => {
            if let Err(e) = sys::link_detach(std::os::fd::AsFd::as_fd(&fd)) {
                // An interface that is gone took the attachment with it.
                tracing::debug!(link = %path.display(), error = %e, "link detach");
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => tracing::debug!(link = %path.display(), error = %e, "opening pinned link"),
    }
    remove_file(path)
}

fn entries(dir: &Path) -> io::Result<Vec<PathBuf>> {
    match std::fs::read_dir(dir) {
        Ok(rd) => rd.map(|e| e.map(|e| e.path())).collect(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(e),
    }
}

/// Removes program pins of other builds than `keep` (their programs stay loaded for as long
/// as links still run them).
pub(crate) fn remove_other_progs(pin_dir: &Path, keep: &str) -> io::Result<()> {
    for dir in entries(&progs_dir(pin_dir))? {
        if dir.file_name().is_some_and(|n| n == keep) {
            continue;
        }
        for pin in entries(&dir)? {
            remove_file(&pin)?;
        }
        remove_dir(&dir)?;
    }
    Ok(())
}

/// Detaches every link pinned under `pin_dir` and removes every pin and directory the datapath
/// made there, `pin_dir` included: what an uninstall (or a test) does. Programs and maps are
/// freed by the kernel once no process holds them. A missing `pin_dir` is fine.
pub fn unpin_all(pin_dir: impl AsRef<Path>) -> Result<(), Error> {
    let pin_dir = pin_dir.as_ref();
    check_pin_dir(pin_dir)?;
    if !pin_dir.exists() {
        return Ok(());
    }
    let fail = |path: &Path, e: io::Error| pin_dir_error(path, format!("cannot remove it: {e}"));
    {
        let _lock = lock(pin_dir)?;
        let links = links_dir(pin_dir);
        for link in entries(&links).map_err(|e| fail(&links, e))? {
            remove_link(&link).map_err(|e| fail(&link, e))?;
        }
        remove_dir(&links).map_err(|e| fail(&links, e))?;
        let nodeport = crate::nodeport::nodeport_dir(pin_dir);
        for link in entries(&nodeport).map_err(|e| fail(&nodeport, e))? {
            remove_link(&link).map_err(|e| fail(&link, e))?;
        }
        remove_dir(&nodeport).map_err(|e| fail(&nodeport, e))?;
        // The VXLAN overlay's link and maps (overlay.rs), on a node that encapsulates.
        crate::overlay::unpin_overlay(pin_dir)
            .map_err(|e| pin_dir_error(&crate::overlay::overlay_dir(pin_dir), e.to_string()))?;
        remove_other_progs(pin_dir, "").map_err(|e| fail(&progs_dir(pin_dir), e))?;
        remove_dir(&progs_dir(pin_dir)).map_err(|e| fail(&progs_dir(pin_dir), e))?;
        for map in abi::map::ALL {
            let p = pin_dir.join(map);
            remove_file(&p).map_err(|e| fail(&p, e))?;
        }
    }
    remove_dir(pin_dir).map_err(|e| fail(pin_dir, e))
}

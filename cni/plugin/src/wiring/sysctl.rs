//! Kernel settings the pod's path needs, written under `/proc/sys`.
//!
//! `/proc/sys/net` shows the namespace of the thread that opens it, so these
//! apply to whichever namespace the calling thread is in.

use crate::error::Error;

/// Sets `key` (slashed, e.g. `net/ipv4/ip_forward`) to `value`, writing
/// only when it differs.
pub fn ensure(key: &str, value: &str) -> Result<(), Error> {
    let path = format!("/proc/sys/{key}");
    if std::fs::read_to_string(&path).is_ok_and(|cur| cur.trim() == value) {
        return Ok(());
    }
    std::fs::write(&path, value).map_err(|source| Error::Sysctl { path, source })
}

/// The key of a per-interface setting (interface names may contain dots).
pub fn iface_key(family: &str, ifname: &str, setting: &str) -> String {
    format!("net/{family}/conf/{ifname}/{setting}")
}

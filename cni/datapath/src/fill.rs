//! How full the pinned maps are: `weft cni status` and the agent's `weft_cni_map_*` gauges.
//!
//! Read from the pins (any process on the node can ask, the agent's own handles are not
//! needed), so it also sees maps other parts of the datapath pin beside the policy maps.
//! Only keyed maps are listed: an array or a ring buffer has no fill level.

use std::os::fd::AsFd;
use std::path::Path;

use aya::maps::{MapInfo, MapType};

use crate::Error;

/// One pinned map's fill level.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MapFill {
    /// The pin's file name (`weft_ct`, `weft_policy4`, ...).
    pub name: String,
    /// The kernel's map type, as bpftool names it (`hash`, `lru_hash`, `lpm_trie`, ...).
    pub kind: String,
    pub entries: u64,
    pub max_entries: u32,
}

fn keyed_kind(t: MapType) -> Option<&'static str> {
    Some(match t {
        MapType::Hash => "hash",
        MapType::LruHash => "lru_hash",
        MapType::PerCpuHash => "percpu_hash",
        MapType::LruPerCpuHash => "lru_percpu_hash",
        MapType::LpmTrie => "lpm_trie",
        _ => return None,
    })
}

/// The fill level of every keyed map pinned directly under `pin_dir` (names starting with
/// `weft_`), sorted by name. A map that cannot be read fails the call, naming it.
pub fn map_fill(pin_dir: &Path) -> Result<Vec<MapFill>, Error> {
    let dir_err = |reason: String| Error::PinDir {
        path: pin_dir.to_path_buf(),
        reason,
    };
    let entries = std::fs::read_dir(pin_dir).map_err(|e| dir_err(format!("listing: {e}")))?;
    let mut out = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| dir_err(format!("listing: {e}")))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let is_file = entry.file_type().map(|t| t.is_file()).unwrap_or(false);
        if !is_file || !name.starts_with("weft_") {
            continue;
        }
        let path = entry.path();
        let map_err =
            |op: &str, e: String| dir_err(format!("map {name} ({}): {op}: {e}", path.display()));
        let info = match MapInfo::from_pin(&path) {
            Ok(i) => i,
            // A pin that is not a map (a program pinned at the top by an older build): not ours
            // to count.
            Err(_) if crate::sys::obj_get(&path).is_ok() => continue,
            Err(e) => return Err(map_err("opening the pin", e.to_string())),
        };
        let Some(kind) = info.map_type().ok().and_then(keyed_kind) else {
            continue;
        };
        let fd = info
            .fd()
            .map_err(|e| map_err("opening by id", e.to_string()))?;
        let max = info.max_entries();
        let count = crate::sys::count_keys(
            fd.as_fd(),
            info.key_size() as usize,
            u64::from(max).saturating_mul(2),
        )
        .map_err(|e| map_err("counting keys", e.to_string()))?;
        out.push(MapFill {
            name,
            kind: kind.to_string(),
            entries: count,
            max_entries: max,
        });
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

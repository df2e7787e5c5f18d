//! The few system calls aya does not offer: bpffs detection and mounting, directory locks,
//! interface names, and two bpf(2) commands on links (information about a tcx link, and
//! forced detach).

use std::ffi::{CStr, CString};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// `BPF_FS_MAGIC` from linux/magic.h.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

const BPF_OBJ_GET: libc::c_long = 7;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_LINK_DETACH: libc::c_long = 34;

/// `BPF_TCX_INGRESS` / `BPF_TCX_EGRESS` from linux/bpf.h.
pub(crate) const BPF_TCX_INGRESS: u32 = 46;
pub(crate) const BPF_TCX_EGRESS: u32 = 47;

fn cstring(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL byte"))
}

/// Whether `path` (which must exist) lives on a bpf filesystem.
pub(crate) fn is_bpffs(path: &Path) -> io::Result<bool> {
    let c = cstring(path)?;
    // SAFETY: statfs is plain old data; zeroed is a valid initial value.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: c is a valid NUL-terminated path and st a valid out pointer.
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    #[allow(clippy::unnecessary_cast)] // f_type's width differs between architectures
    Ok(st.f_type as i64 == BPF_FS_MAGIC)
}

/// Mounts a bpf filesystem at `target` (mode 0700, as bpffs pins hold policy).
pub(crate) fn mount_bpffs(target: &Path) -> io::Result<()> {
    let target = cstring(target)?;
    let fstype = c"bpf";
    let data = c"mode=0700";
    // SAFETY: all pointers are valid NUL-terminated strings for the duration of the call.
    let rc = unsafe {
        libc::mount(
            fstype.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            0,
            data.as_ptr().cast(),
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// An exclusive flock(2) on a directory, released on drop.
#[derive(Debug)]
pub(crate) struct DirLock {
    _fd: OwnedFd,
}

impl DirLock {
    pub(crate) fn acquire(dir: &Path) -> io::Result<Self> {
        let c = cstring(dir)?;
        // SAFETY: c is a valid path; the returned fd is checked before use.
        let fd = unsafe {
            libc::open(
                c.as_ptr(),
                libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a freshly opened descriptor we own.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        loop {
            // SAFETY: fd is open.
            if unsafe { libc::flock(fd.as_raw_fd(), libc::LOCK_EX) } == 0 {
                return Ok(Self { _fd: fd });
            }
            let err = io::Error::last_os_error();
            if err.kind() != io::ErrorKind::Interrupted {
                return Err(err);
            }
        }
    }
}

/// The name of interface `ifindex` in the calling thread's network namespace.
pub(crate) fn if_name(ifindex: u32) -> Option<String> {
    let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: buf has IF_NAMESIZE bytes, as if_indextoname requires.
    let p = unsafe { libc::if_indextoname(ifindex, buf.as_mut_ptr()) };
    if p.is_null() {
        return None;
    }
    // SAFETY: on success buf holds a NUL-terminated name.
    let name = unsafe { CStr::from_ptr(buf.as_ptr()) };
    Some(name.to_string_lossy().into_owned())
}

/// The ifindex of interface `name` in the calling thread's network namespace.
pub fn if_index(name: &str) -> Option<u32> {
    let c = CString::new(name).ok()?;
    // SAFETY: c is a valid NUL-terminated string.
    let i = unsafe { libc::if_nametoindex(c.as_ptr()) };
    (i != 0).then_some(i)
}

/// bpf(2) with an attribute buffer large enough for the commands used here.
fn bpf(cmd: libc::c_long, attr: &mut [u64; 16]) -> io::Result<libc::c_long> {
    // SAFETY: attr is a zero-initialised, 128-byte bpf_attr-compatible buffer; the kernel reads
    // and writes at most that many bytes.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr.as_mut_ptr(),
            std::mem::size_of_val(attr) as libc::c_uint,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(rc)
}

/// Opens a pinned bpf object (map, program or link).
pub(crate) fn obj_get(path: &Path) -> io::Result<OwnedFd> {
    let c = cstring(path)?;
    let mut attr = [0u64; 16];
    attr[0] = c.as_ptr() as u64; // pathname; bpf_fd and file_flags stay 0
    let fd = bpf(BPF_OBJ_GET, &mut attr)?;
    // SAFETY: BPF_OBJ_GET returned a new descriptor we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// What the kernel says about a tcx link.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct TcxLinkInfo {
    pub(crate) link_type: u32,
    pub(crate) prog_id: u32,
    /// 0 once the interface is gone.
    pub(crate) ifindex: u32,
    pub(crate) attach_type: u32,
}

/// `BPF_LINK_TYPE_TCX`.
pub(crate) const BPF_LINK_TYPE_TCX: u32 = 11;

pub(crate) fn tcx_link_info(link: BorrowedFd<'_>) -> io::Result<TcxLinkInfo> {
    // struct bpf_link_info: type, id, prog_id, then (8-aligned) the per-type union, whose tcx
    // member is { ifindex, attach_type }.
    let mut info = [0u64; 16];
    let mut attr = [0u64; 16];
    attr[0] = u64::from(link.as_raw_fd() as u32) | ((std::mem::size_of_val(&info) as u64) << 32);
    attr[1] = info.as_mut_ptr() as u64;
    bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
    let lo = |w: u64| w as u32;
    let hi = |w: u64| (w >> 32) as u32;
    Ok(TcxLinkInfo {
        link_type: lo(info[0]),
        prog_id: lo(info[1]),
        ifindex: lo(info[2]),
        attach_type: hi(info[2]),
    })
}

/// Detaches a link from its hook even if other descriptors or pins still hold it.
pub(crate) fn link_detach(link: BorrowedFd<'_>) -> io::Result<()> {
    let mut attr = [0u64; 16];
    attr[0] = u64::from(link.as_fd().as_raw_fd() as u32);
    bpf(BPF_LINK_DETACH, &mut attr).map(drop)
}

/// CLOCK_BOOTTIME now, in nanoseconds (the clock of bpf_ktime_get_boot_ns).
pub(crate) fn boottime_ns() -> u64 {
    // SAFETY: timespec is plain old data.
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    // SAFETY: ts is a valid out pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    (ts.tv_sec as u64) * 1_000_000_000 + ts.tv_nsec as u64
}

const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;

/// Counts a map's keys with `BPF_MAP_GET_NEXT_KEY` (the map's key size at runtime; aya only
/// iterates maps whose key type is known at compile time). Stops after `limit` keys: a hash map
/// that is being rewritten while it is walked can restart the walk, and a count must end.
pub(crate) fn count_keys(map: BorrowedFd<'_>, key_size: usize, limit: u64) -> io::Result<u64> {
    let mut key = vec![0u8; key_size.max(1)];
    let mut next = vec![0u8; key_size.max(1)];
    let mut n = 0u64;
    let mut first = true;
    while n < limit {
        let mut attr = [0u64; 16];
        // union bpf_attr for map element commands: map_fd (u32, 8-aligned), key, next_key.
        attr[0] = u64::from(map.as_raw_fd() as u32);
        attr[1] = if first { 0 } else { key.as_ptr() as u64 };
        attr[2] = next.as_mut_ptr() as u64;
        match bpf(BPF_MAP_GET_NEXT_KEY, &mut attr) {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => break,
            Err(e) => return Err(e),
        }
        first = false;
        n += 1;
        std::mem::swap(&mut key, &mut next);
    }
    Ok(n)
}

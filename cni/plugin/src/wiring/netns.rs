//! Network namespaces: opening `CNI_NETNS` and running code inside it.
//!
//! A namespace is entered with `setns(2)` on a thread spawned for the job
//! (namespaces are per thread), so the caller's thread never changes
//! namespace and nothing has to be switched back on an error path. Netlink
//! sockets opened on that thread talk to the pod's namespace for their whole
//! life.
//!
//! Entering is one `setns` call through `libc`: rtnetlink's
//! `NetworkNamespace` helpers create and delete named namespaces (by forking),
//! which the plugin never does; the runtime owns the pod's namespace.

use std::fs::File;
use std::os::fd::{AsRawFd, RawFd};

use crate::error::Error;

/// `statfs` magic of nsfs, where namespace files live.
const NSFS_MAGIC: i64 = 0x6e73_6673;

/// An open network namespace.
#[derive(Debug)]
pub struct Netns {
    path: String,
    file: File,
}

impl Netns {
    /// Opens the namespace at `path` (e.g. `/run/netns/x` or `/proc/<pid>/ns/net`).
    pub fn open(path: &str) -> Result<Netns, Error> {
        let missing = |reason: String| Error::NetnsMissing {
            path: path.to_string(),
            reason,
        };
        let file = File::open(path).map_err(|e| missing(e.to_string()))?;
        // SAFETY: fstatfs writes into the zeroed struct we own; the fd is open.
        let mut st: libc::statfs = unsafe { std::mem::zeroed() };
        if unsafe { libc::fstatfs(file.as_raw_fd(), &mut st) } != 0 {
            return Err(missing(std::io::Error::last_os_error().to_string()));
        }
        #[allow(clippy::unnecessary_cast)]
        if st.f_type as i64 != NSFS_MAGIC {
            return Err(missing("not a namespace file (not on nsfs): the namespace was deleted or the path is wrong".into()));
        }
        Ok(Netns {
            path: path.to_string(),
            file,
        })
    }

    /// The path it was opened from.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// The namespace's file descriptor (for moving links into it).
    pub fn fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    /// Runs `f` on a thread inside this namespace.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> Result<T, Error> + Send) -> Result<T, Error> {
        let fd = self.fd();
        let path = &self.path;
        std::thread::scope(|s| {
            let worker = s.spawn(move || {
                // SAFETY: setns on a valid namespace fd affects only this thread.
                if unsafe { libc::setns(fd, libc::CLONE_NEWNET) } != 0 {
                    return Err(Error::NetnsMissing {
                        path: path.clone(),
                        reason: format!("cannot enter it: {}", std::io::Error::last_os_error()),
                    });
                }
                f()
            });
            match worker.join() {
                Ok(r) => r,
                Err(panic) => std::panic::resume_unwind(panic),
            }
        })
    }
}

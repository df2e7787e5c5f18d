//! What can go wrong, each naming what failed and where (map, pin path, interface, program).

use std::fmt;
use std::path::PathBuf;

/// A boxed underlying error (aya's, or the OS's).
pub type Cause = Box<dyn std::error::Error + Send + Sync + 'static>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "{path} is not on a bpf filesystem and mounting one at {mount} failed: {}; \
         mount it (mount -t bpf bpf {mount}) or choose a pin directory on bpffs",
        Chain(.cause), path = .path.display(), mount = .mount.display()
    )]
    BpfFs {
        path: PathBuf,
        mount: PathBuf,
        cause: Cause,
    },

    #[error("pin directory {}: {reason}", .path.display())]
    PinDir { path: PathBuf, reason: String },

    #[error(
        "loading the eBPF object weft_lxc.o (maps pinned under {}): {} \
         (needs root, Linux >= 6.6 with BTF)",
        .pin_dir.display(), Chain(.cause)
    )]
    Load { pin_dir: PathBuf, cause: Cause },

    #[error("program {program} ({}): {op}: {}", .path.display(), Chain(.cause))]
    Program {
        program: &'static str,
        path: PathBuf,
        op: &'static str,
        cause: Cause,
    },

    #[error("map {map} ({}): {op}: {}", .path.display(), Chain(.cause))]
    Map {
        map: &'static str,
        path: PathBuf,
        op: String,
        cause: Cause,
    },

    #[error(
        "no interface with ifindex {ifindex} in this thread's network namespace \
         (attach runs where the host-side veth lives)"
    )]
    NoInterface { ifindex: u32 },

    #[error(
        "{op} {program} on {interface} (ifindex {ifindex}, tc {hook}, link {}): {}",
        .link.display(), Chain(.cause)
    )]
    Attach {
        op: &'static str,
        program: &'static str,
        interface: String,
        ifindex: u32,
        hook: &'static str,
        link: PathBuf,
        cause: Cause,
    },

    #[error("policy for endpoint {ep_id}, entry #{index} ({entry}): {reason}")]
    InvalidEntry {
        ep_id: u32,
        index: usize,
        entry: String,
        reason: String,
    },

    #[error(
        "addresses of ifindex {ifindex}: {count} IPv{family} addresses, the datapath holds at \
         most {max} per family"
    )]
    TooManyAddresses {
        ifindex: u32,
        family: u8,
        count: usize,
        max: usize,
    },

    #[error("service frontend {frontend} (id {svc_id}): {reason}")]
    InvalidService {
        frontend: String,
        svc_id: u32,
        reason: String,
    },

    #[error("flow reader on {}: {}", .path.display(), Chain(.cause))]
    Flows { path: PathBuf, cause: Cause },
}

/// Displays an error with its sources, `a: b: c` (aya's errors keep the OS error in `source`).
pub(crate) struct Chain<'a>(pub &'a Cause);

impl fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut err: Option<&(dyn std::error::Error + 'static)> = Some(self.0.as_ref());
        let mut first = true;
        let mut last = String::new();
        while let Some(e) = err {
            let text = e.to_string();
            // Some errors repeat their source's text in their own: print it once.
            if !last.contains(&text) {
                if !first {
                    f.write_str(": ")?;
                }
                f.write_str(&text)?;
                first = false;
            }
            last = text;
            err = e.source();
        }
        Ok(())
    }
}

pub(crate) fn cause<E: std::error::Error + Send + Sync + 'static>(e: E) -> Cause {
    Box::new(e)
}

pub(crate) fn cause_msg(msg: impl Into<String>) -> Cause {
    msg.into().into()
}

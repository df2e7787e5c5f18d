//! CPU pinning with `sched_setaffinity`.
//!
//! The load generator pins its own thread before it builds its runtime (so
//! every thread it starts inherits the mask); children are pinned between
//! `fork` and `exec`, so that no thread of theirs ever runs elsewhere.

use std::io;
use std::os::unix::process::CommandExt as _;
use std::process::Command;

fn cpu_set(cpu: usize) -> io::Result<libc::cpu_set_t> {
    if cpu >= libc::CPU_SETSIZE as usize {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("CPU {cpu} is out of range"),
        ));
    }
    // SAFETY: cpu_set_t is a plain bit array for which all-zero is the empty
    // set; CPU_SET writes one bit inside it (cpu < CPU_SETSIZE checked above).
    let set = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_ZERO(&mut set);
        libc::CPU_SET(cpu, &mut set);
        set
    };
    Ok(set)
}

/// CPUs online on this machine.
pub fn online_cpus() -> usize {
    // SAFETY: sysconf has no preconditions.
    let n = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    usize::try_from(n).ok().filter(|&n| n > 0).unwrap_or(1)
}

/// Pins the calling thread (and every thread it starts later) to `cpu`.
pub fn pin_current_thread(cpu: usize) -> io::Result<()> {
    let set = cpu_set(cpu)?;
    // SAFETY: the pointer and size describe a valid, initialised cpu_set_t.
    let rc = unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Makes the child `cmd` starts run only on `cpu`, from its first
/// instruction after `exec`.
pub fn pin_command(cmd: &mut Command, cpu: usize) -> io::Result<()> {
    let set = cpu_set(cpu)?;
    // SAFETY: the closure runs in the forked child before exec; it makes one
    // async-signal-safe system call on a stack copy of `set` and allocates
    // nothing.
    unsafe {
        cmd.pre_exec(move || {
            if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) == 0 {
                Ok(())
            } else {
                Err(io::Error::last_os_error())
            }
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_out_of_range_cpus() {
        assert!(cpu_set(100_000).is_err());
        assert!(cpu_set(0).is_ok());
    }

    #[test]
    fn pinned_child_reports_its_mask() {
        let mut cmd = Command::new("grep");
        cmd.args(["Cpus_allowed_list", "/proc/self/status"]);
        pin_command(&mut cmd, 0).expect("pin");
        let out = cmd.output().expect("run grep");
        let text = String::from_utf8_lossy(&out.stdout);
        assert_eq!(text.split_whitespace().nth(1), Some("0"), "{text}");
    }
}

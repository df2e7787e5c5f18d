//! Compiles the eBPF C in cni/bpf with clang (`-target bpf`) into `$OUT_DIR/weft_lxc.o`, which
//! the crate embeds. Set `CLANG` to use another clang binary.

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    let manifest =
        PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let bpf_dir = manifest.join("../bpf");
    let out = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let object = out.join("weft_lxc.o");

    println!("cargo:rerun-if-changed={}", bpf_dir.display());
    println!("cargo:rerun-if-env-changed=CLANG");
    for file in c_files(&bpf_dir) {
        println!("cargo:rerun-if-changed={}", file.display());
    }

    let clang = env::var("CLANG").unwrap_or_else(|_| "clang".to_string());
    let target = match env::var("CARGO_CFG_TARGET_ENDIAN").as_deref() {
        Ok("big") => "bpfeb",
        _ => "bpfel",
    };
    let mut cmd = Command::new(&clang);
    cmd.args([
        "-target", target, "-O2", "-g", "-mcpu=v3", "-Wall", "-Wextra",
    ])
    .arg("-I")
    .arg(bpf_dir.join("include"))
    .arg("-I")
    .arg(&bpf_dir);
    // The kernel UAPI headers include <asm/types.h>, which Debian keeps under the multiarch
    // directory; a bpf target does not search it by itself.
    if let Some(triple) = multiarch() {
        let dir = Path::new("/usr/include").join(triple);
        if dir.is_dir() {
            cmd.arg("-idirafter").arg(dir);
        }
    }
    cmd.arg("-c")
        .arg(bpf_dir.join("weft_lxc.c"))
        .arg("-o")
        .arg(&object);

    let output = match cmd.output() {
        Ok(output) => output,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => fail(&format!(
            "`{clang}` not found: the eBPF programs in cni/bpf are compiled with clang -target bpf \
             and need libbpf's headers; run scripts/setup.sh (installs clang, libbpf-dev, bpftool), \
             or set CLANG to a clang binary"
        )),
        Err(e) => fail(&format!("running `{clang}`: {e}")),
    };
    let stderr = String::from_utf8_lossy(&output.stderr);
    if !output.status.success() {
        let hint = if stderr.contains("bpf/bpf_helpers.h") {
            " (libbpf's headers are missing: run scripts/setup.sh, which installs libbpf-dev)"
        } else if stderr.contains("asm/") {
            " (kernel UAPI headers are missing: install linux-libc-dev)"
        } else {
            ""
        };
        fail(&format!(
            "compiling cni/bpf/weft_lxc.c with `{clang}` failed{hint}:\n{stderr}"
        ));
    }
    for line in stderr.lines().filter(|l| !l.trim().is_empty()) {
        println!("cargo:warning=clang: {line}");
    }

    // A stable fingerprint of the object: pinned programs are kept per fingerprint, so an
    // agent restart with the same build reuses them and a new build replaces them.
    let bytes = std::fs::read(&object)
        .unwrap_or_else(|e| fail(&format!("reading {}: {e}", object.display())));
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    println!("cargo:rustc-env=WEFT_LXC_OBJECT_HASH={hash:016x}");

    // The overlay program (tc egress of the VXLAN device): an object of its own, loaded by
    // src/overlay.rs only on nodes that encapsulate.
    compile_other(&clang, target, &bpf_dir, "weft_overlay", &out);
    // NodePort on the node's external interface (cni/bpf/weft_nodeport.c, src/nodeport.rs).
    compile_other(&clang, target, &bpf_dir, "weft_nodeport", &out);
}

/// Compiles `cni/bpf/<name>.c` into `$OUT_DIR/<name>.o` with the flags used for weft_lxc.c.
fn compile_other(clang: &str, target: &str, bpf_dir: &Path, name: &str, out: &Path) {
    let mut cmd = Command::new(clang);
    cmd.args([
        "-target", target, "-O2", "-g", "-mcpu=v3", "-Wall", "-Wextra",
    ])
    .arg("-I")
    .arg(bpf_dir.join("include"))
    .arg("-I")
    .arg(bpf_dir);
    if let Some(triple) = multiarch() {
        let dir = Path::new("/usr/include").join(triple);
        if dir.is_dir() {
            cmd.arg("-idirafter").arg(dir);
        }
    }
    cmd.arg("-c")
        .arg(bpf_dir.join(format!("{name}.c")))
        .arg("-o")
        .arg(out.join(format!("{name}.o")));
    let output = cmd
        .output()
        .unwrap_or_else(|e| fail(&format!("running `{clang}`: {e}")));
    let stderr = String::from_utf8_lossy(&output.stderr);
    if !output.status.success() {
        fail(&format!(
            "compiling cni/bpf/{name}.c with `{clang}` failed:\n{stderr}"
        ));
    }
    for line in stderr.lines().filter(|l| !l.trim().is_empty()) {
        println!("cargo:warning=clang: {line}");
    }
}

fn c_files(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let mut dirs = vec![dir.to_path_buf()];
    while let Some(d) = dirs.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                dirs.push(path);
            } else if matches!(path.extension().and_then(|e| e.to_str()), Some("c" | "h")) {
                files.push(path);
            }
        }
    }
    files.sort();
    files
}

fn multiarch() -> Option<&'static str> {
    match env::var("CARGO_CFG_TARGET_ARCH").ok()?.as_str() {
        "x86_64" => Some("x86_64-linux-gnu"),
        "aarch64" => Some("aarch64-linux-gnu"),
        "arm" => Some("arm-linux-gnueabihf"),
        "riscv64" => Some("riscv64-linux-gnu"),
        "powerpc64" => Some("powerpc64le-linux-gnu"),
        "s390x" => Some("s390x-linux-gnu"),
        _ => None,
    }
}

fn fail(msg: &str) -> ! {
    eprintln!("error: {msg}");
    panic!("weft-datapath build failed: {msg}");
}

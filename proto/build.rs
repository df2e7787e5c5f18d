//! Compiles `proto/weft/*.proto` with protox (a pure-Rust protobuf
//! compiler, so no `protoc` is needed on the machine) and generates the
//! prost messages and tonic clients/servers into `OUT_DIR`. The .proto files
//! are the one source of truth; nothing generated is committed, so there is
//! nothing to drift.

use std::path::PathBuf;

const FILES: &[&str] = &[
    "proto/weft/net.proto",
    "proto/weft/destination.proto",
    "proto/weft/policy.proto",
    "proto/weft/identity.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?);
    let files: Vec<PathBuf> = FILES.iter().map(|f| root.join(f)).collect();
    for f in &files {
        println!("cargo:rerun-if-changed={}", f.display());
    }
    let fds = protox::compile(&files, [root.join("proto")])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    Ok(())
}

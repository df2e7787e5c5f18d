#!/usr/bin/env bash
# The whole test suite, as CI runs it: system packages, formatting, lints, build, every test tier
# (unit, loopback, network namespaces when root), and a release smoke run of the benchmark.
# Honours CARGO_TARGET_DIR.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
target_dir="${CARGO_TARGET_DIR:-$PWD/target}"

stage() { printf '\n==> %s\n' "$*"; }

stage "setup (system packages)"
bash scripts/setup.sh

stage "cargo fmt --all --check"
cargo fmt --all --check

stage "cargo clippy --workspace --all-targets -- -D warnings"
cargo clippy --workspace --all-targets -- -D warnings

# The end-to-end tests run the binaries from target/<profile>/, so build them first.
stage "cargo build --workspace --bins"
cargo build --workspace --bins

stage "cargo test --workspace"
cargo test --workspace

stage "cargo build --release -p weft-proxy -p weft-bench"
cargo build --release -p weft-proxy -p weft-bench

stage "weft-bench run --quick (smoke)"
"$target_dir/release/weft-bench" run --quick --out-dir "$(mktemp -d)"

stage "all tests passed"

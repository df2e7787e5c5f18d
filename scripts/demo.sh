#!/usr/bin/env bash
# Runs the local demo: needs only a Rust toolchain (no root, no system packages).
# Arguments are passed to `weft demo`. Honours CARGO_TARGET_DIR.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
target_dir="${CARGO_TARGET_DIR:-$PWD/target}"

cargo build --release -p weft-proxy -p weft-controller -p weft-cli
exec "$target_dir/release/weft" demo "$@"

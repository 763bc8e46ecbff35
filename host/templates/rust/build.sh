#!/usr/bin/env bash
# Build {{module}} (needs: rustup target add wasm32-wasip2).
set -euo pipefail
cd "$(dirname "$0")"
# With instances = "per-event" (the default) a fresh instance costs more the more linear
# memory the guest starts with, and Rust reserves a 1 MiB stack at its start. If this
# handler does not recurse deeply, a 64 KiB stack cut the host's CPU per event by 12 % in
# wasmev's benchmark (README, "Instances"); a guest that outgrows it traps. To use it:
#   export RUSTFLAGS="-C link-arg=-zstack-size=65536"
cargo build --release --target wasm32-wasip2

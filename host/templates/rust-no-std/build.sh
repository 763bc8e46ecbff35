#!/usr/bin/env bash
# Build {{module}} (needs: rustup target add wasm32-wasip2).
set -euo pipefail
cd "$(dirname "$0")"
# Built without std, the component imports wasmev's interfaces and no WASI one, so a fresh
# instance (instances = "per-event", the default) has fewer imports to wire up. A 64 KiB
# stack instead of Rust's 1 MiB makes it cheaper still, if this handler does not recurse
# deeply (a guest that outgrows it traps; README, "Instances"). To use it:
#   export RUSTFLAGS="-C link-arg=-zstack-size=65536"
cargo build --release --target wasm32-wasip2

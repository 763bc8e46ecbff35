#!/usr/bin/env bash
# Build {{module}}. Needs wit-bindgen (cargo install --locked wit-bindgen-cli@0.63.0),
# clang for wasm32-wasi (Debian: apt-get install -y clang-22 lld-22 wasi-libc
# libclang-rt-22-dev-wasm32) and the Rust toolchain, whose wasm-component-ld links the
# core module into a component with the WASI reactor adapter.
set -euo pipefail
cd "$(dirname "$0")"
CC=${CC:-clang-22}
component_ld="$(rustc --print sysroot)/lib/rustlib/$(rustc -vV | sed -n 's/^host: //p')/bin/wasm-component-ld"
# (wit-bindgen lists each file it writes; show its output only when it fails.)
if ! out=$(wit-bindgen c wit --world handler --out-dir gen 2>&1); then echo "$out" >&2; exit 1; fi
"$CC" --target=wasm32-wasi -Wno-deprecated --sysroot=/usr -O2 -Wall -Wextra -Werror \
  -mexec-model=reactor -Igen handler.c gen/handler.c gen/handler_component_type.o \
  -fuse-ld="$component_ld" -o {{module}}

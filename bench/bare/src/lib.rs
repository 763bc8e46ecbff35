//! The floor's reference component (`bench/bare`): `handle(list<u8>)`, importing nothing.
//!
//! The performance issue's premise ("a call on a reused instance ~0.2 µs, a fresh instance
//! ~2.6 µs") is about a component like this one. The floor measures it beside the echo
//! handler on the same engine settings, so the table shows how much of the echo's cost is
//! any component call on this machine and how much is wasmev's interface (the event
//! record, the publish import).

#![no_std]

extern crate alloc;

use alloc::vec::Vec;

wit_bindgen::generate!({ path: "wit", world: "bare" });

struct Bare;

impl Guest for Bare {
    fn handle(payload: Vec<u8>) {
        // Taken and freed, as a handler would; kept from being optimised out.
        core::hint::black_box(payload);
    }
}

export!(Bare);

// The heap a std-free scaffold gets (`wasmev new --lang rust-no-std`): wasi-libc's
// allocator, which also defines the canonical ABI's `cabi_realloc` the host places the
// payload with, so the list is freed by the allocator that made it.
#[path = "../../../host/templates/rust-no-std/src/heap.rs"]
mod heap;

#[cfg(target_arch = "wasm32")]
#[panic_handler]
fn panic(_: &core::panic::PanicInfo) -> ! {
    core::arch::wasm32::unreachable()
}

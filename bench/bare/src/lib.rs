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
use core::alloc::{GlobalAlloc, Layout};

wit_bindgen::generate!({ path: "wit", world: "bare" });

struct Bare;

impl Guest for Bare {
    fn handle(payload: Vec<u8>) {
        // Taken and freed, as a handler would; kept from being optimised out.
        core::hint::black_box(payload);
    }
}

export!(Bare);

// The heap, as the SDK's `no_std` build has it (`guest-sdk/src/no_std.rs`): wasi-libc's
// allocator, which also defines the canonical ABI's `cabi_realloc` the host places the
// payload with, so the list is freed by the allocator that made it.
#[link(name = "c")]
unsafe extern "C" {
    fn aligned_alloc(align: usize, size: usize) -> *mut u8;
    fn free(ptr: *mut u8);
    fn cabi_realloc(ptr: *mut u8, old: usize, align: usize, new: usize) -> *mut u8;
}

struct LibcAlloc;

unsafe impl GlobalAlloc for LibcAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: wasi-libc's allocator; null is the allocation error `GlobalAlloc` expects.
        unsafe { aligned_alloc(layout.align(), layout.size()) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, _: Layout) {
        // SAFETY: `ptr` came from wasi-libc's allocator, here or in `cabi_realloc`.
        unsafe { free(ptr) }
    }
}

#[global_allocator]
static ALLOCATOR: LibcAlloc = LibcAlloc;

/// Keeps the linker from dropping wasi-libc's `cabi_realloc`, which nothing here calls.
#[used]
static LINK_CABI_REALLOC: unsafe extern "C" fn(*mut u8, usize, usize, usize) -> *mut u8 =
    cabi_realloc;

#[cfg(target_arch = "wasm32")]
#[panic_handler]
fn panic(_: &core::panic::PanicInfo) -> ! {
    core::arch::wasm32::unreachable()
}

//! The benchmarks' echo handler (`bench/echo`) without Rust's standard library.
//!
//! A Rust component built with std imports a dozen WASI interfaces whether or not the
//! handler uses them (std's stderr for panic messages, wasi-libc's stdio set-up and
//! environment, `exit`), and a fresh instance pays for lowering every one of them. This
//! build imports wasmev's `publisher` and nothing else, so the benchmarks can price those
//! imports: the same echo, instantiated with and without them.
//!
//! It uses wit-bindgen directly (the SDK needs std), wasi-libc's `malloc` for its heap (it
//! carves the initial memory, as std's allocator does on this target), and traps on a
//! panic.

#![no_std]

extern crate alloc;

use alloc::string::String;
use core::alloc::{GlobalAlloc, Layout};

#[allow(clippy::too_many_arguments)] // wit-bindgen's generated glue
mod bindings {
    wit_bindgen::generate!({ path: "../../wit", world: "handler" });
}

use bindings::Guest;
use bindings::wasmev::events::publisher::publish;
use bindings::wasmev::events::types::{Event, HandleError};

/// Answered without publishing, as `bench/echo` does.
const QUIET: &str = "bench.quiet";

struct Echo;

impl Guest for Echo {
    fn handle(event: Event) -> Result<(), HandleError> {
        if event.subject != QUIET {
            publish("bench.out", &event.payload, &[])
                .map_err(|_| HandleError::Reject(String::from("publish refused")))?;
        }
        Ok(())
    }
}

bindings::export!(Echo with_types_in bindings);

#[link(name = "c")]
unsafe extern "C" {
    fn malloc(size: usize) -> *mut u8;
    fn aligned_alloc(align: usize, size: usize) -> *mut u8;
    fn realloc(ptr: *mut u8, size: usize) -> *mut u8;
    fn free(ptr: *mut u8);
}

/// wasi-libc's allocator, which aligns to 16 bytes on its own.
struct LibcAlloc;

const MALLOC_ALIGN: usize = 16;

unsafe impl GlobalAlloc for LibcAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: wasi-libc's allocator; a null return is the allocation error.
        unsafe {
            if layout.align() <= MALLOC_ALIGN {
                malloc(layout.size())
            } else {
                aligned_alloc(layout.align(), layout.size())
            }
        }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, _: Layout) {
        // SAFETY: `ptr` came from `alloc` or `realloc` above.
        unsafe { free(ptr) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, size: usize) -> *mut u8 {
        if layout.align() <= MALLOC_ALIGN {
            // SAFETY: `ptr` came from this allocator with an alignment malloc gives.
            return unsafe { realloc(ptr, size) };
        }
        // SAFETY: as `GlobalAlloc::realloc`'s default: allocate, copy, free.
        unsafe {
            let new = self.alloc(Layout::from_size_align_unchecked(size, layout.align()));
            if !new.is_null() {
                core::ptr::copy_nonoverlapping(ptr, new, layout.size().min(size));
                free(ptr);
            }
            new
        }
    }
}

#[global_allocator]
static ALLOCATOR: LibcAlloc = LibcAlloc;

/// The canonical ABI's allocator entry: the host calls it to place the event's strings
/// and payload in this instance's memory.
#[unsafe(no_mangle)]
unsafe extern "C" fn cabi_realloc(ptr: *mut u8, old: usize, align: usize, new: usize) -> *mut u8 {
    // SAFETY: the canonical ABI passes a valid alignment, and an old pointer and size it
    // got from this function.
    unsafe {
        let layout = Layout::from_size_align_unchecked(old, align);
        if old == 0 {
            if new == 0 {
                return align as *mut u8;
            }
            alloc::alloc::alloc(Layout::from_size_align_unchecked(new, align))
        } else {
            alloc::alloc::realloc(ptr, layout, new)
        }
    }
}

#[panic_handler]
fn panic(_: &core::panic::PanicInfo) -> ! {
    core::arch::wasm32::unreachable()
}

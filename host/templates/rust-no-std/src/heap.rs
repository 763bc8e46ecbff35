//! The heap std would supply a component: wasi-libc's allocator, and the canonical ABI's
//! allocator entry on it.

use core::alloc::{GlobalAlloc, Layout};

#[link(name = "c")]
unsafe extern "C" {
    fn aligned_alloc(align: usize, size: usize) -> *mut u8;
    fn free(ptr: *mut u8);
    fn cabi_realloc(ptr: *mut u8, old: usize, align: usize, new: usize) -> *mut u8;
}

/// wasi-libc's allocator, as std uses on this target. It takes the initial memory's free
/// space first, so a handler with a small heap never grows its memory.
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

/// The canonical ABI's allocator, which the host calls to place an event in this
/// instance's memory: wasi-libc defines it on the same heap. Nothing here calls it; this
/// keeps the linker from dropping it.
#[used]
static LINK_CABI_REALLOC: unsafe extern "C" fn(*mut u8, usize, usize, usize) -> *mut u8 =
    cabi_realloc;

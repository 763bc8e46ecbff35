//! What std would supply a component: a heap, the canonical ABI's allocator entry, and a
//! panic handler.

use core::alloc::{GlobalAlloc, Layout};

use crate::wasmev::events::log;
use crate::wasmev::events::types::Level;

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

/// A panic logs its message at error level through wasmev's `log` import (std would print
/// it to stderr, which this component does not import), then traps: the host reports the
/// trap and retries or dead-letters the event.
#[cfg(target_arch = "wasm32")]
#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    use core::sync::atomic::{AtomicBool, Ordering};

    // The message is formatted on the heap; a panic while doing so (the allocator's own,
    // say) traps at once.
    static PANICKING: AtomicBool = AtomicBool::new(false);
    if !PANICKING.swap(true, Ordering::Relaxed) {
        let message = match info.location() {
            Some(at) => alloc::format!("panicked at {at}: {}", info.message()),
            None => alloc::format!("panicked: {}", info.message()),
        };
        log::log(Level::Error, &message);
    }
    core::arch::wasm32::unreachable()
}

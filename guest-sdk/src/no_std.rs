//! What std supplies a component and a `no_std` one must get elsewhere: a heap, the
//! canonical ABI's allocator entry, and a panic handler.

use core::alloc::{GlobalAlloc, Layout};

#[link(name = "c")]
unsafe extern "C" {
    fn malloc(size: usize) -> *mut u8;
    fn aligned_alloc(align: usize, size: usize) -> *mut u8;
    fn realloc(ptr: *mut u8, size: usize) -> *mut u8;
    fn free(ptr: *mut u8);
}

/// wasi-libc's allocator, as std uses on this target. It takes the initial memory's free
/// space first, so a handler with a small heap never grows its memory (an allocator that
/// always grows it, such as the `dlmalloc` crate, makes every fresh instance slower).
struct LibcAlloc;

/// The alignment wasi-libc's `malloc` gives every block.
const MALLOC_ALIGN: usize = 16;

unsafe impl GlobalAlloc for LibcAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: wasi-libc's allocator; null is the allocation error `GlobalAlloc` expects.
        unsafe {
            if layout.align() <= MALLOC_ALIGN {
                malloc(layout.size())
            } else {
                aligned_alloc(layout.align(), layout.size())
            }
        }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, _: Layout) {
        // SAFETY: `ptr` came from `alloc` or `realloc` here.
        unsafe { free(ptr) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, size: usize) -> *mut u8 {
        if layout.align() <= MALLOC_ALIGN {
            // SAFETY: `ptr` came from this allocator, at an alignment `malloc` keeps.
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

/// The canonical ABI's allocator: the host calls it to place an event's strings and
/// payload, and the replies of imports, in this instance's memory. wasi-libc defines it
/// (on `malloc` and `realloc`, as above); this reference keeps the linker from dropping
/// it, as wit-bindgen's `maybe_link_cabi_realloc` does where it supplies its own. (With
/// std, std's own use of wasi-libc links it.)
#[used]
static LINK_CABI_REALLOC: unsafe extern "C" fn(*mut u8, usize, usize, usize) -> *mut u8 =
    cabi_realloc;

#[link(name = "c")]
unsafe extern "C" {
    fn cabi_realloc(ptr: *mut u8, old: usize, align: usize, new: usize) -> *mut u8;
}

/// A panic traps: the host reports the trap and retries or dead-letters the event. The
/// message is lost (printing it is what std's WASI imports are for).
#[cfg(target_arch = "wasm32")]
#[panic_handler]
fn panic(_: &core::panic::PanicInfo) -> ! {
    core::arch::wasm32::unreachable()
}

//! What std supplies a component and a `no_std` one must get elsewhere: a heap, the
//! canonical ABI's allocator entry, and a panic handler that reports the message.

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

/// A panic logs its message and location at error level through wasmev's `log` import
/// (std prints it to stderr, which a `no_std` handler does not import), then traps: the
/// host reports the trap and retries or dead-letters the event.
#[cfg(target_arch = "wasm32")]
#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    use core::fmt::Write;
    use core::sync::atomic::{AtomicBool, Ordering};

    // A panic while logging one (a `Display` impl that panics, say) traps at once. Never
    // cleared: the host drops an instance that trapped, in either `instances` mode.
    static PANICKING: AtomicBool = AtomicBool::new(false);
    if !PANICKING.swap(true, Ordering::Relaxed) {
        let mut line = Line::default();
        let _ = write!(line, "panicked");
        if let Some(at) = info.location() {
            let _ = write!(line, " at {at}");
        }
        let _ = write!(line, ": {}", info.message());
        crate::log(crate::Level::Error, line.as_str());
    }
    core::arch::wasm32::unreachable()
}

/// A panic's log line, formatted on the stack: the panic may be the allocator's, so it
/// must not allocate. What does not fit is cut at a character boundary.
struct Line {
    bytes: [u8; Line::CAP],
    len: usize,
}

impl Line {
    /// Less than the host's 4 KiB cut of a guest's log line: the buffer is on the shadow
    /// stack, which a `per-event` handler may link as small as 64 KiB (the README's
    /// "Instances"), and a panic message is rarely near 1 KiB.
    const CAP: usize = 1024;

    fn as_str(&self) -> &str {
        // Only whole characters of `str`s are ever copied in; were one cut anyway, the
        // text up to it is still the message.
        let bytes = &self.bytes[..self.len];
        core::str::from_utf8(bytes)
            .unwrap_or_else(|e| core::str::from_utf8(&bytes[..e.valid_up_to()]).unwrap_or_default())
    }
}

impl Default for Line {
    fn default() -> Self {
        Line {
            bytes: [0; Line::CAP],
            len: 0,
        }
    }
}

impl core::fmt::Write for Line {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        let mut n = s.len().min(Line::CAP - self.len);
        while !s.is_char_boundary(n) {
            n -= 1;
        }
        self.bytes[self.len..self.len + n].copy_from_slice(&s.as_bytes()[..n]);
        self.len += n;
        Ok(())
    }
}

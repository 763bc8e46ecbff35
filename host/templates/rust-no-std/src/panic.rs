//! The panic handler std would supply, reporting through wasmev's log instead of stderr.

use crate::wasmev::events::log;
use crate::wasmev::events::types::Level;

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

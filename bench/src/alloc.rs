//! The benchmarks' allocator: mimalloc, as the `wasmev` binary has, counting the
//! allocations each thread makes, so the floor can say how many one event costs.
//!
//! Why a wrapper of our own: the counting crates (`stats_alloc`, `cap`) keep one counter
//! for the process in shared atomics, which every thread would then write on each
//! allocation; the throughput figures would pay for that contention, and wasmev (more
//! allocations per event than the baseline) more than the baseline. A per-thread count
//! costs a thread-local add, and the floor runs on one thread.

use std::alloc::{GlobalAlloc, Layout};
use std::cell::Cell;

pub struct Counting(pub mimalloc::MiMalloc);

thread_local! {
    static ALLOCATIONS: Cell<u64> = const { Cell::new(0) };
}

/// Allocations (a `realloc` counts as one) this thread has made so far.
pub fn allocations() -> u64 {
    ALLOCATIONS.with(Cell::get)
}

fn count() {
    // Err only while the thread is being torn down: nothing measures then.
    let _ = ALLOCATIONS.try_with(|n| n.set(n.get() + 1));
}

// SAFETY: every call is passed on unchanged to mimalloc, which upholds GlobalAlloc's
// contract; counting touches a const-initialised thread-local with no destructor, so it
// neither allocates nor can observe the memory handed out.
#[allow(unsafe_code)]
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count();
        // SAFETY: the caller's guarantees for `layout` are passed on.
        unsafe { self.0.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count();
        // SAFETY: as for `alloc`.
        unsafe { self.0.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count();
        // SAFETY: `ptr` came from this allocator (so from mimalloc) with `layout`.
        unsafe { self.0.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from this allocator (so from mimalloc) with `layout`.
        unsafe { self.0.dealloc(ptr, layout) }
    }
}

#[cfg(test)]
mod tests {
    use super::allocations;

    #[test]
    fn each_allocation_on_this_thread_is_counted_once() {
        let before = allocations();
        let boxes: Vec<Box<u64>> = (0..10).map(Box::new).collect();
        // 10 boxes and the vector's one allocation (its size is known up front).
        assert_eq!(allocations() - before, 11);
        drop(boxes);
        assert_eq!(allocations() - before, 11, "a free was counted");
    }

    #[test]
    fn another_threads_allocations_are_not_counted_here() {
        use std::sync::Barrier;
        let (start, end) = (Barrier::new(2), Barrier::new(2));
        std::thread::scope(|s| {
            s.spawn(|| {
                start.wait();
                let mut theirs = allocations();
                for _ in 0..100 {
                    drop(std::hint::black_box(vec![1u8; 64]));
                }
                theirs = allocations() - theirs;
                end.wait();
                assert_eq!(theirs, 100, "the other thread's own count");
            });
            // Spawning allocates here; only what happens between the barriers counts.
            let before = allocations();
            start.wait();
            end.wait();
            assert_eq!(allocations() - before, 0);
        });
    }
}

//! The benchmarks' allocator: mimalloc, as the `wasmev` binary has, counting the
//! allocations each thread makes, so the floor can say how many one event costs on its
//! thread, and the NATS rows how many the worker threads make per event.
//!
//! Why a wrapper of our own: the counting crates (`stats_alloc`, `cap`) keep one counter
//! for the process in shared atomics, which every thread would then write on each
//! allocation; the throughput figures would pay for that contention, and wasmev (more
//! allocations per event than the baseline) more than the baseline. Here each thread
//! counts in a tally of its own, on a cache line of its own, that only it writes (a plain
//! load and store, no locked instruction); other threads only read the tallies, to sum
//! the worker threads'.

use std::alloc::{GlobalAlloc, Layout};
use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};

pub struct Counting(pub mimalloc::MiMalloc);

/// Threads that get a tally; a thread started after these is not counted. Why 1024: a
/// whole `./scripts/bench` run starts a few dozen (tokio's blocking threads come and go,
/// each new one takes a tally), and the tallies are 128 KiB of zeroed statics.
const THREADS: usize = 1024;

/// One thread's count; aligned so that no two threads write the same cache line.
#[repr(align(128))]
struct Tally {
    allocations: AtomicU64,
    /// Set by [`mark_worker`]: counted by [`worker_allocations`].
    worker: AtomicBool,
}

static TALLIES: [Tally; THREADS] = [const {
    Tally {
        allocations: AtomicU64::new(0),
        worker: AtomicBool::new(false),
    }
}; THREADS];

/// Tallies handed out so far (may pass [`THREADS`]: those threads have none).
static CLAIMED: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    /// This thread's index into [`TALLIES`]; `usize::MAX` until its first allocation.
    static MINE: Cell<usize> = const { Cell::new(usize::MAX) };
}

/// This thread's tally, claimed on first use; `None` past [`THREADS`] threads, or while
/// the thread is being torn down.
fn mine() -> Option<&'static Tally> {
    let index = MINE
        .try_with(|mine| {
            if mine.get() == usize::MAX {
                mine.set(CLAIMED.fetch_add(1, Relaxed));
            }
            mine.get()
        })
        .ok()?;
    TALLIES.get(index)
}

/// Allocations (a `realloc` counts as one) this thread has made so far.
pub fn allocations() -> u64 {
    mine().map_or(0, |t| t.allocations.load(Relaxed))
}

/// Count this thread's allocations in [`worker_allocations`]: the bench's runtime calls
/// it on each of its threads as they start (the host's or the baseline's workers).
pub fn mark_worker() {
    if let Some(tally) = mine() {
        tally.worker.store(true, Relaxed);
    }
}

/// Allocations every thread marked with [`mark_worker`] has made so far, those that have
/// exited included (so a difference of two readings is what the workers made between
/// them, however threads came and went).
pub fn worker_allocations() -> u64 {
    TALLIES[..CLAIMED.load(Relaxed).min(THREADS)]
        .iter()
        .filter(|t| t.worker.load(Relaxed))
        .map(|t| t.allocations.load(Relaxed))
        .sum()
}

fn count() {
    if let Some(tally) = mine() {
        // Only this thread writes its tally: no read-modify-write needed.
        tally
            .allocations
            .store(tally.allocations.load(Relaxed) + 1, Relaxed);
    }
}

// SAFETY: every call is passed on unchanged to mimalloc, which upholds GlobalAlloc's
// contract; counting touches a const-initialised thread-local with no destructor and
// statics, so it neither allocates nor can observe the memory handed out.
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
    use super::{allocations, mark_worker, worker_allocations};

    fn allocate_100() {
        for _ in 0..100 {
            drop(std::hint::black_box(vec![1u8; 64]));
        }
    }

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
                allocate_100();
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

    #[test]
    fn worker_threads_are_summed_even_after_they_end_and_other_threads_are_not() {
        // The only test that marks a thread, so nothing else moves the sum meanwhile.
        let unmarked = std::thread::spawn(|| {
            let before = worker_allocations();
            allocate_100();
            worker_allocations() - before
        });
        assert_eq!(unmarked.join().unwrap(), 0, "an unmarked thread was summed");

        let marked = std::thread::spawn(|| {
            mark_worker();
            let before = worker_allocations();
            allocate_100();
            let made = worker_allocations() - before;
            (made, worker_allocations())
        });
        let (made, at_its_end) = marked.join().unwrap();
        assert_eq!(made, 100, "the marked thread's own allocations");
        assert!(
            worker_allocations() >= at_its_end,
            "an ended worker's allocations left the sum"
        );
    }
}

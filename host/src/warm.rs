//! Warm instances for handlers with `instances = "reuse"`.
//!
//! A fresh instance per event costs a few microseconds (a store and instantiation, even
//! with the pooling allocator and copy-on-write images); a warm one costs nothing but
//! resetting the per-event state. The pool holds at most
//! `max_in_flight` instances, each used by one event at a time, and drops an instance
//! after `recycle_after` events, after any trap or limit hit, and when its version is
//! swapped out, so state a guest keeps between events is bounded and never crosses
//! versions.

use std::sync::atomic::{AtomicBool, Ordering};

use crossbeam_queue::ArrayQueue;
use wasmtime::Store;

use crate::metrics::shards::{SHARDS, shard};
use crate::sandbox::State;
use crate::sandbox::bindings;

/// An instance between events, with the store it lives in.
pub struct Warm {
    pub store: Store<State>,
    pub instance: bindings::Handler,
    /// Events it has handled.
    pub uses: u32,
}

/// A handler version's idle warm instances. Lock-free: taking and returning an instance
/// is an atomic operation or two on the event path.
pub struct WarmPool {
    idle: Idle<Warm>,
    /// False once the version is no longer live: instances coming back are dropped.
    open: AtomicBool,
    recycle_after: u32,
}

impl WarmPool {
    pub fn new(capacity: u32, recycle_after: u32) -> Self {
        Self {
            idle: Idle::new(capacity.max(1) as usize),
            open: AtomicBool::new(true),
            recycle_after,
        }
    }

    /// An idle instance, if there is one: the one this thread returned last if it is still
    /// idle (see [`Idle`]).
    pub fn take(&self) -> Option<Warm> {
        self.idle.take()
    }

    /// Return an instance that just finished an event cleanly. Dropped instead when it
    /// has served `recycle_after` events, when the pool is closed, or (cannot happen
    /// while in-flight events are bounded by the pool's capacity) when the pool is full.
    pub fn put(&self, warm: Warm) {
        if warm.uses < self.recycle_after && self.open.load(Ordering::Acquire) {
            self.idle.put(warm);
        }
    }

    /// The version stopped being live: drop its idle instances and every one that comes
    /// back (see `Handler::retire`).
    pub fn close(&self) {
        self.open.store(false, Ordering::Release);
        self.idle.clear();
    }

    /// The version is live again (a rollback brought it back).
    pub fn reopen(&self) {
        self.open.store(true, Ordering::Release);
    }
}

/// Idle items: a slot for each thread's last returned one, in front of a shared queue.
///
/// Why the slots: the queue alone is first-in first-out, and under load a pool grows to
/// about `max_in_flight` instances (56 of the bench's 64 on NATS), so each event ran on
/// the instance idle the longest, its store, its guest's stack and heap pages long gone
/// from the core's caches. Taking the thread's own last one first keeps a worker thread on
/// one warm instance while its events run one after another, as they do when their
/// publishes do not wait.
///
/// A take that finds its slot and the queue empty looks in the other threads' slots before
/// it answers none: a miss makes a new instance, and an idle one must not be left unused
/// for it (the host sizes wasmtime's instance pool by `max_in_flight`).
struct Idle<T> {
    slots: [ArrayQueue<T>; SHARDS],
    shared: ArrayQueue<T>,
}

impl<T> Idle<T> {
    fn new(capacity: usize) -> Self {
        Self {
            slots: std::array::from_fn(|_| ArrayQueue::new(1)),
            shared: ArrayQueue::new(capacity),
        }
    }

    fn take(&self) -> Option<T> {
        self.take_at(shard())
    }

    /// Into the thread's slot if it is free, otherwise the queue; a full queue drops it.
    fn put(&self, item: T) {
        self.put_at(shard(), item);
    }

    /// `take` for the thread whose slot is `mine`: apart so the tests can name the slots
    /// instead of depending on which shard each of their threads is handed.
    fn take_at(&self, mine: usize) -> Option<T> {
        self.slots[mine]
            .pop()
            .or_else(|| self.shared.pop())
            .or_else(|| (1..SHARDS).find_map(|i| self.slots[(mine + i) % SHARDS].pop()))
    }

    fn put_at(&self, mine: usize, item: T) {
        if let Err(item) = self.slots[mine].push(item) {
            let _ = self.shared.push(item);
        }
    }

    /// Empty it: a take from any slot reaches every slot and the queue.
    fn clear(&self) {
        while self.take_at(0).is_some() {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_thread_takes_back_the_item_it_returned_last_before_older_ones() {
        let idle = Idle::new(4);
        idle.put(1);
        assert_eq!(idle.take(), Some(1));
        idle.put(1);
        // Returned while the slot holds 1: 2 waits in the queue.
        idle.put(2);
        assert_eq!(idle.take(), Some(1));
        idle.put(3);
        assert_eq!(idle.take(), Some(3));
        assert_eq!(idle.take(), Some(2));
        assert_eq!(idle.take(), None);
    }

    #[test]
    fn an_item_idle_in_another_threads_slot_is_taken_rather_than_none() {
        // Every pair of slots, both ways round: the scan wraps past the last slot.
        for theirs in 0..SHARDS {
            for mine in (0..SHARDS).filter(|&mine| mine != theirs) {
                let idle = Idle::new(4);
                idle.put_at(theirs, "theirs");
                assert_eq!(
                    idle.take_at(mine),
                    Some("theirs"),
                    "slot {theirs} from {mine}"
                );
                assert_eq!(idle.take_at(mine), None);
                assert_eq!(idle.take_at(theirs), None);
            }
        }
    }

    #[test]
    fn a_thread_takes_its_own_slot_before_the_queue_and_the_queue_before_other_slots() {
        let idle = Idle::new(4);
        idle.put_at(1, "other thread's");
        idle.put_at(0, "mine");
        idle.put_at(0, "queued");
        assert_eq!(idle.take_at(0), Some("mine"));
        assert_eq!(idle.take_at(0), Some("queued"));
        assert_eq!(idle.take_at(0), Some("other thread's"));
        assert_eq!(idle.take_at(0), None);
    }

    #[test]
    fn every_item_put_from_many_threads_is_taken_exactly_once() {
        // More threads than shards, so some share a slot.
        let idle = Idle::new(64);
        std::thread::scope(|scope| {
            for t in 0..12u32 {
                let idle = &idle;
                scope.spawn(move || (0..4).for_each(|i| idle.put(t * 4 + i)));
            }
        });
        let mut taken: Vec<u32> = std::iter::from_fn(|| idle.take()).collect();
        taken.sort_unstable();
        assert_eq!(taken, (0..48).collect::<Vec<_>>());
    }

    #[test]
    fn clear_empties_the_slots_and_the_queue() {
        let idle = Idle::new(4);
        std::thread::scope(|scope| {
            scope.spawn(|| idle.put(1));
        });
        idle.put(2);
        idle.put(3);
        idle.clear();
        assert_eq!(idle.take(), None);
    }
}

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
/// is one atomic operation each on the event path.
pub struct WarmPool {
    idle: ArrayQueue<Warm>,
    /// False once the version is no longer live: instances coming back are dropped.
    open: AtomicBool,
    recycle_after: u32,
}

impl WarmPool {
    pub fn new(capacity: u32, recycle_after: u32) -> Self {
        Self {
            idle: ArrayQueue::new(capacity.max(1) as usize),
            open: AtomicBool::new(true),
            recycle_after,
        }
    }

    /// An idle instance, if there is one.
    pub fn take(&self) -> Option<Warm> {
        self.idle.pop()
    }

    /// Return an instance that just finished an event cleanly. Dropped instead when it
    /// has served `recycle_after` events, when the pool is closed, or (cannot happen
    /// while in-flight events are bounded by the pool's capacity) when the pool is full.
    pub fn put(&self, warm: Warm) {
        if warm.uses < self.recycle_after && self.open.load(Ordering::Acquire) {
            // A full pool hands the instance back; it is dropped here.
            let _ = self.idle.push(warm);
        }
    }

    /// The version stopped being live: drop its idle instances and every one that comes
    /// back (see `Handler::retire`).
    pub fn close(&self) {
        self.open.store(false, Ordering::Release);
        while self.idle.pop().is_some() {}
    }

    /// The version is live again (a rollback brought it back).
    pub fn reopen(&self) {
        self.open.store(true, Ordering::Release);
    }
}

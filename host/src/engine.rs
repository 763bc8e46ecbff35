//! The one wasmtime `Engine` the host runs every handler on, and its epoch ticker.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;

use anyhow::Context as _;
use wasmtime::{Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig};

use crate::limits;

/// Build the engine: pooling allocator, epoch interruption, bounded stacks.
///
/// Why pooling: a fresh instance per event is the isolation model, and the pooling
/// allocator makes instantiation a slot reuse (copy-on-write memory images, no mmap per
/// event) instead of fresh mappings.
///
/// `consume_fuel` turns on instruction counting (for handlers with a `fuel` budget); it
/// costs every guest some speed, so it is only on when a manifest asks for it.
pub fn new_engine(consume_fuel: bool) -> anyhow::Result<Engine> {
    let mut pool = PoolingAllocationConfig::default();
    pool.total_component_instances(limits::INSTANCE_POOL);
    // A component holds several core instances (its module plus the canonical-ABI shims
    // wit-component adds) and, for interpreters, more than one memory; size those pools
    // so the component count, not these, is what runs out first.
    pool.total_core_instances(limits::INSTANCE_POOL * 8);
    pool.total_memories(limits::INSTANCE_POOL * 2);
    pool.total_tables(limits::INSTANCE_POOL * 4);
    pool.total_stacks(limits::INSTANCE_POOL);
    pool.max_memory_size(limits::MAX_MEMORY as usize);
    // Keep the first 1 MiB of each released memory slot resident: it is reset with a
    // memset instead of madvise, which is cheaper for the small heaps handlers use.
    pool.linear_memory_keep_resident(1 << 20);
    pool.table_keep_resident(64 << 10);

    let mut config = Config::new();
    config
        .allocation_strategy(InstanceAllocationStrategy::Pooling(pool))
        .epoch_interruption(true)
        .consume_fuel(consume_fuel)
        .max_wasm_stack(limits::MAX_WASM_STACK)
        .async_stack_size(limits::ASYNC_STACK);
    Engine::new(&config)
        .map_err(anyhow::Error::from)
        .context("failed to create the wasm engine")
}

/// Advances the engine's epoch every [`limits::EPOCH_TICK`] on a dedicated OS thread until
/// dropped.
///
/// Why a thread and not a tokio task: preemption is driven by the epoch. If both runtime
/// workers are busy running guests that never yield, a ticker task would never be polled,
/// the epoch would never advance, and the spinning guests would never be preempted.
pub struct EpochTicker {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl EpochTicker {
    pub fn start(engine: &Engine) -> anyhow::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let engine = engine.clone();
        let thread = std::thread::Builder::new()
            .name("wasmev-epoch".into())
            .spawn({
                let stop = stop.clone();
                move || {
                    while !stop.load(Ordering::Relaxed) {
                        std::thread::sleep(limits::EPOCH_TICK);
                        engine.increment_epoch();
                    }
                }
            })
            .context("failed to start the epoch ticker thread")?;
        Ok(Self {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for EpochTicker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            // The loop sleeps one tick at most; joining cannot hang.
            let _ = thread.join();
        }
    }
}

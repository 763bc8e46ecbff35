//! The one wasmtime `Engine` the host runs every handler on, and its epoch ticker.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;

use anyhow::Context as _;
use wasmtime::{Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig};

use crate::limits;
use crate::manifest::HandlerSpec;

/// The engines a manifest needs: one per distinct wasm stack size.
///
/// Why more than one: wasmtime sets the wasm stack limit per engine, not per store. Most
/// manifests use the default stack and so get exactly one engine; a handler asking for a
/// different `stack` gets an engine of its own, with a pool sized for its `max_in_flight`.
#[derive(Clone)]
pub struct Engines {
    by_stack: BTreeMap<u64, Engine>,
}

impl Engines {
    pub fn for_handlers(handlers: &[HandlerSpec]) -> anyhow::Result<Self> {
        let fuel = handlers.iter().any(|h| h.guards.fuel.is_some());
        let mut pools: BTreeMap<u64, u32> = BTreeMap::new();
        pools.insert(limits::DEFAULT_WASM_STACK, limits::INSTANCE_POOL);
        for h in handlers {
            if h.guards.stack != limits::DEFAULT_WASM_STACK {
                *pools.entry(h.guards.stack).or_default() += h.max_in_flight;
            }
        }
        let mut by_stack = BTreeMap::new();
        for (stack, pool) in pools {
            by_stack.insert(stack, new_engine(fuel, stack, pool)?);
        }
        Ok(Self { by_stack })
    }

    /// The engine for handlers with `stack` bytes of wasm stack.
    pub fn get(&self, stack: u64) -> anyhow::Result<&Engine> {
        self.by_stack
            .get(&stack)
            .with_context(|| format!("no engine for a {stack}-byte wasm stack"))
    }

    pub fn all(&self) -> impl Iterator<Item = &Engine> {
        self.by_stack.values()
    }
}

/// Build the engine: pooling allocator, epoch interruption, bounded stacks.
///
/// Why pooling: a fresh instance per event is the isolation model, and the pooling
/// allocator makes instantiation a slot reuse (copy-on-write memory images, no mmap per
/// event) instead of fresh mappings.
///
/// `consume_fuel` turns on instruction counting (for handlers with a `fuel` budget); it
/// costs every guest some speed, so it is only on when a manifest asks for it.
/// `instances` sizes the pool: how many instances may exist at once on this engine.
pub fn new_engine(consume_fuel: bool, wasm_stack: u64, instances: u32) -> anyhow::Result<Engine> {
    let instances = instances.max(1);
    let mut pool = PoolingAllocationConfig::default();
    pool.total_component_instances(instances);
    // A component holds several core instances (its module plus the canonical-ABI shims
    // wit-component adds) and, for interpreters, more than one memory; size those pools
    // so the component count, not these, is what runs out first.
    pool.total_core_instances(instances * 8);
    pool.total_memories(instances * 2);
    pool.total_tables(instances * 4);
    pool.total_stacks(instances);
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
        .max_wasm_stack(usize::try_from(wasm_stack).unwrap_or(usize::MAX))
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
    pub fn start(engines: &Engines) -> anyhow::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let engines: Vec<Engine> = engines.all().cloned().collect();
        let thread = std::thread::Builder::new()
            .name("wasmev-epoch".into())
            .spawn({
                let stop = stop.clone();
                move || {
                    while !stop.load(Ordering::Relaxed) {
                        std::thread::sleep(limits::EPOCH_TICK);
                        for engine in &engines {
                            engine.increment_epoch();
                        }
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

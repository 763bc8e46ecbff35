//! The wasmtime engines the host runs handlers on, and their epoch ticker.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use anyhow::Context as _;
use wasmtime::{Config, Engine, EngineWeak, InstanceAllocationStrategy, PoolingAllocationConfig};

use crate::limits;
use crate::manifest::HandlerSpec;

/// Which engine a handler runs on. wasmtime sets the wasm stack limit and fuel metering
/// per engine, not per store, so handlers that differ in either need different engines.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct EngineKey {
    pub stack: u64,
    pub fuel: bool,
}

impl EngineKey {
    pub fn of(spec: &HandlerSpec) -> Self {
        Self {
            stack: spec.guards.stack,
            fuel: spec.guards.fuel.is_some(),
        }
    }
}

/// The host's engines, created on first use and shared by every handler with the same
/// [`EngineKey`].
///
/// Most manifests use the default stack and no fuel, and so run on exactly one engine.
/// The registry grows when a handler (at start or on reload) needs another key; engines no
/// handler uses any more are dropped with their last handler (the epoch ticker only holds
/// weak references).
#[derive(Clone, Default)]
pub struct Engines {
    inner: Arc<Mutex<Registry>>,
}

#[derive(Default)]
struct Registry {
    by_key: BTreeMap<EngineKey, EngineWeak>,
}

impl Engines {
    pub fn new() -> Self {
        Self::default()
    }

    /// The engine for handlers with `key`, created if no live handler uses one.
    pub fn get(&self, key: EngineKey) -> anyhow::Result<Engine> {
        let mut registry = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(engine) = registry.by_key.get(&key).and_then(EngineWeak::upgrade) {
            return Ok(engine);
        }
        let engine = new_engine(key.fuel, key.stack, limits::INSTANCE_POOL)?;
        registry.by_key.insert(key, engine.weak());
        Ok(engine)
    }

    /// Every engine still in use.
    fn live(&self) -> Vec<Engine> {
        let mut registry = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        registry.by_key.retain(|_, weak| weak.upgrade().is_some());
        registry
            .by_key
            .values()
            .filter_map(EngineWeak::upgrade)
            .collect()
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
    // With PAGEMAP_SCAN (Linux 6.7+) only the pages an event dirtied are reset, instead
    // of the whole kept-resident prefix.
    pool.pagemap_scan(wasmtime::Enabled::Auto);
    // What is not kept resident is given back with madvise at once (wasmtime's default
    // batch of 1), not batched: a slot waiting in a batch is missed when its module is
    // dropped (`purge_module` clears only free slots) and comes back later still holding
    // that module's memory image, its memfd and resident pages, until another module takes
    // the slot. Each hot swap left one such slot behind (the soak test counts the memory
    // images left open). Batching 32 saved nothing measurable here: with PAGEMAP_SCAN and
    // `keep_resident` there is rarely anything past the kept part to give back.

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
        let engines = engines.clone();
        let thread = std::thread::Builder::new()
            .name("wasmev-epoch".into())
            .spawn({
                let stop = stop.clone();
                move || {
                    while !stop.load(Ordering::Relaxed) {
                        std::thread::sleep(limits::EPOCH_TICK);
                        // Engines created by a reload are picked up on the next tick.
                        for engine in engines.live() {
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

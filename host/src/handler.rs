//! Handlers: compiling each module once and checking it against the world at load time.
//!
//! A module that is missing, is not a component, or targets another world fails here,
//! with an error naming the handler and the file, never on its first event.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::path::PathBuf;
use std::sync::Arc;

use tokio::sync::Semaphore;
use wasmtime::Engine;
use wasmtime::component::{Component, HasSelf, Linker};

use crate::broker::Broker;
use crate::cache::{self, ArtifactCache, Digest, Source};
use crate::engine::{EngineKey, Engines};
use crate::manifest::{HandlerSpec, Instances};
use crate::metrics::HandlerMetrics;
use crate::publish::Grants;
use crate::sandbox::State;
use crate::sandbox::bindings;
use crate::warm::WarmPool;

/// Why a handler's module could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    // The io error is in the text, not a `source` (see `ManifestError::Read`).
    #[error("handler {handler:?}: cannot read module {}: {error}", path.display())]
    Read {
        handler: String,
        path: PathBuf,
        error: std::io::Error,
    },
    #[error(
        "handler {handler:?}: {} is a core WebAssembly module, not a component; \
         build it for wasm32-wasip2 or wrap it with `wasm-tools component new`",
        path.display()
    )]
    CoreModule { handler: String, path: PathBuf },
    #[error("handler {handler:?}: {} is not a WebAssembly component: {reason}", path.display())]
    NotComponent {
        handler: String,
        path: PathBuf,
        reason: String,
    },
    #[error(
        "handler {handler:?}: {} does not implement the wasmev:events/handler world: {reason}",
        path.display()
    )]
    WrongWorld {
        handler: String,
        path: PathBuf,
        reason: String,
    },
}

/// A handler whose module compiled and matches the world; not yet connected to a broker.
pub struct Compiled {
    pub spec: HandlerSpec,
    pub pre: bindings::HandlerPre<State>,
    pub digest: Digest,
    /// Whether the machine code came from the artifact cache.
    pub source: Source,
}

/// The linker every handler is instantiated with: locked-down WASI plus our imports.
pub fn linker(engine: &Engine) -> anyhow::Result<Linker<State>> {
    let mut linker = Linker::new(engine);
    // Guests built for wasm32-wasip2 import WASI (clocks, random, cli, io) even when they
    // use none of it; link it, locked down per instance in `State::new`.
    wasmtime_wasi::p2::add_to_linker_async(&mut linker)?;
    bindings::Handler::add_to_linker::<_, HasSelf<_>>(&mut linker, |state| state)?;
    Ok(linker)
}

/// Modules larger than this get a log line before compiling: an uncached JS or Python
/// component takes seconds, and silence that long looks like a hang.
const ANNOUNCE_COMPILE_BYTES: usize = 1 << 20;

/// The log target of that line, so a command that shows only errors (`wasmev test`) can
/// still show it: otherwise a first `wasmev test` of a JS or Python handler said nothing
/// for the ~10 s its compiling took.
pub const COMPILING_TARGET: &str = "wasmev::compiling";

/// Compiles handlers: engines by key, a linker per engine, and the artifact cache.
pub struct Compiler {
    engines: Engines,
    linkers: HashMap<EngineKey, (Engine, Linker<State>)>,
    cache: Option<ArtifactCache>,
}

impl Compiler {
    pub fn new(engines: Engines, cache: Option<ArtifactCache>) -> Self {
        Self {
            engines,
            linkers: HashMap::new(),
            cache,
        }
    }

    /// Read, compile and pre-instantiate `spec`'s module.
    pub fn compile(&mut self, spec: &HandlerSpec) -> anyhow::Result<Compiled> {
        let bytes = read(spec)?;
        let digest = Digest::of(&bytes);
        self.compile_bytes(spec, &bytes, digest)
    }

    /// Compile and pre-instantiate `bytes`, the contents of `spec`'s module.
    pub fn compile_bytes(
        &mut self,
        spec: &HandlerSpec,
        bytes: &[u8],
        digest: Digest,
    ) -> anyhow::Result<Compiled> {
        let started = std::time::Instant::now();
        let key = EngineKey::of(spec);
        let (engine, linker) = match self.linkers.entry(key) {
            Entry::Occupied(o) => o.into_mut(),
            Entry::Vacant(v) => {
                let engine = self.engines.get(key)?;
                let linker = linker(&engine)?;
                v.insert((engine, linker))
            }
        };
        let cached = self
            .cache
            .as_ref()
            .is_some_and(|c| c.contains(engine, &digest));
        if bytes.len() > ANNOUNCE_COMPILE_BYTES && !cached {
            tracing::info!(
                target: COMPILING_TARGET,
                handler = %spec.name,
                size = %bytesize::ByteSize::b(bytes.len() as u64).display().iec(),
                "compiling a large module; this takes a few seconds (the result is cached)"
            );
        }
        let loaded = match &self.cache {
            Some(cache) => cache.load(engine, bytes, &digest),
            None => cache::compile(engine, bytes),
        };
        let (component, source) = loaded.map_err(|e| LoadError::NotComponent {
            handler: spec.name.clone(),
            path: spec.module.clone(),
            reason: error_chain(e),
        })?;
        let pre = instantiate_pre(linker, &component, spec)?;
        tracing::info!(
            handler = %spec.name,
            module = %spec.module.display(),
            digest = %digest,
            cached = source == Source::Cache,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "compiled handler"
        );
        Ok(Compiled {
            spec: spec.clone(),
            pre,
            digest,
            source,
        })
    }

    /// Compile every handler, collecting every failure rather than stopping at the first.
    pub fn compile_all(
        &mut self,
        specs: &[HandlerSpec],
    ) -> Result<Vec<Compiled>, Vec<anyhow::Error>> {
        let mut compiled = Vec::with_capacity(specs.len());
        let mut errors = Vec::new();
        for spec in specs {
            match self.compile(spec) {
                Ok(c) => compiled.push(c),
                Err(e) => errors.push(e),
            }
        }
        if errors.is_empty() {
            Ok(compiled)
        } else {
            Err(errors)
        }
    }
}

/// The module's bytes, refusing core modules with a hint on how to make a component.
pub fn read(spec: &HandlerSpec) -> Result<Vec<u8>, LoadError> {
    let bytes = std::fs::read(&spec.module).map_err(|error| LoadError::Read {
        handler: spec.name.clone(),
        path: spec.module.clone(),
        error,
    })?;
    // Core modules carry version 1 in the preamble; components a different layer/version.
    if bytes.starts_with(b"\0asm\x01\0\0\0") {
        return Err(LoadError::CoreModule {
            handler: spec.name.clone(),
            path: spec.module.clone(),
        });
    }
    // Without this, wasmtime would try the bytes as WAT text and report a parse error
    // at line 1 of "<anon>", which says nothing useful about a .wasm file.
    if !bytes.starts_with(b"\0asm") {
        return Err(LoadError::NotComponent {
            handler: spec.name.clone(),
            path: spec.module.clone(),
            reason: if bytes.is_empty() {
                "the file is empty (still being written?)".into()
            } else {
                format!(
                    "it does not start with the WebAssembly magic bytes (\\0asm); \
                     its first bytes are {:?}",
                    String::from_utf8_lossy(&bytes[..bytes.len().min(16)])
                )
            },
        });
    }
    Ok(bytes)
}

/// Link `component` against the world, so a module that does not implement it fails now.
fn instantiate_pre(
    linker: &Linker<State>,
    component: &Component,
    spec: &HandlerSpec,
) -> Result<bindings::HandlerPre<State>, LoadError> {
    let wrong_world = |e: wasmtime::Error| LoadError::WrongWorld {
        handler: spec.name.clone(),
        path: spec.module.clone(),
        reason: error_chain(e),
    };
    let instance_pre = linker.instantiate_pre(component).map_err(wrong_world)?;
    bindings::HandlerPre::new(instance_pre).map_err(wrong_world)
}

/// One line with every cause, outermost first.
fn error_chain(e: wasmtime::Error) -> String {
    format!("{:#}", anyhow::Error::from(e))
}

/// What the host side of a handler's imports works from: its settings, publish grants,
/// metrics and broker.
///
/// Apart from [`Handler`] because every store's state holds it: the handler owns its
/// pool of warm instances, and a store holding the handler closed a cycle (handler →
/// pool → warm store → handler) that kept each `reuse` version, its engine (whose
/// instance pool reserves terabytes of address space) and its broker connection alive
/// for good unless someone remembered to empty the pool. Kept apart, a version goes with
/// its last reference, as any value does.
pub struct HandlerCore {
    pub spec: HandlerSpec,
    pub grants: Grants,
    pub metrics: HandlerMetrics,
    pub broker: Broker,
}

/// A handler ready to take events: compiled code plus everything dispatch needs.
pub struct Handler {
    core: Arc<HandlerCore>,
    pub pre: bindings::HandlerPre<State>,
    /// The module's SHA-256: which version this is.
    pub digest: Digest,
    /// `max_in_flight` permits, shared by all of this handler's subscriptions. Taken
    /// before an event is pulled, so no instance exists without one.
    pub permits: Arc<Semaphore>,
    /// Idle warm instances, for `instances = "reuse"`.
    pub warm: Option<WarmPool>,
}

/// A handler is its core plus what only the host side uses, as wasmtime's `StoreInner` is
/// its `StoreOpaque` plus the embedder's data; like that one, it derefs to its core.
impl std::ops::Deref for Handler {
    type Target = HandlerCore;

    fn deref(&self) -> &HandlerCore {
        &self.core
    }
}

impl Handler {
    pub fn new(compiled: Compiled, broker: Broker, metrics: HandlerMetrics) -> Arc<Self> {
        let Compiled {
            spec, pre, digest, ..
        } = compiled;
        let warm = match spec.instances {
            Instances::PerEvent => None,
            Instances::Reuse { recycle_after } => {
                Some(WarmPool::new(spec.max_in_flight, recycle_after))
            }
        };
        Arc::new(Self {
            digest,
            warm,
            permits: Arc::new(Semaphore::new(spec.max_in_flight as usize)),
            pre,
            core: Arc::new(HandlerCore {
                grants: Grants::new(spec.publish.clone()),
                spec,
                metrics,
                broker,
            }),
        })
    }

    /// The part a store's state holds (see [`HandlerCore`]).
    pub fn core(&self) -> &Arc<HandlerCore> {
        &self.core
    }

    /// This version stopped taking events (swapped out or removed): let go of its warm
    /// instances now, and of each one that comes back from an event still running. A
    /// version being dropped needs none of this; it is for one that stays referenced a
    /// while, as a swapped-out version does for a possible rollback, so its idle
    /// instances do not hold slots of the engine's instance pool meanwhile.
    pub fn retire(&self) {
        if let Some(warm) = &self.warm {
            warm.close();
        }
    }

    /// This version takes events again (a rollback brought it back).
    pub fn revive(&self) {
        if let Some(warm) = &self.warm {
            warm.reopen();
        }
    }
}

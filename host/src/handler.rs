//! Handlers: compiling each module once and checking it against the world at load time.
//!
//! A module that is missing, is not a component, or targets another world fails here,
//! with an error naming the handler and the file, never on its first event.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use tokio::sync::Semaphore;
use wasmtime::Engine;
use wasmtime::component::{Component, HasSelf, Linker};

use crate::broker::Broker;
use crate::engine::Engines;
use crate::manifest::HandlerSpec;
use crate::metrics::HandlerMetrics;
use crate::publish::Grants;
use crate::sandbox::State;
use crate::sandbox::bindings;

/// Why a handler's module could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("handler {handler:?}: cannot read module {}: {source}", path.display())]
    Read {
        handler: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
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

/// Read, compile and pre-instantiate `spec`'s module.
pub fn compile(
    engine: &Engine,
    linker: &Linker<State>,
    spec: &HandlerSpec,
) -> Result<Compiled, LoadError> {
    let handler = spec.name.clone();
    let path = spec.module.clone();
    let bytes = std::fs::read(&path).map_err(|source| LoadError::Read {
        handler: handler.clone(),
        path: path.clone(),
        source,
    })?;
    // Core modules carry version 1 in the preamble; components a different layer/version.
    if bytes.starts_with(b"\0asm\x01\0\0\0") {
        return Err(LoadError::CoreModule { handler, path });
    }
    let component = Component::new(engine, &bytes).map_err(|e| LoadError::NotComponent {
        handler: handler.clone(),
        path: path.clone(),
        reason: error_chain(e),
    })?;
    let wrong_world = |e: wasmtime::Error| LoadError::WrongWorld {
        handler: handler.clone(),
        path: path.clone(),
        reason: error_chain(e),
    };
    let instance_pre = linker.instantiate_pre(&component).map_err(wrong_world)?;
    let pre = bindings::HandlerPre::new(instance_pre).map_err(wrong_world)?;
    Ok(Compiled {
        spec: spec.clone(),
        pre,
    })
}

/// Compile every handler on the engine for its stack size, collecting every failure
/// rather than stopping at the first.
pub fn compile_all(
    engines: &Engines,
    specs: &[HandlerSpec],
) -> Result<Vec<Compiled>, Vec<anyhow::Error>> {
    let mut linkers: HashMap<u64, Linker<State>> = HashMap::new();
    let mut compiled = Vec::with_capacity(specs.len());
    let mut errors = Vec::new();
    for spec in specs {
        let started = std::time::Instant::now();
        let stack = spec.guards.stack;
        let engine = match engines.get(stack) {
            Ok(e) => e,
            Err(e) => {
                errors.push(e);
                continue;
            }
        };
        let linker = match linkers.entry(stack) {
            std::collections::hash_map::Entry::Occupied(o) => o.into_mut(),
            std::collections::hash_map::Entry::Vacant(v) => match linker(engine) {
                Ok(l) => v.insert(l),
                Err(e) => {
                    errors.push(e);
                    continue;
                }
            },
        };
        match compile(engine, linker, spec) {
            Ok(c) => {
                tracing::info!(
                    handler = %spec.name,
                    module = %spec.module.display(),
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    "compiled handler"
                );
                compiled.push(c);
            }
            Err(e) => errors.push(e.into()),
        }
    }
    if errors.is_empty() {
        Ok(compiled)
    } else {
        Err(errors)
    }
}

/// One line with every cause, outermost first.
fn error_chain(e: wasmtime::Error) -> String {
    format!("{:#}", anyhow::Error::from(e))
}

/// A handler ready to take events: compiled code plus everything dispatch needs.
pub struct Handler {
    pub spec: HandlerSpec,
    pub pre: bindings::HandlerPre<State>,
    pub grants: Grants,
    pub metrics: HandlerMetrics,
    /// `max_in_flight` permits, shared by all of this handler's subscriptions. Taken
    /// before an event is pulled, so no instance exists without one.
    pub permits: Arc<Semaphore>,
    pub broker: Broker,
}

impl Handler {
    pub fn new(compiled: Compiled, broker: Broker, metrics: HandlerMetrics) -> Arc<Self> {
        let Compiled { spec, pre } = compiled;
        Arc::new(Self {
            grants: Grants::new(spec.publish.clone()),
            permits: Arc::new(Semaphore::new(spec.max_in_flight as usize)),
            spec,
            pre,
            metrics,
            broker,
        })
    }
}

//! The reference component (`bench/bare`): `handle(list<u8>)` and no imports, the least
//! a component can be. The performance issue's premise ("a call on a reused instance
//! ~0.2 µs, a fresh instance ~2.6 µs") is about a component like it, not about wasmev's
//! handler world. The floor measures it beside the echo handler, and a baseline
//! subscriber calls it for every event before it republishes: what any Wasm host with
//! wasmev's loop guard would spend on this machine, below which wasmev cannot go.

use std::path::Path;

use anyhow::Context as _;
use wasmev::limits;
use wasmtime::Store;
use wasmtime::component::{Component, Func, InstancePre, Linker, TypedFunc};

/// The reference component, compiled and ready to instantiate.
#[derive(Clone)]
pub struct Bare {
    pre: InstancePre<()>,
}

/// How a call is made: on a fiber, as wasmev calls handlers, or on the calling thread.
#[derive(Clone, Copy)]
pub enum Call {
    Async,
    Sync,
}

/// One instance of it, with its store.
pub struct Instance {
    store: Store<()>,
    /// `handle`, type-checked as `(&[u8],) -> ()` when the instance was made.
    handle: Func,
}

/// `handle`'s type, for a payload borrowed for the call.
type Handle<'a> = TypedFunc<(&'a [u8],), ()>;

impl Bare {
    /// Compile `module` on an engine made as the host makes one for a handler with the
    /// default limits (pooling allocator, its memory settings, epoch interruption); it
    /// must import nothing, or the empty linker refuses it.
    pub fn load(module: &Path) -> anyhow::Result<Bare> {
        let engine =
            wasmev::engine::new_engine(false, limits::DEFAULT_WASM_STACK, limits::INSTANCE_POOL)?;
        let component = Component::from_file(&engine, module)
            .map_err(anyhow::Error::from)
            .with_context(|| {
                format!(
                    "the reference component {} (built by ./scripts/bench) cannot be loaded",
                    module.display()
                )
            })?;
        let pre = Linker::new(&engine)
            .instantiate_pre(&component)
            .map_err(anyhow::Error::from)
            .with_context(|| format!("{} should import nothing", module.display()))?;
        Ok(Bare { pre })
    }

    /// A fresh instance in a store of its own, whose deadline cannot pass (the epoch is
    /// never advanced for it).
    pub async fn instance(&self, how: Call) -> anyhow::Result<Instance> {
        let mut store = Store::new(self.pre.engine(), ());
        store.set_epoch_deadline(1 << 40);
        let instance = match how {
            Call::Async => self.pre.instantiate_async(&mut store).await?,
            Call::Sync => self.pre.instantiate(&mut store)?,
        };
        let handle = instance
            .get_func(&mut store, "handle")
            .context("the reference component exports no `handle`")?;
        let _: Handle<'_> = handle.typed(&store)?;
        Ok(Instance { store, handle })
    }

    /// `handle(payload)` on a fresh instance, dropped after the call.
    pub async fn call_fresh(&self, payload: &[u8], how: Call) -> anyhow::Result<()> {
        self.instance(how).await?.call(payload, how).await
    }
}

impl Instance {
    /// `handle(payload)`. (wasmtime 48 runs the post-return itself.)
    pub async fn call(&mut self, payload: &[u8], how: Call) -> anyhow::Result<()> {
        // SAFETY: `handle`'s type was checked against `Handle` when the instance was made;
        // only the payload's lifetime differs per call. (What wasmtime's `bindgen!` does
        // for the host's own calls: check once, then call unchecked.)
        let handle: Handle<'_> = unsafe { TypedFunc::new_unchecked(self.handle) };
        match how {
            Call::Async => handle.call_async(&mut self.store, (payload,)).await?,
            Call::Sync => handle.call(&mut self.store, (payload,))?,
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_reference_component_says_how_to_build_it() {
        let Err(e) = Bare::load(Path::new("target/nowhere/bench_bare.wasm")) else {
            panic!("a module that does not exist loaded");
        };
        insta::assert_snapshot!(format!("{e:#}"), @"the reference component target/nowhere/bench_bare.wasm (built by ./scripts/bench) cannot be loaded: failed to read input file: target/nowhere/bench_bare.wasm: No such file or directory (os error 2)");
    }
}

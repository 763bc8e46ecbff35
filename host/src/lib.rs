//! wasmev: a runtime for WebAssembly event handlers.
//!
//! The host reads `runtime.toml`, subscribes to the subjects it lists on NATS or the
//! embedded broker, and runs each event through a sandboxed Wasm component that
//! implements the `wasmev:events/handler` world. The `wasmev` binary is a thin CLI over
//! [`runtime::run`], [`check`] and [`ingress`].

// The host never panics on guest input or bad config (integration tests may).
#![deny(clippy::unwrap_used, clippy::expect_used)]

pub mod admin;
pub mod broker;
pub mod cache;
pub mod contract;
mod deadline;
pub mod dev;
pub mod dispatch;
pub mod engine;
pub mod handler;
pub mod ingress;
pub mod intake;
pub mod jetstream;
pub mod limits;
pub mod live;
pub mod manifest;
pub mod metrics;
pub mod plan;
pub mod publish;
pub mod reload;
pub mod runtime;
pub mod sandbox;
pub mod scaffold;
pub mod subject;
pub mod warm;

pub use manifest::Manifest;
pub use runtime::{Host, Options, run};

/// Everything `wasmev run` does before connecting: parse and validate the manifest, then
/// compile every module and check it against the world. Returns every problem found.
/// `cache`: the compiled-artifact cache to use (and fill), if any.
pub fn check(
    path: &std::path::Path,
    cache: Option<cache::ArtifactCache>,
) -> Result<Manifest, Vec<String>> {
    let manifest = Manifest::load(path).map_err(|e| vec![e.to_string()])?;
    handler::Compiler::new(engine::Engines::new(), cache)
        .compile_all(&manifest.handlers)
        .map_err(|errors| errors.iter().map(|e| format!("{e:#}")).collect::<Vec<_>>())?;
    Ok(manifest)
}

//! Planning a reload: the per-handler difference between what runs and what the manifest
//! now says, with every new module compiled and checked before anything running is
//! touched.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use anyhow::Context as _;

use crate::cache::{Digest, Source};
use crate::engine::EngineKey;
use crate::handler::{self, Compiled, Compiler, Handler};
use crate::live::Live;
use crate::manifest::{BrokerSettings, Manifest};
use crate::reload::{Refusal, Report, changes};

/// What a reload will do, worked out (and compiled) before anything running is touched.
pub struct Plan {
    pub steps: Vec<Step>,
    /// Running handlers the manifest no longer names.
    pub removed: Vec<String>,
    /// What is known before applying: refusals, unchanged handlers, restart-only changes.
    pub report: Report,
}

/// One handler to start or swap, already compiled.
pub enum Step {
    Add(Compiled),
    Swap {
        compiled: Compiled,
        changed: Vec<&'static str>,
    },
}

/// Work out what a reload does and compile what it needs, off the async workers (compiling
/// a large component takes seconds). Nothing running is touched.
///
/// `running`: each running handler's live slot and current version. `started_with`: the
/// broker and admin settings in force, to tell which changes need a restart (`None` at
/// start-up).
pub async fn prepare(
    compiler: Arc<Mutex<Compiler>>,
    manifest: Manifest,
    running: Vec<(Arc<Live>, Arc<Handler>)>,
    started_with: Option<&(Option<BrokerSettings>, Option<SocketAddr>)>,
) -> anyhow::Result<Plan> {
    let mut report = Report::default();
    if let Some((broker, admin)) = started_with {
        if manifest.broker != *broker {
            report.restart_needed.push("broker".into());
        }
        if manifest.admin != *admin {
            report.restart_needed.push("admin".into());
        }
    }
    tokio::task::spawn_blocking(move || {
        let mut compiler = compiler.lock().unwrap_or_else(|e| e.into_inner());
        let mut steps = Vec::new();
        for spec in &manifest.handlers {
            let current = running.iter().find(|(_, h)| h.spec.name == spec.name);
            let mut refuse = |error: String| report.refused.push(Refusal::new(&spec.name, error));
            let bytes = match handler::read(spec) {
                Ok(bytes) => bytes,
                Err(e) => {
                    refuse(e.to_string());
                    continue;
                }
            };
            let digest = Digest::of(&bytes);
            let Some((live, current)) = current else {
                match compiler.compile_bytes(spec, &bytes, digest) {
                    Ok(compiled) => steps.push(Step::Add(compiled)),
                    Err(e) => refuse(format!("{e:#}")),
                }
                continue;
            };
            let module_changed = digest != current.digest;
            if !module_changed && current.spec.runtime_eq(spec) {
                report.unchanged.push(spec.name.clone());
                continue;
            }
            if live.was_rolled_back(spec, &digest) {
                refuse(format!(
                    "handler {:?}: version {digest} was rolled back after failing its \
                     first events; change the module or its settings to try again",
                    spec.name
                ));
                continue;
            }
            let changed = changes(&current.spec, spec, module_changed);
            let compiled = if !module_changed && EngineKey::of(spec) == EngineKey::of(&current.spec)
            {
                // Same code on the same engine: only settings changed; no compile.
                Ok(Compiled {
                    spec: spec.clone(),
                    pre: current.pre.clone(),
                    digest,
                    source: Source::Cache,
                })
            } else {
                compiler.compile_bytes(spec, &bytes, digest)
            };
            match compiled {
                Ok(compiled) => steps.push(Step::Swap { compiled, changed }),
                Err(e) => refuse(format!("{e:#}")),
            }
        }
        let removed = running
            .iter()
            .map(|(_, h)| h.spec.name.clone())
            .filter(|name| manifest.handler(name).is_none())
            .collect();
        Plan {
            steps,
            removed,
            report,
        }
    })
    .await
    .context("handler compilation panicked")
}

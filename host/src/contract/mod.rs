//! `wasmev test`: event-contract cases for handler authors, run without a broker.
//!
//! A case file (`cases.toml`, or `.json` with the same shape) sits next to a handler. It
//! names a manifest entry, and lists events with what should come of each:
//!
//! ```toml
//! manifest = "../../runtime.toml"
//! handler = "email-sender"
//!
//! [[case]]
//! name = "a new user gets a welcome email"
//! subject = "user.created"
//! json = { id = "u1", name = "Ada", email = "ada@example.com" }
//! headers = { source = "signup-form" }
//! expect.result = "ok"
//! expect.logs = ["welcome email"]
//! expect.publish = [{ subject = "email.sent", json = { to = "ada@example.com" } }]
//! ```
//!
//! Each case runs the real component in the real sandbox (the manifest's limits, grants
//! and config), on a private embedded broker that records what the guest publishes.

mod expect;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde::Deserialize;
use serde_json::Value;
use tracing_subscriber::layer::{Context, Layer};

use crate::broker::memory::MemoryBroker;
use crate::broker::{Broker, Message, Subscription};
use crate::cache::{ArtifactCache, Source};
use crate::dispatch::{dispatch, event_for};
use crate::engine::{Engines, EpochTicker};
use crate::handler::{Compiled, Compiler, Handler};
use crate::manifest::Manifest;
use crate::metrics::Metrics;
use crate::publish::Delivery;
use crate::subject::Pattern;
use expect::{Expect, check};

/// The file name `wasmev test` looks for in a handler's folder.
pub const CASES_FILE: &str = "cases.toml";

/// A case file as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CaseFile {
    /// The manifest that declares the handler, relative to the case file.
    manifest: PathBuf,
    /// Which of its handlers; may be left out when it has only one.
    handler: Option<String>,
    #[serde(rename = "case", default)]
    cases: Vec<Case>,
}

/// One event and what should come of it.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Case {
    name: String,
    subject: String,
    /// The payload as text, sent as is.
    payload: Option<String>,
    /// The payload as a JSON value (a TOML table works), sent serialized.
    json: Option<Value>,
    #[serde(default)]
    headers: BTreeMap<String, String>,
    reply_to: Option<String>,
    /// Config values for this case, over the manifest's (`paused = true` to test a retry).
    #[serde(default)]
    config: BTreeMap<String, Value>,
    /// Which delivery this is (1 = first).
    #[serde(default = "first_attempt")]
    attempt: u32,
    #[serde(default)]
    expect: Expect,
}

fn first_attempt() -> u32 {
    1
}

/// The result of one case.
#[derive(Debug)]
pub struct CaseReport {
    pub name: String,
    pub elapsed: Duration,
    /// Every expectation that did not hold; empty means the case passed.
    pub failures: Vec<String>,
    /// What the guest logged, for the failure report.
    pub logs: Vec<String>,
    pub published: Vec<String>,
}

/// The result of one case file.
#[derive(Debug)]
pub struct FileReport {
    pub path: PathBuf,
    pub handler: String,
    /// How the component was loaded, and how long that took.
    pub loaded: (Source, Duration),
    pub cases: Vec<CaseReport>,
}

impl FileReport {
    pub fn passed(&self) -> usize {
        self.cases.iter().filter(|c| c.failures.is_empty()).count()
    }

    pub fn failed(&self) -> usize {
        self.cases.len() - self.passed()
    }

    /// The human report: a line per case, and for a failing case what differed.
    pub fn render(&self, verbose: bool) -> String {
        let (source, took) = self.loaded;
        let loaded = match source {
            Source::Cache => "loaded from the artifact cache".to_string(),
            Source::Compiled => format!("compiled in {} ms", took.as_millis()),
        };
        let mut out = format!(
            "{}: handler {:?} ({loaded})\n",
            self.path.display(),
            self.handler
        );
        for case in &self.cases {
            let ms = case.elapsed.as_secs_f64() * 1000.0;
            if case.failures.is_empty() {
                let _ = writeln!(out, "  pass  {} ({ms:.1} ms)", case.name);
            } else {
                let _ = writeln!(out, "  FAIL  {} ({ms:.1} ms)", case.name);
                for f in &case.failures {
                    let _ = writeln!(out, "        {f}");
                }
            }
            if verbose || !case.failures.is_empty() {
                for p in &case.published {
                    let _ = writeln!(out, "        published: {p}");
                }
                for l in &case.logs {
                    let _ = writeln!(out, "        log: {l}");
                }
            }
        }
        out
    }
}

/// The case files a path names: a file itself, or the `cases.toml` in a folder.
fn resolve(path: &Path) -> PathBuf {
    if path.is_dir() {
        path.join(CASES_FILE)
    } else {
        path.to_path_buf()
    }
}

/// The case files `wasmev test PATHS` runs: each path as a file or a folder holding
/// `cases.toml`; with no paths, `./cases.toml` if present, else every
/// `handlers/*/cases.toml`.
pub fn case_files(paths: &[PathBuf]) -> Vec<PathBuf> {
    if !paths.is_empty() {
        return paths.iter().map(|p| resolve(p)).collect();
    }
    let here = PathBuf::from(CASES_FILE);
    if here.is_file() {
        vec![here]
    } else {
        discover(Path::new(""))
    }
}

/// Every `handlers/*/cases.toml` under `root`, sorted.
fn discover(root: &Path) -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(root.join("handlers"))
        .into_iter()
        .flatten()
        .flatten()
        .map(|entry| entry.path().join(CASES_FILE))
        .filter(|p| p.is_file())
        .collect();
    found.sort();
    found
}

/// Guest log lines, collected from the `guest` tracing target while cases run.
#[derive(Clone, Default)]
pub struct GuestLogs(Arc<Mutex<Vec<String>>>);

impl GuestLogs {
    /// The lines collected since the last take, oldest first.
    pub fn take(&self) -> Vec<String> {
        std::mem::take(&mut *self.0.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

impl<S: tracing::Subscriber> Layer<S> for GuestLogs {
    fn on_event(&self, event: &tracing::Event<'_>, _: Context<'_, S>) {
        if event.metadata().target() != "guest" {
            return;
        }
        struct Message<'a>(&'a mut String);
        impl tracing::field::Visit for Message<'_> {
            fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
                if field.name() == "message" {
                    let _ = write!(self.0, "{value:?}");
                }
            }
        }
        let mut line = format!("{} ", event.metadata().level().as_str().to_lowercase());
        event.record(&mut Message(&mut line));
        self.0.lock().unwrap_or_else(|e| e.into_inner()).push(line);
    }
}

/// Why a case file could not be run at all (as opposed to a case failing).
#[derive(Debug, thiserror::Error)]
pub enum CaseFileError {
    // The io error is in the text, not a `source` (see `ManifestError::Read`).
    #[error("cannot read {}: {error}", path.display())]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{}: {message}", path.display())]
    Invalid { path: PathBuf, message: String },
    // The chain is in the text, not a `source` (see `ManifestError::Read`).
    #[error("{}: {error:#}", path.display())]
    Handler { path: PathBuf, error: anyhow::Error },
}

/// Run every case in the file at `path`; `filter` keeps only cases whose name contains it.
pub async fn run_file(
    path: &Path,
    filter: Option<&str>,
    cache: Option<ArtifactCache>,
    logs: &GuestLogs,
) -> Result<FileReport, CaseFileError> {
    let invalid = |message: String| CaseFileError::Invalid {
        path: path.to_path_buf(),
        message,
    };
    let text = std::fs::read_to_string(path).map_err(|error| CaseFileError::Read {
        path: path.to_path_buf(),
        error,
    })?;
    let file: CaseFile = if path.extension().is_some_and(|e| e == "json") {
        serde_json::from_str(&text).map_err(|e| invalid(e.to_string()))?
    } else {
        toml::from_str(&text).map_err(|e| invalid(toml_error(&text, &e)))?
    };
    if file.cases.is_empty() {
        return Err(invalid("no cases: add a [[case]] table".into()));
    }
    let payloads = file
        .cases
        .iter()
        .map(|c| payload_of(c).map_err(|m| invalid(format!("case {:?}: {m}", c.name))))
        .collect::<Result<Vec<_>, _>>()?;

    let manifest_path = path.parent().unwrap_or(Path::new("")).join(&file.manifest);
    let handler_error = |error: anyhow::Error| CaseFileError::Handler {
        path: path.to_path_buf(),
        error,
    };
    let manifest = Manifest::load(&manifest_path).map_err(|e| handler_error(e.into()))?;
    let spec = match (&file.handler, manifest.handlers.as_slice()) {
        (Some(name), _) => manifest.handler(name).cloned().ok_or_else(|| {
            invalid(format!(
                "{} has no handler named {name:?} (it has: {})",
                manifest_path.display(),
                names(&manifest)
            ))
        })?,
        (None, [only]) => only.clone(),
        (None, _) => {
            return Err(invalid(format!(
                "{} has {} handlers; say which with handler = \"...\" (one of: {})",
                manifest_path.display(),
                manifest.handlers.len(),
                names(&manifest)
            )));
        }
    };

    let engines = Engines::new();
    // Deadlines are enforced by epoch ticks, as in the host.
    let _ticker = EpochTicker::start(&engines).map_err(handler_error)?;
    let loading = Instant::now();
    let compiled = {
        let spec = spec.clone();
        tokio::task::spawn_blocking(move || Compiler::new(engines, cache).compile(&spec))
            .await
            .map_err(|e| handler_error(e.into()))?
            .map_err(handler_error)?
    };
    let loaded = (compiled.source, loading.elapsed());
    let broker = MemoryBroker::new();
    let metrics = Metrics::new();
    let handler = Handler::new(
        compiled,
        Broker::Memory(broker.clone()),
        metrics.handler(&spec.name),
    );
    let everything = Pattern::new(">").map_err(|e| handler_error(e.into()))?;
    let mut outbox = Broker::Memory(broker)
        .subscribe(&everything, None)
        .await
        .map_err(handler_error)?;

    let mut reports = Vec::new();
    for (case, payload) in file.cases.iter().zip(payloads) {
        if filter.is_some_and(|f| !case.name.contains(f)) {
            continue;
        }
        logs.take();
        let message = Message {
            subject: case.subject.clone(),
            reply: case.reply_to.clone(),
            headers: case
                .headers
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            payload,
        };
        let delivery = Delivery {
            reply_to: case.reply_to.clone(),
            dedupe_prefix: None,
            hops: Delivery::hops_of(&message.headers),
        };
        let event = event_for(message, case.attempt, || {
            format!("case-{}", reports.len() + 1).into()
        });
        let handler = if case.config.is_empty() {
            handler.clone()
        } else {
            with_config(&handler, &case.config, &metrics)
        };
        let started = Instant::now();
        let (outcome, _replied) = dispatch(&handler, event, delivery).await;
        let elapsed = started.elapsed();
        let published = drain(&mut outbox).await;
        let logs = logs.take();
        reports.push(CaseReport {
            name: case.name.clone(),
            elapsed,
            failures: check(&case.expect, &outcome, &published, &logs),
            logs,
            published: published.iter().map(describe).collect(),
        });
    }
    Ok(FileReport {
        path: path.to_path_buf(),
        handler: spec.name,
        loaded,
        cases: reports,
    })
}

/// `handler` with `overrides` laid over its config: the same compiled code, a fresh
/// version (so warm instances never carry the manifest's config into the case).
fn with_config(
    handler: &Arc<Handler>,
    overrides: &BTreeMap<String, Value>,
    metrics: &Metrics,
) -> Arc<Handler> {
    let mut spec = handler.spec.clone();
    for (key, value) in overrides {
        // As in the manifest: strings as they are, numbers and booleans as written.
        let text = match value {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        spec.config.insert(key.clone(), text);
    }
    let compiled = Compiled {
        spec,
        pre: handler.pre.clone(),
        digest: handler.digest.clone(),
        source: Source::Cache,
    };
    Handler::new(
        compiled,
        handler.broker.clone(),
        metrics.handler(&handler.spec.name),
    )
}

fn names(manifest: &Manifest) -> String {
    let names: Vec<&str> = manifest.handlers.iter().map(|h| h.name.as_str()).collect();
    names.join(", ")
}

fn toml_error(src: &str, e: &toml::de::Error) -> String {
    match e.span() {
        Some(span) => {
            let line = src[..span.start.min(src.len())].matches('\n').count() + 1;
            format!("line {line}: {}", e.message())
        }
        None => e.message().to_string(),
    }
}

fn payload_of(case: &Case) -> Result<Bytes, String> {
    match (&case.payload, &case.json) {
        (Some(_), Some(_)) => Err("set payload or json, not both".into()),
        (Some(text), None) => Ok(Bytes::from(text.clone())),
        (None, Some(value)) => serde_json::to_vec(value)
            .map(Bytes::from)
            .map_err(|e| e.to_string()),
        (None, None) => Ok(Bytes::new()),
    }
}

/// Everything published so far. The embedded broker hands a message to its subscribers
/// before the publish returns, so once the event is done its publishes are all queued.
async fn drain(outbox: &mut Subscription) -> Vec<Message> {
    let mut out = Vec::new();
    while let Ok(Some(m)) = tokio::time::timeout(Duration::from_millis(1), outbox.next()).await {
        out.push(m);
    }
    out
}

fn describe(m: &Message) -> String {
    let headers: Vec<String> = m.headers.iter().map(|(k, v)| format!("{k}={v}")).collect();
    format!(
        "{} {} [{}]",
        m.subject,
        String::from_utf8_lossy(&m.payload),
        headers.join(", ")
    )
}

//! Hot reload: what asks for one (file changes, SIGHUP, `POST /reload`, `wasmev dev`), and
//! what a reload reports back.
//!
//! Requests go to the host's serve loop over a channel and run one at a time, so two
//! triggers never race to swap the same handler. The work itself (diff, compile, swap) is
//! in [`crate::runtime`].

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use notify::{EventKind, RecursiveMode};
use notify_debouncer_full::{DebounceEventResult, Debouncer, RecommendedCache, new_debouncer};
use serde::Serialize;
use tokio::sync::{mpsc, oneshot};

use crate::cache::short;
use crate::manifest::Manifest;

/// Quiet time after the last change to a watched file before reloading. Why 50 ms: a
/// compiler or `cp` writes a module in a burst of chunks well inside it, while a person
/// saving a file sees the swap at once. A file still half-written after it fails to load,
/// leaves the old version serving, and is retried on its next change.
pub const DEBOUNCE: Duration = Duration::from_millis(50);

/// What started a reload; it appears in the log line and the report.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Cause {
    FileChange,
    Sighup,
    AdminRequest,
    DevBuild,
}

impl std::fmt::Display for Cause {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Cause::FileChange => "file change",
            Cause::Sighup => "SIGHUP",
            Cause::AdminRequest => "POST /reload",
            Cause::DevBuild => "wasmev dev build",
        })
    }
}

/// What a reload did, per handler. Serialized as the body of `POST /reload`.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct Report {
    /// `ok` when everything the manifest asks for is running; `refused` otherwise.
    pub result: String,
    pub cause: Option<Cause>,
    /// Problems that stopped the whole reload: an invalid manifest, or a broker that did
    /// not confirm the subscriptions and pulls the reload made (which are undone).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub added: Vec<Version>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub swapped: Vec<Swap>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub removed: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub unchanged: Vec<String>,
    /// Handlers whose change could not be applied; their old version (if any) runs on.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub refused: Vec<Refusal>,
    /// Settings that changed but only take effect after a restart.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub restart_needed: Vec<String>,
    /// Every handler running after the reload, with the module digest new events run on.
    pub live: Vec<Version>,
    pub elapsed_ms: u64,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Version {
    pub handler: String,
    pub digest: String,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Swap {
    pub handler: String,
    pub from: String,
    pub to: String,
    /// Which settings changed: `module`, `subscribe`, `config`, ...
    pub changed: Vec<&'static str>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Refusal {
    pub handler: String,
    pub error: String,
}

impl Refusal {
    pub fn new(handler: &str, error: String) -> Self {
        Self {
            handler: handler.to_string(),
            error,
        }
    }
}

impl Report {
    pub fn is_ok(&self) -> bool {
        self.errors.is_empty() && self.refused.is_empty()
    }

    /// Every problem, one entry each.
    pub fn problems(&self) -> Vec<&str> {
        self.errors
            .iter()
            .map(String::as_str)
            .chain(self.refused.iter().map(|r| r.error.as_str()))
            .collect()
    }

    /// One log line per handler that changed or was refused, with digests before and after.
    pub fn log(&self) {
        let cause = self.cause.map(|c| c.to_string()).unwrap_or_default();
        for v in &self.added {
            tracing::info!(handler = %v.handler, digest = %short(&v.digest), %cause, "handler added");
        }
        for s in &self.swapped {
            tracing::info!(
                handler = %s.handler,
                from = %short(&s.from),
                to = %short(&s.to),
                changed = %s.changed.join(","),
                %cause,
                "handler swapped"
            );
        }
        for name in &self.removed {
            tracing::info!(handler = %name, %cause, "handler removed; its in-flight events finish");
        }
        for r in &self.refused {
            tracing::error!(%cause, "reload refused, the old version keeps serving: {}", r.error);
        }
        for e in &self.errors {
            tracing::error!(%cause, "reload refused, nothing changed:\n{e}");
        }
        for setting in &self.restart_needed {
            tracing::warn!(%cause, "[{setting}] changed; it takes effect after a restart");
        }
        if self.is_ok() && !self.changed_anything() {
            // A watched file touched without a change (an editor saving the same bytes) is
            // routine; an explicit request deserves an answer in the log.
            if self.cause == Some(Cause::FileChange) {
                tracing::debug!(%cause, elapsed_ms = self.elapsed_ms, "reload: nothing changed");
            } else {
                tracing::info!(%cause, elapsed_ms = self.elapsed_ms, "reload: nothing changed");
            }
        } else if self.is_ok() {
            tracing::info!(%cause, elapsed_ms = self.elapsed_ms, "reload done");
        }
    }

    /// Whether the reload changed anything that runs.
    pub fn changed_anything(&self) -> bool {
        !(self.added.is_empty() && self.swapped.is_empty() && self.removed.is_empty())
    }
}

/// A request for the serve loop, with where to send the report.
pub struct Request {
    pub cause: Cause,
    pub reply: Option<oneshot::Sender<Report>>,
}

/// A handle that asks the running host to reload. Cheap to clone.
#[derive(Clone)]
pub struct Reloader {
    tx: mpsc::Sender<Request>,
}

/// Requests queued beyond the one running. Why 8: a reload reads the manifest afresh, so
/// queued requests of the same cause are redundant; a few absorb bursts from several
/// triggers, and a full queue means a reload that will see the latest files is pending.
const QUEUE: usize = 8;

impl Reloader {
    pub fn channel() -> (Self, mpsc::Receiver<Request>) {
        let (tx, rx) = mpsc::channel(QUEUE);
        (Self { tx }, rx)
    }

    /// Reload and wait for the report; `None` if the host is shutting down.
    pub async fn reload(&self, cause: Cause) -> Option<Report> {
        let (reply, report) = oneshot::channel();
        self.tx
            .send(Request {
                cause,
                reply: Some(reply),
            })
            .await
            .ok()?;
        report.await.ok()
    }

    /// Ask for a reload without waiting (from a non-async thread). Dropped when the queue
    /// is full: the reloads already queued will read the same files.
    pub fn nudge(&self, cause: Cause) {
        let _ = self.tx.try_send(Request { cause, reply: None });
    }
}

/// Watches the manifest and every module it names; a change asks for a reload.
///
/// Directories are watched rather than files: editors and compilers often write a new
/// file and rename it over the old one, which a watch on the old file's inode misses.
pub struct FileWatcher {
    debouncer: Debouncer<notify::RecommendedWatcher, RecommendedCache>,
    watched_dirs: HashSet<PathBuf>,
    interesting: Arc<Mutex<HashSet<PathBuf>>>,
}

impl FileWatcher {
    pub fn start(manifest: &Manifest, reloader: Reloader) -> anyhow::Result<Self> {
        let interesting: Arc<Mutex<HashSet<PathBuf>>> = Arc::default();
        let debouncer = new_debouncer(DEBOUNCE, None, {
            let interesting = interesting.clone();
            move |result: DebounceEventResult| match result {
                Ok(events) => {
                    let wanted = interesting.lock().unwrap_or_else(|e| e.into_inner());
                    let hit = events
                        .iter()
                        .filter(|e| is_write(&e.event.kind))
                        .flat_map(|e| e.event.paths.iter())
                        .find(|path| wanted.contains(*path));
                    if let Some(path) = hit {
                        tracing::debug!(path = %path.display(), "changed; reloading");
                        reloader.nudge(Cause::FileChange);
                    }
                }
                Err(errors) => {
                    for e in errors {
                        tracing::warn!("file watcher: {e}");
                    }
                }
            }
        })
        .context("cannot start the file watcher")?;
        let mut watcher = Self {
            debouncer,
            watched_dirs: HashSet::new(),
            interesting,
        };
        watcher.follow(manifest);
        Ok(watcher)
    }

    /// Watch what `manifest` names, and stop watching what it no longer does.
    pub fn follow(&mut self, manifest: &Manifest) {
        let files = std::iter::once(manifest.path.as_path())
            .chain(manifest.handlers.iter().map(|h| h.module.as_path()));
        let mut interesting = HashSet::new();
        let mut dirs = HashSet::new();
        for file in files {
            let Some((dir, path)) = absolute(file) else {
                continue;
            };
            interesting.insert(path);
            dirs.insert(dir);
        }
        for dir in self.watched_dirs.difference(&dirs) {
            let _ = self.debouncer.unwatch(dir);
        }
        let mut watched = HashSet::new();
        for dir in dirs {
            if self.watched_dirs.contains(&dir) {
                watched.insert(dir);
                continue;
            }
            match self.debouncer.watch(&dir, RecursiveMode::NonRecursive) {
                Ok(()) => {
                    watched.insert(dir);
                }
                Err(e) => tracing::warn!(
                    dir = %dir.display(),
                    "cannot watch for changes ({e}); use SIGHUP or POST /reload after editing files there"
                ),
            }
        }
        self.watched_dirs = watched;
        *self.interesting.lock().unwrap_or_else(|e| e.into_inner()) = interesting;
    }
}

/// Whether an event can mean new contents. Opening and reading a file, or a change of its
/// access time, must not count: the reload itself reads every module, so counting reads
/// would make each reload trigger the next.
pub fn is_write(kind: &EventKind) -> bool {
    match kind {
        EventKind::Create(_) | EventKind::Remove(_) => true,
        EventKind::Modify(notify::event::ModifyKind::Metadata(_)) => false,
        EventKind::Modify(_) => true,
        EventKind::Access(_) | EventKind::Any | EventKind::Other => false,
    }
}

/// The directory to watch for `file` and the path notify reports for it.
fn absolute(file: &Path) -> Option<(PathBuf, PathBuf)> {
    let name = file.file_name()?;
    let parent = match file.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let dir = std::fs::canonicalize(parent).ok()?;
    Some((dir.clone(), dir.join(name)))
}

/// Which runtime settings of a handler differ between two versions.
pub fn changes(
    old: &crate::manifest::HandlerSpec,
    new: &crate::manifest::HandlerSpec,
    module_changed: bool,
) -> Vec<&'static str> {
    let mut changed = Vec::new();
    let mut check = |name: &'static str, differs: bool| {
        if differs {
            changed.push(name);
        }
    };
    check("module", module_changed || old.module != new.module);
    check("subscribe", old.subscribe != new.subscribe);
    check("queue", old.queue != new.queue);
    check("publish", old.publish != new.publish);
    check("config", old.config != new.config);
    check(
        "limits",
        old.deadline != new.deadline
            || old.memory != new.memory
            || old.max_in_flight != new.max_in_flight
            || old.guards != new.guards,
    );
    check("service", old.service != new.service);
    check("jetstream", old.jetstream != new.jetstream);
    check("rollback_after", old.rollback_after != new.rollback_after);
    check("instances", old.instances != new.instances);
    changed
}

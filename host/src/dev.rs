//! `wasmev dev`: the edit-save-see loop for handler authors, in one process.
//!
//! Each handler with a `build` command has its `watch` globs watched. A change runs the
//! build (its output printed with the handler's name in front), then asks the running
//! host to reload and prints what went live, or why the new version was refused while
//! the old one keeps serving.

use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use globset::{Glob, GlobSet, GlobSetBuilder};
use notify::RecursiveMode;
use notify_debouncer_full::{DebounceEventResult, Debouncer, RecommendedCache, new_debouncer};
use tokio::io::{AsyncBufReadExt as _, BufReader};
use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::cache::short;
use crate::manifest::{HandlerSpec, Manifest};
use crate::reload::{Cause, Reloader, Report, is_write};

/// Quiet time after the last source change before building. Why 200 ms: an editor's
/// "save all" or a `git checkout` touches many files in a burst; one build covers it.
pub const SOURCE_DEBOUNCE: Duration = Duration::from_millis(200);

/// One handler's build: the command, where it runs, and which files trigger it.
#[derive(Debug, Clone)]
pub struct Build {
    pub handler: String,
    pub command: String,
    pub dir: PathBuf,
    globs: GlobSet,
    roots: Vec<PathBuf>,
}

impl Build {
    /// The builds `manifest` declares (handlers with a `build` command).
    pub fn all(manifest: &Manifest) -> anyhow::Result<Vec<Build>> {
        let dir = manifest_dir(manifest);
        manifest
            .handlers
            .iter()
            .filter_map(|h| h.dev.build.as_ref().map(|command| (h, command)))
            .map(|(h, command)| Build::new(h, command, &dir))
            .collect()
    }

    fn new(spec: &HandlerSpec, command: &str, dir: &Path) -> anyhow::Result<Build> {
        let mut globs = GlobSetBuilder::new();
        let mut roots = Vec::new();
        for pattern in &spec.dev.watch {
            let absolute = dir.join(pattern);
            let text = absolute.to_string_lossy();
            globs.add(
                Glob::new(&text)
                    .with_context(|| format!("handler {:?}: watch {pattern:?}", spec.name))?,
            );
            roots.push(literal_prefix(&absolute));
        }
        Ok(Build {
            handler: spec.name.clone(),
            command: command.to_string(),
            dir: dir.to_path_buf(),
            globs: globs.build()?,
            roots,
        })
    }

    /// Run the build, printing its output line by line; whether it succeeded.
    pub async fn run(&self) -> bool {
        let started = Instant::now();
        println!("[{}] building: {}", self.handler, self.command);
        let child = tokio::process::Command::new("sh")
            .arg("-c")
            .arg(&self.command)
            .current_dir(&self.dir)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn();
        let mut child = match child {
            Ok(c) => c,
            Err(e) => {
                println!("[{}] cannot run the build: {e}", self.handler);
                return false;
            }
        };
        let mut streams = JoinSet::new();
        if let Some(out) = child.stdout.take() {
            streams.spawn(echo(self.handler.clone(), BufReader::new(out)));
        }
        if let Some(err) = child.stderr.take() {
            streams.spawn(echo(self.handler.clone(), BufReader::new(err)));
        }
        let status = child.wait().await;
        while streams.join_next().await.is_some() {}
        let secs = started.elapsed().as_secs_f64();
        match status {
            Ok(s) if s.success() => {
                println!("[{}] build ok in {secs:.1}s", self.handler);
                true
            }
            Ok(s) => {
                println!(
                    "[{}] build failed ({s}) after {secs:.1}s; the running version stays",
                    self.handler
                );
                false
            }
            Err(e) => {
                println!("[{}] build did not finish: {e}", self.handler);
                false
            }
        }
    }
}

async fn echo(handler: String, reader: impl tokio::io::AsyncBufRead + Unpin) {
    let mut lines = reader.lines();
    while let Ok(Some(line)) = lines.next_line().await {
        println!("[{handler}] | {line}");
    }
}

/// The directory part of a glob before its first wildcard: what to watch recursively.
fn literal_prefix(pattern: &Path) -> PathBuf {
    let mut root = PathBuf::new();
    for part in pattern.components() {
        let text = part.as_os_str().to_string_lossy();
        if text.contains(['*', '?', '[', '{']) {
            break;
        }
        root.push(part);
    }
    // A glob naming one file: watch its directory.
    if root == pattern && !matches!(pattern.components().next_back(), Some(Component::RootDir)) {
        root.pop();
    }
    root
}

fn manifest_dir(manifest: &Manifest) -> PathBuf {
    let dir = match manifest.path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::canonicalize(&dir).unwrap_or(dir)
}

/// Run every build once, before the host starts; whether all succeeded.
pub async fn build_all(builds: &[Build]) -> bool {
    let mut ok = true;
    for build in builds {
        ok &= build.run().await;
    }
    ok
}

/// Watch the builds' sources until `stop`: rebuild on change, then reload and report.
pub struct DevLoop {
    _debouncer: Debouncer<notify::RecommendedWatcher, RecommendedCache>,
    tasks: JoinSet<()>,
}

impl DevLoop {
    pub fn start(
        builds: Vec<Build>,
        reloader: Reloader,
        stop: CancellationToken,
    ) -> anyhow::Result<Self> {
        let triggers: BTreeMap<String, Arc<Notify>> = builds
            .iter()
            .map(|b| (b.handler.clone(), Arc::new(Notify::new())))
            .collect();
        let matchers: Vec<(GlobSet, Arc<Notify>)> = builds
            .iter()
            .filter_map(|b| Some((b.globs.clone(), triggers.get(&b.handler)?.clone())))
            .collect();
        let mut debouncer =
            new_debouncer(SOURCE_DEBOUNCE, None, move |result: DebounceEventResult| {
                let Ok(events) = result else { return };
                // Builds read the sources they watch: only writes count, or every build
                // would trigger the next.
                let written: Vec<&PathBuf> = events
                    .iter()
                    .filter(|e| is_write(&e.event.kind))
                    .flat_map(|e| e.event.paths.iter())
                    .collect();
                for (globs, trigger) in &matchers {
                    if written.iter().any(|path| globs.is_match(path)) {
                        // Stores one permit when a build is running: changes during a build
                        // cause exactly one more build after it.
                        trigger.notify_one();
                    }
                }
            })
            .context("cannot start the source watcher")?;
        for build in &builds {
            for root in &build.roots {
                debouncer
                    .watch(root, RecursiveMode::Recursive)
                    .with_context(|| {
                        format!(
                            "handler {:?}: cannot watch {}",
                            build.handler,
                            root.display()
                        )
                    })?;
            }
            println!(
                "[{}] watching {} for changes",
                build.handler,
                build
                    .roots
                    .iter()
                    .map(|r| r.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        let mut tasks = JoinSet::new();
        for build in builds {
            let Some(trigger) = triggers.get(&build.handler).cloned() else {
                continue;
            };
            let reloader = reloader.clone();
            let stop = stop.clone();
            tasks.spawn(async move {
                loop {
                    tokio::select! {
                        () = stop.cancelled() => return,
                        () = trigger.notified() => {}
                    }
                    if build.run().await
                        && let Some(report) = reloader.reload(Cause::DevBuild).await
                    {
                        print_outcome(&build.handler, &report);
                    }
                }
            });
        }
        Ok(Self {
            _debouncer: debouncer,
            tasks,
        })
    }

    /// Wait for the loops to end (after `stop`).
    pub async fn join(mut self) {
        while self.tasks.join_next().await.is_some() {}
    }
}

/// One line on what the reload after a build did for `handler`.
fn print_outcome(handler: &str, report: &Report) {
    if let Some(swap) = report.swapped.iter().find(|s| s.handler == handler) {
        println!(
            "[{handler}] live: {} -> {} (reload took {} ms)",
            short(&swap.from),
            short(&swap.to),
            report.elapsed_ms
        );
    } else if let Some(refusal) = report.refused.iter().find(|r| r.handler == handler) {
        println!(
            "[{handler}] refused, the old version keeps serving: {}",
            refusal.error
        );
    } else if let Some(live) = report.live.iter().find(|v| v.handler == handler) {
        println!("[{handler}] live: {} (unchanged)", short(&live.digest));
    }
    for e in &report.errors {
        println!("[{handler}] reload refused: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watch_roots_stop_at_the_first_wildcard() {
        assert_eq!(
            literal_prefix(Path::new("/w/h/src/**/*.rs")),
            Path::new("/w/h/src")
        );
        assert_eq!(literal_prefix(Path::new("/w/h/*.js")), Path::new("/w/h"));
        assert_eq!(literal_prefix(Path::new("/w/h/app.py")), Path::new("/w/h"));
    }
}

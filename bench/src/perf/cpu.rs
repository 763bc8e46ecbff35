//! CPU time of threads, read from /proc, for the tables' "CPU per event" figures.

use std::collections::BTreeMap;
use std::time::Duration;

/// CPU time each of some threads had used at one moment, by thread id. Empty where /proc
/// is not available.
#[derive(Debug, Default)]
pub(super) struct ThreadsCpu(BTreeMap<String, Duration>);

impl ThreadsCpu {
    /// CPU used since `before`, thread by thread.
    ///
    /// Why not the difference of two sums: a thread that exits in between takes its whole
    /// life's CPU out of the second sum. The floor's blocking thread (~5 s of CPU, named
    /// like a tokio worker) exited in the middle of the next row's runs and took ~3.5 µs
    /// off its CPU per event. Here a thread gone by the end loses only what it used
    /// inside the window, and a thread started inside it counts from zero.
    pub(super) fn since(&self, before: &ThreadsCpu) -> Duration {
        self.0
            .iter()
            .map(|(tid, now)| now.saturating_sub(before.0.get(tid).copied().unwrap_or_default()))
            .sum()
    }
}

/// This process's tokio worker threads: the host (or the baseline subscriber), not the
/// load generator, which runs on its own named thread.
pub(super) fn workers() -> ThreadsCpu {
    threads("/proc/self/task", |name| name == "tokio-rt-worker")
}

/// The threads under `tasks` (a /proc `task` dir) whose name `counts`: schedstat's first
/// field, nanoseconds on CPU.
pub(super) fn threads(tasks: &str, counts: impl Fn(&str) -> bool) -> ThreadsCpu {
    let mut cpu = ThreadsCpu::default();
    let Ok(tasks) = std::fs::read_dir(tasks) else {
        return cpu;
    };
    for task in tasks.flatten() {
        let path = task.path();
        let counted = std::fs::read_to_string(path.join("comm")).is_ok_and(|n| counts(n.trim()));
        // schedstat: nanoseconds on CPU, then waiting, then timeslices.
        let on_cpu = std::fs::read_to_string(path.join("schedstat"))
            .ok()
            .and_then(|s| s.split_whitespace().next()?.parse::<u64>().ok());
        if let (true, Some(ns)) = (counted, on_cpu) {
            cpu.0.insert(
                task.file_name().to_string_lossy().into_owned(),
                Duration::from_nanos(ns),
            );
        }
    }
    cpu
}

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

/// The whole machine's CPU time at one moment (every core, every process), in clock ticks,
/// from the first line of /proc/stat.
#[derive(Debug, Clone, Copy)]
pub(super) struct MachineCpu {
    total: u64,
    idle: u64,
    kernel: u64,
}

/// How busy the machine was between two readings, as shares of all its cores' time.
#[derive(Debug, Clone, Copy)]
pub(super) struct Busy {
    /// Not idle: any process, the kernel, or the hypervisor's steal.
    pub(super) busy: f64,
    /// In the kernel (system, interrupts, softirqs): wake-ups and socket I/O.
    pub(super) kernel: f64,
}

impl std::fmt::Display for Busy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "cores {:.0} % busy, {:.0} % in the kernel",
            100.0 * self.busy,
            100.0 * self.kernel
        )
    }
}

impl Busy {
    /// The mean of readings over runs of equal length; `None` if there are none.
    pub(super) fn mean(readings: impl Iterator<Item = Busy>) -> Option<Busy> {
        let (n, busy, kernel) = readings.fold((0u32, 0.0, 0.0), |(n, busy, kernel), b| {
            (n + 1, busy + b.busy, kernel + b.kernel)
        });
        (n > 0).then(|| Busy {
            busy: busy / f64::from(n),
            kernel: kernel / f64::from(n),
        })
    }
}

impl MachineCpu {
    /// Now; `None` without /proc.
    pub(super) fn now() -> Option<Self> {
        let stat = std::fs::read_to_string("/proc/stat").ok()?;
        let fields = stat.lines().next()?.strip_prefix("cpu ")?;
        let fields: Vec<u64> = fields
            .split_whitespace()
            .map(|f| f.parse().ok())
            .collect::<Option<_>>()?;
        // user nice system idle iowait irq softirq steal (guest time is inside user).
        let [user, nice, system, idle, iowait, irq, softirq, steal, ..] = fields[..] else {
            return None;
        };
        Some(Self {
            total: user + nice + system + idle + iowait + irq + softirq + steal,
            idle: idle + iowait,
            kernel: system + irq + softirq,
        })
    }

    /// How busy the machine was since `before` (`None`: no reading, or no tick passed).
    pub(super) fn busy_since(before: Option<MachineCpu>) -> Option<Busy> {
        Self::now()?.since(&before?)
    }

    /// How busy the machine was since `before`; `None` if no tick passed.
    fn since(&self, before: &MachineCpu) -> Option<Busy> {
        let total = self.total.checked_sub(before.total).filter(|t| *t > 0)? as f64;
        let share = |now: u64, then: u64| now.saturating_sub(then) as f64 / total;
        Some(Busy {
            busy: 1.0 - share(self.idle, before.idle),
            kernel: share(self.kernel, before.kernel),
        })
    }
}

//! The load generator (its own runtime), the baseline republishers, the host under test,
//! and the measuring of a throughput figure.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use bytes::Bytes;
use futures::StreamExt as _;
use wasmev::broker::Broker;
use wasmev::cache::ArtifactCache;
use wasmev::subject::Pattern;
use wasmev::{Host, Manifest, Options};

use super::cpu;
use super::reference::{Bare, Call, Instance};
use super::{BARE, IN_FLIGHT, LATENCY_RATE, PAYLOAD, Row, WINDOW, median, rate, us_per_event};
use crate::alloc;

/// The broker events travel through: where they go in and where answers are counted.
#[derive(Clone)]
pub(super) enum Route {
    Nats(async_nats::Client),
    Memory(wasmev::broker::memory::MemoryBroker),
}

impl Route {
    pub(super) async fn publish(
        &self,
        subject: &'static str,
        payload: Bytes,
    ) -> anyhow::Result<()> {
        match self {
            Route::Nats(c) => c.publish(subject, payload).await?,
            Route::Memory(b) => {
                b.publish(subject, None, &[], payload).await?;
            }
        }
        Ok(())
    }

    pub(super) async fn flush(&self) -> anyhow::Result<()> {
        if let Route::Nats(c) = self {
            c.flush().await?;
        }
        Ok(())
    }

    /// Count every message on `bench.out`; with `latency`, record publish→answer times
    /// (the payload starts with the send time in ns since `epoch`).
    pub(super) async fn collect(
        &self,
        received: Arc<Answers>,
        latency: Option<(Instant, Arc<std::sync::Mutex<Vec<u64>>>)>,
    ) -> anyhow::Result<tokio::task::JoinHandle<()>> {
        let record = move |payload: &[u8]| {
            if let Some((epoch, samples)) = &latency {
                let mut sent = [0u8; 8];
                sent.copy_from_slice(&payload[..8]);
                let now = epoch.elapsed().as_nanos() as u64;
                let took = now.saturating_sub(u64::from_le_bytes(sent));
                samples.lock().unwrap_or_else(|e| e.into_inner()).push(took);
            }
            received.add();
        };
        Ok(match self {
            Route::Nats(c) => {
                let mut sub = c.subscribe("bench.out").await?;
                c.flush().await?;
                tokio::spawn(async move {
                    while let Some(m) = sub.next().await {
                        record(&m.payload);
                    }
                })
            }
            Route::Memory(b) => {
                let mut sub = b.subscribe(Pattern::new("bench.out")?, None);
                tokio::spawn(async move {
                    while let Some(m) = sub.next().await {
                        record(&m.payload);
                    }
                })
            }
        })
    }
}

/// The load generator's own runtime, one thread, like a client in another process: the
/// publisher (waiting for room in its window, or pacing itself) and the counter never
/// hold up the host's (or the baseline's) tasks on their worker threads, nor wait behind
/// them.
pub(super) static DRIVER: std::sync::LazyLock<Option<tokio::runtime::Runtime>> =
    std::sync::LazyLock::new(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("bench-driver")
            .enable_all()
            .build()
            .ok()
    });

/// A runtime with one worker thread for a host (or a baseline), as `wasmev run
/// --worker-threads 1` has: the rows pricing that flag run their contenders here. Its
/// threads are counted like the main runtime's (tokio's default name, and the allocation
/// tally), so their CPU and allocations per event read alike.
pub(super) static ONE_WORKER: std::sync::LazyLock<Option<tokio::runtime::Runtime>> =
    std::sync::LazyLock::new(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .on_thread_start(crate::alloc::mark_worker)
            .enable_all()
            .build()
            .ok()
    });

/// Run `fut` on the load generator's runtime.
pub(super) async fn on_driver<T: Send + 'static>(
    fut: impl Future<Output = anyhow::Result<T>> + Send + 'static,
) -> anyhow::Result<T> {
    on(&DRIVER, "the load generator's", fut).await
}

/// Run `fut` on the one-worker runtime: what it spawns (a host's tasks, a client's
/// connection) stays there.
pub(super) async fn on_one_worker<T: Send + 'static>(
    fut: impl Future<Output = anyhow::Result<T>> + Send + 'static,
) -> anyhow::Result<T> {
    on(&ONE_WORKER, "the one-worker", fut).await
}

async fn on<T: Send + 'static>(
    runtime: &std::sync::LazyLock<Option<tokio::runtime::Runtime>>,
    which: &str,
    fut: impl Future<Output = anyhow::Result<T>> + Send + 'static,
) -> anyhow::Result<T> {
    let Some(runtime) = runtime.as_ref() else {
        bail!("cannot start {which} runtime");
    };
    runtime.spawn(fut).await?
}

/// A NATS route whose connection lives on the load generator's runtime.
pub(super) async fn nats_route(url: &str) -> anyhow::Result<Route> {
    let url = url.to_string();
    on_driver(async move { Ok(Route::Nats(async_nats::connect(url).await?)) }).await
}

/// [`throughput_here`], driven from the load generator's runtime.
pub(super) async fn throughput(path: &Route, n: u64) -> anyhow::Result<f64> {
    let path = path.clone();
    on_driver(async move { throughput_here(&path, n).await }).await
}

/// One latency run's figures, µs publish→answer.
#[derive(Debug, Clone, Copy)]
pub(super) struct Latency {
    pub(super) p50: f64,
    pub(super) p99: f64,
    /// Share of events (0-1) slower than [`SLOW_US`]. On a 2-core VM the p99 can be set by
    /// a few stalls of milliseconds (the scheduler, the hypervisor) that no per-event cost
    /// explains; this, with `max`, tells such a run from one that is slow throughout.
    pub(super) slow: f64,
    pub(super) max: f64,
}

/// What [`Latency::slow`] counts as slow: 1 ms, four to five times the plain NATS
/// subscriber's usual p50 on this machine.
pub(super) const SLOW_US: f64 = 1000.0;

/// [`latency_here`], driven from the load generator's runtime.
pub(super) async fn latency(path: &Route, secs: u64) -> anyhow::Result<Latency> {
    let path = path.clone();
    on_driver(async move { latency_here(&path, secs).await }).await
}

/// Latency runs per figure, one per round. Why 5: one run's p99 moved by hundreds of µs
/// between identical runs on this VM (the baseline's as much as wasmev's); a median of
/// five rounds' differences survives two runs that met a stall, and a round (every
/// contender once) takes under 20 s.
pub(super) const LATENCY_RUNS: usize = 5;

/// One latency run and how busy the machine was over it.
#[derive(Debug, Clone, Copy)]
pub(super) struct LatencyRun {
    pub(super) latency: Latency,
    /// Why it is in the table: at this rate each event is a chain of wake-ups (publisher,
    /// nats-server, subscriber, nats-server, collector), and on this VM they cost more CPU
    /// than the events' own work; a p99 measured on a machine that is mostly busy says
    /// more about the machine than about the path.
    pub(super) machine: Option<cpu::Busy>,
}

/// [`latency`], with the machine's busyness over it.
pub(super) async fn latency_run(path: &Route, secs: u64) -> anyhow::Result<LatencyRun> {
    let before = cpu::MachineCpu::now();
    let latency = latency(path, secs).await?;
    Ok(LatencyRun {
        latency,
        machine: cpu::MachineCpu::busy_since(before),
    })
}

/// The latency row of runs made in rounds with the baseline's (`runs[i]` and `base[i]` in
/// the same round): each side's median p50 and p99 and how busy the machine was on
/// average over its runs; the overheads are the medians of the rounds' own differences,
/// so a stall that falls on one round moves one difference, not a side's median against
/// the other's measured minutes apart.
pub(super) fn latency_row(
    what: &str,
    runs: &[LatencyRun],
    base: &[LatencyRun],
    target: &str,
) -> Row {
    let figure = |runs: &[LatencyRun]| {
        let machine = cpu::Busy::mean(runs.iter().filter_map(|r| r.machine))
            .map_or(String::new(), |b| format!("; {b}"));
        format!(
            "{:.0} / {:.0} µs{machine}",
            median(runs.iter().map(|r| r.latency.p50).collect()),
            median(runs.iter().map(|r| r.latency.p99).collect()),
        )
    };
    let overhead = |of: fn(&Latency) -> f64| {
        median(
            runs.iter()
                .zip(base)
                .map(|(r, b)| of(&r.latency) - of(&b.latency))
                .collect(),
        )
    };
    Row::new(
        what,
        figure(runs),
        figure(base),
        format!(
            "{:+.0} / {:+.0} µs",
            overhead(|l| l.p50),
            overhead(|l| l.p99)
        ),
        target,
    )
}

/// Longest a run waits for its next answer before it fails (events lost, or the path
/// stuck). Why 30 s: far beyond any stall a healthy host shows (a JetStream pull stall
/// is ~2 s), short enough that a broken run ends on its own.
const QUIET: Duration = Duration::from_secs(30);

/// The answers counted on `bench.out`, and a wake-up for the task waiting for them.
///
/// Why not a counter to poll: the load generator shares the 2-core machine with the host
/// and nats-server, and a generator spinning on a full window (as it did, at ~500 000 polls
/// a second, 0.5-0.8 of a core) takes its CPU from them; the slower the path under test,
/// the longer it spun, so it cost wasmev more than the baseline.
#[derive(Default)]
pub(super) struct Answers {
    count: AtomicU64,
    more: tokio::sync::Notify,
}

impl Answers {
    fn add(&self) {
        self.count.fetch_add(1, Ordering::Release);
        // Without a waiter this stores one wake-up (an atomic operation), taken by the
        // next wait.
        self.more.notify_one();
    }

    fn get(&self) -> u64 {
        self.count.load(Ordering::Acquire)
    }

    /// Wait until `done` holds of the count; an error once [`QUIET`] passes without a new
    /// answer.
    async fn until(&self, done: impl Fn(u64) -> bool) -> anyhow::Result<()> {
        loop {
            let seen = self.get();
            if done(seen) {
                return Ok(());
            }
            // An answer counted after `seen` was read left a wake-up, so this cannot miss it.
            if tokio::time::timeout(QUIET, self.more.notified())
                .await
                .is_err()
                && self.get() == seen
            {
                bail!("no answers for {QUIET:?}, {seen} counted (events lost?)");
            }
        }
    }
}

/// Events per second through `path`: `n` events of `PAYLOAD` bytes on `bench.in`, at
/// most `WINDOW` unanswered, timed from the first publish to the last answer.
pub(super) async fn throughput_here(path: &Route, n: u64) -> anyhow::Result<f64> {
    let received = Arc::new(Answers::default());
    let collector = path.collect(received.clone(), None).await?;
    let payload = Bytes::from(vec![b'x'; PAYLOAD]);
    let started = Instant::now();
    for sent in 0..n {
        // Saturating: a late answer from an earlier run can make the count pass `sent`.
        // No flush here: the client writes out every publish it is handed.
        received
            .until(|got| sent.saturating_sub(got) < WINDOW)
            .await
            .with_context(|| format!("{sent} sent"))?;
        path.publish("bench.in", payload.clone()).await?;
    }
    path.flush().await?;
    received.until(|got| got >= n).await?;
    let rate = n as f64 / started.elapsed().as_secs_f64();
    collector.abort();
    Ok(rate)
}

/// Publish→answer latency at `LATENCY_RATE` events/s for `secs` seconds.
pub(super) async fn latency_here(path: &Route, secs: u64) -> anyhow::Result<Latency> {
    let epoch = Instant::now();
    let samples = Arc::new(std::sync::Mutex::new(Vec::new()));
    let received = Arc::new(Answers::default());
    let collector = path
        .collect(received.clone(), Some((epoch, samples.clone())))
        .await?;
    let n = LATENCY_RATE * secs;
    let interval = Duration::from_nanos(1_000_000_000 / LATENCY_RATE);
    // The publisher is a plain thread pacing itself with sleeps (no spinning, no tokio
    // worker held): each send goes through the driver's runtime and is flushed at once,
    // so nothing waits in a client-side batch and the time measured is the path's.
    let runtime = tokio::runtime::Handle::current();
    let publisher = {
        let path = path.clone();
        std::thread::Builder::new()
            .name("bench-publisher".into())
            .spawn(move || -> anyhow::Result<()> {
                let start = Instant::now();
                for i in 0..n {
                    let due = start + interval * i as u32;
                    let now = Instant::now();
                    if due > now {
                        std::thread::sleep(due - now);
                    }
                    let mut payload = vec![0u8; PAYLOAD];
                    payload[..8]
                        .copy_from_slice(&(epoch.elapsed().as_nanos() as u64).to_le_bytes());
                    runtime.block_on(async {
                        path.publish("bench.in", payload.into()).await?;
                        path.flush().await
                    })?;
                }
                Ok(())
            })?
    };
    tokio::task::spawn_blocking(move || publisher.join())
        .await?
        .map_err(|_| anyhow::anyhow!("the publisher thread panicked"))??;
    received.until(|got| got >= n).await?;
    collector.abort();
    let mut s = std::mem::take(&mut *samples.lock().unwrap_or_else(|e| e.into_inner()));
    s.sort_unstable();
    // (The throughput run before each latency run has warmed caches and connections.)
    let at = |q: f64| s[((s.len() - 1) as f64 * q).round() as usize] as f64 / 1e3;
    let slow = s.iter().filter(|&&ns| ns as f64 / 1e3 > SLOW_US).count();
    Ok(Latency {
        p50: at(0.5),
        p99: at(0.99),
        slow: slow as f64 / s.len() as f64,
        max: at(1.0),
    })
}

pub(super) async fn wait_until(done: impl Fn() -> bool, limit: Duration) -> anyhow::Result<()> {
    let since = Instant::now();
    while !done() {
        if since.elapsed() > limit {
            bail!("timed out waiting for answers (events lost?)");
        }
        tokio::time::sleep(Duration::from_micros(200)).await;
    }
    Ok(())
}

/// A baseline republisher running until stopped.
pub(super) struct Baseline {
    pub(super) stop: tokio::sync::oneshot::Sender<()>,
    pub(super) task: tokio::task::JoinHandle<()>,
}

impl Baseline {
    /// Unsubscribe (flushed, so the server has it before anything else subscribes:
    /// otherwise the next subscriber and this one would both answer for a moment).
    pub(super) async fn stop(self) {
        let _ = self.stop.send(());
        let _ = self.task.await;
    }
}

/// What a baseline subscriber does with an event besides republishing its payload.
#[derive(Clone, Copy)]
pub(super) enum Republish {
    /// Nothing: the plain subscriber.
    Plain,
    /// Each republish also carries the header wasmev stamps on every guest publish
    /// (`Wasmev-Hops: 1`), made as the host makes it: what that header alone costs
    /// async-nats.
    WithHops,
    /// The same, and before it the payload goes through a call of the reference component
    /// (`bench/bare`: `handle(list<u8>)`, no imports) on one warm instance, made async as
    /// wasmev makes its calls: the least a Wasm host with wasmev's loop guard does.
    WithHopsAndCall,
    /// The same with a fresh instance of it for each event (store, instantiate, call,
    /// drop), each event on a task of its own and at most [`IN_FLIGHT`] at once, as a
    /// `per-event` handler's are: the least such a host does with a fresh instance.
    WithHopsAndFreshCall,
}

/// The baseline: a plain async-nats subscriber on `bench.in` republishing on `bench.out`,
/// doing `republish`'s extra work.
pub(super) async fn nats_baseline(url: &str, republish: Republish) -> anyhow::Result<Baseline> {
    let mut calls = match republish {
        Republish::Plain | Republish::WithHops => Calls::None,
        Republish::WithHopsAndCall => {
            Calls::Warm(Bare::load(Path::new(BARE))?.instance(Call::Async).await?)
        }
        Republish::WithHopsAndFreshCall => Calls::Fresh(
            Bare::load(Path::new(BARE))?,
            Arc::new(tokio::sync::Semaphore::new(IN_FLIGHT as usize)),
        ),
    };
    let hop_header = !matches!(republish, Republish::Plain);
    let client = async_nats::connect(url).await?;
    let mut sub = client.subscribe("bench.in").await?;
    // Subscribed at the server before the load starts on another connection: a flush
    // only writes, so the first events (all of a warm-up, at times) found no subscriber
    // and a run waited for answers that never came.
    tokio::time::timeout(QUIET, wasmev::broker::nats::round_trip(&client))
        .await
        .context("the baseline's subscription was not confirmed")??;
    let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = &mut stopped => break,
                m = sub.next() => match m {
                    Some(m) => {
                        match &mut calls {
                            Calls::None => {}
                            Calls::Warm(instance) => {
                                if !reported(instance.call(&m.payload, Call::Async).await) {
                                    return;
                                }
                            }
                            Calls::Fresh(bare, in_flight) => {
                                let Ok(permit) = in_flight.clone().acquire_owned().await else {
                                    return;
                                };
                                let (bare, client) = (bare.clone(), client.clone());
                                tokio::spawn(async move {
                                    let _permit = permit;
                                    if reported(bare.call_fresh(&m.payload, Call::Async).await) {
                                        let _ = publish_out(&client, hop_header, m.payload).await;
                                    }
                                });
                                continue;
                            }
                        }
                        if publish_out(&client, hop_header, m.payload).await.is_err() {
                            return;
                        }
                    }
                    None => return,
                },
            }
        }
        let _ = sub.unsubscribe().await;
        let _ = client.flush().await;
    });
    Ok(Baseline { stop, task })
}

/// The reference component's calls a baseline makes, as [`Republish`] chose them.
enum Calls {
    None,
    /// On this one instance.
    Warm(Instance),
    /// On a fresh instance each, each event on a task of its own, at most as many at once
    /// as the semaphore has permits.
    Fresh(Bare, Arc<tokio::sync::Semaphore>),
}

/// Whether a call of the reference component went through; if not, it says why on stderr
/// (the run then waits for answers that never come, and the bench says it stalled).
fn reported(call: anyhow::Result<()>) -> bool {
    if let Err(e) = &call {
        eprintln!("the baseline's call of the reference component failed: {e:#}");
    }
    call.is_ok()
}

/// The baseline's publish of an event's payload on `bench.out`, with wasmev's hop header
/// when `hop_header`, made per message as the host makes it (a clone of a map built once).
async fn publish_out(
    client: &async_nats::Client,
    hop_header: bool,
    payload: Bytes,
) -> Result<(), async_nats::PublishError> {
    if hop_header {
        let headers = wasmev::broker::nats::hops_only(1);
        client
            .publish_with_headers("bench.out", headers, payload)
            .await
    } else {
        client.publish("bench.out", payload).await
    }
}

/// The same on the embedded broker.
pub(super) fn memory_baseline(
    broker: &wasmev::broker::memory::MemoryBroker,
) -> anyhow::Result<Baseline> {
    let mut sub = broker.subscribe(Pattern::new("bench.in")?, None);
    let broker = broker.clone();
    let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = &mut stopped => return,
                m = sub.next() => match m {
                    Some(m) => {
                        if broker.publish("bench.out", None, &[], m.payload).await.is_err() {
                            return;
                        }
                    }
                    None => return,
                },
            }
        }
    });
    Ok(Baseline { stop, task })
}

/// A host running the echo handler built at `module` in `mode` (`per-event` or `reuse`),
/// on `broker_url` (None: embedded), with extra handler TOML.
pub(super) async fn echo_host(
    dir: &Path,
    module: &str,
    mode: &str,
    broker_url: Option<&str>,
    extra: &str,
) -> anyhow::Result<(Running, Broker)> {
    let manifest = echo_manifest(dir, module, mode, broker_url, extra)?;
    let host = Host::start(
        &manifest,
        Options {
            watch: false,
            cache: Some(ArtifactCache::open(dir.join("cache"))?),
            ..Options::default()
        },
    )
    .await?;
    let broker = host.broker().clone();
    Ok((Running::serve(host), broker))
}

/// The manifest of the echo handler in `mode`, on `broker_url` or the embedded broker,
/// with `extra` appended to its `[[handler]]` table; written into `dir`.
pub(super) fn echo_manifest(
    dir: &Path,
    module: &str,
    mode: &str,
    broker_url: Option<&str>,
    extra: &str,
) -> anyhow::Result<Manifest> {
    let module = std::fs::canonicalize(module)
        .with_context(|| format!("{module} is missing; ./scripts/bench builds it"))?;
    let broker = broker_url.map_or(String::new(), |u| format!("[broker]\nurl = {u:?}\n"));
    let manifest_path = dir.join(format!("echo-{mode}.toml"));
    std::fs::write(
        &manifest_path,
        format!(
            "version = 1\n{broker}[[handler]]\nname = \"echo\"\nmodule = {:?}\n\
             subscribe = [\"bench.in\"]\npublish = [\"bench.out\"]\n\
             max_in_flight = {IN_FLIGHT}\ninstances = {mode:?}\n{extra}",
            module.display().to_string()
        ),
    )?;
    Ok(Manifest::load(&manifest_path)?)
}

/// A host serving in the background until `stop`.
pub(super) struct Running {
    pub(super) stop: tokio::sync::oneshot::Sender<()>,
    pub(super) task: tokio::task::JoinHandle<anyhow::Result<()>>,
    pub(super) metrics: Arc<wasmev::metrics::Metrics>,
}

impl Running {
    pub(super) fn serve(host: Host) -> Self {
        let metrics = host.metrics().clone();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(host.serve(async {
            let _ = stopped.await;
        }));
        Self {
            stop,
            task,
            metrics,
        }
    }

    pub(super) async fn shutdown(self) -> anyhow::Result<()> {
        let _ = self.stop.send(());
        self.task.await?
    }
}

/// Throughput runs per figure. Why 5: single runs on a shared 2-core machine swing by
/// ±20 %; the median of five is steady to a few percent, and five runs of the default
/// 200 000 events take seconds.
pub(super) const RUNS: usize = 5;

/// One throughput figure: the median (and best) of the runs of `n` events after a
/// warm-up, and the worker threads' CPU and heap allocations per event over all of them.
#[derive(Clone, Copy)]
pub(super) struct Measured {
    pub(super) median: f64,
    pub(super) best: f64,
    pub(super) runs: usize,
    pub(super) cpu_us: f64,
    pub(super) allocations: f64,
}

/// What the worker threads (the host's, or the baseline's) have used so far: CPU and heap
/// allocations, read together so every figure spans the same stretch.
pub(super) struct WorkersUse {
    cpu: cpu::ThreadsCpu,
    allocations: u64,
}

impl WorkersUse {
    pub(super) fn now() -> Self {
        Self {
            cpu: cpu::workers(),
            allocations: alloc::worker_allocations(),
        }
    }

    /// µs of CPU and heap allocations per event since this reading, over `events` events.
    pub(super) fn per_event(&self, events: f64) -> (f64, f64) {
        let allocated = alloc::worker_allocations() - self.allocations;
        (
            us_per_event(cpu::workers().since(&self.cpu), events),
            allocated as f64 / events,
        )
    }
}

/// At least `runs` runs of `n` events, and more until `min_time` has passed.
pub(super) async fn measure(
    path: &Route,
    n: u64,
    runs: usize,
    min_time: Duration,
) -> anyhow::Result<Measured> {
    throughput(path, n / 10).await?; // warm-up
    let started = Instant::now();
    let used = WorkersUse::now();
    let mut rates = Vec::with_capacity(runs);
    while rates.len() < runs.max(1) || started.elapsed() < min_time {
        rates.push(throughput(path, n).await?);
    }
    let (cpu_us, allocations) = used.per_event(n as f64 * rates.len() as f64);
    Ok(Measured {
        best: rates.iter().copied().fold(f64::NAN, f64::max),
        runs: rates.len(),
        cpu_us,
        allocations,
        median: median(rates),
    })
}

impl Measured {
    /// One figure from several, each of the same number of events: the median (and best)
    /// of their medians, and their mean worker CPU per event.
    pub(super) fn summary(all: &[Measured]) -> Measured {
        Measured {
            median: median(all.iter().map(|m| m.median).collect()),
            best: all.iter().map(|m| m.median).fold(f64::NAN, f64::max),
            runs: all.len(),
            cpu_us: all.iter().map(|m| m.cpu_us).sum::<f64>() / all.len() as f64,
            allocations: all.iter().map(|m| m.allocations).sum::<f64>() / all.len() as f64,
        }
    }
}

/// The row comparing median throughput with the baseline's.
pub(super) fn rate_row(what: &str, m: &Measured, base: &Measured, target: &str) -> Row {
    Row::new(
        what,
        rate(m.median),
        rate(base.median),
        format!("{:.2}", m.median / base.median),
        target,
    )
}

/// The row of a baseline itself: the denominator of the rows below it.
pub(super) fn baseline_row(what: &str, base: &Measured) -> Row {
    Row::new(what, rate(base.median), "—".into(), "1.00".into(), "")
}

/// The rows comparing the worker threads' CPU and heap allocations per event with the
/// baseline's, for `which` on `broker` ("NATS", "JetStream").
pub(super) fn worker_rows(broker: &str, which: &str, m: &Measured, base: &Measured) -> [Row; 2] {
    [
        cpu_row(&format!("{broker}: worker CPU per event, {which}"), m, base),
        Row::new(
            &format!("{broker}: heap allocations per event on the worker threads, {which}"),
            format!("{:.1}", m.allocations),
            format!("{:.1}", base.allocations),
            format!("{:+.1}", m.allocations - base.allocations),
            "",
        ),
    ]
}

/// The row comparing worker CPU per event with the baseline's.
pub(super) fn cpu_row(what: &str, m: &Measured, base: &Measured) -> Row {
    Row::new(
        what,
        format!("{:.2} µs", m.cpu_us),
        format!("{:.2} µs", base.cpu_us),
        format!("{:.1}×", m.cpu_us / base.cpu_us),
        "",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(p50: f64, p99: f64, busy: f64) -> LatencyRun {
        LatencyRun {
            latency: Latency {
                p50,
                p99,
                slow: 0.0,
                max: p99,
            },
            machine: Some(cpu::Busy {
                busy,
                kernel: busy / 2.0,
            }),
        }
    }

    #[test]
    fn a_latency_overhead_is_the_median_of_the_rounds_own_differences() {
        // Round 2 met a stall on both sides; round 3 on wasmev's alone. The sides' medians
        // (600 against 400) would read +200; round by round wasmev is +10, +10 and +200,
        // so the p99 overhead is +10.
        let base = [
            run(100.0, 390.0, 0.6),
            run(100.0, 1000.0, 0.6),
            run(100.0, 400.0, 0.6),
        ];
        let wasmev = [
            run(120.0, 400.0, 0.8),
            run(130.0, 1010.0, 0.8),
            run(110.0, 600.0, 0.7),
        ];
        let row = latency_row("reuse", &wasmev, &base, "p99 overhead ≤ 50 µs");
        assert_eq!(row.ratio, "+20 / +10 µs");
        assert_eq!(
            row.figure,
            "120 / 600 µs; cores 77 % busy, 38 % in the kernel"
        );
        assert_eq!(
            row.baseline,
            "100 / 400 µs; cores 60 % busy, 30 % in the kernel"
        );
        assert_eq!(row.target, "p99 overhead ≤ 50 µs");
    }

    #[test]
    fn runs_without_a_machine_reading_leave_it_out() {
        let bare = LatencyRun {
            machine: None,
            ..run(100.0, 400.0, 0.0)
        };
        let row = latency_row("reuse", &[bare], &[bare], "");
        assert_eq!(row.figure, "100 / 400 µs");
        assert_eq!(row.ratio, "+0 / +0 µs");
    }
}

//! Throughput, latency, start-up and memory, each against a baseline measured in the
//! same run: a plain async-nats subscriber doing the handler's work (republish the
//! payload) without Wasm.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
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

/// Payload size for throughput and latency: a small JSON event.
const PAYLOAD: usize = 128;
/// Events in flight at most during a throughput run: enough to keep every stage busy,
/// few enough that no subscription buffer (64 Ki messages) ever fills and drops.
const WINDOW: u64 = 4096;
/// Concurrency the handler is allowed (max_in_flight).
const IN_FLIGHT: u32 = 64;
/// The rate for latency runs, events per second.
const LATENCY_RATE: u64 = 10_000;

pub const ECHO: &str = "target/wasm32-wasip2/release/bench_echo.wasm";

/// A nats-server of our own on a free loopback port, killed on drop.
pub struct Server {
    child: Child,
    pub url: String,
    _store: tempfile::TempDir,
}

impl Server {
    pub fn start() -> anyhow::Result<Self> {
        let bin = std::env::var("NATS_SERVER_BIN").unwrap_or_else(|_| {
            ["/usr/sbin/nats-server", "/usr/bin/nats-server"]
                .into_iter()
                .find(|p| Path::new(p).exists())
                .unwrap_or("nats-server")
                .to_string()
        });
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let store = tempfile::tempdir()?;
        let child = Command::new(&bin)
            .args(["-a", "127.0.0.1", "-p", &port.to_string(), "-js", "-sd"])
            .arg(store.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| {
                format!("cannot start {bin}; install nats-server or set NATS_SERVER_BIN")
            })?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if Instant::now() > deadline {
                bail!("nats-server did not start on port {port}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(Self {
            child,
            url: format!("nats://127.0.0.1:{port}"),
            _store: store,
        })
    }

    /// The server's version line, for the table.
    pub fn version() -> String {
        let bin =
            std::env::var("NATS_SERVER_BIN").unwrap_or_else(|_| "/usr/sbin/nats-server".into());
        Command::new(bin)
            .arg("--version")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The broker events travel through: where they go in and where answers are counted.
#[derive(Clone)]
enum Route {
    Nats(async_nats::Client),
    Memory(wasmev::broker::memory::MemoryBroker),
}

impl Route {
    async fn publish(&self, subject: &'static str, payload: Bytes) -> anyhow::Result<()> {
        match self {
            Route::Nats(c) => c.publish(subject, payload).await?,
            Route::Memory(b) => {
                b.publish(subject, None, &[], payload).await?;
            }
        }
        Ok(())
    }

    async fn flush(&self) -> anyhow::Result<()> {
        if let Route::Nats(c) = self {
            c.flush().await?;
        }
        Ok(())
    }

    /// Count every message on `bench.out`; with `latency`, record publish→answer times
    /// (the payload starts with the send time in ns since `epoch`).
    async fn collect(
        &self,
        received: Arc<AtomicU64>,
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
            received.fetch_add(1, Ordering::Release);
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
/// publisher (which spins between sends at a fixed rate) and the counter never hold up
/// the host's (or the baseline's) tasks on their worker threads, nor wait behind them.
static DRIVER: std::sync::LazyLock<Option<tokio::runtime::Runtime>> =
    std::sync::LazyLock::new(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("bench-driver")
            .enable_all()
            .build()
            .ok()
    });

/// Run `fut` on the load generator's runtime.
async fn on_driver<T: Send + 'static>(
    fut: impl Future<Output = anyhow::Result<T>> + Send + 'static,
) -> anyhow::Result<T> {
    let Some(driver) = DRIVER.as_ref() else {
        bail!("cannot start the load generator's runtime");
    };
    driver.spawn(fut).await?
}

/// A NATS route whose connection lives on the load generator's runtime.
async fn nats_route(url: &str) -> anyhow::Result<Route> {
    let url = url.to_string();
    on_driver(async move { Ok(Route::Nats(async_nats::connect(url).await?)) }).await
}

/// [`throughput_here`], driven from the load generator's runtime.
async fn throughput(path: &Route, n: u64) -> anyhow::Result<f64> {
    let path = path.clone();
    on_driver(async move { throughput_here(&path, n).await }).await
}

/// [`latency_here`], driven from the load generator's runtime.
async fn latency(path: &Route, secs: u64) -> anyhow::Result<(f64, f64)> {
    let path = path.clone();
    on_driver(async move { latency_here(&path, secs).await }).await
}

/// Latency runs per figure. Why 3: one run's p99 moved by hundreds of µs between
/// identical runs on this VM (the baseline's as much as wasmev's); the median of three
/// is steadier without making the suite long.
const LATENCY_RUNS: usize = 3;

/// The median p50 and the median p99 of [`LATENCY_RUNS`] latency runs of `secs` each.
async fn latency_median(path: &Route, secs: u64) -> anyhow::Result<(f64, f64)> {
    let mut p50s = Vec::with_capacity(LATENCY_RUNS);
    let mut p99s = Vec::with_capacity(LATENCY_RUNS);
    for _ in 0..LATENCY_RUNS {
        let (p50, p99) = latency(path, secs).await?;
        p50s.push(p50);
        p99s.push(p99);
    }
    p50s.sort_by(f64::total_cmp);
    p99s.sort_by(f64::total_cmp);
    Ok((p50s[LATENCY_RUNS / 2], p99s[LATENCY_RUNS / 2]))
}

/// The latency row: both percentiles beside the baseline's, overheads signed.
fn latency_row(what: &str, (p50, p99): (f64, f64), (b50, b99): (f64, f64), target: &str) -> Row {
    Row::new(
        what,
        format!("{p50:.0} / {p99:.0} µs"),
        format!("{b50:.0} / {b99:.0} µs"),
        format!("{:+.0} / {:+.0} µs", p50 - b50, p99 - b99),
        target,
    )
}

/// Events per second through `path`: `n` events of `PAYLOAD` bytes on `bench.in`, at
/// most `WINDOW` unanswered, timed from the first publish to the last answer.
async fn throughput_here(path: &Route, n: u64) -> anyhow::Result<f64> {
    let received = Arc::new(AtomicU64::new(0));
    let collector = path.collect(received.clone(), None).await?;
    let payload = Bytes::from(vec![b'x'; PAYLOAD]);
    let started = Instant::now();
    let mut progress = (0, Instant::now());
    for sent in 0..n {
        // Saturating: a late answer from an earlier run can make `received` pass `sent`.
        while sent.saturating_sub(received.load(Ordering::Acquire)) >= WINDOW {
            let now = received.load(Ordering::Acquire);
            if now != progress.0 {
                progress = (now, Instant::now());
            } else if progress.1.elapsed() > Duration::from_secs(30) {
                bail!("no answers for 30 s with {sent} sent and {now} answered (events lost?)");
            }
            path.flush().await?;
            tokio::task::yield_now().await;
        }
        path.publish("bench.in", payload.clone()).await?;
    }
    path.flush().await?;
    wait_until(
        || received.load(Ordering::Acquire) >= n,
        Duration::from_secs(120),
    )
    .await?;
    let rate = n as f64 / started.elapsed().as_secs_f64();
    collector.abort();
    Ok(rate)
}

/// Publish→answer latency at `LATENCY_RATE` events/s for `secs` seconds: (p50, p99) µs.
async fn latency_here(path: &Route, secs: u64) -> anyhow::Result<(f64, f64)> {
    let epoch = Instant::now();
    let samples = Arc::new(std::sync::Mutex::new(Vec::new()));
    let received = Arc::new(AtomicU64::new(0));
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
    wait_until(
        || received.load(Ordering::Acquire) >= n,
        Duration::from_secs(60),
    )
    .await?;
    collector.abort();
    let mut s = std::mem::take(&mut *samples.lock().unwrap_or_else(|e| e.into_inner()));
    s.sort_unstable();
    // (The throughput run before each latency run has warmed caches and connections.)
    let at = |q: f64| s[((s.len() - 1) as f64 * q).round() as usize] as f64 / 1e3;
    Ok((at(0.5), at(0.99)))
}

async fn wait_until(done: impl Fn() -> bool, limit: Duration) -> anyhow::Result<()> {
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
struct Baseline {
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

impl Baseline {
    /// Unsubscribe (flushed, so the server has it before anything else subscribes:
    /// otherwise the next subscriber and this one would both answer for a moment).
    async fn stop(self) {
        let _ = self.stop.send(());
        let _ = self.task.await;
    }
}

/// The baseline: a plain async-nats subscriber on `bench.in` republishing on `bench.out`.
async fn nats_baseline(url: &str) -> anyhow::Result<Baseline> {
    let client = async_nats::connect(url).await?;
    let mut sub = client.subscribe("bench.in").await?;
    client.flush().await?;
    let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = &mut stopped => break,
                m = sub.next() => match m {
                    Some(m) => {
                        if client.publish("bench.out", m.payload).await.is_err() {
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

/// The same on the embedded broker.
fn memory_baseline(broker: &wasmev::broker::memory::MemoryBroker) -> anyhow::Result<Baseline> {
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

/// A host running the echo handler in `mode` (`per-event` or `reuse`), on `broker_url`
/// (None: embedded), with extra handler TOML.
async fn echo_host(
    dir: &Path,
    mode: &str,
    broker_url: Option<&str>,
    extra: &str,
) -> anyhow::Result<(Running, Broker)> {
    let module = std::fs::canonicalize(ECHO)
        .with_context(|| format!("{ECHO} is missing; ./scripts/bench builds it"))?;
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
    let manifest = Manifest::load(&manifest_path)?;
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

/// A host serving in the background until `stop`.
struct Running {
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
    metrics: Arc<wasmev::metrics::Metrics>,
}

impl Running {
    fn serve(host: Host) -> Self {
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

    async fn shutdown(self) -> anyhow::Result<()> {
        let _ = self.stop.send(());
        self.task.await?
    }
}

struct Row {
    what: String,
    figure: String,
    baseline: String,
    ratio: String,
    target: String,
}

impl Row {
    fn new(what: &str, figure: String, baseline: String, ratio: String, target: &str) -> Self {
        Self {
            what: what.into(),
            figure,
            baseline,
            ratio,
            target: target.into(),
        }
    }
}

fn rate(r: f64) -> String {
    format!("{:.0} ev/s", r)
}

/// Throughput runs per figure. Why 5: single runs on a shared 2-core machine swing by
/// ±20 %; the median of five is steady to a few percent, and five runs of the default
/// 200 000 events take seconds.
const RUNS: usize = 5;

/// One throughput figure: the median (and best) of the runs of `n` events after a
/// warm-up, and the worker threads' CPU per event over all of them.
struct Measured {
    median: f64,
    best: f64,
    runs: usize,
    cpu_us: f64,
}

/// At least `runs` runs of `n` events, and more until `min_time` has passed.
async fn measure(
    path: &Route,
    n: u64,
    runs: usize,
    min_time: Duration,
) -> anyhow::Result<Measured> {
    throughput(path, n / 10).await?; // warm-up
    let started = Instant::now();
    let before = worker_cpu();
    let mut rates = Vec::with_capacity(runs);
    while rates.len() < runs.max(1) || started.elapsed() < min_time {
        rates.push(throughput(path, n).await?);
    }
    let cpu = worker_cpu().saturating_sub(before);
    rates.sort_by(f64::total_cmp);
    Ok(Measured {
        median: rates[rates.len() / 2],
        best: rates[rates.len() - 1],
        runs: rates.len(),
        cpu_us: cpu.as_secs_f64() * 1e6 / (n as f64 * rates.len() as f64),
    })
}

/// The row comparing worker CPU per event with the baseline's.
fn cpu_row(what: &str, m: &Measured, base: &Measured) -> Row {
    Row::new(
        what,
        format!("{:.2} µs", m.cpu_us),
        format!("{:.2} µs", base.cpu_us),
        format!("{:.1}×", m.cpu_us / base.cpu_us),
        "",
    )
}

/// Throughput and latency on NATS and the embedded broker, and JetStream.
pub async fn events(events: u64, latency_secs: u64) -> anyhow::Result<String> {
    let dir = tempfile::tempdir()?;
    let server = Server::start()?;
    let client = async_nats::connect(&server.url).await?;
    let nats = nats_route(&server.url).await?;
    let mut rows = Vec::new();

    // Baseline first, then each mode, each on its own subscription.
    let base = nats_baseline(&server.url).await?;
    let raw = measure(&nats, events, RUNS, Duration::ZERO).await?;
    let raw_latency = latency_median(&nats, latency_secs).await?;
    base.stop().await;
    rows.push(Row::new(
        "NATS: plain async-nats subscriber (baseline)",
        rate(raw.median),
        "—".into(),
        "1.00".into(),
        "",
    ));

    let mut core_per_event = 0.0;
    for (mode, target, lat_target) in [("per-event", "≥ 0.30", 250.0), ("reuse", "≥ 0.90", 50.0)]
    {
        let (host, _) = echo_host(dir.path(), mode, Some(&server.url), "").await?;
        let m = measure(&nats, events, RUNS, Duration::ZERO).await?;
        if mode == "per-event" {
            core_per_event = m.median;
        }
        rows.push(Row::new(
            &format!("NATS: wasmev, instances = {mode}"),
            rate(m.median),
            rate(raw.median),
            format!("{:.2}", m.median / raw.median),
            target,
        ));
        rows.push(cpu_row(
            &format!("NATS: worker CPU per event, {mode}"),
            &m,
            &raw,
        ));
        rows.push(latency_row(
            &format!("NATS: p50 / p99 latency at {LATENCY_RATE} ev/s, {mode}"),
            latency_median(&nats, latency_secs).await?,
            raw_latency,
            &format!("p99 overhead ≤ {lat_target:.0} µs"),
        ));
        host.shutdown().await?;
    }

    // The embedded broker: its own baseline (a plain task republishing), then each mode.
    let memory = wasmev::broker::memory::MemoryBroker::new();
    let mem_path = Route::Memory(memory.clone());
    let base = memory_baseline(&memory)?;
    let mem_raw = measure(&mem_path, events, RUNS, Duration::ZERO).await?;
    let mem_latency = latency_median(&mem_path, latency_secs).await?;
    base.stop().await;
    rows.push(Row::new(
        "embedded: plain task republishing (baseline)",
        rate(mem_raw.median),
        "—".into(),
        "1.00".into(),
        "",
    ));
    for mode in ["per-event", "reuse"] {
        let (host, broker) = echo_host(dir.path(), mode, None, "").await?;
        let Broker::Memory(memory) = broker else {
            bail!("expected the embedded broker");
        };
        let path = Route::Memory(memory);
        let m = measure(&path, events, RUNS, Duration::ZERO).await?;
        let lat = latency_median(&path, latency_secs).await?;
        rows.push(Row::new(
            &format!("embedded: wasmev, {mode}"),
            rate(m.median),
            rate(mem_raw.median),
            format!("{:.2}", m.median / mem_raw.median),
            "",
        ));
        rows.push(cpu_row(
            &format!("embedded: worker CPU per event, {mode}"),
            &m,
            &mem_raw,
        ));
        rows.push(latency_row(
            &format!("embedded: p50 / p99 latency at {LATENCY_RATE} ev/s, {mode}"),
            lat,
            mem_latency,
            "",
        ));
        host.shutdown().await?;
    }

    let js_rate = jetstream(&client, dir.path(), &server.url, events / 2).await?;
    rows.push(Row::new(
        "JetStream: consume + ack, per-event (stored events)",
        rate(js_rate),
        format!("{} (core, per-event)", rate(core_per_event)),
        format!("{:.2}", js_rate / core_per_event),
        "",
    ));

    Ok(table(
        &format!(
            "## Events: throughput and latency\n\nThe echo handler (`bench/echo`: republish \
             the {PAYLOAD}-byte payload) against a baseline doing the same work without \
             Wasm, in the same run. Throughput: the median of {RUNS} runs of {events} \
             events each, at most {WINDOW} unanswered, max_in_flight = {IN_FLIGHT}, \
             publish→answer. Worker CPU per event: CPU time of the tokio worker threads \
             (the host, or the baseline subscriber; not the load generator, not \
             nats-server) over those runs, divided by the events. Latency: \
             {LATENCY_RATE} events/s for {latency_secs} s, publish→answer; the median p50 \
             and the median p99 of {LATENCY_RUNS} such runs. {}.\n",
            Server::version()
        ),
        &rows,
    ))
}

/// One throughput case on its own, repeated for `secs` seconds (for a profiler to attach
/// to): `mode` is `baseline`, `per-event` or `reuse`; `embedded` picks the embedded broker.
pub async fn one(
    mode: &str,
    embedded: bool,
    events: u64,
    secs: u64,
    latency_secs: Option<u64>,
) -> anyhow::Result<String> {
    let dir = tempfile::tempdir()?;
    let server = if embedded {
        None
    } else {
        Some(Server::start()?)
    };
    let url = server.as_ref().map(|s| s.url.clone());
    let memory = wasmev::broker::memory::MemoryBroker::new();
    let (route, running, base) = match (mode, &url) {
        ("baseline", Some(url)) => (
            nats_route(url).await?,
            None,
            Some(nats_baseline(url).await?),
        ),
        ("baseline", None) => (
            Route::Memory(memory.clone()),
            None,
            Some(memory_baseline(&memory)?),
        ),
        ("per-event" | "reuse", _) => {
            let (host, broker) = echo_host(dir.path(), mode, url.as_deref(), "").await?;
            let route = match (broker, &url) {
                (Broker::Memory(m), None) => Route::Memory(m),
                (_, Some(url)) => nats_route(url).await?,
                _ => bail!("unexpected broker"),
            };
            (route, Some(host), None)
        }
        ("jetstream", Some(url)) => {
            let client = async_nats::connect(url).await?;
            let rate = jetstream(&client, dir.path(), url, events).await?;
            return Ok(format!(
                "jetstream consume+ack: {} ({events} events)",
                self::rate(rate)
            ));
        }
        _ => bail!("mode is baseline, per-event, reuse or jetstream (NATS only), not {mode:?}"),
    };
    let broker = if embedded {
        "the embedded broker"
    } else {
        "NATS"
    };
    let result = match latency_secs {
        Some(latency_secs) => {
            throughput(&route, events / 10).await?; // warm-up
            let before = worker_cpu();
            let (p50, p99) = latency(&route, latency_secs).await?;
            let cpu = worker_cpu().saturating_sub(before).as_secs_f64() * 1e6
                / (LATENCY_RATE * latency_secs) as f64;
            format!(
                "{mode} on {broker}: p50 {p50:.0} µs, p99 {p99:.0} µs at {LATENCY_RATE} ev/s; \
                 {cpu:.2} µs worker CPU per event"
            )
        }
        None => {
            // Compare changes by the median and the CPU per event, not by the best run:
            // single runs swing by ±20 % on a shared machine.
            let m = measure(&route, events, 1, Duration::from_secs(secs)).await?;
            format!(
                "{mode} on {broker}: {} runs of {events} events, median {}, best {}; \
                 {:.2} µs worker CPU per event",
                m.runs,
                rate(m.median),
                rate(m.best),
                m.cpu_us,
            )
        }
    };
    if let Some(host) = running {
        host.shutdown().await?;
    }
    if let Some(base) = base {
        base.stop().await;
    }
    Ok(result)
}

/// JetStream consume+ack: `n` events stored on a new stream first, then consumed by the
/// echo handler (per-event) until all are acked; events per second.
async fn jetstream(
    client: &async_nats::Client,
    dir: &Path,
    url: &str,
    n: u64,
) -> anyhow::Result<f64> {
    let js = async_nats::jetstream::new(client.clone());
    let _ = js.delete_stream("BENCH").await;
    js.create_stream(async_nats::jetstream::stream::Config {
        name: "BENCH".into(),
        subjects: vec!["bench.in".into()],
        ..Default::default()
    })
    .await?;
    let payload = Bytes::from(vec![b'x'; PAYLOAD]);
    let mut acks = futures::stream::FuturesUnordered::new();
    for _ in 0..n {
        acks.push(std::future::IntoFuture::into_future(
            js.publish("bench.in", payload.clone()).await?,
        ));
        if acks.len() >= 1024 {
            while let Some(a) = acks.next().await {
                a?;
            }
        }
    }
    while let Some(a) = acks.next().await {
        a?;
    }
    let (host, _) = echo_host(
        dir,
        "per-event",
        Some(url),
        "[handler.jetstream]\nstream = \"BENCH\"\nmax_ack_pending = 4096\n",
    )
    .await?;
    let started = Instant::now();
    let metrics = host.metrics.clone();
    wait_until(
        || {
            metric(
                &metrics.encode(),
                "wasmev_events_ok_total{handler=\"echo\"}",
            ) >= n
        },
        Duration::from_secs(300),
    )
    .await?;
    let rate = n as f64 / started.elapsed().as_secs_f64();
    host.shutdown().await?;
    Ok(rate)
}

fn table(intro: &str, rows: &[Row]) -> String {
    let mut out = format!(
        "{intro}\n| measure | wasmev | baseline | ratio / overhead | target |\n|---|---|---|---|---|\n"
    );
    for r in rows {
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} |\n",
            r.what, r.figure, r.baseline, r.ratio, r.target
        ));
    }
    out
}

/// The value of the series `name{labels}` in a Prometheus text exposition.
fn metric(text: &str, series: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map_or(0, |v| v as u64)
}

/// Host start-up to ready with the shipped manifest's handlers: cold (empty artifact
/// cache) and warm, in-process, embedded broker, no admin endpoint.
pub async fn startup(manifest: &Path, rounds: usize) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(manifest)
        .with_context(|| format!("cannot read {}", manifest.display()))?;
    // Without the [admin] section: the port may be taken, and it is not what we measure.
    let without_admin: String = {
        let mut out = String::new();
        let mut skipping = false;
        for line in text.lines() {
            if line.starts_with('[') {
                skipping = line.trim() == "[admin]";
            }
            if !skipping {
                out.push_str(line);
                out.push('\n');
            }
        }
        out
    };
    let dir = manifest.parent().unwrap_or(Path::new("."));
    let bench_manifest = dir.join(".bench-startup.toml");
    std::fs::write(&bench_manifest, without_admin)?;
    let result =
        async {
            let m = Manifest::load(&bench_manifest)?;
            let mut rows = Vec::new();
            let mut cold = Vec::new();
            let mut warm = Vec::new();
            for _ in 0..rounds {
                let cache = tempfile::tempdir()?;
                for samples in [&mut cold, &mut warm] {
                    let options = Options {
                        watch: false,
                        cache: Some(ArtifactCache::open(cache.path())?),
                        ..Options::default()
                    };
                    let since = Instant::now();
                    let host = Host::start(&m, options).await?;
                    samples.push(since.elapsed());
                    Running::serve(host).shutdown().await?;
                }
            }
            let median = |s: &mut Vec<Duration>| {
                s.sort();
                s[s.len() / 2]
            };
            let (c, w) = (median(&mut cold), median(&mut warm));
            let sizes: u64 = m
                .handlers
                .iter()
                .filter_map(|h| std::fs::metadata(&h.module).ok())
                .map(|md| md.len())
                .sum();
            rows.push(Row::new(
            &format!(
                "start to ready, {} example handlers ({:.1} MB of components), artifact cache warm",
                m.handlers.len(),
                sizes as f64 / 1e6
            ),
            format!("{:.0} ms", w.as_secs_f64() * 1e3),
            format!("{:.0} ms (cold: empty cache, compiles)", c.as_secs_f64() * 1e3),
            format!("{:.0}× faster", c.as_secs_f64() / w.as_secs_f64()),
            "cache ≥ 10× faster",
        ));
            Ok::<_, anyhow::Error>(rows)
        }
        .await;
    let _ = std::fs::remove_file(&bench_manifest);
    let rows = result?;
    Ok(table(
        &format!(
            "## Start-up\n\n`Host::start` on {} (embedded broker) until every subscription \
             is confirmed; median of {rounds} rounds, each with a fresh cache dir (cold) and \
             then the same dir again (warm).\n",
            manifest.display()
        ),
        &rows,
    ))
}

/// Resident memory of an idle `wasmev run` with 1, 10 and 100 copies of a small handler.
pub async fn memory(binary: &Path, module: &Path) -> anyhow::Result<String> {
    let module = std::fs::canonicalize(module)
        .with_context(|| format!("{} is missing; ./scripts/bench builds it", module.display()))?;
    let dir = tempfile::tempdir()?;
    let cache = dir.path().join("cache");
    let mut rss = Vec::new();
    for n in [1usize, 10, 100] {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let mut toml = format!("version = 1\n[admin]\nlisten = \"127.0.0.1:{port}\"\n");
        for i in 0..n {
            toml.push_str(&format!(
                "[[handler]]\nname = \"h{i}\"\nmodule = {:?}\nsubscribe = [\"bench.{i}\"]\n\
                 publish = [\"bench.out\"]\nmax_in_flight = 4\n",
                module.display().to_string()
            ));
        }
        let path = dir.path().join(format!("idle-{n}.toml"));
        std::fs::write(&path, toml)?;
        // Fill the artifact cache first, so no run's RSS includes the compiler's.
        let checked = Command::new(binary)
            .arg("check")
            .arg(&path)
            .env("WASMEV_CACHE_DIR", &cache)
            .output()
            .with_context(|| format!("cannot run {}", binary.display()))?;
        if !checked.status.success() {
            bail!(
                "wasmev check failed: {}",
                String::from_utf8_lossy(&checked.stderr)
            );
        }
        let mut child = Command::new(binary)
            .args(["run", "--no-watch"])
            .arg(&path)
            .env("WASMEV_CACHE_DIR", &cache)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("cannot start {}", binary.display()))?;
        let ready = wait_ready(port).await;
        // Idle: let start-up allocations settle.
        tokio::time::sleep(Duration::from_secs(1)).await;
        let kib = vm_rss(child.id());
        let _ = child.kill();
        let _ = child.wait();
        ready?;
        rss.push((n, kib?));
    }
    let mib = |kib: u64| kib as f64 / 1024.0;
    let (_, one) = rss[0];
    let (_, hundred) = rss[2];
    let per = (hundred.saturating_sub(one)) as f64 / 99.0 / 1024.0;
    let mut rows: Vec<Row> = rss
        .iter()
        .map(|(n, kib)| {
            Row::new(
                &format!("idle RSS, {n} handler(s)"),
                format!("{:.1} MiB", mib(*kib)),
                "—".into(),
                "—".into(),
                "",
            )
        })
        .collect();
    rows.push(Row::new(
        "per additional handler ((RSS₁₀₀ − RSS₁) / 99)",
        format!("{per:.2} MiB"),
        "—".into(),
        "—".into(),
        "≤ 1 MiB",
    ));
    Ok(table(
        &format!(
            "## Memory\n\nVmRSS of `wasmev run` (release, embedded broker, artifact cache \
             warm) one second after ready, with N copies of `{}` ({:.0} KB).\n",
            module
                .file_name()
                .map_or_else(String::new, |n| n.to_string_lossy().into_owned()),
            std::fs::metadata(&module)?.len() as f64 / 1e3
        ),
        &rows,
    ))
}

async fn wait_ready(port: u16) -> anyhow::Result<()> {
    let url = format!("http://127.0.0.1:{port}/healthz");
    let client = reqwest::Client::new();
    let since = Instant::now();
    loop {
        if let Ok(r) = client.get(&url).send().await
            && r.status().is_success()
        {
            return Ok(());
        }
        if since.elapsed() > Duration::from_secs(120) {
            bail!("wasmev run never became ready on port {port}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn vm_rss(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmRSS in /proc/<pid>/status")
}

/// The release `wasmev` binary next to this one.
pub fn wasmev_binary() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(|d| d.join("wasmev")))
        .unwrap_or_else(|| PathBuf::from("target/release/wasmev"))
}

/// CPU time used so far by this process's tokio worker threads: the host (or the
/// baseline subscriber), not the load generator, which runs on its own named thread.
/// Zero where /proc is not available.
fn worker_cpu() -> Duration {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return Duration::ZERO;
    };
    let mut total = Duration::ZERO;
    for task in tasks.flatten() {
        let path = task.path();
        let is_worker = std::fs::read_to_string(path.join("comm"))
            .is_ok_and(|name| name.trim() == "tokio-rt-worker");
        // schedstat: nanoseconds on CPU, then waiting, then timeslices.
        let on_cpu = std::fs::read_to_string(path.join("schedstat"))
            .ok()
            .and_then(|s| s.split_whitespace().next()?.parse::<u64>().ok());
        if let (true, Some(ns)) = (is_worker, on_cpu) {
            total += Duration::from_nanos(ns);
        }
    }
    total
}

//! The soak: a `wasmev run` process on a real nats-server takes a steady stream of events
//! for a while, most of them echoes and the rest misbehaving (a panic, a memory blow-up, a
//! reject, a publish storm past the quota, a print flood, a spin to the deadline), over
//! three handlers (core fresh, core warm, JetStream), while their modules are replaced and
//! a config edited, again and again. At the end it checks that every echo was answered
//! exactly once, that the host counted every event under the reason it was sent for, that
//! every reject on JetStream was dead-lettered once, that every swap went live, that the
//! host holds one memory image per live version, and that the process did not grow:
//! resident memory, open files and threads against their level after a warm-up. A second,
//! short test checks that swapped-out versions go while their subjects are quiet.
//!
//! In the default test run it soaks for [`SHORT`]: the accounting and the swaps under a
//! mixed load, and no gross leak. `WASMEV_SOAK=30m` (or `./scripts/soak 30m`) soaks for
//! longer and prints progress every 10 s; there a leak of a few hundred bytes an event, or
//! of one module's code a swap, outgrows [`RSS_SLACK`].

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::HeaderMap;
use common::*;
use futures::StreamExt;
use serde_json::json;
use wasmev::limits::GUEST_OUTPUT_CAP;
use wasmev::metrics::FailReason;

/// How long the soak runs in the default test run.
const SHORT: Duration = Duration::from_secs(20);
/// Events published a second, half to each handler: a moderate load, far below what the
/// host carries, so that nothing is shed and every event can be accounted for.
const RATE: u64 = 500;
/// The handlers' deadline: what a spinning event costs a worker.
const DEADLINE_MS: u64 = 150;
/// A module replaced or a config edited this often.
const SWAP_EVERY: Duration = Duration::from_secs(3);
/// No swap starts this close to the end of the load (see its use).
const SWAP_QUIET: Duration = Duration::from_secs(2);
/// Publishes a storm event asks for, against `max_publishes = 20`.
const STORM: u32 = 30;
const MAX_PUBLISHES: u64 = 20;
/// What a print event writes to stdout: past the [`GUEST_OUTPUT_CAP`] the host keeps of
/// an event's output, so the rest is dropped and counted.
const PRINT_BYTES: usize = 100_000;
/// How much resident memory may grow, from the median of the readings just after the
/// warm-up to the median of the last ones (medians: a swap's compile and the allocator's
/// caches come and go). The instance pool may keep up to 100 unused slots warm
/// (wasmtime's `max_unused_warm_slots`), each with up to 1 MiB resident (`keep_resident`):
/// filling them is the pool's design, not a leak, so the slack is that much and a little.
const RSS_SLACK: u64 = 112 << 20;
/// How many more open files and threads the host may have at the end than after the
/// warm-up, by the same medians. Files: none; a connection to the admin endpoint comes and
/// goes, and nothing else is opened for long after start (a swapped-out version's memory
/// image was, once: see `engine.rs`). Threads: tokio's blocking pool keeps a thread that
/// compiled a module for 10 s after.
const FD_SLACK: usize = 0;
const THREAD_SLACK: u64 = 4;

/// The handlers, one of each delivery: core with a fresh instance per event, core with
/// warm instances, and JetStream (at-least-once, per-event).
const HANDLERS: [&str; 3] = ["fresh", "warm", "durable"];
const DURABLE: &str = "durable";

/// The handler event `i` goes to, and what it asks of it.
fn event(i: u64) -> (&'static str, Kind) {
    let handler = HANDLERS[(i % 3) as usize];
    (handler, Kind::of(handler, i / 3))
}

/// What an event asks the chaos handler to do, chosen by its index among its handler's
/// events. Failing kinds are at least 10 events apart on a handler, so the first three
/// events after a swap never all fail (that would roll the swap back). The JetStream
/// handler gets echoes and rejects only: a trap or a deadline there is redelivered after
/// a backoff of seconds, which a soak's accounting would have to wait out.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    Echo,
    Panic,
    Alloc,
    Reject,
    Storm,
    Print,
    Spin,
}

impl Kind {
    fn of(handler: &str, k: u64) -> Self {
        if handler == DURABLE {
            return if k % 50 == 27 {
                Kind::Reject
            } else {
                Kind::Echo
            };
        }
        match (k % 1000, k % 50) {
            (47, _) => Kind::Spin,
            (57, _) => Kind::Print,
            (_, 7) => Kind::Panic,
            (_, 17) => Kind::Alloc,
            (_, 27) => Kind::Reject,
            (_, 37) => Kind::Storm,
            _ => Kind::Echo,
        }
    }

    fn op(self) -> serde_json::Value {
        match self {
            Kind::Echo => json!({"op": "echo"}),
            Kind::Panic => json!({"op": "panic"}),
            Kind::Alloc => json!({"op": "alloc", "bytes": 64 << 20}),
            Kind::Reject => json!({"op": "reject", "reason": "soak"}),
            Kind::Storm => json!({"op": "publish", "subject": "chaos.storm", "count": STORM}),
            Kind::Print => json!({"op": "print", "bytes": PRINT_BYTES}),
            Kind::Spin => json!({"op": "spin"}),
        }
    }

    /// The reason the host counts this kind's failure under, if it fails.
    fn failure(self) -> Option<&'static str> {
        match self {
            Kind::Panic => Some("trap"),
            Kind::Alloc => Some("memory"),
            Kind::Reject => Some("reject"),
            Kind::Spin => Some("deadline"),
            Kind::Echo | Kind::Storm | Kind::Print => None,
        }
    }
}

fn soak_duration() -> Duration {
    match std::env::var("WASMEV_SOAK") {
        Ok(text) => humantime::parse_duration(&text)
            .unwrap_or_else(|e| panic!("WASMEV_SOAK={text:?} is not a duration like 30m: {e}")),
        Err(_) => SHORT,
    }
}

fn manifest(server: &NatsServer, port: u16, round: u64) -> String {
    let limits = format!(
        "publish = [\"chaos.>\"]\ndeadline = \"{DEADLINE_MS}ms\"\nmemory = \"16MiB\"\n\
         max_publishes = {MAX_PUBLISHES}\nmax_in_flight = 16\n"
    );
    format!(
        "{head}[admin]\nlisten = \"127.0.0.1:{port}\"\n\n\
         [[handler]]\nname = \"fresh\"\nmodule = \"fresh.wasm\"\nsubscribe = [\"soak.fresh\"]\n\
         {limits}config = {{ round = \"{round}\" }}\n\n\
         [[handler]]\nname = \"warm\"\nmodule = \"warm.wasm\"\nsubscribe = [\"soak.warm\"]\n\
         {limits}instances = \"reuse\"\nrecycle_after = 100\n\n\
         [[handler]]\nname = \"{DURABLE}\"\nmodule = \"{DURABLE}.wasm\"\n\
         subscribe = [\"soak.{DURABLE}\"]\n{limits}\
         [handler.jetstream]\nstream = \"SOAK\"\nstream_subjects = [\"soak.{DURABLE}\"]\n\
         dead_letter = \"soak.dead\"\n",
        head = server.manifest_head(),
    )
}

/// Write then rename, as a compiler or an editor does.
fn replace(path: &Path, bytes: &[u8]) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// One reading of the host process.
#[derive(Clone, Copy, Debug)]
struct Sample {
    at: Duration,
    rss: u64,
    fds: usize,
    threads: u64,
}

impl Sample {
    fn of(pid: u32, at: Duration) -> Self {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let field = |name: &str| -> u64 {
            let line = status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .unwrap_or_else(|| panic!("no {name} in /proc/{pid}/status"));
            line.trim().trim_end_matches("kB").trim().parse().unwrap()
        };
        Self {
            at,
            rss: field("VmRSS:") * 1024,
            fds: std::fs::read_dir(format!("/proc/{pid}/fd"))
                .unwrap()
                .count(),
            threads: field("Threads:"),
        }
    }
}

/// The median of each measure over the samples taken from `from` until `to`.
fn median(samples: &[Sample], from: Duration, to: Duration) -> Sample {
    let within: Vec<&Sample> = samples
        .iter()
        .filter(|s| s.at >= from && s.at < to)
        .collect();
    assert!(!within.is_empty(), "no readings from {from:?} to {to:?}");
    fn mid<T: Ord + Copy>(mut v: Vec<T>) -> T {
        v.sort_unstable();
        v[v.len() / 2]
    }
    Sample {
        at: from,
        rss: mid(within.iter().map(|s| s.rss).collect()),
        fds: mid(within.iter().map(|s| s.fds).collect()),
        threads: mid(within.iter().map(|s| s.threads).collect()),
    }
}

fn ms(d: Option<&Duration>) -> f64 {
    d.map_or(0.0, |d| d.as_secs_f64() * 1000.0)
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1 << 20) as f64
}

/// The `wasmev run` process under soak, its log in a file (a long soak logs too much to
/// keep in memory).
struct Host {
    child: KillOnDrop,
    dir: PathBuf,
    log: PathBuf,
    port: u16,
}

impl Host {
    /// A host on `server` running the three handlers, from a new directory (returned: it
    /// goes when dropped).
    fn start(server: &NatsServer) -> (tempfile::TempDir, Self) {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        std::fs::copy(component("chaos"), dir.path().join("fresh.wasm")).unwrap();
        std::fs::write(dir.path().join("warm.wasm"), variant("warm-0")).unwrap();
        std::fs::write(dir.path().join("durable.wasm"), variant("durable-0")).unwrap();
        std::fs::write(dir.path().join("runtime.toml"), manifest(server, port, 0)).unwrap();
        let host = Self::spawn(dir.path(), port);
        (dir, host)
    }

    fn spawn(dir: &Path, port: u16) -> Self {
        let log = dir.join("host.log");
        let file = std::fs::File::create(&log).unwrap();
        // Guarded at once: a host that never gets healthy is killed with the panic.
        let child = KillOnDrop(
            wasmev_command()
                .args(["run", "runtime.toml"])
                .current_dir(dir)
                .env("WASMEV_CACHE_DIR", dir.join("cache"))
                .env("RUST_LOG", "warn")
                .env("NO_COLOR", "1")
                .stdout(file.try_clone().unwrap())
                .stderr(file)
                .stdin(Stdio::null())
                .spawn()
                .unwrap(),
        );
        wait_healthy(port, Duration::from_secs(60));
        Self {
            child,
            dir: dir.to_path_buf(),
            log,
            port,
        }
    }

    /// Edit fresh's config to `round` and wait until the manifest reload swapped it in
    /// (its `round`th swap).
    async fn edit_config(&self, server: &NatsServer, round: u64) {
        replace(
            &self.dir.join("runtime.toml"),
            manifest(server, self.port, round).as_bytes(),
        );
        wait_for("fresh's new config live", Duration::from_secs(30), || {
            let n = swaps(&self.metrics(), "fresh", "swapped");
            async move { (n == round).then_some(()) }
        })
        .await;
    }

    /// Replace `handler`'s module with a new version (the same code, another digest,
    /// from `tag`) and wait until it is live.
    async fn replace_module(&self, handler: &str, tag: &str) {
        let bytes = variant(tag);
        let live = format!(
            "wasmev_handler_version{{handler=\"{handler}\",digest=\"{}\"}} 1",
            sha256(&bytes)
        );
        replace(&self.dir.join(format!("{handler}.wasm")), &bytes);
        wait_for(
            &format!("{handler}'s new version live"),
            Duration::from_secs(30),
            || {
                let live = self.metrics().contains(&live);
                async move { live.then_some(()) }
            },
        )
        .await;
    }

    fn metrics(&self) -> String {
        http_get(self.port, "/metrics").expect("the admin endpoint answers")
    }

    /// The last lines of the host's log, for a failure message.
    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }
}

/// A host with the three handlers on a nats-server of its own, and a client subscribed
/// to the echoes before any event is sent.
struct Rig {
    server: NatsServer,
    _dir: tempfile::TempDir,
    host: Host,
    pid: u32,
    client: async_nats::Client,
    echoes: async_nats::Subscriber,
}

impl Rig {
    async fn start() -> Self {
        let server = NatsServer::start();
        let (_dir, host) = Host::start(&server);
        let pid = host.child.id();
        let client = server.client().await;
        let echoes = client.subscribe("chaos.echo").await.unwrap();
        client.flush().await.unwrap();
        Self {
            server,
            _dir,
            host,
            pid,
            client,
            echoes,
        }
    }
}

/// What the publisher sent, by handler and kind.
type Sent = BTreeMap<(&'static str, Kind), u64>;

/// Publish [`RATE`] events a second until `stop`: event `i` is [`event`]`(i)`, with event
/// id `s-{i}`. Returns what it sent, and how many.
async fn publish_load(client: async_nats::Client, stop: Arc<AtomicBool>) -> (Sent, u64) {
    const TICK: Duration = Duration::from_millis(10);
    let per_tick = RATE * TICK.as_millis() as u64 / 1000;
    let mut sent = Sent::new();
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut i = 0u64;
    while !stop.load(Ordering::Relaxed) {
        tick.tick().await;
        for _ in 0..per_tick {
            let (handler, kind) = event(i);
            let mut headers = HeaderMap::new();
            headers.insert("Wasmev-Event-Id", format!("s-{i}").as_str());
            client
                .publish_with_headers(
                    format!("soak.{handler}"),
                    headers,
                    kind.op().to_string().into(),
                )
                .await
                .unwrap();
            *sent.entry((handler, kind)).or_default() += 1;
            i += 1;
        }
    }
    client.flush().await.unwrap();
    (sent, i)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_mixed_load_with_swaps_loses_nothing_and_does_not_grow() {
    let duration = soak_duration();
    let warm_up = (duration / 5).max(Duration::from_secs(5));
    let progress_every = Duration::from_secs(10);

    let Rig {
        server,
        _dir,
        host,
        pid,
        client,
        mut echoes,
    } = Rig::start().await;

    // Every echo answer, counted by event index.
    let answers: Arc<Mutex<Vec<u8>>> = Arc::default();
    let answered = Arc::new(AtomicU64::new(0));
    let collector = tokio::spawn({
        let (answers, answered) = (answers.clone(), answered.clone());
        async move {
            while let Some(m) = echoes.next().await {
                let id = std::str::from_utf8(&m.payload).unwrap();
                let i: usize = id.strip_prefix("s-").unwrap().parse().unwrap();
                let mut counts = answers.lock().unwrap();
                if counts.len() <= i {
                    counts.resize(i + 1, 0);
                }
                counts[i] = counts[i].saturating_add(1);
                answered.fetch_add(1, Ordering::Relaxed);
            }
        }
    });

    // Dead letters: the JetStream handler's rejects.
    let mut dead = client.subscribe("soak.dead").await.unwrap();
    client.flush().await.unwrap();
    let dead_letters = Arc::new(AtomicU64::new(0));
    let dead_collector = tokio::spawn({
        let dead_letters = dead_letters.clone();
        async move {
            while dead.next().await.is_some() {
                dead_letters.fetch_add(1, Ordering::Relaxed);
            }
        }
    });
    let js = async_nats::jetstream::new(client.clone());

    let stop = Arc::new(AtomicBool::new(false));
    let load = tokio::spawn(publish_load(client.clone(), stop.clone()));

    let start = Instant::now();
    let mut samples = vec![Sample::of(pid, Duration::ZERO)];
    let mut module_swaps: BTreeMap<&str, u64> = BTreeMap::new();
    let mut config_swaps = 0u64;
    let mut swap_latencies: Vec<Duration> = Vec::new();
    let (mut next_swap, mut next_progress) = (SWAP_EVERY, progress_every);
    while start.elapsed() < duration {
        tokio::time::sleep(Duration::from_secs(1)).await;
        samples.push(Sample::of(pid, start.elapsed()));
        // No swap in the last seconds: each new version then takes events before the
        // load stops, so every live version has instantiated when the memory images are
        // counted at the end (one each), however late wasmtime makes a module's image.
        if start.elapsed() >= next_swap && start.elapsed() + SWAP_QUIET < duration {
            next_swap += SWAP_EVERY;
            let began = Instant::now();
            let turn = (module_swaps.values().sum::<u64>() + config_swaps) % 3;
            if turn == 1 {
                config_swaps += 1;
                host.edit_config(&server, config_swaps).await;
            } else {
                let handler = if turn == 0 { "warm" } else { DURABLE };
                let n = module_swaps.entry(handler).or_default();
                *n += 1;
                host.replace_module(handler, &format!("{handler}-{n}"))
                    .await;
            }
            swap_latencies.push(began.elapsed());
        }
        if start.elapsed() >= next_progress {
            next_progress += progress_every;
            let s = samples[samples.len() - 1];
            eprintln!(
                "soak {:>5.0}s of {:.0}s: {} echoes answered, {} swaps, rss {:.1} MiB, {} fds, {} threads",
                s.at.as_secs_f64(),
                duration.as_secs_f64(),
                answered.load(Ordering::Relaxed),
                module_swaps.values().sum::<u64>() + config_swaps,
                mib(s.rss),
                s.fds,
                s.threads,
            );
        }
    }
    stop.store(true, Ordering::Relaxed);
    let (sent, events) = within("the load's end", Duration::from_secs(10), load)
        .await
        .unwrap();

    // Every event reaches its handler, is counted once as ok or failed, and every echo
    // comes back.
    let sent_to = |h: &str| -> u64 {
        sent.iter()
            .filter(|((to, _), _)| *to == h)
            .map(|(_, n)| n)
            .sum()
    };
    let count = |h: &str, kind: Kind| sent.get(&(h, kind)).copied().unwrap_or(0);
    let echoes_sent: u64 = HANDLERS.iter().map(|h| count(h, Kind::Echo)).sum();
    let settled = |text: &str| {
        HANDLERS.iter().all(|h| {
            let label = format!("handler=\"{h}\"");
            let failed: u64 = FailReason::ALL
                .iter()
                .map(|r| failed(text, h, r.as_str()))
                .sum();
            metric_in_text(text, "wasmev_events_received_total", &label) == sent_to(h)
                && metric_in_text(text, "wasmev_events_ok_total", &label) + failed == sent_to(h)
        }) && answered.load(Ordering::Relaxed) >= echoes_sent
    };
    let waited = Instant::now();
    let text = loop {
        let text = host.metrics();
        if settled(&text) && consumer_idle(&js).await {
            break text;
        }
        assert!(
            waited.elapsed() < Duration::from_secs(60),
            "not everything was handled a minute after the load ended: sent {sent:?}, {} of \
             {echoes_sent} echoes answered\nmetrics:\n{text}\nlog tail:\n{}",
            answered.load(Ordering::Relaxed),
            host.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    // Every swapped-out version let go: wasmtime keeps a module's memory image in a memfd
    // while the module lives, so the host holds one per live version and no more.
    let images = memory_images(pid);
    assert_eq!(
        images.len(),
        HANDLERS.len(),
        "memory images open, one per live version expected: {images:?}"
    );
    // An echo still on its way now would be a second answer: give it time to show.
    tokio::time::sleep(Duration::from_millis(500)).await;
    collector.abort();
    dead_collector.abort();

    let counts = answers.lock().unwrap().clone();
    let (mut missing, mut doubled) = (Vec::new(), Vec::new());
    for i in 0..events {
        let n = counts.get(i as usize).copied().unwrap_or(0);
        let expected = u8::from(event(i).1 == Kind::Echo);
        if n < expected {
            missing.push(i);
        } else if n > expected {
            doubled.push(i);
        }
    }
    assert!(
        missing.is_empty() && doubled.is_empty(),
        "of {events} events, echoes missing for {} (first {:?}) and answered more than once \
         for {} (first {:?})",
        missing.len(),
        &missing[..missing.len().min(10)],
        doubled.len(),
        &doubled[..doubled.len().min(10)]
    );

    // Each failure under its reason, each publish under its result, each swap live.
    for h in HANDLERS {
        for kind in [Kind::Panic, Kind::Alloc, Kind::Reject, Kind::Spin] {
            let reason = kind.failure().unwrap();
            assert_eq!(
                failed(&text, h, reason),
                count(h, kind),
                "{h}: {reason} failures"
            );
        }
        let meant = [Kind::Panic, Kind::Alloc, Kind::Reject, Kind::Spin].map(|k| k.failure());
        for reason in FailReason::ALL.map(FailReason::as_str) {
            if !meant.contains(&Some(reason)) {
                assert_eq!(failed(&text, h, reason), 0, "{h}: {reason} failures");
            }
        }
        let publishes = |result: &str| {
            metric_in_text(
                &text,
                "wasmev_guest_publishes_total",
                &format!("handler=\"{h}\",result=\"{result}\""),
            )
        };
        // A storm's publishes past the quota are refused, and so is its report after them.
        let storms = count(h, Kind::Storm);
        assert_eq!(
            publishes("ok"),
            count(h, Kind::Echo) + storms * MAX_PUBLISHES,
            "{h}: publishes ok"
        );
        assert_eq!(
            publishes("quota_exceeded"),
            storms * (u64::from(STORM) + 1 - MAX_PUBLISHES),
            "{h}: publishes over the quota"
        );
        let dropped = metric_in_text(
            &text,
            "wasmev_guest_output_dropped_bytes_total",
            &format!("handler=\"{h}\""),
        );
        assert_eq!(
            dropped,
            count(h, Kind::Print) * (PRINT_BYTES - GUEST_OUTPUT_CAP) as u64,
            "{h}: output bytes dropped"
        );
        for result in ["refused", "rolled_back"] {
            assert_eq!(swaps(&text, h, result), 0, "{h}: swaps {result}");
        }
    }
    for (handler, n) in &module_swaps {
        assert_eq!(
            swaps(&text, handler, "swapped"),
            *n,
            "{handler}'s module swaps"
        );
    }
    assert_eq!(
        swaps(&text, "fresh", "swapped"),
        config_swaps,
        "fresh's config swaps"
    );
    assert_eq!(
        metric_in_text(&text, "wasmev_broker_dropped_messages_total", ""),
        0
    );
    // Each JetStream reject dead-lettered once, and nothing else.
    let rejects = count(DURABLE, Kind::Reject);
    assert_eq!(
        metric_in_text(
            &text,
            "wasmev_dead_letters_total",
            &format!("handler=\"{DURABLE}\"")
        ),
        rejects,
        "dead letters counted"
    );
    assert_eq!(
        dead_letters.load(Ordering::Relaxed),
        rejects,
        "dead letters on soak.dead"
    );

    // The process holds no more at its end than after the warm-up.
    let window = ((duration - warm_up) / 5).max(Duration::from_secs(3));
    let after_warm_up = median(&samples, warm_up, warm_up + window);
    let last = median(&samples, duration.saturating_sub(window), Duration::MAX);
    swap_latencies.sort();
    let summary = format!(
        "soak of {:.0}s: {events} events ({echoes_sent} echoes, {failing} failing on purpose), \
         {} swaps (p50 {:.0} ms, max {:.0} ms); medians after the warm-up and at the end: \
         rss {:.1} → {:.1} MiB, fds {} → {}, threads {} → {}",
        duration.as_secs_f64(),
        swap_latencies.len(),
        ms(swap_latencies.get(swap_latencies.len() / 2)),
        ms(swap_latencies.last()),
        mib(after_warm_up.rss),
        mib(last.rss),
        after_warm_up.fds,
        last.fds,
        after_warm_up.threads,
        last.threads,
        failing = HANDLERS
            .iter()
            .flat_map(|h| [Kind::Panic, Kind::Alloc, Kind::Reject, Kind::Spin].map(|k| count(h, k)))
            .sum::<u64>(),
    );
    eprintln!("{summary}");
    assert!(
        last.rss <= after_warm_up.rss + RSS_SLACK,
        "resident memory grew by {:.1} MiB after the warm-up (at most {:.0}): {summary}",
        mib(last.rss.saturating_sub(after_warm_up.rss)),
        mib(RSS_SLACK)
    );
    assert!(
        last.fds <= after_warm_up.fds + FD_SLACK,
        "open files grew: {summary}"
    );
    assert!(
        last.threads <= after_warm_up.threads + THREAD_SLACK,
        "threads grew: {summary}"
    );

    // And it still stops cleanly.
    let mut host = host;
    assert_eq!(
        terminate_within(&mut host.child, Duration::from_secs(15)),
        Some(0),
        "exit code after SIGTERM; log tail:\n{}",
        host.log_tail()
    );
}

fn failed(text: &str, handler: &str, reason: &str) -> u64 {
    metric_in_text(
        text,
        "wasmev_events_failed_total",
        &format!("handler=\"{handler}\",reason=\"{reason}\""),
    )
}

/// `handler`'s swaps with `result`: a series that appears with the first of them.
fn swaps(text: &str, handler: &str, result: &str) -> u64 {
    let series = format!("wasmev_handler_swaps_total{{handler=\"{handler}\",result=\"{result}\"}}");
    if text.contains(&series) {
        metric_in_text(
            text,
            "wasmev_handler_swaps_total",
            &format!("handler=\"{handler}\",result=\"{result}\""),
        )
    } else {
        0
    }
}

/// Whether the JetStream handler's consumer has delivered everything and holds no
/// unacknowledged message.
async fn consumer_idle(js: &async_nats::jetstream::Context) -> bool {
    let info = within("the consumer's info", Duration::from_secs(10), async {
        js.get_stream("SOAK")
            .await
            .unwrap()
            .get_consumer::<async_nats::jetstream::consumer::pull::Config>(DURABLE)
            .await
            .unwrap()
            .info()
            .await
            .unwrap()
            .clone()
    })
    .await;
    info.num_pending == 0 && info.num_ack_pending == 0
}

/// The memory images (memfds) the host process `pid` has open, by inode: a module's
/// image is one memfd for as long as the module lives.
fn memory_images(pid: u32) -> BTreeSet<u64> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|fd| {
            let path = fd.ok()?.path();
            let target = std::fs::read_link(&path).ok()?;
            let image = target
                .to_string_lossy()
                .starts_with("/memfd:wasm-memory-image");
            // The link followed: the memfd itself.
            image.then(|| std::fs::metadata(&path).ok().map(|m| m.ino()))?
        })
        .collect()
}

/// A swapped-out version is let go once its last event has ended, even while its subject
/// stays quiet: an intake waiting for its next event holds no version, so nothing keeps
/// the old compiled module and its memory image. Before this was so, each intake kept
/// the version it last ran until the next event came.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_swapped_out_version_is_let_go_while_its_subject_is_quiet() {
    let mut rig = Rig::start().await;

    // One echo through each handler, answered, so each version has made its image.
    let mut echo_each = async |round: &str| {
        let mut expected = BTreeSet::new();
        for handler in HANDLERS {
            let id = format!("{round}-{handler}");
            let mut headers = HeaderMap::new();
            headers.insert("Wasmev-Event-Id", id.as_str());
            let op = Kind::Echo.op().to_string();
            rig.client
                .publish_with_headers(format!("soak.{handler}"), headers, op.into())
                .await
                .unwrap();
            expected.insert(id);
        }
        rig.client.flush().await.unwrap();
        let mut answered = BTreeSet::new();
        while answered.len() < expected.len() {
            let m = within("the echoes", Duration::from_secs(30), rig.echoes.next()).await;
            answered.insert(String::from_utf8(m.unwrap().payload.to_vec()).unwrap());
        }
        assert_eq!(answered, expected, "echoes of round {round}");
    };
    echo_each("before").await;
    let before = memory_images(rig.pid);
    assert_eq!(
        before.len(),
        HANDLERS.len(),
        "one image per handler: {before:?}"
    );

    // A new module for each, then nothing on their subjects.
    for handler in HANDLERS {
        rig.host
            .replace_module(handler, &format!("{handler}-1"))
            .await;
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    let held = loop {
        let held: BTreeSet<u64> = memory_images(rig.pid)
            .intersection(&before)
            .copied()
            .collect();
        if held.is_empty() || Instant::now() > deadline {
            break held;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        held.is_empty(),
        "the swapped-out versions' images still open 10 s after the swaps, with no event \
         since: {held:?} of {before:?}\n{}",
        rig.host.log_tail()
    );

    // The new versions run.
    echo_each("after").await;
    let after = memory_images(rig.pid);
    assert_eq!(
        after.len(),
        HANDLERS.len(),
        "one image per handler: {after:?}"
    );
}

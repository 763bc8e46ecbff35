//! wasmev benchmarks. Run with `./scripts/bench` (release build, handlers built first).
//!
//! Each subcommand prints a table and writes it into its own section of
//! `bench/RESULTS.md`, with the machine it ran on.

mod alloc;
mod perf;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;
use wasmev::cache::ArtifactCache;
use wasmev::reload::Cause;
use wasmev::{Host, Manifest, Options};

#[derive(Parser)]
#[command(name = "wasmev-bench")]
struct Cli {
    #[command(subcommand)]
    command: Bench,
    /// Where to write the results table.
    #[arg(long, global = true, default_value = "bench/RESULTS.md")]
    out: PathBuf,
}

#[derive(Subcommand)]
enum Bench {
    /// Everything below, one section each, in one run.
    All,
    /// Throughput and latency of a trivial handler (per-event and reuse) against a plain
    /// async-nats subscriber, the same on the embedded broker, and JetStream consume+ack.
    Events {
        /// Events per throughput run.
        #[arg(long, default_value_t = 200_000)]
        events: u64,
        /// Seconds per latency run (at 10 000 events/s).
        #[arg(long, default_value_t = 5)]
        latency_secs: u64,
    },
    /// One throughput case, repeated for a while; prints its rate and writes nothing.
    /// For profiling: `perf record -p $(pgrep wasmev-bench)` while it runs.
    One {
        /// baseline, baseline-hops (the baseline adding wasmev's hop header to each
        /// publish), baseline-call (that, and a call of the reference component
        /// `bench/bare` on a warm instance per event), baseline-call-fresh (the same on a
        /// fresh instance per event), per-event, reuse, per-event-lean
        /// (per-event with the echo built without std, which imports no WASI interface),
        /// jetstream (consume+ack of stored events, per-event), jetstream-reuse (the same
        /// with reuse), or jetstream-baseline (the same by a plain async-nats pull
        /// consumer), or floor (one event on one thread without broker I/O: wasmtime alone
        /// and wasmev's dispatch).
        #[arg(long, default_value = "reuse")]
        mode: String,
        /// Use the embedded broker instead of a nats-server.
        #[arg(long)]
        embedded: bool,
        #[arg(long, default_value_t = 100_000)]
        events: u64,
        /// Keep running rounds for this many seconds.
        #[arg(long, default_value_t = 10)]
        secs: u64,
        /// Measure latency at 10 000 events/s for this many seconds instead.
        #[arg(long)]
        latency: Option<u64>,
    },
    /// Host start-up to ready with the example handlers, cold and with the artifact cache.
    Startup {
        #[arg(long, default_value = "runtime.toml")]
        manifest: PathBuf,
        #[arg(long, default_value_t = 3)]
        rounds: usize,
    },
    /// Idle resident memory of `wasmev run` with 1, 10 and 100 handlers.
    Memory {
        #[arg(long, default_value = "target/wasm32-wasip2/release/email_sender.wasm")]
        module: PathBuf,
    },
    /// Hot-swap latency: a module file is replaced, how long until the new version is
    /// live (new events run on it).
    Swap {
        /// Handler components to swap (variants of each are made by appending a custom
        /// section, so the code is the same and only the digest differs).
        #[arg(
            long = "module",
            default_values = [
                "target/wasm32-wasip2/release/email_sender.wasm",
                "handlers/signup-scorer/signup_scorer.wasm",
            ]
        )]
        modules: Vec<PathBuf>,
        /// Swaps measured per case (at most 5 for the cases that compile).
        #[arg(long, default_value_t = 20)]
        rounds: usize,
    },
}

/// The same allocator as the `wasmev` binary, so in-process hosts run as they do there,
/// counting each thread's allocations for the floor.
#[global_allocator]
static ALLOCATOR: alloc::Counting = alloc::Counting(mimalloc::MiMalloc);

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // The hosts the benchmarks start run in this process: their warnings (a missed
    // JetStream heartbeat, a shed event) belong beside the figures they may explain.
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    // The host (or the baseline) runs here; its threads' allocations are the workers'.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .on_thread_start(alloc::mark_worker)
        .build()?;
    let sections = match cli.command {
        Bench::All => vec![
            ("events", runtime.block_on(perf::events(200_000, 5))?),
            (
                "startup",
                runtime.block_on(perf::startup(Path::new("runtime.toml"), 3))?,
            ),
            (
                "memory",
                runtime.block_on(perf::memory(
                    &perf::wasmev_binary(),
                    Path::new("target/wasm32-wasip2/release/email_sender.wasm"),
                ))?,
            ),
            (
                "swap",
                runtime.block_on(swap_table(&default_swap_modules(), 20))?,
            ),
        ],
        Bench::Events {
            events,
            latency_secs,
        } => vec![(
            "events",
            runtime.block_on(perf::events(events, latency_secs))?,
        )],
        Bench::One {
            mode,
            embedded,
            events,
            secs,
            latency,
        } => {
            println!(
                "{}",
                runtime.block_on(perf::one(&mode, embedded, events, secs, latency))?
            );
            return Ok(());
        }
        Bench::Startup { manifest, rounds } => {
            vec![(
                "startup",
                runtime.block_on(perf::startup(&manifest, rounds))?,
            )]
        }
        Bench::Memory { module } => vec![(
            "memory",
            runtime.block_on(perf::memory(&perf::wasmev_binary(), &module))?,
        )],
        Bench::Swap { modules, rounds } => {
            vec![("swap", runtime.block_on(swap_table(&modules, rounds))?)]
        }
    };
    for (section, table) in &sections {
        println!("{table}");
        write_section(&cli.out, section, table)?;
    }
    println!("written to {}", cli.out.display());
    Ok(())
}

fn default_swap_modules() -> Vec<PathBuf> {
    vec![
        PathBuf::from("target/wasm32-wasip2/release/email_sender.wasm"),
        PathBuf::from("handlers/signup-scorer/signup_scorer.wasm"),
    ]
}

async fn swap_table(modules: &[PathBuf], rounds: usize) -> anyhow::Result<String> {
    let mut table = String::from(
        "## Hot swap\n\nFrom replacing a module file to the new version being live \
         (new events run on it). Target: under 100 ms for a small Rust handler with \
         its artifact cached.\n\n\
         | handler | case | swaps | p50 ms | p90 ms | max ms |\n|---|---|---|---|---|---|\n",
    );
    for module in modules {
        table.push_str(&swap(module, rounds).await?);
    }
    Ok(table)
}

/// `module` with a custom section naming `tag` appended: same code, another digest.
fn variant(module: &[u8], tag: &str) -> Vec<u8> {
    let mut bytes = module.to_vec();
    let name = b"wasmev-bench-variant";
    let mut body = vec![name.len() as u8];
    body.extend_from_slice(name);
    body.extend_from_slice(tag.as_bytes());
    bytes.push(0);
    bytes.push(body.len() as u8);
    bytes.extend_from_slice(&body);
    bytes
}

fn sha256(bytes: &[u8]) -> String {
    wasmev::cache::Digest::of(bytes).as_str().to_string()
}

/// Replace `path` the way a compiler or editor does: write aside, rename over.
fn replace(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

struct Stats {
    name: String,
    samples: Vec<Duration>,
}

impl Stats {
    fn row(&self, handler: &str) -> String {
        let mut s = self.samples.clone();
        s.sort();
        let at = |q: f64| s[((s.len() - 1) as f64 * q).round() as usize];
        let ms = |d: Duration| format!("{:.1}", d.as_secs_f64() * 1e3);
        format!(
            "| {handler} | {} | {} | {} | {} | {} |",
            self.name,
            s.len(),
            ms(at(0.5)),
            ms(at(0.9)),
            ms(at(1.0))
        )
    }
}

async fn swap(module: &Path, rounds: usize) -> anyhow::Result<String> {
    let base = std::fs::read(module).with_context(|| {
        format!(
            "cannot read {}; build the handlers first (./scripts/bench does)",
            module.display()
        )
    })?;
    let dir = tempfile::tempdir()?;
    let wasm = dir.path().join("handler.wasm");
    replace(&wasm, &variant(&base, "start"))?;
    let manifest_path = dir.path().join("runtime.toml");
    std::fs::write(
        &manifest_path,
        "version = 1\n[[handler]]\nname = \"h\"\nmodule = \"handler.wasm\"\n\
         subscribe = [\"user.created\"]\npublish = [\"email.sent\"]\n",
    )?;
    let manifest = Manifest::load(&manifest_path)?;
    let options = Options {
        watch: true,
        cache: Some(ArtifactCache::open(dir.path().join("cache"))?),
        ..Options::default()
    };
    let host = Host::start(&manifest, options).await?;
    let metrics = host.metrics().clone();
    let reloader = host.reloader();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let serving = tokio::spawn(host.serve(async {
        let _ = stopped.await;
    }));

    // Wait until /metrics says `digest` is live; the time from `since`.
    let live = |digest: String, since: Instant| {
        let metrics = metrics.clone();
        async move {
            let needle = format!("digest=\"{digest}\"}} 1");
            loop {
                if metrics.encode().contains(&needle) {
                    return Ok(since.elapsed());
                }
                if since.elapsed() > Duration::from_secs(60) {
                    bail!("version {digest} never went live");
                }
                tokio::time::sleep(Duration::from_micros(500)).await;
            }
        }
    };

    // Two versions compiled once, so their artifacts are in the cache.
    let cached = [variant(&base, "a"), variant(&base, "b")];
    for bytes in &cached {
        replace(&wasm, bytes)?;
        live(sha256(bytes), Instant::now()).await?;
    }

    let mut cases = Vec::new();
    let mut samples = Vec::new();
    for i in 0..rounds {
        let bytes = &cached[i % 2];
        let since = Instant::now();
        replace(&wasm, bytes)?;
        samples.push(live(sha256(bytes), since).await?);
    }
    cases.push(Stats {
        name: "file replaced → live, artifact cached (watcher, 50 ms debounce)".into(),
        samples,
    });

    let mut samples = Vec::new();
    for i in 0..rounds.min(5) {
        let bytes = variant(&base, &format!("fresh-{i}"));
        let since = Instant::now();
        replace(&wasm, &bytes)?;
        samples.push(live(sha256(&bytes), since).await?);
    }
    cases.push(Stats {
        name: "file replaced → live, never seen before (watcher, compiles)".into(),
        samples,
    });

    let mut samples = Vec::new();
    for i in 0..rounds {
        let bytes = &cached[i % 2];
        replace(&wasm, bytes)?;
        let since = Instant::now();
        let report = reloader
            .reload(Cause::AdminRequest)
            .await
            .context("host stopped")?;
        // The watcher may have swapped first; then this reload found nothing to do.
        if !report.is_ok() {
            bail!("reload refused: {:?}", report.problems());
        }
        samples.push(since.elapsed());
    }
    cases.push(Stats {
        name: "POST /reload after a replace, artifact cached (no debounce)".into(),
        samples,
    });

    let mut samples = Vec::new();
    for _ in 0..rounds {
        let since = Instant::now();
        reloader
            .reload(Cause::AdminRequest)
            .await
            .context("host stopped")?;
        samples.push(since.elapsed());
    }
    cases.push(Stats {
        name: "POST /reload, nothing changed (read, hash, compare)".into(),
        samples,
    });

    let _ = stop.send(());
    serving.await??;

    let handler = format!(
        "`{}` ({:.1} MB)",
        module
            .file_name()
            .map_or_else(String::new, |n| n.to_string_lossy().into_owned()),
        base.len() as f64 / 1e6
    );
    let mut table = String::new();
    for case in &cases {
        table.push_str(&case.row(&handler));
        table.push('\n');
    }
    Ok(table)
}

/// Replace the `section` of `out` (between its markers) with `table`, keeping the rest;
/// the header names the machine.
fn write_section(out: &Path, section: &str, table: &str) -> anyhow::Result<()> {
    let begin = format!("<!-- {section} -->");
    let end = format!("<!-- /{section} -->");
    let existing = std::fs::read_to_string(out).unwrap_or_else(|_| {
        "# wasmev benchmark results\n\nWritten by `./scripts/bench`; every figure in a \
         section was measured in the same run.\n"
            .to_string()
    });
    let block = format!("{begin}\n{}\n{table}{end}", machine());
    let updated = match (existing.find(&begin), existing.find(&end)) {
        (Some(a), Some(b)) if a < b => {
            format!("{}{block}{}", &existing[..a], &existing[b + end.len()..])
        }
        _ => format!("{}\n{block}\n", existing.trim_end()),
    };
    std::fs::write(out, updated)?;
    Ok(())
}

/// One line naming the machine and the date.
fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    let date = std::process::Command::new("date")
        .arg("-u")
        .arg("+%Y-%m-%d %H:%M UTC")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    format!("_Measured {date} on {cores} cores, {cpu}, Linux {kernel}, release build._\n")
}

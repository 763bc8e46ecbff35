//! The `wasmev` command: parse the command line, install logging, call the library.

// The host never panics on guest input or bad config (integration tests may).
#![deny(clippy::unwrap_used, clippy::expect_used)]

use std::io::Read as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use tracing_log::AsLog as _;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::filter::LevelFilter;
use tracing_subscriber::filter::Targets;
use tracing_subscriber::prelude::*;

use wasmev::cache::ArtifactCache;
use wasmev::contract::{self, GuestLogs};
use wasmev::dev::{Build, DevLoop};
use wasmev::ingress::{self, Target};
use wasmev::reload::{Cause, Reloader};
use wasmev::scaffold;
use wasmev::{Host, Manifest, Options};

/// Run WebAssembly event handlers on NATS or an embedded broker.
///
/// Handlers are Wasm components listed in runtime.toml; each subscribes to subjects and
/// may publish new events. Set RUST_LOG (e.g. RUST_LOG=debug) for more detail.
#[derive(Parser)]
#[command(name = "wasmev", version, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args)]
struct HostArgs {
    /// The manifest to run.
    #[arg(default_value = "runtime.toml")]
    manifest: PathBuf,
    /// How long to wait for in-flight events on shutdown, like "10s".
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    drain_timeout: Duration,
    /// Do not watch the manifest and modules for changes (SIGHUP and POST /reload still
    /// reload).
    #[arg(long)]
    no_watch: bool,
    /// Where compiled modules are cached between runs [default: $XDG_CACHE_HOME/wasmev or
    /// ~/.cache/wasmev].
    #[arg(long, env = "WASMEV_CACHE_DIR", value_name = "DIR")]
    cache_dir: Option<PathBuf>,
    /// Compile every module on every start, without the artifact cache.
    #[arg(long, conflicts_with = "cache_dir")]
    no_cache: bool,
    /// Threads that run handlers and broker I/O [default: one per CPU core]. On a machine
    /// shared with nats-server, 1 keeps each event on one core and can carry more events
    /// for `reuse` handlers; `per-event` handlers want one per core (see the README's
    /// Performance section). At most 1024: each is an OS thread, and more is a typo.
    #[arg(
        long,
        env = "WASMEV_WORKER_THREADS",
        value_name = "N",
        value_parser = clap::value_parser!(u16).range(1..=1024)
    )]
    worker_threads: Option<u16>,
}

impl HostArgs {
    fn options(&self) -> Options {
        let dir = if self.no_cache {
            None
        } else {
            self.cache_dir.clone().or_else(ArtifactCache::default_dir)
        };
        let cache = dir.and_then(|dir| match ArtifactCache::open(&dir) {
            Ok(cache) => Some(cache),
            Err(e) => {
                tracing::warn!("{e:#}; compiling without a cache");
                None
            }
        });
        Options {
            drain_timeout: self.drain_timeout,
            watch: !self.no_watch,
            cache,
        }
    }
}

#[derive(Subcommand)]
enum Command {
    /// Load the manifest, subscribe, and run handlers until SIGINT or SIGTERM.
    ///
    /// On a signal the host stops taking events, lets in-flight ones finish (up to
    /// --drain-timeout), flushes what handlers published, and exits 0.
    ///
    /// The host reloads when runtime.toml or a module it names changes, on SIGHUP, and on
    /// POST /reload to the admin endpoint: changed handlers are swapped in place, events
    /// already running finish on the old version, and a change that does not load leaves
    /// the old version serving.
    Run {
        #[command(flatten)]
        host: HostArgs,
    },
    /// Run the host for handler development: build, watch sources, rebuild, hot-swap.
    ///
    /// Handlers with `build = "..."` in the manifest are built first; then the host runs
    /// as with `wasmev run`, and a change to a file matching a handler's `watch` globs
    /// rebuilds it and swaps the result in, printing the build output and what went live.
    Dev {
        #[command(flatten)]
        host: HostArgs,
    },
    /// Check a manifest and every module it names without connecting anywhere.
    ///
    /// Exits 0 when the host would start, otherwise prints every problem and exits 1.
    Check {
        /// The manifest to check.
        #[arg(default_value = "runtime.toml")]
        manifest: PathBuf,
        /// Where compiled modules are cached [default: $XDG_CACHE_HOME/wasmev or
        /// ~/.cache/wasmev].
        #[arg(long, env = "WASMEV_CACHE_DIR", value_name = "DIR")]
        cache_dir: Option<PathBuf>,
    },
    /// Create a working handler in Rust, JavaScript, Python or C.
    ///
    /// Writes the source, a build script, the handler world (wit/), a manifest with just
    /// this handler (wasmev.toml) and contract cases (cases.toml) that pass as written,
    /// then prints the [[handler]] block to add to runtime.toml.
    New {
        /// The handler's name: lowercase letters, digits and '-'.
        name: String,
        /// The language to write it in.
        #[arg(long, short)]
        lang: scaffold::Lang,
        /// Where to write it [default: handlers/NAME when ./handlers exists, else ./NAME].
        #[arg(long)]
        dir: Option<PathBuf>,
    },
    /// Run a handler's event-contract cases, without a broker.
    ///
    /// Each case file (cases.toml next to a handler) names a manifest entry and lists
    /// events with the expected result, publishes and log lines; every case runs the real
    /// component in the real sandbox. With no paths: ./cases.toml if present, else every
    /// handlers/*/cases.toml. Exits 0 when all pass, 1 when a case fails, 2 when a case file
    /// or its handler cannot be loaded.
    Test {
        /// Case files, or folders holding a cases.toml.
        paths: Vec<PathBuf>,
        /// Run only the cases whose name contains this text.
        #[arg(long, value_name = "TEXT")]
        filter: Option<String>,
        /// Also show what passing cases published and logged.
        #[arg(short, long)]
        verbose: bool,
        /// Where compiled modules are cached [default: $XDG_CACHE_HOME/wasmev or
        /// ~/.cache/wasmev].
        #[arg(long, env = "WASMEV_CACHE_DIR", value_name = "DIR")]
        cache_dir: Option<PathBuf>,
    },
    /// Publish one event, to NATS or through a running host's admin endpoint.
    ///
    /// Without --url or --admin the target comes from the manifest: its [broker] when it
    /// has one, else its [admin] endpoint (for hosts on the embedded broker).
    Publish {
        /// The subject to publish on, like user.created.
        subject: String,
        /// The payload; "-" reads it from stdin; omitted means empty.
        data: Option<String>,
        /// A header, as name=value; repeat for more.
        #[arg(short = 'H', long = "header", value_parser = ingress::parse_header)]
        headers: Vec<(String, String)>,
        /// Publish to this NATS server, like nats://127.0.0.1:4222.
        #[arg(long, env = "NATS_URL", conflicts_with = "admin")]
        url: Option<String>,
        /// Publish through this host admin endpoint, like http://127.0.0.1:9090.
        #[arg(long, env = "WASMEV_ADMIN")]
        admin: Option<String>,
        /// The manifest that names the broker or admin endpoint.
        #[arg(long, default_value = "runtime.toml")]
        manifest: PathBuf,
    },
}

/// mimalloc instead of the system allocator: the event path allocates small, short-lived
/// buffers on every worker thread, and glibc's arena locks showed up in the profile as
/// futex waits between workers (~9% of a warm-instance event).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Send the log to stderr through `filter`; with `capture_guests` (`wasmev test`), also
/// collect every guest log line, whatever `filter` says, into the returned [`GuestLogs`].
fn init_logging(filter: EnvFilter, capture_guests: bool) -> GuestLogs {
    let log_level = filter.max_level_hint().unwrap_or(LevelFilter::TRACE);
    let guest_logs = GuestLogs::default();
    let console = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_filter(filter);
    let capture = capture_guests.then(|| {
        guest_logs
            .clone()
            .with_filter(Targets::new().with_target("guest", tracing::Level::TRACE))
    });
    tracing_subscriber::registry()
        .with(console)
        .with(capture)
        .init();
    // Records of the `log` crate (Cranelift and its register allocator log at debug and
    // trace for every function they compile) only ever go to the console. `init` sets
    // log's level from the whole subscriber's, which the guest capture raises to TRACE for
    // its one target; every such record then went through the filters, and compiling a
    // JS or Python component took 5× as long (76 s, not 13 s, for a 12 MB JS component
    // in a debug build; 5 % longer in a release build).
    log::set_max_level(log_level.as_log());
    guest_logs
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // `wasmev test` reports guest logs per case itself; the log shows only host errors,
    // and that a long compile has begun.
    let testing = matches!(cli.command, Command::Test { .. });
    let default_filter = if testing {
        format!("error,{}=info", wasmev::handler::COMPILING_TARGET)
    } else {
        "info".to_string()
    };
    let guest_logs = init_logging(
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter)),
        testing,
    );
    let runtime = match async_runtime(&cli.command) {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: failed to start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        match cli.command {
            Command::Run { host } => run(host).await,
            Command::Dev { host } => dev(host).await,
            Command::Check {
                manifest,
                cache_dir,
            } => check(manifest, cache_dir),
            Command::New { name, lang, dir } => {
                let dir = dir.unwrap_or_else(|| scaffold::default_dir(&name));
                match scaffold::create(&name, lang, &dir) {
                    Ok(made) => {
                        print!("{made}");
                        ExitCode::SUCCESS
                    }
                    Err(e) => {
                        eprintln!("error: {e}");
                        ExitCode::FAILURE
                    }
                }
            }
            Command::Test {
                paths,
                filter,
                verbose,
                cache_dir,
            } => test(paths, filter, verbose, cache_dir, &guest_logs).await,
            Command::Publish {
                subject,
                data,
                headers,
                url,
                admin,
                manifest,
            } => publish(subject, data, headers, url, admin, manifest).await,
        }
    })
}

/// The async runtime the command runs on: as many worker threads as `--worker-threads`
/// asks for `run` and `dev`, otherwise tokio's default of one per CPU core.
fn async_runtime(command: &Command) -> std::io::Result<tokio::runtime::Runtime> {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.enable_all();
    if let Command::Run { host } | Command::Dev { host } = command
        && let Some(threads) = host.worker_threads
    {
        builder.worker_threads(usize::from(threads));
    }
    builder.build()
}

/// The manifest at `path`, its error text as the user sees it from `check`.
fn load(path: &std::path::Path, before_build: bool) -> anyhow::Result<Manifest> {
    let loaded = if before_build {
        Manifest::load_before_build(path)
    } else {
        Manifest::load(path)
    };
    loaded.map_err(|e| anyhow::anyhow!("{e}"))
}

/// Print a failure the way every command does and pick the exit code.
fn exit(result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: HostArgs) -> ExitCode {
    exit(
        async {
            let manifest = load(&args.manifest, false)?;
            let host = Host::start(&manifest, args.options()).await?;
            let _sighup = reload_on_sighup(host.reloader());
            host.serve(shutdown_signal()).await
        }
        .await,
    )
}

async fn dev(args: HostArgs) -> ExitCode {
    exit(
        async {
            let builds = Build::all(&load(&args.manifest, true)?)?;
            if builds.is_empty() {
                eprintln!(
                    "note: no handler in {} has a build command; add build = \"...\" and \
                     watch = [\"src/**\"] to a [[handler]] to rebuild it on save",
                    args.manifest.display()
                );
            }
            if !wasmev::dev::build_all(&builds).await {
                eprintln!("note: a build failed; starting with the modules already on disk");
            }
            let manifest = load(&args.manifest, false)?;
            let mut options = args.options();
            options.watch = true;
            let host = Host::start(&manifest, options).await?;
            let stop = tokio_util::sync::CancellationToken::new();
            let dev = DevLoop::start(builds, host.reloader(), stop.clone())?;
            let _sighup = reload_on_sighup(host.reloader());
            let served = host.serve(shutdown_signal()).await;
            stop.cancel();
            dev.join().await;
            served
        }
        .await,
    )
}

/// Reload on every SIGHUP until the returned guard is dropped.
fn reload_on_sighup(reloader: Reloader) -> Option<tokio_util::sync::DropGuard> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut hup = match signal(SignalKind::hangup()) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!("cannot listen for SIGHUP ({e}); reload with POST /reload");
                return None;
            }
        };
        let token = tokio_util::sync::CancellationToken::new();
        let stop = token.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    () = stop.cancelled() => return,
                    received = hup.recv() => {
                        if received.is_none() {
                            return;
                        }
                        // The serve loop logs the report.
                        let _ = reloader.reload(Cause::Sighup).await;
                    }
                }
            }
        });
        Some(token.drop_guard())
    }
    #[cfg(not(unix))]
    {
        let _ = reloader;
        None
    }
}

/// The artifact cache in `dir` or the default place; none when it cannot be opened.
fn open_cache(dir: Option<PathBuf>) -> Option<ArtifactCache> {
    dir.or_else(ArtifactCache::default_dir)
        .and_then(|dir| ArtifactCache::open(dir).ok())
}

fn check(path: PathBuf, cache_dir: Option<PathBuf>) -> ExitCode {
    match wasmev::check(&path, open_cache(cache_dir)) {
        Ok(m) => {
            println!(
                "{}: ok ({} handler(s), {})",
                path.display(),
                m.handlers.len(),
                match &m.broker {
                    Some(b) => format!("nats at {}", b.url),
                    None => "embedded broker".to_string(),
                }
            );
            ExitCode::SUCCESS
        }
        Err(problems) => {
            for p in &problems {
                eprintln!("error: {p}\n");
            }
            eprintln!("{}: {} problem(s)", path.display(), problems.len());
            ExitCode::FAILURE
        }
    }
}

async fn test(
    paths: Vec<PathBuf>,
    filter: Option<String>,
    verbose: bool,
    cache_dir: Option<PathBuf>,
    logs: &GuestLogs,
) -> ExitCode {
    let files = contract::case_files(&paths);
    if files.is_empty() {
        eprintln!(
            "error: no case files: give a cases.toml (or its folder), or run where \
             ./cases.toml or handlers/*/cases.toml exist"
        );
        return ExitCode::from(2);
    }
    let (mut passed, mut failed, mut broken) = (0, 0, 0);
    for file in &files {
        match contract::run_file(file, filter.as_deref(), open_cache(cache_dir.clone()), logs).await
        {
            Ok(report) => {
                print!("{}", report.render(verbose));
                passed += report.passed();
                failed += report.failed();
            }
            Err(e) => {
                println!("{}: could not run", file.display());
                eprintln!("error: {e}");
                broken += 1;
            }
        }
    }
    let verdict = if failed + broken == 0 { "ok" } else { "FAILED" };
    let mut summary = format!("test result: {verdict}. {passed} passed, {failed} failed");
    if broken > 0 {
        summary.push_str(&format!(", {broken} case file(s) could not run"));
    }
    println!("{summary}");
    if broken > 0 {
        ExitCode::from(2)
    } else if failed > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

async fn publish(
    subject: String,
    data: Option<String>,
    headers: Vec<(String, String)>,
    url: Option<String>,
    admin: Option<String>,
    manifest: PathBuf,
) -> ExitCode {
    let payload = match data.as_deref() {
        None => Vec::new(),
        Some("-") => {
            let mut buf = Vec::new();
            if let Err(e) = std::io::stdin().read_to_end(&mut buf) {
                eprintln!("error: failed to read the payload from stdin: {e}");
                return ExitCode::FAILURE;
            }
            buf
        }
        Some(s) => s.as_bytes().to_vec(),
    };
    let result = async {
        let target = Target::resolve(url, admin, &manifest)?;
        ingress::publish(&target, &subject, &headers, payload.into()).await
    }
    .await;
    match result {
        Ok(line) => {
            println!("{line}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(
                        "cannot listen for SIGTERM ({e}); only Ctrl-C will stop the host"
                    );
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The guest capture of `wasmev test` takes every level of its own target, and the
    /// `log` crate's records (Cranelift's, per compiled function) still stop at the
    /// console's level rather than at TRACE.
    #[test]
    fn capturing_guest_logs_leaves_log_records_at_the_console_level() {
        let guest_logs = init_logging(EnvFilter::new("error"), true);
        assert_eq!(log::max_level(), log::LevelFilter::Error);
        tracing::trace!(target: "guest", "seen at trace");
        tracing::trace!(target: "cranelift_codegen", "not a guest line");
        assert_eq!(guest_logs.take(), ["trace seen at trace"]);
    }
}

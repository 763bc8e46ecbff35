//! The `wasmev` command: parse the command line, install logging, call the library.

// The host never panics on guest input or bad config (integration tests may).
#![deny(clippy::unwrap_used, clippy::expect_used)]

use std::io::Read as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

use wasmev::ingress::{self, Target};
use wasmev::{Manifest, Options};

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

#[derive(Subcommand)]
enum Command {
    /// Load the manifest, subscribe, and run handlers until SIGINT or SIGTERM.
    ///
    /// On a signal the host stops taking events, lets in-flight ones finish (up to
    /// --drain-timeout), flushes what handlers published, and exits 0.
    Run {
        /// The manifest to run.
        #[arg(default_value = "runtime.toml")]
        manifest: PathBuf,
        /// How long to wait for in-flight events on shutdown, like "10s".
        #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
        drain_timeout: Duration,
    },
    /// Check a manifest and every module it names without connecting anywhere.
    ///
    /// Exits 0 when the host would start, otherwise prints every problem and exits 1.
    Check {
        /// The manifest to check.
        #[arg(default_value = "runtime.toml")]
        manifest: PathBuf,
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

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: failed to start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        match cli.command {
            Command::Run {
                manifest,
                drain_timeout,
            } => run(manifest, drain_timeout).await,
            Command::Check { manifest } => check(manifest),
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

async fn run(path: PathBuf, drain_timeout: Duration) -> ExitCode {
    let manifest = match Manifest::load(&path) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let options = Options { drain_timeout };
    match wasmev::run(&manifest, options, shutdown_signal()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn check(path: PathBuf) -> ExitCode {
    match wasmev::check(&path) {
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

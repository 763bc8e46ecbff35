//! Throughput, latency, start-up and memory, each against a baseline measured in the
//! same run: a plain async-nats subscriber doing the handler's work (republish the
//! payload) without Wasm.
//!
//! `load`: the load generator, the baselines and the host under test; `events`: the
//! throughput and latency figures; `jetstream`: JetStream consume+ack; `floor`: one event
//! on one thread without broker I/O, in wasmtime alone and through dispatch; `reference`:
//! the least a component can be, for the floor and a baseline to call; `cpu`: CPU
//! time per thread; `process`: start-up and memory of the host as a process.

mod cpu;
mod events;
mod floor;
mod jetstream;
mod load;
mod process;
mod reference;

pub use events::{events, one};
pub use process::{memory, startup, wasmev_binary};

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

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
/// The same handler linked with a 64 KiB shadow stack instead of Rust's default 1 MiB
/// (`-C link-arg=-zstack-size=65536`): its linear memory is 2 pages instead of 17, which
/// is what a fresh instance pays for when it is reset (`./scripts/bench` builds both).
const ECHO_SMALL_STACK: &str = "target/echo-64k-stack/wasm32-wasip2/release/bench_echo.wasm";
/// The same handler linked with a 2 MiB initial memory (`-C link-arg=--initial-memory=2097152`):
/// room for the 256 KiB its `bench.scratch` events fill, which the default build grows its
/// memory for (`./scripts/bench` builds it too).
const ECHO_SIZED_MEMORY: &str = "target/echo-2m-memory/wasm32-wasip2/release/bench_echo.wasm";
/// The same echo without Rust's standard library (`bench/echo-lean`): it imports wasmev's
/// `publisher` and no WASI interface, where the std build imports a dozen, so a fresh
/// instance lowers one import instead of two dozen (`./scripts/bench` builds it too).
const ECHO_LEAN: &str = "target/wasm32-wasip2/release/bench_echo_lean.wasm";
/// The floor's reference component (`bench/bare`): `handle(list<u8>)` and no imports, the
/// least a component can be (`./scripts/bench` builds it too).
const BARE: &str = "target/wasm32-wasip2/release/bench_bare.wasm";

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

    /// CPU time the server's threads have used so far (none without /proc).
    fn cpu(&self) -> cpu::ThreadsCpu {
        cpu::threads(&format!("/proc/{}/task", self.child.id()), |_| true)
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

/// Microseconds per event when `events` took `spent` in all.
fn us_per_event(spent: Duration, events: f64) -> f64 {
    spent.as_secs_f64() * 1e6 / events
}

/// The middle of `values` (the upper middle of an even count); NaN when there are none.
fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(f64::NAN)
}

fn rate(r: f64) -> String {
    format!("{:.0} ev/s", r)
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

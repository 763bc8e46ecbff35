//! The running host: load, connect, subscribe, serve, and shut down cleanly.
//!
//! Start-up order is chosen so that nothing is half-ready: every module compiles and
//! matches the world before the host connects anywhere; the admin endpoint is up (and
//! says 503) before subscribing; `/healthz` turns 200 only after the broker confirmed
//! every subscription.
//!
//! Reload: the manifest is read again, the difference to what runs is worked out per
//! handler and compiled off the hot path, and only then applied: added handlers start,
//! changed ones swap their live version atomically (see [`crate::live`]), removed ones
//! drain. A change that does not load leaves the old version serving.
//!
//! Shutdown: one `CancellationToken` stops intake (subscriptions are drained: what the
//! broker already routed to us still runs), in-flight events finish under a deadline,
//! buffered publishes are flushed.

mod apply;

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context as _, bail};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::admin::{self, AdminState};
use crate::broker::Broker;
use crate::broker::memory::MemoryBroker;
use crate::broker::nats::NatsBroker;
use crate::cache::ArtifactCache;
use crate::engine::{Engines, EpochTicker};
use crate::handler::Compiler;
use crate::intake::IntakeStop;
use crate::limits;
use crate::live::Live;
use crate::manifest::{BrokerSettings, HandlerSpec, Manifest};
use crate::metrics::Metrics;
use crate::plan::prepare;
use crate::reload::{self, FileWatcher, Reloader};
use crate::subject::Pattern;

/// Settings that come from the command line rather than the manifest.
#[derive(Debug, Clone)]
pub struct Options {
    /// How long shutdown waits for in-flight events.
    pub drain_timeout: Duration,
    /// Reload when the manifest or a module file changes.
    pub watch: bool,
    /// Where compiled modules are kept between runs; `None` compiles every time.
    pub cache: Option<ArtifactCache>,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            drain_timeout: limits::DRAIN_TIMEOUT,
            watch: false,
            cache: None,
        }
    }
}

/// A running handler: its live version and the intakes feeding it.
struct Running {
    live: Arc<Live>,
    intakes: BTreeMap<Intake, IntakeStop>,
}

/// One source of events for a handler. Two versions of a handler with the same intake
/// share it: a swap that keeps the subjects keeps the subscription untouched.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Intake {
    Core {
        pattern: Pattern,
        queue: String,
    },
    /// The consumer's settings and filter, rendered: a change makes a new consumer loop.
    JetStream(String),
}

impl Intake {
    /// The intakes `spec` needs. Core subscriptions always join a queue group: the
    /// handler's `queue`, else one private to this host and handler. Why: while a swap
    /// changes subjects, the old and new subscriptions overlap, and sharing a group means
    /// the server hands each event to exactly one of them.
    fn of(spec: &HandlerSpec, host_id: &str) -> BTreeSet<Intake> {
        if let Some(js) = &spec.jetstream {
            return BTreeSet::from([Intake::JetStream(format!("{js:?} {:?}", spec.subscribe))]);
        }
        let queue = spec
            .queue
            .clone()
            .unwrap_or_else(|| format!("_wasmev_{host_id}_{}", spec.name));
        spec.subscribe
            .iter()
            .map(|pattern| Intake::Core {
                pattern: pattern.clone(),
                queue: queue.clone(),
            })
            .collect()
    }
}

/// A host that has loaded its handlers and confirmed its subscriptions.
pub struct Host {
    broker: Broker,
    metrics: Arc<Metrics>,
    admin_addr: Option<SocketAddr>,
    /// The broker and admin settings the host started with: changing them needs a restart.
    started_with: (Option<BrokerSettings>, Option<SocketAddr>),
    manifest_path: PathBuf,
    handlers: BTreeMap<String, Running>,
    compiler: Arc<Mutex<Compiler>>,
    tasks: JoinSet<anyhow::Result<()>>,
    token: CancellationToken,
    tracker: TaskTracker,
    options: Options,
    /// Names this process's private queue groups.
    host_id: String,
    reloader: Reloader,
    requests: mpsc::Receiver<reload::Request>,
    watcher: Option<FileWatcher>,
    // Dropped last: stops the epoch thread once nothing can run guests any more.
    _ticker: EpochTicker,
}

impl Host {
    /// Load every handler, connect, subscribe, and wait for the broker to confirm.
    pub async fn start(manifest: &Manifest, options: Options) -> anyhow::Result<Host> {
        let engines = Engines::new();
        let ticker = EpochTicker::start(&engines)?;
        let compiler = Arc::new(Mutex::new(Compiler::new(engines, options.cache.clone())));
        let metrics = Metrics::new();
        // Every module compiles and matches the world before the host connects anywhere.
        let plan = prepare(compiler.clone(), manifest.clone(), Vec::new(), None).await?;
        if !plan.report.is_ok() {
            bail!(plan.report.problems().join("\n"));
        }

        let broker = match &manifest.broker {
            None => Broker::Memory(MemoryBroker::new()),
            Some(settings) => Broker::Nats(Arc::new(
                NatsBroker::connect(settings, metrics.broker.clone()).await?,
            )),
        };
        let ready = Arc::new(AtomicBool::new(false));
        let token = CancellationToken::new();
        let (reloader, requests) = Reloader::channel();
        let mut tasks = JoinSet::new();

        let mut admin_addr = None;
        if let Some(addr) = manifest.admin {
            let listener = TcpListener::bind(addr)
                .await
                .with_context(|| format!("failed to listen on {addr} for the admin endpoint"))?;
            let bound = listener.local_addr()?;
            admin_addr = Some(bound);
            let state = AdminState {
                ready: ready.clone(),
                broker: broker.clone(),
                metrics: metrics.clone(),
                reloader: reloader.clone(),
            };
            let token = token.clone();
            tasks.spawn(async move {
                admin::serve(listener, state, token.clone())
                    .await
                    .with_context(|| format!("admin endpoint on {bound} failed"))?;
                // The serve loop takes Ok as "stopped as asked"; an endpoint that stops
                // by itself must not pass for that.
                if token.is_cancelled() {
                    Ok(())
                } else {
                    Err(anyhow::anyhow!(
                        "admin endpoint on {bound} stopped unexpectedly"
                    ))
                }
            });
            tracing::info!("admin endpoint on http://{bound}");
        }

        let watcher = if options.watch {
            Some(FileWatcher::start(manifest, reloader.clone())?)
        } else {
            None
        };
        let mut host = Host {
            broker,
            metrics,
            admin_addr,
            started_with: (manifest.broker.clone(), manifest.admin),
            manifest_path: manifest.path.clone(),
            handlers: BTreeMap::new(),
            compiler,
            tasks,
            token,
            tracker: TaskTracker::new(),
            options,
            host_id: uuid::Uuid::now_v7().simple().to_string(),
            reloader,
            requests,
            watcher,
            _ticker: ticker,
        };
        let report = host.apply(plan).await;
        if !report.is_ok() {
            bail!(report.problems().join("\n"));
        }
        ready.store(true, Ordering::Release);
        host.metrics.ready.set(1);
        tracing::info!(
            handlers = host.handlers.len(),
            subscriptions = host
                .handlers
                .values()
                .map(|r| r.intakes.len())
                .sum::<usize>(),
            worker_threads = tokio::runtime::Handle::current().metrics().num_workers(),
            "ready on the {}",
            host.broker.describe()
        );
        Ok(host)
    }

    /// The admin endpoint's bound address, when the manifest has one.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin_addr
    }

    pub fn broker(&self) -> &Broker {
        &self.broker
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    pub fn handler_names(&self) -> impl Iterator<Item = &str> {
        self.handlers.keys().map(String::as_str)
    }

    /// A handle that asks this host to reload (what SIGHUP and `wasmev dev` use).
    pub fn reloader(&self) -> Reloader {
        self.reloader.clone()
    }

    /// Serve until `shutdown` resolves, then drain. Returns an error, after draining,
    /// if a long-lived task ended on its own: the process should exit non-zero then.
    pub async fn serve(mut self, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
        tokio::pin!(shutdown);
        let result = loop {
            tokio::select! {
                () = &mut shutdown => break Ok(()),
                Some(ended) = self.tasks.join_next() => match ended {
                    // Intakes end with Ok only when told to (a reload removed them).
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => break Err(e),
                    Err(e) => break Err(anyhow::anyhow!("a host task panicked: {e}")),
                },
                Some(request) = self.requests.recv() => {
                    let report = tokio::select! {
                        report = self.reload(request.cause) => report,
                        () = &mut shutdown => break Ok(()),
                    };
                    if let Some(reply) = request.reply {
                        let _ = reply.send(report);
                    }
                }
            }
        };
        if result.is_ok() {
            tracing::info!("shutting down: no new events; draining in-flight ones");
        }
        self.drain().await;
        if let Err(e) = &result {
            tracing::error!("{e:#}");
        } else {
            tracing::info!("stopped");
        }
        result
    }

    /// Stop intake, let buffered and in-flight events finish (within the drain timeout),
    /// flush what guests published.
    async fn drain(&mut self) {
        self.watcher = None;
        self.token.cancel();
        let deadline = tokio::time::Instant::now() + self.options.drain_timeout;
        let tasks = async {
            while let Some(ended) = self.tasks.join_next().await {
                if let Ok(Err(e)) = ended {
                    tracing::warn!("while stopping: {e:#}");
                }
            }
        };
        if tokio::time::timeout_at(deadline, tasks).await.is_err() {
            self.tasks.abort_all();
        }
        self.tracker.close();
        let running = self.tracker.len();
        if running > 0 {
            tracing::info!(running, "waiting for in-flight events");
        }
        if tokio::time::timeout_at(deadline, self.tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                abandoned = self.tracker.len(),
                "in-flight events did not finish within {}; abandoning them",
                humantime::format_duration(self.options.drain_timeout)
            );
        }
        if let Broker::Nats(nats) = &self.broker
            && let Err(e) = nats.flush().await
        {
            tracing::warn!("{e:#}");
        }
    }
}

/// Load, start and serve `manifest` until `shutdown` resolves.
pub async fn run(
    manifest: &Manifest,
    options: Options,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    Host::start(manifest, options).await?.serve(shutdown).await
}

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

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

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
use crate::handler::{Compiler, Handler};
use crate::intake::{IntakeStop, subscription_loop};
use crate::limits;
use crate::live::Live;
use crate::manifest::{BrokerSettings, HandlerSpec, Manifest};
use crate::metrics::{Metrics, ReloadResult, SwapResult};
use crate::plan::{Plan, Step, prepare};
use crate::reload::{self, Cause, FileWatcher, Refusal, Reloader, Report, Swap, Version};
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
                NatsBroker::connect(settings, metrics.broker_dropped.clone()).await?,
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

    /// Read the manifest again and bring the running handlers in line with it.
    pub async fn reload(&mut self, cause: Cause) -> Report {
        let started = Instant::now();
        // A missing module is one handler's problem, reported as its refusal below, not a
        // reason to refuse the whole manifest.
        let mut report = match Manifest::load_before_build(&self.manifest_path) {
            Err(e) => Report {
                errors: vec![e.to_string()],
                ..Report::default()
            },
            Ok(manifest) => {
                if let Some(watcher) = &mut self.watcher {
                    watcher.follow(&manifest);
                }
                let running: Vec<(Arc<Live>, Arc<Handler>)> = self
                    .handlers
                    .values()
                    .map(|r| (r.live.clone(), r.live.current()))
                    .collect();
                match prepare(
                    self.compiler.clone(),
                    manifest,
                    running,
                    Some(&self.started_with),
                )
                .await
                {
                    Ok(plan) => self.apply(plan).await,
                    Err(e) => Report {
                        errors: vec![format!("{e:#}")],
                        ..Report::default()
                    },
                }
            }
        };
        report.cause = Some(cause);
        report.live = self
            .handlers
            .iter()
            .map(|(name, running)| Version {
                handler: name.clone(),
                digest: running.live.current().digest.as_str().to_string(),
            })
            .collect();
        report.elapsed_ms = started.elapsed().as_millis() as u64;
        let result = if report.is_ok() {
            ReloadResult::ok
        } else {
            ReloadResult::refused
        };
        report.result = format!("{result:?}");
        self.metrics.reloaded(result);
        for refusal in &report.refused {
            self.metrics.swapped(&refusal.handler, SwapResult::refused);
        }
        report.log();
        report
    }

    /// Carry out `plan`: start added handlers, swap changed ones, stop removed ones.
    async fn apply(&mut self, plan: Plan) -> Report {
        let Plan {
            steps,
            removed,
            mut report,
        } = plan;
        let mut retired: Vec<IntakeStop> = Vec::new();
        for step in steps {
            match step {
                Step::Add(compiled) => {
                    let name = compiled.spec.name.clone();
                    let digest = compiled.digest.as_str().to_string();
                    let handler =
                        Handler::new(compiled, self.broker.clone(), self.metrics.handler(&name));
                    let wanted = Intake::of(&handler.spec, &self.host_id);
                    let live = Live::new(handler, self.metrics.clone());
                    match self.start_intakes(&live, wanted).await {
                        Ok(intakes) => {
                            self.handlers
                                .insert(name.clone(), Running { live, intakes });
                            report.added.push(Version {
                                handler: name,
                                digest,
                            });
                        }
                        Err(e) => {
                            live.retire();
                            refuse(&mut report, &name, e);
                        }
                    }
                }
                Step::Swap { compiled, changed } => {
                    let name = compiled.spec.name.clone();
                    let Some(running) = self.handlers.get(&name) else {
                        continue;
                    };
                    let live = running.live.clone();
                    let old_intakes: BTreeSet<Intake> = running.intakes.keys().cloned().collect();
                    let handler =
                        Handler::new(compiled, self.broker.clone(), self.metrics.handler(&name));
                    let wanted = Intake::of(&handler.spec, &self.host_id);
                    // JetStream: stop pulling for the old consumer before the new one
                    // starts, so no message is in two loops; JetStream keeps what is not
                    // acked, so the gap loses nothing.
                    let mut stopped = Vec::new();
                    if let Some(running) = self.handlers.get_mut(&name) {
                        running.intakes.retain(|intake, token| {
                            let keep =
                                !matches!(intake, Intake::JetStream(_)) || wanted.contains(intake);
                            if !keep {
                                token.cancel();
                                stopped.push(intake.clone());
                            }
                            keep
                        });
                    }
                    let new: BTreeSet<Intake> = wanted.difference(&old_intakes).cloned().collect();
                    let started = match self.start_intakes(&live, new).await {
                        Ok(started) => started,
                        Err(e) => {
                            refuse(&mut report, &name, e);
                            if !stopped.is_empty() {
                                // The old consumer must run again: the old version stays.
                                let restart: BTreeSet<Intake> = stopped.into_iter().collect();
                                match self.start_intakes(&live, restart).await {
                                    Ok(intakes) => {
                                        if let Some(running) = self.handlers.get_mut(&name) {
                                            running.intakes.extend(intakes);
                                        }
                                    }
                                    Err(e) => {
                                        tracing::error!(handler = %name, "cannot resume the old consumer: {e:#}")
                                    }
                                }
                            }
                            continue;
                        }
                    };
                    let from = live.current().digest.as_str().to_string();
                    let to = handler.digest.as_str().to_string();
                    live.swap(handler);
                    self.metrics.swapped(&name, SwapResult::swapped);
                    if let Some(running) = self.handlers.get_mut(&name) {
                        running.intakes.extend(started);
                        // Core subscriptions the new version does not want are drained
                        // once the new ones are confirmed (below).
                        let gone: Vec<Intake> = running
                            .intakes
                            .keys()
                            .filter(|i| !wanted.contains(i))
                            .cloned()
                            .collect();
                        for intake in gone {
                            if let Some(token) = running.intakes.remove(&intake) {
                                retired.push(token);
                            }
                        }
                    }
                    report.swapped.push(Swap {
                        handler: name,
                        from,
                        to,
                        changed,
                    });
                }
            }
        }
        for name in &removed {
            if let Some(running) = self.handlers.remove(name) {
                running.live.retire();
                retired.extend(running.intakes.into_values());
            }
        }
        report.removed = removed;
        if (!report.added.is_empty() || !report.swapped.is_empty())
            && let Err(e) = self.broker.confirm().await
        {
            report.errors.push(format!("{e:#}"));
        }
        // Only now, with every new subscription confirmed by the server, do the old ones
        // go: an event is always covered by one or the other.
        // All are stopped at once and waited for (bounded), so when the report goes out
        // no retired subscription takes new events.
        futures::future::join_all(retired.into_iter().map(IntakeStop::stop)).await;
        report
    }

    /// Subscribe (or create the consumer) for each intake and start its loop. All or
    /// nothing: on an error, the intakes started here are stopped again.
    async fn start_intakes(
        &mut self,
        live: &Arc<Live>,
        wanted: BTreeSet<Intake>,
    ) -> anyhow::Result<BTreeMap<Intake, IntakeStop>> {
        let mut started = BTreeMap::new();
        for intake in wanted {
            match self.start_intake(live, &intake).await {
                Ok(token) => {
                    started.insert(intake, token);
                }
                Err(e) => {
                    for token in started.values() {
                        token.cancel();
                    }
                    return Err(e);
                }
            }
        }
        Ok(started)
    }

    async fn start_intake(
        &mut self,
        live: &Arc<Live>,
        intake: &Intake,
    ) -> anyhow::Result<IntakeStop> {
        let handler = live.current();
        let stop = self.token.child_token();
        let (handle, unsubscribed) = IntakeStop::new(stop.clone());
        match intake {
            Intake::JetStream(_) => {
                let (Broker::Nats(nats), Some(spec)) = (&self.broker, &handler.spec.jetstream)
                else {
                    bail!("jetstream needs a [broker]");
                };
                let consumer = nats.consumer(spec, &handler.spec.subscribe).await?;
                self.tasks.spawn(crate::jetstream::consume(
                    live.clone(),
                    consumer,
                    stop.clone(),
                    self.tracker.clone(),
                ));
            }
            Intake::Core { pattern, queue } => {
                let sub = self.broker.subscribe(pattern, Some(queue)).await?;
                self.tasks.spawn(subscription_loop(
                    live.clone(),
                    pattern.clone(),
                    queue.clone(),
                    sub,
                    stop.clone(),
                    unsubscribed,
                    self.tracker.clone(),
                ));
            }
        }
        Ok(handle)
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

/// Record that starting `handler`'s intake failed.
fn refuse(report: &mut Report, handler: &str, error: anyhow::Error) {
    report.refused.push(Refusal::new(
        handler,
        format!("handler {handler:?}: {error:#}"),
    ));
}

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
use tokio::sync::{OwnedSemaphorePermit, mpsc};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::admin::{self, AdminState};
use crate::broker::memory::MemoryBroker;
use crate::broker::nats::NatsBroker;
use crate::broker::{Broker, Subscription};
use crate::cache::{ArtifactCache, Digest, Source};
use crate::dispatch::{answer_request, dispatch, event_for};
use crate::engine::{EngineKey, Engines, EpochTicker};
use crate::handler::{self, Compiled, Compiler, Handler};
use crate::limits;
use crate::live::Live;
use crate::manifest::{BrokerSettings, HandlerSpec, Manifest};
use crate::metrics::{Metrics, ReloadResult, SwapResult};
use crate::publish::Delivery;
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
    intakes: BTreeMap<Intake, CancellationToken>,
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

/// What a reload will do, worked out (and compiled) before anything running is touched.
struct Plan {
    steps: Vec<Step>,
    removed: Vec<String>,
    report: Report,
}

enum Step {
    Add(Compiled),
    Swap {
        compiled: Compiled,
        changed: Vec<&'static str>,
    },
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
            Some(settings) => Broker::Nats(Arc::new(NatsBroker::connect(settings).await?)),
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
                admin::serve(listener, state, token)
                    .await
                    .with_context(|| format!("admin endpoint on {bound} failed"))
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
        log_report(&report);
        report
    }

    /// Carry out `plan`: start added handlers, swap changed ones, stop removed ones.
    async fn apply(&mut self, plan: Plan) -> Report {
        let Plan {
            steps,
            removed,
            mut report,
        } = plan;
        let mut retired: Vec<CancellationToken> = Vec::new();
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
                            self.refuse(&mut report, &name, e);
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
                            self.refuse(&mut report, &name, e);
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
        for token in retired {
            token.cancel();
        }
        report
    }

    fn refuse(&self, report: &mut Report, handler: &str, error: anyhow::Error) {
        report.refused.push(Refusal {
            handler: handler.to_string(),
            error: format!("handler {handler:?}: {error:#}"),
        });
    }

    /// Subscribe (or create the consumer) for each intake and start its loop. All or
    /// nothing: on an error, the intakes started here are stopped again.
    async fn start_intakes(
        &mut self,
        live: &Arc<Live>,
        wanted: BTreeSet<Intake>,
    ) -> anyhow::Result<BTreeMap<Intake, CancellationToken>> {
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
    ) -> anyhow::Result<CancellationToken> {
        let handler = live.current();
        let stop = self.token.child_token();
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
                    self.tracker.clone(),
                ));
            }
        }
        Ok(stop)
    }
}

/// Work out what a reload does and compile what it needs, off the async workers (compiling
/// a large component takes seconds). Nothing running is touched.
///
/// `running`: each running handler's live slot and current version. `started_with`: the
/// broker and admin settings in force, to tell which changes need a restart (`None` at
/// start-up).
async fn prepare(
    compiler: Arc<Mutex<Compiler>>,
    manifest: Manifest,
    running: Vec<(Arc<Live>, Arc<Handler>)>,
    started_with: Option<&(Option<BrokerSettings>, Option<SocketAddr>)>,
) -> anyhow::Result<Plan> {
    let mut report = Report::default();
    if let Some((broker, admin)) = started_with {
        if manifest.broker != *broker {
            report.restart_needed.push("broker".into());
        }
        if manifest.admin != *admin {
            report.restart_needed.push("admin".into());
        }
    }
    tokio::task::spawn_blocking(move || {
        let mut compiler = compiler.lock().unwrap_or_else(|e| e.into_inner());
        let mut steps = Vec::new();
        for spec in &manifest.handlers {
            let current = running.iter().find(|(_, h)| h.spec.name == spec.name);
            let bytes = match handler::read(spec) {
                Ok(bytes) => bytes,
                Err(e) => {
                    report.refused.push(Refusal {
                        handler: spec.name.clone(),
                        error: e.to_string(),
                    });
                    continue;
                }
            };
            let digest = Digest::of(&bytes);
            let Some((live, current)) = current else {
                match compiler.compile_bytes(spec, &bytes, digest) {
                    Ok(compiled) => steps.push(Step::Add(compiled)),
                    Err(e) => report.refused.push(Refusal {
                        handler: spec.name.clone(),
                        error: format!("{e:#}"),
                    }),
                }
                continue;
            };
            let module_changed = digest != current.digest;
            if !module_changed && current.spec.runtime_eq(spec) {
                report.unchanged.push(spec.name.clone());
                continue;
            }
            if live.was_rolled_back(spec, &digest) {
                report.refused.push(Refusal {
                    handler: spec.name.clone(),
                    error: format!(
                        "handler {:?}: version {digest} was rolled back after failing its \
                         first events; change the module or its settings to try again",
                        spec.name
                    ),
                });
                continue;
            }
            let changed = reload::changes(&current.spec, spec, module_changed);
            let compiled = if !module_changed && EngineKey::of(spec) == EngineKey::of(&current.spec)
            {
                // Same code on the same engine: only settings changed; no compile.
                Ok(Compiled {
                    spec: spec.clone(),
                    pre: current.pre.clone(),
                    digest,
                    source: Source::Cache,
                })
            } else {
                compiler.compile_bytes(spec, &bytes, digest)
            };
            match compiled {
                Ok(compiled) => steps.push(Step::Swap { compiled, changed }),
                Err(e) => report.refused.push(Refusal {
                    handler: spec.name.clone(),
                    error: format!("{e:#}"),
                }),
            }
        }
        let removed = running
            .iter()
            .map(|(_, h)| h.spec.name.clone())
            .filter(|name| manifest.handler(name).is_none())
            .collect();
        Plan {
            steps,
            removed,
            report,
        }
    })
    .await
    .context("handler compilation panicked")
}

/// One log line per handler that changed or was refused, with digests before and after.
fn log_report(report: &Report) {
    let cause = report.cause.map(|c| c.to_string()).unwrap_or_default();
    for v in &report.added {
        tracing::info!(handler = %v.handler, digest = %short(&v.digest), %cause, "handler added");
    }
    for s in &report.swapped {
        tracing::info!(
            handler = %s.handler,
            from = %short(&s.from),
            to = %short(&s.to),
            changed = %s.changed.join(","),
            %cause,
            "handler swapped"
        );
    }
    for name in &report.removed {
        tracing::info!(handler = %name, %cause, "handler removed; its in-flight events finish");
    }
    for r in &report.refused {
        tracing::error!(%cause, "reload refused, the old version keeps serving: {}", r.error);
    }
    for e in &report.errors {
        tracing::error!(%cause, "reload refused, nothing changed:\n{e}");
    }
    for setting in &report.restart_needed {
        tracing::warn!(%cause, "[{setting}] changed; it takes effect after a restart");
    }
    if report.is_ok() && !report.changed_anything() {
        // A watched file touched without a change (an editor saving the same bytes) is
        // routine; an explicit request deserves an answer in the log.
        if report.cause == Some(Cause::FileChange) {
            tracing::debug!(%cause, elapsed_ms = report.elapsed_ms, "reload: nothing changed");
        } else {
            tracing::info!(%cause, elapsed_ms = report.elapsed_ms, "reload: nothing changed");
        }
    } else if report.is_ok() {
        tracing::info!(%cause, elapsed_ms = report.elapsed_ms, "reload done");
    }
}

fn short(digest: &str) -> &str {
    digest.get(..12).unwrap_or(digest)
}

/// Load, start and serve `manifest` until `shutdown` resolves.
pub async fn run(
    manifest: &Manifest,
    options: Options,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    Host::start(manifest, options).await?.serve(shutdown).await
}

/// Subscribe again after a subscription ended on its own, retrying every second until it
/// works; `None` when the intake is stopped first.
async fn resubscribe(
    handler: &Handler,
    pattern: &Pattern,
    queue: &str,
    stop: &CancellationToken,
) -> Option<Subscription> {
    loop {
        match handler.broker.subscribe(pattern, Some(queue)).await {
            Ok(sub) => {
                tracing::info!(handler = %handler.spec.name, subject = %pattern, "subscribed again");
                return Some(sub);
            }
            Err(e) => tracing::error!(handler = %handler.spec.name, "{e:#}; retrying in 1s"),
        }
        tokio::select! {
            () = stop.cancelled() => return None,
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

/// Longest wait for the next buffered message while draining a stopped subscription.
/// Why 5 s: the broker answers a drain within a round-trip; this only bounds a broken
/// connection.
const DRAIN_WAIT: Duration = Duration::from_secs(5);

/// One subscription's intake: take a permit, then a message, then dispatch it on the
/// handler's live version.
///
/// Why the permit first: an event is only pulled off the subscription when the handler
/// can run it, so a busy handler leaves events in the broker's buffer (where the embedded
/// broker makes publishers wait and NATS counts what it sheds) instead of piling up tasks.
///
/// When `stop` is cancelled (shutdown, or a reload that no longer wants this subject) the
/// subscription is drained, not dropped: events the broker already routed here still run.
async fn subscription_loop(
    live: Arc<Live>,
    pattern: Pattern,
    queue: String,
    mut sub: Subscription,
    stop: CancellationToken,
    tracker: TaskTracker,
) -> anyhow::Result<()> {
    loop {
        // Both selects are cancel-safe: a semaphore acquire and a channel receive lose
        // nothing when dropped.
        let permit = tokio::select! {
            biased;
            () = stop.cancelled() => break,
            permit = live.current().permits.clone().acquire_owned() => {
                permit.context("handler permits closed")?
            }
        };
        let message = tokio::select! {
            biased;
            () = stop.cancelled() => break,
            message = sub.next() => message,
        };
        let Some(message) = message else {
            // Supervision: a subscription should only end when we drain it. If the broker
            // ends it anyway, say so and subscribe again rather than go deaf silently.
            let handler = live.current();
            tracing::error!(
                handler = %handler.spec.name,
                subject = %pattern,
                "subscription ended unexpectedly; subscribing again"
            );
            drop(permit);
            sub = match resubscribe(&handler, &pattern, &queue, &stop).await {
                Some(sub) => sub,
                None => return Ok(()),
            };
            continue;
        };
        spawn_event(&live, message, permit, &tracker);
    }
    if !sub.drain().await {
        return Ok(());
    }
    while let Ok(Some(message)) = tokio::time::timeout(DRAIN_WAIT, sub.next()).await {
        let permit = live
            .current()
            .permits
            .clone()
            .acquire_owned()
            .await
            .context("handler permits closed")?;
        spawn_event(&live, message, permit, &tracker);
    }
    Ok(())
}

/// Run one core event on the version live now; the permit is held until it ends.
fn spawn_event(
    live: &Arc<Live>,
    message: crate::broker::Message,
    permit: OwnedSemaphorePermit,
    tracker: &TaskTracker,
) {
    let live = live.clone();
    let handler = live.current();
    tracker.spawn(async move {
        let event = event_for(&message, 1, || uuid::Uuid::now_v7().to_string());
        let delivery = Delivery {
            reply_to: message.reply.clone(),
            dedupe_prefix: None,
            hops: Delivery::hops_of(&message.headers),
        };
        let (outcome, replied) = dispatch(&handler, event, delivery).await;
        live.settled(&handler, &outcome);
        if handler.spec.service
            && let Some(reply_to) = &message.reply
        {
            answer_request(&handler, reply_to, &outcome, replied).await;
        }
        drop(permit);
    });
}

//! The running host: load, connect, subscribe, serve, and shut down cleanly.
//!
//! Start-up order is chosen so that nothing is half-ready: every module compiles and
//! matches the world before the host connects anywhere; the admin endpoint is up (and
//! says 503) before subscribing; `/healthz` turns 200 only after the broker confirmed
//! every subscription.
//!
//! Shutdown: one `CancellationToken` stops intake (subscription loops exit and
//! unsubscribe), in-flight events finish under a deadline, buffered publishes are flushed.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context as _, bail};
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::admin::{self, AdminState};
use crate::broker::memory::MemoryBroker;
use crate::broker::nats::NatsBroker;
use crate::broker::{Broker, Subscription};
use crate::dispatch::{answer_request, dispatch, event_for};
use crate::engine::{Engines, EpochTicker};
use crate::handler::{self, Handler};
use crate::limits;
use crate::manifest::Manifest;
use crate::metrics::Metrics;
use crate::publish::Delivery;
use crate::subject::Pattern;

/// Settings that come from the command line rather than the manifest.
#[derive(Debug, Clone)]
pub struct Options {
    /// How long shutdown waits for in-flight events.
    pub drain_timeout: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            drain_timeout: limits::DRAIN_TIMEOUT,
        }
    }
}

/// A host that has loaded its handlers and confirmed its subscriptions.
pub struct Host {
    broker: Broker,
    metrics: Arc<Metrics>,
    admin_addr: Option<SocketAddr>,
    handlers: Vec<Arc<Handler>>,
    tasks: JoinSet<anyhow::Result<()>>,
    token: CancellationToken,
    tracker: TaskTracker,
    options: Options,
    // Dropped last: stops the epoch thread once nothing can run guests any more.
    _ticker: EpochTicker,
}

impl Host {
    /// Load every handler, connect, subscribe, and wait for the broker to confirm.
    pub async fn start(manifest: &Manifest, options: Options) -> anyhow::Result<Host> {
        let engines = Engines::for_handlers(&manifest.handlers)?;
        let ticker = EpochTicker::start(&engines)?;
        let specs = manifest.handlers.clone();
        // Compilation is CPU-bound and can take seconds for large components: keep it off
        // the async workers.
        let compiled = tokio::task::spawn_blocking(move || handler::compile_all(&engines, &specs))
            .await
            .context("handler compilation panicked")?
            .map_err(|errors| {
                let lines: Vec<String> = errors.iter().map(|e| format!("{e:#}")).collect();
                anyhow::anyhow!(lines.join("\n"))
            })?;

        let broker = match &manifest.broker {
            None => Broker::Memory(MemoryBroker::new()),
            Some(settings) => Broker::Nats(Arc::new(NatsBroker::connect(settings).await?)),
        };
        let metrics = Metrics::new();
        let ready = Arc::new(AtomicBool::new(false));
        let token = CancellationToken::new();
        let tracker = TaskTracker::new();
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
            };
            let token = token.clone();
            tasks.spawn(async move {
                admin::serve(listener, state, token)
                    .await
                    .with_context(|| format!("admin endpoint on {bound} failed"))
            });
            tracing::info!("admin endpoint on http://{bound}");
        }

        let handlers: Vec<Arc<Handler>> = compiled
            .into_iter()
            .map(|c| {
                let m = metrics.handler(&c.spec.name);
                Handler::new(c, broker.clone(), m)
            })
            .collect();
        let mut subscriptions = 0;
        for h in &handlers {
            if h.spec.jetstream.is_some() {
                let (Broker::Nats(nats), Some(spec)) = (&broker, &h.spec.jetstream) else {
                    bail!("handler {:?}: jetstream needs a [broker]", h.spec.name);
                };
                let consumer = nats
                    .consumer(spec, &h.spec.subscribe)
                    .await
                    .with_context(|| format!("handler {:?}", h.spec.name))?;
                tasks.spawn(crate::jetstream::consume(
                    h.clone(),
                    consumer,
                    token.clone(),
                    tracker.clone(),
                ));
                subscriptions += 1;
                continue;
            }
            for pattern in &h.spec.subscribe {
                let sub = broker
                    .subscribe(pattern, h.spec.queue.as_deref())
                    .await
                    .with_context(|| format!("handler {:?}", h.spec.name))?;
                tasks.spawn(subscription_loop(
                    h.clone(),
                    pattern.clone(),
                    sub,
                    token.clone(),
                    tracker.clone(),
                ));
                subscriptions += 1;
            }
        }
        broker.confirm().await?;
        ready.store(true, Ordering::Release);
        metrics.ready.set(1);
        tracing::info!(
            handlers = handlers.len(),
            subscriptions,
            "ready on the {}",
            broker.describe()
        );
        Ok(Host {
            broker,
            metrics,
            admin_addr,
            handlers,
            tasks,
            token,
            tracker,
            options,
            _ticker: ticker,
        })
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
        self.handlers.iter().map(|h| h.spec.name.as_str())
    }

    /// Serve until `shutdown` resolves, then drain. Returns an error, after draining,
    /// if a long-lived task ended on its own: the process should exit non-zero then.
    pub async fn serve(mut self, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
        tokio::pin!(shutdown);
        let result = tokio::select! {
            () = &mut shutdown => {
                tracing::info!("shutting down: no new events; draining in-flight ones");
                Ok(())
            }
            Some(ended) = self.tasks.join_next() => Err(match ended {
                Ok(Ok(())) => anyhow::anyhow!("a host task stopped unexpectedly"),
                Ok(Err(e)) => e,
                Err(e) => anyhow::anyhow!("a host task panicked: {e}"),
            }),
        };
        self.token.cancel();
        while let Some(ended) = self.tasks.join_next().await {
            if let Ok(Err(e)) = ended {
                tracing::warn!("while stopping: {e:#}");
            }
        }
        self.tracker.close();
        let running = self.tracker.len();
        if running > 0 {
            tracing::info!(running, "waiting for in-flight events");
        }
        if tokio::time::timeout(self.options.drain_timeout, self.tracker.wait())
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
        if let Err(e) = &result {
            tracing::error!("{e:#}");
        } else {
            tracing::info!("stopped");
        }
        result
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

/// Subscribe again after a subscription ended on its own, retrying every second until it
/// works; `None` when shutdown comes first.
async fn resubscribe(
    handler: &Handler,
    pattern: &Pattern,
    token: &CancellationToken,
) -> Option<Subscription> {
    loop {
        match handler
            .broker
            .subscribe(pattern, handler.spec.queue.as_deref())
            .await
        {
            Ok(sub) => {
                tracing::info!(handler = %handler.spec.name, subject = %pattern, "subscribed again");
                return Some(sub);
            }
            Err(e) => tracing::error!(handler = %handler.spec.name, "{e:#}; retrying in 1s"),
        }
        tokio::select! {
            () = token.cancelled() => return None,
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

/// One subscription's intake: take a permit, then a message, then dispatch it.
///
/// Why the permit first: an event is only pulled off the subscription when the handler
/// can run it, so a busy handler leaves events in the broker's buffer (where the embedded
/// broker makes publishers wait and NATS counts what it sheds) instead of piling up tasks.
async fn subscription_loop(
    handler: Arc<Handler>,
    pattern: Pattern,
    mut sub: Subscription,
    token: CancellationToken,
    tracker: TaskTracker,
) -> anyhow::Result<()> {
    loop {
        // Both selects are cancel-safe: a semaphore acquire and a channel receive lose
        // nothing when dropped.
        let permit = tokio::select! {
            biased;
            () = token.cancelled() => return Ok(()),
            permit = handler.permits.clone().acquire_owned() => {
                permit.context("handler permits closed")?
            }
        };
        let message = tokio::select! {
            biased;
            () = token.cancelled() => return Ok(()),
            message = sub.next() => message,
        };
        let Some(message) = message else {
            // Supervision: a subscription should only end when we drop it. If the broker
            // ends it anyway, say so and subscribe again rather than go deaf silently.
            tracing::error!(
                handler = %handler.spec.name,
                subject = %pattern,
                "subscription ended unexpectedly; subscribing again"
            );
            drop(permit);
            sub = match resubscribe(&handler, &pattern, &token).await {
                Some(sub) => sub,
                None => return Ok(()),
            };
            continue;
        };
        let handler = handler.clone();
        tracker.spawn(async move {
            let event = event_for(&message, 1, || uuid::Uuid::now_v7().to_string());
            let delivery = Delivery {
                reply_to: message.reply.clone(),
                dedupe_prefix: None,
                hops: Delivery::hops_of(&message.headers),
            };
            let (outcome, replied) = dispatch(&handler, event, delivery).await;
            if handler.spec.service
                && let Some(reply_to) = &message.reply
            {
                answer_request(&handler, reply_to, &outcome, replied).await;
            }
            drop(permit);
        });
    }
}

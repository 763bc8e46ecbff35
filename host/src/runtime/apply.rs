//! Reload, applied: a prepared plan's handlers start, swap or drain, and intakes are
//! started all-or-nothing per handler; a reload the broker does not confirm is undone.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Instant;

use anyhow::bail;

use super::{Host, Intake, Running};
use crate::broker::Broker;
use crate::handler::Handler;
use crate::intake::{IntakeStop, subscription_loop};
use crate::live::Live;
use crate::manifest::Manifest;
use crate::metrics::{ReloadResult, SwapResult};
use crate::plan::{Plan, Step, prepare};
use crate::reload::{Cause, Refusal, Report, Swap, Version};

impl Host {
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
    ///
    /// The additions and swaps stand only once the broker confirms the subscriptions and
    /// pulls they made; until then the subscriptions a swapped version no longer wants keep
    /// running, and removed handlers stay. If the broker does not confirm (it refused one,
    /// or did not answer), nothing changes: the additions and swaps are undone, and the old
    /// versions serve on the subscriptions they never left, so no subject goes unheard
    /// (events dispatched while waiting for the confirmation ran on the new versions).
    /// Whole, not per handler: a broker that did not answer confirmed none of them.
    pub(super) async fn apply(&mut self, plan: Plan) -> Report {
        let Plan {
            steps,
            removed,
            mut report,
        } = plan;
        let mut pending: Vec<Pending> = Vec::new();
        for step in steps {
            match step {
                Step::Add(compiled) => {
                    let name = compiled.spec.name.clone();
                    let digest = compiled.digest.as_str().to_string();
                    let handler =
                        Handler::new(compiled, self.broker.clone(), self.metrics.handler(&name));
                    let wanted = Intake::of(&handler.spec, &self.host_id);
                    let live = Live::new(handler, self.metrics.clone());
                    match self.start_intakes(&live, &live.current(), wanted).await {
                        Ok(intakes) => {
                            self.handlers
                                .insert(name.clone(), Running { live, intakes });
                            pending.push(Pending::Added(Version {
                                handler: name,
                                digest,
                            }));
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
                    let mut stopped = BTreeSet::new();
                    if let Some(running) = self.handlers.get_mut(&name) {
                        running.intakes.retain(|intake, token| {
                            let keep =
                                !matches!(intake, Intake::JetStream(_)) || wanted.contains(intake);
                            if !keep {
                                token.cancel();
                                stopped.insert(intake.clone());
                            }
                            keep
                        });
                    }
                    let new: BTreeSet<Intake> = wanted.difference(&old_intakes).cloned().collect();
                    // With the new version's settings: it is not live yet.
                    let started = match self.start_intakes(&live, &handler, new).await {
                        Ok(started) => started,
                        Err(e) => {
                            refuse(&mut report, &name, e);
                            // The old consumer must run again: the old version stays.
                            self.resume(&name, &live, stopped).await;
                            continue;
                        }
                    };
                    let previous = live.current();
                    let swap = Swap {
                        handler: name.clone(),
                        from: previous.digest.as_str().to_string(),
                        to: handler.digest.as_str().to_string(),
                        changed,
                    };
                    live.swap(handler);
                    let started_keys = started.keys().cloned().collect();
                    if let Some(running) = self.handlers.get_mut(&name) {
                        running.intakes.extend(started);
                    }
                    pending.push(Pending::Swapped {
                        swap,
                        previous,
                        started: started_keys,
                        stopped,
                        unwanted: old_intakes.difference(&wanted).cloned().collect(),
                    });
                }
            }
        }
        let confirmed = if pending.is_empty() {
            Ok(())
        } else {
            self.broker.confirm().await
        };
        if let Err(e) = confirmed {
            self.undo(pending).await;
            report.errors.push(format!("{e:#}"));
            return report;
        }
        let mut retired: Vec<IntakeStop> = Vec::new();
        for change in pending {
            match change {
                Pending::Added(version) => report.added.push(version),
                Pending::Swapped { swap, unwanted, .. } => {
                    // Only now, with every new subscription confirmed by the server, do
                    // the old ones go: an event is always covered by one or the other.
                    if let Some(running) = self.handlers.get_mut(&swap.handler) {
                        retired.extend(unwanted.iter().filter_map(|i| running.intakes.remove(i)));
                    }
                    self.metrics.swapped(&swap.handler, SwapResult::swapped);
                    report.swapped.push(swap);
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
        // All are stopped at once and waited for (bounded), so when the report goes out
        // no retired subscription takes new events.
        futures::future::join_all(retired.into_iter().map(IntakeStop::stop)).await;
        report
    }

    /// Undo the additions and swaps of a reload the broker did not confirm. The new
    /// subscriptions and pulls stop first, so what they already took runs on the version
    /// that asked for it; then the old versions come back, on the subscriptions they never
    /// left, and old JetStream consumers pull again.
    async fn undo(&mut self, pending: Vec<Pending>) {
        let mut stops = Vec::new();
        for change in &pending {
            match change {
                Pending::Added(version) => {
                    if let Some(running) = self.handlers.get_mut(&version.handler) {
                        stops.extend(std::mem::take(&mut running.intakes).into_values());
                    }
                }
                Pending::Swapped { swap, started, .. } => {
                    if let Some(running) = self.handlers.get_mut(&swap.handler) {
                        stops.extend(started.iter().filter_map(|i| running.intakes.remove(i)));
                    }
                }
            }
        }
        futures::future::join_all(stops.into_iter().map(IntakeStop::stop)).await;
        for change in pending {
            match change {
                Pending::Added(version) => {
                    if let Some(running) = self.handlers.remove(&version.handler) {
                        running.live.retire();
                    }
                }
                Pending::Swapped {
                    swap,
                    previous,
                    stopped,
                    ..
                } => {
                    if let Some(live) = self.handlers.get(&swap.handler).map(|r| r.live.clone()) {
                        live.restore(previous);
                        self.resume(&swap.handler, &live, stopped).await;
                    }
                }
            }
        }
    }

    /// Start again the JetStream intakes a swap stopped, when the swap did not go in.
    async fn resume(&mut self, name: &str, live: &Arc<Live>, stopped: BTreeSet<Intake>) {
        if stopped.is_empty() {
            return;
        }
        match self.start_intakes(live, &live.current(), stopped).await {
            Ok(intakes) => {
                if let Some(running) = self.handlers.get_mut(name) {
                    running.intakes.extend(intakes);
                }
            }
            Err(e) => tracing::error!(handler = %name, "cannot resume the old consumer: {e:#}"),
        }
    }

    /// Subscribe (or create the consumer) for each intake and start its loop, with the
    /// settings of `version`: the live one, or the one a swap is about to make live (a
    /// JetStream consumer made from the live one kept the old stream, durable and settings
    /// through a reload that changed them). All or nothing: on an error, the intakes
    /// started here are stopped again.
    async fn start_intakes(
        &mut self,
        live: &Arc<Live>,
        version: &Handler,
        wanted: BTreeSet<Intake>,
    ) -> anyhow::Result<BTreeMap<Intake, IntakeStop>> {
        let mut started = BTreeMap::new();
        for intake in wanted {
            match self.start_intake(live, version, &intake).await {
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
        handler: &Handler,
        intake: &Intake,
    ) -> anyhow::Result<IntakeStop> {
        let stop = self.token.child_token();
        let (handle, unsubscribed) = IntakeStop::new(stop.clone());
        match intake {
            Intake::JetStream(_) => {
                let (Broker::Nats(nats), Some(spec)) = (&self.broker, &handler.spec.jetstream)
                else {
                    bail!("jetstream needs a [broker]");
                };
                let consumer = nats.consumer(spec, &handler.spec.subscribe).await?;
                let advisories = nats.given_up_consumer(spec).await?;
                self.tasks.spawn(crate::jetstream::dead_letter_given_up(
                    live.clone(),
                    nats.clone(),
                    advisories,
                    stop.clone(),
                ));
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

/// Record that starting `handler`'s intake failed.
fn refuse(report: &mut Report, handler: &str, error: anyhow::Error) {
    report.refused.push(Refusal::new(
        handler,
        format!("handler {handler:?}: {error:#}"),
    ));
}

/// An addition or swap that went in and waits for the broker's confirmation.
enum Pending {
    Added(Version),
    Swapped {
        swap: Swap,
        /// The version swapped out, back if the broker does not confirm.
        previous: Arc<Handler>,
        /// Intakes the swap started.
        started: BTreeSet<Intake>,
        /// JetStream intakes the swap stopped before starting its own.
        stopped: BTreeSet<Intake>,
        /// The old version's intakes the new one does not want: drained once confirmed.
        unwanted: BTreeSet<Intake>,
    },
}

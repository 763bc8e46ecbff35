//! The live version of a handler: what new events run on, swapped atomically by reloads.
//!
//! Intake loops read the current version once per event, when they dispatch it, and the
//! event keeps that `Arc<Handler>` to the end. So a swap never touches a running event:
//! events already running finish on the old version, and every event dispatched after
//! the swap runs on the new one. The old version is freed when its last event ends.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;

use crate::cache::Digest;
use crate::dispatch::Outcome;
use crate::handler::Handler;
use crate::manifest::HandlerSpec;
use crate::metrics::{FailReason, Metrics, SwapResult};

/// One handler's live version, plus the probation of a freshly swapped one.
pub struct Live {
    current: ArcSwap<Handler>,
    /// Whether a probation is running, so the per-event path takes no lock otherwise.
    on_probation: AtomicBool,
    watch: Mutex<Watch>,
    metrics: Arc<Metrics>,
    /// Woken whenever the current version changes (a swap or a rollback), so an intake
    /// waiting for one of the old version's permits takes the new version's instead.
    changed: tokio::sync::Notify,
}

#[derive(Default)]
struct Watch {
    probation: Option<Probation>,
    /// A version rolled back earlier: reloads do not try it again until it changes.
    rolled_back: Option<(HandlerSpec, Digest)>,
}

/// A new version on trial: if its first `limit` events all fail, `previous` comes back.
struct Probation {
    candidate: Arc<Handler>,
    previous: Arc<Handler>,
    failures: u32,
    limit: u32,
}

impl Live {
    pub fn new(handler: Arc<Handler>, metrics: Arc<Metrics>) -> Arc<Self> {
        metrics.version(&handler.spec.name, None, Some(handler.digest.as_str()));
        Arc::new(Self {
            current: ArcSwap::new(handler),
            on_probation: AtomicBool::new(false),
            watch: Mutex::new(Watch::default()),
            metrics,
            changed: tokio::sync::Notify::new(),
        })
    }

    /// The version to dispatch the next event on.
    pub fn current(&self) -> Arc<Handler> {
        self.current.load_full()
    }

    /// Completes at the next change of version. Create it before reading
    /// [`Live::current`]: a change between the two is then not missed.
    pub fn changed(&self) -> tokio::sync::futures::Notified<'_> {
        self.changed.notified()
    }

    /// Make `next` the version new events run on. With `rollback_after` set in its spec,
    /// it is on probation until one of its first events succeeds.
    pub fn swap(&self, next: Arc<Handler>) {
        let mut watch = self.lock();
        let previous = self.replace(next.clone());
        watch.rolled_back = None;
        watch.probation = next.spec.rollback_after.map(|limit| Probation {
            candidate: next,
            previous,
            failures: 0,
            limit,
        });
        self.on_probation
            .store(watch.probation.is_some(), Ordering::Release);
        self.changed.notify_waiters();
    }

    /// Undo a [`Live::swap`] to `previous` that the broker did not confirm: `previous`
    /// takes events again and the version swapped in is retired, with no probation.
    pub fn restore(&self, previous: Arc<Handler>) {
        let mut watch = self.lock();
        watch.probation = None;
        self.on_probation.store(false, Ordering::Release);
        previous.revive();
        self.replace(previous);
        self.changed.notify_waiters();
    }

    /// Make `next` current, retire the version it replaces and export the change; returns
    /// the version replaced.
    fn replace(&self, next: Arc<Handler>) -> Arc<Handler> {
        let previous = self.current.swap(next.clone());
        previous.retire();
        self.metrics.version(
            &next.spec.name,
            Some(previous.digest.as_str()),
            Some(next.digest.as_str()),
        );
        previous
    }

    /// Whether `spec` with module `digest` is the version rolled back earlier.
    pub fn was_rolled_back(&self, spec: &HandlerSpec, digest: &Digest) -> bool {
        self.lock()
            .rolled_back
            .as_ref()
            .is_some_and(|(s, d)| s == spec && d == digest)
    }

    /// Report how an event dispatched on `handler` ended. Ends a probation: passed on the
    /// first success, failed (and rolled back) when the first `limit` events all failed.
    /// Outcomes that say nothing about the version (an oversized event, a feedback loop,
    /// the host failing to instantiate) do not count either way.
    pub fn settled(&self, handler: &Arc<Handler>, outcome: &Outcome) {
        if !self.on_probation.load(Ordering::Acquire) {
            return;
        }
        let ok = match outcome {
            Outcome::Ok => true,
            Outcome::Failed { reason, .. } => match reason {
                FailReason::too_large | FailReason::hop_limit | FailReason::host => return,
                FailReason::retry
                | FailReason::reject
                | FailReason::trap
                | FailReason::deadline
                | FailReason::memory
                | FailReason::fuel => false,
            },
        };
        let mut watch = self.lock();
        let Some(trial) = watch.probation.as_mut() else {
            return;
        };
        if !Arc::ptr_eq(&trial.candidate, handler) {
            // An event of the previous version finishing after the swap says nothing
            // about the new one.
            return;
        }
        if ok {
            watch.probation = None;
            self.on_probation.store(false, Ordering::Release);
            return;
        }
        trial.failures += 1;
        if trial.failures < trial.limit {
            return;
        }
        let Some(trial) = watch.probation.take() else {
            return;
        };
        self.on_probation.store(false, Ordering::Release);
        let name = &trial.candidate.spec.name;
        tracing::error!(
            handler = %name,
            from = %trial.candidate.digest,
            to = %trial.previous.digest,
            "rolled back: the first {} events on the new version all failed; \
             change the module or the manifest to try again",
            trial.failures
        );
        trial.previous.revive();
        self.replace(trial.previous.clone());
        self.changed.notify_waiters();
        self.metrics.swapped(name, SwapResult::rolled_back);
        watch.rolled_back = Some((trial.candidate.spec.clone(), trial.candidate.digest.clone()));
    }

    /// Stop exporting this handler's version: it has been removed.
    pub fn retire(&self) {
        let current = self.current();
        current.retire();
        self.metrics
            .version(&current.spec.name, Some(current.digest.as_str()), None);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Watch> {
        self.watch.lock().unwrap_or_else(|e| e.into_inner())
    }
}

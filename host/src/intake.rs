//! Core intake: one task per (handler, subject) that takes a permit, then a message, and
//! runs it on the handler's live version. JetStream intake is in [`crate::jetstream`].

use std::sync::{Arc, Weak};
use std::time::Duration;

use anyhow::Context as _;
use futures::FutureExt as _;
use futures::future::join_all;
use tokio::sync::OwnedSemaphorePermit;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::broker::{Message, Subscription};
use crate::dispatch::{EventId, answer_request, dispatch, event_for};
use crate::handler::Handler;
use crate::live::Live;
use crate::publish::Delivery;
use crate::subject::Pattern;

/// Stops one intake. `cancel` asks; `stop` asks and waits (bounded) until the intake no
/// longer takes new events from the broker, so a reload can answer only once a removed
/// subscription is gone: an event published after the answer never reaches it.
pub struct IntakeStop {
    token: CancellationToken,
    unsubscribed: tokio::sync::watch::Receiver<bool>,
}

impl IntakeStop {
    /// A stop for an intake that reports through the returned sender (true once it has
    /// unsubscribed; dropping the sender counts the same).
    pub fn new(token: CancellationToken) -> (Self, tokio::sync::watch::Sender<bool>) {
        let (tx, unsubscribed) = tokio::sync::watch::channel(false);
        (
            Self {
                token,
                unsubscribed,
            },
            tx,
        )
    }

    pub fn cancel(&self) {
        self.token.cancel();
    }

    pub async fn stop(mut self) {
        self.token.cancel();
        // Err: the intake ended (and dropped its sender); either way it takes no more.
        let _ = tokio::time::timeout(DRAIN_WAIT, self.unsubscribed.wait_for(|done| *done)).await;
    }
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

/// A permit of the live version, with that version; `None` once `stop` is cancelled.
/// A swap while waiting starts the wait again on the new version: otherwise an intake
/// whose old version had every permit taken (by slow events) would hold new events back
/// until one of those ended.
pub(crate) async fn permit_of_current(
    live: &Live,
    stop: &CancellationToken,
) -> anyhow::Result<Option<(Arc<Handler>, OwnedSemaphorePermit)>> {
    loop {
        let changed = live.changed();
        let handler = live.current();
        let permit = tokio::select! {
            biased;
            () = stop.cancelled() => return Ok(None),
            () = changed => continue,
            permit = permit_of(&handler) => permit?,
        };
        return Ok(Some((handler, permit)));
    }
}

/// The version an event just taken runs on: the live one, with a permit of it. A swap
/// while the intake waited for the message leaves it holding the old version's permit;
/// the event then runs on (and counts against) the new one, which may mean waiting for
/// one of its permits.
///
/// The intake holds the permit's version weakly while it waits for a message (the permit
/// itself holds only the semaphore): a wait can last as long as a subject stays quiet,
/// and a strong hold kept a swapped-out version (its compiled module, its instances, its
/// memory image) alive until the next event. A `Weak` keeps the allocation, so its
/// address cannot be reused by the new version and the comparison below stays sound.
pub(crate) async fn run_on_current(
    live: &Live,
    permit_version: Weak<Handler>,
    permit: OwnedSemaphorePermit,
) -> anyhow::Result<(Arc<Handler>, OwnedSemaphorePermit)> {
    let handler = live.current();
    if std::ptr::eq(permit_version.as_ptr(), Arc::as_ptr(&handler)) {
        return Ok((handler, permit));
    }
    drop(permit);
    let permit = permit_of(&handler).await?;
    Ok((handler, permit))
}

/// `version`, from now on held only weakly (see [`run_on_current`]). By value, so the
/// strong reference goes: shadowing it with its downgrade would keep it to the end of the
/// scope.
pub(crate) fn hold_weakly(version: Arc<Handler>) -> Weak<Handler> {
    Arc::downgrade(&version)
}

/// One of `handler`'s `max_in_flight` permits, waiting for it. Cancel-safe.
async fn permit_of(handler: &Handler) -> anyhow::Result<OwnedSemaphorePermit> {
    handler
        .permits
        .clone()
        .acquire_owned()
        .await
        .context("handler permits closed")
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
pub async fn subscription_loop(
    live: Arc<Live>,
    pattern: Pattern,
    queue: String,
    mut sub: Subscription,
    stop: CancellationToken,
    unsubscribed: tokio::sync::watch::Sender<bool>,
    tracker: TaskTracker,
) -> anyhow::Result<()> {
    loop {
        // All selects are cancel-safe: a semaphore acquire, a notification and a channel
        // receive lose nothing when dropped.
        let Some((permit_version, permit)) = permit_of_current(&live, &stop).await? else {
            break;
        };
        // Weakly while waiting (see `run_on_current`).
        let permit_version = hold_weakly(permit_version);
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
        let (handler, permit) = run_on_current(&live, permit_version, permit).await?;
        // Under load more events are already waiting: take them into the same task.
        let mut batch = vec![(message, permit)];
        fill_batch(&handler, &mut batch, || match sub.next().now_or_never() {
            Some(Some(message)) => Some(message),
            // An ended subscription is noticed (and renewed) by the next `next`.
            _ => None,
        });
        spawn_events::<Core>(&live, handler, batch, &tracker);
    }
    let drained = sub.drain().await;
    // The broker routes nothing new here now; what it already did is run below.
    let _ = unsubscribed.send(true);
    if !drained {
        return Ok(());
    }
    while let Ok(Some(message)) = tokio::time::timeout(DRAIN_WAIT, sub.next()).await {
        let handler = live.current();
        let permit = permit_of(&handler).await?;
        spawn_events::<Core>(&live, handler, vec![(message, permit)], &tracker);
    }
    Ok(())
}

/// Most events one task takes at once. Why 16: a task per event cost more than the
/// guest call for a small handler (spawn, scheduling, a wakeup per event); 16 amortises
/// that, and with the default max_in_flight (64) still leaves work for every worker thread
/// of a small machine. The events of a batch run concurrently, not one after another, so
/// a handler that waits (a request, a slow broker) loses nothing to batching.
const MAX_BATCH: usize = 16;

/// Add to `batch`, up to [`MAX_BATCH`], each message `ready` has now, while a permit of
/// `handler` is free for it. Nothing waits: a missing permit, or `ready` having nothing
/// (`None`), ends the batch. A permit is taken before the message is read, so a message is
/// never read without one.
pub(crate) fn fill_batch<M>(
    handler: &Handler,
    batch: &mut Vec<(M, OwnedSemaphorePermit)>,
    mut ready: impl FnMut() -> Option<M>,
) {
    while batch.len() < MAX_BATCH {
        let Ok(permit) = handler.permits.clone().try_acquire_owned() else {
            break;
        };
        let Some(message) = ready() else {
            break;
        };
        batch.push((message, permit));
    }
}

/// How one intake runs one of its events, start to end, so both intakes share
/// [`spawn_events`].
pub(crate) trait RunEvent {
    /// What the intake reads from its broker.
    type Message: Send + 'static;

    /// Run `message` on `handler` (the version live when it was taken), releasing
    /// `permit` when it ends.
    fn run(
        live: &Live,
        handler: &Arc<Handler>,
        message: Self::Message,
        permit: OwnedSemaphorePermit,
    ) -> impl Future<Output = ()> + Send;
}

/// Run a batch of events on `handler` (the version live when they were taken),
/// concurrently, in one task; each permit is released when its own event ends.
pub(crate) fn spawn_events<R: RunEvent>(
    live: &Arc<Live>,
    handler: Arc<Handler>,
    batch: Vec<(R::Message, OwnedSemaphorePermit)>,
    tracker: &TaskTracker,
) {
    let live = live.clone();
    // join_all over a batch this small keeps the futures in one allocation and polls
    // them in place (FuturesUnordered allocated and copied each into a task of its own).
    tracker.spawn(async move {
        join_all(
            batch
                .into_iter()
                .map(|(message, permit)| R::run(&live, &handler, message, permit)),
        )
        .await;
    });
}

/// The core intake's events: dispatch, settle, answer a request.
struct Core;

impl RunEvent for Core {
    type Message = Message;

    // Not an `async fn` (which copies its arguments into locals on the first poll, so the
    // message was kept twice): the message becomes the event here, before the future is
    // made, and the future holds only the dispatch and what settling needs (720 → 312
    // bytes; every event's future is moved into its batch before it runs).
    #[allow(clippy::manual_async_fn)]
    fn run(
        live: &Live,
        handler: &Arc<Handler>,
        message: Message,
        permit: OwnedSemaphorePermit,
    ) -> impl Future<Output = ()> + Send {
        let delivery = Delivery {
            reply_to: message.reply.clone(),
            dedupe_prefix: None,
            hops: Delivery::hops_of(&message.headers),
        };
        let service_reply = if handler.spec.service {
            message.reply.clone()
        } else {
            None
        };
        let event = event_for(message, 1, new_event_id);
        // `then`, not an `async` block awaiting the dispatch: that would keep the dispatch
        // twice, once captured and once as what it awaits.
        dispatch(handler, event, delivery).then(move |(outcome, replied)| async move {
            live.settled(handler, &outcome);
            if let Some(reply_to) = &service_reply {
                // Its own statement, so the unboxed future is not kept across the await
                // (see `dispatch`).
                let answer = Box::pin(answer_request(handler, reply_to, &outcome, replied));
                answer.await;
            }
            drop(permit);
        })
    }
}

/// An id for an event whose publisher gave none: a UUIDv7, so ids sort by time.
///
/// From a per-thread context: `Uuid::now_v7` shares one behind a process-wide mutex that
/// every worker thread takes once per event. The mutex itself was small in the profile
/// (~0.3 % of a warm event's worker CPU, of ~2 % for the whole id: clock, random bits,
/// formatting), but it is a lock on the event path that nothing needs. Ids from one
/// thread still sort strictly; across threads, to the millisecond.
fn new_event_id() -> EventId {
    use uuid::timestamp::context::{ContextV7, ThreadLocalContext};
    thread_local! {
        static CONTEXT: ContextV7 = const { ContextV7::new() };
    }
    let now = uuid::Timestamp::now(ThreadLocalContext::new(&CONTEXT));
    EventId::made(uuid::Uuid::new_v7(now))
}

/// The size of the future `R::run` returns, read off the function's type: every event's
/// future is written whole and moved into its batch before it runs, so its size is paid on
/// every event.
#[cfg(test)]
pub(crate) fn run_future_size<R: RunEvent>() -> usize {
    fn size<'a, M, F: Future>(
        _: impl Fn(&'a Live, &'a Arc<Handler>, M, OwnedSemaphorePermit) -> F,
    ) -> usize {
        size_of::<F>()
    }
    size(R::run)
}

#[cfg(test)]
mod tests {
    use super::{Core, new_event_id, run_future_size};

    #[test]
    fn a_core_events_future_stays_small() {
        // It was 720 bytes, with the message kept twice (an `async fn`'s arguments and
        // their copies) and the dispatch twice (captured, and as what it awaited); now
        // ~310. The bound leaves room for compiler versions, not for those to come back.
        let size = run_future_size::<Core>();
        assert!(size <= 448, "a core event's future is {size} bytes");
    }

    #[test]
    fn event_ids_are_uuid_v7_and_sort_in_the_order_made() {
        let ids: Vec<String> = (0..10_000).map(|_| new_event_id().to_string()).collect();
        for id in &ids {
            let uuid = uuid::Uuid::parse_str(id).unwrap();
            assert_eq!(uuid.get_version(), Some(uuid::Version::SortRand), "{id}");
            assert_eq!(id, &uuid.hyphenated().to_string(), "canonical form");
        }
        // Made on one thread, faster than the clock ticks: the counter keeps them apart
        // and in order.
        assert!(ids.windows(2).all(|w| w[0] < w[1]), "ids out of order");
    }
}

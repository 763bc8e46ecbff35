//! Core intake: one task per (handler, subject) that takes a permit, then a message, and
//! runs it on the handler's live version. JetStream intake is in [`crate::jetstream`].

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio::sync::OwnedSemaphorePermit;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::broker::{Message, Subscription};
use crate::dispatch::{answer_request, dispatch, event_for};
use crate::handler::Handler;
use crate::live::Live;
use crate::publish::Delivery;
use crate::subject::Pattern;

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
pub async fn subscription_loop(
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
    message: Message,
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

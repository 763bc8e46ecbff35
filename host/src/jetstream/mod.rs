//! JetStream intake: a durable pull consumer per handler. This module pulls (one
//! continuous pull per version, permits before reads, what was fetched ahead handed back on
//! a stop); `settle` runs each event and turns the guest's answer into ack, nak or
//! dead-letter; `given_up` dead-letters what JetStream stopped delivering unsettled.

mod given_up;
mod settle;

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::AckKind;
use async_nats::jetstream::consumer::PullConsumer;
use async_nats::jetstream::consumer::pull::{self, MessagesErrorKind};
use futures::{FutureExt as _, StreamExt};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::broker::Broker;
use crate::handler::Handler;
use crate::intake::{fill_batch, hold_weakly, permit_of_current, run_on_current, spawn_events};
use crate::limits;
use crate::live::Live;
pub use given_up::dead_letter_given_up;
use settle::JetStream;
pub use settle::dead_letter_headers;

/// Pause after a failed pull (server restarting, consumer being recreated) before the
/// next. Why 1 s: quick recovery without spinning on a server that is down.
const PULL_RETRY: Duration = Duration::from_secs(1);

/// Pull from `consumer` for `handler` until `token` is cancelled.
///
/// One continuous pull (async-nats's `messages()` stream: one subscription, the next pull
/// request sent while half of the last is still unread), and a permit taken before each
/// message is read from it, so at most `max_in_flight` events run. What JetStream sent
/// ahead waits in the client, at most 1.5 × `pull_batch` messages; JetStream holds the
/// backlog. Stopped, it hands back what it holds (`hand_back`).
///
/// Why not a pull per batch of free permits (the first design): each was a subscription,
/// a request and an unsubscribe, and the next pull waited for the last to be delivered;
/// a handler freeing its permits one by one then pulled one message per round trip. On
/// the bench's stored-events run that was 25 k ev/s, against 160 k for a plain consumer
/// on the same server.
pub async fn consume(
    live: Arc<Live>,
    consumer: PullConsumer,
    token: CancellationToken,
    tracker: TaskTracker,
) -> anyhow::Result<()> {
    'pull: loop {
        // Shaped by the version live when the stream starts; a swap to a version that
        // pulls differently starts a new one (below). Held weakly: only to tell a swap,
        // never to keep a swapped-out version (its instances, its memory image) alive
        // for as long as the pull lasts.
        let (shape, mut shaped_by) = {
            let handler = live.current();
            (PullShape::of(&handler.spec), Arc::downgrade(&handler))
        };
        let messages = shape.open(&consumer).await;
        let mut messages = match messages {
            Ok(messages) => messages,
            Err(e) => {
                tracing::warn!(
                    handler = %live.current().spec.name,
                    "jetstream pull failed: {e}; retrying"
                );
                tokio::select! {
                    () = token.cancelled() => return Ok(()),
                    () = tokio::time::sleep(PULL_RETRY) => continue,
                }
            }
        };
        // What a batch read past its end: an error or the stream's end, handled as the next
        // read (below) is.
        let mut read_ahead = None;
        loop {
            // A permit of the version live now (a swap while waiting waits on the new
            // version's instead: the old one's may all be held by slow events); the message
            // runs on the version live once it is read, holding that version's permit. Both
            // waits are cancel-safe: a permit not taken and a message not yet read lose
            // nothing.
            let Some((current, permit)) = permit_of_current(&live, &token).await? else {
                break;
            };
            // The shape is the version's: looked at again only when the version changed.
            if !std::ptr::eq(shaped_by.as_ptr(), Arc::as_ptr(&current)) {
                let now = PullShape::of(&current.spec);
                if now != shape {
                    tracing::info!(
                        handler = %current.spec.name,
                        batch = now.batch,
                        was = shape.batch,
                        "the live version pulls differently; starting a new pull"
                    );
                    drop(permit);
                    hand_back(&current, messages, None).await;
                    continue 'pull;
                }
                shaped_by = Arc::downgrade(&current);
            }
            // Weakly while waiting for a message (see `run_on_current`).
            let current = hold_weakly(current);
            let next = match read_ahead.take() {
                Some(next) => next,
                None => tokio::select! {
                    biased;
                    () = token.cancelled() => break,
                    next = messages.next() => next,
                },
            };
            match next {
                Some(Ok(message)) => {
                    // Read under one version, to run on another that has no permit free:
                    // that wait ends with one of the new version's events, and a stop
                    // must not wait for it. The message goes back with the rest.
                    let on = tokio::select! {
                        biased;
                        () = token.cancelled() => None,
                        on = run_on_current(&live, current, permit) => Some(on?),
                    };
                    let Some((handler, permit)) = on else {
                        hand_back(&live.current(), messages, Some(message)).await;
                        return Ok(());
                    };
                    // Under load JetStream has sent more ahead: as the core intake does, take
                    // it into the same task. A task per message meant a spawn, a wake-up and
                    // a socket write of its own for each; a batch's acks and publishes leave
                    // together (bench/RESULTS.md: 0.29 → 0.13 socket writes per event).
                    let mut batch = vec![(message, permit)];
                    fill_batch(&handler, &mut batch, || {
                        match messages.next().now_or_never()? {
                            Some(Ok(message)) => Some(message),
                            next => {
                                read_ahead = Some(next);
                                None
                            }
                        }
                    });
                    spawn_events::<JetStream>(&live, handler, batch, &tracker);
                }
                // A missed heartbeat: the server has no pull of ours waiting (it sends
                // heartbeats while one waits) or is not answering, yet the client believes
                // one is out. Under load its count of messages still due drifts above the
                // server's (3 of ~85 runs of the bench's stored-events case on
                // 2026-12-03). The cause, seen in async-nats 0.51's trace log (0.52's pull
                // stream is the same code): the stream sends a pull from a task of its own
                // and adds the batch to its count only when that task reports back; a
                // message of the new batch read before then is counted off a count already
                // at 0, which saturates, so the count ends one too high for each. Past
                // half a batch too high, the client asks again only once its own timer
                // fires, `expires` + 5 s after its last pull. A new pull now (after two
                // missed heartbeats). Should the server still have the old one after all,
                // what it sends there comes back after `ack_wait`, as for any message that
                // was never acked.
                Some(Err(e)) if e.kind() == MessagesErrorKind::MissingHeartbeat => {
                    let current = live.current();
                    tracing::warn!(
                        handler = %current.spec.name,
                        "jetstream pull: {e}; starting a new pull"
                    );
                    current.metrics.pulls_restarted.inc();
                    drop(permit);
                    hand_back(&current, messages, None).await;
                    continue 'pull;
                }
                // The client reports a failed pull request and goes on pulling; what it
                // already holds stays readable. Only a stream that ended (`None`: consumer
                // deleted, limits exceeded) is started again.
                Some(Err(e)) => {
                    tracing::warn!(handler = %live.current().spec.name, "jetstream pull: {e}");
                    tokio::select! {
                        () = token.cancelled() => break,
                        () = tokio::time::sleep(PULL_RETRY) => {}
                    }
                }
                None => {
                    let current = live.current();
                    tracing::warn!(handler = %current.spec.name, "jetstream pull ended; pulling again");
                    current.metrics.pulls_restarted.inc();
                    tokio::select! {
                        () = token.cancelled() => break,
                        () = tokio::time::sleep(PULL_RETRY) => continue 'pull,
                    }
                }
            }
        }
        // Stopped (shutdown, or a reload that no longer wants this intake).
        hand_back(&live.current(), messages, None).await;
        return Ok(());
    }
}

/// Longest wait for the round trip before handing back. Why 1 s: a healthy server answers
/// in milliseconds; a stop must not hang on a broken connection (what is not handed back
/// comes back after its `ack_wait`).
const HAND_BACK_WAIT: Duration = Duration::from_secs(1);

/// Nak, without delay, what JetStream sent ahead that never ran (and `read`, a message
/// already read that did not run), so it is redelivered now (to the next version's
/// intake, or another host) instead of after its `ack_wait`.
///
/// First a round trip through the server
/// ([`crate::broker::nats::NatsBroker::round_trip`]): what it sent before answering is
/// then read off the socket (the connection task may not have got to it yet while guests
/// kept the workers busy; a stop under load found nothing to hand back when this was a
/// flush, which reads nothing). What a pull still has on the server's side comes back
/// after its `ack_wait`.
/// Then the stream is dropped (its subscription ends) before the naks go out, on the
/// same connection and so in that order: a nak'd message is redelivered at once, and the
/// server must not hand it to this pull again, whose inbox nobody reads any more.
pub(super) async fn hand_back(
    handler: &Handler,
    mut messages: async_nats::jetstream::consumer::pull::Stream,
    read: Option<async_nats::jetstream::Message>,
) {
    let name = &handler.spec.name;
    if let Broker::Nats(nats) = &handler.broker {
        match tokio::time::timeout(HAND_BACK_WAIT, nats.round_trip()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::debug!(handler = %name, "before handing back: {e:#}"),
            Err(_) => tracing::debug!(
                handler = %name,
                "before handing back: no round trip within {HAND_BACK_WAIT:?}; handing back what was read"
            ),
        }
    }
    let mut held = Vec::from_iter(read);
    while let Some(Some(Ok(message))) = messages.next().now_or_never() {
        held.push(message);
    }
    drop(messages);
    for message in &held {
        if let Err(e) = message.ack_with(AckKind::Nak(None)).await {
            tracing::debug!(handler = %name, "could not hand back a message fetched ahead: {e}");
        }
    }
    if !held.is_empty() {
        tracing::debug!(handler = %name, handed_back = held.len(), "handed back messages fetched ahead");
    }
}

/// How a version pulls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct PullShape {
    /// Messages asked for per pull: [`pull_batch`].
    batch: usize,
    /// How long a pull waits at the server. The client sends a pull of its own when none
    /// was sent for this + 5 s, read or not; no shorter than the deadline, so every permit
    /// frees within it and the reads, not that timer, send the pulls (what waits stays
    /// bounded).
    expires: Duration,
}

impl PullShape {
    fn of(spec: &crate::manifest::HandlerSpec) -> Self {
        let ack_wait = spec
            .jetstream
            .as_ref()
            .map_or(limits::DEFAULT_ACK_WAIT, |js| js.ack_wait);
        Self {
            batch: pull_batch(spec.max_in_flight, spec.deadline, ack_wait),
            expires: spec.deadline.max(limits::JETSTREAM_PULL_EXPIRES),
        }
    }

    /// A pull of this shape on `consumer`, with the host's idle heartbeat.
    async fn open(
        self,
        consumer: &PullConsumer,
    ) -> Result<pull::Stream, async_nats::jetstream::consumer::StreamError> {
        consumer
            .stream()
            .max_messages_per_batch(self.batch)
            .expires(self.expires)
            .heartbeat(limits::JETSTREAM_PULL_HEARTBEAT)
            .messages()
            .await
    }
}

/// Messages asked for per pull. A message that waits in the client has its `ack_wait`
/// running. At most 1.5 × batch wait, and at the slowest `max_in_flight` events end per
/// deadline, so the last waits about 1.5 × batch / max_in_flight deadlines; the batch is
/// `max_in_flight` unless that wait would pass half of `ack_wait`, then smaller (never 0).
/// With the defaults (30 s ack_wait, 5 s deadline) it is `max_in_flight`.
fn pull_batch(max_in_flight: u32, deadline: Duration, ack_wait: Duration) -> usize {
    let in_flight = u128::from(max_in_flight.max(1));
    // batch ≤ max_in_flight × ack_wait / (3 × deadline)
    let fits = in_flight * ack_wait.as_millis() / (3 * deadline.as_millis().max(1));
    usize::try_from(fits.clamp(1, in_flight)).unwrap_or(1)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::pull_batch;

    const S: fn(u64) -> Duration = Duration::from_secs;

    #[test]
    fn a_pull_asks_for_max_in_flight_when_the_wait_fits_in_half_the_ack_wait() {
        // The defaults: 30 s ack_wait, 5 s deadline.
        assert_eq!(pull_batch(16, S(5), S(30)), 16);
        assert_eq!(pull_batch(64, S(10), S(30)), 64);
    }

    #[test]
    fn a_pull_asks_for_fewer_when_the_deadline_is_long_against_the_ack_wait() {
        // A batch of 32 could wait 1.5 × 32 / 32 × 60 s = 90 s, past half the ack_wait
        // (15 s); 32 × 30 / 180 = 5 waits at most 1.5 × 5 / 32 × 60 s ≈ 14 s.
        assert_eq!(pull_batch(32, S(60), S(30)), 5);
        assert_eq!(pull_batch(16, S(30), S(30)), 5);
    }

    #[test]
    fn a_pull_always_asks_for_at_least_one() {
        assert_eq!(pull_batch(1, S(300), S(1)), 1);
        assert_eq!(pull_batch(0, S(5), S(30)), 1);
        assert_eq!(pull_batch(4, Duration::ZERO, S(30)), 4);
    }
}

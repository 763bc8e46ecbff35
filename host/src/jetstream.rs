//! JetStream intake: a durable pull consumer per handler, where the guest's answer drives
//! the broker. ok → ack; retry, trap, deadline, memory → nak with a delay (the guest's, or
//! the backoff ladder's next step); reject, or attempts used up → dead-letter, then
//! terminate so the message is never redelivered.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::AckKind;
use async_nats::jetstream::consumer::PullConsumer;
use async_nats::jetstream::consumer::pull::MessagesErrorKind;
use futures::{FutureExt as _, StreamExt};
use tokio::sync::OwnedSemaphorePermit;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::broker::nats::stored;
use crate::broker::{Broker, Outgoing};
use crate::dispatch::{Outcome, dispatch, event_for};
use crate::handler::Handler;
use crate::intake::{RunEvent, fill_batch, permit_of_current, run_on_current, spawn_events};
use crate::limits;
use crate::live::Live;
use crate::manifest::JetStreamSpec;
use crate::publish::{Delivery, MSG_ID};

/// Pause after a failed pull (server restarting, consumer being recreated) before the
/// next. Why 1 s: quick recovery without spinning on a server that is down.
const PULL_RETRY: Duration = Duration::from_secs(1);

/// Headers a dead letter carries, naming where it came from and why it died.
pub mod dead_letter_headers {
    pub const HANDLER: &str = "Wasmev-Handler";
    pub const SUBJECT: &str = "Wasmev-Subject";
    pub const STREAM: &str = "Wasmev-Stream";
    pub const STREAM_SEQ: &str = "Wasmev-Stream-Seq";
    pub const ATTEMPTS: &str = "Wasmev-Attempts";
    pub const ERROR: &str = "Wasmev-Error";
}

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
        // pulls differently starts a new one (below).
        let handler = live.current();
        let shape = PullShape::of(&handler.spec);
        let mut shaped_by = handler.clone();
        let messages = consumer
            .stream()
            .max_messages_per_batch(shape.batch)
            .expires(shape.expires)
            .heartbeat(limits::JETSTREAM_PULL_HEARTBEAT)
            .messages()
            .await;
        let mut messages = match messages {
            Ok(messages) => messages,
            Err(e) => {
                tracing::warn!(handler = %handler.spec.name, "jetstream pull failed: {e}; retrying");
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
            if !Arc::ptr_eq(&current, &shaped_by) {
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
                shaped_by = current.clone();
            }
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
                // 2026-12-03). The cause, seen in async-nats 0.51's trace log: the stream
                // sends a pull from a task of its own and adds the batch to its count only
                // when that task reports back; a message of the new batch read before
                // then is counted off a count already at 0, which saturates, so the count
                // ends one too high for each. Past half a batch too high, the client asks
                // again only once its own timer fires, `expires` + 5 s after its last
                // pull. A new pull now (after two missed heartbeats). Should the server
                // still have the old one after all, what it sends there comes back after
                // `ack_wait`, as for any message that was never acked.
                Some(Err(e)) if e.kind() == MessagesErrorKind::MissingHeartbeat => {
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
                    tracing::warn!(handler = %current.spec.name, "jetstream pull: {e}");
                    tokio::select! {
                        () = token.cancelled() => break,
                        () = tokio::time::sleep(PULL_RETRY) => {}
                    }
                }
                None => {
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
async fn hand_back(
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

/// The JetStream intake's events: run, ack or nak, then count the outcome.
struct JetStream;

impl RunEvent for JetStream {
    type Message = async_nats::jetstream::Message;

    // Every stream event's future is written whole and moved into its batch before it
    // runs, so it holds only what every event needs (1.3 KB; it was 4 KB): what few events
    // use is boxed where it is taken (dead-lettering, the in-progress timer), and the run
    // and settling are separate calls, so neither is kept beside the other. The message
    // is this future's and `handle` borrows it: not an `async fn`, which copies each
    // argument into a local of its own on its first poll and so kept the message twice.
    #[allow(clippy::manual_async_fn)]
    fn run(
        live: &Live,
        handler: &Arc<Handler>,
        message: Self::Message,
        permit: OwnedSemaphorePermit,
    ) -> impl Future<Output = ()> + Send {
        async move {
            if let Some(outcome) = handle(handler, &message).await {
                live.settled(handler, &outcome);
            }
            drop(permit);
        }
    }
}

/// Run one message and settle it; how the guest's run ended, if it ran.
async fn handle(
    handler: &Arc<Handler>,
    message: &async_nats::jetstream::Message,
) -> Option<Outcome> {
    let spec = handler.spec.jetstream.as_ref()?;
    let (stream, sequence, delivered) = match message.info() {
        Ok(info) => (
            info.stream,
            info.stream_sequence,
            u32::try_from(info.delivered).unwrap_or(u32::MAX),
        ),
        Err(e) => {
            // Not a JetStream delivery (no ack subject): nothing to ack either.
            tracing::warn!(handler = %handler.spec.name, "ignoring a message without jetstream info: {e}");
            return None;
        }
    };
    let (outcome, _) = {
        let run = std::pin::pin!(dispatch_stored(
            handler, message, stream, sequence, delivered
        ));
        run_with_progress(spec, message, run).await
    };
    settle(
        handler, spec, message, stream, sequence, delivered, &outcome,
    )
    .await;
    Some(outcome)
}

/// Dispatch a stream message: the event, its dedupe prefix and hop count made here, in a
/// plain function, so none of them is kept across an await of `handle`.
fn dispatch_stored<'a>(
    handler: &'a Arc<Handler>,
    message: &async_nats::jetstream::Message,
    stream: &str,
    sequence: u64,
    delivered: u32,
) -> impl Future<Output = (Outcome, bool)> + use<'a> {
    // Without its reply subject: that is JetStream's ack subject, not the publisher's.
    let base = stored(&message.message);
    let delivery = Delivery {
        reply_to: None,
        dedupe_prefix: Some(format!("{}:{stream}:{sequence}", handler.spec.name)),
        hops: Delivery::hops_of(&base.headers),
    };
    // Stable across redeliveries: the publisher's id, else the stream position. The
    // message moves into the event; the rare dead-letter converts it again.
    let event = event_for(base, delivered.max(1), || {
        format!("{stream}:{sequence}").into()
    });
    dispatch(handler, event, delivery)
}

/// Run `run` (a dispatch); while the guest runs, tell JetStream we are still working, so a
/// slow (but within deadline) handler is not redelivered to another host behind its back.
async fn run_with_progress(
    spec: &JetStreamSpec,
    message: &async_nats::jetstream::Message,
    mut run: Pin<&mut impl Future<Output = (Outcome, bool)>>,
) -> (Outcome, bool) {
    // A run that ends on its first poll (most do) never arms the timer. Arming one wakes
    // tokio's timer driver; the interval's immediate first tick did that for every event
    // (95 % of the JetStream path's wake-up syscalls).
    match futures::poll!(run.as_mut()) {
        std::task::Poll::Ready(finished) => finished,
        std::task::Poll::Pending => {
            // Boxed (see `JetStream::run`): only a run that waits needs the timer and the
            // in-progress ack's future (0.6 KB).
            let waiting = Box::pin(async {
                let every = spec.ack_wait / 3;
                let start = tokio::time::Instant::now() + every;
                let mut progress = tokio::time::interval_at(start, every);
                loop {
                    tokio::select! {
                        biased;
                        finished = &mut run => break finished,
                        _ = progress.tick() => {
                            if let Err(e) = message.ack_with(AckKind::Progress).await {
                                tracing::debug!("in-progress ack failed: {e}");
                            }
                        }
                    }
                }
            });
            waiting.await
        }
    }
}

/// Turn the guest's answer into ack, nak or dead-letter.
async fn settle(
    handler: &Handler,
    spec: &JetStreamSpec,
    message: &async_nats::jetstream::Message,
    stream: &str,
    sequence: u64,
    attempt: u32,
    outcome: &Outcome,
) {
    let name = &handler.spec.name;
    // The kind first, then one ack: settling's future keeps room for one ack's future
    // (0.6 KB), and none of the dead-letter's strings are kept across it.
    let kind = match outcome {
        Outcome::Ok => None,
        Outcome::Failed {
            reason,
            detail,
            retry_after,
        } => Some(if reason.is_permanent() || attempt >= spec.max_deliver {
            let why = if reason.is_permanent() {
                detail.clone()
            } else {
                format!("gave up after {attempt} attempt(s); last error: {detail}")
            };
            // Boxed (see `JetStream::run`): dead-lettering's future is 1.7 KB.
            let giving_up = Box::pin(give_up(
                handler, spec, message, stream, sequence, attempt, &why,
            ));
            giving_up.await
        } else {
            AckKind::Nak(Some(retry_after.unwrap_or_else(|| backoff(spec, attempt))))
        }),
    };
    let result = match kind {
        None => message.ack().await,
        Some(kind) => message.ack_with(kind).await,
    };
    if let Err(e) = result {
        // The server will redeliver after ack_wait: a duplicate, visible as attempt > 1.
        tracing::warn!(handler = %name, "could not settle stream sequence {sequence}: {e}");
    }
}

/// Dead-letter a message the handler gave up on: terminate it once it is safely
/// dead-lettered, or else nak it to be redelivered.
async fn give_up(
    handler: &Handler,
    spec: &JetStreamSpec,
    message: &async_nats::jetstream::Message,
    stream: &str,
    sequence: u64,
    attempt: u32,
    why: &str,
) -> AckKind {
    let base = stored(&message.message);
    match dead_letter(handler, spec, &base, stream, sequence, attempt, why).await {
        Ok(()) => AckKind::Term,
        Err(e) => {
            // Never terminate a message that is not safely dead-lettered.
            tracing::error!(
                handler = %handler.spec.name,
                dead_letter = %spec.dead_letter,
                "could not dead-letter stream sequence {sequence}: {e}; it will be redelivered"
            );
            AckKind::Nak(Some(backoff(spec, attempt)))
        }
    }
}

/// The delay before attempt `attempt + 1`.
fn backoff(spec: &JetStreamSpec, attempt: u32) -> Duration {
    let step = (attempt.max(1) - 1) as usize;
    spec.backoff
        .get(step)
        .or(spec.backoff.last())
        .copied()
        .unwrap_or(Duration::from_secs(1))
}

async fn dead_letter(
    handler: &Handler,
    spec: &JetStreamSpec,
    base: &crate::broker::Message,
    stream: &str,
    sequence: u64,
    attempts: u32,
    error: &str,
) -> Result<(), crate::broker::PublishError> {
    use dead_letter_headers as h;
    let error = crate::sandbox::sanitize(error.as_bytes(), limits::MAX_LOG_LINE);
    let mut headers: Vec<(String, String)> = base
        .headers
        .iter()
        .filter(|(k, _)| k != MSG_ID)
        .cloned()
        .collect();
    headers.extend([
        (h::HANDLER.into(), handler.spec.name.clone()),
        (h::SUBJECT.into(), base.subject.clone()),
        (h::STREAM.into(), stream.to_string()),
        (h::STREAM_SEQ.into(), sequence.to_string()),
        (h::ATTEMPTS.into(), attempts.to_string()),
        (h::ERROR.into(), error.clone()),
        // Dead-lettering the same message twice (a crash between publish and term) is
        // dropped by a dead-letter stream's duplicate window.
        (
            MSG_ID.into(),
            format!("dlq:{}:{stream}:{sequence}", handler.spec.name),
        ),
    ]);
    handler
        .broker
        .publish_durable(
            Outgoing::new(spec.dead_letter.clone(), base.payload.clone()).with_headers(headers),
        )
        .await?;
    handler.metrics.dead_lettered.inc();
    tracing::warn!(
        handler = %handler.spec.name,
        subject = %base.subject,
        sequence,
        attempts,
        dead_letter = %spec.dead_letter,
        "event dead-lettered: {error}"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use tokio::sync::OwnedSemaphorePermit;

    use super::{JetStream, pull_batch};
    use crate::handler::Handler;
    use crate::intake::RunEvent;
    use crate::live::Live;

    /// The size of the future `run` returns, read off the function's type.
    fn future_size<'a, F: Future>(
        _: impl Fn(
            &'a Live,
            &'a Arc<Handler>,
            async_nats::jetstream::Message,
            OwnedSemaphorePermit,
        ) -> F,
    ) -> usize {
        size_of::<F>()
    }

    #[test]
    fn a_stream_events_future_stays_small() {
        // Every stream event's future is written whole and moved into its batch before it
        // runs. It was 4 KB, for dead-lettering, the in-progress timer and copies of the
        // message that almost no event uses; now ~1.3 KB. The bound leaves room for
        // compiler versions, not for those to come back.
        let size = future_size(<JetStream as RunEvent>::run);
        assert!(size <= 2048, "a stream event's future is {size} bytes");
    }

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

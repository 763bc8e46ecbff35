//! Settling a stream event: the guest's answer drives the broker. ok → ack; retry, trap,
//! deadline, memory → nak with a delay (the guest's, or the backoff ladder's next step);
//! reject, or attempts used up → dead-letter, then terminate so the message is never
//! redelivered.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::AckKind;
use tokio::sync::OwnedSemaphorePermit;

use crate::broker::nats::stored;
use crate::broker::{Message, Outgoing};
use crate::dispatch::{Outcome, dispatch, event_for};
use crate::handler::Handler;
use crate::intake::RunEvent;
use crate::limits;
use crate::live::Live;
use crate::manifest::JetStreamSpec;
use crate::publish::{Delivery, MSG_ID, numbered};

/// Headers a dead letter carries, naming where it came from and why it died.
pub mod dead_letter_headers {
    pub const HANDLER: &str = "Wasmev-Handler";
    pub const SUBJECT: &str = "Wasmev-Subject";
    pub const STREAM: &str = "Wasmev-Stream";
    pub const STREAM_SEQ: &str = "Wasmev-Stream-Seq";
    pub const ATTEMPTS: &str = "Wasmev-Attempts";
    pub const ERROR: &str = "Wasmev-Error";
}

/// The JetStream intake's events: run, ack or nak, then count the outcome.
pub(super) struct JetStream;

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

/// A stream message being handled: whose it is, and where it sits in its stream.
struct StreamEvent<'a> {
    handler: &'a Arc<Handler>,
    spec: &'a JetStreamSpec,
    message: &'a async_nats::jetstream::Message,
    stream: &'a str,
    sequence: u64,
    /// This delivery's number, counted by JetStream from 1.
    attempt: u32,
}

/// Run one message and settle it; how the guest's run ended, if it ran.
async fn handle(
    handler: &Arc<Handler>,
    message: &async_nats::jetstream::Message,
) -> Option<Outcome> {
    let spec = handler.spec.jetstream.as_ref()?;
    let info = match message.info() {
        Ok(info) => info,
        Err(e) => {
            // Not a JetStream delivery (no ack subject): nothing to ack either.
            tracing::warn!(handler = %handler.spec.name, "ignoring a message without jetstream info: {e}");
            return None;
        }
    };
    let event = StreamEvent {
        handler,
        spec,
        message,
        stream: info.stream,
        sequence: info.stream_sequence,
        attempt: u32::try_from(info.delivered).unwrap_or(u32::MAX),
    };
    let (outcome, _) = {
        let run = std::pin::pin!(dispatch_stored(&event));
        run_with_progress(spec, message, run).await
    };
    settle(&event, &outcome).await;
    Some(outcome)
}

/// Dispatch a stream message: the event, its dedupe prefix and hop count made here, in a
/// plain function, so none of them is kept across an await of `handle`.
fn dispatch_stored<'a>(at: &StreamEvent<'a>) -> impl Future<Output = (Outcome, bool)> + use<'a> {
    let StreamEvent {
        handler,
        message,
        stream,
        sequence,
        attempt,
        ..
    } = *at;
    // Without its reply subject: that is JetStream's ack subject, not the publisher's.
    let base = stored(&message.message);
    let delivery = Delivery {
        reply_to: None,
        dedupe_prefix: Some(numbered(&[&handler.spec.name, stream], sequence)),
        hops: Delivery::hops_of(&base.headers),
    };
    // Stable across redeliveries: the publisher's id, else the stream position. The
    // message moves into the event; the rare dead-letter converts it again.
    let event = event_for(base, attempt.max(1), || {
        numbered(&[stream], sequence).into()
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
async fn settle(at: &StreamEvent<'_>, outcome: &Outcome) {
    let StreamEvent {
        handler,
        spec,
        message,
        sequence,
        attempt,
        ..
    } = *at;
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
            let giving_up = Box::pin(give_up(at, &why));
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
        tracing::warn!(handler = %handler.spec.name, "could not settle stream sequence {sequence}: {e}");
    }
}

/// Dead-letter a message the handler gave up on: terminate it once it is safely
/// dead-lettered, or else nak it to be redelivered.
async fn give_up(at: &StreamEvent<'_>, why: &str) -> AckKind {
    match dead_letter(at, why).await {
        Ok(()) => AckKind::Term,
        Err(e) => {
            // Never terminate a message that is not safely dead-lettered. On its last
            // delivery the nak makes JetStream give up on it, and its max-deliveries
            // advisory brings it to `given_up`, which tries the dead letter again.
            let then = if at.attempt >= at.spec.max_deliver {
                "this was its last delivery; it is tried again when JetStream reports giving up on it"
            } else {
                "it will be redelivered"
            };
            tracing::error!(
                handler = %at.handler.spec.name,
                dead_letter = %at.spec.dead_letter,
                "could not dead-letter stream sequence {}: {e}; {then}",
                at.sequence
            );
            AckKind::Nak(Some(backoff(at.spec, at.attempt)))
        }
    }
}

/// The delay before attempt `attempt + 1`: the ladder's step for `attempt`, its last step
/// past its end. The manifest never gives an empty ladder; 1 s should one come anyway.
fn backoff(spec: &JetStreamSpec, attempt: u32) -> Duration {
    step(&spec.backoff, attempt)
}

fn step(ladder: &[Duration], attempt: u32) -> Duration {
    let step = (attempt.max(1) - 1) as usize;
    ladder
        .get(step)
        .or(ladder.last())
        .copied()
        .unwrap_or(Duration::from_secs(1))
}

/// Publish the message to the handler's dead-letter subject, with headers saying where it
/// came from and why it died.
async fn dead_letter(at: &StreamEvent<'_>, error: &str) -> Result<(), crate::broker::PublishError> {
    let StreamEvent {
        handler,
        spec,
        message,
        stream,
        sequence,
        attempt,
    } = *at;
    let origin = Origin {
        handler,
        spec,
        stream,
        sequence,
        attempts: attempt,
    };
    send_dead_letter(&origin, Some(&stored(&message.message)), error).await
}

/// Where a dead letter's message sat, and how often it was delivered.
pub(super) struct Origin<'a> {
    pub handler: &'a Handler,
    pub spec: &'a JetStreamSpec,
    pub stream: &'a str,
    pub sequence: u64,
    pub attempts: u32,
}

/// Publish stream message `origin.sequence` to the handler's dead-letter subject, with
/// headers saying where it came from and why it died. `message` is `None` when it could
/// not be read: the letter then has an empty payload, and its headers say where the
/// message still is.
pub(super) async fn send_dead_letter(
    origin: &Origin<'_>,
    message: Option<&Message>,
    error: &str,
) -> Result<(), crate::broker::PublishError> {
    use dead_letter_headers as h;
    let Origin {
        handler,
        spec,
        stream,
        sequence,
        attempts,
    } = *origin;
    let error = crate::sandbox::sanitize(error.as_bytes(), limits::MAX_LOG_LINE);
    let mut headers: Vec<(String, String)> = message
        .map(|m| &m.headers[..])
        .unwrap_or_default()
        .iter()
        .filter(|(k, _)| k != MSG_ID)
        .cloned()
        .collect();
    headers.push((h::HANDLER.into(), handler.spec.name.clone()));
    if let Some(m) = message {
        headers.push((h::SUBJECT.into(), m.subject.clone()));
    }
    headers.extend([
        (h::STREAM.into(), stream.to_string()),
        (h::STREAM_SEQ.into(), sequence.to_string()),
        (h::ATTEMPTS.into(), attempts.to_string()),
        (h::ERROR.into(), error.clone()),
        // Dead-lettering the same message twice (a crash between publish and term, or a
        // last attempt that was dead-lettered but whose term was lost) is dropped by a
        // dead-letter stream's duplicate window.
        (
            MSG_ID.into(),
            format!("dlq:{}:{stream}:{sequence}", handler.spec.name),
        ),
    ]);
    let payload = message.map(|m| m.payload.clone()).unwrap_or_default();
    handler
        .broker
        .publish_durable(Outgoing::new(spec.dead_letter.clone(), payload).with_headers(headers))
        .await
        .inspect_err(|_| {
            handler.metrics.dead_letters_refused.inc();
        })?;
    handler.metrics.dead_lettered.inc();
    tracing::warn!(
        handler = %handler.spec.name,
        subject = message.map_or("(unread)", |m| m.subject.as_str()),
        stream,
        sequence,
        attempts,
        dead_letter = %spec.dead_letter,
        "event dead-lettered: {error}"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::{JetStream, step};
    use crate::intake::run_future_size;

    #[test]
    fn a_stream_events_future_stays_small() {
        // Every stream event's future is written whole and moved into its batch before it
        // runs. It was 4 KB, for dead-lettering, the in-progress timer and copies of the
        // message that almost no event uses; now ~1.3 KB. The bound leaves room for
        // compiler versions, not for those to come back.
        let size = run_future_size::<JetStream>();
        assert!(size <= 2048, "a stream event's future is {size} bytes");
    }

    const S: fn(u64) -> Duration = Duration::from_secs;

    #[test]
    fn attempt_n_waits_the_ladders_nth_step_and_then_its_last() {
        let ladder = [S(1), S(5), S(30)];
        assert_eq!(step(&ladder, 1), S(1));
        assert_eq!(step(&ladder, 2), S(5));
        assert_eq!(step(&ladder, 3), S(30));
        assert_eq!(step(&ladder, 4), S(30));
        assert_eq!(step(&ladder, u32::MAX), S(30));
        // Attempt 0 does not happen (JetStream counts deliveries from 1); it is the first.
        assert_eq!(step(&ladder, 0), S(1));
        assert_eq!(step(&[], 3), S(1));
    }
}

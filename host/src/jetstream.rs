//! JetStream intake: a durable pull consumer per handler, where the guest's answer drives
//! the broker. ok → ack; retry, trap, deadline, memory → nak with a delay (the guest's, or
//! the backoff ladder's next step); reject, or attempts used up → dead-letter, then
//! terminate so the message is never redelivered.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::AckKind;
use async_nats::jetstream::consumer::PullConsumer;
use futures::StreamExt;
use tokio::sync::OwnedSemaphorePermit;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::broker::nats::convert;
use crate::dispatch::{Outcome, dispatch, event_for};
use crate::handler::Handler;
use crate::limits;
use crate::live::Live;
use crate::manifest::JetStreamSpec;
use crate::publish::{Delivery, MSG_ID};

/// Most messages asked for in one pull. Why 256: a pull is one request/response; larger
/// batches buy nothing once the handler's permits are the limit.
const MAX_BATCH: usize = 256;

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
/// Only as many messages are asked for as the handler has free permits, so JetStream
/// holds the rest: nothing is fetched that cannot run, and nothing is shed.
pub async fn consume(
    live: Arc<Live>,
    consumer: PullConsumer,
    token: CancellationToken,
    tracker: TaskTracker,
) -> anyhow::Result<()> {
    loop {
        // Permits come from the version live at pull time; each message runs on the
        // version live when it is dispatched.
        let handler = live.current();
        let first = tokio::select! {
            biased;
            () = token.cancelled() => return Ok(()),
            permit = handler.permits.clone().acquire_owned() => permit?,
        };
        let mut permits = vec![first];
        while permits.len() < MAX_BATCH {
            match handler.permits.clone().try_acquire_owned() {
                Ok(p) => permits.push(p),
                Err(_) => break,
            }
        }
        let batch = consumer
            .batch()
            .max_messages(permits.len())
            .expires(limits::JETSTREAM_PULL_EXPIRES)
            .messages()
            .await;
        let mut batch = match batch {
            Ok(batch) => batch,
            Err(e) => {
                tracing::warn!(handler = %handler.spec.name, "jetstream pull failed: {e}; retrying");
                tokio::select! {
                    () = token.cancelled() => return Ok(()),
                    () = tokio::time::sleep(PULL_RETRY) => continue,
                }
            }
        };
        loop {
            // Cancel-safe: a message the client received but we never dispatched is not
            // acked, so JetStream redelivers it after ack_wait.
            let next = tokio::select! {
                biased;
                () = token.cancelled() => return Ok(()),
                next = batch.next() => next,
            };
            match next {
                None => break,
                Some(Err(e)) => {
                    tracing::warn!(handler = %handler.spec.name, "jetstream pull ended: {e}");
                    break;
                }
                Some(Ok(message)) => {
                    let Some(permit) = permits.pop() else {
                        // More than we asked for: leave it unacked for redelivery.
                        break;
                    };
                    let live = live.clone();
                    tracker.spawn(async move {
                        let handler = live.current();
                        if let Some(outcome) = handle(&handler, message, permit).await {
                            live.settled(&handler, &outcome);
                        }
                    });
                }
            }
        }
    }
}

/// Run one message and settle it; how the guest's run ended, if it ran.
async fn handle(
    handler: &Arc<Handler>,
    message: async_nats::jetstream::Message,
    _permit: OwnedSemaphorePermit,
) -> Option<Outcome> {
    let spec = handler.spec.jetstream.as_ref()?;
    let (stream, sequence, delivered) = match message.info() {
        Ok(info) => (
            info.stream.to_string(),
            info.stream_sequence,
            u32::try_from(info.delivered).unwrap_or(u32::MAX),
        ),
        Err(e) => {
            // Not a JetStream delivery (no ack subject): nothing to ack either.
            tracing::warn!(handler = %handler.spec.name, "ignoring a message without jetstream info: {e}");
            return None;
        }
    };
    let base = convert(&message.message);
    // Stable across redeliveries: the publisher's id, else the stream position.
    let mut event = event_for(base.clone(), delivered.max(1), || {
        format!("{stream}:{sequence}")
    });
    // The message's reply subject is JetStream's ack subject, not the publisher's.
    event.reply_to = None;
    let delivery = Delivery {
        reply_to: None,
        dedupe_prefix: Some(format!("{}:{stream}:{sequence}", handler.spec.name)),
        hops: Delivery::hops_of(&base.headers),
    };

    // While the guest runs, tell JetStream we are still working, so a slow (but within
    // deadline) handler is not redelivered to another host behind its back.
    let run = dispatch(handler, event, delivery);
    tokio::pin!(run);
    let mut progress = tokio::time::interval(spec.ack_wait / 3);
    progress.tick().await; // the first tick is immediate
    let (outcome, _) = loop {
        tokio::select! {
            finished = &mut run => break finished,
            _ = progress.tick() => {
                if let Err(e) = message.ack_with(AckKind::Progress).await {
                    tracing::debug!("in-progress ack failed: {e}");
                }
            }
        }
    };
    settle(
        handler, spec, &message, &base, &stream, sequence, delivered, &outcome,
    )
    .await;
    Some(outcome)
}

/// Turn the guest's answer into ack, nak or dead-letter.
#[allow(clippy::too_many_arguments)]
async fn settle(
    handler: &Handler,
    spec: &JetStreamSpec,
    message: &async_nats::jetstream::Message,
    base: &crate::broker::Message,
    stream: &str,
    sequence: u64,
    attempt: u32,
    outcome: &Outcome,
) {
    let name = &handler.spec.name;
    let result = match outcome {
        Outcome::Ok => message.ack().await,
        Outcome::Failed {
            reason,
            detail,
            retry_after,
        } => {
            if reason.is_permanent() || attempt >= spec.max_deliver {
                let why = if reason.is_permanent() {
                    detail.clone()
                } else {
                    format!("gave up after {attempt} attempt(s); last error: {detail}")
                };
                match dead_letter(handler, spec, base, stream, sequence, attempt, &why).await {
                    Ok(()) => message.ack_with(AckKind::Term).await,
                    Err(e) => {
                        // Never terminate a message that is not safely dead-lettered.
                        tracing::error!(
                            handler = %name,
                            dead_letter = %spec.dead_letter,
                            "could not dead-letter stream sequence {sequence}: {e}; it will be redelivered"
                        );
                        message
                            .ack_with(AckKind::Nak(Some(backoff(spec, attempt))))
                            .await
                    }
                }
            } else {
                let delay = retry_after.unwrap_or_else(|| backoff(spec, attempt));
                message.ack_with(AckKind::Nak(Some(delay))).await
            }
        }
    };
    if let Err(e) = result {
        // The server will redeliver after ack_wait: a duplicate, visible as attempt > 1.
        tracing::warn!(handler = %name, "could not settle stream sequence {sequence}: {e}");
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
        .publish_durable(&spec.dead_letter, &headers, base.payload.clone())
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

//! Messages JetStream gave up on without a host settling them, dead-lettered.
//!
//! A host dead-letters an event itself on its last attempt, so JetStream stops delivering
//! a message (and says so in a max-deliveries advisory) only when no attempt of it ended in
//! an ack or a dead letter: the host stopped or crashed mid-event each time, the dead
//! letter could not be published on the last one (it was nak'd instead), or the client
//! could not read the delivery at all. async-nats drops the connection on a header it
//! cannot parse (a name with a space, a value that is not UTF-8), and with it the messages
//! behind that one on the socket: each redelivery of such a message takes its neighbours
//! down again, until all of them have used their attempts. JetStream keeps them in the
//! stream, but its consumer never delivers them again; without this they would be gone
//! without a word.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::AckKind;
use async_nats::jetstream::consumer::PullConsumer;
use async_nats::jetstream::consumer::pull::MessagesErrorKind;
use futures::StreamExt;
use serde::Deserialize;
use tokio_util::sync::CancellationToken;

use super::PULL_RETRY;
use super::settle::{Origin, send_dead_letter};
use crate::broker::nats::NatsBroker;
use crate::handler::Handler;
use crate::limits;
use crate::live::Live;
use crate::manifest::JetStreamSpec;

/// The fields wasmev reads of JetStream's `io.nats.jetstream.advisory.v1.max_deliver`.
#[derive(Debug, Deserialize)]
struct MaxDeliveries {
    stream: String,
    stream_seq: u64,
    deliveries: u64,
}

/// How the advisories are pulled. Advisories are rare and each may take a while: none
/// waits in the client behind another.
const ADVISORY_PULL: super::PullShape = super::PullShape {
    batch: 1,
    expires: limits::JETSTREAM_PULL_EXPIRES,
};

/// Dead-letter each message JetStream reports it stopped delivering to the handler's
/// consumer (the advisories `advisories` reads, from [`NatsBroker::given_up_consumer`]),
/// until `token` (the intake's) is cancelled.
///
/// An advisory is acked once its letter went out. One whose letter was refused
/// (dead-letter stream full, broker away, no permission) is nak'd with a delay that
/// doubles with each refusal, and comes back to whichever host reads the advisories then:
/// after a reload that points dead letters at a stream with room, or a restart, it goes
/// there. Advisories behind it do not wait for it, and one a stopping host was working on
/// is handed back.
pub async fn dead_letter_given_up(
    live: Arc<Live>,
    nats: Arc<NatsBroker>,
    advisories: PullConsumer,
    token: CancellationToken,
) -> anyhow::Result<()> {
    'pull: loop {
        let messages = ADVISORY_PULL.open(&advisories).await;
        let mut messages = match messages {
            Ok(messages) => messages,
            Err(e) => {
                tracing::warn!(
                    handler = %live.current().spec.name,
                    "pulling max-deliveries advisories failed: {e}; retrying"
                );
                tokio::select! {
                    () = token.cancelled() => return Ok(()),
                    () = tokio::time::sleep(PULL_RETRY) => continue,
                }
            }
        };
        loop {
            let next = tokio::select! {
                biased;
                () = token.cancelled() => break,
                next = messages.next() => next,
            };
            // Errors and an ended stream as `consume` takes them (see there): a missed
            // heartbeat or an end needs a new pull; after another error the client goes on
            // pulling.
            match next {
                Some(Ok(advisory)) => {
                    if let Some(unsettled) = dead_letter_one(&live, &nats, advisory, &token).await {
                        super::hand_back(&live.current(), messages, Some(unsettled)).await;
                        return Ok(());
                    }
                }
                Some(Err(e)) if e.kind() == MessagesErrorKind::MissingHeartbeat => {
                    let handler = live.current();
                    tracing::warn!(
                        handler = %handler.spec.name,
                        "max-deliveries advisories: {e}; starting a new pull"
                    );
                    super::hand_back(&handler, messages, None).await;
                    continue 'pull;
                }
                Some(Err(e)) => {
                    tracing::warn!(handler = %live.current().spec.name, "max-deliveries advisories: {e}");
                    tokio::select! {
                        () = token.cancelled() => break,
                        () = tokio::time::sleep(PULL_RETRY) => {}
                    }
                }
                None => {
                    tracing::warn!(
                        handler = %live.current().spec.name,
                        "max-deliveries advisories: the pull ended; pulling again"
                    );
                    tokio::select! {
                        () = token.cancelled() => return Ok(()),
                        () = tokio::time::sleep(PULL_RETRY) => continue 'pull,
                    }
                }
            }
        }
        // Stopped (shutdown, or a reload that no longer wants this intake): what this host
        // holds goes back at once, for the next host, instead of after its ack_wait.
        super::hand_back(&live.current(), messages, None).await;
        return Ok(());
    }
}

/// Dead-letter the message `advisory` names, and settle the advisory: acked once the
/// letter went out, nak'd with [`retry_wait`] when it was refused. Returned unsettled, for
/// the caller to hand back, when `token` is cancelled first (or the handler no longer
/// reads JetStream).
async fn dead_letter_one(
    live: &Live,
    nats: &NatsBroker,
    advisory: async_nats::jetstream::Message,
    token: &CancellationToken,
) -> Option<async_nats::jetstream::Message> {
    // The live version: a reload may have pointed dead letters elsewhere (at a stream with
    // room) since this advisory was last refused.
    let handler = live.current();
    let Some(spec) = handler.spec.jetstream.as_ref() else {
        return Some(advisory);
    };
    let given_up = match serde_json::from_slice::<MaxDeliveries>(&advisory.payload) {
        Ok(given_up) => given_up,
        Err(e) => {
            tracing::warn!(
                handler = %handler.spec.name,
                "ignoring a max-deliveries advisory that does not parse: {e}"
            );
            settle_advisory(&handler, &advisory, AckKind::Term).await;
            return None;
        }
    };
    // How many times this advisory was read: more than once after a refusal, or when the
    // host reading it stopped before it settled it. Counted once per message given up.
    let reads = advisory.info().map_or(1, |info| info.delivered);
    if reads <= 1 {
        handler.metrics.given_up.inc();
    }
    let tried = tokio::select! {
        biased;
        () = token.cancelled() => return Some(advisory),
        tried = tokio::time::timeout(
            limits::GIVEN_UP_TRY,
            try_dead_letter(&handler, spec, nats, &given_up),
        ) => tried,
    };
    let refused = match tried {
        Ok(Ok(())) => {
            settle_advisory(&handler, &advisory, AckKind::Ack).await;
            return None;
        }
        Ok(Err(e)) => e.to_string(),
        Err(_) => format!(
            "no answer within {}",
            humantime::format_duration(limits::GIVEN_UP_TRY)
        ),
    };
    let wait = retry_wait(reads);
    let MaxDeliveries {
        stream, stream_seq, ..
    } = &given_up;
    tracing::error!(
        handler = %handler.spec.name,
        dead_letter = %spec.dead_letter,
        "could not dead-letter sequence {stream_seq} of stream {stream:?}, which JetStream gave \
         up on: {refused}; trying again in {}",
        humantime::format_duration(wait)
    );
    settle_advisory(&handler, &advisory, AckKind::Nak(Some(wait))).await;
    None
}

/// Ack, nak or term `advisory`. Should that not reach the server, the advisory comes back
/// after [`limits::GIVEN_UP_ACK_WAIT`]: a letter already sent may then be sent again.
async fn settle_advisory(
    handler: &Handler,
    advisory: &async_nats::jetstream::Message,
    kind: AckKind,
) {
    if let Err(e) = advisory.ack_with(kind).await {
        tracing::warn!(
            handler = %handler.spec.name,
            "could not settle a max-deliveries advisory ({e}); it comes back in {}",
            humantime::format_duration(limits::GIVEN_UP_ACK_WAIT)
        );
    }
}

/// A given-up letter's `Wasmev-Error`; `unread` is why the message could not be read back,
/// when it could not.
fn reason(given_up: &MaxDeliveries, unread: Option<&anyhow::Error>) -> String {
    let MaxDeliveries {
        stream,
        stream_seq,
        deliveries,
    } = given_up;
    let why = format!(
        "JetStream stopped delivering it after {deliveries} deliveries, none of them acked or \
         dead-lettered by a host (it stopped mid-event, the delivery was lost with its \
         connection, or the dead letter could not be published then)"
    );
    match unread {
        None => why,
        Some(e) => format!(
            "{why}; it could not be read back ({e}), so this letter has no payload: it is \
             still in stream {stream:?} at sequence {stream_seq}"
        ),
    }
}

/// The wait before a refused given-up letter is tried again: [`LETTER_RETRY_FIRST`] after
/// the first refusal (`reads` 1), doubling on each up to [`LETTER_RETRY_MAX`].
///
/// Why these: the advisory is kept until its letter goes out, so a letter refused here
/// (dead-letter stream full, broker away, no permission) is tried until then. What refuses
/// it is mended by a person (a purge, a reload pointing dead letters elsewhere) or a
/// restart, in seconds to hours; starting at 1 s and capping at 30 s sends the letter
/// within 30 s of that, and asks a refusing broker at most twice a minute meanwhile.
fn retry_wait(reads: i64) -> Duration {
    let doublings = u32::try_from(reads.saturating_sub(1).clamp(0, 5)).unwrap_or(5);
    (LETTER_RETRY_FIRST * 2u32.pow(doublings)).min(LETTER_RETRY_MAX)
}
const LETTER_RETRY_FIRST: Duration = Duration::from_secs(1);
const LETTER_RETRY_MAX: Duration = Duration::from_secs(30);

/// One try at dead-lettering what `given_up` names.
async fn try_dead_letter(
    handler: &Handler,
    spec: &JetStreamSpec,
    nats: &NatsBroker,
    given_up: &MaxDeliveries,
) -> Result<(), crate::broker::PublishError> {
    let MaxDeliveries {
        stream,
        stream_seq: sequence,
        deliveries,
    } = given_up;
    let origin = Origin {
        handler,
        spec,
        stream,
        sequence: *sequence,
        attempts: u32::try_from(*deliveries).unwrap_or(u32::MAX),
    };
    match nats.stored_message(stream, *sequence).await {
        Ok(message) => send_dead_letter(&origin, Some(&message), &reason(given_up, None)).await,
        Err(e) => send_dead_letter(&origin, None, &reason(given_up, Some(&e))).await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_advisory_parses_and_its_reasons_read_well() {
        // The advisory as nats-server 2.9 sends it (fields wasmev does not read included).
        let advisory = br#"{"type":"io.nats.jetstream.advisory.v1.max_deliver","id":"x",
            "timestamp":"2026-12-06T06:30:00Z","stream":"EVENTS","consumer":"chaos",
            "stream_seq":7,"deliveries":5}"#;
        let given_up: MaxDeliveries = serde_json::from_slice(advisory).unwrap();
        insta::assert_snapshot!(reason(&given_up, None), @"JetStream stopped delivering it after 5 deliveries, none of them acked or dead-lettered by a host (it stopped mid-event, the delivery was lost with its connection, or the dead letter could not be published then)");
        let unread = anyhow::anyhow!("failed to get last raw message: invalid header");
        insta::assert_snapshot!(reason(&given_up, Some(&unread)), @r#"JetStream stopped delivering it after 5 deliveries, none of them acked or dead-lettered by a host (it stopped mid-event, the delivery was lost with its connection, or the dead letter could not be published then); it could not be read back (failed to get last raw message: invalid header), so this letter has no payload: it is still in stream "EVENTS" at sequence 7"#);
    }

    #[test]
    fn a_refused_letter_is_tried_again_after_1_s_doubling_up_to_30_s() {
        let waits: Vec<u64> = (0..=8).map(|reads| retry_wait(reads).as_secs()).collect();
        assert_eq!(waits, [1, 1, 2, 4, 8, 16, 30, 30, 30]);
        assert_eq!(retry_wait(i64::MAX), LETTER_RETRY_MAX);
    }
}

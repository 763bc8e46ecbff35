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

use futures::StreamExt;
use serde::Deserialize;
use tokio_util::sync::CancellationToken;

use super::PULL_RETRY;
use super::settle::{Origin, send_dead_letter};
use crate::broker::nats::NatsBroker;
use crate::handler::Handler;
use crate::live::Live;
use crate::manifest::JetStreamSpec;

/// The fields wasmev reads of JetStream's `io.nats.jetstream.advisory.v1.max_deliver`.
#[derive(Debug, Deserialize)]
struct MaxDeliveries {
    stream: String,
    stream_seq: u64,
    deliveries: u64,
}

/// Dead-letter each message JetStream reports (on `advisories`, from
/// [`NatsBroker::max_deliveries_advisories`]) it stopped delivering to the handler's
/// consumer, until `token` (the intake's) is cancelled. A letter being retried then is
/// retried on until it goes out or `shutdown` (the host's) is cancelled: a reload that
/// replaces the intake, to point dead letters at a stream with room say, must not drop it.
pub async fn dead_letter_given_up(
    live: Arc<Live>,
    nats: Arc<NatsBroker>,
    mut advisories: async_nats::Subscriber,
    token: CancellationToken,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    loop {
        let advisory = tokio::select! {
            () = token.cancelled() => return Ok(()),
            advisory = advisories.next() => advisory,
        };
        if let Some(advisory) = advisory {
            match serde_json::from_slice::<MaxDeliveries>(&advisory.payload) {
                Ok(given_up) => dead_letter_one(&live, &nats, &given_up, &shutdown).await,
                Err(e) => tracing::warn!(
                    handler = %live.current().spec.name,
                    "ignoring a max-deliveries advisory that does not parse: {e}"
                ),
            }
            continue;
        }
        // Only a closed client ends a subscription; should one end anyway, subscribe again.
        let handler = live.current();
        let Some(spec) = handler.spec.jetstream.as_ref() else {
            return Ok(());
        };
        tracing::warn!(handler = %handler.spec.name, "max-deliveries advisories ended; subscribing again");
        loop {
            tokio::select! {
                () = token.cancelled() => return Ok(()),
                () = tokio::time::sleep(PULL_RETRY) => {}
            }
            match nats.max_deliveries_advisories(spec).await {
                Ok(again) => {
                    advisories = again;
                    break;
                }
                Err(e) => tracing::warn!(handler = %handler.spec.name, "{e:#}; retrying"),
            }
        }
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

/// The wait before a refused given-up letter is tried again, doubling on each refusal up to
/// [`LETTER_RETRY_MAX`].
///
/// Why these: the advisory comes once, so a letter refused here (dead-letter stream full,
/// broker away, no permission) is tried until it goes out or the host stops. What refuses
/// it is mended by a person (a purge, a reload pointing dead letters elsewhere) or a
/// restart, in seconds to hours; starting at 1 s and capping at 30 s sends the letter
/// within 30 s of that, and asks a refusing broker at most twice a minute meanwhile.
/// Advisories that come in the meantime wait in the subscription.
const LETTER_RETRY_FIRST: Duration = Duration::from_secs(1);
const LETTER_RETRY_MAX: Duration = Duration::from_secs(30);

/// Dead-letter stream message `given_up.stream_seq`, read back from the stream, or a
/// letter without its payload when it cannot be read (that is why it was never handled).
/// A refused letter is tried again (read and all) until it goes out or `shutdown` is
/// cancelled.
async fn dead_letter_one(
    live: &Live,
    nats: &NatsBroker,
    given_up: &MaxDeliveries,
    shutdown: &CancellationToken,
) {
    let handler = live.current();
    if handler.spec.jetstream.is_none() {
        return;
    }
    handler.metrics.given_up.inc();
    let MaxDeliveries {
        stream,
        stream_seq: sequence,
        ..
    } = given_up;
    let mut wait = LETTER_RETRY_FIRST;
    loop {
        // The live version each time: a reload while retrying may point dead letters
        // elsewhere (at a stream with room).
        let handler = live.current();
        let Some(spec) = handler.spec.jetstream.as_ref() else {
            return;
        };
        let Err(e) = try_dead_letter(&handler, spec, nats, given_up).await else {
            return;
        };
        tracing::error!(
            handler = %handler.spec.name,
            dead_letter = %spec.dead_letter,
            "could not dead-letter sequence {sequence} of stream {stream:?}, which JetStream gave \
             up on: {e}; trying again in {}",
            humantime::format_duration(wait)
        );
        tokio::select! {
            () = shutdown.cancelled() => {
                tracing::error!(
                    handler = %handler.spec.name,
                    "{}",
                    unsent_at_stop(given_up)
                );
                return;
            }
            () = tokio::time::sleep(wait) => {}
        }
        wait = (wait * 2).min(LETTER_RETRY_MAX);
    }
}

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

/// What the log says of a given-up message whose letter was still refused when the host
/// stopped.
fn unsent_at_stop(given_up: &MaxDeliveries) -> String {
    let MaxDeliveries {
        stream, stream_seq, ..
    } = given_up;
    format!(
        "stopping with the dead letter of sequence {stream_seq} of stream {stream:?} still \
         refused: JetStream will not deliver that message again, and it stays in the stream \
         unhandled"
    )
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
        insta::assert_snapshot!(unsent_at_stop(&given_up), @r#"stopping with the dead letter of sequence 7 of stream "EVENTS" still refused: JetStream will not deliver that message again, and it stays in the stream unhandled"#);
        insta::assert_snapshot!(reason(&given_up, Some(&unread)), @r#"JetStream stopped delivering it after 5 deliveries, none of them acked or dead-lettered by a host (it stopped mid-event, the delivery was lost with its connection, or the dead letter could not be published then); it could not be read back (failed to get last raw message: invalid header), so this letter has no payload: it is still in stream "EVENTS" at sequence 7"#);
    }
}

//! Running one event: a fresh store and instance from the handler's pre-instantiated
//! component, the call under deadline and memory limits, and what came of it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use wasmtime::{Store, Trap, UpdateDeadline};

use crate::broker::{Message, Outgoing};
use crate::deadline::timeout_if_waiting;
use crate::handler::Handler;
use crate::limits;
use crate::metrics::FailReason;
use crate::publish::{Delivery, SERVICE_ERROR, SERVICE_ERROR_CODE};
use crate::sandbox::bindings::wasmev::events::types::{self as wit, HandleError};
use crate::sandbox::{State, sanitize};
use crate::warm::{Warm, WarmPool};

/// Headers that carry a publisher-chosen event id, in order of preference.
const ID_HEADERS: [&str; 2] = ["Nats-Msg-Id", "Wasmev-Event-Id"];

/// What came of one event.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Ok,
    Failed {
        reason: FailReason,
        detail: String,
        /// For `retry`: the delay the guest asked for.
        retry_after: Option<Duration>,
    },
}

impl Outcome {
    fn failed(reason: FailReason, detail: impl Into<String>) -> Self {
        Outcome::Failed {
            reason,
            detail: detail.into(),
            retry_after: None,
        }
    }
}

/// An event's id: the one its publisher chose, or a UUIDv7 the host made for it, whose
/// 36 characters are kept inline. The core intake makes one for most events; as a
/// `String` that was a heap allocation on every one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EventId {
    Given(String),
    Made([u8; uuid::fmt::Hyphenated::LENGTH]),
}

impl EventId {
    /// `uuid`'s hyphenated, lower-case text.
    pub fn made(uuid: uuid::Uuid) -> Self {
        let mut text = [0; uuid::fmt::Hyphenated::LENGTH];
        uuid.hyphenated().encode_lower(&mut text);
        Self::Made(text)
    }

    /// The id as the guest and the logs see it.
    pub fn as_str(&self) -> &str {
        match self {
            Self::Given(id) => id,
            // ASCII hex digits and hyphens, as `encode_lower` wrote them: never the default.
            Self::Made(text) => std::str::from_utf8(text).unwrap_or_default(),
        }
    }
}

impl From<String> for EventId {
    fn from(id: String) -> Self {
        Self::Given(id)
    }
}

impl From<&str> for EventId {
    fn from(id: &str) -> Self {
        Self::Given(id.to_owned())
    }
}

impl std::fmt::Display for EventId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One event as the host holds it: the `event` record of the WIT, owned, its payload
/// shared with the message it came in. The guest's call borrows it ([`Event::record`]).
#[derive(Debug)]
pub struct Event {
    pub id: EventId,
    pub subject: String,
    pub payload: Bytes,
    pub headers: Vec<(String, String)>,
    pub reply_to: Option<String>,
    pub attempt: u32,
}

impl Event {
    /// The record `handle` is called with, borrowing from this event. `pairs` holds the
    /// header pairs as the record borrows them; it allocates only when there are headers.
    pub fn record<'a>(&'a self, pairs: &'a mut Vec<(&'a str, &'a str)>) -> wit::Event<'a> {
        pairs.extend(self.headers.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        wit::Event {
            id: self.id.as_str(),
            subject: &self.subject,
            payload: &self.payload,
            headers: pairs,
            reply_to: self.reply_to.as_deref(),
            attempt: self.attempt,
        }
    }
}

/// The id the publisher chose for its event, if any: its `Nats-Msg-Id` header, else its
/// `Wasmev-Event-Id`.
pub fn publisher_id(headers: &[(String, String)]) -> Option<String> {
    ID_HEADERS
        .iter()
        .find_map(|name| headers.iter().find(|(k, _)| k == name))
        .map(|(_, v)| v.clone())
}

/// The event a guest sees for `msg`; `fallback_id` names it when the publisher did not.
/// Takes the message: its strings and payload move into the event rather than being
/// copied (the core intake owns each message, and this is on every event's path).
pub fn event_for(msg: Message, attempt: u32, fallback_id: impl FnOnce() -> EventId) -> Event {
    let id = publisher_id(&msg.headers).map_or_else(fallback_id, EventId::Given);
    Event {
        id,
        subject: msg.subject,
        payload: msg.payload,
        headers: msg.headers,
        reply_to: msg.reply,
        attempt,
    }
}

/// Run `event` through `handler` (in a fresh instance, or a warm one of its pool with
/// `instances = "reuse"`); record metrics and log the result.
/// Returns the outcome and whether the guest answered the event's request itself.
///
/// Not an `async fn`: one copies its arguments into locals of its own on the first poll,
/// so its future kept the event and the delivery twice. An `async move` block uses what it
/// captured in place (416 → 256 bytes, in every intake's per-event future).
#[allow(clippy::manual_async_fn)]
pub fn dispatch(
    handler: &Arc<Handler>,
    event: Event,
    delivery: Delivery,
) -> impl Future<Output = (Outcome, bool)> + Send + use<'_> {
    async move {
        let metrics = &handler.metrics;
        metrics.received.inc();
        let started = Instant::now();
        // Boxed: the call's future holds the store and instance (672 bytes); inline it made
        // every event task ~4 KB, copied on each spawn and first poll (memmove was ~5% of a
        // warm-instance event). Boxed in a statement of its own: a temporary lives to the
        // end of its statement, so `Box::pin(run(..)).await` kept room for the unboxed
        // future in this one across the await (the core intake's per-event future was 2256
        // bytes, then 672).
        let call = Box::pin(run(handler, &event, delivery, started));
        let (outcome, replied) = call.await;
        metrics.duration.observe(started.elapsed());
        match &outcome {
            Outcome::Ok => {
                metrics.ok.inc();
                tracing::debug!(handler = %handler.spec.name, subject = %event.subject, event_id = %event.id, "event handled");
            }
            Outcome::Failed { reason, detail, .. } => {
                metrics.failed(*reason).inc();
                tracing::warn!(
                    handler = %handler.spec.name,
                    subject = %event.subject,
                    event_id = %event.id,
                    reason = reason.as_str(),
                    "event failed: {detail}"
                );
            }
        }
        (outcome, replied)
    }
}

/// For a service handler: make sure the requester hears back exactly once. The guest's own
/// reply stands; otherwise an empty reply for ok, or an error reply naming the failure
/// (so a request to a handler that rejects fails fast instead of timing out).
pub async fn answer_request(handler: &Handler, reply_to: &str, outcome: &Outcome, replied: bool) {
    if replied {
        return;
    }
    let headers = match outcome {
        Outcome::Ok => Vec::new(),
        Outcome::Failed { reason, detail, .. } => vec![
            (SERVICE_ERROR.to_string(), detail.clone()),
            (
                SERVICE_ERROR_CODE.to_string(),
                if *reason == FailReason::reject {
                    "400"
                } else {
                    "500"
                }
                .to_string(),
            ),
        ],
    };
    let answer = Outgoing::new(reply_to, bytes::Bytes::new()).with_headers(headers);
    if let Err(e) = handler.broker.publish(answer).await {
        tracing::warn!(handler = %handler.spec.name, "could not answer a request: {e}");
    }
}

/// `started`: when dispatch began; the deadline counts from it (one clock read less per
/// event).
async fn run(
    handler: &Arc<Handler>,
    event: &Event,
    delivery: Delivery,
    started: Instant,
) -> (Outcome, bool) {
    let guards = &handler.spec.guards;
    // Refuse before an instance exists: these cannot succeed, and cost nothing to check.
    if event.payload.len() as u64 > guards.max_payload {
        return (
            Outcome::failed(
                FailReason::too_large,
                format!(
                    "event payload of {} bytes is larger than max_payload ({} bytes)",
                    event.payload.len(),
                    guards.max_payload
                ),
            ),
            false,
        );
    }
    if delivery.hops >= guards.max_hops {
        return (
            Outcome::failed(
                FailReason::hop_limit,
                format!(
                    "event has travelled {} handler hops (max_hops = {}); dropped to break a feedback loop",
                    delivery.hops, guards.max_hops
                ),
            ),
            false,
        );
    }
    let deadline = handler.spec.deadline;
    let deadline_at = started + deadline;
    let warm = handler.warm.as_ref().and_then(WarmPool::take);
    let (mut store, mut instance, uses) = match warm {
        Some(Warm {
            mut store,
            instance,
            uses,
        }) => {
            store
                .data_mut()
                .begin(&event.subject, delivery, deadline_at);
            (store, Some(instance), uses)
        }
        None => {
            let mut store = Store::new(
                handler.pre.engine(),
                State::new(
                    handler.core().clone(),
                    &event.subject,
                    delivery,
                    deadline_at,
                ),
            );
            store.limiter(|state| state);
            // Preemption: every epoch tick the guest yields to the executor, so a spinning
            // guest shares the worker threads; past the event's deadline (read from the
            // state, so a warm store keeps this one callback) it is interrupted.
            //
            // The yield is tokio's: it hands the task back only after the worker has polled
            // the I/O driver. wasmtime's own (`Yield`) wakes the task at once, so a worker
            // running a spinning guest polled it again at once and read the socket only
            // every 61 polls (tokio's `event_interval`), 61 ticks: with every worker in
            // such a guest, a new event waited ~600 ms to be read. One allocation per
            // 10 ms tick of guest CPU.
            store.epoch_deadline_callback(|store| {
                Ok(if Instant::now() >= store.data().deadline_at() {
                    UpdateDeadline::Interrupt
                } else {
                    UpdateDeadline::YieldCustom(1, Box::pin(tokio::task::yield_now()))
                })
            });
            (store, None, 0)
        }
    };
    store.set_hostcall_fuel(usize::try_from(guards.hostcall_fuel).unwrap_or(usize::MAX));
    // Only handlers with a budget run on an engine that counts fuel (the engine key
    // includes it). Asking a store without fuel for its fuel builds an error value (with
    // a backtrace under RUST_BACKTRACE=1): the profile found that on every event.
    if let Some(fuel) = guards.fuel
        && let Err(e) = store.set_fuel(fuel)
    {
        return (Outcome::failed(FailReason::host, format!("{e:#}")), false);
    }
    store.set_epoch_deadline(1);

    let call = async {
        let ready = match instance.take() {
            Some(warm) => warm,
            None => {
                // Boxed, in a statement of its own: instantiation's future is 1.2 KB, the
                // call's 0.3 KB; unboxed, every event's future (a warm one's too) had room
                // for it, and each event wrote that much fresh memory to start.
                let instantiating = Box::pin(handler.pre.instantiate_async(&mut store));
                instantiating.await?
            }
        };
        let mut pairs = Vec::new();
        let answer = ready
            .call_handle(&mut store, event.record(&mut pairs))
            .await?;
        Ok::<_, wasmtime::Error>((answer, ready))
    };
    // The epoch interrupt stops a guest that is computing; this timeout also stops one that
    // is waiting in a host call (a publish to a stalled broker). A little slack so a
    // computing guest is reported by the (more precise) epoch trap. Armed only once the
    // call has waited: most calls end on their first poll.
    // In a block of its own: the pinned call borrows the store and instance until it ends.
    let result = {
        let call = std::pin::pin!(call);
        timeout_if_waiting(call, || (deadline_at + limits::EPOCH_TICK * 2).into()).await
    };
    // Only an instance that returned an answer, within its limits, may serve again; one
    // that trapped, ran out of time or was refused memory is dropped with its store.
    let result = match result {
        Ok(Ok((answer, ready))) => {
            instance = Some(ready);
            Ok(Ok(answer))
        }
        Ok(Err(e)) => Ok(Err(e)),
        Err(elapsed) => Err(elapsed),
    };
    let answered = matches!(result, Ok(Ok(_)));

    let state = store.data();
    log_guest_output(handler, state);
    let outcome = match result {
        Err(_) => Outcome::failed(FailReason::deadline, deadline_text(deadline)),
        Ok(Ok(Ok(()))) => Outcome::Ok,
        Ok(Ok(Err(HandleError::Retry(ms)))) => Outcome::Failed {
            reason: FailReason::retry,
            detail: match ms {
                Some(ms) => format!("handler asked to retry in {ms}ms"),
                None => "handler asked to retry".into(),
            },
            retry_after: ms.map(|ms| Duration::from_millis(u64::from(ms))),
        },
        Ok(Ok(Err(HandleError::Reject(reason)))) => Outcome::failed(
            FailReason::reject,
            format!(
                "handler rejected the event: {}",
                sanitize(reason.as_bytes(), limits::MAX_LOG_LINE)
            ),
        ),
        Ok(Err(err)) => {
            if err.downcast_ref::<Trap>() == Some(&Trap::Interrupt) {
                Outcome::failed(FailReason::deadline, deadline_text(deadline))
            } else if err.downcast_ref::<Trap>() == Some(&Trap::OutOfFuel) {
                Outcome::failed(
                    FailReason::fuel,
                    format!(
                        "handler used up its fuel ({} units)",
                        guards.fuel.unwrap_or(u64::MAX)
                    ),
                )
            } else if state.memory_denied {
                Outcome::failed(
                    FailReason::memory,
                    format!(
                        "handler exceeded its memory limit of {}",
                        bytesize::ByteSize::b(handler.spec.memory).display().iec()
                    ),
                )
            } else {
                Outcome::failed(FailReason::trap, trap_text(&err))
            }
        }
    };
    let replied = state.replied;
    if let (Some(pool), Some(instance), true, false) =
        (&handler.warm, instance, answered, state.memory_denied)
    {
        pool.put(Warm {
            store,
            instance,
            uses: uses + 1,
        });
    }
    (outcome, replied)
}

fn deadline_text(deadline: Duration) -> String {
    format!(
        "handler exceeded its deadline of {}",
        humantime::format_duration(deadline)
    )
}

/// The trap's message and, when present, the innermost guest frames: enough to find the
/// bug without dumping a whole backtrace per event into the log.
fn trap_text(err: &wasmtime::Error) -> String {
    let mut text = String::from("handler trapped");
    for cause in err.chain() {
        let line = cause.to_string();
        let line = line.lines().take(4).collect::<Vec<_>>().join(" | ");
        text.push_str(": ");
        text.push_str(&line);
    }
    sanitize(text.as_bytes(), limits::MAX_LOG_LINE)
}

/// Forward what the guest printed to the log, line by line, tagged with the handler.
fn log_guest_output(handler: &Handler, state: &State) {
    for (stream, output) in state.output() {
        let (bytes, dropped) = output.take();
        for line in bytes[..]
            .split(|b: &u8| *b == b'\n')
            .filter(|l| !l.is_empty())
        {
            let line = sanitize(line, limits::MAX_LOG_LINE);
            tracing::info!(target: "guest", handler = %handler.spec.name, stream, "{line}");
        }
        if dropped > 0 {
            handler.metrics.output_dropped.inc_by(dropped);
            tracing::warn!(
                handler = %handler.spec.name,
                stream,
                dropped,
                "guest output over the {} byte cap was dropped",
                limits::GUEST_OUTPUT_CAP
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(headers: Vec<(String, String)>) -> Message {
        Message {
            subject: "user.created".into(),
            reply: Some("_INBOX.1".into()),
            headers,
            payload: Bytes::from_static(b"{\"id\":\"u1\"}"),
        }
    }

    #[test]
    fn the_guest_record_borrows_the_payload_the_message_brought() {
        let msg = message(Vec::new());
        let payload = msg.payload.as_ptr();
        let event = event_for(msg, 2, || "fallback".into());
        let mut pairs = Vec::new();
        let record = event.record(&mut pairs);
        assert_eq!(record.payload.as_ptr(), payload, "the payload was copied");
        assert_eq!(record.payload, b"{\"id\":\"u1\"}");
        assert_eq!(record.id, "fallback");
        assert_eq!(record.subject, "user.created");
        assert_eq!(record.reply_to, Some("_INBOX.1"));
        assert_eq!(record.attempt, 2);
        assert!(record.headers.is_empty());
    }

    #[test]
    fn the_guest_record_has_every_header_in_order_and_the_publisher_id() {
        let headers = vec![
            ("b".to_string(), "2".to_string()),
            ("Nats-Msg-Id".to_string(), "order-7".to_string()),
            ("b".to_string(), "1".to_string()),
        ];
        let event = event_for(message(headers), 1, || "fallback".into());
        let mut pairs = Vec::new();
        let record = event.record(&mut pairs);
        assert_eq!(record.id, "order-7");
        assert_eq!(
            record.headers,
            [("b", "2"), ("Nats-Msg-Id", "order-7"), ("b", "1")]
        );
    }
}

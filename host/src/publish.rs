//! The guest publish path: every check a guest publish, reply or request passes before it
//! reaches a broker.
//!
//! Order matters: the subject is validated before the grant is matched (so a malformed
//! subject is reported as such, not as "access denied"), and every check runs before any
//! byte reaches the shared connection, so a guest can never make the server close it.

use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::broker::{self, Broker, Outgoing, RequestError};
use crate::deadline::limit_if_waiting;
use crate::limits;
use crate::metrics::PublishResult;
use crate::sandbox::bindings::wasmev::events::types::{
    PublishError, RequestError as WitRequestError, Response,
};
use crate::subject::{Pattern, check_subject};

/// The header NATS JetStream deduplicates on.
pub const MSG_ID: &str = "Nats-Msg-Id";

/// How many handler hops the message has travelled. Set by the host on every guest
/// publish (a guest cannot reset it) to cut feedback loops.
pub const HOPS: &str = "Wasmev-Hops";

/// The header a responder sets on an error reply (the NATS micro-services convention).
pub const SERVICE_ERROR: &str = "Nats-Service-Error";
/// Its companion carrying a numeric code.
pub const SERVICE_ERROR_CODE: &str = "Nats-Service-Error-Code";

/// A refused or failed publish: the metric label and the error the guest sees.
pub type Refusal = (PublishResult, PublishError);

/// What one event may still publish: counts down from the handler's guards.
#[derive(Debug)]
pub struct Quota {
    publishes_left: u32,
    bytes_left: u64,
    /// Publishes made so far (the index in derived message ids).
    made: u32,
}

impl Quota {
    pub fn new(guards: &crate::manifest::Guards) -> Self {
        Self {
            publishes_left: guards.max_publishes,
            bytes_left: guards.max_publish_bytes,
            made: 0,
        }
    }

    /// The index the next publish taken gets (its place in derived message ids).
    fn next_index(&self) -> u32 {
        self.made
    }

    /// Take one publish of `bytes` from the quota, or refuse without taking anything.
    fn take(&mut self, bytes: usize) -> Result<(), Refusal> {
        let bytes = bytes as u64;
        if self.publishes_left == 0 || bytes > self.bytes_left {
            return Err((PublishResult::quota_exceeded, PublishError::QuotaExceeded));
        }
        self.publishes_left -= 1;
        self.bytes_left -= bytes;
        self.made += 1;
        Ok(())
    }
}

/// A handler's publish grant: the patterns from its manifest `publish` list.
#[derive(Debug, Clone)]
pub struct Grants(Vec<Pattern>);

impl Grants {
    pub fn new(patterns: Vec<Pattern>) -> Self {
        Self(patterns)
    }

    pub fn allows(&self, subject: &str) -> bool {
        self.0.iter().any(|p| p.matches(subject))
    }
}

/// `parts`, each followed by `:`, then `n`: the ids made for each event and each publish
/// of a stream's event (`handler:stream:sequence`, `<that>:<publish index>`). Made in one
/// allocation of the exact size: `format!` grew its string two or three times and went
/// through the formatting machinery, 5 % of the worker threads' samples on the bench's
/// JetStream run.
pub fn numbered(parts: &[&str], n: u64) -> String {
    let mut digits = itoa::Buffer::new();
    let digits = digits.format(n);
    let len = parts.iter().map(|p| p.len() + 1).sum::<usize>() + digits.len();
    let mut id = String::with_capacity(len);
    for part in parts {
        id.push_str(part);
        id.push(':');
    }
    id.push_str(digits);
    id
}

/// How the current event was delivered, as far as publishing cares.
#[derive(Debug, Clone, Default)]
pub struct Delivery {
    /// The subject to answer, when the event is a request.
    pub reply_to: Option<String>,
    /// For JetStream events, `handler:stream:sequence`: guest publishes carry
    /// `Nats-Msg-Id: <prefix>:<publish index>`, so a redelivered event publishes the same
    /// ids and a stream's duplicate window drops the repeats.
    pub dedupe_prefix: Option<String>,
    /// Handler hops the triggering event has travelled (its `Wasmev-Hops`, 0 if none).
    pub hops: u32,
}

impl Delivery {
    /// The hop count a message carries, 0 when absent or unreadable.
    pub fn hops_of(headers: &[(String, String)]) -> u32 {
        headers
            .iter()
            .find(|(k, _)| k == HOPS)
            .and_then(|(_, v)| v.trim().parse().ok())
            .unwrap_or(0)
    }

    /// A guest's message, stamped with our hop count (one more than the triggering
    /// event's) in place of any the guest set.
    fn outgoing(
        &self,
        subject: String,
        payload: Vec<u8>,
        mut headers: Vec<(String, String)>,
    ) -> Outgoing {
        headers.retain(|(k, _)| k != HOPS);
        Outgoing {
            subject,
            headers,
            hops: Some(self.hops.saturating_add(1)),
            msg_id: None,
            payload: Bytes::from(payload),
        }
    }
}

/// Everything but the grant: subject syntax and size against the broker's limit (headers
/// count, as they do for nats-server's `max_payload`). The quota is taken last, by the
/// caller, so a refused publish costs nothing.
fn check(broker: &Broker, message: &Outgoing) -> Result<usize, Refusal> {
    let subject = &message.subject;
    if let Err(e) = check_subject(subject) {
        return Err((
            PublishResult::invalid_subject,
            PublishError::InvalidSubject(format!("{subject:?}: {e}")),
        ));
    }
    let bytes = message.size();
    let max = broker.max_payload();
    if bytes > max {
        return Err((
            PublishResult::payload_too_large,
            PublishError::PayloadTooLarge(max as u64),
        ));
    }
    Ok(bytes)
}

fn granted(grants: &Grants, subject: &str) -> Result<(), Refusal> {
    if grants.allows(subject) {
        Ok(())
    } else {
        Err((
            PublishResult::access_denied,
            PublishError::AccessDenied(subject.to_string()),
        ))
    }
}

fn from_broker(e: broker::PublishError) -> Refusal {
    match e {
        broker::PublishError::InvalidHeader(name) => (
            PublishResult::invalid_header,
            PublishError::InvalidHeader(name),
        ),
        broker::PublishError::Unavailable(why) => {
            (PublishResult::unavailable, PublishError::Unavailable(why))
        }
    }
}

async fn send(broker: &Broker, durable: bool, message: Outgoing) -> Result<(), Refusal> {
    // The stream path's future is boxed inside `publish_durable`: this one stays the size
    // of a plain publish's.
    let publish = std::pin::pin!(async {
        if durable {
            broker.publish_durable(message).await
        } else {
            broker.publish(message).await
        }
    });
    // A publish almost always completes on its first poll (the client's queue has room).
    let sent = limit_if_waiting(publish, limits::PUBLISH_TIMEOUT).await;
    match sent {
        Ok(result) => result.map_err(from_broker),
        Err(_) => Err((
            PublishResult::unavailable,
            PublishError::Unavailable(format!(
                "broker did not take the message within {}s",
                limits::PUBLISH_TIMEOUT.as_secs()
            )),
        )),
    }
}

/// Check a guest publish against `grants`, `quota` and the broker's limits, then send it.
pub async fn guest_publish(
    broker: &Broker,
    grants: &Grants,
    delivery: &Delivery,
    quota: &mut Quota,
    subject: String,
    payload: Vec<u8>,
    headers: Vec<(String, String)>,
) -> Result<(), Refusal> {
    let mut message = delivery.outgoing(subject, payload, headers);
    // An event from a stream: its publishes carry a dedupe id, which counts toward the
    // broker's limit and the byte quota like any header, so it is set before either is
    // checked. Its index is the one the quota hands this publish if it takes it.
    if let Some(prefix) = &delivery.dedupe_prefix
        && !message.headers.iter().any(|(k, _)| k == MSG_ID)
    {
        message.msg_id = Some(numbered(&[prefix], quota.next_index().into()));
    }
    let bytes = check(broker, &message)?;
    granted(grants, &message.subject)?;
    quota.take(bytes)?;
    send(broker, delivery.dedupe_prefix.is_some(), message).await
}

/// Answer the current event's request. Needs no grant: the reply subject was chosen by
/// the requester for this one answer, and only the current event's is reachable.
pub async fn guest_reply(
    broker: &Broker,
    delivery: &Delivery,
    quota: &mut Quota,
    payload: Vec<u8>,
    headers: Vec<(String, String)>,
) -> Result<(), Refusal> {
    let Some(reply_to) = &delivery.reply_to else {
        return Err((
            PublishResult::access_denied,
            PublishError::AccessDenied("this event is not a request: it has no reply-to".into()),
        ));
    };
    let message = delivery.outgoing(reply_to.clone(), payload, headers);
    let bytes = check(broker, &message)?;
    quota.take(bytes)?;
    send(broker, false, message).await
}

/// Send a request on a granted subject and wait for the reply, no longer than the event's
/// own deadline.
#[allow(clippy::too_many_arguments)]
pub async fn guest_request(
    broker: &Broker,
    grants: &Grants,
    delivery: &Delivery,
    quota: &mut Quota,
    deadline_at: Instant,
    subject: String,
    payload: Vec<u8>,
    headers: Vec<(String, String)>,
    timeout_ms: u32,
) -> Result<Response, (PublishResult, WitRequestError)> {
    let refused = |(label, e): Refusal| (label, WitRequestError::Refused(e));
    let message = delivery.outgoing(subject, payload, headers);
    let bytes = check(broker, &message).map_err(refused)?;
    granted(grants, &message.subject).map_err(refused)?;
    quota.take(bytes).map_err(refused)?;
    let timeout = Duration::from_millis(u64::from(timeout_ms))
        .min(limits::MAX_REQUEST_TIMEOUT)
        .min(deadline_at.saturating_duration_since(Instant::now()));
    match broker.request(message, timeout).await {
        Ok(reply) => {
            if let Some((_, why)) = reply.headers.iter().find(|(k, _)| k == SERVICE_ERROR) {
                // The request went out fine (hence `ok`); the responder reported an error.
                return Err((
                    PublishResult::ok,
                    WitRequestError::ServiceError(why.clone()),
                ));
            }
            Ok(Response {
                payload: reply.payload.to_vec(),
                headers: reply.headers,
            })
        }
        Err(RequestError::NoResponders(_)) => {
            Err((PublishResult::ok, WitRequestError::NoResponders))
        }
        Err(RequestError::TimedOut(_)) => Err((PublishResult::ok, WitRequestError::TimedOut)),
        Err(RequestError::Publish(e)) => Err(refused(from_broker(e))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::memory::MemoryBroker;

    fn stream_event() -> Delivery {
        Delivery {
            reply_to: None,
            dedupe_prefix: Some("echo:EVENTS:7".to_string()),
            hops: 0,
        }
    }

    #[tokio::test]
    async fn a_stream_events_dedupe_id_counts_toward_the_payload_limit() {
        let broker = Broker::Memory(MemoryBroker::new());
        let grants = Grants::new(vec![Pattern::new("out.>").unwrap()]);
        let guards = crate::manifest::Guards {
            max_publish_bytes: 4 << 20,
            ..Default::default()
        };
        // Exactly at the limit without the id the host adds: the id must tip it over, and
        // the guest hear so as such (it was refused later, as `unavailable`, on NATS).
        let bare = Outgoing {
            hops: Some(1),
            ..Outgoing::new("out.x", Bytes::new())
        }
        .size();
        let payload = vec![b'x'; broker.max_payload() - bare];
        let mut quota = Quota::new(&guards);
        let refused = guest_publish(
            &broker,
            &grants,
            &stream_event(),
            &mut quota,
            "out.x".to_string(),
            payload,
            Vec::new(),
        )
        .await;
        assert!(
            matches!(refused, Err((PublishResult::payload_too_large, _))),
            "{refused:?}"
        );
        assert_eq!(quota.made, 0, "a refused publish takes nothing");
    }

    #[tokio::test]
    async fn a_stream_events_publishes_are_numbered_and_the_id_is_counted_in_the_quota() {
        let memory = MemoryBroker::new();
        let mut sub = memory.subscribe(Pattern::new("out.>").unwrap(), None);
        let broker = Broker::Memory(memory);
        let grants = Grants::new(vec![Pattern::new("out.>").unwrap()]);
        let mut quota = Quota::new(&crate::manifest::Guards::default());
        let bytes_before = quota.bytes_left;
        for _ in 0..2 {
            guest_publish(
                &broker,
                &grants,
                &stream_event(),
                &mut quota,
                "out.x".to_string(),
                b"hi".to_vec(),
                Vec::new(),
            )
            .await
            .unwrap();
        }
        assert_eq!(quota.made, 2);
        for index in 0..2 {
            let message = sub.next().await.unwrap();
            let id = message.headers.iter().find(|(k, _)| k == MSG_ID);
            assert_eq!(
                id.map(|(_, v)| v.as_str()),
                Some(format!("echo:EVENTS:7:{index}").as_str())
            );
        }
        // payload 2 + "Wasmev-Hops: 1\r\n" + "Nats-Msg-Id: echo:EVENTS:7:N\r\n", twice.
        let one = 2 + (HOPS.len() + 1 + 4) + (MSG_ID.len() + "echo:EVENTS:7:0".len() + 4);
        assert_eq!(bytes_before - quota.bytes_left, 2 * one as u64);
    }

    #[test]
    fn numbered_ids_match_format_and_are_allocated_exactly() {
        let cases: [(&[&str], u64); 4] = [
            (&["echo", "EVENTS"], 7),
            (&["échø", "流"], u64::MAX),
            (&["echo:EVENTS:7"], 0),
            (&[], 42),
        ];
        for (parts, n) in cases {
            let id = numbered(parts, n);
            let expected: String =
                parts.iter().map(|p| format!("{p}:")).collect::<String>() + &n.to_string();
            assert_eq!(id, expected);
            assert_eq!(id.capacity(), id.len(), "{id:?} grew or over-allocated");
        }
    }
}

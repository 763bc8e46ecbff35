//! The guest publish path: every check a guest publish, reply or request passes before it
//! reaches a broker.
//!
//! Order matters: the subject is validated before the grant is matched (so a malformed
//! subject is reported as such, not as "access denied"), and every check runs before any
//! byte reaches the shared connection, so a guest can never make the server close it.

use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::broker::{self, Broker, RequestError};
use crate::limits;
use crate::metrics::PublishResult;
use crate::sandbox::bindings::wasmev::events::types::{
    PublishError, RequestError as WitRequestError, Response,
};
use crate::subject::{Pattern, Subject};

/// The header NATS JetStream deduplicates on.
pub const MSG_ID: &str = "Nats-Msg-Id";

/// The header a responder sets on an error reply (the NATS micro-services convention).
pub const SERVICE_ERROR: &str = "Nats-Service-Error";
/// Its companion carrying a numeric code.
pub const SERVICE_ERROR_CODE: &str = "Nats-Service-Error-Code";

/// A refused or failed publish: the metric label and the error the guest sees.
pub type Refusal = (PublishResult, PublishError);

/// What one event has published so far; reset for every event.
#[derive(Debug, Default)]
pub struct Quota {
    pub publishes: u32,
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

/// How the current event was delivered, as far as publishing cares.
#[derive(Debug, Clone, Default)]
pub struct Delivery {
    /// The subject to answer, when the event is a request.
    pub reply_to: Option<String>,
    /// For JetStream events, `handler:stream:sequence`: guest publishes carry
    /// `Nats-Msg-Id: <prefix>:<publish index>`, so a redelivered event publishes the same
    /// ids and a stream's duplicate window drops the repeats.
    pub dedupe_prefix: Option<String>,
}

/// Everything but the grant: subject syntax, quota, and size (headers count, as they do
/// for nats-server's `max_payload`).
fn check(
    broker: &Broker,
    quota: &Quota,
    subject: &str,
    payload: &[u8],
    headers: &[(String, String)],
) -> Result<(), Refusal> {
    if let Err(e) = Subject::new(subject) {
        return Err((
            PublishResult::invalid_subject,
            PublishError::InvalidSubject(format!("{subject:?}: {e}")),
        ));
    }
    if quota.publishes >= limits::MAX_PUBLISHES_PER_EVENT {
        return Err((PublishResult::quota_exceeded, PublishError::QuotaExceeded));
    }
    let header_bytes: usize = headers.iter().map(|(k, v)| k.len() + v.len() + 4).sum();
    let max = broker.max_payload();
    if payload.len() + header_bytes > max {
        return Err((
            PublishResult::payload_too_large,
            PublishError::PayloadTooLarge(max as u64),
        ));
    }
    Ok(())
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

async fn send(
    broker: &Broker,
    durable: bool,
    subject: &str,
    headers: &[(String, String)],
    payload: Vec<u8>,
) -> Result<(), Refusal> {
    let payload = Bytes::from(payload);
    let sent = tokio::time::timeout(limits::PUBLISH_TIMEOUT, async {
        if durable {
            broker.publish_durable(subject, headers, payload).await
        } else {
            broker.publish(subject, headers, payload).await
        }
    })
    .await;
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
    mut headers: Vec<(String, String)>,
) -> Result<(), Refusal> {
    check(broker, quota, &subject, &payload, &headers)?;
    granted(grants, &subject)?;
    let index = quota.publishes;
    quota.publishes += 1;
    if let Some(prefix) = &delivery.dedupe_prefix
        && !headers.iter().any(|(k, _)| k == MSG_ID)
    {
        headers.push((MSG_ID.to_string(), format!("{prefix}:{index}")));
    }
    send(
        broker,
        delivery.dedupe_prefix.is_some(),
        &subject,
        &headers,
        payload,
    )
    .await
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
    check(broker, quota, reply_to, &payload, &headers)?;
    quota.publishes += 1;
    send(broker, false, reply_to, &headers, payload).await
}

/// Send a request on a granted subject and wait for the reply, no longer than the event's
/// own deadline.
#[allow(clippy::too_many_arguments)]
pub async fn guest_request(
    broker: &Broker,
    grants: &Grants,
    quota: &mut Quota,
    deadline_at: Instant,
    subject: String,
    payload: Vec<u8>,
    headers: Vec<(String, String)>,
    timeout_ms: u32,
) -> Result<Response, (PublishResult, WitRequestError)> {
    let refused = |(label, e): Refusal| (label, WitRequestError::Refused(e));
    check(broker, quota, &subject, &payload, &headers).map_err(refused)?;
    granted(grants, &subject).map_err(refused)?;
    quota.publishes += 1;
    let timeout = Duration::from_millis(u64::from(timeout_ms))
        .min(limits::MAX_REQUEST_TIMEOUT)
        .min(deadline_at.saturating_duration_since(Instant::now()));
    match broker
        .request(&subject, &headers, Bytes::from(payload), timeout)
        .await
    {
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

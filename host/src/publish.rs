//! The guest publish path: every check a guest publish passes before it reaches a broker.
//!
//! Order matters: the subject is validated before the grant is matched (so a malformed
//! subject is reported as such, not as "access denied"), and every check runs before any
//! byte reaches the shared connection, so a guest can never make the server close it.

use bytes::Bytes;

use crate::broker::{self, Broker};
use crate::limits;
use crate::metrics::PublishResult;
use crate::sandbox::bindings::wasmev::events::types::PublishError;
use crate::subject::{Pattern, Subject};

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

/// Check a guest publish against `grants`, `quota` and the broker's limits, then send it.
pub async fn guest_publish(
    broker: &Broker,
    grants: &Grants,
    quota: &mut Quota,
    subject: String,
    payload: Vec<u8>,
    headers: Vec<(String, String)>,
) -> Result<(), (PublishResult, PublishError)> {
    if let Err(e) = Subject::new(subject.as_str()) {
        return Err((
            PublishResult::invalid_subject,
            PublishError::InvalidSubject(format!("{subject:?}: {e}")),
        ));
    }
    if !grants.allows(&subject) {
        return Err((
            PublishResult::access_denied,
            PublishError::AccessDenied(subject),
        ));
    }
    if quota.publishes >= limits::MAX_PUBLISHES_PER_EVENT {
        return Err((PublishResult::quota_exceeded, PublishError::QuotaExceeded));
    }
    // NATS counts headers toward max_payload; so do we, so the server never sees an
    // oversized message and closes the connection every handler shares.
    let header_bytes: usize = headers.iter().map(|(k, v)| k.len() + v.len() + 4).sum();
    let max = broker.max_payload();
    if payload.len() + header_bytes > max {
        return Err((
            PublishResult::payload_too_large,
            PublishError::PayloadTooLarge(max as u64),
        ));
    }
    quota.publishes += 1;
    let sent = tokio::time::timeout(
        limits::PUBLISH_TIMEOUT,
        broker.publish(&subject, &headers, Bytes::from(payload)),
    )
    .await;
    match sent {
        Ok(Ok(())) => Ok(()),
        Ok(Err(broker::PublishError::InvalidHeader(name))) => Err((
            PublishResult::invalid_header,
            PublishError::InvalidHeader(name),
        )),
        Ok(Err(broker::PublishError::Unavailable(why))) => {
            Err((PublishResult::unavailable, PublishError::Unavailable(why)))
        }
        Err(_) => Err((
            PublishResult::unavailable,
            PublishError::Unavailable(format!(
                "broker did not take the message within {}s",
                limits::PUBLISH_TIMEOUT.as_secs()
            )),
        )),
    }
}

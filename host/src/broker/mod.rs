//! Brokers the host can run on: the embedded in-process broker (the default) and NATS.
//!
//! Both speak the same subject language (see [`crate::subject`]) and hand dispatch the
//! same [`Message`]. An enum rather than a trait object: there are exactly two, and the
//! publish path is hot.

pub mod memory;
pub mod nats;
pub mod refusals;

use bytes::Bytes;
use futures::future::Either;

use crate::publish::{HOPS, MSG_ID};
use crate::subject::Pattern;

/// A message as dispatch sees it, whichever broker it came from.
#[derive(Debug, Clone)]
pub struct Message {
    pub subject: String,
    pub reply: Option<String>,
    pub headers: Vec<(String, String)>,
    pub payload: Bytes,
}

/// A message on its way out, owned: the broker takes its subject and headers as they
/// are, rather than copying them from borrowed slices.
///
/// The hop count rides beside the headers, not in them: the NATS broker writes it
/// straight into the client's header map. Pushed onto the guest's header list as a pair
/// of strings, as it first was, it cost three allocations per guest publish (the list's
/// growth, the name, the number's text), and the subject's copy was a fourth.
#[derive(Debug, Clone)]
pub struct Outgoing {
    pub subject: String,
    /// Headers, not including the hop count.
    pub headers: Vec<(String, String)>,
    /// The `Wasmev-Hops` value to send; `None` sends none.
    pub hops: Option<u32>,
    /// A `Nats-Msg-Id` the host sets (JetStream's dedupe id for a guest publish), kept
    /// beside the headers like the hop count: the NATS broker writes it under async-nats's
    /// static name, so the name is never allocated. `None` sends none of the host's.
    pub msg_id: Option<String>,
    pub payload: Bytes,
}

impl Outgoing {
    /// A message without headers.
    pub fn new(subject: impl Into<String>, payload: Bytes) -> Self {
        Self {
            subject: subject.into(),
            headers: Vec::new(),
            hops: None,
            msg_id: None,
            payload,
        }
    }

    pub fn with_headers(mut self, headers: Vec<(String, String)>) -> Self {
        self.headers = headers;
        self
    }

    /// Bytes NATS counts toward `max_payload`: the payload and every header, the hop count
    /// and message id included, 4 bytes each for ": " and CRLF.
    pub fn size(&self) -> usize {
        let hops = self.hops.map_or(0, |n| HOPS.len() + decimal_digits(n) + 4);
        let msg_id = self
            .msg_id
            .as_ref()
            .map_or(0, |id| MSG_ID.len() + id.len() + 4);
        self.payload.len()
            + hops
            + msg_id
            + self
                .headers
                .iter()
                .map(|(k, v)| k.len() + v.len() + 4)
                .sum::<usize>()
    }
}

fn decimal_digits(n: u32) -> usize {
    n.checked_ilog10().map_or(1, |d| d as usize + 1)
}

/// Why a publish could not be handed to the broker.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error(
        "invalid header {0:?}: names must be printable ASCII without `:` or spaces, values must not contain line breaks"
    )]
    InvalidHeader(String),
    #[error("{0}")]
    Unavailable(String),
}

/// Why a request got no reply.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    #[error("no responders on {0:?}")]
    NoResponders(String),
    #[error("no reply within {0:?}")]
    TimedOut(std::time::Duration),
    #[error(transparent)]
    Publish(#[from] PublishError),
}

/// The broker a host is connected to.
#[derive(Clone)]
pub enum Broker {
    Memory(memory::MemoryBroker),
    // Boxed behind an Arc: the client and JetStream context are large, and every handler
    // holds a clone of the broker.
    Nats(std::sync::Arc<nats::NatsBroker>),
}

/// A live subscription. Dropping it unsubscribes.
pub enum Subscription {
    Memory(memory::MemorySubscription),
    Nats(nats::NatsSubscription),
}

impl Subscription {
    /// The next message, or `None` when the subscription has ended (broker closed).
    pub async fn next(&mut self) -> Option<Message> {
        match self {
            Subscription::Memory(s) => s.next().await,
            Subscription::Nats(s) => s.next().await,
        }
    }

    /// Unsubscribe, keeping what was already routed here: `next` yields the messages the
    /// broker sent before it processed the unsubscribe, then `None`. False when there is
    /// nothing left to read (the connection is gone).
    pub async fn drain(&mut self) -> bool {
        match self {
            Subscription::Memory(s) => {
                s.drain();
                true
            }
            Subscription::Nats(s) => s.drain().await,
        }
    }
}

impl Broker {
    /// Subscribe to `pattern`, optionally as a member of queue group `queue`.
    ///
    /// The subscription may not be active on the server yet when this returns; call
    /// [`Broker::confirm`] after the last subscribe.
    pub async fn subscribe(
        &self,
        pattern: &Pattern,
        queue: Option<&str>,
    ) -> anyhow::Result<Subscription> {
        Ok(match self {
            Broker::Memory(b) => Subscription::Memory(b.subscribe(pattern.clone(), queue)),
            Broker::Nats(b) => Subscription::Nats(b.subscribe(pattern, queue).await?),
        })
    }

    /// Wait until the broker has processed every subscribe made before this call.
    pub async fn confirm(&self) -> anyhow::Result<()> {
        match self {
            Broker::Memory(_) => Ok(()),
            Broker::Nats(b) => b.confirm().await,
        }
    }

    /// Publish a message. Returns once the broker has taken it (not once it is handled).
    pub async fn publish(&self, message: Outgoing) -> Result<(), PublishError> {
        match self {
            Broker::Memory(b) => b.send(message, None).await.map(|_| ()),
            Broker::Nats(b) => b.publish(message).await,
        }
    }

    /// Publish where losing the message would break at-least-once delivery: on NATS, when
    /// a stream captures `subject`, wait for the stream's acknowledgement (and let its
    /// duplicate window drop a `Nats-Msg-Id` it has seen); otherwise a plain publish.
    ///
    /// Not an `async fn`: the stream path's future is boxed, and only a publish that may
    /// need it pays for the box. It is the larger one (unboxed, every guest publish's
    /// future was 1824 bytes instead of 1384), and most of a stream event's publishes go
    /// to subjects the capture cache knows no stream captures; moving the future into its
    /// box for each of those was ~1 % of the worker threads' samples on the bench's
    /// JetStream run. An `async fn` would also keep `message` twice.
    pub fn publish_durable(
        &self,
        message: Outgoing,
    ) -> impl Future<Output = Result<(), PublishError>> + Send + '_ {
        match self {
            Broker::Nats(b) if b.may_capture(&message.subject) => {
                Either::Left(Box::pin(b.publish_durable(message)))
            }
            // Known uncaptured, or in process (no stream to acknowledge): a plain publish.
            _ => Either::Right(self.publish(message)),
        }
    }

    /// Send a request and wait up to `timeout` for the first reply.
    pub async fn request(
        &self,
        message: Outgoing,
        timeout: std::time::Duration,
    ) -> Result<Message, RequestError> {
        match self {
            Broker::Memory(b) => b.request(message, timeout).await,
            Broker::Nats(b) => b.request(message, timeout).await,
        }
    }

    /// The largest message the broker takes, in bytes.
    pub fn max_payload(&self) -> usize {
        match self {
            Broker::Memory(_) => crate::limits::MAX_PUBLISH_PAYLOAD,
            Broker::Nats(b) => b.max_payload(),
        }
    }

    /// Whether the broker is connected right now.
    pub fn is_connected(&self) -> bool {
        match self {
            Broker::Memory(_) => true,
            Broker::Nats(b) => b.is_connected(),
        }
    }

    /// A short description for logs: "embedded" or the NATS URL.
    pub fn describe(&self) -> String {
        match self {
            Broker::Memory(_) => "embedded broker".into(),
            Broker::Nats(b) => format!("nats at {}", b.url()),
        }
    }
}

/// Header names and values as NATS accepts them; the embedded broker enforces the same
/// rules so a handler behaves identically on both.
pub fn validate_header(name: &str, value: &str) -> Result<(), PublishError> {
    let name_ok = !name.is_empty() && name.bytes().all(|b| b.is_ascii_graphic() && b != b':');
    let value_ok = !value.contains(['\r', '\n']);
    if name_ok && value_ok {
        Ok(())
    } else {
        Err(PublishError::InvalidHeader(name.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn size_counts_every_header_and_the_hop_count_as_nats_does() {
        let mut message = Outgoing::new("a", Bytes::from_static(b"12345"))
            .with_headers(vec![("K".to_string(), "vv".to_string())]);
        // payload 5 + "K: vv\r\n" 7
        assert_eq!(message.size(), 12);
        for (hops, digits) in [(0, 1), (9, 1), (10, 2), (255, 3), (u32::MAX, 10)] {
            message.hops = Some(hops);
            // + "Wasmev-Hops: <digits>\r\n"
            assert_eq!(
                message.size(),
                12 + HOPS.len() + digits + 4,
                "hops = {hops}"
            );
        }
    }
}

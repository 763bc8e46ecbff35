//! NATS core through async-nats: connect with credentials from the manifest, subscribe,
//! confirm subscriptions with a server round-trip, publish.
//!
//! Delivery on core NATS is at-most-once: a message published while the host is
//! disconnected, or dropped because a subscription's client-side buffer is full, is gone.
//! Both cases are logged and counted, never silent.

use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use async_nats::{ConnectOptions, HeaderMap, HeaderName, HeaderValue};
use bytes::Bytes;
use futures::StreamExt;

use super::{Message, PublishError, validate_header};
use crate::limits;
use crate::manifest::{Auth, BrokerSettings};
use crate::subject::Pattern;

/// How long a subscription confirmation may take. Why 10 s: a round-trip to a healthy
/// server takes milliseconds; ten seconds covers a busy one without hanging start-up.
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(10);

/// How long the first connection attempt may take before start-up fails.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Clone)]
pub struct NatsBroker {
    client: async_nats::Client,
    url: Arc<str>,
    /// Messages the client dropped because a subscription buffer was full.
    slow_consumer_drops: Arc<AtomicU64>,
}

pub struct NatsSubscription {
    inner: async_nats::Subscriber,
}

impl NatsSubscription {
    pub async fn next(&mut self) -> Option<Message> {
        let m = self.inner.next().await?;
        let headers = m
            .headers
            .map(|h| {
                h.iter()
                    .flat_map(|(k, vs)| {
                        vs.iter()
                            .map(move |v| (k.to_string(), v.as_str().to_string()))
                    })
                    .collect()
            })
            .unwrap_or_default();
        Some(Message {
            subject: m.subject.to_string(),
            reply: m.reply.map(|r| r.to_string()),
            headers,
            payload: m.payload,
        })
    }
}

impl NatsBroker {
    /// Connect to the broker the manifest names. Fails if the first attempt fails: a host
    /// that cannot reach its broker at start-up is misconfigured more often than unlucky.
    /// Later disconnects are retried forever by the client.
    pub async fn connect(settings: &BrokerSettings) -> anyhow::Result<Self> {
        let drops = Arc::new(AtomicU64::new(0));
        let mut options = match &settings.auth {
            Auth::None => ConnectOptions::new(),
            Auth::CredsFile(path) => ConnectOptions::with_credentials_file(path)
                .await
                .with_context(|| format!("failed to read NATS credentials {}", path.display()))?,
            Auth::Token(token) => ConnectOptions::with_token(token.clone()),
            Auth::UserPassword { user, password } => {
                ConnectOptions::with_user_and_password(user.clone(), password.clone())
            }
        };
        if let Some(ca) = &settings.tls_ca {
            options = options.add_root_certificates(ca.clone()).require_tls(true);
        }
        let url = settings.url.clone();
        let event_drops = drops.clone();
        let event_url = url.clone();
        options = options
            .name("wasmev")
            .connection_timeout(CONNECT_TIMEOUT)
            .subscription_capacity(64 * 1024)
            .event_callback(move |event| {
                let drops = event_drops.clone();
                let url = event_url.clone();
                async move {
                    match event {
                        async_nats::Event::Connected => tracing::info!(%url, "connected to nats"),
                        async_nats::Event::Disconnected => {
                            tracing::warn!(%url, "disconnected from nats; reconnecting")
                        }
                        async_nats::Event::SlowConsumer(sid) => {
                            drops.fetch_add(1, Ordering::Relaxed);
                            tracing::warn!(sid, "nats subscription buffer full: messages dropped")
                        }
                        other => tracing::warn!(%url, "nats: {other}"),
                    }
                }
            });
        let client = options
            .connect(url.as_str())
            .await
            .with_context(|| format!("failed to connect to nats at {url}"))?;
        Ok(Self {
            client,
            url: url.into(),
            slow_consumer_drops: drops,
        })
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    pub async fn subscribe(
        &self,
        pattern: &Pattern,
        queue: Option<&str>,
    ) -> anyhow::Result<NatsSubscription> {
        let subject = pattern.as_str().to_string();
        let inner = match queue {
            None => self.client.subscribe(subject).await,
            Some(q) => self.client.queue_subscribe(subject, q.to_string()).await,
        }
        .with_context(|| format!("failed to subscribe to {:?}", pattern.as_str()))?;
        Ok(NatsSubscription { inner })
    }

    /// Prove with a server round-trip that every earlier subscribe is active.
    ///
    /// async-nats's `flush()` only flushes the socket; it does not wait for the server.
    /// nats-server processes one connection's protocol in order, so once a message we
    /// publish to a fresh inbox comes back to us, every SUB sent before it is registered.
    pub async fn confirm(&self) -> anyhow::Result<()> {
        let inbox = self.client.new_inbox();
        let mut probe = self
            .client
            .subscribe(inbox.clone())
            .await
            .context("failed to subscribe the confirmation inbox")?;
        self.client
            .publish(inbox, Bytes::new())
            .await
            .context("failed to publish the confirmation probe")?;
        tokio::time::timeout(CONFIRM_TIMEOUT, probe.next())
            .await
            .with_context(|| {
                format!(
                    "nats at {} did not confirm subscriptions within {}s",
                    self.url,
                    CONFIRM_TIMEOUT.as_secs()
                )
            })?
            .context("nats connection closed while confirming subscriptions")?;
        Ok(())
    }

    pub async fn publish(
        &self,
        subject: &str,
        headers: &[(String, String)],
        payload: Bytes,
    ) -> Result<(), PublishError> {
        let result = if headers.is_empty() {
            self.client.publish(subject.to_string(), payload).await
        } else {
            let mut map = HeaderMap::new();
            for (k, v) in headers {
                validate_header(k, v)?;
                // Both parses re-check what validate_header checked; they cannot fail here,
                // but a failure must still be an error value and never a panic.
                let name =
                    HeaderName::from_str(k).map_err(|_| PublishError::InvalidHeader(k.clone()))?;
                let value =
                    HeaderValue::from_str(v).map_err(|_| PublishError::InvalidHeader(k.clone()))?;
                map.append(name, value);
            }
            self.client
                .publish_with_headers(subject.to_string(), map, payload)
                .await
        };
        result.map_err(|e| PublishError::Unavailable(e.to_string()))
    }

    /// The server's announced `max_payload`, capped by ours.
    pub fn max_payload(&self) -> usize {
        self.client.max_payload().min(limits::MAX_PUBLISH_PAYLOAD)
    }

    pub fn is_connected(&self) -> bool {
        self.client.connection_state() == async_nats::connection::State::Connected
    }

    /// Messages dropped by the client because a subscription buffer was full.
    pub fn slow_consumer_drops(&self) -> u64 {
        self.slow_consumer_drops.load(Ordering::Relaxed)
    }

    /// Flush buffered publishes before shutdown so nothing handlers published is lost.
    pub async fn flush(&self) -> anyhow::Result<()> {
        self.client.flush().await.context("failed to flush nats")
    }

    pub fn client(&self) -> &async_nats::Client {
        &self.client
    }
}

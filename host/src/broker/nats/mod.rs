//! NATS core through async-nats: connect with credentials from the manifest, subscribe,
//! confirm subscriptions with a server round-trip, publish and request. What the server
//! refuses the host's user ends the calls waiting on it at once (see
//! [`super::refusals`]). The JetStream side of the same connection (streams, durable
//! consumers, durable publishes) is in `streams`.
//!
//! Delivery on core NATS is at-most-once: a message published while the host is
//! disconnected, or dropped because a subscription's client-side buffer is full, is gone.
//! Both cases are logged and counted, never silent.

mod streams;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use anyhow::Context as _;
use async_nats::{ConnectOptions, HeaderMap, HeaderName, HeaderValue};
use bytes::Bytes;
use futures::StreamExt;

use super::refusals::{Refusal, Refusals};
use super::{Message, Outgoing, PublishError, RequestError, validate_header};
use crate::limits;
use crate::manifest::{Auth, BrokerSettings};
use crate::metrics::BrokerCounters;
use crate::publish::{HOPS, MSG_ID};
use crate::subject::Pattern;
use streams::CaptureCache;

/// How long a subscription confirmation may take. Why 10 s: a round-trip to a healthy
/// server takes milliseconds; ten seconds covers a busy one without hanging start-up.
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(10);

/// How long the first connection attempt may take before start-up fails.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Clone)]
pub struct NatsBroker {
    client: async_nats::Client,
    jetstream: async_nats::jetstream::Context,
    /// The JetStream API's subject prefix (`$JS.API` unless the manifest sets a domain):
    /// the calls that wait on the server name their subjects with it.
    jetstream_api: Arc<str>,
    url: Arc<str>,
    captured: Arc<CaptureCache>,
    /// What the server refused this host's user (see [`Refusals`]).
    refusals: Refusals,
    /// Whether a subscription or a JetStream consumer was made since the last
    /// [`NatsBroker::confirm`].
    intake_started: Arc<AtomicBool>,
}

pub struct NatsSubscription {
    inner: async_nats::Subscriber,
}

impl NatsSubscription {
    pub async fn next(&mut self) -> Option<Message> {
        self.inner.next().await.map(convert)
    }

    /// async-nats's drain: UNSUB then PING; the stream ends once the server's answer
    /// shows nothing more was routed here.
    /// False when the connection is gone, so there is nothing to wait for.
    pub async fn drain(&mut self) -> bool {
        match self.inner.drain().await {
            Ok(()) => true,
            Err(e) => {
                tracing::debug!("drain: {e}");
                false
            }
        }
    }
}

/// An async-nats message as dispatch sees it. Takes the message, so that its subject,
/// reply subject and payload move over instead of being copied: the client makes each
/// subject a buffer of its own, which `into_string` hands over as it is (a copy was an
/// allocation per event).
pub fn convert(m: async_nats::Message) -> Message {
    Message {
        subject: m.subject.into_string(),
        reply: m.reply.map(async_nats::Subject::into_string),
        headers: m.headers.as_ref().map(header_pairs).unwrap_or_default(),
        payload: m.payload,
    }
}

/// A JetStream delivery as dispatch sees it: [`convert`] without the reply subject,
/// which is the stream's ack subject (~80 bytes, not copied), not the publisher's. Borrows
/// the message, which the acks still need, so the subject is copied. `as_str().to_owned()`,
/// not `to_string()`: the latter goes through the formatting machinery.
pub fn stored(m: &async_nats::Message) -> Message {
    Message {
        subject: m.subject.as_str().to_owned(),
        reply: None,
        headers: m.headers.as_ref().map(header_pairs).unwrap_or_default(),
        payload: m.payload.clone(),
    }
}

fn header_pairs(h: &HeaderMap) -> Vec<(String, String)> {
    h.iter()
        .flat_map(|(k, vs)| {
            vs.iter()
                .map(move |v| (AsRef::<str>::as_ref(k).to_owned(), v.as_str().to_owned()))
        })
        .collect()
}

/// The hop header's name, on every guest publish: built once, not parsed each time.
const HOPS_NAME: HeaderName = HeaderName::from_static(HOPS);

/// An async-nats error as one `anyhow` error without a source: its text already ends with
/// its source's, so an error chain printed with `{:#}` said that twice ("failed to connect
/// to nats at …: IO error: Connection refused (os error 111): Connection refused (os error
/// 111)").
fn flat(e: impl std::fmt::Display) -> anyhow::Error {
    anyhow::anyhow!("{e}")
}

/// A failed connect as the user reads it: async-nats's text, with what to change in the
/// manifest where that text names only the check that failed.
fn connect_error(e: &async_nats::ConnectError, settings: &BrokerSettings) -> anyhow::Error {
    if e.kind() == async_nats::ConnectErrorKind::AuthorizationViolation {
        // The client's own text says "authorization violation" twice, and nothing more.
        return anyhow::anyhow!("{}", refused_credentials(&settings.auth));
    }
    match tls_hint(e, settings) {
        Some(hint) => anyhow::anyhow!("{e}: {hint}"),
        None => anyhow::anyhow!("{e}"),
    }
}

/// Why the server turned the host's connection away, for an authorization violation.
fn refused_credentials(auth: &Auth) -> String {
    let given = match auth {
        Auth::None => {
            return "the server requires credentials: set creds_file, token_env, \
                    nkey_seed_env, or user_env with password_env in [broker]"
                .to_string();
        }
        Auth::CredsFile(path) => format!("the credentials in creds_file {}", path.display()),
        Auth::Token(_) => "the token token_env holds".to_string(),
        Auth::UserPassword { user, .. } => {
            format!("user {user:?} with the password password_env holds")
        }
        Auth::NKey(_) => {
            "the nkey nkey_seed_env holds (the server lists users by public key)".to_string()
        }
    };
    format!("the server refused this host's credentials: {given}")
}

/// What to do about a TLS handshake that failed with `e`, given the TLS settings the host
/// connected with: rustls names the check that failed, not the manifest key that would
/// fix it. Read from rustls's own error, which async-nats passes on inside an I/O error.
fn tls_hint(e: &async_nats::ConnectError, settings: &BrokerSettings) -> Option<&'static str> {
    use async_nats::rustls::{AlertDescription, Error as Tls};
    let io = std::error::Error::source(e)?.downcast_ref::<std::io::Error>()?;
    match io.get_ref()?.downcast_ref::<Tls>()? {
        Tls::InvalidCertificate(_) => Some(if settings.tls_ca.is_some() {
            "the server's certificate did not verify against tls_ca; it must be signed by \
             that CA and name the host in the broker url"
        } else {
            "the server's certificate did not verify against the system's CAs; set tls_ca \
             to the CA that signed it"
        }),
        Tls::AlertReceived(
            AlertDescription::BadCertificate | AlertDescription::CertificateRequired,
        ) => Some(if settings.tls_client.is_some() {
            "the server refused tls_cert; it must be signed by a CA the server trusts (its \
             tls ca_file)"
        } else {
            "the server asks for a client certificate; set tls_cert and tls_key"
        }),
        _ => None,
    }
}

/// The client's header map for `message`, refusing (never panicking on) what NATS would
/// reject; `None` when it has no headers at all (a plain PUB is sent). Takes the message's
/// headers and message id: they move into the map.
fn header_map(message: &mut Outgoing) -> Result<Option<HeaderMap>, PublishError> {
    let hops = message.hops;
    let msg_id = message.msg_id.take();
    if message.headers.is_empty() && msg_id.is_none() {
        return Ok(hops.map(hops_only));
    }
    // From the same cached map as a publish without headers; the hop count is the host's,
    // so a pair of that name among `headers` (a guest's) is left out.
    let mut map = hops.map(hops_only).unwrap_or_default();
    for (k, v) in std::mem::take(&mut message.headers) {
        if hops.is_some() && k == HOPS {
            continue;
        }
        validate_header(&k, &v)?;
        // Moved in, not copied: the guest's strings were made for this message. The
        // client's parses re-check what validate_header checked and cannot fail here, but
        // a failure must still be an error value and never a panic.
        let value = HeaderValue::try_from(v).map_err(|_| PublishError::InvalidHeader(k.clone()))?;
        let name =
            HeaderName::try_from(k).map_err(|e| PublishError::InvalidHeader(e.to_string()))?;
        map.append(name, value);
    }
    if let Some(id) = msg_id {
        validate_header(MSG_ID, &id)?;
        let id =
            HeaderValue::try_from(id).map_err(|_| PublishError::InvalidHeader(MSG_ID.into()))?;
        map.insert(async_nats::header::NATS_MESSAGE_ID, id);
    }
    Ok(Some(map))
}

/// The header map of a publish whose only header is the hop count: what every guest
/// publish without headers of its own sends.
///
/// Cloned from a map built once per count a manifest can allow: a clone copies the map's
/// table as it is, where building one seeds a hasher, hashes the name and formats the
/// count each time (~77 against ~48 ns per map in a scratch loop, and a profile of
/// `instances = "reuse"` on NATS had building it at ~7 % of the worker threads' samples).
/// Both make the same 3 allocations, which are async-nats's `HeaderMap`'s. (Public for
/// the benchmarks' baseline, which stamps the header as the host does.)
pub fn hops_only(hops: u32) -> HeaderMap {
    static MAPS: LazyLock<Vec<HeaderMap>> =
        LazyLock::new(|| (0..=limits::MAX_HOPS_CAP).map(build_hops_only).collect());
    match usize::try_from(hops).ok().and_then(|i| MAPS.get(i)) {
        Some(map) => map.clone(),
        None => build_hops_only(hops),
    }
}

fn build_hops_only(hops: u32) -> HeaderMap {
    let mut map = HeaderMap::new();
    map.insert(HOPS_NAME, HeaderValue::from(hops));
    map
}

impl NatsBroker {
    /// Connect to the broker the manifest names. Fails if the first attempt fails: a host
    /// that cannot reach its broker at start-up is misconfigured more often than unlucky.
    /// Later disconnects are retried forever by the client; `counters` count them, and the
    /// messages the client drops for a full subscription buffer (it says so only through
    /// its event callback).
    pub async fn connect(
        settings: &BrokerSettings,
        counters: BrokerCounters,
    ) -> anyhow::Result<Self> {
        let mut options = match &settings.auth {
            Auth::None => ConnectOptions::new(),
            Auth::CredsFile(path) => ConnectOptions::with_credentials_file(path)
                .await
                .with_context(|| format!("failed to read NATS credentials {}", path.display()))?,
            Auth::Token(token) => ConnectOptions::with_token(token.clone()),
            Auth::UserPassword { user, password } => {
                ConnectOptions::with_user_and_password(user.clone(), password.clone())
            }
            Auth::NKey(seed) => ConnectOptions::with_nkey(seed.clone()),
        };
        if let Some(ca) = &settings.tls_ca {
            options = options.add_root_certificates(ca.clone()).require_tls(true);
        }
        if let Some(client) = &settings.tls_client {
            options = options
                .add_client_certificate(client.cert.clone(), client.key.clone())
                .require_tls(true);
        }
        let url = settings.url.clone();
        let event_url = url.clone();
        let refusals = Refusals::new(&settings.jetstream_api, &settings.inbox_prefix);
        let told = refusals.clone();
        options = options
            .name("wasmev")
            .custom_inbox_prefix(&settings.inbox_prefix)
            .connection_timeout(CONNECT_TIMEOUT)
            .subscription_capacity(64 * 1024)
            .event_callback(move |event| {
                let counters = counters.clone();
                let url = event_url.clone();
                let told = told.clone();
                async move {
                    if let async_nats::Event::ServerError(async_nats::ServerError::Other(text)) =
                        &event
                        && let Some(refusal) = told.read(text)
                    {
                        counters.refused.inc();
                        tracing::warn!(%url, "{refusal}");
                        told.tell(refusal);
                        return;
                    }
                    match event {
                        async_nats::Event::Connected => tracing::info!(%url, "connected to nats"),
                        async_nats::Event::Disconnected => {
                            counters.disconnects.inc();
                            tracing::warn!(%url, "disconnected from nats; reconnecting")
                        }
                        async_nats::Event::SlowConsumer(sid) => {
                            // One event per dropped message: log the 1st, 2nd, 4th, 8th...
                            // so a long overload is visible without flooding the log.
                            let total = counters.dropped.inc() + 1;
                            if total.is_power_of_two() {
                                tracing::warn!(
                                    sid,
                                    dropped = total,
                                    "nats subscription buffer full: handlers are behind and \
                                     messages were dropped (wasmev_broker_dropped_messages_total)"
                                );
                            }
                        }
                        // Only this host closes its connection (a drain, or the last
                        // client dropped at shutdown): nothing to warn about.
                        async_nats::Event::Closed => {
                            tracing::debug!(%url, "nats connection closed")
                        }
                        other => tracing::warn!(%url, "nats: {other}"),
                    }
                }
            });
        let client = options
            .connect(url.as_str())
            .await
            .map_err(|e| connect_error(&e, settings))
            .with_context(|| format!("failed to connect to nats at {url}"))?;
        Ok(Self {
            jetstream: async_nats::jetstream::with_prefix(client.clone(), &settings.jetstream_api),
            jetstream_api: settings.jetstream_api.as_str().into(),
            client,
            url: url.into(),
            captured: Arc::default(),
            refusals,
            intake_started: Arc::default(),
        })
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// `call`, which publishes to `publishes`, ended at once with what the server said if
    /// it refuses this host's user one of those (see [`Refusals`]).
    async fn unless_refused<T, E: std::fmt::Display>(
        &self,
        publishes: &[String],
        call: impl Future<Output = Result<T, E>>,
    ) -> anyhow::Result<T> {
        match self.refusals.unless_refused(publishes, call).await {
            Ok(result) => result.map_err(flat),
            Err(refusal) => Err(refusal.into()),
        }
    }

    /// A subscription or consumer is about to be made, for [`NatsBroker::confirm`] to
    /// check. The first since the last confirm forgets the refusals kept until now: those
    /// were of earlier intakes (a running consumer's pulls, refused every few seconds),
    /// and a permission granted since would have confirm fail on them.
    fn intake_starts(&self) {
        if !self.intake_started.swap(true, Ordering::Relaxed) {
            drop(self.refusals.take_intake());
        }
    }

    pub async fn subscribe(
        &self,
        pattern: &Pattern,
        queue: Option<&str>,
    ) -> anyhow::Result<NatsSubscription> {
        let subject = pattern.as_str().to_string();
        self.intake_starts();
        let inner = match queue {
            None => self.client.subscribe(subject).await,
            Some(q) => self.client.queue_subscribe(subject, q.to_string()).await,
        }
        .map_err(flat)
        .with_context(|| format!("failed to subscribe to {:?}", pattern.as_str()))?;
        Ok(NatsSubscription { inner })
    }

    /// Prove with a server round trip ([`Self::round_trip`]) that every earlier subscribe
    /// is active.
    ///
    /// A subscription or a JetStream pull the server refused this host's user fails the
    /// confirmation: without it the handler would count as running and never see an
    /// event. The server says so before the round trip's answer (a pull goes out as its
    /// consumer's intake starts, before this is called); its word reaches the host within
    /// [`limits::REFUSAL_GRACE`], waited for only when a subscription or consumer was made.
    pub async fn confirm(&self) -> anyhow::Result<()> {
        let intake_started = self.intake_started.swap(false, Ordering::Relaxed);
        tokio::time::timeout(CONFIRM_TIMEOUT, self.round_trip())
            .await
            .with_context(|| {
                format!(
                    "nats at {} did not confirm subscriptions within {}s",
                    self.url,
                    CONFIRM_TIMEOUT.as_secs()
                )
            })?
            .context("failed to confirm subscriptions")?;
        if intake_started {
            tokio::time::sleep(limits::REFUSAL_GRACE).await;
        }
        let refused = self.refusals.take_intake();
        if refused.is_empty() {
            return Ok(());
        }
        let each: Vec<String> = refused.iter().map(Refusal::to_string).collect();
        Err(anyhow::anyhow!(each.join("; ")))
    }

    pub async fn publish(&self, mut message: Outgoing) -> Result<(), PublishError> {
        let result = match header_map(&mut message)? {
            None => self.client.publish(message.subject, message.payload).await,
            Some(map) => {
                self.client
                    .publish_with_headers(message.subject, map, message.payload)
                    .await
            }
        };
        result.map_err(|e| PublishError::Unavailable(e.to_string()))
    }

    pub async fn request(
        &self,
        mut message: Outgoing,
        timeout: Duration,
    ) -> Result<Message, RequestError> {
        use async_nats::RequestErrorKind;
        let map = header_map(&mut message)?;
        let mut request = async_nats::Request::new()
            .payload(message.payload)
            .timeout(Some(timeout));
        if let Some(map) = map {
            request = request.headers(map);
        }
        let subject = [message.subject.clone()];
        let sent = self
            .refusals
            .unless_refused(
                &subject,
                self.client.send_request(message.subject.clone(), request),
            )
            .await
            .map_err(|refusal| PublishError::Unavailable(refusal.to_string()))?;
        match sent {
            Ok(m) => Ok(convert(m)),
            Err(e) => Err(match e.kind() {
                RequestErrorKind::NoResponders => RequestError::NoResponders(message.subject),
                RequestErrorKind::TimedOut => RequestError::TimedOut(timeout),
                _ => RequestError::Publish(PublishError::Unavailable(e.to_string())),
            }),
        }
    }

    /// The server's announced `max_payload`, capped by ours.
    pub fn max_payload(&self) -> usize {
        self.client.max_payload().min(limits::MAX_PUBLISH_PAYLOAD)
    }

    pub fn is_connected(&self) -> bool {
        self.client.connection_state() == async_nats::connection::State::Connected
    }

    /// Flush buffered publishes before shutdown so nothing handlers published is lost.
    pub async fn flush(&self) -> anyhow::Result<()> {
        self.client
            .flush()
            .await
            .map_err(flat)
            .context("failed to flush nats")
    }

    /// A round trip through the server on this connection ([`round_trip`]). The server
    /// refusing the probe's publish or its inbox ends it at once, saying so.
    pub async fn round_trip(&self) -> anyhow::Result<()> {
        let inbox = self.client.new_inbox();
        self.refusals
            .unless_refused(
                std::slice::from_ref(&inbox),
                round_trip_via(&self.client, inbox.clone()),
            )
            .await?
    }

    pub fn client(&self) -> &async_nats::Client {
        &self.client
    }
}

/// A round trip through the server: returns once a message published now to a fresh
/// inbox of `client`'s has come back. nats-server handles one connection's protocol in
/// order and queues what it sends it in order, so by then every SUB sent before is
/// registered, and whatever the server sent this connection before has been read off
/// the socket and handed to its subscriptions. `flush` is not one: async-nats's flush
/// only writes out what the client holds and reads nothing (nats.go's is a PING/PONG).
pub async fn round_trip(client: &async_nats::Client) -> anyhow::Result<()> {
    round_trip_via(client, client.new_inbox()).await
}

/// [`round_trip`] through `inbox`, one of the client's.
async fn round_trip_via(client: &async_nats::Client, inbox: String) -> anyhow::Result<()> {
    let mut probe = client
        .subscribe(inbox.clone())
        .await
        .map_err(flat)
        .context("failed to subscribe a round-trip inbox")?;
    client
        .publish(inbox, Bytes::new())
        .await
        .map_err(flat)
        .context("failed to publish a round-trip probe")?;
    probe
        .next()
        .await
        .map(drop)
        .context("the nats connection closed during a round trip")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refused_credentials_name_the_key_they_came_from() {
        let each = [
            Auth::None,
            Auth::CredsFile("/etc/wasmev/host.creds".into()),
            Auth::Token("secret".into()),
            Auth::UserPassword {
                user: "host".into(),
                password: "secret".into(),
            },
            Auth::NKey("SUsecret".into()),
        ]
        .map(|auth| refused_credentials(&auth));
        assert!(
            each.iter().all(|text| !text.contains("secret")),
            "{each:#?}"
        );
        insta::assert_snapshot!(each.join("\n"), @r#"
            the server requires credentials: set creds_file, token_env, nkey_seed_env, or user_env with password_env in [broker]
            the server refused this host's credentials: the credentials in creds_file /etc/wasmev/host.creds
            the server refused this host's credentials: the token token_env holds
            the server refused this host's credentials: user "host" with the password password_env holds
            the server refused this host's credentials: the nkey nkey_seed_env holds (the server lists users by public key)
        "#);
    }

    fn of(headers: Vec<(String, String)>, hops: Option<u32>) -> Outgoing {
        Outgoing {
            hops,
            ..Outgoing::new("a.b", Bytes::new()).with_headers(headers)
        }
    }

    fn pairs(map: &HeaderMap) -> Vec<(String, String)> {
        let mut pairs = header_pairs(map);
        pairs.sort();
        pairs
    }

    #[test]
    fn a_publish_without_headers_sends_only_the_hop_count_at_every_count() {
        // 0, the default cap's edge, the table's last entry, and counts past it.
        for hops in [
            0,
            1,
            16,
            limits::MAX_HOPS_CAP,
            limits::MAX_HOPS_CAP + 1,
            u32::MAX,
        ] {
            let mut message = Outgoing::new("a.b", Bytes::new());
            message.hops = Some(hops);
            let map = header_map(&mut message).unwrap().unwrap();
            assert_eq!(
                pairs(&map),
                [(HOPS.to_string(), hops.to_string())],
                "{hops}"
            );
        }
        // No hop count and no headers: a plain PUB.
        assert!(header_map(&mut of(Vec::new(), None)).unwrap().is_none());
    }

    #[test]
    fn headers_are_moved_into_the_map_beside_the_hop_count() {
        // A standard name (JetStream's dedupe id), a custom one, and a repeated one.
        let headers = vec![
            (MSG_ID.to_string(), "echo:S:1:0".to_string()),
            ("X-Trace".to_string(), "a".to_string()),
            ("X-Trace".to_string(), "b".to_string()),
        ];
        let map = header_map(&mut of(headers, Some(3))).unwrap().unwrap();
        assert_eq!(
            pairs(&map),
            [
                (MSG_ID.to_string(), "echo:S:1:0".to_string()),
                (HOPS.to_string(), "3".to_string()),
                ("X-Trace".to_string(), "a".to_string()),
                ("X-Trace".to_string(), "b".to_string()),
            ]
        );
    }

    #[test]
    fn the_hosts_message_id_is_sent_under_its_standard_name() {
        // Alone beside the hop count (a guest publish without headers of its own, from a
        // stream's event), and beside a guest's header.
        for guest in [vec![], vec![("K".to_string(), "v".to_string())]] {
            let mut expected = guest.clone();
            let map = header_map(&mut Outgoing {
                msg_id: Some("echo:S:7:0".to_string()),
                ..of(guest, Some(1))
            })
            .unwrap()
            .unwrap();
            expected.push((MSG_ID.to_string(), "echo:S:7:0".to_string()));
            expected.push((HOPS.to_string(), "1".to_string()));
            expected.sort();
            assert_eq!(pairs(&map), expected);
        }
        // An id with a line break (a stream name the server should never send) is refused.
        let refused = header_map(&mut Outgoing {
            msg_id: Some("a\r\nb".to_string()),
            ..of(vec![], None)
        });
        assert!(matches!(refused, Err(PublishError::InvalidHeader(name)) if name == MSG_ID));
    }

    #[test]
    fn a_header_value_with_a_line_break_is_an_error_not_a_panic() {
        for value in ["a\r\nPUB x 0", "a\nb"] {
            let headers = vec![("K".to_string(), value.to_string())];
            assert!(matches!(
                header_map(&mut of(headers, Some(1))),
                Err(PublishError::InvalidHeader(name)) if name == "K"
            ));
        }
    }

    #[test]
    fn a_guests_own_hop_header_is_replaced_by_the_hosts_count() {
        let mut message = Outgoing::new("a.b", Bytes::new()).with_headers(vec![
            ("K".to_string(), "v".to_string()),
            (HOPS.to_string(), "0".to_string()),
        ]);
        message.hops = Some(7);
        let map = header_map(&mut message).unwrap().unwrap();
        assert_eq!(
            pairs(&map),
            [
                ("K".to_string(), "v".to_string()),
                (HOPS.to_string(), "7".to_string())
            ]
        );
    }
}

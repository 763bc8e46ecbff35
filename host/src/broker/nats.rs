//! NATS core through async-nats: connect with credentials from the manifest, subscribe,
//! confirm subscriptions with a server round-trip, publish. What the server refuses the
//! host's user ends the calls waiting on it at once (see [`super::refusals`]).
//!
//! Delivery on core NATS is at-most-once: a message published while the host is
//! disconnected, or dropped because a subscription's client-side buffer is full, is gone.
//! Both cases are logged and counted, never silent.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use arc_swap::ArcSwap;
use async_nats::jetstream::ErrorCode;
use async_nats::jetstream::context::{GetStreamError, GetStreamErrorKind};
use async_nats::{ConnectOptions, HeaderMap, HeaderName, HeaderValue};
use bytes::Bytes;
use futures::StreamExt;

use super::refusals::{Refusal, Refusals};
use super::{Message, Outgoing, PublishError, RequestError, validate_header};
use crate::limits;
use crate::manifest::{Auth, BrokerSettings, DEFAULT_JETSTREAM_API, Deliver, JetStreamSpec};
use crate::metrics::BrokerCounters;
use crate::publish::{HOPS, MSG_ID};
use crate::subject::Pattern;

/// How long a subscription confirmation may take. Why 10 s: a round-trip to a healthy
/// server takes milliseconds; ten seconds covers a busy one without hanging start-up.
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(10);

/// How long the first connection attempt may take before start-up fails.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// How long "does a stream capture this subject?" is remembered. Why 10 s: streams are
/// created and removed rarely; a fresh answer within seconds keeps durable publishes
/// right without one lookup per publish.
const CAPTURE_TTL: Duration = Duration::from_secs(10);

/// Subjects whose capture answer is remembered at most. Why 1 000: guests publish to a
/// handful of subjects; the bound stops a guest inventing subjects from growing it, and
/// keeps the copy each new entry makes (below) small.
const CAPTURE_CACHE_MAX: usize = 1_000;

/// Which subjects a JetStream stream captures, looked up on demand and cached briefly.
///
/// Read on every publish an event from a stream makes, so without a lock: the map is
/// immutable and swapped whole. A new entry (once per subject per [`CAPTURE_TTL`]) copies
/// it; that costs less than the stream lookup it follows.
#[derive(Default)]
struct CaptureCache {
    entries: ArcSwap<HashMap<String, (bool, Instant)>>,
}

impl CaptureCache {
    fn get(&self, subject: &str) -> Option<bool> {
        self.entries
            .load()
            .get(subject)
            .filter(|(_, at)| at.elapsed() < CAPTURE_TTL)
            .map(|(captured, _)| *captured)
    }

    fn put(&self, subject: &str, captured: bool) {
        let now = Instant::now();
        self.entries.rcu(|entries| {
            let mut next = if entries.len() >= CAPTURE_CACHE_MAX {
                HashMap::new()
            } else {
                HashMap::clone(entries)
            };
            next.insert(subject.to_string(), (captured, now));
            next
        });
    }
}

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

/// Where JetStream announces the messages a consumer stopped delivering:
/// `<this>.<stream>.<consumer>`.
const MAX_DELIVERIES: &str = "$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES";

/// The stream that keeps the max-deliveries advisories of consumer `durable` on `stream`.
fn given_up_stream(stream: &str, durable: &str) -> String {
    format!("WASMEV_GIVEN_UP_{stream}_{durable}")
}

/// Why [`NatsBroker::given_up_consumer`] cannot use stream `name`: it exists, capturing
/// `subjects` rather than only `subject`.
fn given_up_stream_taken(name: &str, subjects: &[String], subject: &str) -> String {
    format!(
        "stream {name:?} exists on {subjects:?}; wasmev keeps max-deliveries advisories there \
         and needs it on {subject:?} alone: delete or rename that stream"
    )
}

/// The durable consumer hosts read those advisories with.
const GIVEN_UP_CONSUMER: &str = "wasmev";

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

/// Whether looking a stream up failed because JetStream has no such stream (rather than
/// because JetStream could not be asked).
fn stream_missing(e: &GetStreamError) -> bool {
    matches!(e.kind(), GetStreamErrorKind::JetStream(err)
        if err.error_code() == ErrorCode::STREAM_NOT_FOUND)
}

/// A stream lookup `e` that did not get as far as the stream, as the user reads it: what
/// went wrong, and which setting to check for the JetStream API prefix `api` the host asked
/// (`$JS.API`, a domain's `$JS.<domain>.API`, or an imported `jetstream_api_prefix`).
fn unreachable_jetstream(e: &GetStreamError, api: &str) -> String {
    use async_nats::jetstream::context::{RequestError as ApiError, RequestErrorKind};
    let no_responders = e.kind() == GetStreamErrorKind::Request
        && std::error::Error::source(e)
            .and_then(|source| source.downcast_ref::<ApiError>())
            .is_some_and(|source| source.kind() == RequestErrorKind::NoResponders);
    let domain = api
        .strip_prefix("$JS.")
        .and_then(|rest| rest.strip_suffix(".API"))
        .filter(|domain| !domain.contains('.'));
    if no_responders {
        let check = if api == DEFAULT_JETSTREAM_API {
            "the server runs without JetStream: start nats-server with -js (or a jetstream \
             block in its configuration)"
                .to_string()
        } else if let Some(domain) = domain {
            format!("is JetStream domain {domain:?} (jetstream_domain) reachable from this server?")
        } else {
            format!(
                "does the host's account import another account's JetStream API under \
                 {api:?} (jetstream_api_prefix)?"
            )
        };
        return format!(
            "nothing answers the JetStream API at \"{api}.>\" (no responders); {check}"
        );
    }
    match e.kind() {
        GetStreamErrorKind::JetStream(err)
            if err.error_code() == ErrorCode::JETSTREAM_NOT_ENABLED_FOR_ACCOUNT =>
        {
            format!(
                "{e}; enable JetStream for the host's account, or set jetstream_api_prefix to \
                 where the account imports another account's"
            )
        }
        _ => e.to_string(),
    }
}

/// `stream_subjects` makes a stream only when it is missing: say so when the stream found
/// captures other subjects than the manifest lists, rather than let an edit to the list
/// look applied.
fn warn_if_other_subjects(captured: &[String], spec: &JetStreamSpec) {
    if spec.stream_subjects.is_empty() {
        return;
    }
    let mut listed: Vec<&str> = spec.stream_subjects.iter().map(Pattern::as_str).collect();
    let mut found: Vec<&str> = captured.iter().map(String::as_str).collect();
    listed.sort_unstable();
    found.sort_unstable();
    if listed != found {
        tracing::warn!(
            stream = %spec.stream,
            "stream {:?} exists and captures {found:?}, not the {listed:?} of stream_subjects, \
             which only makes a missing stream: change the stream itself to capture others",
            spec.stream
        );
    }
}

/// The settings the host gives its consumers where `made_with` (the server's consumer)
/// differs from `wanted`, each as `name was → now`. `deliver` is not among them: it only
/// says where a new consumer starts.
fn consumer_edits(
    made_with: &async_nats::jetstream::consumer::Config,
    wanted: &async_nats::jetstream::consumer::pull::Config,
) -> Vec<String> {
    fn filters(one: &str, many: &[String]) -> Vec<String> {
        let mut all = if many.is_empty() && !one.is_empty() {
            vec![one.to_string()]
        } else {
            many.to_vec()
        };
        all.sort();
        all
    }
    fn edit<T: PartialEq + std::fmt::Debug>(edits: &mut Vec<String>, name: &str, was: T, now: T) {
        if was != now {
            edits.push(format!("{name} {was:?} → {now:?}"));
        }
    }
    let mut edits = Vec::new();
    edit(
        &mut edits,
        "filter",
        filters(&made_with.filter_subject, &made_with.filter_subjects),
        filters(&wanted.filter_subject, &wanted.filter_subjects),
    );
    edit(
        &mut edits,
        "ack_policy",
        made_with.ack_policy,
        wanted.ack_policy,
    );
    edit(&mut edits, "ack_wait", made_with.ack_wait, wanted.ack_wait);
    edit(
        &mut edits,
        "max_deliver",
        made_with.max_deliver,
        wanted.max_deliver,
    );
    edit(
        &mut edits,
        "max_ack_pending",
        made_with.max_ack_pending,
        wanted.max_ack_pending,
    );
    edits
}

/// What getting or creating consumer `durable` on `stream` publishes to, under the
/// JetStream API prefix `api`: the info request, then the create request (whose subject
/// goes on with the consumer's filter, when it has one).
fn consumer_api(api: &str, stream: &str, durable: &str) -> [String; 3] {
    [
        format!("{api}.CONSUMER.INFO.{stream}.{durable}"),
        format!("{api}.CONSUMER.CREATE.{stream}.{durable}"),
        format!("{api}.CONSUMER.CREATE.{stream}.{durable}.>"),
    ]
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

    /// Whether a JetStream stream captures `subject` (cached for [`CAPTURE_TTL`]).
    async fn is_captured(&self, subject: &str) -> Result<bool, PublishError> {
        use async_nats::jetstream::context::GetStreamByNameErrorKind;
        if let Some(captured) = self.captured.get(subject) {
            return Ok(captured);
        }
        let looked_up = self
            .refusals
            .unless_refused(
                &[format!("{}.STREAM.NAMES", self.jetstream_api)],
                self.jetstream.stream_by_subject(subject),
            )
            .await
            .map_err(|refusal| {
                PublishError::Unavailable(format!("stream lookup failed: {refusal}"))
            })?;
        let captured = match looked_up {
            Ok(_) => true,
            Err(e) if e.kind() == GetStreamByNameErrorKind::NotFound => false,
            Err(e) => {
                return Err(PublishError::Unavailable(format!(
                    "stream lookup failed: {e}"
                )));
            }
        };
        self.captured.put(subject, captured);
        Ok(captured)
    }

    /// Whether a stream may capture `subject`: false only when the capture cache knows
    /// (within its TTL) that none does.
    pub fn may_capture(&self, subject: &str) -> bool {
        self.captured.get(subject) != Some(false)
    }

    /// Publish and, when a stream captures the subject, wait for its acknowledgement.
    /// A subject no stream captures is published plainly: there is nothing to wait for
    /// (and waiting would only time out when core subscribers listen there).
    pub async fn publish_durable(&self, message: Outgoing) -> Result<(), PublishError> {
        use async_nats::jetstream::context::PublishErrorKind;
        if !self.is_captured(&message.subject).await? {
            return self.publish(message).await;
        }
        // A copy goes to the stream, whole: the message is published plainly after all if
        // the stream has gone (below).
        let mut durable = message.clone();
        let map = header_map(&mut durable)?.unwrap_or_default();
        let subject = [durable.subject.clone()];
        let acked = async {
            let pending = self
                .jetstream
                .publish_with_headers(durable.subject, map, durable.payload)
                .await
                .map_err(|e| PublishError::Unavailable(e.to_string()))?;
            Ok(pending.await)
        };
        let ack = match self.refusals.unless_refused(&subject, acked).await {
            Ok(ack) => ack?,
            Err(refusal) => return Err(PublishError::Unavailable(refusal.to_string())),
        };
        match ack {
            Ok(_) => Ok(()),
            Err(e) if e.kind() == PublishErrorKind::StreamNotFound => self.publish(message).await,
            Err(e) => Err(PublishError::Unavailable(e.to_string())),
        }
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

    /// The durable pull consumer for `spec`, on a stream that must exist unless the
    /// manifest says which subjects to create it with.
    pub async fn consumer(
        &self,
        spec: &JetStreamSpec,
        filters: &[Pattern],
    ) -> anyhow::Result<async_nats::jetstream::consumer::PullConsumer> {
        use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy, pull};
        // Its intake pulls as it starts: confirm waits for a refusal of that.
        self.intake_starts();
        let looked_up = self
            .refusals
            .unless_refused(
                &[format!(
                    "{}.STREAM.INFO.{}",
                    self.jetstream_api, spec.stream
                )],
                self.jetstream.get_stream(&spec.stream),
            )
            .await
            .with_context(|| format!("failed to look up stream {:?}", spec.stream))?;
        let stream = match looked_up {
            Ok(stream) => {
                warn_if_other_subjects(&stream.cached_info().config.subjects, spec);
                stream
            }
            // Only a stream JetStream says it does not have is missing; an account without
            // JetStream, or nothing answering the API at all, read as "not found" and told
            // the user to create a stream that already existed.
            Err(e) if !stream_missing(&e) => {
                return Err(anyhow::anyhow!(
                    "failed to look up stream {:?} on nats at {}: {}",
                    spec.stream,
                    self.url,
                    unreachable_jetstream(&e, &self.jetstream_api)
                ));
            }
            Err(e) if spec.stream_subjects.is_empty() => {
                return Err(anyhow::anyhow!(
                    "stream {:?} not found on nats at {} ({e}); create it, or set \
                     jetstream.stream_subjects in the manifest to let wasmev create it",
                    spec.stream,
                    self.url
                ));
            }
            Err(_) => self
                .unless_refused(
                    &[format!(
                        "{}.STREAM.CREATE.{}",
                        self.jetstream_api, spec.stream
                    )],
                    self.jetstream
                        .create_stream(async_nats::jetstream::stream::Config {
                            name: spec.stream.clone(),
                            subjects: spec
                                .stream_subjects
                                .iter()
                                .map(|p| p.as_str().to_string())
                                .collect(),
                            storage: async_nats::jetstream::stream::StorageType::File,
                            ..Default::default()
                        }),
                )
                .await
                .with_context(|| format!("failed to create stream {:?}", spec.stream))?,
        };
        let mut config = pull::Config {
            durable_name: Some(spec.durable.clone()),
            deliver_policy: match spec.deliver {
                Deliver::All => DeliverPolicy::All,
                Deliver::New => DeliverPolicy::New,
            },
            ack_policy: AckPolicy::Explicit,
            ack_wait: spec.ack_wait,
            max_deliver: i64::from(spec.max_deliver),
            max_ack_pending: i64::from(spec.max_ack_pending),
            ..Default::default()
        };
        // One filter works on every server; several need nats-server 2.10.
        match filters {
            [one] => config.filter_subject = one.as_str().to_string(),
            many => config.filter_subjects = many.iter().map(|p| p.as_str().to_string()).collect(),
        }
        let api = consumer_api(&self.jetstream_api, &spec.stream, &spec.durable);
        let found = self
            .unless_refused(
                &api,
                stream.get_or_create_consumer(&spec.durable, config.clone()),
            )
            .await
            .with_context(|| {
                format!(
                    "failed to get or create consumer {:?} on stream {:?}",
                    spec.durable, spec.stream
                )
            })?;
        // The durable consumer outlives the host, and getting it does not change it: the
        // one an earlier host (or another) made keeps its settings until they are updated.
        // Without this an edited manifest never reached it.
        let made_with = &found.cached_info().config;
        let edited = consumer_edits(made_with, &config);
        if edited.is_empty() {
            return Ok(found);
        }
        // Where a consumer starts applies only when it is made (README: `deliver`), and
        // JetStream refuses to change it.
        config.deliver_policy = made_with.deliver_policy;
        tracing::info!(
            stream = %spec.stream,
            durable = %spec.durable,
            "updating the durable consumer to the manifest's settings: {}",
            edited.join(", ")
        );
        // An update is a create request on an existing durable: the same subjects as
        // `consumer_api`'s create, without its info lookup.
        let updated = self
            .unless_refused(&api[1..], stream.update_consumer(config))
            .await;
        updated.map_err(|e| {
            let what = format!(
                "consumer {:?} on stream {:?} has other settings than the manifest's ({})",
                spec.durable,
                spec.stream,
                edited.join(", ")
            );
            if e.downcast_ref::<Refusal>().is_some() {
                e.context(format!("{what}, and updating it failed"))
            } else {
                anyhow::anyhow!(
                    "{what}, and the server would not update it: {e}; delete the consumer (it \
                     loses its place in the stream) or give the handler a new durable"
                )
            }
        })
    }

    /// A durable pull consumer of JetStream's max-deliveries advisories for `spec`'s
    /// consumer (one for each message the server stops delivering), on a stream that keeps
    /// them until a host has dead-lettered what they name.
    ///
    /// Why a stream and not a subscription: the server sends an advisory once, when it
    /// stops delivering the message, and the host of its last delivery may be what stopped
    /// (killed mid-event, say). A subscription would see only what comes while a host
    /// runs; the stream keeps an advisory for the next host to start. Work-queue retention removes
    /// each one once acked; with several hosts on the consumer each advisory goes to one.
    /// No age or size limit: each is a few hundred bytes, and dropping one would leave its
    /// message in the stream without a word.
    pub async fn given_up_consumer(
        &self,
        spec: &JetStreamSpec,
    ) -> anyhow::Result<async_nats::jetstream::consumer::PullConsumer> {
        use async_nats::jetstream::consumer::{AckPolicy, pull};
        use async_nats::jetstream::stream::{Config, RetentionPolicy, StorageType};
        let name = given_up_stream(&spec.stream, &spec.durable);
        let subject = format!("{MAX_DELIVERIES}.{}.{}", spec.stream, spec.durable);
        let stream = self
            .unless_refused(
                &[
                    format!("{}.STREAM.INFO.{name}", self.jetstream_api),
                    format!("{}.STREAM.CREATE.{name}", self.jetstream_api),
                ],
                self.jetstream.get_or_create_stream(Config {
                    name: name.clone(),
                    subjects: vec![subject.clone()],
                    retention: RetentionPolicy::WorkQueue,
                    storage: StorageType::File,
                    ..Default::default()
                }),
            )
            .await
            .with_context(|| format!("failed to get or create stream {name:?}"))?;
        let subjects = &stream.cached_info().config.subjects;
        if subjects != std::slice::from_ref(&subject) {
            anyhow::bail!(given_up_stream_taken(&name, subjects, &subject));
        }
        self.unless_refused(
            &consumer_api(&self.jetstream_api, &name, GIVEN_UP_CONSUMER),
            stream.get_or_create_consumer(
                GIVEN_UP_CONSUMER,
                pull::Config {
                    durable_name: Some(GIVEN_UP_CONSUMER.to_string()),
                    ack_policy: AckPolicy::Explicit,
                    ack_wait: limits::GIVEN_UP_ACK_WAIT,
                    ..Default::default()
                },
            ),
        )
        .await
        .with_context(|| {
            format!("failed to get or create consumer {GIVEN_UP_CONSUMER:?} on stream {name:?}")
        })
    }

    /// Message `sequence` of stream `name`, read back through the JetStream API.
    pub async fn stored_message(&self, name: &str, sequence: u64) -> anyhow::Result<Message> {
        let stream = self
            .jetstream
            .get_stream_no_info(name)
            .await
            .map_err(flat)?;
        let m = self
            .unless_refused(
                &[
                    format!("{}.STREAM.MSG.GET.{name}", self.jetstream_api),
                    format!("{}.DIRECT.GET.{name}", self.jetstream_api),
                ],
                stream.get_raw_message(sequence),
            )
            .await?;
        Ok(Message {
            subject: m.subject.into_string(),
            reply: None,
            headers: header_pairs(&m.headers),
            payload: m.payload,
        })
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
    fn a_stream_in_the_way_of_the_advisories_is_named_with_what_to_do() {
        assert_eq!(
            given_up_stream("USERS", "email-sender"),
            "WASMEV_GIVEN_UP_USERS_email-sender"
        );
        insta::assert_snapshot!(
            given_up_stream_taken(
                "WASMEV_GIVEN_UP_USERS_email-sender",
                &["audit.>".to_string()],
                "$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.USERS.email-sender"
            ),
            @r#"stream "WASMEV_GIVEN_UP_USERS_email-sender" exists on ["audit.>"]; wasmev keeps max-deliveries advisories there and needs it on "$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.USERS.email-sender" alone: delete or rename that stream"#
        );
    }

    #[test]
    fn a_stream_lookup_that_never_reached_the_stream_says_what_to_check() {
        use async_nats::jetstream::context::{RequestError as ApiError, RequestErrorKind};
        let no_responders = || {
            GetStreamError::with_source(
                GetStreamErrorKind::Request,
                ApiError::new(RequestErrorKind::NoResponders),
            )
        };
        let api_error = |code: u64, text: &str| {
            let error: async_nats::jetstream::Error = serde_json::from_value(serde_json::json!({
                "code": 503, "err_code": code, "description": text
            }))
            .unwrap();
            GetStreamError::new(GetStreamErrorKind::JetStream(error))
        };
        let not_enabled = api_error(10039, "JetStream not enabled for account");
        let missing = api_error(10059, "stream not found");
        assert!(stream_missing(&missing));
        assert!(!stream_missing(&not_enabled) && !stream_missing(&no_responders()));
        let each = [
            unreachable_jetstream(&no_responders(), "$JS.API"),
            unreachable_jetstream(&no_responders(), "$JS.hub.API"),
            unreachable_jetstream(&no_responders(), "JS.events.API"),
            unreachable_jetstream(&not_enabled, "$JS.API"),
        ];
        insta::assert_snapshot!(each.join("\n"), @r#"
            nothing answers the JetStream API at "$JS.API.>" (no responders); the server runs without JetStream: start nats-server with -js (or a jetstream block in its configuration)
            nothing answers the JetStream API at "$JS.hub.API.>" (no responders); is JetStream domain "hub" (jetstream_domain) reachable from this server?
            nothing answers the JetStream API at "JS.events.API.>" (no responders); does the host's account import another account's JetStream API under "JS.events.API" (jetstream_api_prefix)?
            jetstream error: JetStream not enabled for account (code 503, error code 10039); enable JetStream for the host's account, or set jetstream_api_prefix to where the account imports another account's
            "#);
    }

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
    fn the_capture_cache_remembers_answers_and_stays_bounded() {
        let cache = CaptureCache::default();
        assert_eq!(cache.get("orders.created"), None);
        cache.put("orders.created", true);
        cache.put("email.sent", false);
        assert_eq!(cache.get("orders.created"), Some(true));
        assert_eq!(cache.get("email.sent"), Some(false));
        // A guest inventing subjects: the map starts over at the bound, never past it.
        for i in 0..CAPTURE_CACHE_MAX + 10 {
            cache.put(&format!("made.up.{i}"), false);
            assert!(cache.entries.load().len() <= CAPTURE_CACHE_MAX);
        }
        assert_eq!(cache.get("orders.created"), None);
        assert_eq!(
            cache.get(&format!("made.up.{}", CAPTURE_CACHE_MAX + 9)),
            Some(false)
        );
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

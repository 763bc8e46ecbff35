//! The JetStream side of the NATS broker: find or make a handler's stream and durable
//! pull consumer (and bring the consumer to the manifest's settings), the stream that
//! keeps the max-deliveries advisories, messages read back by sequence, and publishes that
//! wait for a stream's acknowledgement when a stream captures their subject.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use arc_swap::ArcSwap;
use async_nats::jetstream::ErrorCode;
use async_nats::jetstream::context::{GetStreamError, GetStreamErrorKind};

use super::{NatsBroker, flat, header_map, header_pairs};
use crate::broker::refusals::Refusal;
use crate::broker::{Message, Outgoing, PublishError};
use crate::limits;
use crate::manifest::{DEFAULT_JETSTREAM_API, Deliver, JetStreamSpec};
use crate::subject::Pattern;

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
pub(super) struct CaptureCache {
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

impl NatsBroker {
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
}

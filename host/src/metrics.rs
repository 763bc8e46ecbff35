//! Prometheus metrics, per handler: events received, ok, failed by reason, durations,
//! publishes by result, guest output dropped.
//!
//! Label sets are resolved once per handler into [`HandlerMetrics`], so the per-event path
//! only increments atomics (no map lookups, no label allocation).

use std::sync::Arc;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

mod durations;
pub(crate) mod shards;

pub use durations::Durations;
pub use shards::Count;

/// Why an event did not end in `ok`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum FailReason {
    /// The guest asked for a retry.
    retry,
    /// The guest rejected the event.
    reject,
    /// The guest trapped (panic, unreachable, stack overflow, bad memory access...).
    trap,
    /// The event ran past its deadline.
    deadline,
    /// The guest tried to grow memory past its limit.
    memory,
    /// The guest ran out of its `fuel` (instruction budget).
    fuel,
    /// The event payload is larger than the handler's `max_payload`; never instantiated.
    too_large,
    /// The event travelled more handler hops than `max_hops`: a feedback loop, dropped.
    hop_limit,
    /// The host could not run the event (instantiation failed...).
    host,
}

impl FailReason {
    pub const ALL: [FailReason; 9] = [
        FailReason::retry,
        FailReason::reject,
        FailReason::trap,
        FailReason::deadline,
        FailReason::memory,
        FailReason::fuel,
        FailReason::too_large,
        FailReason::hop_limit,
        FailReason::host,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            FailReason::retry => "retry",
            FailReason::reject => "reject",
            FailReason::trap => "trap",
            FailReason::deadline => "deadline",
            FailReason::memory => "memory",
            FailReason::fuel => "fuel",
            FailReason::too_large => "too_large",
            FailReason::hop_limit => "hop_limit",
            FailReason::host => "host",
        }
    }

    /// Whether trying the same event again cannot succeed (so JetStream dead-letters it
    /// at once instead of retrying).
    pub fn is_permanent(self) -> bool {
        matches!(
            self,
            FailReason::reject | FailReason::too_large | FailReason::hop_limit
        )
    }
}

/// How a guest publish ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum PublishResult {
    ok,
    access_denied,
    invalid_subject,
    invalid_header,
    payload_too_large,
    quota_exceeded,
    unavailable,
}

impl PublishResult {
    const ALL: [PublishResult; 7] = [
        PublishResult::ok,
        PublishResult::access_denied,
        PublishResult::invalid_subject,
        PublishResult::invalid_header,
        PublishResult::payload_too_large,
        PublishResult::quota_exceeded,
        PublishResult::unavailable,
    ];
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct HandlerLabel {
    handler: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct FailLabels {
    handler: String,
    reason: FailReason,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct PublishLabels {
    handler: String,
    result: PublishResult,
}

/// How a reload ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum ReloadResult {
    /// Everything the manifest asks for is running.
    ok,
    /// Something could not be applied (bad manifest, module or subscription); what could
    /// not be applied keeps running its old version.
    refused,
}

/// What happened to one handler in a reload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum SwapResult {
    /// A new version went live.
    swapped,
    /// The new version could not be loaded; the old one keeps serving.
    refused,
    /// The new version failed its first events and the previous one is live again.
    rolled_back,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ReloadLabels {
    result: ReloadResult,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct SwapLabels {
    handler: String,
    result: SwapResult,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct VersionLabels {
    handler: String,
    digest: String,
}

/// The host's metric registry.
pub struct Metrics {
    registry: Registry,
    received: Family<HandlerLabel, Count>,
    ok: Family<HandlerLabel, Count>,
    failed: Family<FailLabels, Count>,
    duration: Family<HandlerLabel, Durations>,
    publishes: Family<PublishLabels, Count>,
    output_dropped: Family<HandlerLabel, Counter>,
    dead_lettered: Family<HandlerLabel, Counter>,
    dead_letters_refused: Family<HandlerLabel, Counter>,
    pulls_restarted: Family<HandlerLabel, Counter>,
    given_up: Family<HandlerLabel, Counter>,
    /// 1 once every subscription is confirmed.
    pub ready: Gauge,
    reloads: Family<ReloadLabels, Counter>,
    swaps: Family<SwapLabels, Counter>,
    version: Family<VersionLabels, Gauge>,
    /// Unix time of the last reload, whatever its result.
    pub last_reload: Gauge,
    /// What the NATS client reports about its connection.
    pub broker: BrokerCounters,
}

/// Counters the NATS client's event callback feeds.
#[derive(Clone, Default)]
pub struct BrokerCounters {
    /// Messages the client dropped because a subscription's buffer was full.
    pub dropped: Counter,
    /// Times the connection was lost (and the client started reconnecting).
    pub disconnects: Counter,
    /// Publishes and subscriptions the server refused this host's user.
    pub refused: Counter,
}

/// One handler's metric handles, resolved once.
#[derive(Clone)]
pub struct HandlerMetrics {
    pub received: Count,
    pub ok: Count,
    failed: [Count; FailReason::ALL.len()],
    pub duration: Durations,
    publishes: [Count; PublishResult::ALL.len()],
    pub output_dropped: Counter,
    pub dead_lettered: Counter,
    /// Attempts to publish a dead letter that failed (see `jetstream::settle`).
    pub dead_letters_refused: Counter,
    /// JetStream pulls started again after a stall or an end (see `jetstream::consume`).
    pub pulls_restarted: Counter,
    /// Messages JetStream stopped delivering without a host acking or dead-lettering them
    /// (see `jetstream::given_up`).
    pub given_up: Counter,
}

impl HandlerMetrics {
    pub fn failed(&self, reason: FailReason) -> &Count {
        &self.failed[reason as usize]
    }

    pub fn publish(&self, result: PublishResult) -> &Count {
        &self.publishes[result as usize]
    }
}

impl Metrics {
    pub fn new() -> Arc<Self> {
        let mut registry = Registry::with_prefix("wasmev");
        let received = Family::<HandlerLabel, Count>::default();
        let ok = Family::<HandlerLabel, Count>::default();
        let failed = Family::<FailLabels, Count>::default();
        let duration = Family::<HandlerLabel, Durations>::default();
        let publishes = Family::<PublishLabels, Count>::default();
        let output_dropped = Family::<HandlerLabel, Counter>::default();
        let dead_lettered = Family::<HandlerLabel, Counter>::default();
        let dead_letters_refused = Family::<HandlerLabel, Counter>::default();
        let pulls_restarted = Family::<HandlerLabel, Counter>::default();
        let given_up = Family::<HandlerLabel, Counter>::default();
        let ready = Gauge::default();
        registry.register(
            "events_received",
            "Events delivered to a handler",
            received.clone(),
        );
        registry.register("events_ok", "Events a handler completed", ok.clone());
        registry.register(
            "events_failed",
            "Events that did not complete, by reason",
            failed.clone(),
        );
        registry.register(
            "event_duration_seconds",
            "Time from dispatch to result, including instantiation",
            duration.clone(),
        );
        registry.register(
            "guest_publishes",
            "Guest publish calls by result",
            publishes.clone(),
        );
        registry.register(
            "guest_output_dropped_bytes",
            "Guest stdout/stderr bytes dropped past the per-event cap",
            output_dropped.clone(),
        );
        registry.register(
            "dead_letters",
            "JetStream events sent to the dead-letter subject",
            dead_lettered.clone(),
        );
        registry.register(
            "dead_letters_refused",
            "Attempts to publish a dead letter that failed (dead-letter stream full, broker \
             unreachable, no permission); the event is nak'd or the letter tried again, not \
             dropped, but a rising count means dead letters are piling up unsent",
            dead_letters_refused.clone(),
        );
        registry.register(
            "jetstream_pulls_restarted",
            "JetStream pulls started again because the last one stalled (missed heartbeats) \
             or ended",
            pulls_restarted.clone(),
        );
        registry.register(
            "jetstream_given_up",
            "JetStream messages the server stopped delivering without a host acking or \
             dead-lettering them (host stopped mid-event, delivery lost with its connection, \
             dead letter refused on the last attempt); each is dead-lettered from the advisory",
            given_up.clone(),
        );
        registry.register(
            "ready",
            "1 once every subscription is confirmed",
            ready.clone(),
        );
        let reloads = Family::<ReloadLabels, Counter>::default();
        let swaps = Family::<SwapLabels, Counter>::default();
        let version = Family::<VersionLabels, Gauge>::default();
        let last_reload = Gauge::default();
        let broker = BrokerCounters::default();
        registry.register(
            "broker_dropped_messages",
            "Messages the NATS client dropped because a subscription buffer was full \
             (slow consumer: handlers fell behind by more than the buffer); a lower bound",
            broker.dropped.clone(),
        );
        registry.register(
            "broker_disconnects",
            "Times the connection to NATS was lost; the client reconnects by itself, and \
             core events on their way when it was lost are lost with it",
            broker.disconnects.clone(),
        );
        registry.register(
            "broker_refused",
            "Publishes and subscriptions the NATS server refused this host's user (a \
             permissions violation; each is logged with its subject). A refused plain \
             publish is a message lost",
            broker.refused.clone(),
        );
        registry.register(
            "reloads",
            "Reloads (file change, SIGHUP, POST /reload, wasmev dev) by result",
            reloads.clone(),
        );
        registry.register(
            "handler_swaps",
            "Handler versions swapped in, refused, or rolled back",
            swaps.clone(),
        );
        registry.register(
            "handler_version",
            "1 for the module digest each handler runs new events on",
            version.clone(),
        );
        registry.register(
            "last_reload_timestamp_seconds",
            "Unix time of the last reload",
            last_reload.clone(),
        );
        for result in [ReloadResult::ok, ReloadResult::refused] {
            let _ = reloads.get_or_create(&ReloadLabels { result });
        }
        Arc::new(Self {
            registry,
            reloads,
            swaps,
            version,
            last_reload,
            broker,
            received,
            ok,
            failed,
            duration,
            publishes,
            output_dropped,
            dead_lettered,
            dead_letters_refused,
            pulls_restarted,
            given_up,
            ready,
        })
    }

    /// Resolve (and so pre-register, at zero) every series for `handler`.
    pub fn handler(&self, handler: &str) -> HandlerMetrics {
        let label = HandlerLabel {
            handler: handler.to_string(),
        };
        HandlerMetrics {
            received: self.received.get_or_create(&label).clone(),
            ok: self.ok.get_or_create(&label).clone(),
            failed: FailReason::ALL.map(|reason| {
                self.failed
                    .get_or_create(&FailLabels {
                        handler: handler.to_string(),
                        reason,
                    })
                    .clone()
            }),
            duration: self.duration.get_or_create(&label).clone(),
            publishes: PublishResult::ALL.map(|result| {
                self.publishes
                    .get_or_create(&PublishLabels {
                        handler: handler.to_string(),
                        result,
                    })
                    .clone()
            }),
            output_dropped: self.output_dropped.get_or_create(&label).clone(),
            dead_lettered: self.dead_lettered.get_or_create(&label).clone(),
            dead_letters_refused: self.dead_letters_refused.get_or_create(&label).clone(),
            pulls_restarted: self.pulls_restarted.get_or_create(&label).clone(),
            given_up: self.given_up.get_or_create(&label).clone(),
        }
    }

    /// Count a finished reload.
    pub fn reloaded(&self, result: ReloadResult) {
        self.reloads.get_or_create(&ReloadLabels { result }).inc();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        self.last_reload.set(i64::try_from(now).unwrap_or(i64::MAX));
    }

    /// Count what happened to `handler` in a reload.
    pub fn swapped(&self, handler: &str, result: SwapResult) {
        self.swaps
            .get_or_create(&SwapLabels {
                handler: handler.to_string(),
                result,
            })
            .inc();
    }

    /// Record that `handler` now runs `digest` (`None`: the handler is gone), replacing
    /// the series of the version before.
    pub fn version(&self, handler: &str, before: Option<&str>, digest: Option<&str>) {
        if let Some(before) = before {
            self.version.remove(&VersionLabels {
                handler: handler.to_string(),
                digest: before.to_string(),
            });
        }
        if let Some(digest) = digest {
            self.version
                .get_or_create(&VersionLabels {
                    handler: handler.to_string(),
                    digest: digest.to_string(),
                })
                .set(1);
        }
    }

    /// The registry in Prometheus text format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

//! Every resource limit the host enforces, its default, and the reason for its value.
//!
//! Per-handler limits come from `runtime.toml`; the global caps here bound what a manifest
//! may ask for, because they size shared structures (the instance pool) or protect the
//! host itself.

use std::time::Duration;

/// Wall-clock time one event may run inside a handler when the manifest does not say.
///
/// Why 5 s: handlers have no sockets or files, so their work is CPU plus publishes; seconds
/// are generous for that, yet short enough that a stuck handler does not hold a permit
/// (and, on JetStream, the message) for long.
pub const DEFAULT_DEADLINE: Duration = Duration::from_secs(5);

/// Longest deadline a manifest may set. Why: a deadline is also how long shutdown may have
/// to wait for one event; five minutes bounds that.
pub const MAX_DEADLINE: Duration = Duration::from_secs(300);

/// Linear memory one handler instance may grow to when the manifest does not say.
///
/// Why 64 MiB: a Rust handler uses a few MiB; interpreters compiled to Wasm (JS, Python)
/// start around 20–40 MiB. 64 MiB fits both with headroom, and 16 in flight stay under 1 GiB.
pub const DEFAULT_MEMORY: u64 = 64 << 20;

/// Largest per-handler memory a manifest may set; also the size of each slot in the
/// pooling allocator. Why 1 GiB: enough for any event handler we have seen, while keeping
/// the pool's virtual reservation (slots × (slot + guard)) far below the address space.
pub const MAX_MEMORY: u64 = 1 << 30;

/// Events one handler may process at once when the manifest does not say.
///
/// Why 16: on a small machine (the 2-core CI box) more concurrency than this buys no
/// throughput for CPU-bound guests; it does bound memory at 16 × the memory limit.
pub const DEFAULT_MAX_IN_FLIGHT: u32 = 16;

/// Instances that may exist at once on one engine: the pooling allocator's size.
///
/// Why 1000: wasmtime's default. The manifest check keeps the sum of all handlers'
/// `max_in_flight` at [`MAX_TOTAL_IN_FLIGHT`], half of it, so that instantiation can never
/// fail for lack of a slot, even during a hot swap.
pub const INSTANCE_POOL: u32 = 1000;

/// Most wasm engines a manifest may need: one for each distinct pair of `stack` and
/// fuel-or-not among its handlers. Why 6: each engine's instance pool reserves ~8 TiB of
/// address space (2 memory slots per instance, 4 GiB each), x86-64 gives a process 128 TiB,
/// and a hot swap that changes every handler's settings briefly holds old and new engines:
/// 12 of them, ~95 TiB. Past ~15 engines, creating one fails with a bare mmap error.
pub const MAX_ENGINES: usize = 6;

/// Largest sum of `max_in_flight` over a manifest's handlers. Why half the pool: while a
/// handler is swapped, events already running finish on the old version as the new one
/// takes its full `max_in_flight`, so one handler can briefly hold twice its share.
pub const MAX_TOTAL_IN_FLIGHT: u32 = INSTANCE_POOL / 2;

/// Wasm stack a guest may use when the manifest does not say. Why 512 KiB: wasmtime's
/// default, and well below the 2 MiB async (fiber) stack, so host functions always have
/// stack left when a guest recursed as deep as it may.
pub const DEFAULT_WASM_STACK: u64 = 512 << 10;

/// Smallest `stack` a manifest may set. Why 64 KiB: less breaks ordinary code paths.
pub const MIN_WASM_STACK: u64 = 64 << 10;

/// Largest `stack` a manifest may set. Why 1 MiB: half the 2 MiB fiber stack, so the
/// host keeps at least 1 MiB for its own frames under any guest.
pub const MAX_WASM_STACK: u64 = 1 << 20;

/// Fiber stack for running guests on the async executor (wasmtime's default).
pub const ASYNC_STACK: usize = 2 << 20;

/// How often the engine's epoch advances. Each tick lets a running guest be preempted
/// (it yields to the scheduler) and its deadline checked. Why 10 ms: preemption within a
/// scheduler slice, at a cost of one atomic increment per tick.
pub const EPOCH_TICK: Duration = Duration::from_millis(10);

/// Bytes of stdout and of stderr kept per event; the rest is dropped and counted.
/// Why 64 KiB: enough for any diagnostic, small enough that a print loop cannot grow the
/// host's log or memory.
pub const GUEST_OUTPUT_CAP: usize = 64 << 10;

/// Longest single log line a guest may write through the `log` import; longer lines are
/// cut. Why 4 KiB: one screen of text; a log line is not a payload channel.
pub const MAX_LOG_LINE: usize = 4 << 10;

/// Largest payload a guest may publish. Why 1 MiB: nats-server's default `max_payload`;
/// the effective limit is the smaller of this and what the connected server announces.
pub const MAX_PUBLISH_PAYLOAD: usize = 1 << 20;

/// Publishes (including replies and requests) one event may make, when the manifest does
/// not say. Why 100: fan-out beyond that is a bug or a loop, and the cap keeps one event
/// from flooding the broker.
pub const DEFAULT_MAX_PUBLISHES: u32 = 100;

/// How long one publish may wait for the broker. Why 5 s: the async-nats client buffers
/// while reconnecting; past this the guest gets `unavailable` instead of hanging.
pub const PUBLISH_TIMEOUT: Duration = Duration::from_secs(5);

/// How long shutdown waits for in-flight events before giving up on them. Why 10 s:
/// longer than the default deadline (so a default handler always finishes), shorter
/// than common process supervisors' kill timeouts (systemd's 90 s, Kubernetes' 30 s).
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// Events buffered per subscription between the broker and dispatch. Why 256: dispatch
/// waits for a permit before taking the next event, so this only smooths bursts; the
/// embedded broker makes publishers wait when it is full instead of dropping.
pub const SUBSCRIPTION_BUFFER: usize = 256;

/// How long JetStream waits for an ack before redelivering, when the manifest does not say.
/// Why 30 s: nats-server's default. A handler that runs longer is kept alive with
/// in-progress acks, so this only matters when a host dies mid-event.
pub const DEFAULT_ACK_WAIT: Duration = Duration::from_secs(30);

/// Deliveries of one JetStream message before it is dead-lettered. Why 5: enough to ride
/// out a blip (with the backoff below, about 36 s of retrying), few enough that a poison
/// message leaves the queue quickly. Retries are always finite.
pub const DEFAULT_MAX_DELIVER: u32 = 5;

/// Delay before attempt n+1 when a handler fails without naming one; the last step repeats.
/// Why this ladder: a quick second try for transient faults, then backing off so a failing
/// dependency is not hammered.
pub const DEFAULT_BACKOFF: [Duration; 3] = [
    Duration::from_secs(1),
    Duration::from_secs(5),
    Duration::from_secs(30),
];

/// JetStream messages a consumer may have unacknowledged, when the manifest does not say.
/// Why 1000: nats-server's default. One host holds at most 2.5 × `max_in_flight` (running,
/// plus fetched ahead) anyway; this bounds what several hosts on one durable may hold
/// together.
pub const DEFAULT_MAX_ACK_PENDING: u32 = 1000;

/// How long one JetStream pull waits for messages before asking again (at least; a
/// handler's deadline, when longer). Why 5 s: long enough to keep idle consumers cheap,
/// short enough to notice a lost server quickly.
pub const JETSTREAM_PULL_EXPIRES: Duration = Duration::from_secs(5);

/// How often the server tells a waiting pull it is still there (an idle heartbeat); two
/// missed in a row start a new pull. Why 1 s: a stalled pull is found in ~2 s, and an
/// idle consumer costs the server one small message a second. The stall this guards
/// against is async-nats's (0.51, and 0.52, whose pull stream is the same code): its pull
/// stream counts the messages still due, and one that arrives before the stream has seen
/// its own request go out is not counted off, so the count can end above what the server
/// will send and no request follows (see `jetstream::consume`). The server wants the
/// heartbeat under half of `expires`.
pub const JETSTREAM_PULL_HEARTBEAT: Duration = Duration::from_secs(1);

/// How long a host may hold a max-deliveries advisory before JetStream gives it to
/// another (or the same host's next read): the time a crashed host's advisory waits. Why
/// 60 s: twice [`GIVEN_UP_TRY`], so a try still running is never doubled by a redelivery;
/// a host that stops in an orderly way hands its advisory back at once.
pub const GIVEN_UP_ACK_WAIT: Duration = Duration::from_secs(60);

/// Longest one try at a given-up message's dead letter may take (looking up the
/// dead-letter stream, reading the message back, publishing, the stream's ack; each
/// JetStream request waits up to 5 s). Why 30 s: room for all of those with a slow
/// server; a try that takes longer counts as refused and is tried again later.
pub const GIVEN_UP_TRY: Duration = Duration::from_secs(30);

/// After confirming new subscriptions and JetStream consumers on NATS, how long the host
/// waits for the server's refusal of one of them (or of a consumer's first pull) to reach
/// it. The round trip proves the server has answered every subscription made before it,
/// but async-nats hands the server's errors to the event callback on a task of its own,
/// so they may come a moment after the round trip's answer; and a consumer's first pull
/// goes out from its intake's task as that starts. Why 100 ms: each needs a task polled
/// once and a loopback reply, microseconds on an idle machine and more on a loaded one; a
/// hundred milliseconds covers a busy 2-core box, and is paid only when a start or reload
/// made subscriptions or consumers. A refusal later than that is still logged and
/// counted, but no longer stops the start.
pub const REFUSAL_GRACE: Duration = Duration::from_millis(100);

/// Longest time a guest `request` may wait for a reply. Why 30 s: a request is a
/// synchronous call inside an event; the event's own deadline usually ends it sooner.
pub const MAX_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Largest event payload a handler accepts when the manifest does not say; bigger events
/// fail before an instance is created. Why 1 MiB: nats-server's default `max_payload`,
/// so nothing that NATS delivers by default is refused.
pub const DEFAULT_MAX_EVENT_PAYLOAD: u64 = 1 << 20;

/// Cap on `max_payload`. Why 64 MiB: nats-server's own hard ceiling.
pub const MAX_EVENT_PAYLOAD: u64 = 64 << 20;

/// Cap on `max_publishes`. Why 10 000: a bigger fan-out from one event is a batch job.
pub const MAX_PUBLISHES_CAP: u32 = 10_000;

/// Bytes one event may publish in total (payloads and headers), when the manifest does
/// not say. Why 10 MiB: ten maximum-size messages; bounds what one event can push into
/// the broker.
pub const DEFAULT_MAX_PUBLISH_BYTES: u64 = 10 << 20;

/// Cap on `max_publish_bytes`. Why 256 MiB: bounds broker load from one event even when
/// a handler legitimately fans out large messages.
pub const MAX_PUBLISH_BYTES_CAP: u64 = 256 << 20;

/// Bytes a guest may pass to the host in one call (wasmtime's "hostcall fuel"), when the
/// manifest does not say. Why 2 MiB: one maximum-size publish plus its headers fits; a
/// guest cannot make the host allocate more on its behalf in one call (wasmtime's own
/// default is 128 MiB).
pub const DEFAULT_HOSTCALL_FUEL: u64 = 2 << 20;

/// Cap on `hostcall_fuel`. Why 64 MiB: the largest NATS message plus headroom.
pub const MAX_HOSTCALL_FUEL: u64 = 64 << 20;

/// Hops an event may have travelled through handlers before it is dropped, when the
/// manifest does not say. Each guest publish carries `Wasmev-Hops` = the triggering
/// event's hops + 1. Why 16: real pipelines are a few handlers deep; a feedback loop
/// (a handler on `a.>` publishing `a.x`) is cut after 16 rounds instead of running forever.
pub const DEFAULT_MAX_HOPS: u32 = 16;

/// Cap on `max_hops`.
pub const MAX_HOPS_CAP: u32 = 255;

/// Disk the compiled-artifact cache may use before the least recently used artifacts are
/// deleted. Why 1 GiB: a precompiled JS or Python handler is 30–60 MB, so this keeps a
/// dozen such versions (a `wasmev dev` session produces one per save) plus any number of
/// small Rust ones, without growing without bound.
pub const ARTIFACT_CACHE_BYTES: u64 = 1 << 30;

/// Largest `rollback_after` a manifest may set. Why 1000: a version whose first thousand
/// events all fail is broken; waiting for more only loses more events to it.
pub const MAX_ROLLBACK_AFTER: u32 = 1000;

/// Events a warm instance serves before it is replaced by a fresh one, with
/// `instances = "reuse"` and no `recycle_after`. Why 1000: state a guest leaks (a growing
/// cache, a fragmented heap) is bounded to a thousand events' worth, while the cost of a
/// fresh instance (a few µs) is spread so thin it does not show in throughput.
pub const DEFAULT_RECYCLE_AFTER: u32 = 1000;

/// Largest `recycle_after`. Why a million: beyond it, recycling no longer bounds anything
/// a long-running host would notice.
pub const MAX_RECYCLE_AFTER: u32 = 1_000_000;

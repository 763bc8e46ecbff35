//! The chaos suite: a fixture component misbehaves on request, on a real nats-server, and
//! for every case we assert how the host accounted for it and that an `echo` sent alongside
//! is still answered promptly. Each case is bounded to a few seconds.

mod common;

use std::time::{Duration, Instant};

use async_nats::HeaderMap;
use bytes::Bytes;
use common::*;
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(10);

struct Chaos {
    /// Kept alive for the test's duration (killed on drop).
    _server: NatsServer,
    host: TestHost,
    client: async_nats::Client,
    echo: async_nats::Subscriber,
    results: async_nats::Subscriber,
    _dir: tempfile::TempDir,
}

impl Chaos {
    /// A host with the chaos handler on `chaos.in`, plus `extra` handler settings.
    async fn start(extra: &str) -> Self {
        Self::start_module(&component("chaos"), extra).await
    }

    /// The same with the chaos handler's component at `module`.
    async fn start_module(module: &std::path::Path, extra: &str) -> Self {
        let server = NatsServer::start();
        let toml = format!(
            "version = 1\n[broker]\nurl = {:?}\n[[handler]]\nname = \"chaos\"\nmodule = {:?}\n\
             subscribe = [\"chaos.in\"]\npublish = [\"chaos.>\", \"allowed.>\"]\nmax_in_flight = 8\n{extra}\n",
            server.url(),
            module.display().to_string()
        );
        let (dir, m) = manifest(&toml);
        let host = TestHost::start(&m).await;
        let client = server.client().await;
        let echo = client.subscribe("chaos.echo").await.unwrap();
        let results = client.subscribe("chaos.result").await.unwrap();
        client.flush().await.unwrap();
        Self {
            _server: server,
            host,
            client,
            echo,
            results,
            _dir: dir,
        }
    }

    async fn send(&self, op: Value) {
        self.client
            .publish("chaos.in", op.to_string().into())
            .await
            .unwrap();
        self.client.flush().await.unwrap();
    }

    /// Send an echo and return how long the answer took.
    async fn echo_latency(&mut self) -> Duration {
        let id = format!("echo-{}", rand_id());
        let mut headers = HeaderMap::new();
        headers.insert("Wasmev-Event-Id", id.as_str());
        let sent = Instant::now();
        self.client
            .publish_with_headers(
                "chaos.in",
                headers,
                json!({"op": "echo"}).to_string().into(),
            )
            .await
            .unwrap();
        self.client.flush().await.unwrap();
        loop {
            let msg = next_within(&mut self.echo, WAIT)
                .await
                .expect("echo answered");
            if msg.payload == id.as_bytes() {
                return sent.elapsed();
            }
        }
    }

    async fn report(&mut self) -> Value {
        let msg = next_within(&mut self.results, WAIT)
            .await
            .expect("a report");
        serde_json::from_slice(&msg.payload).unwrap()
    }

    async fn wait_failed(&self, reason: &str, n: u64) {
        wait_for(
            &format!("{n} failure(s) with reason {reason}"),
            WAIT,
            || async { (self.host.failed("chaos", reason) >= n).then_some(()) },
        )
        .await;
    }
}

/// How many messages arrive on `sub` until it has been quiet for 300 ms.
async fn drain_count(sub: &mut async_nats::Subscriber) -> usize {
    let mut n = 0;
    while next_within(sub, Duration::from_millis(300)).await.is_some() {
        n += 1;
    }
    n
}

fn rand_id() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

/// Resident memory of this process (the in-process host), in bytes.
fn rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .unwrap()
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .unwrap();
    kb * 1024
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_infinite_loops_on_two_cores_do_not_starve_other_events() {
    let mut c = Chaos::start("deadline = \"2s\"").await;
    c.send(json!({"op": "spin"})).await;
    c.send(json!({"op": "spin"})).await;
    wait_for("both spins running", WAIT, || async {
        (c.host.received("chaos") == 2).then_some(())
    })
    .await;
    // Both workers are inside spinning guests; epoch preemption must still let this run
    // long before their 2s deadline. Each yield lets the worker read the socket: 1.5-50 ms
    // in eight runs alone on 2 cores. When a yield did not, the echo waited for tokio's
    // every-61-polls I/O check, 61 epoch ticks (~600 ms, in two of six runs; 1.6 s once
    // in CI).
    let latency = c.echo_latency().await;
    assert!(
        latency < Duration::from_millis(1000),
        "echo took {latency:?} while two guests spun"
    );
    assert_eq!(
        c.host.failed("chaos", "deadline"),
        0,
        "the echo came back before the deadline hit"
    );
    c.wait_failed("deadline", 2).await;
    c.host.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_4gib_allocation_is_stopped_and_host_memory_stays_bounded() {
    let mut c = Chaos::start("memory = \"64MiB\"").await;
    let before = rss();
    c.send(json!({"op": "alloc", "bytes": 4_000_000_000u64}))
        .await;
    c.send(json!({"op": "alloc", "bytes": 1u64 << 30})).await;
    c.wait_failed("memory", 2).await;
    let grown = rss().saturating_sub(before);
    assert!(grown < 256 << 20, "host RSS grew by {} MiB", grown >> 20);
    c.echo_latency().await;
    c.host.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stack_overflow_panic_and_fuel_exhaustion_fail_only_their_event() {
    let mut c = Chaos::start("fuel = 50_000_000").await;
    c.send(json!({"op": "recurse"})).await;
    c.send(json!({"op": "panic"})).await;
    c.send(json!({"op": "spin"})).await;
    c.wait_failed("trap", 2).await;
    c.wait_failed("fuel", 1).await;
    c.echo_latency().await;
    wait_for("the echo counted ok", WAIT, || async {
        (c.host.ok("chaos") == 1).then_some(())
    })
    .await;
    c.host.stop().await.unwrap();
}

/// A guest linked with a small shadow stack (the README's advice for `per-event`
/// handlers) that outgrows it: Rust puts that stack at the start of linear memory, so the
/// overflow runs off address 0 and traps. Only that event fails, in either mode: in
/// `reuse` the trapped instance (its stack pointer gone astray) is dropped, and the next
/// event runs on another.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outgrowing_a_small_shadow_stack_traps_only_that_event() {
    let module = small_stack_component("chaos");
    for instances in ["per-event", "reuse"] {
        let mut c = Chaos::start_module(&module, &format!("instances = {instances:?}")).await;
        c.echo_latency().await;
        c.send(json!({"op": "recurse"})).await;
        c.wait_failed("trap", 1).await;
        c.echo_latency().await;
        wait_for(
            &format!("both echoes counted ok ({instances})"),
            WAIT,
            || async { (c.host.ok("chaos") == 2).then_some(()) },
        )
        .await;
        assert_eq!(c.host.failed("chaos", "trap"), 1, "{instances}");
        c.host.stop().await.unwrap();
    }
}

/// What the trap says, through `wasmev test`'s contract runner (it reports the trap
/// message): what the README tells handler authors, a memory of 2 wasm pages (0x20000
/// bytes; 17 with Rust's default stack) and "out of bounds memory access".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_small_shadow_stack_overflow_reports_an_out_of_bounds_access() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("runtime.toml"),
        format!(
            "version = 1\n[[handler]]\nname = \"chaos\"\nmodule = {:?}\nsubscribe = [\"chaos.in\"]\n\
             publish = [\"chaos.>\"]\n",
            small_stack_component("chaos").display().to_string()
        ),
    )
    .unwrap();
    let cases = dir.path().join("cases.toml");
    std::fs::write(
        &cases,
        r#"manifest = "runtime.toml"

[[case]]
name = "recursing past 64 KiB"
subject = "chaos.in"
json = { op = "recurse" }
expect.result = "trap"
expect.detail = "linear memory of size 0x20000: wasm trap: out of bounds memory access"

[[case]]
name = "an echo after it"
subject = "chaos.in"
json = { op = "echo" }
expect.result = "ok"
"#,
    )
    .unwrap();
    let logs = wasmev::contract::GuestLogs::default();
    let report = wasmev::contract::run_file(&cases, None, None, &logs)
        .await
        .unwrap();
    assert_eq!(
        (report.passed(), report.failed()),
        (2, 0),
        "{}",
        report.render(true)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_host_call_argument_traps_the_guest_not_the_host() {
    // The guest may hold 256 MiB, but may hand the host at most 2 MiB per call.
    let mut c = Chaos::start("memory = \"256MiB\"").await;
    let before = rss();
    c.send(json!({"op": "publish", "subject": "allowed.big", "size": 100u64 << 20}))
        .await;
    c.wait_failed("trap", 1).await;
    let grown = rss().saturating_sub(before);
    assert!(grown < 200 << 20, "host RSS grew by {} MiB", grown >> 20);
    c.echo_latency().await;
    c.host.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_print_flood_is_capped_and_counted_without_failing_the_event() {
    let mut c = Chaos::start("").await;
    c.send(json!({"op": "print", "bytes": 8u64 << 20})).await;
    wait_for("the flood to finish", WAIT, || async {
        (c.host.ok("chaos") == 1).then_some(())
    })
    .await;
    let dropped = c.host.metric(
        "wasmev_guest_output_dropped_bytes_total",
        "handler=\"chaos\"",
    );
    assert!(dropped >= (8 << 20) - (64 << 10), "dropped {dropped} bytes");
    c.echo_latency().await;
    c.host.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_over_max_payload_publish_is_refused_and_the_connection_stays_up() {
    let mut c = Chaos::start("memory = \"32MiB\"").await;
    // 1.5 MB: over nats-server's 1 MiB max_payload, under the 2 MiB host-call bound.
    c.send(json!({"op": "publish", "subject": "allowed.big", "size": 1_500_000}))
        .await;
    let report = c.report().await;
    assert_eq!(report["results"][0], "PayloadTooLarge(1048576)");
    assert!(c.host.broker.is_connected());
    c.echo_latency().await;
    assert_eq!(c.host.publishes("chaos", "payload_too_large"), 1);
    c.host.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_storm_is_cut_at_the_quota() {
    let mut c = Chaos::start("max_publishes = 50\nmax_publish_bytes = \"16KiB\"").await;
    let mut wire = c.client.subscribe("allowed.>").await.unwrap();
    c.client.flush().await.unwrap();

    // 500 publishes: 50 reach the wire; the other 450, and the report after them, are
    // refused with quota-exceeded.
    c.send(json!({"op": "publish", "subject": "allowed.storm", "count": 500}))
        .await;
    wait_for("the storm event to finish", WAIT, || async {
        (c.host.ok("chaos") == 1).then_some(())
    })
    .await;
    assert_eq!(drain_count(&mut wire).await, 50);
    assert_eq!(c.host.publishes("chaos", "quota_exceeded"), 451);
    assert!(
        next_within(&mut c.results, Duration::from_millis(100))
            .await
            .is_none()
    );

    // The byte quota (per event, so fresh): 2 KiB messages, headers included, fit 7 times
    // in 16 KiB; the small report still fits after them.
    c.send(json!({"op": "publish", "subject": "allowed.bytes", "count": 10, "size": 2048}))
        .await;
    let report = c.report().await;
    let results: Vec<&str> = report["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(results[..7], ["ok"; 7]);
    assert_eq!(results[7..], ["QuotaExceeded"; 3]);
    assert_eq!(drain_count(&mut wire).await, 7);
    c.host.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_feedback_loop_is_cut_by_the_hop_limit() {
    let server = NatsServer::start();
    let toml = server.manifest_head()
        + &handler_block(
            "looper",
            "chaos",
            "subscribe = [\"loop.>\"]\npublish = [\"loop.>\"]\nmax_hops = 5",
        );
    let (_dir, m) = manifest(&toml);
    let host = TestHost::start(&m).await;
    let client = server.client().await;
    client
        .publish(
            "loop.start",
            json!({"op": "forward", "subject": "loop.x"})
                .to_string()
                .into(),
        )
        .await
        .unwrap();
    client.flush().await.unwrap();
    wait_for("the loop to be cut", WAIT, || async {
        (host.failed("looper", "hop_limit") == 1).then_some(())
    })
    .await;
    // Hops 0..=4 were handled, the event at hop 5 was dropped; nothing more follows.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(host.ok("looper"), 5);
    assert_eq!(host.received("looper"), 6);
    host.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attempts_to_escape_the_sandbox_are_denied_inside_the_guest() {
    let mut c = Chaos::start("").await;
    c.send(json!({"op": "escape"})).await;
    let report = c.report().await;
    let r = &report["results"][0];
    assert!(r["file"].as_str().unwrap().starts_with("denied"), "{r}");
    assert!(r["dir"].as_str().unwrap().starts_with("denied"), "{r}");
    assert!(r["socket"].as_str().unwrap().starts_with("denied"), "{r}");
    assert_eq!(r["env_vars"], 0, "{r}");
    c.host.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_events_are_refused_before_instantiation() {
    let mut c = Chaos::start("max_payload = \"1KiB\"").await;
    let big = json!({"op": "echo", "pad": "x".repeat(4096)});
    c.send(big).await;
    c.wait_failed("too_large", 1).await;
    c.echo_latency().await;
    c.host.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_inbound_subject_on_a_wildcard_subscription_panics_nothing() {
    use std::io::{Read, Write};
    let server = NatsServer::start();
    let toml = server.manifest_head()
        + &handler_block(
            "chaos",
            "chaos",
            "subscribe = [\"raw.>\", \"chaos.in\"]\npublish = [\"chaos.>\"]",
        );
    let (_dir, m) = manifest(&toml);
    let host = TestHost::start(&m).await;

    // Speak the protocol by hand: subjects no well-behaved client would send.
    let mut raw = std::net::TcpStream::connect(("127.0.0.1", server.port)).unwrap();
    raw.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let mut banner = [0u8; 4096];
    let _ = raw.read(&mut banner);
    raw.write_all(b"CONNECT {\"verbose\":false,\"pedantic\":false}\r\n")
        .unwrap();
    for subject in [
        &b"raw.\xff\xfe"[..],
        b"raw.\x1b[31m",
        b"raw.a\x00b",
        b"raw.\xc3",
    ] {
        let mut line = b"PUB ".to_vec();
        line.extend_from_slice(subject);
        line.extend_from_slice(b" 2\r\n{}\r\n");
        raw.write_all(&line).unwrap();
    }
    raw.write_all(b"PING\r\n").unwrap();
    let _ = raw.read(&mut banner);

    // async-nats reads a non-UTF-8 MSG line as a broken connection: the host's client
    // drops and reconnects (no panic). Core delivery is at-most-once, so an event sent in
    // that window may be lost; keep sending until one round-trips.
    let client = server.client().await;
    let mut echo = client.subscribe("chaos.echo").await.unwrap();
    client.flush().await.unwrap();
    within(
        "an echo after the hostile subjects",
        Duration::from_secs(20),
        async {
            loop {
                client
                    .publish("chaos.in", json!({"op": "echo"}).to_string().into())
                    .await
                    .unwrap();
                client.flush().await.unwrap();
                if next_within(&mut echo, Duration::from_millis(300))
                    .await
                    .is_some()
                {
                    break;
                }
            }
        },
    )
    .await;
    assert!(host.broker.is_connected());
    // stop() fails if any host task panicked or died.
    host.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_blocked_in_a_host_call_is_cancelled_at_its_deadline() {
    let mut c = Chaos::start("deadline = \"500ms\"").await;
    // A service that takes requests and never answers.
    let _silent = c.client.subscribe("chaos.silent").await.unwrap();
    c.client.flush().await.unwrap();
    let started = Instant::now();
    c.send(json!({"op": "ask", "subject": "chaos.silent", "payload": {}, "timeout_ms": 20_000}))
        .await;
    c.wait_failed("deadline", 1).await;
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(3),
        "asked for 20s, cut at the 500ms deadline, took {took:?}"
    );
    c.echo_latency().await;
    c.host.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_wasm_stack_limit_is_per_handler() {
    let server = NatsServer::start();
    let block = |name: &str, stack: &str| {
        handler_block(
            name,
            "chaos",
            &format!("subscribe = [\"{name}.in\"]\npublish = [\"chaos.>\"]\nstack = \"{stack}\""),
        )
    };
    let toml = server.manifest_head() + &block("small", "64KiB") + &block("large", "1MiB");
    let (_dir, m) = manifest(&toml);
    let host = TestHost::start(&m).await;
    let client = server.client().await;
    let mut results = client.subscribe("chaos.result").await.unwrap();
    client.flush().await.unwrap();
    // Measured with this fixture: a 64 KiB stack overflows before 3 000 frames, a 1 MiB
    // stack completes 30 000; 8 000 sits clearly between.
    let depth: u64 = 8_000;
    let deep = json!({"op": "deep", "depth": depth}).to_string();
    client
        .publish("large.in", deep.clone().into())
        .await
        .unwrap();
    client.publish("small.in", deep.into()).await.unwrap();
    client.flush().await.unwrap();
    let report = next_within(&mut results, WAIT)
        .await
        .expect("the large-stack handler reports");
    let v: Value = serde_json::from_slice(&report.payload).unwrap();
    assert_eq!(v["results"][0], depth);
    wait_for("the small-stack handler to overflow", WAIT, || async {
        (host.failed("small", "trap") == 1).then_some(())
    })
    .await;
    assert_eq!(host.failed("large", "trap"), 0);
    host.stop().await.unwrap();
}

/// Core NATS cannot push back: a handler far behind makes the client's subscription
/// buffer (64 Ki messages) overflow and the client drop messages. The host counts them
/// (`wasmev_broker_dropped_messages_total`) instead of losing them silently.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_dropped_by_a_full_subscription_buffer_are_counted() {
    let server = NatsServer::start();
    let toml = server.manifest_head()
        + &handler_block(
            "chaos",
            "chaos",
            "subscribe = [\"chaos.in\"]\npublish = [\"chaos.>\"]\nmax_in_flight = 1\ndeadline = \"30s\"",
        );
    let (_dir, m) = manifest(&toml);
    let host = TestHost::start(&m).await;
    let client = server.client().await;
    // The one permit is held by a long event while 70 000 more arrive.
    client
        .publish(
            "chaos.in",
            json!({"op": "busy", "ms": 20_000}).to_string().into(),
        )
        .await
        .unwrap();
    let filler = Bytes::from_static(br#"{"op":"retry","ms":1}"#);
    for _ in 0..70_000 {
        client.publish("chaos.in", filler.clone()).await.unwrap();
    }
    client.flush().await.unwrap();
    let dropped = wait_for("drops to be counted", WAIT, async || {
        let text = host.metrics.encode();
        let n = text
            .lines()
            .find_map(|l| l.strip_prefix("wasmev_broker_dropped_messages_total "))
            .map(|v| v.trim().parse::<f64>().unwrap() as u64)
            .unwrap_or(0);
        (n > 0).then_some(n)
    })
    .await;
    // At most what did not fit in the buffer (the busy event took one message out).
    assert!(dropped <= 70_001 - 65_536 + 1, "dropped {dropped}");
    drop(host);
}

//! At-least-once delivery on a real nats-server with JetStream (file store, loopback):
//! the guest's answer drives ack, nak-with-delay and dead-letter.

mod common;

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use async_nats::HeaderMap;
use async_nats::jetstream::{self, stream};
use common::*;
use futures::StreamExt as _;
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(30);

async fn create_stream(js: &jetstream::Context, name: &str, subjects: &[&str]) -> stream::Stream {
    js.create_stream(stream::Config {
        name: name.to_string(),
        subjects: subjects.iter().map(|s| s.to_string()).collect(),
        storage: stream::StorageType::File,
        ..Default::default()
    })
    .await
    .unwrap()
}

/// A fresh nats-server with `streams` (name, subjects) created, and a client on it.
async fn js_env(
    streams: &[(&str, &[&str])],
) -> (NatsServer, async_nats::Client, jetstream::Context) {
    let server = NatsServer::start();
    let client = server.client().await;
    let js = jetstream::new(client.clone());
    for (name, subjects) in streams {
        create_stream(&js, name, subjects).await;
    }
    (server, client, js)
}

const EVENTS: (&str, &[&str]) = ("EVENTS", &["js.in"]);
const SEEN: (&str, &[&str]) = ("SEEN", &["chaos.seen"]);
const DLQ: (&str, &[&str]) = ("DLQ", &["wasmev.dlq.>"]);

/// Every message in `stream`, oldest first.
async fn read_all(
    js: &jetstream::Context,
    name: &str,
) -> Vec<async_nats::jetstream::message::StreamMessage> {
    let mut stream = js.get_stream(name).await.unwrap();
    let state = stream.info().await.unwrap().state.clone();
    let mut out = Vec::new();
    if state.messages == 0 {
        return out;
    }
    for seq in state.first_sequence..=state.last_sequence {
        if let Ok(m) = stream.get_raw_message(seq).await {
            out.push(m);
        }
    }
    out
}

async fn count(js: &jetstream::Context, name: &str) -> u64 {
    js.get_stream(name)
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .state
        .messages
}

/// The durable consumer the host creates for the `chaos` handler on EVENTS.
async fn chaos_consumer(js: &jetstream::Context) -> jetstream::consumer::PullConsumer {
    js.get_stream("EVENTS")
        .await
        .unwrap()
        .get_consumer("chaos")
        .await
        .unwrap()
}

/// `(id, attempt)` for every record in the SEEN stream.
async fn seen(js: &jetstream::Context) -> Vec<(String, u64)> {
    read_all(js, "SEEN")
        .await
        .into_iter()
        .map(|m| {
            let v: Value = serde_json::from_slice(&m.payload).unwrap();
            (
                v["id"].as_str().unwrap().to_string(),
                v["attempt"].as_u64().unwrap(),
            )
        })
        .collect()
}

fn js_manifest(server: &NatsServer, jetstream: &str) -> String {
    format!("version = 1\n[broker]\nurl = {:?}\n", server.url())
        + &handler_block(
            "chaos",
            "chaos",
            &format!(
                "subscribe = [\"js.in\"]\npublish = [\"chaos.>\", \"out.>\"]\nmax_in_flight = 32\n\
                 [handler.jetstream]\nstream = \"EVENTS\"\n{jetstream}"
            ),
        )
}

async fn publish_ops(js: &jetstream::Context, ops: impl IntoIterator<Item = (String, Value)>) {
    for (id, op) in ops {
        let mut headers = HeaderMap::new();
        headers.insert("Nats-Msg-Id", id.as_str());
        js.publish_with_headers("js.in", headers, op.to_string().into())
            .await
            .unwrap()
            .await
            .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_events_are_all_processed_and_none_dead_lettered() {
    let (server, _client, js) = js_env(&[EVENTS, SEEN, DLQ]).await;
    let (_dir, m) = manifest(&js_manifest(&server, ""));
    let host = TestHost::start(&m).await;

    const N: usize = 1000;
    publish_ops(
        &js,
        (0..N).map(|i| (format!("e{i}"), json!({"op": "record"}))),
    )
    .await;
    wait_for("every event to be acked", WAIT, || async {
        (host.ok("chaos") == N as u64).then_some(())
    })
    .await;
    let ids: HashSet<String> = seen(&js).await.into_iter().map(|(id, _)| id).collect();
    assert_eq!(ids.len(), N, "every id was processed");
    assert_eq!(count(&js, "DLQ").await, 0);
    assert_eq!(
        host.metric("wasmev_dead_letters_total", "handler=\"chaos\""),
        0
    );
    host.stop().await.unwrap();
    // Everything was acked: the consumer has nothing pending.
    let mut consumer = chaos_consumer(&js).await;
    let info = consumer.info().await.unwrap();
    assert_eq!((info.num_pending, info.num_ack_pending), (0, 0));
}

/// A handler running `max_in_flight` events at once from the EVENTS stream; `extra` ends
/// up in `[handler.jetstream]`.
fn busy_manifest(server: &NatsServer, max_in_flight: u32, deadline: &str, extra: &str) -> String {
    format!("version = 1\n[broker]\nurl = {:?}\n", server.url())
        + &handler_block(
            "chaos",
            "chaos",
            &format!(
                "subscribe = [\"js.in\"]\npublish = [\"chaos.>\"]\nmax_in_flight = {max_in_flight}\n\
                 deadline = {deadline:?}\n[handler.jetstream]\nstream = \"EVENTS\"\n{extra}"
            ),
        )
}

/// `n` events that each wait on a request to `chaos.hold` (60 s at most), which the test
/// answers when it chooses: events in flight for as long as a test needs.
async fn publish_asks(js: &jetstream::Context, n: u64) {
    publish_ops(
        js,
        (0..n).map(|i| {
            let ask =
                json!({"op": "ask", "subject": "chaos.hold", "payload": {}, "timeout_ms": 60_000});
            (format!("h{i}"), ask)
        }),
    )
    .await;
}

/// The next `n` requests on `held` (events now waiting on them), each within `wait`.
async fn take_requests(
    held: &mut async_nats::Subscriber,
    n: usize,
    wait: Duration,
) -> Vec<async_nats::Message> {
    let mut requests = Vec::new();
    while requests.len() < n {
        let request = next_within(held, wait)
            .await
            .unwrap_or_else(|| panic!("{} of {n} events asked on chaos.hold", requests.len()));
        requests.push(request);
    }
    requests
}

/// Answer `first`, then every request that comes on `held`.
fn answer_requests(
    client: async_nats::Client,
    first: Vec<async_nats::Message>,
    mut held: async_nats::Subscriber,
) {
    tokio::spawn(async move {
        for request in first {
            client
                .publish(request.reply.unwrap(), "ok".into())
                .await
                .unwrap();
        }
        while let Some(request) = held.next().await {
            if let Some(reply) = request.reply {
                client.publish(reply, "ok".into()).await.unwrap();
            }
        }
    });
}

/// `n` events that each compute for `ms` milliseconds: a backlog that drains for a while.
async fn publish_busy(js: &jetstream::Context, n: usize, ms: u64) {
    publish_ops(
        js,
        (0..n).map(|i| (format!("b{i}"), json!({"op": "busy", "ms": ms}))),
    )
    .await;
}

/// A handler with a backlog takes what it runs plus what one pull and a half fetch ahead
/// (one pull asks for max_in_flight), not the backlog: the rest stays in JetStream, for
/// this host later or another host now.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_handler_holds_what_it_runs_and_one_and_a_half_pulls_not_the_backlog() {
    let (server, _client, js) = js_env(&[EVENTS]).await;
    const N: usize = 40;
    publish_busy(&js, N, 100).await;
    let (_dir, m) = manifest(&busy_manifest(&server, 4, "5s", ""));
    let host = TestHost::start(&m).await;
    let mut consumer = chaos_consumer(&js).await;
    // Delivered and not yet acked, sampled while most of the backlog is still waiting.
    let mut most = 0;
    while host.ok("chaos") < (N / 2) as u64 {
        most = most.max(consumer.info().await.unwrap().num_ack_pending);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        most >= 4,
        "never ran max_in_flight (4) at once: {most} unacked at most"
    );
    // 4 running + 1.5 pulls of 4; two more for acks sent but not yet counted by the server.
    assert!(
        most <= 4 + 6 + 2,
        "held {most} of the {N} waiting, more than it runs plus a pull and a half"
    );
    wait_for("every event to be acked", WAIT, || async {
        (host.ok("chaos") == N as u64).then_some(())
    })
    .await;
    host.stop().await.unwrap();
}

/// A host running 4 of `n` events that wait on requests (`max_in_flight = 4`, 60 s
/// deadline, 300 s ack_wait), holding the 4 of the pull it sent ahead: 8 unacked, and
/// nothing more is read while the 4 wait.
struct HoldingFour {
    server: NatsServer,
    client: async_nats::Client,
    js: jetstream::Context,
    held: async_nats::Subscriber,
    waiting: Vec<async_nats::Message>,
    dir: tempfile::TempDir,
    manifest: wasmev::Manifest,
    host: TestHost,
}

async fn holding_four(n: u64) -> HoldingFour {
    let (server, client, js) = js_env(&[EVENTS]).await;
    let mut held = client.subscribe("chaos.hold").await.unwrap();
    client.flush().await.unwrap();
    publish_asks(&js, n).await;
    let (dir, manifest) = manifest(&busy_manifest(&server, 4, "60s", "ack_wait = \"300s\""));
    let host = TestHost::start(&manifest).await;
    let waiting = take_requests(&mut held, 4, WAIT).await;
    let consumer = chaos_consumer(&js).await;
    wait_for("the host to hold the 4 it fetched ahead", WAIT, || async {
        (consumer.get_info().await.unwrap().num_ack_pending == 8).then_some(())
    })
    .await;
    HoldingFour {
        server,
        client,
        js,
        held,
        waiting,
        dir,
        manifest,
        host,
    }
}

/// A host that stops hands back, at once, what it fetched ahead and never ran: the next
/// host gets those now, not after their ack_wait (300 s here), and nothing runs twice.
///
/// The events wait on a request the test answers when it chooses, so the host is
/// stopped in a known state: 4 events running, the 4 of the pull it sent ahead held, and
/// no pull on the wire. (What a pull still has in transit when a host stops is not the
/// client's to hand back; that comes back after its ack_wait.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopping_host_hands_back_what_it_fetched_ahead() {
    const N: u64 = 8;
    let h = holding_four(N).await;
    // Stop, and only once the stop has cancelled the intake answer the 4 (so the stop
    // can finish them) and whatever comes next: answered earlier, the host could read
    // what it holds before the stop. The cancel comes within a few polls of the signal;
    // half a second is far more than that.
    let first_metrics = h.host.metrics.clone();
    let stopping = tokio::spawn(h.host.stop());
    tokio::time::sleep(Duration::from_millis(500)).await;
    answer_requests(h.client.clone(), h.waiting, h.held);
    stopping.await.unwrap().unwrap();
    let done_first = metric_in(
        &first_metrics,
        "wasmev_events_ok_total",
        "handler=\"chaos\"",
    );
    assert_eq!(
        done_first, 4,
        "the first host ran the 4 it had started, no more"
    );

    let second = TestHost::start(&h.manifest).await;
    wait_for(
        "the second host to run the 4 handed back",
        Duration::from_secs(30),
        || async { (second.ok("chaos") >= N - done_first).then_some(()) },
    )
    .await;
    // Give a duplicate the chance to show, then count: every event ran exactly once.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(done_first + second.ok("chaos"), N);
    second.stop().await.unwrap();
}

/// A hot swap to a version that runs fewer events at once (max_in_flight 4 → 1) takes
/// effect while the old version's events still hold all of its permits, and the new
/// version pulls at its own size: what the old pull fetched ahead is handed back, for
/// another host to run now, instead of staying in this one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_swap_to_a_smaller_max_in_flight_hands_back_the_old_fetch_ahead() {
    // 4 run on the first host, 4 are fetched ahead, 4 stay in the stream.
    const N: u64 = 12;
    let HoldingFour {
        server,
        client,
        js: _js,
        mut held,
        mut waiting,
        dir,
        manifest: _,
        host: first,
    } = holding_four(N).await;

    std::fs::write(
        dir.path().join("runtime.toml"),
        busy_manifest(&server, 1, "60s", "ack_wait = \"300s\""),
    )
    .unwrap();
    let report = first.reload().await;
    assert_eq!(report.result, "ok", "{report:#?}");
    // The new version runs an event while the old 4 still wait.
    waiting.extend(take_requests(&mut held, 1, WAIT).await);

    // A second host on the same durable (8 at once) finds the 4 never delivered and the
    // old pull's 4 handed back, less the 2 the first host's new pull took (one running,
    // one ahead): it runs 6. Had the first host kept the old pull's 4 (one running, 3
    // held), the second would find only the 4 never delivered until the first host's
    // events end, 60 s from now: longer than this waits.
    let (_dir2, m2) = manifest(&busy_manifest(&server, 8, "60s", "ack_wait = \"300s\""));
    let second = TestHost::start(&m2).await;
    waiting.extend(take_requests(&mut held, 5, Duration::from_secs(10)).await);

    answer_requests(client.clone(), waiting, held);
    wait_for("every event to be handled", WAIT, || async {
        (first.ok("chaos") + second.ok("chaos") >= N).then_some(())
    })
    .await;
    // Give a duplicate the chance to show, then count: every event ran exactly once.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(first.ok("chaos") + second.ok("chaos"), N);
    second.stop().await.unwrap();
    first.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poison_event_is_tried_max_deliver_times_then_dead_lettered_once() {
    let (server, client, js) = js_env(&[EVENTS, DLQ]).await;
    let (_dir, m) = manifest(&js_manifest(
        &server,
        "max_deliver = 3\nbackoff = [\"100ms\", \"200ms\"]\nack_wait = \"2s\"",
    ));
    let host = TestHost::start(&m).await;
    // Attempts are watched on a core subscription: a stream capturing `chaos.seen` would
    // (rightly) drop the repeats, which carry the same Nats-Msg-Id on every attempt.
    let mut records = client.subscribe("chaos.seen").await.unwrap();
    client.flush().await.unwrap();

    publish_ops(
        &js,
        [("poison".to_string(), json!({"op": "record_then_retry"}))],
    )
    .await;
    wait_for("the dead letter", WAIT, || async {
        (count(&js, "DLQ").await == 1).then_some(())
    })
    .await;
    let letter = read_all(&js, "DLQ").await.remove(0);
    assert_eq!(letter.subject.as_str(), "wasmev.dlq.chaos");
    assert_eq!(&letter.payload[..], br#"{"op":"record_then_retry"}"#);
    let h = &letter.headers;
    let get = |k: &str| h.get(k).map(|v| v.as_str().to_string()).unwrap_or_default();
    assert_eq!(get("Wasmev-Handler"), "chaos");
    assert_eq!(get("Wasmev-Subject"), "js.in");
    assert_eq!(get("Wasmev-Stream"), "EVENTS");
    assert_eq!(get("Wasmev-Stream-Seq"), "1");
    assert_eq!(get("Wasmev-Attempts"), "3");
    assert!(
        get("Wasmev-Error").contains("retry"),
        "{}",
        get("Wasmev-Error")
    );

    // Terminated: no further delivery. Watch for longer than ack_wait plus the backoff.
    let mut attempts = Vec::new();
    while let Some(m) = next_within(&mut records, Duration::from_secs(3)).await {
        let v: Value = serde_json::from_slice(&m.payload).unwrap();
        attempts.push(v["attempt"].as_u64().unwrap());
    }
    assert_eq!(attempts, [1, 2, 3], "exactly three attempts, numbered");
    assert_eq!(count(&js, "DLQ").await, 1, "exactly one dead letter");
    assert_eq!(
        host.metric("wasmev_dead_letters_total", "handler=\"chaos\""),
        1
    );
    assert_eq!(host.failed("chaos", "retry"), 3);
    host.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_requested_retry_delay_is_honoured() {
    let (server, client, js) = js_env(&[EVENTS]).await;
    let (_dir, m) = manifest(&js_manifest(&server, ""));
    let host = TestHost::start(&m).await;
    let mut records = client.subscribe("chaos.seen").await.unwrap();
    client.flush().await.unwrap();

    publish_ops(
        &js,
        [(
            "slow".into(),
            json!({"op": "record_then_retry_once", "ms": 700}),
        )],
    )
    .await;
    next_within(&mut records, WAIT)
        .await
        .expect("first attempt");
    let first = Instant::now();
    let second = next_within(&mut records, WAIT)
        .await
        .expect("second attempt");
    let gap = first.elapsed();
    let v: Value = serde_json::from_slice(&second.payload).unwrap();
    assert_eq!(v["attempt"], 2);
    assert!(
        gap >= Duration::from_millis(650),
        "redelivered after {gap:?}, asked for 700ms"
    );
    wait_for("the second attempt to be acked", WAIT, || async {
        (host.ok("chaos") == 1).then_some(())
    })
    .await;
    host.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_is_lost_when_nats_restarts_mid_stream() {
    let (mut server, _client, js) = js_env(&[EVENTS, SEEN]).await;
    let (_dir, m) = manifest(&js_manifest(
        &server,
        "ack_wait = \"2s\"\nbackoff = [\"100ms\"]\nmax_deliver = 20",
    ));
    const N: usize = 500;
    publish_ops(
        &js,
        (0..N).map(|i| (format!("r{i}"), json!({"op": "record"}))),
    )
    .await;

    let host = TestHost::start(&m).await;
    wait_for("some progress", WAIT, || async {
        (host.ok("chaos") >= 50).then_some(())
    })
    .await;
    server.restart();
    let js = jetstream::new(server.client().await);
    wait_for(
        "all 500 ids after the restart",
        Duration::from_secs(60),
        || async {
            let ids: HashSet<String> = seen(&js).await.into_iter().map(|(id, _)| id).collect();
            (ids.len() == N).then_some(())
        },
    )
    .await;
    // Duplicates may only be visible redeliveries.
    let mut by_id: HashMap<String, Vec<u64>> = HashMap::new();
    for (id, attempt) in seen(&js).await {
        by_id.entry(id).or_default().push(attempt);
    }
    for (id, attempts) in &by_id {
        if attempts.len() > 1 {
            assert!(
                attempts[1..].iter().all(|&a| a > 1),
                "{id} seen twice at attempt 1: {attempts:?}"
            );
        }
    }
    host.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redelivery_does_not_duplicate_the_guests_downstream_publish() {
    // OUT keeps the default duplicate window: 2 minutes.
    let (server, _client, js) = js_env(&[EVENTS, ("OUT", &["out.>"])]).await;
    let (_dir, m) = manifest(&js_manifest(&server, ""));
    let host = TestHost::start(&m).await;

    publish_ops(
        &js,
        [(
            "d1".into(),
            json!({"op": "publish_then_retry_once", "subject": "out.mail"}),
        )],
    )
    .await;
    wait_for("the retried event to succeed", WAIT, || async {
        (host.ok("chaos") == 1 && host.failed("chaos", "retry") == 1).then_some(())
    })
    .await;
    let out = read_all(&js, "OUT").await;
    assert_eq!(out.len(), 1, "two attempts published, the stream kept one");
    assert_eq!(&out[0].payload[..], b"d1");
    assert_eq!(
        out[0]
            .headers
            .get("Nats-Msg-Id")
            .map(|v| v.as_str().to_string()),
        Some("chaos:EVENTS:1:0".to_string())
    );
    host.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_stream_is_a_clear_startup_error() {
    let server = NatsServer::start();
    let (_dir, m) = manifest(&js_manifest(&server, ""));
    let err = match wasmev::Host::start(&m, wasmev::Options::default()).await {
        Ok(_) => panic!("started without its stream"),
        Err(e) => format!("{e:#}"),
    };
    assert!(err.contains("handler \"chaos\""), "{err}");
    assert!(err.contains("stream \"EVENTS\" not found"), "{err}");
    assert!(err.contains("stream_subjects"), "says how to fix it: {err}");

    // With stream_subjects the host creates it.
    let (_dir, m) = manifest(&js_manifest(&server, "stream_subjects = [\"js.in\"]"));
    let host = TestHost::start(&m).await;
    let js = jetstream::new(server.client().await);
    assert!(js.get_stream("EVENTS").await.is_ok());
    host.stop().await.unwrap();
}

/// Start `wasmev run` on `manifest` as a separate process.
fn spawn_host(manifest: &std::path::Path) -> std::process::Child {
    wasmev_command()
        .arg("run")
        .arg(manifest)
        .env("RUST_LOG", "error")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_is_lost_when_the_host_is_killed_mid_stream_and_restarted() {
    let (server, _client, js) = js_env(&[EVENTS, SEEN]).await;
    const N: usize = 300;
    // Every event fails its first attempt and asks for 300 ms: at any moment of the first
    // host's life, events are waiting unacked.
    publish_ops(
        &js,
        (0..N).map(|i| {
            (
                format!("k{i}"),
                json!({"op": "record_then_retry_once", "ms": 300}),
            )
        }),
    )
    .await;
    // A short ack_wait so the events the killed host held come back quickly.
    let (dir, _) = manifest(&js_manifest(&server, "ack_wait = \"1s\""));
    let path = dir.path().join("runtime.toml");
    let unfinished = || async {
        let mut consumer = chaos_consumer(&js).await;
        let info = consumer.info().await.unwrap();
        info.num_pending + info.num_ack_pending as u64
    };

    let mut first = spawn_host(&path);
    wait_for("the first host to make progress", WAIT, || async {
        (count(&js, "SEEN").await >= 30).then_some(())
    })
    .await;
    first.kill().unwrap(); // SIGKILL: no drain, no acks for what was in flight
    first.wait().unwrap();
    let left = unfinished().await;
    assert!(left > 0, "the kill must land mid-stream");

    let mut second = spawn_host(&path);
    wait_for(
        "every event acked after the restart",
        Duration::from_secs(60),
        || async { (unfinished().await == 0).then_some(()) },
    )
    .await;
    second.kill().unwrap();
    second.wait().unwrap();
    let ids: HashSet<String> = seen(&js).await.into_iter().map(|(id, _)| id).collect();
    assert_eq!(ids.len(), N, "every event was processed");
}

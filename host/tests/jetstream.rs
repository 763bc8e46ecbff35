//! At-least-once delivery on a real nats-server with JetStream (file store, loopback):
//! the guest's answer drives ack, nak-with-delay and dead-letter.

mod common;

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use async_nats::jetstream;
use common::js::*;
use common::*;
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(30);

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

/// The one message in stream `name` (a dead-letter stream the test emptied or filled to
/// one), once it has arrived.
async fn only_letter(
    js: &jetstream::Context,
    name: &str,
) -> async_nats::jetstream::message::StreamMessage {
    wait_for(&format!("the dead letter in {name}"), WAIT, || async {
        (count(js, name).await == 1).then_some(())
    })
    .await;
    read_all(js, name).await.remove(0)
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

/// `metric`'s value for the `chaos` handler on `host`.
fn chaos(host: &TestHost, metric: &str) -> u64 {
    host.metric(metric, "handler=\"chaos\"")
}

fn js_manifest(server: &NatsServer, jetstream: &str) -> String {
    server.manifest_head()
        + &handler_block(
            "chaos",
            "chaos",
            &format!(
                "subscribe = [\"js.in\"]\npublish = [\"chaos.>\", \"out.>\"]\nmax_in_flight = 32\n\
                 [handler.jetstream]\nstream = \"EVENTS\"\n{jetstream}"
            ),
        )
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
    assert_eq!(chaos(&host, "wasmev_dead_letters_total"), 0);
    host.stop().await.unwrap();
    // Everything was acked: the consumer has nothing pending.
    let mut consumer = chaos_consumer(&js).await;
    let info = consumer.info().await.unwrap();
    assert_eq!((info.num_pending, info.num_ack_pending), (0, 0));
}

/// A host running `chaos` with `jetstream` settings, and one stored event it retries on
/// every attempt; each attempt is recorded on the returned subscription. Keep the
/// directory: it holds the manifest.
async fn poison(
    server: &NatsServer,
    client: &async_nats::Client,
    js: &jetstream::Context,
    jetstream: &str,
) -> (tempfile::TempDir, TestHost, async_nats::Subscriber) {
    let (dir, m) = manifest(&js_manifest(server, jetstream));
    let host = TestHost::start(&m).await;
    // Attempts are watched on a core subscription: a stream capturing `chaos.seen` would
    // (rightly) drop the repeats, which carry the same Nats-Msg-Id on every attempt.
    let records = client.subscribe("chaos.seen").await.unwrap();
    client.flush().await.unwrap();
    publish_ops(
        js,
        [("poison".to_string(), json!({"op": "record_then_retry"}))],
    )
    .await;
    (dir, host, records)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poison_event_is_tried_max_deliver_times_then_dead_lettered_once() {
    let (server, client, js) = js_env(&[EVENTS, DLQ]).await;
    let (_dir, host, mut records) = poison(
        &server,
        &client,
        &js,
        "max_deliver = 3\nbackoff = [\"100ms\", \"200ms\"]\nack_wait = \"2s\"",
    )
    .await;
    let letter = only_letter(&js, "DLQ").await;
    assert_eq!(letter.subject.as_str(), "wasmev.dlq.chaos");
    assert_eq!(&letter.payload[..], br#"{"op":"record_then_retry"}"#);
    let get = |k: &str| header(&letter, k);
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
    assert_eq!(chaos(&host, "wasmev_dead_letters_total"), 1);
    assert_eq!(host.failed("chaos", "retry"), 3);
    // The host dead-lettered and terminated it itself: JetStream never gave up on it.
    assert_eq!(chaos(&host, "wasmev_jetstream_given_up_total"), 0);
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
async fn a_pull_without_heartbeats_is_started_again_and_nothing_is_lost() {
    // A server that stops answering (paused here) sends no idle heartbeats. Past two
    // missed heartbeats (2 s) the host starts a new pull, even while the server is still
    // paused, rather than wait for the client's own timer; the events published before
    // and after must all be handled.
    let (server, _client, js) = js_env(&[EVENTS, SEEN]).await;
    let (_dir, m) = manifest(&js_manifest(
        &server,
        "ack_wait = \"2s\"\nbackoff = [\"100ms\"]\nmax_deliver = 20",
    ));
    let host = TestHost::start(&m).await;
    const N: usize = 100;
    publish_ops(
        &js,
        (0..N).map(|i| (format!("before{i}"), json!({"op": "record"}))),
    )
    .await;
    wait_for("the first events", WAIT, || async {
        (host.ok("chaos") >= N as u64).then_some(())
    })
    .await;
    let restarts = || chaos(&host, "wasmev_jetstream_pulls_restarted_total");
    assert_eq!(restarts(), 0, "a healthy pull is not restarted");

    server.pause();
    wait_for("a new pull after the missed heartbeats", WAIT, || async {
        (restarts() >= 1).then_some(())
    })
    .await;
    server.resume();

    publish_ops(
        &js,
        (0..N).map(|i| (format!("after{i}"), json!({"op": "record"}))),
    )
    .await;
    wait_for("every event, before and after the stall", WAIT, || async {
        let ids: HashSet<String> = seen(&js).await.into_iter().map(|(id, _)| id).collect();
        (ids.len() == 2 * N).then_some(())
    })
    .await;
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

/// Why a host on `m` does not start (its whole error chain); panics, saying it
/// `started_anyway`, if it does.
async fn start_error(m: &wasmev::Manifest, started_anyway: &str) -> String {
    match wasmev::Host::start(m, wasmev::Options::default()).await {
        Ok(_) => panic!("{started_anyway}"),
        Err(e) => format!("{e:#}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_stream_is_a_clear_startup_error() {
    let server = NatsServer::start();
    let (_dir, m) = manifest(&js_manifest(&server, ""));
    let err = start_error(&m, "started without its stream").await;
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

/// The durable consumer outlives the host: a host started on an edited manifest finds the
/// consumer an earlier one made, and the edit must reach it. It did not: the server's
/// consumer kept its first settings, and the manifest's new ones were silently ignored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edited_jetstream_setting_reaches_the_consumer_an_earlier_host_made() {
    let (server, _client, js) = js_env(&[("EVENTS", &["js.in", "js.more"])]).await;
    let (_dir, m) = manifest(&js_manifest(
        &server,
        "max_deliver = 2\nack_wait = \"2s\"\nmax_ack_pending = 100",
    ));
    TestHost::start(&m).await.stop().await.unwrap();
    let config = chaos_consumer(&js).await.cached_info().config.clone();
    assert_eq!(
        (config.max_deliver, config.ack_wait, config.max_ack_pending),
        (2, Duration::from_secs(2), 100)
    );

    let edited = js_manifest(
        &server,
        "max_deliver = 4\nack_wait = \"3s\"\nmax_ack_pending = 50",
    );
    let (_dir, m) = manifest(&edited);
    let host = TestHost::start(&m).await;
    let config = chaos_consumer(&js).await.cached_info().config.clone();
    assert_eq!(
        (config.max_deliver, config.ack_wait, config.max_ack_pending),
        (4, Duration::from_secs(3), 50)
    );
    host.stop().await.unwrap();

    // Its subjects, and where it starts: that applies to a new consumer only, and the one
    // there keeps its place.
    let moved = edited.replace("subscribe = [\"js.in\"]", "subscribe = [\"js.more\"]")
        + "deliver = \"new\"\n";
    let (dir, m) = manifest(&moved);
    let host = TestHost::start(&m).await;
    let config = chaos_consumer(&js).await.cached_info().config.clone();
    assert_eq!(
        (config.filter_subject.as_str(), config.deliver_policy),
        ("js.more", jetstream::consumer::DeliverPolicy::All)
    );

    // And a hot reload of the running host.
    std::fs::write(
        dir.path().join("runtime.toml"),
        moved.replace("max_deliver = 4", "max_deliver = 6"),
    )
    .unwrap();
    let report = host.reload().await;
    assert_eq!(report.result, "ok", "{report:#?}");
    assert_eq!(report.swapped[0].changed, ["jetstream"], "{report:#?}");
    let config = chaos_consumer(&js).await.cached_info().config.clone();
    assert_eq!(config.max_deliver, 6);
    host.stop().await.unwrap();
}

/// What the host does about what it found on the server is in its log: the consumer
/// updated (from, to), and `stream_subjects` that differ from an existing stream's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_log_says_what_was_updated_and_what_stream_subjects_did_not_change() {
    let (server, _client, js) = js_env(&[EVENTS]).await;
    let (_dir, m) = manifest(&js_manifest(&server, "max_deliver = 2"));
    TestHost::start(&m).await.stop().await.unwrap();

    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("runtime.toml"),
        js_manifest(
            &server,
            "max_deliver = 3\nstream_subjects = [\"js.in\", \"js.more\"]",
        ),
    )
    .unwrap();
    let mut host = LoggedHost::run(dir.path(), &[("RUST_LOG", "info")]);
    host.ready(dir.path()).await;
    assert_eq!(host.exit(true), Some(0));
    let log = logged(dir.path());
    let line = |part: &str| {
        log.lines()
            .find(|l| l.contains(part))
            .unwrap_or_else(|| panic!("no line with {part:?} in:\n{log}"))
            .split_once(' ')
            .map(|(_time, rest)| rest.trim_start().to_string())
            .unwrap()
    };
    insta::assert_snapshot!(
        [line("stream_subjects"), line("updating the durable consumer")].join("\n"),
        @r#"
        WARN wasmev::broker::nats::streams: stream "EVENTS" exists and captures ["js.in"], not the ["js.in", "js.more"] of stream_subjects, which only makes a missing stream: change the stream itself to capture others stream=EVENTS
        INFO wasmev::broker::nats::streams: updating the durable consumer to the manifest's settings: max_deliver 2 → 3 stream=EVENTS durable=chaos
        "#
    );
    assert_eq!(
        chaos_consumer(&js).await.cached_info().config.max_deliver,
        3
    );
}

/// A reload that moves a JetStream handler to another durable consumer makes and reads
/// that one. The intake was started with the settings of the version still live, so the
/// old durable was made again, and read on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_that_renames_the_durable_reads_from_the_new_one() {
    let (server, _client, js) = js_env(&[EVENTS, SEEN]).await;
    let toml = js_manifest(&server, "");
    let (dir, m) = manifest(&toml);
    let host = TestHost::start(&m).await;
    std::fs::write(
        dir.path().join("runtime.toml"),
        toml + "durable = \"renamed\"\n",
    )
    .unwrap();
    let report = host.reload().await;
    assert_eq!(report.result, "ok", "{report:#?}");
    let stream = js.get_stream("EVENTS").await.unwrap();
    stream
        .get_consumer::<jetstream::consumer::pull::Config>("renamed")
        .await
        .expect("the renamed durable exists");

    publish_ops(&js, [("after".to_string(), json!({"op": "record"}))]).await;
    wait_for("the event to be handled", WAIT, || async {
        (count(&js, "SEEN").await == 1).then_some(())
    })
    .await;
    let renamed = stream
        .get_consumer::<jetstream::consumer::pull::Config>("renamed")
        .await
        .unwrap()
        .cached_info()
        .clone();
    assert_eq!(
        renamed.delivered.stream_sequence, 1,
        "read from the new durable"
    );
    host.stop().await.unwrap();
}

/// A durable the server will not change to the manifest's settings (made by someone else
/// with another ack policy) stops the start, saying what differs and what to do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_the_server_will_not_update_stops_the_start_saying_what_differs() {
    let (server, _client, js) = js_env(&[EVENTS]).await;
    js.get_stream("EVENTS")
        .await
        .unwrap()
        .create_consumer(jetstream::consumer::pull::Config {
            durable_name: Some("chaos".into()),
            ack_policy: jetstream::consumer::AckPolicy::All,
            filter_subject: "js.in".into(),
            ack_wait: Duration::from_secs(30),
            max_deliver: 5,
            max_ack_pending: 1000,
            ..Default::default()
        })
        .await
        .unwrap();
    let (_dir, m) = manifest(&js_manifest(&server, ""));
    let err = start_error(&m, "started on a consumer with another ack policy").await;
    insta::assert_snapshot!(err, @r#"handler "chaos": consumer "chaos" on stream "EVENTS" has other settings than the manifest's (ack_policy All → Explicit), and the server would not update it: JetStream error: ack policy can not be updated (code 500, error code 10012); delete the consumer (it loses its place in the stream) or give the handler a new durable"#);
}

/// A server without JetStream does not answer the JetStream API at all. The host said the
/// stream was missing and to create it (or, with `stream_subjects`, failed to create it);
/// it now says what is missing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_without_jetstream_is_named_as_such_not_as_a_missing_stream() {
    let server = NatsServer::start_without_jetstream();
    let (_dir, m) = manifest(&js_manifest(&server, "stream_subjects = [\"js.in\"]"));
    let err = start_error(&m, "started without JetStream").await;
    let url = server.url();
    assert_eq!(
        err,
        format!(
            "handler \"chaos\": failed to look up stream \"EVENTS\" on nats at {url}: nothing \
             answers the JetStream API at \"$JS.API.>\" (no responders); the server runs \
             without JetStream: start nats-server with -js (or a jetstream block in its \
             configuration)"
        )
    );
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

/// Stored messages whose headers async-nats cannot parse (a name with a space, a value
/// that is not UTF-8): each delivery of one drops the host's connection, and the messages
/// sent behind it in the same pull with it, until JetStream has delivered all of them
/// `max_deliver` times and stops. None of them was ever handled or settled; each must come
/// out in the dead-letter stream (the unreadable ones without their payload, saying where
/// they still are), and every other event be handled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_jetstream_gives_up_on_unsettled_are_dead_lettered() {
    let (server, _client, js) = js_env(&[EVENTS, SEEN, DLQ]).await;
    let (_dir, m) = manifest(&js_manifest(&server, "max_deliver = 2\nack_wait = \"2s\""));
    let host = TestHost::start(&m).await;

    // Stream sequences 1 and 2.
    for header_block in [
        &b"NATS/1.0\r\nBad Name: x"[..],
        &b"NATS/1.0\r\nX-Latin-1: caf\xe9"[..],
    ] {
        raw_hpub(&server, "js.in", header_block, br#"{"op":"record"}"#).await;
    }
    const N: usize = 20;
    publish_ops(
        &js,
        (0..N).map(|i| (format!("e{i}"), json!({"op": "record"}))),
    )
    .await;
    // Every stored message ends handled (in SEEN; `e{i}` is sequence 3 + i) or
    // dead-lettered, and the consumer holds nothing more. Not a count of the two: a good
    // message handled in a delivery whose ack the dropped connection lost is delivered
    // again (at least once), and may be handled twice, or handled and then given up on.
    let stored = N as u64 + 2;
    // Each pass's stream reads are bounded too: a stuck JetStream request fails the
    // test instead of hanging it (the pass's own deadline is checked between reads).
    within("the stream reads", WAIT * 2, async {
        let start = Instant::now();
        loop {
            let dead: HashSet<u64> = read_all(&js, "DLQ")
                .await
                .iter()
                .map(|letter| header(letter, "Wasmev-Stream-Seq").parse().unwrap())
                .collect();
            let handled: HashSet<u64> = seen(&js)
                .await
                .into_iter()
                .map(|(id, _)| 3 + id.trim_start_matches('e').parse::<u64>().unwrap())
                .collect();
            let missing: Vec<u64> = (1..=stored)
                .filter(|seq| !dead.contains(seq) && !handled.contains(seq))
                .collect();
            let info = chaos_consumer(&js).await.info().await.unwrap().clone();
            let held = (info.num_pending, info.num_ack_pending);
            if missing.is_empty() && held == (0, 0) {
                break;
            }
            assert!(
                start.elapsed() < WAIT,
                "timed out after {WAIT:?}: sequences neither handled nor dead-lettered \
                 {missing:?}, the consumer's (pending, ack pending) {held:?}, {} handled ok, \
                 dead letters for {dead:?}",
                host.ok("chaos")
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;

    let letters = read_all(&js, "DLQ").await;
    assert!(
        letters.len() >= 2,
        "the unreadable messages are dead-lettered"
    );
    let mut sequences = Vec::new();
    for letter in &letters {
        let get = |k: &str| header(letter, k);
        assert_eq!(letter.subject.as_str(), "wasmev.dlq.chaos");
        assert_eq!(get("Wasmev-Handler"), "chaos");
        assert_eq!(get("Wasmev-Stream"), "EVENTS");
        assert_eq!(get("Wasmev-Attempts"), "2");
        let error = get("Wasmev-Error");
        assert!(error.contains("stopped delivering it after 2"), "{error}");
        let sequence: u64 = get("Wasmev-Stream-Seq").parse().unwrap();
        if sequence <= 2 {
            // A message with a bad header: it cannot be read back either.
            assert!(error.contains("could not be read back"), "{error}");
            assert!(error.contains(&format!("sequence {sequence}")), "{error}");
            assert!(letter.payload.is_empty());
            assert_eq!(get("Wasmev-Subject"), "");
        } else {
            // A good one lost with it: the letter carries it whole.
            assert_eq!(&letter.payload[..], br#"{"op":"record"}"#);
            assert_eq!(get("Wasmev-Subject"), "js.in");
        }
        sequences.push(sequence);
    }
    sequences.sort_unstable();
    sequences.dedup();
    assert_eq!(
        sequences.len(),
        letters.len(),
        "no message dead-lettered twice"
    );
    assert_eq!(sequences[..2], [1, 2]);
    assert_eq!(
        chaos(&host, "wasmev_dead_letters_total"),
        letters.len() as u64
    );
    assert_eq!(
        chaos(&host, "wasmev_jetstream_given_up_total"),
        letters.len() as u64
    );
    host.stop().await.unwrap();
}

/// Two deliveries, the second 100 ms after the first; JetStream gives up 3 s after the
/// second is nak'd.
const GIVES_UP_SOON: &str = "max_deliver = 2\nbackoff = [\"100ms\", \"3s\"]\nack_wait = \"2s\"";

/// A dead-letter stream (`DLQ`, on `wasmev.dlq.>`) with room for one message, taken: every
/// dead letter is refused until it is purged.
async fn full_dead_letter_stream(js: &jetstream::Context) {
    js.create_stream(jetstream::stream::Config {
        name: "DLQ".into(),
        subjects: vec!["wasmev.dlq.>".into()],
        max_messages: 1,
        discard: jetstream::stream::DiscardPolicy::New,
        ..Default::default()
    })
    .await
    .unwrap();
    js.publish("wasmev.dlq.filler", "x".into())
        .await
        .unwrap()
        .await
        .unwrap();
}

/// Wait until JetStream has given up on the poison event and the watcher's letter for it
/// was refused (after the last delivery's own).
async fn given_up_and_refused(host: &TestHost) {
    let given_up = || chaos(host, "wasmev_jetstream_given_up_total");
    let refused = || chaos(host, "wasmev_dead_letters_refused_total");
    wait_for("the watcher's letter to be refused", WAIT, || async {
        (given_up() == 1 && refused() >= 2).then_some(())
    })
    .await;
}

/// On its last delivery an event whose dead letter cannot be published (the dead-letter
/// stream is full) is nak'd, never terminated; JetStream then gives up on it, and the
/// max-deliveries watcher tries the dead letter again until it is taken.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_refused_on_the_last_delivery_is_published_when_jetstream_gives_up() {
    let (server, client, js) = js_env(&[EVENTS]).await;
    full_dead_letter_stream(&js).await;
    let (_dir, host, mut records) = poison(&server, &client, &js, GIVES_UP_SOON).await;
    for attempt in 1..=2 {
        let m = next_within(&mut records, WAIT)
            .await
            .expect("an attempt within the timeout");
        let v: Value = serde_json::from_slice(&m.payload).unwrap();
        assert_eq!(v["attempt"], attempt);
    }
    let refused = || chaos(&host, "wasmev_dead_letters_refused_total");
    let given_up = || chaos(&host, "wasmev_jetstream_given_up_total");
    // The second attempt's dead letter was refused, and the event nak'd for 3 s.
    wait_for(
        "the second attempt's dead letter to be refused",
        WAIT,
        || async { (host.failed("chaos", "retry") == 2 && refused() == 1).then_some(()) },
    )
    .await;
    assert_eq!(chaos(&host, "wasmev_dead_letters_total"), 0);
    assert_eq!(given_up(), 0);
    // JetStream gives up on it once the nak's 3 s are over; the watcher's letter is
    // refused too, and tried again. The advisory comes only once: what was refused then
    // must not be lost.
    given_up_and_refused(&host).await;
    assert_eq!(count(&js, "DLQ").await, 1, "only the filler");
    js.get_stream("DLQ").await.unwrap().purge().await.unwrap();

    let letter = only_letter(&js, "DLQ").await;
    let get = |k: &str| header(&letter, k);
    assert_eq!(letter.subject.as_str(), "wasmev.dlq.chaos");
    assert_eq!(&letter.payload[..], br#"{"op":"record_then_retry"}"#);
    assert_eq!(get("Wasmev-Subject"), "js.in");
    assert_eq!(get("Wasmev-Stream-Seq"), "1");
    assert_eq!(get("Wasmev-Attempts"), "2");
    assert!(
        get("Wasmev-Error").contains("stopped delivering it after 2"),
        "{}",
        get("Wasmev-Error")
    );
    // Given up: no third attempt.
    assert!(
        next_within(&mut records, Duration::from_secs(3))
            .await
            .is_none()
    );
    assert_eq!(chaos(&host, "wasmev_dead_letters_total"), 1);
    assert_eq!(chaos(&host, "wasmev_jetstream_given_up_total"), 1);
    host.stop().await.unwrap();
}

/// Two hosts on one consumer: JetStream's max-deliveries advisory is dead-lettered by one of
/// them, not by each. (A dead-letter stream's duplicate window would hide a second letter,
/// so the letters are counted as published, on a core subscription.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_two_hosts_a_message_jetstream_gives_up_on_is_dead_lettered_once() {
    let (server, client, _js) = js_env(&[EVENTS]).await;
    let (_dir, m) = manifest(&js_manifest(&server, "max_deliver = 2\nack_wait = \"2s\""));
    let hosts = [TestHost::start(&m).await, TestHost::start(&m).await];
    let mut letters = client.subscribe("wasmev.dlq.chaos").await.unwrap();
    client.flush().await.unwrap();

    // Unreadable by the hosts' client: each delivery of it costs a connection, until
    // JetStream gives up on it.
    raw_hpub(
        &server,
        "js.in",
        b"NATS/1.0\r\nBad Name: x",
        br#"{"op":"record"}"#,
    )
    .await;

    let letter = next_within(&mut letters, WAIT)
        .await
        .expect("a dead letter within the timeout");
    let get = |k: &str| header_in(letter.headers.as_ref(), k);
    assert_eq!(get("Wasmev-Stream-Seq"), "1");
    assert!(
        get("Wasmev-Error").contains("could not be read back"),
        "{}",
        get("Wasmev-Error")
    );
    // Both watchers would have had the advisory at once; give a second letter time to come.
    assert!(
        next_within(&mut letters, Duration::from_secs(3))
            .await
            .is_none(),
        "dead-lettered twice"
    );
    let sum = |name: &str| -> u64 { hosts.iter().map(|h| chaos(h, name)).sum() };
    assert_eq!(sum("wasmev_jetstream_given_up_total"), 1);
    assert_eq!(sum("wasmev_dead_letters_total"), 1);
    for host in hosts {
        host.stop().await.unwrap();
    }
}

/// A reload that points dead letters at another stream replaces the JetStream intake; the
/// letter the watcher was retrying (its stream full) goes on being retried, to the new
/// subject, and arrives there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_pointing_dead_letters_elsewhere_brings_out_a_refused_given_up_letter() {
    let (server, client, js) = js_env(&[EVENTS, ("ELSEWHERE", &["elsewhere.>"])]).await;
    full_dead_letter_stream(&js).await;
    let (dir, host, _records) = poison(&server, &client, &js, GIVES_UP_SOON).await;
    given_up_and_refused(&host).await;

    std::fs::write(
        dir.path().join("runtime.toml"),
        js_manifest(
            &server,
            &format!("{GIVES_UP_SOON}\ndead_letter = \"elsewhere.chaos\""),
        ),
    )
    .unwrap();
    let report = host.reload().await;
    assert_eq!(report.result, "ok", "{report:?}");

    let letter = only_letter(&js, "ELSEWHERE").await;
    assert_eq!(letter.subject.as_str(), "elsewhere.chaos");
    assert_eq!(&letter.payload[..], br#"{"op":"record_then_retry"}"#);
    assert_eq!(header(&letter, "Wasmev-Stream-Seq"), "1");
    assert_eq!(count(&js, "DLQ").await, 1, "only the filler");
    assert_eq!(chaos(&host, "wasmev_dead_letters_total"), 1);
    host.stop().await.unwrap();
}

/// A host that stops mid-event on a message's last delivery is not there when JetStream
/// gives up on it: the advisory waits in its stream, and the next host to start
/// dead-letters the message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_given_up_while_no_host_runs_is_dead_lettered_by_the_next_host() {
    let (server, _client, js) = js_env(&[EVENTS, DLQ]).await;
    let (_dir, m) = manifest(&js_manifest(&server, "max_deliver = 2\nack_wait = \"1s\""));
    // The first host sets up the consumer, and where its advisories are kept; then stops.
    TestHost::start(&m).await.stop().await.unwrap();
    publish_ops(&js, [("lost".to_string(), json!({"op": "record"}))]).await;
    given_up_unsettled(&js, WAIT).await;

    let host = TestHost::start(&m).await;
    let letter = only_letter(&js, "DLQ").await;
    assert_eq!(&letter.payload[..], br#"{"op":"record"}"#);
    assert_eq!(header(&letter, "Wasmev-Stream-Seq"), "1");
    let error = header(&letter, "Wasmev-Error");
    assert!(error.contains("stopped delivering it after 2"), "{error}");
    // The advisory goes once its letter is out; the handler never ran the message.
    wait_for("the advisory to be acked", WAIT, || async {
        (count(&js, GIVEN_UP).await == 0).then_some(())
    })
    .await;
    assert_eq!(host.ok("chaos"), 0);
    assert_eq!(chaos(&host, "wasmev_jetstream_given_up_total"), 1);
    host.stop().await.unwrap();
}

/// A host that stops while the dead-letter stream refuses a given-up message's letter
/// hands its advisory back; the next host sends the letter once there is room.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_given_up_letter_still_refused_when_the_host_stops_is_sent_by_the_next_host() {
    let (server, client, js) = js_env(&[EVENTS]).await;
    full_dead_letter_stream(&js).await;
    let (dir, host, _records) = poison(&server, &client, &js, GIVES_UP_SOON).await;
    given_up_and_refused(&host).await;
    host.stop().await.unwrap();
    assert_eq!(count(&js, GIVEN_UP).await, 1, "the advisory is kept");
    js.get_stream("DLQ").await.unwrap().purge().await.unwrap();

    let m = wasmev::Manifest::load(&dir.path().join("runtime.toml")).unwrap();
    let host = TestHost::start(&m).await;
    let letter = only_letter(&js, "DLQ").await;
    assert_eq!(&letter.payload[..], br#"{"op":"record_then_retry"}"#);
    assert_eq!(header(&letter, "Wasmev-Stream-Seq"), "1");
    assert_eq!(chaos(&host, "wasmev_dead_letters_total"), 1);
    // Counted by the host that first read the advisory, not again.
    assert_eq!(chaos(&host, "wasmev_jetstream_given_up_total"), 0);
    host.stop().await.unwrap();
}

/// A stream of the advisory stream's name on other subjects is not taken over: the host
/// refuses to start the handler and says what is in the way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_in_the_way_of_the_advisories_is_a_clear_startup_error() {
    let (server, _client, js) = js_env(&[EVENTS, (GIVEN_UP, &["other.>"])]).await;
    let (_dir, m) = manifest(&js_manifest(&server, ""));
    let err = start_error(&m, "started with the advisories' stream taken").await;
    assert!(err.contains("handler \"chaos\""), "{err}");
    assert!(
        err.contains(&format!("stream \"{GIVEN_UP}\" exists on [\"other.>\"]")),
        "{err}"
    );
    assert!(err.contains("delete or rename that stream"), "{err}");
    // Untouched.
    let info = js
        .get_stream(GIVEN_UP)
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .clone();
    assert_eq!(info.config.subjects, ["other.>"]);
}

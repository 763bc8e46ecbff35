//! How the JetStream intake pulls on a real nats-server: what a busy handler holds, what
//! a stopping host or a hot swap hands back, and whose permits the events hold.

mod common;

use std::time::Duration;

use async_nats::jetstream;
use common::js::*;
use common::*;
use futures::StreamExt as _;
use serde_json::json;

const WAIT: Duration = Duration::from_secs(30);

/// A handler running `max_in_flight` events at once from the EVENTS stream; `extra` ends
/// up in `[handler.jetstream]`.
fn busy_manifest(server: &NatsServer, max_in_flight: u32, deadline: &str, extra: &str) -> String {
    server.manifest_head()
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

/// A subscription to the requests `publish_asks` events make, active on the server.
async fn hold_requests(client: &async_nats::Client) -> async_nats::Subscriber {
    let held = client.subscribe("chaos.hold").await.unwrap();
    client.flush().await.unwrap();
    held
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
    let mut held = hold_requests(&client).await;
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

/// Hot-swap `host` (its manifest in `dir`) to the manifest `toml`.
async fn swap_to(host: &TestHost, dir: &tempfile::TempDir, toml: String) {
    std::fs::write(dir.path().join("runtime.toml"), toml).unwrap();
    let report = host.reload().await;
    assert_eq!(report.result, "ok", "{report:#?}");
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

    swap_to(
        &first,
        &dir,
        busy_manifest(&server, 1, "60s", "ack_wait = \"300s\""),
    )
    .await;
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

/// An event read after a hot swap runs on the new version and holds one of its permits,
/// though the intake took its permit from the old version while it waited: the new
/// version never runs more than its own `max_in_flight`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_read_after_a_swap_counts_against_the_new_versions_max_in_flight() {
    let (server, client, js) = js_env(&[EVENTS]).await;
    let mut held = hold_requests(&client).await;
    let (dir, m) = manifest(&busy_manifest(&server, 1, "60s", "ack_wait = \"300s\""));
    let host = TestHost::start(&m).await;
    // Idle: the intake holds the first version's one permit, waiting for a message.
    swap_to(
        &host,
        &dir,
        busy_manifest(&server, 1, "59s", "ack_wait = \"300s\""),
    )
    .await;

    publish_asks(&js, 2).await;
    let first = take_requests(&mut held, 1, WAIT).await;
    // Had the first event kept the old version's permit, the new version's one permit
    // would still be free and the second event would ask now.
    assert!(
        next_within(&mut held, Duration::from_secs(2))
            .await
            .is_none(),
        "the new version (max_in_flight = 1) ran two events at once"
    );
    answer_requests(client.clone(), first, held);
    wait_for("both events to be handled", WAIT, || async {
        (host.ok("chaos") == 2).then_some(())
    })
    .await;
    host.stop().await.unwrap();
}

/// A run longer than `ack_wait` (3 s against 1 s) tells JetStream it is still working,
/// so the message is not redelivered while it runs: it runs once. The run waits on a
/// request rather than computing, so it takes no CPU from the tests beside it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_longer_than_ack_wait_keeps_its_message_and_runs_once() {
    let (server, client, js) = js_env(&[EVENTS]).await;
    let mut held = hold_requests(&client).await;
    publish_asks(&js, 1).await;
    let (_dir, m) = manifest(&busy_manifest(&server, 4, "10s", "ack_wait = \"1s\""));
    let host = TestHost::start(&m).await;
    let first = take_requests(&mut held, 1, WAIT).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    answer_requests(client.clone(), first, held);
    wait_for("the event to be handled", WAIT, || async {
        (host.ok("chaos") >= 1).then_some(())
    })
    .await;
    let info = chaos_consumer(&js).await.info().await.unwrap().clone();
    assert_eq!(
        (info.num_redelivered, info.num_ack_pending, host.ok("chaos")),
        (0, 0, 1),
        "redelivered while it ran"
    );
    host.stop().await.unwrap();
}

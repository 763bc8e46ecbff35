//! `instances = "reuse"`: warm instances serve event after event (guest state survives
//! between events), are recycled after `recycle_after` events, are dropped after a trap,
//! and never cross versions on a hot swap. `per-event` (the default) never shares one. A
//! handler built without std, whose fresh instances are cheaper, runs as any other.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::*;
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(10);

/// The chaos handler on the embedded broker with `extra` settings; one event at a time
/// unless `extra` sets max_in_flight.
async fn start(extra: &str) -> (tempfile::TempDir, TestHost, wasmev::broker::Subscription) {
    let limit = if extra.contains("max_in_flight") {
        ""
    } else {
        "max_in_flight = 1\n"
    };
    let toml = format!(
        "version = 1\n{}",
        handler_block(
            "chaos",
            "chaos",
            &format!("subscribe = [\"chaos.in\"]\npublish = [\"chaos.>\"]\n{limit}{extra}"),
        )
    );
    let (dir, m) = manifest(&toml);
    let host = TestHost::start(&m).await;
    let pattern = wasmev::subject::Pattern::new("chaos.result").unwrap();
    let results = within(
        "the results subscription",
        WAIT,
        host.broker.subscribe(&pattern, None),
    )
    .await
    .unwrap();
    (dir, host, results)
}

/// Publish `op` to the chaos handler. The embedded broker's publish waits while the
/// handler's buffer is full; bounded, so a stuck host fails the test instead of hanging it.
async fn send(host: &TestHost, op: &str) {
    let wasmev::broker::Broker::Memory(b) = &host.broker else {
        panic!("embedded broker expected");
    };
    let sent = b.publish("chaos.in", None, &[], Bytes::from(op.to_string()));
    within("the publish", WAIT, sent).await.unwrap();
}

/// Send `n` count events one after the other and return the counts the instances saw.
/// Each event is finished (counted ok, so its instance is back in the pool) before the
/// next is sent: the report arrives while the event is still running, and right after a
/// swap the intake's permit comes from the old version, so nothing else orders them.
async fn counts(host: &TestHost, results: &mut wasmev::broker::Subscription, n: usize) -> Vec<u64> {
    let mut seen = Vec::new();
    for _ in 0..n {
        let done = host.ok("chaos") + 1;
        send(host, r#"{"op":"count"}"#).await;
        let m = within("a count report", WAIT, results.next())
            .await
            .unwrap();
        let v: Value = serde_json::from_slice(&m.payload).unwrap();
        seen.push(v["results"][0].as_u64().unwrap());
        wait_for("the event to finish", WAIT, async || {
            (host.ok("chaos") >= done).then_some(())
        })
        .await;
    }
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_event_instances_share_nothing() {
    let (_dir, host, mut results) = start("").await;
    assert_eq!(counts(&host, &mut results, 5).await, [1, 1, 1, 1, 1]);
    host.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reused_instances_keep_state_until_recycled() {
    let (_dir, host, mut results) = start("instances = \"reuse\"\nrecycle_after = 3").await;
    assert_eq!(counts(&host, &mut results, 7).await, [1, 2, 3, 1, 2, 3, 1]);

    // A guest-chosen failure (reject, retry) leaves the instance usable: it was on its
    // first event, the reject is its second, the next count its third (and last).
    send(&host, r#"{"op":"reject","reason":"no"}"#).await;
    wait_for("the reject", WAIT, async || {
        (host.failed("chaos", "reject") == 1).then_some(())
    })
    .await;
    assert_eq!(counts(&host, &mut results, 2).await, [2, 1]);
    // A trap drops it: the next event starts on a fresh instance.
    send(&host, r#"{"op":"panic"}"#).await;
    wait_for("the trap", WAIT, async || {
        (host.failed("chaos", "trap") == 1).then_some(())
    })
    .await;
    assert_eq!(counts(&host, &mut results, 2).await, [1, 2]);
    host.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_swap_starts_the_new_version_on_fresh_instances() {
    let (dir, host, mut results) = start("instances = \"reuse\"\nconfig = { v = 1 }").await;
    assert_eq!(counts(&host, &mut results, 3).await, [1, 2, 3]);
    let path = dir.path().join("runtime.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, text.replace("v = 1", "v = 2")).unwrap();
    let report = host.reload().await;
    assert_eq!(report.swapped.len(), 1, "{report:?}");
    assert_eq!(counts(&host, &mut results, 2).await, [1, 2]);
    host.stop().await.unwrap();
}

/// A stopped host lets go of its handlers, warm instances and all. A warm instance's
/// store once held its version, and the version its pool of warm instances: a cycle that
/// kept the version alive after shutdown, and with it everything the version holds: here
/// the embedded broker, on NATS the connection. The broker is seen to go by a
/// subscription of the test's, which ends once nothing holds the broker any more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_host_lets_go_of_its_warm_instances() {
    for (extra, first) in [("", [1, 1]), ("instances = \"reuse\"", [1, 2])] {
        let (_dir, host, mut results) = start(extra).await;
        assert_eq!(counts(&host, &mut results, 2).await, first, "{extra}");
        host.stop().await.unwrap();
        let after = within(
            &format!("the broker to be let go ({extra})"),
            WAIT,
            results.next(),
        )
        .await;
        assert!(after.is_none(), "a message after shutdown: {after:?}");
    }
}

/// Events the intake takes together (a batch, under load) still run at the same time:
/// eight guests each ask a question that is answered only once all eight are waiting.
/// Were a batch run one event after another, only one question would ever be waiting
/// and every ask would time out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_taken_together_still_run_concurrently() {
    for mode in ["per-event", "reuse"] {
        let (_dir, host, mut results) = start(&format!(
            "instances = {mode:?}\nmax_in_flight = 8\ndeadline = \"20s\""
        ))
        .await;
        let wasmev::broker::Broker::Memory(b) = &host.broker else {
            panic!("embedded broker expected");
        };
        let mut questions = b.subscribe(
            wasmev::subject::Pattern::new("chaos.question").unwrap(),
            None,
        );
        for _ in 0..8 {
            send(
                &host,
                r#"{"op":"ask","subject":"chaos.question","payload":"?","timeout_ms":15000}"#,
            )
            .await;
        }
        let mut waiting = Vec::new();
        while waiting.len() < 8 {
            let q = within("all eight questions at once", WAIT, questions.next())
                .await
                .unwrap();
            waiting.push(q.reply.expect("a request has a reply subject"));
        }
        for reply in &waiting {
            b.publish(reply, None, &[], Bytes::from_static(b"answer"))
                .await
                .unwrap();
        }
        for _ in 0..8 {
            let m = within("an ask report", WAIT, results.next()).await.unwrap();
            let v: Value = serde_json::from_slice(&m.payload).unwrap();
            assert_eq!(
                v["results"][0],
                serde_json::json!({ "ok": "answer" }),
                "{mode}: {v}"
            );
        }
        host.stop().await.unwrap();
    }
}

/// The SDK without its `std` feature: the component imports wasmev's interfaces and no
/// WASI one (what makes its fresh instances cheaper; the std-built chaos handler imports
/// a dozen), and it handles events as the std build does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_built_without_std_imports_no_wasi_and_handles_events() {
    let module = no_std_component("bench-echo-lean");
    let imports = component_imports(&module);
    let outside: Vec<&String> = imports
        .iter()
        .filter(|name| !name.starts_with("wasmev:events/"))
        .collect();
    assert!(outside.is_empty(), "imports outside wasmev's: {outside:?}");
    assert!(
        component_imports(&component("chaos"))
            .iter()
            .any(|name| name.starts_with("wasi:")),
        "the std build should import WASI, or this test compares nothing"
    );

    let (_dir, m) = manifest(&format!(
        "version = 1\n[[handler]]\nname = \"echo\"\nmodule = {:?}\n\
         subscribe = [\"bench.in\"]\npublish = [\"bench.out\"]\n",
        module.display().to_string()
    ));
    let host = TestHost::start(&m).await;
    let pattern = wasmev::subject::Pattern::new("bench.out").unwrap();
    let mut out = within(
        "the subscription",
        WAIT,
        host.broker.subscribe(&pattern, None),
    )
    .await
    .unwrap();
    let wasmev::broker::Broker::Memory(broker) = &host.broker else {
        panic!("embedded broker expected");
    };
    for payload in ["first", "second"] {
        let sent = broker.publish("bench.in", None, &[], Bytes::from(payload));
        within("the publish", WAIT, sent).await.unwrap();
        let echoed = within("the echo", WAIT, out.next()).await.unwrap();
        assert_eq!(echoed.payload, payload.as_bytes());
    }
    within("the host to stop", WAIT, host.stop()).await.unwrap();
}

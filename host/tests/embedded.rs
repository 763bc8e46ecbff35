//! End to end on the embedded broker: the zero-setup default. Events come in through the
//! admin endpoint's `POST /publish` and through the `wasmev publish` command.

mod common;

use std::time::Duration;
use tokio::process::Command;

use common::*;
use serde_json::{Value, json};
use wasmev::broker::Broker;
use wasmev::subject::Pattern;

const WAIT: Duration = Duration::from_secs(10);

fn embedded_manifest() -> String {
    "version = 1\n[admin]\nlisten = \"127.0.0.1:0\"\n".to_string()
        + &handler_block(
            "email-sender",
            "email-sender",
            "subscribe = [\"user.created\"]\npublish = [\"email.sent\"]\nconfig = { from = \"team@example.com\" }",
        )
        + &handler_block(
            "audit-log",
            "audit-log",
            "subscribe = [\"user.>\"]\npublish = [\"audit.recorded\"]",
        )
}

fn watch(host: &TestHost, pattern: &str) -> wasmev::broker::memory::MemorySubscription {
    let Broker::Memory(b) = &host.broker else {
        panic!("expected the embedded broker")
    };
    b.subscribe(Pattern::new(pattern).unwrap(), None)
}

async fn next_json(sub: &mut wasmev::broker::memory::MemorySubscription) -> Value {
    let msg = within("a message on the embedded broker", WAIT, sub.next())
        .await
        .expect("subscription open");
    serde_json::from_slice(&msg.payload).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_publish_flows_through_both_handlers() {
    let (_dir, m) = manifest(&embedded_manifest());
    let host = TestHost::start(&m).await;
    let admin = format!("http://{}", host.admin.unwrap());
    let mut emails = watch(&host, "email.sent");
    let mut audit = watch(&host, "audit.recorded");
    let http = reqwest::Client::new();

    let health = http.get(format!("{admin}/healthz")).send().await.unwrap();
    assert_eq!(health.status(), 200);

    let response = http
        .post(format!(
            "{admin}/publish/user.created?header=source:signup-form"
        ))
        .body(json!({"id": "u1", "name": "Grace", "email": "grace@example.com"}).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    let body: Value = serde_json::from_str(&response.text().await.unwrap()).unwrap();
    assert_eq!(
        body["delivered"], 2,
        "email-sender and audit-log both subscribe"
    );

    let email = next_json(&mut emails).await;
    assert_eq!(email["to"], "grace@example.com");
    assert_eq!(email["from"], "team@example.com");
    assert_eq!(email["user_id"], "u1");
    let record = next_json(&mut audit).await;
    assert_eq!(record["subject"], "user.created");
    assert_eq!(record["source"], "signup-form", "headers reach the guest");

    // Bad input to the ingress is a 400 with a reason, not a crash.
    let bad = http
        .post(format!("{admin}/publish/user..created"))
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);
    assert!(bad.text().await.unwrap().contains("empty token"));

    // A guest's publish arrives before its result is counted: wait for the counters.
    wait_for("both handlers counted ok on /metrics", WAIT, || async {
        let metrics = http
            .get(format!("{admin}/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        (metrics.contains("wasmev_events_ok_total{handler=\"email-sender\"} 1")
            && metrics.contains("wasmev_events_ok_total{handler=\"audit-log\"} 1")
            && metrics.contains("wasmev_event_duration_seconds_count{handler=\"email-sender\"} 1")
            && metrics.contains("wasmev_ready 1"))
        .then_some(())
    })
    .await;
    host.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wasmev_publish_reaches_a_host_on_the_embedded_broker() {
    let (dir, m) = manifest(&embedded_manifest());
    let host = TestHost::start(&m).await;
    let mut emails = watch(&host, "email.sent");
    let admin = format!("http://{}", host.admin.unwrap());

    let out = Command::from(wasmev_command())
        .current_dir(dir.path())
        .args([
            "publish",
            "user.created",
            "-H",
            "source=cli",
            "--admin",
            &admin,
        ])
        .arg(json!({"id": 9, "name": "Lin", "email": "lin@example.com"}).to_string())
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("2 subscriber(s)"), "{stdout}");
    let email = next_json(&mut emails).await;
    assert_eq!(email["user_id"], "9");

    // Bad input fails fast with a reason and a non-zero exit.
    let out = Command::from(wasmev_command())
        .args(["publish", "user.*", "x", "--admin", &admin])
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid subject \"user.*\""));
    host.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_lets_in_flight_events_finish() {
    let toml = "version = 1\n".to_string()
        + &handler_block(
            "chaos",
            "chaos",
            "subscribe = [\"chaos.in\"]\npublish = [\"chaos.result\"]",
        );
    let (_dir, m) = manifest(&toml);
    let host = TestHost::start(&m).await;
    let mut results = watch(&host, "chaos.result");
    let Broker::Memory(b) = &host.broker else {
        unreachable!()
    };
    b.publish(
        "chaos.in",
        None,
        &[],
        json!({"op": "busy", "ms": 400}).to_string().into(),
    )
    .await
    .unwrap();
    wait_for("the event to be in flight", WAIT, || async {
        (host.received("chaos") == 1).then_some(())
    })
    .await;
    let metrics = host.metrics.clone();
    host.stop().await.unwrap();
    // serve() returned only after the in-flight event completed and published.
    let report = next_json(&mut results).await;
    assert_eq!(report["op"], "busy");
    assert!(
        metrics
            .encode()
            .contains("wasmev_events_ok_total{handler=\"chaos\"} 1")
    );
}

/// A guest waiting in a host call is cut at its deadline, not at the call's own limit:
/// here its publishes fill a subscriber that never reads (the embedded broker makes a
/// publisher wait for room, up to the 5 s publish timeout), and a 500 ms deadline ends
/// the event. The epoch cannot stop a guest that is not running; this is dispatch's
/// timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_waiting_on_a_full_subscriber_is_cut_at_its_deadline() {
    let toml = "version = 1\n".to_string()
        + &handler_block(
            "chaos",
            "chaos",
            "subscribe = [\"chaos.in\"]\npublish = [\"chaos.>\"]\ndeadline = \"500ms\"\n\
             max_publishes = 1000",
        );
    let (_dir, m) = manifest(&toml);
    let host = TestHost::start(&m).await;
    // Never read: its buffer (256 messages) fills, and the next publish waits.
    let _full = watch(&host, "chaos.sink");
    let Broker::Memory(b) = &host.broker else {
        unreachable!()
    };
    let started = std::time::Instant::now();
    b.publish(
        "chaos.in",
        None,
        &[],
        json!({"op": "publish", "subject": "chaos.sink", "count": 1000})
            .to_string()
            .into(),
    )
    .await
    .unwrap();
    wait_for("the event to fail at its deadline", WAIT, || async {
        (host.failed("chaos", "deadline") == 1).then_some(())
    })
    .await;
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(3),
        "a 500ms deadline, the publish timeout 5s: took {took:?}"
    );
    assert_eq!(host.ok("chaos"), 0);
    host.stop().await.unwrap();
}

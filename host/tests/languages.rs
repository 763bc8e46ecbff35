//! Example handlers written in other languages, built from source with their own
//! toolchains and run through a real host: event in, expected publish out, and their
//! reject and retry paths.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::*;
use serde_json::Value;

async fn publish(host: &TestHost, subject: &str, payload: &str, headers: &[(&str, &str)]) {
    let wasmev::broker::Broker::Memory(b) = &host.broker else {
        panic!("embedded broker expected");
    };
    let headers: Vec<(String, String)> = headers
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    b.publish(subject, None, &headers, Bytes::from(payload.to_string()))
        .await
        .unwrap();
}

async fn next(sub: &mut wasmev::broker::Subscription) -> wasmev::broker::Message {
    within(
        "a publish from the handler",
        Duration::from_secs(20),
        sub.next(),
    )
    .await
    .unwrap()
}

/// Python (componentize-py): scores signups, passes the `source` header on, flags the
/// suspicious ones, rejects what is not a user, and asks for a retry while paused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_signup_scorer() {
    let module = foreign_component("signup-scorer", "signup_scorer.wasm");
    let block = |paused: bool| {
        format!(
            "[[handler]]\nname = \"scorer\"\nmodule = {:?}\nsubscribe = [\"user.created\"]\n\
             publish = [\"user.scored\", \"user.flagged\"]\n\
             config = {{ blocked_domains = \"evil.example\", threshold = 60, paused = {paused} }}\n",
            module.display().to_string()
        )
    };
    let (_dir, m) = manifest(&format!("version = 1\n{}", block(false)));
    let host = TestHost::start_with(&m, cached_options()).await;
    let pattern = |s: &str| wasmev::subject::Pattern::new(s).unwrap();
    let mut scored = host
        .broker
        .subscribe(&pattern("user.scored"), None)
        .await
        .unwrap();
    let mut flagged = host
        .broker
        .subscribe(&pattern("user.flagged"), None)
        .await
        .unwrap();

    publish(
        &host,
        "user.created",
        r#"{"id":"u1","name":"Ada","email":"ada@example.com"}"#,
        &[("source", "signup-form")],
    )
    .await;
    let m = next(&mut scored).await;
    let v: Value = serde_json::from_slice(&m.payload).unwrap();
    assert_eq!(v["id"], "u1");
    assert_eq!(v["score"], 0);
    assert!(
        m.headers
            .contains(&("source".to_string(), "signup-form".to_string())),
        "{:?}",
        m.headers
    );

    publish(
        &host,
        "user.created",
        r#"{"id":"u2","name":"1234567","email":"x@evil.example"}"#,
        &[],
    )
    .await;
    let v: Value = serde_json::from_slice(&next(&mut scored).await.payload).unwrap();
    assert_eq!(v["score"], 95);
    assert_eq!(v["reasons"][0], "blocked domain evil.example");
    let f: Value = serde_json::from_slice(&next(&mut flagged).await.payload).unwrap();
    assert_eq!(f["id"], "u2");

    publish(&host, "user.created", r#"{"name":"no id"}"#, &[]).await;
    wait_for("the reject", Duration::from_secs(10), async || {
        (host.failed("scorer", "reject") == 1).then_some(())
    })
    .await;
    assert_eq!(host.ok("scorer"), 2);
    host.stop().await.unwrap();

    // Paused by config: every event asks for a retry.
    let (_dir, m) = manifest(&format!("version = 1\n{}", block(true)));
    let host = TestHost::start_with(&m, cached_options()).await;
    publish(&host, "user.created", r#"{"id":"u3"}"#, &[]).await;
    wait_for("the retry", Duration::from_secs(10), async || {
        (host.failed("scorer", "retry") == 1).then_some(())
    })
    .await;
    host.stop().await.unwrap();
}

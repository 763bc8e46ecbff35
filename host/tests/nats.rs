//! End to end on a real nats-server: events in through NATS, into real Wasm handlers,
//! and their publishes observed by a plain async-nats subscriber.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use async_nats::HeaderMap;
use common::*;
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(10);

async fn publish_json(client: &async_nats::Client, subject: &str, value: Value) {
    client
        .publish(subject.to_string(), value.to_string().into())
        .await
        .unwrap();
    client.flush().await.unwrap();
}

async fn next_json(sub: &mut async_nats::Subscriber) -> Value {
    let msg = next_within(sub, WAIT)
        .await
        .expect("a message within the timeout");
    serde_json::from_slice(&msg.payload).unwrap()
}

/// A host running the email-sender on `server`, a client, and its subscription to
/// `email.sent`, which is where the handler's answers go. Keep the directory: it holds the
/// manifest.
async fn email_sender(
    server: &NatsServer,
) -> (
    tempfile::TempDir,
    TestHost,
    async_nats::Client,
    async_nats::Subscriber,
) {
    let toml = server.manifest_head()
        + &handler_block(
            "email-sender",
            "email-sender",
            r#"subscribe = ["user.created"]
publish = ["email.sent"]
config = { from = "hello@example.com", subject = "Welcome, {name}!" }"#,
        );
    let (dir, m) = manifest(&toml);
    let host = TestHost::start(&m).await;
    let client = server.client().await;
    let sent = client.subscribe("email.sent").await.unwrap();
    client.flush().await.unwrap();
    (dir, host, client, sent)
}

/// On a server without JetStream: core handlers use none of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_created_becomes_email_sent() {
    let server = NatsServer::start_without_jetstream();
    let (_dir, host, client, mut sent) = email_sender(&server).await;

    publish_json(
        &client,
        "user.created",
        json!({"id": "u-42", "name": "Ada", "email": "ada@example.com"}),
    )
    .await;
    let email = next_json(&mut sent).await;
    assert_eq!(email["to"], "ada@example.com");
    assert_eq!(email["from"], "hello@example.com");
    assert_eq!(email["subject"], "Welcome, Ada!");
    assert_eq!(email["user_id"], "u-42");
    assert!(email["body"].as_str().unwrap().contains("Ada"));

    // A user without a usable address is rejected, and nothing is sent for it.
    publish_json(
        &client,
        "user.created",
        json!({"id": 7, "name": "Bob", "email": "not-an-address"}),
    )
    .await;
    wait_for("the reject to be counted", WAIT, || async {
        (host.failed("email-sender", "reject") == 1).then_some(())
    })
    .await;
    assert!(
        next_within(&mut sent, Duration::from_millis(300))
            .await
            .is_none()
    );
    assert_eq!(host.ok("email-sender"), 1);
    host.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wildcard_subscription_sees_every_depth_and_nothing_else() {
    let server = NatsServer::start();
    let toml = server.manifest_head()
        + &handler_block(
            "audit-log",
            "audit-log",
            "subscribe = [\"user.>\"]\npublish = [\"audit.recorded\"]",
        );
    let (_dir, m) = manifest(&toml);
    let host = TestHost::start(&m).await;
    let client = server.client().await;
    let mut audit = client.subscribe("audit.recorded").await.unwrap();
    client.flush().await.unwrap();

    for subject in [
        "order.created",
        "user",
        "user.created",
        "user.profile.updated",
    ] {
        client.publish(subject, "{}".into()).await.unwrap();
    }
    client.flush().await.unwrap();
    let mut seen = vec![
        next_json(&mut audit).await["subject"]
            .as_str()
            .unwrap()
            .to_string(),
        next_json(&mut audit).await["subject"]
            .as_str()
            .unwrap()
            .to_string(),
    ];
    seen.sort();
    assert_eq!(seen, ["user.created", "user.profile.updated"]);
    assert!(
        next_within(&mut audit, Duration::from_millis(300))
            .await
            .is_none()
    );
    assert_eq!(host.received("audit-log"), 2);
    host.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_group_across_two_hosts_handles_each_event_once() {
    let server = NatsServer::start();
    let toml = server.manifest_head()
        + &handler_block(
            "audit-log",
            "audit-log",
            "subscribe = [\"user.>\"]\nqueue = \"audit\"\npublish = [\"audit.recorded\"]",
        );
    let (_dir, m) = manifest(&toml);
    let first = TestHost::start(&m).await;
    let second = TestHost::start(&m).await;
    let client = server.client().await;
    let mut audit = client.subscribe("audit.recorded").await.unwrap();
    client.flush().await.unwrap();

    const EVENTS: usize = 200;
    for i in 0..EVENTS {
        let mut headers = HeaderMap::new();
        headers.insert("Wasmev-Event-Id", format!("evt-{i}").as_str());
        client
            .publish_with_headers("user.created", headers, "{}".into())
            .await
            .unwrap();
    }
    client.flush().await.unwrap();
    let mut counts: HashMap<String, u32> = HashMap::new();
    for _ in 0..EVENTS {
        let record = next_json(&mut audit).await;
        *counts
            .entry(record["event_id"].as_str().unwrap().to_string())
            .or_default() += 1;
    }
    assert!(
        next_within(&mut audit, Duration::from_millis(300))
            .await
            .is_none()
    );
    assert_eq!(counts.len(), EVENTS, "every event was handled");
    assert!(
        counts.values().all(|&n| n == 1),
        "no event was handled twice"
    );
    let (a, b) = (first.received("audit-log"), second.received("audit-log"));
    assert_eq!(a + b, EVENTS as u64);
    assert!(a > 0 && b > 0, "both hosts took part (got {a} and {b})");
    first.stop().await.unwrap();
    second.stop().await.unwrap();
}

fn chaos(server: &NatsServer, extra: &str) -> String {
    server.manifest_head()
        + &handler_block(
            "chaos",
            "chaos",
            &format!(
                "subscribe = [\"chaos.in\"]\npublish = [\"chaos.result\", \"chaos.echo\", \"allowed.>\"]\n{extra}"
            ),
        )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishes_outside_the_grant_or_with_bad_subjects_are_refused_and_never_sent() {
    let server = NatsServer::start();
    let (_dir, m) = manifest(&chaos(&server, ""));
    let host = TestHost::start(&m).await;
    let client = server.client().await;
    let mut results = client.subscribe("chaos.result").await.unwrap();
    let mut everything = client.subscribe(">").await.unwrap();
    client.flush().await.unwrap();

    let cases = [
        ("secret.data", "AccessDenied"),
        ("allowedx", "AccessDenied"),
        ("", "InvalidSubject"),
        ("allowed..x", "InvalidSubject"),
        ("allowed.*", "InvalidSubject"),
        ("allowed.>", "InvalidSubject"),
        ("allowed. x", "InvalidSubject"),
        ("allowed.x.", "InvalidSubject"),
        ("allowed.ok", "ok"),
    ];
    for (subject, expected) in cases {
        publish_json(
            &client,
            "chaos.in",
            json!({"op": "publish", "subject": subject}),
        )
        .await;
        let report = next_json(&mut results).await;
        let result = report["results"][0].as_str().unwrap();
        assert!(
            result.starts_with(expected),
            "publish to {subject:?}: expected {expected}, guest saw {result}"
        );
    }
    // Bad headers come back as errors too: never a trap, never on the wire.
    publish_json(
        &client,
        "chaos.in",
        json!({"op": "publish", "subject": "allowed.h", "headers": [["X-Bad", "a\r\nPUB evil 1"]]}),
    )
    .await;
    let report = next_json(&mut results).await;
    assert!(
        report["results"][0]
            .as_str()
            .unwrap()
            .starts_with("InvalidHeader")
    );

    // Everything the wire carried: our inputs, the reports, and the one allowed publish.
    let mut wire = Vec::new();
    while let Some(msg) = next_within(&mut everything, Duration::from_millis(300)).await {
        wire.push(msg.subject.to_string());
    }
    let leaked: Vec<_> = wire
        .iter()
        .filter(|s| !matches!(s.as_str(), "chaos.in" | "chaos.result"))
        .collect();
    assert_eq!(
        leaked,
        ["allowed.ok"],
        "only the granted publish reached nats"
    );
    assert_eq!(host.publishes("chaos", "access_denied"), 2);
    assert_eq!(host.publishes("chaos", "invalid_subject"), 6);
    assert_eq!(host.publishes("chaos", "invalid_header"), 1);
    assert_eq!(host.failed("chaos", "trap"), 0);
    host.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traps_and_deadline_overruns_leave_the_host_serving() {
    let server = NatsServer::start();
    let (_dir, m) = manifest(&chaos(&server, "deadline = \"300ms\"\nmemory = \"16MiB\""));
    let host = TestHost::start(&m).await;
    let client = server.client().await;
    let mut echo = client.subscribe("chaos.echo").await.unwrap();
    client.flush().await.unwrap();

    for op in [
        json!({"op": "spin"}),
        json!({"op": "panic"}),
        json!({"op": "recurse"}),
        json!({"op": "alloc", "bytes": 64 << 20}),
        json!({"op": "reject", "reason": "no thanks"}),
        json!({"op": "retry", "ms": 10}),
    ] {
        publish_json(&client, "chaos.in", op).await;
    }
    wait_for("every failure to be counted", WAIT, || async {
        (host.failed("chaos", "deadline") == 1
            && host.failed("chaos", "trap") == 2
            && host.failed("chaos", "memory") == 1
            && host.failed("chaos", "reject") == 1
            && host.failed("chaos", "retry") == 1)
            .then_some(())
    })
    .await;

    // And the next event is still handled.
    let mut headers = HeaderMap::new();
    headers.insert("Wasmev-Event-Id", "after-the-storm");
    client
        .publish_with_headers(
            "chaos.in",
            headers,
            json!({"op": "echo"}).to_string().into(),
        )
        .await
        .unwrap();
    let msg = next_within(&mut echo, WAIT)
        .await
        .expect("echo after failures");
    assert_eq!(&msg.payload[..], b"after-the-storm");
    host.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_keeps_handling_events_after_nats_restarts() {
    let mut server = NatsServer::start();
    let (_dir, m) = manifest(&chaos(&server, ""));
    let host = TestHost::start(&m).await;
    {
        let client = server.client().await;
        let mut echo = client.subscribe("chaos.echo").await.unwrap();
        client.flush().await.unwrap();
        publish_json(&client, "chaos.in", json!({"op": "echo"})).await;
        next_within(&mut echo, WAIT)
            .await
            .expect("echo before the restart");
    }

    server.restart();
    wait_for("the host to reconnect", Duration::from_secs(20), || async {
        host.broker.is_connected().then_some(())
    })
    .await;
    // Core NATS is at-most-once: events published before the host has re-subscribed are
    // lost by design, so keep publishing until one round-trips.
    let client = server.client().await;
    let mut echo = client.subscribe("chaos.echo").await.unwrap();
    client.flush().await.unwrap();
    within(
        "an echo after the restart",
        Duration::from_secs(20),
        async {
            loop {
                publish_json(&client, "chaos.in", json!({"op": "echo"})).await;
                if next_within(&mut echo, Duration::from_millis(200))
                    .await
                    .is_some()
                {
                    break;
                }
            }
        },
    )
    .await;
    // At least one: the client may lose a connection it made while the server was stopping.
    assert!(host.metric("wasmev_broker_disconnects_total", "") >= 1);
    host.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_are_answered_by_a_wasm_service_and_guests_can_ask() {
    let server = NatsServer::start();
    let grants = "publish = [\"chaos.>\", \"svc.>\"]";
    let toml = server.manifest_head()
        + &handler_block(
            "service",
            "chaos",
            &format!("subscribe = [\"svc.chaos\"]\nservice = true\n{grants}"),
        )
        + &handler_block(
            "asker",
            "chaos",
            &format!("subscribe = [\"ask.in\"]\n{grants}"),
        );
    let (_dir, m) = manifest(&toml);
    let host = TestHost::start(&m).await;
    let client = server.client().await;
    let timeout = Duration::from_secs(2);
    let request = |payload: Value| {
        let client = client.clone();
        async move {
            within(
                "a reply",
                timeout * 2,
                client.send_request(
                    "svc.chaos",
                    async_nats::Request::new()
                        .payload(payload.to_string().into())
                        .timeout(Some(timeout)),
                ),
            )
            .await
            .expect("a reply, not a timeout")
        }
    };

    let answer = request(json!({"op": "reply", "text": "pong"})).await;
    assert_eq!(&answer.payload[..], b"pong");

    // A rejecting service answers with an error at once instead of leaving the caller
    // to time out.
    let answer = request(json!({"op": "reject", "reason": "not today"})).await;
    let headers = answer.headers.expect("error headers");
    let error = headers.get("Nats-Service-Error").unwrap().as_str();
    assert!(error.contains("not today"), "{error}");
    assert_eq!(
        headers.get("Nats-Service-Error-Code").unwrap().as_str(),
        "400"
    );

    // A guest asks the service, asks nobody, and asks outside its grant.
    let mut results = client.subscribe("chaos.result").await.unwrap();
    client.flush().await.unwrap();
    for (subject, expected) in [
        ("svc.chaos", json!({"ok": "hi"})),
        ("svc.nobody", json!({"err": "RequestError::NoResponders"})),
        (
            "secret.x",
            json!({"err": "RequestError::Refused(PublishError::AccessDenied(\"secret.x\"))"}),
        ),
    ] {
        publish_json(
            &client,
            "ask.in",
            json!({"op": "ask", "subject": subject, "payload": {"op": "reply", "text": "hi"}, "timeout_ms": 2000}),
        )
        .await;
        let report = next_json(&mut results).await;
        assert_eq!(report["results"][0], expected, "asking {subject}");
    }
    wait_for("three asks counted ok", WAIT, || async {
        (host.ok("asker") == 3).then_some(())
    })
    .await;
    host.stop().await.unwrap();
}

/// Any client on the broker can send a header value holding a lone `\r` (the protocol
/// splits header lines on `\r\n`). async-nats 0.51 parsed it into a `HeaderValue` whose
/// `From<String>` asserts there is none: the client's connection task panicked and the
/// host received nothing more. 0.52 reads it with the `\r` as a space.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_header_value_with_a_carriage_return_does_not_stop_the_host() {
    let server = NatsServer::start();
    let (_dir, host, client, mut sent) = email_sender(&server).await;

    let user = json!({"id": "u-1", "name": "Ada", "email": "ada@example.com"});
    raw_hpub(
        &server,
        "user.created",
        b"NATS/1.0\r\nX-Note: a\rb",
        user.to_string().as_bytes(),
    )
    .await;
    let email = next_json(&mut sent).await;
    assert_eq!(email["user_id"], "u-1");

    // And the connection still serves the next event.
    publish_json(
        &client,
        "user.created",
        json!({"id": "u-2", "name": "Bob", "email": "bob@example.com"}),
    )
    .await;
    let email = next_json(&mut sent).await;
    assert_eq!(email["user_id"], "u-2");
    assert_eq!(host.metric("wasmev_broker_disconnects_total", ""), 0);
    host.stop().await.unwrap();
}

/// Header blocks async-nats (0.52) cannot parse: it answers each by dropping the
/// connection, and what was on its way is lost with it (a core subscription is
/// at-most-once). Other clients send these: a Go client writes any header name or value
/// bytes it is given. The host must come back by itself each time and serve the events
/// after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_header_the_client_cannot_parse_costs_a_reconnect_not_the_host() {
    let server = NatsServer::start();
    let (_dir, host, client, mut sent) = email_sender(&server).await;

    let user = |id: &str| json!({"id": id, "name": "Ada", "email": "ada@example.com"});
    let unparsable: [&[u8]; 3] = [
        b"NATS/1.0\r\nBad Name: x",
        b"NATS/1.0\r\nX-Latin-1: caf\xe9",
        b"NATS/1.0\r\nno colon on this line",
    ];
    for (lost, header_block) in unparsable.into_iter().enumerate() {
        let id = format!("lost-{lost}");
        raw_hpub(
            &server,
            "user.created",
            header_block,
            user(&id).to_string().as_bytes(),
        )
        .await;
        // Until the host has reconnected and subscribed again, a publish reaches nobody:
        // send one each half second until one is answered.
        let email = within("the host to serve again", Duration::from_secs(20), async {
            loop {
                publish_json(&client, "user.created", user("after")).await;
                if let Some(email) = next_within(&mut sent, Duration::from_millis(500)).await {
                    break email;
                }
            }
        })
        .await;
        // The first answer is for an event sent after: the one with the bad header was
        // lost, with the connection it came on.
        let email: Value = serde_json::from_slice(&email.payload).unwrap();
        assert_eq!(email["user_id"], "after", "after {id}");
        assert_eq!(
            host.metric("wasmev_broker_disconnects_total", ""),
            lost as u64 + 1,
            "after {id}"
        );
        // Answers to the extra publishes of this round may still be on their way.
        while next_within(&mut sent, Duration::from_millis(300))
            .await
            .is_some()
        {}
    }
    host.stop().await.unwrap();
}

/// A host whose user authenticates with an nkey: the seed comes from the environment
/// variable `nkey_seed_env` names, and the server knows only the public key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_authenticates_with_the_nkey_seed_in_its_environment() {
    let user = nkeys::KeyPair::new_user();
    let seed = user.seed().unwrap();
    let server = NatsServer::start_with_config(&format!(
        "authorization {{ users = [ {{ nkey: {:?} }} ] }}\n",
        user.public_key()
    ));
    let toml = server.manifest_head()
        + "nkey_seed_env = \"WASMEV_TEST_NKEY_SEED\"\n"
        + &handler_block(
            "email-sender",
            "email-sender",
            "subscribe = [\"user.created\"]\npublish = [\"email.sent\"]",
        );
    let dir = tempfile::tempdir().unwrap();
    let env = |name: &str| (name == "WASMEV_TEST_NKEY_SEED").then(|| seed.clone());
    let m = wasmev::Manifest::parse(&dir.path().join("runtime.toml"), &toml, &env).unwrap();
    let host = TestHost::start(&m).await;

    let connect = async_nats::ConnectOptions::with_nkey(seed.clone()).connect(server.url());
    let client = within("connect with the nkey", WAIT, connect)
        .await
        .unwrap();
    let mut sent = client.subscribe("email.sent").await.unwrap();
    within("flush", WAIT, client.flush()).await.unwrap();
    publish_json(
        &client,
        "user.created",
        json!({"id": "u-1", "name": "Ada", "email": "ada@example.com"}),
    )
    .await;
    assert_eq!(next_json(&mut sent).await["to"], "ada@example.com");
    host.stop().await.unwrap();

    // Another user's seed: the server refuses the connection, and the start says so.
    let stranger = nkeys::KeyPair::new_user().seed().unwrap();
    let env = |name: &str| (name == "WASMEV_TEST_NKEY_SEED").then(|| stranger.clone());
    let m = wasmev::Manifest::parse(&dir.path().join("runtime.toml"), &toml, &env).unwrap();
    let started = within(
        "the start to fail",
        WAIT,
        wasmev::Host::start(&m, wasmev::Options::default()),
    )
    .await;
    let error = format!("{:#}", started.err().expect("the start fails"));
    insta::assert_snapshot!(error.replace(&server.url(), "nats://127.0.0.1:<port>"), @r#"failed to connect to nats at nats://127.0.0.1:<port>: the server refused this host's credentials: the nkey nkey_seed_env holds (the server lists users by public key)"#);
}

//! JetStream test helpers: a fresh server with streams, the `chaos` handler's durable
//! consumer, publishing stored events.

use async_nats::HeaderMap;
use async_nats::jetstream::{self, stream};
use serde_json::Value;

use super::{NatsServer, wait_for};

/// A file-stored stream `name` on `subjects`.
pub async fn create_stream(
    js: &jetstream::Context,
    name: &str,
    subjects: &[&str],
) -> stream::Stream {
    js.create_stream(stream::Config {
        name: name.to_string(),
        subjects: subjects.iter().map(|s| s.to_string()).collect(),
        storage: stream::StorageType::File,
        ..Default::default()
    })
    .await
    .unwrap()
}

/// Messages in stream `name` now.
pub async fn count(js: &jetstream::Context, name: &str) -> u64 {
    js.get_stream(name)
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .state
        .messages
}

/// Messages in stream `name` now, or `None` while JetStream's API does not answer. For a
/// moment after nats-server reloads a configuration that changes its users, it sets up
/// their account's JetStream again, and a request to the API then finds no responders.
pub async fn count_when_answered(js: &jetstream::Context, name: &str) -> Option<u64> {
    use async_nats::jetstream::context::{GetStreamErrorKind, RequestErrorKind};
    let mut stream = match js.get_stream(name).await {
        Ok(stream) => stream,
        Err(e) if e.kind() == GetStreamErrorKind::Request => return None,
        Err(e) => panic!("stream {name}: {e}"),
    };
    match stream.info().await {
        Ok(info) => Some(info.state.messages),
        Err(e)
            if matches!(
                e.kind(),
                RequestErrorKind::NoResponders | RequestErrorKind::TimedOut
            ) =>
        {
            None
        }
        Err(e) => panic!("stream {name}: {e}"),
    }
}

/// A fresh nats-server with `streams` (name, subjects) created, and a client on it.
pub async fn js_env(
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

/// The stream the `chaos` handler consumes in these tests.
pub const EVENTS: (&str, &[&str]) = ("EVENTS", &["js.in"]);

/// The durable consumer the host creates for the `chaos` handler on EVENTS.
pub async fn chaos_consumer(js: &jetstream::Context) -> jetstream::consumer::PullConsumer {
    js.get_stream("EVENTS")
        .await
        .unwrap()
        .get_consumer("chaos")
        .await
        .unwrap()
}

/// Publish `(Nats-Msg-Id, op)` pairs to `js.in`, each acknowledged by the stream.
pub async fn publish_ops(js: &jetstream::Context, ops: impl IntoIterator<Item = (String, Value)>) {
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

/// Header `name` of a stored message, or "" when it has none.
pub fn header(message: &jetstream::message::StreamMessage, name: &str) -> String {
    header_in(Some(&message.headers), name)
}

/// Header `name` in `headers` (a core message's), or "" when there is none.
pub fn header_in(headers: Option<&async_nats::HeaderMap>, name: &str) -> String {
    headers
        .and_then(|h| h.get(name))
        .map(|v| v.as_str().to_string())
        .unwrap_or_default()
}

/// The stream a host keeps the `chaos` consumer's max-deliveries advisories in.
pub const GIVEN_UP: &str = "WASMEV_GIVEN_UP_EVENTS_chaos";

/// With no host running, give both deliveries (`max_deliver = 2`) of the one message on
/// the `chaos` consumer to a reader that never settles them, as to a host killed
/// mid-event; a third pull finds nothing, and JetStream gives up on the message. Returns
/// once its advisory is kept in [`GIVEN_UP`].
pub async fn given_up_unsettled(js: &jetstream::Context, wait: std::time::Duration) {
    use futures::StreamExt;
    let consumer = chaos_consumer(js).await;
    for delivery in 1..=3 {
        let mut batch = consumer
            .fetch()
            .max_messages(1)
            .expires(std::time::Duration::from_secs(2))
            .messages()
            .await
            .unwrap();
        match batch.next().await {
            Some(Ok(m)) => assert_eq!(m.info().unwrap().delivered, delivery),
            None => assert_eq!(delivery, 3, "no delivery {delivery}"),
            Some(Err(e)) => panic!("{e}"),
        }
    }
    wait_for(
        "the advisory to be kept while no host runs",
        wait,
        || async { (count(js, GIVEN_UP).await == 1).then_some(()) },
    )
    .await;
}

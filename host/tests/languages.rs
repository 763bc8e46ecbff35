//! The example handlers written in other languages (Python, JavaScript, C), each built
//! from source with its own toolchain and run through a real host on a real nats-server:
//! event in, expected publish out, and their reject and retry paths.

mod common;

use std::time::Duration;

use async_nats::HeaderMap;
use common::*;
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(20);

/// One example handler and the events that exercise it.
struct Example {
    /// Folder under handlers/ and the component its build.sh writes.
    dir: &'static str,
    file: &'static str,
    subscribe: &'static str,
    publish: &'static [&'static str],
    /// Extra TOML for the `config` table (without `paused`).
    config: &'static str,
    /// An event the handler accepts, and where its answer appears.
    good: &'static str,
    answer_on: &'static str,
    /// An event the handler rejects.
    bad: &'static str,
}

impl Example {
    fn manifest(&self, server: &NatsServer, paused: bool) -> (tempfile::TempDir, wasmev::Manifest) {
        let module = foreign_component(self.dir, self.file);
        let publish: Vec<String> = self.publish.iter().map(|s| format!("{s:?}")).collect();
        manifest(&format!(
            "version = 1\n[broker]\nurl = {:?}\n\
             [[handler]]\nname = {:?}\nmodule = {:?}\nsubscribe = [{:?}]\npublish = [{}]\n\
             memory = \"64MiB\"\nconfig = {{ {}, paused = {paused} }}\n",
            server.url(),
            self.dir,
            module.display().to_string(),
            self.subscribe,
            publish.join(", "),
            self.config,
        ))
    }

    /// Run the good event (returning its answer), the bad one (rejected), then the good
    /// one again with the handler paused (retry).
    async fn exercise(&self) -> async_nats::Message {
        let server = NatsServer::start();
        let (_dir, m) = self.manifest(&server, false);
        let host = TestHost::start_with(&m, cached_options()).await;
        let client = server.client().await;
        let mut answers = client.subscribe(self.answer_on).await.unwrap();
        client.flush().await.unwrap();

        let mut headers = HeaderMap::new();
        headers.insert("source", "signup-form");
        client
            .publish_with_headers(self.subscribe, headers, self.good.into())
            .await
            .unwrap();
        client.flush().await.unwrap();
        let answer = next_within(&mut answers, WAIT)
            .await
            .expect("the handler's publish");

        client
            .publish(self.subscribe, self.bad.into())
            .await
            .unwrap();
        client.flush().await.unwrap();
        wait_for("the reject", WAIT, async || {
            (host.failed(self.dir, "reject") == 1).then_some(())
        })
        .await;
        assert_eq!(host.ok(self.dir), 1);
        host.stop().await.unwrap();

        let (_dir, m) = self.manifest(&server, true);
        let host = TestHost::start_with(&m, cached_options()).await;
        client
            .publish(self.subscribe, self.good.into())
            .await
            .unwrap();
        client.flush().await.unwrap();
        wait_for("the retry", WAIT, async || {
            (host.failed(self.dir, "retry") >= 1).then_some(())
        })
        .await;
        assert_eq!(host.ok(self.dir), 0, "a paused handler handles nothing");
        host.stop().await.unwrap();
        answer
    }
}

fn json(msg: &async_nats::Message) -> Value {
    serde_json::from_slice(&msg.payload).unwrap()
}

fn header<'a>(msg: &'a async_nats::Message, name: &str) -> Option<&'a str> {
    msg.headers
        .as_ref()
        .and_then(|h| h.get(name))
        .map(|v| v.as_str())
}

/// Python (componentize-py): scores signups, passes the `source` header on, rejects what
/// is not a user, and asks for a retry while paused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_signup_scorer() {
    let answer = Example {
        dir: "signup-scorer",
        file: "signup_scorer.wasm",
        subscribe: "user.created",
        publish: &["user.scored", "user.flagged"],
        config: "blocked_domains = \"evil.example\", threshold = 60",
        good: r#"{"id":"u2","name":"1234567","email":"x@evil.example"}"#,
        answer_on: "user.flagged",
        bad: r#"{"name":"no id"}"#,
    }
    .exercise()
    .await;
    let v = json(&answer);
    assert_eq!(v["id"], "u2");
    assert_eq!(v["score"], 95);
    assert_eq!(v["reasons"][0], "blocked domain evil.example");
    assert_eq!(header(&answer, "source"), Some("signup-form"));
}

/// JavaScript (componentize-js): renders the welcome text from the config template.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn javascript_welcome_renderer() {
    let answer = Example {
        dir: "welcome-renderer",
        file: "welcome_renderer.wasm",
        subscribe: "user.created",
        publish: &["notify.welcome"],
        config: "template = \"Hi {name} ({id})\"",
        good: r#"{"id":"u1","name":"Ada"}"#,
        answer_on: "notify.welcome",
        bad: "not json",
    }
    .exercise()
    .await;
    let v = json(&answer);
    assert_eq!(v["text"], "Hi Ada (u1)");
    assert_eq!(v["locale"], "en");
    assert_eq!(header(&answer, "source"), Some("signup-form"));
}

/// C (wit-bindgen + clang): seals an audit record with its keyed CRC-32.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn c_audit_checksum() {
    let record = r#"{"event_id":"e1"}"#;
    let answer = Example {
        dir: "audit-checksum",
        file: "audit_checksum.wasm",
        subscribe: "audit.recorded",
        publish: &["audit.sealed"],
        config: "key = \"k\"",
        good: record,
        answer_on: "audit.sealed",
        bad: "",
    }
    .exercise()
    .await;
    let v = json(&answer);
    // CRC-32 (zlib's) of the key followed by the record.
    let mut crc = crc32(b"k");
    crc = crc32_continue(crc, record.as_bytes());
    let expected = format!("{crc:08x}");
    assert_eq!(v["crc32"], expected.as_str());
    assert_eq!(v["bytes"], record.len());
    assert_eq!(header(&answer, "Audit-Crc32"), Some(expected.as_str()));
    assert_eq!(header(&answer, "source"), Some("signup-form"));
}

/// The reference CRC-32 (IEEE, reflected), to check the C handler's arithmetic.
fn crc32(bytes: &[u8]) -> u32 {
    crc32_continue(0, bytes)
}

fn crc32_continue(crc: u32, bytes: &[u8]) -> u32 {
    let mut crc = !crc;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

#[test]
fn reference_crc32_matches_the_standard_check_value() {
    // The CRC-32 check value for "123456789" from the catalogue of CRC algorithms.
    assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
}

//! Hot reload: swaps under a steady stream of events lose and duplicate nothing, bad
//! changes leave the old version serving, handlers come and go by editing the manifest,
//! and a version that fails its first events is rolled back.
//!
//! Real parts: the chaos fixture component built from this repo, the embedded broker and
//! a real nats-server with JetStream. Versions are told apart by a config value the
//! fixture echoes (`version`) and by module digests in `/metrics`; two module versions
//! are the same component with and without an extra custom section, so their digests
//! differ while their behaviour is the same.

mod common;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use serde_json::{Value, json};

/// A manifest file in a temp dir whose handlers and module files the test rewrites.
struct Site {
    dir: tempfile::TempDir,
}

impl Site {
    fn new() -> Self {
        Self {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn write_module(&self, name: &str, bytes: &[u8]) {
        // Write then rename, as a compiler or editor does: the watcher must not see a
        // half-written file from this.
        let tmp = self.path(&format!(".{name}.tmp"));
        std::fs::write(&tmp, bytes).unwrap();
        std::fs::rename(&tmp, self.path(name)).unwrap();
    }

    fn write_manifest(&self, toml: &str) -> wasmev::Manifest {
        std::fs::write(self.path("runtime.toml"), toml).unwrap();
        wasmev::Manifest::load(&self.path("runtime.toml"))
            .unwrap_or_else(|e| panic!("test manifest invalid:\n{e}"))
    }
}

fn stamp(seq: u64) -> Bytes {
    Bytes::from(json!({ "op": "stamp", "seq": seq }).to_string())
}

/// The metric line for `handler`'s live version, as (digest, value) pairs.
fn versions(host: &TestHost, handler: &str) -> Vec<String> {
    let prefix = format!("wasmev_handler_version{{handler=\"{handler}\",digest=\"");
    host.metrics
        .encode()
        .lines()
        .filter_map(|l| l.strip_prefix(&prefix))
        .filter(|rest| rest.ends_with("\"} 1"))
        .map(|rest| rest.trim_end_matches("\"} 1").to_string())
        .collect()
}

fn swaps(host: &TestHost, handler: &str, result: &str) -> u64 {
    let text = host.metrics.encode();
    let prefix =
        format!("wasmev_handler_swaps_total{{handler=\"{handler}\",result=\"{result}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .map_or(0, |v| v.trim().parse::<f64>().unwrap() as u64)
}

async fn memory_sub(host: &TestHost, subject: &str) -> wasmev::broker::Subscription {
    host.broker
        .subscribe(&wasmev::subject::Pattern::new(subject).unwrap(), None)
        .await
        .unwrap()
}

async fn publish_memory(host: &TestHost, subject: &str, payload: Bytes) {
    let wasmev::broker::Broker::Memory(b) = &host.broker else {
        panic!("embedded broker expected");
    };
    b.publish(subject, None, &[], payload).await.unwrap();
}

/// The next stamp on an embedded-broker subscription.
async fn next_stamp(sub: &mut wasmev::broker::Subscription) -> Value {
    let m = within("a stamp", Duration::from_secs(10), sub.next())
        .await
        .unwrap();
    serde_json::from_slice(&m.payload).unwrap()
}

/// Publish a `busy` event of `ms` to `handler` on `subject` and wait until it runs.
async fn start_busy(host: &TestHost, handler: &str, subject: &str, ms: u64) {
    let received = host.received(handler);
    publish_memory(
        host,
        subject,
        Bytes::from(json!({"op": "busy", "ms": ms}).to_string()),
    )
    .await;
    wait_for(
        "the busy event to start",
        Duration::from_secs(5),
        async || (host.received(handler) > received).then_some(()),
    )
    .await;
}

/// The next report on `results` is a busy event's, within `limit`.
async fn expect_busy_report(results: &mut wasmev::broker::Subscription, limit: Duration) {
    let busy = within("busy report", limit, results.next()).await.unwrap();
    assert_eq!(
        serde_json::from_slice::<Value>(&busy.payload).unwrap()["op"],
        "busy"
    );
}

/// A chaos handler block; `version` goes to its config, and so into every stamp.
fn chaos_handler(name: &str, module: &str, subscribe: &str, version: &str, extra: &str) -> String {
    chaos_handler_config(
        name,
        module,
        subscribe,
        &format!("version = \"{version}\""),
        extra,
    )
}

fn chaos_handler_config(
    name: &str,
    module: &str,
    subscribe: &str,
    config: &str,
    extra: &str,
) -> String {
    format!(
        r#"
[[handler]]
name = "{name}"
module = "{module}"
subscribe = ["{subscribe}"]
publish = ["chaos.>"]
config = {{ {config} }}
{extra}
"#
    )
}

/// Under a steady stream on a core queue-group subscription and a JetStream consumer,
/// swap module and config five times. Every event is handled exactly once, and on core
/// the versions, in publish order, never go backwards: each event ran on the version live
/// when it was dispatched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn swaps_under_load_lose_nothing() {
    let nats = NatsServer::start();
    let site = Site::new();
    let manifest_for = |version: u32| {
        format!(
            "version = 1\n[broker]\nurl = \"{}\"\n{}{}",
            nats.url(),
            chaos_handler(
                "core",
                "core.wasm",
                "load.core",
                &version.to_string(),
                "queue = \"core-workers\"",
            ),
            chaos_handler(
                "durable",
                "durable.wasm",
                "load.js",
                &version.to_string(),
                "[handler.jetstream]\nstream = \"LOAD\"\nstream_subjects = [\"load.js\"]",
            ),
        )
    };
    for module in ["core.wasm", "durable.wasm"] {
        site.write_module(module, &variant("1"));
    }
    let m = site.write_manifest(&manifest_for(1));
    let host = TestHost::start(&m).await;
    let client = nats.client().await;
    let mut stamps = client.subscribe("chaos.stamp").await.unwrap();
    client.flush().await.unwrap();

    // Publishes until the swaps are done, then 200 more; returns how many it sent.
    // JetStream sequence numbers are offset so both kinds share the stamp subject.
    const OFFSET: u64 = 1_000_000;
    let swapping = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let publisher = {
        let client = client.clone();
        let js = async_nats::jetstream::new(client.clone());
        let swapping = swapping.clone();
        tokio::spawn(async move {
            let mut seq = 0;
            let mut tail = 200;
            while tail > 0 {
                client.publish("load.core", stamp(seq)).await.unwrap();
                js.publish("load.js", stamp(OFFSET + seq))
                    .await
                    .unwrap()
                    .await
                    .unwrap();
                seq += 1;
                if seq % 10 == 0 {
                    tokio::time::sleep(Duration::from_millis(15)).await;
                }
                if !swapping.load(std::sync::atomic::Ordering::Relaxed) {
                    tail -= 1;
                }
            }
            seq
        })
    };
    // Five swaps while events flow: new module bytes and a new config value each time.
    let mut digests = vec![sha256(&variant("1"))];
    for version in 2..=6u32 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let bytes = variant(&version.to_string());
        digests.push(sha256(&bytes));
        for module in ["core.wasm", "durable.wasm"] {
            site.write_module(module, &bytes);
        }
        site.write_manifest(&manifest_for(version));
        let report = host.reload().await;
        assert_eq!(report.result, "ok", "{report:#?}");
        let swapped: Vec<&str> = report.swapped.iter().map(|s| s.handler.as_str()).collect();
        assert_eq!(swapped, ["core", "durable"], "{report:#?}");
        assert_eq!(report.swapped[0].changed, ["module", "config"]);
        assert_eq!(report.swapped[0].to, *digests.last().unwrap());
    }
    swapping.store(false, std::sync::atomic::Ordering::Relaxed);
    let events = within("publisher", Duration::from_secs(60), publisher)
        .await
        .unwrap();

    let mut core: BTreeMap<u64, Vec<u32>> = BTreeMap::new();
    let mut durable: BTreeMap<u64, Vec<u32>> = BTreeMap::new();
    while core.values().map(Vec::len).sum::<usize>() < events as usize
        || durable.len() < events as usize
    {
        let Some(m) = next_within(&mut stamps, Duration::from_secs(15)).await else {
            panic!(
                "stamps stopped: core {} of {events}, jetstream {} of {events}",
                core.len(),
                durable.len()
            );
        };
        let v: Value = serde_json::from_slice(&m.payload).unwrap();
        let seq = v["seq"].as_u64().unwrap();
        let version: u32 = v["version"].as_str().unwrap().parse().unwrap();
        if seq < OFFSET {
            core.entry(seq).or_default().push(version);
        } else {
            durable.entry(seq - OFFSET).or_default().push(version);
        }
    }
    // Nothing more comes: no duplicates behind the last one.
    assert!(
        next_within(&mut stamps, Duration::from_millis(500))
            .await
            .is_none()
    );

    assert_eq!(core.len(), events as usize, "every core event handled");
    assert!(
        core.values().all(|v| v.len() == 1),
        "core events handled twice: {:?}",
        core.iter().filter(|(_, v)| v.len() > 1).collect::<Vec<_>>()
    );
    let order: Vec<u32> = core.values().map(|v| v[0]).collect();
    assert!(
        order.windows(2).all(|w| w[0] <= w[1]),
        "a core event ran on an older version than one dispatched before it"
    );
    let seen: std::collections::BTreeSet<u32> = order.iter().copied().collect();
    assert_eq!(seen.len(), 6, "every version handled core events: {seen:?}");

    assert_eq!(
        durable.len(),
        events as usize,
        "every jetstream event handled"
    );
    let redelivered: Vec<_> = durable.iter().filter(|(_, v)| v.len() > 1).collect();
    assert!(
        redelivered.is_empty(),
        "jetstream duplicates: {redelivered:?}"
    );
    assert_eq!(
        versions(&host, "core"),
        [digests.last().unwrap().clone()],
        "/metrics names the live version only"
    );
    assert_eq!(host.failed("core", "host"), 0);
    host.stop().await.unwrap();
}

/// Garbage, a component of another world, and a half-written file each leave the old
/// version serving and are counted as refused; the complete file is then picked up by
/// the file watcher.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_modules_leave_the_old_version_serving() {
    let site = Site::new();
    let v1 = variant("1");
    let v2 = variant("2");
    site.write_module("h.wasm", &v1);
    let m = site.write_manifest(&format!(
        "version = 1\n{}",
        chaos_handler("h", "h.wasm", "in", "1", "")
    ));
    let options = wasmev::Options {
        watch: true,
        ..Default::default()
    };
    let host = TestHost::start_with(&m, options).await;
    let mut stamps = memory_sub(&host, "chaos.stamp").await;
    let mut seq = 0;
    let mut still_serving = async |host: &TestHost, stamps: &mut _| {
        seq += 1;
        publish_memory(host, "in", stamp(seq)).await;
        let v = next_stamp(stamps).await;
        assert_eq!(v["seq"], seq);
        assert_eq!(versions(host, "h"), [sha256(&v1)]);
    };
    still_serving(&host, &mut stamps).await;

    let wrong_world = std::fs::read(component("wrong-world")).unwrap();
    let half = &v2[..v2.len() / 2];
    for (what, bytes) in [
        ("a deleted module", None),
        ("garbage", Some(&b"definitely not wasm"[..])),
        ("a component of another world", Some(&wrong_world[..])),
        ("half a component", Some(half)),
    ] {
        let refused = swaps(&host, "h", "refused");
        match bytes {
            // A plain write, not a rename: the watcher must cope with files written in
            // place.
            Some(bytes) => std::fs::write(site.path("h.wasm"), bytes).unwrap(),
            None => std::fs::remove_file(site.path("h.wasm")).unwrap(),
        }
        wait_for(
            &format!("the reload of {what} to be refused"),
            Duration::from_secs(10),
            async || (swaps(&host, "h", "refused") > refused).then_some(()),
        )
        .await;
        still_serving(&host, &mut stamps).await;
    }

    // The rest of the file arrives: now it loads.
    let mut file = std::fs::OpenOptions::new()
        .append(true)
        .open(site.path("h.wasm"))
        .unwrap();
    std::io::Write::write_all(&mut file, &v2[v2.len() / 2..]).unwrap();
    drop(file);
    wait_for(
        "the complete module to go live",
        Duration::from_secs(10),
        async || (versions(&host, "h") == [sha256(&v2)]).then_some(()),
    )
    .await;
    assert_eq!(swaps(&host, "h", "swapped"), 1);
    publish_memory(&host, "in", stamp(100)).await;
    assert_eq!(next_stamp(&mut stamps).await["seq"], 100);
    host.stop().await.unwrap();
}

/// Adding and removing a handler in the manifest starts and stops it without touching
/// the others; a config change is seen by the next event; an event in flight during
/// the reload finishes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manifest_edits_add_remove_and_reconfigure() {
    let site = Site::new();
    site.write_module("chaos.wasm", &variant("1"));
    let a = |version: &str| chaos_handler("a", "chaos.wasm", "a.in", version, "");
    let b = chaos_handler("b", "chaos.wasm", "b.in", "b1", "");
    let m = site.write_manifest(&format!("version = 1\n{}", a("a1")));
    let host = TestHost::start(&m).await;
    let mut stamps = memory_sub(&host, "chaos.stamp").await;
    let mut results = memory_sub(&host, "chaos.result").await;

    // An event of `a` runs across the reload that adds `b`.
    start_busy(&host, "a", "a.in", 600).await;
    site.write_manifest(&format!("version = 1\n{}{b}", a("a1")));
    let report = host.reload().await;
    assert_eq!(report.result, "ok");
    assert_eq!(report.added.len(), 1);
    assert_eq!(report.added[0].handler, "b");
    assert_eq!(report.unchanged, ["a"]);
    assert!(report.swapped.is_empty() && report.removed.is_empty());
    expect_busy_report(&mut results, Duration::from_secs(10)).await;
    wait_for(
        "the busy event to end ok",
        Duration::from_secs(5),
        async || (host.ok("a") == 1).then_some(()),
    )
    .await;

    publish_memory(&host, "b.in", stamp(1)).await;
    assert_eq!(next_stamp(&mut stamps).await["version"], "b1");

    // Only config changes: the next event sees the new value; no recompile needed.
    site.write_manifest(&format!("version = 1\n{}{b}", a("a2")));
    let report = host.reload().await;
    assert_eq!(report.swapped.len(), 1);
    assert_eq!(report.swapped[0].handler, "a");
    assert_eq!(report.swapped[0].changed, ["config"]);
    assert_eq!(report.swapped[0].from, report.swapped[0].to);
    assert_eq!(report.unchanged, ["b"]);
    publish_memory(&host, "a.in", stamp(2)).await;
    assert_eq!(next_stamp(&mut stamps).await["version"], "a2");

    // Remove `b`: its subject goes quiet; `a` keeps working.
    site.write_manifest(&format!("version = 1\n{}", a("a2")));
    let report = host.reload().await;
    assert_eq!(report.removed, ["b"]);
    let received = host.received("b");
    publish_memory(&host, "b.in", stamp(3)).await;
    publish_memory(&host, "a.in", stamp(4)).await;
    assert_eq!(next_stamp(&mut stamps).await["seq"], 4);
    assert_eq!(
        host.received("b"),
        received,
        "a removed handler got an event"
    );
    assert!(versions(&host, "b").is_empty());

    // A broken manifest changes nothing and says where the problem is.
    std::fs::write(
        site.path("runtime.toml"),
        "version = 1\n[[handler]]\nname = 3\n",
    )
    .unwrap();
    let report = host.reload().await;
    assert_eq!(report.result, "refused");
    assert!(
        report.errors[0].contains("runtime.toml:3:8"),
        "{}",
        report.errors[0]
    );
    publish_memory(&host, "a.in", stamp(5)).await;
    assert_eq!(next_stamp(&mut stamps).await["seq"], 5);
    host.stop().await.unwrap();
}

/// A swap while the old version has every permit taken: the next event runs on the new
/// version at once. (The intake used to keep waiting for one of the old version's
/// permits, so new events sat behind the old version's slowest event.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn swap_does_not_wait_for_the_old_versions_permits() {
    let site = Site::new();
    site.write_module("chaos.wasm", &variant("1"));
    let a = |version: &str| {
        chaos_handler(
            "a",
            "chaos.wasm",
            "a.in",
            version,
            "max_in_flight = 1\ndeadline = \"20s\"",
        )
    };
    let m = site.write_manifest(&format!("version = 1\n{}", a("a1")));
    let host = TestHost::start(&m).await;
    let mut stamps = memory_sub(&host, "chaos.stamp").await;
    let mut results = memory_sub(&host, "chaos.result").await;

    // v1's only permit is taken by an event that runs for 8 s.
    start_busy(&host, "a", "a.in", 8000).await;
    site.write_manifest(&format!("version = 1\n{}", a("a2")));
    let report = host.reload().await;
    assert_eq!(report.swapped.len(), 1);

    publish_memory(&host, "a.in", stamp(1)).await;
    assert_eq!(next_stamp(&mut stamps).await["version"], "a2");
    assert!(
        futures::FutureExt::now_or_never(results.next()).is_none(),
        "the new version's event waited for the old version's busy event"
    );
    expect_busy_report(&mut results, Duration::from_secs(15)).await;
    host.stop().await.unwrap();
}

/// A new version whose first events all fail is rolled back when the manifest asks for
/// it, and is not tried again until it changes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_version_is_rolled_back() {
    let site = Site::new();
    site.write_module("h.wasm", &variant("1"));
    let manifest = |config: &str| {
        format!(
            "version = 1\n{}",
            chaos_handler_config("h", "h.wasm", "in", config, "rollback_after = 3")
        )
    };
    let m = site.write_manifest(&manifest("version = \"1\""));
    let host = TestHost::start(&m).await;
    let mut stamps = memory_sub(&host, "chaos.stamp").await;

    site.write_module("h.wasm", &variant("2"));
    site.write_manifest(&manifest("version = \"2\", fail = \"true\""));
    let report = host.reload().await;
    assert_eq!(report.swapped.len(), 1, "{report:#?}");
    assert_eq!(versions(&host, "h"), [sha256(&variant("2"))]);
    for seq in 0..3 {
        publish_memory(&host, "in", stamp(seq)).await;
    }
    wait_for("the rollback", Duration::from_secs(10), async || {
        (swaps(&host, "h", "rolled_back") == 1).then_some(())
    })
    .await;
    assert_eq!(host.failed("h", "reject"), 3);
    assert_eq!(versions(&host, "h"), [sha256(&variant("1"))]);
    publish_memory(&host, "in", stamp(10)).await;
    assert_eq!(next_stamp(&mut stamps).await["seq"], 10);

    // The same broken version is not tried again...
    let report = host.reload().await;
    assert_eq!(report.result, "refused");
    assert!(
        report.refused[0].error.contains("was rolled back"),
        "{report:#?}"
    );
    // ...until it changes.
    site.write_manifest(&manifest("version = \"3\""));
    let report = host.reload().await;
    assert_eq!(report.result, "ok", "{report:#?}");
    assert_eq!(versions(&host, "h"), [sha256(&variant("2"))]);
    host.stop().await.unwrap();
}

/// Changing a core handler's subjects: the new subscription is live before the old one
/// goes, and events on a subject both cover are handled once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subject_change_overlaps_without_duplicates() {
    let nats = NatsServer::start();
    let site = Site::new();
    site.write_module("h.wasm", &variant("1"));
    let manifest = |subject: &str, version: &str| {
        format!(
            "version = 1\n[broker]\nurl = \"{}\"\n{}",
            nats.url(),
            chaos_handler("h", "h.wasm", subject, version, "")
        )
    };
    let m = site.write_manifest(&manifest("orders.*", "1"));
    let host = TestHost::start(&m).await;
    let client = nats.client().await;
    let mut stamps = client.subscribe("chaos.stamp").await.unwrap();
    client.flush().await.unwrap();

    const EVENTS: u64 = 600;
    let publisher = {
        let client = client.clone();
        tokio::spawn(async move {
            for seq in 0..EVENTS {
                client.publish("orders.new", stamp(seq)).await.unwrap();
                if seq % 10 == 0 {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
            client.flush().await.unwrap();
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    site.write_manifest(&manifest("orders.>", "2"));
    let report = host.reload().await;
    assert_eq!(
        report.swapped[0].changed,
        ["subscribe", "config"],
        "{report:#?}"
    );
    within("publisher", Duration::from_secs(60), publisher)
        .await
        .unwrap();

    let mut seen: BTreeMap<u64, u32> = BTreeMap::new();
    while seen.len() < EVENTS as usize {
        let m = next_within(&mut stamps, Duration::from_secs(10))
            .await
            .unwrap_or_else(|| panic!("only {} of {EVENTS} events handled", seen.len()));
        let v: Value = serde_json::from_slice(&m.payload).unwrap();
        *seen.entry(v["seq"].as_u64().unwrap()).or_default() += 1;
    }
    assert!(
        next_within(&mut stamps, Duration::from_millis(500))
            .await
            .is_none()
    );
    assert!(
        seen.values().all(|n| *n == 1),
        "duplicates across the overlap"
    );
    host.stop().await.unwrap();
}

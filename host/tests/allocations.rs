//! What the embedded broker allocates per publish, counted with dhat's heap profiler in
//! testing mode. A count, not a timing: it does not depend on the machine.
//!
//! The embedded broker is the default, and every event crosses it twice (in from the
//! publisher, out with the guest's publish). Its routing and hand-over used to allocate
//! ~6 times per message (a map and a vector per queue group, the group's name, a copy of
//! the message for the only subscriber); bench/RESULTS.md has the profile. This keeps
//! that from coming back.
//!
//! One test in this binary: dhat allows one profiler per process at a time.

use std::time::Duration;

use bytes::Bytes;
use wasmev::broker::Outgoing;
use wasmev::broker::memory::MemoryBroker;
use wasmev::subject::Pattern;

#[global_allocator]
static ALLOC: dhat::Alloc = dhat::Alloc;

/// Messages per round; under the subscription's buffer, so no publish waits.
const ROUND: usize = 200;
const ROUNDS: usize = 5;

/// Heap blocks allocated while `ROUNDS` × `ROUND` prepared messages are published to
/// `broker` and read by `sub`, per message.
fn blocks_per_message(
    runtime: &tokio::runtime::Runtime,
    broker: &MemoryBroker,
    sub: &mut wasmev::broker::memory::MemorySubscription,
    hops: Option<u32>,
) -> f64 {
    let mut blocks = 0;
    for _ in 0..ROUNDS {
        let messages: Vec<Outgoing> = (0..ROUND)
            .map(|_| {
                let mut m = Outgoing::new("bench.in", Bytes::from_static(b"payload"));
                m.hops = hops;
                m
            })
            .collect();
        let before = dhat::HeapStats::get().total_blocks;
        let round = async {
            for message in messages {
                assert_eq!(broker.send(message, None).await.unwrap(), 1);
            }
            for _ in 0..ROUND {
                drop(sub.next().await.unwrap());
            }
        };
        // The timeout's timer lives in its future and tokio's wheel links it in place:
        // it adds no heap block to the count.
        runtime
            .block_on(async { tokio::time::timeout(Duration::from_secs(10), round).await })
            .expect("publishing into a buffer with room should not wait");
        blocks += dhat::HeapStats::get().total_blocks - before;
    }
    blocks as f64 / (ROUNDS * ROUND) as f64
}

#[test]
fn a_publish_to_one_subscriber_copies_nothing_and_routes_without_allocating() {
    let _profiler = dhat::Profiler::builder().testing().build();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let broker = MemoryBroker::new();
    // As the host subscribes: a queue group per handler.
    let mut sub = broker.subscribe(Pattern::new("bench.in").unwrap(), Some("echo"));

    // A publisher's message: only the channel's own blocks (one per 32 messages).
    let plain = blocks_per_message(&runtime, &broker, &mut sub, None);
    dhat::assert!(plain <= 0.1, "{plain} heap blocks per plain publish");

    // A guest's publish carries the hop count, which receivers read as a header pair:
    // its name, its digits and the list that holds it.
    let guest = blocks_per_message(&runtime, &broker, &mut sub, Some(1));
    dhat::assert!(guest <= 3.1, "{guest} heap blocks per guest publish");
}

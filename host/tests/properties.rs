//! Property tests: the manifest parser never panics and always locates its errors; the
//! subject matcher obeys NATS rules; and a differential test checks our matcher against
//! what a real nats-server actually delivers.

mod common;

use std::collections::{BTreeSet, HashMap};
use std::path::Path;
use std::time::Duration;

use common::*;
use proptest::prelude::*;
use wasmev::manifest::{Manifest, ManifestError};
use wasmev::subject::{Pattern, Subject};

/// Fragments that make random text look like a manifest often enough to reach the
/// validator, not only the TOML parser.
fn manifest_text() -> impl Strategy<Value = String> {
    let line = prop_oneof![
        Just("version = 1".to_string()),
        Just("[[handler]]".to_string()),
        Just("[broker]".to_string()),
        Just("[admin]".to_string()),
        Just("[handler.jetstream]".to_string()),
        "[a-z_]{1,12} = \"[ -~]{0,20}\"",
        "(name|module|queue|stream|url|listen|deadline|memory) = \"[ -~]{0,24}\"",
        "(subscribe|publish|backoff) = \\[\"[a-z.*>]{0,12}\"\\]",
        "(max_in_flight|max_deliver|fuel|max_hops|version) = -?[0-9]{1,12}",
        "[ -~]{0,40}",
        // Beyond ASCII: every error's position is a byte offset, and a slice of the source
        // at one inside a multi-byte character would panic.
        r#"(name|module|queue|subscribe|[a-zé]{1,6}) = "?[ -~éü日本🦀\x00\x7f]{0,12}"?"#,
        r#"[é日🦀\[\]=". ]{0,16}"#,
    ];
    proptest::collection::vec(line, 0..12).prop_map(|lines| lines.join("\n"))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn the_manifest_parser_never_panics_and_locates_every_error(src in manifest_text()) {
        let path = Path::new("runtime.toml");
        if let Err(ManifestError::Invalid(diagnostics)) = Manifest::parse(path, &src, &|_| None) {
            prop_assert!(!diagnostics.is_empty());
            for d in &diagnostics {
                let lines = src.lines().count().max(1);
                prop_assert!(d.line >= 1 && d.line <= lines + 1, "line {} of {}: {}", d.line, lines, d);
                prop_assert!(d.column >= 1, "{}", d);
                prop_assert!(d.to_string().starts_with("runtime.toml:"), "{}", d);
            }
        }
    }

    #[test]
    fn a_valid_subject_matches_itself_and_the_full_wildcard(s in "[a-z]{1,4}(\\.[a-z]{1,4}){0,4}") {
        let subject = Subject::new(s.clone()).unwrap();
        prop_assert!(Pattern::new(s.clone()).unwrap().matches(subject.as_str()));
        prop_assert!(Pattern::new(">").unwrap().matches(subject.as_str()));
        // `*` for any single token still matches.
        let tokens: Vec<&str> = s.split('.').collect();
        for i in 0..tokens.len() {
            let mut p = tokens.clone();
            p[i] = "*";
            prop_assert!(Pattern::new(p.join(".")).unwrap().matches(&s));
        }
    }

    #[test]
    fn matching_never_panics_on_arbitrary_input(p in "[a-z.*> ]{0,16}", s in "\\PC{0,24}") {
        if let Ok(pattern) = Pattern::new(p) {
            let _ = pattern.matches(&s);
        }
        let _ = Subject::new(s);
    }
}

/// Random patterns and subjects over a tiny alphabet, so many pairs actually match.
fn sample(seed: u64) -> (Vec<String>, Vec<String>) {
    let mut state = seed;
    let mut next = move |n: u64| {
        // xorshift: deterministic, no extra dependency, good enough to spread cases.
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state % n
    };
    let tokens = ["a", "b", "c"];
    let mut subjects = BTreeSet::new();
    while subjects.len() < 40 {
        let len = 1 + next(4);
        let s: Vec<&str> = (0..len).map(|_| tokens[next(3) as usize]).collect();
        subjects.insert(s.join("."));
    }
    let mut patterns = BTreeSet::new();
    while patterns.len() < 25 {
        let len = 1 + next(4);
        let mut p: Vec<&str> = (0..len)
            .map(|_| match next(5) {
                0 | 1 => "*",
                k => tokens[(k - 2) as usize],
            })
            .collect();
        if next(4) == 0 {
            *p.last_mut().unwrap() = ">";
        }
        patterns.insert(p.join("."));
    }
    (
        patterns.into_iter().collect(),
        subjects.into_iter().collect(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn our_wildcard_matching_agrees_with_nats_server() {
    let server = NatsServer::start();
    let client = server.client().await;
    let (patterns, subjects) = sample(0x5eed_cafe);
    let mut subs = Vec::new();
    for p in &patterns {
        subs.push(client.subscribe(p.clone()).await.unwrap());
    }
    // A round trip so every SUB is registered before the first PUB.
    let mut done = client.subscribe("done").await.unwrap();
    client.publish("done", "".into()).await.unwrap();
    client.flush().await.unwrap();
    within(
        "round trip",
        Duration::from_secs(10),
        futures::StreamExt::next(&mut done),
    )
    .await;

    for s in &subjects {
        client.publish(s.clone(), "".into()).await.unwrap();
    }
    client.flush().await.unwrap();
    let mut delivered: HashMap<(String, String), bool> = HashMap::new();
    for (p, sub) in patterns.iter().zip(subs.iter_mut()) {
        while let Some(m) = next_within(sub, Duration::from_millis(200)).await {
            delivered.insert((p.clone(), m.subject.to_string()), true);
        }
    }
    let mut pairs = 0;
    for p in &patterns {
        let pattern = Pattern::new(p.clone()).unwrap();
        for s in &subjects {
            let server_says = delivered.contains_key(&(p.clone(), s.clone()));
            assert_eq!(
                pattern.matches(s),
                server_says,
                "pattern {p:?} vs subject {s:?}"
            );
            pairs += 1;
        }
    }
    assert_eq!(pairs, patterns.len() * subjects.len());
    assert!(pairs >= 500, "{pairs} pairs compared");
    assert!(!delivered.is_empty());
}

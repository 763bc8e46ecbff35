//! What a case expects, and every way what happened differs from it: the result, the
//! failure's detail, the publishes (JSON payloads match as subsets) and the guest's logs.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::Value;

use crate::broker::Message;
use crate::dispatch::Outcome;

/// What a case checks; every part left out is not checked, except `result` (default ok).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Expect {
    /// `ok`, or a failure reason as in the metrics: retry, reject, trap, deadline, memory...
    result: Option<String>,
    /// Text the failure's detail must contain (the reject reason, the trap message).
    detail: Option<String>,
    /// For `retry`: the delay the handler asked for, in milliseconds.
    retry_ms: Option<u64>,
    /// Exactly these publishes, in order (`[]`: none at all).
    publish: Option<Vec<ExpectPublish>>,
    /// Each must appear in some line the guest logged or printed.
    #[serde(default)]
    logs: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ExpectPublish {
    subject: String,
    /// The payload must be JSON containing these fields (objects match as subsets).
    json: Option<Value>,
    /// The payload must be exactly this text.
    payload: Option<String>,
    /// Headers the publish must carry (others may be present).
    #[serde(default)]
    headers: BTreeMap<String, String>,
}

/// Every way `outcome`, `published` and `logs` differ from `expect`.
pub(super) fn check(
    expect: &Expect,
    outcome: &Outcome,
    published: &[Message],
    logs: &[String],
) -> Vec<String> {
    let mut failures = Vec::new();
    let (result, detail, retry_after) = match outcome {
        Outcome::Ok => ("ok", "", None),
        Outcome::Failed {
            reason,
            detail,
            retry_after,
        } => (reason.as_str(), detail.as_str(), *retry_after),
    };
    let wanted = expect.result.as_deref().unwrap_or("ok");
    if result != wanted {
        let detail = if detail.is_empty() {
            String::new()
        } else {
            format!(" ({detail})")
        };
        failures.push(format!("result: expected {wanted}, got {result}{detail}"));
    }
    if let Some(text) = &expect.detail
        && !detail.contains(text.as_str())
    {
        failures.push(format!(
            "detail: expected it to contain {text:?}, got {detail:?}"
        ));
    }
    if let Some(ms) = expect.retry_ms {
        let got = retry_after.map(|d| d.as_millis() as u64);
        if got != Some(ms) {
            failures.push(format!("retry_ms: expected {ms}, got {got:?}"));
        }
    }
    if let Some(wanted) = &expect.publish {
        if wanted.len() != published.len() {
            let subjects: Vec<&str> = published.iter().map(|m| m.subject.as_str()).collect();
            failures.push(format!(
                "publish: expected {} message(s), got {} {subjects:?}",
                wanted.len(),
                published.len()
            ));
        }
        for (i, (w, got)) in wanted.iter().zip(published).enumerate() {
            failures.extend(
                check_publish(w, got)
                    .into_iter()
                    .map(|f| format!("publish[{i}]: {f}")),
            );
        }
    }
    for text in &expect.logs {
        if !logs.iter().any(|l| l.contains(text.as_str())) {
            failures.push(format!("logs: no line contains {text:?}"));
        }
    }
    failures
}

fn check_publish(want: &ExpectPublish, got: &Message) -> Vec<String> {
    let mut failures = Vec::new();
    if want.subject != got.subject {
        failures.push(format!(
            "subject: expected {:?}, got {:?}",
            want.subject, got.subject
        ));
    }
    if let Some(text) = &want.payload
        && text.as_bytes() != &got.payload[..]
    {
        failures.push(format!(
            "payload: expected {text:?}, got {:?}",
            String::from_utf8_lossy(&got.payload)
        ));
    }
    if let Some(json) = &want.json {
        match serde_json::from_slice::<Value>(&got.payload) {
            Err(e) => failures.push(format!("payload is not JSON ({e})")),
            Ok(value) => {
                if let Err(path) = contains(&value, json, "") {
                    failures.push(format!(
                        "json: at {}: expected {}, got {}",
                        if path.is_empty() { "the top" } else { &path },
                        lookup(json, &path),
                        lookup(&value, &path)
                    ));
                }
            }
        }
    }
    for (name, value) in &want.headers {
        let found: Vec<&str> = got
            .headers
            .iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .collect();
        if !found.contains(&value.as_str()) {
            failures.push(format!("header {name}: expected {value:?}, got {found:?}"));
        }
    }
    failures
}

/// Whether `got` contains `want`: objects by subset of keys, everything else equal.
/// On a mismatch, the path of the first differing value (`.user.id`, `[2]`).
fn contains(got: &Value, want: &Value, at: &str) -> Result<(), String> {
    match (got, want) {
        (Value::Object(g), Value::Object(w)) => w.iter().try_for_each(|(k, wv)| {
            let path = format!("{at}.{k}");
            match g.get(k) {
                Some(gv) => contains(gv, wv, &path),
                None => Err(path),
            }
        }),
        (Value::Array(g), Value::Array(w)) if g.len() == w.len() => g
            .iter()
            .zip(w)
            .enumerate()
            .try_for_each(|(i, (gv, wv))| contains(gv, wv, &format!("{at}[{i}]"))),
        _ if json_eq(got, want) => Ok(()),
        _ => Err(at.to_string()),
    }
}

/// JSON equality where 95 and 95.0 are the same number (TOML and JSON writers differ).
fn json_eq(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => x.as_f64() == y.as_f64(),
        _ => a == b,
    }
}

/// The value at `path` (as produced by [`contains`]) inside `v`, for the report.
fn lookup(v: &Value, path: &str) -> String {
    let mut cur = v;
    for part in path.split(['.', '[']).filter(|p| !p.is_empty()) {
        let next = match part.strip_suffix(']').and_then(|i| i.parse::<usize>().ok()) {
            Some(i) => cur.get(i),
            None => cur.get(part),
        };
        match next {
            Some(n) => cur = n,
            None => return "(nothing)".into(),
        }
    }
    cur.to_string()
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use serde_json::json;

    use super::*;

    #[test]
    fn json_subset_matching_names_the_first_difference() {
        let got = json!({"id": "u1", "score": 95, "reasons": ["a", "b"], "extra": true});
        assert_eq!(contains(&got, &json!({"id": "u1"}), ""), Ok(()));
        assert_eq!(contains(&got, &json!({"score": 95.0}), ""), Ok(()));
        assert_eq!(contains(&got, &json!({"reasons": ["a", "b"]}), ""), Ok(()));
        assert_eq!(
            contains(&got, &json!({"reasons": ["a", "c"]}), ""),
            Err(".reasons[1]".into())
        );
        assert_eq!(
            contains(&got, &json!({"missing": 1}), ""),
            Err(".missing".into())
        );
        assert_eq!(
            contains(&got, &json!({"reasons": ["a"]}), ""),
            Err(".reasons".into())
        );
        assert_eq!(
            lookup(&json!({"reasons": ["a", "c"]}), ".reasons[1]"),
            "\"c\""
        );
    }

    #[test]
    fn check_reports_every_difference() {
        let expect: Expect = toml::from_str(
            r#"
            result = "reject"
            logs = ["hello"]
            publish = [{ subject = "a.b", json = { x = 1 }, headers = { h = "v" } }]
            "#,
        )
        .unwrap();
        let published = vec![Message {
            subject: "a.c".into(),
            reply: None,
            headers: vec![("h".into(), "w".into())],
            payload: Bytes::from_static(br#"{"x":2}"#),
        }];
        let failures = check(&expect, &Outcome::Ok, &published, &["info bye".into()]);
        assert_eq!(
            failures,
            vec![
                "result: expected reject, got ok",
                "publish[0]: subject: expected \"a.b\", got \"a.c\"",
                "publish[0]: json: at .x: expected 1, got 2",
                "publish[0]: header h: expected \"v\", got [\"w\"]",
                "logs: no line contains \"hello\"",
            ]
        );
        assert!(check(&Expect::default(), &Outcome::Ok, &[], &[]).is_empty());
    }
}

//! Publishing events from outside a host: the client behind `wasmev publish`.
//!
//! It reaches either NATS directly or a host's admin endpoint (the way in when that
//! host runs the embedded broker).

use std::time::Duration;

use anyhow::{Context as _, bail};
use bytes::Bytes;

use crate::broker::nats::NatsBroker;
use crate::broker::{Outgoing, validate_header};
use crate::manifest::{BrokerSettings, Manifest};
use crate::subject::Subject;

/// Where `wasmev publish` sends to.
#[derive(Debug, Clone, PartialEq)]
pub enum Target {
    /// NATS, with the manifest's credentials when it came from there.
    Nats(BrokerSettings),
    /// A host's admin endpoint, like `http://127.0.0.1:9090`.
    Admin(String),
}

impl Target {
    /// Explicit flags win; otherwise the manifest decides: its `[broker]` when it has one,
    /// else its `[admin]` endpoint.
    pub fn resolve(
        url: Option<String>,
        admin: Option<String>,
        manifest: &std::path::Path,
    ) -> anyhow::Result<Target> {
        if let Some(url) = url {
            return Ok(Target::Nats(BrokerSettings::at(url)));
        }
        if let Some(admin) = admin {
            return Ok(Target::Admin(admin));
        }
        let m = Manifest::load(manifest).with_context(|| {
            format!(
                "no --url or --admin given, and the manifest {} could not be used to find the broker",
                manifest.display()
            )
        })?;
        match (m.broker, m.admin) {
            (Some(broker), _) => Ok(Target::Nats(broker)),
            (None, Some(addr)) => Ok(Target::Admin(format!("http://{addr}"))),
            (None, None) => bail!(
                "{} uses the embedded broker but has no [admin] section, so nothing outside \
                 the host can publish to it; add `[admin]` with `listen = \"127.0.0.1:9090\"`",
                manifest.display()
            ),
        }
    }
}

/// Publish one message; returns a line describing what happened.
pub async fn publish(
    target: &Target,
    subject: &str,
    headers: &[(String, String)],
    payload: Bytes,
) -> anyhow::Result<String> {
    Subject::new(subject).with_context(|| format!("invalid subject {subject:?}"))?;
    for (k, v) in headers {
        validate_header(k, v)?;
    }
    match target {
        Target::Nats(settings) => {
            let broker = NatsBroker::connect(settings, Default::default()).await?;
            let message = Outgoing::new(subject, payload).with_headers(headers.to_vec());
            broker.publish(message).await?;
            broker.flush().await?;
            Ok(format!(
                "published to {subject:?} on nats at {}",
                settings.url
            ))
        }
        Target::Admin(base) => {
            let mut url = reqwest::Url::parse(base)
                .with_context(|| format!("invalid admin url {base:?}"))?
                .join(&format!("publish/{subject}"))
                .with_context(|| format!("invalid admin url {base:?}"))?;
            for (k, v) in headers {
                url.query_pairs_mut()
                    .append_pair("header", &format!("{k}:{v}"));
            }
            let response = reqwest::Client::new()
                .post(url)
                .timeout(Duration::from_secs(10))
                .body(payload)
                .send()
                .await
                .with_context(|| {
                    format!(
                        "failed to reach the wasmev admin endpoint at {base}; is the host running?"
                    )
                })?;
            let status = response.status();
            let body = response.text().await.unwrap_or_default();
            if !status.is_success() {
                bail!("the host refused the publish ({status}): {}", body.trim());
            }
            let delivered = serde_json::from_str::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| v.get("delivered").and_then(serde_json::Value::as_u64));
            Ok(match delivered {
                Some(n) => format!("published to {subject:?} via {base} ({n} subscriber(s))"),
                None => format!("published to {subject:?} via {base}"),
            })
        }
    }
}

/// Parse `-H name=value`.
pub fn parse_header(s: &str) -> Result<(String, String), String> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| format!("header {s:?} must be written name=value"))?;
    validate_header(k, v).map_err(|e| e.to_string())?;
    Ok((k.to_string(), v.to_string()))
}

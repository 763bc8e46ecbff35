//! The TOML schema of `runtime.toml`, as written. Every struct denies unknown fields so a
//! misspelt key is an error, not a silently ignored setting; values that have a syntax
//! (names, subjects, durations, sizes, URLs) are types whose parse error names the value.

use std::collections::BTreeMap;
use std::fmt;
use std::marker::PhantomData;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer};
use toml::Spanned;

use super::{Deliver, Diagnostic};
use crate::subject::{Pattern, SubjectError};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawManifest {
    pub(super) version: Spanned<u32>,
    pub(super) broker: Option<RawBroker>,
    pub(super) admin: Option<RawAdmin>,
    #[serde(default, rename = "handler")]
    pub(super) handlers: Vec<RawHandler>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawBroker {
    pub(super) url: Spanned<NatsUrl>,
    pub(super) creds_file: Option<Spanned<PathBuf>>,
    pub(super) token_env: Option<Spanned<String>>,
    pub(super) user_env: Option<Spanned<String>>,
    pub(super) password_env: Option<Spanned<String>>,
    pub(super) nkey_seed_env: Option<Spanned<String>>,
    pub(super) tls_ca: Option<Spanned<PathBuf>>,
    pub(super) tls_cert: Option<Spanned<PathBuf>>,
    pub(super) tls_key: Option<Spanned<PathBuf>>,
    pub(super) inbox_prefix: Option<InboxPrefix>,
    pub(super) jetstream_domain: Option<Name>,
    pub(super) jetstream_api_prefix: Option<Spanned<ApiPrefix>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAdmin {
    pub(super) listen: ListenAddr,
}

pub(super) struct ListenAddr(pub(super) SocketAddr);

impl TryFrom<String> for ListenAddr {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        s.parse().map(Self).map_err(|_| {
            format!("invalid listen address {s:?}: write an IP and port like \"127.0.0.1:9090\"")
        })
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawHandler {
    pub(super) name: Spanned<Name>,
    pub(super) module: Spanned<PathBuf>,
    pub(super) subscribe: Spanned<Vec<SubscribePattern>>,
    pub(super) queue: Option<Name>,
    #[serde(default)]
    pub(super) publish: Vec<SubscribePattern>,
    #[serde(default)]
    pub(super) config: BTreeMap<String, Spanned<toml::Value>>,
    pub(super) deadline: Option<Spanned<HumanDuration>>,
    pub(super) memory: Option<Spanned<Size>>,
    pub(super) max_in_flight: Option<Spanned<u32>>,
    #[serde(default)]
    pub(super) service: bool,
    pub(super) jetstream: Option<Spanned<RawJetStream>>,
    pub(super) max_payload: Option<Spanned<Size>>,
    pub(super) max_publishes: Option<Spanned<u32>>,
    pub(super) max_publish_bytes: Option<Spanned<Size>>,
    pub(super) hostcall_fuel: Option<Spanned<Size>>,
    pub(super) fuel: Option<Spanned<u64>>,
    pub(super) max_hops: Option<Spanned<u32>>,
    pub(super) stack: Option<Spanned<Size>>,
    pub(super) rollback_after: Option<Spanned<u32>>,
    pub(super) instances: Option<InstancesMode>,
    pub(super) recycle_after: Option<Spanned<u32>>,
    pub(super) build: Option<Spanned<String>>,
    #[serde(default)]
    pub(super) watch: Vec<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawJetStream {
    pub(super) stream: Name,
    pub(super) durable: Option<Name>,
    pub(super) deliver: Option<Deliver>,
    pub(super) ack_wait: Option<Spanned<HumanDuration>>,
    pub(super) max_deliver: Option<Spanned<u32>>,
    pub(super) backoff: Option<Spanned<Vec<HumanDuration>>>,
    pub(super) max_ack_pending: Option<Spanned<u32>>,
    pub(super) dead_letter: Option<ConcreteSubject>,
    pub(super) stream_subjects: Option<Vec<SubscribePattern>>,
}

/// A concrete subject whose deserialization error names the value.
pub(super) struct ConcreteSubject(pub(super) String);

impl TryFrom<String> for ConcreteSubject {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        crate::subject::Subject::new(s.clone())
            .map(|_| Self(s.clone()))
            .map_err(|e| format!("invalid subject {s:?}: {e}"))
    }
}

/// The start of a host's inbox subjects: the client adds `.<id>` to it.
pub(super) struct InboxPrefix(pub(super) String);

impl TryFrom<String> for InboxPrefix {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        subject_prefix(
            s,
            "inbox prefix",
            "where the inbox subjects start",
            "\"_INBOX_orders\"; the host adds `.<id>` to it",
        )
        .map(Self)
    }
}

/// The subject prefix an account imports another account's JetStream API under, in place
/// of `$JS.API`: the host adds `.STREAM.INFO.<stream>` and the like to it.
pub(super) struct ApiPrefix(pub(super) String);

impl TryFrom<String> for ApiPrefix {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        subject_prefix(
            s,
            "JetStream API prefix",
            "the subject the account imports the JetStream API under",
            "\"JS.orders.API\"; the host adds `.STREAM.INFO.<stream>` and the like to it",
        )
        .map(Self)
    }
}

/// `s` if it is a subject without wildcards, which the host writes more tokens after; the
/// error names it as `what`, and says to write `meaning` and gives `example` for a
/// wildcard.
fn subject_prefix(s: String, what: &str, meaning: &str, example: &str) -> Result<String, String> {
    match crate::subject::Subject::new(s.clone()) {
        Ok(_) => Ok(s),
        Err(crate::subject::SubjectError::Wildcard) => Err(format!(
            "invalid {what} {s:?}: write {meaning}, without wildcards, like {example}"
        )),
        Err(e) => Err(format!("invalid {what} {s:?}: {e}")),
    }
}

/// A handler or queue-group name: it appears in metrics labels, log fields and consumer
/// names, so it is restricted to characters that are safe in all of them.
pub(super) struct Name(pub(super) String);

impl TryFrom<String> for Name {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        const MAX: usize = 64;
        if s.is_empty() || s.len() > MAX {
            return Err(format!("invalid name {s:?}: must be 1 to {MAX} characters"));
        }
        if let Some(c) = s
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_')))
        {
            return Err(format!(
                "invalid name {s:?}: {c:?} is not allowed; use letters, digits, `-` and `_`"
            ));
        }
        Ok(Self(s))
    }
}

/// A pattern whose deserialization error names the value.
pub(super) struct SubscribePattern(pub(super) Pattern);

impl TryFrom<String> for SubscribePattern {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        Pattern::new(s.clone())
            .map(Self)
            .map_err(|e: SubjectError| format!("invalid subject {s:?}: {e}"))
    }
}

pub(super) struct HumanDuration(pub(super) Duration);

impl TryFrom<String> for HumanDuration {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        humantime::parse_duration(&s)
            .map(Self)
            .map_err(|e| format!("invalid duration {s:?}: {e}; write it like \"500ms\" or \"2s\""))
    }
}

pub(super) struct Size(pub(super) u64);

impl TryFrom<String> for Size {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        s.parse::<bytesize::ByteSize>()
            .map(|b| Self(b.as_u64()))
            .map_err(|e| format!("invalid size {s:?}: {e}; write it like \"64MiB\""))
    }
}

/// A NATS server URL without credentials in it.
pub(super) struct NatsUrl(pub(super) String);

impl TryFrom<String> for NatsUrl {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        let url = url::Url::parse(&s).map_err(|e| format!("invalid broker url {s:?}: {e}"))?;
        if !matches!(url.scheme(), "nats" | "tls" | "ws" | "wss") {
            return Err(format!(
                "unsupported scheme {:?} in broker url; use nats://, tls://, ws:// or wss://",
                url.scheme()
            ));
        }
        if !url.username().is_empty() || url.password().is_some() {
            return Err(
                "credentials inside the broker url are not allowed (they end up in logs \
                 and process lists); use creds_file, token_env, or user_env and password_env"
                    .to_string(),
            );
        }
        if url.host_str().is_none_or(str::is_empty) {
            return Err(format!("broker url {s:?} has no host"));
        }
        Ok(Self(s))
    }
}

/// Deserializes the string-written types above through [`TryFrom<String>`], whose error
/// names the value.
///
/// Through a visitor, not `#[serde(try_from = "String")]`: the parse then runs inside the
/// deserializer's call, and toml gives its error the span of the string itself. With
/// `try_from` it ran after that call returned, so toml put the span of the enclosing value
/// on it: a bad subject in `subscribe = [..]` underlined the whole array.
macro_rules! deserialize_from_string {
    ($($ty:ty),* $(,)?) => {$(
        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                deserializer.deserialize_string(ParseString(PhantomData))
            }
        }
    )*};
}

deserialize_from_string!(
    ListenAddr,
    NatsUrl,
    ConcreteSubject,
    InboxPrefix,
    ApiPrefix,
    Name,
    SubscribePattern,
    HumanDuration,
    Size,
);

struct ParseString<T>(PhantomData<T>);

impl<T: TryFrom<String, Error = String>> serde::de::Visitor<'_> for ParseString<T> {
    type Value = T;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a string")
    }

    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<T, E> {
        self.visit_string(v.to_owned())
    }

    fn visit_string<E: serde::de::Error>(self, v: String) -> Result<T, E> {
        T::try_from(v).map_err(E::custom)
    }
}

// ---------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub(super) enum InstancesMode {
    PerEvent,
    Reuse,
}

pub(super) fn parse_raw(path: &Path, src: &str) -> Result<RawManifest, Diagnostic> {
    let de = toml::Deserializer::parse(src).map_err(|e| {
        Diagnostic::new(path, src, e.span().unwrap_or(0..0), "", e.message().into())
    })?;
    serde_path_to_error::deserialize(de).map_err(|e| {
        // `Spanned<T>` deserializes through a private field; users never wrote that key.
        let key = e
            .path()
            .to_string()
            .replace(".$__serde_spanned_private_value", "");
        let key = if key == "." { String::new() } else { key };
        let inner = e.into_inner();
        let mut message = inner.message().trim_end().to_string();
        if key.is_empty() && message == "missing field `version`" {
            // What a manifest started from a copied `[[handler]]` block lacks.
            message.push_str(
                "; add `version = 1` at the top of the file (the manifest format this wasmev reads)",
            );
        }
        Diagnostic::new(path, src, inner.span().unwrap_or(0..0), &key, message)
    })
}

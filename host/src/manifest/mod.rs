//! `runtime.toml`: parsing, validation, and errors that point at the file, line and key.
//!
//! Parsing is strict (`deny_unknown_fields` everywhere, names and subjects as validated
//! types) so a typo fails here, before the host connects anywhere, with `file:line:col`
//! and the key path. Checks that need the whole document (duplicate names, module files,
//! credentials) run after parsing and report every problem at once.

mod diagnostic;
mod schema;
mod validate;

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

pub use diagnostic::{Diagnostic, ManifestError};

use crate::limits;
use crate::subject::Pattern;

/// The only manifest format version this host understands.
pub const VERSION: u32 = 1;

/// A validated manifest with paths resolved against the manifest's directory.
#[derive(Debug, Clone)]
pub struct Manifest {
    /// Where it was read from, as the user named it.
    pub path: PathBuf,
    /// `None`: the embedded in-process broker.
    pub broker: Option<BrokerSettings>,
    pub admin: Option<SocketAddr>,
    pub handlers: Vec<HandlerSpec>,
}

/// One `[[handler]]`, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct HandlerSpec {
    pub name: String,
    /// The module path resolved against the manifest's directory.
    pub module: PathBuf,
    pub subscribe: Vec<Pattern>,
    pub queue: Option<String>,
    pub publish: Vec<Pattern>,
    pub config: BTreeMap<String, String>,
    pub deadline: Duration,
    pub memory: u64,
    pub max_in_flight: u32,
    /// The per-event guards beyond deadline and memory.
    pub guards: Guards,
    /// Answer every request (an event with `reply-to`) exactly once: with the guest's
    /// reply, an empty reply on ok, or an error reply when the event fails.
    pub service: bool,
    /// Consume through a JetStream durable consumer instead of a core subscription.
    pub jetstream: Option<JetStreamSpec>,
    /// After a hot swap, go back to the previous version if this many first events on the
    /// new one all fail. `None`: never roll back automatically.
    pub rollback_after: Option<u32>,
    /// Fresh instance per event, or warm instances reused.
    pub instances: Instances,
    /// How `wasmev dev` rebuilds this handler; ignored by `wasmev run`.
    pub dev: DevSpec,
}

/// A handler's development loop: the command that builds its module and the source files
/// whose change triggers it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DevSpec {
    /// Run with `sh -c` in the manifest's directory.
    pub build: Option<String>,
    /// Glob patterns, relative to the manifest's directory.
    pub watch: Vec<String>,
}

impl HandlerSpec {
    /// The settings that decide how the handler runs; equal for two specs that differ
    /// only in their development loop.
    pub fn runtime_eq(&self, other: &HandlerSpec) -> bool {
        let strip = |s: &HandlerSpec| HandlerSpec {
            dev: DevSpec::default(),
            ..s.clone()
        };
        strip(self) == strip(other)
    }
}

/// Per-event limits on what a guest may push at the host and the broker. Defaults and
/// caps are in [`crate::limits`].
#[derive(Debug, Clone, PartialEq)]
pub struct Guards {
    /// Largest event payload accepted; bigger events are refused before instantiation.
    pub max_payload: u64,
    /// Publishes, replies and requests one event may make.
    pub max_publishes: u32,
    /// Bytes (payloads and headers) one event may publish in total.
    pub max_publish_bytes: u64,
    /// Bytes the guest may pass to the host in one call.
    pub hostcall_fuel: u64,
    /// When set, the instructions (wasmtime fuel units) one event may execute.
    pub fuel: Option<u64>,
    /// Events that already travelled this many handler hops are dropped.
    pub max_hops: u32,
    /// Wasm stack the guest may use, in bytes.
    pub stack: u64,
}

impl Default for Guards {
    fn default() -> Self {
        Self {
            max_payload: limits::DEFAULT_MAX_EVENT_PAYLOAD,
            max_publishes: limits::DEFAULT_MAX_PUBLISHES,
            max_publish_bytes: limits::DEFAULT_MAX_PUBLISH_BYTES,
            hostcall_fuel: limits::DEFAULT_HOSTCALL_FUEL,
            fuel: None,
            max_hops: limits::DEFAULT_MAX_HOPS,
            stack: limits::DEFAULT_WASM_STACK,
        }
    }
}

/// How a handler's events get their Wasm instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Instances {
    /// A fresh instance for every event: no state survives from one event to the next.
    #[default]
    PerEvent,
    /// A pool of warm instances (at most `max_in_flight`), each used by one event at a
    /// time and dropped after `recycle_after` events or any trap or limit hit.
    Reuse { recycle_after: u32 },
}

/// Where a JetStream consumer starts on first creation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Deliver {
    /// Every message still in the stream.
    All,
    /// Only messages published after the consumer was created.
    New,
}

/// A handler's JetStream consumer.
#[derive(Debug, Clone, PartialEq)]
pub struct JetStreamSpec {
    pub stream: String,
    pub durable: String,
    pub deliver: Deliver,
    pub ack_wait: Duration,
    pub max_deliver: u32,
    /// Delays between attempts: attempt n waits `backoff[n-1]` (the last entry repeats).
    pub backoff: Vec<Duration>,
    pub max_ack_pending: u32,
    /// Where events go when attempts are used up or the guest rejects them.
    pub dead_letter: String,
    /// When set, create the stream with these subjects if it does not exist.
    pub stream_subjects: Vec<Pattern>,
}

/// How to reach NATS.
#[derive(Debug, Clone, PartialEq)]
pub struct BrokerSettings {
    pub url: String,
    pub auth: Auth,
    pub tls_ca: Option<PathBuf>,
    /// A certificate and key the host shows the server (mutual TLS).
    pub tls_client: Option<TlsClient>,
    /// The host's reply inboxes are `<this>.<id>`: every request's answer, the JetStream
    /// API's among them, comes back on one.
    pub inbox_prefix: String,
    /// The JetStream API's subjects start with this: `$JS.API`, `$JS.<domain>.API` with
    /// `jetstream_domain`, or `jetstream_api_prefix` as written.
    pub jetstream_api: String,
}

/// async-nats's inbox prefix, and NATS's: a user allowed `_INBOX.>` can read every other
/// such user's replies, so a server shared by several users gives each one its own.
pub const DEFAULT_INBOX_PREFIX: &str = "_INBOX";

/// Where a server's own JetStream answers, in the connection's account and domain.
pub const DEFAULT_JETSTREAM_API: &str = "$JS.API";

impl BrokerSettings {
    /// NATS at `url`, without credentials, TLS or prefixes of its own.
    pub fn at(url: String) -> Self {
        Self {
            url,
            auth: Auth::None,
            tls_ca: None,
            tls_client: None,
            inbox_prefix: DEFAULT_INBOX_PREFIX.to_string(),
            jetstream_api: DEFAULT_JETSTREAM_API.to_string(),
        }
    }
}

/// The client certificate (PEM) and its private key (PEM) of `tls_cert` and `tls_key`.
#[derive(Debug, Clone, PartialEq)]
pub struct TlsClient {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Credentials, resolved at load time from files or the environment; never inline.
#[derive(Clone, PartialEq)]
pub enum Auth {
    None,
    CredsFile(PathBuf),
    Token(String),
    UserPassword {
        user: String,
        password: String,
    },
    /// A user nkey's seed (`SU…`): the client signs the server's nonce with it.
    NKey(String),
}

impl fmt::Debug for Auth {
    /// Never print secrets, not even in debug output.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Auth::None => f.write_str("None"),
            Auth::CredsFile(p) => f.debug_tuple("CredsFile").field(p).finish(),
            Auth::Token(_) => f.write_str("Token(<redacted>)"),
            Auth::UserPassword { user, .. } => write!(f, "UserPassword({user:?}, <redacted>)"),
            Auth::NKey(_) => f.write_str("NKey(<redacted>)"),
        }
    }
}

impl Manifest {
    /// Read and validate the manifest at `path`.
    pub fn load(path: &Path) -> Result<Manifest, ManifestError> {
        Self::read(path, true)
    }

    /// Like [`Manifest::load`], but a module file need not exist yet: `wasmev dev` reads
    /// the build commands that will create it, and a reload reports a missing module as
    /// that handler's problem rather than the manifest's.
    pub fn load_before_build(path: &Path) -> Result<Manifest, ManifestError> {
        Self::read(path, false)
    }

    fn read(path: &Path, require_modules: bool) -> Result<Manifest, ManifestError> {
        let src = std::fs::read_to_string(path).map_err(|error| ManifestError::Read {
            path: path.to_path_buf(),
            error,
        })?;
        validate::validate(
            path,
            &src,
            &|name| std::env::var(name).ok(),
            require_modules,
        )
    }

    /// Validate `src` as if read from `path`; `env` resolves credential variables.
    pub fn parse(
        path: &Path,
        src: &str,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Manifest, ManifestError> {
        validate::validate(path, src, env, true)
    }

    /// Look up a handler by name.
    pub fn handler(&self, name: &str) -> Option<&HandlerSpec> {
        self.handlers.iter().find(|h| h.name == name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(src: &str) -> Result<Manifest, ManifestError> {
        Manifest::parse(Path::new("runtime.toml"), src, &|_| None)
    }

    #[test]
    fn minimal_manifest_uses_the_embedded_broker_and_defaults() {
        let m = parse("version = 1\n").unwrap();
        assert!(m.broker.is_none());
        assert!(m.admin.is_none());
        assert!(m.handlers.is_empty());
    }

    #[test]
    fn a_broker_uses_the_default_prefixes_unless_it_sets_its_own() {
        let url = "version = 1\n[broker]\nurl = \"nats://127.0.0.1:4222\"\n";
        let plain = parse(url).unwrap().broker.unwrap();
        assert_eq!(plain, BrokerSettings::at("nats://127.0.0.1:4222".into()));
        assert_eq!(
            (plain.inbox_prefix.as_str(), plain.jetstream_api.as_str()),
            ("_INBOX", "$JS.API")
        );
        let own = parse(&format!(
            "{url}inbox_prefix = \"_INBOX_orders\"\njetstream_domain = \"hub\"\n"
        ))
        .unwrap()
        .broker
        .unwrap();
        assert_eq!(
            (own.inbox_prefix.as_str(), own.jetstream_api.as_str()),
            ("_INBOX_orders", "$JS.hub.API")
        );
        let imported = parse(&format!("{url}jetstream_api_prefix = \"JS.orders.API\"\n"))
            .unwrap()
            .broker
            .unwrap();
        assert_eq!(imported.jetstream_api, "JS.orders.API");
    }

    #[test]
    fn an_nkey_seed_is_read_from_the_environment_and_checked() {
        let src = "version = 1\n[broker]\nurl = \"nats://127.0.0.1:4222\"\n\
                   nkey_seed_env = \"NATS_NKEY_SEED\"\n";
        let seed = nkeys::KeyPair::new_user().seed().unwrap();
        let path = Path::new("runtime.toml");
        let given =
            |value: String| move |name: &str| (name == "NATS_NKEY_SEED").then(|| value.clone());
        let m = Manifest::parse(path, src, &given(seed.clone())).unwrap();
        assert_eq!(m.broker.unwrap().auth, Auth::NKey(seed));

        let err = Manifest::parse(path, src, &given("not-a-seed".into())).unwrap_err();
        insta::assert_snapshot!(err.to_string(), @r#"
            runtime.toml:4:17: `broker.nkey_seed_env`: environment variable "NATS_NKEY_SEED" does not hold an nkey seed (a user's starts with "SU", as `nsc` or `nk -gen user` write it)
              |
            4 | nkey_seed_env = "NATS_NKEY_SEED"
              |                 ^^^^^^^^^^^^^^^^
        "#);
        assert!(
            !err.to_string().contains("not-a-seed"),
            "the value stays out of the error"
        );
    }

    #[test]
    fn secrets_never_appear_in_debug_output() {
        let auth = Auth::UserPassword {
            user: "u".into(),
            password: "hunter2".into(),
        };
        assert!(!format!("{auth:?}").contains("hunter2"));
        assert!(!format!("{:?}", Auth::Token("tok-secret".into())).contains("tok-secret"));
        assert!(!format!("{:?}", Auth::NKey("SUseed".into())).contains("SUseed"));
    }

    #[test]
    fn diagnostics_point_at_line_and_column() {
        let err = parse("version = 1\n[admin]\nlisten = \"nope\"\n").unwrap_err();
        let ManifestError::Invalid(d) = err else {
            panic!("expected a diagnostic")
        };
        assert_eq!((d[0].line, d[0].column), (3, 10));
        assert_eq!(d[0].key, "admin.listen");
    }
}

//! `runtime.toml`: parsing, validation, and errors that point at the file, line and key.
//!
//! Parsing is strict (`deny_unknown_fields` everywhere, names and subjects as validated
//! types) so a typo fails here, before the host connects anywhere, with `file:line:col`
//! and the key path. Checks that need the whole document (duplicate names, module files,
//! credentials) run after parsing and report every problem at once.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::net::SocketAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use crate::limits;
use crate::subject::{Pattern, SubjectError};

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

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
enum InstancesMode {
    PerEvent,
    Reuse,
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
}

/// Credentials, resolved at load time from files or the environment; never inline.
#[derive(Clone, PartialEq)]
pub enum Auth {
    None,
    CredsFile(PathBuf),
    Token(String),
    UserPassword { user: String, password: String },
}

impl fmt::Debug for Auth {
    /// Never print secrets, not even in debug output.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Auth::None => f.write_str("None"),
            Auth::CredsFile(p) => f.debug_tuple("CredsFile").field(p).finish(),
            Auth::Token(_) => f.write_str("Token(<redacted>)"),
            Auth::UserPassword { user, .. } => write!(f, "UserPassword({user:?}, <redacted>)"),
        }
    }
}

/// Why a manifest could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("cannot read manifest {path:?}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// One or more problems, each with its location.
    #[error("{}", render_all(.0))]
    Invalid(Vec<Diagnostic>),
}

/// One problem in the manifest, located in the source.
#[derive(Debug, Clone, PartialEq)]
pub struct Diagnostic {
    pub file: PathBuf,
    pub line: usize,
    pub column: usize,
    /// The key path, like `handler[0].subscribe[1]`; empty for the document itself.
    pub key: String,
    pub message: String,
    /// The offending source line, for display.
    source_line: String,
    /// Width of the underline under `source_line`, in characters.
    underline: usize,
}

impl Diagnostic {
    fn new(file: &Path, src: &str, span: Range<usize>, key: &str, message: String) -> Self {
        let start = span.start.min(src.len());
        let line_start = src[..start].rfind('\n').map_or(0, |i| i + 1);
        let line_end = src[start..].find('\n').map_or(src.len(), |i| start + i);
        let source_line = src[line_start..line_end].trim_end_matches('\r').to_string();
        let column = src[line_start..start].chars().count() + 1;
        let end = span.end.clamp(start, line_end);
        Self {
            file: file.to_path_buf(),
            line: src[..start].matches('\n').count() + 1,
            column,
            key: key.to_string(),
            message,
            underline: src[start..end].chars().count().max(1),
            source_line,
        }
    }
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}: ", self.file.display(), self.line, self.column)?;
        if !self.key.is_empty() {
            write!(f, "`{}`: ", self.key)?;
        }
        writeln!(f, "{}", self.message)?;
        let gutter = self.line.to_string().len();
        writeln!(f, "{:gutter$} |", "")?;
        writeln!(f, "{} | {}", self.line, self.source_line)?;
        write!(
            f,
            "{:gutter$} | {}{}",
            "",
            " ".repeat(self.column - 1),
            "^".repeat(self.underline)
        )
    }
}

fn render_all(diagnostics: &[Diagnostic]) -> String {
    let mut out = String::new();
    for (i, d) in diagnostics.iter().enumerate() {
        if i > 0 {
            out.push_str("\n\n");
        }
        out.push_str(&d.to_string());
    }
    if diagnostics.len() > 1 {
        out.push_str(&format!(
            "\n\n{} problems in the manifest",
            diagnostics.len()
        ));
    }
    out
}

// ---------------------------------------------------------------------------------------
// The TOML schema. Every struct denies unknown fields so a misspelt key is an error, not a
// silently ignored setting.

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawManifest {
    version: Spanned<u32>,
    broker: Option<RawBroker>,
    admin: Option<RawAdmin>,
    #[serde(default, rename = "handler")]
    handlers: Vec<RawHandler>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBroker {
    url: Spanned<NatsUrl>,
    creds_file: Option<Spanned<PathBuf>>,
    token_env: Option<Spanned<String>>,
    user_env: Option<Spanned<String>>,
    password_env: Option<Spanned<String>>,
    tls_ca: Option<Spanned<PathBuf>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAdmin {
    listen: ListenAddr,
}

#[derive(Deserialize)]
#[serde(try_from = "String")]
struct ListenAddr(SocketAddr);

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
struct RawHandler {
    name: Spanned<Name>,
    module: Spanned<PathBuf>,
    subscribe: Spanned<Vec<SubscribePattern>>,
    queue: Option<Name>,
    #[serde(default)]
    publish: Vec<SubscribePattern>,
    #[serde(default)]
    config: BTreeMap<String, Spanned<toml::Value>>,
    deadline: Option<Spanned<HumanDuration>>,
    memory: Option<Spanned<Size>>,
    max_in_flight: Option<Spanned<u32>>,
    #[serde(default)]
    service: bool,
    jetstream: Option<Spanned<RawJetStream>>,
    max_payload: Option<Spanned<Size>>,
    max_publishes: Option<Spanned<u32>>,
    max_publish_bytes: Option<Spanned<Size>>,
    hostcall_fuel: Option<Spanned<Size>>,
    fuel: Option<Spanned<u64>>,
    max_hops: Option<Spanned<u32>>,
    stack: Option<Spanned<Size>>,
    rollback_after: Option<Spanned<u32>>,
    instances: Option<InstancesMode>,
    recycle_after: Option<Spanned<u32>>,
    build: Option<Spanned<String>>,
    #[serde(default)]
    watch: Vec<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawJetStream {
    stream: Name,
    durable: Option<Name>,
    deliver: Option<Deliver>,
    ack_wait: Option<Spanned<HumanDuration>>,
    max_deliver: Option<Spanned<u32>>,
    backoff: Option<Spanned<Vec<HumanDuration>>>,
    max_ack_pending: Option<Spanned<u32>>,
    dead_letter: Option<ConcreteSubject>,
    stream_subjects: Option<Vec<SubscribePattern>>,
}

/// A concrete subject whose deserialization error names the value.
#[derive(Deserialize)]
#[serde(try_from = "String")]
struct ConcreteSubject(String);

impl TryFrom<String> for ConcreteSubject {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        crate::subject::Subject::new(s.clone())
            .map(|_| Self(s.clone()))
            .map_err(|e| format!("invalid subject {s:?}: {e}"))
    }
}

/// A handler or queue-group name: it appears in metrics labels, log fields and consumer
/// names, so it is restricted to characters that are safe in all of them.
#[derive(Deserialize)]
#[serde(try_from = "String")]
struct Name(String);

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
#[derive(Deserialize)]
#[serde(try_from = "String")]
struct SubscribePattern(Pattern);

impl TryFrom<String> for SubscribePattern {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        Pattern::new(s.clone())
            .map(Self)
            .map_err(|e: SubjectError| format!("invalid subject {s:?}: {e}"))
    }
}

#[derive(Deserialize)]
#[serde(try_from = "String")]
struct HumanDuration(Duration);

impl TryFrom<String> for HumanDuration {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        humantime::parse_duration(&s)
            .map(Self)
            .map_err(|e| format!("invalid duration {s:?}: {e}; write it like \"500ms\" or \"2s\""))
    }
}

#[derive(Deserialize)]
#[serde(try_from = "String")]
struct Size(u64);

impl TryFrom<String> for Size {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        s.parse::<bytesize::ByteSize>()
            .map(|b| Self(b.as_u64()))
            .map_err(|e| format!("invalid size {s:?}: {e}; write it like \"64MiB\""))
    }
}

/// A NATS server URL without credentials in it.
#[derive(Deserialize)]
#[serde(try_from = "String")]
struct NatsUrl(String);

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

// ---------------------------------------------------------------------------------------

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
        let src = std::fs::read_to_string(path).map_err(|source| ManifestError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::validate(
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
        Self::validate(path, src, env, true)
    }

    fn validate(
        path: &Path,
        src: &str,
        env: &dyn Fn(&str) -> Option<String>,
        require_modules: bool,
    ) -> Result<Manifest, ManifestError> {
        let raw = parse_raw(path, src).map_err(|d| ManifestError::Invalid(vec![d]))?;
        let mut v = Validator {
            file: path,
            src,
            dir: path.parent().unwrap_or(Path::new("")),
            problems: Vec::new(),
            require_modules,
        };
        let manifest = v.manifest(raw, env);
        if v.problems.is_empty() {
            Ok(manifest)
        } else {
            // In file order, as a reader goes through them.
            v.problems.sort_by_key(|d| (d.line, d.column));
            Err(ManifestError::Invalid(v.problems))
        }
    }

    /// Look up a handler by name.
    pub fn handler(&self, name: &str) -> Option<&HandlerSpec> {
        self.handlers.iter().find(|h| h.name == name)
    }
}

fn parse_raw(path: &Path, src: &str) -> Result<RawManifest, Diagnostic> {
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
        Diagnostic::new(
            path,
            src,
            inner.span().unwrap_or(0..0),
            &key,
            inner.message().trim_end().to_string(),
        )
    })
}

struct Validator<'a> {
    file: &'a Path,
    src: &'a str,
    dir: &'a Path,
    problems: Vec<Diagnostic>,
    require_modules: bool,
}

impl Validator<'_> {
    fn report(&mut self, span: Range<usize>, key: String, message: String) {
        self.problems
            .push(Diagnostic::new(self.file, self.src, span, &key, message));
    }

    fn manifest(&mut self, raw: RawManifest, env: &dyn Fn(&str) -> Option<String>) -> Manifest {
        if *raw.version.get_ref() != VERSION {
            self.report(
                raw.version.span(),
                "version".into(),
                format!(
                    "unsupported manifest version {}; this wasmev reads version {VERSION}",
                    raw.version.get_ref()
                ),
            );
        }
        let broker = raw.broker.map(|b| self.broker(b, env));
        let has_broker = broker.is_some();
        let mut seen = HashSet::new();
        let mut total_in_flight: u64 = 0;
        let mut handlers = Vec::with_capacity(raw.handlers.len());
        for (i, h) in raw.handlers.into_iter().enumerate() {
            if !seen.insert(h.name.get_ref().0.clone()) {
                self.report(
                    h.name.span(),
                    format!("handler[{i}].name"),
                    format!(
                        "duplicate handler name {:?}; every handler needs its own name",
                        h.name.get_ref().0
                    ),
                );
            }
            let spec = self.handler(i, h, has_broker);
            total_in_flight += u64::from(spec.max_in_flight);
            handlers.push(spec);
        }
        if total_in_flight > u64::from(limits::MAX_TOTAL_IN_FLIGHT) {
            self.report(
                0..0,
                "handler".into(),
                format!(
                    "the handlers' max_in_flight add up to {total_in_flight}, more than the \
                     {} events the host can run at once (half its instance pool stays free \
                     for hot swaps); lower some max_in_flight",
                    limits::MAX_TOTAL_IN_FLIGHT
                ),
            );
        }
        Manifest {
            path: self.file.to_path_buf(),
            broker,
            admin: raw.admin.map(|a| a.listen.0),
            handlers,
        }
    }

    fn handler(&mut self, i: usize, h: RawHandler, has_broker: bool) -> HandlerSpec {
        let key = |field: &str| format!("handler[{i}].{field}");
        let guards = self.guards(&key, &h);
        let module = self.dir.join(h.module.get_ref());
        if self.require_modules && !module.is_file() {
            self.report(
                h.module.span(),
                key("module"),
                format!("module file {} does not exist", module.display()),
            );
        }
        if h.subscribe.get_ref().is_empty() {
            self.report(
                h.subscribe.span(),
                key("subscribe"),
                "a handler must subscribe to at least one subject".into(),
            );
        }
        let mut config = BTreeMap::new();
        for (k, v) in h.config {
            let span = v.span();
            match v.into_inner() {
                toml::Value::String(s) => {
                    config.insert(k, s);
                }
                toml::Value::Integer(n) => {
                    config.insert(k, n.to_string());
                }
                toml::Value::Float(n) => {
                    config.insert(k, n.to_string());
                }
                toml::Value::Boolean(b) => {
                    config.insert(k, b.to_string());
                }
                other => self.report(
                    span,
                    key(&format!("config.{k}")),
                    format!(
                        "config values must be strings, numbers or booleans, found {}",
                        other.type_str()
                    ),
                ),
            }
        }
        let deadline = match h.deadline {
            None => limits::DEFAULT_DEADLINE,
            Some(d) => {
                let value = d.get_ref().0;
                if value.is_zero() || value > limits::MAX_DEADLINE {
                    self.report(
                        d.span(),
                        key("deadline"),
                        format!(
                            "deadline must be more than 0s and at most {}",
                            humantime::format_duration(limits::MAX_DEADLINE)
                        ),
                    );
                }
                value
            }
        };
        let memory = match h.memory {
            None => limits::DEFAULT_MEMORY,
            Some(m) => {
                let value = m.get_ref().0;
                if !(1 << 16..=limits::MAX_MEMORY).contains(&value) {
                    self.report(
                        m.span(),
                        key("memory"),
                        format!(
                            "memory must be between 64KiB (one Wasm page) and {}",
                            bytesize::ByteSize::b(limits::MAX_MEMORY).display().iec()
                        ),
                    );
                }
                value
            }
        };
        let max_in_flight = match h.max_in_flight {
            None => limits::DEFAULT_MAX_IN_FLIGHT,
            Some(n) => {
                if *n.get_ref() == 0 {
                    self.report(
                        n.span(),
                        key("max_in_flight"),
                        "max_in_flight must be at least 1".into(),
                    );
                }
                *n.get_ref()
            }
        };
        let jetstream = h.jetstream.map(|js| {
            let span = js.span();
            if !has_broker {
                self.report(
                    span.clone(),
                    key("jetstream"),
                    "jetstream needs a [broker]: the embedded broker keeps nothing on disk".into(),
                );
            }
            if h.queue.is_some() {
                self.report(
                    span.clone(),
                    key("jetstream"),
                    "`queue` has no effect with jetstream: hosts bound to the same durable \
                     consumer already share its messages; remove `queue`"
                        .into(),
                );
            }
            self.jetstream(&key, js.into_inner(), &h.name.get_ref().0)
        });
        let rollback_after = h.rollback_after.map(|n| {
            let value = *n.get_ref();
            if !(1..=limits::MAX_ROLLBACK_AFTER).contains(&value) {
                self.report(
                    n.span(),
                    key("rollback_after"),
                    format!(
                        "rollback_after must be between 1 and {}",
                        limits::MAX_ROLLBACK_AFTER
                    ),
                );
            }
            value
        });
        let instances = match (h.instances, h.recycle_after) {
            (Some(InstancesMode::Reuse), n) => {
                let recycle_after = n.map_or(limits::DEFAULT_RECYCLE_AFTER, |n| {
                    let value = *n.get_ref();
                    if !(1..=limits::MAX_RECYCLE_AFTER).contains(&value) {
                        self.report(
                            n.span(),
                            key("recycle_after"),
                            format!(
                                "recycle_after must be between 1 and {}",
                                limits::MAX_RECYCLE_AFTER
                            ),
                        );
                    }
                    value
                });
                Instances::Reuse { recycle_after }
            }
            (_, Some(n)) => {
                self.report(
                    n.span(),
                    key("recycle_after"),
                    "recycle_after applies only with instances = \"reuse\"".into(),
                );
                Instances::PerEvent
            }
            (_, None) => Instances::PerEvent,
        };
        let dev = self.dev(&key, h.build, h.watch);
        HandlerSpec {
            name: h.name.into_inner().0,
            module,
            subscribe: h.subscribe.into_inner().into_iter().map(|p| p.0).collect(),
            queue: h.queue.map(|q| q.0),
            publish: h.publish.into_iter().map(|p| p.0).collect(),
            config,
            deadline,
            memory,
            max_in_flight,
            guards,
            service: h.service,
            jetstream,
            rollback_after,
            instances,
            dev,
        }
    }

    fn dev(
        &mut self,
        key: &dyn Fn(&str) -> String,
        build: Option<Spanned<String>>,
        watch: Vec<Spanned<String>>,
    ) -> DevSpec {
        if let Some(b) = &build
            && b.get_ref().trim().is_empty()
        {
            self.report(b.span(), key("build"), "build must be a command".into());
        }
        if build.is_none()
            && let Some(w) = watch.first()
        {
            self.report(
                w.span(),
                key("watch"),
                "watch needs a build command: add build = \"...\" to this handler".into(),
            );
        }
        for (i, w) in watch.iter().enumerate() {
            if let Err(e) = globset::Glob::new(w.get_ref()) {
                self.report(
                    w.span(),
                    key(&format!("watch[{i}]")),
                    format!("invalid glob {:?}: {}", w.get_ref(), e.kind()),
                );
            }
        }
        DevSpec {
            build: build.map(Spanned::into_inner),
            watch: watch.into_iter().map(Spanned::into_inner).collect(),
        }
    }

    /// `value` (with its span) if it is within `1..=cap`, else report it; `default` if unset.
    fn bounded(
        &mut self,
        key: &dyn Fn(&str) -> String,
        field: &str,
        value: Option<(u64, Range<usize>)>,
        default: u64,
        cap: u64,
        show: fn(u64) -> String,
    ) -> u64 {
        let Some((n, span)) = value else {
            return default;
        };
        if n == 0 || n > cap {
            self.report(
                span,
                key(field),
                format!("{field} must be between {} and {}", show(1), show(cap)),
            );
        }
        n
    }

    fn guards(&mut self, key: &dyn Fn(&str) -> String, h: &RawHandler) -> Guards {
        let size = |s: &Option<Spanned<Size>>| s.as_ref().map(|v| (v.get_ref().0, v.span()));
        let count =
            |n: &Option<Spanned<u32>>| n.as_ref().map(|v| (u64::from(*v.get_ref()), v.span()));
        let clamp32 = |n: u64| u32::try_from(n).unwrap_or(u32::MAX);
        let bytes: fn(u64) -> String = |n| bytesize::ByteSize::b(n).display().iec().to_string();
        let plain: fn(u64) -> String = |n| n.to_string();
        Guards {
            max_payload: self.bounded(
                key,
                "max_payload",
                size(&h.max_payload),
                limits::DEFAULT_MAX_EVENT_PAYLOAD,
                limits::MAX_EVENT_PAYLOAD,
                bytes,
            ),
            max_publishes: clamp32(self.bounded(
                key,
                "max_publishes",
                count(&h.max_publishes),
                u64::from(limits::DEFAULT_MAX_PUBLISHES),
                u64::from(limits::MAX_PUBLISHES_CAP),
                plain,
            )),
            max_publish_bytes: self.bounded(
                key,
                "max_publish_bytes",
                size(&h.max_publish_bytes),
                limits::DEFAULT_MAX_PUBLISH_BYTES,
                limits::MAX_PUBLISH_BYTES_CAP,
                bytes,
            ),
            hostcall_fuel: self.bounded(
                key,
                "hostcall_fuel",
                size(&h.hostcall_fuel),
                limits::DEFAULT_HOSTCALL_FUEL,
                limits::MAX_HOSTCALL_FUEL,
                bytes,
            ),
            fuel: h.fuel.as_ref().map(|f| {
                if *f.get_ref() == 0 {
                    self.report(f.span(), key("fuel"), "fuel must be at least 1".into());
                }
                *f.get_ref()
            }),
            stack: match &h.stack {
                None => limits::DEFAULT_WASM_STACK,
                Some(v) => {
                    let n = v.get_ref().0;
                    if !(limits::MIN_WASM_STACK..=limits::MAX_WASM_STACK).contains(&n) {
                        self.report(
                            v.span(),
                            key("stack"),
                            format!(
                                "stack must be between {} and {} (half the host's fiber stack)",
                                bytes(limits::MIN_WASM_STACK),
                                bytes(limits::MAX_WASM_STACK)
                            ),
                        );
                    }
                    n
                }
            },
            max_hops: clamp32(self.bounded(
                key,
                "max_hops",
                count(&h.max_hops),
                u64::from(limits::DEFAULT_MAX_HOPS),
                u64::from(limits::MAX_HOPS_CAP),
                plain,
            )),
        }
    }

    fn jetstream(
        &mut self,
        key: &dyn Fn(&str) -> String,
        js: RawJetStream,
        handler: &str,
    ) -> JetStreamSpec {
        let ack_wait = match js.ack_wait {
            None => limits::DEFAULT_ACK_WAIT,
            Some(d) => {
                let value = d.get_ref().0;
                if value < Duration::from_secs(1) {
                    self.report(
                        d.span(),
                        key("jetstream.ack_wait"),
                        "ack_wait must be at least 1s".into(),
                    );
                }
                value
            }
        };
        let max_deliver = match js.max_deliver {
            None => limits::DEFAULT_MAX_DELIVER,
            Some(n) => {
                if *n.get_ref() == 0 {
                    self.report(
                        n.span(),
                        key("jetstream.max_deliver"),
                        "max_deliver must be at least 1; retries are always finite".into(),
                    );
                }
                *n.get_ref()
            }
        };
        let backoff = match js.backoff {
            None => limits::DEFAULT_BACKOFF.to_vec(),
            Some(b) => {
                let span = b.span();
                let steps: Vec<Duration> = b.into_inner().into_iter().map(|d| d.0).collect();
                if steps.is_empty() || steps.iter().any(Duration::is_zero) {
                    self.report(
                        span,
                        key("jetstream.backoff"),
                        "backoff must list at least one delay, each more than 0s".into(),
                    );
                }
                steps
            }
        };
        let max_ack_pending = match js.max_ack_pending {
            None => limits::DEFAULT_MAX_ACK_PENDING,
            Some(n) => {
                if *n.get_ref() == 0 {
                    self.report(
                        n.span(),
                        key("jetstream.max_ack_pending"),
                        "max_ack_pending must be at least 1".into(),
                    );
                }
                *n.get_ref()
            }
        };
        JetStreamSpec {
            stream: js.stream.0,
            durable: js.durable.map_or_else(|| handler.to_string(), |d| d.0),
            deliver: js.deliver.unwrap_or(Deliver::All),
            ack_wait,
            max_deliver,
            backoff,
            max_ack_pending,
            dead_letter: js
                .dead_letter
                .map_or_else(|| format!("wasmev.dlq.{handler}"), |s| s.0),
            stream_subjects: js
                .stream_subjects
                .unwrap_or_default()
                .into_iter()
                .map(|p| p.0)
                .collect(),
        }
    }

    fn broker(&mut self, b: RawBroker, env: &dyn Fn(&str) -> Option<String>) -> BrokerSettings {
        let mut var = |v: &Spanned<String>, field: &str| -> String {
            env(v.get_ref()).unwrap_or_else(|| {
                self.report(
                    v.span(),
                    format!("broker.{field}"),
                    format!("environment variable {:?} is not set", v.get_ref()),
                );
                String::new()
            })
        };
        let auth = match (&b.creds_file, &b.token_env, &b.user_env, &b.password_env) {
            (None, None, None, None) => Auth::None,
            (Some(f), None, None, None) => Auth::CredsFile(self.dir.join(f.get_ref())),
            (None, Some(t), None, None) => Auth::Token(var(t, "token_env")),
            (None, None, Some(u), Some(p)) => Auth::UserPassword {
                user: var(u, "user_env"),
                password: var(p, "password_env"),
            },
            (None, None, Some(one), None) | (None, None, None, Some(one)) => {
                self.report(
                    one.span(),
                    "broker".into(),
                    "user_env and password_env must be set together".into(),
                );
                Auth::None
            }
            _ => {
                self.report(
                    b.url.span(),
                    "broker".into(),
                    "choose one way to authenticate: creds_file, token_env, or \
                     user_env with password_env"
                        .into(),
                );
                Auth::None
            }
        };
        for (field, path) in [("creds_file", &b.creds_file), ("tls_ca", &b.tls_ca)] {
            if let Some(p) = path {
                let resolved = self.dir.join(p.get_ref());
                if !resolved.is_file() {
                    self.report(
                        p.span(),
                        format!("broker.{field}"),
                        format!("file {} does not exist", resolved.display()),
                    );
                }
            }
        }
        BrokerSettings {
            url: b.url.into_inner().0,
            auth,
            tls_ca: b.tls_ca.map(|p| self.dir.join(p.into_inner())),
        }
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
    fn secrets_never_appear_in_debug_output() {
        let auth = Auth::UserPassword {
            user: "u".into(),
            password: "hunter2".into(),
        };
        assert!(!format!("{auth:?}").contains("hunter2"));
        assert!(!format!("{:?}", Auth::Token("tok-secret".into())).contains("tok-secret"));
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

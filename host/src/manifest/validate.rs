//! Checks that need the parsed document: value bounds, duplicate names, module files,
//! credentials, and how settings combine. Every problem is reported, in file order.

use std::collections::{BTreeMap, HashSet};
use std::ops::Range;
use std::path::Path;
use std::time::Duration;

use toml::Spanned;

use super::schema::{
    ApiPrefix, InstancesMode, Name, RawBroker, RawHandler, RawJetStream, RawManifest, Size,
    parse_raw,
};
use super::{
    Auth, BrokerSettings, DEFAULT_INBOX_PREFIX, DEFAULT_JETSTREAM_API, Deliver, DevSpec,
    Diagnostic, Guards, HandlerSpec, Instances, JetStreamSpec, Manifest, ManifestError, TlsClient,
    VERSION,
};
use crate::engine::EngineKey;
use crate::limits;

/// Validate `src` as if read from `path`; `env` resolves credential variables, and with
/// `require_modules` a module file must exist.
pub(super) fn validate(
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
        let mut engines = HashSet::new();
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
            // Where to point if this handler needs one engine too many: what sets its
            // engine apart.
            let (engine_span, engine_key) = match (&h.stack, &h.fuel) {
                (Some(stack), _) => (stack.span(), "stack"),
                (None, Some(fuel)) => (fuel.span(), "fuel"),
                (None, None) => (h.name.span(), "name"),
            };
            let spec = self.handler(i, h, has_broker);
            if engines.insert(EngineKey::of(&spec)) && engines.len() == limits::MAX_ENGINES + 1 {
                self.report(
                    engine_span,
                    format!("handler[{i}].{engine_key}"),
                    format!(
                        "this handler's stack and fuel settings need a wasm engine of their \
                         own, the {}th; a host runs at most {} (each reserves ~8 TiB of \
                         address space for its instance pool). Handlers with the same `stack` \
                         that all have, or all lack, `fuel` share one",
                        engines.len(),
                        limits::MAX_ENGINES
                    ),
                );
            }
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
        let auth = self.auth(&b, env);
        let tls_client = self.tls_client(&b);
        for (field, path) in [
            ("creds_file", &b.creds_file),
            ("tls_ca", &b.tls_ca),
            ("tls_cert", &b.tls_cert),
            ("tls_key", &b.tls_key),
        ] {
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
            tls_client,
            inbox_prefix: b
                .inbox_prefix
                .map_or_else(|| DEFAULT_INBOX_PREFIX.to_string(), |p| p.0),
            jetstream_api: self.jetstream_api(b.jetstream_domain, b.jetstream_api_prefix),
        }
    }

    /// Where the host sends its JetStream API requests: `$JS.API`, a domain's
    /// `$JS.<domain>.API`, or the prefix the account imports another account's API under.
    fn jetstream_api(
        &mut self,
        domain: Option<Name>,
        prefix: Option<Spanned<ApiPrefix>>,
    ) -> String {
        match (domain, prefix) {
            (None, None) => DEFAULT_JETSTREAM_API.to_string(),
            (Some(domain), None) => format!("$JS.{}.API", domain.0),
            (None, Some(prefix)) => prefix.into_inner().0,
            (Some(_), Some(prefix)) => {
                self.report(
                    prefix.span(),
                    "broker.jetstream_api_prefix".into(),
                    "set jetstream_domain or jetstream_api_prefix, not both: a domain is \
                     the prefix \"$JS.<domain>.API\""
                        .into(),
                );
                DEFAULT_JETSTREAM_API.to_string()
            }
        }
    }

    /// The one way to authenticate `b` chooses, its secrets read through `env`.
    fn auth(&mut self, b: &RawBroker, env: &dyn Fn(&str) -> Option<String>) -> Auth {
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
        match (
            &b.creds_file,
            &b.token_env,
            &b.user_env,
            &b.password_env,
            &b.nkey_seed_env,
        ) {
            (None, None, None, None, None) => Auth::None,
            (Some(f), None, None, None, None) => Auth::CredsFile(self.dir.join(f.get_ref())),
            (None, Some(t), None, None, None) => Auth::Token(var(t, "token_env")),
            (None, None, Some(u), Some(p), None) => Auth::UserPassword {
                user: var(u, "user_env"),
                password: var(p, "password_env"),
            },
            (None, None, None, None, Some(k)) => {
                let seed = var(k, "nkey_seed_env");
                // Checked here, not at connect: the client's error for a bad seed does
                // not say where the seed came from.
                if !seed.is_empty() && nkeys::KeyPair::from_seed(&seed).is_err() {
                    self.report(
                        k.span(),
                        "broker.nkey_seed_env".into(),
                        format!(
                            "environment variable {:?} does not hold an nkey seed (a user's \
                             starts with \"SU\", as `nsc` or `nk -gen user` write it)",
                            k.get_ref()
                        ),
                    );
                }
                Auth::NKey(seed)
            }
            (None, None, Some(one), None, None) | (None, None, None, Some(one), None) => {
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
                    "choose one way to authenticate: creds_file, token_env, nkey_seed_env, \
                     or user_env with password_env"
                        .into(),
                );
                Auth::None
            }
        }
    }

    /// The client certificate and key of `b`, if it gives both.
    fn tls_client(&mut self, b: &RawBroker) -> Option<TlsClient> {
        match (&b.tls_cert, &b.tls_key) {
            (Some(cert), Some(key)) => Some(TlsClient {
                cert: self.dir.join(cert.get_ref()),
                key: self.dir.join(key.get_ref()),
            }),
            (None, None) => None,
            (Some(one), None) | (None, Some(one)) => {
                self.report(
                    one.span(),
                    "broker".into(),
                    "tls_cert and tls_key must be set together: the client certificate \
                     and its private key"
                        .into(),
                );
                None
            }
        }
    }
}

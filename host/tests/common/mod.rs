//! Test harness: real guest components built from this repo, a real nats-server on a
//! random loopback port with a temp store, manifests written to temp dirs, and waits that
//! poll for a condition under a timeout instead of sleeping.

#![allow(dead_code)] // each test binary uses a different part of the harness

pub mod js;

use std::future::Future;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use futures::StreamExt;

/// The workspace root.
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// `cargo build --release --target wasm32-wasip2` of `packages`, from the workspace root;
/// the caller adds what else the build needs and runs it.
fn cargo_wasm(packages: &[&str]) -> Command {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut command = Command::new(cargo);
    command.current_dir(workspace());
    command.args(["build", "--release", "--target", "wasm32-wasip2", "--quiet"]);
    for package in packages {
        command.args(["-p", package]);
    }
    command
}

/// `crate_name`'s component in the release output of the wasm target under `target`,
/// which must be there.
fn built_component(target: &Path, crate_name: &str) -> PathBuf {
    let path = target
        .join("wasm32-wasip2/release")
        .join(format!("{}.wasm", crate_name.replace('-', "_")));
    assert!(path.is_file(), "no component at {}", path.display());
    path
}

/// Build every guest this test suite uses (once per test process) and return the path of
/// `crate_name`'s component. Cargo makes this a no-op when nothing changed.
pub fn component(crate_name: &str) -> PathBuf {
    static BUILT: OnceLock<()> = OnceLock::new();
    BUILT.get_or_init(|| {
        let status = cargo_wasm(&["email-sender", "audit-log", "chaos", "wrong-world"])
            .status()
            .expect("run cargo to build the guest components");
        assert!(
            status.success(),
            "building the guest components failed; is the wasm32-wasip2 target installed? \
             (rustup target add wasm32-wasip2)"
        );
    });
    built_component(&workspace().join("target"), crate_name)
}

/// `crate_name`'s component linked with a 64 KiB shadow stack instead of Rust's 1 MiB
/// (`-C link-arg=-zstack-size=65536`, what the README offers handler authors), built in a
/// target dir of its own so the usual build is not redone. ~25 s the first time.
pub fn small_stack_component(crate_name: &str) -> PathBuf {
    static BUILT: OnceLock<()> = OnceLock::new();
    let target = workspace().join("target/small-stack");
    BUILT.get_or_init(|| {
        let status = cargo_wasm(&["chaos"])
            .env("CARGO_TARGET_DIR", &target)
            .env("RUSTFLAGS", "-C link-arg=-zstack-size=65536")
            .env_remove("CARGO_ENCODED_RUSTFLAGS")
            .status()
            .expect("run cargo to build the small-stack guest");
        assert!(status.success(), "building the small-stack guest failed");
    });
    built_component(&target, crate_name)
}

/// A guest built with the SDK's `std` feature off: `bench-echo-lean` (the echo) or
/// `no-std-panic`. They are built in a cargo call of their own: built with the std crates
/// in one call, they would have wit-bindgen's and the SDK's features unified back to std.
pub fn no_std_component(crate_name: &str) -> PathBuf {
    static BUILT: OnceLock<()> = OnceLock::new();
    BUILT.get_or_init(|| {
        let status = cargo_wasm(&["bench-echo-lean", "no-std-panic"])
            .status()
            .expect("run cargo to build the no_std guests");
        assert!(status.success(), "building the no_std guests failed");
    });
    built_component(&workspace().join("target"), crate_name)
}

/// The interfaces `module`'s component imports, by name.
pub fn component_imports(module: &Path) -> Vec<String> {
    let engine = wasmtime::Engine::default();
    let component = wasmtime::component::Component::from_file(&engine, module).unwrap();
    component
        .component_type()
        .imports(&engine)
        .map(|(name, _)| name.to_string())
        .collect()
}

/// Poll `check` until it returns `Some`, or panic after `timeout` naming `what`.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            start.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Await `fut` or panic after `timeout`.
pub async fn within<T>(what: &str, timeout: Duration, fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(timeout, fut)
        .await
        .unwrap_or_else(|_| panic!("timed out after {timeout:?}: {what}"))
}

/// A free loopback port (bound then released; the OS does not hand it out again at once).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn nats_server_bin() -> PathBuf {
    if let Ok(p) = std::env::var("NATS_SERVER_BIN") {
        return p.into();
    }
    for dir in std::env::var("PATH")
        .unwrap_or_default()
        .split(':')
        .chain(["/usr/sbin", "/usr/bin"])
    {
        let candidate = Path::new(dir).join("nats-server");
        if candidate.is_file() {
            return candidate;
        }
    }
    panic!(
        "nats-server not found: install it (apt-get install -y nats-server) or set NATS_SERVER_BIN"
    );
}

/// The client port a nats-server wrote to its ports file in `dir`.
fn wait_for_ports_file(dir: &Path) -> u16 {
    let start = Instant::now();
    loop {
        let written = std::fs::read_dir(dir)
            .unwrap()
            .flatten()
            .find_map(|e| std::fs::read_to_string(e.path()).ok())
            .and_then(|text| serde_json::from_str::<serde_json::Value>(&text).ok())
            .and_then(|v| v["nats"][0].as_str().map(str::to_string));
        if let Some(url) = written {
            return url.rsplit(':').next().unwrap().parse().unwrap();
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "nats-server wrote no ports file in {}",
            dir.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A real nats-server with JetStream on a random loopback port and a temp store,
/// killed on drop and restartable on the same port and store.
pub struct NatsServer {
    pub port: u16,
    store: tempfile::TempDir,
    child: Option<Child>,
    /// Started with a configuration file (users and their permissions, say), and logging
    /// to [`NatsServer::log`].
    configured: bool,
    /// The JetStream domain of a server started with [`NatsServer::start_in_domain`].
    domain: Option<String>,
    /// Off for [`NatsServer::start_without_jetstream`].
    jetstream: bool,
}

impl NatsServer {
    pub fn start() -> Self {
        Self::plain(true)
    }

    /// A server as [`NatsServer::start`] makes one, without JetStream.
    pub fn start_without_jetstream() -> Self {
        Self::plain(false)
    }

    fn plain(jetstream: bool) -> Self {
        // Port 0 here means "let the server pick": a port probed free and then handed to
        // the server can be taken by a parallel test's server in between, and that
        // server's death later looks like ours.
        let mut server = Self {
            port: 0,
            store: tempfile::tempdir().unwrap(),
            child: None,
            configured: false,
            domain: None,
            jetstream,
        };
        server.spawn();
        server
    }

    /// A server as [`NatsServer::start`] makes one, reading `config` (nats-server's
    /// configuration format) as well; the command line's port and store win over it.
    pub fn start_with_config(config: &str) -> Self {
        Self::configured(config, None)
    }

    /// A server as [`NatsServer::start_with_config`] makes one, whose JetStream is in
    /// `domain`: its API answers on `$JS.<domain>.API` as well as on `$JS.API`.
    pub fn start_in_domain(config: &str, domain: &str) -> Self {
        Self::configured(config, Some(domain.to_string()))
    }

    fn configured(config: &str, domain: Option<String>) -> Self {
        let mut server = Self {
            port: 0,
            store: tempfile::tempdir().unwrap(),
            child: None,
            configured: true,
            domain,
            jetstream: true,
        };
        server.write_config(config);
        server.spawn();
        server
    }

    /// `config` as the server's configuration file, with JetStream on in the temp store.
    /// In the file, not on the command line: a reload reads only the file, and refuses
    /// one whose store differs from the running server's.
    fn write_config(&self, config: &str) {
        let store = self.store.path().display().to_string();
        let domain = self
            .domain
            .as_ref()
            .map(|d| format!(", domain: {d:?}"))
            .unwrap_or_default();
        std::fs::write(
            self.store.path().join("nats.conf"),
            format!("{config}\njetstream {{ store_dir: {store:?}{domain} }}\n"),
        )
        .unwrap();
    }

    /// Have a server started with [`NatsServer::start_with_config`] take `config` instead,
    /// as nats-server does on SIGHUP (users' permissions change for connected clients too).
    /// Returns once the server has logged that it reloaded: it does so on its own time,
    /// and a test that went on at once raced it.
    pub fn reconfigure(&self, config: &str) {
        const RELOADED: &str = "Reloaded server configuration";
        let before = self.log().matches(RELOADED).count();
        self.write_config(config);
        self.signal("-HUP");
        let start = Instant::now();
        while self.log().matches(RELOADED).count() == before {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "nats-server logged no reload:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// What a server started with [`NatsServer::start_with_config`] has logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.store.path().join("nats.log")).unwrap_or_default()
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Where leaf nodes connect to a server started with [`NatsServer::start_with_config`]
    /// whose configuration has `leafnodes { port: -1 }`: the port it chose is only in its
    /// log (2.9's ports file leaves it out).
    pub fn leafnode_url(&self) -> String {
        let start = Instant::now();
        loop {
            let port = self.log().lines().find_map(|l| {
                let (_, addr) = l.split_once("Listening for leafnode connections on ")?;
                addr.rsplit(':').next()?.trim().parse::<u16>().ok()
            });
            if let Some(port) = port {
                return format!("nats-leaf://127.0.0.1:{port}");
            }
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "nats-server logged no leafnode port"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The top of a manifest whose broker is this server.
    pub fn manifest_head(&self) -> String {
        format!("version = 1\n[broker]\nurl = {:?}\n", self.url())
    }

    /// Start the server on `self.port`, or on a port of its choosing when that is 0
    /// (read back from the ports file it writes), and wait until it accepts connections.
    fn spawn(&mut self) {
        let ports_dir = self.store.path().join("ports");
        let _ = std::fs::remove_dir_all(&ports_dir);
        std::fs::create_dir_all(&ports_dir).unwrap();
        let port = if self.port == 0 {
            "-1".to_string()
        } else {
            self.port.to_string()
        };
        let mut command = Command::new(nats_server_bin());
        if self.configured {
            // JetStream and its store are in the file (see `write_config`).
            let (config, log) = (
                self.store.path().join("nats.conf"),
                self.store.path().join("nats.log"),
            );
            command.arg("-c").arg(config).arg("-l").arg(log);
        } else if self.jetstream {
            command.arg("-js").arg("-sd").arg(self.store.path());
        }
        let child = command
            .args(["-a", "127.0.0.1", "-p", &port])
            .arg("--ports_file_dir")
            .arg(&ports_dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start nats-server");
        self.child = Some(child);
        if self.port == 0 {
            self.port = wait_for_ports_file(&ports_dir);
        }
        let addr: SocketAddr = ([127, 0, 0, 1], self.port).into();
        let start = Instant::now();
        while TcpStream::connect(addr).is_err() {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "nats-server did not start on {addr}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stop the server process (SIGSTOP) without closing its connections: to clients it
    /// looks alive but answers nothing, as a stalled server does. [`Self::resume`] ends it.
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    pub fn resume(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, signal: &str) {
        let pid = self.child.as_ref().expect("nats-server is running").id();
        let status = Command::new("kill")
            .args([signal, &pid.to_string()])
            .status()
            .unwrap();
        assert!(status.success(), "kill {signal} {pid}");
    }

    /// Kill and start again on the same port and store.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    pub async fn client(&self) -> async_nats::Client {
        within(
            "connect to nats",
            Duration::from_secs(10),
            async_nats::connect(self.url()),
        )
        .await
        .expect("connect to the test nats-server")
    }
}

/// Send `HPUB subject` with `header_block` (its `NATS/1.0` line included; any bytes) and
/// `payload` on a raw connection, as any client on the broker could, bypassing
/// async-nats's checks.
pub async fn raw_hpub(server: &NatsServer, subject: &str, header_block: &[u8], payload: &[u8]) {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    let stream = tokio::net::TcpStream::connect(("127.0.0.1", server.port))
        .await
        .unwrap();
    let mut stream = BufReader::new(stream);
    let mut line = String::new();
    stream.read_line(&mut line).await.unwrap();
    assert!(line.starts_with("INFO "), "server greeted with {line:?}");
    let headers = [header_block, b"\r\n\r\n"].concat();
    let mut frame = format!(
        "CONNECT {{\"verbose\":false,\"pedantic\":false,\"headers\":true}}\r\nHPUB {subject} {} {}\r\n",
        headers.len(),
        headers.len() + payload.len()
    )
    .into_bytes();
    frame.extend_from_slice(&headers);
    frame.extend_from_slice(payload);
    frame.extend_from_slice(b"\r\nPING\r\n");
    stream.get_mut().write_all(&frame).await.unwrap();
    // The server answers the PING after it has taken the HPUB (or refused it with -ERR).
    let mut answer = String::new();
    within("the server's PONG", Duration::from_secs(10), async {
        loop {
            answer.clear();
            stream.read_line(&mut answer).await.unwrap();
            assert!(!answer.starts_with("-ERR"), "server refused: {answer:?}");
            if answer.starts_with("PONG") {
                break;
            }
        }
    })
    .await;
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Write `toml` as `runtime.toml` in a fresh temp dir and load it.
pub fn manifest(toml: &str) -> (tempfile::TempDir, wasmev::Manifest) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("runtime.toml");
    std::fs::write(&path, toml).unwrap();
    let m = wasmev::Manifest::load(&path).unwrap_or_else(|e| panic!("test manifest invalid:\n{e}"));
    (dir, m)
}

/// TOML for a `[[handler]]` block using a component from this repo.
pub fn handler_block(name: &str, crate_name: &str, extra: &str) -> String {
    format!(
        "[[handler]]\nname = {name:?}\nmodule = {:?}\n{extra}\n",
        component(crate_name).display().to_string()
    )
}

/// Receive the next message on `sub` within `timeout`, or `None`.
pub async fn next_within(
    sub: &mut async_nats::Subscriber,
    timeout: Duration,
) -> Option<async_nats::Message> {
    tokio::time::timeout(timeout, sub.next())
        .await
        .ok()
        .flatten()
}

/// A host running in-process, as `wasmev run` would run it.
pub struct TestHost {
    pub broker: wasmev::broker::Broker,
    pub metrics: std::sync::Arc<wasmev::metrics::Metrics>,
    pub admin: Option<SocketAddr>,
    pub reloader: wasmev::reload::Reloader,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

/// [`TestHost::metric`] from a host's metrics, also after the host is stopped.
pub fn metric_in(metrics: &wasmev::metrics::Metrics, name: &str, labels: &str) -> u64 {
    metric_in_text(&metrics.encode(), name, labels)
}

/// The value of series `name{labels}` in a metrics text (what `/metrics` serves).
pub fn metric_in_text(text: &str, name: &str, labels: &str) -> u64 {
    // An unlabelled series is written without braces.
    let prefix = if labels.is_empty() {
        format!("{name} ")
    } else {
        format!("{name}{{{labels}}} ")
    };
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .map(|v| v.trim().parse::<f64>().unwrap() as u64)
        .unwrap_or_else(|| panic!("no metric series {prefix:?} in:\n{text}"))
}

impl TestHost {
    pub async fn start(m: &wasmev::Manifest) -> Self {
        Self::start_with(m, wasmev::Options::default()).await
    }

    pub async fn start_with(m: &wasmev::Manifest, options: wasmev::Options) -> Self {
        let host = within(
            "host start",
            Duration::from_secs(60),
            wasmev::Host::start(m, options),
        )
        .await
        .expect("host starts");
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        Self {
            broker: host.broker().clone(),
            metrics: host.metrics().clone(),
            admin: host.admin_addr(),
            reloader: host.reloader(),
            shutdown: Some(tx),
            task: Some(tokio::spawn(host.serve(async {
                let _ = rx.await;
            }))),
        }
    }

    /// Shut down as on SIGTERM and return what `serve` returned.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        let task = self.task.take().unwrap();
        within("host shutdown", Duration::from_secs(30), task)
            .await
            .unwrap()
    }

    /// The value of a metric line like `wasmev_events_ok_total{handler="x"} 3`. Every
    /// series is registered at zero when a handler loads, so a missing one is a bug.
    pub fn metric(&self, name: &str, labels: &str) -> u64 {
        metric_in(&self.metrics, name, labels)
    }

    /// Reload as `POST /reload` would, and return the report.
    pub async fn reload(&self) -> wasmev::reload::Report {
        within(
            "reload",
            Duration::from_secs(60),
            self.reloader.reload(wasmev::reload::Cause::AdminRequest),
        )
        .await
        .expect("host is running")
    }

    pub fn failed(&self, handler: &str, reason: &str) -> u64 {
        self.metric(
            "wasmev_events_failed_total",
            &format!("handler=\"{handler}\",reason=\"{reason}\""),
        )
    }

    pub fn ok(&self, handler: &str) -> u64 {
        self.metric("wasmev_events_ok_total", &format!("handler=\"{handler}\""))
    }

    pub fn received(&self, handler: &str) -> u64 {
        self.metric(
            "wasmev_events_received_total",
            &format!("handler=\"{handler}\""),
        )
    }

    pub fn publishes(&self, handler: &str, result: &str) -> u64 {
        self.metric(
            "wasmev_guest_publishes_total",
            &format!("handler=\"{handler}\",result=\"{result}\""),
        )
    }
}

impl Drop for TestHost {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

/// The chaos component with a custom section appended: same behaviour, other digest.
pub fn variant(tag: &str) -> Vec<u8> {
    let mut bytes = std::fs::read(component("chaos")).unwrap();
    let name = b"wasmev-test-variant";
    let mut body = vec![name.len() as u8];
    body.extend_from_slice(name);
    body.extend_from_slice(tag.as_bytes());
    assert!(body.len() < 128, "one-byte LEB128 section size");
    bytes.push(0); // custom section id
    bytes.push(body.len() as u8);
    bytes.extend_from_slice(&body);
    bytes
}

pub fn sha256(bytes: &[u8]) -> String {
    wasmev::cache::Digest::of(bytes).as_str().to_string()
}

/// The whole HTTP/1.0 response to `GET path` on the admin endpoint at `port`; `None`
/// while nothing listens there.
pub fn http_get(port: u16, path: &str) -> Option<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.write_all(format!("GET {path} HTTP/1.0\r\n\r\n").as_bytes())
        .ok()?;
    let mut response = String::new();
    s.read_to_string(&mut response).ok()?;
    Some(response)
}

/// A child process that is killed and reaped when dropped, so a test that fails before
/// stopping it leaves no process behind. Derefs to the [`Child`].
pub struct KillOnDrop(pub Child);

impl std::ops::Deref for KillOnDrop {
    type Target = Child;

    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for KillOnDrop {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `wasmev run runtime.toml` in `dir`, with `env` set and its log (info level) written to
/// `host.log` there; killed if a test fails before it stops.
pub struct LoggedHost(KillOnDrop);

impl LoggedHost {
    pub fn run(dir: &Path, env: &[(&str, &str)]) -> Self {
        let log = std::fs::File::create(dir.join("host.log")).unwrap();
        Self(KillOnDrop(
            wasmev_command()
                .args(["run", "runtime.toml"])
                .current_dir(dir)
                .envs(env.iter().copied())
                .env("NO_COLOR", "1")
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .unwrap(),
        ))
    }

    /// Wait until it has logged that it is ready on NATS; fail with its log if it exits
    /// first or is not ready within 30 s.
    pub async fn ready(&mut self, dir: &Path) {
        const WAIT: Duration = Duration::from_secs(30);
        let start = Instant::now();
        loop {
            let log = logged(dir);
            if log.contains(" ready on the nats") {
                return;
            }
            let exited = self.0.try_wait().unwrap();
            assert!(
                exited.is_none(),
                "the host exited ({exited:?}); its log:\n{log}"
            );
            assert!(
                start.elapsed() < WAIT,
                "the host was not ready within {WAIT:?}; its log:\n{log}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Its exit code, once it exits (by itself, or after SIGTERM with `terminate`), within
    /// 30 s.
    pub fn exit(mut self, terminate: bool) -> Option<i32> {
        if terminate {
            signal(&self.0, "-TERM");
        }
        exit_within(&mut self.0, Duration::from_secs(30))
    }
}

/// What a [`LoggedHost`] in `dir` has logged so far.
pub fn logged(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("host.log")).unwrap()
}

/// Send `signal` (`-TERM`, `-HUP`) to `child`.
pub fn signal(child: &Child, signal: &str) {
    let status = Command::new("kill")
        .args([signal, &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success(), "kill {signal} {}", child.id());
}

/// SIGTERM `child` and wait at most `timeout` for it to exit: its exit code.
pub fn terminate_within(child: &mut Child, timeout: Duration) -> Option<i32> {
    signal(child, "-TERM");
    exit_within(child, timeout)
}

/// `child`'s exit code, once it exits; panics if that takes longer than `timeout`. Reaped
/// here, so a [`KillOnDrop`] around it signals nothing afterwards.
pub fn exit_within(child: &mut Child, timeout: Duration) -> Option<i32> {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status.code();
        }
        assert!(start.elapsed() < timeout, "did not exit within {timeout:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Wait until a host's admin endpoint on `port` answers `/healthz` with 200.
pub fn wait_healthy(port: u16, timeout: Duration) {
    let start = Instant::now();
    while !http_get(port, "/healthz").is_some_and(|response| {
        response.starts_with("HTTP/1.0 200") || response.starts_with("HTTP/1.1 200")
    }) {
        assert!(start.elapsed() < timeout, "host never became healthy");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The `wasmev` binary, with its artifact cache in a temp dir shared by the test run
/// (never the user's own cache).
pub fn wasmev_command() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_wasmev"));
    command.env(
        "WASMEV_CACHE_DIR",
        std::env::temp_dir().join("wasmev-test-artifacts"),
    );
    command
}

/// Build a non-Rust example handler (once per test process per handler) with
/// `scripts/lib.sh`'s `build_example`, which leaves one newer than its sources as it is,
/// and return its component.
///
/// Why through the script: componentize-py and componentize-js do not build the same
/// bytes twice, so every rebuild was a new component for the artifact cache too. Each test
/// binary that used one rebuilt and recompiled it, though `./scripts/test` had just built
/// them all (~20 s of building and ~25 s of compiling per binary on a 2-core machine).
pub fn foreign_component(handler: &str, file: &str) -> PathBuf {
    static BUILT: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());
    let mut built = BUILT.lock().unwrap();
    if !built.iter().any(|h| h == handler) {
        let status = Command::new("bash")
            .args([
                "-c",
                r#"source scripts/lib.sh && build_example "$1""#,
                "bash",
            ])
            .arg(handler)
            .current_dir(workspace())
            .status()
            .unwrap_or_else(|e| panic!("run bash to build handlers/{handler}: {e}"));
        assert!(
            status.success(),
            "building handlers/{handler} failed; ./scripts/test installs the tools it needs"
        );
        built.push(handler.to_string());
    }
    workspace().join("handlers").join(handler).join(file)
}

/// Host options with the compiled-artifact cache shared by the test run, so large
/// (JS, Python) components compile once per machine rather than once per test.
pub fn cached_options() -> wasmev::Options {
    wasmev::Options {
        cache: Some(
            wasmev::cache::ArtifactCache::open(std::env::temp_dir().join("wasmev-test-artifacts"))
                .unwrap(),
        ),
        ..Default::default()
    }
}

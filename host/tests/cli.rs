//! The `wasmev` binary as a user runs it: `check` and `run` exit codes and messages for
//! broken modules, and SIGTERM handling.

mod common;

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::*;

fn wasmev(args: &[&str], cwd: &Path) -> std::process::Output {
    wasmev_command()
        .args(args)
        .current_dir(cwd)
        .env("RUST_LOG", "error")
        .output()
        .unwrap()
}

#[test]
fn check_accepts_the_shipped_runtime_toml() {
    component("email-sender"); // builds the example handlers it names
    component("audit-log");
    foreign_component("signup-scorer", "signup_scorer.wasm");
    foreign_component("welcome-renderer", "welcome_renderer.wasm");
    foreign_component("audit-checksum", "audit_checksum.wasm");
    let out = wasmev(&["check", "runtime.toml"], &workspace());
    assert!(
        out.status.success(),
        "wasmev check runtime.toml failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("ok (5 handler(s), embedded broker)"));
}

/// A manifest in a temp dir whose one handler's module is `module` (written as given).
fn broken(module_bytes: Option<&[u8]>) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    if let Some(bytes) = module_bytes {
        std::fs::write(dir.path().join("handler.wasm"), bytes).unwrap();
    }
    std::fs::write(
        dir.path().join("runtime.toml"),
        "version = 1\n\n[[handler]]\nname = \"mailer\"\nmodule = \"handler.wasm\"\nsubscribe = [\"a\"]\n",
    )
    .unwrap();
    dir
}

/// Run `check` and `run` on the broken manifest: both must fail with the same message.
fn both_fail(dir: &tempfile::TempDir) -> String {
    let check = wasmev(&["check"], dir.path());
    let run = wasmev(&["run"], dir.path());
    assert_eq!(check.status.code(), Some(1));
    assert_eq!(run.status.code(), Some(1));
    let check_err = String::from_utf8_lossy(&check.stderr).to_string();
    let run_err = String::from_utf8_lossy(&run.stderr).to_string();
    let first_line = check_err.lines().next().unwrap().to_string();
    assert!(
        run_err.contains(first_line.trim_start_matches("error: ")),
        "run said:\n{run_err}"
    );
    check_err.replace(&dir.path().display().to_string(), "[dir]")
}

#[test]
fn missing_module_is_reported_with_file_line_and_key() {
    let dir = broken(None);
    insta::assert_snapshot!(both_fail(&dir));
}

#[test]
fn garbage_module_is_not_a_component() {
    let dir = broken(Some(b"definitely not wasm"));
    let err = both_fail(&dir);
    assert!(
        err.contains("handler \"mailer\": handler.wasm is not a WebAssembly component"),
        "{err}"
    );
}

#[test]
fn core_module_is_told_to_become_a_component() {
    // The smallest valid core module: magic + version 1.
    let dir = broken(Some(b"\0asm\x01\0\0\0"));
    insta::assert_snapshot!(both_fail(&dir));
}

#[test]
fn component_of_another_world_is_refused_at_load() {
    let bytes = std::fs::read(component("wrong-world")).unwrap();
    let dir = broken(Some(&bytes));
    let err = both_fail(&dir);
    assert!(
        err.contains(
            "handler \"mailer\": handler.wasm does not implement the wasmev:events/handler world"
        ),
        "{err}"
    );
}

/// A `wasmev run` process, killed if a test fails before stopping it.
type Running = KillOnDrop;

/// `wasmev run` in `dir` on a manifest of `handlers` with its admin endpoint on `port`,
/// once `/healthz` answers 200.
fn run_until_healthy(dir: &Path, port: u16, handlers: &str) -> Running {
    run_with_until_healthy(dir, port, handlers, &[])
}

/// [`run_until_healthy`], with `args` after `run runtime.toml`.
fn run_with_until_healthy(dir: &Path, port: u16, handlers: &str, args: &[&str]) -> Running {
    std::fs::write(
        dir.join("runtime.toml"),
        format!("version = 1\n[admin]\nlisten = \"127.0.0.1:{port}\"\n{handlers}"),
    )
    .unwrap();
    let running = KillOnDrop(
        wasmev_command()
            .args(["run", "runtime.toml"])
            .args(args)
            .current_dir(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    wait_healthy(port, Duration::from_secs(30));
    running
}

/// SIGTERM the host and wait for it: its exit code and everything it logged.
fn terminate(mut running: Running) -> (Option<i32>, String) {
    // Left in `running`: should the host not exit, the panic below still kills it.
    let child = &mut *running;
    let code = terminate_within(child, Duration::from_secs(15));
    let mut stderr = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut stderr).unwrap();
    (code, stderr)
}

#[test]
fn sigterm_stops_intake_and_exits_zero() {
    let dir = tempfile::tempdir().unwrap();
    let child = run_until_healthy(
        dir.path(),
        free_port(),
        &handler_block(
            "audit-log",
            "audit-log",
            "subscribe = [\"user.>\"]\npublish = [\"audit.recorded\"]",
        ),
    );
    let (code, stderr) = terminate(child);
    assert_eq!(code, Some(0), "stderr:\n{stderr}");
    assert!(stderr.contains("shutting down"), "{stderr}");
}

#[test]
fn worker_threads_sets_how_many_threads_the_host_runs_on() {
    // 3: neither the default on the 2-core machines the tests run on, nor 1, which a
    // broken flag could land on by accident.
    let dir = tempfile::tempdir().unwrap();
    let child = run_with_until_healthy(
        dir.path(),
        free_port(),
        &handler_block("audit-log", "audit-log", "subscribe = [\"user.>\"]"),
        &["--worker-threads", "3"],
    );
    let (code, stderr) = terminate(child);
    assert_eq!(code, Some(0), "stderr:\n{stderr}");
    let ready = stderr.lines().find(|l| l.contains("ready on the")).unwrap();
    assert!(ready.contains("worker_threads=3"), "{ready}");
}

#[test]
fn worker_threads_of_zero_is_refused_with_the_range() {
    let dir = tempfile::tempdir().unwrap();
    let out = wasmev(&["run", "--worker-threads", "0"], dir.path());
    assert_eq!(out.status.code(), Some(2));
    insta::assert_snapshot!(String::from_utf8_lossy(&out.stderr), @"
    error: invalid value '0' for '--worker-threads <N>': 0 is not in 1..=1024

    For more information, try '--help'.
    ");
}

#[test]
fn publish_with_nowhere_to_publish_says_what_to_give() {
    let dir = tempfile::tempdir().unwrap();
    let out = wasmev_command()
        .args(["publish", "user.created", "{}"])
        .current_dir(dir.path())
        .env_remove("NATS_URL")
        .env_remove("WASMEV_ADMIN")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    insta::assert_snapshot!(String::from_utf8_lossy(&out.stderr), @r#"error: no --url or --admin given, and the manifest runtime.toml could not be used to find the broker: cannot read manifest "runtime.toml": No such file or directory (os error 2)"#);
}

#[test]
fn an_unreachable_nats_is_one_line_that_names_it() {
    // Nothing listens on a port just found free.
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("runtime.toml"),
        format!(
            "version = 1\n[broker]\nurl = \"nats://127.0.0.1:{port}\"\n{}",
            handler_block("audit-log", "audit-log", "subscribe = [\"user.>\"]")
        ),
    )
    .unwrap();
    let out = wasmev(&["run"], dir.path());
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr).replace(&port.to_string(), "[port]");
    insta::assert_snapshot!(stderr, @"error: failed to connect to nats at nats://127.0.0.1:[port]: IO error: Connection refused (os error 111)");
}

#[test]
fn sigterm_on_nats_stops_without_a_warning() {
    // An orderly stop closes the NATS connection itself; async-nats reports that as an
    // event, which the host used to log as a warning after "stopped".
    let nats = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let child = run_until_healthy(
        dir.path(),
        free_port(),
        &format!(
            "[broker]\nurl = \"{}\"\n{}",
            nats.url(),
            handler_block(
                "audit-log",
                "audit-log",
                "subscribe = [\"user.>\"]\npublish = [\"audit.recorded\"]",
            )
        ),
    );
    let (code, stderr) = terminate(child);
    assert_eq!(code, Some(0), "stderr:\n{stderr}");
    assert!(stderr.contains("connected to nats"), "{stderr}");
    assert!(stderr.contains("stopped"), "{stderr}");
    let warnings: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
        .collect();
    assert!(warnings.is_empty(), "{warnings:#?}");
}

#[test]
fn what_a_guest_prints_reaches_the_log_once_per_event() {
    // A warm instance: its output buffers outlive each event, so a line printed in one
    // event must be logged after that event, and not again after the next.
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let child = run_until_healthy(
        dir.path(),
        port,
        &handler_block(
            "chaos",
            "chaos",
            "subscribe = [\"chaos.in\"]\ninstances = \"reuse\"",
        ),
    );
    let admin = format!("http://127.0.0.1:{port}");
    for op in [
        r#"{"op":"print","bytes":80}"#,
        r#"{"op":"print","bytes":0}"#,
    ] {
        let out = wasmev(&["publish", "--admin", &admin, "chaos.in", op], dir.path());
        assert!(out.status.success(), "{out:?}");
    }
    // The second event prints nothing; wait until both are counted.
    wait_for_metric(port, r#"wasmev_events_ok_total{handler="chaos"} 2"#);
    let (code, stderr) = terminate(child);
    assert_eq!(code, Some(0), "stderr:\n{stderr}");
    let printed: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains(&"p".repeat(79)))
        .collect();
    assert_eq!(printed.len(), 1, "{stderr}");
    assert!(
        printed[0].contains("handler=chaos") && printed[0].contains("stream=\"stdout\""),
        "{}",
        printed[0]
    );
}

/// A handler built without std has no stderr to print a panic on; the SDK's panic handler
/// logs the message and location through wasmev's `log` import instead, then traps. It
/// formats on the stack, into 1 KiB: a longer message is cut at a character boundary.
#[test]
fn a_no_std_handlers_panic_message_reaches_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let child = run_until_healthy(
        dir.path(),
        port,
        &format!(
            "[[handler]]\nname = \"lean\"\nmodule = {:?}\nsubscribe = [\"lean.in\"]\n",
            no_std_component("no-std-panic").display().to_string()
        ),
    );
    let admin = format!("http://127.0.0.1:{port}");
    // Three bytes a character: whatever the message's prefix, a cut at byte 1024 that
    // ignored boundaries would split one two times in three.
    let long = "€".repeat(400);
    for payload in ["order 7", &long] {
        let out = wasmev(
            &["publish", "--admin", &admin, "lean.in", payload],
            dir.path(),
        );
        assert!(out.status.success(), "{out:?}");
    }
    wait_for_metric(
        port,
        r#"wasmev_events_failed_total{handler="lean",reason="trap"} 2"#,
    );
    let (code, stderr) = terminate(child);
    assert_eq!(code, Some(0), "stderr:\n{stderr}");
    let logged = |text: &str| -> &str {
        let lines: Vec<&str> = stderr.lines().filter(|l| l.contains(text)).collect();
        assert_eq!(lines.len(), 1, "{text}: {stderr}");
        lines[0]
    };
    let short = logged(r#"no_std handler refused "order 7""#);
    assert!(
        short.contains("ERROR")
            && short.contains("handler=lean")
            && short.contains("panicked at host/tests/fixtures/no-std-panic/src/lib.rs:"),
        "{short}"
    );
    let cut = logged(r#"no_std handler refused "€€€"#);
    let message = &cut[cut.find("panicked at").unwrap()..cut.rfind('€').unwrap() + '€'.len_utf8()];
    assert!(
        (1024 - 2..=1024).contains(&message.len()) && !cut.contains('\u{FFFD}'),
        "{} bytes: {cut}",
        message.len()
    );
}

/// The admin endpoint's metrics text.
fn metrics(port: u16) -> String {
    http_get(port, "/metrics").expect("the admin endpoint answers")
}

/// Poll the admin endpoint until its metrics text has `line`, for at most 10 s.
fn wait_for_metric(port: u16, line: &str) {
    let start = Instant::now();
    while !metrics(port).contains(line) {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "no {line:?} in:\n{}",
            metrics(port)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

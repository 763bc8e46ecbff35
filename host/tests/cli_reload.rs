//! Reload as a user drives it, through the real `wasmev` binary: SIGHUP, `POST /reload`
//! (its report, snapshotted), `wasmev dev` rebuilding on a source change, and the
//! compiled-artifact cache across starts.

mod common;

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::path::Path;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;

/// A `wasmev` process whose stdout and stderr are collected as they come.
struct Proc {
    child: KillOnDrop,
    output: Arc<Mutex<String>>,
}

impl Proc {
    fn spawn(args: &[&str], cwd: &Path, cache: &Path) -> Self {
        let mut child = wasmev_command()
            .args(args)
            .current_dir(cwd)
            .env("WASMEV_CACHE_DIR", cache)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let output = Arc::new(Mutex::new(String::new()));
        for stream in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>,
            Box::new(child.stderr.take().unwrap()),
        ] {
            let output = output.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines() {
                    let Ok(line) = line else { return };
                    let mut out = output.lock().unwrap();
                    out.push_str(&line);
                    out.push('\n');
                }
            });
        }
        Self {
            child: KillOnDrop(child),
            output,
        }
    }

    fn output(&self) -> String {
        self.output.lock().unwrap().clone()
    }

    /// Wait until the output has a line containing every one of `parts`.
    fn wait_line(&self, parts: &[&str], timeout: Duration) -> String {
        let start = Instant::now();
        loop {
            if let Some(line) = self
                .output()
                .lines()
                .find(|l| parts.iter().all(|p| l.contains(p)))
            {
                return line.to_string();
            }
            assert!(
                start.elapsed() < timeout,
                "no line with {parts:?} after {timeout:?}; output:\n{}",
                self.output()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn signal(&self, signal: &str) {
        common::signal(&self.child, signal);
    }

    /// SIGTERM, then the exit code.
    fn stop(mut self) -> Option<i32> {
        terminate_within(&mut self.child, Duration::from_secs(15))
    }
}

/// A plain HTTP/1.0 request to the admin endpoint: (status, body).
fn http(port: u16, method: &str, path: &str) -> (u16, String) {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(s, "{method} {path} HTTP/1.0\r\nContent-Length: 0\r\n\r\n").unwrap();
    let mut response = String::new();
    s.read_to_string(&mut response).unwrap();
    let status = response[9..12].parse().unwrap();
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

fn manifest(port: u16, version: &str, extra: &str) -> String {
    format!(
        r#"version = 1
[admin]
listen = "127.0.0.1:{port}"

[[handler]]
name = "h"
module = "h.wasm"
subscribe = ["in"]
publish = ["chaos.>"]
config = {{ version = "{version}" }}
{extra}
"#
    )
}

/// The report with what differs between runs (digests, time, temp paths) replaced.
fn redact(body: &str, dir: &Path) -> String {
    let mut v: serde_json::Value = serde_json::from_str(body).unwrap();
    v["elapsed_ms"] = "[ms]".into();
    for list in ["live", "added"] {
        if let Some(items) = v.get_mut(list).and_then(|l| l.as_array_mut()) {
            for item in items {
                item["digest"] = "[digest]".into();
            }
        }
    }
    serde_json::to_string_pretty(&v)
        .unwrap()
        .replace(&dir.display().to_string(), "[dir]")
}

#[test]
fn sighup_and_post_reload_swap_and_report() {
    let dir = tempfile::tempdir().unwrap();
    let cache = tempfile::tempdir().unwrap();
    let port = free_port();
    std::fs::write(dir.path().join("h.wasm"), variant("1")).unwrap();
    std::fs::write(dir.path().join("runtime.toml"), manifest(port, "1", "")).unwrap();
    let host = Proc::spawn(&["run", "--no-watch"], dir.path(), cache.path());
    wait_healthy(port, Duration::from_secs(30));

    // Nothing changed: 200 and every handler unchanged.
    let (status, body) = http(port, "POST", "/reload");
    assert_eq!(status, 200, "{body}");
    insta::assert_snapshot!("reload_unchanged", redact(&body, dir.path()));

    // SIGHUP after a config edit swaps the handler; the log names both digests.
    std::fs::write(dir.path().join("runtime.toml"), manifest(port, "2", "")).unwrap();
    host.signal("-HUP");
    let digest = sha256(&variant("1"));
    let line = host.wait_line(
        &["handler swapped", "cause=SIGHUP"],
        Duration::from_secs(20),
    );
    assert!(line.contains(&format!("from={}", &digest[..12])), "{line}");
    assert!(line.contains("changed=config"), "{line}");

    // A garbage module: 422, the reason per handler, the old version still live.
    std::fs::write(dir.path().join("h.wasm"), b"not wasm at all").unwrap();
    let (status, body) = http(port, "POST", "/reload");
    assert_eq!(status, 422, "{body}");
    insta::assert_snapshot!("reload_refused", redact(&body, dir.path()));
    let (_, metrics) = http(port, "GET", "/metrics");
    assert!(
        metrics.contains(&format!(
            "wasmev_handler_version{{handler=\"h\",digest=\"{digest}\"}} 1"
        )),
        "{metrics}"
    );
    assert!(metrics.contains("wasmev_reloads_total{result=\"refused\"} 1"));
    assert!(metrics.contains("wasmev_reloads_total{result=\"ok\"} 2"));
    assert_eq!(host.stop(), Some(0));
}

#[test]
fn file_watcher_reloads_a_running_host() {
    let dir = tempfile::tempdir().unwrap();
    let cache = tempfile::tempdir().unwrap();
    let port = free_port();
    std::fs::write(dir.path().join("h.wasm"), variant("1")).unwrap();
    std::fs::write(dir.path().join("runtime.toml"), manifest(port, "1", "")).unwrap();
    let host = Proc::spawn(&["run"], dir.path(), cache.path());
    wait_healthy(port, Duration::from_secs(30));
    let reloads = || {
        let (_, metrics) = http(port, "GET", "/metrics");
        ["ok", "refused"]
            .iter()
            .map(|r| {
                let prefix = format!("wasmev_reloads_total{{result=\"{r}\"}} ");
                metrics
                    .lines()
                    .find_map(|l| l.strip_prefix(&prefix))
                    .unwrap()
                    .trim()
                    .parse::<u64>()
                    .unwrap()
            })
            .sum::<u64>()
    };
    // Reading files (the host reads every module when it loads) is not a change: no
    // reload may start on its own.
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(reloads(), 0, "a reload started without a change");

    std::fs::write(dir.path().join("h.wasm"), variant("2")).unwrap();
    let line = host.wait_line(
        &["handler swapped", "cause=file change"],
        Duration::from_secs(20),
    );
    assert!(line.contains(&sha256(&variant("2"))[..12]), "{line}");
    // The reload reads the module again; that must not set off another.
    std::thread::sleep(Duration::from_millis(500));
    let settled = reloads();
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(reloads(), settled, "reloads keep triggering each other");
    assert!(settled <= 2, "{settled} reloads for one write");
    assert_eq!(host.stop(), Some(0));
}

/// `wasmev dev`: builds before starting, rebuilds when a watched source changes, swaps
/// the result in, and prints the build output and what went live. The "build" here is a
/// copy, so the test exercises the loop rather than a compiler.
#[test]
fn dev_rebuilds_on_source_change_and_swaps() {
    let dir = tempfile::tempdir().unwrap();
    let cache = tempfile::tempdir().unwrap();
    let port = free_port();
    std::fs::create_dir(dir.path().join("src")).unwrap();
    std::fs::write(dir.path().join("src/next.wasm"), variant("1")).unwrap();
    std::fs::write(
        dir.path().join("runtime.toml"),
        manifest(
            port,
            "1",
            "build = \"echo compiling && cp src/next.wasm h.wasm\"\nwatch = [\"src/*.wasm\"]",
        ),
    )
    .unwrap();
    let host = Proc::spawn(&["dev"], dir.path(), cache.path());
    host.wait_line(&["[h] | compiling"], Duration::from_secs(20));
    host.wait_line(&["[h] build ok"], Duration::from_secs(20));
    wait_healthy(port, Duration::from_secs(30));
    host.wait_line(&["[h] watching"], Duration::from_secs(20));

    std::fs::write(dir.path().join("src/next.wasm"), variant("2")).unwrap();
    let to = &sha256(&variant("2"))[..12];
    let line = host.wait_line(&["[h] live:", to], Duration::from_secs(30));
    assert!(line.starts_with("[h] live:"), "{line}");

    // A failing build (the file it copies is gone) leaves the running version alone.
    std::fs::remove_file(dir.path().join("src/next.wasm")).unwrap();
    host.wait_line(&["[h] build failed"], Duration::from_secs(30));
    let (_, metrics) = http(port, "GET", "/metrics");
    assert!(metrics.contains(&format!("digest=\"{}", to)), "{metrics}");
    assert_eq!(host.stop(), Some(0));
}

/// The second start loads the compiled artifact from the cache instead of compiling.
#[test]
fn second_start_hits_the_artifact_cache() {
    let dir = tempfile::tempdir().unwrap();
    let cache = tempfile::tempdir().unwrap();
    let port = free_port();
    std::fs::write(dir.path().join("h.wasm"), variant("cache")).unwrap();
    std::fs::write(dir.path().join("runtime.toml"), manifest(port, "1", "")).unwrap();
    for cached in ["cached=false", "cached=true"] {
        let host = Proc::spawn(&["run"], dir.path(), cache.path());
        wait_healthy(port, Duration::from_secs(30));
        host.wait_line(&["compiled handler", cached], Duration::from_secs(5));
        assert_eq!(host.stop(), Some(0));
    }
    let artifacts: Vec<_> = std::fs::read_dir(cache.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(artifacts.len(), 1, "{artifacts:?}");
    assert!(artifacts[0].starts_with(&sha256(&variant("cache"))));

    // A damaged artifact is compiled again, not trusted and not fatal.
    std::fs::write(cache.path().join(&artifacts[0]), b"garbage").unwrap();
    let host = Proc::spawn(&["run"], dir.path(), cache.path());
    wait_healthy(port, Duration::from_secs(30));
    host.wait_line(
        &["ignoring an unusable cached artifact"],
        Duration::from_secs(5),
    );
    host.wait_line(
        &["compiled handler", "cached=false"],
        Duration::from_secs(5),
    );
    assert_eq!(host.stop(), Some(0));
}

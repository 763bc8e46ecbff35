//! The host as a process: start-up to ready, cold and warm, and idle memory.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use wasmev::cache::ArtifactCache;
use wasmev::{Host, Manifest, Options};

use super::load::Running;
use super::{Row, median, table};

/// Host start-up to ready with the shipped manifest's handlers: cold (empty artifact
/// cache) and warm, in-process, embedded broker, no admin endpoint.
pub async fn startup(manifest: &Path, rounds: usize) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(manifest)
        .with_context(|| format!("cannot read {}", manifest.display()))?;
    // Without the [admin] section: the port may be taken, and it is not what we measure.
    let without_admin: String = {
        let mut out = String::new();
        let mut skipping = false;
        for line in text.lines() {
            if line.starts_with('[') {
                skipping = line.trim() == "[admin]";
            }
            if !skipping {
                out.push_str(line);
                out.push('\n');
            }
        }
        out
    };
    let dir = manifest.parent().unwrap_or(Path::new("."));
    let bench_manifest = dir.join(".bench-startup.toml");
    std::fs::write(&bench_manifest, without_admin)?;
    let result = async {
        let m = Manifest::load(&bench_manifest)?;
        let mut rows = Vec::new();
        let mut cold = Vec::new();
        let mut warm = Vec::new();
        for _ in 0..rounds {
            let cache = tempfile::tempdir()?;
            for samples in [&mut cold, &mut warm] {
                let options = Options {
                    watch: false,
                    cache: Some(ArtifactCache::open(cache.path())?),
                    ..Options::default()
                };
                let since = Instant::now();
                let host = Host::start(&m, options).await?;
                samples.push(since.elapsed().as_secs_f64() * 1e3);
                Running::serve(host).shutdown().await?;
            }
        }
        // Milliseconds.
        let (c, w) = (median(cold), median(warm));
        let sizes: u64 = m
            .handlers
            .iter()
            .filter_map(|h| std::fs::metadata(&h.module).ok())
            .map(|md| md.len())
            .sum();
        rows.push(Row::new(
            &format!(
                "start to ready, {} example handlers ({:.1} MB of components), artifact cache warm",
                m.handlers.len(),
                sizes as f64 / 1e6
            ),
            format!("{w:.0} ms"),
            format!("{c:.0} ms (cold: empty cache, compiles)"),
            format!("{:.0}× faster", c / w),
            "cache ≥ 10× faster",
        ));
        Ok::<_, anyhow::Error>(rows)
    }
    .await;
    let _ = std::fs::remove_file(&bench_manifest);
    let rows = result?;
    Ok(table(
        &format!(
            "## Start-up\n\n`Host::start` on {} (embedded broker) until every subscription \
             is confirmed; median of {rounds} rounds, each with a fresh cache dir (cold) and \
             then the same dir again (warm).\n",
            manifest.display()
        ),
        &rows,
    ))
}

/// Resident memory of an idle `wasmev run` with 1, 10 and 100 copies of a small handler.
pub async fn memory(binary: &Path, module: &Path) -> anyhow::Result<String> {
    let module = std::fs::canonicalize(module)
        .with_context(|| format!("{} is missing; ./scripts/bench builds it", module.display()))?;
    let dir = tempfile::tempdir()?;
    let cache = dir.path().join("cache");
    let mut rss = Vec::new();
    for n in [1usize, 10, 100] {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let mut toml = format!("version = 1\n[admin]\nlisten = \"127.0.0.1:{port}\"\n");
        for i in 0..n {
            toml.push_str(&format!(
                "[[handler]]\nname = \"h{i}\"\nmodule = {:?}\nsubscribe = [\"bench.{i}\"]\n\
                 publish = [\"bench.out\"]\nmax_in_flight = 4\n",
                module.display().to_string()
            ));
        }
        let path = dir.path().join(format!("idle-{n}.toml"));
        std::fs::write(&path, toml)?;
        // Fill the artifact cache first, so no run's RSS includes the compiler's.
        let checked = Command::new(binary)
            .arg("check")
            .arg(&path)
            .env("WASMEV_CACHE_DIR", &cache)
            .output()
            .with_context(|| format!("cannot run {}", binary.display()))?;
        if !checked.status.success() {
            bail!(
                "wasmev check failed: {}",
                String::from_utf8_lossy(&checked.stderr)
            );
        }
        let mut child = Command::new(binary)
            .args(["run", "--no-watch"])
            .arg(&path)
            .env("WASMEV_CACHE_DIR", &cache)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("cannot start {}", binary.display()))?;
        let ready = wait_ready(port).await;
        // Idle: let start-up allocations settle.
        tokio::time::sleep(Duration::from_secs(1)).await;
        let kib = vm_rss(child.id());
        let _ = child.kill();
        let _ = child.wait();
        ready?;
        rss.push((n, kib?));
    }
    let mib = |kib: u64| kib as f64 / 1024.0;
    let (_, one) = rss[0];
    let (_, hundred) = rss[2];
    let per = (hundred.saturating_sub(one)) as f64 / 99.0 / 1024.0;
    let mut rows: Vec<Row> = rss
        .iter()
        .map(|(n, kib)| {
            Row::new(
                &format!("idle RSS, {n} handler(s)"),
                format!("{:.1} MiB", mib(*kib)),
                "—".into(),
                "—".into(),
                "",
            )
        })
        .collect();
    rows.push(Row::new(
        "per additional handler ((RSS₁₀₀ − RSS₁) / 99)",
        format!("{per:.2} MiB"),
        "—".into(),
        "—".into(),
        "≤ 1 MiB",
    ));
    Ok(table(
        &format!(
            "## Memory\n\nVmRSS of `wasmev run` (release, embedded broker, artifact cache \
             warm) one second after ready, with N copies of `{}` ({:.0} KB).\n",
            module
                .file_name()
                .map_or_else(String::new, |n| n.to_string_lossy().into_owned()),
            std::fs::metadata(&module)?.len() as f64 / 1e3
        ),
        &rows,
    ))
}

pub(super) async fn wait_ready(port: u16) -> anyhow::Result<()> {
    let url = format!("http://127.0.0.1:{port}/healthz");
    let client = reqwest::Client::new();
    let since = Instant::now();
    loop {
        if let Ok(r) = client.get(&url).send().await
            && r.status().is_success()
        {
            return Ok(());
        }
        if since.elapsed() > Duration::from_secs(120) {
            bail!("wasmev run never became ready on port {port}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub(super) fn vm_rss(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmRSS in /proc/<pid>/status")
}

/// The release `wasmev` binary next to this one.
pub fn wasmev_binary() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(|d| d.join("wasmev")))
        .unwrap_or_else(|| PathBuf::from("target/release/wasmev"))
}

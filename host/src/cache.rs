//! The compiled-artifact cache: machine code for each module, on disk, keyed by the
//! module's digest and the engine's compatibility hash.
//!
//! Why: compiling a 12–18 MB JavaScript or Python component takes seconds; loading its
//! precompiled artifact takes milliseconds. The cache makes the second start, and a hot
//! swap back to a version seen before, fast.
//!
//! Trust: deserializing an artifact runs its machine code unchecked, so the cache
//! directory must be writable only by the user running the host. It is created with mode
//! 0700, entries are written to a temporary file and renamed into place (a reader never
//! sees half an artifact), and anything wasmtime refuses to load is recompiled and
//! replaced.

use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use sha2::{Digest as _, Sha256};
use wasmtime::Engine;
use wasmtime::component::Component;

use crate::limits;

/// A module's SHA-256, hex encoded: the identity of a handler version in logs, metrics and
/// reload reports.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Digest(String);

impl Digest {
    pub fn of(bytes: &[u8]) -> Self {
        Self(hex(&Sha256::digest(bytes)))
    }

    /// The first 12 hex digits, enough to tell versions apart in a log line.
    pub fn short(&self) -> &str {
        short(&self.0)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for Digest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.short())
    }
}

/// The first 12 hex digits of a digest written out in full (as reports carry them).
pub fn short(digest: &str) -> &str {
    digest.get(..12).unwrap_or(digest)
}

/// Where a component came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// Loaded from a cached artifact.
    Cache,
    /// Compiled now (and stored, when there is a cache).
    Compiled,
}

/// The on-disk cache.
#[derive(Debug, Clone)]
pub struct ArtifactCache {
    dir: PathBuf,
    max_bytes: u64,
}

impl ArtifactCache {
    /// A cache in `dir`, created (mode 0700) if missing.
    pub fn open(dir: impl Into<PathBuf>) -> anyhow::Result<Self> {
        let dir = dir.into();
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create the artifact cache {}", dir.display()))?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
                .with_context(|| format!("cannot restrict the artifact cache {}", dir.display()))?;
        }
        Ok(Self {
            dir,
            max_bytes: limits::ARTIFACT_CACHE_BYTES,
        })
    }

    /// The default location: `$XDG_CACHE_HOME/wasmev`, else `$HOME/.cache/wasmev`.
    pub fn default_dir() -> Option<PathBuf> {
        let base = std::env::var_os("XDG_CACHE_HOME")
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cache")))?;
        Some(base.join("wasmev"))
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn entry(&self, engine: &Engine, digest: &Digest) -> PathBuf {
        let mut hasher = ShaHasher(Sha256::new());
        engine.precompile_compatibility_hash().hash(&mut hasher);
        let engine_hash = hex(&hasher.0.finalize());
        self.dir
            .join(format!("{}-{}.cwasm", digest.as_str(), &engine_hash[..16]))
    }

    /// Whether an artifact for this module and engine is stored (it may still be refused
    /// when loaded).
    pub fn contains(&self, engine: &Engine, digest: &Digest) -> bool {
        self.entry(engine, digest).is_file()
    }

    /// The component for `bytes`: from the cache when an artifact for this module and
    /// engine exists and loads, else compiled and stored.
    pub fn load(
        &self,
        engine: &Engine,
        bytes: &[u8],
        digest: &Digest,
    ) -> wasmtime::Result<(Component, Source)> {
        let path = self.entry(engine, digest);
        if path.is_file() {
            // SAFETY: the file was written by `store` below from `Engine::precompile_component`
            // output, in a directory only this user can write (mode 0700, set in `open`), and
            // renamed into place whole. wasmtime checks that the artifact was produced by a
            // compatible engine and refuses it otherwise.
            #[allow(unsafe_code)]
            match unsafe { Component::deserialize_file(engine, &path) } {
                Ok(component) => {
                    touch(&path);
                    return Ok((component, Source::Cache));
                }
                Err(e) => tracing::warn!(
                    artifact = %path.display(),
                    "ignoring an unusable cached artifact ({e}); compiling again"
                ),
            }
        }
        let artifact = engine.precompile_component(bytes)?;
        if let Err(e) = self.store(&path, &artifact) {
            tracing::warn!("cannot write the artifact cache: {e:#}");
        }
        // SAFETY: `artifact` was produced by `precompile_component` on this very engine
        // just above and never left memory.
        #[allow(unsafe_code)]
        let component = unsafe { Component::deserialize(engine, &artifact)? };
        Ok((component, Source::Compiled))
    }

    fn store(&self, path: &Path, artifact: &[u8]) -> anyhow::Result<()> {
        let mut tmp = tempfile::NamedTempFile::new_in(&self.dir)?;
        std::io::Write::write_all(&mut tmp, artifact)?;
        tmp.persist(path)?;
        self.evict();
        Ok(())
    }

    /// Delete the least recently used artifacts until the cache fits its budget.
    fn evict(&self) {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return;
        };
        let mut files: Vec<(std::time::SystemTime, u64, PathBuf)> = entries
            .filter_map(Result::ok)
            .filter(|e| e.path().extension().is_some_and(|x| x == "cwasm"))
            .filter_map(|e| {
                let meta = e.metadata().ok()?;
                Some((meta.modified().ok()?, meta.len(), e.path()))
            })
            .collect();
        let mut total: u64 = files.iter().map(|f| f.1).sum();
        files.sort();
        for (_, len, path) in files {
            if total <= self.max_bytes {
                break;
            }
            if std::fs::remove_file(&path).is_ok() {
                total = total.saturating_sub(len);
                tracing::debug!(artifact = %path.display(), "evicted from the artifact cache");
            }
        }
    }
}

/// Mark an artifact as recently used, for eviction order.
fn touch(path: &Path) {
    if let Ok(file) = std::fs::File::options().append(true).open(path) {
        let _ = file.set_modified(std::time::SystemTime::now());
    }
}

/// Compile without a cache.
pub fn compile(engine: &Engine, bytes: &[u8]) -> wasmtime::Result<(Component, Source)> {
    Component::new(engine, bytes).map(|c| (c, Source::Compiled))
}

/// Feeds `Hash` output into SHA-256, so the engine's compatibility hash is stable across
/// processes (std's `DefaultHasher` makes no such promise).
struct ShaHasher(Sha256);

impl Hasher for ShaHasher {
    fn finish(&self) -> u64 {
        0
    }
    fn write(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digest_is_sha256_hex() {
        let d = Digest::of(b"abc");
        assert_eq!(
            d.as_str(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(d.short(), "ba7816bf8f01");
    }

    #[test]
    fn evicts_oldest_past_the_budget() {
        let dir = tempfile::tempdir().unwrap();
        let mut cache = ArtifactCache::open(dir.path()).unwrap();
        cache.max_bytes = 250;
        let old = std::time::SystemTime::now() - std::time::Duration::from_secs(60);
        for (i, name) in ["a", "b", "c"].iter().enumerate() {
            let path = dir.path().join(format!("{name}.cwasm"));
            std::fs::write(&path, [0u8; 100]).unwrap();
            let file = std::fs::File::options().append(true).open(&path).unwrap();
            file.set_modified(old + std::time::Duration::from_secs(i as u64))
                .unwrap();
        }
        cache.evict();
        let mut left: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        assert_eq!(left, ["b.cwasm", "c.cwasm"]);
    }
}

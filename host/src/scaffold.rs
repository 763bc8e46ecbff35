//! `wasmev new`: a working handler folder in any supported language.
//!
//! Every scaffold is the same small handler (greet the name in the payload, publish the
//! greeting, reject an empty name, retry while paused) with the handler world (`wit/`), a
//! build script, a one-handler manifest (`wasmev.toml`) and contract cases (`cases.toml`)
//! that pass untouched. The templates live in `host/templates/`.

use std::fmt;
use std::path::{Path, PathBuf};

/// The handler world, copied into every scaffold so it builds outside this repository.
const WIT: &str = include_str!("../../wit/wasmev.wit");
const MANIFEST: &str = include_str!("../templates/wasmev.toml");
const CASES: &str = include_str!("../templates/cases.toml");

/// A language `wasmev new` can scaffold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Lang {
    /// Rust with wit-bindgen, built for wasm32-wasip2.
    Rust,
    /// The same without Rust's standard library: the component imports no WASI interface,
    /// so a fresh instance per event costs less (every dependency must be `no_std`).
    RustNoStd,
    /// JavaScript with componentize-js (npm).
    Js,
    /// Python with componentize-py (pip).
    Python,
    /// C with wit-bindgen's C generator, clang and wasm-component-ld.
    C,
}

impl fmt::Display for Lang {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Lang::Rust => "rust",
            Lang::RustNoStd => "rust-no-std",
            Lang::Js => "js",
            Lang::Python => "python",
            Lang::C => "c",
        })
    }
}

impl Lang {
    /// The language's own files: (path in the scaffold, template).
    fn files(self) -> &'static [(&'static str, &'static str)] {
        match self {
            Lang::Rust => &[
                ("Cargo.toml", include_str!("../templates/rust/Cargo.toml")),
                ("build.sh", include_str!("../templates/rust/build.sh")),
                ("src/lib.rs", include_str!("../templates/rust/src/lib.rs")),
            ],
            // The same handler as `Rust`'s, after its own prelude (`prelude`).
            Lang::RustNoStd => &[
                (
                    "Cargo.toml",
                    include_str!("../templates/rust-no-std/Cargo.toml"),
                ),
                (
                    "build.sh",
                    include_str!("../templates/rust-no-std/build.sh"),
                ),
                ("src/lib.rs", include_str!("../templates/rust/src/lib.rs")),
                (
                    "src/heap.rs",
                    include_str!("../templates/rust-no-std/src/heap.rs"),
                ),
                (
                    "src/panic.rs",
                    include_str!("../templates/rust-no-std/src/panic.rs"),
                ),
            ],
            Lang::Js => &[
                ("package.json", include_str!("../templates/js/package.json")),
                ("build.sh", include_str!("../templates/js/build.sh")),
                ("handler.js", include_str!("../templates/js/handler.js")),
            ],
            Lang::Python => &[
                ("build.sh", include_str!("../templates/python/build.sh")),
                ("app.py", include_str!("../templates/python/app.py")),
            ],
            Lang::C => &[
                ("build.sh", include_str!("../templates/c/build.sh")),
                ("handler.c", include_str!("../templates/c/handler.c")),
            ],
        }
    }

    /// What a template's `{{prelude}}` line becomes: the Rust handler's lines before its
    /// bindings, which make it `no_std` for `RustNoStd` (and are nothing otherwise).
    fn prelude(self) -> &'static str {
        match self {
            Lang::RustNoStd => {
                "//!\n\
                 //! Built without Rust's standard library: `heap.rs` and `panic.rs` supply what \
                 std would.\n\
                 \n\
                 #![no_std]\n\
                 \n\
                 extern crate alloc;\n\
                 \n\
                 mod heap;\n\
                 mod panic;\n\
                 \n\
                 use alloc::format;\n\
                 use alloc::string::{String, ToString};\n\
                 use alloc::vec::Vec;\n"
            }
            Lang::Rust | Lang::Js | Lang::Python | Lang::C => "",
        }
    }

    /// The component the build writes, relative to the scaffold.
    fn module(self, ident: &str) -> String {
        match self {
            Lang::Rust | Lang::RustNoStd => format!("target/wasm32-wasip2/release/{ident}.wasm"),
            Lang::Js | Lang::Python | Lang::C => format!("{ident}.wasm"),
        }
    }

    /// What `wasmev dev` watches, relative to the scaffold.
    fn watch(self) -> &'static str {
        match self {
            Lang::Rust | Lang::RustNoStd => "src/**/*.rs",
            Lang::Js => "*.js",
            Lang::Python => "*.py",
            Lang::C => "*.c",
        }
    }

    /// What the build needs, for the README and the next-steps text.
    fn needs(self) -> &'static str {
        match self {
            Lang::Rust | Lang::RustNoStd => "rustup target add wasm32-wasip2",
            Lang::Js => "node and npm (componentize-js is installed into node_modules)",
            Lang::Python => "pip install componentize-py==0.25.1",
            Lang::C => {
                "cargo install --locked wit-bindgen-cli@0.63.0, and clang for wasm32-wasi \
                 (apt-get install -y clang-22 lld-22 wasi-libc libclang-rt-22-dev-wasm32)"
            }
        }
    }
}

/// Why a scaffold could not be written.
#[derive(Debug, thiserror::Error)]
pub enum ScaffoldError {
    #[error(
        "invalid handler name {0:?}: use lowercase letters, digits and '-', starting with a \
         letter (it becomes a subject token and a file name), at most 64 characters"
    )]
    Name(String),
    #[error("{} already exists and is not empty; pick another name or --dir", .0.display())]
    Exists(PathBuf),
    // The io error is in the text, not a `source` (see `ManifestError::Read`).
    #[error("cannot write {}: {error}", path.display())]
    Write {
        path: PathBuf,
        error: std::io::Error,
    },
}

/// A written scaffold.
#[derive(Debug)]
pub struct Scaffold {
    pub dir: PathBuf,
    pub lang: Lang,
    /// Files written, relative to `dir`.
    pub files: Vec<String>,
    /// The `[[handler]]` block for a manifest in the current directory.
    pub block: String,
}

impl fmt::Display for Scaffold {
    /// What `wasmev new` prints: what was made, how to build and test it, and the block.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let dir = slashed(&self.dir);
        writeln!(
            f,
            "created {dir}/ ({}): {}",
            self.lang,
            self.files.join(", ")
        )?;
        writeln!(f)?;
        writeln!(f, "next:")?;
        writeln!(
            f,
            "  {dir}/build.sh            # needs: {}",
            self.lang.needs()
        )?;
        writeln!(
            f,
            "  wasmev test {dir}         # its contract cases (cases.toml)"
        )?;
        writeln!(f, "  wasmev run {dir}/wasmev.toml")?;
        writeln!(f)?;
        writeln!(
            f,
            "to run it with your other handlers, add to runtime.toml:"
        )?;
        writeln!(f)?;
        write!(f, "{}", self.block)
    }
}

/// Write a `lang` handler called `name` into `dir` (which must not exist, or be empty).
pub fn create(name: &str, lang: Lang, dir: &Path) -> Result<Scaffold, ScaffoldError> {
    if !valid_name(name) {
        return Err(ScaffoldError::Name(name.to_string()));
    }
    if std::fs::read_dir(dir).is_ok_and(|mut entries| entries.next().is_some()) {
        return Err(ScaffoldError::Exists(dir.to_path_buf()));
    }
    let ident = name.replace('-', "_");
    let module = lang.module(&ident);
    let fill = |template: &str| {
        template
            .replace("{{name}}", name)
            .replace("{{ident}}", &ident)
            .replace("{{module}}", &module)
            .replace("{{watch}}", &format!("{:?}", lang.watch()))
            .replace("{{prelude}}", lang.prelude())
    };
    let readme = format!(
        "# {name} ({lang})\n\n\
         A wasmev handler: on `{name}.requested` with a name as the payload it publishes\n\
         \"<greeting>, <name>!\" on `{name}.done`. Made by `wasmev new {name} --lang {lang}`.\n\n\
         - `./build.sh` builds `{module}` (needs: {needs}).\n\
         - `wasmev test` here runs `cases.toml` against the real component.\n\
         - `wasmev run wasmev.toml` runs it alone on the embedded broker;\n  \
           `wasmev dev wasmev.toml` rebuilds and hot-swaps it on every save.\n\
         - `wit/wasmev.wit` is the handler world it implements.\n",
        needs = lang.needs()
    );
    let ignore = "*.wasm\ntarget/\nnode_modules/\ngen/\n__pycache__/\n";
    let mut files: Vec<(String, String)> = lang
        .files()
        .iter()
        .map(|(path, template)| (path.to_string(), fill(template)))
        .collect();
    files.extend([
        ("wit/wasmev.wit".to_string(), WIT.to_string()),
        ("wasmev.toml".to_string(), fill(MANIFEST)),
        ("cases.toml".to_string(), fill(CASES)),
        ("README.md".to_string(), readme),
        (".gitignore".to_string(), ignore.to_string()),
    ]);
    for (path, contents) in &files {
        write(&dir.join(path), contents)?;
    }
    let dir_text = slashed(dir);
    let block = format!(
        "[[handler]]\n\
         name = \"{name}\"\n\
         module = \"{dir_text}/{module}\"\n\
         subscribe = [\"{name}.requested\"]\n\
         publish = [\"{name}.done\"]\n\
         config = {{ greeting = \"Hello\" }}\n\
         build = \"{dir_text}/build.sh\"\n\
         watch = [\"{dir_text}/{}\"]\n",
        lang.watch()
    );
    Ok(Scaffold {
        dir: dir.to_path_buf(),
        lang,
        files: files.into_iter().map(|(path, _)| path).collect(),
        block,
    })
}

/// Where `wasmev new NAME` writes by default: `handlers/NAME` when the current directory
/// has a `handlers/` folder (a wasmev project), else `NAME`.
pub fn default_dir(name: &str) -> PathBuf {
    if Path::new("handlers").is_dir() {
        Path::new("handlers").join(name)
    } else {
        PathBuf::from(name)
    }
}

fn valid_name(name: &str) -> bool {
    name.len() <= 64
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && !name.ends_with('-')
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
}

fn slashed(path: &Path) -> String {
    path.to_string_lossy().replace('\\', "/")
}

fn write(path: &Path, contents: &str) -> Result<(), ScaffoldError> {
    let failed = |error| ScaffoldError::Write {
        path: path.to_path_buf(),
        error,
    };
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(failed)?;
    }
    std::fs::write(path, contents).map_err(failed)?;
    #[cfg(unix)]
    if path.extension().is_some_and(|e| e == "sh") {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).map_err(failed)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_become_subject_tokens_and_file_names() {
        for ok in ["greeter", "a", "order-sync2"] {
            assert!(valid_name(ok), "{ok}");
        }
        for bad in [
            "",
            "Greeter",
            "2fa",
            "a.b",
            "a b",
            "x-",
            "a_b",
            &"a".repeat(65),
        ] {
            assert!(!valid_name(bad), "{bad}");
        }
    }

    #[test]
    fn a_write_error_says_its_cause_once_even_chained() {
        // A directory under a file cannot be made.
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("file");
        std::fs::write(&file, "").unwrap();
        let err = create("greeter", Lang::Rust, &file.join("h")).unwrap_err();
        let chained =
            format!("{:#}", anyhow::Error::new(err)).replace(&file.display().to_string(), "[file]");
        insta::assert_snapshot!(chained, @"cannot write [file]/h/Cargo.toml: Not a directory (os error 20)");
    }

    #[test]
    fn every_template_placeholder_is_filled() {
        for lang in [Lang::Rust, Lang::RustNoStd, Lang::Js, Lang::Python, Lang::C] {
            let dir = tempfile::tempdir().unwrap();
            let made = create("order-sync", lang, &dir.path().join("h")).unwrap();
            for file in &made.files {
                let text = std::fs::read_to_string(made.dir.join(file)).unwrap();
                assert!(
                    !text.contains("{{"),
                    "{lang}: {file} has an unfilled placeholder"
                );
            }
            assert!(made.block.contains("order-sync.requested"));
            // The manifest it writes is valid as written (the module does not exist yet).
            crate::Manifest::load_before_build(&made.dir.join("wasmev.toml")).unwrap();
            assert!(matches!(
                create("order-sync", lang, &made.dir),
                Err(ScaffoldError::Exists(_))
            ));
        }
    }
}

//! `wasmev test` (event-contract cases) and `wasmev new` (scaffolds), through the real
//! binary: every example handler's cases pass, a wrong expectation fails with a report
//! that says what differed, and a scaffold in every language builds with its own
//! toolchain and passes its own cases untouched.

mod common;

use std::path::Path;
use std::process::Output;

use common::*;

fn run(args: &[&str], dir: &Path) -> Output {
    wasmev_command()
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap()
}

/// Run a scaffold's build.sh; `what` names it if the build fails.
fn build_scaffold(scaffold: &Path, what: &str) {
    let built = std::process::Command::new(scaffold.join("build.sh"))
        .output()
        .unwrap();
    assert!(
        built.status.success(),
        "{what}: build.sh failed:\n{}",
        String::from_utf8_lossy(&built.stderr)
    );
}

/// `wasmev test CASES` in `dir` with an empty artifact cache (a first test compiles the
/// component).
fn test_uncached(cases: &str, dir: &Path) -> Output {
    let cache = tempfile::tempdir().unwrap();
    wasmev_command()
        .args(["test", cases])
        .current_dir(dir)
        .env("WASMEV_CACHE_DIR", cache.path())
        .output()
        .unwrap()
}

fn text(output: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// Timings vary from run to run; the snapshot keeps everything else.
fn redact(text: &str) -> String {
    let mut out = String::new();
    for line in text.lines() {
        let line = match line.rfind(" (") {
            Some(i) if line.ends_with(" ms)") => format!("{} (N ms)", &line[..i]),
            _ => line.to_string(),
        };
        let line = match line.find(" (compiled in ") {
            Some(i) => format!("{} (loaded)", &line[..i]),
            None => line.replace(" (loaded from the artifact cache)", " (loaded)"),
        };
        out.push_str(&line);
        out.push('\n');
    }
    out
}

/// Every example handler ships cases, and they all pass against the built components.
#[test]
fn every_example_handler_passes_its_cases() {
    for (dir, file) in [
        ("signup-scorer", "signup_scorer.wasm"),
        ("welcome-renderer", "welcome_renderer.wasm"),
        ("audit-checksum", "audit_checksum.wasm"),
    ] {
        foreign_component(dir, file);
    }
    component("email-sender");
    component("audit-log");

    let root = workspace();
    let mut cases = 0;
    for handler in [
        "email-sender",
        "audit-log",
        "signup-scorer",
        "welcome-renderer",
        "audit-checksum",
    ] {
        let file = root.join("handlers").join(handler).join("cases.toml");
        let text = std::fs::read_to_string(&file).unwrap();
        let n = text.matches("[[case]]").count();
        assert!(n >= 2, "{handler} ships at least two cases");
        cases += n;
    }
    // No arguments: every handlers/*/cases.toml under the current directory.
    let output = run(&["test"], &root);
    let (stdout, stderr) = text(&output);
    assert!(output.status.success(), "{stdout}\n{stderr}");
    assert!(
        stdout.ends_with(&format!("test result: ok. {cases} passed, 0 failed\n")),
        "{stdout}"
    );
    assert!(!stdout.contains("FAIL"), "{stdout}");
}

/// A case whose expectations do not hold fails (exit 1) and the report names each
/// difference and shows what the guest really published and logged.
#[test]
fn a_wrong_expectation_fails_with_what_differed() {
    component("email-sender");
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("cases.toml"),
        format!(
            r#"manifest = {:?}
handler = "email-sender"

[[case]]
name = "right"
subject = "user.created"
json = {{ id = "u1", name = "Ada", email = "ada@example.com" }}
expect.publish = [{{ subject = "email.sent", json = {{ to = "ada@example.com" }} }}]

[[case]]
name = "wrong on purpose"
subject = "user.created"
json = {{ id = "u1", name = "Ada", email = "ada@example.com" }}
expect.result = "reject"
expect.logs = ["no such line"]
expect.publish = [{{ subject = "email.sent", json = {{ to = "bob@example.com", user_id = "u1" }}, headers = {{ source = "x" }} }}]
"#,
            workspace().join("runtime.toml").display().to_string()
        ),
    )
    .unwrap();
    let output = run(&["test", "cases.toml"], dir.path());
    let (stdout, stderr) = text(&output);
    assert_eq!(output.status.code(), Some(1), "{stdout}\n{stderr}");
    insta::assert_snapshot!("contract_failure", redact(&stdout));

    // --filter runs only the matching cases.
    let output = run(&["test", "cases.toml", "--filter", "right"], dir.path());
    let (stdout, _) = text(&output);
    assert!(output.status.success(), "{stdout}");
    assert!(
        stdout.ends_with("test result: ok. 1 passed, 0 failed\n"),
        "{stdout}"
    );
}

/// `wasmev test` over many case files of a handler with warm instances: each file's
/// versions go, with their instances and engine, when its cases are done. They once did
/// not: a warm instance's store held its version, which held the store (see
/// `HandlerCore`), and each engine's instance pool reserves ~8 TiB of address space, so
/// from the 16th file on every engine failed to map ("mmap failed to reserve").
#[test]
fn many_case_files_of_a_reuse_handler_all_run() {
    let module = component("email-sender");
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("runtime.toml"),
        format!(
            r#"version = 1
[[handler]]
name = "email-sender"
module = {:?}
subscribe = ["user.created"]
publish = ["email.sent"]
instances = "reuse"
config = {{ from = "noreply@example.com", subject = "Welcome, {{name}}!" }}
"#,
            module.display().to_string()
        ),
    )
    .unwrap();
    // Two cases a file: one on the manifest's version, one on a version of its own.
    let case = r#"manifest = "runtime.toml"
handler = "email-sender"

[[case]]
name = "as configured"
subject = "user.created"
json = { id = "u1", name = "Ada", email = "ada@example.com" }
expect.publish = [{ subject = "email.sent", json = { subject = "Welcome, Ada!" } }]

[[case]]
name = "with its own config"
subject = "user.created"
json = { id = "u1", name = "Ada", email = "ada@example.com" }
config = { subject = "Hi {name}" }
expect.publish = [{ subject = "email.sent", json = { subject = "Hi Ada" } }]
"#;
    let files: Vec<String> = (1..=24).map(|i| format!("cases-{i:02}.toml")).collect();
    for file in &files {
        std::fs::write(dir.path().join(file), case).unwrap();
    }
    let cache = dir.path().join("cache");
    let mut args = vec!["test", "--cache-dir", cache.to_str().unwrap()];
    args.extend(files.iter().map(String::as_str));
    let output = run(&args, dir.path());
    let (stdout, stderr) = text(&output);
    assert!(output.status.success(), "{stdout}\n{stderr}");
    assert!(
        stdout.ends_with("test result: ok. 48 passed, 0 failed\n"),
        "{stdout}"
    );
}

/// A case file that cannot run says why (exit 2): bad TOML, an unknown key, a handler the
/// manifest does not have.
#[test]
fn a_broken_case_file_says_why() {
    let dir = tempfile::tempdir().unwrap();
    let runtime = workspace().join("runtime.toml").display().to_string();
    let files = [
        ("syntax.toml", "manifest = \n".to_string()),
        (
            "unknown_key.toml",
            format!(
                "manifest = {runtime:?}\nhandler = \"email-sender\"\n[[case]]\nname = \"x\"\n\
                 subject = \"a\"\nexpect.reslt = \"ok\"\n"
            ),
        ),
        (
            "no_handler.toml",
            format!(
                "manifest = {runtime:?}\nhandler = \"nope\"\n[[case]]\nname = \"x\"\nsubject = \"a\"\n"
            ),
        ),
        (
            "which_handler.toml",
            format!("manifest = {runtime:?}\n[[case]]\nname = \"x\"\nsubject = \"a\"\n"),
        ),
        ("no_cases.toml", format!("manifest = {runtime:?}\n")),
    ];
    let mut report = String::new();
    for (name, contents) in &files {
        std::fs::write(dir.path().join(name), contents).unwrap();
        let output = run(&["test", name], dir.path());
        let (stdout, stderr) = text(&output);
        assert_eq!(output.status.code(), Some(2), "{name}: {stdout}\n{stderr}");
        report.push_str(&stderr.replace(&runtime, "<runtime.toml>"));
    }
    insta::assert_snapshot!("contract_broken_files", report);
}

/// The std-free Rust scaffold's own panic handler (std's is not there): a handler that
/// panics has the message in the host's log, and the event traps. The scaffold is made to
/// panic on one name, rebuilt, and run on a case file of its own.
fn panics_are_logged_and_trap(scaffold: &Path, name: &str) {
    let lib = scaffold.join("src/lib.rs");
    let code = std::fs::read_to_string(&lib).unwrap();
    let panicking = code.replace(
        "        let greeting =",
        "        if name == \"panic\" {\n            panic!(\"asked to panic\");\n        }\n        let greeting =",
    );
    assert_ne!(
        panicking, code,
        "the scaffold's handler changed; update this test"
    );
    std::fs::write(&lib, panicking).unwrap();
    build_scaffold(scaffold, "rust-no-std, made to panic");
    let cases = scaffold.join("panic.toml");
    std::fs::write(
        &cases,
        format!(
            "manifest = \"wasmev.toml\"\n\n[[case]]\nname = \"a panic is logged and traps\"\n\
             subject = \"{name}.requested\"\npayload = \"panic\"\nexpect.result = \"trap\"\n\
             expect.logs = [\"panicked at src/lib.rs\", \"asked to panic\"]\n"
        ),
    )
    .unwrap();
    let output = test_uncached("panic.toml", scaffold);
    let (stdout, stderr) = text(&output);
    assert!(output.status.success(), "{stdout}\n{stderr}");
    assert!(
        stdout.ends_with("test result: ok. 1 passed, 0 failed\n"),
        "{stdout}"
    );
}

/// `wasmev new` in each language, then its build.sh, then `wasmev test` on the result:
/// the scaffold passes its own cases untouched.
#[test]
fn new_scaffolds_build_and_pass_their_own_cases() {
    let dir = tempfile::tempdir().unwrap();
    for lang in ["rust", "rust-no-std", "js", "python", "c"] {
        let name = format!("hello-{lang}");
        let output = run(&["new", &name, "--lang", lang], dir.path());
        let (stdout, stderr) = text(&output);
        assert!(output.status.success(), "{lang}: {stdout}\n{stderr}");
        assert!(
            stdout.contains(&format!("[[handler]]\nname = \"{name}\"\n")),
            "{stdout}"
        );
        let scaffold = dir.path().join(&name);
        build_scaffold(&scaffold, lang);
        // What the std-free scaffold is for: its component imports wasmev's interfaces and
        // no WASI one (the std build imports a dozen).
        if lang.starts_with("rust") {
            let module = format!(
                "target/wasm32-wasip2/release/{}.wasm",
                name.replace('-', "_")
            );
            let wasi = component_imports(&scaffold.join(module))
                .into_iter()
                .filter(|name| name.starts_with("wasi:"))
                .count();
            assert_eq!(wasi > 0, lang == "rust", "{lang}: {wasi} WASI imports");
        }
        let output = test_uncached(&name, dir.path());
        let (stdout, stderr) = text(&output);
        assert!(output.status.success(), "{lang}: {stdout}\n{stderr}");
        assert!(
            stdout.ends_with("test result: ok. 4 passed, 0 failed\n"),
            "{lang}: {stdout}"
        );
        // A JS or Python component (12-18 MB) compiles for seconds, and says so first; a
        // Rust or C one is over before anyone would wonder.
        let large = matches!(lang, "js" | "python");
        assert_eq!(
            stderr.contains(&format!(
                "compiling a large module; this takes a few seconds (the result is cached) \
                 handler={name}"
            )),
            large,
            "{lang}: {stderr}"
        );
        // The manifest it wrote is one `wasmev check` accepts.
        let output = run(&["check", &format!("{name}/wasmev.toml")], dir.path());
        assert!(output.status.success(), "{lang}: {}", text(&output).1);
        if lang == "rust-no-std" {
            panics_are_logged_and_trap(&scaffold, &name);
        }
    }

    // The next-steps text and the block to paste, for one language.
    let output = run(&["new", "greeter", "--lang", "python"], dir.path());
    insta::assert_snapshot!("new_python", text(&output).0);
    // Bad names and existing folders are refused.
    let mut refusals = String::new();
    for args in [
        ["new", "Greeter", "--lang", "c"],
        ["new", "greeter", "--lang", "c"],
    ] {
        let output = run(&args, dir.path());
        assert_eq!(output.status.code(), Some(1));
        refusals.push_str(&text(&output).1);
    }
    let output = run(&["new", "x", "--lang", "go"], dir.path());
    assert_eq!(output.status.code(), Some(2));
    refusals.push_str(&text(&output).1);
    insta::assert_snapshot!("new_refusals", refusals);
}

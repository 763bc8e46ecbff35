//! Golden files for manifest errors: every message names the file, line, column and key.
//!
//! Each `tests/ui/*.toml` is a broken manifest; its error text is snapshotted in
//! `tests/snapshots/`. Review changes with `cargo insta review`.

use wasmev::manifest::ManifestError;

#[test]
fn manifest_errors() {
    insta::glob!("ui/*.toml", |path| {
        // Relative to the crate, so snapshots do not depend on where the repo lives.
        let relative = path
            .strip_prefix(env!("CARGO_MANIFEST_DIR"))
            .unwrap_or(path)
            .to_path_buf();
        let relative = relative.as_path();
        let err = wasmev::Manifest::load(relative).expect_err("every ui case is invalid");
        let ManifestError::Invalid(diagnostics) = &err else {
            panic!(
                "{}: expected a located error, got: {err}",
                relative.display()
            );
        };
        for d in diagnostics {
            assert!(
                d.line >= 1 && d.column >= 1,
                "{}: no location in {d}",
                relative.display()
            );
            assert!(
                d.to_string()
                    .starts_with(&format!("{}:", relative.display())),
                "{d}"
            );
        }
        insta::assert_snapshot!(err.to_string());
    });
}

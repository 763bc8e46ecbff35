//! Manifest errors: each problem located at file, line and column, with the key path and
//! the offending line underlined.

use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};

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
    pub(super) fn new(
        file: &Path,
        src: &str,
        span: Range<usize>,
        key: &str,
        message: String,
    ) -> Self {
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

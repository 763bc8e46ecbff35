//! Manifest errors: each problem located at file, line and column, with the key path and
//! the offending line underlined.

use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};

use unicode_width::UnicodeWidthChar;

/// Why a manifest could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    // The io error is in the text, not a `source`: chained (`{:#}`) it said its cause
    // twice ("…: No such file or directory (os error 2): No such file or directory …").
    #[error("cannot read manifest {path:?}: {error}")]
    Read {
        path: PathBuf,
        error: std::io::Error,
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
    /// Width of the underline under `source_line`, in terminal columns.
    underline: usize,
}

/// How many columns a tab takes in the displayed source line: what rustc shows.
const TAB: usize = 4;

/// Terminal columns `text` takes once its tabs are expanded: a CJK character or an emoji
/// takes two, a combining mark none. So the underline sits under the problem however the
/// line before it is written.
fn columns(text: impl IntoIterator<Item = char>) -> usize {
    text.into_iter()
        .map(|c| {
            if c == '\t' {
                TAB
            } else {
                c.width().unwrap_or(0)
            }
        })
        .sum()
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
        let end = span.end.clamp(start, line_end);
        Self {
            file: file.to_path_buf(),
            line: src[..start].matches('\n').count() + 1,
            // In characters, as editors count a column for `file:line:column`.
            column: src[line_start..start].chars().count() + 1,
            key: key.to_string(),
            message,
            underline: columns(src[start..end].chars()).max(1),
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
        let line = self.source_line.replace('\t', &" ".repeat(TAB));
        writeln!(f, "{} | {line}", self.line)?;
        let indent = columns(self.source_line.chars().take(self.column.saturating_sub(1)));
        write!(
            f,
            "{:gutter$} | {}{}",
            "",
            " ".repeat(indent),
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

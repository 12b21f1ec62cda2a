//! Typed errors. Expected problems (a bad pipeline file, a missing input, a locked run
//! directory) carry the file, line:column, stage and a hint saying what to do; they are kept
//! apart from internal failures so messages never show source-code locations.

use std::fmt;
use std::path::PathBuf;

use crate::yaml::Pos;

/// One problem found in a pipeline, at a place in its file.
#[derive(Debug, Clone, PartialEq)]
pub struct Diagnostic {
    pub file: PathBuf,
    pub pos: Pos,
    pub stage: Option<String>,
    pub message: String,
    pub hint: Option<String>,
}

impl Diagnostic {
    pub fn new(file: impl Into<PathBuf>, pos: Pos, message: impl Into<String>) -> Self {
        Diagnostic {
            file: file.into(),
            pos,
            stage: None,
            message: message.into(),
            hint: None,
        }
    }

    pub fn stage(mut self, stage: impl Into<String>) -> Self {
        self.stage = Some(stage.into());
        self
    }

    pub fn hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }

    pub fn maybe_hint(mut self, hint: Option<String>) -> Self {
        if hint.is_some() {
            self.hint = hint;
        }
        self
    }

    /// A fallback hint: kept only when no better one (a "did you mean") was set before.
    pub fn hint_if_none(self, hint: impl Into<String>) -> Self {
        if self.hint.is_some() {
            self
        } else {
            self.hint(hint)
        }
    }
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}: ", self.file.display(), self.pos)?;
        if let Some(s) = &self.stage {
            write!(f, "stage '{s}': ")?;
        }
        write!(f, "{}", self.message)?;
        if let Some(h) = &self.hint {
            write!(f, "\n  hint: {h}")?;
        }
        Ok(())
    }
}

/// All errors of a pipeline, reported together.
#[derive(Debug, Clone)]
pub struct Diagnostics(pub Vec<Diagnostic>);

impl fmt::Display for Diagnostics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, d) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "error: {d}")?;
        }
        let n = self.0.len();
        write!(
            f,
            "\n{n} error{} found; nothing was run",
            if n == 1 { "" } else { "s" }
        )
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The pipeline file has problems; every one found is listed.
    #[error("{0}")]
    Invalid(Diagnostics),

    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error(
        "run directory {path} is in use by another ifloom process (lock held on {path}/.lock)\n  hint: wait for it to finish, or use --run-dir to write elsewhere"
    )]
    Locked { path: PathBuf },

    /// A stage failed while running; earlier stages stay intact.
    #[error("stage '{stage}' failed: {message}")]
    Stage { stage: String, message: String },

    /// A problem with the user's request on the command line.
    #[error("{message}")]
    Usage { message: String },

    #[error("SQL error: {0}")]
    Sql(#[from] datafusion::error::DataFusionError),

    #[error("{0}")]
    Arrow(#[from] arrow::error::ArrowError),

    #[error("{0}")]
    Parquet(#[from] parquet::errors::ParquetError),

    #[error("{0}")]
    Polars(#[from] polars::prelude::PolarsError),

    #[error("{0}")]
    Json(#[from] serde_json::Error),

    /// A bug in ifloom rather than a problem with the input.
    #[error("internal error (please report): {0}")]
    Internal(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    pub fn stage(stage: impl Into<String>, message: impl fmt::Display) -> Self {
        Error::Stage {
            stage: stage.into(),
            message: message.to_string(),
        }
    }

    pub fn usage(message: impl Into<String>) -> Self {
        Error::Usage {
            message: message.into(),
        }
    }
}

/// `Did you mean 'x'?` for a name among candidates, when one is close enough.
pub fn did_you_mean<'a>(
    name: &str,
    candidates: impl IntoIterator<Item = &'a str>,
) -> Option<String> {
    let lower = name.to_lowercase();
    let mut best: Option<(f64, &str)> = None;
    for c in candidates {
        let score = strsim::jaro_winkler(&lower, &c.to_lowercase());
        if score > 0.8 && best.is_none_or(|(b, _)| score > b) {
            best = Some((score, c));
        }
    }
    best.map(|(_, c)| format!("did you mean '{c}'?"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suggests_close_names_only() {
        assert_eq!(
            did_you_mean("promts", ["prompts", "clean"]),
            Some("did you mean 'prompts'?".into())
        );
        assert_eq!(did_you_mean("zzz", ["prompts", "clean"]), None);
    }
}

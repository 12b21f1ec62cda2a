use std::path::PathBuf;

use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::query::{self, OutFormat};
use crate::store::RunDir;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The query (or use -f).
    pub query: Option<String>,
    /// The run directory (default: the only run under runs/, if there is one).
    #[arg(long)]
    pub run: Option<PathBuf>,
    /// Read the query from a file.
    #[arg(short = 'f', long = "file")]
    pub file: Option<PathBuf>,
    #[arg(long, value_enum, default_value = "table")]
    pub format: OutFormat,
    /// Write to this file instead of stdout.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Fill a `${name}` placeholder of the query: name=value (repeatable).
    #[arg(long = "param", value_parser = super::parse_kv)]
    pub params: Vec<(String, String)>,
    /// Cut text cells longer than this in table output.
    #[arg(long, default_value_t = 60)]
    pub max_width: usize,
}

pub(crate) fn pick_run() -> Result<PathBuf> {
    let runs: Vec<PathBuf> = std::fs::read_dir("runs")
        .map(|rd| {
            rd.flatten()
                .map(|e| e.path())
                .filter(|p| p.join("stages").is_dir())
                .collect()
        })
        .unwrap_or_default();
    match runs.as_slice() {
        [one] => Ok(one.clone()),
        [] => Err(Error::usage("no run found under runs/: pass --run DIR")),
        _ => Err(Error::usage(format!(
            "several runs under runs/ ({}): pass --run DIR",
            runs.iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ))),
    }
}

pub fn run(a: Args, engine: &Engine) -> Result<()> {
    let text = match (&a.query, &a.file) {
        (Some(q), None) => q.clone(),
        (None, Some(f)) => match std::fs::read_to_string(f) {
            Ok(t) => t,
            // `-f sql/funnel.sql` outside the repository: the canned queries are compiled in.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let name = f.file_name().and_then(|n| n.to_str()).unwrap_or_default();
                match crate::stats::queries().find(|(n, _)| *n == name) {
                    Some((_, text)) if f.parent().is_some_and(|p| p.ends_with("sql")) => {
                        text.to_string()
                    }
                    _ => return Err(Error::io(f, e)),
                }
            }
            Err(e) => return Err(Error::io(f, e)),
        },
        _ => return Err(Error::usage("give a query or -f FILE (one of them)")),
    };
    let text = query::substitute(&text, &a.params)?;
    let dir = RunDir::new(match a.run {
        Some(r) => r,
        None => pick_run()?,
    });
    let batches = engine.block_on(query::query(engine, &dir, &text))?;
    match a.format {
        OutFormat::Table if a.out.is_none() => {
            println!("{}", query::pretty(&batches, a.max_width)?)
        }
        f => query::write(&batches, f, a.out.as_deref())?,
    }
    Ok(())
}

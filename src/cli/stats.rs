use std::path::PathBuf;

use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::stats::{self, Options};
use crate::store::RunDir;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The run directory (default: the only run under runs/).
    pub run: Option<PathBuf>,
    /// Print JSON instead of terminal tables.
    #[arg(long)]
    pub json: bool,
    /// Compare two runs side by side (b - a deltas) instead of showing one.
    #[arg(long, num_args = 2, value_names = ["RUN_A", "RUN_B"], conflicts_with = "run")]
    pub compare: Vec<PathBuf>,
    /// GPUs behind the endpoints: adds GPU-seconds (stage wall time x GPUs) to LLM accounting.
    #[arg(long, default_value_t = 0.0)]
    pub gpus: f64,
    /// Also describe TABLE.COLUMN (a text column: lengths; a list column: items per row).
    #[arg(long = "column", value_name = "TABLE.COLUMN", value_parser = parse_column)]
    pub columns: Vec<(String, String)>,
}

pub(crate) fn parse_column(s: &str) -> std::result::Result<(String, String), String> {
    s.split_once('.')
        .filter(|(t, c)| !t.is_empty() && !c.is_empty())
        .map(|(t, c)| (t.to_string(), c.to_string()))
        .ok_or_else(|| format!("expected TABLE.COLUMN, got `{s}`"))
}

pub fn run(a: Args, engine: &Engine) -> Result<()> {
    if a.gpus < 0.0 || !a.gpus.is_finite() {
        return Err(Error::usage("--gpus must be a number ≥ 0"));
    }
    let opts = Options {
        gpus: a.gpus,
        columns: a.columns,
    };
    if let [ra, rb] = a.compare.as_slice() {
        let sa = stats::compute_blocking(engine, &RunDir::new(ra.clone()), &opts)?;
        let sb = stats::compute_blocking(engine, &RunDir::new(rb.clone()), &opts)?;
        let c = stats::compare(&sa, &sb);
        if a.json {
            println!("{}", serde_json::to_string_pretty(&c).unwrap_or_default());
        } else {
            print!("{}", stats::render_comparison(&c));
        }
        return Ok(());
    }
    let dir = RunDir::new(match a.run {
        Some(r) => r,
        None => super::sql::pick_run()?,
    });
    let s = stats::compute_blocking(engine, &dir, &opts)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&s).unwrap_or_default());
    } else {
        print!("{}", stats::render(&s));
    }
    Ok(())
}

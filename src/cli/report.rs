use std::path::PathBuf;

use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::report;
use crate::stats::Options;
use crate::store::RunDir;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The run directory (default: the only run under runs/).
    pub run: Option<PathBuf>,
    /// The HTML file to write.
    #[arg(short = 'o', long = "out", default_value = "report.html")]
    pub out: PathBuf,
    /// GPUs behind the endpoints (adds GPU-seconds).
    #[arg(long, default_value_t = 0.0)]
    pub gpus: f64,
    /// Sample rows shown per stage.
    #[arg(long, default_value_t = 3)]
    pub samples: usize,
    /// Also describe TABLE.COLUMN (text: lengths; list: items per row).
    #[arg(long = "column", value_name = "TABLE.COLUMN", value_parser = super::stats::parse_column)]
    pub columns: Vec<(String, String)>,
}

pub fn run(a: Args, engine: &Engine) -> Result<()> {
    if a.gpus < 0.0 || !a.gpus.is_finite() {
        return Err(Error::usage("--gpus must be a number ≥ 0"));
    }
    let dir = RunDir::new(match a.run {
        Some(r) => r,
        None => super::sql::pick_run()?,
    });
    let opts = Options {
        gpus: a.gpus,
        columns: a.columns,
    };
    let html = report::build(engine, &dir, &opts, a.samples)?;
    // Write beside the target and rename, so a failed write never leaves half a report.
    let tmp = a.out.with_extension("html.tmp");
    std::fs::write(&tmp, html).map_err(|e| Error::io(&tmp, e))?;
    std::fs::rename(&tmp, &a.out).map_err(|e| Error::io(&a.out, e))?;
    eprintln!("wrote {}", a.out.display());
    Ok(())
}

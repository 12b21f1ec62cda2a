use std::path::PathBuf;
use std::time::Instant;

use crate::engine::Engine;
use crate::error::Result;
use crate::exec::{self, RunOptions};
use crate::store::RunDir;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The pipeline file.
    pub file: PathBuf,
    /// Where the run's tables go (default: runs/<pipeline name>).
    #[arg(long)]
    pub run_dir: Option<PathBuf>,
    /// Override a param: key=value (repeatable).
    #[arg(long = "set", value_parser = super::parse_kv)]
    pub set: Vec<(String, String)>,
    /// Recompute this stage and everything downstream (repeatable).
    #[arg(long)]
    pub force: Vec<String>,
    /// DataFusion memory limit in MiB (sorts and joins spill to disk beyond it).
    #[arg(long, default_value_t = 2048)]
    pub memory_mb: usize,
    /// The LLM response cache (default: $IFLOOM_CACHE, else ~/.cache/ifloom/llm-cache.sqlite).
    #[arg(long)]
    pub cache: Option<PathBuf>,
}

pub fn run(a: Args, engine: &Engine) -> Result<()> {
    let started = Instant::now();
    let plan = super::compile_file(&a.file, &a.set, engine)?;
    let dir = RunDir::new(
        a.run_dir
            .unwrap_or_else(|| super::default_run_dir(&plan.pipeline.name)),
    );
    let mut engine = engine.clone();
    engine.memory_limit = a.memory_mb << 20;
    engine.spill_dir = Some(dir.path.join("spill"));
    if let Some(c) = a.cache {
        engine.cache_path = c;
    }
    eprintln!(
        "ifloom: running {} into {}",
        plan.pipeline.name,
        dir.path.display()
    );
    let report = exec::run(&plan, &dir, &engine, &RunOptions { force: a.force })?;
    eprintln!(
        "ifloom: done in {:.2} s ({} computed, {} reused); query it with: ifloom sql --run {} \"SELECT ...\"",
        started.elapsed().as_secs_f64(),
        report.computed.len(),
        report.reused.len(),
        dir.path.display()
    );
    Ok(())
}
